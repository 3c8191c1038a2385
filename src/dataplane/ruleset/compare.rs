//! Comparison of an installed table with the desired one: the desired objects in the
//! JSON shape `nft -j list table inet meduza` prints (libnftables-json(5)), and the
//! reading of such a listing into a [`TableView`] that leaves out what does not
//! matter (handles, element order and form, protocol names).
//!
//! Owns: the listing format and its normalisation; `FakeNft` lists its decoded
//! table through the same objects. Must not: run `nft`, or build a ruleset (that is
//! [`build`](super::build)).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use nftables::expr::{
    Expression, Fib, FibFlag, FibResult, Meta, MetaKey, NamedExpression, Payload, PayloadField,
    Prefix, SetItem, CT,
};
use nftables::schema::{self, NfListObject, SetFlag, SetType, SetTypeValue};
use nftables::stmt::{Mangle, Match, Operator, Reject, RejectType, Statement, TProxy, NAT};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook, RejectCode};
use serde_json::Value;

use super::{
    RejectWith, RuleAction, RuleMatch, Ruleset, SetElem, SetKind, CHAIN, CHAIN_HIJACK,
    DSTNAT_PRIORITY, MANGLE_PRIORITY, TABLE,
};

// ---------------------------------------------------------------------------
// The desired table as `nft -j list` prints it (libnftables-json(5))
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

pub(super) fn rule_exprs(matches: &[RuleMatch], action: &RuleAction) -> Vec<Statement<'static>> {
    let mut out: Vec<Statement<'static>> = matches.iter().map(match_stmt).collect();
    match action {
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

/// Set `name` as `nft -j list` prints it (elements in the form we send them).
pub fn set_object(name: &str, kind: SetKind, elements: &[SetElem]) -> NfListObject<'static> {
    let elem: Vec<Expression<'static>> = elements.iter().map(elem_expr).collect();
    NfListObject::Set(Box::new(schema::Set {
        family: NfFamily::INet,
        table: Cow::Borrowed(TABLE),
        name: Cow::Owned(name.to_string()),
        handle: None,
        set_type: SetTypeValue::Single(set_type(kind)),
        policy: None,
        flags: kind.interval().then(|| HashSet::from([SetFlag::Interval])),
        elem: (!elem.is_empty()).then(|| Cow::Owned(elem)),
        timeout: None,
        gc_interval: None,
        size: None,
        comment: None,
    }))
}

/// Base chain `name` ([`CHAIN`] or [`CHAIN_HIJACK`]) as `nft -j list` prints it.
pub fn chain_object(name: &str) -> NfListObject<'static> {
    let (kind, prio) = if name == CHAIN_HIJACK {
        (NfChainType::NAT, DSTNAT_PRIORITY)
    } else {
        (NfChainType::Filter, MANGLE_PRIORITY)
    };
    NfListObject::Chain(schema::Chain {
        family: NfFamily::INet,
        table: Cow::Borrowed(TABLE),
        name: Cow::Owned(name.to_string()),
        newname: None,
        handle: None,
        _type: Some(kind),
        hook: Some(NfHook::Prerouting),
        prio: Some(prio),
        dev: None,
        policy: Some(NfChainPolicy::Accept),
    })
}

/// A rule of `chain` as `nft -j list` prints it.
pub fn rule_object(
    chain: &str,
    comment: &str,
    matches: &[RuleMatch],
    action: &RuleAction,
) -> NfListObject<'static> {
    NfListObject::Rule(schema::Rule {
        family: NfFamily::INet,
        table: Cow::Borrowed(TABLE),
        chain: Cow::Owned(chain.to_string()),
        expr: Cow::Owned(rule_exprs(matches, action)),
        handle: None,
        index: None,
        comment: Some(Cow::Owned(comment.to_string())),
    })
}

/// The objects of the table in the shape `nft -j list` prints them, in creation
/// order (table, sets, chains, rules).
pub fn objects(rs: &Ruleset) -> Vec<NfListObject<'static>> {
    let mut out = vec![NfListObject::Table(table_obj())];
    out.extend(
        rs.sets
            .iter()
            .map(|s| set_object(s.name, s.kind, &s.elements)),
    );
    out.push(chain_object(CHAIN));
    if !rs.hijack.is_empty() {
        out.push(chain_object(CHAIN_HIJACK));
    }
    let chained = rs
        .rules
        .iter()
        .map(|r| (CHAIN, r))
        .chain(rs.hijack.iter().map(|r| (CHAIN_HIJACK, r)));
    for (chain, rule) in chained {
        out.push(rule_object(
            chain,
            rule.comment,
            &rule.matches,
            &rule.action,
        ));
    }
    out
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

pub(super) fn addr_bits(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn net_range(net: &IpNet) -> (u128, u128) {
    (addr_bits(net.network()), addr_bits(net.broadcast()))
}

pub(super) fn elem_range(v: &Value) -> Option<(u128, u128)> {
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

pub(super) fn merge_ranges(mut r: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
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
