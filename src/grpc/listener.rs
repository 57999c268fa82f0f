//! The gRPC listener's connections: our own accept loop and TLS in front
//! of tonic's server, so that no client can hold a connection (or the
//! listener) for longer than the settings say.
//!
//! - Open connections are capped, and accept errors backed off
//!   (`crate::accept`).
//! - A connection has the handshake timeout, from the moment it is
//!   accepted, to finish its TLS handshake (when TLS is on) and send its
//!   first 24 bytes: the HTTP/2 preface, or as much of an HTTP/1.1 request
//!   (the Connect protocol; hyper's header read timeout takes over from
//!   there). Past it, the connection is closed.
//! - A connection past its maximum age gets a GOAWAY (tonic's
//!   `max_connection_age`), and its streams may finish within the grace;
//!   at age plus grace it is closed for good, stuck streams and all. Their
//!   clients resume by sequence or consumer.
//! - TLS offers both `h2` and `http/1.1` in ALPN, so HTTP/1.1-only Connect
//!   clients can use it too.
//!
//! The deadlines live in the connection's IO: a read or write past one
//! fails, which ends hyper's connection. hyper polls a connection's reads
//! or (when the peer reads nothing) its writes at all times, so a deadline
//! is noticed when it passes.

use std::{
    future::Future,
    io,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::{mpsc, watch},
    time::{Instant, Sleep},
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, RootCertStore,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::WebPkiClientVerifier,
    },
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tracing::debug;

use crate::{
    accept::{Acceptor, Slot},
    config::TlsFiles,
    startup::BoxError,
};

/// How the gRPC listener treats connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionPolicy {
    /// Connections open at once; past it, accepting waits.
    pub max_connections: usize,
    /// From accept to the TLS handshake done and the first 24 bytes read.
    pub handshake_timeout: Duration,
    /// After this, a GOAWAY (sent by tonic) ...
    pub max_age: Option<Duration>,
    /// ... and after this more, the connection is closed for good.
    pub max_age_grace: Duration,
}

/// Length of the HTTP/2 client preface.
const PREFACE_LEN: usize = 24;

/// The accepted connections, each with its deadlines, once `handshake`
/// (TLS, or nothing) is done; ends when `stopping` turns true, or when the
/// listening socket can accept no more. Handshakes
/// run side by side, so a slow one holds up no other.
pub fn incoming<IO, H, F>(
    mut acceptor: Acceptor,
    handshake: H,
    policy: ConnectionPolicy,
    mut stopping: watch::Receiver<bool>,
) -> ReceiverStream<io::Result<Guarded<IO>>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(TcpStream) -> F + Send + 'static,
    F: Future<Output = io::Result<IO>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (stream, peer, mut slot) = tokio::select! {
                accepted = acceptor.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // The stream ends, and with it tonic's server:
                        // startup sees it end early.
                        tracing::error!(error = %e, "the gRPC listener can accept no more");
                        break;
                    }
                },
                _ = stopping.wait_for(|s| *s) => break,
            };
            let opened = Instant::now();
            let deadline = opened + policy.handshake_timeout;
            let handshake = handshake(stream);
            let tx = tx.clone();
            tokio::spawn(async move {
                let io = match tokio::time::timeout_at(deadline, handshake).await {
                    Ok(Ok(io)) => io,
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "TLS handshake failed");
                        slot.set_reason("tls_handshake");
                        return;
                    }
                    Err(_) => {
                        debug!(%peer, "TLS handshake not done within the handshake timeout");
                        slot.set_reason("tls_handshake");
                        return;
                    }
                };
                let end = policy.max_age.map(|age| {
                    Box::pin(tokio::time::sleep_until(
                        opened + age + policy.max_age_grace,
                    ))
                });
                let guarded = Guarded {
                    io,
                    preface: Some((PREFACE_LEN, Box::pin(tokio::time::sleep_until(deadline)))),
                    end,
                    slot,
                };
                let _ = tx.send(Ok(guarded)).await;
            });
        }
        // The listening socket closes here: new clients are refused at once
        // rather than left waiting.
    });
    ReceiverStream::new(rx)
}

/// A connection's IO with its deadlines, and its place under the cap.
pub struct Guarded<IO> {
    io: IO,
    /// Bytes still to come before the connection has said enough, and the
    /// deadline for them.
    preface: Option<(usize, Pin<Box<Sleep>>)>,
    /// Max age plus grace: closed for good.
    end: Option<Pin<Box<Sleep>>>,
    slot: Slot,
}

impl<IO> Guarded<IO> {
    /// The error to fail with once a deadline has passed; otherwise the
    /// deadlines are registered to wake this connection.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if let Some((_, sleep)) = &mut self.preface
            && sleep.as_mut().poll(cx).is_ready()
        {
            self.slot.set_reason("no_preface");
            return Some(io::Error::new(
                io::ErrorKind::TimedOut,
                "nothing (no HTTP/2 preface) within the handshake timeout",
            ));
        }
        if let Some(end) = &mut self.end
            && end.as_mut().poll(cx).is_ready()
        {
            self.slot.set_reason("past_max_age");
            return Some(io::Error::new(
                io::ErrorKind::TimedOut,
                "closed for good: past the maximum connection age and its grace",
            ));
        }
        None
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guarded<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.io).poll_read(cx, buf))?;
        let read = buf.filled().len() - before;
        if let Some((left, _)) = &mut self.preface {
            *left = left.saturating_sub(read);
            if *left == 0 {
                self.preface = None;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guarded<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<IO: Connected> Connected for Guarded<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// The TLS acceptor for the configured certificate, key and (for mutual
/// TLS) client CA.
pub async fn tls_acceptor(files: &TlsFiles) -> Result<TlsAcceptor, BoxError> {
    let read = |path: PathBuf, what: &'static str| async move {
        tokio::fs::read(&path)
            .await
            .map_err(|e| BoxError::from(format!("reading the TLS {what} {}: {e}", path.display())))
    };
    let pem_error = |what: &str, path: &PathBuf, e: &dyn std::fmt::Display| {
        BoxError::from(format!("the TLS {what} {}: {e}", path.display()))
    };
    let certs = CertificateDer::pem_slice_iter(&read(files.cert.clone(), "certificate").await?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error("certificate", &files.cert, &e))?;
    let key = PrivateKeyDer::from_pem_slice(&read(files.key.clone(), "key").await?)
        .map_err(|e| pem_error("key", &files.key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&read(ca.clone(), "client CA").await?) {
                roots
                    .add(cert.map_err(|e| pem_error("client CA", ca, &e))?)
                    .map_err(|e| pem_error("client CA", ca, &e))?;
            }
            builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?,
            )
        }
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
