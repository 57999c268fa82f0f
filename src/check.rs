//! `kongtie-gateway check`: what an operator runs before `serve`. Each item
//! is tried by the code `serve` runs (the configuration, who may call, TLS,
//! the store) or by what touches nothing (binding a listener and letting
//! go, a call to Kongtie that only reads), and printed on a line of its
//! own: `ITEM: ok|FAILED|not verified (how)`. What cannot be proven without
//! a side effect says so; `--order` makes the one call that proves the pay
//! token, a real 0.01-yuan ParTrade that expires a minute later.

use std::{
    fmt::Display,
    io::ErrorKind,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use chrono::Utc;
use rand::Rng;
use tokio::net::{TcpListener, TcpStream};
use url::{Host, Url};

use crate::{
    config::{CheckArgs, Config, StoreArgs},
    domain::{AmountFen, NewOrder, OpenId, OutTradeId, beijing},
    error::Error,
    sandbox::SandboxHandle,
    startup::{load_tls, who_may_call},
    store,
    upstream::{Endpoint, KongtieClient, shown_url},
};

/// What one item came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ok,
    Failed,
    NotVerified,
}

/// The items printed so far, counted by verdict.
#[derive(Default)]
struct Report {
    ok: usize,
    failed: usize,
    not_verified: usize,
}

impl Report {
    fn line(&mut self, item: &str, verdict: Verdict, how: impl Display) {
        let word = match verdict {
            Verdict::Ok => {
                self.ok += 1;
                "ok"
            }
            Verdict::Failed => {
                self.failed += 1;
                "FAILED"
            }
            Verdict::NotVerified => {
                self.not_verified += 1;
                "not verified"
            }
        };
        println!("{item}: {word} ({how})");
    }

    fn ok(&mut self, item: &str, how: impl Display) {
        self.line(item, Verdict::Ok, how);
    }

    fn failed(&mut self, item: &str, how: impl Display) {
        self.line(item, Verdict::Failed, how);
    }

    fn not_verified(&mut self, item: &str, how: impl Display) {
        self.line(item, Verdict::NotVerified, how);
    }

    /// Prints the summary; true when nothing failed.
    fn finish(self) -> bool {
        let word = if self.failed == 0 { "ok" } else { "FAILED" };
        println!(
            "result: {word} ({} ok, {} FAILED, {} not verified)",
            self.ok, self.failed, self.not_verified
        );
        self.failed == 0
    }
}

/// Where each Kongtie call is sent, and which setting says so.
struct Upstream {
    client: KongtieClient,
    ktapi_url: Url,
    pay_url: Url,
    /// The settings the two URLs come from, for a line that names them.
    ktapi_setting: &'static str,
    pay_setting: &'static str,
}

/// Runs every check, printing each; true when none failed.
pub async fn run(args: &CheckArgs) -> bool {
    let mut report = Report::default();
    let mut config = match args.serve.config() {
        Ok(config) => config,
        Err(problems) => {
            for problem in problems.lines() {
                report.failed("configuration", problem);
            }
            report.not_verified(
                "everything else",
                "serve would not start with the configuration above",
            );
            return report.finish();
        }
    };
    report.ok(
        "configuration",
        "every setting parsed and checked by the code serve runs",
    );
    check_access(&mut report, &config).await;
    check_listeners(&mut report, &config).await;
    check_store(&mut report, &args.serve.store, &config.store_url).await;

    // With --sandbox the calls go to a sandbox of check's own on a free
    // port, so that it can run beside a gateway holding the configured one.
    let mut sandbox = None;
    let mut settings = (
        "KONGTIE_KTAPI_URL / --ktapi-url",
        "KONGTIE_PAY_URL / --pay-url",
    );
    if let Some((_, sandbox_config)) = config.sandbox.take() {
        match spawn_sandbox(sandbox_config).await {
            Ok(handle) => {
                config.upstream.ktapi_url = handle.ktapi_url();
                config.upstream.pay_url = handle.pay_url();
                settings = (
                    "--sandbox: check's own sandbox",
                    "--sandbox: check's own sandbox",
                );
                sandbox = Some(handle);
            }
            Err(e) => report.failed("sandbox", format!("starting check's own sandbox: {e}")),
        }
    }
    let upstream = match KongtieClient::new(config.upstream.clone(), None) {
        Ok(client) => Upstream {
            client,
            ktapi_url: config.upstream.ktapi_url.clone(),
            pay_url: config.upstream.pay_url.clone(),
            ktapi_setting: settings.0,
            pay_setting: settings.1,
        },
        Err(e) => {
            report.failed("HTTP client", e);
            return report.finish();
        }
    };
    check_ktapi(&mut report, &upstream).await;
    report.not_verified(
        "OAuth code exchange",
        "GetWeChatAccessToken needs a single-use code from a real WeChat sign-in",
    );
    report.not_verified(
        "notify token",
        "only a notification Kongtie signs proves KONGTIE_NOTIFY_TOKEN (default KONGTIE_TOKEN); \
         a wrong one shows as kongtie_notifications_rejected_total{reason=\"bad_signature\"}",
    );
    let seen_app_id = match &args.order {
        Some(openid) => check_order(&mut report, &upstream, openid).await,
        None => {
            check_pay_host(&mut report, &upstream, config.upstream.connect_timeout).await;
            report.not_verified(
                "pay token",
                "only a real order proves KONGTIE_PAY_TOKEN: check --order OPENID makes one \
                 ParTrade of 0.01 yuan that expires a minute later",
            );
            None
        }
    };
    check_app_id(&mut report, &config, seen_app_id, args.order.is_some());
    if let Some(sandbox) = sandbox {
        sandbox.shutdown().await;
    }
    report.finish()
}

/// API keys and TLS, loaded and decided by `serve`'s own functions.
async fn check_access(report: &mut Report, config: &Config) {
    match who_may_call(config) {
        Ok(keys) if keys.is_empty() => report.ok(
            "API keys",
            format!(
                "none: serve lets every caller in on {}, {}",
                config.grpc_addr,
                if config.grpc_addr.ip().is_loopback() {
                    "a loopback address"
                } else {
                    "as --allow-unauthenticated says"
                }
            ),
        ),
        Ok(keys) => report.ok(
            "API keys",
            format!("{} loaded; callers must send one", keys.len()),
        ),
        Err(e) => report.failed("API keys", e),
    }
    match load_tls(&config.access).await {
        Ok(None) => report.ok("TLS", "off: gRPC is served in plain text"),
        Ok(Some(_)) => report.ok(
            "TLS",
            if config
                .access
                .tls
                .as_ref()
                .is_some_and(|t| t.client_ca.is_some())
            {
                "certificate, key and client CA loaded: mutual TLS"
            } else {
                "certificate and key loaded"
            },
        ),
        Err(e) => report.failed("TLS", e),
    }
}

/// Binds each address `serve` would bind, and lets go at once.
async fn check_listeners(report: &mut Report, config: &Config) {
    let mut wanted = vec![
        ("gRPC listener", "KONGTIE_GRPC_ADDR", config.grpc_addr),
        ("notify listener", "KONGTIE_NOTIFY_ADDR", config.notify_addr),
        ("admin listener", "KONGTIE_ADMIN_ADDR", config.admin_addr),
    ];
    if let Some((addr, _)) = &config.sandbox {
        wanted.push(("sandbox listener", "KONGTIE_SANDBOX_ADDR", *addr));
    }
    // Held until all are tried, so that two settings naming one address
    // show as the conflict `serve` would meet.
    let mut held: Vec<(&str, SocketAddr, TcpListener)> = Vec::new();
    for (item, var, addr) in wanted {
        match TcpListener::bind(addr).await {
            Ok(listener) => {
                report.ok(item, format!("{addr} ({var}) can be bound; let go at once"));
                held.push((var, addr, listener));
            }
            Err(e) if e.kind() == ErrorKind::AddrInUse => {
                match held
                    .iter()
                    .find(|(_, other, _)| other.port() == addr.port())
                {
                    Some((other, ..)) => report.failed(
                        item,
                        format!("{addr} ({var}) is also {other}: serve cannot bind both"),
                    ),
                    None => report.not_verified(
                        item,
                        format!(
                            "{addr} ({var}) is in use, perhaps by a running gateway: serve \
                             could not bind it now"
                        ),
                    ),
                }
            }
            Err(e) => report.failed(item, format!("binding {addr} ({var}): {e}")),
        }
    }
}

/// Opens the store as `serve` does when it exists; creates nothing when it
/// does not (`serve` will), and says where it looked.
async fn check_store(report: &mut Report, args: &StoreArgs, url: &str) {
    let Some(path) = store::sqlite_path(url) else {
        match open_store(url).await {
            Ok(last) => report.ok(
                "store",
                format!(
                    "PostgreSQL (KONGTIE_STORE) opened as serve opens it, last sequence \
                     {last}; KONGTIE_DATA_DIR is not used"
                ),
            ),
            Err(e) => report.failed("store", format!("KONGTIE_STORE: {e}")),
        }
        return;
    };
    let path = absolute(path);
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let place = if args.store.is_some() {
        format!("{} (KONGTIE_STORE)", path.display())
    } else {
        format!(
            "{} in data directory {} (KONGTIE_DATA_DIR)",
            file_name(&path),
            dir.display()
        )
    };
    if path.exists() {
        // Read-only: serve may be running on it, and an older file is
        // migrated (and rewritten once) by serve, not by check.
        let inspected = tokio::task::spawn_blocking(move || store::inspect_read_only(&path)).await;
        match inspected {
            Ok(Ok(found)) if found.version == found.wanted => report.ok(
                "store",
                format!(
                    "SQLite {place} opened read-only, schema version {}, last sequence {}",
                    found.version,
                    found.last.unwrap_or_default()
                ),
            ),
            Ok(Ok(found)) if found.version < found.wanted => report.not_verified(
                "store",
                format!(
                    "SQLite {place} opened read-only at schema version {}: serve will migrate \
                     it to {}, check changed nothing",
                    found.version, found.wanted
                ),
            ),
            Ok(Ok(found)) => report.not_verified(
                "store",
                format!(
                    "SQLite {place} is at schema version {}, newer than this build's {}: \
                     written by a newer kongtie-gateway",
                    found.version, found.wanted
                ),
            ),
            Ok(Err(e)) => report.failed("store", format!("SQLite {place}: {e}")),
            Err(e) => report.failed("store", format!("SQLite {place}: {e}")),
        }
        return;
    }
    // The nearest directory that exists is where serve starts creating.
    let existing = path.ancestors().skip(1).find(|a| a.exists());
    match existing {
        Some(ancestor) if !ancestor.is_dir() => report.failed(
            "store",
            format!(
                "SQLite {place}: serve cannot create it, {} is not a directory",
                ancestor.display()
            ),
        ),
        _ => report.not_verified(
            "store",
            format!(
                "SQLite {place}: {} does not exist yet; serve will create it, check created \
                 nothing",
                if dir.exists() {
                    path.display()
                } else {
                    dir.display()
                }
            ),
        ),
    }
}

async fn open_store(url: &str) -> Result<u64, String> {
    let store = store::open(url, None).await.map_err(|e| e.to_string())?;
    let last = store.last_sequence().await;
    store.close().await;
    last.map_err(|e| e.to_string())
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

async fn spawn_sandbox(
    config: crate::sandbox::SandboxConfig,
) -> Result<SandboxHandle, std::io::Error> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    SandboxHandle::spawn(config, listener)
}

/// GetAccessToken, then GetJsApiTicket with its token: both only read.
async fn check_ktapi(report: &mut Report, upstream: &Upstream) {
    let url = endpoint_url(upstream, Endpoint::GetAccessToken);
    let started = Instant::now();
    let token = match upstream.client.get_access_token(None).await {
        Ok(token) => token,
        Err(e) => {
            let (url_line, token_line) = explain(&e, &url, upstream.ktapi_setting);
            report.line("ktapi URL", url_line.0, url_line.1);
            report.line("ktapi token", token_line.0, token_line.1);
            report.not_verified("jsapi ticket", "GetAccessToken did not answer with a token");
            return;
        }
    };
    report.ok(
        "ktapi URL",
        format!(
            "{url} ({}) answered in {} ms",
            upstream.ktapi_setting,
            started.elapsed().as_millis()
        ),
    );
    report.ok(
        "ktapi token",
        format!(
            "GetAccessToken answered {} with an access token: Kongtie accepted the signature \
             of {}",
            crate::upstream::wire::CODE_OK,
            Endpoint::GetAccessToken.signing_settings()
        ),
    );
    match upstream.client.get_jsapi_ticket(&token, None).await {
        Ok(_) => report.ok(
            "jsapi ticket",
            "GetJsApiTicket answered a ticket for that access token",
        ),
        Err(e) => report.failed("jsapi ticket", format!("GetJsApiTicket: {e}")),
    }
}

/// The verdicts a failed call gives its URL and its credentials.
type Explained = ((Verdict, String), (Verdict, String));

fn explain(error: &Error, url: &str, setting: &str) -> Explained {
    let reached = (Verdict::Ok, format!("{url} ({setting}) answered"));
    let unreached = (Verdict::NotVerified, "Kongtie was not reached".to_owned());
    match error {
        Error::UpstreamUnavailable { detail, .. } => (
            (
                Verdict::Failed,
                format!("cannot reach {url}, set by {setting}: {detail}"),
            ),
            unreached,
        ),
        Error::UpstreamTimeout { after, .. } => (
            (
                Verdict::Failed,
                format!(
                    "{url}, set by {setting}, did not answer within {} ms",
                    after.as_millis()
                ),
            ),
            unreached,
        ),
        Error::UpstreamBadResponse { what, .. } => (
            (
                Verdict::Failed,
                format!("{url}, set by {setting}, answered what Kongtie does not: {what}"),
            ),
            unreached,
        ),
        Error::UpstreamSignatureRejected {
            endpoint,
            code,
            message,
        } => (
            reached,
            (
                Verdict::Failed,
                format!(
                    "{endpoint} answered {code} {message}: Kongtie refused the signature; \
                     check {}",
                    endpoint.signing_settings()
                ),
            ),
        ),
        Error::UpstreamRejected {
            endpoint,
            code,
            message,
        } => (
            reached,
            (
                Verdict::Failed,
                format!("{endpoint} refused the request: {code} {message}"),
            ),
        ),
        other => ((Verdict::Failed, format!("{url}: {other}")), unreached),
    }
}

/// The URL `endpoint` is sent to, as it may be shown (no password).
fn endpoint_url(upstream: &Upstream, endpoint: Endpoint) -> String {
    match endpoint {
        Endpoint::ParTrade => shown_url(&upstream.pay_url),
        ep => format!(
            "{}/{}",
            shown_url(&upstream.ktapi_url).trim_end_matches('/'),
            ep.name()
        ),
    }
}

/// Without an order, the pay host can only be reached, not asked: a TCP
/// connection is opened and closed, nothing is sent.
async fn check_pay_host(report: &mut Report, upstream: &Upstream, timeout: Duration) {
    let url = shown_url(&upstream.pay_url);
    let setting = upstream.pay_setting;
    let started = Instant::now();
    match connect(&upstream.pay_url, timeout).await {
        Ok(peer) => report.ok(
            "pay URL",
            format!(
                "{url} ({setting}): a TCP connection to {peer} opened in {} ms, nothing sent",
                started.elapsed().as_millis()
            ),
        ),
        Err(why) => report.failed(
            "pay URL",
            format!("cannot reach {url}, set by {setting}: {why}"),
        ),
    }
}

async fn connect(url: &Url, timeout: Duration) -> Result<SocketAddr, String> {
    let port = url.port_or_known_default().ok_or("no port")?;
    let attempt = async {
        match url.host() {
            Some(Host::Domain(name)) => TcpStream::connect((name, port)).await,
            Some(Host::Ipv4(ip)) => TcpStream::connect((ip, port)).await,
            Some(Host::Ipv6(ip)) => TcpStream::connect((ip, port)).await,
            None => Err(std::io::Error::other("no host")),
        }
    };
    let stream = tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| format!("connect timeout ({} ms)", timeout.as_millis()))?
        .map_err(|e| e.to_string())?;
    stream.peer_addr().map_err(|e| e.to_string())
}

/// One real ParTrade through the gateway's own client (the signing path of
/// every order): 0.01 yuan for `openid`, expiring a minute later. Returns
/// the app id of the pay parameters Kongtie answered.
async fn check_order(report: &mut Report, upstream: &Upstream, openid: &str) -> Option<String> {
    let expires_at = Utc::now() + Duration::from_secs(60);
    let out_trade_id = check_order_id();
    let order = match (
        OutTradeId::parse(&out_trade_id),
        AmountFen::parse(1, 1),
        OpenId::parse(openid),
    ) {
        (Ok(out_trade_id), Ok(amount), Ok(openid)) => NewOrder {
            out_trade_id,
            amount,
            openid,
            expires_at,
        },
        (a, b, c) => {
            let why = [a.err(), b.err(), c.err()].into_iter().flatten();
            report.failed("test order", why.collect::<Vec<_>>().join("; "));
            return None;
        }
    };
    let url = endpoint_url(upstream, Endpoint::ParTrade);
    let terms = format!(
        "order {out_trade_id}, 0.01 yuan for openid {openid}, expiring at {} Beijing time",
        expires_at.with_timezone(&beijing()).format("%H:%M:%S")
    );
    match upstream.client.create_order(&order, None).await {
        Ok(created) => {
            report.ok(
                "pay URL",
                format!("{url} ({}) answered", upstream.pay_setting),
            );
            report.ok(
                "pay token",
                format!(
                    "ParTrade answered {} for the test order: Kongtie accepted the signature \
                     of {}",
                    crate::upstream::wire::CODE_OK,
                    Endpoint::ParTrade.signing_settings()
                ),
            );
            report.ok(
                "test order",
                format!(
                    "created with pay parameters ({}): {terms}; nobody is charged unless that \
                     user pays it",
                    created.params.package
                ),
            );
            Some(created.params.app_id)
        }
        Err(e) => {
            let (url_line, token_line) = explain(&e, &url, upstream.pay_setting);
            let signature_refused = matches!(e, Error::UpstreamSignatureRejected { .. });
            report.line("pay URL", url_line.0, url_line.1);
            if signature_refused || token_line.0 == Verdict::NotVerified {
                report.line("pay token", token_line.0, token_line.1);
            } else {
                report.not_verified(
                    "pay token",
                    "ParTrade refused the order for another reason than its signature (below)",
                );
            }
            let outcome = match &e {
                Error::UpstreamTimeout { .. } => format!(
                    "no answer in time: the order may exist upstream ({terms}); it expires \
                     unpaid"
                ),
                Error::UpstreamRejected { code, message, .. } => format!(
                    "ParTrade refused it: {code} {message}; check the openid and the ParTrade \
                     settings KONGTIE_PLATFORM_APP_ID, KONGTIE_PLATFORM_TOKEN, \
                     KONGTIE_SOURCE_WAY, KONGTIE_SOURCE_APP, KONGTIE_PAY_METHOD"
                ),
                _ => format!("not created ({terms})"),
            };
            report.failed("test order", outcome);
            None
        }
    }
}

/// `KGCHECK` and 13 random letters and digits: 20 in all, as ParTrade
/// wants, unlike an order id a shop would choose, and unique even when a
/// fleet of replicas runs `check --order` in the same second (with the
/// time of day and three digits, ten runs in one second met one another
/// once in twenty).
fn check_order_id() -> String {
    let mut rng = rand::rng();
    let random: String = (0..13)
        .map(|_| char::from(rng.sample(rand::distr::Alphanumeric)))
        .collect();
    format!("KGCHECK{random}")
}

/// The WeChat app id: needed by BuildAuthorizeUrl and SignJsSdkConfig, and
/// shown right only by a real order's pay parameters.
fn check_app_id(report: &mut Report, config: &Config, seen: Option<String>, ordered: bool) {
    let item = "WeChat app id";
    let Some(app_id) = &config.gateway.wechat_app_id else {
        report.failed(
            item,
            "KONGTIE_WECHAT_APP_ID is not set: serve starts, but BuildAuthorizeUrl and \
             SignJsSdkConfig (wx.config) fail until it is",
        );
        return;
    };
    match seen {
        Some(seen) if seen == *app_id => report.ok(
            item,
            format!("{app_id}: the test order's pay parameters carry the same appId"),
        ),
        Some(seen) => report.failed(
            item,
            format!(
                "KONGTIE_WECHAT_APP_ID is {app_id}, but the test order's pay parameters \
                 carry appId {seen}: wx.config would be signed for the wrong account"
            ),
        ),
        None if ordered => report.not_verified(item, format!("{app_id}: no test order was made")),
        None => report.not_verified(
            item,
            format!(
                "{app_id} is set; only a real order's pay parameters show the account's \
                 appId: check --order OPENID compares them"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn test_order_ids_made_in_one_second_are_all_distinct_twenty_alphanumerics() {
        let ids: HashSet<String> = (0..20_000).map(|_| check_order_id()).collect();
        assert_eq!(ids.len(), 20_000, "two test orders got one id");
        for id in &ids {
            assert!(id.starts_with("KGCHECK"), "{id}");
            assert!(OutTradeId::parse(id).is_ok(), "{id}");
            assert!(
                id.len() == 20 && id.bytes().all(|b| b.is_ascii_alphanumeric()),
                "{id}"
            );
        }
    }
}
