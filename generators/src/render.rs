//! Rendering one node: the typed [`Config`] → every file, service and plan the daemon
//! applies on that node.
//!
//! Owns: the per-node composition of the generators in [`crate::gen`] (which domains are
//! wanted on a node), the TPROXY plan and the DNS plan.
//! Must not: do I/O, read the environment or the clock. Everything environmental
//! (`DEFAULT_GW`, the per-node generated mihomo secret, program paths) comes in through
//! [`RenderEnv`], so the same snapshot and environment always render the same bytes.
//!
//! A domain absent from [`Rendered::domains`] is not wanted on the node: the daemon
//! stops its services and removes its files.

use crate::error::ValidationError;
use crate::gen;
use crate::model::{self, ClashMode, Config, MeshType, Node};
use crate::plan::dns::DnsPlan;
use crate::plan::tproxy::TproxyPlan;
use crate::plan::wireguard::WgDevice;
use ipnet::IpNet;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

// The generators' inputs and outputs, and the overlay queries, under their old paths
// (`render::FileOut`, `render::mesh_addr`, ...).
pub use crate::model::{active_mesh, mesh_addr, mesh_dev};
pub use crate::output::{Bins, ClashRuntime, DomainOutput, FileOut, MosdnsRuntime, RenderEnv};

/// A unit of configuration that is compared, written and reloaded on its own.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Domain {
    Easytier,
    Tinc,
    /// One OpenVPN instance (`/nodes/<id>/openvpn/<name>`).
    Openvpn(String),
    /// One WireGuard instance (`/nodes/<id>/wireguard/<name>`).
    Wireguard(String),
    Frr,
    Clash,
    Mosdns,
    Hosts,
    /// One tunnel child (`/nodes/<id>/tunnels/<name>`).
    Tunnel(String),
}

impl Domain {
    /// `"easytier"`, `"openvpn/office"`, ...: used in logs, status and golden file names.
    pub fn label(&self) -> String {
        match self {
            Self::Easytier => "easytier".into(),
            Self::Tinc => "tinc".into(),
            Self::Openvpn(n) => format!("openvpn/{n}"),
            Self::Wireguard(n) => format!("wireguard/{n}"),
            Self::Frr => "frr".into(),
            Self::Clash => "clash".into(),
            Self::Mosdns => "mosdns".into(),
            Self::Hosts => "hosts".into(),
            Self::Tunnel(n) => format!("tunnel/{n}"),
        }
    }
}

/// Everything rendered for one node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rendered {
    pub domains: BTreeMap<Domain, DomainOutput>,
    /// `Some` iff Clash is enabled in TPROXY mode.
    pub tproxy: Option<TproxyPlan>,
    pub dns: DnsPlan,
    /// Enabled WireGuard instances.
    pub wireguard: Vec<WgDevice>,
    pub clash: Option<ClashRuntime>,
    pub mosdns: Option<MosdnsRuntime>,
    /// FRR must run (OSPF or BGP enabled on the node).
    pub frr_enabled: bool,
    /// `/nodes/<id>/api/token`: bearer token of the node API; never serialized.
    #[serde(skip)]
    pub api_token: Option<String>,
    /// `/nodes/<id>/api/tls/{cert,key}`: HTTPS for the node API; never serialized.
    #[serde(skip)]
    pub api_tls: Option<model::ApiTls>,
}

/// Render every domain of node `node_id`.
pub fn render_node(
    cfg: &Config,
    node_id: &str,
    env: &RenderEnv,
) -> Result<Rendered, ValidationError> {
    let node = cfg.node(node_id).ok_or_else(|| {
        ValidationError::new(
            format!("/nodes/{node_id}/"),
            node_id,
            "no keys under /nodes/<id>/ for this node",
        )
    })?;
    let mut domains = BTreeMap::new();
    match active_mesh(cfg, node) {
        Some(MeshType::Easytier) => {
            domains.insert(Domain::Easytier, gen::easytier::render(cfg, node, env)?);
        }
        Some(MeshType::Tinc) => {
            domains.insert(Domain::Tinc, gen::tinc::render(cfg, node, env)?);
        }
        None => {}
    }
    for inst in node.openvpn.iter().filter(|o| o.enable) {
        domains.insert(
            Domain::Openvpn(inst.name.clone()),
            gen::openvpn::render(node, inst, env)?,
        );
    }
    let mut wireguard = Vec::new();
    for inst in node.wireguard.iter().filter(|w| w.enable) {
        domains.insert(
            Domain::Wireguard(inst.name.clone()),
            gen::wireguard::render(node, inst),
        );
        wireguard.push(gen::wireguard::device(inst));
    }
    let frr_enabled = gen::frr::enabled(node);
    if frr_enabled {
        let routing = model::frr_routing(cfg, node)?;
        domains.insert(Domain::Frr, gen::frr::render(cfg, node, &routing));
    }
    let mut clash = None;
    if node.clash.enable {
        let (out, runtime) = gen::clash::render(cfg, node, env)?;
        domains.insert(Domain::Clash, out);
        clash = Some(runtime);
    }
    let mut mosdns = None;
    if node.mosdns.enable {
        let (out, runtime) = gen::mosdns::render(cfg, node, env)?;
        domains.insert(Domain::Mosdns, out);
        mosdns = Some(runtime);
    }
    domains.insert(Domain::Hosts, gen::hosts::render(cfg));
    for t in node.tunnels.iter().filter(|t| t.enable) {
        domains.insert(
            Domain::Tunnel(t.name.clone()),
            gen::tunnels::render(node, t)?,
        );
    }
    let tproxy = (node.clash.enable && node.clash.mode == ClashMode::Tproxy)
        .then(|| tproxy_plan(cfg, node, env));
    Ok(Rendered {
        domains,
        tproxy,
        dns: dns_plan(cfg, node),
        wireguard,
        clash,
        mosdns,
        frr_enabled,
        api_token: node.api_token.clone(),
        api_tls: node.api_tls.clone(),
    })
}

/// The port DNS hijack redirects to: the frontend's (`DEFAULT_DNS_LISTEN`).
pub const DNS_PORT: u16 = 53;

/// The TPROXY plan of `node` (whether or not Clash runs in TPROXY mode).
///
/// Lists are sorted and deduplicated so equal configurations give equal plans.
pub fn tproxy_plan(cfg: &Config, node: &Node, env: &RenderEnv) -> TproxyPlan {
    let lans: BTreeSet<IpNet> = node.lan.iter().chain(&node.private_lan).copied().collect();
    let mut ifaces = BTreeSet::new();
    let mut ports: BTreeSet<u16> = node.clash.exclude_tproxy_ports.iter().copied().collect();
    match active_mesh(cfg, node) {
        Some(MeshType::Tinc) => {
            ifaces.insert(node.tinc.dev_name.clone());
            ports.insert(node.tinc.port);
        }
        Some(MeshType::Easytier) => {
            ifaces.insert(node.easytier.dev_name.clone());
            ports.extend(
                node.easytier
                    .listeners
                    .iter()
                    .filter_map(|l| gen::easytier::listener_port(l)),
            );
        }
        None => {}
    }
    for o in node.openvpn.iter().filter(|o| o.enable) {
        ifaces.insert(o.dev.clone());
        ports.insert(o.port);
        ports.extend(o.remotes.iter().map(|(_, p)| *p));
    }
    for w in node.wireguard.iter().filter(|w| w.enable) {
        ifaces.insert(w.dev.clone());
        ports.extend(w.listen_port);
    }
    TproxyPlan {
        proxy_src: lans.iter().copied().collect(),
        bypass_dst: lans.into_iter().collect(),
        exclude_src: env.default_gw.into_iter().collect(),
        exclude_ifaces: ifaces.into_iter().collect(),
        exclude_ports: ports.into_iter().collect(),
        dns_hijack_port: node.dns_guard.hijack.then_some(DNS_PORT),
        block_quic: node.dns_guard.block_quic,
        block_dot: node.dns_guard.block_dot,
        block_doh: node.dns_guard.block_doh.clone(),
        fake_ip: cfg.global.clash.fake_ip.clone(),
        ..TproxyPlan::empty()
    }
}

/// The DNS frontend's plan for `node`.
pub fn dns_plan(cfg: &Config, node: &Node) -> DnsPlan {
    DnsPlan {
        hosts: cfg.dns_hosts.clone(),
        mosdns_enabled: node.mosdns.enable,
        clash_enabled: node.clash.enable,
        upstreams: cfg.dns_upstreams_for(node),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Snapshot;
    use std::net::IpAddr;

    const EXAMPLE: &str = include_str!("../../docs/examples/three-nodes.json");

    fn example(overrides: &[(&str, &str)]) -> Config {
        let mut s = Snapshot::from_json(EXAMPLE).expect("example is JSON");
        for (k, v) in overrides {
            s.0.insert((*k).to_string(), (*v).to_string());
        }
        Config::parse(&s).expect("example validates")
    }

    fn env() -> RenderEnv {
        RenderEnv {
            default_gw: Some("192.168.0.1".parse().expect("literal")),
            clash_secret: "generated-secret-0123456789".into(),
            bins: Bins::default(),
        }
    }

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|n| n.parse().expect("literal")).collect()
    }

    #[test]
    fn tproxy_plan_lists_sources_and_every_exclusion() {
        let cfg = example(&[]);
        let r = render_node(&cfg, "gw-a", &env()).expect("renders");
        let t = r.tproxy.expect("gw-a runs clash in tproxy mode");
        assert_eq!(t.proxy_src, nets(&["10.42.1.0/24", "10.99.1.0/24"]));
        assert_eq!(t.bypass_dst, t.proxy_src);
        assert_eq!(
            t.exclude_src,
            vec!["192.168.0.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(t.exclude_ifaces, vec!["ovpn-isp1", "tnc0"]);
        // clash/exclude_tproxy_port 22 9100, tinc 655, openvpn 1194 (sorted, unique).
        assert_eq!(t.exclude_ports, vec![22, 655, 1194, 9100]);
        assert_eq!((t.port, t.mark, t.table), (7893, 1, 100));
        // DNS hijack is on by default, bypass blocking off.
        assert_eq!(t.dns_hijack_port, Some(53));
        assert!(!t.block_quic && !t.block_dot && t.block_doh.is_empty());
        let cfg = example(&[
            ("/nodes/gw-a/dns/hijack", "false"),
            ("/nodes/gw-a/dns/block_quic", "true"),
            ("/nodes/gw-a/dns/block_dot", "true"),
            ("/nodes/gw-a/dns/block_doh", "1.1.1.1\n2606:4700::1111"),
        ]);
        let t = render_node(&cfg, "gw-a", &env())
            .expect("renders")
            .tproxy
            .expect("tproxy");
        assert_eq!(t.dns_hijack_port, None);
        assert!(t.block_quic && t.block_dot);
        assert_eq!(t.block_doh.len(), 2);
    }

    #[test]
    fn fake_ip_ranges_come_from_the_generated_dns_section() {
        let plan = |base: &str| {
            let cfg = example(&[("/global/clash/base", base)]);
            let node = cfg.node("gw-a").expect("gw-a");
            tproxy_plan(&cfg, node, &env()).fake_ip
        };
        assert_eq!(plan("mode: rule\n"), Vec::<IpNet>::new());
        assert_eq!(
            plan("dns: {enhanced-mode: redir-host}\n"),
            Vec::<IpNet>::new()
        );
        // mihomo's default range when only the mode is set; host bits dropped.
        assert_eq!(
            plan("dns: {enhanced-mode: fake-ip}\n"),
            nets(&["198.18.0.0/16"])
        );
        assert_eq!(
            plan("dns: {enhanced-mode: fake-ip, fake-ip-range: 28.0.0.1/8, fake-ip-range6: 'fdfe:dcba:9876::1/64'}\n"),
            nets(&["28.0.0.0/8", "fdfe:dcba:9876::/64"])
        );
        for (base, field) in [
            (
                "dns: {enhanced-mode: fake-ip, fake-ip-range: 2001:db8::/64}\n",
                "dns.fake-ip-range: 2001:db8::/64",
            ),
            (
                "dns: {enhanced-mode: fake-ip, fake-ip-range: nonsense}\n",
                "dns.fake-ip-range: nonsense",
            ),
            (
                "dns: {enhanced-mode: fakeip}\n",
                "dns.enhanced-mode: fakeip",
            ),
        ] {
            let mut s = Snapshot::from_json(EXAMPLE).expect("example is JSON");
            s.0.insert("/global/clash/base".into(), base.into());
            let errs = Config::parse(&s).expect_err(base);
            assert!(
                errs.0
                    .iter()
                    .any(|e| e.key == "/global/clash/base" && e.to_string().contains(field)),
                "{base}: {errs:?}"
            );
        }
    }

    #[test]
    fn tproxy_plan_follows_the_active_mesh() {
        let cfg = example(&[("/global/mesh_type", "easytier")]);
        let node = cfg.node("gw-b").expect("gw-b");
        let t = tproxy_plan(&cfg, node, &env());
        assert_eq!(t.exclude_ifaces, vec!["et0", "wg-partner"]);
        // easytier listener 11010 and wireguard 51820; no tinc port.
        assert_eq!(t.exclude_ports, vec![11010, 51820]);
        assert!(t.exclude_src.len() == 1);
    }

    #[test]
    fn mixed_mode_has_no_tproxy_plan() {
        let cfg = example(&[]);
        let r = render_node(&cfg, "gw-b", &env()).expect("renders");
        assert!(r.tproxy.is_none());
        let c = r.clash.expect("clash enabled");
        assert_eq!(c.mode, ClashMode::Mixed);
        assert_eq!(c.secret, "generated-secret-0123456789");
        assert_eq!(c.provider_path, "/etc/mihomo/providers/backup.yaml");
        assert_eq!(c.refresh_minutes, None);
    }

    #[test]
    fn only_enabled_things_render() {
        let cfg = example(&[]);
        let r = render_node(&cfg, "gw-a", &env()).expect("renders");
        let labels: Vec<String> = r.domains.keys().map(Domain::label).collect();
        assert_eq!(
            labels,
            vec![
                "tinc",
                "openvpn/isp1",
                "frr",
                "clash",
                "mosdns",
                "hosts",
                "tunnel/backup"
            ]
        );
        // The disabled openvpn/lab instance is absent; easytier is not the mesh.
        let r = render_node(&cfg, "gw-c", &env()).expect("renders");
        assert!(r.clash.is_none() && r.tproxy.is_none() && r.wireguard.is_empty());
        assert!(r.mosdns.is_some());
        let cfg = example(&[
            ("/nodes/gw-c/bgp/enable", "false"),
            ("/nodes/gw-c/mosdns/enable", "false"),
            ("/nodes/gw-c/tinc/enable", "false"),
        ]);
        let r = render_node(&cfg, "gw-c", &env()).expect("renders");
        let labels: Vec<String> = r.domains.keys().map(Domain::label).collect();
        assert_eq!(labels, vec!["hosts"]);
        assert!(!r.frr_enabled);
    }

    #[test]
    fn dns_plan_merges_node_upstreams_over_global_ones() {
        let cfg = example(&[]);
        let node = cfg.node("gw-c").expect("gw-c");
        let d = dns_plan(&cfg, node);
        assert!(d.mosdns_enabled && !d.clash_enabled);
        let names: Vec<&str> = d.upstreams.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, vec!["alidns", "cloudflare"]);
        assert_eq!(d.upstreams[0].addresses[0].to_string(), "10.42.3.53:53");
        assert_eq!(d.hosts["db.example.com"].len(), 3);
    }

    #[test]
    fn wireguard_plan_carries_the_instance() {
        let cfg = example(&[]);
        let r = render_node(&cfg, "gw-b", &env()).expect("renders");
        assert_eq!(r.wireguard.len(), 1);
        let w = &r.wireguard[0];
        assert_eq!((w.dev.as_str(), w.listen_port), ("wg-partner", Some(51820)));
        assert_eq!(
            w.peers[0].allowed_ips,
            nets(&["172.30.0.0/30", "10.77.0.0/16"])
        );
        let f = &r.domains[&Domain::Wireguard("partner".into())].files[0];
        assert_eq!(
            (f.path.as_str(), f.mode),
            ("/etc/wireguard/wg-partner.conf", 0o600)
        );
        assert!(!f.content.lines().any(|l| l.starts_with("Address")));
    }

    #[test]
    fn rendering_is_deterministic() {
        let cfg = example(&[]);
        for id in ["gw-a", "gw-b", "gw-c"] {
            assert_eq!(
                render_node(&cfg, id, &env()).expect("renders"),
                render_node(&cfg, id, &env()).expect("renders")
            );
        }
    }

    #[test]
    fn secrets_are_mode_0600() {
        let cfg = example(&[]);
        for id in ["gw-a", "gw-b", "gw-c"] {
            let r = render_node(&cfg, id, &env()).expect("renders");
            for f in r.domains.values().flat_map(|d| &d.files) {
                let secret = f.content.contains("PRIVATE KEY")
                    || f.content.contains("<secret>")
                    || f.content.contains("PrivateKey")
                    || f.content.contains("secret:")
                    || f.content.contains("network_secret");
                if secret {
                    assert_eq!(f.mode, 0o600, "{} holds a secret", f.path);
                }
            }
        }
    }

    #[test]
    fn domain_labels() {
        assert_eq!(Domain::Openvpn("office".into()).label(), "openvpn/office");
        assert_eq!(Domain::Wireguard("x".into()).label(), "wireguard/x");
        assert_eq!(Domain::Hosts.label(), "hosts");
    }
}
