//! `kongtie.v1.Ticket`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::{
    domain::{Validator, parse_http_url, parse_stale, utc_to_timestamp},
    gateway::Gateway,
    proto::{self, ticket_server::Ticket},
};

pub struct TicketService {
    gateway: Arc<Gateway>,
}

impl TicketService {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

#[tonic::async_trait]
impl Ticket for TicketService {
    async fn get_js_api_ticket(
        &self,
        request: Request<proto::GetJsApiTicketRequest>,
    ) -> Result<Response<proto::GetJsApiTicketResponse>, Status> {
        let deadline = super::deadline(&request);
        let mut v = Validator::default();
        let stale = v.field("stale_ticket", parse_stale(&request.get_ref().stale_ticket));
        let stale = v.finish(|| stale)?;
        let ticket = self
            .gateway
            .jsapi_ticket(stale.as_deref(), deadline)
            .await?;
        Ok(Response::new(proto::GetJsApiTicketResponse {
            ticket: ticket.value,
            fetched_at: Some(utc_to_timestamp(ticket.fetched_at.into())),
        }))
    }

    async fn sign_js_sdk_config(
        &self,
        request: Request<proto::SignJsSdkConfigRequest>,
    ) -> Result<Response<proto::SignJsSdkConfigResponse>, Status> {
        let deadline = super::deadline(&request);
        let url = &request.get_ref().url;
        let mut v = Validator::default();
        let checked = v.field("url", parse_http_url(url, 2048));
        v.finish(|| checked)?;
        // Sign the text as the page has it, not a re-serialised URL: the
        // browser signs `location.href` minus the fragment, verbatim.
        let config = self.gateway.sign_js_sdk_config(url, deadline).await?;
        Ok(Response::new(proto::SignJsSdkConfigResponse {
            app_id: config.app_id,
            timestamp: config.timestamp,
            nonce_str: config.nonce_str,
            signature: config.signature,
        }))
    }
}
