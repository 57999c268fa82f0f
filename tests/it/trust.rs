//! Trust at the configuration edge: which token verifies notifications, no
//! public secret outside the sandbox, and `kongtie-gateway check`.

use std::{
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::helpers::*;

/// Runs the binary to its end (within 60 s) with `env` added and every
/// `KONGTIE_*` variable of the test's own environment removed.
pub(crate) async fn run_binary(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kongtie-gateway"));
    for (k, _) in std::env::vars() {
        if k.starts_with("KONGTIE_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("starting the binary");
    let pid = child.id();
    let waited = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await;
    match waited {
        Ok(output) => output.unwrap().unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("{args:?} did not end within 60 s");
        }
    }
}

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The document's notify example, exactly as printed, with the two hex
/// digits its scan lost (`eb`, after `fcbb`) put back: the signature is
/// Kongtie's, not one the crate computed.
const DOCUMENT_NOTIFY_EXAMPLE: &str = r#"{
  "TradeStatus": "0000",
  "Message": "SUCCESS",
  "OutTradeId": "4333451",
  "TradeAmount": "0.20",
  "TradeOrderId": "984_43334515",
  "TradeBillNo": "2018030221001004080206230140",
  "TradeTime": "2018/3/2 10:00:39",
  "TimeStamp": "1522233465",
  "Sign": "b93a80c08533fcbbeb201ded64815b49"
}"#;

#[tokio::test]
async fn the_documents_notify_example_verifies_with_the_ktapi_token_beside_a_separate_pay_token() {
    let app = spawn_app_with(&[
        "--token",
        DOCUMENT_TOKEN,
        "--allow-document-token",
        "--pay-token",
        "a-separate-pay-token",
    ])
    .await;
    assert_eq!(
        app.notify(DOCUMENT_NOTIFY_EXAMPLE).await,
        (200, "success".into())
    );
    let stored = list_all(&app.addr.to_string()).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(
        (stored[0].out_trade_id.as_str(), stored[0].amount_fen),
        ("4333451", Some(20))
    );
}

#[tokio::test]
async fn notifications_are_verified_with_kongtie_token_not_the_pay_token() {
    // The test gateway has KTAPI_TOKEN and a separate PAY_TOKEN.
    let app = spawn_app().await;
    assert_eq!(
        app.notify(payment_notification("K1", KTAPI_TOKEN)).await,
        (200, "success".into())
    );
    assert_eq!(
        app.notify(payment_notification("K2", PAY_TOKEN)).await,
        (401, "bad signature".into())
    );
    // KONGTIE_NOTIFY_TOKEN still overrides it.
    let app = spawn_app_with(&["--notify-token", "a-notify-token"]).await;
    assert_eq!(
        app.notify(payment_notification("K3", "a-notify-token"))
            .await
            .1,
        "success"
    );
    assert_eq!(
        app.notify(payment_notification("K4", KTAPI_TOKEN)).await.0,
        401
    );
}

#[tokio::test]
async fn serve_without_a_token_refuses_to_start_and_names_the_variable() {
    let out = run_binary(&["serve", "--grpc-addr", "127.0.0.1:0"], &[]).await;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("KONGTIE_TOKEN is not set"),
        "stderr says what is missing: {err}"
    );
}

#[tokio::test]
async fn the_documents_token_is_refused_unless_allowed() {
    for var in ["KONGTIE_TOKEN", "KONGTIE_PAY_TOKEN", "KONGTIE_NOTIFY_TOKEN"] {
        let mut env = vec![("KONGTIE_TOKEN", "a-real-token")];
        env.push((var, DOCUMENT_TOKEN));
        let out = run_binary(&["serve"], &env).await;
        assert!(!out.status.success(), "{var}");
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!(
                "{var} is the token printed in Kongtie's public document"
            )) && err.contains("KONGTIE_ALLOW_DOCUMENT_TOKEN=true"),
            "{err}"
        );
        assert!(
            !err.contains(DOCUMENT_TOKEN),
            "the token is not echoed: {err}"
        );
    }
    // Allowed, it starts (and says it is ready).
    let dir = tempfile::tempdir().unwrap();
    let bin = Binary::start_with(
        &["serve", "--allow-document-token"],
        &[("KONGTIE_TOKEN", DOCUMENT_TOKEN)],
        dir.path(),
        None,
    );
    let ready = reqwest::get(format!("http://{}/readyz", bin.admin))
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 200);
}

#[tokio::test]
async fn placeholders_of_the_example_file_are_refused_by_name() {
    for (var, value) in [
        ("KONGTIE_TOKEN", "change-me-the-token-kongtie-gave-you"),
        ("KONGTIE_PAY_TOKEN", "change-me-the-payment-token"),
        ("KONGTIE_NOTIFY_TOKEN", "change-me"),
        ("KONGTIE_PLATFORM_TOKEN", "change-me-the-platform-token"),
        ("KONGTIE_API_KEYS", "a-good-key,change-me-billing-key"),
        ("KONGTIE_WECHAT_APP_ID", "change-me-wechat-app-id"),
    ] {
        let mut env = vec![("KONGTIE_TOKEN", "a-real-token")];
        env.push((var, value));
        // Placeholders are refused with --sandbox too: they are never real.
        for args in [&["serve"][..], &["serve", "--sandbox"][..]] {
            let out = run_binary(args, &env).await;
            assert!(!out.status.success(), "{var} {args:?}");
            let err = text(&out.stderr);
            assert!(
                err.contains(&format!("{var} still holds the example file's placeholder")),
                "{var}: {err}"
            );
        }
    }
    let keys = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(keys.path(), "good-key\nchange-me-too\n").unwrap();
    let out = run_binary(
        &["serve", "--api-keys-file", keys.path().to_str().unwrap()],
        &[("KONGTIE_TOKEN", "a-real-token")],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("an API key still holds the example file's placeholder"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn the_sandbox_needs_no_configuration() {
    let dir = tempfile::tempdir().unwrap();
    // An empty value removes the variable Binary would set.
    let bin = Binary::start_with(
        &["serve", "--sandbox", "--sandbox-addr", "127.0.0.1:0"],
        &[("KONGTIE_TOKEN", "")],
        dir.path(),
        None,
    );
    let mut auth =
        kongtie_gateway::proto::auth_client::AuthClient::connect(format!("http://{}", bin.grpc))
            .await
            .unwrap();
    let token = auth
        .get_access_token(kongtie_gateway::proto::GetAccessTokenRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!token.access_token.is_empty());
}

#[tokio::test]
async fn check_passes_on_the_sandbox_and_prints_a_line_per_check() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let mut args = vec!["check", "--sandbox", "--data-dir", data];
    for flag in [
        "--grpc-addr",
        "--notify-addr",
        "--admin-addr",
        "--sandbox-addr",
    ] {
        args.extend([flag, "127.0.0.1:0"]);
    }
    let out = run_binary(&args, &[]).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let items: Vec<(&str, &str)> = stdout
        .lines()
        .map(|l| {
            let (item, rest) = l.split_once(": ").unwrap_or_else(|| panic!("{l}"));
            let verdict = ["ok (", "not verified ("]
                .into_iter()
                .find(|v| rest.starts_with(v))
                .unwrap_or_else(|| panic!("{l}"));
            (item, verdict.trim_end_matches(" ("))
        })
        .collect();
    assert_eq!(
        items,
        [
            ("configuration", "ok"),
            ("API keys", "ok"),
            ("TLS", "ok"),
            ("gRPC listener", "ok"),
            ("notify listener", "ok"),
            ("admin listener", "ok"),
            ("sandbox listener", "ok"),
            ("store", "not verified"),
            ("ktapi URL", "ok"),
            ("ktapi token", "ok"),
            ("jsapi ticket", "ok"),
            ("OAuth code exchange", "not verified"),
            ("notify token", "not verified"),
            ("pay URL", "ok"),
            ("pay token", "not verified"),
            ("WeChat app id", "not verified"),
            ("result", "ok"),
        ]
    );
}

#[tokio::test]
async fn check_names_the_variable_when_kongtie_refuses_the_signature() {
    let sandbox = spawn_sandbox().await; // expects KTAPI_TOKEN
    let dir = tempfile::tempdir().unwrap();
    let (ktapi, pay) = (
        sandbox.ktapi_url().to_string(),
        sandbox.pay_url().to_string(),
    );
    let mut args = vec![
        "check",
        "--ktapi-url",
        &ktapi,
        "--pay-url",
        &pay,
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--wechat-app-id",
        APP_ID,
    ];
    for flag in ["--grpc-addr", "--notify-addr", "--admin-addr"] {
        args.extend([flag, "127.0.0.1:0"]);
    }
    let out = run_binary(&args, &[("KONGTIE_TOKEN", "a-wrong-token")]).await;
    assert!(!out.status.success());
    let stdout = text(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("ktapi token: "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(
        line,
        "ktapi token: FAILED (GetAccessToken answered 0001 sign error: Kongtie refused the \
         signature; check KONGTIE_TOKEN and KONGTIE_SOURCE_FROM)"
    );
    assert!(!stdout.contains("a-wrong-token") && !text(&out.stderr).contains("a-wrong-token"));

    // With the right token, nothing fails.
    let out = run_binary(&args, &[("KONGTIE_TOKEN", KTAPI_TOKEN)]).await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("\nktapi token: ok ("), "{stdout}");

    // A configuration `serve` would refuse, `check` refuses the same way.
    let out = run_binary(&args, &[]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stdout).starts_with("configuration: FAILED (KONGTIE_TOKEN is not set"),
        "{}",
        text(&out.stdout)
    );
}

#[tokio::test]
async fn a_refused_signature_is_logged_once_at_warn_with_what_to_check_and_no_secret() {
    let sandbox = spawn_sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let ktapi = sandbox.ktapi_url().to_string();
    let bin = Binary::start_with(
        &["serve", "--ktapi-url", &ktapi],
        &[("KONGTIE_TOKEN", "a-wrong-token-42")],
        dir.path(),
        None,
    );
    let status =
        kongtie_gateway::proto::auth_client::AuthClient::connect(format!("http://{}", bin.grpc))
            .await
            .unwrap()
            .get_access_token(kongtie_gateway::proto::GetAccessTokenRequest::default())
            .await
            .unwrap_err();
    assert_eq!(error_info(&status).0, "UPSTREAM_SIGNATURE_REJECTED");
    // The RPC's end is logged after the failure itself.
    let log = wait_for_log(&bin, "GetAccessToken", "rpc finished").await;
    let refusals: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("refused the gateway's signature"))
        .collect();
    assert_eq!(refusals.len(), 1, "{log:#?}");
    let line = refusals[0];
    for part in [
        "WARN",
        "endpoint=\"GetAccessToken\"",
        "upstream_code=0001",
        "upstream_message=\"sign error\"",
        "check=\"KONGTIE_TOKEN and KONGTIE_SOURCE_FROM\"",
    ] {
        assert!(line.contains(part), "{part} in {line}");
    }
    assert!(log.iter().all(|l| !l.contains("a-wrong-token-42")));
}

/// The log lines so far, once one holds both `a` and `b` (within 10 s).
async fn wait_for_log(bin: &Binary, a: &str, b: &str) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = bin.log.lock().unwrap().clone();
        if log.iter().any(|l| l.contains(a) && l.contains(b)) {
            return log;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no log line with {a:?} and {b:?} within 10 s: {log:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_store_failure_is_unavailable_to_the_caller_and_only_the_log_has_its_text() {
    let dir = tempfile::tempdir().unwrap();
    let bin = Binary::start_in(&["serve"], dir.path(), None);
    // Break the store under the gateway: its consumer positions are gone.
    rusqlite::Connection::open(dir.path().join("notifications.db"))
        .unwrap()
        .execute_batch("DROP TABLE consumers")
        .unwrap();
    let status = kongtie_gateway::proto::payment_client::PaymentClient::connect(format!(
        "http://{}",
        bin.grpc
    ))
    .await
    .unwrap()
    .subscribe_notifications(kongtie_gateway::proto::SubscribeNotificationsRequest {
        consumer: "orders".into(),
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(error_info(&status).0, "STORE_UNAVAILABLE");
    assert_eq!(
        status.message(),
        "the notification store is unavailable; try again"
    );
    let log = wait_for_log(&bin, "store failure", "no such table").await;
    assert!(
        log.iter()
            .any(|l| l.contains("ERROR") && l.contains("no such table: consumers")),
        "{log:#?}"
    );
}

/// A small tmpfs mounted for one test (the tests run as root, as CI does),
/// unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "mounting a tmpfs failed: this test needs root (as CI has)"
        );
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_not_ready_while_the_disk_is_full_and_back_once_it_is_not() {
    let disk = Tmpfs::mount("2m");
    let data = disk.0.path().join("data");
    let bin = Binary::start_in(&["serve"], &data, None);
    let ready = || async {
        let resp = reqwest::get(format!("http://{}/readyz", bin.admin))
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    };
    assert_eq!(ready().await.0, 200);
    let http = reqwest::Client::new();
    let send = |id: String| {
        let http = http.clone();
        let url = bin.notify_url();
        async move {
            let resp = http
                .post(url)
                .body(payment_notification(&id, KTAPI_TOKEN))
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    assert_eq!(send("ROOM0".into()).await.1, "success");

    // Fill the disk to the last byte, then notify until the store's spare
    // room (the WAL's) runs out too.
    let filler = disk.0.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.write_all(&[0]);
    }
    let mut refused = None;
    for i in 1..2000 {
        match send(format!("ROOM{i}")).await {
            (200, _) => continue,
            (503, text) => {
                assert_eq!(text, "store unavailable, send again");
                refused = Some(i);
                break;
            }
            other => panic!("answered {other:?}"),
        }
    }
    let refused = refused.expect("a full disk refuses a notification within 2000");
    assert_eq!(
        ready().await,
        (503, "not ready: the store cannot write".into())
    );
    // It stays so while the disk is full: probes every second, checkpoints
    // every 500 ms fail, and neither floods the log.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ready().await.0, 503);
    let log = bin.log.lock().unwrap().clone();
    let count = |what: &str| log.iter().filter(|l| l.contains(what)).count();
    assert_eq!(count("the store cannot write"), 1, "{log:#?}");
    let metrics = admin_metrics(&bin.admin).await;
    // Checkpoints failed several times in those 3 s: one line.
    assert!(
        sample(&metrics, "kongtie_store_checkpoint_failures_total") >= 3.0,
        "{metrics}"
    );
    assert_eq!(count("checkpoint failed"), 1, "{log:#?}");
    assert_eq!(
        sample(
            &metrics,
            r#"kongtie_notifications_rejected_total{reason="store_unavailable"}"#
        ),
        1.0
    );

    // Room again: ready again without any traffic (the prober wrote), and
    // Kongtie's resend of the refused notification is stored.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ready().await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "not ready 10 s after space was freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for_log(&bin, "the store writes again", "INFO").await;
    assert_eq!(send(format!("ROOM{refused}")).await.1, "success");
    let stored = list_all(&bin.grpc).await;
    assert_eq!(stored.len(), refused + 1);
    drop(bin);
}

#[tokio::test]
async fn a_notification_signed_by_another_md5_implementation_is_accepted() {
    let app = spawn_app().await;
    let fields = [
        ("TradeStatus", "0000"),
        ("Message", "SUCCESS"),
        ("OutTradeId", "MD5SUM1"),
        ("TradeAmount", "1.00"),
        ("TradeOrderId", "984_77"),
        ("TradeBillNo", "2018030221001004080206230177"),
        ("TradeTime", "2018/3/2 10:00:39"),
        ("TimeStamp", "1522233465"),
    ];
    let text: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let sign = md5sum(&format!("{}&{KTAPI_TOKEN}", text.join("&")));
    let mut body = serde_json::Map::new();
    for (k, v) in fields {
        body.insert(k.into(), v.into());
    }
    body.insert("Sign".into(), sign.clone().into());
    let body = serde_json::Value::Object(body).to_string();
    assert_eq!(app.notify(body.clone()).await, (200, "success".into()));
    // One hex digit off: refused.
    let last = sign.chars().last().unwrap();
    let other = if last == '0' { '1' } else { '0' };
    let wrong = body.replace(&sign, &format!("{}{other}", &sign[..31]));
    assert_eq!(app.notify(wrong).await, (401, "bad signature".into()));
}
