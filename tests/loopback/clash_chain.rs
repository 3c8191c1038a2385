//! The startup chain end to end on loopback with the real mihomo v1.19.2
//! (`tests/support/src/real_mihomo.rs`: mihomo and a second real mihomo as the proxy node)
//! and the MosDNS double (no registry here ships MosDNS): nothing is downloaded, MosDNS
//! is not started and TPROXY is not applied while mihomo is unhealthy (its url-test
//! group holds only `REJECT`); once it is healthy (the group reloaded onto the node)
//! the rule files come through mihomo's mixed port and the node, MosDNS starts with
//! them and TPROXY follows. With Clash disabled: direct download, MosDNS started, no
//! TPROXY. Also checks the MosDNS double's strictness (unknown keys, missing rule files).

use meduza_test_support::doubles;

use doubles::{doubles_dir, free_port, Origin};
use meduza::clash::chain::{plan, run_chain, ChainConfig, ChainDeps};
use meduza::clash::monitor::{
    ClashHealthSink, ClashMonitor, GateError, HealthStatus, MonitorConfig, MonitorHandle,
    TproxyGate,
};
use meduza::clash::rules::{
    download_rule_files, parse_rule_files, Backoff, Fetcher, Route, RuleFile, RulesError,
    RulesReport,
};
use meduza_test_support::real_mihomo::{Members, Node, RealMihomo};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::process::{Child, Command};

type Log = Arc<Mutex<Vec<String>>>;

fn push(log: &Log, s: &str) {
    log.lock().expect("lock").push(s.to_string());
}

struct Gate(Log);

impl TproxyGate for Gate {
    async fn apply(&self) -> Result<(), GateError> {
        push(&self.0, "tproxy applied");
        Ok(())
    }
    async fn remove(&self) -> Result<(), GateError> {
        push(&self.0, "tproxy removed");
        Ok(())
    }
}

struct Sink;

impl ClashHealthSink for Sink {
    fn health(&self, _: &HealthStatus) {}
    fn tproxy(&self, _: bool, _: &str) {}
}

fn mosdns_config(listen: SocketAddr) -> String {
    format!(
        "log: {{level: info}}\nplugins:\n  - tag: blocked\n    type: domain_set\n    args: {{files: [rules/blocked.txt]}}\n  \
         - tag: forward_local\n    type: forward\n    args: {{upstreams: [{{addr: 223.5.5.5}}]}}\n  \
         - tag: main\n    type: sequence\n    args:\n      - matches: [qname $blocked]\n        exec: reject 3\n      \
         - exec: $forward_local\n  \
         - tag: udp\n    type: udp_server\n    args: {{entry: main, listen: \"{listen}\"}}\n"
    )
}

struct Deps {
    log: Log,
    monitor: Option<MonitorHandle>,
    root: PathBuf,
    files: Vec<RuleFile>,
    fetcher: Fetcher,
    mosdns_listen: SocketAddr,
    mosdns: Mutex<Option<Child>>,
}

async fn start_mosdns(workdir: &Path, listen: SocketAddr) -> Result<Child, String> {
    let mut cmd = Command::new(doubles_dir().join("fake_mosdns.py"));
    cmd.args(["start", "-c", "config.yaml", "-d"])
        .arg(workdir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    // SIGHUP as a gateway's init leaves it (default), whatever the test runner
    // inherited: under `nohup` it is ignored, and an ignored signal stays ignored
    // across exec, for mosdns and for its double.
    // SAFETY: only an async-signal-safe sigaction between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            use nix::sys::signal::{signal, SigHandler, Signal};
            signal(Signal::SIGHUP, SigHandler::SigDfl)
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    for _ in 0..100 {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("mosdns exited: {status}"));
        }
        if doubles::dns_a(listen, "probe.example").await.is_some() {
            return Ok(child);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("mosdns never answered".into())
}

impl ChainDeps for Deps {
    async fn dns_up(&self) {
        push(&self.log, "dns up");
    }
    async fn mihomo_healthy(&self) {
        if let Some(m) = &self.monitor {
            m.wait_healthy().await;
        }
    }
    async fn download_rules(&self, route: &Route) -> Result<RulesReport, RulesError> {
        let r =
            download_rule_files(&self.fetcher, &self.root, "/etc/mosdns", &self.files, route).await;
        push(&self.log, &format!("rules downloaded via {route}"));
        r
    }
    async fn start_mosdns(&self) -> Result<(), String> {
        let child = start_mosdns(&self.root.join("etc/mosdns"), self.mosdns_listen).await?;
        *self.mosdns.lock().expect("lock") = Some(child);
        push(&self.log, "mosdns started");
        Ok(())
    }
    async fn restart_mosdns(&self) -> Result<(), String> {
        Err("not used here".into())
    }
    async fn arm_tproxy(&self) {
        if let Some(m) = &self.monitor {
            m.arm().await;
        }
        push(&self.log, "armed");
    }
}

fn setup(origin: &Origin) -> (tempfile::TempDir, Vec<RuleFile>, SocketAddr) {
    origin.route("/blocked.txt", "full:blocked.example\ndomain:ads.test\n");
    let root = tempfile::tempdir().expect("root");
    let mosdns_dir = root.path().join("etc/mosdns");
    std::fs::create_dir_all(&mosdns_dir).expect("dir");
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    std::fs::write(mosdns_dir.join("config.yaml"), mosdns_config(listen)).expect("config");
    let files = parse_rule_files(&format!(
        r#"{{"rules/blocked.txt": "{}"}}"#,
        origin.url("/blocked.txt")
    ))
    .expect("files");
    (root, files, listen)
}

fn fetcher() -> Fetcher {
    Fetcher {
        backoff: Backoff {
            attempts: 5,
            first_delay: Duration::from_millis(50),
        },
        timeout: Duration::from_secs(5),
        ..Fetcher::default()
    }
}

#[tokio::test]
async fn chain_waits_for_healthy_mihomo_then_runs_in_order() {
    let origin = Origin::start().await;
    origin.route_204("/generate_204");
    let node = Node::start().await;
    let m = RealMihomo::start(&Members::RejectOnly, &origin.url("/generate_204")).await;
    // Every request the origin gets names the process that connected: the node (the
    // proxied path), mihomo itself (its DIRECT: a leak) or this test (a direct fetch).
    origin.track_owners(&[
        ("node", node.pid()),
        ("mihomo", m.pid),
        ("test", std::process::id()),
    ]);
    let (root, files, listen) = setup(&origin);
    let log: Log = Arc::default();
    let (_events, erx) = tokio::sync::mpsc::channel(1);
    let (monitor, handle) = ClashMonitor::new(
        MonitorConfig::default(),
        m.api(),
        Gate(log.clone()),
        Sink,
        erx,
        true,
    );
    tokio::spawn(monitor.run());

    let mut cfg = ChainConfig::new(true, true, true);
    cfg.proxy_url = m.proxy_url();
    let deps = Arc::new(Deps {
        log: log.clone(),
        monitor: Some(handle.clone()),
        root: root.path().to_path_buf(),
        files,
        fetcher: fetcher(),
        mosdns_listen: listen,
        mosdns: Mutex::new(None),
    });
    let d = deps.clone();
    let chain =
        tokio::spawn(async move { run_chain(&*d, &plan(&cfg), Duration::from_millis(200)).await });

    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        *log.lock().expect("lock"),
        ["dns up"],
        "nothing else while mihomo is unhealthy"
    );
    assert!(origin.seen().is_empty(), "{:?}", origin.seen());
    assert_eq!(handle.health().borrow().phase.as_str(), "waiting");

    // The url-test group reloaded onto the node: mihomo is healthy.
    m.apply(&node.members()).await;
    tokio::time::timeout(Duration::from_secs(10), chain)
        .await
        .expect("chain done")
        .expect("join");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        *log.lock().expect("lock"),
        [
            "dns up",
            &format!("rules downloaded via proxy {}", m.proxy_url()),
            "mosdns started",
            "armed",
            "tproxy applied"
        ]
    );
    // Through mihomo: the fetcher was given only mihomo's mixed port, mihomo routed
    // the download by `MATCH,PROXY` to `node-a`, and the connection that reached the
    // origin was the node's (never mihomo's own DIRECT or a direct fetch).
    let seen = origin.seen();
    assert!(
        seen.iter().any(|s| s.path() == "/blocked.txt"),
        "rule file never requested: {seen:?}"
    );
    assert!(
        seen.iter().all(|s| s.owner.as_deref() == Some("node")),
        "a request reached the origin other than through the node: {seen:?}"
    );
    let routed = format!("--> {} match Match using PROXY[node-a]", origin.addr);
    assert!(
        m.log().contains(&routed),
        "mihomo's log has no {routed:?}:\n{}",
        m.log()
    );
    // MosDNS loaded the downloaded rules.
    assert_eq!(
        doubles::dns_a(listen, "blocked.example").await,
        Some(Ipv4Addr::new(198, 51, 100, 1))
    );
    assert_eq!(
        doubles::dns_a(listen, "x.ads.test").await,
        Some(Ipv4Addr::new(198, 51, 100, 1))
    );
    assert_eq!(
        doubles::dns_a(listen, "other.example").await,
        Some(Ipv4Addr::new(198, 51, 100, 2))
    );
}

#[tokio::test]
async fn clash_disabled_direct_mosdns_no_tproxy() {
    let origin = Origin::start().await;
    origin.track_owners(&[("test", std::process::id())]);
    let (root, files, listen) = setup(&origin);
    let log: Log = Arc::default();
    let deps = Deps {
        log: log.clone(),
        monitor: None,
        root: root.path().to_path_buf(),
        files,
        fetcher: fetcher(),
        mosdns_listen: listen,
        mosdns: Mutex::new(None),
    };
    let cfg = ChainConfig::new(false, true, true);
    tokio::time::timeout(
        Duration::from_secs(10),
        run_chain(&deps, &plan(&cfg), Duration::from_millis(200)),
    )
    .await
    .expect("chain done");
    assert_eq!(
        *log.lock().expect("lock"),
        ["dns up", "rules downloaded via direct", "mosdns started"]
    );
    let seen = origin.seen();
    assert_eq!(
        seen[0].peer.ip(),
        "127.0.0.1".parse::<std::net::IpAddr>().expect("ip")
    );
    // Direct: the connection was this process's own.
    assert!(
        seen.iter().all(|s| s.owner.as_deref() == Some("test")),
        "{seen:?}"
    );
    assert_eq!(
        doubles::dns_a(listen, "blocked.example").await,
        Some(Ipv4Addr::new(198, 51, 100, 1))
    );
}

async fn mosdns_exit(dir: &Path) -> (i32, String) {
    let out = Command::new(doubles_dir().join("fake_mosdns.py"))
        .args(["start", "-c", "config.yaml", "-d"])
        .arg(dir)
        .output()
        .await
        .expect("run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

#[tokio::test]
async fn mosdns_double_is_strict() {
    let dir = tempfile::tempdir().expect("dir");
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    // Missing rule file: fatal.
    std::fs::write(dir.path().join("config.yaml"), mosdns_config(listen)).expect("write");
    let (code, out) = mosdns_exit(dir.path()).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("rules/blocked.txt"), "{out}");
    // Unknown top-level key: fatal.
    std::fs::create_dir_all(dir.path().join("rules")).expect("dir");
    std::fs::write(dir.path().join("rules/blocked.txt"), "full:a.example\n").expect("write");
    std::fs::write(
        dir.path().join("config.yaml"),
        format!("{}servers: []\n", mosdns_config(listen)),
    )
    .expect("write");
    let (code, out) = mosdns_exit(dir.path()).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("invalid keys: servers"), "{out}");
    // A reference to a tag defined later: fatal.
    let cfg = "plugins:\n  - tag: udp\n    type: udp_server\n    args: {entry: main, listen: '127.0.0.1:1'}\n  - tag: main\n    type: sequence\n    args: []\n";
    std::fs::write(dir.path().join("config.yaml"), cfg).expect("write");
    let (code, out) = mosdns_exit(dir.path()).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("'main' not found"), "{out}");

    // Valid: runs, SIGTERM exits 0, SIGHUP kills it (no reload signal).
    std::fs::write(dir.path().join("config.yaml"), mosdns_config(listen)).expect("write");
    for (sig, want) in [
        (nix::sys::signal::Signal::SIGTERM, Some(0)),
        (nix::sys::signal::Signal::SIGHUP, None),
    ] {
        let mut child = start_mosdns(dir.path(), listen).await.expect("start");
        let pid = nix::unistd::Pid::from_raw(child.id().expect("pid") as i32);
        nix::sys::signal::kill(pid, sig).expect("signal");
        let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .expect("exit")
            .expect("wait");
        assert_eq!(status.code(), want, "{sig:?}: {status}");
    }
}
