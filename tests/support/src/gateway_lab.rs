//! The gateway lab of the end-to-end Clash tests: the real `meduza run` in a gateway
//! network namespace with the real mihomo v1.19.2 (or, for the one fault it cannot be
//! made to show, the mihomo double) and the MosDNS double as its children, etcd in a
//! namespace of its own, and an "internet" namespace with
//! * the proxy node: a second real mihomo with a shadowsocks `listeners:` inbound
//!   (TCP and UDP) on 203.0.113.2:8388, which the subscription names `node-a`;
//! * HTTP content the test can change while it runs (recording who asked);
//! * a TCP echo and a UDP echo of the peer address, so a LAN connection tells where it
//!   came from: `server 192.168.50.2` direct, `server 203.0.113.2` through the node
//!   (the node dials from the server's own address), `server 203.0.113.1` from the
//!   gateway itself (mihomo's DIRECT: a leak past the proxy).
//!
//! ```text
//!  etcd ns 10.97.0.2 ── etc0 10.97.0.1  gw ns (meduza run, mihomo, MosDNS double)
//!  lan ns 192.168.50.2 / fd00:50::2 ── lan0 │ wan0 203.0.113.1 / 2001:db8:1::1
//!                                           └── inet ns 203.0.113.2 / 2001:db8:1::2
//!                                               :8388 the node (real mihomo, ss)
//!                                               :8080 HTTP (Lab::serve)
//!                                               :9000 TCP, :9001 UDP "server <peer>"
//! ```
//!
//! Everything is torn down in `Drop`, even when an assertion fails.

use crate::etcd_args;
use crate::netns::{addr, veth, Netns, Topology};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const NODE: &str = "gw1";
pub const ETCD_GW: &str = "10.97.0.1";
pub const ETCD_IP: &str = "10.97.0.2";
pub const ETCD_PORT: u16 = 23791;
/// Source address of the mihomo double's outgoing connections.
pub const PROXY_OUT: &str = "203.0.113.3";
pub const HTTP_PORT: u16 = 8080;
pub const ECHO_PORT: u16 = 9000;
pub const UDP_ECHO_PORT: u16 = 9001;
/// The proxy node's shadowsocks inbound (the real mihomo in the internet namespace).
pub const NODE_PORT: u16 = 8388;
pub const NODE_PASSWORD: &str = "meduza-lab-node";
/// A name the node resolves (its `hosts:`) to the internet server: what a proxied
/// connection by name (mihomo's fake-ip mode) reaches.
pub const FAR_NAME: &str = "far.lab.test";
/// What the node serves: TCP and UDP, as a subscription names it.
pub fn node_proxy(name: &str, port: u16) -> String {
    format!(
        "{{name: {name}, type: ss, server: 203.0.113.2, port: {port}, cipher: aes-128-gcm, password: {NODE_PASSWORD}, udp: true}}"
    )
}
/// The URL mihomo's groups and meduza's delay tests fetch through the node.
pub fn health_url() -> String {
    format!("http://203.0.113.2:{HTTP_PORT}/generate_204")
}

/// Which mihomo meduza runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mihomo {
    /// The real mihomo v1.19.2 that `scripts/install-deps` caches.
    Real,
    /// `tests/support/doubles/fake_mihomo.py`, for a fault the real one cannot be made to show.
    Double,
}

/// Where the real mihomo is, and its home: one copy, shared with the loopback tests.
use crate::real_mihomo;
pub use real_mihomo::{mihomo_home, real_mihomo};

/// One request seen by the internet namespace's HTTP server.
#[derive(Debug, Clone)]
pub struct Seen {
    pub peer: IpAddr,
    pub path: String,
    pub via: Option<String>,
}

/// One lab at a time per test process: the namespaces and etcd's port are fixed.
static ONE_LAB: Mutex<()> = Mutex::new(());

/// Everything the test started; torn down in `Drop` even when an assertion fails.
pub struct Lab {
    pub topo: Topology,
    pub etcd_ns: Netns,
    pub dir: tempfile::TempDir,
    pub etcd: Option<Child>,
    pub meduza: Option<Child>,
    /// The proxy node (real mihomo) in the internet namespace.
    pub node: Option<Child>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// What the HTTP server answers: path → body (anything else is a 404).
    pub routes: Routes,
    /// Which mihomo `start_meduza` gave meduza.
    pub mihomo: Mihomo,
    /// Held until the namespaces are gone (declared last: dropped last).
    _one_lab: std::sync::MutexGuard<'static, ()>,
}

/// The HTTP server's content, changeable while it runs.
pub type Routes = Arc<Mutex<BTreeMap<String, String>>>;

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(log) = std::fs::read_to_string(self.path("meduza.log")) {
                let lines: Vec<&str> = log.lines().collect();
                let from = lines.len().saturating_sub(150);
                eprintln!("---- meduza.log (last lines) ----");
                for l in &lines[from..] {
                    eprintln!("{l}");
                }
            }
        }
        if let Some(mut m) = self.meduza.take() {
            stop(&mut m, Duration::from_secs(8));
        }
        for child in [self.etcd.take(), self.node.take()].into_iter().flatten() {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        // Whatever still runs inside our namespaces was started by this test.
        for ns in [
            &self.topo.gw,
            &self.topo.lan,
            &self.topo.inet,
            &self.etcd_ns,
        ] {
            if let Ok(out) = Command::new("ip")
                .args(["netns", "pids", ns.name()])
                .output()
            {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        // SAFETY: kill(2) on a pid listed inside our own namespace.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
        }
        // The namespaces themselves are deleted by their own Drop.
    }
}

/// `dig +short +time=1 +tries=1 ARGS` in `ns`: its trimmed stdout whatever the exit
/// status (dig exits 9 when nothing answers).
pub fn dig(ns: &Netns, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name(), "dig", "+short"])
        .args(["+time=1", "+tries=1"])
        .args(args)
        .output()
        .expect("run dig");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Print a measured duration the way the benchmark pages collect them
/// (`FIGURE <name>_ms=<ms>`).
pub fn figure(name: &str, d: Duration) {
    println!("FIGURE {name}_ms={:.1}", d.as_secs_f64() * 1000.0);
}

/// SIGTERM, then SIGKILL after `grace`.
pub fn stop(child: &mut Child, grace: Duration) -> Option<std::process::ExitStatus> {
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    while start.elapsed() < grace {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Spawn `cmd` from a thread inside `ns`: the child inherits that namespace.
pub fn spawn_in(ns: &Netns, mut cmd: Command) -> Child {
    ns.run_in(move || cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")))
}

/// A minimal HTTP/1.1 server answering from `routes`, logging each request.
fn http_server(listener: TcpListener, seen: Arc<Mutex<Vec<Seen>>>, routes: Routes) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let seen = Arc::clone(&seen);
        let routes = Arc::clone(&routes);
        std::thread::spawn(move || {
            let peer = conn.peer_addr().map(|a| a.ip()).ok();
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut reader = BufReader::new(conn.try_clone().expect("clone"));
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut via = None;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                if let Some((k, v)) = h.split_once(':') {
                    if k.eq_ignore_ascii_case("via") {
                        via = Some(v.trim().to_string());
                    }
                }
            }
            if let Some(peer) = peer {
                seen.lock().unwrap().push(Seen {
                    peer,
                    path: path.clone(),
                    via,
                });
            }
            let body = routes.lock().unwrap().get(&path).cloned();
            let (status, body) = match body {
                Some(body) => ("200 OK", body),
                None => ("404 Not Found", "not found\n".to_string()),
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        });
    }
}

/// Answers every datagram with `server <peer-ip>\n`.
fn udp_echo_server(sock: UdpSocket) {
    let mut buf = [0u8; 512];
    while let Ok((_, peer)) = sock.recv_from(&mut buf) {
        let _ = sock.send_to(format!("server {}\n", peer.ip()).as_bytes(), peer);
    }
}

/// Answers every connection with `server <peer-ip>\n`.
fn echo_server(listener: TcpListener) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let peer = conn
            .peer_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        let _ = writeln!(conn, "server {peer}");
    }
}

impl Lab {
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Build the namespaces, start etcd and the servers (no `Default`: this takes the
    /// one-lab lock and creates namespaces).
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        // A test that failed while holding it poisons it; the next lab may still run.
        let one_lab = ONE_LAB.lock().unwrap_or_else(|p| p.into_inner());
        let topo = Topology::new("cg");
        let etcd_ns = Netns::new("cge");
        veth(&topo.gw, "etc0", &etcd_ns, "eth0");
        addr(&topo.gw, "etc0", &format!("{ETCD_GW}/30"));
        addr(&etcd_ns, "eth0", &format!("{ETCD_IP}/30"));
        addr(&topo.gw, "wan0", &format!("{PROXY_OUT}/24"));
        // One source address per family on the LAN client, inside the node's `lan`.
        topo.lan
            .ip(&["addr", "del", "192.168.60.2/24", "dev", "eth0"]);
        topo.lan
            .ip(&["-6", "addr", "del", "fd00:60::2/64", "dev", "eth0"]);
        let dir = tempfile::tempdir().expect("tempdir");
        let mut lab = Lab {
            topo,
            etcd_ns,
            dir,
            etcd: None,
            meduza: None,
            node: None,
            seen: Arc::new(Mutex::new(Vec::new())),
            routes: Arc::new(Mutex::new(BTreeMap::new())),
            mihomo: Mihomo::Real,
            _one_lab: one_lab,
        };

        // The internet: HTTP and echo servers on IPv4 and IPv6.
        for ip in [Topology::server(false), Topology::server(true)] {
            let seen = Arc::clone(&lab.seen);
            let routes = Arc::clone(&lab.routes);
            let http = lab.topo.inet.run_in(move || {
                TcpListener::bind(SocketAddr::new(ip, HTTP_PORT)).expect("bind http")
            });
            std::thread::spawn(move || http_server(http, seen, routes));
            let echo = lab.topo.inet.run_in(move || {
                TcpListener::bind(SocketAddr::new(ip, ECHO_PORT)).expect("bind echo")
            });
            std::thread::spawn(move || echo_server(echo));
            let udp = lab.topo.inet.run_in(move || {
                UdpSocket::bind(SocketAddr::new(ip, UDP_ECHO_PORT)).expect("bind udp echo")
            });
            std::thread::spawn(move || udp_echo_server(udp));
        }
        lab.serve("/generate_204", "");
        lab.start_node();

        // etcd in its own namespace.
        let client = format!("http://{ETCD_IP}:{ETCD_PORT}");
        let peer = format!("http://127.0.0.1:{}", ETCD_PORT + 1);
        let mut cmd = Command::new("etcd");
        cmd.args(etcd_args::etcd_args(
            "cg",
            &lab.path("etcd"),
            &client,
            &peer,
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        lab.etcd = Some(spawn_in(&lab.etcd_ns, cmd));
        wait_for("etcd to answer", Duration::from_secs(20), || {
            lab.etcd_ns
                .try_exec(&["etcdctl", "--endpoints", &client, "endpoint", "health"])
                .then_some(())
        });
        lab
    }

    pub fn endpoint() -> String {
        format!("http://{ETCD_IP}:{ETCD_PORT}")
    }

    pub fn put(&self, key: &str, value: &str) {
        etcd_args::etcdctl_put_in_netns(self.etcd_ns.name(), &Self::endpoint(), key, value);
    }

    /// Writes the lab node's keys, `/nodes/<NODE>/<key>` = value, in order.
    pub fn put_node(&self, keys: &[(&str, &str)]) {
        for (key, value) in keys {
            self.put(&format!("/nodes/{NODE}/{key}"), value);
        }
    }

    /// Point mihomo's and meduza's delay tests at the lab's `/generate_204` (through the
    /// node): the default URL is on the internet, which the lab has none of.
    pub fn put_health_keys(&self, probe_interval_s: u64, timeout_ms: u64) {
        self.put("/global/clash/health/url", &health_url());
        self.put(
            "/global/clash/health/probe_interval",
            &probe_interval_s.to_string(),
        );
        self.put("/global/clash/health/timeout", &timeout_ms.to_string());
    }

    /// `GET path` of meduza's node API (127.0.0.1:9100 in the gateway namespace) with
    /// `token`; the body.
    pub fn api_get(&self, path: &str, token: &str) -> String {
        self.topo.gw.exec(&[
            "curl",
            "-sS",
            "--fail",
            "--max-time",
            "3",
            "-H",
            &format!("Authorization: Bearer {token}"),
            &format!("http://127.0.0.1:9100{path}"),
        ])
    }

    pub fn del(&self, key: &str) {
        self.etcd_ns
            .exec(&["etcdctl", "--endpoints", &Self::endpoint(), "del", key]);
    }

    /// `/updated/<node>/<suffix>`, if set.
    pub fn status(&self, suffix: &str) -> Option<String> {
        let key = format!("/updated/{NODE}/{suffix}");
        let out = self.etcd_ns.exec(&[
            "etcdctl",
            "--endpoints",
            &Self::endpoint(),
            "get",
            &key,
            "--print-value-only",
        ]);
        (!out.is_empty()).then(|| out.trim_end_matches('\n').to_string())
    }

    pub fn wait_status(
        &self,
        suffix: &str,
        timeout: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> String {
        wait_for(
            &format!("/updated/{NODE}/{suffix} to match"),
            timeout,
            || self.status(suffix).filter(|v| ok(v)),
        )
    }

    /// Write the double's control file atomically.
    pub fn control(&self, json: &str) {
        let tmp = self.path("control.json.tmp");
        std::fs::write(&tmp, json).expect("write control");
        std::fs::rename(&tmp, self.path("control.json")).expect("rename control");
    }

    /// What the HTTP server answers on `path` from now on.
    pub fn serve(&self, path: &str, body: &str) {
        self.routes
            .lock()
            .unwrap()
            .insert(path.to_string(), body.to_string());
    }

    /// meduza's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("meduza.log")).unwrap_or_default()
    }

    /// Start the proxy node: the real mihomo with a shadowsocks inbound, TCP and UDP.
    pub fn start_node(&mut self) {
        assert!(self.node.is_none(), "the node already runs");
        let home = self.path("node");
        mihomo_home(&home);
        std::fs::write(
            home.join("config.yaml"),
            format!(
                "log-level: warning\nmode: direct\nhosts:\n  {FAR_NAME}: {}\nlisteners:\n  - {{name: ss-in, type: shadowsocks, listen: 203.0.113.2, port: {NODE_PORT}, cipher: aes-128-gcm, password: {NODE_PASSWORD}, udp: true}}\n",
                Topology::SERVER4
            ),
        )
        .expect("node config");
        let mut cmd = Command::new(real_mihomo());
        cmd.arg("-d")
            .arg(&home)
            .arg("-f")
            .arg(home.join("config.yaml"))
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.node = Some(spawn_in(&self.topo.inet, cmd));
        let node = SocketAddr::new(Topology::server(false), NODE_PORT);
        wait_for("the node's inbound", Duration::from_secs(10), || {
            self.topo
                .inet
                .run_in(move || TcpStream::connect_timeout(&node, Duration::from_millis(200)).ok())
                .map(|_| ())
        });
    }

    /// Kill the proxy node (SIGKILL): its port refuses from now on.
    pub fn kill_node(&mut self) {
        let mut node = self.node.take().expect("the node runs");
        let _ = node.kill();
        let _ = node.wait();
    }

    /// Start `meduza run` in the gateway namespace with `mihomo` as its mihomo, and
    /// `extra_env` on top of the test environment.
    pub fn start_meduza(&mut self, mihomo: Mihomo, extra_env: &[(&str, &str)]) {
        self.mihomo = mihomo;
        let doubles = crate::doubles::doubles_dir();
        let bin = match mihomo {
            Mihomo::Real => {
                mihomo_home(&self.path("root/etc/mihomo"));
                real_mihomo()
            }
            Mihomo::Double => self.double_wrapper(&doubles),
        };
        let log = std::fs::File::create(self.path("meduza.log")).expect("log");
        let mut cmd = Command::new(crate::meduza_bin());
        cmd.arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "meduza=debug")
            .env("NO_COLOR", "1")
            .env("NODE_ID", NODE)
            .env("ETCD_ENDPOINTS", Self::endpoint())
            .env("MEDUZA_ROOT", self.path("root"))
            .env("MEDUZA_STATE_DIR", self.path("state"))
            .env("MEDUZA_DNS_LISTEN", "127.0.0.1:53")
            .env("MEDUZA_API_LISTEN", "127.0.0.1:9100")
            .env("MEDUZA_DATAPLANE", "nft")
            .env("MEDUZA_LEASE_TTL", "5")
            .env("MEDUZA_BIN_MIHOMO", &bin)
            .env("MEDUZA_BIN_MOSDNS", doubles.join("fake_mosdns.py"))
            .envs(extra_env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        self.meduza = Some(spawn_in(&self.topo.gw, cmd));
    }

    /// The double's knobs go through a wrapper that execs it (same pid): the
    /// supervisor gives children a clean environment.
    fn double_wrapper(&self, doubles: &Path) -> PathBuf {
        let bin = self.path("bin");
        std::fs::create_dir_all(&bin).expect("bin dir");
        let wrapper = bin.join("mihomo");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexport FAKE_MIHOMO_CONTROL='{}'\nexport FAKE_MIHOMO_OUTBOUND_BIND={PROXY_OUT}\nexec /usr/bin/python3 '{}' \"$@\"\n",
                self.path("control.json").display(),
                doubles.join("fake_mihomo.py").display()
            ),
        )
        .expect("wrapper");
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        wrapper
    }

    /// Pid of meduza's mihomo (the real one or the double): the process whose command
    /// line names the home meduza gives it under our temp dir.
    pub fn mihomo_pid(&self) -> Option<i32> {
        self.pid_of(match self.mihomo {
            Mihomo::Real => "root/etc/mihomo",
            Mihomo::Double => "fake_mihomo.py",
        })
    }

    /// Pid of the double whose command line names `script` and our temp dir.
    pub fn pid_of(&self, script: &str) -> Option<i32> {
        let marker = self.dir.path().display().to_string();
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmdline.contains(script) && cmdline.contains(&marker) {
                return Some(pid);
            }
        }
        None
    }

    /// `nft list table inet meduza` succeeds in the gateway namespace.
    pub fn table_present(&self) -> bool {
        self.topo
            .gw
            .try_exec(&["nft", "list", "table", "inet", "meduza"])
    }

    /// Time from `start` until the table's presence equals `want`, polling `nft` every
    /// 10 ms from a thread inside the gateway namespace.
    pub fn time_until_table(&self, start: Instant, want: bool, timeout: Duration) -> Duration {
        self.time_until_listing(start, timeout, move |l| l.is_some() == want)
    }

    /// Time from `start` until TPROXY intercepts (`want`) or not: the table holds a
    /// `tproxy` rule, or not (absent, or only the fake-IP rejects of fake-ip mode).
    pub fn time_until_intercepting(
        &self,
        start: Instant,
        want: bool,
        timeout: Duration,
    ) -> Duration {
        self.time_until_listing(start, timeout, move |l| {
            l.is_some_and(|t| t.contains(" tproxy ")) == want
        })
    }

    /// Time from `start` until `ok` holds for `nft list table inet meduza` (`None`:
    /// no table), polling every 10 ms from a thread inside the gateway namespace.
    fn time_until_listing(
        &self,
        start: Instant,
        timeout: Duration,
        ok: impl Fn(Option<&str>) -> bool + Send + 'static,
    ) -> Duration {
        self.topo.gw.run_in(move || loop {
            let tick = Instant::now();
            let listing = Command::new("nft")
                .args(["list", "table", "inet", "meduza"])
                .stderr(Stdio::null())
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
            if ok(listing.as_deref()) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "table inet meduza still not as expected after {timeout:?}: {listing:?}"
            );
            if let Some(rest) = Duration::from_millis(10).checked_sub(tick.elapsed()) {
                std::thread::sleep(rest);
            }
        })
    }

    /// A TCP connection from the LAN client to the internet server's echo port; the
    /// first line it gets back.
    pub fn lan_connect(&self, v6: bool) -> String {
        self.lan_echo(SocketAddr::new(Topology::server(v6), ECHO_PORT))
    }

    /// A TCP connection from the LAN client to `dst` (an echo port, by whatever
    /// address); the first line it gets back.
    pub fn lan_echo(&self, dst: SocketAddr) -> String {
        self.topo.lan.run_in(move || {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3))
                .unwrap_or_else(|e| panic!("LAN connect {dst}: {e}"));
            s.set_read_timeout(Some(Duration::from_secs(3)))
                .expect("timeout");
            let mut buf = String::new();
            let _ = s.read_to_string(&mut buf);
            buf.lines().next().unwrap_or("").to_string()
        })
    }

    /// A TCP connection from the LAN client to `dst` that must be refused: its error
    /// and how long it took (a reset comes at once; a timeout takes 2 s).
    pub fn lan_tcp_refused(&self, dst: SocketAddr) -> (std::io::ErrorKind, Duration) {
        self.topo.lan.run_in(move || {
            let t = Instant::now();
            let err = TcpStream::connect_timeout(&dst, Duration::from_secs(2))
                .expect_err("a rejected connection");
            (err.kind(), t.elapsed())
        })
    }

    /// A UDP datagram from the LAN client to `dst` that must be refused: the error of
    /// the receive (an ICMP port unreachable) and how long it took to come.
    pub fn lan_udp_refused(&self, dst: SocketAddr) -> (std::io::ErrorKind, Duration) {
        self.topo.lan.run_in(move || {
            let any: SocketAddr = if dst.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
                .parse()
                .expect("literal");
            let sock = UdpSocket::bind(any).expect("bind");
            sock.connect(dst).expect("connect");
            sock.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            let t = Instant::now();
            sock.send(b"ping").expect("send");
            let mut buf = [0u8; 64];
            let err = sock
                .recv(&mut buf)
                .expect_err("an answer to a rejected datagram");
            (err.kind(), t.elapsed())
        })
    }

    /// LAN traffic reaches the server directly (IPv4 and IPv6).
    pub fn assert_direct(&self, when: &str) {
        assert_eq!(
            self.lan_connect(false),
            "server 192.168.50.2",
            "{when} (IPv4)"
        );
        assert_eq!(self.lan_connect(true), "server fd00:50::2", "{when} (IPv6)");
        if self.mihomo == Mihomo::Real {
            assert_eq!(self.lan_udp(false), "server 192.168.50.2", "{when} (UDP)");
            assert_eq!(
                self.lan_udp(true),
                "server fd00:50::2",
                "{when} (UDP, IPv6)"
            );
        }
    }

    /// A UDP datagram from the LAN client to the internet server's UDP echo; the
    /// first line of the answer.
    pub fn lan_udp(&self, v6: bool) -> String {
        let dst = SocketAddr::new(Topology::server(v6), UDP_ECHO_PORT);
        self.topo.lan.run_in(move || {
            let any: SocketAddr = if v6 { "[::]:0" } else { "0.0.0.0:0" }.parse().unwrap();
            let sock = UdpSocket::bind(any).expect("bind");
            sock.set_read_timeout(Some(Duration::from_secs(3)))
                .expect("timeout");
            sock.send_to(b"ping", dst).expect("send");
            let mut buf = [0u8; 512];
            let n = sock
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("LAN UDP exchange with {dst}: {e}"));
            String::from_utf8_lossy(&buf[..n])
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
    }

    /// LAN traffic lands on the proxy: through the node with the real mihomo (TCP and
    /// UDP), on the double's TPROXY listener with the double (TCP), IPv4 and IPv6.
    pub fn assert_proxied(&self, when: &str) {
        match self.mihomo {
            Mihomo::Real => {
                for (v6, via) in [
                    (false, "server 203.0.113.2"),
                    (true, "server 2001:db8:1::2"),
                ] {
                    assert_eq!(self.lan_connect(v6), via, "{when} (TCP, IPv6 {v6})");
                    assert_eq!(self.lan_udp(v6), via, "{when} (UDP, IPv6 {v6})");
                }
            }
            Mihomo::Double => {
                assert_eq!(
                    self.lan_connect(false),
                    format!("fake-mihomo tproxy 203.0.113.2:{ECHO_PORT}"),
                    "{when} (IPv4)"
                );
                assert_eq!(
                    self.lan_connect(true),
                    format!("fake-mihomo tproxy [2001:db8:1::2]:{ECHO_PORT}"),
                    "{when} (IPv6)"
                );
            }
        }
    }

    /// Every request for `path` the HTTP server saw, oldest first.
    pub fn requests(&self, path: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path == path)
            .cloned()
            .collect()
    }

    pub fn rule_requests(&self) -> Vec<Seen> {
        self.requests("/rules/proxy.txt")
    }

    /// `dig` against MosDNS's listener in the gateway namespace.
    pub fn mosdns_answer(&self, name: &str) -> String {
        self.topo
            .gw
            .exec(&[
                "dig",
                "+short",
                "+time=1",
                "+tries=2",
                "-p",
                "1153",
                "@127.0.0.1",
                name,
                "A",
            ])
            .trim()
            .to_string()
    }
}
