//! Durable payment notifications, behind one trait so a multi-replica
//! backend (PostgreSQL) can follow the SQLite one without changing the API.
//! The backend is chosen by a URL (`sqlite://PATH`).

mod sqlite;

use std::{path::Path, sync::Arc};

use chrono::{DateTime, Utc};
use tokio::sync::broadcast;

pub use sqlite::SqliteStore;

use crate::metrics::Metrics;

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
    pub fn dedup_key(&self) -> String {
        serde_json::json!([
            self.trade_status,
            self.message,
            self.out_trade_id,
            self.trade_amount,
            self.trade_order_id,
            self.trade_bill_no,
            self.trade_time,
        ])
        .to_string()
    }
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
}

/// What recording a notification did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// A new event, stored under this sequence.
    New { sequence: u64 },
    /// A repeat of the event with this sequence, now received this often.
    Repeat { sequence: u64, receive_count: u32 },
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store failed: {0}")]
    Backend(String),
    #[error("the store is closed")]
    Closed,
    #[error("sequence {requested} is beyond the last stored sequence {last}")]
    BeyondLast { requested: u64, last: u64 },
}

/// Durable notifications, their total order, and consumer positions.
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
///   the repeat only raises `receive_count`.
/// - **Live feed.** `subscribe` yields every new event after its commit, in
///   sequence order. It may drop events to a slow receiver (which then sees
///   `Lagged`) but never reorders them; readers fill gaps from `list`. A
///   shared-database backend feeds it from the database (e.g. LISTEN/NOTIFY
///   and a read), so events recorded by other replicas arrive too.
/// - **Acknowledgements** are cumulative and durable: a consumer's position
///   only moves forward.
#[async_trait::async_trait]
pub trait NotificationStore: Send + Sync + 'static {
    async fn record(&self, notification: IncomingNotification) -> Result<Recorded, StoreError>;

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

    /// Moves `consumer`'s position to `sequence` if that is further;
    /// returns the position.
    async fn ack(&self, consumer: &str, sequence: u64) -> Result<u64, StoreError>;

    /// `consumer`'s position (0 when it never acknowledged).
    async fn acked(&self, consumer: &str) -> Result<u64, StoreError>;

    /// New events, after commit, in sequence order.
    fn subscribe(&self) -> broadcast::Receiver<Arc<StoredNotification>>;

    /// Finishes pending writes and ends the live feed.
    async fn close(&self);
}

/// Opens the store a URL names: `sqlite://PATH` (relative paths are relative
/// to the working directory).
pub async fn open(
    url: &str,
    metrics: Option<Arc<Metrics>>,
) -> Result<Arc<dyn NotificationStore>, StoreError> {
    match url.split_once("://") {
        Some(("sqlite", path)) if !path.is_empty() => {
            let store = SqliteStore::open(Path::new(path), metrics).await?;
            Ok(Arc::new(store))
        }
        Some(("postgres" | "postgresql", _)) => Err(StoreError::Backend(
            "the PostgreSQL backend is not available yet; use sqlite://PATH".into(),
        )),
        _ => Err(StoreError::Backend(format!(
            "unsupported store URL {url:?}; use sqlite://PATH"
        ))),
    }
}
