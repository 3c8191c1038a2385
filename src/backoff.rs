//! The one exponential backoff policy (STYLE 13): every retry loop that waits longer
//! after each failure — etcd reconnects, snapshot retries, rule downloads, exit
//! restarts — asks a [`Backoff`] for its next wait instead of doubling by hand.
//!
//! Owns: the growth (base · 2ⁿ, capped at max, never overflowing), the reset, and the
//! jitter. Must not: sleep, log or decide *whether* to retry; callers do that.
//!
//! # Jitter: "equal jitter"
//!
//! When etcd restarts, every gateway of a fleet lost its connection at the same instant
//! and, with plain doubling, retries at the same instants too: 100 clients hit the
//! fresh member together after 0.5 s, 1 s, 2 s ... (the thundering herd). Jitter
//! spreads each retry over a window. Of the usual choices (Brooker, "Exponential
//! Backoff And Jitter", AWS Architecture Blog, 2015):
//!
//! * *full jitter*, `rand(0, d)`, spreads widest but may return ~0 several times in a
//!   row: a client then hammers a member that is still down, and the per-client retry
//!   rate is unbounded;
//! * *equal jitter*, `d/2 + rand(0, d/2)`, keeps half of the nominal wait as a floor.
//!
//! [`Jitter::Equal`] is the one offered: each client still waits at least `d/2` (its
//! rate stays bounded, the wait still doubles, and a jittered loop is never more
//! aggressive than the plain one at half the base), while a fleet that failed together
//! is spread over `[d/2, d]` — and, since each step draws afresh, spread further with
//! every retry. [`Jitter::None`] is for waits that are a documented contract (the
//! supervisor's exit restarts, 1 s → 60 s, DESIGN §6; the rule downloads' 1, 2, 4, 8 s)
//! or that are not against a shared server.
//!
//! Randomness is injected: [`Backoff::next_with`] takes any [`rand::Rng`], so tests pass
//! a seeded `StdRng` and are deterministic; [`Backoff::next`] uses the thread RNG.

use rand::{Rng, RngExt};
use std::time::Duration;

/// How a nominal wait is randomised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Exactly the nominal wait: for timings that are part of a contract.
    None,
    /// Uniform in `[d/2, d]` for a nominal wait `d` (see the module docs for why).
    Equal,
}

impl Jitter {
    /// `nominal` randomised by this jitter, drawing from `rng` (only for `Equal`).
    pub fn apply<R: Rng + ?Sized>(self, nominal: Duration, rng: &mut R) -> Duration {
        match self {
            Self::None => nominal,
            Self::Equal => {
                // Whole nanoseconds in u64: exact up to 584 years, far past any cap here.
                let nanos = u64::try_from(nominal.as_nanos()).unwrap_or(u64::MAX);
                let floor = nanos - nanos / 2;
                Duration::from_nanos(floor + rng.random_range(0..=nanos / 2))
            }
        }
    }
}

/// After etcd answers again, a waiting task retries after a delay uniform in
/// `[0, window)` under [`Jitter::Equal`], at once under [`Jitter::None`]: the wake-up
/// on a member's return (`Kv::recovered`) reaches a whole fleet in the same moment,
/// and only spreading the wake-up itself spreads its retries (docs/benchmarks.md,
/// "Reconnect storm").
pub fn wake_spread<R: Rng + ?Sized>(jitter: Jitter, window: Duration, rng: &mut R) -> Duration {
    match jitter {
        Jitter::None => Duration::ZERO,
        Jitter::Equal => {
            let nanos = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
            Duration::from_nanos(if nanos == 0 {
                0
            } else {
                rng.random_range(0..nanos)
            })
        }
    }
}

/// How long after etcd's return a fleet's retries are spread over: longer than the
/// 1 s in which a fleet's reconnects otherwise land, short against an outage.
pub const WAKE_WINDOW: Duration = Duration::from_secs(3);

/// Exponential backoff: the `n`-th wait (0-based) since the last [`reset`](Self::reset)
/// is `min(base · 2ⁿ, max)`, randomised by the [`Jitter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    jitter: Jitter,
    attempt: u32,
}

impl Backoff {
    /// Each wait is this many times the previous one (before the cap and the jitter).
    pub const FACTOR: u32 = 2;

    /// A backoff from `base` doubling up to `max` (a `max` below `base` is raised to it).
    pub fn new(base: Duration, max: Duration, jitter: Jitter) -> Self {
        Self {
            base,
            max: max.max(base),
            jitter,
            attempt: 0,
        }
    }

    pub fn base(&self) -> Duration {
        self.base
    }

    pub fn max(&self) -> Duration {
        self.max
    }

    pub fn jitter(&self) -> Jitter {
        self.jitter
    }

    /// How many waits were handed out since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The wait before retry `attempt` (0-based) without jitter: `min(base · 2ⁿ, max)`.
    /// Pure, for policies that keep the attempt count themselves (the supervisor's).
    pub fn nominal(&self, attempt: u32) -> Duration {
        let factor = Self::FACTOR.checked_pow(attempt).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The next wait, drawing jitter from the thread RNG.
    // Not an `Iterator`: the sequence never ends, and `Option` would only add unwraps.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Duration {
        self.next_with(&mut rand::rng())
    }

    /// The next wait, drawing jitter from `rng` (seed it in tests).
    pub fn next_with<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Duration {
        let nominal = self.nominal(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        self.jitter.apply(nominal, rng)
    }

    /// Start again from `base` (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng as _;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn wake_spread_is_uniform_in_the_window_or_zero() {
        let mut rng = StdRng::seed_from_u64(7);
        let draws: Vec<Duration> = (0..200)
            .map(|_| wake_spread(Jitter::Equal, secs(1), &mut rng))
            .collect();
        assert!(draws.iter().all(|d| *d < secs(1)));
        assert!(draws.iter().any(|d| *d < Duration::from_millis(250)));
        assert!(draws.iter().any(|d| *d > Duration::from_millis(750)));
        assert_eq!(wake_spread(Jitter::None, secs(1), &mut rng), Duration::ZERO);
        assert_eq!(
            wake_spread(Jitter::Equal, Duration::ZERO, &mut rng),
            Duration::ZERO
        );
    }

    #[test]
    fn grows_by_two_up_to_the_cap_without_jitter() {
        let mut b = Backoff::new(secs(1), secs(60), Jitter::None);
        let waits: Vec<u64> = (0..9).map(|_| b.next().as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(b.attempt(), 9);
    }

    #[test]
    fn sub_second_bases_double_exactly() {
        let mut b = Backoff::new(Duration::from_millis(500), secs(10), Jitter::None);
        let waits: Vec<u128> = (0..7).map(|_| b.next().as_millis()).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 10_000, 10_000]);
    }

    #[test]
    fn reset_starts_again_from_base() {
        let mut b = Backoff::new(secs(1), secs(30), Jitter::None);
        for _ in 0..4 {
            b.next();
        }
        assert_eq!(b.next(), secs(16));
        b.reset();
        assert_eq!(b.attempt(), 0);
        assert_eq!(b.next(), secs(1));
        assert_eq!(b.next(), secs(2));
    }

    #[test]
    fn never_overflows_and_stays_at_the_cap() {
        let b = Backoff::new(secs(1), secs(60), Jitter::None);
        for attempt in [31, 32, 63, 64, u32::MAX] {
            assert_eq!(b.nominal(attempt), secs(60), "attempt {attempt}");
        }
        let unbounded = Backoff::new(secs(1), Duration::MAX, Jitter::None);
        assert_eq!(unbounded.nominal(u32::MAX), secs(u64::from(u32::MAX)));
        let mut b = b;
        b.attempt = u32::MAX;
        assert_eq!(b.next(), secs(60));
        assert_eq!(b.attempt(), u32::MAX, "the count saturates");
    }

    #[test]
    fn max_below_base_is_raised_to_base() {
        let mut b = Backoff::new(secs(5), secs(1), Jitter::None);
        assert_eq!(b.max(), secs(5));
        assert_eq!(b.next(), secs(5));
        assert_eq!(b.next(), secs(5));
    }

    #[test]
    fn equal_jitter_stays_within_half_to_full_nominal() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut b = Backoff::new(Duration::from_millis(500), secs(10), Jitter::Equal);
        for round in 0..200 {
            if round % 8 == 0 {
                b.reset();
            }
            let nominal = b.nominal(b.attempt());
            let wait = b.next_with(&mut rng);
            assert!(
                wait >= nominal / 2 && wait <= nominal,
                "round {round}: {wait:?} outside [{:?}, {nominal:?}]",
                nominal / 2
            );
        }
        // The cap bounds the jittered wait too.
        assert!(b.next_with(&mut rng) <= secs(10));
    }

    #[test]
    fn equal_jitter_spreads_a_fleet() {
        // 100 clients that failed together: their first retries must not coincide.
        let mut rng = StdRng::seed_from_u64(7);
        let mut waits: Vec<Duration> = (0..100)
            .map(|_| Backoff::new(secs(1), secs(30), Jitter::Equal).next_with(&mut rng))
            .collect();
        waits.sort();
        waits.dedup();
        assert!(waits.len() > 90, "only {} distinct waits", waits.len());
        let spread = waits[waits.len() - 1] - waits[0];
        assert!(spread > Duration::from_millis(400), "spread {spread:?}");
    }

    #[test]
    fn deterministic_with_a_seeded_rng() {
        let run = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut b = Backoff::new(secs(1), secs(30), Jitter::Equal);
            (0..10).map(|_| b.next_with(&mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn no_jitter_ignores_the_rng() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut b = Backoff::new(secs(2), secs(8), Jitter::None);
        let waits: Vec<Duration> = (0..4).map(|_| b.next_with(&mut rng)).collect();
        assert_eq!(waits, [secs(2), secs(4), secs(8), secs(8)]);
    }

    #[test]
    fn zero_base_stays_zero() {
        let mut b = Backoff::new(Duration::ZERO, secs(1), Jitter::Equal);
        assert_eq!(b.next(), Duration::ZERO);
        assert_eq!(b.next(), Duration::ZERO);
    }
}
