//! What a decoded batch does to table `inet meduza`, in the ruleset's own terms: the
//! kernel semantics `FakeNft` needs (a batch applies whole or not at all; `add table`
//! of an existing table is a no-op; `delete table` of an absent one fails; a set of
//! the same name and another type is refused) and the reading of kernel expressions
//! back into [`RuleMatch`]es and [`RuleAction`]s, so a unit test can compare what the
//! kernel would receive with [`TableModel::of`] the ruleset that was encoded.
//!
//! Must not: do I/O, or model more than our encoder sends (anything else is an
//! error, so an encoder change that the model does not know fails the unit tests).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Subnets, Ipv6Subnets};
use serde_json::Value;

use super::super::ruleset::{
    chain_object, rule_object, set_object, Family, RejectWith, RuleAction, RuleMatch, Ruleset,
    SetElem, SetKind, CHAIN, CHAIN_HIJACK, DSTNAT_PRIORITY, L4, MANGLE_PRIORITY, SET_BYPASS_DST4,
    SET_BYPASS_DST6, SET_DOH_DST4, SET_DOH_DST6, SET_EXCLUDE_IFACES, SET_EXCLUDE_PORTS,
    SET_EXCLUDE_SRC4, SET_EXCLUDE_SRC6, SET_FAKE_DST4, SET_FAKE_DST6, SET_PROXY_SRC4,
    SET_PROXY_SRC6, TABLE,
};
use super::consts::*;
use super::decode::{DecodeError, ElemMsg, ExprMsg, NftMessage};

/// The names of our sets (`RuleMatch` holds them as `&'static str`).
const SET_NAMES: [&str; 12] = [
    SET_PROXY_SRC4,
    SET_PROXY_SRC6,
    SET_BYPASS_DST4,
    SET_BYPASS_DST6,
    SET_EXCLUDE_SRC4,
    SET_EXCLUDE_SRC6,
    SET_EXCLUDE_IFACES,
    SET_EXCLUDE_PORTS,
    SET_DOH_DST4,
    SET_DOH_DST6,
    SET_FAKE_DST4,
    SET_FAKE_DST6,
];

/// A named set of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetModel {
    pub name: String,
    pub kind: SetKind,
    pub elements: Vec<SetElem>,
}

/// A rule of the table, its expressions read back into our terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleModel {
    pub chain: String,
    pub comment: String,
    pub matches: Vec<RuleMatch>,
    pub action: RuleAction,
}

/// Table `inet meduza` as the kernel holds it after the batches applied so far.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TableModel {
    /// Named sets, in creation order.
    pub sets: Vec<SetModel>,
    /// Base chains, in creation order.
    pub chains: Vec<String>,
    /// Rules, in chain order.
    pub rules: Vec<RuleModel>,
}

impl TableModel {
    /// What a kernel holds after the create batch of `rs`.
    pub fn of(rs: &Ruleset) -> Self {
        let mut chains = vec![CHAIN.to_string()];
        if !rs.hijack.is_empty() {
            chains.push(CHAIN_HIJACK.to_string());
        }
        let rules = (rs.rules.iter().map(|r| (CHAIN, r)))
            .chain(rs.hijack.iter().map(|r| (CHAIN_HIJACK, r)))
            .map(|(chain, r)| RuleModel {
                chain: chain.to_string(),
                comment: r.comment.to_string(),
                matches: r.matches.clone(),
                action: r.action.clone(),
            })
            .collect();
        Self {
            sets: rs
                .sets
                .iter()
                .map(|s| SetModel {
                    name: s.name.to_string(),
                    kind: s.kind,
                    elements: s.elements.clone(),
                })
                .collect(),
            chains,
            rules,
        }
    }

    /// The table as `nft -j list table inet meduza` prints it (handles numbered from
    /// 1 in creation order).
    pub fn listing(&self) -> Value {
        let mut objs = vec![serde_json::json!({"table": {"family": "inet", "name": TABLE}})];
        let listed = (self.sets.iter())
            .map(|s| set_object(&s.name, s.kind, &s.elements))
            .chain(self.chains.iter().map(|c| chain_object(c)))
            .chain(
                (self.rules.iter())
                    .map(|r| rule_object(&r.chain, &r.comment, &r.matches, &r.action)),
            );
        for o in listed {
            // Our own schema values always serialise.
            objs.push(serde_json::to_value(&o).unwrap_or(Value::Null));
        }
        for (handle, o) in (1u32..).zip(objs.iter_mut()) {
            if let Some(Value::Object(inner)) =
                o.as_object_mut().and_then(|m| m.values_mut().next())
            {
                inner.insert("handle".into(), Value::from(handle));
            }
        }
        objs.insert(
            0,
            serde_json::json!({"metainfo": {"version": "fake", "json_schema_version": 1}}),
        );
        serde_json::json!({ "nftables": objs })
    }
}

fn err(reason: impl Into<String>) -> DecodeError {
    DecodeError(reason.into())
}

/// A set created in the batch being applied; its elements are read at the end (an
/// interval's start and end may come in different messages).
struct NewSet {
    name: String,
    id: u32,
    anonymous: bool,
    key_type: u32,
    kind: Option<SetKind>,
    elems: Vec<ElemMsg>,
}

/// Apply one decoded batch to `table` (`None`: the table does not exist). On error
/// `table` may be half-changed: apply to a copy and keep it only on success.
pub fn apply(table: &mut Option<TableModel>, msgs: &[NftMessage]) -> Result<(), DecodeError> {
    let mut new_sets: Vec<NewSet> = Vec::new();
    for (i, msg) in msgs.iter().enumerate() {
        let what = format!("message {}", i + 1);
        if msg.table() != TABLE {
            return Err(err(format!("{what}: names foreign table {}", msg.table())));
        }
        if !matches!(
            msg,
            NftMessage::NewTable { .. } | NftMessage::DelTable { .. }
        ) && table.is_none()
        {
            return Err(err(format!("{what}: table absent (ENOENT)")));
        }
        match msg {
            NftMessage::NewTable { flags, .. } => {
                if *flags != 0 {
                    return Err(err(format!("{what}: table flags {flags} not modelled")));
                }
                table.get_or_insert_with(TableModel::default);
            }
            NftMessage::DelTable { .. } => {
                if table.take().is_none() {
                    return Err(err(format!("{what}: delete of absent table (ENOENT)")));
                }
                new_sets.clear();
            }
            NftMessage::NewChain {
                name,
                kind,
                hook,
                priority,
                policy,
                ..
            } => {
                let ours = match name.as_str() {
                    CHAIN => ("filter", MANGLE_PRIORITY),
                    CHAIN_HIJACK => ("nat", DSTNAT_PRIORITY),
                    _ => return Err(err(format!("{what}: chain {name} not ours"))),
                };
                if (kind.as_str(), *priority) != ours
                    || *hook != HOOK_PREROUTING
                    || *policy != NF_ACCEPT as u32
                {
                    return Err(err(format!("{what}: chain {name} not as we create it")));
                }
                let chains = &mut table.get_or_insert_with(TableModel::default).chains;
                if !chains.contains(name) {
                    chains.push(name.clone());
                }
            }
            NftMessage::NewSet {
                name,
                id,
                flags,
                key_type,
                key_len,
                size,
                key_byteorder,
                ..
            } => {
                let anonymous = flags & NFT_SET_ANONYMOUS != 0;
                let kind = if anonymous {
                    if name != ANON_SET_NAME
                        || *flags != NFT_SET_ANONYMOUS | NFT_SET_CONSTANT
                        || size.is_none()
                        || key_byteorder.is_some()
                    {
                        return Err(err(format!("{what}: anonymous set not as nft sends it")));
                    }
                    None
                } else {
                    let kind = set_kind(*key_type, *key_len, *flags, *key_byteorder)
                        .ok_or_else(|| err(format!("{what}: set {name}: type not modelled")))?;
                    let existing = (table.iter().flat_map(|t| t.sets.iter()))
                        .map(|s| (&s.name, Some(s.kind)))
                        .chain(new_sets.iter().map(|s| (&s.name, s.kind)))
                        .find(|(n, _)| *n == name);
                    match existing {
                        Some((_, k)) if k != Some(kind) => {
                            return Err(err(format!("{what}: set {name} exists (EEXIST)")))
                        }
                        Some(_) => return Err(err(format!("{what}: re-adding set {name}"))),
                        None => Some(kind),
                    }
                };
                if new_sets.iter().any(|s| s.id == *id) {
                    return Err(err(format!("{what}: set ID {id} used twice")));
                }
                new_sets.push(NewSet {
                    name: name.clone(),
                    id: *id,
                    anonymous,
                    key_type: *key_type,
                    kind,
                    elems: Vec::new(),
                });
            }
            NftMessage::NewSetElem {
                set, set_id, elems, ..
            } => {
                let target = new_sets
                    .iter_mut()
                    .find(|s| s.name == *set && Some(s.id) == *set_id)
                    .ok_or_else(|| err(format!("{what}: elements for unknown set {set}")))?;
                target.elems.extend(elems.iter().cloned());
            }
            NftMessage::NewRule {
                chain,
                exprs,
                comment,
                ..
            } => {
                let t = table.get_or_insert_with(TableModel::default);
                if !t.chains.contains(chain) {
                    return Err(err(format!("{what}: chain {chain} absent (ENOENT)")));
                }
                let (matches, action) = rule_of(exprs, &new_sets, &t.sets)
                    .map_err(|e| err(format!("{what}: {}", e.0)))?;
                let comment = comment
                    .clone()
                    .ok_or_else(|| err(format!("{what}: rule without comment")))?;
                t.rules.push(RuleModel {
                    chain: chain.clone(),
                    comment,
                    matches,
                    action,
                });
            }
        }
    }
    for s in new_sets {
        let Some(kind) = s.kind else {
            continue; // anonymous: its keys were read by the rule that uses it
        };
        let elements =
            elements(kind, &s.elems).map_err(|e| err(format!("set {}: {}", s.name, e.0)))?;
        if let Some(t) = table.as_mut() {
            t.sets.push(SetModel {
                name: s.name,
                kind,
                elements,
            });
        }
    }
    Ok(())
}

/// The kind of a named set as we create it (key type and length, flags, and the
/// key byte order user data only for interface names).
fn set_kind(key_type: u32, key_len: u32, flags: u32, order: Option<u32>) -> Option<SetKind> {
    let (kind, len, f, o) = match key_type {
        TYPE_IPADDR => (SetKind::Ipv4Addr, 4, NFT_SET_INTERVAL, None),
        TYPE_IP6ADDR => (SetKind::Ipv6Addr, 16, NFT_SET_INTERVAL, None),
        TYPE_IFNAME => (
            SetKind::Ifname,
            IFNAMSIZ as u32,
            0,
            Some(BYTEORDER_HOST_ENDIAN),
        ),
        TYPE_INET_SERVICE => (SetKind::InetService, 2, 0, None),
        _ => return None,
    };
    ((key_len, flags, order) == (len, f, o)).then_some(kind)
}

fn addr_of(key: &[u8], family: Family) -> Option<u128> {
    match family {
        Family::V4 => <[u8; 4]>::try_from(key)
            .ok()
            .map(|b| u128::from(u32::from_be_bytes(b))),
        Family::V6 => <[u8; 16]>::try_from(key).ok().map(u128::from_be_bytes),
    }
}

/// The prefixes of an interval set: a start, then an end one past the interval
/// flagged `NFT_SET_ELEM_INTERVAL_END`; an end with no start (nft's leading one at 0)
/// closes nothing; a start with no end runs to the top of the space.
fn intervals(family: Family, elems: &[ElemMsg]) -> Result<Vec<IpNet>, DecodeError> {
    let max = match family {
        Family::V4 => u128::from(u32::MAX),
        Family::V6 => u128::MAX,
    };
    let mut ranges = Vec::new();
    let mut start: Option<u128> = None;
    for e in elems {
        let key = addr_of(&e.key, family).ok_or_else(|| err("key of the wrong length"))?;
        match (e.end, start.take()) {
            (true, Some(lo)) if key > lo => ranges.push((lo, key - 1)),
            (true, Some(_)) => return Err(err("interval end before its start")),
            (true, None) => {}
            (false, Some(_)) => return Err(err("interval start without an end")),
            (false, None) => start = Some(key),
        }
    }
    if let Some(lo) = start {
        ranges.push((lo, max));
    }
    let mut out = Vec::new();
    for (lo, hi) in ranges {
        match family {
            Family::V4 => out.extend(
                Ipv4Subnets::new(Ipv4Addr::from(lo as u32), Ipv4Addr::from(hi as u32), 0)
                    .map(IpNet::V4),
            ),
            Family::V6 => out
                .extend(Ipv6Subnets::new(Ipv6Addr::from(lo), Ipv6Addr::from(hi), 0).map(IpNet::V6)),
        }
    }
    Ok(out)
}

fn elements(kind: SetKind, elems: &[ElemMsg]) -> Result<Vec<SetElem>, DecodeError> {
    match kind {
        SetKind::Ipv4Addr => Ok(intervals(Family::V4, elems)?
            .into_iter()
            .map(SetElem::Net)
            .collect()),
        SetKind::Ipv6Addr => Ok(intervals(Family::V6, elems)?
            .into_iter()
            .map(SetElem::Net)
            .collect()),
        SetKind::Ifname => elems
            .iter()
            .map(|e| match e.key.split(|b| *b == 0).next() {
                Some(name) if e.key.len() == IFNAMSIZ && !e.end && !name.is_empty() => {
                    Ok(SetElem::Name(String::from_utf8_lossy(name).into_owned()))
                }
                _ => Err(err("interface name key not 16 bytes")),
            })
            .collect(),
        SetKind::InetService => elems
            .iter()
            .map(|e| match <[u8; 2]>::try_from(e.key.as_slice()) {
                Ok(p) if !e.end => Ok(SetElem::Port(u16::from_be_bytes(p))),
                _ => Err(err("port key not 2 bytes")),
            })
            .collect(),
    }
}

/// The keys of the anonymous set a lookup names (created in the same batch, by ID).
fn anon_keys<'a>(
    new_sets: &'a [NewSet],
    set: &str,
    id: Option<u32>,
    key_type: u32,
) -> Result<Vec<&'a [u8]>, DecodeError> {
    new_sets
        .iter()
        .find(|s| s.anonymous && s.name == set && Some(s.id) == id && s.key_type == key_type)
        .map(|s| s.elems.iter().map(|e| e.key.as_slice()).collect())
        .ok_or_else(|| err(format!("lookup of unknown anonymous set {set} {id:?}")))
}

/// A named set a lookup names, created in this batch or before, by name.
fn named(
    new_sets: &[NewSet],
    existing: &[SetModel],
    set: &str,
    kind: &[SetKind],
) -> Result<&'static str, DecodeError> {
    let found = (new_sets.iter())
        .filter(|s| !s.anonymous)
        .map(|s| (s.name.as_str(), s.kind))
        .chain(existing.iter().map(|s| (s.name.as_str(), Some(s.kind))))
        .find(|(n, _)| *n == set);
    match found {
        Some((_, Some(k))) if kind.contains(&k) => SET_NAMES
            .iter()
            .copied()
            .find(|n| *n == set)
            .ok_or_else(|| err(format!("set {set} is not one of ours"))),
        Some(_) => Err(err(format!(
            "lookup of set {set} with a key of another type"
        ))),
        None => Err(err(format!("lookup of absent set {set} (ENOENT)"))),
    }
}

fn names<T: PartialEq + Copy>(
    table: &[(&'static str, T)],
    keys: &[&[u8]],
    value: impl Fn(&[u8]) -> Option<T>,
) -> Result<Vec<&'static str>, DecodeError> {
    keys.iter()
        .map(|k| {
            value(k)
                .and_then(|v| table.iter().find(|(_, t)| *t == v).map(|(n, _)| *n))
                .ok_or_else(|| err(format!("unknown anonymous set key {k:?}")))
        })
        .collect()
}

fn l4_of(data: &[u8]) -> Option<L4> {
    match data {
        [IPPROTO_TCP] => Some(L4::Tcp),
        [IPPROTO_UDP] => Some(L4::Udp),
        _ => None,
    }
}

/// Read a rule's expressions back into matches and an action: the inverse of the
/// encoder's `match_exprs` and `action_exprs`, register by register.
fn rule_of(
    exprs: &[ExprMsg],
    new_sets: &[NewSet],
    existing: &[SetModel],
) -> Result<(Vec<RuleMatch>, RuleAction), DecodeError> {
    use ExprMsg::*;
    const EQ: u32 = NFT_CMP_EQ;
    const R1: u32 = REG_1;
    const NH: u32 = NFT_PAYLOAD_NETWORK_HEADER;
    const TH: u32 = NFT_PAYLOAD_TRANSPORT_HEADER;
    let addr_sets = [SetKind::Ipv4Addr, SetKind::Ipv6Addr];
    let mut matches = Vec::new();
    let mut rest = exprs;
    let action = loop {
        let (m, tail) = match rest {
            [Ct {
                key: NFT_CT_DIRECTION,
                dreg: R1,
            }, Cmp {
                sreg: R1,
                op: EQ,
                data,
            }, tail @ ..]
                if data.as_slice() == [CT_DIR_REPLY] =>
            {
                (RuleMatch::CtDirectionReply, tail)
            }
            [Fib {
                result: NFT_FIB_RESULT_ADDRTYPE,
                flags: NFTA_FIB_F_DADDR,
                dreg: R1,
            }, Lookup { set, id, sreg: R1 }, tail @ ..] => {
                let keys = anon_keys(new_sets, set, *id, TYPE_FIB_ADDR)?;
                let types = names(&RTN_TYPES, &keys, |k| {
                    <[u8; 4]>::try_from(k).ok().map(u32::from_ne_bytes)
                })?;
                (RuleMatch::FibDaddrType(types), tail)
            }
            [Meta {
                key: NFT_META_PKTTYPE,
                dreg: R1,
            }, Lookup { set, id, sreg: R1 }, tail @ ..] => {
                let keys = anon_keys(new_sets, set, *id, TYPE_PKTTYPE)?;
                let types = names(&PKT_TYPES, &keys, |k| match k {
                    [b] => Some(*b),
                    _ => None,
                })?;
                (RuleMatch::PktType(types), tail)
            }
            [Meta {
                key: NFT_META_NFPROTO,
                dreg: R1,
            }, Cmp {
                sreg: R1,
                op: EQ,
                data: proto,
            }, Payload {
                base: NH,
                offset,
                len,
                dreg: R1,
            }, Lookup { set, sreg: R1, .. }, tail @ ..] => {
                let set = named(new_sets, existing, set, &addr_sets)?;
                let m = match (proto.as_slice(), offset, len) {
                    ([NFPROTO_IPV4], 12, 4) => RuleMatch::SaddrInSet(Family::V4, set),
                    ([NFPROTO_IPV4], 16, 4) => RuleMatch::DaddrInSet(Family::V4, set),
                    ([NFPROTO_IPV6], 8, 16) => RuleMatch::SaddrInSet(Family::V6, set),
                    ([NFPROTO_IPV6], 24, 16) => RuleMatch::DaddrInSet(Family::V6, set),
                    _ => return Err(err("address match not modelled")),
                };
                (m, tail)
            }
            [Meta {
                key: NFT_META_IIFNAME,
                dreg: R1,
            }, Lookup { set, sreg: R1, .. }, tail @ ..] => {
                let set = named(new_sets, existing, set, &[SetKind::Ifname])?;
                (RuleMatch::IifnameInSet(set), tail)
            }
            [Meta {
                key: NFT_META_L4PROTO,
                dreg: R1,
            }, Lookup { set, id, sreg: R1 }, tail @ ..] => {
                let keys = anon_keys(new_sets, set, *id, TYPE_INET_PROTOCOL)?;
                if keys != [[IPPROTO_TCP].as_slice(), [IPPROTO_UDP].as_slice()] {
                    return Err(err(format!("l4proto set {keys:?} not modelled")));
                }
                (RuleMatch::L4protoTcpUdp, tail)
            }
            [Payload {
                base: TH,
                offset,
                len: 2,
                dreg: R1,
            }, Lookup { set, sreg: R1, .. }, tail @ ..] => {
                let set = named(new_sets, existing, set, &[SetKind::InetService])?;
                let m = match offset {
                    2 => RuleMatch::ThDportInSet(set),
                    0 => RuleMatch::ThSportInSet(set),
                    _ => return Err(err("transport header match not modelled")),
                };
                (m, tail)
            }
            [Meta {
                key: NFT_META_L4PROTO,
                dreg: R1,
            }, Cmp {
                sreg: R1,
                op: EQ,
                data: proto,
            }, Payload {
                base: TH,
                offset: 2,
                len: 2,
                dreg: R1,
            }, Cmp {
                sreg: R1,
                op: EQ,
                data: port,
            }, tail @ ..] => {
                let l4 = l4_of(proto).ok_or_else(|| err("l4proto not tcp or udp"))?;
                let port =
                    <[u8; 2]>::try_from(port.as_slice()).map_err(|_| err("port not 2 bytes"))?;
                (RuleMatch::Dport(l4, u16::from_be_bytes(port)), tail)
            }
            [Meta {
                key: NFT_META_L4PROTO,
                dreg: R1,
            }, Cmp {
                sreg: R1,
                op: EQ,
                data: proto,
            }, tail @ ..] => {
                let l4 = l4_of(proto).ok_or_else(|| err("l4proto not tcp or udp"))?;
                (RuleMatch::L4proto(l4), tail)
            }
            action => break action_of(action)?,
        };
        matches.push(m);
        rest = tail;
    };
    Ok((matches, action))
}

fn action_of(exprs: &[ExprMsg]) -> Result<RuleAction, DecodeError> {
    use ExprMsg::*;
    const R1: u32 = REG_1;
    const R2: u32 = REG_2;
    Ok(match exprs {
        [Verdict(NFT_RETURN)] => RuleAction::Return,
        [Immediate {
            dreg: R1,
            data: addr,
        }, Immediate {
            dreg: R2,
            data: port,
        }, Tproxy {
            family,
            reg_addr: R1,
            reg_port: R2,
        }, Immediate {
            dreg: R1,
            data: mark,
        }, MetaSet {
            key: NFT_META_MARK,
            sreg: R1,
        }, Verdict(NF_ACCEPT)] => {
            let (family, addr) = match (u8::try_from(*family), addr.len()) {
                (Ok(NFPROTO_IPV4), 4) => {
                    let b: [u8; 4] = addr.as_slice().try_into().unwrap_or_default();
                    (Family::V4, IpAddr::from(b))
                }
                (Ok(NFPROTO_IPV6), 16) => {
                    let b: [u8; 16] = addr.as_slice().try_into().unwrap_or_default();
                    (Family::V6, IpAddr::from(b))
                }
                _ => return Err(err("tproxy family and address do not agree")),
            };
            let port = <[u8; 2]>::try_from(port.as_slice()).map_err(|_| err("tproxy port"))?;
            let mark = <[u8; 4]>::try_from(mark.as_slice()).map_err(|_| err("mark"))?;
            RuleAction::Tproxy {
                family,
                addr,
                port: u16::from_be_bytes(port),
                mark: u32::from_ne_bytes(mark),
            }
        }
        [Immediate {
            dreg: R1,
            data: port,
        }, Redir {
            reg_proto_min: R1,
            flags: NF_NAT_RANGE_PROTO_SPECIFIED,
        }] => {
            let port = <[u8; 2]>::try_from(port.as_slice()).map_err(|_| err("redirect port"))?;
            RuleAction::Redirect {
                port: u16::from_be_bytes(port),
            }
        }
        [Reject {
            kind: NFT_REJECT_TCP_RST,
            code: 0,
        }] => RuleAction::Reject(RejectWith::TcpReset),
        [Reject {
            kind: NFT_REJECT_ICMPX_UNREACH,
            code: NFT_REJECT_ICMPX_PORT_UNREACH,
        }] => RuleAction::Reject(RejectWith::IcmpxPortUnreachable),
        other => return Err(err(format!("expressions {other:?} not modelled"))),
    })
}
