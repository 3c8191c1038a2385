//! `meduza dns serve`: the command-line wiring of the standalone frontend, kept in
//! one place so `main.rs` only adds one subcommand.
//!
//! Owns: argument parsing for `dns serve` and reading the plan file.
//! Must not: contain frontend logic; the snapshot → plan conversion is the
//! generators' `render::dns_plan`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use meduza_generators::plan::dns::DnsPlan;

use super::{DnsConfig, UdpMode};

#[derive(Debug, clap::Subcommand)]
pub enum DnsCommand {
    /// Serve DNS from a plan file, without etcd.
    Serve(ServeArgs),
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Snapshot file (`meduza snapshot` output) to take the node's DNS plan from.
    #[arg(long, required_unless_present = "plan")]
    pub snapshot: Option<PathBuf>,
    /// Node whose plan to serve (with --snapshot).
    #[arg(long, env = "NODE_ID", requires = "snapshot")]
    pub node: Option<String>,
    /// A `DnsPlan` as JSON instead of a snapshot (benchmarks).
    #[arg(long, hide = true, conflicts_with = "snapshot")]
    pub plan: Option<PathBuf>,
    /// Listen addresses, comma-separated.
    #[arg(long, env = "MEDUZA_DNS_LISTEN", value_delimiter = ',', default_value = super::DEFAULT_LISTEN)]
    pub listen: Vec<SocketAddr>,
    /// Cache entries (0 disables the cache).
    #[arg(long, default_value_t = 10_000)]
    pub cache_size: usize,
    /// Forwarded queries in flight before SERVFAIL.
    #[arg(long, default_value_t = 1024)]
    pub max_inflight: usize,
    /// UDP sockets per listen address (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub udp_workers: usize,
    #[arg(long, value_enum, default_value_t = UdpMode::Native)]
    pub udp_mode: UdpMode,
    /// Name the upstream health check queries.
    #[arg(long, default_value = "example.com")]
    pub health_check_name: String,
    /// Per-address attempt timeout in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub attempt_timeout_ms: u64,
}

/// Runs a `meduza dns ...` command.
/// The plan from `--plan FILE` or from `--snapshot FILE --node ID`.
fn load_plan(a: &ServeArgs) -> anyhow::Result<DnsPlan> {
    if let Some(path) = &a.plan {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading plan {}", path.display()))?;
        return serde_json::from_str(&text)
            .with_context(|| format!("parsing plan {}", path.display()));
    }
    let snapshot = a
        .snapshot
        .as_ref()
        .context("--snapshot or --plan is required")?;
    let node_id = a
        .node
        .as_deref()
        .context("--node (or NODE_ID) is required")?;
    let cfg = crate::offline::validate(snapshot).map_err(|errors| {
        crate::offline::print_errors(&errors);
        anyhow::anyhow!("{} invalid key(s) in {}", errors.len(), snapshot.display())
    })?;
    let node = cfg
        .node(node_id)
        .with_context(|| format!("no node {node_id} in {}", snapshot.display()))?;
    Ok(meduza_generators::render::dns_plan(&cfg, node))
}

pub async fn run(cmd: DnsCommand) -> anyhow::Result<()> {
    match cmd {
        DnsCommand::Serve(a) => {
            let plan = load_plan(&a)?;
            let config = DnsConfig {
                listen: a.listen,
                cache_size: a.cache_size,
                max_inflight: a.max_inflight,
                udp_workers: a.udp_workers,
                udp_mode: a.udp_mode,
                health_check_name: a.health_check_name,
                attempt_timeout: Duration::from_millis(a.attempt_timeout_ms),
                ..DnsConfig::default()
            };
            super::serve_standalone_with(plan, config).await
        }
    }
}
