//! Durable consumers of the notifications, of two kinds:
//!
//! - a **cursor** is one cumulative position, for one reader that sees every
//!   event (`SubscribeNotifications` with `consumer`, `AckNotifications`
//!   with `sequence`). It is created by its first subscription or
//!   acknowledgement, and read by one stream at a time (a *stream hold*,
//!   renewed while the stream lives, so a second stream, on any replica, is
//!   refused rather than let two readers move one position);
//! - a **work queue** is shared by many callers that divide the work, after
//!   NATS JetStream's pull consumers: `FetchNotifications` leases events to
//!   one caller for `ack_wait`; an event acknowledged by sequence is done,
//!   one handed back (nak) or whose lease ran out is delivered again, to
//!   anyone, redeliveries first; after `max_deliver` deliveries it is
//!   parked until re-driven; no new event is delivered while
//!   `max_ack_pending` are pending.
//!
//! Leases live in the database (`consumer_pending`: one row per event
//! delivered and not yet acknowledged), so callers on different replicas
//! share one queue. The ack floor is derived: everything below the oldest
//! pending row, or everything delivered when none is pending.
//!
//! [`ConsumerStore`] has one implementation per database, held to one test
//! suite; [`WorkQueues`] is the service over it (the long-poll, wake-ups,
//! metrics).

mod postgres;
mod queue;
mod sqlite;

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Utc};

pub use postgres::PostgresConsumers;
pub use queue::{StreamHold, WorkQueues};
pub use sqlite::SqliteConsumers;

use crate::{
    error::{ConsumerExists, Error},
    store::{StoreError, StoredNotification},
};

/// The most events one fetch leases.
pub const MAX_FETCH: u32 = 100;
/// The longest a fetch waits.
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// The most sequences one ack, nak or re-drive names.
pub const MAX_SEQUENCES: usize = 1000;
/// How long a cursor's stream hold lasts unless renewed: how soon a
/// consumer whose stream's replica died can be read again.
pub const STREAM_HOLD: Duration = Duration::from_secs(15);
/// The first parked sequences a consumer lists.
pub const PARKED_SHOWN: usize = 100;

/// How a consumer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Cursor,
    WorkQueue,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Cursor => "cursor",
            Kind::WorkQueue => "work_queue",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "cursor" => Some(Kind::Cursor),
            "work_queue" => Some(Kind::WorkQueue),
            _ => None,
        }
    }
}

/// Where a work queue starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliverPolicy {
    /// Every stored event.
    All,
    /// Events stored after it was created.
    New,
    /// Events after this sequence.
    AfterSequence(u64),
}

impl DeliverPolicy {
    /// Its stored name, and its sequence (0 unless `AfterSequence`).
    pub fn columns(self) -> (&'static str, u64) {
        match self {
            DeliverPolicy::All => ("all", 0),
            DeliverPolicy::New => ("new", 0),
            DeliverPolicy::AfterSequence(s) => ("after_sequence", s),
        }
    }

    pub fn from_columns(name: &str, sequence: u64) -> Option<DeliverPolicy> {
        match name {
            "all" => Some(DeliverPolicy::All),
            "new" => Some(DeliverPolicy::New),
            "after_sequence" => Some(DeliverPolicy::AfterSequence(sequence)),
            _ => None,
        }
    }
}

/// A work queue's settings, fixed when it is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSettings {
    pub deliver_policy: DeliverPolicy,
    /// How long a fetched event is leased.
    pub ack_wait: Duration,
    /// Deliveries before an event parks.
    pub max_deliver: u32,
    /// Pending events beyond which nothing new is delivered.
    pub max_ack_pending: u32,
}

impl QueueSettings {
    pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
    pub const MIN_ACK_WAIT: Duration = Duration::from_secs(1);
    pub const MAX_ACK_WAIT: Duration = Duration::from_secs(12 * 3600);
    pub const DEFAULT_MAX_DELIVER: u32 = 5;
    pub const MAX_MAX_DELIVER: u32 = 1000;
    pub const DEFAULT_MAX_ACK_PENDING: u32 = 1000;
    pub const MAX_MAX_ACK_PENDING: u32 = 100_000;

    fn ack_wait_ms(&self) -> i64 {
        i64::try_from(self.ack_wait.as_millis()).unwrap_or(i64::MAX)
    }
}

/// A consumer as an operator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumer {
    pub name: String,
    pub kind: Kind,
    /// Every event up to this sequence is acknowledged.
    pub acked_sequence: u64,
    /// Stored events it has not been given yet.
    pub lag: u64,
    /// When it last acknowledged.
    pub last_ack_at: Option<DateTime<Utc>>,
    /// When it was created (unknown for cursors from before this was kept).
    pub created_at: Option<DateTime<Utc>>,
    /// Work queues only.
    pub queue: Option<QueueState>,
    /// Cursors: whether a stream holds it now.
    pub streaming: bool,
}

/// What a work queue holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueState {
    pub settings: QueueSettings,
    /// The highest sequence delivered.
    pub delivered_sequence: u64,
    /// Leased to a caller now.
    pub leased: u64,
    /// Delivered, neither acknowledged nor parked.
    pub pending: u64,
    /// Pending and delivered more than once.
    pub redelivered: u64,
    pub parked: u64,
    /// The first [`PARKED_SHOWN`] parked sequences (filled by `get` only).
    pub parked_sequences: Vec<u64>,
    pub last_fetch_at: Option<DateTime<Utc>>,
}

/// An event leased to one caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leased {
    pub notification: StoredNotification,
    /// Deliveries so far, this one included.
    pub delivery_count: u32,
    pub lease_expires_at: DateTime<Utc>,
}

/// What one fetch attempt did.
#[derive(Debug, Clone, Default)]
pub struct Fetched {
    /// Redeliveries first, then new events, each in sequence order.
    pub events: Vec<Leased>,
    /// How many of `events` were redeliveries.
    pub redelivered: u32,
    /// Events this attempt found had used their deliveries, now parked.
    pub parked: u32,
    /// When the next lease of this consumer runs out, from now.
    pub next_due: Option<Duration>,
}

/// Why a consumer operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("no consumer {0}")]
    NotFound(String),
    #[error("consumer {name} is a {} consumer", .kind.as_str())]
    WrongKind { name: String, kind: Kind },
    #[error("consumer {} exists with other settings", .0.name)]
    Exists(Box<Consumer>),
    #[error("consumer {name} is read by another stream")]
    InUse { name: String },
    #[error("sequence {sequence} was not delivered to consumer {name}")]
    NotDelivered { name: String, sequence: u64 },
    /// The events after the queue's position were deleted by retention
    /// (past the hard limit) before it got them.
    #[error("consumer {name} is at {delivered}, before the first retained sequence {first}")]
    BehindRetention {
        name: String,
        delivered: u64,
        first: u64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ConsumerError> for Error {
    fn from(e: ConsumerError) -> Self {
        match e {
            ConsumerError::NotFound(name) => Error::ConsumerNotFound(name),
            ConsumerError::WrongKind { name, kind } => Error::ConsumerKindMismatch {
                name,
                kind: kind.as_str(),
            },
            ConsumerError::Exists(c) => Error::ConsumerExists(Box::new(ConsumerExists {
                name: c.name.clone(),
                settings: existing_settings(&c),
            })),
            ConsumerError::InUse { name } => Error::ConsumerInUse {
                name,
                hold: STREAM_HOLD,
            },
            ConsumerError::NotDelivered { name, sequence } => {
                Error::NotDelivered { name, sequence }
            }
            ConsumerError::BehindRetention {
                delivered, first, ..
            } => Error::SequenceBeforeRetained {
                field: "consumer",
                requested: delivered,
                first,
            },
            ConsumerError::Store(e) => e.into(),
        }
    }
}

/// A consumer's kind and settings, as the ErrorInfo of a refused create
/// tells them.
fn existing_settings(c: &Consumer) -> HashMap<String, String> {
    let mut meta = HashMap::from([("kind".to_owned(), c.kind.as_str().to_owned())]);
    if let Some(q) = &c.queue {
        let (policy, after) = q.settings.deliver_policy.columns();
        meta.extend([
            ("deliver_policy".to_owned(), policy.to_owned()),
            ("after_sequence".to_owned(), after.to_string()),
            (
                "ack_wait".to_owned(),
                format!("{}s", q.settings.ack_wait.as_secs_f64()),
            ),
            ("max_deliver".to_owned(), q.settings.max_deliver.to_string()),
            (
                "max_ack_pending".to_owned(),
                q.settings.max_ack_pending.to_string(),
            ),
        ]);
    }
    meta
}

/// What an acknowledgement of a work queue's events did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    /// The ack floor after it.
    pub acked_sequence: u64,
    /// How many of the named events it acknowledged (the others had been).
    pub newly_acked: u32,
}

/// The consumers' storage: one implementation per database.
#[async_trait::async_trait]
pub trait ConsumerStore: Send + Sync + 'static {
    async fn get(&self, name: &str) -> Result<Option<Consumer>, StoreError>;

    /// Up to `limit` consumers in name order, after `after`.
    async fn list(&self, after: &str, limit: usize) -> Result<Vec<Consumer>, StoreError>;

    /// Forgets a consumer, its leases and parked events; false when there
    /// was none.
    async fn delete(&self, name: &str) -> Result<bool, StoreError>;

    // Cursors.

    /// Moves a cursor's position to `sequence` if that is further (creating
    /// the cursor); returns the position. `BeyondLast` past the newest
    /// stored sequence.
    async fn ack_cursor(&self, name: &str, sequence: u64) -> Result<u64, ConsumerError>;

    /// Takes (or renews) the stream hold of a cursor for `holder` until
    /// `hold` from now, creating the cursor; returns its position. `InUse`
    /// while another holder's hold lasts.
    async fn hold_stream(
        &self,
        name: &str,
        holder: &str,
        hold: Duration,
    ) -> Result<u64, ConsumerError>;

    /// Extends `holder`'s hold to `hold` from now (taking it again if no one
    /// holds it); false when it lost it (it lapsed and another stream took
    /// it, or the consumer was deleted).
    async fn renew_stream(
        &self,
        name: &str,
        holder: &str,
        hold: Duration,
    ) -> Result<bool, StoreError>;

    /// Gives the hold up, if `holder` still has it.
    async fn release_stream(&self, name: &str, holder: &str) -> Result<(), StoreError>;

    // Work queues.

    /// Creates a work queue; an existing one with the same settings is
    /// returned as it is, `Exists` otherwise. `BeyondLast` for an
    /// `AfterSequence` past the newest stored sequence.
    async fn create(&self, name: &str, settings: &QueueSettings)
    -> Result<Consumer, ConsumerError>;

    /// Leases up to `max` events: parks those that used their deliveries,
    /// redelivers those whose lease ran out, then delivers new ones while
    /// fewer than `max_ack_pending` are pending. `touch` records the fetch
    /// time even when nothing was delivered.
    async fn fetch(&self, name: &str, max: u32, touch: bool) -> Result<Fetched, ConsumerError>;

    /// Acknowledges exactly these events (each delivered before).
    async fn ack_events(&self, name: &str, sequences: &[u64]) -> Result<Acked, ConsumerError>;

    /// Hands leased events back, deliverable after `delay` (an event with no
    /// deliveries left parks at once); with `delivery_counts`, only events
    /// still on that delivery. Returns how many it handed back.
    async fn nak(
        &self,
        name: &str,
        sequences: &[u64],
        delivery_counts: Option<&[u32]>,
        delay: Duration,
    ) -> Result<u32, ConsumerError>;

    /// Makes parked events deliverable again with `max_deliver` more
    /// deliveries (all of them when `sequences` is empty).
    async fn redrive(&self, name: &str, sequences: &[u64]) -> Result<u32, ConsumerError>;
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A consumer's row and the counts of its pending events, as both backends
/// read them; [`assemble`](Self::assemble) makes the [`Consumer`].
struct ConsumerRow {
    name: String,
    kind: String,
    acked_sequence: u64,
    last_ack_at: Option<DateTime<Utc>>,
    created_at: Option<DateTime<Utc>>,
    deliver_policy: Option<String>,
    policy_sequence: u64,
    ack_wait_ms: i64,
    max_deliver: i64,
    max_ack_pending: i64,
    delivered_sequence: u64,
    last_fetch_at: Option<DateTime<Utc>>,
    streaming: bool,
    /// The newest stored sequence.
    last: u64,
    oldest_pending: Option<u64>,
    pending_rows: u64,
    leased: u64,
    parked: u64,
    redelivered: u64,
}

impl ConsumerRow {
    fn assemble(self, parked_sequences: Vec<u64>) -> Consumer {
        let kind = Kind::parse(&self.kind).unwrap_or(Kind::Cursor);
        let settings = self
            .deliver_policy
            .as_deref()
            .and_then(|p| DeliverPolicy::from_columns(p, self.policy_sequence))
            .map(|deliver_policy| QueueSettings {
                deliver_policy,
                ack_wait: Duration::from_millis(u64::try_from(self.ack_wait_ms).unwrap_or(0)),
                max_deliver: u32::try_from(self.max_deliver).unwrap_or(0),
                max_ack_pending: u32::try_from(self.max_ack_pending).unwrap_or(0),
            });
        let (acked_sequence, lag, queue) = match (kind, settings) {
            (Kind::WorkQueue, Some(settings)) => (
                // Everything below the oldest pending event is acknowledged.
                self.oldest_pending
                    .map_or(self.delivered_sequence, |s| s.saturating_sub(1)),
                self.last.saturating_sub(self.delivered_sequence),
                Some(QueueState {
                    settings,
                    delivered_sequence: self.delivered_sequence,
                    leased: self.leased,
                    pending: self.pending_rows.saturating_sub(self.parked),
                    redelivered: self.redelivered,
                    parked: self.parked,
                    parked_sequences,
                    last_fetch_at: self.last_fetch_at,
                }),
            ),
            _ => (
                self.acked_sequence,
                self.last.saturating_sub(self.acked_sequence),
                None,
            ),
        };
        Consumer {
            name: self.name,
            kind,
            acked_sequence,
            lag,
            last_ack_at: self.last_ack_at,
            created_at: self.created_at,
            queue,
            streaming: kind == Kind::Cursor && self.streaming,
        }
    }
}

/// Whether an existing consumer is what a create asks for.
fn same_queue(existing: &Consumer, settings: &QueueSettings) -> bool {
    existing
        .queue
        .as_ref()
        .is_some_and(|q| q.settings == *settings)
}

/// The sequence a new work queue starts after, given the first retained
/// and the newest stored. "All" is all that is retained; a sequence whose
/// next event retention deleted is refused, as reads from there are.
fn start_after(
    name: &str,
    policy: DeliverPolicy,
    first: u64,
    last: u64,
) -> Result<u64, ConsumerError> {
    match policy {
        DeliverPolicy::All => Ok(first.saturating_sub(1)),
        DeliverPolicy::New => Ok(last),
        DeliverPolicy::AfterSequence(s) if s > last => {
            Err(StoreError::BeyondLast { requested: s, last }.into())
        }
        DeliverPolicy::AfterSequence(s) if s.saturating_add(1) < first => {
            Err(ConsumerError::BehindRetention {
                name: name.to_owned(),
                delivered: s,
                first,
            })
        }
        DeliverPolicy::AfterSequence(s) => Ok(s),
    }
}
