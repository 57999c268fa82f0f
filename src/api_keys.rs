//! Who may call: API keys sent as `authorization: Bearer <key>`.
//!
//! Only SHA-256 hashes of the configured keys are kept in memory; a
//! presented key is hashed and compared with every one in constant time.
//! The check runs in `src/grpc/who_may_call.rs`, for every request on the
//! gRPC port but health and reflection.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};
use tonic::{Request, Status, service::Interceptor};

#[derive(Clone, Default)]
pub struct ApiKeys {
    hashes: Arc<Vec<[u8; 32]>>,
}

impl ApiKeys {
    pub fn new<'a>(keys: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            hashes: Arc::new(
                keys.into_iter()
                    .map(|k| Sha256::digest(k.as_bytes()).into())
                    .collect(),
            ),
        }
    }

    /// With no keys, every caller is let in.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn accepts(&self, presented: &str) -> bool {
        let hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = Choice::from(0);
        for known in self.hashes.iter() {
            found |= known.ct_eq(&hash);
        }
        found.into()
    }
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.hashes.len())
    }
}

impl Interceptor for ApiKeys {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if self.is_empty() {
            return Ok(request);
        }
        let header = request.metadata().get("authorization");
        match Presented::of(header.map(|v| v.to_str().unwrap_or_default())) {
            Presented::Bearer(key) if self.accepts(key) => Ok(request),
            Presented::Bearer(_) => Err(Status::unauthenticated("invalid API key")),
            Presented::NoScheme => Err(Status::unauthenticated(
                "the authorization header lacks the `Bearer ` scheme: send `authorization: \
                 Bearer <key>`",
            )),
            Presented::OtherScheme => Err(Status::unauthenticated(
                "the authorization header's scheme is not Bearer: send `authorization: Bearer \
                 <key>`",
            )),
            Presented::Missing => Err(Status::unauthenticated(
                "missing API key: send `authorization: Bearer <key>`",
            )),
        }
    }
}

/// What an `authorization` header holds, told apart so that a caller who
/// sent a key the wrong way hears how, not that none was sent. The key and
/// the scheme are never repeated back.
#[derive(Debug, PartialEq, Eq)]
enum Presented<'a> {
    Bearer(&'a str),
    /// One word: most likely a bare key.
    NoScheme,
    /// `Basic ...` or any scheme but Bearer.
    OtherScheme,
    /// No header, or an empty one.
    Missing,
}

impl<'a> Presented<'a> {
    fn of(header: Option<&'a str>) -> Self {
        let value = header.map(str::trim).unwrap_or_default();
        if value.is_empty() {
            return Presented::Missing;
        }
        match value.split_once(' ') {
            Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") => match key.trim() {
                "" => Presented::Missing,
                key => Presented::Bearer(key),
            },
            Some(_) => Presented::OtherScheme,
            None if value.eq_ignore_ascii_case("bearer") => Presented::Missing,
            None => Presented::NoScheme,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(keys: &ApiKeys, header: Option<&str>) -> Result<(), tonic::Code> {
        let mut request = Request::new(());
        if let Some(h) = header {
            request
                .metadata_mut()
                .insert("authorization", h.parse().unwrap());
        }
        keys.clone().call(request).map(drop).map_err(|s| s.code())
    }

    #[test]
    fn only_a_configured_key_passes() {
        let keys = ApiKeys::new(["k1-secret", "k2-secret"]);
        assert_eq!(call(&keys, Some("Bearer k2-secret")), Ok(()));
        assert_eq!(call(&keys, Some("bearer k1-secret")), Ok(()));
        assert_eq!(
            call(&keys, Some("Bearer k3-secret")),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            call(&keys, Some("k1-secret")),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            call(&keys, Some("Basic k1-secret")),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(call(&keys, None), Err(tonic::Code::Unauthenticated));
    }

    fn message(keys: &ApiKeys, header: Option<&str>) -> String {
        let mut request = Request::new(());
        if let Some(h) = header {
            request
                .metadata_mut()
                .insert("authorization", h.parse().unwrap());
        }
        keys.clone().call(request).unwrap_err().message().to_owned()
    }

    #[test]
    fn a_key_sent_without_the_bearer_scheme_is_told_so_and_not_repeated() {
        let keys = ApiKeys::new(["k1-secret"]);
        let bare = message(&keys, Some("k1-secret"));
        assert!(bare.contains("lacks the `Bearer ` scheme"), "{bare}");
        let basic = message(&keys, Some("Basic k1-secret"));
        assert!(basic.contains("scheme is not Bearer"), "{basic}");
        for told in [&bare, &basic] {
            assert!(
                !told.contains("k1-secret") && !told.contains("Basic"),
                "{told}"
            );
        }
        for missing in [None, Some(""), Some("Bearer"), Some("Bearer  ")] {
            assert!(
                message(&keys, missing).starts_with("missing API key"),
                "{missing:?}"
            );
        }
    }

    #[test]
    fn without_keys_everyone_passes() {
        assert_eq!(call(&ApiKeys::default(), None), Ok(()));
    }
}
