//! The data plane: nftables TPROXY (table `inet meduza`), its policy routing, drift
//! repair, and WireGuard devices (DESIGN §7).
//!
//! Owns: table `inet meduza`, the `fwmark → table` rules and the `local default dev
//! lo` routes of the TPROXY table, and the WireGuard devices it is given. Must not:
//! touch any other nftables table, rule or route, read etcd, or decide *whether*
//! TPROXY should be on (the caller passes `Some(plan)` or `None`).
//!
//! Stages: [`ruleset::build`] (pure: plan → ruleset data) → [`Dataplane::apply`]
//! (compare installed with desired; one nft transaction only when they differ;
//! routing items added only when missing) → [`Dataplane::observe`] (status). The OS
//! edge sits behind [`Nft`] and [`Routing`], each with a real implementation and a
//! fake that models kernel state.

pub mod cli;
pub mod nfnl;
pub mod nfnl_ruleset;
pub mod nft;
pub mod routing;
pub mod ruleset;
pub mod task;
pub mod wireguard;

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Mutex;

use meduza_generators::plan::tproxy::TproxyPlan;
use serde::Serialize;

pub use cli::{cli, DataplaneArgs, DataplaneCmd};
pub use nft::{FakeNft, NetlinkNft, Nft, Transaction};
pub use routing::{FakeRouting, RouteItem, Routing, RoutingOp, RoutingSpec, RtnlRouting};
pub use task::{spawn_task, ConvergeError, DataplaneHandle, TaskStatus};

/// Environment variable selecting the implementation: `nft` (default) or `off`.
pub const ENV_DATAPLANE: &str = "MEDUZA_DATAPLANE";

/// Errors of the data plane, each naming the operation and the object.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("nft {op} failed ({program}): {detail}")]
    Nft {
        op: &'static str,
        program: String,
        detail: String,
    },
    #[error("cannot read nft output: {reason}")]
    NftOutput { reason: String },
    #[error("table inet meduza still differs from the plan after applying it")]
    NotConverged,
    #[error("netlink: {op}: {source}")]
    Netlink {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("nf_tables transaction: {0}")]
    NfTables(#[from] nfnl::NfnlError),
    #[error("cannot encode the ruleset for netlink: {0}")]
    Encode(#[from] nfnl_ruleset::EncodeError),
    #[error("rtnetlink: {op}: {detail}")]
    Rtnetlink { op: &'static str, detail: String },
    #[error("{var}={value}: expected `nft` or `off`")]
    BadMode { var: &'static str, value: String },
}

impl From<ruleset::ListingError> for DataplaneError {
    fn from(e: ruleset::ListingError) -> Self {
        DataplaneError::NftOutput { reason: e.reason }
    }
}

/// What an apply or removal did to table `inet meduza`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum NftChange {
    /// Installed table already equal to the desired one: no transaction sent.
    Unchanged,
    /// Table was absent and has been created.
    Created,
    /// Table differed and has been replaced (delete + add in one transaction).
    Replaced,
    /// Table was present and has been deleted.
    Deleted,
    /// Removal asked for, table already absent.
    Absent,
}

/// The outcome of one apply or removal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApplyReport {
    pub nft: NftChange,
    pub routing: Vec<RoutingOp>,
}

impl ApplyReport {
    /// Whether anything in the kernel changed.
    pub fn changed(&self) -> bool {
        !matches!(self.nft, NftChange::Unchanged | NftChange::Absent) || !self.routing.is_empty()
    }
}

impl fmt::Display for ApplyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nft = match self.nft {
            NftChange::Unchanged => "table inet meduza unchanged",
            NftChange::Created => "table inet meduza created",
            NftChange::Replaced => "table inet meduza replaced",
            NftChange::Deleted => "table inet meduza deleted",
            NftChange::Absent => "table inet meduza already absent",
        };
        write!(f, "{nft}; routing: ")?;
        if self.routing.is_empty() {
            return write!(f, "unchanged");
        }
        let ops: Vec<String> = self
            .routing
            .iter()
            .map(|op| match op {
                RoutingOp::Add(i) => format!("added {i:?}"),
                RoutingOp::Delete(i) => format!("deleted {i:?}"),
            })
            .collect();
        write!(f, "{}", ops.join(", "))
    }
}

/// Observed state of the data plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DataplaneStatus {
    pub table_present: bool,
    pub rule_count: usize,
    /// Whether the table equals the last plan applied through this instance
    /// (`None` when nothing was applied yet, or it was removed).
    pub matches_last_plan: Option<bool>,
    pub routing_present: BTreeSet<RouteItem>,
}

/// The routing spec of a plan.
pub fn routing_spec(plan: &TproxyPlan) -> RoutingSpec {
    RoutingSpec {
        mark: plan.mark,
        table: plan.table,
        priority: meduza_generators::plan::tproxy::TPROXY_RULE_PRIORITY,
    }
}

/// The plan and its ruleset as text, for `meduza dataplane show`.
pub fn show(plan: &TproxyPlan) -> String {
    let spec = routing_spec(plan);
    let plan_json = serde_json::to_string_pretty(plan).unwrap_or_else(|e| format!("<{e}>"));
    let routing = if plan.proxy_down {
        "none (TPROXY removed)\n".to_string()
    } else {
        format!(
            "rule pref {prio} fwmark {mark:#x} lookup {table}\n\
             route local default dev lo table {table}\n",
            prio = spec.priority,
            mark = spec.mark,
            table = spec.table,
        )
    };
    format!(
        "# plan\n{plan_json}\n\n# nftables (one transaction)\n{}\n# policy routing (IPv4 and IPv6)\n{routing}",
        ruleset::to_text(&ruleset::build(plan)),
    )
}

/// The data plane over an nftables edge `N` and a routing edge `R`.
#[derive(Debug)]
pub struct Dataplane<N: Nft, R: Routing> {
    nft: N,
    routing: R,
    /// The last plan applied, and the generation at which the installed table was
    /// last found equal to it (the drift check's shortcut).
    memo: Mutex<Memo>,
}

#[derive(Debug, Default)]
struct Memo {
    last_plan: Option<TproxyPlan>,
    verified_generation: Option<u32>,
}

impl<N: Nft, R: Routing> Dataplane<N, R> {
    pub fn new(nft: N, routing: R) -> Self {
        Self {
            nft,
            routing,
            memo: Mutex::new(Memo::default()),
        }
    }

    pub fn nft(&self) -> &N {
        &self.nft
    }

    pub fn routing(&self) -> &R {
        &self.routing
    }

    fn memo(&self) -> std::sync::MutexGuard<'_, Memo> {
        // The memo is a cache; a poisoned one is still usable.
        self.memo.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Make the kernel match `plan`: the table (one transaction, skipped when the
    /// installed table already equals the desired one) and the routing items (each
    /// added only when missing).
    ///
    /// The table is only listed (`nft -j list`, 65 ms at 10,000 CIDRs) when the plan
    /// changed or someone committed an nftables transaction since we last knew the
    /// table's content: the ruleset generation counts every committed transaction,
    /// of anyone, so an unmoved generation proves the table is as we left it.
    pub async fn apply(&self, plan: &TproxyPlan) -> Result<ApplyReport, DataplaneError> {
        let generation = self.nft.generation().await.ok();
        let known = {
            let memo = self.memo();
            generation.is_some()
                && memo.verified_generation == generation
                && memo.last_plan.as_ref() == Some(plan)
        };
        // Built only when the table is not known to be equal.
        let rs = (!known).then(|| ruleset::build(plan));
        let nft = if let Some(rs) = &rs {
            let installed = match self.nft.list_table().await? {
                Some(listing) => ruleset::view_of_listing(&listing)?,
                None => None,
            };
            // The desired view is only needed to compare; skip it on a first apply.
            let nft = match &installed {
                Some(view) if *view == ruleset::desired_view(rs) => NftChange::Unchanged,
                Some(_) => NftChange::Replaced,
                None => NftChange::Created,
            };
            match nft {
                NftChange::Created => self.nft.apply(Transaction::Create(rs)).await?,
                NftChange::Replaced => self.nft.apply(Transaction::Replace(rs)).await?,
                _ => {}
            }
            nft
        } else {
            NftChange::Unchanged
        };
        // After our transaction, a generation exactly one past the one read before
        // proves no other transaction came in between: the table is what we sent.
        let verified = match nft {
            NftChange::Created | NftChange::Replaced => {
                let after = self.nft.generation().await.ok();
                after.filter(|&a| generation.map(|g| g.wrapping_add(1)) == Some(a))
            }
            _ => generation,
        };
        let spec = routing_spec(plan);
        let present = self.routing.present(spec).await?;
        // While TPROXY is removed nothing is marked: no policy routing either.
        let ops = routing::plan_routing(!plan.proxy_down, &present);
        // Independent items: sent together, one round trip instead of four.
        futures::future::try_join_all(ops.iter().map(|op| async move {
            match op {
                RoutingOp::Add(item) => self.routing.add(spec, *item).await,
                RoutingOp::Delete(item) => self.routing.delete(spec, *item).await,
            }
        }))
        .await?;
        let mut memo = self.memo();
        memo.last_plan = Some(plan.clone());
        memo.verified_generation = verified;
        let report = ApplyReport { nft, routing: ops };
        if report.changed() {
            tracing::info!(nft = ?report.nft, routing = ?report.routing, "tproxy applied");
        } else {
            tracing::debug!("tproxy already applied");
        }
        Ok(report)
    }

    /// Delete table `inet meduza` and our routing items; nothing else.
    pub async fn remove(&self) -> Result<ApplyReport, DataplaneError> {
        let present_table = self.nft.list_table().await?.is_some();
        let nft = if present_table {
            self.nft.apply(Transaction::Delete).await?;
            NftChange::Deleted
        } else {
            NftChange::Absent
        };
        let spec = {
            let memo = self.memo();
            memo.last_plan
                .as_ref()
                .map(routing_spec)
                .unwrap_or_else(|| routing_spec(&TproxyPlan::empty()))
        };
        let present = self.routing.present(spec).await?;
        let ops = routing::plan_routing(false, &present);
        for op in &ops {
            if let RoutingOp::Delete(item) = op {
                self.routing.delete(spec, *item).await?;
            }
        }
        let mut memo = self.memo();
        memo.last_plan = None;
        memo.verified_generation = None;
        let report = ApplyReport { nft, routing: ops };
        if report.changed() {
            tracing::info!(nft = ?report.nft, routing = ?report.routing, "tproxy removed");
        }
        Ok(report)
    }

    /// The drift check: converge to `desired` cheaply. While the nftables generation
    /// is the one at which the table was last known equal to the plan, nothing is
    /// listed (see [`apply`](Self::apply)); the routing items are always checked.
    /// Returns the report only when something was changed.
    pub async fn ensure(
        &self,
        desired: Option<&TproxyPlan>,
    ) -> Result<Option<ApplyReport>, DataplaneError> {
        let report = match desired {
            Some(plan) => self.apply(plan).await?,
            None => self.remove().await?,
        };
        Ok(report.changed().then_some(report))
    }

    /// What is installed now.
    pub async fn observe(&self) -> Result<DataplaneStatus, DataplaneError> {
        let view = match self.nft.list_table().await? {
            Some(listing) => ruleset::view_of_listing(&listing)?,
            None => None,
        };
        let last_plan = self.memo().last_plan.clone();
        let spec = last_plan
            .as_ref()
            .map(routing_spec)
            .unwrap_or_else(|| routing_spec(&TproxyPlan::empty()));
        let routing_present = self.routing.present(spec).await?;
        let matches_last_plan = last_plan.map(|p| {
            view.as_ref() == Some(&ruleset::desired_view(&ruleset::build(&p)))
                && routing_present.len() == RouteItem::ALL.len()
        });
        Ok(DataplaneStatus {
            table_present: view.is_some(),
            rule_count: view.as_ref().map_or(0, ruleset::TableView::rule_count),
            matches_last_plan,
            routing_present,
        })
    }
}

/// The nftables edge chosen at runtime by `MEDUZA_DATAPLANE`.
#[derive(Debug, Clone)]
pub enum AnyNft {
    Real(NetlinkNft),
    /// `off`: the in-memory model, logging what it would apply.
    Off(FakeNft),
}

impl Nft for AnyNft {
    async fn list_table(&self) -> Result<Option<serde_json::Value>, DataplaneError> {
        match self {
            AnyNft::Real(n) => n.list_table().await,
            AnyNft::Off(n) => n.list_table().await,
        }
    }
    async fn apply(&self, tx: Transaction<'_>) -> Result<(), DataplaneError> {
        match self {
            AnyNft::Real(n) => n.apply(tx).await,
            AnyNft::Off(n) => n.apply(tx).await,
        }
    }
    async fn generation(&self) -> Result<u32, DataplaneError> {
        match self {
            AnyNft::Real(n) => n.generation().await,
            AnyNft::Off(n) => n.generation().await,
        }
    }
}

/// The routing edge chosen at runtime by `MEDUZA_DATAPLANE`.
#[derive(Debug, Clone)]
pub enum AnyRouting {
    Real(RtnlRouting),
    Off(FakeRouting),
}

impl Routing for AnyRouting {
    async fn present(&self, spec: RoutingSpec) -> Result<BTreeSet<RouteItem>, DataplaneError> {
        match self {
            AnyRouting::Real(r) => r.present(spec).await,
            AnyRouting::Off(r) => r.present(spec).await,
        }
    }
    async fn add(&self, spec: RoutingSpec, item: RouteItem) -> Result<(), DataplaneError> {
        match self {
            AnyRouting::Real(r) => r.add(spec, item).await,
            AnyRouting::Off(r) => r.add(spec, item).await,
        }
    }
    async fn delete(&self, spec: RoutingSpec, item: RouteItem) -> Result<(), DataplaneError> {
        match self {
            AnyRouting::Real(r) => r.delete(spec, item).await,
            AnyRouting::Off(r) => r.delete(spec, item).await,
        }
    }
}

/// The data plane `meduza run` and the CLI use.
pub type SystemDataplane = Dataplane<AnyNft, AnyRouting>;

/// Whether `MEDUZA_DATAPLANE` selects the logging no-op mode.
pub fn mode_off_from_env() -> Result<bool, DataplaneError> {
    match std::env::var(ENV_DATAPLANE) {
        Err(_) => Ok(false),
        Ok(v) if v == "nft" || v.is_empty() => Ok(false),
        Ok(v) if v == "off" => Ok(true),
        Ok(value) => Err(DataplaneError::BadMode {
            var: ENV_DATAPLANE,
            value,
        }),
    }
}

impl SystemDataplane {
    /// Build from the environment (`MEDUZA_DATAPLANE`, `MEDUZA_BIN_NFT`): the
    /// `meduza dataplane` CLI. `meduza run` hands its resolved settings to
    /// [`SystemDataplane::system`] instead.
    pub fn from_env() -> Result<Self, DataplaneError> {
        Self::system(mode_off_from_env()?, NetlinkNft::from_env())
    }

    /// The logging no-op when `off`, else nftables (listing with `nft`) and rtnetlink.
    /// Opens an rtnetlink connection in the calling thread's network namespace; needs
    /// a tokio runtime.
    pub fn system(off: bool, nft: NetlinkNft) -> Result<Self, DataplaneError> {
        if off {
            tracing::info!("dataplane off: plans are logged, not applied");
            Ok(Dataplane::new(
                AnyNft::Off(FakeNft::logging()),
                AnyRouting::Off(FakeRouting::logging()),
            ))
        } else {
            Ok(Dataplane::new(
                AnyNft::Real(nft),
                AnyRouting::Real(RtnlRouting::new()?),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> TproxyPlan {
        let mut p = TproxyPlan::empty();
        p.proxy_src = vec!["192.168.50.0/24".parse().unwrap()];
        p.exclude_ports = vec![51820];
        p
    }

    fn dp() -> Dataplane<FakeNft, FakeRouting> {
        Dataplane::new(FakeNft::new(), FakeRouting::new())
    }

    #[tokio::test]
    async fn first_apply_creates_second_changes_nothing() {
        let dp = dp();
        let first = dp.apply(&plan()).await.unwrap();
        assert_eq!(first.nft, NftChange::Created);
        assert_eq!(first.routing.len(), 4);
        let generation = dp.nft().state().generation;
        let second = dp.apply(&plan()).await.unwrap();
        assert_eq!(
            second,
            ApplyReport {
                nft: NftChange::Unchanged,
                routing: vec![]
            }
        );
        assert!(!second.changed());
        assert_eq!(dp.nft().state().generation, generation);
        assert_eq!(dp.nft().state().applies, 1);
        assert_eq!(dp.routing().state().items.len(), 4);
        // What the kernel would hold, decoded from the netlink bytes, is the ruleset.
        let rs = ruleset::build(&plan());
        assert_eq!(
            dp.nft().state().table,
            Some(nfnl_ruleset::TableModel::of(&rs))
        );
        let sent = dp.nft().state().last_batch;
        assert_eq!(
            sent.first(),
            Some(&nfnl_ruleset::NftMessage::NewTable {
                name: ruleset::TABLE.into(),
                flags: 0
            })
        );
        assert_eq!(
            sent.iter()
                .filter(|m| matches!(m, nfnl_ruleset::NftMessage::NewRule { .. }))
                .count(),
            rs.rules.len()
        );
    }

    #[tokio::test]
    async fn changed_plan_replaces_the_table_in_one_batch() {
        let dp = dp();
        dp.apply(&plan()).await.unwrap();
        let mut p2 = plan();
        p2.proxy_src.push("10.0.0.0/8".parse().unwrap());
        let r = dp.apply(&p2).await.unwrap();
        assert_eq!(r.nft, NftChange::Replaced);
        assert!(r.routing.is_empty());
        assert_eq!(dp.nft().state().applies, 2);
        // One batch: add table, delete table, then the whole new table.
        assert!(matches!(
            dp.nft().state().last_batch[..2],
            [
                nfnl_ruleset::NftMessage::NewTable { .. },
                nfnl_ruleset::NftMessage::DelTable { .. }
            ]
        ));
        assert_eq!(
            dp.nft().state().table,
            Some(nfnl_ruleset::TableModel::of(&ruleset::build(&p2)))
        );
        assert_eq!(dp.apply(&p2).await.unwrap().nft, NftChange::Unchanged);
    }

    #[tokio::test]
    async fn fake_ip_while_down_keeps_a_table_without_interception_or_routing() {
        let dp = dp();
        let mut p = plan();
        p.fake_ip = vec!["198.18.0.0/16".parse().unwrap()];
        dp.apply(&p).await.unwrap();
        assert_eq!(dp.routing().state().items.len(), 4);
        let down = p.while_down().expect("fake-ip mode");
        let r = dp.apply(&down).await.unwrap();
        assert_eq!(r.nft, NftChange::Replaced);
        assert_eq!(r.routing.len(), 4, "policy routing removed: {r}");
        assert!(dp.routing().state().items.is_empty());
        assert!(dp.nft().state().table.is_some());
        // Back up: interception and routing return.
        let r = dp.apply(&p).await.unwrap();
        assert_eq!((r.nft, r.routing.len()), (NftChange::Replaced, 4));
        // Without fake-ip there is nothing to keep while down.
        assert_eq!(plan().while_down(), None);
    }

    #[tokio::test]
    async fn removal_deletes_table_and_routing_then_is_a_noop() {
        let dp = dp();
        dp.apply(&plan()).await.unwrap();
        let r = dp.remove().await.unwrap();
        assert_eq!(r.nft, NftChange::Deleted);
        assert_eq!(r.routing.len(), 4);
        assert!(dp.nft().state().table.is_none());
        assert!(dp.routing().state().items.is_empty());
        let again = dp.remove().await.unwrap();
        assert_eq!(again.nft, NftChange::Absent);
        assert!(!again.changed());
    }

    #[tokio::test]
    async fn ensure_skips_listing_while_generation_is_verified() {
        let dp = dp();
        assert!(dp.ensure(Some(&plan())).await.unwrap().is_some());
        // Our own transaction moved the generation by exactly one: the table is known,
        // later checks only read the generation.
        let lists = dp.nft().state().lists;
        assert!(dp.ensure(Some(&plan())).await.unwrap().is_none());
        for _ in 0..5 {
            assert!(dp.ensure(Some(&plan())).await.unwrap().is_none());
        }
        assert_eq!(dp.nft().state().lists, lists);
        // A foreign change bumps the generation: one listing, nothing applied.
        dp.nft().touch_foreign("fw4_standin");
        assert!(dp.ensure(Some(&plan())).await.unwrap().is_none());
        assert_eq!(dp.nft().state().lists, lists + 1);
        assert_eq!(dp.nft().state().applies, 1);
    }

    #[tokio::test]
    async fn an_unchanged_plan_is_not_listed_again_until_someone_commits() {
        let dp = dp();
        dp.apply(&plan()).await.unwrap();
        let lists = dp.nft().state().lists;
        for _ in 0..3 {
            assert_eq!(dp.apply(&plan()).await.unwrap().nft, NftChange::Unchanged);
        }
        assert_eq!(dp.nft().state().lists, lists, "no listing while known");
        // A different plan is always compared against the listing.
        let mut p2 = plan();
        p2.exclude_ports.push(1194);
        assert_eq!(dp.apply(&p2).await.unwrap().nft, NftChange::Replaced);
        assert_eq!(dp.nft().state().lists, lists + 1);
        // Someone else's transaction: the next apply lists again and finds it intact.
        dp.nft().touch_foreign("docker_standin");
        assert_eq!(dp.apply(&p2).await.unwrap().nft, NftChange::Unchanged);
        assert_eq!(dp.nft().state().lists, lists + 2);
        // Our table flushed by someone else: listed, found missing, created again.
        dp.nft().delete_table_externally();
        assert_eq!(dp.apply(&p2).await.unwrap().nft, NftChange::Created);
    }

    #[tokio::test]
    async fn ensure_repairs_deleted_table_and_rule() {
        let dp = dp();
        dp.ensure(Some(&plan())).await.unwrap();
        dp.ensure(Some(&plan())).await.unwrap();
        dp.nft().delete_table_externally();
        let r = dp.ensure(Some(&plan())).await.unwrap().unwrap();
        assert_eq!(r.nft, NftChange::Created);
        dp.ensure(Some(&plan())).await.unwrap();
        dp.routing().delete_externally(RouteItem::RuleV4);
        let r = dp.ensure(Some(&plan())).await.unwrap().unwrap();
        assert_eq!(r.nft, NftChange::Unchanged);
        assert_eq!(r.routing, vec![RoutingOp::Add(RouteItem::RuleV4)]);
        // Converged: a further pass changes nothing.
        assert!(dp.ensure(Some(&plan())).await.unwrap().is_none());
        assert!(dp.ensure(None).await.unwrap().is_some());
        assert!(dp.ensure(None).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn observe_reports_presence_and_match() {
        let dp = dp();
        let before = dp.observe().await.unwrap();
        assert!(!before.table_present);
        assert_eq!(before.matches_last_plan, None);
        dp.apply(&plan()).await.unwrap();
        let after = dp.observe().await.unwrap();
        assert!(after.table_present);
        assert_eq!(after.rule_count, ruleset::build(&plan()).rules.len());
        assert_eq!(after.matches_last_plan, Some(true));
        assert_eq!(after.routing_present.len(), 4);
        dp.routing().delete_externally(RouteItem::LocalRouteV6);
        assert_eq!(dp.observe().await.unwrap().matches_last_plan, Some(false));
    }

    #[test]
    fn show_prints_plan_ruleset_and_routing() {
        let text = show(&plan());
        assert!(text.contains("\"proxy_src\""));
        assert!(text.contains("table inet meduza {"));
        assert!(text.contains("rule pref 9000 fwmark 0x1 lookup 100"));
        assert!(text.contains("route local default dev lo table 100"));
    }

    #[test]
    fn report_display_names_changes() {
        let r = ApplyReport {
            nft: NftChange::Created,
            routing: vec![RoutingOp::Add(RouteItem::RuleV4)],
        };
        assert_eq!(
            r.to_string(),
            "table inet meduza created; routing: added RuleV4"
        );
    }
}
