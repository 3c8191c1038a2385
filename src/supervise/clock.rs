//! Wall-clock time behind a trait, so restart decisions and status timestamps can be
//! driven by tests (STYLE: time-dependent state machines take `now` as input).
//!
//! Owns: reading the Unix time. Must not: sleep (durations use tokio's timer, which
//! tests can pause).

use std::time::{SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync + 'static {
    /// Seconds since the Unix epoch.
    fn now(&self) -> u64;
}

/// The system's real-time clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

/// A clock that starts at `base` and advances with tokio's timer. Under
/// `tokio::time::pause()` it moves only when the test advances time, so timers and
/// timestamps stay consistent.
#[derive(Debug, Clone, Copy)]
pub struct FakeClock {
    base: u64,
    start: tokio::time::Instant,
}

impl FakeClock {
    /// Must be called inside a tokio runtime.
    pub fn new(base: u64) -> Self {
        Self {
            base,
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for FakeClock {
    fn now(&self) -> u64 {
        self.base + self.start.elapsed().as_secs()
    }
}
