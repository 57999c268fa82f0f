//! `CreateJsapiOrder` through the ledger: decide, send at most once per
//! attempt, record the outcome.
//!
//! Concurrent callers share a run only when they ask for the same order on
//! the same terms; a caller with other terms runs on its own, and the
//! store's `begin` (serialised per order, on every replica) refuses
//! whichever comes second. A run is the ledger's, not its callers': it runs
//! in a task of its own, bounded by the upstream timeout alone, so the
//! ledger records how it really ended even when every caller's deadline
//! has passed. Runs are bounded (`max_runs` at once per replica), since
//! callers that leave no longer hold the server's call slots for them, and
//! a graceful shutdown waits for the runs in flight ([`Ledger::drain`])
//! before the store closes, so their outcomes are recorded, not left
//! UNKNOWN.

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use tokio::sync::Semaphore;

use super::{Begin, Order, OrderStore, OrderTerms, Outcome, Refusal};
use crate::{
    cache::SingleFlight,
    domain::NewOrder,
    error::{Error, Result},
    metrics::Metrics,
    upstream::{CreatedOrder, Endpoint, KongtieClient, wire},
};

#[derive(Debug, Clone, Copy)]
pub struct LedgerSettings {
    /// Stored pay parameters younger than this are answered again without
    /// asking Kongtie (WeChat's `prepay_id` lives two hours).
    pub prepay_ttl: Duration,
    /// How long an attempt's claim holds: longer than any upstream call
    /// (a claim outlives a crashed replica by at most this).
    pub claim_lease: Duration,
    /// How many runs this replica has with Kongtie at once. Each holds a
    /// task, a claim and an upstream connection for up to the upstream
    /// timeout, after its callers may have gone.
    pub max_runs: u32,
}

pub struct Ledger {
    store: Arc<dyn OrderStore>,
    client: Arc<KongtieClient>,
    settings: LedgerSettings,
    metrics: Arc<Metrics>,
    /// Names this process in its claims.
    claimant: String,
    flights: SingleFlight<FlightKey, CreatedOrder>,
    /// One permit per run in flight: the bound, and what shutdown drains.
    runs: Arc<Semaphore>,
}

/// Which calls share a run: those with the same order id, amount, openid
/// and, when they name one, expiry. A call naming no expiry takes whatever
/// expiry is stored, so it shares a run with any other such call (their
/// default windows differ only by when they arrived), but not with one
/// naming an expiry: that one may be refused where it would be answered.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FlightKey {
    out_trade_id: String,
    amount_fen: i64,
    openid: String,
    expires_at: Option<chrono::DateTime<Utc>>,
}

impl FlightKey {
    fn of(terms: &OrderTerms) -> Self {
        Self {
            out_trade_id: terms.out_trade_id.clone(),
            amount_fen: terms.amount_fen,
            openid: terms.openid.clone(),
            expires_at: terms.explicit_expiry.then_some(terms.expires_at),
        }
    }
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
            runs: Arc::new(Semaphore::new(settings.max_runs as usize)),
        }
    }

    pub fn store(&self) -> &Arc<dyn OrderStore> {
        &self.store
    }

    pub fn settings(&self) -> LedgerSettings {
        self.settings
    }

    /// Creates `order`, or answers for it as the ledger says. Concurrent
    /// callers with one order's same terms share one run; `deadline`
    /// bounds this caller's wait only, never the run.
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
        let key = FlightKey::of(&terms);
        let ledger = Arc::clone(self);
        let new_order = order.clone();
        let runs = Arc::clone(&self.runs);
        let limit = self.settings.max_runs as usize;
        let run = move || {
            // Taken when the run starts (joiners share it), held until it ends.
            let permit = runs.try_acquire_owned();
            async move {
                let _permit = permit.map_err(|_| Error::TooManyOrdersInFlight { limit })?;
                ledger.run(terms, new_order).await
            }
        };
        let flight = self.flights.run(key, run);
        match deadline {
            None => flight.await.0,
            // The caller leaves; its order is still with Kongtie (or with
            // another caller's attempt there), and the run records the
            // answer for whoever asks next.
            Some(d) => tokio::time::timeout(d, flight).await.map_or(
                Err(Error::UpstreamTimeout {
                    endpoint: Endpoint::ParTrade,
                    after: d,
                }),
                |(r, _)| r,
            ),
        }
    }

    /// Waits for every run in flight to end (record its outcome), and
    /// starts no more: for a graceful shutdown, before the store closes.
    pub async fn drain(&self) {
        if let Ok(permits) = self.runs.acquire_many(self.settings.max_runs).await {
            permits.forget();
        }
        self.runs.close();
    }

    async fn run(&self, terms: OrderTerms, order: NewOrder) -> Result<CreatedOrder> {
        let started = tokio::time::Instant::now();
        // Another's attempt ends within its lease, or its claim lapses.
        let give_up = started + self.settings.claim_lease;
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
                    return self.send(&terms, &order, attempt).await;
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
    ) -> Result<CreatedOrder> {
        // Bounded by the upstream timeout alone: see the module's doc.
        let answer = self.client.create_order(order, None).await;
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
            endpoint: Endpoint::ParTrade,
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
