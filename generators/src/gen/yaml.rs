//! Building YAML values by hand for the generators that write YAML (mihomo, MosDNS).
//!
//! Owns: the two constructors those generators share. Must not: know a file format.

use serde_norway::{Mapping, Value};

/// A YAML string.
pub(super) fn s(v: &str) -> Value {
    Value::String(v.to_string())
}

/// A YAML mapping of `entries`, in this order.
pub(super) fn map(entries: Vec<(&str, Value)>) -> Value {
    let mut m = Mapping::new();
    for (k, v) in entries {
        m.insert(s(k), v);
    }
    Value::Mapping(m)
}
