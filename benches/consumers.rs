//! Work-queue consumer benchmarks, each beside a baseline measured in the
//! same run (this machine is shared and noisy: read the ratios).
//!
//! 1. Fetch wake: a `FetchNotifications` long-poll waits on replica A; a
//!    notification is POSTed to A (the same replica) or, on PostgreSQL, to
//!    B (another replica). Measured: from the POST's `success` (which
//!    follows its commit) to the fetch's answer, p50/p99, beside the POST's
//!    own round trip.
//! 2. Throughput: three workers (two on A, one on B; fetch up to 10, ack
//!    one by one, then each batch in one call) drain notifications posted by
//!    16 senders, against the intake rate of the same run.
//!
//! Run: `cargo bench --bench consumers` (KONGTIE_BENCH_WAKES sets the
//! wake-ups measured, default 200; KONGTIE_BENCH_EVENTS the events drained,
//! default 3000). PostgreSQL as for the tests.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt;
use kongtie_gateway::proto::{
    AckNotificationsRequest, CreateConsumerRequest, DeliverPolicy, FetchNotificationsRequest,
    payment_client::PaymentClient,
};
use tonic::transport::Channel;

mod common;
#[path = "../tests/it/pg.rs"]
mod pg;
use common::{Gateway, body, gateway, ms, percentile};
use pg::PgDatabase;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

async fn client(grpc: SocketAddr) -> PaymentClient<Channel> {
    PaymentClient::connect(format!("http://{grpc}"))
        .await
        .unwrap()
}

async fn create(grpc: SocketAddr, name: &str) {
    client(grpc)
        .await
        .create_consumer(CreateConsumerRequest {
            name: name.into(),
            deliver_policy: DeliverPolicy::New as i32,
            ack_wait: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
}

fn fetch_request(consumer: &str, max_events: u32) -> FetchNotificationsRequest {
    FetchNotificationsRequest {
        consumer: consumer.into(),
        max_events,
        wait: Some(prost_types::Duration {
            seconds: 10,
            nanos: 0,
        }),
    }
}

async fn acks(payment: &mut PaymentClient<Channel>, consumer: &str, sequences: Vec<u64>) {
    payment
        .ack_notifications(AckNotificationsRequest {
            consumer: consumer.into(),
            sequences,
            ..Default::default()
        })
        .await
        .unwrap();
}

fn summary(name: &str, mut d: Vec<Duration>) -> f64 {
    d.sort();
    let (p50, p99) = (percentile(&d, 0.5), percentile(&d, 0.99));
    println!("{name}: p50 {:.3} ms, p99 {:.3} ms", ms(p50), ms(p99));
    ms(p99)
}

/// Wake-ups of a fetch waiting on `waiter`, each by a notification posted to
/// `poster`.
async fn wakes(label: &str, waiter: &Gateway, poster: &Gateway, first: u64) {
    let n = env("KONGTIE_BENCH_WAKES", 200);
    let consumer = format!("wake{first}");
    create(waiter.grpc, &consumer).await;
    let http = reqwest::Client::new();
    let mut payment = client(waiter.grpc).await;
    let (mut round_trips, mut wakes) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n as u64 {
        let mut fetching = payment.clone();
        let request = fetch_request(&consumer, 1);
        let waiting = tokio::spawn(async move {
            let events = fetching
                .fetch_notifications(request)
                .await
                .unwrap()
                .into_inner()
                .events;
            (events, Instant::now())
        });
        // Let the fetch find nothing and wait.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let sent = Instant::now();
        let resp = http
            .post(&poster.notify_url)
            .body(body(first + i))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.text().await.unwrap(), "success");
        let answered = Instant::now();
        let (events, woken) = waiting.await.unwrap();
        assert_eq!(events.len(), 1, "the fetch got the event");
        round_trips.push(answered - sent);
        wakes.push(woken.saturating_duration_since(answered));
        let sequence = events[0].notification.as_ref().unwrap().sequence;
        acks(&mut payment, &consumer, vec![sequence]).await;
    }
    println!("### {label} ({n} wake-ups)");
    summary(
        "baseline: POST round trip (commit, then `success`)",
        round_trips,
    );
    let p99 = summary("`success` -> the waiting fetch answers", wakes);
    println!(
        "wake p99 {} 50 ms\n",
        if p99 <= 50.0 { "within" } else { "OVER" }
    );
}

/// Three workers drain `n` events posted by 16 senders, acking one by one
/// (or each fetched batch in one call), and print that rate beside the
/// intake rate.
async fn throughput(label: &str, a: &Gateway, b: &Gateway, first: u64, batch: bool) {
    let n = env("KONGTIE_BENCH_EVENTS", 3000);
    let consumer = format!("drain{first}");
    create(a.grpc, &consumer).await;
    let acked = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = [a.grpc, a.grpc, b.grpc]
        .into_iter()
        .map(|grpc| {
            let (consumer, acked) = (consumer.clone(), Arc::clone(&acked));
            tokio::spawn(async move {
                let mut payment = client(grpc).await;
                while acked.load(Ordering::Relaxed) < n as u64 {
                    let events = payment
                        .fetch_notifications(FetchNotificationsRequest {
                            wait: Some(prost_types::Duration {
                                seconds: 0,
                                nanos: 200_000_000,
                            }),
                            ..fetch_request(&consumer, 10)
                        })
                        .await
                        .unwrap()
                        .into_inner()
                        .events;
                    let sequences: Vec<u64> = events
                        .into_iter()
                        .map(|e| e.notification.unwrap().sequence)
                        .collect();
                    if batch && !sequences.is_empty() {
                        acks(&mut payment, &consumer, sequences.clone()).await;
                    } else {
                        for &s in &sequences {
                            acks(&mut payment, &consumer, vec![s]).await;
                        }
                    }
                    acked.fetch_add(sequences.len() as u64, Ordering::Relaxed);
                }
                Instant::now()
            })
        })
        .collect();
    let http = reqwest::Client::new();
    let urls = [a.notify_url.clone(), b.notify_url.clone()];
    futures::stream::iter(0..n as u64)
        .for_each_concurrent(16, |i| {
            let (http, url) = (http.clone(), urls[i as usize % 2].clone());
            async move {
                let resp = http.post(&url).body(body(first + i)).send().await.unwrap();
                assert_eq!(resp.text().await.unwrap(), "success");
            }
        })
        .await;
    let intake = started.elapsed();
    let mut drained = started;
    for w in workers {
        drained = drained.max(w.await.unwrap());
    }
    let drained = drained - started;
    let (intake_rate, drain_rate) = (
        n as f64 / intake.as_secs_f64(),
        n as f64 / drained.as_secs_f64(),
    );
    println!("### {label} ({n} events)");
    println!("intake (16 senders): {intake_rate:.0} events/s");
    let how = if batch {
        "each batch in one ack"
    } else {
        "one by one"
    };
    println!("three workers, acking {how}: {drain_rate:.0} events/s");
    println!("ratio drained/intake: {:.2}\n", drain_rate / intake_rate);
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!("## Work-queue consumers\n");
        let sqlite = gateway(None).await;
        wakes("SQLite, same replica", &sqlite, &sqlite, 1_000_000).await;
        let one_gateway = "SQLite, three workers on one gateway";
        throughput(one_gateway, &sqlite, &sqlite, 2_000_000, false).await;
        throughput(one_gateway, &sqlite, &sqlite, 2_500_000, true).await;

        let db = PgDatabase::create().await;
        let (a, b) = (gateway(Some(&db.url)).await, gateway(Some(&db.url)).await);
        wakes("PostgreSQL, same replica", &a, &a, 3_000_000).await;
        let across = "PostgreSQL, across replicas (posted to B)";
        wakes(across, &a, &b, 4_000_000).await;
        let two_replicas = "PostgreSQL, two workers on A, one on B";
        throughput(two_replicas, &a, &b, 5_000_000, false).await;
        throughput(two_replicas, &a, &b, 5_500_000, true).await;
    });
}
