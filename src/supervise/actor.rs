//! One actor task per service: the service's lifecycle
//! (`starting|running|backoff|fatal|stopped`) and every restart of it.
//!
//! Owns: the child process of one service, its exit backoff, restarts through
//! `policy::decide` (recorded in the state file), its status entry and events, and the
//! commands the supervisor and the health loop send it ([`Cmd`]); [`Shared`], what
//! the supervisor, the actors and the loops share.
//! Must not: fork or signal directly (the `Spawner` does), read the wall clock
//! directly (the `Clock` does), or run probes (the health loop in `loops` does).
//!
//! One actor per service processes its commands one at a time, which is the
//! "one restart at a time" rule: a health restart, a cron restart and an exit restart
//! of one service can never overlap. Restarts of different services do not wait for
//! each other. The cron timer is one branch of the actor's `select!` for that reason
//! (its handler lives in `loops`).

use super::clock::Clock;
use super::config::{FrrReloader, SupervisorConfig};
use super::logbuf::LogBuffer;
use super::policy::{decide, Decision, Event, RestartSource, RestartState};
use super::spawn::{ExitInfo, Spawner};
use super::state_file::StateStore;
use super::status::{EventKind, ServiceEvent, ServiceState, ServiceStatus};
use super::SuperviseError;
use futures::future::BoxFuture;
use meduza_generators::plan::service::ServiceSpec;
use nix::sys::signal::Signal;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{error, info, warn};

/// What the supervisor, every actor and every health loop share.
pub(super) struct Shared {
    pub(super) spawner: Arc<dyn Spawner>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) store: StateStore,
    pub(super) config: SupervisorConfig,
    pub(super) events: broadcast::Sender<ServiceEvent>,
    pub(super) status: watch::Sender<BTreeMap<String, ServiceStatus>>,
    pub(super) frr: Arc<dyn FrrReloader>,
    /// `restarts_total` of services `apply` stopped, taken up again if they come back,
    /// so the counter of a service name never goes down while meduza runs.
    pub(super) retired_totals: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl Shared {
    pub(super) fn emit(&self, name: &str, kind: EventKind) {
        // No subscriber is fine: events are for whoever listens.
        let _ = self.events.send(ServiceEvent {
            name: name.to_string(),
            kind,
        });
    }
}

pub(super) async fn send<T>(
    tx: &mpsc::Sender<Cmd>,
    name: &str,
    cmd: Cmd,
    rx: oneshot::Receiver<T>,
) -> Result<T, SuperviseError> {
    let gone = || SuperviseError::ActorGone {
        service: name.to_string(),
    };
    tx.send(cmd).await.map_err(|_| gone())?;
    rx.await.map_err(|_| gone())
}

pub(super) enum Cmd {
    Restart {
        source: RestartSource,
        /// Only restart if this is still the running pid (a health verdict about a
        /// process that has since been replaced is stale).
        expect_pid: Option<u32>,
        reply: oneshot::Sender<Option<Decision>>,
    },
    Replace {
        spec: Box<ServiceSpec>,
        reply: oneshot::Sender<()>,
    },
    Update {
        spec: Box<ServiceSpec>,
        reply: oneshot::Sender<()>,
    },
    Signal {
        signal: Signal,
        reply: oneshot::Sender<Result<(), SuperviseError>>,
    },
    /// A health check passed (clears `fatal`).
    Healthy,
    Stop {
        reply: oneshot::Sender<()>,
    },
}

pub(super) struct Running {
    pid: u32,
    started_at: u64,
    exited: BoxFuture<'static, ExitInfo>,
}

/// Timers and the child of one actor; kept apart from `Actor` so `select!` can
/// borrow them independently.
#[derive(Default)]
pub(super) struct Slots {
    pub(super) child: Option<Running>,
    pub(super) backoff_until: Option<Instant>,
    pub(super) running_at: Option<Instant>,
    pub(super) cron_at: Option<Instant>,
}

pub(super) struct Actor {
    pub(super) shared: Arc<Shared>,
    pub(super) spec: ServiceSpec,
    pub(super) log: Arc<LogBuffer>,
    pub(super) policy: RestartState,
    pub(super) state: ServiceState,
    pub(super) since: u64,
    pub(super) last_exit: Option<ExitInfo>,
    pub(super) pid: Option<u32>,
    pub(super) started_at: Option<u64>,
}

async fn wait_exit(child: &mut Option<Running>) -> ExitInfo {
    match child {
        Some(c) => (&mut c.exited).await,
        None => std::future::pending().await,
    }
}

async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

impl Actor {
    pub(super) fn name(&self) -> &str {
        &self.spec.name
    }

    fn publish(&self) {
        let now = self.shared.clock.now();
        let status = ServiceStatus {
            name: self.spec.name.clone(),
            state: self.state,
            since: self.since,
            pid: self.pid,
            started_at: self.started_at,
            restarts_last_hour: self.policy.restarts_last_hour(now),
            restarts_total: self.policy.restarts_total,
            last_exit: self.last_exit,
        };
        self.shared.status.send_modify(|m| {
            m.insert(status.name.clone(), status);
        });
    }

    fn set_state(&mut self, state: ServiceState) {
        if self.state != state {
            self.state = state;
            self.since = self.shared.clock.now();
            info!(svc = %self.spec.name, %state, "service state changed");
            self.shared.emit(
                &self.spec.name,
                EventKind::StateChanged {
                    state,
                    since: self.since,
                },
            );
        }
        self.publish();
    }

    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Cmd>, started: oneshot::Sender<()>) {
        let mut slots = Slots::default();
        self.launch(&mut slots, None);
        slots.cron_at = self.cron_deadline();
        let _ = started.send(());
        loop {
            tokio::select! {
                status = wait_exit(&mut slots.child) => self.on_exit(&mut slots, status),
                _ = sleep_opt(slots.backoff_until) => {
                    slots.backoff_until = None;
                    self.launch(&mut slots, Some(RestartSource::Exit));
                }
                _ = sleep_opt(slots.running_at) => {
                    slots.running_at = None;
                    if slots.child.is_some() && self.state == ServiceState::Starting {
                        self.set_state(ServiceState::Running);
                    }
                }
                _ = sleep_opt(slots.cron_at) => self.on_cron(&mut slots).await,
                cmd = rx.recv() => match cmd {
                    None => {
                        self.stop(&mut slots).await;
                        return;
                    }
                    Some(Cmd::Stop { reply }) => {
                        self.stop(&mut slots).await;
                        let _ = reply.send(());
                        return;
                    }
                    Some(Cmd::Restart { source, expect_pid, reply }) => {
                        let event = match source {
                            RestartSource::Health => Event::HealthFailure,
                            RestartSource::Cron => Event::Cron,
                            RestartSource::Exit | RestartSource::Manual => Event::Manual,
                        };
                        let d = self.gated_restart(&mut slots, event, expect_pid).await;
                        let _ = reply.send(d);
                    }
                    Some(Cmd::Replace { spec, reply }) => {
                        self.spec = *spec;
                        self.policy.protection = self.spec.protection;
                        slots.cron_at = self.cron_deadline();
                        self.gated_restart(&mut slots, Event::Manual, None).await;
                        let _ = reply.send(());
                    }
                    Some(Cmd::Update { spec, reply }) => {
                        let schedule_changed =
                            spec.scheduled_restart_minutes != self.spec.scheduled_restart_minutes;
                        self.spec = *spec;
                        self.policy.protection = self.spec.protection;
                        if schedule_changed {
                            slots.cron_at = self.cron_deadline();
                        }
                        let _ = reply.send(());
                    }
                    Some(Cmd::Signal { signal, reply }) => {
                        let r = match &slots.child {
                            Some(c) => self.shared.spawner.signal(self.name(), c.pid, signal),
                            None => Err(SuperviseError::NotRunning { service: self.name().to_string() }),
                        };
                        let _ = reply.send(r);
                    }
                    Some(Cmd::Healthy) => {
                        if self.state == ServiceState::Fatal && slots.child.is_some() {
                            self.set_state(ServiceState::Running);
                        }
                    }
                },
            }
        }
    }

    /// Start the process (after recording a restart by `source`, if any). A spawn
    /// failure is treated like an immediate exit: state `backoff`.
    fn launch(&mut self, slots: &mut Slots, source: Option<RestartSource>) {
        let name = self.spec.name.clone();
        let now = self.shared.clock.now();
        if let Some(source) = source {
            self.policy.record(now, source);
            if let Err(err) = self.shared.store.save(&name, &self.policy.history) {
                error!(svc = %name, %err, "cannot persist restart budget");
            }
            self.shared.emit(&name, EventKind::Restarted { source });
        }
        self.log.next_generation();
        match self.shared.spawner.spawn(&self.spec, self.log.clone()) {
            Ok(spawned) => {
                info!(svc = %name, pid = spawned.pid, "service started");
                self.pid = Some(spawned.pid);
                self.started_at = Some(now);
                self.shared
                    .emit(&name, EventKind::Started { pid: spawned.pid });
                slots.child = Some(Running {
                    pid: spawned.pid,
                    started_at: now,
                    exited: spawned.exited,
                });
                slots.running_at =
                    Some(Instant::now() + Duration::from_secs(self.shared.config.start_secs));
                self.set_state(ServiceState::Starting);
            }
            Err(err) => {
                error!(svc = %name, %err, "service failed to start");
                self.pid = None;
                self.started_at = None;
                self.schedule_backoff(slots, 0);
            }
        }
    }

    fn schedule_backoff(&mut self, slots: &mut Slots, uptime_secs: u64) {
        let now = self.shared.clock.now();
        let decision = decide(&self.policy, Event::Exit { uptime_secs }, now);
        let delay = match decision {
            Decision::RestartAfter {
                delay_secs,
                attempt,
            } => {
                self.policy.set_backoff_attempt(attempt.saturating_add(1));
                delay_secs
            }
            // `decide` answers an exit only with RestartAfter; fall back to the cap.
            _ => self.policy.backoff.max_secs,
        };
        info!(svc = %self.spec.name, delay_secs = delay, "{decision}");
        slots.backoff_until = Some(Instant::now() + Duration::from_secs(delay));
        self.set_state(ServiceState::Backoff);
    }

    fn on_exit(&mut self, slots: &mut Slots, status: ExitInfo) {
        let Some(child) = slots.child.take() else {
            return;
        };
        slots.running_at = None;
        let uptime = self.shared.clock.now().saturating_sub(child.started_at);
        warn!(svc = %self.spec.name, pid = child.pid, %status, uptime_secs = uptime, "service exited");
        self.last_exit = Some(status);
        self.pid = None;
        self.shared.emit(
            &self.spec.name,
            EventKind::Exited {
                pid: child.pid,
                status,
            },
        );
        self.schedule_backoff(slots, uptime);
    }

    /// A health, cron or manual restart through the policy.
    pub(super) async fn gated_restart(
        &mut self,
        slots: &mut Slots,
        event: Event,
        expect_pid: Option<u32>,
    ) -> Option<Decision> {
        let name = self.spec.name.clone();
        if expect_pid.is_some() && slots.child.as_ref().map(|c| c.pid) != expect_pid {
            info!(svc = %name, "restart request is about a process already replaced; ignored");
            return None;
        }
        let now = self.shared.clock.now();
        self.policy.prune(now);
        let decision = decide(&self.policy, event, now);
        let source = event.source();
        match decision {
            Decision::Restart { .. } => {
                info!(svc = %name, %source, "{decision}");
                self.stop_child(slots).await;
                slots.backoff_until = None;
                self.policy.set_backoff_attempt(0);
                self.launch(slots, Some(source));
            }
            Decision::Skipped { .. } => {
                warn!(svc = %name, %source, "{decision}");
                self.publish();
            }
            Decision::Denied { .. } => {
                error!(svc = %name, %source, "{decision}");
                error!(svc = %name, "ACTION REQUIRED: Check service health manually - automatic restarts stopped");
                self.set_state(ServiceState::Fatal);
            }
            Decision::RestartAfter { .. } => {}
        }
        Some(decision)
    }

    /// SIGTERM, then SIGKILL (to the process group) after the stop timeout.
    async fn stop_child(&mut self, slots: &mut Slots) {
        slots.running_at = None;
        let Some(mut child) = slots.child.take() else {
            return;
        };
        let name = self.spec.name.clone();
        if let Err(err) = self
            .shared
            .spawner
            .signal(&name, child.pid, Signal::SIGTERM)
        {
            warn!(svc = %name, %err, "SIGTERM failed");
        }
        let timeout = self.shared.config.stop_timeout;
        let status = match tokio::time::timeout(timeout, &mut child.exited).await {
            Ok(status) => status,
            Err(_) => {
                warn!(svc = %name, pid = child.pid, timeout_secs = timeout.as_secs(), "service ignored SIGTERM; sending SIGKILL");
                if let Err(err) = self
                    .shared
                    .spawner
                    .signal(&name, child.pid, Signal::SIGKILL)
                {
                    warn!(svc = %name, %err, "SIGKILL failed");
                }
                child.exited.await
            }
        };
        info!(svc = %name, pid = child.pid, %status, "service stopped");
        self.last_exit = Some(status);
        self.pid = None;
        self.shared.emit(
            &name,
            EventKind::Exited {
                pid: child.pid,
                status,
            },
        );
    }

    async fn stop(&mut self, slots: &mut Slots) {
        self.stop_child(slots).await;
        *slots = Slots::default();
        self.set_state(ServiceState::Stopped);
    }
}
