//! The Connect protocol on the gRPC port, for callers without a gRPC
//! stack: PHP and shell scripts with curl, browsers, `@connectrpc/connect`.
//!
//! The outermost layer of the gRPC port's pipeline (`src/startup.rs`). A
//! request it recognises by its content type (or a Connect GET) is turned
//! at once, from its headers, into the gRPC request it means and handed to
//! the same pipeline as gRPC: metrics, API keys, the call deadline, the
//! message limit, validation and handlers are the gRPC ones, in that order.
//! Its body is read only when the handler reads the message
//! (`request.rs`): never before the API key has passed, never past the
//! deadline or the limit. The gRPC answer is turned back:
//!
//! | Connect request                                   | becomes              |
//! |---------------------------------------------------|----------------------|
//! | `POST` `application/json` or `application/proto`  | a unary call         |
//! | `GET ?encoding=json&message=...` (reads only)     | a unary call         |
//! | `POST` `application/connect+json` / `+proto`      | a server stream      |
//!
//! gRPC itself (`application/grpc`, `application/grpc+proto`) passes
//! untouched. A POST of any other content type (a form, `text/plain`,
//! grpc-web, which is not served) is HTTP 415, with the types served.
//! Protobuf JSON is prost-reflect's, over the descriptor set that server
//! reflection serves. Errors are Connect's JSON error form, carrying the
//! same `google.rpc` details as the gRPC status.

mod envelope;
mod error;
mod request;
mod schema;

use std::{
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use axum::http::{
    HeaderMap, HeaderName, HeaderValue, Method as HttpMethod, Request, Response, StatusCode,
    header, request::Parts,
};
use base64::{
    Engine,
    engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD},
};
use bytes::{Bytes, BytesMut};
use futures::{
    Stream, StreamExt, TryFutureExt,
    future::{Either, MapOk},
};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use tonic::{Code, Status, body::Body};
use tower::{Layer, Service};

use prometheus_client::metrics::counter::Counter;
use request::{Framing, Message, Pending, grpc_request};
use schema::{Method, Schema};

use crate::metrics::{Metrics, ReasonLabels};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Codec {
    Json,
    Proto,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Unary(Codec),
    Get,
    Stream(Codec),
    /// A POST neither gRPC nor Connect: HTTP 415.
    Unsupported,
    /// Neither POST nor GET (tonic would serve a `PUT` as gRPC): HTTP 405.
    OtherMethod,
}

/// What an HTTP 415 says is served.
const SERVED: &str = "this port serves gRPC (content-type application/grpc or \
                      application/grpc+proto) and the Connect protocol (application/json or \
                      application/proto for unary calls, application/connect+json or \
                      application/connect+proto for streams, and GET \
                      ?encoding=json&message=... for reads)";

/// Serves the Connect protocol in front of the gRPC pipeline.
#[derive(Clone)]
pub struct ConnectLayer {
    schema: Arc<Schema>,
    max_message_bytes: usize,
    refused: Refused,
}

/// The requests answered here, before the pipeline's metrics could see
/// them, counted in `kongtie_grpc_requests_refused_total` so that a flood
/// of them shows.
#[derive(Clone, Debug)]
struct Refused {
    media_type: Counter,
    procedure: Counter,
    method: Counter,
}

impl ConnectLayer {
    /// `max_message_bytes` bounds a Connect request's message as
    /// `KONGTIE_GRPC_MAX_MESSAGE_BYTES` bounds a gRPC one.
    pub fn new(max_message_bytes: usize, metrics: &Metrics) -> Result<Self, BoxError> {
        let refused = |reason| {
            metrics
                .grpc_requests_refused
                .get_or_create(&ReasonLabels { reason })
                .clone()
        };
        Ok(Self {
            schema: Arc::new(Schema::load()?),
            max_message_bytes,
            refused: Refused {
                media_type: refused("unsupported_media_type"),
                procedure: refused("unknown_procedure"),
                method: refused("method_not_allowed"),
            },
        })
    }
}

impl<S> Layer<S> for ConnectLayer {
    type Service = ConnectService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConnectService {
            inner,
            schema: Arc::clone(&self.schema),
            max_message_bytes: self.max_message_bytes,
            refused: self.refused.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ConnectService<S> {
    inner: S,
    schema: Arc<Schema>,
    max_message_bytes: usize,
    refused: Refused,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A gRPC answer passed through untouched, or a Connect answer.
pub type ConnectBody<B> = http_body_util::Either<B, Body>;

type Passed<B> = fn(Response<B>) -> Response<ConnectBody<B>>;

impl<S, B> Service<Request<Body>> for ConnectService<S>
where
    S: Service<Request<Body>, Response = Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ConnectBody<B>>;
    type Error = Infallible;
    // gRPC passes through without a box or an allocation of its own.
    type Future = Either<
        MapOk<S::Future, Passed<B>>,
        BoxFuture<Result<Response<ConnectBody<B>>, Infallible>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let Some(kind) = classify(&request) else {
            let passed: Passed<B> = |r| r.map(ConnectBody::Left);
            return Either::Left(self.inner.call(request).map_ok(passed));
        };
        if let Kind::Unsupported = kind {
            self.refused.media_type.inc();
            let answer = unsupported(request.headers()).map(ConnectBody::Right);
            return Either::Right(Box::pin(async move { Ok(answer) }));
        }
        if let Kind::OtherMethod = kind {
            self.refused.method.inc();
            let answer = other_method().map(ConnectBody::Right);
            return Either::Right(Box::pin(async move { Ok(answer) }));
        }
        // The ready service goes with this call; its clone stays for the next.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let schema = Arc::clone(&self.schema);
        let limit = self.max_message_bytes;
        let unknown_procedure = self.refused.procedure.clone();
        Either::Right(Box::pin(async move {
            let (parts, body) = request.into_parts();
            let Some(method) = schema.method(parts.uri.path()) else {
                unknown_procedure.inc();
                let status = Status::unimplemented(format!(
                    "no procedure {} (the Connect protocol serves kongtie.v1 and grpc.health.v1)",
                    parts.uri.path()
                ));
                return Ok(
                    unary_error(&status, &schema, HeaderMap::new(), StatusCode::NOT_FOUND)
                        .map(ConnectBody::Right),
                );
            };
            let pending = |codec, framing| Pending {
                body,
                codec,
                framing,
                method: method.clone(),
                limit,
            };
            let answer = match kind {
                Kind::Stream(codec) => {
                    let pending = pending(codec, Framing::Enveloped);
                    stream(inner, &schema, method, codec, parts, pending).await
                }
                Kind::Unary(codec) => {
                    let pending = pending(codec, Framing::Bare);
                    unary(inner, &schema, method, codec, parts, Some(pending)).await
                }
                Kind::Get => unary(inner, &schema, method, Codec::Json, parts, None).await,
                Kind::Unsupported | Kind::OtherMethod => unreachable!("answered above"),
            };
            Ok(answer.map(ConnectBody::Right))
        }))
    }
}

/// A Connect request, by method and content type; `None` passes through.
fn classify<T>(request: &Request<T>) -> Option<Kind> {
    if request.method() == HttpMethod::GET {
        // gRPC never uses GET; a GET is Connect's or nobody's.
        return Some(Kind::Get);
    }
    if request.method() != HttpMethod::POST {
        return Some(Kind::OtherMethod);
    }
    let Some(content_type) = request.headers().get(header::CONTENT_TYPE) else {
        return Some(Kind::Unsupported);
    };
    let essence = content_type
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    Some(match essence.as_str() {
        "application/grpc" | "application/grpc+proto" => return None,
        "application/json" => Kind::Unary(Codec::Json),
        "application/proto" => Kind::Unary(Codec::Proto),
        "application/connect+json" => Kind::Stream(Codec::Json),
        "application/connect+proto" => Kind::Stream(Codec::Proto),
        _ => Kind::Unsupported,
    })
}

/// HTTP 415 for a POST that is neither gRPC nor Connect, in plain text
/// (its caller speaks neither protocol), saying what is served.
fn unsupported(headers: &HeaderMap) -> Response<Body> {
    let sent = match headers.get(header::CONTENT_TYPE) {
        None => "no content-type".to_owned(),
        Some(v) => format!(
            "content-type {:?}",
            String::from_utf8_lossy(&v.as_bytes()[..v.len().min(100)])
        ),
    };
    let mut response = Response::new(Body::new(Full::new(Bytes::from(format!(
        "unsupported media type: {sent}; {SERVED}\n"
    )))));
    *response.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// HTTP 405 for a method neither gRPC nor Connect uses.
fn other_method() -> Response<Body> {
    let mut response = Response::new(Body::new(Full::new(Bytes::from(format!(
        "method not allowed: {SERVED}\n"
    )))));
    *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    let headers = response.headers_mut();
    headers.insert(header::ALLOW, HeaderValue::from_static("POST, GET"));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A unary call, POSTed (`body`) or by GET (the message in the query).
async fn unary<S, B>(
    mut inner: S,
    schema: &Schema,
    method: &Method,
    codec: Codec,
    parts: Parts,
    body: Option<Pending>,
) -> Response<Body>
where
    S: Service<Request<Body>, Response = Response<B>, Error = Infallible>,
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let refuse =
        |status: Status, http: StatusCode| unary_error(&status, schema, HeaderMap::new(), http);
    if method.server_streaming {
        return refuse(
            Status::invalid_argument(format!(
                "{} is a server-streaming RPC: POST it as application/connect+json or \
                 application/connect+proto",
                method.name
            )),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        );
    }
    let (codec, message) = match body {
        Some(pending) => {
            if let Err(status) = identity_only(&parts.headers, header::CONTENT_ENCODING) {
                return refuse(status, StatusCode::NOT_IMPLEMENTED);
            }
            (codec, Message::Pending(pending))
        }
        None => {
            if !method.no_side_effects {
                let mut response = refuse(
                    Status::invalid_argument(format!(
                        "{} changes state: POST it; GET is for calls marked NO_SIDE_EFFECTS",
                        method.name
                    )),
                    StatusCode::METHOD_NOT_ALLOWED,
                );
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("POST"));
                return response;
            }
            // A GET's message is in its URL, read with the headers.
            let proto = get_message(&parts).and_then(|(codec, bytes)| {
                let proto = match codec {
                    Codec::Json => Bytes::from(
                        method
                            .request_from_json(&bytes)
                            .map_err(Status::invalid_argument)?,
                    ),
                    Codec::Proto => bytes,
                };
                Ok((codec, proto))
            });
            match proto {
                Ok((codec, proto)) => (codec, Message::Ready(proto)),
                Err(status) => return refuse(status, StatusCode::BAD_REQUEST),
            }
        }
    };
    let request = match grpc_request(parts, message) {
        Ok(r) => r,
        Err(status) => return refuse(status, StatusCode::BAD_REQUEST),
    };
    let Ok(response) = inner.call(request).await;
    let (mut head, body) = response.into_parts();
    if let Some(status) = status_of(&head.headers) {
        // Trailers-only: the call failed before any message.
        return unary_answer(
            status,
            schema,
            method,
            codec,
            head.headers,
            None,
            Bytes::new(),
        );
    }
    let collected = match body.collect().await {
        Ok(c) => c,
        Err(e) => {
            let status = Status::unavailable(format!("the call ended early: {}", e.into()));
            return unary_error(&status, schema, metadata(&head.headers), http_of(&status));
        }
    };
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let status =
        status_of(&trailers).unwrap_or_else(|| Status::internal("the call ended without a status"));
    let headers = std::mem::take(&mut head.headers);
    unary_answer(
        status,
        schema,
        method,
        codec,
        headers,
        Some(trailers),
        collected.to_bytes(),
    )
}

fn unary_answer(
    status: Status,
    schema: &Schema,
    method: &Method,
    codec: Codec,
    headers: HeaderMap,
    trailers: Option<HeaderMap>,
    frames: Bytes,
) -> Response<Body> {
    let mut out = metadata(&headers);
    for (name, value) in trailers.as_ref().map(metadata).unwrap_or_default().iter() {
        if let Ok(name) = HeaderName::try_from(format!("trailer-{name}")) {
            out.append(name, value.clone());
        }
    }
    if status.code() != Code::Ok {
        return unary_error(&status, schema, out, http_of(&status));
    }
    let body = match envelope::single(frames).and_then(|m| encode(codec, method, m)) {
        Ok(body) => body,
        Err(e) => {
            let status = Status::internal(e);
            return unary_error(&status, schema, out, http_of(&status));
        }
    };
    let mut response = Response::new(Body::new(Full::new(body)));
    *response.headers_mut() = out;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(match codec {
            Codec::Json => "application/json",
            Codec::Proto => "application/proto",
        }),
    );
    response
}

fn unary_error(
    status: &Status,
    schema: &Schema,
    headers: HeaderMap,
    http: StatusCode,
) -> Response<Body> {
    let body = serde_json::to_vec(&error::error_json(status, schema)).unwrap_or_default();
    let mut response = Response::new(Body::new(Full::new(Bytes::from(body))));
    *response.status_mut() = http;
    *response.headers_mut() = headers;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn http_status(status: &Status) -> u16 {
    error::http_status(status.code())
}

fn http_of(status: &Status) -> StatusCode {
    StatusCode::from_u16(http_status(status)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// A server-streaming call: one enveloped request, enveloped messages
/// back, and an end-of-stream message with the status and trailers. The
/// answer is always HTTP 200; an error travels in the end-of-stream
/// message, as Connect says.
async fn stream<S, B>(
    mut inner: S,
    schema: &Arc<Schema>,
    method: &Method,
    codec: Codec,
    parts: Parts,
    pending: Pending,
) -> Response<Body>
where
    S: Service<Request<Body>, Response = Response<B>, Error = Infallible>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let content_type = HeaderValue::from_static(match codec {
        Codec::Json => "application/connect+json",
        Codec::Proto => "application/connect+proto",
    });
    let ended = |status: Status, headers: HeaderMap, trailers: HeaderMap| {
        let end = envelope::end_stream(&status, schema, &trailers);
        let mut response = Response::new(Body::new(Full::new(end)));
        *response.headers_mut() = metadata(&headers);
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, content_type.clone());
        response
    };
    if !method.server_streaming {
        return unary_error(
            &Status::invalid_argument(format!(
                "{} is a unary RPC: POST it as application/json or application/proto",
                method.name
            )),
            schema,
            HeaderMap::new(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        );
    }
    if let Err(status) = identity_only(
        &parts.headers,
        HeaderName::from_static("connect-content-encoding"),
    ) {
        return ended(status, HeaderMap::new(), HeaderMap::new());
    }
    let request = match grpc_request(parts, Message::Pending(pending)) {
        Ok(r) => r,
        Err(status) => return ended(status, HeaderMap::new(), HeaderMap::new()),
    };
    let Ok(response) = inner.call(request).await;
    let (head, body) = response.into_parts();
    if let Some(status) = status_of(&head.headers) {
        return ended(status, head.headers, HeaderMap::new());
    }
    let frames = translate(body, codec, method.clone(), Arc::clone(schema));
    let mut response = Response::new(Body::new(StreamBody::new(frames)));
    *response.headers_mut() = metadata(&head.headers);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    response
}

/// A message's bytes in the answer's codec.
fn encode(codec: Codec, method: &Method, message: Bytes) -> Result<Bytes, String> {
    match codec {
        Codec::Proto => Ok(message),
        Codec::Json => method.response_to_json(message).map(Bytes::from),
    }
}

/// A server stream being translated: the gRPC body and the bytes of a
/// frame not yet whole.
struct Translation<B> {
    body: Pin<Box<B>>,
    buffer: BytesMut,
    done: bool,
}

/// Why a stream ends: its status and trailers.
type End = (Status, HeaderMap);

impl<B> Translation<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    /// The next message as a Connect envelope, or how the stream ends.
    async fn next(&mut self, codec: Codec, method: &Method) -> Result<Bytes, End> {
        let broken = |status| (status, HeaderMap::new());
        loop {
            if let Some(message) = envelope::take(&mut self.buffer) {
                let payload = message
                    .and_then(|m| encode(codec, method, m))
                    .map_err(|e| broken(Status::internal(e)))?;
                return Ok(envelope::wrap(0, &payload));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.buffer.extend_from_slice(&data),
                    Err(frame) => {
                        let trailers = frame.into_trailers().unwrap_or_default();
                        let status = status_of(&trailers).unwrap_or_else(|| {
                            Status::internal("the stream ended without a status")
                        });
                        return Err((status, trailers));
                    }
                },
                Some(Err(e)) => {
                    return Err(broken(Status::unavailable(format!(
                        "the stream broke: {}",
                        e.into()
                    ))));
                }
                None => {
                    return Err(broken(Status::unavailable(
                        "the stream ended without a status",
                    )));
                }
            }
        }
    }
}

/// The gRPC response body's frames as Connect envelopes, then the
/// end-of-stream message from the gRPC trailers.
fn translate<B>(
    body: B,
    codec: Codec,
    method: Method,
    schema: Arc<Schema>,
) -> impl Stream<Item = Result<Frame<Bytes>, BoxError>> + Send
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let state = Translation {
        body: Box::pin(body),
        buffer: BytesMut::new(),
        done: false,
    };
    futures::stream::unfold(state, move |mut state| {
        let (method, schema) = (method.clone(), Arc::clone(&schema));
        async move {
            if state.done {
                return None;
            }
            let frame = match state.next(codec, &method).await {
                Ok(envelope) => envelope,
                Err((status, trailers)) => {
                    state.done = true;
                    envelope::end_stream(&status, &schema, &trailers)
                }
            };
            Some((Ok(Frame::data(frame)), state))
        }
    })
    .boxed()
}

/// The message of a Connect GET: `?encoding=json|proto&message=...`, with
/// `base64=1` for URL-safe base64.
fn get_message(parts: &Parts) -> Result<(Codec, Bytes), Status> {
    let (mut codec, mut message, mut base64, mut compression) = (None, None, false, None);
    for (key, value) in url::form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes()) {
        match key.as_ref() {
            "encoding" => {
                codec = Some(match value.as_ref() {
                    "json" => Codec::Json,
                    "proto" => Codec::Proto,
                    other => {
                        return Err(Status::invalid_argument(format!(
                            "encoding {other:?}: json or proto"
                        )));
                    }
                })
            }
            "message" => message = Some(value.into_owned()),
            "base64" => base64 = value == "1",
            "compression" => compression = Some(value.into_owned()),
            _ => {}
        }
    }
    if compression.is_some_and(|c| c != "identity") {
        return Err(Status::unimplemented(
            "compression: only identity is served",
        ));
    }
    let codec = codec.ok_or_else(|| {
        Status::invalid_argument("a Connect GET needs ?encoding=json (or proto) and &message=")
    })?;
    let message = message.unwrap_or_default();
    let bytes = if base64 {
        let trimmed = message.trim_end_matches('=');
        URL_SAFE_NO_PAD
            .decode(trimmed)
            .or_else(|_| URL_SAFE.decode(&message))
            .map_err(|e| Status::invalid_argument(format!("message is not URL-safe base64: {e}")))?
    } else {
        message.into_bytes()
    };
    let bytes = if bytes.is_empty() && codec == Codec::Json {
        Bytes::from_static(b"{}")
    } else {
        Bytes::from(bytes)
    };
    Ok((codec, bytes))
}

/// Compression is not served (callers send identity by default).
fn identity_only(headers: &HeaderMap, name: impl header::AsHeaderName) -> Result<(), Status> {
    match headers.get(name).map(|v| v.to_str().unwrap_or("?")) {
        None | Some("identity") => Ok(()),
        Some(other) => Err(Status::unimplemented(format!(
            "compression {other:?} is not served; send the body uncompressed"
        ))),
    }
}

/// The gRPC status in a header map (trailers, or trailers-only headers).
fn status_of(headers: &HeaderMap) -> Option<Status> {
    headers.get("grpc-status")?;
    Status::from_header_map(headers)
}

/// The caller-visible metadata of a gRPC header or trailer map: without
/// the gRPC protocol's own headers.
fn metadata(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        let n = name.as_str();
        if n.starts_with("grpc-") || name == header::CONTENT_TYPE || name == header::CONTENT_LENGTH
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, content_type: Option<&str>) -> Request<()> {
        let mut b = Request::builder()
            .method(method)
            .uri("/kongtie.v1.Auth/GetAccessToken");
        if let Some(ct) = content_type {
            b = b.header("content-type", ct);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn grpc_passes_and_connect_is_told_by_its_content_type() {
        assert!(classify(&request("POST", Some("application/grpc"))).is_none());
        assert!(classify(&request("POST", Some("application/grpc+proto"))).is_none());
        for other in [
            None,
            Some("application/grpc-web"),
            Some("application/x-www-form-urlencoded"),
            Some("text/plain;charset=UTF-8"),
        ] {
            assert!(
                matches!(classify(&request("POST", other)), Some(Kind::Unsupported)),
                "{other:?}"
            );
        }
        assert!(matches!(
            classify(&request("POST", Some("application/json; charset=utf-8"))),
            Some(Kind::Unary(Codec::Json))
        ));
        assert!(matches!(
            classify(&request("POST", Some("Application/Proto"))),
            Some(Kind::Unary(Codec::Proto))
        ));
        assert!(matches!(
            classify(&request("POST", Some("application/connect+json"))),
            Some(Kind::Stream(Codec::Json))
        ));
        assert!(matches!(classify(&request("GET", None)), Some(Kind::Get)));
    }
}
