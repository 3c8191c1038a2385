//! The fleet registry: `/fleet/` (registered nodes, their pins, the proxy, the CA and
//! what `--publish` wrote), `/commit`, and per node its status keys (read through
//! [`crate::etcd::status`]) and its API token — for every node ([`load_registry`], the
//! pull round) or for one ([`load_node`], a console action).
//!
//! Owns: [`Registered::tls_refusal`], the rule that no token is sent in clear to a node
//! that serves HTTPS. Must not: write anything, or show a token (it is only handed to
//! the pull round, which sends it to its own node).

use super::client::{origin, NodeTrust};
use super::status::{PullStatus, PushStatus, Route, Usage};
use super::FleetError;
use crate::api::{redact_errors, ConfigError, ConfigStore};
use crate::etcd::status::{self, StatusKey};
use crate::tls::Fingerprint;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tracing::warn;

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
            format!("{} is set", StatusKey::ApiTls.key(&self.id))
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
        trust_of(
            self.ca.clone(),
            self.nodes.iter().map(|n| (n.api_url.as_str(), &n.pin)),
        )
    }
}

/// The CA and every registered node's pin, keyed by the origin of its api_url.
fn trust_of<'a>(
    ca: Option<String>,
    nodes: impl Iterator<Item = (&'a str, &'a Option<Result<Fingerprint, String>>)>,
) -> NodeTrust {
    NodeTrust {
        ca_pem: ca,
        pins: nodes
            .filter_map(|(url, pin)| Some((origin(url)?, *pin.as_ref()?.as_ref().ok()?)))
            .collect(),
    }
}

/// One node to act on ([`load_node`]): the node, with what reaching it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAccess {
    /// `None` when the id is not registered.
    pub node: Option<Registered>,
    /// `/fleet/proxy`.
    pub proxy: Option<String>,
    /// The same trust a whole-registry read gives ([`Registry::trust`]): the client's
    /// trust is shared with the pull round, so it keeps every node's pin.
    pub trust: NodeTrust,
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

/// A node's `errors`: an unreadable list becomes one entry that says so.
fn read_errors(key: &str, v: &str) -> Vec<ConfigError> {
    let v = v.trim();
    if v.is_empty() {
        return Vec::new();
    }
    status::parse_errors(v).unwrap_or_else(|e| {
        vec![ConfigError {
            key: key.to_string(),
            value: String::new(),
            reason: format!("unreadable errors list: {e}"),
        }]
    })
}

/// What `/fleet/` says, read in one get: the shared keys, each valid node's entry
/// (in key order) and what `--publish` wrote.
struct FleetKeys {
    proxy: Option<String>,
    ca: Option<String>,
    nodes: Vec<FleetNode>,
    published: BTreeMap<String, Published>,
}

/// `/fleet/nodes/<id>/api_url` and `/fleet/nodes/<id>/cert_sha256`.
struct FleetNode {
    id: String,
    api_url: String,
    pin: Option<Result<Fingerprint, String>>,
}

async fn read_fleet(store: &dyn ConfigStore) -> Result<FleetKeys, FleetError> {
    let fleet = store.get_prefix("/fleet/").await?;
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
        nodes.push(FleetNode {
            id: id.to_string(),
            api_url: v.trim().trim_end_matches('/').to_string(),
            pin: fleet
                .get(&format!("/fleet/nodes/{id}/cert_sha256"))
                .filter(|p| !p.trim().is_empty())
                .map(|p| p.parse::<Fingerprint>()),
        });
    }
    Ok(FleetKeys {
        proxy,
        ca,
        nodes,
        published,
    })
}

/// One node's `/updated/<id>/` keys and its token, with its `/fleet/` entry.
async fn read_node(store: &dyn ConfigStore, n: FleetNode) -> Result<Registered, FleetError> {
    let id = n.id.as_str();
    let updated = store.get_prefix(&status::node_prefix(id)).await?;
    let reported = |key: &StatusKey| updated.get(&key.key(id));
    let token = store
        .get(&format!("/nodes/{id}/api/token"))
        .await?
        .map(|v| v.value.trim().to_string())
        .filter(|t| !t.is_empty());
    let errors_key = StatusKey::Errors.key(id);
    Ok(Registered {
        online: reported(&StatusKey::Online).is_some(),
        applied_revision: reported(&StatusKey::Applied).and_then(|a| status::parse_applied(a)),
        errors: redact_errors(
            reported(&StatusKey::Errors)
                .map(|e| read_errors(&errors_key, e))
                .unwrap_or_default(),
        ),
        serves_https: reported(&StatusKey::ApiTls).is_some(),
        token,
        pin: n.pin,
        api_url: n.api_url,
        id: n.id,
    })
}

/// Read `/fleet/`, `/commit` and, per registered node, `/updated/<id>/` and its token.
pub async fn load_registry(store: &dyn ConfigStore) -> Result<Registry, FleetError> {
    let fleet = read_fleet(store).await?;
    let commit_revision = store
        .get(crate::api::store::COMMIT_KEY)
        .await?
        .map(|v| v.mod_revision);
    let mut nodes = Vec::new();
    for n in fleet.nodes {
        nodes.push(read_node(store, n).await?);
    }
    Ok(Registry {
        commit_revision,
        proxy: fleet.proxy,
        ca: fleet.ca,
        nodes,
        published: fleet.published,
    })
}

/// Read `/fleet/` and only node `id`'s `/updated/<id>/` keys and token (a console
/// action on one node).
pub async fn load_node(store: &dyn ConfigStore, id: &str) -> Result<NodeAccess, FleetError> {
    let fleet = read_fleet(store).await?;
    let trust = trust_of(
        fleet.ca,
        fleet.nodes.iter().map(|n| (n.api_url.as_str(), &n.pin)),
    );
    let node = match fleet.nodes.into_iter().find(|n| n.id == id) {
        Some(n) => Some(read_node(store, n).await?),
        None => None,
    };
    Ok(NodeAccess {
        node,
        proxy: fleet.proxy,
        trust,
    })
}
