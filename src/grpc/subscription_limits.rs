//! How many subscriptions the server holds: in total, and per connection,
//! so that one client (or one connection of a hostile one) cannot take the
//! memory and tasks every subscription costs. The one past a limit gets
//! RESOURCE_EXHAUSTED at once; a subscription's admission is given back
//! when its task ends.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::Error;

/// Subscriptions open per connection (by its remote address).
type OpenPerConnection = Arc<Mutex<HashMap<SocketAddr, usize>>>;

pub struct SubscriptionLimits {
    total: Arc<Semaphore>,
    total_max: usize,
    per_connection_max: usize,
    open: OpenPerConnection,
}

/// What bounds subscriptions: how long each lives, and how many are held.
pub struct SubscriptionPolicy {
    /// Ended after about this long (jittered), so clients rebalance.
    pub max_age: Option<std::time::Duration>,
    pub limits: SubscriptionLimits,
}

/// One admitted subscription; dropping it gives its place back.
pub struct Admission {
    _total: OwnedSemaphorePermit,
    connection: Option<(SocketAddr, OpenPerConnection)>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some((peer, open)) = self.connection.take() {
            let mut open = crate::store::lock(&open);
            if let Some(n) = open.get_mut(&peer) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&peer);
                }
            }
        }
    }
}

impl SubscriptionLimits {
    pub fn new(total_max: usize, per_connection_max: usize) -> Self {
        Self {
            total: Arc::new(Semaphore::new(total_max)),
            total_max,
            per_connection_max,
            open: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Admits one more subscription from the connection `peer` (its remote
    /// address; unknown, only the total counts).
    pub fn admit(&self, peer: Option<SocketAddr>) -> Result<Admission, Error> {
        let total = Arc::clone(&self.total).try_acquire_owned().map_err(|_| {
            Error::TooManySubscriptions {
                scope: "server",
                limit: self.total_max,
            }
        })?;
        let connection = match peer {
            Some(peer) => {
                let mut open = crate::store::lock(&self.open);
                let n = open.entry(peer).or_insert(0);
                if *n >= self.per_connection_max {
                    return Err(Error::TooManySubscriptions {
                        scope: "connection",
                        limit: self.per_connection_max,
                    });
                }
                *n += 1;
                Some((peer, Arc::clone(&self.open)))
            }
            None => None,
        };
        Ok(Admission {
            _total: total,
            connection,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_counted_per_connection_and_in_total_and_given_back() {
        let limits = SubscriptionLimits::new(3, 2);
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        let a1 = limits.admit(Some(a)).unwrap();
        let _a2 = limits.admit(Some(a)).unwrap();
        assert!(matches!(
            limits.admit(Some(a)),
            Err(Error::TooManySubscriptions {
                scope: "connection",
                limit: 2
            })
        ));
        let _b1 = limits.admit(Some(b)).unwrap();
        assert!(matches!(
            limits.admit(Some(b)),
            Err(Error::TooManySubscriptions {
                scope: "server",
                limit: 3
            })
        ));
        drop(a1);
        let _a3 = limits.admit(Some(a)).unwrap();
        assert_eq!(limits.open.lock().unwrap()[&a], 2);
    }
}
