//! The observed state of each service and the events the supervisor broadcasts: types
//! only, published by the actors.
//!
//! Owns: the service states (`starting|running|backoff|fatal|stopped`), the status entry
//! of a service and the format of its status value (`"<state> <unix-ts>"`), and the
//! event kinds.
//! Must not: decide or do anything (the actors in `actor` fill these in).

use super::policy::RestartSource;
use super::spawn::ExitInfo;
use serde::Serialize;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceState {
    Starting,
    Running,
    Backoff,
    Fatal,
    Stopped,
}

impl fmt::Display for ServiceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Backoff => "backoff",
            Self::Fatal => "fatal",
            Self::Stopped => "stopped",
        })
    }
}

/// Observed state of one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub state: ServiceState,
    /// Unix time the state was entered.
    pub since: u64,
    pub pid: Option<u32>,
    /// Unix time the current process was started.
    pub started_at: Option<u64>,
    pub restarts_last_hour: u32,
    /// Restarts of any source (exit, health, cron, manual) since meduza started; only
    /// goes up, also across a stop and a later start of the service by `apply`.
    pub restarts_total: u64,
    pub last_exit: Option<ExitInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceEvent {
    pub name: String,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Started {
        pid: u32,
    },
    /// Sent the moment the child is reaped (the mihomo crash monitor relies on it).
    Exited {
        pid: u32,
        status: ExitInfo,
    },
    Restarted {
        source: RestartSource,
    },
    StateChanged {
        state: ServiceState,
        since: u64,
    },
}
