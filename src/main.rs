//! `meduza`: the gateway agent and its CLI. Only wiring lives here.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "meduza", version, about = "Edge-gateway agent")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// nftables TPROXY and policy routing: show, apply or remove a plan.
    Dataplane(meduza::dataplane::DataplaneArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cli.cmd {
        Cmd::Dataplane(args) => rt.block_on(meduza::dataplane::cli::run_with_plan_file(args)),
    }
}
