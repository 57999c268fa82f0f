//! Upstream down, slow, failing or talking nonsense: the right gRPC code,
//! within the timeout, and the service stays healthy.

use std::time::{Duration, Instant};

use kongtie_gateway::{
    proto::{GetAccessTokenRequest, GetJsApiTicketRequest},
    sandbox::Fault,
};
use tonic::{Code, Request};

use crate::helpers::*;

#[tokio::test]
async fn an_unreachable_upstream_is_unavailable_and_the_service_stays_healthy() {
    let down = closed_port().await;
    let (ktapi_url, pay_url) = (
        format!("http://{down}/awkmanage/v3/ktapi"),
        format!("http://{down}/v5/ParTrade.ashx"),
    );
    let app = spawn_app_with(&["--ktapi-url", &ktapi_url, "--pay-url", &pay_url]).await;
    let status = app.access_token().await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(error_info(&status).0, "UPSTREAM_UNAVAILABLE");
    assert_eq!(
        status.message(),
        "Kongtie GetAccessToken is unavailable: connection failed: connection refused"
    );
    let status = app
        .payment()
        .await
        .create_jsapi_order(order("F1", 1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(app.is_serving().await);
}

#[tokio::test]
async fn a_slow_upstream_is_a_deadline_exceeded_within_the_configured_timeout() {
    let app = spawn_app_with(&["--upstream-timeout-ms", "300"]).await;
    app.sandbox
        .set_fault(Some(Fault::Delay(Duration::from_secs(5))));
    let started = Instant::now();
    let status = app.access_token().await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(error_info(&status).0, "UPSTREAM_TIMEOUT");
    assert!(
        took < Duration::from_secs(3),
        "took {took:?} for a 300ms timeout"
    );

    // Once the upstream recovers, so does the service.
    app.sandbox.set_fault(None);
    app.access_token().await.unwrap();
    assert!(app.is_serving().await);
}

#[tokio::test]
async fn the_callers_deadline_bounds_the_upstream_call() {
    let app = spawn_app().await; // upstream timeout 5 s
    app.sandbox
        .set_fault(Some(Fault::Delay(Duration::from_secs(5))));
    let mut request = Request::new(order("F1", 1));
    request.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let status = app
        .payment()
        .await
        .create_jsapi_order(request)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(3));

    // A cached call honours the deadline too, while its fetch goes on.
    let mut request = Request::new(GetJsApiTicketRequest::default());
    request.set_timeout(Duration::from_millis(300));
    let status = app
        .ticket()
        .await
        .get_js_api_ticket(request)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
}

#[tokio::test]
async fn a_server_error_is_unavailable() {
    let app = spawn_app().await;
    app.sandbox.set_fault(Some(Fault::Status(500)));
    let status = app
        .payment()
        .await
        .create_jsapi_order(order("F1", 1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("500"), "{}", status.message());
    assert_eq!(error_info(&status).1["endpoint"], "ParTrade");
    assert!(app.is_serving().await);
}

#[tokio::test]
async fn a_garbage_answer_is_internal_and_says_what_was_wrong() {
    let app = spawn_app().await;
    app.sandbox.set_fault(Some(Fault::Garbage));
    let status = app.access_token().await.unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(error_info(&status).0, "UPSTREAM_BAD_RESPONSE");
    assert!(
        status.message().contains("not a Kongtie response envelope"),
        "{}",
        status.message()
    );
    assert!(app.is_serving().await);
}

#[tokio::test]
async fn a_failed_fetch_is_not_cached() {
    let app = spawn_app().await;
    app.sandbox.set_fault(Some(Fault::Status(503)));
    let mut auth = app.auth().await;
    auth.get_access_token(GetAccessTokenRequest::default())
        .await
        .unwrap_err();
    app.sandbox.set_fault(None);
    let token = auth
        .get_access_token(GetAccessTokenRequest::default())
        .await
        .unwrap();
    assert!(!token.into_inner().access_token.is_empty());
}
