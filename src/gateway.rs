//! The gateway's domain: what each RPC does once its request is valid,
//! independent of gRPC. Caches and the OAuth code memo live here.

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use rand::{Rng, distr::Alphanumeric};
use sha1::{Digest, Sha1};

use crate::{
    cache::{Fetched, Memo, TokenCache},
    domain::OAuthCode,
    error::{Error, Result},
    metrics::Metrics,
    upstream::{KongtieClient, WebAccessToken},
};

/// How long the answer to a code exchange is remembered: WeChat codes live
/// about five minutes, and browsers sometimes follow the redirect twice.
const CODE_MEMO_TTL: Duration = Duration::from_secs(300);

const AUTHORIZE_URL: &str = "https://open.weixin.qq.com/connect/oauth2/authorize";

/// What `encodeURIComponent` leaves alone, as WeChat's examples expect.
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// The official account's WeChat app id, for authorize URLs and
    /// `wx.config`; without it those two RPCs fail FAILED_PRECONDITION.
    pub wechat_app_id: Option<String>,
    pub token_ttl: Duration,
    pub max_amount_fen: i64,
    /// Expiry of an order whose request names none.
    pub order_window: Duration,
    /// How far ahead a request may set an order's expiry.
    pub max_order_expiry: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OAuthScope {
    Base,
    UserInfo,
}

impl OAuthScope {
    pub fn as_wechat(self) -> &'static str {
        match self {
            OAuthScope::Base => "snsapi_base",
            OAuthScope::UserInfo => "snsapi_userinfo",
        }
    }
}

/// A signed `wx.config`.
#[derive(Debug, Clone)]
pub struct JsSdkConfig {
    pub app_id: String,
    pub timestamp: i64,
    pub nonce_str: String,
    pub signature: String,
}

pub struct Gateway {
    client: Arc<KongtieClient>,
    metrics: Arc<Metrics>,
    settings: GatewaySettings,
    access_token: Arc<TokenCache>,
    ticket: TokenCache,
    codes: Memo<OAuthCode, WebAccessToken>,
}

impl Gateway {
    pub fn new(client: KongtieClient, settings: GatewaySettings, metrics: Arc<Metrics>) -> Self {
        let client = Arc::new(client);
        let c = Arc::clone(&client);
        let access_token = Arc::new(TokenCache::new(settings.token_ttl, move || {
            let c = Arc::clone(&c);
            async move { c.get_access_token(None).await }
        }));
        let (c, tokens) = (Arc::clone(&client), Arc::clone(&access_token));
        let ticket = TokenCache::new(settings.token_ttl, move || {
            let (c, tokens) = (Arc::clone(&c), Arc::clone(&tokens));
            async move {
                let (token, _) = tokens.get(None).await?;
                c.get_jsapi_ticket(&token.value, None).await
            }
        });
        Self {
            client,
            metrics,
            codes: Memo::new(CODE_MEMO_TTL),
            settings,
            access_token,
            ticket,
        }
    }

    pub fn settings(&self) -> &GatewaySettings {
        &self.settings
    }

    /// The Kongtie client, for the order ledger.
    pub fn client(&self) -> Arc<KongtieClient> {
        Arc::clone(&self.client)
    }

    /// The official account's access token; `deadline` bounds the wait.
    pub async fn access_token(
        &self,
        stale: Option<&str>,
        deadline: Option<Duration>,
    ) -> Result<Fetched> {
        self.cached(&self.access_token, "access_token", stale, deadline)
            .await
    }

    pub async fn jsapi_ticket(
        &self,
        stale: Option<&str>,
        deadline: Option<Duration>,
    ) -> Result<Fetched> {
        self.cached(&self.ticket, "jsapi_ticket", stale, deadline)
            .await
    }

    async fn cached(
        &self,
        cache: &TokenCache,
        name: &'static str,
        stale: Option<&str>,
        deadline: Option<Duration>,
    ) -> Result<Fetched> {
        let (value, hit) = within(deadline, cache.get(stale)).await?;
        self.metrics.cache_lookup(name, hit);
        Ok(value)
    }

    /// Exchanges a code once; asking again with the same code within a few
    /// minutes returns the first answer.
    pub async fn exchange_code(
        &self,
        code: OAuthCode,
        deadline: Option<Duration>,
    ) -> Result<WebAccessToken> {
        let client = Arc::clone(&self.client);
        let key = code.clone();
        let run = move || async move { client.exchange_code(code.as_str(), deadline).await };
        let metrics = Arc::clone(&self.metrics);
        within(deadline, async move {
            let (answer, hit) = self.codes.get_or_run(key, run).await;
            metrics.cache_lookup("oauth_code", hit);
            answer
        })
        .await
    }

    pub fn authorize_url(
        &self,
        redirect_uri: &url::Url,
        scope: OAuthScope,
        state: &str,
    ) -> Result<String> {
        let app_id = self.app_id()?;
        Ok(format!(
            "{AUTHORIZE_URL}?appid={}&redirect_uri={}&response_type=code&scope={}&state={}#wechat_redirect",
            utf8_percent_encode(app_id, URI_COMPONENT),
            utf8_percent_encode(redirect_uri.as_str(), URI_COMPONENT),
            scope.as_wechat(),
            state,
        ))
    }

    /// Signs `wx.config` for `page_url` (which must already be validated),
    /// without its `#fragment`.
    pub async fn sign_js_sdk_config(
        &self,
        page_url: &str,
        deadline: Option<Duration>,
    ) -> Result<JsSdkConfig> {
        let app_id = self.app_id()?.to_owned();
        let ticket = self.jsapi_ticket(None, deadline).await?;
        let url = page_url.split('#').next().unwrap_or(page_url);
        let nonce_str: String = rand::rng()
            .sample_iter(&Alphanumeric)
            .take(16)
            .map(char::from)
            .collect();
        let timestamp = Utc::now().timestamp();
        let signature = js_sdk_signature(&ticket.value, &nonce_str, timestamp, url);
        Ok(JsSdkConfig {
            app_id,
            timestamp,
            nonce_str,
            signature,
        })
    }

    fn app_id(&self) -> Result<&str> {
        self.settings
            .wechat_app_id
            .as_deref()
            .ok_or(Error::NotConfigured(
                "the WeChat app id (KONGTIE_WECHAT_APP_ID) is not set",
            ))
    }
}

/// The JS-SDK signature: SHA-1 of the four pairs in WeChat's order.
pub fn js_sdk_signature(ticket: &str, nonce_str: &str, timestamp: i64, url: &str) -> String {
    let text =
        format!("jsapi_ticket={ticket}&noncestr={nonce_str}&timestamp={timestamp}&url={url}");
    hex::encode(Sha1::digest(text.as_bytes()))
}

/// Bounds a wait by the caller's deadline, if it has one.
async fn within<T>(deadline: Option<Duration>, fut: impl Future<Output = Result<T>>) -> Result<T> {
    match deadline {
        None => fut.await,
        Some(d) => tokio::time::timeout(d, fut)
            .await
            .unwrap_or_else(|_| Err(Error::DeadlineExceeded(d))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn js_sdk_signature_matches_wechats_published_example() {
        // The worked example of WeChat's JS-SDK documentation (appendix 1).
        let sig = js_sdk_signature(
            "sM4AOVdWfPE4DxkXGEs8VMCPGGVi4C3VM0P37wVUCFvkVAy_90u5h9nbSlYy3-Sl-HhTdfl2fzFy1AOcHKP7qg",
            "Wm3WZYTPz0wzccnW",
            1414587457,
            "http://mp.weixin.qq.com?params=value",
        );
        assert_eq!(sig, "0f9de62fce790f9a083d5c99e95740ceb90c27ed");
    }
}
