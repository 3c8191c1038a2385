//! The reconcile loop (DESIGN §5): snapshot → parse + validate → render → plan →
//! apply per domain → publish.
//!
//! Owns: pass sequencing (never overlapping; triggers arriving during a pass coalesce
//! into one more pass), per-domain change detection, file writes through [`Fs`], the
//! last-good snapshot in `MEDUZA_STATE_DIR`, and the `applied`/`errors`/`last` status.
//! Must not: talk to etcd, processes, netlink or sockets directly — those are behind
//! [`ConfigSource`] and [`Effects`], so a pass is testable with fakes.

pub mod plan;

use crate::files::{write_atomic, Fs};
use meduza_generators::plan::dns::DnsPlan;
use meduza_generators::plan::service::ServiceSpec;
use meduza_generators::plan::tproxy::TproxyPlan;
use meduza_generators::plan::wireguard::WgDevice;
use meduza_generators::render::{
    self, ClashRuntime, Domain, DomainOutput, MosdnsRuntime, RenderEnv,
};
use meduza_generators::{Config, Snapshot, ValidationError};
use plan::Op;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tracing::{info, info_span, warn, Instrument as _};

/// Why a pass runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// First pass after start.
    Boot,
    /// `/commit` changed (its mod revision).
    Commit(i64),
    /// The 5-minute periodic pass.
    Periodic,
    /// The watch was re-created after compaction or a stall: reread everything.
    Resync,
}

/// Where snapshots come from (etcd in production).
pub trait ConfigSource: Send {
    /// The snapshot of every key the generators need, and `/commit`'s mod revision
    /// (0 when `/commit` is absent).
    fn load(&mut self) -> impl Future<Output = Result<(Snapshot, i64), String>> + Send;
}

/// The effects of a pass on the rest of the daemon. Each is level-triggered: it is
/// given the whole desired state of its concern, not a delta.
pub trait Effects: Send {
    /// Desired services (all domains); `changed_files` lists the files this pass
    /// wrote, so services whose config changed are reloaded and the others untouched.
    fn apply_services(
        &mut self,
        specs: Vec<ServiceSpec>,
        changed_files: BTreeSet<String>,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// FRR's files changed: reload it (frr-reload.py, falling back to `vtysh -f`);
    /// `enabled` false stops it.
    fn apply_frr(&mut self, enabled: bool) -> impl Future<Output = Result<(), String>> + Send;
    /// Desired WireGuard devices (enabled instances).
    fn apply_wireguard(
        &mut self,
        devices: Vec<WgDevice>,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// Clash/MosDNS runtime settings and the TPROXY plan to apply once mihomo is healthy.
    fn apply_clash(
        &mut self,
        clash: Option<ClashRuntime>,
        mosdns: Option<MosdnsRuntime>,
        tproxy: Option<TproxyPlan>,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// DNS frontend plan (hosts, chain flags, upstream groups).
    fn apply_dns(&mut self, plan: DnsPlan) -> impl Future<Output = Result<(), String>> + Send;
    /// Publish `/updated/<id>/<suffix>` = value (non-blocking; queued while etcd is down).
    fn publish(&mut self, suffix: &str, value: String);
}

/// What a pass did, for logs, tests and the benchmark.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PassReport {
    pub revision: i64,
    pub applied: bool,
    pub from_last_good: bool,
    pub errors: Vec<ValidationError>,
    pub changed: BTreeSet<String>,
}

/// The reconciler's state between passes.
pub struct Reconciler<S, E> {
    node_id: String,
    source: S,
    effects: E,
    fs: Arc<dyn Fs>,
    state_dir: PathBuf,
    env: RenderEnv,
    applied: BTreeMap<Domain, DomainOutput>,
    applied_revision: Option<i64>,
    first_pass_done: bool,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl<S: ConfigSource, E: Effects> Reconciler<S, E> {
    pub fn new(
        node_id: String,
        source: S,
        effects: E,
        fs: Arc<dyn Fs>,
        state_dir: PathBuf,
        env: RenderEnv,
    ) -> Self {
        Self {
            node_id,
            source,
            effects,
            fs,
            state_dir,
            env,
            applied: BTreeMap::new(),
            applied_revision: None,
            first_pass_done: false,
        }
    }

    pub fn effects(&mut self) -> &mut E {
        &mut self.effects
    }

    fn last_good_path(&self) -> PathBuf {
        self.state_dir.join("last-good.json")
    }

    /// Run passes until the trigger channel closes. Triggers that arrive during a pass
    /// are drained and coalesced into one more pass.
    pub async fn run(mut self, mut triggers: mpsc::Receiver<Trigger>) {
        while let Some(first) = triggers.recv().await {
            let mut why = first;
            while let Ok(next) = triggers.try_recv() {
                why = next;
            }
            let _ = self.pass(&why).await;
        }
    }

    /// One level-triggered pass.
    pub async fn pass(&mut self, why: &Trigger) -> PassReport {
        let started = Instant::now();
        let loaded = self.source.load().await;
        let (snapshot, revision, from_last_good) = match loaded {
            Ok((snap, rev)) => (snap, rev, false),
            Err(err) => {
                if self.first_pass_done {
                    warn!(%err, "etcd unreachable; keeping the running configuration");
                    self.effects
                        .publish("last", format!("{} etcd unreachable", unix_now()));
                    return PassReport::default();
                }
                match self.load_last_good() {
                    Some((snap, rev)) => {
                        warn!(%err, "etcd unreachable at boot; applying the last good snapshot");
                        (snap, rev, true)
                    }
                    None => {
                        warn!(%err, "etcd unreachable at boot and no last good snapshot");
                        return PassReport::default();
                    }
                }
            }
        };
        let span = info_span!("reconcile", revision, trigger = ?why);
        let mut report = self
            .apply_snapshot(&snapshot, revision)
            .instrument(span)
            .await;
        report.from_last_good = from_last_good;
        if report.applied && !from_last_good {
            self.save_last_good(&snapshot, revision);
        }
        info!(
            revision,
            applied = report.applied,
            changed = report.changed.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "reconcile pass done"
        );
        report
    }

    async fn apply_snapshot(&mut self, snapshot: &Snapshot, revision: i64) -> PassReport {
        let mut report = PassReport {
            revision,
            ..PassReport::default()
        };
        let rendered = Config::parse(snapshot).map_err(|e| e.0).and_then(|cfg| {
            render::render_node(&cfg, &self.node_id, &self.env).map_err(|e| vec![e])
        });
        let rendered = match rendered {
            Ok(r) => r,
            Err(errors) => {
                warn!(
                    count = errors.len(),
                    "snapshot refused; the last good configuration keeps running"
                );
                for e in &errors {
                    warn!(key = %e.key, reason = %e.reason, "invalid key");
                }
                self.effects.publish("errors", errors_json(&errors));
                self.effects.publish(
                    "last",
                    format!("{} refused revision {revision}", unix_now()),
                );
                report.errors = errors;
                self.first_pass_done = true;
                return report;
            }
        };

        let fs = Arc::clone(&self.fs);
        let observed = move |p: &str| fs.observe(p);
        let ops = plan::plan(&self.applied, &rendered.domains, &observed);
        let mut changed_files = BTreeSet::new();
        let mut failures = Vec::new();
        for op in &ops {
            match op {
                Op::WriteFile { domain, path, mode } => {
                    let content = rendered.domains[domain]
                        .files
                        .iter()
                        .find(|f| &f.path == path)
                        .map(|f| f.content.as_bytes())
                        .unwrap_or_default();
                    match self.fs.write_if_changed(path, content, *mode) {
                        Ok(_) => {
                            changed_files.insert(path.clone());
                        }
                        Err(e) => failures.push(format!("{path}: {e}")),
                    }
                }
                Op::RemoveFile { path, .. } => {
                    if let Err(e) = self.fs.remove(path) {
                        failures.push(format!("{path}: {e}"));
                    }
                    changed_files.insert(path.clone());
                }
                Op::Start { .. } | Op::Reload { .. } | Op::Stop { .. } => {}
            }
        }
        let changed = plan::changed_domains(&ops);
        for d in &changed {
            info!(domain = %d.label(), "domain changed");
        }

        let specs: Vec<ServiceSpec> = rendered
            .domains
            .values()
            .flat_map(|d| d.services.clone())
            .collect();
        if let Err(e) = self
            .effects
            .apply_services(specs, changed_files.clone())
            .await
        {
            failures.push(format!("services: {e}"));
        }
        let frr_changed = changed.contains(&Domain::Frr);
        if frr_changed || !self.first_pass_done {
            if let Err(e) = self.effects.apply_frr(rendered.frr_enabled).await {
                failures.push(format!("frr: {e}"));
            }
        }
        if let Err(e) = self
            .effects
            .apply_wireguard(rendered.wireguard.clone())
            .await
        {
            failures.push(format!("wireguard: {e}"));
        }
        if let Err(e) = self
            .effects
            .apply_clash(
                rendered.clash.clone(),
                rendered.mosdns.clone(),
                rendered.tproxy.clone(),
            )
            .await
        {
            failures.push(format!("clash: {e}"));
        }
        if let Err(e) = self.effects.apply_dns(rendered.dns.clone()).await {
            failures.push(format!("dns: {e}"));
        }

        self.applied = rendered.domains;
        self.first_pass_done = true;
        report.changed = changed.iter().map(Domain::label).collect();
        if failures.is_empty() {
            self.applied_revision = Some(revision);
            self.effects.publish("errors", "[]".into());
            self.effects
                .publish("applied", format!("{revision} {}", unix_now()));
            self.effects.publish(
                "last",
                format!("{} applied revision {revision}", unix_now()),
            );
            report.applied = true;
        } else {
            let errors: Vec<ValidationError> = failures
                .iter()
                .map(|f| ValidationError::new("<apply>", "", f.clone()))
                .collect();
            for f in &failures {
                warn!(failure = %f, "apply step failed; will retry on the next pass");
            }
            self.effects.publish("errors", errors_json(&errors));
            self.effects.publish(
                "last",
                format!("{} apply failed for revision {revision}", unix_now()),
            );
            report.errors = errors;
        }
        report
    }

    fn save_last_good(&self, snapshot: &Snapshot, revision: i64) {
        let body = serde_json::json!({ "revision": revision, "snapshot": snapshot });
        let path = self.last_good_path();
        // The snapshot holds secrets (keys, tokens): 0600.
        if let Err(err) = write_atomic(&path, body.to_string().as_bytes(), 0o600) {
            warn!(path = %path.display(), %err, "could not persist the last good snapshot");
        }
    }

    fn load_last_good(&self) -> Option<(Snapshot, i64)> {
        let text = std::fs::read_to_string(self.last_good_path()).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        let revision = v.get("revision")?.as_i64()?;
        let snap: Snapshot = serde_json::from_value(v.get("snapshot")?.clone()).ok()?;
        Some((snap, revision))
    }
}

/// `/updated/<id>/errors` value: a JSON array of `{key, value, reason}`.
pub fn errors_json(errors: &[ValidationError]) -> String {
    serde_json::to_string(errors).unwrap_or_else(|_| "[]".into())
}
