//! The reconcile loop (DESIGN §5): snapshot → parse + validate → render → plan →
//! apply per domain → publish.
//!
//! Owns: pass sequencing (never overlapping; triggers arriving during a pass coalesce
//! into one more pass), per-domain change detection, file writes through [`Fs`], and
//! the `applied`/`errors`/`last`/`warnings` status (as typed
//! [`StatusUpdate`]s; `etcd::status` renders them; an apply failure becomes its
//! `errors` entry through [`ApplyError::entry`] only). `confirm.rs` keeps the last-good
//! and previous-good snapshots in `MEDUZA_STATE_DIR` and rolls back a commit that cut
//! the gateway off etcd ([`rollback`] decides when), publishing `rollback`.
//! Must not: talk to etcd, processes, netlink or sockets directly — those are behind
//! [`ConfigSource`] and [`Effects`] (`effects.rs`), so a pass is testable with fakes.

mod confirm;
mod effects;
mod error;
pub mod plan;
pub mod rollback;

use crate::backoff::{Backoff, Jitter};
use crate::etcd::status::{unix_now, ErrorEntry, StatusUpdate};
use crate::files::Fs;
use meduza_generators::plan::service::ServiceSpec;
use meduza_generators::render::{self, Domain, DomainOutput, RenderEnv};
use meduza_generators::{Config, Snapshot};
use plan::Op;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
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
    /// The previous pass could not load the snapshot (etcd unreachable): try again.
    /// Without it a commit whose pass hit an etcd blip would wait for the periodic
    /// pass, since the watch already delivered its event.
    Retry,
}

/// First delay before retrying a pass that could not load the snapshot; doubled up
/// to [`RETRY_MAX`] while etcd stays unreachable, with equal jitter (each wait is
/// uniform in `[d/2, d]`): a fleet whose etcd restarts must not reload its snapshots in
/// lockstep (see [`crate::backoff`]).
pub const RETRY_MIN: std::time::Duration = std::time::Duration::from_secs(1);
pub const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// The backoff of snapshot retries: [`RETRY_MIN`] → [`RETRY_MAX`], equal jitter.
pub fn retry_backoff() -> Backoff {
    Backoff::new(RETRY_MIN, RETRY_MAX, Jitter::Equal)
}

pub use effects::{ConfigSource, Effects};
pub use error::{ApplyDomain, ApplyError, Cause, SourceError, APPLY_KEY};

/// What a pass did, for logs, tests and the benchmark.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PassReport {
    pub revision: i64,
    pub applied: bool,
    pub from_last_good: bool,
    /// What `errors` was published as: the refused snapshot's validation errors, or
    /// one entry per failed apply step ([`ApplyError::entry`]).
    pub errors: Vec<ErrorEntry>,
    pub changed: BTreeSet<String>,
    /// The snapshot could not be loaded (and nothing was applied): the run loop
    /// retries the pass.
    pub source_failed: bool,
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
    /// Waits between retries of a pass whose snapshot could not be loaded.
    retry: Backoff,
    /// The confirm/rollback state (persisted in the state directory).
    rollback: rollback::State,
    /// When the last apply finished while a commit is pending: only etcd round trips
    /// started after it confirm the commit.
    armed_at: Option<Instant>,
    /// Wall-clock seconds since the epoch: confirm windows survive a reboot.
    clock: fn() -> u64,
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
            retry: retry_backoff(),
            rollback: rollback::State::default(),
            armed_at: None,
            clock: unix_now,
        }
        .with_rollback_state()
    }

    /// Replace the snapshot-retry backoff ([`retry_backoff`] by default).
    pub fn with_retry_backoff(mut self, retry: Backoff) -> Self {
        self.retry = retry;
        self
    }

    /// Replace the wall clock of the confirm windows ([`unix_now`] by default).
    pub fn with_clock(mut self, clock: fn() -> u64) -> Self {
        self.clock = clock;
        self
    }

    pub fn effects(&mut self) -> &mut E {
        &mut self.effects
    }

    /// The persisted rollback state (tests).
    pub fn rollback_state(&self) -> &rollback::State {
        &self.rollback
    }

    /// Run passes until the trigger channel closes. Triggers that arrive during a pass
    /// are drained and coalesced into one more pass.
    pub async fn run(self, triggers: mpsc::Receiver<Trigger>) {
        self.run_with(triggers, |_, _| {}).await;
    }

    /// [`Self::run`], calling `on_pass` with each pass's report and duration.
    pub async fn run_with(
        mut self,
        mut triggers: mpsc::Receiver<Trigger>,
        mut on_pass: impl FnMut(&PassReport, std::time::Duration) + Send,
    ) {
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            // While a commit is pending, probe etcd every PROBE_INTERVAL, and once
            // more when its window ends.
            let confirm_at = self.rollback.pending.as_ref().map(|p| {
                let left = p.deadline().saturating_sub((self.clock)());
                tokio::time::Instant::now()
                    + rollback::PROBE_INTERVAL.min(std::time::Duration::from_secs(left))
            });
            let first = tokio::select! {
                t = triggers.recv() => t,
                _ = sleep_until_opt(retry_at), if retry_at.is_some() => Some(Trigger::Retry),
                _ = sleep_until_opt(confirm_at), if confirm_at.is_some() => {
                    self.check_confirm().await;
                    continue;
                }
            };
            let Some(mut why) = first else { return };
            while let Ok(next) = triggers.try_recv() {
                why = next;
            }
            let started = Instant::now();
            let report = self.pass(&why).await;
            on_pass(&report, started.elapsed());
            retry_at = if report.source_failed {
                let next = self.retry.next();
                info!(
                    retry_in_ms = next.as_millis() as u64,
                    "snapshot not loaded; pass will be retried"
                );
                Some(tokio::time::Instant::now() + next)
            } else {
                self.retry.reset();
                None
            };
        }
    }

    /// One level-triggered pass.
    pub async fn pass(&mut self, why: &Trigger) -> PassReport {
        let started = Instant::now();
        let loaded = self.source.load().await;
        if loaded.is_ok() {
            self.round_trip(started, None).await;
        } else {
            self.feed(rollback::Event::Tick).await;
        }
        let (snapshot, revision, from_last_good) = match loaded {
            Ok((_, rev)) if self.rollback.is_refused(rev) => {
                if self.first_pass_done {
                    info!(
                        revision = rev,
                        "revision was rolled back; not applied again (a newer commit will be)"
                    );
                    return PassReport {
                        revision: rev,
                        ..PassReport::default()
                    };
                }
                // First pass of this run: bring up what the rollback restored.
                match self.load_last_good() {
                    Some((snap, good)) => {
                        warn!(
                            revision = rev,
                            restored = good,
                            "revision was rolled back; applying the last good snapshot"
                        );
                        (snap, good, true)
                    }
                    None => {
                        return PassReport {
                            revision: rev,
                            ..PassReport::default()
                        }
                    }
                }
            }
            Ok((snap, rev)) => (snap, rev, false),
            Err(err) => {
                if self.first_pass_done {
                    warn!(%err, "etcd unreachable; keeping the running configuration");
                    self.effects.publish(last("etcd unreachable".into()));
                    return PassReport {
                        source_failed: true,
                        ..PassReport::default()
                    };
                }
                match self.load_last_good() {
                    Some((snap, rev)) => {
                        warn!(%err, "etcd unreachable at boot; applying the last good snapshot");
                        (snap, rev, true)
                    }
                    None => {
                        warn!(%err, "etcd unreachable at boot and no last good snapshot");
                        return PassReport {
                            source_failed: true,
                            ..PassReport::default()
                        };
                    }
                }
            }
        };
        // A commit made with `meduza commit --confirm` (only asked for a new revision).
        let explicit = if from_last_good || self.last_good_revision() == Some(revision) {
            None
        } else {
            self.source
                .commit_confirm(revision)
                .await
                .unwrap_or_else(|err| {
                    warn!(%err, revision, "commit_confirm unreadable; confirm_timeout applies");
                    None
                })
        };
        let span = info_span!("reconcile", revision, trigger = ?why);
        let mut report = self
            .apply_snapshot(&snapshot, revision, from_last_good, explicit)
            .instrument(span)
            .await;
        report.from_last_good = from_last_good;
        info!(
            revision,
            applied = report.applied,
            changed = report.changed.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "reconcile pass done"
        );
        report
    }

    /// Applies `snapshot`; on success the snapshot is saved as the last good one
    /// (unless it is that file) *before* `applied` is published, so a gateway that
    /// loses power the moment etcd shows `applied` comes back on that revision.
    async fn apply_snapshot(
        &mut self,
        snapshot: &Snapshot,
        revision: i64,
        from_last_good: bool,
        explicit_confirm: Option<u64>,
    ) -> PassReport {
        let mut report = PassReport {
            revision,
            ..PassReport::default()
        };
        let mut confirm_timeout = meduza_generators::model::CONFIRM_TIMEOUT_DEFAULT_SECS;
        // Unknown keys are published as warnings on every pass; they never block.
        let (parsed, warnings) = Config::parse_checked(snapshot);
        let warnings: Vec<_> = warnings
            .into_iter()
            .filter(|w| w.concerns_node(&self.node_id))
            .collect();
        for w in &warnings {
            warn!(key = %w.key, reason = %w.reason, "unknown key ignored");
        }
        self.effects.publish(StatusUpdate::Warnings(warnings));
        let rendered = parsed.map_err(|e| e.0).and_then(|cfg| {
            confirm_timeout = cfg
                .node(&self.node_id)
                .map_or(cfg.global.confirm_timeout_secs, |n| n.confirm_timeout_secs);
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
                let errors: Vec<ErrorEntry> = errors.iter().map(ErrorEntry::from).collect();
                self.effects.publish(StatusUpdate::Errors(errors.clone()));
                self.effects
                    .publish(last(format!("refused revision {revision}")));
                report.errors = errors;
                self.first_pass_done = true;
                return report;
            }
        };

        let fs = Arc::clone(&self.fs);
        let observed = move |p: &str| fs.observe(p);
        let ops = plan::plan(&self.applied, &rendered.domains, &observed);
        let mut changed_files = BTreeSet::new();
        let mut failures: Vec<ApplyError> = Vec::new();
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
                        Err(e) => {
                            failures.push(ApplyError::new(ApplyDomain::File(path.clone()), e))
                        }
                    }
                }
                Op::RemoveFile { path, .. } => {
                    if let Err(e) = self.fs.remove(path) {
                        failures.push(ApplyError::new(ApplyDomain::File(path.clone()), e));
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
            failures.push(e);
        }
        let frr_changed = changed.contains(&Domain::Frr);
        if frr_changed || !self.first_pass_done {
            if let Err(e) = self.effects.apply_frr(rendered.frr_enabled).await {
                failures.push(e);
            }
        }
        if let Err(e) = self
            .effects
            .apply_wireguard(rendered.wireguard.clone())
            .await
        {
            failures.push(e);
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
            failures.push(e);
        }
        self.effects.apply_api_token(rendered.api_token.clone());
        self.effects.apply_api_tls(rendered.api_tls.clone());
        if let Err(e) = self.effects.apply_dns(rendered.dns.clone()).await {
            failures.push(e);
        }

        self.applied = rendered.domains;
        self.first_pass_done = true;
        report.changed = changed.iter().map(Domain::label).collect();
        // A commit from etcd opens its confirm window also when a step failed: what
        // was applied may have cut the gateway off all the same.
        if !from_last_good {
            let (timeout_secs, mode) = match explicit_confirm {
                Some(secs) => (secs, rollback::Mode::Explicit),
                None => (confirm_timeout, rollback::Mode::Reach),
            };
            let ok = failures.is_empty();
            self.save_good(snapshot, revision, timeout_secs, mode, ok)
                .await;
        }
        if self.rollback.pending.is_some() {
            self.armed_at = Some(Instant::now());
        }
        if failures.is_empty() {
            self.applied_revision = Some(revision);
            self.effects.publish(StatusUpdate::Errors(Vec::new()));
            self.effects.publish(StatusUpdate::Applied {
                revision,
                ts: unix_now(),
            });
            self.effects
                .publish(last(format!("applied revision {revision}")));
            report.applied = true;
        } else {
            for f in &failures {
                warn!(failure = %f, "apply step failed; will retry on the next pass");
            }
            let errors: Vec<ErrorEntry> = failures.iter().map(ApplyError::entry).collect();
            self.effects.publish(StatusUpdate::Errors(errors.clone()));
            self.effects
                .publish(last(format!("apply failed for revision {revision}")));
            report.errors = errors;
        }
        report
    }
}

/// Sleeps until `at` (never resolves for `None`; the select guards on `is_some`).
async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `last` = `"<now> <reason>"`.
fn last(reason: String) -> StatusUpdate {
    StatusUpdate::Last {
        ts: unix_now(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::MemFs;
    use meduza_generators::model::ApiTls;
    use meduza_generators::plan::dns::DnsPlan;
    use meduza_generators::plan::tproxy::TproxyPlan;
    use meduza_generators::plan::wireguard::WgDevice;
    use meduza_generators::render::{ClashRuntime, MosdnsRuntime};

    pub(super) struct FakeSource {
        pub(super) next: Result<(Snapshot, i64), String>,
        /// `/confirmed` as a probe reads it.
        pub(super) confirmed: Option<i64>,
        /// `/commit_confirm` of the next commit.
        pub(super) confirm_secs: Option<u64>,
    }

    impl ConfigSource for FakeSource {
        async fn load(&mut self) -> Result<(Snapshot, i64), SourceError> {
            self.next.clone().map_err(SourceError::unreachable)
        }
        async fn probe(&mut self) -> Result<Option<i64>, SourceError> {
            self.next
                .as_ref()
                .map_err(|e| SourceError::unreachable(e.clone()))?;
            Ok(self.confirmed)
        }
        async fn commit_confirm(&mut self, _revision: i64) -> Result<Option<u64>, SourceError> {
            Ok(self.confirm_secs)
        }
    }

    #[derive(Default)]
    pub(super) struct FakeEffects {
        pub(super) service_calls: Vec<(Vec<String>, BTreeSet<String>)>,
        pub(super) frr_calls: Vec<bool>,
        pub(super) tproxy: Vec<Option<TproxyPlan>>,
        pub(super) published: BTreeMap<String, String>,
        /// `apply_wireguard` fails (a step failing after others were applied).
        pub(super) fail_wireguard: bool,
    }

    impl Effects for FakeEffects {
        async fn apply_services(
            &mut self,
            specs: Vec<ServiceSpec>,
            changed: BTreeSet<String>,
        ) -> Result<(), ApplyError> {
            self.service_calls
                .push((specs.into_iter().map(|s| s.name).collect(), changed));
            Ok(())
        }
        async fn apply_frr(&mut self, enabled: bool) -> Result<(), ApplyError> {
            self.frr_calls.push(enabled);
            Ok(())
        }
        async fn apply_wireguard(&mut self, _d: Vec<WgDevice>) -> Result<(), ApplyError> {
            if self.fail_wireguard {
                return Err(ApplyError::new(
                    ApplyDomain::Wireguard,
                    "wireguard-go exited",
                ));
            }
            Ok(())
        }
        async fn apply_clash(
            &mut self,
            _c: Option<ClashRuntime>,
            _m: Option<MosdnsRuntime>,
            t: Option<TproxyPlan>,
        ) -> Result<(), ApplyError> {
            self.tproxy.push(t);
            Ok(())
        }
        async fn apply_dns(&mut self, _p: DnsPlan) -> Result<(), ApplyError> {
            Ok(())
        }
        fn apply_api_token(&mut self, _token: Option<String>) {}
        fn apply_api_tls(&mut self, _tls: Option<ApiTls>) {}
        fn publish(&mut self, update: StatusUpdate) {
            self.published.insert(update.key().suffix(), update.value());
        }
    }

    pub(super) fn example() -> Snapshot {
        let text = include_str!("../../docs/examples/three-nodes.json");
        Snapshot::from_json(text).expect("example parses")
    }

    pub(super) fn reconciler(
        state: &Path,
        snap: Result<(Snapshot, i64), String>,
    ) -> (Reconciler<FakeSource, FakeEffects>, Arc<MemFs>) {
        let fs = Arc::new(MemFs::default());
        let env = RenderEnv {
            default_gw: None,
            clash_secret: "test-secret-0123456789".into(),
            bins: Default::default(),
        };
        let r = Reconciler::new(
            "gw-a".into(),
            FakeSource {
                next: snap,
                confirmed: None,
                confirm_secs: None,
            },
            FakeEffects::default(),
            fs.clone() as Arc<dyn Fs>,
            state.to_path_buf(),
            env,
        );
        (r, fs)
    }

    use std::path::Path;

    #[tokio::test]
    async fn second_pass_of_the_same_snapshot_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (mut r, fs) = reconciler(dir.path(), Ok((example(), 7)));
        let first = r.pass(&Trigger::Boot).await;
        assert!(first.applied, "{:?}", first.errors);
        assert!(first.changed.contains("frr") && first.changed.contains("tinc"));
        let writes = fs.writes.lock().unwrap().len();
        assert!(writes > 5);
        let second = r.pass(&Trigger::Commit(8)).await;
        assert!(second.applied);
        assert!(second.changed.is_empty(), "{:?}", second.changed);
        assert_eq!(fs.writes.lock().unwrap().len(), writes, "no file rewritten");
        let (_, changed) = r.effects().service_calls.last().unwrap().clone();
        assert!(changed.is_empty());
        assert_eq!(
            r.effects().frr_calls,
            vec![true],
            "FRR reloaded only on the first pass"
        );
        assert!(
            r.effects().published["applied"].starts_with("7 ")
                || r.effects().published["applied"].starts_with("8 ")
        );
    }

    #[tokio::test]
    async fn a_changed_key_touches_only_its_domain() {
        let dir = tempfile::tempdir().unwrap();
        let (mut r, _fs) = reconciler(dir.path(), Ok((example(), 1)));
        assert!(r.pass(&Trigger::Boot).await.applied);
        let mut snap = example();
        snap.0
            .insert("/dns/hosts/new.internal".into(), "10.1.2.3".into());
        r.source.next = Ok((snap, 2));
        let report = r.pass(&Trigger::Commit(2)).await;
        assert_eq!(report.changed, BTreeSet::from(["hosts".to_string()]));
        assert_eq!(r.effects().frr_calls.len(), 1);
    }

    #[tokio::test]
    async fn invalid_snapshot_is_refused_and_errors_published() {
        let dir = tempfile::tempdir().unwrap();
        let (mut r, fs) = reconciler(dir.path(), Ok((example(), 1)));
        assert!(r.pass(&Trigger::Boot).await.applied);
        let writes = fs.writes.lock().unwrap().len();
        let mut bad = example();
        bad.0.insert("/nodes/gw-a/lan".into(), "not-a-cidr".into());
        r.source.next = Ok((bad, 2));
        let report = r.pass(&Trigger::Commit(2)).await;
        assert!(!report.applied);
        assert_eq!(report.errors[0].key, "/nodes/gw-a/lan");
        assert!(r.effects().published["errors"].contains("/nodes/gw-a/lan"));
        assert!(
            r.effects().published["applied"].starts_with("1 "),
            "applied stays at the last good revision"
        );
        assert_eq!(
            fs.writes.lock().unwrap().len(),
            writes,
            "nothing written for a refused snapshot"
        );
    }

    #[tokio::test]
    async fn a_failed_step_is_published_as_an_apply_entry() {
        let dir = tempfile::tempdir().unwrap();
        let (mut r, _) = reconciler(dir.path(), Ok((example(), 1)));
        r.effects().fail_wireguard = true;
        let report = r.pass(&Trigger::Boot).await;
        assert!(!report.applied);
        let entry = ErrorEntry {
            key: "<apply>".into(),
            value: String::new(),
            reason: "wireguard: wireguard-go exited".into(),
        };
        assert_eq!(report.errors, vec![entry]);
        assert_eq!(
            r.effects().published["errors"],
            r#"[{"key":"<apply>","value":"","reason":"wireguard: wireguard-go exited"}]"#
        );
        assert!(r.effects().published["last"].ends_with(" apply failed for revision 1"));
        // The next pass succeeds and clears the entry.
        r.effects().fail_wireguard = false;
        assert!(r.pass(&Trigger::Periodic).await.applied);
        assert_eq!(r.effects().published["errors"], "[]");
    }

    #[tokio::test]
    async fn a_file_that_cannot_be_written_is_published_under_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        // `/etc` is a regular file: nothing under it can be written.
        std::fs::write(root.path().join("etc"), b"").unwrap();
        let (r, _) = reconciler(dir.path(), Ok((example(), 1)));
        let mut r = Reconciler::new(
            "gw-a".into(),
            r.source,
            FakeEffects::default(),
            Arc::new(crate::files::RootFs::new(root.path())) as Arc<dyn Fs>,
            dir.path().to_path_buf(),
            r.env,
        );
        let report = r.pass(&Trigger::Boot).await;
        assert!(!report.applied);
        let frr = report
            .errors
            .iter()
            .find(|e| e.reason.starts_with("/etc/frr/frr.conf: "))
            .expect("frr.conf failed");
        assert_eq!((frr.key.as_str(), frr.value.as_str()), ("<apply>", ""));
        assert!(
            frr.reason.starts_with(&format!(
                "/etc/frr/frr.conf: writing {}/etc/frr/frr.conf: ",
                root.path().display()
            )),
            "{frr:?}"
        );
        assert!(report.errors.iter().all(|e| e.key == "<apply>"));
        assert_eq!(
            r.effects().published["errors"],
            crate::etcd::status::errors_value(&report.errors)
        );
    }

    /// A source failing a given number of loads, then answering.
    struct FlakySource {
        failures: usize,
        loads: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl ConfigSource for FlakySource {
        async fn load(&mut self) -> Result<(Snapshot, i64), SourceError> {
            let n = self.loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if n < self.failures {
                Err(SourceError::unreachable("connection refused"))
            } else {
                Ok((example(), 9))
            }
        }
    }

    /// Pass reports of a run: (applied, from last good, time since start).
    type Reports = Vec<(bool, bool, std::time::Duration)>;

    /// Boot from the last good snapshot, then a commit whose loads fail `failures - 1`
    /// times; returns the number of loads and the reports after `run_for`.
    async fn run_flaky(
        retry: Backoff,
        failures: usize,
        run_for: std::time::Duration,
    ) -> (usize, Reports) {
        let dir = tempfile::tempdir().unwrap();
        let (mut r, _) = reconciler(dir.path(), Ok((example(), 5)));
        assert!(r.pass(&Trigger::Boot).await.applied);
        let loads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let r = Reconciler::new(
            "gw-a".into(),
            FlakySource {
                failures,
                loads: loads.clone(),
            },
            FakeEffects::default(),
            Arc::new(MemFs::default()) as Arc<dyn Fs>,
            dir.path().to_path_buf(),
            r.env.clone(),
        )
        .with_retry_backoff(retry);
        let (tx, rx) = mpsc::channel(4);
        let reports = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = reports.clone();
        let started = tokio::time::Instant::now();
        let task = tokio::spawn(r.run_with(rx, move |rep, _| {
            seen.lock()
                .unwrap()
                .push((rep.applied, rep.from_last_good, started.elapsed()));
        }));
        tx.send(Trigger::Boot).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        tx.send(Trigger::Commit(9)).await.unwrap();
        tokio::time::sleep(run_for).await;
        drop(tx);
        task.await.unwrap();
        let reports = reports.lock().unwrap().clone();
        (loads.load(std::sync::atomic::Ordering::SeqCst), reports)
    }

    #[tokio::test(start_paused = true)]
    async fn a_pass_that_could_not_load_is_retried_with_backoff() {
        // The boot pass falls back to the last good snapshot; a commit then hits a
        // dead etcd twice and is retried (1 s, 2 s: no jitter here, to check the
        // doubling exactly) until the load works.
        let exact = Backoff::new(RETRY_MIN, RETRY_MAX, Jitter::None);
        let (loads, reports) = run_flaky(exact, 3, std::time::Duration::from_secs(10)).await;
        assert_eq!(loads, 4);
        assert_eq!(reports.len(), 4, "{reports:?}");
        assert!(
            reports[0].0 && reports[0].1,
            "boot from the last good snapshot"
        );
        assert!(!reports[1].0 && !reports[2].0);
        assert!(
            reports[3].0 && !reports[3].1,
            "the retry applied etcd's snapshot"
        );
        let gap = reports[3].2 - reports[2].2;
        assert!(
            gap >= std::time::Duration::from_secs(2) && gap < std::time::Duration::from_secs(3),
            "backoff doubled: {gap:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn snapshot_retries_are_jittered_within_half_to_full_backoff() {
        // The default backoff: five failed loads after the commit, retried after
        // nominal 1, 2, 4, 8, 16 s, each wait uniform in [d/2, d].
        let (loads, reports) =
            run_flaky(retry_backoff(), 6, std::time::Duration::from_secs(40)).await;
        assert_eq!(loads, 7);
        assert_eq!(reports.len(), 7, "{reports:?}");
        assert!(reports[1..6].iter().all(|r| !r.0) && reports[6].0);
        let mut exact = 0;
        for (i, nominal) in [1u64, 2, 4, 8, 16].into_iter().enumerate() {
            let nominal = std::time::Duration::from_secs(nominal);
            let gap = reports[i + 2].2 - reports[i + 1].2;
            // The timer wheel rounds a sleep up to the next millisecond.
            let slack = std::time::Duration::from_millis(2);
            assert!(
                gap >= nominal / 2 && gap <= nominal + slack,
                "retry {i}: {gap:?} outside [{:?}, {nominal:?}]",
                nominal / 2
            );
            if gap.abs_diff(nominal) < slack {
                exact += 1;
            }
        }
        assert!(exact < 5, "no jitter: {reports:?}");
    }

    #[tokio::test]
    async fn boot_without_etcd_uses_the_last_good_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (mut r, _) = reconciler(dir.path(), Ok((example(), 5)));
        assert!(r.pass(&Trigger::Boot).await.applied);
        // A new meduza process: etcd unreachable.
        let (mut r2, fs2) = reconciler(dir.path(), Err("connection refused".into()));
        let report = r2.pass(&Trigger::Boot).await;
        assert!(report.applied && report.from_last_good);
        assert_eq!(report.revision, 5);
        assert!(fs2.read("/etc/frr/frr.conf").is_some());
        // Later failures keep the running configuration and do nothing.
        let later = r2.pass(&Trigger::Periodic).await;
        assert!(!later.applied);
        assert!(r2.effects().published["last"].ends_with("etcd unreachable"));
    }
}
