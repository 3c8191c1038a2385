//! In-process and loopback tests, no network namespaces and no etcd: the node API
//! with an in-memory store, the Clash chain against the real mihomo and the doubles,
//! the DNS frontend against real dnsmasq upstreams, and the supervisor with fake and
//! real children.
//!
//! `supervise_process` sets `ETCD_PASS` in this process's environment (to prove the
//! supervisor keeps it from its children); no test here starts `meduza` with the
//! inherited environment, which would read it.

mod api_security;
mod clash_api;
mod clash_chain;
mod clash_monitor;
mod clash_rules;
mod dns_failover;
mod dns_forward;
mod dns_hosts;
mod supervise_apply;
mod supervise_process;
