//! The consumers' contract (`ConsumerStore`), held to one suite on both
//! backends: work queues leasing, acknowledging, handing back, parking and
//! re-driving; cursors refusing to be used as work queues and read by one
//! stream at a time. On PostgreSQL the second handle is another replica's.

use std::{collections::HashMap, sync::Arc, time::Duration};

use kongtie_gateway::{
    consumers::{ConsumerError, ConsumerStore, DeliverPolicy, Kind, Leased, QueueSettings},
    store::{NotificationStore, StoreError},
};

use crate::store::{Backend, Place, incoming};

store_suite!(
    a_work_queue_leases_each_event_once_and_acks_exactly_what_it_is_told,
    an_event_not_acked_in_time_is_delivered_again_first,
    an_event_delivered_max_deliver_times_parks_until_redriven,
    max_ack_pending_stops_new_events_but_not_redeliveries,
    deliver_policies_choose_the_first_event,
    a_stale_nak_leaves_the_next_holders_lease_alone,
    kinds_do_not_mix_and_one_stream_reads_a_cursor,
    racing_fetchers_on_two_replicas_never_share_an_event,
    a_call_dropped_at_any_point_leaves_no_transaction_behind,
);

fn settings(ack_wait_ms: u64, max_deliver: u32, max_ack_pending: u32) -> QueueSettings {
    QueueSettings {
        deliver_policy: DeliverPolicy::All,
        ack_wait: Duration::from_millis(ack_wait_ms),
        max_deliver,
        max_ack_pending,
    }
}

async fn record(store: &Arc<dyn NotificationStore>, ids: impl IntoIterator<Item = String>) {
    for id in ids {
        store.record(incoming(&id)).await.unwrap();
    }
}

fn ids(n: usize, prefix: &str) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// `(sequence, delivery_count)` of what a fetch leased.
fn leased(events: &[Leased]) -> Vec<(u64, u32)> {
    events
        .iter()
        .map(|l| (l.notification.sequence, l.delivery_count))
        .collect()
}

async fn fetch(store: &Arc<dyn ConsumerStore>, name: &str, max: u32) -> Vec<(u64, u32)> {
    leased(&store.fetch(name, max, true).await.unwrap().events)
}

/// Sleeps past a lease of `ms`, with slack for a loaded machine.
async fn past_lease(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms + 150)).await;
}

async fn a_work_queue_leases_each_event_once_and_acks_exactly_what_it_is_told(backend: Backend) {
    let place = Place::new(backend).await;
    let a = place.open().await;
    let b = place.replica(&a).await;
    record(&a, ids(5, "w")).await;
    let (qa, qb) = (a.consumers(), b.consumers());
    let s = settings(30_000, 5, 1000);
    let created = qa.create("shipping", &s).await.unwrap();
    assert_eq!(created.kind, Kind::WorkQueue);
    assert_eq!(created.lag, 5);
    // The same settings again: the same consumer; other settings: refused.
    assert_eq!(
        qb.create("shipping", &s)
            .await
            .unwrap()
            .queue
            .unwrap()
            .settings,
        s
    );
    let other = settings(30_000, 6, 1000);
    match qb.create("shipping", &other).await {
        Err(ConsumerError::Exists(existing)) => {
            assert_eq!(existing.queue.unwrap().settings.max_deliver, 5)
        }
        other => panic!("expected Exists, got {other:?}"),
    }

    // Callers on two replicas divide the events, in sequence order.
    assert_eq!(fetch(&qa, "shipping", 2).await, [(1, 1), (2, 1)]);
    assert_eq!(fetch(&qb, "shipping", 10).await, [(3, 1), (4, 1), (5, 1)]);
    assert_eq!(fetch(&qa, "shipping", 10).await, [], "all leased");
    let fetched = qa.fetch("shipping", 1, true).await.unwrap();
    assert!(
        fetched
            .next_due
            .is_some_and(|d| d <= Duration::from_secs(30)),
        "the next lease to run out: {:?}",
        fetched.next_due
    );

    // Exactly the events named; the first ack wins.
    let acked = qb.ack_events("shipping", &[1, 3]).await.unwrap();
    assert_eq!((acked.acked_sequence, acked.newly_acked), (1, 2));
    let again = qa.ack_events("shipping", &[1, 3]).await.unwrap();
    assert_eq!((again.acked_sequence, again.newly_acked), (1, 0));
    match qa.ack_events("shipping", &[2, 6]).await {
        Err(ConsumerError::NotDelivered { sequence: 6, .. }) => {}
        other => panic!("expected NotDelivered 6, got {other:?}"),
    }
    let c = qa.get("shipping").await.unwrap().unwrap();
    let q = c.queue.unwrap();
    assert_eq!(
        (c.acked_sequence, c.lag, q.delivered_sequence),
        (1, 0, 5),
        "2 was not acked with the refused 6"
    );
    assert_eq!((q.leased, q.pending, q.redelivered, q.parked), (3, 3, 0, 0));
    assert!(q.last_fetch_at.is_some() && c.last_ack_at.is_some());

    qa.ack_events("shipping", &[2, 4, 5]).await.unwrap();
    let c = qb.get("shipping").await.unwrap().unwrap();
    assert_eq!(c.acked_sequence, 5);
    record(&a, ["w5".to_owned()]).await;
    assert_eq!(qb.get("shipping").await.unwrap().unwrap().lag, 1);
    assert_eq!(fetch(&qb, "shipping", 10).await, [(6, 1)]);

    // Deleting it forgets its leases.
    assert!(qa.delete("shipping").await.unwrap());
    qa.create("shipping", &s).await.unwrap();
    assert_eq!(fetch(&qa, "shipping", 100).await.len(), 6, "from the start");
}

async fn an_event_not_acked_in_time_is_delivered_again_first(backend: Backend) {
    let place = Place::new(backend).await;
    let a = place.open().await;
    let b = place.replica(&a).await;
    record(&a, ids(3, "r")).await;
    let (qa, qb) = (a.consumers(), b.consumers());
    qa.create("q", &settings(300, 5, 1000)).await.unwrap();
    assert_eq!(fetch(&qa, "q", 2).await, [(1, 1), (2, 1)]);
    qa.ack_events("q", &[1]).await.unwrap();
    past_lease(300).await;
    // 2's lease ran out: it comes before the new 3, to another replica.
    let again = qb.fetch("q", 10, true).await.unwrap();
    assert_eq!(leased(&again.events), [(2, 2), (3, 1)]);
    assert_eq!(again.redelivered, 1);
    let q = qb.get("q").await.unwrap().unwrap().queue.unwrap();
    assert_eq!((q.leased, q.pending, q.redelivered), (2, 2, 1));
    // The caller whose lease ran out may still ack it: that ack wins.
    let late = qa.ack_events("q", &[2]).await.unwrap();
    assert_eq!(late.newly_acked, 1);
    assert_eq!(qb.ack_events("q", &[2]).await.unwrap().newly_acked, 0);
}

async fn an_event_delivered_max_deliver_times_parks_until_redriven(backend: Backend) {
    let place = Place::new(backend).await;
    let a = place.open().await;
    let b = place.replica(&a).await;
    record(&a, ids(2, "p")).await;
    let (qa, qb) = (a.consumers(), b.consumers());
    qa.create("poison", &settings(30_000, 2, 1000))
        .await
        .unwrap();
    assert_eq!(fetch(&qa, "poison", 1).await, [(1, 1)]);
    assert_eq!(
        qa.nak("poison", &[1], None, Duration::ZERO).await.unwrap(),
        1
    );
    assert_eq!(fetch(&qb, "poison", 1).await, [(1, 2)]);
    // Its last delivery handed back: parked at once.
    assert_eq!(
        qb.nak("poison", &[1], None, Duration::ZERO).await.unwrap(),
        1
    );
    let parked = qa.fetch("poison", 10, true).await.unwrap();
    assert_eq!(leased(&parked.events), [(2, 1)], "1 is not delivered again");
    assert_eq!(parked.parked, 1, "counted by the fetch that found it");
    let c = qb.get("poison").await.unwrap().unwrap();
    let q = c.queue.unwrap();
    assert_eq!(
        (q.parked, q.parked_sequences.clone(), q.pending),
        (1, vec![1], 1)
    );
    assert_eq!(c.acked_sequence, 0, "a parked event holds the ack floor");
    assert_eq!(
        qa.fetch("poison", 10, true).await.unwrap().parked,
        0,
        "counted once"
    );

    // Re-driven: delivered again, with max_deliver more deliveries.
    assert_eq!(qa.redrive("poison", &[]).await.unwrap(), 1);
    assert_eq!(qa.redrive("poison", &[]).await.unwrap(), 0);
    assert_eq!(fetch(&qb, "poison", 10).await, [(1, 3)]);
    qb.nak("poison", &[1], None, Duration::ZERO).await.unwrap();
    assert_eq!(fetch(&qa, "poison", 10).await, [(1, 4)]);
    qa.ack_events("poison", &[1, 2]).await.unwrap();
    let c = qa.get("poison").await.unwrap().unwrap();
    assert_eq!((c.acked_sequence, c.queue.unwrap().parked), (2, 0));
}

async fn max_ack_pending_stops_new_events_but_not_redeliveries(backend: Backend) {
    let place = Place::new(backend).await;
    let a = place.open().await;
    record(&a, ids(4, "m")).await;
    let q = a.consumers();
    q.create("slow", &settings(30_000, 5, 2)).await.unwrap();
    assert_eq!(fetch(&q, "slow", 10).await, [(1, 1), (2, 1)]);
    assert_eq!(fetch(&q, "slow", 10).await, [], "two pending: nothing new");
    q.nak("slow", &[1], None, Duration::ZERO).await.unwrap();
    assert_eq!(fetch(&q, "slow", 10).await, [(1, 2)], "a redelivery only");
    q.ack_events("slow", &[1]).await.unwrap();
    assert_eq!(fetch(&q, "slow", 10).await, [(3, 1)]);
    q.ack_events("slow", &[2, 3]).await.unwrap();
    assert_eq!(fetch(&q, "slow", 10).await, [(4, 1)]);
    // A nak with a delay hands it back later, not now.
    q.nak("slow", &[4], None, Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(fetch(&q, "slow", 10).await, []);
    past_lease(300).await;
    assert_eq!(fetch(&q, "slow", 10).await, [(4, 2)]);
}

async fn deliver_policies_choose_the_first_event(backend: Backend) {
    let place = Place::new(backend).await;
    let a = place.open().await;
    record(&a, ids(2, "d")).await;
    let q = a.consumers();
    let with = |deliver_policy| QueueSettings {
        deliver_policy,
        ..settings(30_000, 5, 1000)
    };
    q.create("new", &with(DeliverPolicy::New)).await.unwrap();
    q.create("after1", &with(DeliverPolicy::AfterSequence(1)))
        .await
        .unwrap();
    match q
        .create("far", &with(DeliverPolicy::AfterSequence(9)))
        .await
    {
        Err(ConsumerError::Store(StoreError::BeyondLast {
            requested: 9,
            last: 2,
        })) => {}
        other => panic!("expected BeyondLast, got {other:?}"),
    }
    assert_eq!(fetch(&q, "new", 10).await, []);
    assert_eq!(fetch(&q, "after1", 10).await, [(2, 1)]);
    record(&a, ["d2".to_owned()]).await;
    assert_eq!(fetch(&q, "new", 10).await, [(3, 1)]);
    assert_eq!(
        q.get("after1").await.unwrap().unwrap().acked_sequence,
        1,
        "what it skipped counts as acknowledged"
    );
}

async fn a_stale_nak_leaves_the_next_holders_lease_alone(backend: Backend) {
    let place = Place::new(backend).await;
    let a = place.open().await;
    let b = place.replica(&a).await;
    record(&a, ids(1, "s")).await;
    let (qa, qb) = (a.consumers(), b.consumers());
    qa.create("q", &settings(300, 5, 1000)).await.unwrap();
    assert_eq!(fetch(&qa, "q", 1).await, [(1, 1)]);
    past_lease(300).await;
    assert_eq!(fetch(&qb, "q", 1).await, [(1, 2)]);
    // The first caller, late, hands back its delivery 1: not B's delivery 2.
    assert_eq!(
        qa.nak("q", &[1], Some(&[1]), Duration::ZERO).await.unwrap(),
        0
    );
    assert_eq!(fetch(&qa, "q", 1).await, [], "still B's");
    assert_eq!(
        qb.nak("q", &[1], Some(&[2]), Duration::ZERO).await.unwrap(),
        1
    );
    assert_eq!(fetch(&qa, "q", 1).await, [(1, 3)]);
}

async fn kinds_do_not_mix_and_one_stream_reads_a_cursor(backend: Backend) {
    let place = Place::new(backend).await;
    let a = place.open().await;
    let b = place.replica(&a).await;
    record(&a, ids(3, "k")).await;
    let (qa, qb) = (a.consumers(), b.consumers());
    qa.create("queue", &settings(30_000, 5, 1000))
        .await
        .unwrap();
    qa.ack_cursor("cursor", 2).await.unwrap();
    let wrong = |r: Result<_, ConsumerError>, kind: Kind| match r {
        Err(ConsumerError::WrongKind { kind: k, .. }) => assert_eq!(k, kind),
        Err(e) => panic!("expected WrongKind, got {e:?}"),
        Ok(_) => panic!("expected WrongKind, got Ok"),
    };
    wrong(qb.ack_cursor("queue", 1).await.map(|_| ()), Kind::WorkQueue);
    let hold = qb.hold_stream("queue", "h0", Duration::from_secs(15)).await;
    wrong(hold.map(|_| ()), Kind::WorkQueue);
    wrong(qb.fetch("cursor", 1, true).await.map(|_| ()), Kind::Cursor);
    wrong(
        qb.ack_events("cursor", &[1]).await.map(|_| ()),
        Kind::Cursor,
    );
    wrong(
        qb.nak("cursor", &[1], None, Duration::ZERO)
            .await
            .map(|_| ()),
        Kind::Cursor,
    );
    wrong(qb.redrive("cursor", &[]).await.map(|_| ()), Kind::Cursor);
    assert!(matches!(
        qb.create("cursor", &settings(30_000, 5, 1000)).await,
        Err(ConsumerError::Exists(c)) if c.kind == Kind::Cursor
    ));
    assert!(matches!(
        qb.fetch("nobody", 1, true).await,
        Err(ConsumerError::NotFound(_))
    ));

    // One stream holds a cursor at a time, on whichever replica.
    let hold = Duration::from_secs(15);
    assert_eq!(qa.hold_stream("cursor", "h1", hold).await.unwrap(), 2);
    assert!(qa.get("cursor").await.unwrap().unwrap().streaming);
    assert!(matches!(
        qb.hold_stream("cursor", "h2", hold).await,
        Err(ConsumerError::InUse { .. })
    ));
    assert!(qa.renew_stream("cursor", "h1", hold).await.unwrap());
    assert!(!qb.renew_stream("cursor", "h2", hold).await.unwrap());
    qa.release_stream("cursor", "h1").await.unwrap();
    assert!(!qb.get("cursor").await.unwrap().unwrap().streaming);
    assert_eq!(qb.hold_stream("cursor", "h2", hold).await.unwrap(), 2);
    // A new name is created by its first stream, at 0.
    assert_eq!(qb.hold_stream("fresh", "h3", hold).await.unwrap(), 0);
    assert_eq!(qa.get("fresh").await.unwrap().unwrap().kind, Kind::Cursor);

    // A hold that is not renewed lapses (its replica died).
    let short = Duration::from_millis(300);
    qa.hold_stream("lapsing", "h4", short).await.unwrap();
    past_lease(300).await;
    assert_eq!(qb.hold_stream("lapsing", "h5", hold).await.unwrap(), 0);
    assert!(
        !qa.renew_stream("lapsing", "h4", hold).await.unwrap(),
        "lost"
    );
    // A deleted cursor's hold is lost too.
    assert!(qa.delete("lapsing").await.unwrap());
    assert!(!qb.renew_stream("lapsing", "h5", hold).await.unwrap());
}

async fn racing_fetchers_on_two_replicas_never_share_an_event(backend: Backend) {
    let place = Place::new(backend).await;
    let a = place.open().await;
    let b = place.replica(&a).await;
    record(&a, ids(300, "x")).await;
    a.consumers()
        .create("race", &settings(60_000, 5, 1000))
        .await
        .unwrap();
    let fetchers = (0..8).map(|i| {
        let q = if i % 2 == 0 {
            a.consumers()
        } else {
            b.consumers()
        };
        tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = fetch(&q, "race", 7).await;
                if got.is_empty() {
                    return mine;
                }
                let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
                let acked = q.ack_events("race", &seqs).await.unwrap();
                assert_eq!(acked.newly_acked as usize, seqs.len(), "acked once");
                mine.extend(got);
            }
        })
    });
    let mut seen: HashMap<u64, usize> = HashMap::new();
    let mut busy = 0;
    for f in futures::future::join_all(fetchers).await {
        let mine = f.unwrap();
        busy += usize::from(!mine.is_empty());
        for (s, count) in mine {
            assert_eq!(count, 1, "never redelivered");
            *seen.entry(s).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), 300);
    assert!(seen.values().all(|&n| n == 1), "each event to one caller");
    assert!(busy >= 2, "the work was shared");
    assert_eq!(
        a.consumers()
            .get("race")
            .await
            .unwrap()
            .unwrap()
            .acked_sequence,
        300
    );
}

/// Polls `call` until it is done or `after` has passed (letting the
/// runtime's IO driver run between polls), then drops it wherever it got
/// to.
async fn dropped_after<F: std::future::Future>(after: Duration, call: F) -> bool {
    let mut call = std::pin::pin!(call);
    let started = std::time::Instant::now();
    while started.elapsed() < after {
        if futures::poll!(call.as_mut()).is_ready() {
            return false;
        }
        tokio::task::yield_now().await;
    }
    true
}

/// Sessions of this database (other than the asking one) inside a
/// transaction that nobody is running a statement of.
async fn idle_in_transaction(server: &mut sqlx::PgConnection) -> i64 {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'",
    )
    .fetch_one(server)
    .await
    .unwrap()
}

/// A caller may give up on a call at any await (its client went away, a
/// deadline passed): wherever the call was dropped, no transaction of it
/// is left open on the store's connections for the next call to run in.
///
/// sqlx 0.9.0 left a PostgreSQL connection inside a transaction when a
/// `begin` was dropped during its BEGIN round trip (vendor/README.md). The
/// next call on that connection then ran inside it, with its clock:
/// `now()` was the old BEGIN's, so a lease taken then could have run out
/// already, and the event went to the next caller at once (the
/// killed-worker test saw it, about one PostgreSQL run in three).
async fn a_call_dropped_at_any_point_leaves_no_transaction_behind(backend: Backend) {
    use sqlx::Connection;
    let place = Place::new(backend).await;
    let a = place.open().await;
    record(&a, ids(40, "d")).await;
    let q = a.consumers();
    q.create("q", &settings(2_000, 5, 1000)).await.unwrap();
    let mut server = match backend {
        Backend::Postgres => Some(sqlx::PgConnection::connect(&place.url).await.unwrap()),
        Backend::Sqlite => None,
    };
    // Naks of an event nobody holds: a transaction each that changes
    // nothing (on SQLite a dropped one still runs, later, on the writer).
    const NOT_LEASED: u64 = 1_000_000;
    // How long such a nak takes here, at best of three (the first opens a
    // connection).
    let mut whole = Duration::MAX;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        q.nak("q", &[NOT_LEASED], None, Duration::ZERO)
            .await
            .unwrap();
        whole = whole.min(started.elapsed());
    }
    // Naks dropped at 500 points spread over three times that, each point
    // twice: some in the middle of their BEGIN.
    let (mut dropped, mut finished) = (0, 0);
    for step in 0..1000u32 {
        let after = whole * 3 * (step % 500) / 500;
        if dropped_after(after, q.nak("q", &[NOT_LEASED], None, Duration::ZERO)).await {
            dropped += 1;
        } else {
            finished += 1;
        }
        let Some(server) = server.as_mut() else {
            continue;
        };
        // A dropped call's rollback is sent when its connection goes back
        // to the pool (in a task of its own): soon, but not at once.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let open = idle_in_transaction(server).await;
            if open == 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{open} connection(s) still inside a transaction 5 s after a nak was \
                 dropped {after:?} into it (a whole one takes {whole:?})"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    eprintln!("{dropped} naks dropped part way, {finished} finished (a whole one: {whole:?})");
    assert!(
        dropped > 0 && finished > 0,
        "some naks dropped part way and some finished"
    );
    // What a transaction left open would do: a lease taken in it runs out
    // early. Twenty fetches, one event each, on whichever connection comes,
    // then one more: nothing is due again yet.
    let mut leased_now = Vec::new();
    for _ in 0..20 {
        leased_now.extend(fetch(&q, "q", 1).await);
    }
    assert_eq!(leased_now, (1..=20).map(|s| (s, 1)).collect::<Vec<_>>());
    let next = q.fetch("q", 100, true).await.unwrap();
    assert_eq!(next.redelivered, 0, "{:?}", leased(&next.events));
    assert_eq!(
        leased(&next.events),
        (21..=40).map(|s| (s, 1)).collect::<Vec<_>>()
    );
}
