//! The binary killed with SIGKILL in the middle of a flood of
//! notifications: every one it answered `success` is there after a
//! restart, exactly once, in a gapless sequence.

use crate::helpers::{
    Binary, assert_each_acknowledged_stored_once, kill_mid_flood, list_all, test_store_args,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_notification_answered_success_survives_sigkill_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    // SQLite, or PostgreSQL with KONGTIE_TEST_STORE=postgres.
    let store = test_store_args(dir.path());
    let args: Vec<&str> = ["serve"]
        .into_iter()
        .chain(store.iter().map(String::as_str))
        .collect();
    let mut bin = Binary::start_in(&args, dir.path(), None);
    // Kill it mid-flood, once plenty has been acknowledged.
    let acknowledged = kill_mid_flood(&mut bin, "W", 500).await;

    let bin = Binary::start_in(&args, dir.path(), None);
    let stored = list_all(&bin.grpc).await;
    assert_each_acknowledged_stored_once(&stored, &acknowledged);
    // On PostgreSQL, nothing went to a SQLite file.
    assert_eq!(
        dir.path().join("notifications.db").exists(),
        store.is_empty()
    );
    println!(
        "acknowledged before SIGKILL: {}, stored after restart: {}",
        acknowledged.len(),
        stored.len()
    );
}
