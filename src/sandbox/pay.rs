//! The pay host (`/v5/ParTrade.ashx`): WeChat JSAPI orders with realistic
//! `ResponseText` (the same prepay for a repeat with the same terms), and
//! the sandbox-only trigger that pays one and starts notifying.

use std::sync::Arc;

use axum::{
    Json,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use chrono::Utc;
use md5::{Digest, Md5};
use rand::Rng;
use serde::Serialize;
use serde_json::json;

use super::{
    answer,
    notifier::{send_until_acknowledged, signed_notification},
    refuse,
    state::{Order, Payment, Shared, random_alnum},
};
use crate::{
    domain::{AmountFen, OpenId, OutTradeId, beijing},
    upstream::{Endpoint, wire},
};

pub const PAY_PATH: &str = "/v5/ParTrade.ashx";

/// The merchant key the simulated WeChat signs `paySign` with.
const MERCHANT_KEY: &str = "sandboxmerchantkey0000000000000";

pub(super) fn create_order(shared: &Shared, fields: &[(&str, String)]) -> Response {
    let endpoint = Endpoint::ParTrade;
    let get = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_default()
    };
    let fixed = &shared.config.pay_fixed;
    use secrecy::ExposeSecret;
    let expected = [
        ("PlatformAppId", fixed.platform_app_id.as_str()),
        ("PlatformToken", fixed.platform_token.expose_secret()),
        ("SourceWay", fixed.source_way.as_str()),
        ("SourceApp", fixed.source_app.as_str()),
        ("PayMethod", fixed.pay_method.as_str()),
    ];
    for (name, want) in expected {
        if get(name) != want {
            return refuse(endpoint, &format!("invalid {name}"));
        }
    }
    let out_trade_id = get("OutTradeId");
    if OutTradeId::parse(out_trade_id).is_err() {
        return refuse(
            endpoint,
            "invalid OutTradeId: letters and digits, at most 20",
        );
    }
    let amount = match AmountFen::from_yuan_text(get("PayAmount")) {
        Ok(a) if a.fen() > 0 => a,
        _ => {
            return refuse(
                endpoint,
                "invalid PayAmount: yuan with at most two decimals",
            );
        }
    };
    if OpenId::parse(get("OpenId")).is_err() {
        return refuse(endpoint, "invalid OpenId");
    }
    let timeout = match chrono::NaiveDateTime::parse_from_str(get("OrderTimeOut"), "%Y%m%d%H%M%S") {
        Ok(t) => t,
        Err(_) => return refuse(endpoint, "invalid OrderTimeOut: yyyyMMddHHmmss"),
    };
    let now_beijing = Utc::now().with_timezone(&beijing()).naive_local();
    if timeout <= now_beijing {
        return refuse(endpoint, "OrderTimeOut has passed");
    }

    let mut st = shared.lock();
    if let Some(order) = st.orders.get(out_trade_id) {
        // WeChat returns the same prepay for a repeat with the same terms.
        if order.amount_fen == amount.fen() && order.openid == get("OpenId") {
            return answer(
                wire::CODE_OK,
                "SUCCESS",
                json!({"ResponseText": order.response_text}),
            );
        }
        return refuse(
            endpoint,
            "OutTradeId already used with different parameters",
        );
    }
    let response_text = pay_params(&shared.config.wechat_app_id);
    st.orders.insert(
        out_trade_id.to_owned(),
        Order {
            amount_fen: amount.fen(),
            pay_amount: get("PayAmount").to_owned(),
            openid: get("OpenId").to_owned(),
            response_text: response_text.clone(),
            payment: None,
        },
    );
    answer(
        wire::CODE_OK,
        "SUCCESS",
        json!({"ResponseText": response_text}),
    )
}

/// WeChat JSAPI pay parameters, signed the way WeChat signs them.
fn pay_params(app_id: &str) -> String {
    let time_stamp = Utc::now().timestamp().to_string();
    let nonce_str = random_alnum(32).to_lowercase();
    let package = format!(
        "prepay_id=wx{}{:010}",
        Utc::now().with_timezone(&beijing()).format("%d%H%M%S%3f"),
        rand::rng().random_range(0..10_000_000_000u64)
    );
    let text = format!(
        "appId={app_id}&nonceStr={nonce_str}&package={package}&signType=MD5&timeStamp={time_stamp}&key={MERCHANT_KEY}"
    );
    let pay_sign = hex::encode_upper(Md5::digest(text.as_bytes()));
    serde_json::to_string(&wire::PayParams {
        app_id: app_id.to_owned(),
        time_stamp,
        nonce_str,
        package,
        sign_type: "MD5".into(),
        pay_sign,
    })
    .unwrap_or_default()
}

/// `?amount=0.01`: notify another `TradeAmount` than the order's, to walk
/// the gateway's mismatch path. `?new_payment=true`: the payer pays again,
/// a payment of its own (a new `TradeBillNo`), to walk the double-charge
/// path; without it, paying again resends the order's one payment.
#[derive(Debug, serde::Deserialize)]
pub(super) struct PayQuery {
    amount: Option<String>,
    #[serde(default)]
    new_payment: bool,
}

pub(super) async fn pay_order(
    State(shared): State<Arc<Shared>>,
    Path(out_trade_id): Path<String>,
    Query(query): Query<PayQuery>,
) -> Response {
    match pay(&shared, &out_trade_id, query.amount, query.new_payment) {
        Ok(started) => (StatusCode::ACCEPTED, Json(started)).into_response(),
        Err((status, reason)) => (status, reason).into_response(),
    }
}

/// What a pay trigger started.
#[derive(Debug, Serialize)]
pub(super) struct PayStarted {
    out_trade_id: String,
    trade_order_id: String,
    trade_amount: String,
    notify_url: String,
}

/// Builds the signed notification of a paid order (of a new payment of it
/// with `new_payment`) and starts sending it.
pub(super) fn pay(
    shared: &Arc<Shared>,
    out_trade_id: &str,
    amount: Option<String>,
    new_payment: bool,
) -> Result<PayStarted, (StatusCode, &'static str)> {
    let now = Utc::now();
    let (amount, url, payment) = {
        let mut st = shared.lock();
        let url = st
            .notify_url
            .clone()
            .ok_or((StatusCode::CONFLICT, "no notify URL configured"))?;
        let order = st
            .orders
            .get_mut(out_trade_id)
            .ok_or((StatusCode::NOT_FOUND, "no such order"))?;
        if new_payment {
            order.payment = None;
        }
        let payment = order
            .payment
            .get_or_insert_with(|| Payment {
                trade_order_id: format!(
                    "984_{}",
                    rand::rng().random_range(10_000_000..100_000_000u64)
                ),
                trade_bill_no: format!(
                    "{}{:020}",
                    now.with_timezone(&beijing()).format("%Y%m%d"),
                    rand::rng().random_range(0..100_000_000_000_000_000u64)
                ),
                trade_time: now
                    .with_timezone(&beijing())
                    .format("%Y/%-m/%-d %H:%M:%S")
                    .to_string(),
            })
            .clone();
        (
            amount.unwrap_or_else(|| order.pay_amount.clone()),
            url,
            payment,
        )
    };
    let values = [
        "0000".to_owned(),
        "SUCCESS".to_owned(),
        out_trade_id.to_owned(),
        amount.clone(),
        payment.trade_order_id.clone(),
        payment.trade_bill_no,
        payment.trade_time,
        now.timestamp().to_string(),
    ];
    let fields: Vec<(&str, &str)> = wire::NOTIFY_FIELDS
        .iter()
        .zip(&values)
        .map(|(k, v)| (*k, v.as_str()))
        .collect();
    let body = signed_notification(&fields, &shared.config.notify_token);
    tokio::spawn(send_until_acknowledged(
        Arc::clone(shared),
        out_trade_id.to_owned(),
        url.clone(),
        body,
    ));
    Ok(PayStarted {
        out_trade_id: out_trade_id.to_owned(),
        trade_order_id: payment.trade_order_id,
        trade_amount: amount,
        notify_url: url.to_string(),
    })
}
