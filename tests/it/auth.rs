use kongtie_gateway::{
    proto::{BuildAuthorizeUrlRequest, ExchangeOAuthCodeRequest, GetAccessTokenRequest, Scope},
    upstream::Endpoint,
};
use tonic::Code;

use crate::helpers::*;

#[tokio::test]
async fn access_token_comes_from_a_correctly_signed_upstream_call() {
    let app = spawn_app().await;
    let token = app.access_token().await.unwrap().into_inner();
    assert!(token.access_token.starts_with("SBXAT_"));
    assert!(token.fetched_at.is_some());

    let seen = app.sandbox.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].endpoint, Endpoint::GetAccessToken);
    assert!(seen[0].sign_valid, "the sandbox refused our Sign");
    assert_eq!(seen[0].source_from, "JSJ");
}

#[tokio::test]
async fn a_hundred_concurrent_calls_on_a_cold_cache_make_one_upstream_call() {
    let app = spawn_app().await;
    // Slow the upstream so the calls surely overlap.
    app.sandbox
        .set_fault(Some(kongtie_gateway::sandbox::Fault::Delay(
            std::time::Duration::from_millis(200),
        )));
    let client = app.auth().await;
    let calls: Vec<_> = (0..100)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                client
                    .get_access_token(GetAccessTokenRequest::default())
                    .await
                    .map(|r| r.into_inner().access_token)
            })
        })
        .collect();
    let mut tokens = Vec::new();
    for call in calls {
        tokens.push(call.await.unwrap().unwrap());
    }
    assert!(tokens.iter().all(|t| *t == tokens[0]));
    assert_eq!(app.sandbox.calls(Endpoint::GetAccessToken), 1);
}

#[tokio::test]
async fn a_stale_token_is_refetched_only_while_it_is_the_cached_one() {
    let app = spawn_app().await;
    let mut auth = app.auth().await;
    let get = |stale: &str| GetAccessTokenRequest {
        stale_token: stale.to_owned(),
    };
    let first = auth
        .get_access_token(get(""))
        .await
        .unwrap()
        .into_inner()
        .access_token;
    app.sandbox.rotate();
    // Still cached: the rotation is not seen until a caller reports it.
    let cached = auth
        .get_access_token(get(""))
        .await
        .unwrap()
        .into_inner()
        .access_token;
    assert_eq!(cached, first);
    let fresh = auth
        .get_access_token(get(&first))
        .await
        .unwrap()
        .into_inner()
        .access_token;
    assert_ne!(fresh, first);
    // A late caller reporting the same old token gets the new one, no refetch.
    let again = auth
        .get_access_token(get(&first))
        .await
        .unwrap()
        .into_inner()
        .access_token;
    assert_eq!(again, fresh);
    assert_eq!(app.sandbox.calls(Endpoint::GetAccessToken), 2);
}

#[tokio::test]
async fn an_oauth_code_is_exchanged_once_and_a_repeat_returns_the_first_answer() {
    let app = spawn_app().await;
    let code = app
        .sandbox
        .issue_code(Some("oUser123"), Some("snsapi_userinfo"));
    let mut auth = app.auth().await;
    let request = ExchangeOAuthCodeRequest { code: code.clone() };
    let first = auth
        .exchange_o_auth_code(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.openid, "oUser123");
    assert_eq!(first.scopes, ["snsapi_userinfo"]);
    assert_eq!(first.expires_in_seconds, 7200);
    assert!(!first.access_token.is_empty() && !first.refresh_token.is_empty());

    // WeChat's double redirect: the same code again.
    let second = auth
        .exchange_o_auth_code(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.access_token, first.access_token);
    assert_eq!(app.sandbox.calls(Endpoint::GetWeChatAccessToken), 1);
}

#[tokio::test]
async fn concurrent_exchanges_of_one_code_share_one_upstream_call() {
    let app = spawn_app().await;
    let code = app.sandbox.issue_code(None, None);
    let client = app.auth().await;
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let mut client = client.clone();
            let code = code.clone();
            tokio::spawn(async move {
                client
                    .exchange_o_auth_code(ExchangeOAuthCodeRequest { code })
                    .await
            })
        })
        .collect();
    for call in calls {
        call.await
            .unwrap()
            .expect("every caller gets the one answer");
    }
    assert_eq!(app.sandbox.calls(Endpoint::GetWeChatAccessToken), 1);
}

#[tokio::test]
async fn an_invalid_code_fails_with_the_upstream_message_after_one_call() {
    let app = spawn_app().await;
    let mut auth = app.auth().await;
    let request = ExchangeOAuthCodeRequest {
        code: "021AxV5w1vUDw90vTY5w991l2S5w1AxV5x".into(),
    };
    let status = auth
        .exchange_o_auth_code(request.clone())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("invalid code"),
        "{}",
        status.message()
    );
    let (reason, meta) = error_info(&status);
    assert_eq!(reason, "OAUTH_CODE_REJECTED");
    assert_eq!(meta["upstream_code"], "0001");
    assert!(meta["upstream_message"].starts_with("invalid code"));
    assert_eq!(violated_fields(&status), ["code"]);

    // Asking again gets the same answer without a second exchange.
    let again = auth.exchange_o_auth_code(request).await.unwrap_err();
    assert_eq!(again.code(), Code::InvalidArgument);
    assert_eq!(app.sandbox.calls(Endpoint::GetWeChatAccessToken), 1);
}

#[tokio::test]
async fn a_used_code_fails_clearly_and_is_sent_upstream_once() {
    // Two gateways on one upstream: the second sees the code already used.
    let app = spawn_app().await;
    let code = app.sandbox.issue_code(None, None);
    app.auth()
        .await
        .exchange_o_auth_code(ExchangeOAuthCodeRequest { code: code.clone() })
        .await
        .unwrap();

    let other_dir = tempfile::tempdir().unwrap();
    let mut config = serve_args(&[]).config().unwrap();
    config.upstream.ktapi_url = app.sandbox.ktapi_url();
    config.store_url = store_url(other_dir.path());
    let other = run_app(config).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", other.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = kongtie_gateway::proto::auth_client::AuthClient::new(channel)
        .exchange_o_auth_code(ExchangeOAuthCodeRequest { code })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("code been used"),
        "{}",
        status.message()
    );
    assert_eq!(app.sandbox.calls(Endpoint::GetWeChatAccessToken), 2);
}

#[tokio::test]
async fn the_authorize_url_is_percent_encoded_and_ends_with_wechat_redirect() {
    let app = spawn_app().await;
    let url = app
        .auth()
        .await
        .build_authorize_url(BuildAuthorizeUrlRequest {
            redirect_uri: "https://shop.example.com/cb?order=1&x=a b".into(),
            scope: Scope::Userinfo as i32,
            state: "abc123".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    assert_eq!(
        url,
        format!(
            "https://open.weixin.qq.com/connect/oauth2/authorize?appid={APP_ID}\
             &redirect_uri=https%3A%2F%2Fshop.example.com%2Fcb%3Forder%3D1%26x%3Da%2520b\
             &response_type=code&scope=snsapi_userinfo&state=abc123#wechat_redirect"
        )
    );
    assert!(
        app.sandbox.requests().is_empty(),
        "building a URL calls nobody"
    );
}

#[tokio::test]
async fn without_an_app_id_the_authorize_url_is_a_failed_precondition() {
    let app = spawn_app_with(&["--wechat-app-id="]).await;
    let status = app
        .auth()
        .await
        .build_authorize_url(BuildAuthorizeUrlRequest {
            redirect_uri: "https://shop.example.com/cb".into(),
            scope: Scope::Base as i32,
            state: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("KONGTIE_WECHAT_APP_ID"));
}
