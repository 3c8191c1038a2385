//! The tunnel presets end to end: paqet, ICMPTunnel and WaterWall, client on gateway
//! gw0 and server on gw1, each the real `meduza run` in its own network namespace
//! against a real etcd. From etcd keys alone meduza writes the programs' config files,
//! starts the children and probes them; the test runs meduza's own probes (SOCKS5
//! fetch through the tunnel, TCP connect) from gw0 to a real HTTP server that only
//! gw1 can reach, then waits for meduza's health checks to pass, and finally changes
//! one key so the two ends disagree and sees the probe fail.
//!
//! No registry here ships the three programs: the children are the doubles in
//! `tests/support/doubles/` (fake_paqet.py, fake_icmptunnel.py, fake_waterwall.py), which parse
//! the real command lines and config formats and refuse what the programs refuse, but
//! carry the tunnel over their own TCP wire (docs/tunnels.md). Needs root, etcd,
//! python3 with PyYAML and FRR's `frr` user (the gateway harness).

use meduza_test_support::{gateway, mesh};

use gateway::{commit, lan, Gateway};
use meduza::supervise::health::{run_probe, ProbeContext, ProbeResult};
use meduza::supervise::logbuf::LogBuffer;
use meduza_generators::plan::service::{Probe, ServiceSpec};
use meduza_generators::render::{Bins, RenderEnv};
use meduza_generators::{render_node, Config, Snapshot};
use mesh::{ns_sh, wait_for, Mesh, NsEtcd};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Where gw1's HTTP server listens: its own loopback, so gw0 reaches it only through a
/// tunnel.
const WEB: &str = "127.0.0.1:18080";
const PAQET_KEY: &str = "kcp key with \"quotes\" and \\ and on";
const ICMP_KEY: &str = "20201204";
const ICMP_ENCRYPT_KEY: &str = "Ysh!io19HSwqi1ldm";
const WW_PASSWORD: &str = "waterwall-password-7f3a";

fn double(name: &str) -> String {
    let p = meduza_test_support::doubles::doubles_dir().join(name);
    p.display().to_string()
}

/// Run `f` on a new thread inside network namespace `ns`.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    let h = std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns(2) on a valid, open namespace fd only changes the calling
        // thread's network namespace; no memory is shared with the kernel.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    });
    match h.join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// One attempt of `probe`, run by meduza's own probe code inside `ns`.
fn probe_in(ns: &str, probe: &Probe) -> ProbeResult {
    let probe = probe.clone();
    in_ns(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let log = LogBuffer::new(16);
        let ctx = ProbeContext {
            pid: None,
            log: &log,
            timeout: Duration::from_secs(5),
        };
        rt.block_on(run_probe(&probe, &ctx))
    })
}

/// Retry `probe` in `ns` until it passes (children need a moment to listen).
/// On failure the panic shows `context()` (the children's log lines).
fn probe_passes(ns: &str, what: &str, probe: &Probe, context: impl Fn() -> String) -> String {
    let start = Instant::now();
    loop {
        match probe_in(ns, probe) {
            Ok(detail) => return detail,
            Err(e) if start.elapsed() > Duration::from_secs(20) => {
                panic!("{what}: probe {probe:?} still failing: {e}\n{}", context())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

/// GET `url` through the SOCKS5 proxy (`socks5h`) from inside `ns`; the body.
fn fetch_via_socks(ns: &str, proxy: &str, url: &str) -> Result<String, String> {
    let (proxy, url) = (proxy.to_string(), url.to_string());
    in_ns(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let p = reqwest::Proxy::all(format!("socks5h://{proxy}")).map_err(|e| e.to_string())?;
            let c = reqwest::Client::builder()
                .proxy(p)
                .timeout(Duration::from_secs(5))
                .build()
                .map_err(|e| e.to_string())?;
            let r = c.get(&url).send().await.map_err(|e| e.to_string())?;
            r.text().await.map_err(|e| e.to_string())
        })
    })
}

/// The MAC address of `dev` in `ns`.
fn mac(ns: &str, dev: &str) -> String {
    let out = ns_sh(ns, &["ip", "link", "show", dev]);
    out.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .expect("link/ether address")
        .to_string()
}

/// Every tunnel key of both gateways (the same map goes to etcd and to the local
/// render the test takes its probes from).
fn keys(gw0_mac: &str, gw1_mac: &str) -> BTreeMap<String, String> {
    let gw0_ip = Mesh::gw_ip(0).to_string();
    let gw1_ip = Mesh::gw_ip(1).to_string();
    let url = format!("http://{WEB}/probe.txt");
    let mut k = BTreeMap::new();
    let mut put = |node: &str, tunnel: &str, leaf: &str, v: &str| {
        k.insert(
            format!("/nodes/{node}/tunnels/{tunnel}/{leaf}"),
            v.to_string(),
        );
    };
    for (node, role) in [("gw0", "client"), ("gw1", "server")] {
        for (t, kind, cmd) in [
            ("pq", "paqet", "fake_paqet.py"),
            ("icmp", "icmptunnel", "fake_icmptunnel.py"),
            ("ww", "waterwall", "fake_waterwall.py"),
        ] {
            put(node, t, "enable", "true");
            put(node, t, "kind", kind);
            put(node, t, "role", role);
            put(node, t, "command", &double(cmd));
            put(node, t, "health/interval", "10");
        }
    }
    // paqet: the client sends from gw0's WAN address to the server on gw1's.
    put("gw0", "pq", "interface", "wan0");
    put("gw0", "pq", "local_ip", &gw0_ip);
    put("gw0", "pq", "router_mac", gw1_mac);
    put("gw0", "pq", "server", &format!("{gw1_ip}:9999"));
    put("gw0", "pq", "key", PAQET_KEY);
    put("gw0", "pq", "socks_port", "11080");
    put("gw0", "pq", "test_url", &url);
    put("gw1", "pq", "interface", "wan0");
    put("gw1", "pq", "local_ip", &gw1_ip);
    put("gw1", "pq", "router_mac", gw0_mac);
    put("gw1", "pq", "port", "9999");
    put("gw1", "pq", "key", PAQET_KEY);
    // ICMPTunnel.
    put("gw0", "icmp", "server", &gw1_ip);
    put("gw0", "icmp", "key", ICMP_KEY);
    put("gw0", "icmp", "encrypt_key", ICMP_ENCRYPT_KEY);
    put("gw0", "icmp", "socks_port", "11081");
    put("gw0", "icmp", "api_port", "18081");
    put("gw0", "icmp", "test_url", &url);
    put("gw1", "icmp", "key", ICMP_KEY);
    put("gw1", "icmp", "encrypt_key", ICMP_ENCRYPT_KEY);
    put("gw1", "icmp", "api_port", "18081");
    // WaterWall: gw0's listener → gw1's listener → gw1's web server.
    put("gw0", "ww", "listen", "127.0.0.1:14443");
    put("gw0", "ww", "server", &format!("{gw1_ip}:24443"));
    put("gw0", "ww", "password", WW_PASSWORD);
    put("gw1", "ww", "listen", "0.0.0.0:24443");
    put("gw1", "ww", "backend", WEB);
    put("gw1", "ww", "password", WW_PASSWORD);
    for i in 0..2 {
        k.insert(format!("/nodes/gw{i}/lan"), lan(i));
    }
    k
}

/// What meduza renders for `node` from `keys`: the services by name and the files.
fn render(
    keys: &BTreeMap<String, String>,
    node: &str,
) -> (
    BTreeMap<String, ServiceSpec>,
    Vec<meduza_generators::FileOut>,
) {
    let snap = Snapshot(keys.clone());
    let cfg = Config::parse(&snap).unwrap_or_else(|e| panic!("keys validate: {e}"));
    let env = RenderEnv {
        default_gw: None,
        clash_secret: String::new(),
        bins: Bins::default(),
    };
    let r = render_node(&cfg, node, &env).unwrap_or_else(|e| panic!("{node} renders: {e}"));
    let mut services = BTreeMap::new();
    let mut files = Vec::new();
    for d in r.domains.into_values() {
        files.extend(d.files);
        for s in d.services {
            services.insert(s.name.clone(), s);
        }
    }
    (services, files)
}

fn probe_of(services: &BTreeMap<String, ServiceSpec>, svc: &str) -> Probe {
    services[svc]
        .health
        .as_ref()
        .expect("preset probe")
        .probe
        .clone()
}

/// Pid of the child running `script` in `gw` (its argv[0] is the double).
fn child_pid(gw: &Gateway, script: &str) -> u32 {
    gw.wait_pid(script, Duration::from_secs(10))
}

/// Pids of the processes running `script` in `gw` (while a child is replaced there
/// may briefly be two).
fn pids_of(gw: &Gateway, script: &str) -> Vec<u32> {
    gw.procs()
        .into_iter()
        .filter(|(_, cmd)| cmd.contains(script) && !cmd.contains("meduza run"))
        .map(|(pid, _)| pid)
        .collect()
}

/// The child's log lines as meduza logged them (`[svc] line`).
fn child_lines(gw: &Gateway, svc: &str) -> Vec<String> {
    let tag = format!("[{svc}] ");
    gw.run_log()
        .lines()
        .filter_map(|l| l.find(&tag).map(|at| l[at + tag.len()..].to_string()))
        .collect()
}

/// The last log lines of `svc`'s children on both gateways, for failure messages.
fn tunnel_logs(g0: &Gateway, g1: &Gateway, svc: &str) -> String {
    let mut out = String::new();
    for g in [g0, g1] {
        let lines = child_lines(g, svc);
        let tail = &lines[lines.len().saturating_sub(15)..];
        out.push_str(&format!(
            "--- [{svc}] on {}:\n{}\n",
            g.node,
            tail.join("\n")
        ));
    }
    out
}

/// meduza logged `Health check PASS` for `svc` (fields follow the message).
fn passed(gw: &Gateway, svc: &str) -> bool {
    gw.run_log()
        .lines()
        .any(|l| l.contains("Health check PASS") && l.contains(&format!("svc={svc}")))
}

fn assert_secret_free(what: &str, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    for secret in [PAQET_KEY, ICMP_ENCRYPT_KEY, WW_PASSWORD] {
        assert!(!text.contains(secret), "{what} holds a secret");
    }
}

/// A child process killed and reaped when the test ends, even by a panic.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn presets_run_from_etcd_keys_and_pass_meduzas_probes() {
    let t0 = Instant::now();
    let mesh = Mesh::new(2);
    let etcd = NsEtcd::start(&mesh.hub, Mesh::HUB_IP, 2379, &mesh.path("etcd"));
    let mut gws: Vec<Gateway> = (0..2)
        .map(|i| Gateway::new(&mesh, i, &etcd.endpoint))
        .collect();

    // The destination: a real HTTP server on gw1's loopback.
    let web_dir = mesh.path("web");
    std::fs::create_dir_all(&web_dir).expect("web dir");
    let token = format!("meduza-tunnel-token-{}", std::process::id());
    std::fs::write(web_dir.join("probe.txt"), &token).expect("probe file");
    let (host, port) = WEB.split_once(':').expect("host:port");
    let _web = KillOnDrop(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &gws[1].ns,
                "/usr/bin/python3",
                "-m",
                "http.server",
            ])
            .args([
                "--bind",
                host,
                "--directory",
                &web_dir.display().to_string(),
                port,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 http.server"),
    );
    let direct = Probe::Http {
        url: format!("http://{WEB}/probe.txt"),
        expect_status: None,
    };
    probe_passes(&gws[1].ns, "gw1's web server", &direct, String::new);
    assert!(
        probe_in(&gws[0].ns, &direct).is_err(),
        "gw0 must not reach gw1's web server without a tunnel"
    );

    let keys = keys(&mac(&gws[0].ns, "wan0"), &mac(&gws[1].ns, "wan0"));
    etcd.load(&keys);
    let rev = commit(&etcd);
    gateway::start_all(&mut gws, &etcd, rev);
    let (g0, g1) = (&gws[0], &gws[1]);

    // meduza wrote exactly what the generator renders, secrets in 0600 files.
    let mut services = BTreeMap::new();
    for g in [g0, g1] {
        let (svcs, files) = render(&keys, &g.node);
        for f in files
            .iter()
            .filter(|f| f.path.starts_with("/etc/meduza/tunnels/"))
        {
            let host = g.file(&f.path);
            let on_disk = std::fs::read_to_string(&host)
                .unwrap_or_else(|e| panic!("{}: {e}", host.display()));
            assert_eq!(on_disk, f.content, "{} on {}", f.path, g.node);
            let mode = std::fs::metadata(&host).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, f.mode, "{} mode", f.path);
            // Every tunnel here has a key or password: only WaterWall's core.json is
            // free of secrets.
            let want = if f.path.ends_with("/core.json") {
                0o644
            } else {
                0o600
            };
            assert_eq!(mode, want, "{} mode", f.path);
        }
        services.insert(g.node.clone(), svcs);
    }

    // Every child runs, without a secret in its argv or environment.
    for (g, script) in [g0, g1].into_iter().flat_map(|g| {
        ["fake_paqet.py", "fake_icmptunnel.py", "fake_waterwall.py"].map(move |s| (g, s))
    }) {
        let pid = child_pid(g, script);
        for f in ["cmdline", "environ"] {
            let raw = std::fs::read(format!("/proc/{pid}/{f}")).expect("proc file");
            assert_secret_free(&format!("{script}'s {f} on {}", g.node), &raw);
        }
    }

    // meduza's probes from gw0: SOCKS5 fetches through paqet and ICMPTunnel reach gw1's
    // web server; WaterWall's listener accepts and forwards to it.
    let c = &services["gw0"];
    for svc in ["tunnel-pq", "tunnel-icmp"] {
        let probe = probe_of(c, svc);
        let Probe::Socks5 { proxy, url } = &probe else {
            panic!("{svc}: a client preset probes SOCKS5, got {probe:?}")
        };
        let detail = probe_passes(&g0.ns, svc, &probe, || tunnel_logs(g0, g1, svc));
        eprintln!("{svc}: {detail}");
        let body = fetch_via_socks(&g0.ns, proxy, url).expect("fetch through the tunnel");
        assert_eq!(body, token, "{svc} carried the web server's answer");
    }
    let ww = probe_of(c, "tunnel-ww");
    assert_eq!(
        ww,
        Probe::Tcp {
            addr: "127.0.0.1:14443".into()
        }
    );
    let ww_logs = || tunnel_logs(g0, g1, "tunnel-ww");
    eprintln!(
        "tunnel-ww: {}",
        probe_passes(&g0.ns, "tunnel-ww", &ww, ww_logs)
    );
    let through = Probe::Http {
        url: "http://127.0.0.1:14443/probe.txt".into(),
        expect_status: Some(200),
    };
    eprintln!(
        "tunnel-ww forwards: {}",
        probe_passes(&g0.ns, "tunnel-ww end to end", &through, ww_logs)
    );

    // The servers' preset probe (a scan of the child's recent log for "error") over
    // what each server double logged so far.
    for svc in ["tunnel-pq", "tunnel-icmp", "tunnel-ww"] {
        let probe = probe_of(&services["gw1"], svc);
        assert!(matches!(probe, Probe::LogScan { .. }), "{svc}: {probe:?}");
        let buf = LogBuffer::new(200);
        for l in child_lines(g1, svc) {
            buf.push(l);
        }
        let ctx = ProbeContext {
            pid: None,
            log: &buf,
            timeout: Duration::from_secs(5),
        };
        let r = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(run_probe(&probe, &ctx));
        assert!(r.is_ok(), "{svc} server log scan: {r:?}");
    }

    // meduza's own health checks pass once the 30 s grace period is over.
    wait_for(
        "meduza's health checks to pass",
        Duration::from_secs(75),
        || {
            ["tunnel-pq", "tunnel-icmp", "tunnel-ww"]
                .iter()
                .all(|s| passed(g0, s) && passed(g1, s))
                .then_some(())
        },
    );
    eprintln!(
        "meduza's checks passed after {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    for g in [g0, g1] {
        assert_secret_free(&format!("{}'s meduza log", g.node), g.log_text().as_bytes());
    }

    // The ends must agree: a different paqet key on the client alone (meduza rewrites
    // the file and restarts the child) breaks the tunnel, and the server logs it.
    let old = child_pid(g0, "fake_paqet.py");
    etcd.put("/nodes/gw0/tunnels/pq/key", "a different key");
    let rev = commit(&etcd);
    g0.wait_applied(&etcd, rev, Duration::from_secs(10));
    wait_for("paqet client restarted", Duration::from_secs(10), || {
        let pids = pids_of(g0, "fake_paqet.py");
        (pids.len() == 1 && pids[0] != old).then_some(())
    });
    let probe = probe_of(c, "tunnel-pq");
    std::thread::sleep(Duration::from_millis(500));
    let r = probe_in(&g0.ns, &probe);
    assert!(
        r.is_err(),
        "a key mismatch must fail the SOCKS5 probe: {r:?}"
    );
    wait_for(
        "the server to log the refusal",
        Duration::from_secs(10),
        || {
            child_lines(g1, "tunnel-pq")
                .iter()
                .any(|l| l.contains("ERROR"))
                .then_some(())
        },
    );
    eprintln!("done after {:.1}s", t0.elapsed().as_secs_f64());
}

/// Run a double in `dir` with `args`; (exit code, stderr + stdout).
fn run_double(script: &str, dir: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(double(script))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run double");
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.code().unwrap_or(-1), text)
}

/// The doubles refuse what the programs refuse (no network needed: every case fails
/// before anything listens).
#[test]
fn doubles_refuse_what_the_programs_refuse() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let write = |name: &str, text: &str| std::fs::write(d.join(name), text).expect("write");

    // paqet: unknown role, wrong command, wrong type, validation errors together.
    write("role.yaml", "role: \"proxy\"\n");
    let (rc, err) = run_double("fake_paqet.py", d, &["run", "-c", "role.yaml"]);
    assert_eq!(rc, 1, "{err}");
    assert!(err.contains("role must be 'client' or 'server'"), "{err}");
    let (rc, err) = run_double("fake_paqet.py", d, &["start"]);
    assert!(rc != 0 && err.contains("unknown command"), "{err}");
    write(
        "type.yaml",
        "role: \"client\"\ntransport:\n  kcp:\n    mtu: \"big\"\n",
    );
    let (rc, err) = run_double("fake_paqet.py", d, &["run", "-c", "type.yaml"]);
    assert!(rc == 1 && err.contains("mtu"), "{err}");
    write(
        "missing.yaml",
        "role: \"client\"\nnetwork:\n  interface: \"nosuch-if0\"\ntransport:\n  protocol: \"kcp\"\n  kcp:\n    mode: \"fast\"\n",
    );
    let (rc, err) = run_double("fake_paqet.py", d, &["run", "--config=missing.yaml"]);
    assert_eq!(rc, 1, "{err}");
    for want in [
        "validation failed",
        "failed to find network interface nosuch-if0",
        "at least one address family",
        "KCP encryption key is required",
        "address is required",
    ] {
        assert!(err.contains(want), "paqet: {want:?} not in {err}");
    }
    let (rc, err) = run_double("fake_paqet.py", d, &["run"]);
    assert!(
        rc == 1 && err.contains("config.yaml"),
        "default config path: {err}"
    );

    // ICMPTunnel: Go flag parsing, JSON types, required fields.
    let (rc, err) = run_double("fake_icmptunnel.py", d, &["-c", "x.json"]);
    assert!(
        rc == 2 && err.contains("flag provided but not defined: -c"),
        "{err}"
    );
    write(
        "types.json",
        r#"{"type":"client","server":"10.0.0.1","key":1,"timeout":20,"dns":"8.8.8.8","api_port":8080,"listen_port_socks":"1080"}"#,
    );
    let (rc, err) = run_double("fake_icmptunnel.py", d, &["-config", "types.json"]);
    assert!(
        rc == 1 && err.contains("Config.api_port of type string"),
        "{err}"
    );
    write(
        "role.json",
        r#"{"type":"relay","key":1,"timeout":20,"dns":"8.8.8.8","api_port":"8080"}"#,
    );
    let (rc, err) = run_double("fake_icmptunnel.py", d, &["-config=role.json"]);
    assert!(rc == 1 && err.contains("invalid type"), "{err}");
    write(
        "noserver.json",
        r#"{"type":"client","key":1,"timeout":20,"dns":"8.8.8.8","api_port":"8080","listen_port_socks":"1080"}"#,
    );
    let (rc, err) = run_double("fake_icmptunnel.py", d, &["-config", "noserver.json"]);
    assert!(rc == 1 && err.contains("server"), "{err}");
    write(
        "enc.json",
        r#"{"type":"server","key":1,"timeout":20,"dns":"8.8.8.8","api_port":"8080","encrypt_data":true}"#,
    );
    let (rc, err) = run_double("fake_icmptunnel.py", d, &["-config", "enc.json"]);
    assert!(rc == 1 && err.contains("encrypt_data_key"), "{err}");

    // WaterWall: core.json from the working directory, then the node file.
    let (rc, err) = run_double("fake_waterwall.py", d, &[]);
    assert!(
        rc == 1 && err.contains("Could not read core settings file \"core.json\""),
        "{err}"
    );
    write(
        "core.json",
        r#"{"misc":{"ram-profile":"huge"},"configs":["config.json"]}"#,
    );
    let (rc, err) = run_double("fake_waterwall.py", d, &[]);
    assert!(rc == 1 && err.contains("ram-profile"), "{err}");
    write("core.json", r#"{"configs":[]}"#);
    let (rc, err) = run_double("fake_waterwall.py", d, &[]);
    assert!(rc == 1 && err.contains("\"configs\" array"), "{err}");
    write(
        "core.json",
        r#"{"log":{"path":"log/"},"configs":["config.json"]}"#,
    );
    for (config, want) in [
        (r#"{"nodes":[]}"#, "name (string field)"),
        (
            r#"{"name":"x","nodes":[{"name":"in","type":"TcpListener","settings":{"address":"127.0.0.1","port":1},"next":"out"}]}"#,
            "could not find it's next node \"out\"",
        ),
        (
            r#"{"name":"x","nodes":[{"name":"in","type":"TcpListener","settings":{"address":"127.0.0.1","port":70000},"next":"out"},{"name":"out","type":"TcpConnector","settings":{"address":"127.0.0.1","port":1}}]}"#,
            "TcpListener->settings->port",
        ),
        (
            r#"{"name":"x","nodes":[{"name":"in","type":"TcpListener","settings":{"address":"127.0.0.1","port":1},"next":"e"},{"name":"e","type":"EncryptionClient","settings":{"salt":"s"},"next":"out"},{"name":"out","type":"TcpConnector","settings":{"address":"127.0.0.1","port":1}}]}"#,
            "'password' not set",
        ),
        (
            r#"{"name":"x","nodes":[{"name":"in","type":"NoSuchNode","settings":{"a":1}}]}"#,
            "could not be loaded",
        ),
    ] {
        write("config.json", config);
        let (rc, err) = run_double("fake_waterwall.py", d, &[]);
        assert!(
            rc == 1 && err.contains(want),
            "waterwall: {want:?} not in {err}"
        );
    }
    // The version flag is the only argument WaterWall reads.
    let (rc, out) = run_double("fake_waterwall.py", d, &["--version"]);
    assert!(rc == 0 && out.contains("Waterwall version"), "{out}");
}
