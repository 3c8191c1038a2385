//! The `meduza` binary: parses the command line and wires the modules together.

use clap::{Parser, Subcommand};
use meduza::etcd::{run_command, EtcdArgs, EtcdCommand, EtcdConfig, EtcdKv};

#[derive(Debug, Parser)]
#[command(name = "meduza", version, about = "Edge-gateway agent")]
struct Cli {
    #[command(flatten)]
    etcd: EtcdArgs,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Etcd(EtcdCommand),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Command::Etcd(cmd) => {
            let kv = EtcdKv::new(EtcdConfig::from_args(&cli.etcd)?);
            let out = run_command(&cmd, &kv).await?;
            print!("{out}");
        }
    }
    Ok(())
}
