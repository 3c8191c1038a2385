//! Services as data (DESIGN §6): what the supervisor runs, how it probes it and how
//! restarts are protected. Built by generators; executed by `meduza::supervise`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How a changed configuration reaches a running child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReloadStrategy {
    /// Stop and start again (EasyTier, Tinc, MosDNS, OpenVPN/tunnel instances).
    Restart,
    /// Send SIGHUP (mihomo re-reads its `-f` file).
    Sighup,
    /// FRR: `frr-reload.py --reload`, falling back to `vtysh -f`.
    FrrReload,
}

/// One supervised child.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// Unique name, also the log prefix `[name]` and the status key.
    pub name: String,
    /// argv[0] is the program; never run through a shell.
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Run as this user (name); `None` keeps root.
    pub user: Option<String>,
    /// Capabilities kept (e.g. `CAP_NET_ADMIN`); every other one is dropped.
    pub caps: Vec<String>,
    /// Services that must be started before this one.
    pub after: Vec<String>,
    /// Files whose content, when changed, requires the reload strategy.
    pub config_files: Vec<String>,
    pub reload: ReloadStrategy,
    pub health: Option<HealthSpec>,
    /// Scheduled restart every N minutes (10 min .. 24 h).
    pub scheduled_restart_minutes: Option<u32>,
    pub protection: RestartProtection,
}

/// A health probe (the predecessor's tunnel watchdog, generalised).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Probe {
    /// The process is alive.
    Process,
    /// A TCP connect to `addr` (`host:port`) succeeds.
    Tcp { addr: String },
    /// HTTP GET `url` answers with a status in 200..400 (or `expect_status`).
    Http {
        url: String,
        expect_status: Option<u16>,
    },
    /// A fetch of `url` through the SOCKS5 proxy at `proxy` (`host:port`) succeeds.
    Socks5 { proxy: String, url: String },
    /// A DNS query for `name` (type A) at `server` (`ip:port`) gets an answer.
    Dns { server: String, name: String },
    /// `argv` exits 0 (no shell).
    Exec { argv: Vec<String> },
    /// None of the child's recent log lines matches `pattern` (a substring, case-insensitive).
    LogScan { pattern: String, lines: usize },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthSpec {
    pub probe: Probe,
    /// Seconds between probes.
    pub interval_secs: u64,
    /// Attempts before declaring failure (3).
    pub attempts: u32,
    /// Seconds between attempts (5).
    pub retry_delay_secs: u64,
    /// No probe this many seconds after start (30).
    pub grace_secs: u64,
    /// Per-attempt timeout.
    pub timeout_secs: u64,
}

impl HealthSpec {
    /// The seed's defaults around a probe: 3 attempts 5 s apart, 30 s grace.
    pub fn with_defaults(probe: Probe, interval_secs: u64) -> Self {
        Self {
            probe,
            interval_secs,
            attempts: 3,
            retry_delay_secs: 5,
            grace_secs: 30,
            timeout_secs: 10,
        }
    }
}

/// Restart protection shared by health and scheduled restarts (seed numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartProtection {
    /// Seconds that must pass after any restart before the next one (120).
    pub cooldown_secs: u64,
    /// Restarts allowed in any rolling hour (5).
    pub max_per_hour: u32,
}

impl Default for RestartProtection {
    fn default() -> Self {
        Self {
            cooldown_secs: 120,
            max_per_hour: 5,
        }
    }
}
