//! Wall-clock time behind a trait, so restart decisions and status timestamps can be
//! driven by tests (STYLE: time-dependent state machines take `now` as input).
//!
//! Owns: reading the Unix time, and the fast supervision time of the test knob
//! `MEDUZA_MINUTE_MS` ([`ScaledClock`]). Must not: sleep (durations use tokio's timer,
//! which tests can pause).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
#[cfg(any(test, feature = "test-util"))]
#[derive(Debug, Clone, Copy)]
pub struct FakeClock {
    base: u64,
    start: tokio::time::Instant,
}

#[cfg(any(test, feature = "test-util"))]
impl FakeClock {
    /// Must be called inside a tokio runtime.
    pub fn new(base: u64) -> Self {
        Self {
            base,
            start: tokio::time::Instant::now(),
        }
    }
}

#[cfg(any(test, feature = "test-util"))]
impl Clock for FakeClock {
    fn now(&self) -> u64 {
        self.base + self.start.elapsed().as_secs()
    }
}

/// Supervision time under the test knob `MEDUZA_MINUTE_MS` (docs/supervision.md): starts
/// at `origin` and runs `60 s / minute` times faster than tokio's timer, so one minute
/// of it lasts `minute`. The restart policy reads it, so the 120 s cooldown and the
/// rolling hour shrink with the scheduled-restart minutes while the log still speaks
/// the configured numbers ("need 120s", "5/5 per hour"). Never used with a 60 s minute.
#[derive(Debug, Clone, Copy)]
pub struct ScaledClock {
    origin: u64,
    start: tokio::time::Instant,
    minute: Duration,
}

impl ScaledClock {
    /// `minute` must not be zero (a zero minute is treated as 1 ns).
    pub fn new(origin: u64, minute: Duration) -> Self {
        Self {
            origin,
            start: tokio::time::Instant::now(),
            minute,
        }
    }
}

impl Clock for ScaledClock {
    fn now(&self) -> u64 {
        let scaled =
            self.start.elapsed().as_nanos().saturating_mul(60) / self.minute.as_nanos().max(1);
        self.origin
            .saturating_add(u64::try_from(scaled).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn scaled_clock_runs_one_minute_per_minute_length() {
        let clock = ScaledClock::new(1_000, Duration::from_millis(600));
        assert_eq!(clock.now(), 1_000);
        tokio::time::advance(Duration::from_millis(10)).await;
        assert_eq!(clock.now(), 1_001, "10 ms is one second of a 600 ms minute");
        tokio::time::advance(Duration::from_millis(590)).await;
        assert_eq!(clock.now(), 1_060);
        tokio::time::advance(Duration::from_secs(36)).await;
        assert_eq!(clock.now(), 1_000 + 3_660, "36.6 s is an hour and a minute");
    }
}
