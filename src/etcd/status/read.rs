//! Reading a node's status keys back for `meduza status` (formats: [`super`]).
//!
//! Must not: write anything; a key this version does not know is shown as it is.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::{
    node_prefix, parse_applied, parse_errors, parse_failover_log, ErrorEntry, FailoverEntry,
    StatusKey, ONLINE_VALUE,
};
use crate::etcd::kv::{KeyRange, Kv};
use crate::etcd::watch::COMMIT_KEY;
use crate::etcd::EtcdError;

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
            match StatusKey::parse(k) {
                Some(StatusKey::Online) => st.online = v == ONLINE_VALUE,
                Some(StatusKey::Last) => st.last = Some(v.clone()),
                Some(StatusKey::Applied) => {
                    st.applied_revision = parse_applied(v);
                    st.applied = Some(v.clone());
                }
                Some(StatusKey::Errors) => match parse_errors(v) {
                    Ok(e) => st.errors = e,
                    Err(_) => st.errors_unparsed = Some(v.clone()),
                },
                Some(StatusKey::Service(svc)) => {
                    st.services.insert(svc, v.clone());
                }
                Some(StatusKey::Openvpn(name)) => {
                    st.openvpn.insert(name, v.clone());
                }
                Some(StatusKey::Wireguard(name)) => {
                    st.wireguard.insert(name, v.clone());
                }
                Some(StatusKey::ClashHealth) => st.clash_health = Some(v.clone()),
                Some(StatusKey::Tproxy) => st.tproxy = Some(v.clone()),
                Some(StatusKey::DnsUpstream(name)) => {
                    st.dns_upstreams.insert(name, v.clone());
                }
                Some(StatusKey::FailoverLog) => {
                    st.failover_log = parse_failover_log(v).unwrap_or_default();
                }
                // Shown as they are, with the keys this version does not know.
                Some(
                    StatusKey::Warnings
                    | StatusKey::Rollback
                    | StatusKey::ApiTls
                    | StatusKey::ClashSubscription,
                )
                | None => {
                    st.other.insert(k.clone(), v.clone());
                }
            }
        }
        st
    }
}

/// Reads a node's status and the current `/commit` revision.
pub async fn read_status(kv: &dyn Kv, node_id: &str) -> Result<NodeStatus, EtcdError> {
    let prefix = node_prefix(node_id);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::status::{errors_value, ErrorEntry};
    use crate::etcd::{Kv, MemKv};

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
