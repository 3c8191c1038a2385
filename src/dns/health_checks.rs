//! The health tasks of the upstream groups: one periodic check task per enabled group,
//! and the manual test of a group (the node API's "test" button).
//!
//! Owns: what a check is (an `A` query for `health_check_name` to every address of the
//! group, NOERROR or NXDOMAIN within the group's timeout), its interval, and the
//! lifetime of the check tasks (restarted on every plan update, stopped with the
//! frontend).
//! Must not: decide health or fail over (the results feed the `failover` state machine
//! through the frontend), or touch the request path.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meduza_generators::plan::dns::UpstreamGroup;
use serde::Serialize;

use super::failover::{AddrCheck, Event};
use super::frontend::Frontend;
use super::{wire, DnsError};

/// Result of a manual upstream test.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TestResult {
    pub ok: bool,
    /// Mean latency of the addresses that answered (or time spent when none did).
    pub latency: Duration,
    pub error: Option<String>,
}

impl Frontend {
    async fn check_group(&self, group: &UpstreamGroup) -> Vec<AddrCheck> {
        let timeout = Duration::from_secs(group.health_check.timeout_secs.max(1));
        let checks = group.addresses.iter().map(|addr| {
            let query = wire::build_query(rand::random(), &self.health_name, wire::TYPE_A);
            async move {
                let start = Instant::now();
                let result = match self.exchange.exchange(*addr, &query, timeout).await {
                    Ok(resp) => match wire::rcode(&resp) {
                        Some(wire::RCODE_NOERROR) | Some(wire::RCODE_NXDOMAIN) => {
                            Ok(start.elapsed())
                        }
                        Some(rc) => Err(format!("answered rcode {rc}")),
                        None => Err("malformed answer".to_string()),
                    },
                    Err(e) => Err(e.to_string()),
                };
                AddrCheck {
                    addr: *addr,
                    result,
                }
            }
        });
        futures::future::join_all(checks).await
    }

    /// (Re)starts one periodic check task per enabled group with checks enabled.
    pub fn start_health_checks(self: &Arc<Self>) {
        let groups = self
            .chain
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .groups
            .clone();
        let mut tasks = self.health_tasks.lock().unwrap_or_else(|e| e.into_inner());
        for t in tasks.drain(..) {
            t.abort();
        }
        for g in groups
            .into_iter()
            .filter(|g| g.enable && g.health_check.enable)
        {
            let weak = Arc::downgrade(self);
            let interval = Duration::from_secs(g.health_check.interval_secs.max(1));
            tasks.push(tokio::spawn(async move {
                loop {
                    let Some(fe) = weak.upgrade() else { return };
                    let results = fe.check_group(&g).await;
                    if let Err(e) = fe.feed(Event::Check {
                        group: g.name.clone(),
                        results,
                    }) {
                        tracing::warn!(upstream = %g.name, error = %e, "health check result dropped");
                    }
                    drop(fe);
                    tokio::time::sleep(interval).await;
                }
            }));
        }
    }

    pub fn stop_health_checks(&self) {
        for t in self
            .health_tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }

    /// Checks every address of `name` now (the node API's "test" button). The result
    /// also feeds the state machine like a scheduled check.
    pub async fn test_upstream(&self, name: &str) -> Result<TestResult, DnsError> {
        let group = self
            .chain
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .groups
            .iter()
            .find(|g| g.name == name)
            .cloned()
            .ok_or_else(|| DnsError::UnknownUpstream {
                upstream: name.to_string(),
            })?;
        let start = Instant::now();
        let results = self.check_group(&group).await;
        let oks: Vec<Duration> = results
            .iter()
            .filter_map(|r| r.result.as_ref().ok().copied())
            .collect();
        let errors: Vec<String> = results
            .iter()
            .filter_map(|r| r.result.as_ref().err().map(|e| format!("{}: {e}", r.addr)))
            .collect();
        let _ = self.feed(Event::Check {
            group: group.name.clone(),
            results,
        });
        Ok(TestResult {
            ok: !oks.is_empty(),
            latency: if oks.is_empty() {
                start.elapsed()
            } else {
                oks.iter().sum::<Duration>() / oks.len() as u32
            },
            error: (!errors.is_empty()).then(|| errors.join("; ")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::failover::{FailoverAction, Health};
    use crate::dns::test_support::{addr, cfg, plan, Behaviour, FakeExchange};
    use hickory_proto::op::ResponseCode;
    use std::net::Ipv4Addr;

    #[tokio::test]
    async fn manual_test_and_failover() {
        let fx = FakeExchange::new(&[
            (
                addr("192.0.2.1:53"),
                Behaviour::Answer(Ipv4Addr::new(1, 1, 1, 1)),
            ),
            (
                addr("192.0.2.2:53"),
                Behaviour::Rcode(ResponseCode::Refused),
            ),
        ]);
        let fe = Frontend::new(cfg(), &plan(), fx).unwrap();
        let mut rx = fe.subscribe();
        let t = fe.test_upstream("primary").await.unwrap();
        assert!(t.ok && t.error.is_none());
        let t = fe.test_upstream("secondary").await.unwrap();
        assert!(!t.ok);
        assert!(t.error.unwrap().contains("rcode 5"));
        assert!(matches!(
            fe.test_upstream("nope").await,
            Err(DnsError::UnknownUpstream { .. })
        ));
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().upstreams[0].status, Health::Healthy);
        assert_eq!(
            fe.manual_failover(Some("secondary".into())).unwrap(),
            "secondary"
        );
        assert_eq!(fe.chain_order(), vec!["secondary", "primary"]);
        assert_eq!(
            rx.borrow_and_update().failover_log.last().unwrap().action,
            FailoverAction::ManualFailover
        );
    }
}
