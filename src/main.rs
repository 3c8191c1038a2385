//! The `meduza` binary: wires the modules' commands together.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "meduza", version, about = "Edge-gateway agent")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// DNS frontend commands.
    #[command(subcommand)]
    Dns(meduza::dns::cli::DnsCommand),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Dns(c) => meduza::dns::cli::run(c).await,
    }
}
