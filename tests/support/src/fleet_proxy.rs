//! A tiny HTTP forward proxy (absolute-form requests and CONNECT) for the fleet tests,
//! run inside a network namespace: the "bastion" through which the fleet manager
//! reaches a node it cannot reach directly (`/fleet/proxy`). It runs on its own thread
//! with a current-thread tokio runtime after `setns(2)`, so every socket it opens,
//! listening and outgoing, belongs to that namespace. Stopped and joined on drop.
//!
//! Through a CONNECT tunnel (how reqwest reaches an `https://` node through a proxy)
//! the proxy sees TLS records only, and a client reuses one tunnel for many requests:
//! it counts tunnels by target, and keeps every byte clients sent it (capped) so a test
//! can check that a secret never crossed the bastion in clear.

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bytes kept from clients at most; the fleet tests send a few KiB per round.
const SEEN_CAP: usize = 16 << 20;

/// What the proxy observed, shared with its connection tasks.
#[derive(Default)]
struct Seen {
    requests: AtomicUsize,
    /// Target (`host:port`) of every CONNECT, in order.
    tunnels: Mutex<Vec<String>>,
    /// Every byte clients sent: request heads, bodies, tunnelled bytes.
    from_clients: Mutex<Vec<u8>>,
}

impl Seen {
    fn record(&self, bytes: &[u8]) {
        let mut b = self.from_clients.lock().unwrap_or_else(|e| e.into_inner());
        let room = SEEN_CAP.saturating_sub(b.len());
        b.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

pub struct NsProxy {
    pub addr: SocketAddr,
    seen: Arc<Seen>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NsProxy {
    /// Listen on `addr` inside the namespace `ns` (`/var/run/netns/<ns>`).
    pub fn start(ns: &str, addr: SocketAddr) -> NsProxy {
        let path = format!("/var/run/netns/{ns}");
        let seen = Arc::new(Seen::default());
        let n = seen.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns(2) on a valid, open namespace fd changes only this thread's
            // network namespace; no memory is shared with the kernel.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                let _ = ready_tx.send(Err(format!(
                    "setns {path}: {}",
                    std::io::Error::last_os_error()
                )));
                return;
            }
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                let l = match TcpListener::bind(addr).await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("bind {addr}: {e}")));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                let accept = async {
                    loop {
                        if let Ok((s, _)) = l.accept().await {
                            let n = n.clone();
                            tokio::spawn(async move {
                                let _ = handle(s, n).await;
                            });
                        }
                    }
                };
                tokio::select! {
                    _ = stop_rx => {}
                    _ = accept => {}
                }
            });
        });
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("proxy in {ns}: {e}"),
            Err(_) => panic!("proxy thread in {ns} died before listening"),
        }
        NsProxy {
            addr,
            seen,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests served so far (a CONNECT counts once, whatever went through it).
    pub fn count(&self) -> usize {
        self.seen.requests.load(Ordering::SeqCst)
    }

    /// CONNECT tunnels opened to `target` (`host:port`) so far.
    pub fn tunnels_to(&self, target: &str) -> usize {
        let t = self.seen.tunnels.lock().unwrap_or_else(|e| e.into_inner());
        t.iter().filter(|t| *t == target).count()
    }

    /// Whether `needle` appeared in clear in anything a client sent the proxy.
    pub fn saw(&self, needle: &str) -> bool {
        let b = self
            .seen
            .from_clients
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let n = needle.as_bytes();
        !n.is_empty() && b.windows(n.len()).any(|w| w == n)
    }
}

impl Drop for NsProxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn handle(mut client: TcpStream, n: Arc<Seen>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let r = client.read(&mut chunk).await?;
        if r == 0 {
            return Ok(());
        }
        n.record(&chunk[..r]);
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
    n.requests.fetch_add(1, Ordering::SeqCst);
    if method == "CONNECT" {
        n.tunnels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(target.to_string());
        let Ok(mut up) = TcpStream::connect(target).await else {
            client
                .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                .await?;
            return Ok(());
        };
        client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await?;
        up.write_all(&rest).await?;
        return relay(client, up, &n).await;
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
    let Ok(mut up) = TcpStream::connect(host_port.as_str()).await else {
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
    relay(client, up, &n).await
}

/// Copies both ways until each side has closed, recording what the client sends.
async fn relay(mut client: TcpStream, mut up: TcpStream, n: &Seen) -> std::io::Result<()> {
    let (mut client_rx, mut client_tx) = client.split();
    let (mut up_rx, mut up_tx) = up.split();
    let to_up = async {
        let mut chunk = [0u8; 8192];
        loop {
            let r = client_rx.read(&mut chunk).await?;
            if r == 0 {
                return up_tx.shutdown().await;
            }
            n.record(&chunk[..r]);
            up_tx.write_all(&chunk[..r]).await?;
        }
    };
    let to_client = async {
        tokio::io::copy(&mut up_rx, &mut client_tx).await?;
        client_tx.shutdown().await
    };
    tokio::try_join!(to_up, to_client)?;
    Ok(())
}
