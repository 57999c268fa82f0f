//! The side HTTP listener Kongtie POSTs payment notifications to.
//!
//! It faces the internet. Connections are bounded in number and time (see
//! `server`); a guard checks the source network (when an allowlist is set);
//! the handler reads the whole body within the read timeout (408 after it,
//! 413 past the size limit, sent once a bounded excess is drained so that
//! the client hears it), and only then takes one of a bounded number of
//! slots (503 when all are taken: Kongtie sends again), so a client that
//! sends slowly holds a connection, never a slot. Only POST is routed.
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
    extract::{ConnectInfo, Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::post,
};
use chrono::Utc;
use http_body_util::BodyExt;
use ipnet::IpNet;
use secrecy::SecretString;
use serde_json::value::RawValue;
use tokio::sync::Semaphore;
use tracing::{Instrument, error, info, info_span, warn};

use super::server::{ConnectionLimits, InFlight};
use crate::{
    domain::AmountFen,
    json::Members,
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
    /// Time a connection has for a request's headers (from opening, or from
    /// its previous answer), and then again for its body.
    pub read_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
    /// Longest from a whole body to its answer, store commit included.
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

impl NotifySettings {
    pub fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            read_timeout: self.read_timeout,
            max_connections: self.max_connections,
        }
    }
}

struct ListenerState {
    store: Arc<dyn NotificationStore>,
    settings: NotifySettings,
    slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

/// The listener's routes. Serve with [`serve`](super::server::serve), which
/// gives each request its peer address (the allowlist needs it) and its
/// connection's [`InFlight`] count.
pub fn router(
    store: Arc<dyn NotificationStore>,
    settings: NotifySettings,
    metrics: Arc<Metrics>,
) -> Router {
    let state = Arc::new(ListenerState {
        store,
        slots: Arc::new(Semaphore::new(settings.max_concurrency)),
        metrics,
        settings: settings.clone(),
    });
    Router::new()
        .route(&settings.path, post(receive))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), guard))
        .with_state(state)
}

/// Source network, before any handler; counts refusals of the router.
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
    let response = next.run(request).await;
    // Refusals made before the handler ran are counted here; the handler
    // counts its own.
    let reason = match response.status() {
        StatusCode::METHOD_NOT_ALLOWED => Some("method_not_allowed"),
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

async fn receive(State(state): State<Arc<ListenerState>>, request: Request) -> Response {
    let settings = &state.settings;
    let in_flight = request.extensions().get::<InFlight>().cloned();
    // Step 0: the whole body, in time, before anything is held for it.
    let body = match read_body(request, settings.max_body_bytes, settings.read_timeout).await {
        Ok(body) => body,
        Err(refusal) => {
            state.metrics.rejected(refusal.metric);
            // What is left of the body, if any, will not be read: the
            // connection ends.
            let mut response = refusal.into_response();
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
            return response;
        }
    };
    let _in_flight = in_flight.as_ref().map(InFlight::enter);
    let Ok(slot) = Arc::clone(&state.slots).try_acquire_owned() else {
        state.metrics.rejected("busy");
        return (StatusCode::SERVICE_UNAVAILABLE, "busy, send again").into_response();
    };
    let checked = verify(&body, &settings.token).and_then(|n| {
        check_age(&n, settings.max_age)?;
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
    // Request values reach the log escaped (`?`): a newline or an ANSI
    // escape in an order id cannot forge a log line.
    let span = info_span!("notification", out_trade_id = ?notification.out_trade_id);
    // The write runs to its end in a task of its own, holding the slot, so
    // a commit that comes after we stopped waiting is logged and counted
    // like any other.
    let store = Arc::clone(&state.store);
    let metrics = Arc::clone(&state.metrics);
    // Named in a warning: which payment, and how much (no secret).
    let (trade_bill_no, trade_amount) = (
        notification.trade_bill_no.clone(),
        notification.trade_amount.clone(),
    );
    let write = tokio::spawn(
        async move {
            let recorded = store.record(notification).await;
            match &recorded {
                // Counted before logged: whoever reads the log line finds
                // the count.
                Ok(Recorded::New {
                    sequence,
                    order_check,
                }) => {
                    metrics.notification("stored");
                    metrics.order_check(order_check.label());
                    match order_check.warning() {
                        None => info!(sequence, "notification stored"),
                        // Signed, so stored and answered; but no goods
                        // should ship on it.
                        Some(warning) => warn!(
                            sequence,
                            order_check = order_check.as_str(),
                            trade_bill_no = ?trade_bill_no,
                            trade_amount = ?trade_amount,
                            "{warning}"
                        ),
                    }
                }
                Ok(Recorded::Repeat {
                    sequence,
                    receive_count,
                }) => {
                    metrics.notification("duplicate");
                    info!(sequence, receive_count, "repeat of a stored notification");
                }
                Ok(Recorded::RepeatOfSwept { sequence }) => {
                    metrics.notification("duplicate_of_swept");
                    info!(
                        sequence,
                        "repeat of a notification retention deleted (its tombstone is kept): nothing stored"
                    );
                }
                Err(e) => {
                    error!(error = %e, "notification not stored; Kongtie will resend");
                }
            }
            drop(slot);
            recorded.is_ok()
        }
        .instrument(span.clone()),
    );
    match tokio::time::timeout(settings.request_timeout, write).await {
        Ok(Ok(true)) => (StatusCode::OK, SUCCESS).into_response(),
        Ok(Ok(false) | Err(_)) => {
            state.metrics.rejected("store_unavailable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "store unavailable, send again",
            )
                .into_response()
        }
        Err(_) => {
            span.in_scope(|| {
                warn!(
                    timeout_ms = settings.request_timeout.as_millis() as u64,
                    "notification not stored in time; answered 503, Kongtie will resend"
                )
            });
            state.metrics.rejected("timeout");
            (StatusCode::SERVICE_UNAVAILABLE, "timed out, send again").into_response()
        }
    }
}

/// Past the size limit, a body is still read (and thrown away) up to this
/// many bytes more before the 413 is sent, as nginx's lingering close does:
/// a client that writes its whole body before it reads then gets the
/// answer, not a reset. It is more than the sockets between us can hold
/// (a few MiB on loopback), and bounded in time by the read timeout. A body
/// that declares more is refused unread.
const DRAIN_EXCESS_BYTES: u64 = 16 << 20;

/// Reads the whole body within `timeout`: 413 past `max` bytes (unread when
/// its Content-Length declares [`DRAIN_EXCESS_BYTES`] more, else once the
/// rest is drained), 408 when it has not all arrived in time.
async fn read_body(request: Request, max: usize, timeout: Duration) -> Result<Bytes, Refusal> {
    let too_large = || Refusal {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        reason: format!("body over {max} bytes"),
        metric: "too_large",
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let drained_up_to = max as u64 + DRAIN_EXCESS_BYTES;
    if declared.is_some_and(|n| n > drained_up_to) {
        return Err(too_large());
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut body = request.into_body();
    let mut kept = Vec::new();
    let mut seen: u64 = 0;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(None) => break,
            // Past the limit, the answer is 413 however the rest went.
            _ if seen > max as u64 => return Err(too_large()),
            Ok(Some(Err(_))) => {
                return Err(Refusal {
                    status: StatusCode::BAD_REQUEST,
                    reason: "the body was cut off".into(),
                    metric: "body_incomplete",
                });
            }
            Err(_) => {
                return Err(Refusal {
                    status: StatusCode::REQUEST_TIMEOUT,
                    reason: "the body did not arrive in time".into(),
                    metric: "body_timeout",
                });
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len() as u64;
        if seen <= max as u64 {
            kept.extend_from_slice(&data);
        } else if seen > drained_up_to {
            return Err(too_large());
        }
    }
    if seen > max as u64 {
        return Err(too_large());
    }
    Ok(Bytes::from(kept))
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
    // Step 1: a JSON object, each value kept as the raw text that was sent,
    // each key once: with a key twice, the value we verify and the value an
    // auditor reads from the raw body could differ.
    let members: Members<Box<RawValue>> =
        serde_json::from_slice(body).map_err(|_| bad("body is not a JSON object"))?;
    if members.repeated_key().is_some() {
        return Err(bad("a key appears more than once in the body"));
    }
    let object: HashMap<String, Box<RawValue>> = members.0.into_iter().collect();
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
    fn a_key_sent_twice_is_refused() {
        let body = signed(&EXAMPLE, "t");
        // The signed amount first, another one after it.
        let twice = body.replacen('{', r#"{"TradeAmount":"999.00","#, 1);
        let err = verify(twice.as_bytes(), &"t".into()).err().unwrap();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert_eq!(err.reason, "a key appears more than once in the body");
    }

    #[test]
    fn null_booleans_objects_and_arrays_are_no_fields_text() {
        for value in ["null", "true", "false", r#"{"a":1}"#, "[]"] {
            let body = signed(&EXAMPLE, "t").replace(r#""SUCCESS""#, value);
            let err = verify(body.as_bytes(), &"t".into()).err().unwrap();
            assert_eq!(
                err.reason, "field Message must be a string or a number",
                "{value}"
            );
        }
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
