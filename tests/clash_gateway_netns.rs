//! End to end: the real `meduza run` in a gateway network namespace, with the mihomo
//! and MosDNS doubles as its children, etcd in a namespace of its own, an "internet"
//! namespace serving the subscription, the rule files and a TCP echo of the peer
//! address, and a LAN client namespace making real TCP connections (IPv4 and IPv6)
//! through the gateway (DESIGN §7, §9; docs/clash.md).
//!
//! ```text
//!  etcd ns 10.97.0.2 ── etc0 10.97.0.1  gw ns (meduza run, mihomo double, MosDNS double)
//!  lan ns 192.168.50.2 / fd00:50::2 ── lan0 │ wan0 203.0.113.1 (+ .3: mihomo's outbound)
//!                                           └── inet ns 203.0.113.2 / 2001:db8:1::2
//!                                               :8080 HTTP (subscription, rule files)
//!                                               :9000 "server <peer>" echo
//! ```
//!
//! What it proves, in order: TPROXY is not applied while mihomo is unhealthy (URLTest
//! group `REJECT` at start); it is applied once mihomo is healthy, after the rule files
//! came through mihomo (the download server sees the double's outbound address and
//! its `Via` header); mihomo killed, API stalled, every group `REJECT` each remove it
//! (LAN traffic reaches the server directly again) and recovery re-applies it; MosDNS
//! keeps its pid throughout; Clash disabled means direct downloads and no TPROXY.
//! The timings it measures (nft polled every 10 ms) are printed as `FIGURE` lines
//! (docs/benchmarks-clash.md). Needs root, etcd, nftables, iproute2, dig, python3-yaml.

#[path = "common/netns.rs"]
mod netns;

use netns::{addr, veth, Netns, Topology};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NODE: &str = "gw1";
const ETCD_GW: &str = "10.97.0.1";
const ETCD_IP: &str = "10.97.0.2";
const ETCD_PORT: u16 = 23791;
/// Source address of the mihomo double's outgoing connections.
const PROXY_OUT: &str = "203.0.113.3";
const HTTP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 9000;
const RULES: &str = "domain:listed.example\nfull:exact.example\n";
const SUBSCRIPTION: &str = "proxies:\n  - {name: hk1, type: ss, server: 203.0.113.2, port: 8388, cipher: aes-128-gcm, password: pw}\n  - {name: jp1, type: ss, server: 203.0.113.2, port: 8389, cipher: aes-128-gcm, password: pw}\n";
const PLUGINS: &str = "- tag: proxy_domains\n  type: domain_set\n  args:\n    files:\n      - rules/proxy.txt\n- tag: forward_clash\n  type: forward\n  args:\n    upstreams:\n      - addr: udp://127.0.0.1:1053\n- tag: main\n  type: sequence\n  args:\n    - matches:\n        - qname $proxy_domains\n      exec: $forward_clash\n";

/// One request seen by the internet namespace's HTTP server.
#[derive(Debug, Clone)]
struct Seen {
    peer: IpAddr,
    path: String,
    via: Option<String>,
}

/// Everything the test started; torn down in `Drop` even when an assertion fails.
struct Lab {
    topo: Topology,
    etcd_ns: Netns,
    dir: tempfile::TempDir,
    etcd: Option<Child>,
    meduza: Option<Child>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

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
        if let Some(mut e) = self.etcd.take() {
            let _ = e.kill();
            let _ = e.wait();
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

/// SIGTERM, then SIGKILL after `grace`.
fn stop(child: &mut Child, grace: Duration) -> Option<std::process::ExitStatus> {
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

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
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
fn spawn_in(ns: &Netns, mut cmd: Command) -> Child {
    ns.run_in(move || cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}")))
}

/// A minimal HTTP/1.1 server: `/sub.yaml` and `/rules/proxy.txt`, logging each request.
fn http_server(listener: TcpListener, seen: Arc<Mutex<Vec<Seen>>>) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let seen = Arc::clone(&seen);
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
            let (status, body) = match path.as_str() {
                "/sub.yaml" => ("200 OK", SUBSCRIPTION),
                "/rules/proxy.txt" => ("200 OK", RULES),
                _ => ("404 Not Found", "not found\n"),
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        });
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
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn new() -> Self {
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
            seen: Arc::new(Mutex::new(Vec::new())),
        };

        // The internet: HTTP and echo servers on IPv4 and IPv6.
        for ip in [Topology::server(false), Topology::server(true)] {
            let seen = Arc::clone(&lab.seen);
            let http = lab.topo.inet.run_in(move || {
                TcpListener::bind(SocketAddr::new(ip, HTTP_PORT)).expect("bind http")
            });
            std::thread::spawn(move || http_server(http, seen));
            let echo = lab.topo.inet.run_in(move || {
                TcpListener::bind(SocketAddr::new(ip, ECHO_PORT)).expect("bind echo")
            });
            std::thread::spawn(move || echo_server(echo));
        }

        // etcd in its own namespace.
        let client = format!("http://{ETCD_IP}:{ETCD_PORT}");
        let peer = format!("http://127.0.0.1:{}", ETCD_PORT + 1);
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "cg", "--data-dir"])
            .arg(lab.path("etcd"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("cg={peer}")])
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

    fn endpoint() -> String {
        format!("http://{ETCD_IP}:{ETCD_PORT}")
    }

    fn put(&self, key: &str, value: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", self.etcd_ns.name(), "etcdctl"])
            .args(["--endpoints", &Self::endpoint(), "put", key])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("etcdctl must be installed");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(value.as_bytes())
            .expect("write value");
        assert!(child.wait().expect("etcdctl").success(), "put {key} failed");
    }

    /// `/updated/<node>/<suffix>`, if set.
    fn status(&self, suffix: &str) -> Option<String> {
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

    fn wait_status(&self, suffix: &str, timeout: Duration, ok: impl Fn(&str) -> bool) -> String {
        wait_for(
            &format!("/updated/{NODE}/{suffix} to match"),
            timeout,
            || self.status(suffix).filter(|v| ok(v)),
        )
    }

    /// Write the double's control file atomically.
    fn control(&self, json: &str) {
        let tmp = self.path("control.json.tmp");
        std::fs::write(&tmp, json).expect("write control");
        std::fs::rename(&tmp, self.path("control.json")).expect("rename control");
    }

    fn start_meduza(&mut self) {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let bin = self.path("bin");
        std::fs::create_dir_all(&bin).expect("bin dir");
        // The supervisor gives children a clean environment: the double's knobs go
        // through a wrapper that execs it (same pid).
        let wrapper = bin.join("mihomo");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexport FAKE_MIHOMO_CONTROL='{}'\nexport FAKE_MIHOMO_OUTBOUND_BIND={PROXY_OUT}\nexec /usr/bin/python3 '{}' \"$@\"\n",
                self.path("control.json").display(),
                repo.join("tests/doubles/fake_mihomo.py").display()
            ),
        )
        .expect("wrapper");
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let log = std::fs::File::create(self.path("meduza.log")).expect("log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meduza"));
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
            .env("MEDUZA_BIN_MIHOMO", &wrapper)
            .env(
                "MEDUZA_BIN_MOSDNS",
                repo.join("tests/doubles/fake_mosdns.py"),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        self.meduza = Some(spawn_in(&self.topo.gw, cmd));
    }

    /// Pid of the double whose command line names `script` and our temp dir.
    fn pid_of(&self, script: &str) -> Option<i32> {
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
    fn table_present(&self) -> bool {
        self.topo
            .gw
            .try_exec(&["nft", "list", "table", "inet", "meduza"])
    }

    /// Time from `start` until the table's presence equals `want`, polling `nft` every
    /// 10 ms from a thread inside the gateway namespace.
    fn time_until_table(&self, start: Instant, want: bool, timeout: Duration) -> Duration {
        self.topo.gw.run_in(move || loop {
            let tick = Instant::now();
            let present = Command::new("nft")
                .args(["list", "table", "inet", "meduza"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if present == want {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "table inet meduza present={present} still after {timeout:?}"
            );
            if let Some(rest) = Duration::from_millis(10).checked_sub(tick.elapsed()) {
                std::thread::sleep(rest);
            }
        })
    }

    /// A TCP connection from the LAN client to the internet server's echo port; the
    /// first line it gets back.
    fn lan_connect(&self, v6: bool) -> String {
        let dst = SocketAddr::new(Topology::server(v6), ECHO_PORT);
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

    /// LAN traffic reaches the server directly (IPv4 and IPv6).
    fn assert_direct(&self, when: &str) {
        assert_eq!(
            self.lan_connect(false),
            "server 192.168.50.2",
            "{when} (IPv4)"
        );
        assert_eq!(self.lan_connect(true), "server fd00:50::2", "{when} (IPv6)");
    }

    /// LAN traffic lands on the double's TPROXY listener (IPv4 and IPv6).
    fn assert_proxied(&self, when: &str) {
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

    fn rule_requests(&self) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path == "/rules/proxy.txt")
            .cloned()
            .collect()
    }

    /// `dig` against MosDNS's listener in the gateway namespace.
    fn mosdns_answer(&self, name: &str) -> String {
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

/// Sleep until `hold_down` after `removed_at` has passed, with a margin for the
/// removal having been seen up to one 10 ms poll late, plus a random 0–500 ms so the
/// recovery starts at a random point of the monitor's 500 ms probe cycle (the
/// healthy → re-applied time depends on that phase).
fn outlast_hold_down(removed_at: Instant, hold_down: Duration) {
    let jitter = Duration::from_millis(rand::random::<u64>() % 500);
    let until = removed_at + hold_down + Duration::from_millis(100) + jitter;
    std::thread::sleep(until.saturating_duration_since(Instant::now()));
}

/// A random 0–500 ms pause, so a fault starts at a random point of the monitor's
/// probe cycle (the test's own steps are otherwise in step with it).
fn random_phase() {
    std::thread::sleep(Duration::from_millis(rand::random::<u64>() % 500));
}

fn figure(name: &str, d: Duration) {
    println!("FIGURE {name}_ms={:.1}", d.as_secs_f64() * 1000.0);
}

const HEALTHY: &str = r#"{"tproxy_marker": true}"#;
const REJECT: &str = r#"{"tproxy_marker": true, "reject_all": true}"#;
const STALL: &str = r#"{"tproxy_marker": true, "stall_api": true}"#;

#[test]
fn tproxy_follows_mihomo_health_end_to_end() {
    let mut lab = Lab::new();
    let gw_wan: IpAddr = Topology::GW_WAN4.into();
    let proxy_out: IpAddr = PROXY_OUT.parse().unwrap();

    // mihomo starts unhealthy: its URLTest group is REJECT.
    lab.control(REJECT);
    let node = |k: &str| format!("/nodes/{NODE}/{k}");
    let url = |p: &str| format!("http://{}:{HTTP_PORT}{p}", Topology::SERVER4);
    lab.put("/global/clash/subscriptions/sub/url", &url("/sub.yaml"));
    lab.put(
        "/global/mosdns/rule_files",
        &format!(r#"{{"rules/proxy.txt": "{}"}}"#, url("/rules/proxy.txt")),
    );
    lab.put("/global/mosdns/plugins", PLUGINS);
    lab.put(
        &node("lan"),
        &format!("{}\n{}", Topology::LAN4, Topology::LAN6),
    );
    lab.put(&node("clash/enable"), "true");
    lab.put(&node("clash/mode"), "tproxy");
    lab.put(&node("clash/active_subscription"), "sub");
    lab.put(&node("mosdns/enable"), "true");
    lab.put("/commit", "1");
    lab.start_meduza();

    // 1. Unhealthy at start: waiting, no TPROXY, LAN goes direct, MosDNS held back.
    let health = lab.wait_status("clash/health", Duration::from_secs(30), |v| {
        v.starts_with("waiting ") && v.contains("PROXY=REJECT")
    });
    assert!(
        health.contains("every URLTest group is down: PROXY=REJECT"),
        "{health}"
    );
    lab.wait_status("services/mihomo/status", Duration::from_secs(5), |v| {
        v.starts_with("running ")
    });
    let tproxy = lab.status("tproxy").unwrap_or_default();
    assert!(tproxy.starts_with("removed "), "{tproxy}");
    assert!(
        !lab.table_present(),
        "TPROXY applied while mihomo is unhealthy"
    );
    lab.assert_direct("mihomo unhealthy at start");
    // The subscription reaches mihomo as an HTTP proxy provider (mihomo fetches it).
    let mihomo_cfg = std::fs::read_to_string(lab.path("root/etc/mihomo/config.yaml"))
        .expect("mihomo config written under MEDUZA_ROOT");
    assert!(mihomo_cfg.contains(&url("/sub.yaml")), "{mihomo_cfg}");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !lab.table_present(),
        "TPROXY applied while mihomo is unhealthy"
    );
    assert!(
        lab.pid_of("fake_mosdns.py").is_none(),
        "MosDNS started before mihomo was healthy"
    );
    assert!(
        lab.rule_requests().is_empty(),
        "rule files fetched before mihomo was healthy"
    );

    // 2. Healthy: rule files through mihomo, MosDNS started, TPROXY applied.
    let t = Instant::now();
    lab.control(HEALTHY);
    let first = lab.time_until_table(t, true, Duration::from_secs(20));
    figure("first_healthy_to_applied", first);
    let tproxy = lab.wait_status("tproxy", Duration::from_secs(5), |v| {
        v.starts_with("applied ")
    });
    assert!(tproxy.contains("mihomo healthy"), "{tproxy}");
    let health = lab.status("clash/health").unwrap_or_default();
    assert!(health.starts_with("healthy "), "{health}");
    lab.assert_proxied("mihomo healthy");
    let rules = lab.rule_requests();
    assert!(!rules.is_empty(), "rule files never downloaded");
    for r in &rules {
        assert_eq!(r.peer, proxy_out, "rule file fetched around mihomo: {r:?}");
        assert_eq!(r.via.as_deref(), Some("1.1 fake-mihomo"), "{r:?}");
    }
    let downloaded = std::fs::read_to_string(lab.path("root/etc/mosdns/rules/proxy.txt"))
        .expect("rule file written under MEDUZA_ROOT");
    assert_eq!(downloaded, RULES);
    let mosdns = wait_for("MosDNS to start", Duration::from_secs(10), || {
        lab.pid_of("fake_mosdns.py")
    });
    lab.wait_status("services/mosdns/status", Duration::from_secs(5), |v| {
        v.starts_with("running ")
    });
    assert_eq!(lab.mosdns_answer("www.listed.example"), "198.51.100.1");
    assert_eq!(lab.mosdns_answer("other.example"), "198.51.100.2");

    // 3. kill -9 mihomo: TPROXY removed at once, back after the restart.
    let mihomo = lab.pid_of("fake_mihomo.py").expect("mihomo double running");
    let t = Instant::now();
    // SAFETY: kill(2) on the double's pid, found by its command line in our temp dir.
    assert_eq!(unsafe { libc::kill(mihomo, libc::SIGKILL) }, 0);
    let removed = lab.time_until_table(t, false, Duration::from_secs(3));
    figure("kill_to_removed", removed);
    assert!(
        removed < Duration::from_millis(250),
        "kill -9 -> removed took {removed:?}"
    );
    lab.assert_direct("mihomo killed");
    let health = lab.wait_status("clash/health", Duration::from_secs(5), |v| {
        v.starts_with("unhealthy ") || v.starts_with("waiting ")
    });
    assert!(
        health.contains("mihomo exited") || health.starts_with("waiting "),
        "{health}"
    );
    let back = lab.time_until_table(t, true, Duration::from_secs(20));
    figure("kill_to_reapplied", back);
    let restarted = lab.pid_of("fake_mihomo.py").expect("mihomo restarted");
    assert_ne!(restarted, mihomo);
    lab.wait_status("tproxy", Duration::from_secs(5), |v| {
        v.starts_with("applied ")
    });
    lab.assert_proxied("mihomo restarted");

    // 4. API stalled: removed within the probe period + timeout.
    random_phase();
    let t = Instant::now();
    lab.control(STALL);
    let removed = lab.time_until_table(t, false, Duration::from_secs(5));
    figure("stall_to_removed", removed);
    assert!(
        removed < Duration::from_secs(2),
        "stall -> removed took {removed:?}"
    );
    lab.assert_direct("mihomo API stalled");
    let health = lab.wait_status("clash/health", Duration::from_secs(5), |v| {
        v.starts_with("unhealthy ")
    });
    assert!(health.contains("no answer within"), "{health}");
    // Outlast the hold-down, which counts from the removal and doubles on each removal
    // within 30 s of the last application (docs/clash.md): 2 s after the kill, now 4 s.
    outlast_hold_down(t + removed, Duration::from_secs(4));
    let t = Instant::now();
    lab.control(HEALTHY);
    let back = lab.time_until_table(t, true, Duration::from_secs(10));
    figure("stall_cleared_to_reapplied", back);
    assert!(
        back < Duration::from_secs(1),
        "healthy -> re-applied took {back:?}"
    );
    lab.assert_proxied("mihomo API answers again");

    // 5. Every URLTest group REJECT: removed, the reason names the group.
    random_phase();
    let t = Instant::now();
    lab.control(REJECT);
    let removed = lab.time_until_table(t, false, Duration::from_secs(5));
    figure("reject_to_removed", removed);
    assert!(
        removed < Duration::from_secs(2),
        "REJECT -> removed took {removed:?}"
    );
    lab.assert_direct("every URLTest group REJECT");
    let health = lab.wait_status("clash/health", Duration::from_secs(5), |v| {
        v.starts_with("unhealthy ")
    });
    assert!(
        health.contains("every URLTest group is down: PROXY=REJECT"),
        "{health}"
    );
    outlast_hold_down(t + removed, Duration::from_secs(8));
    let t = Instant::now();
    lab.control(HEALTHY);
    let back = lab.time_until_table(t, true, Duration::from_secs(10));
    figure("reject_cleared_to_reapplied", back);
    assert!(
        back < Duration::from_secs(1),
        "healthy -> re-applied took {back:?}"
    );
    lab.assert_proxied("URLTest group alive again");
    let health = lab.wait_status("clash/health", Duration::from_secs(5), |v| {
        v.starts_with("healthy ")
    });
    assert!(health.contains("every URLTest group alive"), "{health}");

    // MosDNS was never restarted by any of this.
    assert_eq!(
        lab.pid_of("fake_mosdns.py"),
        Some(mosdns),
        "MosDNS was restarted"
    );
    assert!(lab
        .status("services/mosdns/status")
        .unwrap_or_default()
        .starts_with("running "));

    // 6. Clash disabled: no TPROXY, rule files fetched directly.
    let before = lab.rule_requests().len();
    lab.put(&node("clash/enable"), "false");
    lab.put("/commit", "2");
    let tproxy = lab.wait_status("tproxy", Duration::from_secs(10), |v| {
        v.starts_with("removed ")
    });
    assert!(tproxy.contains("Clash disabled"), "{tproxy}");
    wait_for("the table to go", Duration::from_secs(5), || {
        (!lab.table_present()).then_some(())
    });
    lab.assert_direct("Clash disabled");
    wait_for("a direct rule download", Duration::from_secs(15), || {
        (lab.rule_requests().len() > before).then_some(())
    });
    for r in &lab.rule_requests()[before..] {
        assert_eq!(r.peer, gw_wan, "Clash disabled: download not direct: {r:?}");
        assert_eq!(r.via, None, "{r:?}");
    }
    wait_for(
        "clash/health to be withdrawn",
        Duration::from_secs(5),
        || lab.status("clash/health").is_none().then_some(()),
    );
    wait_for("mihomo to stop", Duration::from_secs(10), || {
        lab.pid_of("fake_mihomo.py").is_none().then_some(())
    });
    lab.wait_status("services/mosdns/status", Duration::from_secs(10), |v| {
        v.starts_with("running ")
    });
    assert_eq!(lab.mosdns_answer("www.listed.example"), "198.51.100.1");

    // The online key stayed on its lease (TTL 5 s here) the whole time.
    assert_eq!(lab.status("online").as_deref(), Some("1"));
    let log = std::fs::read_to_string(lab.path("meduza.log")).expect("log");
    assert!(
        !log.contains("status lease expired"),
        "the online lease expired while meduza ran"
    );

    // 7. SIGTERM: a clean stop, children gone, no table left behind.
    let mut meduza = lab.meduza.take().expect("meduza");
    let status = stop(&mut meduza, Duration::from_secs(10)).expect("meduza stops on SIGTERM");
    assert!(status.success(), "meduza exited with {status}");
    assert!(!lab.table_present());
    assert!(
        lab.pid_of("fake_mosdns.py").is_none(),
        "MosDNS left running"
    );
}
