//! The status publisher: writes the node's `/updated/<id>/` keys (formats:
//! [`super`]) without ever blocking its caller.
//!
//! `set` hands the value to a task over a channel. The task keeps the `online` key on
//! a lease (TTL 15 s, refreshed every 5 s, re-granted and re-put when it expired or
//! etcd lost it), writes a key only when its value changed, and while etcd is
//! unreachable keeps the newest value per key in a pending map that is flushed when
//! etcd answers again (at the end of the retry backoff, or at once when the client
//! reports a member back). After an outage every known key is written once more, in
//! case etcd came back from an older backup. Must not: render a value itself (the
//! typed setters go through [`StatusUpdate`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use super::{node_prefix, unix_now, ErrorEntry, StateLine, StatusKey, StatusUpdate, ONLINE_VALUE};
use crate::backoff::{Backoff, Jitter};
use crate::etcd::kv::Kv;
use crate::etcd::EtcdError;
use crate::tls::Fingerprint;

/// Timing of the publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublisherConfig {
    /// TTL of the `online` lease, seconds.
    pub ttl_secs: i64,
    /// Keep-alive period of the lease.
    pub keep_alive_interval: Duration,
    /// First retry delay after a failed write, doubled up to `retry_max` (the shared
    /// [`Backoff`]).
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Jitter of the retry delays (equal jitter by default: a fleet's retries after an
    /// etcd restart spread out).
    pub jitter: Jitter,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        PublisherConfig {
            ttl_secs: 15,
            keep_alive_interval: Duration::from_secs(5),
            retry_min: Duration::from_millis(500),
            retry_max: Duration::from_secs(10),
            jitter: Jitter::Equal,
        }
    }
}

enum Cmd {
    Set(String, Option<String>),
    Flush(oneshot::Sender<bool>),
    Shutdown(oneshot::Sender<()>),
}

/// Handle of the status task. Dropping it aborts the task without revoking the lease,
/// like a crash: `online` vanishes when the TTL runs out. [`StatusPublisher::shutdown`]
/// revokes it at once.
#[derive(Debug)]
pub struct StatusPublisher {
    tx: mpsc::UnboundedSender<Cmd>,
    task: JoinHandle<()>,
    node_id: String,
}

impl Drop for StatusPublisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StatusPublisher {
    /// Starts publishing for `node_id`; `online` is written as soon as etcd answers.
    pub fn spawn(kv: Arc<dyn Kv>, node_id: &str, config: PublisherConfig) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = Task {
            kv,
            prefix: node_prefix(node_id),
            config,
            cache: BTreeMap::new(),
            pending: BTreeMap::new(),
            lease: None,
            online_written: false,
            healthy: true,
            retry_at: None,
            backoff: Backoff::new(config.retry_min, config.retry_max, config.jitter),
        };
        let task = tokio::spawn(task.run(rx));
        StatusPublisher {
            tx,
            task,
            node_id: node_id.to_owned(),
        }
    }

    /// The node this publisher writes for.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Publishes a typed value at its key; returns at once.
    pub fn publish(&self, update: StatusUpdate) {
        self.set(&update.key().suffix(), update.value());
    }

    /// Deletes a key (e.g. a removed service); returns at once.
    pub fn remove_key(&self, key: &StatusKey) {
        self.remove(&key.suffix());
    }

    /// Sets `/updated/<id>/<suffix>` to a value already rendered (by
    /// [`StatusUpdate::value`]); returns at once.
    pub fn set(&self, suffix: &str, value: impl Into<String>) {
        // A send fails only after the task ended (shutdown); nothing to publish then.
        let _ = self
            .tx
            .send(Cmd::Set(suffix.to_owned(), Some(value.into())));
    }

    /// Deletes `/updated/<id>/<suffix>`; returns at once.
    pub fn remove(&self, suffix: &str) {
        let _ = self.tx.send(Cmd::Set(suffix.to_owned(), None));
    }

    /// `last` = `"<now> <reason>"`.
    pub fn set_last(&self, reason: &str) {
        self.publish(StatusUpdate::Last {
            ts: unix_now(),
            reason: reason.to_owned(),
        });
    }

    /// `applied` = `"<revision> <now>"` after a snapshot was fully applied.
    pub fn set_applied(&self, commit_revision: i64) {
        self.publish(StatusUpdate::Applied {
            revision: commit_revision,
            ts: unix_now(),
        });
    }

    /// `errors` = JSON array (`[]` when none).
    pub fn set_errors(&self, errors: &[ErrorEntry]) {
        self.publish(StatusUpdate::Errors(errors.to_vec()));
    }

    /// `services/<svc>/status` = `"starting|running|backoff|fatal|stopped <now>"`.
    pub fn set_service(&self, svc: &str, state: &str) {
        self.publish(StatusUpdate::Service {
            name: svc.to_owned(),
            state: state.to_owned(),
            since: unix_now(),
        });
    }

    /// `clash/health` = `"healthy|waiting|unhealthy <now> <reason>"`.
    pub fn set_clash_health(&self, state: &str, reason: &str) {
        self.publish(StatusUpdate::ClashHealth(StateLine::new(
            state,
            unix_now(),
            reason,
        )));
    }

    /// `api_tls` = `"<sha256> <now> <source>"` while the node API serves HTTPS;
    /// removed when it serves plain HTTP.
    pub fn set_api_tls(&self, tls: Option<(&Fingerprint, &str)>) {
        match tls {
            Some((fp, source)) => self.publish(StatusUpdate::ApiTls {
                fingerprint: *fp,
                ts: unix_now(),
                source: source.to_owned(),
            }),
            None => self.remove_key(&StatusKey::ApiTls),
        }
    }

    /// Waits until everything set so far was attempted; true when all of it (and the
    /// `online` key) is in etcd.
    pub async fn flush(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Flush(tx)).is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Orderly stop: one last flush attempt, then the lease is revoked so `online`
    /// disappears now rather than after the TTL.
    pub async fn shutdown(self) {
        self.close().await;
    }

    /// [`shutdown`](Self::shutdown) through a shared reference (a daemon's publisher
    /// is shared by its tasks): the last flush, then the lease is revoked and the task
    /// ends; later `set`s are dropped.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Shutdown(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// A lease keep-alive running beside the status task; aborted when dropped (the
/// publisher dropped like a crash renews nothing more).
struct Renewal {
    lease: i64,
    task: JoinHandle<Result<bool, EtcdError>>,
}

impl Drop for Renewal {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Task {
    kv: Arc<dyn Kv>,
    prefix: String,
    config: PublisherConfig,
    /// What etcd holds, as far as we know (`None`: deleted by us).
    cache: BTreeMap<String, Option<String>>,
    /// Newest value per key not yet written.
    pending: BTreeMap<String, Option<String>>,
    lease: Option<i64>,
    online_written: bool,
    healthy: bool,
    retry_at: Option<Instant>,
    backoff: Backoff,
}

impl Task {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        let mut keep_alive = tokio::time::interval(self.config.keep_alive_interval);
        keep_alive.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let kv = Arc::clone(&self.kv);
        // The keep-alive in flight (its lease and task). It runs beside the writes:
        // around a leader election a renewal can wait a while, and `applied` must not
        // wait behind it.
        let mut renewing: Option<Renewal> = None;
        loop {
            tokio::select! {
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { return };
                    let mut cmds = vec![cmd];
                    while let Ok(c) = rx.try_recv() {
                        cmds.push(c);
                    }
                    let mut waiting = Vec::new();
                    for c in cmds {
                        match c {
                            Cmd::Set(k, v) => self.enqueue(k, v),
                            Cmd::Flush(resp) => waiting.push(resp),
                            Cmd::Shutdown(resp) => {
                                // No renewal after the revoke.
                                drop(renewing.take());
                                self.flush().await;
                                self.revoke().await;
                                let _ = resp.send(());
                                return;
                            }
                        }
                    }
                    self.flush().await;
                    let done = self.pending.is_empty() && self.online_written;
                    for w in waiting {
                        let _ = w.send(done);
                    }
                }
                _ = keep_alive.tick(), if renewing.is_none() => match self.lease {
                    Some(id) => {
                        let kv = Arc::clone(&self.kv);
                        renewing = Some(Renewal {
                            lease: id,
                            task: tokio::spawn(async move { kv.lease_keep_alive(id).await }),
                        });
                    }
                    None => self.flush().await,
                },
                res = async { (&mut renewing.as_mut().expect("guarded by the condition").task).await },
                    if renewing.is_some() =>
                {
                    let id = renewing.take().expect("guarded by the condition").lease;
                    let res = res.unwrap_or_else(|e| {
                        Err(EtcdError::Unavailable {
                            op: "lease-keep-alive",
                            key: format!("{id:x}: {e}"),
                        })
                    });
                    self.renewed(id, res).await;
                }
                _ = sleep_until(self.retry_at.unwrap_or_else(Instant::now)), if self.retry_at.is_some() => {
                    self.retry_at = None;
                    self.flush().await;
                }
                // etcd answers again: flush now, not at the end of the grown backoff.
                () = kv.recovered(), if self.retry_at.is_some() => {
                    self.retry_at = None;
                    self.flush().await;
                }
            }
        }
    }

    fn enqueue(&mut self, suffix: String, value: Option<String>) {
        if !self.pending.contains_key(&suffix) && self.cache.get(&suffix) == Some(&value) {
            return;
        }
        self.pending.insert(suffix, value);
    }

    fn failed(&mut self, err: &EtcdError) {
        if self.healthy {
            warn!(%err, pending = self.pending.len(), "status publishing paused: etcd unreachable");
        } else {
            debug!(%err, "status publishing still paused");
        }
        self.healthy = false;
        self.retry_at = Some(Instant::now() + self.backoff.next());
    }

    /// Grants the lease and writes `online` if needed.
    async fn ensure_online(&mut self) -> Result<(), EtcdError> {
        let id = match self.lease {
            Some(id) => id,
            None => {
                let id = self.kv.lease_grant(self.config.ttl_secs).await?;
                debug!(
                    lease = id,
                    ttl = self.config.ttl_secs,
                    "status lease granted"
                );
                self.lease = Some(id);
                self.online_written = false;
                id
            }
        };
        if !self.online_written {
            let key = format!("{}{}", self.prefix, StatusKey::Online.suffix());
            match self.kv.put_with_lease(&key, ONLINE_VALUE, id).await {
                Ok(_) => self.online_written = true,
                Err(e) => {
                    if matches!(e, EtcdError::LeaseNotFound { .. }) {
                        self.lease = None;
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    async fn flush(&mut self) {
        if let Err(e) = self.ensure_online().await {
            self.failed(&e);
            return;
        }
        if !self.healthy {
            // Back after an outage: rewrite what we know, newer pending values win.
            for (k, v) in &self.cache {
                if v.is_some() && !self.pending.contains_key(k) {
                    self.pending.insert(k.clone(), v.clone());
                }
            }
        }
        while let Some((suffix, value)) = next_to_write(&self.pending) {
            let key = format!("{}{suffix}", self.prefix);
            let res = match &value {
                Some(v) => self.kv.put(&key, v).await.map(|_| ()),
                None => self.kv.delete(&key).await.map(|_| ()),
            };
            if let Err(e) = res {
                self.failed(&e);
                return;
            }
            self.pending.remove(&suffix);
            self.cache.insert(suffix, value);
        }
        if !self.healthy {
            info!("status publishing resumed: etcd reachable, queue flushed");
        }
        self.healthy = true;
        self.retry_at = None;
        self.backoff.reset();
    }

    /// The answer to a keep-alive of lease `id`.
    async fn renewed(&mut self, id: i64, res: Result<bool, EtcdError>) {
        if self.lease != Some(id) {
            // Re-granted meanwhile: this answer is about the old lease.
            return;
        }
        match res {
            Ok(true) => {
                if !self.healthy || !self.pending.is_empty() || !self.online_written {
                    self.flush().await;
                }
            }
            Ok(false) => {
                warn!(
                    lease = id,
                    "status lease expired; re-granting and re-putting online"
                );
                self.lease = None;
                self.online_written = false;
                self.flush().await;
            }
            Err(e) => self.failed(&e),
        }
    }

    async fn revoke(&mut self) {
        if let Some(id) = self.lease.take() {
            if let Err(err) = self.kv.lease_revoke(id).await {
                warn!(%err, lease = id, "cannot revoke status lease; online expires with its TTL");
            }
        }
    }
}

/// The next pending key to write: in key order, but `applied` last, so a reader who
/// sees a new `applied` also sees the `errors` and `last` of the same pass (keys are
/// written one by one).
fn next_to_write(pending: &BTreeMap<String, Option<String>>) -> Option<(String, Option<String>)> {
    pending
        .iter()
        .find(|(k, _)| StatusKey::parse(k) != Some(StatusKey::Applied))
        .or_else(|| pending.iter().next())
        .map(|(k, v)| (k.clone(), v.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::MemKv;

    fn fast() -> PublisherConfig {
        PublisherConfig {
            ttl_secs: 3,
            keep_alive_interval: Duration::from_millis(50),
            retry_min: Duration::from_millis(10),
            retry_max: Duration::from_millis(40),
            jitter: Jitter::None,
        }
    }

    #[tokio::test]
    async fn writes_online_and_only_changed_values() {
        let kv = MemKv::new();
        let p = StatusPublisher::spawn(Arc::new(kv.clone()), "a", fast());
        p.set("tproxy", "applied 1 ok");
        assert!(p.flush().await);
        let puts = kv.put_count();
        p.set("tproxy", "applied 1 ok");
        p.set("tproxy", "applied 1 ok");
        assert!(p.flush().await);
        assert_eq!(kv.put_count(), puts, "unchanged value must not be written");
        p.set("tproxy", "removed 2 crash");
        assert!(p.flush().await);
        assert_eq!(kv.put_count(), puts + 1);
        let e = kv.get("/updated/a/online").await.unwrap().unwrap();
        assert_eq!(e.value, "1");
        assert_ne!(e.lease, 0, "online must be attached to a lease");
        p.remove("tproxy");
        assert!(p.flush().await);
        assert!(kv.get("/updated/a/tproxy").await.unwrap().is_none());
        p.shutdown().await;
        assert!(
            kv.get("/updated/a/online").await.unwrap().is_none(),
            "shutdown revokes the lease"
        );
    }

    #[tokio::test]
    async fn applied_is_written_after_the_rest_of_its_pass() {
        let kv = MemKv::new();
        let p = StatusPublisher::spawn(Arc::new(kv.clone()), "a", fast());
        assert!(p.flush().await);
        p.set_errors(&[]);
        p.set_applied(7);
        p.set("last", "1 applied revision 7");
        p.set("tproxy", "applied 1 ok");
        assert!(p.flush().await);
        let rev = |k: &str| {
            let kv = kv.clone();
            let key = format!("/updated/a/{k}");
            async move { kv.get(&key).await.unwrap().unwrap().mod_revision }
        };
        let applied = rev("applied").await;
        for k in ["errors", "last", "tproxy"] {
            assert!(rev(k).await < applied, "{k} must be written before applied");
        }
        p.shutdown().await;
    }

    #[tokio::test]
    async fn queue_survives_an_outage_newest_value_wins() {
        let kv = MemKv::new();
        let p = StatusPublisher::spawn(Arc::new(kv.clone()), "a", fast());
        assert!(p.flush().await);
        kv.set_down(true);
        p.set("last", "1 first");
        p.set("last", "2 second");
        p.set_errors(&[]);
        assert!(
            !p.flush().await,
            "nothing can be written while etcd is down"
        );
        // While down, the lease expired.
        kv.expire_all_leases();
        assert!(!kv.dump().contains_key("/updated/a/online"));
        kv.set_down(false);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let d = kv.dump();
            if d.get("/updated/a/last").map(String::as_str) == Some("2 second")
                && d.get("/updated/a/online").map(String::as_str) == Some("1")
                && d.get("/updated/a/errors").map(String::as_str) == Some("[]")
            {
                break;
            }
            assert!(Instant::now() < deadline, "queue not flushed: {d:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(kv.leases().len(), 1, "a fresh lease was granted");
    }

    #[tokio::test]
    async fn expired_lease_is_regranted() {
        let kv = MemKv::new();
        let p = StatusPublisher::spawn(Arc::new(kv.clone()), "a", fast());
        assert!(p.flush().await);
        kv.expire_all_leases();
        assert!(kv.get("/updated/a/online").await.unwrap().is_none());
        let deadline = Instant::now() + Duration::from_secs(5);
        while kv.get("/updated/a/online").await.unwrap().is_none() {
            assert!(Instant::now() < deadline, "online not re-put");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
