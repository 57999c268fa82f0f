//! The gRPC listener against clients that do not play by the rules, over a
//! raw HTTP/2 client (the `h2` crate).

use std::time::Duration;

use crate::helpers::*;

/// The server's SETTINGS after the handshake, as a raw client sees them:
/// the limit on streams it may open on one connection.
async fn advertised_streams(addr: std::net::SocketAddr) -> usize {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (_send, mut connection) = h2::client::handshake(tcp).await.unwrap();
    // h2 assumes no limit until the server's SETTINGS arrive: drive the
    // connection until they have (10 s at most).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        tokio::select! {
            ended = &mut connection => panic!("the connection ended: {ended:?}"),
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        let advertised = connection.max_concurrent_send_streams();
        if advertised != usize::MAX {
            return advertised;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no MAX_CONCURRENT_STREAMS in the server's SETTINGS"
        );
    }
}

#[tokio::test]
async fn the_stream_limit_is_advertised_in_settings() {
    let app = spawn_app().await;
    assert_eq!(advertised_streams(app.addr).await, 256, "the default");
    let app = spawn_app_with(&["--grpc-max-streams", "7"], |_| {}).await;
    assert_eq!(advertised_streams(app.addr).await, 7);
}

/// Subscriptions are capped per connection and in total: the one past a
/// cap gets RESOURCE_EXHAUSTED naming it, and a place comes back when a
/// subscriber leaves.
#[tokio::test]
async fn a_subscription_past_a_cap_is_resource_exhausted_until_a_place_frees() {
    use kongtie_gateway::proto::{SubscribeNotificationsRequest, payment_client::PaymentClient};
    use tonic::Code;
    let app = spawn_app_with(
        &[
            "--max-subscriptions-per-connection",
            "2",
            "--max-subscriptions",
            "3",
        ],
        |_| {},
    )
    .await;
    let subscribe = |channel: tonic::transport::Channel| async move {
        PaymentClient::new(channel)
            .subscribe_notifications(SubscribeNotificationsRequest::default())
            .await
            .map(tonic::Response::into_inner)
    };
    let refused = |outcome: Result<_, tonic::Status>, scope: &str, limit: &str| {
        let status = outcome.expect_err("past the cap");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        let (reason, meta) = error_info(&status);
        assert_eq!(reason, "TOO_MANY_SUBSCRIPTIONS");
        assert_eq!(
            (meta["scope"].as_str(), meta["limit"].as_str()),
            (scope, limit)
        );
    };
    let one = app.channel().await;
    let first = subscribe(one.clone()).await.unwrap();
    let _second = subscribe(one.clone()).await.unwrap();
    refused(subscribe(one.clone()).await, "connection", "2");
    let other = app.channel().await;
    let _third = subscribe(other.clone()).await.unwrap();
    refused(subscribe(other.clone()).await, "server", "3");

    // One leaves: its place comes back once the server sees it gone.
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let _again = loop {
        match subscribe(other.clone()).await {
            Ok(stream) => break stream,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the place did not come back within 10 s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
}

/// A subscription ended the normal way (its maximum age; shutdown is the
/// same status) is logged as an RPC that finished UNAVAILABLE at INFO, not
/// as a failure at WARN: normal endings page nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_normal_end_of_a_subscription_is_not_logged_as_a_failure() {
    let mut bin = Binary::start(&[
        "serve",
        "--sandbox",
        "--sandbox-addr",
        "127.0.0.1:0",
        "--max-connection-age-secs",
        "1",
    ]);
    let mut stream = subscribe_at(&bin.grpc).await;
    let end = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the subscription ended at its age")
        .expect_err("with a status");
    assert_eq!(end.code(), tonic::Code::Unavailable);
    // The gateway's line for it is written once the stream's end is.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !bin
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("SubscribeNotifications") && l.contains("rpc finished"))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no line for the subscription's end"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = bin.stop_and_read_log();
    let ended: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("SubscribeNotifications") && l.contains("rpc finished"))
        .collect();
    assert_eq!(ended.len(), 1, "{ended:#?}");
    assert!(
        ended[0].contains("INFO") && ended[0].contains("code=Unavailable"),
        "{}",
        ended[0]
    );
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ")).collect();
    assert!(
        warnings
            .iter()
            .all(|l| l.contains("no API keys configured")),
        "{warnings:#?}"
    );
}
