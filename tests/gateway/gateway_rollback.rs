//! Automatic rollback with the real `meduza run` in a namespace against a real etcd
//! (docs/operations.md, "Automatic rollback"): a commit that really cuts the
//! management path — a WireGuard device (wireguard-go here: this kernel has no
//! WireGuard module) whose address `10.99.0.100/25` puts the hub, where etcd listens,
//! behind a peer that never answers — is rolled back within `confirm_timeout`, the
//! gateway reaches etcd again and publishes `rollback`, the bad revision is not applied
//! again (also after a restart of meduza), and a newer commit is applied normally. A
//! commit that keeps etcd reachable is confirmed and stays. Needs root, etcd, `wg` and
//! `wireguard-go`; a missing one fails the test.

use meduza_test_support::process::wg_keypair;
use meduza_test_support::{gateway, mesh};

use gateway::{commit, Gateway};
use mesh::{ns_try, wait_for, Mesh, NsEtcd};
use std::time::{Duration, Instant};

/// `confirm_timeout` of the gateway under test (the smallest accepted value).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// WireGuard instance `name` on gw0 with `address`, one peer at an endpoint that
/// never answers (TEST-NET-1 has no route here).
fn wireguard(etcd: &NsEtcd, name: &str, address: &str, allowed: &str) {
    let (private, _) = wg_keypair();
    let (_, peer) = wg_keypair();
    let b = format!("/nodes/gw0/wireguard/{name}");
    etcd.put(&format!("{b}/enable"), "true");
    etcd.put(&format!("{b}/private_key"), &private);
    etcd.put(&format!("{b}/listen_port"), "51820");
    etcd.put(&format!("{b}/address"), address);
    etcd.put(&format!("{b}/peer/far/public_key"), &peer);
    etcd.put(&format!("{b}/peer/far/endpoint"), "192.0.2.1:51820");
    etcd.put(&format!("{b}/peer/far/allowed_ips"), allowed);
}

fn tunnel(etcd: &NsEtcd, args: &str) {
    let p = "/nodes/gw0/tunnels/ta";
    etcd.put(&format!("{p}/enable"), "true");
    etcd.put(&format!("{p}/kind"), "generic");
    etcd.put(&format!("{p}/command"), "/bin/sleep");
    etcd.put(&format!("{p}/args"), args);
}

fn link_exists(gw: &Gateway, dev: &str) -> bool {
    ns_try(&gw.ns, &["ip", "link", "show", dev])
        .status
        .success()
}

/// The device `ip route get <dst>` picks in the gateway's namespace.
fn route_dev(gw: &Gateway, dst: &str) -> String {
    let out = ns_try(&gw.ns, &["ip", "route", "get", dst]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "dev" {
            return words.next().unwrap_or_default().to_string();
        }
    }
    text
}

/// A gateway with `confirm_timeout` = 10 s that applied (and confirmed) a first
/// commit running `sleep 3600`; returns it and that revision.
fn started(mesh: &Mesh, etcd: &NsEtcd) -> (Gateway, i64) {
    etcd.put(
        "/nodes/gw0/confirm_timeout",
        &CONFIRM_TIMEOUT.as_secs().to_string(),
    );
    tunnel(etcd, "3600");
    let rev = commit(etcd);
    let gw = Gateway::applied(mesh, 0, etcd, rev);
    gw.wait_pid("sleep 3600", Duration::from_secs(5));
    (gw, rev)
}

#[test]
fn a_commit_that_cuts_etcd_off_is_rolled_back_and_not_applied_again() {
    let t0 = Instant::now();
    let mesh = Mesh::new(1);
    let etcd = NsEtcd::start(&mesh.hub, Mesh::HUB_IP, 2379, &mesh.path("etcd"));
    let (mut gw, good) = started(&mesh, &etcd);
    let ta = gw.wait_pid("sleep 3600", Duration::from_secs(1));
    assert_eq!(route_dev(&gw, "10.99.0.1"), "wan0");

    // The bad commit: 10.99.0.0/25 on wg-cut is more specific than the WAN's /24.
    wireguard(&etcd, "cut", "10.99.0.100/25", "10.99.0.0/25");
    let bad = commit(&etcd);
    let committed = Instant::now();
    // The commit really routes etcd into the tunnel (once the device is up with its
    // address: the link appears a moment before).
    wait_for(
        "the route to etcd to go through wg-cut",
        Duration::from_secs(20),
        || (route_dev(&gw, "10.99.0.1") == "wg-cut").then_some(()),
    );
    let cut_at = Instant::now();
    eprintln!(
        "bad revision {bad} applied {:.1}s after the commit",
        committed.elapsed().as_secs_f64()
    );

    // Rolled back within confirm_timeout + a few seconds: the device is gone.
    wait_for(
        "wg-cut to be removed by the rollback",
        CONFIRM_TIMEOUT + Duration::from_secs(10),
        || (!link_exists(&gw, "wg-cut")).then_some(()),
    );
    let rolled_back = cut_at.elapsed();
    assert_eq!(route_dev(&gw, "10.99.0.1"), "wan0");
    let rollback = wait_for("rollback to be published", Duration::from_secs(30), || {
        gw.status(&etcd, "rollback")
    });
    let reconnected = cut_at.elapsed() - rolled_back;
    let v: serde_json::Value = serde_json::from_str(&rollback).expect("rollback is JSON");
    assert_eq!(v["revision"].as_i64(), Some(bad), "{rollback}");
    assert!(
        v["reason"]
            .as_str()
            .unwrap_or("")
            .contains("etcd unreachable"),
        "{rollback}"
    );
    assert!(v["at"].as_u64().is_some(), "{rollback}");
    wait_for(
        "applied to name the previous revision",
        Duration::from_secs(10),
        || (gw.applied_revision(&etcd) == Some(good)).then_some(()),
    );
    assert_eq!(gw.pid_of("sleep 3600"), Some(ta), "the tunnel kept running");
    eprintln!(
        "ROLLBACK: rolled back {:.1}s after the cut (confirm_timeout {}s); \
         etcd reached again and rollback published {:.1}s after the rollback",
        rolled_back.as_secs_f64(),
        CONFIRM_TIMEOUT.as_secs(),
        reconnected.as_secs_f64()
    );
    assert!(
        rolled_back <= CONFIRM_TIMEOUT + Duration::from_secs(6),
        "rollback took {rolled_back:?}"
    );

    // Not applied again: a while later, still the good revision.
    std::thread::sleep(CONFIRM_TIMEOUT);
    assert!(!link_exists(&gw, "wg-cut"), "the bad revision came back");
    assert_eq!(gw.applied_revision(&etcd), Some(good));

    // Nor after a restart of meduza (the refusal is in the state directory).
    let st = gw.terminate(Duration::from_secs(20));
    assert!(st.success(), "meduza exited with {st}");
    gw.start();
    wait_for(
        "the restart to come up on the good revision",
        Duration::from_secs(20),
        || {
            gw.run_log()
                .contains("revision was rolled back; applying the last good snapshot")
                .then_some(())
        },
    );
    gw.wait_pid("sleep 3600", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !link_exists(&gw, "wg-cut"),
        "restart applied the bad revision"
    );
    assert_eq!(gw.applied_revision(&etcd), Some(good));
    assert!(gw
        .status(&etcd, "rollback")
        .unwrap()
        .contains(&bad.to_string()));

    // A newer commit (the operator removed the device) is applied normally.
    etcd.ctl(&["del", "--prefix", "/nodes/gw0/wireguard/"]);
    tunnel(&etcd, "3601");
    let fixed = commit(&etcd);
    gw.wait_applied(&etcd, fixed, Duration::from_secs(20));
    gw.wait_pid("sleep 3601", Duration::from_secs(10));
    wait_for("the fix to be confirmed", Duration::from_secs(10), || {
        gw.run_log().contains("commit confirmed").then_some(())
    });
    let st = gw.terminate(Duration::from_secs(20));
    assert!(st.success(), "meduza exited with {st}");
    eprintln!("done after {:.1}s", t0.elapsed().as_secs_f64());
}

#[test]
fn a_commit_that_keeps_etcd_reachable_is_confirmed_and_kept() {
    let t0 = Instant::now();
    let mesh = Mesh::new(1);
    let etcd = NsEtcd::start(&mesh.hub, Mesh::HUB_IP, 2379, &mesh.path("etcd"));
    let (mut gw, _) = started(&mesh, &etcd);

    // A WireGuard device that does not cover etcd's address, and a changed tunnel.
    wireguard(&etcd, "side", "10.97.0.1/24", "10.97.0.0/24");
    tunnel(&etcd, "3601");
    let rev = commit(&etcd);
    gw.wait_applied(&etcd, rev, Duration::from_secs(20));
    let ta = gw.wait_pid("sleep 3601", Duration::from_secs(10));
    assert!(link_exists(&gw, "wg-side"));
    assert_eq!(route_dev(&gw, "10.99.0.1"), "wan0");
    wait_for(
        "the commit to be confirmed",
        Duration::from_secs(10),
        || gw.run_log().contains("commit confirmed").then_some(()),
    );
    // Past the window: nothing rolled back.
    std::thread::sleep(CONFIRM_TIMEOUT + Duration::from_secs(3));
    assert_eq!(gw.status(&etcd, "rollback"), None);
    assert_eq!(gw.applied_revision(&etcd), Some(rev));
    assert!(link_exists(&gw, "wg-side"));
    assert_eq!(gw.pid_of("sleep 3601"), Some(ta));
    assert!(!gw.run_log().contains("rolling back"));
    let st = gw.terminate(Duration::from_secs(20));
    assert!(st.success(), "meduza exited with {st}");
    eprintln!("done after {:.1}s", t0.elapsed().as_secs_f64());
}

/// `meduza commit --confirm <secs>`, the real CLI: `/commit` and `/commit_confirm`
/// in one transaction; returns the commit's revision.
fn commit_with_confirm(etcd: &NsEtcd, secs: u64) -> i64 {
    let out = ns_try(
        &etcd.ns,
        &[
            env!("CARGO_BIN_EXE_meduza"),
            "--etcd-endpoints",
            &etcd.endpoint,
            "commit",
            "--confirm",
            &secs.to_string(),
        ],
    );
    assert!(
        out.status.success(),
        "meduza commit --confirm: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rev = gateway::mod_revision(etcd, "/commit");
    assert_eq!(
        gateway::mod_revision(etcd, "/commit_confirm"),
        rev,
        "/commit_confirm written by the same transaction"
    );
    rev
}

#[test]
fn a_confirm_commit_is_rolled_back_unless_meduza_confirm_arrives() {
    let t0 = Instant::now();
    let mesh = Mesh::new(1);
    let etcd = NsEtcd::start(&mesh.hub, Mesh::HUB_IP, 2379, &mesh.path("etcd"));
    let (mut gw, good) = started(&mesh, &etcd);

    // Not confirmed: rolled back although etcd stays reachable.
    tunnel(&etcd, "3601");
    let unconfirmed = commit_with_confirm(&etcd, 10);
    gw.wait_applied(&etcd, unconfirmed, Duration::from_secs(20));
    gw.wait_pid("sleep 3601", Duration::from_secs(10));
    let applied = Instant::now();
    let rollback = wait_for("the rollback", Duration::from_secs(20), || {
        gw.status(&etcd, "rollback")
    });
    eprintln!(
        "unconfirmed commit rolled back {:.1}s after it was applied",
        applied.elapsed().as_secs_f64()
    );
    let v: serde_json::Value = serde_json::from_str(&rollback).unwrap();
    assert_eq!(v["revision"].as_i64(), Some(unconfirmed), "{rollback}");
    assert!(v["reason"].as_str().unwrap().contains("not confirmed"));
    gw.wait_pid("sleep 3600", Duration::from_secs(10));
    gw.wait_applied(&etcd, good, Duration::from_secs(5));
    assert_eq!(gw.applied_revision(&etcd), Some(good));

    // Confirmed with `meduza confirm`: kept past the window.
    tunnel(&etcd, "3602");
    let confirmed = commit_with_confirm(&etcd, 10);
    gw.wait_applied(&etcd, confirmed, Duration::from_secs(20));
    let ta = gw.wait_pid("sleep 3602", Duration::from_secs(10));
    let out = ns_try(
        &etcd.ns,
        &[
            env!("CARGO_BIN_EXE_meduza"),
            "--etcd-endpoints",
            &etcd.endpoint,
            "confirm",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "meduza confirm: {text}");
    assert_eq!(text.trim(), format!("confirmed revision {confirmed}"));
    wait_for("the confirmation", Duration::from_secs(10), || {
        let rev = format!("revision={confirmed}");
        gw.run_log()
            .lines()
            .any(|l| l.contains("commit confirmed") && l.contains(&rev))
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(gw.applied_revision(&etcd), Some(confirmed));
    assert_eq!(gw.pid_of("sleep 3602"), Some(ta));
    assert!(gw
        .status(&etcd, "rollback")
        .unwrap()
        .contains(&unconfirmed.to_string()));
    let st = gw.terminate(Duration::from_secs(20));
    assert!(st.success(), "meduza exited with {st}");
    eprintln!("done after {:.1}s", t0.elapsed().as_secs_f64());
}
