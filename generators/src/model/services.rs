//! Per-service overrides: `/nodes/<id>/services/<svc>/{health,restart}/*`, also read
//! under each tunnel.
//!
//! Owns: the override keys' types and validation. Must not: decide how an override
//! changes a service (`gen::apply_overrides`).

use crate::parse::{self, Reader};
use serde::Serialize;
use std::collections::BTreeMap;

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

/// Every `/nodes/<id>/services/<svc>/` (`p` is `/nodes/<id>/`).
pub(super) fn parse_services(r: &mut Reader<'_>, p: &str) -> BTreeMap<String, ServiceOverrides> {
    let mut services = BTreeMap::new();
    for (svc, b) in r.named_children(&format!("{p}services/"), "", "service") {
        services.insert(svc, parse_overrides(r, &b));
    }
    services
}

pub(super) fn parse_overrides(r: &mut Reader<'_>, base: &str) -> ServiceOverrides {
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
