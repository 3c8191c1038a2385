//! Forwarding through a real dnsmasq upstream: answers, TCP clients, TCP fallback for
//! truncated upstream answers, cache TTLs, malformed packets, overload.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, RecordType};
use meduza_generators::plan::dns::DnsPlan;
use meduza_test_support::dns::*;

fn plan_with(up: SocketAddr) -> DnsPlan {
    DnsPlan {
        upstreams: vec![group("up", 1, vec![up], 30, 3)],
        ..DnsPlan::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_udp_and_tcp_clients() {
    let b = loopback_block();
    let up = Dnsmasq::start(ip(b, 2), Ipv4Addr::new(10, 0, 0, 1), &[]);
    let (h, addr) = start(config(ip(b, 1)), plan_with(up.addr)).await;
    let m = udp(addr, "a.test.", RecordType::A, None).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&m), vec![IpAddr::from([10, 0, 0, 1])]);
    assert!(m.metadata.recursion_available);
    let m = tcp(addr, "b.test.", RecordType::A).await;
    assert_eq!(addrs(&m), vec![IpAddr::from([10, 0, 0, 1])]);
    // Private-range answers are passed through (no rebinding filter).
    let up2 = Dnsmasq::start(ip(b, 3), Ipv4Addr::new(192, 168, 7, 7), &[]);
    h.update_plan(plan_with(up2.addr));
    let m = udp(addr, "lan.test.", RecordType::A, None).await;
    assert_eq!(addrs(&m), vec![IpAddr::from([192, 168, 7, 7])]);
    let st = h.upstream_status();
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].name, "up");
    assert!(st[0].queries >= 1);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_upstream_answer_retried_over_tcp() {
    let b = loopback_block();
    let strings: Vec<String> = ["a", "b", "c", "d"].iter().map(|c| c.repeat(250)).collect();
    let txt = format!("--txt-record=big.test,{}", strings.join(","));
    // The upstream caps its UDP answers at 512 bytes: big.test comes back TC=1.
    let up = Dnsmasq::start(
        ip(b, 2),
        Ipv4Addr::new(10, 0, 0, 1),
        &[&txt, "--edns-packet-max=512"],
    );
    let direct = udp(up.addr, "big.test.", RecordType::TXT, Some(4096)).await;
    assert!(
        direct.metadata.truncation,
        "the upstream truncates over UDP"
    );

    let (h, addr) = start(config(ip(b, 1)), plan_with(up.addr)).await;
    // An EDNS client with room gets the whole answer over UDP in one go.
    let m = udp(addr, "big.test.", RecordType::TXT, Some(4096)).await;
    assert!(!m.metadata.truncation);
    let RData::TXT(t) = &m.answers[0].data else {
        panic!("not TXT: {:?}", m.answers)
    };
    assert_eq!(t.txt_data.len(), 4);
    assert_eq!(t.txt_data[3].len(), 250);
    // A client limited to 512 bytes is told to use TCP, and gets it all there.
    let m = udp(addr, "big.test.", RecordType::TXT, None).await;
    assert!(m.metadata.truncation);
    let m = tcp(addr, "big.test.", RecordType::TXT).await;
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 1);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_honours_ttl() {
    let b = loopback_block();
    let mut up = Dnsmasq::start(ip(b, 2), Ipv4Addr::new(10, 0, 0, 1), &["--local-ttl=2"]);
    let (h, addr) = start(config(ip(b, 1)), plan_with(up.addr)).await;
    let m = udp(addr, "c.test.", RecordType::A, None).await;
    assert_eq!(m.answers[0].ttl, 2);
    let t_stored = Instant::now();
    up.kill();
    // Served from the cache while the TTL lasts, TTL counting down.
    let m = udp(addr, "C.TEST.", RecordType::A, None).await;
    assert_eq!(addrs(&m), vec![IpAddr::from([10, 0, 0, 1])]);
    assert_eq!(m.queries[0].name().to_ascii(), "C.TEST.");
    assert!(m.answers[0].ttl <= 2);
    assert!(h.counters().cache_hits >= 1);
    // Expired: forwarded again, and with the upstream gone that is SERVFAIL.
    tokio::time::sleep(Duration::from_millis(2100).saturating_sub(t_stored.elapsed())).await;
    let m = udp(addr, "c.test.", RecordType::A, None).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_get_formerr_or_silence() {
    let b = loopback_block();
    let up = Dnsmasq::start(ip(b, 2), Ipv4Addr::new(10, 0, 0, 1), &[]);
    let (h, addr) = start(config(ip(b, 1)), plan_with(up.addr)).await;
    let short = Duration::from_millis(300);
    // Too short for a header: ignored.
    assert!(udp_raw(addr, &[1, 2, 3], short).await.is_none());
    // A response (QR=1): ignored, never reflected.
    let mut resp = query_msg("a.test.", RecordType::A, None, 9)
        .to_vec()
        .unwrap();
    resp[2] |= 0x80;
    assert!(udp_raw(addr, &resp, short).await.is_none());
    // Header fine, question cut: FORMERR with the same id.
    let q = query_msg("a.test.", RecordType::A, None, 0x5151)
        .to_vec()
        .unwrap();
    let r = udp_raw(addr, &q[..q.len() - 3], short)
        .await
        .expect("FORMERR answer");
    assert_eq!(&r[0..2], &[0x51, 0x51]);
    assert_eq!(r[3] & 0x0F, 1, "FORMERR");
    // Random garbage with a header: an answer or nothing, never a crash.
    for i in 0..200u32 {
        let mut g: Vec<u8> = (0..(12 + i % 300)).map(|_| rand::random()).collect();
        g[2] &= 0x7F;
        let _ = udp_raw(addr, &g, Duration::from_millis(5)).await;
    }
    // Still serving.
    let m = udp(addr, "after.test.", RecordType::A, None).await;
    assert_eq!(addrs(&m), vec![IpAddr::from([10, 0, 0, 1])]);
    let m = tcp(addr, "after.test.", RecordType::A).await;
    assert_eq!(addrs(&m), vec![IpAddr::from([10, 0, 0, 1])]);
    assert!(h.counters().formerr >= 1);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_answers_servfail_instead_of_dropping() {
    let b = loopback_block();
    // An upstream that receives and never answers.
    let black_hole = std::net::UdpSocket::bind(SocketAddr::new(ip(b, 2), 0)).unwrap();
    let mut cfg = config(ip(b, 1));
    cfg.max_inflight = 8;
    cfg.attempt_timeout = Duration::from_millis(1500);
    let (h, addr) = start(cfg, plan_with(black_hole.local_addr().unwrap())).await;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..100 {
        tasks.push(tokio::spawn(async move {
            let q = query_msg(&format!("q{i}.test."), RecordType::A, None, i as u16)
                .to_vec()
                .unwrap();
            let r = udp_raw(addr, &q, Duration::from_secs(6)).await;
            (r, t0.elapsed())
        }));
    }
    let mut fast_servfail = 0;
    for t in tasks {
        let (r, at) = t.await.unwrap();
        let r = r.expect("every query is answered");
        assert_eq!(r[3] & 0x0F, 2, "SERVFAIL");
        if at < Duration::from_millis(1000) {
            fast_servfail += 1;
        }
    }
    assert!(
        fast_servfail >= 90,
        "over the bound answered at once: {fast_servfail}"
    );
    let c = h.counters();
    assert_eq!(c.servfail_overload + c.forwarded, 100);
    assert!(c.forwarded <= 8 + 4, "forwarded {}", c.forwarded);
    drop(black_hole);
    h.shutdown().await;
}
