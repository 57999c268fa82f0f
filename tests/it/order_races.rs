//! Concurrent CreateJsapiOrder calls for one order id, over gRPC and the
//! Connect protocol mixed, on one gateway and over two replicas: only calls
//! with the same terms share an answer, every other one is ALREADY_EXISTS,
//! one ParTrade is sent; a caller's deadline bounds its own wait, not the
//! run. And two payments of one order at once, on both stores: one is the
//! order's payment, the other ALREADY_PAID.

use std::{collections::HashMap, sync::Arc, time::Duration};

use chrono::{DateTime, SubsecRound, Utc};
use kongtie_gateway::{
    domain::utc_to_timestamp,
    orders::{Begin, OrderCheck, OrderState, OrderTerms, Outcome},
    proto::payment_client::PaymentClient,
    proto::{CreateJsapiOrderRequest, GetOrderRequest, OrderState as ProtoState},
    sandbox::Fault,
    store::Recorded,
    upstream::Endpoint,
};
use serde_json::{Value, json};
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt;

use crate::{
    helpers::*,
    pg::PgDatabase,
    store::{Backend, Place, incoming},
};

/// One set of terms for the contested order id.
#[derive(Debug, Clone, PartialEq)]
struct TermSet {
    amount_fen: i64,
    openid: &'static str,
    expires_at: Option<DateTime<Utc>>,
}

/// Five term sets, each differing from every other: by amount, by openid,
/// by an explicit expiry only (the first and the last), and one naming no
/// expiry (which no explicit set with its amount and openid shares).
fn five_term_sets() -> Vec<TermSet> {
    let e1 = (Utc::now() + chrono::Duration::minutes(30)).trunc_subsecs(0);
    let e2 = e1 + chrono::Duration::minutes(5);
    let (a, b) = (
        "oPayerAAAAAAAAAAAAAAAAAAAAAA",
        "oPayerBBBBBBBBBBBBBBBBBBBBBB",
    );
    let set = |amount_fen, openid, expires_at| TermSet {
        amount_fen,
        openid,
        expires_at,
    };
    vec![
        set(100, a, Some(e1)),
        set(99_900, b, Some(e1)),
        set(100, b, Some(e1)),
        set(99_900, a, None),
        set(100, a, Some(e2)),
    ]
}

/// What one call was answered.
#[derive(Debug)]
enum Answer {
    /// OK, with Kongtie's `ResponseText`.
    Created(String),
    /// ALREADY_EXISTS / ORDER_TERMS_DIFFER, with its ErrorInfo metadata.
    TermsDiffer(HashMap<String, String>),
    Other(String),
}

async fn by_grpc(mut client: PaymentClient<Channel>, id: String, terms: TermSet) -> Answer {
    let mut request = tonic::Request::new(CreateJsapiOrderRequest {
        out_trade_id: id,
        amount_fen: terms.amount_fen,
        openid: terms.openid.into(),
        expires_at: terms.expires_at.map(utc_to_timestamp),
    });
    request.set_timeout(Duration::from_secs(10));
    match client.create_jsapi_order(request).await {
        Ok(r) => Answer::Created(r.into_inner().response_text),
        Err(status) => match (status.code(), error_info(&status)) {
            (Code::AlreadyExists, (reason, meta)) if reason == "ORDER_TERMS_DIFFER" => {
                Answer::TermsDiffer(meta)
            }
            _ => Answer::Other(format!("{status:?}")),
        },
    }
}

/// The same call as a Connect client makes it: an HTTP JSON POST to the
/// gRPC port.
async fn by_connect(http: reqwest::Client, addr: String, id: String, terms: TermSet) -> Answer {
    let mut body = json!({
        "outTradeId": id,
        "amountFen": terms.amount_fen.to_string(),
        "openid": terms.openid,
    });
    if let Some(at) = terms.expires_at {
        body["expiresAt"] = at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true).into();
    }
    let response = http
        .post(format!("http://{addr}/kongtie.v1.Payment/CreateJsapiOrder"))
        .json(&body)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("the Connect call is answered");
    let status = response.status().as_u16();
    let answer: Value = response.json().await.expect("a JSON answer");
    if status == 200 {
        return Answer::Created(answer["responseText"].as_str().unwrap_or_default().into());
    }
    let info = answer["details"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["type"] == "google.rpc.ErrorInfo")
        .map(|d| &d["debug"]);
    match info {
        Some(info)
            if answer["code"] == "already_exists" && info["reason"] == "ORDER_TERMS_DIFFER" =>
        {
            let meta = info["metadata"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect();
            Answer::TermsDiffer(meta)
        }
        _ => Answer::Other(format!("HTTP {status}: {answer}")),
    }
}

/// 50 calls at once for `id`, call `i` with term set `i % 5`, spread over
/// the gateways at `addrs` (`i % n`) and over gRPC and Connect (the next
/// bit); then holds every answer to the stored order.
async fn fifty_calls_with_five_term_sets(addrs: &[String], id: &str) {
    let sets = five_term_sets();
    let mut clients = Vec::new();
    for addr in addrs {
        clients.push(
            PaymentClient::connect(format!("http://{addr}"))
                .await
                .unwrap(),
        );
    }
    let http = reqwest::Client::new();
    let calls: Vec<_> = (0..50)
        .map(|i| {
            let gateway = i % addrs.len();
            let terms = sets[i % sets.len()].clone();
            let id = id.to_owned();
            let connect = (i / addrs.len()) % 2 == 1;
            let (client, http, addr) = (
                clients[gateway].clone(),
                http.clone(),
                addrs[gateway].clone(),
            );
            tokio::spawn(async move {
                if connect {
                    by_connect(http, addr, id, terms).await
                } else {
                    by_grpc(client, id, terms).await
                }
            })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }

    let stored = clients[0]
        .get_order(GetOrderRequest {
            out_trade_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    let winners: Vec<usize> = {
        let mut w: Vec<usize> = answers
            .iter()
            .enumerate()
            .filter(|(_, a)| matches!(a, Answer::Created(_)))
            .map(|(i, _)| i % sets.len())
            .collect();
        w.sort_unstable();
        w.dedup();
        w
    };
    assert_eq!(
        winners.len(),
        1,
        "OK answers for term sets {winners:?}: {answers:#?}"
    );
    let won = &sets[winners[0]];
    assert_eq!(
        (stored.amount_fen, stored.openid.as_str()),
        (won.amount_fen, won.openid),
        "the answered terms are the stored ones"
    );
    if let Some(at) = won.expires_at {
        assert_eq!(stored.expires_at, Some(utc_to_timestamp(at)));
    }
    let package = stored.pay_params.as_ref().unwrap().package.clone();
    for (i, answer) in answers.iter().enumerate() {
        match answer {
            Answer::Created(text) => {
                let params: Value = serde_json::from_str(text).unwrap();
                assert_eq!(
                    params["package"],
                    package.as_str(),
                    "call {i}: the stored prepay"
                );
            }
            Answer::TermsDiffer(meta) => {
                assert_ne!(i % sets.len(), winners[0], "call {i} has the stored terms");
                assert_eq!(meta["out_trade_id"], id);
                assert_eq!(
                    meta["amount_fen"],
                    stored.amount_fen.to_string(),
                    "call {i}"
                );
                assert_eq!(meta["openid"], stored.openid, "call {i}");
            }
            Answer::Other(what) => panic!("call {i}: {what}"),
        }
    }
}

/// The one ParTrade the sandbox saw, with the stored order's terms.
fn assert_one_partrade_of(app: &TestApp, amount: &str) {
    let sent: Vec<_> = app
        .sandbox
        .requests()
        .into_iter()
        .filter(|r| r.endpoint == Endpoint::ParTrade)
        .collect();
    assert_eq!(sent.len(), 1, "one ParTrade");
    assert_eq!(sent[0].field("PayAmount"), Some(amount));
}

async fn stored_amount(app: &TestApp, id: &str) -> String {
    let order = app
        .payment()
        .await
        .get_order(GetOrderRequest {
            out_trade_id: id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(
        ProtoState::try_from(order.state),
        Ok(ProtoState::Created),
        "the run recorded its outcome"
    );
    format!("{}.{:02}", order.amount_fen / 100, order.amount_fen % 100)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_calls_with_five_term_sets_on_one_gateway_answer_one_and_refuse_the_others() {
    let app = spawn_app().await;
    // Kongtie answers slowly, so that every call overlaps the first run.
    app.sandbox
        .set_fault(Some(Fault::Delay(Duration::from_millis(300))));
    fifty_calls_with_five_term_sets(&[app.addr.to_string()], "T50").await;
    let amount = stored_amount(&app, "T50").await;
    assert_one_partrade_of(&app, &amount);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_calls_with_five_term_sets_over_two_replicas_answer_one_and_refuse_the_others() {
    let db = PgDatabase::create().await;
    let a = spawn_app_with(&["--store", &db.url]).await;
    let b = spawn_gateway_on(&a.sandbox, &["--store", &db.url]).await;
    a.sandbox
        .set_fault(Some(Fault::Delay(Duration::from_millis(300))));
    fifty_calls_with_five_term_sets(&[a.addr.to_string(), b.running.grpc.to_string()], "T51").await;
    let amount = stored_amount(&a, "T51").await;
    assert_one_partrade_of(&a, &amount);
}

/// A Connect `CreateJsapiOrder` with `Connect-Timeout-Ms`: the code and
/// the ErrorInfo reason it was answered.
async fn by_connect_within(addr: &str, id: &str, fen: i64, timeout_ms: u64) -> (String, String) {
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/kongtie.v1.Payment/CreateJsapiOrder"))
        .header("connect-timeout-ms", timeout_ms.to_string())
        .json(&json!({"outTradeId": id, "amountFen": fen.to_string(),
                      "openid": "oeQDZtzvDoD-OmTmyJH6rGAX8odc"}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("the Connect call is answered");
    let answer: Value = response.json().await.expect("a JSON answer");
    let reason = answer["details"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["type"] == "google.rpc.ErrorInfo")
        .and_then(|d| d["debug"]["reason"].as_str())
        .unwrap_or_default()
        .to_owned();
    (answer["code"].as_str().unwrap_or("ok").to_owned(), reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_whose_deadline_passes_leave_the_run_to_create_the_order_for_one_without() {
    // ParTrade takes 1.5 s: past the hurried callers' 600 ms, within the
    // upstream timeout (5 s).
    let app = spawn_app().await;
    app.sandbox
        .set_fault(Some(Fault::Delay(Duration::from_millis(1500))));
    let mut hurried = app.payment().await;
    let first = tokio::spawn(async move {
        let mut request = tonic::Request::new(order("D1", 100));
        request.set_timeout(Duration::from_millis(600));
        hurried.create_jsapi_order(request).await
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while app.sandbox.calls(Endpoint::ParTrade) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ParTrade never sent"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The same terms while the run is in flight: another hurried caller
    // (over Connect, whose client waits for the gateway's answer), and one
    // with no deadline. Both join the run.
    let addr = app.addr.to_string();
    let connect = tokio::spawn(async move { by_connect_within(&addr, "D1", 100, 600).await });
    let mut patient = app.payment().await;
    let second = tokio::spawn(async move { patient.create_jsapi_order(order("D1", 100)).await });

    let created = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("the patient caller is answered")
        .unwrap()
        .expect("the patient caller gets the order")
        .into_inner();
    let status = tokio::time::timeout(Duration::from_secs(5), first)
        .await
        .expect("the hurried gRPC caller is answered")
        .unwrap()
        .unwrap_err();
    // The gateway answers just before the deadline; on a loaded machine
    // tonic's client may have given up first, itself (CANCELLED, with a
    // local cause): either way the caller was answered at its deadline,
    // not with the run's outcome.
    let local = status.code() == Code::Cancelled && std::error::Error::source(&status).is_some();
    let reason = status.get_details_error_info().map(|info| info.reason);
    assert!(
        local
            || (status.code(), reason.as_deref())
                == (Code::DeadlineExceeded, Some("UPSTREAM_TIMEOUT")),
        "{status:?}"
    );
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), connect)
            .await
            .expect("the hurried Connect caller is answered")
            .unwrap(),
        (
            "deadline_exceeded".to_owned(),
            "UPSTREAM_TIMEOUT".to_owned()
        )
    );

    let mut payment = app.payment().await;
    let stored = payment
        .get_order(GetOrderRequest {
            out_trade_id: "D1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(ProtoState::try_from(stored.state), Ok(ProtoState::Created));
    assert_eq!(stored.pay_params, created.pay_params);
    assert_eq!(app.sandbox.calls(Endpoint::ParTrade), 1);
    let metrics = admin_metrics(&app.admin.to_string()).await;
    assert_eq!(
        sample(
            &metrics,
            r#"kongtie_upstream_calls_total{endpoint="ParTrade",outcome="ok"}"#
        ),
        1.0,
        "the one ParTrade ran to its answer"
    );
}

store_suite!(two_payments_of_one_order_at_once_are_its_payment_and_one_already_paid);

async fn two_payments_of_one_order_at_once_are_its_payment_and_one_already_paid(backend: Backend) {
    let place = Place::new(backend).await;
    let store = place.open().await;
    let orders = store.orders();
    const ORDERS: usize = 10;
    let ids: Vec<String> = (0..ORDERS).map(|i| format!("W{i}")).collect();
    for id in &ids {
        let now = Utc::now();
        let terms = OrderTerms {
            out_trade_id: id.clone(),
            amount_fen: 20,
            openid: "o1".into(),
            expires_at: now + chrono::Duration::minutes(30),
            explicit_expiry: false,
        };
        let claim = now + chrono::Duration::seconds(30);
        let begun = orders
            .begin(&terms, now, Duration::from_secs(6600), None, "a", claim)
            .await
            .unwrap();
        assert_eq!(begun, Begin::Send { attempt: 1 });
        let created = Outcome::Created {
            response_text: "{}".into(),
        };
        orders.finish(id, "a", 1, &created, now).await.unwrap();
    }
    // Two distinct payments (bill numbers) of each order, all at once: on
    // PostgreSQL several land in one batch.
    let start = Arc::new(tokio::sync::Barrier::new(2 * ORDERS));
    let writes: Vec<_> = ids
        .iter()
        .flat_map(|id| [(id.clone(), "x"), (id.clone(), "y")])
        .map(|(id, bill)| {
            let (store, start) = (Arc::clone(&store), Arc::clone(&start));
            tokio::spawn(async move {
                let mut payment = incoming(&id);
                payment.trade_bill_no = format!("{bill}-{id}");
                start.wait().await;
                let recorded = store.record(payment).await.unwrap();
                (id, recorded)
            })
        })
        .collect();
    let mut checks: HashMap<String, Vec<(u64, OrderCheck)>> = HashMap::new();
    for write in writes {
        match write.await.unwrap() {
            (
                id,
                Recorded::New {
                    sequence,
                    order_check,
                },
            ) => checks.entry(id).or_default().push((sequence, order_check)),
            other => panic!("{other:?}"),
        }
    }
    let mut double_charges = HashMap::new();
    for id in &ids {
        let mut two = checks.remove(id).unwrap();
        two.sort_unstable_by_key(|(sequence, _)| *sequence);
        assert_eq!(
            two.iter().map(|(_, c)| *c).collect::<Vec<_>>(),
            [OrderCheck::Matched, OrderCheck::AlreadyPaid],
            "{id}: the first payment is the order's, the second a double charge"
        );
        let order = orders.get(id).await.unwrap().unwrap();
        assert_eq!(
            (order.state, order.paid_sequence),
            (OrderState::Paid, Some(two[0].0))
        );
        double_charges.insert(id.clone(), two[1].0);
    }
    // A resend of a double charge is the same event, still ALREADY_PAID.
    let sequence = double_charges["W0"];
    let stored = store.list(sequence - 1, None, 1).await.unwrap().remove(0);
    let mut again = incoming("W0");
    again.trade_bill_no = stored.trade_bill_no.clone();
    assert_eq!(
        store.record(again).await.unwrap(),
        Recorded::Repeat {
            sequence,
            receive_count: 2
        }
    );
    let listed = store.list(sequence - 1, None, 1).await.unwrap().remove(0);
    assert_eq!(listed.order_check, Some(OrderCheck::AlreadyPaid));
    assert_eq!(listed.receive_count, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_waits_for_an_order_run_whose_caller_left_and_records_its_outcome() {
    // ParTrade takes 1 s; the caller leaves after 100 ms; the gateway is
    // told to stop while the run is still with Kongtie.
    let mut app = spawn_app().await;
    app.sandbox
        .set_fault(Some(Fault::Delay(Duration::from_millis(1000))));
    let mut hurried = app.payment().await;
    let mut request = tonic::Request::new(order("S1", 100));
    request.set_timeout(Duration::from_millis(100));
    hurried
        .create_jsapi_order(request)
        .await
        .expect_err("the caller's deadline passes first");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while app.sandbox.calls(Endpoint::ParTrade) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ParTrade never sent"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::timeout(Duration::from_secs(10), app.stop())
        .await
        .expect("the gateway stops within its grace");

    // What the store holds, read by a gateway started on it afterwards.
    let store = app.store_url.clone();
    let after = spawn_gateway_on(&app.sandbox, &["--store", &store]).await;
    let mut payment = PaymentClient::connect(format!("http://{}", after.running.grpc))
        .await
        .unwrap();
    let stored = payment
        .get_order(GetOrderRequest {
            out_trade_id: "S1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    assert_eq!(
        ProtoState::try_from(stored.state),
        Ok(ProtoState::Created),
        "the run's outcome was recorded before the store closed"
    );
    assert!(stored.pay_params.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_whose_callers_left_are_bounded_in_flight_and_the_next_is_resource_exhausted() {
    // ParTrade takes 1.5 s; each caller leaves after 100 ms; at most two
    // runs at once.
    let app = spawn_app_with(&["--max-orders-in-flight", "2"]).await;
    app.sandbox
        .set_fault(Some(Fault::Delay(Duration::from_millis(1500))));
    let mut payment = app.payment().await;
    let hurried = |id: &str| {
        let mut request = tonic::Request::new(order(id, 100));
        request.set_timeout(Duration::from_millis(100));
        request
    };
    for id in ["B1", "B2"] {
        payment
            .create_jsapi_order(hurried(id))
            .await
            .expect_err("the caller's deadline passes first");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while app.sandbox.calls(Endpoint::ParTrade) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ParTrade never sent"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let refused = payment
        .create_jsapi_order(hurried("B3"))
        .await
        .expect_err("a third run is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(
        refused
            .get_details_error_info()
            .map(|i| i.reason)
            .as_deref(),
        Some("TOO_MANY_ORDERS_IN_FLIGHT")
    );
    assert_eq!(
        app.sandbox.calls(Endpoint::ParTrade),
        2,
        "nothing sent for B3"
    );

    // Once the two runs end, their permits are back: B3 is created.
    app.sandbox.set_fault(None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match payment.create_jsapi_order(order("B3", 100)).await {
            Ok(_) => break,
            Err(s) if s.code() == Code::ResourceExhausted => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the runs never ended"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => panic!("{s:?}"),
        }
    }
    // Each run records its outcome (B2's may end a moment after B1's).
    for id in ["B1", "B2", "B3"] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let stored = payment
                .get_order(GetOrderRequest {
                    out_trade_id: id.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .order
                .unwrap();
            if ProtoState::try_from(stored.state) == Ok(ProtoState::Created) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{id}: {stored:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
