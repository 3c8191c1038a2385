//! Local settings of `meduza run` (DESIGN §2): flags > environment >
//! `/etc/meduza/meduza.toml` > kernel command line > defaults, resolved by
//! `boot::load_settings`, plus the boot duties when init started us on a firmware.
//!
//! The resolved [`Settings`] are handed down from `main` as a value (into
//! [`RunConfig`](super::RunConfig) and from there to the etcd client, the data plane,
//! WireGuard, FRR and the generators). They are never written back into the process
//! environment: that would put `ETCD_PASS` where every child could inherit it, and
//! make a module's view depend on whether it reads before or after the export.
//! The environment is read once, as the `env` layer of [`boot::load_settings`]; only
//! the hidden test knobs (`MEDUZA_LEASE_TTL`, `MEDUZA_MINUTE_MS`) are read beside it.

use crate::boot::{self, Settings, SettingsLayer};
use crate::etcd::EtcdArgs;
use crate::supervise::SupervisorConfig;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracing::{info, warn};

/// Flags of `meduza run` (each also has its environment variable, read by the
/// settings resolver, not by clap).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RunArgs {
    /// This gateway's id (`NODE_ID`; default: the hostname).
    #[arg(long)]
    pub node_id: Option<String>,
    /// Prefix for every file meduza writes (`MEDUZA_ROOT`).
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Persistent state directory (`MEDUZA_STATE_DIR`).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Node HTTP API address (`MEDUZA_API_LISTEN`).
    #[arg(long)]
    pub api_listen: Option<std::net::SocketAddr>,
    /// Perform the firmware boot duties (mounts, modules, loopback, hostname) when
    /// started by init (`MEDUZA_BOOT=1`).
    #[arg(long)]
    pub boot: bool,
    /// TTL of the online lease, seconds (DESIGN §4: 15; tests shorten it).
    #[arg(long, env = "MEDUZA_LEASE_TTL", default_value_t = 15, hide = true)]
    pub lease_ttl: i64,
}

fn flags_layer(args: &RunArgs, etcd: &EtcdArgs) -> SettingsLayer {
    let mut l = SettingsLayer {
        node_id: args.node_id.clone(),
        root: args.root.clone(),
        state_dir: args.state_dir.clone(),
        api_listen: args.api_listen,
        boot: args.boot.then_some(true),
        ..SettingsLayer::default()
    };
    // Global --etcd-* flags count as flags only when given on the command line; clap
    // has already folded ETCD_* into them, which the resolver reads itself anyway.
    if std::env::args().any(|a| a.starts_with("--etcd-endpoints")) {
        l.etcd_endpoints = Some(
            etcd.endpoints
                .split(',')
                .map(|s| s.trim().to_string())
                .collect(),
        );
    }
    l
}

/// Resolve the settings and run the boot duties when wanted. Must be called before
/// any thread is started (the boot duties mount and remount).
pub fn prepare(args: &RunArgs, etcd: &EtcdArgs) -> anyhow::Result<Settings> {
    let flags = flags_layer(args, etcd);
    let (mut settings, mut unknown) = boot::load_settings(&flags)?;
    let ppid = nix::unistd::getppid().as_raw() as u32;
    if boot::boot_duties_wanted(&settings, std::process::id(), ppid) {
        let report = boot::run_boot_duties(&boot::RealBootOs::default(), &settings);
        info!(?report, "boot duties done");
        // /proc is mounted now: the kernel command line can be read.
        (settings, unknown) = boot::load_settings(&flags)?;
    }
    for key in unknown {
        warn!(key, "unknown meduza.* kernel parameter ignored");
    }
    Ok(settings)
}

/// One minute of `meduza run`'s timers: the test knob `MEDUZA_MINUTE_MS` (parsed by
/// [`super::clash::minute_from`]), its one reader. Unset, a minute is 60 s; set, the
/// Clash and MosDNS refresh intervals, the scheduled restarts, the 120 s cooldown and
/// the rolling hour all shrink by the same factor (docs/supervision.md,
/// `tests/gateway/gateway_cron.rs`). Operators leave it unset.
pub fn minute() -> Duration {
    let raw = std::env::var(super::clash::MINUTE_MS_ENV).ok();
    let minute = super::clash::minute_from(raw.as_deref()).unwrap_or_else(|reason| {
        warn!(%reason, "MEDUZA_MINUTE_MS ignored; one minute is 60 s");
        Duration::from_secs(60)
    });
    if minute != Duration::from_secs(60) {
        info!(
            minute_ms = minute.as_millis() as u64,
            "timers scaled by MEDUZA_MINUTE_MS (test knob)"
        );
    }
    minute
}

/// The supervisor's tunables in `meduza run`: the state directory and [`minute`].
pub fn supervisor_config(state_dir: &Path, minute: Duration) -> SupervisorConfig {
    let mut config = SupervisorConfig::new(state_dir);
    config.minute = minute;
    config
}
