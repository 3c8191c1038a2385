//! End to end: the subscription refresh and the MosDNS rule refresh of the real
//! `meduza run` (DESIGN §9, docs/clash.md "Subscriptions"), in the gateway lab of
//! `tests/support/src/gateway_lab.rs` (gateway, etcd and "internet" namespaces; the real
//! mihomo v1.19.2 and the MosDNS double as meduza's children; the proxy node a second
//! real mihomo).
//!
//! `MEDUZA_MINUTE_MS=200` makes one configured minute last 200 ms, so
//! `clash/refresh/interval_minutes = 5` and `mosdns/refresh = 5` (the smallest values
//! validation accepts) both mean one refresh per second.
//!
//! What it proves with the real mihomo, in order:
//! 1. a new subscription is downloaded through mihomo's mixed port (the server sees
//!    the node's address), stored in mihomo's provider file under `MEDUZA_ROOT`, and
//!    mihomo runs it (`GET /proxies` lists the new proxies, the old ones are gone)
//!    after a `PUT /configs` (mihomo logs a new configuration);
//! 2. an invalid subscription (an HTML page; a document without `proxies`) leaves the
//!    provider file and mihomo alone, says why in a `[clash-refresh]` log line and in
//!    `/updated/<id>/clash/subscription`, while `errors` stays `[]` and health healthy;
//! 3. MosDNS rule refreshes: unchanged content keeps MosDNS's pid; changed content is
//!    written and MosDNS restarted (new pid) and answers from the new rules;
//! 4. a commit that switches the active subscription: commit → `applied` published and
//!    mihomo running the new proxies (a `FIGURE`).
//!
//! With the mihomo double, the one fault the real mihomo cannot be made to show:
//! `PUT /configs` answered 204 but not applied is caught by the verification and
//! SIGHUP applies it.
//!
//! Needs root, etcd, iproute2, curl, dig, python3-yaml and the real mihomo.

use meduza_test_support::{gateway_lab, netns};

use gateway_lab::{node_proxy, wait_for, Lab, Mihomo, HTTP_PORT, NODE, NODE_PORT, PROXY_OUT};
use netns::Topology;
use std::net::IpAddr;
use std::time::{Duration, Instant};

const SECRET: &str = "refresh-test-secret-0123";
const RULES_A: &str = "domain:listed.example\n";
const RULES_B: &str = "domain:listed.example\ndomain:added.example\n";
const PLUGINS: &str = "- tag: proxy_domains\n  type: domain_set\n  args:\n    files:\n      - rules/proxy.txt\n- tag: forward_clash\n  type: forward\n  args:\n    upstreams:\n      - addr: udp://127.0.0.1:1053\n- tag: main\n  type: sequence\n  args:\n    - matches:\n        - qname $proxy_domains\n      exec: $forward_clash\n";
/// Where meduza keeps the subscription: mihomo's provider file.
const PROVIDER: &str = "root/etc/mihomo/providers/sub.yaml";
const RULE_FILE: &str = "root/etc/mosdns/rules/proxy.txt";

/// A subscription whose proxies are all the lab's node (so every one is alive).
fn sub(names: &[&str]) -> String {
    let mut s = String::from("proxies:\n");
    for n in names {
        s.push_str(&format!("  - {}\n", node_proxy(n, NODE_PORT)));
    }
    s
}

/// `GET <path>` of meduza's mihomo API, from inside the gateway namespace.
fn mihomo_get(lab: &Lab, path: &str) -> serde_json::Value {
    let out = lab.topo.gw.exec(&[
        "curl",
        "-sS",
        "--max-time",
        "2",
        "-H",
        &format!("Authorization: Bearer {SECRET}"),
        &format!("http://127.0.0.1:9090{path}"),
    ]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("GET {path}: {e}: {out}"))
}

/// Whether mihomo runs a proxy named `name` and, if so, from which provider: the
/// real mihomo lists it under `GET /providers/proxies`, the double names it in the
/// proxy's `provider-name`.
fn mihomo_has(lab: &Lab, name: &str) -> Option<String> {
    let proxies = mihomo_get(lab, "/proxies");
    let entry = proxies["proxies"].get(name)?;
    if lab.mihomo == Mihomo::Double {
        return Some(entry["provider-name"].as_str().unwrap_or("").to_string());
    }
    let providers = mihomo_get(lab, "/providers/proxies");
    let owner = providers["providers"]
        .as_object()
        .into_iter()
        .flatten()
        .find(|(_, p)| {
            p["proxies"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|x| x["name"] == name)
        })
        .map(|(provider, _)| provider.clone());
    Some(owner.unwrap_or_default())
}

fn read(lab: &Lab, rel: &str) -> Option<String> {
    std::fs::read_to_string(lab.path(rel)).ok()
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// Wait until `log` has more lines containing `needle` than `before`.
fn wait_log(lab: &Lab, needle: &str, before: usize, timeout: Duration) -> String {
    wait_for(
        &format!("log line {needle:?} (more than {before})"),
        timeout,
        || {
            let log = lab.log();
            (count(&log, needle) > before).then_some(log)
        },
    )
}

/// Every request for `path` from index `from` on came through mihomo: from the node
/// (real mihomo), or from the double's outbound address with its `Via` header.
fn assert_proxied(lab: &Lab, path: &str, from: usize) {
    let seen = lab.requests(path);
    assert!(seen.len() > from, "no request for {path} since #{from}");
    for r in &seen[from..] {
        match lab.mihomo {
            Mihomo::Real => {
                let node: IpAddr = Topology::SERVER4.into();
                assert_eq!(r.peer, node, "{path} fetched around the node: {r:?}");
            }
            Mihomo::Double => {
                let proxy_out: IpAddr = PROXY_OUT.parse().unwrap();
                assert_eq!(r.peer, proxy_out, "{path} fetched around mihomo: {r:?}");
                assert_eq!(r.via.as_deref(), Some("1.1 fake-mihomo"), "{r:?}");
            }
        }
    }
}

/// What mihomo logs each time it applies a configuration.
fn applied_marker(lab: &Lab) -> &'static str {
    match lab.mihomo {
        Mihomo::Real => "Initial configuration complete",
        Mihomo::Double => "Configuration applied from",
    }
}
const REFUSED: &str = "[clash-refresh] refresh failed, keeping last good subscription";

/// The lab with Clash in mixed mode, refreshes every second, meduza started with
/// `mihomo` and healthy, running the first subscription (`hk1`, `jp1`).
fn healthy_lab(mihomo: Mihomo) -> Lab {
    let mut lab = Lab::new();
    let url = |p: &str| format!("http://{}:{HTTP_PORT}{p}", Topology::SERVER4);

    if mihomo == Mihomo::Double {
        lab.control("{}");
    }
    lab.serve("/sub.yaml", &sub(&["hk1", "jp1"]));
    lab.serve("/rules/proxy.txt", RULES_A);
    lab.put("/global/clash/subscriptions/sub/url", &url("/sub.yaml"));
    lab.put_health_keys(1, 1000);
    lab.put(
        "/global/mosdns/rule_files",
        &format!(r#"{{"rules/proxy.txt": "{}"}}"#, url("/rules/proxy.txt")),
    );
    lab.put("/global/mosdns/plugins", PLUGINS);
    lab.put_node(&[
        ("lan", Topology::LAN4),
        ("clash/enable", "true"),
        ("clash/mode", "mixed"),
        ("clash/secret", SECRET),
        ("clash/active_subscription", "sub"),
        ("clash/refresh/enable", "true"),
        ("clash/refresh/interval_minutes", "5"),
        ("mosdns/enable", "true"),
        ("mosdns/refresh", "5"),
    ]);
    lab.put("/commit", "1");
    lab.start_meduza(
        mihomo,
        &[("MEDUZA_MINUTE_MS", "200"), ("MEDUZA_DATAPLANE", "off")],
    );

    lab.wait_status("clash/health", Duration::from_secs(30), |v| {
        v.starts_with("healthy ")
    });
    assert_eq!(lab.status("errors").as_deref(), Some("[]"));

    // 1. The first subscription: stored in the provider file, mihomo runs it.
    wait_for("the provider file", Duration::from_secs(15), || {
        (read(&lab, PROVIDER) == Some(sub(&["hk1", "jp1"]))).then_some(())
    });
    wait_for("mihomo to run hk1 and jp1", Duration::from_secs(10), || {
        (mihomo_has(&lab, "hk1").is_some() && mihomo_has(&lab, "jp1").is_some()).then_some(())
    });
    assert_eq!(mihomo_has(&lab, "hk1").as_deref(), Some("sub"));
    lab.wait_status("clash/subscription", Duration::from_secs(5), |v| {
        v.starts_with("ok ")
    });

    lab
}

#[test]
fn subscription_and_rule_refresh_with_real_mihomo() {
    let lab = healthy_lab(Mihomo::Real);
    let node = |k: &str| format!("/nodes/{NODE}/{k}");
    let url = |p: &str| format!("http://{}:{HTTP_PORT}{p}", Topology::SERVER4);

    // A new subscription, downloaded through mihomo while it is healthy.
    let from = lab.requests("/sub.yaml").len();
    let applied = count(&lab.log(), applied_marker(&lab));
    let reloads = count(&lab.log(), "mihomo reloaded via API");
    lab.serve("/sub.yaml", &sub(&["hk1", "sg1"]));
    wait_for("mihomo to run sg1", Duration::from_secs(10), || {
        mihomo_has(&lab, "sg1").is_some().then_some(())
    });
    assert_eq!(mihomo_has(&lab, "jp1"), None, "jp1 still runs");
    assert_eq!(read(&lab, PROVIDER), Some(sub(&["hk1", "sg1"])));
    assert_proxied(&lab, "/sub.yaml", from);
    let log = lab.log();
    assert!(
        count(&log, applied_marker(&lab)) > applied,
        "mihomo applied no config"
    );
    assert!(
        count(&log, "mihomo reloaded via API") > reloads,
        "not reloaded through the API"
    );
    let status = lab.wait_status("clash/subscription", Duration::from_secs(5), |v| {
        v.contains("reloaded via api")
    });
    assert!(
        status.starts_with("ok ") && status.contains(" 2 proxies"),
        "{status}"
    );

    // 2. Invalid subscriptions: the last good one stays, mihomo is not reloaded.
    for (body, reason) in [
        ("<html>blocked</html>\n", "not a YAML mapping"),
        (
            "proxy-providers:\n  p: {type: http, url: 'http://x', path: ./p.yaml}\n",
            "no proxies list",
        ),
    ] {
        let applied = count(&lab.log(), applied_marker(&lab));
        let refused = count(&lab.log(), REFUSED);
        let from = lab.requests("/sub.yaml").len();
        lab.serve("/sub.yaml", body);
        let log = wait_log(&lab, REFUSED, refused, Duration::from_secs(10));
        let line = log
            .lines()
            .rfind(|l| l.contains(REFUSED))
            .unwrap_or_default();
        assert!(line.contains(reason), "{line}");
        let status = lab.wait_status("clash/subscription", Duration::from_secs(5), |v| {
            v.starts_with("failed ")
        });
        assert!(
            status.contains(reason) && status.ends_with("keeping the last good subscription"),
            "{status}"
        );
        // Two more rounds, still refused, nothing applied.
        wait_for("two more downloads", Duration::from_secs(10), || {
            (lab.requests("/sub.yaml").len() >= from + 3).then_some(())
        });
        assert_eq!(read(&lab, PROVIDER), Some(sub(&["hk1", "sg1"])));
        assert!(mihomo_has(&lab, "sg1").is_some(), "mihomo lost sg1");
        assert_eq!(
            count(&lab.log(), applied_marker(&lab)),
            applied,
            "mihomo reloaded"
        );
        assert_eq!(lab.status("errors").as_deref(), Some("[]"));
        let health = lab.status("clash/health").unwrap_or_default();
        assert!(health.starts_with("healthy "), "{health}");
    }

    // 3. MosDNS rule refresh: unchanged → same pid; changed → restarted, new rules.
    let mosdns = wait_for("MosDNS to start", Duration::from_secs(10), || {
        lab.pid_of("fake_mosdns.py")
    });
    lab.wait_status("services/mosdns/status", Duration::from_secs(5), |v| {
        v.starts_with("running ")
    });
    let from = lab.rule_requests().len();
    wait_for("three rule refreshes", Duration::from_secs(15), || {
        (lab.rule_requests().len() >= from + 3).then_some(())
    });
    assert_proxied(&lab, "/rules/proxy.txt", 0);
    assert!(lab
        .log()
        .contains("rule files unchanged, MosDNS keeps running"));
    assert_eq!(
        lab.pid_of("fake_mosdns.py"),
        Some(mosdns),
        "MosDNS restarted"
    );
    assert_eq!(lab.mosdns_answer("added.example"), "198.51.100.2");

    lab.serve("/rules/proxy.txt", RULES_B);
    wait_for("the new rule file", Duration::from_secs(10), || {
        (read(&lab, RULE_FILE).as_deref() == Some(RULES_B)).then_some(())
    });
    let restarted = wait_for("MosDNS to restart", Duration::from_secs(10), || {
        lab.pid_of("fake_mosdns.py").filter(|p| *p != mosdns)
    });
    lab.wait_status("services/mosdns/status", Duration::from_secs(5), |v| {
        v.starts_with("running ")
    });
    wait_for(
        "MosDNS to answer from the new rules",
        Duration::from_secs(5),
        || (lab.mosdns_answer("added.example") == "198.51.100.1").then_some(()),
    );
    assert!(lab.log().contains("rule files changed, MosDNS restarted"));
    // And unchanged again: the new MosDNS keeps running.
    let from = lab.rule_requests().len();
    wait_for("two more rule refreshes", Duration::from_secs(10), || {
        (lab.rule_requests().len() >= from + 2).then_some(())
    });
    assert_eq!(lab.pid_of("fake_mosdns.py"), Some(restarted));
    assert_proxied(&lab, "/rules/proxy.txt", 0);

    // 4. A commit switching the active subscription: commit → applied published, and
    // mihomo running the new subscription's proxy.
    lab.serve("/other.yaml", &sub(&["kr1"]));
    lab.put("/global/clash/subscriptions/other/url", &url("/other.yaml"));
    let before = lab.status("applied").unwrap_or_default();
    let t = Instant::now();
    lab.put(&node("clash/active_subscription"), "other");
    lab.put("/commit", "2");
    lab.wait_status("applied", Duration::from_secs(20), |v| v != before);
    let applied = t.elapsed();
    wait_for("mihomo to run kr1", Duration::from_secs(20), || {
        (mihomo_has(&lab, "kr1").as_deref() == Some("other")).then_some(())
    });
    let running = t.elapsed();
    for (name, d) in [
        ("subscription_commit_to_applied", applied),
        ("subscription_commit_to_running", running),
    ] {
        println!("FIGURE {name}_ms={:.1}", d.as_secs_f64() * 1000.0);
    }
    lab.wait_status("clash/health", Duration::from_secs(15), |v| {
        v.starts_with("healthy ")
    });
}

/// The double: the one fault the real mihomo cannot be made to show.
#[test]
fn unapplied_reload_is_caught_with_the_double() {
    let lab = healthy_lab(Mihomo::Double);

    // mihomo answers 204 to PUT /configs but applies nothing: caught, SIGHUP.
    lab.control(r#"{"fail_apply": true}"#);
    std::thread::sleep(Duration::from_millis(100));
    let hups = count(&lab.log(), "Receive SIGHUP");
    let caught = count(&lab.log(), "answered 204 but did not apply the config");
    lab.serve("/sub.yaml", &sub(&["hk1", "sg1", "us1"]));
    let log = wait_log(
        &lab,
        "mihomo reloaded via SIGHUP",
        0,
        Duration::from_secs(20),
    );
    assert!(
        count(&log, "answered 204 but did not apply the config") > caught,
        "the unapplied PUT /configs went unnoticed"
    );
    assert!(
        count(&log, "Receive SIGHUP") > hups,
        "no SIGHUP reached mihomo"
    );
    assert!(mihomo_has(&lab, "us1").is_some(), "us1 not running");
    assert_eq!(read(&lab, PROVIDER), Some(sub(&["hk1", "sg1", "us1"])));
    let status = lab.wait_status("clash/subscription", Duration::from_secs(5), |v| {
        v.contains("reloaded via sighup")
    });
    assert!(status.contains(" 3 proxies"), "{status}");
    // Unchanged from now on: no more reloads.
    let sighup_reloads = count(&lab.log(), "mihomo reloaded via SIGHUP");
    let from = lab.requests("/sub.yaml").len();
    wait_for("two more downloads", Duration::from_secs(10), || {
        (lab.requests("/sub.yaml").len() >= from + 2).then_some(())
    });
    lab.wait_status("clash/subscription", Duration::from_secs(5), |v| {
        v.ends_with("unchanged")
    });
    assert_eq!(
        count(&lab.log(), "mihomo reloaded via SIGHUP"),
        sighup_reloads
    );
}
