//! Bad input of every kind: the precise INVALID_ARGUMENT field violation,
//! and nothing sent upstream.

use kongtie_gateway::proto::{
    BuildAuthorizeUrlRequest, CreateJsapiOrderRequest, ExchangeOAuthCodeRequest,
    GetAccessTokenRequest, GetJsApiTicketRequest, Scope, SignJsSdkConfigRequest,
};
use prost_types::Timestamp;
use tonic::{Code, Status};

use crate::helpers::*;

fn check(case: &str, result: Result<impl std::fmt::Debug, Status>, fields: &[&str]) {
    let status = match result {
        Ok(ok) => panic!("{case}: accepted: {ok:?}"),
        Err(s) => s,
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{case}: {status:?}");
    assert_eq!(violated_fields(&status), fields, "{case}");
    for field in fields {
        assert!(
            status.message().contains(field),
            "{case}: message names {field}"
        );
    }
}

fn good_order() -> CreateJsapiOrderRequest {
    CreateJsapiOrderRequest {
        out_trade_id: "A1".into(),
        amount_fen: 100,
        openid: "oUser".into(),
        expires_at: None,
    }
}

#[tokio::test]
async fn bad_order_fields_are_named_and_nothing_is_sent() {
    let app = spawn_app().await;
    let mut client = app.payment().await;
    let now = chrono::Utc::now().timestamp();
    let cases: Vec<(&str, CreateJsapiOrderRequest, Vec<&str>)> = vec![
        (
            "empty id",
            CreateJsapiOrderRequest {
                out_trade_id: "".into(),
                ..good_order()
            },
            vec!["out_trade_id"],
        ),
        (
            "long id",
            CreateJsapiOrderRequest {
                out_trade_id: "1".repeat(21),
                ..good_order()
            },
            vec!["out_trade_id"],
        ),
        (
            "dash in id",
            CreateJsapiOrderRequest {
                out_trade_id: "A-1".into(),
                ..good_order()
            },
            vec!["out_trade_id"],
        ),
        (
            "unicode id",
            CreateJsapiOrderRequest {
                out_trade_id: "订单1".into(),
                ..good_order()
            },
            vec!["out_trade_id"],
        ),
        (
            "zero amount",
            CreateJsapiOrderRequest {
                amount_fen: 0,
                ..good_order()
            },
            vec!["amount_fen"],
        ),
        (
            "negative amount",
            CreateJsapiOrderRequest {
                amount_fen: -100,
                ..good_order()
            },
            vec!["amount_fen"],
        ),
        (
            "huge amount",
            CreateJsapiOrderRequest {
                amount_fen: i64::MAX,
                ..good_order()
            },
            vec!["amount_fen"],
        ),
        (
            "just over the maximum",
            CreateJsapiOrderRequest {
                amount_fen: 100_000_001,
                ..good_order()
            },
            vec!["amount_fen"],
        ),
        (
            "empty openid",
            CreateJsapiOrderRequest {
                openid: "".into(),
                ..good_order()
            },
            vec!["openid"],
        ),
        (
            "openid with space",
            CreateJsapiOrderRequest {
                openid: "o User".into(),
                ..good_order()
            },
            vec!["openid"],
        ),
        (
            "long openid",
            CreateJsapiOrderRequest {
                openid: "o".repeat(65),
                ..good_order()
            },
            vec!["openid"],
        ),
        (
            "expiry in the past",
            CreateJsapiOrderRequest {
                expires_at: Some(Timestamp {
                    seconds: now - 10,
                    nanos: 0,
                }),
                ..good_order()
            },
            vec!["expires_at"],
        ),
        (
            "negative nanos",
            CreateJsapiOrderRequest {
                expires_at: Some(Timestamp {
                    seconds: now + 3600,
                    nanos: -1,
                }),
                ..good_order()
            },
            vec!["expires_at"],
        ),
        (
            "expiry out of range",
            CreateJsapiOrderRequest {
                expires_at: Some(Timestamp {
                    seconds: i64::MAX,
                    nanos: 0,
                }),
                ..good_order()
            },
            vec!["expires_at"],
        ),
        (
            "everything wrong",
            CreateJsapiOrderRequest {
                out_trade_id: "".into(),
                amount_fen: 0,
                openid: "".into(),
                expires_at: None,
            },
            vec!["out_trade_id", "amount_fen", "openid"],
        ),
    ];
    for (case, request, fields) in cases {
        check(case, client.create_jsapi_order(request).await, &fields);
    }
    assert!(
        app.sandbox.requests().is_empty(),
        "bad input reached the upstream"
    );
}

#[tokio::test]
async fn bad_auth_and_ticket_fields_are_named_and_nothing_is_sent() {
    let app = spawn_app().await;
    let mut auth = app.auth().await;
    let mut ticket = app.ticket().await;

    let stale = |s: String| GetAccessTokenRequest { stale_token: s };
    check(
        "long stale token",
        auth.get_access_token(stale("x".repeat(513))).await,
        &["stale_token"],
    );
    check(
        "stale token with space",
        auth.get_access_token(stale("a b".into())).await,
        &["stale_token"],
    );
    let stale_ticket = GetJsApiTicketRequest {
        stale_ticket: "tab\there".into(),
    };
    check(
        "stale ticket with tab",
        ticket.get_js_api_ticket(stale_ticket).await,
        &["stale_ticket"],
    );

    let code = |c: &str| ExchangeOAuthCodeRequest { code: c.into() };
    check(
        "empty code",
        auth.exchange_o_auth_code(code("")).await,
        &["code"],
    );
    check(
        "long code",
        auth.exchange_o_auth_code(code(&"a".repeat(129))).await,
        &["code"],
    );
    check(
        "code with symbols",
        auth.exchange_o_auth_code(code("abc$%")).await,
        &["code"],
    );

    let authorize = |uri: &str, scope: i32, state: &str| BuildAuthorizeUrlRequest {
        redirect_uri: uri.into(),
        scope,
        state: state.into(),
    };
    let base = Scope::Base as i32;
    let cases = [
        (
            "empty redirect",
            authorize("", base, ""),
            vec!["redirect_uri"],
        ),
        (
            "ftp redirect",
            authorize("ftp://shop.example.com/", base, ""),
            vec!["redirect_uri"],
        ),
        (
            "javascript redirect",
            authorize("javascript:alert(1)", base, ""),
            vec!["redirect_uri"],
        ),
        (
            "relative redirect",
            authorize("/callback", base, ""),
            vec!["redirect_uri"],
        ),
        (
            "long redirect",
            authorize(&format!("https://a.com/{}", "x".repeat(1024)), base, ""),
            vec!["redirect_uri"],
        ),
        (
            "no scope",
            authorize("https://a.com/cb", 0, ""),
            vec!["scope"],
        ),
        (
            "unknown scope",
            authorize("https://a.com/cb", 7, ""),
            vec!["scope"],
        ),
        (
            "state with symbols",
            authorize("https://a.com/cb", base, "a&b"),
            vec!["state"],
        ),
        (
            "long state",
            authorize("https://a.com/cb", base, &"s".repeat(129)),
            vec!["state"],
        ),
        (
            "all wrong",
            authorize("nope", 0, "#"),
            vec!["redirect_uri", "scope", "state"],
        ),
    ];
    for (case, request, fields) in cases {
        check(case, auth.build_authorize_url(request).await, &fields);
    }

    let sign = |u: &str| SignJsSdkConfigRequest { url: u.into() };
    check(
        "empty page url",
        ticket.sign_js_sdk_config(sign("")).await,
        &["url"],
    );
    check(
        "not a url",
        ticket.sign_js_sdk_config(sign("shop page")).await,
        &["url"],
    );
    check(
        "data url",
        ticket.sign_js_sdk_config(sign("data:text/html,hi")).await,
        &["url"],
    );
    check(
        "long url",
        ticket
            .sign_js_sdk_config(sign(&format!("https://a.com/{}", "x".repeat(2048))))
            .await,
        &["url"],
    );

    assert!(
        app.sandbox.requests().is_empty(),
        "bad input reached the upstream"
    );
}
