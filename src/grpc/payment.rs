//! `kongtie.v1.Payment`.

use std::sync::Arc;

use chrono::Utc;
use tonic::{Request, Response, Status};

use crate::{
    domain::{AmountFen, NewOrder, OpenId, OutTradeId, Validator, timestamp_to_utc},
    gateway::Gateway,
    proto::{self, payment_server::Payment},
};

pub struct PaymentService {
    gateway: Arc<Gateway>,
}

impl PaymentService {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

#[tonic::async_trait]
impl Payment for PaymentService {
    async fn create_jsapi_order(
        &self,
        request: Request<proto::CreateJsapiOrderRequest>,
    ) -> Result<Response<proto::CreateJsapiOrderResponse>, Status> {
        let deadline = super::deadline(&request);
        let req = request.get_ref();
        let settings = self.gateway.settings();
        let now = Utc::now();
        let mut v = Validator::default();
        let out_trade_id = v.field("out_trade_id", OutTradeId::parse(&req.out_trade_id));
        let amount = v.field(
            "amount_fen",
            AmountFen::parse(req.amount_fen, settings.max_amount_fen),
        );
        let openid = v.field("openid", OpenId::parse(&req.openid));
        let expires_at = v.field(
            "expires_at",
            match &req.expires_at {
                None => Ok(now + settings.order_window),
                Some(ts) => timestamp_to_utc(ts).and_then(|at| {
                    if at > now {
                        Ok(at)
                    } else {
                        Err(format!("must be in the future, got {}", at.to_rfc3339()))
                    }
                }),
            },
        );
        let order = v.finish(|| {
            Some(NewOrder {
                out_trade_id: out_trade_id?,
                amount: amount?,
                openid: openid?,
                expires_at: expires_at?,
            })
        })?;
        let span = tracing::info_span!("create_order", out_trade_id = order.out_trade_id.as_str());
        let created =
            tracing::Instrument::instrument(self.gateway.create_order(&order, deadline), span)
                .await?;
        let p = created.params;
        Ok(Response::new(proto::CreateJsapiOrderResponse {
            pay_params: Some(proto::JsapiPayParams {
                app_id: p.app_id,
                time_stamp: p.time_stamp,
                nonce_str: p.nonce_str,
                package: p.package,
                sign_type: p.sign_type,
                pay_sign: p.pay_sign,
            }),
            response_text: created.response_text,
        }))
    }
}
