//! The runtime supervisor: one actor task per service, and `apply` of a desired list.
//!
//! Owns: the lifecycle of each service (`starting|running|backoff|fatal|stopped`),
//! its restarts (exit backoff; health, cron and manual restarts through
//! `policy::decide`, recorded in the state file), its health-check task, its status
//! entry and the event broadcast; the plan of `apply` ([`plan`], pure) and its
//! execution; shutdown in reverse start order.
//! Must not: fork or signal directly (the `Spawner` does), read the wall clock
//! directly (the `Clock` does), or run FRR's reload command (the `FrrReloader` does).
//!
//! One actor per service processes its commands one at a time, which is the
//! "one restart at a time" rule: a health restart, a cron restart and an exit restart
//! of one service can never overlap. Restarts of different services do not wait for
//! each other.

use super::clock::{Clock, ScaledClock};
use super::health::{run_probe, ProbeContext};
use super::logbuf::LogBuffer;
use super::policy::{decide, BackoffPolicy, Decision, Event, RestartSource, RestartState};
use super::spawn::{parse_caps, ExitInfo, Spawner};
use super::state_file::StateStore;
use super::SuperviseError;
use futures::future::BoxFuture;
use meduza_generators::plan::service::{
    HealthSpec, ReloadStrategy, ServiceSpec, SCHEDULED_RESTART_MINUTES,
};
use nix::sys::signal::Signal;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{error, info, warn};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceState {
    Starting,
    Running,
    Backoff,
    Fatal,
    Stopped,
}

impl fmt::Display for ServiceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Backoff => "backoff",
            Self::Fatal => "fatal",
            Self::Stopped => "stopped",
        })
    }
}

/// Observed state of one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub state: ServiceState,
    /// Unix time the state was entered.
    pub since: u64,
    pub pid: Option<u32>,
    /// Unix time the current process was started.
    pub started_at: Option<u64>,
    pub restarts_last_hour: u32,
    /// Restarts of any source (exit, health, cron, manual) since meduza started; only
    /// goes up, also across a stop and a later start of the service by `apply`.
    pub restarts_total: u64,
    pub last_exit: Option<ExitInfo>,
}

impl ServiceStatus {
    /// The value of `/updated/<id>/services/<svc>/status`: `"<state> <unix-ts>"`.
    pub fn status_value(&self) -> String {
        format!("{} {}", self.state, self.since)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceEvent {
    pub name: String,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Started {
        pid: u32,
    },
    /// Sent the moment the child is reaped (the mihomo crash monitor relies on it).
    Exited {
        pid: u32,
        status: ExitInfo,
    },
    Restarted {
        source: RestartSource,
    },
    StateChanged {
        state: ServiceState,
        since: u64,
    },
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
struct NoFrrReloader;

impl FrrReloader for NoFrrReloader {
    fn reload<'a>(
        &'a self,
        _: &'a ServiceSpec,
        _: &'a [String],
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Err("no FRR reloader configured".to_string()) })
    }
}

/// One step of `apply`, in execution order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", content = "service", rename_all = "snake_case")]
pub enum Op {
    /// Stop and forget a service that is no longer desired.
    Stop(String),
    /// Start a new service.
    Start(String),
    /// argv/env/user/caps/workdir changed: restart the process with the new spec.
    Replace(String),
    /// A config file changed: apply the service's reload strategy.
    Reload(String, ReloadStrategy),
    /// Only supervision settings changed (health, schedule, protection): no restart.
    Update(String),
}

/// Check a desired list: unique safe names, runnable argv, known capabilities,
/// dependencies present and acyclic, schedule and health in range. Returns the
/// specs in start order (dependencies first, otherwise the given order).
pub fn validate(desired: &[ServiceSpec]) -> Result<Vec<&ServiceSpec>, SuperviseError> {
    let invalid =
        |s: &ServiceSpec, field, value: String, reason: &str| SuperviseError::InvalidSpec {
            service: s.name.clone(),
            field,
            value,
            reason: reason.to_string(),
        };
    let mut names = BTreeSet::new();
    for s in desired {
        let name_ok = !s.name.is_empty()
            && s.name.len() <= 64
            && !s.name.starts_with('.')
            && s.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.@-".contains(c));
        if !name_ok {
            return Err(invalid(
                s,
                "name",
                s.name.clone(),
                "must be 1-64 chars of [A-Za-z0-9_.@-], not starting with '.'",
            ));
        }
        if !names.insert(s.name.as_str()) {
            return Err(SuperviseError::DuplicateService {
                service: s.name.clone(),
            });
        }
        if s.argv.first().is_none_or(|p| p.is_empty()) {
            return Err(invalid(
                s,
                "argv",
                format!("{:?}", s.argv),
                "needs a program",
            ));
        }
        parse_caps(&s.name, &s.caps)?;
        if let Some(m) = s.scheduled_restart_minutes {
            if !SCHEDULED_RESTART_MINUTES.contains(&m) {
                return Err(invalid(
                    s,
                    "scheduled_restart_minutes",
                    m.to_string(),
                    "must be 10..=1440",
                ));
            }
        }
        if let Some(h) = &s.health {
            if h.attempts == 0 || h.interval_secs == 0 || h.timeout_secs == 0 {
                return Err(invalid(
                    s,
                    "health",
                    format!("{h:?}"),
                    "attempts, interval and timeout must be > 0",
                ));
            }
        }
    }
    for s in desired {
        if let Some(dep) = s.after.iter().find(|d| !names.contains(d.as_str())) {
            return Err(SuperviseError::UnknownDependency {
                service: s.name.clone(),
                dependency: dep.clone(),
            });
        }
    }
    // Kahn's algorithm, stable: always take the first spec whose dependencies are placed.
    let mut placed: BTreeSet<&str> = BTreeSet::new();
    let mut order = Vec::with_capacity(desired.len());
    while order.len() < desired.len() {
        let next = desired.iter().find(|s| {
            !placed.contains(s.name.as_str()) && s.after.iter().all(|d| placed.contains(d.as_str()))
        });
        match next {
            Some(s) => {
                placed.insert(&s.name);
                order.push(s);
            }
            None => {
                let stuck = desired
                    .iter()
                    .find(|s| !placed.contains(s.name.as_str()))
                    .map(|s| s.name.clone())
                    .unwrap_or_default();
                return Err(SuperviseError::DependencyCycle { service: stuck });
            }
        }
    }
    Ok(order)
}

/// What `apply` must do to go from `current` (started in `started_order`) to
/// `desired`, given the config files that changed on disk. Pure.
pub fn plan(
    current: &BTreeMap<String, ServiceSpec>,
    started_order: &[String],
    desired: &[ServiceSpec],
    changed_files: &BTreeSet<String>,
) -> Result<Vec<Op>, SuperviseError> {
    let order = validate(desired)?;
    let wanted: BTreeSet<&str> = desired.iter().map(|s| s.name.as_str()).collect();
    let mut ops: Vec<Op> = started_order
        .iter()
        .rev()
        .filter(|n| current.contains_key(*n) && !wanted.contains(n.as_str()))
        .map(|n| Op::Stop(n.clone()))
        .collect();
    for s in &order {
        let Some(old) = current.get(&s.name) else {
            continue;
        };
        if !old.same_process(s) {
            ops.push(Op::Replace(s.name.clone()));
            continue;
        }
        if old != *s {
            ops.push(Op::Update(s.name.clone()));
        }
        if s.config_files.iter().any(|f| changed_files.contains(f)) {
            ops.push(Op::Reload(s.name.clone(), s.reload));
        }
    }
    ops.extend(
        order
            .iter()
            .filter(|s| !current.contains_key(&s.name))
            .map(|s| Op::Start(s.name.clone())),
    );
    Ok(ops)
}

struct Shared {
    spawner: Arc<dyn Spawner>,
    clock: Arc<dyn Clock>,
    store: StateStore,
    config: SupervisorConfig,
    events: broadcast::Sender<ServiceEvent>,
    status: watch::Sender<BTreeMap<String, ServiceStatus>>,
    frr: Arc<dyn FrrReloader>,
    /// `restarts_total` of services `apply` stopped, taken up again if they come back,
    /// so the counter of a service name never goes down while meduza runs.
    retired_totals: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl Shared {
    fn emit(&self, name: &str, kind: EventKind) {
        // No subscriber is fine: events are for whoever listens.
        let _ = self.events.send(ServiceEvent {
            name: name.to_string(),
            kind,
        });
    }
}

struct Handle {
    spec: ServiceSpec,
    tx: mpsc::Sender<Cmd>,
    task: JoinHandle<()>,
    health: Option<JoinHandle<()>>,
    log: Arc<LogBuffer>,
}

#[derive(Default)]
struct Registry {
    order: Vec<String>,
    handles: BTreeMap<String, Handle>,
}

/// The supervisor. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct Supervisor {
    shared: Arc<Shared>,
    registry: tokio::sync::Mutex<Registry>,
}

impl Supervisor {
    pub fn new(spawner: Arc<dyn Spawner>, clock: Arc<dyn Clock>, config: SupervisorConfig) -> Self {
        let clock: Arc<dyn Clock> = if config.minute == Duration::from_secs(60) {
            clock
        } else {
            info!(
                minute_ms = config.minute.as_millis() as u64,
                "supervision time scaled by MEDUZA_MINUTE_MS (test knob)"
            );
            Arc::new(ScaledClock::new(clock.now(), config.minute))
        };
        let (events, _) = broadcast::channel(256);
        let (status, _) = watch::channel(BTreeMap::new());
        Self {
            shared: Arc::new(Shared {
                spawner,
                clock,
                store: StateStore::new(&config.state_dir),
                config,
                events,
                status,
                frr: Arc::new(NoFrrReloader),
                retired_totals: std::sync::Mutex::new(BTreeMap::new()),
            }),
            registry: tokio::sync::Mutex::new(Registry::default()),
        }
    }

    /// Use `reloader` for services with `ReloadStrategy::FrrReload`. Call before
    /// the first `apply`.
    pub fn with_frr_reloader(mut self, reloader: Arc<dyn FrrReloader>) -> Self {
        match Arc::get_mut(&mut self.shared) {
            Some(shared) => shared.frr = reloader,
            None => warn!("FRR reloader set after services started; ignored"),
        }
        self
    }

    /// Every start, exit, restart and state change, as it happens.
    pub fn subscribe(&self) -> broadcast::Receiver<ServiceEvent> {
        self.shared.events.subscribe()
    }

    /// Status of every service, updated on each change (publish
    /// `ServiceStatus::status_value` to `/updated/<id>/services/<svc>/status`).
    pub fn watch_status(&self) -> watch::Receiver<BTreeMap<String, ServiceStatus>> {
        self.shared.status.subscribe()
    }

    pub fn status(&self) -> Vec<ServiceStatus> {
        self.shared.status.borrow().values().cloned().collect()
    }

    /// The last `n` output lines of a service.
    pub async fn logs(&self, name: &str, n: usize) -> Option<Vec<String>> {
        let reg = self.registry.lock().await;
        reg.handles.get(name).map(|h| h.log.recent(n))
    }

    /// Services in the order they were started.
    pub async fn start_order(&self) -> Vec<String> {
        self.registry.lock().await.order.clone()
    }

    /// Converge on `desired`: start new services (dependencies first), stop removed
    /// ones (reverse start order), replace services whose process settings changed,
    /// apply the reload strategy of services whose `config_files` are in
    /// `changed_files`, and leave every other service untouched. Returns what it did.
    /// An invalid list changes nothing.
    pub async fn apply(
        &self,
        desired: Vec<ServiceSpec>,
        changed_files: &BTreeSet<String>,
    ) -> Result<Vec<Op>, SuperviseError> {
        let mut reg = self.registry.lock().await;
        let current: BTreeMap<String, ServiceSpec> = reg
            .handles
            .iter()
            .map(|(n, h)| (n.clone(), h.spec.clone()))
            .collect();
        let ops = plan(&current, &reg.order, &desired, changed_files)?;
        let mut desired: BTreeMap<String, ServiceSpec> =
            desired.into_iter().map(|s| (s.name.clone(), s)).collect();
        for op in &ops {
            match op {
                Op::Stop(name) => {
                    self.stop_one(&mut reg, name).await;
                    self.shared.status.send_modify(|m| {
                        if let Some(st) = m.remove(name) {
                            self.shared
                                .retired_totals
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(name.clone(), st.restarts_total);
                        }
                    });
                }
                Op::Start(name) => {
                    if let Some(spec) = desired.remove(name) {
                        self.start_one(&mut reg, spec).await;
                    }
                }
                Op::Replace(name) | Op::Update(name) => {
                    let Some(spec) = desired.get(name).cloned() else {
                        continue;
                    };
                    let Some(h) = reg.handles.get_mut(name) else {
                        continue;
                    };
                    let (reply, rx) = oneshot::channel();
                    let cmd = if matches!(op, Op::Replace(_)) {
                        info!(svc = %name, "service settings changed; restarting it");
                        Cmd::Replace {
                            spec: Box::new(spec.clone()),
                            reply,
                        }
                    } else {
                        Cmd::Update {
                            spec: Box::new(spec.clone()),
                            reply,
                        }
                    };
                    send(&h.tx, name, cmd, rx).await?;
                    if h.spec.health != spec.health {
                        if let Some(task) = h.health.take() {
                            task.abort();
                        }
                        h.health = spawn_health(&self.shared, &spec, h.tx.clone(), h.log.clone());
                    }
                    h.spec = spec;
                }
                Op::Reload(name, strategy) => {
                    let Some(h) = reg.handles.get(name) else {
                        continue;
                    };
                    let files: Vec<String> = h
                        .spec
                        .config_files
                        .iter()
                        .filter(|f| changed_files.contains(*f))
                        .cloned()
                        .collect();
                    self.reload_one(h, *strategy, &files).await?;
                }
            }
        }
        Ok(ops)
    }

    async fn reload_one(
        &self,
        h: &Handle,
        strategy: ReloadStrategy,
        files: &[String],
    ) -> Result<(), SuperviseError> {
        let name = &h.spec.name;
        let restart = match strategy {
            ReloadStrategy::Restart => true,
            ReloadStrategy::Sighup => {
                let (reply, rx) = oneshot::channel();
                match send(
                    &h.tx,
                    name,
                    Cmd::Signal {
                        signal: Signal::SIGHUP,
                        reply,
                    },
                    rx,
                )
                .await?
                {
                    Ok(()) => {
                        info!(svc = %name, ?files, "config changed; sent SIGHUP");
                        false
                    }
                    Err(err) => {
                        warn!(svc = %name, %err, "SIGHUP failed; restarting instead");
                        true
                    }
                }
            }
            ReloadStrategy::FrrReload => match self.shared.frr.reload(&h.spec, files).await {
                Ok(()) => {
                    info!(svc = %name, ?files, "config changed; FRR reloaded");
                    false
                }
                Err(reason) => {
                    warn!(svc = %name, %reason, "FRR reload failed; restarting instead");
                    true
                }
            },
        };
        if restart {
            info!(svc = %name, ?files, "config changed; restarting");
            let (reply, rx) = oneshot::channel();
            send(
                &h.tx,
                name,
                Cmd::Restart {
                    source: RestartSource::Manual,
                    expect_pid: None,
                    reply,
                },
                rx,
            )
            .await?;
        }
        Ok(())
    }

    /// Ask for a restart of `name` on behalf of `source` (normally `Manual`; `Cron`
    /// and `Health` go through the protection). Returns the decision, or `None` when
    /// there was nothing to decide.
    pub async fn restart(
        &self,
        name: &str,
        source: RestartSource,
    ) -> Result<Option<Decision>, SuperviseError> {
        let tx = {
            let reg = self.registry.lock().await;
            let h = reg
                .handles
                .get(name)
                .ok_or_else(|| SuperviseError::UnknownService {
                    service: name.to_string(),
                })?;
            h.tx.clone()
        };
        let (reply, rx) = oneshot::channel();
        send(
            &tx,
            name,
            Cmd::Restart {
                source,
                expect_pid: None,
                reply,
            },
            rx,
        )
        .await
    }

    /// Stop every service in reverse start order (SIGTERM, SIGKILL after the stop
    /// timeout), one after the other.
    pub async fn shutdown(&self) {
        let mut reg = self.registry.lock().await;
        for h in reg.handles.values_mut() {
            if let Some(task) = h.health.take() {
                task.abort();
            }
        }
        let order: Vec<String> = reg.order.iter().rev().cloned().collect();
        info!(services = order.len(), "stopping all services");
        for name in order {
            self.stop_one(&mut reg, &name).await;
        }
    }

    async fn start_one(&self, reg: &mut Registry, spec: ServiceSpec) {
        let name = spec.name.clone();
        let log = Arc::new(LogBuffer::new(self.shared.config.log_lines));
        let now = self.shared.clock.now();
        let mut policy = RestartState::new(spec.protection, self.shared.config.backoff);
        match self.shared.store.load(&name, now) {
            Ok(h) => policy.history = h,
            Err(err) => {
                warn!(svc = %name, %err, "restart budget unreadable; starting with an empty one")
            }
        }
        policy.restarts_total = self
            .shared
            .retired_totals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&name)
            .unwrap_or(0);
        let (tx, rx) = mpsc::channel(16);
        let (started_tx, started_rx) = oneshot::channel();
        let actor = Actor {
            shared: self.shared.clone(),
            spec: spec.clone(),
            log: log.clone(),
            policy,
            state: ServiceState::Stopped,
            since: now,
            last_exit: None,
            pid: None,
            started_at: None,
        };
        let task = tokio::spawn(actor.run(rx, started_tx));
        // Wait for the first spawn so that `after` orders the forks.
        let _ = started_rx.await;
        let health = spawn_health(&self.shared, &spec, tx.clone(), log.clone());
        reg.order.push(name.clone());
        reg.handles.insert(
            name,
            Handle {
                spec,
                tx,
                task,
                health,
                log,
            },
        );
    }

    async fn stop_one(&self, reg: &mut Registry, name: &str) {
        reg.order.retain(|n| n != name);
        let Some(mut h) = reg.handles.remove(name) else {
            return;
        };
        if let Some(task) = h.health.take() {
            task.abort();
        }
        let (reply, rx) = oneshot::channel();
        if h.tx.send(Cmd::Stop { reply }).await.is_ok() {
            let _ = rx.await;
        }
        if let Err(err) = h.task.await {
            error!(svc = %name, %err, "service task failed");
        }
    }
}

async fn send<T>(
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

enum Cmd {
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

struct Running {
    pid: u32,
    started_at: u64,
    exited: BoxFuture<'static, ExitInfo>,
}

/// Timers and the child of one actor; kept apart from `Actor` so `select!` can
/// borrow them independently.
#[derive(Default)]
struct Slots {
    child: Option<Running>,
    backoff_until: Option<Instant>,
    running_at: Option<Instant>,
    cron_at: Option<Instant>,
}

struct Actor {
    shared: Arc<Shared>,
    spec: ServiceSpec,
    log: Arc<LogBuffer>,
    policy: RestartState,
    state: ServiceState,
    since: u64,
    last_exit: Option<ExitInfo>,
    pid: Option<u32>,
    started_at: Option<u64>,
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
    fn name(&self) -> &str {
        &self.spec.name
    }

    fn cron_deadline(&self) -> Option<Instant> {
        self.spec
            .scheduled_restart_minutes
            .map(|m| Instant::now() + self.shared.config.duration(u64::from(m) * 60))
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

    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>, started: oneshot::Sender<()>) {
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
                _ = sleep_opt(slots.cron_at) => {
                    slots.cron_at = self.cron_deadline();
                    let name = self.name().to_string();
                    info!(svc = %name, "=== Cron Restart Triggered: {name} ===");
                    let outcome = match self.gated_restart(&mut slots, Event::Cron, None).await {
                        Some(Decision::Restart { .. }) => "Service restarted",
                        _ => "Restart skipped (protection active)",
                    };
                    info!(svc = %name, "=== Cron Restart Complete: {outcome} ===");
                }
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
    async fn gated_restart(
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

fn spawn_health(
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

    fn spec(name: &str, after: &[&str]) -> ServiceSpec {
        let mut s = ServiceSpec::new(name, vec![format!("/usr/bin/{name}")]);
        s.after = after.iter().map(|a| a.to_string()).collect();
        s
    }

    fn current(specs: &[ServiceSpec]) -> (BTreeMap<String, ServiceSpec>, Vec<String>) {
        (
            specs.iter().map(|s| (s.name.clone(), s.clone())).collect(),
            specs.iter().map(|s| s.name.clone()).collect(),
        )
    }

    #[test]
    fn plan_orders_dependencies_and_stops_in_reverse() {
        let desired = vec![
            spec("c", &["b"]),
            spec("b", &["a"]),
            spec("a", &[]),
            spec("d", &[]),
        ];
        let ops = plan(&BTreeMap::new(), &[], &desired, &BTreeSet::new()).expect("plan");
        let starts: Vec<Op> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| Op::Start(n.to_string()))
            .collect();
        assert_eq!(ops, starts);

        let (cur, order) = current(&[spec("a", &[]), spec("b", &[]), spec("c", &[])]);
        let ops = plan(&cur, &order, &[spec("b", &[])], &BTreeSet::new()).expect("plan");
        assert_eq!(ops, vec![Op::Stop("c".into()), Op::Stop("a".into())]);
    }

    #[test]
    fn plan_touches_only_what_changed() {
        let mut a = spec("a", &[]);
        a.config_files = vec!["/etc/a.conf".into()];
        let mut m = spec("mihomo", &[]);
        m.reload = ReloadStrategy::Sighup;
        m.config_files = vec!["/etc/mihomo.yaml".into()];
        let mut f = spec("frr", &[]);
        f.reload = ReloadStrategy::FrrReload;
        f.config_files = vec!["/etc/frr/frr.conf".into()];
        let (cur, order) = current(&[a.clone(), m.clone(), f.clone(), spec("same", &[])]);

        let mut a2 = a.clone();
        a2.argv.push("--verbose".into());
        let mut same2 = spec("same", &[]);
        same2.scheduled_restart_minutes = Some(60);
        let changed: BTreeSet<String> = [
            "/etc/mihomo.yaml".to_string(),
            "/etc/frr/frr.conf".to_string(),
        ]
        .into();
        let ops = plan(&cur, &order, &[a2, m, f, same2], &changed).expect("plan");
        assert_eq!(
            ops,
            vec![
                Op::Replace("a".into()),
                Op::Reload("mihomo".into(), ReloadStrategy::Sighup),
                Op::Reload("frr".into(), ReloadStrategy::FrrReload),
                Op::Update("same".into()),
            ]
        );
    }

    #[test]
    fn invalid_lists_are_rejected() {
        let cycle = vec![spec("a", &["b"]), spec("b", &["a"])];
        assert!(matches!(
            validate(&cycle),
            Err(SuperviseError::DependencyCycle { .. })
        ));
        let missing = vec![spec("a", &["zzz"])];
        assert!(matches!(
            validate(&missing),
            Err(SuperviseError::UnknownDependency { .. })
        ));
        let dup = vec![spec("a", &[]), spec("a", &[])];
        assert!(matches!(
            validate(&dup),
            Err(SuperviseError::DuplicateService { .. })
        ));
        let bad_name = vec![spec("../etc", &[])];
        assert!(matches!(
            validate(&bad_name),
            Err(SuperviseError::InvalidSpec { field: "name", .. })
        ));
        let mut caps = spec("a", &[]);
        caps.caps = vec!["CAP_FLY".into()];
        assert!(matches!(
            validate(&[caps]),
            Err(SuperviseError::InvalidSpec { field: "caps", .. })
        ));
        let mut cron = spec("a", &[]);
        cron.scheduled_restart_minutes = Some(5);
        assert!(validate(&[cron]).is_err());
        let empty = ServiceSpec::new("a", vec![]);
        assert!(validate(&[empty]).is_err());
    }

    /// `restarts_total` counts every restart path (manual, exit), survives the rolling
    /// hour and a stop/start of the service, while `restarts_last_hour` goes back down.
    #[tokio::test(start_paused = true)]
    async fn restarts_total_only_goes_up() {
        use crate::supervise::{ExitInfo, FakeClock, FakeSpawner};
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = FakeSpawner::new();
        let sup = Supervisor::new(
            Arc::new(fake.clone()),
            Arc::new(FakeClock::new(1_800_000_000)),
            SupervisorConfig::new(dir.path()),
        );
        let counts = |sup: &Supervisor| {
            sup.status()
                .into_iter()
                .find(|s| s.name == "svc")
                .map(|s| (s.restarts_total, s.restarts_last_hour))
        };
        sup.apply(vec![spec("svc", &[])], &BTreeSet::new())
            .await
            .expect("apply");
        assert_eq!(counts(&sup), Some((0, 0)));
        for _ in 0..3 {
            sup.restart("svc", RestartSource::Manual)
                .await
                .expect("restart");
        }
        assert_eq!(counts(&sup), Some((3, 3)));

        // The window moves past those three; the total does not.
        tokio::time::advance(Duration::from_secs(3700)).await;
        sup.restart("svc", RestartSource::Manual)
            .await
            .expect("restart");
        assert_eq!(counts(&sup), Some((4, 1)));

        // An exit restart (after its backoff) counts too.
        let mut rx = sup.watch_status();
        assert!(fake.exit("svc", ExitInfo::Code(1)));
        tokio::time::timeout(
            Duration::from_secs(30),
            rx.wait_for(|m| m.get("svc").is_some_and(|s| s.restarts_total == 5)),
        )
        .await
        .expect("exit restart within its backoff")
        .expect("status channel");
        assert_eq!(counts(&sup), Some((5, 2)));

        // Removed and added again: the counter picks up where it was.
        sup.apply(Vec::new(), &BTreeSet::new())
            .await
            .expect("apply");
        assert_eq!(counts(&sup), None);
        sup.apply(vec![spec("svc", &[])], &BTreeSet::new())
            .await
            .expect("apply");
        assert_eq!(counts(&sup), Some((5, 2)));
    }

    /// The scheduled-restart timer itself (not `restart(Cron)`), on a 600 ms minute:
    /// a restart every 10 minutes (6 s) until the sixth in the hour is denied by the
    /// budget, measured on the scaled clock. `tests/gateway_cron.rs` shows the same
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
