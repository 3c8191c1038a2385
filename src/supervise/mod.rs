//! Supervision of child programs (DESIGN §2, §6): the supervisord replacement.
//!
//! Owns: starting services from `ServiceSpec` data (argv without a shell, env, user,
//! capability set), capturing their output as `[svc] line` log lines, restarting
//! them (exit backoff; health, scheduled and manual restarts through the restart
//! policy and its persisted budget), applying configuration changes per reload
//! strategy, orderly shutdown in reverse start order, orphan reaping as a child
//! subreaper, and publishing per-service status and events.
//! Must not: read etcd, render configuration files, or run FRR's reload command
//! itself (that is the `FrrReloader` the integrator provides).
//!
//! Layout: `policy` (pure restart decisions) and `plan` (pure plan of `apply`) →
//! `supervisor` (executes `apply`, keeps the registry) → `actor` (one task per service)
//! with `loops` (its health-check loop and cron timer) → `spawn`/`reaper`/`health` (the
//! OS edge); `config` (tunables, the FRR hook), `status` (observed state and events),
//! `state_file` (the budget on disk), `cli` (`meduza supervise --services FILE.json`).

mod actor;
pub mod cli;
pub mod clock;
pub mod config;
pub mod frr;
pub mod health;
pub mod logbuf;
mod loops;
pub mod plan;
pub mod policy;
pub mod reaper;
pub mod spawn;
pub mod state_file;
pub mod status;
pub mod supervisor;

#[cfg(any(test, feature = "test-util"))]
pub use clock::FakeClock;
pub use clock::{Clock, SystemClock};
pub use config::{FrrReloader, SupervisorConfig};
pub use plan::{plan, Op};
pub use policy::{decide, BackoffPolicy, Decision, Event, RestartSource, RestartState};
#[cfg(any(test, feature = "test-util"))]
pub use spawn::FakeSpawner;
pub use spawn::{ExitInfo, RealSpawner, Spawner};
pub use status::{EventKind, ServiceEvent, ServiceState, ServiceStatus};
pub use supervisor::Supervisor;

use nix::sys::signal::Signal;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("service {service}: invalid {field} {value:?}: {reason}")]
    InvalidSpec {
        service: String,
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("service {service} is defined twice")]
    DuplicateService { service: String },
    #[error("service {service} starts after {dependency}, which is not a desired service")]
    UnknownDependency { service: String, dependency: String },
    #[error("service {service} is part of a dependency cycle")]
    DependencyCycle { service: String },
    #[error("service {service}: no such service")]
    UnknownService { service: String },
    #[error("service {service}: user {user:?} does not exist")]
    UnknownUser { service: String, user: String },
    #[error("service {service}: looking up user {user:?}: {source}")]
    UserLookup {
        service: String,
        user: String,
        source: nix::Error,
    },
    #[error("service {service}: reading capabilities: {reason}")]
    Caps { service: String, reason: String },
    #[error("service {service}: cannot start {program:?}: {source}")]
    Spawn {
        service: String,
        program: String,
        source: std::io::Error,
    },
    #[error("service {service}: sending {signal} to pid {pid}: {source}")]
    Signal {
        service: String,
        pid: u32,
        signal: Signal,
        source: nix::Error,
    },
    #[error("service {service}: not running")]
    NotRunning { service: String },
    #[error("service {service}: restart state file {path}: {source}")]
    StateFile {
        service: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("services file {path}: {source}")]
    ServicesFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("services file {path}: {source}")]
    ServicesJson {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("becoming child subreaper: {0}")]
    Subreaper(nix::Error),
    #[error("installing signal handler: {0}")]
    SignalHandler(std::io::Error),
    #[error("service {service}: supervisor task is gone")]
    ActorGone { service: String },
}
