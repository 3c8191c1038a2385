//! Errors of the etcd layer. Every variant names what an operator needs to find the
//! problem: the setting, the key, the operation.

use std::path::PathBuf;
use std::time::Duration;

/// An error of the etcd layer.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// A connection setting (`ETCD_*` variable or flag) is invalid.
    #[error("invalid etcd setting {setting}={value:?}: {reason}")]
    Config {
        setting: &'static str,
        value: String,
        reason: String,
    },
    /// A TLS file could not be read.
    #[error("cannot read etcd TLS file {}: {source}", path.display())]
    TlsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Connecting (or authenticating while connecting) failed.
    #[error("cannot connect to etcd at {endpoints}: {source}")]
    Connect {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    /// An RPC failed.
    #[error("etcd {op} {key:?} failed: {source}")]
    Rpc {
        op: &'static str,
        key: String,
        #[source]
        source: etcd_client::Error,
    },
    /// An RPC did not answer within the request timeout.
    #[error("etcd {op} {key:?} timed out after {timeout:?}")]
    Timeout {
        op: &'static str,
        key: String,
        timeout: Duration,
    },
    /// etcd is unreachable (used by the in-memory fake to model an outage).
    #[error("etcd {op} {key:?} failed: etcd unavailable")]
    Unavailable { op: &'static str, key: String },
    /// No member could be tried: every one is down (`members` says how each is).
    #[error("etcd {op} {key:?} failed: no etcd member reachable ({members})")]
    Unreachable {
        op: &'static str,
        key: String,
        members: String,
    },
    /// A read at a revision older than the compaction floor.
    #[error("etcd {op} {key:?} at revision {revision}: compacted (floor {compact_revision})")]
    Compacted {
        op: &'static str,
        key: String,
        revision: i64,
        compact_revision: i64,
    },
    /// A lease is unknown or expired.
    #[error("etcd lease {id:x} not found")]
    LeaseNotFound { id: i64 },
    /// A key or value in etcd is not UTF-8.
    #[error("etcd key {key:?} holds a non-UTF-8 key or value")]
    NotUtf8 { key: String },
    /// A watch stream broke or was refused.
    #[error("etcd watch failed: {reason}")]
    Watch { reason: String },
    /// Writing CLI output failed.
    #[error("cannot write {}: {source}", path.display())]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl EtcdError {
    /// True when the error means the server refused our token: the caller should
    /// re-authenticate and retry once.
    pub fn is_auth(&self) -> bool {
        match self {
            EtcdError::Rpc { source, .. } | EtcdError::Connect { source, .. } => {
                is_auth_error(source)
            }
            EtcdError::Watch { reason } => is_auth_message(reason),
            _ => false,
        }
    }
}

/// Whether an etcd-client error is etcd refusing the auth token.
///
/// etcd answers an expired or unknown simple token with `UNAUTHENTICATED`
/// ("etcdserver: invalid auth token", `api/v3rpc/rpctypes/error.go`); services built on
/// the in-process client (Lock, Election) lose the code and keep only the message.
pub fn is_auth_error(err: &etcd_client::Error) -> bool {
    match err {
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::Unauthenticated || is_auth_message(status.message())
        }
        _ => false,
    }
}

/// Whether an error is the member's fault, so that the same request may succeed on
/// another member: the connection failed or broke, or the member cannot serve now
/// (etcd's `ErrGRPCNoLeader`, `ErrGRPCLeaderChanged`, `ErrGRPCTimeout`,
/// `ErrGRPCStopped`, `ErrGRPCTooManyRequests`, `api/v3rpc/rpctypes/error.go`, and
/// tonic's transport errors, which come as `Unavailable`, `Cancelled` or `Unknown`).
/// Everything else — a refused token, "permission denied", "compacted", "lease not
/// found", a bad argument, and "database space exceeded", which every member would
/// answer alike — is the request's outcome, and the member counts as healthy.
pub(crate) fn is_member_failure(err: &etcd_client::Error) -> bool {
    use tonic::Code;
    match err {
        etcd_client::Error::GRpcStatus(status) => {
            if is_auth_error(err) {
                return false;
            }
            match status.code() {
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Unknown
                | Code::Internal
                | Code::DataLoss => true,
                Code::ResourceExhausted => status.message().contains("too many requests"),
                _ => false,
            }
        }
        etcd_client::Error::TransportError(_)
        | etcd_client::Error::IoError(_)
        | etcd_client::Error::WatchError(_) => true,
        _ => false,
    }
}

/// Whether a message from etcd says the token is invalid. A watch created with a stale
/// token is not failed but canceled, with the reason "permission denied"
/// (`etcdserver/api/v3rpc/watch.go`, `isWatchPermitted`), so that counts too.
pub(crate) fn is_auth_message(msg: &str) -> bool {
    msg.contains("invalid auth token")
        || msg.contains("auth token is expired")
        || msg.contains("permission denied")
        || msg.contains("user name is empty")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauthenticated_status_is_an_auth_error() {
        let e = etcd_client::Error::GRpcStatus(tonic::Status::unauthenticated(
            "etcdserver: invalid auth token",
        ));
        assert!(is_auth_error(&e));
        let e = etcd_client::Error::GRpcStatus(tonic::Status::unknown(
            "etcdserver: invalid auth token",
        ));
        assert!(is_auth_error(&e));
        let wrapped = EtcdError::Rpc {
            op: "get",
            key: "/commit".into(),
            source: e,
        };
        assert!(wrapped.is_auth());
    }

    #[test]
    fn member_failures_are_told_from_request_outcomes() {
        use tonic::Status;
        let status = |s: Status| etcd_client::Error::GRpcStatus(s);
        for member in [
            status(Status::unavailable("etcdserver: no leader")),
            status(Status::unavailable(
                "error trying to connect: tcp connect error",
            )),
            status(Status::cancelled("Timeout expired")),
            status(Status::unknown("h2 protocol error")),
            status(Status::resource_exhausted("etcdserver: too many requests")),
            etcd_client::Error::WatchError("failed to create lease keeper".into()),
        ] {
            assert!(is_member_failure(&member), "{member}");
        }
        for outcome in [
            status(Status::unauthenticated("etcdserver: invalid auth token")),
            status(Status::permission_denied("etcdserver: permission denied")),
            status(Status::out_of_range(
                "etcdserver: mvcc: required revision has been compacted",
            )),
            status(Status::not_found("etcdserver: requested lease not found")),
            status(Status::resource_exhausted(
                "etcdserver: mvcc: database space exceeded",
            )),
            status(Status::invalid_argument(
                "etcdserver: authentication failed, invalid user ID or password",
            )),
            etcd_client::Error::LeaseKeepAliveError("lease not found".into()),
        ] {
            assert!(!is_member_failure(&outcome), "{outcome}");
        }
    }

    #[test]
    fn other_errors_are_not_auth_errors() {
        let e = etcd_client::Error::GRpcStatus(tonic::Status::unavailable("connection refused"));
        assert!(!is_auth_error(&e));
        let e = etcd_client::Error::WatchError("closed".into());
        assert!(!is_auth_error(&e));
        assert!(!EtcdError::Unavailable {
            op: "put",
            key: "/x".into()
        }
        .is_auth());
        assert!(EtcdError::Watch {
            reason: "canceled: etcdserver: permission denied".into()
        }
        .is_auth());
    }
}
