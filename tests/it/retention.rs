//! Retention, compaction and online backups (src/retention/, src/backup.rs),
//! on the real service: SQLite, and PostgreSQL with
//! KONGTIE_TEST_STORE=postgres. Each mechanism is shown to have run by the
//! gateway's own metrics.

use std::time::{Duration, Instant};

use kongtie_gateway::proto::{
    AckNotificationsRequest, ListNotificationsRequest, SubscribeNotificationsRequest,
};
use tonic::Code;

use crate::helpers::{
    KTAPI_TOKEN, TestApp, admin_metrics, error_info, order, payment_notification, sample,
    spawn_app_with,
};

/// Retentions of seconds are below the floor: tests say they are tests.
const SHORT_OK: &str = "--unsafe-test-only-short-retention";

const FAST: &[&str] = &[
    "--retention",
    "2s",
    "--retention-max",
    "6s",
    "--retention-sweep-every",
    "100ms",
    SHORT_OK,
];

async fn stored(app: &TestApp) -> Vec<u64> {
    let stored = app.stored_notifications().await;
    stored.iter().map(|n| n.sequence).collect()
}

async fn metric(app: &TestApp, series: &str) -> f64 {
    sample(&admin_metrics(&app.admin.to_string()).await, series)
}

/// Waits (at most 20 s) until the stored sequences are `want`.
async fn until_stored(app: &TestApp, want: &[u64]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = stored(app).await;
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "waited for {want:?} to be stored, have {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (at most 10 s) for `n` more sweeps than now.
async fn sweeps(app: &TestApp, n: f64) {
    let start = metric(app, "kongtie_retention_sweeps_total").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(app, "kongtie_retention_sweeps_total").await < start + n {
        assert!(Instant::now() < deadline, "{n} sweeps did not run");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn ack(app: &TestApp, consumer: &str, sequence: u64) {
    app.payment()
        .await
        .ack_notifications(AckNotificationsRequest {
            consumer: consumer.into(),
            sequence,
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn acknowledged_events_go_an_unacknowledged_one_stays_until_acknowledged_or_the_hard_limit() {
    let app = spawn_app_with(FAST).await;
    for id in ["RT1", "RT2", "RT3"] {
        assert_eq!(
            app.notify(payment_notification(id, KTAPI_TOKEN)).await,
            (200, "success".into())
        );
    }
    // A cursor that processed 1, not 2 or 3.
    ack(&app, "slow", 1).await;
    assert_eq!(stored(&app).await, [1, 2, 3]);

    // Past the 2 s retention, 1 goes; 2 and 3 wait for the consumer; 3,
    // the newest, would stay anyway.
    until_stored(&app, &[2, 3]).await;
    sweeps(&app, 3.0).await;
    assert_eq!(stored(&app).await, [2, 3], "unacknowledged events stay");

    ack(&app, "slow", 2).await;
    until_stored(&app, &[3]).await;

    // A newer event, so 3 is no longer the newest; unacknowledged, it
    // stays until the 6 s hard limit takes it.
    assert_eq!(
        app.notify(payment_notification("RT4", KTAPI_TOKEN)).await,
        (200, "success".into())
    );
    sweeps(&app, 3.0).await;
    assert_eq!(stored(&app).await, [3, 4]);
    until_stored(&app, &[4]).await;

    assert_eq!(
        metric(
            &app,
            r#"kongtie_retention_deleted_total{kind="notification"}"#
        )
        .await,
        3.0
    );
    assert_eq!(
        metric(
            &app,
            r#"kongtie_retention_deleted_total{kind="unacknowledged_notification"}"#
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(&app, "kongtie_store_first_retained_sequence").await,
        4.0
    );
    assert!(metric(&app, "kongtie_store_size_bytes").await > 0.0);

    // Reading from before the horizon is OUT_OF_RANGE, naming the first
    // retained sequence; "from the start" starts there; from 3 on, nothing
    // was lost.
    let mut payment = app.payment().await;
    let refused = payment
        .list_notifications(ListNotificationsRequest {
            after_sequence: 1,
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_before_retained(&refused, "after_sequence", 4);
    let refused = payment
        .subscribe_notifications(SubscribeNotificationsRequest {
            after_sequence: Some(2),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_before_retained(&refused, "after_sequence", 4);
    // The consumer acknowledged 2: its position is before the horizon.
    let refused = payment
        .subscribe_notifications(SubscribeNotificationsRequest {
            consumer: "slow".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_before_retained(&refused, "consumer", 4);
    let from_three = payment
        .list_notifications(ListNotificationsRequest {
            after_sequence: 3,
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(from_three.notifications[0].sequence, 4);
    let mut from_start = payment
        .subscribe_notifications(SubscribeNotificationsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), from_start.message())
        .await
        .expect("the first retained event")
        .unwrap()
        .unwrap();
    assert_eq!(first.sequence, 4);

    // The sequence carries on after the deletes (restart included: the
    // newest row is never deleted).
    assert_eq!(
        app.notify(payment_notification("RT5", KTAPI_TOKEN)).await,
        (200, "success".into())
    );
    assert_eq!(stored(&app).await, [4, 5]);
}

fn assert_before_retained(status: &tonic::Status, field: &str, first: u64) {
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status
            .message()
            .contains(&format!("before the first retained sequence {first}")),
        "{}",
        status.message()
    );
    let (reason, meta) = error_info(status);
    assert_eq!(reason, "SEQUENCE_BEFORE_RETAINED");
    assert_eq!(meta["first_retained_sequence"], first.to_string());
    assert_eq!(crate::helpers::violated_fields(status), [field]);
}

#[tokio::test]
async fn with_retention_0_nothing_is_deleted() {
    let app = spawn_app_with(&["--retention", "0", "--retention-sweep-every", "100ms"]).await;
    for id in ["RZ1", "RZ2"] {
        app.notify(payment_notification(id, KTAPI_TOKEN)).await;
    }
    sweeps(&app, 3.0).await;
    assert_eq!(stored(&app).await, [1, 2]);
    assert_eq!(
        metric(&app, "kongtie_store_first_retained_sequence").await,
        1.0
    );
}

/// `kongtie-gateway backup` in the middle of a notification flood: the copy
/// opens, holds every notification answered `success` before the backup
/// began, and a gateway started on it (the restore: the file put in place)
/// carries on with the next sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_during_a_flood_holds_every_acknowledged_event_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let live = crate::helpers::store_url(dir.path());
    let app = spawn_app_with(&["--store", &live]).await;
    let flooding = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let flood = {
        let (url, flooding, answered) =
            (app.notify_url.clone(), flooding.clone(), answered.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut i = 0;
            while flooding.load(std::sync::atomic::Ordering::SeqCst) {
                let id = format!("BK{i}");
                let resp = client
                    .post(&url)
                    .body(payment_notification(&id, KTAPI_TOKEN))
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.text().await.unwrap(), "success");
                answered.lock().unwrap().push(id);
                i += 1;
            }
            i
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while answered.lock().unwrap().len() < 200 {
        assert!(Instant::now() < deadline, "the flood did not get going");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before: Vec<String> = answered.lock().unwrap().clone();
    let copy = dir.path().join("backup.db");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kongtie-gateway"))
        .args(["backup", "--store", &live])
        .arg(&copy)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("the backup finished")
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The flood went on during and after it.
    let at_end = answered.lock().unwrap().len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    flooding.store(false, std::sync::atomic::Ordering::SeqCst);
    let total = tokio::time::timeout(Duration::from_secs(20), flood)
        .await
        .expect("the flood stopped")
        .unwrap();
    assert!(total > at_end, "the gateway kept taking notifications");

    let conn = rusqlite::Connection::open(&copy).unwrap();
    let (count, last): (i64, i64) = conn
        .query_row(
            "SELECT COUNT(*), MAX(sequence) FROM notifications",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(
        printed.contains(&format!(
            "backed up {count} notifications (last sequence {last})"
        )),
        "{printed}"
    );
    assert!(count as usize >= before.len(), "{count} < {}", before.len());
    let mut missing = Vec::new();
    for id in &before {
        let found: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM notifications WHERE out_trade_id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap();
        if found != 1 {
            missing.push(id.clone());
        }
    }
    assert!(missing.is_empty(), "not in the backup: {missing:?}");
    drop(conn);
    assert!(
        (total as i64) > last,
        "the copy stops where the backup began"
    );

    // Restore: a gateway on the copy carries on from its newest sequence.
    let copy_url = format!("sqlite://{}", copy.display());
    let restored = spawn_app_with(&["--store", &copy_url]).await;
    assert_eq!(
        restored
            .notify(payment_notification("AFTER-RESTORE", KTAPI_TOKEN))
            .await,
        (200, "success".into())
    );
    let newest = restored
        .payment()
        .await
        .list_notifications(ListNotificationsRequest {
            after_sequence: u64::try_from(last).unwrap(),
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .notifications;
    assert_eq!(newest.len(), 1);
    assert_eq!(newest[0].out_trade_id, "AFTER-RESTORE");
    assert_eq!(newest[0].sequence, u64::try_from(last).unwrap() + 1);
}

/// A long loop of intake and sweeps: the SQLite file stops growing (the
/// sweep deletes, incremental vacuum gives the pages back, the WAL is
/// kept small).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_file_stops_growing_under_intake_and_sweeps() {
    let dir = tempfile::tempdir().unwrap();
    let url = crate::helpers::store_url(dir.path());
    let app = spawn_app_with(&[
        "--store",
        &url,
        "--retention",
        "1s",
        "--retention-sweep-every",
        "100ms",
        SHORT_OK,
        // Each round's 300 posts at once are all taken, however slowly a
        // loaded machine commits (past 256 at once, some would be "busy").
        "--notify-max-concurrency",
        "512",
    ])
    .await;
    let file = dir.path().join("notifications.db");
    let client = reqwest::Client::new();
    let mut sizes = Vec::new();
    for round in 0..8 {
        let posts = (0..300).map(|i| {
            let body = payment_notification(&format!("GR{round}-{i}"), KTAPI_TOKEN);
            let request = client.post(&app.notify_url).body(body).send();
            async move { request.await.unwrap().text().await.unwrap() }
        });
        for answer in futures::future::join_all(posts).await {
            assert_eq!(answer, "success");
        }
        // Past the retention, everything but the newest goes.
        let deadline = Instant::now() + Duration::from_secs(20);
        while stored(&app).await.len() > 1 {
            assert!(Instant::now() < deadline, "round {round} was not swept");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sizes.push(std::fs::metadata(&file).unwrap().len());
    }
    assert!(
        metric(
            &app,
            r#"kongtie_retention_deleted_total{kind="notification"}"#
        )
        .await
            >= 2399.0
    );
    // After the first rounds, the file is as large as it gets (compaction
    // may shrink it between rounds; it never outgrows them) but for the
    // tombstones the sweeps leave, which are kept: keys only, under 100
    // bytes a swept event with its share of pages (README).
    const TOMBSTONE: u64 = 100;
    let settled = sizes[..3].iter().copied().max().unwrap();
    let grown: Vec<bool> = (3..sizes.len())
        .map(|round| sizes[round] > settled + settled / 5 + 300 * (round as u64 + 1) * TOMBSTONE)
        .collect();
    assert!(!grown.contains(&true), "the file kept growing: {sizes:?}");
    // 2,400 events of about 830 bytes went through it.
    assert!(
        *sizes.last().unwrap() < 2_400 * 830 / 4 + 2_400 * TOMBSTONE,
        "the file holds what was deleted: {sizes:?}"
    );
    let conn = rusqlite::Connection::open(&file).unwrap();
    let tombstones: i64 = conn
        .query_row("SELECT COUNT(*) FROM swept_notifications", [], |r| r.get(0))
        .unwrap();
    assert!(tombstones >= 2_399, "{tombstones} tombstones");
    drop(conn);
    // And the pages freed by the last sweep were given back, not kept on
    // the free list.
    sweeps(&app, 3.0).await;
    let conn = rusqlite::Connection::open(&file).unwrap();
    let mode: i64 = conn
        .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, 2, "auto_vacuum=INCREMENTAL");
    let free: i64 = conn
        .query_row("PRAGMA freelist_count", [], |r| r.get(0))
        .unwrap();
    assert!(free < 16, "{free} free pages kept");
}

/// A work queue that never fetched, past the hard limit: its fetch is
/// OUT_OF_RANGE naming the first retained sequence, and made again it
/// starts there.
#[tokio::test]
async fn a_work_queue_past_the_hard_limit_is_told_and_made_again_starts_at_the_horizon() {
    use kongtie_gateway::proto::{
        CreateConsumerRequest, DeleteConsumerRequest, DeliverPolicy, FetchNotificationsRequest,
    };
    let app = spawn_app_with(&[
        "--retention",
        "1s",
        "--retention-max",
        "2s",
        "--retention-sweep-every",
        "100ms",
        SHORT_OK,
    ])
    .await;
    let mut payment = app.payment().await;
    let queue = || CreateConsumerRequest {
        name: "late".into(),
        deliver_policy: DeliverPolicy::All as i32,
        ..Default::default()
    };
    payment.create_consumer(queue()).await.unwrap();
    for id in ["WQ1", "WQ2", "WQ3"] {
        app.notify(payment_notification(id, KTAPI_TOKEN)).await;
    }
    until_stored(&app, &[3]).await;
    let fetch = FetchNotificationsRequest {
        consumer: "late".into(),
        max_events: 10,
        wait: None,
    };
    let refused = payment
        .fetch_notifications(fetch.clone())
        .await
        .unwrap_err();
    assert_before_retained(&refused, "consumer", 3);
    payment
        .delete_consumer(DeleteConsumerRequest {
            name: "late".into(),
        })
        .await
        .unwrap();
    payment.create_consumer(queue()).await.unwrap();
    let fetched = payment
        .fetch_notifications(fetch)
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(fetched.len(), 1);
    assert_eq!(fetched[0].notification.as_ref().unwrap().sequence, 3);
}

/// Waits (at most 20 s) until the sweeps have deleted `n` rows of `kind`.
async fn until_deleted(app: &TestApp, kind: &str, n: f64) {
    let series = format!(r#"kongtie_retention_deleted_total{{kind="{kind}"}}"#);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let deleted = metric(app, &series).await;
        if deleted >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{n} {kind} rows were not swept ({deleted} were)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The double shipping of issue 24: a PAID order and its notification
/// swept, Kongtie's resend of the same payment is still a repeat (answered
/// `success`, no new sequence, counted), and neither the paid id nor an
/// unpaid swept one can be ordered again.
#[tokio::test]
async fn a_resend_after_its_payment_was_swept_is_a_repeat_and_the_id_cannot_be_ordered_again() {
    let app = spawn_app_with(&[
        "--retention",
        "1s",
        "--retention-max",
        "1s",
        "--retention-sweep-every",
        "100ms",
        SHORT_OK,
    ])
    .await;
    let mut payment = app.payment().await;
    // Paid: its 1.00 yuan notification matches.
    payment
        .create_jsapi_order(order("SWEPT1", 100))
        .await
        .unwrap();
    let paid = payment_notification("SWEPT1", KTAPI_TOKEN);
    assert_eq!(app.notify(paid.clone()).await, (200, "success".into()));
    // Unpaid, expiring in a moment.
    let mut unpaid = order("SWEPT2", 100);
    unpaid.expires_at = Some(prost_types::Timestamp {
        seconds: chrono::Utc::now().timestamp() + 2,
        nanos: 0,
    });
    payment.create_jsapi_order(unpaid.clone()).await.unwrap();
    // A later event, so the paid one is not the newest (never swept).
    assert_eq!(
        app.notify(payment_notification("LATER", KTAPI_TOKEN)).await,
        (200, "success".into())
    );
    until_deleted(&app, "order", 2.0).await;
    until_stored(&app, &[2]).await;

    // Kongtie sends the payment again: a repeat, stored nowhere.
    let repeats = r#"kongtie_notifications_received_total{outcome="duplicate_of_swept"}"#;
    assert_eq!(metric(&app, repeats).await, 0.0);
    assert_eq!(app.notify(paid).await, (200, "success".into()));
    assert_eq!(metric(&app, repeats).await, 1.0);
    assert_eq!(stored(&app).await, [2], "no new event");
    // No sequence was taken either: the next new event is 3 (the newest,
    // so never swept; 2 may be by now).
    assert_eq!(
        app.notify(payment_notification("NEXT", KTAPI_TOKEN)).await,
        (200, "success".into())
    );
    assert_eq!(stored(&app).await.last(), Some(&3));

    // The swept ids are not ordered again.
    let refused = payment
        .create_jsapi_order(order("SWEPT1", 100))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(error_info(&refused).0, "ORDER_ALREADY_PAID");
    unpaid.expires_at = None;
    let refused = payment.create_jsapi_order(unpaid).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(error_info(&refused).0, "ORDER_ID_RETIRED");
    assert_eq!(
        app.sandbox
            .calls(kongtie_gateway::upstream::Endpoint::ParTrade),
        2,
        "nothing more was sent to Kongtie"
    );
}

/// A second, distinct payment (another `TradeBillNo`) of a PAID order whose
/// row retention swept is a double charge like any other: stored as
/// ALREADY_PAID and counted, not UNKNOWN_ORDER (the tombstone knows the id
/// was paid). A failed-payment notification of it stays UNKNOWN_ORDER.
#[tokio::test]
async fn another_payment_of_a_swept_paid_order_is_already_paid_not_unknown() {
    use kongtie_gateway::proto::OrderCheck;
    let app = spawn_app_with(&[
        "--retention",
        "1s",
        "--retention-max",
        "1s",
        "--retention-sweep-every",
        "100ms",
        SHORT_OK,
    ])
    .await;
    let mut payment = app.payment().await;
    payment
        .create_jsapi_order(order("SWEPTPAID", 100))
        .await
        .unwrap();
    let paid = payment_notification("SWEPTPAID", KTAPI_TOKEN);
    assert_eq!(app.notify(paid).await, (200, "success".into()));
    assert_eq!(
        app.notify(payment_notification("LATER", KTAPI_TOKEN)).await,
        (200, "success".into())
    );
    until_deleted(&app, "order", 1.0).await;
    until_stored(&app, &[2]).await;

    let another = |status: &str, bill: &str| {
        let fields = [
            ("TradeStatus", status),
            ("Message", "SUCCESS"),
            ("OutTradeId", "SWEPTPAID"),
            ("TradeAmount", "1.00"),
            ("TradeOrderId", bill),
            ("TradeBillNo", bill),
            ("TradeTime", "2018/3/2 11:00:00"),
            ("TimeStamp", "1522237000"),
        ];
        kongtie_gateway::sandbox::signed_notification(
            &fields,
            &secrecy::SecretString::from(KTAPI_TOKEN),
        )
    };
    let double = r#"kongtie_notification_order_checks_total{result="already_paid"}"#;
    assert_eq!(metric(&app, double).await, 0.0);
    assert_eq!(
        app.notify(another("0000", "SECONDBILL")).await,
        (200, "success".into())
    );
    assert_eq!(
        app.notify(another("0001", "FAILEDBILL")).await,
        (200, "success".into())
    );
    let events: Vec<_> = app
        .stored_notifications()
        .await
        .into_iter()
        .filter(|n| n.out_trade_id == "SWEPTPAID")
        .map(|n| (n.trade_bill_no, OrderCheck::try_from(n.order_check)))
        .collect();
    assert_eq!(
        events,
        [
            ("SECONDBILL".to_owned(), Ok(OrderCheck::AlreadyPaid)),
            ("FAILEDBILL".to_owned(), Ok(OrderCheck::UnknownOrder)),
        ]
    );
    assert_eq!(metric(&app, double).await, 1.0);
}

/// A retention below the floor stops `serve` at start-up, naming the
/// setting and why; the test-only override is the only way past it.
#[test]
fn a_gateway_started_with_a_retention_below_the_floor_exits_non_zero_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    let serve = |extra: &[&str], env: &[(&str, &str)]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kongtie-gateway"));
        command
            .args(["serve", "--sandbox", "--sandbox-addr", "127.0.0.1:0"])
            .args(["--grpc-addr", "127.0.0.1:0", "--notify-addr", "127.0.0.1:0"])
            .args(["--admin-addr", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .args(extra)
            .env_remove("KONGTIE_UNSAFE_TEST_ONLY_SHORT_RETENTION")
            .envs(env.iter().copied());
        exited(command)
    };
    for retention in ["3s", "6d"] {
        let (status, err) = serve(&["--retention", retention], &[]);
        assert!(!status.success(), "{retention}: {status:?} {err}");
        assert!(
            err.contains(&format!("KONGTIE_RETENTION is {retention}")),
            "{err}"
        );
        assert!(err.contains("below the floor of 7days"), "{err}");
        assert!(err.contains("Kongtie resends a notification"), "{err}");
        assert!(err.contains("no refund call"), "{err}");
    }
    // Through the environment too.
    let (status, err) = serve(&[], &[("KONGTIE_RETENTION", "12h")]);
    assert!(!status.success());
    assert!(err.contains("KONGTIE_RETENTION is 12h"), "{err}");
    // At the floor, and with 0 (keep everything), the configuration holds.
    for retention in ["7d", "0"] {
        crate::helpers::serve_args(&["--retention", retention])
            .config()
            .unwrap_or_else(|e| panic!("{retention}: {e}"));
    }
}

/// Runs `command` to its exit (killed, and the test failed, if it is still
/// running after 20 s): its status and standard error.
fn exited(mut command: std::process::Command) -> (std::process::ExitStatus, String) {
    use std::io::Read;
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the gateway did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, err)
}
