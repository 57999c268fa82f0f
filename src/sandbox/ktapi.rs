//! The ktapi host (`/awkmanage/v3/ktapi/...`): the official account's
//! access token and jsapi ticket, which rotate (the replaced one works a
//! while longer, as WeChat's do), and the web OAuth code exchange, with the
//! sandbox-only endpoints that issue codes and rotate tokens.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json,
    body::Bytes,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{
    answer, hint, refuse,
    state::{Grant, Shared, random_alnum},
};
use crate::upstream::{Endpoint, wire};

pub const KTAPI_PREFIX: &str = "/awkmanage/v3/ktapi";

/// How long an issued OAuth code may be exchanged.
const CODE_LIFETIME: Duration = Duration::from_secs(300);

/// `GetAccessToken`: the current token (rotated once its lifetime is over).
pub(super) fn access_token(shared: &Shared) -> Response {
    let token = shared
        .lock()
        .access_token
        .current(shared.config.token_lifetime);
    answer(wire::CODE_OK, "请求成功", json!({"AccessToken": token}))
}

/// `GetJsApiTicket`, for a current (or just replaced) access token.
pub(super) fn jsapi_ticket(shared: &Shared, access_token: &str) -> Response {
    let mut st = shared.lock();
    if !st.access_token.accepts(access_token) {
        drop(st);
        return refuse(
            Endpoint::GetJsApiTicket,
            &format!(
                "invalid credential, access_token is invalid or not latest, {}",
                hint()
            ),
        );
    }
    let ticket = st.ticket.current(shared.config.token_lifetime);
    answer(wire::CODE_OK, "请求成功", json!({"JsApiTicket": ticket}))
}

pub(super) fn exchange_code(shared: &Shared, code: &str) -> Response {
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

#[derive(Debug, Default, Deserialize)]
pub(super) struct CodeRequest {
    openid: Option<String>,
    scope: Option<String>,
}

#[derive(Debug, Serialize)]
pub(super) struct IssuedCode {
    pub(super) code: String,
    openid: String,
    scope: String,
}

pub(super) fn issue_code(shared: &Shared, openid: Option<&str>, scope: Option<&str>) -> IssuedCode {
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

pub(super) async fn new_code(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
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

pub(super) async fn rotate(State(shared): State<Arc<Shared>>) -> StatusCode {
    let mut st = shared.lock();
    st.access_token.rotate();
    st.ticket.rotate();
    StatusCode::NO_CONTENT
}
