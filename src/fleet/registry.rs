//! The fleet registry: `/fleet/` (registered nodes, their pins, the proxy, the CA and
//! what `--publish` wrote), `/commit`, and per node its status keys (read through
//! [`crate::etcd::status`]) and its API token.
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
        let updated = store.get_prefix(&status::node_prefix(id)).await?;
        let reported = |key: &StatusKey| updated.get(&key.key(id));
        let token = store
            .get(&format!("/nodes/{id}/api/token"))
            .await?
            .map(|v| v.value.trim().to_string())
            .filter(|t| !t.is_empty());
        let errors_key = StatusKey::Errors.key(id);
        nodes.push(Registered {
            id: id.to_string(),
            api_url: v.trim().trim_end_matches('/').to_string(),
            token,
            online: reported(&StatusKey::Online).is_some(),
            applied_revision: reported(&StatusKey::Applied).and_then(|a| status::parse_applied(a)),
            errors: redact_errors(
                reported(&StatusKey::Errors)
                    .map(|e| read_errors(&errors_key, e))
                    .unwrap_or_default(),
            ),
            pin: fleet
                .get(&format!("/fleet/nodes/{id}/cert_sha256"))
                .filter(|p| !p.trim().is_empty())
                .map(|p| p.parse::<Fingerprint>()),
            serves_https: reported(&StatusKey::ApiTls).is_some(),
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
