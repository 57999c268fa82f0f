//! Payment notifications end to end: signed POSTs to the real listener,
//! the SQLite store, and gRPC subscribers over real sockets.

use std::time::Duration;

use futures::StreamExt;
use kongtie_gateway::{
    proto::{
        AckNotificationsRequest, ListNotificationsRequest, PaymentNotification,
        SubscribeNotificationsRequest,
    },
    sandbox::signed_notification,
};
use secrecy::SecretString;
use tonic::{Code, Streaming};

use crate::helpers::*;

/// The document's example notification, with a chosen order id and
/// TimeStamp.
fn example(out_trade_id: &str, time_stamp: &str) -> Vec<(&'static str, String)> {
    vec![
        ("TradeStatus", "0000".into()),
        ("Message", "SUCCESS".into()),
        ("OutTradeId", out_trade_id.into()),
        ("TradeAmount", "0.20".into()),
        ("TradeOrderId", format!("984_{out_trade_id}")),
        ("TradeBillNo", "2018030221001004080206230140".into()),
        ("TradeTime", "2018/3/2 10:00:39".into()),
        ("TimeStamp", time_stamp.into()),
    ]
}

fn signed(fields: &[(&'static str, String)], token: &str) -> String {
    let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    signed_notification(&pairs, &SecretString::from(token))
}

/// Signed with the token the gateway verifies notifications with (the ktapi
/// token, by default, even with a separate pay token).
fn good(out_trade_id: &str) -> String {
    signed(&example(out_trade_id, "1522233465"), KTAPI_TOKEN)
}

async fn subscribe(
    app: &TestApp,
    request: SubscribeNotificationsRequest,
) -> Streaming<PaymentNotification> {
    app.payment()
        .await
        .subscribe_notifications(request)
        .await
        .unwrap()
        .into_inner()
}

/// HTTP/2 flow-control windows of a subscriber that stalls for real: a
/// client that reads nothing holds at most this many bytes unread, so the
/// server's task soon blocks on it (every event is over 100 bytes).
const STALLED_WINDOW: u32 = 1024;

/// A subscription on a connection of its own whose windows are
/// [`STALLED_WINDOW`]: left unread, it stalls the server's task for it
/// after a few events, instead of taking them all into a 2 MB window.
async fn subscribe_stalling(
    app: &TestApp,
    request: SubscribeNotificationsRequest,
) -> Streaming<PaymentNotification> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .initial_stream_window_size(STALLED_WINDOW)
        .initial_connection_window_size(STALLED_WINDOW)
        .connect()
        .await
        .unwrap();
    kongtie_gateway::proto::payment_client::PaymentClient::new(channel)
        .subscribe_notifications(request)
        .await
        .unwrap()
        .into_inner()
}

async fn all_stored(app: &TestApp) -> Vec<PaymentNotification> {
    app.stored_notifications().await
}

#[tokio::test]
async fn the_documents_example_is_answered_success_and_delivered() {
    let app = spawn_app().await;
    let mut stream = subscribe(&app, SubscribeNotificationsRequest::default()).await;
    assert_eq!(app.notify(good("4333451")).await, (200, "success".into()));

    let n = next_notification(&mut stream).await;
    assert_eq!(n.sequence, 1);
    assert_eq!(n.out_trade_id, "4333451");
    assert_eq!(n.trade_order_id, "984_4333451");
    assert_eq!(n.trade_bill_no, "2018030221001004080206230140");
    assert_eq!(n.trade_status, "0000");
    assert!(n.paid);
    assert_eq!(n.message, "SUCCESS");
    assert_eq!(n.trade_amount, "0.20");
    assert_eq!(n.amount_fen, Some(20));
    assert_eq!(n.trade_time, "2018/3/2 10:00:39");
    assert_eq!(n.receive_count, 1);
    assert!(n.received_at.is_some());
}

#[tokio::test]
async fn a_changed_field_or_a_wrong_sign_is_refused_and_delivered_to_no_one() {
    let app = spawn_app().await;
    let mut stream = subscribe(&app, SubscribeNotificationsRequest::default()).await;

    let tampered = good("4333451").replace(r#""0.20""#, r#""200.00""#);
    let (status, reason) = app.notify(tampered).await;
    assert_eq!((status, reason.as_str()), (401, "bad signature"));
    let wrong_token = signed(&example("4333451", "1522233465"), "not-the-token");
    assert_eq!(app.notify(wrong_token).await.0, 401);
    let mut bad_sign: serde_json::Value = serde_json::from_str(&good("4333451")).unwrap();
    bad_sign["Sign"] = "b93a80c08533fcbb201ded64815b4900".into();
    assert_eq!(app.notify(bad_sign.to_string()).await.0, 401);

    assert!(all_stored(&app).await.is_empty());
    // The next good one is the first event anyone sees.
    app.notify(good("OK1")).await;
    assert_eq!(next_notification(&mut stream).await.out_trade_id, "OK1");
}

#[tokio::test]
async fn malformed_oversized_and_non_post_requests_are_refused_and_store_nothing() {
    let app = spawn_app().await;
    assert_eq!(
        app.notify("not json").await,
        (400, "body is not a JSON object".into())
    );
    let mut missing: serde_json::Value = serde_json::from_str(&good("A1")).unwrap();
    missing.as_object_mut().unwrap().remove("TradeBillNo");
    assert_eq!(
        app.notify(missing.to_string()).await,
        (400, "missing field TradeBillNo".into())
    );
    let big = format!(r#"{{"pad": "{}"}}"#, "x".repeat(70_000));
    assert_eq!(app.notify(big).await.0, 413);
    let get = reqwest::get(&app.notify_url).await.unwrap();
    assert_eq!(get.status().as_u16(), 405);
    assert!(all_stored(&app).await.is_empty());
}

#[tokio::test]
async fn ten_sends_of_one_notification_are_one_event_received_ten_times() {
    let app = spawn_app().await;
    for i in 0..10 {
        // Resends may carry a new TimeStamp, hence a new Sign.
        let body = signed(&example("R1", &format!("15222334{i:02}")), KTAPI_TOKEN);
        assert_eq!(app.notify(body).await, (200, "success".into()));
    }
    let stored = all_stored(&app).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].sequence, 1);
    assert_eq!(stored[0].receive_count, 10);
}

#[tokio::test]
async fn concurrent_repeats_race_into_one_event() {
    let app = std::sync::Arc::new(spawn_app().await);
    let sends: Vec<_> = (0..20)
        .map(|i| {
            let app = std::sync::Arc::clone(&app);
            tokio::spawn(async move {
                let body = signed(
                    &example("RACE1", &format!("{}", 1_600_000_000 + i)),
                    KTAPI_TOKEN,
                );
                app.notify(body).await
            })
        })
        .collect();
    for send in sends {
        assert_eq!(send.await.unwrap().1, "success");
    }
    let stored = all_stored(&app).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].receive_count, 20);
}

#[tokio::test]
async fn an_offline_subscriber_resumes_from_its_consumer_position_or_after_sequence() {
    let app = spawn_app().await;
    for i in 1..=5 {
        app.notify(good(&format!("OFF{i}"))).await;
    }
    let mut payment = app.payment().await;
    let acked = payment
        .ack_notifications(AckNotificationsRequest {
            consumer: "orders-service".into(),
            sequence: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acked.acked_sequence, 2);
    // Acknowledgements are cumulative: going back is a no-op.
    let acked = payment
        .ack_notifications(AckNotificationsRequest {
            consumer: "orders-service".into(),
            sequence: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acked.acked_sequence, 2);

    let mut by_consumer = subscribe(
        &app,
        SubscribeNotificationsRequest {
            consumer: "orders-service".into(),
            ..Default::default()
        },
    )
    .await;
    for expected in 3..=5 {
        assert_eq!(next_notification(&mut by_consumer).await.sequence, expected);
    }
    // Then live, with no gap at the switch.
    app.notify(good("OFF6")).await;
    assert_eq!(next_notification(&mut by_consumer).await.sequence, 6);
    drop(by_consumer);

    // `after_sequence` overrides the consumer's position (one stream at a
    // time: the next one once the first has ended).
    let mut by_sequence = crate::helpers::subscribe_when_free(
        &app.payment().await,
        SubscribeNotificationsRequest {
            after_sequence: Some(4),
            consumer: "orders-service".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(next_notification(&mut by_sequence).await.sequence, 5);
    assert_eq!(next_notification(&mut by_sequence).await.sequence, 6);
}

#[tokio::test]
async fn a_subscription_can_follow_one_order() {
    let app = spawn_app().await;
    app.notify(good("X1")).await;
    app.notify(good("Y1")).await;
    let mut stream = subscribe(
        &app,
        SubscribeNotificationsRequest {
            out_trade_id: "Y1".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(next_notification(&mut stream).await.out_trade_id, "Y1");
    app.notify(good("X2")).await;
    app.notify(
        good("Y1")
            .replace("0.20", "0.30")
            .replace("1522233465", "1"),
    )
    .await; // bad sign: ignored
    let y_again = signed(
        &[
            ("TradeStatus", "0001".into()),
            ("Message", "FAILED".into()),
            ("OutTradeId", "Y1".into()),
            ("TradeAmount", "0.20".into()),
            ("TradeOrderId", "984_Y1".into()),
            ("TradeBillNo", "2".into()),
            ("TradeTime", "2018/3/2 10:00:40".into()),
            ("TimeStamp", "1".into()),
        ],
        KTAPI_TOKEN,
    );
    app.notify(y_again).await;
    let n = next_notification(&mut stream).await;
    assert_eq!(
        (n.out_trade_id.as_str(), n.sequence, n.paid),
        ("Y1", 4, false)
    );
}

#[tokio::test]
async fn list_pages_through_everything_in_order() {
    let app = spawn_app().await;
    for i in 0..25 {
        app.notify(good(&format!("P{i}"))).await;
    }
    let mut payment = app.payment().await;
    let mut after = 0;
    let mut seen = Vec::new();
    loop {
        let page = payment
            .list_notifications(ListNotificationsRequest {
                after_sequence: after,
                page_size: 10,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if page.notifications.is_empty() {
            assert_eq!(page.next_after_sequence, after);
            break;
        }
        seen.extend(page.notifications.iter().map(|n| n.sequence));
        after = page.next_after_sequence;
    }
    assert_eq!(seen, (1..=25).collect::<Vec<u64>>());
}

#[tokio::test]
async fn bad_subscription_ack_and_list_requests_name_their_fields() {
    let app = spawn_app().await;
    app.notify(good("V1")).await;
    let mut payment = app.payment().await;
    let status = payment
        .ack_notifications(AckNotificationsRequest {
            consumer: "orders".into(),
            sequence: 99,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    assert_eq!(violated_fields(&status), ["sequence"]);
    let (reason, meta) = error_info(&status);
    assert_eq!(
        (reason.as_str(), meta["last_sequence"].as_str()),
        ("SEQUENCE_BEYOND_LAST", "1")
    );
    let status = payment
        .ack_notifications(AckNotificationsRequest {
            consumer: "bad name!".into(),
            sequence: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["consumer", "sequence"]);
    let status = payment
        .subscribe_notifications(SubscribeNotificationsRequest {
            consumer: "x".repeat(65),
            out_trade_id: "no-dashes".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["consumer", "out_trade_id"]);
    let status = payment
        .list_notifications(ListNotificationsRequest {
            page_size: 1001,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["page_size"]);
}

#[tokio::test]
async fn the_sandbox_pays_an_order_and_the_subscriber_sees_it() {
    let app = spawn_app().await;
    let mut stream = subscribe(&app, SubscribeNotificationsRequest::default()).await;
    app.payment()
        .await
        .create_jsapi_order(order("SBX1", 1234))
        .await
        .unwrap();
    assert!(app.sandbox.pay("SBX1"));
    let n = next_notification(&mut stream).await;
    assert_eq!(n.out_trade_id, "SBX1");
    assert_eq!(n.trade_amount, "12.34");
    assert_eq!(n.amount_fen, Some(1234));
    assert!(n.paid);
    // The event is published at commit, before the sandbox has read our
    // `success`: wait for it to record the answer.
    eventually(|| app.sandbox.notify_attempts().len() == 1).await;
    let attempts = app.sandbox.notify_attempts();
    assert!(attempts[0].acknowledged);

    // Paying again resends the same payment: one event, counted twice.
    assert!(app.sandbox.pay("SBX1"));
    eventually(|| app.sandbox.notify_attempts().len() == 2).await;
    let stored = all_stored(&app).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].receive_count, 2);
    assert!(app.sandbox.notify_attempts()[1].acknowledged);
}

/// Waits up to 10 s for `condition`.
async fn eventually(condition: impl Fn() -> bool) {
    let started = std::time::Instant::now();
    while !condition() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "timed out waiting"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn the_sandbox_resends_until_answered_success_ten_sends_at_most() {
    let app = spawn_app().await;
    app.payment()
        .await
        .create_jsapi_order(order("SBX2", 1))
        .await
        .unwrap();
    // A URL that answers 404: never `success`.
    app.sandbox
        .set_notify_url(format!("{}-wrong", app.notify_url).parse().unwrap());
    assert!(app.sandbox.pay("SBX2"));
    eventually(|| app.sandbox.notify_attempts().len() == 10).await;
    tokio::time::sleep(Duration::from_millis(200)).await; // no eleventh send
    let attempts = app.sandbox.notify_attempts();
    assert_eq!(attempts.len(), 10);
    assert!(
        attempts
            .iter()
            .all(|a| !a.acknowledged && a.status == Some(404))
    );
    assert!(all_stored(&app).await.is_empty());
}

#[tokio::test]
async fn a_thousand_subscribers_each_get_every_notification_and_a_stalled_one_holds_no_one_back() {
    let app = std::sync::Arc::new(spawn_app().await);
    // A subscriber that reads nothing until the end: its 1 KiB window holds
    // a few events, so the server's task for it blocks through the burst.
    let mut stalled = subscribe_stalling(&app, SubscribeNotificationsRequest::default()).await;

    // Many streams share a few connections, as real clients would.
    let mut channels = Vec::new();
    for _ in 0..10 {
        channels.push(app.channel().await);
    }
    const SUBSCRIBERS: usize = 1000;
    const BURST: u64 = 200;
    let mut streams = Vec::with_capacity(SUBSCRIBERS);
    for i in 0..SUBSCRIBERS {
        let mut client =
            kongtie_gateway::proto::payment_client::PaymentClient::new(channels[i % 10].clone());
        streams.push(
            client
                .subscribe_notifications(SubscribeNotificationsRequest::default())
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let readers: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut got = Vec::new();
                while got.len() < BURST as usize {
                    match tokio::time::timeout(Duration::from_secs(60), s.next()).await {
                        Ok(Some(Ok(n))) => got.push(n.sequence),
                        other => panic!("stream ended early: {other:?}"),
                    }
                }
                got
            })
        })
        .collect();
    let senders: Vec<_> = (0..BURST)
        .map(|i| {
            let app = std::sync::Arc::clone(&app);
            tokio::spawn(async move { app.notify(good(&format!("B{i}"))).await })
        })
        .collect();
    for s in senders {
        assert_eq!(s.await.unwrap().1, "success");
    }
    for r in readers {
        assert_eq!(r.await.unwrap(), (1..=BURST).collect::<Vec<_>>());
    }
    // Everyone had every event while it read nothing; it gets them all
    // now, in order, and they are far more than its window held.
    let mut got = Vec::new();
    let mut bytes = 0;
    while got.len() < BURST as usize {
        let n = next_notification(&mut stalled).await;
        bytes += prost::Message::encoded_len(&n);
        got.push(n.sequence);
    }
    assert_eq!(got, (1..=BURST).collect::<Vec<_>>());
    assert!(bytes > 10 * STALLED_WINDOW as usize, "{bytes} bytes");
}

#[tokio::test]
async fn a_subscriber_that_falls_far_behind_catches_up_from_the_store_in_order() {
    let app = std::sync::Arc::new(spawn_app().await);
    a_stalled_subscriber_catches_up_in_order(std::sync::Arc::clone(&app), &app).await;
}

/// More events than the live feed holds are posted to `sender` while a
/// subscriber of `receiver` (the same gateway, or another replica) reads
/// nothing: it must lag, then fill the gap from the store, in order, and
/// be live again afterwards.
pub async fn a_stalled_subscriber_catches_up_in_order(
    sender: std::sync::Arc<TestApp>,
    receiver: &TestApp,
) {
    let mut stalled = subscribe_stalling(receiver, SubscribeNotificationsRequest::default()).await;
    let catch_ups = || async {
        sample(
            &admin_metrics(&receiver.admin.to_string()).await,
            "kongtie_subscription_catch_ups_total",
        )
    };
    let before = catch_ups().await;
    // Past the 1,024 events the live feed holds for a slow subscriber,
    // with the subscriber's task blocked on its 1 KiB window.
    const EVENTS: u64 = 1500;
    let senders: Vec<_> = (0..8)
        .map(|w| {
            let sender = std::sync::Arc::clone(&sender);
            tokio::spawn(async move {
                for i in (w..EVENTS).step_by(8) {
                    assert_eq!(sender.notify(good(&format!("L{i}"))).await.1, "success");
                }
            })
        })
        .collect();
    for s in senders {
        s.await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < EVENTS as usize {
        got.push(next_notification(&mut stalled).await.sequence);
    }
    assert_eq!(got, (1..=EVENTS).collect::<Vec<_>>());
    // It did fall behind the live feed and read the gap from the store.
    assert!(
        catch_ups().await > before,
        "the subscription never left the live feed: the catch-up did not run"
    );
    sender.notify(good("AFTER")).await;
    assert_eq!(next_notification(&mut stalled).await.sequence, EVENTS + 1);
}

#[tokio::test]
async fn notifications_and_positions_survive_a_restart_and_sequences_continue() {
    let mut app = spawn_app().await;
    app.notify(good("S1")).await;
    app.notify(good("S2")).await;
    app.payment()
        .await
        .ack_notifications(AckNotificationsRequest {
            consumer: "c1".into(),
            sequence: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    app.stop().await;

    let store = app.store_url.clone();
    let again = spawn_app_with(&["--store", &store]).await;
    assert_eq!(all_stored(&again).await.len(), 2);
    again.notify(good("S3")).await;
    let mut stream = subscribe(
        &again,
        SubscribeNotificationsRequest {
            consumer: "c1".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(next_notification(&mut stream).await.out_trade_id, "S2");
    let n = next_notification(&mut stream).await;
    assert_eq!((n.out_trade_id.as_str(), n.sequence), ("S3", 3));
}

#[tokio::test]
async fn reading_past_the_newest_sequence_is_out_of_range_not_a_silent_wait() {
    let app = spawn_app().await;
    app.notify(good("P1")).await;
    app.notify(good("P2")).await;
    let mut payment = app.payment().await;
    let expect_out_of_range = |status: tonic::Status, field: &str| {
        assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
        assert_eq!(violated_fields(&status), [field]);
        let (reason, meta) = error_info(&status);
        assert_eq!(reason, "SEQUENCE_BEYOND_LAST");
        assert_eq!(meta["last_sequence"], "2");
        assert_eq!(
            status.message(),
            format!("{field} 7 is beyond the newest stored sequence 2")
        );
    };
    let status = payment
        .subscribe_notifications(SubscribeNotificationsRequest {
            after_sequence: Some(7),
            ..Default::default()
        })
        .await
        .unwrap_err();
    expect_out_of_range(status, "after_sequence");
    let status = payment
        .list_notifications(ListNotificationsRequest {
            after_sequence: 7,
            ..Default::default()
        })
        .await
        .unwrap_err();
    expect_out_of_range(status, "after_sequence");
    // At the newest sequence is fine: the next one is awaited.
    let page = payment
        .list_notifications(ListNotificationsRequest {
            after_sequence: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(page.notifications.is_empty());
    assert_eq!(page.next_after_sequence, 2);
    payment
        .subscribe_notifications(SubscribeNotificationsRequest {
            after_sequence: Some(2),
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn a_page_of_large_notifications_fits_what_a_default_client_accepts() {
    let app = spawn_app().await;
    // 100 notifications of about 60 kB each: 6 MB in all, more than the
    // 4 MiB a default gRPC client accepts in one message.
    let message = "M".repeat(60_000);
    for i in 0..100 {
        let mut fields = example(&format!("BIG{i}"), "1522233465");
        fields[1].1 = message.clone();
        assert_eq!(app.notify(signed(&fields, KTAPI_TOKEN)).await.1, "success");
    }
    // The generated client keeps tonic's default 4 MiB receive limit.
    let mut payment = app.payment().await;
    let mut after = 0;
    let mut pages = Vec::new();
    loop {
        let page = payment
            .list_notifications(ListNotificationsRequest {
                after_sequence: after,
                page_size: 100,
                ..Default::default()
            })
            .await
            .expect("every page within the default limit")
            .into_inner();
        if page.notifications.is_empty() {
            break;
        }
        let sequences: Vec<u64> = page.notifications.iter().map(|n| n.sequence).collect();
        assert_eq!(
            sequences,
            (after + 1..=after + sequences.len() as u64).collect::<Vec<_>>()
        );
        after = page.next_after_sequence;
        pages.push(sequences.len());
    }
    assert_eq!(pages.iter().sum::<usize>(), 100);
    assert!(pages.len() >= 2, "cut by size: {pages:?}");
    assert!(pages[0] >= 60, "as many as fit: {pages:?}");
}

#[tokio::test]
async fn a_consumer_cannot_subscribe_filtered_to_one_order() {
    let app = spawn_app().await;
    let status = app
        .payment()
        .await
        .subscribe_notifications(SubscribeNotificationsRequest {
            consumer: "orders".into(),
            out_trade_id: "A1001".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["out_trade_id"]);
    assert!(
        status
            .message()
            .contains("cannot be combined with a consumer"),
        "{}",
        status.message()
    );
    // Each alone is fine.
    let mut payment = app.payment().await;
    for request in [
        SubscribeNotificationsRequest {
            consumer: "orders".into(),
            ..Default::default()
        },
        SubscribeNotificationsRequest {
            out_trade_id: "A1001".into(),
            ..Default::default()
        },
    ] {
        payment.subscribe_notifications(request).await.unwrap();
    }
}

#[tokio::test]
async fn consumers_can_be_seen_and_forgotten() {
    use kongtie_gateway::proto::{
        ConsumerKind, DeleteConsumerRequest, GetConsumerRequest, ListConsumersRequest,
    };
    let app = spawn_app().await;
    for id in ["G1", "G2", "G3"] {
        app.notify(good(id)).await;
    }
    let mut payment = app.payment().await;
    payment
        .ack_notifications(AckNotificationsRequest {
            consumer: "shipping".into(),
            sequence: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    let consumer = payment
        .get_consumer(GetConsumerRequest {
            name: "shipping".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .consumer
        .unwrap();
    assert_eq!(consumer.kind, ConsumerKind::Cursor as i32);
    assert_eq!((consumer.acked_sequence, consumer.lag), (2, 1));
    assert!(consumer.last_ack_at.is_some());
    let listed = payment
        .list_consumers(ListConsumersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.consumers, [consumer]);
    assert!(listed.next_page_token.is_empty());

    payment
        .delete_consumer(DeleteConsumerRequest {
            name: "shipping".into(),
        })
        .await
        .unwrap();
    for status in [
        payment
            .get_consumer(GetConsumerRequest {
                name: "shipping".into(),
            })
            .await
            .unwrap_err(),
        payment
            .delete_consumer(DeleteConsumerRequest {
                name: "shipping".into(),
            })
            .await
            .unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        assert_eq!(status.message(), "no consumer shipping");
    }
    // Forgotten: a subscription under its name starts from the first event.
    let mut stream = payment
        .subscribe_notifications(SubscribeNotificationsRequest {
            consumer: "shipping".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_notification(&mut stream).await.sequence, 1);
    let status = payment
        .get_consumer(GetConsumerRequest {
            name: "bad name!".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["name"]);
}
