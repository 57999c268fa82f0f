//! The command-line path: the real binary, driven by a real grpcurl (1.8,
//! server reflection v1alpha) exactly as the README does.

use std::{process::Command, time::Duration};

use crate::helpers::{Binary, grpcurl};

/// The binary on its sandbox, on SQLite or (KONGTIE_TEST_STORE=postgres)
/// PostgreSQL, with more environment.
fn start_binary_with(env: &[(&str, &str)]) -> Binary {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_owned();
    let store = crate::helpers::test_store_args(&dir);
    let args: Vec<&str> = ["serve", "--sandbox", "--sandbox-addr", "127.0.0.1:0"]
        .into_iter()
        .chain(store.iter().map(String::as_str))
        .collect();
    Binary::start_with(&args, env, &dir, Some(data))
}

fn start_binary() -> Binary {
    start_binary_with(&[])
}

fn run_grpcurl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(grpcurl())
        .args(["-plaintext", "-max-time", "10"])
        .args(args)
        .output()
        .expect("running grpcurl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn grpcurl_lists_every_service_through_reflection() {
    let bin = start_binary();
    let (ok, out, err) = run_grpcurl(&[&bin.grpc, "list"]);
    assert!(ok, "{err}");
    for service in [
        "kongtie.v1.Auth",
        "kongtie.v1.Ticket",
        "kongtie.v1.Payment",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            out.lines().any(|l| l == service),
            "{service} missing from:\n{out}"
        );
    }
}

#[test]
fn grpcurl_drives_every_rpc_against_the_sandbox() {
    let mut bin = start_binary_with(&[("RUST_LOG", "trace")]);
    let call = |method: &str, body: &str| {
        let (ok, out, err) = run_grpcurl(&["-d", body, &bin.grpc, method]);
        assert!(ok, "{method}: {err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let token = call("kongtie.v1.Auth/GetAccessToken", "{}");
    assert!(token["accessToken"].as_str().unwrap().starts_with("SBXAT_"));
    let ticket = call("kongtie.v1.Ticket/GetJsApiTicket", "{}");
    assert!(ticket["ticket"].as_str().unwrap().starts_with("SBXTK_"));
    let config = call(
        "kongtie.v1.Ticket/SignJsSdkConfig",
        r#"{"url": "https://shop.example.com/pay#top"}"#,
    );
    assert_eq!(config["signature"].as_str().unwrap().len(), 40);
    let url = call(
        "kongtie.v1.Auth/BuildAuthorizeUrl",
        r#"{"redirect_uri": "https://shop.example.com/cb", "scope": "SCOPE_BASE", "state": "s1"}"#,
    );
    assert!(url["url"].as_str().unwrap().ends_with("#wechat_redirect"));
    let order = call(
        "kongtie.v1.Payment/CreateJsapiOrder",
        r#"{"out_trade_id": "A1001", "amount_fen": 20, "openid": "oeQDZtzvDoD-OmTmyJH6rGAX8odc"}"#,
    );
    assert!(
        order["payParams"]["package"]
            .as_str()
            .unwrap()
            .starts_with("prepay_id=")
    );

    // An OAuth code from the sandbox-only endpoint, as the README does.
    let issued = std::process::Command::new("curl")
        .args([
            "-s",
            "-X",
            "POST",
            &format!("http://{}/sandbox/oauth/codes", bin.sandbox()),
        ])
        .output();
    let code = match issued {
        Ok(out) if out.status.success() => serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap()["code"]
            .as_str()
            .unwrap()
            .to_owned(),
        _ => http_post_code(&bin.sandbox()),
    };
    let web = call(
        "kongtie.v1.Auth/ExchangeOAuthCode",
        &format!(r#"{{"code": "{code}"}}"#),
    );
    assert_eq!(web["expiresInSeconds"], "7200");

    // The whole log of all that, at trace level, read after the process
    // ended, holds no secret.
    let log = bin.stop_and_read_log();
    assert!(log.contains("gRPC listening"), "the log was captured");
    assert!(log.contains("TRACE"), "the log is at trace level");
    for secret in [
        token["accessToken"].as_str().unwrap(),
        ticket["ticket"].as_str().unwrap(),
        web["accessToken"].as_str().unwrap(),
        web["refreshToken"].as_str().unwrap(),
        &code,
        "#wugf543sxcv5*$#",
        crate::helpers::KTAPI_TOKEN,
    ] {
        assert!(!log.contains(secret), "a secret is in the log");
    }
}

#[test]
fn grpcurl_shows_the_rich_error_details() {
    let bin = start_binary();
    let (ok, _, err) = run_grpcurl(&[
        "-d",
        r#"{"out_trade_id": "A-1", "amount_fen": 0, "openid": "o1"}"#,
        &bin.grpc,
        "kongtie.v1.Payment/CreateJsapiOrder",
    ]);
    assert!(!ok);
    assert!(err.contains("Code: InvalidArgument"), "{err}");
    assert!(err.contains(r#""field":"out_trade_id""#), "{err}");
    assert!(err.contains(r#""field":"amount_fen""#), "{err}");
}

/// Issues a sandbox OAuth code over a plain TCP HTTP/1.1 request, for
/// machines without curl.
fn http_post_code(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "POST /sandbox/oauth/codes HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let body = response.split("\r\n\r\n").nth(1).unwrap();
    serde_json::from_str::<serde_json::Value>(body).unwrap()["code"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The README's order walk-through: an order, the sandbox paying it once
/// with its amount and once with another, the ledger and the checks seen
/// through grpcurl.
#[test]
fn grpcurl_walks_the_order_ledger_and_the_mismatch_path() {
    let bin = start_binary();
    let call = |method: &str, body: &str| {
        let (ok, out, err) = run_grpcurl(&["-d", body, &bin.grpc, method]);
        assert!(ok, "{method}: {err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let order =
        r#"{"out_trade_id": "A1001", "amount_fen": 20, "openid": "oeQDZtzvDoD-OmTmyJH6rGAX8odc"}"#;
    let first = call("kongtie.v1.Payment/CreateJsapiOrder", order);
    let again = call("kongtie.v1.Payment/CreateJsapiOrder", order);
    assert_eq!(first, again, "the stored answer");
    let got = call(
        "kongtie.v1.Payment/GetOrder",
        r#"{"out_trade_id": "A1001"}"#,
    );
    assert_eq!(got["order"]["state"], "ORDER_STATE_CREATED");
    assert_eq!(got["order"]["amountFen"], "20");

    let pay = |query: &str| {
        let url = format!("http://{}/sandbox/orders/A1001/pay{query}", bin.sandbox());
        let out = Command::new("curl")
            .args(["-s", "-f", "-X", "POST", &url])
            .output()
            .expect("curl");
        assert!(out.status.success(), "{url}");
    };
    let listed = |count: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let page = call(
                "kongtie.v1.Payment/ListNotifications",
                r#"{"out_trade_id": "A1001"}"#,
            );
            let n = page["notifications"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if n.len() >= count {
                return n;
            }
            assert!(std::time::Instant::now() < deadline, "{page}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    pay("?amount=0.01");
    let n = listed(1);
    assert_eq!(n[0]["orderCheck"], "ORDER_CHECK_AMOUNT_MISMATCH");
    let got = call(
        "kongtie.v1.Payment/GetOrder",
        r#"{"out_trade_id": "A1001"}"#,
    );
    assert_eq!(got["order"]["state"], "ORDER_STATE_CREATED", "not paid");

    pay("");
    let n = listed(2);
    assert_eq!(n[1]["orderCheck"], "ORDER_CHECK_MATCHED");
    let got = call(
        "kongtie.v1.Payment/GetOrder",
        r#"{"out_trade_id": "A1001"}"#,
    );
    assert_eq!(got["order"]["state"], "ORDER_STATE_PAID");
    assert_eq!(got["order"]["paidSequence"], n[1]["sequence"]);

    call(
        "kongtie.v1.Payment/AckNotifications",
        &format!(
            r#"{{"consumer": "orders", "sequence": {}}}"#,
            n[0]["sequence"].as_str().unwrap()
        ),
    );
    let consumer = call("kongtie.v1.Payment/GetConsumer", r#"{"name": "orders"}"#);
    assert_eq!(consumer["consumer"]["kind"], "CONSUMER_KIND_CURSOR");
    assert_eq!(consumer["consumer"]["lag"], "1");
    let consumers = call("kongtie.v1.Payment/ListConsumers", "{}");
    assert_eq!(consumers["consumers"][0]["name"], "orders");

    let paid = call(
        "kongtie.v1.Payment/ListOrders",
        r#"{"state": "ORDER_STATE_PAID"}"#,
    );
    assert_eq!(paid["orders"][0]["outTradeId"], "A1001");

    let (ok, _, err) = run_grpcurl(&[
        "-d",
        r#"{"out_trade_id": "A1001", "amount_fen": 30, "openid": "oeQDZtzvDoD-OmTmyJH6rGAX8odc"}"#,
        &bin.grpc,
        "kongtie.v1.Payment/CreateJsapiOrder",
    ]);
    assert!(!ok);
    assert!(err.contains("Code: AlreadyExists"), "{err}");
    assert!(err.contains("ORDER_TERMS_DIFFER"), "{err}");
}
