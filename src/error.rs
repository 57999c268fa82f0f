//! The crate's one error type, and the one place it becomes a gRPC status.
//! It depends on nothing of the crate but [`Endpoint`], which depends on
//! nothing.
//!
//! Every variant carries only what is safe to show a caller: never a token,
//! a `Sign` or an access token. Upstream failures keep Kongtie's own code
//! and message so a caller can tell "Kongtie said no" from "Kongtie was
//! unreachable".

use std::{collections::HashMap, fmt, time::Duration};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::endpoint::Endpoint;

/// `ErrorInfo.domain` of every error this service reports.
pub const ERROR_DOMAIN: &str = "kongtie";

/// One bad field of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: &'static str,
    pub description: String,
}

/// An order's stored terms, told to a caller whose request differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTerms {
    pub out_trade_id: String,
    pub amount_fen: i64,
    pub openid: String,
    /// RFC 3339.
    pub expires_at: String,
}

/// A consumer that exists, told to a caller who asked to create it with
/// other settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerExists {
    pub name: String,
    /// Its kind and settings, by ErrorInfo key.
    pub settings: HashMap<String, String>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("invalid request: {}", Violations(.0))]
    InvalidArgument(Vec<FieldViolation>),

    #[error("Kongtie {endpoint} refused the request: {code} {message}")]
    UpstreamRejected {
        endpoint: Endpoint,
        code: String,
        message: String,
    },

    /// Kongtie refused our `Sign`: the gateway's token or `SourceFrom` is
    /// wrong, which only its operator can fix.
    #[error("Kongtie {endpoint} refused the gateway's signature: {code} {message}")]
    UpstreamSignatureRejected {
        endpoint: Endpoint,
        code: String,
        message: String,
    },

    #[error("Kongtie {endpoint} is unavailable: {detail}")]
    UpstreamUnavailable { endpoint: Endpoint, detail: String },

    #[error("Kongtie {endpoint} did not answer within {}ms", .after.as_millis())]
    UpstreamTimeout { endpoint: Endpoint, after: Duration },

    #[error("Kongtie {endpoint} sent an answer we cannot use: {what}")]
    UpstreamBadResponse { endpoint: Endpoint, what: String },

    /// An answer over the size limit: refused by its `Content-Length`
    /// unread, or cut at the limit. Kongtie's answers are a few kilobytes;
    /// this is a proxy's page or a fault, and what it held is unknown.
    #[error(
        "Kongtie {endpoint} sent an answer over {} KiB; it was not read",
        .limit / 1024
    )]
    UpstreamAnswerTooLarge { endpoint: Endpoint, limit: usize },

    #[error("the caller's deadline of {}ms passed", .0.as_millis())]
    DeadlineExceeded(Duration),

    /// The store failed. Its text (the database's own words) goes to the
    /// server log only; the caller is told the store is unavailable.
    #[error("the notification store is unavailable; try again")]
    Store(String),

    /// A sequence past the newest stored one: a position from elsewhere
    /// (another deployment, a restored backup), which waiting would never
    /// reach.
    #[error("{field} {requested} is beyond the newest stored sequence {last}")]
    SequenceBeyondLast {
        field: &'static str,
        requested: u64,
        last: u64,
    },

    /// A position before the first retained sequence: the events between
    /// were deleted by retention, and resuming there would skip them.
    #[error(
        "{field} {requested} is before the first retained sequence {first}: the events \
         between were deleted by retention"
    )]
    SequenceBeforeRetained {
        field: &'static str,
        requested: u64,
        first: u64,
    },

    #[error("not configured: {0}")]
    NotConfigured(&'static str),

    /// A subscription past a limit (per connection, or the server's).
    #[error(
        "too many subscriptions on this {scope} (at most {limit}); end one, or subscribe on \
         another connection"
    )]
    TooManySubscriptions { scope: &'static str, limit: usize },

    /// As many orders as a replica runs at once are already with Kongtie
    /// (their callers may have left): a new one waits for one to end.
    #[error("{limit} orders are already being created; try again shortly")]
    TooManyOrdersInFlight { limit: usize },

    #[error(
        "order {} exists with other terms (amount_fen {}, openid {}, expires_at {})",
        .0.out_trade_id, .0.amount_fen, .0.openid, .0.expires_at
    )]
    OrderTermsDiffer(Box<StoredTerms>),

    #[error("order {0} is already paid")]
    OrderAlreadyPaid(String),

    #[error("order {0} has expired")]
    OrderExpired(String),

    #[error(
        "order id {0} was used by an unpaid order that retention has deleted; use a new \
         out_trade_id"
    )]
    OrderIdRetired(String),

    #[error("no order {0}")]
    OrderNotFound(String),

    #[error("no consumer {0}")]
    ConsumerNotFound(String),

    /// A consumer used as the other kind (a work queue subscribed to, a
    /// cursor fetched from...).
    #[error(
        "consumer {name} is a {kind} consumer; {}",
        if *.kind == "cursor" {
            "read it with SubscribeNotifications and acknowledge with sequence"
        } else {
            "read it with FetchNotifications and acknowledge with sequences"
        }
    )]
    ConsumerKindMismatch { name: String, kind: &'static str },

    #[error("consumer {} exists with other settings", .0.name)]
    ConsumerExists(Box<ConsumerExists>),

    /// A cursor consumer that another stream reads now.
    #[error(
        "consumer {name} is read by another stream; one stream at a time reads a cursor \
         consumer (its hold ends with that stream, or {}s after its replica stopped)",
        .hold.as_secs()
    )]
    ConsumerInUse { name: String, hold: Duration },

    #[error("sequence {sequence} was not delivered to consumer {name}")]
    NotDelivered { name: String, sequence: u64 },

    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(field: &'static str, description: impl Into<String>) -> Self {
        Error::InvalidArgument(vec![FieldViolation {
            field,
            description: description.into(),
        }])
    }

    /// True when Kongtie gave a definite answer (so asking again with the
    /// same input would get the same answer), false when we do not know
    /// whether the request was even processed.
    pub fn is_definitive(&self) -> bool {
        !matches!(
            self,
            Error::UpstreamUnavailable { .. }
                | Error::UpstreamAnswerTooLarge { .. }
                | Error::UpstreamTimeout { .. }
                | Error::DeadlineExceeded(_)
                | Error::Internal(_)
        )
    }
}

struct Violations<'a>(&'a [FieldViolation]);

impl fmt::Display for Violations<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, v) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", v.field, v.description)?;
        }
        Ok(())
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        let message = err.to_string();
        let mut details = ErrorDetails::new();
        let code = match &err {
            Error::InvalidArgument(violations) => {
                for v in violations {
                    details.add_bad_request_violation(v.field, v.description.clone());
                }
                Code::InvalidArgument
            }
            Error::UpstreamRejected {
                endpoint,
                code,
                message,
            } => {
                let meta = upstream_meta(*endpoint, code, message);
                if *endpoint == Endpoint::GetWeChatAccessToken {
                    // The one input of a code exchange is the code: a refusal
                    // means that code is bad (used, expired or unknown).
                    details.add_bad_request_violation("code", message.clone());
                    details.set_error_info("OAUTH_CODE_REJECTED", ERROR_DOMAIN, meta);
                    Code::InvalidArgument
                } else {
                    details.set_error_info("UPSTREAM_REJECTED", ERROR_DOMAIN, meta);
                    Code::FailedPrecondition
                }
            }
            Error::UpstreamSignatureRejected {
                endpoint,
                code,
                message,
            } => {
                let meta = upstream_meta(*endpoint, code, message);
                details.set_error_info("UPSTREAM_SIGNATURE_REJECTED", ERROR_DOMAIN, meta);
                // The caller did nothing wrong and cannot fix it.
                Code::Internal
            }
            Error::UpstreamUnavailable { endpoint, .. } => {
                details.set_error_info(
                    "UPSTREAM_UNAVAILABLE",
                    ERROR_DOMAIN,
                    endpoint_meta(*endpoint),
                );
                Code::Unavailable
            }
            Error::UpstreamTimeout { endpoint, .. } => {
                details.set_error_info("UPSTREAM_TIMEOUT", ERROR_DOMAIN, endpoint_meta(*endpoint));
                Code::DeadlineExceeded
            }
            Error::UpstreamBadResponse { endpoint, .. } => {
                details.set_error_info(
                    "UPSTREAM_BAD_RESPONSE",
                    ERROR_DOMAIN,
                    endpoint_meta(*endpoint),
                );
                Code::Internal
            }
            Error::UpstreamAnswerTooLarge { endpoint, limit } => {
                let mut meta = endpoint_meta(*endpoint);
                meta.insert("limit_bytes".to_owned(), limit.to_string());
                details.set_error_info("UPSTREAM_ANSWER_TOO_LARGE", ERROR_DOMAIN, meta);
                // Kongtie's side, not the caller's nor ours: as when it is
                // unreachable.
                Code::Unavailable
            }
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::SequenceBeyondLast { field, last, .. } => {
                details.add_bad_request_violation(*field, message.clone());
                details.set_error_info(
                    "SEQUENCE_BEYOND_LAST",
                    ERROR_DOMAIN,
                    HashMap::from([("last_sequence".to_owned(), last.to_string())]),
                );
                Code::OutOfRange
            }
            Error::SequenceBeforeRetained { field, first, .. } => {
                details.add_bad_request_violation(*field, message.clone());
                details.set_error_info(
                    "SEQUENCE_BEFORE_RETAINED",
                    ERROR_DOMAIN,
                    HashMap::from([("first_retained_sequence".to_owned(), first.to_string())]),
                );
                Code::OutOfRange
            }
            Error::Store(detail) => {
                tracing::error!(error = %detail, "store failure answered UNAVAILABLE");
                details.set_error_info("STORE_UNAVAILABLE", ERROR_DOMAIN, HashMap::new());
                Code::Unavailable
            }
            Error::OrderTermsDiffer(stored) => {
                let meta = HashMap::from([
                    ("out_trade_id".to_owned(), stored.out_trade_id.clone()),
                    ("amount_fen".to_owned(), stored.amount_fen.to_string()),
                    ("openid".to_owned(), stored.openid.clone()),
                    ("expires_at".to_owned(), stored.expires_at.clone()),
                ]);
                details.set_error_info("ORDER_TERMS_DIFFER", ERROR_DOMAIN, meta);
                Code::AlreadyExists
            }
            Error::OrderAlreadyPaid(id) | Error::OrderExpired(id) | Error::OrderIdRetired(id) => {
                let reason = match err {
                    Error::OrderAlreadyPaid(_) => "ORDER_ALREADY_PAID",
                    Error::OrderExpired(_) => "ORDER_EXPIRED",
                    _ => "ORDER_ID_RETIRED",
                };
                let meta = HashMap::from([("out_trade_id".to_owned(), id.clone())]);
                details.set_error_info(reason, ERROR_DOMAIN, meta);
                Code::FailedPrecondition
            }
            Error::OrderNotFound(_) | Error::ConsumerNotFound(_) => Code::NotFound,
            Error::ConsumerKindMismatch { name, kind } => {
                let meta = HashMap::from([
                    ("consumer".to_owned(), name.clone()),
                    ("kind".to_owned(), (*kind).to_owned()),
                ]);
                details.set_error_info("CONSUMER_KIND_MISMATCH", ERROR_DOMAIN, meta);
                Code::FailedPrecondition
            }
            Error::ConsumerExists(existing) => {
                let mut meta = existing.settings.clone();
                meta.insert("consumer".to_owned(), existing.name.clone());
                details.set_error_info("CONSUMER_EXISTS", ERROR_DOMAIN, meta);
                Code::AlreadyExists
            }
            Error::ConsumerInUse { name, .. } => {
                let meta = HashMap::from([("consumer".to_owned(), name.clone())]);
                details.set_error_info("CONSUMER_IN_USE", ERROR_DOMAIN, meta);
                details.set_retry_info(Some(Duration::from_secs(1)));
                Code::FailedPrecondition
            }
            Error::NotDelivered { name, sequence } => {
                let meta = HashMap::from([
                    ("consumer".to_owned(), name.clone()),
                    ("sequence".to_owned(), sequence.to_string()),
                ]);
                details.set_error_info("NOT_DELIVERED", ERROR_DOMAIN, meta);
                Code::FailedPrecondition
            }
            Error::TooManySubscriptions { scope, limit } => {
                details.set_error_info(
                    "TOO_MANY_SUBSCRIPTIONS",
                    ERROR_DOMAIN,
                    HashMap::from([
                        ("scope".to_owned(), (*scope).to_owned()),
                        ("limit".to_owned(), limit.to_string()),
                    ]),
                );
                Code::ResourceExhausted
            }
            Error::TooManyOrdersInFlight { limit } => {
                details.set_error_info(
                    "TOO_MANY_ORDERS_IN_FLIGHT",
                    ERROR_DOMAIN,
                    HashMap::from([("limit".to_owned(), limit.to_string())]),
                );
                Code::ResourceExhausted
            }
            Error::NotConfigured(_) => {
                details.set_error_info("NOT_CONFIGURED", ERROR_DOMAIN, HashMap::new());
                Code::FailedPrecondition
            }
            Error::Internal(_) => Code::Internal,
        };
        Status::with_error_details(code, message, details)
    }
}

fn endpoint_meta(endpoint: Endpoint) -> HashMap<String, String> {
    HashMap::from([("endpoint".to_owned(), endpoint.to_string())])
}

/// The endpoint, and Kongtie's own code and message for its refusal.
fn upstream_meta(endpoint: Endpoint, code: &str, message: &str) -> HashMap<String, String> {
    let mut meta = endpoint_meta(endpoint);
    meta.insert("upstream_code".into(), code.to_owned());
    meta.insert("upstream_message".into(), message.to_owned());
    meta
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod layering {
    /// The error type is imported by every layer, so it imports none of
    /// them (a cycle would let a change anywhere ripple into it).
    #[test]
    fn the_error_type_imports_nothing_of_the_crate_but_the_endpoint_names() {
        for (file, text) in [
            ("error.rs", include_str!("error.rs")),
            ("endpoint.rs", include_str!("endpoint.rs")),
        ] {
            let crate_paths: Vec<&str> = text
                .lines()
                .filter(|l| l.contains(concat!("crate", "::")) && !l.trim_start().starts_with("//"))
                .collect();
            let allowed: &[&str] = if file == "error.rs" {
                &[concat!("use crate", "::endpoint::Endpoint;")]
            } else {
                &[]
            };
            assert_eq!(crate_paths, allowed, "{file}");
        }
    }
}
