//! `/etc/etcd_hosts`: the `/dns/hosts/<name>` records in hosts-file format, for
//! containers that mount it as their `/etc/hosts`.
//!
//! One `<ip>\t<name>` line per address, sorted by name then address, so the file only
//! changes when a record does. The file exists (possibly empty) on every node.

use super::MODE_PUBLIC;
use crate::model::Config;
use crate::output::{DomainOutput, FileOut};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

pub const HOSTS_PATH: &str = "/etc/etcd_hosts";

/// The hosts-file text of `hosts` (name → addresses).
pub fn hosts_text(hosts: &BTreeMap<String, Vec<IpAddr>>) -> String {
    let mut s = String::new();
    for (name, addrs) in hosts {
        let mut addrs = addrs.clone();
        addrs.sort();
        addrs.dedup();
        for a in addrs {
            let _ = writeln!(s, "{a}\t{name}");
        }
    }
    s
}

pub fn render(cfg: &Config) -> DomainOutput {
    DomainOutput {
        files: vec![FileOut::new(
            HOSTS_PATH,
            hosts_text(&cfg.dns_hosts),
            MODE_PUBLIC,
        )],
        services: Vec::new(),
    }
}
