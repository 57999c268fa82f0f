//! The PostgreSQL backend: several gateway replicas share one database, so
//! a notification POSTed to one replica reaches subscribers of every other,
//! in one order that all of them see.
//!
//! **Sequencing.** The one row of `notification_sequence` is the fleet's
//! sequencer. Every writing transaction locks it (`SELECT ... FOR UPDATE`)
//! before it reads or writes notifications, takes the next numbers from it,
//! and holds the lock until it commits or rolls back. So sequences become
//! visible in order and without gaps: a reader that resumes from
//! "sequence > last seen" cannot skip a transaction that commits late (the
//! hazard of a `bigserial`, taken at insert time), and a rolled-back writer
//! gives its numbers back instead of leaving a hole. The price is that
//! writers take turns; each replica group-commits (one transaction for
//! every notification queued while the previous one ran), so a turn costs
//! one round of statements and one fsync however many it carries.
//!
//! **Deduplication** happens under the same lock: a resend, to whichever
//! replica, finds the stored row (by the SHA-256 of its business fields)
//! and only raises its receive count.
//!
//! **Live feed.** A tailer task per replica publishes new rows in sequence
//! order. Commits of its own replica are handed to it directly (and their
//! NOTIFY, which names the replica, is ignored); rows other replicas commit
//! are read from the table when their `LISTEN/NOTIFY` hint arrives, and
//! every [`POLL_EVERY`] regardless, because a hint sent while the listening
//! connection was down is never replayed.
//!
//! **Durability.** A commit returns once PostgreSQL has flushed it
//! (`synchronous_commit` at least `on`; a server configured `off` is
//! overridden for our sessions).

use std::{
    collections::{HashMap, hash_map::Entry},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::{DateTime, SubsecRound, Utc};
use sqlx::{
    ConnectOptions, Connection, PgPool, Row,
    postgres::{PgConnectOptions, PgListener, PgPoolOptions, PgRow},
};
use tokio::{
    sync::{Notify, broadcast, mpsc, oneshot, watch},
    task::JoinHandle,
};
use tracing::{debug, error, info, warn};

use crate::{
    consumers::{ConsumerStore, PostgresConsumers},
    metrics::Metrics,
    orders::{self, OrderCheck, OrderStore, PostgresOrders},
    retention::{PostgresRetention, RetentionStore},
};

use super::{
    HeldWrite, IncomingNotification, LiveFeed, NotificationStore, Recorded, StoreError,
    StoredNotification, WriteHealth, ask, from_sql, lock, to_sql,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Most notifications written in one transaction.
const MAX_BATCH: usize = 512;
/// Requests queued for the writer before callers wait.
const QUEUE: usize = 4096;
/// Connections for reads and acknowledgements. The writer has its own
/// (so readers never keep intake waiting), and so has the listener.
const POOL_SIZE: u32 = 16;
/// The writer's connections: its batches, and held writes in tests.
const WRITE_POOL_SIZE: u32 = 2;
/// How long a caller waits for a free connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the server lets a session of ours sit idle inside a
/// transaction before it ends it (and so releases the sequencer).
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "10s";
/// The `LISTEN/NOTIFY` channel commits are announced on.
const CHANNEL: &str = "kongtie_notifications";
/// How often the tailer reads new rows without a hint.
const POLL_EVERY: Duration = Duration::from_millis(500);
/// Rows the tailer reads at a time.
const PAGE: usize = 512;

/// How other rooms of the crate read notification rows in this backend.
pub(crate) mod rows {
    pub(crate) use super::{SELECT_COLUMNS as COLUMNS, row_to_stored as to_stored};
}

pub(crate) const SELECT_COLUMNS: &str = "sequence, out_trade_id, trade_order_id, trade_bill_no, trade_status, \
     message, trade_amount, amount_fen, trade_time, received_at, receive_count, order_check";

struct Write {
    notification: IncomingNotification,
    reply: oneshot::Sender<Result<Recorded, StoreError>>,
}

/// What one committed transaction did: an answer per notification, in
/// order, and the new events.
struct Written {
    recorded: Vec<Recorded>,
    events: Vec<StoredNotification>,
}

pub struct PostgresStore {
    health: WriteHealth,
    orders: Arc<PostgresOrders>,
    consumers: Arc<PostgresConsumers>,
    retention: Arc<PostgresRetention>,
    pool: PgPool,
    write_pool: PgPool,
    /// Random, per process: the NOTIFY payloads of our own commits.
    replica: Arc<str>,
    /// Taken on close: the writer stops once the queue is drained.
    writes: Mutex<Option<mpsc::Sender<Write>>>,
    /// Commits handed to the tailer; taken on close.
    committed: Mutex<Option<mpsc::UnboundedSender<Vec<StoredNotification>>>>,
    /// Closed on close, so the live feed ends once the tailer stops.
    live: LiveFeed,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl PostgresStore {
    /// Connects, applies the migrations (under PostgreSQL's advisory lock,
    /// so replicas starting together take turns) and starts the writer, the
    /// tailer and the listener.
    pub async fn open(url: &str, metrics: Option<Arc<Metrics>>) -> Result<Self, StoreError> {
        let mut options: PgConnectOptions = url
            .parse()
            .map_err(|e| StoreError::Backend(format!("the PostgreSQL URL is not valid: {e}")))?;
        options = options.application_name("kongtie-gateway");
        // A replica stalled inside a transaction holds the sequencer, and
        // every writer of the fleet waits: let the server cut it off.
        //
        // Plan every execution with its own parameters: the tables start
        // empty, and a generic plan cached then (after five executions of a
        // prepared statement) keeps scanning whole tables once they have
        // grown: measured, commits went from 2.7 ms to over 7 ms in 15 s.
        let given = options.get_options().unwrap_or_default().to_owned();
        for (setting, value) in [
            (
                "idle_in_transaction_session_timeout",
                IDLE_IN_TRANSACTION_TIMEOUT,
            ),
            ("plan_cache_mode", "force_custom_plan"),
        ] {
            if !given.contains(setting) {
                options = options.options([(setting, value)]);
            }
        }
        let place = format!(
            "{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or(options.get_username())
        );
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            StoreError::Backend(format!("{what} PostgreSQL at {place}: {e}"))
        };

        let mut conn = options
            .connect()
            .await
            .map_err(|e| failed("connecting to", &e))?;
        MIGRATOR
            .run(&mut conn)
            .await
            .map_err(|e| failed("migrating", &e))?;
        let synchronous: String =
            sqlx::query_scalar("SELECT current_setting('synchronous_commit')")
                .fetch_one(&mut conn)
                .await
                .map_err(|e| failed("reading settings of", &e))?;
        if synchronous == "off" {
            warn!(
                "synchronous_commit is off on the server; the gateway turns it on for its sessions"
            );
            options = options.options([("synchronous_commit", "on")]);
        }
        let last: i64 = sqlx::query_scalar("SELECT last FROM notification_sequence")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| failed("reading", &e))?;
        let _ = conn.close().await;

        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_lazy_with(options.clone());
        let write_pool = PgPoolOptions::new()
            .max_connections(WRITE_POOL_SIZE)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            // No ping before each batch (a round trip per commit): a dead
            // connection fails its batch, each notification of it is
            // answered 503, and Kongtie sends them again.
            .test_before_acquire(false)
            .connect_lazy_with(options.clone());
        let listen_pool = PgPoolOptions::new()
            .max_connections(1)
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_lazy_with(options);
        info!(database = %place, last_sequence = last, "notification store open (PostgreSQL)");

        let (writes, queue) = mpsc::channel(QUEUE);
        let (committed, commits) = mpsc::unbounded_channel();
        let (feed, live) = LiveFeed::new();
        let (stop, stopped) = watch::channel(false);
        let wake = Arc::new(Wake::default());
        // Names this replica in its NOTIFY payloads.
        let replica: Arc<str> = format!("{:016x}", rand::random::<u64>()).into();
        let health = WriteHealth::new();
        let prober = {
            let (pool, health) = (write_pool.clone(), health.clone());
            let mut closing = stop.subscribe();
            let closed = async move {
                let _ = closing.wait_for(|s| *s).await;
            };
            health.clone().spawn_prober(closed, move || {
                let (pool, health) = (pool.clone(), health.clone());
                async move {
                    // A write that changes nothing, under the sequencer's
                    // lock for a moment.
                    let probed = sqlx::query("UPDATE notification_sequence SET last = last")
                        .execute(&pool)
                        .await;
                    health.set(probed.is_ok());
                    Some(())
                }
            })
        };
        let tasks = vec![
            prober,
            tokio::spawn(run_writer(
                write_pool.clone(),
                Arc::clone(&replica),
                queue,
                committed.clone(),
                metrics.clone(),
                health.clone(),
            )),
            tokio::spawn(run_tailer(
                Tailer {
                    pool: pool.clone(),
                    live,
                    metrics,
                },
                from_sql(last),
                commits,
                Arc::clone(&wake),
            )),
            tokio::spawn(run_listener(
                listen_pool,
                Arc::clone(&replica),
                wake,
                stopped,
            )),
        ];
        Ok(Self {
            consumers: Arc::new(PostgresConsumers::new(pool.clone())),
            orders: Arc::new(PostgresOrders::new(pool.clone())),
            retention: Arc::new(PostgresRetention::new(pool.clone())),
            health,
            pool,
            write_pool,
            replica,
            writes: Mutex::new(Some(writes)),
            committed: Mutex::new(Some(committed)),
            live: feed,
            stop,
            tasks: Mutex::new(tasks),
        })
    }

    fn writer(&self) -> Result<mpsc::Sender<Write>, StoreError> {
        lock(&self.writes).clone().ok_or(StoreError::Closed)
    }
}

#[async_trait::async_trait]
impl NotificationStore for PostgresStore {
    async fn record(&self, notification: IncomingNotification) -> Result<Recorded, StoreError> {
        ask(self.writer()?, |reply| Write {
            notification,
            reply,
        })
        .await
    }

    async fn record_held(
        &self,
        notification: IncomingNotification,
        hold: HeldWrite,
    ) -> Result<Recorded, StoreError> {
        let committed = lock(&self.committed).clone().ok_or(StoreError::Closed)?;
        let write = One {
            pool: &self.write_pool,
            replica: &self.replica,
            committed: &committed,
        };
        write.record(&notification, Some(hold)).await
    }

    async fn list(
        &self,
        after: u64,
        out_trade_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredNotification>, StoreError> {
        list(&self.pool, after, out_trade_id, limit)
            .await
            .map_err(backend)
    }

    async fn last_sequence(&self) -> Result<u64, StoreError> {
        sqlx::query_scalar::<_, i64>("SELECT last FROM notification_sequence")
            .fetch_one(&self.pool)
            .await
            .map(from_sql)
            .map_err(backend)
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
        // The writer drains its queue and stops; the tailer stops once no
        // one can hand it commits, which ends the live feed.
        self.live.close();
        lock(&self.writes).take();
        lock(&self.committed).take();
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut *lock(&self.tasks));
        for task in tasks {
            let _ = task.await;
        }
        self.write_pool.close().await;
        self.pool.close().await;
    }
}

async fn run_writer(
    pool: PgPool,
    replica: Arc<str>,
    mut queue: mpsc::Receiver<Write>,
    committed: mpsc::UnboundedSender<Vec<StoredNotification>>,
    metrics: Option<Arc<Metrics>>,
    health: WriteHealth,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let size = batch.len();
        let started = Instant::now();
        let outcome = {
            let notifications: Vec<_> = batch.iter().map(|w| &w.notification).collect();
            write(&pool, &replica, &notifications, None).await
        };
        match outcome {
            Ok(Some(written)) => {
                health.set(true);
                if let Some(m) = &metrics {
                    m.store_commit_seconds
                        .observe(started.elapsed().as_secs_f64());
                    m.store_batch_size.observe(size as f64);
                }
                debug!(
                    size,
                    new = written.events.len(),
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "batch committed"
                );
                let _ = committed.send(written.events);
                for (w, recorded) in batch.drain(..).zip(written.recorded) {
                    let _ = w.reply.send(Ok(recorded));
                }
            }
            // Only `record_held` asks for a rollback, but answer anyway.
            Ok(None) => fail_all(&mut batch, || StoreError::RolledBack),
            // One notification the database refuses must not take the
            // others of its batch down with it: write them one by one.
            Err(e) if size > 1 && is_data_error(&e) => {
                warn!(size, error = %e, "batch refused; writing its notifications one by one");
                let one = One {
                    pool: &pool,
                    replica: &replica,
                    committed: &committed,
                };
                for w in batch.drain(..) {
                    let answer = one.record(&w.notification, None).await;
                    if answer.is_ok() {
                        health.set(true);
                    }
                    if let Err(e) = &answer {
                        error!(error = %e, "notification not stored");
                    }
                    let _ = w.reply.send(answer);
                }
            }
            Err(e) => {
                health.set(false);
                error!(size, error = %e, "batch failed; nothing of it was stored");
                let message = e.to_string();
                fail_all(&mut batch, || StoreError::Backend(message.clone()));
            }
        }
    }
    info!("store writer stopped");
}

/// Writes notifications one per transaction, handing each commit's event
/// to the tailer.
struct One<'a> {
    pool: &'a PgPool,
    replica: &'a str,
    committed: &'a mpsc::UnboundedSender<Vec<StoredNotification>>,
}

impl One<'_> {
    async fn record(
        &self,
        notification: &IncomingNotification,
        hold: Option<HeldWrite>,
    ) -> Result<Recorded, StoreError> {
        match write(self.pool, self.replica, &[notification], hold).await {
            Ok(Some(written)) => {
                let _ = self.committed.send(written.events);
                written
                    .recorded
                    .into_iter()
                    .next()
                    .ok_or_else(|| StoreError::Backend("the write answered nothing".into()))
            }
            Ok(None) => Err(StoreError::RolledBack),
            Err(e) => Err(backend(e)),
        }
    }
}

fn fail_all(batch: &mut Vec<Write>, error: impl Fn() -> StoreError) {
    for w in batch.drain(..) {
        let _ = w.reply.send(Err(error()));
    }
}

/// A data or integrity error (SQLSTATE class 22 or 23): the input, not the
/// connection, is at fault.
fn is_data_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("22") || code.starts_with("23")),
        _ => false,
    }
}

/// Per dedup digest: the event it is, and what this transaction adds.
struct Seen {
    sequence: i64,
    receive_count: i32,
    /// Stored before this transaction (else inserted by it).
    stored: bool,
    /// Receipts this transaction adds to a stored row.
    added: i32,
    last_received_at: DateTime<Utc>,
    /// Only its tombstone is left: retention deleted it.
    swept: bool,
}

/// Writes `batch` in one transaction under the sequencer lock. With `hold`,
/// waits for its word before committing, and rolls back (`Ok(None)`) if
/// told to.
async fn write(
    pool: &PgPool,
    replica: &str,
    batch: &[&IncomingNotification],
    hold: Option<HeldWrite>,
) -> Result<Option<Written>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let last: i64 = sqlx::query_scalar("SELECT last FROM notification_sequence FOR UPDATE")
        .fetch_one(&mut *tx)
        .await?;

    let digests: Vec<Vec<u8>> = batch.iter().map(|n| n.dedup_digest()).collect();
    // Stored events and tombstones of swept ones, in one statement: one
    // snapshot, in which a sweep's delete and its tombstone are both seen
    // or neither.
    let rows = sqlx::query(
        "SELECT dedup_digest, sequence, receive_count, last_received_at, false \
         FROM notifications WHERE dedup_digest = ANY($1) \
         UNION ALL \
         SELECT dedup_digest, sequence, 1, now(), true \
         FROM swept_notifications WHERE dedup_digest = ANY($1)",
    )
    .bind(&digests)
    .fetch_all(&mut *tx)
    .await?;
    let mut seen: HashMap<Vec<u8>, Seen> = HashMap::with_capacity(batch.len());
    for row in rows {
        let found = Seen {
            sequence: row.try_get(1)?,
            receive_count: row.try_get(2)?,
            stored: true,
            added: 0,
            last_received_at: row.try_get(3)?,
            swept: row.try_get(4)?,
        };
        match seen.entry(row.try_get::<Vec<u8>, _>(0)?) {
            // A stored row wins over a tombstone.
            Entry::Occupied(mut e) if e.get().swept => {
                e.insert(found);
            }
            Entry::Occupied(_) => {}
            Entry::Vacant(e) => {
                e.insert(found);
            }
        }
    }

    // The orders the batch names, and the payments that paid them, to
    // check each new notification against.
    let ids: Vec<&str> = batch.iter().map(|n| n.out_trade_id.as_str()).collect();
    let mut ordered: HashMap<String, orders::Ordered> = sqlx::query_as(
        "SELECT o.out_trade_id, o.amount_fen, o.state = 'PAID', n.trade_bill_no \
         FROM orders AS o LEFT JOIN notifications AS n ON n.sequence = o.paid_sequence \
         WHERE o.out_trade_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(
        |(id, amount_fen, paid, paid_bill_no): (String, i64, bool, Option<String>)| {
            (
                id,
                orders::Ordered {
                    amount_fen,
                    paid,
                    paid_bill_no,
                },
            )
        },
    )
    .collect();
    // The tombstones of swept PAID orders among the rest. Read after the
    // orders: a sweep that commits between the two reads is seen by this
    // one, as its delete and its tombstone commit together.
    let missing: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| !ordered.contains_key(*id))
        .collect();
    let swept_paid: std::collections::HashSet<String> = if missing.is_empty() {
        Default::default()
    } else {
        sqlx::query_scalar(
            "SELECT out_trade_id FROM swept_orders WHERE paid AND out_trade_id = ANY($1)",
        )
        .bind(&missing)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect()
    };

    let mut next = last;
    let mut recorded = Vec::with_capacity(batch.len());
    let mut inserted = Vec::new();
    for (n, digest) in batch.iter().zip(&digests) {
        match seen.entry(digest.clone()) {
            Entry::Occupied(e) if e.get().swept => {
                recorded.push(Recorded::RepeatOfSwept {
                    sequence: from_sql(e.get().sequence),
                });
            }
            Entry::Occupied(mut e) => {
                let s = e.get_mut();
                s.receive_count = s.receive_count.saturating_add(1);
                s.added += i32::from(s.stored);
                s.last_received_at = s.last_received_at.max(n.received_at);
                recorded.push(Recorded::Repeat {
                    sequence: from_sql(s.sequence),
                    receive_count: u32::try_from(s.receive_count).unwrap_or(u32::MAX),
                });
            }
            Entry::Vacant(e) => {
                next += 1;
                e.insert(Seen {
                    sequence: next,
                    receive_count: 1,
                    stored: false,
                    added: 0,
                    last_received_at: n.received_at,
                    swept: false,
                });
                let order = ordered.get_mut(&n.out_trade_id);
                let order_check =
                    orders::check(order.as_deref(), swept_paid.contains(&n.out_trade_id), n);
                // The first matching payment pays the order (below): a
                // later one in this batch finds it paid, as in a later one.
                if let Some(order) = order
                    && n.paid()
                    && order_check == OrderCheck::Matched
                    && !order.paid
                {
                    order.paid = true;
                    order.paid_bill_no = Some(n.trade_bill_no.clone());
                }
                inserted.push((*n, digest, order_check));
                recorded.push(Recorded::New {
                    sequence: from_sql(next),
                    order_check,
                });
            }
        }
    }

    // Every change in one statement (one round trip): the repeats' counts,
    // the new rows, the sequencer, and the hint to other replicas, which
    // PostgreSQL delivers at commit.
    let repeats: Vec<(&Vec<u8>, &Seen)> = seen.iter().filter(|(_, s)| s.added > 0).collect();
    let new: Vec<(&IncomingNotification, &Seen, &Vec<u8>)> = inserted
        .iter()
        .map(|(n, d, _)| (*n, &seen[*d], *d))
        .collect();
    // Orders paid by a matching notification: the first such one of each.
    let mut paid: Vec<(&str, i64)> = Vec::new();
    for ((n, _, check), (_, s, _)) in inserted.iter().zip(&new) {
        if n.paid()
            && *check == OrderCheck::Matched
            && !paid.iter().any(|(id, _)| *id == n.out_trade_id)
        {
            paid.push((&n.out_trade_id, s.sequence));
        }
    }
    let text = |f: fn(&IncomingNotification) -> &str| -> Vec<&str> {
        new.iter().map(|(n, _, _)| f(n)).collect()
    };
    sqlx::query(
        "WITH repeated AS ( \
           UPDATE notifications AS n \
           SET receive_count = n.receive_count + r.added, last_received_at = r.at \
           FROM UNNEST($1::bytea[], $2::int4[], $3::timestamptz[]) AS r(digest, added, at) \
           WHERE n.dedup_digest = r.digest \
         ), inserted AS ( \
           INSERT INTO notifications (sequence, dedup_digest, out_trade_id, trade_order_id, \
             trade_bill_no, trade_status, message, trade_amount, amount_fen, trade_time, \
             time_stamp, raw_body, received_at, last_received_at, receive_count, order_check) \
           SELECT * FROM UNNEST($4::int8[], $5::bytea[], $6::text[], $7::text[], $8::text[], \
             $9::text[], $10::text[], $11::text[], $12::int8[], $13::text[], $14::text[], \
             $15::text[], $16::timestamptz[], $17::timestamptz[], $18::int4[], $23::text[]) \
         ), paid AS ( \
           UPDATE orders AS o SET state = 'PAID', paid_sequence = p.sequence, updated_at = now() \
           FROM UNNEST($24::text[], $25::int8[]) AS p(out_trade_id, sequence) \
           WHERE o.out_trade_id = p.out_trade_id AND o.state <> 'PAID' \
         ), sequenced AS ( \
           UPDATE notification_sequence SET last = $19 WHERE last < $19 \
         ) \
         SELECT pg_notify($21, $22) WHERE $19 > $20",
    )
    .bind(
        repeats
            .iter()
            .map(|(d, _)| d.as_slice())
            .collect::<Vec<_>>(),
    )
    .bind(repeats.iter().map(|(_, s)| s.added).collect::<Vec<_>>())
    .bind(
        repeats
            .iter()
            .map(|(_, s)| s.last_received_at)
            .collect::<Vec<_>>(),
    )
    .bind(new.iter().map(|(_, s, _)| s.sequence).collect::<Vec<_>>())
    .bind(new.iter().map(|(_, _, d)| d.as_slice()).collect::<Vec<_>>())
    .bind(text(|n| &n.out_trade_id))
    .bind(text(|n| &n.trade_order_id))
    .bind(text(|n| &n.trade_bill_no))
    .bind(text(|n| &n.trade_status))
    .bind(text(|n| &n.message))
    .bind(text(|n| &n.trade_amount))
    .bind(new.iter().map(|(n, _, _)| n.amount_fen).collect::<Vec<_>>())
    .bind(text(|n| &n.trade_time))
    .bind(text(|n| &n.time_stamp))
    .bind(text(|n| &n.raw_body))
    .bind(
        new.iter()
            .map(|(n, _, _)| n.received_at)
            .collect::<Vec<_>>(),
    )
    .bind(
        new.iter()
            .map(|(_, s, _)| s.last_received_at)
            .collect::<Vec<_>>(),
    )
    .bind(
        new.iter()
            .map(|(_, s, _)| s.receive_count)
            .collect::<Vec<_>>(),
    )
    .bind(next)
    .bind(last)
    .bind(CHANNEL)
    // Who committed, and up to which sequence: a replica skips its own.
    .bind(format!("{replica} {next}"))
    .bind(
        inserted
            .iter()
            .map(|(_, _, check)| check.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(paid.iter().map(|(id, _)| *id).collect::<Vec<_>>())
    .bind(paid.iter().map(|(_, seq)| *seq).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;

    let events: Vec<StoredNotification> = new
        .iter()
        .zip(&inserted)
        .map(|((n, s, _), (_, _, check))| {
            let count = u32::try_from(s.receive_count).unwrap_or(u32::MAX);
            let mut event = n.stored(from_sql(s.sequence), count, Some(*check));
            // What the column keeps, so the live event equals the row.
            event.received_at = event.received_at.trunc_subsecs(6);
            event
        })
        .collect();

    if let Some(hold) = hold
        && !hold.wait().await
    {
        tx.rollback().await?;
        return Ok(None);
    }
    tx.commit().await?;
    Ok(Some(Written { recorded, events }))
}

async fn list(
    pool: &PgPool,
    after: u64,
    out_trade_id: Option<&str>,
    limit: usize,
) -> Result<Vec<StoredNotification>, sqlx::Error> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = match out_trade_id {
        Some(id) => {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {SELECT_COLUMNS} FROM notifications \
                 WHERE out_trade_id = $1 AND sequence > $2 ORDER BY sequence LIMIT $3"
            )))
            .bind(id)
            .bind(to_sql(after))
            .bind(limit)
            .fetch_all(pool)
            .await?
        }
        None => {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {SELECT_COLUMNS} FROM notifications \
                 WHERE sequence > $1 ORDER BY sequence LIMIT $2"
            )))
            .bind(to_sql(after))
            .bind(limit)
            .fetch_all(pool)
            .await?
        }
    };
    rows.iter().map(row_to_stored).collect()
}

pub(crate) fn row_to_stored(r: &PgRow) -> Result<StoredNotification, sqlx::Error> {
    Ok(StoredNotification {
        sequence: from_sql(r.try_get(0)?),
        out_trade_id: r.try_get(1)?,
        trade_order_id: r.try_get(2)?,
        trade_bill_no: r.try_get(3)?,
        trade_status: r.try_get(4)?,
        message: r.try_get(5)?,
        trade_amount: r.try_get(6)?,
        amount_fen: r.try_get(7)?,
        trade_time: r.try_get(8)?,
        received_at: r.try_get(9)?,
        receive_count: u32::try_from(r.try_get::<i32, _>(10)?).unwrap_or(u32::MAX),
        order_check: r
            .try_get::<Option<String>, _>(11)?
            .as_deref()
            .and_then(OrderCheck::parse),
    })
}

/// Why the tailer should read: the listener's two signals.
#[derive(Default)]
struct Wake {
    /// Another replica committed (a NOTIFY arrived).
    hint: Notify,
    /// LISTEN is (re)established: hints sent before are gone.
    listening: Notify,
}

struct Tailer {
    pool: PgPool,
    live: broadcast::Sender<Arc<StoredNotification>>,
    metrics: Option<Arc<Metrics>>,
}

impl Tailer {
    fn publish(&self, events: Vec<StoredNotification>, source: &'static str, cursor: &mut u64) {
        if let Some(m) = &self.metrics {
            m.feed_events(source, events.len());
        }
        for event in events {
            *cursor = event.sequence;
            let _ = self.live.send(Arc::new(event));
        }
    }

    /// Publishes every row after `cursor`, in order.
    async fn read(&self, trigger: &'static str, cursor: &mut u64) -> Result<(), sqlx::Error> {
        if let Some(m) = &self.metrics {
            m.feed_read(trigger);
        }
        loop {
            let page = list(&self.pool, *cursor, None, PAGE).await?;
            let full = page.len() == PAGE;
            self.publish(page, "read", cursor);
            if !full {
                return Ok(());
            }
        }
    }
}

/// Publishes new events in sequence order: this replica's commits as they
/// are handed over when they follow on, anything else read from the table
/// on a hint, a poll, or once LISTEN is (re)established. Stops when no one
/// can hand it commits any more.
async fn run_tailer(
    tailer: Tailer,
    mut cursor: u64,
    mut commits: mpsc::UnboundedReceiver<Vec<StoredNotification>>,
    wake: Arc<Wake>,
) {
    let mut poll = tokio::time::interval(POLL_EVERY);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        let trigger = tokio::select! {
            biased;
            commit = commits.recv() => match commit {
                None => break,
                Some(events) => match (events.first(), events.last()) {
                    (Some(first), Some(_)) if first.sequence == cursor + 1 => {
                        tailer.publish(events, "commit", &mut cursor);
                        None
                    }
                    (_, Some(last)) if last.sequence > cursor => Some("gap"),
                    _ => None,
                },
            },
            () = wake.hint.notified() => Some("notify"),
            () = wake.listening.notified() => Some("listen"),
            _ = poll.tick() => Some("poll"),
        };
        let Some(trigger) = trigger else {
            continue;
        };
        match tailer.read(trigger, &mut cursor).await {
            Ok(()) if failing => {
                info!("reading new notifications works again");
                failing = false;
            }
            Ok(()) => {}
            Err(e) if !failing => {
                warn!(error = %e, "reading new notifications failed; trying again");
                failing = true;
            }
            Err(_) => {}
        }
    }
    debug!("store tailer stopped");
}

/// Listens for commits of other replicas and wakes the tailer; reconnects
/// after a failure (and wakes the tailer then too: hints sent meanwhile are
/// lost).
async fn run_listener(
    pool: PgPool,
    replica: Arc<str>,
    wake: Arc<Wake>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            e = listen(&pool, &replica, &wake) => {
                warn!(error = %e, "listening for other replicas' commits failed; polling until it works again");
            }
            _ = stop.wait_for(|stop| *stop) => break,
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait_for(|stop| *stop) => break,
        }
    }
    pool.close().await;
}

/// Wakes the tailer on every other replica's hint until the listening
/// connection fails.
async fn listen(pool: &PgPool, replica: &str, wake: &Wake) -> sqlx::Error {
    let mut listener = match PgListener::connect_with(pool).await {
        Ok(listener) => listener,
        Err(e) => return e,
    };
    if let Err(e) = listener.listen(CHANNEL).await {
        return e;
    }
    wake.listening.notify_one();
    loop {
        match listener.try_recv().await {
            // Our own commits are handed to the tailer directly.
            Ok(Some(hint)) if hint.payload().split(' ').next() == Some(replica) => {}
            Ok(Some(_)) => wake.hint.notify_one(),
            // The connection was lost and is made again; hints sent
            // meanwhile are gone, so the tailer reads anyway.
            Ok(None) => wake.listening.notify_one(),
            Err(e) => return e,
        }
    }
}

fn backend(e: sqlx::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}
