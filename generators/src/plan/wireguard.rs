//! WireGuard instances as data, for the netlink / UAPI configurator.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// A 32-byte WireGuard key, kept as the base64 text etcd holds (validated on parse).
pub type WgKey = String;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WgDevice {
    /// Instance name (`/nodes/<id>/wireguard/<name>`).
    pub name: String,
    /// Interface name (default `wg-<name>`).
    pub dev: String,
    pub private_key: WgKey,
    pub listen_port: Option<u16>,
    /// Addresses assigned to the interface.
    pub addresses: Vec<IpNet>,
    pub peers: Vec<WgPeer>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WgPeer {
    /// Peer name (`.../peer/<PEER>`).
    pub name: String,
    pub public_key: WgKey,
    pub preshared_key: Option<WgKey>,
    pub allowed_ips: Vec<IpNet>,
    /// `host:port`; hosts are IP literals after validation.
    pub endpoint: Option<std::net::SocketAddr>,
    pub persistent_keepalive: Option<u16>,
}
