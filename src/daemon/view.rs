//! The node API's view of the live daemon (`api::NodeView`) and its configuration
//! store over the etcd `Kv` (`api::ConfigStore`).
//!
//! Owns: [`MihomoTraffic`], the monotonic form of mihomo's traffic totals that
//! `/v1/stats` and `/metrics` publish. Must not: block on mihomo (the Clash glue polls
//! it and stores the totals in `Shared`; the view only reads them).

use super::Shared;
use crate::api::types::{
    self as t, AddressTest, ClashState, Condition, ConfigError, FailoverResult, MetricsSnapshot,
    NodeStatus, StatsSources, TproxyState, Traffic, UpstreamHealth, UpstreamTest,
};
use crate::api::{ApiError, NodeView};
use crate::clash::api::Totals;
use crate::dns::Health;
use crate::etcd::status::{unix_now, StateLine};
use futures::future::BoxFuture;
use std::sync::Arc;

pub struct DaemonView {
    pub shared: Arc<Shared>,
}

/// mihomo's traffic totals, made monotonic over meduza's lifetime.
///
/// mihomo's `GET /connections` `uploadTotal`/`downloadTotal` are bytes since *that
/// mihomo process* started: they fall back to 0 when it restarts (a crash and exit
/// restart, a health or manual restart, Clash disabled and enabled again). Consumers of
/// `/v1/stats` and `/metrics` compute deltas, so the published value is
/// `base + last`, where `base` sums the last totals of every earlier process. A new
/// process is recognised by a total that went down, or told by [`Self::retire`].
/// A restart whose new process passes the old totals before the next poll is not
/// seen: the value then stays monotonic but undercounts the old process's tail.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MihomoTraffic {
    /// Sum of the last totals of every earlier mihomo process.
    base: Traffic,
    /// The last totals read from the current process; `None` before it answered.
    last: Option<Totals>,
}

impl MihomoTraffic {
    /// Take a reading of `/connections`; returns the published value.
    pub fn observe(&mut self, now: Totals) -> Traffic {
        if let Some(last) = self.last {
            if now.upload < last.upload || now.download < last.download {
                // A new mihomo counts from 0: what the old one counted is kept.
                self.fold(last);
            }
        }
        self.last = Some(now);
        self.add(now)
    }

    /// The process behind the last reading is gone (Clash disabled: mihomo is
    /// stopped): its totals move into the base, and nothing is published until a new
    /// mihomo answers. Idempotent.
    pub fn retire(&mut self) {
        if let Some(last) = self.last.take() {
            self.fold(last);
        }
    }

    /// What `/v1/stats` and `/metrics` show: `None` until mihomo answered, and again
    /// after [`Self::retire`].
    pub fn value(&self) -> Option<Traffic> {
        self.last.map(|last| self.add(last))
    }

    fn fold(&mut self, last: Totals) {
        self.base = self.add(last);
    }

    fn add(&self, t: Totals) -> Traffic {
        Traffic {
            uplink: self.base.uplink.saturating_add(t.upload),
            downlink: self.base.downlink.saturating_add(t.download),
        }
    }
}

fn health(h: Health) -> UpstreamHealth {
    match h {
        Health::Healthy => UpstreamHealth::Healthy,
        Health::Degraded => UpstreamHealth::Degraded,
        Health::Down => UpstreamHealth::Down,
        Health::Unknown => UpstreamHealth::Unknown,
    }
}

fn service_state(s: crate::supervise::ServiceState) -> t::ServiceState {
    use crate::supervise::ServiceState as S;
    match s {
        S::Starting => t::ServiceState::Starting,
        S::Running => t::ServiceState::Running,
        S::Backoff => t::ServiceState::Backoff,
        S::Fatal => t::ServiceState::Fatal,
        S::Stopped => t::ServiceState::Stopped,
    }
}

/// A published state line as the API's condition.
fn condition<S>(line: &StateLine, parse: impl Fn(&str) -> S) -> Condition<S> {
    Condition {
        state: parse(&line.state),
        since: line.ts,
        reason: line.detail.clone(),
    }
}

/// The DNS frontend's failover log as published (`dns/failover_log`) and served.
pub fn failover_entries(log: Vec<crate::dns::FailoverLogEntry>) -> Vec<t::FailoverLogEntry> {
    log.into_iter()
        .map(|e| t::FailoverLogEntry {
            ts: e.ts,
            upstream: e.upstream,
            action: serde_json::to_value(e.action)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            reason: e.reason,
        })
        .collect()
}

impl NodeView for DaemonView {
    fn status(&self) -> NodeStatus {
        let s = &self.shared;
        let metrics = s.metrics.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let errors: Vec<ConfigError> = s.errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let clash = s
            .clash_status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|h| super::clash::health_line(h, unix_now()));
        let tproxy = s
            .tproxy_status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        NodeStatus {
            node_id: s.node_id.clone(),
            applied_revision: metrics.applied_revision,
            commit_revision: *s.commit_revision.lock().unwrap_or_else(|p| p.into_inner()),
            services: s
                .supervisor
                .status()
                .into_iter()
                .map(|st| t::ServiceStatus {
                    name: st.name,
                    state: service_state(st.state),
                    since: st.since,
                    restarts_last_hour: st.restarts_last_hour,
                })
                .collect(),
            clash_health: clash.map(|v| {
                condition(&v, |p| match p {
                    "healthy" => ClashState::Healthy,
                    "waiting" => ClashState::Waiting,
                    "unhealthy" => ClashState::Unhealthy,
                    _ => ClashState::Unknown,
                })
            }),
            tproxy: tproxy.map(|v| {
                condition(&v, |p| match p {
                    "applied" => TproxyState::Applied,
                    "removed" => TproxyState::Removed,
                    _ => TproxyState::Unknown,
                })
            }),
            dns_upstreams: s
                .dns
                .upstream_status()
                .into_iter()
                .map(|u| t::UpstreamStatus {
                    name: u.name,
                    priority: u.priority,
                    status: health(u.status),
                    latency_ms: u.latency_ms,
                    queries: u.queries,
                    failures: u.failures,
                    addresses: u.addresses.iter().map(|a| a.addr.to_string()).collect(),
                    active: u.active,
                })
                .collect(),
            errors: t::redact_errors(errors),
        }
    }

    fn stats_sources(&self) -> StatsSources {
        StatsSources {
            mihomo: self.mihomo_traffic(),
            tproxy_counters: Vec::new(),
        }
    }

    fn metrics(&self) -> MetricsSnapshot {
        let s = &self.shared;
        let counters = s.dns.counters();
        let log = s.dns.failover_log();
        MetricsSnapshot {
            services: s
                .supervisor
                .status()
                .into_iter()
                .map(|st| t::ServiceMetric {
                    name: st.name,
                    state: service_state(st.state),
                    restarts_total: st.restarts_total,
                    restarts_last_hour: st.restarts_last_hour,
                })
                .collect(),
            reconcile: s.metrics.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            dns: t::DnsMetrics {
                queries_total: counters.queries,
                cache_hits_total: counters.cache_hits,
                servfail_overload_total: counters.servfail_overload,
                failovers_total: log
                    .iter()
                    .filter(|e| matches!(e.action, crate::dns::FailoverAction::FailoverTriggered))
                    .count() as u64,
                upstreams: s
                    .dns
                    .upstream_status()
                    .into_iter()
                    .map(|u| {
                        let mut latency = t::Histogram::with_bounds(&[
                            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                        ]);
                        if let Some(ms) = u.avg_query_latency_ms {
                            latency.observe(ms / 1000.0);
                        }
                        t::UpstreamMetric {
                            name: u.name,
                            health: health(u.status),
                            queries_total: u.queries,
                            failures_total: u.failures,
                            latency,
                        }
                    })
                    .collect(),
            },
            tproxy_applied: s.dataplane.intercepting(),
            mihomo_traffic: self.mihomo_traffic(),
        }
    }

    fn dns_test(&self, name: &str) -> BoxFuture<'static, Result<UpstreamTest, ApiError>> {
        let shared = Arc::clone(&self.shared);
        let name = name.to_string();
        Box::pin(async move {
            let addrs: Vec<String> = shared
                .dns
                .upstream_status()
                .into_iter()
                .find(|u| u.name == name)
                .map(|u| u.addresses.iter().map(|a| a.addr.to_string()).collect())
                .ok_or_else(|| ApiError::NotFound {
                    what: format!("upstream group {name}"),
                })?;
            let r = shared
                .dns
                .test_upstream(&name)
                .await
                .map_err(|e| ApiError::NotFound {
                    what: e.to_string(),
                })?;
            let latency_ms = Some(r.latency.as_millis() as u64);
            Ok(UpstreamTest {
                name,
                ok: r.ok,
                latency_ms: r.ok.then_some(latency_ms).flatten(),
                results: addrs
                    .into_iter()
                    .map(|address| AddressTest {
                        address,
                        ok: r.ok,
                        latency_ms: r.ok.then_some(latency_ms).flatten(),
                        error: r.error.clone(),
                    })
                    .collect(),
            })
        })
    }

    fn dns_failover(&self, target: Option<String>) -> Result<FailoverResult, ApiError> {
        let from = self
            .shared
            .dns
            .upstream_status()
            .into_iter()
            .find(|u| u.active)
            .map(|u| u.name);
        let to = self
            .shared
            .dns
            .manual_failover(target)
            .map_err(|e| ApiError::Invalid {
                field: "target".into(),
                reason: e.to_string(),
            })?;
        Ok(FailoverResult {
            from,
            to,
            reason: "manual failover through the node API".into(),
        })
    }

    fn dns_failover_log(&self) -> Vec<t::FailoverLogEntry> {
        failover_entries(self.shared.dns.failover_log())
    }
}

impl DaemonView {
    /// The latest reading the traffic poller stored (never waits on mihomo).
    fn mihomo_traffic(&self) -> Option<Traffic> {
        self.shared
            .mihomo_traffic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .value()
    }
}

/// `api::ConfigStore` over the daemon's etcd client.
pub use crate::api::KvStore;

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(upload: u64, download: u64) -> Totals {
        Totals { upload, download }
    }

    fn traffic(uplink: u64, downlink: u64) -> Traffic {
        Traffic { uplink, downlink }
    }

    #[test]
    fn mihomo_traffic_is_monotonic_across_restarts() {
        let mut m = MihomoTraffic::default();
        assert_eq!(m.value(), None, "nothing before mihomo answered");
        let published: Vec<Traffic> = [
            totals(100, 1000),
            totals(150, 1800),
            totals(150, 1800), // idle
            totals(10, 20),    // mihomo restarted: 150/1800 kept in the base
            totals(40, 90),
            totals(0, 0), // restarted again, nothing counted yet
            totals(5, 7),
        ]
        .into_iter()
        .map(|t| m.observe(t))
        .collect();
        assert_eq!(
            published,
            [
                traffic(100, 1000),
                traffic(150, 1800),
                traffic(150, 1800),
                traffic(160, 1820),
                traffic(190, 1890),
                traffic(190, 1890),
                traffic(195, 1897),
            ]
        );
        assert!(published
            .windows(2)
            .all(|w| w[1].uplink >= w[0].uplink && w[1].downlink >= w[0].downlink));
        assert_eq!(m.value(), Some(traffic(195, 1897)));
    }

    #[test]
    fn one_direction_going_down_is_a_restart() {
        let mut m = MihomoTraffic::default();
        m.observe(totals(100, 1000));
        // The new process has uploaded more than the old one in its first seconds,
        // but its download total gives the restart away.
        assert_eq!(m.observe(totals(120, 5)), traffic(220, 1005));
    }

    #[test]
    fn retire_hides_the_value_and_keeps_the_base() {
        let mut m = MihomoTraffic::default();
        m.retire();
        assert_eq!(m.value(), None, "retire before any reading");
        m.observe(totals(300, 400));
        m.retire();
        m.retire(); // idempotent: every pass with Clash disabled retires
        assert_eq!(m.value(), None, "Clash disabled: no entries");
        // Enabled again: the new mihomo's first reading is above the old one's last,
        // which drop detection alone would have taken for the same process.
        assert_eq!(m.observe(totals(500, 600)), traffic(800, 1000));
        assert_eq!(m.value(), Some(traffic(800, 1000)));
    }

    #[test]
    fn saturates_instead_of_wrapping() {
        let mut m = MihomoTraffic::default();
        m.observe(totals(u64::MAX - 1, 1));
        assert_eq!(m.observe(totals(5, 0)), traffic(u64::MAX, 1));
    }
}
