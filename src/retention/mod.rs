//! Retention: how long notifications and final orders are kept, the
//! background sweep that deletes what has outlived it, and giving the
//! freed space back. One contract ([`RetentionStore`]), two backends.
//!
//! The rule, for a notification: it goes once it is older than `keep` and
//! every durable consumer (cursor or work queue) has acknowledged it, or
//! once it is older than `hard` whatever the consumers say, so a consumer
//! that died long ago cannot pin the disk. An order goes once it is final
//! (PAID, FAILED, or EXPIRED) and older than `keep`. The newest
//! notification is never deleted, so sequences are never reused and the
//! first retained sequence is always known.
//!
//! What a sweep deletes leaves a tombstone of its keys behind, in the same
//! transaction: the dedup digest (and sequence) of each event, the id (and
//! whether it was paid) of each order. So a resend of a swept payment is
//! still a repeat, not a new event, and a swept order's `out_trade_id` is
//! never ordered again, whatever the retention. Tombstones are kept for
//! ever; they hold keys only (about 100 bytes a row with its index).
//!
//! Retention has a floor ([`RETENTION_FLOOR`]) below which the gateway
//! does not start, but for a test that says so
//! (`--unsafe-test-only-short-retention`).

mod postgres;
mod sqlite;

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

pub use postgres::PostgresRetention;
pub use sqlite::SqliteRetention;

use crate::{metrics::Metrics, store::StoreError, telemetry::RateLimited};

/// The shortest `KONGTIE_RETENTION` the gateway starts with: 7 days. Kongtie
/// resends a notification for hours (10 sends at most); a consumer that
/// was down over a long weekend must still find its events; and an operator
/// reconciling a week's payments, or looking one up for a refund, wants them
/// at hand. Tombstones keep resends from becoming new events whatever the
/// retention; this floor keeps the events themselves long enough to be of
/// use.
pub const RETENTION_FLOOR: Duration = Duration::from_secs(7 * 86_400);

/// Refuses a retention (`keep`, `None`: for ever) below [`RETENTION_FLOOR`],
/// naming the `setting` and why, unless a test allows it.
pub fn check_floor(
    setting: &str,
    keep: Option<Duration>,
    test_only_allow_short: bool,
) -> Result<(), String> {
    match keep {
        Some(keep) if keep < RETENTION_FLOOR && !test_only_allow_short => Err(format!(
            "{setting} is {}, below the floor of {}: Kongtie resends a notification \
             for hours and a consumer that was down for a weekend must still find its \
             events; WeChat accepts refunds for a year after a payment, and Kongtie's \
             API has no refund call, so a refund is made outside the gateway from the \
             stored payment (the default, 400d, keeps a year of them). Set {setting} \
             to 7d or more, or 0 to keep everything",
            humantime::format_duration(keep),
            humantime::format_duration(RETENTION_FLOOR),
        )),
        _ => Ok(()),
    }
}

/// Rows a sweep deletes in one transaction: small, so intake waits for
/// the write lock a moment at most.
pub const SWEEP_BATCH: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// How long events and final orders are kept (`None`: for ever).
    pub keep: Option<Duration>,
    /// Past this, an event goes even if a consumer has not acknowledged
    /// it (`None`: never).
    pub hard: Option<Duration>,
    /// How often the sweep runs.
    pub sweep_every: Duration,
}

/// The instants a sweep measures against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cutoffs {
    /// Received before this and acknowledged by every consumer: deleted.
    pub keep_before: DateTime<Utc>,
    /// Received before this: deleted, acknowledged or not.
    pub hard_before: DateTime<Utc>,
}

impl RetentionPolicy {
    /// The cutoffs at `now`, or `None` when everything is kept.
    pub fn cutoffs(&self, now: DateTime<Utc>) -> Option<Cutoffs> {
        let keep = self.keep?;
        let before = |d: Duration| {
            chrono::Duration::from_std(d)
                .ok()
                .and_then(|d| now.checked_sub_signed(d))
                // Before anything stored, and in every database's range.
                .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
        };
        Some(Cutoffs {
            keep_before: before(keep),
            hard_before: self
                .hard
                .map_or(DateTime::<Utc>::UNIX_EPOCH, before)
                .min(before(keep)),
        })
    }
}

/// What one sweep batch deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub notifications: u64,
    /// Of those, the ones no consumer had acknowledged (the hard limit).
    pub unacknowledged: u64,
    pub orders: u64,
}

/// Retention as every backend must keep it.
///
/// - `sweep` deletes at most `batch` notifications and `batch` orders that
///   the rule above allows, in a short transaction of its own, and never
///   the newest notification. Work-queue deliveries of the events it
///   deletes go with them. In the same transaction it leaves a tombstone
///   of each (see the module doc), which intake and the ledger consult.
/// - `first_retained` is the lowest stored sequence (1 before the first
///   event): a read that resumes before it has lost events.
/// - `compact` gives space freed by deletes back to the file system where
///   the backend needs telling (SQLite's incremental vacuum, in small
///   steps); PostgreSQL's autovacuum does it there.
#[async_trait::async_trait]
pub trait RetentionStore: Send + Sync + 'static {
    async fn sweep(&self, cutoffs: Cutoffs, batch: usize) -> Result<Swept, StoreError>;
    async fn first_retained(&self) -> Result<u64, StoreError>;
    /// Bytes the store takes: the database file and its WAL (SQLite), the
    /// gateway's tables and their indexes (PostgreSQL).
    async fn size_bytes(&self) -> Result<u64, StoreError>;
    async fn compact(&self) -> Result<(), StoreError>;
}

/// Runs the sweep every `policy.sweep_every` until `stopping`, and keeps
/// the store's size and first retained sequence in the metrics (also when
/// everything is kept).
pub fn spawn_sweeper(
    store: Arc<dyn RetentionStore>,
    policy: RetentionPolicy,
    metrics: Arc<Metrics>,
    mut stopping: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let failures = RateLimited::new(Duration::from_secs(60));
        if let Some(keep) = policy.keep {
            if keep < RETENTION_FLOOR {
                warn!(
                    keep = %humantime::format_duration(keep),
                    "retention below the floor, allowed by the test-only override \
                     (--unsafe-test-only-short-retention): not for production"
                );
            }
            info!(
                keep = %humantime::format_duration(keep),
                hard = %policy.hard.map_or("never".into(), |h| humantime::format_duration(h).to_string()),
                "retention: events and final orders past keep are deleted once acknowledged"
            );
        }
        loop {
            if let Err(e) = sweep_once(store.as_ref(), &policy, &metrics, &stopping).await {
                failures.log(|suppressed| warn!(error = %e, suppressed, "retention sweep failed"));
            }
            tokio::select! {
                () = tokio::time::sleep(policy.sweep_every) => {}
                _ = stopping.wait_for(|s| *s) => return,
            }
        }
    })
}

/// One sweep: batches until one comes back short, then compaction and the
/// gauges.
pub async fn sweep_once(
    store: &dyn RetentionStore,
    policy: &RetentionPolicy,
    metrics: &Metrics,
    stopping: &watch::Receiver<bool>,
) -> Result<Swept, StoreError> {
    let mut total = Swept::default();
    if let Some(cutoffs) = policy.cutoffs(Utc::now()) {
        loop {
            let swept = store.sweep(cutoffs, SWEEP_BATCH).await?;
            total.notifications += swept.notifications;
            total.unacknowledged += swept.unacknowledged;
            total.orders += swept.orders;
            metrics.retention_deleted("notification", swept.notifications);
            metrics.retention_deleted("unacknowledged_notification", swept.unacknowledged);
            metrics.retention_deleted("order", swept.orders);
            let full =
                swept.notifications as usize >= SWEEP_BATCH || swept.orders as usize >= SWEEP_BATCH;
            if !full || *stopping.borrow() {
                break;
            }
            // Let intake have the write lock between batches.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if total.unacknowledged > 0 {
            warn!(
                events = total.unacknowledged,
                "retention deleted events no consumer acknowledged (older than the hard limit)"
            );
        }
        if total != Swept::default() {
            store.compact().await?;
        }
    }
    metrics.retention_sweeps.inc();
    metrics
        .store_first_retained
        .set(i64::try_from(store.first_retained().await?).unwrap_or(i64::MAX));
    metrics
        .store_size_bytes
        .set(i64::try_from(store.size_bytes().await?).unwrap_or(i64::MAX));
    Ok(total)
}

/// Parses a retention setting: a duration such as `400d`, `12h` or `30s`,
/// or `0` for "keep everything".
pub fn parse_duration(s: &str) -> Result<Option<Duration>, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(None);
    }
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Ok(None),
        Ok(d) => Ok(Some(d)),
        Err(e) => Err(format!(
            "{s:?} is not a duration such as 400d, 12h or 30s ({e})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0"), Ok(None));
        assert_eq!(parse_duration("0s"), Ok(None));
        assert_eq!(
            parse_duration("400d"),
            Ok(Some(Duration::from_secs(400 * 86_400)))
        );
        assert_eq!(parse_duration("3s"), Ok(Some(Duration::from_secs(3))));
        assert!(parse_duration("forever").unwrap_err().contains("400d"));
    }

    #[test]
    fn a_retention_below_the_floor_is_refused_unless_a_test_allows_it() {
        let err =
            check_floor("KONGTIE_RETENTION", Some(Duration::from_secs(3)), false).unwrap_err();
        assert!(
            err.contains("KONGTIE_RETENTION is 3s, below the floor of 7days"),
            "{err}"
        );
        assert!(err.contains("resends"), "{err}");
        assert_eq!(check_floor("KONGTIE_RETENTION", None, false), Ok(()));
        assert_eq!(
            check_floor("KONGTIE_RETENTION", Some(RETENTION_FLOOR), false),
            Ok(())
        );
        assert_eq!(
            check_floor("KONGTIE_RETENTION", Some(Duration::from_secs(3)), true),
            Ok(())
        );
    }

    #[test]
    fn cutoffs() {
        let now = Utc::now();
        let policy = |keep, hard: Option<u64>| RetentionPolicy {
            keep: Some(Duration::from_secs(keep)),
            hard: hard.map(Duration::from_secs),
            sweep_every: Duration::from_secs(60),
        };
        let c = policy(10, Some(20)).cutoffs(now).unwrap();
        assert_eq!(c.keep_before, now - chrono::Duration::seconds(10));
        assert_eq!(c.hard_before, now - chrono::Duration::seconds(20));
        // A hard limit shorter than keep is keep.
        let c = policy(10, Some(5)).cutoffs(now).unwrap();
        assert_eq!(c.hard_before, c.keep_before);
        assert_eq!(
            policy(10, None).cutoffs(now).unwrap().hard_before,
            DateTime::<Utc>::UNIX_EPOCH
        );
        let all = RetentionPolicy {
            keep: None,
            hard: None,
            sweep_every: Duration::from_secs(60),
        };
        assert_eq!(all.cutoffs(now), None);
    }
}
