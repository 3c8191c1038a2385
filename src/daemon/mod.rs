//! `meduza run`: the composition root of the gateway agent.
//!
//! Owns: starting every runtime part in order (subreaper, supervisor, status
//! publisher, DNS frontend, data plane, node API, etcd watcher, reconciler), wiring
//! their channels together, and the orderly shutdown on SIGTERM/SIGINT (TPROXY removed
//! first so traffic is never black-holed, then children stopped in reverse start
//! order, then the online lease revoked). Must not: contain the logic of any part;
//! each lives in its own module and is only connected here.

pub mod clash;
pub mod effects;
pub mod settings;
pub mod view;
pub mod vpnstatus;

use crate::boot::{Dataplane, Settings, Tool};
use crate::dataplane::task::netlink_triggers;
use crate::dataplane::wireguard::{status_of, AutoWg, LinkOps, WgBackend as _, WgManager};
use crate::dataplane::{spawn_task, DataplaneHandle, NetlinkNft, SystemDataplane};
use crate::dns::{DnsConfig, DnsHandle};
use crate::etcd::status::{
    unix_now, ErrorEntry, PublisherConfig, StateLine, StatusKey, StatusUpdate, FAILOVER_LOG_MAX,
};
use crate::etcd::{
    load_config, spawn_watcher, EtcdConfig, EtcdKv, Kv, StatusPublisher, WatchEvent, WatcherConfig,
};
use crate::files::{write_atomic, RootFs};
use crate::reconcile::{rollback, ConfigSource, Reconciler, SourceError, Trigger};
use crate::supervise::frr::FrrControl;
use crate::supervise::{reaper, RealSpawner, Supervisor, SystemClock};
use anyhow::Context as _;
use meduza_generators::model::{default_upstreams, parse_hostname};
use meduza_generators::plan::dns::DnsPlan;
use meduza_generators::plan::wireguard::WgDevice;
use meduza_generators::Snapshot;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

pub use settings::RunArgs;

/// The `nft` that lists table `inet meduza` (looked up in the children's `PATH`):
/// `MEDUZA_BIN_NFT` is not a setting of `meduza run` (DESIGN §2 lists no such tool).
const DEFAULT_NFT: &str = "nft";

/// Resolved settings of one gateway agent, as typed values: nothing below `main`
/// reads them from the process environment (see [`settings`]).
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub node_id: String,
    /// Carries `ETCD_USER`/`ETCD_PASS` (its `Debug` redacts the password).
    pub etcd: EtcdConfig,
    pub root: PathBuf,
    pub state_dir: PathBuf,
    pub api_listen: SocketAddr,
    /// Loaded from `MEDUZA_API_TLS_CERT` / `MEDUZA_API_TLS_KEY` (they win over etcd's
    /// keys).
    pub api_tls_files: Option<crate::tls::ServerIdentity>,
    pub dns: DnsConfig,
    pub lease_ttl: i64,
    /// `MEDUZA_DATAPLANE`.
    pub dataplane: Dataplane,
    /// `DEFAULT_GW`.
    pub default_gw: Option<IpAddr>,
    /// Child programs set explicitly (`MEDUZA_BIN_*`); the others keep their defaults.
    pub bins: BTreeMap<Tool, PathBuf>,
    /// `MEDUZA_WATCHDOG` (`None`: off) and `MEDUZA_WATCHDOG_TIMEOUT`, seconds.
    pub watchdog: Option<PathBuf>,
    pub watchdog_timeout: u32,
    /// `resolv_conf`: the resolver file kept pointing at the DNS frontend, and its
    /// content ([`crate::dns::resolv::render`]); `None`: left alone.
    pub resolv_conf: Option<(PathBuf, String)>,
}

impl RunConfig {
    /// From the resolved settings (see [`settings::prepare`]).
    pub fn from_settings(s: &Settings, lease_ttl: i64) -> anyhow::Result<Self> {
        meduza_generators::parse::validate_name(&s.node_id)
            .map_err(|r| anyhow::anyhow!("NODE_ID {:?}: {r}", s.node_id))?;
        let etcd = EtcdConfig::build(
            &s.etcd_endpoints.join(","),
            s.etcd_ca.clone(),
            s.etcd_cert.clone(),
            s.etcd_key.clone(),
            s.etcd_user.clone(),
            s.etcd_pass.clone(),
        )?;
        let dns = DnsConfig {
            listen: s.dns_listen.clone(),
            ..DnsConfig::default()
        };
        Ok(Self {
            node_id: s.node_id.clone(),
            etcd,
            root: s.root.clone(),
            state_dir: s.state_dir.clone(),
            api_listen: s.api_listen,
            // A certificate file that cannot be loaded stops the start: serving the
            // API in plain HTTP instead would send tokens in clear to clients that
            // expect HTTPS.
            api_tls_files: match &s.api_tls_files {
                Some((cert, key)) => Some(crate::tls::server_identity_from_files(
                    "MEDUZA_API_TLS_CERT",
                    cert,
                    "MEDUZA_API_TLS_KEY",
                    key,
                )?),
                None => None,
            },
            dns,
            lease_ttl,
            dataplane: s.dataplane,
            default_gw: s.default_gw,
            bins: s.bins.clone(),
            watchdog: s.watchdog.clone(),
            watchdog_timeout: s.watchdog_timeout,
            resolv_conf: match &s.resolv_conf {
                Some(path) => Some((
                    path.clone(),
                    crate::dns::resolv::render(&s.dns_listen).map_err(anyhow::Error::msg)?,
                )),
                None => None,
            },
        })
    }

    /// The explicitly set path of `tool`, if any.
    fn bin(&self, tool: Tool) -> Option<&Path> {
        self.bins.get(&tool).map(PathBuf::as_path)
    }
}

/// Live state shared by the daemon's tasks (the reconciler's effects, the Clash glue,
/// the status publishers and the node API's view).
pub struct Shared {
    pub node_id: String,
    pub supervisor: Supervisor,
    pub dns: DnsHandle,
    pub dataplane: DataplaneHandle,
    pub wireguard: Option<WgManager<AutoWg>>,
    pub wg_devices: Mutex<Vec<WgDevice>>,
    pub publisher: StatusPublisher,
    pub metrics: Mutex<crate::api::types::ReconcileMetrics>,
    /// `/updated/<id>/errors` as last published.
    pub errors: Mutex<Vec<ErrorEntry>>,
    pub clash_healthy: AtomicBool,
    pub clash_status: Mutex<Option<crate::clash::monitor::HealthStatus>>,
    /// `/updated/<id>/tproxy` as last published.
    pub tproxy_status: Mutex<Option<StateLine>>,
    /// Revision of the newest `/commit` seen.
    pub commit_revision: Mutex<Option<i64>>,
    pub api_token: watch::Sender<Option<String>>,
    /// `/nodes/<id>/api/tls/{cert,key}` as the last pass rendered it.
    pub api_tls: watch::Sender<Option<meduza_generators::model::ApiTls>>,
    /// mihomo's traffic totals, written by the Clash glue's poller, read by the API.
    pub mihomo_traffic: Mutex<view::MihomoTraffic>,
}

impl Shared {
    /// Publish `/updated/<id>/tproxy` = `"applied|removed <ts> <reason>"` when the state
    /// changes (not on every pass): the first reason of a state is the one that
    /// caused it ("mihomo exited", "Clash disabled"), and later passes keep it.
    pub fn set_tproxy(&self, state: &str, reason: &str) {
        self.publish_tproxy(state, reason, false);
    }

    /// Like [`Shared::set_tproxy`], but a new reason replaces the old one in the same
    /// state (TPROXY newly configured: "not configured" becomes what it waits for).
    pub fn set_tproxy_reason(&self, state: &str, reason: &str) {
        self.publish_tproxy(state, reason, true);
    }

    fn publish_tproxy(&self, state: &str, reason: &str, new_reason_counts: bool) {
        let mut cur = self.tproxy_status.lock().unwrap_or_else(|p| p.into_inner());
        let unchanged = cur
            .as_ref()
            .is_some_and(|v| v.state == state && (!new_reason_counts || v.detail == reason));
        if unchanged {
            return;
        }
        let line = StateLine::new(state, unix_now(), reason);
        info!(state, reason, "tproxy");
        self.publisher.publish(StatusUpdate::Tproxy(line.clone()));
        *cur = Some(line);
    }
}

/// Snapshots from etcd, with `/commit`'s revision (also the newest one seen).
struct EtcdSource {
    kv: Arc<dyn Kv>,
    node_id: String,
    shared: Arc<Shared>,
    /// Set while a pass runs (the watchdog's reconciler probe): every pass begins by
    /// loading the snapshot, and `on_pass` clears it.
    pass: crate::watchdog::Busy,
}

impl ConfigSource for EtcdSource {
    /// The snapshot and `/commit`'s mod revision as of that snapshot (what
    /// `/updated/<id>/applied` reports, docs/etcd-schema.md), not the store revision,
    /// which every status write of every node moves.
    async fn load(&mut self) -> Result<(Snapshot, i64), SourceError> {
        self.pass.start();
        let (keys, commit) = load_config(&*self.kv, &self.node_id)
            .await
            .map_err(SourceError::unreachable)?;
        let mut seen = self
            .shared
            .commit_revision
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if commit > 0 && seen.is_none_or(|s| s < commit) {
            *seen = Some(commit);
        }
        Ok((Snapshot(keys), commit))
    }

    async fn probe(&mut self) -> Result<Option<i64>, SourceError> {
        let entry = self
            .kv
            .get(rollback::CONFIRMED_KEY)
            .await
            .map_err(SourceError::unreachable)?;
        Ok(entry.and_then(|e| rollback::parse_confirmed(&e.value)))
    }

    /// `/commit_confirm` counts only when written in `/commit`'s transaction.
    async fn commit_confirm(&mut self, revision: i64) -> Result<Option<u64>, SourceError> {
        let entry = self
            .kv
            .get(rollback::COMMIT_CONFIRM_KEY)
            .await
            .map_err(SourceError::unreachable)?;
        let Some(entry) = entry.filter(|e| e.mod_revision == revision) else {
            return Ok(None);
        };
        rollback::parse_commit_confirm(&entry.value)
            .map(Some)
            .map_err(|reason| SourceError::BadValue {
                key: rollback::COMMIT_CONFIRM_KEY,
                value: entry.value.clone(),
                reason,
            })
    }
}

/// The per-node Clash API secret used when etcd gives none: generated once and kept
/// in the state directory (0600), never a public default.
pub fn clash_secret(state_dir: &Path) -> anyhow::Result<String> {
    let path = state_dir.join("clash-secret");
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim().to_string();
        if s.len() >= 16 {
            return Ok(s);
        }
    }
    let bytes: [u8; 24] = rand::random();
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_atomic(&path, secret.as_bytes(), 0o600)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(secret)
}

/// Parse `/dns/hosts/` keys into the frontend's map (invalid entries are skipped:
/// they are reported by the reconcile pass's validation).
pub fn hosts_from_keys(keys: &BTreeMap<String, String>) -> BTreeMap<String, Vec<IpAddr>> {
    let mut out = BTreeMap::new();
    for (k, v) in keys {
        let Some(name) = k.strip_prefix("/dns/hosts/") else {
            continue;
        };
        let Ok(name) = parse_hostname(name) else {
            continue;
        };
        let addrs: Vec<IpAddr> = v.lines().filter_map(|l| l.trim().parse().ok()).collect();
        out.insert(name, addrs);
    }
    out
}

/// Run the gateway agent until SIGTERM/SIGINT.
pub async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    info!(node = %cfg.node_id, root = %cfg.root.display(), "meduza starting");
    if let Err(err) = reaper::become_subreaper() {
        warn!(%err, "cannot become child subreaper; orphans of children are reaped by init");
    }
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    // OpenVPN's management sockets live here (`/var/run/meduza` under the root).
    if let Some(dir) = vpnstatus::openvpn_socket(&cfg.root, "-").parent() {
        let _ = std::fs::create_dir_all(dir);
    }

    let spawner = RealSpawner::new();
    let _reaper = reaper::spawn(spawner.registry());
    let frr = Arc::new(FrrControl::new(
        &cfg.root,
        cfg.bin(Tool::Vtysh),
        cfg.bin(Tool::FrrReload),
    ));
    let minute = settings::minute();
    let supervisor = Supervisor::new(
        Arc::new(spawner),
        Arc::new(SystemClock),
        settings::supervisor_config(&cfg.state_dir, minute),
    )
    .with_frr_reloader(frr.clone());

    let kv: Arc<dyn Kv> = Arc::new(EtcdKv::new(cfg.etcd.clone()));
    let publisher = StatusPublisher::spawn(
        Arc::clone(&kv),
        &cfg.node_id,
        PublisherConfig {
            ttl_secs: cfg.lease_ttl,
            // Three keep-alives per TTL, whatever the TTL (15 s gives the default 5 s).
            keep_alive_interval: Duration::from_millis(
                u64::try_from(cfg.lease_ttl.max(1)).unwrap_or(15) * 1000 / 3,
            ),
            ..PublisherConfig::default()
        },
    );

    let initial_dns = DnsPlan {
        upstreams: default_upstreams(),
        ..DnsPlan::default()
    };
    let dns = crate::dns::start(cfg.dns.clone(), initial_dns).await?;
    info!(listen = ?dns.local_addrs(), "dns frontend up");

    let dp = SystemDataplane::system(
        cfg.dataplane == Dataplane::Off,
        NetlinkNft::new(DEFAULT_NFT),
    )?;
    let dataplane = spawn_task(Arc::new(dp), None, netlink_triggers()?);
    let wireguard = match LinkOps::new() {
        Ok(links) => {
            let wg_go = cfg.bin(Tool::WireguardGo).map(|p| p.as_os_str().to_owned());
            let backend = AutoWg::with_userspace_program(links.clone(), wg_go);
            Some(WgManager::new(backend, Some(links)))
        }
        Err(err) => {
            warn!(%err, "no rtnetlink: WireGuard devices cannot be managed");
            None
        }
    };

    let (token_tx, token_rx) = watch::channel(None);
    let (api_tls_tx, api_tls_rx) = watch::channel(None);
    let shared = Arc::new(Shared {
        node_id: cfg.node_id.clone(),
        supervisor,
        dns,
        dataplane,
        wireguard,
        wg_devices: Mutex::new(Vec::new()),
        publisher,
        metrics: Mutex::new(crate::api::types::ReconcileMetrics {
            duration: crate::api::types::Histogram::with_bounds(&[
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            ..Default::default()
        }),
        errors: Mutex::new(Vec::new()),
        clash_healthy: AtomicBool::new(false),
        clash_status: Mutex::new(None),
        tproxy_status: Mutex::new(None),
        commit_revision: Mutex::new(None),
        api_token: token_tx,
        api_tls: api_tls_tx,
        mihomo_traffic: Mutex::new(view::MihomoTraffic::default()),
    });
    shared.publisher.set_last("starting");

    let mut tasks = vec![
        tokio::spawn(publish_services(Arc::clone(&shared))),
        tokio::spawn(publish_dns(Arc::clone(&shared))),
        tokio::spawn(publish_links(Arc::clone(&shared), cfg.root.clone())),
        tokio::spawn(keep_frr_loaded(Arc::clone(&shared), Arc::clone(&frr))),
    ];
    if let Some((path, content)) = cfg.resolv_conf.clone() {
        tasks.push(tokio::spawn(crate::dns::resolv::keep(
            path,
            content,
            crate::dns::resolv::REPAIR_INTERVAL,
        )));
    }

    // Node API.
    let (stop_tx, stop_rx) = watch::channel(false);
    {
        let state = crate::api::ApiState::new(
            cfg.node_id.clone(),
            token_rx,
            Arc::new(view::DaemonView {
                shared: Arc::clone(&shared),
            }),
            Arc::new(view::KvStore {
                kv: Arc::clone(&kv),
            }),
            Arc::new(crate::api::stats::ProcNetDev::default()),
        );
        let mut stop = stop_rx.clone();
        let addr = cfg.api_listen;
        let (tls_tx, tls_rx) = watch::channel(None);
        let (tls_shared, tls_files) = (Arc::clone(&shared), cfg.api_tls_files.clone());
        // The certificate is followed by swapping the configuration each new connection
        // reads, not by rebinding: no window without a listener, open connections finish.
        tasks.push(tokio::spawn(async move {
            let node_id = tls_shared.node_id.clone();
            crate::api::follow_tls(&node_id, tls_files, api_tls_rx, tls_tx, |tls| {
                tls_shared.publisher.set_api_tls(tls)
            })
            .await
        }));
        tasks.push(tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(err) = crate::api::serve(addr, state, tls_rx, shutdown).await {
                warn!(%err, "node api stopped");
            }
        }));
    }

    // Reconciler, fed by the etcd watcher.
    let (trigger_tx, trigger_rx) = mpsc::channel(64);
    let secret = clash_secret(&cfg.state_dir)?;
    let env = crate::offline::render_env(cfg.default_gw, &cfg.bins, secret);
    let clash = clash::ClashOrchestrator::new(
        Arc::clone(&shared),
        cfg.root.clone(),
        trigger_tx.clone(),
        minute,
    );
    let effects =
        effects::DaemonEffects::new(Arc::clone(&shared), Arc::clone(&frr), clash, &cfg.root);
    let pass = crate::watchdog::Busy::default();
    let source = EtcdSource {
        kv: Arc::clone(&kv),
        node_id: cfg.node_id.clone(),
        shared: Arc::clone(&shared),
        pass: pass.clone(),
    };
    let fs = Arc::new(RootFs::new(&cfg.root));
    let reconciler = Reconciler::new(
        cfg.node_id.clone(),
        source,
        effects,
        fs.clone(),
        cfg.state_dir.clone(),
        env,
    );
    let metrics_shared = Arc::clone(&shared);
    let pass_done = pass.clone();
    let reconcile_task = tokio::spawn(reconciler.run_with(trigger_rx, move |report, took| {
        pass_done.done();
        let mut m = metrics_shared
            .metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        m.passes_total += 1;
        if !report.applied {
            m.failed_total += 1;
        }
        m.last_duration_seconds = Some(took.as_secs_f64());
        m.duration.observe(took.as_secs_f64());
    }));
    trigger_tx.send(Trigger::Boot).await.ok();
    let watchdog = cfg.watchdog.as_deref().and_then(|dev| {
        start_watchdog(
            dev,
            cfg.watchdog_timeout,
            &shared,
            pass,
            reconcile_task.abort_handle(),
            &mut tasks,
        )
    });

    // With several etcd members the watch checks its member twice a second, so a
    // frozen member is left within about 1.5 s (docs/etcd-client.md, "Failover").
    let (watcher, mut events) = spawn_watcher(
        Arc::clone(&kv),
        WatcherConfig::for_members(cfg.etcd.endpoints.len()),
        0,
    );
    {
        let shared = Arc::clone(&shared);
        let kv = Arc::clone(&kv);
        let root = cfg.root.clone();
        let triggers = trigger_tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(ev) = events.recv().await {
                match ev {
                    WatchEvent::Commit { revision, .. } => {
                        *shared
                            .commit_revision
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()) = Some(revision);
                        let _ = triggers.send(Trigger::Commit(revision)).await;
                    }
                    WatchEvent::Hosts { .. } => refresh_hosts(&shared, &*kv, &root).await,
                    WatchEvent::Resync { reason, .. } => {
                        info!(%reason, "etcd resync");
                        refresh_hosts(&shared, &*kv, &root).await;
                        let _ = triggers.send(Trigger::Resync).await;
                    }
                    WatchEvent::Tick => {
                        let _ = triggers.send(Trigger::Periodic).await;
                    }
                }
            }
        }));
    }

    wait_for_signal().await;
    info!("shutdown requested");
    if let Some(w) = &watchdog {
        w.stopping();
    }
    drop(watcher);
    reconcile_task.abort();
    let _ = reconcile_task.await;
    let _ = stop_tx.send(true);
    // TPROXY first: once mihomo stops, intercepted traffic would have nowhere to go.
    match shared
        .dataplane
        .set_and_wait(None, Duration::from_secs(3))
        .await
    {
        Ok(()) => shared.set_tproxy("removed", "meduza stopping"),
        Err(err) => warn!(%err, "TPROXY not removed before stopping the children"),
    }
    shared.supervisor.shutdown().await;
    // The children's final state goes out with the last flush: publish_services is
    // aborted below and may not have seen it yet.
    for st in shared.supervisor.status() {
        shared.publisher.publish(service_update(&st));
    }
    shared.publisher.set_last("stopped");
    for t in &tasks {
        t.abort();
    }
    // Last flush and lease revoked: `online` disappears now, not after its TTL.
    if tokio::time::timeout(Duration::from_secs(3), shared.publisher.close())
        .await
        .is_err()
    {
        warn!("status not flushed within 3 s; online expires with its lease");
    }
    if let Some(w) = watchdog {
        w.close();
    }
    info!("meduza stopped");
    Ok(())
}

/// Arm the watchdog at `dev` and start the probes whose heartbeats earn its pets
/// (docs/operations.md, "Watchdog"); the probe tasks join `tasks`.
fn start_watchdog(
    dev: &Path,
    timeout: u32,
    shared: &Arc<Shared>,
    pass: crate::watchdog::Busy,
    reconciler: tokio::task::AbortHandle,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Option<crate::watchdog::Watchdog> {
    use crate::watchdog::{self as wd, Heartbeats};
    let hb = Heartbeats::default();
    tasks.push(wd::spawn_tick(hb.main_loop.clone()));
    tasks.push(wd::spawn_probe(
        hb.reconciler.clone(),
        wd::RECONCILE_PASS_MAX,
        move || {
            let ok = !reconciler.is_finished()
                && pass.responsive(std::time::Instant::now(), wd::RECONCILE_PASS_MAX);
            async move { ok }
        },
    ));
    let sup = Arc::clone(shared);
    tasks.push(wd::spawn_probe(
        hb.supervisor.clone(),
        wd::SUPERVISOR_BUSY_MAX,
        move || {
            let sup = Arc::clone(&sup);
            async move {
                sup.supervisor.start_order().await;
                true
            }
        },
    ));
    wd::start(dev, timeout, hb)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers; running until killed");
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Re-read `/dns/hosts/`, update the frontend at once and rewrite `/etc/etcd_hosts`
/// only when its content changed.
async fn refresh_hosts(shared: &Shared, kv: &dyn Kv, root: &Path) {
    match kv.get_prefix("/dns/hosts/").await {
        Ok((keys, _)) => {
            let hosts = hosts_from_keys(&keys);
            shared.dns.set_hosts(hosts.clone());
            let fs = RootFs::new(root);
            match fs.resolve("/etc/etcd_hosts") {
                Ok(path) => {
                    if let Err(err) = crate::dns::write_hosts_file_if_changed(&path, &hosts) {
                        warn!(%err, "writing /etc/etcd_hosts failed");
                    }
                }
                Err(err) => warn!(%err, "bad hosts path"),
            }
        }
        Err(err) => warn!(%err, "reading /dns/hosts/ failed"),
    }
}

/// `services/<svc>/status`: the service's state and when it entered it.
fn service_update(st: &crate::supervise::ServiceStatus) -> StatusUpdate {
    StatusUpdate::Service {
        name: st.name.clone(),
        state: st.state.to_string(),
        since: st.since,
    }
}

/// `/updated/<id>/services/<svc>/status` follows the supervisor.
async fn publish_services(shared: Arc<Shared>) {
    let mut rx = shared.supervisor.watch_status();
    let mut last: BTreeMap<String, StatusUpdate> = BTreeMap::new();
    loop {
        let now: BTreeMap<String, StatusUpdate> = rx
            .borrow_and_update()
            .iter()
            .map(|(n, s)| (n.clone(), service_update(s)))
            .collect();
        for (name, update) in &now {
            if last.get(name) != Some(update) {
                shared.publisher.publish(update.clone());
            }
        }
        for (name, _) in last.iter().filter(|(n, _)| !now.contains_key(*n)) {
            shared
                .publisher
                .remove_key(&StatusKey::Service(name.clone()));
        }
        clash::update_dns_chain(&shared);
        last = now;
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// FRR daemons run in integrated-config mode and start empty: whenever one of them
/// has a new process (first start, crash and restart), push the whole `frr.conf` once
/// they all run. A failed push is retried every few seconds.
async fn keep_frr_loaded(shared: Arc<Shared>, frr: Arc<FrrControl>) {
    let mut rx = shared.supervisor.watch_status();
    let mut loaded: BTreeMap<String, u32> = BTreeMap::new();
    loop {
        let pids: BTreeMap<String, u32> = rx
            .borrow_and_update()
            .iter()
            .filter(|(name, _)| name.starts_with("frr-"))
            .filter_map(|(name, st)| st.pid.map(|pid| (name.clone(), pid)))
            .collect();
        let mut retry = false;
        if pids.is_empty() {
            loaded.clear();
        } else if pids.len() == crate::supervise::frr::DAEMONS.len() && pids != loaded {
            match frr.load(Duration::from_secs(30)).await {
                Ok(()) => loaded = pids,
                Err(err) => {
                    warn!(%err, "loading the FRR config failed; retrying");
                    retry = true;
                }
            }
        }
        if retry {
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(3)) => {}
            }
        } else if rx.changed().await.is_err() {
            return;
        }
    }
}

/// DNS upstream status and the failover log follow the frontend.
async fn publish_dns(shared: Arc<Shared>) {
    let mut rx = shared.dns.subscribe();
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    let mut last_log = 0usize;
    loop {
        let (ups, log) = {
            let st = rx.borrow_and_update();
            (st.upstreams.clone(), st.failover_log.clone())
        };
        let now = unix_now();
        for u in &ups {
            // Publish on a change of state (not of the timestamp or latency alone).
            let state = u.status.to_string();
            if last.get(&u.name) != Some(&state) {
                shared.publisher.publish(StatusUpdate::DnsUpstream {
                    name: u.name.clone(),
                    state: state.clone(),
                    ts: u.updated.unwrap_or(now),
                    latency_ms: u.latency_ms.unwrap_or(0),
                });
                last.insert(u.name.clone(), state);
            }
        }
        // A full log keeps its length while entries rotate through it.
        if log.len() != last_log || log.len() == FAILOVER_LOG_MAX {
            last_log = log.len();
            shared
                .publisher
                .publish(StatusUpdate::FailoverLog(view::failover_entries(log)));
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// OpenVPN (management socket) and WireGuard (handshake age) status every 5 s.
async fn publish_links(shared: Arc<Shared>, root: PathBuf) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut last: BTreeMap<StatusKey, &'static str> = BTreeMap::new();
    loop {
        tick.tick().await;
        let mut now: BTreeMap<StatusKey, &'static str> = BTreeMap::new();
        for st in shared.supervisor.status() {
            if let Some(name) = st.name.strip_prefix("openvpn-") {
                let sock = vpnstatus::openvpn_socket(&root, name);
                let state = vpnstatus::openvpn_state(&sock).await;
                now.insert(StatusKey::Openvpn(name.to_owned()), state.as_str());
            }
        }
        if let Some(wg) = &shared.wireguard {
            let devices = shared
                .wg_devices
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            for d in devices {
                let state = wg.backend().get(&d.dev).await.ok();
                let status = status_of(state.as_ref(), std::time::SystemTime::now());
                now.insert(StatusKey::Wireguard(d.name.clone()), status.as_str());
            }
        }
        for (k, v) in &now {
            if last.get(k) != Some(v) {
                let (state, ts) = ((*v).to_owned(), unix_now());
                shared.publisher.publish(match k {
                    StatusKey::Openvpn(name) => StatusUpdate::Openvpn {
                        name: name.clone(),
                        state,
                        ts,
                    },
                    StatusKey::Wireguard(name) => StatusUpdate::Wireguard {
                        name: name.clone(),
                        state,
                        ts,
                    },
                    _ => continue,
                });
            }
        }
        for k in last.keys().filter(|k| !now.contains_key(*k)) {
            shared.publisher.remove_key(k);
        }
        last = now;
    }
}
