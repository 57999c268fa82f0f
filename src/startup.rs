//! Wiring: binds the listeners, builds the services, serves until told to
//! stop. Tests build an [`Application`] on port 0 and read back the ports.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tracing::info;

use crate::{
    config::Config,
    gateway::Gateway,
    grpc::{AuthService, PaymentService, TicketService},
    proto::{auth_server::AuthServer, payment_server::PaymentServer, ticket_server::TicketServer},
    sandbox::SandboxHandle,
    upstream::KongtieClient,
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub struct Application {
    grpc_listener: TcpListener,
    grpc_addr: SocketAddr,
    gateway: Arc<Gateway>,
    sandbox: Option<SandboxHandle>,
}

impl Application {
    /// Binds every listener (port 0 picks a free port) and, with a sandbox
    /// configured, starts it and points the upstream URLs at it.
    pub async fn build(mut config: Config) -> Result<Self, BoxError> {
        let sandbox = match config.sandbox.take() {
            Some((addr, sandbox_config)) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("binding the sandbox on {addr}: {e}"))?;
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
            gateway: Arc::new(Gateway::new(client, config.gateway)),
            sandbox,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn sandbox(&self) -> Option<&SandboxHandle> {
        self.sandbox.as_ref()
    }

    /// Serves until `shutdown` completes, then lets in-flight calls finish.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), BoxError> {
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

        info!(addr = %self.grpc_addr, "gRPC listening");
        Server::builder()
            .trace_fn(|request| tracing::info_span!("grpc", method = request.uri().path()))
            .add_service(health_service)
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?)
            .add_service(AuthServer::new(AuthService::new(Arc::clone(&self.gateway))))
            .add_service(TicketServer::new(TicketService::new(Arc::clone(
                &self.gateway,
            ))))
            .add_service(PaymentServer::new(PaymentService::new(Arc::clone(
                &self.gateway,
            ))))
            .serve_with_incoming_shutdown(TcpListenerStream::new(self.grpc_listener), shutdown)
            .await?;
        if let Some(sandbox) = self.sandbox {
            sandbox.shutdown().await;
        }
        info!("stopped");
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
