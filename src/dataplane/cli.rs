//! `meduza dataplane show|apply|remove`: the data plane from the command line.
//!
//! Owns: the clap definitions of the subcommand and its output, text or `-o json`
//! ([`ShowReport`], [`ApplyOutput`]; docs/cli-output.md). Must not: build a plan from
//! etcd or a snapshot (the integrator passes the plan in; the hidden `--plan FILE`
//! reads a `TproxyPlan` as JSON, for tests and the benchmark), or touch the system
//! for `show` (it runs without root: only `apply`, `remove` and `bench` open nftables
//! and rtnetlink).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use meduza_generators::plan::tproxy::TproxyPlan;
use serde::Serialize;

use super::{routing_spec, ruleset, show, ApplyReport, SystemDataplane};
use crate::output::{to_json, OutputArgs, OutputFormat};

/// `meduza dataplane ...`
#[derive(Debug, Clone, clap::Args)]
pub struct DataplaneArgs {
    #[command(subcommand)]
    pub cmd: DataplaneCmd,
    /// Read the plan from a JSON file (a `TproxyPlan`) instead of a snapshot.
    #[arg(long, global = true, hide = true, value_name = "FILE")]
    pub plan: Option<PathBuf>,
    /// `-o json` for `show`, `apply` and `remove` (`ruleset` and `bench` print text).
    #[command(flatten)]
    pub output: OutputArgs,
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

/// `meduza dataplane show -o json`: the plan and what it means in the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShowReport<'a> {
    /// Always `true` (a refused snapshot prints the invalid report instead).
    pub ok: bool,
    /// The TPROXY plan as the daemon would apply it (`TproxyPlan`'s own fields).
    pub plan: &'a TproxyPlan,
    /// table `inet meduza` in nft syntax (what `nft -f` would load).
    pub nftables: String,
    /// The policy routing the plan needs, IPv4 and IPv6 alike; `null` while
    /// `plan.proxy_down` (TPROXY removed: no routing).
    pub routing: Option<ShowRouting>,
}

/// `rule pref <priority> fwmark <mark> lookup <table>` plus `route local default dev
/// lo table <table>`, as numbers: the CLI's view of [`super::RoutingSpec`], which is
/// the routing edge's input and stays free to change shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ShowRouting {
    pub priority: u32,
    pub mark: u32,
    pub table: u32,
}

impl<'a> ShowReport<'a> {
    /// Pure: builds the ruleset, opens nothing.
    pub fn new(plan: &'a TproxyPlan) -> Self {
        let spec = routing_spec(plan);
        Self {
            ok: true,
            plan,
            nftables: ruleset::to_text(&ruleset::build(plan)),
            routing: (!plan.proxy_down).then_some(ShowRouting {
                priority: spec.priority,
                mark: spec.mark,
                table: spec.table,
            }),
        }
    }
}

/// `meduza dataplane apply|remove -o json`: what changed in the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApplyOutput<'a> {
    /// Always `true` (a failure exits 1 with the error on stderr).
    pub ok: bool,
    /// `apply` or `remove`.
    pub action: &'static str,
    /// Whether anything in the kernel changed.
    pub changed: bool,
    /// `nft` (`Unchanged`, `Created`, `Replaced`, `Deleted`, `Absent`) and `routing`
    /// (`[{"Add": "RuleV4"}, ...]`): [`ApplyReport`] as it serializes.
    #[serde(flatten)]
    pub report: &'a ApplyReport,
}

impl<'a> ApplyOutput<'a> {
    pub fn new(action: &'static str, report: &'a ApplyReport) -> Self {
        Self {
            ok: true,
            action,
            changed: report.changed(),
            report,
        }
    }

    /// The text (`ApplyReport`'s one line) or the JSON.
    fn render(&self, format: OutputFormat) -> String {
        match format {
            OutputFormat::Table => format!("{}\n", self.report),
            OutputFormat::Json => to_json(self),
        }
    }
}

/// Run one dataplane command for `plan`, printing the plan and what changed in
/// `format` (`ruleset` and `bench` always print text).
pub async fn cli(cmd: DataplaneCmd, plan: TproxyPlan, format: OutputFormat) -> anyhow::Result<()> {
    match cmd {
        DataplaneCmd::Show => match format {
            OutputFormat::Table => print!("{}", show(&plan)),
            OutputFormat::Json => print!("{}", to_json(&ShowReport::new(&plan))),
        },
        DataplaneCmd::Ruleset => print!("{}", ruleset::to_text(&ruleset::build(&plan))),
        DataplaneCmd::Apply => {
            let dp = SystemDataplane::from_env()?;
            let report = dp.apply(&plan).await?;
            print!("{}", ApplyOutput::new("apply", &report).render(format));
        }
        DataplaneCmd::Remove => {
            let dp = SystemDataplane::from_env()?;
            let report = dp.remove().await?;
            print!("{}", ApplyOutput::new("remove", &report).render(format));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::{NftChange, RouteItem, RoutingOp};

    fn plan() -> TproxyPlan {
        let mut p = TproxyPlan::empty();
        p.proxy_src = vec!["192.168.50.0/24".parse().unwrap()];
        p
    }

    #[test]
    fn show_json_has_the_plan_ruleset_and_routing() {
        let p = plan();
        let v: serde_json::Value = serde_json::from_str(&to_json(&ShowReport::new(&p))).unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(v["plan"]["proxy_src"][0], "192.168.50.0/24");
        assert_eq!(v["plan"]["port"], p.port);
        assert!(
            v["nftables"]
                .as_str()
                .is_some_and(|t| t.contains("table inet meduza")),
            "{v}"
        );
        assert_eq!(v["routing"]["mark"], p.mark);
        assert_eq!(v["routing"]["table"], p.table);
        assert!(v["routing"]["priority"].is_u64(), "{v}");

        let mut down = plan();
        down.proxy_down = true;
        let v = serde_json::to_value(ShowReport::new(&down)).unwrap();
        assert!(v["routing"].is_null(), "{v}");
    }

    #[test]
    fn apply_json_names_the_action_and_the_changes() {
        let report = ApplyReport {
            nft: NftChange::Created,
            routing: vec![RoutingOp::Add(RouteItem::RuleV4)],
        };
        let out = ApplyOutput::new("apply", &report);
        let v: serde_json::Value = serde_json::from_str(&out.render(OutputFormat::Json)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "ok": true,
                "action": "apply",
                "changed": true,
                "nft": "Created",
                "routing": [{"Add": "RuleV4"}],
            })
        );
        let text = out.render(OutputFormat::Table);
        assert_eq!(text, format!("{report}\n"));
    }
}
