//! Status publishing under `/updated/<id>/` (DESIGN §4) and reading it back for
//! `meduza status`.
//!
//! [`StatusPublisher`] never blocks its caller: `set` hands the value to a task over a
//! channel. The task keeps the `online` key on a lease (TTL 15 s, refreshed every
//! 5 s, re-granted and re-put when it expired or etcd lost it), writes a key only when
//! its value changed, and while etcd is unreachable keeps the newest value per key in a
//! pending map that is flushed when etcd answers again (at the end of the retry
//! backoff, or at once when the client reports a member back). After an outage every
//! known key is written once more, in case etcd came back from an older backup.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use super::kv::{KeyRange, Kv};
use super::watch::COMMIT_KEY;
use super::EtcdError;
use crate::backoff::{Backoff, Jitter};

/// Root of every node's status keys.
pub const STATUS_ROOT: &str = "/updated/";
/// The failover log keeps at most this many entries (DESIGN §4).
pub const FAILOVER_LOG_MAX: usize = 100;

/// One validation error, as published in `errors`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorEntry {
    pub key: String,
    pub value: String,
    pub reason: String,
}

/// One entry of `dns/failover_log`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverEntry {
    pub ts: u64,
    pub upstream: String,
    pub action: String,
    pub reason: String,
}

/// `rollback`: the last automatic rollback (docs/operations.md, "Automatic rollback").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackEntry {
    /// The commit revision that was rolled back (and is not applied again).
    pub revision: i64,
    pub reason: String,
    /// When it was rolled back, seconds since the epoch (like `ts` elsewhere).
    pub at: u64,
}

/// The JSON object for `rollback`.
pub fn rollback_value(entry: &RollbackEntry) -> String {
    serde_json::to_string(entry).unwrap_or_else(|_| "{}".to_owned())
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `"<unix-ts> <reason>"` for `last`.
pub fn last_value(ts: u64, reason: &str) -> String {
    format!("{ts} {reason}")
}

/// `"<commit-revision> <unix-ts>"` for `applied`.
pub fn applied_value(revision: i64, ts: u64) -> String {
    format!("{revision} {ts}")
}

/// `"<state> <unix-ts>[ <detail>]"` for the per-service, tunnel, clash, tproxy and
/// upstream keys.
pub fn state_value(state: &str, ts: u64, detail: Option<&str>) -> String {
    match detail {
        Some(d) if !d.is_empty() => format!("{state} {ts} {d}"),
        _ => format!("{state} {ts}"),
    }
}

/// Suffix of `api_tls`: set while the node API serves HTTPS, absent otherwise.
pub const API_TLS_SUFFIX: &str = "api_tls";

/// `"<sha256-hex> <unix-ts> <source>"` for `api_tls`: the SHA-256 of the certificate
/// the node API serves, and where it came from (`etcd` or `file`).
pub fn api_tls_value(fingerprint: &crate::tls::Fingerprint, ts: u64, source: &str) -> String {
    state_value(&fingerprint.to_string(), ts, Some(source))
}

/// The fingerprint in an `api_tls` value (the fleet manager's reader).
pub fn api_tls_fingerprint(value: &str) -> Option<crate::tls::Fingerprint> {
    value.split_whitespace().next()?.parse().ok()
}

/// The JSON array for `warnings` (`[]` when none): the node's and the global unknown
/// keys, `{key, reason, did_you_mean}` (`meduza_generators::Warning`).
pub fn warnings_value(warnings: &[meduza_generators::Warning]) -> String {
    serde_json::to_string(warnings).unwrap_or_else(|_| "[]".to_owned())
}

/// The JSON array for `errors` (`[]` when none).
pub fn errors_value(errors: &[ErrorEntry]) -> String {
    serde_json::to_string(errors).unwrap_or_else(|_| "[]".to_owned())
}

/// The JSON array for `dns/failover_log`: the newest [`FAILOVER_LOG_MAX`] entries,
/// newest last.
pub fn failover_log_value(entries: &[FailoverEntry]) -> String {
    let start = entries.len().saturating_sub(FAILOVER_LOG_MAX);
    serde_json::to_string(&entries[start..]).unwrap_or_else(|_| "[]".to_owned())
}

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
            prefix: format!("{STATUS_ROOT}{node_id}/"),
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

    /// Sets `/updated/<id>/<suffix>`; returns at once.
    pub fn set(&self, suffix: &str, value: impl Into<String>) {
        // A send fails only after the task ended (shutdown); nothing to publish then.
        let _ = self
            .tx
            .send(Cmd::Set(suffix.to_owned(), Some(value.into())));
    }

    /// Deletes `/updated/<id>/<suffix>` (e.g. a removed service); returns at once.
    pub fn remove(&self, suffix: &str) {
        let _ = self.tx.send(Cmd::Set(suffix.to_owned(), None));
    }

    /// `last` = `"<now> <reason>"`.
    pub fn set_last(&self, reason: &str) {
        self.set("last", last_value(unix_now(), reason));
    }

    /// `applied` = `"<revision> <now>"` after a snapshot was fully applied.
    pub fn set_applied(&self, commit_revision: i64) {
        self.set("applied", applied_value(commit_revision, unix_now()));
    }

    /// `errors` = JSON array (`[]` when none).
    pub fn set_errors(&self, errors: &[ErrorEntry]) {
        self.set("errors", errors_value(errors));
    }

    /// `services/<svc>/status` = `"starting|running|backoff|fatal|stopped <now>"`.
    pub fn set_service(&self, svc: &str, state: &str) {
        self.set(
            &format!("services/{svc}/status"),
            state_value(state, unix_now(), None),
        );
    }

    /// `openvpn/<name>/status` = `"up|connecting|down <now>"`.
    pub fn set_openvpn(&self, name: &str, state: &str) {
        self.set(
            &format!("openvpn/{name}/status"),
            state_value(state, unix_now(), None),
        );
    }

    /// `wireguard/<name>/status` = `"up|connecting|down <now>"`.
    pub fn set_wireguard(&self, name: &str, state: &str) {
        self.set(
            &format!("wireguard/{name}/status"),
            state_value(state, unix_now(), None),
        );
    }

    /// `clash/health` = `"healthy|waiting|unhealthy <now> <reason>"`.
    pub fn set_clash_health(&self, state: &str, reason: &str) {
        self.set("clash/health", state_value(state, unix_now(), Some(reason)));
    }

    /// `tproxy` = `"applied|removed <now> <reason>"`.
    pub fn set_tproxy(&self, state: &str, reason: &str) {
        self.set("tproxy", state_value(state, unix_now(), Some(reason)));
    }

    /// `dns/upstreams/<name>/status` = `"healthy|degraded|down|unknown <now> <latency-ms>"`.
    pub fn set_dns_upstream(&self, name: &str, state: &str, latency_ms: Option<u64>) {
        let latency = latency_ms.map(|l| l.to_string());
        self.set(
            &format!("dns/upstreams/{name}/status"),
            state_value(state, unix_now(), latency.as_deref()),
        );
    }

    /// `api_tls` = `"<sha256> <now> <source>"` while the node API serves HTTPS;
    /// removed when it serves plain HTTP.
    pub fn set_api_tls(&self, tls: Option<(&crate::tls::Fingerprint, &str)>) {
        match tls {
            Some((fp, source)) => self.set(API_TLS_SUFFIX, api_tls_value(fp, unix_now(), source)),
            None => self.remove(API_TLS_SUFFIX),
        }
    }

    /// `dns/failover_log` = JSON array, newest last, at most 100 entries.
    pub fn set_failover_log(&self, entries: &[FailoverEntry]) {
        self.set("dns/failover_log", failover_log_value(entries));
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
            let key = format!("{}online", self.prefix);
            match self.kv.put_with_lease(&key, "1", id).await {
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

/// A node's published status, as `meduza status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NodeStatus {
    pub node_id: String,
    pub online: bool,
    pub last: Option<String>,
    pub applied: Option<String>,
    /// The revision in `applied`.
    pub applied_revision: Option<i64>,
    /// The mod revision of `/commit` now.
    pub commit_revision: Option<i64>,
    pub errors: Vec<ErrorEntry>,
    /// Set when `errors` is not a JSON array of entries.
    pub errors_unparsed: Option<String>,
    pub services: BTreeMap<String, String>,
    pub openvpn: BTreeMap<String, String>,
    pub wireguard: BTreeMap<String, String>,
    pub clash_health: Option<String>,
    pub tproxy: Option<String>,
    pub dns_upstreams: BTreeMap<String, String>,
    pub failover_log: Vec<FailoverEntry>,
    /// Keys under the node's status prefix this version does not know.
    pub other: BTreeMap<String, String>,
}

impl NodeStatus {
    /// Whether the node applied the current `/commit`; `None` when unknown.
    pub fn up_to_date(&self) -> Option<bool> {
        match (self.applied_revision, self.commit_revision) {
            (Some(a), Some(c)) => Some(a >= c),
            (Some(_), None) => Some(true),
            _ => None,
        }
    }

    /// Builds the status from the keys under `/updated/<id>/` (prefix stripped).
    pub fn from_keys(
        node_id: &str,
        keys: &BTreeMap<String, String>,
        commit_revision: Option<i64>,
    ) -> Self {
        let mut st = NodeStatus {
            node_id: node_id.to_owned(),
            commit_revision,
            ..NodeStatus::default()
        };
        for (k, v) in keys {
            let parts: Vec<&str> = k.split('/').collect();
            match parts.as_slice() {
                ["online"] => st.online = v == "1",
                ["last"] => st.last = Some(v.clone()),
                ["applied"] => {
                    st.applied_revision = v.split_whitespace().next().and_then(|r| r.parse().ok());
                    st.applied = Some(v.clone());
                }
                ["errors"] => match serde_json::from_str::<Vec<ErrorEntry>>(v) {
                    Ok(e) => st.errors = e,
                    Err(_) => st.errors_unparsed = Some(v.clone()),
                },
                ["services", svc, "status"] => {
                    st.services.insert((*svc).to_owned(), v.clone());
                }
                ["openvpn", name, "status"] => {
                    st.openvpn.insert((*name).to_owned(), v.clone());
                }
                ["wireguard", name, "status"] => {
                    st.wireguard.insert((*name).to_owned(), v.clone());
                }
                ["clash", "health"] => st.clash_health = Some(v.clone()),
                ["tproxy"] => st.tproxy = Some(v.clone()),
                ["dns", "upstreams", name, "status"] => {
                    st.dns_upstreams.insert((*name).to_owned(), v.clone());
                }
                ["dns", "failover_log"] => {
                    st.failover_log = serde_json::from_str(v).unwrap_or_default();
                }
                _ => {
                    st.other.insert(k.clone(), v.clone());
                }
            }
        }
        st
    }
}

/// Reads a node's status and the current `/commit` revision.
pub async fn read_status(kv: &dyn Kv, node_id: &str) -> Result<NodeStatus, EtcdError> {
    let prefix = format!("{STATUS_ROOT}{node_id}/");
    let (keys, _) = kv.get_ranges(&[KeyRange::Prefix(prefix.clone())]).await?;
    let keys: BTreeMap<String, String> = keys
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|s| (s.to_owned(), v)))
        .collect();
    let commit = kv.get(COMMIT_KEY).await?.map(|e| e.mod_revision);
    Ok(NodeStatus::from_keys(node_id, &keys, commit))
}

/// The terminal table of `meduza status`.
pub fn render_status_table(st: &NodeStatus) -> String {
    let mut out = String::new();
    let mut row = |name: &str, value: &str| {
        let _ = writeln!(out, "{name:<28} {value}");
    };
    row("node", &st.node_id);
    row("online", if st.online { "yes" } else { "no" });
    row("last", st.last.as_deref().unwrap_or("-"));
    let applied = match (&st.applied, st.commit_revision, st.up_to_date()) {
        (None, Some(c), _) => format!("never (current /commit revision {c})"),
        (None, None, _) => "never".to_owned(),
        (Some(a), Some(c), Some(true)) => format!("{a} (up to date; /commit revision {c})"),
        (Some(a), Some(c), _) => format!("{a} (BEHIND: /commit revision {c})"),
        (Some(a), None, _) => format!("{a} (no /commit key)"),
    };
    row("applied", &applied);
    match &st.errors_unparsed {
        Some(raw) => row("errors", &format!("unreadable: {raw}")),
        None => row("errors", &st.errors.len().to_string()),
    }
    for e in &st.errors {
        row("", &format!("{} = {:?}: {}", e.key, e.value, e.reason));
    }
    for (name, v) in &st.services {
        row(&format!("service {name}"), v);
    }
    for (name, v) in &st.openvpn {
        row(&format!("openvpn {name}"), v);
    }
    for (name, v) in &st.wireguard {
        row(&format!("wireguard {name}"), v);
    }
    row("clash health", st.clash_health.as_deref().unwrap_or("-"));
    row("tproxy", st.tproxy.as_deref().unwrap_or("-"));
    for (name, v) in &st.dns_upstreams {
        row(&format!("dns upstream {name}"), v);
    }
    if let Some(last) = st.failover_log.last() {
        row(
            "dns failover log",
            &format!(
                "{} entries; last: {} {} {} ({})",
                st.failover_log.len(),
                last.ts,
                last.upstream,
                last.action,
                last.reason
            ),
        );
    }
    for (k, v) in &st.other {
        row(k, v);
    }
    out
}

/// The next pending key to write: in key order, but `applied` last, so a reader who
/// sees a new `applied` also sees the `errors` and `last` of the same pass (keys are
/// written one by one).
fn next_to_write(pending: &BTreeMap<String, Option<String>>) -> Option<(String, Option<String>)> {
    pending
        .iter()
        .find(|(k, _)| k.as_str() != "applied")
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

    #[test]
    fn values_have_the_documented_shape() {
        assert_eq!(last_value(1700000000, "commit 42"), "1700000000 commit 42");
        assert_eq!(applied_value(42, 1700000000), "42 1700000000");
        assert_eq!(state_value("running", 5, None), "running 5");
        assert_eq!(state_value("down", 5, Some("12")), "down 5 12");
        assert_eq!(errors_value(&[]), "[]");
        let e = ErrorEntry {
            key: "/nodes/a/lan".into(),
            value: "10.0.0.0/33".into(),
            reason: "not a CIDR".into(),
        };
        assert_eq!(
            errors_value(std::slice::from_ref(&e)),
            r#"[{"key":"/nodes/a/lan","value":"10.0.0.0/33","reason":"not a CIDR"}]"#
        );
        let log: Vec<FailoverEntry> = (0..150)
            .map(|i| FailoverEntry {
                ts: i,
                upstream: "u".into(),
                action: "failover".into(),
                reason: "r".into(),
            })
            .collect();
        let parsed: Vec<FailoverEntry> = serde_json::from_str(&failover_log_value(&log)).unwrap();
        assert_eq!(parsed.len(), FAILOVER_LOG_MAX);
        assert_eq!(parsed.first().unwrap().ts, 50);
        assert_eq!(parsed.last().unwrap().ts, 149, "newest last");
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

    #[tokio::test]
    async fn read_status_parses_and_renders() {
        let kv = MemKv::new();
        kv.put("/commit", "x").await.unwrap();
        let commit_rev = kv.revision();
        for (k, v) in [
            ("online", "1".to_owned()),
            ("last", "100 commit".to_owned()),
            ("applied", format!("{} 100", commit_rev - 1)),
            (
                "errors",
                errors_value(&[ErrorEntry {
                    key: "/nodes/a/lan".into(),
                    value: "bad".into(),
                    reason: "not a CIDR".into(),
                }]),
            ),
            ("services/mihomo/status", "running 100".to_owned()),
            ("wireguard/wg0/status", "up 100".to_owned()),
            ("clash/health", "healthy 100 ok".to_owned()),
            ("dns/upstreams/ali/status", "healthy 100 12".to_owned()),
            ("future/key", "v".to_owned()),
        ] {
            kv.put(&format!("/updated/a/{k}"), &v).await.unwrap();
        }
        kv.put("/updated/b/online", "1").await.unwrap();
        let st = read_status(&kv, "a").await.unwrap();
        assert!(st.online);
        assert_eq!(st.commit_revision, Some(commit_rev));
        assert_eq!(st.up_to_date(), Some(false));
        assert_eq!(st.errors.len(), 1);
        assert_eq!(st.services["mihomo"], "running 100");
        assert_eq!(st.other["future/key"], "v");
        let table = render_status_table(&st);
        assert!(table.contains("BEHIND"), "{table}");
        assert!(
            table.contains("/nodes/a/lan = \"bad\": not a CIDR"),
            "{table}"
        );
        assert!(table.contains("service mihomo"), "{table}");
        assert!(table.contains("dns upstream ali"), "{table}");

        let none = read_status(&kv, "zzz").await.unwrap();
        assert!(!none.online);
        assert!(render_status_table(&none).contains("never"));
    }
}
