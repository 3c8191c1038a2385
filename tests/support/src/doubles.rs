//! Shared helpers for the clash integration tests: the mihomo/MosDNS doubles
//! (`tests/support/doubles/*.py`) with free ports and their control file, and a tiny
//! HTTP origin server that records who connected (and, when asked, which process held
//! the connecting socket). The real mihomo and its proxy node are [`crate::real_mihomo`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

pub const SECRET: &str = "test-secret";

/// `tests/support/doubles/`: the doubles' scripts.
pub fn doubles_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("doubles")
}

/// A free TCP port on loopback, never handed out twice in one test process
/// ([`crate::ports`], the one set the real mihomo's ports come from too).
pub fn free_port() -> u16 {
    crate::ports::unique_free_port()
}

fn write_atomic(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

pub struct MihomoOpts {
    pub groups: Vec<&'static str>,
    pub control: serde_json::Value,
    pub outbound_bind: Option<&'static str>,
    pub allow_lan: bool,
}

impl Default for MihomoOpts {
    fn default() -> Self {
        Self {
            groups: vec!["auto"],
            control: serde_json::json!({}),
            outbound_bind: Some("127.0.0.2"),
            allow_lan: false,
        }
    }
}

/// A running mihomo double. Killed on drop.
pub struct FakeMihomo {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub controller: String,
    pub mixed_port: u16,
    pub tproxy_port: u16,
    pub dns_port: u16,
    pub control_path: PathBuf,
    pub config_path: PathBuf,
}

pub fn mihomo_config(
    groups: &[&str],
    mixed: u16,
    tproxy: u16,
    dns: u16,
    ctl: &str,
    allow_lan: bool,
) -> String {
    let mut cfg = [
        format!("mixed-port: {mixed}"),
        format!("tproxy-port: {tproxy}"),
        format!("allow-lan: {allow_lan}"),
        "bind-address: '*'".to_string(),
        format!("external-controller: {ctl}"),
        format!("secret: {SECRET}"),
        "mode: rule".to_string(),
        "dns:".to_string(),
        "  enable: true".to_string(),
        format!("  listen: 127.0.0.1:{dns}"),
        "proxies:".to_string(),
        "  - {name: hk1, type: ss, server: 192.0.2.1, port: 8388, cipher: aes-128-gcm, password: x}".to_string(),
        "  - {name: us1, type: trojan, server: 192.0.2.2, port: 443, password: x, udp: true}".to_string(),
        "proxy-groups:".to_string(),
    ]
    .join("\n");
    cfg.push('\n');
    for g in groups {
        cfg.push_str(&format!(
            "  - {{name: {g}, type: url-test, proxies: [hk1, us1], url: 'http://www.gstatic.com/generate_204', interval: 300}}\n"
        ));
    }
    cfg.push_str(
        "  - {name: select, type: select, proxies: [DIRECT, hk1]}\nrules:\n  - MATCH,DIRECT\n",
    );
    cfg
}

impl FakeMihomo {
    /// A configuration for this instance's ports and controller with proxy groups
    /// `groups` (LAN access off), as a test writes it for a reload.
    pub fn config_with_groups(&self, groups: &[&str]) -> String {
        mihomo_config(
            groups,
            self.mixed_port,
            self.tproxy_port,
            self.dns_port,
            &self.controller,
            false,
        )
    }

    pub async fn start(opts: MihomoOpts) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mixed_port, tproxy_port, dns_port, api_port) =
            (free_port(), free_port(), free_port(), free_port());
        let controller = format!("127.0.0.1:{api_port}");
        let config_path = dir.path().join("config.yaml");
        std::fs::write(
            &config_path,
            mihomo_config(
                &opts.groups,
                mixed_port,
                tproxy_port,
                dns_port,
                &controller,
                opts.allow_lan,
            ),
        )
        .expect("config");
        let control_path = dir.path().join("control.json");
        write_atomic(&control_path, &opts.control.to_string());
        let mut m = Self {
            dir,
            child: None,
            controller,
            mixed_port,
            tproxy_port,
            dns_port,
            control_path,
            config_path,
        };
        m.spawn(opts.outbound_bind).await;
        m
    }

    pub fn command(&self, outbound_bind: Option<&str>) -> Command {
        let mut cmd = Command::new(doubles_dir().join("fake_mihomo.py"));
        cmd.arg("-d")
            .arg(self.dir.path())
            .arg("-f")
            .arg(&self.config_path);
        cmd.env("FAKE_MIHOMO_CONTROL", &self.control_path);
        if let Some(b) = outbound_bind {
            cmd.env("FAKE_MIHOMO_OUTBOUND_BIND", b);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mihomo.log"))
            .expect("log file");
        let log2 = log.try_clone().expect("clone");
        cmd.stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(true);
        cmd
    }

    /// (Re)spawns the double and waits until its API answers.
    pub async fn spawn(&mut self, outbound_bind: Option<&str>) {
        let child = self
            .command(outbound_bind)
            .spawn()
            .expect("spawn fake_mihomo.py (needs /usr/bin/python3 + python3-yaml)");
        self.child = Some(child);
        self.wait_api().await;
    }

    pub async fn wait_api(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if tokio::net::TcpStream::connect(&self.controller)
                .await
                .is_ok()
            {
                return;
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = std::fs::read_to_string(self.dir.path().join("mihomo.log"))
                        .unwrap_or_default();
                    panic!("fake mihomo exited during startup: {status}\n{log}");
                }
            }
            assert!(Instant::now() < deadline, "fake mihomo API never came up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().and_then(Child::id).expect("running")
    }

    /// Writes the control file; the double polls it every 20 ms, so wait a bit longer.
    pub async fn control(&self, value: serde_json::Value) {
        write_atomic(&self.control_path, &value.to_string());
        tokio::time::sleep(Duration::from_millis(60)).await;
    }

    /// Writes the control file without waiting (for timing measurements).
    pub fn control_now(&self, value: serde_json::Value) {
        write_atomic(&self.control_path, &value.to_string());
    }

    pub fn proxy_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.mixed_port)
    }
}

/// One request seen by the origin server.
#[derive(Debug, Clone)]
pub struct Seen {
    pub peer: SocketAddr,
    pub request_line: String,
    pub headers: Vec<(String, String)>,
    /// Which of the processes named with [`Origin::track_owners`] held the connecting
    /// socket while the request was served (`None`: none of them, or not tracked).
    pub owner: Option<String>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The request's path.
    pub fn path(&self) -> &str {
        self.request_line.split(' ').nth(1).unwrap_or("/")
    }
}

/// `/proc/net/tcp{,6}`'s spelling of a socket address: each 32-bit word of the
/// address as the kernel's `%08X` of its in-memory value, then `:%04X` of the port.
fn proc_net_addr(addr: SocketAddr) -> String {
    let words = |octets: &[u8]| -> String {
        octets
            .chunks(4)
            .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
            .collect()
    };
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v4) => words(&v4.octets()),
        std::net::IpAddr::V6(v6) => words(&v6.octets()),
    };
    format!("{ip}:{:04X}", addr.port())
}

/// The socket inode of the TCP connection `local` → `remote` on this host, from
/// `/proc/net/tcp` (or `tcp6`, as an IPv4-mapped address).
fn tcp_inode(local: SocketAddr, remote: SocketAddr) -> Option<String> {
    let mapped = |a: SocketAddr| match a {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    };
    for (table, l, r) in [
        ("/proc/net/tcp", local, remote),
        ("/proc/net/tcp6", mapped(local), mapped(remote)),
    ] {
        let (l, r) = (proc_net_addr(l), proc_net_addr(r));
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[1] == l && f[2] == r {
                return Some(f[9].to_string());
            }
        }
    }
    None
}

/// Which of `owners` (name, pid) has the socket with `inode` among its descriptors.
fn socket_owner(inode: &str, owners: &[(String, u32)]) -> Option<String> {
    let want = format!("socket:[{inode}]");
    owners.iter().find_map(|(name, pid)| {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
        fds.flatten()
            .any(|fd| {
                std::fs::read_link(fd.path())
                    .is_ok_and(|l| l.as_os_str() == std::ffi::OsStr::new(&want))
            })
            .then(|| name.clone())
    })
}

/// A minimal HTTP/1.1 origin: serves `routes` (path → body) and 204 on the paths of
/// `no_content`, answers 503 to the first `fail_first` requests, and records every
/// request with its peer address (and its owner, see [`Origin::track_owners`]).
pub struct Origin {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub routes: Arc<Mutex<std::collections::HashMap<String, String>>>,
    pub no_content: Arc<Mutex<std::collections::HashSet<String>>>,
    pub fail_first: Arc<Mutex<u32>>,
    pub owners: Arc<Mutex<Vec<(String, u32)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Origin {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let routes = Arc::new(Mutex::new(std::collections::HashMap::new()));
        let no_content = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let fail_first = Arc::new(Mutex::new(0u32));
        let owners = Arc::new(Mutex::new(Vec::new()));
        let (s, r, nc, f, o) = (
            seen.clone(),
            routes.clone(),
            no_content.clone(),
            fail_first.clone(),
            owners.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, peer)) = listener.accept().await else {
                    return;
                };
                let (s, r, nc, f, o) = (s.clone(), r.clone(), nc.clone(), f.clone(), o.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    // The peer still waits for the answer, so its socket is still open.
                    let owners: Vec<(String, u32)> = o.lock().unwrap().clone();
                    let owner = if owners.is_empty() {
                        None
                    } else {
                        tcp_inode(peer, addr).and_then(|inode| socket_owner(&inode, &owners))
                    };
                    let text = String::from_utf8_lossy(&buf).to_string();
                    let mut lines = text.split("\r\n");
                    let request_line = lines.next().unwrap_or("").to_string();
                    let headers = lines
                        .take_while(|l| !l.is_empty())
                        .filter_map(|l| l.split_once(':'))
                        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                        .collect();
                    let seen = Seen {
                        peer,
                        request_line: request_line.clone(),
                        headers,
                        owner,
                    };
                    let path = seen.path().to_string();
                    s.lock().unwrap().push(seen);
                    let fail = {
                        let mut f = f.lock().unwrap();
                        if *f > 0 {
                            *f -= 1;
                            true
                        } else {
                            false
                        }
                    };
                    let resp = if !fail && nc.lock().unwrap().contains(&path) {
                        "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n".to_string()
                    } else {
                        let body = r.lock().unwrap().get(&path).cloned();
                        let (status, body) = match (fail, body) {
                            (true, _) => ("503 Service Unavailable", "busy".to_string()),
                            (false, Some(b)) => ("200 OK", b),
                            (false, None) => ("404 Not Found", "no".to_string()),
                        };
                        let head = request_line.starts_with("HEAD ");
                        format!(
                            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                            body.len(),
                            if head { "" } else { body.as_str() }
                        )
                    };
                    let _ = sock.write_all(resp.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        Self {
            addr,
            seen,
            routes,
            no_content,
            fail_first,
            owners,
            task,
        }
    }

    pub fn route(&self, path: &str, body: &str) {
        self.routes
            .lock()
            .unwrap()
            .insert(path.to_string(), body.to_string());
    }

    /// `path` answers `204 No Content` (a delay-test URL).
    pub fn route_204(&self, path: &str) {
        self.no_content.lock().unwrap().insert(path.to_string());
    }

    /// From now on each request records which of these processes (name, pid) held
    /// the connecting socket, looked up in `/proc` while the request is served.
    pub fn track_owners(&self, owners: &[(&str, u32)]) {
        *self.owners.lock().unwrap() = owners
            .iter()
            .map(|(name, pid)| (name.to_string(), *pid))
            .collect();
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The requests for `path`, oldest first.
    pub fn seen_path(&self, path: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.path() == path)
            .collect()
    }
}

/// Sends one DNS A query over UDP and returns the first A record.
pub async fn dns_a(server: SocketAddr, name: &str) -> Option<std::net::Ipv4Addr> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.ok()?;
    sock.send_to(&q, server).await.ok()?;
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    let resp = &buf[..n];
    if resp.len() < q.len() + 16
        || resp[0..2] != q[0..2]
        || u16::from_be_bytes([resp[6], resp[7]]) == 0
    {
        return None;
    }
    let a = &resp[n - 4..n];
    Some(std::net::Ipv4Addr::new(a[0], a[1], a[2], a[3]))
}
