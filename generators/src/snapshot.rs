//! A snapshot: the flat `{"/key": "value"}` view of etcd the whole pipeline starts from.

use crate::error::ValidationError;
use std::collections::BTreeMap;

/// Keys and values exactly as etcd holds them, in key order.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Snapshot(pub BTreeMap<String, String>);

impl Snapshot {
    /// Parse a snapshot file: a JSON object whose values are all strings.
    pub fn from_json(text: &str) -> Result<Self, ValidationError> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| ValidationError::new("<snapshot>", "", format!("not JSON: {e}")))?;
        let serde_json::Value::Object(map) = value else {
            return Err(ValidationError::new(
                "<snapshot>",
                "",
                "a snapshot is a JSON object {\"/key\": \"value\"}",
            ));
        };
        let mut out = BTreeMap::new();
        for (k, v) in map {
            match v {
                serde_json::Value::String(s) => {
                    out.insert(k, s);
                }
                other => {
                    return Err(ValidationError::new(
                        k,
                        other.to_string(),
                        "etcd values are strings; quote it",
                    ))
                }
            }
        }
        Ok(Self(out))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Every `(key, value)` whose key starts with `prefix`.
    pub fn prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.0
            .range(prefix.to_string()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The distinct next path segment under `prefix` (e.g. node ids under `/nodes/`).
    pub fn children(&self, prefix: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (k, _) in self.prefix(prefix) {
            let rest = &k[prefix.len()..];
            let seg = rest.split('/').next().unwrap_or_default();
            if !seg.is_empty() && out.last().map(String::as_str) != Some(seg) {
                out.push(seg.to_string());
            }
        }
        out.dedup();
        out
    }

    /// The sub-map of one node's keys (`/nodes/<id>/...`), as the predecessor's
    /// generators received it.
    pub fn subset(&self, prefix: &str) -> BTreeMap<String, String> {
        self.prefix(prefix)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

/// Split a newline-separated multi-value key; blank lines and surrounding space dropped.
pub fn split_ml(value: &str) -> Vec<&str> {
    value
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_lists_each_segment_once() {
        let s = Snapshot::from_json(
            r#"{"/nodes/a/lan":"x","/nodes/a/bgp/asn":"1","/nodes/b/lan":"y"}"#,
        )
        .unwrap();
        assert_eq!(s.children("/nodes/"), vec!["a", "b"]);
    }

    #[test]
    fn non_string_values_are_refused_naming_the_key() {
        let e = Snapshot::from_json(r#"{"/nodes/a/tinc/port": 655}"#).unwrap_err();
        assert_eq!(e.key, "/nodes/a/tinc/port");
    }

    #[test]
    fn split_ml_drops_blank_lines() {
        assert_eq!(split_ml(" a \n\n b\n"), vec!["a", "b"]);
    }
}
