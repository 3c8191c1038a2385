//! The overlay: `/global/mesh_type`, EasyTier and tinc (global and per node), and the
//! queries the other domains ask about it (which overlay runs on a node, its address and
//! interface).
//!
//! Owns: the mesh keys' types, defaults and validation, including the checks across
//! nodes (a network name when EasyTier runs, one tinc name per node).
//! Must not: render the EasyTier or tinc files (`gen::easytier`, `gen::tinc`).

use super::{Config, Global, Node};
use crate::parse::{self, Reader};
use ipnet::IpNet;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

/// Overlay network selected globally (`/global/mesh_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MeshType {
    Easytier,
    Tinc,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct EasytierGlobal {
    pub network_name: Option<String>,
    pub network_secret: Option<String>,
    pub private_mode: bool,
    pub dhcp: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TincGlobal {
    pub netname: String,
    pub cipher: Option<String>,
    pub digest: Option<String>,
}

/// The EasyTier release whose config format the generator writes: the firmware's
/// `easytier` package and the tests' `easytier-core` (crates.io) are this version.
pub const EASYTIER_VERSION: &str = "2.0.3";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Easytier {
    pub enable: bool,
    pub dev_name: String,
    /// `ipv4`: address with optional prefix (`10.144.144.1/24`).
    pub ipv4: Option<IpNet>,
    /// `easytier/dhcp`, default `/global/easytier/dhcp`: easytier-core picks the
    /// overlay address and `ipv4` is not written (docs/etcd-schema.md: keep one node,
    /// the hub, on a fixed address).
    pub dhcp: bool,
    pub listeners: Vec<String>,
    pub peers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tinc {
    pub enable: bool,
    /// Tinc node name (alphanumerics and `_`): default the node id with `-` → `_`.
    pub name: String,
    pub dev_name: String,
    pub port: u16,
    pub address: Option<String>,
    pub ipv4: Option<IpNet>,
    pub subnets: Vec<IpNet>,
    pub public_key: Option<String>,
    #[serde(skip)]
    pub private_key: Option<String>,
}

/// The overlay that runs on `node`: the global `mesh_type`, if the node enables it.
/// The other overlay's keys are ignored (they may stay in etcd while a fleet switches).
pub fn active_mesh(cfg: &Config, node: &Node) -> Option<MeshType> {
    match cfg.global.mesh_type? {
        MeshType::Easytier if node.easytier.enable => Some(MeshType::Easytier),
        MeshType::Tinc if node.tinc.enable => Some(MeshType::Tinc),
        _ => None,
    }
}

/// The node's address on the active overlay, if configured (an EasyTier node in DHCP
/// mode has none that meduza knows).
pub fn mesh_addr(cfg: &Config, node: &Node) -> Option<IpNet> {
    match active_mesh(cfg, node)? {
        MeshType::Easytier => node.easytier.ipv4.filter(|_| !node.easytier.dhcp),
        MeshType::Tinc => node.tinc.ipv4,
    }
}

/// The node's overlay interface, if an overlay runs on it.
pub fn mesh_dev<'a>(cfg: &Config, node: &'a Node) -> Option<&'a str> {
    match active_mesh(cfg, node)? {
        MeshType::Easytier => Some(&node.easytier.dev_name),
        MeshType::Tinc => Some(&node.tinc.dev_name),
    }
}

/// `/global/mesh_type` (no default: a node enabling an overlay needs it).
pub(super) fn parse_mesh_type(r: &mut Reader<'_>) -> Option<MeshType> {
    r.choice(
        "/global/mesh_type",
        &[("easytier", MeshType::Easytier), ("tinc", MeshType::Tinc)],
        None,
    )
}

/// `/global/easytier/*`.
pub(super) fn parse_easytier_global(r: &mut Reader<'_>) -> EasytierGlobal {
    EasytierGlobal {
        network_name: r.parsed("/global/easytier/network_name", |v| {
            parse::validate_name(v).map(|()| v.to_string())
        }),
        network_secret: r.str("/global/easytier/network_secret").map(str::to_string),
        private_mode: r.bool("/global/easytier/private_mode", false),
        dhcp: r.bool("/global/easytier/dhcp", false),
    }
}

/// `/global/tinc/*`.
pub(super) fn parse_tinc_global(r: &mut Reader<'_>) -> TincGlobal {
    TincGlobal {
        netname: r
            .parsed("/global/tinc/netname", |v| {
                parse::validate_name(v).map(|()| v.to_string())
            })
            .unwrap_or_else(|| "mesh".into()),
        cipher: r.parsed("/global/tinc/cipher", parse::parse_token),
        digest: r.parsed("/global/tinc/digest", parse::parse_token),
    }
}

/// `/nodes/<id>/easytier/*` (`p` is `/nodes/<id>/`).
pub(super) fn parse_easytier(r: &mut Reader<'_>, p: &str, global: &Global) -> Easytier {
    let k = |s: &str| format!("{p}{s}");
    let easytier = Easytier {
        enable: r.bool(&k("easytier/enable"), false),
        dev_name: r
            .iface(&k("easytier/dev_name"))
            .unwrap_or_else(|| "et0".into()),
        ipv4: r.parsed(&k("easytier/ipv4"), |v| {
            if let Ok(a) = v.parse::<Ipv4Addr>() {
                return Ok(IpNet::from(IpAddr::V4(a)));
            }
            match parse::parse_if_addr(v)? {
                n @ IpNet::V4(_) => Ok(n),
                IpNet::V6(_) => Err("easytier ipv4 must be IPv4".into()),
            }
        }),
        dhcp: r.bool(&k("easytier/dhcp"), global.easytier.dhcp),
        listeners: r.list(&k("easytier/listeners"), parse_et_url),
        peers: r.list(&k("easytier/peers"), |v| {
            if v.parse::<u16>().is_ok() {
                return Err("a peer is a URL (proto://host:port), not a port".into());
            }
            parse_et_url(v)
        }),
    };

    // EasyTier 2.0.3 (the version the firmware ships and the tests run) has no mapped
    // listeners (added in 2.1.2) and would ignore the TOML key without a word.
    let mapped = k("easytier/mapped_listeners");
    if let Some(v) = r.str(&mapped) {
        r.error(
            &mapped,
            v,
            format!(
                "not supported by EasyTier {EASYTIER_VERSION} (mapped listeners came in 2.1.2)"
            ),
        );
    }
    easytier
}

/// `/nodes/<id>/tinc/*` (`p` is `/nodes/<id>/`).
pub(super) fn parse_tinc(r: &mut Reader<'_>, id: &str, p: &str) -> Tinc {
    let k = |s: &str| format!("{p}{s}");
    let default_tinc_name: String = id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let tinc = Tinc {
        enable: r.bool(&k("tinc/enable"), false),
        name: r
            .parsed(&k("tinc/name"), |v| {
                if v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    Ok(v.to_string())
                } else {
                    Err("tinc names may only contain A-Z a-z 0-9 _".into())
                }
            })
            .unwrap_or(default_tinc_name),
        dev_name: r
            .iface(&k("tinc/dev_name"))
            .unwrap_or_else(|| "tnc0".into()),
        port: r.port(&k("tinc/port")).unwrap_or(655),
        address: r.parsed(&k("tinc/address"), |v| {
            parse::validate_host(v).map(|()| v.to_string())
        }),
        ipv4: r.parsed(&k("tinc/ipv4"), parse::parse_if_addr),
        subnets: r.cidrs(&k("tinc/subnet")),
        public_key: r.parsed(&k("tinc/public_key"), |v| {
            parse::parse_inline_pem(v, "PUBLIC KEY")
        }),
        private_key: r.parsed(&k("tinc/private_key"), |v| {
            parse::parse_inline_pem(v, "PRIVATE KEY")
        }),
    };
    if tinc.enable {
        let required = "required when tinc/enable is true (RSA, PEM)";
        if tinc.private_key.is_none() {
            r.require(&k("tinc/private_key"), required);
        }
        // Every node's hosts/<name> file carries it; peers cannot authenticate without.
        r.require(&k("tinc/public_key"), required);
    }
    tinc
}

fn parse_et_url(v: &str) -> Result<String, String> {
    if v.parse::<u16>().is_ok() {
        return parse::parse_port(v).map(|p| p.to_string());
    }
    let (scheme, rest) = v
        .split_once("://")
        .ok_or("expected proto://host:port or a port")?;
    // What easytier-core 2.0.3 built with its default features listens on and dials
    // (`instance/listeners.rs`, `connector/mod.rs`): QUIC is a non-default feature
    // there and faketcp came later.
    const PROTOS: [&str; 6] = ["tcp", "udp", "ring", "wg", "ws", "wss"];
    if !PROTOS.contains(&scheme) {
        return Err(format!(
            "unknown EasyTier {EASYTIER_VERSION} protocol `{scheme}` (one of: {})",
            PROTOS.join(", ")
        ));
    }
    let hostport = rest.split('/').next().unwrap_or_default();
    parse::parse_host_port(hostport)?;
    if v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("URL contains whitespace".into());
    }
    Ok(v.to_string())
}

/// The mesh checks across nodes: what a node enables needs global keys, and tinc
/// names are unique.
pub(super) fn cross_check(r: &mut Reader<'_>, global: &Global, nodes: &BTreeMap<String, Node>) {
    if global.mesh_type == Some(MeshType::Easytier)
        && nodes.values().any(|n| n.easytier.enable)
        && global.easytier.network_name.is_none()
    {
        r.error(
            "/global/easytier/network_name",
            "",
            "required when EasyTier is enabled on a node",
        );
    }
    if global.mesh_type.is_none() {
        for n in nodes.values() {
            for (on, what) in [(n.easytier.enable, "easytier"), (n.tinc.enable, "tinc")] {
                if on {
                    r.error(
                        "/global/mesh_type",
                        "",
                        format!("required: node {} enables {what}", n.id),
                    );
                }
            }
        }
    }
    // Two nodes with the same tinc name would overwrite each other's hosts file.
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for n in nodes.values().filter(|n| n.tinc.enable) {
        if let Some(other) = seen.insert(n.tinc.name.as_str(), n.id.as_str()) {
            r.error(
                &format!("/nodes/{}/tinc/name", n.id),
                &n.tinc.name,
                format!("tinc name already used by node {other}"),
            );
        }
    }
}
