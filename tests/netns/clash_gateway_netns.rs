//! End to end with the real mihomo v1.19.2: `meduza run` in a gateway network
//! namespace with mihomo and the MosDNS double as its children, etcd in a namespace of
//! its own, an "internet" namespace with the proxy node (a second real mihomo, a
//! shadowsocks inbound), the subscription, the rule files and TCP/UDP echoes of the
//! peer address, and a LAN client making real TCP and UDP exchanges (IPv4 and IPv6)
//! through the gateway (DESIGN §7, §9; docs/clash.md). The lab is
//! `tests/support/src/gateway_lab.rs` (shared with `clash_refresh_netns.rs`).
//!
//! What it proves, in order:
//! 1. the leak: while the subscription cannot be fetched, mihomo's url-test group sits
//!    on `COMPATIBLE` (DIRECT): TPROXY stays off and LAN traffic goes direct, never
//!    out of the gateway's own address;
//! 2. the subscription appears: meduza has mihomo fetch it again, the group picks the
//!    node, rule files come through the node, MosDNS starts, TPROXY is applied, and the
//!    first LAN connection after that goes through the node (TCP and UDP, v4 and v6);
//! 3. the black hole: the node dies, mihomo keeps `now` on it; meduza's delay test
//!    marks it dead, TPROXY is removed and LAN traffic goes direct within the bound of
//!    docs/clash.md; the node comes back, TPROXY is re-applied, traffic is proxied;
//! 4. mihomo killed (`kill -9`), its API stalled (`SIGSTOP`), and a url-test group
//!    whose only member is `REJECT` each remove TPROXY, and recovery re-applies it;
//!    MosDNS keeps its pid throughout;
//! 5. Clash disabled: direct downloads, no TPROXY; SIGTERM stops cleanly.
//!
//! Timings (nft polled every 10 ms) are printed as `FIGURE` lines
//! (docs/benchmarks-clash.md). Needs root, etcd, nftables, iproute2, dig, python3-yaml
//! and the real mihomo (scripts/install-deps).

use meduza_test_support::{gateway_lab, netns};

use gateway_lab::{
    figure, health_url, node_proxy, stop, wait_for, Lab, Mihomo, HTTP_PORT, NODE, NODE_PORT,
};
use netns::Topology;
use std::net::IpAddr;
use std::time::{Duration, Instant};

const RULES: &str = "domain:listed.example\nfull:exact.example\n";
const PLUGINS: &str = "- tag: proxy_domains\n  type: domain_set\n  args:\n    files:\n      - rules/proxy.txt\n- tag: forward_clash\n  type: forward\n  args:\n    upstreams:\n      - addr: udp://127.0.0.1:1053\n- tag: main\n  type: sequence\n  args:\n    - matches:\n        - qname $proxy_domains\n      exec: $forward_clash\n";
/// `clash/health/probe_interval` and `clash/health/timeout` of this test: a dead node
/// must be noticed within probe interval + timeout + one 500 ms probe.
const PROBE_INTERVAL_S: u64 = 1;
const API_TOKEN: &str = "lab-api-token-0123456789";
const TEST_TIMEOUT_MS: u64 = 1000;

/// Sleep until `hold_down` after `removed_at` has passed, with a margin for the
/// removal having been seen up to one 10 ms poll late, plus a random 0–500 ms so the
/// recovery starts at a random point of the monitor's 500 ms probe cycle.
fn outlast_hold_down(removed_at: Instant, hold_down: Duration) {
    let jitter = Duration::from_millis(rand::random::<u64>() % 500);
    let until = removed_at + hold_down + Duration::from_millis(100) + jitter;
    std::thread::sleep(until.saturating_duration_since(Instant::now()));
}

/// A random 0–500 ms pause, so a fault starts at a random point of the probe cycle.
fn random_phase() {
    std::thread::sleep(Duration::from_millis(rand::random::<u64>() % 500));
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) on meduza's mihomo, found by its command line in our temp dir.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

#[test]
fn tproxy_follows_real_mihomo_end_to_end() {
    let mut lab = Lab::new();
    let gw_wan: IpAddr = Topology::GW_WAN4.into();
    let node_ip: IpAddr = Topology::SERVER4.into();
    let node = |k: &str| format!("/nodes/{NODE}/{k}");
    let url = |p: &str| format!("http://{}:{HTTP_PORT}{p}", Topology::SERVER4);
    let subscription = format!("proxies:\n  - {}\n", node_proxy("node-a", NODE_PORT));

    // The subscription is not served yet (404): mihomo's provider stays empty.
    lab.put("/global/clash/subscriptions/sub/url", &url("/sub.yaml"));
    lab.put_health_keys(PROBE_INTERVAL_S, TEST_TIMEOUT_MS);
    lab.put(
        "/global/mosdns/rule_files",
        &format!(r#"{{"rules/proxy.txt": "{}"}}"#, url("/rules/proxy.txt")),
    );
    lab.put("/global/mosdns/plugins", PLUGINS);
    lab.serve("/rules/proxy.txt", RULES);
    lab.put_node(&[
        ("lan", &format!("{}\n{}", Topology::LAN4, Topology::LAN6)),
        ("api/token", API_TOKEN),
        ("clash/enable", "true"),
        ("clash/mode", "tproxy"),
        ("clash/active_subscription", "sub"),
        ("mosdns/enable", "true"),
    ]);
    lab.put("/commit", "1");
    lab.start_meduza(Mihomo::Real, &[]);

    // 1. COMPATIBLE: waiting, no TPROXY, LAN direct (not out of the gateway's address).
    let health = lab.wait_status("clash/health", Duration::from_secs(30), |v| {
        v.starts_with("waiting ") && v.contains("PROXY=COMPATIBLE")
    });
    assert!(
        health.contains("every URLTest group is down: PROXY=COMPATIBLE (provider not loaded"),
        "{health}"
    );
    lab.wait_status("services/mihomo/status", Duration::from_secs(5), |v| {
        v.starts_with("running ")
    });
    std::thread::sleep(Duration::from_millis(2000));
    assert!(
        !lab.table_present(),
        "TPROXY applied while the url-test group is COMPATIBLE (DIRECT)"
    );
    lab.assert_direct("url-test group on COMPATIBLE");
    assert!(
        lab.pid_of("fake_mosdns.py").is_none(),
        "MosDNS started before mihomo was healthy"
    );
    assert!(
        lab.rule_requests().is_empty(),
        "rule files fetched before mihomo was healthy"
    );
    let tproxy = lab.status("tproxy").unwrap_or_default();
    assert!(tproxy.starts_with("removed "), "{tproxy}");

    // 2. The subscription appears: meduza has mihomo fetch the empty provider again.
    let t = Instant::now();
    lab.serve("/sub.yaml", &subscription);
    let first = lab.time_until_table(t, true, Duration::from_secs(40));
    figure("subscription_served_to_applied", first);
    // The very first LAN exchanges after the table appeared go through the node.
    lab.assert_proxied("first connections after TPROXY was applied");
    let tproxy = lab.wait_status("tproxy", Duration::from_secs(5), |v| {
        v.starts_with("applied ")
    });
    assert!(tproxy.contains("mihomo healthy"), "{tproxy}");
    let health = lab.status("clash/health").unwrap_or_default();
    assert!(
        health.starts_with("healthy ") && health.contains("every URLTest group alive"),
        "{health}"
    );
    assert!(
        lab.log()
            .contains("[clash-liveness] empty provider fetched again"),
        "meduza never asked mihomo to fetch the empty provider"
    );
    let rules = lab.rule_requests();
    assert!(!rules.is_empty(), "rule files never downloaded");
    for r in &rules {
        assert_eq!(r.peer, node_ip, "rule file fetched around the node: {r:?}");
    }
    let mosdns = wait_for("MosDNS to start", Duration::from_secs(10), || {
        lab.pid_of("fake_mosdns.py")
    });
    lab.wait_status("services/mosdns/status", Duration::from_secs(5), |v| {
        v.starts_with("running ")
    });
    assert_eq!(lab.mosdns_answer("www.listed.example"), "198.51.100.1");

    // mihomo's own byte totals reach the node API (`/v1/stats`, `/metrics`).
    let totals = wait_for(
        "mihomo's traffic in /v1/stats",
        Duration::from_secs(10),
        || {
            let stats: serde_json::Value =
                serde_json::from_str(&lab.api_get("/v1/stats", API_TOKEN)).ok()?;
            let value = |name: &str| {
                stats.as_array()?.iter().find(|s| s["name"] == name)?["value"].as_u64()
            };
            let up = value("service>>>mihomo>>>traffic>>>uplink")?;
            let down = value("service>>>mihomo>>>traffic>>>downlink")?;
            (up > 0 && down > 0).then_some((up, down))
        },
    );
    let metrics = lab.api_get("/metrics", API_TOKEN);
    for (direction, bytes) in [("uplink", totals.0), ("downlink", totals.1)] {
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with("meduza_mihomo_traffic_bytes_total{")
                    && l.contains(&format!("direction=\"{direction}\""))
            })
            .unwrap_or_else(|| panic!("no mihomo {direction} counter in /metrics:\n{metrics}"));
        let value: u64 = line
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .expect("counter value");
        assert!(value >= bytes, "{line}: went down from {bytes}");
    }

    // 3. The node dies: mihomo keeps `now` on it; the delay test finds it dead.
    random_phase();
    let t = Instant::now();
    lab.kill_node();
    let removed = lab.time_until_table(t, false, Duration::from_secs(10));
    figure("node_dead_to_removed", removed);
    let bound = Duration::from_secs(PROBE_INTERVAL_S)
        + Duration::from_millis(TEST_TIMEOUT_MS)
        + Duration::from_millis(500);
    assert!(
        removed < bound,
        "node dead -> removed took {removed:?}, bound {bound:?}"
    );
    lab.assert_direct("the node is dead");
    let health = lab.wait_status("clash/health", Duration::from_secs(5), |v| {
        v.starts_with("unhealthy ")
    });
    assert!(
        health.contains("every URLTest group is down: PROXY=node-a (not alive)"),
        "{health}"
    );
    // Removal #1 within 30 s of the application: hold-down 2 s (docs/clash.md).
    outlast_hold_down(t + removed, Duration::from_secs(2));
    let t = Instant::now();
    lab.start_node();
    let back = lab.time_until_table(t, true, Duration::from_secs(15));
    figure("node_back_to_reapplied", back);
    lab.assert_proxied("the node is back");

    // 4a. kill -9 mihomo: removed at once, back after the restart.
    let mihomo = lab.mihomo_pid().expect("mihomo running");
    let t = Instant::now();
    signal(mihomo, libc::SIGKILL);
    let removed = lab.time_until_table(t, false, Duration::from_secs(3));
    figure("kill_to_removed", removed);
    assert!(
        removed < Duration::from_millis(250),
        "kill -9 -> removed took {removed:?}"
    );
    lab.assert_direct("mihomo killed");
    let back = lab.time_until_table(t, true, Duration::from_secs(30));
    figure("kill_to_reapplied", back);
    let restarted = lab.mihomo_pid().expect("mihomo restarted");
    assert_ne!(restarted, mihomo);
    lab.assert_proxied("mihomo restarted");

    // 4b. API stalled (SIGSTOP): removed within the probe period + timeout.
    random_phase();
    let t = Instant::now();
    signal(restarted, libc::SIGSTOP);
    let removed = lab.time_until_table(t, false, Duration::from_secs(5));
    signal(restarted, libc::SIGCONT);
    figure("stall_to_removed", removed);
    assert!(
        removed < Duration::from_secs(2),
        "stall -> removed took {removed:?}"
    );
    let back = lab.time_until_table(t, true, Duration::from_secs(30));
    figure("stall_to_reapplied", back);
    lab.assert_proxied("mihomo API answers again");

    // 4c. A url-test group whose only member is REJECT (through /global/clash/base).
    let base = format!(
        "proxy-groups:\n  - {{name: PROXY, type: url-test, proxies: [REJECT], url: '{}', interval: 300}}\nrules:\n  - MATCH,PROXY\n",
        health_url()
    );
    let t = Instant::now();
    lab.put("/global/clash/base", &base);
    lab.put("/commit", "2");
    let removed = lab.time_until_table(t, false, Duration::from_secs(15));
    figure("reject_commit_to_removed", removed);
    lab.assert_direct("every URLTest group REJECT");
    let health = lab.wait_status("clash/health", Duration::from_secs(5), |v| {
        v.starts_with("unhealthy ")
    });
    assert!(
        health.contains("every URLTest group is down: PROXY=REJECT (rejects)"),
        "{health}"
    );
    let t = Instant::now();
    lab.del("/global/clash/base");
    lab.put("/commit", "3");
    let back = lab.time_until_table(t, true, Duration::from_secs(40));
    figure("reject_cleared_commit_to_reapplied", back);
    lab.assert_proxied("the subscription's group again");
    lab.wait_status("clash/health", Duration::from_secs(5), |v| {
        v.starts_with("healthy ")
    });

    // MosDNS was never restarted by any of this.
    assert_eq!(
        lab.pid_of("fake_mosdns.py"),
        Some(mosdns),
        "MosDNS was restarted"
    );

    // 5. Clash disabled: no TPROXY, rule files fetched directly.
    let before = lab.rule_requests().len();
    lab.put(&node("clash/enable"), "false");
    lab.put("/commit", "4");
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
    }
    wait_for("mihomo to stop", Duration::from_secs(10), || {
        lab.mihomo_pid().is_none().then_some(())
    });

    // The online key stayed on its lease (TTL 5 s here) the whole time.
    assert_eq!(lab.status("online").as_deref(), Some("1"));
    assert!(
        !lab.log().contains("status lease expired"),
        "the online lease expired while meduza ran"
    );

    // SIGTERM: a clean stop, children gone, no table left behind.
    let mut meduza = lab.meduza.take().expect("meduza");
    let status = stop(&mut meduza, Duration::from_secs(10)).expect("meduza stops on SIGTERM");
    assert!(status.success(), "meduza exited with {status}");
    assert!(!lab.table_present());
    assert!(
        lab.pid_of("fake_mosdns.py").is_none(),
        "MosDNS left running"
    );
}
