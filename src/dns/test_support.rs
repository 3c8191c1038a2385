//! Test doubles of the request path's unit tests (`frontend`, `health_checks`): a fake
//! upstream network behind [`Exchange`], a two-group plan, and query/answer helpers.
//!
//! Owns: what every answer of the fake network looks like.
//! Must not: be compiled outside `cargo test` (declared `#[cfg(test)]` in `dns`).

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, Query as HQuery, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use meduza_generators::plan::dns::{DnsPlan, Failover as FailoverCfg, HealthCheck, UpstreamGroup};

use super::exchange::{Exchange, ExchangeError};
use super::DnsConfig;

/// A fake network: each address answers with a fixed A record, an rcode,
/// refuses, or never answers.
#[derive(Clone, Copy)]
pub(crate) enum Behaviour {
    Answer(Ipv4Addr),
    Rcode(ResponseCode),
    Refused,
    Hang,
}

pub(crate) struct FakeExchange {
    map: Mutex<HashMap<SocketAddr, Behaviour>>,
    /// Every address asked, in order.
    pub(crate) calls: Mutex<Vec<SocketAddr>>,
}

impl FakeExchange {
    pub(crate) fn new(entries: &[(SocketAddr, Behaviour)]) -> Arc<Self> {
        Arc::new(Self {
            map: Mutex::new(entries.iter().copied().collect()),
            calls: Mutex::new(Vec::new()),
        })
    }
    pub(crate) fn set(&self, addr: SocketAddr, b: Behaviour) {
        self.map.lock().unwrap().insert(addr, b);
    }
}

#[async_trait::async_trait]
impl Exchange for FakeExchange {
    async fn exchange(
        &self,
        addr: SocketAddr,
        query: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, ExchangeError> {
        self.calls.lock().unwrap().push(addr);
        let b = self
            .map
            .lock()
            .unwrap()
            .get(&addr)
            .copied()
            .unwrap_or(Behaviour::Refused);
        let req = Message::from_vec(query).map_err(|_| ExchangeError::Malformed)?;
        let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
        resp.add_queries(req.queries.clone());
        match b {
            Behaviour::Answer(ip) => {
                resp.add_answer(Record::from_rdata(
                    req.queries[0].name().clone(),
                    300,
                    RData::A(A::from(ip)),
                ));
            }
            Behaviour::Rcode(rc) => resp.metadata.response_code = rc,
            Behaviour::Refused => return Err(ExchangeError::Refused),
            Behaviour::Hang => {
                tokio::time::sleep(timeout).await;
                return Err(ExchangeError::Timeout);
            }
        }
        Ok(resp.to_vec().unwrap())
    }
}

pub(crate) fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

pub(crate) fn group(name: &str, prio: u32, a: &str) -> UpstreamGroup {
    UpstreamGroup {
        name: name.into(),
        addresses: vec![addr(a)],
        priority: prio,
        enable: true,
        health_check: HealthCheck::default(),
        failover: FailoverCfg {
            enable: true,
            threshold: 2,
        },
    }
}

pub(crate) fn plan() -> DnsPlan {
    let mut hosts = BTreeMap::new();
    hosts.insert(
        "gw.internal".to_string(),
        vec!["10.42.1.1".parse().unwrap(), "fd00::1".parse().unwrap()],
    );
    DnsPlan {
        hosts,
        mosdns_enabled: true,
        clash_enabled: true,
        upstreams: vec![
            group("primary", 1, "192.0.2.1:53"),
            group("secondary", 2, "192.0.2.2:53"),
        ],
    }
}

pub(crate) fn cfg() -> DnsConfig {
    DnsConfig {
        mosdns_addr: addr("127.0.0.1:1153"),
        clash_addr: addr("127.0.0.1:1053"),
        attempt_timeout: Duration::from_millis(50),
        query_budget: Duration::from_millis(500),
        ..DnsConfig::default()
    }
}

pub(crate) fn query(name: &str, rt: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = 4242;
    m.metadata.recursion_desired = true;
    m.add_query(HQuery::query(Name::from_ascii(name).unwrap(), rt));
    m.to_vec().unwrap()
}

pub(crate) fn answer_ip(resp: &[u8]) -> (ResponseCode, Vec<RData>) {
    let m = Message::from_vec(resp).unwrap();
    assert_eq!(m.metadata.id, 4242);
    (
        m.metadata.response_code,
        m.answers.iter().map(|r| r.data.clone()).collect(),
    )
}
