//! `meduza dns serve`: the command-line wiring of the standalone frontend, kept in
//! one place so `main.rs` only adds one subcommand.
//!
//! Owns: argument parsing for `dns serve` and reading the plan file.
//! Must not: contain frontend logic. The snapshot → plan conversion
//! (`--snapshot FILE --node ID`) belongs to the reconciler; until it lands this reads
//! a `DnsPlan` as JSON (`--plan FILE`).

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
    /// A `DnsPlan` as JSON.
    #[arg(long)]
    pub plan: PathBuf,
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
pub async fn run(cmd: DnsCommand) -> anyhow::Result<()> {
    match cmd {
        DnsCommand::Serve(a) => {
            let text = std::fs::read_to_string(&a.plan)
                .with_context(|| format!("reading plan {}", a.plan.display()))?;
            let plan: DnsPlan = serde_json::from_str(&text)
                .with_context(|| format!("parsing plan {}", a.plan.display()))?;
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
