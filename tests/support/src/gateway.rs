//! One gateway under test: the real `meduza run` binary inside a gateway namespace of
//! a [`Mesh`], with its own `MEDUZA_ROOT`, state directory, FRR pathspace, a LAN (a
//! veth pair `lan0`/`lan0p` with `10.5<i>.0.1/24`) and a log file that every run of
//! the gateway appends to. Dropping it kills meduza and whatever still runs in the
//! namespace and removes the FRR pathspace directories. Needs root.

use crate::mesh::{ns_sh, ns_try, sh, wait_for, Mesh, NsEtcd};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A gateway namespace and its meduza process.
pub struct Gateway {
    pub index: usize,
    pub node: String,
    pub ns: String,
    pub root: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
    pub pathspace: String,
    pub endpoint: String,
    /// Extra environment of the next `start` (on top of the defaults).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    runs: usize,
}

/// The LAN of gateway `i`.
pub fn lan(i: usize) -> String {
    format!("10.5{i}.0.0/24")
}

/// The tinc (overlay) address of gateway `i`.
pub fn overlay_ip(i: usize) -> String {
    format!("10.200.0.{}", i + 1)
}

impl Gateway {
    /// Prepare gateway `i` of `mesh` (directories, LAN, FRR pathspace); not started.
    pub fn new(mesh: &Mesh, i: usize, endpoint: &str) -> Self {
        let dir = mesh.path(&format!("gw{i}"));
        let root = dir.join("root");
        let state = dir.join("state");
        std::fs::create_dir_all(&root).expect("root dir");
        let ns = mesh.gateways[i].clone();
        ns_sh(
            &ns,
            &[
                "ip", "link", "add", "lan0", "type", "veth", "peer", "name", "lan0p",
            ],
        );
        ns_sh(
            &ns,
            &[
                "ip",
                "addr",
                "add",
                &format!("10.5{i}.0.1/24"),
                "dev",
                "lan0",
            ],
        );
        ns_sh(&ns, &["ip", "link", "set", "lan0", "up"]);
        ns_sh(&ns, &["ip", "link", "set", "lan0p", "up"]);
        let pathspace = format!("mz{}g{i}", mesh.tag);
        let gw = Self {
            index: i,
            node: format!("gw{i}"),
            ns,
            root,
            state,
            log: dir.join("meduza.log"),
            pathspace,
            endpoint: endpoint.to_string(),
            env: Vec::new(),
            child: None,
            runs: 0,
        };
        // FRR daemons started with `-N <pathspace>` keep their sockets in
        // /var/run/frr/<pathspace> and vtysh reads /etc/frr/<pathspace>; both must
        // belong to user frr.
        for d in gw.frr_dirs() {
            std::fs::create_dir_all(&d).expect("frr dir");
            sh(&["chown", "frr:frr", &d.display().to_string()]);
        }
        gw
    }

    fn frr_dirs(&self) -> [PathBuf; 2] {
        [
            PathBuf::from(format!("/var/run/frr/{}", self.pathspace)),
            PathBuf::from(format!("/etc/frr/{}", self.pathspace)),
        ]
    }

    /// Start `meduza run` (appending to the log, after a `=== run N ===` marker).
    /// Gateway `i` started against `etcd`, once it has applied revision `rev`
    /// (within 20 s).
    pub fn applied(mesh: &Mesh, i: usize, etcd: &NsEtcd, rev: i64) -> Self {
        let mut gw = Self::new(mesh, i, &etcd.endpoint);
        gw.start();
        gw.wait_applied(etcd, rev, Duration::from_secs(20));
        gw
    }

    /// A per-service counter from the node API's `/metrics`, read inside the
    /// gateway's namespace with the API token `token`.
    pub fn service_metric(&self, token: &str, name: &str, svc: &str) -> Option<u64> {
        let out = ns_try(
            &self.ns,
            &[
                "curl",
                "-sf",
                "-H",
                &format!("Authorization: Bearer {token}"),
                "http://127.0.0.1:9100/metrics",
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let prefix = format!("{name}{{service=\"{svc}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.node);
        self.runs += 1;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        writeln!(log, "=== run {} ===", self.runs).expect("log marker");
        let err = log.try_clone().expect("log fd");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(crate::meduza_bin())
            .arg("run")
            .env("NODE_ID", &self.node)
            .env("ETCD_ENDPOINTS", &self.endpoint)
            .env("MEDUZA_ROOT", &self.root)
            .env("MEDUZA_STATE_DIR", &self.state)
            .env("MEDUZA_DNS_LISTEN", "127.0.0.1:53")
            .env("MEDUZA_API_LISTEN", "127.0.0.1:9100")
            .env("MEDUZA_DATAPLANE", "off")
            .env("MEDUZA_FRR_PATHSPACE", &self.pathspace)
            .env("MEDUZA_LEASE_TTL", "3")
            .env("MEDUZA_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        // `ip netns exec` execs the program: the child's pid is meduza's.
        self.child = Some(cmd.spawn().expect("spawn meduza run"));
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("meduza running").id()
    }

    /// SIGTERM and wait for the exit (panics after `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        crate::process::terminate(self.child.take().expect("meduza running"), timeout)
    }

    /// SIGKILL meduza (its children are left running, as after a crash).
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("meduza running");
        child.kill().expect("SIGKILL meduza");
        child.wait().expect("reap meduza");
    }

    /// Kill every process of the namespace (after [`Self::kill9`]).
    pub fn kill_all(&self) {
        for (pid, _) in self.procs() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        wait_for("namespace to be empty", Duration::from_secs(5), || {
            self.procs().is_empty().then_some(())
        });
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log of the current (last) run only.
    pub fn run_log(&self) -> String {
        let text = self.log_text();
        let marker = format!("=== run {} ===", self.runs);
        match text.find(&marker) {
            Some(at) => text[at..].to_string(),
            None => text,
        }
    }

    /// Processes in the namespace: (pid, command line).
    pub fn procs(&self) -> Vec<(u32, String)> {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.ns])
            .output()
            .expect("ip netns pids");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
            .filter_map(|pid| {
                let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
                Some((pid, cmd.trim().to_string()))
            })
            .collect()
    }

    /// Pid of the one process (other than meduza) whose command line contains `needle`.
    pub fn pid_of(&self, needle: &str) -> Option<u32> {
        let hits: Vec<u32> = self
            .procs()
            .into_iter()
            .filter(|(_, cmd)| cmd.contains(needle) && !cmd.contains("meduza run"))
            .map(|(pid, _)| pid)
            .collect();
        assert!(
            hits.len() <= 1,
            "several processes match {needle:?}: {hits:?}"
        );
        hits.first().copied()
    }

    /// Wait for the process matching `needle` and return its pid.
    pub fn wait_pid(&self, needle: &str, timeout: Duration) -> u32 {
        wait_for(
            &format!("{needle} running in {}", self.node),
            timeout,
            || self.pid_of(needle),
        )
    }

    /// `/updated/<node>/<suffix>`.
    pub fn status(&self, etcd: &NsEtcd, suffix: &str) -> Option<String> {
        etcd.get(&format!("/updated/{}/{suffix}", self.node))
    }

    /// The revision in `/updated/<node>/applied`.
    pub fn applied_revision(&self, etcd: &NsEtcd) -> Option<i64> {
        self.status(etcd, "applied")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// Wait until `applied` reaches `revision`.
    pub fn wait_applied(&self, etcd: &NsEtcd, revision: i64, timeout: Duration) {
        let start = Instant::now();
        while self.applied_revision(etcd).is_none_or(|r| r < revision) {
            if start.elapsed() > timeout {
                let log = self.run_log();
                let mut tail: Vec<&str> = log.lines().rev().take(60).collect();
                tail.reverse();
                panic!(
                    "timed out after {timeout:?} waiting for {} to apply revision {revision} \
                     (applied: {:?}); log tail:\n{}",
                    self.node,
                    self.status(etcd, "applied"),
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `vtysh -N <pathspace> -c <command>` inside the namespace.
    pub fn vtysh(&self, command: &str) -> String {
        let out = ns_try(&self.ns, &["vtysh", "-N", &self.pathspace, "-c", command]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// One more link in the namespace: a veth pair `dev`/`<dev>p`, both up, with
    /// `addr` (`a.b.c.d/len`) on `dev`, for an extra LAN or a stub network.
    pub fn add_link(&self, dev: &str, addr: &str) {
        let peer = format!("{dev}p");
        ns_sh(
            &self.ns,
            &[
                "ip", "link", "add", dev, "type", "veth", "peer", "name", &peer,
            ],
        );
        ns_sh(&self.ns, &["ip", "addr", "add", addr, "dev", dev]);
        ns_sh(&self.ns, &["ip", "link", "set", dev, "up"]);
        ns_sh(&self.ns, &["ip", "link", "set", &peer, "up"]);
    }

    /// `vtysh -N <pathspace> -c <command>` parsed as JSON (`Null` when vtysh printed
    /// nothing or no JSON, e.g. while a daemon is still starting).
    pub fn vtysh_json(&self, command: &str) -> serde_json::Value {
        serde_json::from_str(&self.vtysh(command)).unwrap_or(serde_json::Value::Null)
    }

    /// The host path of a file meduza writes (`/etc/...` inside its root).
    pub fn file(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// Every file under the root's `/etc` with its content (to prove nothing changed).
    pub fn etc_files(&self) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
        fn walk(dir: &std::path::Path, out: &mut std::collections::BTreeMap<PathBuf, Vec<u8>>) {
            let Ok(rd) = std::fs::read_dir(dir) else {
                return;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else if let Ok(b) = std::fs::read(&p) {
                    out.insert(p, b);
                }
            }
        }
        let mut out = std::collections::BTreeMap::new();
        walk(&self.root.join("etc"), &mut out);
        out
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for (pid, _) in self.procs() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        for d in self.frr_dirs() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Bump `/commit` and return its mod revision.
pub fn commit(etcd: &NsEtcd) -> i64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    etcd.put("/commit", &format!("test-{}-{n}", std::process::id()));
    mod_revision(etcd, "/commit")
}

/// The mod revision of `key` (0 when absent).
pub fn mod_revision(etcd: &NsEtcd, key: &str) -> i64 {
    let out = etcd.ctl(&["get", key, "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
    v["kvs"][0]["mod_revision"].as_i64().unwrap_or(0)
}

/// The store's current revision.
pub fn current_revision(etcd: &NsEtcd) -> i64 {
    let out = etcd.ctl(&["get", "/", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
    v["header"]["revision"].as_i64().expect("header revision")
}

/// Services in the order of their first `service started` line in `log`.
pub fn start_order(log: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in log.lines().filter(|l| l.contains("service started")) {
        if let Some(svc) = field(line, "svc") {
            if !out.contains(&svc) {
                out.push(svc);
            }
        }
    }
    out
}

/// Services in the order of their `service stopped` lines after `stopping all services`.
pub fn stop_order(log: &str) -> Vec<String> {
    let Some(at) = log.find("stopping all services") else {
        return Vec::new();
    };
    log[at..]
        .lines()
        .filter(|l| l.contains("service stopped"))
        .filter_map(|l| field(l, "svc"))
        .collect()
}

/// The value of `name=value` in a log line.
pub fn field(line: &str, name: &str) -> Option<String> {
    let key = format!(" {name}=");
    let at = line.find(&key)? + key.len();
    let rest = &line[at..];
    let end = rest.find(' ').unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"').to_string())
}

/// Seconds since `t`, for progress messages.
pub fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// Starts every gateway of `gws`, then waits until each has applied revision `rev`
/// with no errors ([`wait_all_applied`]).
pub fn start_all(gws: &mut [Gateway], etcd: &NsEtcd, rev: i64) {
    for g in gws.iter_mut() {
        g.start();
    }
    wait_all_applied(gws, etcd, rev);
}

/// Waits until each of `gws` has applied revision `rev` (20 s each) and publishes
/// `errors` = `[]`.
pub fn wait_all_applied(gws: &[Gateway], etcd: &NsEtcd, rev: i64) {
    for g in gws {
        g.wait_applied(etcd, rev, Duration::from_secs(20));
        assert_eq!(
            g.status(etcd, "errors").as_deref(),
            Some("[]"),
            "{} applied {rev} with errors",
            g.node
        );
    }
}
