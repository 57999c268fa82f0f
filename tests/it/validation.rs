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

/// Sends `bytes` as the request message of `method`, as a careless or
/// hostile client might, and returns the status.
async fn raw_call(app: &TestApp, method: &'static str, bytes: Vec<u8>) -> Status {
    let mut grpc = tonic::client::Grpc::new(app.channel().await);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(bytes),
        tonic::codegen::http::uri::PathAndQuery::from_static(method),
        RawCodec,
    )
    .await
    .unwrap_err()
}

/// Bytes in, bytes out: no protobuf on the client side.
#[derive(Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let n = prost::bytes::Buf::remaining(src);
        Ok(Some(prost::bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

/// A request over the message limit is RESOURCE_EXHAUSTED naming the
/// limit and its setting (tonic's decoder says OUT_OF_RANGE), on our
/// services and on health alike; one at the limit is decoded as usual.
#[tokio::test]
async fn a_message_over_the_limit_is_resource_exhausted() {
    let app = spawn_app().await;
    // Field 15 of GetAccessToken's request (unknown, so skipped): a length-
    // delimited blob making the whole message `len` bytes.
    let message = |len: usize| {
        let (blob, prefix) = (1..=3)
            .map(|k| (len - 1 - k, k))
            .find(|&(blob, k)| prost::encoding::encoded_len_varint(blob as u64) == k)
            .unwrap();
        let mut bytes = vec![0x7a];
        prost::encoding::encode_varint(blob as u64, &mut bytes);
        assert_eq!(bytes.len(), 1 + prefix);
        bytes.resize(len, b'x');
        bytes
    };
    let over = raw_call(
        &app,
        "/kongtie.v1.Auth/GetAccessToken",
        message(64 * 1024 + 1),
    )
    .await;
    assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");
    assert!(
        over.message()
            .contains("limit of 65536 bytes (KONGTIE_GRPC_MAX_MESSAGE_BYTES)"),
        "{}",
        over.message()
    );
    let over = raw_call(&app, "/grpc.health.v1.Health/Check", message(64 * 1024 + 1)).await;
    assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");

    let app = spawn_app_with(&["--grpc-max-message-bytes", "2048"]).await;
    let over = raw_call(&app, "/kongtie.v1.Auth/GetAccessToken", message(2049)).await;
    assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");
    assert!(
        over.message().contains("limit of 2048 bytes"),
        "{}",
        over.message()
    );
    // At the limit, the message is decoded: the blob is skipped, and the
    // empty request's own validation answers.
    let at = raw_call(&app, "/kongtie.v1.Auth/ExchangeOAuthCode", message(2048)).await;
    assert_eq!(at.code(), Code::InvalidArgument, "{at:?}");
    assert_eq!(violated_fields(&at), ["code"]);
}

#[tokio::test]
async fn bytes_that_do_not_decode_are_invalid_argument_and_nothing_goes_upstream() {
    let app = spawn_app().await;
    // Field 1 (out_trade_id) holding bytes that are not UTF-8.
    let status = raw_call(
        &app,
        "/kongtie.v1.Payment/CreateJsapiOrder",
        vec![0x0a, 0x02, 0xff, 0xfe],
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("the message does not decode as CreateJsapiOrderRequest"),
        "{}",
        status.message()
    );
    // A length prefix promising more than the message holds.
    let status = raw_call(
        &app,
        "/kongtie.v1.Auth/ExchangeOAuthCode",
        vec![0x0a, 0x40, b'a'],
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    for endpoint in kongtie_gateway::upstream::Endpoint::ALL {
        assert_eq!(app.sandbox.calls(endpoint), 0, "nothing was sent upstream");
    }
}
