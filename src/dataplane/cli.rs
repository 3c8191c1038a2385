//! `meduza dataplane show|apply|remove`: the data plane from the command line.
//!
//! Owns: the clap definitions of the subcommand and its output. Must not: build a
//! plan from etcd or a snapshot (the integrator passes the plan in; the hidden
//! `--plan FILE` reads a `TproxyPlan` as JSON, for tests and the benchmark).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use meduza_generators::plan::tproxy::TproxyPlan;

use super::{ruleset, show, SystemDataplane};

/// `meduza dataplane ...`
#[derive(Debug, Clone, clap::Args)]
pub struct DataplaneArgs {
    #[command(subcommand)]
    pub cmd: DataplaneCmd,
    /// Read the plan from a JSON file (a `TproxyPlan`) instead of a snapshot.
    #[arg(long, global = true, hide = true, value_name = "FILE")]
    pub plan: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Subcommand)]
pub enum DataplaneCmd {
    /// Print the plan, the nftables ruleset and the policy routing it means.
    Show,
    /// Apply the plan (one nftables transaction; nothing when already applied).
    Apply,
    /// Remove table inet meduza and our policy routing.
    Remove,
    /// Print only the ruleset in nft syntax (for `nft -f`; used by the benchmark).
    #[command(hide = true)]
    Ruleset,
    /// Time `Dataplane::apply` in this process (as `meduza run` calls it): REPS
    /// rounds of remove (untimed) + apply (timed) + apply again (timed, a no-op);
    /// prints the medians in microseconds. Used by tests/bench/dataplane.sh.
    #[command(hide = true)]
    Bench {
        #[arg(long, default_value_t = 11)]
        reps: usize,
    },
}

/// Read a `TproxyPlan` from a JSON file.
pub fn load_plan_file(path: &Path) -> anyhow::Result<TproxyPlan> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading plan file {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing plan file {}", path.display()))
}

/// Run one dataplane command for `plan`, printing the plan and what changed.
pub async fn cli(cmd: DataplaneCmd, plan: TproxyPlan) -> anyhow::Result<()> {
    match cmd {
        DataplaneCmd::Show => print!("{}", show(&plan)),
        DataplaneCmd::Ruleset => print!("{}", ruleset::to_text(&ruleset::build(&plan))),
        DataplaneCmd::Apply => {
            let dp = SystemDataplane::from_env()?;
            let report = dp.apply(&plan).await?;
            println!("{report}");
        }
        DataplaneCmd::Remove => {
            let dp = SystemDataplane::from_env()?;
            let report = dp.remove().await?;
            println!("{report}");
        }
        DataplaneCmd::Bench { reps } => {
            let dp = SystemDataplane::from_env()?;
            let (mut apply, mut noop, mut listed) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..reps.max(1) {
                dp.remove().await?;
                let t = std::time::Instant::now();
                let first = dp.apply(&plan).await?;
                apply.push(t.elapsed().as_micros());
                // The daemon's case: the table is known and the generation unmoved.
                let t = std::time::Instant::now();
                let second = dp.apply(&plan).await?;
                noop.push(t.elapsed().as_micros());
                // A fresh instance (the CLI, a restarted daemon) lists and compares.
                let fresh = SystemDataplane::from_env()?;
                let t = std::time::Instant::now();
                let third = fresh.apply(&plan).await?;
                listed.push(t.elapsed().as_micros());
                anyhow::ensure!(
                    first.changed() && !second.changed() && !third.changed(),
                    "apply did not converge"
                );
            }
            dp.remove().await?;
            let median = |v: &mut Vec<u128>| {
                v.sort_unstable();
                v[v.len() / 2]
            };
            println!(
                "apply_us={} noop_us={} listed_us={}",
                median(&mut apply),
                median(&mut noop),
                median(&mut listed)
            );
        }
    }
    Ok(())
}
