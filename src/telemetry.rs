//! Logging: `tracing` to stderr, plain or JSON, level from `RUST_LOG`.

use std::{
    io::IsTerminal,
    sync::Mutex,
    time::{Duration, Instant},
};

use tracing_subscriber::{EnvFilter, fmt};

use crate::config::LogFormat;

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// A warning that may repeat many times a second (each failed accept, each
/// failed checkpoint) is logged at most once per interval, with the number
/// of repeats it stood for.
pub struct RateLimited {
    interval: Duration,
    /// When it was last logged, and how many were suppressed since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimited {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: Mutex::new((None, 0)),
        }
    }

    /// Calls `log` with the number suppressed since the last time, unless
    /// it was called less than the interval ago.
    pub fn log(&self, log: impl FnOnce(u64)) {
        let suppressed = {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let (last, suppressed) = &mut *state;
            if last.is_some_and(|t| t.elapsed() < self.interval) {
                *suppressed += 1;
                return;
            }
            *last = Some(Instant::now());
            std::mem::take(suppressed)
        };
        log(suppressed);
    }
}
