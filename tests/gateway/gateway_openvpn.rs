//! OpenVPN with TLS between two gateways, each the real `meduza run` in its own network
//! namespace against a real etcd, from etcd keys alone: a CA and one certificate per
//! gateway made with openssl here, `tls_auth` / `tls_crypt` keys from
//! `openvpn --genkey`, all inline in etcd.
//!
//! - `ta` (UDP, `tls_auth`) and `tc` (TCP, `tls_crypt`) really handshake: the tunnel
//!   addresses answer, each side's OpenVPN logs the peer's certificate as verified,
//!   `/updated/<id>/openvpn/<name>/status` goes `connecting` (peer not started yet) →
//!   `up`, and eBGP over both tunnels (distinct ASNs) carries each gateway's LAN.
//! - Three instances must never come up, which proves the generated file makes
//!   OpenVPN check what it should: `xca` (one side trusts another CA of the same name:
//!   `VERIFY ERROR`), `xta` / `xtc` (the two sides hold different `tls_auth` /
//!   `tls_crypt` keys: OpenVPN's tls-auth HMAC or tls-crypt unwrap refuses the
//!   packets, and the message names the mechanism in use). Their status stays
//!   `connecting`.
//! - Passed-through directives are in effect: `verify-x509-name` pins the peer's name,
//!   `explicit-exit-notify` makes the peer see the stop at once.
//! - Disabling gw1's `ta` in etcd turns gw0's `ta` `down`; stopping gw1 altogether
//!   turns gw0's `tc` `down`.
//!
//! Needs root, etcd, openvpn, FRR, openssl and busybox (for `ping`); a missing one
//! fails the test.

use meduza_test_support::{gateway, mesh};

use gateway::{commit, lan, secs, Gateway};
use mesh::{ns_try, sh, wait_for, Mesh, NsEtcd};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// How an instance protects its control channel.
#[derive(Clone, Copy, PartialEq)]
enum Ctrl {
    TlsAuth,
    TlsCrypt,
}

/// What is wrong with an instance on purpose (on gw1's side).
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    /// gw1 trusts a different CA with the same subject.
    RogueCa,
    /// gw1 holds a different tls-auth / tls-crypt key.
    OtherKey,
}

struct Inst {
    name: &'static str,
    /// Tunnel addresses are `10.8.<net>.1` (gw0) and `10.8.<net>.2` (gw1).
    net: u8,
    port: u16,
    tcp: bool,
    ctrl: Ctrl,
    fault: Fault,
}

const INSTANCES: &[Inst] = &[
    Inst {
        name: "ta",
        net: 1,
        port: 1194,
        tcp: false,
        ctrl: Ctrl::TlsAuth,
        fault: Fault::None,
    },
    Inst {
        name: "tc",
        net: 2,
        port: 1195,
        tcp: true,
        ctrl: Ctrl::TlsCrypt,
        fault: Fault::None,
    },
    Inst {
        name: "xca",
        net: 3,
        port: 1196,
        tcp: false,
        ctrl: Ctrl::TlsCrypt,
        fault: Fault::RogueCa,
    },
    Inst {
        name: "xta",
        net: 4,
        port: 1197,
        tcp: false,
        ctrl: Ctrl::TlsAuth,
        fault: Fault::OtherKey,
    },
    Inst {
        name: "xtc",
        net: 5,
        port: 1198,
        tcp: false,
        ctrl: Ctrl::TlsCrypt,
        fault: Fault::OtherKey,
    },
];

/// Gateway `i`'s tunnel address on instance network `net`.
fn tun_ip(net: u8, i: usize) -> String {
    format!("10.8.{net}.{}", i + 1)
}

fn asn(i: usize) -> String {
    format!("{}", 65001 + i)
}

/// Key material made here: a CA, a rogue CA with the same subject, one certificate
/// per gateway, two tls-auth and two tls-crypt keys.
struct Pki {
    ca: String,
    rogue_ca: String,
    /// `(cert, key)` of gw0 and gw1.
    certs: Vec<(String, String)>,
    tls_auth: [String; 2],
    tls_crypt: [String; 2],
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn pki(dir: &Path) -> Pki {
    let p = |name: &str| dir.join(name).display().to_string();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for ca in ["ca", "rogue"] {
        let mut argv = vec!["openssl", "req", "-x509"];
        argv.extend(ec);
        let (key, crt) = (p(&format!("{ca}.key")), p(&format!("{ca}.crt")));
        argv.extend(["-keyout", &key, "-out", &crt]);
        argv.extend(["-days", "2", "-subj", "/CN=meduza-test-ca"]);
        sh(&argv);
    }
    let mut certs = Vec::new();
    for i in 0..2 {
        let (key, csr, crt) = (
            p(&format!("gw{i}.key")),
            p(&format!("gw{i}.csr")),
            p(&format!("gw{i}.crt")),
        );
        let subj = format!("/CN=gw{i}");
        let mut argv = vec!["openssl", "req", "-new"];
        argv.extend(ec);
        argv.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        sh(&argv);
        let serial = format!("{}", i + 1);
        let (ca_crt, ca_key) = (p("ca.crt"), p("ca.key"));
        sh(&[
            "openssl",
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-set_serial",
            &serial,
            "-days",
            "2",
            "-out",
            &crt,
        ]);
        certs.push((read(Path::new(&crt)), read(Path::new(&key))));
    }
    let genkey = |kind: &str, name: &str| {
        sh(&["openvpn", "--genkey", kind, &p(name)]);
        read(&dir.join(name))
    };
    Pki {
        ca: read(&dir.join("ca.crt")),
        rogue_ca: read(&dir.join("rogue.crt")),
        certs,
        tls_auth: [genkey("tls-auth", "ta0.key"), genkey("tls-auth", "ta1.key")],
        tls_crypt: [
            genkey("tls-crypt", "tc0.key"),
            genkey("tls-crypt", "tc1.key"),
        ],
    }
}

/// Every key of both gateways: LAN, BGP, and the five instances (gw0 listens, gw1
/// connects; eBGP over `ta` and `tc`).
fn seed(etcd: &NsEtcd, pki: &Pki) {
    for i in 0..2 {
        let j = 1 - i;
        let node = format!("/nodes/gw{i}");
        etcd.put(&format!("{node}/lan"), &lan(i));
        etcd.put(&format!("{node}/bgp/enable"), "true");
        etcd.put(&format!("{node}/bgp/asn"), &asn(i));
        etcd.put(
            &format!("{node}/bgp/router_id"),
            &format!("10.255.0.{}", i + 1),
        );
        for inst in INSTANCES {
            let b = format!("{node}/openvpn/{}/", inst.name);
            let put = |k: &str, v: &str| etcd.put(&format!("{b}{k}"), v);
            put("enable", "true");
            let proto = match (inst.tcp, i) {
                (false, _) => "udp",
                (true, 0) => "tcp-server",
                (true, _) => "tcp-client",
            };
            put("proto", proto);
            put("port", &inst.port.to_string());
            if i == 1 {
                put("remote", &format!("{} {}", Mesh::gw_ip(0), inst.port));
            }
            put(
                "ifconfig",
                &format!("{} {}", tun_ip(inst.net, i), tun_ip(inst.net, j)),
            );
            put("keepalive", "2 10");
            let faulty = i == 1;
            let ca = if faulty && inst.fault == Fault::RogueCa {
                &pki.rogue_ca
            } else {
                &pki.ca
            };
            put("ca", ca);
            put("cert", &pki.certs[i].0);
            put("key", &pki.certs[i].1);
            let which = usize::from(faulty && inst.fault == Fault::OtherKey);
            match inst.ctrl {
                Ctrl::TlsAuth => put("tls_auth", &pki.tls_auth[which]),
                Ctrl::TlsCrypt => put("tls_crypt", &pki.tls_crypt[which]),
            }
            // Passed-through directives: pin the peer's certificate name, and (UDP)
            // tell the peer when we stop.
            put("verify-x509-name", &format!("gw{j} name"));
            if !inst.tcp {
                put("explicit-exit-notify", "1");
            }
            if inst.fault == Fault::None {
                put("bgp/enable", "true");
                put("bgp/peer_asn", &asn(j));
                put("bgp/peer_ip", &tun_ip(inst.net, j));
            }
        }
    }
}

/// `/updated/<gw>/openvpn/<inst>/status`, polled, remembering every distinct state
/// seen per key in order (the value is `<state> <unix-ts>`).
struct Statuses<'a> {
    etcd: &'a NsEtcd,
    seen: BTreeMap<String, Vec<String>>,
}

impl<'a> Statuses<'a> {
    fn new(etcd: &'a NsEtcd) -> Self {
        Self {
            etcd,
            seen: BTreeMap::new(),
        }
    }

    fn get(&mut self, gw: &Gateway, inst: &str) -> Option<String> {
        let state = gw
            .status(self.etcd, &format!("openvpn/{inst}/status"))
            .and_then(|v| v.split_whitespace().next().map(str::to_string));
        let seen = self.seen.entry(format!("{}/{inst}", gw.node)).or_default();
        // Absent before the first value (not published yet) is not a state change.
        let shown = state.clone().unwrap_or_else(|| "<absent>".into());
        if seen.last() != Some(&shown) && !(seen.is_empty() && state.is_none()) {
            seen.push(shown);
        }
        state
    }

    /// Wait until the status is `want`; how long it took.
    fn wait(&mut self, gw: &Gateway, inst: &str, want: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if self.get(gw, inst).as_deref() == Some(want) {
                return start.elapsed();
            }
            if start.elapsed() > timeout {
                panic!(
                    "{}: openvpn/{inst}/status not {want} after {timeout:?} (seen {:?}); \
                     openvpn-{inst} said:\n{}",
                    gw.node,
                    self.history(gw, inst),
                    child_lines(gw, inst).join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn history(&self, gw: &Gateway, inst: &str) -> Vec<String> {
        self.seen
            .get(&format!("{}/{inst}", gw.node))
            .cloned()
            .unwrap_or_default()
    }
}

/// The output lines of service `openvpn-<inst>` in the gateway's log (all runs).
fn child_lines(gw: &Gateway, inst: &str) -> Vec<String> {
    let tag = format!("[openvpn-{inst}]");
    gw.log_text()
        .lines()
        .filter(|l| l.contains(&tag))
        .map(str::to_string)
        .collect()
}

fn said(gw: &Gateway, inst: &str, needle: &str) -> bool {
    child_lines(gw, inst).iter().any(|l| l.contains(needle))
}

fn ping(gw: &Gateway, dst: &str) -> bool {
    ns_try(&gw.ns, &["busybox", "ping", "-c", "1", "-W", "1", dst])
        .status
        .success()
}

fn ping_from(gw: &Gateway, src: &str, dst: &str) -> bool {
    ns_try(
        &gw.ns,
        &["busybox", "ping", "-c", "1", "-W", "1", "-I", src, dst],
    )
    .status
    .success()
}

/// `show ip route` of `gw` has `prefix` as a selected BGP route over an OpenVPN device.
fn learned(gw: &Gateway, prefix: &str) -> bool {
    gw.vtysh("show ip route").lines().any(|l| {
        l.starts_with("B>*")
            && l.contains(prefix)
            && (l.contains("ovpn-ta") || l.contains("ovpn-tc"))
    })
}

fn established(gw: &Gateway, peer: &str) -> bool {
    gw.vtysh(&format!("show ip bgp neighbors {peer}"))
        .contains("BGP state = Established")
}

#[test]
fn openvpn_tls_links_come_up_verify_peers_carry_bgp_and_go_down_with_the_peer() {
    let t0 = Instant::now();
    let mesh = Mesh::new(2);
    let etcd = NsEtcd::start(&mesh.hub, Mesh::HUB_IP, 2379, &mesh.path("etcd"));
    let keys = mesh.path("pki");
    std::fs::create_dir_all(&keys).expect("pki dir");
    let pki = pki(&keys);
    seed(&etcd, &pki);
    let rev = commit(&etcd);
    let mut gws: Vec<Gateway> = (0..2)
        .map(|i| Gateway::new(&mesh, i, &etcd.endpoint))
        .collect();
    let mut st = Statuses::new(&etcd);

    // gw0 alone: every instance waits for its peer.
    gws[0].start();
    gws[0].wait_applied(&etcd, rev, Duration::from_secs(20));
    assert_eq!(gws[0].status(&etcd, "errors").as_deref(), Some("[]"));
    for inst in INSTANCES {
        st.wait(&gws[0], inst.name, "connecting", Duration::from_secs(20));
    }
    let conf = read(&gws[0].file("/etc/openvpn/ta.conf"));
    assert!(
        conf.contains("verify-x509-name gw1 name\n") && conf.contains("<tls-auth>\n"),
        "{conf}"
    );

    // gw1 starts: the good links come up.
    let t_peer = Instant::now();
    gws[1].start();
    gws[1].wait_applied(&etcd, rev, Duration::from_secs(20));
    assert_eq!(gws[1].status(&etcd, "errors").as_deref(), Some("[]"));
    let (g0, g1) = (&gws[0], &gws[1]);
    let mut up_after = Vec::new();
    for name in ["ta", "tc"] {
        st.wait(g0, name, "up", Duration::from_secs(40));
        up_after.push((name, t_peer.elapsed()));
        st.wait(g1, name, "up", Duration::from_secs(15));
        assert_eq!(
            st.history(g0, name),
            ["connecting", "up"],
            "gw0's {name} status went connecting -> up"
        );
    }
    for inst in INSTANCES.iter().filter(|i| i.fault == Fault::None) {
        // The real handshake: the tunnel carries traffic both ways, and each side
        // verified the other's certificate (and its pinned name).
        wait_for(
            &format!("ping over {}", inst.name),
            Duration::from_secs(10),
            || ping(g0, &tun_ip(inst.net, 1)).then_some(()),
        );
        assert!(
            ping(g1, &tun_ip(inst.net, 0)),
            "gw1 -> gw0 over {}",
            inst.name
        );
        for (gw, peer) in [(g0, "gw1"), (g1, "gw0")] {
            for needle in [
                format!("VERIFY OK: depth=0, CN={peer}"),
                format!("VERIFY X509NAME OK: CN={peer}"),
                "Peer Connection Initiated".to_string(),
                "Initialization Sequence Completed".to_string(),
            ] {
                assert!(
                    said(gw, inst.name, &needle),
                    "{}'s openvpn-{} did not log {needle:?}:\n{}",
                    gw.node,
                    inst.name,
                    child_lines(gw, inst.name).join("\n")
                );
            }
        }
    }
    eprintln!(
        "links up after {up_after:?} from gw1's start ({:.1}s into the test)",
        secs(t0)
    );

    // eBGP over the tunnels: both sessions, each side learns the other's LAN, and a
    // LAN address reaches the other LAN.
    let t_bgp = Instant::now();
    for (gw, j) in [(g0, 1), (g1, 0)] {
        for net in [1, 2] {
            let peer = tun_ip(net, j);
            wait_for(
                &format!("{} eBGP session to {peer}", gw.node),
                Duration::from_secs(90),
                || established(gw, &peer).then_some(()),
            );
        }
        wait_for(
            &format!("{} to learn {} over BGP", gw.node, lan(j)),
            Duration::from_secs(60),
            || learned(gw, &lan(j)).then_some(()),
        );
    }
    let bgp_after = t_bgp.elapsed();
    assert!(
        ping_from(g0, "10.50.0.1", "10.51.0.1"),
        "gw0's LAN reaches gw1's LAN"
    );
    assert!(
        ping_from(g1, "10.51.0.1", "10.50.0.1"),
        "gw1's LAN reaches gw0's LAN"
    );
    eprintln!(
        "BGP learned {:.1}s after the links were up ({:.1}s into the test)",
        bgp_after.as_secs_f64(),
        secs(t0)
    );

    // The faulty instances never came up, and OpenVPN says why: the certificate, the
    // tls-auth HMAC, the tls-crypt wrapping.
    // Several handshake attempts and status ticks (5 s) after gw1 started.
    std::thread::sleep(Duration::from_secs(15).saturating_sub(t_peer.elapsed()));
    for gw in [g0, g1] {
        for inst in INSTANCES.iter().filter(|i| i.fault != Fault::None) {
            assert_eq!(
                st.get(gw, inst.name).as_deref(),
                Some("connecting"),
                "{}'s {} must not come up (seen {:?})",
                gw.node,
                inst.name,
                st.history(gw, inst.name)
            );
            assert!(
                !said(gw, inst.name, "Initialization Sequence Completed"),
                "{}'s {} came up",
                gw.node,
                inst.name
            );
            assert!(!ping(gw, &tun_ip(inst.net, 1 - gw.index)));
        }
    }
    assert!(
        said(g1, "xca", "VERIFY ERROR: depth=0"),
        "gw1 refused gw0's certificate (other CA):\n{}",
        child_lines(g1, "xca").join("\n")
    );
    assert!(!said(g1, "xca", "VERIFY OK: depth=0"));
    let hmac = "packet HMAC authentication failed";
    let unwrap = "tls-crypt unwrapping failed";
    assert!(
        said(g0, "xta", hmac),
        "tls-auth refused gw1's packets:\n{}",
        child_lines(g0, "xta").join("\n")
    );
    assert!(
        said(g0, "xtc", unwrap),
        "tls-crypt refused gw1's packets:\n{}",
        child_lines(g0, "xtc").join("\n")
    );
    // The mechanism is the configured one, not the other.
    assert!(!said(g0, "xta", unwrap) && !said(g0, "xtc", hmac));

    // Disable gw1's `ta` in etcd: its OpenVPN stops (telling gw0, explicit-exit-notify),
    // gw0's `ta` goes down, gw1's status key goes away, `tc` stays up.
    etcd.put("/nodes/gw1/openvpn/ta/enable", "false");
    let rev = commit(&etcd);
    g1.wait_applied(&etcd, rev, Duration::from_secs(20));
    let t_stop = Instant::now();
    let ta_down = st.wait(g0, "ta", "down", Duration::from_secs(30));
    assert_eq!(st.history(g0, "ta"), ["connecting", "up", "down"]);
    assert!(said(g0, "ta", "remote-exit"), "gw1 notified its exit");
    wait_for("gw1's ta status removed", Duration::from_secs(15), || {
        st.get(g1, "ta").is_none().then_some(())
    });
    assert_eq!(st.get(g0, "tc").as_deref(), Some("up"));
    assert_eq!(st.get(g1, "tc").as_deref(), Some("up"));
    eprintln!(
        "ta down {:.1}s after gw1 applied the disable ({:.1}s after the commit)",
        ta_down.as_secs_f64(),
        t_stop.elapsed().as_secs_f64()
    );

    // Stop gw1 altogether: gw0's `tc` (TCP) goes down.
    let t_kill = Instant::now();
    let exit = gws[1].terminate(Duration::from_secs(30));
    assert!(exit.success(), "gw1 exited with {exit}");
    let g0 = &gws[0];
    let tc_down = st.wait(g0, "tc", "down", Duration::from_secs(30));
    assert_eq!(st.history(g0, "tc"), ["connecting", "up", "down"]);
    assert!(!ping(g0, &tun_ip(2, 1)), "nothing answers over tc any more");
    eprintln!(
        "tc down {:.1}s after gw1 was stopped ({:.1}s after SIGTERM); done after {:.1}s",
        tc_down.as_secs_f64(),
        t_kill.elapsed().as_secs_f64(),
        secs(t0)
    );
}
