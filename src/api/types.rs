//! The node API's data types and the [`NodeView`] trait the daemon implements.
//!
//! Owns: the JSON shapes of `/v1/status`, `/v1/stats`, the DNS endpoints and the
//! metrics snapshot. Must not: hold secrets — none of these types has a field for a
//! token, key or Clash secret, and configuration errors are redacted before they leave
//! the node ([`redact_errors`]).

use super::ApiError;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// What the API needs from the running daemon. Implemented by the integrator over the
/// live supervisor, DNS frontend and reconciler; tests use fakes.
pub trait NodeView: Send + Sync + 'static {
    /// A point-in-time status of the node.
    fn status(&self) -> NodeStatus;
    /// Counters the daemon owns (nftables TPROXY counters, mihomo traffic totals).
    /// Interface counters are read by the API itself through [`super::IfaceCounters`].
    fn stats_sources(&self) -> StatsSources;
    /// Counters and gauges rendered on `/metrics`.
    fn metrics(&self) -> MetricsSnapshot;
    /// Query every address of upstream group `name` now. `ApiError::NotFound` when the
    /// frontend has no such group.
    fn dns_test(&self, name: &str) -> BoxFuture<'static, Result<UpstreamTest, ApiError>>;
    /// Manual failover to `target`, or to the first healthy group after the active one
    /// when `None`.
    fn dns_failover(&self, target: Option<String>) -> Result<FailoverResult, ApiError>;
    /// The failover log, newest last (DESIGN §4: at most 100 entries).
    fn dns_failover_log(&self) -> Vec<FailoverLogEntry>;
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NodeStatus {
    pub node_id: String,
    /// `/commit` mod revision of the last fully applied snapshot.
    pub applied_revision: Option<i64>,
    /// `/commit` mod revision the node has seen most recently.
    pub commit_revision: Option<i64>,
    #[serde(default)]
    pub services: Vec<ServiceStatus>,
    pub clash_health: Option<Condition<ClashState>>,
    pub tproxy: Option<Condition<TproxyState>>,
    #[serde(default)]
    pub dns_upstreams: Vec<UpstreamStatus>,
    /// Validation errors of the last snapshot (values of secret keys redacted).
    #[serde(default)]
    pub errors: Vec<ConfigError>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub state: ServiceState,
    /// Unix seconds of the last state change.
    pub since: u64,
    pub restarts_last_hour: u32,
}

/// DESIGN §4 `/updated/<id>/services/<svc>/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceState {
    Starting,
    Running,
    Backoff,
    Fatal,
    Stopped,
    /// A state this build does not know (a newer node).
    #[serde(other)]
    Unknown,
}

/// A state with the time it was entered and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition<S> {
    pub state: S,
    pub since: u64,
    #[serde(default)]
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClashState {
    Healthy,
    Waiting,
    Unhealthy,
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TproxyState {
    Applied,
    Removed,
    #[serde(other)]
    Unknown,
}

/// Live state of one upstream group in the DNS frontend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamStatus {
    pub name: String,
    pub priority: u32,
    pub status: UpstreamHealth,
    pub latency_ms: Option<u64>,
    pub queries: u64,
    pub failures: u64,
    pub addresses: Vec<String>,
    /// Traffic currently goes to this group.
    pub active: bool,
}

/// DESIGN §8 upstream health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamHealth {
    Healthy,
    Degraded,
    Down,
    #[serde(other)]
    Unknown,
}

/// One validation error as published in `/updated/<id>/errors`: the status key's own
/// type (`etcd::status` owns the format).
pub use crate::etcd::status::ErrorEntry as ConfigError;

/// Counters the daemon owns, for `/v1/stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StatsSources {
    /// mihomo's traffic totals: bytes since meduza started, from its `GET /connections`
    /// `uploadTotal`/`downloadTotal`, carried over restarts of mihomo so they only go
    /// up. `None` while Clash is disabled or before mihomo first answered.
    pub mihomo: Option<Traffic>,
    /// Named counters of the `inet meduza` table.
    pub tproxy_counters: Vec<NftCounter>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Traffic {
    pub uplink: u64,
    pub downlink: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NftCounter {
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
}

/// One `/v1/stats` entry (the predecessor's `{name, value}` shape).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stat {
    pub name: String,
    pub value: u64,
}

/// `POST /v1/dns/upstreams/{name}/test`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamTest {
    pub name: String,
    /// At least one address answered.
    pub ok: bool,
    /// Fastest successful answer.
    pub latency_ms: Option<u64>,
    pub results: Vec<AddressTest>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressTest {
    pub address: String,
    pub ok: bool,
    pub latency_ms: Option<u64>,
    pub error: Option<String>,
}

/// `POST /v1/dns/failover`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverResult {
    pub from: Option<String>,
    pub to: String,
    pub reason: String,
}

/// DESIGN §4 `/updated/<id>/dns/failover_log` entry: the status key's own type
/// (`etcd::status` owns the format).
pub use crate::etcd::status::FailoverEntry as FailoverLogEntry;

/// Everything `/metrics` shows, as plain numbers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MetricsSnapshot {
    pub services: Vec<ServiceMetric>,
    pub reconcile: ReconcileMetrics,
    pub dns: DnsMetrics,
    /// TPROXY rules currently applied.
    pub tproxy_applied: bool,
    /// mihomo's traffic totals, as in [`StatsSources::mihomo`].
    pub mihomo_traffic: Option<Traffic>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceMetric {
    pub name: String,
    pub state: ServiceState,
    /// Restarts since meduza started (a counter: never goes down).
    pub restarts_total: u64,
    /// Restarts in the rolling hour of the restart budget (a gauge).
    pub restarts_last_hour: u32,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReconcileMetrics {
    pub passes_total: u64,
    pub failed_total: u64,
    pub last_duration_seconds: Option<f64>,
    pub applied_revision: Option<i64>,
    /// Pass durations in seconds.
    pub duration: Histogram,
}

/// A cumulative histogram: `buckets` are `(upper bound, count of observations <= bound)`
/// in increasing bound order, without `+Inf` (that is `count`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Histogram {
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    /// An empty histogram with these upper bounds.
    pub fn with_bounds(bounds: &[f64]) -> Self {
        Self {
            buckets: bounds.iter().map(|b| (*b, 0)).collect(),
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, v: f64) {
        for (bound, n) in &mut self.buckets {
            if v <= *bound {
                *n += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct DnsMetrics {
    pub queries_total: u64,
    pub cache_hits_total: u64,
    pub servfail_overload_total: u64,
    pub failovers_total: u64,
    pub upstreams: Vec<UpstreamMetric>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamMetric {
    pub name: String,
    pub health: UpstreamHealth,
    pub queries_total: u64,
    pub failures_total: u64,
    /// Upstream answer latency in seconds.
    pub latency: Histogram,
}

/// `value` as it may leave the node: `<redacted>` for a secret key, and for anything
/// that looks like a PEM private key.
pub fn redact_value(key: &str, value: String) -> String {
    if meduza_generators::parse::is_secret_key(key) || value.contains("PRIVATE KEY") {
        "<redacted>".to_string()
    } else {
        value
    }
}

/// [`redact_value`] on every error, so a validation error never carries a secret out
/// of the node.
pub fn redact_errors(errors: Vec<ConfigError>) -> Vec<ConfigError> {
    errors
        .into_iter()
        .map(|mut e| {
            e.value = redact_value(&e.key, std::mem::take(&mut e.value));
            e
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_values_are_redacted() {
        let errs = vec![
            ConfigError {
                key: "/nodes/a/wireguard/wg0/private_key".into(),
                value: "c2VjcmV0".into(),
                reason: "bad".into(),
            },
            ConfigError {
                key: "/global/clash/secret".into(),
                value: "s3cr3t".into(),
                reason: "bad".into(),
            },
            ConfigError {
                key: "/nodes/a/openvpn/x/config".into(),
                value: "-----BEGIN PRIVATE KEY-----".into(),
                reason: "bad".into(),
            },
            ConfigError {
                key: "/nodes/a/lan".into(),
                value: "10.0.0.1/24".into(),
                reason: "host bits set".into(),
            },
        ];
        let out = redact_errors(errs);
        assert_eq!(out[0].value, "<redacted>");
        assert_eq!(out[1].value, "<redacted>");
        assert_eq!(out[2].value, "<redacted>");
        assert_eq!(out[3].value, "10.0.0.1/24");
    }

    #[test]
    fn unknown_states_deserialize() {
        let s: ServiceState = serde_json::from_str("\"hibernating\"").unwrap();
        assert_eq!(s, ServiceState::Unknown);
        let h: UpstreamHealth = serde_json::from_str("\"degraded\"").unwrap();
        assert_eq!(h, UpstreamHealth::Degraded);
    }

    #[test]
    fn histogram_is_cumulative() {
        let mut h = Histogram::with_bounds(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        assert_eq!(h.buckets, vec![(0.1, 1), (1.0, 2)]);
        assert_eq!(h.count, 3);
    }
}
