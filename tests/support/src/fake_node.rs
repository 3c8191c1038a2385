//! A fake [`NodeView`] for API and fleet tests, and helpers to run a node API
//! in-process on a loopback port.

use futures::future::BoxFuture;
use meduza::api::*;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

pub struct FakeNode {
    pub status: Mutex<NodeStatus>,
    pub sources: Mutex<StatsSources>,
    pub log: Mutex<Vec<FailoverLogEntry>>,
}

pub fn sample_status(id: &str) -> NodeStatus {
    NodeStatus {
        node_id: id.to_string(),
        applied_revision: Some(1),
        commit_revision: Some(1),
        services: vec![
            ServiceStatus {
                name: "mihomo".into(),
                state: ServiceState::Running,
                since: 1_700_000_000,
                restarts_last_hour: 0,
            },
            ServiceStatus {
                name: "mosdns".into(),
                state: ServiceState::Backoff,
                since: 1_700_000_100,
                restarts_last_hour: 2,
            },
            ServiceStatus {
                name: "tinc".into(),
                state: ServiceState::Fatal,
                since: 1_700_000_200,
                restarts_last_hour: 5,
            },
        ],
        clash_health: Some(Condition {
            state: ClashState::Healthy,
            since: 1_700_000_000,
            reason: "all URLTest groups selected".into(),
        }),
        tproxy: Some(Condition {
            state: TproxyState::Applied,
            since: 1_700_000_000,
            reason: String::new(),
        }),
        dns_upstreams: vec![
            UpstreamStatus {
                name: "primary".into(),
                priority: 1,
                status: UpstreamHealth::Down,
                latency_ms: None,
                queries: 10,
                failures: 10,
                addresses: vec!["192.0.2.1:53".into()],
                active: false,
            },
            UpstreamStatus {
                name: "secondary".into(),
                priority: 2,
                status: UpstreamHealth::Healthy,
                latency_ms: Some(12),
                queries: 90,
                failures: 0,
                addresses: vec!["192.0.2.2:53".into()],
                active: true,
            },
            UpstreamStatus {
                name: "tertiary".into(),
                priority: 3,
                status: UpstreamHealth::Degraded,
                latency_ms: Some(250),
                queries: 3,
                failures: 1,
                addresses: vec!["192.0.2.3:53".into(), "192.0.2.4:53".into()],
                active: false,
            },
        ],
        errors: vec![],
    }
}

impl FakeNode {
    pub fn new(id: &str) -> Arc<Self> {
        Arc::new(Self {
            status: Mutex::new(sample_status(id)),
            sources: Mutex::new(StatsSources {
                mihomo: Some(Traffic {
                    uplink: 1000,
                    downlink: 5000,
                }),
                tproxy_counters: vec![NftCounter {
                    name: "tproxy_tcp".into(),
                    packets: 10,
                    bytes: 4096,
                }],
            }),
            log: Mutex::new(vec![FailoverLogEntry {
                ts: 1_700_000_300,
                upstream: "primary".into(),
                action: "failover_triggered".into(),
                reason: "3 consecutive failures".into(),
            }]),
        })
    }
}

impl NodeView for FakeNode {
    fn status(&self) -> NodeStatus {
        self.status.lock().unwrap().clone()
    }

    fn stats_sources(&self) -> StatsSources {
        self.sources.lock().unwrap().clone()
    }

    fn metrics(&self) -> MetricsSnapshot {
        let s = self.status();
        let mut dur = Histogram::with_bounds(&[0.01, 0.1, 1.0, 10.0]);
        dur.observe(0.02);
        dur.observe(0.3);
        MetricsSnapshot {
            services: s
                .services
                .iter()
                .map(|v| ServiceMetric {
                    name: v.name.clone(),
                    state: v.state,
                    restarts_total: u64::from(v.restarts_last_hour) + 1,
                    restarts_last_hour: v.restarts_last_hour,
                })
                .collect(),
            reconcile: ReconcileMetrics {
                passes_total: 2,
                failed_total: 0,
                last_duration_seconds: Some(0.3),
                applied_revision: s.applied_revision,
                duration: dur,
            },
            dns: DnsMetrics {
                queries_total: 103,
                cache_hits_total: 40,
                servfail_overload_total: 0,
                failovers_total: 1,
                upstreams: s
                    .dns_upstreams
                    .iter()
                    .map(|u| {
                        let mut h = Histogram::with_bounds(&[0.005, 0.05, 0.5]);
                        if let Some(l) = u.latency_ms {
                            h.observe(l as f64 / 1000.0);
                        }
                        UpstreamMetric {
                            name: u.name.clone(),
                            health: u.status,
                            queries_total: u.queries,
                            failures_total: u.failures,
                            latency: h,
                        }
                    })
                    .collect(),
            },
            tproxy_applied: true,
            mihomo_traffic: None,
        }
    }

    fn dns_test(&self, name: &str) -> BoxFuture<'static, Result<UpstreamTest, ApiError>> {
        let up = self
            .status()
            .dns_upstreams
            .into_iter()
            .find(|u| u.name == name);
        let name = name.to_string();
        Box::pin(async move {
            let u = up.ok_or(ApiError::NotFound {
                what: format!("upstream {name}"),
            })?;
            let ok = u.status != UpstreamHealth::Down;
            Ok(UpstreamTest {
                name,
                ok,
                latency_ms: u.latency_ms,
                results: u
                    .addresses
                    .iter()
                    .map(|a| AddressTest {
                        address: a.clone(),
                        ok,
                        latency_ms: u.latency_ms,
                        error: (!ok).then(|| "timed out".to_string()),
                    })
                    .collect(),
            })
        })
    }

    fn dns_failover(&self, target: Option<String>) -> Result<FailoverResult, ApiError> {
        let mut st = self.status.lock().unwrap();
        let from = st
            .dns_upstreams
            .iter()
            .find(|u| u.active)
            .map(|u| u.name.clone());
        let to =
            match target {
                Some(t) => {
                    let u = st.dns_upstreams.iter().find(|u| u.name == t).ok_or(
                        ApiError::NotFound {
                            what: format!("upstream {t}"),
                        },
                    )?;
                    if u.status == UpstreamHealth::Down {
                        return Err(ApiError::Conflict {
                            name: t,
                            reason: "upstream is down".into(),
                        });
                    }
                    u.name.clone()
                }
                None => st
                    .dns_upstreams
                    .iter()
                    .filter(|u| !u.active && u.status == UpstreamHealth::Healthy)
                    .map(|u| u.name.clone())
                    .next()
                    .ok_or(ApiError::Conflict {
                        name: "failover".into(),
                        reason: "no other healthy upstream".into(),
                    })?,
            };
        for u in &mut st.dns_upstreams {
            u.active = u.name == to;
        }
        self.log.lock().unwrap().push(FailoverLogEntry {
            ts: 1_700_000_400,
            upstream: to.clone(),
            action: "manual_failover".into(),
            reason: "requested through the API".into(),
        });
        Ok(FailoverResult {
            from,
            to,
            reason: "manual".into(),
        })
    }

    fn dns_failover_log(&self) -> Vec<FailoverLogEntry> {
        self.log.lock().unwrap().clone()
    }
}

/// Interface counters for tests.
pub fn fake_ifaces(rx: u64, tx: u64) -> Arc<FakeIfaces> {
    Arc::new(FakeIfaces::new(vec![
        IfaceCounter {
            name: "lo".into(),
            rx_bytes: 1,
            tx_bytes: 1,
        },
        IfaceCounter {
            name: "eth0".into(),
            rx_bytes: rx,
            tx_bytes: tx,
        },
    ]))
}

/// A node API served by the test. `stop` shuts it down and waits until every
/// connection is closed (keep-alive ones included), as when the process dies.
pub struct RunningApi {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RunningApi {
    pub async fn start(listener: tokio::net::TcpListener, state: ApiState) -> RunningApi {
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = serve_listener(listener, state, async {
                let _ = rx.await;
            })
            .await;
        });
        RunningApi {
            addr,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(std::time::Duration::from_secs(10), t)
                .await
                .expect("node API did not shut down")
                .unwrap();
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for RunningApi {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

pub fn token_channel(
    t: Option<&str>,
) -> (
    watch::Sender<Option<String>>,
    watch::Receiver<Option<String>>,
) {
    watch::channel(t.map(str::to_string))
}
