//! `meduza`: the gateway agent and its operator CLI. This file only wires modules.

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand};
use meduza::etcd::{run_command, EtcdArgs, EtcdCommand, EtcdConfig, EtcdKv};
use meduza::offline;
use meduza::output::{OutputArgs, OutputFormat};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "meduza",
    version,
    about = "Edge-gateway agent: etcd → configs, children, TPROXY, DNS"
)]
struct Cli {
    #[command(flatten)]
    etcd: EtcdArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The gateway agent: watch etcd, reconcile, supervise children, serve DNS and the API.
    Run(meduza::daemon::RunArgs),
    /// Validate a snapshot; prints every error as `key: value: reason` (exit 2) and
    /// every unknown key as `warning: key: reason` (no effect on the exit code).
    ///
    /// `-o json`: one object with both (docs/cli-output.md), same exit codes.
    Validate {
        #[arg(long)]
        snapshot: PathBuf,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Validate the live keys, show each node's change against the previous commit,
    /// and bump /commit in one transaction that fails if a key changed meanwhile
    /// (exit 0 committed or dry run, 2 invalid, 3 changed since validation).
    Commit(meduza::commit::CommitArgs),
    /// Confirm a commit made with `--confirm` (writes /confirmed; default: the current
    /// /commit revision). Gateways roll such a commit back unless confirmed in time.
    Confirm {
        #[arg(long)]
        revision: Option<i64>,
    },
    /// Render the files one node would get into DIR (as if DIR were MEDUZA_ROOT).
    Render {
        #[arg(long)]
        snapshot: PathBuf,
        #[arg(long)]
        node: String,
        #[arg(long)]
        out: PathBuf,
        /// Print a unified diff against the files already in DIR.
        #[arg(long)]
        diff: bool,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// The predecessor's generator interface: JSON {node_id, node, global, all_nodes} on stdin.
    Gen {
        /// easytier, tinc, openvpn, wireguard, frr, clash, mosdns or hosts
        tool: String,
    },
    #[command(flatten)]
    Etcd(EtcdCommand),
    /// The TPROXY data plane: show, apply or remove the plan of a node (from a snapshot
    /// file, or from etcd when --snapshot is not given).
    Dataplane(DataplaneCli),
    /// The DNS frontend alone (`meduza dns serve --snapshot FILE --node ID [--listen ADDR]`).
    #[command(subcommand)]
    Dns(meduza::dns::cli::DnsCommand),
    /// Fleet manager: register nodes, show their status, serve the web page.
    Fleet(meduza::fleet::FleetArgs),
    /// Run only the supervisor with services from a JSON file (benchmarks, debugging).
    #[command(hide = true)]
    Supervise(meduza::supervise::cli::SuperviseArgs),
    /// Print a shell completion script (`meduza completions bash > /etc/bash_completion.d/meduza`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(clap::Args, Debug)]
struct DataplaneCli {
    /// Snapshot file (`meduza snapshot` output); without it the snapshot is read from etcd.
    #[arg(long, global = true)]
    snapshot: Option<PathBuf>,
    /// Node id whose plan to use.
    #[arg(long, global = true, env = "NODE_ID")]
    node: Option<String>,
    #[command(flatten)]
    inner: meduza::dataplane::DataplaneArgs,
}

/// Load and validate a snapshot from a file or, without one, from etcd.
async fn load_config(
    snapshot: Option<&std::path::Path>,
    etcd: &EtcdArgs,
) -> anyhow::Result<Result<meduza_generators::Config, Vec<meduza_generators::ValidationError>>> {
    match snapshot {
        Some(path) => Ok(offline::validate(path)),
        None => {
            let kv = EtcdKv::new(EtcdConfig::from_args(etcd)?);
            let keys = meduza::etcd::dump_snapshot(&kv).await?;
            let snap = meduza_generators::Snapshot(keys);
            Ok(meduza_generators::Config::parse(&snap).map_err(|e| e.0))
        }
    }
}

fn main() -> ExitCode {
    init_tracing();
    let cli = Cli::parse();
    if let Cmd::Completions { shell } = cli.cmd {
        clap_complete::generate(shell, &mut Cli::command(), "meduza", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    // `meduza run` resolves its settings (and performs the firmware boot duties) while
    // the process is still single-threaded: see daemon::settings.
    let settings = match &cli.cmd {
        Cmd::Run(args) => match meduza::daemon::settings::prepare(args, &cli.etcd) {
            Ok(s) => Some(s),
            Err(err) => {
                eprintln!("meduza: {err:#}");
                return ExitCode::from(offline::EXIT_INVALID as u8);
            }
        },
        _ => None,
    };
    // The supervisor alone needs no worker threads (smaller footprint); everything
    // else gets the multi-threaded runtime (the DNS frontend uses both cores).
    let rt = match cli.cmd {
        Cmd::Supervise(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("meduza: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli, settings)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("meduza: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // `MEDUZA_LOG` takes `level` or `target=level` directives, comma-separated
    // ("info,meduza::dns=debug"). `Targets` rather than `EnvFilter`: the same syntax
    // for what operators use, without the regex engine (about 300 KiB of code and
    // resident memory; docs/benchmarks-reconcile.md).
    let spec = std::env::var("MEDUZA_LOG").ok();
    let (filter, bad) = match spec.as_deref().map(str::parse::<Targets>) {
        Some(Ok(targets)) => (targets, None),
        Some(Err(err)) => (Targets::new().with_default(tracing::Level::INFO), Some(err)),
        None => (Targets::new().with_default(tracing::Level::INFO), None),
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: init redirects the log to a file/console
        // and operators grep it.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    tracing_subscriber::registry().with(fmt).with(filter).init();
    if let Some(err) = bad {
        tracing::warn!(%err, "MEDUZA_LOG not understood; logging at info");
    }
}

fn invalid(errors: &[meduza_generators::ValidationError], format: OutputFormat) -> ExitCode {
    ExitCode::from(offline::print_invalid(errors, format))
}

async fn run(cli: Cli, settings: Option<meduza::boot::Settings>) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Validate { snapshot, output } => Ok(ExitCode::from(
            offline::ValidateReport::of_file(&snapshot).print(output.format()),
        )),
        Cmd::Commit(args) => {
            let config = EtcdConfig::from_args(&cli.etcd)?;
            let (text, code) = meduza::commit::run(&args, &config).await?;
            print!("{text}");
            Ok(ExitCode::from(code))
        }
        Cmd::Render {
            snapshot,
            node,
            out,
            diff,
            output,
        } => {
            let format = output.format();
            let cfg = match offline::validate(&snapshot) {
                Ok(cfg) => cfg,
                Err(errors) => return Ok(invalid(&errors, format)),
            };
            match offline::render_to_dir(&cfg, &node, &out, diff) {
                Ok(summary) => {
                    match format {
                        OutputFormat::Table => print!("{}", summary.text()),
                        OutputFormat::Json => print!("{}", meduza::output::to_json(&summary)),
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(errors) => Ok(invalid(&errors, format)),
            }
        }
        Cmd::Gen { tool } => {
            let out = offline::gen_legacy(&tool)
                .map_err(anyhow::Error::msg)
                .context("gen")?;
            println!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run(args) => {
            let settings = settings.context("settings were not resolved")?;
            let cfg = meduza::daemon::RunConfig::from_settings(&settings, args.lease_ttl)?;
            meduza::daemon::run(cfg).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Dataplane(dp) => {
            let format = dp.inner.output.format();
            let plan = match &dp.inner.plan {
                Some(file) => meduza::dataplane::cli::load_plan_file(file)?,
                // Removal deletes our table and routes whatever the plan was.
                None if dp.inner.cmd == meduza::dataplane::DataplaneCmd::Remove
                    && dp.node.is_none() =>
                {
                    meduza_generators::plan::tproxy::TproxyPlan::empty()
                }
                None => {
                    let node_id = dp.node.clone().context("--node (or NODE_ID) is required")?;
                    let cfg = match load_config(dp.snapshot.as_deref(), &cli.etcd).await? {
                        Ok(cfg) => cfg,
                        Err(errors) => return Ok(invalid(&errors, format)),
                    };
                    let node = cfg
                        .node(&node_id)
                        .with_context(|| format!("no node {node_id} in the snapshot"))?;
                    let env = offline::env_from_process(offline::OFFLINE_CLASH_SECRET.into());
                    meduza_generators::render::tproxy_plan(&cfg, node, &env)
                }
            };
            meduza::dataplane::cli::cli(dp.inner.cmd, plan, format).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Dns(cmd) => {
            meduza::dns::cli::run(cmd).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Fleet(args) => {
            meduza::fleet::fleet_cli(args, &cli.etcd).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Supervise(args) => {
            meduza::supervise::cli::run(args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Confirm { revision } => {
            let kv = EtcdKv::new(EtcdConfig::from_args(&cli.etcd)?);
            let rev = meduza::reconcile::rollback::confirm(&kv, revision).await?;
            println!("confirmed revision {rev}");
            Ok(ExitCode::SUCCESS)
        }
        // Answered in `main` before the runtime starts.
        Cmd::Completions { .. } => Ok(ExitCode::SUCCESS),
        Cmd::Etcd(cmd) => {
            let kv = EtcdKv::new(EtcdConfig::from_args(&cli.etcd)?);
            print!("{}", run_command(&cmd, &kv).await?);
            Ok(ExitCode::SUCCESS)
        }
    }
}
