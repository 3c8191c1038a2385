//! Bad inputs per key type: each is refused with an error naming the key, and a
//! snapshot with several bad keys reports every one of them.

use crate::common;

use meduza_generators::render::render_node;
use meduza_generators::{Config, Snapshot, ValidationErrors};

/// (key, bad value, words the reason must contain)
const CASES: &[(&str, &str, &str)] = &[
    ("/nodes/gw-a/lan", "10.42.1.0", "CIDR"),
    ("/nodes/gw-a/lan", "10.42.1.1/24", "host bits"),
    ("/nodes/gw-a/private_lan", "banana", "CIDR"),
    ("/nodes/gw-a/tinc/port", "0", "range"),
    ("/nodes/gw-a/tinc/port", "70000", "range"),
    (
        "/nodes/gw-b/wireguard/partner/listen_port",
        "70000",
        "range",
    ),
    ("/nodes/gw-a/openvpn/isp1/port", "0", "range"),
    (
        "/nodes/gw-a/clash/exclude_tproxy_port",
        "22\n70000",
        "range",
    ),
    ("/nodes/gw-a/tinc/dev_name", "abcdefghijklmnop", "1-15"),
    (
        "/nodes/gw-a/tinc/dev_name",
        "eth0;reboot",
        "may only contain",
    ),
    (
        "/nodes/gw-a/openvpn/isp1/dev",
        "eth0;reboot",
        "may only contain",
    ),
    (
        "/nodes/gw-b/wireguard/partner/dev",
        "abcdefghijklmnop",
        "1-15",
    ),
    ("/nodes/gw-a/easytier/dev_name", "et 0", "may only contain"),
    ("/nodes/gw-a/tinc/enable", "yes", "true"),
    ("/nodes/gw-a/clash/enable", "1", "true"),
    ("/nodes/gw-a/openvpn/isp1/bgp/no_transit", "yes", "true"),
    ("/global/easytier/private_mode", "on", "true"),
    ("/global/mesh_type", "zerotier", "easytier, tinc"),
    ("/global/internal_routing_system", "rip", "ospf, bgp"),
    (
        "/global/mosdns/plugins",
        "- tag: a\n  type: [unclosed",
        "YAML",
    ),
    ("/global/mosdns/plugins", "tag: main", "list"),
    ("/global/clash/base", "mode: [rule", "YAML"),
    (
        "/global/bgp/filter/in",
        "allow 10.0.0.0/8",
        "permit or deny",
    ),
    ("/global/bgp/filter/in", "permit 2001:db8::/32", "IPv4"),
    ("/nodes/gw-a/bgp/asn", "0", "range"),
    ("/nodes/gw-a/bgp/router_id", "10.0.0.300", "IPv4"),
    ("/nodes/gw-a/openvpn/isp1/bgp/peer_ip", "172.31.0", "IP"),
    (
        "/nodes/gw-b/wireguard/partner/private_key",
        "not-base64!",
        "base64",
    ),
    (
        "/nodes/gw-b/wireguard/partner/peer/partner-gw/endpoint",
        "192.0.2.50",
        "ip:port",
    ),
    (
        "/nodes/gw-a/openvpn/isp1/secret",
        "/etc/openvpn/static.key",
        "inline",
    ),
    ("/nodes/gw-a/tinc/public_key", "ssh-rsa AAAA", "PEM"),
    ("/nodes/gw-a/clash/mode", "redir", "mixed, tproxy"),
    ("/nodes/gw-a/clash/secret", "short", "16"),
    ("/nodes/gw-a/openvpn/isp1/proto", "tcp", "tcp-server"),
    ("/nodes/gw-b/easytier/peers", "11010", "URL"),
    (
        "/nodes/gw-a/easytier/listeners",
        "http://0.0.0.0:80",
        "protocol",
    ),
    (
        "/global/dns/upstreams/alidns/addresses",
        "tls://1.1.1.1",
        "plain DNS",
    ),
    (
        "/global/mosdns/rule_files",
        "{\"../../etc/passwd\": \"http://x\"}",
        "relative",
    ),
    ("/dns/hosts/db.example.com", "192.168.1.300", "IP"),
    ("/nodes/gw-a/tunnels/backup/kind", "ssh", "paqet"),
];

/// The example snapshot with the keys `set` to these values and the keys in `remove`
/// taken out.
fn example_with(set: &[(&str, &str)], remove: &[&str]) -> Snapshot {
    let mut s = common::example_snapshot();
    for (k, v) in set {
        s.0.insert(k.to_string(), v.to_string());
    }
    for k in remove {
        s.0.remove(*k);
    }
    s
}

fn with(key: &str, value: &str) -> Snapshot {
    example_with(&[(key, value)], &[])
}

/// `s` must be refused (`why` says why) with an error on each of `keys`.
fn assert_refused_on(s: &Snapshot, keys: &[&str], why: &str) -> ValidationErrors {
    let errs = Config::parse(s).expect_err(why);
    for k in keys {
        assert!(
            errs.0.iter().any(|e| e.key == *k),
            "no error for {k}: {errs}"
        );
    }
    errs
}

#[test]
fn the_example_itself_is_valid() {
    common::parse(&common::example_snapshot());
}

#[test]
fn every_bad_value_is_refused_naming_its_key() {
    let mut failures = Vec::new();
    for (key, value, reason) in CASES {
        match Config::parse(&with(key, value)) {
            Ok(_) => failures.push(format!("{key} = {value:?} was accepted")),
            Err(errs) => {
                let hit = errs
                    .0
                    .iter()
                    .find(|e| e.key == *key && e.reason.contains(reason));
                if hit.is_none() {
                    failures.push(format!(
                        "{key} = {value:?}: no error naming the key with {reason:?}: {errs}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn several_errors_are_all_reported() {
    let bad = [
        ("/nodes/gw-a/lan", "not-a-cidr"),
        ("/nodes/gw-b/tinc/port", "70000"),
        ("/nodes/gw-c/tinc/dev_name", "eth0;reboot"),
        ("/global/mesh_type", "zerotier"),
        ("/global/mosdns/plugins", "- tag: [x"),
        ("/nodes/gw-a/clash/enable", "yes"),
    ];
    let keys: Vec<&str> = bad.iter().map(|(k, _)| *k).collect();
    let errs = assert_refused_on(&example_with(&bad, &[]), &keys, "six bad keys");
    // Errors come in key order, so the report is stable.
    let keys: Vec<&str> = errs.0.iter().map(|e| e.key.as_str()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
}

#[test]
fn a_mesh_without_mesh_type_is_refused() {
    let key = ["/global/mesh_type"];
    let s = example_with(&[], &key);
    assert_refused_on(&s, &key, "mesh enabled without a type");
}

#[test]
fn enabled_tinc_needs_both_keys() {
    let keys = [
        "/nodes/gw-b/tinc/public_key",
        "/nodes/gw-b/tinc/private_key",
    ];
    assert_refused_on(&example_with(&[], &keys), &keys, "keys missing");
}

#[test]
fn render_errors_name_the_key() {
    let cfg = common::parse(&common::example_snapshot());
    let e = render_node(&cfg, "gw-z", &common::env()).expect_err("no such node");
    assert_eq!(e.key, "/nodes/gw-z/");

    // No etcd secret and no generated one: Clash refuses instead of a public default.
    let mut env = common::env();
    env.clash_secret.clear();
    let e = render_node(&cfg, "gw-b", &env).expect_err("gw-b has no clash/secret");
    assert_eq!(e.key, "/nodes/gw-b/clash/secret");
    assert!(
        render_node(&cfg, "gw-a", &env).is_ok(),
        "gw-a has its own secret"
    );

    // A health override of a kind that needs a target.
    let cfg = common::parse(&with("/nodes/gw-a/services/mihomo/health/kind", "tcp"));
    let e = render_node(&cfg, "gw-a", &common::env()).expect_err("tcp probe needs a target");
    assert_eq!(e.key, "/nodes/gw-a/services/mihomo/health/target");

    // Plugins without a sequence: the servers would have no entry.
    let s = with(
        "/global/mosdns/plugins",
        "- tag: f\n  type: forward\n  args:\n    upstreams:\n      - addr: 1.1.1.1\n",
    );
    let cfg = common::parse(&s);
    let e = render_node(&cfg, "gw-a", &common::env()).expect_err("no sequence");
    assert_eq!(e.key, "/global/mosdns/plugins");
}
