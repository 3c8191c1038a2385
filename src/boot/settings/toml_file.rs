//! The `/etc/meduza/meduza.toml` layer of the settings: its schema ([`TomlFile`],
//! unknown keys refused) and its values. Must not: read the file (the caller passes
//! its text).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::values::*;
use super::{Origin, SettingsError, SettingsLayer, Tool};

impl SettingsLayer {
    /// The `/etc/meduza/meduza.toml` layer. Unknown keys are errors (a typo must not
    /// silently fall back to a default). `path` only labels errors.
    pub fn from_toml(text: &str, path: &str) -> Result<Self, SettingsError> {
        let raw: TomlFile = toml::from_str(text).map_err(|e| SettingsError::Toml {
            path: path.to_string(),
            reason: e.to_string(),
        })?;
        let o = Origin::Toml;
        let mut l = SettingsLayer::default();
        if let Some(v) = raw.node_id {
            l.node_id = Some(parse_node_id(o, "node_id", &v)?);
        }
        if let Some(v) = raw.etcd_endpoints {
            l.etcd_endpoints = Some(parse_endpoints(o, "etcd_endpoints", v.items())?);
        }
        for (key, src, dst) in [
            ("etcd_ca", raw.etcd_ca, &mut l.etcd_ca),
            ("etcd_cert", raw.etcd_cert, &mut l.etcd_cert),
            ("etcd_key", raw.etcd_key, &mut l.etcd_key),
            ("root", raw.root, &mut l.root),
            ("state_dir", raw.state_dir, &mut l.state_dir),
        ] {
            if let Some(v) = src {
                *dst = Some(parse_abs_path(o, key, &v)?);
            }
        }
        l.etcd_user = raw.etcd_user;
        l.etcd_pass = raw.etcd_pass;
        if let Some(v) = raw.default_gw {
            l.default_gw = Some(parse_ip(o, "default_gw", &v)?);
        }
        if let Some(v) = raw.state_device {
            l.state_device = Some(parse_state_device(o, "state_device", &v)?);
        }
        if let Some(v) = raw.dns_listen {
            l.dns_listen = Some(parse_sockets(o, "dns_listen", v.items())?);
        }
        if let Some(v) = raw.api_listen {
            l.api_listen = Some(parse_socket(o, "api_listen", &v)?);
        }
        if let Some(v) = raw.api_tls_cert {
            l.api_tls_cert = Some(parse_abs_path(o, "api_tls_cert", &v)?);
        }
        if let Some(v) = raw.api_tls_key {
            l.api_tls_key = Some(parse_abs_path(o, "api_tls_key", &v)?);
        }
        if let Some(v) = raw.dataplane {
            l.dataplane = Some(parse_dataplane(o, "dataplane", &v)?);
        }
        l.boot = raw.boot;
        if let Some(v) = raw.watchdog {
            l.watchdog = Some(parse_watchdog(o, "watchdog", &v)?);
        }
        if let Some(v) = raw.watchdog_timeout {
            l.watchdog_timeout = Some(parse_watchdog_timeout(
                o,
                "watchdog_timeout",
                &v.to_string(),
            )?);
        }
        if let Some(v) = raw.resolv_conf {
            l.resolv_conf = Some(parse_resolv_conf(o, "resolv_conf", &v)?);
        }
        for (name, path) in raw.bin {
            let key = format!("bin.{name}");
            if retired_tool(&name, &key) {
                continue;
            }
            let tool = Tool::ALL
                .into_iter()
                .find(|t| t.toml_key() == name)
                .ok_or_else(|| invalid(o, &key, &path, "unknown tool"))?;
            l.bins.insert(tool, parse_abs_path(o, &key, &path)?);
        }
        Ok(l)
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    /// The items: a string's comma-separated parts, or the list's entries.
    fn items(&self) -> Vec<&str> {
        match self {
            StringOrList::One(s) => s.split(',').collect(),
            StringOrList::Many(items) => items.iter().map(String::as_str).collect(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlFile {
    node_id: Option<String>,
    etcd_endpoints: Option<StringOrList>,
    etcd_ca: Option<String>,
    etcd_cert: Option<String>,
    etcd_key: Option<String>,
    etcd_user: Option<String>,
    etcd_pass: Option<String>,
    default_gw: Option<String>,
    root: Option<String>,
    state_dir: Option<String>,
    state_device: Option<String>,
    dns_listen: Option<StringOrList>,
    api_listen: Option<String>,
    api_tls_cert: Option<String>,
    api_tls_key: Option<String>,
    dataplane: Option<String>,
    boot: Option<bool>,
    watchdog: Option<String>,
    watchdog_timeout: Option<u32>,
    resolv_conf: Option<String>,
    #[serde(default)]
    bin: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::super::{none, resolve_settings, Dataplane, DEFAULT_WATCHDOG_TIMEOUT};
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn toml_rejects_unknown_keys_and_bad_types() {
        let err =
            SettingsLayer::from_toml("nodeid = \"x\"\n", "/etc/meduza/meduza.toml").unwrap_err();
        assert!(matches!(err, SettingsError::Toml { ref path, ref reason }
            if path == "/etc/meduza/meduza.toml" && reason.contains("nodeid")));
        assert!(SettingsLayer::from_toml("api_listen = 9100\n", "t").is_err());
        assert!(SettingsLayer::from_toml("[bin]\nnginx = \"/x\"\n", "t").is_err());
    }
    #[test]
    fn toml_accepts_strings_or_lists() {
        let t = SettingsLayer::from_toml(
            "etcd_endpoints = \"http://a:2379,http://b:2379\"\n\
             dns_listen = [\"0.0.0.0:53\", \"[::]:5353\"]\nstate_device = \"none\"\nboot = true\n",
            "t",
        )
        .unwrap();
        let s = resolve_settings(&none(), &none(), &t, &none(), Some("h")).unwrap();
        assert_eq!(s.etcd_endpoints, vec!["http://a:2379", "http://b:2379"]);
        assert_eq!(s.dns_listen.len(), 2);
        assert_eq!(
            s.state_device, None,
            "\"none\" disables the state partition"
        );
        assert!(s.boot);
    }
    #[test]
    fn shipped_defaults_file_parses() {
        let text = include_str!("../../../overlay/etc/meduza/meduza.toml");
        let t = SettingsLayer::from_toml(text, "overlay/etc/meduza/meduza.toml").unwrap();
        let s = resolve_settings(&none(), &none(), &t, &none(), Some("h")).unwrap();
        assert_eq!(s.state_dir, PathBuf::from("/var/lib/meduza"));
        assert_eq!(s.dataplane, Dataplane::Nft);
        assert_eq!(s.watchdog, Some(PathBuf::from("/dev/watchdog")));
        assert_eq!(s.watchdog_timeout, DEFAULT_WATCHDOG_TIMEOUT);
        assert_eq!(s.resolv_conf, Some(PathBuf::from("/etc/resolv.conf")));
    }
}
