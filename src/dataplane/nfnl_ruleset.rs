//! The nf_tables netlink encoding of our [`Ruleset`]: the create, replace and delete
//! transactions of table `inet meduza` as one batch each.
//!
//! Owns: the exact messages, expressions and user data `nft -f` of
//! [`ruleset::to_text`](super::ruleset::to_text) sends (nft 1.0.6, read with
//! `nft --debug=netlink,mnl` and `strace`), so the kernel receives the same table and
//! `nft list` prints it the same. Must not: do I/O (the batch is sent by
//! [`nfnl::send_batch`](super::nfnl::send_batch)), or name any table but ours.
//!
//! Message order follows nft: table, chain, each named set followed by its elements,
//! then each rule preceded by its anonymous sets. Set IDs (`NFTA_SET_ID`) number the
//! sets of the batch from 1 so rules and elements can refer to sets created in the
//! same transaction.

use std::net::IpAddr;

use ipnet::IpNet;

use super::nfnl::{
    Batch, NfnlError, Writer, NFPROTO_INET, NFT_MSG_DELTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE,
    NFT_MSG_NEWSET, NFT_MSG_NEWSETELEM, NFT_MSG_NEWTABLE, NLA_F_NESTED, NLA_MAX_LEN, NLM_F_APPEND,
    NLM_F_CREATE,
};
use super::ruleset::{
    Family, NamedSet, RejectWith, RuleAction, RuleMatch, RuleSpec, Ruleset, SetElem, SetKind,
    CHAIN, CHAIN_HIJACK, DSTNAT_PRIORITY, L4, MANGLE_PRIORITY, TABLE,
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

// nf_tables.h attribute numbers.
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_FLAGS: u16 = 2;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_USERDATA: u16 = 13;
const NFTA_SET_DESC_SIZE: u16 = 1;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;

const NFT_SET_ANONYMOUS: u32 = 0x1;
const NFT_SET_CONSTANT: u32 = 0x2;
const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;
/// The name of an anonymous set; the kernel replaces `%d` with a free number.
const ANON_SET_NAME: &str = "__set%d";

/// `NFT_REG_VERDICT` and `NFT_REG_1`, `NFT_REG_2` (the 16-byte registers nft uses).
const REG_VERDICT: u32 = 0;
const REG_1: u32 = 1;
const REG_2: u32 = 2;
/// `NF_INET_PRE_ROUTING`.
const HOOK_PREROUTING: u32 = 0;
/// Verdicts: `NF_ACCEPT` and `NFT_RETURN`.
const NF_ACCEPT: i32 = 1;
const NFT_RETURN: i32 = -5;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;

/// nft's datatype numbers (`enum datatypes` in nft's `datatype.h`), sent as the key
/// type so `nft list` knows how to print elements.
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;
const TYPE_PKTTYPE: u32 = 31;
const TYPE_FIB_ADDR: u32 = 38;
const TYPE_IFNAME: u32 = 41;
const IFNAMSIZ: usize = 16;

/// libnftnl's set user data (`NFTNL_UDATA_SET_*`): TLVs of one-byte type and
/// one-byte length, integers in host byte order.
const UDATA_SET_KEYBYTEORDER: u8 = 0;
const UDATA_SET_KEY_TYPEOF: u8 = 3;
const UDATA_SET_TYPEOF_EXPR: u8 = 0;
const UDATA_SET_TYPEOF_DATA: u8 = 1;
const UDATA_SET_ELEM_FLAGS: u8 = 1;
/// `NFTNL_SET_ELEM_F_INTERVAL_OPEN`: an interval that runs to the end of the space.
const SET_ELEM_F_INTERVAL_OPEN: u32 = 1;
const UDATA_RULE_COMMENT: u8 = 0;
/// nft's `enum byteorder`.
const BYTEORDER_HOST_ENDIAN: u32 = 1;
const BYTEORDER_BIG_ENDIAN: u32 = 2;
/// nft's expression type numbers in `typeof` user data (`enum expr_types`).
const EXPR_META: u32 = 9;
const EXPR_FIB: u32 = 26;

// Expression attributes.
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFT_CT_DIRECTION: u32 = 1;
/// `IP_CT_DIR_REPLY`.
const CT_DIR_REPLY: u8 = 1;
const NFTA_FIB_DREG: u16 = 1;
const NFTA_FIB_RESULT: u16 = 2;
const NFTA_FIB_FLAGS: u16 = 3;
const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
const NFTA_FIB_F_DADDR: u32 = 2;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_META_SREG: u16 = 3;
const NFT_META_MARK: u32 = 3;
const NFT_META_IIFNAME: u32 = 6;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFT_META_PKTTYPE: u32 = 19;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFTA_LOOKUP_SET: u16 = 1;
const NFTA_LOOKUP_SREG: u16 = 2;
const NFTA_LOOKUP_SET_ID: u16 = 4;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_TPROXY_FAMILY: u16 = 1;
const NFTA_TPROXY_REG_ADDR: u16 = 2;
const NFTA_TPROXY_REG_PORT: u16 = 3;
const NFTA_REDIR_REG_PROTO_MIN: u16 = 1;
const NFTA_REDIR_FLAGS: u16 = 3;
/// `NF_NAT_RANGE_PROTO_SPECIFIED`: nft sets it for `redirect to :PORT`.
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 0x2;
const NFTA_REJECT_TYPE: u16 = 1;
const NFTA_REJECT_ICMP_CODE: u16 = 2;
/// `NFT_REJECT_TCP_RST` (code 0, as nft sends it) and `NFT_REJECT_ICMPX_UNREACH`
/// with `NFT_REJECT_ICMPX_PORT_UNREACH`.
const NFT_REJECT_TCP_RST: u32 = 1;
const NFT_REJECT_ICMPX_UNREACH: u32 = 2;
const NFT_REJECT_ICMPX_PORT_UNREACH: u8 = 1;
/// `priority dstnat` of the hijack chain.
const DSTNAT_PRIORITY_U32: u32 = DSTNAT_PRIORITY as u32;

/// `fib ... type` values (`RTN_*` of `rtnetlink.h`).
const RTN_TYPES: [(&str, u32); 3] = [("local", 2), ("broadcast", 3), ("multicast", 5)];
/// `meta pkttype` values (`PACKET_*` of `if_packet.h`).
const PKT_TYPES: [(&str, u8); 3] = [("host", 0), ("broadcast", 1), ("multicast", 2)];
/// `meta l4proto { tcp, udp }`.
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

fn l4_number(l4: L4) -> u8 {
    match l4 {
        L4::Tcp => IPPROTO_TCP,
        L4::Udp => IPPROTO_UDP,
    }
}

/// One transaction that creates the table (see [`ruleset::create_batch`] for why
/// there is no `delete`).
///
/// [`ruleset::create_batch`]: super::ruleset::create_batch
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
/// an interval or opens one that never closes.
struct Elem {
    key: Vec<u8>,
    end: bool,
    open: bool,
}

impl Elem {
    fn key(key: Vec<u8>) -> Self {
        Self {
            key,
            end: false,
            open: false,
        }
    }

    /// Encoded size inside the element list.
    fn size(&self) -> usize {
        let pad = |n: usize| (n + 3) & !3;
        4 + if self.end { 8 } else { 0 }
            + 4
            + pad(4 + self.key.len())
            + if self.open { 12 } else { 0 }
    }
}

fn udata_u32(kind: u8, value: u32) -> Vec<u8> {
    let mut v = vec![kind, 4];
    v.extend_from_slice(&value.to_ne_bytes());
    v
}

fn udata_nest(kind: u8, inner: &[u8]) -> Vec<u8> {
    let mut v = vec![kind, inner.len() as u8];
    v.extend_from_slice(inner);
    v
}

/// What nft writes as the `typeof` of an anonymous set: the expression type and its
/// data (libnftnl udata, nft's `expr_build_udata`).
fn typeof_udata(expr: u32, data: &[u8]) -> Vec<u8> {
    let mut inner = udata_u32(UDATA_SET_TYPEOF_EXPR, expr);
    inner.extend(udata_nest(UDATA_SET_TYPEOF_DATA, data));
    let mut v = udata_u32(UDATA_SET_KEYBYTEORDER, BYTEORDER_HOST_ENDIAN);
    v.extend(udata_nest(UDATA_SET_KEY_TYPEOF, &inner));
    v
}

fn meta_typeof(key: u32) -> Vec<u8> {
    // meta: NFTNL_UDATA_META_KEY (0).
    typeof_udata(EXPR_META, &udata_u32(0, key))
}

fn fib_typeof() -> Vec<u8> {
    // fib: NFTNL_UDATA_FIB_RESULT (0), NFTNL_UDATA_FIB_FLAGS (1).
    let mut data = udata_u32(0, NFT_FIB_RESULT_ADDRTYPE);
    data.extend(udata_u32(1, NFTA_FIB_F_DADDR));
    typeof_udata(EXPR_FIB, &data)
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
/// `NFT_SET_ELEM_INTERVAL_END`; an interval reaching the top of the space has no end
/// and its start carries the "open" user data.
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
            open: false,
        });
    }
    for (lo, hi) in ranges {
        if hi == max {
            out.push(Elem {
                key: addr_key(lo, family),
                end: false,
                open: true,
            });
        } else {
            out.push(Elem::key(addr_key(lo, family)));
            out.push(Elem {
                key: addr_key(hi + 1, family),
                end: true,
                open: false,
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
        let (key_type, key_len, byteorder) = match set.kind {
            SetKind::Ipv4Addr => (TYPE_IPADDR, 4, BYTEORDER_BIG_ENDIAN),
            SetKind::Ipv6Addr => (TYPE_IP6ADDR, 16, BYTEORDER_BIG_ENDIAN),
            SetKind::Ifname => (TYPE_IFNAME, IFNAMSIZ as u32, BYTEORDER_HOST_ENDIAN),
            SetKind::InetService => (TYPE_INET_SERVICE, 2, BYTEORDER_BIG_ENDIAN),
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
        self.w.put(
            NFTA_SET_USERDATA,
            &udata_u32(UDATA_SET_KEYBYTEORDER, byteorder),
        );
        self.w.finish_message();
        self.elements(
            &SetRef { name: set.name, id },
            &format!("set {}", set.name),
            &elems,
        );
        Ok(())
    }

    /// An anonymous constant set for one rule; returns its reference.
    fn anon_set(
        &mut self,
        rule: usize,
        key_type: u32,
        key_len: u32,
        udata: &[u8],
        elems: &[Elem],
    ) -> SetRef {
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
        self.w.put(NFTA_SET_USERDATA, udata);
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
            if e.open {
                self.w.put(
                    NFTA_SET_ELEM_USERDATA,
                    &udata_u32(UDATA_SET_ELEM_FLAGS, SET_ELEM_F_INTERVAL_OPEN),
                );
            }
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
                let set = self.anon_set(n, TYPE_FIB_ADDR, 4, &fib_typeof(), &elems);
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
                let set = self.anon_set(n, TYPE_PKTTYPE, 1, &meta_typeof(NFT_META_PKTTYPE), &elems);
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
                let set = self.anon_set(
                    n,
                    TYPE_INET_PROTOCOL,
                    1,
                    &meta_typeof(NFT_META_L4PROTO),
                    &elems,
                );
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

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use meduza_generators::plan::tproxy::TproxyPlan;

    use super::super::nfnl::{NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, NLM_F_ACK};
    use super::super::ruleset::build;
    use super::*;

    /// A decoded attribute: its type (flags stripped) and either bytes or children.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum A {
        V(u16, Vec<u8>),
        N(u16, Vec<A>),
    }

    #[derive(Debug)]
    struct Msg {
        msg_type: u16,
        flags: u16,
        seq: u32,
        family: u8,
        attrs: Vec<A>,
    }

    fn attrs(b: &[u8]) -> Vec<A> {
        let mut out = Vec::new();
        let mut off = 0;
        while off + 4 <= b.len() {
            let len = u16::from_ne_bytes([b[off], b[off + 1]]) as usize;
            let kind = u16::from_ne_bytes([b[off + 2], b[off + 3]]);
            let data = &b[off + 4..off + len];
            out.push(if kind & NLA_F_NESTED != 0 {
                A::N(kind & !NLA_F_NESTED, attrs(data))
            } else {
                A::V(kind, data.to_vec())
            });
            off += (len + 3) & !3;
        }
        out
    }

    fn decode(b: &Batch) -> Vec<Msg> {
        let mut out = Vec::new();
        let mut off = 0;
        let bytes = &b.bytes;
        while off < bytes.len() {
            let len = u32::from_ne_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
            out.push(Msg {
                msg_type: u16::from_ne_bytes(bytes[off + 4..off + 6].try_into().unwrap()),
                flags: u16::from_ne_bytes(bytes[off + 6..off + 8].try_into().unwrap()),
                seq: u32::from_ne_bytes(bytes[off + 8..off + 12].try_into().unwrap()),
                family: bytes[off + 16],
                attrs: attrs(&bytes[off + 20..off + len]),
            });
            assert_eq!(len % 4, 0);
            off += len;
        }
        out
    }

    fn v(kind: u16, data: &[u8]) -> A {
        A::V(kind, data.to_vec())
    }
    fn be(kind: u16, value: u32) -> A {
        A::V(kind, value.to_be_bytes().to_vec())
    }
    fn s(kind: u16, value: &str) -> A {
        let mut d = value.as_bytes().to_vec();
        d.push(0);
        A::V(kind, d)
    }
    fn expr(name: &str, data: Vec<A>) -> A {
        A::N(
            NFTA_LIST_ELEM,
            vec![s(NFTA_EXPR_NAME, name), A::N(NFTA_EXPR_DATA, data)],
        )
    }

    fn plan() -> TproxyPlan {
        let mut p = TproxyPlan::empty();
        p.proxy_src = vec![
            "192.168.50.0/24".parse().unwrap(),
            "fd00:50::/64".parse().unwrap(),
            "192.168.70.0/24".parse().unwrap(),
        ];
        p.bypass_dst = vec!["192.168.50.0/24".parse().unwrap()];
        p.exclude_src = vec!["192.168.50.254".parse().unwrap()];
        p.exclude_ifaces = vec!["mesh0".into()];
        p.exclude_ports = vec![5555];
        p
    }

    /// The order of message types, one letter each.
    fn shape(msgs: &[Msg]) -> String {
        msgs.iter()
            .map(|m| match m.msg_type & 0xff {
                _ if m.msg_type == NFNL_MSG_BATCH_BEGIN => '[',
                _ if m.msg_type == NFNL_MSG_BATCH_END => ']',
                t if t == NFT_MSG_NEWTABLE => 'T',
                t if t == NFT_MSG_DELTABLE => 'D',
                t if t == NFT_MSG_NEWCHAIN => 'C',
                t if t == NFT_MSG_NEWSET => 'S',
                t if t == NFT_MSG_NEWSETELEM => 'E',
                t if t == NFT_MSG_NEWRULE => 'R',
                _ => '?',
            })
            .collect()
    }

    fn set_msg<'a>(msgs: &'a [Msg], name: &str) -> &'a Msg {
        msgs.iter()
            .find(|m| {
                m.msg_type & 0xff == NFT_MSG_NEWSET && m.attrs.contains(&s(NFTA_SET_NAME, name))
            })
            .unwrap()
    }

    fn rules(msgs: &[Msg]) -> Vec<&Msg> {
        msgs.iter()
            .filter(|m| m.msg_type & 0xff == NFT_MSG_NEWRULE && m.msg_type >> 8 == 10)
            .collect()
    }

    #[test]
    fn create_batch_has_nfts_message_order_and_acks_every_object() {
        let b = create(&build(&plan())).unwrap();
        let msgs = decode(&b);
        // table, chain, 8 named sets with their elements (bypass_dst6 and
        // exclude_src6 are empty: none), then the 12 rules, each after its anonymous
        // sets (fib types, packet types, `{ tcp, udp }` in the last four).
        assert_eq!(
            shape(&msgs),
            "[TC".to_owned() + "SESESESSESSESE" + "RSERSER" + "RRRRR" + "SERSERSERSER]"
        );
        assert_eq!(b.messages.len(), msgs.len() - 2);
        for (m, info) in msgs[1..msgs.len() - 1].iter().zip(&b.messages) {
            assert_eq!(m.seq, info.seq);
            assert_eq!(m.family, NFPROTO_INET);
            assert_ne!(m.flags & NLM_F_ACK, 0, "{}", info.what);
            assert_eq!(m.msg_type >> 8, 10, "subsystem nf_tables");
        }
        let seqs: std::collections::BTreeSet<u32> = msgs.iter().map(|m| m.seq).collect();
        assert_eq!(seqs.len(), msgs.len(), "sequence numbers are unique");
        assert_eq!(
            msgs[1].attrs,
            vec![s(NFTA_TABLE_NAME, "meduza"), be(NFTA_TABLE_FLAGS, 0)]
        );
        assert_eq!(
            msgs[2].attrs,
            vec![
                s(NFTA_CHAIN_TABLE, "meduza"),
                s(NFTA_CHAIN_NAME, "prerouting"),
                s(NFTA_CHAIN_TYPE, "filter"),
                be(NFTA_CHAIN_POLICY, 1),
                A::N(
                    NFTA_CHAIN_HOOK,
                    vec![
                        be(NFTA_HOOK_HOOKNUM, 0),
                        be(NFTA_HOOK_PRIORITY, -150i32 as u32)
                    ]
                ),
            ]
        );
    }

    #[test]
    fn named_sets_carry_type_flags_id_and_key_byte_order() {
        let msgs = decode(&create(&build(&plan())).unwrap());
        let ne = |v: u32| v.to_ne_bytes();
        let udata = |order: u32| [&[0u8, 4][..], &ne(order)].concat();
        assert_eq!(
            set_msg(&msgs, "proxy_src4").attrs,
            vec![
                s(NFTA_SET_TABLE, "meduza"),
                s(NFTA_SET_NAME, "proxy_src4"),
                be(NFTA_SET_FLAGS, NFT_SET_INTERVAL),
                be(NFTA_SET_KEY_TYPE, TYPE_IPADDR),
                be(NFTA_SET_KEY_LEN, 4),
                be(NFTA_SET_ID, 1),
                v(NFTA_SET_USERDATA, &udata(2)),
            ]
        );
        let ifaces = &set_msg(&msgs, "exclude_ifaces").attrs;
        assert!(ifaces.contains(&be(NFTA_SET_FLAGS, 0)));
        assert!(ifaces.contains(&be(NFTA_SET_KEY_TYPE, TYPE_IFNAME)));
        assert!(ifaces.contains(&be(NFTA_SET_KEY_LEN, 16)));
        assert!(ifaces.contains(&v(NFTA_SET_USERDATA, &udata(1))));
        let ports = &set_msg(&msgs, "exclude_ports").attrs;
        assert!(ports.contains(&be(NFTA_SET_KEY_TYPE, TYPE_INET_SERVICE)));
        assert!(ports.contains(&be(NFTA_SET_KEY_LEN, 2)));
        assert!(ports.contains(&be(NFTA_SET_ID, 8)));
    }

    /// The element list of the first NEWSETELEM message for set `name`.
    fn elements(msgs: &[Msg], name: &str) -> Vec<A> {
        let m = msgs
            .iter()
            .find(|m| {
                m.msg_type & 0xff == NFT_MSG_NEWSETELEM
                    && m.attrs.contains(&s(NFTA_SET_ELEM_LIST_SET, name))
            })
            .unwrap();
        m.attrs
            .iter()
            .find_map(|a| match a {
                A::N(NFTA_SET_ELEM_LIST_ELEMENTS, list) => Some(list.clone()),
                _ => None,
            })
            .unwrap()
    }

    fn key(i: u16, bytes: &[u8]) -> A {
        A::N(
            i,
            vec![A::N(NFTA_SET_ELEM_KEY, vec![v(NFTA_DATA_VALUE, bytes)])],
        )
    }
    fn end(i: u16, bytes: &[u8]) -> A {
        A::N(
            i,
            vec![
                be(NFTA_SET_ELEM_FLAGS, NFT_SET_ELEM_INTERVAL_END),
                A::N(NFTA_SET_ELEM_KEY, vec![v(NFTA_DATA_VALUE, bytes)]),
            ],
        )
    }

    #[test]
    fn interval_elements_start_with_a_closing_zero_and_end_one_past_each_prefix() {
        let msgs = decode(&create(&build(&plan())).unwrap());
        assert_eq!(
            elements(&msgs, "proxy_src4"),
            vec![
                end(1, &[0, 0, 0, 0]),
                key(2, &[192, 168, 50, 0]),
                end(3, &[192, 168, 51, 0]),
                key(4, &[192, 168, 70, 0]),
                end(5, &[192, 168, 71, 0]),
            ]
        );
        assert_eq!(
            elements(&msgs, "exclude_ifaces"),
            vec![key(1, b"mesh0\0\0\0\0\0\0\0\0\0\0\0")]
        );
        assert_eq!(
            elements(&msgs, "exclude_ports"),
            vec![key(1, &[0x15, 0xb3])]
        );
        let set_ids: Vec<&A> = msgs
            .iter()
            .filter(|m| m.msg_type & 0xff == NFT_MSG_NEWSETELEM)
            .flat_map(|m| {
                m.attrs
                    .iter()
                    .filter(|a| matches!(a, A::V(NFTA_SET_ELEM_LIST_SET_ID, _)))
            })
            .collect();
        assert_eq!(set_ids.first(), Some(&&be(NFTA_SET_ELEM_LIST_SET_ID, 1)));
    }

    #[test]
    fn intervals_at_the_edges_and_adjacent_prefixes() {
        let nets = |v: &[&str]| -> Vec<IpNet> { v.iter().map(|n| n.parse().unwrap()).collect() };
        let flat = |e: Vec<Elem>| -> Vec<(Vec<u8>, bool, bool)> {
            e.into_iter().map(|e| (e.key, e.end, e.open)).collect()
        };
        // Starts at 0: no leading closing element. Reaches the top: open, no end.
        assert_eq!(
            flat(interval_elems(
                Family::V4,
                &nets(&["0.0.0.0/8", "255.255.255.0/24"])
            )),
            vec![
                (vec![0, 0, 0, 0], false, false),
                (vec![1, 0, 0, 0], true, false),
                (vec![255, 255, 255, 0], false, true),
            ]
        );
        assert_eq!(
            flat(interval_elems(Family::V6, &nets(&["::/0"]))),
            vec![(vec![0; 16], false, true)]
        );
        // Adjacent prefixes: the end of one and the start of the next share a key.
        assert_eq!(
            flat(interval_elems(
                Family::V4,
                &nets(&["10.0.1.0/24", "10.0.2.0/24"])
            )),
            vec![
                (vec![0, 0, 0, 0], true, false),
                (vec![10, 0, 1, 0], false, false),
                (vec![10, 0, 2, 0], true, false),
                (vec![10, 0, 2, 0], false, false),
                (vec![10, 0, 3, 0], true, false),
            ]
        );
        assert!(interval_elems(Family::V4, &[]).is_empty());
        // The open element carries NFTNL_SET_ELEM_F_INTERVAL_OPEN as user data.
        let mut p = plan();
        p.proxy_src = nets(&["0.0.0.0/0"]);
        let msgs = decode(&create(&build(&p)).unwrap());
        assert_eq!(
            elements(&msgs, "proxy_src4"),
            vec![A::N(
                1,
                vec![
                    A::N(NFTA_SET_ELEM_KEY, vec![v(NFTA_DATA_VALUE, &[0, 0, 0, 0])]),
                    v(
                        NFTA_SET_ELEM_USERDATA,
                        &[&[1u8, 4][..], &1u32.to_ne_bytes()].concat()
                    ),
                ]
            )]
        );
    }

    #[test]
    fn rules_encode_nfts_expressions_and_comment() {
        let rs = build(&plan());
        let msgs = decode(&create(&rs).unwrap());
        let rules = rules(&msgs);
        assert_eq!(rules.len(), rs.rules.len());
        let return_verdict = expr(
            "immediate",
            vec![
                be(NFTA_IMMEDIATE_DREG, 0),
                A::N(
                    NFTA_IMMEDIATE_DATA,
                    vec![A::N(
                        NFTA_DATA_VERDICT,
                        vec![be(NFTA_VERDICT_CODE, -5i32 as u32)],
                    )],
                ),
            ],
        );
        assert_eq!(
            rules[0].attrs,
            vec![
                s(NFTA_RULE_TABLE, "meduza"),
                s(NFTA_RULE_CHAIN, "prerouting"),
                A::N(
                    NFTA_RULE_EXPRESSIONS,
                    vec![
                        expr("ct", vec![be(NFTA_CT_KEY, 1), be(NFTA_CT_DREG, 1)]),
                        expr(
                            "cmp",
                            vec![
                                be(NFTA_CMP_SREG, 1),
                                be(NFTA_CMP_OP, 0),
                                A::N(NFTA_CMP_DATA, vec![v(NFTA_DATA_VALUE, &[1])]),
                            ]
                        ),
                        return_verdict.clone(),
                    ]
                ),
                v(NFTA_RULE_USERDATA, b"\x00\x10reply direction\x00"),
            ]
        );
        // `ip daddr @bypass_dst4`: family guard, 4 bytes at offset 16, lookup by name
        // and by the set's ID in this batch (3: third named set).
        let A::N(_, exprs) = &rules[3].attrs[2] else {
            panic!("no expressions")
        };
        assert_eq!(
            exprs[..4],
            [
                expr(
                    "meta",
                    vec![be(NFTA_META_KEY, NFT_META_NFPROTO), be(NFTA_META_DREG, 1)]
                ),
                expr(
                    "cmp",
                    vec![
                        be(NFTA_CMP_SREG, 1),
                        be(NFTA_CMP_OP, 0),
                        A::N(NFTA_CMP_DATA, vec![v(NFTA_DATA_VALUE, &[2])]),
                    ]
                ),
                expr(
                    "payload",
                    vec![
                        be(NFTA_PAYLOAD_DREG, 1),
                        be(NFTA_PAYLOAD_BASE, 1),
                        be(NFTA_PAYLOAD_OFFSET, 16),
                        be(NFTA_PAYLOAD_LEN, 4),
                    ]
                ),
                expr(
                    "lookup",
                    vec![
                        be(NFTA_LOOKUP_SREG, 1),
                        s(NFTA_LOOKUP_SET, "bypass_dst4"),
                        be(NFTA_LOOKUP_SET_ID, 3),
                    ]
                ),
            ]
        );
        assert_eq!(exprs[4], return_verdict);
    }

    #[test]
    fn tproxy_rule_loads_address_port_and_mark_then_accepts() {
        let mut p = plan();
        p.port = 7893;
        p.mark = 0x1234;
        let msgs = decode(&create(&build(&p)).unwrap());
        let rules = rules(&msgs);
        let A::N(_, exprs) = &rules[10].attrs[2] else {
            panic!("no expressions")
        };
        let imm = |reg: u32, value: &[u8]| {
            expr(
                "immediate",
                vec![
                    be(NFTA_IMMEDIATE_DREG, reg),
                    A::N(NFTA_IMMEDIATE_DATA, vec![v(NFTA_DATA_VALUE, value)]),
                ],
            )
        };
        let tail = &exprs[exprs.len() - 6..];
        assert_eq!(tail[0], imm(1, &Ipv4Addr::LOCALHOST.octets()));
        assert_eq!(tail[1], imm(2, &7893u16.to_be_bytes()));
        assert_eq!(
            tail[2],
            expr(
                "tproxy",
                vec![
                    be(NFTA_TPROXY_FAMILY, 2),
                    be(NFTA_TPROXY_REG_ADDR, 1),
                    be(NFTA_TPROXY_REG_PORT, 2)
                ]
            )
        );
        assert_eq!(tail[3], imm(1, &0x1234u32.to_ne_bytes()));
        assert_eq!(
            tail[4],
            expr(
                "meta",
                vec![be(NFTA_META_KEY, NFT_META_MARK), be(NFTA_META_SREG, 1)]
            )
        );
        // The anonymous `{ tcp, udp }` set is created just before its rule.
        let rule_at = msgs
            .iter()
            .position(|m| std::ptr::eq(m, rules[10]))
            .unwrap();
        let anon = &msgs[rule_at - 2];
        assert!(anon.attrs.contains(&s(NFTA_SET_NAME, "__set%d")));
        assert!(anon.attrs.contains(&be(NFTA_SET_FLAGS, 3)));
        assert!(anon
            .attrs
            .contains(&A::N(NFTA_SET_DESC, vec![be(NFTA_SET_DESC_SIZE, 2)])));
        assert_eq!(
            msgs[rule_at - 1].attrs.last(),
            Some(&A::N(
                NFTA_SET_ELEM_LIST_ELEMENTS,
                vec![key(1, &[6]), key(2, &[17])]
            ))
        );
    }

    #[test]
    fn replace_and_delete_add_then_delete_the_table_first() {
        let rs = build(&plan());
        let create_len = decode(&create(&rs).unwrap()).len();
        let msgs = decode(&replace(&rs).unwrap());
        assert!(shape(&msgs).starts_with("[TDTCS"));
        assert_eq!(msgs.len(), create_len + 2);
        assert_eq!(msgs[2].attrs, vec![s(NFTA_TABLE_NAME, "meduza")]);
        let del = decode(&delete().unwrap());
        assert_eq!(shape(&del), "[TD]");
        assert_eq!(
            del[1].flags,
            0x1 | NLM_F_ACK,
            "no NLM_F_EXCL: add is a no-op"
        );
    }

    #[test]
    fn ten_thousand_prefixes_split_into_64k_element_messages() {
        let mut p = plan();
        p.proxy_src = (0..10_000u32)
            .map(|i| IpNet::new(Ipv4Addr::from(0x0a00_0000 + (i << 9)).into(), 24).unwrap())
            .collect();
        let b = create(&build(&p)).unwrap();
        let msgs = decode(&b);
        let parts: Vec<&Msg> = msgs
            .iter()
            .filter(|m| {
                m.msg_type & 0xff == NFT_MSG_NEWSETELEM
                    && m.attrs.contains(&s(NFTA_SET_ELEM_LIST_SET, "proxy_src4"))
            })
            .collect();
        // nft sends the same: six full messages and a last one (20,001 elements).
        assert_eq!(parts.len(), 7);
        let mut count = 0;
        let mut firsts = Vec::new();
        for m in &parts {
            let Some(A::N(_, list)) = m.attrs.last() else {
                panic!("no element list")
            };
            count += list.len();
            let A::N(first, _) = &list[0] else { panic!() };
            firsts.push(*first);
        }
        assert_eq!(count, 20_001);
        // Numbers run on across messages; the element that did not fit used one up
        // (as libnftnl does): 3,276 elements in the first message, then 3,278.
        assert_eq!(firsts[..3], [1, 3278, 6555]);
        // Every message's element list fits the 16-bit attribute length.
        let mut off = 0;
        while off < b.bytes.len() {
            let len = u32::from_ne_bytes(b.bytes[off..off + 4].try_into().unwrap()) as usize;
            assert!(len <= 16 + 4 + 64 + NLA_MAX_LEN, "message of {len} bytes");
            off += len;
        }
    }

    #[test]
    fn impossible_elements_are_errors_naming_the_set() {
        let mut rs = build(&plan());
        let ifaces = rs
            .sets
            .iter_mut()
            .find(|s| s.kind == SetKind::Ifname)
            .unwrap();
        ifaces.elements = vec![SetElem::Name("sixteen-chars-xx".into())];
        let err = create(&rs).unwrap_err();
        assert!(err.to_string().contains("exclude_ifaces"), "{err}");

        let mut rs = build(&plan());
        rs.sets[0].elements.push(SetElem::Port(1));
        let err = create(&rs).unwrap_err();
        assert!(
            matches!(
                err,
                EncodeError::ElemKind {
                    set: "proxy_src4",
                    ..
                }
            ),
            "{err}"
        );
    }
}
