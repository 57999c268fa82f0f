//! `CreateJsapiOrder` through the ledger: decide, send at most once per
//! attempt, record the outcome.

use std::{sync::Arc, time::Duration};

use chrono::Utc;

use super::{Begin, Order, OrderStore, OrderTerms, Outcome, Refusal};
use crate::{
    cache::SingleFlight,
    domain::NewOrder,
    error::{Error, Result},
    metrics::Metrics,
    upstream::{CreatedOrder, KongtieClient, wire},
};

#[derive(Debug, Clone, Copy)]
pub struct LedgerSettings {
    /// Stored pay parameters younger than this are answered again without
    /// asking Kongtie (WeChat's `prepay_id` lives two hours).
    pub prepay_ttl: Duration,
    /// How long an attempt's claim holds: longer than any upstream call
    /// (a claim outlives a crashed replica by at most this).
    pub claim_lease: Duration,
}

pub struct Ledger {
    store: Arc<dyn OrderStore>,
    client: Arc<KongtieClient>,
    settings: LedgerSettings,
    metrics: Arc<Metrics>,
    /// Names this process in its claims.
    claimant: String,
    flights: SingleFlight<String, CreatedOrder>,
}

/// How often a caller waiting on another's attempt looks again.
const WAIT_POLL: Duration = Duration::from_millis(25);

impl Ledger {
    pub fn new(
        store: Arc<dyn OrderStore>,
        client: Arc<KongtieClient>,
        settings: LedgerSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            client,
            settings,
            metrics,
            claimant: format!("{:016x}", rand::random::<u64>()),
            flights: SingleFlight::default(),
        }
    }

    pub fn store(&self) -> &Arc<dyn OrderStore> {
        &self.store
    }

    pub fn settings(&self) -> LedgerSettings {
        self.settings
    }

    /// Creates `order`, or answers for it as the ledger says. Concurrent
    /// callers with one order id share one run.
    pub async fn create(
        self: &Arc<Self>,
        order: &NewOrder,
        explicit_expiry: bool,
        deadline: Option<Duration>,
    ) -> Result<CreatedOrder> {
        let terms = OrderTerms {
            out_trade_id: order.out_trade_id.as_str().to_owned(),
            amount_fen: order.amount.fen(),
            openid: order.openid.as_str().to_owned(),
            expires_at: order.expires_at,
            explicit_expiry,
        };
        let ledger = Arc::clone(self);
        let new_order = order.clone();
        let run = move || async move { ledger.run(terms, new_order, deadline).await };
        let flight = self
            .flights
            .run(order.out_trade_id.as_str().to_owned(), run);
        match deadline {
            None => flight.await.0,
            Some(d) => tokio::time::timeout(d, flight)
                .await
                .map_or(Err(Error::DeadlineExceeded(d)), |(r, _)| r),
        }
    }

    async fn run(
        &self,
        terms: OrderTerms,
        order: NewOrder,
        deadline: Option<Duration>,
    ) -> Result<CreatedOrder> {
        let started = tokio::time::Instant::now();
        let give_up = started + deadline.unwrap_or(self.settings.claim_lease);
        let mut waited = None;
        loop {
            let now = Utc::now();
            let claim_until =
                now + chrono::Duration::from_std(self.settings.claim_lease).unwrap_or_default();
            let begin = self
                .store
                .begin(
                    &terms,
                    now,
                    self.settings.prepay_ttl,
                    waited,
                    &self.claimant,
                    claim_until,
                )
                .await?;
            match begin {
                Begin::Replay(response_text) => {
                    self.metrics.order_request("replayed");
                    return created(response_text);
                }
                Begin::Refused(refusal) => {
                    self.metrics.order_request("refused");
                    return Err(refused(&terms, refusal));
                }
                Begin::Wait { attempt } => {
                    if tokio::time::Instant::now() >= give_up {
                        return Err(Error::DeadlineExceeded(started.elapsed()));
                    }
                    waited = Some(attempt);
                    tokio::time::sleep(WAIT_POLL).await;
                }
                Begin::Send { attempt } => {
                    self.metrics.order_request("sent");
                    let left = deadline.map(|d| d.saturating_sub(started.elapsed()));
                    return self.send(&terms, &order, attempt, left).await;
                }
            }
        }
    }

    /// Sends attempt `attempt` and records how it ended.
    async fn send(
        &self,
        terms: &OrderTerms,
        order: &NewOrder,
        attempt: u32,
        deadline: Option<Duration>,
    ) -> Result<CreatedOrder> {
        let answer = self.client.create_order(order, deadline).await;
        let outcome = match &answer {
            Ok(created) => Outcome::Created {
                response_text: created.response_text.clone(),
            },
            Err(
                Error::UpstreamRejected { code, message, .. }
                | Error::UpstreamSignatureRejected { code, message, .. },
            ) => Outcome::Failed {
                code: code.clone(),
                message: message.clone(),
            },
            Err(_) => Outcome::Unknown,
        };
        self.store
            .finish(
                &terms.out_trade_id,
                &self.claimant,
                attempt,
                &outcome,
                Utc::now(),
            )
            .await?;
        answer
    }
}

fn created(response_text: String) -> Result<CreatedOrder> {
    let params: wire::PayParams = serde_json::from_str(&response_text)
        .map_err(|_| Error::Internal("stored pay parameters do not parse".into()))?;
    Ok(CreatedOrder {
        params,
        response_text,
    })
}

fn refused(terms: &OrderTerms, refusal: Refusal) -> Error {
    match refusal {
        Refusal::TermsDiffer(stored) => Error::OrderTermsDiffer(Box::new(stored_terms(&stored))),
        Refusal::AlreadyPaid => Error::OrderAlreadyPaid(terms.out_trade_id.clone()),
        Refusal::Expired => Error::OrderExpired(terms.out_trade_id.clone()),
        Refusal::Retired => Error::OrderIdRetired(terms.out_trade_id.clone()),
        Refusal::Failed { code, message } => Error::UpstreamRejected {
            endpoint: crate::upstream::Endpoint::ParTrade,
            code,
            message,
        },
    }
}

/// What a caller is told of the stored terms.
fn stored_terms(order: &Order) -> crate::error::StoredTerms {
    crate::error::StoredTerms {
        out_trade_id: order.out_trade_id.clone(),
        amount_fen: order.amount_fen,
        openid: order.openid.clone(),
        expires_at: order.expires_at.to_rfc3339(),
    }
}
