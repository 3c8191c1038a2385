//! Reading an nf_tables batch back: the bytes [`NetlinkNft`](super::super::NetlinkNft)
//! sends, split into messages and attributes (framing by `netlink-packet-core`) and
//! decoded into [`NftMessage`]s — the kernel's side of the encoder, for `FakeNft` and
//! the tests. Checks the envelope the kernel checks (`NFNL_MSG_BATCH_BEGIN … END` of
//! subsystem nf_tables, every message a request asking for an ack, lengths and
//! alignment). Must not: do I/O, or accept an attribute it does not know (a new one
//! in the encoder must be modelled here too).

use netlink_packet_core::{NetlinkBuffer, NlaBuffer, NlasIterator};

use super::super::nfnl::{
    NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, NFNL_SUBSYS_NFTABLES, NFPROTO_INET, NFPROTO_UNSPEC,
    NFT_MSG_DELTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE, NFT_MSG_NEWSET, NFT_MSG_NEWSETELEM,
    NFT_MSG_NEWTABLE, NLM_F_ACK, NLM_F_REQUEST,
};
use super::consts::*;

/// Why a batch could not be read, or (from [`model`](super::model)) would not apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("nf_tables batch: {0}")]
pub struct DecodeError(pub String);

fn err(reason: impl Into<String>) -> DecodeError {
    DecodeError(reason.into())
}

/// One element of a set as the kernel receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElemMsg {
    pub key: Vec<u8>,
    /// `NFT_SET_ELEM_INTERVAL_END`.
    pub end: bool,
}

/// One expression of a rule, as the kernel receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExprMsg {
    Ct {
        key: u32,
        dreg: u32,
    },
    Cmp {
        sreg: u32,
        op: u32,
        data: Vec<u8>,
    },
    Fib {
        result: u32,
        flags: u32,
        dreg: u32,
    },
    Meta {
        key: u32,
        dreg: u32,
    },
    MetaSet {
        key: u32,
        sreg: u32,
    },
    Payload {
        base: u32,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    Lookup {
        set: String,
        id: Option<u32>,
        sreg: u32,
    },
    Immediate {
        dreg: u32,
        data: Vec<u8>,
    },
    Verdict(i32),
    Tproxy {
        family: u32,
        reg_addr: u32,
        reg_port: u32,
    },
    Redir {
        reg_proto_min: u32,
        flags: u32,
    },
    Reject {
        kind: u32,
        code: u8,
    },
}

/// One nf_tables message of a batch (family `inet` always: others are refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NftMessage {
    NewTable {
        name: String,
        flags: u32,
    },
    DelTable {
        name: String,
    },
    NewChain {
        table: String,
        name: String,
        kind: String,
        hook: u32,
        priority: i32,
        policy: u32,
    },
    NewSet {
        table: String,
        name: String,
        id: u32,
        flags: u32,
        key_type: u32,
        key_len: u32,
        /// `NFTA_SET_DESC_SIZE` (nft sends it for anonymous sets).
        size: Option<u32>,
        /// The key byte order of the user data (`NFTNL_UDATA_SET_KEYBYTEORDER`).
        key_byteorder: Option<u32>,
    },
    NewSetElem {
        table: String,
        set: String,
        set_id: Option<u32>,
        elems: Vec<ElemMsg>,
    },
    NewRule {
        table: String,
        chain: String,
        exprs: Vec<ExprMsg>,
        /// The comment of the user data (`NFTNL_UDATA_RULE_COMMENT`).
        comment: Option<String>,
    },
}

impl NftMessage {
    /// The table the message names.
    pub fn table(&self) -> &str {
        match self {
            NftMessage::NewTable { name, .. } | NftMessage::DelTable { name } => name,
            NftMessage::NewChain { table, .. }
            | NftMessage::NewSet { table, .. }
            | NftMessage::NewSetElem { table, .. }
            | NftMessage::NewRule { table, .. } => table,
        }
    }
}

/// The attributes of one message or nest, with the nested flag checked.
struct Attrs<'a>(Vec<(u16, bool, &'a [u8])>);

impl<'a> Attrs<'a> {
    fn parse(buf: &'a [u8], what: &str) -> Result<Self, DecodeError> {
        let mut out = Vec::new();
        for nla in NlasIterator::new(buf) {
            let nla: NlaBuffer<&'a [u8]> = nla.map_err(|e| err(format!("{what}: {e}")))?;
            let nested = nla.nested_flag();
            let kind = nla.kind();
            let value = &nla.into_inner()[4..usize::from(nla.length())];
            out.push((kind, nested, value));
        }
        Ok(Self(out))
    }

    fn get(&self, kind: u16) -> Option<&'a [u8]> {
        self.0
            .iter()
            .find(|(k, _, _)| *k == kind)
            .map(|(_, _, v)| *v)
    }

    /// Every attribute must be one the message may carry.
    fn only(&self, known: &[u16], what: &str) -> Result<(), DecodeError> {
        match self.0.iter().find(|(k, _, _)| !known.contains(k)) {
            Some((k, _, _)) => Err(err(format!("{what}: unexpected attribute {k}"))),
            None => Ok(()),
        }
    }

    fn nest(&self, kind: u16, what: &str) -> Result<Attrs<'a>, DecodeError> {
        match self.0.iter().find(|(k, _, _)| *k == kind) {
            Some((_, true, v)) => Attrs::parse(v, what),
            Some((_, false, _)) => Err(err(format!("{what}: attribute {kind} not nested"))),
            None => Err(err(format!("{what}: missing attribute {kind}"))),
        }
    }

    fn str(&self, kind: u16, what: &str) -> Result<String, DecodeError> {
        let v = self
            .get(kind)
            .ok_or_else(|| err(format!("{what}: missing attribute {kind}")))?;
        match v.split_last() {
            Some((0, s)) if !s.contains(&0) => Ok(String::from_utf8_lossy(s).into_owned()),
            _ => Err(err(format!(
                "{what}: attribute {kind} not a NUL-terminated string"
            ))),
        }
    }

    fn be32_opt(&self, kind: u16, what: &str) -> Result<Option<u32>, DecodeError> {
        self.get(kind)
            .map(|v| {
                <[u8; 4]>::try_from(v)
                    .map(u32::from_be_bytes)
                    .map_err(|_| err(format!("{what}: attribute {kind} not 4 bytes")))
            })
            .transpose()
    }

    fn be32(&self, kind: u16, what: &str) -> Result<u32, DecodeError> {
        self.be32_opt(kind, what)?
            .ok_or_else(|| err(format!("{what}: missing attribute {kind}")))
    }

    /// `NFTA_DATA_VALUE` inside nest `kind`.
    fn data(&self, kind: u16, what: &str) -> Result<Vec<u8>, DecodeError> {
        let d = self.nest(kind, what)?;
        d.only(&[NFTA_DATA_VALUE], what)?;
        d.get(NFTA_DATA_VALUE)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| err(format!("{what}: no value")))
    }
}

/// Decode one batch: the envelope, then each message. Sequence numbers must count up
/// by one from the batch header.
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<NftMessage>, DecodeError> {
    let mut frames = Vec::new();
    let mut off = 0;
    while off < bytes.len() {
        let nl = NetlinkBuffer::new_checked(&bytes[off..])
            .map_err(|e| err(format!("message at byte {off}: {e}")))?;
        let len = nl.length() as usize;
        if len % 4 != 0 {
            return Err(err(format!(
                "message at byte {off}: length {len} not aligned"
            )));
        }
        frames.push((
            nl.message_type(),
            nl.flags(),
            nl.sequence_number(),
            nl.payload(),
        ));
        off += len;
    }
    let (Some(first), Some(last)) = (frames.first(), frames.last()) else {
        return Err(err("empty"));
    };
    if frames.len() < 2 || first.0 != NFNL_MSG_BATCH_BEGIN || last.0 != NFNL_MSG_BATCH_END {
        return Err(err("not enclosed in NFNL_MSG_BATCH_BEGIN … END"));
    }
    for (i, (msg_type, flags, seq, payload)) in frames.iter().enumerate() {
        if *seq != first.2.wrapping_add(i as u32) {
            return Err(err(format!("message {i}: sequence number {seq}")));
        }
        if payload.len() < 4 || payload[1] != 0 {
            return Err(err(format!("message {i}: no nfgenmsg version 0")));
        }
        let envelope = *msg_type == NFNL_MSG_BATCH_BEGIN || *msg_type == NFNL_MSG_BATCH_END;
        if envelope {
            let res_id = u16::from_be_bytes([payload[2], payload[3]]);
            if res_id != NFNL_SUBSYS_NFTABLES || payload[0] != NFPROTO_UNSPEC {
                return Err(err(format!("message {i}: batch of subsystem {res_id}")));
            }
            if (i == 0) == (*msg_type == NFNL_MSG_BATCH_END) || (i != 0 && i != frames.len() - 1) {
                return Err(err(format!("message {i}: batch begin/end out of place")));
            }
        } else if flags & (NLM_F_REQUEST | NLM_F_ACK) != NLM_F_REQUEST | NLM_F_ACK {
            return Err(err(format!("message {i}: not a request asking for an ack")));
        }
    }
    frames[1..frames.len() - 1]
        .iter()
        .enumerate()
        .map(|(i, (msg_type, _, _, payload))| message(i + 1, *msg_type, payload))
        .collect()
}

fn message(i: usize, msg_type: u16, payload: &[u8]) -> Result<NftMessage, DecodeError> {
    let what = format!("message {i}");
    if msg_type >> 8 != NFNL_SUBSYS_NFTABLES {
        return Err(err(format!("{what}: subsystem {}", msg_type >> 8)));
    }
    if payload[0] != NFPROTO_INET {
        return Err(err(format!("{what}: family {} is not inet", payload[0])));
    }
    let a = Attrs::parse(&payload[4..], &what)?;
    let w = what.as_str();
    Ok(match msg_type & 0xff {
        NFT_MSG_NEWTABLE => {
            a.only(&[NFTA_TABLE_NAME, NFTA_TABLE_FLAGS], w)?;
            NftMessage::NewTable {
                name: a.str(NFTA_TABLE_NAME, w)?,
                flags: a.be32_opt(NFTA_TABLE_FLAGS, w)?.unwrap_or(0),
            }
        }
        NFT_MSG_DELTABLE => {
            a.only(&[NFTA_TABLE_NAME], w)?;
            NftMessage::DelTable {
                name: a.str(NFTA_TABLE_NAME, w)?,
            }
        }
        NFT_MSG_NEWCHAIN => {
            a.only(
                &[
                    NFTA_CHAIN_TABLE,
                    NFTA_CHAIN_NAME,
                    NFTA_CHAIN_TYPE,
                    NFTA_CHAIN_POLICY,
                    NFTA_CHAIN_HOOK,
                ],
                w,
            )?;
            let hook = a.nest(NFTA_CHAIN_HOOK, w)?;
            hook.only(&[NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY], w)?;
            NftMessage::NewChain {
                table: a.str(NFTA_CHAIN_TABLE, w)?,
                name: a.str(NFTA_CHAIN_NAME, w)?,
                kind: a.str(NFTA_CHAIN_TYPE, w)?,
                hook: hook.be32(NFTA_HOOK_HOOKNUM, w)?,
                priority: hook.be32(NFTA_HOOK_PRIORITY, w)? as i32,
                policy: a.be32(NFTA_CHAIN_POLICY, w)?,
            }
        }
        NFT_MSG_NEWSET => {
            a.only(
                &[
                    NFTA_SET_TABLE,
                    NFTA_SET_NAME,
                    NFTA_SET_FLAGS,
                    NFTA_SET_KEY_TYPE,
                    NFTA_SET_KEY_LEN,
                    NFTA_SET_ID,
                    NFTA_SET_DESC,
                    NFTA_SET_USERDATA,
                ],
                w,
            )?;
            let size = match a.get(NFTA_SET_DESC) {
                Some(_) => {
                    let d = a.nest(NFTA_SET_DESC, w)?;
                    d.only(&[NFTA_SET_DESC_SIZE], w)?;
                    Some(d.be32(NFTA_SET_DESC_SIZE, w)?)
                }
                None => None,
            };
            NftMessage::NewSet {
                table: a.str(NFTA_SET_TABLE, w)?,
                name: a.str(NFTA_SET_NAME, w)?,
                id: a.be32(NFTA_SET_ID, w)?,
                flags: a.be32_opt(NFTA_SET_FLAGS, w)?.unwrap_or(0),
                key_type: a.be32(NFTA_SET_KEY_TYPE, w)?,
                key_len: a.be32(NFTA_SET_KEY_LEN, w)?,
                size,
                key_byteorder: a
                    .get(NFTA_SET_USERDATA)
                    .map(|u| set_udata(u, w))
                    .transpose()?,
            }
        }
        NFT_MSG_NEWSETELEM => {
            a.only(
                &[
                    NFTA_SET_ELEM_LIST_TABLE,
                    NFTA_SET_ELEM_LIST_SET,
                    NFTA_SET_ELEM_LIST_SET_ID,
                    NFTA_SET_ELEM_LIST_ELEMENTS,
                ],
                w,
            )?;
            let list = a.nest(NFTA_SET_ELEM_LIST_ELEMENTS, w)?;
            let elems = list
                .0
                .iter()
                .map(|(_, _, v)| {
                    let e = Attrs::parse(v, w)?;
                    e.only(&[NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_FLAGS], w)?;
                    let flags = e.be32_opt(NFTA_SET_ELEM_FLAGS, w)?.unwrap_or(0);
                    Ok(ElemMsg {
                        key: e.data(NFTA_SET_ELEM_KEY, w)?,
                        end: flags & NFT_SET_ELEM_INTERVAL_END != 0,
                    })
                })
                .collect::<Result<Vec<_>, DecodeError>>()?;
            NftMessage::NewSetElem {
                table: a.str(NFTA_SET_ELEM_LIST_TABLE, w)?,
                set: a.str(NFTA_SET_ELEM_LIST_SET, w)?,
                set_id: a.be32_opt(NFTA_SET_ELEM_LIST_SET_ID, w)?,
                elems,
            }
        }
        NFT_MSG_NEWRULE => {
            a.only(
                &[
                    NFTA_RULE_TABLE,
                    NFTA_RULE_CHAIN,
                    NFTA_RULE_EXPRESSIONS,
                    NFTA_RULE_USERDATA,
                ],
                w,
            )?;
            let list = a.nest(NFTA_RULE_EXPRESSIONS, w)?;
            list.only(&[NFTA_LIST_ELEM], w)?;
            let exprs = list
                .0
                .iter()
                .map(|(_, _, v)| expr(&Attrs::parse(v, w)?, w))
                .collect::<Result<Vec<_>, DecodeError>>()?;
            NftMessage::NewRule {
                table: a.str(NFTA_RULE_TABLE, w)?,
                chain: a.str(NFTA_RULE_CHAIN, w)?,
                exprs,
                comment: a
                    .get(NFTA_RULE_USERDATA)
                    .map(|u| rule_comment(u, w))
                    .transpose()?,
            }
        }
        other => return Err(err(format!("{what}: message type {other} not modelled"))),
    })
}

/// libnftnl user data: TLVs of a one-byte type and a one-byte length.
fn udata_tlvs<'a>(mut u: &'a [u8], what: &str) -> Result<Vec<(u8, &'a [u8])>, DecodeError> {
    let mut out = Vec::new();
    while let [kind, len, rest @ ..] = u {
        let len = usize::from(*len);
        if rest.len() < len {
            return Err(err(format!("{what}: user data truncated")));
        }
        out.push((*kind, &rest[..len]));
        u = &rest[len..];
    }
    if !u.is_empty() {
        return Err(err(format!("{what}: user data truncated")));
    }
    Ok(out)
}

/// The key byte order of a set's user data (the only entry we send).
fn set_udata(u: &[u8], what: &str) -> Result<u32, DecodeError> {
    match udata_tlvs(u, what)?.as_slice() {
        [(UDATA_SET_KEYBYTEORDER, v)] => <[u8; 4]>::try_from(*v)
            .map(u32::from_ne_bytes)
            .map_err(|_| err(format!("{what}: key byte order not 4 bytes"))),
        other => Err(err(format!("{what}: set user data {other:?} not modelled"))),
    }
}

/// The comment of a rule's user data (the only entry we send), NUL-terminated.
fn rule_comment(u: &[u8], what: &str) -> Result<String, DecodeError> {
    match udata_tlvs(u, what)?.as_slice() {
        [(UDATA_RULE_COMMENT, [text @ .., 0])] => Ok(String::from_utf8_lossy(text).into_owned()),
        other => Err(err(format!(
            "{what}: rule user data {other:?} not modelled"
        ))),
    }
}

fn expr(a: &Attrs<'_>, w: &str) -> Result<ExprMsg, DecodeError> {
    a.only(&[NFTA_EXPR_NAME, NFTA_EXPR_DATA], w)?;
    let name = a.str(NFTA_EXPR_NAME, w)?;
    let what = format!("{w}, expression {name}");
    let w = what.as_str();
    let d = a.nest(NFTA_EXPR_DATA, w)?;
    Ok(match name.as_str() {
        "ct" => {
            d.only(&[NFTA_CT_KEY, NFTA_CT_DREG], w)?;
            ExprMsg::Ct {
                key: d.be32(NFTA_CT_KEY, w)?,
                dreg: d.be32(NFTA_CT_DREG, w)?,
            }
        }
        "cmp" => {
            d.only(&[NFTA_CMP_SREG, NFTA_CMP_OP, NFTA_CMP_DATA], w)?;
            ExprMsg::Cmp {
                sreg: d.be32(NFTA_CMP_SREG, w)?,
                op: d.be32(NFTA_CMP_OP, w)?,
                data: d.data(NFTA_CMP_DATA, w)?,
            }
        }
        "fib" => {
            d.only(&[NFTA_FIB_FLAGS, NFTA_FIB_RESULT, NFTA_FIB_DREG], w)?;
            ExprMsg::Fib {
                result: d.be32(NFTA_FIB_RESULT, w)?,
                flags: d.be32(NFTA_FIB_FLAGS, w)?,
                dreg: d.be32(NFTA_FIB_DREG, w)?,
            }
        }
        "meta" => {
            d.only(&[NFTA_META_KEY, NFTA_META_DREG, NFTA_META_SREG], w)?;
            let key = d.be32(NFTA_META_KEY, w)?;
            match (
                d.be32_opt(NFTA_META_DREG, w)?,
                d.be32_opt(NFTA_META_SREG, w)?,
            ) {
                (Some(dreg), None) => ExprMsg::Meta { key, dreg },
                (None, Some(sreg)) => ExprMsg::MetaSet { key, sreg },
                _ => return Err(err(format!("{w}: needs exactly one of dreg, sreg"))),
            }
        }
        "payload" => {
            d.only(
                &[
                    NFTA_PAYLOAD_DREG,
                    NFTA_PAYLOAD_BASE,
                    NFTA_PAYLOAD_OFFSET,
                    NFTA_PAYLOAD_LEN,
                ],
                w,
            )?;
            ExprMsg::Payload {
                base: d.be32(NFTA_PAYLOAD_BASE, w)?,
                offset: d.be32(NFTA_PAYLOAD_OFFSET, w)?,
                len: d.be32(NFTA_PAYLOAD_LEN, w)?,
                dreg: d.be32(NFTA_PAYLOAD_DREG, w)?,
            }
        }
        "lookup" => {
            d.only(&[NFTA_LOOKUP_SREG, NFTA_LOOKUP_SET, NFTA_LOOKUP_SET_ID], w)?;
            ExprMsg::Lookup {
                set: d.str(NFTA_LOOKUP_SET, w)?,
                id: d.be32_opt(NFTA_LOOKUP_SET_ID, w)?,
                sreg: d.be32(NFTA_LOOKUP_SREG, w)?,
            }
        }
        "immediate" => {
            d.only(&[NFTA_IMMEDIATE_DREG, NFTA_IMMEDIATE_DATA], w)?;
            let dreg = d.be32(NFTA_IMMEDIATE_DREG, w)?;
            let data = d.nest(NFTA_IMMEDIATE_DATA, w)?;
            if dreg == REG_VERDICT {
                data.only(&[NFTA_DATA_VERDICT], w)?;
                let v = data.nest(NFTA_DATA_VERDICT, w)?;
                v.only(&[NFTA_VERDICT_CODE], w)?;
                ExprMsg::Verdict(v.be32(NFTA_VERDICT_CODE, w)? as i32)
            } else {
                ExprMsg::Immediate {
                    dreg,
                    data: d.data(NFTA_IMMEDIATE_DATA, w)?,
                }
            }
        }
        "tproxy" => {
            d.only(
                &[
                    NFTA_TPROXY_FAMILY,
                    NFTA_TPROXY_REG_ADDR,
                    NFTA_TPROXY_REG_PORT,
                ],
                w,
            )?;
            ExprMsg::Tproxy {
                family: d.be32(NFTA_TPROXY_FAMILY, w)?,
                reg_addr: d.be32(NFTA_TPROXY_REG_ADDR, w)?,
                reg_port: d.be32(NFTA_TPROXY_REG_PORT, w)?,
            }
        }
        "redir" => {
            d.only(&[NFTA_REDIR_REG_PROTO_MIN, NFTA_REDIR_FLAGS], w)?;
            ExprMsg::Redir {
                reg_proto_min: d.be32(NFTA_REDIR_REG_PROTO_MIN, w)?,
                flags: d.be32(NFTA_REDIR_FLAGS, w)?,
            }
        }
        "reject" => {
            d.only(&[NFTA_REJECT_TYPE, NFTA_REJECT_ICMP_CODE], w)?;
            let code = match d.get(NFTA_REJECT_ICMP_CODE) {
                Some([c]) => *c,
                _ => return Err(err(format!("{w}: icmp code not one byte"))),
            };
            ExprMsg::Reject {
                kind: d.be32(NFTA_REJECT_TYPE, w)?,
                code,
            }
        }
        other => return Err(err(format!("{w}: expression {other} not modelled"))),
    })
}
