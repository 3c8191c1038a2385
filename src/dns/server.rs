//! The listeners: UDP sockets served by our own receive loops (one SO_REUSEPORT socket
//! per core per address) and TCP through hickory-server's `Server`.
//!
//! Owns: binding, the UDP loops, the hickory `RequestHandler` adapter, shutdown.
//! Must not: answer anything itself; every message goes to `Frontend`.
//!
//! Why UDP is not served by hickory-server: its UDP path spawns a task and decodes a
//! full `MessageRequest` per datagram, and its `ResponseHandler` only accepts a
//! `MessageResponse` of hickory records, so a cached wire answer would be decoded and
//! re-encoded on every hit. The measured difference is in docs/benchmarks-dns.md
//! (`--udp-mode hickory` keeps that path selectable for comparison).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Header, HeaderCounts, Message, Metadata, ResponseCode};
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use socket2::{Domain, Protocol as SockProto, Socket, Type};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::sys::socket::{
    recvmmsg, sendmmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage,
};
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;

use super::frontend::{Frontend, Local, Proto};
use super::sockopt::set_rcvbuf;
use super::{DnsError, UdpMode};

/// Socket receive buffer for UDP listeners: room for bursts of 500+ outstanding
/// queries while both cores are busy.
const UDP_RCVBUF: usize = 4 << 20;
/// Largest query datagram read; longer ones are cut and answered FORMERR.
const UDP_QUERY_MAX: usize = 4096;

fn bind_udp_std(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::DGRAM, Some(SockProto::UDP))?;
    if addr.is_ipv6() {
        // 0.0.0.0:53 and [::]:53 are separate sockets (DESIGN §2 default).
        s.set_only_v6(true)?;
    }
    s.set_reuse_port(true)?;
    set_rcvbuf(&s, UDP_RCVBUF);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

fn bind_tcp_std(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::STREAM, Some(SockProto::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// Adapter from hickory-server's handler trait to the frontend.
struct HickoryHandler(Arc<Frontend>);

fn servfail_info(request: &Request) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = ResponseCode::ServFail;
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}

#[async_trait::async_trait]
impl RequestHandler for HickoryHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let proto = match request.protocol() {
            Protocol::Udp => Proto::Udp,
            _ => Proto::Tcp,
        };
        let Some(bytes) = self.0.handle_packet(request.as_slice(), proto).await else {
            return servfail_info(request);
        };
        let msg = match Message::from_vec(&bytes) {
            Ok(m) => m,
            Err(error) => {
                tracing::warn!(%error, "answer not re-encodable; sending SERVFAIL");
                let resp = MessageResponseBuilder::from_message_request(request)
                    .error_msg(&request.metadata, ResponseCode::ServFail);
                return response_handle
                    .send_response(resp)
                    .await
                    .unwrap_or_else(|_| servfail_info(request));
            }
        };
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(edns) = &msg.edns {
            builder.edns(edns);
        }
        let resp = builder.build(
            msg.metadata,
            msg.answers.iter(),
            msg.authorities.iter(),
            std::iter::empty(),
            msg.additionals.iter(),
        );
        match response_handle.send_response(resp).await {
            Ok(info) => info,
            Err(error) => {
                tracing::debug!(%error, "sending dns answer failed");
                servfail_info(request)
            }
        }
    }
}

/// Datagrams taken per recvmmsg(2) / sent per sendmmsg(2). Under load one syscall
/// then carries many queries; when idle a batch holds one.
const BATCH: usize = 32;

fn to_socket_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

/// How often a blocked UDP thread wakes to see whether it should stop.
const STOP_POLL: Duration = Duration::from_millis(200);

/// Serves one UDP socket on its own OS thread: a blocking recvmmsg(MSG_WAITFORONE)
/// takes whatever queries are queued (up to `BATCH`), cache hits and host records are
/// answered with one sendmmsg, and queries that need forwarding continue as tokio
/// tasks that answer on their own. A thread instead of a task: the hot path then
/// costs one syscall per batch each way, with no epoll/futex round trip per wake-up
/// (measured in docs/benchmarks-dns.md).
fn udp_thread(
    sock: Arc<std::net::UdpSocket>,
    fe: Arc<Frontend>,
    rt: tokio::runtime::Handle,
    stop: Arc<AtomicBool>,
) {
    let fd = sock.as_raw_fd();
    let mut bufs = vec![[0u8; UDP_QUERY_MAX]; BATCH];
    let mut got: Vec<(usize, Option<SocketAddr>)> = Vec::with_capacity(BATCH);
    let mut replies: Vec<(Vec<u8>, SocketAddr)> = Vec::with_capacity(BATCH);
    let mut recv_hdrs = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut send_hdrs = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    while !stop.load(Ordering::Relaxed) {
        got.clear();
        {
            let mut iovs: Vec<[IoSliceMut<'_>; 1]> = bufs
                .iter_mut()
                .map(|b| [IoSliceMut::new(&mut b[..])])
                .collect();
            match recvmmsg(
                fd,
                &mut recv_hdrs,
                iovs.iter_mut(),
                MsgFlags::MSG_WAITFORONE,
                None,
            ) {
                Ok(res) => {
                    got.extend(res.map(|m| (m.bytes, m.address.as_ref().and_then(to_socket_addr))))
                }
                Err(Errno::EAGAIN) | Err(Errno::EINTR) => continue, // SO_RCVTIMEO: check `stop`
                Err(error) => {
                    // ICMP errors from earlier sends surface here; keep serving.
                    tracing::debug!(%error, "udp receive error");
                    continue;
                }
            }
        }
        let now = Instant::now();
        replies.clear();
        for (i, &(n, src)) in got.iter().enumerate() {
            let Some(src) = src.filter(|a| a.port() != 0) else {
                continue; // cannot answer; hickory-server drops these too
            };
            let pkt = &bufs[i][..n.min(UDP_QUERY_MAX)];
            match fe.handle_local(pkt, Proto::Udp, now) {
                Local::Reply(resp) => replies.push((resp, src)),
                Local::Drop => {}
                Local::Forward(_) => {
                    let pkt = pkt.to_vec();
                    let fe = fe.clone();
                    let sock = sock.clone();
                    rt.spawn(async move {
                        let resp = match crate::dns::wire::parse_query(&pkt) {
                            Ok(q) => fe.forward(&q, &pkt, Proto::Udp).await,
                            Err(_) => return,
                        };
                        send_nowait(&sock, &resp, src);
                    });
                }
            }
        }
        if replies.is_empty() {
            continue;
        }
        let sent = {
            let iovs: Vec<[IoSlice<'_>; 1]> =
                replies.iter().map(|(r, _)| [IoSlice::new(r)]).collect();
            let addrs: Vec<Option<SockaddrStorage>> = replies
                .iter()
                .map(|(_, a)| Some(SockaddrStorage::from(*a)))
                .collect();
            sendmmsg(
                fd,
                &mut send_hdrs,
                &iovs,
                &addrs,
                [] as [ControlMessage<'_>; 0],
                MsgFlags::empty(),
            )
            .map(|r| r.count())
            .unwrap_or(0)
        };
        // Anything sendmmsg did not take (an error on one destination) goes one by one.
        for (resp, dst) in &replies[sent.min(replies.len())..] {
            send_nowait(&sock, resp, *dst);
        }
    }
}

/// Sends an answer from a task without blocking it: UDP replies are not worth
/// waiting for socket-buffer space; the client retries.
fn send_nowait(sock: &std::net::UdpSocket, resp: &[u8], dst: SocketAddr) {
    let addr = SockaddrStorage::from(dst);
    if let Err(error) =
        nix::sys::socket::sendto(sock.as_raw_fd(), resp, &addr, MsgFlags::MSG_DONTWAIT)
    {
        tracing::debug!(%error, %dst, "udp send failed");
    }
}

/// Running listeners.
pub struct Listeners {
    pub local_addrs: Vec<SocketAddr>,
    udp_threads: Vec<std::thread::JoinHandle<()>>,
    udp_stop: Arc<AtomicBool>,
    server_task: JoinHandle<()>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Listeners {
    pub async fn shutdown(mut self) {
        self.udp_stop.store(true, Ordering::Relaxed);
        let threads = std::mem::take(&mut self.udp_threads);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.server_task).await;
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        // Threads see the flag within STOP_POLL and exit; not joined here (Drop may
        // run on a runtime thread).
        self.udp_stop.store(true, Ordering::Relaxed);
        self.server_task.abort();
    }
}

/// Binds every listen address (UDP and TCP on the same port; port 0 picks one) and
/// starts serving.
pub fn start(
    fe: Arc<Frontend>,
    listen: &[SocketAddr],
    workers: usize,
    mode: UdpMode,
    tcp_timeout: Duration,
) -> Result<Listeners, DnsError> {
    let mut server = Server::new(HickoryHandler(fe.clone()));
    let mut udp_threads = Vec::new();
    let udp_stop = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Handle::current();
    let mut local_addrs = Vec::new();
    for &addr in listen {
        let bind_err = |proto: &'static str| {
            move |source: std::io::Error| DnsError::Bind {
                addr,
                proto,
                source,
            }
        };
        let first = bind_udp_std(addr).map_err(bind_err("udp"))?;
        let bound = first.local_addr().map_err(bind_err("udp"))?;
        let mut udp = vec![first];
        if mode == UdpMode::Native {
            for _ in 1..workers.max(1) {
                udp.push(bind_udp_std(bound).map_err(bind_err("udp"))?);
            }
        }
        let tcp = bind_tcp_std(bound).map_err(bind_err("tcp"))?;
        for s in udp {
            match mode {
                UdpMode::Native => {
                    s.set_nonblocking(false).map_err(bind_err("udp"))?;
                    s.set_read_timeout(Some(STOP_POLL))
                        .map_err(bind_err("udp"))?;
                    let (fe, rt, stop) = (fe.clone(), rt.clone(), udp_stop.clone());
                    let t = std::thread::Builder::new()
                        .name("dns-udp".into())
                        .spawn(move || udp_thread(Arc::new(s), fe, rt, stop))
                        .map_err(bind_err("udp"))?;
                    udp_threads.push(t);
                }
                UdpMode::Hickory => {
                    server.register_socket(UdpSocket::from_std(s).map_err(bind_err("udp"))?)
                }
            }
        }
        server.register_listener(
            TcpListener::from_std(tcp).map_err(bind_err("tcp"))?,
            tcp_timeout,
            64,
        );
        tracing::info!(addr = %bound, udp_mode = ?mode, workers, "dns frontend listening");
        local_addrs.push(bound);
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server_task = tokio::spawn(async move {
        let stopped = tokio::select! {
            r = server.block_until_done() => {
                if let Err(error) = r {
                    tracing::error!(%error, "dns tcp server stopped");
                }
                false
            }
            _ = stop_rx => true,
        };
        if stopped {
            if let Err(error) = server.shutdown_gracefully().await {
                tracing::debug!(%error, "dns tcp server shutdown");
            }
        }
    });
    Ok(Listeners {
        local_addrs,
        udp_threads,
        udp_stop,
        server_task,
        stop: Some(stop_tx),
    })
}
