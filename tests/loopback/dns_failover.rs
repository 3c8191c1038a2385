//! Upstream failover and failback with real dnsmasq upstreams, the MosDNS → mihomo →
//! upstream chain followed live, manual test/failover and the status watch.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use hickory_proto::rr::RecordType;
use meduza::dns::{ChainState, FailoverAction, Health};
use meduza_generators::plan::dns::DnsPlan;
use meduza_test_support::dns::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_within_threshold_times_interval_and_failback() {
    let b = loopback_block();
    let mut primary = Dnsmasq::start(ip(b, 2), Ipv4Addr::new(10, 0, 0, 1), &[]);
    let secondary = Dnsmasq::start(ip(b, 3), Ipv4Addr::new(10, 0, 0, 2), &[]);
    let (interval, threshold) = (1u64, 2u32);
    let plan = DnsPlan {
        upstreams: vec![
            group("primary", 1, vec![primary.addr], interval, threshold),
            group("secondary", 2, vec![secondary.addr], interval, threshold),
        ],
        ..DnsPlan::default()
    };
    let mut cfg = config(ip(b, 1));
    cfg.cache_size = 0; // every answer shows which group served it
    let (h, addr) = start(cfg, plan).await;
    let mut status_rx = h.subscribe();

    let healthy = wait_until(Duration::from_secs(3), || {
        h.upstream_status()
            .iter()
            .all(|s| s.status == Health::Healthy)
    })
    .await;
    assert!(
        healthy.is_some(),
        "both groups checked healthy: {:?}",
        h.upstream_status()
    );
    assert_eq!(
        addrs(&udp(addr, "x.test.", RecordType::A, None).await),
        vec![IpAddr::from([10, 0, 0, 1])]
    );

    // Primary dies. Health checks alone (no client traffic) must move traffic within
    // threshold × interval (+ one interval of phase and the check timeout).
    primary.kill();
    let bound = Duration::from_secs(threshold as u64 * interval + interval + 1);
    let took = wait_until(bound + Duration::from_secs(2), || {
        h.upstream_status()
            .iter()
            .any(|s| s.name == "secondary" && s.active)
    })
    .await
    .expect("failed over");
    assert!(took <= bound, "failover took {took:?}, bound {bound:?}");
    let st = h.upstream_status();
    assert_eq!(st[0].status, Health::Down);
    assert!(st[1].active);
    // As the daemon publishes it (etcd::status owns the format).
    let published = meduza::etcd::status::StatusUpdate::DnsUpstream {
        name: st[0].name.clone(),
        state: st[0].status.to_string(),
        ts: st[0].updated.unwrap_or(0),
        latency_ms: st[0].latency_ms.unwrap_or(0),
    };
    assert_eq!(published.value().split(' ').next(), Some("down"));
    for i in 0..5 {
        let m = udp(addr, &format!("y{i}.test."), RecordType::A, None).await;
        assert_eq!(addrs(&m), vec![IpAddr::from([10, 0, 0, 2])]);
    }
    let log = h.failover_log();
    let actions: Vec<FailoverAction> = log.iter().map(|e| e.action).collect();
    assert!(actions.contains(&FailoverAction::HealthCheckFailed));
    assert!(
        actions.contains(&FailoverAction::FailoverTriggered),
        "{log:?}"
    );
    assert!(status_rx.has_changed().unwrap());
    assert!(status_rx
        .borrow_and_update()
        .failover_log
        .iter()
        .any(|e| e.action == FailoverAction::FailoverTriggered && e.upstream == "primary"));

    // Primary back: traffic returns to it.
    primary.restart();
    wait_until(Duration::from_secs(interval * 2 + 2), || {
        h.upstream_status()
            .iter()
            .any(|s| s.name == "primary" && s.active)
    })
    .await
    .expect("failed back");
    let m = udp(addr, "z.test.", RecordType::A, None).await;
    assert_eq!(addrs(&m), vec![IpAddr::from([10, 0, 0, 1])]);
    let actions: Vec<FailoverAction> = h.failover_log().iter().map(|e| e.action).collect();
    assert!(
        actions.ends_with(&[FailoverAction::Recovered, FailoverAction::Failback]),
        "{actions:?}"
    );
    let json = serde_json::to_string(&h.failover_log()).unwrap();
    assert!(json.contains("\"action\":\"failback\""));
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chain_follows_mosdns_and_clash_state_live() {
    let b = loopback_block();
    let upstream = Dnsmasq::start(ip(b, 2), Ipv4Addr::new(10, 0, 0, 1), &[]);
    let mut cfg = config(ip(b, 1));
    cfg.cache_size = 0;
    // Stand-ins for MosDNS and mihomo's DNS listener: plain DNS servers on their ports.
    let mosdns = Dnsmasq::start_on(cfg.mosdns_addr, Ipv4Addr::new(10, 0, 0, 53), &[]);
    let mut clash = Dnsmasq::start_on(cfg.clash_addr, Ipv4Addr::new(198, 18, 0, 1), &[]);
    let plan = DnsPlan {
        mosdns_enabled: true,
        clash_enabled: true,
        upstreams: vec![group("up", 1, vec![upstream.addr], 30, 3)],
        ..DnsPlan::default()
    };
    let (h, addr) = start(cfg, plan.clone()).await;
    let ask =
        |name: &'static str| async move { addrs(&udp(addr, name, RecordType::A, None).await) };

    // Neither reported running yet: upstream only.
    assert_eq!(ask("a.test.").await, vec![IpAddr::from([10, 0, 0, 1])]);
    h.set_chain_state(ChainState {
        mosdns_running: true,
        clash_healthy: true,
    });
    assert_eq!(h.chain_order(), vec!["mosdns", "clash", "up"]);
    assert_eq!(ask("b.test.").await, vec![IpAddr::from([10, 0, 0, 53])]);
    // MosDNS stops: mihomo's DNS next.
    h.set_chain_state(ChainState {
        mosdns_running: false,
        clash_healthy: true,
    });
    assert_eq!(ask("c.test.").await, vec![IpAddr::from([198, 18, 0, 1])]);
    // Clash unhealthy: straight to the upstream groups.
    h.set_chain_state(ChainState {
        mosdns_running: false,
        clash_healthy: false,
    });
    assert_eq!(ask("d.test.").await, vec![IpAddr::from([10, 0, 0, 1])]);
    // Clash reported healthy but its listener is gone: the chain falls through.
    h.set_chain_state(ChainState {
        mosdns_running: false,
        clash_healthy: true,
    });
    clash.kill();
    assert_eq!(ask("e.test.").await, vec![IpAddr::from([10, 0, 0, 1])]);
    // Clash disabled in the plan: not in the chain whatever its state.
    let mut p = plan;
    p.clash_enabled = false;
    h.update_plan(p);
    assert_eq!(h.chain_order(), vec!["up"]);
    drop(mosdns);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_test_and_failover_for_the_node_api() {
    let b = loopback_block();
    let one = Dnsmasq::start(ip(b, 2), Ipv4Addr::new(10, 0, 0, 1), &[]);
    let two = Dnsmasq::start(ip(b, 3), Ipv4Addr::new(10, 0, 0, 2), &[]);
    let dead = std::net::SocketAddr::new(ip(b, 4), free_port(ip(b, 4)));
    let mut mixed = group("one", 1, vec![one.addr, dead], 30, 3);
    mixed.health_check.enable = false;
    let plan = DnsPlan {
        upstreams: vec![mixed, group("two", 2, vec![two.addr], 30, 3)],
        ..DnsPlan::default()
    };
    let mut cfg = config(ip(b, 1));
    cfg.cache_size = 0;
    let (h, addr) = start(cfg, plan).await;
    let t = h.test_upstream("one").await.unwrap();
    assert!(t.ok);
    assert!(
        t.error.as_deref().unwrap_or("").contains(&dead.to_string()),
        "{t:?}"
    );
    assert_eq!(h.upstream_status()[0].status, Health::Degraded);
    assert!(h.test_upstream("missing").await.is_err());

    assert_eq!(h.manual_failover(None).unwrap(), "two");
    assert_eq!(
        addrs(&udp(addr, "m.test.", RecordType::A, None).await),
        vec![IpAddr::from([10, 0, 0, 2])]
    );
    assert_eq!(h.manual_failover(Some("one".into())).unwrap(), "one");
    assert_eq!(
        addrs(&udp(addr, "n.test.", RecordType::A, None).await),
        vec![IpAddr::from([10, 0, 0, 1])]
    );
    let last = h.failover_log().pop().unwrap();
    assert_eq!(last.action, FailoverAction::ManualFailover);
    assert_eq!(last.upstream, "one");
    let st = h.upstream_status();
    assert!(st[0].queries >= 1 && st[1].queries >= 1);
    assert!(st[1].avg_query_latency_ms.is_some());
    h.shutdown().await;
}
