//! Unit tests of the ruleset: building, the nft text and the listing comparison.

use serde_json::Value;

use super::compare::{addr_bits, elem_range, merge_ranges, objects, rule_exprs};
use super::*;

fn plan() -> TproxyPlan {
    let mut p = TproxyPlan::empty();
    p.proxy_src = vec![
        "192.168.50.0/24".parse().unwrap(),
        "fd00:50::/64".parse().unwrap(),
        "10.8.0.0/16".parse().unwrap(),
    ];
    p.bypass_dst = vec![
        "192.168.50.0/24".parse().unwrap(),
        "fd00:50::/64".parse().unwrap(),
    ];
    p.exclude_src = vec!["192.168.50.254".parse().unwrap()];
    p.exclude_ifaces = vec!["wg-a".into(), "tinc0".into()];
    p.exclude_ports = vec![655, 51820, 655];
    p
}

fn set<'a>(rs: &'a Ruleset, name: &str) -> &'a NamedSet {
    rs.sets.iter().find(|s| s.name == name).unwrap()
}

#[test]
fn proxy_sources_split_by_family_into_interval_sets() {
    let rs = build(&plan());
    let v4 = set(&rs, SET_PROXY_SRC4);
    assert_eq!(v4.kind, SetKind::Ipv4Addr);
    assert!(v4.kind.interval());
    assert_eq!(
        v4.elements,
        vec![
            SetElem::Net("10.8.0.0/16".parse().unwrap()),
            SetElem::Net("192.168.50.0/24".parse().unwrap())
        ]
    );
    assert_eq!(
        set(&rs, SET_PROXY_SRC6).elements,
        vec![SetElem::Net("fd00:50::/64".parse().unwrap())]
    );
}

#[test]
fn tproxy_rules_mark_and_accept_for_both_families() {
    let rs = build(&plan());
    let tproxy: Vec<&RuleSpec> = rs
        .rules
        .iter()
        .filter(|r| matches!(r.action, RuleAction::Tproxy { .. }))
        .collect();
    assert_eq!(tproxy.len(), 2);
    assert_eq!(
        tproxy[0].action,
        RuleAction::Tproxy {
            family: Family::V4,
            addr: "127.0.0.1".parse().unwrap(),
            port: 7893,
            mark: 0x1
        }
    );
    assert_eq!(
        tproxy[0].matches,
        vec![
            RuleMatch::SaddrInSet(Family::V4, SET_PROXY_SRC4),
            RuleMatch::L4protoTcpUdp
        ]
    );
    assert_eq!(
        tproxy[1].action,
        RuleAction::Tproxy {
            family: Family::V6,
            addr: "::1".parse().unwrap(),
            port: 7893,
            mark: 0x1
        }
    );
    // The rendered JSON ends with tproxy, mark, accept: tproxy is not terminal.
    let exprs = rule_exprs(&tproxy[0].matches, &tproxy[0].action);
    let tail: Vec<Value> = exprs[exprs.len() - 3..]
        .iter()
        .map(|e| serde_json::to_value(e).unwrap())
        .collect();
    assert_eq!(
        tail,
        vec![
            serde_json::json!({"tproxy": {"family": "ip", "addr": "127.0.0.1", "port": 7893}}),
            serde_json::json!({"mangle": {"key": {"meta": {"key": "mark"}}, "value": 1}}),
            serde_json::json!({"accept": null}),
        ]
    );
}

#[test]
fn every_bypass_returns_before_the_tproxy_rules() {
    let rs = build(&plan());
    let first_tproxy = rs
        .rules
        .iter()
        .position(|r| matches!(r.action, RuleAction::Tproxy { .. }))
        .unwrap();
    let bypasses = &rs.rules[..first_tproxy];
    assert!(bypasses.iter().all(|r| r.action == RuleAction::Return));
    let has = |m: RuleMatch| bypasses.iter().any(|r| r.matches.contains(&m));
    assert!(has(RuleMatch::CtDirectionReply));
    assert!(has(RuleMatch::FibDaddrType(vec![
        "local",
        "broadcast",
        "multicast"
    ])));
    assert!(has(RuleMatch::PktType(vec!["broadcast", "multicast"])));
    assert!(has(RuleMatch::DaddrInSet(Family::V4, SET_BYPASS_DST4)));
    assert!(has(RuleMatch::DaddrInSet(Family::V6, SET_BYPASS_DST6)));
    assert!(has(RuleMatch::SaddrInSet(Family::V4, SET_EXCLUDE_SRC4)));
    assert!(has(RuleMatch::SaddrInSet(Family::V6, SET_EXCLUDE_SRC6)));
    assert!(has(RuleMatch::IifnameInSet(SET_EXCLUDE_IFACES)));
    assert!(has(RuleMatch::ThDportInSet(SET_EXCLUDE_PORTS)));
    assert!(has(RuleMatch::ThSportInSet(SET_EXCLUDE_PORTS)));
    assert_eq!(rs.rules[0].matches, vec![RuleMatch::CtDirectionReply]);
}

#[test]
fn exclusions_land_in_their_sets_deduplicated() {
    let rs = build(&plan());
    assert_eq!(
        set(&rs, SET_EXCLUDE_SRC4).elements,
        vec![SetElem::Net("192.168.50.254/32".parse().unwrap())]
    );
    assert!(set(&rs, SET_EXCLUDE_SRC6).elements.is_empty());
    assert_eq!(
        set(&rs, SET_EXCLUDE_IFACES).elements,
        vec![SetElem::Name("tinc0".into()), SetElem::Name("wg-a".into())]
    );
    assert_eq!(
        set(&rs, SET_EXCLUDE_PORTS).elements,
        vec![SetElem::Port(655), SetElem::Port(51820)]
    );
    assert_eq!(
        set(&rs, SET_BYPASS_DST4).elements,
        vec![SetElem::Net("192.168.50.0/24".parse().unwrap())]
    );
}

#[test]
fn ten_thousand_cidrs_cost_one_set_not_more_rules() {
    let small = build(&plan());
    let mut big_plan = plan();
    big_plan.proxy_src = (0..10_000u32)
        .map(|i| {
            let a = Ipv4Addr::from(0x0a00_0000 + (i << 8));
            IpNet::new(IpAddr::V4(a), 24).unwrap()
        })
        .collect();
    // Every other /24 so aggregation cannot merge them.
    big_plan
        .proxy_src
        .retain(|n| (addr_bits(n.addr()) >> 8) % 2 == 0);
    let big = build(&big_plan);
    assert_eq!(big.rules.len(), small.rules.len());
    assert_eq!(big.sets.len(), small.sets.len());
    assert_eq!(set(&big, SET_PROXY_SRC4).elements.len(), 5_000);
}

#[test]
fn overlapping_and_adjacent_cidrs_are_aggregated() {
    let mut p = plan();
    p.proxy_src = vec![
        "192.168.0.0/16".parse().unwrap(),
        "192.168.1.0/24".parse().unwrap(),
        "10.0.0.0/25".parse().unwrap(),
        "10.0.0.128/25".parse().unwrap(),
        "10.0.1.7/24".parse().unwrap(),
    ];
    let rs = build(&p);
    assert_eq!(
        set(&rs, SET_PROXY_SRC4).elements,
        vec![
            SetElem::Net("10.0.0.0/23".parse().unwrap()),
            SetElem::Net("192.168.0.0/16".parse().unwrap()),
        ]
    );
}

#[test]
fn listing_without_protocol_names_matches_the_desired_view() {
    // nft without /etc/protocols lists `meta l4proto { 6, 17 }`; with it,
    // `{ tcp, udp }`. Both are the table we want.
    let rs = build(&plan());
    let desired = desired_view(&rs);
    let objs: Vec<Value> = objects(&rs)
        .into_iter()
        .map(|o| serde_json::to_value(&o).unwrap())
        .collect();
    let text = serde_json::to_string(&objs).unwrap();
    assert!(text.contains(r#"{"set":["tcp","udp"]}"#), "{text}");
    let numeric: Vec<Value> =
        serde_json::from_str(&text.replace(r#"{"set":["tcp","udp"]}"#, r#"{"set":[6,17]}"#))
            .unwrap();
    assert_eq!(view_of_objects(&numeric).unwrap().unwrap(), desired);
    // Other values are left alone: a different protocol is still a difference.
    let other: Vec<Value> =
        serde_json::from_str(&text.replace(r#"{"set":["tcp","udp"]}"#, r#"{"set":[6,132]}"#))
            .unwrap();
    assert_ne!(view_of_objects(&other).unwrap().unwrap(), desired);
}

/// What `nft -j list table inet meduza` printed (nft 1.0.6) after applying the
/// text of a small plan: sets come back sorted, /32 as a bare address, adjacent
/// prefixes separate, handles added.
fn listing_like_nft(rs: &Ruleset) -> Value {
    let mut objs =
        vec![serde_json::json!({"metainfo": {"version": "1.0.6", "json_schema_version": 1}})];
    for (handle, o) in (1u32..).zip(objects(rs)) {
        let mut v = serde_json::to_value(&o).unwrap();
        let (_, inner) = v.as_object_mut().unwrap().iter_mut().next().unwrap();
        inner["handle"] = handle.into();
        if let Some(Value::Array(elems)) = inner.get_mut("elem") {
            for e in elems.iter_mut() {
                if e["prefix"]["len"] == 32 {
                    *e = e["prefix"]["addr"].clone();
                }
            }
            elems.reverse();
        }
        if let Some(Value::Array(flags)) = inner.get_mut("flags") {
            flags.reverse();
        }
        objs.push(v);
    }
    serde_json::json!({ "nftables": objs })
}

#[test]
fn installed_listing_compares_equal_to_desired() {
    let rs = build(&plan());
    let installed = view_of_listing(&listing_like_nft(&rs)).unwrap().unwrap();
    assert_eq!(installed, desired_view(&rs));
}

#[test]
fn listing_with_a_missing_rule_or_element_differs() {
    let rs = build(&plan());
    let mut listing = listing_like_nft(&rs);
    listing["nftables"].as_array_mut().unwrap().pop();
    let installed = view_of_listing(&listing).unwrap().unwrap();
    assert_ne!(installed, desired_view(&rs));

    let mut other = plan();
    other.proxy_src.push("172.16.0.0/12".parse().unwrap());
    let installed = view_of_listing(&listing_like_nft(&build(&other)))
        .unwrap()
        .unwrap();
    assert_ne!(installed, desired_view(&rs));
}

#[test]
fn listing_without_our_table_is_none_and_foreign_tables_are_ignored() {
    let listing = serde_json::json!({"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"table": {"family": "inet", "name": "fw4_standin", "handle": 1}},
        {"chain": {"family": "inet", "table": "fw4_standin", "name": "input", "handle": 1}},
    ]});
    assert_eq!(view_of_listing(&listing).unwrap(), None);
    assert!(view_of_listing(&serde_json::json!({"x": 1})).is_err());
}

#[test]
fn ranges_and_prefixes_normalise_to_the_same_intervals() {
    let a = merge_ranges(vec![
        elem_range(&serde_json::json!({"prefix": {"addr": "10.1.0.0", "len": 16}})).unwrap(),
        elem_range(&serde_json::json!({"prefix": {"addr": "10.2.0.0", "len": 16}})).unwrap(),
    ]);
    let b = merge_ranges(vec![elem_range(
        &serde_json::json!({"range": ["10.1.0.0", "10.2.255.255"]}),
    )
    .unwrap()]);
    assert_eq!(a, b);
}

#[test]
fn plan_without_dns_guard_keeps_the_table_of_before() {
    let rs = build(&plan());
    assert_eq!(rs.rules.len(), 12);
    assert_eq!(rs.sets.len(), 8);
    assert!(rs.hijack.is_empty());
    assert!(!to_text(&rs).contains(CHAIN_HIJACK));
}

#[test]
fn hijack_redirects_port_53_of_proxied_sources_after_the_exclusions() {
    let mut p = plan();
    p.dns_hijack_port = Some(53);
    let rs = build(&p);
    let text = to_text(&rs);
    assert!(text.contains(
        "\tchain dns_hijack {\n\t\ttype nat hook prerouting priority dstnat; policy accept;"
    ));
    for family in ["ip", "ip6"] {
        for l4 in ["udp", "tcp"] {
            let set = if family == "ip" {
                "proxy_src4"
            } else {
                "proxy_src6"
            };
            assert!(
                text.contains(&format!(
                    "{family} saddr @{set} {l4} dport 53 redirect to :53 comment"
                )),
                "{text}"
            );
        }
    }
    // Every return of the nat chain comes before its first redirect.
    let first_redirect = rs
        .hijack
        .iter()
        .position(|r| matches!(r.action, RuleAction::Redirect { .. }))
        .unwrap();
    assert_eq!(first_redirect, 5);
    assert!(rs.hijack[..5]
        .iter()
        .all(|r| r.action == RuleAction::Return));
    // The mangle chain lets DNS through to the nat chain instead of TPROXY.
    let dns_returns: Vec<usize> = rs
        .rules
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            r.matches
                .iter()
                .any(|m| matches!(m, RuleMatch::Dport(_, 53)))
        })
        .map(|(i, _)| i)
        .collect();
    let first_tproxy = rs
        .rules
        .iter()
        .position(|r| matches!(r.action, RuleAction::Tproxy { .. }))
        .unwrap();
    assert_eq!(dns_returns.len(), 2);
    assert!(dns_returns.iter().all(|i| *i < first_tproxy));
    // Desired view of a hijacked plan equals itself through the listing reader.
    assert_eq!(desired_view(&rs).chains.len(), 2);
}

#[test]
fn bypass_blocks_reject_at_once_between_exclusions_and_tproxy() {
    let mut p = plan();
    p.block_quic = true;
    p.block_dot = true;
    p.block_doh = vec!["1.1.1.1".parse().unwrap()];
    let rs = build(&p);
    let text = to_text(&rs);
    for line in [
        "ip saddr @proxy_src4 udp dport 443 reject with icmpx type port-unreachable",
        "ip6 saddr @proxy_src6 udp dport 443 reject with icmpx type port-unreachable",
        "ip saddr @proxy_src4 tcp dport 853 reject with tcp reset",
        "ip6 saddr @proxy_src6 udp dport 853 reject with icmpx type port-unreachable",
        "ip saddr @proxy_src4 ip daddr @doh_dst4 tcp dport 443 reject with tcp reset",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
    // Only an IPv4 resolver: no IPv6 DoH set or rule.
    assert!(text.contains("set doh_dst4"));
    assert!(!text.contains("doh_dst6"));
    let rejects: Vec<usize> = (0..rs.rules.len())
        .filter(|i| matches!(rs.rules[*i].action, RuleAction::Reject(_)))
        .collect();
    // QUIC and DoT (TCP, UDP) for each family, DoH (TCP, UDP) for IPv4 only.
    assert_eq!(rejects.len(), 2 + 4 + 2);
    assert_eq!(rejects[0], 10, "after the ten exclusions");
    assert!(rejects
        .iter()
        .all(|i| !matches!(rs.rules[*i + 1].action, RuleAction::Return)));
    assert!(rs.hijack.is_empty());
}

#[test]
fn while_down_in_fake_ip_mode_only_rejects_the_fake_ranges() {
    let mut p = plan();
    p.fake_ip = vec!["198.18.0.1/16".parse().unwrap()];
    p.dns_hijack_port = Some(53);
    p.block_quic = true;
    // Applied: the fake range is proxied like any destination, no reject.
    let up = to_text(&build(&p));
    assert!(!up.contains("fake_dst"), "{up}");
    let rs = build(&p.while_down().expect("fake-ip mode"));
    let text = to_text(&rs);
    for line in [
        "ip saddr @proxy_src4 ip daddr @fake_dst4 meta l4proto tcp reject with tcp reset",
        "ip saddr @proxy_src4 ip daddr @fake_dst4 reject with icmpx type port-unreachable",
        "elements = { 198.18.0.0/16 }",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
    // No IPv6 range: no IPv6 set or rule. Nothing intercepted, hijacked or
    // blocked while mihomo is down.
    assert!(!text.contains("fake_dst6"), "{text}");
    assert!(rs.hijack.is_empty());
    assert!(
        !text.contains("tproxy") && !text.contains("dport 443"),
        "{text}"
    );
    // The TCP reset comes first (the catch-all would answer TCP with ICMP), both
    // after the ten exclusions.
    let rejects: Vec<&RuleSpec> = rs.rules[10..].iter().collect();
    assert_eq!(rejects.len(), 2);
    assert_eq!(rejects[0].action, RuleAction::Reject(RejectWith::TcpReset));
    assert!(rs.rules[..10]
        .iter()
        .all(|r| r.action == RuleAction::Return));
}

#[test]
fn text_rendering_names_every_set_and_rule() {
    let text = to_text(&build(&plan()));
    assert!(text.starts_with("table inet meduza {"));
    assert!(text.contains("set proxy_src4 {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { 10.8.0.0/16, 192.168.50.0/24 }"));
    assert!(text.contains("elements = { \"tinc0\", \"wg-a\" }"));
    assert!(text.contains("type filter hook prerouting priority mangle; policy accept;"));
    assert!(text.contains(
        "ip saddr @proxy_src4 meta l4proto { tcp, udp } tproxy ip to 127.0.0.1:7893 meta mark set 0x1 accept"
    ));
    assert!(text.contains(
        "ip6 saddr @proxy_src6 meta l4proto { tcp, udp } tproxy ip6 to [::1]:7893 meta mark set 0x1 accept"
    ));
    assert!(text.contains("ct direction reply return"));
    assert_eq!(
        text.matches(" comment ").count(),
        build(&plan()).rules.len()
    );
}
