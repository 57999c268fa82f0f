//! Integration tests: the real service on port 0, the sandbox upstream on
//! port 0, and real gRPC clients over real sockets.

mod auth;
mod check;
mod connect;
mod crash;
mod grpcurl;
mod helpers;
mod hostile_connect;
mod hostile_grpc;
mod hostile_notify;
mod notifications;
mod observe;
mod orders;
mod origin;
mod payment;
mod pg;
mod production;
mod replicas;
mod retention;
mod sandbox_command;
mod settings;
#[macro_use]
mod store;
mod order_races;
mod retention_store;
mod ticket;
mod trust;
mod upstream_failures;
mod validation;
mod work_queue_replicas;
mod work_queue_store;
mod work_queues;
