//! The value rules every settings layer shares: what a node id, an etcd endpoint, a
//! socket, a path, a watchdog or a state device may be, and the error that names the
//! layer, key and value ([`invalid`]). Must not: know which layer a value came from
//! beyond labelling the error with it.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use super::{Dataplane, Origin, SettingsError, WATCHDOG_TIMEOUT_RANGE};

/// Tools an older meduza.toml or environment may still name, accepted with a warning
/// so that an upgrade does not stop the gateway: `watchfrr` (meduza starts and watches
/// the FRR daemons itself, src/supervise/frr.rs).
const RETIRED_TOOLS: [&str; 1] = ["watchfrr"];

/// Whether `name` (a `[bin]` key, or a `MEDUZA_BIN_` suffix in lower case) is a retired
/// tool: then `key` is warned about and ignored.
pub(super) fn retired_tool(name: &str, key: &str) -> bool {
    let retired = RETIRED_TOOLS.contains(&name);
    if retired {
        tracing::warn!(
            setting = key,
            "{name} is no longer used (meduza supervises the FRR daemons itself); the setting is ignored"
        );
    }
    retired
}

pub(super) fn invalid(
    origin: Origin,
    key: &str,
    value: &str,
    reason: impl Into<String>,
) -> SettingsError {
    SettingsError::Invalid {
        origin,
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

pub(super) fn parse_node_id(origin: Origin, key: &str, v: &str) -> Result<String, SettingsError> {
    // The node id becomes an etcd path segment and the hostname (≤ 64 bytes, no '/').
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(v.to_string())
    } else {
        Err(invalid(
            origin,
            key,
            v,
            "expected 1-64 characters of [A-Za-z0-9_.-]",
        ))
    }
}

pub(super) fn parse_endpoint(origin: Origin, key: &str, v: &str) -> Result<String, SettingsError> {
    let v = v.trim();
    let rest = v
        .strip_prefix("http://")
        .or_else(|| v.strip_prefix("https://"))
        .ok_or_else(|| invalid(origin, key, v, "expected http(s)://host:port"))?;
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| invalid(origin, key, v, "missing :port"))?;
    if host.is_empty() || host.contains('/') {
        return Err(invalid(origin, key, v, "missing host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(v.to_string()),
        _ => Err(invalid(origin, key, v, "port must be 1-65535")),
    }
}

/// A comma-separated or TOML list: each item trimmed, empty items skipped, at least one
/// left (`none_given` says what is missing otherwise).
fn parse_list<'a, T>(
    origin: Origin,
    key: &str,
    items: impl IntoIterator<Item = &'a str>,
    none_given: &str,
    parse: impl Fn(&'a str) -> Result<T, SettingsError>,
) -> Result<Vec<T>, SettingsError> {
    let list: Vec<T> = items
        .into_iter()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(parse)
        .collect::<Result<_, _>>()?;
    if list.is_empty() {
        return Err(invalid(origin, key, "", none_given));
    }
    Ok(list)
}

pub(super) fn parse_endpoints<'a>(
    origin: Origin,
    key: &str,
    items: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<String>, SettingsError> {
    parse_list(origin, key, items, "no endpoint given", |s| {
        parse_endpoint(origin, key, s)
    })
}

pub(super) fn parse_sockets<'a>(
    origin: Origin,
    key: &str,
    items: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<SocketAddr>, SettingsError> {
    parse_list(origin, key, items, "no socket address given", |s| {
        parse_addr(origin, key, s)
    })
}

/// A socket or IP address; the error is the standard library's.
fn parse_addr<T>(origin: Origin, key: &str, v: &str) -> Result<T, SettingsError>
where
    T: FromStr<Err = std::net::AddrParseError>,
{
    v.trim()
        .parse()
        .map_err(|e: std::net::AddrParseError| invalid(origin, key, v, e.to_string()))
}

pub(super) fn parse_socket(
    origin: Origin,
    key: &str,
    v: &str,
) -> Result<SocketAddr, SettingsError> {
    parse_addr(origin, key, v)
}

pub(super) fn parse_ip(origin: Origin, key: &str, v: &str) -> Result<IpAddr, SettingsError> {
    parse_addr(origin, key, v)
}

pub(super) fn parse_bool(origin: Origin, key: &str, v: &str) -> Result<bool, SettingsError> {
    match v.trim() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(invalid(origin, key, v, "expected 1/0, true/false, yes/no")),
    }
}

pub(super) fn parse_abs_path(origin: Origin, key: &str, v: &str) -> Result<PathBuf, SettingsError> {
    if v.starts_with('/') {
        Ok(PathBuf::from(v))
    } else {
        Err(invalid(origin, key, v, "expected an absolute path"))
    }
}

pub(super) fn parse_dataplane(
    origin: Origin,
    key: &str,
    v: &str,
) -> Result<Dataplane, SettingsError> {
    Dataplane::parse(v.trim()).map_err(|r| invalid(origin, key, v, r))
}

pub(super) fn parse_watchdog(origin: Origin, key: &str, v: &str) -> Result<String, SettingsError> {
    let v = v.trim();
    if v == "off" || (v.starts_with("/dev/") && v.len() > "/dev/".len()) {
        Ok(v.to_string())
    } else {
        Err(invalid(origin, key, v, "expected /dev/... or off"))
    }
}

pub(super) fn parse_resolv_conf(
    origin: Origin,
    key: &str,
    v: &str,
) -> Result<String, SettingsError> {
    let v = v.trim();
    if v == "off" {
        return Ok(v.to_string());
    }
    parse_abs_path(origin, key, v).map(|p| p.display().to_string())
}

pub(super) fn parse_watchdog_timeout(
    origin: Origin,
    key: &str,
    v: &str,
) -> Result<u32, SettingsError> {
    match v.trim().parse::<u32>() {
        Ok(n) if WATCHDOG_TIMEOUT_RANGE.contains(&n) => Ok(n),
        _ => Err(invalid(
            origin,
            key,
            v,
            format!(
                "expected whole seconds in {}..={}",
                WATCHDOG_TIMEOUT_RANGE.start(),
                WATCHDOG_TIMEOUT_RANGE.end()
            ),
        )),
    }
}

pub(super) fn parse_state_device(
    origin: Origin,
    key: &str,
    v: &str,
) -> Result<String, SettingsError> {
    let v = v.trim();
    let ok = v == "none"
        || v.starts_with("/dev/")
        || v.strip_prefix("LABEL=").is_some_and(|l| !l.is_empty())
        || v.strip_prefix("PARTLABEL=").is_some_and(|l| !l.is_empty());
    if ok {
        Ok(v.to_string())
    } else {
        Err(invalid(
            origin,
            key,
            v,
            "expected /dev/..., LABEL=..., PARTLABEL=... or none",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::SettingsLayer;
    use super::*;
    use crate::boot::cmdline::parse_cmdline;

    #[test]
    fn bad_values_name_origin_key_and_value() {
        let err = SettingsLayer::from_env([("ETCD_ENDPOINTS", "10.0.0.1:2379")]).unwrap_err();
        assert_eq!(
            err,
            SettingsError::Invalid {
                origin: Origin::Env,
                key: "ETCD_ENDPOINTS".into(),
                value: "10.0.0.1:2379".into(),
                reason: "expected http(s)://host:port".into()
            }
        );
        let err =
            SettingsLayer::from_cmdline(&parse_cmdline("meduza.etcd=http://e:99999")).unwrap_err();
        assert!(matches!(
            err,
            SettingsError::Invalid { origin: Origin::Cmdline, ref key, ref value, .. }
                if key == "meduza.etcd" && value == "http://e:99999"
        ));
        assert!(SettingsLayer::from_env([("MEDUZA_DATAPLANE", "iptables")]).is_err());
        assert!(SettingsLayer::from_env([("MEDUZA_DNS_LISTEN", "0.0.0.0")]).is_err());
        assert!(SettingsLayer::from_env([("NODE_ID", "a/b")]).is_err());
        assert!(SettingsLayer::from_env([("MEDUZA_ROOT", "relative")]).is_err());
        assert!(SettingsLayer::from_env([("MEDUZA_BIN_NGINX", "/x")]).is_err());
        assert!(SettingsLayer::from_env([("DEFAULT_GW", "gw")]).is_err());
        assert!(SettingsLayer::from_env([("MEDUZA_BOOT", "maybe")]).is_err());
        assert!(SettingsLayer::from_cmdline(&parse_cmdline("meduza.state=sda3")).is_err());
    }
    /// `watchfrr` (never run) is accepted with a warning, from both layers.
    #[test]
    fn the_retired_watchfrr_setting_is_ignored_not_an_error() {
        let l = SettingsLayer::from_env([("MEDUZA_BIN_WATCHFRR", "/usr/sbin/watchfrr")]).unwrap();
        assert!(l.bins.is_empty());
        let l = SettingsLayer::from_toml(
            "[bin]\nwatchfrr = \"/usr/sbin/watchfrr\"\n",
            "/etc/meduza/meduza.toml",
        )
        .unwrap();
        assert!(l.bins.is_empty());
    }
}
