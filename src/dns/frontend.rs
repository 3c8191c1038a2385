//! The request path and the live state behind it.
//!
//! Owns: answering one DNS message (parse → host records → cache → forwarding chain
//! → shaping for UDP), the chain order (MosDNS, mihomo, upstream groups), the
//! in-flight bound, the failover state fed by live queries, and status publication.
//! Must not: own sockets of its own listeners (server.rs does), run health checks
//! (`health_checks` does, feeding the same state), or talk to etcd (the integrator
//! publishes what [`Frontend::subscribe`] reports).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use meduza_generators::plan::dns::{DnsPlan, UpstreamGroup};

use crate::etcd::status::unix_now;
use serde::Serialize;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use super::cache::{Cache, Key};
use super::exchange::{Exchange, ExchangeError};
use super::failover::{Event, Failover, FailoverLogEntry, UpstreamStatus};
use super::hosts::HostsTable;
use super::wire::{self, ParseError, Query};
use super::{DnsConfig, DnsError};

/// Transport the query arrived on (decides truncation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Udp,
    Tcp,
}

/// Observed state of the chain's local members, set by the supervisor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ChainState {
    pub mosdns_running: bool,
    pub clash_healthy: bool,
}

/// Outcome of the synchronous part of the request path.
#[derive(Debug, PartialEq, Eq)]
pub enum Local<'a> {
    /// Answered from host records, the cache, or an error.
    Reply(Vec<u8>),
    /// Not answerable (too short, a response): say nothing.
    Drop,
    /// Needs the forwarding chain.
    Forward(Query<'a>),
}

/// What the status watch carries.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DnsStatus {
    pub active: Option<String>,
    pub upstreams: Vec<UpstreamStatus>,
    pub failover_log: Vec<FailoverLogEntry>,
}

/// Counters of the request path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub queries: u64,
    pub hosts_answers: u64,
    pub cache_hits: u64,
    pub forwarded: u64,
    pub servfail_overload: u64,
    pub servfail_chain: u64,
    pub formerr: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum MemberKind {
    Mosdns,
    Clash,
    Group(String),
}

#[derive(Debug, Clone)]
struct Member {
    kind: MemberKind,
    addrs: Vec<SocketAddr>,
}

pub(super) struct ChainInputs {
    mosdns_enabled: bool,
    clash_enabled: bool,
    state: ChainState,
    pub(super) groups: Vec<UpstreamGroup>,
}

#[derive(Default)]
struct AtomicCounters {
    queries: AtomicU64,
    hosts_answers: AtomicU64,
    cache_hits: AtomicU64,
    forwarded: AtomicU64,
    servfail_overload: AtomicU64,
    servfail_chain: AtomicU64,
    formerr: AtomicU64,
}

pub struct Frontend {
    cfg: DnsConfig,
    hosts: ArcSwap<HostsTable>,
    cache: Cache,
    route: ArcSwap<Vec<Member>>,
    failover: Mutex<Failover>,
    pub(super) chain: Mutex<ChainInputs>,
    inflight: Arc<Semaphore>,
    pub(super) exchange: Arc<dyn Exchange>,
    status_tx: watch::Sender<DnsStatus>,
    pub(super) health_tasks: Mutex<Vec<JoinHandle<()>>>,
    pub(super) health_name: Vec<u8>,
    counters: AtomicCounters,
}

/// The predecessor's fallbacks, used when the plan has no upstream group (DESIGN §3):
/// the model's list, so the frontend and the rendered plan never disagree.
pub fn default_groups() -> Vec<UpstreamGroup> {
    meduza_generators::model::default_upstreams()
}

fn effective_groups(plan: &DnsPlan) -> Vec<UpstreamGroup> {
    if plan.upstreams.is_empty() {
        default_groups()
    } else {
        plan.upstreams.clone()
    }
}

impl Frontend {
    /// Builds the frontend. Health checks start with [`Frontend::start_health_checks`]
    /// (needs a tokio runtime).
    pub fn new(
        cfg: DnsConfig,
        plan: &DnsPlan,
        exchange: Arc<dyn Exchange>,
    ) -> Result<Arc<Self>, DnsError> {
        let health_name =
            wire::name_to_wire(&cfg.health_check_name).ok_or_else(|| DnsError::Config {
                setting: "health_check_name",
                value: cfg.health_check_name.clone(),
                reason: "not a valid DNS name".into(),
            })?;
        let groups = effective_groups(plan);
        let fe = Arc::new(Self {
            hosts: ArcSwap::from_pointee(HostsTable::from_plan(&plan.hosts)),
            cache: Cache::new(cfg.cache_size, cfg.max_cache_ttl, cfg.max_negative_ttl),
            route: ArcSwap::from_pointee(Vec::new()),
            failover: Mutex::new(Failover::new(&groups)),
            chain: Mutex::new(ChainInputs {
                mosdns_enabled: plan.mosdns_enabled,
                clash_enabled: plan.clash_enabled,
                state: ChainState::default(),
                groups,
            }),
            inflight: Arc::new(Semaphore::new(cfg.max_inflight.max(1))),
            exchange,
            status_tx: watch::channel(DnsStatus::default()).0,
            health_tasks: Mutex::new(Vec::new()),
            health_name,
            counters: AtomicCounters::default(),
            cfg,
        });
        fe.rebuild_route();
        fe.publish();
        Ok(fe)
    }

    // ---- live configuration -------------------------------------------------------

    pub fn set_hosts(&self, hosts: &BTreeMap<String, Vec<IpAddr>>) {
        self.hosts.store(Arc::new(HostsTable::from_plan(hosts)));
        tracing::debug!(names = hosts.len(), "host records replaced");
    }

    pub fn set_chain_state(&self, state: ChainState) {
        let changed = {
            let mut c = self.chain.lock().unwrap_or_else(|e| e.into_inner());
            let before = (
                c.mosdns_enabled && c.state.mosdns_running,
                c.clash_enabled && c.state.clash_healthy,
            );
            c.state = state;
            before
                != (
                    c.mosdns_enabled && c.state.mosdns_running,
                    c.clash_enabled && c.state.clash_healthy,
                )
        };
        if changed {
            self.chain_membership_changed();
        }
    }

    /// Answers cached from one chain are wrong for another (mihomo's fake-ip answers
    /// vs real addresses), so a change of the chain's local members empties the cache.
    fn chain_membership_changed(&self) {
        self.cache.clear();
        self.rebuild_route();
        let c = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        tracing::info!(
            mosdns = c.mosdns_enabled && c.state.mosdns_running,
            clash = c.clash_enabled && c.state.clash_healthy,
            "dns forwarding chain changed; cache cleared"
        );
    }

    pub fn update_plan(self: &Arc<Self>, plan: &DnsPlan) {
        self.set_hosts(&plan.hosts);
        let groups = effective_groups(plan);
        let membership_changed = {
            let mut c = self.chain.lock().unwrap_or_else(|e| e.into_inner());
            let before = (
                c.mosdns_enabled && c.state.mosdns_running,
                c.clash_enabled && c.state.clash_healthy,
            );
            c.mosdns_enabled = plan.mosdns_enabled;
            c.clash_enabled = plan.clash_enabled;
            c.groups = groups.clone();
            before
                != (
                    c.mosdns_enabled && c.state.mosdns_running,
                    c.clash_enabled && c.state.clash_healthy,
                )
        };
        let entries = self
            .failover
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_groups(&groups, unix_now());
        log_entries(&entries);
        let mut keep: Vec<SocketAddr> = groups
            .iter()
            .flat_map(|g| g.addresses.iter().copied())
            .collect();
        keep.push(self.cfg.mosdns_addr);
        keep.push(self.cfg.clash_addr);
        self.exchange.retain(&keep);
        if membership_changed {
            self.chain_membership_changed();
        } else {
            self.rebuild_route();
        }
        self.start_health_checks();
        self.publish();
    }

    fn rebuild_route(&self) {
        let mut members = Vec::new();
        {
            let c = self.chain.lock().unwrap_or_else(|e| e.into_inner());
            if c.mosdns_enabled && c.state.mosdns_running {
                members.push(Member {
                    kind: MemberKind::Mosdns,
                    addrs: vec![self.cfg.mosdns_addr],
                });
            }
            if c.clash_enabled && c.state.clash_healthy {
                members.push(Member {
                    kind: MemberKind::Clash,
                    addrs: vec![self.cfg.clash_addr],
                });
            }
        }
        let groups = self
            .failover
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .route();
        members.extend(groups.into_iter().map(|(name, addrs)| Member {
            kind: MemberKind::Group(name),
            addrs,
        }));
        self.route.store(Arc::new(members));
    }

    /// Names of the chain members in the order a query tries them.
    pub fn chain_order(&self) -> Vec<String> {
        self.route
            .load()
            .iter()
            .map(|m| match &m.kind {
                MemberKind::Mosdns => "mosdns".to_string(),
                MemberKind::Clash => "clash".to_string(),
                MemberKind::Group(n) => n.clone(),
            })
            .collect()
    }

    fn publish(&self) {
        let f = self.failover.lock().unwrap_or_else(|e| e.into_inner());
        let status = DnsStatus {
            active: f.active().map(str::to_string),
            upstreams: f.status(),
            failover_log: f.log(),
        };
        drop(f);
        self.status_tx.send_replace(status);
    }

    /// Feeds the failover state machine; rebuilds the route and publishes when
    /// something an operator sees changed.
    pub(super) fn feed(&self, event: Event) -> Result<Vec<FailoverLogEntry>, DnsError> {
        let is_check = matches!(event, Event::Check { .. } | Event::Manual { .. });
        let entries = {
            let mut f = self.failover.lock().unwrap_or_else(|e| e.into_inner());
            f.apply(event, unix_now())?
        };
        log_entries(&entries);
        if is_check || !entries.is_empty() {
            self.rebuild_route();
            self.publish();
        }
        Ok(entries)
    }

    pub fn subscribe(&self) -> watch::Receiver<DnsStatus> {
        self.status_tx.subscribe()
    }

    pub fn upstream_status(&self) -> Vec<UpstreamStatus> {
        self.failover
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .status()
    }

    pub fn failover_log(&self) -> Vec<FailoverLogEntry> {
        self.failover
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .log()
    }

    pub fn manual_failover(&self, target: Option<String>) -> Result<String, DnsError> {
        self.feed(Event::Manual { target })?;
        Ok(self
            .failover
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .active()
            .unwrap_or_default()
            .to_string())
    }

    pub fn counters(&self) -> Counters {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            queries: l(&c.queries),
            hosts_answers: l(&c.hosts_answers),
            cache_hits: l(&c.cache_hits),
            forwarded: l(&c.forwarded),
            servfail_overload: l(&c.servfail_overload),
            servfail_chain: l(&c.servfail_chain),
            formerr: l(&c.formerr),
        }
    }

    pub fn cache_stats(&self) -> super::cache::CacheStats {
        self.cache.stats()
    }

    // ---- the request path ---------------------------------------------------------

    fn shape(&self, resp: Vec<u8>, q: &Query<'_>, proto: Proto) -> Vec<u8> {
        if proto == Proto::Udp && resp.len() > q.udp_limit() {
            wire::truncated_response(q)
        } else {
            resp
        }
    }

    /// The synchronous part: parse, host records, cache. Never panics, never blocks.
    pub fn handle_local<'a>(&self, pkt: &'a [u8], proto: Proto, now: Instant) -> Local<'a> {
        self.counters.queries.fetch_add(1, Ordering::Relaxed);
        let q = match wire::parse_query(pkt) {
            Ok(q) => q,
            Err(ParseError::TooShort) | Err(ParseError::IsResponse) => return Local::Drop,
            Err(ParseError::NotImplemented { .. }) => {
                return wire::header_only_error(pkt, wire::RCODE_NOTIMP)
                    .map_or(Local::Drop, Local::Reply)
            }
            Err(ParseError::Malformed { .. }) => {
                self.counters.formerr.fetch_add(1, Ordering::Relaxed);
                return wire::header_only_error(pkt, wire::RCODE_FORMERR)
                    .map_or(Local::Drop, Local::Reply);
            }
        };
        let key = Key::from_query(&q);
        if q.qclass == wire::CLASS_IN {
            let hosts = self.hosts.load();
            if let Some(addrs) = hosts.lookup(&key.as_bytes()[..q.qname.len()]) {
                self.counters.hosts_answers.fetch_add(1, Ordering::Relaxed);
                let resp = wire::hosts_response(&q, addrs, self.cfg.hosts_ttl);
                return Local::Reply(self.shape(resp, &q, proto));
            }
        }
        if let Some(resp) = self.cache.get(&key, &q, now) {
            self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Local::Reply(self.shape(resp, &q, proto));
        }
        Local::Forward(q)
    }

    /// The whole request path: `None` when nothing should be sent back.
    pub async fn handle_packet(&self, pkt: &[u8], proto: Proto) -> Option<Vec<u8>> {
        match self.handle_local(pkt, proto, Instant::now()) {
            Local::Reply(r) => Some(r),
            Local::Drop => None,
            Local::Forward(q) => Some(self.forward(&q, pkt, proto).await),
        }
    }

    /// Forwards along the chain; always produces an answer (SERVFAIL when the chain
    /// fails or too many queries are in flight).
    pub async fn forward(&self, q: &Query<'_>, pkt: &[u8], proto: Proto) -> Vec<u8> {
        let Ok(_permit) = self.inflight.try_acquire() else {
            self.counters
                .servfail_overload
                .fetch_add(1, Ordering::Relaxed);
            return wire::empty_response(q, wire::RCODE_SERVFAIL);
        };
        self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
        let route = self.route.load_full();
        let deadline = Instant::now() + self.cfg.query_budget;
        for member in route.iter() {
            let mut last_err: Option<String> = None;
            for addr in member.addrs.iter().take(2) {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let start = Instant::now();
                let timeout = self.cfg.attempt_timeout.min(left);
                // One retransmission after `retransmit_after`: a datagram lost on the
                // way (a busy upstream's full socket buffer) costs that long, not the
                // whole attempt timeout.
                let first = self.cfg.retransmit_after.min(timeout);
                let mut result = self.exchange.exchange(*addr, pkt, first).await;
                if result == Err(ExchangeError::Timeout) && first < timeout {
                    result = self.exchange.exchange(*addr, pkt, timeout - first).await;
                }
                match result {
                    Ok(resp) => {
                        let rc = wire::rcode(&resp).unwrap_or(wire::RCODE_SERVFAIL);
                        if rc == wire::RCODE_SERVFAIL || rc == wire::RCODE_REFUSED {
                            last_err = Some(format!("{addr} answered rcode {rc}"));
                            continue;
                        }
                        if let MemberKind::Group(name) = &member.kind {
                            let _ = self.feed(Event::QueryOk {
                                group: name.clone(),
                                latency: start.elapsed(),
                            });
                        }
                        if let Some(info) = wire::scan_response(&resp) {
                            self.cache
                                .insert(&Key::from_query(q), &resp, &info, Instant::now());
                        }
                        return self.shape(resp, q, proto);
                    }
                    Err(e) => {
                        tracing::debug!(upstream = %addr, error = %e, "forwarded query failed");
                        last_err = Some(format!("{addr}: {e}"));
                    }
                }
            }
            if let (MemberKind::Group(name), Some(reason)) = (&member.kind, last_err) {
                let _ = self.feed(Event::QueryFailed {
                    group: name.clone(),
                    reason,
                });
            }
        }
        self.counters.servfail_chain.fetch_add(1, Ordering::Relaxed);
        wire::empty_response(q, wire::RCODE_SERVFAIL)
    }
}

impl Drop for Frontend {
    fn drop(&mut self) {
        self.stop_health_checks();
    }
}

fn log_entries(entries: &[FailoverLogEntry]) {
    for e in entries {
        tracing::warn!(upstream = %e.upstream, action = ?e.action, reason = %e.reason, "dns upstream event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::failover::FailoverAction;
    use crate::dns::test_support::{addr, answer_ip, cfg, plan, query, Behaviour, FakeExchange};
    use hickory_proto::op::{Message, ResponseCode};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    use std::net::Ipv4Addr;
    use std::time::Duration;

    #[tokio::test]
    async fn chain_order_follows_state_and_plan() {
        let fx = FakeExchange::new(&[]);
        let fe = Frontend::new(cfg(), &plan(), fx).unwrap();
        assert_eq!(fe.chain_order(), vec!["primary", "secondary"]);
        fe.set_chain_state(ChainState {
            mosdns_running: true,
            clash_healthy: true,
        });
        assert_eq!(
            fe.chain_order(),
            vec!["mosdns", "clash", "primary", "secondary"]
        );
        fe.set_chain_state(ChainState {
            mosdns_running: true,
            clash_healthy: false,
        });
        assert_eq!(fe.chain_order(), vec!["mosdns", "primary", "secondary"]);
        let mut p = plan();
        p.mosdns_enabled = false;
        p.upstreams.clear();
        fe.update_plan(&p);
        assert_eq!(fe.chain_order(), vec!["alidns", "dnspod"]);
    }

    #[tokio::test]
    async fn hosts_answers_are_local_and_live() {
        let fx = FakeExchange::new(&[]);
        let fe = Frontend::new(cfg(), &plan(), fx.clone()).unwrap();
        let r = fe
            .handle_packet(&query("GW.Internal.", RecordType::A), Proto::Udp)
            .await
            .unwrap();
        assert_eq!(
            answer_ip(&r),
            (ResponseCode::NoError, vec![RData::A(A::new(10, 42, 1, 1))])
        );
        let r = fe
            .handle_packet(&query("gw.internal.", RecordType::MX), Proto::Udp)
            .await
            .unwrap();
        assert_eq!(answer_ip(&r), (ResponseCode::NoError, vec![]));
        let mut h = BTreeMap::new();
        h.insert(
            "new.internal".to_string(),
            vec!["10.9.9.9".parse().unwrap()],
        );
        fe.set_hosts(&h);
        let r = fe
            .handle_packet(&query("new.internal.", RecordType::A), Proto::Udp)
            .await
            .unwrap();
        assert_eq!(answer_ip(&r).1, vec![RData::A(A::new(10, 9, 9, 9))]);
        assert!(
            fx.calls.lock().unwrap().is_empty(),
            "host records never forwarded"
        );
    }

    #[tokio::test]
    async fn falls_through_the_chain_and_fails_over() {
        let fx = FakeExchange::new(&[
            (
                addr("127.0.0.1:1153"),
                Behaviour::Rcode(ResponseCode::ServFail),
            ),
            (addr("127.0.0.1:1053"), Behaviour::Refused),
            (addr("192.0.2.1:53"), Behaviour::Hang),
            (
                addr("192.0.2.2:53"),
                Behaviour::Answer(Ipv4Addr::new(10, 0, 0, 2)),
            ),
        ]);
        let mut c = cfg();
        c.cache_size = 0;
        let fe = Frontend::new(c, &plan(), fx.clone()).unwrap();
        fe.set_chain_state(ChainState {
            mosdns_running: true,
            clash_healthy: true,
        });
        for _ in 0..2 {
            let r = fe
                .handle_packet(&query("a.example.", RecordType::A), Proto::Udp)
                .await
                .unwrap();
            assert_eq!(answer_ip(&r).1, vec![RData::A(A::new(10, 0, 0, 2))]);
        }
        // threshold 2 reached by live failures: secondary is active
        assert_eq!(fe.chain_order(), vec!["mosdns", "clash", "secondary"]);
        let log: Vec<FailoverAction> = fe.failover_log().iter().map(|e| e.action).collect();
        assert_eq!(
            log,
            vec![
                FailoverAction::HealthCheckFailed,
                FailoverAction::HealthCheckFailed,
                FailoverAction::FailoverTriggered
            ]
        );
        let st = fe.upstream_status();
        assert_eq!(st[1].queries, 2);
        assert!(st[1].active);
        // everything fails: SERVFAIL
        fx.set(addr("192.0.2.2:53"), Behaviour::Refused);
        let r = fe
            .handle_packet(&query("b.example.", RecordType::A), Proto::Udp)
            .await
            .unwrap();
        assert_eq!(answer_ip(&r).0, ResponseCode::ServFail);
        // a NXDOMAIN is an answer, not a failure
        fx.set(
            addr("192.0.2.2:53"),
            Behaviour::Rcode(ResponseCode::NXDomain),
        );
        let r = fe
            .handle_packet(&query("c.example.", RecordType::A), Proto::Udp)
            .await
            .unwrap();
        assert_eq!(answer_ip(&r).0, ResponseCode::NXDomain);
    }

    #[tokio::test]
    async fn overload_answers_servfail_immediately() {
        let fx = FakeExchange::new(&[(addr("192.0.2.1:53"), Behaviour::Hang)]);
        let mut c = cfg();
        c.max_inflight = 1;
        c.attempt_timeout = Duration::from_secs(2);
        c.query_budget = Duration::from_secs(2);
        let mut p = plan();
        p.upstreams.truncate(1);
        let fe = Frontend::new(c, &p, fx).unwrap();
        let fe2 = fe.clone();
        let slow = tokio::spawn(async move {
            fe2.handle_packet(&query("slow.example.", RecordType::A), Proto::Udp)
                .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let start = Instant::now();
        let r = fe
            .handle_packet(&query("fast.example.", RecordType::A), Proto::Udp)
            .await
            .unwrap();
        assert!(start.elapsed() < Duration::from_millis(100));
        assert_eq!(answer_ip(&r).0, ResponseCode::ServFail);
        assert_eq!(fe.counters().servfail_overload, 1);
        slow.abort();
    }

    /// Random and mutated packets through the request path and the response scanner
    /// (the fuzz target's function, so CI exercises it on every run).
    #[test]
    fn random_packets_never_panic() {
        use rand::{RngExt, SeedableRng};
        let h = crate::dns::fuzzing::Harness::new().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x6d65_6475_7a61);
        let mut seeds = vec![
            query("gw.internal.", RecordType::A),
            query("x.example.", RecordType::AAAA),
            query("y.example.", RecordType::TXT),
        ];
        let mut resp = Message::from_vec(&query("z.example.", RecordType::A)).unwrap();
        resp.metadata.message_type = hickory_proto::op::MessageType::Response;
        resp.add_answer(Record::from_rdata(
            Name::from_ascii("z.example.").unwrap(),
            60,
            RData::A(A::new(1, 2, 3, 4)),
        ));
        seeds.push(resp.to_vec().unwrap());
        for i in 0..60_000 {
            let pkt: Vec<u8> = if i % 2 == 0 {
                let n = rng.random_range(0..300);
                (0..n).map(|_| rng.random()).collect()
            } else {
                let mut p = seeds[i % seeds.len()].clone();
                for _ in 0..rng.random_range(0..4) {
                    let at = rng.random_range(0..p.len());
                    p[at] = rng.random();
                }
                p.truncate(rng.random_range(0..=p.len()));
                p
            };
            h.exercise(&pkt);
        }
        for s in &seeds {
            h.exercise(s);
        }
    }
}
