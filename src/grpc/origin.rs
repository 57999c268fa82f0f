//! Browsers on the gRPC port: which web pages may call it, and which host
//! names a gateway without API keys answers.
//!
//! A browser lets any page send a "simple" cross-origin request (a
//! `text/plain` POST, say) without asking the server first, and tonic
//! serves a gRPC frame whatever the content type: without this layer any
//! web page could acknowledge notifications or create orders on a keyless
//! gateway. And a page on a name its owner points at 127.0.0.1 (DNS
//! rebinding) is, to the browser, on the gateway's own origin, so it could
//! read the answers too.
//!
//! So, before any service runs (this layer is the outermost of the port,
//! in front of the Connect protocol, API keys and metrics):
//!
//! - a request whose `Origin` is not one of `KONGTIE_ALLOWED_ORIGINS` is
//!   refused, `403` (and a browser request that hides its origin behind
//!   `Sec-Fetch-Site: cross-site` or `same-site` too);
//! - an allowed origin's CORS preflight is answered here, `204`, as
//!   browsers send it without credentials; its other requests are served
//!   with the CORS headers a Connect client needs;
//! - without API keys, a `Host` (or HTTP/2 `:authority`) that is neither
//!   a loopback name, an IP address, nor one of `KONGTIE_ALLOWED_HOSTS` is
//!   refused, `421`. With keys the keys protect, and any name is answered.
//!
//! A request without `Origin` (gRPC clients, curl, PHP) passes untouched.

use std::{
    convert::Infallible,
    net::{Ipv4Addr, Ipv6Addr},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::http::{
    HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header, uri::Authority,
};
use bytes::{Buf, Bytes};
use futures::{
    TryFutureExt,
    future::{Either, MapOk, Ready, ready},
};
use http_body_util::{BodyExt, Full};
use prometheus_client::metrics::counter::Counter;
use tower::{Layer, Service};
use tracing::info;

use crate::{
    metrics::{Metrics, ReasonLabels},
    telemetry::RateLimited,
};

const ORIGINS_SETTING: &str = "KONGTIE_ALLOWED_ORIGINS (--allowed-origin)";
const HOSTS_SETTING: &str = "KONGTIE_ALLOWED_HOSTS (--allowed-host)";

/// What a browser Connect client sends beyond the CORS-safelisted headers.
const ALLOW_HEADERS: &str = "content-type, connect-protocol-version, connect-timeout-ms, \
     connect-accept-encoding, connect-content-encoding, authorization, grpc-timeout, \
     grpc-accept-encoding, x-grpc-web, x-user-agent, traceparent, tracestate";
/// What a page's script may read of an answer beyond the safelisted headers.
const EXPOSE_HEADERS: &str = "grpc-status, grpc-message, grpc-status-details-bin, \
     grpc-encoding, content-encoding, connect-content-encoding, connect-accept-encoding";
const ALLOW_METHODS: &str = "POST, GET";
/// How long a browser may keep a preflight's answer: Chromium's cap.
const MAX_AGE_SECS: &str = "7200";

/// An origin as browsers write it in `Origin`: `scheme://host[:port]`,
/// lower case, the default port left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedOrigin(String);

/// A host name (no port: any port is answered), lower case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost(String);

/// `KONGTIE_ALLOWED_ORIGINS=` in an env file reads as one empty entry.
const EMPTY: &str = "an empty entry: to allow none, leave the setting out (unset it, or \
     comment it out); else write the entries comma-separated, with no empty one";

/// Parses one `KONGTIE_ALLOWED_ORIGINS` entry.
pub fn parse_origin(s: &str) -> Result<AllowedOrigin, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err(EMPTY.into());
    }
    if s == "*" || s.eq_ignore_ascii_case("null") {
        return Err(format!(
            "{s:?} would let every web page call the gateway; name each origin, as \
             https://shop.example"
        ));
    }
    let url = url::Url::parse(s)
        .map_err(|e| format!("{s:?} is not an origin (scheme://host[:port]): {e}"))?;
    if !matches!(url.scheme(), "http" | "https")
        || url.host_str().is_none()
        || !url.username().is_empty()
        || url.password().is_some()
        || url.path() != "/"
        || url.query().is_some()
        || url.fragment().is_some()
        || s.ends_with('/')
    {
        return Err(format!(
            "{s:?} is not an origin: write scheme://host[:port], as https://shop.example, \
             with no path"
        ));
    }
    Ok(AllowedOrigin(url.origin().ascii_serialization()))
}

/// Parses one `KONGTIE_ALLOWED_HOSTS` entry.
pub fn parse_host(s: &str) -> Result<AllowedHost, String> {
    if s.trim().is_empty() {
        return Err(EMPTY.into());
    }
    let name = s.trim().trim_end_matches('.').to_ascii_lowercase();
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !valid {
        return Err(format!(
            "{s:?} is not a host name (no port, no scheme): as gateway.internal"
        ));
    }
    Ok(AllowedHost(name))
}

/// Which pages may call, and which names are answered without keys.
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    pub origins: Vec<AllowedOrigin>,
    pub hosts: Vec<AllowedHost>,
}

/// The guard, shared by every connection of one server.
struct Guard {
    origins: Vec<AllowedOrigin>,
    hosts: Vec<AllowedHost>,
    /// Without API keys, foreign host names are refused.
    restrict_hosts: bool,
    refused_origin: Counter,
    refused_host: Counter,
    refused_cross_site: Counter,
    preflights: Counter,
    /// A page (or a scanner) can be refused many times a second.
    log: RateLimited,
}

/// What becomes of one request.
#[derive(Debug, PartialEq)]
enum Verdict {
    /// No browser origin: served untouched.
    Pass,
    /// An allowed origin's request: served, with CORS headers.
    Cors(HeaderValue),
    /// An allowed origin's preflight: answered here.
    Preflight {
        origin: HeaderValue,
        private_network: bool,
    },
    Refuse(Refusal),
}

#[derive(Debug, PartialEq)]
enum Refusal {
    Origin(String),
    CrossSite,
    Host(String),
}

impl Guard {
    fn judge(
        &self,
        method: &Method,
        headers: &HeaderMap,
        authority: Option<&Authority>,
    ) -> Verdict {
        if self.restrict_hosts {
            // `user@host` is no Host (RFC 9110 7.2): judged whole, it is
            // refused, rather than answered for the part after the `@`.
            let named = authority.map(|a| {
                if no_userinfo(a) {
                    a.host().to_owned()
                } else {
                    a.as_str().to_owned()
                }
            });
            let hosts = headers.get_all(header::HOST).iter().map(|v| {
                v.to_str()
                    .ok()
                    .and_then(|v| v.parse::<Authority>().ok())
                    .filter(no_userinfo)
                    .map_or_else(
                        || String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        |a| a.host().to_owned(),
                    )
            });
            for host in named.into_iter().chain(hosts) {
                if !self.host_allowed(&host) {
                    return Verdict::Refuse(Refusal::Host(host));
                }
            }
        }
        let mut origins = headers.get_all(header::ORIGIN).iter();
        let origin = match (origins.next(), origins.next()) {
            (None, _) => {
                // Chromium, Firefox and Safari say where a request comes
                // from even when they leave `Origin` out (a cross-site GET
                // of an image or a script, say).
                let site = headers.get("sec-fetch-site").map(HeaderValue::as_bytes);
                return if matches!(site, Some(b"cross-site" | b"same-site")) {
                    Verdict::Refuse(Refusal::CrossSite)
                } else {
                    Verdict::Pass
                };
            }
            (Some(origin), None) => origin,
            (Some(origin), Some(_)) => {
                return Verdict::Refuse(Refusal::Origin(shown(origin.as_bytes())));
            }
        };
        let allowed = origin
            .to_str()
            .is_ok_and(|o| self.origins.iter().any(|a| a.0.eq_ignore_ascii_case(o)));
        if !allowed {
            return Verdict::Refuse(Refusal::Origin(shown(origin.as_bytes())));
        }
        if method == Method::OPTIONS && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            return Verdict::Preflight {
                origin: origin.clone(),
                private_network: headers
                    .get("access-control-request-private-network")
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true")),
            };
        }
        Verdict::Cors(origin.clone())
    }

    /// Loopback names, IP addresses and the configured names: a DNS
    /// rebinding page is on a name of its owner's, none of these.
    fn host_allowed(&self, host: &str) -> bool {
        if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            return v6.parse::<Ipv6Addr>().is_ok();
        }
        if host.parse::<Ipv4Addr>().is_ok() {
            return true;
        }
        let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        // Browsers resolve these to loopback themselves (RFC 6761), never
        // through DNS.
        name == "localhost"
            || name.ends_with(".localhost")
            || self.hosts.iter().any(|h| h.0 == name)
    }

    /// The refusal's answer: a gRPC status for gRPC callers (so grpcurl
    /// and tonic clients show the message), a plain-text HTTP one for the
    /// rest. Either names the setting that would let the request in.
    fn refuse(&self, refusal: &Refusal, headers: &HeaderMap) -> Response<Full<Bytes>> {
        let (status, message) = match refusal {
            Refusal::Origin(origin) => {
                self.refused_origin.inc();
                self.log.log(|more| {
                    info!(origin = ?origin, more, "cross-origin request refused: its Origin is not in KONGTIE_ALLOWED_ORIGINS");
                });
                (
                    StatusCode::FORBIDDEN,
                    format!(
                        "cross-origin request refused: the origin {origin} is not allowed to call \
                         this gateway; list it in {ORIGINS_SETTING} to let its pages call"
                    ),
                )
            }
            Refusal::CrossSite => {
                self.refused_cross_site.inc();
                self.log.log(|more| {
                    info!(more, "cross-site browser request without an Origin refused");
                });
                (
                    StatusCode::FORBIDDEN,
                    format!(
                        "cross-site browser request refused: it carries no Origin; pages may \
                         call only with one listed in {ORIGINS_SETTING}"
                    ),
                )
            }
            Refusal::Host(host) => {
                self.refused_host.inc();
                let host = shown(host.as_bytes());
                self.log.log(|more| {
                    info!(host = ?host, more, "request refused: its Host is not a loopback name, an IP address or in KONGTIE_ALLOWED_HOSTS");
                });
                (
                    StatusCode::MISDIRECTED_REQUEST,
                    format!(
                        "request refused: this gateway has no API keys, so it answers only \
                         loopback names, IP addresses and the names in {HOSTS_SETTING} \
                         (DNS rebinding protection), not {host:?}; list the name there, or \
                         configure API keys"
                    ),
                )
            }
        };
        let grpc = headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if grpc {
            return tonic::Status::permission_denied(message).into_http();
        }
        let mut response = Response::new(Full::new(Bytes::from(message + "\n")));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        response
    }

    fn preflight(&self, origin: HeaderValue, private_network: bool) -> Response<Full<Bytes>> {
        self.preflights.inc();
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::NO_CONTENT;
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(
            header::VARY,
            HeaderValue::from_static(
                "origin, access-control-request-method, access-control-request-headers",
            ),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(ALLOW_METHODS),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(ALLOW_HEADERS),
        );
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static(MAX_AGE_SECS),
        );
        if private_network {
            // The operator listed the origin: a public page may reach a
            // gateway on a private address (Chromium's Private Network
            // Access asks first).
            headers.insert(
                "access-control-allow-private-network",
                HeaderValue::from_static("true"),
            );
        }
        response
    }
}

fn no_userinfo(authority: &Authority) -> bool {
    !authority.as_str().contains('@')
}

/// An origin or host as it may be shown: printable ASCII, at most 100
/// characters.
fn shown(bytes: &[u8]) -> String {
    let text: String = bytes
        .iter()
        .take(100)
        .map(|&b| if b.is_ascii_graphic() { b as char } else { '?' })
        .collect();
    if bytes.len() > 100 {
        text + "..."
    } else {
        text
    }
}

/// A refused request's body is read (and dropped) up to this much, for
/// this long, before the answer: answered before its body ends, an HTTP/2
/// stream is reset, and some clients (curl) then lose the answer.
const DRAIN_BYTES: u64 = 64 << 10;
const DRAIN_TIME: Duration = Duration::from_millis(500);

async fn drain<B: http_body::Body + Unpin>(mut body: B) {
    if body.size_hint().lower() > DRAIN_BYTES {
        return;
    }
    let mut read = 0u64;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(data) = frame.data_ref() {
            read += data.remaining() as u64;
            if read > DRAIN_BYTES {
                return;
            }
        }
    }
}

/// The CORS headers of an allowed origin's served request.
fn with_cors<B>(mut response: Response<B>, origin: HeaderValue) -> Response<B> {
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.append(header::VARY, HeaderValue::from_static("origin"));
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(EXPOSE_HEADERS),
    );
    response
}

#[derive(Clone)]
pub struct OriginLayer {
    guard: Arc<Guard>,
}

impl OriginLayer {
    /// `keyless`: the gateway has no API keys, so host names are checked.
    pub fn new(policy: &OriginPolicy, keyless: bool, metrics: &Metrics) -> Self {
        let refused = |reason| {
            metrics
                .grpc_requests_refused
                .get_or_create_owned(&ReasonLabels { reason })
        };
        Self {
            guard: Arc::new(Guard {
                origins: policy.origins.clone(),
                hosts: policy.hosts.clone(),
                restrict_hosts: keyless,
                refused_origin: refused("origin_not_allowed"),
                refused_host: refused("host_not_allowed"),
                refused_cross_site: refused("cross_site_without_origin"),
                preflights: metrics.grpc_cors_preflights.clone(),
                log: RateLimited::with_burst(Duration::from_secs(10), 10),
            }),
        }
    }
}

impl<S> Layer<S> for OriginLayer {
    type Service = OriginGuard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OriginGuard {
            inner,
            guard: Arc::clone(&self.guard),
        }
    }
}

#[derive(Clone)]
pub struct OriginGuard<S> {
    inner: S,
    guard: Arc<Guard>,
}

/// The inner service's answer, or this layer's own.
pub type GuardedBody<B> = http_body_util::Either<B, Full<Bytes>>;

type Passed<B> = fn(Response<B>) -> Response<GuardedBody<B>>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, B> Service<Request<ReqBody>> for OriginGuard<S>
where
    S: Service<Request<ReqBody>, Response = Response<B>, Error = Infallible>,
    S::Future: Send + 'static,
    ReqBody: http_body::Body + Unpin + Send + 'static,
    B: 'static,
{
    type Response = Response<GuardedBody<B>>;
    type Error = Infallible;
    // Requests without an origin (every gRPC call) pass without a box.
    type Future = Either<
        MapOk<S::Future, Passed<B>>,
        Either<
            Ready<Result<Self::Response, Infallible>>,
            BoxFuture<Result<Self::Response, Infallible>>,
        >,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let verdict = self.guard.judge(
            request.method(),
            request.headers(),
            request.uri().authority(),
        );
        match verdict {
            Verdict::Pass => {
                let passed: Passed<B> = |r| r.map(GuardedBody::Left);
                Either::Left(self.inner.call(request).map_ok(passed))
            }
            Verdict::Cors(origin) => {
                let served = self.inner.call(request);
                Either::Right(Either::Right(Box::pin(async move {
                    let response = served.await?;
                    Ok(with_cors(response.map(GuardedBody::Left), origin))
                })))
            }
            Verdict::Preflight {
                origin,
                private_network,
            } => {
                let answer = self.guard.preflight(origin, private_network);
                Either::Right(Either::Left(ready(Ok(answer.map(GuardedBody::Right)))))
            }
            Verdict::Refuse(refusal) => {
                let answer = self.guard.refuse(&refusal, request.headers());
                let body = request.into_body();
                Either::Right(Either::Right(Box::pin(async move {
                    let _ = tokio::time::timeout(DRAIN_TIME, drain(body)).await;
                    Ok(answer.map(GuardedBody::Right))
                })))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(origins: &[&str], hosts: &[&str], keyless: bool) -> Guard {
        let metrics = Metrics::new();
        let policy = OriginPolicy {
            origins: origins.iter().map(|o| parse_origin(o).unwrap()).collect(),
            hosts: hosts.iter().map(|h| parse_host(h).unwrap()).collect(),
        };
        Arc::into_inner(OriginLayer::new(&policy, keyless, &metrics).guard).unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn origins_are_read_as_browsers_write_them_and_wildcards_are_refused() {
        assert_eq!(
            parse_origin("HTTPS://Shop.Example:443").unwrap().0,
            "https://shop.example"
        );
        assert_eq!(
            parse_origin("http://127.0.0.1:8000").unwrap().0,
            "http://127.0.0.1:8000"
        );
        for bad in [
            "*",
            "null",
            "shop.example",
            "https://shop.example/",
            "https://shop.example/pay",
            "ftp://shop.example",
            "https://user@shop.example",
        ] {
            assert!(parse_origin(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(
            parse_host("Gateway.Internal.").unwrap().0,
            "gateway.internal"
        );
        for bad in ["", "gateway:50051", "http://gateway", "a..b"] {
            assert!(parse_host(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn an_empty_setting_is_refused_with_a_message_saying_how_to_allow_none() {
        for refused in [parse_origin("").unwrap_err(), parse_host(" ").unwrap_err()] {
            assert!(refused.contains("leave the setting out"), "{refused}");
        }
    }

    #[test]
    fn without_keys_only_loopback_names_ip_addresses_and_listed_names_are_answered() {
        let keyless = guard(&[], &["gateway.internal"], true);
        let judged = |host: &str| {
            keyless.judge(&Method::POST, &headers(&[("host", host)]), None) == Verdict::Pass
        };
        for served in [
            "127.0.0.1:50051",
            "10.1.2.3",
            "[::1]:50051",
            "localhost:50051",
            "LOCALHOST.",
            "app.localhost",
            "gateway.internal:50051",
            "Gateway.Internal",
        ] {
            assert!(judged(served), "{served} refused");
        }
        for refused in [
            "attacker.example",
            "attacker.example:50051",
            "localhost.attacker.example",
            "127.0.0.1.nip.io",
            "[not-v6]",
            "attacker.example@127.0.0.1",
            "attacker.example@localhost:50051",
            "",
        ] {
            assert!(!judged(refused), "{refused} served");
        }
        // HTTP/2's :authority is judged as Host is.
        for named in ["attacker.example:50051", "attacker.example@127.0.0.1:50051"] {
            let authority: Authority = named.parse().unwrap();
            assert!(
                matches!(
                    keyless.judge(&Method::POST, &HeaderMap::new(), Some(&authority)),
                    Verdict::Refuse(Refusal::Host(_))
                ),
                "{named} served"
            );
        }
        // With keys, any name.
        let keyed = guard(&[], &[], false);
        assert_eq!(
            keyed.judge(
                &Method::POST,
                &headers(&[("host", "attacker.example")]),
                None
            ),
            Verdict::Pass
        );
    }

    #[test]
    fn a_refused_host_is_quoted_in_the_answer_so_an_empty_one_is_seen() {
        let keyless = guard(&[], &[], true);
        let answer = keyless.refuse(&Refusal::Host(String::new()), &HeaderMap::new());
        assert_eq!(answer.status(), StatusCode::MISDIRECTED_REQUEST);
        let body = futures::executor::block_on(answer.into_body().collect())
            .unwrap()
            .to_bytes();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(text.contains(r#"not "";"#), "{text}");
    }

    #[test]
    fn only_listed_origins_pass_and_their_preflights_are_answered_here() {
        let g = guard(&["http://127.0.0.1:8000"], &[], true);
        let allowed = HeaderValue::from_static("http://127.0.0.1:8000");
        assert_eq!(
            g.judge(
                &Method::POST,
                &headers(&[("origin", "http://127.0.0.1:8000")]),
                None
            ),
            Verdict::Cors(allowed.clone())
        );
        assert_eq!(
            g.judge(
                &Method::OPTIONS,
                &headers(&[
                    ("origin", "http://127.0.0.1:8000"),
                    ("access-control-request-method", "POST"),
                ]),
                None
            ),
            Verdict::Preflight {
                origin: allowed,
                private_network: false
            }
        );
        for refused in [
            vec![("origin", "http://127.0.0.1:8001")],
            vec![("origin", "null")],
            vec![
                ("origin", "http://127.0.0.1:8000"),
                ("origin", "http://127.0.0.1:8001"),
            ],
            vec![("sec-fetch-site", "cross-site")],
            vec![("sec-fetch-site", "same-site")],
        ] {
            assert!(
                matches!(
                    g.judge(&Method::POST, &headers(&refused), None),
                    Verdict::Refuse(_)
                ),
                "{refused:?} served"
            );
        }
        // A navigation the user typed, or a same-origin request, passes.
        assert_eq!(
            g.judge(&Method::GET, &headers(&[("sec-fetch-site", "none")]), None),
            Verdict::Pass
        );
    }
}
