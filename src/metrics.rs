//! Prometheus metrics, served on the admin listener's `/metrics`.
//!
//! One [`Metrics`] per running gateway, handed to the parts that count, so
//! that tests (and several gateways in one process) keep separate numbers.

use std::sync::Arc;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub endpoint: &'static str,
    /// ok, rejected, unavailable, timeout, bad_response
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// access_token, jsapi_ticket, oauth_code
    pub cache: &'static str,
    /// hit, miss
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// notification, unacknowledged_notification, order
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// stored, duplicate
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabels {
    /// notify, poll, listen, gap
    pub trigger: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// commit, read
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabels {
    /// A consumer's name; `_other` for those past the 100 labelled (for the
    /// gauges, the 100 most lagging; for the counters, the first 100 seen).
    pub consumer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// unary, server_stream, client_stream, bidi_stream
    pub grpc_type: &'static str,
    pub grpc_service: &'static str,
    pub grpc_method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandledLabels {
    pub grpc_type: &'static str,
    pub grpc_service: &'static str,
    pub grpc_method: &'static str,
    pub grpc_code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn rpc_histogram() -> Histogram {
    // 100 µs to about 26 s: a cached token answers in well under 1 ms.
    Histogram::new(exponential_buckets(0.0001, 2.5, 14))
}

fn latency_histogram() -> Histogram {
    // 1 ms to about 16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// One listener's connections: open now, waits at its cap, accept errors,
/// and endings by reason.
#[derive(Clone, Default)]
pub struct ListenerMetrics {
    pub connections: Gauge,
    pub waits: Counter,
    pub accept_errors: Counter,
    closed: Family<ReasonLabels, Counter>,
}

impl ListenerMetrics {
    fn register(&self, registry: &mut Registry, listener: &str, reasons: &str) {
        registry.register(
            format!("{listener}_connections"),
            format!("Connections open now on the {listener} listener"),
            self.connections.clone(),
        );
        registry.register(
            format!("{listener}_connection_waits"),
            format!(
                "Times the {listener} listener stopped accepting: all its connections were open"
            ),
            self.waits.clone(),
        );
        registry.register(
            format!("{listener}_accept_errors"),
            format!(
                "Connections the {listener} listener failed to accept (out of file descriptors...)"
            ),
            self.accept_errors.clone(),
        );
        registry.register(
            format!("{listener}_connections_closed"),
            format!("{listener} listener connections ended, by reason: {reasons}"),
            self.closed.clone(),
        );
    }

    pub fn closed(&self, reason: &'static str) {
        self.closed.get_or_create(&ReasonLabels { reason }).inc();
    }
}

pub struct Metrics {
    registry: Registry,
    pub rpc_started: Family<RpcLabels, Counter>,
    pub rpc_handled: Family<HandledLabels, Counter>,
    pub rpc_seconds: HistogramFamily<RpcLabels>,
    pub upstream_calls: Family<CallLabels, Counter>,
    pub upstream_seconds: HistogramFamily<EndpointLabels>,
    pub cache_lookups: Family<CacheLabels, Counter>,
    /// (cache, hits, misses) of the caches every cached RPC counts.
    cache_counters: Vec<(&'static str, Counter, Counter)>,
    pub notifications: Family<OutcomeLabels, Counter>,
    pub notifications_rejected: Family<ReasonLabels, Counter>,
    pub subscribers: Gauge,
    pub subscription_catch_ups: Counter,
    pub order_requests: Family<OutcomeLabels, Counter>,
    pub order_checks: Family<ResultLabels, Counter>,
    /// The notify listener's connections (`kongtie_notify_connection*`).
    pub notify_listener: ListenerMetrics,
    /// The gRPC listener's connections (`kongtie_grpc_connection*`).
    pub grpc_listener: ListenerMetrics,
    log_lines_dropped: Counter,
    retention_deleted: Family<KindLabels, Counter>,
    pub retention_sweeps: Counter,
    pub store_first_retained: Gauge,
    pub store_size_bytes: Gauge,
    /// SQLite reads running now, and the most ever at once: held to the
    /// read pool's size however callers are cancelled.
    pub store_reads_running: Gauge,
    pub store_reads_running_peak: Gauge,
    scrape: std::sync::Mutex<()>,
    pub store_commit_seconds: Histogram,
    pub store_checkpoint_failures: Counter,
    pub store_batch_size: Histogram,
    pub store_feed_reads: Family<TriggerLabels, Counter>,
    pub store_feed_events: Family<SourceLabels, Counter>,
    pub consumer_lag: Family<ConsumerLabels, Gauge>,
    pub consumer_leased: Family<ConsumerLabels, Gauge>,
    pub consumer_pending: Family<ConsumerLabels, Gauge>,
    pub consumer_parked: Family<ConsumerLabels, Gauge>,
    pub consumer_redeliveries: Family<ConsumerLabels, Counter>,
    pub consumer_parks: Family<ConsumerLabels, Counter>,
    /// Requests the gRPC port refused before any service ran, by reason
    /// (src/grpc/origin.rs, src/connect).
    pub grpc_requests_refused: Family<ReasonLabels, Counter>,
    /// CORS preflights answered for allowed origins.
    pub grpc_cors_preflights: Counter,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        // The gRPC server metrics keep their usual names; ours are
        // prefixed `kongtie_`.
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("kongtie");
        let cache_lookups: Family<CacheLabels, Counter> = Family::default();
        let cache_counters = ["access_token", "jsapi_ticket", "oauth_code"]
            .into_iter()
            .map(|cache| {
                let take = |result| {
                    cache_lookups
                        .get_or_create(&CacheLabels { cache, result })
                        .clone()
                };
                (cache, take("hit"), take("miss"))
            })
            .collect();
        let m = Self {
            rpc_started: Family::default(),
            rpc_handled: Family::default(),
            rpc_seconds: HistogramFamily::new_with_constructor(rpc_histogram),
            upstream_calls: Family::default(),
            upstream_seconds: HistogramFamily::new_with_constructor(latency_histogram),
            cache_lookups,
            cache_counters,
            notifications: Family::default(),
            notifications_rejected: Family::default(),
            subscribers: Gauge::default(),
            subscription_catch_ups: Counter::default(),
            order_requests: Family::default(),
            order_checks: Family::default(),
            notify_listener: ListenerMetrics::default(),
            grpc_listener: ListenerMetrics::default(),
            log_lines_dropped: Counter::default(),
            retention_deleted: Family::default(),
            retention_sweeps: Counter::default(),
            store_first_retained: Gauge::default(),
            store_size_bytes: Gauge::default(),
            store_reads_running: Gauge::default(),
            store_reads_running_peak: Gauge::default(),
            scrape: std::sync::Mutex::new(()),
            store_commit_seconds: latency_histogram(),
            store_checkpoint_failures: Counter::default(),
            store_batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            store_feed_reads: Family::default(),
            store_feed_events: Family::default(),
            consumer_lag: Family::default(),
            consumer_leased: Family::default(),
            consumer_pending: Family::default(),
            consumer_parked: Family::default(),
            consumer_redeliveries: Family::default(),
            consumer_parks: Family::default(),
            grpc_requests_refused: Family::default(),
            grpc_cors_preflights: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "upstream_calls",
            "Calls to Kongtie by endpoint and outcome",
            m.upstream_calls.clone(),
        );
        registry.register(
            "upstream_call_seconds",
            "Latency of calls to Kongtie",
            m.upstream_seconds.clone(),
        );
        registry.register(
            "cache_lookups",
            "Cache lookups of tokens, tickets and OAuth codes, by result",
            m.cache_lookups.clone(),
        );
        registry.register(
            "notifications_received",
            "Payment notifications accepted, new or duplicate",
            m.notifications.clone(),
        );
        registry.register(
            "notifications_rejected",
            "Payment notification requests refused, by reason",
            m.notifications_rejected.clone(),
        );
        registry.register(
            "subscribers",
            "Notification subscriptions open now",
            m.subscribers.clone(),
        );
        registry.register(
            "order_requests",
            "CreateJsapiOrder runs by what the ledger decided: sent (to Kongtie), \
             replayed (the stored answer), refused",
            m.order_requests.clone(),
        );
        registry.register(
            "notification_order_checks",
            "New notifications checked against their order, by result: matched, \
             amount_mismatch, unknown_order, already_paid (a second payment of a paid order)",
            m.order_checks.clone(),
        );
        m.notify_listener.register(
            registry,
            "notify",
            "closed (by the client or after its answer), read_timeout (no request headers \
             in time, idle included), shutdown, error",
        );
        m.grpc_listener.register(
            registry,
            "grpc",
            "closed (by either side), no_preface (nothing within the handshake timeout), \
             tls_handshake (failed or too slow), past_max_age (closed for good after \
             max age and its grace)",
        );
        registry.register(
            "retention_deleted",
            "Rows deleted by retention sweeps, by kind: notification, \
             unacknowledged_notification (of those, past the hard limit), order",
            m.retention_deleted.clone(),
        );
        registry.register(
            "retention_sweeps",
            "Retention sweeps run (they also refresh the store's size and first retained sequence)",
            m.retention_sweeps.clone(),
        );
        registry.register(
            "store_first_retained_sequence",
            "The lowest sequence still stored; reading from before it is OUT_OF_RANGE",
            m.store_first_retained.clone(),
        );
        registry.register(
            "store_size_bytes",
            "Bytes the store takes: SQLite's file and WAL, or the gateway's PostgreSQL tables",
            m.store_size_bytes.clone(),
        );
        registry.register(
            "store_reads_running",
            "SQLite reads running now on the read pool's blocking threads",
            m.store_reads_running.clone(),
        );
        registry.register(
            "store_reads_running_peak",
            "The most SQLite reads that ever ran at once (at most the read pool's size)",
            m.store_reads_running_peak.clone(),
        );
        registry.register(
            "subscription_catch_ups",
            "Times a subscription fell behind the live feed (its client read slowly) \
             and read what it missed from the store",
            m.subscription_catch_ups.clone(),
        );
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because stderr did not keep up (the writer's queue was full)",
            m.log_lines_dropped.clone(),
        );
        registry.register(
            "store_checkpoint_failures",
            "SQLite WAL checkpoints that failed (a full disk...); logged at most once a minute",
            m.store_checkpoint_failures.clone(),
        );
        registry.register(
            "store_commit_seconds",
            "Time of one store commit (a group of writes)",
            m.store_commit_seconds.clone(),
        );
        registry.register(
            "store_commit_batch_size",
            "Writes per store commit",
            m.store_batch_size.clone(),
        );
        registry.register(
            "store_feed_reads",
            "Reads of new rows for the live feed (PostgreSQL), by trigger: notify \
             (another replica's NOTIFY), poll, listen (after LISTEN (re)connected), \
             gap (a commit of ours did not follow on)",
            m.store_feed_reads.clone(),
        );
        registry.register(
            "store_feed_events",
            "Events published to this replica's subscribers, by source: commit \
             (this replica's own) or read (from the database)",
            m.store_feed_events.clone(),
        );
        registry.register(
            "consumer_lag",
            "Stored notifications a consumer has not been given yet (sampled; the \
             100 most lagging consumers, the rest summed under _other)",
            m.consumer_lag.clone(),
        );
        registry.register(
            "consumer_leased",
            "Events of a work-queue consumer leased to a caller now (sampled)",
            m.consumer_leased.clone(),
        );
        registry.register(
            "consumer_pending",
            "Events of a work-queue consumer delivered and not yet acknowledged or \
             parked (sampled)",
            m.consumer_pending.clone(),
        );
        registry.register(
            "consumer_parked",
            "Events of a work-queue consumer parked after max_deliver deliveries (sampled)",
            m.consumer_parked.clone(),
        );
        registry.register(
            "consumer_redeliveries",
            "Events delivered again by FetchNotifications (a lease ran out, or a nak)",
            m.consumer_redeliveries.clone(),
        );
        registry.register(
            "consumer_parks",
            "Events parked after max_deliver deliveries, as fetches found them",
            m.consumer_parks.clone(),
        );
        registry.register(
            "grpc_requests_refused",
            "Requests the gRPC port refused before any service ran, by reason: \
             origin_not_allowed, cross_site_without_origin, host_not_allowed, \
             unsupported_media_type (a POST neither gRPC nor Connect: 415), \
             unknown_procedure (a Connect request for no served RPC: 404), \
             method_not_allowed (neither POST nor GET: 405)",
            m.grpc_requests_refused.clone(),
        );
        registry.register(
            "grpc_cors_preflights",
            "CORS preflights the gRPC port answered for allowed origins",
            m.grpc_cors_preflights.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "build_info",
            "Always 1; the running version in its label",
            build_info,
        );
        root.register(
            "grpc_server_started",
            "RPCs started on the server, gRPC and Connect alike",
            m.rpc_started.clone(),
        );
        root.register(
            "grpc_server_handled",
            "RPCs completed on the server, by gRPC status code",
            m.rpc_handled.clone(),
        );
        root.register(
            "grpc_server_handling_seconds",
            "Time from an RPC's start to its status (a stream's whole life)",
            m.rpc_seconds.clone(),
        );
        Arc::new(Self {
            registry: root,
            ..m
        })
    }

    /// The handles of one RPC's series, taken once and kept by the caller,
    /// so that a call costs no label hashing.
    pub fn rpc_started(&self, labels: &RpcLabels) -> Counter {
        self.rpc_started.get_or_create_owned(labels)
    }

    pub fn rpc_seconds(&self, labels: &RpcLabels) -> Histogram {
        self.rpc_seconds.get_or_create_owned(labels)
    }

    pub fn rpc_handled(&self, labels: &RpcLabels, grpc_code: &'static str) -> Counter {
        self.rpc_handled.get_or_create_owned(&HandledLabels {
            grpc_type: labels.grpc_type,
            grpc_service: labels.grpc_service,
            grpc_method: labels.grpc_method,
            grpc_code,
        })
    }

    pub fn upstream_call(&self, endpoint: &'static str, outcome: &'static str, seconds: f64) {
        self.upstream_calls
            .get_or_create(&CallLabels { endpoint, outcome })
            .inc();
        self.upstream_seconds
            .get_or_create(&EndpointLabels { endpoint })
            .observe(seconds);
    }

    /// Counted on every cached RPC: the three caches' counters are taken
    /// once, so a lookup costs no label hashing.
    pub fn cache_lookup(&self, cache: &'static str, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        match self
            .cache_counters
            .iter()
            .find(|(name, _, _)| *name == cache)
        {
            Some((_, hits, misses)) => {
                if hit {
                    hits.inc();
                } else {
                    misses.inc();
                }
            }
            None => {
                self.cache_lookups
                    .get_or_create(&CacheLabels { cache, result })
                    .inc();
            }
        }
    }

    pub fn retention_deleted(&self, kind: &'static str, rows: u64) {
        self.retention_deleted
            .get_or_create(&KindLabels { kind })
            .inc_by(rows);
    }

    pub fn notification(&self, outcome: &'static str) {
        self.notifications
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn rejected(&self, reason: &'static str) {
        self.notifications_rejected
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn order_request(&self, outcome: &'static str) {
        self.order_requests
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    pub fn order_check(&self, result: &'static str) {
        self.order_checks
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn feed_read(&self, trigger: &'static str) {
        self.store_feed_reads
            .get_or_create(&TriggerLabels { trigger })
            .inc();
    }

    pub fn feed_events(&self, source: &'static str, n: usize) {
        self.store_feed_events
            .get_or_create(&SourceLabels { source })
            .inc_by(n as u64);
    }

    pub fn consumer_redeliveries(&self, consumer: &str, n: u32) {
        if n > 0 {
            self.consumer_redeliveries
                .get_or_create(&ConsumerLabels {
                    consumer: consumer.to_owned(),
                })
                .inc_by(u64::from(n));
        }
    }

    pub fn consumer_parks(&self, consumer: &str, n: u32) {
        if n > 0 {
            self.consumer_parks
                .get_or_create(&ConsumerLabels {
                    consumer: consumer.to_owned(),
                })
                .inc_by(u64::from(n));
        }
    }

    /// One sample of a consumer's gauges.
    pub fn consumer_sample(
        &self,
        consumer: &str,
        lag: u64,
        leased: u64,
        pending: u64,
        parked: u64,
    ) {
        let labels = ConsumerLabels {
            consumer: consumer.to_owned(),
        };
        let as_gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.consumer_lag.get_or_create(&labels).set(as_gauge(lag));
        self.consumer_leased
            .get_or_create(&labels)
            .set(as_gauge(leased));
        self.consumer_pending
            .get_or_create(&labels)
            .set(as_gauge(pending));
        self.consumer_parked
            .get_or_create(&labels)
            .set(as_gauge(parked));
    }

    /// Drops a deleted consumer's gauges.
    pub fn forget_consumer(&self, consumer: &str) {
        let labels = ConsumerLabels {
            consumer: consumer.to_owned(),
        };
        self.consumer_lag.remove(&labels);
        self.consumer_leased.remove(&labels);
        self.consumer_pending.remove(&labels);
        self.consumer_parked.remove(&labels);
    }

    /// The Prometheus text format.
    pub fn encode(&self) -> String {
        // Values read at scrape time; one scrape at a time, so a counter
        // brought up to date is not brought up twice.
        let _scrape = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        let dropped = crate::telemetry::dropped_log_lines();
        let counted = self.log_lines_dropped.get();
        if dropped > counted {
            self.log_lines_dropped.inc_by(dropped - counted);
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The three caches' counters are taken at start-up, so a lookup
    /// updates the exported series without a label lookup, and the
    /// series are there, at zero, before the first lookup.
    #[test]
    fn cache_counters_are_the_exported_series() {
        let metrics = Metrics::new();
        let series = |cache: &str, result: &str| {
            let text = metrics.encode();
            let name =
                format!(r#"kongtie_cache_lookups_total{{cache="{cache}",result="{result}"}} "#);
            text.lines()
                .find_map(|l| l.strip_prefix(name.as_str()).map(str::to_owned))
                .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        };
        assert_eq!(series("jsapi_ticket", "miss"), "0");
        metrics.cache_lookup("access_token", true);
        metrics.cache_lookup("access_token", true);
        metrics.cache_lookup("oauth_code", false);
        assert_eq!(series("access_token", "hit"), "2");
        assert_eq!(series("oauth_code", "miss"), "1");
        assert_eq!(series("access_token", "miss"), "0");
        let taken: Vec<_> = metrics.cache_counters.iter().map(|(n, _, _)| *n).collect();
        assert_eq!(taken, ["access_token", "jsapi_ticket", "oauth_code"]);
    }
}
