use kongtie_gateway::{
    gateway::js_sdk_signature,
    proto::{GetJsApiTicketRequest, SignJsSdkConfigRequest},
    upstream::Endpoint,
};

use crate::helpers::*;

#[tokio::test]
async fn the_ticket_is_fetched_with_the_gateways_own_access_token() {
    let app = spawn_app().await;
    let ticket = app.jsapi_ticket().await.unwrap().into_inner();
    assert!(ticket.ticket.starts_with("SBXTK_"));

    let token = app.access_token().await.unwrap().into_inner().access_token;
    let seen = app.sandbox.requests();
    let ticket_call = seen
        .iter()
        .find(|r| r.endpoint == Endpoint::GetJsApiTicket)
        .unwrap();
    assert!(ticket_call.sign_valid);
    assert_eq!(ticket_call.field("AccessToken"), Some(token.as_str()));
    // The token fetched for the ticket was cached and reused.
    assert_eq!(app.sandbox.calls(Endpoint::GetAccessToken), 1);
}

#[tokio::test]
async fn a_stale_ticket_is_replaced() {
    let app = spawn_app().await;
    let mut client = app.ticket().await;
    let first = client
        .get_js_api_ticket(GetJsApiTicketRequest::default())
        .await
        .unwrap()
        .into_inner()
        .ticket;
    app.sandbox.rotate();
    let fresh = client
        .get_js_api_ticket(GetJsApiTicketRequest {
            stale_ticket: first.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .ticket;
    assert_ne!(fresh, first);
    assert_eq!(app.sandbox.calls(Endpoint::GetJsApiTicket), 2);
}

#[tokio::test]
async fn js_sdk_config_is_signed_over_the_url_without_its_fragment() {
    let app = spawn_app().await;
    let page = "https://shop.example.com/pay?order=42&from=menu";
    let config = app
        .ticket()
        .await
        .sign_js_sdk_config(SignJsSdkConfigRequest {
            url: format!("{page}#section-2"),
        })
        .await
        .unwrap()
        .into_inner();
    let ticket = app.jsapi_ticket().await.unwrap().into_inner().ticket;
    assert_eq!(config.app_id, APP_ID);
    assert_eq!(config.nonce_str.len(), 16);
    let now = chrono::Utc::now().timestamp();
    assert!((now - config.timestamp).abs() < 60);
    assert_eq!(
        config.signature,
        js_sdk_signature(&ticket, &config.nonce_str, config.timestamp, page)
    );
}

#[tokio::test]
async fn nonces_differ_between_calls() {
    let app = spawn_app().await;
    let mut client = app.ticket().await;
    let mut nonces = std::collections::HashSet::new();
    for _ in 0..20 {
        let c = client
            .sign_js_sdk_config(SignJsSdkConfigRequest {
                url: "https://shop.example.com/".into(),
            })
            .await
            .unwrap()
            .into_inner();
        nonces.insert(c.nonce_str);
    }
    assert_eq!(nonces.len(), 20);
}
