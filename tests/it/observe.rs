//! What operators see of each RPC: the usual gRPC server metrics (gRPC and
//! Connect counted alike), the build's version, a log that is not drowned
//! by health probes, and traces: a caller's `traceparent` continued to
//! Kongtie, spans exported to an OTLP receiver (the test's own) when one is
//! configured.

use std::{
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kongtie_gateway::proto::{
    CreateJsapiOrderRequest, GetAccessTokenRequest, auth_client::AuthClient,
};
use prost::Message;

use crate::helpers::{Binary, admin_metrics, grpcurl, sample, spawn_app, spawn_sandbox};

const TOKEN: &str =
    r#"{grpc_type="unary",grpc_service="kongtie.v1.Auth",grpc_method="GetAccessToken"}"#;

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("running curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn every_rpc_is_counted_by_method_and_code_for_grpc_and_connect_alike() {
    let app = spawn_app().await;
    for _ in 0..3 {
        app.access_token().await.unwrap();
    }
    let url = format!("http://{}/kongtie.v1.Auth/GetAccessToken", app.addr);
    let nope = format!("http://{}/kongtie.v1.Auth/NoSuchMethod", app.addr);
    tokio::task::spawn_blocking(move || {
        for _ in 0..2 {
            let out = curl(&["-H", "content-type: application/json", "-d", "{}", &url]);
            assert!(out.contains("accessToken"), "{out}");
        }
        // A gRPC call to a path nobody serves (HTTP/2, as gRPC is).
        curl(&[
            "--http2-prior-knowledge",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "--data-binary",
            "",
            &nope,
        ]);
    })
    .await
    .unwrap();
    let refused = app
        .payment()
        .await
        .create_jsapi_order(CreateJsapiOrderRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    let m = admin_metrics(&app.admin.to_string()).await;
    assert_eq!(
        sample(&m, &format!("grpc_server_started_total{TOKEN}")),
        5.0,
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            r#"grpc_server_handled_total{grpc_type="unary",grpc_service="kongtie.v1.Auth",grpc_method="GetAccessToken",grpc_code="OK"}"#
        ),
        5.0
    );
    assert_eq!(
        sample(&m, &format!("grpc_server_handling_seconds_count{TOKEN}")),
        5.0
    );
    assert_eq!(
        sample(
            &m,
            r#"grpc_server_handled_total{grpc_type="unary",grpc_service="kongtie.v1.Payment",grpc_method="CreateJsapiOrder",grpc_code="InvalidArgument"}"#
        ),
        1.0
    );
    // An unknown path is one `unknown` series, however many are tried.
    assert_eq!(
        sample(
            &m,
            r#"grpc_server_handled_total{grpc_type="unknown",grpc_service="unknown",grpc_method="unknown",grpc_code="Unimplemented"}"#
        ),
        1.0,
        "{m}"
    );
    assert!(!m.contains("NoSuchMethod"));
    assert_eq!(
        sample(
            &m,
            &format!(
                "kongtie_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
}

#[test]
fn health_checks_and_reflection_stay_out_of_the_info_log_and_rpcs_do_not() {
    let bin = Binary::start(&["serve", "--sandbox", "--sandbox-addr", "127.0.0.1:0"]);
    let grpcurl = |args: &[&str]| {
        let out = Command::new(grpcurl())
            .args(["-plaintext", "-max-time", "10"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for _ in 0..3 {
        grpcurl(&[&bin.grpc, "grpc.health.v1.Health/Check"]);
        grpcurl(&[&bin.grpc, "list"]);
    }
    grpcurl(&[&bin.grpc, "kongtie.v1.Auth/GetAccessToken"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = bin.log.lock().unwrap().clone();
        if log
            .iter()
            .any(|l| l.contains("rpc finished") && l.contains("GetAccessToken"))
        {
            break log;
        }
        assert!(Instant::now() < deadline, "no line for the RPC: {log:#?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let line = log
        .iter()
        .find(|l| l.contains("rpc finished") && l.contains("GetAccessToken"))
        .unwrap();
    assert!(line.contains("INFO") && line.contains("code=OK"), "{line}");
    assert!(line.contains("latency_us="), "{line}");
    assert!(!line.contains("SBXAT_"), "no token in the log: {line}");
    let noisy: Vec<_> = log
        .iter()
        .filter(|l| l.contains("grpc.health") || l.contains("ServerReflection"))
        .collect();
    assert!(noisy.is_empty(), "{noisy:#?}");
    assert!(
        log.iter().any(|l| l.contains("kongtie-gateway starting")
            && l.contains(&format!("version={}", env!("CARGO_PKG_VERSION")))),
        "the version at start-up: {log:#?}"
    );
}

/// Log lines are written by a thread of their own: a stderr nobody reads
/// (a full pipe, a stuck log shipper) holds up no call. The calls' lines
/// are all written once it is read again, and none was dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
// The gate is held across the calls on purpose: the reader thread waits on it.
#[allow(clippy::await_holding_lock)]
async fn a_stderr_nobody_reads_holds_up_no_call_and_loses_no_line() {
    const CALLS: usize = 3_000;
    let bin = Binary::start(&["serve", "--sandbox", "--sandbox-addr", "127.0.0.1:0"]);
    let mut client = AuthClient::connect(format!("http://{}", bin.grpc))
        .await
        .unwrap();
    client
        .get_access_token(GetAccessTokenRequest::default())
        .await
        .unwrap();
    let finished = |bin: &Binary| {
        bin.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("rpc finished") && l.contains("GetAccessToken"))
            .count()
    };
    let before = finished(&bin);
    let paused = bin.log_reader.lock().unwrap();
    // Each line is about 150 bytes: 3,000 of them are seven times what a
    // pipe holds (64 KiB), so a writer on the calls' path would block.
    let calls = async {
        for _ in 0..CALLS {
            client
                .get_access_token(GetAccessTokenRequest::default())
                .await
                .unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(60), calls)
        .await
        .expect("calls held up by a stderr nobody reads");
    let unread = finished(&bin);
    assert!(
        unread < before + CALLS,
        "the pipe did not fill (the test reads what it should not)"
    );
    drop(paused);
    let deadline = Instant::now() + Duration::from_secs(30);
    while finished(&bin) < before + CALLS {
        assert!(
            Instant::now() < deadline,
            "{} of {CALLS} lines written once stderr was read",
            finished(&bin) - before
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let metrics = admin_metrics(&bin.admin).await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "kongtie_log_lines_dropped_total 0"),
        "{metrics}"
    );
}

/// The spans a small OTLP/HTTP receiver (the test's own) was sent.
type Received = Arc<Mutex<Vec<opentelemetry_proto::tonic::trace::v1::Span>>>;

async fn otlp_receiver() -> (std::net::SocketAddr, Received) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    let received: Received = Arc::default();
    let kept = Arc::clone(&received);
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let kept = Arc::clone(&kept);
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                for resource in request.resource_spans {
                    for scope in resource.scope_spans {
                        kept.lock().unwrap().extend(scope.spans);
                    }
                }
                // An empty ExportTraceServiceResponse.
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, received)
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn with_traceparent<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE}-{CALLER_SPAN}-01").parse().unwrap(),
    );
    request
}

/// The traceparent Kongtie (the test's sandbox) got with the last token call.
fn kongtie_traceparent(sandbox: &kongtie_gateway::sandbox::SandboxHandle) -> String {
    sandbox
        .requests()
        .iter()
        .rev()
        .find(|r| r.endpoint == kongtie_gateway::upstream::Endpoint::GetAccessToken)
        .and_then(|r| r.traceparent.clone())
        .expect("Kongtie got a traceparent")
}

#[tokio::test]
async fn a_callers_trace_continues_to_kongtie_and_its_spans_go_to_the_otlp_endpoint() {
    let (receiver, received) = otlp_receiver().await;
    let sandbox = spawn_sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("http://{receiver}");
    let bin = Binary::start_with(
        &["serve", "--ktapi-url", sandbox.ktapi_url().as_str()],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            // Export within 100 ms rather than the default 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
        dir.path(),
        None,
    );
    AuthClient::connect(format!("http://{}", bin.grpc))
        .await
        .unwrap()
        .get_access_token(with_traceparent(GetAccessTokenRequest::default()))
        .await
        .unwrap();

    // Kongtie got the caller's trace, as a child of a span of ours.
    let sent = kongtie_traceparent(&sandbox);
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!((parts[0], parts[1]), ("00", TRACE), "{sent}");
    assert_ne!(parts[2], CALLER_SPAN);

    // The spans reach the receiver: the RPC's, a child of the caller's
    // span, and the Kongtie call's, a child of the RPC's, whose id is the
    // one Kongtie got.
    let trace = hex::decode(TRACE).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (rpc, kongtie) = loop {
        let spans = received.lock().unwrap().clone();
        let rpc = spans
            .iter()
            .find(|s| s.trace_id == trace && s.name == "grpc")
            .cloned();
        let kongtie = spans
            .iter()
            .find(|s| s.trace_id == trace && s.name == "kongtie")
            .cloned();
        if let (Some(rpc), Some(kongtie)) = (rpc, kongtie) {
            break (rpc, kongtie);
        }
        assert!(
            Instant::now() < deadline,
            "no exported spans of the trace: {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(rpc.parent_span_id, hex::decode(CALLER_SPAN).unwrap());
    assert_eq!(kongtie.parent_span_id, rpc.span_id);
    assert_eq!(hex::encode(&kongtie.span_id), parts[2]);
    let method = rpc
        .attributes
        .iter()
        .find(|a| a.key == "method")
        .and_then(|a| a.value.as_ref())
        .map(|v| format!("{v:?}"))
        .unwrap_or_default();
    assert!(
        method.contains("/kongtie.v1.Auth/GetAccessToken"),
        "{method}"
    );
    let logged = bin.log.lock().unwrap().join("\n");
    assert!(logged.contains("spans are exported over OTLP"), "{logged}");
}

#[tokio::test]
async fn without_an_otlp_endpoint_nothing_is_exported_and_the_trace_still_reaches_kongtie() {
    let sandbox = spawn_sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let bin = Binary::start_with(
        &["serve", "--ktapi-url", sandbox.ktapi_url().as_str()],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", ""),
        ],
        dir.path(),
        None,
    );
    let url = format!("http://{}/kongtie.v1.Auth/GetAccessToken", bin.grpc);
    // Over the Connect protocol this time: the same layer continues it.
    let answer = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .header("traceparent", format!("00-{TRACE}-{CALLER_SPAN}-01"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let sent = kongtie_traceparent(&sandbox);
    assert!(sent.starts_with(&format!("00-{TRACE}-")), "{sent}");
    let logged = bin.log.lock().unwrap().join("\n");
    assert!(!logged.contains("OTLP"), "{logged}");
}
