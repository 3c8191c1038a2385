//! Local settings of `meduza run` (DESIGN §2): flags > environment >
//! `/etc/meduza/meduza.toml` > kernel command line > defaults, resolved by
//! `boot::load_settings`, plus the boot duties when init started us on a firmware.
//!
//! The resolved values are exported to the process environment *before* the async
//! runtime starts (the process is still single-threaded then), so every module that
//! reads its `MEDUZA_*`/`ETCD_*` variable sees the merged result, and children inherit
//! the same view.

use crate::boot::{self, Settings, SettingsLayer};
use crate::etcd::EtcdArgs;
use std::path::PathBuf;
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

/// Resolve the settings, run the boot duties when wanted, and export the result.
/// Must be called before any thread is started.
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
    export(&settings);
    Ok(settings)
}

fn export(s: &Settings) {
    let mut vars: Vec<(String, String)> = vec![
        ("NODE_ID".into(), s.node_id.clone()),
        ("ETCD_ENDPOINTS".into(), s.etcd_endpoints.join(",")),
        ("MEDUZA_ROOT".into(), s.root.display().to_string()),
        ("MEDUZA_STATE_DIR".into(), s.state_dir.display().to_string()),
        (
            "MEDUZA_DNS_LISTEN".into(),
            s.dns_listen
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ),
        ("MEDUZA_API_LISTEN".into(), s.api_listen.to_string()),
        (
            "MEDUZA_DATAPLANE".into(),
            match s.dataplane {
                boot::Dataplane::Nft => "nft".into(),
                boot::Dataplane::Off => "off".into(),
            },
        ),
    ];
    let opt =
        |k: &str, v: &Option<PathBuf>| v.as_ref().map(|p| (k.to_string(), p.display().to_string()));
    vars.extend(opt("ETCD_CA", &s.etcd_ca));
    vars.extend(opt("ETCD_CERT", &s.etcd_cert));
    vars.extend(opt("ETCD_KEY", &s.etcd_key));
    vars.extend(s.etcd_user.clone().map(|u| ("ETCD_USER".into(), u)));
    vars.extend(s.etcd_pass.clone().map(|p| ("ETCD_PASS".into(), p)));
    vars.extend(s.default_gw.map(|gw| ("DEFAULT_GW".into(), gw.to_string())));
    for (tool, path) in &s.bins {
        vars.push((
            format!("MEDUZA_BIN_{}", tool.env_suffix()),
            path.display().to_string(),
        ));
    }
    for (k, v) in vars {
        // Single-threaded at this point (see the module header).
        std::env::set_var(k, v);
    }
}
