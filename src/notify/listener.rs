//! The side HTTP listener Kongtie POSTs payment notifications to.
//!
//! A notification is verified in named steps (parse, required fields,
//! signature over the document's field order, values exactly as sent),
//! stored durably, and only then answered `success`; a repeat is answered
//! `success` too. Anything we refuse gets a 4xx and a short reason and is
//! not stored; a store failure gets a 5xx so Kongtie sends it again.

use std::{collections::HashMap, sync::Arc};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
};
use chrono::Utc;
use secrecy::SecretString;
use serde_json::value::RawValue;
use tracing::{Instrument, error, info, info_span, warn};

use crate::{
    domain::AmountFen,
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
}

struct ListenerState {
    store: Arc<dyn NotificationStore>,
    token: SecretString,
}

pub fn router(store: Arc<dyn NotificationStore>, settings: NotifySettings) -> Router {
    let state = Arc::new(ListenerState {
        store,
        token: settings.token,
    });
    Router::new()
        .route(&settings.path, post(receive))
        .layer(DefaultBodyLimit::max(settings.max_body_bytes))
        .with_state(state)
}

async fn receive(State(state): State<Arc<ListenerState>>, body: Bytes) -> Response {
    let notification = match verify(&body, &state.token) {
        Ok(n) => n,
        Err(refusal) => {
            warn!(reason = refusal.reason, "notification refused");
            return refusal.into_response();
        }
    };
    let span = info_span!("notification", out_trade_id = %notification.out_trade_id);
    async move {
        match state.store.record(notification).await {
            Ok(Recorded::New { sequence }) => {
                info!(sequence, "notification stored");
                (StatusCode::OK, SUCCESS).into_response()
            }
            Ok(Recorded::Repeat {
                sequence,
                receive_count,
            }) => {
                info!(sequence, receive_count, "repeat of a stored notification");
                (StatusCode::OK, SUCCESS).into_response()
            }
            Err(e) => {
                error!(error = %e, "notification not stored; Kongtie will resend");
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

/// Why a notification was refused.
struct Refusal {
    status: StatusCode,
    reason: String,
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
