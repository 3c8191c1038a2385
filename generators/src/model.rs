//! The typed model of the whole etcd schema (DESIGN §3, the predecessor's schema).
//!
//! `Config::parse` turns a [`Snapshot`] into global settings plus one [`Node`] per
//! `/nodes/<id>/`, validating every value. All errors of a snapshot are collected and
//! returned together; a snapshot with any error is never rendered.
//! Defaults live here, next to the key they belong to, and are listed in
//! `docs/etcd-schema.md`.

use crate::error::ValidationErrors;
use crate::parse::{self, Reader};
use crate::plan::dns::{Failover, HealthCheck, UpstreamGroup};
use crate::snapshot::Snapshot;
use ipnet::IpNet;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Overlay network selected globally (`/global/mesh_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MeshType {
    Easytier,
    Tinc,
}

/// `/global/internal_routing_system`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InternalRouting {
    Ospf,
    Bgp,
}

/// One line of `/global/bgp/filter/in|out`: `permit|deny <prefix> [ge N] [le N]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PrefixRule {
    pub permit: bool,
    pub prefix: IpNet,
    pub ge: Option<u8>,
    pub le: Option<u8>,
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

#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct ClashGlobal {
    /// `/global/clash/base`: YAML mapping merged under every subscription.
    pub base: Option<serde_norway::Mapping>,
    /// `/global/clash/subscriptions/<name>/url`.
    pub subscriptions: BTreeMap<String, String>,
    /// `/global/clash/health/*`, defaults filled in; a node's effective values are
    /// [`Clash::health`].
    pub health: ClashHealthCheck,
    /// mihomo's fake-IP ranges when the base's `dns.enhanced-mode` is `fake-ip`
    /// (`dns.fake-ip-range`, default `198.18.0.1/16`, and `dns.fake-ip-range6` when
    /// set); empty in any other mode. The generated config's `dns` section is the
    /// base's, so these are the ranges mihomo answers from.
    pub fake_ip: Vec<IpNet>,
}

/// mihomo's `dns.fake-ip-range` when the config does not set it.
pub const MIHOMO_FAKE_IP_RANGE: &str = "198.18.0.1/16";

/// The fake-IP ranges of a mihomo config (see [`ClashGlobal::fake_ip`]); the error is
/// the offending `dns.` field with its value, and why.
fn fake_ip_ranges(base: &serde_norway::Mapping) -> Result<Vec<IpNet>, (String, String)> {
    let Some(dns) = base.get("dns").and_then(serde_norway::Value::as_mapping) else {
        return Ok(Vec::new());
    };
    let text = |field: &str| -> Result<Option<String>, (String, String)> {
        match dns.get(field) {
            None | Some(serde_norway::Value::Null) => Ok(None),
            Some(serde_norway::Value::String(v)) => Ok(Some(v.clone())),
            Some(other) => Err((format!("dns.{field}: {other:?}"), "must be a string".into())),
        }
    };
    match text("enhanced-mode")?.as_deref() {
        Some("fake-ip") => {}
        None | Some("redir-host") | Some("normal") => return Ok(Vec::new()),
        Some(other) => {
            return Err((
                format!("dns.enhanced-mode: {other}"),
                "must be fake-ip, redir-host or normal".into(),
            ))
        }
    }
    let mut out = Vec::new();
    for (field, default, v6) in [
        ("fake-ip-range", Some(MIHOMO_FAKE_IP_RANGE), false),
        ("fake-ip-range6", None, true),
    ] {
        let Some(v) = text(field)?.or(default.map(str::to_string)) else {
            continue;
        };
        let bad = |why: &str| (format!("dns.{field}: {v}"), why.to_string());
        let net: IpNet = v.parse().map_err(|_| bad("must be an address/prefix"))?;
        if net.addr().is_ipv6() != v6 {
            return Err(bad(if v6 {
                "must be an IPv6 prefix"
            } else {
                "must be an IPv4 prefix"
            }));
        }
        out.push(net.trunc());
    }
    Ok(out)
}

/// `clash/health/*`: mihomo's own health checks (proxy provider and the default
/// url-test group) and meduza's active delay tests of the node each URLTest group uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClashHealthCheck {
    /// `clash/health/url`: fetched through the proxy under test (mihomo's url-test
    /// groups, provider health checks and meduza's delay tests).
    pub url: String,
    /// `clash/health/interval`: seconds between mihomo's own checks over all members.
    pub interval_secs: u64,
    /// `clash/health/probe_interval`: seconds between meduza's delay tests of the node
    /// in use.
    pub probe_interval_secs: u64,
    /// `clash/health/timeout`: milliseconds one delay test may take before the node
    /// counts as dead.
    pub timeout_ms: u64,
}

impl ClashHealthCheck {
    /// Google's 204 endpoint, mihomo's own default test URL.
    pub const DEFAULT_URL: &'static str = "https://www.gstatic.com/generate_204";
    pub const DEFAULT_INTERVAL_SECS: u64 = 300;
    pub const DEFAULT_PROBE_INTERVAL_SECS: u64 = 10;
    pub const DEFAULT_TIMEOUT_MS: u64 = 5000;
}

impl Default for ClashHealthCheck {
    fn default() -> Self {
        Self {
            url: Self::DEFAULT_URL.to_string(),
            interval_secs: Self::DEFAULT_INTERVAL_SECS,
            probe_interval_secs: Self::DEFAULT_PROBE_INTERVAL_SECS,
            timeout_ms: Self::DEFAULT_TIMEOUT_MS,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct MosdnsGlobal {
    /// `/global/mosdns/rule_files`: relative path → URL.
    pub rule_files: BTreeMap<String, String>,
    /// `/global/mosdns/plugins`: YAML list of plugins.
    pub plugins: Option<Vec<serde_norway::Value>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Global {
    pub mesh_type: Option<MeshType>,
    pub internal_routing: InternalRouting,
    pub easytier: EasytierGlobal,
    pub tinc: TincGlobal,
    pub bgp_filter_in: Vec<PrefixRule>,
    pub bgp_filter_out: Vec<PrefixRule>,
    pub clash: ClashGlobal,
    pub mosdns: MosdnsGlobal,
    pub dns_upstreams: BTreeMap<String, UpstreamGroup>,
    /// `/fleet/proxy`: HTTP(S)/SOCKS proxy the fleet manager may fall back to.
    pub fleet_proxy: Option<String>,
    /// `/fleet/nodes/<id>/api_url`.
    pub fleet_nodes: BTreeMap<String, String>,
    /// `/global/confirm_timeout`: seconds a gateway waits, after applying a commit,
    /// for an etcd round trip before it rolls back (docs/operations.md).
    #[serde(skip)]
    pub confirm_timeout_secs: u64,
}

/// `confirm_timeout`: default and accepted range, in seconds.
pub const CONFIRM_TIMEOUT_DEFAULT_SECS: u64 = 90;
pub const CONFIRM_TIMEOUT_MIN_SECS: u64 = 10;
pub const CONFIRM_TIMEOUT_MAX_SECS: u64 = 3600;

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

/// OpenVPN transport (`proto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OvpnProto {
    TcpServer,
    TcpClient,
    Udp,
}

/// eBGP over a VPN instance (`.../bgp/*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BgpPeer {
    pub peer_asn: u32,
    pub peer_ip: IpAddr,
    pub update_source: Option<String>,
    pub weight: Option<u32>,
    pub no_transit: bool,
    pub no_forward: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpenVpn {
    pub name: String,
    pub enable: bool,
    pub dev: String,
    pub proto: OvpnProto,
    pub port: u16,
    /// `(host, port)`; port defaults to `port`.
    pub remotes: Vec<(String, u16)>,
    pub ifconfig: Option<(Ipv4Addr, Ipv4Addr)>,
    pub keepalive: Option<(u32, u32)>,
    pub cipher: Option<String>,
    pub key_direction: Option<u8>,
    #[serde(skip)]
    pub secret: Option<String>,
    pub ca: Option<String>,
    pub cert: Option<String>,
    #[serde(skip)]
    pub key: Option<String>,
    #[serde(skip)]
    pub tls_auth: Option<String>,
    #[serde(skip)]
    pub tls_crypt: Option<String>,
    /// Standard OpenVPN directives passed through from `openvpn/<name>/<directive>`
    /// keys (name → arguments, empty for a flag), checked against
    /// [`crate::gen::openvpn::DIRECTIVES`].
    pub directives: BTreeMap<String, String>,
    pub bgp: Option<BgpPeer>,
}

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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Bgp {
    pub enable: bool,
    pub asn: Option<u32>,
    pub router_id: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct Ospf {
    pub enable: bool,
    pub router_id: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClashMode {
    Mixed,
    Tproxy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Clash {
    pub enable: bool,
    pub mode: ClashMode,
    pub active_subscription: Option<String>,
    pub refresh_enable: bool,
    pub refresh_interval_minutes: u32,
    pub exclude_tproxy_ports: Vec<u16>,
    /// `clash/controller`: external-controller address (default `127.0.0.1:9090`).
    pub controller: SocketAddr,
    /// `clash/secret`: API secret; when absent the daemon generates one per node.
    #[serde(skip)]
    pub secret: Option<String>,
    /// Effective `clash/health/*`: each of the node's keys, else the global one, else
    /// the default.
    pub health: ClashHealthCheck,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mosdns {
    pub enable: bool,
    pub refresh_minutes: u32,
}

/// What the gateway does with proxied LAN sources' DNS and its bypasses
/// (`/nodes/<id>/dns/...`; docs/dns.md). Effective only while TPROXY is applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsGuard {
    /// `dns/hijack` (default true): port 53 to any address goes to the frontend.
    pub hijack: bool,
    /// `dns/block_quic` (default false): UDP 443 is rejected.
    pub block_quic: bool,
    /// `dns/block_dot` (default false): TCP and UDP 853 are rejected.
    pub block_dot: bool,
    /// `dns/block_doh`: resolver addresses whose port 443 is rejected.
    pub block_doh: Vec<IpAddr>,
}

/// Probe kinds an operator may name in `.../health/kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeKind {
    Process,
    Tcp,
    Http,
    Socks5,
    Dns,
    Exec,
    Log,
}

/// `.../health/*` and `.../restart/*` overrides for a service or tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct ServiceOverrides {
    pub health_enable: Option<bool>,
    pub health_kind: Option<ProbeKind>,
    /// Address, URL or argv line depending on the kind.
    pub health_target: Option<String>,
    /// SOCKS5 proxy (`host:port`) for the `socks5` kind.
    pub health_proxy: Option<String>,
    /// Pattern for the `log` kind.
    pub health_pattern: Option<String>,
    pub health_interval_secs: Option<u64>,
    pub cron_minutes: Option<u32>,
    pub cooldown_secs: Option<u64>,
    pub max_per_hour: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelKind {
    Paqet,
    Icmptunnel,
    Waterwall,
    Generic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelRole {
    Client,
    Server,
}

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

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    pub id: String,
    pub lan: Vec<IpNet>,
    pub private_lan: Vec<IpNet>,
    pub easytier: Easytier,
    pub tinc: Tinc,
    pub openvpn: Vec<OpenVpn>,
    pub wireguard: Vec<Wireguard>,
    pub bgp: Bgp,
    pub ospf: Ospf,
    pub clash: Clash,
    pub mosdns: Mosdns,
    pub dns_upstreams: BTreeMap<String, UpstreamGroup>,
    pub dns_guard: DnsGuard,
    pub services: BTreeMap<String, ServiceOverrides>,
    pub tunnels: Vec<Tunnel>,
    #[serde(skip)]
    pub api_token: Option<String>,
    /// `/nodes/<id>/api/tls/{cert,key}`: the node API's HTTPS certificate and key.
    #[serde(skip)]
    pub api_tls: Option<ApiTls>,
    /// `/nodes/<id>/confirm_timeout`, else the global value.
    #[serde(skip)]
    pub confirm_timeout_secs: u64,
}

/// `/nodes/<id>/api/tls/cert` and `/nodes/<id>/api/tls/key` (PEM), both checked to
/// decode; whether the key belongs to the certificate is checked where rustls loads
/// them (`meduza::tls`). `Debug` never shows the key.
#[derive(Clone, PartialEq)]
pub struct ApiTls {
    /// Certificate chain, leaf first.
    pub cert_pem: String,
    /// Private key: a secret, never logged, serialized or published.
    pub key_pem: String,
}

impl std::fmt::Debug for ApiTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiTls")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

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
        let global = parse_global(&mut r);
        let mut nodes = BTreeMap::new();
        for id in snap.children("/nodes/") {
            if let Err(reason) = parse::validate_name(&id) {
                r.error(&format!("/nodes/{id}/"), &id, format!("node id: {reason}"));
                continue;
            }
            let node = parse_node(&mut r, &id, &global);
            nodes.insert(id, node);
        }
        let dns_hosts = parse_hosts(&mut r);
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

/// `223.5.5.5` (priority 1) and `119.29.29.29` (priority 2), the predecessor's fallbacks.
pub fn default_upstreams() -> Vec<UpstreamGroup> {
    [("alidns", "223.5.5.5", 1), ("dnspod", "119.29.29.29", 2)]
        .into_iter()
        .map(|(name, ip, priority)| UpstreamGroup {
            name: name.to_string(),
            addresses: vec![SocketAddr::new(ip.parse().expect("literal address"), 53)],
            priority,
            enable: true,
            health_check: HealthCheck::default(),
            failover: Failover::default(),
        })
        .collect()
}

fn parse_global(r: &mut Reader<'_>) -> Global {
    let mesh_type = r.choice(
        "/global/mesh_type",
        &[("easytier", MeshType::Easytier), ("tinc", MeshType::Tinc)],
        None,
    );
    let internal_routing = r
        .choice(
            "/global/internal_routing_system",
            &[
                ("ospf", InternalRouting::Ospf),
                ("bgp", InternalRouting::Bgp),
            ],
            Some(InternalRouting::Ospf),
        )
        .unwrap_or(InternalRouting::Ospf);
    let easytier = EasytierGlobal {
        network_name: r.parsed("/global/easytier/network_name", |v| {
            parse::validate_name(v).map(|()| v.to_string())
        }),
        network_secret: r.str("/global/easytier/network_secret").map(str::to_string),
        private_mode: r.bool("/global/easytier/private_mode", false),
        dhcp: r.bool("/global/easytier/dhcp", false),
    };
    let tinc = TincGlobal {
        netname: r
            .parsed("/global/tinc/netname", |v| {
                parse::validate_name(v).map(|()| v.to_string())
            })
            .unwrap_or_else(|| "mesh".into()),
        cipher: r.parsed("/global/tinc/cipher", parse_token),
        digest: r.parsed("/global/tinc/digest", parse_token),
    };
    let bgp_filter_in = r.list("/global/bgp/filter/in", parse_prefix_rule);
    let bgp_filter_out = r.list("/global/bgp/filter/out", parse_prefix_rule);

    let base = r.parsed("/global/clash/base", |v| {
        match serde_norway::from_str::<serde_norway::Value>(v) {
            Ok(serde_norway::Value::Mapping(m)) => Ok(m),
            Ok(_) => Err("must be a YAML mapping".into()),
            Err(e) => Err(format!("YAML does not parse: {e}")),
        }
    });
    let fake_ip = match base.as_ref().map(fake_ip_ranges) {
        Some(Err((value, reason))) => {
            r.error("/global/clash/base", &value, reason);
            Vec::new()
        }
        Some(Ok(ranges)) => ranges,
        None => Vec::new(),
    };
    let health = parse_clash_health(r, "/global/", &ClashHealthCheck::default());
    let mut subscriptions = BTreeMap::new();
    for (name, base) in r.named_children("/global/clash/subscriptions/", "url", "subscription") {
        let key = format!("{base}url");
        match r.parsed(&key, parse::parse_http_url) {
            Some(url) => {
                subscriptions.insert(name, url);
            }
            None if r.str(&key).is_none() => r.error(&key, "", "subscription needs a url"),
            None => {}
        }
    }
    let rule_files = r
        .parsed("/global/mosdns/rule_files", parse_rule_files)
        .unwrap_or_default();
    let plugins = r.parsed("/global/mosdns/plugins", |v| {
        match serde_norway::from_str::<serde_norway::Value>(v) {
            Ok(serde_norway::Value::Sequence(s)) => {
                for (i, p) in s.iter().enumerate() {
                    let ok = p.get("tag").and_then(|t| t.as_str()).is_some()
                        && p.get("type").and_then(|t| t.as_str()).is_some();
                    if !ok {
                        return Err(format!("plugin #{} needs string `tag` and `type`", i + 1));
                    }
                }
                Ok(s)
            }
            Ok(_) => Err("must be a YAML list of plugins".into()),
            Err(e) => Err(format!("YAML does not parse: {e}")),
        }
    });
    let dns_upstreams = parse_upstreams(r, "/global/dns/upstreams/");
    let fleet_proxy = r.parsed("/fleet/proxy", |v| {
        if ["http://", "https://", "socks5://", "socks5h://"]
            .iter()
            .any(|p| v.starts_with(p))
        {
            Ok(v.to_string())
        } else {
            Err("proxy must be an http://, https:// or socks5:// URL".into())
        }
    });
    let mut fleet_nodes = BTreeMap::new();
    for id in r.snap.children("/fleet/nodes/") {
        let key = format!("/fleet/nodes/{id}/api_url");
        if let Some(url) = r.parsed(&key, parse::parse_http_url) {
            fleet_nodes.insert(id, url);
        }
    }
    Global {
        mesh_type,
        internal_routing,
        easytier,
        tinc,
        bgp_filter_in,
        bgp_filter_out,
        clash: ClashGlobal {
            base,
            subscriptions,
            health,
            fake_ip,
        },
        mosdns: MosdnsGlobal {
            rule_files,
            plugins,
        },
        dns_upstreams,
        fleet_proxy,
        fleet_nodes,
        confirm_timeout_secs: confirm_timeout(r, "/global/confirm_timeout")
            .unwrap_or(CONFIRM_TIMEOUT_DEFAULT_SECS),
    }
}

fn confirm_timeout(r: &mut Reader<'_>, key: &str) -> Option<u64> {
    r.u64_in(key, CONFIRM_TIMEOUT_MIN_SECS, CONFIRM_TIMEOUT_MAX_SECS)
}

/// `<base>clash/health/*` (`base` is `/global/` or `/nodes/<id>/`): each key present
/// wins, each absent or invalid one keeps `fallback`'s value (the global settings for a
/// node, the defaults for the global keys).
fn parse_clash_health(
    r: &mut Reader<'_>,
    base: &str,
    fallback: &ClashHealthCheck,
) -> ClashHealthCheck {
    let k = |s: &str| format!("{base}clash/health/{s}");
    ClashHealthCheck {
        url: r
            .parsed(&k("url"), parse_health_url)
            .unwrap_or_else(|| fallback.url.clone()),
        interval_secs: r
            .u64_in(&k("interval"), 5, 86_400)
            .unwrap_or(fallback.interval_secs),
        probe_interval_secs: r
            .u64_in(&k("probe_interval"), 1, 3600)
            .unwrap_or(fallback.probe_interval_secs),
        timeout_ms: r
            .u64_in(&k("timeout"), 100, 60_000)
            .unwrap_or(fallback.timeout_ms),
    }
}

/// `clash/health/url`: an absolute http(s) URL with a host (`host`, `host:port` or
/// `[v6]:port`). mihomo dials that host through every proxy it tests, so a URL without
/// one would make every node look dead.
fn parse_health_url(v: &str) -> Result<String, String> {
    let url = parse::parse_http_url(v)?;
    let rest = url.split_once("://").map_or("", |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err("URL must not carry user information".into());
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (h, after) = v6
                .split_once(']')
                .ok_or("URL has an unclosed [ in its host")?;
            h.parse::<std::net::Ipv6Addr>()
                .map_err(|_| "URL host in [] is not an IPv6 address".to_string())?;
            match after {
                "" => (h, None),
                _ => (
                    h,
                    Some(
                        after
                            .strip_prefix(':')
                            .ok_or("URL host [v6] may only be followed by :port")?,
                    ),
                ),
            }
        }
        None => match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return Err("URL has no host".into());
    }
    parse::validate_host(host).map_err(|e| format!("URL {e}"))?;
    if let Some(p) = port {
        parse::parse_port(p).map_err(|e| format!("URL {e}"))?;
    }
    Ok(url)
}

/// Cipher/digest names: OpenSSL names such as `aes-256-cbc`, `sha256`.
fn parse_token(v: &str) -> Result<String, String> {
    if v.len() <= 64
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        Ok(v.to_string())
    } else {
        Err("must be a cipher/digest name of [A-Za-z0-9_-]".into())
    }
}

fn parse_prefix_rule(line: &str) -> Result<PrefixRule, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let permit = match words.first() {
        Some(&"permit") => true,
        Some(&"deny") => false,
        _ => return Err("rule must start with permit or deny".into()),
    };
    let prefix = words
        .get(1)
        .ok_or("rule needs a prefix")
        .map_err(String::from)
        .and_then(|p| parse::parse_cidr(p))?;
    if !prefix.addr().is_ipv4() {
        // The BGP sessions carry IPv4 unicast only (see docs/etcd-schema.md).
        return Err("only IPv4 prefixes are supported".into());
    }
    let max = if prefix.addr().is_ipv4() { 32 } else { 128 };
    let mut ge = None;
    let mut le = None;
    let mut rest = words[2..].iter();
    while let Some(w) = rest.next() {
        let n = rest
            .next()
            .ok_or(format!("`{w}` needs a length"))?
            .parse::<u8>()
            .map_err(|_| format!("`{w}` length is not a number"))?;
        if n < prefix.prefix_len() || n > max {
            return Err(format!(
                "`{w} {n}` must be between {} and {max}",
                prefix.prefix_len()
            ));
        }
        match *w {
            "ge" => ge = Some(n),
            "le" => le = Some(n),
            _ => return Err(format!("unknown word `{w}` (expected ge or le)")),
        }
    }
    if let (Some(g), Some(l)) = (ge, le) {
        if g > l {
            return Err("ge must not exceed le".into());
        }
    }
    Ok(PrefixRule {
        permit,
        prefix,
        ge,
        le,
    })
}

fn parse_rule_files(v: &str) -> Result<BTreeMap<String, String>, String> {
    let map: BTreeMap<String, String> = serde_json::from_str(v)
        .map_err(|e| format!("must be a JSON object {{\"path\": \"url\"}}: {e}"))?;
    for (path, url) in &map {
        let rel = path.trim_start_matches("/etc/mosdns/");
        if rel.is_empty()
            || rel.starts_with('/')
            || rel.split('/').any(|seg| seg.is_empty() || seg == "..")
            || !rel
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
        {
            return Err(format!(
                "rule file path `{path}` must be relative to /etc/mosdns without .."
            ));
        }
        parse::parse_http_url(url).map_err(|e| format!("rule file `{path}`: {e}"))?;
    }
    Ok(map)
}

fn parse_upstreams(r: &mut Reader<'_>, prefix: &str) -> BTreeMap<String, UpstreamGroup> {
    let mut out = BTreeMap::new();
    for (name, base) in r.named_children(prefix, "addresses", "upstream") {
        let k = |s: &str| format!("{base}{s}");
        let addresses = r.list(&k("addresses"), parse::parse_dns_addr);
        if addresses.is_empty() && r.str(&k("addresses")).is_none() {
            r.error(
                &k("addresses"),
                "",
                "an upstream group needs at least one address",
            );
        }
        let group = UpstreamGroup {
            name: name.clone(),
            addresses,
            priority: r.u32_in(&k("priority"), 1, 1000).unwrap_or(1),
            enable: r.bool(&k("enable"), true),
            health_check: HealthCheck {
                enable: r.bool(&k("health_check/enable"), true),
                interval_secs: r
                    .u64_in(&k("health_check/interval"), 1, 86_400)
                    .unwrap_or(30),
                timeout_secs: r.u64_in(&k("health_check/timeout"), 1, 60).unwrap_or(5),
            },
            failover: Failover {
                enable: r.bool(&k("failover/enable"), true),
                threshold: r.u32_in(&k("failover/threshold"), 1, 100).unwrap_or(3),
            },
        };
        out.insert(name, group);
    }
    out
}

/// The keys of an OpenVPN instance itself (besides `bgp/...`); every other key right
/// under `openvpn/<name>/` is a standard OpenVPN directive.
const OPENVPN_KEYS: &[&str] = &[
    "enable",
    "dev",
    "proto",
    "port",
    "remote",
    "ifconfig",
    "keepalive",
    "cipher",
    "key_direction",
    "secret",
    "ca",
    "cert",
    "key",
    "tls_auth",
    "tls_crypt",
];

/// `openvpn/<name>/<directive>` keys: each must be on the allowlist of
/// [`crate::gen::openvpn::DIRECTIVES`] with a valid value; an error names the key.
fn parse_ovpn_directives(
    r: &mut Reader<'_>,
    base: &str,
    proto: OvpnProto,
) -> BTreeMap<String, String> {
    let snap = r.snap;
    let mut out = BTreeMap::new();
    for (key, value) in snap.prefix(base) {
        let leaf = &key[base.len()..];
        if !leaf.contains('/') {
            r.note(key); // a known key or a directive, checked below
        }
        let value = value.trim();
        if leaf.is_empty() || leaf.contains('/') || OPENVPN_KEYS.contains(&leaf) || value.is_empty()
        {
            continue;
        }
        match crate::gen::openvpn::check_directive(leaf, value, proto) {
            Ok(Some(args)) => {
                out.insert(leaf.to_string(), args);
            }
            Ok(None) => {}
            Err(reason) => {
                // Key material pasted under OpenVPN's hyphenated spelling
                // (`tls-auth`, `tls-crypt`) must not be echoed into the published
                // errors: multi-line and PEM values are never shown.
                let shown = if value.contains('\n') || value.contains("-----BEGIN") {
                    "<redacted>"
                } else {
                    value
                };
                r.error(key, shown, reason)
            }
        }
    }
    out
}

/// An inline OpenVPN static key (`secret`, `tls_auth`, `tls_crypt`).
fn ovpn_static_key(v: &str) -> Result<String, String> {
    let v = inline_block(v, "OpenVPN Static key V1")?;
    crate::gen::openvpn::check_inline(&v)?;
    Ok(v)
}

/// Inline OpenVPN PEM (`ca`, `cert`, `key`).
fn ovpn_pem(v: &str, kind: &str) -> Result<String, String> {
    let v = pem(v, kind)?;
    crate::gen::openvpn::check_inline(&v)?;
    Ok(v)
}

/// The key material of an enabled instance: a static `secret`, or TLS with `ca`,
/// `cert` and `key` together and at most one of `tls_auth` / `tls_crypt` (OpenVPN
/// refuses both, and refuses either without TLS).
fn check_ovpn_keys(r: &mut Reader<'_>, b: &str, inst: &OpenVpn) {
    let tls_parts = [("ca", &inst.ca), ("cert", &inst.cert), ("key", &inst.key)];
    let any_tls = tls_parts.iter().any(|(_, v)| v.is_some())
        || inst.tls_auth.is_some()
        || inst.tls_crypt.is_some();
    if inst.secret.is_some() {
        if any_tls {
            r.error(
                &format!("{b}secret"),
                "",
                "static-key mode cannot be combined with ca/cert/key/tls_auth/tls_crypt; \
                 keep one mode",
            );
        }
        return;
    }
    // A value that did not parse was reported on its own key already.
    let present: Vec<bool> = tls_parts
        .iter()
        .map(|(k, _)| r.str(&format!("{b}{k}")).is_some())
        .collect();
    if !present.contains(&true) {
        r.error(
            &format!("{b}secret"),
            "",
            "needs a static secret or ca+cert+key",
        );
        return;
    }
    for ((k, _), there) in tls_parts.iter().zip(present) {
        if !there {
            r.error(
                &format!("{b}{k}"),
                "",
                "required for TLS: ca, cert and key go together",
            );
        }
    }
    if inst.tls_auth.is_some() && inst.tls_crypt.is_some() {
        r.error(
            &format!("{b}tls_crypt"),
            "",
            "tls_auth and tls_crypt are mutually exclusive (OpenVPN refuses both)",
        );
    }
}

fn parse_bgp_peer(r: &mut Reader<'_>, base: &str) -> Option<BgpPeer> {
    let k = |s: &str| format!("{base}bgp/{s}");
    if !r.bool(&k("enable"), false) {
        // A disabled peer may keep its keys: not unknown, only unused.
        r.note_subtree(&k(""));
        return None;
    }
    let peer_asn = r.u32_in(&k("peer_asn"), 1, u32::MAX);
    let peer_ip = r.ip(&k("peer_ip"));
    if r.str(&k("peer_asn")).is_none() {
        r.error(&k("peer_asn"), "", "required when bgp/enable is true");
    }
    if r.str(&k("peer_ip")).is_none() {
        r.error(&k("peer_ip"), "", "required when bgp/enable is true");
    }
    let update_source = r.parsed(&k("update_source"), |v| {
        parse::parse_iface(v).or_else(|_| {
            v.parse::<IpAddr>()
                .map(|a| a.to_string())
                .map_err(|_| "must be an interface name or an IP address".to_string())
        })
    });
    let weight = r.u32_in(&k("weight"), 0, 65_535);
    let no_transit = r.bool(&k("no_transit"), false);
    let no_forward = r.bool(&k("no_forward"), false);
    Some(BgpPeer {
        peer_asn: peer_asn?,
        peer_ip: peer_ip?,
        update_source,
        weight,
        no_transit,
        no_forward,
    })
}

fn parse_overrides(r: &mut Reader<'_>, base: &str) -> ServiceOverrides {
    let k = |s: &str| format!("{base}{s}");
    ServiceOverrides {
        health_enable: r.parsed(&k("health/enable"), parse::parse_bool),
        health_kind: r.choice(
            &k("health/kind"),
            &[
                ("process", ProbeKind::Process),
                ("tcp", ProbeKind::Tcp),
                ("http", ProbeKind::Http),
                ("socks5", ProbeKind::Socks5),
                ("dns", ProbeKind::Dns),
                ("exec", ProbeKind::Exec),
                ("log", ProbeKind::Log),
            ],
            None,
        ),
        health_target: r.str(&k("health/target")).map(str::to_string),
        health_proxy: r.parsed(&k("health/proxy"), |v| {
            parse::parse_host_port(v).map(|_| v.to_string())
        }),
        health_pattern: r.str(&k("health/pattern")).map(str::to_string),
        health_interval_secs: r.u64_in(&k("health/interval"), 10, 86_400),
        cron_minutes: r.u32_in(&k("restart/cron_minutes"), 10, 1440),
        cooldown_secs: r.u64_in(&k("restart/cooldown"), 0, 86_400),
        max_per_hour: r.u32_in(&k("restart/max_per_hour"), 1, 60),
    }
}

fn parse_node(r: &mut Reader<'_>, id: &str, global: &Global) -> Node {
    let p = format!("/nodes/{id}/");
    let k = |s: &str| format!("{p}{s}");
    let lan = r.cidrs(&k("lan"));
    let private_lan = r.cidrs(&k("private_lan"));

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
        public_key: r.parsed(&k("tinc/public_key"), |v| pem(v, "PUBLIC KEY")),
        private_key: r.parsed(&k("tinc/private_key"), |v| pem(v, "PRIVATE KEY")),
    };
    if tinc.enable && tinc.private_key.is_none() && r.str(&k("tinc/private_key")).is_none() {
        r.error(
            &k("tinc/private_key"),
            "",
            "required when tinc/enable is true (RSA, PEM)",
        );
    }
    if tinc.enable && r.str(&k("tinc/public_key")).is_none() {
        // Every node's hosts/<name> file carries it; peers cannot authenticate without.
        r.error(
            &k("tinc/public_key"),
            "",
            "required when tinc/enable is true (RSA, PEM)",
        );
    }

    let mut openvpn = Vec::new();
    for (name, b) in r.named_children(&k("openvpn/"), "enable", "instance") {
        let proto = r
            .choice(
                &format!("{b}proto"),
                &[
                    ("tcp-server", OvpnProto::TcpServer),
                    ("tcp-client", OvpnProto::TcpClient),
                    ("udp", OvpnProto::Udp),
                ],
                Some(OvpnProto::Udp),
            )
            .unwrap_or(OvpnProto::Udp);
        let port = r.port(&format!("{b}port")).unwrap_or(1194);
        let dev = r
            .iface(&format!("{b}dev"))
            .or_else(|| parse::parse_iface(&format!("ovpn-{name}")).ok());
        let Some(dev) = dev else {
            r.error(
                &format!("{b}dev"),
                "",
                "default ovpn-<name> is too long; set dev",
            );
            continue;
        };
        let remotes = r.list(&format!("{b}remote"), |line| {
            let mut words = line.split_whitespace();
            let host = words.next().ok_or("empty remote")?;
            parse::validate_host(host)?;
            let p = match words.next() {
                Some(w) => parse::parse_port(w)?,
                None => port,
            };
            if words.next().is_some() {
                return Err("remote is `host [port]`".into());
            }
            Ok((host.to_string(), p))
        });
        let ifconfig = r.parsed(&format!("{b}ifconfig"), |v| {
            let parts: Vec<&str> = v.split_whitespace().collect();
            match parts.as_slice() {
                [a, b] => Ok((
                    a.parse().map_err(|_| "ifconfig local is not IPv4")?,
                    b.parse().map_err(|_| "ifconfig remote is not IPv4")?,
                )),
                _ => Err("ifconfig is `local remote`".into()),
            }
        });
        let keepalive = r.parsed(&format!("{b}keepalive"), |v| {
            let parts: Vec<&str> = v.split_whitespace().collect();
            match parts.as_slice() {
                [a, b] => {
                    let a = parse::parse_u32_in(a, 1, 3600)?;
                    let b = parse::parse_u32_in(b, 1, 86_400)?;
                    if b <= a {
                        return Err("keepalive timeout must exceed the interval".into());
                    }
                    Ok((a, b))
                }
                _ => Err("keepalive is `interval timeout`".into()),
            }
        });
        let inst = OpenVpn {
            name: name.clone(),
            enable: r.bool(&format!("{b}enable"), false),
            dev,
            proto,
            port,
            remotes,
            ifconfig,
            keepalive,
            cipher: r.parsed(&format!("{b}cipher"), parse_token),
            key_direction: r
                .u32_in(&format!("{b}key_direction"), 0, 1)
                .map(|d| d as u8),
            secret: r.parsed(&format!("{b}secret"), ovpn_static_key),
            ca: r.parsed(&format!("{b}ca"), |v| ovpn_pem(v, "CERTIFICATE")),
            cert: r.parsed(&format!("{b}cert"), |v| ovpn_pem(v, "CERTIFICATE")),
            key: r.parsed(&format!("{b}key"), |v| ovpn_pem(v, "PRIVATE KEY")),
            tls_auth: r.parsed(&format!("{b}tls_auth"), ovpn_static_key),
            tls_crypt: r.parsed(&format!("{b}tls_crypt"), ovpn_static_key),
            directives: parse_ovpn_directives(r, &b, proto),
            bgp: parse_bgp_peer(r, &b),
        };
        if inst.enable {
            if inst.proto == OvpnProto::TcpClient && inst.remotes.is_empty() {
                r.error(
                    &format!("{b}remote"),
                    "",
                    "tcp-client needs at least one remote",
                );
            }
            check_ovpn_keys(r, &b, &inst);
        }
        openvpn.push(inst);
    }

    let mut wireguard = Vec::new();
    for (name, b) in r.named_children(&k("wireguard/"), "enable", "instance") {
        let dev = r
            .iface(&format!("{b}dev"))
            .or_else(|| parse::parse_iface(&format!("wg-{name}")).ok());
        let Some(dev) = dev else {
            r.error(
                &format!("{b}dev"),
                "",
                "default wg-<name> is too long; set dev",
            );
            continue;
        };
        let enable = r.bool(&format!("{b}enable"), false);
        let private_key = r.parsed(&format!("{b}private_key"), parse::parse_wg_key);
        if enable && private_key.is_none() && r.str(&format!("{b}private_key")).is_none() {
            r.error(
                &format!("{b}private_key"),
                "",
                "required when enable is true",
            );
        }
        let mut peers = Vec::new();
        for peer in r.snap.children(&format!("{b}peer/")) {
            let pb = format!("{b}peer/{peer}/");
            let public_key = r.parsed(&format!("{pb}public_key"), parse::parse_wg_key);
            if r.str(&format!("{pb}public_key")).is_none() {
                r.error(
                    &format!("{pb}public_key"),
                    "",
                    "every peer needs a public_key",
                );
            }
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

    let bgp = Bgp {
        enable: r.bool(&k("bgp/enable"), false),
        asn: r.u32_in(&k("bgp/asn"), 1, u32::MAX),
        router_id: r.ipv4(&k("bgp/router_id")),
    };
    if bgp.enable && r.str(&k("bgp/asn")).is_none() {
        r.error(&k("bgp/asn"), "", "required when bgp/enable is true");
    }
    let ospf = Ospf {
        enable: r.bool(&k("ospf/enable"), false),
        router_id: r.ipv4(&k("ospf/router_id")),
    };

    let clash = Clash {
        enable: r.bool(&k("clash/enable"), false),
        mode: r
            .choice(
                &k("clash/mode"),
                &[("mixed", ClashMode::Mixed), ("tproxy", ClashMode::Tproxy)],
                Some(ClashMode::Mixed),
            )
            .unwrap_or(ClashMode::Mixed),
        active_subscription: r.str(&k("clash/active_subscription")).map(str::to_string),
        refresh_enable: r.bool(&k("clash/refresh/enable"), false),
        refresh_interval_minutes: r
            .u32_in(&k("clash/refresh/interval_minutes"), 5, 10_080)
            .unwrap_or(60),
        exclude_tproxy_ports: r.ports(&k("clash/exclude_tproxy_port")),
        controller: r
            .parsed(&k("clash/controller"), |v| {
                v.parse::<SocketAddr>()
                    .map_err(|_| "controller must be ip:port".to_string())
            })
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9090))),
        secret: r.parsed(&k("clash/secret"), |v| {
            if v.len() >= 16 && v.chars().all(|c| c.is_ascii_graphic()) {
                Ok(v.to_string())
            } else {
                Err("secret must be at least 16 printable characters without spaces".into())
            }
        }),
        health: parse_clash_health(r, &p, &global.clash.health),
    };
    if let Some(sub) = &clash.active_subscription {
        if !global.clash.subscriptions.contains_key(sub) {
            r.error(
                &k("clash/active_subscription"),
                sub,
                "no /global/clash/subscriptions/<name>/url with this name",
            );
        }
    }
    let mosdns = Mosdns {
        enable: r.bool(&k("mosdns/enable"), false),
        refresh_minutes: r.u32_in(&k("mosdns/refresh"), 5, 43_200).unwrap_or(1440),
    };
    let dns_upstreams = parse_upstreams(r, &k("dns/upstreams/"));
    let dns_guard = DnsGuard {
        hijack: r.bool(&k("dns/hijack"), true),
        block_quic: r.bool(&k("dns/block_quic"), false),
        block_dot: r.bool(&k("dns/block_dot"), false),
        block_doh: r.list(&k("dns/block_doh"), |v| {
            v.trim()
                .parse::<IpAddr>()
                .map_err(|_| "not an IP address".to_string())
        }),
    };

    let mut services = BTreeMap::new();
    for (svc, b) in r.named_children(&k("services/"), "", "service") {
        services.insert(svc, parse_overrides(r, &b));
    }

    let mut tunnels = Vec::new();
    for (name, b) in r.named_children(&k("tunnels/"), "kind", "tunnel") {
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
        if r.str(&format!("{b}kind")).is_none() {
            r.error(
                &format!("{b}kind"),
                "",
                "required: paqet, icmptunnel, waterwall or generic",
            );
        }
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
        if kind == Some(TunnelKind::Generic)
            && command.is_none()
            && r.str(&format!("{b}command")).is_none()
        {
            r.error(
                &format!("{b}command"),
                "",
                "a generic tunnel needs a command",
            );
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

    let api_token = r.parsed(&k("api/token"), parse::parse_api_token);

    let api_tls = parse_api_tls(r, &k("api/tls/cert"), &k("api/tls/key"));

    Node {
        id: id.to_string(),
        lan,
        private_lan,
        easytier,
        tinc,
        openvpn,
        wireguard,
        bgp,
        ospf,
        clash,
        mosdns,
        dns_upstreams,
        dns_guard,
        services,
        tunnels,
        api_token,
        api_tls,
        confirm_timeout_secs: confirm_timeout(r, &k("confirm_timeout"))
            .unwrap_or(global.confirm_timeout_secs),
    }
}

/// The node API's certificate and key: both or neither (an error names the missing
/// one); each must decode as PEM (the error names the key, never the key's value).
fn parse_api_tls(r: &mut Reader<'_>, cert_key: &str, key_key: &str) -> Option<ApiTls> {
    let cert = r.parsed(cert_key, |v| {
        parse::parse_pem_certs(v).map(|_| v.to_string())
    });
    let key = r.parsed(key_key, |v| parse::parse_pem_key(v).map(|_| v.to_string()));
    let (cert_set, key_set) = (r.str(cert_key).is_some(), r.str(key_key).is_some());
    match (cert, key) {
        (Some(cert_pem), Some(key_pem)) => Some(ApiTls { cert_pem, key_pem }),
        _ => {
            if cert_set && !key_set {
                r.error(key_key, "", format!("missing: {cert_key} is set"));
            } else if key_set && !cert_set {
                r.error(cert_key, "", format!("missing: {key_key} is set"));
            }
            None
        }
    }
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
        let k = key(leaf);
        if !present && t.enable && r.str(&k).is_none() {
            r.error(&k, "", why);
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

fn parse_hosts(r: &mut Reader<'_>) -> BTreeMap<String, Vec<IpAddr>> {
    let mut out = BTreeMap::new();
    let keys: Vec<(String, String)> = r
        .snap
        .prefix("/dns/hosts/")
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (key, _) in keys {
        let name = &key["/dns/hosts/".len()..];
        match parse_hostname(name) {
            Ok(n) => {
                let addrs = r.list(&key, |v| {
                    v.parse::<IpAddr>()
                        .map_err(|_| "not an IP address".to_string())
                });
                out.insert(n, addrs);
            }
            Err(reason) => r.error(&key, name, reason),
        }
    }
    out
}

/// A DNS name for `/dns/hosts/<name>`: labels of `[A-Za-z0-9-_]`, 1-63 chars each.
pub fn parse_hostname(name: &str) -> Result<String, String> {
    let n = name.trim_end_matches('.').to_ascii_lowercase();
    if n.is_empty() || n.len() > 253 {
        return Err("host name must be 1-253 characters".into());
    }
    for label in n.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each label must be 1-63 characters".into());
        }
        if !label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err("host name may only contain letters, digits, - and _".into());
        }
    }
    Ok(n)
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

/// Check a PEM block (`-----BEGIN ... <kind>-----`); the whole value is kept.
fn pem(v: &str, kind: &str) -> Result<String, String> {
    if v.contains("-----BEGIN") && v.contains(kind) && v.contains("-----END") {
        Ok(format!("{}\n", v.trim_end()))
    } else {
        Err(format!(
            "must be inline PEM content containing `{kind}` (not a file path)"
        ))
    }
}

fn inline_block(v: &str, marker: &str) -> Result<String, String> {
    if v.contains(&format!("-----BEGIN {marker}-----")) {
        Ok(format!("{}\n", v.trim_end()))
    } else {
        Err(format!(
            "must be inline content starting with -----BEGIN {marker}-----"
        ))
    }
}

/// Checks that need more than one key.
fn cross_checks(r: &mut Reader<'_>, global: &Global, nodes: &BTreeMap<String, Node>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(keys: &[(&str, &str)]) -> Result<Config, ValidationErrors> {
        let mut snap = Snapshot::default();
        snap.0.insert("/nodes/a/lan".into(), "10.0.0.0/24".into());
        snap.0.insert("/nodes/b/lan".into(), "10.0.1.0/24".into());
        for (k, v) in keys {
            snap.0.insert((*k).to_string(), (*v).to_string());
        }
        Config::parse(&snap)
    }

    fn health(keys: &[(&str, &str)], node: &str) -> ClashHealthCheck {
        let cfg = parse(keys).expect("valid snapshot");
        cfg.node(node).expect("node").clash.health.clone()
    }

    #[test]
    fn clash_health_defaults() {
        let d = ClashHealthCheck::default();
        assert_eq!(d.url, "https://www.gstatic.com/generate_204");
        assert_eq!(
            (d.interval_secs, d.probe_interval_secs, d.timeout_ms),
            (300, 10, 5000)
        );
        let cfg = parse(&[]).expect("valid snapshot");
        assert_eq!(cfg.global.clash.health, d);
        assert_eq!(cfg.node("a").expect("a").clash.health, d);
    }

    #[test]
    fn api_tls_keys_decode_and_errors_name_the_key_not_the_secret() {
        const CERT: &str = include_str!("../../tests/data/tls/self.crt");
        const KEY: &str = include_str!("../../tests/data/tls/self.key");
        let cfg = parse(&[
            ("/nodes/a/api/tls/cert", CERT),
            ("/nodes/a/api/tls/key", KEY),
        ])
        .expect("valid snapshot");
        let tls = cfg.node("a").expect("a").api_tls.clone().expect("tls");
        assert!(tls.cert_pem.contains("BEGIN CERTIFICATE"));
        assert!(!format!("{tls:?}").contains("PRIVATE KEY"), "{tls:?}");
        assert!(cfg.node("b").expect("b").api_tls.is_none());

        let secret = "-----BEGIN PRIVATE KEY-----\nc2Vj!cmV0\n-----END PRIVATE KEY-----";
        let errs = parse(&[
            ("/nodes/a/api/tls/cert", "not pem"),
            ("/nodes/a/api/tls/key", secret),
            ("/nodes/b/api/tls/cert", CERT),
        ])
        .expect_err("bad PEM")
        .0;
        let by_key = |k: &str| errs.iter().find(|e| e.key == k).cloned();
        let cert = by_key("/nodes/a/api/tls/cert").expect("cert error");
        assert!(cert.reason.contains("no \"BEGIN CERTIFICATE\""), "{cert:?}");
        let key = by_key("/nodes/a/api/tls/key").expect("key error");
        assert_eq!(key.value, "<redacted>");
        assert!(key.reason.starts_with("not a PEM private key"), "{key:?}");
        assert!(!key.reason.contains("c2Vj"), "{key:?}");
        let missing = by_key("/nodes/b/api/tls/key").expect("missing key error");
        assert!(
            missing.reason.contains("/nodes/b/api/tls/cert is set"),
            "{missing:?}"
        );
    }

    #[test]
    fn clash_health_global_keys_apply_to_every_node() {
        let keys = [
            ("/global/clash/health/url", "http://cp.cloudflare.com/"),
            ("/global/clash/health/interval", "600"),
            ("/global/clash/health/probe_interval", "2"),
            ("/global/clash/health/timeout", "1500"),
        ];
        let want = ClashHealthCheck {
            url: "http://cp.cloudflare.com/".into(),
            interval_secs: 600,
            probe_interval_secs: 2,
            timeout_ms: 1500,
        };
        assert_eq!(health(&keys, "a"), want);
        assert_eq!(health(&keys, "b"), want);
    }

    #[test]
    fn clash_health_node_keys_are_parsed() {
        let keys = [
            (
                "/nodes/a/clash/health/url",
                "https://[2001:db8::1]:8443/204?x=1",
            ),
            ("/nodes/a/clash/health/interval", "5"),
            ("/nodes/a/clash/health/probe_interval", "3600"),
            ("/nodes/a/clash/health/timeout", "60000"),
        ];
        let want = ClashHealthCheck {
            url: "https://[2001:db8::1]:8443/204?x=1".into(),
            interval_secs: 5,
            probe_interval_secs: 3600,
            timeout_ms: 60_000,
        };
        assert_eq!(health(&keys, "a"), want);
        assert_eq!(health(&keys, "b"), ClashHealthCheck::default());
    }

    #[test]
    fn clash_health_node_key_wins_over_global_key() {
        let keys = [
            ("/global/clash/health/url", "http://cp.cloudflare.com/"),
            ("/global/clash/health/interval", "600"),
            ("/global/clash/health/probe_interval", "20"),
            ("/global/clash/health/timeout", "3000"),
            ("/nodes/a/clash/health/url", "http://captive.apple.com"),
            ("/nodes/a/clash/health/timeout", "800"),
        ];
        // Key by key: the node's keys win, its absent keys take the global values.
        assert_eq!(
            health(&keys, "a"),
            ClashHealthCheck {
                url: "http://captive.apple.com".into(),
                interval_secs: 600,
                probe_interval_secs: 20,
                timeout_ms: 800,
            }
        );
        assert_eq!(health(&keys, "b").url, "http://cp.cloudflare.com/");
        assert_eq!(health(&keys, "b").timeout_ms, 3000);
    }

    #[test]
    fn confirm_timeout_defaults_global_and_node_override() {
        let cfg = parse(&[
            ("/nodes/a/lan", "10.0.0.0/24"),
            ("/nodes/b/lan", "10.1.0.0/24"),
        ])
        .unwrap();
        assert_eq!(cfg.node("a").unwrap().confirm_timeout_secs, 90);
        let cfg = parse(&[
            ("/global/confirm_timeout", "120"),
            ("/nodes/a/confirm_timeout", "10"),
            ("/nodes/b/lan", "10.1.0.0/24"),
        ])
        .unwrap();
        assert_eq!(cfg.node("a").unwrap().confirm_timeout_secs, 10);
        assert_eq!(cfg.node("b").unwrap().confirm_timeout_secs, 120);
        for (key, value) in [
            ("/global/confirm_timeout", "9"),
            ("/nodes/a/confirm_timeout", "3601"),
            ("/nodes/a/confirm_timeout", "90s"),
        ] {
            let errs = parse(&[(key, value)]).expect_err(value);
            assert_eq!(
                (errs.0[0].key.as_str(), errs.0[0].value.as_str()),
                (key, value)
            );
        }
    }

    #[test]
    fn clash_health_invalid_values_are_refused_naming_the_key() {
        // (leaf, bad value, words of the reason)
        const CASES: &[(&str, &str, &str)] = &[
            ("url", "ftp://example.com/", "http:// or https://"),
            ("url", "www.gstatic.com/generate_204", "http:// or https://"),
            ("url", "https://", "no host"),
            ("url", "http:///generate_204", "no host"),
            ("url", "http://:80/x", "no host"),
            ("url", "https://exa mple.com/", "whitespace"),
            ("url", "https://$(reboot)/", "host may only contain"),
            ("url", "https://example.com:0/", "port"),
            ("url", "https://example.com:http/", "port"),
            ("url", "https://user@example.com/", "user information"),
            ("url", "https://[::1/", "unclosed"),
            ("url", "https://[example]/", "IPv6"),
            ("url", "https://[::1]x/", ":port"),
            ("interval", "4", "out of range 5-86400"),
            ("interval", "86401", "out of range 5-86400"),
            ("interval", "5m", "not a whole number"),
            ("probe_interval", "0", "out of range 1-3600"),
            ("probe_interval", "3601", "out of range 1-3600"),
            ("probe_interval", "-1", "not a whole number"),
            ("timeout", "99", "out of range 100-60000"),
            ("timeout", "60001", "out of range 100-60000"),
            ("timeout", "1.5", "not a whole number"),
        ];
        for base in ["/global/", "/nodes/a/"] {
            for (leaf, value, reason) in CASES {
                let key = format!("{base}clash/health/{leaf}");
                let errs = parse(&[(&key, value)]).expect_err(&format!("{key} = {value:?}"));
                assert_eq!(errs.0.len(), 1, "{key} = {value:?}: {errs}");
                let e = &errs.0[0];
                assert_eq!((e.key.as_str(), e.value.as_str()), (key.as_str(), *value));
                assert!(
                    e.reason.contains(reason),
                    "{key} = {value:?}: reason {:?} lacks {reason:?}",
                    e.reason
                );
            }
        }
    }
}
