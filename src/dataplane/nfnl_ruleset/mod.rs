//! The nf_tables netlink encoding of our [`Ruleset`]: the create, replace and delete
//! transactions of table `inet meduza` as one batch each.
//!
//! Owns: the messages and expressions `nft -f` of
//! [`ruleset::to_text`](super::ruleset::to_text) sends (nft 1.0.6, read with
//! `nft --debug=netlink,mnl` and `strace`), so the kernel receives the same table, and
//! the user data `nft list` needs to print it the same (rule comments, the key byte
//! order of sets; docs/dataplane.md "User data"); [`decode`] reads a batch back for
//! `FakeNft` and the tests. Must not: do I/O (the batch is sent by
//! [`nfnl::send_batch`](super::nfnl::send_batch)), or name any table but ours.
//!
//! Message order follows nft: table, chain, each named set followed by its elements,
//! then each rule preceded by its anonymous sets. Set IDs (`NFTA_SET_ID`) number the
//! sets of the batch from 1 so rules and elements can refer to sets created in the
//! same transaction.

use std::net::IpAddr;

use ipnet::IpNet;

mod consts;
pub mod decode;
pub mod model;
#[cfg(test)]
mod tests;

use consts::*;
pub use decode::{decode_batch, DecodeError, NftMessage};
pub use model::{RuleModel, SetModel, TableModel};

use super::nfnl::{
    Batch, NfnlError, Writer, NFPROTO_INET, NFT_MSG_DELTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE,
    NFT_MSG_NEWSET, NFT_MSG_NEWSETELEM, NFT_MSG_NEWTABLE, NLA_F_NESTED, NLA_MAX_LEN, NLM_F_APPEND,
    NLM_F_CREATE,
};
use super::ruleset::{
    Family, NamedSet, RejectWith, RuleAction, RuleMatch, RuleSpec, Ruleset, SetElem, SetKind,
    CHAIN, CHAIN_HIJACK, L4, MANGLE_PRIORITY, TABLE,
};

/// Why a ruleset cannot be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("set {set}: interface name {name:?} longer than 15 bytes")]
    IfnameTooLong { set: &'static str, name: String },
    #[error("set {set}: element {elem:?} does not fit a {kind:?} set")]
    ElemKind {
        set: &'static str,
        kind: SetKind,
        elem: SetElem,
    },
    #[error("rule {comment:?}: unknown {what} {name:?}")]
    UnknownName {
        comment: &'static str,
        what: &'static str,
        name: &'static str,
    },
    #[error("rule {comment:?}: comment longer than 254 bytes")]
    CommentTooLong { comment: &'static str },
    #[error("rule {comment:?}: tproxy {family:?} to address {addr}")]
    TproxyFamily {
        comment: &'static str,
        family: Family,
        addr: IpAddr,
    },
    #[error(transparent)]
    Netlink(#[from] NfnlError),
}

fn l4_number(l4: L4) -> u8 {
    match l4 {
        L4::Tcp => IPPROTO_TCP,
        L4::Udp => IPPROTO_UDP,
    }
}

/// One transaction that creates the table when it does not exist yet. No `delete`:
/// a table deletion in a transaction makes the kernel wait for an RCU grace period
/// at commit (about 10 ms here), which would double the cost of a first apply.
pub fn create(rs: &Ruleset) -> Result<Batch, EncodeError> {
    let mut enc = Encoder::new();
    enc.table_objects(rs)?;
    Ok(enc.w.into_batch()?)
}

/// One transaction that makes the table exactly `rs`: add table (a no-op when it
/// exists), delete table, then the whole table again. Packets see the old or the new
/// table, never none.
pub fn replace(rs: &Ruleset) -> Result<Batch, EncodeError> {
    let mut enc = Encoder::new();
    enc.add_table();
    enc.delete_table();
    enc.table_objects(rs)?;
    Ok(enc.w.into_batch()?)
}

/// One transaction that deletes our table, valid whether or not it exists.
pub fn delete() -> Result<Batch, EncodeError> {
    let mut enc = Encoder::new();
    enc.add_table();
    enc.delete_table();
    Ok(enc.w.into_batch()?)
}

struct Encoder {
    w: Writer,
    next_set_id: u32,
    /// IDs of the named sets created so far in this batch.
    named_ids: Vec<(&'static str, u32)>,
}

/// One element of a set as sent: its key and, for interval sets, whether it closes
/// an interval (a start with no end after it runs to the top of the space).
struct Elem {
    key: Vec<u8>,
    end: bool,
}

impl Elem {
    fn key(key: Vec<u8>) -> Self {
        Self { key, end: false }
    }

    /// Encoded size inside the element list.
    fn size(&self) -> usize {
        let pad = |n: usize| (n + 3) & !3;
        4 + if self.end { 8 } else { 0 } + 4 + pad(4 + self.key.len())
    }
}

fn udata_u32(kind: u8, value: u32) -> Vec<u8> {
    let mut v = vec![kind, 4];
    v.extend_from_slice(&value.to_ne_bytes());
    v
}

/// A set reference of a lookup: the name nft gives it and its ID in this batch.
struct SetRef {
    name: &'static str,
    id: u32,
}

fn addr_key(addr: u128, family: Family) -> Vec<u8> {
    match family {
        Family::V4 => (addr as u32).to_be_bytes().to_vec(),
        Family::V6 => addr.to_be_bytes().to_vec(),
    }
}

/// The elements nft sends for an interval set of prefixes (`setelem_expr_to_range`,
/// `set_to_intervals`): a closing element at 0 when the first interval does not
/// start there, then per interval its start and its end + 1 flagged
/// `NFT_SET_ELEM_INTERVAL_END`; an interval reaching the top of the space has no end.
/// (nft also marks that start with `NFTNL_SET_ELEM_F_INTERVAL_OPEN` user data; the
/// kernel never reads it and `nft list` prints the table the same without it: not
/// sent, docs/dataplane.md "User data".)
fn interval_elems(family: Family, nets: &[IpNet]) -> Vec<Elem> {
    let max: u128 = match family {
        Family::V4 => u128::from(u32::MAX),
        Family::V6 => u128::MAX,
    };
    let bits = |a: IpAddr| match a {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    };
    let mut ranges: Vec<(u128, u128)> = nets
        .iter()
        .map(|n| (bits(n.network()), bits(n.broadcast())))
        .collect();
    ranges.sort_unstable();
    let mut out = Vec::with_capacity(ranges.len() * 2 + 1);
    if ranges.first().is_some_and(|(lo, _)| *lo != 0) {
        out.push(Elem {
            key: addr_key(0, family),
            end: true,
        });
    }
    for (lo, hi) in ranges {
        if hi == max {
            out.push(Elem::key(addr_key(lo, family)));
        } else {
            out.push(Elem::key(addr_key(lo, family)));
            out.push(Elem {
                key: addr_key(hi + 1, family),
                end: true,
            });
        }
    }
    out
}

fn set_family(kind: SetKind) -> Option<Family> {
    match kind {
        SetKind::Ipv4Addr => Some(Family::V4),
        SetKind::Ipv6Addr => Some(Family::V6),
        SetKind::Ifname | SetKind::InetService => None,
    }
}

fn named_set_elems(set: &NamedSet) -> Result<Vec<Elem>, EncodeError> {
    let wrong = |e: &SetElem| EncodeError::ElemKind {
        set: set.name,
        kind: set.kind,
        elem: e.clone(),
    };
    if let Some(family) = set_family(set.kind) {
        let nets = set
            .elements
            .iter()
            .map(|e| match (e, family) {
                (SetElem::Net(n @ IpNet::V4(_)), Family::V4)
                | (SetElem::Net(n @ IpNet::V6(_)), Family::V6) => Ok(*n),
                _ => Err(wrong(e)),
            })
            .collect::<Result<Vec<IpNet>, _>>()?;
        return Ok(interval_elems(family, &nets));
    }
    set.elements
        .iter()
        .map(|e| match (e, set.kind) {
            (SetElem::Name(n), SetKind::Ifname) => {
                if n.len() >= IFNAMSIZ {
                    return Err(EncodeError::IfnameTooLong {
                        set: set.name,
                        name: n.clone(),
                    });
                }
                let mut key = n.as_bytes().to_vec();
                key.resize(IFNAMSIZ, 0);
                Ok(Elem::key(key))
            }
            (SetElem::Port(p), SetKind::InetService) => Ok(Elem::key(p.to_be_bytes().to_vec())),
            _ => Err(wrong(e)),
        })
        .collect()
}

fn lookup_name<T: Copy>(
    table: &[(&str, T)],
    comment: &'static str,
    what: &'static str,
    name: &'static str,
) -> Result<T, EncodeError> {
    table
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .ok_or(EncodeError::UnknownName {
            comment,
            what,
            name,
        })
}

impl Encoder {
    fn new() -> Self {
        Self {
            w: Writer::batch(0),
            next_set_id: 1,
            named_ids: Vec::new(),
        }
    }

    fn add_table(&mut self) {
        self.w.message(
            NFT_MSG_NEWTABLE,
            0,
            NFPROTO_INET,
            format!("add table inet {TABLE}"),
        );
        self.w.put_str(NFTA_TABLE_NAME, TABLE);
        self.w.put_be32(NFTA_TABLE_FLAGS, 0);
        self.w.finish_message();
    }

    fn delete_table(&mut self) {
        self.w.message(
            NFT_MSG_DELTABLE,
            0,
            NFPROTO_INET,
            format!("delete table inet {TABLE}"),
        );
        self.w.put_str(NFTA_TABLE_NAME, TABLE);
        self.w.finish_message();
    }

    fn table_objects(&mut self, rs: &Ruleset) -> Result<(), EncodeError> {
        self.add_table();
        self.chain(CHAIN, "filter", MANGLE_PRIORITY as u32);
        if !rs.hijack.is_empty() {
            self.chain(CHAIN_HIJACK, "nat", DSTNAT_PRIORITY_U32);
        }
        for set in &rs.sets {
            self.named_set(set)?;
        }
        let chained = rs
            .rules
            .iter()
            .map(|r| (CHAIN, r))
            .chain(rs.hijack.iter().map(|r| (CHAIN_HIJACK, r)));
        for (i, (chain, rule)) in chained.enumerate() {
            self.rule(i + 1, chain, rule)?;
        }
        Ok(())
    }

    fn chain(&mut self, name: &'static str, kind: &'static str, priority: u32) {
        self.w.message(
            NFT_MSG_NEWCHAIN,
            NLM_F_CREATE,
            NFPROTO_INET,
            format!("add chain {name}"),
        );
        self.w.put_str(NFTA_CHAIN_TABLE, TABLE);
        self.w.put_str(NFTA_CHAIN_NAME, name);
        self.w.put_str(NFTA_CHAIN_TYPE, kind);
        self.w.put_be32(NFTA_CHAIN_POLICY, NF_ACCEPT as u32);
        let hook = self.w.nest(NFTA_CHAIN_HOOK);
        self.w.put_be32(NFTA_HOOK_HOOKNUM, HOOK_PREROUTING);
        self.w.put_be32(NFTA_HOOK_PRIORITY, priority);
        self.w.end_nest(hook);
        self.w.finish_message();
    }

    fn set_id(&mut self) -> u32 {
        let id = self.next_set_id;
        self.next_set_id += 1;
        id
    }

    fn named_set(&mut self, set: &NamedSet) -> Result<(), EncodeError> {
        let (key_type, key_len) = match set.kind {
            SetKind::Ipv4Addr => (TYPE_IPADDR, 4),
            SetKind::Ipv6Addr => (TYPE_IP6ADDR, 16),
            SetKind::Ifname => (TYPE_IFNAME, IFNAMSIZ as u32),
            SetKind::InetService => (TYPE_INET_SERVICE, 2),
        };
        let elems = named_set_elems(set)?;
        let id = self.set_id();
        self.named_ids.push((set.name, id));
        self.w.message(
            NFT_MSG_NEWSET,
            NLM_F_CREATE,
            NFPROTO_INET,
            format!("add set {}", set.name),
        );
        self.w.put_str(NFTA_SET_TABLE, TABLE);
        self.w.put_str(NFTA_SET_NAME, set.name);
        let flags = if set.kind.interval() {
            NFT_SET_INTERVAL
        } else {
            0
        };
        self.w.put_be32(NFTA_SET_FLAGS, flags);
        self.w.put_be32(NFTA_SET_KEY_TYPE, key_type);
        self.w.put_be32(NFTA_SET_KEY_LEN, key_len);
        self.w.put_be32(NFTA_SET_ID, id);
        // Without the host byte order `nft list` prints an interface name key
        // byte-swapped (`""` for "mesh0"); big-endian keys and anonymous sets list
        // the same without user data (tests/netns/dataplane_nfnl.rs; docs/dataplane.md
        // "User data").
        if set.kind == SetKind::Ifname {
            self.w.put(
                NFTA_SET_USERDATA,
                &udata_u32(UDATA_SET_KEYBYTEORDER, BYTEORDER_HOST_ENDIAN),
            );
        }
        self.w.finish_message();
        self.elements(
            &SetRef { name: set.name, id },
            &format!("set {}", set.name),
            &elems,
        );
        Ok(())
    }

    /// An anonymous constant set for one rule; returns its reference.
    fn anon_set(&mut self, rule: usize, key_type: u32, key_len: u32, elems: &[Elem]) -> SetRef {
        let id = self.set_id();
        self.w.message(
            NFT_MSG_NEWSET,
            NLM_F_CREATE,
            NFPROTO_INET,
            format!("add anonymous set of rule {rule}"),
        );
        self.w.put_str(NFTA_SET_TABLE, TABLE);
        self.w.put_str(NFTA_SET_NAME, ANON_SET_NAME);
        self.w
            .put_be32(NFTA_SET_FLAGS, NFT_SET_ANONYMOUS | NFT_SET_CONSTANT);
        self.w.put_be32(NFTA_SET_KEY_TYPE, key_type);
        self.w.put_be32(NFTA_SET_KEY_LEN, key_len);
        self.w.put_be32(NFTA_SET_ID, id);
        let desc = self.w.nest(NFTA_SET_DESC);
        self.w.put_be32(NFTA_SET_DESC_SIZE, elems.len() as u32);
        self.w.end_nest(desc);
        self.w.finish_message();
        let set = SetRef {
            name: ANON_SET_NAME,
            id,
        };
        self.elements(&set, &format!("anonymous set of rule {rule}"), elems);
        set
    }

    /// `NFT_MSG_NEWSETELEM` messages for `elems`, as many as needed: the element list
    /// is one attribute, so at most 64 KiB each. Like libnftnl, elements are numbered
    /// across the messages and the one that did not fit uses up a number.
    fn elements(&mut self, set: &SetRef, label: &str, elems: &[Elem]) {
        if elems.is_empty() {
            return;
        }
        let mut part = 1;
        let mut list = self.elem_message(set, label, part);
        let mut index: u16 = 0;
        for e in elems {
            index = index.wrapping_add(1);
            if self.w.len_since(list) + e.size() > NLA_MAX_LEN {
                self.w.end_nest(list);
                self.w.finish_message();
                part += 1;
                list = self.elem_message(set, label, part);
                index = index.wrapping_add(1);
            }
            // The element's attribute type is its number; the kernel ignores it.
            let at = self.w.nest(index & !NLA_F_NESTED);
            if e.end {
                self.w
                    .put_be32(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END);
            }
            let key = self.w.nest(NFTA_SET_ELEM_KEY);
            self.w.put(NFTA_DATA_VALUE, &e.key);
            self.w.end_nest(key);
            self.w.end_nest(at);
        }
        self.w.end_nest(list);
        self.w.finish_message();
    }

    fn elem_message(&mut self, set: &SetRef, label: &str, part: usize) -> usize {
        self.w.message(
            NFT_MSG_NEWSETELEM,
            NLM_F_CREATE,
            NFPROTO_INET,
            format!("add elements to {label} (message {part})"),
        );
        self.w.put_str(NFTA_SET_ELEM_LIST_TABLE, TABLE);
        self.w.put_str(NFTA_SET_ELEM_LIST_SET, set.name);
        self.w.put_be32(NFTA_SET_ELEM_LIST_SET_ID, set.id);
        self.w.nest(NFTA_SET_ELEM_LIST_ELEMENTS)
    }

    fn rule(&mut self, n: usize, chain: &'static str, rule: &RuleSpec) -> Result<(), EncodeError> {
        if rule.comment.len() > 254 {
            return Err(EncodeError::CommentTooLong {
                comment: rule.comment,
            });
        }
        // Anonymous sets go before the rule that uses them, in order of use.
        let mut exprs = Exprs::default();
        for m in &rule.matches {
            self.match_exprs(n, rule.comment, m, &mut exprs)?;
        }
        action_exprs(rule, &mut exprs)?;
        self.w.message(
            NFT_MSG_NEWRULE,
            NLM_F_CREATE | NLM_F_APPEND,
            NFPROTO_INET,
            format!("add rule {n} ({:?})", rule.comment),
        );
        self.w.put_str(NFTA_RULE_TABLE, TABLE);
        self.w.put_str(NFTA_RULE_CHAIN, chain);
        let list = self.w.nest(NFTA_RULE_EXPRESSIONS);
        for e in &exprs.0 {
            self.expr(e);
        }
        self.w.end_nest(list);
        let mut udata = vec![UDATA_RULE_COMMENT, (rule.comment.len() + 1) as u8];
        udata.extend_from_slice(rule.comment.as_bytes());
        udata.push(0);
        self.w.put(NFTA_RULE_USERDATA, &udata);
        self.w.finish_message();
        Ok(())
    }

    fn match_exprs(
        &mut self,
        n: usize,
        comment: &'static str,
        m: &RuleMatch,
        out: &mut Exprs,
    ) -> Result<(), EncodeError> {
        match m {
            RuleMatch::CtDirectionReply => {
                out.push(Expr::Ct {
                    key: NFT_CT_DIRECTION,
                });
                out.push(Expr::CmpEq(vec![CT_DIR_REPLY]));
            }
            RuleMatch::FibDaddrType(types) => {
                let elems = types
                    .iter()
                    .map(|t| {
                        let v = lookup_name(&RTN_TYPES, comment, "address type", t)?;
                        // fib_addr is a host-order integer.
                        Ok(Elem::key(v.to_ne_bytes().to_vec()))
                    })
                    .collect::<Result<Vec<Elem>, EncodeError>>()?;
                let set = self.anon_set(n, TYPE_FIB_ADDR, 4, &elems);
                out.push(Expr::FibDaddrType);
                out.push(Expr::Lookup(set));
            }
            RuleMatch::PktType(types) => {
                let elems = types
                    .iter()
                    .map(|t| {
                        let v = lookup_name(&PKT_TYPES, comment, "packet type", t)?;
                        Ok(Elem::key(vec![v]))
                    })
                    .collect::<Result<Vec<Elem>, EncodeError>>()?;
                let set = self.anon_set(n, TYPE_PKTTYPE, 1, &elems);
                out.push(Expr::Meta(NFT_META_PKTTYPE));
                out.push(Expr::Lookup(set));
            }
            RuleMatch::SaddrInSet(f, set) | RuleMatch::DaddrInSet(f, set) => {
                let saddr = matches!(m, RuleMatch::SaddrInSet(..));
                let (proto, offset, len) = match (f, saddr) {
                    (Family::V4, true) => (NFPROTO_IPV4, 12, 4),
                    (Family::V4, false) => (NFPROTO_IPV4, 16, 4),
                    (Family::V6, true) => (NFPROTO_IPV6, 8, 16),
                    (Family::V6, false) => (NFPROTO_IPV6, 24, 16),
                };
                // In an inet table nft guards a network-header load with the family.
                out.push(Expr::Meta(NFT_META_NFPROTO));
                out.push(Expr::CmpEq(vec![proto]));
                out.push(Expr::Payload {
                    base: NFT_PAYLOAD_NETWORK_HEADER,
                    offset,
                    len,
                });
                out.push(Expr::Lookup(self.named_ref(set)));
            }
            RuleMatch::IifnameInSet(set) => {
                out.push(Expr::Meta(NFT_META_IIFNAME));
                out.push(Expr::Lookup(self.named_ref(set)));
            }
            RuleMatch::L4protoTcpUdp => {
                let elems = [Elem::key(vec![IPPROTO_TCP]), Elem::key(vec![IPPROTO_UDP])];
                let set = self.anon_set(n, TYPE_INET_PROTOCOL, 1, &elems);
                out.push(Expr::Meta(NFT_META_L4PROTO));
                out.push(Expr::Lookup(set));
            }
            RuleMatch::ThDportInSet(set) | RuleMatch::ThSportInSet(set) => {
                let offset = if matches!(m, RuleMatch::ThDportInSet(_)) {
                    2
                } else {
                    0
                };
                out.push(Expr::Payload {
                    base: NFT_PAYLOAD_TRANSPORT_HEADER,
                    offset,
                    len: 2,
                });
                out.push(Expr::Lookup(self.named_ref(set)));
            }
            RuleMatch::L4proto(l4) => {
                out.push(Expr::Meta(NFT_META_L4PROTO));
                out.push(Expr::CmpEq(vec![l4_number(*l4)]));
            }
            RuleMatch::Dport(l4, port) => {
                out.push(Expr::Meta(NFT_META_L4PROTO));
                out.push(Expr::CmpEq(vec![l4_number(*l4)]));
                out.push(Expr::Payload {
                    base: NFT_PAYLOAD_TRANSPORT_HEADER,
                    offset: 2,
                    len: 2,
                });
                out.push(Expr::CmpEq(port.to_be_bytes().to_vec()));
            }
        }
        Ok(())
    }

    /// A named set of this batch: sets are created first, in `Ruleset::sets` order,
    /// so their IDs are known. An unknown name gets ID 0, which the kernel ignores in
    /// favour of the name (and then reports the missing set).
    fn named_ref(&self, name: &'static str) -> SetRef {
        SetRef {
            name,
            id: self
                .named_ids
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(0, |(_, id)| *id),
        }
    }

    fn expr(&mut self, e: &Expr) {
        let elem = self.w.nest(NFTA_LIST_ELEM);
        self.w.put_str(NFTA_EXPR_NAME, e.name());
        let data = self.w.nest(NFTA_EXPR_DATA);
        match e {
            Expr::Ct { key } => {
                self.w.put_be32(NFTA_CT_KEY, *key);
                self.w.put_be32(NFTA_CT_DREG, REG_1);
            }
            Expr::CmpEq(value) => {
                self.w.put_be32(NFTA_CMP_SREG, REG_1);
                self.w.put_be32(NFTA_CMP_OP, NFT_CMP_EQ);
                let d = self.w.nest(NFTA_CMP_DATA);
                self.w.put(NFTA_DATA_VALUE, value);
                self.w.end_nest(d);
            }
            Expr::FibDaddrType => {
                self.w.put_be32(NFTA_FIB_FLAGS, NFTA_FIB_F_DADDR);
                self.w.put_be32(NFTA_FIB_RESULT, NFT_FIB_RESULT_ADDRTYPE);
                self.w.put_be32(NFTA_FIB_DREG, REG_1);
            }
            Expr::Meta(key) => {
                self.w.put_be32(NFTA_META_KEY, *key);
                self.w.put_be32(NFTA_META_DREG, REG_1);
            }
            Expr::MetaSet { key, sreg } => {
                self.w.put_be32(NFTA_META_KEY, *key);
                self.w.put_be32(NFTA_META_SREG, *sreg);
            }
            Expr::Payload { base, offset, len } => {
                self.w.put_be32(NFTA_PAYLOAD_DREG, REG_1);
                self.w.put_be32(NFTA_PAYLOAD_BASE, *base);
                self.w.put_be32(NFTA_PAYLOAD_OFFSET, *offset);
                self.w.put_be32(NFTA_PAYLOAD_LEN, *len);
            }
            Expr::Lookup(set) => {
                self.w.put_be32(NFTA_LOOKUP_SREG, REG_1);
                self.w.put_str(NFTA_LOOKUP_SET, set.name);
                self.w.put_be32(NFTA_LOOKUP_SET_ID, set.id);
            }
            Expr::Immediate { dreg, value } => {
                self.w.put_be32(NFTA_IMMEDIATE_DREG, *dreg);
                let d = self.w.nest(NFTA_IMMEDIATE_DATA);
                self.w.put(NFTA_DATA_VALUE, value);
                self.w.end_nest(d);
            }
            Expr::Verdict(code) => {
                self.w.put_be32(NFTA_IMMEDIATE_DREG, REG_VERDICT);
                let d = self.w.nest(NFTA_IMMEDIATE_DATA);
                let v = self.w.nest(NFTA_DATA_VERDICT);
                self.w.put_be32(NFTA_VERDICT_CODE, *code as u32);
                self.w.end_nest(v);
                self.w.end_nest(d);
            }
            Expr::Tproxy { family } => {
                self.w.put_be32(NFTA_TPROXY_FAMILY, u32::from(*family));
                self.w.put_be32(NFTA_TPROXY_REG_ADDR, REG_1);
                self.w.put_be32(NFTA_TPROXY_REG_PORT, REG_2);
            }
            Expr::Redir => {
                self.w.put_be32(NFTA_REDIR_REG_PROTO_MIN, REG_1);
                self.w
                    .put_be32(NFTA_REDIR_FLAGS, NF_NAT_RANGE_PROTO_SPECIFIED);
            }
            Expr::Reject { kind, code } => {
                self.w.put_be32(NFTA_REJECT_TYPE, *kind);
                self.w.put(NFTA_REJECT_ICMP_CODE, &[*code]);
            }
        }
        self.w.end_nest(data);
        self.w.end_nest(elem);
    }
}

/// The expressions of one rule, in kernel form.
#[derive(Default)]
struct Exprs(Vec<Expr>);

impl Exprs {
    fn push(&mut self, e: Expr) {
        self.0.push(e);
    }
}

enum Expr {
    /// `ct load KEY => reg 1`
    Ct { key: u32 },
    /// `cmp eq reg 1 VALUE`
    CmpEq(Vec<u8>),
    /// `fib daddr type => reg 1`
    FibDaddrType,
    /// `meta load KEY => reg 1`
    Meta(u32),
    /// `meta set KEY with reg SREG`
    MetaSet { key: u32, sreg: u32 },
    /// `payload load LEN b @ BASE + OFFSET => reg 1`
    Payload { base: u32, offset: u32, len: u32 },
    /// `lookup reg 1 set NAME`
    Lookup(SetRef),
    /// `immediate reg DREG VALUE`
    Immediate { dreg: u32, value: Vec<u8> },
    /// `immediate reg 0 VERDICT`
    Verdict(i32),
    /// `tproxy FAMILY addr reg 1 port reg 2`
    Tproxy { family: u8 },
    /// `redir proto_min reg 1 flags 0x2`
    Redir,
    /// `reject type KIND code CODE`
    Reject { kind: u32, code: u8 },
}

impl Expr {
    fn name(&self) -> &'static str {
        match self {
            Expr::Ct { .. } => "ct",
            Expr::CmpEq(_) => "cmp",
            Expr::FibDaddrType => "fib",
            Expr::Meta(_) | Expr::MetaSet { .. } => "meta",
            Expr::Payload { .. } => "payload",
            Expr::Lookup(_) => "lookup",
            Expr::Immediate { .. } | Expr::Verdict(_) => "immediate",
            Expr::Tproxy { .. } => "tproxy",
            Expr::Redir => "redir",
            Expr::Reject { .. } => "reject",
        }
    }
}

fn action_exprs(rule: &RuleSpec, out: &mut Exprs) -> Result<(), EncodeError> {
    match &rule.action {
        RuleAction::Return => out.push(Expr::Verdict(NFT_RETURN)),
        RuleAction::Tproxy {
            family,
            addr,
            port,
            mark,
        } => {
            let (proto, addr_bytes) = match (family, addr) {
                (Family::V4, IpAddr::V4(a)) => (NFPROTO_IPV4, a.octets().to_vec()),
                (Family::V6, IpAddr::V6(a)) => (NFPROTO_IPV6, a.octets().to_vec()),
                _ => {
                    return Err(EncodeError::TproxyFamily {
                        comment: rule.comment,
                        family: *family,
                        addr: *addr,
                    })
                }
            };
            out.push(Expr::Immediate {
                dreg: REG_1,
                value: addr_bytes,
            });
            out.push(Expr::Immediate {
                dreg: REG_2,
                value: port.to_be_bytes().to_vec(),
            });
            out.push(Expr::Tproxy { family: proto });
            // The mark is a host-order integer.
            out.push(Expr::Immediate {
                dreg: REG_1,
                value: mark.to_ne_bytes().to_vec(),
            });
            out.push(Expr::MetaSet {
                key: NFT_META_MARK,
                sreg: REG_1,
            });
            out.push(Expr::Verdict(NF_ACCEPT));
        }
        RuleAction::Redirect { port } => {
            out.push(Expr::Immediate {
                dreg: REG_1,
                value: port.to_be_bytes().to_vec(),
            });
            out.push(Expr::Redir);
        }
        RuleAction::Reject(RejectWith::TcpReset) => out.push(Expr::Reject {
            kind: NFT_REJECT_TCP_RST,
            code: 0,
        }),
        RuleAction::Reject(RejectWith::IcmpxPortUnreachable) => out.push(Expr::Reject {
            kind: NFT_REJECT_ICMPX_UNREACH,
            code: NFT_REJECT_ICMPX_PORT_UNREACH,
        }),
    }
    Ok(())
}
