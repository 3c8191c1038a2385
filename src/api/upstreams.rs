//! DNS upstream groups as the API reads and writes them (DESIGN §3 keys).
//!
//! Owns: the JSON shape of an upstream ([`UpstreamSpec`]), strict validation of request
//! bodies (field by field, with the same parsers and ranges as the generators' model,
//! so the API never writes what a reconcile pass would reject), and the mapping to and
//! from `<prefix><name>/...` keys. Must not: do I/O — handlers in `mod.rs` do the etcd
//! reads and writes.

use super::ApiError;
use meduza_generators::parse::{parse_bool, parse_dns_addr, parse_u64_in, validate_name};
use meduza_generators::plan::dns::UpstreamGroup;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Ranges as in `meduza_generators::model` (`parse_upstreams`).
pub const PRIORITY_RANGE: (u32, u32) = (1, 1000);
pub const INTERVAL_RANGE: (u64, u64) = (1, 86_400);
pub const TIMEOUT_RANGE: (u64, u64) = (1, 60);
pub const THRESHOLD_RANGE: (u32, u32) = (1, 100);
/// More addresses than this in one group is a mistake, not a configuration.
pub const MAX_ADDRESSES: usize = 32;

/// One upstream group: request body of POST/PUT and the `config` part of GET.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamSpec {
    pub name: String,
    pub addresses: Vec<String>,
    pub priority: u32,
    pub enable: bool,
    pub health_check: HealthCheckSpec,
    pub failover: FailoverSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheckSpec {
    pub enable: bool,
    /// Seconds.
    pub interval: u64,
    /// Seconds.
    pub timeout: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverSpec {
    pub enable: bool,
    pub threshold: u32,
}

impl Default for HealthCheckSpec {
    fn default() -> Self {
        Self {
            enable: true,
            interval: 30,
            timeout: 5,
        }
    }
}

impl Default for FailoverSpec {
    fn default() -> Self {
        Self {
            enable: true,
            threshold: 3,
        }
    }
}

impl From<&UpstreamGroup> for UpstreamSpec {
    fn from(g: &UpstreamGroup) -> Self {
        Self {
            name: g.name.clone(),
            addresses: g.addresses.iter().map(|a| a.to_string()).collect(),
            priority: g.priority,
            enable: g.enable,
            health_check: HealthCheckSpec {
                enable: g.health_check.enable,
                interval: g.health_check.interval_secs,
                timeout: g.health_check.timeout_secs,
            },
            failover: FailoverSpec {
                enable: g.failover.enable,
                threshold: g.failover.threshold,
            },
        }
    }
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ApiError {
    ApiError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Validate a path or body name.
pub fn check_name(name: &str) -> Result<(), ApiError> {
    validate_name(name).map_err(|r| invalid("name", r))
}

fn take_bool(
    obj: &Map<String, Value>,
    field: &str,
    path: &str,
    default: bool,
) -> Result<bool, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(invalid(path, "must be true or false")),
    }
}

fn take_u64(
    obj: &Map<String, Value>,
    field: &str,
    path: &str,
    range: (u64, u64),
    default: u64,
) -> Result<u64, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) => parse_u64_in(&v.to_string(), range.0, range.1).map_err(|r| invalid(path, r)),
            None => Err(invalid(path, "must be a whole number")),
        },
        Some(_) => Err(invalid(path, "must be a number")),
    }
}

fn take_u32(
    obj: &Map<String, Value>,
    field: &str,
    path: &str,
    range: (u32, u32),
    default: u32,
) -> Result<u32, ApiError> {
    let v = take_u64(
        obj,
        field,
        path,
        (u64::from(range.0), u64::from(range.1)),
        u64::from(default),
    )?;
    u32::try_from(v).map_err(|_| invalid(path, "out of range"))
}

fn only_fields(obj: &Map<String, Value>, allowed: &[&str], parent: &str) -> Result<(), ApiError> {
    for k in obj.keys() {
        if !allowed.contains(&k.as_str()) {
            let path = if parent.is_empty() {
                k.clone()
            } else {
                format!("{parent}.{k}")
            };
            return Err(invalid(path, "unknown field"));
        }
    }
    Ok(())
}

fn sub_object<'a>(
    obj: &'a Map<String, Value>,
    field: &str,
) -> Result<Option<&'a Map<String, Value>>, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(invalid(field, "must be an object")),
    }
}

/// Parse and validate a POST (`path_name` `None`: `name` required in the body) or PUT
/// (`path_name` given: the body's `name`, if present, must match) body. Absent optional
/// fields take the model's defaults.
pub fn parse_body(body: &[u8], path_name: Option<&str>) -> Result<UpstreamSpec, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| ApiError::BadJson {
        reason: e.to_string(),
    })?;
    let Value::Object(obj) = value else {
        return Err(ApiError::BadJson {
            reason: "the body must be a JSON object".into(),
        });
    };
    only_fields(
        &obj,
        &[
            "name",
            "addresses",
            "priority",
            "enable",
            "health_check",
            "failover",
        ],
        "",
    )?;

    let body_name = match obj.get("name") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(invalid("name", "must be a string")),
    };
    let name = match (path_name, body_name) {
        (Some(p), Some(b)) if p != b => {
            return Err(invalid("name", "does not match the name in the path"))
        }
        (Some(p), _) => p.to_string(),
        (None, Some(b)) => b,
        (None, None) => return Err(invalid("name", "required")),
    };
    check_name(&name)?;

    let addresses = match obj.get("addresses") {
        Some(Value::Array(items)) => items,
        None | Some(Value::Null) => {
            return Err(invalid("addresses", "required: a list of ip or ip:port"))
        }
        Some(_) => return Err(invalid("addresses", "must be a list of strings")),
    };
    if addresses.is_empty() {
        return Err(invalid(
            "addresses",
            "an upstream group needs at least one address",
        ));
    }
    if addresses.len() > MAX_ADDRESSES {
        return Err(invalid(
            "addresses",
            format!("at most {MAX_ADDRESSES} addresses"),
        ));
    }
    let mut addrs = Vec::with_capacity(addresses.len());
    for (i, a) in addresses.iter().enumerate() {
        let field = format!("addresses[{i}]");
        let Value::String(s) = a else {
            return Err(invalid(field, "must be a string"));
        };
        let s = s.trim();
        parse_dns_addr(s).map_err(|r| invalid(field.clone(), r))?;
        if addrs.iter().any(|x: &String| x == s) {
            return Err(invalid(field, "duplicate address"));
        }
        addrs.push(s.to_string());
    }

    let priority = take_u32(&obj, "priority", "priority", PRIORITY_RANGE, 1)?;
    let enable = take_bool(&obj, "enable", "enable", true)?;

    let hc_default = HealthCheckSpec::default();
    let health_check = match sub_object(&obj, "health_check")? {
        None => hc_default,
        Some(h) => {
            only_fields(h, &["enable", "interval", "timeout"], "health_check")?;
            HealthCheckSpec {
                enable: take_bool(h, "enable", "health_check.enable", hc_default.enable)?,
                interval: take_u64(
                    h,
                    "interval",
                    "health_check.interval",
                    INTERVAL_RANGE,
                    hc_default.interval,
                )?,
                timeout: take_u64(
                    h,
                    "timeout",
                    "health_check.timeout",
                    TIMEOUT_RANGE,
                    hc_default.timeout,
                )?,
            }
        }
    };
    let fo_default = FailoverSpec::default();
    let failover = match sub_object(&obj, "failover")? {
        None => fo_default,
        Some(f) => {
            only_fields(f, &["enable", "threshold"], "failover")?;
            FailoverSpec {
                enable: take_bool(f, "enable", "failover.enable", fo_default.enable)?,
                threshold: take_u32(
                    f,
                    "threshold",
                    "failover.threshold",
                    THRESHOLD_RANGE,
                    fo_default.threshold,
                )?,
            }
        }
    };
    Ok(UpstreamSpec {
        name,
        addresses: addrs,
        priority,
        enable,
        health_check,
        failover,
    })
}

impl UpstreamSpec {
    /// The keys under `base` (`.../dns/upstreams/<name>/`), every one written explicitly.
    pub fn to_keys(&self, base: &str) -> Vec<(String, String)> {
        vec![
            (format!("{base}addresses"), self.addresses.join("\n")),
            (format!("{base}priority"), self.priority.to_string()),
            (format!("{base}enable"), self.enable.to_string()),
            (
                format!("{base}health_check/enable"),
                self.health_check.enable.to_string(),
            ),
            (
                format!("{base}health_check/interval"),
                self.health_check.interval.to_string(),
            ),
            (
                format!("{base}health_check/timeout"),
                self.health_check.timeout.to_string(),
            ),
            (
                format!("{base}failover/enable"),
                self.failover.enable.to_string(),
            ),
            (
                format!("{base}failover/threshold"),
                self.failover.threshold.to_string(),
            ),
        ]
    }
}

/// An upstream as stored, with any problem in its keys (bad values fall back to the
/// defaults, as the model does, and are listed so the operator sees them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredUpstream {
    pub spec: UpstreamSpec,
    pub problems: Vec<KeyProblem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyProblem {
    pub key: String,
    pub reason: String,
}

/// Group the keys under `prefix` (`.../dns/upstreams/`) by upstream name.
pub fn from_keys(prefix: &str, kvs: &BTreeMap<String, String>) -> BTreeMap<String, StoredUpstream> {
    let mut names: Vec<String> = kvs
        .keys()
        .filter_map(|k| k.strip_prefix(prefix))
        .filter_map(|rest| rest.split('/').next())
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect();
    names.dedup();
    let mut out = BTreeMap::new();
    for name in names {
        let base = format!("{prefix}{name}/");
        let mut problems = Vec::new();
        let get = |suffix: &str| {
            kvs.get(&format!("{base}{suffix}"))
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let mut note = |suffix: &str, reason: String| {
            problems.push(KeyProblem {
                key: format!("{base}{suffix}"),
                reason,
            })
        };
        let addresses: Vec<String> = get("addresses")
            .map(|v| {
                v.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        for a in &addresses {
            if let Err(r) = parse_dns_addr(a) {
                note("addresses", format!("{a}: {r}"));
            }
        }
        if addresses.is_empty() {
            note(
                "addresses",
                "an upstream group needs at least one address".into(),
            );
        }
        let mut num = |suffix: &str, range: (u64, u64), default: u64| match get(suffix) {
            None => default,
            Some(v) => parse_u64_in(&v, range.0, range.1).unwrap_or_else(|r| {
                note(suffix, r);
                default
            }),
        };
        let priority = num(
            "priority",
            (u64::from(PRIORITY_RANGE.0), u64::from(PRIORITY_RANGE.1)),
            1,
        );
        let interval = num("health_check/interval", INTERVAL_RANGE, 30);
        let timeout = num("health_check/timeout", TIMEOUT_RANGE, 5);
        let threshold = num(
            "failover/threshold",
            (u64::from(THRESHOLD_RANGE.0), u64::from(THRESHOLD_RANGE.1)),
            3,
        );
        let mut flag = |suffix: &str| match get(suffix) {
            None => true,
            Some(v) => parse_bool(&v).unwrap_or_else(|r| {
                note(suffix, r);
                true
            }),
        };
        let enable = flag("enable");
        let hc_enable = flag("health_check/enable");
        let fo_enable = flag("failover/enable");
        if let Err(r) = validate_name(&name) {
            problems.push(KeyProblem {
                key: base.clone(),
                reason: format!("upstream name: {r}"),
            });
        }
        let spec = UpstreamSpec {
            name: name.clone(),
            addresses,
            priority: u32::try_from(priority).unwrap_or(1),
            enable,
            health_check: HealthCheckSpec {
                enable: hc_enable,
                interval,
                timeout,
            },
            failover: FailoverSpec {
                enable: fo_enable,
                threshold: u32::try_from(threshold).unwrap_or(3),
            },
        };
        out.insert(name, StoredUpstream { spec, problems });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(e: ApiError) -> String {
        match e {
            ApiError::Invalid { field, .. } => field,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn body_defaults_and_roundtrip() {
        let s = parse_body(
            br#"{"name":"cf","addresses":["1.1.1.1","1.0.0.1:5353"]}"#,
            None,
        )
        .unwrap();
        assert_eq!(s.priority, 1);
        assert!(s.enable);
        assert_eq!(s.health_check, HealthCheckSpec::default());
        let kvs: BTreeMap<String, String> = s.to_keys("/n/dns/upstreams/cf/").into_iter().collect();
        assert_eq!(
            kvs["/n/dns/upstreams/cf/addresses"],
            "1.1.1.1\n1.0.0.1:5353"
        );
        let back = from_keys("/n/dns/upstreams/", &kvs);
        assert_eq!(back["cf"].spec, s);
        assert!(back["cf"].problems.is_empty());
    }

    #[test]
    fn body_errors_name_the_field() {
        let cases: &[(&[u8], Option<&str>, &str)] = &[
            (br#"{"addresses":["1.1.1.1"]}"#, None, "name"),
            (br#"{"name":"a b","addresses":["1.1.1.1"]}"#, None, "name"),
            (
                br#"{"name":"x","addresses":["1.1.1.1"]}"#,
                Some("y"),
                "name",
            ),
            (br#"{"name":"a","addresses":[]}"#, None, "addresses"),
            (br#"{"name":"a","addresses":"1.1.1.1"}"#, None, "addresses"),
            (
                br#"{"name":"a","addresses":["1.1.1.1","nope"]}"#,
                None,
                "addresses[1]",
            ),
            (
                br#"{"name":"a","addresses":["1.1.1.1\n2.2.2.2"]}"#,
                None,
                "addresses[0]",
            ),
            (
                br#"{"name":"a","addresses":["1.1.1.1","1.1.1.1"]}"#,
                None,
                "addresses[1]",
            ),
            (
                br#"{"name":"a","addresses":["1.1.1.1"],"priority":0}"#,
                None,
                "priority",
            ),
            (
                br#"{"name":"a","addresses":["1.1.1.1"],"priority":"1"}"#,
                None,
                "priority",
            ),
            (
                br#"{"name":"a","addresses":["1.1.1.1"],"enable":"yes"}"#,
                None,
                "enable",
            ),
            (
                br#"{"name":"a","addresses":["1.1.1.1"],"health_check":{"timeout":61}}"#,
                None,
                "health_check.timeout",
            ),
            (
                br#"{"name":"a","addresses":["1.1.1.1"],"health_check":{"every":1}}"#,
                None,
                "health_check.every",
            ),
            (
                br#"{"name":"a","addresses":["1.1.1.1"],"failover":{"threshold":101}}"#,
                None,
                "failover.threshold",
            ),
            (
                br#"{"name":"a","addresses":["1.1.1.1"],"colour":"red"}"#,
                None,
                "colour",
            ),
        ];
        for (body, path, field) in cases {
            let e = parse_body(body, *path).expect_err(std::str::from_utf8(body).unwrap());
            assert_eq!(
                &field_of(e),
                field,
                "{}",
                std::str::from_utf8(body).unwrap()
            );
        }
        assert!(matches!(
            parse_body(b"[1]", None),
            Err(ApiError::BadJson { .. })
        ));
        assert!(matches!(
            parse_body(b"{", None),
            Err(ApiError::BadJson { .. })
        ));
    }

    #[test]
    fn stored_problems_are_reported() {
        let kvs: BTreeMap<String, String> = [
            ("/p/a/addresses", "1.1.1.1\nbanana"),
            ("/p/a/priority", "0"),
            ("/p/a/enable", "maybe"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let got = from_keys("/p/", &kvs);
        let keys: Vec<&str> = got["a"].problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, vec!["/p/a/addresses", "/p/a/priority", "/p/a/enable"]);
        assert_eq!(got["a"].spec.priority, 1);
    }
}
