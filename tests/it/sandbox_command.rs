//! The standalone `kongtie-gateway sandbox`, as the README runs it beside a
//! gateway: it names the URLs to point the gateway at, and a payment is
//! notified to its `--notify-url`.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use kongtie_gateway::{
    proto::{ListNotificationsRequest, payment_client::PaymentClient},
    sandbox::{KTAPI_PREFIX, PAY_PATH},
};

use crate::helpers::{APP_ID, KTAPI_TOKEN, PAY_TOKEN, order, run_app, serve_args, store_url};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_command_notifies_its_notify_url() {
    // The sandbox's port, chosen first so the gateway can be pointed at it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let (ktapi, pay) = (format!("{base}{KTAPI_PREFIX}"), format!("{base}{PAY_PATH}"));
    let dir = tempfile::tempdir().unwrap();
    let mut config = serve_args(&["--ktapi-url", &ktapi, "--pay-url", &pay])
        .config()
        .unwrap();
    config.store_url = store_url(dir.path());
    let gateway = run_app(config).await;

    let mut sandbox = Killed(
        Command::new(env!("CARGO_BIN_EXE_kongtie-gateway"))
            .args(["sandbox", "--addr", &format!("127.0.0.1:{port}")])
            .args(["--notify-url", &gateway.notify_url])
            .args(["--token", KTAPI_TOKEN, "--pay-token", PAY_TOKEN])
            .args(["--wechat-app-id", APP_ID])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel();
    let stderr = BufReader::new(sandbox.0.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // It says where to point a gateway, and where it notifies.
    let named = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the sandbox started within 30 s");
        if line.contains("--ktapi-url") {
            break line;
        }
    };
    for url in [&ktapi, &pay, &gateway.notify_url] {
        assert!(named.contains(url.as_str()), "{url} not in {named}");
    }

    let mut payment = PaymentClient::connect(format!("http://{}", gateway.grpc))
        .await
        .unwrap();
    payment.create_jsapi_order(order("SB1", 20)).await.unwrap();
    let paid = reqwest::Client::new()
        .post(format!("{base}/sandbox/orders/SB1/pay"))
        .send()
        .await
        .unwrap();
    assert_eq!(paid.status().as_u16(), 202);
    let answer: serde_json::Value = paid.json().await.unwrap();
    assert_eq!(answer["notify_url"], gateway.notify_url.as_str());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let stored = payment
            .list_notifications(ListNotificationsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .notifications;
        if let Some(n) = stored.first() {
            assert_eq!((n.out_trade_id.as_str(), n.amount_fen), ("SB1", Some(20)));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no notification stored within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process killed when dropped, the test passing or not.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
