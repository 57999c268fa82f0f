//! Health and reflection need no API key: load balancers and Kubernetes
//! probe health, and grpcurl asks reflection, before any key is at hand.
//! So that anyone who can reach the port cannot hold the server's memory
//! there, their calls live under the connection limits every call has
//! (streams per connection, the call deadline, the message limit) and,
//! since `Health/Watch` and reflection's stream can stay open for ever,
//! under caps of their own: as many as subscriptions may be open, in total
//! and per connection, in a pool of their own, so keyless callers cannot
//! take a paying subscriber's place. Past a cap: RESOURCE_EXHAUSTED.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use axum::http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::{
    body::Body,
    server::NamedService,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};
use tower::Service;

use super::subscription_limits::{Admission, SubscriptionLimits};

/// `inner` (health or reflection) with its calls counted against `limits`.
#[derive(Clone)]
pub struct Keyless<S> {
    inner: S,
    limits: Arc<SubscriptionLimits>,
}

impl<S> Keyless<S> {
    pub fn new(inner: S, limits: Arc<SubscriptionLimits>) -> Self {
        Self { inner, limits }
    }
}

impl<S: NamedService> NamedService for Keyless<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<Request<Body>> for Keyless<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let extensions = request.extensions();
        let peer = extensions
            .get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr)
            .or_else(|| {
                extensions
                    .get::<TlsConnectInfo<TcpConnectInfo>>()
                    .and_then(|info| info.get_ref().remote_addr())
            });
        let admission = match self.limits.admit(peer) {
            Ok(admission) => admission,
            Err(e) => {
                let status = tonic::Status::from(e);
                return Box::pin(async move { Ok(status.into_http()) });
            }
        };
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await?;
            Ok(response.map(|body| {
                Body::new(Admitted {
                    body,
                    _admission: admission,
                })
            }))
        })
    }
}

/// A response body that holds its call's place until it is dropped.
struct Admitted {
    body: Body,
    _admission: Admission,
}

impl HttpBody for Admitted {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
