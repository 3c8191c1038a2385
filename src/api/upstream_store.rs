//! DNS upstream groups in etcd, for every writer: the node API (its own node's groups)
//! and the fleet console (the global groups, or any node's overrides).
//!
//! Owns: which groups a scope sees ([`effective`]: a node's own groups over the global
//! ones over the built-in defaults), and the create/update/delete rules with their
//! errors (exists, not found, defined in the other scope), written as one transaction.
//! Must not: parse bodies or keys (that is [`super::upstreams`]), attach live state
//! (callers add what their DNS frontend knows), or decide when to commit: the caller
//! says [`Apply::Commit`] (the node API: the edit and `/commit` in one transaction) or
//! [`Apply::Stage`] (the console: keys only, then a validated `meduza commit`).

use super::store::{ConfigStore, WriteOp};
use super::upstreams::{self, StoredUpstream, UpstreamSpec};
use super::{ApiError, UpstreamStatus};
use serde::Serialize;
use std::collections::BTreeMap;

/// The global groups' prefix (DESIGN §3).
pub const GLOBAL_PREFIX: &str = "/global/dns/upstreams/";

/// Whose groups: `/global/dns/upstreams/` or `/nodes/<id>/dns/upstreams/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Global,
    Node(String),
}

impl Scope {
    pub fn prefix(&self) -> String {
        match self {
            Scope::Global => GLOBAL_PREFIX.to_string(),
            Scope::Node(id) => format!("/nodes/{id}/dns/upstreams/"),
        }
    }

    fn source(&self) -> UpstreamSource {
        match self {
            Scope::Global => UpstreamSource::Global,
            Scope::Node(_) => UpstreamSource::Node,
        }
    }
}

/// With a write: bump `/commit` in the same transaction, or only stage the keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    Commit,
    Stage,
}

/// Where an effective upstream comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamSource {
    /// `/nodes/<id>/dns/upstreams/<name>/`.
    Node,
    /// `/global/dns/upstreams/<name>/` (a node entry of the same name overrides it).
    Global,
    /// The built-in defaults, used when nothing is configured.
    Default,
}

/// One group as a scope sees it (`GET /v1/dns/upstreams`, the console's list).
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamView {
    pub name: String,
    pub source: UpstreamSource,
    pub config: UpstreamSpec,
    /// Problems in the stored keys (the reconciler rejects such a snapshot).
    pub problems: Vec<upstreams::KeyProblem>,
    /// Live state from the node's DNS frontend, when the caller knows it.
    pub live: Option<UpstreamStatus>,
}

/// The groups `scope` sees, by name: for a node its own over the global ones; the
/// built-in defaults when neither has any.
pub async fn effective(
    store: &dyn ConfigStore,
    scope: &Scope,
) -> Result<BTreeMap<String, UpstreamView>, ApiError> {
    let mut out: BTreeMap<String, UpstreamView> = BTreeMap::new();
    let mut add = |src: UpstreamSource, m: BTreeMap<String, StoredUpstream>| {
        for (name, s) in m {
            out.insert(
                name.clone(),
                UpstreamView {
                    name,
                    source: src,
                    config: s.spec,
                    problems: s.problems,
                    live: None,
                },
            );
        }
    };
    add(
        UpstreamSource::Global,
        upstreams::from_keys(GLOBAL_PREFIX, &store.get_prefix(GLOBAL_PREFIX).await?),
    );
    if let Scope::Node(_) = scope {
        let prefix = scope.prefix();
        add(
            UpstreamSource::Node,
            upstreams::from_keys(&prefix, &store.get_prefix(&prefix).await?),
        );
    }
    if out.is_empty() {
        for g in meduza_generators::model::default_upstreams() {
            out.insert(
                g.name.clone(),
                UpstreamView {
                    name: g.name.clone(),
                    source: UpstreamSource::Default,
                    config: UpstreamSpec::from(&g),
                    problems: Vec::new(),
                    live: None,
                },
            );
        }
    }
    Ok(out)
}

/// The groups sorted as the DNS frontend tries them: priority, then name.
pub fn by_priority(groups: BTreeMap<String, UpstreamView>) -> Vec<UpstreamView> {
    let mut v: Vec<UpstreamView> = groups.into_values().collect();
    v.sort_by(|a, b| {
        a.config
            .priority
            .cmp(&b.config.priority)
            .then(a.name.cmp(&b.name))
    });
    v
}

async fn write(store: &dyn ConfigStore, ops: Vec<WriteOp>, apply: Apply) -> Result<i64, ApiError> {
    Ok(match apply {
        Apply::Commit => store.write_and_commit(ops).await?,
        Apply::Stage => store.write(ops).await?,
    })
}

/// Replace the keys under `<prefix><name>/` with `spec`'s.
async fn write_spec(
    store: &dyn ConfigStore,
    scope: &Scope,
    spec: &UpstreamSpec,
    apply: Apply,
) -> Result<i64, ApiError> {
    let base = format!("{}{}/", scope.prefix(), spec.name);
    let existing = store.get_prefix(&base).await?;
    let new_keys = spec.to_keys(&base);
    let mut ops: Vec<WriteOp> = existing
        .keys()
        .filter(|k| !new_keys.iter().any(|(nk, _)| nk == *k))
        .map(|k| WriteOp::Delete { key: k.clone() })
        .collect();
    ops.extend(
        new_keys
            .into_iter()
            .map(|(key, value)| WriteOp::Put { key, value }),
    );
    write(store, ops, apply).await
}

/// A new group in `scope`; refused when the scope already sees one of that name
/// (other than a built-in default). Returns the write's revision.
pub async fn create(
    store: &dyn ConfigStore,
    scope: &Scope,
    spec: &UpstreamSpec,
    apply: Apply,
) -> Result<i64, ApiError> {
    if let Some(v) = effective(store, scope).await?.get(&spec.name) {
        if v.source != UpstreamSource::Default {
            return Err(ApiError::Exists {
                name: spec.name.clone(),
                reason: format!(
                    "upstream already exists ({}); update it instead",
                    if v.source == UpstreamSource::Node {
                        "on this node"
                    } else {
                        "globally"
                    },
                ),
            });
        }
    }
    write_spec(store, scope, spec, apply).await
}

/// Replace group `name` in `scope` (for a node, a global group of that name gets a
/// node override). Not found when the scope does not see it.
pub async fn update(
    store: &dyn ConfigStore,
    scope: &Scope,
    name: &str,
    spec: &UpstreamSpec,
    apply: Apply,
) -> Result<i64, ApiError> {
    upstreams::check_name(name)?;
    if !effective(store, scope).await?.contains_key(name) {
        return Err(ApiError::NotFound {
            what: format!("upstream {name}"),
        });
    }
    write_spec(store, scope, spec, apply).await
}

/// Delete group `name` from `scope`. A node cannot delete a global group.
pub async fn delete(
    store: &dyn ConfigStore,
    scope: &Scope,
    name: &str,
    apply: Apply,
) -> Result<i64, ApiError> {
    upstreams::check_name(name)?;
    let existing = store
        .get_prefix(&format!("{}{name}/", scope.prefix()))
        .await?;
    if existing.is_empty() {
        let found = effective(store, scope).await?.get(name).map(|v| v.source);
        return Err(match found {
            Some(UpstreamSource::Global) if scope.source() == UpstreamSource::Node => {
                ApiError::Conflict {
                    name: name.to_string(),
                    reason: "defined in /global/dns/upstreams; a node edits only its own upstreams"
                        .into(),
                }
            }
            _ => ApiError::NotFound {
                what: format!("upstream {name}"),
            },
        });
    }
    let ops = existing
        .into_keys()
        .map(|key| WriteOp::Delete { key })
        .collect();
    write(store, ops, apply).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::MemStore;

    fn spec(name: &str, addr: &str) -> UpstreamSpec {
        upstreams::parse_body(
            format!(r#"{{"name":"{name}","addresses":["{addr}"]}}"#).as_bytes(),
            None,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn scopes_stage_or_commit_and_see_their_own_groups() {
        let s = MemStore::new();
        let node = Scope::Node("gw-a".into());
        // Global, staged: no /commit.
        create(&s, &Scope::Global, &spec("g1", "9.9.9.9"), Apply::Stage)
            .await
            .unwrap();
        let keys = s.dump();
        assert_eq!(keys["/global/dns/upstreams/g1/addresses"], "9.9.9.9");
        assert!(!keys.contains_key("/commit"));
        // The node sees it; creating it again there is refused, updating overrides.
        let e = create(&s, &node, &spec("g1", "1.1.1.1"), Apply::Commit)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("globally"), "{e}");
        update(&s, &node, "g1", &spec("g1", "1.1.1.1"), Apply::Commit)
            .await
            .unwrap();
        let keys = s.dump();
        assert_eq!(keys["/nodes/gw-a/dns/upstreams/g1/addresses"], "1.1.1.1");
        assert!(keys.contains_key("/commit"));
        let seen = effective(&s, &node).await.unwrap();
        assert_eq!(seen["g1"].source, UpstreamSource::Node);
        assert_eq!(
            effective(&s, &Scope::Global).await.unwrap()["g1"].source,
            UpstreamSource::Global
        );
        // The node deletes its override, then cannot delete the global group.
        delete(&s, &node, "g1", Apply::Stage).await.unwrap();
        let e = delete(&s, &node, "g1", Apply::Stage).await.unwrap_err();
        assert!(matches!(e, ApiError::Conflict { .. }), "{e}");
        delete(&s, &Scope::Global, "g1", Apply::Stage)
            .await
            .unwrap();
        let e = delete(&s, &Scope::Global, "g1", Apply::Stage)
            .await
            .unwrap_err();
        assert!(matches!(e, ApiError::NotFound { .. }), "{e}");
    }
}
