//! Production posture: who may call, TLS, the internet-facing notify
//! listener, metrics, retries, graceful shutdown and secrets in logs.

use std::time::{Duration, Instant};

use futures::StreamExt;
use kongtie_gateway::{
    proto::{
        ExchangeOAuthCodeRequest, GetAccessTokenRequest, GetJsApiTicketRequest,
        ListNotificationsRequest, SubscribeNotificationsRequest, auth_client::AuthClient,
        payment_client::PaymentClient,
    },
    sandbox::{Fault, signed_notification},
    startup::Application,
    upstream::Endpoint,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};
use secrecy::SecretString;
use tonic::{
    Code, Request,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

use crate::helpers::*;

const KEY: &str = "test-api-key-0123456789";

fn keyed<T>(message: T, key: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    request
}

fn notification(id: &str, time_stamp: &str) -> String {
    let fields = [
        ("TradeStatus", "0000"),
        ("Message", "SUCCESS"),
        ("OutTradeId", id),
        ("TradeAmount", "0.20"),
        ("TradeOrderId", "984_1"),
        ("TradeBillNo", "2018030221001004080206230140"),
        ("TradeTime", "2018/3/2 10:00:39"),
        ("TimeStamp", time_stamp),
    ];
    signed_notification(&fields, &SecretString::from(KTAPI_TOKEN))
}

#[tokio::test]
async fn every_service_wants_a_right_key_and_health_stays_open() {
    let app = spawn_app_with(&["--api-keys", &format!("other-key,{KEY}")]).await;
    for key in [None, Some("wrong-key")] {
        let status = app
            .auth()
            .await
            .get_access_token(keyed(GetAccessTokenRequest::default(), key))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "Auth with {key:?}");
        let status = app
            .ticket()
            .await
            .get_js_api_ticket(keyed(GetJsApiTicketRequest::default(), key))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "Ticket with {key:?}");
        let status = app
            .payment()
            .await
            .create_jsapi_order(keyed(order("K1", 1), key))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "Payment with {key:?}");
    }
    assert!(
        app.sandbox.requests().is_empty(),
        "an unauthenticated call reached Kongtie"
    );

    app.auth()
        .await
        .get_access_token(keyed(GetAccessTokenRequest::default(), Some(KEY)))
        .await
        .unwrap();
    app.ticket()
        .await
        .get_js_api_ticket(keyed(GetJsApiTicketRequest::default(), Some("other-key")))
        .await
        .unwrap();
    app.payment()
        .await
        .list_notifications(keyed(ListNotificationsRequest::default(), Some(KEY)))
        .await
        .unwrap();
    assert!(app.is_serving().await, "health needs no key");
}

#[test]
fn reflection_needs_no_key_but_the_api_does() {
    let dir = tempfile::tempdir().unwrap();
    let bin = Binary::start_with(
        &["serve", "--sandbox", "--sandbox-addr", "127.0.0.1:0"],
        &[("KONGTIE_API_KEYS", KEY)],
        dir.path(),
        None,
    );
    let grpcurl = |args: &[&str]| {
        std::process::Command::new(grpcurl())
            .args(["-plaintext", "-max-time", "10"])
            .args(args)
            .output()
            .unwrap()
    };
    let list = grpcurl(&[&bin.grpc, "list"]);
    assert!(String::from_utf8_lossy(&list.stdout).contains("kongtie.v1.Payment"));
    let denied = grpcurl(&[&bin.grpc, "kongtie.v1.Auth/GetAccessToken"]);
    assert!(String::from_utf8_lossy(&denied.stderr).contains("Unauthenticated"));
    let header = format!("authorization: Bearer {KEY}");
    let allowed = grpcurl(&["-H", &header, &bin.grpc, "kongtie.v1.Auth/GetAccessToken"]);
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
}

#[tokio::test]
async fn keys_can_come_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys");
    std::fs::write(&file, format!("# the order service\n{KEY}\n\n")).unwrap();
    let app = spawn_app_with(&["--api-keys-file", file.to_str().unwrap()]).await;
    let mut auth = app.auth().await;
    assert_eq!(
        auth.get_access_token(keyed(GetAccessTokenRequest::default(), None))
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    auth.get_access_token(keyed(GetAccessTokenRequest::default(), Some(KEY)))
        .await
        .unwrap();
}

#[tokio::test]
async fn without_keys_a_public_address_is_refused_unless_explicitly_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let public = ["--grpc-addr", "0.0.0.0:0", "--data-dir", data];
    let err = Application::build(serve_args(&public).config().unwrap())
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("refusing to serve gRPC on 0.0.0.0:0 without API keys"),
        "{err}"
    );
    assert!(err.contains("--allow-unauthenticated"));
    let config = serve_args(&[&public[..], &["--allow-unauthenticated"]].concat())
        .config()
        .unwrap();
    Application::build(config)
        .await
        .expect("allowed when asked");
}

struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Names of their own: with rcgen's default name on both, OpenSSL (curl)
    // takes a leaf whose issuer is its own subject for self-signed.
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kongtie test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |name: &str, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.extended_key_usages = vec![usage];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf("localhost", ExtendedKeyUsagePurpose::ServerAuth);
    let (client_cert, client_key) = leaf("order-service", ExtendedKeyUsagePurpose::ClientAuth);
    Pki {
        ca: ca.pem(),
        server_cert,
        server_key,
        client_cert,
        client_key,
    }
}

async fn tls_channel(
    addr: std::net::SocketAddr,
    pki: &Pki,
    with_identity: bool,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost");
    if with_identity {
        tls = tls.identity(Identity::from_pem(&pki.client_cert, &pki.client_key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

#[tokio::test]
async fn grpc_over_tls_and_mutual_tls() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let (cert, key, ca) = (
        write("server.pem", &pki.server_cert),
        write("server.key", &pki.server_key),
        write("ca.pem", &pki.ca),
    );

    // TLS: a client that trusts our CA gets through; plaintext does not.
    let tls = spawn_app_with(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ])
    .await;
    let channel = tls_channel(tls.addr, &pki, false).await.unwrap();
    AuthClient::new(channel)
        .get_access_token(GetAccessTokenRequest::default())
        .await
        .unwrap();
    let plaintext = AuthClient::new(tls.channel().await)
        .get_access_token(GetAccessTokenRequest::default())
        .await;
    // The server's TLS handshake fails on a plaintext preface and it closes
    // the connection: a transport error, not an answer.
    let status = plaintext.expect_err("plaintext is refused by a TLS server");
    assert!(
        matches!(status.code(), Code::Unknown | Code::Unavailable)
            && status.message() == "transport error",
        "{status:?}"
    );

    // ALPN offers http/1.1 too: a Connect client that speaks only HTTP/1.1
    // (curl here, PHP's often) gets through TLS.
    let port = tls.addr.port();
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--http1.1", "--max-time", "10", "--cacert"])
        .arg(&ca)
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(["-H", "content-type: application/json", "-d", "{}"])
        .args(["-w", "\nHTTP/%{http_version} %{http_code}"])
        .arg(format!(
            "https://localhost:{port}/kongtie.v1.Auth/GetAccessToken"
        ))
        .output()
        .await
        .expect("curl");
    let (out, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.contains("\"accessToken\"") && out.ends_with("HTTP/1.1 200"),
        "{out} {err}"
    );

    // A connection that never starts its TLS handshake is closed at the
    // handshake timeout, and counted.
    let slow = spawn_app_with(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--grpc-handshake-timeout-ms",
        "1000",
    ])
    .await;
    let opened = std::time::Instant::now();
    let mut silent = tokio::net::TcpStream::connect(slow.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read(&mut silent, &mut buf),
    )
    .await
    .expect("closed within 10 s");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(
        opened.elapsed() >= Duration::from_millis(900),
        "{:?}",
        opened.elapsed()
    );
    let admin = slow.admin.to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sample(
        &admin_metrics(&admin).await,
        r#"kongtie_grpc_connections_closed_total{reason="tls_handshake"}"#,
    ) < 1.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "not counted within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Mutual TLS: without a client certificate, nothing.
    let mtls = spawn_app_with(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--tls-client-ca",
        ca.to_str().unwrap(),
    ])
    .await;
    // The server ends the handshake (TLS 1.3: the client hears it at its
    // first read): a transport error, never an answer.
    let refused = |outcome: Result<tonic::Response<_>, tonic::Status>, who: &str| {
        let status = outcome.expect_err(who);
        assert!(
            matches!(status.code(), Code::Unknown | Code::Unavailable)
                && status.message() == "transport error",
            "{who}: {status:?}"
        );
    };
    let channel = tls_channel(mtls.addr, &pki, false)
        .await
        .expect("the connection is lazy; the handshake happens at the call");
    refused(
        AuthClient::new(channel)
            .get_access_token(GetAccessTokenRequest::default())
            .await,
        "a client without a certificate got in",
    );
    // A certificate from another CA, however valid, does not get in.
    let stranger = self::pki();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost")
        .identity(Identity::from_pem(
            &stranger.client_cert,
            &stranger.client_key,
        ));
    let channel = Channel::from_shared(format!("https://{}", mtls.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("the connection is lazy; the handshake happens at the call");
    refused(
        AuthClient::new(channel)
            .get_access_token(GetAccessTokenRequest::default())
            .await,
        "a client certificate from another CA got in",
    );
    let channel = tls_channel(mtls.addr, &pki, true).await.unwrap();
    AuthClient::new(channel)
        .get_access_token(GetAccessTokenRequest::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn the_notify_listener_refuses_sources_outside_the_allowlist() {
    let app = spawn_app_with(&["--notify-allow", "10.0.0.0/8,192.168.0.0/16"]).await;
    let (status, reason) = app.notify(notification("N1", "1522233465")).await;
    assert_eq!((status, reason.as_str()), (403, "source not allowed"));

    // Behind a trusted proxy, the forwarded address counts.
    let proxied = spawn_app_with(&[
        "--notify-allow",
        "10.0.0.0/8",
        "--trusted-proxies",
        "127.0.0.1/32",
    ])
    .await;
    let post = |url: String, forwarded: &'static str| async move {
        reqwest::Client::new()
            .post(url)
            .header("x-forwarded-for", forwarded)
            .body(notification("N2", "1522233465"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(post(proxied.notify_url.clone(), "10.1.2.3").await, 200);
    assert_eq!(post(proxied.notify_url.clone(), "203.0.113.5").await, 403);
    // An untrusted peer's X-Forwarded-For is ignored.
    assert_eq!(post(app.notify_url.clone(), "10.1.2.3").await, 403);

    let listed = |app: &TestApp| {
        let addr = app.addr;
        async move {
            PaymentClient::connect(format!("http://{addr}"))
                .await
                .unwrap()
                .list_notifications(ListNotificationsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .notifications
                .len()
        }
    };
    assert_eq!(listed(&app).await, 0);
    assert_eq!(listed(&proxied).await, 1);
}

#[tokio::test]
async fn a_maximum_age_refuses_old_timestamps() {
    let app = spawn_app_with(&["--notify-max-age-secs", "300"]).await;
    let (status, reason) = app.notify(notification("A1", "1522233465")).await;
    assert_eq!(status, 400);
    assert!(reason.contains("TimeStamp"));
    let now = chrono::Utc::now().timestamp().to_string();
    assert_eq!(
        app.notify(notification("A1", &now)).await,
        (200, "success".into())
    );
}

async fn metrics(app: &TestApp) -> String {
    admin_metrics(&app.admin.to_string()).await
}

#[tokio::test]
async fn the_admin_port_serves_moving_metrics_and_readiness() {
    let app = spawn_app().await;
    let ready = reqwest::get(format!("http://{}/readyz", app.admin))
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    let healthy = reqwest::get(format!("http://{}/healthz", app.admin))
        .await
        .unwrap();
    assert_eq!(healthy.status().as_u16(), 200);

    let before = metrics(&app).await;
    let mut auth = app.auth().await;
    auth.get_access_token(GetAccessTokenRequest::default())
        .await
        .unwrap();
    auth.get_access_token(GetAccessTokenRequest::default())
        .await
        .unwrap();
    let refused = auth
        .exchange_o_auth_code(ExchangeOAuthCodeRequest {
            code: "nosuchcode".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert_eq!(error_info(&refused).0, "OAUTH_CODE_REJECTED");
    let mut stream = app
        .payment()
        .await
        .subscribe_notifications(SubscribeNotificationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    app.notify(notification("M1", "1")).await;
    app.notify(notification("M1", "2")).await;
    app.notify("not json").await;
    stream.next().await.unwrap().unwrap();

    let after = metrics(&app).await;
    for (series, delta) in [
        (
            r#"kongtie_upstream_calls_total{endpoint="GetAccessToken",outcome="ok"}"#,
            1.0,
        ),
        (
            r#"kongtie_upstream_calls_total{endpoint="GetWeChatAccessToken",outcome="rejected"}"#,
            1.0,
        ),
        (
            r#"kongtie_upstream_call_seconds_count{endpoint="GetAccessToken"}"#,
            1.0,
        ),
        (
            r#"kongtie_cache_lookups_total{cache="access_token",result="hit"}"#,
            1.0,
        ),
        (
            r#"kongtie_cache_lookups_total{cache="access_token",result="miss"}"#,
            1.0,
        ),
        (
            r#"kongtie_notifications_received_total{outcome="stored"}"#,
            1.0,
        ),
        (
            r#"kongtie_notifications_received_total{outcome="duplicate"}"#,
            1.0,
        ),
        (
            r#"kongtie_notifications_rejected_total{reason="malformed"}"#,
            1.0,
        ),
        ("kongtie_subscribers", 1.0),
        ("kongtie_store_commit_seconds_count", 2.0),
    ] {
        assert_eq!(
            sample(&after, series) - sample(&before, series),
            delta,
            "{series}\n{after}"
        );
    }
    // The subscriber gauge goes down when the subscriber goes away.
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sample(&metrics(&app).await, "kongtie_subscribers")
        != sample(&before, "kongtie_subscribers")
    {
        assert!(
            Instant::now() < deadline,
            "kongtie_subscribers did not go down within 10 s of the client leaving"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn token_fetches_are_retried_and_orders_and_codes_are_not() {
    let app = spawn_app().await;
    app.sandbox.set_fault(Some(Fault::Flaky {
        status: 503,
        times: 2,
    }));
    app.access_token().await.expect("two 503s then success");
    assert_eq!(app.sandbox.calls(Endpoint::GetAccessToken), 3);

    app.sandbox.set_fault(Some(Fault::Flaky {
        status: 503,
        times: 1,
    }));
    let status = app
        .payment()
        .await
        .create_jsapi_order(order("R1", 1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(
        app.sandbox.calls(Endpoint::ParTrade),
        1,
        "a 503 may have created the order"
    );

    app.sandbox.set_fault(Some(Fault::Flaky {
        status: 503,
        times: 1,
    }));
    let code = app.sandbox.issue_code(None, None);
    let status = app
        .auth()
        .await
        .exchange_o_auth_code(ExchangeOAuthCodeRequest { code })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(app.sandbox.calls(Endpoint::GetWeChatAccessToken), 1);
}

#[tokio::test]
async fn an_order_is_retried_when_the_connection_never_happened() {
    let down = closed_port().await;
    let pay_url = format!("http://{down}/v5/ParTrade.ashx");
    let app = spawn_app_with(&["--pay-url", &pay_url]).await;
    let status = app
        .payment()
        .await
        .create_jsapi_order(order("R2", 1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    let text = metrics(&app).await;
    assert_eq!(
        sample(
            &text,
            r#"kongtie_upstream_calls_total{endpoint="ParTrade",outcome="unavailable"}"#
        ),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_subscriptions_unavailable_keeps_every_acknowledged_notification_and_exits_zero()
 {
    let dir = tempfile::tempdir().unwrap();
    // SQLite, or PostgreSQL with KONGTIE_TEST_STORE=postgres.
    let store = test_store_args(dir.path());
    let args: Vec<&str> = ["serve", "--shutdown-grace-secs", "5"]
        .into_iter()
        .chain(store.iter().map(String::as_str))
        .collect();
    let mut bin = Binary::start_in(&args, dir.path(), None);
    let url = bin.notify_url();
    let mut stream = subscribe_at(&bin.grpc).await;

    let (acknowledged, senders) = flood(&url, "T", 8);
    let ready = reqwest::get(format!("http://{}/readyz", bin.admin))
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    until_acknowledged(&acknowledged, 100).await;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &bin.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let signalled = Instant::now();

    // The subscription ends with UNAVAILABLE (after what it was sent).
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("the stream ends")
        {
            Some(Ok(_)) => continue,
            Some(Err(status)) => break status.code(),
            None => panic!("the stream ended without a status"),
        }
    };
    assert_eq!(end, Code::Unavailable);

    let exit = loop {
        if let Some(exit) = bin.child.try_wait().unwrap() {
            break exit;
        }
        // The grace is 5 s; 10 s of slack for a loaded machine (the SIGINT
        // test shows the grace bounding a call that outlasts it).
        assert!(
            signalled.elapsed() < Duration::from_secs(15),
            "still running 10 s past the grace period"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "exit status {exit:?}");
    for s in senders {
        s.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();

    let bin = Binary::start_in(&args, dir.path(), None);
    let stored: std::collections::HashSet<String> = list_all(&bin.grpc)
        .await
        .into_iter()
        .map(|n| n.out_trade_id)
        .collect();
    for id in &acknowledged {
        assert!(stored.contains(id), "{id} was answered success but is gone");
    }
}

#[test]
fn a_full_run_logs_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Kongtie is a sandbox of the test's own, so every Sign it received and
    // every Sign it sent can be looked for in the log.
    let sandbox = rt.block_on(async {
        let mut config = kongtie_gateway::config::sandbox_config(
            &serve_args(&[
                "--token",
                "ktapi-secret-token-xyz",
                "--pay-token",
                "pay-secret-token-xyz",
            ])
            .kongtie,
            APP_ID.into(),
            Duration::from_secs(7200),
        );
        config.resend_delays = vec![Duration::from_millis(20); 10];
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        kongtie_gateway::sandbox::SandboxHandle::spawn(config, listener).unwrap()
    });
    let (ktapi, pay) = (
        sandbox.ktapi_url().to_string(),
        sandbox.pay_url().to_string(),
    );
    let mut bin = Binary::start_with(
        &["serve", "--ktapi-url", &ktapi, "--pay-url", &pay],
        &[
            ("RUST_LOG", "trace"),
            ("KONGTIE_LOG_FORMAT", "json"),
            ("KONGTIE_API_KEYS", KEY),
            ("KONGTIE_TOKEN", "ktapi-secret-token-xyz"),
            ("KONGTIE_PAY_TOKEN", "pay-secret-token-xyz"),
            ("KONGTIE_WECHAT_APP_ID", APP_ID),
        ],
        dir.path(),
        None,
    );
    sandbox.set_notify_url(bin.notify_url().parse().unwrap());
    let mut secrets = rt.block_on(async {
        let channel = Channel::from_shared(format!("http://{}", bin.grpc))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut auth = AuthClient::new(channel.clone());
        let token = auth
            .get_access_token(keyed(GetAccessTokenRequest::default(), Some(KEY)))
            .await
            .unwrap()
            .into_inner()
            .access_token;
        let ticket = kongtie_gateway::proto::ticket_client::TicketClient::new(channel.clone())
            .get_js_api_ticket(keyed(GetJsApiTicketRequest::default(), Some(KEY)))
            .await
            .unwrap()
            .into_inner()
            .ticket;
        let code = sandbox.issue_code(None, None);
        let web = auth
            .exchange_o_auth_code(keyed(
                ExchangeOAuthCodeRequest { code: code.clone() },
                Some(KEY),
            ))
            .await
            .unwrap()
            .into_inner();
        PaymentClient::new(channel.clone())
            .create_jsapi_order(keyed(order("LOG1", 20), Some(KEY)))
            .await
            .unwrap();
        assert!(sandbox.pay("LOG1"));
        // A notification we sign ourselves, to know its Sign.
        let fields = [
            ("TradeStatus", "0000"),
            ("Message", "SUCCESS"),
            ("OutTradeId", "LOG2"),
            ("TradeAmount", "0.20"),
            ("TradeOrderId", "984_2"),
            ("TradeBillNo", "2"),
            ("TradeTime", "2018/3/2 10:00:39"),
            ("TimeStamp", "1522233465"),
        ];
        let body = signed_notification(&fields, &SecretString::from("ktapi-secret-token-xyz"));
        let sign: serde_json::Value = serde_json::from_str(&body).unwrap();
        let resp = reqwest::Client::new()
            .post(bin.notify_url())
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.text().await.unwrap(), "success");
        // The sandbox's own notification of LOG1 was taken too.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sandbox.notify_attempts().iter().any(|a| a.acknowledged) {
            assert!(
                Instant::now() < deadline,
                "the sandbox's notification was not taken"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        vec![
            token,
            ticket,
            code,
            web.access_token,
            web.refresh_token,
            sign["Sign"].as_str().unwrap().to_owned(),
            KEY.to_owned(),
            "ktapi-secret-token-xyz".to_owned(),
            "pay-secret-token-xyz".to_owned(),
            "wsscr6zfppd8v46b5678f8fxh2xdhv0d22xlx08h8btn6ttxxx4aab3".to_owned(),
        ]
    });
    // Every Sign Kongtie received (ktapi and ParTrade) and sent.
    let received: Vec<String> = sandbox.requests().into_iter().map(|r| r.sign).collect();
    let sent: Vec<String> = sandbox
        .notify_attempts()
        .into_iter()
        .map(|a| a.sign)
        .collect();
    assert!(
        received.len() >= 4 && !sent.is_empty(),
        "{received:?} {sent:?}"
    );
    secrets.extend(received);
    secrets.extend(sent);
    assert!(secrets.iter().all(|s| s.len() >= 8), "{secrets:?}");

    // The whole log: after the process has ended and its last line is out.
    let log = bin.stop_and_read_log();
    assert!(
        log.contains("notification stored"),
        "the log covers the run"
    );
    assert!(
        log.contains("\"level\":\"TRACE\""),
        "the log is at trace level"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("/kongtie.v1.Auth/GetAccessToken") && l.contains("rpc finished")),
        "each RPC logs its end"
    );
    for secret in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "a secret ({} chars) is in the log",
            secret.len()
        );
    }
}

#[test]
fn the_example_configuration_file_is_refused_until_its_placeholders_are_replaced() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kongtie-gateway.env.example"
    ))
    .unwrap();
    let vars: Vec<(&str, &str)> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split_once('=').expect("NAME=value"))
        .collect();
    assert!(vars.iter().any(|(k, _)| *k == "KONGTIE_API_KEYS"));
    // As it is, the file starts nothing: the first placeholder is named.
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_kongtie-gateway"))
        .arg("serve")
        .envs(vars.iter().copied())
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("KONGTIE_TOKEN still holds the example file's placeholder"),
        "{err}"
    );
    // Each placeholder replaced, it starts. The listener flags Binary adds
    // (port 0, a temporary data directory) override the file's addresses.
    let filled: Vec<(&str, String)> = vars
        .iter()
        .map(|(k, v)| (*k, v.replace("change-me", "real")))
        .collect();
    let vars: Vec<(&str, &str)> = filled.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let dir = tempfile::tempdir().unwrap();
    let bin = Binary::start_with(&["serve"], &vars, dir.path(), None);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ready = reqwest::get(format!("http://{}/readyz", bin.admin))
            .await
            .unwrap();
        assert_eq!(ready.status().as_u16(), 200);
        let status = AuthClient::connect(format!("http://{}", bin.grpc))
            .await
            .unwrap()
            .get_access_token(GetAccessTokenRequest::default())
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::Unauthenticated,
            "the file's keys are in force"
        );
    });
    let log = bin.log.lock().unwrap().join("\n");
    assert!(log.starts_with('{'), "the file asks for JSON logs");
}

/// SIGINT (Ctrl-C) is a shutdown like SIGTERM: readiness and health (the
/// server as a whole, service "", which probes ask) turn NOT_SERVING at once, the gRPC listener stops accepting, an RPC in flight
/// finishes, and one that outlasts the grace period does not hold the
/// process: it exits 0 when the grace runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_readiness_at_once_lets_a_call_in_flight_finish_and_the_grace_bounds_the_rest()
{
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let sandbox = spawn_sandbox().await;
    let (ktapi, pay) = (
        sandbox.ktapi_url().to_string(),
        sandbox.pay_url().to_string(),
    );
    let mut bin = Binary::start(&[
        "serve",
        "--ktapi-url",
        &ktapi,
        "--pay-url",
        &pay,
        "--shutdown-grace-secs",
        "3",
    ]);
    let channel = Channel::from_shared(format!("http://{}", bin.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();

    // In flight at the signal: a token call Kongtie answers after 1.5 s, and
    // a ticket call (behind the same token, then its own request) that
    // Kongtie answers after 20 s, past the grace period.
    sandbox.set_fault(Some(Fault::Delay(Duration::from_millis(1500))));
    let short = tokio::spawn({
        let mut auth = AuthClient::new(channel.clone());
        async move {
            auth.get_access_token(GetAccessTokenRequest::default())
                .await
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while sandbox.calls(Endpoint::GetAccessToken) == 0 {
        assert!(Instant::now() < deadline, "the token request never came");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sandbox.set_fault(Some(Fault::Delay(Duration::from_secs(20))));
    let long = tokio::spawn({
        let mut ticket = kongtie_gateway::proto::ticket_client::TicketClient::new(channel.clone());
        async move {
            ticket
                .get_js_api_ticket(GetJsApiTicketRequest::default())
                .await
        }
    });
    // The ticket call has reached the gateway (it waits there for the token).
    let started = r#"grpc_server_started_total{grpc_type="unary",grpc_service="kongtie.v1.Ticket",grpc_method="GetJsApiTicket"}"#;
    let deadline = Instant::now() + Duration::from_secs(10);
    while sample(&admin_metrics(&bin.admin).await, started) < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the ticket call never reached the gateway"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let serving = watch.message().await.unwrap().unwrap();
    assert_eq!(serving.status, ServingStatus::Serving as i32);

    let status = std::process::Command::new("kill")
        .args(["-INT", &bin.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let signalled = Instant::now();

    // Readiness and health turn at once (well before the short call ends).
    let admin = bin.admin.clone();
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let ready = reqwest::get(format!("http://{admin}/readyz"))
            .await
            .unwrap();
        if ready.status().as_u16() == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still 200 a second after SIGINT"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A health watcher (as load balancers use) hears NOT_SERVING before
    // its stream ends with the connection's GOAWAY.
    let heard = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("the watcher heard of the shutdown")
        .unwrap()
        .expect("a status before the stream ended");
    assert_eq!(heard.status, ServingStatus::NotServing as i32);
    // No new connection is taken.
    let fresh = tokio::time::timeout(
        Duration::from_secs(5),
        AuthClient::connect(format!("http://{}", bin.grpc)),
    )
    .await
    .expect("a connection attempt ends");
    assert!(fresh.is_err(), "a new connection was accepted after SIGINT");

    // The call in flight finishes with its answer.
    let token = tokio::time::timeout(Duration::from_secs(10), short)
        .await
        .expect("the call in flight finished")
        .unwrap()
        .expect("the call in flight was answered");
    assert!(!token.into_inner().access_token.is_empty());

    // The one past the grace does not hold the process: it exits 0 at the
    // grace (3 s), not at the 20 s answer, and the call gets no answer.
    let exit = loop {
        if let Some(exit) = bin.child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(10),
            "still running 10 s after SIGINT with a 3 s grace"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = signalled.elapsed();
    assert!(exit.success(), "exit status {exit:?}");
    assert!(
        took >= Duration::from_secs(3),
        "exited after {took:?}, before the grace ran out"
    );
    let long = tokio::time::timeout(Duration::from_secs(10), long)
        .await
        .expect("the long call ended with the process")
        .unwrap();
    assert!(long.is_err(), "{long:?}");
    let log = bin.log.lock().unwrap().join("\n");
    assert!(log.contains("grace period over"), "{log}");
}

/// Server reflection answers in both versions (grpcurl 1.8 speaks
/// v1alpha, newer clients v1), and health reports each service by name.
#[tokio::test]
async fn reflection_v1_and_v1alpha_list_the_api_and_health_answers_per_service() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    use tonic_reflection::pb::{v1, v1alpha};
    let app = spawn_app().await;
    let expected = [
        "kongtie.v1.Auth",
        "kongtie.v1.Payment",
        "kongtie.v1.Ticket",
        "grpc.health.v1.Health",
    ];

    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut answers =
        v1::server_reflection_client::ServerReflectionClient::new(app.channel().await)
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
    let answer = answers.message().await.unwrap().expect("a v1 answer");
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answer.message_response
    else {
        panic!("not a service list: {answer:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in expected {
        assert!(
            names.iter().any(|n| n == service),
            "v1: {service} in {names:?}"
        );
    }

    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut answers =
        v1alpha::server_reflection_client::ServerReflectionClient::new(app.channel().await)
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
    let answer = answers.message().await.unwrap().expect("a v1alpha answer");
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answer.message_response
    else {
        panic!("not a service list: {answer:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in expected {
        assert!(
            names.iter().any(|n| n == service),
            "v1alpha: {service} in {names:?}"
        );
    }

    let mut health = HealthClient::new(app.channel().await);
    for service in [
        "",
        "kongtie.v1.Auth",
        "kongtie.v1.Ticket",
        "kongtie.v1.Payment",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "kongtie.v1.Nothing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
}

/// `KONGTIE_MAX_CONNECTION_AGE_SECS`: a connection is retired by GOAWAY at
/// its age (a raw HTTP/2 client sees the server close it gracefully), and a
/// subscription ends UNAVAILABLE within its jitter (±10%).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_connections_get_a_goaway_and_subscriptions_end_within_their_jitter() {
    const AGE: Duration = Duration::from_secs(2);
    let app = spawn_app_with(&["--max-connection-age-secs", "2"]).await;

    let tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let opened = Instant::now();
    let (_send, connection) = h2::client::handshake(tcp).await.unwrap();
    let closed = tokio::time::timeout(AGE + Duration::from_secs(10), connection)
        .await
        .expect("the server retired the connection");
    let lived = opened.elapsed();
    // A GOAWAY with NO_ERROR, then the end: a graceful close, not a reset.
    assert!(closed.is_ok(), "{closed:?}");
    assert!(lived >= AGE.mul_f64(0.95), "retired after {lived:?}");

    let started = Instant::now();
    let mut stream = app
        .payment()
        .await
        .subscribe_notifications(kongtie_gateway::proto::SubscribeNotificationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let end = tokio::time::timeout(AGE + Duration::from_secs(10), stream.message())
        .await
        .expect("the subscription ended")
        .expect_err("it ends with a status");
    let lasted = started.elapsed();
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    assert!(end.message().contains("maximum age"), "{}", end.message());
    assert!(
        lasted >= AGE.mul_f64(0.9) - Duration::from_millis(50),
        "ended after {lasted:?}, before its jitter allows"
    );
}

/// Every variable the binary reads (its `--help` lists them) is in the
/// README's settings and in the example configuration: the two cannot
/// drift from the code unnoticed.
#[test]
fn every_setting_is_documented_in_the_readme_and_the_example_file() {
    let read = |path: &str| {
        std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    };
    let (readme, example) = (
        read("README.md"),
        read("deploy/kongtie-gateway.env.example"),
    );
    let mut vars = std::collections::BTreeSet::new();
    for command in ["serve", "sandbox", "check", "backup"] {
        let help = std::process::Command::new(env!("CARGO_BIN_EXE_kongtie-gateway"))
            .args([command, "--help"])
            .output()
            .unwrap();
        assert!(help.status.success(), "{command} --help");
        let text = String::from_utf8(help.stdout).unwrap();
        vars.extend(
            text.split("[env: ")
                .skip(1)
                .filter_map(|s| s.split(['=', ']']).next())
                .map(str::to_owned),
        );
    }
    assert!(vars.len() > 40, "{vars:?}");
    let undocumented: Vec<&String> = vars
        .iter()
        .filter(|v| !readme.contains(&format!("`{v}`")) || !example.contains(v.as_str()))
        .collect();
    assert!(
        undocumented.is_empty(),
        "not in the README's settings or the example file: {undocumented:?}"
    );
}

/// Takes a listening socket away from the process the kernel's own way
/// (`ss -K`, iproute2): from then on, accepting on it fails (EINVAL) for
/// good.
fn destroy_listening_socket(addr: &str) {
    let status = std::process::Command::new("ss")
        .args(["-K", "-t", "state", "listening", "src", addr])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("ss (iproute2)");
    assert!(status.success(), "ss -K {addr}");
}

/// Each of the three listeners in turn loses its socket: the process does
/// not go on serving the other two (with /readyz at 200), it shuts them
/// down and exits non-zero, naming the listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_ends_early_shuts_the_process_down_with_a_failure() {
    for (which, name) in [
        ("notify", "notify listener"),
        ("grpc", "gRPC server"),
        ("admin", "admin listener"),
    ] {
        let bin = Binary::start(&["serve", "--sandbox", "--sandbox-addr", "127.0.0.1:0"]);
        let ready = reqwest::get(format!("http://{}/readyz", bin.admin))
            .await
            .unwrap();
        assert_eq!(ready.status(), 200, "{which}");
        let addr = match which {
            "notify" => bin.notify.clone(),
            "grpc" => bin.grpc.clone(),
            _ => bin.admin.clone(),
        };
        destroy_listening_socket(&addr);
        let log = std::sync::Arc::clone(&bin.log);
        let status = exit_within(bin, Duration::from_secs(15)).await;
        assert!(!status.success(), "{which}: {status:?}");
        let log = log.lock().unwrap().join("\n");
        assert!(
            log.contains(&format!("the {name} ended before shutdown")),
            "{which}: {log}"
        );
    }
}
