//! Glue between the Clash orchestration (`crate::clash`), the supervisor, the data
//! plane and the DNS frontend: the TPROXY gate is the data plane's desired state, the
//! health sink feeds the status keys and the DNS chain, and the startup chain holds
//! MosDNS back until its rule files are in place (DESIGN §9). Next to the monitor, a
//! poller keeps mihomo's traffic totals in `Shared` for the node API.

use super::Shared;
use crate::clash::api::{MihomoApi, PROBE_TIMEOUT};
use crate::clash::chain::{self, ChainConfig, ChainDeps};
use crate::clash::liveness::{self, LivenessConfig};
use crate::clash::monitor::{
    ClashHealthSink, ClashMonitor, GateError, HealthStatus, MonitorConfig, MonitorHandle, Phase,
    ProcessEvent, TproxyGate,
};
use crate::clash::rules::{self, Fetcher, Purpose, Route, RuleFile, RulesError, RulesReport};
use crate::clash::subscription::{
    refresh_loop, RefreshOutcome, ReloadTarget, SubscriptionStore, VerifyPolicy,
};
use crate::dns::ChainState;
use crate::etcd::status::{unix_now, StateLine, StatusKey, StatusUpdate};
use crate::reconcile::Trigger;
use crate::supervise::{EventKind, RestartSource};
use meduza_generators::plan::service::ServiceSpec;
use meduza_generators::plan::tproxy::TproxyPlan;
use meduza_generators::render::{ClashRuntime, MosdnsRuntime};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

const MIHOMO_SERVICE: &str = "mihomo";
/// How often mihomo's traffic totals are read for `/v1/stats` and `/metrics`.
const TRAFFIC_POLL: Duration = Duration::from_secs(2);
/// Timeout of one read: `GET /connections` lists every open connection, so its reply
/// is larger than a health probe's; still under [`TRAFFIC_POLL`] so reads never pile up.
const TRAFFIC_TIMEOUT: Duration = Duration::from_millis(1500);
/// Retry period of a rule-file round that left a file missing.
const RULES_RETRY: Duration = Duration::from_secs(60);

/// Test knob: how many milliseconds one configured minute of `clash/refresh/
/// interval_minutes` and `mosdns/refresh` lasts (read once when `meduza run` starts;
/// docs/clash.md). Validation keeps those keys at 5 minutes or more; tests shorten the
/// minute instead.
pub const MINUTE_MS_ENV: &str = "MEDUZA_MINUTE_MS";

/// One configured minute: 60 s, or `MEDUZA_MINUTE_MS` milliseconds (1..=60000).
pub fn minute_from(value: Option<&str>) -> Result<Duration, String> {
    match value.map(str::trim) {
        None | Some("") => Ok(Duration::from_secs(60)),
        Some(v) => match v.parse::<u64>() {
            Ok(ms @ 1..=60_000) => Ok(Duration::from_millis(ms)),
            _ => Err(format!(
                "{MINUTE_MS_ENV}={v:?}: must be milliseconds from 1 to 60000"
            )),
        },
    }
}

/// How long the gate waits for the data-plane task's pass (an `nft` run and a few
/// netlink calls; seconds under software emulation).
const GATE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TPROXY switch: `apply` installs the cached plan through the data-plane task
/// (which also repairs drift); `remove` clears it. Both return once the kernel is
/// there, so `/updated/<id>/tproxy = applied` means the table is present.
#[derive(Clone)]
pub struct DataplaneGate {
    shared: Arc<Shared>,
    plan: Arc<Mutex<Option<TproxyPlan>>>,
}

impl TproxyGate for DataplaneGate {
    async fn apply(&self) -> Result<(), GateError> {
        let plan = self.plan.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match plan {
            Some(plan) => self
                .shared
                .dataplane
                .set_and_wait(Some(plan), GATE_TIMEOUT)
                .await
                .map_err(|e| GateError::Apply(e.to_string())),
            None => Err(GateError::Apply("no TPROXY plan cached".into())),
        }
    }

    async fn remove(&self) -> Result<(), GateError> {
        // In fake-ip mode the fake ranges stay rejected while mihomo is out.
        let down = self
            .plan
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(TproxyPlan::while_down);
        self.shared
            .dataplane
            .set_and_wait(down, GATE_TIMEOUT)
            .await
            .map_err(|e| GateError::Remove(e.to_string()))
    }
}

/// Health goes to the status keys and the DNS chain (mihomo's DNS only while healthy).
#[derive(Clone)]
pub struct Sink {
    shared: Arc<Shared>,
}

impl ClashHealthSink for Sink {
    fn health(&self, status: &HealthStatus) {
        self.shared
            .publisher
            .publish(StatusUpdate::ClashHealth(health_line(status, unix_now())));
        self.shared
            .clash_healthy
            .store(status.phase == Phase::Healthy, Ordering::SeqCst);
        *self
            .shared
            .clash_status
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(status.clone());
        update_dns_chain(&self.shared);
    }

    fn tproxy(&self, applied: bool, reason: &str) {
        let state = if applied { "applied" } else { "removed" };
        self.shared.set_tproxy(state, reason);
    }
}

/// The `clash/health` line of a health status at `ts` (also what `/v1/status` shows).
pub fn health_line(status: &HealthStatus, ts: u64) -> StateLine {
    StateLine::new(status.phase.as_str(), ts, status.reason.clone())
}

/// Tell the DNS frontend which local resolvers may be used right now.
pub fn update_dns_chain(shared: &Shared) {
    let mosdns_running = shared
        .supervisor
        .status()
        .iter()
        .any(|s| s.name == "mosdns" && s.state == crate::supervise::ServiceState::Running);
    shared.dns.set_chain_state(ChainState {
        mosdns_running,
        clash_healthy: shared.clash_healthy.load(Ordering::SeqCst),
    });
}

struct RunningMonitor {
    key: (String, String, bool),
    handle: MonitorHandle,
    task: JoinHandle<()>,
    forward: JoinHandle<()>,
    /// [`poll_traffic`]: starts and stops with the monitor.
    traffic: Option<JoinHandle<()>>,
}

/// Read mihomo's `GET /connections` totals every [`TRAFFIC_POLL`] into
/// `Shared::mihomo_traffic`, so the node API answers from memory and never waits on
/// mihomo. A failed read keeps the last value (the monitor reports mihomo's health).
async fn poll_traffic(api: MihomoApi, shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(TRAFFIC_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match api.totals().await {
            Ok(totals) => {
                shared
                    .mihomo_traffic
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .observe(totals);
            }
            Err(err) => debug!(%err, "[clash] traffic totals not read"),
        }
    }
}

struct RunningChain {
    key: String,
    task: JoinHandle<()>,
}

/// Owns the monitor, the startup chain and the rule refresh of one node.
pub struct ClashOrchestrator {
    shared: Arc<Shared>,
    root: PathBuf,
    triggers: mpsc::Sender<Trigger>,
    plan: Arc<Mutex<Option<TproxyPlan>>>,
    monitor: Option<RunningMonitor>,
    chain: Option<RunningChain>,
    mosdns_released: Arc<AtomicBool>,
    mosdns_spec: Option<ServiceSpec>,
    /// The subscription refresh task and what it was started for.
    refresh: Option<(String, JoinHandle<()>)>,
    /// The active delay tests of the nodes in use, keyed by what they run with.
    liveness: Option<(String, JoinHandle<()>)>,
    /// One configured minute of the refresh intervals ([`minute_from`]).
    minute: Duration,
}

/// SIGHUP to the running mihomo (the supervisor knows its pid): the fallback of a
/// hot reload through the API.
struct SupervisorSignaller {
    shared: Arc<Shared>,
}

impl crate::clash::subscription::Signaller for SupervisorSignaller {
    async fn sighup(&self) -> Result<(), String> {
        let pid = self
            .shared
            .supervisor
            .status()
            .into_iter()
            .find(|s| s.name == MIHOMO_SERVICE)
            .and_then(|s| s.pid)
            .ok_or("mihomo is not running")?;
        let pid = i32::try_from(pid).map_err(|e| e.to_string())?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        )
        .map_err(|e| e.to_string())
    }
}

impl ClashOrchestrator {
    /// `minute`: one minute of the refresh intervals ([`super::settings::minute`]).
    pub fn new(
        shared: Arc<Shared>,
        root: PathBuf,
        triggers: mpsc::Sender<Trigger>,
        minute: Duration,
    ) -> Self {
        Self {
            shared,
            root,
            triggers,
            plan: Arc::new(Mutex::new(None)),
            monitor: None,
            chain: None,
            mosdns_released: Arc::new(AtomicBool::new(false)),
            mosdns_spec: None,
            refresh: None,
            liveness: None,
            minute,
        }
    }

    /// MosDNS may run (its rule files are in place).
    pub fn mosdns_released(&self) -> bool {
        self.mosdns_released.load(Ordering::SeqCst)
    }

    pub fn set_mosdns_spec(&mut self, spec: Option<ServiceSpec>) {
        self.mosdns_spec = spec;
    }

    /// Converge on the rendered Clash/MosDNS settings and TPROXY plan.
    pub async fn apply(
        &mut self,
        clash: Option<ClashRuntime>,
        mosdns: Option<MosdnsRuntime>,
        tproxy: Option<TproxyPlan>,
    ) {
        // The cached plan: re-applied by the gate; pushed now if TPROXY is on.
        let was_configured = std::mem::replace(
            &mut *self.plan.lock().unwrap_or_else(|p| p.into_inner()),
            tproxy.clone(),
        )
        .is_some();
        if self.shared.dataplane.intercepting() {
            match &tproxy {
                Some(p) => {
                    if self.shared.dataplane.desired().as_ref() != Some(p) {
                        self.shared.dataplane.set(Some(p.clone()));
                    }
                }
                None => {
                    self.shared.dataplane.set(None);
                    self.shared.set_tproxy("removed", "TPROXY not configured");
                }
            }
        } else {
            // Removed: keep the fake-IP rejects (or no table) in step with the plan.
            let down = tproxy.as_ref().and_then(TproxyPlan::while_down);
            if self.shared.dataplane.desired() != down {
                self.shared.dataplane.set(down);
            }
            if tproxy.is_none() {
                self.shared.set_tproxy("removed", "TPROXY not configured");
            } else if !was_configured {
                // Newly configured (a later pass keeps the gate's own reason, such as
                // "mihomo exited"). With MosDNS the chain is strict: TPROXY is armed
                // only once MosDNS has its rule files and has started.
                let waiting = if mosdns.is_some() && clash.is_some() {
                    "waiting for the startup chain: mihomo healthy, MosDNS rule files, MosDNS started"
                } else {
                    "waiting for mihomo to be healthy"
                };
                self.shared.set_tproxy_reason("removed", waiting);
            }
        }

        match &clash {
            Some(rt) => {
                let key = (
                    rt.controller.to_string(),
                    rt.secret.clone(),
                    tproxy.is_some(),
                );
                if self.monitor.as_ref().map(|m| &m.key) != Some(&key) {
                    self.stop_monitor().await;
                    self.start_monitor(rt, key);
                }
            }
            None => {
                if self.monitor.is_some() {
                    self.stop_monitor().await;
                }
                // mihomo is stopped with Clash: its totals go into the base, and
                // `/v1/stats` and `/metrics` show no mihomo entries until it is back.
                self.shared
                    .mihomo_traffic
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retire();
                self.shared.publisher.remove_key(&StatusKey::ClashHealth);
                self.shared.clash_healthy.store(false, Ordering::SeqCst);
                update_dns_chain(&self.shared);
            }
        }

        self.sync_refresh(clash.as_ref());
        self.sync_liveness(clash.as_ref());
        // A new monitor needs arming again: the chain restarts with it.
        let chain_key = format!(
            "{}|{}|{:?}|{:?}",
            clash.is_some(),
            tproxy.is_some(),
            mosdns.as_ref().map(|m| (&m.rule_files, m.refresh_minutes)),
            self.monitor.as_ref().map(|m| &m.key),
        );
        if self.chain.as_ref().map(|c| &c.key) != Some(&chain_key) {
            if let Some(c) = self.chain.take() {
                c.task.abort();
            }
            if mosdns.is_none() {
                self.mosdns_released.store(false, Ordering::SeqCst);
            }
            self.start_chain(chain_key, clash.is_some(), tproxy.is_some(), mosdns);
        }
    }

    /// Runs the active delay tests ([`liveness`]) while Clash is enabled; restarts them
    /// when the controller, the secret or `clash/health/*` change.
    fn sync_liveness(&mut self, clash: Option<&ClashRuntime>) {
        let want = clash.and_then(|rt| {
            let api = MihomoApi::new(&rt.controller.to_string(), &rt.secret, PROBE_TIMEOUT).ok()?;
            let cfg = LivenessConfig {
                test_url: rt.health.url.clone(),
                every: Duration::from_secs(rt.health.probe_interval_secs),
                timeout: Duration::from_millis(rt.health.timeout_ms),
            };
            let key = format!("{}|{}|{cfg:?}", rt.controller, rt.secret);
            Some((key, api, cfg))
        });
        let current = self.liveness.as_ref().map(|(k, _)| k.as_str());
        if current == want.as_ref().map(|(k, _, _)| k.as_str()) {
            return;
        }
        if let Some((_, task)) = self.liveness.take() {
            task.abort();
        }
        if let Some((key, api, cfg)) = want {
            info!(url = %cfg.test_url, every_s = cfg.every.as_secs(), timeout_ms = cfg.timeout.as_millis() as u64,
                "[clash] delay tests of the nodes in use started");
            self.liveness = Some((key, tokio::spawn(liveness::run(api, cfg))));
        }
    }

    fn start_monitor(&mut self, rt: &ClashRuntime, key: (String, String, bool)) {
        let api = match MihomoApi::new(&rt.controller.to_string(), &rt.secret, PROBE_TIMEOUT) {
            Ok(api) => api,
            Err(err) => {
                warn!(%err, "[clash] cannot build the mihomo API client");
                return;
            }
        };
        let cfg = MonitorConfig {
            manage_tproxy: key.2,
            ..MonitorConfig::default()
        };
        let (tx, rx) = mpsc::channel(64);
        let alive = self
            .shared
            .supervisor
            .status()
            .iter()
            .any(|s| s.name == MIHOMO_SERVICE && s.pid.is_some());
        let gate = DataplaneGate {
            shared: Arc::clone(&self.shared),
            plan: Arc::clone(&self.plan),
        };
        let sink = Sink {
            shared: Arc::clone(&self.shared),
        };
        let traffic = match MihomoApi::new(&rt.controller.to_string(), &rt.secret, TRAFFIC_TIMEOUT)
        {
            Ok(api) => Some(tokio::spawn(poll_traffic(api, Arc::clone(&self.shared)))),
            Err(err) => {
                warn!(%err, "[clash] cannot build the mihomo API client; no traffic totals");
                None
            }
        };
        let (monitor, handle) = ClashMonitor::new(cfg, api, gate, sink, rx, alive);
        let task = tokio::spawn(monitor.run());
        // mihomo's exits reach the monitor the moment the supervisor reaps it.
        let mut events = self.shared.supervisor.subscribe();
        let forward = tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(ev) if ev.name == MIHOMO_SERVICE => {
                        let pe = match ev.kind {
                            EventKind::Started { pid } => ProcessEvent::Started { pid },
                            EventKind::Exited { status, .. } => ProcessEvent::Exited {
                                detail: format!("{status:?}"),
                            },
                            _ => continue,
                        };
                        if tx.send(pe).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        info!(controller = %rt.controller, tproxy = key.2, "[clash] health monitor started");
        self.monitor = Some(RunningMonitor {
            key,
            handle,
            task,
            forward,
            traffic,
        });
    }

    /// Called before the supervisor gets a pass's services: when mihomo is about to be
    /// stopped (Clash disabled), TPROXY goes first and the monitor with it, so LAN
    /// traffic is never sent to a proxy that is going away and the exit is not taken
    /// for a crash.
    pub async fn before_services(&mut self, specs: &[ServiceSpec]) {
        if self.monitor.is_none() || specs.iter().any(|s| s.name == MIHOMO_SERVICE) {
            return;
        }
        self.stop_monitor_because("Clash disabled").await;
        let mut st = self.shared.dataplane.status();
        let removed = tokio::time::timeout(
            Duration::from_secs(3),
            st.wait_for(|s| s.converged && s.desired.is_none()),
        )
        .await;
        if removed.is_err() {
            warn!("[clash] TPROXY removal not confirmed before stopping mihomo");
        }
    }

    async fn stop_monitor(&mut self) {
        self.stop_monitor_because("clash monitor stopped").await;
    }

    async fn stop_monitor_because(&mut self, reason: &str) {
        if let Some(m) = self.monitor.take() {
            if let Some(traffic) = m.traffic {
                // Awaited: no reading may land after `retire` (Clash disabled).
                traffic.abort();
                let _ = traffic.await;
            }
            m.handle.disarm(reason).await;
            m.handle.shutdown().await;
            m.forward.abort();
            let _ = tokio::time::timeout(Duration::from_secs(5), m.task).await;
        }
    }

    fn start_chain(
        &mut self,
        key: String,
        clash: bool,
        tproxy: bool,
        mosdns: Option<MosdnsRuntime>,
    ) {
        let cfg = ChainConfig::new(clash, tproxy, mosdns.is_some());
        let steps = chain::plan(&cfg);
        let deps = Deps {
            shared: Arc::clone(&self.shared),
            monitor: self.monitor.as_ref().map(|m| m.handle.clone()),
            root: self.root.clone(),
            files: mosdns
                .as_ref()
                .map(|m| {
                    m.rule_files
                        .iter()
                        .map(|(path, url)| RuleFile {
                            path: path.clone(),
                            url: url.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            released: Arc::clone(&self.mosdns_released),
            triggers: self.triggers.clone(),
        };
        let refresh = mosdns.as_ref().map(|m| self.minute * m.refresh_minutes);
        let route = if clash {
            Route::Proxy {
                url: cfg.proxy_url.clone(),
            }
        } else {
            Route::Direct
        };
        let task = tokio::spawn(async move {
            chain::run_chain(&deps, &steps, RULES_RETRY).await;
            if let Some(every) = refresh {
                chain::refresh_rules_loop(&deps, route, every).await;
            }
        });
        self.chain = Some(RunningChain { key, task });
    }

    /// Subscription refresh every `refresh/interval_minutes` (DESIGN §9): download
    /// through mihomo while it is healthy (directly otherwise), validate, keep the last
    /// good copy in mihomo's provider file, and hot-reload mihomo when it changed
    /// (`PUT /configs`, verified, SIGHUP as fallback). Each round's outcome is published
    /// at `/updated/<id>/clash/subscription`. The task follows the monitor (whose health
    /// channel it reads): a new monitor means a new task.
    fn sync_refresh(&mut self, clash: Option<&ClashRuntime>) {
        let wanted = clash.and_then(|rt| {
            let (_, url) = rt.subscription.clone()?;
            let minutes = rt.refresh_minutes?;
            let monitor = self.monitor.as_ref()?;
            let key = format!(
                "{url}|{minutes}|{}|{}|{}|{}|{:?}",
                rt.provider_path, rt.config_path, rt.controller, rt.secret, monitor.key
            );
            Some((key, rt.clone(), url, minutes, monitor.handle.health()))
        });
        let key = wanted.as_ref().map(|w| w.0.clone());
        let running = self
            .refresh
            .as_ref()
            .filter(|(_, task)| !task.is_finished())
            .map(|(k, _)| k);
        if key.is_some() && running == key.as_ref() {
            return;
        }
        if let Some((_, task)) = self.refresh.take() {
            task.abort();
        }
        let Some((key, rt, url, minutes, health)) = wanted else {
            self.shared
                .publisher
                .remove_key(&StatusKey::ClashSubscription);
            return;
        };
        let api = match MihomoApi::new(&rt.controller.to_string(), &rt.secret, PROBE_TIMEOUT) {
            Ok(api) => api,
            Err(err) => {
                warn!(%err, "[clash-refresh] cannot build the mihomo API client; no refresh");
                return;
            }
        };
        let target = ReloadTarget {
            api,
            signaller: SupervisorSignaller {
                shared: Arc::clone(&self.shared),
            },
            config_path: self.root.join(rt.config_path.trim_start_matches('/')),
            policy: VerifyPolicy::default(),
        };
        let store =
            SubscriptionStore::new(self.root.join(rt.provider_path.trim_start_matches('/')));
        let interval = self.minute * minutes;
        info!(%url, interval_ms = interval.as_millis() as u64, "[clash-refresh] subscription refresh scheduled");
        let shared = Arc::clone(&self.shared);
        let task = tokio::spawn(refresh_loop(
            Fetcher {
                purpose: Purpose::Subscription,
                ..Fetcher::default()
            },
            store,
            url,
            interval,
            health,
            target,
            move |outcome: &RefreshOutcome| {
                shared
                    .publisher
                    .publish(StatusUpdate::ClashSubscription(outcome.status(unix_now())));
            },
        ));
        self.refresh = Some((key, task));
    }

    pub async fn shutdown(&mut self) {
        if let Some((_, task)) = self.refresh.take() {
            task.abort();
        }
        self.sync_liveness(None);
        if let Some(c) = self.chain.take() {
            c.task.abort();
        }
        self.stop_monitor().await;
    }
}

struct Deps {
    shared: Arc<Shared>,
    monitor: Option<MonitorHandle>,
    root: PathBuf,
    files: Vec<RuleFile>,
    released: Arc<AtomicBool>,
    triggers: mpsc::Sender<Trigger>,
}

impl ChainDeps for Deps {
    async fn dns_up(&self) {
        // The frontend is started before the first pass; nothing to wait for.
    }

    async fn mihomo_healthy(&self) {
        if let Some(m) = &self.monitor {
            m.wait_healthy().await;
        }
    }

    async fn download_rules(&self, route: &Route) -> Result<RulesReport, RulesError> {
        rules::download_rule_files(
            &Fetcher::default(),
            &self.root,
            "/etc/mosdns",
            &self.files,
            route,
        )
        .await
    }

    async fn start_mosdns(&self) -> Result<(), String> {
        self.released.store(true, Ordering::SeqCst);
        // The next pass hands MosDNS to the supervisor with the other services.
        self.triggers
            .send(Trigger::Resync)
            .await
            .map_err(|_| "reconciler stopped".to_string())
    }

    async fn restart_mosdns(&self) -> Result<(), String> {
        self.shared
            .supervisor
            .restart("mosdns", RestartSource::Manual)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn arm_tproxy(&self) {
        if let Some(m) = &self.monitor {
            m.arm().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minute_knob() {
        assert_eq!(minute_from(None), Ok(Duration::from_secs(60)));
        assert_eq!(minute_from(Some("")), Ok(Duration::from_secs(60)));
        assert_eq!(minute_from(Some("200")), Ok(Duration::from_millis(200)));
        assert_eq!(minute_from(Some(" 60000 ")), Ok(Duration::from_secs(60)));
        for bad in ["0", "60001", "-5", "1.5", "fast"] {
            let err = minute_from(Some(bad)).expect_err(bad);
            assert!(err.starts_with("MEDUZA_MINUTE_MS="), "{err}");
        }
    }
}
