//! Push and pull status of a node (DESIGN §9), as pure functions of what is known
//! about the node and the current time, plus usage accounting from stat samples.
//!
//! Owns: the decision table. Must not: read clocks, etcd or the network — the manager
//! gathers [`NodeFacts`] and passes `now`.

use serde::{Deserialize, Serialize};

/// Configuration state of a node as the fleet sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PushStatus {
    /// Online, applied the current `/commit`, no errors, reachable directly.
    Available,
    /// Applied with errors (running the last good configuration), or reachable only
    /// through `/fleet/proxy`.
    Dirty,
    /// Offline, or has not applied the current `/commit`.
    Unavailable,
}

/// Stats collection state of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PullStatus {
    /// Never pulled yet, and the node was first seen less than the threshold ago.
    Pending,
    /// A pull succeeded within the threshold.
    Available,
    /// No successful pull for longer than the threshold (DESIGN §9: 1 minute).
    Unavailable,
}

/// How the last successful pull reached the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    Direct,
    Proxy,
}

/// DESIGN §9: pull `unavailable` after 1 minute without a successful pull.
pub const PULL_THRESHOLD_MS: u64 = 60_000;

/// Everything the status decision looks at. Times are unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeFacts {
    /// `/updated/<id>/online` is present (its lease is alive).
    pub online: bool,
    /// Revision in `/updated/<id>/applied`.
    pub applied_revision: Option<i64>,
    /// Mod revision of `/commit`; `None` when there is none.
    pub commit_revision: Option<i64>,
    /// Entries in `/updated/<id>/errors`.
    pub error_count: usize,
    /// Last successful pull: when and through which route.
    pub last_pull: Option<(u64, Route)>,
    /// When the manager first saw the node registered.
    pub first_seen_ms: u64,
}

/// Whether `last` is within `threshold_ms` of `now_ms` (exactly `threshold_ms` ago
/// still counts, as the predecessor's `now - pulledAt > 1 min` test).
fn fresh(last_ms: u64, now_ms: u64, threshold_ms: u64) -> bool {
    now_ms.saturating_sub(last_ms) <= threshold_ms
}

/// Push status. A stale proxy-only pull (older than the pull threshold) no longer
/// marks the node dirty; the pull status shows that instead.
pub fn push_status(f: &NodeFacts, now_ms: u64, pull_threshold_ms: u64) -> PushStatus {
    if !f.online {
        return PushStatus::Unavailable;
    }
    if f.error_count > 0 {
        return PushStatus::Dirty;
    }
    let applied = match (f.commit_revision, f.applied_revision) {
        (None, _) => true,
        (Some(c), Some(a)) => a >= c,
        (Some(_), None) => false,
    };
    if !applied {
        return PushStatus::Unavailable;
    }
    match f.last_pull {
        Some((t, Route::Proxy)) if fresh(t, now_ms, pull_threshold_ms) => PushStatus::Dirty,
        _ => PushStatus::Available,
    }
}

/// Pull status.
pub fn pull_status(f: &NodeFacts, now_ms: u64, threshold_ms: u64) -> PullStatus {
    match f.last_pull {
        Some((t, _)) if fresh(t, now_ms, threshold_ms) => PullStatus::Available,
        Some(_) => PullStatus::Unavailable,
        None if fresh(f.first_seen_ms, now_ms, threshold_ms) => PullStatus::Pending,
        None => PullStatus::Unavailable,
    }
}

/// Usage accounting: node counters are running totals since the node booted; the
/// manager adds the growth between samples, and a total smaller than the previous one
/// means the counters restarted (reboot), so all of it is new.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// The node's total at the last sample.
    pub last_total: Option<u64>,
    /// Bytes accounted so far.
    pub bytes: u64,
}

impl Usage {
    pub fn add_sample(self, total: u64) -> Usage {
        let delta = match self.last_total {
            Some(prev) if total >= prev => total - prev,
            _ => total,
        };
        Usage {
            last_total: Some(total),
            bytes: self.bytes.saturating_add(delta),
        }
    }
}

/// The node total usage in a `/v1/stats` list: every interface's uplink + downlink.
pub fn usage_total(stats: &[crate::api::Stat]) -> u64 {
    stats
        .iter()
        .filter(|s| {
            let parts: Vec<&str> = s.name.split(">>>").collect();
            parts.len() == 4
                && parts[0] == "iface"
                && parts[2] == "traffic"
                && matches!(parts[3], "uplink" | "downlink")
        })
        .fold(0u64, |acc, s| acc.saturating_add(s.value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use PullStatus as L;
    use PushStatus as P;

    const T: u64 = PULL_THRESHOLD_MS;
    const NOW: u64 = 1_700_000_000_000;

    fn facts(
        online: bool,
        applied: Option<i64>,
        commit: Option<i64>,
        errors: usize,
        pull: Option<(u64, Route)>,
    ) -> NodeFacts {
        NodeFacts {
            online,
            applied_revision: applied,
            commit_revision: commit,
            error_count: errors,
            last_pull: pull,
            first_seen_ms: NOW - 10 * T,
        }
    }

    #[test]
    fn push_table() {
        let direct = Some((NOW - 5_000, Route::Direct));
        let proxy = Some((NOW - 5_000, Route::Proxy));
        let stale_proxy = Some((NOW - T - 1, Route::Proxy));
        let table: &[(&str, NodeFacts, PushStatus)] = &[
            (
                "applied current commit, direct",
                facts(true, Some(10), Some(10), 0, direct),
                P::Available,
            ),
            (
                "applied newer than seen commit",
                facts(true, Some(11), Some(10), 0, direct),
                P::Available,
            ),
            (
                "no commit key at all",
                facts(true, None, None, 0, None),
                P::Available,
            ),
            (
                "never pulled but applied",
                facts(true, Some(10), Some(10), 0, None),
                P::Available,
            ),
            (
                "offline",
                facts(false, Some(10), Some(10), 0, direct),
                P::Unavailable,
            ),
            (
                "offline with errors",
                facts(false, Some(9), Some(10), 2, direct),
                P::Unavailable,
            ),
            (
                "behind the commit",
                facts(true, Some(9), Some(10), 0, direct),
                P::Unavailable,
            ),
            (
                "never applied",
                facts(true, None, Some(10), 0, direct),
                P::Unavailable,
            ),
            (
                "could not apply (errors)",
                facts(true, Some(9), Some(10), 1, direct),
                P::Dirty,
            ),
            (
                "errors on current",
                facts(true, Some(10), Some(10), 1, direct),
                P::Dirty,
            ),
            (
                "only through proxy",
                facts(true, Some(10), Some(10), 0, proxy),
                P::Dirty,
            ),
            (
                "stale proxy pull",
                facts(true, Some(10), Some(10), 0, stale_proxy),
                P::Available,
            ),
            (
                "behind and proxy",
                facts(true, Some(9), Some(10), 0, proxy),
                P::Unavailable,
            ),
        ];
        for (what, f, want) in table {
            assert_eq!(push_status(f, NOW, T), *want, "{what}");
        }
    }

    #[test]
    fn pull_table_with_the_real_one_minute_threshold() {
        let mk = |pull: Option<u64>, first_seen: u64| NodeFacts {
            last_pull: pull.map(|t| (t, Route::Direct)),
            first_seen_ms: first_seen,
            ..Default::default()
        };
        let table: &[(&str, NodeFacts, PullStatus)] = &[
            (
                "pulled just now",
                mk(Some(NOW), NOW - 1_000_000),
                L::Available,
            ),
            (
                "pulled 59.999 s ago",
                mk(Some(NOW - 59_999), 0),
                L::Available,
            ),
            (
                "pulled exactly 60 s ago",
                mk(Some(NOW - 60_000), 0),
                L::Available,
            ),
            (
                "pulled 60.001 s ago",
                mk(Some(NOW - 60_001), 0),
                L::Unavailable,
            ),
            (
                "pulled 70 s ago (the killed-node case)",
                mk(Some(NOW - 70_000), 0),
                L::Unavailable,
            ),
            ("never, seen 30 s ago", mk(None, NOW - 30_000), L::Pending),
            (
                "never, seen 61 s ago",
                mk(None, NOW - 61_000),
                L::Unavailable,
            ),
            ("clock went back", mk(Some(NOW + 5_000), 0), L::Available),
        ];
        for (what, f, want) in table {
            assert_eq!(pull_status(f, NOW, PULL_THRESHOLD_MS), *want, "{what}");
        }
        assert_eq!(PULL_THRESHOLD_MS, 60_000);
    }

    #[test]
    fn usage_accumulates_across_counter_resets() {
        let u = Usage::default().add_sample(1000);
        assert_eq!(u.bytes, 1000);
        let u = u.add_sample(1500);
        assert_eq!(u.bytes, 1500);
        let u = u.add_sample(200); // node rebooted
        assert_eq!(u.bytes, 1700);
        let u = u.add_sample(200);
        assert_eq!(u.bytes, 1700);
    }

    #[test]
    fn usage_total_sums_interfaces_only() {
        let s = |n: &str, v| crate::api::Stat {
            name: n.into(),
            value: v,
        };
        let stats = vec![
            s("iface>>>eth0>>>traffic>>>downlink", 10),
            s("iface>>>eth0>>>traffic>>>uplink", 5),
            s("iface>>>eth1>>>traffic>>>uplink", 1),
            s("service>>>mihomo>>>traffic>>>uplink", 1000),
            s("tproxy>>>x>>>traffic>>>bytes", 1000),
        ];
        assert_eq!(usage_total(&stats), 16);
    }
}
