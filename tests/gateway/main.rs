//! Several gateways in network namespaces around a hub with a real etcd (`mesh`,
//! `gateway`; needs root): each runs `meduza run` with real FRR, tinc, OpenVPN,
//! EasyTier and the tunnel doubles; the fleet manager reaching them, and its console
//! in Chromium.

mod fleet_console;
mod fleet_gateways;
mod frr_policy;
mod gateway_cron;
mod gateway_easytier;
mod gateway_etcd;
mod gateway_mesh;
mod gateway_openvpn;
mod gateway_rollback;
mod gateway_supervise;
mod tunnel_presets;
