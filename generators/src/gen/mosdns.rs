//! MosDNS v5: `/etc/mosdns/config.yaml` and the `mosdns` service.
//!
//! MosDNS decodes its config with unknown keys fatal, so only `log` and `plugins` are
//! written. Plugins are `/global/mosdns/plugins` in order; when none is configured, a
//! `forward` to the node's enabled upstream groups and a `sequence` running it are
//! used. Servers: unless the plugins define a `udp_server` (resp. `tcp_server`) of
//! their own, one listening on `127.0.0.1:1153` is appended with `entry` = the *last*
//! `sequence` plugin (the contract: the last sequence is the main pipeline). Plugins
//! defining their own servers must listen on `127.0.0.1:1153`, where the DNS frontend
//! forwards.
//!
//! Rule files (`/global/mosdns/rule_files`) are downloaded by the daemon to
//! `/etc/mosdns/<path>` before MosDNS starts; plugins refer to them by that path (or
//! relative to the working directory `/etc/mosdns`). MosDNS has no reload signal, so
//! any change restarts it.

use super::yaml::{map, s};
use super::{apply_service_overrides, header_hash, service, upstream_urls, MODE_PUBLIC};
use crate::error::ValidationError;
use crate::model::{Config, Node};
use crate::output::{DomainOutput, FileOut, MosdnsRuntime, RenderEnv};
use crate::plan::dns::MOSDNS_ADDR;
use crate::plan::service::ReloadStrategy;
use serde_norway::Value;
use std::collections::BTreeMap;

pub const SERVICE: &str = "mosdns";
pub const WORK_DIR: &str = "/etc/mosdns";
pub const CONFIG_PATH: &str = "/etc/mosdns/config.yaml";
const KEY_PLUGINS: &str = "/global/mosdns/plugins";

fn plugin_str<'a>(p: &'a Value, field: &str) -> Option<&'a str> {
    p.get(field).and_then(Value::as_str)
}

/// Absolute path of a rule file (`a/b.txt` or `/etc/mosdns/a/b.txt` → `/etc/mosdns/a/b.txt`).
pub fn rule_file_path(path: &str) -> String {
    format!(
        "{WORK_DIR}/{}",
        path.trim_start_matches("/etc/mosdns/")
            .trim_start_matches("./")
    )
}

/// Rule files to download: absolute path → URL.
pub fn rule_files(cfg: &Config) -> BTreeMap<String, String> {
    cfg.global
        .mosdns
        .rule_files
        .iter()
        .map(|(p, u)| (rule_file_path(p), u.clone()))
        .collect()
}

/// The default plugins: forward to the node's enabled upstream groups.
fn default_plugins(cfg: &Config, node: &Node) -> Vec<Value> {
    let upstreams: Vec<Value> = upstream_urls(cfg, node)
        .iter()
        .map(|u| map(vec![("addr", s(u))]))
        .collect();
    vec![
        map(vec![
            ("tag", s("meduza_forward")),
            ("type", s("forward")),
            ("args", map(vec![("upstreams", Value::Sequence(upstreams))])),
        ]),
        map(vec![
            ("tag", s("meduza_main")),
            ("type", s("sequence")),
            (
                "args",
                Value::Sequence(vec![map(vec![("exec", s("$meduza_forward"))])]),
            ),
        ]),
    ]
}

/// The plugin list with the servers appended when missing.
pub fn plugins(cfg: &Config, node: &Node) -> Result<Vec<Value>, ValidationError> {
    let mut plugins = cfg
        .global
        .mosdns
        .plugins
        .clone()
        .unwrap_or_else(|| default_plugins(cfg, node));
    let has = |t: &str| plugins.iter().any(|p| plugin_str(p, "type") == Some(t));
    let missing: Vec<&str> = ["udp_server", "tcp_server"]
        .into_iter()
        .filter(|t| !has(t))
        .collect();
    if missing.is_empty() {
        return Ok(plugins);
    }
    let entry = plugins
        .iter()
        .rev()
        .find(|p| plugin_str(p, "type") == Some("sequence"))
        .and_then(|p| plugin_str(p, "tag"))
        .map(str::to_string)
        .ok_or_else(|| {
            ValidationError::new(
                KEY_PLUGINS,
                "",
                "needs a sequence plugin (the servers' entry) or its own udp_server and tcp_server",
            )
        })?;
    for t in missing {
        let tag = format!("meduza_{t}");
        if plugins.iter().any(|p| plugin_str(p, "tag") == Some(&tag)) {
            return Err(ValidationError::new(
                KEY_PLUGINS,
                tag,
                "this tag is reserved for the server meduza adds",
            ));
        }
        plugins.push(map(vec![
            ("tag", s(&tag)),
            ("type", s(t)),
            (
                "args",
                map(vec![("entry", s(&entry)), ("listen", s(MOSDNS_ADDR))]),
            ),
        ]));
    }
    Ok(plugins)
}

/// The file, the `mosdns` service and the runtime facts of an enabled MosDNS.
pub fn render(
    cfg: &Config,
    node: &Node,
    env: &RenderEnv,
) -> Result<(DomainOutput, MosdnsRuntime), ValidationError> {
    let doc = map(vec![
        ("log", map(vec![("level", s("info"))])),
        ("plugins", Value::Sequence(plugins(cfg, node)?)),
    ]);
    let yaml = serde_norway::to_string(&doc)
        .map_err(|e| ValidationError::new(KEY_PLUGINS, "", format!("cannot be re-encoded: {e}")))?;
    let content = format!("{}{yaml}", header_hash(&node.id, "mosdns"));
    let rules = rule_files(cfg);
    let mut config_files = vec![CONFIG_PATH.to_string()];
    config_files.extend(rules.keys().cloned());
    let mut svc = service(
        SERVICE,
        vec![
            env.bins.mosdns.clone(),
            "start".into(),
            "-c".into(),
            CONFIG_PATH.into(),
            "-d".into(),
            WORK_DIR.into(),
        ],
        &[],
        config_files,
        ReloadStrategy::Restart,
    );
    if node.clash.enable {
        svc.after.push(super::clash::SERVICE.into());
    }
    Ok((
        DomainOutput {
            files: vec![FileOut::new(CONFIG_PATH, content, MODE_PUBLIC)],
            services: vec![apply_service_overrides(node, svc)?],
        },
        MosdnsRuntime {
            rule_files: rules,
            refresh_minutes: node.mosdns.refresh_minutes,
        },
    ))
}
