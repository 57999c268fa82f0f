//! The Connect protocol on the gRPC port, for callers without a gRPC
//! stack: PHP and shell scripts with curl, browsers, `@connectrpc/connect`.
//!
//! A tower layer in front of tonic's router. A request it recognises by
//! its content type (or a Connect GET) is turned into the gRPC request it
//! means, handed to the same router (so API keys, validation, handlers and
//! metrics are the gRPC ones), and the gRPC answer is turned back:
//!
//! | Connect request                                   | becomes              |
//! |---------------------------------------------------|----------------------|
//! | `POST` `application/json` or `application/proto`  | a unary call         |
//! | `GET ?encoding=json&message=...` (reads only)     | a unary call         |
//! | `POST` `application/connect+json` / `+proto`      | a server stream      |
//!
//! Everything else (gRPC itself, grpc-web, reflection) passes untouched.
//! Protobuf JSON is prost-reflect's, over the descriptor set that server
//! reflection serves. Errors are Connect's JSON error form, carrying the
//! same `google.rpc` details as the gRPC status.

mod envelope;
mod error;
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
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use tonic::{Code, Status, body::Body};
use tower::{Layer, Service};

use schema::{Method, Schema};

/// The largest request body read, as tonic's default decode limit.
const MAX_REQUEST: usize = 4 * 1024 * 1024;

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
}

/// Serves the Connect protocol in front of a gRPC router.
#[derive(Clone)]
pub struct ConnectLayer {
    schema: Arc<Schema>,
}

impl ConnectLayer {
    pub fn new() -> Result<Self, BoxError> {
        Ok(Self {
            schema: Arc::new(Schema::load()?),
        })
    }
}

impl<S> Layer<S> for ConnectLayer {
    type Service = ConnectService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConnectService {
            inner,
            schema: Arc::clone(&self.schema),
        }
    }
}

#[derive(Clone)]
pub struct ConnectService<S> {
    inner: S,
    schema: Arc<Schema>,
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
        // The ready service goes with this call; its clone stays for the next.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let schema = Arc::clone(&self.schema);
        Either::Right(Box::pin(async move {
            let (parts, body) = request.into_parts();
            let Some(method) = schema.method(parts.uri.path()) else {
                let status = Status::unimplemented(format!(
                    "no procedure {} (the Connect protocol serves kongtie.v1 and grpc.health.v1)",
                    parts.uri.path()
                ));
                return Ok(
                    unary_error(&status, &schema, HeaderMap::new(), StatusCode::NOT_FOUND)
                        .map(ConnectBody::Right),
                );
            };
            let answer = match kind {
                Kind::Stream(codec) => stream(inner, &schema, method, codec, parts, body).await,
                Kind::Unary(codec) => unary(inner, &schema, method, codec, parts, Some(body)).await,
                Kind::Get => unary(inner, &schema, method, Codec::Json, parts, None).await,
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
        return None;
    }
    let content_type = request.headers().get(header::CONTENT_TYPE)?.to_str().ok()?;
    let essence = content_type.split(';').next()?.trim();
    Some(match essence.to_ascii_lowercase().as_str() {
        "application/json" => Kind::Unary(Codec::Json),
        "application/proto" => Kind::Unary(Codec::Proto),
        "application/connect+json" => Kind::Stream(Codec::Json),
        "application/connect+proto" => Kind::Stream(Codec::Proto),
        _ => return None,
    })
}

/// A unary call, POSTed (`body`) or by GET (the message in the query).
async fn unary<S, B>(
    mut inner: S,
    schema: &Schema,
    method: &Method,
    mut codec: Codec,
    parts: Parts,
    body: Option<Body>,
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
    let message = match body {
        Some(body) => {
            if let Err(status) = identity_only(&parts.headers, header::CONTENT_ENCODING) {
                return refuse(status, StatusCode::NOT_IMPLEMENTED);
            }
            match read_body(body).await {
                Ok(bytes) => bytes,
                Err(status) => {
                    let http = http_of(&status);
                    return refuse(status, http);
                }
            }
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
            match get_message(&parts) {
                Ok((get_codec, bytes)) => {
                    codec = get_codec;
                    bytes
                }
                Err(status) => return refuse(status, StatusCode::BAD_REQUEST),
            }
        }
    };
    let proto = match codec {
        Codec::Json => match method.request_from_json(&message) {
            Ok(proto) => Bytes::from(proto),
            Err(e) => return refuse(Status::invalid_argument(e), StatusCode::BAD_REQUEST),
        },
        Codec::Proto => message,
    };
    let request = match grpc_request(parts, proto) {
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
    body: Body,
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
    let message = match read_body(body).await.and_then(|b| {
        envelope::single(b).map_err(|e| Status::invalid_argument(format!("the request: {e}")))
    }) {
        Ok(m) => m,
        Err(status) => return ended(status, HeaderMap::new(), HeaderMap::new()),
    };
    let proto = match codec {
        Codec::Json => match method.request_from_json(&message) {
            Ok(proto) => Bytes::from(proto),
            Err(e) => {
                return ended(
                    Status::invalid_argument(e),
                    HeaderMap::new(),
                    HeaderMap::new(),
                );
            }
        },
        Codec::Proto => message,
    };
    let request = match grpc_request(parts, proto) {
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

/// The gRPC request a Connect request means: same path, same metadata
/// (API key, `traceparent`...), the message in one gRPC frame, and
/// `Connect-Timeout-Ms` as `grpc-timeout`.
fn grpc_request(mut parts: Parts, message: Bytes) -> Result<Request<Body>, Status> {
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
    Ok(Request::from_parts(
        parts,
        Body::new(Full::new(envelope::wrap(0, &message))),
    ))
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

async fn read_body(body: Body) -> Result<Bytes, Status> {
    match Limited::new(body, MAX_REQUEST).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Status::resource_exhausted(
            format!("the request body is over {MAX_REQUEST} bytes"),
        )),
        Err(e) => Err(Status::cancelled(format!("reading the request: {e}"))),
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
        assert!(classify(&request("POST", Some("application/grpc-web"))).is_none());
        assert!(classify(&request("POST", None)).is_none());
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
        let r = grpc_request(parts("1500"), Bytes::new()).unwrap();
        assert_eq!(r.headers()["grpc-timeout"], "1500m");
        assert_eq!(r.uri(), "/x/y");
        assert_eq!(r.headers()["content-type"], "application/grpc");
        let r = grpc_request(parts("9999999999"), Bytes::new()).unwrap();
        assert_eq!(r.headers()["grpc-timeout"], "9999999S");
        assert_eq!(
            grpc_request(parts("-1"), Bytes::new()).unwrap_err().code(),
            Code::InvalidArgument
        );
    }
}
