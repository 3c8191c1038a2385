//! The data-plane task: holds the desired state (`Some(plan)` = TPROXY applied,
//! `None` = removed) and keeps the kernel there.
//!
//! Owns: the loop that applies a new desired state at once and re-checks on every
//! trigger (netlink notifications of rule/route/nftables changes) and every second,
//! so something else deleting our table, rules or routes is repaired within about
//! one second. Must not: decide the desired state (the caller does) or overlap two
//! passes (one loop, triggers coalesce).

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use meduza_generators::plan::tproxy::TproxyPlan;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{ApplyReport, Dataplane, Nft, Routing};

/// Period of the drift check when no notification arrives.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// What the task last did, for status publishing (`/updated/<id>/tproxy`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TaskStatus {
    /// Passes that changed something.
    pub changes: u64,
    /// Passes that failed.
    pub errors: u64,
    /// The last change, if any.
    pub last_report: Option<ApplyReport>,
    /// The last error, cleared by the next successful pass.
    pub last_error: Option<String>,
    /// Whether the kernel was at the desired state after the last pass.
    pub converged: bool,
    /// The desired state the last pass worked toward (callers that just changed it
    /// wait for a status carrying their own plan, not an older pass's verdict).
    pub desired: Option<TproxyPlan>,
}

/// Why [`DataplaneHandle::set_and_wait`] did not see the kernel at the new state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvergeError {
    #[error("data-plane pass failed: {error}")]
    Failed { error: String },
    #[error("data plane did not reach the desired state within {timeout:?}")]
    Timeout { timeout: Duration },
    #[error("data-plane task stopped")]
    Stopped,
}

/// Control of a running data-plane task. Dropping it stops the task (the desired
/// state is left installed; call `set(None)` first to remove it).
#[derive(Debug)]
pub struct DataplaneHandle {
    desired: watch::Sender<Option<TproxyPlan>>,
    status: watch::Receiver<TaskStatus>,
    join: JoinHandle<()>,
}

impl DataplaneHandle {
    /// Change the desired state; the task applies it at once.
    pub fn set(&self, desired: Option<TproxyPlan>) {
        self.desired.send_replace(desired);
    }

    /// Change the desired state and wait for the task's first pass toward it: `Ok`
    /// once the kernel is there (so "applied" can be reported truthfully), the pass's
    /// error when it failed (the task keeps retrying every [`CHECK_INTERVAL`]).
    pub async fn set_and_wait(
        &self,
        desired: Option<TproxyPlan>,
        timeout: Duration,
    ) -> Result<(), ConvergeError> {
        let mut status = self.status.clone();
        self.set(desired.clone());
        let pass = tokio::time::timeout(
            timeout,
            status.wait_for(|s| s.desired == desired && (s.converged || s.last_error.is_some())),
        )
        .await
        .map_err(|_| ConvergeError::Timeout { timeout })?
        .map_err(|_| ConvergeError::Stopped)?;
        match (&pass.converged, &pass.last_error) {
            (true, _) => Ok(()),
            (false, Some(error)) => Err(ConvergeError::Failed {
                error: error.clone(),
            }),
            (false, None) => Err(ConvergeError::Stopped),
        }
    }

    /// The current desired state.
    pub fn desired(&self) -> Option<TproxyPlan> {
        self.desired.borrow().clone()
    }

    /// Whether the desired state intercepts LAN traffic (TPROXY applied), as opposed
    /// to no table or the fake-IP rejects of [`TproxyPlan::while_down`].
    pub fn intercepting(&self) -> bool {
        self.desired
            .borrow()
            .as_ref()
            .is_some_and(|p| !p.proxy_down)
    }

    /// A receiver of the task's status after each pass.
    pub fn status(&self) -> watch::Receiver<TaskStatus> {
        self.status.clone()
    }

    /// Stop the task and wait for it.
    pub async fn stop(self) {
        let DataplaneHandle { desired, join, .. } = self;
        drop(desired);
        // The task ends when the sender is gone; a JoinError can only be a panic
        // or cancellation, both already logged by tokio.
        let _ = join.await;
    }
}

/// Start the task with an initial desired state and a stream of triggers (use
/// [`netlink_triggers`] for the real system, any stream in tests).
pub fn spawn_task<N, R, T>(
    dp: Arc<Dataplane<N, R>>,
    initial: Option<TproxyPlan>,
    triggers: T,
) -> DataplaneHandle
where
    N: Nft,
    R: Routing,
    T: Stream<Item = ()> + Send + Unpin + 'static,
{
    let (desired_tx, desired_rx) = watch::channel(initial);
    let (status_tx, status_rx) = watch::channel(TaskStatus::default());
    let join = tokio::spawn(run(dp, desired_rx, status_tx, triggers));
    DataplaneHandle {
        desired: desired_tx,
        status: status_rx,
        join,
    }
}

async fn run<N: Nft, R: Routing, T: Stream<Item = ()> + Unpin>(
    dp: Arc<Dataplane<N, R>>,
    mut desired: watch::Receiver<Option<TproxyPlan>>,
    status: watch::Sender<TaskStatus>,
    mut triggers: T,
) {
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut triggers_open = true;
    desired.mark_changed();
    loop {
        tokio::select! {
            biased;
            changed = desired.changed() => {
                if changed.is_err() {
                    tracing::debug!("dataplane task stopped");
                    return;
                }
            }
            t = triggers.next(), if triggers_open => {
                if t.is_none() {
                    tracing::warn!("dataplane change notifications ended; periodic check only");
                    triggers_open = false;
                    continue;
                }
                // Coalesce a burst of notifications into one pass.
                while let Some(Some(())) = futures::FutureExt::now_or_never(triggers.next()) {}
            }
            _ = tick.tick() => {}
        }
        let plan = desired.borrow_and_update().clone();
        let result = dp.ensure(plan.as_ref()).await;
        status.send_modify(|st| {
            // A change while the desired state stayed the same is drift (or, for
            // `None`, leftovers such as a crashed run's table); the first pass toward a
            // new state is the apply or removal itself, logged by the data plane.
            let unexpected = match &plan {
                Some(_) => st.desired == plan && st.converged,
                None => st.desired.is_none(),
            };
            st.desired = plan.clone();
            match result {
                Ok(Some(report)) => {
                    let (nft, routing) = (&report.nft, &report.routing);
                    if unexpected && plan.is_some() {
                        tracing::warn!(?nft, ?routing, "tproxy drift repaired");
                    } else if unexpected {
                        tracing::warn!(?nft, ?routing, "tproxy leftovers removed");
                    }
                    st.changes += 1;
                    st.last_report = Some(report);
                    st.last_error = None;
                    st.converged = true;
                }
                Ok(None) => {
                    st.last_error = None;
                    st.converged = true;
                }
                Err(err) => {
                    tracing::error!(%err, "dataplane pass failed");
                    st.errors += 1;
                    st.last_error = Some(err.to_string());
                    st.converged = false;
                }
            }
        });
    }
}

/// Notifications of changes to IPv4/IPv6 rules and routes (rtnetlink multicast
/// groups) and to any nftables table (`NFNLGRP_NFTABLES`), in the calling thread's
/// network namespace, as a stream of unit triggers. Needs a tokio runtime.
pub fn netlink_triggers() -> std::io::Result<impl Stream<Item = ()> + Send + Unpin + 'static> {
    use rtnetlink::sys::AsyncSocketExt;
    use rtnetlink::MulticastGroup;

    let (conn, _handle, messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Ipv4Rule,
        MulticastGroup::Ipv6Rule,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
    ])?;
    tokio::spawn(conn);
    let nft_sock = super::nft::nft_monitor_socket()?;
    let nft_events = futures::stream::unfold(nft_sock, |sock| async move {
        match sock.recv_from_full().await {
            Ok(_) => Some(((), sock)),
            Err(err) => {
                // ENOBUFS means we missed notifications: still a trigger.
                tracing::debug!(?err, "nftables monitor receive error");
                Some(((), sock))
            }
        }
    });
    let route_events = messages.map(|_| ());
    Ok(futures::stream::select(route_events, Box::pin(nft_events)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::{FakeNft, FakeRouting, NftChange, RouteItem};

    fn plan() -> TproxyPlan {
        let mut p = TproxyPlan::empty();
        p.proxy_src = vec!["192.168.50.0/24".parse().unwrap()];
        p
    }

    async fn wait_for(rx: &mut watch::Receiver<TaskStatus>, f: impl Fn(&TaskStatus) -> bool) {
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| f(s)))
            .await
            .expect("status in time")
            .expect("task alive");
    }

    #[tokio::test]
    async fn task_applies_repairs_and_removes() {
        let dp = Arc::new(Dataplane::new(FakeNft::new(), FakeRouting::new()));
        let (trig_tx, trig_rx) = futures::channel::mpsc::unbounded::<()>();
        let handle = spawn_task(dp.clone(), Some(plan()), trig_rx);
        let mut st = handle.status();
        wait_for(&mut st, |s| s.changes == 1).await;
        assert!(dp.nft().state().table.is_some());

        // Repair on a trigger.
        dp.nft().delete_table_externally();
        trig_tx.unbounded_send(()).unwrap();
        wait_for(&mut st, |s| s.changes == 2).await;
        assert_eq!(
            st.borrow().last_report.as_ref().unwrap().nft,
            NftChange::Created
        );

        // Repair on the periodic check alone.
        dp.routing().delete_externally(RouteItem::LocalRouteV4);
        wait_for(&mut st, |s| s.changes == 3).await;
        assert_eq!(dp.routing().state().items.len(), 4);

        handle.set(None);
        wait_for(&mut st, |s| s.changes == 4).await;
        assert!(dp.nft().state().table.is_none());
        assert!(dp.routing().state().items.is_empty());
        assert_eq!(handle.desired(), None);
        handle.stop().await;
    }

    /// nftables that refuses every batch (a kernel without nft_tproxy, say).
    struct BrokenNft;

    impl Nft for BrokenNft {
        async fn list_table(
            &self,
        ) -> Result<Option<serde_json::Value>, crate::dataplane::DataplaneError> {
            Ok(None)
        }
        async fn apply(
            &self,
            _tx: crate::dataplane::Transaction<'_>,
        ) -> Result<(), crate::dataplane::DataplaneError> {
            Err(crate::dataplane::DataplaneError::Nft {
                op: "apply batch",
                program: "broken".into(),
                detail: "Could not process rule: No such file or directory".into(),
            })
        }
        async fn generation(&self) -> Result<u32, crate::dataplane::DataplaneError> {
            Ok(1)
        }
    }

    #[tokio::test]
    async fn set_and_wait_returns_once_the_kernel_is_there() {
        let dp = Arc::new(Dataplane::new(FakeNft::new(), FakeRouting::new()));
        let handle = spawn_task(dp.clone(), None, futures::stream::pending());
        let mut st = handle.status();
        // The first pass (nothing to remove) has converged: a stale "converged" the
        // next call must not take for its own.
        wait_for(&mut st, |s| s.converged).await;
        let timeout = Duration::from_secs(10);

        handle.set_and_wait(Some(plan()), timeout).await.unwrap();
        assert!(dp.nft().state().table.is_some(), "applied means present");
        assert_eq!(dp.routing().state().items.len(), 4);

        handle.set_and_wait(None, timeout).await.unwrap();
        assert!(dp.nft().state().table.is_none(), "removed means absent");
        assert!(dp.routing().state().items.is_empty());
        handle.stop().await;
    }

    #[tokio::test]
    async fn set_and_wait_reports_a_failed_pass() {
        let dp = Arc::new(Dataplane::new(BrokenNft, FakeRouting::new()));
        let handle = spawn_task(dp, None, futures::stream::pending());
        let err = handle
            .set_and_wait(Some(plan()), Duration::from_secs(10))
            .await
            .unwrap_err();
        match err {
            ConvergeError::Failed { error } => assert!(error.contains("No such file"), "{error}"),
            other => panic!("want Failed, got {other:?}"),
        }
        handle.stop().await;
    }
}
