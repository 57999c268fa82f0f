//! Notification benchmarks, each beside a baseline measured in the same run
//! (this machine is shared and noisy: read the ratios).
//!
//! 1. Intake rate: durable notify intake on SQLite and on PostgreSQL
//!    against a bare axum handler that just answers `success`, driven by the
//!    same load generator.
//! 2. Latency from `success` to a subscriber's receipt, p50/p99, with 100
//!    subscribers, beside the round trip of one POST to the bare handler.
//! 3. Latency across replicas: two gateways on one PostgreSQL database, a
//!    subscriber on each, notifications posted to the first.
//! 4. Memory per idle subscriber, from the binary's RSS.
//! 5. Intake with retention sweeps deleting all the while (1 s retention,
//!    a sweep every 200 ms) against intake with none (`--retention 0`),
//!    SQLite and PostgreSQL, in alternating rounds.
//!
//! Run: `cargo bench --bench notify` (KONGTIE_BENCH_SECS sets the length of
//! each intake round, default 5; KONGTIE_BENCH_CONNECTIONS the load
//! generator's connections, default 64). PostgreSQL as for the tests: the
//! local server, or `KONGTIE_TEST_DATABASE_URL`; each round gets a fresh
//! database.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, body::Bytes, routing::post};
use futures::StreamExt;
use kongtie_gateway::proto::{SubscribeNotificationsRequest, payment_client::PaymentClient};
use tokio::net::TcpListener;

mod common;
#[path = "../tests/it/pg.rs"]
mod pg;
use common::{BENCH_TOKEN, FREE_PORTS, Gateway, body, gateway, ms, percentile};
use pg::PgDatabase;

fn connections() -> usize {
    std::env::var("KONGTIE_BENCH_CONNECTIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64)
}

/// The load generator: `connections()` keep-alive connections, each posting
/// distinct signed notifications back to back for `secs`. Returns answers
/// of `200 success` per second.
async fn drive(url: &str, secs: f64, first: &AtomicU64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let ok = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..connections())
        .map(|_| {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()
                .unwrap();
            let (url, ok) = (url.to_owned(), Arc::clone(&ok));
            let start = first.fetch_add(10_000_000, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut n = start;
                while Instant::now() < deadline {
                    n += 1;
                    let resp = client.post(&url).body(body(n)).send().await.unwrap();
                    let success = resp.status().as_u16() == 200;
                    if success && resp.text().await.unwrap() == "success" {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let started = Instant::now();
    for t in tasks {
        t.await.unwrap();
    }
    ok.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

async fn bare_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route("/notify", post(|_: Bytes| async { "success" }));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Which store a gateway of the bench uses.
#[derive(Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

/// Subscribes to `grpc` on a connection of its own, and records when each
/// of the next `events` notifications arrives: (sequence, when).
async fn receipts(grpc: SocketAddr, events: usize) -> tokio::task::JoinHandle<Vec<(u64, Instant)>> {
    let mut stream = PaymentClient::connect(format!("http://{grpc}"))
        .await
        .unwrap()
        .subscribe_notifications(SubscribeNotificationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    tokio::spawn(async move {
        let mut seen = Vec::with_capacity(events);
        while seen.len() < events {
            let n = stream.next().await.unwrap().unwrap();
            seen.push((n.sequence, Instant::now()));
        }
        seen
    })
}

async fn intake(secs: f64) {
    println!(
        "## Intake rate ({} connections, {secs} s a round)",
        connections()
    );
    let bare = format!("http://{}/notify", bare_server().await);
    let ids = AtomicU64::new(0);
    let mut ratios = [Vec::new(), Vec::new()];
    for round in 1..=3 {
        let base = drive(&bare, secs, &ids).await;
        let mut rates = [0.0; 2];
        let mut commits = [(0.0, 0.0, 0.0); 2];
        for (i, backend) in [Backend::Sqlite, Backend::Postgres].into_iter().enumerate() {
            let db = match backend {
                Backend::Sqlite => None,
                Backend::Postgres => Some(PgDatabase::create().await),
            };
            let gw = gateway(db.as_ref().map(|db| db.url.as_str())).await;
            rates[i] = drive(&gw.notify_url, secs, &ids).await;
            ratios[i].push(rates[i] / base);
            commits[i] = gw.commits().await;
        }
        println!(
            "round {round}: bare axum {base:>8.0}/s   SQLite {:>7.0}/s ({:.2})   PostgreSQL {:>7.0}/s ({:.2})",
            rates[0],
            rates[0] / base,
            rates[1],
            rates[1] / base,
        );
        for (name, (n, size, ms)) in ["SQLite", "PostgreSQL"].into_iter().zip(commits) {
            println!(
                "         {name}: {n:.0} commits, {size:.1} notifications and {ms:.2} ms each"
            );
        }
    }
    for r in &mut ratios {
        r.sort_by(f64::total_cmp);
    }
    println!(
        "median ratio to bare: SQLite {:.2}, PostgreSQL {:.2}\n",
        ratios[0][1], ratios[1][1]
    );
}

/// Intake with sweeps running against without, same run, alternating.
async fn retention(secs: f64) {
    println!(
        "## Intake with retention sweeps ({} connections, {secs} s a round)",
        connections()
    );
    let ids = AtomicU64::new(0);
    // Below the retention floor: the test-only override says so.
    let sweeping: &[&str] = &[
        "--retention",
        "1s",
        "--retention-sweep-every",
        "200ms",
        "--unsafe-test-only-short-retention",
    ];
    let mut ratios = [Vec::new(), Vec::new()];
    for round in 1..=3 {
        for (i, backend) in [Backend::Sqlite, Backend::Postgres].into_iter().enumerate() {
            let mut rates = [0.0; 2];
            let (mut deleted, mut sweeps) = (0.0, 0.0);
            for (j, extra) in [&["--retention", "0"][..], sweeping]
                .into_iter()
                .enumerate()
            {
                let db = match backend {
                    Backend::Sqlite => None,
                    Backend::Postgres => Some(PgDatabase::create().await),
                };
                let gw = common::gateway_with(extra, db.as_ref().map(|db| db.url.as_str())).await;
                rates[j] = drive(&gw.notify_url, secs, &ids).await;
                if j == 1 {
                    deleted = gw
                        .metric(r#"kongtie_retention_deleted_total{kind="notification"}"#)
                        .await;
                    sweeps = gw.metric("kongtie_retention_sweeps_total").await;
                }
            }
            ratios[i].push(rates[1] / rates[0]);
            println!(
                "round {round}: {:<10} no sweeps {:>7.0}/s   sweeping {:>7.0}/s ({:.2}; {sweeps:.0} sweeps deleted {deleted:.0} rows during it)",
                ["SQLite", "PostgreSQL"][i],
                rates[0],
                rates[1],
                rates[1] / rates[0],
            );
            assert!(deleted > 0.0, "the sweeps deleted nothing");
        }
    }
    for r in &mut ratios {
        r.sort_by(f64::total_cmp);
    }
    println!(
        "median ratio sweeping / no sweeps: SQLite {:.2}, PostgreSQL {:.2}\n",
        ratios[0][1], ratios[1][1]
    );
}

impl Gateway {
    /// One sample of the gateway's metrics (0 when absent).
    async fn metric(&self, series: &str) -> f64 {
        let text = reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Commits so far: (how many, mean notifications per commit, mean
    /// milliseconds per commit), from the gateway's own metrics.
    async fn commits(&self) -> (f64, f64, f64) {
        let commits = self.metric("kongtie_store_commit_seconds_count").await;
        let per = |sum: f64| if commits > 0.0 { sum / commits } else { 0.0 };
        (
            commits,
            per(self.metric("kongtie_store_commit_batch_size_sum").await),
            per(self.metric("kongtie_store_commit_seconds_sum").await) * 1000.0,
        )
    }
}

/// Two gateways on one PostgreSQL database; a subscriber on each; one
/// notification at a time posted to the first.
async fn across_replicas() {
    const EVENTS: usize = 300;
    println!(
        "## Latency across replicas (PostgreSQL, {EVENTS} notifications posted to replica A one at a time)"
    );
    let db = PgDatabase::create().await;
    let (a, b) = (gateway(Some(&db.url)).await, gateway(Some(&db.url)).await);
    let mut receivers = Vec::new();
    for gw in [&a, &b] {
        receivers.push(receipts(gw.grpc, EVENTS).await);
    }
    let client = reqwest::Client::new();
    let mut posted = Vec::with_capacity(EVENTS);
    for n in 0..EVENTS as u64 {
        posted.push(Instant::now());
        let resp = client
            .post(&a.notify_url)
            .body(body(n))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.text().await.unwrap(), "success");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut p50s = Vec::new();
    for (name, r) in ["A (same replica)", "B (other replica)"]
        .into_iter()
        .zip(receivers)
    {
        let mut after_post: Vec<Duration> = r
            .await
            .unwrap()
            .into_iter()
            .map(|(sequence, at)| at - posted[sequence as usize - 1])
            .collect();
        after_post.sort();
        let (p50, p99) = (percentile(&after_post, 0.5), percentile(&after_post, 0.99));
        println!(
            "POST to A sent -> receipt on {name}: p50 {:.3} ms, p99 {:.3} ms",
            ms(p50),
            ms(p99)
        );
        p50s.push(ms(p50));
    }
    println!("ratio B/A at p50: {:.2}\n", p50s[1] / p50s[0]);
}

async fn latency() {
    const SUBSCRIBERS: usize = 100;
    const EVENTS: usize = 500;
    println!(
        "## Latency, `success` to subscriber receipt ({SUBSCRIBERS} subscribers, {EVENTS} notifications, one at a time)"
    );
    let gw = gateway(None).await;
    let mut receivers = Vec::new();
    for _ in 0..SUBSCRIBERS {
        receivers.push(receipts(gw.grpc, EVENTS).await);
    }
    let client = reqwest::Client::new();
    let mut posted = Vec::with_capacity(EVENTS);
    let mut answered = Vec::with_capacity(EVENTS);
    for n in 0..EVENTS as u64 {
        posted.push(Instant::now());
        let resp = client
            .post(&gw.notify_url)
            .body(body(n))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.text().await.unwrap(), "success");
        answered.push(Instant::now());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Signed: an event is published at commit, so a subscriber often has it
    // before the HTTP answer reaches Kongtie (a negative latency).
    let signed_ms = |from: Instant, to: Instant| match to.checked_duration_since(from) {
        Some(d) => ms(d),
        None => -ms(from.duration_since(to)),
    };
    let mut after_success = Vec::new();
    let mut after_post = Vec::new();
    for r in receivers {
        for (sequence, at) in r.await.unwrap() {
            let i = sequence as usize - 1;
            after_success.push(signed_ms(answered[i], at));
            after_post.push(signed_ms(posted[i], at));
        }
    }
    after_success.sort_by(f64::total_cmp);
    after_post.sort_by(f64::total_cmp);
    let pct = |v: &[f64], p: f64| v[((v.len() - 1) as f64 * p).round() as usize];

    let bare = format!("http://{}/notify", bare_server().await);
    let mut rtt = Vec::new();
    for n in 0..EVENTS as u64 {
        let started = Instant::now();
        client
            .post(&bare)
            .body(body(n))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        rtt.push(started.elapsed());
    }
    rtt.sort();
    let (b50, b99) = (ms(percentile(&rtt, 0.5)), ms(percentile(&rtt, 0.99)));
    println!(
        "`success` answered -> subscriber receipt: p50 {:.3} ms, p99 {:.3} ms ({} receipts)",
        pct(&after_success, 0.5),
        pct(&after_success, 0.99),
        after_success.len()
    );
    let (e50, e99) = (pct(&after_post, 0.5), pct(&after_post, 0.99));
    println!("POST sent -> subscriber receipt:        p50 {e50:.3} ms, p99 {e99:.3} ms");
    println!("baseline, POST round trip to the bare handler: p50 {b50:.3} ms, p99 {b99:.3} ms");
    println!(
        "ratio (sent -> receipt) / bare round trip: p50 {:.1}, p99 {:.1}\n",
        e50 / b50,
        e99 / b99
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

async fn memory() {
    const IDLE: usize = 1000;
    println!(
        "## Memory per idle subscriber ({IDLE} subscriptions over 10 connections, the release binary)"
    );
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_kongtie-gateway"))
        .arg("serve")
        .args(["--token", BENCH_TOKEN])
        .args(FREE_PORTS)
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed however this function ends.
    let mut child = KillOnDrop(child);
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let grpc = loop {
        let line = lines.next().unwrap().unwrap();
        if line.contains("gRPC listening") {
            let addr = line.split("addr=").nth(1).unwrap();
            break addr.split_whitespace().next().unwrap().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let pid = child.0.id();
    // Warm up one subscription so lazily built state is in the baseline.
    let channel = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let warm = PaymentClient::new(channel.clone())
        .subscribe_notifications(SubscribeNotificationsRequest::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid);
    let mut streams = vec![warm];
    let mut channels = vec![channel];
    for _ in 1..10 {
        channels.push(
            tonic::transport::Channel::from_shared(format!("http://{grpc}"))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    for i in 0..IDLE {
        streams.push(
            PaymentClient::new(channels[i % 10].clone())
                .subscribe_notifications(SubscribeNotificationsRequest::default())
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid);
    println!("binary RSS with 1 subscriber: {before} KiB (the baseline)");
    println!("binary RSS with {} subscribers: {after} KiB", IDLE + 1);
    println!(
        "per idle subscriber: {:.1} KiB ({:.1}% of the baseline process per 1000 subscribers)\n",
        after.saturating_sub(before) as f64 / IDLE as f64,
        after.saturating_sub(before) as f64 / before as f64 * 100.0
    );
    drop(streams);
    drop(child);
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    // `cargo bench` passes --bench; nothing else is taken.
    let secs: f64 = std::env::var("KONGTIE_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // KONGTIE_BENCH_ONLY=intake (or latency, replicas, memory) runs one.
        let only = std::env::var("KONGTIE_BENCH_ONLY").unwrap_or_default();
        let runs = |name: &str| only.is_empty() || only == name;
        if runs("intake") {
            intake(secs).await;
        }
        if runs("latency") {
            latency().await;
        }
        if runs("replicas") {
            across_replicas().await;
        }
        if runs("memory") {
            memory().await;
        }
        if runs("retention") {
            retention(secs).await;
        }
    });
}
