//! FRR: `/etc/frr/frr.conf` (integrated config) and `/etc/frr/vtysh.conf`. No
//! services: the integrator starts FRR's daemons and reloads with `frr-reload.py` when
//! `frr.conf` changes. No `/etc/frr/daemons` either: only FRR's init scripts and
//! watchfrr read it, and meduza's supervisor starts the daemons itself.
//!
//! Owns: the text of those files, from the routing the model resolved and checked
//! ([`crate::model::frr_routing`]). Must not: refuse a configuration (the model does)
//! or decide whether FRR runs on a node (that is [`crate::render`], asking [`enabled`]).
//!
//! Routing policy (seed "BGP Control Flags", DESIGN §3):
//! - OSPF (`ospf/enable`): area 0 over the overlay interface (every other interface
//!   passive), `network` for the overlay subnet and the node's LANs, `redistribute
//!   connected`; when BGP also runs, BGP routes are redistributed tagged
//!   [`OSPF_EBGP_TAG`] so that no other node feeds them back into BGP (their AS path is
//!   lost in OSPF, so re-exporting them could loop).
//! - BGP (`bgp/enable`): `bgp router-id` always explicit (a fresh zebra may have none).
//!   iBGP to every other node with BGP enabled over the overlay when
//!   `internal_routing_system` is `bgp` (neighbor = its overlay address,
//!   `next-hop-self`); eBGP over each enabled OpenVPN/WireGuard instance with
//!   `bgp/enable`. Every neighbor gets an inbound and an outbound route-map, which is
//!   what FRR's default `bgp ebgp-requires-policy` (RFC 8212) asks for.
//! - Inbound, every neighbor: the default route is refused; the global `filter/in`
//!   applies. eBGP inbound also tags routes with `<asn>:9999` (a large community
//!   `<asn>:9999:0` when the ASN does not fit 16 bits: FRR rejects a bare `9999` and
//!   standard communities are two 16-bit halves), and `no_transit` adds an AS-path list
//!   denying paths of three or more ASes.
//! - Outbound, every neighbor: the global `filter/out` applies. eBGP outbound never
//!   carries any node's `private_lan`; `no_forward` also denies routes carrying the
//!   eBGP tag (learned from eBGP here or at another node of the same AS).
//! - LANs (`lan` and `private_lan`) are announced with `network` statements. Only IPv4
//!   is routed by FRR here (OSPFv2, IPv4 unicast BGP); IPv6 LANs are not announced.
//!   FRR announces a `network` only while its RIB has a route for it (`bgp network
//!   import-check`, on by default in FRR 8.4: its running config shows `no bgp network
//!   import-check` when turned off).
//! - `ip forwarding`: zebra turns IPv4 forwarding on in its namespace. Nothing else in
//!   meduza does, and the routes FRR installs carry no traffic without it (before,
//!   only the first `frr-reload.py` run turned it on, by removing the `no ip
//!   forwarding` it read from the running config).
//! - Every neighbor gets `timers connect` [`CONNECT_RETRY_SECS`]: bgpd starts with the
//!   tunnels and the overlay, and a first connection attempt that fails (the
//!   `update_source` address not yet on its interface: "Socket Error") otherwise
//!   leaves the session down for FRR's traditional ConnectRetry of 120 s
//!   (tests/gateway/frr_policy.rs met it; docs/routing.md).

use super::{header_hash, MODE_PUBLIC};
use crate::model::{mesh_addr, mesh_dev, Config, EbgpNeighbor, FrrRouting, Node, PrefixRule};
use crate::output::{DomainOutput, FileOut};
use ipnet::IpNet;
use std::fmt::Write as _;

pub const FRR_CONF: &str = "/etc/frr/frr.conf";
pub const VTYSH_CONF: &str = "/etc/frr/vtysh.conf";
/// Written as `frr version`: FRR keeps the defaults of the version that wrote a config.
pub const FRR_VERSION: &str = "8.4";
/// Community value (low half) marking routes learned over eBGP.
pub const EBGP_COMMUNITY_VALUE: u32 = 9999;
/// OSPF tag of BGP routes redistributed into OSPF.
pub const OSPF_EBGP_TAG: u32 = 9999;
/// `neighbor X timers connect`: seconds between connection attempts while a session
/// is down (FRR's `datacenter` profile uses 10 too; `traditional` waits 120).
pub const CONNECT_RETRY_SECS: u32 = 10;

const PL_DEFAULT: &str = "MEDUZA-DEFAULT-ROUTE";
const PL_IN: &str = "MEDUZA-FILTER-IN";
const PL_OUT: &str = "MEDUZA-FILTER-OUT";
const PL_PRIVATE: &str = "MEDUZA-PRIVATE-LAN";
const ASP_NO_TRANSIT: &str = "MEDUZA-NO-TRANSIT";
const CL_EBGP: &str = "MEDUZA-EBGP-LEARNED";
const RM_MESH_IN: &str = "MEDUZA-MESH-IN";
const RM_MESH_OUT: &str = "MEDUZA-MESH-OUT";
const RM_BGP_TO_OSPF: &str = "MEDUZA-BGP-TO-OSPF";
const RM_OSPF_TO_BGP: &str = "MEDUZA-OSPF-TO-BGP";

/// FRR must run on `node`.
pub fn enabled(node: &Node) -> bool {
    node.ospf.enable || node.bgp.enable
}

/// The route-map of an eBGP session in direction `dir` (`IN` or `OUT`).
fn ebgp_map(n: &EbgpNeighbor<'_>, dir: &str) -> String {
    let k = if n.kind == "openvpn" { "OVPN" } else { "WG" };
    format!("MEDUZA-EBGP-{k}-{}-{dir}", n.instance)
}

fn v4_lans(node: &Node) -> Vec<IpNet> {
    node.lan
        .iter()
        .chain(&node.private_lan)
        .filter(|n| matches!(n, IpNet::V4(_)))
        .copied()
        .collect()
}

fn prefix_line(name: &str, seq: usize, r: &PrefixRule) -> String {
    let mut s = format!(
        "ip prefix-list {name} seq {seq} {} {}",
        if r.permit { "permit" } else { "deny" },
        r.prefix
    );
    if let Some(ge) = r.ge {
        let _ = write!(s, " ge {ge}");
    }
    if let Some(le) = r.le {
        let _ = write!(s, " le {le}");
    }
    s.push('\n');
    s
}

/// One route-map entry.
fn rm(s: &mut String, name: &str, permit: bool, seq: u32, lines: &[String]) {
    let _ = writeln!(
        s,
        "route-map {name} {} {seq}",
        if permit { "permit" } else { "deny" }
    );
    for l in lines {
        let _ = writeln!(s, " {l}");
    }
    s.push_str("exit\n!\n");
}

/// The `frr.conf` text of `node`, whose routing the model resolved into `routing`.
pub fn frr_conf(cfg: &Config, node: &Node, routing: &FrrRouting<'_>) -> String {
    let mut s = String::new();
    s.push_str(&header_hash(&node.id, "frr").replacen('#', "!", 1));
    let _ = writeln!(s, "frr version {FRR_VERSION}");
    s.push_str("frr defaults traditional\n");
    let _ = writeln!(s, "hostname {}", node.id);
    s.push_str("service integrated-vtysh-config\n!\nip forwarding\n!\n");

    let filter_in = &cfg.global.bgp_filter_in;
    let filter_out = &cfg.global.bgp_filter_out;
    let private: Vec<IpNet> = cfg
        .nodes
        .values()
        .flat_map(|n| n.private_lan.iter())
        .filter(|n| matches!(n, IpNet::V4(_)))
        .copied()
        .collect();

    if let Some(bgp) = &routing.bgp {
        let (asn, ebgp, ibgp) = (bgp.asn, &bgp.ebgp, &bgp.ibgp);
        // Prefix lists.
        let _ = writeln!(s, "ip prefix-list {PL_DEFAULT} seq 5 permit 0.0.0.0/0");
        for (i, r) in filter_in.iter().enumerate() {
            s.push_str(&prefix_line(PL_IN, (i + 1) * 10, r));
        }
        for (i, r) in filter_out.iter().enumerate() {
            s.push_str(&prefix_line(PL_OUT, (i + 1) * 10, r));
        }
        if !ebgp.is_empty() {
            for (i, p) in private.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "ip prefix-list {PL_PRIVATE} seq {} permit {p} le 32",
                    (i + 1) * 10
                );
            }
        }
        s.push_str("!\n");

        // AS-path and community lists.
        let large = asn > 65_535;
        if ebgp.iter().any(|n| n.peer.no_transit) {
            let _ = writeln!(
                s,
                "bgp as-path access-list {ASP_NO_TRANSIT} seq 10 deny ^.+ .+ .+"
            );
            let _ = writeln!(
                s,
                "bgp as-path access-list {ASP_NO_TRANSIT} seq 20 permit .*"
            );
        }
        if ebgp.iter().any(|n| n.peer.no_forward) {
            if large {
                let _ = writeln!(
                    s,
                    "bgp large-community-list standard {CL_EBGP} seq 10 permit {asn}:{EBGP_COMMUNITY_VALUE}:0"
                );
            } else {
                let _ = writeln!(
                    s,
                    "bgp community-list standard {CL_EBGP} seq 10 permit {asn}:{EBGP_COMMUNITY_VALUE}"
                );
            }
        }
        s.push_str("!\n");

        // Route maps.
        let match_in = format!("match ip address prefix-list {PL_IN}");
        let match_out = format!("match ip address prefix-list {PL_OUT}");
        let deny_default = vec![format!("match ip address prefix-list {PL_DEFAULT}")];
        if !ibgp.is_empty() {
            rm(&mut s, RM_MESH_IN, false, 5, &deny_default);
            let lines: Vec<String> = (!filter_in.is_empty())
                .then(|| match_in.clone())
                .into_iter()
                .collect();
            rm(&mut s, RM_MESH_IN, true, 10, &lines);
            let lines: Vec<String> = (!filter_out.is_empty())
                .then(|| match_out.clone())
                .into_iter()
                .collect();
            rm(&mut s, RM_MESH_OUT, true, 10, &lines);
        }
        for n in ebgp {
            let map_in = ebgp_map(n, "IN");
            let map_out = ebgp_map(n, "OUT");
            rm(&mut s, &map_in, false, 5, &deny_default);
            let mut lines = Vec::new();
            if !filter_in.is_empty() {
                lines.push(match_in.clone());
            }
            if n.peer.no_transit {
                lines.push(format!("match as-path {ASP_NO_TRANSIT}"));
            }
            if large {
                lines.push(format!(
                    "set large-community {asn}:{EBGP_COMMUNITY_VALUE}:0 additive"
                ));
            } else {
                lines.push(format!(
                    "set community {asn}:{EBGP_COMMUNITY_VALUE} additive"
                ));
            }
            rm(&mut s, &map_in, true, 10, &lines);
            if !private.is_empty() {
                rm(
                    &mut s,
                    &map_out,
                    false,
                    5,
                    &[format!("match ip address prefix-list {PL_PRIVATE}")],
                );
            }
            if n.peer.no_forward {
                let m = if large {
                    format!("match large-community {CL_EBGP}")
                } else {
                    format!("match community {CL_EBGP}")
                };
                rm(&mut s, &map_out, false, 6, &[m]);
            }
            let lines: Vec<String> = (!filter_out.is_empty())
                .then(|| match_out.clone())
                .into_iter()
                .collect();
            rm(&mut s, &map_out, true, 10, &lines);
        }
        if node.ospf.enable {
            rm(
                &mut s,
                RM_BGP_TO_OSPF,
                true,
                10,
                &[format!("set tag {OSPF_EBGP_TAG}")],
            );
            rm(
                &mut s,
                RM_OSPF_TO_BGP,
                false,
                5,
                &[format!("match tag {OSPF_EBGP_TAG}")],
            );
            rm(&mut s, RM_OSPF_TO_BGP, true, 10, &[]);
        }
    }

    if let Some(rid) = routing.ospf_router_id {
        if let Some(dev) = mesh_dev(cfg, node) {
            let _ = write!(s, "interface {dev}\n no ip ospf passive\nexit\n!\n");
        }
        s.push_str("router ospf\n");
        let _ = writeln!(s, " ospf router-id {rid}");
        s.push_str(" passive-interface default\n redistribute connected\n");
        if node.bgp.enable {
            let _ = writeln!(s, " redistribute bgp route-map {RM_BGP_TO_OSPF}");
        }
        if let Some(IpNet::V4(m)) = mesh_addr(cfg, node) {
            let _ = writeln!(s, " network {} area 0", m.trunc());
        }
        for lan in v4_lans(node) {
            let _ = writeln!(s, " network {lan} area 0");
        }
        s.push_str("exit\n!\n");
    }

    if let Some(bgp) = &routing.bgp {
        let (asn, rid, ebgp, ibgp) = (bgp.asn, bgp.router_id, &bgp.ebgp, &bgp.ibgp);
        let _ = writeln!(s, "router bgp {asn}");
        let _ = writeln!(s, " bgp router-id {rid}");
        for n in ibgp {
            let _ = writeln!(s, " neighbor {} remote-as {}", n.addr, n.asn);
            let _ = writeln!(s, " neighbor {} description mesh {}", n.addr, n.node_id);
            let _ = writeln!(
                s,
                " neighbor {} timers connect {CONNECT_RETRY_SECS}",
                n.addr
            );
        }
        for n in ebgp {
            let ip = n.peer.peer_ip;
            let _ = writeln!(s, " neighbor {ip} remote-as {}", n.peer.peer_asn);
            let _ = writeln!(s, " neighbor {ip} description {} {}", n.kind, n.instance);
            if let Some(src) = &n.peer.update_source {
                let _ = writeln!(s, " neighbor {ip} update-source {src}");
            }
            let _ = writeln!(s, " neighbor {ip} timers connect {CONNECT_RETRY_SECS}");
        }
        s.push_str(" !\n address-family ipv4 unicast\n");
        for lan in v4_lans(node) {
            let _ = writeln!(s, "  network {lan}");
        }
        if node.ospf.enable {
            let _ = writeln!(s, "  redistribute ospf route-map {RM_OSPF_TO_BGP}");
        }
        for n in ibgp {
            let a = n.addr;
            let _ = writeln!(s, "  neighbor {a} activate");
            let _ = writeln!(s, "  neighbor {a} next-hop-self");
            let _ = writeln!(s, "  neighbor {a} route-map {RM_MESH_IN} in");
            let _ = writeln!(s, "  neighbor {a} route-map {RM_MESH_OUT} out");
        }
        for n in ebgp {
            let a = n.peer.peer_ip;
            let _ = writeln!(s, "  neighbor {a} activate");
            if let Some(w) = n.peer.weight {
                let _ = writeln!(s, "  neighbor {a} weight {w}");
            }
            let _ = writeln!(s, "  neighbor {a} route-map {} in", ebgp_map(n, "IN"));
            let _ = writeln!(s, "  neighbor {a} route-map {} out", ebgp_map(n, "OUT"));
        }
        s.push_str(" exit-address-family\nexit\n!\n");
    }
    s.push_str("end\n");
    // Sections that came out empty leave doubled separators.
    while s.contains("!\n!\n") {
        s = s.replace("!\n!\n", "!\n");
    }
    s
}

/// The FRR files (no services: FRR's daemons are started by the integrator).
pub fn render(cfg: &Config, node: &Node, routing: &FrrRouting<'_>) -> DomainOutput {
    DomainOutput {
        files: vec![
            FileOut::new(FRR_CONF, frr_conf(cfg, node, routing), MODE_PUBLIC),
            FileOut::new(VTYSH_CONF, "service integrated-vtysh-config\n", MODE_PUBLIC),
        ],
        services: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Snapshot;

    const EXAMPLE: &str = include_str!("../../../docs/examples/three-nodes.json");

    fn conf(overrides: &[(&str, &str)], node: &str) -> String {
        let mut s = Snapshot::from_json(EXAMPLE).expect("example is JSON");
        for (k, v) in overrides {
            s.0.insert((*k).to_string(), (*v).to_string());
        }
        let cfg = Config::parse(&s).expect("validates");
        let node = cfg.node(node).expect("node");
        let routing = crate::model::frr_routing(&cfg, node).expect("renders");
        frr_conf(&cfg, node, &routing)
    }

    #[test]
    fn no_forward_uses_a_valid_standard_community_for_16_bit_asns() {
        let c = conf(&[], "gw-a");
        assert!(c.contains("set community 65010:9999 additive"));
        assert!(
            c.contains("bgp community-list standard MEDUZA-EBGP-LEARNED seq 10 permit 65010:9999")
        );
        assert!(c.contains(" match community MEDUZA-EBGP-LEARNED"));
        // Never a bare community (FRR >= 8 rejects `9999`).
        assert!(!c.lines().any(|l| l.trim() == "set community 9999 additive"));
    }

    #[test]
    fn no_forward_uses_a_large_community_for_32_bit_asns() {
        let big = [
            ("/nodes/gw-a/bgp/asn", "4200000000"),
            ("/nodes/gw-b/bgp/asn", "4200000000"),
            ("/nodes/gw-c/bgp/asn", "4200000000"),
        ];
        let c = conf(&big, "gw-a");
        assert!(c.contains("router bgp 4200000000"));
        assert!(c.contains("set large-community 4200000000:9999:0 additive"));
        assert!(c.contains(
            "bgp large-community-list standard MEDUZA-EBGP-LEARNED seq 10 permit 4200000000:9999:0"
        ));
        assert!(c.contains(" match large-community MEDUZA-EBGP-LEARNED"));
        assert!(!c.contains("set community 4200000000"));
    }

    #[test]
    fn no_transit_only_where_asked() {
        assert!(conf(&[], "gw-a").contains(" match as-path MEDUZA-NO-TRANSIT"));
        let c = conf(&[], "gw-b");
        assert!(!c.contains("as-path"), "gw-b's peer has no_transit false");
        // Every eBGP neighbor still gets both route-maps (ebgp-requires-policy).
        assert!(c.contains("neighbor 172.30.0.2 route-map MEDUZA-EBGP-WG-partner-IN in"));
        assert!(c.contains("neighbor 172.30.0.2 route-map MEDUZA-EBGP-WG-partner-OUT out"));
        assert!(c.contains("neighbor 172.30.0.2 update-source wg-partner"));
    }

    #[test]
    fn private_lans_of_every_node_are_kept_from_ebgp() {
        // gw-b has no private_lan of its own; gw-a's must still not leave through gw-b.
        let c = conf(&[], "gw-b");
        assert!(c.contains("ip prefix-list MEDUZA-PRIVATE-LAN seq 10 permit 10.99.1.0/24 le 32"));
        assert!(c.contains("route-map MEDUZA-EBGP-WG-partner-OUT deny 5\n match ip address prefix-list MEDUZA-PRIVATE-LAN"));
    }

    #[test]
    fn ibgp_only_with_bgp_as_internal_routing() {
        let c = conf(&[], "gw-c");
        assert!(c.contains(" neighbor 10.200.0.1 remote-as 65010"));
        assert!(c.contains("  neighbor 10.200.0.1 next-hop-self"));
        assert!(!c.contains("router ospf"));
        let c = conf(&[("/global/internal_routing_system", "ospf")], "gw-c");
        assert!(
            !c.contains("10.200.0.1"),
            "no iBGP neighbors with ospf internally"
        );
        assert!(c.contains(" bgp router-id 10.255.0.3"));
    }

    #[test]
    fn ospf_networks_and_router_id() {
        let c = conf(&[], "gw-a");
        assert!(c.contains("router ospf\n ospf router-id 10.255.0.1\n"));
        for n in ["10.200.0.0/24", "10.42.1.0/24", "10.99.1.0/24"] {
            assert!(c.contains(&format!(" network {n} area 0\n")), "{n}");
        }
        assert!(c.contains("interface tnc0\n no ip ospf passive\n"));
        // Router id derived from the overlay address when none is configured.
        let c = conf(
            &[
                ("/nodes/gw-a/ospf/router_id", ""),
                ("/nodes/gw-a/bgp/router_id", ""),
            ],
            "gw-a",
        );
        assert!(c.contains(" ospf router-id 10.200.0.1\n"));
        assert!(c.contains(" bgp router-id 10.200.0.1\n"));
    }

    #[test]
    fn zebra_turns_forwarding_on() {
        for node in ["gw-a", "gw-b", "gw-c"] {
            assert!(conf(&[], node).contains("\nip forwarding\n"), "{node}");
        }
    }

    #[test]
    fn every_neighbor_retries_its_connection_within_seconds() {
        for node in ["gw-a", "gw-b", "gw-c"] {
            let c = conf(&[], node);
            let neighbors: Vec<&str> = c
                .lines()
                .filter(|l| l.contains(" remote-as "))
                .filter_map(|l| l.split_whitespace().nth(1))
                .collect();
            assert!(!neighbors.is_empty(), "{node} has BGP neighbors");
            for n in neighbors {
                assert!(
                    c.contains(&format!(
                        " neighbor {n} timers connect {CONNECT_RETRY_SECS}\n"
                    )),
                    "{node}: {n}"
                );
            }
        }
    }
}
