//! `/v1/stats`: the predecessor's `[{name, value}]` counters.
//!
//! Owns: reading interface byte counters (behind [`IfaceCounters`]: `/proc/net/dev`
//! for real, a settable fake for tests, built only for them and the `test-util`
//! feature) and the pure assembly of the stat list from those and the daemon's
//! [`StatsSources`]. Must not: reset or keep counters; every value is the source's
//! running total, so a consumer computes deltas.

use super::types::{Stat, StatsSources};
use std::path::PathBuf;
#[cfg(any(test, feature = "test-util"))]
use std::sync::Mutex;

/// Byte counters of one network interface since it was created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfaceCounter {
    pub name: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("reading {path}: {reason}")]
    Read { path: String, reason: String },
}

/// The OS edge for interface counters.
pub trait IfaceCounters: Send + Sync + 'static {
    fn read(&self) -> Result<Vec<IfaceCounter>, StatsError>;
}

/// Reads `/proc/net/dev` (or another file of that format, for tests).
#[derive(Debug, Clone)]
pub struct ProcNetDev {
    path: PathBuf,
}

impl Default for ProcNetDev {
    fn default() -> Self {
        Self {
            path: PathBuf::from("/proc/net/dev"),
        }
    }
}

impl ProcNetDev {
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }
}

impl IfaceCounters for ProcNetDev {
    fn read(&self) -> Result<Vec<IfaceCounter>, StatsError> {
        let text = std::fs::read_to_string(&self.path).map_err(|e| StatsError::Read {
            path: self.path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(parse_proc_net_dev(&text))
    }
}

/// Parse `/proc/net/dev`: two header lines, then `name: rx_bytes rx_packets ... (8
/// receive fields) tx_bytes ...` (linux `net/core/net-procfs.c` `dev_seq_printf_stats`).
pub fn parse_proc_net_dev(text: &str) -> Vec<IfaceCounter> {
    text.lines()
        .filter_map(|line| {
            let (name, rest) = line.split_once(':')?;
            let fields: Vec<u64> = rest
                .split_whitespace()
                .map(|f| f.parse().ok())
                .collect::<Option<_>>()?;
            if fields.len() < 16 {
                return None;
            }
            Some(IfaceCounter {
                name: name.trim().to_string(),
                rx_bytes: fields[0],
                tx_bytes: fields[8],
            })
        })
        .collect()
}

/// A fake whose counters tests set.
#[cfg(any(test, feature = "test-util"))]
#[derive(Debug, Default)]
pub struct FakeIfaces(Mutex<Vec<IfaceCounter>>);

#[cfg(any(test, feature = "test-util"))]
impl FakeIfaces {
    pub fn new(counters: Vec<IfaceCounter>) -> Self {
        Self(Mutex::new(counters))
    }

    pub fn set(&self, counters: Vec<IfaceCounter>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = counters;
    }
}

#[cfg(any(test, feature = "test-util"))]
impl IfaceCounters for FakeIfaces {
    fn read(&self) -> Result<Vec<IfaceCounter>, StatsError> {
        Ok(self.0.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// The stat list: `iface>>>NAME>>>traffic>>>downlink|uplink` (rx|tx bytes; loopback
/// left out), `service>>>mihomo>>>traffic>>>uplink|downlink`,
/// `tproxy>>>COUNTER>>>traffic>>>bytes|packets`.
pub fn build_stats(ifaces: &[IfaceCounter], sources: &StatsSources) -> Vec<Stat> {
    let mut out = Vec::new();
    let mut stat = |name: String, value: u64| out.push(Stat { name, value });
    for i in ifaces.iter().filter(|i| i.name != "lo") {
        stat(
            format!("iface>>>{}>>>traffic>>>downlink", i.name),
            i.rx_bytes,
        );
        stat(format!("iface>>>{}>>>traffic>>>uplink", i.name), i.tx_bytes);
    }
    if let Some(t) = sources.mihomo {
        stat("service>>>mihomo>>>traffic>>>uplink".into(), t.uplink);
        stat("service>>>mihomo>>>traffic>>>downlink".into(), t.downlink);
    }
    for c in &sources.tproxy_counters {
        stat(format!("tproxy>>>{}>>>traffic>>>bytes", c.name), c.bytes);
        stat(
            format!("tproxy>>>{}>>>traffic>>>packets", c.name),
            c.packets,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::{NftCounter, Traffic};

    const SAMPLE: &str = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:  104000    1300    0    0    0     0          0         0   104000    1300    0    0    0     0       0          0
  eth0: 9876543   12000    0    0    0     0          0        10  1234567    9000    0    0    0     0       0          0
";

    #[test]
    fn parses_proc_net_dev() {
        let got = parse_proc_net_dev(SAMPLE);
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[1],
            IfaceCounter {
                name: "eth0".into(),
                rx_bytes: 9876543,
                tx_bytes: 1234567
            }
        );
    }

    #[test]
    fn real_proc_net_dev_has_loopback() {
        let got = ProcNetDev::default().read().unwrap();
        assert!(got.iter().any(|i| i.name == "lo"), "{got:?}");
    }

    #[test]
    fn stat_names() {
        let stats = build_stats(
            &parse_proc_net_dev(SAMPLE),
            &StatsSources {
                mihomo: Some(Traffic {
                    uplink: 5,
                    downlink: 7,
                }),
                tproxy_counters: vec![NftCounter {
                    name: "tproxy_tcp".into(),
                    packets: 3,
                    bytes: 300,
                }],
            },
        );
        let names: Vec<(&str, u64)> = stats.iter().map(|s| (s.name.as_str(), s.value)).collect();
        assert_eq!(
            names,
            vec![
                ("iface>>>eth0>>>traffic>>>downlink", 9876543),
                ("iface>>>eth0>>>traffic>>>uplink", 1234567),
                ("service>>>mihomo>>>traffic>>>uplink", 5),
                ("service>>>mihomo>>>traffic>>>downlink", 7),
                ("tproxy>>>tproxy_tcp>>>traffic>>>bytes", 300),
                ("tproxy>>>tproxy_tcp>>>traffic>>>packets", 3),
            ]
        );
    }
}
