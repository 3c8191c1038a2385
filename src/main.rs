//! The `meduza` binary: parses the command line and hands over to the modules.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "meduza", version, about = "Edge-gateway agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run only the supervisor with services from a JSON file (benchmarks, debugging).
    #[command(hide = true)]
    Supervise(meduza::supervise::cli::SuperviseArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match cli.command {
        Command::Supervise(args) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(meduza::supervise::cli::run(args))?;
        }
    }
    Ok(())
}
