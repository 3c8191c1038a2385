//! Host records answered by the frontend itself, live updates, the hosts file, and
//! what a name gets when it is not a host record.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use meduza_generators::plan::dns::DnsPlan;
use meduza_test_support::dns::*;

fn hosts() -> BTreeMap<String, Vec<IpAddr>> {
    let mut h = BTreeMap::new();
    h.insert(
        "db.example.com".to_string(),
        vec![
            "192.168.1.100".parse().unwrap(),
            "192.168.1.101".parse().unwrap(),
            "fd00::100".parse().unwrap(),
        ],
    );
    h.insert(
        "gateway.internal".to_string(),
        vec!["10.42.1.1".parse().unwrap()],
    );
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_records_answered_locally() {
    let b = loopback_block();
    let up = Dnsmasq::start(
        ip(b, 2),
        Ipv4Addr::new(10, 0, 0, 1),
        &["--address=/nx.test/"],
    );
    let plan = DnsPlan {
        hosts: hosts(),
        upstreams: vec![group("up", 1, vec![up.addr], 30, 3)],
        ..DnsPlan::default()
    };
    let (h, addr) = start(config(ip(b, 1)), plan).await;

    let m = udp(addr, "DB.Example.COM.", RecordType::A, None).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        addrs(&m),
        vec![
            IpAddr::from([192, 168, 1, 100]),
            IpAddr::from([192, 168, 1, 101])
        ]
    );
    assert_eq!(
        m.queries[0].name().to_ascii(),
        "DB.Example.COM.",
        "question echoed as asked"
    );

    let m = udp(addr, "db.example.com.", RecordType::AAAA, Some(1232)).await;
    assert_eq!(addrs(&m), vec!["fd00::100".parse::<IpAddr>().unwrap()]);
    assert!(m.edns.is_some());

    // Known name, other family or type: NOERROR, no answer (not forwarded).
    let m = udp(addr, "gateway.internal.", RecordType::AAAA, None).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    let m = tcp(addr, "gateway.internal.", RecordType::MX).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());

    // Over TCP through hickory-server.
    let m = tcp(addr, "gateway.internal.", RecordType::A).await;
    assert_eq!(addrs(&m), vec![IpAddr::from([10, 42, 1, 1])]);

    // Not a host record: the upstream's answer, NXDOMAIN included.
    let m = udp(addr, "www.test.", RecordType::A, None).await;
    assert_eq!(addrs(&m), vec![IpAddr::from([10, 0, 0, 1])]);
    let m = udp(addr, "gone.nx.test.", RecordType::A, None).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    let c = h.counters();
    assert_eq!(c.hosts_answers, 5);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_update_visible_within_100ms() {
    let b = loopback_block();
    let plan = DnsPlan {
        hosts: hosts(),
        ..DnsPlan::default()
    };
    let (h, addr) = start(config(ip(b, 1)), plan).await;
    let mut new = hosts();
    new.insert(
        "new.internal".to_string(),
        vec!["10.1.2.3".parse().unwrap()],
    );
    new.remove("gateway.internal");
    let t0 = Instant::now();
    h.set_hosts(new);
    let m = udp(addr, "new.internal.", RecordType::A, None).await;
    let took = t0.elapsed();
    assert_eq!(addrs(&m), vec![IpAddr::from([10, 1, 2, 3])]);
    assert!(took < Duration::from_millis(100), "took {took:?}");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_name_without_reachable_upstream_is_servfail() {
    let b = loopback_block();
    // Upstream on a port nothing listens on (ECONNREFUSED), chain members likewise.
    let dead = std::net::SocketAddr::new(ip(b, 9), free_port(ip(b, 9)));
    let plan = DnsPlan {
        hosts: hosts(),
        mosdns_enabled: true,
        clash_enabled: true,
        upstreams: vec![group("dead", 1, vec![dead], 30, 3)],
    };
    let (h, addr) = start(config(ip(b, 1)), plan).await;
    h.set_chain_state(meduza::dns::ChainState {
        mosdns_running: true,
        clash_healthy: true,
    });
    let t0 = Instant::now();
    let m = udp(addr, "not-a-host.example.", RecordType::A, None).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "refused upstreams fail fast"
    );
    // host records still answer
    let m = udp(addr, "gateway.internal.", RecordType::A, None).await;
    assert_eq!(addrs(&m), vec![IpAddr::from([10, 42, 1, 1])]);
    h.shutdown().await;
}

#[test]
fn hosts_file_format_and_atomic_rewrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("etcd_hosts");
    assert!(meduza::dns::write_hosts_file_if_changed(&path, &hosts()).unwrap());
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "192.168.1.100\tdb.example.com\n192.168.1.101\tdb.example.com\nfd00::100\tdb.example.com\n10.42.1.1\tgateway.internal\n"
    );
    let before = std::fs::metadata(&path).unwrap().modified().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(!meduza::dns::write_hosts_file_if_changed(&path, &hosts()).unwrap());
    assert_eq!(
        std::fs::metadata(&path).unwrap().modified().unwrap(),
        before,
        "unchanged file not rewritten"
    );
    assert!(meduza::dns::write_hosts_file_if_changed(&path, &BTreeMap::new()).unwrap());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
}
