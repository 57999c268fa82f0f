//! The SQLite backend: one writer thread that group-commits, WAL with
//! `synchronous=FULL` so an acknowledged commit survives a power cut, and a
//! small pool of read connections.
//!
//! Group commit: the writer takes every request queued while it was busy
//! (up to [`MAX_BATCH`]) into one transaction, so a burst costs one fsync
//! per batch rather than per notification, and answers each request only
//! after that transaction commits. Being the only writer, it also hands out
//! sequences: gapless, because a failed batch hands its numbers back.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
    thread,
};

use chrono::{DateTime, Utc};
use std::sync::mpsc::RecvTimeoutError;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{debug, error, info};

use crate::{
    consumers::{ConsumerStore, SqliteConsumers},
    metrics::Metrics,
    orders::{self, OrderCheck, OrderStore, SqliteOrders},
    retention::{RetentionStore, SqliteRetention},
    telemetry::RateLimited,
};

use super::{
    HeldWrite, IncomingNotification, LiveFeed, NotificationStore, Recorded, StoreError,
    StoredNotification, WriteHealth, ask, from_sql, lock, to_sql,
};

/// Most requests committed in one transaction.
const MAX_BATCH: usize = 512;
/// Requests queued for the writer before callers wait.
const QUEUE: usize = 4096;
/// Reads at once, each on a blocking thread with a connection of its own;
/// more wait their turn (a burst of reads must not start a thread and
/// open a connection each: that starves every other call of the CPU).
const READERS: usize = 4;
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);
/// A failing checkpoint is logged at most this often.
const CHECKPOINT_WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE notifications (
        sequence            INTEGER PRIMARY KEY,
        dedup_key           TEXT    NOT NULL UNIQUE,
        out_trade_id        TEXT    NOT NULL,
        trade_order_id      TEXT    NOT NULL,
        trade_bill_no       TEXT    NOT NULL,
        trade_status        TEXT    NOT NULL,
        message             TEXT    NOT NULL,
        trade_amount        TEXT    NOT NULL,
        amount_fen          INTEGER,
        trade_time          TEXT    NOT NULL,
        time_stamp          TEXT    NOT NULL,
        raw_body            TEXT    NOT NULL,
        received_at_ms      INTEGER NOT NULL,
        last_received_at_ms INTEGER NOT NULL,
        receive_count       INTEGER NOT NULL
    );
    CREATE INDEX notifications_by_order ON notifications (out_trade_id, sequence);
    CREATE TABLE consumers (
        name           TEXT    PRIMARY KEY,
        acked_sequence INTEGER NOT NULL,
        updated_at_ms  INTEGER NOT NULL
    );
",
    "
    -- One row, rewritten by the write probe while the store cannot write.
    CREATE TABLE store_probe (
        id    INTEGER PRIMARY KEY CHECK (id = 1),
        at_ms INTEGER NOT NULL,
        room  BLOB    NOT NULL
    );
",
    "
    -- The order ledger (src/orders/): every JSAPI order the gateway asks
    -- Kongtie for, written before it is sent.
    CREATE TABLE orders (
        out_trade_id     TEXT    PRIMARY KEY,
        amount_fen       INTEGER NOT NULL,
        openid           TEXT    NOT NULL,
        expires_at_ms    INTEGER NOT NULL,
        created_at_ms    INTEGER NOT NULL,
        state            TEXT    NOT NULL,
        response_text    TEXT,
        params_at_ms     INTEGER,
        failure_code     TEXT,
        failure_message  TEXT,
        paid_sequence    INTEGER,
        attempts         INTEGER NOT NULL,
        claimed_by       TEXT,
        claimed_until_ms INTEGER,
        updated_at_ms    INTEGER NOT NULL
    );
    CREATE INDEX orders_newest_first ON orders (created_at_ms DESC, out_trade_id DESC);
    -- Each notification checked against its order at intake (NULL: stored
    -- before this migration).
    ALTER TABLE notifications ADD COLUMN order_check TEXT;
",
    "
    -- Consumers of two kinds (src/consumers/): cursors, held by one stream
    -- at a time, and work queues, with their settings and their pending
    -- events (delivered, not yet acknowledged).
    ALTER TABLE consumers ADD COLUMN kind TEXT NOT NULL DEFAULT 'cursor';
    ALTER TABLE consumers ADD COLUMN last_ack_at_ms INTEGER;
    UPDATE consumers SET last_ack_at_ms = updated_at_ms;
    ALTER TABLE consumers ADD COLUMN created_at_ms INTEGER;
    ALTER TABLE consumers ADD COLUMN deliver_policy TEXT;
    ALTER TABLE consumers ADD COLUMN policy_sequence INTEGER;
    ALTER TABLE consumers ADD COLUMN ack_wait_ms INTEGER;
    ALTER TABLE consumers ADD COLUMN max_deliver INTEGER;
    ALTER TABLE consumers ADD COLUMN max_ack_pending INTEGER;
    ALTER TABLE consumers ADD COLUMN delivered_sequence INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE consumers ADD COLUMN last_fetch_at_ms INTEGER;
    ALTER TABLE consumers ADD COLUMN stream_holder TEXT;
    ALTER TABLE consumers ADD COLUMN stream_until_ms INTEGER;
    CREATE TABLE consumer_pending (
        consumer        TEXT    NOT NULL,
        sequence        INTEGER NOT NULL,
        delivery_count  INTEGER NOT NULL,
        deliveries_left INTEGER NOT NULL,
        leased_until_ms INTEGER NOT NULL,
        -- Set by the first fetch that found it parked (for the metric).
        parked_at_ms    INTEGER,
        PRIMARY KEY (consumer, sequence)
    ) WITHOUT ROWID;
    CREATE INDEX consumer_pending_due ON consumer_pending (consumer, leased_until_ms);
",
    "
    -- Retention (src/retention/): the sweep finds events past the horizon
    -- by when they were received.
    CREATE INDEX notifications_by_received_at ON notifications (received_at_ms);
",
    "
    -- Tombstones (src/retention/): the keys of what retention deleted, kept
    -- for ever, so that a resend of a swept payment is still a repeat and a
    -- swept order's id is not ordered again. Keys only: the SHA-256 of the
    -- dedup key and the event's sequence; the order's id and whether it was
    -- paid.
    CREATE TABLE swept_notifications (
        dedup_digest BLOB    PRIMARY KEY,
        sequence     INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE swept_orders (
        out_trade_id TEXT    PRIMARY KEY,
        paid         INTEGER NOT NULL
    ) WITHOUT ROWID;
",
];

/// The schema migrations, in order (test support: a test builds a store as
/// an older release left it from the first few).
#[doc(hidden)]
pub fn migrations() -> &'static [&'static str] {
    MIGRATIONS
}

/// How other rooms of the crate read notification rows in this backend.
pub(crate) mod rows {
    pub(crate) use super::{SELECT_COLUMNS as COLUMNS, row_to_stored as to_stored};
}

/// What the write probe writes: room for the largest notification (its
/// fields and its raw body, at the largest default body), so that "the
/// probe wrote" means "a notification would have been stored".
const PROBE_BYTES: i64 = 128 << 10;

pub(crate) const SELECT_COLUMNS: &str = "sequence, out_trade_id, trade_order_id, trade_bill_no, trade_status, \
     message, trade_amount, amount_fen, trade_time, received_at_ms, receive_count, order_check";

enum WriteOp {
    Record(
        Box<IncomingNotification>,
        oneshot::Sender<Result<Recorded, StoreError>>,
    ),
    /// A record committed alone, once `release` says so (tests only).
    Held(
        Box<IncomingNotification>,
        oneshot::Sender<Result<Recorded, StoreError>>,
        HeldWrite,
    ),
    /// A small durable write, to learn whether the store can write again.
    Probe(oneshot::Sender<Result<(), StoreError>>),
    /// Maintenance on the writer's connection, between batches (retention's
    /// sweeps): it waits its turn behind queued records instead of fighting
    /// the writer for the lock.
    Maintain(Box<dyn FnOnce(&mut Connection) + Send>),
}

/// Runs maintenance on the writer's connection, between its batches, while
/// the store is open (it does not keep the writer running).
pub struct WriterHandle(mpsc::WeakSender<WriteOp>);

impl WriterHandle {
    pub async fn run<R: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, StoreError> {
        let writer = self.0.upgrade().ok_or(StoreError::Closed)?;
        ask(writer, |reply| {
            WriteOp::Maintain(Box::new(move |conn| {
                let _ = reply.send(job(conn).map_err(|e| StoreError::Backend(e.to_string())));
            }))
        })
        .await
    }
}

pub struct SqliteStore {
    /// Taken on close: the writer stops once every sender is gone and the
    /// queue is drained.
    writes: Mutex<Option<mpsc::Sender<WriteOp>>>,
    writer: Mutex<Option<thread::JoinHandle<()>>>,
    /// Closed on close, so the live feed ends once the writer is done.
    live: LiveFeed,
    readers: Arc<ReadPool>,
    health: WriteHealth,
    orders: Arc<SqliteOrders>,
    consumers: Arc<SqliteConsumers>,
    retention: Arc<SqliteRetention>,
}

impl SqliteStore {
    pub async fn open(path: &Path, metrics: Option<Arc<Metrics>>) -> Result<Self, StoreError> {
        let path = path.to_owned();
        let (conn, last) = tokio::task::spawn_blocking({
            let path = path.clone();
            move || open_writer(&path)
        })
        .await
        .map_err(|e| StoreError::Backend(e.to_string()))?
        .map_err(|e| StoreError::Backend(format!("opening {}: {e}", path.display())))?;
        info!(path = %path.display(), last_sequence = last, "notification store open");
        let orders = Arc::new(SqliteOrders::open(&path)?);

        let checkpointer = Connection::open(&path)
            .and_then(|c| {
                c.pragma_update(None, "busy_timeout", 5000)?;
                c.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
                Ok(c)
            })
            .map_err(|e| StoreError::Backend(format!("opening {}: {e}", path.display())))?;
        let metrics_for_reads = metrics.clone();
        let (writes, queue) = mpsc::channel(QUEUE);
        let (feed, live) = LiveFeed::new();
        let (stop_checkpoints, checkpoint_stop) = std::sync::mpsc::channel::<()>();
        let checkpoints = thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn({
                let metrics = metrics.clone();
                move || run_checkpointer(checkpointer, checkpoint_stop, metrics)
            })
            .map_err(|e| StoreError::Backend(format!("starting the checkpointer: {e}")))?;
        let health = WriteHealth::new();
        let writer = thread::Builder::new()
            .name("store-writer".into())
            .spawn({
                let health = health.clone();
                move || {
                    run_writer(conn, queue, live, last, metrics, &health);
                    // Closed means closed: the last checkpoint is done too.
                    drop(stop_checkpoints);
                    let _ = checkpoints.join();
                }
            })
            .map_err(|e| StoreError::Backend(format!("starting the writer: {e}")))?;
        let prober = writes.downgrade();
        // It ends with the writer (its queue closed) or with the store.
        health.spawn_prober(std::future::pending(), move || {
            let writer = prober.upgrade();
            async move {
                match ask(writer?, WriteOp::Probe).await {
                    Err(StoreError::Closed) => None,
                    // The writer recorded the outcome.
                    _ => Some(()),
                }
            }
        });
        Ok(Self {
            consumers: Arc::new(SqliteConsumers::open(&path)?),
            retention: Arc::new(SqliteRetention::open(
                &path,
                WriterHandle(writes.downgrade()),
            )?),
            orders,
            health,
            writes: Mutex::new(Some(writes)),
            writer: Mutex::new(Some(writer)),
            live: feed,
            readers: Arc::new(ReadPool {
                path,
                idle: Mutex::new(Vec::new()),
                turns: Arc::new(tokio::sync::Semaphore::new(READERS)),
                running: AtomicI64::new(0),
                peak: AtomicI64::new(0),
                metrics: metrics_for_reads,
            }),
        })
    }

    fn writer(&self) -> Result<mpsc::Sender<WriteOp>, StoreError> {
        lock(&self.writes).clone().ok_or(StoreError::Closed)
    }

    async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, StoreError> {
        // The turn goes with the blocking task, not with this future: a
        // caller cancelled mid-read gives it back only once the read is
        // done, so no more than READERS ever run.
        let turn = Arc::clone(&self.readers.turns)
            .acquire_owned()
            .await
            .expect("never closed");
        let readers = Arc::clone(&self.readers);
        tokio::task::spawn_blocking(move || {
            let result = readers.with(f);
            drop(turn);
            result
        })
        .await
        .map_err(|e| StoreError::Backend(e.to_string()))?
    }
}

#[async_trait::async_trait]
impl NotificationStore for SqliteStore {
    async fn record(&self, notification: IncomingNotification) -> Result<Recorded, StoreError> {
        ask(self.writer()?, |reply| {
            WriteOp::Record(Box::new(notification), reply)
        })
        .await
    }

    async fn record_held(
        &self,
        notification: IncomingNotification,
        hold: HeldWrite,
    ) -> Result<Recorded, StoreError> {
        ask(self.writer()?, |reply| {
            WriteOp::Held(Box::new(notification), reply, hold)
        })
        .await
    }

    async fn list(
        &self,
        after: u64,
        out_trade_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredNotification>, StoreError> {
        let order = out_trade_id.map(str::to_owned);
        self.read(move |conn| {
            let after = to_sql(after);
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            match &order {
                Some(id) => {
                    let mut stmt = conn.prepare_cached(&format!(
                        "SELECT {SELECT_COLUMNS} FROM notifications \
                         WHERE out_trade_id = ?1 AND sequence > ?2 ORDER BY sequence LIMIT ?3"
                    ))?;
                    stmt.query_map(params![id, after, limit], row_to_stored)?
                        .collect()
                }
                None => {
                    let mut stmt = conn.prepare_cached(&format!(
                        "SELECT {SELECT_COLUMNS} FROM notifications \
                         WHERE sequence > ?1 ORDER BY sequence LIMIT ?2"
                    ))?;
                    stmt.query_map(params![after, limit], row_to_stored)?
                        .collect()
                }
            }
        })
        .await
    }

    async fn last_sequence(&self) -> Result<u64, StoreError> {
        self.read(|conn| {
            conn.query_row(
                "SELECT COALESCE(MAX(sequence), 0) FROM notifications",
                [],
                |r| r.get::<_, i64>(0),
            )
        })
        .await
        .map(from_sql)
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<StoredNotification>> {
        self.live.subscribe()
    }

    fn writable(&self) -> watch::Receiver<bool> {
        self.health.subscribe()
    }

    fn orders(&self) -> Arc<dyn OrderStore> {
        Arc::clone(&self.orders) as Arc<dyn OrderStore>
    }

    fn consumers(&self) -> Arc<dyn ConsumerStore> {
        Arc::clone(&self.consumers) as Arc<dyn ConsumerStore>
    }

    fn retention(&self) -> Arc<dyn RetentionStore> {
        Arc::clone(&self.retention) as Arc<dyn RetentionStore>
    }

    async fn close(&self) {
        // The live feed ends when the writer drops its clone too.
        self.live.close();
        lock(&self.writes).take();
        let writer = lock(&self.writer).take();
        if let Some(writer) = writer {
            let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        }
    }
}

fn open_writer(path: &Path) -> rusqlite::Result<(Connection, u64)> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| {
            rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                Some(format!("creating {}: {e}", dir.display())),
            )
        })?;
    }
    let mut conn = Connection::open(path)?;
    conn.pragma_update(None, "busy_timeout", 5000)?;
    incremental_vacuum(&conn, path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // After a burst, the WAL shrinks back to this once checkpointed.
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    // FULL: the WAL is synced at every commit, so an acknowledged
    // notification survives a power cut, not only a process crash.
    conn.pragma_update(None, "synchronous", "FULL")?;
    // Checkpoints run on their own thread (see `run_checkpointer`), not in
    // the middle of a commit that callers are waiting for.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    migrate(&mut conn)?;
    let last: i64 = conn.query_row(
        "SELECT COALESCE(MAX(sequence), 0) FROM notifications",
        [],
        |r| r.get(0),
    )?;
    Ok((conn, from_sql(last)))
}

/// What `check` may learn of an existing SQLite store without changing
/// it: opened read-only, so that neither a migration nor the one-time
/// `VACUUM` of an older file runs under a gateway serving it.
pub struct Inspected {
    /// The schema version the file is at, and the one this build migrates to.
    pub version: usize,
    pub wanted: usize,
    /// The last sequence, when the file's schema has the notifications.
    pub last: Option<u64>,
}

pub fn inspect_read_only(path: &Path) -> rusqlite::Result<Inspected> {
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.pragma_update(None, "busy_timeout", 5000)?;
    let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let last = conn
        .query_row(
            "SELECT COALESCE(MAX(sequence), 0) FROM notifications",
            [],
            |r| r.get::<_, i64>(0),
        )
        .ok()
        .map(from_sql);
    Ok(Inspected {
        version,
        wanted: MIGRATIONS.len(),
        last,
    })
}

/// The WAL's size kept after a checkpoint (bytes).
const WAL_SIZE_LIMIT: i64 = 64 << 20;

/// Makes the file give freed pages back on request (`auto_vacuum =
/// INCREMENTAL`, which retention's compaction uses). A new file takes the
/// mode at once; a file made before it is rewritten once (`VACUUM`), which
/// takes a while for a large store and is logged.
fn incremental_vacuum(conn: &Connection, path: &Path) -> rusqlite::Result<()> {
    const INCREMENTAL: i64 = 2;
    let mode: i64 = conn.pragma_query_value(None, "auto_vacuum", |r| r.get(0))?;
    if mode == INCREMENTAL {
        return Ok(());
    }
    conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    let tables: i64 = conn.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get(0))?;
    if tables > 0 {
        info!(path = %path.display(), "rewriting the store once so that it can give freed space back");
        conn.execute_batch("VACUUM")?;
    }
    Ok(())
}

/// Writes [`PROBE_BYTES`] durably, in a transaction of its own, to the
/// probe's one row.
fn probe(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute(
        "INSERT OR REPLACE INTO store_probe (id, at_ms, room) VALUES (1, ?1, zeroblob(?2))",
        params![Utc::now().timestamp_millis(), PROBE_BYTES],
    )?;
    tx.commit()
}

/// Copies the WAL back into the database now and then, without blocking
/// the writer (PASSIVE), until the writer stops.
fn run_checkpointer(
    conn: Connection,
    stop: std::sync::mpsc::Receiver<()>,
    metrics: Option<Arc<Metrics>>,
) {
    // A full disk fails every checkpoint: say so now and then, not at
    // each one.
    let failures = RateLimited::new(CHECKPOINT_WARN_EVERY);
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            if let Some(m) = &metrics {
                m.store_checkpoint_failures.inc();
            }
            failures.log(|suppressed| tracing::warn!(error = %e, suppressed, "checkpoint failed"));
        }
    }
    // A last full checkpoint leaves a small WAL behind.
    let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(migration)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
        info!(version = i + 1, "store migrated");
    }
    Ok(())
}

enum Reply {
    Record(
        oneshot::Sender<Result<Recorded, StoreError>>,
        Result<Recorded, StoreError>,
    ),
    /// A probe that met a batch: the batch's commit answers it.
    Probe(oneshot::Sender<Result<(), StoreError>>),
    Nothing,
}

impl Reply {
    fn rolled_back(self) -> Self {
        match self {
            Reply::Record(tx, _) => Reply::Record(tx, Err(StoreError::RolledBack)),
            other => other,
        }
    }

    fn send(self, failed: Option<&str>) {
        let err = |e: &str| StoreError::Backend(e.to_owned());
        match self {
            Reply::Record(tx, r) => {
                let _ = tx.send(failed.map_or(r, |e| Err(err(e))));
            }
            Reply::Probe(tx) => {
                let _ = tx.send(failed.map_or(Ok(()), |e| Err(err(e))));
            }
            Reply::Nothing => {}
        }
    }
}

fn run_writer(
    mut conn: Connection,
    mut queue: mpsc::Receiver<WriteOp>,
    live: broadcast::Sender<Arc<StoredNotification>>,
    mut last: u64,
    metrics: Option<Arc<Metrics>>,
    health: &WriteHealth,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    // A held record met while filling a batch goes first into the next.
    let mut next = None;
    while let Some(first) = next.take().or_else(|| queue.blocking_recv()) {
        // A held record is a batch of its own, committed when released.
        let mut release = None;
        match first {
            WriteOp::Held(n, reply, hold) => {
                batch.push(WriteOp::Record(n, reply));
                release = Some(hold);
            }
            WriteOp::Probe(reply) => {
                let probed = probe(&mut conn);
                health.set(probed.is_ok());
                let _ = reply.send(probed.map_err(|e| StoreError::Backend(e.to_string())));
                continue;
            }
            WriteOp::Maintain(job) => {
                job(&mut conn);
                continue;
            }
            op => batch.push(op),
        }
        while release.is_none() && batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(op @ (WriteOp::Held(..) | WriteOp::Maintain(_))) => {
                    next = Some(op);
                    break;
                }
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let size = batch.len();
        let started = std::time::Instant::now();
        match commit_batch(&mut conn, batch.drain(..), last, release) {
            Ok((replies, events, new_last)) => {
                health.set(true);
                last = new_last;
                if let Some(m) = &metrics {
                    m.store_commit_seconds
                        .observe(started.elapsed().as_secs_f64());
                    m.store_batch_size.observe(size as f64);
                }
                debug!(
                    size,
                    new = events.len(),
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "batch committed"
                );
                if let Some(m) = &metrics {
                    m.feed_events("commit", events.len());
                }
                for event in events {
                    let _ = live.send(Arc::new(event));
                }
                for reply in replies {
                    reply.send(None);
                }
            }
            Err((replies, e)) => {
                health.set(false);
                error!(size, error = %e, "batch failed; nothing of it was stored");
                let message = e.to_string();
                for reply in replies {
                    reply.send(Some(&message));
                }
            }
        }
    }
    info!("store writer stopped");
}

type BatchOutcome =
    Result<(Vec<Reply>, Vec<StoredNotification>, u64), (Vec<Reply>, rusqlite::Error)>;

fn commit_batch(
    conn: &mut Connection,
    ops: impl Iterator<Item = WriteOp>,
    last: u64,
    release: Option<HeldWrite>,
) -> BatchOutcome {
    let mut replies = Vec::new();
    let mut events = Vec::new();
    let mut seq = last;
    // IMMEDIATE: take the write lock first, waiting (busy_timeout) for
    // whoever holds it. A deferred transaction that reads and then writes
    // fails at once, without waiting, when another connection writes.
    let tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            // Answer every request of the batch; none was applied.
            return Err((ops.map(unapplied).collect(), e));
        }
    };
    let mut failure = None;
    for op in ops {
        if failure.is_some() {
            replies.push(unapplied(op));
            continue;
        }
        match op {
            WriteOp::Record(n, reply) | WriteOp::Held(n, reply, _) => {
                match record_one(&tx, &n, &mut seq) {
                    Ok((recorded, event)) => {
                        events.extend(event);
                        replies.push(Reply::Record(reply, Ok(recorded)));
                    }
                    Err(e) => {
                        replies.push(Reply::Record(
                            reply,
                            Err(StoreError::Backend(e.to_string())),
                        ));
                        failure = Some(e);
                    }
                }
            }
            WriteOp::Probe(reply) => replies.push(Reply::Probe(reply)),
            // Never batched: `run_writer` runs each on its own.
            WriteOp::Maintain(_) => {}
        }
    }
    if let Some(e) = failure {
        drop(tx); // rolls back
        return Err((replies, e));
    }
    if let Some(hold) = release
        && !hold.blocking_wait()
    {
        drop(tx); // rolls back
        let replies = replies.into_iter().map(Reply::rolled_back).collect();
        return Ok((replies, Vec::new(), last));
    }
    match tx.commit() {
        Ok(()) => Ok((replies, events, seq)),
        Err(e) => Err((replies, e)),
    }
}

fn unapplied(op: WriteOp) -> Reply {
    let err = || StoreError::Backend("not applied".into());
    match op {
        WriteOp::Record(_, reply) | WriteOp::Held(_, reply, _) => Reply::Record(reply, Err(err())),
        WriteOp::Probe(reply) => Reply::Probe(reply),
        // Dropped: its caller hears the store closed.
        WriteOp::Maintain(_) => Reply::Nothing,
    }
}

fn record_one(
    tx: &rusqlite::Transaction<'_>,
    n: &IncomingNotification,
    seq: &mut u64,
) -> rusqlite::Result<(Recorded, Option<StoredNotification>)> {
    let key = n.dedup_key();
    let now_ms = n.received_at.timestamp_millis();
    let existing: Option<(i64, i64)> = tx
        .prepare_cached("SELECT sequence, receive_count FROM notifications WHERE dedup_key = ?1")?
        .query_row([&key], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if existing.is_none() {
        let swept: Option<i64> = tx
            .prepare_cached("SELECT sequence FROM swept_notifications WHERE dedup_digest = ?1")?
            .query_row([super::dedup_digest(&key)], |r| r.get(0))
            .optional()?;
        if let Some(sequence) = swept {
            return Ok((
                Recorded::RepeatOfSwept {
                    sequence: from_sql(sequence),
                },
                None,
            ));
        }
    }
    if let Some((sequence, count)) = existing {
        tx.prepare_cached(
            "UPDATE notifications SET receive_count = receive_count + 1, last_received_at_ms = ?1 WHERE sequence = ?2",
        )?
        .execute(params![now_ms, sequence])?;
        let receive_count = u32::try_from(count + 1).unwrap_or(u32::MAX);
        return Ok((
            Recorded::Repeat {
                sequence: from_sql(sequence),
                receive_count,
            },
            None,
        ));
    }
    let sequence = *seq + 1;
    // The order, and the payment that paid it (written earlier in this
    // transaction too, when it came in the same batch).
    let ordered = tx
        .prepare_cached(
            "SELECT o.amount_fen, o.state = 'PAID', n.trade_bill_no FROM orders AS o \
             LEFT JOIN notifications AS n ON n.sequence = o.paid_sequence \
             WHERE o.out_trade_id = ?1",
        )?
        .query_row([&n.out_trade_id], |r| {
            Ok(orders::Ordered {
                amount_fen: r.get(0)?,
                paid: r.get(1)?,
                paid_bill_no: r.get(2)?,
            })
        })
        .optional()?;
    // Without an order, its tombstone: a payment of a swept PAID order.
    let swept_paid = ordered.is_none()
        && n.paid()
        && tx
            .prepare_cached("SELECT paid FROM swept_orders WHERE out_trade_id = ?1")?
            .query_row([&n.out_trade_id], |r| r.get::<_, bool>(0))
            .optional()?
            .unwrap_or(false);
    let order_check = orders::check(ordered.as_ref(), swept_paid, n);
    if n.paid() && order_check == OrderCheck::Matched {
        tx.prepare_cached(
            "UPDATE orders SET state = 'PAID', paid_sequence = ?2, updated_at_ms = ?3 \
             WHERE out_trade_id = ?1 AND state <> 'PAID'",
        )?
        .execute(params![n.out_trade_id, to_sql(sequence), now_ms])?;
    }
    tx.prepare_cached(
        "INSERT INTO notifications (sequence, dedup_key, out_trade_id, trade_order_id, trade_bill_no, \
         trade_status, message, trade_amount, amount_fen, trade_time, time_stamp, raw_body, \
         received_at_ms, last_received_at_ms, receive_count, order_check) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?13, 1, ?14)",
    )?
    .execute(params![
        to_sql(sequence),
        key,
        n.out_trade_id,
        n.trade_order_id,
        n.trade_bill_no,
        n.trade_status,
        n.message,
        n.trade_amount,
        n.amount_fen,
        n.trade_time,
        n.time_stamp,
        n.raw_body,
        now_ms,
        order_check.as_str(),
    ])?;
    *seq = sequence;
    let mut stored = n.stored(sequence, 1, Some(order_check));
    stored.received_at = from_ms(now_ms);
    Ok((
        Recorded::New {
            sequence,
            order_check,
        },
        Some(stored),
    ))
}

pub(crate) fn row_to_stored(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredNotification> {
    Ok(StoredNotification {
        sequence: from_sql(r.get(0)?),
        out_trade_id: r.get(1)?,
        trade_order_id: r.get(2)?,
        trade_bill_no: r.get(3)?,
        trade_status: r.get(4)?,
        message: r.get(5)?,
        trade_amount: r.get(6)?,
        amount_fen: r.get(7)?,
        trade_time: r.get(8)?,
        received_at: from_ms(r.get(9)?),
        receive_count: u32::try_from(r.get::<_, i64>(10)?).unwrap_or(u32::MAX),
        order_check: r
            .get::<_, Option<String>>(11)?
            .as_deref()
            .and_then(OrderCheck::parse),
    })
}

fn from_ms(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

struct ReadPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    /// [`READERS`] turns; each is held by the blocking task of its read.
    turns: Arc<tokio::sync::Semaphore>,
    /// Reads running now, and the most at once (for the metrics).
    running: AtomicI64,
    peak: AtomicI64,
    metrics: Option<Arc<Metrics>>,
}

impl ReadPool {
    fn with<R>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<R>) -> Result<R, StoreError> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        let peak = self.peak.fetch_max(now, Ordering::SeqCst).max(now);
        if let Some(m) = &self.metrics {
            m.store_reads_running.set(now);
            m.store_reads_running_peak.set(peak);
        }
        let result = self.read(f);
        let now = self.running.fetch_sub(1, Ordering::SeqCst) - 1;
        if let Some(m) = &self.metrics {
            m.store_reads_running.set(now);
        }
        result
    }

    fn read<R>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<R>) -> Result<R, StoreError> {
        let conn = lock(&self.idle).pop();
        let conn = match conn {
            Some(c) => c,
            None => {
                let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
                let c = Connection::open_with_flags(&self.path, flags).map_err(backend)?;
                c.pragma_update(None, "busy_timeout", 5000)
                    .map_err(backend)?;
                c
            }
        };
        let result = f(&conn).map_err(backend);
        let mut idle = lock(&self.idle);
        if idle.len() < READERS {
            idle.push(conn);
        }
        result
    }
}

fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// A connection of its own to the store's file, for a concept that keeps
/// its rows there (the order ledger, the consumers), used from blocking
/// tasks one call at a time. Durable like the writer's (`synchronous=FULL`),
/// and waiting for the write lock rather than failing.
pub struct SideConnection {
    conn: Arc<Mutex<Connection>>,
    /// Callers wait their turn here, not each on a blocking thread of its
    /// own parked on the mutex. The blocking task holds the turn, so a
    /// cancelled caller frees it only once its query is done.
    turn: Arc<tokio::sync::Semaphore>,
}

impl SideConnection {
    /// Opens the store at `path` (already migrated).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)
            .and_then(|c| {
                c.pragma_update(None, "busy_timeout", 5000)?;
                c.pragma_update(None, "synchronous", "FULL")?;
                Ok(c)
            })
            .map_err(|e| StoreError::Backend(format!("opening {}: {e}", path.display())))?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            turn: Arc::new(tokio::sync::Semaphore::new(1)),
        })
    }

    /// Runs `f` on the connection here (at start-up, before any task uses
    /// it).
    pub fn blocking<R>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<R>,
    ) -> Result<R, StoreError> {
        f(&mut lock(&self.conn)).map_err(|e| StoreError::Backend(e.to_string()))
    }

    /// Runs `f` on the connection in a blocking task.
    pub async fn with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, StoreError> {
        let turn = Arc::clone(&self.turn)
            .acquire_owned()
            .await
            .expect("never closed");
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let result = f(&mut lock(&conn));
            drop(turn);
            result
        })
        .await
        .map_err(|e| StoreError::Backend(e.to_string()))?
        .map_err(|e| StoreError::Backend(e.to_string()))
    }
}
