//! The pure half of WireGuard: desired and reported device state, decoding a plan's
//! device ([`WgConfig::from_device`]), the diff of the two ([`plan_device`]) and the
//! link status a device's state means ([`decide_status`], [`status_of`]).
//! Must not: do I/O (the backends and [`super::WgManager`] apply).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use ipnet::IpNet;
use meduza_generators::plan::wireguard::WgDevice;
use serde::Serialize;

use super::{Key, WgError, HANDSHAKE_FRESH_FOR};

/// What one peer reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPeerState {
    pub public_key: Key,
    pub preshared_key: Option<Key>,
    pub endpoint: Option<SocketAddr>,
    /// Seconds; 0 = off.
    pub persistent_keepalive: u16,
    /// Sorted.
    pub allowed_ips: Vec<IpNet>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

impl WgPeerState {
    /// A peer known only by its key: nothing configured, nothing seen yet.
    pub fn new(public_key: Key) -> Self {
        Self {
            public_key,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: 0,
            allowed_ips: Vec::new(),
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }
}

/// What a device reports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WgState {
    pub private_key: Option<Key>,
    pub listen_port: u16,
    pub peers: Vec<WgPeerState>,
}

/// A desired peer, keys decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPeerConfig {
    pub public_key: Key,
    pub preshared_key: Option<Key>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: u16,
    /// Sorted, deduplicated.
    pub allowed_ips: Vec<IpNet>,
}

/// A desired device, keys decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgConfig {
    pub private_key: Key,
    pub listen_port: Option<u16>,
    pub peers: Vec<WgPeerConfig>,
}

fn decode_key(dev: &str, field: &str, b64: &str) -> Result<Key, WgError> {
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()
        .and_then(|v| Key::try_from(v.as_slice()).ok())
        .ok_or_else(|| WgError::BadKey {
            dev: dev.to_string(),
            field: field.to_string(),
            value_hint: b64.chars().take(4).collect::<String>() + "…",
        })
}

fn sorted_nets(nets: &[IpNet]) -> Vec<IpNet> {
    let mut v: Vec<IpNet> = nets.iter().map(IpNet::trunc).collect();
    v.sort();
    v.dedup();
    v
}

impl WgConfig {
    /// Decode a plan's device.
    pub fn from_device(d: &WgDevice) -> Result<Self, WgError> {
        let peers = d
            .peers
            .iter()
            .map(|p| {
                Ok(WgPeerConfig {
                    public_key: decode_key(
                        &d.dev,
                        &format!("peer/{}/public_key", p.name),
                        &p.public_key,
                    )?,
                    preshared_key: p
                        .preshared_key
                        .as_deref()
                        .map(|k| decode_key(&d.dev, &format!("peer/{}/preshared_key", p.name), k))
                        .transpose()?,
                    endpoint: p.endpoint,
                    persistent_keepalive: p.persistent_keepalive.unwrap_or(0),
                    allowed_ips: sorted_nets(&p.allowed_ips),
                })
            })
            .collect::<Result<Vec<_>, WgError>>()?;
        Ok(Self {
            private_key: decode_key(&d.dev, "private_key", &d.private_key)?,
            listen_port: d.listen_port,
            peers,
        })
    }
}

/// One peer change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerChange {
    /// Add the peer or bring it to this configuration (allowed IPs replaced).
    Upsert(WgPeerConfig),
    /// Remove the peer (`remove=true` / `WGPEER_F_REMOVE_ME`).
    Remove(Key),
}

/// The changes to send to a device; empty means nothing to send.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WgSet {
    pub private_key: Option<Key>,
    pub listen_port: Option<u16>,
    pub peers: Vec<PeerChange>,
}

impl WgSet {
    pub fn is_empty(&self) -> bool {
        self.private_key.is_none() && self.listen_port.is_none() && self.peers.is_empty()
    }
}

fn peer_matches(want: &WgPeerConfig, have: &WgPeerState) -> bool {
    let mut have_ips = have.allowed_ips.clone();
    have_ips.sort();
    want.preshared_key == have.preshared_key
        && want.persistent_keepalive == have.persistent_keepalive
        && want.allowed_ips == have_ips
        // An unset endpoint is learnt from the peer (roaming); only a configured
        // one is enforced.
        && want.endpoint.is_none_or(|e| have.endpoint == Some(e))
}

/// The changes that bring `current` to `desired` without recreating the device:
/// unchanged peers are not sent, gone peers are removed. Pure.
pub fn plan_device(desired: &WgConfig, current: &WgState) -> WgSet {
    let have: BTreeMap<Key, &WgPeerState> =
        current.peers.iter().map(|p| (p.public_key, p)).collect();
    let want_keys: BTreeSet<Key> = desired.peers.iter().map(|p| p.public_key).collect();
    let mut peers: Vec<PeerChange> = desired
        .peers
        .iter()
        .filter(|p| !have.get(&p.public_key).is_some_and(|h| peer_matches(p, h)))
        .cloned()
        .map(PeerChange::Upsert)
        .collect();
    peers.extend(
        current
            .peers
            .iter()
            .filter(|p| !want_keys.contains(&p.public_key))
            .map(|p| PeerChange::Remove(p.public_key)),
    );
    WgSet {
        private_key: (current.private_key != Some(desired.private_key))
            .then_some(desired.private_key),
        listen_port: desired.listen_port.filter(|p| *p != current.listen_port),
        peers,
    }
}

/// `/updated/<id>/wireguard/<name>/status` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WgLinkStatus {
    /// Some peer completed a handshake within [`HANDSHAKE_FRESH_FOR`].
    Up,
    /// Peers configured, none with a fresh handshake.
    Connecting,
    /// No device or no peers.
    Down,
}

impl WgLinkStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            WgLinkStatus::Up => "up",
            WgLinkStatus::Connecting => "connecting",
            WgLinkStatus::Down => "down",
        }
    }
}

/// Status from the number of peers and the age of the newest handshake. Pure.
pub fn decide_status(peer_count: usize, newest_handshake_age: Option<Duration>) -> WgLinkStatus {
    match (peer_count, newest_handshake_age) {
        (0, _) => WgLinkStatus::Down,
        (_, Some(age)) if age <= HANDSHAKE_FRESH_FOR => WgLinkStatus::Up,
        _ => WgLinkStatus::Connecting,
    }
}

/// Status of a device's reported state at `now`.
pub fn status_of(state: Option<&WgState>, now: SystemTime) -> WgLinkStatus {
    let Some(state) = state else {
        return WgLinkStatus::Down;
    };
    let newest = state
        .peers
        .iter()
        .filter_map(|p| p.last_handshake)
        .max()
        // A handshake "in the future" (clock stepped back) counts as just now.
        .map(|t| now.duration_since(t).unwrap_or(Duration::ZERO));
    decide_status(state.peers.len(), newest)
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::apply_set;
    use super::*;
    use meduza_generators::plan::wireguard::WgPeer;

    fn key(b: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([b; 32])
    }

    /// A device as a plan gives it (shared with the manager's tests).
    pub(crate) fn device(peers: Vec<WgPeer>) -> WgDevice {
        WgDevice {
            name: "a".into(),
            dev: "wg-a".into(),
            private_key: key(1),
            listen_port: Some(51820),
            addresses: vec!["10.9.0.1/24".parse().unwrap()],
            peers,
        }
    }

    pub(crate) fn peer(b: u8, ip: &str) -> WgPeer {
        WgPeer {
            name: format!("p{b}"),
            public_key: key(b),
            preshared_key: None,
            allowed_ips: vec![ip.parse().unwrap()],
            endpoint: Some("10.0.0.2:51820".parse().unwrap()),
            persistent_keepalive: Some(25),
        }
    }

    #[test]
    fn fresh_device_gets_key_port_and_all_peers() {
        let cfg = WgConfig::from_device(&device(vec![peer(2, "10.9.0.2/32")])).unwrap();
        let set = plan_device(&cfg, &WgState::default());
        assert_eq!(set.private_key, Some([1; 32]));
        assert_eq!(set.listen_port, Some(51820));
        assert_eq!(set.peers.len(), 1);
        assert!(matches!(&set.peers[0], PeerChange::Upsert(p) if p.public_key == [2; 32]));
    }

    #[test]
    fn converged_device_needs_nothing() {
        let cfg = WgConfig::from_device(&device(vec![peer(2, "10.9.0.2/32")])).unwrap();
        let mut st = WgState::default();
        let set = plan_device(&cfg, &st);
        apply_set(&mut st, &set);
        assert!(plan_device(&cfg, &st).is_empty());
    }

    #[test]
    fn peers_are_added_updated_and_removed_individually() {
        let cfg1 = WgConfig::from_device(&device(vec![
            peer(2, "10.9.0.2/32"),
            peer(3, "10.9.0.3/32"),
        ]))
        .unwrap();
        let mut st = WgState::default();
        let set = plan_device(&cfg1, &st);
        apply_set(&mut st, &set);
        let cfg2 = WgConfig::from_device(&device(vec![
            peer(3, "10.9.0.33/32"),
            peer(4, "10.9.0.4/32"),
        ]))
        .unwrap();
        let set = plan_device(&cfg2, &st);
        assert_eq!(set.private_key, None);
        assert_eq!(set.listen_port, None);
        assert_eq!(
            set.peers,
            vec![
                PeerChange::Upsert(cfg2.peers[0].clone()),
                PeerChange::Upsert(cfg2.peers[1].clone()),
                PeerChange::Remove([2; 32]),
            ]
        );
    }

    #[test]
    fn learnt_endpoint_of_a_peer_without_one_is_kept() {
        let mut p = peer(2, "10.9.0.2/32");
        p.endpoint = None;
        let cfg = WgConfig::from_device(&device(vec![p])).unwrap();
        let mut st = WgState::default();
        let set = plan_device(&cfg, &st);
        apply_set(&mut st, &set);
        st.peers[0].endpoint = Some("198.51.100.7:4000".parse().unwrap());
        assert!(plan_device(&cfg, &st).is_empty());
    }

    #[test]
    fn bad_key_names_device_and_field_but_not_the_key() {
        let mut d = device(vec![]);
        d.private_key = "c2VjcmV0LXNob3J0".into();
        let err = WgConfig::from_device(&d).unwrap_err().to_string();
        assert!(err.contains("wg-a") && err.contains("private_key"));
        assert!(!err.contains("c2VjcmV0LXNob3J0"));
    }

    #[test]
    fn status_follows_peer_count_and_handshake_age() {
        assert_eq!(
            decide_status(0, Some(Duration::from_secs(1))),
            WgLinkStatus::Down
        );
        assert_eq!(decide_status(1, None), WgLinkStatus::Connecting);
        assert_eq!(
            decide_status(2, Some(Duration::from_secs(5))),
            WgLinkStatus::Up
        );
        assert_eq!(
            decide_status(2, Some(HANDSHAKE_FRESH_FOR)),
            WgLinkStatus::Up
        );
        assert_eq!(
            decide_status(2, Some(HANDSHAKE_FRESH_FOR + Duration::from_secs(1))),
            WgLinkStatus::Connecting
        );
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut st = WgState::default();
        assert_eq!(status_of(None, now), WgLinkStatus::Down);
        assert_eq!(status_of(Some(&st), now), WgLinkStatus::Down);
        let cfg = WgConfig::from_device(&device(vec![
            peer(2, "10.9.0.2/32"),
            peer(3, "10.9.0.3/32"),
        ]))
        .unwrap();
        let set = plan_device(&cfg, &st);
        apply_set(&mut st, &set);
        assert_eq!(status_of(Some(&st), now), WgLinkStatus::Connecting);
        st.peers[1].last_handshake = Some(now - Duration::from_secs(30));
        assert_eq!(status_of(Some(&st), now), WgLinkStatus::Up);
        assert_eq!(
            status_of(Some(&st), now + Duration::from_secs(300)),
            WgLinkStatus::Connecting
        );
    }
}
