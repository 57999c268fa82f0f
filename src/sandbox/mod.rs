//! A faithful simulator of both Kongtie hosts, as a real HTTP server.
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
//!   until it is answered `success`, 10 sends at most;
//! - `GET /sandbox/stats` counts the calls per endpoint.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use chrono::Utc;
use md5::{Digest, Md5};
use rand::{Rng, distr::Alphanumeric};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tracing::info;
use url::Url;

use crate::{
    domain::{AmountFen, OpenId, OutTradeId, beijing},
    upstream::{
        Endpoint, PayFixed,
        sign::verify,
        wire::{self, raw_text},
    },
};

pub const KTAPI_PREFIX: &str = "/awkmanage/v3/ktapi";
pub const PAY_PATH: &str = "/v5/ParTrade.ashx";

/// How long a replaced access token or ticket keeps working, as WeChat does.
const GRACE: Duration = Duration::from_secs(300);
/// How long an issued OAuth code may be exchanged.
const CODE_LIFETIME: Duration = Duration::from_secs(300);
/// The merchant key the simulated WeChat signs `paySign` with.
const MERCHANT_KEY: &str = "sandboxmerchantkey0000000000000";

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

/// Kongtie's resend schedule is not documented; this one is quick enough
/// for a demo and still ten sends.
pub const DEFAULT_RESEND_DELAYS: [Duration; 10] = [
    Duration::from_secs(0),
    Duration::from_secs(2),
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(30),
    Duration::from_secs(60),
    Duration::from_secs(120),
    Duration::from_secs(300),
    Duration::from_secs(600),
    Duration::from_secs(1800),
];

/// One send of a payment notification and how it was answered.
#[derive(Debug, Clone)]
pub struct NotifyAttempt {
    pub out_trade_id: String,
    /// 1 for the first send.
    pub attempt: usize,
    /// HTTP status, or none when the request failed.
    pub status: Option<u16>,
    /// True when answered `200 success`.
    pub acknowledged: bool,
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
        }
    }

    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

struct Rotating {
    prefix: &'static str,
    current: String,
    issued: Instant,
    previous: Option<(String, Instant)>,
}

impl Rotating {
    fn new(prefix: &'static str) -> Self {
        Self {
            prefix,
            current: format!("{prefix}_{}", random_alnum(96)),
            issued: Instant::now(),
            previous: None,
        }
    }

    fn current(&mut self, lifetime: Duration) -> String {
        if self.issued.elapsed() >= lifetime {
            self.rotate();
        }
        self.current.clone()
    }

    fn rotate(&mut self) {
        let new = format!("{}_{}", self.prefix, random_alnum(96));
        let old = std::mem::replace(&mut self.current, new);
        self.previous = Some((old, Instant::now() + GRACE));
        self.issued = Instant::now();
    }

    fn accepts(&self, value: &str) -> bool {
        value == self.current
            || self
                .previous
                .as_ref()
                .is_some_and(|(old, until)| old == value && Instant::now() < *until)
    }
}

struct Grant {
    openid: String,
    scope: String,
    expires: Instant,
    used: bool,
}

struct Order {
    amount_fen: i64,
    /// `PayAmount` as it was sent, which the notification repeats.
    pay_amount: String,
    openid: String,
    response_text: String,
    /// Set once paid: a second pay trigger resends the same payment.
    payment: Option<Payment>,
}

#[derive(Clone)]
struct Payment {
    trade_order_id: String,
    trade_bill_no: String,
    trade_time: String,
}

struct SimState {
    access_token: Rotating,
    ticket: Rotating,
    codes: HashMap<String, Grant>,
    orders: HashMap<String, Order>,
    seen: Vec<SeenRequest>,
    fault: Option<Fault>,
    notify_url: Option<Url>,
    notify_attempts: Vec<NotifyAttempt>,
}

struct Shared {
    config: SandboxConfig,
    http: reqwest::Client,
    state: Mutex<SimState>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
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
        issue_code(&self.shared, openid, scope).code
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
        pay(&self.shared, out_trade_id, None).is_ok()
    }

    /// Pays an order with another `TradeAmount` than it was created with
    /// (`POST /sandbox/orders/{id}/pay?amount=0.01`).
    pub fn pay_amount(&self, out_trade_id: &str, amount: &str) -> bool {
        pay(&self.shared, out_trade_id, Some(amount.to_owned())).is_ok()
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
            post(|s, b| upstream(s, b, Endpoint::GetAccessToken)),
        )
        .route(
            &format!("{KTAPI_PREFIX}/{}", wire::GET_JSAPI_TICKET),
            post(|s, b| upstream(s, b, Endpoint::GetJsApiTicket)),
        )
        .route(
            &format!("{KTAPI_PREFIX}/{}", wire::GET_WECHAT_ACCESS_TOKEN),
            post(|s, b| upstream(s, b, Endpoint::GetWeChatAccessToken)),
        )
        .route(PAY_PATH, post(|s, b| upstream(s, b, Endpoint::ParTrade)))
        .route("/sandbox/oauth/codes", post(new_code))
        .route("/sandbox/rotate", post(rotate))
        .route("/sandbox/orders/{out_trade_id}/pay", post(pay_order))
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

fn answer(code: &str, message: &str, body: serde_json::Value) -> Response {
    Json(wire::OutgoingResponse {
        head: wire::ResponseHead {
            code: code.to_owned(),
            message: message.to_owned(),
        },
        body,
    })
    .into_response()
}

fn refuse(endpoint: Endpoint, message: &str) -> Response {
    answer(wire::CODE_FAILED, message, empty_body(endpoint))
}

fn hint() -> String {
    format!("hints: [ req_id: {} ]", random_alnum(8).to_lowercase())
}

async fn upstream(State(shared): State<Arc<Shared>>, body: Bytes, endpoint: Endpoint) -> Response {
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
            let response = handle(&shared, &body, endpoint);
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
        // Turned into `Status` above.
        Some(Fault::Flaky { .. }) | None => handle(&shared, &body, endpoint),
    }
}

/// A request read, checked and answered.
fn handle(shared: &Arc<Shared>, body: &[u8], endpoint: Endpoint) -> Response {
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
    let lifetime = shared.config.token_lifetime;
    match endpoint {
        Endpoint::GetAccessToken => {
            let token = shared.lock().access_token.current(lifetime);
            answer(wire::CODE_OK, "请求成功", json!({"AccessToken": token}))
        }
        Endpoint::GetJsApiTicket => {
            let mut st = shared.lock();
            if !st.access_token.accepts(field(wire::F_ACCESS_TOKEN)) {
                drop(st);
                return refuse(
                    endpoint,
                    &format!(
                        "invalid credential, access_token is invalid or not latest, {}",
                        hint()
                    ),
                );
            }
            let ticket = st.ticket.current(lifetime);
            answer(wire::CODE_OK, "请求成功", json!({"JsApiTicket": ticket}))
        }
        Endpoint::GetWeChatAccessToken => exchange_code(shared, field(wire::F_CODE)),
        Endpoint::ParTrade => create_order(shared, &fields),
    }
}

fn exchange_code(shared: &Shared, code: &str) -> Response {
    let endpoint = Endpoint::GetWeChatAccessToken;
    let mut st = shared.lock();
    let Some(grant) = st.codes.get_mut(code) else {
        return refuse(endpoint, &format!("invalid code, {}", hint()));
    };
    if grant.used {
        return refuse(endpoint, &format!("code been used, {}", hint()));
    }
    if Instant::now() >= grant.expires {
        return refuse(endpoint, &format!("code expired, {}", hint()));
    }
    grant.used = true;
    let body = wire::WebAccessTokenBody {
        access_token: format!("SBXWEB_{}", random_alnum(96)),
        expires_in: 7200,
        refresh_token: format!("SBXRF_{}", random_alnum(96)),
        openid: grant.openid.clone(),
        scope: grant.scope.clone(),
    };
    answer(
        wire::CODE_OK,
        "请求成功",
        serde_json::to_value(body).unwrap_or_default(),
    )
}

fn create_order(shared: &Shared, fields: &[(&str, String)]) -> Response {
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

#[derive(Debug, Default, Deserialize)]
struct CodeRequest {
    openid: Option<String>,
    scope: Option<String>,
}

#[derive(Debug, Serialize)]
struct IssuedCode {
    code: String,
    openid: String,
    scope: String,
}

fn issue_code(shared: &Shared, openid: Option<&str>, scope: Option<&str>) -> IssuedCode {
    let code = random_alnum(32);
    let openid = openid
        .map(str::to_owned)
        .unwrap_or_else(|| format!("o{}", random_alnum(27)));
    let scope = scope.unwrap_or("snsapi_base").to_owned();
    shared.lock().codes.insert(
        code.clone(),
        Grant {
            openid: openid.clone(),
            scope: scope.clone(),
            expires: Instant::now() + CODE_LIFETIME,
            used: false,
        },
    );
    IssuedCode {
        code,
        openid,
        scope,
    }
}

async fn new_code(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let req: CodeRequest = if body.is_empty() {
        CodeRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return (StatusCode::BAD_REQUEST, format!("bad JSON: {e}")).into_response(),
        }
    };
    Json(issue_code(
        &shared,
        req.openid.as_deref(),
        req.scope.as_deref(),
    ))
    .into_response()
}

async fn rotate(State(shared): State<Arc<Shared>>) -> StatusCode {
    let mut st = shared.lock();
    st.access_token.rotate();
    st.ticket.rotate();
    StatusCode::NO_CONTENT
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

/// `?amount=0.01`: notify another `TradeAmount` than the order's, to walk
/// the gateway's mismatch path.
#[derive(Debug, serde::Deserialize)]
struct PayQuery {
    amount: Option<String>,
}

async fn pay_order(
    State(shared): State<Arc<Shared>>,
    Path(out_trade_id): Path<String>,
    Query(query): Query<PayQuery>,
) -> Response {
    match pay(&shared, &out_trade_id, query.amount) {
        Ok(started) => (StatusCode::ACCEPTED, Json(started)).into_response(),
        Err((status, reason)) => (status, reason).into_response(),
    }
}

/// What a pay trigger started.
#[derive(Debug, Serialize)]
struct PayStarted {
    out_trade_id: String,
    trade_order_id: String,
    trade_amount: String,
    notify_url: String,
}

/// Builds the signed notification of a paid order and starts sending it.
fn pay(
    shared: &Arc<Shared>,
    out_trade_id: &str,
    amount: Option<String>,
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

/// A notification body: the fields and their `Sign`, as Kongtie sends it.
pub fn signed_notification(fields: &[(&str, &str)], token: &SecretString) -> String {
    let mut body = serde_json::Map::new();
    for (k, v) in fields {
        body.insert((*k).to_owned(), (*v).into());
    }
    body.insert(
        "Sign".into(),
        crate::upstream::sign::sign(fields, token).into(),
    );
    serde_json::Value::Object(body).to_string()
}

async fn send_until_acknowledged(
    shared: Arc<Shared>,
    out_trade_id: String,
    url: Url,
    body: String,
) {
    let delays = shared.config.resend_delays.clone();
    let sends = delays.len();
    for (i, delay) in delays.into_iter().enumerate() {
        tokio::time::sleep(delay).await;
        let answer = shared
            .http
            .post(url.clone())
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await;
        let (status, acknowledged) = match answer {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let text = resp.text().await.unwrap_or_default();
                (Some(status), status == 200 && text.trim() == "success")
            }
            Err(_) => (None, false),
        };
        info!(
            out_trade_id,
            attempt = i + 1,
            status,
            acknowledged,
            "sandbox notify attempt"
        );
        shared.lock().notify_attempts.push(NotifyAttempt {
            out_trade_id: out_trade_id.clone(),
            attempt: i + 1,
            status,
            acknowledged,
        });
        if acknowledged {
            return;
        }
    }
    tracing::warn!(out_trade_id, sends, "sandbox gave up notifying");
}

fn random_alnum(len: usize) -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}
