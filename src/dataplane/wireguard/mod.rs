//! WireGuard devices: create, configure (keys, port, peers, addresses), read back
//! handshake times for status, delete.
//!
//! Owns: the pure diff of desired device configuration against what the device
//! reports ([`plan_device`]) and the status decision ([`decide_status`]), both in
//! `plan`; the [`WgBackend`] trait with its implementations — kernel generic netlink
//! ([`genl::KernelWg`]), wireguard-go's UAPI socket ([`uapi::UserspaceWg`]), the
//! runtime choice between them ([`AutoWg`]) and a model (`FakeWg` in `fake`, built
//! for tests and the `test-util` feature only) — and [`WgManager`], which applies a list of
//! devices. Must not: recreate a device to change its peers, touch devices it was not
//! given, or route `allowed_ips` (routing is FRR's job).

#[cfg(any(test, feature = "test-util"))]
mod fake;
pub mod genl;
mod plan;
pub mod uapi;

#[cfg(any(test, feature = "test-util"))]
pub use fake::{apply_set, FakeWg, FakeWgState};
pub use plan::{
    decide_status, plan_device, status_of, PeerChange, WgConfig, WgLinkStatus, WgPeerConfig,
    WgPeerState, WgSet, WgState,
};

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::future::Future;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use futures::TryStreamExt;
use ipnet::IpNet;
use meduza_generators::plan::wireguard::WgDevice;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::LinkFlags;
use rtnetlink::Handle;
use serde::Serialize;

/// A WireGuard key (Curve25519 point or preshared key).
pub type Key = [u8; 32];

/// After this long without a handshake a session is dead: WireGuard's
/// REJECT_AFTER_TIME (180 s, whitepaper §6.1). A live peer re-handshakes every
/// REKEY_AFTER_TIME (120 s) while traffic or keepalives flow.
pub const HANDSHAKE_FRESH_FOR: Duration = Duration::from_secs(180);

/// Errors of WireGuard configuration, each naming the device.
#[derive(Debug, thiserror::Error)]
pub enum WgError {
    #[error("wireguard {dev}: key {field} is not 32 bytes of base64: {value_hint}")]
    BadKey {
        dev: String,
        field: String,
        /// The first characters only: keys are secrets.
        value_hint: String,
    },
    #[error("wireguard {dev}: cannot start {program}: {source}")]
    Spawn {
        dev: String,
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("wireguard {dev}: {program} exited before its UAPI socket appeared: {detail}")]
    DaemonExited {
        dev: String,
        program: String,
        detail: String,
    },
    #[error("wireguard {dev}: UAPI socket {path}: {detail}")]
    Uapi {
        dev: String,
        path: String,
        detail: String,
    },
    #[error("wireguard {dev}: generic netlink {op}: {detail}")]
    Genl {
        dev: String,
        op: &'static str,
        detail: String,
    },
    #[error("wireguard {dev}: rtnetlink {op}: {detail}")]
    Link {
        dev: String,
        op: &'static str,
        detail: String,
    },
}

/// Drive one kind of WireGuard implementation.
pub trait WgBackend: Send + Sync + 'static {
    /// Create the device if it does not exist.
    fn create(&self, dev: &str) -> impl Future<Output = Result<(), WgError>> + Send;
    /// Read the device's configuration and peer statistics.
    fn get(&self, dev: &str) -> impl Future<Output = Result<WgState, WgError>> + Send;
    /// Send changes (nothing is sent for an empty set).
    fn set(&self, dev: &str, set: &WgSet) -> impl Future<Output = Result<(), WgError>> + Send;
    /// Delete the device.
    fn delete(&self, dev: &str) -> impl Future<Output = Result<(), WgError>> + Send;
}

/// Link-level operations common to both implementations (rtnetlink).
#[derive(Clone)]
pub struct LinkOps {
    handle: Handle,
}

impl std::fmt::Debug for LinkOps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkOps")
    }
}

fn link_err(dev: &str, op: &'static str, e: impl std::fmt::Display) -> WgError {
    WgError::Link {
        dev: dev.to_string(),
        op,
        detail: e.to_string(),
    }
}

impl LinkOps {
    /// Open an rtnetlink connection in the calling thread's namespace (needs tokio).
    pub fn new() -> Result<Self, WgError> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| link_err("-", "open socket", e))?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Interface index and whether the link is administratively up.
    pub async fn link(&self, dev: &str) -> Result<Option<(u32, bool)>, WgError> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(dev.to_string())
            .execute();
        match s.try_next().await {
            Ok(Some(l)) => Ok(Some((
                l.header.index,
                l.header.flags.contains(LinkFlags::Up),
            ))),
            Ok(None) => Ok(None),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(link_err(dev, "get link", e)),
        }
    }

    pub async fn delete(&self, dev: &str) -> Result<(), WgError> {
        if let Some((index, _)) = self.link(dev).await? {
            self.handle
                .link()
                .del(index)
                .execute()
                .await
                .map_err(|e| link_err(dev, "delete link", e))?;
        }
        Ok(())
    }

    /// Make the addresses of `dev` exactly `want` and bring it up. Returns whether
    /// anything changed.
    pub async fn sync_addresses_and_up(&self, dev: &str, want: &[IpNet]) -> Result<bool, WgError> {
        let Some((index, up)) = self.link(dev).await? else {
            return Err(link_err(dev, "get link", "device missing"));
        };
        let current: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| link_err(dev, "dump addresses", e))?;
        let mut changed = false;
        let have: Vec<(IpNet, AddressMessage)> = current
            .into_iter()
            .filter(|m| m.header.index == index)
            .filter_map(|m| {
                let addr = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })?;
                IpNet::new(addr, m.header.prefix_len).ok().map(|n| (n, m))
            })
            .collect();
        for (net, msg) in &have {
            // IPv6 link-local addresses are the kernel's own.
            let link_local =
                matches!(net, IpNet::V6(v6) if v6.addr().segments()[0] & 0xffc0 == 0xfe80);
            if !want.contains(net) && !link_local {
                self.handle
                    .address()
                    .del(msg.clone())
                    .execute()
                    .await
                    .map_err(|e| link_err(dev, "delete address", e))?;
                changed = true;
            }
        }
        for net in want {
            if !have.iter().any(|(n, _)| n == net) {
                self.handle
                    .address()
                    .add(index, net.addr(), net.prefix_len())
                    .execute()
                    .await
                    .map_err(|e| link_err(dev, "add address", e))?;
                changed = true;
            }
        }
        if !up {
            self.handle
                .link()
                .set(rtnetlink::LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
                .map_err(|e| link_err(dev, "set link up", e))?;
            changed = true;
        }
        Ok(changed)
    }
}

/// Which implementation serves a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum WgImpl {
    Kernel,
    Userspace,
}

/// Chooses per device at runtime: the kernel when creating a `wireguard` link
/// works, else wireguard-go. An existing device is served by whichever has it (a
/// UAPI socket means userspace).
#[derive(Debug)]
pub struct AutoWg {
    kernel: genl::KernelWg,
    user: uapi::UserspaceWg,
    kernel_unavailable: Mutex<bool>,
}

impl AutoWg {
    /// With `wireguard-go` from the children's `PATH` as the userspace fallback.
    pub fn new(links: LinkOps) -> Self {
        Self::with_userspace_program(links, None)
    }

    /// `wireguard_go`: the resolved `MEDUZA_BIN_WIREGUARD_GO` setting, if any.
    pub fn with_userspace_program(links: LinkOps, wireguard_go: Option<OsString>) -> Self {
        Self {
            kernel: genl::KernelWg::new(links.clone()),
            user: uapi::UserspaceWg::new(links, wireguard_go),
            kernel_unavailable: Mutex::new(false),
        }
    }

    fn kernel_unavailable(&self) -> MutexGuard<'_, bool> {
        // A plain flag; poisoning cannot leave it inconsistent.
        self.kernel_unavailable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Which implementation serves `dev` now.
    pub fn implementation(&self, dev: &str) -> WgImpl {
        if self.user.socket_path(dev).exists() {
            WgImpl::Userspace
        } else {
            WgImpl::Kernel
        }
    }
}

impl WgBackend for AutoWg {
    async fn create(&self, dev: &str) -> Result<(), WgError> {
        if self.user.socket_path(dev).exists() {
            return self.user.create(dev).await;
        }
        let skip_kernel = *self.kernel_unavailable();
        if !skip_kernel {
            match self.kernel.create(dev).await {
                Ok(()) => return Ok(()),
                Err(err) => {
                    tracing::info!(dev, %err, "kernel wireguard unavailable, using wireguard-go");
                    *self.kernel_unavailable() = true;
                }
            }
        }
        self.user.create(dev).await
    }

    async fn get(&self, dev: &str) -> Result<WgState, WgError> {
        match self.implementation(dev) {
            WgImpl::Userspace => self.user.get(dev).await,
            WgImpl::Kernel => self.kernel.get(dev).await,
        }
    }

    async fn set(&self, dev: &str, set: &WgSet) -> Result<(), WgError> {
        match self.implementation(dev) {
            WgImpl::Userspace => self.user.set(dev, set).await,
            WgImpl::Kernel => self.kernel.set(dev, set).await,
        }
    }

    async fn delete(&self, dev: &str) -> Result<(), WgError> {
        match self.implementation(dev) {
            WgImpl::Userspace => self.user.delete(dev).await,
            WgImpl::Kernel => self.kernel.delete(dev).await,
        }
    }
}

/// What applying one device did.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct WgDeviceReport {
    pub dev: String,
    pub created: bool,
    pub peers_upserted: usize,
    pub peers_removed: usize,
    pub key_or_port_set: bool,
    pub link_changed: bool,
}

/// Applies WireGuard devices through a backend and keeps track of which devices it
/// manages (so a device dropped from the plan is deleted).
#[derive(Debug)]
pub struct WgManager<B: WgBackend> {
    backend: B,
    links: Option<LinkOps>,
    managed: Mutex<BTreeSet<String>>,
}

impl<B: WgBackend> WgManager<B> {
    /// `links` handles addresses and link state; `None` for a backend that models
    /// them itself (the fake).
    pub fn new(backend: B, links: Option<LinkOps>) -> Self {
        Self {
            backend,
            links,
            managed: Mutex::new(BTreeSet::new()),
        }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    fn managed(&self) -> MutexGuard<'_, BTreeSet<String>> {
        // A set of names; poisoning cannot leave it inconsistent.
        self.managed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bring one device to its desired configuration.
    pub async fn apply_device(&self, d: &WgDevice) -> Result<WgDeviceReport, WgError> {
        let cfg = WgConfig::from_device(d)?;
        let mut report = WgDeviceReport {
            dev: d.dev.clone(),
            ..Default::default()
        };
        let exists = match &self.links {
            Some(l) => l.link(&d.dev).await?.is_some(),
            None => self.backend.get(&d.dev).await.is_ok(),
        };
        if !exists {
            self.backend.create(&d.dev).await?;
            report.created = true;
        }
        self.managed().insert(d.dev.clone());
        let current = self.backend.get(&d.dev).await?;
        let set = plan_device(&cfg, &current);
        if !set.is_empty() {
            self.backend.set(&d.dev, &set).await?;
        }
        report.key_or_port_set = set.private_key.is_some() || set.listen_port.is_some();
        for p in &set.peers {
            match p {
                PeerChange::Upsert(_) => report.peers_upserted += 1,
                PeerChange::Remove(_) => report.peers_removed += 1,
            }
        }
        if let Some(l) = &self.links {
            report.link_changed = l.sync_addresses_and_up(&d.dev, &d.addresses).await?;
        }
        tracing::info!(
            dev = %d.dev,
            created = report.created,
            upserted = report.peers_upserted,
            removed = report.peers_removed,
            "wireguard device applied"
        );
        Ok(report)
    }

    /// Apply every device of the plan and delete managed devices no longer in it.
    pub async fn apply_all(&self, devices: &[WgDevice]) -> Result<Vec<WgDeviceReport>, WgError> {
        let wanted: BTreeSet<String> = devices.iter().map(|d| d.dev.clone()).collect();
        let gone: Vec<String> = self.managed().difference(&wanted).cloned().collect();
        for dev in gone {
            self.remove_device(&dev).await?;
        }
        let mut out = Vec::with_capacity(devices.len());
        for d in devices {
            out.push(self.apply_device(d).await?);
        }
        Ok(out)
    }

    pub async fn remove_device(&self, dev: &str) -> Result<(), WgError> {
        self.backend.delete(dev).await?;
        self.managed().remove(dev);
        tracing::info!(dev, "wireguard device removed");
        Ok(())
    }

    /// Status of a device at `now` (down when it cannot be read).
    pub async fn status(&self, dev: &str, now: SystemTime) -> WgLinkStatus {
        match self.backend.get(dev).await {
            Ok(state) => status_of(Some(&state), now),
            Err(err) => {
                tracing::debug!(dev, %err, "wireguard status read failed");
                WgLinkStatus::Down
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::plan::tests::{device, peer};
    use super::*;

    #[tokio::test]
    async fn manager_changes_peers_without_recreating_and_drops_gone_devices() {
        let mgr = WgManager::new(FakeWg::new(), None);
        let d1 = device(vec![peer(2, "10.9.0.2/32")]);
        let r = mgr.apply_all(std::slice::from_ref(&d1)).await.unwrap();
        assert!(r[0].created);
        let d2 = device(vec![peer(3, "10.9.0.3/32")]);
        let r = mgr.apply_all(std::slice::from_ref(&d2)).await.unwrap();
        assert!(!r[0].created);
        assert_eq!((r[0].peers_upserted, r[0].peers_removed), (1, 1));
        assert_eq!(mgr.backend().state().creates, 1);
        let sets = mgr.backend().state().sets;
        let r = mgr.apply_all(std::slice::from_ref(&d2)).await.unwrap();
        assert_eq!((r[0].peers_upserted, r[0].peers_removed), (0, 0));
        assert_eq!(mgr.backend().state().sets, sets);
        let now = SystemTime::now();
        assert_eq!(mgr.status("wg-a", now).await, WgLinkStatus::Connecting);
        mgr.backend().handshake("wg-a", &[3; 32], now);
        assert_eq!(mgr.status("wg-a", now).await, WgLinkStatus::Up);
        mgr.apply_all(&[]).await.unwrap();
        assert!(mgr.backend().state().devices.is_empty());
        assert_eq!(mgr.status("wg-a", now).await, WgLinkStatus::Down);
    }
}
