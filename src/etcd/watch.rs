//! The resilient watch on `/commit` and `/dns/hosts/` (DESIGN §5).
//!
//! etcd-client does not reconnect or resume a watch and a watch on a dead or
//! stalled server can hang forever (etcdv3/etcd-client#17, #48; etcd#8980), so this
//! task owns all of it:
//! - resume: after a broken stream the watch is re-created, each range from the
//!   revision after the last event seen *of that range*, with backoff 0.5 s doubling
//!   to 10 s; etcd replays what happened meanwhile, so nothing is missed. The two
//!   ranges are two watches on one stream and catch up independently, so a newer
//!   event of one may arrive before an older one of the other: one resume revision
//!   for both (the newest seen) could skip the older event if the stream broke in
//!   between;
//! - compaction: a start revision below the compaction floor is canceled by etcd
//!   and deliberately not resumed (etcd#8668, "watcher must not silently miss an
//!   event"); we emit [`WatchEvent::Resync`] and watch from the current revision + 1
//!   (the re-list-then-watch recovery of cilium and tikv/pd);
//! - stall: every `progress_interval` a progress request is sent; if nothing at all
//!   arrives within `stall_timeout` the stream is dropped (its member marked
//!   unresponsive, [`WatchConn::mark_unresponsive`]) and re-created, and a Resync is
//!   emitted once the new stream is up;
//! - failover: a stream that was up and ends is re-created at once, without backoff:
//!   the real [`Kv`] opens it on a member that answers.
//!
//! A range's resume point only advances with its own events (and with a Resync),
//! never with a response header: an unsynced watcher may still owe events below the
//! header revision (etcd 3.4 answers progress requests with the store revision). The
//! price is a spurious Resync when a long-quiet range (hosts records nobody touched)
//! reconnects after its last event was compacted: one full reread, which the
//! reconciler does every 5 minutes anyway.
//!
//! Events only *trigger* the reconciler; it rereads everything (level-triggered).

use std::future::pending;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant, Interval, MissedTickBehavior};
use tracing::{debug, info, warn};

use super::kv::{EventKind, KeyRange, Kv, KvEvent, WatchConn};
use super::EtcdError;
use crate::backoff::{wake_spread, Backoff, Jitter, WAKE_WINDOW};

/// The configuration trigger key.
pub const COMMIT_KEY: &str = "/commit";
/// Live host records.
pub const HOSTS_PREFIX: &str = "/dns/hosts/";

/// What the watcher tells the reconciler and the DNS frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// `/commit` changed at `revision`; `value` is `None` when it was deleted.
    Commit {
        revision: i64,
        value: Option<String>,
    },
    /// Host records changed; all changes of one watch response, in order.
    Hosts {
        revision: i64,
        changes: Vec<KvEvent>,
    },
    /// Events may have been missed or the stream was unhealthy: reread everything.
    /// The watch continues with events after `revision`.
    Resync { reason: String, revision: i64 },
    /// The periodic full pass is due.
    Tick,
}

/// Timing of the watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatcherConfig {
    /// How often a progress request is sent on a quiet stream.
    pub progress_interval: Duration,
    /// How long after a progress request (or the create request) a stream may stay
    /// silent before it counts as stalled.
    pub stall_timeout: Duration,
    /// First reconnect delay, doubled up to `backoff_max` (the shared [`Backoff`]).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Jitter of the reconnect delays: equal jitter spreads a fleet's reconnects after
    /// an etcd restart (docs/benchmarks.md, "reconnect storm").
    pub jitter: Jitter,
    /// Period of [`WatchEvent::Tick`]; `None` for no ticks.
    pub tick_interval: Option<Duration>,
}

impl WatcherConfig {
    /// The timing for a client of `members` etcd members. With several, a progress
    /// request every 0.5 s and 1 s to answer it: a frozen member (SIGSTOP, a hung
    /// host: the TCP connection stays up and nothing answers) is left within 1–1.5 s
    /// and the watch re-created on another member, so a commit is not held back by
    /// it (etcd 3.4 answers a progress request from memory: two tiny messages a
    /// second per gateway). With one member there is nowhere to move to: the
    /// defaults.
    pub fn for_members(members: usize) -> Self {
        if members > 1 {
            WatcherConfig {
                progress_interval: Duration::from_millis(500),
                stall_timeout: Duration::from_secs(1),
                ..WatcherConfig::default()
            }
        } else {
            WatcherConfig::default()
        }
    }
}

impl Default for WatcherConfig {
    fn default() -> Self {
        WatcherConfig {
            progress_interval: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(10),
            jitter: Jitter::Equal,
            tick_interval: Some(Duration::from_secs(300)),
        }
    }
}

/// The running watcher; dropping it stops the task.
#[derive(Debug)]
pub struct Watcher {
    task: JoinHandle<()>,
}

impl Watcher {
    /// Whether the task is still running (it stops when the receiver is dropped).
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the watcher. Events after `after_revision` are delivered (pass the revision
/// of the snapshot just loaded); with `after_revision <= 0` it starts with a
/// `Resync { reason: "initial" }` at the current revision.
pub fn spawn_watcher(
    kv: Arc<dyn Kv>,
    config: WatcherConfig,
    after_revision: i64,
) -> (Watcher, mpsc::UnboundedReceiver<WatchEvent>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let tick = config.tick_interval.map(|p| {
        let mut i = tokio::time::interval_at(Instant::now() + p, p);
        i.set_missed_tick_behavior(MissedTickBehavior::Delay);
        i
    });
    let mut state = WatchLoop {
        kv,
        config,
        tx,
        ranges: vec![
            (KeyRange::Key(COMMIT_KEY.to_owned()), after_revision + 1),
            (
                KeyRange::Prefix(HOSTS_PREFIX.to_owned()),
                after_revision + 1,
            ),
        ],
        tick,
        resync_from_current: (after_revision <= 0).then(|| "initial".to_owned()),
        resync_when_up: None,
    };
    let task = tokio::spawn(async move {
        if state.run().await.is_err() {
            debug!("watch receiver dropped; watcher stops");
        }
    });
    (Watcher { task }, rx)
}

/// The receiver is gone.
struct Closed;

/// Why a watch stream ended.
#[derive(Debug)]
enum End {
    Broken(EtcdError),
    Compacted(i64),
    Canceled(String),
    Stalled,
}

struct WatchLoop {
    kv: Arc<dyn Kv>,
    config: WatcherConfig,
    tx: mpsc::UnboundedSender<WatchEvent>,
    /// The watched ranges, each with the start revision of its next watch: one past
    /// the last event of that range seen.
    ranges: Vec<(KeyRange, i64)>,
    tick: Option<Interval>,
    /// Reread the current revision, emit Resync with this reason, watch after it.
    resync_from_current: Option<String>,
    /// Emit Resync with this reason once the next stream is established.
    resync_when_up: Option<String>,
}

async fn next_tick(tick: &mut Option<Interval>) {
    match tick {
        Some(t) => {
            t.tick().await;
        }
        None => pending::<()>().await,
    }
}

impl WatchLoop {
    fn emit(&self, ev: WatchEvent) -> Result<(), Closed> {
        self.tx.send(ev).map_err(|_| Closed)
    }

    /// Sleeps `d`, still delivering ticks; ends early when etcd answers again
    /// ([`Kv::recovered`]: after an outage the watch resumes when a member is back,
    /// not at the end of a backoff that grew during the outage).
    async fn pause(&mut self, d: Duration) -> Result<(), Closed> {
        let until = Instant::now() + d;
        let kv = Arc::clone(&self.kv);
        let recovered = kv.recovered();
        tokio::pin!(recovered);
        loop {
            tokio::select! {
                _ = sleep_until(until) => return Ok(()),
                () = &mut recovered => {
                    let spread = wake_spread(self.config.jitter, WAKE_WINDOW, &mut rand::rng());
                    debug!(?spread, "etcd answers again; retrying the watch");
                    tokio::time::sleep(spread).await;
                    return Ok(());
                }
                _ = next_tick(&mut self.tick) => self.emit(WatchEvent::Tick)?,
            }
        }
    }

    async fn run(&mut self) -> Result<(), Closed> {
        let mut backoff = Backoff::new(
            self.config.backoff_min,
            self.config.backoff_max,
            self.config.jitter,
        );
        loop {
            if let Some(reason) = self.resync_from_current.clone() {
                match self.kv.get_ranges(&[self.ranges[0].0.clone()]).await {
                    Ok((_, rev)) => {
                        info!(reason = %reason, revision = rev, "watch resync: rereading everything");
                        self.resync_from_current = None;
                        for (_, next) in &mut self.ranges {
                            *next = rev + 1;
                        }
                        self.emit(WatchEvent::Resync {
                            reason,
                            revision: rev,
                        })?;
                    }
                    Err(err) => {
                        let delay = backoff.next();
                        warn!(%err, ?delay, "cannot read the current etcd revision; retrying");
                        self.after_failure(&err).await;
                        self.pause(delay).await?;
                        continue;
                    }
                }
            }
            let conn = match self.kv.watch(&self.ranges).await {
                Ok(c) => c,
                Err(err) => {
                    let delay = backoff.next();
                    warn!(%err, start = self.oldest_start(), ?delay, "cannot open etcd watch; retrying");
                    self.after_failure(&err).await;
                    self.pause(delay).await?;
                    continue;
                }
            };
            let opened = Instant::now();
            let (end, established) = self.session(conn).await?;
            if established {
                backoff.reset();
            }
            // A stream that was up for a while and then ended is re-created at once:
            // `Kv::watch` opens it on a member that answers (the real client marked
            // this one down). Only failing to re-create it backs off.
            let at_once = established && opened.elapsed() >= self.config.backoff_min;
            match end {
                End::Compacted(floor) => {
                    warn!(
                        start = self.oldest_start(),
                        compact_revision = floor,
                        "watch start revision was compacted; full resync"
                    );
                    self.resync_from_current = Some(format!(
                        "compacted: revision {} is below the compaction floor {floor}",
                        self.oldest_start()
                    ));
                    // Reconnect at once: the stream itself was healthy.
                    continue;
                }
                End::Stalled => {
                    warn!(start = self.oldest_start(), timeout = ?self.config.stall_timeout,
                        "watch stalled: no answer to a progress request; re-creating");
                    self.resync_when_up = Some("stalled watch re-created".to_owned());
                }
                End::Broken(err) => {
                    warn!(%err, start = self.oldest_start(), "watch stream broken; resuming");
                    self.after_failure(&err).await;
                }
                End::Canceled(reason) => {
                    warn!(reason = %reason, start = self.oldest_start(), "watch canceled by etcd; resuming");
                    self.after_failure(&EtcdError::Watch { reason }).await;
                }
            }
            if at_once {
                continue;
            }
            self.pause(backoff.next()).await?;
        }
    }

    /// The lowest start revision of the next watch (for messages).
    fn oldest_start(&self) -> i64 {
        self.ranges.iter().map(|&(_, next)| next).min().unwrap_or(0)
    }

    async fn after_failure(&self, err: &EtcdError) {
        if err.is_auth() {
            if let Err(e) = self.kv.reauthenticate().await {
                warn!(err = %e, "etcd re-authentication failed");
            }
        }
    }

    /// Runs one stream until it ends; also reports whether it was fully created.
    async fn session(&mut self, mut conn: Box<dyn WatchConn>) -> Result<(End, bool), Closed> {
        let ranges = self.ranges.len();
        let mut created = 0usize;
        // Until every create request is answered, the stream is on probation.
        let mut deadline = Some(Instant::now() + self.config.stall_timeout);
        let mut progress = tokio::time::interval_at(
            Instant::now() + self.config.progress_interval,
            self.config.progress_interval,
        );
        progress.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                msg = conn.next() => {
                    if created >= ranges {
                        deadline = None;
                    }
                    let msg = match msg {
                        Ok(Some(m)) => m,
                        Ok(None) => return Ok((End::Broken(EtcdError::Watch {
                            reason: "stream closed by the server".into(),
                        }), created >= ranges)),
                        Err(e) => return Ok((End::Broken(e), created >= ranges)),
                    };
                    if msg.compact_revision > 0 {
                        return Ok((End::Compacted(msg.compact_revision), created >= ranges));
                    }
                    if msg.canceled {
                        return Ok((End::Canceled(msg.cancel_reason), created >= ranges));
                    }
                    if msg.created {
                        created += 1;
                        if created == ranges {
                            deadline = None;
                            debug!(start = self.oldest_start(), "etcd watch established");
                            if let Some(reason) = self.resync_when_up.take() {
                                self.emit(WatchEvent::Resync {
                                    reason,
                                    revision: self.oldest_start() - 1,
                                })?;
                            }
                        }
                    }
                    self.dispatch(msg.events)?;
                }
                _ = progress.tick(), if created >= ranges && deadline.is_none() => {
                    if let Err(e) = conn.request_progress().await {
                        return Ok((End::Broken(e), true));
                    }
                    deadline = Some(Instant::now() + self.config.stall_timeout);
                }
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    conn.mark_unresponsive();
                    return Ok((End::Stalled, created >= ranges));
                }
                _ = next_tick(&mut self.tick) => self.emit(WatchEvent::Tick)?,
            }
        }
    }

    fn dispatch(&mut self, events: Vec<KvEvent>) -> Result<(), Closed> {
        let mut hosts = Vec::new();
        for ev in events {
            let Some((_, next)) = self.ranges.iter_mut().find(|(r, _)| r.contains(&ev.key)) else {
                continue;
            };
            *next = (*next).max(ev.mod_revision + 1);
            if ev.key == COMMIT_KEY {
                self.emit(WatchEvent::Commit {
                    revision: ev.mod_revision,
                    value: (ev.kind == EventKind::Put).then_some(ev.value),
                })?;
            } else if ev.key.starts_with(HOSTS_PREFIX) {
                hosts.push(ev);
            }
        }
        if let Some(last) = hosts.last() {
            self.emit(WatchEvent::Hosts {
                revision: last.mod_revision,
                changes: hosts,
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::MemKv;

    async fn nap(ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    fn fast() -> WatcherConfig {
        WatcherConfig {
            progress_interval: Duration::from_millis(100),
            stall_timeout: Duration::from_millis(100),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(50),
            jitter: Jitter::None,
            tick_interval: None,
        }
    }

    async fn recv(rx: &mut mpsc::UnboundedReceiver<WatchEvent>) -> WatchEvent {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("watch event within 5 s")
            .expect("watcher alive")
    }

    async fn commit_values(
        rx: &mut mpsc::UnboundedReceiver<WatchEvent>,
        n: usize,
    ) -> Vec<(i64, String)> {
        let mut out = Vec::new();
        while out.len() < n {
            if let WatchEvent::Commit {
                revision,
                value: Some(v),
            } = recv(rx).await
            {
                out.push((revision, v));
            }
        }
        out
    }

    #[tokio::test]
    async fn delivers_commits_and_hosts_after_the_start_revision() {
        let kv = MemKv::new();
        let before = kv.put("/commit", "0").await.unwrap();
        let (_w, mut rx) = spawn_watcher(Arc::new(kv.clone()), fast(), before);
        let r1 = kv.put("/commit", "1").await.unwrap();
        kv.put("/global/x", "ignored").await.unwrap();
        let r2 = kv.put("/dns/hosts/nas", "10.0.0.5").await.unwrap();
        assert_eq!(
            recv(&mut rx).await,
            WatchEvent::Commit {
                revision: r1,
                value: Some("1".into())
            }
        );
        match recv(&mut rx).await {
            WatchEvent::Hosts { revision, changes } => {
                assert_eq!(revision, r2);
                assert_eq!(changes[0].key, "/dns/hosts/nas");
                assert_eq!(changes[0].value, "10.0.0.5");
            }
            other => panic!("expected hosts, got {other:?}"),
        }
        let r3 = kv.delete("/commit").await.map(|_| kv.revision()).unwrap();
        assert_eq!(
            recv(&mut rx).await,
            WatchEvent::Commit {
                revision: r3,
                value: None
            }
        );
    }

    #[tokio::test]
    async fn initial_start_emits_resync_at_current_revision() {
        let kv = MemKv::with_keys([("/commit", "5")]);
        let (_w, mut rx) = spawn_watcher(Arc::new(kv.clone()), fast(), 0);
        assert_eq!(
            recv(&mut rx).await,
            WatchEvent::Resync {
                reason: "initial".into(),
                revision: kv.revision()
            }
        );
    }

    #[tokio::test]
    async fn outage_resumes_without_missing_events() {
        let kv = MemKv::new();
        let (_w, mut rx) = spawn_watcher(Arc::new(kv.clone()), fast(), kv.revision());
        kv.put("/commit", "1").await.unwrap();
        assert_eq!(commit_values(&mut rx, 1).await[0].1, "1");
        kv.set_down(true);
        nap(100).await;
        // Writes the watcher cannot see live: it must replay them.
        kv.set_down(false);
        kv.put("/commit", "2").await.unwrap();
        kv.put("/commit", "3").await.unwrap();
        let got: Vec<String> = commit_values(&mut rx, 2)
            .await
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        assert_eq!(got, ["2", "3"]);
    }

    /// The two ranges are two watches that catch up independently. Here the hosts
    /// watch's replay (newer) arrives before the commit watch's (older) and the stream
    /// breaks in between: the commit must still come, from the commit range's own
    /// resume revision (one shared "newest seen" revision would skip it).
    #[tokio::test]
    async fn a_break_mid_catch_up_loses_no_older_event_of_the_other_range() {
        let kv = MemKv::new();
        let (_w, mut rx) = spawn_watcher(Arc::new(kv.clone()), fast(), kv.revision());
        kv.put("/commit", "1").await.unwrap();
        commit_values(&mut rx, 1).await;
        kv.set_watch_refused(true);
        let missed = kv.put("/commit", "2").await.unwrap();
        let host = kv.put("/dns/hosts/nas", "10.0.0.5").await.unwrap();
        assert!(host > missed);
        kv.set_replay_reversed(true);
        kv.break_next_watch_after_replay(1);
        kv.set_watch_refused(false);
        let mut hosts_seen = 0;
        loop {
            match recv(&mut rx).await {
                WatchEvent::Hosts { revision, .. } => {
                    assert_eq!(revision, host);
                    hosts_seen += 1;
                }
                WatchEvent::Commit { revision, value } => {
                    assert_eq!((revision, value.as_deref()), (missed, Some("2")));
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(hosts_seen, 1, "the hosts event is not replayed twice");
    }

    #[tokio::test]
    async fn compaction_while_down_forces_resync() {
        let kv = MemKv::new();
        let (_w, mut rx) = spawn_watcher(Arc::new(kv.clone()), fast(), kv.revision());
        kv.put("/commit", "1").await.unwrap();
        commit_values(&mut rx, 1).await;
        // While the watcher cannot reconnect, history moves on and is compacted
        // past its resume revision.
        kv.set_watch_refused(true);
        kv.put("/commit", "2").await.unwrap();
        kv.put("/other", "x").await.unwrap();
        kv.compact(kv.revision()).await.unwrap();
        kv.set_watch_refused(false);
        let mut saw_resync = false;
        for _ in 0..4 {
            match recv(&mut rx).await {
                WatchEvent::Resync { reason, revision } => {
                    assert!(reason.contains("compacted"), "{reason}");
                    assert_eq!(revision, kv.revision());
                    saw_resync = true;
                    break;
                }
                WatchEvent::Commit { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(saw_resync, "compaction must force a resync");
        let r = kv.put("/commit", "3").await.unwrap();
        assert_eq!(commit_values(&mut rx, 1).await, vec![(r, "3".into())]);
    }

    #[tokio::test]
    async fn stalled_stream_is_recreated_with_resync() {
        let kv = MemKv::new();
        let (_w, mut rx) = spawn_watcher(Arc::new(kv.clone()), fast(), kv.revision());
        kv.put("/commit", "1").await.unwrap();
        commit_values(&mut rx, 1).await;
        kv.set_stalled(true);
        // The fake keeps watches stalled; lift it once the watcher gave up on the
        // old stream, as SIGCONT would.
        nap(400).await;
        kv.set_stalled(false);
        match recv(&mut rx).await {
            WatchEvent::Resync { reason, .. } => assert!(reason.contains("stalled"), "{reason}"),
            other => panic!("expected resync, got {other:?}"),
        }
        let r = kv.put("/commit", "2").await.unwrap();
        let got = commit_values(&mut rx, 1).await;
        assert_eq!(got, vec![(r, "2".into())]);
    }

    #[tokio::test]
    async fn ticks_are_delivered() {
        let kv = MemKv::new();
        let cfg = WatcherConfig {
            tick_interval: Some(Duration::from_millis(50)),
            ..fast()
        };
        let (_w, mut rx) = spawn_watcher(Arc::new(kv.clone()), cfg, kv.revision());
        assert_eq!(recv(&mut rx).await, WatchEvent::Tick);
        kv.set_down(true);
        // Ticks keep coming while etcd is down (they drive the periodic pass).
        assert_eq!(recv(&mut rx).await, WatchEvent::Tick);
    }
}
