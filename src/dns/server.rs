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

use nix::sys::socket::{
    recvmmsg, sendmmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage,
};
use tokio::io::Interest;
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;

use super::frontend::{Frontend, Local, Proto};
use super::{DnsError, UdpMode};

/// Socket receive buffer for UDP listeners: room for bursts of 500+ outstanding
/// queries while both cores are busy.
const UDP_RCVBUF: usize = 4 << 20;
/// Largest query datagram read; longer ones are cut and answered FORMERR.
const UDP_QUERY_MAX: usize = 4096;

/// Raises a socket's receive buffer: SO_RCVBUFFORCE when we have CAP_NET_ADMIN
/// (`meduza run` does), else SO_RCVBUF capped by net.core.rmem_max (212 KiB by
/// default, about 200 small datagrams: too few for 500 outstanding queries).
pub(crate) fn set_rcvbuf<F: std::os::fd::AsFd>(fd: &F, bytes: usize) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(fd, sockopt::RcvBufForce, &bytes).is_err() {
        let _ = setsockopt(fd, sockopt::RcvBuf, &bytes);
    }
}

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

/// Serves one UDP socket: batches of queries in, batches of answers out; forwarded
/// queries continue in their own task and answer on their own.
async fn udp_loop(sock: Arc<UdpSocket>, fe: Arc<Frontend>) {
    let fd = sock.as_raw_fd();
    let mut bufs = vec![[0u8; UDP_QUERY_MAX]; BATCH];
    let mut got: Vec<(usize, Option<SocketAddr>)> = Vec::with_capacity(BATCH);
    let mut replies: Vec<(Vec<u8>, SocketAddr)> = Vec::with_capacity(BATCH);
    loop {
        if let Err(error) = sock.readable().await {
            tracing::warn!(%error, "udp socket failed");
            return;
        }
        got.clear();
        let received = sock.try_io(Interest::READABLE, || {
            // MultiHeaders holds raw pointers (not Send): built per batch, never
            // kept across an await.
            let mut recv_hdrs = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
            let mut iovs: Vec<[IoSliceMut<'_>; 1]> = bufs
                .iter_mut()
                .map(|b| [IoSliceMut::new(&mut b[..])])
                .collect();
            let res = recvmmsg(
                fd,
                &mut recv_hdrs,
                iovs.iter_mut(),
                MsgFlags::MSG_DONTWAIT,
                None,
            )
            .map_err(std::io::Error::from)?;
            got.extend(res.map(|m| (m.bytes, m.address.as_ref().and_then(to_socket_addr))));
            Ok(())
        });
        match received {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(error) => {
                // ICMP errors from earlier sends surface here; keep serving.
                tracing::debug!(%error, "udp receive error");
                continue;
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
                    tokio::spawn(async move {
                        let resp = match crate::dns::wire::parse_query(&pkt) {
                            Ok(q) => fe.forward(&q, &pkt, Proto::Udp).await,
                            Err(_) => return,
                        };
                        send(&sock, &resp, src).await;
                    });
                }
            }
        }
        if replies.is_empty() {
            continue;
        }
        let sent = {
            let mut send_hdrs = MultiHeaders::<SockaddrStorage>::preallocate(replies.len(), None);
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
                MsgFlags::MSG_DONTWAIT,
            )
            .map(|r| r.count())
            .unwrap_or(0)
        };
        // Whatever the kernel did not take at once (full send buffer) goes the slow way.
        for (resp, dst) in &replies[sent.min(replies.len())..] {
            send(&sock, resp, *dst).await;
        }
    }
}

async fn send(sock: &UdpSocket, resp: &[u8], dst: SocketAddr) {
    let r = match sock.try_send_to(resp, dst) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => sock.send_to(resp, dst).await,
        r => r,
    };
    if let Err(error) = r {
        tracing::debug!(%error, %dst, "udp send failed");
    }
}

/// Running listeners.
pub struct Listeners {
    pub local_addrs: Vec<SocketAddr>,
    udp_tasks: Vec<JoinHandle<()>>,
    server_task: JoinHandle<()>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Listeners {
    pub async fn shutdown(mut self) {
        for t in &self.udp_tasks {
            t.abort();
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.server_task).await;
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        for t in &self.udp_tasks {
            t.abort();
        }
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
    let mut udp_tasks = Vec::new();
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
            let s = UdpSocket::from_std(s).map_err(bind_err("udp"))?;
            match mode {
                UdpMode::Native => udp_tasks.push(tokio::spawn(udp_loop(Arc::new(s), fe.clone()))),
                UdpMode::Hickory => server.register_socket(s),
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
        udp_tasks,
        server_task,
        stop: Some(stop_tx),
    })
}
