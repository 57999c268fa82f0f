//! Work-queue consumers end to end, over gRPC: the worker loop (create
//! once, fetch, process, ack), long-polls woken by a commit, a worker
//! killed while it holds leases, parking and re-driving, every field
//! validated, and the footguns of cursor consumers refused.

use std::{process::Stdio, time::Duration};

use kongtie_gateway::proto::{
    AckNotificationsRequest, ConsumerKind, CreateConsumerRequest, DeliverPolicy,
    FetchNotificationsRequest, GetConsumerRequest, LeasedNotification, NakNotificationsRequest,
    RedriveNotificationsRequest, SubscribeNotificationsRequest, payment_client::PaymentClient,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::{Code, transport::Channel};

use crate::helpers::{
    KTAPI_TOKEN, TestApp, admin_metrics, error_info, payment_notification, sample, spawn_app,
    subscribe_when_free, violated_fields,
};

fn seconds(s: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s,
        nanos: 0,
    })
}

fn queue(name: &str, ack_wait_s: i64, max_deliver: u32) -> CreateConsumerRequest {
    CreateConsumerRequest {
        name: name.into(),
        deliver_policy: DeliverPolicy::All as i32,
        ack_wait: seconds(ack_wait_s),
        max_deliver,
        ..Default::default()
    }
}

async fn fetch(
    payment: &mut PaymentClient<Channel>,
    consumer: &str,
    max_events: u32,
    wait_s: i64,
) -> Vec<LeasedNotification> {
    payment
        .fetch_notifications(FetchNotificationsRequest {
            consumer: consumer.into(),
            max_events,
            wait: seconds(wait_s),
        })
        .await
        .unwrap()
        .into_inner()
        .events
}

fn sequences(events: &[LeasedNotification]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e.notification.as_ref().unwrap().sequence)
        .collect()
}

async fn ack(
    payment: &mut PaymentClient<Channel>,
    consumer: &str,
    sequences: &[u64],
) -> (u64, u32) {
    let r = payment
        .ack_notifications(AckNotificationsRequest {
            consumer: consumer.into(),
            sequences: sequences.to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    (r.acked_sequence, r.newly_acked)
}

async fn post(app: &TestApp, id: &str) {
    assert_eq!(
        app.notify(payment_notification(id, KTAPI_TOKEN)).await,
        (200, "success".into())
    );
}

async fn get(payment: &mut PaymentClient<Channel>, name: &str) -> kongtie_gateway::proto::Consumer {
    payment
        .get_consumer(GetConsumerRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
        .consumer
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_creates_its_queue_once_fetches_and_acks() {
    let app = spawn_app().await;
    let mut payment = app.payment().await;
    post(&app, "WQ1").await;
    let created = payment
        .create_consumer(queue("shipping", 30, 0))
        .await
        .unwrap()
        .into_inner()
        .consumer
        .unwrap();
    assert_eq!(created.kind, ConsumerKind::WorkQueue as i32);
    let settings = created.settings.unwrap();
    assert_eq!(
        (settings.max_deliver, settings.max_ack_pending),
        (5, 1000),
        "the defaults"
    );
    assert_eq!(created.lag, 1);
    // Every worker may create it at start: the same settings are a no-op.
    let again = payment
        .create_consumer(queue("shipping", 30, 0))
        .await
        .unwrap();
    assert_eq!(
        again.into_inner().consumer.unwrap().created_at,
        created.created_at
    );
    let status = payment
        .create_consumer(queue("shipping", 60, 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    let (reason, meta) = error_info(&status);
    assert_eq!(reason, "CONSUMER_EXISTS");
    assert_eq!(
        (meta["ack_wait"].as_str(), meta["kind"].as_str()),
        ("30s", "work_queue")
    );

    let events = fetch(&mut payment, "shipping", 10, 0).await;
    assert_eq!(sequences(&events), [1]);
    assert_eq!(events[0].delivery_count, 1);
    assert!(events[0].lease_expires_at.is_some());
    assert_eq!(events[0].notification.as_ref().unwrap().out_trade_id, "WQ1");

    // A long-poll is woken by the next commit.
    let waiting = {
        let mut payment = payment.clone();
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let events = fetch(&mut payment, "shipping", 10, 20).await;
            (events, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    post(&app, "WQ2").await;
    let (events, waited) = tokio::time::timeout(Duration::from_secs(15), waiting)
        .await
        .expect("the long-poll answered")
        .unwrap();
    assert_eq!(sequences(&events), [2]);
    assert!(
        waited < Duration::from_secs(10),
        "woken, not timed out: {waited:?}"
    );

    assert_eq!(ack(&mut payment, "shipping", &[1, 2]).await, (2, 2));
    assert_eq!(
        ack(&mut payment, "shipping", &[2]).await,
        (2, 0),
        "first ack wins"
    );
    let status = payment
        .ack_notifications(AckNotificationsRequest {
            consumer: "shipping".into(),
            sequences: vec![3],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(error_info(&status).0, "NOT_DELIVERED");

    // Nothing comes within a short wait: an empty answer, not an error.
    let started = tokio::time::Instant::now();
    assert!(fetch(&mut payment, "shipping", 10, 1).await.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(900));

    let c = get(&mut payment, "shipping").await;
    assert_eq!((c.acked_sequence, c.lag, c.delivered_sequence), (2, 0, 2));
    assert_eq!((c.leased, c.pending, c.parked), (0, 0, 0));
    assert!(c.last_fetch_at.is_some() && c.last_ack_at.is_some());
    // Sampled into the per-consumer gauges.
    let lag = r#"kongtie_consumer_pending{consumer="shipping"}"#;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = admin_metrics(&app.admin.to_string()).await;
        if text.contains(lag) {
            assert_eq!(sample(&text, lag), 0.0);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no {lag} in {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_delivered_max_deliver_times_parks_and_a_redrive_delivers_it_again() {
    let app = spawn_app().await;
    let mut payment = app.payment().await;
    post(&app, "PARK1").await;
    payment
        .create_consumer(queue("fragile", 30, 2))
        .await
        .unwrap();
    for delivery in 1..=2 {
        let events = fetch(&mut payment, "fragile", 1, 5).await;
        assert_eq!(events[0].delivery_count, delivery);
        let nakked = payment
            .nak_notifications(NakNotificationsRequest {
                consumer: "fragile".into(),
                sequences: vec![1],
                delivery_counts: vec![delivery],
                delay: None,
            })
            .await
            .unwrap()
            .into_inner()
            .nakked;
        assert_eq!(nakked, 1);
    }
    assert!(
        fetch(&mut payment, "fragile", 1, 0).await.is_empty(),
        "parked"
    );
    let c = get(&mut payment, "fragile").await;
    assert_eq!(
        (c.parked, c.parked_sequences.clone(), c.acked_sequence),
        (1, vec![1], 0)
    );
    let text = admin_metrics(&app.admin.to_string()).await;
    let series = |name: &str| format!(r#"kongtie_consumer_{name}_total{{consumer="fragile"}}"#);
    assert_eq!(sample(&text, &series("parks")), 1.0);
    assert_eq!(sample(&text, &series("redeliveries")), 1.0);

    let redriven = payment
        .redrive_notifications(RedriveNotificationsRequest {
            consumer: "fragile".into(),
            sequences: vec![1],
        })
        .await
        .unwrap()
        .into_inner()
        .redriven;
    assert_eq!(redriven, 1);
    let events = fetch(&mut payment, "fragile", 1, 5).await;
    assert_eq!((sequences(&events), events[0].delivery_count), (vec![1], 3));
    assert_eq!(ack(&mut payment, "fragile", &[1]).await, (1, 1));
    assert_eq!(get(&mut payment, "fragile").await.parked, 0);
}

/// A worker in a process of its own: fetches from the queue and prints what
/// it leased, then hangs until killed. Run by
/// `a_worker_killed_holding_leases_...` (and skipped otherwise).
#[tokio::test]
#[ignore = "a child process of another test"]
async fn worker_process() {
    let (Ok(grpc), Ok(consumer)) = (
        std::env::var("KONGTIE_WORKER_GRPC"),
        std::env::var("KONGTIE_WORKER_CONSUMER"),
    ) else {
        return;
    };
    let mut payment = PaymentClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let events = fetch(&mut payment, &consumer, 3, 10).await;
    let leased: Vec<String> = sequences(&events).iter().map(u64::to_string).collect();
    println!("LEASED {}", leased.join(","));
    std::future::pending::<()>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_holding_leases_has_them_delivered_to_another_after_ack_wait() {
    let app = spawn_app().await;
    let mut payment = app.payment().await;
    for id in ["K1", "K2", "K3", "K4"] {
        post(&app, id).await;
    }
    // A 10 s lease: room for a loaded machine between the worker's fetch,
    // the kill and the next fetch.
    payment
        .create_consumer(queue("billing", 10, 5))
        .await
        .unwrap();
    let mut worker = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "work_queues::worker_process",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("KONGTIE_WORKER_GRPC", app.addr.to_string())
        .env("KONGTIE_WORKER_CONSUMER", "billing")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(worker.stdout.take().unwrap()).lines();
    let leased = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(list) = line.strip_prefix("LEASED ") {
                return list.to_owned();
            }
        }
        panic!("the worker ended without leasing");
    })
    .await
    .expect("the worker leased within 30 s");
    assert_eq!(leased, "1,2,3");
    // SIGKILL: it never acks, nor says goodbye.
    worker.start_kill().unwrap();
    worker.wait().await.unwrap();

    // Another worker gets 4 at once, and 1 to 3 only once their leases ran
    // out, delivered a second time.
    let killed_at = tokio::time::Instant::now();
    let first = fetch(&mut payment, "billing", 10, 0).await;
    assert_eq!(
        sequences(&first),
        [4],
        "1 to 3 stay the killed worker's until their leases run out; \
         delivery counts {:?}",
        first.iter().map(|e| e.delivery_count).collect::<Vec<_>>()
    );
    let again = fetch(&mut payment, "billing", 10, 20).await;
    assert_eq!(sequences(&again), [1, 2, 3]);
    assert!(again.iter().all(|e| e.delivery_count == 2));
    assert!(
        killed_at.elapsed() < Duration::from_secs(18),
        "woken when the lease ran out, not at the end of the 20 s wait"
    );
    let c = get(&mut payment, "billing").await;
    assert_eq!((c.pending, c.redelivered), (4, 3));
    assert_eq!(ack(&mut payment, "billing", &[1, 2, 3, 4]).await, (4, 4));
    let text = admin_metrics(&app.admin.to_string()).await;
    assert_eq!(
        sample(
            &text,
            r#"kongtie_consumer_redeliveries_total{consumer="billing"}"#
        ),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_work_queue_field_is_validated() {
    let app = spawn_app().await;
    let mut payment = app.payment().await;
    let status = payment
        .create_consumer(CreateConsumerRequest {
            name: "bad name".into(),
            deliver_policy: 9,
            after_sequence: 0,
            ack_wait: Some(prost_types::Duration {
                seconds: 0,
                nanos: 500_000_000,
            }),
            max_deliver: 1001,
            max_ack_pending: 100_001,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        violated_fields(&status),
        [
            "deliver_policy",
            "ack_wait",
            "max_deliver",
            "max_ack_pending",
            "name"
        ]
    );
    let status = payment
        .create_consumer(CreateConsumerRequest {
            name: "q".into(),
            deliver_policy: DeliverPolicy::New as i32,
            after_sequence: 3,
            ack_wait: seconds(13 * 3600),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["after_sequence", "ack_wait"]);
    let status = payment
        .create_consumer(CreateConsumerRequest {
            name: "q".into(),
            deliver_policy: DeliverPolicy::AfterSequence as i32,
            after_sequence: 3,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange);
    assert_eq!(violated_fields(&status), ["after_sequence"]);

    payment.create_consumer(queue("q", 30, 0)).await.unwrap();
    let status = payment
        .fetch_notifications(FetchNotificationsRequest {
            consumer: "q".into(),
            max_events: 101,
            wait: seconds(31),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["max_events", "wait"]);
    let status = payment
        .fetch_notifications(FetchNotificationsRequest {
            consumer: "q".into(),
            max_events: 1,
            wait: seconds(-1),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["wait"]);
    let status = payment
        .ack_notifications(AckNotificationsRequest {
            consumer: "q".into(),
            sequence: 1,
            sequences: vec![1],
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["sequences"]);
    let status = payment
        .ack_notifications(AckNotificationsRequest {
            consumer: "q".into(),
            sequences: vec![0; 1001],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["sequences"]);
    let status = payment
        .nak_notifications(NakNotificationsRequest {
            consumer: "q".into(),
            sequences: vec![],
            delivery_counts: vec![1],
            delay: seconds(-5),
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&status),
        ["sequences", "delivery_counts", "delay"]
    );
    let status = payment
        .redrive_notifications(RedriveNotificationsRequest {
            consumer: String::new(),
            sequences: vec![0],
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["consumer", "sequences"]);
    let status = payment
        .fetch_notifications(FetchNotificationsRequest {
            consumer: "nobody".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_of_one_kind_cannot_be_used_as_the_other() {
    let app = spawn_app().await;
    let mut payment = app.payment().await;
    post(&app, "KIND1").await;
    payment
        .create_consumer(queue("queue", 30, 0))
        .await
        .unwrap();
    payment
        .ack_notifications(AckNotificationsRequest {
            consumer: "cursor".into(),
            sequence: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let mismatch = |status: tonic::Status, kind: &str| {
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        let (reason, meta) = error_info(&status);
        assert_eq!(
            (reason.as_str(), meta["kind"].as_str()),
            ("CONSUMER_KIND_MISMATCH", kind)
        );
    };
    let subscribed = payment
        .subscribe_notifications(SubscribeNotificationsRequest {
            consumer: "queue".into(),
            ..Default::default()
        })
        .await;
    mismatch(subscribed.map(|_| ()).unwrap_err(), "work_queue");
    let cumulative = payment
        .ack_notifications(AckNotificationsRequest {
            consumer: "queue".into(),
            sequence: 1,
            ..Default::default()
        })
        .await;
    mismatch(cumulative.unwrap_err(), "work_queue");
    let fetched = payment
        .fetch_notifications(FetchNotificationsRequest {
            consumer: "cursor".into(),
            max_events: 1,
            wait: None,
        })
        .await;
    mismatch(fetched.unwrap_err(), "cursor");
    let explicit = payment
        .ack_notifications(AckNotificationsRequest {
            consumer: "cursor".into(),
            sequences: vec![1],
            ..Default::default()
        })
        .await;
    mismatch(explicit.unwrap_err(), "cursor");
    let status = payment
        .create_consumer(queue("cursor", 30, 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(error_info(&status).1["kind"], "cursor");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stream_on_a_cursor_consumer_is_refused_until_the_first_ends() {
    let app = spawn_app().await;
    let mut payment = app.payment().await;
    post(&app, "ONE1").await;
    let request = SubscribeNotificationsRequest {
        consumer: "orders".into(),
        ..Default::default()
    };
    let mut first = payment
        .subscribe_notifications(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.message().await.unwrap().unwrap().sequence, 1);
    assert!(get(&mut payment, "orders").await.streaming);
    let status = payment
        .subscribe_notifications(request.clone())
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(error_info(&status).0, "CONSUMER_IN_USE");
    assert!(
        status.message().contains("another stream"),
        "{}",
        status.message()
    );
    // The first still works, and acks move the one position.
    payment
        .ack_notifications(AckNotificationsRequest {
            consumer: "orders".into(),
            sequence: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    drop(first);
    // Once the server sees the first stream end, its hold is given up.
    let mut second = subscribe_when_free(&payment, request).await;
    post(&app, "ONE2").await;
    assert_eq!(second.message().await.unwrap().unwrap().sequence, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_read_before_a_restart_is_read_again_at_once_after_it() {
    use crate::helpers::Binary;
    let dir = tempfile::tempdir().unwrap();
    let request = SubscribeNotificationsRequest {
        consumer: "audit".into(),
        ..Default::default()
    };
    let subscribe = |grpc: String| {
        let request = request.clone();
        async move {
            PaymentClient::connect(format!("http://{grpc}"))
                .await
                .unwrap()
                .subscribe_notifications(request)
                .await
        }
    };
    // A graceful stop (SIGTERM) gives the stream's hold up before it ends:
    // the client goes on at once on another replica (PostgreSQL).
    let db = crate::pg::PgDatabase::create().await;
    let a = Binary::start(&["serve", "--store", &db.url]);
    let b = Binary::start(&["serve", "--store", &db.url]);
    let stream = subscribe(a.grpc.clone()).await.unwrap();
    crate::helpers::sigterm(&a);
    assert!(
        crate::helpers::exit_within(a, Duration::from_secs(20))
            .await
            .success()
    );
    drop(stream);
    let on_b = subscribe(b.grpc.clone()).await;
    assert!(on_b.is_ok(), "refused on B after A stopped: {on_b:?}");

    let mut bin = Binary::start_in(&["serve"], dir.path(), None);
    let stream = subscribe(bin.grpc.clone()).await;
    assert!(stream.is_ok());
    // SIGKILL leaves the hold in the file; the one gateway of a SQLite
    // store clears it when it opens the store.
    bin.child.kill().unwrap();
    bin.child.wait().unwrap();
    drop(stream);
    let bin = Binary::start_in(&["serve"], dir.path(), None);
    let stream = subscribe(bin.grpc.clone()).await;
    assert!(stream.is_ok(), "refused after a crash: {stream:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_names_that_are_path_segments_or_the_metrics_overflow_label_are_refused() {
    let app = spawn_app().await;
    let mut payment = app.payment().await;
    for name in [".", "..", "_other"] {
        let status = payment
            .create_consumer(queue(name, 30, 5))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert_eq!(violated_fields(&status), ["name"], "{name}");
        let status = payment
            .ack_notifications(AckNotificationsRequest {
                consumer: name.into(),
                sequence: 1,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert_eq!(violated_fields(&status), ["consumer"], "{name}");
    }
    // A name that merely contains them is a name like any other.
    payment
        .create_consumer(queue("_other.queue", 30, 5))
        .await
        .unwrap();
}

/// 100 cursor consumers acknowledged to the end, named before a work queue
/// that has been given nothing: the lagging one has its gauges, and the one
/// left out is summed under `_other`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumer_gauges_show_the_most_lagging_consumers_not_the_first_hundred_by_name() {
    let app = spawn_app().await;
    let mut payment = app.payment().await;
    post(&app, "GAUGE1").await;
    for i in 0..100 {
        payment
            .ack_notifications(AckNotificationsRequest {
                consumer: format!("caught-up-{i:03}"),
                sequence: 1,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    payment
        .create_consumer(queue("zz-behind", 30, 5))
        .await
        .unwrap();
    let behind = r#"kongtie_consumer_lag{consumer="zz-behind"}"#;
    let other = r#"kongtie_consumer_lag{consumer="_other"}"#;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = admin_metrics(&app.admin.to_string()).await;
        if text.contains(behind) && text.contains(other) {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {behind} and {other} within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(sample(&text, behind), 1.0);
    assert_eq!(sample(&text, other), 0.0);
    let series = text
        .lines()
        .filter(|l| l.starts_with("kongtie_consumer_lag{"))
        .count();
    assert_eq!(series, 101, "100 consumers and _other");
}
