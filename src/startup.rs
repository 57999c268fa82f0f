//! Wiring: binds the listeners, opens the store, builds the services, serves
//! until told to stop. Tests build an [`Application`] on port 0 and read
//! back the ports.

use std::{net::SocketAddr, sync::Arc};

use tokio::{net::TcpListener, sync::watch};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tracing::info;
use url::Url;

use crate::{
    config::Config,
    gateway::Gateway,
    grpc::{AuthService, PaymentService, TicketService},
    notify,
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
    config: Config,
    gateway: Arc<Gateway>,
    store: Arc<dyn NotificationStore>,
    sandbox: Option<SandboxHandle>,
}

impl Application {
    /// Opens the store, binds every listener (port 0 picks a free port)
    /// and, with a sandbox configured, starts it and points the upstream
    /// URLs at it and its notifications at us.
    pub async fn build(mut config: Config) -> Result<Self, BoxError> {
        let store = store::open(&config.store_url).await?;
        let notify_listener = TcpListener::bind(config.notify_addr)
            .await
            .map_err(|e| format!("binding the notify listener on {}: {e}", config.notify_addr))?;
        let notify_addr = notify_listener.local_addr()?;
        let notify_url = Url::parse(&format!("http://{notify_addr}{}", config.notify.path))?;

        let sandbox = match config.sandbox.take() {
            Some((addr, mut sandbox_config)) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("binding the sandbox on {addr}: {e}"))?;
                sandbox_config.notify_url = Some(notify_url.clone());
                let sandbox = SandboxHandle::spawn(sandbox_config, listener)?;
                config.upstream.ktapi_url = sandbox.ktapi_url();
                config.upstream.pay_url = sandbox.pay_url();
                Some(sandbox)
            }
            None => None,
        };
        let grpc_listener = TcpListener::bind(config.grpc_addr)
            .await
            .map_err(|e| format!("binding the gRPC listener on {}: {e}", config.grpc_addr))?;
        let grpc_addr = grpc_listener.local_addr()?;
        let client = KongtieClient::new(config.upstream.clone())?;
        info!(
            ktapi_url = %config.upstream.ktapi_url,
            pay_url = %config.upstream.pay_url,
            sandbox = sandbox.is_some(),
            "upstream configured"
        );
        Ok(Self {
            grpc_listener,
            grpc_addr,
            notify_listener,
            notify_addr,
            notify_url,
            gateway: Arc::new(Gateway::new(client, config.gateway.clone())),
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

    /// The URL to give Kongtie (behind whatever makes it public).
    pub fn notify_url(&self) -> &Url {
        &self.notify_url
    }

    pub fn sandbox(&self) -> Option<&SandboxHandle> {
        self.sandbox.as_ref()
    }

    /// Serves until `shutdown` completes; then ends the subscriptions, lets
    /// in-flight calls and notifications finish, and closes the store.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), BoxError> {
        let (stopping_tx, stopping) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stopping_tx.send(true);
        });
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };

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
        let payment = PaymentService::new(
            Arc::clone(&self.gateway),
            Arc::clone(&self.store),
            stopping.clone(),
        );

        info!(addr = %self.grpc_addr, "gRPC listening");
        let grpc = Server::builder()
            .trace_fn(|request| tracing::info_span!("grpc", method = request.uri().path()))
            // Notice dead subscribers: a ping every 30 s, gone after 10 s
            // without an answer.
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
            .add_service(health_service)
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?)
            .add_service(AuthServer::new(AuthService::new(Arc::clone(&self.gateway))))
            .add_service(TicketServer::new(TicketService::new(Arc::clone(
                &self.gateway,
            ))))
            .add_service(PaymentServer::new(payment))
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(self.grpc_listener),
                stopped(stopping.clone()),
            );

        info!(addr = %self.notify_addr, path = %self.config.notify.path, "notify listener listening");
        let notify_app = notify::router(Arc::clone(&self.store), self.config.notify.clone());
        let notify = axum::serve(self.notify_listener, notify_app)
            .with_graceful_shutdown(stopped(stopping.clone()));

        let (grpc, notify) = tokio::join!(grpc, async { notify.await });
        if let Some(sandbox) = self.sandbox {
            sandbox.shutdown().await;
        }
        self.store.close().await;
        info!("stopped");
        grpc?;
        notify?;
        Ok(())
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
