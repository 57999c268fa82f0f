//! The cost of the gateway's RPC path, under h2load (nghttp2-client), each
//! target beside a baseline in the same run (this machine is shared and
//! noisy: read the ratios).
//!
//! The call is a cached `Auth.GetAccessToken` (no upstream call during the
//! run). Targets, in alternating rounds:
//!
//! - `bare tonic`: a tonic server with no layer, no interceptor, answering
//!   the same RPC with a constant message of the same size: the baseline;
//! - `gateway gRPC`: the gateway (Connect layer, metrics and log layer,
//!   API-key interceptor with no keys, the token cache);
//! - `gateway Connect JSON h2` and `gateway Connect JSON h1`: the same call
//!   as `POST application/json` `{}`, over HTTP/2 and over HTTP/1.1.
//!
//! Every answer of the gateway is also counted by its own
//! `grpc_server_handled_total{grpc_code="OK"}`, which must match h2load's
//! successes: h2load counts a gRPC error as a 2xx, the metric does not.
//!
//! Run: `cargo bench --bench rpc` (KONGTIE_BENCH_SECS per round, default
//! 4; KONGTIE_BENCH_ROUNDS, default 3; KONGTIE_BENCH_CLIENTS, default 50,
//! each with 10 streams on HTTP/2). h2load must be on PATH.
//!
//! KONGTIE_BENCH_LOG=1 installs the binary's own logging and tracing (an
//! INFO line per RPC to stderr, spans made for OpenTelemetry), as `serve`
//! runs: send stderr somewhere (`2>/dev/null`).
//!
//! For counting instructions instead of timing (valgrind's callgrind, which
//! the machine's noise does not touch): KONGTIE_BENCH_REQUESTS=N sends
//! exactly N requests per round, without warm-up, and
//! KONGTIE_BENCH_TARGETS=bare,grpc,connect-h2,connect-h1 picks the targets.

use std::{net::SocketAddr, process::Command, time::Duration};

use kongtie_gateway::proto::{
    BuildAuthorizeUrlRequest, BuildAuthorizeUrlResponse, ExchangeOAuthCodeRequest,
    ExchangeOAuthCodeResponse, GetAccessTokenRequest, GetAccessTokenResponse,
    auth_client::AuthClient,
    auth_server::{Auth, AuthServer},
};
use tokio_stream::{StreamExt, wrappers::TcpListenerStream};
use tonic::{Request, Response, Status};

mod common;
use common::gateway_with;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The baseline: the same RPC, answered with a constant.
struct Bare(GetAccessTokenResponse);

#[tonic::async_trait]
impl Auth for Bare {
    async fn get_access_token(
        &self,
        _: Request<GetAccessTokenRequest>,
    ) -> Result<Response<GetAccessTokenResponse>, Status> {
        Ok(Response::new(self.0.clone()))
    }
    async fn exchange_o_auth_code(
        &self,
        _: Request<ExchangeOAuthCodeRequest>,
    ) -> Result<Response<ExchangeOAuthCodeResponse>, Status> {
        Err(Status::unimplemented("bench"))
    }
    async fn build_authorize_url(
        &self,
        _: Request<BuildAuthorizeUrlRequest>,
    ) -> Result<Response<BuildAuthorizeUrlResponse>, Status> {
        Err(Status::unimplemented("bench"))
    }
}

async fn bare_tonic(answer: GetAccessTokenResponse) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = TcpListenerStream::new(listener).map(|s| {
        s.inspect(|s| {
            let _ = s.set_nodelay(true);
        })
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AuthServer::new(Bare(answer)))
            .serve_with_incoming(incoming),
    );
    addr
}

#[derive(Clone, Copy, PartialEq)]
enum Target {
    BareTonic,
    GatewayGrpc,
    ConnectH2,
    ConnectH1,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::BareTonic => "bare tonic (gRPC)",
            Target::GatewayGrpc => "gateway gRPC",
            Target::ConnectH2 => "gateway Connect JSON h2",
            Target::ConnectH1 => "gateway Connect JSON h1",
        }
    }
}

/// (requests per second, successes) of one h2load round.
fn h2load(
    target: Target,
    addr: SocketAddr,
    secs: u64,
    clients: u64,
    dir: &std::path::Path,
) -> (f64, u64) {
    let grpc_frame = dir.join("grpc");
    std::fs::write(&grpc_frame, [0u8; 5]).unwrap();
    let json = dir.join("json");
    std::fs::write(&json, b"{}").unwrap();
    let mut cmd = Command::new("h2load");
    cmd.args(["-t1", "-c", &clients.to_string()]);
    match std::env::var("KONGTIE_BENCH_REQUESTS") {
        Ok(n) => cmd.args(["-n", &n]),
        Err(_) => cmd.args(["-D", &secs.to_string(), "--warm-up-time", "1"]),
    };
    match target {
        Target::BareTonic | Target::GatewayGrpc => {
            cmd.args([
                "-m10",
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
            ]);
            cmd.arg("-d").arg(&grpc_frame);
        }
        Target::ConnectH2 => {
            cmd.args(["-m10", "-H", "content-type: application/json"]);
            cmd.arg("-d").arg(&json);
        }
        Target::ConnectH1 => {
            cmd.args(["--h1", "-m1", "-H", "content-type: application/json"]);
            cmd.arg("-d").arg(&json);
        }
    }
    cmd.arg(format!("http://{addr}/kongtie.v1.Auth/GetAccessToken"));
    let out = cmd
        .output()
        .expect("running h2load (apt-get install nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    let rate = text
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|r| r.strip_suffix(" req/s"))
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no rate in h2load's output:\n{text}"));
    let succeeded = text
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .and_then(|l| l.split(", ").find_map(|p| p.strip_suffix(" succeeded")))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let failed = text
        .lines()
        .find_map(|l| l.strip_prefix("status codes: "))
        .map(|l| !l.ends_with(", 0 4xx, 0 5xx") || succeeded == 0)
        .unwrap_or(true);
    assert!(!failed, "non-2xx answers:\n{text}");
    (rate, succeeded)
}

async fn handled_ok(admin: SocketAddr) -> f64 {
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = r#"grpc_server_handled_total{grpc_type="unary",grpc_service="kongtie.v1.Auth",grpc_method="GetAccessToken",grpc_code="OK"} "#;
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let secs = env("KONGTIE_BENCH_SECS", 4);
    let rounds = env("KONGTIE_BENCH_ROUNDS", 3);
    let clients = env("KONGTIE_BENCH_CLIENTS", 50);
    let _telemetry = (std::env::var("KONGTIE_BENCH_LOG").as_deref() == Ok("1"))
        .then(|| kongtie_gateway::telemetry::init(kongtie_gateway::config::LogFormat::Plain));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (gateway, bare) = rt.block_on(async {
        let gateway = gateway_with(&["--sandbox", "--sandbox-addr", "127.0.0.1:0"], None).await;
        // Warm the cache, and take its answer's size for the baseline.
        let answer = AuthClient::connect(format!("http://{}", gateway.grpc))
            .await
            .unwrap()
            .get_access_token(GetAccessTokenRequest::default())
            .await
            .expect("a token from the sandbox")
            .into_inner();
        let bare = bare_tonic(answer).await;
        (gateway, bare)
    });
    println!(
        "cached GetAccessToken under h2load: {secs} s rounds (after 1 s warm-up), {clients} clients, \
         {rounds} rounds"
    );
    let chosen = std::env::var("KONGTIE_BENCH_TARGETS")
        .unwrap_or_else(|_| "bare,grpc,connect-h2,connect-h1".into());
    let targets: Vec<Target> = chosen
        .split(',')
        .map(|t| match t {
            "bare" => Target::BareTonic,
            "grpc" => Target::GatewayGrpc,
            "connect-h2" => Target::ConnectH2,
            "connect-h1" => Target::ConnectH1,
            other => panic!("unknown target {other}"),
        })
        .collect();
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for round in 1..=rounds {
        for (i, &target) in targets.iter().enumerate() {
            let addr = if target == Target::BareTonic {
                bare
            } else {
                gateway.grpc
            };
            let before = rt.block_on(handled_ok(gateway.admin));
            let (rate, succeeded) = h2load(target, addr, secs, clients, dir.path());
            if target != Target::BareTonic {
                let counted = rt.block_on(handled_ok(gateway.admin)) - before;
                // The warm-up's calls count too: at least every success.
                assert!(
                    counted >= succeeded as f64,
                    "{}: h2load saw {succeeded} succeed, the gateway counted {counted} OK",
                    target.name()
                );
            }
            println!("round {round}: {:<26} {rate:>9.0} req/s", target.name());
            rates[i].push(rate);
        }
    }
    if targets[0] != Target::BareTonic || targets.len() < 2 {
        return;
    }
    let base = median(rates[0].clone());
    println!("\nmedians (ratio to bare tonic in the same run):");
    for (i, target) in targets.iter().enumerate() {
        let m = median(rates[i].clone());
        println!("{:<26} {m:>9.0} req/s  {:.2}x", target.name(), m / base);
    }
    // Per-round ratios too: the machine drifts between rounds.
    let per_round: Vec<String> = (0..rates[0].len())
        .map(|r| format!("{:.2}", rates[1][r] / rates[0][r]))
        .collect();
    println!(
        "gateway gRPC / bare tonic by round: {}",
        per_round.join(", ")
    );
    drop(gateway);
    rt.shutdown_timeout(Duration::from_secs(1));
}
