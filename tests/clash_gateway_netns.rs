//! End to end: the real `meduza run` in a gateway network namespace, with the mihomo
//! and MosDNS doubles as its children, etcd in a namespace of its own, an "internet"
//! namespace serving the subscription, the rule files and a TCP echo of the peer
//! address, and a LAN client namespace making real TCP connections (IPv4 and IPv6)
//! through the gateway (DESIGN §7, §9; docs/clash.md). The lab itself is
//! `tests/doubles/gateway_lab.rs` (shared with `clash_refresh_netns.rs`).
//!
//! ```text
//!  etcd ns 10.97.0.2 ── etc0 10.97.0.1  gw ns (meduza run, mihomo double, MosDNS double)
//!  lan ns 192.168.50.2 / fd00:50::2 ── lan0 │ wan0 203.0.113.1 (+ .3: mihomo's outbound)
//!                                           └── inet ns 203.0.113.2 / 2001:db8:1::2
//!                                               :8080 HTTP (subscription, rule files)
//!                                               :9000 "server <peer>" echo
//! ```
//!
//! What it proves, in order: TPROXY is not applied while mihomo is unhealthy (URLTest
//! group `REJECT` at start); it is applied once mihomo is healthy, after the rule files
//! came through mihomo (the download server sees the double's outbound address and
//! its `Via` header); mihomo killed, API stalled, every group `REJECT` each remove it
//! (LAN traffic reaches the server directly again) and recovery re-applies it; MosDNS
//! keeps its pid throughout; Clash disabled means direct downloads and no TPROXY.
//! The timings it measures (nft polled every 10 ms) are printed as `FIGURE` lines
//! (docs/benchmarks-clash.md). Needs root, etcd, nftables, iproute2, dig, python3-yaml.

#[path = "common/netns.rs"]
mod netns;

#[path = "doubles/gateway_lab.rs"]
mod gateway_lab;

use gateway_lab::{stop, wait_for, Lab, HTTP_PORT, NODE, PROXY_OUT};
use netns::Topology;
use std::net::IpAddr;
use std::time::{Duration, Instant};

const RULES: &str = "domain:listed.example\nfull:exact.example\n";
const SUBSCRIPTION: &str = "proxies:\n  - {name: hk1, type: ss, server: 203.0.113.2, port: 8388, cipher: aes-128-gcm, password: pw}\n  - {name: jp1, type: ss, server: 203.0.113.2, port: 8389, cipher: aes-128-gcm, password: pw}\n";
const PLUGINS: &str = "- tag: proxy_domains\n  type: domain_set\n  args:\n    files:\n      - rules/proxy.txt\n- tag: forward_clash\n  type: forward\n  args:\n    upstreams:\n      - addr: udp://127.0.0.1:1053\n- tag: main\n  type: sequence\n  args:\n    - matches:\n        - qname $proxy_domains\n      exec: $forward_clash\n";

/// Sleep until `hold_down` after `removed_at` has passed, with a margin for the
/// removal having been seen up to one 10 ms poll late, plus a random 0–500 ms so the
/// recovery starts at a random point of the monitor's 500 ms probe cycle (the
/// healthy → re-applied time depends on that phase).
fn outlast_hold_down(removed_at: Instant, hold_down: Duration) {
    let jitter = Duration::from_millis(rand::random::<u64>() % 500);
    let until = removed_at + hold_down + Duration::from_millis(100) + jitter;
    std::thread::sleep(until.saturating_duration_since(Instant::now()));
}

/// A random 0–500 ms pause, so a fault starts at a random point of the monitor's
/// probe cycle (the test's own steps are otherwise in step with it).
fn random_phase() {
    std::thread::sleep(Duration::from_millis(rand::random::<u64>() % 500));
}

fn figure(name: &str, d: Duration) {
    println!("FIGURE {name}_ms={:.1}", d.as_secs_f64() * 1000.0);
}

const HEALTHY: &str = r#"{"tproxy_marker": true}"#;
const REJECT: &str = r#"{"tproxy_marker": true, "reject_all": true}"#;
const STALL: &str = r#"{"tproxy_marker": true, "stall_api": true}"#;

#[test]
fn tproxy_follows_mihomo_health_end_to_end() {
    let mut lab = Lab::new();
    let gw_wan: IpAddr = Topology::GW_WAN4.into();
    let proxy_out: IpAddr = PROXY_OUT.parse().unwrap();

    // mihomo starts unhealthy: its URLTest group is REJECT.
    lab.control(REJECT);
    let node = |k: &str| format!("/nodes/{NODE}/{k}");
    let url = |p: &str| format!("http://{}:{HTTP_PORT}{p}", Topology::SERVER4);
    lab.put("/global/clash/subscriptions/sub/url", &url("/sub.yaml"));
    lab.put(
        "/global/mosdns/rule_files",
        &format!(r#"{{"rules/proxy.txt": "{}"}}"#, url("/rules/proxy.txt")),
    );
    lab.put("/global/mosdns/plugins", PLUGINS);
    lab.serve("/sub.yaml", SUBSCRIPTION);
    lab.serve("/rules/proxy.txt", RULES);
    lab.put(
        &node("lan"),
        &format!("{}\n{}", Topology::LAN4, Topology::LAN6),
    );
    lab.put(&node("clash/enable"), "true");
    lab.put(&node("clash/mode"), "tproxy");
    lab.put(&node("clash/active_subscription"), "sub");
    lab.put(&node("mosdns/enable"), "true");
    lab.put("/commit", "1");
    lab.start_meduza(&[]);

    // 1. Unhealthy at start: waiting, no TPROXY, LAN goes direct, MosDNS held back.
    let health = lab.wait_status("clash/health", Duration::from_secs(30), |v| {
        v.starts_with("waiting ") && v.contains("PROXY=REJECT")
    });
    assert!(
        health.contains("every URLTest group is down: PROXY=REJECT"),
        "{health}"
    );
    lab.wait_status("services/mihomo/status", Duration::from_secs(5), |v| {
        v.starts_with("running ")
    });
    let tproxy = lab.status("tproxy").unwrap_or_default();
    assert!(tproxy.starts_with("removed "), "{tproxy}");
    assert!(
        tproxy.ends_with(
            " waiting for the startup chain: mihomo healthy, MosDNS rule files, MosDNS started"
        ),
        "what TPROXY waits for: {tproxy}"
    );
    assert!(
        !lab.table_present(),
        "TPROXY applied while mihomo is unhealthy"
    );
    lab.assert_direct("mihomo unhealthy at start");
    // The subscription reaches mihomo as an HTTP proxy provider (mihomo fetches it).
    let mihomo_cfg = std::fs::read_to_string(lab.path("root/etc/mihomo/config.yaml"))
        .expect("mihomo config written under MEDUZA_ROOT");
    assert!(mihomo_cfg.contains(&url("/sub.yaml")), "{mihomo_cfg}");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !lab.table_present(),
        "TPROXY applied while mihomo is unhealthy"
    );
    assert!(
        lab.pid_of("fake_mosdns.py").is_none(),
        "MosDNS started before mihomo was healthy"
    );
    assert!(
        lab.rule_requests().is_empty(),
        "rule files fetched before mihomo was healthy"
    );

    // 2. Healthy: rule files through mihomo, MosDNS started, TPROXY applied.
    let t = Instant::now();
    lab.control(HEALTHY);
    let first = lab.time_until_table(t, true, Duration::from_secs(20));
    figure("first_healthy_to_applied", first);
    let tproxy = lab.wait_status("tproxy", Duration::from_secs(5), |v| {
        v.starts_with("applied ")
    });
    assert!(tproxy.contains("mihomo healthy"), "{tproxy}");
    let health = lab.status("clash/health").unwrap_or_default();
    assert!(health.starts_with("healthy "), "{health}");
    lab.assert_proxied("mihomo healthy");
    let rules = lab.rule_requests();
    assert!(!rules.is_empty(), "rule files never downloaded");
    for r in &rules {
        assert_eq!(r.peer, proxy_out, "rule file fetched around mihomo: {r:?}");
        assert_eq!(r.via.as_deref(), Some("1.1 fake-mihomo"), "{r:?}");
    }
    let downloaded = std::fs::read_to_string(lab.path("root/etc/mosdns/rules/proxy.txt"))
        .expect("rule file written under MEDUZA_ROOT");
    assert_eq!(downloaded, RULES);
    let mosdns = wait_for("MosDNS to start", Duration::from_secs(10), || {
        lab.pid_of("fake_mosdns.py")
    });
    lab.wait_status("services/mosdns/status", Duration::from_secs(5), |v| {
        v.starts_with("running ")
    });
    assert_eq!(lab.mosdns_answer("www.listed.example"), "198.51.100.1");
    assert_eq!(lab.mosdns_answer("other.example"), "198.51.100.2");

    // 3. kill -9 mihomo: TPROXY removed at once, back after the restart.
    let mihomo = lab.pid_of("fake_mihomo.py").expect("mihomo double running");
    let t = Instant::now();
    // SAFETY: kill(2) on the double's pid, found by its command line in our temp dir.
    assert_eq!(unsafe { libc::kill(mihomo, libc::SIGKILL) }, 0);
    let removed = lab.time_until_table(t, false, Duration::from_secs(3));
    figure("kill_to_removed", removed);
    assert!(
        removed < Duration::from_millis(250),
        "kill -9 -> removed took {removed:?}"
    );
    lab.assert_direct("mihomo killed");
    let health = lab.wait_status("clash/health", Duration::from_secs(5), |v| {
        v.starts_with("unhealthy ") || v.starts_with("waiting ")
    });
    assert!(
        health.contains("mihomo exited") || health.starts_with("waiting "),
        "{health}"
    );
    let back = lab.time_until_table(t, true, Duration::from_secs(20));
    figure("kill_to_reapplied", back);
    let restarted = lab.pid_of("fake_mihomo.py").expect("mihomo restarted");
    assert_ne!(restarted, mihomo);
    lab.wait_status("tproxy", Duration::from_secs(5), |v| {
        v.starts_with("applied ")
    });
    lab.assert_proxied("mihomo restarted");

    // 4. API stalled: removed within the probe period + timeout.
    random_phase();
    let t = Instant::now();
    lab.control(STALL);
    let removed = lab.time_until_table(t, false, Duration::from_secs(5));
    figure("stall_to_removed", removed);
    assert!(
        removed < Duration::from_secs(2),
        "stall -> removed took {removed:?}"
    );
    lab.assert_direct("mihomo API stalled");
    let health = lab.wait_status("clash/health", Duration::from_secs(5), |v| {
        v.starts_with("unhealthy ")
    });
    assert!(health.contains("no answer within"), "{health}");
    // Outlast the hold-down, which counts from the removal and doubles on each removal
    // within 30 s of the last application (docs/clash.md): 2 s after the kill, now 4 s.
    outlast_hold_down(t + removed, Duration::from_secs(4));
    let t = Instant::now();
    lab.control(HEALTHY);
    let back = lab.time_until_table(t, true, Duration::from_secs(10));
    figure("stall_cleared_to_reapplied", back);
    assert!(
        back < Duration::from_secs(1),
        "healthy -> re-applied took {back:?}"
    );
    lab.assert_proxied("mihomo API answers again");

    // 5. Every URLTest group REJECT: removed, the reason names the group.
    random_phase();
    let t = Instant::now();
    lab.control(REJECT);
    let removed = lab.time_until_table(t, false, Duration::from_secs(5));
    figure("reject_to_removed", removed);
    assert!(
        removed < Duration::from_secs(2),
        "REJECT -> removed took {removed:?}"
    );
    lab.assert_direct("every URLTest group REJECT");
    let health = lab.wait_status("clash/health", Duration::from_secs(5), |v| {
        v.starts_with("unhealthy ")
    });
    assert!(
        health.contains("every URLTest group is down: PROXY=REJECT"),
        "{health}"
    );
    outlast_hold_down(t + removed, Duration::from_secs(8));
    let t = Instant::now();
    lab.control(HEALTHY);
    let back = lab.time_until_table(t, true, Duration::from_secs(10));
    figure("reject_cleared_to_reapplied", back);
    assert!(
        back < Duration::from_secs(1),
        "healthy -> re-applied took {back:?}"
    );
    lab.assert_proxied("URLTest group alive again");
    let health = lab.wait_status("clash/health", Duration::from_secs(5), |v| {
        v.starts_with("healthy ")
    });
    assert!(health.contains("every URLTest group alive"), "{health}");

    // MosDNS was never restarted by any of this.
    assert_eq!(
        lab.pid_of("fake_mosdns.py"),
        Some(mosdns),
        "MosDNS was restarted"
    );
    assert!(lab
        .status("services/mosdns/status")
        .unwrap_or_default()
        .starts_with("running "));

    // 6. Clash disabled: no TPROXY, rule files fetched directly.
    let before = lab.rule_requests().len();
    lab.put(&node("clash/enable"), "false");
    lab.put("/commit", "2");
    let tproxy = lab.wait_status("tproxy", Duration::from_secs(10), |v| {
        v.starts_with("removed ")
    });
    assert!(tproxy.contains("Clash disabled"), "{tproxy}");
    wait_for("the table to go", Duration::from_secs(5), || {
        (!lab.table_present()).then_some(())
    });
    lab.assert_direct("Clash disabled");
    wait_for("a direct rule download", Duration::from_secs(15), || {
        (lab.rule_requests().len() > before).then_some(())
    });
    for r in &lab.rule_requests()[before..] {
        assert_eq!(r.peer, gw_wan, "Clash disabled: download not direct: {r:?}");
        assert_eq!(r.via, None, "{r:?}");
    }
    wait_for(
        "clash/health to be withdrawn",
        Duration::from_secs(5),
        || lab.status("clash/health").is_none().then_some(()),
    );
    wait_for("mihomo to stop", Duration::from_secs(10), || {
        lab.pid_of("fake_mihomo.py").is_none().then_some(())
    });
    lab.wait_status("services/mosdns/status", Duration::from_secs(10), |v| {
        v.starts_with("running ")
    });
    assert_eq!(lab.mosdns_answer("www.listed.example"), "198.51.100.1");

    // The online key stayed on its lease (TTL 5 s here) the whole time.
    assert_eq!(lab.status("online").as_deref(), Some("1"));
    let log = std::fs::read_to_string(lab.path("meduza.log")).expect("log");
    assert!(
        !log.contains("status lease expired"),
        "the online lease expired while meduza ran"
    );

    // 7. SIGTERM: a clean stop, children gone, no table left behind.
    let mut meduza = lab.meduza.take().expect("meduza");
    let status = stop(&mut meduza, Duration::from_secs(10)).expect("meduza stops on SIGTERM");
    assert!(status.success(), "meduza exited with {status}");
    assert!(!lab.table_present());
    assert!(
        lab.pid_of("fake_mosdns.py").is_none(),
        "MosDNS left running"
    );
}
