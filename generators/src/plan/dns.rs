//! The DNS plan: host records, the forwarding chain's inputs and the upstream groups.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

/// MosDNS listens here when enabled (DESIGN §8).
pub const MOSDNS_ADDR: &str = "127.0.0.1:1153";
/// mihomo's DNS listener (DESIGN §8).
pub const CLASH_DNS_ADDR: &str = "127.0.0.1:1053";

/// One upstream group (DESIGN §3 `/global/dns/upstreams/<name>/...`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamGroup {
    pub name: String,
    /// Plain DNS addresses (ip or ip:port; port 53 when not given).
    pub addresses: Vec<SocketAddr>,
    /// 1 = primary, 2 = secondary, ...
    pub priority: u32,
    pub enable: bool,
    pub health_check: HealthCheck,
    pub failover: Failover,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub enable: bool,
    /// Seconds between checks (default 30).
    pub interval_secs: u64,
    /// Seconds before a check query counts as failed (default 5).
    pub timeout_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failover {
    pub enable: bool,
    /// Consecutive failures before traffic moves to the next group (default 3).
    pub threshold: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            enable: true,
            interval_secs: 30,
            timeout_secs: 5,
        }
    }
}

impl Default for Failover {
    fn default() -> Self {
        Self {
            enable: true,
            threshold: 3,
        }
    }
}

/// Everything the DNS frontend needs from configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DnsPlan {
    /// `/dns/hosts/<name>` → addresses, names lower-cased without a trailing dot.
    pub hosts: BTreeMap<String, Vec<IpAddr>>,
    /// MosDNS is enabled on this node (it joins the chain while it runs).
    pub mosdns_enabled: bool,
    /// Clash is enabled on this node (its DNS joins the chain while it is healthy).
    pub clash_enabled: bool,
    /// Upstream groups sorted by priority, then name; disabled groups included
    /// (the frontend skips them) so status can still be shown.
    pub upstreams: Vec<UpstreamGroup>,
}
