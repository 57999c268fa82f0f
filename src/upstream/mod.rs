//! The Kongtie client: turns each call into a correctly signed HTTP request
//! and each answer into a typed value or a precise [`Error`].

pub mod sign;
pub mod wire;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use tracing::{debug, warn};
use url::Url;

pub use crate::endpoint::Endpoint;
use crate::{
    domain::{NewOrder, beijing_compact},
    error::{Error, Result},
    metrics::Metrics,
};

/// The answer size past which an upstream reply is refused: unread when
/// its `Content-Length` says so, else cut there. Kongtie's answers are a
/// few kilobytes; a larger one is a proxy's page or a fault, and is never
/// held whole.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// A Kongtie URL as it may be shown in logs and `check`'s lines: a password
/// in it (`http://user:PASSWORD@proxy/...`, sent as basic auth) is a
/// secret, and is replaced by `****`.
pub fn shown_url(url: &Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        // Only a URL without a host refuses a password; ours have one.
        let _ = shown.set_password(Some("****"));
    }
    shown.to_string()
}

/// Who we are to one of the two upstream systems.
#[derive(Clone)]
pub struct Credentials {
    pub source_from: String,
    pub token: SecretString,
}

/// The fixed values every ParTrade request carries.
#[derive(Clone)]
pub struct PayFixed {
    pub platform_app_id: String,
    pub platform_token: SecretString,
    pub source_way: String,
    pub source_app: String,
    pub pay_method: String,
}

#[derive(Clone)]
pub struct UpstreamConfig {
    /// Base of the three ktapi calls; the call name is appended.
    pub ktapi_url: Url,
    /// The full ParTrade.ashx URL.
    pub pay_url: Url,
    pub ktapi: Credentials,
    pub pay: Credentials,
    pub pay_fixed: PayFixed,
    pub connect_timeout: Duration,
    /// Upper bound of one call; a caller's shorter deadline wins.
    pub timeout: Duration,
}

/// A user's web OAuth token, as Kongtie returned it.
#[derive(Debug, Clone)]
pub struct WebAccessToken {
    pub access_token: String,
    pub expires_in_seconds: i64,
    pub refresh_token: String,
    pub openid: String,
    pub scopes: Vec<String>,
}

/// A created JSAPI order.
#[derive(Debug, Clone)]
pub struct CreatedOrder {
    pub params: wire::PayParams,
    /// `ResponseText` as a JSON string.
    pub response_text: String,
}

pub struct KongtieClient {
    http: reqwest::Client,
    config: UpstreamConfig,
    ktapi_base: String,
    metrics: Option<Arc<Metrics>>,
}

impl KongtieClient {
    pub fn new(config: UpstreamConfig, metrics: Option<Arc<Metrics>>) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_keepalive(Duration::from_secs(60))
            .user_agent(concat!("kongtie-gateway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Internal(format!("building the HTTP client: {e}")))?;
        let ktapi_base = config.ktapi_url.as_str().trim_end_matches('/').to_owned();
        Ok(Self {
            http,
            config,
            ktapi_base,
            metrics,
        })
    }

    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    pub async fn get_access_token(&self, deadline: Option<Duration>) -> Result<String> {
        let body: wire::AccessTokenBody = self
            .call(Endpoint::GetAccessToken, Vec::new(), deadline)
            .await?;
        non_empty(Endpoint::GetAccessToken, "AccessToken", body.access_token)
    }

    pub async fn get_jsapi_ticket(
        &self,
        access_token: &str,
        deadline: Option<Duration>,
    ) -> Result<String> {
        let fields = vec![(wire::F_ACCESS_TOKEN, access_token.to_owned())];
        let body: wire::JsApiTicketBody = self
            .call(Endpoint::GetJsApiTicket, fields, deadline)
            .await?;
        non_empty(Endpoint::GetJsApiTicket, "JsApiTicket", body.js_api_ticket)
    }

    pub async fn exchange_code(
        &self,
        code: &str,
        deadline: Option<Duration>,
    ) -> Result<WebAccessToken> {
        let ep = Endpoint::GetWeChatAccessToken;
        let fields = vec![(wire::F_CODE, code.to_owned())];
        let body: wire::WebAccessTokenBody = self.call(ep, fields, deadline).await?;
        Ok(WebAccessToken {
            access_token: non_empty(ep, "Access_token", body.access_token)?,
            expires_in_seconds: body.expires_in,
            refresh_token: body.refresh_token,
            openid: non_empty(ep, "Openid", body.openid)?,
            scopes: body
                .scope
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        })
    }

    pub async fn create_order(
        &self,
        order: &NewOrder,
        deadline: Option<Duration>,
    ) -> Result<CreatedOrder> {
        let ep = Endpoint::ParTrade;
        let fixed = &self.config.pay_fixed;
        let values = [
            fixed.platform_app_id.clone(),
            fixed.platform_token.expose_secret().to_owned(),
            fixed.source_way.clone(),
            fixed.source_app.clone(),
            fixed.pay_method.clone(),
            order.out_trade_id.as_str().to_owned(),
            order.amount.yuan_text(),
            order.openid.as_str().to_owned(),
            beijing_compact(order.expires_at),
        ];
        let fields = wire::PAR_TRADE_FIELDS.into_iter().zip(values).collect();
        let body: wire::TradeBody = self.call(ep, fields, deadline).await?;
        let response_text = match body.response_text {
            serde_json::Value::String(s) => s,
            obj @ serde_json::Value::Object(_) => obj.to_string(),
            _ => {
                return Err(bad(
                    ep,
                    "ResponseText is neither a JSON string nor an object",
                ));
            }
        };
        let params: wire::PayParams = serde_json::from_str(&response_text).map_err(|e| {
            bad(
                ep,
                format!(
                    "ResponseText is not the pay parameters ({})",
                    json_error(&e)
                ),
            )
        })?;
        Ok(CreatedOrder {
            params,
            response_text,
        })
    }

    /// Sends one call, retrying as its endpoint allows (see [`Retry`]),
    /// within the caller's deadline.
    async fn call<B: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        fields: Vec<(&'static str, String)>,
        deadline: Option<Duration>,
    ) -> Result<B> {
        let started = Instant::now();
        let policy = Retry::of(endpoint);
        let mut attempt = 1;
        loop {
            let remaining = deadline.map(|d| d.saturating_sub(started.elapsed()));
            let timeout = remaining.map_or(self.config.timeout, |r| r.min(self.config.timeout));
            let failure = match self.attempt(endpoint, &fields, timeout).await {
                Ok(body) => return Ok(body),
                Err(failure) => failure,
            };
            let backoff = backoff(attempt);
            let time_left = remaining
                .is_none_or(|r| r.saturating_sub(started.elapsed()) > backoff + MIN_ATTEMPT_TIME);
            let retry = attempt < MAX_ATTEMPTS && policy.allows(failure.kind) && time_left;
            log_failure(endpoint, attempt, retry.then_some(backoff), &failure.error);
            if !retry {
                return Err(failure.error);
            }
            tokio::time::sleep(backoff).await;
            attempt += 1;
        }
    }

    /// Signs and sends one request, returning its body once the head says
    /// `0000`.
    async fn attempt<B: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        fields: &[(&'static str, String)],
        timeout: Duration,
    ) -> Result<B, Failure> {
        let started = Instant::now();
        let result = self.exchange(endpoint, fields, timeout).await;
        if let Some(metrics) = &self.metrics {
            let outcome = match &result {
                Ok(_) => "ok",
                Err(f) => match f.error {
                    Error::UpstreamRejected { .. } => "rejected",
                    Error::UpstreamSignatureRejected { .. } => "signature_rejected",
                    Error::UpstreamTimeout { .. } => "timeout",
                    Error::UpstreamBadResponse { .. } => "bad_response",
                    Error::UpstreamAnswerTooLarge { .. } => "too_large",
                    _ => "unavailable",
                },
            };
            metrics.upstream_call(endpoint.name(), outcome, started.elapsed().as_secs_f64());
        }
        result
    }

    async fn exchange<B: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        fields: &[(&'static str, String)],
        timeout: Duration,
    ) -> Result<B, Failure> {
        let (url, creds) = match endpoint {
            Endpoint::ParTrade => (self.config.pay_url.to_string(), &self.config.pay),
            ep => (
                format!("{}/{}", self.ktapi_base, ep.name()),
                &self.config.ktapi,
            ),
        };
        let time_stamp = chrono::Utc::now().timestamp().to_string();
        let mut pairs: Vec<(&str, &str)> = vec![
            ("TimeStamp", &time_stamp),
            ("SourceFrom", &creds.source_from),
        ];
        pairs.extend(fields.iter().map(|(k, v)| (*k, v.as_str())));
        let sign = sign::sign(&pairs, &creds.token);
        let request = wire::Request {
            head: wire::RequestHead {
                time_stamp,
                source_from: creds.source_from.clone(),
                sign,
            },
            body: fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), serde_json::Value::String(v.clone())))
                .collect(),
        };

        let started = Instant::now();
        // One span per attempt; Kongtie gets its trace context.
        let span = tracing::info_span!("kongtie", endpoint = endpoint.name());
        let response = tracing::Instrument::instrument(
            async {
                self.http
                    .post(url)
                    .headers(crate::telemetry::trace_headers())
                    .json(&request)
                    .timeout(timeout)
                    .send()
                    .await
            },
            span,
        )
        .await
        .map_err(|e| transport_error(endpoint, timeout, &e))?;
        let status = response.status();
        debug!(
            endpoint = endpoint.name(),
            status = status.as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "upstream call"
        );
        if status.is_server_error() || status.as_u16() == 429 {
            return Err(Failure::transient(Error::UpstreamUnavailable {
                endpoint,
                detail: format!("HTTP {status}"),
            }));
        }
        if !status.is_success() {
            return Err(bad(endpoint, format!("HTTP {status}")).into());
        }
        let bytes = read_limited(response, MAX_RESPONSE_BYTES)
            .await
            .map_err(|e| match e {
                Some(e) => transport_error(endpoint, timeout, &e),
                None => Error::UpstreamAnswerTooLarge {
                    endpoint,
                    limit: MAX_RESPONSE_BYTES,
                }
                .into(),
            })?;
        let envelope: wire::Response = serde_json::from_slice(&bytes).map_err(|e| {
            bad(
                endpoint,
                format!("not a Kongtie response envelope ({})", json_error(&e)),
            )
        })?;
        if envelope.head.code != wire::CODE_OK {
            let (code, message) = (envelope.head.code, envelope.head.message);
            return Err(if refuses_signature(&message) {
                Error::UpstreamSignatureRejected {
                    endpoint,
                    code,
                    message,
                }
            } else {
                Error::UpstreamRejected {
                    endpoint,
                    code,
                    message,
                }
            }
            .into());
        }
        let body = envelope
            .body
            .ok_or_else(|| bad(endpoint, "ResponseBody is missing"))?;
        Ok(parse_body(endpoint, &body)?)
    }
}

/// The body, at most `limit` bytes of it: `Err(None)` past the limit (by
/// the declared length before reading, or as the bytes come), so no more
/// than the limit is ever held.
async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, Option<reqwest::Error>> {
    let declared = response.content_length();
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(None);
    }
    let mut body = Vec::with_capacity(declared.map_or(0, |n| n as usize));
    while let Some(chunk) = response.chunk().await.map_err(Some)? {
        if body.len() + chunk.len() > limit {
            return Err(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Logs one failed attempt once, at WARN: the endpoint, Kongtie's code and
/// message when it answered, or the cause. Error texts never hold a token
/// or a `Sign` (see [`Error`]).
fn log_failure(endpoint: Endpoint, attempt: u32, retry_in: Option<Duration>, error: &Error) {
    let retry_in_ms = retry_in.map(|b| b.as_millis() as u64);
    match error {
        Error::UpstreamRejected { code, message, .. } => warn!(
            endpoint = endpoint.name(),
            attempt,
            upstream_code = %code,
            upstream_message = ?message,
            "Kongtie refused the request"
        ),
        Error::UpstreamSignatureRejected { code, message, .. } => warn!(
            endpoint = endpoint.name(),
            attempt,
            upstream_code = %code,
            upstream_message = ?message,
            check = endpoint.signing_settings(),
            "Kongtie refused the gateway's signature: a configuration problem"
        ),
        other => warn!(
            endpoint = endpoint.name(),
            attempt,
            retry_in_ms,
            error = %other,
            "Kongtie call failed"
        ),
    }
}

/// Whether a refusal's `Message` is about our `Sign`. Kongtie's document
/// lists no code for it (every failure is `0001`), so its words decide:
/// "sign" as a word, "signature", or 签名 / 验签.
fn refuses_signature(message: &str) -> bool {
    let lower = message.to_lowercase();
    lower.contains('签')
        || lower
            .split(|c: char| !c.is_ascii_alphanumeric())
            .any(|w| w == "sign" || w.starts_with("signature"))
}

/// Attempts of one call at most.
const MAX_ATTEMPTS: u32 = 3;
/// The first retry waits up to this long, doubling after.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// A retry is not started with less of the deadline left than this.
const MIN_ATTEMPT_TIME: Duration = Duration::from_millis(50);

/// Full jitter: a random wait up to the attempt's exponential backoff, so
/// that many gateways retrying at once do not retry in step.
fn backoff(attempt: u32) -> Duration {
    let cap = BACKOFF_BASE * 2u32.pow(attempt.saturating_sub(1).min(6));
    cap.mul_f64(rand::random::<f64>())
}

/// Which failures an endpoint may be retried after.
#[derive(Debug, Clone, Copy)]
enum Retry {
    /// Safe to repeat (reading a token or ticket): any transient failure.
    Transient,
    /// Only when the request provably never arrived (it could not connect):
    /// creating an order twice is not ours to risk.
    OnConnectFailure,
    /// Never: an OAuth code is single-use.
    Never,
}

impl Retry {
    fn of(endpoint: Endpoint) -> Self {
        match endpoint {
            Endpoint::GetAccessToken | Endpoint::GetJsApiTicket => Retry::Transient,
            Endpoint::ParTrade => Retry::OnConnectFailure,
            Endpoint::GetWeChatAccessToken => Retry::Never,
        }
    }

    fn allows(self, kind: FailureKind) -> bool {
        match self {
            Retry::Transient => kind != FailureKind::Definitive,
            Retry::OnConnectFailure => kind == FailureKind::Connect,
            Retry::Never => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailureKind {
    /// The connection was never made: the request did not arrive.
    Connect,
    /// Timeout, reset, 5xx: the request may or may not have been handled.
    Transient,
    /// Kongtie answered; asking again gets the same answer.
    Definitive,
}

struct Failure {
    kind: FailureKind,
    error: Error,
}

impl Failure {
    fn transient(error: Error) -> Self {
        Self {
            kind: FailureKind::Transient,
            error,
        }
    }
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Self {
            kind: FailureKind::Definitive,
            error,
        }
    }
}

fn parse_body<B: DeserializeOwned>(endpoint: Endpoint, body: &RawValue) -> Result<B> {
    serde_json::from_str(body.get()).map_err(|e| {
        bad(
            endpoint,
            format!("ResponseBody has the wrong shape ({})", json_error(&e)),
        )
    })
}

/// Describes a JSON error in plain words: never serde's own text, which
/// can echo values (tokens, here) and carries positions (`at line 948`)
/// that mean nothing to a caller.
fn json_error(e: &serde_json::Error) -> &'static str {
    use serde_json::error::Category;
    match e.classify() {
        Category::Io => "could not be read",
        Category::Syntax => "not JSON",
        Category::Data => "a field missing or of the wrong type",
        Category::Eof => "cut short",
    }
}

fn bad(endpoint: Endpoint, what: impl Into<String>) -> Error {
    Error::UpstreamBadResponse {
        endpoint,
        what: what.into(),
    }
}

fn non_empty(endpoint: Endpoint, field: &str, value: String) -> Result<String> {
    if value.is_empty() {
        Err(bad(endpoint, format!("{field} is empty")))
    } else {
        Ok(value)
    }
}

fn transport_error(endpoint: Endpoint, timeout: Duration, e: &reqwest::Error) -> Failure {
    if e.is_connect() {
        // A connect timeout is a connect failure too: nothing was sent.
        Failure {
            kind: FailureKind::Connect,
            error: Error::UpstreamUnavailable {
                endpoint,
                detail: format!("connection failed: {}", connect_cause(e)),
            },
        }
    } else if e.is_timeout() {
        Failure::transient(Error::UpstreamTimeout {
            endpoint,
            after: timeout,
        })
    } else {
        // In plain words: the sources' own texts are hyper's and
        // reqwest's (`client error (SendRequest)`), for the log only.
        let closed = chain(e).any(|s| {
            s.downcast_ref::<hyper::Error>()
                .is_some_and(|h| h.is_incomplete_message() || h.is_closed() || h.is_canceled())
        });
        let detail = match io_kind(e) {
            Some(std::io::ErrorKind::ConnectionReset) => "connection reset",
            Some(std::io::ErrorKind::BrokenPipe) => "connection closed",
            _ if closed => "the connection closed before the answer was complete",
            _ if e.is_body() || e.is_decode() => "the answer broke off",
            _ => "request failed",
        };
        debug!(
            endpoint = endpoint.name(),
            cause = %chain(e).map(ToString::to_string).collect::<Vec<_>>().join(": "),
            "Kongtie call failed"
        );
        Failure::transient(Error::UpstreamUnavailable {
            endpoint,
            detail: detail.to_owned(),
        })
    }
}

/// Why a connection could not be made, in an operator's words.
fn connect_cause(e: &reqwest::Error) -> &'static str {
    use std::io::ErrorKind;
    if e.is_timeout() {
        return "connect timeout";
    }
    // hyper-util's resolver failure reads "dns error".
    if chain(e).any(|s| s.to_string().contains("dns error")) {
        return "DNS lookup failed";
    }
    match io_kind(e) {
        Some(ErrorKind::ConnectionRefused) => "connection refused",
        Some(ErrorKind::TimedOut) => "connect timeout",
        Some(ErrorKind::ConnectionReset) => "connection reset",
        Some(ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable) => "host unreachable",
        _ => "could not connect",
    }
}

/// The error and its sources, outermost first.
fn chain<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

/// The kind of the first I/O error among `e`'s sources.
fn io_kind(e: &reqwest::Error) -> Option<std::io::ErrorKind> {
    chain(e).find_map(|s| s.downcast_ref::<std::io::Error>().map(std::io::Error::kind))
}
