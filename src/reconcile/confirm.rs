//! The confirm/rollback half of the reconciler: the last-good and previous-good
//! snapshots in `MEDUZA_STATE_DIR`, the confirm window a commit read from etcd opens,
//! the etcd round trips that confirm it, and the rollback to the previous good
//! snapshot when the window runs out ([`super::rollback`] decides; this applies).
//!
//! Must not: decide (the pure state machine in [`super::rollback`] does), or publish
//! anything but `rollback` and `last`.

use super::{last, rollback, ConfigSource, Effects, Reconciler};
use crate::etcd::status::StatusUpdate;
use crate::files::write_atomic;
use meduza_generators::Snapshot;
use std::path::PathBuf;
use std::time::Instant;
use tracing::{info, info_span, warn, Instrument as _};

impl<S: ConfigSource, E: Effects> Reconciler<S, E> {
    /// Loads the rollback state; republishes the last rollback (the publisher may
    /// not have written it before a restart). A pending commit that is not the last
    /// good snapshot was interrupted before it was saved: dropped (etcd's copy is
    /// applied and armed again).
    pub(super) fn with_rollback_state(mut self) -> Self {
        self.rollback = rollback::State::load(&self.state_dir);
        let last_good = read_snapshot_file(&self.last_good_path()).map(|(_, r)| r);
        if let Some(p) = &self.rollback.pending {
            if last_good != Some(p.revision) {
                warn!(
                    revision = p.revision,
                    "pending commit was never saved; its window is dropped"
                );
                self.rollback.pending = None;
            } else {
                info!(
                    revision = p.revision,
                    deadline = p.deadline(),
                    "commit still unconfirmed from the last run; its window resumes"
                );
            }
        }
        if let Some(entry) = &self.rollback.last {
            self.effects.publish(StatusUpdate::Rollback(entry.clone()));
        }
        self
    }

    pub(super) fn last_good_path(&self) -> PathBuf {
        self.state_dir.join("last-good.json")
    }

    /// The good configuration before the last good one: what a rollback restores.
    pub(super) fn previous_good_path(&self) -> PathBuf {
        self.state_dir.join("previous-good.json")
    }

    /// Saves a snapshot read from etcd and applied (`ok`: every step succeeded; else
    /// only its window is opened and the last good snapshot stays). A new revision
    /// (not the last good one) shifts the last good snapshot to previous-good (unless
    /// the last good one is itself unconfirmed: the previous good one stays the last
    /// confirmed) and opens its confirm window, which is persisted first: a crash
    /// between the writes leaves a window whose revision is not the last good one,
    /// dropped at start.
    pub(super) async fn save_good(
        &mut self,
        snapshot: &Snapshot,
        revision: i64,
        timeout_secs: u64,
        mode: rollback::Mode,
        ok: bool,
    ) {
        let last_good = read_snapshot_file(&self.last_good_path());
        let last_revision = last_good.as_ref().map(|(_, r)| *r);
        if last_revision == Some(revision) {
            return;
        }
        if self
            .rollback
            .pending
            .as_ref()
            .is_some_and(|p| p.revision == revision)
        {
            // Window already open (an earlier pass of this revision failed a step).
            if ok {
                persist_snapshot(self.last_good_path(), snapshot, revision).await;
            }
            return;
        }
        let unconfirmed = self.rollback.pending.is_some();
        let previous = if unconfirmed {
            read_snapshot_file(&self.previous_good_path()).map(|(_, r)| r)
        } else {
            last_revision
        };
        if let Some(previous) = previous {
            self.rollback.arm(rollback::Pending {
                revision,
                previous,
                applied_at: (self.clock)(),
                timeout_secs,
                mode,
            });
            info!(
                revision,
                previous,
                timeout_secs,
                ?mode,
                "commit applied; rolled back unless confirmed in time"
            );
            self.persist_rollback().await;
        }
        if let (false, Some((snap, rev))) = (unconfirmed, last_good) {
            persist_snapshot(self.previous_good_path(), &snap, rev).await;
        }
        if ok {
            persist_snapshot(self.last_good_path(), snapshot, revision).await;
        }
    }

    pub(super) fn load_last_good(&self) -> Option<(Snapshot, i64)> {
        read_snapshot_file(&self.last_good_path())
    }

    pub(super) fn last_good_revision(&self) -> Option<i64> {
        self.load_last_good().map(|(_, r)| r)
    }

    pub(super) async fn persist_rollback(&self) {
        let state = self.rollback.clone();
        let dir = self.state_dir.clone();
        let result = tokio::task::spawn_blocking(move || state.save(&dir))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        if let Err(err) = result {
            warn!(dir = %self.state_dir.display(), %err, "could not persist the rollback state");
        }
    }

    /// An etcd round trip that started at `started` completed (`confirmed`: the
    /// value of `/confirmed` when it read it). It counts only when it started after
    /// the apply of the pending commit finished.
    pub(super) async fn round_trip(&mut self, started: Instant, confirmed: Option<i64>) {
        if self.rollback.pending.is_none() {
            return;
        }
        if self.armed_at.is_some_and(|a| started >= a) {
            self.feed(rollback::Event::Reached { confirmed }).await;
        } else {
            self.feed(rollback::Event::Tick).await;
        }
    }

    /// The run loop's timer while a commit is pending: probe etcd (bounded by
    /// [`rollback::PROBE_TIMEOUT`]), then decide.
    pub(super) async fn check_confirm(&mut self) {
        let started = Instant::now();
        match tokio::time::timeout(rollback::PROBE_TIMEOUT, self.source.probe()).await {
            Ok(Ok(confirmed)) => self.round_trip(started, confirmed).await,
            _ => self.feed(rollback::Event::Tick).await,
        }
    }

    pub(super) async fn feed(&mut self, event: rollback::Event) {
        match rollback::decide(&self.rollback, &event, (self.clock)()) {
            rollback::Decision::Idle | rollback::Decision::Wait { .. } => {}
            rollback::Decision::Confirm { revision } => {
                info!(revision, "commit confirmed");
                self.rollback.confirm();
                self.armed_at = None;
                self.persist_rollback().await;
            }
            rollback::Decision::RollBack {
                revision,
                previous,
                reason,
            } => self.roll_back(revision, previous, reason).await,
        }
    }

    /// Applies the previous good snapshot through the normal apply path, makes it
    /// the last good one again, refuses `revision` and publishes `rollback`.
    pub(super) async fn roll_back(&mut self, revision: i64, previous: i64, reason: String) {
        warn!(revision, previous, %reason, "rolling back to the previous good configuration");
        let Some((snap, rev)) = read_snapshot_file(&self.previous_good_path()) else {
            warn!(
                revision,
                "no previous good snapshot on disk; nothing to roll back to"
            );
            self.rollback.confirm();
            self.persist_rollback().await;
            return;
        };
        let entry = self
            .rollback
            .rolled_back(revision, reason.clone(), (self.clock)());
        self.armed_at = None;
        // Refused first: a crash during the apply must not bring `revision` back.
        self.persist_rollback().await;
        persist_snapshot(self.last_good_path(), &snap, rev).await;
        let span = info_span!("rollback", revision, restored = rev);
        let report = self
            .apply_snapshot(&snap, rev, true, None)
            .instrument(span)
            .await;
        info!(
            revision,
            restored = rev,
            applied = report.applied,
            "rollback applied"
        );
        self.effects.publish(StatusUpdate::Rollback(entry));
        self.effects
            .publish(last(format!("rolled back revision {revision}: {reason}")));
    }
}

/// `{"revision": N, "snapshot": {...}}` from `path`.
pub(super) fn read_snapshot_file(path: &std::path::Path) -> Option<(Snapshot, i64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let revision = v.get("revision")?.as_i64()?;
    let snap: Snapshot = serde_json::from_value(v.get("snapshot")?.clone()).ok()?;
    Some((snap, revision))
}

/// Writes a snapshot file durably (0600: it holds secrets). The fsyncs run on the
/// blocking pool: on slow flash they take up to seconds, which must not stall the
/// runtime's other tasks (DNS, the status publisher); the pass itself waits for them.
pub(super) async fn persist_snapshot(path: PathBuf, snapshot: &Snapshot, revision: i64) {
    let body = serde_json::json!({ "revision": revision, "snapshot": snapshot }).to_string();
    let write = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || write_atomic(&path, body.as_bytes(), 0o600))
    };
    let result = write
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
    if let Err(err) = result {
        warn!(path = %path.display(), %err, "could not persist a good snapshot");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::Fs as _;
    use crate::reconcile::tests::{example, reconciler, FakeEffects, FakeSource};
    use crate::reconcile::Trigger;
    use std::path::Path;

    thread_local! {
        /// The wall clock of the rollback tests (each `#[tokio::test]` runs on its
        /// own thread).
        static NOW: std::cell::Cell<u64> = const { std::cell::Cell::new(1_000_000) };
    }

    fn test_now() -> u64 {
        NOW.with(|n| n.get())
    }

    fn advance(secs: u64) {
        NOW.with(|n| n.set(n.get() + secs));
    }

    /// A reconciler on `dir` with the test clock that applied revision 5 (the
    /// example), then revision 6 (one more host record), which is now pending.
    async fn pending_commit(dir: &Path) -> Reconciler<FakeSource, FakeEffects> {
        let (r, _) = reconciler(dir, Ok((example(), 5)));
        let mut r = r.with_clock(test_now);
        assert!(r.pass(&Trigger::Boot).await.applied);
        assert_eq!(
            r.rollback_state().pending,
            None,
            "nothing to roll back to yet"
        );
        r.source.next = Ok((with_host(6), 6));
        assert!(r.pass(&Trigger::Commit(6)).await.applied);
        r
    }

    fn with_host(n: u8) -> Snapshot {
        let mut snap = example();
        snap.0
            .insert(format!("/dns/hosts/new{n}.internal"), format!("10.1.2.{n}"));
        snap
    }

    fn saved_revision(dir: &Path, file: &str) -> Option<i64> {
        read_snapshot_file(&dir.join(file)).map(|(_, r)| r)
    }

    #[tokio::test]
    async fn a_commit_that_loses_etcd_is_rolled_back_and_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = pending_commit(dir.path()).await;
        let p = r
            .rollback_state()
            .pending
            .clone()
            .expect("revision 6 pending");
        assert_eq!((p.revision, p.previous, p.timeout_secs), (6, 5, 90));
        assert_eq!(saved_revision(dir.path(), "previous-good.json"), Some(5));
        assert_eq!(saved_revision(dir.path(), "last-good.json"), Some(6));

        // etcd gone: probes fail; nothing happens before the window ends.
        r.source.next = Err("deadline exceeded".into());
        advance(89);
        r.check_confirm().await;
        assert!(r.rollback_state().pending.is_some());
        advance(1);
        r.check_confirm().await;
        let st = r.rollback_state().clone();
        assert_eq!(st.pending, None);
        assert_eq!(st.refused, vec![6]);
        assert!(r.effects().published["applied"].starts_with("5 "));
        let rb: crate::etcd::status::RollbackEntry =
            serde_json::from_str(&r.effects().published["rollback"]).unwrap();
        assert_eq!(rb.revision, 6);
        assert_eq!(rb.at, test_now());
        assert!(rb.reason.contains("etcd unreachable for 90 s"), "{rb:?}");
        assert_eq!(saved_revision(dir.path(), "last-good.json"), Some(5));

        // etcd back, `/commit` still at 6: not applied again.
        r.source.next = Ok((with_host(6), 6));
        let again = r.pass(&Trigger::Resync).await;
        assert!(!again.applied && again.errors.is_empty());
        assert!(r.effects().published["applied"].starts_with("5 "));

        // A restart: the refused revision stays refused, the restored one comes up,
        // and `rollback` is published again.
        let (r2, fs2) = reconciler(dir.path(), Ok((with_host(6), 6)));
        let mut r2 = r2.with_clock(test_now);
        let boot = r2.pass(&Trigger::Boot).await;
        assert!(boot.applied && boot.from_last_good && boot.revision == 5);
        assert!(fs2.read("/etc/frr/frr.conf").is_some());
        assert!(r2.effects().published["rollback"].contains("\"revision\":6"));

        // A newer commit is applied normally (and opens its own window).
        r2.source.next = Ok((with_host(7), 7));
        let newer = r2.pass(&Trigger::Commit(7)).await;
        assert!(newer.applied && newer.revision == 7);
        let p = r2.rollback_state().pending.clone().unwrap();
        assert_eq!((p.revision, p.previous), (7, 5));
    }

    #[tokio::test]
    async fn a_commit_that_keeps_etcd_reachable_is_confirmed() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = pending_commit(dir.path()).await;
        r.check_confirm().await;
        assert_eq!(r.rollback_state().pending, None);
        advance(1000);
        r.check_confirm().await;
        let again = r.pass(&Trigger::Periodic).await;
        assert!(again.applied && again.revision == 6);
        assert!(r.rollback_state().refused.is_empty());
        assert!(!r.effects().published.contains_key("rollback"));
        // The next commit rolls back to 6, the confirmed one.
        r.source.next = Ok((with_host(7), 7));
        assert!(r.pass(&Trigger::Commit(7)).await.applied);
        assert_eq!(r.rollback_state().pending.as_ref().unwrap().previous, 6);
        assert_eq!(saved_revision(dir.path(), "previous-good.json"), Some(6));
    }

    #[tokio::test]
    async fn a_window_interrupted_by_a_restart_resumes_and_rolls_back() {
        let dir = tempfile::tempdir().unwrap();
        drop(pending_commit(dir.path()).await);
        // Restarted without etcd: the pending revision comes up from disk, its
        // window keeps the original deadline.
        let (r, _) = reconciler(dir.path(), Err("connection refused".into()));
        let mut r = r.with_clock(test_now);
        assert_eq!(r.rollback_state().pending.as_ref().unwrap().revision, 6);
        let boot = r.pass(&Trigger::Boot).await;
        assert!(boot.applied && boot.revision == 6);
        advance(90);
        r.check_confirm().await;
        assert_eq!(r.rollback_state().refused, vec![6]);
        assert!(r.effects().published["applied"].starts_with("5 "));
    }

    #[tokio::test]
    async fn an_elapsed_window_rolls_back_before_the_boot_pass_applies() {
        let dir = tempfile::tempdir().unwrap();
        drop(pending_commit(dir.path()).await);
        advance(500);
        let (r, _) = reconciler(dir.path(), Ok((with_host(6), 6)));
        let mut r = r.with_clock(test_now);
        let boot = r.pass(&Trigger::Boot).await;
        assert!(!boot.applied, "revision 6 not applied again");
        assert!(r.effects().published["applied"].starts_with("5 "));
        assert_eq!(r.rollback_state().refused, vec![6]);
    }

    #[tokio::test]
    async fn a_confirm_commit_needs_meduza_confirm() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _) = reconciler(dir.path(), Ok((example(), 5)));
        let mut r = r.with_clock(test_now);
        assert!(r.pass(&Trigger::Boot).await.applied);
        r.source.confirm_secs = Some(120);
        r.source.next = Ok((with_host(6), 6));
        assert!(r.pass(&Trigger::Commit(6)).await.applied);
        let p = r.rollback_state().pending.clone().unwrap();
        assert_eq!((p.mode, p.timeout_secs), (rollback::Mode::Explicit, 120));
        // Reachable but not confirmed: still pending; confirmed: done.
        r.source.confirmed = Some(5);
        r.check_confirm().await;
        assert!(r.rollback_state().pending.is_some());
        r.source.confirmed = Some(6);
        r.check_confirm().await;
        assert_eq!(r.rollback_state().pending, None);

        // Never confirmed: rolled back at the deadline although etcd answers.
        r.source.next = Ok((with_host(7), 7));
        assert!(r.pass(&Trigger::Commit(7)).await.applied);
        advance(120);
        r.check_confirm().await;
        assert_eq!(r.rollback_state().refused, vec![7]);
        assert!(r.effects().published["rollback"].contains("not confirmed"));
        assert!(r.effects().published["applied"].starts_with("6 "));
    }

    #[tokio::test]
    async fn a_commit_whose_apply_fails_partway_is_rolled_back_too() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _) = reconciler(dir.path(), Ok((example(), 5)));
        let mut r = r.with_clock(test_now);
        assert!(r.pass(&Trigger::Boot).await.applied);
        r.effects().fail_wireguard = true;
        r.source.next = Ok((with_host(6), 6));
        let failed = r.pass(&Trigger::Commit(6)).await;
        assert!(!failed.applied && !failed.errors.is_empty());
        let p = r.rollback_state().pending.clone().expect("window open");
        assert_eq!((p.revision, p.previous), (6, 5));
        assert_eq!(saved_revision(dir.path(), "last-good.json"), Some(5));
        assert_eq!(saved_revision(dir.path(), "previous-good.json"), Some(5));
        r.effects().fail_wireguard = false;
        r.source.next = Err("deadline exceeded".into());
        advance(90);
        r.check_confirm().await;
        assert_eq!(r.rollback_state().refused, vec![6]);
        assert!(r.effects().published["applied"].starts_with("5 "));
    }
}
