//! EasyTier: `/etc/easytier/config.toml` and the `easytier-core -c` service.
//!
//! The TOML layout is that of EasyTier 2.0.3's `TomlConfigLoader`
//! (`src/common/config.rs`: top-level `instance_name`, `hostname`, `ipv4`, `dhcp`,
//! `listeners`, `[network_identity]`, `[[peer]]`, `[flags]`), the version the firmware
//! ships and the tests run (`model::EASYTIER_VERSION`). That loader ignores keys it
//! does not know, at the top level and in `[flags]`, without a word, so nothing is
//! written that 2.0.3 would drop:
//! - `private_mode` (a flag since 2.3.1) is written as 2.0.3's
//!   `foreign_network_whitelist = ""`: no foreign network name matches the empty
//!   pattern, so this node neither accepts nor relays another network's peers;
//! - `mapped_listeners` (since 2.1.2) is refused by the model.
//!
//! Each IPv4 LAN (`lan`, `private_lan`) is a `[[proxy_network]]`. EasyTier's TUN device
//! is layer 3: a packet the kernel routes into it (by the OSPF or BGP route to another
//! node's LAN) carries no next hop, and easytier-core picks the peer by destination
//! address alone, among the peers' overlay addresses and their proxy networks
//! (`peer_ospf_route.rs`, `get_peer_id_by_ipv4`); without the entry it drops the packet
//! ("no peer id for ipv4"). The owner delivers it through its subnet proxy (NAT to its
//! own address). `routes = []` keeps easytier-core from adding kernel routes of its
//! own for those networks (a manual route list replaces the learned one,
//! `run_proxy_cidrs_route_updater`): the routes into the mesh are FRR's.
//!
//! With `-c`, easytier-core ignores every other command-line flag ("will ignore all
//! command line flags"), so the argv carries only `-c`. TOML is written by hand (a
//! handful of keys) with every string escaped as a TOML basic string.

use super::{apply_service_overrides, header_hash, service, MODE_SECRET};
use crate::error::ValidationError;
use crate::model::{Config, Node};
use crate::output::{DomainOutput, FileOut, RenderEnv};
use crate::plan::service::{Redact, ReloadStrategy, ServiceSpec};
use ipnet::IpNet;
use std::fmt::Write as _;

pub const CONFIG_PATH: &str = "/etc/easytier/config.toml";
pub const SERVICE: &str = "easytier";
/// easytier-core's management RPC, where `easytier-cli` looks by default.
pub const RPC_PORTAL: &str = "127.0.0.1:15888";

/// The TOML text (holds the network secret: mode 0600).
pub fn config_toml(cfg: &Config, node: &Node) -> String {
    let et = &node.easytier;
    let g = &cfg.global.easytier;
    let mut s = header_hash(&node.id, "easytier");
    let _ = writeln!(s, "instance_name = {}", toml_str(&node.id));
    let _ = writeln!(s, "hostname = {}", toml_str(&node.id));
    if et.dhcp {
        s.push_str("dhcp = true\n");
    } else if let Some(ip) = et.ipv4 {
        let _ = writeln!(s, "ipv4 = {}", toml_str(&ip.to_string()));
        s.push_str("dhcp = false\n");
    }
    let listeners: Vec<String> = et.listeners.iter().flat_map(|l| listener_urls(l)).collect();
    let _ = writeln!(s, "listeners = {}", toml_list(&listeners));
    // No kernel routes from easytier-core: FRR owns the routing table.
    s.push_str("routes = []\n");
    // Without it a file-configured 2.0.3 serves no RPC and `easytier-cli` (whose
    // default this is) cannot ask it anything. Loopback only.
    let _ = writeln!(s, "rpc_portal = {}", toml_str(RPC_PORTAL));
    s.push_str("\n[network_identity]\n");
    let _ = writeln!(
        s,
        "network_name = {}",
        toml_str(g.network_name.as_deref().unwrap_or_default())
    );
    let _ = writeln!(
        s,
        "network_secret = {}",
        toml_str(g.network_secret.as_deref().unwrap_or_default())
    );
    for peer in &et.peers {
        let _ = write!(s, "\n[[peer]]\nuri = {}\n", toml_str(peer));
    }
    for lan in node.lan.iter().chain(&node.private_lan) {
        if let IpNet::V4(lan) = lan {
            let _ = write!(
                s,
                "\n[[proxy_network]]\ncidr = {}\n",
                toml_str(&lan.to_string())
            );
        }
    }
    s.push_str("\n[flags]\n");
    let _ = writeln!(s, "dev_name = {}", toml_str(&et.dev_name));
    if g.private_mode {
        s.push_str("foreign_network_whitelist = \"\"\n");
    }
    s
}

/// Files and the `easytier` service.
pub fn render(cfg: &Config, node: &Node, env: &RenderEnv) -> Result<DomainOutput, ValidationError> {
    let svc = service(
        SERVICE,
        vec![env.bins.easytier.clone(), "-c".into(), CONFIG_PATH.into()],
        &["CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"],
        vec![CONFIG_PATH.into()],
        ReloadStrategy::Restart,
    );
    let mut svc: ServiceSpec = apply_service_overrides(node, svc)?;
    // easytier-core prints the config it loaded, secret included, at every start: as
    // given and as a TOML basic string's body (its printer may escape it).
    if let Some(secret) = cfg.global.easytier.network_secret.as_deref() {
        let quoted = toml_str(secret);
        svc.redact = Redact(vec![
            secret.to_string(),
            quoted[1..quoted.len() - 1].to_string(),
        ]);
    }
    Ok(DomainOutput {
        files: vec![FileOut::new(
            CONFIG_PATH,
            config_toml(cfg, node),
            MODE_SECRET,
        )],
        services: vec![svc],
    })
}

/// A listener as URLs: a bare port means TCP and UDP on every address (what the
/// command line's bare-port form gives for the two base protocols; the TOML file needs
/// URLs).
pub fn listener_urls(l: &str) -> Vec<String> {
    match l.parse::<u16>() {
        Ok(p) => vec![format!("tcp://0.0.0.0:{p}"), format!("udp://0.0.0.0:{p}")],
        Err(_) => vec![l.to_string()],
    }
}

/// The local port of a listener (`11010`, `tcp://0.0.0.0:11010`, `wss://0.0.0.0:11012/x`).
pub fn listener_port(l: &str) -> Option<u16> {
    if let Ok(p) = l.parse::<u16>() {
        return Some(p);
    }
    let rest = l.split_once("://")?.1;
    let hostport = rest.split('/').next()?;
    hostport.rsplit_once(':')?.1.parse().ok()
}

/// A TOML basic string.
pub fn toml_str(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    s.push('"');
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\t' => s.push_str("\\t"),
            '\r' => s.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(s, "\\u{:04X}", c as u32);
            }
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| toml_str(i)).collect();
    format!("[{}]", quoted.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_str(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(toml_str("x\ny"), r#""x\ny""#);
        assert_eq!(toml_str("\u{1}"), r#""\u0001""#);
    }

    #[test]
    fn listener_ports() {
        assert_eq!(listener_port("11010"), Some(11010));
        assert_eq!(listener_port("tcp://0.0.0.0:11010"), Some(11010));
        assert_eq!(listener_port("wss://[::]:11012/path"), Some(11012));
        assert_eq!(listener_port("ring://x"), None);
        assert_eq!(listener_urls("11010").len(), 2);
    }
}

#[cfg(test)]
mod file_tests {
    use super::*;
    use crate::snapshot::Snapshot;

    #[test]
    fn config_is_valid_toml_with_easytier_keys() {
        let mut s = Snapshot::from_json(include_str!("../../../docs/examples/three-nodes.json"))
            .expect("example is JSON");
        s.0.insert("/global/mesh_type".into(), "easytier".into());
        s.0.insert(
            "/global/easytier/network_secret".into(),
            "quote\" back\\slash".into(),
        );
        let cfg = Config::parse(&s).expect("validates");
        let text = config_toml(&cfg, cfg.node("gw-b").expect("gw-b"));
        let v: toml::Table = toml::from_str(&text).expect("valid TOML");
        assert_eq!(v["ipv4"].as_str(), Some("10.144.144.2/24"));
        assert_eq!(
            v["network_identity"]["network_secret"].as_str(),
            Some("quote\" back\\slash")
        );
        // private_mode: no foreign network is accepted (2.0.3 has no private_mode).
        assert_eq!(v["flags"]["foreign_network_whitelist"].as_str(), Some(""));
        assert!(v["flags"].get("private_mode").is_none());
        assert!(v.get("mapped_listeners").is_none());
        assert_eq!(v["flags"]["dev_name"].as_str(), Some("et0"));
        let listeners: Vec<&str> = v["listeners"]
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|l| l.as_str())
            .collect();
        assert_eq!(
            listeners,
            vec!["tcp://0.0.0.0:11010", "udp://0.0.0.0:11010"]
        );
        assert_eq!(
            v["peer"][0]["uri"].as_str(),
            Some("tcp://203.0.113.10:11010")
        );
    }
}
