//! The notify sender: a paid order's signed notification, POSTed to the
//! notify URL and resent on Kongtie's schedule until it is answered
//! `success`.

use std::{sync::Arc, time::Duration};

use secrecy::SecretString;
use tracing::info;
use url::Url;

use super::state::Shared;

/// Kongtie's resend schedule is not documented; this one is quick enough
/// for a demo and still ten sends.
pub const DEFAULT_RESEND_DELAYS: [Duration; 10] = [
    Duration::from_secs(0),
    Duration::from_secs(2),
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(30),
    Duration::from_secs(60),
    Duration::from_secs(120),
    Duration::from_secs(300),
    Duration::from_secs(600),
    Duration::from_secs(1800),
];

/// One send of a payment notification and how it was answered.
#[derive(Debug, Clone)]
pub struct NotifyAttempt {
    pub out_trade_id: String,
    /// 1 for the first send.
    pub attempt: usize,
    /// HTTP status, or none when the request failed.
    pub status: Option<u16>,
    /// True when answered `200 success`.
    pub acknowledged: bool,
    /// The `Sign` it carried, so tests can look for it where it must not be
    /// (kept in memory only, never logged).
    pub sign: String,
}

/// A notification body: the fields and their `Sign`, as Kongtie sends it.
pub fn signed_notification(fields: &[(&str, &str)], token: &SecretString) -> String {
    let mut body = serde_json::Map::new();
    for (k, v) in fields {
        body.insert((*k).to_owned(), (*v).into());
    }
    body.insert(
        "Sign".into(),
        crate::upstream::sign::sign(fields, token).into(),
    );
    serde_json::Value::Object(body).to_string()
}

pub(super) async fn send_until_acknowledged(
    shared: Arc<Shared>,
    out_trade_id: String,
    url: Url,
    body: String,
) {
    let delays = shared.config.resend_delays.clone();
    let sends = delays.len();
    let sign = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|b| b["Sign"].as_str().map(str::to_owned))
        .unwrap_or_default();
    for (i, delay) in delays.into_iter().enumerate() {
        tokio::time::sleep(delay).await;
        let answer = shared
            .http
            .post(url.clone())
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await;
        let (status, acknowledged) = match answer {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let text = resp.text().await.unwrap_or_default();
                (Some(status), status == 200 && text.trim() == "success")
            }
            Err(_) => (None, false),
        };
        info!(
            out_trade_id,
            attempt = i + 1,
            status,
            acknowledged,
            "sandbox notify attempt"
        );
        shared.lock().notify_attempts.push(NotifyAttempt {
            out_trade_id: out_trade_id.clone(),
            attempt: i + 1,
            status,
            acknowledged,
            sign: sign.clone(),
        });
        if acknowledged {
            return;
        }
    }
    tracing::warn!(out_trade_id, sends, "sandbox gave up notifying");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schedule the README gives is the one the sandbox keeps.
    #[test]
    fn the_default_resend_schedule_is_the_readmes() {
        let readme = include_str!("../../README.md").replace('\n', " ");
        let start = readme
            .find("ten sends at most (the wait before each: ")
            .expect("the README gives the schedule")
            + "ten sends at most (the wait before each: ".len();
        let text = &readme[start..start + readme[start..].find(')').unwrap()];
        // "0 s, 2 s, 5 s, 10 s, 30 s, 1, 2, 5, 10 and 30 min"
        let last_s = text.rfind(" s, ").expect("seconds, then minutes");
        let (seconds, minutes) = (&text[..last_s], &text[last_s + 4..]);
        let mut schedule: Vec<Duration> = seconds
            .split(" s, ")
            .map(|n| Duration::from_secs(n.trim().parse().unwrap()))
            .collect();
        schedule.extend(
            minutes
                .trim_end_matches(" min")
                .replace(" and ", ", ")
                .split(", ")
                .map(|n| Duration::from_secs(60 * n.trim().parse::<u64>().unwrap())),
        );
        assert_eq!(schedule, DEFAULT_RESEND_DELAYS, "README: {text:?}");
    }
}
