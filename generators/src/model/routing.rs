//! Routing: `/global/internal_routing_system`, the BGP filters, and each node's BGP,
//! OSPF and eBGP-over-VPN peers; and what FRR runs on a node ([`frr_routing`]): its
//! sessions and router ids, resolved and checked before anything is rendered.
//!
//! Owns: the routing keys' types, defaults and validation, and the per-node routing
//! checks that need the derived overlay addresses (duplicate peers, router ids).
//! Must not: write FRR configuration text (`gen::frr`).

use super::{mesh_addr, Config, Node};
use crate::error::ValidationError;
use crate::parse::{self, Reader};
use ipnet::IpNet;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

/// `/global/internal_routing_system`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InternalRouting {
    Ospf,
    Bgp,
}

/// One line of `/global/bgp/filter/in|out`: `permit|deny <prefix> [ge N] [le N]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PrefixRule {
    pub permit: bool,
    pub prefix: IpNet,
    pub ge: Option<u8>,
    pub le: Option<u8>,
}

/// eBGP over a VPN instance (`.../bgp/*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BgpPeer {
    pub peer_asn: u32,
    pub peer_ip: IpAddr,
    pub update_source: Option<String>,
    pub weight: Option<u32>,
    pub no_transit: bool,
    pub no_forward: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Bgp {
    pub enable: bool,
    pub asn: Option<u32>,
    pub router_id: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Ospf {
    pub enable: bool,
    pub router_id: Option<Ipv4Addr>,
}

/// `/global/internal_routing_system` (default `ospf`).
pub(super) fn parse_internal_routing(r: &mut Reader<'_>) -> InternalRouting {
    r.choice(
        "/global/internal_routing_system",
        &[
            ("ospf", InternalRouting::Ospf),
            ("bgp", InternalRouting::Bgp),
        ],
        Some(InternalRouting::Ospf),
    )
    .unwrap_or(InternalRouting::Ospf)
}

/// `/global/bgp/filter/in` and `/global/bgp/filter/out`.
pub(super) fn parse_bgp_filters(r: &mut Reader<'_>) -> (Vec<PrefixRule>, Vec<PrefixRule>) {
    let bgp_filter_in = r.list("/global/bgp/filter/in", parse_prefix_rule);
    let bgp_filter_out = r.list("/global/bgp/filter/out", parse_prefix_rule);
    (bgp_filter_in, bgp_filter_out)
}

/// `/nodes/<id>/bgp/*` and `/nodes/<id>/ospf/*` (`p` is `/nodes/<id>/`).
pub(super) fn parse_bgp_ospf(r: &mut Reader<'_>, p: &str) -> (Bgp, Ospf) {
    let k = |s: &str| format!("{p}{s}");
    let bgp = Bgp {
        enable: r.bool(&k("bgp/enable"), false),
        asn: r.u32_in(&k("bgp/asn"), 1, u32::MAX),
        router_id: r.ipv4(&k("bgp/router_id")),
    };
    if bgp.enable {
        r.require(&k("bgp/asn"), "required when bgp/enable is true");
    }
    let ospf = Ospf {
        enable: r.bool(&k("ospf/enable"), false),
        router_id: r.ipv4(&k("ospf/router_id")),
    };
    (bgp, ospf)
}

fn parse_prefix_rule(line: &str) -> Result<PrefixRule, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let permit = match words.first() {
        Some(&"permit") => true,
        Some(&"deny") => false,
        _ => return Err("rule must start with permit or deny".into()),
    };
    let prefix = words
        .get(1)
        .ok_or("rule needs a prefix")
        .map_err(String::from)
        .and_then(|p| parse::parse_cidr(p))?;
    if !prefix.addr().is_ipv4() {
        // The BGP sessions carry IPv4 unicast only (see docs/etcd-schema.md).
        return Err("only IPv4 prefixes are supported".into());
    }
    let max = if prefix.addr().is_ipv4() { 32 } else { 128 };
    let mut ge = None;
    let mut le = None;
    let mut rest = words[2..].iter();
    while let Some(w) = rest.next() {
        let n = rest
            .next()
            .ok_or(format!("`{w}` needs a length"))?
            .parse::<u8>()
            .map_err(|_| format!("`{w}` length is not a number"))?;
        if n < prefix.prefix_len() || n > max {
            return Err(format!(
                "`{w} {n}` must be between {} and {max}",
                prefix.prefix_len()
            ));
        }
        match *w {
            "ge" => ge = Some(n),
            "le" => le = Some(n),
            _ => return Err(format!("unknown word `{w}` (expected ge or le)")),
        }
    }
    if let (Some(g), Some(l)) = (ge, le) {
        if g > l {
            return Err("ge must not exceed le".into());
        }
    }
    Ok(PrefixRule {
        permit,
        prefix,
        ge,
        le,
    })
}

pub(super) fn parse_bgp_peer(r: &mut Reader<'_>, base: &str) -> Option<BgpPeer> {
    let k = |s: &str| format!("{base}bgp/{s}");
    if !r.bool(&k("enable"), false) {
        // A disabled peer may keep its keys: not unknown, only unused.
        r.note_subtree(&k(""));
        return None;
    }
    let peer_asn = r.u32_in(&k("peer_asn"), 1, u32::MAX);
    let peer_ip = r.ip(&k("peer_ip"));
    r.require(&k("peer_asn"), "required when bgp/enable is true");
    r.require(&k("peer_ip"), "required when bgp/enable is true");
    let update_source = r.parsed(&k("update_source"), |v| {
        parse::parse_iface(v).or_else(|_| {
            v.parse::<IpAddr>()
                .map(|a| a.to_string())
                .map_err(|_| "must be an interface name or an IP address".to_string())
        })
    });
    let weight = r.u32_in(&k("weight"), 0, 65_535);
    let no_transit = r.bool(&k("no_transit"), false);
    let no_forward = r.bool(&k("no_forward"), false);
    Some(BgpPeer {
        peer_asn: peer_asn?,
        peer_ip: peer_ip?,
        update_source,
        weight,
        no_transit,
        no_forward,
    })
}

/// An eBGP session over a VPN instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EbgpNeighbor<'a> {
    /// `openvpn` or `wireguard`.
    pub kind: &'static str,
    pub instance: &'a str,
    pub peer: &'a BgpPeer,
}

/// An iBGP session over the overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IbgpNeighbor {
    pub node_id: String,
    pub addr: IpAddr,
    pub asn: u32,
}

/// What FRR runs on one node, resolved from the model and checked by
/// [`frr_routing`]: `gen::frr` renders it and refuses nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrrRouting<'a> {
    /// `Some` iff `bgp/enable`.
    pub bgp: Option<BgpRouting<'a>>,
    /// The OSPF router id, `Some` iff `ospf/enable`.
    pub ospf_router_id: Option<Ipv4Addr>,
}

/// bgpd on one node: its AS, router id and sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BgpRouting<'a> {
    pub asn: u32,
    pub router_id: Ipv4Addr,
    /// eBGP over the node's enabled VPN instances, no two with one peer address.
    pub ebgp: Vec<EbgpNeighbor<'a>>,
    /// iBGP over the overlay, none at an eBGP peer's address.
    pub ibgp: Vec<IbgpNeighbor>,
}

/// eBGP sessions of `node`: enabled instances with `bgp/enable`.
pub fn ebgp_neighbors(node: &Node) -> Vec<EbgpNeighbor<'_>> {
    let ovpn = node.openvpn.iter().filter(|o| o.enable).filter_map(|o| {
        o.bgp.as_ref().map(|peer| EbgpNeighbor {
            kind: "openvpn",
            instance: &o.name,
            peer,
        })
    });
    let wg = node.wireguard.iter().filter(|w| w.enable).filter_map(|w| {
        w.bgp.as_ref().map(|peer| EbgpNeighbor {
            kind: "wireguard",
            instance: &w.name,
            peer,
        })
    });
    ovpn.chain(wg).collect()
}

/// iBGP sessions of `node`: with `internal_routing_system = bgp`, every other node that
/// enables BGP and has an overlay address, if this node runs the overlay too.
pub fn ibgp_neighbors(cfg: &Config, node: &Node) -> Vec<IbgpNeighbor> {
    if cfg.global.internal_routing != InternalRouting::Bgp
        || !node.bgp.enable
        || mesh_addr(cfg, node).is_none()
    {
        return Vec::new();
    }
    cfg.nodes
        .values()
        .filter(|o| o.id != node.id && o.bgp.enable)
        .filter_map(|o| {
            Some(IbgpNeighbor {
                node_id: o.id.clone(),
                addr: mesh_addr(cfg, o)?.addr(),
                asn: o.bgp.asn?,
            })
        })
        .collect()
}

fn mesh_v4(cfg: &Config, node: &Node) -> Option<Ipv4Addr> {
    match mesh_addr(cfg, node)?.addr() {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => None,
    }
}

/// BGP router id: `bgp/router_id`, else `ospf/router_id`, else the IPv4 overlay address.
pub fn bgp_router_id(cfg: &Config, node: &Node) -> Option<Ipv4Addr> {
    node.bgp
        .router_id
        .or(node.ospf.router_id)
        .or_else(|| mesh_v4(cfg, node))
}

/// OSPF router id: `ospf/router_id`, else `bgp/router_id`, else the IPv4 overlay address.
pub fn ospf_router_id(cfg: &Config, node: &Node) -> Option<Ipv4Addr> {
    node.ospf
        .router_id
        .or(node.bgp.router_id)
        .or_else(|| mesh_v4(cfg, node))
}

/// What FRR runs on `node`, or the first problem in this order: no `bgp/asn`, two eBGP
/// sessions to one `peer_ip`, an eBGP `peer_ip` that is another node's overlay address
/// (an iBGP neighbor), no OSPF router id, no BGP router id. These need the overlay
/// addresses every node derives, so they are checked when the node is rendered: a
/// problem on one node does not stop the others.
pub fn frr_routing<'a>(cfg: &Config, node: &'a Node) -> Result<FrrRouting<'a>, ValidationError> {
    let key = |s: &str| format!("/nodes/{}/{s}", node.id);
    let mut sessions = None;
    if node.bgp.enable {
        let Some(asn) = node.bgp.asn else {
            return Err(ValidationError::new(
                key("bgp/asn"),
                "",
                "required when bgp/enable is true",
            ));
        };
        let ebgp = ebgp_neighbors(node);
        let ibgp = ibgp_neighbors(cfg, node);
        let mut seen = BTreeMap::new();
        for n in &ebgp {
            let k = format!("/nodes/{}/{}/{}/bgp/peer_ip", node.id, n.kind, n.instance);
            if let Some(prev) = seen.insert(n.peer.peer_ip, k.clone()) {
                return Err(ValidationError::new(
                    k,
                    n.peer.peer_ip.to_string(),
                    format!("peer_ip already used by {prev}"),
                ));
            }
        }
        for n in &ibgp {
            if let Some(prev) = seen.get(&n.addr) {
                return Err(ValidationError::new(
                    prev.clone(),
                    n.addr.to_string(),
                    format!("peer_ip is the overlay address of node {}", n.node_id),
                ));
            }
        }
        sessions = Some((asn, ebgp, ibgp));
    }
    let ospf_router_id = match node.ospf.enable {
        false => None,
        true => Some(ospf_router_id(cfg, node).ok_or_else(|| {
            ValidationError::new(
                key("ospf/router_id"),
                "",
                "required: no bgp/router_id or IPv4 overlay address to derive it from",
            )
        })?),
    };
    let bgp = match sessions {
        None => None,
        Some((asn, ebgp, ibgp)) => {
            let Some(router_id) = bgp_router_id(cfg, node) else {
                return Err(ValidationError::new(
                    key("bgp/router_id"),
                    "",
                    "required: no ospf/router_id or IPv4 overlay address to derive it from",
                ));
            };
            Some(BgpRouting {
                asn,
                router_id,
                ebgp,
                ibgp,
            })
        }
    };
    Ok(FrrRouting {
        bgp,
        ospf_router_id,
    })
}
