//! The Connect protocol on the gRPC port against clients that do not play
//! by the rules: bodies announced at 4 MiB (over the 64 KiB message limit)
//! or sent chunk by chunk and never finished, with and without an API key,
//! over HTTP/1.1 (raw sockets) and HTTP/2 (the `h2` crate). Each siege runs
//! beside a legitimate caller held to the bounds the gRPC sieges hold
//! (`hostile_grpc::Prober`), reads the process's resident memory, and
//! reads the gateway's own metrics to show which mechanism ended each
//! call. Loopback only.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    helpers::*,
    hostile_grpc::{Prober, rss_mib, until_metric},
};

const KEY: &str = "hostile-connect-key-0123456789";
/// The server's call deadline in these tests, `--grpc-call-timeout-ms`.
const DEADLINE: Duration = Duration::from_millis(3000);

/// How an attacking request is built: with a valid key or none, and
/// with `content-length: 4194304` or a body of unknown length (chunked on
/// HTTP/1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Attack {
    keyed: bool,
    announced: bool,
}

const ATTACKS: [Attack; 4] = [
    Attack {
        keyed: false,
        announced: true,
    },
    Attack {
        keyed: true,
        announced: true,
    },
    Attack {
        keyed: false,
        announced: false,
    },
    Attack {
        keyed: true,
        announced: false,
    },
];

impl Attack {
    /// The HTTP status each is answered with, and whether it waits for
    /// the call deadline to get it: without a key, 401 at once; with one,
    /// 429 from the header, or 504 at the deadline for a trickling body.
    fn answer(self) -> (u16, bool) {
        match (self.keyed, self.announced) {
            (false, _) => (401, false),
            (true, true) => (429, false),
            (true, false) => (504, true),
        }
    }
}

fn gateway() -> Binary {
    Binary::start(&[
        "serve",
        "--sandbox",
        "--sandbox-addr",
        "127.0.0.1:0",
        "--api-keys",
        KEY,
        "--grpc-call-timeout-ms",
        &DEADLINE.as_millis().to_string(),
    ])
}

/// Resident memory once the gateway has served a call of each kind (its
/// pools and caches warm).
async fn idle_rss(bin: &Binary) -> f64 {
    let url = format!("http://{}/kongtie.v1.Auth/GetAccessToken", bin.grpc);
    for _ in 0..3 {
        let answer = reqwest::Client::new()
            .post(&url)
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {KEY}"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    rss_mib(bin.child.id())
}

/// One attacking HTTP/1.1 connection: the headers, then 1 KiB every
/// 250 ms until the server closes the connection. (The status it got,
/// how long until the server closed it.)
async fn http1_attacker(addr: String, attack: Attack) -> (u16, Duration) {
    let started = Instant::now();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (mut read, mut write) = tcp.into_split();
    let mut head = "POST /kongtie.v1.Auth/GetAccessToken HTTP/1.1\r\nhost: localhost\r\n\
                    content-type: application/json\r\n"
        .to_owned();
    if attack.keyed {
        head.push_str(&format!("authorization: Bearer {KEY}\r\n"));
    }
    head.push_str(if attack.announced {
        "content-length: 4194304\r\n\r\n"
    } else {
        "transfer-encoding: chunked\r\n\r\n"
    });
    write.write_all(head.as_bytes()).await.unwrap();
    let chunked = !attack.announced;
    let sender = tokio::spawn(async move {
        let mut piece = Vec::new();
        if chunked {
            piece.extend(b"400\r\n");
        }
        piece.extend([b' '; 1024]);
        if chunked {
            piece.extend(b"\r\n");
        }
        // Until the server stops reading and the writes fail.
        while write.write_all(&piece).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        let mut buf = [0u8; 4096];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    sender.abort();
    let text = String::from_utf8_lossy(&answer);
    assert!(
        closed.is_ok(),
        "{attack:?}: the connection still open after 15 s; answered: {text}"
    );
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{attack:?}: no HTTP answer: {text}"));
    (status, started.elapsed())
}

/// The `handled` count of GetAccessToken by code.
fn handled(metrics: &str, code: &str) -> f64 {
    sample(
        metrics,
        &format!(
            "grpc_server_handled_total{{grpc_type=\"unary\",grpc_service=\"kongtie.v1.Auth\",grpc_method=\"GetAccessToken\",grpc_code=\"{code}\"}}"
        ),
    )
}

/// 240 HTTP/1.1 connections, 60 of each attack, opened within a second: the
/// keyless ones are refused before a byte of their body is read, the ones
/// announcing 4 MiB are refused from the header, and the trickling ones
/// with a key end at the call deadline; each connection is closed by the
/// server with its answer, memory stays under +50 MB, and a legitimate
/// caller is served beside it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_connect_bodies_over_http1_cost_bounded_memory_and_close_by_the_call_deadline() {
    let bin = gateway();
    let before = idle_rss(&bin).await;
    let prober = Prober::start_with_key(&bin.grpc, Some(KEY));
    let started = Instant::now();
    // Opened over about a second: the attack is what the connections
    // hold, not a burst of accepts (which is load any client may bring).
    let mut attackers = Vec::new();
    for i in 0..240 {
        let attack = ATTACKS[i % 4];
        attackers.push((
            attack,
            tokio::spawn(http1_attacker(bin.grpc.clone(), attack)),
        ));
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
    let opened = started.elapsed();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = rss_mib(bin.child.id());
    let mut slowest = Duration::ZERO;
    for (attack, attacker) in attackers {
        let (status, took) = attacker.await.unwrap();
        let (expected, at_deadline) = attack.answer();
        assert_eq!(status, expected, "{attack:?}");
        let bound = if at_deadline {
            DEADLINE + Duration::from_secs(2)
        } else {
            Duration::from_secs(2)
        };
        assert!(took < bound, "{attack:?}: closed after {took:?}");
        if at_deadline {
            assert!(took >= DEADLINE - Duration::from_millis(200), "{took:?}");
        }
        slowest = slowest.max(took);
    }
    let after = rss_mib(bin.child.id());
    eprintln!(
        "Connect over HTTP/1.1: RSS {before:.1} MiB idle, {during:.1} MiB during 240 slow \
         bodies, {after:.1} MiB after; every connection closed within {slowest:?} \
         (all spawned within {opened:?})"
    );
    let metrics = until_metric(
        &bin.admin,
        r#"grpc_server_handled_total{grpc_type="unary",grpc_service="kongtie.v1.Auth",grpc_method="GetAccessToken",grpc_code="DeadlineExceeded"}"#,
        60.0,
    )
    .await;
    assert_eq!(handled(&metrics, "Unauthenticated"), 120.0);
    assert_eq!(handled(&metrics, "ResourceExhausted"), 60.0);
    assert_eq!(handled(&metrics, "DeadlineExceeded"), 60.0);
    prober
        .assert_answered_within_50ms("slow Connect bodies over HTTP/1.1")
        .await;
    assert!(during - before < 50.0, "+{:.1} MiB", during - before);
    assert!(after - before < 50.0, "+{:.1} MiB after", after - before);
}

/// One HTTP/2 connection, 200 streams, 50 of each attack, each sending
/// 1 KiB every 250 ms: every stream is answered as on HTTP/1.1, memory
/// stays under +50 MB, and a legitimate caller is served beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_connect_bodies_over_http2_cost_bounded_memory_and_end_by_the_call_deadline() {
    let bin = gateway();
    let before = idle_rss(&bin).await;
    let prober = Prober::start_with_key(&bin.grpc, Some(KEY));
    let tcp = tokio::net::TcpStream::connect(&bin.grpc).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let started = Instant::now();
    let mut streams = Vec::new();
    for i in 0..200 {
        let attack = ATTACKS[i % 4];
        let mut send = tokio::time::timeout(Duration::from_secs(5), send.clone().ready())
            .await
            .expect("a place under the stream limit")
            .unwrap();
        let mut request = tonic::codegen::http::Request::post(format!(
            "http://{}/kongtie.v1.Auth/GetAccessToken",
            bin.grpc
        ))
        .header("content-type", "application/json");
        if attack.keyed {
            request = request.header("authorization", format!("Bearer {KEY}"));
        }
        if attack.announced {
            request = request.header("content-length", "4194304");
        }
        let (answer, body) = send.send_request(request.body(()).unwrap(), false).unwrap();
        streams.push((attack, answer, body));
    }
    let mut bodies = Vec::new();
    let mut answers = Vec::new();
    for (attack, answer, body) in streams {
        bodies.push(body);
        answers.push((
            attack,
            tokio::spawn(async move {
                let response = tokio::time::timeout(Duration::from_secs(15), answer)
                    .await
                    .expect("answered within 15 s")
                    .expect("answered");
                (response.status().as_u16(), started.elapsed())
            }),
        ));
    }
    // Every stream trickles 1 KiB every 250 ms until it is answered.
    let trickle = tokio::spawn(async move {
        loop {
            for body in bodies.iter_mut() {
                let _ = body.send_data(bytes::Bytes::from_static(&[b' '; 1024]), false);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = rss_mib(bin.child.id());
    let mut slowest = Duration::ZERO;
    for (attack, answer) in answers {
        let (status, took) = answer.await.unwrap();
        let (expected, at_deadline) = attack.answer();
        assert_eq!(status, expected, "{attack:?}");
        let bound = if at_deadline {
            DEADLINE + Duration::from_secs(2)
        } else {
            Duration::from_secs(2)
        };
        assert!(took < bound, "{attack:?}: answered after {took:?}");
        slowest = slowest.max(took);
    }
    trickle.abort();
    let after = rss_mib(bin.child.id());
    eprintln!(
        "Connect over HTTP/2: RSS {before:.1} MiB idle, {during:.1} MiB during 200 slow \
         streams, {after:.1} MiB after; every stream answered within {slowest:?}"
    );
    let metrics = until_metric(
        &bin.admin,
        r#"grpc_server_handled_total{grpc_type="unary",grpc_service="kongtie.v1.Auth",grpc_method="GetAccessToken",grpc_code="DeadlineExceeded"}"#,
        50.0,
    )
    .await;
    assert_eq!(handled(&metrics, "Unauthenticated"), 100.0);
    assert_eq!(handled(&metrics, "ResourceExhausted"), 50.0);
    prober
        .assert_answered_within_50ms("slow Connect bodies over HTTP/2")
        .await;
    assert!(during - before < 50.0, "+{:.1} MiB", during - before);
}

/// gRPC itself: a frame header announcing 100 bytes, then the end of the
/// stream. The caller's bytes are at fault: INVALID_ARGUMENT, on our
/// services and on health (whose codec is its crate's) alike.
#[tokio::test]
async fn a_truncated_grpc_frame_is_invalid_argument_not_internal() {
    let app = spawn_app().await;
    let tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    for path in [
        "/kongtie.v1.Auth/GetAccessToken",
        "/grpc.health.v1.Health/Check",
    ] {
        let mut send = send.clone().ready().await.unwrap();
        let request = tonic::codegen::http::Request::post(format!("http://{}{path}", app.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (answer, mut body) = send.send_request(request, false).unwrap();
        body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 100, 1, 2]), true)
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(5), answer)
            .await
            .expect("answered within 5 s")
            .unwrap();
        let status = response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(status.as_deref(), Some("3"), "{path}: {response:?}");
    }
    let metrics = admin_metrics(&app.admin.to_string()).await;
    assert_eq!(handled(&metrics, "InvalidArgument"), 1.0);
    assert_eq!(handled(&metrics, "Internal"), 0.0);
}
