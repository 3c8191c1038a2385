//! A model of WireGuard devices for tests and the `test-util` feature ([`FakeWg`]):
//! it applies [`WgSet`]s with the kernel's semantics ([`apply_set`]) and counts
//! creations and sets. Must not: be built into the release binary.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use super::{Key, PeerChange, WgBackend, WgError, WgPeerState, WgSet, WgState};

/// A model of WireGuard devices: applies [`WgSet`]s with the kernel's semantics and
/// counts creations, so tests can check that peers change without recreation.
#[derive(Debug, Clone, Default)]
pub struct FakeWg {
    inner: Arc<Mutex<FakeWgState>>,
}

#[derive(Debug, Clone, Default)]
pub struct FakeWgState {
    pub devices: BTreeMap<String, WgState>,
    pub creates: usize,
    pub sets: usize,
}

impl FakeWg {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, FakeWgState> {
        // Poisoning only follows a panicking test thread.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> FakeWgState {
        self.lock().clone()
    }

    /// Record a handshake of `peer` on `dev` at `at`.
    pub fn handshake(&self, dev: &str, peer: &Key, at: SystemTime) {
        if let Some(d) = self.lock().devices.get_mut(dev) {
            for p in d.peers.iter_mut().filter(|p| &p.public_key == peer) {
                p.last_handshake = Some(at);
            }
        }
    }
}

fn missing(dev: &str) -> WgError {
    WgError::Uapi {
        dev: dev.to_string(),
        path: "fake".into(),
        detail: "no such device".into(),
    }
}

/// Apply a set to a state with WireGuard's semantics (shared by the fake and the
/// UAPI tests).
pub fn apply_set(state: &mut WgState, set: &WgSet) {
    if let Some(k) = set.private_key {
        state.private_key = Some(k);
    }
    if let Some(p) = set.listen_port {
        state.listen_port = p;
    }
    for change in &set.peers {
        match change {
            PeerChange::Remove(k) => state.peers.retain(|p| &p.public_key != k),
            PeerChange::Upsert(cfg) => {
                let idx = match state
                    .peers
                    .iter()
                    .position(|p| p.public_key == cfg.public_key)
                {
                    Some(i) => i,
                    None => {
                        state.peers.push(WgPeerState::new(cfg.public_key));
                        state.peers.len() - 1
                    }
                };
                let p = &mut state.peers[idx];
                p.preshared_key = cfg.preshared_key;
                if cfg.endpoint.is_some() {
                    p.endpoint = cfg.endpoint;
                }
                p.persistent_keepalive = cfg.persistent_keepalive;
                p.allowed_ips = cfg.allowed_ips.clone();
            }
        }
    }
}

impl WgBackend for FakeWg {
    async fn create(&self, dev: &str) -> Result<(), WgError> {
        let mut st = self.lock();
        if !st.devices.contains_key(dev) {
            st.devices.insert(dev.to_string(), WgState::default());
            st.creates += 1;
        }
        Ok(())
    }

    async fn get(&self, dev: &str) -> Result<WgState, WgError> {
        self.lock()
            .devices
            .get(dev)
            .cloned()
            .ok_or_else(|| missing(dev))
    }

    async fn set(&self, dev: &str, set: &WgSet) -> Result<(), WgError> {
        let mut st = self.lock();
        st.sets += 1;
        let d = st.devices.get_mut(dev).ok_or_else(|| missing(dev))?;
        apply_set(d, set);
        Ok(())
    }

    async fn delete(&self, dev: &str) -> Result<(), WgError> {
        self.lock().devices.remove(dev);
        Ok(())
    }
}
