//! The runtime supervisor: `apply` of a desired list, and the registry of the
//! per-service actors it starts.
//!
//! Owns: executing the plan of `apply` ([`plan`](super::plan::plan)) in order, the
//! reload strategy of a changed config file (SIGHUP, FRR reload, or restart), manual
//! restarts, the start order and shutdown in reverse start order, and the status map
//! and event broadcast callers subscribe to.
//! Must not: decide restarts (the actor does, through the policy), fork or signal
//! directly (the `Spawner` does), read the wall clock directly (the `Clock` does), or
//! run FRR's reload command (the `FrrReloader` does).

use super::actor::{send, Actor, Cmd, Shared};
use super::clock::{Clock, ScaledClock};
use super::config::{FrrReloader, NoFrrReloader, SupervisorConfig};
use super::logbuf::LogBuffer;
use super::loops::spawn_health;
use super::plan::{plan, Op};
use super::policy::{Decision, RestartSource, RestartState};
use super::spawn::Spawner;
use super::state_file::StateStore;
use super::status::{ServiceEvent, ServiceState, ServiceStatus};
use super::SuperviseError;
use meduza_generators::plan::service::{ReloadStrategy, ServiceSpec};
use nix::sys::signal::Signal;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

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

    /// Status of every service, updated on each change (the daemon publishes each to
    /// `/updated/<id>/services/<svc>/status`, format owned by `etcd::status`).
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervise::plan::tests::spec;

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
}
