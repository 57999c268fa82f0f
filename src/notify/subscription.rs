//! One gRPC subscription: catch up from the store, then follow the live
//! feed, with no gap and no duplicate at the switch.
//!
//! The task subscribes to the live feed *before* reading the store, so
//! every event is in one or the other (or both: those are skipped by
//! sequence). Its output is a small bounded channel: a client that reads
//! slowly only blocks its own task; if the live feed overruns it meanwhile,
//! the task notices (`Lagged`) and reads the missed events from the store.
//! Memory per subscriber is that channel, whatever the client does.

use std::sync::Arc;

use tokio::sync::{broadcast::error::RecvError, mpsc, watch};
use tonic::Status;

use crate::{
    metrics::Metrics,
    store::{NotificationStore, StoreError, StoredNotification},
};

/// Events read from the store at a time while catching up.
const PAGE: usize = 256;
/// Events buffered per subscriber.
pub const STREAM_BUFFER: usize = 16;

pub struct Subscription {
    pub store: Arc<dyn NotificationStore>,
    /// Deliver events after this sequence.
    pub after: u64,
    /// Only events of this order.
    pub out_trade_id: Option<String>,
    /// Set to true when the server shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// End the stream after this long (the client resubscribes, perhaps to
    /// another replica).
    pub max_age: Option<std::time::Duration>,
    pub metrics: Arc<Metrics>,
}

enum End {
    ClientGone,
    ShuttingDown,
    MaxAge,
    Store(StoreError),
}

/// Feeds `out` until the client goes away or the server shuts down; ends a
/// stream that cannot go on with UNAVAILABLE, so the client resumes.
pub async fn run_subscription<T: Send + 'static>(
    sub: Subscription,
    out: mpsc::Sender<Result<T, Status>>,
    convert: impl Fn(&StoredNotification) -> T + Send,
) {
    let mut shutdown = sub.shutdown.clone();
    let expiry = async {
        match sub.max_age {
            Some(age) => tokio::time::sleep(age).await,
            None => std::future::pending().await,
        }
    };
    let end = tokio::select! {
        end = follow(&sub, &out, &convert, &mut shutdown) => end,
        () = expiry => End::MaxAge,
    };
    let status = match end {
        End::ClientGone => return,
        End::ShuttingDown => {
            Status::unavailable("the server is shutting down; subscribe again to resume")
        }
        End::MaxAge => Status::unavailable(
            "the subscription reached its maximum age; subscribe again to resume",
        ),
        End::Store(e) => {
            tracing::error!(error = %e, "subscription ended by a store failure");
            Status::unavailable("the notification store failed; subscribe again to resume")
        }
    };
    let _ = out.try_send(Err(status));
}

async fn follow<T>(
    sub: &Subscription,
    out: &mpsc::Sender<Result<T, Status>>,
    convert: &impl Fn(&StoredNotification) -> T,
    shutdown: &mut watch::Receiver<bool>,
) -> End {
    let filter = sub.out_trade_id.as_deref();
    let matches = |n: &StoredNotification| filter.is_none_or(|id| n.out_trade_id == id);
    let mut cursor = sub.after;
    loop {
        let mut live = sub.store.subscribe();
        // Everything up to `known` is in the store now; later events come
        // through `live`, subscribed before this read.
        let known = match sub.store.last_sequence().await {
            Ok(v) => v,
            Err(e) => return End::Store(e),
        };
        loop {
            let page = match sub.store.list(cursor, filter, PAGE).await {
                Ok(p) => p,
                Err(e) => return End::Store(e),
            };
            let full = page.len() == PAGE;
            for n in &page {
                if let Err(end) = send(out, convert(n), shutdown).await {
                    return end;
                }
                cursor = n.sequence;
            }
            if !full {
                break;
            }
        }
        cursor = cursor.max(known);

        loop {
            let event = tokio::select! {
                event = live.recv() => event,
                () = out.closed() => return End::ClientGone,
                _ = shutdown.changed() => return End::ShuttingDown,
            };
            match event {
                Ok(n) if n.sequence <= cursor => {}
                Ok(n) if n.sequence == cursor + 1 => {
                    cursor = n.sequence;
                    if matches(&n)
                        && let Err(end) = send(out, convert(&n), shutdown).await
                    {
                        return end;
                    }
                }
                // A gap: fill it from the store.
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    sub.metrics.subscription_catch_ups.inc();
                    break;
                }
                Err(RecvError::Closed) => return End::ShuttingDown,
            }
        }
    }
}

async fn send<T>(
    out: &mpsc::Sender<Result<T, Status>>,
    item: T,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), End> {
    if *shutdown.borrow() {
        return Err(End::ShuttingDown);
    }
    tokio::select! {
        sent = out.send(Ok(item)) => sent.map_err(|_| End::ClientGone),
        _ = shutdown.changed() => Err(End::ShuttingDown),
    }
}
