//! Settings the README's table names, each set through its flag as a user
//! sets it, shown doing what the table says.

use std::time::Duration;

use chrono::Utc;
use kongtie_gateway::{proto::GetOrderRequest, upstream::Endpoint};
use tonic::Code;

use crate::helpers::*;

/// `KONGTIE_CACHE_TTL_SECS`: within it, one fetch serves every call; past
/// it, the next call fetches again.
#[tokio::test]
async fn the_cache_ttl_decides_when_a_token_is_fetched_again() {
    let app = spawn_app_with(&["--cache-ttl-secs", "1"]).await;
    let first = app.access_token().await.unwrap().into_inner().access_token;
    let again = app.access_token().await.unwrap().into_inner().access_token;
    assert_eq!(first, again);
    assert_eq!(app.sandbox.calls(Endpoint::GetAccessToken), 1);
    // Time itself is what is tested: let the TTL pass.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    app.access_token().await.unwrap();
    assert_eq!(
        app.sandbox.calls(Endpoint::GetAccessToken),
        2,
        "past the TTL the token is fetched again"
    );
}

/// `KONGTIE_ORDER_TTL_SECS`: an order that names no expiry gets this one,
/// and Kongtie is told it.
#[tokio::test]
async fn an_order_without_an_expiry_gets_the_configured_one() {
    let app = spawn_app_with(&["--order-ttl-secs", "120"]).await;
    let before = Utc::now();
    app.payment()
        .await
        .create_jsapi_order(order("TTL1", 20))
        .await
        .unwrap();
    let stored = app
        .payment()
        .await
        .get_order(GetOrderRequest {
            out_trade_id: "TTL1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .order
        .unwrap();
    let expires = stored.expires_at.unwrap().seconds;
    let expected = before.timestamp() + 120;
    assert!(
        (expected - 1..=expected + 10).contains(&expires),
        "expires {expires}, expected about {expected}"
    );
    let sent = app.sandbox.requests();
    let timeout = sent[0].field("OrderTimeOut").unwrap();
    let beijing = chrono::DateTime::from_timestamp(expires, 0)
        .unwrap()
        .with_timezone(&chrono::FixedOffset::east_opt(8 * 3600).unwrap())
        .format("%Y%m%d%H%M%S")
        .to_string();
    assert_eq!(timeout, beijing);
}

/// `KONGTIE_MAX_AMOUNT_FEN`: the largest amount passes, one fen more is
/// INVALID_ARGUMENT on `amount_fen`, saying the limit.
#[tokio::test]
async fn a_lower_maximum_amount_refuses_one_fen_more() {
    let app = spawn_app_with(&["--max-amount-fen", "500"]).await;
    let mut payment = app.payment().await;
    payment
        .create_jsapi_order(order("MAX1", 500))
        .await
        .unwrap();
    let refused = payment
        .create_jsapi_order(order("MAX2", 501))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&refused), ["amount_fen"]);
    assert!(
        refused
            .message()
            .contains("must be at most 500 fen, got 501"),
        "{}",
        refused.message()
    );
    assert_eq!(
        app.sandbox.calls(Endpoint::ParTrade),
        1,
        "nothing sent for it"
    );
}

/// The notify listener's path, body limit and token, all non-default.
#[tokio::test]
async fn the_notify_listener_takes_its_path_body_limit_and_token_from_the_flags() {
    let app = spawn_app_with(&[
        "--notify-path",
        "/hooks/kongtie",
        "--notify-max-body-bytes",
        "1024",
        "--notify-token",
        "a-notify-token",
    ])
    .await;
    assert!(
        app.notify_url.ends_with("/hooks/kongtie"),
        "{}",
        app.notify_url
    );
    let good = payment_notification("NP1", "a-notify-token");
    assert_eq!(
        post(&app.notify_url, good.clone()).await,
        (200, "success".into())
    );
    // Signed with the ktapi token, which the notify token replaces: refused.
    assert_eq!(
        post(&app.notify_url, payment_notification("NP2", KTAPI_TOKEN))
            .await
            .0,
        401
    );
    // The default path is not served.
    let default = app
        .notify_url
        .replace("/hooks/kongtie", "/kongtie/payment-notify");
    assert_eq!(post(&default, good).await.0, 404);
    // Over 1,024 bytes: 413, before it is read.
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(1100));
    assert_eq!(post(&app.notify_url, big).await.0, 413);
    let stored = app.stored_notifications().await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].out_trade_id, "NP1");
}

/// The README: "The raw body is kept", byte for byte, as Kongtie sent it
/// (spacing and key order included), beside the parsed fields.
#[tokio::test]
async fn the_raw_body_is_kept_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let url = store_url(dir.path());
    let app = spawn_app_with(&["--store", &url]).await;
    let compact = payment_notification("RAW1", KTAPI_TOKEN);
    let value: serde_json::Value = serde_json::from_str(&compact).unwrap();
    // Pretty-printed, with a trailing newline: not what serde would write.
    let sent = format!("{}\n", serde_json::to_string_pretty(&value).unwrap());
    assert_ne!(sent, compact);
    assert_eq!(app.notify(sent.clone()).await, (200, "success".into()));
    let conn = rusqlite::Connection::open(dir.path().join("notifications.db")).unwrap();
    let kept: String = conn
        .query_row(
            "SELECT raw_body FROM notifications WHERE out_trade_id = 'RAW1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(kept, sent);
}
