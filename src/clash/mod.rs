//! Mihomo (Clash Meta) and MosDNS orchestration (DESIGN §9).
//!
//! Owns: the mihomo REST API client (`api`), the pure health verdict that follows each
//! URLTest group to its leaf proxy (`verdict`), the active delay tests of the nodes in
//! use (`liveness`), the crash monitor that gates TPROXY on mihomo's health (the pure
//! state machine `gate` and its driver `monitor`), MosDNS rule-file downloads
//! (`rules`), subscription download and mihomo hot reload (`subscription`), and the
//! startup chain DNS → mihomo healthy → rules → MosDNS → TPROXY (`chain`).
//!
//! Must not: spawn or signal processes itself (the supervisor does, through the
//! traits defined here), touch nftables or routes (the data plane does, behind
//! [`monitor::TproxyGate`]), render configuration (generators do), or talk to etcd
//! (status goes out through [`monitor::ClashHealthSink`]).

pub mod api;
pub mod chain;
pub mod gate;
pub mod liveness;
pub mod monitor;
pub mod rules;
pub mod subscription;
pub mod verdict;

pub use api::{verdict, Health, MihomoApi};
pub use chain::{ChainConfig, ChainDeps, ChainStep};
pub use gate::{HealthStatus, MonitorConfig, Phase};
pub use monitor::{ClashHealthSink, ClashMonitor, MonitorHandle, ProcessEvent, TproxyGate};
pub use rules::{Fetcher, RetryPolicy, Route, RuleFile, RulesReport};

/// mihomo's mixed (HTTP + SOCKS) port, used for downloads while Clash is enabled.
pub const MIXED_PROXY_URL: &str = "http://127.0.0.1:7890";
/// mihomo's DNS listener the DNS frontend forwards to while mihomo is healthy.
pub const MIHOMO_DNS: &str = "127.0.0.1:1053";
/// MosDNS's primary listener.
pub const MOSDNS_DNS: &str = "127.0.0.1:1153";
