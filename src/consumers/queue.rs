//! The consumers as a service: the long-poll of `FetchNotifications`, what
//! wakes it, the stream holds of cursors, and the consumer metrics.
//!
//! A waiting fetch tries again when this replica's live feed has a new
//! event (on PostgreSQL the feed also carries other replicas' commits),
//! when an ack, nak or re-drive on this replica may have made room or
//! handed events back, when the consumer's next lease runs out, and at
//! least every [`POLL_EVERY`] (a nak or ack on another replica).

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{Notify, broadcast::error::RecvError, watch},
    task::JoinHandle,
    time::Instant,
};
use tracing::warn;

use super::{Acked, Consumer, ConsumerError, ConsumerStore, Leased, STREAM_HOLD};
use crate::{metrics::Metrics, store::NotificationStore};

/// The longest a waiting fetch goes without trying again.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// How often the per-consumer gauges are read from the store.
const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Consumers that get a label of their own in the metrics; the rest count
/// under [`OTHER`].
const LABELLED: usize = 100;
const OTHER: &str = crate::domain::OVERFLOW_CONSUMER_LABEL;
/// Consumers read per query while sampling.
const SAMPLE_PAGE: usize = 500;

pub struct WorkQueues {
    store: Arc<dyn ConsumerStore>,
    notifications: Arc<dyn NotificationStore>,
    /// Told after an ack, nak or re-drive on this replica.
    changed: Notify,
    shutdown: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    /// Consumer names with a metric label of their own (at most
    /// [`LABELLED`]).
    labelled: Mutex<HashSet<String>>,
}

impl WorkQueues {
    pub fn new(
        notifications: Arc<dyn NotificationStore>,
        shutdown: watch::Receiver<bool>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store: notifications.consumers(),
            notifications,
            changed: Notify::new(),
            shutdown,
            metrics,
            labelled: Mutex::new(HashSet::new()),
        })
    }

    pub fn store(&self) -> &Arc<dyn ConsumerStore> {
        &self.store
    }

    /// Leases up to `max` events, waiting up to `wait` for the first; an
    /// empty answer when none came (or the server began shutting down).
    pub async fn fetch(
        &self,
        name: &str,
        max: u32,
        wait: Duration,
    ) -> Result<Vec<Leased>, ConsumerError> {
        let deadline = Instant::now() + wait;
        // Subscribed before the first try: a commit after it wakes us.
        let mut live = self.notifications.subscribe();
        let mut shutdown = self.shutdown.clone();
        let mut touch = true;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let fetched = self.store.fetch(name, max, touch).await?;
            touch = false;
            self.count(name, &fetched);
            let now = Instant::now();
            if !fetched.events.is_empty() || now >= deadline || *shutdown.borrow() {
                return Ok(fetched.events);
            }
            let next = fetched
                .next_due
                .map_or(POLL_EVERY, |d| d.min(POLL_EVERY))
                .max(Duration::from_millis(1));
            let retry = deadline.min(now + next);
            tokio::select! {
                event = live.recv() => match event {
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    // The store closed: nothing more will come.
                    Err(RecvError::Closed) => return Ok(Vec::new()),
                },
                () = &mut changed => {}
                () = tokio::time::sleep_until(retry) => {}
                _ = shutdown.changed() => return Ok(Vec::new()),
            }
        }
    }

    pub async fn ack(&self, name: &str, sequences: &[u64]) -> Result<Acked, ConsumerError> {
        let acked = self.store.ack_events(name, sequences).await?;
        if acked.newly_acked > 0 {
            // Room under max_ack_pending, perhaps.
            self.changed.notify_waiters();
        }
        Ok(acked)
    }

    pub async fn nak(
        &self,
        name: &str,
        sequences: &[u64],
        delivery_counts: Option<&[u32]>,
        delay: Duration,
    ) -> Result<u32, ConsumerError> {
        let nakked = self
            .store
            .nak(name, sequences, delivery_counts, delay)
            .await?;
        if nakked > 0 {
            self.changed.notify_waiters();
        }
        Ok(nakked)
    }

    pub async fn redrive(&self, name: &str, sequences: &[u64]) -> Result<u32, ConsumerError> {
        let redriven = self.store.redrive(name, sequences).await?;
        if redriven > 0 {
            self.changed.notify_waiters();
        }
        Ok(redriven)
    }

    /// Takes the stream hold of cursor `name` for one subscription, and
    /// keeps renewing it until the returned hold is dropped; with the
    /// cursor's position.
    pub async fn hold_stream(
        self: &Arc<Self>,
        name: &str,
    ) -> Result<(StreamHold, u64), ConsumerError> {
        let holder = format!("{:032x}", rand::random::<u128>());
        let position = self.store.hold_stream(name, &holder, STREAM_HOLD).await?;
        let (lost_tx, lost) = watch::channel(false);
        let store = Arc::clone(&self.store);
        let (renewed, renewer) = (name.to_owned(), holder.clone());
        let renewing = tokio::spawn(async move {
            let name = renewed;
            // Renewed three times per hold, so one slow renewal does not
            // lose it; given up once it lapsed.
            let mut held_until = Instant::now() + STREAM_HOLD;
            loop {
                tokio::time::sleep(STREAM_HOLD / 3).await;
                match store.renew_stream(&name, &renewer, STREAM_HOLD).await {
                    Ok(true) => held_until = Instant::now() + STREAM_HOLD,
                    Ok(false) => break,
                    Err(e) if Instant::now() >= held_until => {
                        warn!(error = %e, consumer = %name, "could not renew a stream hold");
                        break;
                    }
                    Err(_) => {}
                }
            }
            let _ = lost_tx.send(true);
        });
        Ok((
            StreamHold {
                store: Arc::clone(&self.store),
                name: name.to_owned(),
                holder,
                lost,
                renewing,
            },
            position,
        ))
    }

    fn label(&self, name: &str) -> String {
        let mut labelled = crate::store::lock(&self.labelled);
        if labelled.contains(name) {
            return name.to_owned();
        }
        if labelled.len() < LABELLED {
            labelled.insert(name.to_owned());
            return name.to_owned();
        }
        OTHER.to_owned()
    }

    fn count(&self, name: &str, fetched: &super::Fetched) {
        if fetched.redelivered == 0 && fetched.parked == 0 {
            return;
        }
        let consumer = self.label(name);
        self.metrics
            .consumer_redeliveries(&consumer, fetched.redelivered);
        self.metrics.consumer_parks(&consumer, fetched.parked);
    }

    /// Reads lag, leased, pending and parked of every consumer every
    /// [`SAMPLE_EVERY`], until shutdown, into the gauges of the
    /// [`LABELLED`] that matter most (see [`most_behind`]); the rest are
    /// summed under [`OTHER`].
    pub fn spawn_sampler(self: &Arc<Self>) -> JoinHandle<()> {
        let queues = Arc::clone(self);
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let mut shown: HashSet<String> = HashSet::new();
            loop {
                match queues.every_consumer().await {
                    Ok(consumers) => {
                        let (labelled, rest) = most_behind(consumers);
                        let mut now: HashSet<String> =
                            labelled.iter().map(|c| c.name.clone()).collect();
                        let sample = |name: &str, g: Gauges| {
                            queues
                                .metrics
                                .consumer_sample(name, g.lag, g.leased, g.pending, g.parked);
                        };
                        for c in &labelled {
                            sample(&c.name, Gauges::of(c));
                        }
                        if !rest.is_empty() {
                            sample(
                                OTHER,
                                rest.iter()
                                    .map(Gauges::of)
                                    .fold(Gauges::default(), Gauges::add),
                            );
                            now.insert(OTHER.to_owned());
                        }
                        for gone in shown.difference(&now) {
                            queues.metrics.forget_consumer(gone);
                        }
                        shown = now;
                    }
                    Err(e) => tracing::debug!(error = %e, "sampling the consumers failed"),
                }
                tokio::select! {
                    () = tokio::time::sleep(SAMPLE_EVERY) => {}
                    _ = shutdown.changed() => return,
                }
            }
        })
    }

    async fn every_consumer(&self) -> Result<Vec<Consumer>, crate::store::StoreError> {
        let mut all = Vec::new();
        loop {
            let after = all
                .last()
                .map_or(String::new(), |c: &Consumer| c.name.clone());
            let page = self.store.list(&after, SAMPLE_PAGE).await?;
            let full = page.len() == SAMPLE_PAGE;
            all.extend(page);
            if !full {
                return Ok(all);
            }
        }
    }
}

/// The consumers that get gauges of their own, and the rest: the most
/// lagging first, then those with the most parked events (both need an
/// operator), by name among equals. The first 100 by name would hide a
/// stuck consumer behind 100 healthy ones.
fn most_behind(mut consumers: Vec<Consumer>) -> (Vec<Consumer>, Vec<Consumer>) {
    let parked = |c: &Consumer| c.queue.as_ref().map_or(0, |q| q.parked);
    consumers.sort_by(|a, b| {
        b.lag
            .cmp(&a.lag)
            .then(parked(b).cmp(&parked(a)))
            .then_with(|| a.name.cmp(&b.name))
    });
    let rest = consumers.split_off(consumers.len().min(LABELLED));
    (consumers, rest)
}

/// One consumer's sampled gauges, or the sum of several.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Gauges {
    lag: u64,
    leased: u64,
    pending: u64,
    parked: u64,
}

impl Gauges {
    fn of(c: &Consumer) -> Self {
        let q = c.queue.as_ref();
        Self {
            lag: c.lag,
            leased: q.map_or(0, |q| q.leased),
            pending: q.map_or(0, |q| q.pending),
            parked: q.map_or(0, |q| q.parked),
        }
    }

    fn add(self, o: Self) -> Self {
        Self {
            lag: self.lag.saturating_add(o.lag),
            leased: self.leased.saturating_add(o.leased),
            pending: self.pending.saturating_add(o.pending),
            parked: self.parked.saturating_add(o.parked),
        }
    }
}

/// A subscription's hold on its cursor consumer: renewed in the
/// background, given up when dropped.
pub struct StreamHold {
    store: Arc<dyn ConsumerStore>,
    name: String,
    holder: String,
    lost: watch::Receiver<bool>,
    renewing: JoinHandle<()>,
}

impl StreamHold {
    /// Completes if the hold is lost (the consumer was deleted, or the
    /// store could not renew it in time).
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|lost| *lost).await;
    }

    /// Gives the hold up now, so the consumer's next stream is accepted at
    /// once (at shutdown too: the stream stays open until this is done).
    pub async fn release(mut self) {
        self.renewing.abort();
        let holder = std::mem::take(&mut self.holder);
        if let Err(e) = self.store.release_stream(&self.name, &holder).await {
            tracing::debug!(error = %e, consumer = %self.name, "releasing a stream hold failed");
        }
    }
}

impl Drop for StreamHold {
    fn drop(&mut self) {
        self.renewing.abort();
        if self.holder.is_empty() {
            // Released already.
            return;
        }
        let (store, name, holder) = (
            Arc::clone(&self.store),
            std::mem::take(&mut self.name),
            std::mem::take(&mut self.holder),
        );
        // Given up at once so the consumer's next stream need not wait for
        // the hold to lapse.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = store.release_stream(&name, &holder).await {
                    tracing::debug!(error = %e, consumer = %name, "releasing a stream hold failed");
                }
            });
        }
    }
}
