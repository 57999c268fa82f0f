//! The order ledger over real sockets: idempotent CreateJsapiOrder, every
//! notification checked against its order, GetOrder and ListOrders. Run on
//! SQLite and (with KONGTIE_TEST_STORE=postgres, as CI does) PostgreSQL;
//! the two-replica test always on PostgreSQL.

use std::time::Duration;

use kongtie_gateway::{
    domain::utc_to_timestamp,
    proto::{
        GetOrderRequest, ListNotificationsRequest, ListOrdersRequest, Order, OrderCheck,
        OrderState, payment_client::PaymentClient,
    },
    sandbox::Fault,
    upstream::Endpoint,
};
use tonic::{Code, transport::Channel};

use crate::{helpers::*, pg::PgDatabase};

async fn get_order(payment: &mut PaymentClient<Channel>, id: &str) -> Order {
    payment
        .get_order(GetOrderRequest {
            out_trade_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap()
}

fn state(order: &Order) -> OrderState {
    OrderState::try_from(order.state).unwrap()
}

#[tokio::test]
async fn the_same_order_twice_is_one_partrade_and_the_same_pay_params() {
    let app = spawn_app().await;
    let mut payment = app.payment().await;
    let first = payment.create_jsapi_order(order("L1", 100)).await.unwrap();
    let again = payment.create_jsapi_order(order("L1", 100)).await.unwrap();
    assert_eq!(first.get_ref(), again.get_ref());
    assert_eq!(app.sandbox.calls(Endpoint::ParTrade), 1);
    let stored = get_order(&mut payment, "L1").await;
    assert_eq!(state(&stored), OrderState::Created);
    assert_eq!(stored.amount_fen, 100);
    assert_eq!(stored.pay_params, first.into_inner().pay_params);
    let metrics = admin_metrics(&app.admin.to_string()).await;
    assert_eq!(
        sample(&metrics, r#"kongtie_order_requests_total{outcome="sent"}"#),
        1.0
    );
    assert_eq!(
        sample(
            &metrics,
            r#"kongtie_order_requests_total{outcome="replayed"}"#
        ),
        1.0
    );
}

/// `n` identical CreateJsapiOrder calls at once, spread over `addrs`; every
/// answer must be the same.
async fn identical_calls_at_once(addrs: &[String], id: &str, n: usize) {
    let mut clients = Vec::new();
    for addr in addrs {
        clients.push(
            PaymentClient::connect(format!("http://{addr}"))
                .await
                .unwrap(),
        );
    }
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let mut client = clients[i % clients.len()].clone();
            let request = order(id, 100);
            tokio::spawn(async move { client.create_jsapi_order(request).await })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(
            call.await
                .unwrap()
                .expect("every call answered")
                .into_inner(),
        );
    }
    assert!(
        answers.windows(2).all(|w| w[0] == w[1]),
        "one answer for all"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_identical_calls_at_once_make_one_partrade() {
    let app = spawn_app().await;
    identical_calls_at_once(&[app.addr.to_string()], "L100", 100).await;
    assert_eq!(app.sandbox.calls(Endpoint::ParTrade), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_identical_calls_over_two_replicas_make_one_partrade() {
    let db = PgDatabase::create().await;
    let a = spawn_app_with(&["--store", &db.url]).await;
    let b = spawn_gateway_on(&a.sandbox, &["--store", &db.url]).await;
    // The sandbox answers slowly, so the two replicas' calls overlap.
    a.sandbox
        .set_fault(Some(Fault::Delay(Duration::from_millis(300))));
    identical_calls_at_once(
        &[a.addr.to_string(), b.running.grpc.to_string()],
        "L200",
        100,
    )
    .await;
    assert_eq!(a.sandbox.calls(Endpoint::ParTrade), 1);
}

#[tokio::test]
async fn other_terms_are_already_exists_with_the_stored_terms_and_nothing_is_sent() {
    let app = spawn_app().await;
    let mut payment = app.payment().await;
    payment.create_jsapi_order(order("L3", 100)).await.unwrap();
    let mut other_openid = order("L3", 100);
    other_openid.openid = "oAnotherPayer".into();
    for request in [order("L3", 200), other_openid] {
        let status = payment.create_jsapi_order(request).await.unwrap_err();
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
        let (reason, meta) = error_info(&status);
        assert_eq!(reason, "ORDER_TERMS_DIFFER");
        assert_eq!(meta["amount_fen"], "100");
        assert_eq!(meta["openid"], "oeQDZtzvDoD-OmTmyJH6rGAX8odc");
        assert!(meta.contains_key("expires_at"));
    }
    assert_eq!(app.sandbox.calls(Endpoint::ParTrade), 1);
}

#[tokio::test]
async fn an_upstream_timeout_leaves_the_order_unknown_and_the_retry_creates_it() {
    let app = spawn_app_with(&["--upstream-timeout-ms", "300"]).await;
    let mut payment = app.payment().await;
    app.sandbox
        .set_fault(Some(Fault::Delay(Duration::from_secs(2))));
    let status = payment
        .create_jsapi_order(order("L4", 100))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(
        state(&get_order(&mut payment, "L4").await),
        OrderState::Unknown
    );

    app.sandbox.set_fault(None);
    payment.create_jsapi_order(order("L4", 100)).await.unwrap();
    assert_eq!(
        state(&get_order(&mut payment, "L4").await),
        OrderState::Created
    );
    assert_eq!(
        app.sandbox.calls(Endpoint::ParTrade),
        2,
        "the retry went upstream"
    );
}

#[tokio::test]
async fn pay_params_past_their_lifetime_are_refreshed() {
    let app = spawn_app_with(&["--prepay-ttl-secs", "1"]).await;
    let mut payment = app.payment().await;
    payment.create_jsapi_order(order("L5", 100)).await.unwrap();
    payment.create_jsapi_order(order("L5", 100)).await.unwrap();
    assert_eq!(app.sandbox.calls(Endpoint::ParTrade), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    payment.create_jsapi_order(order("L5", 100)).await.unwrap();
    assert_eq!(
        app.sandbox.calls(Endpoint::ParTrade),
        2,
        "refreshed upstream"
    );
}

#[tokio::test]
async fn an_expired_order_is_expired_and_not_sent_again() {
    let app = spawn_app().await;
    let mut payment = app.payment().await;
    let mut request = order("L6", 100);
    let expires = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    request.expires_at = Some(utc_to_timestamp(expires));
    payment.create_jsapi_order(request.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(
        state(&get_order(&mut payment, "L6").await),
        OrderState::Expired
    );
    // A request naming no expiry is the same order (its terms are kept).
    let status = payment
        .create_jsapi_order(order("L6", 100))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(error_info(&status).0, "ORDER_EXPIRED");
    assert_eq!(app.sandbox.calls(Endpoint::ParTrade), 1);
}

#[tokio::test]
async fn an_expiry_further_ahead_than_the_maximum_is_a_field_violation() {
    let app = spawn_app_with(&["--order-max-expiry-secs", "3600"]).await;
    let mut request = order("L7", 100);
    request.expires_at = Some(utc_to_timestamp(
        chrono::Utc::now() + chrono::Duration::hours(2),
    ));
    let status = app
        .payment()
        .await
        .create_jsapi_order(request)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["expires_at"]);
    assert!(
        status.message().contains("at most 3600 s ahead"),
        "{}",
        status.message()
    );
    assert_eq!(app.sandbox.calls(Endpoint::ParTrade), 0);
}

/// The notification the sandbox sends for `id`, once stored.
async fn notified(
    payment: &mut PaymentClient<Channel>,
    id: &str,
    count: usize,
) -> Vec<kongtie_gateway::proto::PaymentNotification> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let page = payment
            .list_notifications(ListNotificationsRequest {
                out_trade_id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if page.notifications.len() >= count {
            return page.notifications;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{count} notifications of {id} not stored within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn each_notification_is_checked_against_its_order() {
    let app = spawn_app().await;
    let mut payment = app.payment().await;

    // The right amount: MATCHED, and the order turns PAID.
    payment.create_jsapi_order(order("N1", 20)).await.unwrap();
    assert!(app.sandbox.pay("N1"));
    let n = notified(&mut payment, "N1", 1).await.remove(0);
    assert!(n.paid);
    assert_eq!(OrderCheck::try_from(n.order_check), Ok(OrderCheck::Matched));
    let o = get_order(&mut payment, "N1").await;
    assert_eq!(
        (state(&o), o.paid_sequence),
        (OrderState::Paid, Some(n.sequence))
    );
    let status = payment
        .create_jsapi_order(order("N1", 20))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), error_info(&status).0.as_str()),
        (Code::FailedPrecondition, "ORDER_ALREADY_PAID")
    );

    // Another amount: AMOUNT_MISMATCH, and the order is not paid.
    payment.create_jsapi_order(order("N2", 20)).await.unwrap();
    assert!(app.sandbox.pay_amount("N2", "0.01"));
    let n = notified(&mut payment, "N2", 1).await.remove(0);
    assert_eq!(
        OrderCheck::try_from(n.order_check),
        Ok(OrderCheck::AmountMismatch)
    );
    assert_eq!(
        state(&get_order(&mut payment, "N2").await),
        OrderState::Created
    );

    // An order the gateway never created: UNKNOWN_ORDER, still stored.
    assert_eq!(
        app.notify(payment_notification("N3", KTAPI_TOKEN)).await.1,
        "success"
    );
    let n = notified(&mut payment, "N3", 1).await.remove(0);
    assert_eq!(
        OrderCheck::try_from(n.order_check),
        Ok(OrderCheck::UnknownOrder)
    );
    let status = payment
        .get_order(GetOrderRequest {
            out_trade_id: "N3".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    let metrics = admin_metrics(&app.admin.to_string()).await;
    for (result, n) in [
        ("matched", 1.0),
        ("amount_mismatch", 1.0),
        ("unknown_order", 1.0),
    ] {
        assert_eq!(
            sample(
                &metrics,
                &format!(r#"kongtie_notification_order_checks_total{{result="{result}"}}"#)
            ),
            n,
            "{result}"
        );
    }
}

/// Kongtie's resend of a stored payment: the same fields, signed anew.
fn resend_of(n: &kongtie_gateway::proto::PaymentNotification) -> String {
    let fields = [
        ("TradeStatus", n.trade_status.as_str()),
        ("Message", n.message.as_str()),
        ("OutTradeId", n.out_trade_id.as_str()),
        ("TradeAmount", n.trade_amount.as_str()),
        ("TradeOrderId", n.trade_order_id.as_str()),
        ("TradeBillNo", n.trade_bill_no.as_str()),
        ("TradeTime", n.trade_time.as_str()),
        ("TimeStamp", "1522233999"),
    ];
    kongtie_gateway::sandbox::signed_notification(
        &fields,
        &secrecy::SecretString::from(KTAPI_TOKEN),
    )
}

#[tokio::test]
async fn a_second_payment_of_a_paid_order_is_already_paid_and_counted_and_a_resend_is_no_new_event()
{
    let app = spawn_app().await;
    let mut payment = app.payment().await;
    payment.create_jsapi_order(order("N6", 20)).await.unwrap();
    assert!(app.sandbox.pay("N6"));
    let first = notified(&mut payment, "N6", 1).await.remove(0);
    assert_eq!(
        OrderCheck::try_from(first.order_check),
        Ok(OrderCheck::Matched)
    );

    // The payer pays again: a payment of its own (another TradeBillNo),
    // stored and answered (it is signed), then resent by Kongtie.
    assert!(app.sandbox.pay_again("N6"));
    let events = notified(&mut payment, "N6", 2).await;
    let second = events[1].clone();
    assert_ne!(second.trade_bill_no, first.trade_bill_no);
    assert!(second.paid);
    assert_eq!(
        OrderCheck::try_from(second.order_check),
        Ok(OrderCheck::AlreadyPaid)
    );
    assert!(app.sandbox.pay("N6"), "resends the second payment");
    // And Kongtie resends the first one.
    assert_eq!(app.notify(resend_of(&first)).await.1, "success");

    // Still two events, each received twice, each checked as before.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let events = notified(&mut payment, "N6", 2).await;
        assert_eq!(events.len(), 2, "a resend is no new event");
        let counts: Vec<u32> = events.iter().map(|n| n.receive_count).collect();
        if counts == [2, 2] {
            let checks: Vec<_> = events
                .iter()
                .map(|n| OrderCheck::try_from(n.order_check))
                .collect();
            assert_eq!(
                checks,
                [Ok(OrderCheck::Matched), Ok(OrderCheck::AlreadyPaid)]
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the resends not counted within 10 s: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The order stays paid by the first.
    let o = get_order(&mut payment, "N6").await;
    assert_eq!(
        (state(&o), o.paid_sequence),
        (OrderState::Paid, Some(first.sequence))
    );

    let metrics = admin_metrics(&app.admin.to_string()).await;
    for (result, n) in [("matched", 1.0), ("already_paid", 1.0)] {
        assert_eq!(
            sample(
                &metrics,
                &format!(r#"kongtie_notification_order_checks_total{{result="{result}"}}"#)
            ),
            n,
            "{result}"
        );
    }
    assert_eq!(
        sample(
            &metrics,
            r#"kongtie_notifications_received_total{outcome="duplicate"}"#
        ),
        2.0
    );
}

#[tokio::test]
async fn point_two_and_point_twenty_are_one_payment() {
    let app = spawn_app().await;
    let mut payment = app.payment().await;
    payment.create_jsapi_order(order("N4", 20)).await.unwrap();
    for amount in ["0.2", "0.20"] {
        let fields = [
            ("TradeStatus", "0000"),
            ("Message", "SUCCESS"),
            ("OutTradeId", "N4"),
            ("TradeAmount", amount),
            ("TradeOrderId", "984_4"),
            ("TradeBillNo", "4"),
            ("TradeTime", "2018/3/2 10:00:39"),
            ("TimeStamp", "1522233465"),
        ];
        let body = kongtie_gateway::sandbox::signed_notification(
            &fields,
            &secrecy::SecretString::from(KTAPI_TOKEN),
        );
        assert_eq!(app.notify(body).await.1, "success");
    }
    let stored = notified(&mut payment, "N4", 1).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].receive_count, 2);
    assert_eq!(stored[0].trade_amount, "0.2", "kept as first sent");
    assert_eq!(
        OrderCheck::try_from(stored[0].order_check),
        Ok(OrderCheck::Matched)
    );
    assert_eq!(
        state(&get_order(&mut payment, "N4").await),
        OrderState::Paid
    );
}

#[tokio::test]
async fn list_orders_pages_newest_first_and_filters_by_state() {
    let app = spawn_app().await;
    let mut payment = app.payment().await;
    for i in 0..5 {
        payment
            .create_jsapi_order(order(&format!("P{i}"), 10 + i))
            .await
            .unwrap();
    }
    assert!(app.sandbox.pay("P1"));
    notified(&mut payment, "P1", 1).await;

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = payment
            .list_orders(ListOrdersRequest {
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.orders.len() <= 2);
        seen.extend(page.orders.iter().map(|o| o.out_trade_id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ["P4", "P3", "P2", "P1", "P0"], "newest first");

    let paid = payment
        .list_orders(ListOrdersRequest {
            state: OrderState::Paid as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = paid
        .orders
        .iter()
        .map(|o| o.out_trade_id.as_str())
        .collect();
    assert_eq!(ids, ["P1"]);
    let created = payment
        .list_orders(ListOrdersRequest {
            state: OrderState::Created as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.orders.len(), 4);

    let status = payment
        .list_orders(ListOrdersRequest {
            page_token: "not-a-token".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["page_token"]);
}

#[test]
fn a_gateway_killed_while_its_order_is_in_flight_leaves_it_unknown_and_the_retry_completes() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let sandbox = spawn_sandbox().await;
        let dir = tempfile::tempdir().unwrap();
        let (ktapi, pay) = (
            sandbox.ktapi_url().to_string(),
            sandbox.pay_url().to_string(),
        );
        let args = [
            "serve",
            "--ktapi-url",
            &ktapi,
            "--pay-url",
            &pay,
            "--pay-token",
            PAY_TOKEN,
            "--upstream-timeout-ms",
            "2000",
            "--connect-timeout-ms",
            "200",
        ];
        let mut bin = Binary::start_in(&args, dir.path(), None);
        // Kongtie takes its time: the order is in flight when the gateway
        // dies.
        sandbox.set_fault(Some(Fault::Delay(Duration::from_secs(30))));
        let grpc = bin.grpc.clone();
        let call = tokio::spawn(async move {
            PaymentClient::connect(format!("http://{grpc}"))
                .await
                .unwrap()
                .create_jsapi_order(order("K1", 100))
                .await
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while sandbox.calls(Endpoint::ParTrade) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "ParTrade never sent"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        bin.child.kill().unwrap(); // SIGKILL
        bin.child.wait().unwrap();
        assert!(call.await.unwrap().is_err());

        sandbox.set_fault(None);
        let bin = Binary::start_in(&args, dir.path(), None);
        let mut payment = PaymentClient::connect(format!("http://{}", bin.grpc))
            .await
            .unwrap();
        assert_eq!(
            state(&get_order(&mut payment, "K1").await),
            OrderState::Unknown
        );
        // The retry waits out the dead process's claim (its lease: 2 s
        // + 3 x 200 ms + 2 s), then sends again.
        let mut request = tonic::Request::new(order("K1", 100));
        request.set_timeout(Duration::from_secs(15));
        payment.create_jsapi_order(request).await.unwrap();
        assert_eq!(
            state(&get_order(&mut payment, "K1").await),
            OrderState::Created
        );
        assert_eq!(sandbox.calls(Endpoint::ParTrade), 2);
    });
}
