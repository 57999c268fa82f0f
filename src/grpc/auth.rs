//! `kongtie.v1.Auth`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::{
    domain::{OAuthCode, Validator, parse_http_url, parse_stale, parse_state, utc_to_timestamp},
    gateway::{Gateway, OAuthScope},
    proto::{self, auth_server::Auth},
};

pub struct AuthService {
    gateway: Arc<Gateway>,
}

impl AuthService {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn get_access_token(
        &self,
        request: Request<proto::GetAccessTokenRequest>,
    ) -> Result<Response<proto::GetAccessTokenResponse>, Status> {
        let deadline = super::deadline(&request);
        let mut v = Validator::default();
        let stale = v.field("stale_token", parse_stale(&request.get_ref().stale_token));
        let stale = v.finish(|| stale)?;
        let token = self
            .gateway
            .access_token(stale.as_deref(), deadline)
            .await?;
        Ok(Response::new(proto::GetAccessTokenResponse {
            access_token: token.value,
            fetched_at: Some(utc_to_timestamp(token.fetched_at.into())),
        }))
    }

    async fn exchange_o_auth_code(
        &self,
        request: Request<proto::ExchangeOAuthCodeRequest>,
    ) -> Result<Response<proto::ExchangeOAuthCodeResponse>, Status> {
        let deadline = super::deadline(&request);
        let mut v = Validator::default();
        let code = v.field("code", OAuthCode::parse(&request.get_ref().code));
        let code = v.finish(|| code)?;
        let token = self.gateway.exchange_code(code, deadline).await?;
        Ok(Response::new(proto::ExchangeOAuthCodeResponse {
            access_token: token.access_token,
            expires_in_seconds: token.expires_in_seconds,
            refresh_token: token.refresh_token,
            openid: token.openid,
            scopes: token.scopes,
        }))
    }

    async fn build_authorize_url(
        &self,
        request: Request<proto::BuildAuthorizeUrlRequest>,
    ) -> Result<Response<proto::BuildAuthorizeUrlResponse>, Status> {
        let req = request.get_ref();
        let mut v = Validator::default();
        let redirect = v.field("redirect_uri", parse_http_url(&req.redirect_uri, 1024));
        let scope = v.field("scope", parse_scope(req.scope));
        let state = v.field("state", parse_state(&req.state));
        let (redirect, scope, state) = v.finish(|| Some((redirect?, scope?, state?)))?;
        let url = self.gateway.authorize_url(&redirect, scope, &state)?;
        Ok(Response::new(proto::BuildAuthorizeUrlResponse { url }))
    }
}

fn parse_scope(value: i32) -> Result<OAuthScope, String> {
    match proto::Scope::try_from(value) {
        Ok(proto::Scope::Base) => Ok(OAuthScope::Base),
        Ok(proto::Scope::Userinfo) => Ok(OAuthScope::UserInfo),
        Ok(proto::Scope::Unspecified) => Err("must be SCOPE_BASE or SCOPE_USERINFO".into()),
        Err(_) => Err(format!(
            "unknown scope {value}; must be SCOPE_BASE or SCOPE_USERINFO"
        )),
    }
}
