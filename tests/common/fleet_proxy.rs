//! Test doubles for the network between the fleet manager and nodes:
//! - [`Proxy`]: a tiny HTTP forward proxy (absolute-form requests and CONNECT) whose
//!   outgoing connections come from 127.0.0.3;
//! - [`FirewalledListener`]: a listener that drops every connection whose source is not
//!   the allowed address — a stand-in for a firewall that admits only the proxy host,
//!   so a node behind it is reachable through the proxy and not directly.

#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

pub const PROXY_SOURCE: &str = "127.0.0.3";

pub struct Proxy {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    pub async fn start() -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let n = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let n = n.clone();
                tokio::spawn(async move {
                    let _ = handle(s, n).await;
                });
            }
        });
        Proxy {
            addr,
            requests,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn count(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

async fn connect_from_proxy(target: &str) -> std::io::Result<TcpStream> {
    let dest: SocketAddr = tokio::net::lookup_host(target)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other("no address"))?;
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(PROXY_SOURCE.parse().unwrap(), 0))?;
    sock.connect(dest).await
}

async fn handle(mut client: TcpStream, n: Arc<AtomicUsize>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let r = client.read(&mut chunk).await?;
        if r == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..r]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        if buf.len() > 64 * 1024 {
            return Ok(());
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let rest = buf[head_end..].to_vec();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, target, version) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or("HTTP/1.1"),
    );
    n.fetch_add(1, Ordering::SeqCst);
    if method == "CONNECT" {
        let Ok(mut up) = connect_from_proxy(target).await else {
            client
                .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                .await?;
            return Ok(());
        };
        client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await?;
        up.write_all(&rest).await?;
        tokio::io::copy_bidirectional(&mut client, &mut up).await?;
        return Ok(());
    }
    let Some(after_scheme) = target.strip_prefix("http://") else {
        client
            .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            .await?;
        return Ok(());
    };
    let (authority, path) = match after_scheme.find('/') {
        Some(i) => (&after_scheme[..i], &after_scheme[i..]),
        None => (after_scheme, "/"),
    };
    let host_port = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let Ok(mut up) = connect_from_proxy(&host_port).await else {
        client
            .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            .await?;
        return Ok(());
    };
    // Origin-form request; one request per upstream connection.
    let mut out = format!("{method} {path} {version}\r\n");
    for l in lines.filter(|l| !l.is_empty()) {
        let lower = l.to_ascii_lowercase();
        if lower.starts_with("proxy-") || lower.starts_with("connection:") {
            continue;
        }
        out.push_str(l);
        out.push_str("\r\n");
    }
    out.push_str("connection: close\r\n\r\n");
    up.write_all(out.as_bytes()).await?;
    up.write_all(&rest).await?;
    tokio::io::copy_bidirectional(&mut client, &mut up).await?;
    Ok(())
}

/// Accepts only connections from `allowed`; others are closed at once.
pub struct FirewalledListener {
    pub inner: TcpListener,
    pub allowed: IpAddr,
    pub dropped: Arc<AtomicUsize>,
}

impl axum::serve::Listener for FirewalledListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            if let Ok((s, peer)) = self.inner.accept().await {
                if peer.ip() == self.allowed {
                    return (s, peer);
                }
                self.dropped.fetch_add(1, Ordering::SeqCst);
                drop(s);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}
