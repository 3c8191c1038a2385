//! The seam of a reconcile pass: where its snapshots come from ([`ConfigSource`]) and
//! what it does to the rest of the daemon ([`Effects`]). The daemon implements both
//! over etcd and its running parts; the tests over fakes.
//!
//! Must not: hold logic; each method is one level-triggered request. Failures are
//! typed ([`SourceError`], [`ApplyError`], `error.rs`); the reconciler alone turns them
//! into status.

use super::error::{ApplyError, SourceError};
use crate::etcd::status::StatusUpdate;
use meduza_generators::model::ApiTls;
use meduza_generators::plan::dns::DnsPlan;
use meduza_generators::plan::service::ServiceSpec;
use meduza_generators::plan::tproxy::TproxyPlan;
use meduza_generators::plan::wireguard::WgDevice;
use meduza_generators::render::{ClashRuntime, MosdnsRuntime};
use meduza_generators::Snapshot;
use std::collections::BTreeSet;
use std::future::Future;

/// Where snapshots come from (etcd in production).
pub trait ConfigSource: Send {
    /// The snapshot of every key the generators need, and `/commit`'s mod revision
    /// (0 when `/commit` is absent).
    fn load(&mut self) -> impl Future<Output = Result<(Snapshot, i64), SourceError>> + Send;

    /// One etcd round trip while a commit waits for confirmation, reading
    /// `/confirmed` ([`super::rollback::CONFIRMED_KEY`]; `None` when absent). The default (a
    /// source that is not etcd) always answers.
    fn probe(&mut self) -> impl Future<Output = Result<Option<i64>, SourceError>> + Send {
        std::future::ready(Ok(None))
    }

    /// The confirm window (seconds) of commit `revision` when it was made with
    /// `meduza commit --confirm` ([`super::rollback::COMMIT_CONFIRM_KEY`]), else `None`.
    fn commit_confirm(
        &mut self,
        revision: i64,
    ) -> impl Future<Output = Result<Option<u64>, SourceError>> + Send {
        let _ = revision;
        std::future::ready(Ok(None))
    }
}

/// The effects of a pass on the rest of the daemon. Each is level-triggered: it is
/// given the whole desired state of its concern, not a delta. A failing step returns
/// an [`ApplyError`] in its own [`super::ApplyDomain`] (named on each method), with
/// the lower-level error as its cause; the pass goes on with the other steps.
pub trait Effects: Send {
    /// Desired services (all domains); `changed_files` lists the files this pass
    /// wrote, so services whose config changed are reloaded and the others untouched.
    /// Fails in [`super::ApplyDomain::Services`].
    fn apply_services(
        &mut self,
        specs: Vec<ServiceSpec>,
        changed_files: BTreeSet<String>,
    ) -> impl Future<Output = Result<(), ApplyError>> + Send;
    /// FRR's files changed: reload it (frr-reload.py, falling back to `vtysh -f`);
    /// `enabled` false stops it. Fails in [`super::ApplyDomain::Frr`].
    fn apply_frr(&mut self, enabled: bool) -> impl Future<Output = Result<(), ApplyError>> + Send;
    /// Desired WireGuard devices (enabled instances). Fails in
    /// [`super::ApplyDomain::Wireguard`].
    fn apply_wireguard(
        &mut self,
        devices: Vec<WgDevice>,
    ) -> impl Future<Output = Result<(), ApplyError>> + Send;
    /// Clash/MosDNS runtime settings and the TPROXY plan to apply once mihomo is healthy.
    /// Fails in [`super::ApplyDomain::Clash`].
    fn apply_clash(
        &mut self,
        clash: Option<ClashRuntime>,
        mosdns: Option<MosdnsRuntime>,
        tproxy: Option<TproxyPlan>,
    ) -> impl Future<Output = Result<(), ApplyError>> + Send;
    /// DNS frontend plan (hosts, chain flags, upstream groups). Fails in
    /// [`super::ApplyDomain::Dns`].
    fn apply_dns(&mut self, plan: DnsPlan) -> impl Future<Output = Result<(), ApplyError>> + Send;
    /// The node API's bearer token (`/nodes/<id>/api/token`).
    fn apply_api_token(&mut self, token: Option<String>);
    /// The node API's certificate and key from etcd (`/nodes/<id>/api/tls/...`).
    fn apply_api_tls(&mut self, tls: Option<ApiTls>);
    /// Publish a status key (non-blocking; queued while etcd is down).
    fn publish(&mut self, update: StatusUpdate);
}
