//! One node: `/nodes/<id>/`, each domain's keys parsed by that domain's module.
//!
//! Owns: [`Node`] and the node's own basic keys (`lan`, `private_lan`,
//! `confirm_timeout`). Must not: validate a domain's keys itself, or check across
//! nodes (`Config::parse`).

use super::api::{parse_api, ApiTls};
use super::clash::{parse_clash, Clash};
use super::dns::{parse_dns_guard, parse_mosdns, parse_upstreams, DnsGuard, Mosdns};
use super::global::{confirm_timeout, Global};
use super::mesh::{parse_easytier, parse_tinc, Easytier, Tinc};
use super::openvpn::{parse_openvpn, OpenVpn};
use super::routing::{parse_bgp_ospf, Bgp, Ospf};
use super::services::{parse_services, ServiceOverrides};
use super::tunnels::{parse_tunnels, Tunnel};
use super::wireguard::{parse_wireguard, Wireguard};
use crate::parse::Reader;
use crate::plan::dns::UpstreamGroup;
use ipnet::IpNet;
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    pub id: String,
    pub lan: Vec<IpNet>,
    pub private_lan: Vec<IpNet>,
    pub easytier: Easytier,
    pub tinc: Tinc,
    pub openvpn: Vec<OpenVpn>,
    pub wireguard: Vec<Wireguard>,
    pub bgp: Bgp,
    pub ospf: Ospf,
    pub clash: Clash,
    pub mosdns: Mosdns,
    pub dns_upstreams: BTreeMap<String, UpstreamGroup>,
    pub dns_guard: DnsGuard,
    pub services: BTreeMap<String, ServiceOverrides>,
    pub tunnels: Vec<Tunnel>,
    #[serde(skip)]
    pub api_token: Option<String>,
    /// `/nodes/<id>/api/tls/{cert,key}`: the node API's HTTPS certificate and key.
    #[serde(skip)]
    pub api_tls: Option<ApiTls>,
    /// `/nodes/<id>/confirm_timeout`, else the global value.
    #[serde(skip)]
    pub confirm_timeout_secs: u64,
}

/// Every key under `/nodes/<id>/`, domain by domain.
pub(super) fn parse_node(r: &mut Reader<'_>, id: &str, global: &Global) -> Node {
    let p = format!("/nodes/{id}/");
    let k = |s: &str| format!("{p}{s}");
    let lan = r.cidrs(&k("lan"));
    let private_lan = r.cidrs(&k("private_lan"));
    let easytier = parse_easytier(r, &p, global);
    let tinc = parse_tinc(r, id, &p);
    let openvpn = parse_openvpn(r, &k("openvpn/"));
    let wireguard = parse_wireguard(r, &k("wireguard/"));
    let (bgp, ospf) = parse_bgp_ospf(r, &p);
    let clash = parse_clash(r, &p, global);
    let mosdns = parse_mosdns(r, &p);
    let dns_upstreams = parse_upstreams(r, &k("dns/upstreams/"));
    let dns_guard = parse_dns_guard(r, &p);
    let services = parse_services(r, &p);
    let tunnels = parse_tunnels(r, &p);
    let (api_token, api_tls) = parse_api(r, &p);
    Node {
        id: id.to_string(),
        lan,
        private_lan,
        easytier,
        tinc,
        openvpn,
        wireguard,
        bgp,
        ospf,
        clash,
        mosdns,
        dns_upstreams,
        dns_guard,
        services,
        tunnels,
        api_token,
        api_tls,
        confirm_timeout_secs: confirm_timeout(r, &k("confirm_timeout"))
            .unwrap_or(global.confirm_timeout_secs),
    }
}
