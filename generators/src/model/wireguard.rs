//! WireGuard instances: `/nodes/<id>/wireguard/<name>/*` and their peers.
//!
//! Owns: the instance's types, defaults and validation. Must not: write the
//! configuration file or the device plan (`gen::wireguard`).

use super::instance_dev;
use super::routing::{parse_bgp_peer, BgpPeer};
use crate::parse::{self, Reader};
use ipnet::IpNet;
use serde::Serialize;
use std::net::SocketAddr;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WireguardPeer {
    pub name: String,
    pub public_key: String,
    pub allowed_ips: Vec<IpNet>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
    #[serde(skip)]
    pub preshared_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Wireguard {
    pub name: String,
    pub enable: bool,
    pub dev: String,
    #[serde(skip)]
    pub private_key: String,
    pub listen_port: Option<u16>,
    pub addresses: Vec<IpNet>,
    pub peers: Vec<WireguardPeer>,
    pub bgp: Option<BgpPeer>,
}

/// Every `<prefix><name>/` instance (`prefix` is `/nodes/<id>/wireguard/`).
pub(super) fn parse_wireguard(r: &mut Reader<'_>, prefix: &str) -> Vec<Wireguard> {
    let mut wireguard = Vec::new();
    for (name, b) in r.named_children(prefix, "enable", "instance") {
        let Some(dev) = instance_dev(r, &b, "wg-", &name) else {
            continue;
        };
        let enable = r.bool(&format!("{b}enable"), false);
        let private_key = r.parsed(&format!("{b}private_key"), parse::parse_wg_key);
        if enable && private_key.is_none() {
            r.require(&format!("{b}private_key"), "required when enable is true");
        }
        let mut peers = Vec::new();
        for peer in r.snap.children(&format!("{b}peer/")) {
            let pb = format!("{b}peer/{peer}/");
            let public_key = r.parsed(&format!("{pb}public_key"), parse::parse_wg_key);
            r.require(&format!("{pb}public_key"), "every peer needs a public_key");
            let endpoint = r.parsed(&format!("{pb}endpoint"), |v| {
                v.parse::<SocketAddr>()
                    .map_err(|_| "endpoint must be ip:port ([v6]:port)".to_string())
            });
            let peer_cfg = WireguardPeer {
                name: peer.clone(),
                public_key: public_key.unwrap_or_default(),
                allowed_ips: r.cidrs(&format!("{pb}allowed_ips")),
                endpoint,
                persistent_keepalive: r
                    .u32_in(&format!("{pb}persistent_keepalive"), 0, 65_535)
                    .map(|n| n as u16),
                preshared_key: r.parsed(&format!("{pb}preshared_key"), parse::parse_wg_key),
            };
            peers.push(peer_cfg);
        }
        wireguard.push(Wireguard {
            name: name.clone(),
            enable,
            dev,
            private_key: private_key.unwrap_or_default(),
            listen_port: r.port(&format!("{b}listen_port")),
            addresses: r.list(&format!("{b}address"), parse::parse_if_addr),
            peers,
            bgp: parse_bgp_peer(r, &b),
        });
    }
    wireguard
}
