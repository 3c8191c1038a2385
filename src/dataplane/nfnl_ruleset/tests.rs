//! Unit tests of the encoder: the bytes of each message, and the decoded batch.

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
        .find(|m| m.msg_type & 0xff == NFT_MSG_NEWSET && m.attrs.contains(&s(NFTA_SET_NAME, name)))
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
        ]
    );
    let ifaces = &set_msg(&msgs, "exclude_ifaces").attrs;
    assert!(ifaces.contains(&be(NFTA_SET_FLAGS, 0)));
    assert!(ifaces.contains(&be(NFTA_SET_KEY_TYPE, TYPE_IFNAME)));
    assert!(ifaces.contains(&be(NFTA_SET_KEY_LEN, 16)));
    assert!(ifaces.contains(&v(NFTA_SET_USERDATA, &udata(1))));
    let ports = &set_msg(&msgs, "exclude_ports").attrs;
    assert!(!ports
        .iter()
        .any(|a| matches!(a, A::V(NFTA_SET_USERDATA, _))));
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
    let flat =
        |e: Vec<Elem>| -> Vec<(Vec<u8>, bool)> { e.into_iter().map(|e| (e.key, e.end)).collect() };
    // Starts at 0: no leading closing element. Reaches the top: no end.
    assert_eq!(
        flat(interval_elems(
            Family::V4,
            &nets(&["0.0.0.0/8", "255.255.255.0/24"])
        )),
        vec![
            (vec![0, 0, 0, 0], false),
            (vec![1, 0, 0, 0], true),
            (vec![255, 255, 255, 0], false),
        ]
    );
    assert_eq!(
        flat(interval_elems(Family::V6, &nets(&["::/0"]))),
        vec![(vec![0; 16], false)]
    );
    // Adjacent prefixes: the end of one and the start of the next share a key.
    assert_eq!(
        flat(interval_elems(
            Family::V4,
            &nets(&["10.0.1.0/24", "10.0.2.0/24"])
        )),
        vec![
            (vec![0, 0, 0, 0], true),
            (vec![10, 0, 1, 0], false),
            (vec![10, 0, 2, 0], true),
            (vec![10, 0, 2, 0], false),
            (vec![10, 0, 3, 0], true),
        ]
    );
    assert!(interval_elems(Family::V4, &[]).is_empty());
    // The open element is a bare start: nft's NFTNL_SET_ELEM_F_INTERVAL_OPEN user
    // data is not sent (docs/dataplane.md "User data").
    let mut p = plan();
    p.proxy_src = nets(&["0.0.0.0/0"]);
    let msgs = decode(&create(&build(&p)).unwrap());
    assert_eq!(
        elements(&msgs, "proxy_src4"),
        vec![A::N(
            1,
            vec![A::N(
                NFTA_SET_ELEM_KEY,
                vec![v(NFTA_DATA_VALUE, &[0, 0, 0, 0])]
            )]
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

/// Plans covering every match and action: the test plan; DNS hijack with bypass
/// blocking; fake-IP mode while down; prefixes at both ends of the address spaces,
/// adjacent ones, the largest port and mark.
fn plans() -> Vec<TproxyPlan> {
    let mut hijack = plan();
    hijack.dns_hijack_port = Some(5353);
    hijack.block_quic = true;
    hijack.block_dot = true;
    hijack.block_doh = vec![
        "1.1.1.1".parse().unwrap(),
        "2606:4700::1111".parse().unwrap(),
    ];
    let mut down = hijack.clone();
    down.fake_ip = vec![
        "198.18.0.1/16".parse().unwrap(),
        "fc00::/18".parse().unwrap(),
    ];
    down.proxy_down = true;
    let mut edge = plan();
    edge.proxy_src = [
        "0.0.0.0/8",
        "10.0.1.0/24",
        "10.0.2.0/24",
        "255.255.255.0/24",
        "::/0",
    ]
    .iter()
    .map(|c| c.parse().unwrap())
    .collect();
    edge.bypass_dst = ["0.0.0.0/0", "fd00::/8", "ffff::/16"]
        .iter()
        .map(|c| c.parse().unwrap())
        .collect();
    edge.exclude_ifaces = vec!["mesh0".into(), "wg-abcdefghijkl".into()];
    edge.exclude_ports = vec![1, 5555, 65535];
    edge.port = 65535;
    edge.mark = u32::MAX;
    vec![plan(), hijack, down, edge]
}

fn applied(table: Option<TableModel>, b: &Batch) -> Result<Option<TableModel>, DecodeError> {
    let mut table = table;
    model::apply(&mut table, &decode_batch(&b.bytes)?)?;
    Ok(table)
}

#[test]
fn decoded_create_and_replace_batches_hold_exactly_the_ruleset() {
    for p in plans() {
        let rs = build(&p);
        let want = Some(TableModel::of(&rs));
        let created = applied(None, &create(&rs).unwrap()).unwrap();
        assert_eq!(created, want, "{p:?}");
        // Replace over another table, and over the same one, gives the same.
        let other = applied(None, &create(&build(&plan())).unwrap()).unwrap();
        assert_eq!(applied(other, &replace(&rs).unwrap()).unwrap(), want);
        assert_eq!(applied(want.clone(), &replace(&rs).unwrap()).unwrap(), want);
        assert_eq!(applied(want.clone(), &delete().unwrap()).unwrap(), None);
        assert_eq!(applied(None, &delete().unwrap()).unwrap(), None);
    }
}

#[test]
fn ten_thousand_prefixes_decode_back_across_element_messages() {
    let mut p = plan();
    p.proxy_src = (0..10_000u32)
        .map(|i| IpNet::new(Ipv4Addr::from(0x0a00_0000 + (i << 9)).into(), 24).unwrap())
        .collect();
    let rs = build(&p);
    let table = applied(None, &create(&rs).unwrap()).unwrap().unwrap();
    assert_eq!(table, TableModel::of(&rs));
    assert_eq!(table.sets[0].elements.len(), 10_000);
}

#[test]
fn replace_and_delete_batches_name_only_our_table() {
    let rs = build(&plan());
    let msgs = decode_batch(&replace(&rs).unwrap().bytes).unwrap();
    assert_eq!(
        msgs[..2],
        [
            NftMessage::NewTable {
                name: "meduza".into(),
                flags: 0
            },
            NftMessage::DelTable {
                name: "meduza".into()
            }
        ]
    );
    assert!(msgs.iter().all(|m| m.table() == "meduza"));
    let created = decode_batch(&create(&rs).unwrap().bytes).unwrap();
    assert_eq!(created, msgs[2..]);
    assert_eq!(decode_batch(&delete().unwrap().bytes).unwrap(), msgs[..2]);
}

#[test]
fn the_decoder_refuses_a_damaged_batch() {
    let bytes = create(&build(&plan())).unwrap().bytes;
    // Truncated: the last message (BATCH_END) is cut.
    assert!(decode_batch(&bytes[..bytes.len() - 4]).is_err());
    // No BATCH_END at all.
    assert!(decode_batch(&bytes[..bytes.len() - 20]).is_err());
    // A message's family changed from inet (1) to ip (2).
    let mut other_family = bytes.clone();
    other_family[20 + 16] = 2;
    assert!(decode_batch(&other_family).is_err());
    // An attribute length one past the message.
    let mut bad_attr = bytes.clone();
    bad_attr[40] = 200;
    assert!(decode_batch(&bad_attr).is_err());
}

#[test]
fn the_model_refuses_what_the_kernel_refuses() {
    let rs = build(&plan());
    let create_msgs = decode_batch(&create(&rs).unwrap().bytes).unwrap();
    // Creating the table's objects again: a set that exists with another type.
    let mut table = applied(None, &create(&rs).unwrap()).unwrap();
    if let Some(t) = table.as_mut() {
        t.sets[0].kind = SetKind::Ipv6Addr;
        t.sets[0].elements.clear();
    }
    let err = model::apply(&mut table.clone(), &create_msgs).unwrap_err();
    assert!(err.0.contains("EEXIST"), "{err}");
    // Elements, chains or rules without their table.
    let err = model::apply(&mut None, &create_msgs[1..]).unwrap_err();
    assert!(err.0.contains("ENOENT"), "{err}");
}
