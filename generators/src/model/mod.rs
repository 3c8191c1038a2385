//! The typed model of the whole etcd schema (DESIGN §3, the predecessor's schema).
//!
//! `Config::parse` turns a [`Snapshot`] into global settings plus one [`Node`] per
//! `/nodes/<id>/`, validating every value. All errors of a snapshot are collected and
//! returned together; a snapshot with any error is never rendered.
//! Defaults live here, next to the key they belong to, and are listed in
//! `docs/etcd-schema.md`.
//!
//! One module per domain owns that domain's types, defaults and parser: [`mesh`]
//! (EasyTier, tinc), [`openvpn`], [`wireguard`], [`routing`] (BGP, OSPF and what FRR
//! runs on a node), [`clash`], [`dns`] (MosDNS, upstreams, hosts), [`tunnels`],
//! [`services`] (health and restart overrides), [`api`], [`global`] and [`node`],
//! which calls the others. This module owns [`Config::parse`] and the checks across
//! nodes; every type is re-exported here (`model::Node`, `model::OpenVpn`, ...).
//! Must not: render a file or plan (`crate::gen`, `crate::render`), or do I/O.

pub mod api;
pub mod clash;
pub mod dns;
pub mod global;
pub mod mesh;
pub mod node;
pub mod openvpn;
pub mod routing;
pub mod services;
pub mod tunnels;
pub mod wireguard;

#[cfg(test)]
mod tests;

pub use api::ApiTls;
pub use clash::{Clash, ClashGlobal, ClashHealthCheck, ClashMode, MIHOMO_FAKE_IP_RANGE};
pub use dns::{default_upstreams, parse_hostname, DnsGuard, Mosdns, MosdnsGlobal};
pub use global::{
    Global, CONFIRM_TIMEOUT_DEFAULT_SECS, CONFIRM_TIMEOUT_MAX_SECS, CONFIRM_TIMEOUT_MIN_SECS,
};
pub use mesh::{
    active_mesh, mesh_addr, mesh_dev, Easytier, EasytierGlobal, MeshType, Tinc, TincGlobal,
    EASYTIER_VERSION,
};
pub use node::Node;
pub use openvpn::{OpenVpn, OvpnProto};
pub use routing::{
    frr_routing, Bgp, BgpPeer, BgpRouting, EbgpNeighbor, FrrRouting, IbgpNeighbor, InternalRouting,
    Ospf, PrefixRule,
};
pub use services::{ProbeKind, ServiceOverrides};
pub use tunnels::{
    IcmptunnelSettings, PaqetSettings, Tunnel, TunnelKind, TunnelRole, TunnelSettings,
    WaterwallSettings,
};
pub use wireguard::{Wireguard, WireguardPeer};

use crate::error::ValidationErrors;
use crate::parse::{self, Reader};
use crate::plan::dns::UpstreamGroup;
use crate::snapshot::Snapshot;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// The whole validated snapshot.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub global: Global,
    pub nodes: BTreeMap<String, Node>,
    /// `/dns/hosts/<name>` → addresses.
    pub dns_hosts: BTreeMap<String, Vec<IpAddr>>,
    /// Value of `/commit` (opaque).
    pub commit: Option<String>,
}

impl Config {
    /// Parse and validate every key; all errors are returned together.
    pub fn parse(snap: &Snapshot) -> Result<Self, ValidationErrors> {
        Self::parse_checked(snap).0
    }

    /// [`Config::parse`] plus the warnings: the keys under `/global/` and
    /// `/nodes/<id>/` the model never read ([`Reader::unknown_keys`]), whether or not
    /// the snapshot has errors. Warnings never block an apply.
    pub fn parse_checked(snap: &Snapshot) -> (Result<Self, ValidationErrors>, Vec<parse::Warning>) {
        let mut r = Reader::new(snap);
        let global = global::parse_global(&mut r);
        let mut nodes = BTreeMap::new();
        for id in snap.children("/nodes/") {
            if let Err(reason) = parse::validate_name(&id) {
                r.error(&format!("/nodes/{id}/"), &id, format!("node id: {reason}"));
                continue;
            }
            let node = node::parse_node(&mut r, &id, &global);
            nodes.insert(id, node);
        }
        let dns_hosts = dns::parse_hosts(&mut r);
        cross_checks(&mut r, &global, &nodes);
        let commit = r.str("/commit").map(str::to_string);
        let warnings = r.unknown_keys();
        let mut errors = r.errors;
        let result = if errors.is_empty() {
            Ok(Self {
                global,
                nodes,
                dns_hosts,
                commit,
            })
        } else {
            errors.sort_by(|a, b| a.key.cmp(&b.key).then(a.value.cmp(&b.value)));
            errors.dedup();
            Err(ValidationErrors(errors))
        };
        (result, warnings)
    }

    pub fn node(&self, id: &str) -> Option<&Node> {
        self.nodes.get(id)
    }

    /// Upstream groups effective on `node`: global ones overridden by the node's of the
    /// same name; the predecessor's defaults when none is configured at all.
    pub fn dns_upstreams_for(&self, node: &Node) -> Vec<UpstreamGroup> {
        let mut merged = self.global.dns_upstreams.clone();
        for (name, g) in &node.dns_upstreams {
            merged.insert(name.clone(), g.clone());
        }
        let mut groups: Vec<UpstreamGroup> = merged.into_values().collect();
        if groups.is_empty() {
            groups = default_upstreams();
        }
        groups.sort_by(|a, b| a.priority.cmp(&b.priority).then(a.name.cmp(&b.name)));
        groups
    }
}

/// The interface of a VPN instance `<base>` named `name`: `<base>dev`, default
/// `<default_prefix><name>`; `None`, reported on `dev`, when that default is too long
/// for an interface name.
fn instance_dev(
    r: &mut Reader<'_>,
    base: &str,
    default_prefix: &str,
    name: &str,
) -> Option<String> {
    let key = format!("{base}dev");
    let dev = r
        .iface(&key)
        .or_else(|| parse::parse_iface(&format!("{default_prefix}{name}")).ok());
    if dev.is_none() {
        r.error(
            &key,
            "",
            format!("default {default_prefix}<name> is too long; set dev"),
        );
    }
    dev
}

/// Checks that need more than one key.
fn cross_checks(r: &mut Reader<'_>, global: &Global, nodes: &BTreeMap<String, Node>) {
    mesh::cross_check(r, global, nodes);
    for n in nodes.values() {
        let mut devs: BTreeMap<&str, String> = BTreeMap::new();
        let used = n
            .openvpn
            .iter()
            .map(|o| {
                (
                    o.dev.as_str(),
                    format!("/nodes/{}/openvpn/{}/dev", n.id, o.name),
                )
            })
            .chain(n.wireguard.iter().map(|w| {
                (
                    w.dev.as_str(),
                    format!("/nodes/{}/wireguard/{}/dev", n.id, w.name),
                )
            }));
        for (dev, key) in used {
            if let Some(prev) = devs.insert(dev, key.clone()) {
                r.error(&key, dev, format!("interface already used by {prev}"));
            }
        }
        let has_ebgp = n.openvpn.iter().any(|o| o.enable && o.bgp.is_some())
            || n.wireguard.iter().any(|w| w.enable && w.bgp.is_some());
        if has_ebgp && n.bgp.asn.is_none() {
            r.error(
                &format!("/nodes/{}/bgp/asn", n.id),
                "",
                "eBGP over a VPN needs this node's bgp/asn",
            );
        }
    }
}
