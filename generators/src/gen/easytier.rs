//! EasyTier: `/etc/easytier/config.toml` and the `easytier-core -c` service.
//!
//! The TOML layout is EasyTier's `TomlConfigLoader` (top-level `instance_name`,
//! `hostname`, `ipv4`, `dhcp`, `listeners`, `mapped_listeners`, `[network_identity]`,
//! `[[peer]]`, `[flags]`). Command-line flags would override the file, so the argv
//! carries only `-c`. TOML is written by hand (a handful of keys) with every string
//! escaped as a TOML basic string.

use super::{apply_service_overrides, header_hash, service, MODE_SECRET};
use crate::error::ValidationError;
use crate::model::{Config, Node};
use crate::plan::service::{ReloadStrategy, ServiceSpec};
use crate::render::{DomainOutput, FileOut, RenderEnv};
use std::fmt::Write as _;

pub const CONFIG_PATH: &str = "/etc/easytier/config.toml";
pub const SERVICE: &str = "easytier";

/// The TOML text (holds the network secret: mode 0600).
pub fn config_toml(cfg: &Config, node: &Node) -> String {
    let et = &node.easytier;
    let g = &cfg.global.easytier;
    let mut s = header_hash(&node.id, "easytier");
    let _ = writeln!(s, "instance_name = {}", toml_str(&node.id));
    let _ = writeln!(s, "hostname = {}", toml_str(&node.id));
    if g.dhcp {
        s.push_str("dhcp = true\n");
    } else if let Some(ip) = et.ipv4 {
        let _ = writeln!(s, "ipv4 = {}", toml_str(&ip.to_string()));
        s.push_str("dhcp = false\n");
    }
    let listeners: Vec<String> = et.listeners.iter().flat_map(|l| listener_urls(l)).collect();
    let _ = writeln!(s, "listeners = {}", toml_list(&listeners));
    if !et.mapped_listeners.is_empty() {
        let _ = writeln!(s, "mapped_listeners = {}", toml_list(&et.mapped_listeners));
    }
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
    s.push_str("\n[flags]\n");
    let _ = writeln!(s, "dev_name = {}", toml_str(&et.dev_name));
    let _ = writeln!(s, "private_mode = {}", g.private_mode);
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
    let svc: ServiceSpec = apply_service_overrides(node, svc)?;
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
        assert_eq!(v["flags"]["private_mode"].as_bool(), Some(true));
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
