//! Tunnels: `/nodes/<id>/tunnels/<name>/*`, a generic program or one of the presets
//! (paqet, ICMPTunnel, WaterWall) whose configuration file meduza generates.
//!
//! Owns: the tunnel keys' types, defaults and validation (a preset's required keys).
//! Must not: write a preset's file or the service (`gen::tunnels`).

use super::services::{parse_overrides, ServiceOverrides};
// The kind and role are the service plan's own types: one owner for their names.
use crate::parse::{self, Reader};
pub use crate::plan::service::{TunnelKind, TunnelRole};
use serde::Serialize;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tunnel {
    pub name: String,
    pub enable: bool,
    pub kind: TunnelKind,
    pub role: TunnelRole,
    /// Program to run (required for `generic`; presets have a default path).
    pub command: Option<String>,
    /// Arguments, one per line.
    pub args: Vec<String>,
    /// Local SOCKS5 port of a client tunnel (paqet/icmptunnel), default 1080.
    pub socks_port: u16,
    /// TCP listener of a waterwall tunnel (`ip:port`).
    pub listen: Option<String>,
    /// `test_url`: what a paqet/icmptunnel client's health probe fetches through the
    /// tunnel (default [`crate::plan::service::TUNNEL_TEST_URL`]).
    pub test_url: Option<String>,
    /// What the preset's configuration file is generated from; `None` on a generic
    /// tunnel, and on a disabled one that lacks a required key.
    pub settings: Option<TunnelSettings>,
    pub overrides: ServiceOverrides,
}

/// The keys a preset's configuration file is generated from (docs/tunnels.md), typed
/// and complete: a missing required key is a validation error, never a default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelSettings {
    Paqet(PaqetSettings),
    Icmptunnel(IcmptunnelSettings),
    Waterwall(WaterwallSettings),
}

/// paqet (github.com/hanselime/paqet): KCP over raw TCP packets sent through pcap on
/// `interface`, so it needs the local address and the next hop's MAC itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PaqetSettings {
    pub interface: String,
    /// `local_ip`: source address of the crafted packets.
    pub local_ip: Ipv4Addr,
    /// `router_mac`: the gateway's (or the on-link server's) MAC, `aa:bb:cc:dd:ee:ff`.
    pub router_mac: String,
    /// Client: `server`, the server's `ip:port`.
    pub server: Option<std::net::SocketAddrV4>,
    /// Server: `port`, where it receives.
    pub port: Option<u16>,
    /// `key`: the KCP encryption key (shared by both ends).
    #[serde(skip)]
    pub key: String,
    /// `mtu`: KCP MTU, 50–1500 (paqet's default 1350).
    pub mtu: u16,
}

/// ICMPTunnel (github.com/Qteam-official/ICMPTunnel, the predecessor's build).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IcmptunnelSettings {
    /// Client: `server`, the server's IPv4 address (ICMP has no port).
    pub server: Option<Ipv4Addr>,
    /// `key`: the shared authentication key, a whole number.
    #[serde(skip)]
    pub key: u64,
    /// `encrypt_key`: enables `encrypt_data` with this key when set.
    #[serde(skip)]
    pub encrypt_key: Option<String>,
    /// `api_port`: the statistics API (default 8080).
    pub api_port: u16,
    /// `dns`: upstream resolver of the tunnel (default 8.8.8.8).
    pub dns: IpAddr,
    /// `timeout`: connection timeout in seconds (default 20).
    pub timeout_secs: u32,
}

/// WaterWall (github.com/radkesvat/WaterWall): a `TcpListener` → [`Encryption*`] →
/// `TcpConnector` chain (the predecessor's "direct" profile).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WaterwallSettings {
    /// `listen`: the `TcpListener`'s bind address.
    pub listen: SocketAddr,
    /// Where the `TcpConnector` dials: `server` on a client, `backend` on a server.
    pub connect: (String, u16),
    /// `password`: adds `EncryptionClient`/`EncryptionServer` with this password.
    #[serde(skip)]
    pub password: Option<String>,
}

/// Every `/nodes/<id>/tunnels/<name>/` (`p` is `/nodes/<id>/`).
pub(super) fn parse_tunnels(r: &mut Reader<'_>, p: &str) -> Vec<Tunnel> {
    let mut tunnels = Vec::new();
    for (name, b) in r.named_children(&format!("{p}tunnels/"), "kind", "tunnel") {
        let kind = r.choice(
            &format!("{b}kind"),
            &[
                ("paqet", TunnelKind::Paqet),
                ("icmptunnel", TunnelKind::Icmptunnel),
                ("waterwall", TunnelKind::Waterwall),
                ("generic", TunnelKind::Generic),
            ],
            None,
        );
        r.require(
            &format!("{b}kind"),
            "required: paqet, icmptunnel, waterwall or generic",
        );
        let role = r
            .choice(
                &format!("{b}role"),
                &[
                    ("client", TunnelRole::Client),
                    ("server", TunnelRole::Server),
                ],
                Some(TunnelRole::Client),
            )
            .unwrap_or(TunnelRole::Client);
        let command = r.parsed(&format!("{b}command"), |v| {
            if v.starts_with('/') && !v.chars().any(|c| c.is_whitespace() || c.is_control()) {
                Ok(v.to_string())
            } else {
                Err("command must be an absolute path without spaces (arguments go in args)".into())
            }
        });
        if kind == Some(TunnelKind::Generic) && command.is_none() {
            r.require(&format!("{b}command"), "a generic tunnel needs a command");
        }
        let args = r.list(&format!("{b}args"), |l| Ok(l.to_string()));
        let enable = r.bool(&format!("{b}enable"), false);
        let socks_port = r.port(&format!("{b}socks_port")).unwrap_or(1080);
        let listen = r.parsed(&format!("{b}listen"), |v| {
            parse::parse_host_port(v).map(|_| v.to_string())
        });
        let test_url = r.parsed(&format!("{b}test_url"), parse::parse_http_url);
        let Some(kind) = kind else { continue };
        let preset = TunnelPreset {
            base: &b,
            kind,
            role,
            enable,
            socks_port,
            listen: listen.as_deref(),
        };
        let settings = parse_tunnel_settings(r, &preset);
        tunnels.push(Tunnel {
            name: name.clone(),
            enable,
            kind,
            role,
            command,
            args,
            socks_port,
            listen,
            test_url,
            settings,
            overrides: parse_overrides(r, &b),
        });
    }
    tunnels
}

/// What [`parse_tunnel_settings`] needs besides the reader.
struct TunnelPreset<'a> {
    /// `/nodes/<id>/tunnels/<name>/`.
    base: &'a str,
    kind: TunnelKind,
    role: TunnelRole,
    enable: bool,
    socks_port: u16,
    /// The `listen` value when it parsed as `host:port`.
    listen: Option<&'a str>,
}

/// The preset keys of one tunnel (docs/tunnels.md). Every present key is checked; a
/// missing required one is an error only while the tunnel is enabled (a disabled
/// tunnel may be half configured). `None` for `generic` and for an incomplete tunnel.
fn parse_tunnel_settings(r: &mut Reader<'_>, t: &TunnelPreset<'_>) -> Option<TunnelSettings> {
    let key = |leaf: &str| format!("{}{leaf}", t.base);
    let client = t.role == TunnelRole::Client;
    // A required value: reported when absent (a present but invalid value has been
    // reported by its parser already).
    let need = |r: &mut Reader<'_>, leaf: &str, present: bool, why: &str| {
        if !present && t.enable {
            r.require(&key(leaf), why);
        }
    };
    match t.kind {
        TunnelKind::Generic => None,
        TunnelKind::Paqet => {
            let interface = r.iface(&key("interface"));
            let local_ip = r.ipv4(&key("local_ip"));
            let router_mac = r.parsed(&key("router_mac"), parse_mac);
            let server = r.parsed(&key("server"), |v| {
                v.parse::<std::net::SocketAddrV4>().map_err(|_| {
                    "expected IPv4:port (the generated paqet config has an IPv4 network block only)"
                        .to_string()
                })
            });
            let port = r.port(&key("port"));
            let secret = r.parsed(&key("key"), parse_tunnel_secret);
            let mtu = r.u32_in(&key("mtu"), 50, 1500).unwrap_or(1350);
            need(
                r,
                "interface",
                interface.is_some(),
                "required: the interface paqet captures and sends on",
            );
            need(
                r,
                "local_ip",
                local_ip.is_some(),
                "required: this node's IPv4 address on interface",
            );
            need(
                r,
                "router_mac",
                router_mac.is_some(),
                "required: MAC address of the next hop (the gateway, or the server when on-link)",
            );
            need(
                r,
                "key",
                secret.is_some(),
                "required: the KCP key shared with the other end",
            );
            if client {
                need(
                    r,
                    "server",
                    server.is_some(),
                    "required on a client: the paqet server's IPv4:port",
                );
            } else {
                need(
                    r,
                    "port",
                    port.is_some(),
                    "required on a server: the port paqet receives on",
                );
            }
            let (server, port) = if client {
                (Some(server?), None)
            } else {
                (None, Some(port?))
            };
            Some(TunnelSettings::Paqet(PaqetSettings {
                interface: interface?,
                local_ip: local_ip?,
                router_mac: router_mac?,
                server,
                port,
                key: secret?,
                mtu: u16::try_from(mtu).ok()?,
            }))
        }
        TunnelKind::Icmptunnel => {
            let server = r.ipv4(&key("server"));
            // ICMPTunnel's `key` is a JSON number read into a Go `int`: keep it within
            // 32 bits so it fits on 32-bit targets too.
            let secret = r.parsed(&key("key"), |v| match v.parse::<u64>() {
                Ok(n) if (1..=i32::MAX as u64).contains(&n) => Ok(n),
                _ => Err(format!(
                    "must be a whole number 1-{} (ICMPTunnel's key is a JSON number)",
                    i32::MAX
                )),
            });
            let encrypt_key = r.parsed(&key("encrypt_key"), parse_tunnel_secret);
            let api_port = r.port(&key("api_port")).unwrap_or(8080);
            let dns = r
                .ip(&key("dns"))
                .unwrap_or(IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)));
            let timeout_secs = r.u32_in(&key("timeout"), 1, 3600).unwrap_or(20);
            need(
                r,
                "key",
                secret.is_some(),
                "required: the authentication key shared with the other end",
            );
            if client {
                need(
                    r,
                    "server",
                    server.is_some(),
                    "required on a client: the ICMPTunnel server's IPv4 address",
                );
                if api_port == t.socks_port {
                    r.error(&key("api_port"), &api_port.to_string(), "the statistics API and the SOCKS5 listener (socks_port) need different ports");
                }
            }
            Some(TunnelSettings::Icmptunnel(IcmptunnelSettings {
                server: if client { Some(server?) } else { None },
                key: secret?,
                encrypt_key,
                api_port,
                dns,
                timeout_secs,
            }))
        }
        TunnelKind::Waterwall => {
            // WaterWall's TcpListener binds an address, it does not resolve a name.
            let listen = t.listen.and_then(|v| match v.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    r.error(
                        &key("listen"),
                        v,
                        "WaterWall's TcpListener binds an IP address: expected ip:port",
                    );
                    None
                }
            });
            let host_port = |v: &str| parse::parse_host_port(v);
            let server = r.parsed(&key("server"), host_port);
            let backend = r.parsed(&key("backend"), host_port);
            let password = r.parsed(&key("password"), parse_tunnel_secret);
            need(
                r,
                "listen",
                listen.is_some(),
                "required: the ip:port WaterWall's TcpListener binds",
            );
            let connect = if client {
                need(
                    r,
                    "server",
                    server.is_some(),
                    "required on a client: the WaterWall server's host:port",
                );
                server
            } else {
                need(
                    r,
                    "backend",
                    backend.is_some(),
                    "required on a server: the host:port the server forwards to",
                );
                backend
            };
            Some(TunnelSettings::Waterwall(WaterwallSettings {
                listen: listen?,
                connect: connect?,
                password,
            }))
        }
    }
}

/// A MAC address `aa:bb:cc:dd:ee:ff` (or with `-`), normalised to lowercase with `:`.
fn parse_mac(v: &str) -> Result<String, String> {
    let octets: Vec<&str> = v.split([':', '-']).collect();
    if octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit()))
    {
        Ok(octets.join(":").to_ascii_lowercase())
    } else {
        Err("expected a MAC address aa:bb:cc:dd:ee:ff".into())
    }
}

/// A tunnel key or password: 1-256 printable ASCII characters. It is written into a
/// YAML or JSON string by a serializer, so quotes and backslashes are fine.
fn parse_tunnel_secret(v: &str) -> Result<String, String> {
    if (1..=256).contains(&v.len()) && v.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
        Ok(v.to_string())
    } else {
        Err("must be 1-256 printable ASCII characters".into())
    }
}
