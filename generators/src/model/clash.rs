//! Clash (mihomo): `/global/clash/*` (the base config, subscriptions, health checks,
//! the fake-IP ranges the base implies) and `/nodes/<id>/clash/*`.
//!
//! Owns: the Clash keys' types, defaults and validation. Must not: write mihomo's
//! configuration (`gen::clash`).

use super::Global;
use crate::parse::{self, Reader};
use ipnet::IpNet;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;

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

/// `/global/clash/*`.
pub(super) fn parse_clash_global(r: &mut Reader<'_>) -> ClashGlobal {
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
            None => r.require(&key, "subscription needs a url"),
        }
    }
    ClashGlobal {
        base,
        subscriptions,
        health,
        fake_ip,
    }
}

/// `/nodes/<id>/clash/*` (`p` is `/nodes/<id>/`); the health keys fall back to the
/// global ones.
pub(super) fn parse_clash(r: &mut Reader<'_>, p: &str, global: &Global) -> Clash {
    let k = |s: &str| format!("{p}{s}");
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
        health: parse_clash_health(r, p, &global.clash.health),
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
    clash
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
