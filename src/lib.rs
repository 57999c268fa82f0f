//! kongtie-gateway: a typed gRPC API in front of the Kongtie WeChat
//! official-account API.
//!
//! `grpc` is the face, `gateway` the domain, `upstream` the signed calls to
//! Kongtie, `notify` the intake and fan-out of payment notifications,
//! `store` their durable home, `sandbox` a simulator of Kongtie, `startup`
//! wires them together.

pub mod accept;
pub mod admin;
pub mod api_keys;
pub mod backup;
pub mod cache;
pub mod check;
pub mod config;
pub mod connect;
pub mod consumers;
pub mod domain;
pub mod endpoint;
pub mod error;
pub mod gateway;
pub mod grpc;
pub mod json;
pub mod metrics;
pub mod notify;
pub mod orders;
pub mod retention;
pub mod sandbox;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod upstream;

/// The generated protobuf types and gRPC stubs of `kongtie.v1`.
pub mod proto {
    tonic::include_proto!("kongtie.v1");

    /// Descriptor set of `kongtie.v1`, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("kongtie_descriptor");
}
