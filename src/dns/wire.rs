//! DNS wire-format helpers for the frontend's hot path.
//!
//! Owns: a bounds-checked reader for *queries* (header, the single question, the EDNS
//! OPT record), a scanner for *upstream responses* (TTL offsets, negative-caching TTL
//! per RFC 2308), and builders for the few answers the frontend writes itself (host
//! records, errors, truncation).
//! Must not: allocate on the cache-hit path beyond the reply buffer, panic on any
//! input (fuzzed), or interpret anything it does not need. Full message handling
//! (TCP through hickory-server, tests) uses hickory-proto; this module exists because
//! a cache hit must cost a few hundred nanoseconds, not a full `Message` decode with a
//! `Name` per label (measured in docs/benchmarks-dns.md).

use std::net::IpAddr;

/// Fixed DNS header length (RFC 1035 §4.1.1).
pub const HEADER_LEN: usize = 12;
/// Largest UDP answer for a client that sent no EDNS (RFC 1035 §4.2.1).
pub const CLASSIC_UDP_LIMIT: usize = 512;
/// The payload size the frontend advertises in OPT records it writes itself.
pub const OUR_EDNS_PAYLOAD: u16 = 1232;

pub const TYPE_A: u16 = 1;
pub const TYPE_SOA: u16 = 6;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_OPT: u16 = 41;
pub const CLASS_IN: u16 = 1;

pub const RCODE_NOERROR: u8 = 0;
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_NOTIMP: u8 = 4;
pub const RCODE_REFUSED: u8 = 5;

/// EDNS information of a query (RFC 6891).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdnsInfo {
    pub udp_size: u16,
    pub dnssec_ok: bool,
}

/// A parsed query. `question` borrows the raw question bytes (qname, qtype, qclass)
/// so replies can echo them exactly, including the client's letter case (0x20).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query<'a> {
    pub id: u16,
    /// Header bytes 2..4 (QR, opcode, AA, TC, RD / RA, Z, AD, CD, RCODE).
    pub flags: [u8; 2],
    pub question: &'a [u8],
    pub qname: &'a [u8],
    pub qtype: u16,
    pub qclass: u16,
    pub edns: Option<EdnsInfo>,
}

impl Query<'_> {
    pub fn recursion_desired(&self) -> bool {
        self.flags[0] & 0x01 != 0
    }

    pub fn checking_disabled(&self) -> bool {
        self.flags[1] & 0x10 != 0
    }

    /// Largest UDP reply this client accepts.
    pub fn udp_limit(&self) -> usize {
        match self.edns {
            Some(e) => usize::from(e.udp_size).max(CLASSIC_UDP_LIMIT),
            None => CLASSIC_UDP_LIMIT,
        }
    }
}

/// Why a packet is not a query the frontend can answer normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than a header: nothing to answer to.
    TooShort,
    /// QR set: never answer a response (reflection).
    IsResponse,
    /// Unsupported opcode: answer NOTIMP.
    NotImplemented { id: u16 },
    /// Broken message with a readable header: answer FORMERR.
    Malformed { id: u16 },
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Reads an uncompressed name starting at `at`; returns the offset after it.
/// Questions of queries are never compressed in practice (there is nothing earlier
/// to point at); a pointer there is treated as malformed.
fn read_plain_name(b: &[u8], mut at: usize) -> Option<usize> {
    let start = at;
    loop {
        let len = usize::from(*b.get(at)?);
        if len == 0 {
            at += 1;
            break;
        }
        if len > 63 {
            return None; // pointer or extended label type
        }
        at += 1 + len;
        if at - start > 255 {
            return None; // RFC 1035 §3.1: 255 octets at most
        }
    }
    if at - start > 255 || at > b.len() {
        return None;
    }
    Some(at)
}

/// Skips a possibly compressed name; returns the offset after it.
fn skip_name(b: &[u8], mut at: usize) -> Option<usize> {
    let mut hops = 0usize;
    loop {
        let len = *b.get(at)?;
        match len & 0xC0 {
            0x00 if len == 0 => return Some(at + 1),
            0x00 => {
                at += 1 + usize::from(len);
                hops += 1;
                if hops > 128 {
                    return None;
                }
            }
            0xC0 => {
                b.get(at + 1)?;
                return Some(at + 2);
            }
            _ => return None,
        }
    }
}

/// One resource record's position in a message.
#[derive(Debug, Clone, Copy)]
struct RecordPos {
    rtype: u16,
    ttl_at: usize,
    rdata_at: usize,
    rdlen: usize,
    end: usize,
}

fn read_record(b: &[u8], at: usize) -> Option<RecordPos> {
    let after_name = skip_name(b, at)?;
    let rtype = u16_at(b, after_name)?;
    let ttl_at = after_name + 4;
    let rdlen = usize::from(u16_at(b, after_name + 8)?);
    let rdata_at = after_name + 10;
    let end = rdata_at.checked_add(rdlen)?;
    if end > b.len() {
        return None;
    }
    Some(RecordPos {
        rtype,
        ttl_at,
        rdata_at,
        rdlen,
        end,
    })
}

/// Parses a query packet. Never panics.
pub fn parse_query(pkt: &[u8]) -> Result<Query<'_>, ParseError> {
    if pkt.len() < HEADER_LEN {
        return Err(ParseError::TooShort);
    }
    let id = u16::from_be_bytes([pkt[0], pkt[1]]);
    let flags = [pkt[2], pkt[3]];
    if flags[0] & 0x80 != 0 {
        return Err(ParseError::IsResponse);
    }
    let opcode = (flags[0] >> 3) & 0x0F;
    if opcode != 0 {
        return Err(ParseError::NotImplemented { id });
    }
    let malformed = ParseError::Malformed { id };
    let qd = u16_at(pkt, 4).ok_or(malformed)?;
    let an = u16_at(pkt, 6).ok_or(malformed)?;
    let ns = u16_at(pkt, 8).ok_or(malformed)?;
    let ar = u16_at(pkt, 10).ok_or(malformed)?;
    if qd != 1 {
        return Err(malformed);
    }
    let name_end = read_plain_name(pkt, HEADER_LEN).ok_or(malformed)?;
    let qtype = u16_at(pkt, name_end).ok_or(malformed)?;
    let qclass = u16_at(pkt, name_end + 2).ok_or(malformed)?;
    let q_end = name_end + 4;
    let mut at = q_end;
    for _ in 0..(u32::from(an) + u32::from(ns)) {
        at = read_record(pkt, at).ok_or(malformed)?.end;
    }
    let mut edns = None;
    for _ in 0..ar {
        let r = read_record(pkt, at).ok_or(malformed)?;
        if r.rtype == TYPE_OPT {
            // RFC 6891 §6.1.1: one OPT, owner name root.
            if edns.is_some() || pkt.get(at) != Some(&0) {
                return Err(malformed);
            }
            let udp_size = u16_at(pkt, at + 3).ok_or(malformed)?;
            let ext_flags = u16_at(pkt, r.ttl_at + 2).ok_or(malformed)?;
            edns = Some(EdnsInfo {
                udp_size,
                dnssec_ok: ext_flags & 0x8000 != 0,
            });
        }
        at = r.end;
    }
    Ok(Query {
        id,
        flags,
        question: &pkt[HEADER_LEN..q_end],
        qname: &pkt[HEADER_LEN..name_end],
        qtype,
        qclass,
        edns,
    })
}

/// Lower-cases a wire-format name in place. Label length octets are < 64 and so
/// never in `A..=Z` (65..=90): the whole buffer can be folded byte by byte.
pub fn lowercase_in_place(name: &mut [u8]) {
    name.make_ascii_lowercase();
}

/// Converts a presentation name (`db.example.com`, optional trailing dot) to a
/// lower-cased wire-format name. `None` when it is not a valid host name.
pub fn name_to_wire(name: &str) -> Option<Vec<u8>> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let mut out = Vec::with_capacity(name.len() + 2);
    if !name.is_empty() {
        for label in name.split('.') {
            let len = label.len();
            if len == 0 || len > 63 {
                return None;
            }
            out.push(len as u8); // len <= 63 checked above
            out.extend(label.bytes().map(|c| c.to_ascii_lowercase()));
        }
    }
    out.push(0);
    (out.len() <= 255).then_some(out)
}

fn push_header(out: &mut Vec<u8>, q: &Query<'_>, rcode: u8, aa: bool, tc: bool, counts: [u16; 4]) {
    out.extend_from_slice(&q.id.to_be_bytes());
    // QR=1, opcode 0, AA, TC, RD copied.
    let b2 = 0x80 | (u8::from(aa) << 2) | (u8::from(tc) << 1) | (q.flags[0] & 0x01);
    // RA=1, CD copied, rcode.
    let b3 = 0x80 | (q.flags[1] & 0x10) | (rcode & 0x0F);
    out.push(b2);
    out.push(b3);
    for c in counts {
        out.extend_from_slice(&c.to_be_bytes());
    }
}

fn push_opt(out: &mut Vec<u8>, q: &Query<'_>) {
    if let Some(e) = q.edns {
        out.push(0); // root owner
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&OUR_EDNS_PAYLOAD.to_be_bytes());
        // extended rcode 0, version 0, DO echoed (RFC 3225 §3), rest zero
        out.extend_from_slice(&[0, 0, if e.dnssec_ok { 0x80 } else { 0 }, 0]);
        out.extend_from_slice(&0u16.to_be_bytes());
    }
}

/// An answer without records: errors (SERVFAIL, NOTIMP, REFUSED) and NODATA.
pub fn empty_response(q: &Query<'_>, rcode: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + q.question.len() + 11);
    let ar = u16::from(q.edns.is_some());
    push_header(&mut out, q, rcode, false, false, [1, 0, 0, ar]);
    out.extend_from_slice(q.question);
    push_opt(&mut out, q);
    out
}

/// TC=1 with the question only: the client retries over TCP (RFC 7766 §5).
pub fn truncated_response(q: &Query<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + q.question.len() + 11);
    let ar = u16::from(q.edns.is_some());
    push_header(&mut out, q, RCODE_NOERROR, false, true, [1, 0, 0, ar]);
    out.extend_from_slice(q.question);
    push_opt(&mut out, q);
    out
}

/// FORMERR/NOTIMP for a packet whose question could not be read: header only.
pub fn header_only_error(pkt: &[u8], rcode: u8) -> Option<Vec<u8>> {
    if pkt.len() < HEADER_LEN {
        return None;
    }
    let mut out = vec![0u8; HEADER_LEN];
    out[0] = pkt[0];
    out[1] = pkt[1];
    out[2] = 0x80 | (pkt[2] & 0x79); // QR=1, opcode and RD copied
    out[3] = 0x80 | (rcode & 0x0F);
    Some(out)
}

/// Host-record answer: every address of the query's family, owner name compressed
/// to the question (pointer 0xC00C). Other types of a known name get NODATA.
pub fn hosts_response(q: &Query<'_>, addrs: &[IpAddr], ttl: u32) -> Vec<u8> {
    let matching = addrs.iter().filter(|a| match a {
        IpAddr::V4(_) => q.qtype == TYPE_A,
        IpAddr::V6(_) => q.qtype == TYPE_AAAA,
    });
    let count = matching.clone().count().min(usize::from(u16::MAX)) as u16;
    let mut out = Vec::with_capacity(HEADER_LEN + q.question.len() + usize::from(count) * 28 + 11);
    let ar = u16::from(q.edns.is_some());
    // AA like dnsmasq does for /etc/hosts names: we are the source of these records.
    push_header(&mut out, q, RCODE_NOERROR, true, false, [1, count, 0, ar]);
    out.extend_from_slice(q.question);
    for a in matching.take(usize::from(count)) {
        out.extend_from_slice(&[0xC0, 0x0C]);
        let (t, rdata): (u16, &[u8]) = match a {
            IpAddr::V4(v4) => (TYPE_A, &v4.octets()[..]),
            IpAddr::V6(v6) => (TYPE_AAAA, &v6.octets()[..]),
        };
        out.extend_from_slice(&t.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&(rdata.len() as u16).to_be_bytes()); // 4 or 16
        out.extend_from_slice(rdata);
    }
    push_opt(&mut out, q);
    out
}

/// A wire query for `name`/`qtype` with RD set (health checks).
pub fn build_query(id: u16, name_wire: &[u8], qtype: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + name_wire.len() + 4);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(name_wire);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out
}

/// What the cache needs to know about an upstream response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseInfo {
    pub id: u16,
    pub rcode: u8,
    pub truncated: bool,
    /// Bytes `12..question_end` are the question.
    pub question_end: usize,
    /// Offsets of every TTL field except OPT's (whose "TTL" carries flags).
    pub ttl_offsets: Vec<u16>,
    /// How long the response may be cached; 0 = not cacheable.
    pub cache_ttl: u32,
}

/// Scans a response. `None` when it is not a well-formed single-question response.
pub fn scan_response(b: &[u8]) -> Option<ResponseInfo> {
    if b.len() < HEADER_LEN || b.len() > usize::from(u16::MAX) || b[2] & 0x80 == 0 {
        return None;
    }
    let id = u16::from_be_bytes([b[0], b[1]]);
    let truncated = b[2] & 0x02 != 0;
    let rcode = b[3] & 0x0F;
    let qd = u16_at(b, 4)?;
    let an = u16_at(b, 6)?;
    let ns = u16_at(b, 8)?;
    let ar = u16_at(b, 10)?;
    if qd != 1 {
        return None;
    }
    let question_end = read_plain_name(b, HEADER_LEN)? + 4;
    if question_end > b.len() {
        return None;
    }
    let mut at = question_end;
    let mut ttl_offsets = Vec::with_capacity(usize::from(an) + usize::from(ns) + usize::from(ar));
    let mut min_answer_ttl: Option<u32> = None;
    let mut negative_ttl: Option<u32> = None;
    for i in 0..(u32::from(an) + u32::from(ns) + u32::from(ar)) {
        let r = read_record(b, at)?;
        if r.rtype != TYPE_OPT {
            ttl_offsets.push(u16::try_from(r.ttl_at).ok()?);
            let ttl = u32_at(b, r.ttl_at)?;
            if i < u32::from(an) {
                min_answer_ttl = Some(min_answer_ttl.map_or(ttl, |m| m.min(ttl)));
            } else if i < u32::from(an) + u32::from(ns) && r.rtype == TYPE_SOA && r.rdlen >= 20 {
                // RFC 2308 §5: negative TTL = min(SOA TTL, SOA MINIMUM); MINIMUM is
                // the last 32 bits of the SOA rdata.
                let minimum = u32_at(b, r.rdata_at + r.rdlen - 4)?;
                negative_ttl = Some(ttl.min(minimum));
            }
        }
        at = r.end;
    }
    let cache_ttl = if truncated {
        0
    } else {
        match rcode {
            RCODE_NOERROR if an > 0 => min_answer_ttl.unwrap_or(0),
            RCODE_NOERROR | RCODE_NXDOMAIN => negative_ttl.unwrap_or(0),
            _ => 0,
        }
    };
    Some(ResponseInfo {
        id,
        rcode,
        truncated,
        question_end,
        ttl_offsets,
        cache_ttl,
    })
}

/// Whether two questions (wire bytes, name + type + class) are the same query,
/// comparing the name case-insensitively.
pub fn same_question(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.eq_ignore_ascii_case(b)
}

/// Response code of a response packet (0..=15; extended rcodes are ignored).
pub fn rcode(b: &[u8]) -> Option<u8> {
    b.get(3).map(|x| x & 0x0F)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query as HQuery, ResponseCode};
    use hickory_proto::rr::rdata::{A, SOA};
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    fn query_bytes(name: &str, rt: RecordType, edns: Option<(u16, bool)>) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 0x1234;
        m.metadata.recursion_desired = true;
        m.add_query(HQuery::query(Name::from_ascii(name).unwrap(), rt));
        if let Some((size, dok)) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            e.set_dnssec_ok(dok);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    #[test]
    fn parses_query_with_edns() {
        let b = query_bytes("Www.Example.COM.", RecordType::AAAA, Some((4096, true)));
        let q = parse_query(&b).unwrap();
        assert_eq!(q.id, 0x1234);
        assert_eq!(q.qtype, TYPE_AAAA);
        assert_eq!(q.qclass, CLASS_IN);
        assert!(q.recursion_desired());
        assert_eq!(
            q.edns,
            Some(EdnsInfo {
                udp_size: 4096,
                dnssec_ok: true
            })
        );
        assert_eq!(q.udp_limit(), 4096);
        assert_eq!(q.qname, &b"\x03Www\x07Example\x03COM\x00"[..]);
    }

    #[test]
    fn rejects_bad_packets() {
        assert_eq!(parse_query(&[0; 5]), Err(ParseError::TooShort));
        let mut b = query_bytes("a.", RecordType::A, None);
        b[2] |= 0x80;
        assert_eq!(parse_query(&b), Err(ParseError::IsResponse));
        let mut b = query_bytes("a.", RecordType::A, None);
        b[2] |= 2 << 3; // opcode STATUS
        assert_eq!(
            parse_query(&b),
            Err(ParseError::NotImplemented { id: 0x1234 })
        );
        let b = query_bytes("a.", RecordType::A, None);
        assert_eq!(
            parse_query(&b[..b.len() - 1]),
            Err(ParseError::Malformed { id: 0x1234 })
        );
        let mut b = query_bytes("a.", RecordType::A, None);
        b[5] = 2; // qdcount 2
        assert_eq!(parse_query(&b), Err(ParseError::Malformed { id: 0x1234 }));
        let mut b = query_bytes("a.", RecordType::A, None);
        b[12] = 0xC0; // compressed question
        assert_eq!(parse_query(&b), Err(ParseError::Malformed { id: 0x1234 }));
    }

    #[test]
    fn hosts_response_decodes_with_hickory() {
        let b = query_bytes("db.Example.com.", RecordType::A, Some((1232, false)));
        let q = parse_query(&b).unwrap();
        let addrs: Vec<IpAddr> = vec![
            "10.0.0.1".parse().unwrap(),
            "fd00::1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
        ];
        let resp = Message::from_vec(&hosts_response(&q, &addrs, 0)).unwrap();
        assert_eq!(resp.metadata.id, 0x1234);
        assert_eq!(resp.metadata.message_type, MessageType::Response);
        assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
        assert_eq!(resp.answers.len(), 2);
        assert_eq!(resp.answers[1].data, RData::A(A::new(10, 0, 0, 2)));
        assert_eq!(
            resp.answers[0].name,
            Name::from_ascii("db.Example.com.").unwrap()
        );
        assert!(resp.edns.is_some());
        let err = Message::from_vec(&empty_response(&q, RCODE_SERVFAIL)).unwrap();
        assert_eq!(err.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(err.queries.len(), 1);
        let tc = Message::from_vec(&truncated_response(&q)).unwrap();
        assert!(tc.metadata.truncation);
    }

    fn response_with(
        rcode: ResponseCode,
        answers: &[(u32, [u8; 4])],
        soa: Option<(u32, u32)>,
    ) -> Vec<u8> {
        let name = Name::from_ascii("x.example.").unwrap();
        let mut m = Message::new(7, MessageType::Response, OpCode::Query);
        m.metadata.response_code = rcode;
        m.add_query(HQuery::query(name.clone(), RecordType::A));
        for (ttl, ip) in answers {
            m.add_answer(Record::from_rdata(
                name.clone(),
                *ttl,
                RData::A(A::from(std::net::Ipv4Addr::from(*ip))),
            ));
        }
        if let Some((ttl, minimum)) = soa {
            let soa = SOA::new(
                Name::from_ascii("ns.example.").unwrap(),
                Name::from_ascii("host.example.").unwrap(),
                1,
                3600,
                600,
                86400,
                minimum,
            );
            m.add_authority(Record::from_rdata(
                Name::from_ascii("example.").unwrap(),
                ttl,
                RData::SOA(soa),
            ));
        }
        m.set_edns(Edns::new());
        m.to_vec().unwrap()
    }

    #[test]
    fn scan_positive_and_negative_ttls() {
        let b = response_with(
            ResponseCode::NoError,
            &[(300, [1, 2, 3, 4]), (60, [1, 2, 3, 5])],
            None,
        );
        let info = scan_response(&b).unwrap();
        assert_eq!(info.cache_ttl, 60);
        assert_eq!(info.ttl_offsets.len(), 2);
        assert_eq!(u32_at(&b, usize::from(info.ttl_offsets[0])), Some(300));

        // RFC 2308: min(SOA TTL, MINIMUM)
        let b = response_with(ResponseCode::NXDomain, &[], Some((900, 120)));
        assert_eq!(scan_response(&b).unwrap().cache_ttl, 120);
        let b = response_with(ResponseCode::NoError, &[], Some((30, 120)));
        assert_eq!(scan_response(&b).unwrap().cache_ttl, 30);
        // no SOA: not cacheable
        let b = response_with(ResponseCode::NXDomain, &[], None);
        assert_eq!(scan_response(&b).unwrap().cache_ttl, 0);
        let b = response_with(ResponseCode::ServFail, &[], None);
        assert_eq!(scan_response(&b).unwrap().cache_ttl, 0);
        // truncated: not cacheable
        let mut b = response_with(ResponseCode::NoError, &[(300, [1, 2, 3, 4])], None);
        b[2] |= 0x02;
        assert_eq!(scan_response(&b).unwrap().cache_ttl, 0);
        assert!(scan_response(&b[..b.len() - 3]).is_none());
    }

    #[test]
    fn name_to_wire_validates() {
        assert_eq!(
            name_to_wire("DB.example.com.").unwrap(),
            b"\x02db\x07example\x03com\x00".to_vec()
        );
        assert!(name_to_wire("a..b").is_none());
        assert!(name_to_wire(&"a".repeat(64)).is_none());
        assert!(name_to_wire(&["abc"; 70].join(".")).is_none());
    }
}
