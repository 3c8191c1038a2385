//! The reconciler's effects on the running daemon: services, FRR, WireGuard, the
//! Clash/MosDNS orchestration and the DNS frontend.
//!
//! Must not: publish its own failures or flatten them to strings: each step returns an
//! [`ApplyError`] in its domain with the supervisor's or WireGuard's typed error as the
//! cause, and the reconciler publishes it.

use super::clash::ClashOrchestrator;
use super::Shared;
use crate::etcd::status::StatusUpdate;
use crate::reconcile::{ApplyDomain, ApplyError, Effects};
use crate::supervise::frr::FrrControl;
use crate::supervise::SuperviseError;
use meduza_generators::model::ApiTls;
use meduza_generators::plan::dns::DnsPlan;
use meduza_generators::plan::service::ServiceSpec;
use meduza_generators::plan::tproxy::TproxyPlan;
use meduza_generators::plan::wireguard::WgDevice;
use meduza_generators::render::{ClashRuntime, MosdnsRuntime};
use std::collections::BTreeSet;
use std::sync::Arc;
use tracing::info;

/// Name of MosDNS's service: held back until the startup chain allows it.
pub const MOSDNS_SERVICE: &str = "mosdns";

pub struct DaemonEffects {
    pub shared: Arc<Shared>,
    pub frr: Arc<FrrControl>,
    pub clash: ClashOrchestrator,
    /// The services the last pass wanted (FRR's are added while it is enabled).
    desired: Vec<ServiceSpec>,
    frr_enabled: bool,
    /// `MEDUZA_ROOT` when it is not `/`.
    reroot: Option<std::path::PathBuf>,
}

/// Under a `MEDUZA_ROOT` other than `/` (tests, demos), the files a child reads live
/// under the root too: re-root its absolute `/etc/...`, `/var/...` arguments and
/// working directory, creating the parent directories of `/var` paths (pid files).
pub fn reroot(spec: &mut ServiceSpec, root: &std::path::Path) {
    let fix = |arg: &mut String| {
        if arg.starts_with("/etc/") || arg.starts_with("/var/") {
            let host = root.join(arg.trim_start_matches('/'));
            if arg.starts_with("/var/") {
                if let Some(parent) = host.parent() {
                    let _ = std::fs::create_dir_all(parent);
                }
            }
            *arg = host.display().to_string();
        }
    };
    spec.argv.iter_mut().skip(1).for_each(fix);
    if let Some(w) = spec.workdir.as_mut() {
        fix(w);
    }
}

impl DaemonEffects {
    pub fn new(
        shared: Arc<Shared>,
        frr: Arc<FrrControl>,
        clash: ClashOrchestrator,
        root: &std::path::Path,
    ) -> Self {
        Self {
            shared,
            frr,
            clash,
            desired: Vec::new(),
            frr_enabled: false,
            reroot: (root != std::path::Path::new("/")).then(|| root.to_path_buf()),
        }
    }

    /// Hand the supervisor the full desired set: the pass's services, FRR's daemons
    /// while enabled, and MosDNS only once the startup chain released it.
    async fn sync(&mut self, changed: &BTreeSet<String>) -> Result<(), SuperviseError> {
        let mut specs: Vec<ServiceSpec> = self
            .desired
            .iter()
            .filter(|s| s.name != MOSDNS_SERVICE || self.clash.mosdns_released())
            .cloned()
            .collect();
        if self.frr_enabled {
            specs.extend(self.frr.specs());
        }
        if let Some(root) = &self.reroot {
            for spec in &mut specs {
                reroot(spec, root);
            }
        }
        let ops = self.shared.supervisor.apply(specs, changed).await?;
        for op in &ops {
            info!(?op, "supervisor");
        }
        Ok(())
    }
}

impl Effects for DaemonEffects {
    async fn apply_services(
        &mut self,
        specs: Vec<ServiceSpec>,
        changed: BTreeSet<String>,
    ) -> Result<(), ApplyError> {
        self.clash
            .set_mosdns_spec(specs.iter().find(|s| s.name == MOSDNS_SERVICE).cloned());
        self.clash.before_services(&specs).await;
        self.desired = specs;
        self.sync(&changed)
            .await
            .map_err(|e| ApplyError::new(ApplyDomain::Services, e))
    }

    async fn apply_frr(&mut self, enabled: bool) -> Result<(), ApplyError> {
        let was = self.frr_enabled;
        self.frr_enabled = enabled;
        if was != enabled {
            // The daemons start empty: `keep_frr_loaded` pushes the config once they
            // all run. Later changes go through the FrrReload strategy of frr-zebra.
            self.sync(&BTreeSet::new())
                .await
                .map_err(|e| ApplyError::new(ApplyDomain::Frr, e))?;
        }
        Ok(())
    }

    async fn apply_wireguard(&mut self, devices: Vec<WgDevice>) -> Result<(), ApplyError> {
        let Some(wg) = &self.shared.wireguard else {
            if devices.is_empty() {
                return Ok(());
            }
            return Err(ApplyError::new(
                ApplyDomain::Wireguard,
                "WireGuard is not available on this system",
            ));
        };
        let reports = wg
            .apply_all(&devices)
            .await
            .map_err(|e| ApplyError::new(ApplyDomain::Wireguard, e))?;
        for r in reports {
            info!(report = ?r, "wireguard");
        }
        *self
            .shared
            .wg_devices
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = devices;
        Ok(())
    }

    async fn apply_clash(
        &mut self,
        clash: Option<ClashRuntime>,
        mosdns: Option<MosdnsRuntime>,
        tproxy: Option<TproxyPlan>,
    ) -> Result<(), ApplyError> {
        self.clash.apply(clash, mosdns, tproxy).await;
        Ok(())
    }

    async fn apply_dns(&mut self, plan: DnsPlan) -> Result<(), ApplyError> {
        self.shared.dns.update_plan(plan);
        Ok(())
    }

    fn apply_api_token(&mut self, token: Option<String>) {
        self.shared.api_token.send_if_modified(|t| {
            let changed = *t != token;
            *t = token;
            changed
        });
    }

    fn apply_api_tls(&mut self, tls: Option<ApiTls>) {
        self.shared.api_tls.send_if_modified(|t| {
            let changed = *t != tls;
            *t = tls;
            changed
        });
    }

    fn publish(&mut self, update: StatusUpdate) {
        match &update {
            StatusUpdate::Applied { revision, .. } => {
                self.shared
                    .metrics
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .applied_revision = Some(*revision);
            }
            StatusUpdate::Errors(errors) => {
                *self.shared.errors.lock().unwrap_or_else(|p| p.into_inner()) = errors.clone();
            }
            _ => {}
        }
        self.shared.publisher.publish(update);
    }
}
