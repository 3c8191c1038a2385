//! The nftables ruleset of table `inet meduza`, as data.
//!
//! Owns: the pure translation `TproxyPlan → Ruleset`, its two renderings here (the
//! libnftables JSON batch, which `FakeNft` models and the `off` mode logs, and nft
//! text for `show`, the benchmark anchor and the netlink oracle test; the kernel
//! receives the netlink encoding of `nfnl_ruleset`), and the comparison of an
//! installed table (`nft -j list table inet meduza`) with the desired one. Must not:
//! run `nft`, touch any other table, or read the clock.
//!
//! Every list of addresses becomes one named set (CIDR sets carry the `interval`
//! flag), so 10,000 source CIDRs cost one set lookup, not 10,000 rules; the number of
//! rules does not depend on the number of addresses. DNS hijack (a nat chain) and the
//! bypass blocks (reject rules) are added only when the plan asks for them, so a plan
//! without them gives the table of before (docs/dns.md).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use meduza_generators::plan::tproxy::TproxyPlan;
use nftables::batch::Batch;
use nftables::expr::{
    Expression, Fib, FibFlag, FibResult, Meta, MetaKey, NamedExpression, Payload, PayloadField,
    Prefix, SetItem, CT,
};
use nftables::schema::{self, NfListObject, Nftables, SetFlag, SetType, SetTypeValue};
use nftables::stmt::{Mangle, Match, Operator, Reject, RejectType, Statement, TProxy, NAT};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook, RejectCode};
use serde_json::Value;

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

// ---------------------------------------------------------------------------
// JSON rendering (libnftables-json(5), in the form `nft -j list` prints back)
// ---------------------------------------------------------------------------

fn s(v: &str) -> Expression<'static> {
    Expression::String(Cow::Owned(v.to_string()))
}

fn anon_set(items: &[&str]) -> Expression<'static> {
    Expression::Named(NamedExpression::Set(
        items.iter().map(|i| SetItem::Element(s(i))).collect(),
    ))
}

fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

fn payload(proto: &str, field: &str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Owned(proto.to_string()),
            field: Cow::Owned(field.to_string()),
        },
    )))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn set_ref(name: &str) -> Expression<'static> {
    s(&format!("@{name}"))
}

fn match_stmt(m: &RuleMatch) -> Statement<'static> {
    match m {
        RuleMatch::CtDirectionReply => eq(
            Expression::Named(NamedExpression::CT(CT {
                key: Cow::Borrowed("direction"),
                family: None,
                dir: None,
            })),
            s("reply"),
        ),
        RuleMatch::FibDaddrType(types) => eq(
            Expression::Named(NamedExpression::Fib(Fib {
                result: FibResult::Type,
                flags: HashSet::from([FibFlag::Daddr]),
            })),
            anon_set(types),
        ),
        RuleMatch::PktType(types) => eq(meta(MetaKey::Pkttype), anon_set(types)),
        RuleMatch::SaddrInSet(f, set) => eq(payload(f.proto(), "saddr"), set_ref(set)),
        RuleMatch::DaddrInSet(f, set) => eq(payload(f.proto(), "daddr"), set_ref(set)),
        RuleMatch::IifnameInSet(set) => eq(meta(MetaKey::Iifname), set_ref(set)),
        RuleMatch::L4protoTcpUdp => eq(meta(MetaKey::L4proto), anon_set(&["tcp", "udp"])),
        RuleMatch::ThDportInSet(set) => eq(payload("th", "dport"), set_ref(set)),
        RuleMatch::ThSportInSet(set) => eq(payload("th", "sport"), set_ref(set)),
        RuleMatch::Dport(l4, port) => eq(
            payload(l4.name(), "dport"),
            Expression::Number(u32::from(*port)),
        ),
        RuleMatch::L4proto(l4) => eq(meta(MetaKey::L4proto), s(l4.name())),
    }
}

fn rule_exprs(rule: &RuleSpec) -> Vec<Statement<'static>> {
    let mut out: Vec<Statement<'static>> = rule.matches.iter().map(match_stmt).collect();
    match &rule.action {
        RuleAction::Return => out.push(Statement::Return(None)),
        RuleAction::Tproxy {
            family,
            addr,
            port,
            mark,
        } => {
            out.push(Statement::TProxy(TProxy {
                family: Some(Cow::Borrowed(family.proto())),
                port: *port,
                addr: Some(Cow::Owned(addr.to_string())),
            }));
            out.push(Statement::Mangle(Mangle {
                key: meta(MetaKey::Mark),
                value: Expression::Number(*mark),
            }));
            out.push(Statement::Accept(None));
        }
        RuleAction::Redirect { port } => out.push(Statement::Redirect(Some(NAT {
            addr: None,
            family: None,
            port: Some(Expression::Number(u32::from(*port))),
            flags: None,
        }))),
        RuleAction::Reject(RejectWith::TcpReset) => out.push(Statement::Reject(Some(Reject::new(
            Some(RejectType::TCPReset),
            None,
        )))),
        RuleAction::Reject(RejectWith::IcmpxPortUnreachable) => out.push(Statement::Reject(Some(
            Reject::new(Some(RejectType::ICMPX), Some(RejectCode::PortUnreach)),
        ))),
    }
    out
}

fn elem_expr(e: &SetElem) -> Expression<'static> {
    match e {
        SetElem::Net(net) => Expression::Named(NamedExpression::Prefix(Prefix {
            addr: Box::new(s(&net.addr().to_string())),
            len: u32::from(net.prefix_len()),
        })),
        SetElem::Name(n) => s(n),
        SetElem::Port(p) => Expression::Number(u32::from(*p)),
    }
}

fn set_type(kind: SetKind) -> SetType {
    match kind {
        SetKind::Ipv4Addr => SetType::Ipv4Addr,
        SetKind::Ipv6Addr => SetType::Ipv6Addr,
        SetKind::Ifname => SetType::Ifname,
        SetKind::InetService => SetType::InetService,
    }
}

fn table_obj() -> schema::Table<'static> {
    schema::Table {
        family: NfFamily::INet,
        name: Cow::Borrowed(TABLE),
        handle: None,
    }
}

/// The objects of the table, in creation order (table, sets, chain, rules).
pub fn objects(rs: &Ruleset) -> Vec<NfListObject<'static>> {
    let mut out = vec![NfListObject::Table(table_obj())];
    for set in &rs.sets {
        let elem: Vec<Expression<'static>> = set.elements.iter().map(elem_expr).collect();
        out.push(NfListObject::Set(Box::new(schema::Set {
            family: NfFamily::INet,
            table: Cow::Borrowed(TABLE),
            name: Cow::Borrowed(set.name),
            handle: None,
            set_type: SetTypeValue::Single(set_type(set.kind)),
            policy: None,
            flags: set
                .kind
                .interval()
                .then(|| HashSet::from([SetFlag::Interval])),
            elem: (!elem.is_empty()).then(|| Cow::Owned(elem)),
            timeout: None,
            gc_interval: None,
            size: None,
            comment: None,
        })));
    }
    out.push(NfListObject::Chain(schema::Chain {
        family: NfFamily::INet,
        table: Cow::Borrowed(TABLE),
        name: Cow::Borrowed(CHAIN),
        newname: None,
        handle: None,
        _type: Some(NfChainType::Filter),
        hook: Some(NfHook::Prerouting),
        prio: Some(MANGLE_PRIORITY),
        dev: None,
        policy: Some(NfChainPolicy::Accept),
    }));
    if !rs.hijack.is_empty() {
        out.push(NfListObject::Chain(schema::Chain {
            family: NfFamily::INet,
            table: Cow::Borrowed(TABLE),
            name: Cow::Borrowed(CHAIN_HIJACK),
            newname: None,
            handle: None,
            _type: Some(NfChainType::NAT),
            hook: Some(NfHook::Prerouting),
            prio: Some(DSTNAT_PRIORITY),
            dev: None,
            policy: Some(NfChainPolicy::Accept),
        }));
    }
    let chained = rs
        .rules
        .iter()
        .map(|r| (CHAIN, r))
        .chain(rs.hijack.iter().map(|r| (CHAIN_HIJACK, r)));
    for (chain, rule) in chained {
        out.push(NfListObject::Rule(schema::Rule {
            family: NfFamily::INet,
            table: Cow::Borrowed(TABLE),
            chain: Cow::Borrowed(chain),
            expr: Cow::Owned(rule_exprs(rule)),
            handle: None,
            index: None,
            comment: Some(Cow::Borrowed(rule.comment)),
        }));
    }
    out
}

/// One transaction that creates the table when it does not exist yet. No `delete`:
/// a table deletion in a transaction makes the kernel wait for an RCU grace period
/// at commit (about 10 ms here), which would double the cost of a first apply.
pub fn create_batch(rs: &Ruleset) -> Nftables<'static> {
    let mut batch = Batch::new();
    for obj in objects(rs) {
        batch.add(obj);
    }
    batch.to_nftables()
}

/// One transaction that makes the table exactly `rs`: `add table` (a no-op when it
/// exists, so the following `delete` never fails), `delete table`, then the whole
/// table again. nft runs a batch as one kernel transaction, so packets see either
/// the old or the new table, never none.
pub fn replace_batch(rs: &Ruleset) -> Nftables<'static> {
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(table_obj()));
    batch.delete(NfListObject::Table(table_obj()));
    for obj in objects(rs) {
        batch.add(obj);
    }
    batch.to_nftables()
}

/// One transaction that deletes our table (and only it); valid whether or not the
/// table exists.
pub fn delete_batch() -> Nftables<'static> {
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(table_obj()));
    batch.delete(NfListObject::Table(table_obj()));
    batch.to_nftables()
}

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

// ---------------------------------------------------------------------------
// Comparison of installed and desired
// ---------------------------------------------------------------------------

/// Normalised elements of a set: address sets as merged inclusive ranges (nft prints
/// an interval back as a prefix, a range or a single address, whichever fits), other
/// sets as sorted JSON values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElemsView {
    Ranges(Vec<(u128, u128)>),
    Values(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetView {
    pub set_type: String,
    pub flags: BTreeSet<String>,
    pub elems: ElemsView,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainView {
    pub name: String,
    pub spec: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleView {
    pub chain: String,
    pub comment: Option<String>,
    pub expr: Value,
}

/// What of table `inet meduza` matters for "is it what we want?": handles and
/// counters left out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TableView {
    pub sets: BTreeMap<String, SetView>,
    pub chains: Vec<ChainView>,
    pub rules: Vec<RuleView>,
}

impl TableView {
    /// Number of rules in the table.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }
}

fn addr_bits(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn net_range(net: &IpNet) -> (u128, u128) {
    (addr_bits(net.network()), addr_bits(net.broadcast()))
}

fn elem_range(v: &Value) -> Option<(u128, u128)> {
    match v {
        Value::String(a) => {
            let ip: IpAddr = a.parse().ok()?;
            Some((addr_bits(ip), addr_bits(ip)))
        }
        Value::Object(o) => {
            if let Some(p) = o.get("prefix") {
                let addr: IpAddr = p.get("addr")?.as_str()?.parse().ok()?;
                let len = u8::try_from(p.get("len")?.as_u64()?).ok()?;
                let net = IpNet::new(addr, len).ok()?;
                Some(net_range(&net))
            } else if let Some(r) = o.get("range") {
                let lo: IpAddr = r.get(0)?.as_str()?.parse().ok()?;
                let hi: IpAddr = r.get(1)?.as_str()?.parse().ok()?;
                Some((addr_bits(lo), addr_bits(hi)))
            } else if let Some(e) = o.get("elem") {
                elem_range(e.get("val")?)
            } else {
                None
            }
        }
        _ => None,
    }
}

fn merge_ranges(mut r: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    r.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(r.len());
    for (lo, hi) in r {
        match out.last_mut() {
            Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

fn set_view(o: &serde_json::Map<String, Value>) -> Option<SetView> {
    let set_type = o.get("type")?.as_str()?.to_string();
    let flags: BTreeSet<String> = match o.get("flags") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|f| f.as_str().map(String::from))
            .collect(),
        Some(Value::String(f)) => BTreeSet::from([f.clone()]),
        _ => BTreeSet::new(),
    };
    let raw: Vec<Value> = match o.get("elem") {
        Some(Value::Array(a)) => a.clone(),
        Some(v) => vec![v.clone()],
        None => Vec::new(),
    };
    let elems = if set_type == "ipv4_addr" || set_type == "ipv6_addr" {
        let ranges: Option<Vec<(u128, u128)>> = raw.iter().map(elem_range).collect();
        ElemsView::Ranges(merge_ranges(ranges?))
    } else {
        let mut vals: Vec<String> = raw
            .iter()
            .map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        vals.sort();
        ElemsView::Values(vals)
    };
    Some(SetView {
        set_type,
        flags,
        elems,
    })
}

/// Why a listing could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected `nft -j list` output: {reason}")]
pub struct ListingError {
    pub reason: String,
}

fn bad(reason: impl Into<String>) -> ListingError {
    ListingError {
        reason: reason.into(),
    }
}

fn is_ours(o: &serde_json::Map<String, Value>) -> bool {
    o.get("family").and_then(Value::as_str) == Some("inet")
        && (o.get("table").and_then(Value::as_str) == Some(TABLE)
            || o.get("name").and_then(Value::as_str) == Some(TABLE))
}

/// Layer-4 protocol names `nft` may print for a `meta l4proto` match, by number.
const L4_PROTOCOLS: [(&str, u64); 9] = [
    ("icmp", 1),
    ("tcp", 6),
    ("udp", 17),
    ("gre", 47),
    ("esp", 50),
    ("ah", 51),
    ("ipv6-icmp", 58),
    ("sctp", 132),
    ("udplite", 136),
];

/// `nft` prints `meta l4proto` values by name only when `/etc/protocols` names
/// them (a minimal image may not ship it; then it prints `6`, `17`): compare layer-4
/// protocols as numbers on both sides.
fn numeric_protocols(mut expr: Value) -> Value {
    fn number(v: &mut Value) {
        match v {
            Value::String(name) => {
                if let Some((_, n)) = L4_PROTOCOLS.iter().find(|(p, _)| *p == name.as_str()) {
                    *v = Value::from(*n);
                }
            }
            Value::Object(o) => {
                if let Some(Value::Array(items)) = o.get_mut("set") {
                    items.iter_mut().for_each(number);
                }
            }
            _ => {}
        }
    }
    if let Value::Array(stmts) = &mut expr {
        for stmt in stmts {
            let Some(m) = stmt.get_mut("match").and_then(Value::as_object_mut) else {
                continue;
            };
            let l4 = m
                .get("left")
                .and_then(|l| l.get("meta"))
                .and_then(|meta| meta.get("key"))
                .and_then(Value::as_str)
                == Some("l4proto");
            if let (true, Some(right)) = (l4, m.get_mut("right")) {
                number(right);
            }
        }
    }
    expr
}

/// Read a list of ruleset elements (the output objects of `nft -j list table`, or
/// the `add` objects of our batch) into a [`TableView`]. Returns `None` when the
/// list holds no `inet meduza` table.
pub fn view_of_objects<'a>(
    objects: impl IntoIterator<Item = &'a Value>,
) -> Result<Option<TableView>, ListingError> {
    let mut view = TableView::default();
    let mut table_seen = false;
    for obj in objects {
        let Some(o) = obj.as_object() else {
            return Err(bad("element is not an object"));
        };
        if let Some(Value::Object(t)) = o.get("table") {
            if t.get("family").and_then(Value::as_str) == Some("inet")
                && t.get("name").and_then(Value::as_str) == Some(TABLE)
            {
                table_seen = true;
            }
        } else if let Some(Value::Object(st)) = o.get("set") {
            if !is_ours(st) {
                continue;
            }
            let name = st
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("set without name"))?;
            let v = set_view(st).ok_or_else(|| bad(format!("set {name} unreadable")))?;
            view.sets.insert(name.to_string(), v);
        } else if let Some(Value::Object(c)) = o.get("chain") {
            if !is_ours(c) {
                continue;
            }
            let name = c
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("chain without name"))?;
            let spec = ["type", "hook", "prio", "policy"]
                .iter()
                .filter_map(|k| c.get(*k).map(|v| (k.to_string(), v.to_string())))
                .collect();
            view.chains.push(ChainView {
                name: name.to_string(),
                spec,
            });
        } else if let Some(Value::Object(r)) = o.get("rule") {
            if !is_ours(r) {
                continue;
            }
            view.rules.push(RuleView {
                chain: r
                    .get("chain")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                comment: r.get("comment").and_then(Value::as_str).map(String::from),
                expr: numeric_protocols(r.get("expr").cloned().unwrap_or(Value::Null)),
            });
        }
    }
    // Chains, and rules across chains, compare in a fixed order (within a chain the
    // order is the rule order, which matters).
    view.chains.sort_by(|a, b| a.name.cmp(&b.name));
    view.rules.sort_by(|a, b| a.chain.cmp(&b.chain));
    Ok(table_seen.then_some(view))
}

/// The view of an `nft -j list ...` document.
pub fn view_of_listing(listing: &Value) -> Result<Option<TableView>, ListingError> {
    let objs = listing
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no `nftables` array"))?;
    view_of_objects(objs)
}

/// The view of the desired ruleset. Chains and rules pass through the same JSON the
/// batch sends and the same reader as a listing; set elements are turned into
/// ranges directly (going through JSON text costs ~40 ms for 10,000 CIDRs).
pub fn desired_view(rs: &Ruleset) -> TableView {
    let objs: Vec<Value> = objects(&Ruleset {
        sets: Vec::new(),
        rules: rs.rules.clone(),
        hijack: rs.hijack.clone(),
    })
    .into_iter()
    .map(|o| {
        // Serialising our own schema values cannot fail (no maps with non-string
        // keys, no foreign types).
        serde_json::to_value(&o).unwrap_or(Value::Null)
    })
    .collect();
    // Our own objects always contain the table, and every value is readable.
    let mut view = view_of_objects(&objs).ok().flatten().unwrap_or_default();
    for set in &rs.sets {
        let elems = if set.kind.interval() {
            ElemsView::Ranges(merge_ranges(
                set.elements
                    .iter()
                    .filter_map(|e| match e {
                        SetElem::Net(n) => Some(net_range(n)),
                        _ => None,
                    })
                    .collect(),
            ))
        } else {
            let mut vals: Vec<String> = set
                .elements
                .iter()
                .map(|e| match e {
                    SetElem::Name(n) => n.clone(),
                    SetElem::Port(p) => p.to_string(),
                    SetElem::Net(n) => n.to_string(),
                })
                .collect();
            vals.sort();
            ElemsView::Values(vals)
        };
        view.sets.insert(
            set.name.to_string(),
            SetView {
                set_type: set.kind.nft_type().to_string(),
                flags: if set.kind.interval() {
                    BTreeSet::from(["interval".to_string()])
                } else {
                    BTreeSet::new()
                },
                elems,
            },
        );
    }
    view
}

#[cfg(test)]
mod tests {
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
        let exprs = rule_exprs(tproxy[0]);
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

    #[test]
    fn replace_batch_deletes_and_recreates_only_our_table() {
        let batch = serde_json::to_value(replace_batch(&build(&plan()))).unwrap();
        let objs = batch["nftables"].as_array().unwrap();
        assert_eq!(
            objs[0],
            serde_json::json!({"add": {"table": {"family": "inet", "name": "meduza"}}})
        );
        assert_eq!(
            objs[1],
            serde_json::json!({"delete": {"table": {"family": "inet", "name": "meduza"}}})
        );
        for o in objs {
            let (cmd, inner) = o.as_object().unwrap().iter().next().unwrap();
            assert!(cmd == "add" || cmd == "delete");
            let (_, obj) = inner.as_object().unwrap().iter().next().unwrap();
            assert_eq!(obj["family"], "inet");
            let table = obj.get("table").unwrap_or(&obj["name"]);
            assert_eq!(table, "meduza");
        }
        let create = serde_json::to_value(create_batch(&build(&plan()))).unwrap();
        let create = create["nftables"].as_array().unwrap();
        assert_eq!(create.len(), objs.len() - 2);
        assert!(create.iter().all(|o| o.get("add").is_some()));
        let del = serde_json::to_value(delete_batch()).unwrap();
        assert_eq!(del["nftables"].as_array().unwrap().len(), 2);
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
}
