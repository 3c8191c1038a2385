//! A real 3-member etcd cluster on loopback for the cluster tests, and a real
//! `meduza run` pointed at it.
//!
//! [`Cluster`] starts Debian's `etcd` as separate processes on unique loopback ports
//! (heartbeat 100 ms, election timeout 1 s: what an operator would configure), with
//! their data on tmpfs (`/dev/shm` when present) so other builds' disk traffic on the
//! shared development machine does not turn into fsync stalls the test would blame on
//! failover. Members can be killed, restarted, frozen (SIGSTOP), replaced (member
//! remove, member add with a new data dir on the same client URL), and the leader
//! and the member holding a watch stream are found from each member's `/metrics`.
//! Test-side reads and writes go through one etcd-client `Client` per member to the
//! members the test left running, independent of the failover under test.
//!
//! [`Gateway`] runs the `meduza` binary with the data plane off, its DNS and API on
//! free loopback ports, `MEDUZA_ROOT`/`MEDUZA_STATE_DIR` in a temp dir (tmpfs too) and every
//! member in `ETCD_ENDPOINTS`. Dropping either kills its processes. A missing `etcd`
//! or `etcdctl` fails the test.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::Client;

use crate::etcd::require;

/// One member: its process and where it lives.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    paused: bool,
}

impl Member {
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    fn pid(&self) -> Option<i32> {
        self.child.as_ref().and_then(|c| i32::try_from(c.id()).ok())
    }
}

/// A running cluster.
pub struct Cluster {
    dir: tempfile::TempDir,
    token: String,
    members: Vec<Member>,
    /// Replacement members get fresh names.
    generation: usize,
    rt: tokio::runtime::Runtime,
}

/// A runtime for the test's own etcd calls (the tests themselves are synchronous).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// tmpfs (`/dev/shm`) when the machine has it, else the temp dir.
fn scratch_base() -> PathBuf {
    if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    }
}

/// `GET path` over HTTP/1.0 with short timeouts (etcd serves `/metrics` on its client
/// URL); `None` when the member does not answer.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(700))).ok()?;
    s.set_write_timeout(Some(Duration::from_millis(300))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// The value of an unlabelled gauge in Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

impl Cluster {
    /// Starts `n` members and waits until every one answers a linearizable read.
    pub fn start(n: usize) -> Self {
        require("etcd");
        require("etcdctl");
        let dir = tempfile::Builder::new()
            .prefix(&format!("meduza-cluster-{}-", std::process::id()))
            .tempdir_in(scratch_base())
            .expect("cluster temp dir");
        let token = format!(
            "meduza-test-{}-{}",
            std::process::id(),
            crate::ports::unique_free_port()
        );
        let members = (0..n)
            .map(|i| {
                let client_port = crate::ports::unique_free_port();
                Member {
                    name: format!("m{i}-{client_port}"),
                    client_port,
                    peer_port: crate::ports::unique_free_port(),
                    data: dir.path().join(format!("m{i}.data")),
                    log: dir.path().join(format!("m{i}.log")),
                    child: None,
                    paused: false,
                }
            })
            .collect();
        let mut c = Cluster {
            dir,
            token,
            members,
            generation: 0,
            rt: runtime(),
        };
        let initial = c.initial_cluster();
        for i in 0..n {
            c.spawn(i, &initial, "new");
        }
        c.wait_healthy(Duration::from_secs(30));
        c
    }

    /// How many members the cluster has.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Every client URL, comma-separated (what `ETCD_ENDPOINTS` gets).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(Member::endpoint)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn endpoint(&self, i: usize) -> String {
        self.members[i].endpoint()
    }

    pub fn name(&self, i: usize) -> &str {
        &self.members[i].name
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.members[i].log).unwrap_or_default()
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize, initial_cluster: &str, state: &str) {
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .expect("member log");
        let child = Command::new("etcd")
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data)
            .args(["--listen-client-urls", &m.endpoint()])
            .args(["--advertise-client-urls", &m.endpoint()])
            .args(["--listen-peer-urls", &m.peer_url()])
            .args(["--initial-advertise-peer-urls", &m.peer_url()])
            .args(["--initial-cluster", initial_cluster])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", &self.token])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        let m = &mut self.members[i];
        m.child = Some(child);
        m.paused = false;
    }

    /// Whether member `i` runs and is not frozen.
    pub fn is_live(&self, i: usize) -> bool {
        let m = &self.members[i];
        m.child.is_some() && !m.paused
    }

    /// The members the test left running and unfrozen.
    pub fn live(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| self.is_live(i))
            .collect()
    }

    /// SIGKILL member `i` and reap it.
    pub fn kill(&mut self, i: usize) {
        let m = &mut self.members[i];
        if let Some(mut child) = m.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        m.paused = false;
    }

    /// Start member `i` again on its ports and data after [`Cluster::kill`].
    pub fn start_again(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} still runs");
        let initial = self.initial_cluster();
        // With a data dir, etcd ignores the initial-cluster flags and rejoins.
        self.spawn(i, &initial, "existing");
    }

    fn signal(&self, i: usize, sig: nix::sys::signal::Signal) {
        let pid = self.members[i].pid().expect("member runs");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
            .unwrap_or_else(|e| panic!("kill -{sig} member {i}: {e}"));
    }

    /// SIGSTOP: the member keeps its sockets and answers nothing.
    pub fn pause(&mut self, i: usize) {
        self.signal(i, nix::sys::signal::Signal::SIGSTOP);
        self.members[i].paused = true;
    }

    /// SIGCONT after [`Cluster::pause`].
    pub fn resume(&mut self, i: usize) {
        self.signal(i, nix::sys::signal::Signal::SIGCONT);
        self.members[i].paused = false;
    }

    /// A member's `/metrics`, if it answers.
    pub fn metrics(&self, i: usize) -> Option<String> {
        if !self.is_live(i) {
            return None;
        }
        http_get(self.members[i].client_port, "/metrics")
    }

    /// The live member that is the leader, if one is.
    pub fn leader(&self) -> Option<usize> {
        self.live().into_iter().find(|&i| {
            self.metrics(i)
                .and_then(|t| metric(&t, "etcd_server_is_leader"))
                == Some(1.0)
        })
    }

    /// The leader, waiting up to `within` for an election.
    pub fn wait_leader(&self, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.leader() {
                return l;
            }
            assert!(Instant::now() < deadline, "no leader within {within:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// How many Range requests member `i` answered (`grpc_server_handled_total`),
    /// if it answers: which member a client's reads go to.
    pub fn ranges_served(&self, i: usize) -> Option<f64> {
        let text = self.metrics(i)?;
        Some(
            text.lines()
                .filter(|l| {
                    l.starts_with("grpc_server_handled_total{")
                        && l.contains("grpc_method=\"Range\"")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum(),
        )
    }

    /// The live members holding at least one watch stream (the test itself never
    /// watches, so these are the gateway's).
    pub fn watch_members(&self) -> Vec<usize> {
        self.live()
            .into_iter()
            .filter(|&i| {
                self.metrics(i)
                    .and_then(|t| metric(&t, "etcd_debugging_mvcc_watch_stream_total"))
                    .is_some_and(|n| n >= 1.0)
            })
            .collect()
    }

    /// The one member holding the gateway's watch, waiting up to `within` until
    /// exactly one does (a stream left on a member is closed by the member shortly
    /// after the gateway moved away).
    pub fn wait_watch_member(&self, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let found = self.watch_members();
            if let [one] = found.as_slice() {
                return *one;
            }
            assert!(
                Instant::now() < deadline,
                "no single member holds the watch within {within:?}: {found:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A linearizable read on member `i` (`Err` when it does not answer in time).
    pub fn get_on(&self, i: usize, key: &str, timeout: Duration) -> Result<Option<String>, String> {
        let endpoint = self.endpoint(i);
        self.rt.block_on(async {
            let mut c = Client::connect([endpoint.as_str()], None)
                .await
                .map_err(|e| e.to_string())?;
            match tokio::time::timeout(timeout, c.get(key, None)).await {
                Ok(Ok(r)) => Ok(r
                    .kvs()
                    .first()
                    .map(|kv| kv.value_str().unwrap_or_default().to_owned())),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timed out".into()),
            }
        })
    }

    /// A read through whichever live member answers first, retried (elections)
    /// until `within` runs out.
    pub fn get(&self, key: &str, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        loop {
            for i in self.live() {
                if let Ok(v) = self.get_on(i, key, Duration::from_millis(800)) {
                    return v;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no member answered a read of {key}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A write through the leader as soon as there is one (after a failure, as soon
    /// as the cluster can take writes again), retried until `within` runs out;
    /// returns the revision of the write.
    pub fn put(&self, key: &str, value: &str, within: Duration) -> i64 {
        let deadline = Instant::now() + within;
        let mut last = String::new();
        loop {
            if let Some(i) = self.leader() {
                let endpoint = self.endpoint(i);
                let res = self.rt.block_on(async {
                    let mut c = Client::connect([endpoint.as_str()], None)
                        .await
                        .map_err(|e| e.to_string())?;
                    match tokio::time::timeout(Duration::from_millis(1000), c.put(key, value, None))
                        .await
                    {
                        Ok(Ok(r)) => Ok(r.header().map(|h| h.revision()).unwrap_or_default()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("timed out".to_owned()),
                    }
                });
                match res {
                    Ok(rev) => return rev,
                    Err(e) => last = format!("{endpoint}: {e}"),
                }
            }
            assert!(
                Instant::now() < deadline,
                "no member took the write of {key} within {within:?}: {last}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Makes another member the leader if member `i` is (`etcdctl move-leader`), so
    /// that failing `i` afterwards loses a follower only.
    pub fn move_leader_off(&self, i: usize) {
        if self.leader() != Some(i) {
            return;
        }
        let to = (0..self.members.len())
            .find(|&j| j != i && self.is_live(j))
            .expect("another live member");
        let id = self.member_id(&self.members[to].name);
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoint(i), "--command-timeout=5s"])
            .args(["move-leader", &id])
            .output()
            .expect("run etcdctl");
        assert!(
            out.status.success(),
            "etcdctl move-leader {id} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.leader() != Some(to) {
            assert!(
                Instant::now() < deadline,
                "leadership did not move to member {to}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until every member answers a linearizable read (and so has a leader
    /// and has caught up enough to serve).
    pub fn wait_healthy(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let sick: Vec<usize> = (0..self.members.len())
                .filter(|&i| {
                    !self.is_live(i) || self.get_on(i, "/", Duration::from_millis(800)).is_err()
                })
                .collect();
            if sick.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = sick
                    .iter()
                    .map(|&i| {
                        let log = self.log(i);
                        let tail: Vec<&str> = log.lines().rev().take(15).collect();
                        format!(
                            "member {i}:\n{}",
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                        )
                    })
                    .collect();
                panic!(
                    "members {sick:?} not healthy within {within:?}\n{}",
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `etcdctl` against the live members; panics on failure.
    fn etcdctl(&self, args: &[&str]) -> String {
        self.try_etcdctl(args)
            .unwrap_or_else(|e| panic!("etcdctl {args:?} failed: {e}"))
    }

    /// `etcdctl` against the live members: stdout, or stderr on failure.
    fn try_etcdctl(&self, args: &[&str]) -> Result<String, String> {
        let endpoints = self
            .live()
            .into_iter()
            .map(|i| self.endpoint(i))
            .collect::<Vec<_>>()
            .join(",");
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &endpoints, "--command-timeout=5s"])
            .args(args)
            .output()
            .expect("run etcdctl");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// The hex id of the member named `name` (`etcdctl member list`).
    fn member_id(&self, name: &str) -> String {
        let list = self.etcdctl(&["member", "list"]);
        list.lines()
            .find(|l| l.split(", ").nth(2) == Some(name))
            .and_then(|l| l.split(", ").next())
            .unwrap_or_else(|| panic!("member {name} not in\n{list}"))
            .to_owned()
    }

    /// Replaces member `i` as an operator replaces a failed box (etcd's runtime
    /// reconfiguration guide): it is killed (the failure), removed from the cluster,
    /// and a new member with a new name, peer port and empty data dir is added and
    /// started on the same client URL. `between` runs after each step (the test
    /// writes and measures there).
    pub fn replace(&mut self, i: usize, mut between: impl FnMut(&Cluster, &str)) {
        self.kill(i);
        between(self, "member killed");
        let id = self.member_id(&self.members[i].name);
        self.etcdctl(&["member", "remove", &id]);
        between(self, "member removed");
        self.generation += 1;
        let peer_port = crate::ports::unique_free_port();
        let m = &mut self.members[i];
        m.name = format!("m{i}-{}-r{}", m.client_port, self.generation);
        m.peer_port = peer_port;
        m.data = self
            .dir
            .path()
            .join(format!("m{i}.r{}.data", self.generation));
        let (name, peer) = (m.name.clone(), m.peer_url());
        // etcd refuses to add a member until every voting member has been connected
        // to the others for 5 s ("unhealthy cluster", `isConnectedFullySince`); an
        // operator retries, so does the test.
        let deadline = Instant::now() + Duration::from_secs(20);
        let added = loop {
            match self.try_etcdctl(&["member", "add", &name, "--peer-urls", &peer]) {
                Ok(out) => break out,
                Err(e) if Instant::now() < deadline && e.contains("unhealthy cluster") => {
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => panic!("etcdctl member add {name} failed: {e}"),
            }
        };
        let initial = added
            .lines()
            .find_map(|l| l.strip_prefix("ETCD_INITIAL_CLUSTER="))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_else(|| panic!("no ETCD_INITIAL_CLUSTER in\n{added}"));
        between(self, "member added");
        self.spawn(i, &initial, "existing");
        self.wait_healthy(Duration::from_secs(30));
        between(self, "new member started");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].paused {
                if let Some(pid) = self.members[i].pid() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGCONT,
                    );
                }
            }
            self.kill(i);
        }
    }
}

/// One `meduza run` against a cluster.
pub struct Gateway {
    pub node: String,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Gateway {
    /// Starts `meduza run` as node `node` with every endpoint of `endpoints`.
    pub fn start(node: &str, endpoints: &str, lease_ttl: u32) -> Self {
        // On tmpfs too: the pass fsyncs its last-good snapshot, and on this shared
        // machine other builds' disk traffic turns that into seconds-long stalls
        // that have nothing to do with etcd.
        let dir = tempfile::Builder::new()
            .prefix(&format!("meduza-gw-{}-", std::process::id()))
            .tempdir_in(scratch_base())
            .expect("gateway temp dir");
        let root = dir.path().join("root");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&root).expect("root dir");
        let log = dir.path().join("meduza.log");
        let out = std::fs::File::create(&log).expect("gateway log");
        let dns = crate::ports::unique_free_port();
        let api = crate::ports::unique_free_port();
        let child = Command::new(crate::meduza_bin())
            .arg("run")
            .env("NODE_ID", node)
            .env("ETCD_ENDPOINTS", endpoints)
            .env("MEDUZA_ROOT", &root)
            .env("MEDUZA_STATE_DIR", &state)
            .env("MEDUZA_DNS_LISTEN", format!("127.0.0.1:{dns}"))
            .env("MEDUZA_API_LISTEN", format!("127.0.0.1:{api}"))
            .env("MEDUZA_DATAPLANE", "off")
            .env("MEDUZA_LEASE_TTL", lease_ttl.to_string())
            .env("MEDUZA_LOG", "info,meduza::etcd=debug")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out)
            .spawn()
            .expect("spawn meduza run");
        Gateway {
            node: node.to_owned(),
            dir,
            log,
            child: Some(child),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("meduza runs").id()
    }

    /// Whether meduza still runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let mut tail: Vec<&str> = text.lines().rev().take(n).collect();
        tail.reverse();
        tail.join("\n")
    }

    /// Pids of meduza's children whose command line is exactly `argv`.
    pub fn children(&self, argv: &[&str]) -> Vec<u32> {
        let me = self.pid();
        let want: Vec<u8> = argv
            .iter()
            .flat_map(|a| [a.as_bytes(), b"\0"].concat())
            .collect();
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok() == Some(want.clone()))
            .filter(|pid| {
                // Field 4 of /proc/<pid>/stat is the parent; the name (field 2) may hold
                // spaces, so count from the closing parenthesis.
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|s| {
                        s.rsplit_once(')')?
                            .1
                            .split_whitespace()
                            .nth(1)?
                            .parse::<u32>()
                            .ok()
                    })
                    == Some(me)
            })
            .collect()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // Keep the log of the last run (the temp dir goes away), to read after a
        // failure or to see how the gateway moved between members.
        let keep = crate::target_tmpdir().join(format!("etcd_cluster-{}-meduza.log", self.node));
        if std::fs::copy(&self.log, &keep).is_ok() {
            eprintln!("gateway log kept at {}", keep.display());
        }
        if let Some(mut c) = self.child.take() {
            let pid = c.id();
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(15);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `p`-th percentile (0–100) of `samples` by the nearest-rank method.
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut v = samples.to_vec();
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}
