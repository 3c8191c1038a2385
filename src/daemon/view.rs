//! The node API's view of the live daemon (`api::NodeView`) and its configuration
//! store over the etcd `Kv` (`api::ConfigStore`).

use super::Shared;
use crate::api::types::{
    self as t, AddressTest, ClashState, Condition, ConfigError, FailoverResult, MetricsSnapshot,
    NodeStatus, StatsSources, TproxyState, UpstreamHealth, UpstreamTest,
};
use crate::api::{ApiError, NodeView};
use crate::dns::Health;
use futures::future::BoxFuture;
use std::sync::Arc;

pub struct DaemonView {
    pub shared: Arc<Shared>,
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

/// Parse `"<state> <ts> <reason...>"` status values.
fn condition<S>(value: &str, parse: impl Fn(&str) -> S) -> Condition<S> {
    let mut parts = value.splitn(3, ' ');
    let state = parse(parts.next().unwrap_or_default());
    let since = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    Condition {
        state,
        since,
        reason: parts.next().unwrap_or_default().to_string(),
    }
}

impl NodeView for DaemonView {
    fn status(&self) -> NodeStatus {
        let s = &self.shared;
        let metrics = s.metrics.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let errors: Vec<ConfigError> =
            serde_json::from_str(&s.errors.lock().unwrap_or_else(|p| p.into_inner()))
                .unwrap_or_default();
        let clash = s
            .clash_status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|h| h.render(crate::reconcile::unix_now()));
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
            mihomo: None,
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
                    restarts_total: u64::from(st.restarts_last_hour),
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
            tproxy_applied: s.dataplane.desired().is_some(),
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
        self.shared
            .dns
            .failover_log()
            .into_iter()
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
}

/// `api::ConfigStore` over the daemon's etcd client.
pub use crate::api::KvStore;
