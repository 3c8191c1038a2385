//! What a generator takes and returns: the environment ([`RenderEnv`], [`Bins`]), the
//! files and services of one domain ([`DomainOutput`], [`FileOut`]) and the runtime
//! plans of mihomo and MosDNS ([`ClashRuntime`], [`MosdnsRuntime`]).
//!
//! Owns: these shared types, so that `crate::gen` and `crate::render` both import them
//! from here and neither imports the other's internals (`render` composes `gen`; `gen`
//! never imports `render`). Must not: render, validate or decide anything; these are plain data.

use crate::model::{ClashHealthCheck, ClashMode};
use crate::plan::service::ServiceSpec;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

/// Inputs that are not in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderEnv {
    /// `DEFAULT_GW`: never proxied by TPROXY.
    pub default_gw: Option<IpAddr>,
    /// Used when `/nodes/<id>/clash/secret` is absent: the daemon generates and persists
    /// one per node. An empty string means "none": rendering Clash then fails naming
    /// the key rather than falling back to a public default.
    pub clash_secret: String,
    pub bins: Bins,
}

/// Paths of the child programs (`MEDUZA_BIN_<TOOL>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bins {
    pub mihomo: String,
    pub mosdns: String,
    pub easytier: String,
    pub tincd: String,
    pub openvpn: String,
}

impl Default for Bins {
    /// The image's paths.
    fn default() -> Self {
        Self {
            mihomo: "/usr/bin/mihomo".into(),
            mosdns: "/usr/bin/mosdns".into(),
            easytier: "/usr/bin/easytier-core".into(),
            tincd: "/usr/sbin/tincd".into(),
            openvpn: "/usr/sbin/openvpn".into(),
        }
    }
}

/// One file to write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileOut {
    /// Absolute, e.g. `/etc/frr/frr.conf`; the daemon prefixes `MEDUZA_ROOT`.
    pub path: String,
    pub content: String,
    /// Permission bits (0o600 for anything holding a secret).
    pub mode: u32,
}

impl FileOut {
    pub fn new(path: impl Into<String>, content: impl Into<String>, mode: u32) -> Self {
        Self {
            path: path.into(),
            content: content.into(),
            mode,
        }
    }
}

/// Files and services of one domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct DomainOutput {
    pub files: Vec<FileOut>,
    pub services: Vec<ServiceSpec>,
}

/// What the mihomo orchestration (health, subscription refresh, TPROXY gating) needs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClashRuntime {
    pub mode: ClashMode,
    /// `external-controller` (REST API).
    pub controller: SocketAddr,
    /// API secret (`Authorization: Bearer`); never serialized.
    #[serde(skip)]
    pub secret: String,
    /// Active subscription `(name, url)`.
    pub subscription: Option<(String, String)>,
    /// Refresh interval when `clash/refresh/enable` is true.
    pub refresh_minutes: Option<u32>,
    /// `/etc/mihomo/config.yaml`.
    pub config_path: String,
    /// `/etc/mihomo` (mihomo's `-d`; every provider file must stay inside it).
    pub home_dir: String,
    /// Where the subscription is stored (`/etc/mihomo/providers/<name>.yaml`); empty
    /// when no subscription is active.
    pub provider_path: String,
    /// The node's `clash/health/*`: the URL, interval and timeout mihomo's checks use,
    /// and how often and how patiently the monitor delay-tests the node in use.
    pub health: ClashHealthCheck,
}

/// What the MosDNS orchestration needs: rule files to download before start.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MosdnsRuntime {
    /// Absolute path (under `/etc/mosdns/`) → URL.
    pub rule_files: BTreeMap<String, String>,
    /// `mosdns/refresh`: minutes between rule-file refreshes.
    pub refresh_minutes: u32,
}
