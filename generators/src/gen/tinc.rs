//! Tinc 1.0: `/etc/tinc/<net>/{tinc.conf, hosts/*, rsa_key.priv, tinc-up}` and the
//! `tincd -n <net> -D` service.
//!
//! Every tinc-enabled node gets a `hosts/<name>` file (Address, Port, Subnet and its RSA
//! public key) so this node can authenticate any of them; `ConnectTo` names every
//! *other* enabled node that has a public `address`. `Mode = router`: packets are
//! routed by the `Subnet`s of the hosts files, which hold each node's subnets plus the
//! host route of its overlay address.
//!
//! Ed25519 keys (`tinc/ed25519_*`) are ignored: tinc 1.0 has no Ed25519 (the
//! `Ed25519PublicKey`/`Ed25519PrivateKeyFile` variables exist only on branch 1.1).
//!
//! `tinc-up` is a script run by tincd. It contains only values the model validated
//! (the overlay address parsed as an IP network); the device name comes from tincd's
//! `$INTERFACE` and is always quoted.

use super::{apply_service_overrides, header_hash, service, MODE_EXEC, MODE_PUBLIC, MODE_SECRET};
use crate::error::ValidationError;
use crate::model::active_mesh;
use crate::model::{Config, MeshType, Node};
use crate::output::{DomainOutput, FileOut, RenderEnv};
use crate::plan::service::ReloadStrategy;
use ipnet::IpNet;
use std::fmt::Write as _;

pub const SERVICE: &str = "tinc";

/// `/etc/tinc/<netname>`.
pub fn conf_dir(cfg: &Config) -> String {
    format!("/etc/tinc/{}", cfg.global.tinc.netname)
}

/// Nodes running tinc (the global mesh type is tinc and the node enables it), in id order.
pub fn tinc_nodes(cfg: &Config) -> impl Iterator<Item = &Node> {
    cfg.nodes
        .values()
        .filter(|n| active_mesh(cfg, n) == Some(MeshType::Tinc))
}

/// `tinc.conf` of `node`.
pub fn tinc_conf(cfg: &Config, node: &Node) -> String {
    let t = &node.tinc;
    let mut s = header_hash(&node.id, "tinc");
    let _ = writeln!(s, "Name = {}", t.name);
    let _ = writeln!(s, "Interface = {}", t.dev_name);
    s.push_str("Mode = router\n");
    let _ = writeln!(s, "Port = {}", t.port);
    for other in tinc_nodes(cfg) {
        if other.id != node.id && other.tinc.address.is_some() {
            let _ = writeln!(s, "ConnectTo = {}", other.tinc.name);
        }
    }
    s
}

/// `hosts/<name>` of `host` as every node sees it.
pub fn host_file(cfg: &Config, host: &Node) -> String {
    let t = &host.tinc;
    let mut s = header_hash(&host.id, "tinc host");
    if let Some(addr) = &t.address {
        let _ = writeln!(s, "Address = {addr} {}", t.port);
    }
    let _ = writeln!(s, "Port = {}", t.port);
    if let Some(c) = &cfg.global.tinc.cipher {
        let _ = writeln!(s, "Cipher = {c}");
    }
    if let Some(d) = &cfg.global.tinc.digest {
        let _ = writeln!(s, "Digest = {d}");
    }
    for subnet in host_subnets(host) {
        let _ = writeln!(s, "Subnet = {subnet}");
    }
    if let Some(key) = &t.public_key {
        s.push('\n');
        s.push_str(key);
    }
    s
}

/// A host's `Subnet`s: its `tinc/subnet` networks plus the host route of its address.
pub fn host_subnets(host: &Node) -> Vec<IpNet> {
    let mut out = host.tinc.subnets.clone();
    if let Some(ip) = host.tinc.ipv4 {
        let host_route = IpNet::from(ip.addr());
        if !out.contains(&host_route) {
            out.push(host_route);
        }
    }
    out
}

/// The `tinc-up` script: bring the device up and add the overlay address.
pub fn tinc_up(node: &Node) -> String {
    let mut s = String::from("#!/bin/sh\n");
    s.push_str(&header_hash(&node.id, "tinc-up"));
    s.push_str("ip link set dev \"$INTERFACE\" up\n");
    if let Some(ip) = node.tinc.ipv4 {
        // `ip` is an IpNet parsed by the model: digits, dots, colons and one slash.
        let _ = writeln!(s, "ip addr add {ip} dev \"$INTERFACE\"");
    }
    s
}

/// Files and the `tinc` service.
pub fn render(cfg: &Config, node: &Node, env: &RenderEnv) -> Result<DomainOutput, ValidationError> {
    let dir = conf_dir(cfg);
    let mut files = vec![
        FileOut::new(
            format!("{dir}/tinc.conf"),
            tinc_conf(cfg, node),
            MODE_PUBLIC,
        ),
        FileOut::new(format!("{dir}/tinc-up"), tinc_up(node), MODE_EXEC),
    ];
    if let Some(key) = &node.tinc.private_key {
        files.push(FileOut::new(
            format!("{dir}/rsa_key.priv"),
            key.clone(),
            MODE_SECRET,
        ));
    }
    for host in tinc_nodes(cfg) {
        files.push(FileOut::new(
            format!("{dir}/hosts/{}", host.tinc.name),
            host_file(cfg, host),
            MODE_PUBLIC,
        ));
    }
    let svc = service(
        SERVICE,
        vec![
            env.bins.tincd.clone(),
            "-n".into(),
            cfg.global.tinc.netname.clone(),
            "-c".into(),
            format!("/etc/tinc/{}", cfg.global.tinc.netname),
            "--pidfile".into(),
            format!("/var/run/tinc.{}.pid", cfg.global.tinc.netname),
            "-D".into(),
        ],
        &["CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"],
        files.iter().map(|f| f.path.clone()).collect(),
        ReloadStrategy::Restart,
    );
    Ok(DomainOutput {
        files,
        services: vec![apply_service_overrides(node, svc)?],
    })
}
