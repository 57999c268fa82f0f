//! The binary killed with SIGKILL in the middle of a flood of
//! notifications: every one it answered `success` is there after a
//! restart, exactly once, in a gapless sequence.

use crate::helpers::{Binary, assert_each_acknowledged_stored_once, kill_mid_flood, list_all};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_notification_answered_success_survives_sigkill_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut bin = Binary::start_in(&["serve"], dir.path(), None);
    // Kill it mid-flood, once plenty has been acknowledged.
    let acknowledged = kill_mid_flood(&mut bin, "W", 500).await;

    let bin = Binary::start_in(&["serve"], dir.path(), None);
    let stored = list_all(&bin.grpc).await;
    assert_each_acknowledged_stored_once(&stored, &acknowledged);
    println!(
        "acknowledged before SIGKILL: {}, stored after restart: {}",
        acknowledged.len(),
        stored.len()
    );
}
