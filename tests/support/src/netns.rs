//! Network namespaces for integration tests: uniquely named (tag + pid), deleted on
//! drop, with helpers to run closures inside them on a dedicated thread, and a
//! ready-made LAN / gateway / internet topology (veth pairs only: this kernel has no
//! dummy links). Never touches the host's own network namespace configuration.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Run a command, panicking with its output when it fails.
pub fn run(argv: &[&str]) -> String {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a command, returning whether it succeeded.
pub fn try_run(argv: &[&str]) -> bool {
    Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// A network namespace that is deleted when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Create `mdz<tag><pid>n<counter>` (short, because some tools print names in
    /// fixed-width columns) with `lo` up.
    pub fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("mdz{tag}{}n{n}", std::process::id());
        run(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut argv = vec!["ip", "-n", &self.name];
        argv.extend_from_slice(args);
        run(&argv)
    }

    /// `ip netns exec NAME ARGV...`, panicking on failure.
    pub fn exec(&self, argv: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(argv);
        run(&full)
    }

    /// `ip netns exec NAME ARGV...`, returning success.
    pub fn try_exec(&self, argv: &[&str]) -> bool {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(argv);
        try_run(&full)
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")]);
    }

    /// Move the calling thread into this namespace.
    pub fn enter(&self) {
        let f = File::open(format!("/var/run/netns/{}", self.name))
            .unwrap_or_else(|e| panic!("open netns {}: {e}", self.name));
        // SAFETY: setns(2) on a valid, open namespace fd affects only the calling
        // thread's network namespace; no memory is shared with the kernel.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "setns {}: {}",
            self.name,
            std::io::Error::last_os_error()
        );
    }

    /// Run `f` on a new thread inside this namespace and wait for it. Sockets it
    /// creates stay in this namespace wherever they are used later.
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        match self.spawn_in(f).join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    }

    /// Start `f` on a new thread inside this namespace.
    pub fn spawn_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: as in `enter`: a valid namespace fd, thread-local effect.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Best effort: a failure here must not hide the test's own result.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Connect `a_ns:a_if` and `b_ns:b_if` with a veth pair created directly inside the
/// namespaces (never in the host namespace), both ends up.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]);
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
}

/// Add an address; IPv6 ones without duplicate address detection so they are
/// usable at once.
pub fn addr(ns: &Netns, dev: &str, cidr: &str) {
    if cidr.contains(':') {
        ns.ip(&["-6", "addr", "add", cidr, "dev", dev, "nodad"]);
    } else {
        ns.ip(&["addr", "add", cidr, "dev", dev]);
    }
}

/// LAN client ── gateway ── internet.
///
/// ```text
///  lan ns                     gw ns                          inet ns
///  eth0 192.168.50.2/24  ──  lan0  192.168.50.1/24     wan0 203.0.113.1/24 ── eth0 203.0.113.2/24
///       fd00:50::2/64              fd00:50::1/64            2001:db8:1::1/64       2001:db8:1::2/64
///       192.168.60.2/24            192.168.60.1/24   (a second, non-LAN source subnet)
///       fd00:60::2/64              fd00:60::1/64
///  eth1 192.168.70.2/24  ──  mesh0 192.168.70.1/24   (a second link, e.g. a mesh/VPN device)
///       fd00:70::2/64              fd00:70::1/64
/// ```
/// The gateway forwards (no NAT); the internet host routes back via the gateway;
/// traffic from 192.168.70.2 / fd00:70::2 leaves the client over eth1.
pub struct Topology {
    pub lan: Netns,
    pub gw: Netns,
    pub inet: Netns,
}

impl Topology {
    pub const LAN4: &'static str = "192.168.50.0/24";
    pub const LAN6: &'static str = "fd00:50::/64";
    pub const MESH4: &'static str = "192.168.70.0/24";
    pub const MESH6: &'static str = "fd00:70::/64";
    pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
    pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 2);
    pub const OTHER4: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 2);
    pub const OTHER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x60, 0, 0, 0, 0, 0, 2);
    pub const MESH_CLIENT4: Ipv4Addr = Ipv4Addr::new(192, 168, 70, 2);
    pub const MESH_CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x70, 0, 0, 0, 0, 0, 2);
    pub const GW_LAN4: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
    pub const GW_WAN4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
    pub const GW_WAN6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
    pub const SERVER4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
    pub const SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
    pub const GW_LAN_IF: &'static str = "lan0";
    pub const GW_MESH_IF: &'static str = "mesh0";

    pub fn server(v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(Self::SERVER6)
        } else {
            IpAddr::V4(Self::SERVER4)
        }
    }

    pub fn new(tag: &str) -> Self {
        let lan = Netns::new(&format!("{tag}l"));
        let gw = Netns::new(&format!("{tag}g"));
        let inet = Netns::new(&format!("{tag}i"));
        veth(&lan, "eth0", &gw, Self::GW_LAN_IF);
        veth(&lan, "eth1", &gw, Self::GW_MESH_IF);
        veth(&gw, "wan0", &inet, "eth0");
        for c in [
            "192.168.50.2/24",
            "fd00:50::2/64",
            "192.168.60.2/24",
            "fd00:60::2/64",
        ] {
            addr(&lan, "eth0", c);
        }
        for c in ["192.168.70.2/24", "fd00:70::2/64"] {
            addr(&lan, "eth1", c);
        }
        for c in [
            "192.168.50.1/24",
            "fd00:50::1/64",
            "192.168.60.1/24",
            "fd00:60::1/64",
        ] {
            addr(&gw, Self::GW_LAN_IF, c);
        }
        for c in ["192.168.70.1/24", "fd00:70::1/64"] {
            addr(&gw, Self::GW_MESH_IF, c);
        }
        for c in ["203.0.113.1/24", "2001:db8:1::1/64"] {
            addr(&gw, "wan0", c);
        }
        for c in ["203.0.113.2/24", "2001:db8:1::2/64"] {
            addr(&inet, "eth0", c);
        }
        lan.ip(&["route", "add", "default", "via", "192.168.50.1"]);
        lan.ip(&["-6", "route", "add", "default", "via", "fd00:50::1"]);
        // Sources of the mesh subnet leave over eth1.
        lan.ip(&["rule", "add", "from", "192.168.70.2", "lookup", "170"]);
        lan.ip(&[
            "route",
            "add",
            "default",
            "via",
            "192.168.70.1",
            "dev",
            "eth1",
            "table",
            "170",
        ]);
        lan.ip(&["-6", "rule", "add", "from", "fd00:70::2", "lookup", "170"]);
        lan.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            "fd00:70::1",
            "dev",
            "eth1",
            "table",
            "170",
        ]);
        inet.ip(&["route", "add", "default", "via", "203.0.113.1"]);
        inet.ip(&["-6", "route", "add", "default", "via", "2001:db8:1::1"]);
        gw.sysctl("net.ipv4.ip_forward", "1");
        gw.sysctl("net.ipv6.conf.all.forwarding", "1");
        Topology { lan, gw, inet }
    }
}
