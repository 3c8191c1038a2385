//! Every status key under `/updated/<id>/` (DESIGN §4): its name ([`StatusKey`]) and
//! its value format, for writing (typed value → key + string: [`StatusUpdate`]) and
//! for reading (string → typed value: [`StatusKey::parse`], [`StatusUpdate::parse`]
//! and the `parse_*` functions). Every writer and reader of a status key in the crate
//! goes through this module; [`publisher`] writes them, [`read`] reads them back for
//! `meduza status`.
//!
//! Must not: decide what a state means (the supervisor, the Clash monitor, the DNS
//! frontend and the reconciler do); here a state is the word they chose.

pub mod publisher;
pub mod read;

pub use publisher::{PublisherConfig, StatusPublisher};
pub use read::{read_status, render_status_table, NodeStatus};

use std::time::{SystemTime, UNIX_EPOCH};

use meduza_generators::{ValidationError, Warning};
use serde::{Deserialize, Serialize};

use crate::tls::Fingerprint;

/// Root of every node's status keys.
pub const STATUS_ROOT: &str = "/updated/";
/// The failover log keeps at most this many entries (DESIGN §4).
pub const FAILOVER_LOG_MAX: usize = 100;
/// The value of `online` (the key itself lives on a lease).
pub const ONLINE_VALUE: &str = "1";

/// `/updated/<id>/`: the prefix of node `node_id`'s status keys.
pub fn node_prefix(node_id: &str) -> String {
    format!("{STATUS_ROOT}{node_id}/")
}

/// One status key, by what it describes; [`StatusKey::suffix`] is its path below
/// `/updated/<id>/`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StatusKey {
    /// `online`: [`ONLINE_VALUE`] on a lease.
    Online,
    /// `last`: [`last_value`].
    Last,
    /// `applied`: [`applied_value`].
    Applied,
    /// `errors`: [`errors_value`].
    Errors,
    /// `warnings`: [`warnings_value`].
    Warnings,
    /// `rollback`: [`rollback_value`].
    Rollback,
    /// `tproxy`: a [`StateLine`] with its reason.
    Tproxy,
    /// `api_tls`: [`api_tls_value`]; absent while the node API serves plain HTTP.
    ApiTls,
    /// `clash/health`: a [`StateLine`] with its reason.
    ClashHealth,
    /// `clash/subscription`: a [`StateLine`] with its detail.
    ClashSubscription,
    /// `dns/failover_log`: [`failover_log_value`].
    FailoverLog,
    /// `services/<svc>/status`: a [`StateLine`] without detail.
    Service(String),
    /// `openvpn/<name>/status`: a [`StateLine`] without detail.
    Openvpn(String),
    /// `wireguard/<name>/status`: a [`StateLine`] without detail.
    Wireguard(String),
    /// `dns/upstreams/<name>/status`: a [`StateLine`] whose detail is the latency.
    DnsUpstream(String),
}

impl StatusKey {
    /// The key below `/updated/<id>/`.
    pub fn suffix(&self) -> String {
        match self {
            Self::Online => "online".into(),
            Self::Last => "last".into(),
            Self::Applied => "applied".into(),
            Self::Errors => "errors".into(),
            Self::Warnings => "warnings".into(),
            Self::Rollback => "rollback".into(),
            Self::Tproxy => "tproxy".into(),
            Self::ApiTls => "api_tls".into(),
            Self::ClashHealth => "clash/health".into(),
            Self::ClashSubscription => "clash/subscription".into(),
            Self::FailoverLog => "dns/failover_log".into(),
            Self::Service(n) => format!("services/{n}/status"),
            Self::Openvpn(n) => format!("openvpn/{n}/status"),
            Self::Wireguard(n) => format!("wireguard/{n}/status"),
            Self::DnsUpstream(n) => format!("dns/upstreams/{n}/status"),
        }
    }

    /// The whole key: `/updated/<node_id>/<suffix>`.
    pub fn key(&self, node_id: &str) -> String {
        format!("{}{}", node_prefix(node_id), self.suffix())
    }

    /// The key a suffix names; `None` for a key this version does not know.
    pub fn parse(suffix: &str) -> Option<Self> {
        let parts: Vec<&str> = suffix.split('/').collect();
        Some(match parts.as_slice() {
            ["online"] => Self::Online,
            ["last"] => Self::Last,
            ["applied"] => Self::Applied,
            ["errors"] => Self::Errors,
            ["warnings"] => Self::Warnings,
            ["rollback"] => Self::Rollback,
            ["tproxy"] => Self::Tproxy,
            ["api_tls"] => Self::ApiTls,
            ["clash", "health"] => Self::ClashHealth,
            ["clash", "subscription"] => Self::ClashSubscription,
            ["dns", "failover_log"] => Self::FailoverLog,
            ["services", n, "status"] => Self::Service((*n).to_owned()),
            ["openvpn", n, "status"] => Self::Openvpn((*n).to_owned()),
            ["wireguard", n, "status"] => Self::Wireguard((*n).to_owned()),
            ["dns", "upstreams", n, "status"] => Self::DnsUpstream((*n).to_owned()),
            _ => return None,
        })
    }
}

/// One validation error, as published in `errors` (and served by the node API as
/// `api::ConfigError`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorEntry {
    pub key: String,
    pub value: String,
    pub reason: String,
}

impl From<&ValidationError> for ErrorEntry {
    fn from(e: &ValidationError) -> Self {
        ErrorEntry {
            key: e.key.clone(),
            value: e.value.clone(),
            reason: e.reason.clone(),
        }
    }
}

/// One entry of `dns/failover_log` (served by the node API as
/// `api::FailoverLogEntry`).
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

/// `"<state> <unix-ts>[ <detail>]"`: the value of the per-service, tunnel, clash,
/// tproxy and upstream keys. Which keys carry the detail is the key's
/// ([`StatusUpdate`]); a reader splits at most three ways, so the detail may hold
/// spaces.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StateLine {
    pub state: String,
    pub ts: u64,
    pub detail: String,
}

impl StateLine {
    pub fn new(state: impl Into<String>, ts: u64, detail: impl Into<String>) -> Self {
        StateLine {
            state: state.into(),
            ts,
            detail: detail.into(),
        }
    }

    /// `"<state> <ts> <detail>"`, the detail written even when empty (the keys with a
    /// reason field always have three).
    pub fn value(&self) -> String {
        format!("{} {} {}", self.state, self.ts, self.detail)
    }

    /// Reads any state line; a missing or unreadable timestamp reads as 0 and a missing
    /// detail as empty.
    pub fn parse(value: &str) -> Self {
        let mut parts = value.splitn(3, ' ');
        StateLine {
            state: parts.next().unwrap_or_default().to_owned(),
            ts: parts.next().and_then(|s| s.parse().ok()).unwrap_or(0),
            detail: parts.next().unwrap_or_default().to_owned(),
        }
    }
}

/// A status value to publish, typed: [`StatusUpdate::key`] and
/// [`StatusUpdate::value`] render it, [`StatusUpdate::parse`] reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusUpdate {
    Last {
        ts: u64,
        reason: String,
    },
    /// After a snapshot was fully applied.
    Applied {
        revision: i64,
        ts: u64,
    },
    Errors(Vec<ErrorEntry>),
    Warnings(Vec<Warning>),
    Rollback(RollbackEntry),
    /// `"starting|running|backoff|fatal|stopped <since>"`.
    Service {
        name: String,
        state: String,
        since: u64,
    },
    /// `"up|connecting|down <ts>"`.
    Openvpn {
        name: String,
        state: String,
        ts: u64,
    },
    /// `"up|connecting|down <ts>"`.
    Wireguard {
        name: String,
        state: String,
        ts: u64,
    },
    /// `"healthy|waiting|unhealthy <ts> <reason>"`.
    ClashHealth(StateLine),
    /// `"ok|failed <ts> <detail>"`.
    ClashSubscription(StateLine),
    /// `"applied|removed <ts> <reason>"`.
    Tproxy(StateLine),
    /// `"healthy|degraded|down|unknown <ts> <latency-ms>"`.
    DnsUpstream {
        name: String,
        state: String,
        ts: u64,
        latency_ms: u64,
    },
    FailoverLog(Vec<FailoverEntry>),
    /// `"<sha256-hex> <ts> <source>"`.
    ApiTls {
        fingerprint: Fingerprint,
        ts: u64,
        source: String,
    },
}

impl StatusUpdate {
    /// The key this value is written to.
    pub fn key(&self) -> StatusKey {
        match self {
            Self::Last { .. } => StatusKey::Last,
            Self::Applied { .. } => StatusKey::Applied,
            Self::Errors(_) => StatusKey::Errors,
            Self::Warnings(_) => StatusKey::Warnings,
            Self::Rollback(_) => StatusKey::Rollback,
            Self::Service { name, .. } => StatusKey::Service(name.clone()),
            Self::Openvpn { name, .. } => StatusKey::Openvpn(name.clone()),
            Self::Wireguard { name, .. } => StatusKey::Wireguard(name.clone()),
            Self::ClashHealth(_) => StatusKey::ClashHealth,
            Self::ClashSubscription(_) => StatusKey::ClashSubscription,
            Self::Tproxy(_) => StatusKey::Tproxy,
            Self::DnsUpstream { name, .. } => StatusKey::DnsUpstream(name.clone()),
            Self::FailoverLog(_) => StatusKey::FailoverLog,
            Self::ApiTls { .. } => StatusKey::ApiTls,
        }
    }

    /// The string written to etcd.
    pub fn value(&self) -> String {
        match self {
            Self::Last { ts, reason } => last_value(*ts, reason),
            Self::Applied { revision, ts } => applied_value(*revision, *ts),
            Self::Errors(e) => errors_value(e),
            Self::Warnings(w) => warnings_value(w),
            Self::Rollback(r) => rollback_value(r),
            Self::Service {
                state, since: ts, ..
            }
            | Self::Openvpn { state, ts, .. }
            | Self::Wireguard { state, ts, .. } => state_value(state, *ts, None),
            Self::ClashHealth(l) | Self::ClashSubscription(l) | Self::Tproxy(l) => l.value(),
            Self::DnsUpstream {
                state,
                ts,
                latency_ms,
                ..
            } => state_value(state, *ts, Some(&latency_ms.to_string())),
            Self::FailoverLog(entries) => failover_log_value(entries),
            Self::ApiTls {
                fingerprint,
                ts,
                source,
            } => api_tls_value(fingerprint, *ts, source),
        }
    }

    /// Reads a value back; `None` for `online`, a key this version does not know, or
    /// a value that is not of its key's format.
    pub fn parse(suffix: &str, value: &str) -> Option<Self> {
        let line = || StateLine::parse(value);
        Some(match StatusKey::parse(suffix)? {
            StatusKey::Online => return None,
            StatusKey::Last => {
                let (ts, reason) = value.split_once(' ')?;
                Self::Last {
                    ts: ts.parse().ok()?,
                    reason: reason.to_owned(),
                }
            }
            StatusKey::Applied => {
                let (revision, ts) = value.split_once(' ')?;
                Self::Applied {
                    revision: revision.parse().ok()?,
                    ts: ts.parse().ok()?,
                }
            }
            StatusKey::Errors => Self::Errors(parse_errors(value).ok()?),
            StatusKey::Warnings => Self::Warnings(serde_json::from_str(value).ok()?),
            StatusKey::Rollback => Self::Rollback(serde_json::from_str(value).ok()?),
            StatusKey::Service(name) => {
                let l = line();
                Self::Service {
                    name,
                    state: l.state,
                    since: l.ts,
                }
            }
            StatusKey::Openvpn(name) => {
                let l = line();
                Self::Openvpn {
                    name,
                    state: l.state,
                    ts: l.ts,
                }
            }
            StatusKey::Wireguard(name) => {
                let l = line();
                Self::Wireguard {
                    name,
                    state: l.state,
                    ts: l.ts,
                }
            }
            StatusKey::ClashHealth => Self::ClashHealth(line()),
            StatusKey::ClashSubscription => Self::ClashSubscription(line()),
            StatusKey::Tproxy => Self::Tproxy(line()),
            StatusKey::DnsUpstream(name) => {
                let l = line();
                Self::DnsUpstream {
                    name,
                    state: l.state,
                    ts: l.ts,
                    latency_ms: l.detail.parse().ok()?,
                }
            }
            StatusKey::FailoverLog => Self::FailoverLog(parse_failover_log(value).ok()?),
            StatusKey::ApiTls => {
                let l = line();
                Self::ApiTls {
                    fingerprint: l.state.parse().ok()?,
                    ts: l.ts,
                    source: l.detail,
                }
            }
        })
    }
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

/// The revision in an `applied` value.
pub fn parse_applied(value: &str) -> Option<i64> {
    value.split_whitespace().next()?.parse().ok()
}

/// `"<state> <unix-ts>[ <detail>]"` for the per-service, tunnel and upstream keys:
/// an empty or absent detail is left out.
pub fn state_value(state: &str, ts: u64, detail: Option<&str>) -> String {
    match detail {
        Some(d) if !d.is_empty() => format!("{state} {ts} {d}"),
        _ => format!("{state} {ts}"),
    }
}

/// `"<sha256-hex> <unix-ts> <source>"` for `api_tls`: the SHA-256 of the certificate
/// the node API serves, and where it came from (`etcd` or `file`).
pub fn api_tls_value(fingerprint: &Fingerprint, ts: u64, source: &str) -> String {
    state_value(&fingerprint.to_string(), ts, Some(source))
}

/// The fingerprint in an `api_tls` value (the fleet manager's reader).
pub fn api_tls_fingerprint(value: &str) -> Option<Fingerprint> {
    value.split_whitespace().next()?.parse().ok()
}

/// The JSON array for `warnings` (`[]` when none): the node's and the global unknown
/// keys, `{key, reason, did_you_mean}` (`meduza_generators::Warning`).
pub fn warnings_value(warnings: &[Warning]) -> String {
    serde_json::to_string(warnings).unwrap_or_else(|_| "[]".to_owned())
}

/// The JSON array for `errors` (`[]` when none).
pub fn errors_value(errors: &[ErrorEntry]) -> String {
    serde_json::to_string(errors).unwrap_or_else(|_| "[]".to_owned())
}

/// The entries of an `errors` value.
pub fn parse_errors(value: &str) -> Result<Vec<ErrorEntry>, serde_json::Error> {
    serde_json::from_str(value)
}

/// The JSON array for `dns/failover_log`: the newest [`FAILOVER_LOG_MAX`] entries,
/// newest last.
pub fn failover_log_value(entries: &[FailoverEntry]) -> String {
    let start = entries.len().saturating_sub(FAILOVER_LOG_MAX);
    serde_json::to_string(&entries[start..]).unwrap_or_else(|_| "[]".to_owned())
}

/// The entries of a `dns/failover_log` value.
pub fn parse_failover_log(value: &str) -> Result<Vec<FailoverEntry>, serde_json::Error> {
    serde_json::from_str(value)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn every_key_round_trips() {
        let keys = [
            (StatusKey::Online, "online"),
            (StatusKey::Last, "last"),
            (StatusKey::Applied, "applied"),
            (StatusKey::Errors, "errors"),
            (StatusKey::Warnings, "warnings"),
            (StatusKey::Rollback, "rollback"),
            (StatusKey::Tproxy, "tproxy"),
            (StatusKey::ApiTls, "api_tls"),
            (StatusKey::ClashHealth, "clash/health"),
            (StatusKey::ClashSubscription, "clash/subscription"),
            (StatusKey::FailoverLog, "dns/failover_log"),
            (
                StatusKey::Service("mihomo".into()),
                "services/mihomo/status",
            ),
            (StatusKey::Openvpn("office".into()), "openvpn/office/status"),
            (StatusKey::Wireguard("wg0".into()), "wireguard/wg0/status"),
            (
                StatusKey::DnsUpstream("ali".into()),
                "dns/upstreams/ali/status",
            ),
        ];
        for (key, suffix) in keys {
            assert_eq!(key.suffix(), suffix);
            assert_eq!(StatusKey::parse(suffix), Some(key.clone()));
            assert_eq!(key.key("gw-a"), format!("/updated/gw-a/{suffix}"));
        }
        for unknown in ["future/key", "services/x", "dns/upstreams/a/b/status", ""] {
            assert_eq!(StatusKey::parse(unknown), None, "{unknown:?}");
        }
    }

    #[test]
    fn every_value_round_trips() {
        let fp: Fingerprint = "ab".repeat(32).parse().unwrap();
        let cases = [
            (
                StatusUpdate::Last {
                    ts: 100,
                    reason: "applied revision 7".into(),
                },
                "100 applied revision 7".to_owned(),
            ),
            (
                StatusUpdate::Applied {
                    revision: 7,
                    ts: 100,
                },
                "7 100".to_owned(),
            ),
            (StatusUpdate::Errors(Vec::new()), "[]".to_owned()),
            (
                StatusUpdate::Errors(vec![ErrorEntry {
                    key: "/nodes/a/lan".into(),
                    value: "bad".into(),
                    reason: "not a CIDR".into(),
                }]),
                r#"[{"key":"/nodes/a/lan","value":"bad","reason":"not a CIDR"}]"#.to_owned(),
            ),
            (
                StatusUpdate::Warnings(vec![Warning::unknown_key("/nodes/a/lann", None)]),
                warnings_value(&[Warning::unknown_key("/nodes/a/lann", None)]),
            ),
            (
                StatusUpdate::Rollback(RollbackEntry {
                    revision: 6,
                    reason: "etcd unreachable".into(),
                    at: 100,
                }),
                r#"{"revision":6,"reason":"etcd unreachable","at":100}"#.to_owned(),
            ),
            (
                StatusUpdate::Service {
                    name: "mihomo".into(),
                    state: "running".into(),
                    since: 100,
                },
                "running 100".to_owned(),
            ),
            (
                StatusUpdate::Openvpn {
                    name: "office".into(),
                    state: "connecting".into(),
                    ts: 100,
                },
                "connecting 100".to_owned(),
            ),
            (
                StatusUpdate::Wireguard {
                    name: "wg0".into(),
                    state: "up".into(),
                    ts: 100,
                },
                "up 100".to_owned(),
            ),
            (
                StatusUpdate::ClashHealth(StateLine::new("unhealthy", 100, "api down")),
                "unhealthy 100 api down".to_owned(),
            ),
            (
                StatusUpdate::ClashSubscription(StateLine::new("ok", 100, "3 proxies, unchanged")),
                "ok 100 3 proxies, unchanged".to_owned(),
            ),
            // The reason field is written even when empty.
            (
                StatusUpdate::Tproxy(StateLine::new("removed", 100, "")),
                "removed 100 ".to_owned(),
            ),
            (
                StatusUpdate::Tproxy(StateLine::new("applied", 100, "mihomo healthy")),
                "applied 100 mihomo healthy".to_owned(),
            ),
            (
                StatusUpdate::DnsUpstream {
                    name: "ali".into(),
                    state: "healthy".into(),
                    ts: 100,
                    latency_ms: 0,
                },
                "healthy 100 0".to_owned(),
            ),
            (
                StatusUpdate::FailoverLog(vec![FailoverEntry {
                    ts: 100,
                    upstream: "ali".into(),
                    action: "failover_triggered".into(),
                    reason: "3 failures".into(),
                }]),
                r#"[{"ts":100,"upstream":"ali","action":"failover_triggered","reason":"3 failures"}]"#
                    .to_owned(),
            ),
            (
                StatusUpdate::ApiTls {
                    fingerprint: fp,
                    ts: 100,
                    source: "file".into(),
                },
                format!("{} 100 file", "ab".repeat(32)),
            ),
        ];
        for (update, value) in cases {
            assert_eq!(update.value(), value, "{update:?}");
            let suffix = update.key().suffix();
            assert_eq!(
                StatusUpdate::parse(&suffix, &value),
                Some(update.clone()),
                "{suffix} = {value:?}"
            );
        }
        assert_eq!(parse_applied("7 100"), Some(7));
        assert_eq!(api_tls_fingerprint(&format!("{fp} 100 etcd")), Some(fp));
        assert_eq!(
            StateLine::parse("running"),
            StateLine::new("running", 0, ""),
            "a short line reads with defaults"
        );
        assert_eq!(StatusUpdate::parse("online", ONLINE_VALUE), None);
        assert_eq!(StatusUpdate::parse("applied", "seven"), None);
        assert_eq!(StatusUpdate::parse("errors", "not json"), None);
    }
}
