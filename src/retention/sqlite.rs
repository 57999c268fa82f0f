//! Retention in the SQLite store's file. Each sweep batch and each step of
//! compaction runs on the store's writer, between its batches (SQLite has
//! one writer; a second connection would wait on the lock, and under full
//! intake starve): one short transaction, so intake waits a moment at most.
//! The freed pages go back to the file system by incremental vacuum (the
//! store is created, or rewritten once, with `auto_vacuum=INCREMENTAL`), a
//! few megabytes per step. Reads use a connection of their own. Each row
//! deleted leaves its tombstone in the same transaction.

use std::path::{Path, PathBuf};

use rusqlite::{TransactionBehavior, params};

use super::{Cutoffs, RetentionStore, Swept};
use crate::store::{SideConnection, StoreError, WriterHandle, dedup_digest};

/// Pages freed per incremental-vacuum transaction (4 KiB pages: 8 MiB).
const VACUUM_STEP: i64 = 2048;

pub struct SqliteRetention {
    /// For reads.
    conn: SideConnection,
    writer: WriterHandle,
    path: PathBuf,
}

impl SqliteRetention {
    /// Retention for the store at `path` (already migrated), writing
    /// through its `writer`.
    pub fn open(path: &Path, writer: WriterHandle) -> Result<Self, StoreError> {
        Ok(Self {
            conn: SideConnection::open(path)?,
            writer,
            path: path.to_owned(),
        })
    }
}

/// The lowest sequence some consumer has not acknowledged, less one: a
/// cursor's acknowledged position; a work queue's delivered position, or
/// just below its oldest pending (unacknowledged or parked) event.
/// `i64::MAX` without consumers.
const ACK_FLOOR: &str = "
    SELECT COALESCE(MIN(CASE WHEN c.kind = 'work_queue'
        THEN MIN(c.delivered_sequence,
                 COALESCE((SELECT MIN(p.sequence) FROM consumer_pending p
                           WHERE p.consumer = c.name) - 1, c.delivered_sequence))
        ELSE c.acked_sequence END), 9223372036854775807)
    FROM consumers c";

#[async_trait::async_trait]
impl RetentionStore for SqliteRetention {
    async fn sweep(&self, cutoffs: Cutoffs, batch: usize) -> Result<Swept, StoreError> {
        let keep = cutoffs.keep_before.timestamp_millis();
        let hard = cutoffs.hard_before.timestamp_millis();
        let batch = i64::try_from(batch).unwrap_or(i64::MAX);
        self.writer
            .run(move |conn| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let floor: i64 = tx.query_row(ACK_FLOOR, [], |r| r.get(0))?;
                let victims: Vec<(i64, String)> = tx
                    .prepare_cached(
                        "SELECT sequence, dedup_key FROM notifications
                         WHERE received_at_ms < ?1
                           AND sequence < (SELECT MAX(sequence) FROM notifications)
                           AND (sequence <= ?2 OR received_at_ms < ?3)
                         ORDER BY received_at_ms LIMIT ?4",
                    )?
                    .query_map(params![keep, floor, hard, batch], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })?
                    .collect::<Result<_, _>>()?;
                let unacknowledged = victims.iter().filter(|(seq, _)| *seq > floor).count();
                {
                    let mut tombstone = tx.prepare_cached(
                        "INSERT OR IGNORE INTO swept_notifications (dedup_digest, sequence) \
                         VALUES (?1, ?2)",
                    )?;
                    let mut delete =
                        tx.prepare_cached("DELETE FROM notifications WHERE sequence = ?1")?;
                    for (sequence, key) in &victims {
                        tombstone.execute(params![dedup_digest(key), sequence])?;
                        delete.execute([sequence])?;
                    }
                }
                let notifications = victims.len();
                if unacknowledged > 0 {
                    // Deliveries of events that are gone go with them.
                    tx.execute(
                        "DELETE FROM consumer_pending \
                         WHERE sequence < (SELECT MIN(sequence) FROM notifications)",
                        [],
                    )?;
                }
                let orders: Vec<(String, bool)> = tx
                    .prepare_cached(
                        "SELECT out_trade_id, state = 'PAID' FROM orders
                         WHERE created_at_ms < ?1 AND updated_at_ms < ?1
                           AND (state IN ('PAID', 'FAILED')
                                OR (state IN ('CREATED', 'UNKNOWN') AND expires_at_ms < ?1))
                         ORDER BY created_at_ms LIMIT ?2",
                    )?
                    .query_map(params![keep, batch], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?;
                {
                    let mut tombstone = tx.prepare_cached(
                        "INSERT OR IGNORE INTO swept_orders (out_trade_id, paid) VALUES (?1, ?2)",
                    )?;
                    let mut delete =
                        tx.prepare_cached("DELETE FROM orders WHERE out_trade_id = ?1")?;
                    for (id, paid) in &orders {
                        tombstone.execute(params![id, paid])?;
                        delete.execute([id])?;
                    }
                }
                tx.commit()?;
                Ok(Swept {
                    notifications: notifications as u64,
                    unacknowledged: unacknowledged as u64,
                    orders: orders.len() as u64,
                })
            })
            .await
    }

    async fn first_retained(&self) -> Result<u64, StoreError> {
        self.conn
            .with(|conn| {
                conn.query_row(
                    "SELECT COALESCE(MIN(sequence), 1) FROM notifications",
                    [],
                    |r| r.get::<_, i64>(0),
                )
            })
            .await
            .map(|s| u64::try_from(s).unwrap_or(1))
    }

    async fn size_bytes(&self) -> Result<u64, StoreError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || file_bytes(&path))
            .await
            .map_err(|e| StoreError::Backend(e.to_string()))
    }

    async fn compact(&self) -> Result<(), StoreError> {
        self.conn
            .with(|conn| {
                loop {
                    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
                    if free == 0 {
                        return Ok(());
                    }
                    // Each step of the statement frees pages: run it to its end.
                    let mut vacuum =
                        conn.prepare(&format!("PRAGMA incremental_vacuum({VACUUM_STEP})"))?;
                    let mut steps = vacuum.query([])?;
                    while steps.next()?.is_some() {}
                    if free <= VACUUM_STEP {
                        return Ok(());
                    }
                }
            })
            .await
    }
}

/// The database file and its WAL, in bytes.
pub(crate) fn file_bytes(path: &Path) -> u64 {
    let len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    len(path) + len(Path::new(&wal))
}
