//! The environment layer of the settings: DESIGN §2's table plus `MEDUZA_BOOT` and
//! `MEDUZA_STATE_DEVICE`. Must not: read the process environment (the caller passes
//! it).

use super::values::*;
use super::{Origin, SettingsError, SettingsLayer, Tool};

impl SettingsLayer {
    /// The environment layer (DESIGN §2's table plus `MEDUZA_BOOT` and
    /// `MEDUZA_STATE_DEVICE`). Unset and empty variables are ignored; others are ignored
    /// unless they are meduza's.
    pub fn from_env<K, V, I>(vars: I) -> Result<Self, SettingsError>
    where
        K: AsRef<str>,
        V: AsRef<str>,
        I: IntoIterator<Item = (K, V)>,
    {
        let o = Origin::Env;
        let mut l = SettingsLayer::default();
        for (k, v) in vars {
            let (k, v) = (k.as_ref(), v.as_ref());
            if v.is_empty() {
                continue;
            }
            match k {
                "NODE_ID" => l.node_id = Some(parse_node_id(o, k, v)?),
                "ETCD_ENDPOINTS" => l.etcd_endpoints = Some(parse_endpoints(o, k, v.split(','))?),
                "ETCD_CA" => l.etcd_ca = Some(parse_abs_path(o, k, v)?),
                "ETCD_CERT" => l.etcd_cert = Some(parse_abs_path(o, k, v)?),
                "ETCD_KEY" => l.etcd_key = Some(parse_abs_path(o, k, v)?),
                "ETCD_USER" => l.etcd_user = Some(v.to_string()),
                "ETCD_PASS" => l.etcd_pass = Some(v.to_string()),
                "DEFAULT_GW" => l.default_gw = Some(parse_ip(o, k, v)?),
                "MEDUZA_ROOT" => l.root = Some(parse_abs_path(o, k, v)?),
                "MEDUZA_STATE_DIR" => l.state_dir = Some(parse_abs_path(o, k, v)?),
                "MEDUZA_STATE_DEVICE" => l.state_device = Some(parse_state_device(o, k, v)?),
                "MEDUZA_DNS_LISTEN" => l.dns_listen = Some(parse_sockets(o, k, v.split(','))?),
                "MEDUZA_API_LISTEN" => l.api_listen = Some(parse_socket(o, k, v)?),
                "MEDUZA_API_TLS_CERT" => l.api_tls_cert = Some(parse_abs_path(o, k, v)?),
                "MEDUZA_API_TLS_KEY" => l.api_tls_key = Some(parse_abs_path(o, k, v)?),
                "MEDUZA_DATAPLANE" => l.dataplane = Some(parse_dataplane(o, k, v)?),
                "MEDUZA_BOOT" => l.boot = Some(parse_bool(o, k, v)?),
                "MEDUZA_WATCHDOG" => l.watchdog = Some(parse_watchdog(o, k, v)?),
                "MEDUZA_WATCHDOG_TIMEOUT" => {
                    l.watchdog_timeout = Some(parse_watchdog_timeout(o, k, v)?)
                }
                "MEDUZA_RESOLV_CONF" => l.resolv_conf = Some(parse_resolv_conf(o, k, v)?),
                _ => {
                    if let Some(suffix) = k.strip_prefix("MEDUZA_BIN_") {
                        if retired_tool(suffix.to_ascii_lowercase().as_str(), k) {
                            continue;
                        }
                        let tool = Tool::ALL
                            .into_iter()
                            .find(|t| t.env_suffix() == suffix)
                            .ok_or_else(|| invalid(o, k, v, "unknown tool"))?;
                        l.bins.insert(tool, parse_abs_path(o, k, v)?);
                    }
                }
            }
        }
        Ok(l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_env_values_are_unset() {
        let l = SettingsLayer::from_env([("NODE_ID", ""), ("ETCD_ENDPOINTS", "")]).unwrap();
        assert_eq!(l, SettingsLayer::default());
    }
}
