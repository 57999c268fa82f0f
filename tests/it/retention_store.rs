//! Retention's contract (`RetentionStore`), held to one suite on both
//! backends: what a sweep may delete (past the horizon and acknowledged by
//! every consumer, or past the hard limit; never the newest event; final
//! orders only), in batches, once across replicas.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use kongtie_gateway::{
    consumers::{ConsumerError, DeliverPolicy, QueueSettings},
    orders::{Begin, OrderState, OrderTerms, Outcome, Refusal},
    retention::{Cutoffs, Swept},
    store::{NotificationStore, Recorded},
};

use crate::store::{Backend, Place, incoming};

store_suite!(
    a_sweep_spares_what_any_consumer_has_not_acknowledged,
    the_hard_limit_takes_unacknowledged_events_and_their_deliveries,
    final_orders_go_and_open_ones_stay,
    replicas_sweeping_at_once_delete_each_event_once,
    what_a_sweep_deletes_leaves_tombstones_that_outlive_it,
);

/// Everything stored so far is past the horizon; the hard limit is not
/// reached (or is, with `hard`).
fn past(hard: bool) -> Cutoffs {
    let later = Utc::now() + chrono::Duration::seconds(5);
    Cutoffs {
        keep_before: later,
        hard_before: if hard {
            later
        } else {
            DateTime::<Utc>::UNIX_EPOCH
        },
    }
}

async fn record(store: &Arc<dyn NotificationStore>, n: usize, prefix: &str) {
    for i in 0..n {
        store
            .record(incoming(&format!("{prefix}{i}")))
            .await
            .unwrap();
    }
}

async fn first(store: &Arc<dyn NotificationStore>) -> u64 {
    store.retention().first_retained().await.unwrap()
}

async fn sweep(store: &Arc<dyn NotificationStore>, hard: bool) -> Swept {
    store.retention().sweep(past(hard), 500).await.unwrap()
}

fn deleted(notifications: u64, unacknowledged: u64, orders: u64) -> Swept {
    Swept {
        notifications,
        unacknowledged,
        orders,
    }
}

fn queue() -> QueueSettings {
    QueueSettings {
        deliver_policy: DeliverPolicy::All,
        ack_wait: Duration::from_secs(30),
        max_deliver: 5,
        max_ack_pending: 1000,
    }
}

async fn a_sweep_spares_what_any_consumer_has_not_acknowledged(backend: Backend) {
    let place = Place::new(backend).await;
    let store = place.open().await;
    assert_eq!(first(&store).await, 1, "1 before the first event");
    record(&store, 10, "s").await;
    let consumers = store.consumers();
    // A cursor at 6; a work queue that delivered 1 to 3 and was told 1 and
    // 2 are done: 3 is pending, 4 to 10 not delivered yet.
    consumers.ack_cursor("cursor", 6).await.unwrap();
    consumers.create("queue", &queue()).await.unwrap();
    let fetched = consumers.fetch("queue", 3, true).await.unwrap().events;
    assert_eq!(fetched.len(), 3);
    consumers.ack_events("queue", &[1, 2]).await.unwrap();

    assert_eq!(sweep(&store, false).await, deleted(2, 0, 0));
    assert_eq!(first(&store).await, 3);
    assert_eq!(sweep(&store, false).await, deleted(0, 0, 0));

    // 3 acknowledged: the queue has seen up to 3.
    consumers.ack_events("queue", &[3]).await.unwrap();
    assert_eq!(sweep(&store, false).await, deleted(1, 0, 0));
    assert_eq!(first(&store).await, 4);

    // Without the queue, the cursor decides.
    assert!(consumers.delete("queue").await.unwrap());
    assert_eq!(sweep(&store, false).await, deleted(3, 0, 0));
    assert_eq!(first(&store).await, 7);

    // Without consumers, all but the newest go.
    assert!(consumers.delete("cursor").await.unwrap());
    assert_eq!(sweep(&store, false).await, deleted(3, 0, 0));
    let left = store.list(0, None, 100).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].sequence, 10);
    assert_eq!(first(&store).await, 10);

    // The sequence carries on, on a store opened again too.
    store.close().await;
    let store = place.open().await;
    assert_eq!(store.last_sequence().await.unwrap(), 10);
    record(&store, 1, "after").await;
    assert_eq!(store.last_sequence().await.unwrap(), 11);
    store.close().await;
}

async fn the_hard_limit_takes_unacknowledged_events_and_their_deliveries(backend: Backend) {
    let place = Place::new(backend).await;
    let store = place.open().await;
    record(&store, 6, "h").await;
    let consumers = store.consumers();
    consumers.ack_cursor("dead", 1).await.unwrap();
    consumers.create("stuck", &queue()).await.unwrap();
    assert_eq!(
        consumers
            .fetch("stuck", 2, true)
            .await
            .unwrap()
            .events
            .len(),
        2
    );
    // Within the hard limit: nothing goes (the queue pins 1).
    assert_eq!(sweep(&store, false).await, deleted(0, 0, 0));
    // Past it: all but the newest, none of which the queue acknowledged.
    assert_eq!(sweep(&store, true).await, deleted(5, 5, 0));
    assert_eq!(first(&store).await, 6);
    // The queue's deliveries of deleted events went with them: nothing is
    // pending, and the next fetch has nothing to hand back.
    let stuck = consumers.get("stuck").await.unwrap().unwrap();
    let state = stuck.queue.unwrap();
    assert_eq!((state.pending, state.leased), (0, 0));
    // It had delivered 1 and 2; 3 to 5 are gone before it got them: no
    // silent jump to 6.
    match consumers.fetch("stuck", 10, true).await {
        Err(ConsumerError::BehindRetention {
            delivered, first, ..
        }) => assert_eq!((delivered, first), (2, 6)),
        other => panic!("{other:?}"),
    }
    // Made again, it starts at the first retained event.
    assert!(consumers.delete("stuck").await.unwrap());
    consumers.create("stuck", &queue()).await.unwrap();
    let fetched = consumers.fetch("stuck", 10, true).await.unwrap().events;
    assert_eq!(fetched.len(), 1);
    assert_eq!(fetched[0].notification.sequence, 6);
    // The cursor moves on by acknowledging up to the first retained one.
    consumers.ack_cursor("dead", 5).await.unwrap();
    store.close().await;
}

fn terms(id: &str, expires_at: DateTime<Utc>) -> OrderTerms {
    OrderTerms {
        out_trade_id: id.into(),
        amount_fen: 20,
        openid: "o1".into(),
        expires_at,
        explicit_expiry: true,
    }
}

async fn final_orders_go_and_open_ones_stay(backend: Backend) {
    let place = Place::new(backend).await;
    let store = place.open().await;
    let orders = store.orders();
    let long_ago = Utc::now() - chrono::Duration::days(2);
    let made = |id: &'static str, expires_at, outcome: Option<Outcome>| {
        let orders = Arc::clone(&orders);
        async move {
            let begun = orders
                .begin(
                    &terms(id, expires_at),
                    long_ago,
                    Duration::from_secs(6600),
                    None,
                    "t",
                    long_ago + chrono::Duration::seconds(30),
                )
                .await
                .unwrap();
            assert_eq!(begun, Begin::Send { attempt: 1 });
            if let Some(outcome) = outcome {
                orders.finish(id, "t", 1, &outcome, long_ago).await.unwrap();
            }
        }
    };
    let created = || {
        Some(Outcome::Created {
            response_text: "{}".into(),
        })
    };
    let in_an_hour = Utc::now() + chrono::Duration::hours(1);
    let expired = long_ago + chrono::Duration::minutes(30);
    made("EXPIRED", expired, created()).await;
    made(
        "FAILED",
        in_an_hour,
        Some(Outcome::Failed {
            code: "1001".into(),
            message: "no".into(),
        }),
    )
    .await;
    made("OPEN", in_an_hour, created()).await;
    made("UNKNOWN-OPEN", in_an_hour, Some(Outcome::Unknown)).await;
    made("PAID", in_an_hour, created()).await;
    // Paid by its notification (matching amount).
    store.record(incoming("PAID")).await.unwrap();
    assert_eq!(
        orders.get("PAID").await.unwrap().unwrap().state,
        OrderState::Paid
    );

    assert_eq!(sweep(&store, false).await.orders, 3);
    for (id, kept) in [
        ("EXPIRED", false),
        ("FAILED", false),
        ("PAID", false),
        ("OPEN", true),
        ("UNKNOWN-OPEN", true),
    ] {
        assert_eq!(orders.get(id).await.unwrap().is_some(), kept, "{id}");
    }
    store.close().await;
}

async fn replicas_sweeping_at_once_delete_each_event_once(backend: Backend) {
    let place = Place::new(backend).await;
    let a = place.open().await;
    let b = place.replica(&a).await;
    record(&a, 60, "r").await;
    let sweeper = |store: Arc<dyn NotificationStore>| async move {
        let mut total = 0;
        loop {
            let swept = store.retention().sweep(past(false), 7).await.unwrap();
            total += swept.notifications;
            if swept.notifications == 0 {
                return total;
            }
        }
    };
    let (ta, tb) = tokio::join!(sweeper(Arc::clone(&a)), sweeper(Arc::clone(&b)));
    assert_eq!(ta + tb, 59, "each event deleted once (a: {ta}, b: {tb})");
    assert_eq!(first(&a).await, 60);
    assert_eq!(first(&b).await, 60);
    a.close().await;
    b.close().await;
}

/// A paid order and its notification, and a refused order, swept: the
/// payment sent again is a repeat of the swept event (no sequence taken),
/// and neither id can be ordered again, on another replica and after a
/// restart too.
async fn what_a_sweep_deletes_leaves_tombstones_that_outlive_it(backend: Backend) {
    let place = Place::new(backend).await;
    let store = place.open().await;
    let orders = store.orders();
    let now = Utc::now();
    for id in ["TPAID", "TFAILED"] {
        let begun = orders
            .begin(
                &terms(id, now + chrono::Duration::hours(1)),
                now,
                Duration::from_secs(6600),
                None,
                "t",
                now + chrono::Duration::seconds(30),
            )
            .await
            .unwrap();
        assert_eq!(begun, Begin::Send { attempt: 1 });
    }
    let created = Outcome::Created {
        response_text: "{}".into(),
    };
    orders.finish("TPAID", "t", 1, &created, now).await.unwrap();
    let failed = Outcome::Failed {
        code: "1001".into(),
        message: "no".into(),
    };
    orders
        .finish("TFAILED", "t", 1, &failed, now)
        .await
        .unwrap();
    assert!(matches!(
        store.record(incoming("TPAID")).await.unwrap(),
        Recorded::New { sequence: 1, .. }
    ));
    record(&store, 1, "newest").await;

    assert_eq!(sweep(&store, false).await, deleted(1, 0, 2));
    assert_eq!(sweep(&store, false).await, deleted(0, 0, 0));
    let b = place.replica(&store).await;
    for s in [&store, &b] {
        assert_eq!(
            s.record(incoming("TPAID")).await.unwrap(),
            Recorded::RepeatOfSwept { sequence: 1 }
        );
        assert_eq!(
            s.list(0, None, 10).await.unwrap().len(),
            1,
            "nothing stored"
        );
    }
    let refused = |id: &'static str, store: Arc<dyn NotificationStore>| async move {
        let now = Utc::now();
        store
            .orders()
            .begin(
                &terms(id, now + chrono::Duration::hours(1)),
                now,
                Duration::from_secs(6600),
                None,
                "t",
                now + chrono::Duration::seconds(30),
            )
            .await
            .unwrap()
    };
    assert_eq!(
        refused("TPAID", Arc::clone(&b)).await,
        Begin::Refused(Refusal::AlreadyPaid)
    );
    assert_eq!(
        refused("TFAILED", Arc::clone(&b)).await,
        Begin::Refused(Refusal::Retired)
    );
    if backend == Backend::Postgres {
        b.close().await;
    }
    store.close().await;

    // They outlive a restart; the sequence goes on from 2.
    let store = place.open().await;
    assert_eq!(
        store.record(incoming("TPAID")).await.unwrap(),
        Recorded::RepeatOfSwept { sequence: 1 }
    );
    assert!(matches!(
        store.record(incoming("after")).await.unwrap(),
        Recorded::New { sequence: 3, .. }
    ));
    assert_eq!(
        refused("TPAID", Arc::clone(&store)).await,
        Begin::Refused(Refusal::AlreadyPaid)
    );
    store.close().await;
}

/// A FAILED order retried on PostgreSQL while a sweep deletes it: the
/// sweep's delete (and its tombstone) is held uncommitted here, so the
/// retry reads the row, then must wait for it; once the sweep commits, the
/// retry is ORDER_ID_RETIRED, not sent to Kongtie for an order no longer in
/// the ledger (the row it claimed is gone). PostgreSQL only: SQLite runs
/// the sweep and the claim on its one writer, one after the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_order_retried_while_a_sweep_deletes_it_is_retired_not_sent() {
    use sqlx::Connection;
    let place = Place::new(Backend::Postgres).await;
    let store = place.open().await;
    let orders = store.orders();
    let now = Utc::now();
    let expires = DateTime::from_timestamp(now.timestamp() + 3600, 0).unwrap();
    let begin = move |orders: Arc<dyn kongtie_gateway::orders::OrderStore>| async move {
        let now = Utc::now();
        orders
            .begin(
                &terms("RACED", expires),
                now,
                Duration::from_secs(6600),
                None,
                "t",
                now + chrono::Duration::seconds(30),
            )
            .await
            .unwrap()
    };
    assert_eq!(begin(Arc::clone(&orders)).await, Begin::Send { attempt: 1 });
    let failed = Outcome::Failed {
        code: "1001".into(),
        message: "no".into(),
    };
    orders.finish("RACED", "t", 1, &failed, now).await.unwrap();

    // The sweep's statement, not yet committed.
    let mut sweep = sqlx::PgConnection::connect(&place.url).await.unwrap();
    let mut tx = sweep.begin().await.unwrap();
    sqlx::query(
        "WITH gone AS (DELETE FROM orders WHERE out_trade_id = 'RACED' \
           RETURNING out_trade_id, state) \
         INSERT INTO swept_orders (out_trade_id, paid) \
         SELECT out_trade_id, state = 'PAID' FROM gone",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    let retry = tokio::spawn(begin(Arc::clone(&orders)));
    // Until the retry waits on the sweep's row lock.
    let mut watch = sqlx::PgConnection::connect(&place.url).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut watch)
        .await
        .unwrap();
        if waiting > 0 || retry.is_finished() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the retry never waited on the sweep's lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tx.commit().await.unwrap();
    let begun = tokio::time::timeout(Duration::from_secs(10), retry)
        .await
        .expect("the retry answers once the sweep commits")
        .unwrap();
    assert_eq!(begun, Begin::Refused(Refusal::Retired));
    assert_eq!(orders.get("RACED").await.unwrap(), None);
    store.close().await;
}
