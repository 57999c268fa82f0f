//! Two limits of every call, as a layer under the observing one (so its
//! metrics and log line see what the caller sees):
//!
//! - the server-side deadline: a call that has not answered within it
//!   (a slow upstream, or a request body that stops arriving) ends with
//!   DEADLINE_EXCEEDED, and its handler is dropped. A subscription answers
//!   at once, so only its set-up is bounded.
//! - a request over the message limit is RESOURCE_EXHAUSTED, as gRPC's
//!   status table has it, rather than the OUT_OF_RANGE tonic's decoder
//!   gives (which alerts would read as a client's logic error).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use axum::http::{HeaderName, Request, Response};
use tonic::{Code, Status, body::Body};
use tower::{Layer, Service};

#[derive(Debug, Clone, Copy)]
pub struct CallLimitsLayer {
    timeout: Duration,
    max_message_bytes: usize,
}

impl CallLimitsLayer {
    pub fn new(timeout: Duration, max_message_bytes: usize) -> Self {
        Self {
            timeout,
            max_message_bytes,
        }
    }
}

impl<S> Layer<S> for CallLimitsLayer {
    type Service = CallLimits<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallLimits {
            inner,
            limits: *self,
        }
    }
}

#[derive(Debug, Clone)]
pub struct CallLimits<S> {
    inner: S,
    limits: CallLimitsLayer,
}

/// What tonic's decoder says of a message over the limit.
const TOO_LARGE: &str = "Error, decoded message length too large";

impl<S, B> Service<Request<B>> for CallLimits<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let call = self.inner.call(request);
        let CallLimitsLayer {
            timeout,
            max_message_bytes,
        } = self.limits;
        Box::pin(async move {
            let Ok(response) = tokio::time::timeout(timeout, call).await else {
                return Ok(Status::deadline_exceeded(format!(
                    "the call took longer than the server's limit of {} ms \
                     (KONGTIE_GRPC_CALL_TIMEOUT_MS)",
                    timeout.as_millis()
                ))
                .into_http());
            };
            let response = response?;
            static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
            if response
                .headers()
                .get(&GRPC_STATUS)
                .is_some_and(|code| code.as_bytes() == b"11")
                && let Some(status) = Status::from_header_map(response.headers())
                && status.code() == Code::OutOfRange
                && status.message().starts_with(TOO_LARGE)
            {
                return Ok(Status::resource_exhausted(format!(
                    "the request message is over the limit of {max_message_bytes} bytes \
                     (KONGTIE_GRPC_MAX_MESSAGE_BYTES); {}",
                    status.message()
                ))
                .into_http());
            }
            Ok(response)
        })
    }
}
