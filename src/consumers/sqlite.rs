//! Consumers in the SQLite store's file (its `consumers` and
//! `consumer_pending` tables), on a connection of their own. Every change
//! takes the write lock first (BEGIN IMMEDIATE), which serializes it with
//! the notification writer and the ledger, and commits (an fsync) only when
//! it changed something.

use std::{path::Path, time::Duration};

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, params};

use super::{
    Acked, Consumer, ConsumerError, ConsumerRow, ConsumerStore, Fetched, Kind, Leased,
    PARKED_SHOWN, QueueSettings, millis, same_queue, start_after,
};
use crate::store::{SideConnection, StoreError, sqlite_rows};

pub struct SqliteConsumers {
    conn: SideConnection,
}

impl SqliteConsumers {
    /// Runs `change` on cursor `name` in a write transaction (refusing a
    /// work queue), and answers the cursor's position after it.
    async fn change_cursor(
        &self,
        name: &str,
        change: impl FnOnce(&Transaction<'_>, &str) -> rusqlite::Result<Result<(), ConsumerError>>
        + Send
        + 'static,
    ) -> Result<u64, ConsumerError> {
        let name = name.to_owned();
        self.conn
            .with(move |conn| {
                let tx = immediate(conn)?;
                if let Err(e) = cursor_kind(&tx, &name)? {
                    return Ok(Err(e));
                }
                if let Err(e) = change(&tx, &name)? {
                    return Ok(Err(e));
                }
                let acked = position(&tx, &name)?;
                tx.commit()?;
                Ok(Ok(acked))
            })
            .await?
    }

    /// Opens the consumers of the store at `path` (already migrated). A
    /// SQLite store has one gateway, this one: stream holds left by a
    /// previous run that did not end cleanly are given up.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = SideConnection::open(path)?;
        conn.blocking(|c| {
            c.execute(
                "UPDATE consumers SET stream_holder = NULL, stream_until_ms = NULL \
                 WHERE stream_holder IS NOT NULL",
                [],
            )
        })?;
        Ok(Self { conn })
    }
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

fn to_sql(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn from_sql(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A consumer and the counts of its pending events; `?1` is now (ms).
const SELECT: &str = "SELECT c.name, c.kind, c.acked_sequence, c.last_ack_at_ms, \
     c.created_at_ms, c.deliver_policy, COALESCE(c.policy_sequence, 0), \
     COALESCE(c.ack_wait_ms, 0), COALESCE(c.max_deliver, 0), \
     COALESCE(c.max_ack_pending, 0), c.delivered_sequence, c.last_fetch_at_ms, \
     c.stream_holder IS NOT NULL AND c.stream_until_ms > ?1, \
     (SELECT COALESCE(MAX(sequence), 0) FROM notifications), \
     p.oldest, COALESCE(p.n, 0), COALESCE(p.leased, 0), COALESCE(p.parked, 0), \
     COALESCE(p.redelivered, 0) \
     FROM consumers c LEFT JOIN ( \
       SELECT consumer, MIN(sequence) AS oldest, COUNT(*) AS n, \
         COUNT(*) FILTER (WHERE leased_until_ms > ?1) AS leased, \
         COUNT(*) FILTER (WHERE deliveries_left = 0 AND leased_until_ms <= ?1) AS parked, \
         COUNT(*) FILTER (WHERE delivery_count > 1 \
           AND NOT (deliveries_left = 0 AND leased_until_ms <= ?1)) AS redelivered \
       FROM consumer_pending GROUP BY consumer \
     ) p ON p.consumer = c.name";

fn row_to_consumer(r: &Row<'_>) -> rusqlite::Result<ConsumerRow> {
    Ok(ConsumerRow {
        name: r.get(0)?,
        kind: r.get(1)?,
        acked_sequence: from_sql(r.get(2)?),
        last_ack_at: r.get::<_, Option<i64>>(3)?.map(at),
        created_at: r.get::<_, Option<i64>>(4)?.map(at),
        deliver_policy: r.get(5)?,
        policy_sequence: from_sql(r.get(6)?),
        ack_wait_ms: r.get(7)?,
        max_deliver: r.get(8)?,
        max_ack_pending: r.get(9)?,
        delivered_sequence: from_sql(r.get(10)?),
        last_fetch_at: r.get::<_, Option<i64>>(11)?.map(at),
        streaming: r.get(12)?,
        last: from_sql(r.get(13)?),
        oldest_pending: r.get::<_, Option<i64>>(14)?.map(from_sql),
        pending_rows: from_sql(r.get(15)?),
        leased: from_sql(r.get(16)?),
        parked: from_sql(r.get(17)?),
        redelivered: from_sql(r.get(18)?),
    })
}

fn select_one(conn: &Connection, name: &str, now: i64) -> rusqlite::Result<Option<Consumer>> {
    let Some(row) = conn
        .prepare_cached(&format!("{SELECT} WHERE c.name = ?2"))?
        .query_row(params![now, name], row_to_consumer)
        .optional()?
    else {
        return Ok(None);
    };
    let parked = conn
        .prepare_cached(
            "SELECT sequence FROM consumer_pending WHERE consumer = ?1 \
             AND deliveries_left = 0 AND leased_until_ms <= ?2 ORDER BY sequence LIMIT ?3",
        )?
        .query_map(params![name, now, PARKED_SHOWN as i64], |r| {
            r.get::<_, i64>(0).map(from_sql)
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Some(row.assemble(parked)))
}

fn last_sequence(tx: &Transaction<'_>) -> rusqlite::Result<u64> {
    tx.query_row(
        "SELECT COALESCE(MAX(sequence), 0) FROM notifications",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(from_sql)
}

/// The lowest stored sequence (1 before the first event).
fn first_sequence(tx: &Transaction<'_>) -> rusqlite::Result<u64> {
    tx.query_row(
        "SELECT COALESCE(MIN(sequence), 1) FROM notifications",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(from_sql)
}

/// A work queue's settings for an operation on it, refusing a cursor.
struct Queue {
    ack_wait_ms: i64,
    max_deliver: i64,
    max_ack_pending: i64,
    delivered: u64,
}

fn queue(tx: &Transaction<'_>, name: &str) -> rusqlite::Result<Result<Queue, ConsumerError>> {
    let row = tx
        .prepare_cached(
            "SELECT kind, COALESCE(ack_wait_ms, 0), COALESCE(max_deliver, 0), \
             COALESCE(max_ack_pending, 0), delivered_sequence FROM consumers WHERE name = ?1",
        )?
        .query_row([name], |r| {
            Ok((
                r.get::<_, String>(0)?,
                Queue {
                    ack_wait_ms: r.get(1)?,
                    max_deliver: r.get(2)?,
                    max_ack_pending: r.get(3)?,
                    delivered: from_sql(r.get(4)?),
                },
            ))
        })
        .optional()?;
    Ok(match row {
        None => Err(ConsumerError::NotFound(name.to_owned())),
        Some((kind, q)) if kind == Kind::WorkQueue.as_str() => Ok(q),
        Some((kind, _)) => Err(ConsumerError::WrongKind {
            name: name.to_owned(),
            kind: Kind::parse(&kind).unwrap_or(Kind::Cursor),
        }),
    })
}

/// A cursor's kind, refusing a work queue; `None` when there is none.
fn cursor_kind(tx: &Transaction<'_>, name: &str) -> rusqlite::Result<Result<(), ConsumerError>> {
    let kind: Option<String> = tx
        .prepare_cached("SELECT kind FROM consumers WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()?;
    Ok(match kind.as_deref().map(Kind::parse) {
        Some(Some(Kind::WorkQueue)) => Err(ConsumerError::WrongKind {
            name: name.to_owned(),
            kind: Kind::WorkQueue,
        }),
        _ => Ok(()),
    })
}

/// A cursor's acknowledged position.
fn position(tx: &Transaction<'_>, name: &str) -> rusqlite::Result<u64> {
    tx.prepare_cached("SELECT acked_sequence FROM consumers WHERE name = ?1")?
        .query_row([name], |r| r.get::<_, i64>(0))
        .map(from_sql)
}

fn immediate(conn: &mut Connection) -> rusqlite::Result<Transaction<'_>> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
}

fn fetch_tx(
    conn: &mut Connection,
    name: &str,
    max: u32,
    touch: bool,
) -> rusqlite::Result<Result<Fetched, ConsumerError>> {
    let tx = immediate(conn)?;
    let q = match queue(&tx, name)? {
        Ok(q) => q,
        Err(e) => return Ok(Err(e)),
    };
    let now = now_ms();
    let until = now.saturating_add(q.ack_wait_ms);
    let parked = tx
        .prepare_cached(
            "UPDATE consumer_pending SET parked_at_ms = ?2 WHERE consumer = ?1 \
             AND deliveries_left = 0 AND leased_until_ms <= ?2 AND parked_at_ms IS NULL",
        )?
        .execute(params![name, now])?;
    // Redeliveries first, in sequence order.
    let due: Vec<(i64, i64)> = tx
        .prepare_cached(
            "SELECT sequence, delivery_count FROM consumer_pending WHERE consumer = ?1 \
             AND deliveries_left > 0 AND leased_until_ms <= ?2 ORDER BY sequence LIMIT ?3",
        )?
        .query_map(params![name, now, i64::from(max)], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut leased: Vec<(i64, i64)> = Vec::with_capacity(max as usize);
    {
        let mut lease = tx.prepare_cached(
            "UPDATE consumer_pending SET delivery_count = delivery_count + 1, \
             deliveries_left = deliveries_left - 1, leased_until_ms = ?3 \
             WHERE consumer = ?1 AND sequence = ?2",
        )?;
        for (sequence, count) in due {
            lease.execute(params![name, sequence, until])?;
            leased.push((sequence, count + 1));
        }
    }
    let redelivered = leased.len();
    // Then new events, while fewer than max_ack_pending are pending.
    let pending: i64 = tx
        .prepare_cached(
            "SELECT COUNT(*) FROM consumer_pending WHERE consumer = ?1 \
             AND NOT (deliveries_left = 0 AND leased_until_ms <= ?2)",
        )?
        .query_row(params![name, now], |r| r.get(0))?;
    let room = (i64::from(max) - redelivered as i64).min(q.max_ack_pending - pending);
    if room > 0 {
        let fresh: Vec<i64> = tx
            .prepare_cached(
                "SELECT sequence FROM notifications WHERE sequence > ?1 \
                 ORDER BY sequence LIMIT ?2",
            )?
            .query_map(params![to_sql(q.delivered), room], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        if let Some(&oldest) = fresh.first() {
            // Sequences are gapless: a gap is events retention deleted
            // before this queue got them (the transaction rolls back).
            let oldest = u64::try_from(oldest).unwrap_or(0);
            if oldest > q.delivered.saturating_add(1) {
                return Ok(Err(ConsumerError::BehindRetention {
                    name: name.to_owned(),
                    delivered: q.delivered,
                    first: oldest,
                }));
            }
        }
        let mut insert = tx.prepare_cached(
            "INSERT INTO consumer_pending \
             (consumer, sequence, delivery_count, deliveries_left, leased_until_ms) \
             VALUES (?1, ?2, 1, ?3, ?4)",
        )?;
        for &sequence in &fresh {
            insert.execute(params![name, sequence, q.max_deliver - 1, until])?;
            leased.push((sequence, 1));
        }
        if let Some(&newest) = fresh.last() {
            tx.prepare_cached("UPDATE consumers SET delivered_sequence = ?2 WHERE name = ?1")?
                .execute(params![name, newest])?;
        }
    }
    if touch || !leased.is_empty() {
        tx.prepare_cached("UPDATE consumers SET last_fetch_at_ms = ?2 WHERE name = ?1")?
            .execute(params![name, now])?;
    }
    let next_due: Option<i64> = tx
        .prepare_cached(
            "SELECT MIN(leased_until_ms) FROM consumer_pending \
             WHERE consumer = ?1 AND leased_until_ms > ?2",
        )?
        .query_row(params![name, now], |r| r.get(0))?;
    let mut events = Vec::with_capacity(leased.len());
    {
        let mut read = tx.prepare_cached(&format!(
            "SELECT {} FROM notifications WHERE sequence = ?1",
            sqlite_rows::COLUMNS
        ))?;
        for (sequence, count) in leased {
            events.push(Leased {
                notification: read.query_row([sequence], sqlite_rows::to_stored)?,
                delivery_count: u32::try_from(count).unwrap_or(u32::MAX),
                lease_expires_at: at(until),
            });
        }
    }
    let changed = parked > 0 || !events.is_empty() || touch;
    if changed {
        tx.commit()?;
    }
    Ok(Ok(Fetched {
        events,
        redelivered: u32::try_from(redelivered).unwrap_or(u32::MAX),
        parked: u32::try_from(parked).unwrap_or(u32::MAX),
        next_due: next_due.map(|t| Duration::from_millis(from_sql(t - now))),
    }))
}

#[async_trait::async_trait]
impl ConsumerStore for SqliteConsumers {
    async fn get(&self, name: &str) -> Result<Option<Consumer>, StoreError> {
        let name = name.to_owned();
        self.conn
            .with(move |conn| select_one(conn, &name, now_ms()))
            .await
    }

    async fn list(&self, after: &str, limit: usize) -> Result<Vec<Consumer>, StoreError> {
        let after = after.to_owned();
        self.conn
            .with(move |conn| {
                conn.prepare_cached(&format!(
                    "{SELECT} WHERE c.name > ?2 ORDER BY c.name LIMIT ?3"
                ))?
                .query_map(
                    params![now_ms(), after, i64::try_from(limit).unwrap_or(i64::MAX)],
                    row_to_consumer,
                )?
                .map(|r| r.map(|row| row.assemble(Vec::new())))
                .collect()
            })
            .await
    }

    async fn delete(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_owned();
        self.conn
            .with(move |conn| {
                let tx = immediate(conn)?;
                tx.execute("DELETE FROM consumer_pending WHERE consumer = ?1", [&name])?;
                let deleted = tx.execute("DELETE FROM consumers WHERE name = ?1", [&name])? > 0;
                tx.commit()?;
                Ok(deleted)
            })
            .await
    }

    async fn ack_cursor(&self, name: &str, sequence: u64) -> Result<u64, ConsumerError> {
        self.change_cursor(name, move |tx, name| {
            let last = last_sequence(tx)?;
            if sequence > last {
                return Ok(Err(StoreError::BeyondLast {
                    requested: sequence,
                    last,
                }
                .into()));
            }
            tx.prepare_cached(
                "INSERT INTO consumers \
                 (name, acked_sequence, updated_at_ms, last_ack_at_ms, created_at_ms) \
                 VALUES (?1, ?2, ?3, ?3, ?3) \
                 ON CONFLICT (name) DO UPDATE SET \
                   acked_sequence = MAX(acked_sequence, excluded.acked_sequence), \
                   updated_at_ms = excluded.updated_at_ms, \
                   last_ack_at_ms = excluded.last_ack_at_ms",
            )?
            .execute(params![name, to_sql(sequence), now_ms()])?;
            Ok(Ok(()))
        })
        .await
    }

    async fn hold_stream(
        &self,
        name: &str,
        holder: &str,
        hold: Duration,
    ) -> Result<u64, ConsumerError> {
        let holder = holder.to_owned();
        self.change_cursor(name, move |tx, name| {
            let now = now_ms();
            let held_by_another: bool = tx
                .prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM consumers WHERE name = ?1 \
                     AND stream_holder IS NOT NULL AND stream_holder != ?2 \
                     AND stream_until_ms > ?3)",
                )?
                .query_row(params![name, holder, now], |r| r.get(0))?;
            if held_by_another {
                return Ok(Err(ConsumerError::InUse {
                    name: name.to_owned(),
                }));
            }
            tx.prepare_cached(
                "INSERT INTO consumers (name, acked_sequence, updated_at_ms, created_at_ms, \
                 stream_holder, stream_until_ms) VALUES (?1, 0, ?2, ?2, ?3, ?4) \
                 ON CONFLICT (name) DO UPDATE SET \
                   stream_holder = excluded.stream_holder, \
                   stream_until_ms = excluded.stream_until_ms",
            )?
            .execute(params![name, now, holder, now.saturating_add(millis(hold))])?;
            Ok(Ok(()))
        })
        .await
    }

    async fn renew_stream(
        &self,
        name: &str,
        holder: &str,
        hold: Duration,
    ) -> Result<bool, StoreError> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.conn
            .with(move |conn| {
                let until = now_ms().saturating_add(millis(hold));
                Ok(conn
                    .prepare_cached(
                        "UPDATE consumers SET stream_holder = ?2, stream_until_ms = ?3 \
                         WHERE name = ?1 AND (stream_holder = ?2 OR stream_holder IS NULL)",
                    )?
                    .execute(params![name, holder, until])?
                    > 0)
            })
            .await
    }

    async fn release_stream(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.conn
            .with(move |conn| {
                conn.prepare_cached(
                    "UPDATE consumers SET stream_holder = NULL, stream_until_ms = NULL \
                     WHERE name = ?1 AND stream_holder = ?2",
                )?
                .execute(params![name, holder])?;
                Ok(())
            })
            .await
    }

    async fn create(
        &self,
        name: &str,
        settings: &QueueSettings,
    ) -> Result<Consumer, ConsumerError> {
        let (name, settings) = (name.to_owned(), *settings);
        self.conn
            .with(move |conn| {
                let now = now_ms();
                let tx = immediate(conn)?;
                if let Some(existing) = select_one(&tx, &name, now)? {
                    return Ok(if same_queue(&existing, &settings) {
                        Ok(existing)
                    } else {
                        Err(ConsumerError::Exists(Box::new(existing)))
                    });
                }
                let start = match start_after(
                    &name,
                    settings.deliver_policy,
                    first_sequence(&tx)?,
                    last_sequence(&tx)?,
                ) {
                    Ok(s) => s,
                    Err(e) => return Ok(Err(e)),
                };
                let (policy, policy_sequence) = settings.deliver_policy.columns();
                tx.prepare_cached(
                    "INSERT INTO consumers (name, kind, acked_sequence, updated_at_ms, \
                     created_at_ms, deliver_policy, policy_sequence, ack_wait_ms, max_deliver, \
                     max_ack_pending, delivered_sequence) \
                     VALUES (?1, 'work_queue', 0, ?2, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )?
                .execute(params![
                    name,
                    now,
                    policy,
                    to_sql(policy_sequence),
                    settings.ack_wait_ms(),
                    settings.max_deliver,
                    settings.max_ack_pending,
                    to_sql(start)
                ])?;
                let created = select_one(&tx, &name, now)?;
                tx.commit()?;
                Ok(created.ok_or(ConsumerError::NotFound(name)))
            })
            .await?
    }

    async fn fetch(&self, name: &str, max: u32, touch: bool) -> Result<Fetched, ConsumerError> {
        let name = name.to_owned();
        self.conn
            .with(move |conn| fetch_tx(conn, &name, max, touch))
            .await?
    }

    async fn ack_events(&self, name: &str, sequences: &[u64]) -> Result<Acked, ConsumerError> {
        let (name, sequences) = (name.to_owned(), sequences.to_vec());
        self.conn
            .with(move |conn| {
                let tx = immediate(conn)?;
                let q = match queue(&tx, &name)? {
                    Ok(q) => q,
                    Err(e) => return Ok(Err(e)),
                };
                if let Some(&sequence) = sequences.iter().find(|&&s| s > q.delivered) {
                    return Ok(Err(ConsumerError::NotDelivered { name, sequence }));
                }
                let mut newly = 0;
                {
                    let mut delete = tx.prepare_cached(
                        "DELETE FROM consumer_pending WHERE consumer = ?1 AND sequence = ?2",
                    )?;
                    for &s in &sequences {
                        newly += delete.execute(params![name, to_sql(s)])?;
                    }
                }
                if newly > 0 {
                    tx.prepare_cached(
                        "UPDATE consumers SET last_ack_at_ms = ?2, updated_at_ms = ?2 \
                         WHERE name = ?1",
                    )?
                    .execute(params![name, now_ms()])?;
                }
                let oldest: Option<i64> = tx
                    .prepare_cached(
                        "SELECT MIN(sequence) FROM consumer_pending WHERE consumer = ?1",
                    )?
                    .query_row([&name], |r| r.get(0))?;
                if newly > 0 {
                    tx.commit()?;
                }
                Ok(Ok(Acked {
                    acked_sequence: oldest.map_or(q.delivered, |s| from_sql(s).saturating_sub(1)),
                    newly_acked: u32::try_from(newly).unwrap_or(u32::MAX),
                }))
            })
            .await?
    }

    async fn nak(
        &self,
        name: &str,
        sequences: &[u64],
        delivery_counts: Option<&[u32]>,
        delay: Duration,
    ) -> Result<u32, ConsumerError> {
        let (name, sequences) = (name.to_owned(), sequences.to_vec());
        let counts = delivery_counts.map(<[u32]>::to_vec);
        self.conn
            .with(move |conn| {
                let tx = immediate(conn)?;
                if let Err(e) = queue(&tx, &name)? {
                    return Ok(Err(e));
                }
                let now = now_ms();
                let later = now.saturating_add(millis(delay));
                let mut nakked = 0;
                {
                    let mut nak = tx.prepare_cached(
                        "UPDATE consumer_pending SET leased_until_ms = \
                           CASE WHEN deliveries_left = 0 THEN ?3 ELSE ?4 END \
                         WHERE consumer = ?1 AND sequence = ?2 AND leased_until_ms > ?3 \
                           AND (?5 IS NULL OR delivery_count = ?5)",
                    )?;
                    for (i, &s) in sequences.iter().enumerate() {
                        let count = counts.as_ref().and_then(|c| c.get(i)).copied();
                        nakked += nak.execute(params![name, to_sql(s), now, later, count])?;
                    }
                }
                if nakked > 0 {
                    tx.commit()?;
                }
                Ok(Ok(u32::try_from(nakked).unwrap_or(u32::MAX)))
            })
            .await?
    }

    async fn redrive(&self, name: &str, sequences: &[u64]) -> Result<u32, ConsumerError> {
        let (name, sequences) = (name.to_owned(), sequences.to_vec());
        self.conn
            .with(move |conn| {
                let tx = immediate(conn)?;
                let q = match queue(&tx, &name)? {
                    Ok(q) => q,
                    Err(e) => return Ok(Err(e)),
                };
                let now = now_ms();
                let parked = "UPDATE consumer_pending SET deliveries_left = ?2, \
                     parked_at_ms = NULL, leased_until_ms = ?3 \
                     WHERE consumer = ?1 AND deliveries_left = 0 AND leased_until_ms <= ?3";
                let redriven = if sequences.is_empty() {
                    tx.execute(parked, params![name, q.max_deliver, now])?
                } else {
                    let mut one = tx.prepare_cached(&format!("{parked} AND sequence = ?4"))?;
                    let mut n = 0;
                    for &s in &sequences {
                        n += one.execute(params![name, q.max_deliver, now, to_sql(s)])?;
                    }
                    n
                };
                if redriven > 0 {
                    tx.commit()?;
                }
                Ok(Ok(u32::try_from(redriven).unwrap_or(u32::MAX)))
            })
            .await?
    }
}
