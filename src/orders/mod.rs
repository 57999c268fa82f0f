//! The order ledger: every JSAPI order the gateway asks Kongtie for, written
//! before it is sent, so the gateway can vouch for what it created.
//!
//! - `CreateJsapiOrder` is idempotent per `out_trade_id` ([`Ledger`]): the
//!   ledger decides ([`decide`]) whether a request is sent, answered from
//!   what is stored, waits for another caller's attempt, or is refused.
//!   Concurrent callers on one replica share one run (single flight); across
//!   replicas, an attempt is a claim with a lease in the shared database.
//! - Each payment notification is checked against its order at intake
//!   ([`check`]), in the notification store's transaction, and a matching
//!   payment turns the order PAID; a second, distinct payment of a PAID
//!   order is told apart (ALREADY_PAID), so nobody ships twice.
//!
//! One [`OrderStore`] trait, one backend per database (`sqlite`,
//! `postgres`), held to one test suite.

mod ledger;
mod postgres;
mod sqlite;

use std::time::Duration;

use chrono::{DateTime, Utc};

pub use ledger::{Ledger, LedgerSettings};
pub use postgres::PostgresOrders;
pub use sqlite::SqliteOrders;

use crate::store::{IncomingNotification, StoreError};

/// Where an order stands, as stored. EXPIRED is not stored: it is computed
/// when read ([`Order::state_at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderState {
    Unknown,
    Created,
    Paid,
    Expired,
    Failed,
}

impl OrderState {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderState::Unknown => "UNKNOWN",
            OrderState::Created => "CREATED",
            OrderState::Paid => "PAID",
            OrderState::Expired => "EXPIRED",
            OrderState::Failed => "FAILED",
        }
    }

    pub fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "UNKNOWN" => OrderState::Unknown,
            "CREATED" => OrderState::Created,
            "PAID" => OrderState::Paid,
            "EXPIRED" => OrderState::Expired,
            "FAILED" => OrderState::Failed,
            other => {
                return Err(StoreError::Backend(format!(
                    "unknown order state {other:?}"
                )));
            }
        })
    }
}

/// How a notification compares with the order it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderCheck {
    Matched,
    AmountMismatch,
    UnknownOrder,
    /// A payment of an order already PAID by another payment (another
    /// `TradeBillNo`): money to refund, goods not to ship again.
    AlreadyPaid,
}

impl OrderCheck {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderCheck::Matched => "MATCHED",
            OrderCheck::AmountMismatch => "AMOUNT_MISMATCH",
            OrderCheck::UnknownOrder => "UNKNOWN_ORDER",
            OrderCheck::AlreadyPaid => "ALREADY_PAID",
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            OrderCheck::Matched => "matched",
            OrderCheck::AmountMismatch => "amount_mismatch",
            OrderCheck::UnknownOrder => "unknown_order",
            OrderCheck::AlreadyPaid => "already_paid",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "MATCHED" => Some(OrderCheck::Matched),
            "AMOUNT_MISMATCH" => Some(OrderCheck::AmountMismatch),
            "UNKNOWN_ORDER" => Some(OrderCheck::UnknownOrder),
            "ALREADY_PAID" => Some(OrderCheck::AlreadyPaid),
            _ => None,
        }
    }

    /// What an operator is told of a notification that no goods should
    /// ship on (`None`: a match).
    pub fn warning(self) -> Option<&'static str> {
        match self {
            OrderCheck::Matched => None,
            OrderCheck::AmountMismatch | OrderCheck::UnknownOrder => Some(
                "notification stored, but it is not for an order the gateway created with \
                 this amount: ship nothing on it",
            ),
            OrderCheck::AlreadyPaid => Some(
                "notification stored, but it is a second payment of an order already paid \
                 by another: ship nothing on it, refund it",
            ),
        }
    }
}

/// What the intake reads of the order a notification names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ordered {
    pub amount_fen: i64,
    /// Whether it is PAID.
    pub paid: bool,
    /// The `TradeBillNo` of the notification that paid it, while stored.
    pub paid_bill_no: Option<String>,
}

/// Checks a notification against its order (`None`: no such order): the
/// notified amount (`None`: not yuan with at most two decimals) against
/// the order's, compared as money, in fen (`"0.2"` and `"0.20"` are one
/// amount). A successful payment of an order already PAID by another
/// payment (another `TradeBillNo`, or one no longer stored) is
/// ALREADY_PAID, whatever its amount: a double charge to refund.
///
/// `swept_paid`: without an order, whether retention swept one by that id
/// that was PAID (its tombstone). A successful payment of it is not the one
/// that paid it (that payment's notification is stored, or tombstoned and
/// so a repeat that is never checked): ALREADY_PAID, not UNKNOWN_ORDER.
pub fn check(
    order: Option<&Ordered>,
    swept_paid: bool,
    notification: &IncomingNotification,
) -> OrderCheck {
    if order.is_none() && swept_paid && notification.paid() {
        return OrderCheck::AlreadyPaid;
    }
    let Some(order) = order else {
        return OrderCheck::UnknownOrder;
    };
    let same_payment = order.paid_bill_no.as_deref() == Some(notification.trade_bill_no.as_str());
    if order.paid && notification.paid() && !same_payment {
        OrderCheck::AlreadyPaid
    } else if notification.amount_fen == Some(order.amount_fen) {
        OrderCheck::Matched
    } else {
        OrderCheck::AmountMismatch
    }
}

/// What a request asks for: an order's terms. `expires_at` is kept to the
/// second, as it is sent upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderTerms {
    pub out_trade_id: String,
    pub amount_fen: i64,
    pub openid: String,
    pub expires_at: DateTime<Utc>,
    /// False when the request named no expiry (the default window was
    /// applied): then a repeat matches whatever expiry is stored.
    pub explicit_expiry: bool,
}

/// An order of the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub out_trade_id: String,
    pub amount_fen: i64,
    pub openid: String,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    /// As stored: UNKNOWN, CREATED, FAILED or PAID.
    pub state: OrderState,
    /// Kongtie's `ResponseText`, once it returned one.
    pub response_text: Option<String>,
    /// When it did.
    pub params_at: Option<DateTime<Utc>>,
    /// Kongtie's code and message, when it refused the order.
    pub failure: Option<(String, String)>,
    pub paid_sequence: Option<u64>,
    /// Attempts made so far; the current one while `claim` is held.
    pub attempts: u32,
    /// Who is sending it to Kongtie now, and until when the claim holds.
    pub claim: Option<(String, DateTime<Utc>)>,
}

impl Order {
    /// The state a reader sees: EXPIRED once past `expires_at` unpaid.
    pub fn state_at(&self, now: DateTime<Utc>) -> OrderState {
        if self.state != OrderState::Paid && self.expires_at <= now {
            OrderState::Expired
        } else {
            self.state
        }
    }

    /// The pay parameters while still usable: CREATED and younger than
    /// `prepay_ttl`.
    pub fn usable_params(&self, now: DateTime<Utc>, prepay_ttl: Duration) -> Option<&str> {
        let at = self.params_at?;
        let young = now.signed_duration_since(at).to_std().unwrap_or_default() < prepay_ttl;
        (young && matches!(self.state, OrderState::Created))
            .then_some(self.response_text.as_deref()?)
    }
}

/// Why a request for an order is refused without being sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The id is taken with other terms: these.
    TermsDiffer(Box<Order>),
    AlreadyPaid,
    Expired,
    /// Retention deleted an unpaid order (expired, or refused by Kongtie)
    /// of this id: its tombstone keeps the id from being ordered again.
    Retired,
    /// The attempt this caller waited for was refused by Kongtie.
    Failed {
        code: String,
        message: String,
    },
}

impl Refusal {
    /// The answer for an id whose order retention deleted (its tombstone
    /// says whether it was paid): a paid one is already paid, as it was
    /// before the sweep; an unpaid one is not ordered again either, since
    /// its terms are gone and Kongtie may know the id.
    pub fn swept(paid: bool) -> Self {
        if paid {
            Refusal::AlreadyPaid
        } else {
            Refusal::Retired
        }
    }
}

/// What the ledger decided for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// Send it: this caller holds the claim of attempt `attempt`.
    Send {
        attempt: u32,
    },
    /// Answer with the stored `ResponseText`; nothing is sent.
    Replay(String),
    /// Another caller holds attempt `attempt`: wait, then ask again.
    Wait {
        attempt: u32,
    },
    Refused(Refusal),
}

/// A change [`decide`] asks the backend to make, in the same transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// The first attempt of a new order: insert it UNKNOWN, claimed.
    Insert,
    /// Another attempt of a stored one: claim it as `attempt`.
    Claim { attempt: u32 },
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Created {
        response_text: String,
    },
    Failed {
        code: String,
        message: String,
    },
    /// No answer: it may have reached Kongtie. Stays UNKNOWN.
    Unknown,
}

impl Outcome {
    /// What recording it writes: the state, Kongtie's `ResponseText` (with
    /// which the params' time is set) and its refusal's code and message.
    pub fn columns(&self) -> (&'static str, Option<&str>, Option<&str>, Option<&str>) {
        match self {
            Outcome::Created { response_text } => ("CREATED", Some(response_text), None, None),
            Outcome::Failed { code, message } => ("FAILED", None, Some(code), Some(message)),
            Outcome::Unknown => ("UNKNOWN", None, None, None),
        }
    }
}

/// The one decision of `CreateJsapiOrder`, given the stored order (read
/// under the backend's lock) and the request. `waited` is the attempt the
/// caller waited for, if it did.
pub fn decide(
    stored: Option<&Order>,
    terms: &OrderTerms,
    now: DateTime<Utc>,
    prepay_ttl: Duration,
    waited: Option<u32>,
) -> (Begin, Option<Write>) {
    let Some(order) = stored else {
        return (Begin::Send { attempt: 1 }, Some(Write::Insert));
    };
    let same = order.amount_fen == terms.amount_fen
        && order.openid == terms.openid
        && (!terms.explicit_expiry || order.expires_at == terms.expires_at);
    if !same {
        return (
            Begin::Refused(Refusal::TermsDiffer(Box::new(order.clone()))),
            None,
        );
    }
    match order.state_at(now) {
        OrderState::Paid => return (Begin::Refused(Refusal::AlreadyPaid), None),
        OrderState::Expired => return (Begin::Refused(Refusal::Expired), None),
        _ => {}
    }
    if let Some(params) = order.usable_params(now, prepay_ttl) {
        return (Begin::Replay(params.to_owned()), None);
    }
    if let Some((_, until)) = &order.claim
        && *until > now
    {
        return (
            Begin::Wait {
                attempt: order.attempts,
            },
            None,
        );
    }
    if let (Some(waited), OrderState::Failed, Some((code, message))) =
        (waited, order.state, &order.failure)
        && waited == order.attempts
    {
        // The attempt this caller waited for was refused: that is its
        // answer too (a fresh request would send it again).
        return (
            Begin::Refused(Refusal::Failed {
                code: code.clone(),
                message: message.clone(),
            }),
            None,
        );
    }
    let attempt = order.attempts + 1;
    (Begin::Send { attempt }, Some(Write::Claim { attempt }))
}

/// The ledger's storage: one implementation per database.
///
/// What every backend must guarantee:
/// - `begin` reads the order and applies [`decide`]'s write in one
///   transaction, under a lock that serializes `begin`s of one order across
///   every replica sharing the database, so two callers never both hold a
///   claim.
/// - An id whose order retention deleted is refused
///   ([`Refusal::swept`], from its tombstone), under the same lock.
/// - `finish` records an attempt's outcome only while that attempt still
///   holds its claim, and never takes a PAID order back.
/// - Everything is durable once the call returns.
#[async_trait::async_trait]
pub trait OrderStore: Send + Sync + 'static {
    /// Decides for `terms` (see [`decide`]) and, when it says to send,
    /// claims the order for `claimant` until `claim_until`.
    async fn begin(
        &self,
        terms: &OrderTerms,
        now: DateTime<Utc>,
        prepay_ttl: Duration,
        waited: Option<u32>,
        claimant: &str,
        claim_until: DateTime<Utc>,
    ) -> Result<Begin, StoreError>;

    /// Records how `claimant`'s attempt `attempt` ended and releases the
    /// claim.
    async fn finish(
        &self,
        out_trade_id: &str,
        claimant: &str,
        attempt: u32,
        outcome: &Outcome,
        now: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    async fn get(&self, out_trade_id: &str) -> Result<Option<Order>, StoreError>;

    /// Up to `limit` orders, newest first (by creation, then id), strictly
    /// after `after` in that order, optionally only those a reader at `now`
    /// sees in `state`.
    async fn list(
        &self,
        state: Option<OrderState>,
        after: Option<(DateTime<Utc>, String)>,
        limit: usize,
        now: DateTime<Utc>,
    ) -> Result<Vec<Order>, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(6600);

    fn terms(amount_fen: i64) -> OrderTerms {
        OrderTerms {
            out_trade_id: "A1".into(),
            amount_fen,
            openid: "o1".into(),
            expires_at: DateTime::from_timestamp(2_000_000_000, 0).unwrap(),
            explicit_expiry: true,
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_900_000_000, 0).unwrap()
    }

    fn stored(state: OrderState) -> Order {
        let t = terms(100);
        Order {
            out_trade_id: t.out_trade_id,
            amount_fen: 100,
            openid: t.openid,
            expires_at: t.expires_at,
            created_at: now(),
            state,
            response_text: Some("{}".into()),
            params_at: Some(now()),
            failure: Some(("0001".into(), "no".into())),
            paid_sequence: None,
            attempts: 1,
            claim: None,
        }
    }

    #[test]
    fn a_new_order_is_inserted_and_sent() {
        assert_eq!(
            decide(None, &terms(100), now(), TTL, None),
            (Begin::Send { attempt: 1 }, Some(Write::Insert))
        );
    }

    #[test]
    fn fresh_pay_params_are_replayed_without_a_write() {
        let order = stored(OrderState::Created);
        assert_eq!(
            decide(Some(&order), &terms(100), now(), TTL, None),
            (Begin::Replay("{}".into()), None)
        );
        // Stale ones are sent again, as the next attempt.
        let later = now() + chrono::Duration::seconds(6601);
        assert_eq!(
            decide(Some(&order), &terms(100), later, TTL, None),
            (
                Begin::Send { attempt: 2 },
                Some(Write::Claim { attempt: 2 })
            )
        );
    }

    #[test]
    fn other_terms_paid_and_expired_are_refused() {
        let order = stored(OrderState::Created);
        assert!(matches!(
            decide(Some(&order), &terms(200), now(), TTL, None).0,
            Begin::Refused(Refusal::TermsDiffer(_))
        ));
        let mut no_expiry = terms(100);
        no_expiry.expires_at = now();
        no_expiry.explicit_expiry = false;
        assert_eq!(
            decide(Some(&order), &no_expiry, now(), TTL, None).0,
            Begin::Replay("{}".into()),
            "a request naming no expiry matches the stored one"
        );
        assert_eq!(
            decide(
                Some(&stored(OrderState::Paid)),
                &terms(100),
                now(),
                TTL,
                None
            )
            .0,
            Begin::Refused(Refusal::AlreadyPaid)
        );
        let past = order.expires_at + chrono::Duration::seconds(1);
        assert_eq!(
            decide(Some(&order), &terms(100), past, TTL, None).0,
            Begin::Refused(Refusal::Expired)
        );
    }

    #[test]
    fn a_held_claim_is_waited_for_and_a_lapsed_one_taken() {
        let mut order = stored(OrderState::Unknown);
        order.claim = Some(("other".into(), now() + chrono::Duration::seconds(5)));
        assert_eq!(
            decide(Some(&order), &terms(100), now(), TTL, None),
            (Begin::Wait { attempt: 1 }, None)
        );
        let lapsed = now() + chrono::Duration::seconds(6);
        assert_eq!(
            decide(Some(&order), &terms(100), lapsed, TTL, None),
            (
                Begin::Send { attempt: 2 },
                Some(Write::Claim { attempt: 2 })
            )
        );
    }

    #[test]
    fn a_waiter_gets_the_refusal_of_the_attempt_it_waited_for() {
        let order = stored(OrderState::Failed);
        assert_eq!(
            decide(Some(&order), &terms(100), now(), TTL, Some(1)).0,
            Begin::Refused(Refusal::Failed {
                code: "0001".into(),
                message: "no".into()
            })
        );
        // A fresh request (or one that waited for an older attempt) sends
        // it again.
        assert_eq!(
            decide(Some(&order), &terms(100), now(), TTL, None).0,
            Begin::Send { attempt: 2 }
        );
    }

    fn notified(fen: Option<i64>, bill: &str) -> IncomingNotification {
        IncomingNotification {
            trade_status: "0000".into(),
            message: "SUCCESS".into(),
            out_trade_id: "A1".into(),
            trade_amount: String::new(),
            amount_fen: fen,
            trade_order_id: "984_1".into(),
            trade_bill_no: bill.into(),
            trade_time: "2018/3/2 10:00:39".into(),
            time_stamp: "1522233465".into(),
            raw_body: String::new(),
            received_at: now(),
        }
    }

    fn ordered(fen: i64, paid_bill_no: Option<&str>) -> Ordered {
        Ordered {
            amount_fen: fen,
            paid: paid_bill_no.is_some(),
            paid_bill_no: paid_bill_no.map(str::to_owned),
        }
    }

    #[test]
    fn amounts_are_checked_as_money() {
        let order = ordered(20, None);
        let check = |fen| check(Some(&order), false, &notified(fen, "b1"));
        assert_eq!(check(Some(20)), OrderCheck::Matched);
        assert_eq!(check(Some(1)), OrderCheck::AmountMismatch);
        assert_eq!(check(None), OrderCheck::AmountMismatch);
        assert_eq!(
            super::check(None, false, &notified(Some(20), "b1")),
            OrderCheck::UnknownOrder
        );
    }

    #[test]
    fn another_payment_of_a_paid_order_is_already_paid_and_its_own_is_not() {
        let paid = ordered(20, Some("b1"));
        assert_eq!(
            check(Some(&paid), false, &notified(Some(20), "b1")),
            OrderCheck::Matched
        );
        assert_eq!(
            check(Some(&paid), false, &notified(Some(20), "b2")),
            OrderCheck::AlreadyPaid
        );
        assert_eq!(
            check(Some(&paid), false, &notified(Some(1), "b2")),
            OrderCheck::AlreadyPaid,
            "a double charge, whatever its amount"
        );
        // The paying notification swept: any payment is another one.
        let swept = Ordered {
            paid_bill_no: None,
            ..paid.clone()
        };
        assert_eq!(
            check(Some(&swept), false, &notified(Some(20), "b1")),
            OrderCheck::AlreadyPaid
        );
        // A notification that reports no payment is no double charge.
        let mut failed = notified(Some(20), "b2");
        failed.trade_status = "0001".into();
        assert_eq!(check(Some(&paid), false, &failed), OrderCheck::Matched);
    }
}
