//! The real `meduza run` in a namespace against a real etcd that goes away: etcd
//! killed and restarted (children keep running, a commit made right after is
//! applied), the gateway cut off while commits are made (applied once it is back,
//! the watch resuming from its revision), cut off while history is compacted past its
//! revision (full resync, and later changes still applied), SIGKILL of meduza (the
//! online key vanishes within the lease TTL), and a boot with etcd unreachable (the
//! last good snapshot in the state directory starts the children). Needs root, etcd
//! and nft; a missing one fails the test.

use meduza_test_support::{gateway, mesh};

use gateway::{commit, current_revision, Gateway};
use mesh::{ns_sh, wait_for, Mesh, NsEtcd};
use std::time::{Duration, Instant};

/// Generic tunnels `ta`, `tb`, `tc`: `/bin/sleep <args>`.
fn tunnel(etcd: &NsEtcd, node: &str, name: &str, args: &str) {
    let p = format!("/nodes/{node}/tunnels/{name}");
    etcd.put(&format!("{p}/enable"), "true");
    etcd.put(&format!("{p}/kind"), "generic");
    etcd.put(&format!("{p}/command"), "/bin/sleep");
    etcd.put(&format!("{p}/args"), args);
}

/// Rejects (TCP reset) the gateway's traffic to etcd inside the hub, so the test
/// still reaches etcd while the gateway cannot. Removed on drop.
struct Cut<'a> {
    hub: &'a str,
}

impl<'a> Cut<'a> {
    fn new(hub: &'a str, gw_ip: &str) -> Self {
        ns_sh(hub, &["nft", "add", "table", "inet", "mzcut"]);
        ns_sh(
            hub,
            &[
                "nft",
                "add",
                "chain",
                "inet",
                "mzcut",
                "in",
                "{ type filter hook input priority 0; }",
            ],
        );
        ns_sh(
            hub,
            &[
                "nft", "add", "rule", "inet", "mzcut", "in", "ip", "saddr", gw_ip, "tcp", "dport",
                "2379", "reject", "with", "tcp", "reset",
            ],
        );
        Self { hub }
    }
}

impl Drop for Cut<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args([
                "netns", "exec", self.hub, "nft", "delete", "table", "inet", "mzcut",
            ])
            .status();
    }
}

#[test]
fn gateway_rides_out_etcd_outages_compaction_and_its_own_crash() {
    let t0 = Instant::now();
    let mesh = Mesh::new(1);
    let mut etcd = NsEtcd::start(&mesh.hub, Mesh::HUB_IP, 2379, &mesh.path("etcd"));
    let gw_ip = Mesh::gw_ip(0).to_string();
    for (name, args) in [("ta", "3600"), ("tb", "3700"), ("tc", "3800")] {
        tunnel(&etcd, "gw0", name, args);
    }
    let rev = commit(&etcd);
    let mut gw = Gateway::applied(&mesh, 0, &etcd, rev);
    let ta = gw.wait_pid("sleep 3600", Duration::from_secs(5));
    let tb = gw.wait_pid("sleep 3700", Duration::from_secs(5));
    let tc = gw.wait_pid("sleep 3800", Duration::from_secs(5));
    let meduza = gw.pid();

    // 1. etcd killed: everything keeps running on the last good config.
    etcd.kill();
    std::thread::sleep(Duration::from_secs(2));
    for (pid, needle) in [(ta, "sleep 3600"), (tb, "sleep 3700"), (tc, "sleep 3800")] {
        assert_eq!(
            gw.pid_of(needle),
            Some(pid),
            "{needle} kept running while etcd is down"
        );
    }
    assert!(
        gw.procs().iter().any(|(p, _)| *p == meduza),
        "meduza still running"
    );
    // Restarted: a commit made right after it is applied; only its child restarts.
    etcd.restart();
    etcd.put("/nodes/gw0/tunnels/ta/args", "3601");
    let rev = commit(&etcd);
    gw.wait_applied(&etcd, rev, Duration::from_secs(30));
    gw.wait_pid("sleep 3601", Duration::from_secs(5));
    assert_eq!(gw.pid_of("sleep 3700"), Some(tb));
    assert_eq!(gw.pid_of("sleep 3800"), Some(tc));
    wait_for(
        "online again after the restart",
        Duration::from_secs(10),
        || (gw.status(&etcd, "online").as_deref() == Some("1")).then_some(()),
    );
    eprintln!(
        "etcd restart survived after {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    // 2. Cut off while a commit is made: applied once the gateway is back (the
    // watch resumes from its revision and replays the commit).
    let resyncs_before = gw
        .run_log()
        .matches("watch start revision was compacted")
        .count();
    {
        let _cut = Cut::new(&mesh.hub, &gw_ip);
        std::thread::sleep(Duration::from_millis(500));
        etcd.put("/nodes/gw0/tunnels/tb/args", "3701");
        let rev = commit(&etcd);
        std::thread::sleep(Duration::from_secs(2));
        assert!(
            gw.applied_revision(&etcd) < Some(rev),
            "not applied while cut off"
        );
        assert_eq!(
            gw.pid_of("sleep 3700"),
            Some(tb),
            "nothing changed while cut off"
        );
        drop(_cut);
        gw.wait_applied(&etcd, rev, Duration::from_secs(30));
    }
    gw.wait_pid("sleep 3701", Duration::from_secs(5));
    assert_eq!(gw.pid_of("sleep 3800"), Some(tc));
    assert_eq!(
        gw.run_log()
            .matches("watch start revision was compacted")
            .count(),
        resyncs_before,
        "no compaction involved: the watch resumed"
    );
    eprintln!(
        "cut-off commit applied after {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    // 3. Cut off while history moves on and is compacted past the gateway's watch
    // revision: a full resync applies the newest config, later commits still work.
    {
        let _cut = Cut::new(&mesh.hub, &gw_ip);
        std::thread::sleep(Duration::from_millis(500));
        for i in 0..5 {
            etcd.put("/global/scratch", &i.to_string());
        }
        etcd.put("/nodes/gw0/tunnels/tc/args", "3801");
        let rev = commit(&etcd);
        for i in 5..10 {
            etcd.put("/global/scratch", &i.to_string());
        }
        let floor = current_revision(&etcd);
        etcd.ctl(&["compact", &floor.to_string()]);
        drop(_cut);
        gw.wait_applied(&etcd, rev, Duration::from_secs(30));
    }
    gw.wait_pid("sleep 3801", Duration::from_secs(5));
    // The pass that applied it may be the one etcd's recovery triggered; the watcher
    // reconnects within its wake-up spread (0-3 s) and only then meets the compaction.
    wait_for(
        "the compaction and the resync in the log",
        Duration::from_secs(15),
        || {
            let log = gw.run_log();
            (log.contains("watch start revision was compacted; full resync")
                && log.contains("etcd resync"))
            .then_some(())
        },
    );
    etcd.put("/nodes/gw0/tunnels/tc/args", "3802");
    let rev = commit(&etcd);
    gw.wait_applied(&etcd, rev, Duration::from_secs(10));
    gw.wait_pid("sleep 3802", Duration::from_secs(5));
    eprintln!(
        "compaction resync done after {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    // 4. SIGKILL of meduza: its online key vanishes within the lease TTL (3 s).
    assert_eq!(gw.status(&etcd, "online").as_deref(), Some("1"));
    let killed = Instant::now();
    gw.kill9();
    wait_for("online to expire", Duration::from_secs(6), || {
        gw.status(&etcd, "online").is_none().then_some(())
    });
    let gone = killed.elapsed();
    assert!(
        gone <= Duration::from_millis(4500),
        "online vanished after {gone:?}"
    );
    eprintln!("online gone {:.1}s after SIGKILL", gone.as_secs_f64());

    // 5. Boot with etcd unreachable: the last good snapshot starts the children.
    gw.kill_all();
    {
        let _cut = Cut::new(&mesh.hub, &gw_ip);
        gw.start();
        for needle in ["sleep 3601", "sleep 3701", "sleep 3802"] {
            gw.wait_pid(needle, Duration::from_secs(20));
        }
        assert!(
            gw.run_log()
                .contains("etcd unreachable at boot; applying the last good snapshot"),
            "the log says the last good snapshot was used"
        );
        assert_eq!(
            gw.status(&etcd, "online"),
            None,
            "cut off: nothing published"
        );
    }
    // Back online: status published, and the same config means no restart.
    let ta = gw.wait_pid("sleep 3601", Duration::from_secs(1));
    wait_for(
        "online after etcd is reachable",
        Duration::from_secs(30),
        || (gw.status(&etcd, "online").as_deref() == Some("1")).then_some(()),
    );
    gw.wait_applied(&etcd, rev, Duration::from_secs(30));
    assert_eq!(gw.pid_of("sleep 3601"), Some(ta), "same config: no restart");

    let st = gw.terminate(Duration::from_secs(20));
    assert!(st.success(), "meduza exited with {st}");
    assert_eq!(gw.procs(), vec![], "SIGTERM left nothing in the namespace");
    eprintln!("done after {:.1}s", t0.elapsed().as_secs_f64());
}
