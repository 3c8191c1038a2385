//! Two gateways, each the real `meduza run` in its own network namespace, against a
//! real etcd: a tinc mesh and an iBGP pair come up from etcd keys alone (RSA keys made
//! with openssl here), a config change restarts only the child it concerns, a crashed
//! FRR daemon gets its config back, an invalid commit keeps the last good config, and
//! SIGTERM stops every child in reverse start order. Needs root, etcd, tinc, FRR,
//! openssl and busybox (for `ping`); a missing one fails the test.

use meduza_test_support::{gateway, mesh};

use gateway::{commit, lan, overlay_ip, start_order, stop_order, Gateway};
use mesh::{ns_try, sh, wait_for, Mesh, NsEtcd};
use std::time::{Duration, Instant};

/// Keys of a two-node tinc mesh with iBGP between the overlay addresses.
fn seed(etcd: &NsEtcd, dir: &std::path::Path, n: usize) {
    etcd.put("/global/mesh_type", "tinc");
    etcd.put("/global/internal_routing_system", "bgp");
    for i in 0..n {
        let key = dir.join(format!("gw{i}.key"));
        let k = key.display().to_string();
        sh(&["openssl", "genrsa", "-out", &k, "2048"]);
        let public = sh(&["openssl", "rsa", "-in", &k, "-pubout"]);
        let private = std::fs::read_to_string(&key).expect("private key");
        let node = format!("/nodes/gw{i}");
        etcd.put(&format!("{node}/lan"), &lan(i));
        etcd.put(&format!("{node}/tinc/enable"), "true");
        etcd.put(&format!("{node}/tinc/address"), &Mesh::gw_ip(i).to_string());
        etcd.put(
            &format!("{node}/tinc/ipv4"),
            &format!("{}/24", overlay_ip(i)),
        );
        etcd.put(&format!("{node}/tinc/subnet"), &lan(i));
        etcd.put(&format!("{node}/tinc/private_key"), &private);
        etcd.put(&format!("{node}/tinc/public_key"), &public);
        etcd.put(&format!("{node}/bgp/enable"), "true");
        etcd.put(&format!("{node}/bgp/asn"), "65000");
        etcd.put(
            &format!("{node}/bgp/router_id"),
            &format!("10.255.0.{}", i + 1),
        );
    }
}

fn ping(gw: &Gateway, dst: &str) -> bool {
    ns_try(&gw.ns, &["busybox", "ping", "-c", "1", "-W", "1", dst])
        .status
        .success()
}

/// `show ip route` of `gw` has `prefix` as a selected BGP route over the tinc device.
fn learned(gw: &Gateway, prefix: &str) -> bool {
    gw.vtysh("show ip route")
        .lines()
        .any(|l| l.starts_with("B>*") && l.contains(prefix) && l.contains("tnc0"))
}

#[test]
fn tinc_and_frr_come_up_from_etcd_and_changes_touch_only_their_child() {
    let t0 = Instant::now();
    let mesh = Mesh::new(2);
    let etcd = NsEtcd::start(&mesh.hub, Mesh::HUB_IP, 2379, &mesh.path("etcd"));
    seed(&etcd, mesh.dir.path(), 2);
    let rev = commit(&etcd);
    let mut gws: Vec<Gateway> = (0..2)
        .map(|i| Gateway::new(&mesh, i, &etcd.endpoint))
        .collect();
    gateway::start_all(&mut gws, &etcd, rev);
    for g in &gws {
        assert_eq!(g.status(&etcd, "online").as_deref(), Some("1"));
    }
    let (g0, g1) = (&gws[0], &gws[1]);

    // The tinc mesh, from etcd keys alone: the overlay addresses answer.
    wait_for("ping gw1 over tinc", Duration::from_secs(30), || {
        ping(g0, &overlay_ip(1)).then_some(())
    });
    assert!(ping(g1, &overlay_ip(0)), "gw1 reaches gw0 over tinc");
    for g in &gws {
        let st = g.status(&etcd, "services/tinc/status").unwrap_or_default();
        assert!(
            st.starts_with("running") || st.starts_with("starting"),
            "{st}"
        );
    }

    // iBGP over the overlay: each gateway learned the other's LAN, and traffic to it
    // flows (gw1's LAN address answers from gw0).
    wait_for(
        "gw0 to learn gw1's LAN over BGP",
        Duration::from_secs(60),
        || learned(g0, &lan(1)).then_some(()),
    );
    wait_for(
        "gw1 to learn gw0's LAN over BGP",
        Duration::from_secs(30),
        || learned(g1, &lan(0)).then_some(()),
    );
    assert!(
        ping(g0, "10.51.0.1"),
        "gw1's LAN reachable from gw0 through the mesh"
    );
    eprintln!(
        "mesh and routes up after {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    let tincd = g0.wait_pid("tincd", Duration::from_secs(1));
    let zebra = g0.wait_pid("/zebra", Duration::from_secs(1));
    let bgpd = g0.wait_pid("/bgpd", Duration::from_secs(1));
    let tincd1 = g1.wait_pid("tincd", Duration::from_secs(1));

    // A new generic tunnel starts; changing its args restarts it and nothing else.
    etcd.put("/nodes/gw0/tunnels/t1/enable", "true");
    etcd.put("/nodes/gw0/tunnels/t1/kind", "generic");
    etcd.put("/nodes/gw0/tunnels/t1/command", "/bin/sleep");
    etcd.put("/nodes/gw0/tunnels/t1/args", "3600");
    let rev = commit(&etcd);
    g0.wait_applied(&etcd, rev, Duration::from_secs(10));
    let t1 = g0.wait_pid("sleep 3600", Duration::from_secs(5));
    etcd.put("/nodes/gw0/tunnels/t1/args", "3601");
    let rev = commit(&etcd);
    g0.wait_applied(&etcd, rev, Duration::from_secs(10));
    let t1b = g0.wait_pid("sleep 3601", Duration::from_secs(5));
    assert_ne!(t1, t1b, "the tunnel was restarted");
    assert_eq!(
        g0.pid_of("sleep 3600"),
        None,
        "the old tunnel process is gone"
    );
    assert_eq!(g0.pid_of("tincd"), Some(tincd), "tincd untouched");
    assert_eq!(g0.pid_of("/zebra"), Some(zebra), "frr-zebra untouched");
    assert_eq!(g0.pid_of("/bgpd"), Some(bgpd), "frr-bgpd untouched");
    assert_eq!(
        g1.pid_of("tincd"),
        Some(tincd1),
        "the other gateway untouched"
    );
    g1.wait_applied(&etcd, rev, Duration::from_secs(10));

    // A crashed FRR daemon is restarted by meduza and gets the config pushed again
    // (FRR daemons start empty), so the route comes back.
    sh(&["kill", "-9", &bgpd.to_string()]);
    let bgpd2 = wait_for("bgpd restarted", Duration::from_secs(10), || {
        g0.pid_of("/bgpd").filter(|p| *p != bgpd)
    });
    wait_for("frr config pushed again", Duration::from_secs(15), || {
        (g0.run_log().matches("frr config loaded").count() >= 2).then_some(())
    });
    wait_for(
        "gw0 to learn gw1's LAN again",
        Duration::from_secs(30),
        || learned(g0, &lan(1)).then_some(()),
    );
    assert_eq!(g0.pid_of("/zebra"), Some(zebra), "zebra kept running");
    assert_eq!(g0.pid_of("/bgpd"), Some(bgpd2));

    // An invalid commit: nothing applied, nothing restarted, files unchanged, the
    // error published naming the key.
    let files = g0.etc_files();
    let pids: Vec<(u32, String)> = g0.procs();
    let good = g0.applied_revision(&etcd).expect("applied");
    etcd.put("/nodes/gw0/lan", "not-a-cidr");
    let bad = commit(&etcd);
    let errors = wait_for("errors published", Duration::from_secs(10), || {
        g0.status(&etcd, "errors")
            .filter(|e| e.contains("/nodes/gw0/lan"))
    });
    let parsed: serde_json::Value = serde_json::from_str(&errors).expect("errors is JSON");
    assert_eq!(parsed[0]["key"], "/nodes/gw0/lan", "{errors}");
    assert_eq!(parsed[0]["value"], "not-a-cidr", "{errors}");
    assert!(
        g0.status(&etcd, "last")
            .unwrap_or_default()
            .contains(&format!("refused revision {bad}")),
        "last says the revision was refused"
    );
    assert_eq!(
        g0.applied_revision(&etcd),
        Some(good),
        "applied stays at the last good"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(g0.procs(), pids, "no child restarted");
    assert_eq!(g0.etc_files(), files, "no file rewritten");
    assert!(learned(g0, &lan(1)), "routing keeps running");

    // Fixed: applied again, errors cleared.
    etcd.put("/nodes/gw0/lan", &lan(0));
    let fixed = commit(&etcd);
    for g in [g0, g1] {
        g.wait_applied(&etcd, fixed, Duration::from_secs(10));
        assert_eq!(g.status(&etcd, "errors").as_deref(), Some("[]"));
    }

    // SIGTERM: every child stopped, in reverse start order; nothing left behind.
    let started = start_order(&g0.run_log());
    let mut gws = gws;
    let st = gws[0].terminate(Duration::from_secs(30));
    assert!(st.success(), "meduza exited with {st}");
    let g0 = &gws[0];
    let stopped = stop_order(&g0.run_log());
    let mut expected: Vec<String> = started.iter().rev().cloned().collect();
    expected.retain(|s| stopped.contains(s));
    assert_eq!(stopped, expected, "stop order is the reverse start order");
    for svc in ["tinc", "frr-zebra", "frr-bgpd", "tunnel-t1"] {
        assert!(
            stopped.iter().any(|s| s == svc),
            "{svc} stopped: {stopped:?}"
        );
    }
    assert_eq!(g0.procs(), vec![], "no process left in gw0's namespace");
    assert_eq!(
        g0.status(&etcd, "online"),
        None,
        "online revoked at shutdown"
    );
    eprintln!("done after {:.1}s", t0.elapsed().as_secs_f64());
}
