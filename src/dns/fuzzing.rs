//! The request path as one synchronous function of bytes, shared by the cargo-fuzz
//! target (`fuzz/fuzz_targets/dns_request.rs`) and the unit test that feeds it random
//! and mutated packets in every CI run.
//!
//! Owns: the invariants checked on every input (never panic; a reply keeps the id and
//! is a response; a query is only forwarded when its question was read in full; a
//! packet taken as an upstream answer round-trips through the cache).
//! Must not: touch the network or the clock beyond `Instant::now()`.
//! Built only for tests and the `test-util` feature (docs/testing.md, "Test support").

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meduza_generators::plan::dns::DnsPlan;

use super::cache::{Cache, Key};
use super::exchange::NetExchange;
use super::frontend::{Frontend, Local, Proto};
use super::{wire, DnsConfig, DnsError};

/// A frontend with host records and a small cache, no listeners, no health checks.
pub struct Harness {
    pub frontend: Arc<Frontend>,
    pub cache: Cache,
}

impl Harness {
    pub fn new() -> Result<Self, DnsError> {
        let mut hosts = BTreeMap::new();
        let addrs: Vec<IpAddr> = vec![
            IpAddr::from([10, 0, 0, 1]),
            IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, 1]),
        ];
        hosts.insert("gw.internal".to_string(), addrs);
        let plan = DnsPlan {
            hosts,
            ..DnsPlan::default()
        };
        let config = DnsConfig {
            cache_size: 64,
            ..DnsConfig::default()
        };
        Ok(Self {
            frontend: Frontend::new(config, &plan, Arc::new(NetExchange::new(1)))?,
            cache: Cache::new(64, 86_400, 3_600),
        })
    }

    /// Runs one input through the request path (as a query over UDP and TCP) and the
    /// response path (as an upstream answer to cache). Panics when an invariant breaks.
    pub fn exercise(&self, data: &[u8]) {
        let now = Instant::now();
        for proto in [Proto::Udp, Proto::Tcp] {
            match self.frontend.handle_local(data, proto, now) {
                Local::Reply(r) => {
                    assert!(r.len() >= wire::HEADER_LEN, "reply shorter than a header");
                    assert_eq!(r[0..2], data[0..2], "reply keeps the query id");
                    assert!(r[2] & 0x80 != 0, "reply is a response");
                    if proto == Proto::Udp {
                        let limit = wire::parse_query(data)
                            .map_or(wire::CLASSIC_UDP_LIMIT, |q| q.udp_limit());
                        assert!(
                            r.len() <= limit.max(wire::CLASSIC_UDP_LIMIT),
                            "udp reply over the client's limit"
                        );
                    }
                }
                Local::Drop => assert!(data.len() < wire::HEADER_LEN || data[2] & 0x80 != 0),
                Local::Forward(q) => {
                    assert_eq!(q.qname.len() + 4, q.question.len());
                    assert_eq!(
                        &data[wire::HEADER_LEN..wire::HEADER_LEN + q.question.len()],
                        q.question
                    );
                }
            }
        }
        // As an upstream answer: scan, cache, replay for the matching query.
        if let Some(info) = wire::scan_response(data) {
            let question = &data[wire::HEADER_LEN..info.question_end];
            let mut query = data[0..wire::HEADER_LEN].to_vec();
            query[2] &= 0x7F; // QR=0
            query[4..12].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
            query.extend_from_slice(question);
            if let Ok(q) = wire::parse_query(&query) {
                let key = Key::from_query(&q);
                // Each input against an empty cache: an answer the cache declines
                // (TTL 0) leaves an earlier entry for the same question in place, by
                // design, so the replay check below is only about this input.
                self.cache.clear();
                self.cache.insert(&key, data, &info, now);
                if let Some(hit) = self.cache.get(&key, &q, now + Duration::from_secs(1)) {
                    assert_eq!(hit.len(), data.len(), "cached answer replays whole");
                    assert_eq!(hit[0..2], query[0..2]);
                }
            }
        }
    }
}
