//! Snapshots: the flat `{"/key": "value"}` map a reconcile pass reads, taken at one
//! store revision, and the full dump behind `meduza snapshot`.

use std::collections::BTreeMap;

use tracing::{debug, warn};

use super::kv::{KeyRange, Kv};
use super::EtcdError;

/// What a reconcile pass reads (DESIGN §5): global settings, every node (generators
/// need the other nodes' keys for tinc hosts and iBGP peers), the commit key and the
/// host records. `/updated/` (status) and `/fleet/` are not configuration.
pub const SNAPSHOT_PREFIXES: [&str; 4] = ["/global/", "/nodes/", "/commit", "/dns/hosts/"];

fn snapshot_ranges() -> Vec<KeyRange> {
    SNAPSHOT_PREFIXES
        .iter()
        .map(|p| {
            if p.ends_with('/') {
                KeyRange::Prefix((*p).to_owned())
            } else {
                KeyRange::Key((*p).to_owned())
            }
        })
        .collect()
}

/// Loads the reconciler's snapshot in one transaction, so every key is from the same
/// revision; returns the keys and that revision. Watch from `revision + 1` to miss
/// nothing after it.
pub async fn load_snapshot(
    kv: &dyn Kv,
    node_id: &str,
) -> Result<(BTreeMap<String, String>, i64), EtcdError> {
    let (keys, revision) = kv.get_ranges(&snapshot_ranges()).await?;
    let own = format!("/nodes/{node_id}/");
    if !keys.keys().any(|k| k.starts_with(&own)) {
        // Usually a wrong NODE_ID; the pass still runs (and renders "nothing enabled").
        warn!(node = node_id, revision, "no keys under this node's prefix");
    }
    debug!(
        node = node_id,
        revision,
        keys = keys.len(),
        "snapshot loaded"
    );
    Ok((keys, revision))
}

/// What a reconcile pass applies: the snapshot ([`load_snapshot`]) and `/commit`'s
/// mod revision (0 when absent), the revision DESIGN §4's `applied` reports — not
/// the store revision, which every status write moves on. `/commit` is read first:
/// a commit landing between the two reads is in the snapshot but not in the
/// revision, which only under-reports (its watch event triggers another pass).
pub async fn load_config(
    kv: &dyn Kv,
    node_id: &str,
) -> Result<(BTreeMap<String, String>, i64), EtcdError> {
    let commit = kv.get("/commit").await?.map_or(0, |e| e.mod_revision);
    let (keys, _store_revision) = load_snapshot(kv, node_id).await?;
    Ok((keys, commit))
}

/// Every key except the status tree `/updated/`, for `meduza snapshot`.
pub async fn dump_snapshot(kv: &dyn Kv) -> Result<BTreeMap<String, String>, EtcdError> {
    let (mut keys, _) = kv.get_prefix("").await?;
    keys.retain(|k, _| !k.starts_with(super::status::STATUS_ROOT));
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::MemKv;

    #[tokio::test]
    async fn snapshot_holds_config_keys_of_all_nodes_only() {
        let kv = MemKv::with_keys([
            ("/global/mesh_type", "tinc"),
            ("/nodes/a/lan", "10.0.0.0/24"),
            ("/nodes/b/tinc/address", "b.example"),
            ("/commit", "7"),
            ("/commitment", "not ours"),
            ("/dns/hosts/nas", "10.0.0.5"),
            ("/updated/a/online", "1"),
            ("/fleet/nodes/a/api_url", "http://a:9100"),
        ]);
        let (keys, rev) = load_snapshot(&kv, "a").await.unwrap();
        assert_eq!(rev, kv.revision());
        let names: Vec<&str> = keys.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "/commit",
                "/dns/hosts/nas",
                "/global/mesh_type",
                "/nodes/a/lan",
                "/nodes/b/tinc/address"
            ]
        );
        let dump = dump_snapshot(&kv).await.unwrap();
        assert!(dump.contains_key("/fleet/nodes/a/api_url"));
        assert!(dump.contains_key("/commitment"));
        assert!(!dump.keys().any(|k| k.starts_with("/updated/")));
    }

    #[tokio::test]
    async fn config_revision_is_the_commit_keys_not_the_stores() {
        let kv = MemKv::with_keys([("/nodes/a/lan", "10.0.0.0/24")]);
        assert_eq!(load_config(&kv, "a").await.unwrap().1, 0, "no /commit yet");
        kv.put("/commit", "1").await.unwrap();
        let commit = kv.get("/commit").await.unwrap().unwrap().mod_revision;
        // Status writes (and anything else) move the store revision on.
        kv.put("/updated/a/last", "x").await.unwrap();
        kv.put("/nodes/a/private_lan", "10.0.1.0/24").await.unwrap();
        assert!(kv.revision() > commit);
        let (keys, rev) = load_config(&kv, "a").await.unwrap();
        assert_eq!(rev, commit);
        assert!(keys.contains_key("/nodes/a/private_lan"));
    }
}
