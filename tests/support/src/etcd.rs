//! A real etcd for integration tests: Debian's `etcd` on free loopback ports with a
//! temporary data dir, which tests can kill, restart, pause (SIGSTOP), compact,
//! put behind authentication, or serve over TLS with certificates made by `openssl`.
//! Dropping it kills the process. A missing `etcd`/`etcdctl`/`openssl` fails the
//! test (scripts/test installs them); it never skips.
//!
//! [`CutProxy`] sits between a client and etcd and can cut the client off while the
//! test keeps talking to etcd directly, to change history behind a watcher's back.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meduza::etcd::{EtcdConfig, EtcdTimeouts};

/// Sends the code's tracing output to the test's captured output (shown on failure
/// or with `--nocapture`); `RUST_LOG` filters it (default `meduza=debug`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("meduza=debug"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .with_ansi(false)
        .try_init();
}

/// How to start the server.
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    /// Serve clients over TLS with a fresh CA; clients must present a certificate.
    pub tls: bool,
    /// `--auth-token-ttl` in seconds (etcd's default is 300).
    pub auth_token_ttl: Option<u32>,
}

/// Files of the test PKI.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// A running etcd.
pub struct TestEtcd {
    /// The member name, unique per server, so a start can check that the server
    /// answering on its port is this one and not a neighbour's.
    name: String,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    opts: EtcdOptions,
    tls: Option<TlsFiles>,
    child: Option<Child>,
    /// root credentials once auth is enabled (etcdctl needs them).
    root: Option<(String, String)>,
    /// The non-root user made for the daemon by [`TestEtcd::enable_auth`].
    user: Option<(String, String)>,
}

/// Fails the test with the way to install `program` when it is not on `PATH`.
pub(crate) fn require(program: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{program}` is not installed; run scripts/test (it installs etcd-server, etcd-client, openssl)"
    );
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl TestEtcd {
    /// A plain etcd (http, no auth).
    pub fn start() -> Self {
        Self::start_with(EtcdOptions::default())
    }

    pub fn start_with(opts: EtcdOptions) -> Self {
        init_tracing();
        require("etcd");
        require("etcdctl");
        let dir = tempfile::Builder::new()
            .prefix(&format!("meduza-etcd-{}-", std::process::id()))
            .tempdir()
            .expect("temp dir");
        let tls = opts.tls.then(|| make_pki(dir.path()));
        let client_port = crate::ports::unique_free_port();
        let peer_port = crate::ports::unique_free_port();
        let mut etcd = TestEtcd {
            name: format!("meduza-test-{client_port}"),
            dir,
            client_port,
            peer_port,
            opts,
            tls,
            child: None,
            root: None,
            user: None,
        };
        etcd.spawn();
        etcd
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// `http(s)://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.client_port)
    }

    /// The client address, for a proxy in front of it.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// The daemon's connection settings for this server (TLS files and the daemon's
    /// user when set up), with short timeouts so failures show quickly in tests.
    pub fn config(&self) -> EtcdConfig {
        self.config_for(&self.endpoint())
    }

    /// Like [`TestEtcd::config`] but for another endpoint (a proxy).
    pub fn config_for(&self, endpoint: &str) -> EtcdConfig {
        let (ca, cert, key) = match &self.tls {
            Some(t) => (
                Some(t.ca.clone()),
                Some(t.client_cert.clone()),
                Some(t.client_key.clone()),
            ),
            None => (None, None, None),
        };
        let (user, pass) = match &self.user {
            Some((u, p)) => (Some(u.clone()), Some(p.clone())),
            None => (None, None),
        };
        let mut cfg =
            EtcdConfig::build(endpoint, ca, cert, key, user, pass).expect("valid test config");
        cfg.timeouts = EtcdTimeouts {
            connect: Duration::from_secs(1),
            request: Duration::from_secs(2),
            keep_alive_interval: Duration::from_secs(2),
            keep_alive_timeout: Duration::from_secs(2),
        };
        cfg
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("etcd log file");
        let client_url = self.endpoint();
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new("etcd");
        cmd.args(crate::etcd_args::etcd_args(
            &self.name,
            &self.dir.path().join("data"),
            &client_url,
            &peer_url,
        ))
        .arg("--logger")
        .arg("zap")
        .arg("--log-outputs")
        .arg("stderr")
        .arg("--auth-token")
        .arg("simple");
        if let Some(ttl) = self.opts.auth_token_ttl {
            cmd.arg("--auth-token-ttl").arg(ttl.to_string());
        }
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        let child = cmd.spawn().expect("spawn etcd");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self
                .etcdctl_cmd(&["--command-timeout=1s", "endpoint", "health"])
                .output()
                .expect("run etcdctl");
            if out.status.success() {
                let members = self
                    .etcdctl_cmd(&["--command-timeout=1s", "member", "list"])
                    .output();
                let ours = members
                    .map(|m| {
                        String::from_utf8_lossy(&m.stdout).contains(&format!(", {}, ", self.name))
                    })
                    .unwrap_or(false);
                assert!(
                    ours,
                    "the etcd answering on {} is not ours ({}); log:\n{}",
                    self.endpoint(),
                    self.name,
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "etcd exited with {status} during start; log:\n{}",
                        std::fs::read_to_string(self.log_path()).unwrap_or_default()
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "etcd not healthy after 20 s: {}\nlog:\n{}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(self.log_path()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The pid of the running server.
    pub fn pid(&self) -> i32 {
        let child = self.child.as_ref().expect("etcd is running");
        i32::try_from(child.id()).expect("pid fits i32")
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Resume first in case it was paused; a stopped process dies on SIGKILL
            // anyway, this only keeps the reaping prompt.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kill (if running) and start again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Start again after [`TestEtcd::kill`].
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "etcd is still running");
        self.spawn();
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig)
            .unwrap_or_else(|e| panic!("kill -{sig} etcd: {e}"));
    }

    /// SIGSTOP: the server keeps its sockets but answers nothing.
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// SIGCONT after [`TestEtcd::pause`].
    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn etcdctl_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.endpoint());
        if let Some(t) = &self.tls {
            cmd.arg("--cacert")
                .arg(&t.ca)
                .arg("--cert")
                .arg(&t.client_cert)
                .arg("--key")
                .arg(&t.client_key);
        }
        if let Some((u, p)) = &self.root {
            cmd.arg("--user").arg(format!("{u}:{p}"));
        }
        cmd.args(args);
        cmd
    }

    /// Runs etcdctl (as root once auth is on); panics on failure; returns stdout.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        let out = run(&mut self.etcdctl_cmd(args));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes a key with etcdctl (a writer independent of the code under test).
    pub fn put(&self, key: &str, value: &str) {
        self.etcdctl(&["put", key, value]);
    }

    /// The current store revision.
    pub fn revision(&self) -> i64 {
        let out = self.etcdctl(&["get", "/", "--prefix", "--keys-only", "-w", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
        v["header"]["revision"].as_i64().expect("header.revision")
    }

    /// Compacts the history up to `revision`, physically.
    pub fn compact(&self, revision: i64) {
        self.etcdctl(&["compaction", "--physical", &revision.to_string()]);
    }

    /// Creates `root` and a user with read/write on every key, then enables auth.
    /// Afterwards [`TestEtcd::config`] carries the user.
    pub fn enable_auth(&mut self, user: &str, pass: &str) {
        let root_pass = "root-secret";
        self.etcdctl(&["role", "add", "root"]);
        self.etcdctl(&["user", "add", &format!("root:{root_pass}")]);
        self.etcdctl(&["user", "grant-role", "root", "root"]);
        self.etcdctl(&["role", "add", "meduza"]);
        self.etcdctl(&[
            "role",
            "grant-permission",
            "meduza",
            "readwrite",
            "--from-key",
            "",
        ]);
        self.etcdctl(&["user", "add", &format!("{user}:{pass}")]);
        self.etcdctl(&["user", "grant-role", user, "meduza"]);
        self.etcdctl(&["auth", "enable"]);
        self.root = Some(("root".into(), root_pass.into()));
        self.user = Some((user.into(), pass.into()));
    }

    /// Turns auth off and on again, which drops every issued token.
    pub fn cycle_auth(&self) {
        self.etcdctl(&["auth", "disable"]);
        // etcdctl has no credentials to send while auth is off; that is fine.
        self.etcdctl(&["auth", "enable"]);
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_ref() {
            if let Ok(pid) = i32::try_from(child.id()) {
                // A paused server must not outlive the test.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGCONT,
                );
            }
        }
        self.kill();
    }
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client certificate.
fn make_pki(dir: &Path) -> TlsFiles {
    require("openssl");
    let ca = crate::pki::Ca::new(dir, "ca");
    let (server_cert, server_key) = ca.issue("server", "serverAuth", "IP:127.0.0.1,DNS:localhost");
    let (client_cert, client_key) = ca.issue("client", "clientAuth", "");
    TlsFiles {
        ca: ca.cert,
        server_cert,
        server_key,
        client_cert,
        client_key,
    }
}

/// A TCP proxy that can cut its clients off: while cut, open connections are closed
/// and new ones are dropped at once.
pub struct CutProxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    /// Listens on a free loopback port and forwards to `target`. Needs a tokio runtime.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (cut2, conns2) = (cut.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if cut2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns2.lock().expect("proxy lock").push(task);
            }
        });
        CutProxy {
            addr,
            cut,
            conns,
            accept,
        }
    }

    /// `http://127.0.0.1:<port>` of the proxy.
    pub fn endpoint(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }

    /// Cuts every client off (`true`) or lets them connect again (`false`).
    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
        if cut {
            for t in self.conns.lock().expect("proxy lock").drain(..) {
                t.abort();
            }
        }
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for t in self.conns.lock().expect("proxy lock").drain(..) {
            t.abort();
        }
    }
}
