//! The binary killed with SIGKILL in the middle of a flood of
//! notifications: every one it answered `success` is there after a
//! restart, exactly once, in a gapless sequence.

use std::collections::HashMap;

use crate::helpers::{Binary, flood, list_all, until_acknowledged};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_notification_answered_success_survives_sigkill_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut bin = Binary::start_in(&["serve"], dir.path(), None);
    let (acknowledged, senders) = flood(&bin.notify_url(), "W", 16);

    // Kill it mid-flood, once plenty has been acknowledged.
    until_acknowledged(&acknowledged, 500).await;
    bin.child.kill().unwrap(); // SIGKILL
    bin.child.wait().unwrap();
    for s in senders {
        s.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();

    let bin = Binary::start_in(&["serve"], dir.path(), None);
    let stored = list_all(&bin.grpc).await;
    let sequences: Vec<u64> = stored.iter().map(|n| n.sequence).collect();
    assert_eq!(
        sequences,
        (1..=stored.len() as u64).collect::<Vec<_>>(),
        "gapless"
    );
    let mut count: HashMap<&str, usize> = HashMap::new();
    for n in &stored {
        *count.entry(n.out_trade_id.as_str()).or_default() += 1;
        assert_eq!(n.receive_count, 1);
    }
    for id in &acknowledged {
        assert_eq!(
            count.get(id.as_str()),
            Some(&1),
            "{id} was answered success"
        );
    }
    assert!(count.values().all(|c| *c == 1));
    println!(
        "acknowledged before SIGKILL: {}, stored after restart: {}",
        acknowledged.len(),
        stored.len()
    );
}
