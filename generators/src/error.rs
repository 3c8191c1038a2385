//! Validation errors: every one names the etcd key, the offending value and why.

use serde::Serialize;
use std::fmt;

/// One refused value. Published as `/updated/<id>/errors` entries and printed by
/// `meduza validate` as `key: value: reason`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ValidationError {
    pub key: String,
    pub value: String,
    pub reason: String,
}

impl ValidationError {
    pub fn new(
        key: impl Into<String>,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Multi-line values (certificates, plugin YAML) are shown on one line.
        let value = self.value.replace('\n', "\\n");
        write!(f, "{}: {}: {}", self.key, value, self.reason)
    }
}

/// All the errors of one snapshot, in key order (never just the first).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, thiserror::Error)]
#[error("{} invalid key(s): {}", .0.len(), summary(.0))]
pub struct ValidationErrors(pub Vec<ValidationError>);

fn summary(errors: &[ValidationError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl ValidationErrors {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
