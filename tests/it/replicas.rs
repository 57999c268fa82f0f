//! Two gateway processes on one PostgreSQL database, as a fleet behind a
//! load balancer runs: a notification POSTed to one reaches subscribers of
//! the other, and killing one loses nothing it acknowledged.

use std::time::Duration;

use kongtie_gateway::proto::{
    AckNotificationsRequest, PaymentNotification, SubscribeNotificationsRequest,
    payment_client::PaymentClient,
};
use tonic::{Streaming, transport::Channel};

use crate::{
    helpers::{
        Binary, KTAPI_TOKEN, admin_metrics, assert_each_acknowledged_stored_once, kill_mid_flood,
        list_all, next_notification, payment_notification, post, sample, spawn_app_with,
    },
    pg::PgDatabase,
};

fn replica(db: &PgDatabase) -> Binary {
    Binary::start(&["serve", "--store", &db.url])
}

async fn payment(bin: &Binary) -> PaymentClient<Channel> {
    PaymentClient::connect(format!("http://{}", bin.grpc))
        .await
        .unwrap()
}

async fn subscribe(bin: &Binary, after: u64) -> Streaming<PaymentNotification> {
    payment(bin)
        .await
        .subscribe_notifications(SubscribeNotificationsRequest {
            after_sequence: Some(after),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_posted_to_one_replica_reaches_a_subscriber_of_the_other() {
    let db = PgDatabase::create().await;
    let (a, b) = (replica(&db), replica(&db));
    let mut on_b = subscribe(&b, 0).await;
    // B listens before anything is posted (its first read follows LISTEN).
    let reads = |trigger: &str| format!("kongtie_store_feed_reads_total{{trigger=\"{trigger}\"}}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sample(&admin_metrics(&b.admin).await, &reads("listen")) < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "B did not LISTEN within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let body = payment_notification("4333451", KTAPI_TOKEN);
    assert_eq!(
        post(&a.notify_url(), body.clone()).await,
        (200, "success".into())
    );
    let n = next_notification(&mut on_b).await;
    assert_eq!((n.sequence, n.out_trade_id.as_str()), (1, "4333451"));
    assert_eq!(n.amount_fen, Some(100));
    // A published its own commit; B read it from the database on A's NOTIFY.
    let events = |source: &str| format!("kongtie_store_feed_events_total{{source=\"{source}\"}}");
    // (A's poll may, rarely, read it before the handover arrives.)
    let on_a = admin_metrics(&a.admin).await;
    assert_eq!(
        sample(&on_a, &events("commit")) + sample(&on_a, &events("read")),
        1.0
    );
    // B's subscriber may have had it from its own catch-up read (a loaded
    // machine runs that after A's commit); B's feed reads it all the same.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sample(&admin_metrics(&b.admin).await, &events("read")) < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "B's feed did not read the event from the database within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sample(&admin_metrics(&b.admin).await, &events("read")), 1.0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sample(&admin_metrics(&b.admin).await, &reads("notify")) < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "B did not read on a NOTIFY within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Kongtie resends to the other replica: the same event, counted twice,
    // and not delivered again.
    assert_eq!(post(&b.notify_url(), body).await, (200, "success".into()));
    let stored = list_all(&a.grpc).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].receive_count, 2);

    // A consumer's position acknowledged on one replica is where it
    // resumes on the other.
    let acked = payment(&a)
        .await
        .ack_notifications(AckNotificationsRequest {
            consumer: "orders".into(),
            sequence: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acked.acked_sequence, 1);
    let mut resumed = payment(&b)
        .await
        .subscribe_notifications(SubscribeNotificationsRequest {
            consumer: "orders".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let body = payment_notification("4333452", KTAPI_TOKEN);
    assert_eq!(post(&a.notify_url(), body).await.0, 200);
    assert_eq!(
        next_notification(&mut resumed).await.sequence,
        2,
        "resumes after 1"
    );
    assert_eq!(
        next_notification(&mut on_b).await.sequence,
        2,
        "no duplicate of 1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_replica_mid_flood_loses_no_acknowledged_notification() {
    let db = PgDatabase::create().await;
    let (mut a, b) = (replica(&db), replica(&db));
    let mut on_b = subscribe(&b, 0).await;
    let acknowledged = kill_mid_flood(&mut a, "K", 300).await;

    let stored = list_all(&b.grpc).await;
    assert_each_acknowledged_stored_once(&stored, &acknowledged);
    // B's subscriber got every stored one, in order, once.
    for expected in &stored {
        let n = next_notification(&mut on_b).await;
        assert_eq!(n.sequence, expected.sequence);
        assert_eq!(n.out_trade_id, expected.out_trade_id);
    }
    println!(
        "acknowledged by A before SIGKILL: {}, stored: {}, all delivered by B",
        acknowledged.len(),
        stored.len()
    );
}

/// A subscriber of B that reads nothing while more events than the live
/// feed holds are posted to A lags, then reads the gap from PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_of_another_replica_that_falls_far_behind_catches_up_in_order() {
    let db = PgDatabase::create().await;
    let a = std::sync::Arc::new(spawn_app_with(&["--store", &db.url]).await);
    let b = spawn_app_with(&["--store", &db.url]).await;
    crate::notifications::a_stalled_subscriber_catches_up_in_order(a, &b).await;
}

/// The store URL holds the database password: a replica that cannot reach
/// PostgreSQL stops at start-up saying where it tried, never with what.
#[test]
fn an_unreachable_database_stops_start_up_without_showing_the_password() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kongtie-gateway"))
        .args(["serve", "--grpc-addr", "127.0.0.1:0", "--notify-addr"])
        .args(["127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--store"])
        .arg("postgres://kongtie:S3cretPassw0rd@127.0.0.1:1/payments")
        .env("RUST_LOG", "debug")
        .env("KONGTIE_TOKEN", KTAPI_TOKEN)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("PostgreSQL at 127.0.0.1:1/payments"),
        "{stderr}"
    );
    assert!(!stderr.contains("S3cretPassw0rd"), "{stderr}");

    // Nor does `--help` show it from the environment.
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_kongtie-gateway"))
        .args(["serve", "--help"])
        .env(
            "KONGTIE_STORE",
            "postgres://kongtie:S3cretPassw0rd@db/payments",
        )
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("[env: KONGTIE_STORE]"), "{help}");
    assert!(!help.contains("S3cretPassw0rd"), "{help}");
}

/// Every session of both replicas is cut off (as a database restart or a
/// failover does): a notification may be refused once (Kongtie resends),
/// is never lost, and still reaches a subscriber of the other replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_recover_when_the_database_cuts_every_session() {
    let db = PgDatabase::create().await;
    let a = spawn_app_with(&["--store", &db.url]).await;
    let b = spawn_app_with(&["--store", &db.url]).await;
    let mut on_b = b
        .payment()
        .await
        .subscribe_notifications(SubscribeNotificationsRequest {
            after_sequence: Some(0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let body = |id: &str| payment_notification(id, crate::helpers::KTAPI_TOKEN);
    assert_eq!(a.notify(body("BEFORE")).await.1, "success");
    assert_eq!(next_notification(&mut on_b).await.out_trade_id, "BEFORE");

    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    let cut: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'kongtie-gateway'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert!(cut >= 2, "sessions were cut ({cut})");

    // Kongtie resends until `success`; count what it takes.
    let mut sends = 0;
    loop {
        sends += 1;
        let (status, text) = a.notify(body("AFTER")).await;
        if text == "success" {
            break;
        }
        assert_eq!(status, 503, "a store failure asks for a resend");
        assert!(sends < 10, "still refused after {sends} sends");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // As the README says: one 503 (the write that met the dead session),
    // then `success` on the resend.
    assert_eq!(sends, 2, "sends until success after the cut");
    let n = next_notification(&mut on_b).await;
    assert_eq!((n.sequence, n.out_trade_id.as_str()), (2, "AFTER"));
}

/// PostgreSQL turned read-only (as a failover to a standby, or an operator,
/// can do): `/readyz` turns 503 at the first failed write and stays so
/// while the database refuses writes, then ready again by the gateway's own
/// probe, with no traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_whether_postgresql_takes_writes() {
    let db = PgDatabase::create().await;
    let app = spawn_app_with(&["--store", &db.url]).await;
    let ready = || async {
        reqwest::get(format!("http://{}/readyz", app.admin))
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    // Sessions take the database's settings when they start: cut them all.
    let take_writes = async |conn: &mut sqlx::PgConnection, on: bool| {
        let setting = if on {
            format!("ALTER DATABASE {name} RESET default_transaction_read_only")
        } else {
            format!("ALTER DATABASE {name} SET default_transaction_read_only = on")
        };
        sqlx::query(sqlx::AssertSqlSafe(setting))
            .execute(&mut *conn)
            .await
            .unwrap();
        let _: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'kongtie-gateway'",
        )
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    };

    assert_eq!(
        app.notify(payment_notification("RO1", KTAPI_TOKEN)).await.1,
        "success"
    );
    assert_eq!(ready().await, 200);
    take_writes(&mut conn, false).await;
    // The first write after the cut may meet a dead connection; the ones
    // after meet a read-only database.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = app.notify(payment_notification("RO2", KTAPI_TOKEN)).await;
        if status == 503 && ready().await == 503 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still taking writes: {status}, ready {}",
            ready().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        ready().await,
        503,
        "not ready while the database refuses writes"
    );

    take_writes(&mut conn, true).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while ready().await != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not ready 10 s after the database took writes again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        app.notify(payment_notification("RO2", KTAPI_TOKEN)).await.1,
        "success"
    );
    assert_eq!(list_all(&app.addr.to_string()).await.len(), 2);
}

/// The store is required at start-up: with PostgreSQL down, `serve` exits
/// at once, status 1, saying why (and not the URL's password), for a
/// supervisor to restart it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_postgresql_is_down_at_start_exits_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    let down = crate::helpers::closed_port().await;
    let url = format!("postgres://postgres:s3cret-pw@{down}/kongtie");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_kongtie-gateway"))
            .args(["serve", "--store", &url, "--grpc-addr", "127.0.0.1:0"])
            .args([
                "--notify-addr",
                "127.0.0.1:0",
                "--admin-addr",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .env("KONGTIE_TOKEN", KTAPI_TOKEN)
            .output()
            .unwrap()
    });
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("exited within 30 s")
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("connecting to PostgreSQL") && stderr.contains("Connection refused"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("s3cret-pw"),
        "the password was printed: {stderr}"
    );
}
