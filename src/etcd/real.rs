//! [`EtcdKv`]: the [`Kv`] trait on etcd-client, with failover between the members of
//! an etcd cluster.
//!
//! etcd-client's `Client::connect(endpoints)` puts every endpoint into one tonic
//! balanced channel (tower's power-of-two-choices balancer over lazily reconnecting
//! connections). A dead member stays in that pool: its failed connect is stored and
//! handed to the next request routed to it, so a share of the calls keeps failing
//! while healthy members answer, and a frozen member (connection up, no answers)
//! takes requests that hang until our timeout. The channel has no notion of a member
//! being down, and etcd-client offers only `add_endpoint`/`remove_endpoint` on it. So
//! [`EtcdKv`] holds one `Client` per member (each a channel of one endpoint) and
//! chooses the member of every call itself with [`Failover`] (a pure state machine):
//! - a call tries the preferred member, and on a member failure (connection refused
//!   or reset, no leader, no answer within [`super::EtcdTimeouts::attempt`]) at once the
//!   next one, all within the request timeout;
//! - a failed member is avoided until it answers again; a background probe (a
//!   count-only linearizable read of `/commit`, which needs a leader and a quorum)
//!   tries it after a cool-off. A member that timed out is only ever retried by the
//!   probe, so a frozen member costs one attempt timeout once;
//! - every request carries etcd's "require leader" (`hasleader=true`, set by
//!   etcd-client's interceptor from `with_require_leader`): a member cut off from
//!   the leader refuses unary calls at once and cancels our watch streams after
//!   three election timeouts (etcd `v3rpc/interceptor.go`, `monitorLeader`);
//! - a watch stream that breaks or stalls (the watcher's progress check,
//!   [`WatchConn::mark_unresponsive`]) marks its member down, and the watcher
//!   re-creates it on a healthy one;
//! - an attempt still waiting on a member that something else marked down meanwhile
//!   (a frozen member found by the watch), or overtaken by a later request that was
//!   answered (a write dropped in a leader election, [`OVERTAKEN_AFTER`]), is given
//!   up and the call moves on.
//!
//! etcd-client neither reconnects a watch nor bounds a call while no endpoint is
//! ready (etcdv3/etcd-client#17, #48), so every attempt is bounded on our side. Each
//! member's client connects lazily (a daemon started before etcd must come up
//! anyway) and authenticates with that member; on an auth refusal the call
//! re-authenticates once and retries. Simple tokens are assigned through raft, so
//! every member knows a token another one issued.
//!
//! Writes are retried on another member after a timeout, when the first member may
//! have applied them: every write the daemon makes is idempotent (a whole value, a
//! compare-and-put, a delete); a lease granted twice leaves one unused lease that
//! expires after its TTL.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, CompactionOptions, Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, PutOptions,
    Txn, TxnOp, TxnOpResponse, WatchOptions, WatchStream,
};
use tokio::sync::{watch, Mutex};
use tokio::time::{sleep_until, Instant};
use tracing::{debug, info, warn};

use super::error::{is_auth_error, is_member_failure};
use super::failover::{Failover, FailoverPolicy, Failure, MemberState, Wait};
use super::kv::{EventKind, KeyRange, Kv, KvEntry, KvEvent, WatchConn, WatchMsg, WriteOp};
use super::watch::COMMIT_KEY;
use super::{EtcdConfig, EtcdError};

/// The real etcd, behind the [`Kv`] trait.
pub struct EtcdKv {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EtcdKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdKv")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// One member: its endpoint and its client, made on first use.
struct Member {
    endpoint: String,
    client: Mutex<Option<Client>>,
}

/// What the client and its watch streams and probes share.
struct Inner {
    config: EtcdConfig,
    members: Vec<Member>,
    health: std::sync::Mutex<Failover>,
    /// Bumped whenever a member goes down or comes back: waiting calls and open
    /// watch streams look at the health again.
    changed: watch::Sender<u64>,
    /// The start of the newest attempt a member answered: an older attempt still
    /// waiting was overtaken (see [`OVERTAKEN_AFTER`]).
    served: watch::Sender<Instant>,
    /// [`super::EtcdTimeouts::attempt`] for this many members.
    attempt: Duration,
}

/// An attempt still unanswered this long after it started, while an attempt that
/// started after it was answered, is given up and made again. A write that reached a
/// follower just before the leader died is forwarded to the dead leader and dropped
/// (raft drops proposals without a leader); etcd answers it only at its own request
/// timeout, seconds later, although the new leader serves new requests within one
/// election. A healthy member answers in milliseconds, so overtaking by this much
/// means the request is lost, not slow.
const OVERTAKEN_AFTER: Duration = Duration::from_millis(250);

/// How one attempt on one member failed.
enum AttemptError {
    /// The member's fault: try another one.
    Member(EtcdError, Failure),
    /// Given up because something else marked the member down meanwhile, or because
    /// a later attempt was answered first: try another one (nothing to record).
    Abandoned(EtcdError),
    /// The request's outcome (or a setting): every member would answer alike.
    Final(EtcdError),
}

impl EtcdKv {
    /// A client that connects on first use (and again after a failed connect).
    pub fn new(config: EtcdConfig) -> Self {
        let n = config.endpoints.len().max(1);
        let members = config
            .endpoints
            .iter()
            .map(|e| Member {
                endpoint: e.clone(),
                client: Mutex::new(None),
            })
            .collect();
        // A random first member and jitter seed: a fleet spreads over the cluster.
        let first = rand::random_range(0..n);
        let health = Failover::new(n, first, FailoverPolicy::default(), rand::random());
        let attempt = config.timeouts.attempt(n);
        EtcdKv {
            inner: Arc::new(Inner {
                config,
                members,
                health: std::sync::Mutex::new(health),
                changed: watch::Sender::new(0),
                served: watch::Sender::new(Instant::now()),
                attempt,
            }),
        }
    }

    /// A client connected (and authenticated) now, with a read answered by a member;
    /// fails if no member answers.
    pub async fn connect(config: EtcdConfig) -> Result<Self, EtcdError> {
        let kv = Self::new(config);
        kv.inner.run("connect", COMMIT_KEY, probe_read).await?;
        Ok(kv)
    }

    /// The settings this client uses.
    pub fn config(&self) -> &EtcdConfig {
        &self.inner.config
    }

    async fn call<T, F, Fut>(&self, op: &'static str, key: &str, f: F) -> Result<T, EtcdError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.inner.run(op, key, f).await.map(|(_, v)| v)
    }
}

/// The probe: a count-only read of `/commit`. Linearizable, so only a member that
/// reaches the leader and a quorum answers it.
async fn probe_read(mut c: Client) -> Result<(), etcd_client::Error> {
    c.get(COMMIT_KEY, Some(GetOptions::new().with_count_only()))
        .await
        .map(|_| ())
}

impl Inner {
    fn health(&self) -> std::sync::MutexGuard<'_, Failover> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_up(&self, i: usize) -> bool {
        self.health().is_up(i)
    }

    /// The member's client, made (and authenticated) on first use.
    async fn client(&self, i: usize) -> Result<Client, AttemptError> {
        let member = &self.members[i];
        let mut guard = member.client.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let opts = self.config.connect_options().map_err(AttemptError::Final)?;
        match Client::connect([member.endpoint.as_str()], Some(opts)).await {
            Ok(c) => {
                debug!(member = %member.endpoint, "etcd client connected");
                *guard = Some(c.clone());
                Ok(c)
            }
            Err(source) => {
                let failure = is_member_failure(&source);
                let err = EtcdError::Connect {
                    endpoints: member.endpoint.clone(),
                    source,
                };
                Err(if failure {
                    AttemptError::Member(err, Failure::Refused)
                } else {
                    AttemptError::Final(err)
                })
            }
        }
    }

    fn classify(op: &'static str, key: &str, source: etcd_client::Error) -> AttemptError {
        let member = is_member_failure(&source);
        let err = EtcdError::Rpc {
            op,
            key: key.to_owned(),
            source,
        };
        if member {
            AttemptError::Member(err, Failure::Refused)
        } else {
            AttemptError::Final(err)
        }
    }

    /// One attempt of `f` on member `i`, bounded by `limit`; on an auth refusal it
    /// re-authenticates and retries once. A call's attempt (`may_give_up`) is given up
    /// early when the member is marked down meanwhile or the attempt is overtaken; a
    /// probe's is not: it is there to wait for a member that does not answer.
    async fn attempt<T, F, Fut>(
        &self,
        i: usize,
        op: &'static str,
        key: &str,
        limit: Duration,
        may_give_up: bool,
        f: &F,
    ) -> Result<T, AttemptError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let work = async {
            let client = self.client(i).await?;
            match f(client.clone()).await {
                Err(e) if is_auth_error(&e) && self.config.user.is_some() => {
                    warn!(op, key, member = %self.members[i].endpoint, err = %e,
                        "etcd refused the auth token; re-authenticating");
                    client
                        .refresh_token()
                        .await
                        .map_err(|e| Self::classify("authenticate", key, e))?;
                    f(client).await.map_err(|e| Self::classify(op, key, e))
                }
                other => other.map_err(|e| Self::classify(op, key, e)),
            }
        };
        let started = Instant::now();
        let mut changes = self.changed.subscribe();
        // The member went down after this attempt started (a member that was down
        // already, retried after its cool-off or by its probe, is not given up on).
        let marked_down = async {
            if !may_give_up {
                std::future::pending::<()>().await;
            }
            loop {
                if changes.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
                if let MemberState::Down { since, .. } = self.health().state(i) {
                    if since >= started {
                        return;
                    }
                }
            }
        };
        let mut served = self.served.subscribe();
        let overtaken = async {
            if !may_give_up {
                std::future::pending::<()>().await;
            }
            loop {
                if served.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
                if *served.borrow_and_update() > started {
                    sleep_until(started + OVERTAKEN_AFTER).await;
                    return;
                }
            }
        };
        let abandoned = |why: &str| {
            AttemptError::Abandoned(EtcdError::Rpc {
                op,
                key: key.to_owned(),
                source: etcd_client::Error::GRpcStatus(tonic::Status::unavailable(format!(
                    "gave up on member {}: {why}",
                    self.members[i].endpoint
                ))),
            })
        };
        let res = tokio::select! {
            biased;
            res = tokio::time::timeout(limit, work) => match res {
                Ok(res) => res,
                Err(_) => Err(AttemptError::Member(
                    EtcdError::Timeout {
                        op,
                        key: key.to_owned(),
                        timeout: limit,
                    },
                    Failure::TimedOut,
                )),
            },
            () = marked_down => Err(abandoned("marked unavailable while the call waited")),
            () = overtaken => Err(abandoned("a later request was answered first")),
        };
        if matches!(res, Ok(_) | Err(AttemptError::Final(_))) {
            self.served.send_if_modified(|t| {
                let newer = started > *t;
                if newer {
                    *t = started;
                }
                newer
            });
        }
        res
    }

    /// Records the outcome of an attempt on member `i` (`None`: it answered).
    fn record(self: &Arc<Self>, i: usize, outcome: Option<(Failure, &EtcdError)>) {
        let now = Instant::now();
        let rec = {
            let mut h = self.health();
            match outcome {
                None => h.succeeded(i, now),
                Some((failure, _)) => h.failed(i, failure, now),
            }
        };
        let member = &self.members[i].endpoint;
        match outcome {
            None if rec.transition => info!(member = %member, "etcd member answers again"),
            None => {}
            Some((failure, err)) if rec.transition => warn!(member = %member, ?failure, %err,
                "etcd member unavailable; using the others until it answers again"),
            Some((failure, err)) => {
                debug!(member = %member, ?failure, %err, "etcd member still unavailable")
            }
        }
        if rec.transition {
            self.changed.send_modify(|g| *g = g.wrapping_add(1));
        }
        if rec.start_probe {
            tokio::spawn(probe(Arc::downgrade(self), i));
        }
    }

    /// Runs `f` on the best member, moving on to the next one at once when a member
    /// fails, within the request timeout; returns the member that answered.
    async fn run<T, F, Fut>(
        self: &Arc<Self>,
        op: &'static str,
        key: &str,
        f: F,
    ) -> Result<(usize, T), EtcdError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.config.timeouts.request;
        let mut tried = vec![false; self.members.len()];
        let mut last: Option<EtcdError> = None;
        loop {
            let mut changed = self.changed.subscribe();
            let now = Instant::now();
            let next = self
                .health()
                .candidates(now)
                .into_iter()
                .find(|&i| !tried[i]);
            if let Some(i) = next {
                tried[i] = true;
                let limit = self.attempt.min(deadline.saturating_duration_since(now));
                if limit.is_zero() {
                    break;
                }
                match self.attempt(i, op, key, limit, true, &f).await {
                    Ok(v) => {
                        self.record(i, None);
                        return Ok((i, v));
                    }
                    Err(AttemptError::Final(e)) => {
                        self.record(i, None);
                        return Err(e);
                    }
                    Err(AttemptError::Member(e, failure)) => {
                        self.record(i, Some((failure, &e)));
                        last = Some(e);
                    }
                    Err(AttemptError::Abandoned(e)) => {
                        debug!(op, key, err = %e, "etcd attempt given up; trying the next member");
                        last = Some(e);
                    }
                }
                continue;
            }
            let wait = self.health().wait(now, deadline);
            match wait {
                Wait::Retry => {}
                Wait::GiveUp => break,
                Wait::Until(until) => {
                    tokio::select! {
                        _ = changed.changed() => {}
                        _ = sleep_until(until) => {}
                    }
                }
            }
            tried.fill(false);
        }
        Err(last.unwrap_or_else(|| EtcdError::Unreachable {
            op,
            key: key.to_owned(),
            members: self.describe(),
        }))
    }

    /// Every member's state, for an error message.
    fn describe(&self) -> String {
        let now = Instant::now();
        let h = self.health();
        self.members
            .iter()
            .enumerate()
            .map(|(i, m)| match h.state(i) {
                MemberState::Up if i == h.preferred() => format!("{} up, preferred", m.endpoint),
                MemberState::Up => format!("{} up", m.endpoint),
                MemberState::Down { since, last, .. } => format!(
                    "{} down for {:.1}s ({})",
                    m.endpoint,
                    now.saturating_duration_since(since).as_secs_f64(),
                    match last {
                        Failure::Refused => "refused",
                        Failure::TimedOut => "timed out",
                    }
                ),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A fresh token from the first member that gives one (no-op without a user).
    async fn reauthenticate(self: &Arc<Self>) -> Result<(), EtcdError> {
        if self.config.user.is_none() {
            return Ok(());
        }
        let candidates = self.health().candidates(Instant::now());
        let mut last = None;
        for i in candidates {
            // A member without a client (or still making one) authenticates when it
            // makes it.
            let client = match self.members[i].client.try_lock() {
                Ok(guard) => guard.clone(),
                Err(_) => None,
            };
            let Some(client) = client else { continue };
            match tokio::time::timeout(self.attempt, client.refresh_token()).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(source)) => {
                    last = Some(EtcdError::Rpc {
                        op: "authenticate",
                        key: String::new(),
                        source,
                    })
                }
                Err(_) => {
                    last = Some(EtcdError::Timeout {
                        op: "authenticate",
                        key: String::new(),
                        timeout: self.attempt,
                    })
                }
            }
        }
        last.map_or(Ok(()), Err)
    }
}

/// Tries member `i` after each cool-off until it answers; ends early when a call got
/// an answer from it first, or when the client is dropped.
async fn probe(inner: std::sync::Weak<Inner>, i: usize) {
    loop {
        let due = {
            let Some(inner) = inner.upgrade() else { return };
            let due = inner.health().probe_due(i);
            due
        };
        let Some(at) = due else { return };
        sleep_until(at).await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.is_up(i) {
            continue;
        }
        match inner
            .attempt(i, "probe", COMMIT_KEY, inner.attempt, false, &probe_read)
            .await
        {
            Ok(()) | Err(AttemptError::Final(_)) => inner.record(i, None),
            Err(AttemptError::Member(e, failure)) => inner.record(i, Some((failure, &e))),
            Err(AttemptError::Abandoned(_)) => {}
        }
    }
}

fn range_options(range: &KeyRange) -> (String, GetOptions) {
    match range {
        KeyRange::Key(k) => (k.clone(), GetOptions::new()),
        KeyRange::Prefix(p) if p.is_empty() => (String::new(), GetOptions::new().with_all_keys()),
        KeyRange::Prefix(p) => (p.clone(), GetOptions::new().with_prefix()),
    }
}

fn utf8_pair(kv: &KeyValue) -> Result<(String, String), EtcdError> {
    let key = String::from_utf8_lossy(kv.key()).into_owned();
    match (kv.key_str(), kv.value_str()) {
        (Ok(k), Ok(v)) => Ok((k.to_owned(), v.to_owned())),
        _ => Err(EtcdError::NotUtf8 { key }),
    }
}

fn entry(kv: &KeyValue) -> Result<KvEntry, EtcdError> {
    let (key, value) = utf8_pair(kv)?;
    Ok(KvEntry {
        key,
        value,
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: kv.lease(),
    })
}

#[async_trait]
impl Kv for EtcdKv {
    async fn get(&self, key: &str) -> Result<Option<KvEntry>, EtcdError> {
        let resp = self
            .call("get", key, |mut c| async move { c.get(key, None).await })
            .await?;
        resp.kvs().first().map(entry).transpose()
    }

    async fn get_ranges(
        &self,
        ranges: &[KeyRange],
    ) -> Result<(BTreeMap<String, String>, i64), EtcdError> {
        let label = ranges
            .iter()
            .map(KeyRange::as_str)
            .collect::<Vec<_>>()
            .join(",");
        let resp = self
            .call("get", &label, |mut c| {
                let txn = Txn::new().and_then(
                    ranges
                        .iter()
                        .map(|r| {
                            let (k, o) = range_options(r);
                            TxnOp::get(k, Some(o))
                        })
                        .collect::<Vec<_>>(),
                );
                async move { c.txn(txn).await }
            })
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
        let mut out = BTreeMap::new();
        for op in resp.op_responses() {
            if let TxnOpResponse::Get(get) = op {
                for kv in get.kvs() {
                    let (k, v) = utf8_pair(kv)?;
                    out.insert(k, v);
                }
            }
        }
        Ok((out, revision))
    }

    async fn put(&self, key: &str, value: &str) -> Result<i64, EtcdError> {
        let resp = self
            .call(
                "put",
                key,
                |mut c| async move { c.put(key, value, None).await },
            )
            .await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or_default())
    }

    async fn put_with_lease(&self, key: &str, value: &str, lease: i64) -> Result<i64, EtcdError> {
        let resp = self
            .call("put", key, |mut c| async move {
                c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                    .await
            })
            .await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or_default())
    }

    async fn put_if_changed(&self, key: &str, value: &str) -> Result<bool, EtcdError> {
        // A value compare on a missing key is false (etcd `applyCompare`), so a
        // missing key also takes the put branch.
        let resp = self
            .call("put", key, |mut c| {
                let txn = Txn::new()
                    .when([Compare::value(key, CompareOp::Equal, value)])
                    .or_else([TxnOp::put(key, value, None)]);
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(!resp.succeeded())
    }

    async fn write_batch(&self, ops: &[WriteOp]) -> Result<i64, EtcdError> {
        let key = ops.first().map(WriteOp::key).unwrap_or_default();
        let resp = self
            .call("txn", key, |mut c| {
                let txn = Txn::new().and_then(
                    ops.iter()
                        .map(|op| match op {
                            WriteOp::Put { key, value } => {
                                TxnOp::put(key.as_str(), value.as_str(), None)
                            }
                            WriteOp::Delete { key } => TxnOp::delete(key.as_str(), None),
                        })
                        .collect::<Vec<_>>(),
                );
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or_default())
    }

    async fn delete(&self, key: &str) -> Result<i64, EtcdError> {
        let resp = self
            .call(
                "delete",
                key,
                |mut c| async move { c.delete(key, None).await },
            )
            .await?;
        Ok(resp.deleted())
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<i64, EtcdError> {
        let opts = if prefix.is_empty() {
            DeleteOptions::new().with_all_keys()
        } else {
            DeleteOptions::new().with_prefix()
        };
        let resp = self
            .call("delete", prefix, |mut c| {
                let opts = opts.clone();
                async move { c.delete(prefix, Some(opts)).await }
            })
            .await?;
        Ok(resp.deleted())
    }

    async fn compact(&self, revision: i64) -> Result<(), EtcdError> {
        let key = revision.to_string();
        self.call("compact", &key, |mut c| async move {
            c.compact(revision, Some(CompactionOptions::new().with_physical()))
                .await
        })
        .await?;
        Ok(())
    }

    async fn lease_grant(&self, ttl_secs: i64) -> Result<i64, EtcdError> {
        let resp = self
            .call("lease-grant", "", |mut c| async move {
                c.lease_grant(ttl_secs, None).await
            })
            .await?;
        Ok(resp.id())
    }

    async fn lease_keep_alive(&self, id: i64) -> Result<bool, EtcdError> {
        let key = format!("{id:x}");
        // `lease_keep_alive` sends one request and reads its answer before returning;
        // it reports an expired lease (TTL <= 0) as this error.
        let res = self
            .call("lease-keep-alive", &key, |mut c| async move {
                c.lease_keep_alive(id).await.map(|_| ())
            })
            .await;
        match res {
            Ok(()) => Ok(true),
            Err(EtcdError::Rpc {
                source: etcd_client::Error::LeaseKeepAliveError(_),
                ..
            }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        let key = format!("{id:x}");
        let res = self
            .call("lease-revoke", &key, |mut c| async move {
                c.lease_revoke(id).await
            })
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(EtcdError::Rpc {
                source: etcd_client::Error::GRpcStatus(s),
                ..
            }) if s.code() == tonic::Code::NotFound => Err(EtcdError::LeaseNotFound { id }),
            Err(e) => Err(e),
        }
    }

    async fn watch(&self, ranges: &[(KeyRange, i64)]) -> Result<Box<dyn WatchConn>, EtcdError> {
        let Some((first, rest)) = ranges.split_first() else {
            return Err(EtcdError::Watch {
                reason: "no range to watch".into(),
            });
        };
        let opts = |(r, start): &(KeyRange, i64)| {
            let o = WatchOptions::new().with_start_revision((*start).max(0));
            match r {
                KeyRange::Key(_) => o,
                KeyRange::Prefix(p) if p.is_empty() => o.with_all_keys(),
                KeyRange::Prefix(_) => o.with_prefix(),
            }
        };
        let (member, stream) = self
            .inner
            .run("watch", first.0.as_str(), |mut c| async move {
                let mut s = c.watch(first.0.as_str(), Some(opts(first))).await?;
                for r in rest {
                    s.watch(r.0.as_str(), Some(opts(r))).await?;
                }
                Ok(s)
            })
            .await?;
        debug!(member = %self.inner.members[member].endpoint, "etcd watch stream opened");
        Ok(Box::new(RealWatch {
            stream,
            inner: Arc::clone(&self.inner),
            member,
        }))
    }

    async fn reauthenticate(&self) -> Result<(), EtcdError> {
        self.inner.reauthenticate().await
    }

    async fn recovered(&self) {
        let mut changes = self.inner.changed.subscribe();
        loop {
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            // A change is a member going down or coming back; only the latter counts.
            let h = self.inner.health();
            let back = (0..self.inner.members.len()).any(|i| h.is_up(i));
            drop(h);
            if back {
                return;
            }
        }
    }
}

/// A watch stream on one member. Its own errors and stalls mark the member down; it
/// does not end when other calls mark its member down: a unary call that timed out
/// because the cluster is electing a leader says nothing about a watch stream, which
/// goes on delivering after the election, and a frozen member is caught by the
/// watcher's own progress check within `progress_interval + stall_timeout`.
struct RealWatch {
    stream: WatchStream,
    inner: Arc<Inner>,
    member: usize,
}

impl RealWatch {
    fn broken(&self, source: &etcd_client::Error) -> EtcdError {
        let err = EtcdError::Watch {
            reason: source.to_string(),
        };
        if is_member_failure(source) {
            self.inner
                .record(self.member, Some((Failure::Refused, &err)));
        }
        err
    }
}

#[async_trait]
impl WatchConn for RealWatch {
    async fn next(&mut self) -> Result<Option<WatchMsg>, EtcdError> {
        let resp = match self.stream.message().await {
            Ok(r) => r,
            Err(e) => return Err(self.broken(&e)),
        };
        let Some(resp) = resp else {
            // The member closed the stream (it is stopping, or was removed).
            let err = EtcdError::Watch {
                reason: "stream closed by the server".into(),
            };
            self.inner
                .record(self.member, Some((Failure::Refused, &err)));
            return Ok(None);
        };
        let mut events = Vec::with_capacity(resp.events().len());
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let kind = match ev.event_type() {
                etcd_client::EventType::Put => EventKind::Put,
                etcd_client::EventType::Delete => EventKind::Delete,
            };
            let (key, value) = utf8_pair(kv)?;
            events.push(KvEvent {
                kind,
                key,
                value,
                mod_revision: kv.mod_revision(),
            });
        }
        Ok(Some(WatchMsg {
            header_revision: resp.header().map(|h| h.revision()).unwrap_or_default(),
            created: resp.created(),
            canceled: resp.canceled(),
            compact_revision: resp.compact_revision(),
            cancel_reason: resp.cancel_reason().to_owned(),
            events,
        }))
    }

    async fn request_progress(&mut self) -> Result<(), EtcdError> {
        self.stream
            .request_progress()
            .await
            .map_err(|e| EtcdError::Watch {
                reason: e.to_string(),
            })
    }

    fn mark_unresponsive(&mut self) {
        let err = EtcdError::Watch {
            reason: "progress request unanswered".into(),
        };
        self.inner
            .record(self.member, Some((Failure::TimedOut, &err)));
    }
}
