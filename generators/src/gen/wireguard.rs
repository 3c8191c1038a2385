//! WireGuard: a [`WgDevice`] plan per enabled instance (applied over netlink or a
//! userspace UAPI socket by the daemon) plus `/etc/wireguard/<dev>.conf` in the
//! `wg setconf` format, for operators and for `wg setconf` by hand.
//!
//! `wg setconf` rejects wg-quick's `Address =` lines, so the interface addresses are
//! written as a comment; the daemon assigns them. Routes over the tunnel come from FRR
//! (BGP), not from `AllowedIPs`. No service: WireGuard has no process to supervise.

use super::{header_hash, MODE_SECRET};
use crate::model::{Node, Wireguard};
use crate::output::{DomainOutput, FileOut};
use crate::plan::wireguard::{WgDevice, WgPeer};
use std::fmt::Write as _;

pub fn config_path(inst: &Wireguard) -> String {
    format!("/etc/wireguard/{}.conf", inst.dev)
}

/// The device plan of one instance.
pub fn device(inst: &Wireguard) -> WgDevice {
    WgDevice {
        name: inst.name.clone(),
        dev: inst.dev.clone(),
        private_key: inst.private_key.clone(),
        listen_port: inst.listen_port,
        addresses: inst.addresses.clone(),
        peers: inst
            .peers
            .iter()
            .map(|p| WgPeer {
                name: p.name.clone(),
                public_key: p.public_key.clone(),
                preshared_key: p.preshared_key.clone(),
                allowed_ips: p.allowed_ips.clone(),
                endpoint: p.endpoint,
                persistent_keepalive: p.persistent_keepalive,
            })
            .collect(),
    }
}

/// `wg setconf` text (holds the private key: mode 0600).
pub fn config_text(node: &Node, inst: &Wireguard) -> String {
    let mut s = header_hash(&node.id, &format!("wireguard/{}", inst.name));
    for a in &inst.addresses {
        let _ = writeln!(
            s,
            "# Address = {a} (assigned by meduza; wg setconf has no Address)"
        );
    }
    s.push_str("[Interface]\n");
    let _ = writeln!(s, "PrivateKey = {}", inst.private_key);
    if let Some(p) = inst.listen_port {
        let _ = writeln!(s, "ListenPort = {p}");
    }
    for p in &inst.peers {
        let _ = write!(s, "\n# peer {}\n[Peer]\n", p.name);
        let _ = writeln!(s, "PublicKey = {}", p.public_key);
        if let Some(k) = &p.preshared_key {
            let _ = writeln!(s, "PresharedKey = {k}");
        }
        if !p.allowed_ips.is_empty() {
            let ips: Vec<String> = p.allowed_ips.iter().map(ToString::to_string).collect();
            let _ = writeln!(s, "AllowedIPs = {}", ips.join(", "));
        }
        if let Some(e) = p.endpoint {
            let _ = writeln!(s, "Endpoint = {e}");
        }
        if let Some(k) = p.persistent_keepalive {
            let _ = writeln!(s, "PersistentKeepalive = {k}");
        }
    }
    s
}

/// The file of one enabled instance (no services).
pub fn render(node: &Node, inst: &Wireguard) -> DomainOutput {
    DomainOutput {
        files: vec![FileOut::new(
            config_path(inst),
            config_text(node, inst),
            MODE_SECRET,
        )],
        services: Vec::new(),
    }
}
