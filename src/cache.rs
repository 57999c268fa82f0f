//! Short-lived caches in front of Kongtie, with single flight: however many
//! callers miss at once, one upstream call is made and all share its result.
//!
//! Fetches run in their own task, so a caller that gives up (its deadline
//! passed, it hung up) neither cancels the fetch for the others nor wastes
//! it: the result still lands in the cache.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use futures::{
    FutureExt,
    future::{BoxFuture, Shared},
};

use crate::error::{Error, Result};

type Flight<V> = Shared<BoxFuture<'static, Result<V>>>;

/// Runs `fetch` in its own task and lets any number of callers await it.
fn launch<V, F>(fetch: F) -> Flight<V>
where
    V: Clone + Send + Sync + 'static,
    F: Future<Output = Result<V>> + Send + 'static,
{
    // In the first caller's span: its trace shows the Kongtie call.
    let task = tokio::spawn(tracing::Instrument::in_current_span(fetch));
    async move {
        task.await
            .unwrap_or_else(|e| Err(Error::Internal(format!("fetch task failed: {e}"))))
    }
    .boxed()
    .shared()
}

/// A value fetched from Kongtie and when.
#[derive(Clone, Debug)]
pub struct Fetched {
    pub value: String,
    pub fetched_at: SystemTime,
    fresh_until: Instant,
}

type Fetcher = Arc<dyn Fn() -> BoxFuture<'static, Result<String>> + Send + Sync>;

/// One cached token (or ticket) with the "stale" protocol: a caller whose
/// WeChat call was refused hands back the value it used, and a new one is
/// fetched only if that is still the cached one.
pub struct TokenCache {
    ttl: Duration,
    fetcher: Fetcher,
    state: Arc<Mutex<TokenState>>,
}

#[derive(Default)]
struct TokenState {
    current: Option<Fetched>,
    inflight: Option<Flight<Fetched>>,
}

impl TokenCache {
    pub fn new<F, Fut>(ttl: Duration, fetch: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String>> + Send + 'static,
    {
        Self {
            ttl,
            fetcher: Arc::new(move || fetch().boxed()),
            state: Arc::default(),
        }
    }

    /// Returns the cached value, fetching it if there is none, it has
    /// expired, or it equals `stale`. Returns whether it came from the cache.
    pub async fn get(&self, stale: Option<&str>) -> Result<(Fetched, bool)> {
        let flight = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(current) = &state.current {
                let fresh = current.fresh_until > Instant::now();
                if fresh && stale != Some(current.value.as_str()) {
                    return Ok((current.clone(), true));
                }
                // Known bad or expired: nobody should be handed it again.
                state.current = None;
            }
            match &state.inflight {
                Some(flight) => flight.clone(),
                None => {
                    let flight = launch(self.fetch_and_store());
                    state.inflight = Some(flight.clone());
                    flight
                }
            }
        };
        flight.await.map(|v| (v, false))
    }

    fn fetch_and_store(&self) -> impl Future<Output = Result<Fetched>> + Send + 'static {
        let fetch = (self.fetcher)();
        let state = Arc::clone(&self.state);
        let ttl = self.ttl;
        async move {
            let result = fetch.await.map(|value| Fetched {
                value,
                fetched_at: SystemTime::now(),
                fresh_until: Instant::now() + ttl,
            });
            let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
            state.inflight = None;
            if let Ok(fetched) = &result {
                state.current = Some(fetched.clone());
            }
            result
        }
    }
}

/// When a memo entry was made, and its (possibly finished) request.
type MemoEntry<V> = (Instant, Flight<V>);

/// Remembers the answer to a one-shot request for a while, so asking again
/// returns the first answer instead of repeating the request. Concurrent
/// askers share one request. Answers we cannot be sure of (timeouts,
/// unreachable upstream) are forgotten as soon as they arrive.
pub struct Memo<K, V> {
    ttl: Duration,
    entries: Arc<Mutex<HashMap<K, MemoEntry<V>>>>,
}

impl<K, V> Memo<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Arc::default(),
        }
    }

    /// The remembered (or shared in-flight) answer for `key`, else runs
    /// `run`; says whether the answer was already there.
    pub async fn get_or_run<Fut>(&self, key: K, run: impl FnOnce() -> Fut) -> (Result<V>, bool)
    where
        Fut: Future<Output = Result<V>> + Send + 'static,
    {
        let (flight, hit) = {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            entries.retain(|_, (at, _)| now.duration_since(*at) < self.ttl);
            match entries.get(&key) {
                Some((_, flight)) => (flight.clone(), true),
                None => {
                    let fut = run();
                    let map = Arc::clone(&self.entries);
                    let k = key.clone();
                    let flight = launch(async move {
                        let result = fut.await;
                        if let Err(e) = &result
                            && !e.is_definitive()
                        {
                            map.lock().unwrap_or_else(|p| p.into_inner()).remove(&k);
                        }
                        result
                    });
                    entries.insert(key, (now, flight.clone()));
                    (flight, false)
                }
            }
        };
        (flight.await, hit)
    }
}

/// Single flight without memory: concurrent callers with one key share
/// one run; once it ends, the next caller runs again (what lasts is kept
/// elsewhere, e.g. in the order ledger).
pub struct SingleFlight<K, V> {
    flights: Arc<Mutex<HashMap<K, Flight<V>>>>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        Self {
            flights: Arc::default(),
        }
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Joins the run in flight for `key`, or starts `run` in a task of its
    /// own (a caller that gives up does not cancel it); says whether it
    /// joined.
    pub async fn run<Fut>(&self, key: K, run: impl FnOnce() -> Fut) -> (Result<V>, bool)
    where
        Fut: Future<Output = Result<V>> + Send + 'static,
    {
        let (flight, joined) = {
            let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
            match flights.get(&key) {
                Some(flight) => (flight.clone(), true),
                None => {
                    let fut = run();
                    let map = Arc::clone(&self.flights);
                    let k = key.clone();
                    let flight = launch(async move {
                        let result = fut.await;
                        map.lock().unwrap_or_else(|p| p.into_inner()).remove(&k);
                        result
                    });
                    flights.insert(key, flight.clone());
                    (flight, false)
                }
            }
        };
        (flight.await, joined)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn counting_cache(ttl: Duration) -> (TokenCache, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&calls);
        let cache = TokenCache::new(ttl, move || {
            let n = c.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(format!("token-{n}"))
            }
        });
        (cache, calls)
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_fetch() {
        let (cache, calls) = counting_cache(Duration::from_secs(60));
        let cache = Arc::new(cache);
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let cache = Arc::clone(&cache);
                tokio::spawn(async move { cache.get(None).await.unwrap().0.value })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), "token-1");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_stale_token_is_replaced_once_and_an_older_one_is_not() {
        let (cache, calls) = counting_cache(Duration::from_secs(60));
        assert_eq!(cache.get(None).await.unwrap().0.value, "token-1");
        assert_eq!(cache.get(Some("token-1")).await.unwrap().0.value, "token-2");
        // A second caller reporting the same, already replaced token gets
        // the new one without another fetch.
        assert_eq!(cache.get(Some("token-1")).await.unwrap().0.value, "token-2");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_expired_value_is_fetched_again() {
        let (cache, calls) = counting_cache(Duration::from_millis(1));
        cache.get(None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(cache.get(None).await.unwrap().0.value, "token-2");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
