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
    KTAPI_TOKEN, TestApp, admin_metrics, error_info, payment_notification, sample, spawn_app_with,
};

const FAST: &[&str] = &[
    "--retention",
    "2s",
    "--retention-max",
    "6s",
    "--retention-sweep-every",
    "100ms",
];

async fn stored(app: &TestApp) -> Vec<u64> {
    app.payment()
        .await
        .list_notifications(ListNotificationsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .notifications
        .iter()
        .map(|n| n.sequence)
        .collect()
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
    let app = spawn_app_with(FAST, |_| {}).await;
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
        metric(&app, r#"kongtie_retention_deleted_total{kind="notification"}"#).await,
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
    let app = spawn_app_with(
        &["--retention", "0", "--retention-sweep-every", "100ms"],
        |_| {},
    )
    .await;
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
