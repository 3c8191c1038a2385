//! The predecessor's generator interface, kept for debugging (`meduza gen <tool>`).
//!
//! Input: `{"node_id": ID, "node": {key: value}, "global": {key: value},
//! "all_nodes": {key: value}}` with full etcd keys (`/nodes/<id>/...`, `/global/...`;
//! `/dns/hosts/...` and `/fleet/...` keys are accepted in any of the maps). Two optional
//! fields stand in for the daemon's environment: `"clash_secret"` (used when
//! `/nodes/<id>/clash/secret` is absent) and `"default_gw"`.
//!
//! Output: one JSON object per tool, in the predecessor's field names
//! (`config_text`, `config_yaml`, `args`, `instances`, `files`, `tproxy_exclude`, `mode`,
//! `refresh_enable`, `refresh_interval_minutes`, `api_controller`), plus
//! `"enabled": false` when the tool is not wanted on the node. Errors are returned as
//! text listing every invalid key.

use crate::model::Config;
use crate::render::{render_node, Bins, Domain, DomainOutput, RenderEnv, Rendered};
use crate::snapshot::Snapshot;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Tools `gen_legacy` knows.
pub const TOOLS: [&str; 8] = [
    "easytier",
    "tinc",
    "openvpn",
    "wireguard",
    "frr",
    "clash",
    "mosdns",
    "hosts",
];

#[derive(serde::Deserialize)]
struct Input {
    node_id: String,
    #[serde(default)]
    node: BTreeMap<String, String>,
    #[serde(default)]
    global: BTreeMap<String, String>,
    #[serde(default)]
    all_nodes: BTreeMap<String, String>,
    #[serde(default)]
    clash_secret: Option<String>,
    #[serde(default)]
    default_gw: Option<IpAddr>,
}

/// Run one generator on the predecessor's JSON input; returns the output JSON text.
pub fn gen_legacy(tool: &str, input_json: &str) -> Result<String, String> {
    if !TOOLS.contains(&tool) {
        return Err(format!(
            "unknown tool `{tool}` (expected one of: {})",
            TOOLS.join(", ")
        ));
    }
    let input: Input =
        serde_json::from_str(input_json).map_err(|e| format!("input is not valid: {e}"))?;
    let mut keys = input.all_nodes;
    keys.extend(input.global);
    keys.extend(input.node);
    let cfg = Config::parse(&Snapshot(keys)).map_err(|e| {
        e.0.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    let env = RenderEnv {
        default_gw: input.default_gw,
        clash_secret: input.clash_secret.unwrap_or_default(),
        bins: Bins::default(),
    };
    let r = render_node(&cfg, &input.node_id, &env).map_err(|e| e.to_string())?;
    let out = match tool {
        "easytier" => single(&r, &Domain::Easytier, "config_text"),
        "tinc" => single(&r, &Domain::Tinc, "config_text"),
        "frr" => single(&r, &Domain::Frr, "config_text"),
        "hosts" => single(&r, &Domain::Hosts, "config_text"),
        "openvpn" => instances(&r, |d| matches!(d, Domain::Openvpn(_)), |_| None),
        "wireguard" => instances(
            &r,
            |d| matches!(d, Domain::Wireguard(_)),
            |name| {
                r.wireguard
                    .iter()
                    .find(|w| w.name == name)
                    .and_then(|w| serde_json::to_value(w).ok())
            },
        ),
        "clash" => clash(&r),
        "mosdns" => mosdns(&r),
        other => return Err(format!("unknown tool `{other}`")),
    };
    serde_json::to_string_pretty(&out).map_err(|e| format!("cannot encode output: {e}"))
}

fn files_json(d: &DomainOutput) -> Value {
    Value::Array(
        d.files
            .iter()
            .map(|f| json!({"path": f.path, "content": f.content, "mode": f.mode}))
            .collect(),
    )
}

/// `argv[1..]` of the domain's first service.
fn args_json(d: &DomainOutput) -> Value {
    d.services
        .first()
        .map(|s| json!(s.argv[1..].to_vec()))
        .unwrap_or_else(|| json!([]))
}

/// The fields every legacy domain object has: the main file's (the first) text under
/// `text_field`, then `args` and `files`.
fn insert_domain_fields(o: &mut Map<String, Value>, text_field: &str, d: &DomainOutput) {
    let text = d.files.first().map(|f| f.content.clone());
    o.insert(text_field.into(), json!(text.unwrap_or_default()));
    o.insert("args".into(), args_json(d));
    o.insert("files".into(), files_json(d));
}

fn disabled() -> Value {
    json!({"enabled": false})
}

fn single(r: &Rendered, domain: &Domain, text_field: &str) -> Value {
    let Some(d) = r.domains.get(domain) else {
        return disabled();
    };
    enabled(d, text_field, json!({}))
}

/// An enabled single-instance domain: `enabled`, the main file's text under
/// `text_field`, `args`, `files`, then the fields of `extra` (an object).
fn enabled(d: &DomainOutput, text_field: &str, extra: Value) -> Value {
    let mut o = Map::new();
    o.insert("enabled".into(), Value::Bool(true));
    insert_domain_fields(&mut o, text_field, d);
    if let Value::Object(extra) = extra {
        o.extend(extra);
    }
    Value::Object(o)
}

fn instances(
    r: &Rendered,
    pick: impl Fn(&Domain) -> bool,
    extra: impl Fn(&str) -> Option<Value>,
) -> Value {
    let mut list = Vec::new();
    let mut all_files = Vec::new();
    for (domain, d) in r.domains.iter().filter(|(k, _)| pick(k)) {
        let name = match domain {
            Domain::Openvpn(n) | Domain::Wireguard(n) => n.clone(),
            _ => continue,
        };
        let mut o = Map::new();
        o.insert("name".into(), json!(name));
        insert_domain_fields(&mut o, "config_text", d);
        if let Some(Value::Object(x)) = extra(&name) {
            // The device plan, without its private key.
            for (k, v) in x {
                if k != "private_key" {
                    o.insert(k, v);
                }
            }
        }
        if let Value::Array(f) = files_json(d) {
            all_files.extend(f);
        }
        list.push(Value::Object(o));
    }
    json!({"enabled": !list.is_empty(), "instances": list, "files": all_files})
}

fn clash(r: &Rendered) -> Value {
    let (Some(d), Some(c)) = (r.domains.get(&Domain::Clash), &r.clash) else {
        return disabled();
    };
    let t = r.tproxy.clone().unwrap_or_default();
    let extra = json!({
        "mode": c.mode,
        "refresh_enable": c.refresh_minutes.is_some(),
        "refresh_interval_minutes": c.refresh_minutes,
        "api_controller": c.controller.to_string(),
        "subscription": c.subscription.as_ref().map(|(n, u)| json!({"name": n, "url": u})),
        "tproxy_targets": t.proxy_src,
        "tproxy_exclude": t.exclude_src,
        "tproxy_exclude_ifaces": t.exclude_ifaces,
        "tproxy_exclude_ports": t.exclude_ports,
    });
    enabled(d, "config_yaml", extra)
}

fn mosdns(r: &Rendered) -> Value {
    let (Some(d), Some(m)) = (r.domains.get(&Domain::Mosdns), &r.mosdns) else {
        return disabled();
    };
    let extra = json!({
        "rule_files": m.rule_files,
        "refresh_minutes": m.refresh_minutes,
    });
    enabled(d, "config_yaml", extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_tool_is_refused() {
        assert!(gen_legacy("dnsmasq", "{}")
            .unwrap_err()
            .contains("unknown tool"));
    }

    #[test]
    fn hosts_from_predecessor_input() {
        let input = r#"{"node_id":"a","node":{"/nodes/a/lan":"10.42.1.0/24"},
            "global":{"/dns/hosts/db.example.com":"192.168.1.101\n192.168.1.100"},"all_nodes":{}}"#;
        let out: Value = serde_json::from_str(&gen_legacy("hosts", input).unwrap()).unwrap();
        assert_eq!(
            out["config_text"],
            "192.168.1.100\tdb.example.com\n192.168.1.101\tdb.example.com\n"
        );
        assert_eq!(out["files"][0]["path"], "/etc/etcd_hosts");
    }

    #[test]
    fn disabled_tool_says_so() {
        let input = r#"{"node_id":"a","node":{"/nodes/a/lan":"10.42.1.0/24"}}"#;
        let out: Value = serde_json::from_str(&gen_legacy("clash", input).unwrap()).unwrap();
        assert_eq!(out, json!({"enabled": false}));
    }

    #[test]
    fn invalid_keys_are_all_listed() {
        let input = r#"{"node_id":"a","node":{"/nodes/a/lan":"x","/nodes/a/tinc/port":"0"}}"#;
        let err = gen_legacy("tinc", input).unwrap_err();
        assert!(err.contains("/nodes/a/lan"), "{err}");
        assert!(err.contains("/nodes/a/tinc/port"), "{err}");
    }

    #[test]
    fn missing_node_is_an_error_naming_it() {
        let err = gen_legacy("frr", r#"{"node_id":"zz"}"#).unwrap_err();
        assert!(err.contains("/nodes/zz/"), "{err}");
    }
}
