//! The binary killed with SIGKILL in the middle of a flood of
//! notifications: every one it answered `success` is there after a
//! restart, exactly once, in a gapless sequence.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use kongtie_gateway::{
    proto::{ListNotificationsRequest, payment_client::PaymentClient},
    sandbox::signed_notification,
};
use secrecy::SecretString;

use crate::helpers::Binary;

/// The binary's default notify token is the document's token.
const TOKEN: &str = "#wugf543sxcv5*$#";

fn notification(id: &str) -> String {
    let fields = [
        ("TradeStatus", "0000"),
        ("Message", "SUCCESS"),
        ("OutTradeId", id),
        ("TradeAmount", "1.00"),
        ("TradeOrderId", id),
        ("TradeBillNo", id),
        ("TradeTime", "2018/3/2 10:00:39"),
        ("TimeStamp", "1522233465"),
    ];
    signed_notification(&fields, &SecretString::from(TOKEN))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_notification_answered_success_survives_sigkill_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut bin = Binary::start_in(&["serve"], dir.path(), None);
    let url = bin.notify_url();
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();

    let senders: Vec<_> = (0..16)
        .map(|worker| {
            let (url, http, acknowledged) = (url.clone(), http.clone(), Arc::clone(&acknowledged));
            tokio::spawn(async move {
                for i in 0.. {
                    let id = format!("W{worker}N{i}");
                    let Ok(resp) = http.post(&url).body(notification(&id)).send().await else {
                        return;
                    };
                    let ok = resp.status().as_u16() == 200;
                    match resp.text().await {
                        Ok(body) if ok && body == "success" => {
                            acknowledged.lock().unwrap().push(id)
                        }
                        _ => return,
                    }
                }
            })
        })
        .collect();

    // Kill it mid-flood, once plenty has been acknowledged.
    while acknowledged.lock().unwrap().len() < 500 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    bin.child.kill().unwrap(); // SIGKILL
    bin.child.wait().unwrap();
    for s in senders {
        s.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();

    let bin = Binary::start_in(&["serve"], dir.path(), None);
    let mut client = PaymentClient::connect(format!("http://{}", bin.grpc))
        .await
        .unwrap();
    let mut stored = Vec::new();
    let mut after = 0;
    loop {
        let page = client
            .list_notifications(ListNotificationsRequest {
                after_sequence: after,
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if page.notifications.is_empty() {
            break;
        }
        after = page.next_after_sequence;
        stored.extend(page.notifications);
    }

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
