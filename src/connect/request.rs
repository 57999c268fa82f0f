//! The gRPC request a Connect request means, made at once from its headers
//! so that it enters the gRPC pipeline (metrics, API keys, the call
//! deadline) before a byte of its body is read. The body is translated
//! only when the handler reads its message, which is after the API key
//! has passed and under the call's deadline; it is read up to the message
//! limit, and a declared length over the limit is refused unread.

use axum::http::{HeaderValue, Method as HttpMethod, Request, header, request::Parts};
use bytes::{Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame};
use http_body_util::{BodyExt, Full, StreamBody};
use tonic::{Status, body::Body};

use super::{Codec, envelope, schema::Method};

/// How the Connect body holds the request message.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Framing {
    /// A unary POST: the body is the message.
    Bare,
    /// A stream: the message in one five-byte envelope.
    Enveloped,
}

/// The gRPC message a Connect body will give, once read.
pub(crate) struct Pending {
    pub body: Body,
    pub codec: Codec,
    pub framing: Framing,
    pub method: Method,
    /// The message limit, `KONGTIE_GRPC_MAX_MESSAGE_BYTES`.
    pub limit: usize,
}

/// The request's message: still to read from the Connect body, or (a
/// Connect GET) already in hand from the query.
pub(crate) enum Message {
    Pending(Pending),
    Ready(Bytes),
}

impl Message {
    fn into_body(self) -> Body {
        match self {
            Message::Ready(proto) => Body::new(Full::new(envelope::wrap(0, &proto))),
            Message::Pending(pending) => {
                Body::new(StreamBody::new(futures::stream::once(async move {
                    pending.translate().await.map(Frame::data)
                })))
            }
        }
    }
}

impl Pending {
    /// The Connect body read and turned into one gRPC frame. An error is
    /// the status the handler answers with (tonic keeps a body's `Status`).
    async fn translate(self) -> Result<Bytes, Status> {
        let envelope_len = match self.framing {
            Framing::Bare => 0,
            Framing::Enveloped => 5,
        };
        let limit = self.limit + envelope_len;
        let over = || {
            Status::resource_exhausted(format!(
                "the request message is over the limit of {} bytes \
                 (KONGTIE_GRPC_MAX_MESSAGE_BYTES)",
                self.limit
            ))
        };
        // A declared Content-Length is the body's size hint.
        if self.body.size_hint().lower() > limit as u64 {
            return Err(over());
        }
        let mut body = self.body;
        let mut read = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| {
                Status::invalid_argument("the request body broke off before its end")
            })?;
            if let Ok(data) = frame.into_data() {
                if read.len() + data.len() > limit {
                    return Err(over());
                }
                read.extend_from_slice(&data);
            }
        }
        let read = read.freeze();
        let message = match self.framing {
            Framing::Bare => read,
            Framing::Enveloped => envelope::single(read)
                .map_err(|e| Status::invalid_argument(format!("the request: {e}")))?,
        };
        let proto = match self.codec {
            Codec::Json => Bytes::from(
                self.method
                    .request_from_json(&message)
                    .map_err(Status::invalid_argument)?,
            ),
            Codec::Proto => message,
        };
        Ok(envelope::wrap(0, &proto))
    }
}

/// The gRPC request a Connect request means: same path, same metadata
/// (API key, `traceparent`...), the message as one gRPC frame, and
/// `Connect-Timeout-Ms` as `grpc-timeout`.
pub(crate) fn grpc_request(mut parts: Parts, message: Message) -> Result<Request<Body>, Status> {
    let timeout = match parts.headers.get("connect-timeout-ms") {
        None => None,
        Some(v) => {
            let ms = v
                .to_str()
                .ok()
                .filter(|s| !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| {
                    Status::invalid_argument("Connect-Timeout-Ms must be 1 to 10 digits")
                })?;
            // grpc-timeout takes at most 8 digits.
            Some(if ms < 100_000_000 {
                format!("{ms}m")
            } else {
                format!("{}S", (ms / 1000).min(99_999_999))
            })
        }
    };
    for name in [
        "connect-protocol-version",
        "connect-timeout-ms",
        "connect-content-encoding",
        "connect-accept-encoding",
        "content-encoding",
        "accept-encoding",
        "content-length",
        "grpc-timeout",
    ] {
        parts.headers.remove(name);
    }
    parts.method = HttpMethod::POST;
    if parts.uri.query().is_some() {
        parts.uri = parts
            .uri
            .path()
            .parse()
            .map_err(|_| Status::invalid_argument("bad path"))?;
    }
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    parts
        .headers
        .insert(header::TE, HeaderValue::from_static("trailers"));
    if let Some(t) = timeout {
        parts.headers.insert(
            "grpc-timeout",
            HeaderValue::from_str(&t).expect("digits and a unit"),
        );
    }
    Ok(Request::from_parts(parts, message.into_body()))
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn a_connect_timeout_becomes_a_grpc_timeout() {
        let parts = |ms: &str| {
            Request::builder()
                .uri("/x/y?connect=v1")
                .header("connect-timeout-ms", ms)
                .body(())
                .unwrap()
                .into_parts()
                .0
        };
        let empty = || Message::Ready(Bytes::new());
        let r = grpc_request(parts("1500"), empty()).unwrap();
        assert_eq!(r.headers()["grpc-timeout"], "1500m");
        assert_eq!(r.uri(), "/x/y");
        assert_eq!(r.headers()["content-type"], "application/grpc");
        let r = grpc_request(parts("9999999999"), empty()).unwrap();
        assert_eq!(r.headers()["grpc-timeout"], "9999999S");
        assert_eq!(
            grpc_request(parts("-1"), empty()).unwrap_err().code(),
            Code::InvalidArgument
        );
    }
}
