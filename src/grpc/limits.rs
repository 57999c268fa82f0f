//! The limits of every call, gRPC and Connect alike (a Connect call
//! arrives here as its gRPC call, its body not yet read), as a layer under
//! the observing one and the API-key check (so its metrics and log line
//! see what the caller sees, and no body is read for a caller without a
//! key):
//!
//! - the deadline: the server's (`KONGTIE_GRPC_CALL_TIMEOUT_MS`) or the
//!   caller's (`grpc-timeout`, which a Connect call's `connect-timeout-ms`
//!   becomes), whichever is sooner. A call that has not answered within it
//!   (a slow upstream, or a request body that stops arriving) ends with
//!   DEADLINE_EXCEEDED, and its handler is dropped. A stream answers at
//!   once: the server's deadline bounds only its set-up, the caller's
//!   bounds it whole (its answer is ended with DEADLINE_EXCEEDED then).
//! - a request over the message limit is RESOURCE_EXHAUSTED, as gRPC's
//!   status table has it, rather than the OUT_OF_RANGE tonic's decoder
//!   gives (which alerts would read as a client's logic error).
//! - a request whose last message is cut short (its frame header announces
//!   more bytes than the body brings) is INVALID_ARGUMENT, the caller's
//!   fault, rather than the INTERNAL tonic's decoder gives.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use axum::http::{HeaderMap, HeaderName, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
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
/// What tonic's decoder says of a body that ends inside a message.
const CUT_SHORT: &str = "Unexpected EOF decoding stream.";

static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

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
        let callers = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(super::parse_grpc_timeout);
        let started = Instant::now();
        let call = self.inner.call(request);
        let CallLimitsLayer {
            timeout,
            max_message_bytes,
        } = self.limits;
        Box::pin(async move {
            let (limit, whose) = match callers {
                Some(callers) if callers < timeout => (callers, Whose::Caller),
                _ => (timeout, Whose::Server),
            };
            let Ok(response) = tokio::time::timeout(limit, call).await else {
                return Ok(whose.exceeded(limit).into_http());
            };
            let response = response?;
            if let Some(code) = response.headers().get(&GRPC_STATUS) {
                let code = Code::from_bytes(code.as_bytes());
                if matches!(code, Code::OutOfRange | Code::Internal)
                    && let Some(status) = Status::from_header_map(response.headers())
                {
                    if code == Code::OutOfRange && status.message().starts_with(TOO_LARGE) {
                        return Ok(Status::resource_exhausted(format!(
                            "the request message is over the limit of {max_message_bytes} \
                             bytes (KONGTIE_GRPC_MAX_MESSAGE_BYTES); {}",
                            status.message()
                        ))
                        .into_http());
                    }
                    if code == Code::Internal && status.message() == CUT_SHORT {
                        return Ok(Status::invalid_argument(
                            "the request ended inside a message: its frame announced more \
                             bytes than the body brought",
                        )
                        .into_http());
                    }
                }
                // Trailers-only: the call is over.
                return Ok(response);
            }
            // The caller's deadline bounds the rest of the answer too.
            match callers {
                Some(callers) => Ok(response.map(|body| {
                    Body::new(Deadlined {
                        body,
                        sleep: Box::pin(tokio::time::sleep_until(started + callers)),
                        timeout: callers,
                        ended: false,
                    })
                })),
                None => Ok(response),
            }
        })
    }
}

/// Whose deadline a call ran out of.
#[derive(Clone, Copy)]
enum Whose {
    Server,
    Caller,
}

impl Whose {
    fn exceeded(self, limit: Duration) -> Status {
        Status::deadline_exceeded(match self {
            Whose::Server => format!(
                "the call took longer than the server's limit of {} ms \
                 (KONGTIE_GRPC_CALL_TIMEOUT_MS)",
                limit.as_millis()
            ),
            Whose::Caller => format!(
                "the call took longer than its deadline of {} ms (grpc-timeout, or \
                 connect-timeout-ms)",
                limit.as_millis()
            ),
        })
    }
}

/// An answer that ends with DEADLINE_EXCEEDED at the caller's deadline,
/// dropping the rest (a stream's handler goes with it).
struct Deadlined {
    body: Body,
    sleep: Pin<Box<Sleep>>,
    timeout: Duration,
    ended: bool,
}

impl HttpBody for Deadlined {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            if frame
                .as_ref()
                .is_none_or(|f| f.as_ref().is_ok_and(Frame::is_trailers))
            {
                self.ended = true;
            }
            return Poll::Ready(frame);
        }
        if self.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.ended = true;
        self.body = Body::empty();
        let mut trailers = HeaderMap::new();
        // A status's own headers always build.
        let _ = Whose::Caller
            .exceeded(self.timeout)
            .add_header(&mut trailers);
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        if self.ended {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}
