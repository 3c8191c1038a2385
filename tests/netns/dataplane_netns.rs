//! Real traffic through the data plane, in network namespaces (needs root, `nft`,
//! `ip`, `wireguard-go`, `wg`, `busybox` for ping).
//!
//! A LAN client, a gateway where meduza's data plane runs (on threads moved into the
//! gateway namespace), a transparent listener on 7893 standing in for mihomo, and an
//! "internet" host with TCP/UDP record servers. See `tests/support/src/netns.rs` for the
//! topology.

use meduza_test_support::netns;
use meduza_test_support::process::wg_keypair;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use meduza::dataplane::nfnl;
use meduza::dataplane::task::netlink_triggers;
use meduza::dataplane::wireguard::{AutoWg, LinkOps, WgImpl, WgLinkStatus, WgManager};
use meduza::dataplane::{spawn_task, ApplyReport, Dataplane, NetlinkNft, NftChange, RtnlRouting};
use meduza_generators::plan::tproxy::TproxyPlan;
use meduza_generators::plan::wireguard::{WgDevice, WgPeer};
use netns::{Netns, Topology};

const APP_PORT: u16 = 7000;
const EXCLUDED_PORT: u16 = 5555;
const GW_LOCAL_PORT: u16 = 7001;
const TPROXY_PORT: u16 = 7893;
const WAIT: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------
// Record servers
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Hit {
    proto: &'static str,
    token: String,
    /// For the transparent listener: the original destination.
    local: SocketAddr,
    peer: SocketAddr,
}

#[derive(Debug, Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Hit>>>);

impl Recorder {
    fn push(&self, h: Hit) {
        self.0.lock().unwrap().push(h);
    }
    fn find(&self, token: &str) -> Option<Hit> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .find(|h| h.token == token)
            .cloned()
    }
    fn wait(&self, token: &str) -> Option<Hit> {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(h) = self.find(token) {
                return Some(h);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

fn canon(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn set_int(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    // SAFETY: `fd` is an open socket; the option value is a c_int on the stack whose
    // size is passed alongside it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt {level}/{name}: {}",
        std::io::Error::last_os_error()
    );
}

fn new_socket(v6: bool, stream: bool) -> OwnedFd {
    let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    let ty = if stream {
        libc::SOCK_STREAM
    } else {
        libc::SOCK_DGRAM
    };
    // SAFETY: plain socket(2) call; the result is checked before being wrapped.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor we own exclusively.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn bind_fd(fd: &OwnedFd, addr: SocketAddr) {
    let ss: nix::sys::socket::SockaddrStorage = addr.into();
    nix::sys::socket::bind(fd.as_raw_fd(), &ss).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
}

/// A socket like mihomo's TPROXY listener: IP(V6)_TRANSPARENT, and for UDP the
/// original destination delivered as ancillary data.
fn transparent_socket(v6: bool, stream: bool) -> OwnedFd {
    let fd = new_socket(v6, stream);
    set_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
    if v6 {
        set_int(&fd, libc::SOL_IPV6, libc::IPV6_V6ONLY, 1);
        set_int(&fd, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1);
        if !stream {
            set_int(&fd, libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR, 1);
        }
    } else {
        set_int(&fd, libc::SOL_IP, libc::IP_TRANSPARENT, 1);
        if !stream {
            set_int(&fd, libc::SOL_IP, libc::IP_RECVORIGDSTADDR, 1);
        }
    }
    let addr: SocketAddr = if v6 {
        SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), TPROXY_PORT)
    } else {
        SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), TPROXY_PORT)
    };
    bind_fd(&fd, addr);
    if stream {
        nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(64).unwrap()).unwrap();
    }
    fd
}

fn serve_tcp(listener: TcpListener, rec: Recorder) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let rec = rec.clone();
            std::thread::spawn(move || {
                stream.set_read_timeout(Some(WAIT)).ok();
                let local = canon(stream.local_addr().unwrap());
                let peer = canon(stream.peer_addr().unwrap());
                let mut line = String::new();
                let mut r = BufReader::new(&stream);
                if r.read_line(&mut line).is_ok() {
                    rec.push(Hit {
                        proto: "tcp",
                        token: line.trim().to_string(),
                        local,
                        peer,
                    });
                    let _ = (&stream).write_all(b"ack\n");
                }
            });
        }
    });
}

fn serve_udp_plain(sock: UdpSocket, rec: Recorder) {
    std::thread::spawn(move || {
        let local = canon(sock.local_addr().unwrap());
        let mut buf = [0u8; 512];
        while let Ok((n, peer)) = sock.recv_from(&mut buf) {
            rec.push(Hit {
                proto: "udp",
                token: String::from_utf8_lossy(&buf[..n]).trim().to_string(),
                local,
                peer: canon(peer),
            });
        }
    });
}

/// UDP via TPROXY: the original destination comes as IP(V6)_ORIGDSTADDR.
fn serve_udp_transparent(fd: OwnedFd, rec: Recorder) {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrStorage};
    std::thread::spawn(move || loop {
        let mut buf = [0u8; 512];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!(libc::sockaddr_in6);
        let Ok(msg) = recvmsg::<SockaddrStorage>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        ) else {
            return;
        };
        let peer = msg.address.and_then(|a| {
            a.as_sockaddr_in()
                .map(|s| SocketAddr::from(std::net::SocketAddrV4::from(*s)))
                .or_else(|| {
                    a.as_sockaddr_in6()
                        .map(|s| SocketAddr::from(std::net::SocketAddrV6::from(*s)))
                })
        });
        let mut orig = None;
        for c in msg.cmsgs().unwrap() {
            match c {
                ControlMessageOwned::Ipv4OrigDstAddr(sa) => {
                    orig = Some(SocketAddr::new(
                        IpAddr::V4(std::net::Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr))),
                        u16::from_be(sa.sin_port),
                    ))
                }
                ControlMessageOwned::Ipv6OrigDstAddr(sa) => {
                    orig = Some(SocketAddr::new(
                        IpAddr::V6(std::net::Ipv6Addr::from(sa.sin6_addr.s6_addr)),
                        u16::from_be(sa.sin6_port),
                    ))
                }
                _ => {}
            }
        }
        let n = msg.bytes;
        let token = String::from_utf8_lossy(&buf[..n]).trim().to_string();
        if let (Some(peer), Some(local)) = (peer, orig) {
            rec.push(Hit {
                proto: "udp",
                token,
                local,
                peer,
            });
        }
    });
}

/// TCP and UDP record servers on `[::]:port` (dual stack) in `ns`.
fn record_servers(ns: &Netns, ports: &[u16], rec: &Recorder) {
    for &port in ports {
        let rec = rec.clone();
        let (tcp, udp) = ns.run_in(move || {
            (
                TcpListener::bind(("::", port)).unwrap(),
                UdpSocket::bind(("::", port)).unwrap(),
            )
        });
        serve_tcp(tcp, rec.clone());
        serve_udp_plain(udp, rec);
    }
}

/// The mihomo stand-in: transparent TCP and UDP listeners on 7893, IPv4 and IPv6.
fn transparent_listener(gw: &Netns, rec: &Recorder) {
    for v6 in [false, true] {
        let (tcp, udp) =
            gw.run_in(move || (transparent_socket(v6, true), transparent_socket(v6, false)));
        serve_tcp(TcpListener::from(tcp), rec.clone());
        serve_udp_transparent(udp, rec.clone());
    }
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

fn send(ns: &Netns, proto: &'static str, src: IpAddr, dst: SocketAddr, token: &str) {
    let token = token.to_string();
    ns.run_in(move || match proto {
        "tcp" => {
            let fd = new_socket(src.is_ipv6(), true);
            bind_fd(&fd, SocketAddr::new(src, 0));
            let stream = TcpStream::from(fd);
            stream.set_read_timeout(Some(WAIT)).unwrap();
            stream.set_write_timeout(Some(WAIT)).unwrap();
            let ss: nix::sys::socket::SockaddrStorage = dst.into();
            // connect(2) honours SO_SNDTIMEO, so a dropped SYN fails in WAIT.
            nix::sys::socket::connect(stream.as_raw_fd(), &ss)
                .unwrap_or_else(|e| panic!("tcp connect {src} -> {dst}: {e}"));
            (&stream)
                .write_all(format!("{token}\n").as_bytes())
                .unwrap();
            let mut reply = String::new();
            let _ = (&stream).read_to_string(&mut reply);
            assert_eq!(reply, "ack\n", "tcp {src} -> {dst}: no ack");
        }
        _ => {
            let sock = UdpSocket::bind(SocketAddr::new(src, 0)).unwrap();
            sock.send_to(token.as_bytes(), dst).unwrap();
        }
    });
}

struct Env {
    topo: Topology,
    tproxy: Recorder,
    server: Recorder,
    gw_local: Recorder,
}

fn env(tag: &str) -> Env {
    let topo = Topology::new(tag);
    let (tproxy, server, gw_local) = (
        Recorder::default(),
        Recorder::default(),
        Recorder::default(),
    );
    record_servers(&topo.inet, &[APP_PORT, EXCLUDED_PORT], &server);
    record_servers(&topo.gw, &[GW_LOCAL_PORT], &gw_local);
    transparent_listener(&topo.gw, &tproxy);
    Env {
        topo,
        tproxy,
        server,
        gw_local,
    }
}

fn token(label: &str, proto: &str, src: IpAddr, dst: SocketAddr) -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    format!("{label}-{proto}-{src}-{dst}-{n}")
}

/// The packet reaches the transparent listener with its original destination.
fn expect_intercepted(e: &Env, proto: &'static str, src: IpAddr, dst: SocketAddr) {
    let t = token("tproxy", proto, src, dst);
    send(&e.topo.lan, proto, src, dst, &t);
    let hit = e
        .tproxy
        .wait(&t)
        .unwrap_or_else(|| panic!("{proto} {src} -> {dst} did not reach the transparent listener"));
    assert_eq!(hit.proto, proto);
    assert_eq!(
        hit.local, dst,
        "original destination of {proto} {src} -> {dst}"
    );
    assert_eq!(hit.peer.ip(), src);
    assert!(e.server.find(&t).is_none() && e.gw_local.find(&t).is_none());
}

/// The packet reaches `rec` (the real destination) unchanged and not the listener.
fn expect_direct(e: &Env, rec: &Recorder, proto: &'static str, src: IpAddr, dst: SocketAddr) {
    let t = token("direct", proto, src, dst);
    send(&e.topo.lan, proto, src, dst, &t);
    let hit = rec
        .wait(&t)
        .unwrap_or_else(|| panic!("{proto} {src} -> {dst} did not reach its destination directly"));
    assert_eq!(hit.peer.ip(), src);
    assert!(
        e.tproxy.find(&t).is_none(),
        "{proto} {src} -> {dst} was intercepted"
    );
}

fn plan() -> TproxyPlan {
    let mut p = TproxyPlan::empty();
    p.proxy_src = [
        Topology::LAN4,
        Topology::LAN6,
        Topology::MESH4,
        Topology::MESH6,
    ]
    .iter()
    .map(|c| c.parse().unwrap())
    .collect();
    p.bypass_dst = vec![
        Topology::LAN4.parse().unwrap(),
        Topology::LAN6.parse().unwrap(),
    ];
    p.exclude_src = vec!["192.168.50.254".parse().unwrap()];
    p.exclude_ifaces = vec![Topology::GW_MESH_IF.to_string()];
    p.exclude_ports = vec![EXCLUDED_PORT];
    p
}

/// A foreign table like fw4's or docker's, with a counter on forwarded packets.
fn add_foreign_table(gw: &Netns) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(
        b"table inet fw4_standin {\n\tchain forward {\n\t\ttype filter hook forward priority 0; policy accept;\n\t\tcounter\n\t}\n}\n",
    )
    .unwrap();
    gw.exec(&["nft", "-f", f.path().to_str().unwrap()]);
    f
}

fn foreign_table_packets(gw: &Netns) -> u64 {
    let out = gw.exec(&["nft", "-j", "list", "table", "inet", "fw4_standin"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("rule"))
        .flat_map(|r| r["expr"].as_array().unwrap().clone())
        .find_map(|x| x["counter"]["packets"].as_u64())
        .expect("fw4_standin lost its counter rule")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn real_dataplane() -> Dataplane<NetlinkNft, RtnlRouting> {
    Dataplane::new(NetlinkNft::from_env(), RtnlRouting::new().unwrap())
}

/// Apply twice inside the gateway: returns both reports and the nftables
/// generation before and after the second apply.
fn gw_apply_twice(gw: &Netns, plan: TproxyPlan) -> (ApplyReport, ApplyReport, u32, u32) {
    gw.run_in(move || {
        rt().block_on(async {
            let dp = real_dataplane();
            let first = dp.apply(&plan).await.unwrap();
            let g1 = nfnl::generation().unwrap();
            let second = dp.apply(&plan).await.unwrap();
            let g2 = nfnl::generation().unwrap();
            (first, second, g1, g2)
        })
    })
}

fn gw_remove(gw: &Netns) -> ApplyReport {
    gw.run_in(|| rt().block_on(async { real_dataplane().remove().await.unwrap() }))
}

fn addr(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

#[test]
fn tproxy_intercepts_lan_traffic_and_everything_else_goes_direct() {
    let e = env("tp");
    let gw = &e.topo.gw;
    let _foreign = add_foreign_table(gw);

    let (first, second, g1, g2) = gw_apply_twice(gw, plan());
    assert_eq!(first.nft, NftChange::Created);
    assert_eq!(first.routing.len(), 4);
    assert_eq!(
        second.nft,
        NftChange::Unchanged,
        "second apply must change nothing"
    );
    assert!(second.routing.is_empty());
    assert_eq!(g1, g2, "second apply bumped the ruleset generation");

    for proto in ["tcp", "udp"] {
        for v6 in [false, true] {
            let (client, other, mesh_client, wan): (IpAddr, IpAddr, IpAddr, IpAddr) = if v6 {
                (
                    Topology::CLIENT6.into(),
                    Topology::OTHER6.into(),
                    Topology::MESH_CLIENT6.into(),
                    Topology::GW_WAN6.into(),
                )
            } else {
                (
                    Topology::CLIENT4.into(),
                    Topology::OTHER4.into(),
                    Topology::MESH_CLIENT4.into(),
                    Topology::GW_WAN4.into(),
                )
            };
            let server = Topology::server(v6);
            // LAN source: intercepted with its original destination.
            expect_intercepted(&e, proto, client, addr(server, APP_PORT));
            // Source outside the LANs.
            expect_direct(&e, &e.server, proto, other, addr(server, APP_PORT));
            // A proxied source arriving over an excluded (mesh) interface.
            expect_direct(&e, &e.server, proto, mesh_client, addr(server, APP_PORT));
            // Excluded port.
            expect_direct(&e, &e.server, proto, client, addr(server, EXCLUDED_PORT));
            // Destination local to the gateway (its WAN address, not a LAN one).
            expect_direct(&e, &e.gw_local, proto, client, addr(wan, GW_LOCAL_PORT));
        }
    }
    let forwarded_before = foreign_table_packets(gw);
    assert!(
        forwarded_before > 0,
        "foreign table counted no forwarded packets"
    );

    let removed = gw_remove(gw);
    assert_eq!(removed.nft, NftChange::Deleted);
    assert_eq!(removed.routing.len(), 4);
    assert!(!gw.try_exec(&["nft", "list", "table", "inet", "meduza"]));
    assert!(!gw.ip(&["rule"]).contains("fwmark"));
    assert!(!gw.ip(&["-6", "rule"]).contains("fwmark"));
    assert_eq!(gw.ip(&["route", "show", "table", "100"]).trim(), "");
    assert_eq!(gw.ip(&["-6", "route", "show", "table", "100"]).trim(), "");
    for proto in ["tcp", "udp"] {
        for v6 in [false, true] {
            let client: IpAddr = if v6 {
                Topology::CLIENT6.into()
            } else {
                Topology::CLIENT4.into()
            };
            expect_direct(
                &e,
                &e.server,
                proto,
                client,
                addr(Topology::server(v6), APP_PORT),
            );
        }
    }
    assert!(
        foreign_table_packets(gw) > forwarded_before,
        "foreign table stopped counting"
    );
    assert_eq!(gw_remove(gw).nft, NftChange::Absent);
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what}: not within {limit:?}");
}

#[test]
fn drift_is_repaired_within_two_seconds() {
    let e = env("dr");
    let gw = &e.topo.gw;
    let _foreign = add_foreign_table(gw);
    let (cmd_tx, cmd_rx) = std::sync::mpsc::channel::<Option<TproxyPlan>>();
    let agent = gw.spawn_in(move || {
        rt().block_on(async move {
            let dp = Arc::new(real_dataplane());
            let handle = spawn_task(dp, Some(plan()), netlink_triggers().unwrap());
            let mut status = handle.status();
            loop {
                match cmd_rx.try_recv() {
                    Ok(desired) => handle.set(desired),
                    Err(std::sync::mpsc::TryRecvError::Empty) => {}
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let last = status.borrow_and_update().clone();
            handle.stop().await;
            last
        })
    });
    let table_present = || gw.try_exec(&["nft", "list", "table", "inet", "meduza"]);
    let rule_present = |fam: &str| gw.ip(&[fam, "rule"]).contains("fwmark 0x1 lookup 100");
    wait_until("initial apply", Duration::from_secs(5), || {
        table_present() && rule_present("-4") && rule_present("-6")
    });
    expect_intercepted(
        &e,
        "tcp",
        Topology::CLIENT4.into(),
        addr(Topology::SERVER4, APP_PORT),
    );

    gw.exec(&["nft", "delete", "table", "inet", "meduza"]);
    let took = wait_until("table repaired", Duration::from_secs(2), table_present);
    eprintln!("table repaired after {took:?}");
    gw.ip(&[
        "-4", "rule", "del", "pref", "9000", "fwmark", "0x1", "lookup", "100",
    ]);
    let took = wait_until("ip rule repaired", Duration::from_secs(2), || {
        rule_present("-4")
    });
    eprintln!("ip rule repaired after {took:?}");
    gw.ip(&[
        "-6", "route", "del", "local", "::/0", "dev", "lo", "table", "100",
    ]);
    wait_until("ipv6 local route repaired", Duration::from_secs(2), || {
        gw.ip(&["-6", "route", "show", "table", "100"])
            .contains("local default dev lo")
    });
    expect_intercepted(
        &e,
        "udp",
        Topology::CLIENT6.into(),
        addr(Topology::SERVER6, APP_PORT),
    );

    // A foreign change is no reason to touch our table.
    let handle_before = gw.exec(&["nft", "-a", "list", "table", "inet", "meduza"]);
    gw.exec(&["nft", "add", "chain", "inet", "fw4_standin", "extra"]);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        handle_before,
        gw.exec(&["nft", "-a", "list", "table", "inet", "meduza"])
    );

    cmd_tx.send(None).unwrap();
    wait_until("removal", Duration::from_secs(2), || {
        !table_present() && !rule_present("-4") && !rule_present("-6")
    });
    expect_direct(
        &e,
        &e.server,
        "tcp",
        Topology::CLIENT4.into(),
        addr(Topology::SERVER4, APP_PORT),
    );
    // Stays removed: the checks keep it absent rather than re-adding it.
    std::thread::sleep(Duration::from_millis(1200));
    assert!(!table_present());
    drop(cmd_tx);
    let last = agent.join().unwrap();
    assert!(last.changes >= 4, "task status: {last:?}");
    assert_eq!(last.errors, 0, "task status: {last:?}");
    assert!(foreign_table_packets(gw) > 0);
}

#[test]
fn cli_applies_shows_and_off_mode_touches_nothing() {
    let gw = Netns::new("cli");
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(serde_json::to_string(&plan()).unwrap().as_bytes())
        .unwrap();
    let plan_path = f.path().to_str().unwrap().to_string();
    let bin = env!("CARGO_BIN_EXE_meduza");
    let run = |extra_env: Option<(&str, &str)>, args: &[&str]| -> String {
        let mut argv = vec!["ip", "netns", "exec", gw.name()];
        if let Some((k, v)) = extra_env {
            argv.push("env");
            let kv = format!("{k}={v}");
            argv.push(Box::leak(kv.into_boxed_str()));
        }
        argv.push(bin);
        argv.extend_from_slice(args);
        netns::run(&argv)
    };
    let shown = run(None, &["dataplane", "show", "--plan", &plan_path]);
    assert!(shown.contains("tproxy ip to 127.0.0.1:7893 meta mark set 0x1 accept"));
    let off = run(
        Some(("MEDUZA_DATAPLANE", "off")),
        &["dataplane", "apply", "--plan", &plan_path],
    );
    assert!(off.contains("created"), "{off}");
    assert!(!gw.try_exec(&["nft", "list", "table", "inet", "meduza"]));
    assert!(!gw.ip(&["rule"]).contains("fwmark"));
    let applied = run(None, &["dataplane", "apply", "--plan", &plan_path]);
    assert!(
        applied.starts_with("table inet meduza created"),
        "{applied}"
    );
    let again = run(None, &["dataplane", "apply", "--plan", &plan_path]);
    assert_eq!(
        again.trim(),
        "table inet meduza unchanged; routing: unchanged"
    );
    // The ruleset text loads with plain `nft -f` and lists the same table.
    let text = run(None, &["dataplane", "ruleset", "--plan", &plan_path]);
    let removed = run(None, &["dataplane", "remove"]);
    assert!(
        removed.starts_with("table inet meduza deleted"),
        "{removed}"
    );
    let mut rf = tempfile::NamedTempFile::new().unwrap();
    rf.write_all(text.as_bytes()).unwrap();
    gw.exec(&["nft", "-f", rf.path().to_str().unwrap()]);
    let after_text = run(None, &["dataplane", "apply", "--plan", &plan_path]);
    assert!(
        after_text.starts_with("table inet meduza unchanged"),
        "table loaded from the text differs from the JSON one: {after_text}"
    );
}

// ---------------------------------------------------------------------------
// WireGuard
// ---------------------------------------------------------------------------

fn wg_device(
    dev: &str,
    key: &str,
    addr: &str,
    peer_key: &str,
    peer_ip: &str,
    endpoint: &str,
) -> WgDevice {
    WgDevice {
        name: dev.to_string(),
        dev: dev.to_string(),
        private_key: key.to_string(),
        listen_port: Some(51820),
        addresses: vec![addr.parse().unwrap()],
        peers: vec![WgPeer {
            name: "other".into(),
            public_key: peer_key.to_string(),
            preshared_key: None,
            allowed_ips: vec![peer_ip.parse().unwrap()],
            endpoint: Some(endpoint.parse().unwrap()),
            persistent_keepalive: Some(1),
        }],
    }
}

/// A WireGuard agent living in a namespace: a runtime thread applying devices on
/// request.
enum WgCmd {
    Apply(
        Vec<WgDevice>,
        std::sync::mpsc::Sender<Result<(usize, usize, bool), String>>,
    ),
    Status(String, std::sync::mpsc::Sender<(WgLinkStatus, WgImpl)>),
}

type WgAgent = tokio::sync::mpsc::UnboundedSender<WgCmd>;

fn wg_agent(ns: &Netns) -> WgAgent {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<WgCmd>();
    ns.spawn_in(move || {
        rt().block_on(async move {
            let links = LinkOps::new().unwrap();
            let mgr = WgManager::new(AutoWg::new(links.clone()), Some(links));
            while let Some(cmd) = rx.recv().await {
                match cmd {
                    WgCmd::Apply(devs, reply) => {
                        let r = mgr
                            .apply_all(&devs)
                            .await
                            .map(|r| {
                                r.first().map_or((0, 0, false), |d| {
                                    (d.peers_upserted, d.peers_removed, d.created)
                                })
                            })
                            .map_err(|e| e.to_string());
                        let _ = reply.send(r);
                    }
                    WgCmd::Status(dev, reply) => {
                        let s = mgr.status(&dev, std::time::SystemTime::now()).await;
                        let _ = reply.send((s, mgr.backend().implementation(&dev)));
                    }
                }
            }
        })
    });
    tx
}

fn wg_apply(agent: &WgAgent, devs: Vec<WgDevice>) -> (usize, usize, bool) {
    let (tx, rx) = std::sync::mpsc::channel();
    agent.send(WgCmd::Apply(devs, tx)).unwrap();
    rx.recv_timeout(Duration::from_secs(20)).unwrap().unwrap()
}

fn wg_status(agent: &WgAgent, dev: &str) -> (WgLinkStatus, WgImpl) {
    let (tx, rx) = std::sync::mpsc::channel();
    agent.send(WgCmd::Status(dev.to_string(), tx)).unwrap();
    rx.recv_timeout(Duration::from_secs(20)).unwrap()
}

/// Whether the running kernel offers WireGuard: the rtnetlink request `AutoWg` tries
/// first (`ip link add ... type wireguard`, which also loads the module on demand),
/// made in a scratch namespace so nothing outside it changes.
fn kernel_has_wireguard() -> bool {
    let probe = Netns::new("wgp");
    netns::try_run(&[
        "ip",
        "-n",
        probe.name(),
        "link",
        "add",
        "wgprobe",
        "type",
        "wireguard",
    ])
}

#[test]
fn wireguard_gateways_handshake_and_ping() {
    let expected = if kernel_has_wireguard() {
        WgImpl::Kernel
    } else {
        WgImpl::Userspace
    };
    let a = Netns::new("wga");
    let b = Netns::new("wgb");
    netns::veth(&a, "eth0", &b, "eth0");
    netns::addr(&a, "eth0", "10.0.0.1/24");
    netns::addr(&b, "eth0", "10.0.0.2/24");
    // UAPI sockets live in one global directory: device names must be unique.
    let pid = std::process::id() % 100_000;
    let (dev_a, dev_b) = (format!("wgt{pid}a"), format!("wgt{pid}b"));
    let (ka, pa) = wg_keypair();
    let (kb, pb) = wg_keypair();
    let agent_a = wg_agent(&a);
    let agent_b = wg_agent(&b);
    let dev_a_cfg = wg_device(
        &dev_a,
        &ka,
        "10.9.0.1/24",
        &pb,
        "10.9.0.2/32",
        "10.0.0.2:51820",
    );
    let dev_b_cfg = wg_device(
        &dev_b,
        &kb,
        "10.9.0.2/24",
        &pa,
        "10.9.0.1/32",
        "10.0.0.1:51820",
    );
    assert_eq!(wg_apply(&agent_a, vec![dev_a_cfg.clone()]), (1, 0, true));
    assert_eq!(wg_apply(&agent_b, vec![dev_b_cfg.clone()]), (1, 0, true));
    // Converged: nothing sent again.
    assert_eq!(wg_apply(&agent_a, vec![dev_a_cfg.clone()]), (0, 0, false));

    wait_until("ping over wireguard", Duration::from_secs(15), || {
        a.try_exec(&["busybox", "ping", "-c", "1", "-W", "1", "10.9.0.2"])
    });
    let (status, imp) = wg_status(&agent_a, &dev_a);
    assert_eq!(status, WgLinkStatus::Up);
    // AutoWg serves the device with what this kernel offers: its own WireGuard
    // when `type wireguard` links can be created, else wireguard-go (a TUN device
    // with a UAPI socket). The QEMU boot test covers the kernel case on a kernel
    // that has the module.
    assert_eq!(
        imp, expected,
        "AutoWg did not use what the running kernel offers"
    );
    let details = a.ip(&["-d", "link", "show", &dev_a]);
    let kind = match expected {
        WgImpl::Kernel => "wireguard",
        WgImpl::Userspace => "tun type tun",
    };
    assert!(
        details.contains(kind),
        "{dev_a} is not a {kind} link: {details}"
    );
    assert_eq!(
        std::path::Path::new(&format!("/var/run/wireguard/{dev_a}.sock")).exists(),
        expected == WgImpl::Userspace,
        "UAPI socket of {dev_a}"
    );

    // Peers change in place: same interface index before and after.
    let index_before = a.ip(&["-o", "link", "show", &dev_a]);
    let (_, extra_pub) = wg_keypair();
    let mut more = dev_a_cfg.clone();
    more.peers.push(WgPeer {
        name: "extra".into(),
        public_key: extra_pub,
        preshared_key: None,
        allowed_ips: vec!["10.9.0.3/32".parse().unwrap()],
        endpoint: None,
        persistent_keepalive: None,
    });
    assert_eq!(wg_apply(&agent_a, vec![more]), (1, 0, false));
    assert_eq!(wg_apply(&agent_a, vec![dev_a_cfg.clone()]), (0, 1, false));
    let index_after = a.ip(&["-o", "link", "show", &dev_a]);
    assert_eq!(
        index_before.split(':').next(),
        index_after.split(':').next(),
        "device was recreated"
    );
    assert!(a.try_exec(&["busybox", "ping", "-c", "1", "-W", "2", "10.9.0.2"]));

    // Removing the device from the plan deletes it.
    wg_apply(&agent_a, vec![]);
    wg_apply(&agent_b, vec![]);
    assert!(!netns::try_run(&[
        "ip",
        "-n",
        a.name(),
        "link",
        "show",
        &dev_a
    ]));
    assert!(!std::path::Path::new(&format!("/var/run/wireguard/{dev_a}.sock")).exists());
    assert_eq!(wg_status(&agent_a, &dev_a).0, WgLinkStatus::Down);
}

#[test]
fn ten_thousand_cidrs_apply_once_and_compare_equal() {
    let gw = Netns::new("big");
    let mut p = plan();
    p.proxy_src = (0..10_000u32)
        .map(|i| {
            let a = std::net::Ipv4Addr::from(0x0a00_0000 + (i << 9));
            ipnet::IpNet::new(IpAddr::V4(a), 24).unwrap()
        })
        .chain((0..1_000u16).map(|i| {
            let a = std::net::Ipv6Addr::new(0xfd10, i * 2, 0, 0, 0, 0, 0, 0);
            ipnet::IpNet::new(IpAddr::V6(a), 32).unwrap()
        }))
        .collect();
    let (first, second, g1, g2) = gw_apply_twice(&gw, p);
    assert_eq!(first.nft, NftChange::Created);
    assert_eq!(second.nft, NftChange::Unchanged);
    assert_eq!(g1, g2);
    let listed = gw.exec(&["nft", "list", "set", "inet", "meduza", "proxy_src4"]);
    assert!(listed.contains("10.0.2.0/24") && listed.contains("10.78.30.0/24"));
}
