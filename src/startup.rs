//! Wiring: opens the store, binds the listeners, builds the services, serves
//! until told to stop, then shuts down in order. Tests build an
//! [`Application`] on port 0 and read back the ports.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use futures::FutureExt;
use secrecy::ExposeSecret;
use tokio::{net::TcpListener, sync::watch};
use tokio_rustls::TlsAcceptor;
use tonic::transport::Server;
use tracing::{info, warn};
use url::Url;

use crate::{
    accept::Acceptor,
    admin,
    api_keys::ApiKeys,
    config::{AccessConfig, Config},
    connect::ConnectLayer,
    consumers::WorkQueues,
    gateway::Gateway,
    grpc::{
        AuthService, PaymentService, TicketService,
        keyless::Keyless,
        limits::CallLimitsLayer,
        listener,
        observe::ObserveLayer,
        origin::OriginLayer,
        subscription_limits::{SubscriptionLimits, SubscriptionPolicy},
        who_may_call::WhoMayCallLayer,
    },
    metrics::Metrics,
    notify,
    orders::Ledger,
    proto::{auth_server::AuthServer, payment_server::PaymentServer, ticket_server::TicketServer},
    sandbox::SandboxHandle,
    store::{self, NotificationStore},
    upstream::KongtieClient,
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub struct Application {
    grpc_listener: TcpListener,
    grpc_addr: SocketAddr,
    notify_listener: TcpListener,
    notify_addr: SocketAddr,
    notify_url: Url,
    admin_listener: TcpListener,
    admin_addr: SocketAddr,
    api_keys: ApiKeys,
    tls: Option<TlsAcceptor>,
    config: Config,
    metrics: Arc<Metrics>,
    gateway: Arc<Gateway>,
    store: Arc<dyn NotificationStore>,
    sandbox: Option<SandboxHandle>,
}

impl Application {
    /// Checks who may call, opens the store, binds every listener (port 0
    /// picks a free port) and, with a sandbox configured, starts it and
    /// points the upstream URLs at it and its notifications at us.
    pub async fn build(mut config: Config) -> Result<Self, BoxError> {
        info!(
            version = %env!("CARGO_PKG_VERSION"),
            "kongtie-gateway starting"
        );
        let api_keys = who_may_call(&config)?;
        if api_keys.is_empty() {
            warn!(addr = %config.grpc_addr, "no API keys configured: every gRPC caller is let in");
        }
        let tls = load_tls(&config.access).await?;

        let metrics = Metrics::new();
        let store = store::open(&config.store_url, Some(Arc::clone(&metrics))).await?;
        let notify_listener = bind(config.notify_addr, "the notify listener").await?;
        let notify_addr = notify_listener.local_addr()?;
        let notify_url = Url::parse(&format!("http://{notify_addr}{}", config.notify.path))?;
        let admin_listener = bind(config.admin_addr, "the admin listener").await?;
        let admin_addr = admin_listener.local_addr()?;

        let sandbox = match config.sandbox.take() {
            Some((addr, mut sandbox_config)) => {
                let listener = bind(addr, "the sandbox").await?;
                sandbox_config.notify_url = Some(notify_url.clone());
                let sandbox = SandboxHandle::spawn(sandbox_config, listener)?;
                config.upstream.ktapi_url = sandbox.ktapi_url();
                config.upstream.pay_url = sandbox.pay_url();
                Some(sandbox)
            }
            None => None,
        };
        let grpc_listener = bind(config.grpc_addr, "the gRPC listener").await?;
        let grpc_addr = grpc_listener.local_addr()?;
        let client = KongtieClient::new(config.upstream.clone(), Some(Arc::clone(&metrics)))?;
        info!(
            ktapi_url = %crate::upstream::shown_url(&config.upstream.ktapi_url),
            pay_url = %crate::upstream::shown_url(&config.upstream.pay_url),
            sandbox = sandbox.is_some(),
            "upstream configured"
        );
        Ok(Self {
            grpc_listener,
            grpc_addr,
            notify_listener,
            notify_addr,
            notify_url,
            admin_listener,
            admin_addr,
            api_keys,
            tls,
            gateway: Arc::new(Gateway::new(
                client,
                config.gateway.clone(),
                Arc::clone(&metrics),
            )),
            metrics,
            config,
            store,
            sandbox,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn notify_addr(&self) -> SocketAddr {
        self.notify_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The URL to give Kongtie (behind whatever makes it public).
    pub fn notify_url(&self) -> &Url {
        &self.notify_url
    }

    pub fn sandbox(&self) -> Option<&SandboxHandle> {
        self.sandbox.as_ref()
    }

    /// Serves until `shutdown` completes. Then: not ready, health NOT_SERVING,
    /// no new connections; subscriptions end with UNAVAILABLE; in-flight
    /// calls and notifications may finish within the grace period; the
    /// store is closed last.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), BoxError> {
        let (stopping_tx, stopping) = watch::channel(false);
        let (ready_tx, ready) = watch::channel(true);
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<AuthServer<AuthService>>()
            .await;
        health_reporter
            .set_serving::<TicketServer<TicketService>>()
            .await;
        health_reporter
            .set_serving::<PaymentServer<PaymentService>>()
            .await;
        // The first listener to end before shutdown, and why: it shuts
        // the rest down, and the process exits non-zero.
        let (ended_early_tx, ended_early) = watch::channel(None::<String>);
        let ended_early_tx = Arc::new(ended_early_tx);
        let reporter = health_reporter.clone();
        let mut early = ended_early.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown => {}
                _ = early.wait_for(Option::is_some) => {}
            }
            let _ = ready_tx.send(false);
            reporter.set_not_serving::<AuthServer<AuthService>>().await;
            reporter
                .set_not_serving::<TicketServer<TicketService>>()
                .await;
            reporter
                .set_not_serving::<PaymentServer<PaymentService>>()
                .await;
            // And the server as a whole (service ""), which is what probes
            // ask by default.
            reporter
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            let _ = stopping_tx.send(true);
        });
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };

        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(
                    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                )
                // The rich error details, so grpcurl can print them.
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        };
        let ledger = Arc::new(Ledger::new(
            self.store.orders(),
            self.gateway.client(),
            self.config.ledger,
            Arc::clone(&self.metrics),
        ));
        let queues = WorkQueues::new(
            Arc::clone(&self.store),
            stopping.clone(),
            Arc::clone(&self.metrics),
        );
        queues.spawn_sampler();
        crate::retention::spawn_sweeper(
            self.store.retention(),
            self.config.retention,
            Arc::clone(&self.metrics),
            stopping.clone(),
        );
        let runs = Arc::clone(&ledger);
        let payment = PaymentService::new(
            Arc::clone(&self.gateway),
            ledger,
            Arc::clone(&self.store),
            queues,
            stopping.clone(),
            Arc::clone(&self.metrics),
            SubscriptionPolicy {
                max_age: self.config.max_connection_age,
                limits: SubscriptionLimits::new(
                    self.config.max_subscriptions,
                    self.config.max_subscriptions_per_connection,
                ),
            },
        );
        let keys = self.api_keys.clone();

        let mut server = Server::builder();
        if let Some(age) = self.config.max_connection_age {
            // GOAWAY after `age`, then the connection's streams may finish;
            // it is closed for good at age + grace by `listener`. Not
            // tonic's `max_connection_age_grace`: in tonic 0.14 setting it
            // skips the GOAWAY and closes the connection hard at age + grace.
            server = server.max_connection_age(age);
        }
        let max_message = self.config.grpc_max_message_bytes;
        let keyless = Arc::new(SubscriptionLimits::new(
            self.config.max_subscriptions,
            self.config.max_subscriptions_per_connection,
        ));
        info!(
            addr = %self.grpc_addr,
            tls = self.config.access.tls.is_some(),
            version = %env!("CARGO_PKG_VERSION"),
            "gRPC listening (and the Connect protocol)"
        );
        let grpc = server
            // HTTP/1.1 beside HTTP/2, for the Connect protocol's callers.
            .accept_http1(true)
            // One pipeline for every request, outermost first. Foreign web
            // pages and, without keys, foreign host names are refused
            // before anything runs (src/grpc/origin.rs).
            .layer(OriginLayer::new(
                &self.config.origins,
                keys.is_empty(),
                &self.metrics,
            ))
            // Connect requests become the gRPC calls they mean, from their
            // headers alone (their bodies are read when the handler reads
            // the message), and any other content type is HTTP 415
            // (src/connect).
            .layer(ConnectLayer::new(max_message, &self.metrics)?)
            // Each RPC's metrics, span and log line (src/grpc/observe.rs).
            .layer(ObserveLayer::new(Arc::clone(&self.metrics)))
            // Who may call: the API key, before any body is read
            // (src/grpc/who_may_call.rs).
            .layer(WhoMayCallLayer::new(keys))
            // The deadline of each call, and RESOURCE_EXHAUSTED for a
            // message over the limit (src/grpc/limits.rs).
            .layer(CallLimitsLayer::new(
                self.config.grpc_call_timeout,
                max_message,
            ))
            // Notice dead subscribers: a ping every 30 s, gone after 10 s
            // without an answer.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            // Streams per connection, advertised in SETTINGS: tonic passes
            // none to hyper by default, which leaves a connection unbounded.
            .max_concurrent_streams(self.config.grpc_max_streams)
            // hyper's own caps on streams a client has reset before the
            // server took them (rapid reset) and on streams the server
            // resets for the client's errors (MadeYouReset): past them, a
            // GOAWAY. tonic passes none, which turns the second off; these
            // are hyper's defaults.
            .http2_max_pending_accept_reset_streams(Some(20))
            .http2_max_local_error_reset_streams(Some(1024))
            // Health and reflection need no API key (probes and grpcurl
            // use them; WhoMayCall lets them by): under the same limits as
            // every call, and caps of
            // their own on calls open at once (src/grpc/keyless.rs).
            .add_service(Keyless::new(
                health_service.max_decoding_message_size(max_message),
                Arc::clone(&keyless),
            ))
            .add_service(Keyless::new(
                reflection()
                    .build_v1()?
                    .max_decoding_message_size(max_message),
                Arc::clone(&keyless),
            ))
            .add_service(Keyless::new(
                reflection()
                    .build_v1alpha()?
                    .max_decoding_message_size(max_message),
                keyless,
            ))
            .add_service(
                AuthServer::new(AuthService::new(Arc::clone(&self.gateway)))
                    .max_decoding_message_size(max_message),
            )
            .add_service(
                TicketServer::new(TicketService::new(Arc::clone(&self.gateway)))
                    .max_decoding_message_size(max_message),
            )
            .add_service(PaymentServer::new(payment).max_decoding_message_size(max_message));
        // Our own accept loop and TLS (src/grpc/listener.rs): the
        // connection cap, the handshake timeout, and the close for good
        // after max age + grace.
        let policy = self.config.grpc_connections;
        let acceptor = Acceptor::new(
            self.grpc_listener,
            policy.max_connections,
            self.metrics.grpc_listener.clone(),
            "gRPC",
        );
        let grpc = match self.tls {
            None => grpc
                .serve_with_incoming_shutdown(
                    listener::incoming(
                        acceptor,
                        |tcp| async move { Ok(tcp) },
                        policy,
                        stopping.clone(),
                    ),
                    stopped(stopping.clone()),
                )
                .boxed(),
            Some(tls) => grpc
                .serve_with_incoming_shutdown(
                    listener::incoming(
                        acceptor,
                        move |tcp| tls.accept(tcp),
                        policy,
                        stopping.clone(),
                    ),
                    stopped(stopping.clone()),
                )
                .boxed(),
        };

        info!(addr = %self.notify_addr, path = %self.config.notify.path, "notify listener listening");
        let notify_app = notify::router(
            Arc::clone(&self.store),
            self.config.notify.clone(),
            Arc::clone(&self.metrics),
        );
        let notify = watched(
            "notify listener",
            notify::serve(
                self.notify_listener,
                notify_app,
                self.config.notify.connection_limits(),
                Arc::clone(&self.metrics),
                stopping.clone(),
            )
            .map(|r| r.map_err(BoxError::from)),
            stopping.clone(),
            Arc::clone(&ended_early_tx),
        );
        let grpc = watched(
            "gRPC server",
            grpc.map(|r| r.map_err(BoxError::from)),
            stopping.clone(),
            Arc::clone(&ended_early_tx),
        );

        info!(addr = %self.admin_addr, "admin listener listening");
        let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let admin_serve = tokio::spawn(admin::serve(
            self.admin_listener,
            admin::router(Arc::clone(&self.metrics), ready, self.store.writable()),
            async {
                let _ = admin_stopped.await;
            },
        ));
        // Spawned apart so that a panic in it is seen too.
        let admin = tokio::spawn(watched(
            "admin listener",
            async move {
                match admin_serve.await {
                    Ok(served) => served.map_err(BoxError::from),
                    Err(e) => Err(format!("it panicked: {e}").into()),
                }
            },
            stopping.clone(),
            ended_early_tx,
        ));

        // The order runs whose callers left end within the grace too: their
        // outcomes are recorded before the store closes.
        let serving = async {
            let served = tokio::join!(grpc, notify);
            runs.drain().await;
            served
        };
        let grace = self.config.shutdown_grace;
        let deadline = async {
            stopped(stopping.clone()).await;
            tokio::time::sleep(grace).await;
        };
        let grpc = tokio::select! {
            (grpc, _) = serving => grpc,
            () = deadline => {
                warn!(grace_secs = grace.as_secs(), "grace period over; closing with work still in flight");
                Ok(())
            }
        };
        if let Some(sandbox) = self.sandbox {
            sandbox.shutdown().await;
        }
        // Whatever reached the store's queue is committed before it closes.
        self.store.close().await;
        let _ = admin_stop.send(());
        let _ = admin.await;
        info!("stopped");
        if let Some(why) = ended_early.borrow().clone() {
            return Err(why.into());
        }
        grpc?;
        Ok(())
    }
}

/// Runs one listener's server; if it ends before shutdown began (an error,
/// or its socket gone), says so at ERROR and in `ended_early`, which shuts
/// the others down: a process serving some of its ports, with `/readyz` at
/// 200, would hide the fault.
async fn watched(
    name: &'static str,
    server: impl Future<Output = Result<(), BoxError>>,
    stopping: watch::Receiver<bool>,
    ended_early: Arc<watch::Sender<Option<String>>>,
) -> Result<(), BoxError> {
    let result = server.await;
    if !*stopping.borrow() {
        let why = match &result {
            Ok(()) => format!("the {name} ended before shutdown"),
            Err(e) => format!("the {name} ended before shutdown: {e}"),
        };
        tracing::error!("{why}; shutting down the rest");
        ended_early.send_if_modified(|first| {
            let unset = first.is_none();
            if unset {
                *first = Some(why);
            }
            unset
        });
    }
    result
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, BoxError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("binding {what} on {addr}: {e}").into())
}

/// The API keys `config` gives, and whether serving without any is allowed:
/// only on a loopback address, or with --allow-unauthenticated. `serve` and
/// `check` both decide here.
pub fn who_may_call(config: &Config) -> Result<ApiKeys, BoxError> {
    let api_keys = load_api_keys(&config.access)?;
    if api_keys.is_empty()
        && !config.grpc_addr.ip().is_loopback()
        && !config.access.allow_unauthenticated
    {
        return Err(format!(
            "refusing to serve gRPC on {} without API keys: set KONGTIE_API_KEYS or \
             KONGTIE_API_KEYS_FILE, or pass --allow-unauthenticated",
            config.grpc_addr
        )
        .into());
    }
    Ok(api_keys)
}

/// The configured keys and the keys file's lines (blank lines and `#`
/// comments skipped).
pub fn load_api_keys(access: &AccessConfig) -> Result<ApiKeys, BoxError> {
    let mut keys: Vec<String> = access
        .api_keys
        .iter()
        .map(|k| k.expose_secret().trim().to_owned())
        .filter(|k| !k.is_empty())
        .collect();
    if let Some(path) = &access.api_keys_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the API keys file {}: {e}", path.display()))?;
        keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned),
        );
        if keys.is_empty() {
            return Err(format!("the API keys file {} holds no key", path.display()).into());
        }
    }
    for key in &keys {
        crate::config::refuse_placeholder("an API key", key)?;
    }
    if keys
        .iter()
        .any(|k| k.chars().any(|c| c.is_whitespace() || c == ','))
    {
        return Err("an API key contains a space or a comma".into());
    }
    Ok(ApiKeys::new(keys.iter().map(String::as_str)))
}

pub async fn load_tls(access: &AccessConfig) -> Result<Option<TlsAcceptor>, BoxError> {
    match &access.tls {
        None => Ok(None),
        Some(files) => Ok(Some(listener::tls_acceptor(files).await?)),
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    info!("shutdown signal received");
}
