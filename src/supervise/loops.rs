//! The timers beside each service's actor: the health-check loop (a task per service
//! with a health spec) and the scheduled (cron) restart.
//!
//! Owns: when and how often a service is probed (interval, grace period, attempts,
//! retry delay, the wait after a denied restart) and when its next scheduled restart
//! is due, both in supervision time (`SupervisorConfig::duration`).
//! Must not: restart anything itself: a failed health check sends a restart command
//! to the actor, and the cron handler runs inside the actor's loop, so restarts of one
//! service stay one at a time. Probes themselves are `health::run_probe`.

use super::actor::{Actor, Cmd, Shared, Slots};
use super::health::{run_probe, ProbeContext};
use super::logbuf::LogBuffer;
use super::policy::{Decision, Event, RestartSource};
use super::status::ServiceState;
use meduza_generators::plan::service::{HealthSpec, ServiceSpec};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{error, info, warn};

impl Actor {
    pub(super) fn cron_deadline(&self) -> Option<Instant> {
        self.spec
            .scheduled_restart_minutes
            .map(|m| Instant::now() + self.shared.config.duration(u64::from(m) * 60))
    }

    /// The scheduled restart is due: set the next deadline, then ask the policy for a
    /// cron restart.
    pub(super) async fn on_cron(&mut self, slots: &mut Slots) {
        slots.cron_at = self.cron_deadline();
        let name = self.name().to_string();
        info!(svc = %name, "=== Cron Restart Triggered: {name} ===");
        let outcome = match self.gated_restart(slots, Event::Cron, None).await {
            Some(Decision::Restart { .. }) => "Service restarted",
            _ => "Restart skipped (protection active)",
        };
        info!(svc = %name, "=== Cron Restart Complete: {outcome} ===");
    }
}

pub(super) fn spawn_health(
    shared: &Arc<Shared>,
    spec: &ServiceSpec,
    tx: mpsc::Sender<Cmd>,
    log: Arc<LogBuffer>,
) -> Option<JoinHandle<()>> {
    let health = spec.health.clone()?;
    Some(tokio::spawn(health_loop(
        shared.clone(),
        spec.name.clone(),
        health,
        tx,
        log,
    )))
}

/// The predecessor's watchdog, per service: every interval, unless within the grace
/// period, up to `attempts` probes `retry_delay` apart; all failing → a health restart
/// through the policy.
async fn health_loop(
    shared: Arc<Shared>,
    name: String,
    spec: HealthSpec,
    tx: mpsc::Sender<Cmd>,
    log: Arc<LogBuffer>,
) {
    let interval = shared.config.duration(spec.interval_secs);
    let mut wait = interval;
    loop {
        tokio::time::sleep(wait).await;
        wait = interval;
        let Some(st) = shared.status.borrow().get(&name).cloned() else {
            return;
        };
        info!(svc = %name, "=== Health Check Start: {name} ===");
        if matches!(st.state, ServiceState::Backoff | ServiceState::Stopped) {
            info!(svc = %name, state = %st.state, "Health check: Service is not running (state {}); exit restart pending", st.state);
            continue;
        }
        let uptime = shared
            .clock
            .now()
            .saturating_sub(st.started_at.unwrap_or(0));
        if uptime < spec.grace_secs {
            info!(svc = %name, uptime_secs = uptime, "Health check SKIPPED: grace period (uptime: {uptime}s, need {}s)", spec.grace_secs);
            continue;
        }
        info!(svc = %name, uptime_secs = uptime, "Health check: Grace period passed (uptime: {uptime}s)");
        let ctx = ProbeContext {
            pid: st.pid,
            log: &log,
            timeout: Duration::from_secs(spec.timeout_secs),
        };
        let mut healthy = false;
        for attempt in 1..=spec.attempts {
            match run_probe(&spec.probe, &ctx).await {
                Ok(detail) => {
                    info!(svc = %name, "Health check PASS: {detail}");
                    info!(svc = %name, "=== Health Check PASSED: Service is healthy ===");
                    healthy = true;
                    break;
                }
                Err(reason) => {
                    warn!(svc = %name, attempt, attempts = spec.attempts, "Health check FAIL (attempt {attempt}/{}): {reason}", spec.attempts);
                    if attempt < spec.attempts {
                        tokio::time::sleep(shared.config.duration(spec.retry_delay_secs)).await;
                    }
                }
            }
        }
        if healthy {
            if st.state == ServiceState::Fatal && tx.send(Cmd::Healthy).await.is_err() {
                return;
            }
            continue;
        }
        error!(svc = %name, "=== Health Check FAILED: {name} is unhealthy ===");
        let (reply, rx) = oneshot::channel();
        let cmd = Cmd::Restart {
            source: RestartSource::Health,
            expect_pid: st.pid,
            reply,
        };
        if tx.send(cmd).await.is_err() {
            return;
        }
        if let Ok(Some(Decision::Denied { retry_in_secs, .. })) = rx.await {
            wait = interval.min(shared.config.duration(retry_in_secs));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervise::plan::tests::spec;
    use crate::supervise::status::EventKind;
    use crate::supervise::{Supervisor, SupervisorConfig};
    use std::collections::BTreeSet;

    /// The scheduled-restart timer itself (not `restart(Cron)`), on a 600 ms minute:
    /// a restart every 10 minutes (6 s) until the sixth in the hour is denied by the
    /// budget, measured on the scaled clock. `tests/gateway/gateway_cron.rs` shows the same
    /// with the real `meduza run`.
    #[tokio::test(start_paused = true)]
    async fn cron_timer_runs_on_the_scaled_minute_until_the_budget_denies() {
        use crate::supervise::{FakeClock, FakeSpawner};
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = SupervisorConfig::new(dir.path());
        config.minute = Duration::from_millis(600);
        assert_eq!(config.duration(600), Duration::from_secs(6));
        let sup = Supervisor::new(
            Arc::new(FakeSpawner::new()),
            Arc::new(FakeClock::new(1_800_000_000)),
            config,
        );
        let mut events = sup.subscribe();
        let mut svc = spec("svc", &[]);
        svc.scheduled_restart_minutes = Some(10);
        sup.apply(vec![svc], &BTreeSet::new()).await.expect("apply");
        let t0 = Instant::now();
        let mut restarts = Vec::new();
        while restarts.len() < 6 {
            let ev = tokio::time::timeout(Duration::from_secs(60), events.recv())
                .await
                .expect("an event within a minute")
                .expect("event channel");
            match ev.kind {
                EventKind::Restarted { source } => {
                    assert_eq!(source, RestartSource::Cron);
                    restarts.push(t0.elapsed().as_millis());
                }
                EventKind::StateChanged {
                    state: ServiceState::Fatal,
                    ..
                } => restarts.push(t0.elapsed().as_millis()),
                _ => {}
            }
        }
        assert_eq!(restarts, [6000, 12000, 18000, 24000, 30000, 36000]);
        let st = sup.status().pop().expect("status");
        assert_eq!((st.state, st.restarts_last_hour), (ServiceState::Fatal, 5));
        assert_eq!(
            st.since,
            1_800_000_000 + 3600,
            "the clock ran 100 times faster"
        );
    }
}
