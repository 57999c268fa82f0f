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
    assert_eq!(
        status.message(),
        "Kongtie GetAccessToken sent an answer we cannot use: not a Kongtie response envelope \
         (not JSON)",
        "plain words, no parser position"
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

/// The most memory the process has held (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024.0
}

/// Kongtie (here the sandbox) answers 100 MB, once with its Content-Length
/// and once chunked: the real binary refuses both with
/// UPSTREAM_ANSWER_TOO_LARGE and its peak memory does not grow by the
/// answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_of_100_mb_is_refused_at_the_limit_without_being_held() {
    let sandbox = spawn_sandbox().await;
    let bin = Binary::start(&[
        "serve",
        "--ktapi-url",
        sandbox.ktapi_url().as_str(),
        "--pay-url",
        sandbox.pay_url().as_str(),
    ]);
    let mut auth =
        kongtie_gateway::proto::auth_client::AuthClient::connect(format!("http://{}", bin.grpc))
            .await
            .unwrap();
    // Warm: one real call, so what follows measures the answer only. Each
    // call below calls this token stale, so that Kongtie is asked again.
    let token = auth
        .get_access_token(GetAccessTokenRequest::default())
        .await
        .unwrap()
        .into_inner()
        .access_token;
    let before = peak_rss_mib(bin.child.id());
    for chunked in [false, true] {
        sandbox.set_fault(Some(Fault::Huge {
            bytes: 100 << 20,
            chunked,
        }));
        let mut request = Request::new(GetAccessTokenRequest {
            stale_token: token.clone(),
        });
        request.set_timeout(Duration::from_secs(20));
        let status = auth.get_access_token(request).await.unwrap_err();
        let peak = peak_rss_mib(bin.child.id());
        eprintln!("chunked {chunked}: peak RSS {before:.1} MiB before, {peak:.1} MiB after");
        assert!(
            peak - before < 30.0,
            "chunked {chunked}: peak RSS grew from {before:.1} to {peak:.1} MiB"
        );
        assert_eq!(
            status.code(),
            Code::Unavailable,
            "chunked {chunked}: {status:?}"
        );
        let (reason, meta) = error_info(&status);
        assert_eq!(reason, "UPSTREAM_ANSWER_TOO_LARGE", "chunked {chunked}");
        assert_eq!(meta["limit_bytes"], "1048576");
        assert_eq!(
            status.message(),
            "Kongtie GetAccessToken sent an answer over 1024 KiB; it was not read"
        );
    }
    // And Kongtie answering well again is served again.
    sandbox.set_fault(None);
    let mut request = Request::new(GetAccessTokenRequest {
        stale_token: token.clone(),
    });
    request.set_timeout(Duration::from_secs(10));
    auth.get_access_token(request).await.unwrap();
}
