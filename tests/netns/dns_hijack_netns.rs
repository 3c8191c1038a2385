//! DNS hijack and bypass blocking end to end (docs/dns.md), with the real mihomo
//! v1.19.2 in the gateway lab (`tests/support/src/gateway_lab.rs`): `meduza run` in the
//! gateway namespace, etcd, the proxy node, and a LAN client.
//!
//! What it proves, in order:
//! 1. with TPROXY applied, a LAN client's query to `8.8.8.8` (and to Google's IPv6
//!    resolver, and over TCP) is answered by the gateway's frontend: the answer is an
//!    etcd host record (`/dns/hosts/...`), which no resolver but the frontend knows;
//! 2. an excluded source (`DEFAULT_GW`) is not hijacked: its query gets no answer
//!    (the lab's "internet" has no 8.8.8.8, so nothing ever leaves the lab);
//! 3. with `dns/block_quic` and `dns/block_dot`, UDP 443 gets an ICMP port
//!    unreachable and TCP 853 a reset at once (IPv4 and IPv6), measured;
//! 4. `dns/hijack` false removes the hijack chain and the frontend's answer with it;
//! 5. the gateway's own resolver file (setting `resolv_conf`) points at the frontend:
//!    the gateway namespace's own lookups get the host record, and the file is
//!    restored after something else rewrites it.
//!
//! Needs root, etcd, nftables, iproute2, dig and the real mihomo (scripts/install-deps).

use meduza_test_support::{gateway_lab, netns};

use gateway_lab::{dig, figure, node_proxy, wait_for, Lab, Mihomo, HTTP_PORT, NODE, NODE_PORT};
use netns::Topology;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

const API_TOKEN: &str = "lab-api-token-0123456789";
const HOST: &str = "hijacked.lab.test";
const HOST_ADDR: &str = "10.11.12.13";
/// An address inside the node's `lan` that is also `DEFAULT_GW`: excluded.
const EXCLUDED_SRC: &str = "192.168.50.3";
/// A rejected connection must fail faster than this (no timeout involved).
const FAST: Duration = Duration::from_millis(100);

fn nft_table(lab: &Lab) -> String {
    Command::new("ip")
        .args(["netns", "exec", lab.topo.gw.name(), "nft", "list", "table"])
        .args(["inet", "meduza"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default()
}

fn wait_table(lab: &Lab, what: &str, ok: impl Fn(&str) -> bool) {
    wait_for(what, Duration::from_secs(60), || {
        ok(&nft_table(lab)).then_some(())
    });
}

/// `/etc/netns/<ns>/resolv.conf`, which `ip netns exec <ns>` bind-mounts over
/// `/etc/resolv.conf`: the gateway namespace's own resolver file, and only its.
/// The directory is removed on drop.
struct NetnsResolvConf(std::path::PathBuf);

impl NetnsResolvConf {
    fn new(ns: &str) -> Self {
        let dir = std::path::Path::new("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir).expect("/etc/netns/<ns>");
        Self(dir)
    }

    fn path(&self) -> std::path::PathBuf {
        self.0.join("resolv.conf")
    }

    fn read(&self) -> String {
        std::fs::read_to_string(self.path()).unwrap_or_default()
    }
}

impl Drop for NetnsResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn lan_dns_is_hijacked_and_bypasses_are_rejected_at_once() {
    let mut lab = Lab::new();
    let node = |k: &str| format!("/nodes/{NODE}/{k}");
    let url = |p: &str| format!("http://{}:{HTTP_PORT}{p}", Topology::SERVER4);
    lab.serve(
        "/sub.yaml",
        &format!("proxies:\n  - {}\n", node_proxy("node-a", NODE_PORT)),
    );
    lab.put("/global/clash/subscriptions/sub/url", &url("/sub.yaml"));
    lab.put_health_keys(1, 1000);
    lab.put(&format!("/dns/hosts/{HOST}"), HOST_ADDR);
    lab.put_node(&[
        ("lan", &format!("{}\n{}", Topology::LAN4, Topology::LAN6)),
        ("api/token", API_TOKEN),
        ("clash/enable", "true"),
        ("clash/mode", "tproxy"),
        ("clash/active_subscription", "sub"),
    ]);
    lab.put("/commit", "1");
    lab.topo
        .lan
        .ip(&["addr", "add", &format!("{EXCLUDED_SRC}/24"), "dev", "eth0"]);
    // One global IPv6 address on the gateway's LAN side: `redirect` takes the
    // interface's first global address while the frontend answers from the one the
    // kernel picks for the client (docs/dns.md, "IPv6 and several LAN prefixes").
    lab.topo
        .gw
        .ip(&["-6", "addr", "del", "fd00:60::1/64", "dev", "lan0"]);
    // The frontend on the wildcard addresses (the firmware's default): `redirect`
    // hands the query to the LAN interface's own address.
    let resolv = NetnsResolvConf::new(lab.topo.gw.name());
    let resolv_path = resolv.path().display().to_string();
    lab.start_meduza(
        Mihomo::Real,
        &[
            ("MEDUZA_DNS_LISTEN", "0.0.0.0:53,[::]:53"),
            ("DEFAULT_GW", EXCLUDED_SRC),
            ("MEDUZA_RESOLV_CONF", &resolv_path),
        ],
    );

    // 1. TPROXY applied with the hijack chain: 8.8.8.8 answers with the host record.
    wait_table(&lab, "TPROXY with the hijack chain", |t| {
        t.contains("chain dns_hijack") && t.contains("redirect to :53")
    });
    let t = Instant::now();
    assert_eq!(
        dig(&lab.topo.lan, &["@8.8.8.8", HOST, "A"]),
        HOST_ADDR,
        "UDP, IPv4"
    );
    figure("hijacked_query", t.elapsed());
    assert_eq!(
        dig(&lab.topo.lan, &["+tcp", "@8.8.8.8", HOST, "A"]),
        HOST_ADDR,
        "TCP, IPv4"
    );
    assert_eq!(
        dig(&lab.topo.lan, &["@2001:4860:4860::8888", HOST, "A"]),
        HOST_ADDR,
        "UDP, IPv6"
    );
    assert_eq!(
        dig(&lab.topo.lan, &["+tcp", "@2001:4860:4860::8888", HOST, "A"]),
        HOST_ADDR,
        "TCP, IPv6"
    );

    // 2. The excluded source is not hijacked: no resolver answers it in the lab.
    let excluded = dig(&lab.topo.lan, &["-b", EXCLUDED_SRC, "@8.8.8.8", HOST, "A"]);
    assert!(
        !excluded.contains(HOST_ADDR),
        "excluded source hijacked: {excluded}"
    );

    // 3. QUIC and DoT blocked: rejected at once, never silently dropped.
    lab.put(&node("dns/block_quic"), "true");
    lab.put(&node("dns/block_dot"), "true");
    lab.put("/commit", "2");
    wait_table(&lab, "the QUIC and DoT rejects", |t| {
        t.contains("udp dport 443 reject") && t.contains("tcp dport 853 reject with tcp reset")
    });
    for v6 in [false, true] {
        let server: IpAddr = Topology::server(v6);
        let (kind, took) = lab.lan_udp_refused(SocketAddr::new(server, 443));
        assert_eq!(kind, ErrorKind::ConnectionRefused, "QUIC (IPv6 {v6})");
        assert!(took < FAST, "QUIC rejected after {took:?} (IPv6 {v6})");
        figure(&format!("quic_reject_v6_{v6}"), took);
        let (kind, took) = lab.lan_tcp_refused(SocketAddr::new(server, 853));
        assert_eq!(kind, ErrorKind::ConnectionRefused, "DoT (IPv6 {v6})");
        assert!(took < FAST, "DoT rejected after {took:?} (IPv6 {v6})");
        figure(&format!("dot_reject_v6_{v6}"), took);
    }
    // Hijack still answers beside the blocks.
    assert_eq!(dig(&lab.topo.lan, &["@8.8.8.8", HOST, "A"]), HOST_ADDR);

    // 4. Hijack off: the chain goes, 8.8.8.8 is not answered by the frontend.
    lab.put(&node("dns/hijack"), "false");
    lab.put("/commit", "3");
    wait_table(&lab, "the hijack chain to go", |t| {
        t.contains("chain prerouting") && !t.contains("dns_hijack")
    });
    let direct = dig(&lab.topo.lan, &["@8.8.8.8", HOST, "A"]);
    assert!(
        !direct.contains(HOST_ADDR),
        "answered with hijack off: {direct}"
    );

    // 5. The gateway's own resolver: its lookups reach the frontend (the host record
    // is known nowhere else), and a rewritten file is restored.
    wait_for("the resolver file", Duration::from_secs(10), || {
        resolv.read().contains("nameserver 127.0.0.1").then_some(())
    });
    let own = lab.topo.gw.exec(&["getent", "hosts", HOST]);
    assert!(
        own.starts_with(HOST_ADDR),
        "the gateway's own lookup: {own}"
    );
    std::fs::write(resolv.path(), "nameserver 192.0.2.53\n").expect("overwrite");
    let t = Instant::now();
    wait_for(
        "the resolver file restored",
        Duration::from_secs(10),
        || resolv.read().contains("nameserver 127.0.0.1").then_some(()),
    );
    figure("resolv_conf_restored", t.elapsed());
    // meduza stops before the directory goes (drop order would be the other way).
    drop(lab);
}
