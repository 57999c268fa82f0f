//! One store test suite, run against both backends (notifications, consumer
//! positions and the order ledger): every test below is
//! an `async fn(Backend)`, and `store_suite!` makes a `sqlite::` and a
//! `postgres::` test of it. "Replicas" are two stores on one database; with
//! SQLite, which serves one replica, both are the same store.

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use kongtie_gateway::{
    consumers::ConsumerError,
    orders::{Begin, OrderCheck, OrderState, OrderStore, OrderTerms, Outcome, Refusal},
    store::{
        self, HeldWrite, IncomingNotification, NotificationStore, Recorded, StoreError,
        StoredNotification,
    },
};
use tokio::sync::{broadcast, oneshot};

use crate::pg::PgDatabase;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Where a test's store lives, kept for as long as the test runs.
pub struct Place {
    pub backend: Backend,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    _db: Option<PgDatabase>,
}

impl Place {
    pub async fn new(backend: Backend) -> Place {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                Place {
                    backend,
                    url: crate::helpers::store_url(dir.path()),
                    _dir: Some(dir),
                    _db: None,
                }
            }
            Backend::Postgres => {
                let db = PgDatabase::create().await;
                Place {
                    backend,
                    url: db.url.clone(),
                    _dir: None,
                    _db: Some(db),
                }
            }
        }
    }

    pub async fn open(&self) -> Arc<dyn NotificationStore> {
        store::open(&self.url, None).await.unwrap()
    }

    /// Another replica beside `first` (SQLite: `first` itself).
    pub async fn replica(&self, first: &Arc<dyn NotificationStore>) -> Arc<dyn NotificationStore> {
        match self.backend {
            Backend::Sqlite => Arc::clone(first),
            Backend::Postgres => self.open().await,
        }
    }
}

macro_rules! store_suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Postgres).await
                }
            )*
        }
    };
}

store_suite!(
    sequences_are_gapless_and_a_repeat_is_one_event,
    resends_racing_on_two_replicas_are_one_event,
    writers_on_two_replicas_share_one_gapless_order,
    every_replica_feeds_every_event_in_order,
    acknowledgements_are_cumulative_durable_and_shared,
    a_writer_that_commits_late_is_not_skipped,
    a_rolled_back_writer_stalls_no_one,
    a_notification_the_database_refuses_fails_alone,
    an_order_claimed_on_one_replica_is_waited_for_on_another,
    racing_first_attempts_on_two_replicas_send_once,
    each_new_notification_is_checked_and_a_match_pays_for_good,
    consumers_are_seen_with_their_lag_and_can_be_forgotten,
    a_store_left_by_the_previous_release_opens_and_carries_on,
);

pub fn incoming(id: &str) -> IncomingNotification {
    IncomingNotification {
        trade_status: "0000".into(),
        message: "SUCCESS".into(),
        out_trade_id: id.into(),
        trade_amount: "0.20".into(),
        amount_fen: Some(20),
        trade_order_id: format!("984_{id}"),
        trade_bill_no: format!("bill-{id}"),
        trade_time: "2018/3/2 10:00:39".into(),
        time_stamp: "1522233465".into(),
        raw_body: format!(r#"{{"OutTradeId":"{id}"}}"#),
        received_at: Utc::now(),
    }
}

fn sequences(events: &[StoredNotification]) -> Vec<u64> {
    events.iter().map(|n| n.sequence).collect()
}

/// The next `n` events of a live feed, within a few seconds.
async fn next_events(
    feed: &mut broadcast::Receiver<Arc<StoredNotification>>,
    n: usize,
) -> Vec<StoredNotification> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let event = tokio::time::timeout(Duration::from_secs(5), feed.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} events arrived", got.len()))
            .expect("the feed neither lags nor closes");
        got.push((*event).clone());
    }
    got
}

/// Starts a held write of `id` on `store`; returns once it is done and
/// waiting to commit, with the sender that decides and its outcome.
async fn hold(
    store: &Arc<dyn NotificationStore>,
    id: &str,
) -> (
    oneshot::Sender<bool>,
    tokio::task::JoinHandle<Result<Recorded, StoreError>>,
) {
    let (held, is_held) = oneshot::channel();
    let (release, released) = oneshot::channel();
    let store = Arc::clone(store);
    let n = incoming(id);
    let outcome = tokio::spawn(async move {
        let hold = HeldWrite {
            held,
            release: released,
        };
        store.record_held(n, hold).await
    });
    is_held.await.expect("the held write reached its commit");
    (release, outcome)
}

async fn sequences_are_gapless_and_a_repeat_is_one_event(backend: Backend) {
    let place = Place::new(backend).await;
    let store = place.open().await;
    for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
        let recorded = store.record(incoming(id)).await.unwrap();
        assert_eq!(recorded, new_event(i as u64 + 1));
    }
    // A resend differs only in TimeStamp (and Sign): the same event.
    let mut again = incoming("b");
    again.time_stamp = "1522233999".into();
    assert_eq!(
        store.record(again).await.unwrap(),
        Recorded::Repeat {
            sequence: 2,
            receive_count: 2
        }
    );
    let all = store.list(0, None, 10).await.unwrap();
    assert_eq!(sequences(&all), [1, 2, 3]);
    assert_eq!(
        all.iter().map(|n| n.receive_count).collect::<Vec<_>>(),
        [1, 2, 1]
    );
    assert_eq!(all[1].out_trade_id, "b");
    assert_eq!(all[1].amount_fen, Some(20));
    assert_eq!(all[1].trade_amount, "0.20");
    assert_eq!(sequences(&store.list(1, None, 1).await.unwrap()), [2]);
    assert_eq!(sequences(&store.list(0, Some("c"), 10).await.unwrap()), [3]);
    assert_eq!(store.last_sequence().await.unwrap(), 3);
    store.close().await;
}

async fn resends_racing_on_two_replicas_are_one_event(backend: Backend) {
    let place = Place::new(backend).await;
    let first = place.open().await;
    let second = place.replica(&first).await;
    let sends: Vec<_> = (0..40)
        .map(|i| {
            let store = Arc::clone(if i % 2 == 0 { &first } else { &second });
            tokio::spawn(async move { store.record(incoming("same")).await.unwrap() })
        })
        .collect();
    let mut new = 0;
    let mut counts = Vec::new();
    for send in sends {
        match send.await.unwrap() {
            Recorded::New { sequence, .. } => {
                assert_eq!(sequence, 1);
                new += 1;
            }
            Recorded::Repeat {
                sequence,
                receive_count,
            } => {
                assert_eq!(sequence, 1);
                counts.push(receive_count);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(new, 1, "exactly one send makes the event");
    counts.sort_unstable();
    assert_eq!(
        counts,
        (2..=40).collect::<Vec<u32>>(),
        "each repeat counted once"
    );
    let stored = second.list(0, None, 10).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].receive_count, 40);
    first.close().await;
    second.close().await;
}

async fn writers_on_two_replicas_share_one_gapless_order(backend: Backend) {
    let place = Place::new(backend).await;
    let first = place.open().await;
    let second = place.replica(&first).await;
    let sends: Vec<_> = (0..300)
        .map(|i| {
            let store = Arc::clone(if i % 2 == 0 { &first } else { &second });
            tokio::spawn(async move { store.record(incoming(&format!("n{i}"))).await.unwrap() })
        })
        .collect();
    let mut given = Vec::new();
    for send in sends {
        match send.await.unwrap() {
            Recorded::New { sequence, .. } => given.push(sequence),
            other => panic!("distinct notifications are new events, got {other:?}"),
        }
    }
    given.sort_unstable();
    assert_eq!(given, (1..=300).collect::<Vec<u64>>(), "each number once");
    let stored = first.list(0, None, 1000).await.unwrap();
    assert_eq!(sequences(&stored), (1..=300).collect::<Vec<u64>>());
    assert_eq!(second.last_sequence().await.unwrap(), 300);
    first.close().await;
    second.close().await;
}

async fn every_replica_feeds_every_event_in_order(backend: Backend) {
    let place = Place::new(backend).await;
    let first = place.open().await;
    let second = place.replica(&first).await;
    let mut feeds = [first.subscribe(), second.subscribe()];
    let sends: Vec<_> = (0..200)
        .map(|i| {
            let store = Arc::clone(if i % 2 == 0 { &first } else { &second });
            tokio::spawn(async move { store.record(incoming(&format!("n{i}"))).await.unwrap() })
        })
        .collect();
    for send in sends {
        send.await.unwrap();
    }
    let stored = first.list(0, None, 1000).await.unwrap();
    assert_eq!(stored.len(), 200);
    for feed in &mut feeds {
        let events = next_events(feed, 200).await;
        assert_eq!(sequences(&events), (1..=200).collect::<Vec<u64>>());
        assert_eq!(events, stored, "the feed carries what the table holds");
    }
    first.close().await;
    second.close().await;
    // Closing ends the feed.
    let mut closed = first.subscribe();
    assert!(matches!(
        closed.recv().await,
        Err(broadcast::error::RecvError::Closed)
    ));
}

/// A cursor's acknowledged position (0 when it has none).
async fn acked(store: &Arc<dyn NotificationStore>, name: &str) -> u64 {
    store
        .consumers()
        .get(name)
        .await
        .unwrap()
        .map_or(0, |c| c.acked_sequence)
}

async fn acknowledgements_are_cumulative_durable_and_shared(backend: Backend) {
    let place = Place::new(backend).await;
    let first = place.open().await;
    let second = place.replica(&first).await;
    for i in 0..5 {
        first.record(incoming(&format!("n{i}"))).await.unwrap();
    }
    assert_eq!(acked(&first, "billing").await, 0);
    assert_eq!(first.consumers().ack_cursor("billing", 3).await.unwrap(), 3);
    assert_eq!(
        second.consumers().ack_cursor("billing", 2).await.unwrap(),
        3,
        "never backwards"
    );
    assert_eq!(acked(&second, "billing").await, 3, "shared");
    assert!(matches!(
        second.consumers().ack_cursor("billing", 6).await,
        Err(ConsumerError::Store(StoreError::BeyondLast {
            requested: 6,
            last: 5
        }))
    ));
    assert_eq!(second.consumers().ack_cursor("audit", 5).await.unwrap(), 5);
    first.close().await;
    second.close().await;

    // Everything is still there after a restart, and numbering goes on.
    let reopened = place.open().await;
    assert_eq!(acked(&reopened, "billing").await, 3);
    assert_eq!(acked(&reopened, "audit").await, 5);
    assert_eq!(reopened.last_sequence().await.unwrap(), 5);
    assert_eq!(
        reopened.record(incoming("later")).await.unwrap(),
        new_event(6)
    );
    reopened.close().await;
}

/// The event-store hazard: writer A takes sequence 1, writer B takes 2 and
/// commits first; a reader that sees 2 moves past 1 before A commits, and
/// never sees it. Here B cannot take a number while A holds one, so every
/// reader sees 1 before 2.
async fn a_writer_that_commits_late_is_not_skipped(backend: Backend) {
    let place = Place::new(backend).await;
    let first = place.open().await;
    let second = place.replica(&first).await;
    let mut feed = second.subscribe();

    let (release, slow) = hold(&first, "slow").await;
    let fast = {
        let second = Arc::clone(&second);
        tokio::spawn(async move { second.record(incoming("fast")).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !fast.is_finished(),
        "the fast writer waits for the slow one's sequence to commit"
    );
    assert!(second.list(0, None, 10).await.unwrap().is_empty());
    assert_eq!(second.last_sequence().await.unwrap(), 0);
    assert!(
        feed.try_recv().is_err(),
        "nothing is published before commit"
    );

    release.send(true).unwrap();
    assert_eq!(slow.await.unwrap().unwrap(), new_event(1));
    assert_eq!(fast.await.unwrap().unwrap(), new_event(2));
    let events = next_events(&mut feed, 2).await;
    assert_eq!(sequences(&events), [1, 2]);
    assert_eq!(events[0].out_trade_id, "slow");
    assert_eq!(events[1].out_trade_id, "fast");
    first.close().await;
    second.close().await;
}

async fn a_rolled_back_writer_stalls_no_one(backend: Backend) {
    let place = Place::new(backend).await;
    let first = place.open().await;
    let second = place.replica(&first).await;
    let mut feed = second.subscribe();

    let (release, doomed) = hold(&first, "doomed").await;
    let fast = {
        let second = Arc::clone(&second);
        tokio::spawn(async move { second.record(incoming("fast")).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    release.send(false).unwrap();
    assert!(matches!(doomed.await.unwrap(), Err(StoreError::RolledBack)));
    // The number the rolled-back writer held is handed on: no gap.
    let fast = tokio::time::timeout(Duration::from_secs(2), fast)
        .await
        .expect("the fast writer goes on at once")
        .unwrap()
        .unwrap();
    assert_eq!(fast, new_event(1));
    let events = next_events(&mut feed, 1).await;
    assert_eq!(events[0].out_trade_id, "fast");
    assert_eq!(first.record(incoming("next")).await.unwrap(), new_event(2));
    let stored = first.list(0, None, 10).await.unwrap();
    assert_eq!(
        stored
            .iter()
            .map(|n| n.out_trade_id.as_str())
            .collect::<Vec<_>>(),
        ["fast", "next"]
    );
    first.close().await;
    second.close().await;
}

/// A write the database refuses (PostgreSQL's text holds no NUL; the
/// listener refuses those before they get here) fails alone, not the
/// writes it was grouped with.
async fn a_notification_the_database_refuses_fails_alone(backend: Backend) {
    let place = Place::new(backend).await;
    let store = place.open().await;
    let sends: Vec<_> = (0..50)
        .map(|i| {
            let store = Arc::clone(&store);
            let mut n = incoming(&format!("n{i}"));
            if i == 25 {
                n.message = "bad\0message".into();
            }
            tokio::spawn(async move { (i, store.record(n).await) })
        })
        .collect();
    let mut stored = 0;
    for send in sends {
        let (i, result) = send.await.unwrap();
        match result {
            Ok(Recorded::New { .. }) => stored += 1,
            Err(_) if i == 25 && backend == Backend::Postgres => {}
            other => panic!("send {i}: {other:?}"),
        }
    }
    let expected = if backend == Backend::Postgres { 49 } else { 50 };
    assert_eq!(stored, expected);
    let list = store.list(0, None, 100).await.unwrap();
    assert_eq!(sequences(&list), (1..=expected as u64).collect::<Vec<_>>());
    store.close().await;
}

// PostgreSQL only: several replicas.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_apply_the_migrations_once() {
    let place = Place::new(Backend::Postgres).await;
    let opened = futures::future::join_all((0..4).map(|_| store::open(&place.url, None))).await;
    let stores: Vec<_> = opened
        .into_iter()
        .map(|s| s.expect("every replica starts"))
        .collect();
    stores[0].record(incoming("one")).await.unwrap();
    for store in &stores {
        assert_eq!(store.last_sequence().await.unwrap(), 1);
        store.close().await;
    }
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&place.url)
        .await
        .unwrap();
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    // Each migration once (0001 notifications, 0002 orders, 0003 consumers,
    // 0004 retention, 0005 tombstones).
    assert_eq!(applied, 5);
}

/// A hint lost while the listening connection was down is made up for:
/// the listener reconnects and the tailer reads, and polls meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_listener_was_cut_off_still_feeds_every_event() {
    let place = Place::new(Backend::Postgres).await;
    let first = place.open().await;
    let second = place.open().await;
    let mut feed = second.subscribe();
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&place.url)
        .await
        .unwrap();
    let terminate = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE datname = current_database() AND query LIKE 'LISTEN%'";
    // Both replicas listen; cut both off, then write while they reconnect.
    // Until both are found listening (10 s at most), then cut together.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let cut: i64 = sqlx::query_scalar(terminate)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        if cut == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "both listening connections were not found to cut ({cut})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..3 {
        first.record(incoming(&format!("n{i}"))).await.unwrap();
    }
    let events = next_events(&mut feed, 3).await;
    assert_eq!(sequences(&events), [1, 2, 3]);
    first.close().await;
    second.close().await;
}

/// A replica that stalls inside a transaction holds the sequencer, so the
/// server ends such sessions (`idle_in_transaction_session_timeout`, 10 s
/// by default; a URL's own setting wins, as here) and the fleet goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stalled_inside_a_transaction_is_cut_off_and_the_fleet_goes_on() {
    let place = Place::new(Backend::Postgres).await;
    let mut url = url::Url::parse(&place.url).unwrap();
    url.query_pairs_mut()
        .append_pair("options[idle_in_transaction_session_timeout]", "300ms");
    let stalled = store::open(url.as_str(), None).await.unwrap();
    let other = place.open().await;

    let (release, held) = hold(&stalled, "stalled").await;
    let started = std::time::Instant::now();
    let fast = tokio::time::timeout(Duration::from_secs(5), other.record(incoming("fast")))
        .await
        .expect("the server ended the stalled session")
        .unwrap();
    assert_eq!(fast, new_event(1));
    assert!(started.elapsed() >= Duration::from_millis(200));
    // The stalled writer learns its transaction is gone when it goes on.
    let _ = release.send(true);
    assert!(held.await.unwrap().is_err(), "its write did not commit");
    let stored = other.list(0, None, 10).await.unwrap();
    assert_eq!(sequences(&stored), [1]);
    assert_eq!(stored[0].out_trade_id, "fast");
    stalled.close().await;
    other.close().await;
}

/// A new event of an order the ledger does not know (the store tests
/// create none).
fn new_event(sequence: u64) -> Recorded {
    Recorded::New {
        sequence,
        order_check: kongtie_gateway::orders::OrderCheck::UnknownOrder,
    }
}

fn order_terms(id: &str, amount_fen: i64) -> OrderTerms {
    OrderTerms {
        out_trade_id: id.into(),
        amount_fen,
        openid: "o1".into(),
        expires_at: Utc::now() + chrono::Duration::minutes(30),
        explicit_expiry: false,
    }
}

const PREPAY_TTL: Duration = Duration::from_secs(6600);

/// `begin` for `terms` now, as `claimant`, with a 30 s claim.
async fn begin(
    orders: &Arc<dyn OrderStore>,
    terms: &OrderTerms,
    claimant: &str,
    waited: Option<u32>,
) -> Begin {
    let now = Utc::now();
    orders
        .begin(
            terms,
            now,
            PREPAY_TTL,
            waited,
            claimant,
            now + chrono::Duration::seconds(30),
        )
        .await
        .unwrap()
}

async fn an_order_claimed_on_one_replica_is_waited_for_on_another(backend: Backend) {
    let place = Place::new(backend).await;
    let a = place.open().await;
    let b = place.replica(&a).await;
    let terms = order_terms("O1", 20);
    assert_eq!(
        begin(&a.orders(), &terms, "a", None).await,
        Begin::Send { attempt: 1 }
    );
    assert_eq!(
        begin(&b.orders(), &terms, "b", None).await,
        Begin::Wait { attempt: 1 }
    );
    let created = Outcome::Created {
        response_text: "{}".into(),
    };
    a.orders()
        .finish("O1", "a", 1, &created, Utc::now())
        .await
        .unwrap();
    assert_eq!(
        begin(&b.orders(), &terms, "b", Some(1)).await,
        Begin::Replay("{}".into())
    );
    // A finish of an attempt that no longer holds the claim changes nothing.
    a.orders()
        .finish("O1", "a", 1, &Outcome::Unknown, Utc::now())
        .await
        .unwrap();
    let stored = b.orders().get("O1").await.unwrap().unwrap();
    assert_eq!(stored.state, OrderState::Created);
    assert_eq!(stored.attempts, 1);
    assert_eq!(stored.claim, None);
}

async fn racing_first_attempts_on_two_replicas_send_once(backend: Backend) {
    let place = Place::new(backend).await;
    let a = place.open().await;
    let b = place.replica(&a).await;
    const RACERS: usize = 40;
    // Rounds of racers on new orders: one round may not happen to overlap
    // at the database; ten do.
    for round in 0..10 {
        let id = format!("R{round}");
        let start = Arc::new(tokio::sync::Barrier::new(RACERS));
        let racers: Vec<_> = (0..RACERS)
            .map(|i| {
                let orders = if i % 2 == 0 { a.orders() } else { b.orders() };
                let (start, id) = (Arc::clone(&start), id.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    begin(&orders, &order_terms(&id, 20), &format!("r{i}"), None).await
                })
            })
            .collect();
        let mut sends = 0;
        for racer in racers {
            match racer.await.unwrap() {
                Begin::Send { attempt } => {
                    assert_eq!(attempt, 1);
                    sends += 1;
                }
                Begin::Wait { attempt: 1 } => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(sends, 1, "round {round}: one caller holds the claim");
    }
}

async fn each_new_notification_is_checked_and_a_match_pays_for_good(backend: Backend) {
    let place = Place::new(backend).await;
    let store = place.open().await;
    let orders = store.orders();
    for (id, fen) in [("O3", 20), ("O4", 30)] {
        let terms = order_terms(id, fen);
        assert_eq!(
            begin(&orders, &terms, "a", None).await,
            Begin::Send { attempt: 1 }
        );
    }
    // O4's attempt is still in flight when its payment comes, O3's not.
    let created = Outcome::Created {
        response_text: "{}".into(),
    };
    orders
        .finish("O3", "a", 1, &created, Utc::now())
        .await
        .unwrap();
    let checks = [
        ("O3", OrderCheck::Matched),        // 0.20 for 20 fen
        ("O4", OrderCheck::AmountMismatch), // 0.20 for 30 fen
        ("O5", OrderCheck::UnknownOrder),
    ];
    for (i, (id, check)) in checks.iter().enumerate() {
        assert_eq!(
            store.record(incoming(id)).await.unwrap(),
            Recorded::New {
                sequence: i as u64 + 1,
                order_check: *check
            }
        );
    }
    let listed = store.list(0, None, 10).await.unwrap();
    let listed: Vec<_> = listed.iter().map(|n| n.order_check).collect();
    assert_eq!(
        listed,
        checks.iter().map(|(_, c)| Some(*c)).collect::<Vec<_>>()
    );
    let paid = orders.get("O3").await.unwrap().unwrap();
    assert_eq!(
        (paid.state, paid.paid_sequence),
        (OrderState::Paid, Some(1))
    );
    assert_eq!(
        orders.get("O4").await.unwrap().unwrap().state,
        OrderState::Unknown
    );
    // A payment that comes while an attempt is in flight stands: the
    // attempt ending afterwards does not take the order back.
    assert_eq!(
        begin(&orders, &order_terms("O6", 20), "a", None).await,
        Begin::Send { attempt: 1 }
    );
    store.record(incoming("O6")).await.unwrap();
    orders
        .finish("O6", "a", 1, &created, Utc::now())
        .await
        .unwrap();
    let o6 = orders.get("O6").await.unwrap().unwrap();
    assert_eq!((o6.state, o6.paid_sequence), (OrderState::Paid, Some(4)));
    assert_eq!(o6.claim, None);
    assert_eq!(
        begin(&orders, &order_terms("O6", 20), "a", None).await,
        Begin::Refused(Refusal::AlreadyPaid)
    );
}

async fn consumers_are_seen_with_their_lag_and_can_be_forgotten(backend: Backend) {
    let place = Place::new(backend).await;
    let a = place.open().await;
    let b = place.replica(&a).await;
    for id in ["c1", "c2", "c3"] {
        a.record(incoming(id)).await.unwrap();
    }
    a.consumers().ack_cursor("billing", 1).await.unwrap();
    a.consumers().ack_cursor("audit", 3).await.unwrap();
    // Seen the same from every replica.
    let consumers = b.consumers();
    let billing = consumers.get("billing").await.unwrap().unwrap();
    assert_eq!((billing.acked_sequence, billing.lag), (1, 2));
    assert!(billing.last_ack_at.is_some_and(|at| at <= Utc::now()));
    assert_eq!(consumers.get("nobody").await.unwrap(), None);
    let page = consumers.list("", 1).await.unwrap();
    let names: Vec<&str> = page.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["audit"]);
    let rest = consumers.list("audit", 10).await.unwrap();
    let names: Vec<&str> = rest.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["billing"]);
    assert_eq!(rest[0].lag, 2);
    // A new event raises every lag.
    a.record(incoming("c4")).await.unwrap();
    assert_eq!(consumers.get("audit").await.unwrap().unwrap().lag, 1);

    assert!(consumers.delete("billing").await.unwrap());
    assert!(!consumers.delete("billing").await.unwrap());
    assert_eq!(acked(&a, "billing").await, 0, "forgotten");
    assert_eq!(consumers.list("", 10).await.unwrap().len(), 1);
}

/// The SQLite migrations and PostgreSQL migration files of the release
/// before tombstones (issue 24): a store it left is what upgrades meet.
const PREVIOUS_SQLITE_VERSION: usize = 5;
const PREVIOUS_POSTGRES_FILES: &[&str] = &[
    "0001_notifications.sql",
    "0002_orders.sql",
    "0003_consumers.sql",
    "0004_retention.sql",
];

/// Builds, at `place`, the store the previous release left after two
/// notifications (the first paying order OLD, two days ago) and that order.
async fn previous_release_store(place: &Place) {
    let old = incoming("OLD");
    let later = incoming("OLD2");
    let two_days_ago = Utc::now() - chrono::Duration::days(2);
    match place.backend {
        Backend::Sqlite => {
            let path = place.url.strip_prefix("sqlite://").unwrap();
            let conn = rusqlite::Connection::open(path).unwrap();
            conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
                .unwrap();
            conn.pragma_update(None, "journal_mode", "WAL").unwrap();
            for migration in &store::sqlite_migrations()[..PREVIOUS_SQLITE_VERSION] {
                conn.execute_batch(migration).unwrap();
            }
            conn.pragma_update(None, "user_version", PREVIOUS_SQLITE_VERSION)
                .unwrap();
            let at = two_days_ago.timestamp_millis();
            for (sequence, n) in [(1, &old), (2, &later)] {
                conn.execute(
                    "INSERT INTO notifications (sequence, dedup_key, out_trade_id, trade_order_id, \
                     trade_bill_no, trade_status, message, trade_amount, amount_fen, trade_time, \
                     time_stamp, raw_body, received_at_ms, last_received_at_ms, receive_count, \
                     order_check) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, \
                     ?13, 1, 'MATCHED')",
                    rusqlite::params![
                        sequence,
                        n.dedup_key(),
                        n.out_trade_id,
                        n.trade_order_id,
                        n.trade_bill_no,
                        n.trade_status,
                        n.message,
                        n.trade_amount,
                        n.amount_fen,
                        n.trade_time,
                        n.time_stamp,
                        n.raw_body,
                        at + sequence,
                    ],
                )
                .unwrap();
            }
            conn.execute(
                "INSERT INTO orders (out_trade_id, amount_fen, openid, expires_at_ms, \
                 created_at_ms, state, paid_sequence, attempts, updated_at_ms) \
                 VALUES ('OLD', 20, 'o1', ?1, ?1, 'PAID', 1, 1, ?1)",
                [at],
            )
            .unwrap();
        }
        Backend::Postgres => {
            let dir = tempfile::tempdir().unwrap();
            let files = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/postgres");
            for file in PREVIOUS_POSTGRES_FILES {
                std::fs::copy(format!("{files}/{file}"), dir.path().join(file)).unwrap();
            }
            let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&place.url)
                .await
                .unwrap();
            sqlx::migrate::Migrator::new(dir.path())
                .await
                .unwrap()
                .run(&mut conn)
                .await
                .unwrap();
            for (sequence, n) in [(1_i64, &old), (2, &later)] {
                sqlx::query(
                    "INSERT INTO notifications (sequence, dedup_digest, out_trade_id, \
                     trade_order_id, trade_bill_no, trade_status, message, trade_amount, \
                     amount_fen, trade_time, time_stamp, raw_body, received_at, \
                     last_received_at, receive_count, order_check) VALUES ($1, $2, $3, $4, $5, \
                     $6, $7, $8, $9, $10, $11, $12, $13, $13, 1, 'MATCHED')",
                )
                .bind(sequence)
                .bind(n.dedup_digest())
                .bind(&n.out_trade_id)
                .bind(&n.trade_order_id)
                .bind(&n.trade_bill_no)
                .bind(&n.trade_status)
                .bind(&n.message)
                .bind(&n.trade_amount)
                .bind(n.amount_fen)
                .bind(&n.trade_time)
                .bind(&n.time_stamp)
                .bind(&n.raw_body)
                .bind(two_days_ago + chrono::Duration::milliseconds(sequence))
                .execute(&mut conn)
                .await
                .unwrap();
            }
            sqlx::query("UPDATE notification_sequence SET last = 2")
                .execute(&mut conn)
                .await
                .unwrap();
            sqlx::query(
                "INSERT INTO orders (out_trade_id, amount_fen, openid, expires_at, created_at, \
                 state, paid_sequence, attempts, updated_at) \
                 VALUES ('OLD', 20, 'o1', $1, $1, 'PAID', 1, 1, $1)",
            )
            .bind(two_days_ago)
            .execute(&mut conn)
            .await
            .unwrap();
        }
    }
}

/// A store as the previous release left it opens (the tombstone tables
/// are added), keeps its events, order and sequence, and carries on: the
/// old payment's resend is a repeat before and after a sweep, and its id
/// cannot be ordered again once swept.
async fn a_store_left_by_the_previous_release_opens_and_carries_on(backend: Backend) {
    let place = Place::new(backend).await;
    previous_release_store(&place).await;
    let store = place.open().await;
    assert_eq!(store.last_sequence().await.unwrap(), 2);
    assert_eq!(sequences(&store.list(0, None, 10).await.unwrap()), [1, 2]);
    assert_eq!(
        store.orders().get("OLD").await.unwrap().unwrap().state,
        OrderState::Paid
    );
    assert_eq!(
        store.record(incoming("OLD")).await.unwrap(),
        Recorded::Repeat {
            sequence: 1,
            receive_count: 2
        }
    );
    let yesterday = Utc::now() - chrono::Duration::days(1);
    let swept = store
        .retention()
        .sweep(
            kongtie_gateway::retention::Cutoffs {
                keep_before: yesterday,
                hard_before: yesterday,
            },
            500,
        )
        .await
        .unwrap();
    assert_eq!((swept.notifications, swept.orders), (1, 1));
    assert_eq!(
        store.record(incoming("OLD")).await.unwrap(),
        Recorded::RepeatOfSwept { sequence: 1 }
    );
    assert!(matches!(
        store.record(incoming("NEW")).await.unwrap(),
        Recorded::New { sequence: 3, .. }
    ));
    assert_eq!(
        begin(&store.orders(), &order_terms("OLD", 20), "t", None).await,
        Begin::Refused(Refusal::AlreadyPaid)
    );
    store.close().await;
}

// SQLite only: its read pool.

/// 256 `ListNotifications` cancelled mid-read (their clients give up after
/// a few milliseconds, while each reads a page of 8 MB): the reads still
/// running hold their turns, so no more than the pool's four ever run at
/// once (`kongtie_store_reads_running_peak`), and every one ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_reads_never_run_more_sqlite_queries_at_once_than_the_pool_holds() {
    use kongtie_gateway::proto::ListNotificationsRequest;

    let dir = tempfile::tempdir().unwrap();
    let url = crate::helpers::store_url(dir.path());
    // A thousand events of 8 KiB each: a full page takes a while to read.
    let store = store::open(&url, None).await.unwrap();
    let writes: Vec<_> = (0..1000)
        .map(|i| {
            let store = Arc::clone(&store);
            let mut n = incoming(&format!("big{i}"));
            n.message = "m".repeat(8 << 10);
            tokio::spawn(async move { store.record(n).await.unwrap() })
        })
        .collect();
    for write in writes {
        write.await.unwrap();
    }
    store.close().await;

    let app = crate::helpers::spawn_app_with(&["--store", &url]).await;
    let admin = app.admin.to_string();
    let metric = |series: &'static str| {
        let admin = admin.clone();
        async move { crate::helpers::sample(&crate::helpers::admin_metrics(&admin).await, series) }
    };
    let channel = app.channel().await;
    let page = ListNotificationsRequest {
        page_size: 1000,
        ..Default::default()
    };
    // How long one read takes here: the calls are given up within it.
    let mut payment = kongtie_gateway::proto::payment_client::PaymentClient::new(channel.clone());
    let started = std::time::Instant::now();
    payment.list_notifications(page).await.unwrap();
    let read = started.elapsed();
    let calls: Vec<_> = (0..256u32)
        .map(|i| {
            let mut payment =
                kongtie_gateway::proto::payment_client::PaymentClient::new(channel.clone());
            tokio::spawn(async move {
                let list = payment.list_notifications(ListNotificationsRequest {
                    page_size: 1000,
                    ..Default::default()
                });
                // Given up an eighth to all of one read's time in: after
                // the call started reading, for most.
                tokio::time::timeout(read * (1 + i % 8) / 8, list)
                    .await
                    .is_err()
            })
        })
        .collect();
    let mut cancelled = 0;
    for call in calls {
        cancelled += usize::from(call.await.unwrap());
    }
    assert!(cancelled > 128, "only {cancelled} of 256 were cancelled");
    // Every read ends (within 30 s), cancelled or not.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while metric("kongtie_store_reads_running").await > 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "reads still running after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let peak = metric("kongtie_store_reads_running_peak").await;
    assert!(
        peak <= 4.0,
        "{peak} reads ran at once, over the pool's 4 (one read takes {read:?})"
    );
    println!("{cancelled} calls cancelled; at most {peak} reads at once; one read takes {read:?}");
}

/// A side connection (the ledger's, the consumers', retention's): callers
/// who give up while waiting for their turn, or while their query runs,
/// leave no orphaned queries queued behind it. 64 callers, each giving up
/// a millisecond after the one before, while the first one's query (100 ms)
/// runs: only that query runs, and a caller after them is served at once,
/// not after 63 orphans (6 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_give_up_leave_no_queries_queued_on_a_sqlite_side_connection() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    let dir = tempfile::tempdir().unwrap();
    let side = Arc::new(store::SideConnection::open(&dir.path().join("side.db")).unwrap());
    let ran = Arc::new(AtomicUsize::new(0));
    let callers: Vec<_> = (0..64u64)
        .map(|i| {
            let (side, ran) = (Arc::clone(&side), Arc::clone(&ran));
            tokio::spawn(async move {
                let query = side.with(move |conn| {
                    ran.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(100));
                    conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                });
                tokio::time::timeout(Duration::from_millis(1 + i), query)
                    .await
                    .is_err()
            })
        })
        .collect();
    let mut gave_up = 0;
    for caller in callers {
        gave_up += usize::from(caller.await.unwrap());
    }
    assert!(gave_up >= 60, "only {gave_up} of 64 gave up");
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        side.with(|conn| conn.query_row("SELECT 2", [], |r| r.get::<_, i64>(0))),
    )
    .await
    .expect("served within 10 s")
    .unwrap();
    assert_eq!(answer, 2);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(1),
        "the next caller waited {waited:?}, behind {} orphaned queries",
        ran.load(Ordering::SeqCst)
    );
    assert!(ran.load(Ordering::SeqCst) <= 1, "only the first query ran");
}
