//! `kongtie-gateway check`, run as a user runs it: the real binary against a
//! sandbox on port 0, each item read back from its line.

use kongtie_gateway::upstream::Endpoint;

use crate::{
    helpers::*,
    trust::{run_binary, text},
};

/// A run of `check` (or `serve`), its lines kept.
struct Run {
    success: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The line of `item`, which must be there once.
    fn line(&self, item: &str) -> &str {
        let prefix = format!("{item}: ");
        let lines: Vec<&str> = self
            .stdout
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .collect();
        assert_eq!(lines.len(), 1, "one line for {item:?} in:\n{self}");
        lines[0]
    }

    fn lines(&self, item: &str) -> Vec<&str> {
        let prefix = format!("{item}: ");
        self.stdout
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .collect()
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.stdout, self.stderr)
    }
}

async fn run(args: &[&str], env: &[(&str, &str)]) -> Run {
    let out = run_binary(args, env).await;
    Run {
        success: out.status.success(),
        code: out.status.code(),
        stdout: text(&out.stdout),
        stderr: text(&out.stderr),
    }
}

/// `check` pointed at `sandbox`, with `extra`, and unless `extra` says
/// otherwise listeners on port 0 and a data directory of its own.
async fn check_against(
    sandbox: &kongtie_gateway::sandbox::SandboxHandle,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let (ktapi, pay) = (
        sandbox.ktapi_url().to_string(),
        sandbox.pay_url().to_string(),
    );
    let mut args = vec!["check", "--ktapi-url", &ktapi, "--pay-url", &pay];
    let data = ["--data-dir", dir.path().to_str().unwrap()];
    for pair in LISTENERS.chunks(2).chain([&data[..]]) {
        if !extra.contains(&pair[0]) {
            args.extend(pair);
        }
    }
    args.extend(extra);
    run(&args, env).await
}

const LISTENERS: [&str; 6] = [
    "--grpc-addr",
    "127.0.0.1:0",
    "--notify-addr",
    "127.0.0.1:0",
    "--admin-addr",
    "127.0.0.1:0",
];

/// The environment of a gateway the sandbox of `spawn_sandbox` accepts,
/// with the pay token given.
fn env_with_pay_token(pay_token: &str) -> Vec<(&str, &str)> {
    vec![
        ("KONGTIE_TOKEN", KTAPI_TOKEN),
        ("KONGTIE_PAY_TOKEN", pay_token),
        ("KONGTIE_WECHAT_APP_ID", APP_ID),
    ]
}

#[tokio::test]
async fn with_an_order_a_wrong_pay_token_fails_by_name_and_the_right_one_creates_a_one_minute_order()
 {
    let sandbox = spawn_sandbox().await;
    let wrong = check_against(
        &sandbox,
        &["--order", "oCheckUser1"],
        &env_with_pay_token("a-wrong-pay-token"),
    )
    .await;
    assert!(!wrong.success, "{wrong}");
    let line = wrong.line("pay token");
    assert!(
        line.starts_with("pay token: FAILED (ParTrade answered 0001 sign error")
            && line.contains("KONGTIE_PAY_TOKEN"),
        "{wrong}"
    );
    assert!(wrong.line("test order").starts_with("test order: FAILED"));
    // The ktapi token was right all along.
    assert!(wrong.line("ktapi token").starts_with("ktapi token: ok"));
    let sent = sandbox.requests();
    let trades: Vec<_> = sent
        .iter()
        .filter(|r| r.endpoint == Endpoint::ParTrade)
        .collect();
    assert_eq!(trades.len(), 1, "one ParTrade, not retried");
    assert!(!trades[0].sign_valid, "the sandbox saw the wrong signature");
    assert!(!wrong.to_string().contains("a-wrong-pay-token"));

    let before = chrono::Utc::now();
    let right = check_against(
        &sandbox,
        &["--order", "oCheckUser1"],
        &env_with_pay_token(PAY_TOKEN),
    )
    .await;
    assert!(right.success, "{right}");
    assert!(
        right
            .line("pay token")
            .starts_with("pay token: ok (ParTrade answered 0000")
    );
    let order = right.line("test order");
    assert!(order.starts_with("test order: ok (created"), "{right}");
    assert!(
        right
            .line("WeChat app id")
            .starts_with("WeChat app id: ok (wxtestapp0000001: the test order's pay parameters"),
        "{right}"
    );
    // The order went through the client's signing path, as every order does:
    // 0.01 yuan, for the openid given, expiring within a minute.
    let sent = sandbox.requests();
    let trade = sent
        .iter()
        .rfind(|r| r.endpoint == Endpoint::ParTrade)
        .unwrap();
    assert!(trade.sign_valid);
    assert_eq!(trade.field("PayAmount"), Some("0.01"));
    assert_eq!(trade.field("OpenId"), Some("oCheckUser1"));
    let id = trade.field("OutTradeId").unwrap();
    assert!(order.contains(id), "{order}");
    let beijing = chrono::FixedOffset::east_opt(8 * 3600).unwrap();
    let expires =
        chrono::NaiveDateTime::parse_from_str(trade.field("OrderTimeOut").unwrap(), "%Y%m%d%H%M%S")
            .unwrap()
            .and_local_timezone(beijing)
            .unwrap();
    let ahead = (expires.to_utc() - before).num_seconds();
    assert!((55..=62).contains(&ahead), "expires {ahead} s ahead");
}

#[tokio::test]
async fn without_an_order_check_says_the_pay_token_is_not_verified_and_sends_no_partrade() {
    let sandbox = spawn_sandbox().await;
    let out = check_against(&sandbox, &[], &env_with_pay_token("a-wrong-pay-token")).await;
    assert!(out.success, "nothing failed that check could try: {out}");
    let line = out.line("pay token");
    assert!(
        line.starts_with("pay token: not verified (only a real order proves KONGTIE_PAY_TOKEN")
            && line.contains("--order"),
        "{out}"
    );
    assert!(out.line("pay URL").starts_with("pay URL: ok ("), "{out}");
    assert!(
        out.line("ktapi token")
            .starts_with("ktapi token: ok (GetAccessToken answered 0000")
    );
    assert!(out.line("jsapi ticket").starts_with("jsapi ticket: ok"));
    assert_eq!(sandbox.calls(Endpoint::ParTrade), 0);
    assert_eq!(sandbox.calls(Endpoint::GetAccessToken), 1);
    assert!(out.line("result").starts_with("result: ok ("));
}

#[tokio::test]
async fn an_unset_wechat_app_id_fails_the_check() {
    let sandbox = spawn_sandbox().await;
    let env = [
        ("KONGTIE_TOKEN", KTAPI_TOKEN),
        ("KONGTIE_PAY_TOKEN", PAY_TOKEN),
    ];
    let out = check_against(&sandbox, &[], &env).await;
    assert!(!out.success, "{out}");
    assert!(
        out.line("WeChat app id")
            .starts_with("WeChat app id: FAILED (KONGTIE_WECHAT_APP_ID is not set"),
        "{out}"
    );
}

#[tokio::test]
async fn a_public_address_without_keys_fails_the_check_as_it_stops_serve() {
    let sandbox = spawn_sandbox().await;
    let env = env_with_pay_token(PAY_TOKEN);
    let public = ["--grpc-addr", "0.0.0.0:0"];
    let out = check_against(&sandbox, &public, &env).await;
    assert!(!out.success, "{out}");
    let refusal = "refusing to serve gRPC on 0.0.0.0:0 without API keys";
    assert!(
        out.line("API keys")
            .starts_with(&format!("API keys: FAILED ({refusal}")),
        "{out}"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["serve", "--data-dir", dir.path().to_str().unwrap()];
    args.extend(&LISTENERS[2..]);
    args.extend(public);
    let serve = run(&args, &env).await;
    assert!(!serve.success && serve.stderr.contains(refusal), "{serve}");

    // With a key, both accept the address.
    let keyed = check_against(
        &sandbox,
        &["--grpc-addr", "0.0.0.0:0", "--api-keys", "k1"],
        &env,
    )
    .await;
    assert!(keyed.success, "{keyed}");
    assert!(keyed.line("API keys").starts_with("API keys: ok (1 loaded"));
}

/// The example file's variables, as `docker run --env-file` gives them.
fn example_file() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kongtie-gateway.env.example"
    ))
    .unwrap();
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split_once('=').expect("NAME=value"))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[tokio::test]
async fn every_placeholder_of_the_example_file_is_named_in_one_run() {
    let vars = example_file();
    let placeholders: Vec<&str> = vars
        .iter()
        .filter(|(_, v)| v.contains("change-me"))
        .map(|(k, _)| k.as_str())
        .collect();
    assert!(placeholders.len() >= 2, "{placeholders:?}");
    let env: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    for command in ["check", "serve"] {
        let out = run(&[command], &env).await;
        assert!(!out.success, "{command}: {out}");
        for var in &placeholders {
            let named = format!("{var} still holds the example file's placeholder");
            let seen = match command {
                "check" => out
                    .lines("configuration")
                    .iter()
                    .any(|l| l.starts_with(&format!("configuration: FAILED ({named}"))),
                _ => out.stderr.contains(&named),
            };
            assert!(seen, "{command} does not name {var}: {out}");
        }
    }
}

#[tokio::test]
async fn an_unreachable_upstream_is_named_by_its_url_and_its_setting() {
    // A port nobody listens on any more.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let ktapi = format!("http://127.0.0.1:{port}/awkmanage/v3/ktapi");
    let pay = format!("http://127.0.0.1:{port}/v5/ParTrade.ashx");
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        "check",
        "--ktapi-url",
        &ktapi,
        "--pay-url",
        &pay,
        "--data-dir",
        dir.path().to_str().unwrap(),
    ];
    args.extend(LISTENERS);
    let out = run(&args, &env_with_pay_token(PAY_TOKEN)).await;
    assert!(!out.success, "{out}");
    assert!(
        out.line("ktapi URL").starts_with(&format!(
            "ktapi URL: FAILED (cannot reach {ktapi}/GetAccessToken, set by KONGTIE_KTAPI_URL / --ktapi-url: "
        )),
        "{out}"
    );
    assert!(
        out.line("ktapi token")
            .starts_with("ktapi token: not verified (Kongtie was not reached)"),
        "{out}"
    );
    assert!(
        out.line("pay URL").starts_with(&format!(
            "pay URL: FAILED (cannot reach {pay}, set by KONGTIE_PAY_URL / --pay-url: "
        )),
        "{out}"
    );
}

#[tokio::test]
async fn a_bad_environment_value_is_named_by_its_variable_and_a_bad_flag_by_its_flag() {
    let base = env_with_pay_token(PAY_TOKEN);
    for command in ["check", "serve"] {
        let mut env = base.clone();
        env.push(("KONGTIE_UPSTREAM_TIMEOUT_MS", "5s"));
        let out = run(&[command], &env).await;
        assert_eq!(out.code, Some(2), "{out}");
        assert!(
            out.stderr
                .contains("invalid value '5s' for 'KONGTIE_UPSTREAM_TIMEOUT_MS'"),
            "{command}: {out}"
        );

        // On the command line the flag wins over the variable, and is named.
        let mut env = base.clone();
        env.push(("KONGTIE_UPSTREAM_TIMEOUT_MS", "1000"));
        let out = run(&[command, "--upstream-timeout-ms", "5s"], &env).await;
        assert_eq!(out.code, Some(2), "{out}");
        assert!(
            out.stderr
                .contains("invalid value '5s' for '--upstream-timeout-ms <UPSTREAM_TIMEOUT_MS>'"),
            "{command}: {out}"
        );
    }
    // A secret's value is not shown, even a wrong one.
    let mut env = base.clone();
    env.push(("KONGTIE_PAY_TOKEN", ""));
    let out = run(&["check"], &env).await;
    assert!(
        out.stderr
            .contains("invalid value '<hidden>' for 'KONGTIE_PAY_TOKEN'"),
        "{out}"
    );
}

#[tokio::test]
async fn check_creates_no_data_directory_and_names_the_one_it_opens() {
    let sandbox = spawn_sandbox().await;
    let env = env_with_pay_token(PAY_TOKEN);
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    let out = check_against(&sandbox, &["--data-dir", dir.to_str().unwrap()], &env).await;
    assert!(out.success, "{out}");
    assert!(!dir.exists(), "check created {}: {out}", dir.display());
    let line = out.line("store");
    assert!(
        line.starts_with(&format!(
            "store: not verified (SQLite notifications.db in data directory {} (KONGTIE_DATA_DIR)",
            dir.display()
        )) && line.contains("serve will create it"),
        "{out}"
    );

    // Once serve has made it, check opens it and says which.
    let url = format!("sqlite://{}", dir.join("notifications.db").display());
    kongtie_gateway::store::open(&url, None)
        .await
        .unwrap()
        .close()
        .await;
    let out = check_against(&sandbox, &["--data-dir", dir.to_str().unwrap()], &env).await;
    assert!(
        out.line("store").starts_with(&format!(
            "store: ok (SQLite notifications.db in data directory {} (KONGTIE_DATA_DIR) opened \
             read-only, schema version ",
            dir.display()
        )),
        "{out}"
    );
}

#[tokio::test]
async fn on_postgresql_check_opens_the_store_as_serve_does_and_says_the_data_directory_is_unused() {
    let sandbox = spawn_sandbox().await;
    let db = crate::pg::PgDatabase::create().await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    let args = ["--store", &db.url, "--data-dir", dir.to_str().unwrap()];
    let out = check_against(&sandbox, &args, &env_with_pay_token(PAY_TOKEN)).await;
    assert!(out.success, "{out}");
    assert!(
        out.line("store").starts_with(
            "store: ok (PostgreSQL (KONGTIE_STORE) opened as serve opens it, last sequence 0; \
             KONGTIE_DATA_DIR is not used)"
        ),
        "{out}"
    );
    assert!(!dir.exists(), "check created {}", dir.display());
    assert!(
        !out.to_string().contains(&db.url),
        "the URL holds a password"
    );
}

#[tokio::test]
async fn a_password_in_a_kongtie_url_is_never_shown_by_check_or_by_serve() {
    let sandbox = spawn_sandbox().await;
    let with_password = |url: &url::Url, password: &str| {
        let mut url = url.clone();
        url.set_username("proxyuser").unwrap();
        url.set_password(Some(password)).unwrap();
        url.to_string()
    };
    let ktapi = with_password(&sandbox.ktapi_url(), "ktapi-url-password");
    let pay = with_password(&sandbox.pay_url(), "pay-url-password");
    // One the sandbox answers (ok lines), one nobody answers (FAILED lines).
    let nobody = with_password(
        &"http://127.0.0.1:9/awkmanage/v3/ktapi".parse().unwrap(),
        "dead-url-password",
    );
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let env = env_with_pay_token(PAY_TOKEN);
    for (ktapi, order) in [(&ktapi, true), (&nobody, false)] {
        let mut args = vec!["check", "--ktapi-url", ktapi, "--pay-url", &pay];
        args.extend(LISTENERS);
        args.extend(["--data-dir", data]);
        if order {
            args.extend(["--order", "oCheckUser1"]);
        }
        let out = run(&args, &env).await;
        assert!(
            out.line("ktapi URL").contains("proxyuser:****@127.0.0.1"),
            "the URL is shown, its password not: {out}"
        );
        assert!(
            out.line("pay URL").contains("proxyuser:****@127.0.0.1"),
            "{out}"
        );
        for password in [
            "ktapi-url-password",
            "pay-url-password",
            "dead-url-password",
        ] {
            assert!(
                !out.to_string().contains(password),
                "{password} shown: {out}"
            );
        }
    }
    // The sandbox did get the calls: the URLs were used, only not shown.
    assert_eq!(sandbox.calls(Endpoint::ParTrade), 1);

    // serve logs the URLs it was given at start-up, the password hidden.
    let args = ["serve", "--ktapi-url", &ktapi, "--pay-url", &pay];
    let serving = Binary::start_with(&args, &env, dir.path(), None);
    // Logged before the gRPC listener, which start_with waited for.
    let log = serving.log.lock().unwrap().join("\n");
    assert!(log.contains("upstream configured"), "{log}");
    assert!(log.contains("proxyuser:****@127.0.0.1"), "{log}");
    assert!(!log.contains("url-password"), "{log}");
}

#[tokio::test]
async fn check_opens_an_existing_sqlite_store_read_only_and_leaves_its_migration_to_serve() {
    let sandbox = spawn_sandbox().await;
    let env = env_with_pay_token(PAY_TOKEN);
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    let file = dir.join("notifications.db");
    kongtie_gateway::store::open(&format!("sqlite://{}", file.display()), None)
        .await
        .unwrap()
        .close()
        .await;
    // As a store written by the release before this one: one migration
    // behind, which an upgrade's new `check` meets beside the old `serve`.
    let version = |file: &std::path::Path| -> i64 {
        rusqlite::Connection::open(file)
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap()
    };
    let current = version(&file);
    rusqlite::Connection::open(&file)
        .unwrap()
        .pragma_update(None, "user_version", current - 1)
        .unwrap();
    let out = check_against(&sandbox, &["--data-dir", dir.to_str().unwrap()], &env).await;
    assert_eq!(
        version(&file),
        current - 1,
        "check migrated the store: {out}"
    );
    let line = out.line("store");
    assert!(
        line.starts_with("store: not verified (SQLite notifications.db in data directory")
            && line.contains(&format!(
                "read-only at schema version {}: serve will migrate it to {current}",
                current - 1
            )),
        "{out}"
    );
}
