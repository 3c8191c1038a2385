//! Shared helpers of the `dns_*` integration tests: real dnsmasq upstreams on unique
//! loopback addresses, a small DNS client (UDP and TCP), and the frontend started on
//! an ephemeral port. dnsmasq missing is a test failure, not a skip.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket as StdUdp};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use meduza::dns::{DnsConfig, DnsHandle};
use meduza_generators::plan::dns::{DnsPlan, Failover, HealthCheck, UpstreamGroup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

static NEXT_NET: AtomicU8 = AtomicU8::new(1);

/// A fresh 127.a.b.0/24 block for one test (a from the pid, b per test), so tests in
/// parallel and concurrent test binaries never share an address.
pub fn loopback_block() -> [u8; 3] {
    let pid = std::process::id();
    [
        127,
        20 + (pid % 200) as u8,
        NEXT_NET.fetch_add(1, Ordering::Relaxed),
    ]
}

pub fn ip(block: [u8; 3], host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(block[0], block[1], block[2], host))
}

/// A port free for both UDP and TCP on `ip`.
pub fn free_port(ip: IpAddr) -> u16 {
    for _ in 0..100 {
        let u = StdUdp::bind(SocketAddr::new(ip, 0)).expect("bind probe udp");
        let port = u.local_addr().unwrap().port();
        if std::net::TcpListener::bind(SocketAddr::new(ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on {ip}");
}

/// A dnsmasq child killed on drop.
pub struct Dnsmasq {
    child: Option<Child>,
    pub addr: SocketAddr,
    args: Vec<String>,
}

impl Dnsmasq {
    /// Starts dnsmasq on `ip` with `--address=/test/<answer>` plus `extra` arguments
    /// and waits until it answers.
    pub fn start(ip: IpAddr, answer: Ipv4Addr, extra: &[&str]) -> Self {
        let port = free_port(ip);
        Self::start_on(SocketAddr::new(ip, port), answer, extra)
    }

    pub fn start_on(addr: SocketAddr, answer: Ipv4Addr, extra: &[&str]) -> Self {
        let mut args: Vec<String> = vec![
            "-k".into(),
            "--conf-file=/dev/null".into(),
            format!("--port={}", addr.port()),
            format!("--listen-address={}", addr.ip()),
            "--bind-interfaces".into(),
            format!("--address=/test/{answer}"),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--pid-file=".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut d = Self {
            child: None,
            addr,
            args,
        };
        d.restart();
        d
    }

    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("dnsmasq")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq must be installed (apt-get install dnsmasq-base)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if blocking_udp_a(self.addr, "ready.test").is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "dnsmasq on {} did not come up",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.kill();
    }
}

fn blocking_udp_a(server: SocketAddr, name: &str) -> Option<Message> {
    let sock = StdUdp::bind(SocketAddr::new(server.ip(), 0)).ok()?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .ok()?;
    let q = query_msg(name, RecordType::A, None, 7).to_vec().ok()?;
    sock.send_to(&q, server).ok()?;
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).ok()?;
    Message::from_vec(&buf[..n]).ok()
}

pub fn query_msg(name: &str, rt: RecordType, edns: Option<u16>, id: u16) -> Message {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rt));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m
}

/// One UDP query; `None` on timeout.
pub async fn udp_raw(server: SocketAddr, pkt: &[u8], timeout: Duration) -> Option<Vec<u8>> {
    let bind: SocketAddr = if server.is_ipv4() {
        "127.0.0.1:0"
    } else {
        "[::1]:0"
    }
    .parse()
    .unwrap();
    let sock = tokio::net::UdpSocket::bind(bind).await.unwrap();
    sock.send_to(pkt, server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    match tokio::time::timeout(timeout, sock.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

pub async fn udp(server: SocketAddr, name: &str, rt: RecordType, edns: Option<u16>) -> Message {
    let id = rand::random();
    let q = query_msg(name, rt, edns, id).to_vec().unwrap();
    let r = udp_raw(server, &q, Duration::from_secs(8))
        .await
        .unwrap_or_else(|| panic!("no UDP answer for {name} from {server}"));
    let m = Message::from_vec(&r).unwrap();
    assert_eq!(m.metadata.id, id);
    m
}

pub async fn tcp(server: SocketAddr, name: &str, rt: RecordType) -> Message {
    let id = rand::random();
    let q = query_msg(name, rt, Some(1232), id).to_vec().unwrap();
    let mut s = tokio::net::TcpStream::connect(server).await.unwrap();
    let mut out = (q.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(&q);
    s.write_all(&out).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(8), s.read_u16())
        .await
        .unwrap()
        .unwrap();
    let mut buf = vec![0u8; usize::from(n)];
    s.read_exact(&mut buf).await.unwrap();
    let m = Message::from_vec(&buf).unwrap();
    assert_eq!(m.metadata.id, id);
    m
}

/// The A/AAAA addresses of an answer.
pub fn addrs(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

pub fn group(
    name: &str,
    priority: u32,
    addresses: Vec<SocketAddr>,
    interval: u64,
    threshold: u32,
) -> UpstreamGroup {
    UpstreamGroup {
        name: name.into(),
        addresses,
        priority,
        enable: true,
        health_check: HealthCheck {
            enable: true,
            interval_secs: interval,
            timeout_secs: 1,
        },
        failover: Failover {
            enable: true,
            threshold,
        },
    }
}

/// Frontend config for tests: ephemeral port on `listen_ip`, health checks asking
/// `health.test` (which the dnsmasq upstreams answer), chain members on closed ports.
pub fn config(listen_ip: IpAddr) -> DnsConfig {
    DnsConfig {
        listen: vec![SocketAddr::new(listen_ip, 0)],
        health_check_name: "health.test".into(),
        attempt_timeout: Duration::from_millis(800),
        query_budget: Duration::from_secs(3),
        udp_workers: 2,
        mosdns_addr: SocketAddr::new(listen_ip, free_port(listen_ip)),
        clash_addr: SocketAddr::new(listen_ip, free_port(listen_ip)),
        ..DnsConfig::default()
    }
}

pub async fn start(cfg: DnsConfig, plan: DnsPlan) -> (DnsHandle, SocketAddr) {
    let h = meduza::dns::start(cfg, plan)
        .await
        .expect("frontend starts");
    let a = h.local_addrs()[0];
    (h, a)
}

/// Polls `f` every 50 ms until it returns true or `within` passes; returns the time taken.
pub async fn wait_until<F: FnMut() -> bool>(within: Duration, mut f: F) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if f() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}
