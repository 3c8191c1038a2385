//! Host records from `/dns/hosts/<name>`: the in-memory table the frontend answers
//! from, and the `/etc/etcd_hosts` file kept for containers that mount it.
//!
//! Owns: converting the plan's map into a lookup table keyed by wire-format name, and
//! writing the hosts file (only when its content changes, through
//! [`crate::files::write_atomic`]).
//! Must not: watch etcd (the reconciler calls `DnsHandle::set_hosts`) or touch any
//! other file.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::IpAddr;
use std::path::Path;

use super::wire;

/// Lower-cased wire-format name → addresses (plan order, duplicates removed).
#[derive(Debug, Default)]
pub struct HostsTable {
    map: HashMap<Box<[u8]>, Box<[IpAddr]>>,
}

impl HostsTable {
    pub fn from_plan(hosts: &BTreeMap<String, Vec<IpAddr>>) -> Self {
        let mut map = HashMap::with_capacity(hosts.len());
        for (name, addrs) in hosts {
            let Some(key) = wire::name_to_wire(name) else {
                tracing::warn!(host = %name, "host record skipped: not a valid DNS name");
                continue;
            };
            let mut seen = BTreeSet::new();
            let addrs: Vec<IpAddr> = addrs.iter().copied().filter(|a| seen.insert(*a)).collect();
            map.insert(key.into_boxed_slice(), addrs.into_boxed_slice());
        }
        Self { map }
    }

    /// Addresses of a name given as lower-cased wire bytes.
    pub fn lookup(&self, lower_wire_name: &[u8]) -> Option<&[IpAddr]> {
        self.map.get(lower_wire_name).map(|b| &b[..])
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The hosts-file text: `<ip>\t<name>` lines sorted by name, then address.
pub fn render_hosts_file(hosts: &BTreeMap<String, Vec<IpAddr>>) -> String {
    let mut lines = BTreeSet::new();
    for (name, addrs) in hosts {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        for a in addrs {
            lines.insert((name.clone(), *a));
        }
    }
    let mut out = String::new();
    for (name, a) in lines {
        out.push_str(&format!("{a}\t{name}\n"));
    }
    out
}

/// Mode of the hosts file: world-readable, as containers that mount it read it as
/// any user.
const HOSTS_FILE_MODE: u32 = 0o644;

/// Writes `/etc/etcd_hosts` (or `path`) when its content (or mode) differs from
/// `hosts`. Returns whether the file was written. Atomic and durable
/// ([`crate::files::write_atomic`]): a reader sees the old or the new file, never a
/// partial one, also after a power cut.
pub fn write_hosts_file_if_changed(
    path: &Path,
    hosts: &BTreeMap<String, Vec<IpAddr>>,
) -> io::Result<bool> {
    crate::files::write_if_changed(path, render_hosts_file(hosts).as_bytes(), HOSTS_FILE_MODE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> BTreeMap<String, Vec<IpAddr>> {
        let mut m = BTreeMap::new();
        m.insert(
            "db.example.com".to_string(),
            vec![
                "192.168.1.101".parse().unwrap(),
                "192.168.1.100".parse().unwrap(),
            ],
        );
        m.insert("api.service".to_string(), vec!["fd00::10".parse().unwrap()]);
        m
    }

    #[test]
    fn table_lookup_by_wire_name() {
        let t = HostsTable::from_plan(&plan());
        assert_eq!(t.len(), 2);
        let key = wire::name_to_wire("DB.Example.Com").unwrap();
        assert_eq!(t.lookup(&key).unwrap().len(), 2);
        assert!(t.lookup(&wire::name_to_wire("other").unwrap()).is_none());
    }

    #[test]
    fn file_written_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etcd_hosts");
        assert!(write_hosts_file_if_changed(&path, &plan()).unwrap());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "fd00::10\tapi.service\n192.168.1.100\tdb.example.com\n192.168.1.101\tdb.example.com\n"
        );
        assert!(!write_hosts_file_if_changed(&path, &plan()).unwrap());
        let mut p = plan();
        p.remove("api.service");
        assert!(write_hosts_file_if_changed(&path, &p).unwrap());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }
}
