//! Health probes (DESIGN §6): one attempt of each probe kind, with a timeout.
//!
//! Owns: running a single probe attempt and describing its result. The retry loop,
//! grace period and the restart decision live in `supervisor`.
//! Must not: restart anything or sleep between attempts.

use super::logbuf::LogBuffer;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use meduza_generators::plan::service::Probe;
use std::time::Duration;
use tokio::net::{TcpStream, UdpSocket};

/// What one attempt found; `Err` carries the reason for the FAIL log line.
pub type ProbeResult = Result<String, String>;

/// Everything a probe may look at besides its own parameters.
pub struct ProbeContext<'a> {
    /// The pid of the current process, if one runs.
    pub pid: Option<u32>,
    pub log: &'a LogBuffer,
    pub timeout: Duration,
}

/// Run one attempt of `probe`; the result text completes `Health check PASS: ...`
/// or `Health check FAIL (attempt i/n): ...`.
pub async fn run_probe(probe: &Probe, ctx: &ProbeContext<'_>) -> ProbeResult {
    let timeout = ctx.timeout;
    let fut = async {
        match probe {
            Probe::Process => process(ctx.pid),
            Probe::Tcp { addr } => tcp(addr).await,
            Probe::Http { url, expect_status } => http(url, None, *expect_status, timeout).await,
            Probe::Socks5 { proxy, url } => {
                let r = http(url, Some(proxy), None, timeout).await;
                r.map(|ok| format!("SOCKS proxy test successful ({proxy}): {ok}"))
            }
            Probe::Dns { server, name } => dns(server, name).await,
            Probe::Exec { argv } => exec(argv).await,
            Probe::LogScan { pattern, lines } => log_scan(ctx.log, pattern, *lines),
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {}s", timeout.as_secs())),
    }
}

fn process(pid: Option<u32>) -> ProbeResult {
    let pid = pid.ok_or_else(|| "process is not running".to_string())?;
    let raw = i32::try_from(pid).map_err(|_| format!("bad pid {pid}"))?;
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None) {
        Ok(()) => Ok(format!("process {pid} is alive")),
        Err(e) => Err(format!("process {pid}: {e}")),
    }
}

async fn tcp(addr: &str) -> ProbeResult {
    TcpStream::connect(addr)
        .await
        .map(|_| format!("TCP connect to {addr} succeeded"))
        .map_err(|e| format!("TCP connect to {addr}: {e}"))
}

async fn http(
    url: &str,
    socks: Option<&str>,
    expect: Option<u16>,
    timeout: Duration,
) -> ProbeResult {
    let mut builder = reqwest::Client::builder().timeout(timeout).no_proxy();
    if let Some(proxy) = socks {
        let p = reqwest::Proxy::all(format!("socks5h://{proxy}"))
            .map_err(|e| format!("bad proxy {proxy}: {e}"))?;
        builder = builder.proxy(p);
    }
    let client = builder.build().map_err(|e| format!("HTTP client: {e}"))?;
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = resp.status().as_u16();
    let ok = match expect {
        Some(want) => status == want,
        None => (200..400).contains(&status),
    };
    if ok {
        Ok(format!("GET {url} answered {status}"))
    } else {
        Err(format!("GET {url} answered {status}"))
    }
}

async fn dns(server: &str, name: &str) -> ProbeResult {
    let qname = Name::from_ascii(name).map_err(|e| format!("bad name {name}: {e}"))?;
    let id: u16 = rand::random();
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(qname, RecordType::A));
    let bytes = msg.to_vec().map_err(|e| format!("encode query: {e}"))?;
    let bind = if server.starts_with('[') {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let sock = UdpSocket::bind(bind)
        .await
        .map_err(|e| format!("bind: {e}"))?;
    sock.connect(server)
        .await
        .map_err(|e| format!("DNS server {server}: {e}"))?;
    sock.send(&bytes)
        .await
        .map_err(|e| format!("send to {server}: {e}"))?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = sock
            .recv(&mut buf)
            .await
            .map_err(|e| format!("DNS {server}: {e}"))?;
        let Ok(resp) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        if resp.metadata.id != id {
            continue;
        }
        let code = resp.metadata.response_code;
        return match code {
            ResponseCode::NoError | ResponseCode::NXDomain => Ok(format!(
                "DNS {server} answered {name} A: {code}, {} answers",
                resp.answers.len()
            )),
            other => Err(format!("DNS {server} answered {name} A: {other}")),
        };
    }
}

async fn exec(argv: &[String]) -> ProbeResult {
    let (program, args) = argv.split_first().ok_or_else(|| "empty argv".to_string())?;
    // Like services, probes do not inherit meduza's environment (etcd credentials).
    let status = super::spawn::clean_command(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .map_err(|e| format!("{program}: {e}"))?;
    if status.success() {
        Ok(format!("{program} exited 0"))
    } else {
        Err(format!("{program}: {status}"))
    }
}

fn log_scan(log: &LogBuffer, pattern: &str, lines: usize) -> ProbeResult {
    let needle = pattern.to_lowercase();
    match log
        .current(lines)
        .into_iter()
        .find(|l| l.to_lowercase().contains(&needle))
    {
        Some(line) => Err(format!("log line matches {pattern:?}: {line}")),
        None => Ok(format!("no {pattern:?} in the last {lines} log lines")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(log: &LogBuffer) -> ProbeContext<'_> {
        ProbeContext {
            pid: Some(std::process::id()),
            log,
            timeout: Duration::from_secs(3),
        }
    }

    #[tokio::test]
    async fn log_scan_fails_only_on_current_lines() {
        let log = LogBuffer::new(10);
        log.push("connection ERROR: peer gone".into());
        let probe = Probe::LogScan {
            pattern: "error".into(),
            lines: 5,
        };
        assert!(run_probe(&probe, &ctx(&log)).await.is_err());
        log.next_generation();
        log.push("all good".into());
        assert!(run_probe(&probe, &ctx(&log)).await.is_ok());
    }

    #[tokio::test]
    async fn tcp_and_process_and_exec() {
        let log = LogBuffer::new(1);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let c = ctx(&log);
        assert!(run_probe(&Probe::Tcp { addr: addr.clone() }, &c)
            .await
            .is_ok());
        drop(listener);
        assert!(run_probe(&Probe::Tcp { addr }, &c).await.is_err());
        assert!(run_probe(&Probe::Process, &c).await.is_ok());
        let gone = ProbeContext {
            pid: None,
            ..ctx(&log)
        };
        assert!(run_probe(&Probe::Process, &gone).await.is_err());
        let t = Probe::Exec {
            argv: vec!["/bin/true".into()],
        };
        let f = Probe::Exec {
            argv: vec!["/bin/false".into()],
        };
        assert!(run_probe(&t, &c).await.is_ok());
        assert!(run_probe(&f, &c).await.is_err());
    }

    #[tokio::test]
    async fn http_status_is_checked() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let resp =
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                s.write_all(resp.as_bytes()).await.expect("write");
            }
        });
        let log = LogBuffer::new(1);
        let probe = Probe::Http {
            url: format!("http://{addr}/"),
            expect_status: None,
        };
        assert!(run_probe(&probe, &ctx(&log)).await.is_ok());
        assert!(run_probe(&probe, &ctx(&log)).await.is_err());
    }

    #[tokio::test]
    async fn dns_query_gets_answer() {
        let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = server.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, peer) = server.recv_from(&mut buf).await.expect("recv");
            let q = Message::from_vec(&buf[..n]).expect("parse");
            let mut r = Message::response(q.metadata.id, OpCode::Query);
            r.add_queries(q.queries.clone());
            r.metadata.response_code = ResponseCode::NXDomain;
            server
                .send_to(&r.to_vec().expect("encode"), peer)
                .await
                .expect("send");
        });
        let log = LogBuffer::new(1);
        let probe = Probe::Dns {
            server: addr,
            name: "example.com.".into(),
        };
        let r = run_probe(&probe, &ctx(&log)).await;
        assert!(r.is_ok(), "{r:?}");
    }

    /// A minimal SOCKS5 server (RFC 1928: no auth, CONNECT) relaying to the target.
    async fn socks5_server(listener: tokio::net::TcpListener) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut c, _) = listener.accept().await.expect("accept");
        let mut hello = [0u8; 2];
        c.read_exact(&mut hello).await.expect("hello");
        let mut methods = vec![0u8; usize::from(hello[1])];
        c.read_exact(&mut methods).await.expect("methods");
        c.write_all(&[5, 0]).await.expect("choose");
        let mut req = [0u8; 4];
        c.read_exact(&mut req).await.expect("request");
        let host = match req[3] {
            1 => {
                let mut ip = [0u8; 4];
                c.read_exact(&mut ip).await.expect("ip");
                std::net::Ipv4Addr::from(ip).to_string()
            }
            3 => {
                let len = c.read_u8().await.expect("len");
                let mut name = vec![0u8; usize::from(len)];
                c.read_exact(&mut name).await.expect("name");
                String::from_utf8(name).expect("utf8")
            }
            other => panic!("unexpected address type {other}"),
        };
        let port = c.read_u16().await.expect("port");
        let mut upstream = TcpStream::connect((host.as_str(), port))
            .await
            .expect("upstream");
        c.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0])
            .await
            .expect("reply");
        let _ = tokio::io::copy_bidirectional(&mut c, &mut upstream).await;
    }

    #[tokio::test]
    async fn socks5_fetch_goes_through_the_proxy() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let web = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let web_addr = web.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = web.accept().await.expect("accept");
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                .await
                .expect("write");
        });
        let proxy = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let proxy_addr = proxy.local_addr().expect("addr").to_string();
        let served = tokio::spawn(socks5_server(proxy));
        let log = LogBuffer::new(1);
        let probe = Probe::Socks5 {
            proxy: proxy_addr.clone(),
            url: format!("http://{web_addr}/ip"),
        };
        let r = run_probe(&probe, &ctx(&log)).await;
        assert!(r.is_ok(), "{r:?}");
        served.await.expect("proxy served the request");
        // Nothing listens on the proxy port any more: the probe fails.
        let r = run_probe(&probe, &ctx(&log)).await;
        assert!(r.is_err(), "{r:?}");
    }
}
