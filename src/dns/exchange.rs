//! Sending one query to one upstream address and getting its answer: the OS edge of
//! forwarding and health checks, behind the [`Exchange`] trait.
//!
//! Owns: [`NetExchange`], the real implementation: per upstream address a few
//! connected UDP sockets multiplexing in-flight queries by random id, with a retry
//! over TCP when the UDP answer is truncated (RFC 7766 §6.2.1).
//! Must not: cache, choose upstreams or count failures (the frontend does), or block.
//! Connected sockets make an unreachable loopback upstream (MosDNS/mihomo not running)
//! fail at once with ECONNREFUSED instead of timing out.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::sockopt::set_rcvbuf;
use super::wire;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    #[error("timed out")]
    Timeout,
    #[error("connection refused")]
    Refused,
    #[error("i/o error: {0}")]
    Io(String),
    #[error("malformed answer")]
    Malformed,
}

impl From<io::Error> for ExchangeError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => ExchangeError::Refused,
            io::ErrorKind::TimedOut => ExchangeError::Timeout,
            _ => ExchangeError::Io(e.to_string()),
        }
    }
}

/// One query to one address. `query` is a complete DNS message; the answer must be
/// a response to the same question (the implementation checks id and question).
#[async_trait::async_trait]
pub trait Exchange: Send + Sync + 'static {
    async fn exchange(
        &self,
        addr: SocketAddr,
        query: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, ExchangeError>;

    /// Drops per-address resources for addresses no longer configured.
    fn retain(&self, _keep: &[SocketAddr]) {}
}

type Pending = Mutex<HashMap<u16, oneshot::Sender<Result<Vec<u8>, ExchangeError>>>>;

struct MuxSocket {
    sock: Arc<UdpSocket>,
    pending: Arc<Pending>,
    reader: JoinHandle<()>,
}

impl Drop for MuxSocket {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

struct Mux {
    sockets: Vec<MuxSocket>,
    next: AtomicUsize,
    /// Queries in flight to this address; more wait for a slot (within their
    /// timeout). A burst of 500 queries would otherwise overflow a plain upstream's
    /// default socket buffer (~200 datagrams) and be lost there.
    slots: tokio::sync::Semaphore,
}

/// The real exchange over the network.
pub struct NetExchange {
    muxes: Mutex<HashMap<SocketAddr, Arc<Mux>>>,
    sockets_per_upstream: usize,
    max_inflight_per_upstream: usize,
}

/// Default bound of queries in flight to one upstream address.
pub const MAX_INFLIGHT_PER_UPSTREAM: usize = 128;

/// Largest UDP answer we accept from an upstream (EDNS maximum in practice).
const MAX_UDP_ANSWER: usize = 65535;

impl NetExchange {
    pub fn new(sockets_per_upstream: usize) -> Self {
        Self::with_limits(sockets_per_upstream, MAX_INFLIGHT_PER_UPSTREAM)
    }

    pub fn with_limits(sockets_per_upstream: usize, max_inflight_per_upstream: usize) -> Self {
        Self {
            muxes: Mutex::new(HashMap::new()),
            sockets_per_upstream: sockets_per_upstream.max(1),
            max_inflight_per_upstream: max_inflight_per_upstream.max(1),
        }
    }

    async fn mux(&self, addr: SocketAddr) -> io::Result<Arc<Mux>> {
        if let Some(m) = self
            .muxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&addr)
        {
            return Ok(m.clone());
        }
        let mut sockets = Vec::with_capacity(self.sockets_per_upstream);
        for _ in 0..self.sockets_per_upstream {
            let bind: SocketAddr = if addr.is_ipv4() {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let sock = UdpSocket::bind(bind).await?;
            // Room for a burst of answers to every in-flight query.
            set_rcvbuf(&sock, 1 << 20);
            let sock = Arc::new(sock);
            sock.connect(addr).await?;
            let pending: Arc<Pending> = Arc::default();
            let reader = tokio::spawn(read_loop(sock.clone(), pending.clone(), addr));
            sockets.push(MuxSocket {
                sock,
                pending,
                reader,
            });
        }
        let mux = Arc::new(Mux {
            sockets,
            next: AtomicUsize::new(0),
            slots: tokio::sync::Semaphore::new(self.max_inflight_per_upstream),
        });
        let mut map = self.muxes.lock().unwrap_or_else(|e| e.into_inner());
        // Another task may have raced us; keep the first one.
        Ok(map.entry(addr).or_insert(mux).clone())
    }

    async fn udp(
        &self,
        addr: SocketAddr,
        query: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, ExchangeError> {
        let mux = self.mux(addr).await?;
        let start = tokio::time::Instant::now();
        let _slot = tokio::time::timeout(timeout, mux.slots.acquire())
            .await
            .map_err(|_| ExchangeError::Timeout)?
            .map_err(|_| ExchangeError::Io("upstream closed".into()))?;
        let timeout = timeout.saturating_sub(start.elapsed());
        let n = mux.next.fetch_add(1, Ordering::Relaxed) % mux.sockets.len();
        let s = &mux.sockets[n];
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut p = s.pending.lock().unwrap_or_else(|e| e.into_inner());
            let mut id = rand::random::<u16>();
            let mut tries = 0;
            while p.contains_key(&id) {
                id = rand::random::<u16>();
                tries += 1;
                if tries > 64 {
                    return Err(ExchangeError::Io("no free query id".into()));
                }
            }
            p.insert(id, tx);
            id
        };
        let mut msg = query.to_vec();
        msg[0..2].copy_from_slice(&id.to_be_bytes());
        // `rx` is consumed (dropped) by the time `result` exists, on every path.
        let result = match s.sock.send(&msg).await {
            Err(e) => {
                drop(rx);
                Err(ExchangeError::from(e))
            }
            Ok(_) => match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(ExchangeError::Io("reader stopped".into())),
                Err(_) => Err(ExchangeError::Timeout),
            },
        };
        if result.is_err() {
            // The id may already belong to a newer query (the reader removed ours
            // when it answered): only an entry whose receiver is gone is ours.
            let mut p = s.pending.lock().unwrap_or_else(|e| e.into_inner());
            if p.get(&id).is_some_and(|tx| tx.is_closed()) {
                p.remove(&id);
            }
        }
        let mut resp = result?;
        if !answers(&resp, query) {
            return Err(ExchangeError::Malformed);
        }
        resp[0..2].copy_from_slice(&query[0..2]);
        Ok(resp)
    }
}

/// Whether `resp` answers `query`: a response with the same question.
fn answers(resp: &[u8], query: &[u8]) -> bool {
    let (Some(info), Ok(q)) = (wire::scan_response(resp), wire::parse_query(query)) else {
        return false;
    };
    wire::same_question(&resp[wire::HEADER_LEN..info.question_end], q.question)
}

async fn read_loop(sock: Arc<UdpSocket>, pending: Arc<Pending>, addr: SocketAddr) {
    let mut buf = vec![0u8; MAX_UDP_ANSWER];
    loop {
        match sock.recv(&mut buf).await {
            Ok(n) if n >= wire::HEADER_LEN => {
                let id = u16::from_be_bytes([buf[0], buf[1]]);
                let tx = pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                match tx {
                    Some(tx) => {
                        let _ = tx.send(Ok(buf[..n].to_vec()));
                    }
                    None => {
                        tracing::debug!(upstream = %addr, id, "answer for no pending query dropped")
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                // ICMP port unreachable on a connected socket: everyone waiting on this
                // socket would only time out; fail them now.
                let err = ExchangeError::from(e);
                let waiting: Vec<_> = pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .drain()
                    .collect();
                for (_, tx) in waiting {
                    let _ = tx.send(Err(err.clone()));
                }
                if !matches!(err, ExchangeError::Refused) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

/// One query over TCP (RFC 1035 §4.2.2 two-octet length prefix), on a fresh connection.
pub async fn tcp_exchange(
    addr: SocketAddr,
    query: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, ExchangeError> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let len = u16::try_from(query.len()).map_err(|_| ExchangeError::Malformed)?;
        let mut out = Vec::with_capacity(query.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(query);
        s.write_all(&out).await?;
        let n = usize::from(s.read_u16().await?);
        let mut resp = vec![0u8; n];
        s.read_exact(&mut resp).await?;
        Ok::<_, ExchangeError>(resp)
    };
    let resp = tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ExchangeError::Timeout)??;
    if resp.get(0..2) != query.get(0..2) || !answers(&resp, query) {
        return Err(ExchangeError::Malformed);
    }
    Ok(resp)
}

#[async_trait::async_trait]
impl Exchange for NetExchange {
    async fn exchange(
        &self,
        addr: SocketAddr,
        query: &[u8],
        timeout: Duration,
    ) -> Result<Vec<u8>, ExchangeError> {
        if query.len() < wire::HEADER_LEN {
            return Err(ExchangeError::Malformed);
        }
        let start = tokio::time::Instant::now();
        let resp = self.udp(addr, query, timeout).await?;
        if resp[2] & 0x02 == 0 {
            return Ok(resp);
        }
        // Truncated over UDP: ask again over TCP with what is left of the budget.
        let left = timeout.saturating_sub(start.elapsed());
        tcp_exchange(addr, query, left).await
    }

    fn retain(&self, keep: &[SocketAddr]) {
        self.muxes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|a, _| keep.contains(a));
    }
}
