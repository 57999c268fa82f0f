//! Who may call, as a layer every request on the gRPC port passes through
//! (gRPC, and Connect already turned into its gRPC call), before the call
//! limits and the router: a call without a configured API key is refused
//! UNAUTHENTICATED here, its body unread. Only health and reflection are
//! open (`keyless.rs` says why); a service added to the router is keyed
//! without anyone having to remember it.

use std::{
    future::{Ready, ready},
    task::{Context, Poll},
};

use axum::http::{Request, Response};
use futures::future::Either;
use tonic::{body::Body, metadata::MetadataMap, service::Interceptor};
use tower::{Layer, Service};

use crate::api_keys::ApiKeys;

/// The services any caller may reach, by path prefix.
const OPEN: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

fn is_open(path: &str) -> bool {
    OPEN.iter().any(|prefix| path.starts_with(prefix))
}

#[derive(Clone, Debug)]
pub struct WhoMayCallLayer {
    keys: ApiKeys,
}

impl WhoMayCallLayer {
    pub fn new(keys: ApiKeys) -> Self {
        Self { keys }
    }
}

impl<S> Layer<S> for WhoMayCallLayer {
    type Service = WhoMayCall<S>;

    fn layer(&self, inner: S) -> Self::Service {
        WhoMayCall {
            inner,
            keys: self.keys.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct WhoMayCall<S> {
    inner: S,
    keys: ApiKeys,
}

impl<S, B> Service<Request<B>> for WhoMayCall<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<Response<Body>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if self.keys.is_empty() || is_open(request.uri().path()) {
            return Either::Left(self.inner.call(request));
        }
        // The check is the interceptor's (`src/api_keys.rs`), over the
        // request's headers, moved in and back without a copy.
        let headers = std::mem::take(request.headers_mut());
        let extensions = std::mem::take(request.extensions_mut());
        let checked = self.keys.call(tonic::Request::from_parts(
            MetadataMap::from_headers(headers),
            extensions,
            (),
        ));
        match checked {
            Ok(passed) => {
                let (metadata, extensions, ()) = passed.into_parts();
                *request.headers_mut() = metadata.into_headers();
                *request.extensions_mut() = extensions;
                Either::Left(self.inner.call(request))
            }
            Err(status) => Either::Right(ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_health_and_reflection_are_open() {
        assert!(is_open("/grpc.health.v1.Health/Check"));
        assert!(is_open(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!is_open("/kongtie.v1.Auth/GetAccessToken"));
        assert!(!is_open("/grpc.health.v1.HealthX/Check"));
        assert!(!is_open("/unknown"));
    }
}
