//! Kernel WireGuard: the link is created over rtnetlink (`type wireguard`) and
//! configured over generic netlink family `wireguard` (include/uapi/linux/wireguard.h)
//! with `netlink-packet-wireguard` messages.
//!
//! Owns: translating [`WgSet`] into `WG_CMD_SET_DEVICE` and `WG_CMD_GET_DEVICE`
//! replies into [`WgState`]. Must not: replace peers wholesale (no
//! `WGDEVICE_F_REPLACE_PEERS`): peers change one by one, so unchanged peers keep
//! their sessions.

use std::time::{Duration, SystemTime};

use futures::StreamExt;
use genetlink::GenetlinkHandle;
use ipnet::IpNet;
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};
use rtnetlink::packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use tokio::sync::OnceCell;

use super::{LinkOps, PeerChange, WgBackend, WgError, WgPeerState, WgSet, WgState};

/// Kernel WireGuard over generic netlink.
#[derive(Debug)]
pub struct KernelWg {
    links: LinkOps,
    genl: OnceCell<GenetlinkHandle>,
}

fn genl_err(dev: &str, op: &'static str, e: impl std::fmt::Display) -> WgError {
    WgError::Genl {
        dev: dev.to_string(),
        op,
        detail: e.to_string(),
    }
}

/// The attributes of `WG_CMD_SET_DEVICE` for a set. Pure.
pub fn set_attributes(dev: &str, set: &WgSet) -> Vec<WireguardAttribute> {
    let mut attrs = vec![WireguardAttribute::IfName(dev.to_string())];
    if let Some(k) = set.private_key {
        attrs.push(WireguardAttribute::PrivateKey(k));
    }
    if let Some(p) = set.listen_port {
        attrs.push(WireguardAttribute::ListenPort(p));
    }
    let peers: Vec<WireguardPeer> = set
        .peers
        .iter()
        .map(|c| match c {
            PeerChange::Remove(k) => WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey(*k),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
            ]),
            PeerChange::Upsert(p) => {
                let mut a = vec![
                    WireguardPeerAttribute::PublicKey(p.public_key),
                    WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
                    // All zeros clears a preshared key.
                    WireguardPeerAttribute::PresharedKey(p.preshared_key.unwrap_or([0; 32])),
                    WireguardPeerAttribute::PersistentKeepalive(p.persistent_keepalive),
                ];
                if let Some(e) = p.endpoint {
                    a.push(WireguardPeerAttribute::Endpoint(e));
                }
                a.push(WireguardPeerAttribute::AllowedIps(
                    p.allowed_ips
                        .iter()
                        .map(|n| {
                            WireguardAllowedIp(vec![
                                WireguardAllowedIpAttr::Family(match n {
                                    IpNet::V4(_) => WireguardAddressFamily::Ipv4,
                                    IpNet::V6(_) => WireguardAddressFamily::Ipv6,
                                }),
                                WireguardAllowedIpAttr::IpAddr(n.addr()),
                                WireguardAllowedIpAttr::Cidr(n.prefix_len()),
                            ])
                        })
                        .collect(),
                ));
                WireguardPeer(a)
            }
        })
        .collect();
    if !peers.is_empty() {
        attrs.push(WireguardAttribute::Peers(peers));
    }
    attrs
}

/// Fold the attributes of one `WG_CMD_GET_DEVICE` reply message into a state (a
/// device with many peers spans several messages). Pure.
pub fn absorb_reply(state: &mut WgState, attrs: &[WireguardAttribute]) {
    for a in attrs {
        match a {
            WireguardAttribute::PrivateKey(k) => {
                state.private_key = (*k != [0; 32]).then_some(*k);
            }
            WireguardAttribute::ListenPort(p) => state.listen_port = *p,
            WireguardAttribute::Peers(peers) => {
                for WireguardPeer(pa) in peers {
                    let mut p = WgPeerState::new([0; 32]);
                    for x in pa {
                        match x {
                            WireguardPeerAttribute::PublicKey(k) => p.public_key = *k,
                            WireguardPeerAttribute::PresharedKey(k) => {
                                p.preshared_key = (*k != [0; 32]).then_some(*k)
                            }
                            WireguardPeerAttribute::Endpoint(e) => p.endpoint = Some(*e),
                            WireguardPeerAttribute::PersistentKeepalive(s) => {
                                p.persistent_keepalive = *s
                            }
                            WireguardPeerAttribute::LastHandshake(t) if t.seconds > 0 => {
                                p.last_handshake = Some(
                                    SystemTime::UNIX_EPOCH
                                        + Duration::from_secs(t.seconds.unsigned_abs())
                                        + Duration::from_nanos(t.nano_seconds.unsigned_abs()),
                                )
                            }
                            WireguardPeerAttribute::RxBytes(n) => p.rx_bytes = *n,
                            WireguardPeerAttribute::TxBytes(n) => p.tx_bytes = *n,
                            WireguardPeerAttribute::AllowedIps(ips) => {
                                for WireguardAllowedIp(ia) in ips {
                                    let addr = ia.iter().find_map(|x| match x {
                                        WireguardAllowedIpAttr::IpAddr(a) => Some(*a),
                                        _ => None,
                                    });
                                    let len = ia.iter().find_map(|x| match x {
                                        WireguardAllowedIpAttr::Cidr(c) => Some(*c),
                                        _ => None,
                                    });
                                    if let (Some(a), Some(l)) = (addr, len) {
                                        if let Ok(n) = IpNet::new(a, l) {
                                            p.allowed_ips.push(n);
                                        }
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                    // A peer continued from the previous message has the same key.
                    match state
                        .peers
                        .iter_mut()
                        .find(|q| q.public_key == p.public_key)
                    {
                        Some(q) => q.allowed_ips.extend(p.allowed_ips),
                        None => state.peers.push(p),
                    }
                }
            }
            _ => {}
        }
    }
    for p in &mut state.peers {
        p.allowed_ips.sort();
    }
}

impl KernelWg {
    pub fn new(links: LinkOps) -> Self {
        Self {
            links,
            genl: OnceCell::new(),
        }
    }

    async fn handle(&self, dev: &str) -> Result<GenetlinkHandle, WgError> {
        self.genl
            .get_or_try_init(|| async {
                let (conn, handle, _) =
                    genetlink::new_connection().map_err(|e| genl_err(dev, "open socket", e))?;
                tokio::spawn(conn);
                Ok::<_, WgError>(handle)
            })
            .await
            .cloned()
    }

    async fn request(
        &self,
        dev: &str,
        op: &'static str,
        cmd: WireguardCmd,
        attributes: Vec<WireguardAttribute>,
        flags: u16,
    ) -> Result<Vec<WireguardMessage>, WgError> {
        let mut handle = self.handle(dev).await?;
        let mut msg = NetlinkMessage::from(GenlMessage::from_payload(WireguardMessage {
            cmd,
            attributes,
        }));
        msg.header.flags = flags;
        let mut replies = handle
            .request(msg)
            .await
            .map_err(|e| genl_err(dev, op, e))?;
        let mut out = Vec::new();
        while let Some(reply) = replies.next().await {
            let reply = reply.map_err(|e| genl_err(dev, op, e))?;
            match reply.payload {
                NetlinkPayload::InnerMessage(genl) => out.push(genl.payload),
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    return Err(genl_err(dev, op, e.to_io()));
                }
                _ => {}
            }
        }
        Ok(out)
    }
}

impl WgBackend for KernelWg {
    async fn create(&self, dev: &str) -> Result<(), WgError> {
        if self.links.link(dev).await?.is_some() {
            return Ok(());
        }
        self.links
            .handle()
            .link()
            .add(rtnetlink::LinkWireguard::new(dev).build())
            .execute()
            .await
            .map_err(|e| WgError::Link {
                dev: dev.to_string(),
                op: "add wireguard link",
                detail: e.to_string(),
            })
    }

    async fn get(&self, dev: &str) -> Result<WgState, WgError> {
        let msgs = self
            .request(
                dev,
                "get device",
                WireguardCmd::GetDevice,
                vec![WireguardAttribute::IfName(dev.to_string())],
                NLM_F_REQUEST | NLM_F_DUMP,
            )
            .await?;
        let mut st = WgState::default();
        for m in &msgs {
            absorb_reply(&mut st, &m.attributes);
        }
        Ok(st)
    }

    async fn set(&self, dev: &str, set: &WgSet) -> Result<(), WgError> {
        if set.is_empty() {
            return Ok(());
        }
        self.request(
            dev,
            "set device",
            WireguardCmd::SetDevice,
            set_attributes(dev, set),
            NLM_F_REQUEST | NLM_F_ACK,
        )
        .await
        .map(|_| ())
    }

    async fn delete(&self, dev: &str) -> Result<(), WgError> {
        self.links.delete(dev).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::wireguard::WgPeerConfig;
    use netlink_packet_wireguard::WireguardTimeSpec;

    #[test]
    fn set_sends_only_changes_and_removes_by_flag() {
        let set = WgSet {
            private_key: None,
            listen_port: Some(51820),
            peers: vec![
                PeerChange::Upsert(WgPeerConfig {
                    public_key: [2; 32],
                    preshared_key: None,
                    endpoint: Some("10.0.0.2:51820".parse().unwrap()),
                    persistent_keepalive: 25,
                    allowed_ips: vec!["10.9.0.2/32".parse().unwrap()],
                }),
                PeerChange::Remove([3; 32]),
            ],
        };
        let attrs = set_attributes("wg-a", &set);
        assert_eq!(attrs[0], WireguardAttribute::IfName("wg-a".into()));
        assert_eq!(attrs[1], WireguardAttribute::ListenPort(51820));
        let WireguardAttribute::Peers(peers) = &attrs[2] else {
            panic!("no peers attribute: {attrs:?}");
        };
        assert!(peers[0].0.contains(&WireguardPeerAttribute::Flags(
            WireguardPeerFlags::ReplaceAllowedIps
        )));
        assert_eq!(
            peers[1].0,
            vec![
                WireguardPeerAttribute::PublicKey([3; 32]),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe)
            ]
        );
        assert!(!attrs
            .iter()
            .any(|a| matches!(a, WireguardAttribute::Flags(_))));
    }

    #[test]
    fn reply_spanning_messages_merges_peer_allowed_ips() {
        let ip = |a: &str, l: u8| {
            WireguardAllowedIp(vec![
                WireguardAllowedIpAttr::Family(WireguardAddressFamily::Ipv4),
                WireguardAllowedIpAttr::IpAddr(a.parse().unwrap()),
                WireguardAllowedIpAttr::Cidr(l),
            ])
        };
        let mut st = WgState::default();
        absorb_reply(
            &mut st,
            &[
                WireguardAttribute::PrivateKey([1; 32]),
                WireguardAttribute::ListenPort(51820),
                WireguardAttribute::Peers(vec![WireguardPeer(vec![
                    WireguardPeerAttribute::PublicKey([2; 32]),
                    WireguardPeerAttribute::LastHandshake(WireguardTimeSpec {
                        seconds: 100,
                        nano_seconds: 0,
                    }),
                    WireguardPeerAttribute::AllowedIps(vec![ip("10.9.1.0", 24)]),
                ])]),
            ],
        );
        absorb_reply(
            &mut st,
            &[WireguardAttribute::Peers(vec![WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey([2; 32]),
                WireguardPeerAttribute::AllowedIps(vec![ip("10.9.0.0", 24)]),
            ])])],
        );
        assert_eq!(st.private_key, Some([1; 32]));
        assert_eq!(st.peers.len(), 1);
        assert_eq!(
            st.peers[0].allowed_ips,
            vec![
                "10.9.0.0/24".parse::<IpNet>().unwrap(),
                "10.9.1.0/24".parse().unwrap()
            ]
        );
        assert_eq!(
            st.peers[0].last_handshake,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(100))
        );
    }
}
