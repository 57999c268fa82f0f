//! The four Kongtie calls, by name. It sits below everything else (it
//! imports nothing of the crate), so the error type, the metrics and the
//! client can all name an endpoint without depending on one another.

use std::fmt;

/// The four Kongtie calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    GetAccessToken,
    GetJsApiTicket,
    GetWeChatAccessToken,
    ParTrade,
}

impl Endpoint {
    pub const ALL: [Endpoint; 4] = [
        Endpoint::GetAccessToken,
        Endpoint::GetJsApiTicket,
        Endpoint::GetWeChatAccessToken,
        Endpoint::ParTrade,
    ];

    /// The name Kongtie gives it (the last segment of its URL).
    pub const fn name(self) -> &'static str {
        match self {
            Endpoint::GetAccessToken => "GetAccessToken",
            Endpoint::GetJsApiTicket => "GetJsApiTicket",
            Endpoint::GetWeChatAccessToken => "GetWeChatAccessToken",
            Endpoint::ParTrade => "ParTrade",
        }
    }

    /// The settings a request's signature to this endpoint is made of, for
    /// an operator whose signature Kongtie refused.
    pub fn signing_settings(self) -> &'static str {
        match self {
            Endpoint::ParTrade => "KONGTIE_PAY_TOKEN and KONGTIE_PAY_SOURCE_FROM",
            _ => "KONGTIE_TOKEN and KONGTIE_SOURCE_FROM",
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
