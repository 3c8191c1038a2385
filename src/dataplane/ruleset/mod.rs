//! The nftables ruleset of table `inet meduza`, as data.
//!
//! Owns: the pure translation `TproxyPlan → Ruleset` (here), its nft text
//! ([`text`]: `show`, the benchmark anchor and the netlink oracle test) and the
//! comparison of an installed table (`nft -j list table inet meduza`) with the
//! desired one ([`compare`]). The kernel receives the netlink encoding of
//! `nfnl_ruleset`. Must not: run `nft`, touch any other table, or read the clock.
//!
//! Every list of addresses becomes one named set (CIDR sets carry the `interval`
//! flag), so 10,000 source CIDRs cost one set lookup, not 10,000 rules; the number of
//! rules does not depend on the number of addresses. DNS hijack (a nat chain) and the
//! bypass blocks (reject rules) are added only when the plan asks for them, so a plan
//! without them gives the table of before (docs/dns.md).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use meduza_generators::plan::tproxy::TproxyPlan;

pub mod compare;
#[cfg(test)]
mod tests;
pub mod text;

pub use compare::{
    chain_object, desired_view, objects, rule_object, set_object, view_of_listing, view_of_objects,
    ChainView, ElemsView, ListingError, RuleView, SetView, TableView,
};
pub use text::to_text;

/// The only table meduza owns (DESIGN §7).
pub const TABLE: &str = "meduza";
/// The TPROXY base chain (mangle); the only chain unless DNS hijack is on.
pub const CHAIN: &str = "prerouting";
/// `priority mangle` of the prerouting hook (nft(8): mangle = -150).
pub const MANGLE_PRIORITY: i32 = -150;
/// The nat chain of DNS hijack; exists only while hijack is on.
pub const CHAIN_HIJACK: &str = "dns_hijack";
/// `priority dstnat` of a nat prerouting chain (nft(8): dstnat = -100).
pub const DSTNAT_PRIORITY: i32 = -100;

/// Set names; stable so `nft list` output reads the same on every node.
pub const SET_PROXY_SRC4: &str = "proxy_src4";
pub const SET_PROXY_SRC6: &str = "proxy_src6";
pub const SET_BYPASS_DST4: &str = "bypass_dst4";
pub const SET_BYPASS_DST6: &str = "bypass_dst6";
pub const SET_EXCLUDE_SRC4: &str = "exclude_src4";
pub const SET_EXCLUDE_SRC6: &str = "exclude_src6";
pub const SET_EXCLUDE_IFACES: &str = "exclude_ifaces";
pub const SET_EXCLUDE_PORTS: &str = "exclude_ports";
/// DNS-over-HTTPS resolvers (`dns/block_doh`); exist only when the list is not empty.
pub const SET_DOH_DST4: &str = "doh_dst4";
pub const SET_DOH_DST6: &str = "doh_dst6";
/// mihomo's fake-IP ranges (`TproxyPlan::fake_ip`); exist only while TPROXY is
/// removed in fake-ip mode.
pub const SET_FAKE_DST4: &str = "fake_dst4";
pub const SET_FAKE_DST6: &str = "fake_dst6";

/// Layer-4 protocol of a port match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    Tcp,
    Udp,
}

impl L4 {
    pub fn name(self) -> &'static str {
        match self {
            L4::Tcp => "tcp",
            L4::Udp => "udp",
        }
    }
}

/// How a rejected packet is answered: never a silent drop, so the client gives up
/// (or falls back) at once instead of waiting for a timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectWith {
    /// `reject with tcp reset`
    TcpReset,
    /// `reject with icmpx type port-unreachable` (ICMP or ICMPv6 by family).
    IcmpxPortUnreachable,
}

/// IP family of a match or a TPROXY target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn proto(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }
}

/// Datatype of a named set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetKind {
    Ipv4Addr,
    Ipv6Addr,
    Ifname,
    InetService,
}

impl SetKind {
    fn nft_type(self) -> &'static str {
        match self {
            SetKind::Ipv4Addr => "ipv4_addr",
            SetKind::Ipv6Addr => "ipv6_addr",
            SetKind::Ifname => "ifname",
            SetKind::InetService => "inet_service",
        }
    }

    /// Address sets hold prefixes, which needs the `interval` flag.
    pub fn interval(self) -> bool {
        matches!(self, SetKind::Ipv4Addr | SetKind::Ipv6Addr)
    }
}

/// One element of a named set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetElem {
    Net(IpNet),
    Name(String),
    Port(u16),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedSet {
    pub name: &'static str,
    pub kind: SetKind,
    pub elements: Vec<SetElem>,
}

/// A match expression of one of our rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleMatch {
    /// `ct direction reply`
    CtDirectionReply,
    /// `fib daddr type { ... }`
    FibDaddrType(Vec<&'static str>),
    /// `meta pkttype { ... }`
    PktType(Vec<&'static str>),
    /// `ip[6] saddr @set`
    SaddrInSet(Family, &'static str),
    /// `ip[6] daddr @set`
    DaddrInSet(Family, &'static str),
    /// `iifname @set`
    IifnameInSet(&'static str),
    /// `meta l4proto { tcp, udp }`
    L4protoTcpUdp,
    /// `th dport @set`
    ThDportInSet(&'static str),
    /// `th sport @set`
    ThSportInSet(&'static str),
    /// `tcp dport N` / `udp dport N` (nft adds the `meta l4proto` dependency).
    Dport(L4, u16),
    /// `meta l4proto tcp` / `meta l4proto udp`
    L4proto(L4),
}

/// What a rule does once all its matches hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleAction {
    /// Leave our chain: the packet is routed normally.
    Return,
    /// `tproxy ip[6] to ADDR:PORT meta mark set MARK accept`. The `tproxy` statement
    /// is not terminal (the mark is set only when a transparent socket was found), so
    /// the rule ends in `accept` (child-interfaces §8).
    Tproxy {
        family: Family,
        addr: IpAddr,
        port: u16,
        mark: u32,
    },
    /// `redirect to :PORT` (nat chain): the destination becomes the primary address
    /// of the input interface, so the local listener must listen on it or a wildcard.
    Redirect { port: u16 },
    /// `reject with ...`
    Reject(RejectWith),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    /// Shown by `nft list`; says why the rule exists.
    pub comment: &'static str,
    pub matches: Vec<RuleMatch>,
    pub action: RuleAction,
}

/// The whole desired content of table `inet meduza`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub sets: Vec<NamedSet>,
    /// Rules of chain [`CHAIN`].
    pub rules: Vec<RuleSpec>,
    /// Rules of the nat chain [`CHAIN_HIJACK`]; the chain exists only when this is
    /// not empty, so a plan without hijack has the table of before.
    pub hijack: Vec<RuleSpec>,
}

fn nets_of(family: Family, nets: impl IntoIterator<Item = IpNet>) -> Vec<SetElem> {
    let picked: Vec<IpNet> = nets
        .into_iter()
        .filter(|n| {
            matches!(
                (family, n),
                (Family::V4, IpNet::V4(_)) | (Family::V6, IpNet::V6(_))
            )
        })
        .collect();
    // nft refuses overlapping intervals in a set without `auto-merge`
    // ("conflicting intervals specified"), and `lan` may contain `private_lan`:
    // aggregate first (this also truncates host bits).
    IpNet::aggregate(&picked)
        .into_iter()
        .map(SetElem::Net)
        .collect()
}

fn host_net(addr: IpAddr) -> IpNet {
    IpNet::from(addr)
}

/// Build the ruleset for a plan. Pure.
pub fn build(plan: &TproxyPlan) -> Ruleset {
    let exclude_src = plan.exclude_src.iter().copied().map(host_net);
    let mut ifaces: Vec<String> = plan.exclude_ifaces.clone();
    ifaces.sort();
    ifaces.dedup();
    let mut ports: Vec<u16> = plan.exclude_ports.clone();
    ports.sort_unstable();
    ports.dedup();
    let mut sets = vec![
        NamedSet {
            name: SET_PROXY_SRC4,
            kind: SetKind::Ipv4Addr,
            elements: nets_of(Family::V4, plan.proxy_src.iter().copied()),
        },
        NamedSet {
            name: SET_PROXY_SRC6,
            kind: SetKind::Ipv6Addr,
            elements: nets_of(Family::V6, plan.proxy_src.iter().copied()),
        },
        NamedSet {
            name: SET_BYPASS_DST4,
            kind: SetKind::Ipv4Addr,
            elements: nets_of(Family::V4, plan.bypass_dst.iter().copied()),
        },
        NamedSet {
            name: SET_BYPASS_DST6,
            kind: SetKind::Ipv6Addr,
            elements: nets_of(Family::V6, plan.bypass_dst.iter().copied()),
        },
        NamedSet {
            name: SET_EXCLUDE_SRC4,
            kind: SetKind::Ipv4Addr,
            elements: nets_of(Family::V4, exclude_src.clone()),
        },
        NamedSet {
            name: SET_EXCLUDE_SRC6,
            kind: SetKind::Ipv6Addr,
            elements: nets_of(Family::V6, exclude_src),
        },
        NamedSet {
            name: SET_EXCLUDE_IFACES,
            kind: SetKind::Ifname,
            elements: ifaces.into_iter().map(SetElem::Name).collect(),
        },
        NamedSet {
            name: SET_EXCLUDE_PORTS,
            kind: SetKind::InetService,
            elements: ports.into_iter().map(SetElem::Port).collect(),
        },
    ];
    let ret = |comment: &'static str, matches: Vec<RuleMatch>| RuleSpec {
        comment,
        matches,
        action: RuleAction::Return,
    };
    let mut rules = vec![
        ret("reply direction", vec![RuleMatch::CtDirectionReply]),
        ret(
            "destination local to the gateway, broadcast or multicast",
            vec![RuleMatch::FibDaddrType(vec![
                "local",
                "broadcast",
                "multicast",
            ])],
        ),
        ret(
            "link-layer broadcast or multicast",
            vec![RuleMatch::PktType(vec!["broadcast", "multicast"])],
        ),
        ret(
            "destination inside the node's own LANs",
            vec![RuleMatch::DaddrInSet(Family::V4, SET_BYPASS_DST4)],
        ),
        ret(
            "destination inside the node's own LANs",
            vec![RuleMatch::DaddrInSet(Family::V6, SET_BYPASS_DST6)],
        ),
        ret(
            "excluded source (DEFAULT_GW)",
            vec![RuleMatch::SaddrInSet(Family::V4, SET_EXCLUDE_SRC4)],
        ),
        ret(
            "excluded source (DEFAULT_GW)",
            vec![RuleMatch::SaddrInSet(Family::V6, SET_EXCLUDE_SRC6)],
        ),
        ret(
            "mesh and VPN interfaces",
            vec![RuleMatch::IifnameInSet(SET_EXCLUDE_IFACES)],
        ),
        ret(
            "excluded destination port",
            vec![
                RuleMatch::L4protoTcpUdp,
                RuleMatch::ThDportInSet(SET_EXCLUDE_PORTS),
            ],
        ),
        ret(
            "excluded source port",
            vec![
                RuleMatch::L4protoTcpUdp,
                RuleMatch::ThSportInSet(SET_EXCLUDE_PORTS),
            ],
        ),
    ];
    if plan.proxy_down {
        // TPROXY removed: the exclusions, then only the fake-range rejects.
        rules.extend(fake_ip_rules(plan, &mut sets));
        return Ruleset {
            sets,
            rules,
            hijack: Vec::new(),
        };
    }
    rules.extend(block_rules(plan));
    if plan.dns_hijack_port.is_some() {
        // The mangle chain runs before the nat chain (-150 < -100): without these,
        // TPROXY would hand the query to mihomo before `redirect` could take it.
        for l4 in [L4::Udp, L4::Tcp] {
            rules.push(ret(
                "DNS goes to the frontend (chain dns_hijack)",
                vec![RuleMatch::Dport(l4, 53)],
            ));
        }
    }
    rules.extend([
        RuleSpec {
            comment: "proxied LAN source to mihomo",
            matches: vec![
                RuleMatch::SaddrInSet(Family::V4, SET_PROXY_SRC4),
                RuleMatch::L4protoTcpUdp,
            ],
            action: RuleAction::Tproxy {
                family: Family::V4,
                addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
                port: plan.port,
                mark: plan.mark,
            },
        },
        RuleSpec {
            comment: "proxied LAN source to mihomo",
            matches: vec![
                RuleMatch::SaddrInSet(Family::V6, SET_PROXY_SRC6),
                RuleMatch::L4protoTcpUdp,
            ],
            action: RuleAction::Tproxy {
                family: Family::V6,
                addr: IpAddr::V6(Ipv6Addr::LOCALHOST),
                port: plan.port,
                mark: plan.mark,
            },
        },
    ]);
    let doh4 = nets_of(Family::V4, plan.block_doh.iter().copied().map(host_net));
    let doh6 = nets_of(Family::V6, plan.block_doh.iter().copied().map(host_net));
    for (name, kind, elements) in [
        (SET_DOH_DST4, SetKind::Ipv4Addr, doh4),
        (SET_DOH_DST6, SetKind::Ipv6Addr, doh6),
    ] {
        if !elements.is_empty() {
            sets.push(NamedSet {
                name,
                kind,
                elements,
            });
        }
    }
    let hijack = plan.dns_hijack_port.map(hijack_rules).unwrap_or_default();
    Ruleset {
        sets,
        rules,
        hijack,
    }
}

const PROXY_SRC: [(Family, &str); 2] = [(Family::V4, SET_PROXY_SRC4), (Family::V6, SET_PROXY_SRC6)];

/// Bypass blocking (`dns/block_*`), between the exclusions and the TPROXY rules: an
/// excluded packet is never rejected, and a rejected one never reaches mihomo.
fn block_rules(plan: &TproxyPlan) -> Vec<RuleSpec> {
    let mut out = Vec::new();
    for (family, src) in PROXY_SRC {
        let from = || RuleMatch::SaddrInSet(family, src);
        let reject = |comment, matches, with| RuleSpec {
            comment,
            matches,
            action: RuleAction::Reject(with),
        };
        if plan.block_quic {
            out.push(reject(
                "QUIC from a proxied LAN source: browsers fall back to TCP",
                vec![from(), RuleMatch::Dport(L4::Udp, 443)],
                RejectWith::IcmpxPortUnreachable,
            ));
        }
        if plan.block_dot {
            out.push(reject(
                "DNS over TLS bypasses the gateway's DNS",
                vec![from(), RuleMatch::Dport(L4::Tcp, 853)],
                RejectWith::TcpReset,
            ));
            out.push(reject(
                "DNS over QUIC bypasses the gateway's DNS",
                vec![from(), RuleMatch::Dport(L4::Udp, 853)],
                RejectWith::IcmpxPortUnreachable,
            ));
        }
        let has_doh = plan.block_doh.iter().any(|a| match family {
            Family::V4 => a.is_ipv4(),
            Family::V6 => a.is_ipv6(),
        });
        if has_doh {
            let doh = match family {
                Family::V4 => SET_DOH_DST4,
                Family::V6 => SET_DOH_DST6,
            };
            out.push(reject(
                "DNS over HTTPS bypasses the gateway's DNS",
                vec![
                    from(),
                    RuleMatch::DaddrInSet(family, doh),
                    RuleMatch::Dport(L4::Tcp, 443),
                ],
                RejectWith::TcpReset,
            ));
            out.push(reject(
                "DNS over HTTPS bypasses the gateway's DNS",
                vec![
                    from(),
                    RuleMatch::DaddrInSet(family, doh),
                    RuleMatch::Dport(L4::Udp, 443),
                ],
                RejectWith::IcmpxPortUnreachable,
            ));
        }
    }
    out
}

/// Fake-IP fail-fast (`TproxyPlan::while_down`): from a proxied LAN source to one of
/// mihomo's fake ranges, TCP is reset and anything else gets an ICMP port
/// unreachable, so the client gives up at once and resolves the name again (the
/// frontend, with mihomo out of its chain, now answers a real address). Adds the
/// `fake_dst` sets the rules use.
fn fake_ip_rules(plan: &TproxyPlan, sets: &mut Vec<NamedSet>) -> Vec<RuleSpec> {
    let mut out = Vec::new();
    for ((family, src), (name, kind)) in PROXY_SRC.into_iter().zip([
        (SET_FAKE_DST4, SetKind::Ipv4Addr),
        (SET_FAKE_DST6, SetKind::Ipv6Addr),
    ]) {
        let elements = nets_of(family, plan.fake_ip.iter().copied());
        if elements.is_empty() {
            continue;
        }
        sets.push(NamedSet {
            name,
            kind,
            elements,
        });
        let to_fake = || {
            vec![
                RuleMatch::SaddrInSet(family, src),
                RuleMatch::DaddrInSet(family, name),
            ]
        };
        let mut tcp = to_fake();
        tcp.push(RuleMatch::L4proto(L4::Tcp));
        out.push(RuleSpec {
            comment: "fake IP while mihomo is down: fail now, resolve again",
            matches: tcp,
            action: RuleAction::Reject(RejectWith::TcpReset),
        });
        out.push(RuleSpec {
            comment: "fake IP while mihomo is down: fail now, resolve again",
            matches: to_fake(),
            action: RuleAction::Reject(RejectWith::IcmpxPortUnreachable),
        });
    }
    out
}

/// DNS hijack: the rules of the nat chain. The same exclusions as TPROXY (excluded
/// sources, mesh and VPN interfaces, the node's own LANs as destination), then port 53
/// from a proxied source, UDP and TCP, to the frontend. Only the prerouting hook:
/// the frontend's and mihomo's own upstream queries originate on the gateway (output
/// hook) and are never caught.
fn hijack_rules(port: u16) -> Vec<RuleSpec> {
    let ret = |comment: &'static str, m: RuleMatch| RuleSpec {
        comment,
        matches: vec![m],
        action: RuleAction::Return,
    };
    let mut out = vec![
        ret(
            "excluded source (DEFAULT_GW)",
            RuleMatch::SaddrInSet(Family::V4, SET_EXCLUDE_SRC4),
        ),
        ret(
            "excluded source (DEFAULT_GW)",
            RuleMatch::SaddrInSet(Family::V6, SET_EXCLUDE_SRC6),
        ),
        ret(
            "mesh and VPN interfaces",
            RuleMatch::IifnameInSet(SET_EXCLUDE_IFACES),
        ),
        ret(
            "destination inside the node's own LANs",
            RuleMatch::DaddrInSet(Family::V4, SET_BYPASS_DST4),
        ),
        ret(
            "destination inside the node's own LANs",
            RuleMatch::DaddrInSet(Family::V6, SET_BYPASS_DST6),
        ),
    ];
    for (family, src) in PROXY_SRC {
        for l4 in [L4::Udp, L4::Tcp] {
            out.push(RuleSpec {
                comment: "DNS from a proxied LAN source to the frontend",
                matches: vec![RuleMatch::SaddrInSet(family, src), RuleMatch::Dport(l4, 53)],
                action: RuleAction::Redirect { port },
            });
        }
    }
    out
}
