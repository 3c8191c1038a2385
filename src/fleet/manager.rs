//! The fleet manager's loop: read the registry ([`super::registry`]), pull every
//! node's `/v1/stats` over [`super::client`] (directly, else through `/fleet/proxy`:
//! the route choice, `direct_then_proxy`, is the client's),
//! fetch its `/v1/status` and failover log for the web page, and compute push/pull
//! status.
//!
//! Owns: the in-memory fleet view (published on a `watch` channel), usage accounting
//! and, when enabled, `/fleet/status/<id>`. Must not: write any node's configuration
//! or show a token — node tokens are read from `/nodes/<id>/api/token` and only ever
//! sent in an `Authorization` header to that node, over TLS when the node has it
//! ([`Registered::tls_refusal`]).

pub use super::client::{origin, HttpNodeClient, NodeClient, NodeTrust, PullError};

use super::client::direct_then_proxy;
pub use super::registry::{load_node, load_registry, NodeAccess, Published, Registered, Registry};

use super::status::{
    pull_status, push_status, usage_total, NodeFacts, PullStatus, PushStatus, Route, Usage,
};
use super::FleetError;
use crate::api::{ConfigError, ConfigStore, FailoverLogEntry, NodeStatus, Stat};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tracing::{debug, info, warn};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Why a console request to a node failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeCallError {
    #[error("no node {id} in /fleet/nodes/")]
    Unknown { id: String },
    #[error(transparent)]
    Registry(#[from] FleetError),
    #[error(transparent)]
    Node(#[from] PullError),
}

/// Tunables (DESIGN §9 defaults: pull every 10 s, pull unavailable after 60 s).
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub pull_interval: Duration,
    pub pull_threshold: Duration,
    /// Write `/fleet/status/<id>` after each round.
    pub publish: bool,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            pull_interval: Duration::from_secs(10),
            pull_threshold: Duration::from_millis(super::status::PULL_THRESHOLD_MS),
            publish: false,
        }
    }
}

/// Pull memory of one node.
#[derive(Debug, Clone, Default)]
struct PullState {
    first_seen_ms: u64,
    last_pull: Option<(u64, Route)>,
    last_attempt_ms: Option<u64>,
    last_error: Option<String>,
    usage: Usage,
    status: Option<NodeStatus>,
    failover_log: Vec<FailoverLogEntry>,
}

/// One row of the fleet view (table and web page). Holds no secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRow {
    pub id: String,
    pub api_url: String,
    pub online: bool,
    pub push: PushStatus,
    pub pull: PullStatus,
    pub applied_revision: Option<i64>,
    pub commit_revision: Option<i64>,
    pub errors: Vec<ConfigError>,
    pub usage_bytes: u64,
    pub last_pull_ms: Option<u64>,
    pub route: Option<Route>,
    pub last_error: Option<String>,
    pub has_token: bool,
    /// The node's `/v1/status` from the last successful fetch.
    pub status: Option<NodeStatus>,
    pub failover_log: Vec<FailoverLogEntry>,
}

/// The whole fleet at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct FleetView {
    pub generated_ms: u64,
    pub commit_revision: Option<i64>,
    pub proxy_configured: bool,
    pub nodes: Vec<NodeRow>,
}

struct PullOutcome {
    route: Route,
    stats: Vec<Stat>,
    status: Result<NodeStatus, String>,
    failover_log: Result<Vec<FailoverLogEntry>, String>,
}

async fn fetch_json<T: serde::de::DeserializeOwned>(
    client: &dyn NodeClient,
    url: String,
    token: Option<String>,
    proxy: Option<String>,
) -> Result<T, String> {
    let body = client
        .get(url.clone(), token, proxy)
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&body).map_err(|e| format!("{url}: not the expected JSON: {e}"))
}

async fn pull_node(
    client: Arc<dyn NodeClient>,
    node: Registered,
    proxy: Option<String>,
) -> Result<PullOutcome, String> {
    let stats_url = format!("{}/v1/stats", node.api_url);
    let (stats, via) = direct_then_proxy(
        proxy,
        // Any failure: see `direct_then_proxy`.
        |_| true,
        |via| fetch_json::<Vec<Stat>>(&*client, stats_url.clone(), node.token.clone(), via),
    )
    .await
    .map_err(|f| match f.proxy {
        None => f.direct,
        Some(proxy_err) => format!("direct: {}; through proxy: {proxy_err}", f.direct),
    })?;
    let route = if via.is_some() {
        Route::Proxy
    } else {
        Route::Direct
    };
    let (status, failover_log) = futures::join!(
        fetch_json::<NodeStatus>(
            &*client,
            format!("{}/v1/status", node.api_url),
            node.token.clone(),
            via.clone()
        ),
        fetch_json::<Vec<FailoverLogEntry>>(
            &*client,
            format!("{}/v1/dns/failover-log", node.api_url),
            node.token.clone(),
            via
        ),
    );
    Ok(PullOutcome {
        route,
        stats,
        status,
        failover_log,
    })
}

/// The fleet manager.
/// How often statuses are re-evaluated between rounds ([`Manager::reevaluate`]).
const RECHECK_INTERVAL: Duration = Duration::from_secs(1);

pub struct Manager {
    store: Arc<dyn ConfigStore>,
    client: Arc<dyn NodeClient>,
    cfg: ManagerConfig,
    state: Mutex<BTreeMap<String, PullState>>,
    /// The registry of the last round, for re-evaluating statuses between rounds.
    last_registry: Mutex<Option<Registry>>,
    view: watch::Sender<FleetView>,
}

impl Manager {
    pub fn new(
        store: Arc<dyn ConfigStore>,
        client: Arc<dyn NodeClient>,
        cfg: ManagerConfig,
    ) -> Self {
        Self {
            store,
            client,
            cfg,
            last_registry: Mutex::new(None),
            state: Mutex::new(BTreeMap::new()),
            view: watch::channel(FleetView::default()).0,
        }
    }

    /// The latest view; changes after every round.
    pub fn subscribe(&self) -> watch::Receiver<FleetView> {
        self.view.subscribe()
    }

    pub fn config(&self) -> &ManagerConfig {
        &self.cfg
    }

    /// The etcd the manager reads (the console writes through the same one).
    pub fn store(&self) -> Arc<dyn ConfigStore> {
        self.store.clone()
    }

    /// One request to node `id`'s API for the console (test an upstream, fail over,
    /// read the failover log): its registered URL and its token, by the route its pulls
    /// take (direct, else through `/fleet/proxy` when the direct attempt fails to
    /// connect; `direct_then_proxy`). Reads only that node's keys
    /// ([`load_node`]). The token goes only to that node; the answer's body on 2xx.
    pub async fn call_node(
        &self,
        id: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, NodeCallError> {
        let access = load_node(&*self.store, id).await?;
        self.client.set_trust(access.trust);
        let node = access
            .node
            .ok_or_else(|| NodeCallError::Unknown { id: id.to_string() })?;
        let url = format!("{}{path}", node.api_url);
        if let Some(reason) = node.tls_refusal() {
            return Err(PullError::Transport { url, reason }.into());
        }
        let (answer, _via) = direct_then_proxy(
            access.proxy,
            // A transport error only: see `direct_then_proxy`.
            |e| matches!(e, PullError::Transport { .. }),
            |via| {
                self.client.request(
                    method.clone(),
                    url.clone(),
                    node.token.clone(),
                    body.clone(),
                    via,
                )
            },
        )
        .await
        .map_err(|f| f.proxy.unwrap_or(f.direct))?;
        Ok(answer)
    }

    fn threshold_ms(&self) -> u64 {
        self.cfg.pull_threshold.as_millis() as u64
    }

    /// One round at time `now_ms`: registry → pulls (all nodes concurrently) → view.
    pub async fn round(&self, now_ms: u64) -> Result<FleetView, FleetError> {
        let reg = load_registry(&*self.store).await?;
        {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.retain(|id, _| reg.nodes.iter().any(|n| &n.id == id));
            for n in &reg.nodes {
                st.entry(n.id.clone()).or_insert_with(|| {
                    // A manager restarting with --publish resumes from what it published.
                    let p = reg.published.get(&n.id);
                    PullState {
                        first_seen_ms: now_ms,
                        last_pull: p.and_then(|p| p.last_pull_ms.zip(p.route)),
                        usage: p.map(|p| p.usage).unwrap_or_default(),
                        ..Default::default()
                    }
                });
            }
        }
        // Re-evaluations between and during rounds use this round's registry.
        *self.last_registry.lock().unwrap_or_else(|e| e.into_inner()) = Some(reg.clone());
        self.client.set_trust(reg.trust());
        let pulls = reg.nodes.iter().map(|n| {
            let (client, node, proxy) = (self.client.clone(), n.clone(), reg.proxy.clone());
            async move {
                let id = node.id.clone();
                let r = if let Some(refused) = node.tls_refusal() {
                    Err(refused)
                } else if node.token.is_none() {
                    Err(format!("no API token at /nodes/{id}/api/token"))
                } else {
                    pull_node(client, node, proxy).await
                };
                (id, r)
            }
        });
        // The view is published at the start of the round (the registry: online,
        // applied, errors) and again as each node's pull completes, so a node that
        // times out does not hold back what is already known about the others.
        let mut pulls: futures::stream::FuturesUnordered<_> = pulls.collect();
        let mut view = {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            self.build_view(&reg, &st, now_ms)
        };
        self.view.send_replace(view.clone());
        while let Some((id, r)) = futures::StreamExt::next(&mut pulls).await {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let Some(s) = st.get_mut(&id) else { continue };
            s.last_attempt_ms = Some(now_ms);
            match r {
                Ok(o) => {
                    debug!(node = %id, route = ?o.route, "stats pulled");
                    s.last_pull = Some((now_ms, o.route));
                    s.last_error = None;
                    s.usage = s.usage.add_sample(usage_total(&o.stats));
                    match o.status {
                        Ok(ns) => s.status = Some(ns),
                        Err(e) => s.last_error = Some(format!("status: {e}")),
                    }
                    match o.failover_log {
                        Ok(l) => s.failover_log = l,
                        Err(e) => s.last_error = Some(format!("failover log: {e}")),
                    }
                }
                Err(e) => {
                    debug!(node = %id, error = %e, "stats pull failed");
                    s.last_error = Some(e);
                }
            }
            view = self.build_view(&reg, &st, now_ms);
            drop(st);
            self.view.send_replace(view.clone());
        }
        if self.cfg.publish {
            self.publish(&view.nodes, now_ms).await?;
        }
        Ok(view)
    }

    /// Writes `/fleet/status/<id>` for `rows`.
    async fn publish(&self, rows: &[NodeRow], now_ms: u64) -> Result<(), FleetError> {
        for row in rows {
            let usage = self
                .state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&row.id)
                .map(|s| s.usage)
                .unwrap_or_default();
            let p = Published {
                push: row.push,
                pull: row.pull,
                usage,
                last_pull_ms: row.last_pull_ms,
                route: row.route,
                updated_ms: now_ms,
            };
            let json = serde_json::to_string(&p).map_err(|e| FleetError::Http {
                reason: e.to_string(),
            })?;
            if let Err(e) = self
                .store
                .put(&format!("/fleet/status/{}", row.id), &json)
                .await
            {
                warn!(node = %row.id, error = %e, "publishing fleet status failed");
            }
        }
        Ok(())
    }

    /// Between rounds: re-computes every node's push and pull status at `now_ms`
    /// from what the last round learned, and publishes the rows whose status
    /// changed. A node's minute without a successful pull thereby runs out when it
    /// runs out, not at the next round (which could be up to a pull interval later:
    /// a gateway killed just after a pull would show `unavailable` only after
    /// threshold + interval). Returns whether anything changed.
    pub async fn reevaluate(&self, now_ms: u64) -> Result<bool, FleetError> {
        let view = {
            let reg = self.last_registry.lock().unwrap_or_else(|e| e.into_inner());
            let Some(reg) = reg.as_ref() else {
                return Ok(false);
            };
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            self.build_view(reg, &st, now_ms)
        };
        let changed: Vec<NodeRow> = {
            let current = self.view.borrow();
            view.nodes
                .iter()
                .filter(|row| {
                    !current
                        .nodes
                        .iter()
                        .any(|c| c.id == row.id && c.push == row.push && c.pull == row.pull)
                })
                .cloned()
                .collect()
        };
        if changed.is_empty() {
            return Ok(false);
        }
        for row in &changed {
            info!(node = %row.id, push = ?row.push, pull = ?row.pull, "fleet status changed between rounds");
        }
        self.view.send_replace(view);
        if self.cfg.publish {
            self.publish(&changed, now_ms).await?;
        }
        Ok(true)
    }

    fn build_view(
        &self,
        reg: &Registry,
        st: &BTreeMap<String, PullState>,
        now_ms: u64,
    ) -> FleetView {
        let t = self.threshold_ms();
        let nodes = reg
            .nodes
            .iter()
            .map(|n| {
                let s = st.get(&n.id).cloned().unwrap_or_default();
                let facts = NodeFacts {
                    online: n.online,
                    applied_revision: n.applied_revision,
                    commit_revision: reg.commit_revision,
                    error_count: n.errors.len(),
                    last_pull: s.last_pull,
                    first_seen_ms: s.first_seen_ms,
                };
                NodeRow {
                    id: n.id.clone(),
                    api_url: n.api_url.clone(),
                    online: n.online,
                    push: push_status(&facts, now_ms, t),
                    pull: pull_status(&facts, now_ms, t),
                    applied_revision: n.applied_revision,
                    commit_revision: reg.commit_revision,
                    errors: n.errors.clone(),
                    usage_bytes: s.usage.bytes,
                    last_pull_ms: s.last_pull.map(|(t, _)| t),
                    route: s.last_pull.map(|(_, r)| r),
                    last_error: s.last_error.clone(),
                    has_token: n.token.is_some(),
                    status: s.status.clone(),
                    failover_log: s.failover_log.clone(),
                }
            })
            .collect();
        FleetView {
            generated_ms: now_ms,
            commit_revision: reg.commit_revision,
            proxy_configured: reg.proxy.is_some(),
            nodes,
        }
    }

    /// Rounds every `pull_interval` until `shutdown` resolves. A failing round (etcd
    /// down) is logged and the previous view kept.
    pub async fn run(&self, shutdown: impl std::future::Future<Output = ()>) {
        info!(
            interval_ms = self.cfg.pull_interval.as_millis() as u64,
            "fleet manager running"
        );
        let rounds = async {
            let mut tick = tokio::time::interval(self.cfg.pull_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = self.round(now_ms()).await {
                    warn!(error = %e, "fleet round failed");
                }
            }
        };
        // Statuses are re-evaluated every second, also while a round waits on a
        // node that does not answer (no I/O unless a status changed), so the pull
        // threshold is honoured to the second.
        let rechecks = async {
            let mut recheck = tokio::time::interval(RECHECK_INTERVAL);
            recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                recheck.tick().await;
                if let Err(e) = self.reevaluate(now_ms()).await {
                    warn!(error = %e, "fleet status re-evaluation failed");
                }
            }
        };
        tokio::select! {
            _ = shutdown => {}
            _ = rounds => {}
            _ = rechecks => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{MemStore, WriteOp};
    use futures::future::BoxFuture;
    use std::collections::HashMap;

    /// Answers by URL; `proxy_only` URLs fail unless asked through a proxy.
    #[derive(Default)]
    struct FakeClient {
        bodies: Mutex<HashMap<String, String>>,
        proxy_only: Mutex<Vec<String>>,
        /// URLs with these prefixes never answer (a node behind a dropping firewall).
        stalled: Mutex<Vec<String>>,
        calls: Mutex<Vec<(String, Option<String>, bool)>>,
    }

    impl NodeClient for FakeClient {
        fn request(
            &self,
            _method: reqwest::Method,
            url: String,
            token: Option<String>,
            _body: Option<Vec<u8>>,
            proxy: Option<String>,
        ) -> BoxFuture<'static, Result<Vec<u8>, PullError>> {
            self.calls
                .lock()
                .unwrap()
                .push((url.clone(), token, proxy.is_some()));
            let blocked = proxy.is_none()
                && self
                    .proxy_only
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|p| url.starts_with(p));
            let body = self.bodies.lock().unwrap().get(&url).cloned();
            let stalled = self
                .stalled
                .lock()
                .unwrap()
                .iter()
                .any(|p| url.starts_with(p));
            Box::pin(async move {
                if stalled {
                    futures::future::pending::<()>().await;
                }
                match (blocked, body) {
                    (false, Some(b)) => Ok(b.into_bytes()),
                    _ => Err(PullError::Transport {
                        url,
                        reason: "refused".into(),
                    }),
                }
            })
        }
    }

    #[tokio::test]
    async fn one_nodes_read_agrees_with_the_whole_registry() {
        let (store, commit) = committed_store().await;
        seed(&store, "a", Some(commit), "[]").await;
        seed(&store, "b", Some(commit - 1), "[]").await;
        let reg = load_registry(&store).await.unwrap();
        let one = load_node(&store, "b").await.unwrap();
        assert_eq!(one.node.as_ref(), reg.nodes.iter().find(|n| n.id == "b"));
        assert_eq!((one.trust, one.proxy), (reg.trust(), reg.proxy));
        assert_eq!(load_node(&store, "z").await.unwrap().node, None);
    }

    async fn seed(store: &MemStore, id: &str, rev_applied: Option<i64>, errors: &str) {
        store
            .put(
                &format!("/fleet/nodes/{id}/api_url"),
                &format!("http://{id}:9100/"),
            )
            .await
            .unwrap();
        store
            .put(&format!("/nodes/{id}/api/token"), &format!("tok-{id}"))
            .await
            .unwrap();
        store
            .put(&format!("/updated/{id}/online"), "1")
            .await
            .unwrap();
        if let Some(r) = rev_applied {
            store
                .put(
                    &format!("/updated/{id}/applied"),
                    &format!("{r} 1700000000"),
                )
                .await
                .unwrap();
        }
        store
            .put(&format!("/updated/{id}/errors"), errors)
            .await
            .unwrap();
    }

    /// A store with one committed configuration change; returns its commit revision.
    async fn committed_store() -> (MemStore, i64) {
        let store = MemStore::new();
        let commit = store
            .write_and_commit(vec![WriteOp::Put {
                key: "/global/x".into(),
                value: "1".into(),
            }])
            .await
            .unwrap();
        (store, commit)
    }

    fn answer(c: &FakeClient, id: &str, rx: u64) {
        let mut b = c.bodies.lock().unwrap();
        b.insert(
            format!("http://{id}:9100/v1/stats"),
            format!(r#"[{{"name":"iface>>>eth0>>>traffic>>>downlink","value":{rx}}}]"#),
        );
        b.insert(format!("http://{id}:9100/v1/status"), format!(r#"{{"node_id":"{id}","applied_revision":null,"commit_revision":null,"clash_health":null,"tproxy":null}}"#));
        b.insert(format!("http://{id}:9100/v1/dns/failover-log"), "[]".into());
    }

    #[tokio::test]
    async fn the_pull_minute_runs_out_between_rounds() {
        let (store, commit) = committed_store().await;
        seed(&store, "a", Some(commit), "[]").await;
        let client = Arc::new(FakeClient::default());
        answer(&client, "a", 1000);
        let cfg = ManagerConfig {
            publish: true,
            ..ManagerConfig::default()
        };
        let m = Manager::new(Arc::new(store.clone()), client.clone(), cfg);
        let now = 1_800_000_000_000;
        // Before any round there is nothing to re-evaluate.
        assert!(!m.reevaluate(now).await.unwrap());
        m.round(now).await.unwrap();
        // The gateway dies right after that pull; the next rounds (every 10 s) fail.
        client.bodies.lock().unwrap().clear();
        for k in 1..=5 {
            m.round(now + k * 10_000).await.unwrap();
        }
        assert_eq!(m.subscribe().borrow().nodes[0].pull, PullStatus::Available);
        // Exactly a minute: still fresh; nothing changes, nothing is published.
        assert!(!m.reevaluate(now + 60_000).await.unwrap());
        // One second later, without waiting for the round at +70 s: unavailable,
        // in the view and in /fleet/status/a.
        assert!(m.reevaluate(now + 61_000).await.unwrap());
        assert_eq!(
            m.subscribe().borrow().nodes[0].pull,
            PullStatus::Unavailable
        );
        let published = store.get("/fleet/status/a").await.unwrap().unwrap();
        let p: Published = serde_json::from_str(&published.value).unwrap();
        assert_eq!(p.pull, PullStatus::Unavailable);
        // A second re-evaluation finds nothing new.
        assert!(!m.reevaluate(now + 62_000).await.unwrap());
    }

    #[tokio::test]
    async fn round_computes_statuses_from_store_and_pulls() {
        let (store, commit) = committed_store().await;
        seed(&store, "a", Some(commit), "[]").await;
        seed(
            &store,
            "b",
            Some(commit - 1),
            r#"[{"key":"/nodes/b/api/token","value":"leak","reason":"bad"}]"#,
        )
        .await;
        seed(&store, "c", Some(commit), "[]").await;
        seed(&store, "d", Some(commit), "[]").await;
        store.delete_prefix("/updated/d/online").await.unwrap();
        store
            .put("/fleet/proxy", "http://proxy:3128")
            .await
            .unwrap();
        let client = Arc::new(FakeClient::default());
        for id in ["a", "b", "c"] {
            answer(&client, id, 1000);
        }
        client
            .proxy_only
            .lock()
            .unwrap()
            .push("http://c:9100".into());
        let m = Manager::new(
            Arc::new(store.clone()),
            client.clone(),
            ManagerConfig::default(),
        );
        let now = 1_800_000_000_000;
        let v = m.round(now).await.unwrap();
        let by: BTreeMap<&str, &NodeRow> = v.nodes.iter().map(|r| (r.id.as_str(), r)).collect();
        assert_eq!(
            (by["a"].push, by["a"].pull),
            (PushStatus::Available, PullStatus::Available)
        );
        assert_eq!(by["b"].push, PushStatus::Dirty);
        assert_eq!(by["b"].errors[0].value, "<redacted>");
        assert_eq!(
            (by["c"].push, by["c"].route),
            (PushStatus::Dirty, Some(Route::Proxy))
        );
        assert_eq!(
            (by["d"].push, by["d"].pull),
            (PushStatus::Unavailable, PullStatus::Pending)
        );
        assert_eq!(by["a"].usage_bytes, 1000);
        assert_eq!(by["a"].status.as_ref().unwrap().node_id, "a");
        // Tokens went only to their own node.
        for (url, tok, _) in client.calls.lock().unwrap().iter() {
            let host = url.trim_start_matches("http://").split(':').next().unwrap();
            assert_eq!(tok.as_deref(), Some(format!("tok-{host}").as_str()));
        }
        // 61 s later with every node silent: pull unavailable everywhere.
        client.bodies.lock().unwrap().clear();
        let v = m.round(now + 61_000).await.unwrap();
        assert!(
            v.nodes.iter().all(|r| r.pull == PullStatus::Unavailable),
            "{v:?}"
        );
        // Node a comes back with a larger counter: usage grows by the difference.
        answer(&client, "a", 1500);
        let v = m.round(now + 62_000).await.unwrap();
        assert_eq!(v.nodes[0].usage_bytes, 1500);
        assert_eq!(v.nodes[0].pull, PullStatus::Available);
        let json = serde_json::to_string(&v).unwrap();
        assert!(!json.contains("tok-"), "{json}");
        assert!(!json.contains("leak"), "{json}");
    }

    #[tokio::test]
    async fn a_node_with_tls_is_never_called_at_a_plain_http_url() {
        let (store, commit) = committed_store().await;
        let pin = "ab".repeat(32);
        seed(&store, "a", Some(commit), "[]").await;
        store
            .put("/updated/a/api_tls", &format!("{pin} 1700000000 file"))
            .await
            .unwrap();
        seed(&store, "b", Some(commit), "[]").await;
        store.put("/fleet/nodes/b/cert_sha256", &pin).await.unwrap();
        seed(&store, "c", Some(commit), "[]").await;
        store.put("/fleet/nodes/c/cert_sha256", "zz").await.unwrap();
        seed(&store, "d", Some(commit), "[]").await;
        store
            .put("/fleet/nodes/d/api_url", "https://d:9443")
            .await
            .unwrap();
        store.put("/fleet/nodes/d/cert_sha256", &pin).await.unwrap();
        store.put("/fleet/ca", "CA PEM").await.unwrap();
        let client = Arc::new(FakeClient::default());
        for id in ["a", "b", "c"] {
            answer(&client, id, 1);
        }
        let m = Manager::new(
            Arc::new(store.clone()),
            client.clone(),
            ManagerConfig::default(),
        );
        let v = m.round(1_800_000_000_000).await.unwrap();
        let err = |id: &str| {
            v.nodes
                .iter()
                .find(|r| r.id == id)
                .and_then(|r| r.last_error.clone())
                .unwrap_or_default()
        };
        assert!(
            err("a").starts_with(
                "refused: http://a:9100 is plain http:// but the node serves its API over HTTPS (/updated/a/api_tls is set)"
            ),
            "{}",
            err("a")
        );
        assert!(
            err("b").contains("(/fleet/nodes/b/cert_sha256 pins its certificate)"),
            "{}",
            err("b")
        );
        assert!(
            err("c").starts_with("/fleet/nodes/c/cert_sha256: must be a SHA-256"),
            "{}",
            err("c")
        );
        // Only d (https, pinned) was asked; a, b and c never saw a request or token.
        let calls = client.calls.lock().unwrap().clone();
        assert!(
            calls
                .iter()
                .all(|(url, _, _)| url.starts_with("https://d:9443/")),
            "{calls:?}"
        );
        let trust = load_registry(&store).await.unwrap().trust();
        assert_eq!(trust.ca_pem.as_deref(), Some("CA PEM"));
        assert_eq!(
            trust.pins.into_iter().collect::<Vec<_>>(),
            vec![
                ("http://b:9100".to_string(), pin.parse().unwrap()),
                ("https://d:9443".to_string(), pin.parse().unwrap()),
            ]
        );
    }

    #[tokio::test]
    async fn a_stalled_node_does_not_hold_back_the_others() {
        let store = MemStore::new();
        let commit = store.bump_commit().await.unwrap();
        seed(&store, "fast", Some(commit), "[]").await;
        seed(&store, "slow", Some(commit), "[]").await;
        let client = Arc::new(FakeClient::default());
        answer(&client, "fast", 10);
        client
            .stalled
            .lock()
            .unwrap()
            .push("http://slow:9100".into());
        let m = Arc::new(Manager::new(
            Arc::new(store),
            client,
            ManagerConfig::default(),
        ));
        let mut rx = m.subscribe();
        let m2 = m.clone();
        let round = tokio::spawn(async move { m2.round(1_800_000_000_000).await });
        let v = tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|v| v.nodes.iter().any(|n| n.last_pull_ms.is_some())),
        )
        .await
        .expect("the fast node's pull is published while the slow one hangs")
        .unwrap()
        .clone();
        assert!(!round.is_finished());
        let by: BTreeMap<&str, &NodeRow> = v.nodes.iter().map(|r| (r.id.as_str(), r)).collect();
        assert_eq!(by["fast"].pull, PullStatus::Available);
        assert_eq!(by["slow"].pull, PullStatus::Pending);
        round.abort();
    }
}
