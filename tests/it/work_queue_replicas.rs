//! One work queue shared by workers on two gateway processes over one
//! PostgreSQL database: notifications posted during the run are drained,
//! each acknowledged once and held by one worker at a time; killing a
//! replica mid-run loses no event and no acknowledgement.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use kongtie_gateway::proto::{
    AckNotificationsRequest, CreateConsumerRequest, DeliverPolicy, FetchNotificationsRequest,
    GetConsumerRequest, payment_client::PaymentClient,
};
use tokio::{sync::watch, time::Instant};
use tonic::transport::Channel;

use crate::{
    helpers::{Binary, KTAPI_TOKEN, admin_metrics, payment_notification, sample},
    pg::PgDatabase,
};

fn replica(db: &PgDatabase) -> Binary {
    Binary::start(&["serve", "--store", &db.url])
}

/// One delivery to one worker, and what its ack did.
#[derive(Debug, Clone)]
struct Delivery {
    worker: usize,
    /// Which of the worker's replicas answered the ack.
    via: usize,
    sequence: u64,
    delivery_count: u32,
    fetched: Instant,
    acked: Instant,
    /// The ack answered that it acknowledged the event (false: it had been
    /// before, or the answer was lost to a killed replica and resent).
    newly: bool,
}

async fn connect(addr: &str) -> Option<PaymentClient<Channel>> {
    PaymentClient::connect(format!("http://{addr}")).await.ok()
}

/// A worker: fetch, process, ack one by one, until `done`; on an error it
/// moves to the next of `addrs` (its replica was killed).
async fn work(
    worker: usize,
    addrs: Vec<String>,
    consumer: &'static str,
    mut done: watch::Receiver<bool>,
) -> Vec<Delivery> {
    let mut log = Vec::new();
    let mut at = 0;
    let mut client = connect(&addrs[at])
        .await
        .expect("the first replica answers");
    let next = |at: &mut usize| {
        *at = (*at + 1) % addrs.len();
        addrs[*at].clone()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !*done.borrow() {
        assert!(Instant::now() < deadline, "worker {worker} ran for 120 s");
        let fetched = tokio::select! {
            r = client.fetch_notifications(FetchNotificationsRequest {
                consumer: consumer.into(),
                max_events: 10,
                wait: Some(prost_types::Duration { seconds: 1, nanos: 0 }),
            }) => r,
            _ = done.changed() => break,
        };
        let events = match fetched {
            Ok(r) => r.into_inner().events,
            Err(_) => {
                if let Some(c) = connect(&next(&mut at)).await {
                    client = c;
                }
                continue;
            }
        };
        let now = Instant::now();
        for e in events {
            let sequence = e.notification.unwrap().sequence;
            // Processing the event happens here; then its ack, resent to
            // another replica if this one fails.
            let newly = loop {
                let acked = client
                    .ack_notifications(AckNotificationsRequest {
                        consumer: consumer.into(),
                        sequences: vec![sequence],
                        ..Default::default()
                    })
                    .await;
                match acked {
                    Ok(r) => break r.into_inner().newly_acked == 1,
                    Err(_) => {
                        if let Some(c) = connect(&next(&mut at)).await {
                            client = c;
                        }
                    }
                }
            };
            log.push(Delivery {
                worker,
                via: at,
                sequence,
                delivery_count: e.delivery_count,
                fetched: now,
                acked: Instant::now(),
                newly,
            });
        }
    }
    log
}

/// Posts `ids` to the notify URLs, round robin, 8 at a time; each one
/// answered `success` is counted.
async fn post_all(urls: Vec<String>, ids: Vec<String>) -> usize {
    let http = reqwest::Client::new();
    let acknowledged = Arc::new(AtomicUsize::new(0));
    futures::stream::iter(ids.into_iter().enumerate())
        .for_each_concurrent(8, |(i, id)| {
            let (http, url, acknowledged) = (
                http.clone(),
                urls[i % urls.len()].clone(),
                Arc::clone(&acknowledged),
            );
            async move {
                let body = payment_notification(&id, KTAPI_TOKEN);
                let resp = http.post(&url).body(body).send().await.unwrap();
                assert_eq!(resp.text().await.unwrap(), "success", "{id}");
                acknowledged.fetch_add(1, Ordering::Relaxed);
            }
        })
        .await;
    acknowledged.load(Ordering::Relaxed)
}

async fn create(addr: &str, name: &str, ack_wait_s: i64) {
    connect(addr)
        .await
        .unwrap()
        .create_consumer(CreateConsumerRequest {
            name: name.into(),
            deliver_policy: DeliverPolicy::All as i32,
            ack_wait: Some(prost_types::Duration {
                seconds: ack_wait_s,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// Waits until the consumer has everything of `total` acknowledged, for 120
/// s at most.
async fn until_drained(addr: &str, name: &str, total: u64) -> kongtie_gateway::proto::Consumer {
    let mut client = connect(addr).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let c = client
            .get_consumer(GetConsumerRequest { name: name.into() })
            .await
            .unwrap()
            .into_inner()
            .consumer
            .unwrap();
        if c.acked_sequence == total && c.pending == 0 {
            return c;
        }
        assert!(Instant::now() < deadline, "not drained in 120 s: {c:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// No two deliveries of one event overlap in time (each from its fetch to
/// its ack).
fn assert_held_by_one_at_a_time(log: &[Delivery]) {
    let mut by_sequence: HashMap<u64, Vec<&Delivery>> = HashMap::new();
    for d in log {
        by_sequence.entry(d.sequence).or_default().push(d);
    }
    for (sequence, mut ds) in by_sequence {
        ds.sort_by_key(|d| d.fetched);
        for pair in ds.windows(2) {
            assert!(
                pair[0].acked <= pair[1].fetched || pair[0].worker == pair[1].worker,
                "event {sequence} held by workers {} and {} at once",
                pair[0].worker,
                pair[1].worker
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_workers_on_two_replicas_drain_3000_notifications_each_acked_once() {
    let db = PgDatabase::create().await;
    let (a, b) = (replica(&db), replica(&db));
    create(&a.grpc, "fulfil", 30).await;
    let (done_tx, done) = watch::channel(false);
    let workers: Vec<_> = [(0, &a), (1, &a), (2, &b)]
        .into_iter()
        .map(|(i, r)| tokio::spawn(work(i, vec![r.grpc.clone()], "fulfil", done.clone())))
        .collect();
    let ids: Vec<String> = (0..3000).map(|i| format!("WQ{i}")).collect();
    let posted = post_all(vec![a.notify_url(), b.notify_url()], ids).await;
    assert_eq!(posted, 3000);
    let consumer = until_drained(&b.grpc, "fulfil", 3000).await;
    done_tx.send(true).unwrap();
    let mut log = Vec::new();
    for w in workers {
        log.extend(w.await.unwrap());
    }

    assert_eq!((consumer.lag, consumer.parked), (0, 0));
    let mut acked: HashMap<u64, usize> = HashMap::new();
    for d in log.iter().filter(|d| d.newly) {
        *acked.entry(d.sequence).or_default() += 1;
    }
    assert_eq!(acked.len(), 3000, "every event acknowledged");
    assert!(acked.values().all(|&n| n == 1), "each exactly once");
    assert!(
        log.iter().all(|d| d.delivery_count == 1),
        "none delivered twice"
    );
    assert_held_by_one_at_a_time(&log);
    let per_worker: Vec<usize> = (0..3)
        .map(|w| log.iter().filter(|d| d.worker == w).count())
        .collect();
    assert!(
        per_worker.iter().all(|&n| n >= 150),
        "the work is spread: {per_worker:?}"
    );
    println!("events per worker (A, A, B): {per_worker:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_mid_run_loses_no_event_and_no_ack() {
    let db = PgDatabase::create().await;
    let (mut a, b) = (replica(&db), replica(&db));
    create(&a.grpc, "fulfil", 3).await;
    let (done_tx, done) = watch::channel(false);
    // Two workers on A (then on B once A is gone), one on B.
    let (on_a, on_b) = (vec![a.grpc.clone(), b.grpc.clone()], vec![b.grpc.clone()]);
    let workers: Vec<_> = [(0, &on_a), (1, &on_a), (2, &on_b)]
        .into_iter()
        .map(|(i, addrs)| tokio::spawn(work(i, addrs.clone(), "fulfil", done.clone())))
        .collect();
    let ids: Vec<String> = (0..1000).map(|i| format!("KR{i}")).collect();
    let poster = tokio::spawn(post_all(vec![b.notify_url()], ids));
    // Mid-run: once B has stored a third, A is SIGKILLed.
    let deadline = Instant::now() + Duration::from_secs(60);
    let stored = "kongtie_notifications_received_total{outcome=\"stored\"}";
    while sample(&admin_metrics(&b.admin).await, stored) < 333.0 {
        assert!(Instant::now() < deadline, "B stored too slowly");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    assert_eq!(poster.await.unwrap(), 1000);
    let consumer = until_drained(&b.grpc, "fulfil", 1000).await;
    done_tx.send(true).unwrap();
    let mut log = Vec::new();
    for w in workers {
        log.extend(w.await.unwrap());
    }

    assert_eq!((consumer.lag, consumer.parked), (0, 0));
    // Every event was processed; an acknowledged one never came back.
    let mut by_sequence: HashMap<u64, Vec<&Delivery>> = HashMap::new();
    for d in &log {
        by_sequence.entry(d.sequence).or_default().push(d);
    }
    assert_eq!(by_sequence.len(), 1000, "every event delivered");
    for (sequence, ds) in &by_sequence {
        let first_ack = ds.iter().map(|d| d.acked).min().unwrap();
        assert!(
            ds.iter().all(|d| d.fetched <= first_ack),
            "event {sequence} was delivered again after its ack was answered"
        );
    }
    assert!(log.iter().filter(|d| d.newly).count() <= 1000);
    assert!(
        log.iter().any(|d| d.worker < 2 && d.via == 0)
            && log.iter().any(|d| d.worker < 2 && d.via == 1),
        "A's workers worked on A, then on B"
    );
    assert_held_by_one_at_a_time(&log);
    let redelivered = log.iter().filter(|d| d.delivery_count > 1).count();
    println!(
        "deliveries: {}, redelivered after A died: {redelivered}",
        log.len()
    );
}
