//! The crash monitor: the async driver of the health gate, which gates TPROXY on
//! mihomo's health (DESIGN §9).
//!
//! Owns: [`ClashMonitor`], the task that probes the API on the gate's timers, takes
//! process events from the supervisor and commands from [`MonitorHandle`], feeds them
//! to the pure gate (`gate::step`), and carries out its actions: the data plane through
//! [`TproxyGate`], status publishing through [`ClashHealthSink`], and the log lines. It
//! is the only caller of the gate, so TPROXY has one owner: the startup chain *arms*
//! the monitor instead of applying TPROXY itself.
//! Must not: decide anything itself (the policy is `gate`'s, see there and
//! docs/clash.md), spawn or signal mihomo, build nftables rules, or write etcd keys.

use crate::clash::api::{Health, MihomoApi};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

// The gate's types stay reachable at their old paths (`clash::monitor::HealthStatus`, …).
pub use super::gate::{
    next_wake, step, Action, HealthStatus, Input, LogEvent, MonitorConfig, MonitorState, Phase,
};

/// Process events from the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessEvent {
    Started { pid: u32 },
    Exited { detail: String },
}

/// Errors of the TPROXY gate (the data plane's).
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("applying TPROXY failed: {0}")]
    Apply(String),
    #[error("removing TPROXY failed: {0}")]
    Remove(String),
}

/// The data plane's TPROXY switch. `apply` installs the cached plan; both must be
/// idempotent (the monitor may call `remove` when already removed after a retry).
pub trait TproxyGate: Send + Sync + 'static {
    fn apply(&self) -> impl Future<Output = Result<(), GateError>> + Send;
    fn remove(&self) -> impl Future<Output = Result<(), GateError>> + Send;
}

/// Where health goes: the status publisher and the DNS chain (mihomo's DNS is used
/// only while healthy). Must not block: hand off to a channel or a task.
pub trait ClashHealthSink: Send + Sync + 'static {
    /// The health phase changed (`/updated/<id>/clash/health`).
    fn health(&self, status: &HealthStatus);
    /// TPROXY was applied or removed (`/updated/<id>/tproxy`).
    fn tproxy(&self, applied: bool, reason: &str);
}

/// Something that probes mihomo. [`MihomoApi`] is the real one.
pub trait Prober: Send + Sync + 'static {
    fn probe(&self) -> impl Future<Output = Health> + Send;
}

impl Prober for MihomoApi {
    async fn probe(&self) -> Health {
        MihomoApi::probe(self).await
    }
}

enum Command {
    Arm,
    Disarm(String),
    Shutdown,
}

/// The handle the startup chain and the integrator keep.
#[derive(Clone)]
pub struct MonitorHandle {
    tx: mpsc::Sender<Command>,
    health: watch::Receiver<HealthStatus>,
}

impl MonitorHandle {
    /// Allow TPROXY (applied as soon as mihomo is confirmed healthy).
    pub async fn arm(&self) {
        // A closed channel means the monitor is gone; nothing left to arm.
        let _ = self.tx.send(Command::Arm).await;
    }

    /// Remove TPROXY and keep it off until armed again.
    pub async fn disarm(&self, reason: &str) {
        let _ = self.tx.send(Command::Disarm(reason.to_string())).await;
    }

    /// Remove TPROXY and stop the monitor.
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown).await;
    }

    pub fn health(&self) -> watch::Receiver<HealthStatus> {
        self.health.clone()
    }

    /// Resolves once mihomo is confirmed healthy; no timeout (DESIGN §9).
    pub async fn wait_healthy(&self) {
        let mut rx = self.health.clone();
        // An error means the monitor stopped; then waiting is over too.
        let _ = rx.wait_for(|s| s.phase == Phase::Healthy).await;
    }
}

type ProbeFuture = Pin<Box<dyn Future<Output = Health> + Send>>;

/// The async driver around [`step`].
pub struct ClashMonitor<P: Prober, G: TproxyGate, S: ClashHealthSink> {
    cfg: MonitorConfig,
    prober: Arc<P>,
    gate: G,
    sink: S,
    events: mpsc::Receiver<ProcessEvent>,
    commands: mpsc::Receiver<Command>,
    health_tx: watch::Sender<HealthStatus>,
    process_alive: bool,
}

impl<P: Prober, G: TproxyGate, S: ClashHealthSink> ClashMonitor<P, G, S> {
    /// `events` carries the supervisor's mihomo process events; `process_alive` is
    /// whether mihomo is running right now.
    pub fn new(
        cfg: MonitorConfig,
        prober: P,
        gate: G,
        sink: S,
        events: mpsc::Receiver<ProcessEvent>,
        process_alive: bool,
    ) -> (Self, MonitorHandle) {
        let (tx, commands) = mpsc::channel(16);
        let initial = MonitorState::new(&cfg, process_alive).status();
        let (health_tx, health) = watch::channel(initial);
        let monitor = Self {
            cfg,
            prober: Arc::new(prober),
            gate,
            sink,
            events,
            commands,
            health_tx,
            process_alive,
        };
        (monitor, MonitorHandle { tx, health })
    }

    /// Runs until [`MonitorHandle::shutdown`] or every handle is dropped; TPROXY is
    /// removed on the way out.
    pub async fn run(mut self) {
        let mut state = MonitorState::new(&self.cfg, self.process_alive);
        state = self.feed(state, Input::Tick).await;
        let mut probe: Option<ProbeFuture> = None;
        let mut wake = Instant::now();
        let mut events_open = true;
        loop {
            tokio::select! {
                biased;
                ev = self.events.recv(), if events_open => {
                    let input = match ev {
                        Some(ProcessEvent::Started { .. }) => Input::ProcessStarted,
                        Some(ProcessEvent::Exited { detail }) => Input::ProcessExited { detail },
                        None => {
                            events_open = false;
                            continue;
                        }
                    };
                    state = self.feed(state, input).await;
                    if probe.is_none() {
                        wake = Instant::now() + next_wake(&self.cfg, &state, Instant::now());
                    }
                }
                cmd = self.commands.recv() => {
                    match cmd {
                        Some(Command::Arm) => state = self.feed(state, Input::Arm).await,
                        Some(Command::Disarm(reason)) => {
                            state = self.feed(state, Input::Disarm { reason }).await;
                        }
                        Some(Command::Shutdown) | None => {
                            let reason = "clash monitor stopped".to_string();
                            self.feed(state, Input::Disarm { reason }).await;
                            return;
                        }
                    }
                }
                health = async {
                    match probe.as_mut() {
                        Some(p) => p.await,
                        // Not polled: the precondition disables this branch.
                        None => std::future::pending().await,
                    }
                }, if probe.is_some() => {
                    probe = None;
                    state = self.feed(state, Input::from(health)).await;
                    wake = Instant::now() + next_wake(&self.cfg, &state, Instant::now());
                }
                () = tokio::time::sleep_until(wake), if probe.is_none() => {
                    let prober = Arc::clone(&self.prober);
                    probe = Some(Box::pin(async move { prober.probe().await }));
                    if state.remove_pending {
                        state = self.feed(state, Input::Tick).await;
                    }
                }
            }
        }
    }

    /// Runs one input and every action it produces, feeding gate failures back.
    async fn feed(&self, mut state: MonitorState, first: Input) -> MonitorState {
        let mut queue = vec![first];
        while let Some(input) = queue.pop() {
            let (next, actions) = step(&self.cfg, state, input, Instant::now());
            state = next;
            for action in actions {
                match action {
                    Action::Log(ev) => emit(&ev),
                    Action::Publish(status) => {
                        self.sink.health(&status);
                        self.health_tx.send_replace(status);
                    }
                    Action::RemoveTproxy { reason } => match self.gate.remove().await {
                        Ok(()) => {
                            tracing::info!(%reason, "[clash-monitor] TProxy removed");
                            self.sink.tproxy(false, &reason);
                        }
                        Err(err) => queue.push(Input::RemoveFailed {
                            reason: err.to_string(),
                        }),
                    },
                    Action::ApplyTproxy { reason } => match self.gate.apply().await {
                        Ok(()) => {
                            tracing::info!(%reason, "[clash-monitor] TProxy applied");
                            self.sink.tproxy(true, &reason);
                        }
                        Err(err) => queue.push(Input::ApplyFailed {
                            reason: err.to_string(),
                        }),
                    },
                }
            }
        }
        state
    }
}

/// Renders a log event with constant messages and data in fields.
fn emit(ev: &LogEvent) {
    match ev {
        LogEvent::Crashed { reason } => {
            tracing::warn!(%reason, "[clash-monitor] Mihomo crashed, removing TProxy");
        }
        LogEvent::Recovered => {
            tracing::info!("[clash-monitor] Mihomo recovered, reapplying TProxy")
        }
        LogEvent::FirstApply => tracing::info!("[clash] Mihomo is healthy, applying TProxy"),
        LogEvent::BecameHealthy => tracing::info!("[clash] Mihomo is healthy"),
        LogEvent::Degraded { reason } => {
            tracing::warn!(%reason, "[clash-monitor] Mihomo degraded, keeping TProxy");
        }
        LogEvent::HeldDown {
            remaining,
            hold_down,
        } => tracing::info!(
            remaining_ms = remaining.as_millis() as u64,
            hold_down_ms = hold_down.as_millis() as u64,
            "[clash-monitor] Mihomo healthy again, TProxy re-apply held down"
        ),
        LogEvent::Disarmed { reason } => {
            tracing::info!(%reason, "[clash-monitor] TProxy disarmed, removing")
        }
        LogEvent::ApplyFailed { reason } => {
            tracing::error!(%reason, "[clash-monitor] TProxy apply failed")
        }
        LogEvent::RemoveFailed { reason } => {
            tracing::error!(%reason, "[clash-monitor] TProxy removal failed, retrying");
        }
    }
}
