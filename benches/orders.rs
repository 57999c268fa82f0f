//! CreateJsapiOrder through the ledger, beside its baseline measured in the
//! same run: the bare ParTrade round trip to the sandbox (the gateway's own
//! Kongtie client, no gRPC, no ledger).
//!
//! For each backend (SQLite, and PostgreSQL on the local server), one call
//! at a time: p50/p99 of the bare round trip, of a first call (ledger
//! write, ParTrade, ledger write) and of an idempotent replay (one ledger
//! read). A replay must cost no upstream call (the sandbox's ParTrade count
//! does not move) and no write (SQLite: the WAL does not grow; PostgreSQL:
//! the database's committed-transaction count does not move beyond the
//! reads' own).
//!
//! Run: `cargo bench --bench orders` (KONGTIE_BENCH_ORDERS sets the calls
//! per measurement, default 300).

use std::time::{Duration, Instant};

use chrono::Utc;
use clap::Parser;
use kongtie_gateway::{
    config::{Cli, Command as Cmd, sandbox_config},
    domain::{AmountFen, NewOrder, OpenId, OutTradeId},
    proto::{CreateJsapiOrderRequest, payment_client::PaymentClient},
    sandbox::SandboxHandle,
    startup::Application,
    upstream::{Endpoint, KongtieClient},
};
use tokio::{net::TcpListener, sync::oneshot};

#[path = "../tests/it/pg.rs"]
mod pg;
use pg::PgDatabase;

const TOKEN: &str = "bench-token";
const OPENID: &str = "oeQDZtzvDoD-OmTmyJH6rGAX8odc";

fn calls() -> usize {
    std::env::var("KONGTIE_BENCH_ORDERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// p50 and p99 of the durations.
fn summary(mut d: Vec<Duration>) -> (f64, f64) {
    d.sort();
    (ms(percentile(&d, 0.5)), ms(percentile(&d, 0.99)))
}

fn serve_args(extra: &[&str]) -> kongtie_gateway::config::ServeArgs {
    let args = [
        "kongtie-gateway",
        "serve",
        "--token",
        TOKEN,
        "--grpc-addr",
        "127.0.0.1:0",
        "--notify-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
    ]
    .into_iter()
    .chain(extra.iter().copied());
    let Cmd::Serve(args) = Cli::try_parse_from(args).unwrap().command else {
        unreachable!()
    };
    *args
}

async fn run(backend: &str, store_url: String) {
    let args = serve_args(&[]);
    let sandbox = SandboxHandle::spawn(
        sandbox_config(&args.kongtie, "wxbench".into(), Duration::from_secs(7200)),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .unwrap();
    let mut config = args.config().unwrap();
    config.upstream.ktapi_url = sandbox.ktapi_url();
    config.upstream.pay_url = sandbox.pay_url();
    config.store_url = store_url.clone();
    let client = KongtieClient::new(config.upstream.clone(), None).unwrap();
    let app = Application::build(config).await.unwrap();
    let grpc = app.grpc_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    let mut payment = PaymentClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let n = calls();

    // Warm up every path.
    for i in 0..20 {
        let id = format!("W{i}");
        payment.create_jsapi_order(request(&id)).await.unwrap();
        payment.create_jsapi_order(request(&id)).await.unwrap();
        client
            .create_order(&new_order(&format!("X{i}")), None)
            .await
            .unwrap();
    }

    let mut bare = Vec::with_capacity(n);
    let mut first = Vec::with_capacity(n);
    let mut replay = Vec::with_capacity(n);
    // Interleaved, so the three see the same machine.
    for i in 0..n {
        let started = Instant::now();
        client
            .create_order(&new_order(&format!("R{i}")), None)
            .await
            .unwrap();
        bare.push(started.elapsed());
        let id = format!("F{i}");
        let started = Instant::now();
        payment.create_jsapi_order(request(&id)).await.unwrap();
        first.push(started.elapsed());
    }
    let partrades = sandbox.calls(Endpoint::ParTrade);
    let writes_before = writes(&store_url).await;
    for i in 0..n {
        let started = Instant::now();
        payment
            .create_jsapi_order(request(&format!("F{i}")))
            .await
            .unwrap();
        replay.push(started.elapsed());
    }
    let writes_after = writes(&store_url).await;
    let replay_partrades = sandbox.calls(Endpoint::ParTrade) - partrades;

    let (bare_p50, bare_p99) = summary(bare);
    let (first_p50, first_p99) = summary(first);
    let (replay_p50, replay_p99) = summary(replay);
    println!(
        "| {backend} | {bare_p50:.2} / {bare_p99:.2} | {first_p50:.2} / {first_p99:.2} | {:.2} | \
         {replay_p50:.2} / {replay_p99:.2} | {:.2} | {replay_partrades} | {} |",
        first_p50 / bare_p50,
        replay_p50 / bare_p50,
        writes_after.describe(&writes_before),
    );
    drop(stop);
    let _ = done.await;
    sandbox.shutdown().await;
}

/// What a store had written so far: SQLite's WAL size, or PostgreSQL's
/// committed transactions and WAL position.
enum Writes {
    Sqlite(u64),
    Postgres { xact_commit: i64, wal_lsn: String },
}

impl Writes {
    fn describe(&self, before: &Writes) -> String {
        match (before, self) {
            (Writes::Sqlite(a), Writes::Sqlite(b)) => format!("WAL {a} -> {b} bytes"),
            (
                Writes::Postgres {
                    xact_commit: a,
                    wal_lsn: la,
                },
                Writes::Postgres {
                    xact_commit: b,
                    wal_lsn: lb,
                },
            ) => format!("commits +{} (reads), WAL {la} -> {lb}", b - a),
            _ => unreachable!(),
        }
    }
}

async fn writes(store_url: &str) -> Writes {
    if let Some(path) = store_url.strip_prefix("sqlite://") {
        let wal = format!("{path}-wal");
        return Writes::Sqlite(std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0));
    }
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(store_url)
        .await
        .unwrap();
    // Statistics are flushed lazily: ask for a fresh snapshot.
    let _ = sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut conn)
        .await;
    let xact_commit: i64 = sqlx::query_scalar(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let wal_lsn: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    Writes::Postgres {
        xact_commit,
        wal_lsn,
    }
}

fn request(id: &str) -> CreateJsapiOrderRequest {
    CreateJsapiOrderRequest {
        out_trade_id: id.into(),
        amount_fen: 100,
        openid: OPENID.into(),
        expires_at: None,
    }
}

fn new_order(id: &str) -> NewOrder {
    NewOrder {
        out_trade_id: OutTradeId::parse(id).unwrap(),
        amount: AmountFen::parse(100, i64::MAX).unwrap(),
        openid: OpenId::parse(OPENID).unwrap(),
        expires_at: Utc::now() + chrono::Duration::minutes(30),
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!(
            "## CreateJsapiOrder against the sandbox, one call at a time ({} calls each), ms",
            calls()
        );
        println!();
        println!(
            "| store | bare ParTrade p50 / p99 | first call p50 / p99 | first / bare | replay p50 / p99 | replay / bare | ParTrades during replays | writes during replays |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        let dir = tempfile::tempdir().unwrap();
        run(
            "SQLite",
            format!("sqlite://{}", dir.path().join("n.db").display()),
        )
        .await;
        let db = PgDatabase::create().await;
        run("PostgreSQL", db.url.clone()).await;
    });
}
