//! The global settings: everything under `/global/` and `/fleet/`, each domain's part
//! parsed by that domain's module, plus the fleet keys and the confirm timeout.
//!
//! Owns: [`Global`], the fleet keys, and `confirm_timeout`'s default and range.
//! Must not: read `/nodes/` (a node's defaults come from here, not the reverse).

use super::clash::{parse_clash_global, ClashGlobal};
use super::dns::{parse_mosdns_global, parse_upstreams, MosdnsGlobal};
use super::mesh::{
    parse_easytier_global, parse_mesh_type, parse_tinc_global, EasytierGlobal, MeshType, TincGlobal,
};
use super::routing::{parse_bgp_filters, parse_internal_routing, InternalRouting, PrefixRule};
use crate::parse::{self, Reader};
use crate::plan::dns::UpstreamGroup;
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Global {
    pub mesh_type: Option<MeshType>,
    pub internal_routing: InternalRouting,
    pub easytier: EasytierGlobal,
    pub tinc: TincGlobal,
    pub bgp_filter_in: Vec<PrefixRule>,
    pub bgp_filter_out: Vec<PrefixRule>,
    pub clash: ClashGlobal,
    pub mosdns: MosdnsGlobal,
    pub dns_upstreams: BTreeMap<String, UpstreamGroup>,
    /// `/fleet/proxy`: HTTP(S)/SOCKS proxy the fleet manager may fall back to.
    pub fleet_proxy: Option<String>,
    /// `/fleet/nodes/<id>/api_url`.
    pub fleet_nodes: BTreeMap<String, String>,
    /// `/global/confirm_timeout`: seconds a gateway waits, after applying a commit,
    /// for an etcd round trip before it rolls back (docs/operations.md).
    #[serde(skip)]
    pub confirm_timeout_secs: u64,
}

/// `confirm_timeout`: default and accepted range, in seconds.
pub const CONFIRM_TIMEOUT_DEFAULT_SECS: u64 = 90;

pub const CONFIRM_TIMEOUT_MIN_SECS: u64 = 10;

pub const CONFIRM_TIMEOUT_MAX_SECS: u64 = 3600;

/// `/global/*` and `/fleet/*`, in the order the keys were always read.
pub(super) fn parse_global(r: &mut Reader<'_>) -> Global {
    let mesh_type = parse_mesh_type(r);
    let internal_routing = parse_internal_routing(r);
    let easytier = parse_easytier_global(r);
    let tinc = parse_tinc_global(r);
    let (bgp_filter_in, bgp_filter_out) = parse_bgp_filters(r);
    let clash = parse_clash_global(r);
    let mosdns = parse_mosdns_global(r);
    let dns_upstreams = parse_upstreams(r, "/global/dns/upstreams/");
    let fleet_proxy = r.parsed("/fleet/proxy", |v| {
        if ["http://", "https://", "socks5://", "socks5h://"]
            .iter()
            .any(|p| v.starts_with(p))
        {
            Ok(v.to_string())
        } else {
            Err("proxy must be an http://, https:// or socks5:// URL".into())
        }
    });
    let mut fleet_nodes = BTreeMap::new();
    for id in r.snap.children("/fleet/nodes/") {
        let key = format!("/fleet/nodes/{id}/api_url");
        if let Some(url) = r.parsed(&key, parse::parse_http_url) {
            fleet_nodes.insert(id, url);
        }
    }
    Global {
        mesh_type,
        internal_routing,
        easytier,
        tinc,
        bgp_filter_in,
        bgp_filter_out,
        clash,
        mosdns,
        dns_upstreams,
        fleet_proxy,
        fleet_nodes,
        confirm_timeout_secs: confirm_timeout(r, "/global/confirm_timeout")
            .unwrap_or(CONFIRM_TIMEOUT_DEFAULT_SECS),
    }
}

pub(super) fn confirm_timeout(r: &mut Reader<'_>, key: &str) -> Option<u64> {
    r.u64_in(key, CONFIRM_TIMEOUT_MIN_SECS, CONFIRM_TIMEOUT_MAX_SECS)
}
