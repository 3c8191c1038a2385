//! The `meduza` binary: wires subcommands to their modules.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "meduza",
    version,
    about = "Edge-gateway agent and fleet manager"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Fleet manager: register nodes, show their status, serve the web page.
    Fleet(meduza::fleet::FleetArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Fleet(args) => meduza::fleet::fleet_cli(args).await,
    }
}
