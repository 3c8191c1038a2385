//! Upstream-group health and failover as a pure state machine.
//!
//! Owns: per-group status (healthy / degraded / down / unknown), consecutive-failure
//! counting from health checks and live queries, choosing the active group
//! (failover after `threshold` failures, failback when a higher-priority group
//! recovers, manual override), query counters and the bounded failover log.
//! Must not: do I/O, sleep or read the clock: every input is an [`Event`] plus `now`
//! (unix seconds), so the whole behaviour is table-tested without waiting.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use meduza_generators::plan::dns::UpstreamGroup;

/// At most this many failover-log entries are kept (DESIGN §4).
pub const LOG_CAPACITY: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Healthy,
    Degraded,
    Down,
    Unknown,
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
            Health::Down => "down",
            Health::Unknown => "unknown",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailoverAction {
    /// A health check (or a live query) of a group failed.
    HealthCheckFailed,
    /// Traffic moved from this group to a lower-priority one.
    FailoverTriggered,
    /// A group that was down answers again.
    Recovered,
    /// Traffic moved back to this higher-priority group.
    Failback,
    /// An operator moved traffic to this group.
    ManualFailover,
}

/// One failover-log entry, published as JSON in `/updated/<id>/dns/failover_log`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverLogEntry {
    pub ts: u64,
    pub upstream: String,
    pub action: FailoverAction,
    pub reason: String,
}

/// Result of checking one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrCheck {
    pub addr: SocketAddr,
    pub result: Result<Duration, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A health check of every address of `group`.
    Check {
        group: String,
        results: Vec<AddrCheck>,
    },
    /// A forwarded query was answered by `group`.
    QueryOk { group: String, latency: Duration },
    /// Every address of `group` tried for a forwarded query failed.
    QueryFailed { group: String, reason: String },
    /// Operator: move traffic to `target`, or to the next healthy group.
    Manual { target: Option<String> },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FailoverError {
    #[error("unknown upstream group {upstream:?}")]
    UnknownUpstream { upstream: String },
    #[error("upstream group {upstream:?} is disabled")]
    Disabled { upstream: String },
    #[error("upstream group {upstream:?} is down")]
    IsDown { upstream: String },
    #[error("no other healthy upstream group to fail over to from {from:?}")]
    NoHealthyUpstream { from: String },
}

/// Per-address view for status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AddressStatus {
    pub addr: SocketAddr,
    /// `None` until checked.
    pub ok: Option<bool>,
    pub latency_ms: Option<u64>,
    pub error: Option<String>,
}

/// What `DnsHandle::upstream_status` returns for each group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpstreamStatus {
    pub name: String,
    pub priority: u32,
    pub enabled: bool,
    /// Traffic currently goes to this group.
    pub active: bool,
    pub status: Health,
    /// Unix time of the last observation (check or status change).
    pub updated: Option<u64>,
    /// Latency of the last health check (mean of the addresses that answered).
    pub latency_ms: Option<u64>,
    pub consecutive_failures: u32,
    pub threshold: u32,
    /// Forwarded queries answered by / failed on this group.
    pub queries: u64,
    pub failures: u64,
    /// Moving average of forwarded-query latency.
    pub avg_query_latency_ms: Option<f64>,
    pub addresses: Vec<AddressStatus>,
}

#[derive(Debug, Clone)]
struct GroupState {
    name: String,
    priority: u32,
    enabled: bool,
    threshold: u32,
    failover_enabled: bool,
    slow: Duration,
    status: Health,
    updated: Option<u64>,
    latency_ms: Option<u64>,
    consecutive_failures: u32,
    queries: u64,
    failures: u64,
    avg_latency_ms: Option<f64>,
    addresses: Vec<AddressStatus>,
}

impl GroupState {
    fn new(g: &UpstreamGroup) -> Self {
        let mut s = Self {
            name: g.name.clone(),
            priority: 0,
            enabled: false,
            threshold: 1,
            failover_enabled: false,
            slow: Duration::ZERO,
            status: Health::Unknown,
            updated: None,
            latency_ms: None,
            consecutive_failures: 0,
            queries: 0,
            failures: 0,
            avg_latency_ms: None,
            addresses: Vec::new(),
        };
        s.configure(g);
        s
    }

    fn configure(&mut self, g: &UpstreamGroup) {
        self.priority = g.priority;
        self.enabled = g.enable;
        self.threshold = g.failover.threshold.max(1);
        self.failover_enabled = g.failover.enable;
        // "Slow" (degraded) = half the check timeout, at most one second.
        self.slow = (Duration::from_secs(g.health_check.timeout_secs.max(1)) / 2)
            .min(Duration::from_secs(1));
        let old = std::mem::take(&mut self.addresses);
        self.addresses = g
            .addresses
            .iter()
            .map(|a| {
                old.iter()
                    .find(|o| o.addr == *a)
                    .cloned()
                    .unwrap_or(AddressStatus {
                        addr: *a,
                        ok: None,
                        latency_ms: None,
                        error: None,
                    })
            })
            .collect();
    }

    /// Down for traffic selection: failed `threshold` times in a row.
    fn is_down(&self) -> bool {
        self.failover_enabled && self.consecutive_failures >= self.threshold
    }

    fn selectable(&self) -> bool {
        self.enabled && !self.is_down()
    }
}

/// The state machine. Groups are kept sorted by (priority, name).
#[derive(Debug, Clone, Default)]
pub struct Failover {
    groups: Vec<GroupState>,
    active: Option<usize>,
    manual: Option<String>,
    log: VecDeque<FailoverLogEntry>,
}

impl Failover {
    pub fn new(groups: &[UpstreamGroup]) -> Self {
        let mut f = Self::default();
        f.set_groups(groups, 0);
        f
    }

    /// Applies a new plan, keeping counters and status of groups that keep their name.
    pub fn set_groups(&mut self, groups: &[UpstreamGroup], now: u64) -> Vec<FailoverLogEntry> {
        let mut sorted: Vec<&UpstreamGroup> = groups.iter().collect();
        sorted.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
        let old = std::mem::take(&mut self.groups);
        let active_name = self.active.and_then(|i| old.get(i)).map(|g| g.name.clone());
        self.groups = sorted
            .into_iter()
            .map(|g| match old.iter().find(|o| o.name == g.name) {
                Some(o) => {
                    let mut s = o.clone();
                    s.configure(g);
                    s
                }
                None => GroupState::new(g),
            })
            .collect();
        self.active = active_name.and_then(|n| self.index(&n));
        if let Some(m) = &self.manual {
            if self.index(m).is_none_or(|i| !self.groups[i].enabled) {
                self.manual = None;
            }
        }
        let mut out = Vec::new();
        self.reselect(now, &mut out);
        out
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.groups.iter().position(|g| g.name == name)
    }

    fn push_log(&mut self, e: FailoverLogEntry, out: &mut Vec<FailoverLogEntry>) {
        if self.log.len() == LOG_CAPACITY {
            self.log.pop_front();
        }
        self.log.push_back(e.clone());
        out.push(e);
    }

    fn entry(now: u64, upstream: &str, action: FailoverAction, reason: String) -> FailoverLogEntry {
        FailoverLogEntry {
            ts: now,
            upstream: upstream.to_string(),
            action,
            reason,
        }
    }

    /// Feeds one event; returns the log entries it produced.
    pub fn apply(
        &mut self,
        event: Event,
        now: u64,
    ) -> Result<Vec<FailoverLogEntry>, FailoverError> {
        let mut out = Vec::new();
        match event {
            Event::Check { group, results } => {
                let Some(i) = self.index(&group) else {
                    return Err(FailoverError::UnknownUpstream { upstream: group });
                };
                let slow = self.groups[i].slow;
                let g = &mut self.groups[i];
                for r in &results {
                    if let Some(a) = g.addresses.iter_mut().find(|a| a.addr == r.addr) {
                        match &r.result {
                            Ok(lat) => {
                                a.ok = Some(true);
                                a.latency_ms = Some(lat.as_millis() as u64);
                                a.error = None;
                            }
                            Err(e) => {
                                a.ok = Some(false);
                                a.latency_ms = None;
                                a.error = Some(e.clone());
                            }
                        }
                    }
                }
                let oks: Vec<Duration> = results
                    .iter()
                    .filter_map(|r| r.result.as_ref().ok().copied())
                    .collect();
                g.updated = Some(now);
                if oks.is_empty() {
                    g.latency_ms = None;
                    let reason = results
                        .iter()
                        .find_map(|r| r.result.as_ref().err().map(|e| format!("{}: {e}", r.addr)))
                        .unwrap_or_else(|| "no addresses".to_string());
                    self.failure(i, format!("health check failed: {reason}"), now, &mut out);
                } else {
                    let mean = oks.iter().sum::<Duration>() / oks.len() as u32;
                    g.latency_ms = Some(mean.as_millis() as u64);
                    let degraded = oks.len() < results.len() || oks.iter().any(|l| *l >= slow);
                    let status = if degraded {
                        Health::Degraded
                    } else {
                        Health::Healthy
                    };
                    self.success(i, status, now, &mut out);
                }
            }
            Event::QueryOk { group, latency } => {
                let Some(i) = self.index(&group) else {
                    return Err(FailoverError::UnknownUpstream { upstream: group });
                };
                let g = &mut self.groups[i];
                g.queries += 1;
                let ms = latency.as_secs_f64() * 1000.0;
                g.avg_latency_ms = Some(g.avg_latency_ms.map_or(ms, |a| a * 0.9 + ms * 0.1));
                // A live answer proves the group works; it does not re-grade a
                // degraded group (only a full check sees every address).
                let status = match g.status {
                    Health::Degraded => Health::Degraded,
                    _ => Health::Healthy,
                };
                if g.consecutive_failures > 0 || g.status != status {
                    self.success(i, status, now, &mut out);
                }
            }
            Event::QueryFailed { group, reason } => {
                let Some(i) = self.index(&group) else {
                    return Err(FailoverError::UnknownUpstream { upstream: group });
                };
                self.groups[i].failures += 1;
                self.failure(i, format!("query failed: {reason}"), now, &mut out);
            }
            Event::Manual { target } => {
                let from = self
                    .active
                    .map(|i| self.groups[i].name.clone())
                    .unwrap_or_default();
                let to = match target {
                    Some(name) => {
                        let i =
                            self.index(&name)
                                .ok_or_else(|| FailoverError::UnknownUpstream {
                                    upstream: name.clone(),
                                })?;
                        if !self.groups[i].enabled {
                            return Err(FailoverError::Disabled { upstream: name });
                        }
                        if self.groups[i].is_down() {
                            return Err(FailoverError::IsDown { upstream: name });
                        }
                        i
                    }
                    None => (0..self.groups.len())
                        .find(|&i| Some(i) != self.active && self.groups[i].selectable())
                        .ok_or(FailoverError::NoHealthyUpstream { from: from.clone() })?,
                };
                self.manual = Some(self.groups[to].name.clone());
                self.active = Some(to);
                let e = Self::entry(
                    now,
                    &self.groups[to].name,
                    FailoverAction::ManualFailover,
                    format!("manual failover from {from:?}"),
                );
                self.push_log(e, &mut out);
            }
        }
        self.reselect(now, &mut out);
        Ok(out)
    }

    fn failure(&mut self, i: usize, reason: String, now: u64, out: &mut Vec<FailoverLogEntry>) {
        let g = &mut self.groups[i];
        g.consecutive_failures = g.consecutive_failures.saturating_add(1);
        g.updated = Some(now);
        let n = g.consecutive_failures;
        let threshold = g.threshold;
        g.status = if n >= threshold {
            Health::Down
        } else {
            Health::Degraded
        };
        // Log the run of failures up to the threshold; a group that stays down does
        // not flood the 100-entry log.
        if n <= threshold {
            let name = g.name.clone();
            let e = Self::entry(
                now,
                &name,
                FailoverAction::HealthCheckFailed,
                format!("{reason} ({n}/{threshold})"),
            );
            self.push_log(e, out);
        }
    }

    fn success(&mut self, i: usize, status: Health, now: u64, out: &mut Vec<FailoverLogEntry>) {
        let g = &mut self.groups[i];
        let was_down = g.status == Health::Down || g.consecutive_failures >= g.threshold;
        g.consecutive_failures = 0;
        g.status = status;
        g.updated = Some(now);
        if was_down {
            let name = g.name.clone();
            let e = Self::entry(
                now,
                &name,
                FailoverAction::Recovered,
                format!("answering again ({status})"),
            );
            self.push_log(e, out);
        }
    }

    /// Recomputes the active group and logs a failover or failback.
    fn reselect(&mut self, now: u64, out: &mut Vec<FailoverLogEntry>) {
        if let Some(m) = &self.manual {
            match self.index(m) {
                Some(i) if self.groups[i].selectable() => {
                    self.active = Some(i);
                    return;
                }
                _ => self.manual = None,
            }
        }
        let new = (0..self.groups.len())
            .find(|&i| self.groups[i].selectable())
            // Everything down: keep trying the best enabled group rather than nothing.
            .or_else(|| (0..self.groups.len()).find(|&i| self.groups[i].enabled));
        let old = self.active;
        self.active = new;
        match (old, new) {
            (Some(o), Some(n)) if n > o => {
                let (on, nn) = (self.groups[o].name.clone(), self.groups[n].name.clone());
                let fails = self.groups[o].consecutive_failures;
                let reason = if self.groups[o].enabled && fails > 0 {
                    format!("{fails} consecutive failures; traffic moved to {nn:?}")
                } else {
                    format!("group disabled or removed; traffic moved to {nn:?}")
                };
                let e = Self::entry(now, &on, FailoverAction::FailoverTriggered, reason);
                self.push_log(e, out);
            }
            (Some(o), Some(n)) if n < o => {
                let (on, nn) = (self.groups[o].name.clone(), self.groups[n].name.clone());
                let e = Self::entry(
                    now,
                    &nn,
                    FailoverAction::Failback,
                    format!("traffic moved back from {on:?}"),
                );
                self.push_log(e, out);
            }
            _ => {}
        }
    }

    /// Name of the group traffic goes to.
    pub fn active(&self) -> Option<&str> {
        self.active.map(|i| self.groups[i].name.as_str())
    }

    /// Groups in the order a query tries them: the active group, then the other
    /// selectable groups by priority; when none is selectable, every enabled group.
    pub fn route(&self) -> Vec<(String, Vec<SocketAddr>)> {
        let any_selectable = self.groups.iter().any(GroupState::selectable);
        let mut order: Vec<usize> = self.active.into_iter().collect();
        order.extend((0..self.groups.len()).filter(|&i| {
            let g = &self.groups[i];
            Some(i) != self.active
                && if any_selectable {
                    g.selectable()
                } else {
                    g.enabled
                }
        }));
        order
            .into_iter()
            .map(|i| {
                let g = &self.groups[i];
                // Addresses that passed the last check first; unchecked next; failing last.
                let mut addrs: Vec<&AddressStatus> = g.addresses.iter().collect();
                addrs.sort_by_key(|a| match a.ok {
                    Some(true) => 0,
                    None => 1,
                    Some(false) => 2,
                });
                (g.name.clone(), addrs.into_iter().map(|a| a.addr).collect())
            })
            .collect()
    }

    pub fn status(&self) -> Vec<UpstreamStatus> {
        self.groups
            .iter()
            .enumerate()
            .map(|(i, g)| UpstreamStatus {
                name: g.name.clone(),
                priority: g.priority,
                enabled: g.enabled,
                active: Some(i) == self.active,
                status: g.status,
                updated: g.updated,
                latency_ms: g.latency_ms,
                consecutive_failures: g.consecutive_failures,
                threshold: g.threshold,
                queries: g.queries,
                failures: g.failures,
                avg_query_latency_ms: g.avg_latency_ms,
                addresses: g.addresses.clone(),
            })
            .collect()
    }

    pub fn log(&self) -> Vec<FailoverLogEntry> {
        self.log.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meduza_generators::plan::dns::{Failover as FailoverCfg, HealthCheck};
    use FailoverAction::*;

    fn group(name: &str, prio: u32, threshold: u32) -> UpstreamGroup {
        UpstreamGroup {
            name: name.into(),
            addresses: vec![format!("127.0.0.{prio}:53").parse().unwrap()],
            priority: prio,
            enable: true,
            health_check: HealthCheck::default(),
            failover: FailoverCfg {
                enable: true,
                threshold,
            },
        }
    }

    fn check(f: &Failover, name: &str, ok: bool, ms: u64) -> Event {
        let addr = f.groups[f.index(name).unwrap()].addresses[0].addr;
        Event::Check {
            group: name.into(),
            results: vec![AddrCheck {
                addr,
                result: if ok {
                    Ok(Duration::from_millis(ms))
                } else {
                    Err("timeout".into())
                },
            }],
        }
    }

    fn actions(v: &[FailoverLogEntry]) -> Vec<(String, FailoverAction)> {
        v.iter().map(|e| (e.upstream.clone(), e.action)).collect()
    }

    #[test]
    fn failover_after_threshold_then_failback() {
        let mut f = Failover::new(&[group("secondary", 2, 3), group("primary", 1, 3)]);
        assert_eq!(f.active(), Some("primary"));
        assert_eq!(f.status()[0].status, Health::Unknown);
        // Table: (event, expected active, expected status of primary, expected log actions)
        type Step = (
            &'static str,
            bool,
            &'static str,
            Health,
            Vec<(&'static str, FailoverAction)>,
        );
        let steps: Vec<Step> = vec![
            ("primary", true, "primary", Health::Healthy, vec![]),
            (
                "primary",
                false,
                "primary",
                Health::Degraded,
                vec![("primary", HealthCheckFailed)],
            ),
            (
                "primary",
                false,
                "primary",
                Health::Degraded,
                vec![("primary", HealthCheckFailed)],
            ),
            (
                "primary",
                false,
                "secondary",
                Health::Down,
                vec![
                    ("primary", HealthCheckFailed),
                    ("primary", FailoverTriggered),
                ],
            ),
            ("primary", false, "secondary", Health::Down, vec![]),
            ("secondary", true, "secondary", Health::Down, vec![]),
            (
                "primary",
                true,
                "primary",
                Health::Healthy,
                vec![("primary", Recovered), ("primary", Failback)],
            ),
        ];
        for (t, (name, ok, active, primary_status, log)) in steps.into_iter().enumerate() {
            let ev = check(&f, name, ok, 5);
            let out = f.apply(ev, 1000 + t as u64).unwrap();
            assert_eq!(f.active(), Some(active), "step {t}");
            assert_eq!(f.status()[0].status, primary_status, "step {t}");
            let want: Vec<(String, FailoverAction)> =
                log.into_iter().map(|(n, a)| (n.to_string(), a)).collect();
            assert_eq!(actions(&out), want, "step {t}");
        }
        assert_eq!(f.log().len(), 6);
        assert_eq!(f.log()[3].ts, 1003);
    }

    #[test]
    fn live_query_failures_count_and_success_resets() {
        let mut f = Failover::new(&[group("a", 1, 2), group("b", 2, 2)]);
        let fail = |g: &str| Event::QueryFailed {
            group: g.into(),
            reason: "timeout".into(),
        };
        f.apply(fail("a"), 1).unwrap();
        f.apply(
            Event::QueryOk {
                group: "a".into(),
                latency: Duration::from_millis(3),
            },
            2,
        )
        .unwrap();
        assert_eq!(f.status()[0].consecutive_failures, 0);
        f.apply(fail("a"), 3).unwrap();
        let out = f.apply(fail("a"), 4).unwrap();
        assert_eq!(actions(&out).last().unwrap().1, FailoverTriggered);
        assert_eq!(f.active(), Some("b"));
        assert_eq!(f.status()[0].failures, 3);
        assert_eq!(f.status()[0].queries, 1);
        // route: active first, down group excluded
        assert_eq!(
            f.route().iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
            vec!["b"]
        );
        // b fails too: everything down, traffic goes back to the best enabled group
        f.apply(fail("b"), 5).unwrap();
        f.apply(fail("b"), 6).unwrap();
        assert_eq!(f.active(), Some("a"));
        assert_eq!(f.route().len(), 2);
    }

    #[test]
    fn degraded_when_some_addresses_fail_or_slow() {
        let mut g = group("a", 1, 3);
        g.addresses.push("127.0.0.9:53".parse().unwrap());
        let mut f = Failover::new(&[g]);
        let a0: SocketAddr = "127.0.0.1:53".parse().unwrap();
        let a1: SocketAddr = "127.0.0.9:53".parse().unwrap();
        let ev = |r0: Result<Duration, String>, r1: Result<Duration, String>| Event::Check {
            group: "a".into(),
            results: vec![
                AddrCheck {
                    addr: a0,
                    result: r0,
                },
                AddrCheck {
                    addr: a1,
                    result: r1,
                },
            ],
        };
        let ms = Duration::from_millis;
        f.apply(ev(Ok(ms(5)), Err("refused".into())), 1).unwrap();
        assert_eq!(f.status()[0].status, Health::Degraded);
        assert_eq!(f.status()[0].consecutive_failures, 0);
        // the failing address sorts last in the route
        assert_eq!(f.route()[0].1, vec![a0, a1]);
        f.apply(ev(Ok(ms(5)), Ok(ms(1500))), 2).unwrap();
        assert_eq!(f.status()[0].status, Health::Degraded);
        f.apply(ev(Ok(ms(5)), Ok(ms(7))), 3).unwrap();
        assert_eq!(f.status()[0].status, Health::Healthy);
        assert_eq!(f.status()[0].latency_ms, Some(6));
        // What `dns/upstreams/<name>/status` shows: "healthy 3 6" (etcd::status).
        assert_eq!(f.status()[0].updated, Some(3));
    }

    #[test]
    fn manual_failover_pins_until_the_pinned_group_fails() {
        let mut f = Failover::new(&[group("a", 1, 1), group("b", 2, 1), group("c", 3, 1)]);
        let out = f.apply(Event::Manual { target: None }, 1).unwrap();
        assert_eq!(actions(&out), vec![("b".to_string(), ManualFailover)]);
        assert_eq!(f.active(), Some("b"));
        // healthy primary does not pull traffic back while pinned
        let ev = check(&f, "a", true, 1);
        f.apply(ev, 2).unwrap();
        assert_eq!(f.active(), Some("b"));
        f.apply(
            Event::Manual {
                target: Some("c".into()),
            },
            3,
        )
        .unwrap();
        assert_eq!(f.active(), Some("c"));
        // the pinned group fails: automatic selection (primary) again
        let ev = check(&f, "c", false, 0);
        let out = f.apply(ev, 4).unwrap();
        assert_eq!(f.active(), Some("a"));
        assert_eq!(actions(&out).last().unwrap(), &("a".to_string(), Failback));
        assert_eq!(
            f.apply(
                Event::Manual {
                    target: Some("c".into())
                },
                5
            ),
            Err(FailoverError::IsDown {
                upstream: "c".into()
            })
        );
        assert_eq!(
            f.apply(
                Event::Manual {
                    target: Some("zz".into())
                },
                5
            ),
            Err(FailoverError::UnknownUpstream {
                upstream: "zz".into()
            })
        );
    }

    #[test]
    fn failover_disabled_keeps_traffic() {
        let mut g = group("a", 1, 1);
        g.failover.enable = false;
        let mut f = Failover::new(&[g, group("b", 2, 1)]);
        let ev = check(&f, "a", false, 0);
        f.apply(ev, 1).unwrap();
        assert_eq!(f.status()[0].status, Health::Down);
        assert_eq!(f.active(), Some("a"));
    }

    #[test]
    fn log_is_bounded_newest_last() {
        let mut f = Failover::new(&[group("a", 1, 1), group("b", 2, 1)]);
        for t in 0..300u64 {
            let _ = f.apply(Event::Manual { target: None }, t);
        }
        let log = f.log();
        assert_eq!(log.len(), LOG_CAPACITY);
        assert_eq!(log.last().unwrap().ts, 299);
        assert_eq!(log[0].ts, 200);
        let json = serde_json::to_string(&log[0]).unwrap();
        assert!(json.contains("\"action\":\"manual_failover\""), "{json}");
    }

    #[test]
    fn plan_update_keeps_state_of_known_groups() {
        let mut f = Failover::new(&[group("a", 1, 1), group("b", 2, 1)]);
        let ev = check(&f, "a", false, 0);
        f.apply(ev, 1).unwrap();
        assert_eq!(f.active(), Some("b"));
        f.set_groups(&[group("a", 1, 1), group("b", 2, 1), group("c", 3, 1)], 2);
        assert_eq!(f.active(), Some("b"));
        assert_eq!(f.status()[0].status, Health::Down);
        assert_eq!(f.status()[2].status, Health::Unknown);
        let mut disabled = group("b", 2, 1);
        disabled.enable = false;
        f.set_groups(&[group("a", 1, 1), disabled, group("c", 3, 1)], 3);
        assert_eq!(f.active(), Some("c"));
    }
}
