//! FRR routing policy proven by routes, not strings (issue 14): seven gateways, each
//! the real `meduza run` in its own network namespace against one real etcd, with the
//! real FRR 8.4, wireguard-go, OpenVPN and tinc from Debian. Every `frr.conf` is the
//! one meduza generated from etcd keys; each policy flag is toggled through etcd and
//! `/commit` and judged by which prefixes the routers' BGP tables (`show ip bgp json`)
//! or routing tables (`show ip route json`) hold afterwards.
//!
//! ```text
//!  E (65005) --OpenVPN-- A (65001) ==WireGuard== B (65002) --OpenVPN-- C (65003) ==WireGuard== D (65004)
//!                                                                    |  tinc mesh
//!                                                        C2 (65003, iBGP only)  C3 (OSPF only)
//! ```
//!
//! A, B, C and D are the chain of the issue; E's LAN reaches C over B three ASes long
//! (and is an eBGP-learned route for A to keep from B); C2 and C3 share C's AS over a tinc
//! mesh so that C holds a route learned only over iBGP (C2's LAN) and one learned only
//! over OSPF (C3's LAN). Phases (docs/routing.md has the table and the timings):
//!
//! 0. baseline: every public LAN everywhere, and A's LAN pings D's across the three
//!    tunnels (zebra turned forwarding on); `private_lan`s never past an eBGP
//!    session; `/global/bgp/filter/in` and `filter/out` act on every session (iBGP,
//!    WireGuard, OpenVPN); a default route is never accepted; `update_source` carries
//!    the A–B session; `weight` wins B's best path against a shorter AS path; OSPF is
//!    Full over the mesh and C3's LANs are OSPF routes at C.
//! 1. `no_transit` on C's session to B (OpenVPN) and on D's to C (WireGuard). From
//!    here on D's `frr-reload.py` fails (a wrapper around the real one), so D's
//!    changes go through the `vtysh -f` fallback: on in phase 1, off in phase 2.
//! 2. `no_forward` on C's sessions to B (OpenVPN) and D (WireGuard); `no_transit` off.
//! 3. both flags on C's session to B (OpenVPN); D has A's LAN back, so D's
//!    `no_transit` really went off through the fallback.
//! 4. both flags on A's session to B (WireGuard); B's `weight` removed.
//!
//! Each phase also checks that no BGP session was reset by the reload (their
//! established/dropped counters do not move), and which way the reload went (meduza's
//! log). Needs root, etcd, FRR with frr-pythontools, wireguard-go, wireguard-tools,
//! OpenVPN, tinc and openssl; a missing one fails the test.

use meduza_test_support::{gateway, mesh};

use gateway::{commit, lan, overlay_ip, Gateway};
use mesh::{ns_try, sh, Mesh, NsEtcd};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
const D: usize = 3;
const E: usize = 4;
const C2: usize = 5;
const C3: usize = 6;
const ALL: [usize; 7] = [A, B, C, D, E, C2, C3];
/// Routers outside C's AS (every session to them is eBGP from C's side).
const OUTSIDE: [usize; 4] = [A, B, D, E];
const NAMES: [&str; 7] = ["A", "B", "C", "D", "E", "C2", "C3"];
const ASN: [u32; 7] = [65001, 65002, 65003, 65004, 65005, 65003, 65003];

/// Announced by A and by D: B sees it over A (AS path 1) and over C (AS path 2).
const ANYCAST: &str = "10.77.0.0/24";
/// A LAN of C denied by `/global/bgp/filter/in` (at every receiver).
const DENIED_IN: &str = "10.81.0.0/24";
/// A LAN of C denied by `/global/bgp/filter/out` (at C, toward every neighbor).
const DENIED_OUT: &str = "10.82.0.0/24";
const DEFAULT: &str = "0.0.0.0/0";
/// `private_lan` of C, C2 and C3.
const PRIVATE: [(usize, &str); 3] = [
    (C, "10.92.0.0/24"),
    (C2, "10.95.0.0/24"),
    (C3, "10.96.0.0/24"),
];
const WEIGHT: u32 = 100;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Wireguard,
    Openvpn,
}

/// One eBGP link: `left` and `right`, their tunnel addresses, and where BGP peers.
struct Link {
    kind: Kind,
    left: usize,
    right: usize,
    /// Interface addresses (`a.b.c.d`) of each end, the first one primary.
    left_addrs: &'static [&'static str],
    right_addrs: &'static [&'static str],
    /// The address each end peers from (its `update_source` when not the primary).
    left_peer: &'static str,
    right_peer: &'static str,
}

const LINKS: [Link; 4] = [
    // A–B peers between secondary addresses with `update_source` on both ends: the
    // kernel would source the connection from the primary, which neither end accepts.
    Link {
        kind: Kind::Wireguard,
        left: A,
        right: B,
        left_addrs: &["172.20.1.1", "172.20.1.11"],
        right_addrs: &["172.20.1.2", "172.20.1.12"],
        left_peer: "172.20.1.11",
        right_peer: "172.20.1.12",
    },
    Link {
        kind: Kind::Openvpn,
        left: B,
        right: C,
        left_addrs: &["172.21.2.1"],
        right_addrs: &["172.21.2.2"],
        left_peer: "172.21.2.1",
        right_peer: "172.21.2.2",
    },
    Link {
        kind: Kind::Wireguard,
        left: C,
        right: D,
        left_addrs: &["172.20.3.1"],
        right_addrs: &["172.20.3.2"],
        left_peer: "172.20.3.1",
        right_peer: "172.20.3.2",
    },
    Link {
        kind: Kind::Openvpn,
        left: A,
        right: E,
        left_addrs: &["172.21.4.1"],
        right_addrs: &["172.21.4.2"],
        left_peer: "172.21.4.1",
        right_peer: "172.21.4.2",
    },
];

/// Extra networks of each router beyond the harness's `lan0` (10.5<i>.0.1/24):
/// (device, interface address, network, private).
fn extra_nets(i: usize) -> Vec<(&'static str, &'static str, &'static str, bool)> {
    match i {
        A => vec![("any0", "10.77.0.1/24", ANYCAST, false)],
        C => vec![
            ("fin0", "10.81.0.1/24", DENIED_IN, false),
            ("fout0", "10.82.0.1/24", DENIED_OUT, false),
            ("priv0", "10.92.0.1/24", PRIVATE[0].1, true),
        ],
        D => vec![("any0", "10.77.0.1/24", ANYCAST, false)],
        C2 => vec![("priv0", "10.95.0.1/24", PRIVATE[1].1, true)],
        C3 => vec![("priv0", "10.96.0.1/24", PRIVATE[2].1, true)],
        _ => Vec::new(),
    }
}

/// The topology: the mesh (hub + namespaces), etcd, the gateways and per-link names.
struct Net {
    mesh: Mesh,
    etcd: NsEtcd,
    gws: Vec<Gateway>,
    /// Present while D's `frr-reload.py` must fail (D's wrapper checks it).
    fail_marker: PathBuf,
}

/// Instance name of `link` on router `me` (unique on the machine: OpenVPN's management
/// socket and wireguard-go's UAPI socket live in the shared /run).
fn inst(tag: &str, me: usize, link: &Link) -> String {
    let other = if link.left == me {
        link.right
    } else {
        link.left
    };
    format!("{}{tag}", NAMES[other].to_lowercase())
}

fn kind_key(k: Kind) -> &'static str {
    match k {
        Kind::Wireguard => "wireguard",
        Kind::Openvpn => "openvpn",
    }
}

/// The etcd key prefix of `me`'s end of `link`.
fn link_base(tag: &str, me: usize, link: &Link) -> String {
    format!(
        "/nodes/gw{me}/{}/{}",
        kind_key(link.kind),
        inst(tag, me, link)
    )
}

/// The BGP neighbor address `me` uses on `link`.
fn peer_of(me: usize, link: &Link) -> &'static str {
    if link.left == me {
        link.right_peer
    } else {
        link.left_peer
    }
}

fn wg_keypair() -> (String, String) {
    let private = sh(&["wg", "genkey"]).trim().to_string();
    let public = sh(&["sh", "-c", &format!("echo {private} | wg pubkey")])
        .trim()
        .to_string();
    (private, public)
}

fn put_all(etcd: &NsEtcd, kv: &BTreeMap<String, String>) {
    // Several etcdctl at once: each is an `ip netns exec` process start.
    let items: Vec<(&String, &String)> = kv.iter().collect();
    std::thread::scope(|s| {
        for chunk in items.chunks(items.len().div_ceil(8).max(1)) {
            s.spawn(move || {
                for (k, v) in chunk {
                    etcd.put(k, v);
                }
            });
        }
    });
}

/// Every key of the topology.
fn seed(tag: &str, dir: &std::path::Path) -> BTreeMap<String, String> {
    let mut kv = BTreeMap::new();
    let mut put = |k: String, v: &str| {
        kv.insert(k, v.to_string());
    };
    put("/global/mesh_type".into(), "tinc");
    put("/global/internal_routing_system".into(), "bgp");
    put(
        "/global/bgp/filter/in".into(),
        &format!("deny {DENIED_IN}\npermit 0.0.0.0/0 le 32"),
    );
    put(
        "/global/bgp/filter/out".into(),
        &format!("deny {DENIED_OUT}\npermit 0.0.0.0/0 le 32"),
    );
    for i in ALL {
        let node = format!("/nodes/gw{i}");
        let mut lans = vec![lan(i)];
        let mut private = Vec::new();
        for (_, _, net, is_private) in extra_nets(i) {
            if is_private {
                private.push(net.to_string());
            } else {
                lans.push(net.to_string());
            }
        }
        if i == D {
            // D tries to be everyone's default gateway.
            lans.push(DEFAULT.into());
        }
        put(format!("{node}/lan"), &lans.join("\n"));
        if !private.is_empty() {
            put(format!("{node}/private_lan"), &private.join("\n"));
        }
        let rid = format!("10.255.0.{}", i + 1);
        if i != C3 {
            put(format!("{node}/bgp/enable"), "true");
            put(format!("{node}/bgp/asn"), &ASN[i].to_string());
            put(format!("{node}/bgp/router_id"), &rid);
        }
        if i == C || i == C3 {
            put(format!("{node}/ospf/enable"), "true");
            put(format!("{node}/ospf/router_id"), &rid);
        }
        if [C, C2, C3].contains(&i) {
            let key = dir.join(format!("tinc{i}.key"));
            let k = key.display().to_string();
            sh(&["openssl", "genrsa", "-out", &k, "2048"]);
            let public = sh(&["openssl", "rsa", "-in", &k, "-pubout"]);
            let private = std::fs::read_to_string(&key).expect("tinc private key");
            put(format!("{node}/tinc/enable"), "true");
            put(format!("{node}/tinc/address"), &Mesh::gw_ip(i).to_string());
            put(
                format!("{node}/tinc/ipv4"),
                &format!("{}/24", overlay_ip(i)),
            );
            put(format!("{node}/tinc/subnet"), &lans.join("\n"));
            put(format!("{node}/tinc/private_key"), &private);
            put(format!("{node}/tinc/public_key"), &public);
        }
    }
    for link in &LINKS {
        let ends = [
            (link.left, link.right, link.left_addrs, link.right_addrs),
            (link.right, link.left, link.right_addrs, link.left_addrs),
        ];
        match link.kind {
            Kind::Wireguard => {
                let keys = [wg_keypair(), wg_keypair()];
                for (n, (me, other, mine, _)) in ends.iter().enumerate() {
                    let b = link_base(tag, *me, link);
                    let theirs = &keys[1 - n].1;
                    put(format!("{b}/enable"), "true");
                    put(format!("{b}/private_key"), &keys[n].0);
                    put(format!("{b}/listen_port"), "51820");
                    let addrs: Vec<String> = mine.iter().map(|a| format!("{a}/24")).collect();
                    put(format!("{b}/address"), &addrs.join("\n"));
                    let p = format!("{b}/peer/{}", NAMES[*other].to_lowercase());
                    put(format!("{p}/public_key"), theirs);
                    // Every prefix BGP routes over the tunnel must pass cryptokey routing.
                    put(format!("{p}/allowed_ips"), "0.0.0.0/0");
                    put(
                        format!("{p}/endpoint"),
                        &format!("{}:51820", Mesh::gw_ip(*other)),
                    );
                }
            }
            Kind::Openvpn => {
                let file = dir.join(format!("ovpn{}{}.key", link.left, link.right));
                let f = file.display().to_string();
                sh(&["openvpn", "--genkey", "secret", &f]);
                let secret = std::fs::read_to_string(&file).expect("openvpn static key");
                for (me, other, mine, theirs) in ends {
                    let b = link_base(tag, me, link);
                    put(format!("{b}/enable"), "true");
                    put(format!("{b}/proto"), "udp");
                    put(format!("{b}/port"), "1194");
                    put(
                        format!("{b}/remote"),
                        &format!("{} 1194", Mesh::gw_ip(other)),
                    );
                    put(
                        format!("{b}/ifconfig"),
                        &format!("{} {}", mine[0], theirs[0]),
                    );
                    put(format!("{b}/keepalive"), "2 10");
                    put(format!("{b}/secret"), &secret);
                }
            }
        }
        for (me, other, _, _) in ends {
            let b = link_base(tag, me, link);
            put(format!("{b}/bgp/enable"), "true");
            put(format!("{b}/bgp/peer_asn"), &ASN[other].to_string());
            put(format!("{b}/bgp/peer_ip"), peer_of(me, link));
            let mine = if link.left == me {
                (link.left_addrs, link.left_peer)
            } else {
                (link.right_addrs, link.right_peer)
            };
            if mine.0[0] != mine.1 {
                put(format!("{b}/bgp/update_source"), mine.1);
            }
        }
    }
    // B prefers what C sends, whatever the AS path length.
    let bc = &LINKS[1];
    put(
        format!("{}/bgp/weight", link_base(tag, B, bc)),
        &WEIGHT.to_string(),
    );
    kv
}

impl Net {
    fn up() -> Self {
        let t = Instant::now();
        let mesh = Mesh::new(ALL.len());
        let etcd = NsEtcd::start(&mesh.hub, Mesh::HUB_IP, 2379, &mesh.path("etcd"));
        let kv = seed(&mesh.tag, mesh.dir.path());
        put_all(&etcd, &kv);
        eprintln!("[{:5.1}s] {} keys in etcd", secs(t), kv.len());
        let fail_marker = mesh.path("fail-frr-reload");
        // D's frr-reload.py: the real one, unless the test wants it to fail.
        let wrapper = mesh.path("frr-reload-d");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nif [ -e '{}' ]; then echo 'frr-reload.py disabled by the test' >&2; exit 1; fi\nexec /usr/lib/frr/frr-reload.py \"$@\"\n",
                fail_marker.display()
            ),
        )
        .expect("write wrapper");
        sh(&["chmod", "755", &wrapper.display().to_string()]);
        let mut gws: Vec<Gateway> = ALL
            .iter()
            .map(|&i| Gateway::new(&mesh, i, &etcd.endpoint))
            .collect();
        // D's uplink: a kernel default route, which D announces (FRR's import check
        // announces a `network` only while the RIB has a route for it).
        gws[D].add_link("up0", "10.88.0.1/24");
        mesh::ns_sh(
            &gws[D].ns,
            &[
                "ip",
                "route",
                "add",
                "default",
                "via",
                "10.88.0.2",
                "dev",
                "up0",
            ],
        );
        for g in &mut gws {
            for (dev, addr, _, _) in extra_nets(g.index) {
                g.add_link(dev, addr);
            }
            let reload = if g.index == D {
                wrapper.display().to_string()
            } else {
                "/usr/lib/frr/frr-reload.py".to_string()
            };
            g.env.push(("MEDUZA_BIN_FRR_RELOAD".into(), reload));
            g.env.push(("MEDUZA_LOG".into(), "info".into()));
        }
        let rev = commit(&etcd);
        for g in &mut gws {
            g.start();
        }
        for g in &gws {
            g.wait_applied(&etcd, rev, Duration::from_secs(60));
            assert_eq!(
                g.status(&etcd, "errors").as_deref(),
                Some("[]"),
                "{} applied without errors",
                NAMES[g.index]
            );
        }
        eprintln!("[{:5.1}s] all gateways applied revision {rev}", secs(t));
        Net {
            mesh,
            etcd,
            gws,
            fail_marker,
        }
    }

    fn gw(&self, i: usize) -> &Gateway {
        &self.gws[i]
    }

    fn tag(&self) -> &str {
        &self.mesh.tag
    }

    /// Set `no_transit` / `no_forward` of `me`'s session on `link`.
    fn flags(&self, me: usize, link: &Link, no_transit: bool, no_forward: bool) {
        let b = link_base(self.tag(), me, link);
        self.etcd
            .put(&format!("{b}/bgp/no_transit"), &no_transit.to_string());
        self.etcd
            .put(&format!("{b}/bgp/no_forward"), &no_forward.to_string());
    }

    /// Commit and wait until every gateway applied it; returns the revision.
    fn commit_applied(&self) -> i64 {
        let rev = commit(&self.etcd);
        for g in &self.gws {
            g.wait_applied(&self.etcd, rev, Duration::from_secs(30));
            assert_eq!(
                g.status(&self.etcd, "errors").as_deref(),
                Some("[]"),
                "{}",
                NAMES[g.index]
            );
        }
        rev
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // wireguard-go, killed with its namespace, leaves its UAPI socket in the
        // machine-wide /var/run/wireguard.
        for link in LINKS.iter().filter(|l| l.kind == Kind::Wireguard) {
            for me in [link.left, link.right] {
                let sock = format!("/var/run/wireguard/wg-{}.sock", inst(self.tag(), me, link));
                let _ = std::fs::remove_file(sock);
            }
        }
    }
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// The prefixes router `i` holds: its BGP table (`show ip bgp json`), or for C3, which
/// runs no BGP, its routing table (`show ip route json`). `None` when vtysh gave no
/// table (a daemon busy or restarting): then nothing about the router is known.
fn prefixes(gw: &Gateway) -> Option<BTreeSet<String>> {
    let v = if gw.index == C3 {
        gw.vtysh_json("show ip route json")
    } else {
        gw.vtysh_json("show ip bgp json")["routes"].clone()
    };
    v.as_object().map(|m| m.keys().cloned().collect())
}

/// The paths of `prefix` in `gw`'s BGP table.
fn paths(gw: &Gateway, prefix: &str) -> Vec<Value> {
    gw.vtysh_json(&format!("show ip bgp {prefix} json"))["paths"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn aspath(p: &Value) -> String {
    p["aspath"]["string"].as_str().unwrap_or("").to_string()
}

fn is_best(p: &Value) -> bool {
    p["bestpath"]["overall"].as_bool().unwrap_or(false)
}

fn next_hop(p: &Value) -> String {
    p["nexthops"][0]["ip"].as_str().unwrap_or("").to_string()
}

/// The selected entry of `prefix` in `gw`'s routing table (`Null` if none).
fn selected(gw: &Gateway, prefix: &str) -> Value {
    let v = gw.vtysh_json(&format!("show ip route {prefix} json"));
    v[prefix]
        .as_array()
        .and_then(|es| es.iter().find(|e| e["selected"] == true).cloned())
        .unwrap_or(Value::Null)
}

/// Prefixes `gw` advertises to `neighbor` (`show ip bgp neighbors X advertised-routes`).
fn advertised(gw: &Gateway, neighbor: &str) -> BTreeSet<String> {
    gw.vtysh_json(&format!(
        "show ip bgp neighbors {neighbor} advertised-routes json"
    ))["advertisedRoutes"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// Expected presence of prefixes at routers.
#[derive(Default)]
struct Expect(Vec<(usize, String, bool)>);

impl Expect {
    fn at(&mut self, routers: &[usize], prefixes: &[&str], present: bool) -> &mut Self {
        for &r in routers {
            for p in prefixes {
                self.0.push((r, (*p).to_string(), present));
            }
        }
        self
    }

    /// The expectations not met now.
    fn unmet(&self, net: &Net) -> Vec<String> {
        let tables: BTreeMap<usize, Option<BTreeSet<String>>> =
            ALL.iter().map(|&i| (i, prefixes(net.gw(i)))).collect();
        self.0
            .iter()
            .filter(|(r, p, want)| tables[r].as_ref().is_none_or(|t| t.contains(p) != *want))
            .map(|(r, p, want)| {
                format!(
                    "{} should {}have {p}",
                    NAMES[*r],
                    if *want { "" } else { "not " }
                )
            })
            .collect()
    }

    /// Wait until every expectation holds, and still holds 1.5 s later (a route that
    /// should be absent must not show up late). Returns the time it took.
    fn converge(&self, net: &Net, phase: &str, since: Instant, timeout: Duration) -> Duration {
        let mut shown = Vec::new();
        loop {
            let unmet = self.unmet(net);
            if unmet != shown && !unmet.is_empty() {
                eprintln!(
                    "    {phase} +{:.1}s: waiting for {unmet:?}",
                    since.elapsed().as_secs_f64()
                );
                shown = unmet.clone();
            }
            if unmet.is_empty() {
                let took = since.elapsed();
                std::thread::sleep(Duration::from_millis(1500));
                let late = self.unmet(net);
                assert!(
                    late.is_empty(),
                    "{phase}: changed after converging: {late:?}"
                );
                return took;
            }
            if since.elapsed() > timeout {
                for g in &net.gws {
                    eprintln!(
                        "--- {} ({}) prefixes: {:?}",
                        NAMES[g.index],
                        g.node,
                        prefixes(g)
                    );
                    if g.index != C3 {
                        eprintln!("{}", g.vtysh("show bgp summary"));
                        for l in g.vtysh("show bgp neighbors").lines().filter(|l| {
                            [
                                "BGP neighbor is",
                                "BGP state",
                                "Last reset",
                                "Local host",
                                "ast notification",
                                "Connections established",
                            ]
                            .iter()
                            .any(|k| l.contains(k))
                        }) {
                            eprintln!("  {l}");
                        }
                        let log = g.run_log();
                        let bgp: Vec<&str> =
                            log.lines().filter(|l| l.contains("[frr-bgpd]")).collect();
                        for l in &bgp[bgp.len().saturating_sub(15)..] {
                            eprintln!("  {l}");
                        }
                    }
                }
                panic!("{phase}: not converged after {timeout:?}: {unmet:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Routers' BGP sessions: (router, neighbor) → (state, connections established,
/// connections dropped, uptime ms).
type Sessions = BTreeMap<(usize, String), (String, u64, u64, u64)>;

fn sessions(net: &Net) -> Sessions {
    let mut out = BTreeMap::new();
    for g in &net.gws {
        if g.index == C3 {
            continue;
        }
        let v = g.vtysh_json("show bgp neighbors json");
        for (ip, n) in v.as_object().into_iter().flatten() {
            out.insert(
                (g.index, ip.clone()),
                (
                    n["bgpState"].as_str().unwrap_or("").to_string(),
                    n["connectionsEstablished"].as_u64().unwrap_or(0),
                    n["connectionsDropped"].as_u64().unwrap_or(0),
                    n["bgpTimerUpMsec"].as_u64().unwrap_or(0),
                ),
            );
        }
    }
    out
}

/// The sessions every router must have: each link's two ends and C–C2 over the mesh.
fn expected_sessions() -> Vec<(usize, String)> {
    let mut v = Vec::new();
    for l in &LINKS {
        v.push((l.left, l.right_peer.to_string()));
        v.push((l.right, l.left_peer.to_string()));
    }
    v.push((C, overlay_ip(C2)));
    v.push((C2, overlay_ip(C)));
    v
}

/// No session was reset since `before`: same counters, uptime grown by at least the
/// time elapsed (less a second of rounding).
fn assert_no_reset(net: &Net, before: &Sessions, elapsed: Duration, phase: &str) {
    let now = sessions(net);
    for key in expected_sessions() {
        let (st0, est0, drop0, up0) = &before[&key];
        let (st1, est1, drop1, up1) = now
            .get(&key)
            .unwrap_or_else(|| panic!("{phase}: session {}→{} vanished", NAMES[key.0], key.1));
        assert_eq!(st0, "Established");
        assert_eq!(
            (st1.as_str(), est1, drop1),
            ("Established", est0, drop0),
            "{phase}: session {}→{} was reset by the reload",
            NAMES[key.0],
            key.1
        );
        let grown = elapsed.as_millis() as u64;
        assert!(
            *up1 + 1000 >= up0 + grown,
            "{phase}: {}→{} uptime went from {up0} ms to {up1} ms in {grown} ms",
            NAMES[key.0],
            key.1
        );
    }
}

/// How often `needle` appears in the log of router `i`.
fn log_count(net: &Net, i: usize, needle: &str) -> usize {
    net.gw(i).run_log().matches(needle).count()
}

const RELOADED: &str = "frr-reload.py applied the diff";
const FELL_BACK: &str = "frr-reload.py failed; falling back to vtysh -f";
const UNDONE: &str = "vtysh fallback: removed lines undone";

fn lans(routers: &[usize]) -> Vec<String> {
    routers.iter().map(|&i| lan(i)).collect()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn frr_policy_flags_filters_and_reload_shown_by_routes() {
    let t0 = Instant::now();
    let net = Net::up();
    let private: Vec<&str> = PRIVATE.iter().map(|(_, p)| *p).collect();
    let bc = &LINKS[1];
    let cd = &LINKS[2];
    let ab = &LINKS[0];

    // ---- Phase 0: baseline ------------------------------------------------------
    let since = Instant::now();
    let mut exp = Expect::default();
    let public = lans(&ALL);
    exp.at(&ALL, &refs(&public), true)
        .at(&ALL, &[ANYCAST], true)
        // private_lan: C's own, C2's over iBGP, C3's over OSPF — never past eBGP.
        .at(&[C, C2, C3], &private, true)
        .at(&OUTSIDE, &private, false)
        // The global filters: C's two LANs reach no BGP neighbor (C3 has them from
        // OSPF, which the BGP filters do not touch).
        .at(&[A, B, D, E, C2], &[DENIED_IN, DENIED_OUT], false)
        .at(&[C3], &[DENIED_IN, DENIED_OUT], true)
        // D announces a default route; nobody takes it.
        .at(&[A, B, C, E, C2, C3], &[DEFAULT], false);
    let took = exp.converge(&net, "baseline", since, Duration::from_secs(120));
    eprintln!(
        "[{:5.1}s] phase 0 (baseline) converged {:.1}s after the gateways applied",
        secs(t0),
        took.as_secs_f64()
    );

    let before = sessions(&net);
    for key in expected_sessions() {
        assert_eq!(
            before.get(&key).map(|s| s.0.as_str()),
            Some("Established"),
            "session {}→{}",
            NAMES[key.0],
            key.1
        );
    }

    // The routes carry traffic: zebra turned forwarding on (`ip forwarding`), and A's
    // LAN reaches D's across WireGuard, OpenVPN and WireGuard.
    for g in &net.gws {
        let fwd = mesh::ns_sh(&g.ns, &["sysctl", "-n", "net.ipv4.ip_forward"]);
        assert_eq!(fwd.trim(), "1", "{} forwards", NAMES[g.index]);
    }
    let ping = ns_try(
        &net.gw(A).ns,
        &[
            "busybox",
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            "-I",
            "10.50.0.1",
            "10.53.0.1",
        ],
    );
    assert!(
        ping.status.success(),
        "A's LAN reaches D's LAN: {}",
        String::from_utf8_lossy(&ping.stdout)
    );

    // Global filters: C offers DENIED_IN to every neighbor (the receivers' filter/in
    // drops it) and offers DENIED_OUT to none (its own filter/out).
    for (neighbor, what) in [
        (bc.left_peer.to_string(), "B over OpenVPN"),
        (cd.right_peer.to_string(), "D over WireGuard"),
        (overlay_ip(C2), "C2 over iBGP"),
    ] {
        let adv = advertised(net.gw(C), &neighbor);
        assert!(adv.contains(DENIED_IN), "C offers {DENIED_IN} to {what}");
        assert!(
            !adv.contains(DENIED_OUT),
            "C keeps {DENIED_OUT} from {what}"
        );
        assert!(adv.contains(&lan(C)), "C offers its LAN to {what}: {adv:?}");
    }
    // The default route is offered by D and refused at C, in BGP and in the RIB.
    assert!(advertised(net.gw(D), cd.left_peer).contains(DEFAULT));
    assert!(paths(net.gw(C), DEFAULT).is_empty());
    let rib = net.gw(C).vtysh_json("show ip route json");
    assert!(rib.get(DEFAULT).is_none(), "no default route at C: {rib}");

    // OSPF: C and C3 are Full over the tinc device; C3's LAN is an OSPF route at C and
    // enters C's BGP by redistribution (no AS path, C's own weight).
    let ospf = net.gw(C).vtysh_json("show ip ospf neighbor json");
    let nbrs = ospf["neighbors"]["10.255.0.7"].as_array().cloned();
    let nbr = nbrs.and_then(|v| v.first().cloned()).unwrap_or(Value::Null);
    assert!(
        nbr["state"].as_str().unwrap_or("").starts_with("Full"),
        "C–C3 OSPF adjacency: {ospf}"
    );
    assert!(
        nbr["ifaceName"].as_str().unwrap_or("").starts_with("tnc"),
        "over the mesh: {nbr}"
    );
    assert_eq!(selected(net.gw(C), &lan(C3))["protocol"], "ospf");
    let p = paths(net.gw(C), &lan(C3));
    assert!(
        p.len() == 1
            && p[0]["aspath"]["length"] == 0
            && p[0]["sourced"] == true
            && p[0]["origin"] == "incomplete",
        "C3's LAN redistributed from OSPF into C's BGP: {p:?}"
    );
    // C2's LAN is iBGP at C.
    let p = paths(net.gw(C), &lan(C2));
    assert!(
        p.len() == 1 && p[0]["peer"]["type"] == "internal",
        "C2's LAN is iBGP at C: {p:?}"
    );

    // update_source: the A–B session runs between the secondary addresses, although
    // the kernel would source from the primaries (which neither end accepts).
    for (me, peer, src) in [
        (A, ab.right_peer, ab.left_peer),
        (B, ab.left_peer, ab.right_peer),
    ] {
        let n = net
            .gw(me)
            .vtysh_json(&format!("show bgp neighbors {peer} json"));
        assert_eq!(n[peer]["hostLocal"], src, "{}: {n}", NAMES[me]);
        let route = String::from_utf8_lossy(
            &ns_try(&net.gw(me).ns, &["ip", "-4", "route", "get", peer]).stdout,
        )
        .to_string();
        assert!(
            !route.contains(&format!("src {src} ")),
            "the kernel alone would not pick {src}: {route}"
        );
    }

    // weight: B's best path to the anycast prefix is C's (AS path 2, weight 100), not
    // A's (AS path 1).
    let p = paths(net.gw(B), ANYCAST);
    assert_eq!(
        p.len(),
        2,
        "B has the anycast prefix from A and from C: {p:?}"
    );
    let best: Vec<&Value> = p.iter().filter(|x| is_best(x)).collect();
    assert_eq!(best.len(), 1);
    assert_eq!(aspath(best[0]), "65003 65004", "{p:?}");
    assert_eq!(best[0]["weight"], WEIGHT, "{p:?}");
    assert_eq!(next_hop(best[0]), bc.right_peer);
    let other = p.iter().find(|x| !is_best(x)).expect("the other path");
    assert_eq!(aspath(other), "65001");
    let r = selected(net.gw(B), ANYCAST);
    assert_eq!(r["protocol"], "bgp", "{r}");
    assert_eq!(r["nexthops"][0]["ip"], bc.right_peer, "{r}");

    // ---- Phase 1: no_transit (OpenVPN C→B, WireGuard D→C); D reloads by fallback --
    std::fs::write(&net.fail_marker, "").expect("marker");
    let (reloaded_c, fell_back_d) = (log_count(&net, C, RELOADED), log_count(&net, D, FELL_BACK));
    let base_sessions = sessions(&net);
    let since = Instant::now();
    net.flags(C, bc, true, false);
    net.flags(D, cd, true, false);
    net.commit_applied();
    let applied = since.elapsed();
    let mut exp = Expect::default();
    // C takes A's LAN from B (AS path 65002 65001) but not E's (65002 65001 65005);
    // neither reaches C's AS or D.
    exp.at(&[C, C2, C3, D], &[&lan(E)], false)
        .at(&[C, C2, C3], &[&lan(A), &lan(B)], true)
        // D takes B's LAN (65003 65002) but not A's (65003 65002 65001).
        .at(&[D], &[&lan(A)], false)
        .at(&[D], &[&lan(B), &lan(C), &lan(C2), &lan(C3)], true)
        // Independent: outbound untouched (D's and C's LANs still reach B, A and E).
        .at(&[A, B, E], &[&lan(C), &lan(D), &lan(C2), &lan(C3)], true)
        .at(&[A, B], &[&lan(E)], true);
    let took = exp.converge(&net, "no_transit", since, Duration::from_secs(60));
    eprintln!(
        "[{:5.1}s] phase 1 (no_transit) applied in {:.1}s, routes converged {:.1}s after the commit",
        secs(t0),
        applied.as_secs_f64(),
        took.as_secs_f64()
    );
    assert!(
        log_count(&net, C, RELOADED) > reloaded_c,
        "C reloaded with frr-reload.py"
    );
    assert!(
        log_count(&net, D, FELL_BACK) > fell_back_d,
        "D reloaded with the vtysh -f fallback"
    );
    assert_no_reset(&net, &base_sessions, since.elapsed(), "no_transit");

    // ---- Phase 2: no_forward (OpenVPN C→B, WireGuard C→D) ----------------------
    let base_sessions = sessions(&net);
    let since = Instant::now();
    net.flags(C, bc, false, true);
    net.flags(D, cd, false, false);
    net.flags(C, cd, false, true);
    net.commit_applied();
    let applied = since.elapsed();
    let mut exp = Expect::default();
    let own_as = lans(&[C, C2, C3]);
    // C keeps D's LAN (learned from eBGP) from B, and B's, A's, E's from D...
    exp.at(&[B, A, E], &[&lan(D)], false)
        .at(&[D], &[&lan(A), &lan(B), &lan(E)], false)
        // ...but C's own LAN, C2's (iBGP) and C3's (OSPF) still reach both.
        .at(&[B, D, A, E], &refs(&own_as), true)
        // Independent: inbound untouched (E's LAN is three ASes long at C).
        .at(&[C, C2, C3], &[&lan(A), &lan(B), &lan(D), &lan(E)], true);
    let took = exp.converge(&net, "no_forward", since, Duration::from_secs(60));
    // D's no_transit went off through the fallback: `vtysh -f` alone would leave the
    // `match as-path` in D's route-map (phase 3 shows A's LAN back at D).
    assert!(
        log_count(&net, D, FELL_BACK) > fell_back_d + 1,
        "D reloaded with the vtysh -f fallback again"
    );
    assert!(
        log_count(&net, D, UNDONE) > 0,
        "the fallback undid the lines the new config dropped"
    );
    eprintln!(
        "[{:5.1}s] phase 2 (no_forward) applied in {:.1}s, routes converged {:.1}s after the commit",
        secs(t0),
        applied.as_secs_f64(),
        took.as_secs_f64()
    );
    for (i, how) in [(C2, "internal"), (C3, "")] {
        let p = paths(net.gw(B), &lan(i));
        assert!(
            p.len() == 1 && aspath(&p[0]) == "65003",
            "B has {}'s LAN ({how}) from C: {p:?}",
            NAMES[i]
        );
    }
    assert_no_reset(&net, &base_sessions, since.elapsed(), "no_forward");

    // ---- Phase 3: both flags on C→B (OpenVPN) ----------------------------------
    let base_sessions = sessions(&net);
    let since = Instant::now();
    net.flags(C, bc, true, true);
    net.flags(C, cd, false, false);
    net.commit_applied();
    let applied = since.elapsed();
    let mut exp = Expect::default();
    exp.at(&[C, C2, C3, D], &[&lan(E)], false)
        .at(&[B, A, E], &[&lan(D)], false)
        .at(&[C, C2, C3, D], &[&lan(A), &lan(B)], true)
        .at(&[B, A, E], &refs(&own_as), true);
    let took = exp.converge(&net, "both on C→B", since, Duration::from_secs(60));
    eprintln!(
        "[{:5.1}s] phase 3 (both flags, OpenVPN) applied in {:.1}s, routes converged {:.1}s after the commit",
        secs(t0),
        applied.as_secs_f64(),
        took.as_secs_f64()
    );
    assert_no_reset(&net, &base_sessions, since.elapsed(), "both on C→B");

    // ---- Phase 4: both flags on A→B (WireGuard); B's weight removed --------------
    let base_sessions = sessions(&net);
    let since = Instant::now();
    net.flags(C, bc, false, false);
    net.flags(A, ab, true, true);
    net.etcd.ctl(&[
        "del",
        &format!("{}/bgp/weight", link_base(net.tag(), B, bc)),
    ]);
    net.commit_applied();
    let applied = since.elapsed();
    let mut exp = Expect::default();
    // A refuses D's LAN (65002 65003 65004) but takes C's (65002 65003)...
    exp.at(&[A, E], &[&lan(D)], false)
        .at(&[B], &[&lan(D)], true)
        .at(&[A, E], &[&lan(B), &lan(C), &lan(C2)], true)
        // ...and keeps E's LAN (eBGP-learned) from B while its own still goes.
        .at(&[B, C, D, C2, C3], &[&lan(E)], false)
        .at(&[B, C, D, C2, C3], &[&lan(A)], true);
    let took = exp.converge(&net, "both on A→B", since, Duration::from_secs(60));
    eprintln!(
        "[{:5.1}s] phase 4 (both flags, WireGuard) applied in {:.1}s, routes converged {:.1}s after the commit",
        secs(t0),
        applied.as_secs_f64(),
        took.as_secs_f64()
    );
    // Without the weight B's best path to the anycast prefix is A's shorter one.
    let p = paths(net.gw(B), ANYCAST);
    assert_eq!(p.len(), 2, "{p:?}");
    let best = p.iter().find(|x| is_best(x)).expect("a best path");
    assert_eq!(aspath(best), "65001", "{p:?}");
    assert!(p.iter().all(|x| x["weight"].as_u64().unwrap_or(0) == 0));
    assert_no_reset(&net, &base_sessions, since.elapsed(), "both on A→B");

    // Every other gateway reloaded with frr-reload.py whenever its frr.conf changed.
    for i in ALL.into_iter().filter(|&i| i != D) {
        assert_eq!(log_count(&net, i, FELL_BACK), 0, "{}", NAMES[i]);
        assert_eq!(log_count(&net, i, "not runnable"), 0, "{}", NAMES[i]);
    }
    eprintln!("[{:5.1}s] done", secs(t0));
}
