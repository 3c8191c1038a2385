//! The real mihomo v1.19.2 for tests: where its binary is ([`real_mihomo`],
//! [`mihomo_home`]; the one copy, used by the namespace lab [`crate::gateway_lab`] and
//! by the loopback tests), and a loopback harness around it:
//! * [`RealMihomo`]: mihomo with its controller, a mixed port and a url-test group
//!   `PROXY` (`MATCH,PROXY`) whose members are chosen by [`Members`]: the node, only
//!   `REJECT`, or an HTTP proxy provider (`COMPATIBLE` while it is not loaded);
//! * [`Node`]: the proxy node, a second real mihomo with a SOCKS5 `listeners:` inbound
//!   (TCP and UDP) that dials out directly.
//!
//! The faults are the real program's own: `kill -9` (process exit), SIGSTOP (the API
//! stalls: the kernel still accepts, nothing answers), a dead node (after a delay test
//! `PROXY` keeps `now: node-a` and `alive: true` while `node-a` says `alive: false`),
//! a group of only `REJECT`, and a provider whose URL does not answer (`COMPATIBLE`,
//! which mihomo sends DIRECT). Every port is a free loopback port.

use meduza::clash::api::{MihomoApi, PROBE_TIMEOUT};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

use crate::ports;

/// A free TCP port on loopback (also free for UDP in practice; the OS picks it),
/// never handed out twice in one test process ([`crate::ports`]).
pub fn free_port() -> u16 {
    ports::unique_free_port()
}

/// The real mihomo binary: `MEDUZA_TEST_MIHOMO`, else `MIHOMO_BIN` of
/// `scripts/mihomo-path` (the path's one owner), installed by `scripts/install-deps`.
pub fn real_mihomo() -> PathBuf {
    if let Some(p) = std::env::var_os("MEDUZA_TEST_MIHOMO") {
        return PathBuf::from(p);
    }
    let repo = crate::repo_root();
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(". scripts/mihomo-path && printf %s \"$MIHOMO_BIN\"")
        .current_dir(repo)
        .output()
        .expect("bash");
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).to_string());
    assert!(
        path.is_file(),
        "the real mihomo is not at {path:?}: run scripts/install-deps"
    );
    path
}

/// A home for `mihomo -d DIR` with Country.mmdb in it, as the firmware image has it,
/// so mihomo never tries to download it.
pub fn mihomo_home(dir: &Path) {
    std::fs::create_dir_all(dir).expect("mihomo home");
    let mmdb = real_mihomo().with_file_name("Country.mmdb");
    if mmdb.is_file() {
        std::fs::copy(&mmdb, dir.join("Country.mmdb")).expect("copy Country.mmdb");
    }
}

/// The controller secret of every [`RealMihomo`].
pub const REAL_SECRET: &str = "real-mihomo-test-secret";

/// What the url-test group `PROXY` holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Members {
    /// `node-a`, an inline SOCKS5 proxy: the [`Node`] listening on this loopback port.
    Node(u16),
    /// Only `REJECT`: mihomo keeps the group on it.
    RejectOnly,
    /// The HTTP proxy provider `sub` at this URL (its subscription names the node).
    /// While it is not loaded the group holds mihomo's `COMPATIBLE`.
    Provider(String),
}

/// The subscription a [`Members::Provider`] URL should serve: `node-a` on `port`.
pub fn subscription(port: u16) -> String {
    format!("proxies:\n  - {}\n", node_a(port))
}

fn node_a(port: u16) -> String {
    format!("{{name: node-a, type: socks5, server: 127.0.0.1, port: {port}, udp: true}}")
}

/// Spawns `mihomo -d home -f home/config.yaml` with its output in `home/mihomo.log`.
fn spawn_mihomo(home: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(home.join("mihomo.log"))
        .expect("log file");
    let log2 = log.try_clone().expect("clone");
    Command::new(real_mihomo())
        .arg("-d")
        .arg(home)
        .arg("-f")
        .arg(home.join("config.yaml"))
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the real mihomo")
}

/// Waits until every one of `ports` on 127.0.0.1 accepts; panics with mihomo's log if
/// the process exits first.
async fn wait_listening(child: &mut Child, home: &Path, ports: &[u16]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for port in ports {
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", *port))
                .await
                .is_ok()
            {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(home.join("mihomo.log")).unwrap_or_default();
                panic!("mihomo exited during startup: {status}\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "mihomo in {home:?} never listened on {port}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `kill(2)`.
pub fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid"));
    nix::sys::signal::kill(pid, sig).expect("kill");
}

/// The real mihomo on loopback. Killed on drop (SIGKILL also ends a stopped one).
pub struct RealMihomo {
    pub home: tempfile::TempDir,
    /// `None` once a test took it to wait on it (playing the supervisor).
    pub child: Option<Child>,
    /// The pid of the last spawn.
    pub pid: u32,
    /// `external-controller`.
    pub controller: String,
    pub mixed_port: u16,
    /// The url-test group's `url`.
    pub test_url: String,
}

impl RealMihomo {
    /// Writes the configuration for `members` into a fresh home and starts mihomo;
    /// returns once its controller and mixed port accept. `test_url` must answer
    /// through the node (the harness's origin with a 204 route).
    pub async fn start(members: &Members, test_url: &str) -> Self {
        let home = tempfile::tempdir().expect("tempdir");
        mihomo_home(home.path());
        let mut m = Self {
            home,
            child: None,
            pid: 0,
            controller: format!("127.0.0.1:{}", free_port()),
            mixed_port: free_port(),
            test_url: test_url.to_string(),
        };
        m.write_config(members);
        m.spawn().await;
        m
    }

    pub fn config_path(&self) -> PathBuf {
        self.home.path().join("config.yaml")
    }

    /// The whole configuration with `PROXY` holding `members`.
    pub fn config(&self, members: &Members) -> String {
        let url = &self.test_url;
        let mut cfg = format!(
            "log-level: info\nmode: rule\nmixed-port: {}\nallow-lan: false\n\
             ipv6: false\nfind-process-mode: off\nunified-delay: true\n\
             external-controller: {}\nsecret: {REAL_SECRET}\n",
            self.mixed_port, self.controller
        );
        let group = match members {
            Members::Node(port) => {
                cfg.push_str(&format!("proxies:\n  - {}\n", node_a(*port)));
                "proxies: [node-a]".to_string()
            }
            Members::RejectOnly => "proxies: [REJECT]".to_string(),
            Members::Provider(sub) => {
                cfg.push_str(&format!(
                    "proxy-providers:\n  sub: {{type: http, url: '{sub}', path: ./providers/sub.yaml, interval: 3600, \
                     health-check: {{enable: true, url: '{url}', interval: 300}}}}\n"
                ));
                "use: [sub]".to_string()
            }
        };
        cfg.push_str(&format!(
            "proxy-groups:\n  - {{name: PROXY, type: url-test, {group}, url: '{url}', interval: 300}}\n\
             rules:\n  - MATCH,PROXY\n"
        ));
        cfg
    }

    fn write_config(&self, members: &Members) {
        let tmp = self.home.path().join("config.yaml.tmp");
        std::fs::write(&tmp, self.config(members)).expect("write config");
        std::fs::rename(&tmp, self.config_path()).expect("rename config");
    }

    /// (Re)starts mihomo with `config.yaml` (the last one written or applied); returns
    /// once its controller and mixed port accept.
    pub async fn spawn(&mut self) {
        let mut child = spawn_mihomo(self.home.path());
        let api_port: u16 = self
            .controller
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .expect("controller port");
        wait_listening(&mut child, self.home.path(), &[api_port, self.mixed_port]).await;
        self.pid = child.id().expect("running");
        self.child = Some(child);
    }

    /// Hot reload with `PROXY` holding `members`: rewrites `config.yaml` (so a restart
    /// keeps it) and has mihomo apply it (`PUT /configs?force=true {"path": ...}`).
    pub async fn apply(&self, members: &Members) {
        self.write_config(members);
        self.api()
            .reload_path(&self.config_path())
            .await
            .expect("PUT /configs");
    }

    /// A client of its controller with the probe timeout.
    pub fn api(&self) -> MihomoApi {
        MihomoApi::new(&self.controller, REAL_SECRET, PROBE_TIMEOUT).expect("client")
    }

    /// `kill(2)` of the running mihomo.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        signal(self.pid, sig);
    }

    /// The mixed port as a proxy URL.
    pub fn proxy_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.mixed_port)
    }

    /// mihomo's log so far: at `info` it names each connection, its rule and the proxy
    /// it used (`[TCP] 127.0.0.1:P --> 127.0.0.1:Q match Match using PROXY[node-a]`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.home.path().join("mihomo.log")).unwrap_or_default()
    }
}

/// The proxy node: a real mihomo with a SOCKS5 inbound on a free loopback port, in
/// `mode: direct`. Killed on drop.
pub struct Node {
    pub home: tempfile::TempDir,
    pub port: u16,
    pub child: Option<Child>,
}

impl Node {
    pub async fn start() -> Self {
        let home = tempfile::tempdir().expect("tempdir");
        mihomo_home(home.path());
        let port = free_port();
        std::fs::write(
            home.path().join("config.yaml"),
            format!(
                "log-level: info\nmode: direct\nipv6: false\nfind-process-mode: off\n\
                 listeners:\n  - {{name: socks-in, type: socks, listen: 127.0.0.1, port: {port}, udp: true}}\n"
            ),
        )
        .expect("node config");
        let mut node = Self {
            home,
            port,
            child: None,
        };
        node.restart().await;
        node
    }

    /// Starts the node (again, on the same port); returns once its inbound accepts.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "the node already runs");
        let mut child = spawn_mihomo(self.home.path());
        wait_listening(&mut child, self.home.path(), &[self.port]).await;
        self.child = Some(child);
    }

    /// SIGKILL: its port refuses from now on.
    pub async fn kill(&mut self) {
        let mut child = self.child.take().expect("the node runs");
        child.kill().await.expect("kill the node");
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(Child::id)
            .expect("the node runs")
    }

    /// `node-a` in a url-test group: this node.
    pub fn members(&self) -> Members {
        Members::Node(self.port)
    }

    /// The node's log: at `info` one line per connection it carried
    /// (`[TCP] 127.0.0.1:P --> 127.0.0.1:Q using DIRECT`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.home.path().join("mihomo.log")).unwrap_or_default()
    }
}
