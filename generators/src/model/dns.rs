//! DNS: `/global/mosdns/*`, the upstream groups (global and per node), each node's
//! MosDNS and DNS guard keys, and `/dns/hosts/<name>`.
//!
//! Owns: those keys' types, defaults and validation, and the predecessor's default
//! upstreams. Must not: write MosDNS's configuration (`gen::mosdns`) or build the
//! frontend's plan (`render::dns_plan`).

use crate::parse::{self, Reader};
use crate::plan::dns::{Failover, HealthCheck, UpstreamGroup};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct MosdnsGlobal {
    /// `/global/mosdns/rule_files`: relative path → URL.
    pub rule_files: BTreeMap<String, String>,
    /// `/global/mosdns/plugins`: YAML list of plugins.
    pub plugins: Option<Vec<serde_norway::Value>>,
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

/// `/global/mosdns/*`.
pub(super) fn parse_mosdns_global(r: &mut Reader<'_>) -> MosdnsGlobal {
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
    MosdnsGlobal {
        rule_files,
        plugins,
    }
}

/// `/nodes/<id>/mosdns/*` (`p` is `/nodes/<id>/`).
pub(super) fn parse_mosdns(r: &mut Reader<'_>, p: &str) -> Mosdns {
    let k = |s: &str| format!("{p}{s}");
    Mosdns {
        enable: r.bool(&k("mosdns/enable"), false),
        refresh_minutes: r.u32_in(&k("mosdns/refresh"), 5, 43_200).unwrap_or(1440),
    }
}

/// `/nodes/<id>/dns/*` besides the upstreams (`p` is `/nodes/<id>/`).
pub(super) fn parse_dns_guard(r: &mut Reader<'_>, p: &str) -> DnsGuard {
    let k = |s: &str| format!("{p}{s}");
    DnsGuard {
        hijack: r.bool(&k("dns/hijack"), true),
        block_quic: r.bool(&k("dns/block_quic"), false),
        block_dot: r.bool(&k("dns/block_dot"), false),
        block_doh: r.list(&k("dns/block_doh"), |v| {
            v.trim()
                .parse::<IpAddr>()
                .map_err(|_| "not an IP address".to_string())
        }),
    }
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

pub(super) fn parse_upstreams(r: &mut Reader<'_>, prefix: &str) -> BTreeMap<String, UpstreamGroup> {
    let mut out = BTreeMap::new();
    for (name, base) in r.named_children(prefix, "addresses", "upstream") {
        let k = |s: &str| format!("{base}{s}");
        let addresses = r.list(&k("addresses"), parse::parse_dns_addr);
        if addresses.is_empty() {
            r.require(
                &k("addresses"),
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

pub(super) fn parse_hosts(r: &mut Reader<'_>) -> BTreeMap<String, Vec<IpAddr>> {
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
