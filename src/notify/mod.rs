//! Payment notifications: the side HTTP listener that takes them in, and
//! the subscriptions that fan them out to gRPC clients.

mod listener;
mod server;
mod subscription;

pub use listener::{NotifySettings, router};
pub use server::{ConnectionLimits, serve};
pub use subscription::{STREAM_BUFFER, Subscription, run_subscription};
