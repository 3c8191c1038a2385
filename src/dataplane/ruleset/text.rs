//! The ruleset in nft(8) syntax: what `meduza dataplane show` and `meduza dataplane
//! ruleset` print, the benchmark's `nft -f` anchor and the netlink oracle test's
//! input. The kernel never receives this text (it gets the netlink encoding of
//! `nfnl_ruleset`). Must not: parse anything or run `nft`.

use std::fmt::Write as _;
use std::net::IpAddr;

use super::{
    RejectWith, RuleAction, RuleMatch, RuleSpec, Ruleset, SetElem, CHAIN, CHAIN_HIJACK, TABLE,
};

// ---------------------------------------------------------------------------
// Text rendering (nft(8) syntax)
// ---------------------------------------------------------------------------

fn match_text(m: &RuleMatch) -> String {
    match m {
        RuleMatch::CtDirectionReply => "ct direction reply".into(),
        RuleMatch::FibDaddrType(t) => format!("fib daddr type {{ {} }}", t.join(", ")),
        RuleMatch::PktType(t) => format!("meta pkttype {{ {} }}", t.join(", ")),
        RuleMatch::SaddrInSet(f, set) => format!("{} saddr @{set}", f.proto()),
        RuleMatch::DaddrInSet(f, set) => format!("{} daddr @{set}", f.proto()),
        RuleMatch::IifnameInSet(set) => format!("iifname @{set}"),
        RuleMatch::L4protoTcpUdp => "meta l4proto { tcp, udp }".into(),
        RuleMatch::ThDportInSet(set) => format!("th dport @{set}"),
        RuleMatch::ThSportInSet(set) => format!("th sport @{set}"),
        RuleMatch::Dport(l4, port) => format!("{} dport {port}", l4.name()),
        RuleMatch::L4proto(l4) => format!("meta l4proto {}", l4.name()),
    }
}

fn action_text(a: &RuleAction) -> String {
    match a {
        RuleAction::Return => "return".into(),
        RuleAction::Tproxy {
            family,
            addr,
            port,
            mark,
        } => {
            let to = match addr {
                IpAddr::V4(a) => format!("{a}:{port}"),
                IpAddr::V6(a) => format!("[{a}]:{port}"),
            };
            format!(
                "tproxy {} to {to} meta mark set {mark:#x} accept",
                family.proto()
            )
        }
        RuleAction::Redirect { port } => format!("redirect to :{port}"),
        RuleAction::Reject(RejectWith::TcpReset) => "reject with tcp reset".into(),
        RuleAction::Reject(RejectWith::IcmpxPortUnreachable) => {
            "reject with icmpx type port-unreachable".into()
        }
    }
}

fn elem_text(e: &SetElem) -> String {
    match e {
        SetElem::Net(n) => n.to_string(),
        // Interface names are validated upstream ([A-Za-z0-9_.-]{1,15}), so quoting
        // needs no escaping.
        SetElem::Name(n) => format!("\"{n}\""),
        SetElem::Port(p) => p.to_string(),
    }
}

/// The ruleset in nft(8) syntax, loadable with `nft -f`.
pub fn to_text(rs: &Ruleset) -> String {
    let mut out = String::new();
    // `let _ =`: writing to a String cannot fail.
    let _ = writeln!(out, "table inet {TABLE} {{");
    for set in &rs.sets {
        let _ = writeln!(out, "\tset {} {{", set.name);
        let _ = writeln!(out, "\t\ttype {}", set.kind.nft_type());
        if set.kind.interval() {
            let _ = writeln!(out, "\t\tflags interval");
        }
        if !set.elements.is_empty() {
            let elems: Vec<String> = set.elements.iter().map(elem_text).collect();
            let _ = writeln!(out, "\t\telements = {{ {} }}", elems.join(", "));
        }
        let _ = writeln!(out, "\t}}");
    }
    let _ = writeln!(out, "\tchain {CHAIN} {{");
    let _ = writeln!(
        out,
        "\t\ttype filter hook prerouting priority mangle; policy accept;"
    );
    rules_text(&mut out, &rs.rules);
    let _ = writeln!(out, "\t}}");
    if !rs.hijack.is_empty() {
        let _ = writeln!(out, "\tchain {CHAIN_HIJACK} {{");
        let _ = writeln!(
            out,
            "\t\ttype nat hook prerouting priority dstnat; policy accept;"
        );
        rules_text(&mut out, &rs.hijack);
        let _ = writeln!(out, "\t}}");
    }
    let _ = writeln!(out, "}}");
    out
}

fn rules_text(out: &mut String, rules: &[RuleSpec]) {
    for rule in rules {
        let mut parts: Vec<String> = rule.matches.iter().map(match_text).collect();
        parts.push(action_text(&rule.action));
        let _ = writeln!(out, "\t\t{} comment \"{}\"", parts.join(" "), rule.comment);
    }
}
