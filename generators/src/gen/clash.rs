//! mihomo (Clash Meta): `/etc/mihomo/config.yaml` and the `mihomo` service.
//!
//! The file is `/global/clash/base` (optional) with the active subscription added as an
//! HTTP proxy provider stored inside mihomo's home (mihomo refuses provider paths
//! outside `-d`), then the keys meduza depends on are enforced, whatever the base says:
//! the ports (`mixed-port` 7890 for rule downloads, `tproxy-port` 7893 for the data
//! plane), `allow-lan`, the controller and its secret (the health checks and the
//! subscription refresh use them), `routing-mark` (so mihomo's own traffic can be told
//! apart), the DNS listener `127.0.0.1:1053` (the DNS frontend's chain), and the three
//! settings the predecessor always enforced (`find-process-mode: off`,
//! `unified-delay: true`, `geodata-loader: standard`).
//!
//! When the base defines no `proxy-groups`/`rules`, a `PROXY` url-test group over the
//! subscription and `MATCH,PROXY` are added, so a subscription alone gives a working
//! proxy whose health (every URLTest group's `now`) can be checked. The provider's
//! health check and that group use the node's `clash/health/*` URL, interval and
//! timeout ([`crate::model::ClashHealthCheck`]).
//!
//! The file holds the API secret: mode 0600. The secret is `/nodes/<id>/clash/secret`,
//! else the per-node secret the daemon generated ([`RenderEnv::clash_secret`]); there is
//! no public default.

use super::yaml::{map, s};
use super::{apply_service_overrides, header_hash, service, upstream_urls, MODE_SECRET};
use crate::error::ValidationError;
use crate::model::{Config, Node};
use crate::output::{ClashRuntime, DomainOutput, FileOut, RenderEnv};
use crate::plan::dns::CLASH_DNS_ADDR;
use crate::plan::service::ReloadStrategy;
use crate::plan::tproxy::TPROXY_PORT;
use serde_norway::{Mapping, Value};

pub const SERVICE: &str = "mihomo";
pub const HOME_DIR: &str = "/etc/mihomo";
pub const CONFIG_PATH: &str = "/etc/mihomo/config.yaml";
/// mihomo's HTTP+SOCKS listener (rule downloads go through it, DESIGN §9).
pub const MIXED_PORT: u16 = 7890;
/// `routing-mark` of mihomo's own outbound sockets.
pub const ROUTING_MARK: u32 = 255;
/// Name of the default group added when the base defines none.
pub const DEFAULT_GROUP: &str = "PROXY";

/// The secret in effect on `node`, or the error naming the key when there is none.
pub fn secret(node: &Node, env: &RenderEnv) -> Result<String, ValidationError> {
    match &node.clash.secret {
        Some(s) => Ok(s.clone()),
        None if !env.clash_secret.is_empty() => Ok(env.clash_secret.clone()),
        None => Err(ValidationError::new(
            format!("/nodes/{}/clash/secret", node.id),
            "",
            "no secret: set this key or let the daemon generate one",
        )),
    }
}

/// The active subscription `(name, url)`.
pub fn subscription(cfg: &Config, node: &Node) -> Option<(String, String)> {
    let name = node.clash.active_subscription.as_ref()?;
    let url = cfg.global.clash.subscriptions.get(name)?;
    Some((name.clone(), url.clone()))
}

fn provider_rel(name: &str) -> String {
    format!("./providers/{name}.yaml")
}

/// The merged configuration as a YAML mapping.
pub fn config_mapping(cfg: &Config, node: &Node, secret: &str) -> Mapping {
    let mut m = cfg.global.clash.base.clone().unwrap_or_default();
    for (k, v) in [("mode", "rule"), ("log-level", "info")] {
        if !m.contains_key(k) {
            m.insert(s(k), s(v));
        }
    }
    let health = &node.clash.health;
    if let Some((name, url)) = subscription(cfg, node) {
        // No `interval`: mihomo fetches the provider itself only when the file is
        // missing (first start). The periodic refresh is meduza's own
        // (`refresh/interval_minutes`): through the mixed port while mihomo is
        // healthy, validated, the last good file kept on failure. An interval here
        // would add a second, direct, unvalidated download that overwrites it.
        let mut provider = vec![
            ("type", s("http")),
            ("url", s(&url)),
            ("path", s(&provider_rel(&name))),
        ];
        provider.push((
            "health-check",
            map(vec![
                ("enable", Value::Bool(true)),
                ("url", s(&health.url)),
                ("interval", Value::from(health.interval_secs)),
                // Milliseconds (mihomo's provider `health-check.timeout`).
                ("timeout", Value::from(health.timeout_ms)),
            ]),
        ));
        let mut providers = match m.get("proxy-providers") {
            Some(Value::Mapping(p)) => p.clone(),
            _ => Mapping::new(),
        };
        providers.insert(s(&name), map(provider));
        m.insert(s("proxy-providers"), Value::Mapping(providers));
        if !m.contains_key("proxy-groups") {
            m.insert(
                s("proxy-groups"),
                Value::Sequence(vec![map(vec![
                    ("name", s(DEFAULT_GROUP)),
                    ("type", s("url-test")),
                    ("use", Value::Sequence(vec![s(&name)])),
                    ("url", s(&health.url)),
                    ("interval", Value::from(health.interval_secs)),
                    ("timeout", Value::from(health.timeout_ms)),
                ])]),
            );
            if !m.contains_key("rules") {
                m.insert(
                    s("rules"),
                    Value::Sequence(vec![s(&format!("MATCH,{DEFAULT_GROUP}"))]),
                );
            }
        }
    }
    let enforced: Vec<(&str, Value)> = vec![
        ("mixed-port", Value::from(MIXED_PORT)),
        ("tproxy-port", Value::from(TPROXY_PORT)),
        ("allow-lan", Value::Bool(true)),
        ("find-process-mode", s("off")),
        ("unified-delay", Value::Bool(true)),
        ("geodata-loader", s("standard")),
        ("routing-mark", Value::from(ROUTING_MARK)),
        ("external-controller", s(&node.clash.controller.to_string())),
        ("secret", s(secret)),
    ];
    for (k, v) in enforced {
        m.insert(s(k), v);
    }
    let mut dns = match m.get("dns") {
        Some(Value::Mapping(d)) => d.clone(),
        _ => Mapping::new(),
    };
    dns.insert(s("enable"), Value::Bool(true));
    dns.insert(s("listen"), s(CLASH_DNS_ADDR));
    if !dns.contains_key("nameserver") {
        let servers: Vec<Value> = upstream_urls(cfg, node).iter().map(|u| s(u)).collect();
        dns.insert(s("nameserver"), Value::Sequence(servers));
    }
    m.insert(s("dns"), Value::Mapping(dns));
    m
}

/// The file, the `mihomo` service and the runtime facts of an enabled Clash.
pub fn render(
    cfg: &Config,
    node: &Node,
    env: &RenderEnv,
) -> Result<(DomainOutput, ClashRuntime), ValidationError> {
    let secret = secret(node, env)?;
    let yaml = serde_norway::to_string(&config_mapping(cfg, node, &secret)).map_err(|e| {
        ValidationError::new(
            "/global/clash/base",
            "",
            format!("cannot be re-encoded: {e}"),
        )
    })?;
    let content = format!("{}{yaml}", header_hash(&node.id, "clash"));
    let svc = service(
        SERVICE,
        vec![
            env.bins.mihomo.clone(),
            "-d".into(),
            HOME_DIR.into(),
            "-f".into(),
            CONFIG_PATH.into(),
        ],
        &["CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"],
        vec![CONFIG_PATH.into()],
        ReloadStrategy::Sighup,
    );
    let sub = subscription(cfg, node);
    let runtime = ClashRuntime {
        mode: node.clash.mode,
        controller: node.clash.controller,
        secret,
        provider_path: sub
            .as_ref()
            .map(|(name, _)| format!("{HOME_DIR}/providers/{name}.yaml"))
            .unwrap_or_default(),
        subscription: sub,
        refresh_minutes: node
            .clash
            .refresh_enable
            .then_some(node.clash.refresh_interval_minutes),
        config_path: CONFIG_PATH.into(),
        home_dir: HOME_DIR.into(),
        health: node.clash.health.clone(),
    };
    Ok((
        DomainOutput {
            files: vec![FileOut::new(CONFIG_PATH, content, MODE_SECRET)],
            services: vec![apply_service_overrides(node, svc)?],
        },
        runtime,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ClashHealthCheck;
    use crate::output::Bins;
    use crate::snapshot::Snapshot;

    const EXAMPLE: &str = include_str!("../../../docs/examples/three-nodes.json");

    fn render_gw_a(overrides: &[(&str, &str)]) -> (Mapping, ClashRuntime) {
        let mut snap = Snapshot::from_json(EXAMPLE).expect("example is JSON");
        for (k, v) in overrides {
            snap.0.insert((*k).to_string(), (*v).to_string());
        }
        let cfg = Config::parse(&snap).expect("example validates");
        let node = cfg.node("gw-a").expect("gw-a");
        let env = RenderEnv {
            default_gw: None,
            clash_secret: "generated-secret-0123456789".into(),
            bins: Bins::default(),
        };
        let (_, runtime) = render(&cfg, node, &env).expect("renders");
        (config_mapping(&cfg, node, &runtime.secret), runtime)
    }

    fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
        path.iter().fold(v, |v, k| &v[*k])
    }

    #[test]
    fn health_checks_use_the_nodes_health_settings() {
        let (m, runtime) = render_gw_a(&[
            ("/global/clash/health/url", "http://cp.cloudflare.com/"),
            ("/global/clash/health/interval", "600"),
            ("/nodes/gw-a/clash/health/timeout", "2500"),
            ("/nodes/gw-a/clash/health/probe_interval", "3"),
        ]);
        let m = Value::Mapping(m);
        let hc = at(&m, &["proxy-providers", "main", "health-check"]);
        assert_eq!(hc["url"], s("http://cp.cloudflare.com/"));
        assert_eq!(hc["interval"], Value::from(600));
        assert_eq!(hc["timeout"], Value::from(2500));
        let group = &m["proxy-groups"][0];
        assert_eq!(group["name"], s(DEFAULT_GROUP));
        assert_eq!(group["url"], s("http://cp.cloudflare.com/"));
        assert_eq!(group["interval"], Value::from(600));
        assert_eq!(group["timeout"], Value::from(2500));
        assert_eq!(
            runtime.health,
            ClashHealthCheck {
                url: "http://cp.cloudflare.com/".into(),
                interval_secs: 600,
                probe_interval_secs: 3,
                timeout_ms: 2500,
            }
        );
    }

    #[test]
    fn health_checks_default_without_keys() {
        let (m, runtime) = render_gw_a(&[]);
        let m = Value::Mapping(m);
        let hc = at(&m, &["proxy-providers", "main", "health-check"]);
        assert_eq!(hc["url"], s(ClashHealthCheck::DEFAULT_URL));
        assert_eq!(
            hc["interval"],
            Value::from(ClashHealthCheck::DEFAULT_INTERVAL_SECS)
        );
        assert_eq!(
            hc["timeout"],
            Value::from(ClashHealthCheck::DEFAULT_TIMEOUT_MS)
        );
        assert_eq!(runtime.health, ClashHealthCheck::default());
    }
}
