//! What the simulator remembers: tokens and tickets that rotate, OAuth
//! codes, orders and their payments, the requests it saw, a fault to
//! inject, and the notifications it sent.

use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use rand::{Rng, distr::Alphanumeric};
use url::Url;

use super::{Fault, SandboxConfig, SeenRequest, notifier::NotifyAttempt};

/// How long a replaced access token or ticket keeps working, as WeChat does.
const GRACE: Duration = Duration::from_secs(300);

pub(super) struct Rotating {
    pub(super) prefix: &'static str,
    pub(super) current: String,
    pub(super) issued: Instant,
    pub(super) previous: Option<(String, Instant)>,
}

impl Rotating {
    pub(super) fn new(prefix: &'static str) -> Self {
        Self {
            prefix,
            current: format!("{prefix}_{}", random_alnum(96)),
            issued: Instant::now(),
            previous: None,
        }
    }

    pub(super) fn current(&mut self, lifetime: Duration) -> String {
        if self.issued.elapsed() >= lifetime {
            self.rotate();
        }
        self.current.clone()
    }

    pub(super) fn rotate(&mut self) {
        let new = format!("{}_{}", self.prefix, random_alnum(96));
        let old = std::mem::replace(&mut self.current, new);
        self.previous = Some((old, Instant::now() + GRACE));
        self.issued = Instant::now();
    }

    pub(super) fn accepts(&self, value: &str) -> bool {
        value == self.current
            || self
                .previous
                .as_ref()
                .is_some_and(|(old, until)| old == value && Instant::now() < *until)
    }
}

pub(super) struct Grant {
    pub(super) openid: String,
    pub(super) scope: String,
    pub(super) expires: Instant,
    pub(super) used: bool,
}

pub(super) struct Order {
    pub(super) amount_fen: i64,
    /// `PayAmount` as it was sent, which the notification repeats.
    pub(super) pay_amount: String,
    pub(super) openid: String,
    pub(super) response_text: String,
    /// Set once paid: a second pay trigger resends the same payment.
    pub(super) payment: Option<Payment>,
}

#[derive(Clone)]
pub(super) struct Payment {
    pub(super) trade_order_id: String,
    pub(super) trade_bill_no: String,
    pub(super) trade_time: String,
}

pub(super) struct SimState {
    pub(super) access_token: Rotating,
    pub(super) ticket: Rotating,
    pub(super) codes: HashMap<String, Grant>,
    pub(super) orders: HashMap<String, Order>,
    pub(super) seen: Vec<SeenRequest>,
    pub(super) fault: Option<Fault>,
    pub(super) notify_url: Option<Url>,
    pub(super) notify_attempts: Vec<NotifyAttempt>,
}

pub(super) struct Shared {
    pub(super) config: SandboxConfig,
    pub(super) http: reqwest::Client,
    pub(super) state: Mutex<SimState>,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(super) fn random_alnum(len: usize) -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}
