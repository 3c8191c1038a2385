//! The model's unit tests: parsing whole snapshots, key by key.

use super::*;
use crate::error::ValidationErrors;
use crate::snapshot::Snapshot;

fn parse(keys: &[(&str, &str)]) -> Result<Config, ValidationErrors> {
    let mut snap = Snapshot::default();
    snap.0.insert("/nodes/a/lan".into(), "10.0.0.0/24".into());
    snap.0.insert("/nodes/b/lan".into(), "10.0.1.0/24".into());
    for (k, v) in keys {
        snap.0.insert((*k).to_string(), (*v).to_string());
    }
    Config::parse(&snap)
}

fn health(keys: &[(&str, &str)], node: &str) -> ClashHealthCheck {
    let cfg = parse(keys).expect("valid snapshot");
    cfg.node(node).expect("node").clash.health.clone()
}

/// The settings `url`, `interval_secs`, `probe_interval_secs`, `timeout_ms`.
fn health_check(
    url: &str,
    interval: u64,
    probe_interval: u64,
    timeout_ms: u64,
) -> ClashHealthCheck {
    ClashHealthCheck {
        url: url.into(),
        interval_secs: interval,
        probe_interval_secs: probe_interval,
        timeout_ms,
    }
}

#[test]
fn clash_health_defaults() {
    let d = ClashHealthCheck::default();
    assert_eq!(d.url, "https://www.gstatic.com/generate_204");
    assert_eq!(
        (d.interval_secs, d.probe_interval_secs, d.timeout_ms),
        (300, 10, 5000)
    );
    let cfg = parse(&[]).expect("valid snapshot");
    assert_eq!(cfg.global.clash.health, d);
    assert_eq!(cfg.node("a").expect("a").clash.health, d);
}

#[test]
fn api_tls_keys_decode_and_errors_name_the_key_not_the_secret() {
    const CERT: &str = include_str!("../../../tests/data/tls/self.crt");
    const KEY: &str = include_str!("../../../tests/data/tls/self.key");
    let cfg = parse(&[
        ("/nodes/a/api/tls/cert", CERT),
        ("/nodes/a/api/tls/key", KEY),
    ])
    .expect("valid snapshot");
    let tls = cfg.node("a").expect("a").api_tls.clone().expect("tls");
    assert!(tls.cert_pem.contains("BEGIN CERTIFICATE"));
    assert!(!format!("{tls:?}").contains("PRIVATE KEY"), "{tls:?}");
    assert!(cfg.node("b").expect("b").api_tls.is_none());

    let secret = "-----BEGIN PRIVATE KEY-----\nc2Vj!cmV0\n-----END PRIVATE KEY-----";
    let errs = parse(&[
        ("/nodes/a/api/tls/cert", "not pem"),
        ("/nodes/a/api/tls/key", secret),
        ("/nodes/b/api/tls/cert", CERT),
    ])
    .expect_err("bad PEM")
    .0;
    let by_key = |k: &str| errs.iter().find(|e| e.key == k).cloned();
    let cert = by_key("/nodes/a/api/tls/cert").expect("cert error");
    assert!(cert.reason.contains("no \"BEGIN CERTIFICATE\""), "{cert:?}");
    let key = by_key("/nodes/a/api/tls/key").expect("key error");
    assert_eq!(key.value, "<redacted>");
    assert!(key.reason.starts_with("not a PEM private key"), "{key:?}");
    assert!(!key.reason.contains("c2Vj"), "{key:?}");
    let missing = by_key("/nodes/b/api/tls/key").expect("missing key error");
    assert!(
        missing.reason.contains("/nodes/b/api/tls/cert is set"),
        "{missing:?}"
    );
}

#[test]
fn clash_health_global_keys_apply_to_every_node() {
    let keys = [
        ("/global/clash/health/url", "http://cp.cloudflare.com/"),
        ("/global/clash/health/interval", "600"),
        ("/global/clash/health/probe_interval", "2"),
        ("/global/clash/health/timeout", "1500"),
    ];
    let want = health_check("http://cp.cloudflare.com/", 600, 2, 1500);
    assert_eq!(health(&keys, "a"), want);
    assert_eq!(health(&keys, "b"), want);
}

#[test]
fn clash_health_node_keys_are_parsed() {
    let keys = [
        (
            "/nodes/a/clash/health/url",
            "https://[2001:db8::1]:8443/204?x=1",
        ),
        ("/nodes/a/clash/health/interval", "5"),
        ("/nodes/a/clash/health/probe_interval", "3600"),
        ("/nodes/a/clash/health/timeout", "60000"),
    ];
    let want = health_check("https://[2001:db8::1]:8443/204?x=1", 5, 3600, 60_000);
    assert_eq!(health(&keys, "a"), want);
    assert_eq!(health(&keys, "b"), ClashHealthCheck::default());
}

#[test]
fn clash_health_node_key_wins_over_global_key() {
    let keys = [
        ("/global/clash/health/url", "http://cp.cloudflare.com/"),
        ("/global/clash/health/interval", "600"),
        ("/global/clash/health/probe_interval", "20"),
        ("/global/clash/health/timeout", "3000"),
        ("/nodes/a/clash/health/url", "http://captive.apple.com"),
        ("/nodes/a/clash/health/timeout", "800"),
    ];
    // Key by key: the node's keys win, its absent keys take the global values.
    assert_eq!(
        health(&keys, "a"),
        health_check("http://captive.apple.com", 600, 20, 800)
    );
    assert_eq!(health(&keys, "b").url, "http://cp.cloudflare.com/");
    assert_eq!(health(&keys, "b").timeout_ms, 3000);
}

#[test]
fn confirm_timeout_defaults_global_and_node_override() {
    let cfg = parse(&[
        ("/nodes/a/lan", "10.0.0.0/24"),
        ("/nodes/b/lan", "10.1.0.0/24"),
    ])
    .unwrap();
    assert_eq!(cfg.node("a").unwrap().confirm_timeout_secs, 90);
    let cfg = parse(&[
        ("/global/confirm_timeout", "120"),
        ("/nodes/a/confirm_timeout", "10"),
        ("/nodes/b/lan", "10.1.0.0/24"),
    ])
    .unwrap();
    assert_eq!(cfg.node("a").unwrap().confirm_timeout_secs, 10);
    assert_eq!(cfg.node("b").unwrap().confirm_timeout_secs, 120);
    for (key, value) in [
        ("/global/confirm_timeout", "9"),
        ("/nodes/a/confirm_timeout", "3601"),
        ("/nodes/a/confirm_timeout", "90s"),
    ] {
        let errs = parse(&[(key, value)]).expect_err(value);
        assert_eq!(
            (errs.0[0].key.as_str(), errs.0[0].value.as_str()),
            (key, value)
        );
    }
}

#[test]
fn clash_health_invalid_values_are_refused_naming_the_key() {
    // (leaf, bad value, words of the reason)
    const CASES: &[(&str, &str, &str)] = &[
        ("url", "ftp://example.com/", "http:// or https://"),
        ("url", "www.gstatic.com/generate_204", "http:// or https://"),
        ("url", "https://", "no host"),
        ("url", "http:///generate_204", "no host"),
        ("url", "http://:80/x", "no host"),
        ("url", "https://exa mple.com/", "whitespace"),
        ("url", "https://$(reboot)/", "host may only contain"),
        ("url", "https://example.com:0/", "port"),
        ("url", "https://example.com:http/", "port"),
        ("url", "https://user@example.com/", "user information"),
        ("url", "https://[::1/", "unclosed"),
        ("url", "https://[example]/", "IPv6"),
        ("url", "https://[::1]x/", ":port"),
        ("interval", "4", "out of range 5-86400"),
        ("interval", "86401", "out of range 5-86400"),
        ("interval", "5m", "not a whole number"),
        ("probe_interval", "0", "out of range 1-3600"),
        ("probe_interval", "3601", "out of range 1-3600"),
        ("probe_interval", "-1", "not a whole number"),
        ("timeout", "99", "out of range 100-60000"),
        ("timeout", "60001", "out of range 100-60000"),
        ("timeout", "1.5", "not a whole number"),
    ];
    for base in ["/global/", "/nodes/a/"] {
        for (leaf, value, reason) in CASES {
            let key = format!("{base}clash/health/{leaf}");
            let errs = parse(&[(&key, value)]).expect_err(&format!("{key} = {value:?}"));
            assert_eq!(errs.0.len(), 1, "{key} = {value:?}: {errs}");
            let e = &errs.0[0];
            assert_eq!((e.key.as_str(), e.value.as_str()), (key.as_str(), *value));
            assert!(
                e.reason.contains(reason),
                "{key} = {value:?}: reason {:?} lacks {reason:?}",
                e.reason
            );
        }
    }
}

const EXAMPLE: &str = include_str!("../../../docs/examples/three-nodes.json");

#[test]
fn duplicate_peer_ip_is_refused() {
    let mut s = Snapshot::from_json(EXAMPLE).expect("example is JSON");
    for (k, v) in [
        ("/nodes/gw-a/wireguard/w2/enable", "true"),
        (
            "/nodes/gw-a/wireguard/w2/private_key",
            "YAnz3Pnh6Kc7Xd9xUIpVvf6n7XUqCo3qAwU6qhOb0W8=",
        ),
        ("/nodes/gw-a/wireguard/w2/bgp/enable", "true"),
        ("/nodes/gw-a/wireguard/w2/bgp/peer_asn", "65100"),
        ("/nodes/gw-a/wireguard/w2/bgp/peer_ip", "172.31.0.2"),
    ] {
        s.0.insert(k.into(), v.into());
    }
    let cfg = Config::parse(&s).expect("validates");
    let e = frr_routing(&cfg, cfg.node("gw-a").expect("gw-a")).expect_err("same peer twice");
    assert_eq!(e.key, "/nodes/gw-a/wireguard/w2/bgp/peer_ip");
}
