//! The TPROXY plan: which traffic the gateway intercepts for mihomo, and what bypasses it.
//!
//! Include-mode by source (DESIGN §7): only packets whose source is inside
//! `proxy_src` are marked and sent to mihomo's TPROXY listener. Everything listed in
//! the `exclude_*` fields returns early, before the TPROXY rule.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// mihomo's fixed TPROXY port (DESIGN §7).
pub const TPROXY_PORT: u16 = 7893;
/// fwmark set on intercepted packets.
pub const TPROXY_MARK: u32 = 0x1;
/// Routing table that holds `local default dev lo`.
pub const TPROXY_TABLE: u32 = 100;
/// Priority of our `fwmark 0x1 lookup 100` rule (below `main`'s 32766).
pub const TPROXY_RULE_PRIORITY: u32 = 9000;

/// What the data plane must install while TPROXY is on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TproxyPlan {
    /// Sources whose traffic is proxied: the node's `lan` plus `private_lan`.
    pub proxy_src: Vec<IpNet>,
    /// Destinations never proxied because they are the node's own LANs
    /// (traffic between LAN hosts stays local).
    pub bypass_dst: Vec<IpNet>,
    /// Sources never proxied (`DEFAULT_GW`).
    pub exclude_src: Vec<IpAddr>,
    /// Input interfaces whose traffic is never proxied (mesh and VPN devices).
    pub exclude_ifaces: Vec<String>,
    /// Destination/source ports never proxied: `clash/exclude_tproxy_port`, mesh and
    /// VPN listener ports.
    pub exclude_ports: Vec<u16>,
    /// TPROXY listener port (always [`TPROXY_PORT`]).
    pub port: u16,
    /// Mark set on proxied packets (always [`TPROXY_MARK`]).
    pub mark: u32,
    /// Policy-routing table (always [`TPROXY_TABLE`]).
    pub table: u32,
    /// DNS hijack (`/nodes/<id>/dns/hijack`): DNS (port 53, UDP and TCP) from
    /// `proxy_src` to any address is redirected to this local port, the DNS
    /// frontend's. `None`: no hijack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_hijack_port: Option<u16>,
    /// `/nodes/<id>/dns/block_quic`: UDP 443 from `proxy_src` is rejected.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub block_quic: bool,
    /// `/nodes/<id>/dns/block_dot`: DNS over TLS and QUIC (TCP and UDP 853) from
    /// `proxy_src` is rejected.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub block_dot: bool,
    /// `/nodes/<id>/dns/block_doh`: HTTPS (TCP and UDP 443) from `proxy_src` to these
    /// resolver addresses is rejected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub block_doh: Vec<IpAddr>,
    /// mihomo's fake-IP ranges (its config's `dns.enhanced-mode: fake-ip`): while
    /// mihomo is out of the path, a LAN connection to one of them is rejected at once
    /// instead of leaving for the WAN (see [`Self::while_down`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fake_ip: Vec<IpNet>,
    /// This is the state *while TPROXY is removed* (mihomo crashed, unhealthy or not
    /// yet started): nothing is intercepted, no policy routing, no hijack, no bypass
    /// blocking; only the `fake_ip` rejects, behind the same exclusions.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub proxy_down: bool,
}

impl TproxyPlan {
    /// A plan with the fixed port/mark/table and no addresses.
    pub fn empty() -> Self {
        Self {
            port: TPROXY_PORT,
            mark: TPROXY_MARK,
            table: TPROXY_TABLE,
            ..Self::default()
        }
    }

    /// What stays installed while TPROXY is removed: in fake-ip mode the rejects of
    /// the fake ranges, so a client still holding a fake address (mihomo answers them
    /// with TTL 1, clients keep them longer) fails at once and resolves again; `None`
    /// (no table at all) in any other mode.
    pub fn while_down(&self) -> Option<TproxyPlan> {
        (!self.fake_ip.is_empty()).then(|| TproxyPlan {
            proxy_src: self.proxy_src.clone(),
            bypass_dst: self.bypass_dst.clone(),
            exclude_src: self.exclude_src.clone(),
            exclude_ifaces: self.exclude_ifaces.clone(),
            exclude_ports: self.exclude_ports.clone(),
            fake_ip: self.fake_ip.clone(),
            proxy_down: true,
            ..TproxyPlan::empty()
        })
    }
}
