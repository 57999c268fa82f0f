//! A faithful simulator of both Kongtie hosts, as a real HTTP server, laid
//! out as the gateway is: one file per host (`ktapi.rs`, `pay.rs`), the
//! notify sender apart (`notifier.rs`), the state it keeps (`state.rs`);
//! this file is the front door (faults, the signature check, routing) and
//! the handle tests drive it with.
//!
//! It checks every request's `Sign` (answering `0001` when wrong, as the
//! real one does), issues access tokens and jsapi tickets that rotate,
//! hands out single-use OAuth codes through a sandbox-only endpoint, and
//! creates orders with realistic `ResponseText`. Tests start it on port 0;
//! `serve --sandbox` runs it in-process and points the gateway at it.
//!
//! Sandbox-only endpoints live under `/sandbox/`:
//! - `POST /sandbox/oauth/codes` `{"openid"?, "scope"?}` issues a code;
//! - `POST /sandbox/rotate` rotates the access token and the ticket now;
//! - `POST /sandbox/orders/{out_trade_id}/pay` pays an order: the simulator
//!   sends the signed payment notification to the notify URL and resends it
//!   until it is answered `success`, 10 sends at most (`?amount=` another
//!   amount; `?new_payment=true` a second payment of its own);
//! - `GET /sandbox/stats` counts the calls per endpoint.

mod ktapi;
mod notifier;
mod pay;
mod state;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use secrecy::SecretString;
use serde_json::json;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tracing::info;
use url::Url;

pub use ktapi::KTAPI_PREFIX;
pub use notifier::{DEFAULT_RESEND_DELAYS, NotifyAttempt, signed_notification};
pub use pay::PAY_PATH;
use state::{Rotating, Shared, SimState, random_alnum};

use crate::upstream::{
    Endpoint, PayFixed,
    sign::verify,
    wire::{self, raw_text},
};

#[derive(Clone)]
pub struct SandboxConfig {
    /// Token the ktapi calls must be signed with.
    pub ktapi_token: SecretString,
    /// Token ParTrade requests must be signed with.
    pub pay_token: SecretString,
    /// The fixed values ParTrade requests must carry.
    pub pay_fixed: PayFixed,
    /// The app id put into pay parameters.
    pub wechat_app_id: String,
    /// Lifetime of an access token or ticket before it rotates.
    pub token_lifetime: Duration,
    /// Where payment notifications go (also settable once running).
    pub notify_url: Option<Url>,
    /// Token payment notifications are signed with.
    pub notify_token: SecretString,
    /// The wait before each send of a notification; its length is the
    /// number of sends (Kongtie: 10 at most).
    pub resend_delays: Vec<Duration>,
}

/// Ways to make the simulator misbehave, for tests.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Handle the request, and answer it this much later.
    Delay(Duration),
    /// Answer with this HTTP status and an empty body.
    Status(u16),
    /// Answer 200 with a body that is not JSON.
    Garbage,
    /// Answer the next `times` requests with this HTTP status, then behave.
    Flaky { status: u16, times: usize },
    /// Answer 200 with a body of this many bytes, made as it is sent (the
    /// simulator holds none of it): with its `Content-Length`, or chunked.
    Huge { bytes: u64, chunked: bool },
}

/// One request the simulator received.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub endpoint: Endpoint,
    pub time_stamp: String,
    pub source_from: String,
    /// The `Sign` as received, so tests can check it against one computed
    /// apart from the crate (kept in memory only, never logged).
    pub sign: String,
    pub sign_valid: bool,
    /// The W3C trace context the request carried.
    pub traceparent: Option<String>,
    /// The signed body fields as received, in signing order.
    pub fields: Vec<(String, String)>,
}

impl SeenRequest {
    /// A request answered by a fault before it was read.
    fn unread(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            time_stamp: String::new(),
            source_from: String::new(),
            sign: String::new(),
            sign_valid: false,
            fields: Vec::new(),
            traceparent: None,
        }
    }

    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A running simulator. Dropping it stops the server.
pub struct SandboxHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl SandboxHandle {
    /// Serves the simulator on `listener` until the handle is dropped.
    pub fn spawn(config: SandboxConfig, listener: TcpListener) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(std::io::Error::other)?;
        let notify_url = config.notify_url.clone();
        let shared = Arc::new(Shared {
            config,
            http,
            state: Mutex::new(SimState {
                access_token: Rotating::new("SBXAT"),
                ticket: Rotating::new("SBXTK"),
                codes: HashMap::new(),
                orders: HashMap::new(),
                seen: Vec::new(),
                fault: None,
                notify_url,
                notify_attempts: Vec::new(),
            }),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let app = router(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stopped.await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "sandbox server failed");
            }
        });
        info!(%addr, "sandbox upstream listening");
        Ok(Self {
            addr,
            shared,
            stop: Some(stop),
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL of the three ktapi calls on this simulator.
    pub fn ktapi_url(&self) -> Url {
        Url::parse(&format!("http://{}{KTAPI_PREFIX}", self.addr))
            .expect("a socket address makes a valid URL")
    }

    /// The ParTrade URL on this simulator.
    pub fn pay_url(&self) -> Url {
        Url::parse(&format!("http://{}{PAY_PATH}", self.addr))
            .expect("a socket address makes a valid URL")
    }

    /// Issues a single-use OAuth code, as WeChat would on a redirect.
    pub fn issue_code(&self, openid: Option<&str>, scope: Option<&str>) -> String {
        ktapi::issue_code(&self.shared, openid, scope).code
    }

    /// Rotates the access token and the ticket now.
    pub fn rotate(&self) {
        let mut st = self.shared.lock();
        st.access_token.rotate();
        st.ticket.rotate();
    }

    /// Where payment notifications go from now on.
    pub fn set_notify_url(&self, url: Url) {
        self.shared.lock().notify_url = Some(url);
    }

    /// Pays an order (as `POST /sandbox/orders/{id}/pay` does); false when
    /// there is no such order or no notify URL.
    pub fn pay(&self, out_trade_id: &str) -> bool {
        pay::pay(&self.shared, out_trade_id, None, false).is_ok()
    }

    /// Pays an order again with a payment of its own, a new `TradeBillNo`
    /// (`POST /sandbox/orders/{id}/pay?new_payment=true`).
    pub fn pay_again(&self, out_trade_id: &str) -> bool {
        pay::pay(&self.shared, out_trade_id, None, true).is_ok()
    }

    /// Pays an order with another `TradeAmount` than it was created with
    /// (`POST /sandbox/orders/{id}/pay?amount=0.01`).
    pub fn pay_amount(&self, out_trade_id: &str, amount: &str) -> bool {
        pay::pay(&self.shared, out_trade_id, Some(amount.to_owned()), false).is_ok()
    }

    /// Every notification send so far, oldest first.
    pub fn notify_attempts(&self) -> Vec<NotifyAttempt> {
        self.shared.lock().notify_attempts.clone()
    }

    pub fn set_fault(&self, fault: Option<Fault>) {
        self.shared.lock().fault = fault;
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.shared.lock().seen.clone()
    }

    /// How many requests reached `endpoint`.
    pub fn calls(&self, endpoint: Endpoint) -> usize {
        self.shared
            .lock()
            .seen
            .iter()
            .filter(|r| r.endpoint == endpoint)
            .count()
    }

    /// Stops the server and waits for it.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SandboxHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            &format!("{KTAPI_PREFIX}/{}", wire::GET_ACCESS_TOKEN),
            post(|s, h, b| upstream(s, h, b, Endpoint::GetAccessToken)),
        )
        .route(
            &format!("{KTAPI_PREFIX}/{}", wire::GET_JSAPI_TICKET),
            post(|s, h, b| upstream(s, h, b, Endpoint::GetJsApiTicket)),
        )
        .route(
            &format!("{KTAPI_PREFIX}/{}", wire::GET_WECHAT_ACCESS_TOKEN),
            post(|s, h, b| upstream(s, h, b, Endpoint::GetWeChatAccessToken)),
        )
        .route(
            PAY_PATH,
            post(|s, h, b| upstream(s, h, b, Endpoint::ParTrade)),
        )
        .route("/sandbox/oauth/codes", post(ktapi::new_code))
        .route("/sandbox/rotate", post(ktapi::rotate))
        .route("/sandbox/orders/{out_trade_id}/pay", post(pay::pay_order))
        .route("/sandbox/stats", get(stats))
        .with_state(shared)
}

/// The body fields each endpoint signs, in order.
fn signed_fields(endpoint: Endpoint) -> &'static [&'static str] {
    match endpoint {
        Endpoint::GetAccessToken => &[],
        Endpoint::GetJsApiTicket => &[wire::F_ACCESS_TOKEN],
        Endpoint::GetWeChatAccessToken => &[wire::F_CODE],
        Endpoint::ParTrade => &wire::PAR_TRADE_FIELDS,
    }
}

/// What a refused call carries as its body: the fields, empty.
fn empty_body(endpoint: Endpoint) -> serde_json::Value {
    match endpoint {
        Endpoint::GetAccessToken => json!({"AccessToken": ""}),
        Endpoint::GetJsApiTicket => json!({"JsApiTicket": ""}),
        Endpoint::GetWeChatAccessToken => {
            serde_json::to_value(wire::WebAccessTokenBody::default()).unwrap_or_default()
        }
        Endpoint::ParTrade => json!({"ResponseText": ""}),
    }
}

pub(super) fn answer(code: &str, message: &str, body: serde_json::Value) -> Response {
    Json(wire::OutgoingResponse {
        head: wire::ResponseHead {
            code: code.to_owned(),
            message: message.to_owned(),
        },
        body,
    })
    .into_response()
}

pub(super) fn refuse(endpoint: Endpoint, message: &str) -> Response {
    answer(wire::CODE_FAILED, message, empty_body(endpoint))
}

pub(super) fn hint() -> String {
    format!("hints: [ req_id: {} ]", random_alnum(8).to_lowercase())
}

async fn upstream(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
    endpoint: Endpoint,
) -> Response {
    let traceparent = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let fault = {
        let mut st = shared.lock();
        match &mut st.fault {
            Some(Fault::Flaky { status, times }) => {
                let status = *status;
                *times = times.saturating_sub(1);
                if *times == 0 {
                    st.fault = None;
                }
                Some(Fault::Status(status))
            }
            other => other.clone(),
        }
    };
    match fault {
        // Kongtie handles the request, and its answer is late: a caller
        // that gives up cannot tell whether it was handled.
        Some(Fault::Delay(d)) => {
            let response = handle(&shared, &body, endpoint, traceparent);
            tokio::time::sleep(d).await;
            response
        }
        Some(Fault::Status(code)) => {
            shared.lock().seen.push(SeenRequest::unread(endpoint));
            StatusCode::from_u16(code)
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
                .into_response()
        }
        Some(Fault::Garbage) => {
            shared.lock().seen.push(SeenRequest::unread(endpoint));
            (StatusCode::OK, "<html>502 Bad Gateway</html>").into_response()
        }
        Some(Fault::Huge { bytes, chunked }) => {
            shared.lock().seen.push(SeenRequest::unread(endpoint));
            huge(bytes, chunked)
        }
        // Turned into `Status` above.
        Some(Fault::Flaky { .. }) | None => handle(&shared, &body, endpoint, traceparent),
    }
}

/// A 200 answer of `bytes` spaces, sent 64 KiB at a time.
fn huge(bytes: u64, chunked: bool) -> Response {
    static CHUNK: [u8; 64 * 1024] = [b' '; 64 * 1024];
    let chunk = CHUNK.len() as u64;
    let pieces = (0..bytes.div_ceil(chunk)).map(move |i| {
        let n = (bytes - i * chunk).min(chunk) as usize;
        Ok::<_, std::io::Error>(Bytes::from_static(&CHUNK[..n]))
    });
    let mut response = Response::new(axum::body::Body::from_stream(futures::stream::iter(pieces)));
    if !chunked {
        response
            .headers_mut()
            .insert(axum::http::header::CONTENT_LENGTH, bytes.into());
    }
    response
}

/// A request read, checked and answered.
fn handle(
    shared: &Arc<Shared>,
    body: &[u8],
    endpoint: Endpoint,
    traceparent: Option<String>,
) -> Response {
    let Ok(request) = serde_json::from_slice::<wire::IncomingRequest>(body) else {
        return refuse(endpoint, "invalid request format");
    };
    let mut fields = Vec::new();
    for name in signed_fields(endpoint) {
        match request.body.get(*name).and_then(|raw| raw_text(raw)) {
            Some(value) => fields.push((*name, value)),
            None => return refuse(endpoint, &format!("missing parameter {name}")),
        }
    }
    let mut pairs = vec![
        ("TimeStamp", request.head.time_stamp.as_str()),
        ("SourceFrom", request.head.source_from.as_str()),
    ];
    pairs.extend(fields.iter().map(|(k, v)| (*k, v.as_str())));
    let token = match endpoint {
        Endpoint::ParTrade => &shared.config.pay_token,
        _ => &shared.config.ktapi_token,
    };
    let sign_valid = verify(&pairs, token, &request.head.sign);
    shared.lock().seen.push(SeenRequest {
        endpoint,
        time_stamp: request.head.time_stamp.clone(),
        source_from: request.head.source_from.clone(),
        sign: request.head.sign.clone(),
        sign_valid,
        traceparent,
        fields: fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
    });
    if !sign_valid {
        return refuse(endpoint, "sign error");
    }
    if request.head.source_from.is_empty() {
        return refuse(endpoint, "missing parameter SourceFrom");
    }

    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_default()
    };
    match endpoint {
        Endpoint::GetAccessToken => ktapi::access_token(shared),
        Endpoint::GetJsApiTicket => ktapi::jsapi_ticket(shared, field(wire::F_ACCESS_TOKEN)),
        Endpoint::GetWeChatAccessToken => ktapi::exchange_code(shared, field(wire::F_CODE)),
        Endpoint::ParTrade => pay::create_order(shared, &fields),
    }
}

async fn stats(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let st = shared.lock();
    let mut calls = serde_json::Map::new();
    for ep in Endpoint::ALL {
        let n = st.seen.iter().filter(|r| r.endpoint == ep).count();
        calls.insert(ep.name().to_owned(), n.into());
    }
    let bad = st.seen.iter().filter(|r| !r.sign_valid).count();
    let sends = st.notify_attempts.len();
    let acknowledged = st.notify_attempts.iter().filter(|a| a.acknowledged).count();
    Json(json!({
        "calls": calls,
        "bad_signatures": bad,
        "orders": st.orders.len(),
        "notify_sends": sends,
        "notify_acknowledged": acknowledged,
    }))
}
