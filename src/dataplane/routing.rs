//! Policy routing for TPROXY: `fwmark MARK lookup TABLE` rules and
//! `local default dev lo table TABLE` routes, IPv4 and IPv6, through rtnetlink.
//!
//! Owns: the [`Routing`] trait, the pure [`plan_routing`] (what to add/delete given
//! what is present), the rtnetlink implementation [`RtnlRouting`] and the model
//! [`FakeRouting`]. Must not: touch any rule or route other than the four it adds
//! (matched by mark, table, priority, type), or run `ip`.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::TryStreamExt;
use netlink_packet_route::route::{RouteAttribute, RouteMessage, RouteScope, RouteType};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};
use serde::Serialize;

use super::DataplaneError;

/// Which mark, table and rule priority our items use (from the plan).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutingSpec {
    pub mark: u32,
    pub table: u32,
    pub priority: u32,
}

/// One of the four kernel objects TPROXY needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum RouteItem {
    /// `ip -4 rule add pref P fwmark M lookup T`
    RuleV4,
    /// `ip -6 rule add pref P fwmark M lookup T`
    RuleV6,
    /// `ip -4 route add local 0.0.0.0/0 dev lo table T`
    LocalRouteV4,
    /// `ip -6 route add local ::/0 dev lo table T`
    LocalRouteV6,
}

impl RouteItem {
    pub const ALL: [RouteItem; 4] = [
        RouteItem::RuleV4,
        RouteItem::RuleV6,
        RouteItem::LocalRouteV4,
        RouteItem::LocalRouteV6,
    ];
}

/// One routing change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RoutingOp {
    Add(RouteItem),
    Delete(RouteItem),
}

/// What to do so that exactly our items are present (`want = true`) or none of them
/// (`want = false`). Pure.
pub fn plan_routing(want: bool, present: &BTreeSet<RouteItem>) -> Vec<RoutingOp> {
    if want {
        RouteItem::ALL
            .iter()
            .filter(|i| !present.contains(i))
            .map(|i| RoutingOp::Add(*i))
            .collect()
    } else {
        present.iter().map(|i| RoutingOp::Delete(*i)).collect()
    }
}

/// The routing operations the data plane needs.
pub trait Routing: Send + Sync + 'static {
    /// Which of our items exist now.
    fn present(
        &self,
        spec: RoutingSpec,
    ) -> impl Future<Output = Result<BTreeSet<RouteItem>, DataplaneError>> + Send;
    /// Add one item.
    fn add(
        &self,
        spec: RoutingSpec,
        item: RouteItem,
    ) -> impl Future<Output = Result<(), DataplaneError>> + Send;
    /// Delete every copy of one item.
    fn delete(
        &self,
        spec: RoutingSpec,
        item: RouteItem,
    ) -> impl Future<Output = Result<(), DataplaneError>> + Send;
}

/// rtnetlink implementation. The connection lives in the namespace of the thread
/// that created it.
#[derive(Clone)]
pub struct RtnlRouting {
    handle: Handle,
}

impl std::fmt::Debug for RtnlRouting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RtnlRouting")
    }
}

fn nl_err(op: &'static str, e: rtnetlink::Error) -> DataplaneError {
    DataplaneError::Rtnetlink {
        op,
        detail: e.to_string(),
    }
}

impl RtnlRouting {
    /// Open an rtnetlink connection; needs a tokio runtime.
    pub fn new() -> Result<Self, DataplaneError> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|source| DataplaneError::Netlink {
                op: "open rtnetlink socket",
                source,
            })?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    async fn rules(
        &self,
        v: IpVersion,
        spec: RoutingSpec,
    ) -> Result<Vec<RuleMessage>, DataplaneError> {
        let all: Vec<RuleMessage> = self
            .handle
            .rule()
            .get(v)
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_err("dump rules", e))?;
        Ok(all.into_iter().filter(|r| is_our_rule(r, spec)).collect())
    }

    async fn routes(
        &self,
        v: IpVersion,
        spec: RoutingSpec,
    ) -> Result<Vec<RouteMessage>, DataplaneError> {
        let filter = match v {
            IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
                .table_id(spec.table)
                .build(),
            IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
                .table_id(spec.table)
                .build(),
        };
        let lo = LOOPBACK_IFINDEX;
        let all: Vec<RouteMessage> = self
            .handle
            .route()
            .get(filter)
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_err("dump routes", e))?;
        Ok(all
            .into_iter()
            .filter(|r| is_our_route(r, spec, lo))
            .collect())
    }
}

/// The loopback device's index: `LOOPBACK_IFINDEX` in the kernel
/// (`include/net/flow.h`), 1 in every network namespace since Linux 3.7, so no
/// `RTM_GETLINK` round trip per route (a quarter of a small apply's time).
const LOOPBACK_IFINDEX: u32 = 1;

fn rule_table(r: &RuleMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

fn is_our_rule(r: &RuleMessage, spec: RoutingSpec) -> bool {
    let has = |want: &RuleAttribute| r.attributes.iter().any(|a| a == want);
    r.header.action == RuleAction::ToTable
        && rule_table(r) == spec.table
        && has(&RuleAttribute::FwMark(spec.mark))
        && has(&RuleAttribute::Priority(spec.priority))
}

fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

fn is_our_route(r: &RouteMessage, spec: RoutingSpec, lo: u32) -> bool {
    r.header.kind == RouteType::Local
        && r.header.destination_prefix_length == 0
        && route_table(r) == spec.table
        && r.attributes.contains(&RouteAttribute::Oif(lo))
}

impl Routing for RtnlRouting {
    async fn present(&self, spec: RoutingSpec) -> Result<BTreeSet<RouteItem>, DataplaneError> {
        // One dump at a time: the four share one rtnetlink socket, and the kernel
        // refuses a dump on a socket whose previous dump is still running
        // (`netlink_dump_start`: EBUSY), which a dump longer than one reply does.
        let r4 = self.rules(IpVersion::V4, spec).await?;
        let r6 = self.rules(IpVersion::V6, spec).await?;
        let l4 = self.routes(IpVersion::V4, spec).await?;
        let l6 = self.routes(IpVersion::V6, spec).await?;
        let found = [
            (RouteItem::RuleV4, r4.is_empty()),
            (RouteItem::RuleV6, r6.is_empty()),
            (RouteItem::LocalRouteV4, l4.is_empty()),
            (RouteItem::LocalRouteV6, l6.is_empty()),
        ];
        Ok(found
            .into_iter()
            .filter(|(_, empty)| !empty)
            .map(|(item, _)| item)
            .collect())
    }

    async fn add(&self, spec: RoutingSpec, item: RouteItem) -> Result<(), DataplaneError> {
        let rule = || {
            self.handle
                .rule()
                .add()
                .fw_mark(spec.mark)
                .table_id(spec.table)
                .priority(spec.priority)
                // RuleAddRequest defaults to RuleAction::Unspec, which the kernel
                // stores and then treats as blackhole (child-interfaces §9).
                .action(RuleAction::ToTable)
        };
        match item {
            RouteItem::RuleV4 => rule().v4().execute().await,
            RouteItem::RuleV6 => rule().v6().execute().await,
            RouteItem::LocalRouteV4 | RouteItem::LocalRouteV6 => {
                let lo = LOOPBACK_IFINDEX;
                let msg = if item == RouteItem::LocalRouteV4 {
                    RouteMessageBuilder::<Ipv4Addr>::new()
                        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                        .kind(RouteType::Local)
                        .scope(RouteScope::Host)
                        .table_id(spec.table)
                        .output_interface(lo)
                        .build()
                } else {
                    RouteMessageBuilder::<Ipv6Addr>::new()
                        .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                        .kind(RouteType::Local)
                        .scope(RouteScope::Host)
                        .table_id(spec.table)
                        .output_interface(lo)
                        .build()
                };
                self.handle.route().add(msg).execute().await
            }
        }
        .map_err(|e| nl_err("add policy routing item", e))
    }

    async fn delete(&self, spec: RoutingSpec, item: RouteItem) -> Result<(), DataplaneError> {
        match item {
            RouteItem::RuleV4 | RouteItem::RuleV6 => {
                let v = if item == RouteItem::RuleV4 {
                    IpVersion::V4
                } else {
                    IpVersion::V6
                };
                for r in self.rules(v, spec).await? {
                    self.handle
                        .rule()
                        .del(r)
                        .execute()
                        .await
                        .map_err(|e| nl_err("delete rule", e))?;
                }
            }
            RouteItem::LocalRouteV4 | RouteItem::LocalRouteV6 => {
                let v = if item == RouteItem::LocalRouteV4 {
                    IpVersion::V4
                } else {
                    IpVersion::V6
                };
                for r in self.routes(v, spec).await? {
                    self.handle
                        .route()
                        .del(r)
                        .execute()
                        .await
                        .map_err(|e| nl_err("delete route", e))?;
                }
            }
        }
        Ok(())
    }
}

/// A model of the kernel's rule and route tables, restricted to our items (with
/// multiplicity, since the kernel accepts duplicate rules).
#[derive(Debug, Clone, Default)]
pub struct FakeRouting {
    inner: Arc<Mutex<FakeRoutingState>>,
    log_ops: bool,
}

#[derive(Debug, Clone, Default)]
pub struct FakeRoutingState {
    pub items: Vec<(RoutingSpec, RouteItem)>,
    pub adds: usize,
    pub deletes: usize,
}

impl FakeRouting {
    /// A silent model (tests); the `off` mode uses [`FakeRouting::logging`].
    #[cfg(any(test, feature = "test-util"))]
    pub fn new() -> Self {
        Self::default()
    }

    /// The `MEDUZA_DATAPLANE=off` mode: the model plus a log line per operation.
    pub fn logging() -> Self {
        Self {
            log_ops: true,
            ..Self::default()
        }
    }

    fn lock(&self) -> MutexGuard<'_, FakeRoutingState> {
        // Poisoning only follows a panicking test thread; the data stays valid.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[cfg(any(test, feature = "test-util"))]
    pub fn state(&self) -> FakeRoutingState {
        self.lock().clone()
    }

    /// Something else deletes one of our items.
    #[cfg(any(test, feature = "test-util"))]
    pub fn delete_externally(&self, item: RouteItem) {
        self.lock().items.retain(|(_, i)| *i != item);
    }
}

impl Routing for FakeRouting {
    async fn present(&self, spec: RoutingSpec) -> Result<BTreeSet<RouteItem>, DataplaneError> {
        Ok(self
            .lock()
            .items
            .iter()
            .filter(|(s, _)| *s == spec)
            .map(|(_, i)| *i)
            .collect())
    }

    async fn add(&self, spec: RoutingSpec, item: RouteItem) -> Result<(), DataplaneError> {
        if self.log_ops {
            tracing::info!(?item, ?spec, "dataplane off: would add policy routing item");
        }
        let mut st = self.lock();
        // The kernel refuses a second identical route (EEXIST) but accepts a second
        // identical rule; model both.
        let is_route = matches!(item, RouteItem::LocalRouteV4 | RouteItem::LocalRouteV6);
        if is_route && st.items.contains(&(spec, item)) {
            return Err(DataplaneError::Rtnetlink {
                op: "add policy routing item",
                detail: "File exists (os error 17)".into(),
            });
        }
        st.items.push((spec, item));
        st.adds += 1;
        Ok(())
    }

    async fn delete(&self, spec: RoutingSpec, item: RouteItem) -> Result<(), DataplaneError> {
        if self.log_ops {
            tracing::info!(
                ?item,
                ?spec,
                "dataplane off: would delete policy routing item"
            );
        }
        let mut st = self.lock();
        st.items.retain(|x| *x != (spec, item));
        st.deletes += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_adds_only_missing_items() {
        let present = BTreeSet::from([RouteItem::RuleV4, RouteItem::LocalRouteV6]);
        assert_eq!(
            plan_routing(true, &present),
            vec![
                RoutingOp::Add(RouteItem::RuleV6),
                RoutingOp::Add(RouteItem::LocalRouteV4)
            ]
        );
        assert!(plan_routing(true, &RouteItem::ALL.into_iter().collect()).is_empty());
    }

    #[test]
    fn plan_removal_deletes_only_present_items() {
        let present = BTreeSet::from([RouteItem::RuleV6]);
        assert_eq!(
            plan_routing(false, &present),
            vec![RoutingOp::Delete(RouteItem::RuleV6)]
        );
        assert!(plan_routing(false, &BTreeSet::new()).is_empty());
    }

    #[test]
    fn our_rule_is_recognised_by_action_table_mark_and_priority() {
        let spec = RoutingSpec {
            mark: 1,
            table: 100,
            priority: 9000,
        };
        let mut r = RuleMessage::default();
        r.header.action = RuleAction::ToTable;
        r.header.table = 100;
        r.attributes = vec![RuleAttribute::FwMark(1), RuleAttribute::Priority(9000)];
        assert!(is_our_rule(&r, spec));
        let mut blackhole = r.clone();
        blackhole.header.action = RuleAction::Unspec;
        assert!(!is_our_rule(&blackhole, spec));
        let mut other_mark = r.clone();
        other_mark.attributes = vec![RuleAttribute::FwMark(2), RuleAttribute::Priority(9000)];
        assert!(!is_our_rule(&other_mark, spec));
        let mut other_table = r;
        other_table.header.table = 0;
        other_table.attributes.push(RuleAttribute::Table(200));
        assert!(!is_our_rule(&other_table, spec));
    }
}
