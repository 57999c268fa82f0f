//! The Kongtie wire format: request envelopes and response bodies, kept
//! apart from our protobuf types. This is the one place that knows each
//! upstream field name, and it tolerates the document's quirks: a
//! `TimeStamp` or `Code` sent as a number, `TradeResponse` for
//! `ResponseBody`, and `ResponseText` as a JSON string or an object.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use crate::endpoint::Endpoint;

pub const GET_ACCESS_TOKEN: &str = Endpoint::GetAccessToken.name();
pub const GET_JSAPI_TICKET: &str = Endpoint::GetJsApiTicket.name();
pub const GET_WECHAT_ACCESS_TOKEN: &str = Endpoint::GetWeChatAccessToken.name();

/// `ResponseHead.Code` of a successful call.
pub const CODE_OK: &str = "0000";
/// `ResponseHead.Code` Kongtie uses for a refused call.
pub const CODE_FAILED: &str = "0001";

/// Body fields of the GetJsApiTicket request, in signing order.
pub const F_ACCESS_TOKEN: &str = "AccessToken";
/// Body field of the GetWeChatAccessToken request.
pub const F_CODE: &str = "Code";

/// Body fields of a ParTrade request, in signing order (3 to 11).
pub const PAR_TRADE_FIELDS: [&str; 9] = [
    "PlatformAppId",
    "PlatformToken",
    "SourceWay",
    "SourceApp",
    "PayMethod",
    "OutTradeId",
    "PayAmount",
    "OpenId",
    "OrderTimeOut",
];

/// Fields of an inbound payment notification, in signing order (1 to 8).
pub const NOTIFY_FIELDS: [&str; 8] = [
    "TradeStatus",
    "Message",
    "OutTradeId",
    "TradeAmount",
    "TradeOrderId",
    "TradeBillNo",
    "TradeTime",
    "TimeStamp",
];

#[derive(Debug, Serialize, Deserialize)]
pub struct RequestHead {
    #[serde(rename = "TimeStamp", deserialize_with = "text")]
    pub time_stamp: String,
    #[serde(rename = "SourceFrom", deserialize_with = "text")]
    pub source_from: String,
    #[serde(rename = "Sign")]
    pub sign: String,
}

/// A request: the head and the body fields as an object.
#[derive(Debug, Serialize)]
pub struct Request {
    #[serde(rename = "RequestHead")]
    pub head: RequestHead,
    #[serde(rename = "RequestBody")]
    pub body: serde_json::Map<String, serde_json::Value>,
}

/// A request as the sandbox reads it: body values kept raw, so a number is
/// signed as the text it was sent as.
#[derive(Debug, Deserialize)]
pub struct IncomingRequest {
    #[serde(rename = "RequestHead")]
    pub head: RequestHead,
    #[serde(rename = "RequestBody", default)]
    pub body: std::collections::HashMap<String, Box<RawValue>>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ResponseHead {
    #[serde(rename = "Code", deserialize_with = "text")]
    pub code: String,
    #[serde(rename = "Message", default)]
    pub message: String,
}

/// A response with its body left raw until the head says it succeeded (a
/// failed GetWeChatAccessToken carries a body of empty values).
#[derive(Debug, Deserialize)]
pub struct Response {
    #[serde(rename = "ResponseHead")]
    pub head: ResponseHead,
    #[serde(rename = "ResponseBody", alias = "TradeResponse", default)]
    pub body: Option<Box<RawValue>>,
}

/// A response as the sandbox writes it.
#[derive(Debug, Serialize)]
pub struct OutgoingResponse<B> {
    #[serde(rename = "ResponseHead")]
    pub head: ResponseHead,
    #[serde(rename = "ResponseBody")]
    pub body: B,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AccessTokenBody {
    #[serde(rename = "AccessToken")]
    pub access_token: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JsApiTicketBody {
    #[serde(rename = "JsApiTicket")]
    pub js_api_ticket: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WebAccessTokenBody {
    #[serde(rename = "Access_token")]
    pub access_token: String,
    #[serde(rename = "Expires_in", deserialize_with = "integer")]
    pub expires_in: i64,
    #[serde(rename = "Refresh_token", default)]
    pub refresh_token: String,
    #[serde(rename = "Openid")]
    pub openid: String,
    #[serde(rename = "Scope", default)]
    pub scope: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TradeBody {
    /// A JSON object serialised into a string, or (tolerated) the object.
    #[serde(rename = "ResponseText")]
    pub response_text: serde_json::Value,
}

/// WeChat's JSAPI pay parameters inside `ResponseText`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PayParams {
    #[serde(rename = "appId")]
    pub app_id: String,
    #[serde(rename = "timeStamp", deserialize_with = "text")]
    pub time_stamp: String,
    #[serde(rename = "nonceStr")]
    pub nonce_str: String,
    pub package: String,
    #[serde(rename = "signType")]
    pub sign_type: String,
    #[serde(rename = "paySign")]
    pub pay_sign: String,
}

/// A JSON string or number, as text. A number keeps the exact text it was
/// sent as only when read through `RawValue`; here it is an integer or a
/// short decimal whose canonical text is what a signer would have used.
pub fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Text {
        S(String),
        N(serde_json::Number),
    }
    Ok(match Text::deserialize(d)? {
        Text::S(s) => s,
        Text::N(n) => n.to_string(),
    })
}

/// An integer sent as a number or as a string of digits.
pub fn integer<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    let text = text(d)?;
    text.trim()
        .parse()
        .map_err(|_| serde::de::Error::custom("expected an integer"))
}

/// The text of a raw JSON value the way a signer saw it: a string's
/// contents, or a number's text exactly as sent; `None` for anything else.
pub fn raw_text(raw: &RawValue) -> Option<String> {
    let s = raw.get();
    match s.as_bytes().first()? {
        b'"' => serde_json::from_str::<String>(s).ok(),
        b'-' | b'0'..=b'9' => Some(s.to_owned()),
        // null, true, false, objects and arrays are no field's text.
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quirks_of_the_document_are_tolerated() {
        let head: RequestHead =
            serde_json::from_str(r#"{"TimeStamp":1111,"SourceFrom":"JSJ","Sign":"x"}"#).unwrap();
        assert_eq!(head.time_stamp, "1111");

        let r: Response = serde_json::from_str(
            r#"{"ResponseHead":{"Code":"0000","Message":"SUCCESS"},"TradeResponse":{"ResponseText":"{}"}}"#,
        )
        .unwrap();
        assert!(r.body.is_some());

        let b: WebAccessTokenBody = serde_json::from_str(
            r#"{"Access_token":"a","Expires_in":"7200","Refresh_token":"r","Openid":"o","Scope":"snsapi_base"}"#,
        )
        .unwrap();
        assert_eq!(b.expires_in, 7200);
    }

    #[test]
    fn raw_text_keeps_numbers_as_sent() {
        let raw: Box<RawValue> = serde_json::from_str("0.20").unwrap();
        assert_eq!(raw_text(&raw).as_deref(), Some("0.20"));
        let raw: Box<RawValue> = serde_json::from_str(r#""0.20""#).unwrap();
        assert_eq!(raw_text(&raw).as_deref(), Some("0.20"));
        for not_text in [r#"{"a":1}"#, "[1]", "null", "true", "false"] {
            let raw: Box<RawValue> = serde_json::from_str(not_text).unwrap();
            assert_eq!(raw_text(&raw), None, "{not_text}");
        }
    }
}
