//! nf_tables numbers shared by the encoder and the decoder: attribute types, flags,
//! registers, verdicts and nft's datatype numbers, from
//! `include/uapi/linux/netfilter/nf_tables.h` (and nft's `datatype.h`, libnftnl's
//! `udata.h`). Our own on purpose: no well-kept crate has nf_tables numbers.

use super::super::ruleset::DSTNAT_PRIORITY;

// nf_tables.h attribute numbers.
pub(super) const NFTA_TABLE_NAME: u16 = 1;
pub(super) const NFTA_TABLE_FLAGS: u16 = 2;
pub(super) const NFTA_CHAIN_TABLE: u16 = 1;
pub(super) const NFTA_CHAIN_HOOK: u16 = 4;
pub(super) const NFTA_CHAIN_POLICY: u16 = 5;
pub(super) const NFTA_CHAIN_NAME: u16 = 3;
pub(super) const NFTA_CHAIN_TYPE: u16 = 7;
pub(super) const NFTA_HOOK_HOOKNUM: u16 = 1;
pub(super) const NFTA_HOOK_PRIORITY: u16 = 2;
pub(super) const NFTA_SET_TABLE: u16 = 1;
pub(super) const NFTA_SET_NAME: u16 = 2;
pub(super) const NFTA_SET_FLAGS: u16 = 3;
pub(super) const NFTA_SET_KEY_TYPE: u16 = 4;
pub(super) const NFTA_SET_KEY_LEN: u16 = 5;
pub(super) const NFTA_SET_DESC: u16 = 9;
pub(super) const NFTA_SET_ID: u16 = 10;
pub(super) const NFTA_SET_USERDATA: u16 = 13;
pub(super) const NFTA_SET_DESC_SIZE: u16 = 1;
pub(super) const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
pub(super) const NFTA_SET_ELEM_LIST_SET: u16 = 2;
pub(super) const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
pub(super) const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
pub(super) const NFTA_SET_ELEM_KEY: u16 = 1;
pub(super) const NFTA_SET_ELEM_FLAGS: u16 = 3;
pub(super) const NFTA_DATA_VALUE: u16 = 1;
pub(super) const NFTA_DATA_VERDICT: u16 = 2;
pub(super) const NFTA_VERDICT_CODE: u16 = 1;
pub(super) const NFTA_RULE_TABLE: u16 = 1;
pub(super) const NFTA_RULE_CHAIN: u16 = 2;
pub(super) const NFTA_RULE_EXPRESSIONS: u16 = 4;
pub(super) const NFTA_RULE_USERDATA: u16 = 7;
pub(super) const NFTA_LIST_ELEM: u16 = 1;
pub(super) const NFTA_EXPR_NAME: u16 = 1;
pub(super) const NFTA_EXPR_DATA: u16 = 2;

pub(super) const NFT_SET_ANONYMOUS: u32 = 0x1;
pub(super) const NFT_SET_CONSTANT: u32 = 0x2;
pub(super) const NFT_SET_INTERVAL: u32 = 0x4;
pub(super) const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;
/// The name of an anonymous set; the kernel replaces `%d` with a free number.
pub(super) const ANON_SET_NAME: &str = "__set%d";

/// `NFT_REG_VERDICT` and `NFT_REG_1`, `NFT_REG_2` (the 16-byte registers nft uses).
pub(super) const REG_VERDICT: u32 = 0;
pub(super) const REG_1: u32 = 1;
pub(super) const REG_2: u32 = 2;
/// `NF_INET_PRE_ROUTING`.
pub(super) const HOOK_PREROUTING: u32 = 0;
/// Verdicts: `NF_ACCEPT` and `NFT_RETURN`.
pub(super) const NF_ACCEPT: i32 = 1;
pub(super) const NFT_RETURN: i32 = -5;
pub(super) const NFPROTO_IPV4: u8 = 2;
pub(super) const NFPROTO_IPV6: u8 = 10;

/// nft's datatype numbers (`enum datatypes` in nft's `datatype.h`), sent as the key
/// type so `nft list` knows how to print elements.
pub(super) const TYPE_IPADDR: u32 = 7;
pub(super) const TYPE_IP6ADDR: u32 = 8;
pub(super) const TYPE_INET_PROTOCOL: u32 = 12;
pub(super) const TYPE_INET_SERVICE: u32 = 13;
pub(super) const TYPE_PKTTYPE: u32 = 31;
pub(super) const TYPE_FIB_ADDR: u32 = 38;
pub(super) const TYPE_IFNAME: u32 = 41;
pub(super) const IFNAMSIZ: usize = 16;

/// libnftnl's user data: TLVs of one-byte type and one-byte length, integers in
/// host byte order. We send only what `nft list` needs to print the table as nft
/// would: the key byte order of the interface-name set (`NFTNL_UDATA_SET_KEYBYTEORDER`)
/// and each rule's comment (`NFTNL_UDATA_RULE_COMMENT`); docs/dataplane.md "User data".
pub(super) const UDATA_SET_KEYBYTEORDER: u8 = 0;
pub(super) const UDATA_RULE_COMMENT: u8 = 0;
/// nft's `enum byteorder`.
pub(super) const BYTEORDER_HOST_ENDIAN: u32 = 1;

// Expression attributes.
pub(super) const NFTA_CMP_SREG: u16 = 1;
pub(super) const NFTA_CMP_OP: u16 = 2;
pub(super) const NFTA_CMP_DATA: u16 = 3;
pub(super) const NFT_CMP_EQ: u32 = 0;
pub(super) const NFTA_CT_DREG: u16 = 1;
pub(super) const NFTA_CT_KEY: u16 = 2;
pub(super) const NFT_CT_DIRECTION: u32 = 1;
/// `IP_CT_DIR_REPLY`.
pub(super) const CT_DIR_REPLY: u8 = 1;
pub(super) const NFTA_FIB_DREG: u16 = 1;
pub(super) const NFTA_FIB_RESULT: u16 = 2;
pub(super) const NFTA_FIB_FLAGS: u16 = 3;
pub(super) const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
pub(super) const NFTA_FIB_F_DADDR: u32 = 2;
pub(super) const NFTA_META_DREG: u16 = 1;
pub(super) const NFTA_META_KEY: u16 = 2;
pub(super) const NFTA_META_SREG: u16 = 3;
pub(super) const NFT_META_MARK: u32 = 3;
pub(super) const NFT_META_IIFNAME: u32 = 6;
pub(super) const NFT_META_NFPROTO: u32 = 15;
pub(super) const NFT_META_L4PROTO: u32 = 16;
pub(super) const NFT_META_PKTTYPE: u32 = 19;
pub(super) const NFTA_PAYLOAD_DREG: u16 = 1;
pub(super) const NFTA_PAYLOAD_BASE: u16 = 2;
pub(super) const NFTA_PAYLOAD_OFFSET: u16 = 3;
pub(super) const NFTA_PAYLOAD_LEN: u16 = 4;
pub(super) const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
pub(super) const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
pub(super) const NFTA_LOOKUP_SET: u16 = 1;
pub(super) const NFTA_LOOKUP_SREG: u16 = 2;
pub(super) const NFTA_LOOKUP_SET_ID: u16 = 4;
pub(super) const NFTA_IMMEDIATE_DREG: u16 = 1;
pub(super) const NFTA_IMMEDIATE_DATA: u16 = 2;
pub(super) const NFTA_TPROXY_FAMILY: u16 = 1;
pub(super) const NFTA_TPROXY_REG_ADDR: u16 = 2;
pub(super) const NFTA_TPROXY_REG_PORT: u16 = 3;
pub(super) const NFTA_REDIR_REG_PROTO_MIN: u16 = 1;
pub(super) const NFTA_REDIR_FLAGS: u16 = 3;
/// `NF_NAT_RANGE_PROTO_SPECIFIED`: nft sets it for `redirect to :PORT`.
pub(super) const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 0x2;
pub(super) const NFTA_REJECT_TYPE: u16 = 1;
pub(super) const NFTA_REJECT_ICMP_CODE: u16 = 2;
/// `NFT_REJECT_TCP_RST` (code 0, as nft sends it) and `NFT_REJECT_ICMPX_UNREACH`
/// with `NFT_REJECT_ICMPX_PORT_UNREACH`.
pub(super) const NFT_REJECT_TCP_RST: u32 = 1;
pub(super) const NFT_REJECT_ICMPX_UNREACH: u32 = 2;
pub(super) const NFT_REJECT_ICMPX_PORT_UNREACH: u8 = 1;
/// `priority dstnat` of the hijack chain.
pub(super) const DSTNAT_PRIORITY_U32: u32 = DSTNAT_PRIORITY as u32;

/// `fib ... type` values (`RTN_*` of `rtnetlink.h`).
pub(super) const RTN_TYPES: [(&str, u32); 3] = [("local", 2), ("broadcast", 3), ("multicast", 5)];
/// `meta pkttype` values (`PACKET_*` of `if_packet.h`).
pub(super) const PKT_TYPES: [(&str, u8); 3] = [("host", 0), ("broadcast", 1), ("multicast", 2)];
/// `meta l4proto { tcp, udp }`.
pub(super) const IPPROTO_TCP: u8 = 6;
pub(super) const IPPROTO_UDP: u8 = 17;
