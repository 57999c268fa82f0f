//! The Connect protocol on the gRPC port, driven by real HTTP clients:
//! `curl` for unary calls (JSON, protobuf, GET) and errors, and an
//! HTTP/1.1-only client reading the notification stream. The npm
//! `@connectrpc/connect` client and PHP run in `.ci/examples.sh`.

use std::{process::Command, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD_NO_PAD};
use kongtie_gateway::proto::{GetAccessTokenRequest, GetAccessTokenResponse};
use prost::Message;
use serde_json::{Value, json};
use tokio::time::timeout;

use crate::helpers::{
    KTAPI_TOKEN, admin_metrics, payment_notification, sample, spawn_app, spawn_app_with,
    split_included, violated_fields,
};

/// What `curl` printed: the HTTP status, the headers (lower-cased names)
/// and the body.
struct Curled {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Curled {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Runs curl (over HTTP/1.1, as PHP and shell scripts do) and splits its
/// `--include` output.
async fn curl(args: &[&str]) -> Curled {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args([
                "-sS",
                "--globoff",
                "--include",
                "--http1.1",
                "--max-time",
                "10",
            ])
            .args(&args)
            .output()
            .expect("running curl")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, headers, body) = split_included(&out.stdout);
    Curled {
        status,
        headers,
        body,
    }
}

fn url(app_addr: std::net::SocketAddr, path: &str) -> String {
    format!("http://{app_addr}/{path}")
}

#[tokio::test]
async fn curl_calls_rpcs_with_json_protobuf_and_get_and_gets_what_grpc_gets() {
    let app = spawn_app().await;
    let grpc_token = app.access_token().await.unwrap().into_inner().access_token;
    let at = url(app.addr, "kongtie.v1.Auth/GetAccessToken");

    let post = curl(&["-H", "content-type: application/json", "-d", "{}", &at]).await;
    assert_eq!(post.status, 200);
    assert_eq!(post.header("content-type"), Some("application/json"));
    assert_eq!(post.json()["accessToken"], grpc_token.as_str());
    // fetchedAt is a Timestamp in protobuf JSON (RFC 3339), not an object.
    assert!(post.json()["fetchedAt"].as_str().unwrap().ends_with('Z'));

    let get = curl(&[&format!("{at}?connect=v1&encoding=json&message=%7B%7D")]).await;
    assert_eq!(get.status, 200);
    assert_eq!(get.json()["accessToken"], grpc_token.as_str());

    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        GetAccessTokenRequest::default().encode_to_vec(),
    )
    .unwrap();
    let proto = curl(&[
        "-H",
        "content-type: application/proto",
        "--data-binary",
        &format!("@{}", file.path().display()),
        &at,
    ])
    .await;
    assert_eq!(proto.status, 200);
    assert_eq!(proto.header("content-type"), Some("application/proto"));
    let decoded = GetAccessTokenResponse::decode(proto.body.as_slice()).unwrap();
    assert_eq!(decoded.access_token, grpc_token);

    // The same field names as grpcurl's (snake_case) are read too.
    let order = curl(&[
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"out_trade_id": "C1001", "amountFen": "20", "openid": "oConnectUser"}"#,
        &url(app.addr, "kongtie.v1.Payment/CreateJsapiOrder"),
    ])
    .await;
    assert_eq!(
        order.status,
        200,
        "{}",
        String::from_utf8_lossy(&order.body)
    );
    assert_eq!(order.json()["payParams"]["signType"], "MD5");
    let stored = curl(&[&format!(
        "{}?encoding=json&message={}",
        url(app.addr, "kongtie.v1.Payment/GetOrder"),
        "%7B%22outTradeId%22%3A%22C1001%22%7D"
    )])
    .await;
    assert_eq!(stored.status, 200);
    // int64 is a string in protobuf JSON: no float ever holds an amount.
    assert_eq!(stored.json()["order"]["amountFen"], "20");
}

#[tokio::test]
async fn connect_errors_carry_the_grpc_code_its_http_status_and_the_same_details() {
    let app = spawn_app().await;
    let create = url(app.addr, "kongtie.v1.Payment/CreateJsapiOrder");
    let bad = json!({"out_trade_id": "A-1", "amount_fen": 0, "openid": "oUser"}).to_string();

    let grpc_status = app
        .payment()
        .await
        .create_jsapi_order(kongtie_gateway::proto::CreateJsapiOrderRequest {
            out_trade_id: "A-1".into(),
            amount_fen: 0,
            openid: "oUser".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let r = curl(&["-H", "content-type: application/json", "-d", &bad, &create]).await;
    assert_eq!(r.status, 400);
    let error = r.json();
    assert_eq!(error["code"], "invalid_argument");
    assert_eq!(error["message"], grpc_status.message());
    let detail = &error["details"][0];
    assert_eq!(detail["type"], "google.rpc.BadRequest");
    let fields: Vec<&str> = detail["debug"]["fieldViolations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, violated_fields(&grpc_status));
    // `value` is the BadRequest's own bytes, as a Connect client decodes them.
    let bytes = STANDARD_NO_PAD
        .decode(detail["value"].as_str().unwrap())
        .unwrap();
    let decoded = tonic_types::pb::BadRequest::decode(bytes.as_slice()).unwrap();
    assert_eq!(decoded.field_violations.len(), fields.len());

    let not_json = curl(&["-H", "content-type: application/json", "-d", "{", &create]).await;
    assert_eq!(not_json.status, 400);
    assert_eq!(not_json.json()["code"], "invalid_argument");
    assert!(
        not_json.json()["message"]
            .as_str()
            .unwrap()
            .contains("kongtie.v1.CreateJsapiOrderRequest")
    );

    let missing = curl(&[&format!(
        "{}?encoding=json&message=%7B%22outTradeId%22%3A%22NOPE1%22%7D",
        url(app.addr, "kongtie.v1.Payment/GetOrder")
    )])
    .await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["code"], "not_found");

    let unknown = curl(&[
        "-H",
        "content-type: application/json",
        "-d",
        "{}",
        &url(app.addr, "kongtie.v1.Auth/Nope"),
    ])
    .await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["code"], "unimplemented");

    let get_a_write = curl(&[&format!("{create}?encoding=json&message={{}}")]).await;
    assert_eq!(get_a_write.status, 405);
    assert_eq!(get_a_write.header("allow"), Some("POST"));

    let unary_to_stream = curl(&[
        "-H",
        "content-type: application/json",
        "-d",
        "{}",
        &url(app.addr, "kongtie.v1.Payment/SubscribeNotifications"),
    ])
    .await;
    assert_eq!(unary_to_stream.status, 415);

    let gzip = curl(&[
        "-H",
        "content-type: application/json",
        "-H",
        "content-encoding: gzip",
        "-d",
        "{}",
        &url(app.addr, "kongtie.v1.Auth/GetAccessToken"),
    ])
    .await;
    assert_eq!(gzip.status, 501);
    assert_eq!(gzip.json()["code"], "unimplemented");
}

#[tokio::test]
async fn api_keys_guard_connect_calls_as_they_guard_grpc() {
    const KEY: &str = "connect-test-key-0123456789";
    let app = spawn_app_with(&["--api-keys", KEY]).await;
    let at = url(app.addr, "kongtie.v1.Auth/GetAccessToken");
    let none = curl(&["-H", "content-type: application/json", "-d", "{}", &at]).await;
    assert_eq!(none.status, 401);
    assert_eq!(none.json()["code"], "unauthenticated");
    let wrong = curl(&[
        "-H",
        "content-type: application/json",
        "-H",
        "authorization: Bearer wrong-key-0123456789",
        "-d",
        "{}",
        &at,
    ])
    .await;
    assert_eq!(wrong.status, 401);
    assert!(!String::from_utf8_lossy(&wrong.body).contains("wrong-key"));
    let good = curl(&[
        "-H",
        "content-type: application/json",
        "-H",
        &format!("authorization: Bearer {KEY}"),
        "-d",
        "{}",
        &at,
    ])
    .await;
    assert_eq!(good.status, 200);
    assert!(
        good.json()["accessToken"]
            .as_str()
            .unwrap()
            .starts_with("SBXAT_")
    );
}

#[tokio::test]
async fn a_connect_timeout_bounds_a_long_poll_as_grpc_timeout_does() {
    let app = spawn_app().await;
    let create = curl(&[
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"name": "connect-queue"}"#,
        &url(app.addr, "kongtie.v1.Payment/CreateConsumer"),
    ])
    .await;
    assert_eq!(
        create.status,
        200,
        "{}",
        String::from_utf8_lossy(&create.body)
    );
    let started = std::time::Instant::now();
    let fetch = curl(&[
        "-H",
        "content-type: application/json",
        "-H",
        "connect-timeout-ms: 800",
        "-d",
        r#"{"consumer": "connect-queue", "max_events": 5, "wait": "20s"}"#,
        &url(app.addr, "kongtie.v1.Payment/FetchNotifications"),
    ])
    .await;
    let took = started.elapsed();
    assert_eq!(
        fetch.status,
        200,
        "{}",
        String::from_utf8_lossy(&fetch.body)
    );
    assert!(fetch.json().get("events").is_none(), "nothing to fetch");
    assert!(
        took < Duration::from_secs(3),
        "the 800 ms timeout, not the 20 s wait, ended the poll ({took:?})"
    );
    let bad = curl(&[
        "-H",
        "content-type: application/json",
        "-H",
        "connect-timeout-ms: soon",
        "-d",
        "{}",
        &url(app.addr, "kongtie.v1.Auth/GetAccessToken"),
    ])
    .await;
    assert_eq!(bad.status, 400);
}

/// One Connect envelope: (flags, payload).
fn take_envelope(buffer: &mut Vec<u8>) -> Option<(u8, Vec<u8>)> {
    if buffer.len() < 5 {
        return None;
    }
    let len = u32::from_be_bytes(buffer[1..5].try_into().unwrap()) as usize;
    if buffer.len() < 5 + len {
        return None;
    }
    let flags = buffer[0];
    let payload = buffer[5..5 + len].to_vec();
    buffer.drain(..5 + len);
    Some((flags, payload))
}

fn envelope(payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

#[tokio::test]
async fn the_notification_stream_flows_over_http1_as_connect_json_and_ends_with_the_status() {
    let app = spawn_app().await;
    for i in 1..=2 {
        let (status, body) = app
            .notify(payment_notification(&format!("CS{i}"), KTAPI_TOKEN))
            .await;
        assert_eq!((status, body.as_str()), (200, "success"));
    }
    let client = reqwest::Client::builder().http1_only().build().unwrap();
    let mut response = client
        .post(url(app.addr, "kongtie.v1.Payment/SubscribeNotifications"))
        .header("content-type", "application/connect+json")
        .header("connect-protocol-version", "1")
        .body(envelope(br#"{"afterSequence": "0"}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
    assert_eq!(
        response.headers()["content-type"],
        "application/connect+json"
    );
    let mut buffer = Vec::new();
    let mut next = async || loop {
        if let Some(e) = take_envelope(&mut buffer) {
            return e;
        }
        let chunk = timeout(Duration::from_secs(10), response.chunk())
            .await
            .expect("an envelope within 10 s")
            .unwrap()
            .expect("the stream goes on");
        buffer.extend_from_slice(&chunk);
    };
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (flags, payload) = next().await;
        assert_eq!(flags, 0);
        let event: Value = serde_json::from_slice(&payload).unwrap();
        ids.push(event["outTradeId"].as_str().unwrap().to_owned());
        assert!(event["sequence"].is_string(), "uint64 as a string: {event}");
    }
    // One arriving while the stream is open comes live.
    let (status, _) = app.notify(payment_notification("CS3", KTAPI_TOKEN)).await;
    assert_eq!(status, 200);
    let (_, payload) = next().await;
    ids.push(
        serde_json::from_slice::<Value>(&payload).unwrap()["outTradeId"]
            .as_str()
            .unwrap()
            .to_owned(),
    );
    assert_eq!(ids, ["CS1", "CS2", "CS3"]);

    let metrics = admin_metrics(&app.admin.to_string()).await;
    assert!(
        sample(
            &metrics,
            "grpc_server_started_total{grpc_type=\"server_stream\",grpc_service=\"kongtie.v1.Payment\",grpc_method=\"SubscribeNotifications\"}"
        ) >= 1.0,
        "a Connect stream counts as the RPC it is:\n{metrics}"
    );

    // The gateway's shutdown ends the stream with Connect's end-of-stream
    // message, carrying the gRPC status.
    let mut app = app;
    let stop = tokio::spawn(async move {
        app.stop().await;
    });
    let (flags, payload) = next().await;
    assert_eq!(flags, 0x02, "end of stream");
    let end: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(end["error"]["code"], "unavailable", "{end}");
    timeout(Duration::from_secs(15), stop)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_stream_refused_at_once_is_http_200_with_the_error_in_the_end_message() {
    let app = spawn_app().await;
    let response = reqwest::Client::builder()
        .http1_only()
        .build()
        .unwrap()
        .post(url(app.addr, "kongtie.v1.Payment/SubscribeNotifications"))
        .header("content-type", "application/connect+json")
        .body(envelope(br#"{"consumer": "Not A Name!"}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes().await.unwrap().to_vec();
    let (flags, payload) = take_envelope(&mut body).unwrap();
    assert_eq!(flags, 0x02);
    let end: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(end["error"]["code"], "invalid_argument", "{end}");
    assert_eq!(
        end["error"]["details"][0]["debug"]["fieldViolations"][0]["field"],
        "consumer"
    );
    assert!(body.is_empty());
}

#[tokio::test]
async fn the_stream_speaks_connect_proto_too() {
    use kongtie_gateway::proto::{PaymentNotification, SubscribeNotificationsRequest};
    let app = spawn_app().await;
    let (status, _) = app.notify(payment_notification("CP1", KTAPI_TOKEN)).await;
    assert_eq!(status, 200);
    let request = SubscribeNotificationsRequest {
        after_sequence: Some(0),
        ..Default::default()
    };
    let mut response = reqwest::Client::builder()
        .http1_only()
        .build()
        .unwrap()
        .post(url(app.addr, "kongtie.v1.Payment/SubscribeNotifications"))
        .header("content-type", "application/connect+proto")
        .body(envelope(&request.encode_to_vec()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/connect+proto"
    );
    let mut buffer = Vec::new();
    let (flags, payload) = loop {
        if let Some(e) = take_envelope(&mut buffer) {
            break e;
        }
        let chunk = timeout(Duration::from_secs(10), response.chunk())
            .await
            .expect("a message within 10 s")
            .unwrap()
            .expect("the stream goes on");
        buffer.extend_from_slice(&chunk);
    };
    assert_eq!(flags, 0);
    let event = PaymentNotification::decode(payload.as_slice()).unwrap();
    assert_eq!((event.sequence, event.out_trade_id.as_str()), (1, "CP1"));
}

/// Sends `head` (a request line and headers, no body) over HTTP/1.1 and
/// reads until the server closes: (the answer, how long it took). Nothing
/// more is sent, so a server that waits for the body waits in vain.
async fn raw_http1(addr: std::net::SocketAddr, head: &str) -> (String, Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = std::time::Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    // Keep-alive: the answer is whole once its body is in.
                    if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase();
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok());
                        if length.is_some_and(|n| answer.len() >= end + 4 + n) {
                            break;
                        }
                    }
                }
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "no answer within 5 s: {}",
        String::from_utf8_lossy(&answer)
    );
    (
        String::from_utf8_lossy(&answer).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test]
async fn a_connect_body_declared_at_a_terabyte_is_refused_from_its_header_key_first() {
    const KEY: &str = "connect-test-key-0123456789";
    let app = spawn_app_with(&["--api-keys", KEY]).await;
    let head = |auth: &str| {
        format!(
            "POST /kongtie.v1.Auth/GetAccessToken HTTP/1.1\r\nhost: localhost\r\n\
             content-type: application/json\r\ncontent-length: 1000000000000\r\n{auth}\r\n"
        )
    };
    // Without a key: UNAUTHENTICATED, the size not even looked at.
    let (answer, took) = raw_http1(app.addr, &head("")).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.contains("unauthenticated"), "{answer}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    // With one: RESOURCE_EXHAUSTED at once, naming the limit.
    let (answer, took) =
        raw_http1(app.addr, &head(&format!("authorization: Bearer {KEY}\r\n"))).await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(answer.contains("resource_exhausted"), "{answer}");
    assert!(
        answer.contains("KONGTIE_GRPC_MAX_MESSAGE_BYTES"),
        "{answer}"
    );
    assert!(took < Duration::from_secs(2), "{took:?}");
    // A stream's body too.
    let stream = format!(
        "POST /kongtie.v1.Payment/SubscribeNotifications HTTP/1.1\r\nhost: localhost\r\n\
         content-type: application/connect+json\r\ncontent-length: 1000000000000\r\n\
         authorization: Bearer {KEY}\r\n\r\n"
    );
    let (answer, _) = raw_http1(app.addr, &stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("resource_exhausted"), "{answer}");
    // A body over the limit without a declared length is cut at it.
    let big = format!(r#"{{"staleToken": "{}"}}"#, "x".repeat(70 << 10));
    let cut = curl(&[
        "-H",
        "content-type: application/json",
        "-H",
        "transfer-encoding: chunked",
        "-H",
        &format!("authorization: Bearer {KEY}"),
        "--data-binary",
        &big,
        &url(app.addr, "kongtie.v1.Auth/GetAccessToken"),
    ])
    .await;
    assert_eq!(cut.status, 429, "{}", String::from_utf8_lossy(&cut.body));
    let metrics = admin_metrics(&app.admin.to_string()).await;
    let handled = |code: &str| {
        sample(
            &metrics,
            &format!(
                "grpc_server_handled_total{{grpc_type=\"unary\",grpc_service=\"kongtie.v1.Auth\",grpc_method=\"GetAccessToken\",grpc_code=\"{code}\"}}"
            ),
        )
    };
    assert_eq!(handled("Unauthenticated"), 1.0, "{metrics}");
    assert_eq!(handled("ResourceExhausted"), 2.0, "{metrics}");
}

#[tokio::test]
async fn a_connect_call_counts_in_the_grpc_metrics_from_its_headers_and_ends_at_its_deadline() {
    let app = spawn_app_with(&["--grpc-call-timeout-ms", "1500"]).await;
    let admin = app.admin.to_string();
    let series = |kind: &str, code: Option<&str>| match code {
        None => format!(
            "grpc_server_started_total{{grpc_type=\"unary\",grpc_service=\"kongtie.v1.Auth\",grpc_method=\"GetAccessToken\"}}{kind}"
        ),
        Some(code) => format!(
            "grpc_server_handled_total{{grpc_type=\"unary\",grpc_service=\"kongtie.v1.Auth\",grpc_method=\"GetAccessToken\",grpc_code=\"{code}\"}}{kind}"
        ),
    };
    // A body announced and never sent: the call has started (the metric
    // says so while the body is awaited) and ends at the call deadline.
    let head = "POST /kongtie.v1.Auth/GetAccessToken HTTP/1.1\r\nhost: localhost\r\n\
                content-type: application/json\r\ncontent-length: 20\r\n\r\n{";
    let waiting = tokio::spawn(raw_http1(app.addr, head));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        if sample(&admin_metrics(&admin).await, &series("", None)) >= 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the Connect call did not count as started while its body was awaited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (answer, took) = waiting.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(answer.contains("KONGTIE_GRPC_CALL_TIMEOUT_MS"), "{answer}");
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // The caller's own connect-timeout-ms, when sooner, ends it instead.
    let head = "POST /kongtie.v1.Auth/GetAccessToken HTTP/1.1\r\nhost: localhost\r\n\
                content-type: application/json\r\nconnect-timeout-ms: 300\r\n\
                content-length: 20\r\n\r\n{";
    let (answer, took) = raw_http1(app.addr, head).await;
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(answer.contains("connect-timeout-ms"), "{answer}");
    assert!(took < Duration::from_millis(1200), "{took:?}");
    let metrics = admin_metrics(&admin).await;
    assert_eq!(sample(&metrics, &series("", Some("DeadlineExceeded"))), 2.0);
}

#[tokio::test]
async fn a_connect_timeout_ends_a_notification_stream_with_deadline_exceeded() {
    let app = spawn_app().await;
    let started = std::time::Instant::now();
    let response = reqwest::Client::builder()
        .http1_only()
        .build()
        .unwrap()
        .post(url(app.addr, "kongtie.v1.Payment/SubscribeNotifications"))
        .header("content-type", "application/connect+json")
        .header("connect-timeout-ms", "700")
        .body(envelope(br#"{"afterSequence": "0"}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = timeout(Duration::from_secs(5), response.bytes())
        .await
        .expect("the stream ends at its deadline")
        .unwrap()
        .to_vec();
    let took = started.elapsed();
    let (flags, payload) = take_envelope(&mut body).unwrap();
    assert_eq!(flags, 0x02, "end of stream");
    let end: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(end["error"]["code"], "deadline_exceeded", "{end}");
    assert!(
        took >= Duration::from_millis(650) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test]
async fn a_post_of_neither_grpc_nor_connect_is_http_415_naming_what_is_served() {
    let app = spawn_app().await;
    let at = url(app.addr, "kongtie.v1.Auth/GetAccessToken");
    // curl's default (a form), a browser's text/plain, none at all.
    for args in [
        vec!["-d", "a=b"],
        vec!["-H", "content-type: text/plain;charset=UTF-8", "-d", "{}"],
        vec!["-H", "content-type:", "-d", "{}"],
        vec!["-H", "content-type: application/grpc-web", "-d", "x"],
    ] {
        let mut args = args.clone();
        args.push(&at);
        let answer = curl(&args).await;
        let text = String::from_utf8_lossy(&answer.body);
        assert_eq!(answer.status, 415, "{args:?}: {text}");
        assert!(
            text.contains("application/grpc") && text.contains("application/json"),
            "{text}"
        );
        assert_eq!(answer.header("grpc-status"), None);
    }
    let metrics = admin_metrics(&app.admin.to_string()).await;
    assert_eq!(
        sample(
            &metrics,
            r#"grpc_server_handled_total{grpc_type="unary",grpc_service="kongtie.v1.Auth",grpc_method="GetAccessToken",grpc_code="Internal"}"#
        ),
        0.0,
        "not counted as our fault"
    );
}

#[tokio::test]
async fn a_flood_of_415s_and_unknown_connect_procedures_shows_in_the_refused_metric() {
    let app = spawn_app().await;
    let at = url(app.addr, "kongtie.v1.Auth/GetAccessToken");
    for _ in 0..3 {
        let answer = curl(&["-d", "a=b", &at]).await;
        assert_eq!(answer.status, 415);
    }
    let nowhere = url(app.addr, "kongtie.v1.Auth/NoSuchMethod");
    for _ in 0..2 {
        let answer = curl(&["-H", "content-type: application/json", "-d", "{}", &nowhere]).await;
        assert_eq!(answer.status, 404);
    }
    let metrics = admin_metrics(&app.admin.to_string()).await;
    assert_eq!(
        sample(
            &metrics,
            r#"kongtie_grpc_requests_refused_total{reason="unsupported_media_type"}"#
        ),
        3.0,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            r#"kongtie_grpc_requests_refused_total{reason="unknown_procedure"}"#
        ),
        2.0
    );
}

#[tokio::test]
async fn a_put_or_delete_is_http_405_and_never_reaches_a_service() {
    let app = spawn_app().await;
    let at = url(app.addr, "kongtie.v1.Auth/GetAccessToken");
    // A gRPC frame of the empty request, which tonic served whatever the method.
    let frame = std::env::temp_dir().join(format!("empty-frame-{}", std::process::id()));
    std::fs::write(&frame, [0u8; 5]).unwrap();
    let data = format!("@{}", frame.display());
    for method in ["PUT", "DELETE", "PATCH"] {
        let answer = curl(&["-X", method, "--data-binary", &data, &at]).await;
        assert_eq!(answer.status, 405, "{method}");
        assert_eq!(answer.header("allow"), Some("POST, GET"));
        assert_eq!(answer.header("grpc-status"), None, "{method}");
        let answer = curl(&[
            "-X",
            method,
            "-H",
            "content-type: application/grpc",
            "--data-binary",
            &data,
            &at,
        ])
        .await;
        assert_eq!(answer.status, 405, "{method} as gRPC");
    }
    let metrics = admin_metrics(&app.admin.to_string()).await;
    assert_eq!(
        sample(
            &metrics,
            r#"grpc_server_started_total{grpc_type="unary",grpc_service="kongtie.v1.Auth",grpc_method="GetAccessToken"}"#
        ),
        0.0,
        "no call ran"
    );
    assert_eq!(
        sample(
            &metrics,
            r#"kongtie_grpc_requests_refused_total{reason="method_not_allowed"}"#
        ),
        6.0
    );
}

#[tokio::test]
async fn a_json_key_sent_twice_is_invalid_argument_and_orders_nothing() {
    let app = spawn_app().await;
    let twice = curl(&[
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"outTradeId": "TWICE1", "amountFen": "20", "openid": "oeQDZtzvDoD-OmTmyJH6rGAX8odc", "amountFen": "2000"}"#,
        &url(app.addr, "kongtie.v1.Payment/CreateJsapiOrder"),
    ])
    .await;
    assert_eq!(
        twice.status,
        400,
        "{}",
        String::from_utf8_lossy(&twice.body)
    );
    assert_eq!(twice.json()["code"], "invalid_argument");
    let message = twice.json()["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("\"amountFen\"") && message.contains("more than once"),
        "{message}"
    );
    // In a stream's request too.
    let response = reqwest::Client::builder()
        .http1_only()
        .build()
        .unwrap()
        .post(url(app.addr, "kongtie.v1.Payment/SubscribeNotifications"))
        .header("content-type", "application/connect+json")
        .body(envelope(br#"{"afterSequence": "0", "afterSequence": "5"}"#))
        .send()
        .await
        .unwrap();
    let mut body = response.bytes().await.unwrap().to_vec();
    let (flags, payload) = take_envelope(&mut body).unwrap();
    assert_eq!(flags, 0x02);
    let end: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(end["error"]["code"], "invalid_argument", "{end}");
    let get = curl(&[
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"outTradeId": "TWICE1"}"#,
        &url(app.addr, "kongtie.v1.Payment/GetOrder"),
    ])
    .await;
    assert_eq!(
        get.json()["code"],
        "not_found",
        "{}",
        String::from_utf8_lossy(&get.body)
    );
}

/// A Connect body that is not JSON, is cut short, or holds a wrong type:
/// each message says so in plain words, with no parser position (`at line
/// 1 column 948`) and no echo of the value sent.
#[tokio::test]
async fn a_bad_json_body_is_told_in_plain_words_without_parser_positions() {
    let app = spawn_app().await;
    let create = url(app.addr, "kongtie.v1.Payment/CreateJsapiOrder");
    let padded = format!("{}{{\"outTradeId\": \"A1\", nope}}", " ".repeat(900));
    for (body, says) in [
        (padded.as_str(), "the body is not JSON"),
        (r#"{"outTradeId": "A1""#, "the body is cut short"),
        (
            r#"{"amountFen": {"secret-ish": "S3CR3T"}}"#,
            "the body is not a kongtie.v1.CreateJsapiOrderRequest in protobuf JSON",
        ),
    ] {
        let r = curl(&["-H", "content-type: application/json", "-d", body, &create]).await;
        assert_eq!(r.status, 400, "{body}");
        let message = r.json()["message"].as_str().unwrap().to_owned();
        assert!(message.starts_with(says), "{body}: {message}");
        assert!(
            !message.contains("line") && !message.contains("column"),
            "{body}: {message}"
        );
    }
}
