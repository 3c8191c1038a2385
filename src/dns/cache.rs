//! The answer cache: upstream responses stored as wire bytes, keyed by
//! (lower-cased name, type, class, EDNS/DO/CD flags), expiring by TTL and bounded by
//! an LRU per shard.
//!
//! Owns: storing, expiring and replaying responses with TTLs counted down.
//! Must not: decide what is cacheable (the caller passes the TTL from
//! `wire::scan_response`), filter answers (private ranges pass through), or read the
//! clock itself (`now` is an argument, so expiry is tested without sleeping).

use lru::LruCache;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::Instant;

use super::wire::{self, Query, HEADER_LEN};

/// Shards keep the two worker threads from contending on one lock.
const SHARDS: usize = 16;
/// Longest key: 255-octet name + type + class + flags.
const MAX_KEY: usize = 255 + 5;

/// A cache key built on the stack from a query.
pub struct Key {
    buf: [u8; MAX_KEY],
    len: usize,
}

impl Key {
    pub fn from_query(q: &Query<'_>) -> Self {
        let mut buf = [0u8; MAX_KEY];
        let n = q.qname.len().min(255);
        buf[..n].copy_from_slice(&q.qname[..n]);
        wire::lowercase_in_place(&mut buf[..n]);
        buf[n..n + 2].copy_from_slice(&q.qtype.to_be_bytes());
        buf[n + 2..n + 4].copy_from_slice(&q.qclass.to_be_bytes());
        // Responses differ with EDNS presence (OPT record), DO (RRSIGs) and CD.
        let flags = u8::from(q.edns.is_some())
            | (u8::from(q.edns.is_some_and(|e| e.dnssec_ok)) << 1)
            | (u8::from(q.checking_disabled()) << 2);
        buf[n + 4] = flags;
        Self { buf, len: n + 5 }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn shard(&self) -> usize {
        // FNV-1a: cheap and good enough to spread keys over 16 shards.
        let mut h: u32 = 0x811c_9dc5;
        for &b in self.as_bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        (h as usize) % SHARDS
    }
}

struct Entry {
    /// The response with id 0.
    bytes: Box<[u8]>,
    ttl_offsets: Box<[u16]>,
    stored: Instant,
    ttl: u32,
}

/// Counters for status and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: usize,
    pub hits: u64,
    pub misses: u64,
}

pub struct Cache {
    shards: Vec<Mutex<LruCache<Box<[u8]>, Entry>>>,
    max_ttl: u32,
    max_negative_ttl: u32,
    hits: std::sync::atomic::AtomicU64,
    misses: std::sync::atomic::AtomicU64,
    enabled: bool,
}

impl Cache {
    /// `capacity` entries in total; 0 disables the cache.
    pub fn new(capacity: usize, max_ttl: u32, max_negative_ttl: u32) -> Self {
        let per_shard =
            NonZeroUsize::new(capacity.div_ceil(SHARDS).max(1)).unwrap_or(NonZeroUsize::MIN);
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(LruCache::new(per_shard)))
                .collect(),
            max_ttl,
            max_negative_ttl,
            hits: Default::default(),
            misses: Default::default(),
            enabled: capacity > 0,
        }
    }

    /// A reply for `q` with the client's id and question bytes and TTLs counted down,
    /// or `None` on a miss or an expired entry.
    pub fn get(&self, key: &Key, q: &Query<'_>, now: Instant) -> Option<Vec<u8>> {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.enabled {
            return None;
        }
        let mut shard = self.shards[key.shard()]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Some(entry) = shard.get(key.as_bytes()) else {
            drop(shard);
            self.misses.fetch_add(1, Relaxed);
            return None;
        };
        let elapsed = u32::try_from(now.saturating_duration_since(entry.stored).as_secs())
            .unwrap_or(u32::MAX);
        if elapsed >= entry.ttl {
            shard.pop(key.as_bytes());
            drop(shard);
            self.misses.fetch_add(1, Relaxed);
            return None;
        }
        let mut out = entry.bytes.to_vec();
        for &off in entry.ttl_offsets.iter() {
            let off = usize::from(off);
            if let Some(field) = out.get_mut(off..off + 4) {
                let ttl = u32::from_be_bytes([field[0], field[1], field[2], field[3]]);
                field.copy_from_slice(&ttl.saturating_sub(elapsed).to_be_bytes());
            }
        }
        drop(shard);
        self.hits.fetch_add(1, Relaxed);
        out[0..2].copy_from_slice(&q.id.to_be_bytes());
        // Echo the client's question (same length: the key matched case-insensitively).
        let qend = HEADER_LEN + q.question.len();
        if let Some(dst) = out.get_mut(HEADER_LEN..qend) {
            dst.copy_from_slice(q.question);
        }
        Some(out)
    }

    /// Stores `resp` (as scanned by `wire::scan_response`) for `ttl` seconds,
    /// capped at the configured maxima; `negative` selects the negative cap.
    pub fn insert(&self, key: &Key, resp: &[u8], info: &wire::ResponseInfo, now: Instant) {
        if !self.enabled || info.cache_ttl == 0 {
            return;
        }
        let negative = info.rcode == wire::RCODE_NXDOMAIN || resp.get(6..8) == Some(&[0, 0]);
        let cap = if negative {
            self.max_negative_ttl
        } else {
            self.max_ttl
        };
        let ttl = info.cache_ttl.min(cap);
        if ttl == 0 {
            return;
        }
        let mut bytes: Box<[u8]> = resp.into();
        bytes[0] = 0;
        bytes[1] = 0;
        // Store TTLs already capped so replayed answers never exceed our own lifetime.
        for &off in &info.ttl_offsets {
            let off = usize::from(off);
            if let Some(field) = bytes.get_mut(off..off + 4) {
                let t = u32::from_be_bytes([field[0], field[1], field[2], field[3]]);
                field.copy_from_slice(&t.min(ttl).to_be_bytes());
            }
        }
        let entry = Entry {
            bytes,
            ttl_offsets: info.ttl_offsets.clone().into_boxed_slice(),
            stored: now,
            ttl,
        };
        let mut shard = self.shards[key.shard()]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        shard.put(key.as_bytes().into(), entry);
    }

    pub fn clear(&self) {
        for s in &self.shards {
            s.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    pub fn stats(&self) -> CacheStats {
        use std::sync::atomic::Ordering::Relaxed;
        CacheStats {
            entries: self
                .shards
                .iter()
                .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
                .sum(),
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::wire::parse_query;
    use hickory_proto::op::{Message, MessageType, OpCode, Query as HQuery};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    use std::time::Duration;

    fn query(name: &str, id: u16) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.add_query(HQuery::query(
            Name::from_ascii(name).unwrap(),
            RecordType::A,
        ));
        m.to_vec().unwrap()
    }

    fn response(name: &str, ttl: u32) -> Vec<u8> {
        let n = Name::from_ascii(name).unwrap();
        let mut m = Message::new(99, MessageType::Response, OpCode::Query);
        m.add_query(HQuery::query(n.clone(), RecordType::A));
        m.add_answer(Record::from_rdata(n, ttl, RData::A(A::new(10, 1, 2, 3))));
        m.to_vec().unwrap()
    }

    #[test]
    fn ttl_counts_down_and_expires() {
        let cache = Cache::new(100, 86400, 3600);
        let t0 = Instant::now();
        let qb = query("Host.Example.", 1);
        let q = parse_query(&qb).unwrap();
        let key = Key::from_query(&q);
        assert!(cache.get(&key, &q, t0).is_none());
        let resp = response("host.example.", 10);
        let info = wire::scan_response(&resp).unwrap();
        cache.insert(&key, &resp, &info, t0);

        let qb2 = query("HOST.example.", 77);
        let q2 = parse_query(&qb2).unwrap();
        let key2 = Key::from_query(&q2);
        let hit = cache.get(&key2, &q2, t0 + Duration::from_secs(4)).unwrap();
        let m = Message::from_vec(&hit).unwrap();
        assert_eq!(m.metadata.id, 77);
        assert_eq!(m.queries[0].name().to_ascii(), "HOST.example.");
        assert_eq!(m.answers[0].ttl, 6);
        assert!(cache
            .get(&key2, &q2, t0 + Duration::from_secs(10))
            .is_none());
        assert_eq!(cache.stats().entries, 0);
    }

    #[test]
    fn ttl_capped_and_lru_bounded() {
        let cache = Cache::new(SHARDS, 5, 5); // one entry per shard
        let t0 = Instant::now();
        for i in 0..200 {
            let name = format!("n{i}.example.");
            let qb = query(&name, 1);
            let q = parse_query(&qb).unwrap();
            let resp = response(&name, 1000);
            cache.insert(
                &Key::from_query(&q),
                &resp,
                &wire::scan_response(&resp).unwrap(),
                t0,
            );
        }
        assert!(cache.stats().entries <= SHARDS);
        let name = "n199.example.";
        let qb = query(name, 1);
        let q = parse_query(&qb).unwrap();
        let hit = cache.get(&Key::from_query(&q), &q, t0).unwrap();
        assert_eq!(Message::from_vec(&hit).unwrap().answers[0].ttl, 5);
        assert!(cache
            .get(&Key::from_query(&q), &q, t0 + Duration::from_secs(5))
            .is_none());
    }

    #[test]
    fn disabled_cache_stores_nothing() {
        let cache = Cache::new(0, 100, 100);
        let qb = query("a.example.", 1);
        let q = parse_query(&qb).unwrap();
        let resp = response("a.example.", 100);
        let now = Instant::now();
        cache.insert(
            &Key::from_query(&q),
            &resp,
            &wire::scan_response(&resp).unwrap(),
            now,
        );
        assert!(cache.get(&Key::from_query(&q), &q, now).is_none());
    }
}
