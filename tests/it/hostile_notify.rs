//! The notify listener faces the internet: clients that connect and stall,
//! send slowly, or send what they should not, cannot hold it shut, forge a
//! log line, or make the signed value differ from the stored one.

use std::time::{Duration, Instant};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::helpers::*;

/// A connection the test holds open, and what it has sent.
struct Stalled {
    stream: TcpStream,
    opened: Instant,
}

async fn open(addr: &str, send: &[u8]) -> Stalled {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    if !send.is_empty() {
        stream.write_all(send).await.unwrap();
    }
    Stalled {
        stream,
        opened: Instant::now(),
    }
}

/// Waits (up to `deadline` after the connection opened) for the server to
/// close it; returns what it sent first and how long after opening it
/// closed.
async fn closed_by_server(mut c: Stalled, deadline: Duration) -> (String, Duration) {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_sub(c.opened.elapsed());
        match tokio::time::timeout(left, c.stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (
                    String::from_utf8_lossy(&got).into_owned(),
                    c.opened.elapsed(),
                );
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "a stalled connection was still open {:?} after it opened",
                c.opened.elapsed()
            ),
        }
    }
}

const HEAD: &str = "POST /kongtie/payment-notify HTTP/1.1\r\nHost: gateway\r\n";

fn slow_body_start() -> Vec<u8> {
    format!("{HEAD}Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{").into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connections_cannot_hold_the_listener_shut_nor_delay_shutdown() {
    const READ_TIMEOUT: Duration = Duration::from_secs(4);
    let dir = tempfile::tempdir().unwrap();
    let bin = Binary::start_in(
        &["serve", "--notify-read-timeout-ms", "4000"],
        dir.path(),
        None,
    );
    let addr = bin.notify.clone();

    // 260 slow bodies (more than the 256 notification slots), 200 slow
    // headers, 200 idle connections.
    let mut stalled = Vec::new();
    for _ in 0..260 {
        stalled.push(("slow body", open(&addr, &slow_body_start()).await));
    }
    for _ in 0..200 {
        stalled.push(("slow header", open(&addr, HEAD.as_bytes()).await));
    }
    for _ in 0..200 {
        stalled.push(("idle", open(&addr, b"").await));
    }
    // The gateway has accepted them all (on a loaded machine, a moment
    // after the test's connects returned).
    let deadline = Instant::now() + Duration::from_secs(10);
    while sample(
        &admin_metrics(&bin.admin).await,
        "kongtie_notify_connections",
    ) < 660.0
    {
        assert!(
            Instant::now() < deadline,
            "660 connections not open within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A genuine notification is answered at once all the same.
    let started = Instant::now();
    let resp = reqwest::Client::new()
        .post(bin.notify_url())
        .body(payment_notification("GENUINE1", KTAPI_TOKEN))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(resp.text().await.unwrap(), "success");
    assert!(took < Duration::from_secs(1), "answered after {took:?}");
    assert!(
        sample(
            &admin_metrics(&bin.admin).await,
            "kongtie_notify_connections"
        ) >= 660.0,
        "the stalled connections were all still open"
    );

    // Each stalled connection is closed by the server after its read
    // timeout (not before), within generous slack for a loaded machine.
    let closes: Vec<_> = stalled
        .into_iter()
        .map(|(kind, c)| {
            tokio::spawn(async move { (kind, closed_by_server(c, READ_TIMEOUT * 5).await) })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for close in closes {
        let (kind, (answer, after)) = close.await.unwrap();
        assert!(
            after >= READ_TIMEOUT - Duration::from_millis(100),
            "{kind} closed after {after:?}"
        );
        slowest = slowest.max(after);
        if kind == "slow body" {
            assert!(answer.starts_with("HTTP/1.1 408"), "{kind}: {answer:?}");
        } else {
            assert_eq!(answer, "", "{kind} gets no answer");
        }
    }
    println!("every stalled connection closed, the last {slowest:?} after opening");

    // The server counts a connection just after closing it: wait for the
    // counts to settle.
    let metrics = until_metrics(&bin.admin, |m| {
        sample(m, "kongtie_notify_connections") == 0.0
            && sample(
                m,
                r#"kongtie_notify_connections_closed_total{reason="read_timeout"}"#,
            ) == 400.0
    })
    .await;
    assert_eq!(
        sample(
            &metrics,
            r#"kongtie_notifications_rejected_total{reason="body_timeout"}"#
        ),
        260.0
    );
    assert_eq!(
        sample(
            &metrics,
            r#"kongtie_notifications_rejected_total{reason="busy"}"#
        ),
        0.0
    );

    // Three half-sent requests do not make SIGTERM wait out the grace
    // period (10 s by default).
    let mut half_sent = Vec::new();
    for _ in 0..3 {
        half_sent.push(open(&addr, &slow_body_start()).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let signalled = Instant::now();
    crate::helpers::sigterm(&bin);
    let status = crate::helpers::exit_within(bin, Duration::from_secs(10)).await;
    let exit = signalled.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        exit < Duration::from_secs(2),
        "exited {exit:?} after SIGTERM"
    );
    drop(half_sent);
}

#[tokio::test]
async fn a_body_that_declares_too_much_is_refused_before_it_is_read() {
    let app = spawn_app().await;
    let addr = app
        .notify_url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let c = open(
        &addr,
        format!("{HEAD}Content-Length: 100000000\r\n\r\n").as_bytes(),
    )
    .await;
    let (answer, _) = closed_by_server(c, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
}

#[tokio::test]
async fn a_key_sent_twice_or_a_null_field_is_refused_and_nothing_is_stored() {
    let app = spawn_app().await;
    let body = payment_notification("DUP1", KTAPI_TOKEN);
    let twice = body.replacen('{', r#"{"TradeAmount":"999.00","#, 1);
    assert_eq!(
        app.notify(twice).await,
        (400, "a key appears more than once in the body".into())
    );
    let null = body.replace(r#""SUCCESS""#, "null");
    assert_eq!(
        app.notify(null).await,
        (400, "field Message must be a string or a number".into())
    );
    assert!(list_all(&app.addr.to_string()).await.is_empty());
    let metrics = admin_metrics(&app.admin.to_string()).await;
    assert_eq!(
        sample(
            &metrics,
            r#"kongtie_notifications_rejected_total{reason="malformed"}"#
        ),
        2.0
    );
}

#[tokio::test]
async fn an_order_id_with_a_newline_or_an_escape_cannot_forge_a_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let bin = Binary::start_in(&["serve"], dir.path(), None);
    let forged = "X1\n2026-11-26T00:00:00Z  INFO FORGED line\u{1b}[31m";
    let fields = [
        ("TradeStatus", "0000"),
        ("Message", "SUCCESS"),
        ("OutTradeId", forged),
        ("TradeAmount", "0.20"),
        ("TradeOrderId", "984_1"),
        ("TradeBillNo", "1"),
        ("TradeTime", "2018/3/2 10:00:39"),
        ("TimeStamp", "1522233465"),
    ];
    let body = kongtie_gateway::sandbox::signed_notification(
        &fields,
        &secrecy::SecretString::from(KTAPI_TOKEN),
    );
    let resp = reqwest::Client::new()
        .post(bin.notify_url())
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), "success");
    let log = wait_for_line(&bin, "notification stored").await;
    assert!(
        log.iter().all(|l| !l.starts_with("2026-11-26T00:00:00Z")),
        "a forged line: {log:#?}"
    );
    assert!(log.iter().all(|l| !l.contains('\u{1b}')), "{log:#?}");
    let stored = log
        .iter()
        .find(|l| l.contains("notification stored"))
        .unwrap();
    assert!(
        stored.contains(r#"out_trade_id="X1\n2026-11-26T00:00:00Z  INFO FORGED line\u{1b}[31m""#),
        "{stored}"
    );
}

/// The binary's log, once a line holds `what` (within 10 s).
async fn wait_for_line(bin: &Binary, what: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = bin.log.lock().unwrap().clone();
        if log.iter().any(|l| l.contains(what)) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "no {what:?} within 10 s: {log:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_after_its_request_timed_out_is_logged_and_counted_like_any_other() {
    let dir = tempfile::tempdir().unwrap();
    let bin = Binary::start_in(&["serve", "--notify-timeout-ms", "300"], dir.path(), None);
    // Another connection holds SQLite's write lock: the gateway's commit
    // waits for it (its busy timeout is 5 s).
    let db = dir.path().join("notifications.db");
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(db).unwrap();
        conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
        locked_tx.send(()).unwrap();
        let _ = release_rx.recv_timeout(Duration::from_secs(30));
        conn.execute_batch("ROLLBACK").unwrap();
    });
    locked_rx.recv_timeout(Duration::from_secs(10)).unwrap();

    let http = reqwest::Client::new();
    let body = payment_notification("SLOW1", KTAPI_TOKEN);
    let resp = http
        .post(bin.notify_url())
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(resp.text().await.unwrap(), "timed out, send again");
    let log = wait_for_line(&bin, "not stored in time").await;
    let warning = log
        .iter()
        .find(|l| l.contains("not stored in time"))
        .unwrap();
    assert!(
        warning.contains("WARN") && warning.contains(r#"out_trade_id="SLOW1""#),
        "{warning}"
    );

    release_tx.send(()).unwrap();
    holder.join().unwrap();
    let log = wait_for_line(&bin, "notification stored").await;
    let stored = log
        .iter()
        .find(|l| l.contains("notification stored"))
        .unwrap();
    assert!(
        stored.contains(r#"out_trade_id="SLOW1""#) && stored.contains("sequence=1"),
        "{stored}"
    );
    let metrics = admin_metrics(&bin.admin).await;
    assert_eq!(
        sample(
            &metrics,
            r#"kongtie_notifications_received_total{outcome="stored"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &metrics,
            r#"kongtie_notifications_rejected_total{reason="timeout"}"#
        ),
        1.0
    );
    // Kongtie's resend is the same event.
    let resp = http.post(bin.notify_url()).body(body).send().await.unwrap();
    assert_eq!(resp.text().await.unwrap(), "success");
    let stored = list_all(&bin.grpc).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].receive_count, 2);
}

/// The admin metrics once `settled` holds of them (within 10 s).
async fn until_metrics(admin: &str, settled: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = admin_metrics(admin).await;
        if settled(&metrics) {
            return metrics;
        }
        assert!(
            Instant::now() < deadline,
            "not settled within 10 s: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_are_capped_and_the_next_one_waits_its_turn() {
    let dir = tempfile::tempdir().unwrap();
    let bin = Binary::start_in(
        &[
            "serve",
            "--notify-max-connections",
            "5",
            "--notify-read-timeout-ms",
            "1500",
        ],
        dir.path(),
        None,
    );
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(open(&bin.notify, b"").await);
    }
    until_metrics(&bin.admin, |m| {
        sample(m, "kongtie_notify_connections") == 5.0
    })
    .await;
    // The sixth is not accepted until one of the five is closed (by its
    // read timeout): then it is served.
    let started = Instant::now();
    let resp = reqwest::Client::new()
        .post(bin.notify_url())
        .body(payment_notification("CAP1", KTAPI_TOKEN))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), "success");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1000),
        "served after {waited:?}, before any of the five closed"
    );
    let metrics = admin_metrics(&bin.admin).await;
    assert!(
        sample(&metrics, "kongtie_notify_connection_waits_total") >= 1.0,
        "{metrics}"
    );
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_listener_backs_off_and_says_so_once() {
    let dir = tempfile::tempdir().unwrap();
    let bin = Binary::start_in(
        &["serve", "--notify-read-timeout-ms", "3000"],
        dir.path(),
        None,
    );
    let pid = bin.child.id();
    leave_few_file_descriptors(pid);

    // More connections than it can take: the kernel completes them, the
    // gateway cannot accept them all.
    let mut held = Vec::new();
    for _ in 0..30 {
        held.push(open(&bin.notify, b"").await);
    }
    until_metrics(&bin.admin, |m| {
        sample(m, "kongtie_notify_accept_errors_total") >= 1.0
    })
    .await;
    let errors_before = sample(
        &admin_metrics(&bin.admin).await,
        "kongtie_notify_accept_errors_total",
    );
    let cpu_before = cpu_secs(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu = cpu_secs(pid) - cpu_before;
    let metrics = admin_metrics(&bin.admin).await;
    let errors = sample(&metrics, "kongtie_notify_accept_errors_total") - errors_before;
    // Backing off (10 ms doubling to 1 s, from scratch after each accept
    // that succeeds), not spinning, which would fail thousands of times a
    // second: a few dozen failed accepts at most, and little CPU.
    assert!(errors <= 60.0, "{errors} failed accepts in 2 s: a spin");
    assert!(cpu < 0.5, "{cpu} CPU seconds in 2 s");
    // Rate-limited: at least 10 s between two warnings. (Every listener
    // shares the descriptor limit, the admin one too, so this test's own
    // scrapes wait for descriptors and it can run past 10 s.)
    let log = bin.log.lock().unwrap().clone();
    let warned: Vec<chrono::DateTime<chrono::Utc>> = log
        .iter()
        .filter(|l| l.contains("WARN") && l.contains("cannot accept"))
        .map(|l| l[..27].parse().expect("a timestamp first"))
        .collect();
    assert!(!warned.is_empty(), "{log:#?}");
    for pair in warned.windows(2) {
        assert!(
            pair[1] - pair[0] >= chrono::Duration::milliseconds(9_900),
            "two warnings within 10 s: {log:#?}"
        );
    }

    // Once the stalled connections time out, descriptors free up and the
    // listener serves again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let sent = reqwest::Client::new()
            .post(bin.notify_url())
            .body(payment_notification("FD1", KTAPI_TOKEN))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        if let Ok(resp) = sent
            && resp.text().await.unwrap_or_default() == "success"
        {
            break;
        }
        assert!(Instant::now() < deadline, "not serving again within 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every refusal the README's metric table names is answered with its
/// status and counted under its reason, once.
#[tokio::test]
async fn each_refusal_is_answered_with_its_status_and_counted_by_its_reason() {
    let reason = |r: &str| format!("kongtie_notifications_rejected_total{{reason=\"{r}\"}}");
    let client = reqwest::Client::new();
    let status = |url: String, body: String| async move { post(&url, body).await.0 };

    let app = spawn_app().await;
    let addr = app
        .notify_url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let before = admin_metrics(&app.admin.to_string()).await;
    assert_eq!(
        status(
            app.notify_url.clone(),
            payment_notification("R1", "not-the-token")
        )
        .await,
        401
    );
    assert_eq!(
        status(app.notify_url.clone(), "x".repeat(70_000)).await,
        413
    );
    assert_eq!(
        client
            .get(&app.notify_url)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        405
    );
    assert_eq!(
        status(
            app.notify_url
                .replace("/kongtie/payment-notify", "/elsewhere"),
            "{}".into()
        )
        .await,
        404
    );
    // A body shorter than its Content-Length, then the end of the
    // connection: cut off.
    let mut cut = TcpStream::connect(&addr).await.unwrap();
    cut.write_all(
        b"POST /kongtie/payment-notify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"TradeStatus\":",
    )
    .await
    .unwrap();
    cut.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), cut.read_to_string(&mut answer))
        .await
        .expect("an answer to a cut-off body")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let after = admin_metrics(&app.admin.to_string()).await;
    for r in [
        "bad_signature",
        "too_large",
        "method_not_allowed",
        "not_found",
        "body_incomplete",
    ] {
        assert_eq!(
            sample(&after, &reason(r)) - sample(&before, &reason(r)),
            1.0,
            "{r}\n{after}"
        );
    }

    // Too old, with a maximum age (the helper's TimeStamp is from 2018);
    // from outside the allowlist. Each on a gateway of its own.
    let mut others = Vec::new();
    for (flags, code, r) in [
        (["--notify-max-age-secs", "300"], 400, "stale"),
        (["--notify-allow", "10.0.0.0/8"], 403, "source_not_allowed"),
    ] {
        let other = spawn_app_with(&flags).await;
        let body = payment_notification(&format!("R-{r}"), KTAPI_TOKEN);
        assert_eq!(status(other.notify_url.clone(), body).await, code, "{r}");
        let m = admin_metrics(&other.admin.to_string()).await;
        assert_eq!(sample(&m, &reason(r)), 1.0, "{m}");
        others.push(other);
    }
    for app in std::iter::once(&app).chain(&others) {
        assert!(app.stored_notifications().await.is_empty());
    }
}

/// A client that writes its whole oversize body (8 MiB, 128 times the
/// limit, more than loopback's socket buffers hold) before reading hears
/// the 413, rather than a reset while it writes.
#[tokio::test]
async fn an_oversize_body_written_whole_before_reading_still_gets_its_413() {
    let app = spawn_app().await;
    let addr = app
        .notify_url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let body = vec![b'x'; 8 << 20];
    let mut c = open(
        &addr,
        format!("{HEAD}Content-Length: {}\r\n\r\n", body.len()).as_bytes(),
    )
    .await;
    tokio::time::timeout(Duration::from_secs(10), c.stream.write_all(&body))
        .await
        .expect("the body was taken within 10 s")
        .expect("the whole body written, without a reset");
    let (answer, _) = closed_by_server(c, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer:?}");
    assert!(answer.ends_with("body over 65536 bytes"), "{answer:?}");
    let metrics = admin_metrics(&app.admin.to_string()).await;
    assert_eq!(
        sample(
            &metrics,
            r#"kongtie_notifications_rejected_total{reason="too_large"}"#
        ),
        1.0
    );
}
