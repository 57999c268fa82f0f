use chrono::{TimeZone, Utc};
use kongtie_gateway::proto::payment_client::PaymentClient;
use kongtie_gateway::{
    domain::{beijing, utc_to_timestamp},
    upstream::Endpoint,
};
use md5::{Digest, Md5};
use tonic::Code;

use crate::helpers::*;

#[tokio::test]
async fn an_order_is_sent_as_exact_yuan_in_beijing_time_signed_with_the_pay_token() {
    let app = spawn_app().await;
    let expires = Utc::now() + chrono::Duration::hours(2);
    let expires = Utc.timestamp_opt(expires.timestamp(), 0).unwrap();
    let mut request = order("A20240001", 20);
    request.expires_at = Some(utc_to_timestamp(expires));
    let created = app
        .payment()
        .await
        .create_jsapi_order(request)
        .await
        .unwrap()
        .into_inner();

    let params = created.pay_params.unwrap();
    assert_eq!(params.app_id, APP_ID);
    assert!(params.package.starts_with("prepay_id=wx"));
    assert_eq!(params.sign_type, "MD5");
    assert_eq!(params.pay_sign.len(), 32);
    let text: serde_json::Value = serde_json::from_str(&created.response_text).unwrap();
    assert_eq!(text["package"], params.package.as_str());

    let seen = app.sandbox.requests();
    assert_eq!(seen.len(), 1);
    let sent = &seen[0];
    assert_eq!(sent.endpoint, Endpoint::ParTrade);
    assert!(
        sent.sign_valid,
        "ParTrade must be signed with the pay token"
    );
    assert_eq!(sent.source_from, "600");
    assert_eq!(sent.field("PayAmount"), Some("0.20"));
    assert_eq!(sent.field("OutTradeId"), Some("A20240001"));
    assert_eq!(
        sent.field("OrderTimeOut").unwrap(),
        expires
            .with_timezone(&beijing())
            .format("%Y%m%d%H%M%S")
            .to_string()
    );
    assert_eq!(
        sent.field("PlatformAppId"),
        Some("wssccaf9-2341-1234-87c1-6ababc10aab3")
    );
    assert_eq!(sent.field("SourceWay"), Some("20"));
    assert_eq!(sent.field("PayMethod"), Some("22"));
}

#[tokio::test]
async fn the_sign_kongtie_receives_is_md5_of_the_fields_and_the_pay_token() {
    let app = spawn_app().await;
    app.payment()
        .await
        .create_jsapi_order(order("B1", 1))
        .await
        .unwrap();
    let sent = &app.sandbox.requests()[0];
    // The document's rule, spelled out here: K1=V1&...&Kn=Vn&TOKEN over
    // TimeStamp, SourceFrom, then the body fields in the document's order.
    let mut text = format!(
        "TimeStamp={}&SourceFrom={}",
        sent.time_stamp, sent.source_from
    );
    let order_of_fields = [
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
    let names: Vec<&str> = sent.fields.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, order_of_fields);
    for (k, v) in &sent.fields {
        text.push_str(&format!("&{k}={v}"));
    }
    assert_eq!(sent.sign, md5sum(&format!("{text}&{PAY_TOKEN}")));
    assert_ne!(sent.sign, md5sum(&format!("{text}&{KTAPI_TOKEN}")));
    // And a ktapi call is signed with the ktapi token.
    app.access_token().await.unwrap();
    let token_call = app
        .sandbox
        .requests()
        .into_iter()
        .find(|r| r.endpoint == Endpoint::GetAccessToken)
        .unwrap();
    assert_eq!(
        token_call.sign,
        md5sum(&format!(
            "TimeStamp={}&SourceFrom=JSJ&{KTAPI_TOKEN}",
            token_call.time_stamp
        ))
    );
}

#[tokio::test]
async fn a_wrong_pay_token_is_a_signature_refusal_for_the_operator() {
    let app = spawn_app_with(&["--pay-token", "not-the-pay-token"]).await;
    let status = app
        .payment()
        .await
        .create_jsapi_order(order("C1", 100))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    let (reason, meta) = error_info(&status);
    assert_eq!(reason, "UPSTREAM_SIGNATURE_REJECTED");
    assert_eq!(meta["endpoint"], "ParTrade");
    assert_eq!(meta["upstream_code"], "0001");
    assert_eq!(meta["upstream_message"], "sign error");
    assert_eq!(
        status.message(),
        "Kongtie ParTrade refused the gateway's signature: 0001 sign error"
    );
}

#[tokio::test]
async fn a_business_refusal_keeps_its_own_reason_code_and_message() {
    let app = spawn_app().await;
    app.payment()
        .await
        .create_jsapi_order(order("C2", 100))
        .await
        .unwrap();
    // Another gateway (its own ledger) on the same Kongtie account reuses
    // the order number with other terms: the sandbox, like WeChat, refuses.
    let other = spawn_gateway_on(&app.sandbox, &[]).await;
    let status = PaymentClient::connect(format!("http://{}", other.running.grpc))
        .await
        .unwrap()
        .create_jsapi_order(order("C2", 200))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let (reason, meta) = error_info(&status);
    assert_eq!(reason, "UPSTREAM_REJECTED");
    assert_eq!(meta["endpoint"], "ParTrade");
    assert_eq!(meta["upstream_code"], "0001");
    assert!(
        !meta["upstream_message"].is_empty()
            && status.message().contains(&meta["upstream_message"]),
        "{status:?}"
    );
}

#[tokio::test]
async fn the_sandboxs_pay_sign_is_wechats_formula() {
    let app = spawn_app().await;
    let p = app
        .payment()
        .await
        .create_jsapi_order(order("D1", 1234))
        .await
        .unwrap()
        .into_inner()
        .pay_params
        .unwrap();
    let text = format!(
        "appId={}&nonceStr={}&package={}&signType=MD5&timeStamp={}&key=sandboxmerchantkey0000000000000",
        p.app_id, p.nonce_str, p.package, p.time_stamp
    );
    assert_eq!(p.pay_sign, hex::encode_upper(Md5::digest(text.as_bytes())));
    assert_eq!(app.sandbox.requests()[0].field("PayAmount"), Some("12.34"));
}
