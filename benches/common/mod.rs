//! What the benchmarks share: a gateway in this process on free ports, the
//! notifications they post, and percentiles.

#![allow(dead_code)]

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use kongtie_gateway::{
    config::{Cli, Command as Cmd},
    sandbox::signed_notification,
    startup::Application,
};
use secrecy::SecretString;
use tokio::sync::oneshot;

/// The signing token the benchmarked gateways are given.
pub const BENCH_TOKEN: &str = "bench-token";

/// Every listener of the gateway on a free port.
pub const FREE_PORTS: [&str; 6] = [
    "--grpc-addr",
    "127.0.0.1:0",
    "--notify-addr",
    "127.0.0.1:0",
    "--admin-addr",
    "127.0.0.1:0",
];

/// A distinct signed notification, for order `B{n}`.
pub fn body(n: u64) -> String {
    let id = format!("B{n}");
    let fields = [
        ("TradeStatus", "0000"),
        ("Message", "SUCCESS"),
        ("OutTradeId", id.as_str()),
        ("TradeAmount", "0.20"),
        ("TradeOrderId", id.as_str()),
        ("TradeBillNo", id.as_str()),
        ("TradeTime", "2018/3/2 10:00:39"),
        ("TimeStamp", "1522233465"),
    ];
    signed_notification(&fields, &SecretString::from(BENCH_TOKEN))
}

pub struct Gateway {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub notify_url: String,
    _stop: oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

/// A gateway in this process on a fresh SQLite file, or on the PostgreSQL
/// database `url`.
pub async fn gateway(postgres: Option<&str>) -> Gateway {
    gateway_with(&[], postgres).await
}

/// As [`gateway`], with more flags (`--sandbox`...).
pub async fn gateway_with(extra: &[&str], postgres: Option<&str>) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let args = ["kongtie-gateway", "serve", "--token", BENCH_TOKEN]
        .into_iter()
        .chain(FREE_PORTS)
        .chain(extra.iter().copied());
    let Cmd::Serve(args) = Cli::try_parse_from(args).unwrap().command else {
        unreachable!()
    };
    let mut config = args.config().unwrap();
    config.store_url = match postgres {
        Some(url) => url.to_owned(),
        None => format!("sqlite://{}", dir.path().join("n.db").display()),
    };
    let app = Application::build(config).await.unwrap();
    let (grpc, admin) = (app.grpc_addr(), app.admin_addr());
    let notify_url = app.notify_url().to_string();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    Gateway {
        grpc,
        admin,
        notify_url,
        _stop: stop,
        _dir: dir,
    }
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
