//! Fake-IP that fails fast (docs/dns.md, "Fake-IP mode"), with the real mihomo v1.19.2
//! in `dns.enhanced-mode: fake-ip` in the gateway lab (`tests/support/src/gateway_lab.rs`),
//! and a real dnsmasq in the lab's internet as the frontend's upstream group.
//!
//! What it proves, in order:
//! 1. TPROXY applied: a LAN client resolves `far.lab.test` through the frontend and
//!    gets a fake address of `fake-ip-range`; a connection to it crosses the proxy
//!    node (the echo sees the node's address);
//! 2. mihomo killed (SIGKILL): TPROXY is removed and the fake range is rejected, so
//!    a new TCP connection to the same fake address is reset and a UDP datagram gets
//!    an ICMP port unreachable, each within 100 ms (measured, with the time from the
//!    kill to the rejects);
//! 3. while mihomo is out, the client resolves again and gets the real address from
//!    the upstream (never a cached fake one), and connects directly;
//! 4. mihomo healthy again: fake-ip answers and proxied connections are back.
//!
//! Needs root, etcd, nftables, iproute2, dig, dnsmasq and the real mihomo
//! (scripts/install-deps).

use meduza_test_support::{gateway_lab, netns};

use gateway_lab::{
    dig, figure, node_proxy, spawn_in, wait_for, Lab, Mihomo, ECHO_PORT, FAR_NAME, HTTP_PORT,
    NODE_PORT, UDP_ECHO_PORT,
};
use ipnet::Ipv4Net;
use netns::Topology;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const FAKE_RANGE: &str = "198.18.0.1/16";
/// A rejected connection must fail faster than this (no timeout involved).
const FAST: Duration = Duration::from_millis(100);

/// A child killed and reaped on drop (the lab tears down only what it started).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// dnsmasq on the internet server's address: the frontend's upstream group. It knows
/// `far.lab.test` (the real address) and `example.com` (the group's health probe).
fn start_upstream(lab: &Lab) -> Reaped {
    let mut cmd = Command::new("dnsmasq");
    cmd.args([
        "-k",
        "--conf-file=/dev/null",
        "--port=53",
        "--bind-interfaces",
    ])
    .arg(format!("--listen-address={}", Topology::SERVER4))
    .arg(format!("--address=/{FAR_NAME}/{}", Topology::SERVER4))
    .args([
        "--address=/example.com/192.0.2.1",
        "--no-resolv",
        "--no-hosts",
    ])
    .args(["--pid-file=", "--user=root", "--cache-size=0"])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let child = Reaped(spawn_in(&lab.topo.inet, cmd));
    wait_for("dnsmasq to answer", Duration::from_secs(10), || {
        let out = dig(
            &lab.topo.inet,
            &[&format!("@{}", Topology::SERVER4), FAR_NAME, "A"],
        );
        (out.trim() == Topology::SERVER4.to_string()).then_some(())
    });
    child
}

/// `dig +short far.lab.test A` from the LAN client at the gateway's LAN address.
fn resolve(lab: &Lab) -> Option<Ipv4Addr> {
    let out = dig(
        &lab.topo.lan,
        &[&format!("@{}", Topology::GW_LAN4), FAR_NAME, "A"],
    );
    out.lines().last()?.trim().parse().ok()
}

fn is_fake(a: Ipv4Addr) -> bool {
    FAKE_RANGE
        .parse::<Ipv4Net>()
        .expect("literal")
        .trunc()
        .contains(&a)
}

#[test]
fn fake_ip_connections_fail_fast_while_mihomo_is_down() {
    let mut lab = Lab::new();
    let _upstream = start_upstream(&lab);
    lab.serve(
        "/sub.yaml",
        &format!("proxies:\n  - {}\n", node_proxy("node-a", NODE_PORT)),
    );
    lab.put(
        "/global/clash/subscriptions/sub/url",
        &format!("http://{}:{HTTP_PORT}/sub.yaml", Topology::SERVER4),
    );
    lab.put_health_keys(1, 1000);
    lab.put(
        "/global/clash/base",
        &format!("dns:\n  enhanced-mode: fake-ip\n  fake-ip-range: {FAKE_RANGE}\n"),
    );
    lab.put(
        "/global/dns/upstreams/lab/addresses",
        &Topology::SERVER4.to_string(),
    );
    lab.put_node(&[
        ("lan", Topology::LAN4),
        ("clash/enable", "true"),
        ("clash/mode", "tproxy"),
        ("clash/active_subscription", "sub"),
    ]);
    lab.put("/commit", "1");
    lab.start_meduza(Mihomo::Real, &[("MEDUZA_DNS_LISTEN", "0.0.0.0:53")]);

    // 1. Applied: a fake answer, and the connection to it crosses the node.
    lab.time_until_intercepting(Instant::now(), true, Duration::from_secs(60));
    let fake = wait_for("a fake-ip answer", Duration::from_secs(20), || {
        resolve(&lab).filter(|a| is_fake(*a))
    });
    let to_fake = SocketAddr::new(IpAddr::V4(fake), ECHO_PORT);
    assert_eq!(
        lab.lan_echo(to_fake),
        format!("server {}", Topology::SERVER4),
        "{FAR_NAME} at its fake address {fake}, through the node"
    );

    // 2. mihomo killed: the fake range is rejected, at once.
    let mihomo = lab.mihomo_pid().expect("mihomo running");
    let t = Instant::now();
    // SAFETY: kill(2) on meduza's mihomo, found by its command line in our temp dir.
    assert_eq!(unsafe { libc::kill(mihomo, libc::SIGKILL) }, 0);
    let rejecting = lab.time_until_intercepting(t, false, Duration::from_secs(3));
    figure("kill_to_fake_ip_rejected", rejecting);
    let (kind, took) = lab.lan_tcp_refused(to_fake);
    assert_eq!(kind, ErrorKind::ConnectionRefused, "TCP to {fake}");
    assert!(took < FAST, "TCP to {fake} failed after {took:?}");
    figure("fake_ip_tcp_reset", took);
    let (kind, took) = lab.lan_udp_refused(SocketAddr::new(IpAddr::V4(fake), UDP_ECHO_PORT));
    assert_eq!(kind, ErrorKind::ConnectionRefused, "UDP to {fake}");
    assert!(took < FAST, "UDP to {fake} failed after {took:?}");
    figure("fake_ip_udp_unreachable", took);
    // Hold mihomo out of the path (its restart stays unhealthy without the node)
    // for the checks that follow.
    lab.kill_node();
    lab.time_until_intercepting(Instant::now(), false, Duration::from_secs(15));
    let table = lab
        .topo
        .gw
        .exec(&["nft", "list", "table", "inet", "meduza"]);
    assert!(
        table.contains("ip daddr @fake_dst4 meta l4proto tcp reject with tcp reset"),
        "{table}"
    );

    // 3. Resolving again gives the real address, which connects directly.
    let real = wait_for("a real answer", Duration::from_secs(10), || resolve(&lab));
    assert_eq!(real, Topology::SERVER4, "answered while mihomo is out");
    assert_eq!(
        lab.lan_echo(SocketAddr::new(IpAddr::V4(real), ECHO_PORT)),
        format!("server {}", Topology::CLIENT4),
        "direct while mihomo is out"
    );
    let (kind, _) = lab.lan_tcp_refused(to_fake);
    assert_eq!(kind, ErrorKind::ConnectionRefused, "still rejected");

    // 4. The node back, mihomo healthy: fake answers and the proxy again.
    let t = Instant::now();
    lab.start_node();
    let back = lab.time_until_intercepting(t, true, Duration::from_secs(60));
    figure("node_back_to_intercepting", back);
    let fake = wait_for("a fake-ip answer again", Duration::from_secs(20), || {
        resolve(&lab).filter(|a| is_fake(*a))
    });
    assert_eq!(
        lab.lan_echo(SocketAddr::new(IpAddr::V4(fake), ECHO_PORT)),
        format!("server {}", Topology::SERVER4),
        "through the node again"
    );
    let table = lab
        .topo
        .gw
        .exec(&["nft", "list", "table", "inet", "meduza"]);
    assert!(!table.contains("fake_dst4"), "{table}");
}
