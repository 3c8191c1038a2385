//! What the integrator sets up the supervisor with: its tunables
//! ([`SupervisorConfig`], the defaults are DESIGN §2/§6) and the hook that reloads FRR
//! in place ([`FrrReloader`]).
//!
//! Owns: the supervision time scale (`minute`, `duration`) and the fallback reloader
//! used until one is set.
//! Must not: start, stop or signal anything, or hold per-service state (the actors in
//! `actor` do).

use super::policy::BackoffPolicy;
use futures::future::BoxFuture;
use meduza_generators::plan::service::ServiceSpec;
use std::path::PathBuf;
use std::time::Duration;

/// Tunables of the supervisor itself; the defaults are DESIGN §2/§6.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// `$MEDUZA_STATE_DIR`; restart budgets go to its `restart/` subdirectory.
    pub state_dir: PathBuf,
    /// SIGTERM → SIGKILL delay at stop (10 s).
    pub stop_timeout: Duration,
    /// A child up this long moves from `starting` to `running` (supervisord's
    /// `startsecs` default, 1 s).
    pub start_secs: u64,
    /// Output lines kept per service for log scans and the API.
    pub log_lines: usize,
    pub backoff: BackoffPolicy,
    /// How long one minute of supervision time lasts: 60 s, shorter only under the test
    /// knob `MEDUZA_MINUTE_MS` (docs/supervision.md). A short minute speeds up, by the
    /// same factor, the clock of the restart policy (cooldown, rolling hour, grace
    /// period, status timestamps: a [`ScaledClock`]) and the timers set in configured
    /// units (scheduled restarts, health interval and retry delay). Bounds on how fast
    /// a real program answers stay real: probe timeout, stop timeout, `start_secs`,
    /// the exit backoff delays.
    pub minute: Duration,
}

impl SupervisorConfig {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            stop_timeout: Duration::from_secs(10),
            start_secs: 1,
            log_lines: 200,
            backoff: BackoffPolicy::default(),
            minute: Duration::from_secs(60),
        }
    }

    /// The timer duration of `secs` seconds of supervision time ([`Self::minute`]).
    pub fn duration(&self, secs: u64) -> Duration {
        let nanos = self.minute.as_nanos().saturating_mul(u128::from(secs)) / 60;
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// Applies a changed FRR configuration to running daemons (`frr-reload.py`, falling
/// back to `vtysh -f`): provided by the integrator. An error makes the supervisor
/// restart the service instead.
pub trait FrrReloader: Send + Sync + 'static {
    fn reload<'a>(
        &'a self,
        spec: &'a ServiceSpec,
        changed_files: &'a [String],
    ) -> BoxFuture<'a, Result<(), String>>;
}

/// The reloader used until the integrator sets one: always falls back to restart.
pub(super) struct NoFrrReloader;

impl FrrReloader for NoFrrReloader {
    fn reload<'a>(
        &'a self,
        _: &'a ServiceSpec,
        _: &'a [String],
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Err("no FRR reloader configured".to_string()) })
    }
}
