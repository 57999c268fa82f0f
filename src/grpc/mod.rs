//! The gRPC face of the gateway: one file per service, each validating its
//! request, calling [`Gateway`](crate::gateway::Gateway) and mapping back.

mod auth;
pub mod codec;
mod consumers;
pub mod keyless;
pub mod limits;
pub mod listener;
pub mod observe;
pub mod origin;
mod payment;
pub mod subscription_limits;
mod ticket;
pub mod who_may_call;

use std::time::Duration;

pub use auth::AuthService;
pub use payment::PaymentService;
pub use ticket::TicketService;

/// The time we may spend on a call: the caller's `grpc-timeout` less a
/// margin, so that our DEADLINE_EXCEEDED, with its details, reaches the
/// caller before its own timer fires.
pub(crate) fn deadline<T>(request: &tonic::Request<T>) -> Option<Duration> {
    let timeout = parse_grpc_timeout(request.metadata().get("grpc-timeout")?.to_str().ok()?)?;
    Some(timeout.saturating_sub((timeout / 10).min(Duration::from_millis(50))))
}

/// Parses `grpc-timeout`: at most 8 digits and a unit (H M S m u n).
pub(crate) fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units_parse() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5x"), None);
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }
}
