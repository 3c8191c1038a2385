//! The fleet manager's loop: read the registry and node status keys from etcd, pull
//! every node's `/v1/stats` (directly, else through `/fleet/proxy`), fetch its
//! `/v1/status` and failover log for the web page, and compute push/pull status.
//!
//! Owns: the in-memory fleet view (published on a `watch` channel), usage accounting
//! and, when enabled, `/fleet/status/<id>`; the TLS policy toward nodes (trust from a
//! node's pin, `--node-ca` and `/fleet/ca`; nothing sent to a node that serves HTTPS
//! at a plain `http://` URL). Must not: write any node's configuration or show a
//! token — node tokens are read from `/nodes/<id>/api/token` and only ever sent in an
//! `Authorization` header to that node, over TLS when the node has it.

use super::status::{
    pull_status, push_status, usage_total, NodeFacts, PullStatus, PushStatus, Route, Usage,
};
use super::FleetError;
use crate::api::{redact_errors, ConfigError, ConfigStore, FailoverLogEntry, NodeStatus, Stat};
use crate::tls::{Fingerprint, ServerTrust};
use futures::future::BoxFuture;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
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

/// Why one HTTP fetch failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PullError {
    #[error("{url}: {reason}")]
    Transport { url: String, reason: String },
    #[error("{url}: HTTP {status}{}", if error.is_empty() { String::new() } else { format!(": {error}") })]
    Status {
        url: String,
        status: u16,
        /// The `error` of the node API's JSON answer, when it has one.
        error: String,
    },
    #[error("proxy {reason}")]
    Proxy { reason: String },
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

/// The network edge: one authenticated request to a node's API. The real one is
/// [`HttpNodeClient`].
pub trait NodeClient: Send + Sync + 'static {
    /// `method url` with `Authorization: Bearer <token>` and, when given, a JSON `body`;
    /// directly when `proxy` is `None`. The answer's body when the status is 2xx.
    fn request(
        &self,
        method: reqwest::Method,
        url: String,
        token: Option<String>,
        body: Option<Vec<u8>>,
        proxy: Option<String>,
    ) -> BoxFuture<'static, Result<Vec<u8>, PullError>>;

    /// GET `url` (the pull round's requests).
    fn get(
        &self,
        url: String,
        token: Option<String>,
        proxy: Option<String>,
    ) -> BoxFuture<'static, Result<Vec<u8>, PullError>> {
        self.request(reqwest::Method::GET, url, token, None, proxy)
    }

    /// The trust in node certificates read from etcd this round; clients that do not
    /// speak TLS ignore it.
    fn set_trust(&self, _trust: NodeTrust) {}
}

/// Trust in node certificates learned from etcd (docs/fleet.md, "HTTPS"), handed to
/// the client each round: a node's pin wins; else the CAs (`--node-ca` and
/// `/fleet/ca`); else the webpki roots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeTrust {
    /// `/fleet/ca` (PEM).
    pub ca_pem: Option<String>,
    /// Origin of a node's api_url (`https://host:port`) → its pinned certificate
    /// (`/fleet/nodes/<id>/cert_sha256`).
    pub pins: BTreeMap<String, Fingerprint>,
}

/// `scheme://host:port` of `url`, the key of [`NodeTrust::pins`].
pub fn origin(url: &str) -> Option<String> {
    reqwest::Url::parse(url)
        .ok()
        .map(|u| u.origin().ascii_serialization())
}

/// reqwest-based [`NodeClient`]: one reqwest client per (proxy, trust). The direct
/// clients ignore `*_PROXY` environment variables so "direct" means direct.
pub struct HttpNodeClient {
    timeout: Duration,
    /// `--node-ca`: trusted together with `/fleet/ca`.
    node_ca: Vec<CertificateDer<'static>>,
    trust: Mutex<NodeTrust>,
    clients: Mutex<HashMap<(Option<String>, ServerTrust), reqwest::Client>>,
}

impl HttpNodeClient {
    pub fn new(timeout: Duration) -> Result<Self, FleetError> {
        Ok(Self {
            timeout,
            node_ca: Vec::new(),
            trust: Mutex::new(NodeTrust::default()),
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// Trust node certificates signed by the CA certificates in the PEM file `path`
    /// (`--node-ca`).
    pub fn with_node_ca_file(mut self, path: &std::path::Path) -> Result<Self, FleetError> {
        let invalid = |reason: String| FleetError::Invalid {
            field: "--node-ca",
            value: path.display().to_string(),
            reason,
        };
        let pem = crate::tls::read_pem("--node-ca", path).map_err(|e| invalid(e.to_string()))?;
        self.node_ca =
            crate::tls::ca_certs("--node-ca", &pem).map_err(|e| invalid(e.to_string()))?;
        Ok(self)
    }

    /// How the certificate of the node at `url` is checked.
    fn trust_for(&self, url: &str) -> Result<ServerTrust, PullError> {
        if !url.starts_with("https://") {
            return Ok(ServerTrust::Default);
        }
        let t = self.trust.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pin) = origin(url).and_then(|o| t.pins.get(&o).copied()) {
            return Ok(ServerTrust::Pin(pin));
        }
        let mut cas = self.node_ca.clone();
        if let Some(pem) = &t.ca_pem {
            let etcd_ca =
                crate::tls::ca_certs("/fleet/ca", pem).map_err(|e| PullError::Transport {
                    url: url.to_string(),
                    reason: e.to_string(),
                })?;
            cas.extend(etcd_ca);
        }
        Ok(if cas.is_empty() {
            ServerTrust::Default
        } else {
            ServerTrust::Ca(cas)
        })
    }

    fn client_for(&self, url: &str, proxy: Option<&str>) -> Result<reqwest::Client, PullError> {
        let key = (proxy.map(str::to_string), self.trust_for(url)?);
        let mut map = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(&key) {
            return Ok(c.clone());
        }
        let builder = crate::tls::client_builder(&key.1).map_err(|e| PullError::Transport {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
        let builder = match proxy {
            None => builder.no_proxy(),
            // Never echo the proxy URL: it may carry credentials.
            Some(p) => builder.proxy(reqwest::Proxy::all(p).map_err(|_| PullError::Proxy {
                reason: "URL in /fleet/proxy is not valid".into(),
            })?),
        };
        // A node API never redirects; following one could carry the token elsewhere.
        let c = builder
            .redirect(reqwest::redirect::Policy::none())
            .timeout(self.timeout)
            .connect_timeout(self.timeout)
            .build()
            .map_err(|e| PullError::Transport {
                url: url.to_string(),
                reason: e.to_string(),
            })?;
        map.insert(key, c.clone());
        Ok(c)
    }
}

impl NodeClient for HttpNodeClient {
    fn set_trust(&self, trust: NodeTrust) {
        let mut t = self.trust.lock().unwrap_or_else(|e| e.into_inner());
        if *t != trust {
            *t = trust;
            // Clients built for the old CA or pins are not used again.
            self.clients
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        }
    }

    fn request(
        &self,
        method: reqwest::Method,
        url: String,
        token: Option<String>,
        body: Option<Vec<u8>>,
        proxy: Option<String>,
    ) -> BoxFuture<'static, Result<Vec<u8>, PullError>> {
        let client = self.client_for(&url, proxy.as_deref());
        Box::pin(async move {
            let client = client?;
            let mut req = client.request(method, &url);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            if let Some(b) = body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(b);
            }
            let resp = req.send().await.map_err(|e| PullError::Transport {
                url: url.clone(),
                reason: describe(&e),
            })?;
            if !resp.status().is_success() {
                let status = resp.status().as_u16();
                // The node API's JSON error names the field; keep its message only.
                let error = resp
                    .json::<serde_json::Value>()
                    .await
                    .ok()
                    .and_then(|v| v.get("error")?.as_str().map(str::to_string))
                    .map(|e| e.chars().take(300).collect())
                    .unwrap_or_default();
                return Err(PullError::Status { url, status, error });
            }
            let body = resp.bytes().await.map_err(|e| PullError::Transport {
                url: url.clone(),
                reason: describe(&e),
            })?;
            Ok(body.to_vec())
        })
    }
}

/// reqwest's Display hides the cause; walk the source chain. A certificate the trust
/// refuses is named as such ("certificate not trusted: ...").
fn describe(e: &reqwest::Error) -> String {
    if let Some(why) = crate::tls::untrusted_reason(e) {
        return why;
    }
    let mut parts = Vec::new();
    if e.is_timeout() {
        parts.push("timed out".to_string());
    } else if e.is_connect() {
        parts.push("connect failed".to_string());
    }
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = src {
        parts.push(s.to_string());
        src = s.source();
    }
    if parts.is_empty() {
        parts.push(e.to_string());
    }
    parts.join(": ")
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

/// One registered node as etcd describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub id: String,
    pub api_url: String,
    pub token: Option<String>,
    pub online: bool,
    pub applied_revision: Option<i64>,
    pub errors: Vec<ConfigError>,
    /// `/fleet/nodes/<id>/cert_sha256`: the pinned certificate, or why the value is
    /// not a fingerprint.
    pub pin: Option<Result<Fingerprint, String>>,
    /// `/updated/<id>/api_tls` is set: the node serves its API over HTTPS.
    pub serves_https: bool,
}

impl Registered {
    /// Why the manager must not send this node anything (its token would cross the
    /// network in clear, or its pin is unreadable); `None` when it may.
    pub fn tls_refusal(&self) -> Option<String> {
        if let Some(Err(reason)) = &self.pin {
            return Some(format!("/fleet/nodes/{}/cert_sha256: {reason}", self.id));
        }
        if !self.api_url.starts_with("http://") {
            return None;
        }
        let why = if self.serves_https {
            format!("/updated/{}/api_tls is set", self.id)
        } else if self.pin.is_some() {
            format!("/fleet/nodes/{}/cert_sha256 pins its certificate", self.id)
        } else {
            return None;
        };
        Some(format!(
            "refused: {} is plain http:// but the node serves its API over HTTPS ({why}); \
             its token is not sent in clear: register its https:// URL",
            self.api_url
        ))
    }
}

/// The registry and the shared keys, read in one go.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Registry {
    pub commit_revision: Option<i64>,
    pub proxy: Option<String>,
    /// `/fleet/ca`: PEM of the CA that signs node certificates.
    pub ca: Option<String>,
    pub nodes: Vec<Registered>,
    pub published: BTreeMap<String, Published>,
}

impl Registry {
    /// What the client needs to check node certificates.
    pub fn trust(&self) -> NodeTrust {
        NodeTrust {
            ca_pem: self.ca.clone(),
            pins: self
                .nodes
                .iter()
                .filter_map(|n| Some((origin(&n.api_url)?, *n.pin.as_ref()?.as_ref().ok()?)))
                .collect(),
        }
    }
}

/// `/fleet/status/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub push: PushStatus,
    pub pull: PullStatus,
    pub usage: Usage,
    pub last_pull_ms: Option<u64>,
    pub route: Option<Route>,
    pub updated_ms: u64,
}

fn parse_applied(v: &str) -> Option<i64> {
    v.split_whitespace().next()?.parse().ok()
}

fn parse_errors(key: &str, v: &str) -> Vec<ConfigError> {
    let v = v.trim();
    if v.is_empty() {
        return Vec::new();
    }
    serde_json::from_str(v).unwrap_or_else(|e| {
        vec![ConfigError {
            key: key.to_string(),
            value: String::new(),
            reason: format!("unreadable errors list: {e}"),
        }]
    })
}

/// Read `/fleet/`, `/commit` and, per registered node, `/updated/<id>/` and its token.
pub async fn load_registry(store: &dyn ConfigStore) -> Result<Registry, FleetError> {
    let fleet = store.get_prefix("/fleet/").await?;
    let commit_revision = store
        .get(crate::api::store::COMMIT_KEY)
        .await?
        .map(|v| v.mod_revision);
    let proxy = fleet
        .get("/fleet/proxy")
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty());
    let ca = fleet
        .get("/fleet/ca")
        .filter(|c| !c.trim().is_empty())
        .cloned();
    let mut nodes = Vec::new();
    let mut published = BTreeMap::new();
    for (k, v) in &fleet {
        if let Some(id) = k.strip_prefix("/fleet/status/") {
            if let Ok(p) = serde_json::from_str::<Published>(v) {
                published.insert(id.to_string(), p);
            }
            continue;
        }
        let Some(id) = k
            .strip_prefix("/fleet/nodes/")
            .and_then(|r| r.strip_suffix("/api_url"))
        else {
            continue;
        };
        if let Err(reason) = meduza_generators::parse::validate_name(id) {
            warn!(key = %k, %reason, "skipping fleet node with an invalid id");
            continue;
        }
        let updated = store.get_prefix(&format!("/updated/{id}/")).await?;
        let token = store
            .get(&format!("/nodes/{id}/api/token"))
            .await?
            .map(|v| v.value.trim().to_string())
            .filter(|t| !t.is_empty());
        let errors_key = format!("/updated/{id}/errors");
        nodes.push(Registered {
            id: id.to_string(),
            api_url: v.trim().trim_end_matches('/').to_string(),
            token,
            online: updated.contains_key(&format!("/updated/{id}/online")),
            applied_revision: updated
                .get(&format!("/updated/{id}/applied"))
                .and_then(|a| parse_applied(a)),
            errors: redact_errors(
                updated
                    .get(&errors_key)
                    .map(|e| parse_errors(&errors_key, e))
                    .unwrap_or_default(),
            ),
            pin: fleet
                .get(&format!("/fleet/nodes/{id}/cert_sha256"))
                .filter(|p| !p.trim().is_empty())
                .map(|p| p.parse::<Fingerprint>()),
            serves_https: updated.contains_key(&format!(
                "{}{id}/{}",
                crate::etcd::status::STATUS_ROOT,
                crate::etcd::status::API_TLS_SUFFIX
            )),
        });
    }
    Ok(Registry {
        commit_revision,
        proxy,
        ca,
        nodes,
        published,
    })
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
    let (route, via, stats) = match fetch_json::<Vec<Stat>>(
        &*client,
        stats_url.clone(),
        node.token.clone(),
        None,
    )
    .await
    {
        Ok(s) => (Route::Direct, None, s),
        Err(direct_err) => {
            let Some(p) = proxy else {
                return Err(direct_err);
            };
            match fetch_json::<Vec<Stat>>(&*client, stats_url, node.token.clone(), Some(p.clone()))
                .await
            {
                Ok(s) => (Route::Proxy, Some(p), s),
                Err(proxy_err) => {
                    return Err(format!("direct: {direct_err}; through proxy: {proxy_err}"))
                }
            }
        }
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
    /// connect). The token goes only to that node; the answer's body on 2xx.
    pub async fn call_node(
        &self,
        id: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, NodeCallError> {
        let registry = load_registry(&*self.store).await?;
        self.client.set_trust(registry.trust());
        let node = registry
            .nodes
            .into_iter()
            .find(|n| n.id == id)
            .ok_or_else(|| NodeCallError::Unknown { id: id.to_string() })?;
        let url = format!("{}{path}", node.api_url);
        if let Some(reason) = node.tls_refusal() {
            return Err(PullError::Transport { url, reason }.into());
        }
        let direct = self
            .client
            .request(
                method.clone(),
                url.clone(),
                node.token.clone(),
                body.clone(),
                None,
            )
            .await;
        match (direct, registry.proxy) {
            (Err(PullError::Transport { .. }), Some(proxy)) => Ok(self
                .client
                .request(method, url, node.token, body, Some(proxy))
                .await?),
            (r, _) => Ok(r?),
        }
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
