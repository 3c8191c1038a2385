//! A multi-gateway topology for integration tests: a "hub" network namespace holding a
//! bridge (the shared WAN) and a real etcd, and one namespace per gateway attached to
//! the bridge by a veth pair. Everything is created with unique names and removed on
//! drop, even when the test fails. Needs root.

use crate::etcd_args;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Run a command, panicking with its output when it fails (test setup only).
pub fn sh(argv: &[&str]) -> String {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("spawn {argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a command inside a namespace.
pub fn ns_sh(ns: &str, argv: &[&str]) -> String {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(argv);
    sh(&full)
}

pub fn ns_try(ns: &str, argv: &[&str]) -> std::process::Output {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(argv)
        .output()
        .expect("spawn ip netns exec")
}

/// Poll `f` every 100 ms until it returns `Some`, or panic after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The hub namespace, its bridge and the gateways' namespaces.
pub struct Mesh {
    pub tag: String,
    pub hub: String,
    pub gateways: Vec<String>,
    pub dir: tempfile::TempDir,
}

impl Mesh {
    /// Address of the hub on the bridge (where etcd listens).
    pub const HUB_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);

    /// Address of gateway `i` (0-based) on the bridge.
    pub fn gw_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 99, 0, 11 + i as u8)
    }

    pub fn new(n: usize) -> Self {
        // pid + a per-process counter: tests of one binary run in parallel threads.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let seq = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("{:x}x{seq}", std::process::id() % 0xffff);
        let hub = format!("mz{tag}hub");
        sh(&["ip", "netns", "add", &hub]);
        let mut mesh = Self {
            tag: tag.clone(),
            hub: hub.clone(),
            gateways: Vec::new(),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        ns_sh(&hub, &["ip", "link", "set", "lo", "up"]);
        ns_sh(&hub, &["ip", "link", "add", "br0", "type", "bridge"]);
        ns_sh(
            &hub,
            &[
                "ip",
                "addr",
                "add",
                &format!("{}/24", Self::HUB_IP),
                "dev",
                "br0",
            ],
        );
        ns_sh(&hub, &["ip", "link", "set", "br0", "up"]);
        for i in 0..n {
            let gw = format!("mz{tag}g{i}");
            sh(&["ip", "netns", "add", &gw]);
            mesh.gateways.push(gw.clone());
            let host_end = format!("h{i}");
            ns_sh(
                &hub,
                &[
                    "ip", "link", "add", &host_end, "type", "veth", "peer", "name", "wan0",
                    "netns", &gw,
                ],
            );
            ns_sh(&hub, &["ip", "link", "set", &host_end, "master", "br0"]);
            ns_sh(&hub, &["ip", "link", "set", &host_end, "up"]);
            ns_sh(&gw, &["ip", "link", "set", "lo", "up"]);
            ns_sh(
                &gw,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("{}/24", Self::gw_ip(i)),
                    "dev",
                    "wan0",
                ],
            );
            ns_sh(&gw, &["ip", "link", "set", "wan0", "up"]);
        }
        mesh
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for ns in self.gateways.iter().chain(std::iter::once(&self.hub)) {
            // Kill whatever still runs inside the namespace, then delete it.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A real etcd running inside a namespace, on `ip:port`.
pub struct NsEtcd {
    pub ns: String,
    pub endpoint: String,
    pub child: Option<Child>,
    data: PathBuf,
    ip: Ipv4Addr,
    port: u16,
}

impl NsEtcd {
    pub fn start(ns: &str, ip: Ipv4Addr, port: u16, data: &Path) -> Self {
        let mut e = Self {
            ns: ns.into(),
            endpoint: format!("http://{ip}:{port}"),
            child: None,
            data: data.to_path_buf(),
            ip,
            port,
        };
        e.spawn();
        e
    }

    fn spawn(&mut self) {
        let client = format!("http://{}:{}", self.ip, self.port);
        let peer = format!("http://127.0.0.1:{}", self.port + 1);
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "etcd"])
            .args(etcd_args::etcd_args("hub", &self.data, &client, &peer))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd must be installed (scripts/install-deps)");
        self.child = Some(child);
        let ns = self.ns.clone();
        let ep = self.endpoint.clone();
        wait_for("etcd to answer", Duration::from_secs(20), || {
            let out = ns_try(&ns, &["etcdctl", "--endpoints", &ep, "endpoint", "health"]);
            out.status.success().then_some(())
        });
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // `ip netns exec` forks etcd as its child: make sure the server itself is gone.
        let _ = Command::new("pkill")
            .args([
                "-9",
                "-f",
                "--",
                &format!("--data-dir {}", self.data.display()),
            ])
            .status();
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// `etcdctl` inside the namespace.
    pub fn ctl(&self, args: &[&str]) -> String {
        let mut argv = vec!["etcdctl", "--endpoints", &self.endpoint];
        argv.extend_from_slice(args);
        ns_sh(&self.ns, &argv)
    }

    /// Put a value (passed on stdin, so multi-line values and leading dashes are safe).
    pub fn put(&self, key: &str, value: &str) {
        etcd_args::etcdctl_put_in_netns(&self.ns, &self.endpoint, key, value);
    }

    pub fn get(&self, key: &str) -> Option<String> {
        let out = self.ctl(&["get", key, "--print-value-only"]);
        let v = out.trim_end_matches('\n');
        (!out.is_empty()).then(|| v.to_string())
    }

    /// Load a flat snapshot `{"/key": "value"}` with one `etcdctl txn`-free put per key.
    pub fn load(&self, snapshot: &std::collections::BTreeMap<String, String>) {
        for (k, v) in snapshot {
            self.put(k, v);
        }
    }
}

impl Drop for NsEtcd {
    fn drop(&mut self) {
        self.kill();
    }
}
