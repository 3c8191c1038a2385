//! The errors that cross the reconcile seam: why a [`super::ConfigSource`] could not
//! answer ([`SourceError`]) and why an apply step failed ([`ApplyError`], returned by
//! every [`super::Effects`] method and by the reconciler's own file writes).
//!
//! Owns: the `errors` entry an apply failure is published as ([`ApplyError::entry`],
//! key [`APPLY_KEY`], reason `<domain>: <cause>`), the one conversion from one to the
//! other. Must not: render the `errors` value itself (`etcd::status` does), or turn a
//! typed lower-level error into a string before that conversion: the cause stays the
//! error's `source()`.

use crate::etcd::status::ErrorEntry;
use std::fmt;

/// The `key` of an apply failure's `errors` entry: no etcd key is at fault (its
/// `value` is empty), the running system is.
pub const APPLY_KEY: &str = "<apply>";

/// A lower-level error, kept typed (`source()` reaches it), or a plain message.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Which part of the running system an apply step failed in: one per
/// [`super::Effects`] method, and the files the reconciler writes itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyDomain {
    /// A rendered file (its absolute path inside the root), written or removed
    /// through [`crate::files::Fs`].
    File(String),
    /// [`super::Effects::apply_services`]: the supervisor's desired set.
    Services,
    /// [`super::Effects::apply_frr`].
    Frr,
    /// [`super::Effects::apply_wireguard`].
    Wireguard,
    /// [`super::Effects::apply_clash`].
    Clash,
    /// [`super::Effects::apply_dns`].
    Dns,
}

impl fmt::Display for ApplyDomain {
    /// The prefix of the published reason: a file's path, else the step's name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::File(path) => path,
            Self::Services => "services",
            Self::Frr => "frr",
            Self::Wireguard => "wireguard",
            Self::Clash => "clash",
            Self::Dns => "dns",
        })
    }
}

/// One failed apply step. The pass goes on with the other steps, publishes every
/// failure in `errors` and retries on the next pass.
#[derive(Debug, thiserror::Error)]
#[error("{domain}: {cause}")]
pub struct ApplyError {
    pub domain: ApplyDomain,
    #[source]
    pub cause: Cause,
}

impl ApplyError {
    /// `cause`: a typed error (kept as the source) or a message (`&str`, `String`).
    pub fn new(domain: ApplyDomain, cause: impl Into<Cause>) -> Self {
        Self {
            domain,
            cause: cause.into(),
        }
    }

    /// The entry published in `/updated/<id>/errors`:
    /// `{"key":"<apply>","value":"","reason":"<domain>: <cause>"}`.
    pub fn entry(&self) -> ErrorEntry {
        ErrorEntry {
            key: APPLY_KEY.to_owned(),
            value: String::new(),
            reason: self.to_string(),
        }
    }
}

/// Why a [`super::ConfigSource`] could not answer.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The store did not answer (etcd unreachable, timed out, refused the request).
    #[error("{0}")]
    Unreachable(#[source] Cause),
    /// A key read during the pass holds a value the gateway cannot use.
    #[error("{key}: {reason}")]
    BadValue {
        key: &'static str,
        value: String,
        reason: String,
    },
}

impl SourceError {
    /// The store did not answer: `cause` is its typed error or a message.
    pub fn unreachable(cause: impl Into<Cause>) -> Self {
        Self::Unreachable(cause.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::status::errors_value;
    use crate::files::FsError;
    use std::error::Error as _;

    #[test]
    fn an_apply_failure_is_published_as_before() {
        let entries: Vec<ErrorEntry> = [
            ApplyError::new(ApplyDomain::Services, "service frr-zebra: cycle"),
            ApplyError::new(ApplyDomain::Frr, "reload failed"),
            ApplyError::new(ApplyDomain::Wireguard, "wireguard-go exited"),
            ApplyError::new(ApplyDomain::Clash, String::from("x")),
            ApplyError::new(ApplyDomain::Dns, "y"),
        ]
        .iter()
        .map(ApplyError::entry)
        .collect();
        // The value that `ValidationError::new("<apply>", "", "<step>: <cause>")`
        // was published as.
        assert_eq!(
            errors_value(&entries),
            concat!(
                r#"[{"key":"<apply>","value":"","reason":"services: service frr-zebra: cycle"},"#,
                r#"{"key":"<apply>","value":"","reason":"frr: reload failed"},"#,
                r#"{"key":"<apply>","value":"","reason":"wireguard: wireguard-go exited"},"#,
                r#"{"key":"<apply>","value":"","reason":"clash: x"},"#,
                r#"{"key":"<apply>","value":"","reason":"dns: y"}]"#
            )
        );
    }

    #[test]
    fn a_file_failure_names_the_path_and_keeps_the_typed_cause() {
        let err = ApplyError::new(
            ApplyDomain::File("/etc/frr/frr.conf".into()),
            FsError::BadPath {
                path: "/etc/frr/frr.conf".into(),
            },
        );
        assert_eq!(
            err.entry(),
            ErrorEntry {
                key: "<apply>".into(),
                value: String::new(),
                reason: "/etc/frr/frr.conf: path /etc/frr/frr.conf is not absolute or escapes \
                         the root"
                    .into(),
            }
        );
        let source = err.source().expect("the cause is the source");
        assert!(
            matches!(
                source.downcast_ref::<FsError>(),
                Some(FsError::BadPath { .. })
            ),
            "{source:?}"
        );
    }

    #[test]
    fn source_errors_read_as_the_strings_they_replace() {
        let io = std::io::Error::other("connection refused");
        let err = SourceError::unreachable(io);
        assert_eq!(err.to_string(), "connection refused");
        assert!(err
            .source()
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .is_some());
        let bad = SourceError::BadValue {
            key: "/commit_confirm",
            value: "soon".into(),
            reason: "\"soon\" is not a whole number of seconds".into(),
        };
        assert_eq!(
            bad.to_string(),
            "/commit_confirm: \"soon\" is not a whole number of seconds"
        );
    }
}
