//! The side HTTP listener Kongtie POSTs payment notifications to.
//!
//! It faces the internet, so before a handler runs a guard checks the
//! source network (when an allowlist is set), takes one of a bounded number
//! of slots (503 when all are taken: Kongtie sends again) and bounds the
//! request's time. The body size is limited, and only POST is routed.
//!
//! A notification is verified in named steps (parse, required fields,
//! signature over the document's field order, values exactly as sent, and
//! optionally the age of its `TimeStamp`), stored durably, and only then
//! answered `success`; a repeat is answered `success` too. Anything we
//! refuse gets a 4xx and a short reason and is not stored; a store failure
//! gets a 5xx so Kongtie sends it again.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::{ConnectInfo, DefaultBodyLimit, Request, State},
    http::{HeaderMap, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::post,
};
use chrono::Utc;
use ipnet::IpNet;
use secrecy::SecretString;
use serde_json::value::RawValue;
use tokio::sync::Semaphore;
use tracing::{Instrument, error, info, info_span, warn};

use crate::{
    domain::AmountFen,
    metrics::Metrics,
    store::{IncomingNotification, NotificationStore, Recorded},
    upstream::{
        sign,
        wire::{NOTIFY_FIELDS, raw_text},
    },
};

/// The body Kongtie waits for.
pub const SUCCESS: &str = "success";

#[derive(Clone)]
pub struct NotifySettings {
    /// Path the listener answers on.
    pub path: String,
    /// Token notifications are signed with.
    pub token: SecretString,
    /// Largest body accepted.
    pub max_body_bytes: usize,
    /// Longest a request may take, store commit included.
    pub request_timeout: Duration,
    /// Requests handled at once; more are refused with 503.
    pub max_concurrency: usize,
    /// Source networks allowed to notify; empty allows all.
    pub allow: Vec<IpNet>,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Refuse notifications whose `TimeStamp` is further than this from
    /// now. Off by default: resends may carry the first TimeStamp.
    pub max_age: Option<Duration>,
}

struct ListenerState {
    store: Arc<dyn NotificationStore>,
    settings: NotifySettings,
    slots: Semaphore,
    metrics: Arc<Metrics>,
}

/// The listener's routes. Serve with
/// `into_make_service_with_connect_info::<SocketAddr>()`: the allowlist
/// needs the peer address.
pub fn router(
    store: Arc<dyn NotificationStore>,
    settings: NotifySettings,
    metrics: Arc<Metrics>,
) -> Router {
    let state = Arc::new(ListenerState {
        store,
        slots: Semaphore::new(settings.max_concurrency),
        metrics,
        settings: settings.clone(),
    });
    Router::new()
        .route(&settings.path, post(receive))
        .layer(DefaultBodyLimit::max(settings.max_body_bytes))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), guard))
        .with_state(state)
}

/// Source network, concurrency and time limits, before any handler.
async fn guard(
    State(state): State<Arc<ListenerState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let settings = &state.settings;
    if !settings.allow.is_empty() {
        let source = client_ip(peer.ip(), request.headers(), &settings.trusted_proxies);
        if !settings.allow.iter().any(|net| net.contains(&source)) {
            warn!(%source, "notification from a source outside the allowlist");
            state.metrics.rejected("source_not_allowed");
            return (StatusCode::FORBIDDEN, "source not allowed").into_response();
        }
    }
    let Ok(_slot) = state.slots.try_acquire() else {
        state.metrics.rejected("busy");
        return (StatusCode::SERVICE_UNAVAILABLE, "busy, send again").into_response();
    };
    let response = match tokio::time::timeout(settings.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            warn!("notification request timed out; Kongtie will resend");
            state.metrics.rejected("timeout");
            return (StatusCode::SERVICE_UNAVAILABLE, "timed out, send again").into_response();
        }
    };
    // Refusals made before the handler ran are counted here; the handler
    // counts its own.
    let reason = match response.status() {
        StatusCode::METHOD_NOT_ALLOWED => Some("method_not_allowed"),
        StatusCode::PAYLOAD_TOO_LARGE => Some("too_large"),
        StatusCode::NOT_FOUND => Some("not_found"),
        _ => None,
    };
    if let Some(reason) = reason {
        state.metrics.rejected(reason);
    }
    response
}

/// The address a request came from: the peer, or, when the peer is a
/// trusted proxy, the nearest untrusted address in `X-Forwarded-For`.
fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|ip| ip.trim().parse().ok())
        .collect();
    forwarded
        .iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .or(forwarded.first())
        .copied()
        .unwrap_or(peer)
}

async fn receive(State(state): State<Arc<ListenerState>>, body: Bytes) -> Response {
    let checked = verify(&body, &state.settings.token).and_then(|n| {
        check_age(&n, state.settings.max_age)?;
        Ok(n)
    });
    let notification = match checked {
        Ok(n) => n,
        Err(refusal) => {
            warn!(reason = refusal.reason, "notification refused");
            state.metrics.rejected(refusal.metric);
            return refusal.into_response();
        }
    };
    let span = info_span!("notification", out_trade_id = %notification.out_trade_id);
    async move {
        match state.store.record(notification).await {
            Ok(Recorded::New { sequence }) => {
                info!(sequence, "notification stored");
                state.metrics.notification("stored");
                (StatusCode::OK, SUCCESS).into_response()
            }
            Ok(Recorded::Repeat {
                sequence,
                receive_count,
            }) => {
                info!(sequence, receive_count, "repeat of a stored notification");
                state.metrics.notification("duplicate");
                (StatusCode::OK, SUCCESS).into_response()
            }
            Err(e) => {
                error!(error = %e, "notification not stored; Kongtie will resend");
                state.metrics.rejected("store_unavailable");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store unavailable, send again",
                )
                    .into_response()
            }
        }
    }
    .instrument(span)
    .await
}

/// With a maximum age set, refuses a `TimeStamp` (unix seconds, or
/// milliseconds) further than that from now, either way.
fn check_age(n: &IncomingNotification, max_age: Option<Duration>) -> Result<(), Refusal> {
    let Some(max_age) = max_age else {
        return Ok(());
    };
    let stale = || Refusal {
        status: StatusCode::BAD_REQUEST,
        reason: "TimeStamp is too old or too far ahead".into(),
        metric: "stale",
    };
    let ts: i64 = n.time_stamp.trim().parse().map_err(|_| stale())?;
    let secs = if ts >= 100_000_000_000 { ts / 1000 } else { ts };
    let age = (Utc::now().timestamp() - secs).unsigned_abs();
    if age > max_age.as_secs() {
        return Err(stale());
    }
    Ok(())
}

/// Why a notification was refused.
struct Refusal {
    status: StatusCode,
    reason: String,
    /// The `reason` label of the rejection metric.
    metric: &'static str,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.status, self.reason).into_response()
    }
}

fn bad(reason: impl Into<String>) -> Refusal {
    Refusal {
        status: StatusCode::BAD_REQUEST,
        reason: reason.into(),
        metric: "malformed",
    }
}

/// Parses and verifies a notification body, whatever its Content-Type.
fn verify(body: &[u8], token: &SecretString) -> Result<IncomingNotification, Refusal> {
    // Step 1: a JSON object, each value kept as the raw text that was sent.
    let object: HashMap<String, Box<RawValue>> =
        serde_json::from_slice(body).map_err(|_| bad("body is not a JSON object"))?;
    let text = |name: &str| -> Result<String, Refusal> {
        let raw = object
            .get(name)
            .ok_or_else(|| bad(format!("missing field {name}")))?;
        raw_text(raw).ok_or_else(|| bad(format!("field {name} must be a string or a number")))
    };
    // Step 2: every signed field and the signature are present.
    let values = NOTIFY_FIELDS
        .iter()
        .map(|name| text(name))
        .collect::<Result<Vec<_>, _>>()?;
    // A NUL character is no part of any real field, and PostgreSQL's text
    // cannot hold one.
    if let Some(name) = NOTIFY_FIELDS
        .iter()
        .zip(&values)
        .find_map(|(name, v)| v.contains('\0').then_some(name))
    {
        return Err(bad(format!("field {name} contains a NUL character")));
    }
    let given = text("Sign")?;
    // Step 3: MD5 over the fields in the document's order, values exactly as
    // sent, then the token; compared in constant time.
    let pairs: Vec<(&str, &str)> = NOTIFY_FIELDS
        .iter()
        .zip(&values)
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    if !sign::verify(&pairs, token, &given) {
        return Err(Refusal {
            status: StatusCode::UNAUTHORIZED,
            reason: "bad signature".into(),
            metric: "bad_signature",
        });
    }
    let [
        trade_status,
        message,
        out_trade_id,
        trade_amount,
        trade_order_id,
        trade_bill_no,
        trade_time,
        time_stamp,
    ] = <[String; 8]>::try_from(values).map_err(|_| bad("wrong number of fields"))?;
    if out_trade_id.is_empty() {
        return Err(bad("OutTradeId is empty"));
    }
    let amount_fen = AmountFen::from_yuan_text(&trade_amount)
        .ok()
        .map(AmountFen::fen);
    Ok(IncomingNotification {
        trade_status,
        message,
        out_trade_id,
        amount_fen,
        trade_amount,
        trade_order_id,
        trade_bill_no,
        trade_time,
        time_stamp,
        raw_body: String::from_utf8_lossy(body).into_owned(),
        received_at: Utc::now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(fields: &[(&str, &str)], token: &str) -> String {
        let sign = sign::sign(fields, &SecretString::from(token));
        let mut obj = serde_json::Map::new();
        for (k, v) in fields {
            obj.insert((*k).into(), (*v).into());
        }
        obj.insert("Sign".into(), sign.into());
        serde_json::Value::Object(obj).to_string()
    }

    const EXAMPLE: [(&str, &str); 8] = [
        ("TradeStatus", "0000"),
        ("Message", "SUCCESS"),
        ("OutTradeId", "4333451"),
        ("TradeAmount", "0.20"),
        ("TradeOrderId", "984_43334515"),
        ("TradeBillNo", "2018030221001004080206230140"),
        ("TradeTime", "2018/3/2 10:00:39"),
        ("TimeStamp", "1522233465"),
    ];

    #[test]
    fn the_documents_example_verifies_and_keeps_its_text() {
        let token = "#wugf543sxcv5*$#";
        let n = verify(signed(&EXAMPLE, token).as_bytes(), &token.into())
            .ok()
            .unwrap();
        assert_eq!(n.trade_amount, "0.20");
        assert_eq!(n.amount_fen, Some(20));
        assert_eq!(n.trade_time, "2018/3/2 10:00:39");
    }

    #[test]
    fn numbers_are_verified_as_the_text_sent() {
        let token = SecretString::from("t");
        let sign = sign::sign(&EXAMPLE, &token);
        let body = format!(
            r#"{{"TradeStatus":"0000","Message":"SUCCESS","OutTradeId":4333451,"TradeAmount":0.20,
            "TradeOrderId":"984_43334515","TradeBillNo":"2018030221001004080206230140",
            "TradeTime":"2018/3/2 10:00:39","TimeStamp":1522233465,"Sign":"{sign}"}}"#
        );
        let n = verify(body.as_bytes(), &token).ok().unwrap();
        assert_eq!(n.trade_amount, "0.20");
    }

    #[test]
    fn a_changed_field_or_a_wrong_token_is_refused() {
        let body = signed(&EXAMPLE, "t");
        let tampered = body.replace("0.20", "20.00");
        let err = verify(tampered.as_bytes(), &"t".into()).err().unwrap();
        assert_eq!(err.status, StatusCode::UNAUTHORIZED);
        let err = verify(body.as_bytes(), &"other".into()).err().unwrap();
        assert_eq!(err.status, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn a_trusted_proxys_forwarded_for_is_believed_and_nobody_elses() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "203.0.113.9, 10.0.0.7".parse().unwrap());
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let stranger: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(
            client_ip(proxy, &headers, &trusted),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(stranger, &headers, &trusted), stranger);
        assert_eq!(client_ip(proxy, &HeaderMap::new(), &trusted), proxy);
    }

    #[test]
    fn a_maximum_age_refuses_old_timestamps_only_when_set() {
        let token = "t";
        let n = verify(signed(&EXAMPLE, token).as_bytes(), &token.into())
            .ok()
            .unwrap();
        assert!(check_age(&n, None).is_ok());
        assert!(check_age(&n, Some(Duration::from_secs(300))).is_err());
        let mut fresh = n.clone();
        fresh.time_stamp = Utc::now().timestamp().to_string();
        assert!(check_age(&fresh, Some(Duration::from_secs(300))).is_ok());
        fresh.time_stamp = Utc::now().timestamp_millis().to_string();
        assert!(check_age(&fresh, Some(Duration::from_secs(300))).is_ok());
    }

    #[test]
    fn a_nul_character_in_a_field_is_refused() {
        let mut fields = EXAMPLE;
        fields[1].1 = "SUCC\u{0}ESS";
        let body = signed(&fields, "t");
        assert!(body.contains(r"\u0000"), "{body}");
        let err = verify(body.as_bytes(), &"t".into()).err().unwrap();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert_eq!(err.reason, "field Message contains a NUL character");
    }

    #[test]
    fn malformed_bodies_are_refused_with_a_reason() {
        let token = SecretString::from("t");
        assert_eq!(
            verify(b"not json", &token).err().unwrap().reason,
            "body is not a JSON object"
        );
        assert_eq!(
            verify(b"[1]", &token).err().unwrap().reason,
            "body is not a JSON object"
        );
        let missing = signed(&EXAMPLE[..7], "t");
        assert_eq!(
            verify(missing.as_bytes(), &token).err().unwrap().reason,
            "missing field TimeStamp"
        );
        let nested = signed(&EXAMPLE, "t").replace(r#""SUCCESS""#, r#"{"a":1}"#);
        assert!(
            verify(nested.as_bytes(), &token)
                .err()
                .unwrap()
                .reason
                .contains("Message")
        );
    }
}
