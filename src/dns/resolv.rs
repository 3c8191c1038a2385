//! The gateway's own resolver file (setting `resolv_conf`; `/etc/resolv.conf` in the
//! image): the gateway's own lookups go to its DNS frontend, as the predecessor's
//! dnsmasq setup had it.
//!
//! Owns: the file's content and its drift repair: written atomically
//! ([`crate::files::write_if_changed`]) at start and again within
//! [`REPAIR_INTERVAL`] whenever something else (busybox `udhcpc`'s lease script, an
//! operator) rewrites it. Must not: read the file's previous servers (the frontend's
//! upstreams come from etcd, never from here).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{info, warn};

/// How often the file is checked (and rewritten when it differs).
pub const REPAIR_INTERVAL: Duration = Duration::from_secs(5);

/// World-readable, like every resolver file.
const MODE: u32 = 0o644;

/// The file's content for the frontend listening on `listen`: `nameserver 127.0.0.1`,
/// which needs a listener on port 53 of `127.0.0.1` or `0.0.0.0` (resolv.conf has no
/// port). The error says what is missing.
pub fn render(listen: &[SocketAddr]) -> Result<String, String> {
    let loopback = listen.iter().any(|a| {
        a.port() == 53
            && matches!(a.ip(), IpAddr::V4(ip) if ip == Ipv4Addr::LOCALHOST || ip.is_unspecified())
    });
    if !loopback {
        return Err(format!(
            "resolv_conf points the gateway at 127.0.0.1:53, where the DNS frontend does not \
             listen (dns_listen {})",
            listen
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    Ok(format!(
        "# Written by meduza (setting resolv_conf): the gateway's own lookups go to its\n\
         # DNS frontend. Changes are undone within {} s (docs/dns.md).\n\
         nameserver 127.0.0.1\n",
        REPAIR_INTERVAL.as_secs()
    ))
}

/// Write `content` to `path` when it differs; log a write and a failure once each
/// time the outcome changes. Returns whether it wrote.
fn ensure(path: &Path, content: &str, last_err: &mut Option<String>) -> bool {
    match crate::files::write_if_changed(path, content.as_bytes(), MODE) {
        Ok(wrote) => {
            if wrote {
                info!(path = %path.display(), "resolver file written (pointing at the DNS frontend)");
            }
            *last_err = None;
            wrote
        }
        Err(err) => {
            let err = err.to_string();
            if last_err.as_deref() != Some(err.as_str()) {
                warn!(path = %path.display(), %err, "cannot write the resolver file");
            }
            *last_err = Some(err);
            false
        }
    }
}

/// Keep `path` at `content` for ever, checking every `interval`.
pub async fn keep(path: PathBuf, content: String, interval: Duration) {
    let mut last_err = None;
    loop {
        ensure(&path, &content, &mut last_err);
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socks(v: &[&str]) -> Vec<SocketAddr> {
        v.iter().map(|s| s.parse().expect("literal")).collect()
    }

    #[test]
    fn points_at_loopback_only_when_the_frontend_listens_there() {
        for ok in [&["127.0.0.1:53"][..], &["0.0.0.0:53", "[::]:53"]] {
            let text = render(&socks(ok)).expect("renders");
            assert!(text.ends_with("nameserver 127.0.0.1\n"), "{text}");
            assert_eq!(text.matches("nameserver").count(), 1);
        }
        for bad in [&["127.0.0.1:5353"][..], &["192.168.1.1:53", "[::]:53"]] {
            let err = render(&socks(bad)).expect_err("no loopback :53");
            assert!(err.contains("dns_listen"), "{err}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_overwritten_file_is_restored_within_the_interval() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("resolv.conf");
        let content = render(&socks(&["127.0.0.1:53"])).expect("renders");
        let task = tokio::spawn(keep(path.clone(), content.clone(), REPAIR_INTERVAL));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(std::fs::read_to_string(&path).expect("written"), content);
        // A DHCP client's lease script replaces it, through a symlink as Buildroot's
        // skeleton has it.
        let elsewhere = dir.path().join("tmp-resolv.conf");
        std::fs::write(&elsewhere, "nameserver 192.0.2.53\n").expect("write");
        std::fs::remove_file(&path).expect("rm");
        std::os::unix::fs::symlink(&elsewhere, &path).expect("symlink");
        tokio::time::sleep(REPAIR_INTERVAL + Duration::from_millis(10)).await;
        assert_eq!(std::fs::read_to_string(&path).expect("repaired"), content);
        assert!(!std::fs::symlink_metadata(&path)
            .expect("stat")
            .file_type()
            .is_symlink());
        task.abort();
    }
}
