//! The restart policy as a pure state machine (DESIGN §6, seed
//! `health-check-and-scheduled-restart.md`): `decide(state, event, now)`.
//!
//! Owns: the cooldown / rolling-hour budget of health and scheduled restarts, and the
//! exponential backoff of restarts after an exit.
//! Must not: read the clock, sleep, touch files or processes. The caller records a
//! restart with [`RestartState::record`] once it has performed it.
//!
//! Which restarts count where (documented in `docs/supervision.md`):
//! - health and cron restarts are gated: the budget counts only health and cron
//!   entries (the seed's state file held only those two), the cooldown runs from the
//!   last restart of *any* source (seed: "120 seconds minimum between ANY restarts").
//! - exit restarts are never gated (DESIGN: "never giving up for good"): they wait
//!   the exponential backoff and are recorded with source `exit`.
//! - manual restarts (operator, config change) are always allowed and recorded.

use crate::backoff::{Backoff, Jitter};
use meduza_generators::plan::service::RestartProtection;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// Length of the rolling window of the restart budget.
pub const WINDOW_SECS: u64 = 3600;

/// Who asked for a restart; also the second word of a state-file line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestartSource {
    Health,
    Cron,
    Exit,
    Manual,
}

impl RestartSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Health => "health",
            Self::Cron => "cron",
            Self::Exit => "exit",
            Self::Manual => "manual",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "health" => Some(Self::Health),
            "cron" => Some(Self::Cron),
            "exit" => Some(Self::Exit),
            "manual" => Some(Self::Manual),
            _ => None,
        }
    }

    /// Health and cron restarts are the automatic ones the budget limits.
    pub fn is_gated(self) -> bool {
        matches!(self, Self::Health | Self::Cron)
    }
}

impl fmt::Display for RestartSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One performed restart: a line `"<unix-ts> <source>"` of the state file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartRecord {
    pub at: u64,
    pub source: RestartSource,
}

/// Exponential backoff of exit restarts (DESIGN §6: 1 s → 60 s, reset after 60 s up).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackoffPolicy {
    pub initial_secs: u64,
    pub max_secs: u64,
    /// A child that stayed up this long starts again from `initial_secs`.
    pub reset_after_secs: u64,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            initial_secs: 1,
            max_secs: 60,
            reset_after_secs: 60,
        }
    }
}

impl BackoffPolicy {
    /// The shared [`Backoff`] with these bounds, without jitter: the delays 1, 2, 4 ...
    /// 60 s are a documented contract (DESIGN §6, docs/supervision.md), logged as
    /// "wait 4s", and only restart a local child; nothing is shared to spread load on.
    pub fn backoff(&self) -> Backoff {
        Backoff::new(
            Duration::from_secs(self.initial_secs),
            Duration::from_secs(self.max_secs),
            Jitter::None,
        )
    }
}

/// Delay before exit restart number `attempt` (0-based): initial · 2^attempt, capped.
pub fn backoff_delay(policy: &BackoffPolicy, attempt: u32) -> u64 {
    policy.backoff().nominal(attempt).as_secs()
}

/// What happened that might call for a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// All probe attempts failed.
    HealthFailure,
    /// The scheduled-restart timer fired.
    Cron,
    /// The child exited after running `uptime_secs`.
    Exit { uptime_secs: u64 },
    /// An operator (API, CLI) or a configuration change asked for it.
    Manual,
}

impl Event {
    pub fn source(self) -> RestartSource {
        match self {
            Self::HealthFailure => RestartSource::Health,
            Self::Cron => RestartSource::Cron,
            Self::Exit { .. } => RestartSource::Exit,
            Self::Manual => RestartSource::Manual,
        }
    }
}

/// The answer of [`decide`]; its `Display` is the predecessor's log wording.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Decision {
    /// Restart now.
    Restart { source: RestartSource },
    /// Exit restart after the backoff `delay_secs`; `attempt` is the backoff step
    /// the caller stores with [`RestartState::set_backoff_attempt`] (+1 after it).
    RestartAfter { delay_secs: u64, attempt: u32 },
    /// Cooldown active: the last restart (by `by`) was `ago_secs` ago.
    Skipped {
        ago_secs: u64,
        by: RestartSource,
        need_secs: u64,
        wait_secs: u64,
    },
    /// The rolling-hour budget is used up; a slot frees in `retry_in_secs`.
    Denied {
        count: u32,
        max: u32,
        retry_in_secs: u64,
    },
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Restart { .. } => f.write_str("Restart ALLOWED"),
            Self::RestartAfter {
                delay_secs,
                attempt,
            } => write!(
                f,
                "Restart after backoff (attempt {}, wait {delay_secs}s)",
                attempt + 1
            ),
            Self::Skipped {
                ago_secs,
                by,
                need_secs,
                wait_secs,
            } => write!(
                f,
                "Restart SKIPPED: cooldown active ({ago_secs}s ago by {by}, need {need_secs}s, wait {wait_secs}s more)"
            ),
            Self::Denied { count, max, .. } => {
                write!(f, "Restart DENIED: limit reached ({count}/{max} per hour)")
            }
        }
    }
}

/// Everything `decide` looks at for one service.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RestartState {
    pub protection: RestartProtection,
    pub backoff: BackoffPolicy,
    /// Performed restarts, oldest first (the state file).
    pub history: Vec<RestartRecord>,
    /// Backoff step of the next exit restart.
    pub backoff_attempt: u32,
    /// Restarts of any source recorded since meduza started. Unlike `history` it is
    /// never pruned (and not persisted): it only goes up, so it can back a Prometheus
    /// counter (`meduza_service_restarts_total`) where `history` backs the rolling hour.
    pub restarts_total: u64,
}

impl RestartState {
    pub fn new(protection: RestartProtection, backoff: BackoffPolicy) -> Self {
        Self {
            protection,
            backoff,
            history: Vec::new(),
            backoff_attempt: 0,
            restarts_total: 0,
        }
    }

    /// Drop entries older than one hour (an entry exactly 3600 s old is gone).
    pub fn prune(&mut self, now: u64) {
        self.history.retain(|r| in_window(r.at, now));
    }

    /// Record a performed restart and prune. The one place a restart is counted: the
    /// rolling `history` and the monotonic `restarts_total` both change here.
    pub fn record(&mut self, now: u64, source: RestartSource) {
        self.history.push(RestartRecord { at: now, source });
        self.restarts_total = self.restarts_total.saturating_add(1);
        self.prune(now);
    }

    pub fn set_backoff_attempt(&mut self, attempt: u32) {
        self.backoff_attempt = attempt;
    }

    /// Restarts of any source in the last hour (for status).
    pub fn restarts_last_hour(&self, now: u64) -> u32 {
        count(self.history.iter().filter(|r| in_window(r.at, now)))
    }
}

fn in_window(at: u64, now: u64) -> bool {
    now.saturating_sub(at) < WINDOW_SECS
}

fn count<'a>(it: impl Iterator<Item = &'a RestartRecord>) -> u32 {
    u32::try_from(it.count()).unwrap_or(u32::MAX)
}

/// The seed's restart decision algorithm (prune → limit → cooldown → allow) for
/// health and cron; backoff for exits; always-allow for manual restarts.
pub fn decide(state: &RestartState, event: Event, now: u64) -> Decision {
    match event {
        Event::Exit { uptime_secs } => {
            let attempt = if uptime_secs >= state.backoff.reset_after_secs {
                0
            } else {
                state.backoff_attempt
            };
            Decision::RestartAfter {
                delay_secs: backoff_delay(&state.backoff, attempt),
                attempt,
            }
        }
        Event::Manual => Decision::Restart {
            source: RestartSource::Manual,
        },
        Event::HealthFailure | Event::Cron => {
            let recent: Vec<&RestartRecord> = state
                .history
                .iter()
                .filter(|r| in_window(r.at, now))
                .collect();
            let gated: Vec<&&RestartRecord> =
                recent.iter().filter(|r| r.source.is_gated()).collect();
            let max = state.protection.max_per_hour;
            let used = count(gated.iter().map(|r| **r));
            if used >= max {
                let oldest = gated.iter().map(|r| r.at).min().unwrap_or(now);
                return Decision::Denied {
                    count: used,
                    max,
                    retry_in_secs: (oldest + WINDOW_SECS).saturating_sub(now).max(1),
                };
            }
            if let Some(last) = recent.iter().max_by_key(|r| r.at) {
                let ago = now.saturating_sub(last.at);
                let need = state.protection.cooldown_secs;
                if ago < need {
                    return Decision::Skipped {
                        ago_secs: ago,
                        by: last.source,
                        need_secs: need,
                        wait_secs: need - ago,
                    };
                }
            }
            Decision::Restart {
                source: event.source(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RestartSource::*;

    const T0: u64 = 1_739_515_200;

    fn state(history: &[(u64, RestartSource)]) -> RestartState {
        let mut s = RestartState::new(RestartProtection::default(), BackoffPolicy::default());
        s.history = history
            .iter()
            .map(|&(at, source)| RestartRecord { at, source })
            .collect();
        s
    }

    type Case = (
        &'static str,
        Vec<(u64, RestartSource)>,
        Event,
        u64,
        Decision,
    );

    #[test]
    fn decision_table() {
        let denied = |count, retry_in_secs| Decision::Denied {
            count,
            max: 5,
            retry_in_secs,
        };
        let allowed = |source| Decision::Restart { source };
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            ("empty history", vec![], Event::HealthFailure, T0, allowed(Health)),
            ("cron on empty", vec![], Event::Cron, T0, allowed(Cron)),
            ("cooldown by health (seed example)", vec![(T0 - 90, Health)], Event::Cron, T0,
                Decision::Skipped { ago_secs: 90, by: Health, need_secs: 120, wait_secs: 30 }),
            ("cooldown ends at exactly 120 s", vec![(T0 - 120, Health)], Event::Cron, T0, allowed(Cron)),
            ("cooldown counts exit restarts", vec![(T0 - 10, Exit)], Event::HealthFailure, T0,
                Decision::Skipped { ago_secs: 10, by: Exit, need_secs: 120, wait_secs: 110 }),
            ("cooldown counts manual restarts", vec![(T0 - 60, Manual)], Event::Cron, T0,
                Decision::Skipped { ago_secs: 60, by: Manual, need_secs: 120, wait_secs: 60 }),
            ("seed: 5 restarts 5 min apart, 6th denied", 
                vec![(T0, Health), (T0 + 300, Health), (T0 + 600, Cron), (T0 + 900, Health), (T0 + 1200, Health)],
                Event::HealthFailure, T0 + 1500, denied(5, 2100)),
            ("limit checked before cooldown",
                vec![(T0 - 400, Health), (T0 - 300, Health), (T0 - 200, Health), (T0 - 150, Cron), (T0 - 10, Health)],
                Event::Cron, T0, denied(5, 3200)),
            ("seed: window frees a slot after one hour",
                vec![(T0, Health), (T0 + 300, Health), (T0 + 600, Cron), (T0 + 900, Health), (T0 + 1200, Health)],
                Event::HealthFailure, T0 + 3600, allowed(Health)),
            ("entry 3599 s old still counts",
                vec![(T0, Health), (T0 + 300, Health), (T0 + 600, Cron), (T0 + 900, Health), (T0 + 1200, Health)],
                Event::HealthFailure, T0 + 3599, denied(5, 1)),
            ("exit and manual entries do not use the budget",
                vec![(T0, Exit), (T0 + 10, Exit), (T0 + 20, Exit), (T0 + 30, Manual), (T0 + 40, Exit), (T0 + 50, Exit)],
                Event::HealthFailure, T0 + 500, allowed(Health)),
            ("manual ignores cooldown", vec![(T0 - 1, Health)], Event::Manual, T0, allowed(Manual)),
            ("manual ignores the limit",
                vec![(T0 - 500, Health), (T0 - 400, Health), (T0 - 300, Health), (T0 - 200, Health), (T0 - 100, Health)],
                Event::Manual, T0, allowed(Manual)),
            ("first exit waits 1 s", vec![], Event::Exit { uptime_secs: 0 }, T0,
                Decision::RestartAfter { delay_secs: 1, attempt: 0 }),
            ("exit ignores the budget",
                vec![(T0 - 500, Health), (T0 - 400, Health), (T0 - 300, Health), (T0 - 200, Health), (T0 - 100, Health)],
                Event::Exit { uptime_secs: 3 }, T0, Decision::RestartAfter { delay_secs: 1, attempt: 0 }),
        ];
        for (name, history, event, now, want) in cases {
            assert_eq!(decide(&state(&history), event, now), want, "case: {name}");
        }
    }

    #[test]
    fn exit_backoff_grows_and_resets() {
        let mut s = state(&[]);
        let mut delays = Vec::new();
        for _ in 0..9 {
            let Decision::RestartAfter {
                delay_secs,
                attempt,
            } = decide(&s, Event::Exit { uptime_secs: 2 }, T0)
            else {
                panic!("exit must back off");
            };
            delays.push(delay_secs);
            s.set_backoff_attempt(attempt + 1);
        }
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        // Up for 60 s: start again at 1 s.
        assert_eq!(
            decide(&s, Event::Exit { uptime_secs: 60 }, T0),
            Decision::RestartAfter {
                delay_secs: 1,
                attempt: 0
            }
        );
        // Up for 59 s: keep growing.
        assert_eq!(
            decide(&s, Event::Exit { uptime_secs: 59 }, T0),
            Decision::RestartAfter {
                delay_secs: 60,
                attempt: 9
            }
        );
    }

    #[test]
    fn backoff_never_overflows() {
        let p = BackoffPolicy::default();
        assert_eq!(backoff_delay(&p, u32::MAX), 60);
        assert_eq!(backoff_delay(&p, 64), 60);
    }

    #[test]
    fn seed_wording() {
        let skipped = Decision::Skipped {
            ago_secs: 90,
            by: Health,
            need_secs: 120,
            wait_secs: 30,
        };
        assert_eq!(
            skipped.to_string(),
            "Restart SKIPPED: cooldown active (90s ago by health, need 120s, wait 30s more)"
        );
        let denied = Decision::Denied {
            count: 5,
            max: 5,
            retry_in_secs: 10,
        };
        assert_eq!(
            denied.to_string(),
            "Restart DENIED: limit reached (5/5 per hour)"
        );
    }

    #[test]
    fn record_prunes_and_counts() {
        let mut s = state(&[(T0 - 4000, Health), (T0 - 100, Exit)]);
        s.record(T0, Cron);
        assert_eq!(
            s.history,
            vec![
                RestartRecord {
                    at: T0 - 100,
                    source: Exit
                },
                RestartRecord {
                    at: T0,
                    source: Cron
                }
            ]
        );
        assert_eq!(s.restarts_last_hour(T0), 2);
        assert_eq!(s.restarts_last_hour(T0 + 3550), 1);
    }

    #[test]
    fn restarts_total_survives_pruning() {
        let mut s = state(&[]);
        let mut seen = Vec::new();
        // Six restarts 20 minutes apart: the rolling hour never holds more than three.
        for (i, source) in [Health, Exit, Cron, Manual, Exit, Health]
            .into_iter()
            .enumerate()
        {
            let now = T0 + 1200 * i as u64;
            s.record(now, source);
            seen.push((s.restarts_total, s.restarts_last_hour(now)));
        }
        assert_eq!(seen, [(1, 1), (2, 2), (3, 3), (4, 3), (5, 3), (6, 3)]);
        // An hour of quiet empties the window; the total stays.
        let later = T0 + 1200 * 5 + WINDOW_SECS;
        s.prune(later);
        assert!(s.history.is_empty());
        assert_eq!((s.restarts_total, s.restarts_last_hour(later)), (6, 0));
        s.record(later, Cron);
        assert_eq!((s.restarts_total, s.restarts_last_hour(later)), (7, 1));
    }
}
