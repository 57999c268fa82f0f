//! Durable payment notifications, behind one trait with two backends:
//! SQLite for one replica, PostgreSQL for a fleet sharing one database.
//! The backend is chosen by a URL (`sqlite://PATH` or `postgres://...`).

mod postgres;
mod sqlite;

pub use sqlite::{Inspected, inspect_read_only};

use std::{
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
};

use chrono::{DateTime, Utc};
use tokio::{
    sync::{broadcast, mpsc, oneshot, watch},
    task::JoinHandle,
};
use tracing::{info, warn};

pub use postgres::PostgresStore;
pub use sqlite::{SideConnection, SqliteStore, WriterHandle, migrations as sqlite_migrations};
pub(crate) use {postgres::rows as postgres_rows, sqlite::rows as sqlite_rows};

use crate::{
    consumers::ConsumerStore,
    error::Error,
    metrics::Metrics,
    orders::{OrderCheck, OrderStore},
    retention::RetentionStore,
};

/// A notification as verified by the listener, not yet stored.
#[derive(Debug, Clone)]
pub struct IncomingNotification {
    pub trade_status: String,
    pub message: String,
    pub out_trade_id: String,
    /// `TradeAmount` exactly as sent.
    pub trade_amount: String,
    pub amount_fen: Option<i64>,
    pub trade_order_id: String,
    pub trade_bill_no: String,
    pub trade_time: String,
    pub time_stamp: String,
    /// The request body as received.
    pub raw_body: String,
    pub received_at: DateTime<Utc>,
}

impl IncomingNotification {
    /// What makes two sends the same notification: every business field.
    /// `TimeStamp` and `Sign` may differ between resends and are left out.
    /// The amount counts as money: `"0.2"` and `"0.20"` are one payment
    /// (an amount that is not yuan counts as its text).
    pub fn dedup_key(&self) -> String {
        let amount = self
            .amount_fen
            .and_then(|fen| crate::domain::AmountFen::parse(fen, i64::MAX).ok())
            .map_or_else(|| self.trade_amount.clone(), |a| a.yuan_text());
        serde_json::json!([
            self.trade_status,
            self.message,
            self.out_trade_id,
            amount,
            self.trade_order_id,
            self.trade_bill_no,
            self.trade_time,
        ])
        .to_string()
    }

    /// The SHA-256 of [`dedup_key`](Self::dedup_key): how PostgreSQL keys
    /// events, and how both backends keep the tombstone of a swept one.
    pub fn dedup_digest(&self) -> Vec<u8> {
        dedup_digest(&self.dedup_key())
    }

    /// Whether it reports a successful payment (`TradeStatus` `0000`).
    pub fn paid(&self) -> bool {
        self.trade_status == crate::upstream::wire::CODE_OK
    }

    /// The event this notification becomes when stored under `sequence`.
    pub fn stored(
        &self,
        sequence: u64,
        receive_count: u32,
        order_check: Option<OrderCheck>,
    ) -> StoredNotification {
        StoredNotification {
            sequence,
            out_trade_id: self.out_trade_id.clone(),
            trade_order_id: self.trade_order_id.clone(),
            trade_bill_no: self.trade_bill_no.clone(),
            trade_status: self.trade_status.clone(),
            message: self.message.clone(),
            trade_amount: self.trade_amount.clone(),
            amount_fen: self.amount_fen,
            trade_time: self.trade_time.clone(),
            received_at: self.received_at,
            receive_count,
            order_check,
        }
    }
}

/// The digest of a dedup key (see [`IncomingNotification::dedup_digest`]).
pub(crate) fn dedup_digest(key: &str) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(key).to_vec()
}

/// A stored notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredNotification {
    pub sequence: u64,
    pub out_trade_id: String,
    pub trade_order_id: String,
    pub trade_bill_no: String,
    pub trade_status: String,
    pub message: String,
    pub trade_amount: String,
    pub amount_fen: Option<i64>,
    pub trade_time: String,
    pub received_at: DateTime<Utc>,
    pub receive_count: u32,
    /// The notification checked against its order when it was taken in
    /// (`None`: stored before the gateway kept orders).
    pub order_check: Option<OrderCheck>,
}

/// How a test holds a write open (see [`NotificationStore::record_held`]).
#[doc(hidden)]
pub struct HeldWrite {
    /// Told once the write is done and waits to commit.
    pub held: oneshot::Sender<()>,
    /// `true` commits; `false` (or a dropped sender) rolls back with
    /// [`StoreError::RolledBack`].
    pub release: oneshot::Receiver<bool>,
}

impl HeldWrite {
    /// Tells the test the write is held, then waits for its word: whether
    /// to commit.
    async fn wait(self) -> bool {
        let _ = self.held.send(());
        self.release.await == Ok(true)
    }

    fn blocking_wait(self) -> bool {
        let _ = self.held.send(());
        self.release.blocking_recv() == Ok(true)
    }
}

/// What recording a notification did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// A new event, stored under this sequence, and how it compared with
    /// its order.
    New {
        sequence: u64,
        order_check: OrderCheck,
    },
    /// A repeat of the event with this sequence, now received this often.
    Repeat { sequence: u64, receive_count: u32 },
    /// A repeat of the event with this sequence, which retention deleted:
    /// its tombstone recognised it, and nothing is stored.
    RepeatOfSwept { sequence: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store failed: {0}")]
    Backend(String),
    #[error("the store is closed")]
    Closed,
    #[error("sequence {requested} is beyond the last stored sequence {last}")]
    BeyondLast { requested: u64, last: u64 },
    #[error("the write was rolled back")]
    RolledBack,
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::BeyondLast { requested, last } => Error::SequenceBeyondLast {
                field: "sequence",
                requested,
                last,
            },
            e @ (StoreError::Backend(_) | StoreError::Closed | StoreError::RolledBack) => {
                Error::Store(e.to_string())
            }
        }
    }
}

/// Durable notifications and their total order.
///
/// What every backend must guarantee:
/// - **Durability.** `record` returns only after the notification (or the
///   raised receive count of a repeat) is committed so that a crash or power
///   cut right after cannot lose it: the listener answers `success` on that
///   promise alone.
/// - **Ordering.** Each new event gets a `sequence`: 1, 2, 3... in commit
///   order, with no gaps and never reused, also across restarts and, for a
///   shared database, across replicas (so a single sequencer: one writer, or
///   a counter row locked in the inserting transaction).
/// - **Deduplication.** Two notifications with the same
///   [`IncomingNotification::dedup_key`] are one event, however they race;
///   the repeat only raises `receive_count`. Also once retention has
///   deleted the event: its tombstone makes the repeat
///   [`Recorded::RepeatOfSwept`], and nothing is stored.
/// - **Live feed.** `subscribe` yields every new event after its commit, in
///   sequence order. It may drop events to a slow receiver (which then sees
///   `Lagged`) but never reorders them; readers fill gaps from `list`. A
///   shared-database backend feeds it from the database (LISTEN/NOTIFY as a
///   hint, then a read), so events recorded by other replicas arrive too.
#[async_trait::async_trait]
pub trait NotificationStore: Send + Sync + 'static {
    async fn record(&self, notification: IncomingNotification) -> Result<Recorded, StoreError>;

    /// Test support: records like [`record`](Self::record), in a
    /// transaction of its own that stays open, holding its sequence, until
    /// released. Lets tests stage a slow writer beside a fast one.
    #[doc(hidden)]
    async fn record_held(
        &self,
        notification: IncomingNotification,
        hold: HeldWrite,
    ) -> Result<Recorded, StoreError>;

    /// Up to `limit` events with a sequence greater than `after`, in order,
    /// optionally of one order only.
    async fn list(
        &self,
        after: u64,
        out_trade_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StoredNotification>, StoreError>;

    /// The highest sequence stored (0 when empty).
    async fn last_sequence(&self) -> Result<u64, StoreError>;

    /// New events, after commit, in sequence order.
    fn subscribe(&self) -> broadcast::Receiver<Arc<StoredNotification>>;

    /// Whether the store can write now: false from a failed commit until a
    /// commit, or a probe write, succeeds again (see [`WriteHealth`]).
    fn writable(&self) -> watch::Receiver<bool>;

    /// The order ledger kept in the same database (see `orders`). `record`
    /// checks each new notification against it in the same transaction
    /// (`order_check`), and a paid, matching one turns its order PAID.
    fn orders(&self) -> Arc<dyn OrderStore>;

    /// The consumers kept in the same database (see `consumers`).
    fn consumers(&self) -> Arc<dyn ConsumerStore>;

    /// Retention of the events and orders in the same database (see
    /// `retention`).
    fn retention(&self) -> Arc<dyn RetentionStore>;

    /// Finishes pending writes and ends the live feed.
    async fn close(&self);
}

/// Opens the store a URL names: `sqlite://PATH` (relative paths are relative
/// to the working directory) or `postgres://USER:PASSWORD@HOST:PORT/DB`
/// (libpq-style parameters such as `sslmode=require` or
/// `options[search_path]=kongtie` are understood). The URL may hold a
/// password, so it is never logged or quoted in errors.
pub async fn open(
    url: &str,
    metrics: Option<Arc<Metrics>>,
) -> Result<Arc<dyn NotificationStore>, StoreError> {
    if let Some(path) = sqlite_path(url) {
        let store = SqliteStore::open(path, metrics).await?;
        return Ok(Arc::new(store));
    }
    match url.split_once("://") {
        Some(("postgres" | "postgresql", _)) => {
            let store = PostgresStore::open(url, metrics).await?;
            Ok(Arc::new(store))
        }
        Some((scheme, _))
            if scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
        {
            Err(StoreError::Backend(format!(
                "unsupported store URL scheme {scheme:?}; use sqlite://PATH or postgres://..."
            )))
        }
        _ => Err(StoreError::Backend(
            "the store URL is not sqlite://PATH or postgres://...".into(),
        )),
    }
}

/// The file a `sqlite://PATH` URL names.
pub fn sqlite_path(url: &str) -> Option<&Path> {
    url.strip_prefix("sqlite://")
        .filter(|path| !path.is_empty())
        .map(Path::new)
}

/// Sequences are u64 in the API and signed 64-bit in both databases; they
/// start at 1 and grow by one, so they never reach the sign bit.
fn to_sql(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn from_sql(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// New events kept for live subscribers before a slow one lags.
const LIVE_BUFFER: usize = 1024;

/// The sending end of a backend's live feed, held until the store closes;
/// once every clone of the sender is gone, subscribers see the end.
struct LiveFeed(Mutex<Option<broadcast::Sender<Arc<StoredNotification>>>>);

impl LiveFeed {
    /// The feed, and a sender for whoever publishes to it.
    fn new() -> (Self, broadcast::Sender<Arc<StoredNotification>>) {
        let (live, _) = broadcast::channel(LIVE_BUFFER);
        (Self(Mutex::new(Some(live.clone()))), live)
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<StoredNotification>> {
        match &*lock(&self.0) {
            Some(live) => live.subscribe(),
            // Closed: a receiver that ends at once.
            None => broadcast::channel(1).1,
        }
    }

    fn close(&self) {
        lock(&self.0).take();
    }
}

/// A poisoned lock still guards valid data here (nothing panics while
/// holding one mid-update), so it is used as it is.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends a request carrying its reply channel to a backend's writer and
/// waits for the answer.
async fn ask<Op, T>(
    writer: mpsc::Sender<Op>,
    request: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
) -> Result<T, StoreError> {
    let (reply, answer) = oneshot::channel();
    writer
        .send(request(reply))
        .await
        .map_err(|_| StoreError::Closed)?;
    answer.await.map_err(|_| StoreError::Closed)?
}

/// How often a store that cannot write tries a small write.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether a backend can write, as its writer last found: set after each
/// commit. While it is false a prober makes a small write every
/// [`PROBE_EVERY`], so it turns true again without waiting for traffic
/// (a replica that its load balancer took out of rotation gets none).
#[derive(Clone)]
pub struct WriteHealth(Arc<watch::Sender<bool>>);

impl WriteHealth {
    fn new() -> Self {
        Self(Arc::new(watch::Sender::new(true)))
    }

    /// Records a commit's outcome, logging each change once.
    fn set(&self, writable: bool) {
        let changed = self.0.send_if_modified(|now| {
            let changed = *now != writable;
            *now = writable;
            changed
        });
        if changed && writable {
            info!("the store writes again");
        } else if changed {
            warn!("the store cannot write; /readyz answers 503 until it can");
        }
    }

    fn subscribe(&self) -> watch::Receiver<bool> {
        self.0.subscribe()
    }

    /// Probes whenever the store cannot write, until `closed` completes or
    /// `probe` answers `None` (the store closed). `probe` should write
    /// something durable; the backend records its outcome with
    /// [`set`](Self::set).
    fn spawn_prober<F, Fut>(
        &self,
        closed: impl Future<Output = ()> + Send + 'static,
        probe: F,
    ) -> JoinHandle<()>
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Option<()>> + Send,
    {
        let mut writable = self.subscribe();
        let probing = async move {
            loop {
                if writable.wait_for(|w| !*w).await.is_err() {
                    return;
                }
                tokio::time::sleep(PROBE_EVERY).await;
                if *writable.borrow() {
                    // A commit succeeded meanwhile.
                    continue;
                }
                if probe().await.is_none() {
                    return;
                }
            }
        };
        tokio::spawn(async move {
            tokio::select! {
                () = probing => {}
                () = closed => {}
            }
        })
    }
}
