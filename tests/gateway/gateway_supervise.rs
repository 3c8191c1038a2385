//! Supervision in the real `meduza run`: a crash-looping child backs off instead of
//! storming, its restart budget (`$MEDUZA_STATE_DIR/restart/<svc>.state`) survives a
//! restart of meduza, and SIGTERM stops every child in reverse start order leaving
//! nothing behind. Needs root, etcd and curl; a missing one fails the test.

use meduza_test_support::{gateway, mesh};

use gateway::{commit, start_order, stop_order, Gateway};
use mesh::{wait_for, Mesh, NsEtcd};
use std::time::{Duration, Instant};

const TOKEN: &str = "test-token-0123456789abcdef";

fn tunnel(etcd: &NsEtcd, name: &str, command: &str, args: &str) {
    let p = format!("/nodes/gw0/tunnels/{name}");
    etcd.put(&format!("{p}/enable"), "true");
    etcd.put(&format!("{p}/kind"), "generic");
    etcd.put(&format!("{p}/command"), command);
    if !args.is_empty() {
        etcd.put(&format!("{p}/args"), args);
    }
}

/// `meduza_service_restarts_last_hour` of `svc` from the node API's `/metrics`.
fn restarts_last_hour(gw: &Gateway, svc: &str) -> Option<u64> {
    gw.service_metric(TOKEN, "meduza_service_restarts_last_hour", svc)
}

fn started_count(log: &str, svc: &str) -> usize {
    let needle = format!("svc={svc} ");
    log.lines()
        .filter(|l| l.contains("service started") && l.contains(&needle))
        .count()
}

#[test]
fn crash_loop_backs_off_budget_survives_restart_and_shutdown_is_ordered() {
    let t0 = Instant::now();
    let mesh = Mesh::new(1);
    let etcd = NsEtcd::start(&mesh.hub, Mesh::HUB_IP, 2379, &mesh.path("etcd"));
    etcd.put("/nodes/gw0/api/token", TOKEN);
    tunnel(&etcd, "ta", "/bin/sleep", "3600");
    tunnel(&etcd, "tb", "/bin/sleep", "3700");
    tunnel(&etcd, "crash", "/bin/false", "");
    let rev = commit(&etcd);
    let mut gw = Gateway::applied(&mesh, 0, &etcd, rev);
    let ta = gw.wait_pid("sleep 3600", Duration::from_secs(5));
    let tb = gw.wait_pid("sleep 3700", Duration::from_secs(5));

    // A crash loop for 10 s: exponential backoff (1 s, 2 s, 4 s, ...), not a storm.
    wait_for(
        "first start of the crashing tunnel",
        Duration::from_secs(5),
        || (started_count(&gw.run_log(), "tunnel-crash") >= 1).then_some(()),
    );
    std::thread::sleep(Duration::from_secs(10));
    let starts = started_count(&gw.run_log(), "tunnel-crash");
    assert!(
        (2..=5).contains(&starts),
        "{starts} starts of tunnel-crash in ~10 s"
    );
    let log = gw.run_log();
    assert!(
        log.contains("Restart after backoff (attempt 3, wait 4s)"),
        "backoff decisions are logged"
    );
    let st = gw
        .status(&etcd, "services/tunnel-crash/status")
        .unwrap_or_default();
    assert!(
        st.starts_with("backoff") || st.starts_with("starting"),
        "published status of a crash loop: {st}"
    );
    assert_eq!(
        gw.pid_of("sleep 3600"),
        Some(ta),
        "other children unaffected"
    );
    assert_eq!(gw.pid_of("sleep 3700"), Some(tb));

    // The budget is on disk, one line per restart.
    let state_file = gw.state.join("restart/tunnel-crash.state");
    let before = std::fs::read_to_string(&state_file).expect("restart state file");
    let lines: Vec<&str> = before.lines().collect();
    assert!(lines.len() >= starts - 1, "{before}");
    assert!(lines.iter().all(|l| l.ends_with(" exit")), "{before}");
    let counted = wait_for("restarts in /metrics", Duration::from_secs(5), || {
        restarts_last_hour(&gw, "tunnel-crash")
    });
    assert!(counted >= 1);

    // SIGTERM: every child stopped in reverse start order; nothing left behind.
    let started = start_order(&gw.run_log());
    let st = gw.terminate(Duration::from_secs(20));
    assert!(st.success(), "meduza exited with {st}");
    let stopped = stop_order(&gw.run_log());
    let mut expected: Vec<String> = started.iter().rev().cloned().collect();
    expected.retain(|s| stopped.contains(s));
    assert_eq!(stopped, expected, "stop order is the reverse start order");
    assert!(
        stopped.contains(&"tunnel-ta".to_string()) && stopped.contains(&"tunnel-tb".to_string())
    );
    assert_eq!(gw.procs(), vec![], "no process left in the namespace");
    assert_eq!(gw.status(&etcd, "online"), None, "online revoked");
    let kept = std::fs::read_to_string(&state_file).expect("state file kept");
    assert!(
        kept.starts_with(before.trim_end()),
        "budget kept across shutdown"
    );

    // A new meduza: the budget is read back, not reset.
    gw.start();
    let first = wait_for(
        "restarts in /metrics after restart",
        Duration::from_secs(20),
        || restarts_last_hour(&gw, "tunnel-crash"),
    );
    assert!(
        first >= lines.len() as u64,
        "restarts_last_hour {first} after a restart of meduza, {} before",
        lines.len()
    );
    let after = std::fs::read_to_string(&state_file).expect("state file");
    assert!(
        after.starts_with(before.trim_end()),
        "old records kept:\n{after}"
    );
    let st = gw.terminate(Duration::from_secs(20));
    assert!(st.success());
    assert_eq!(gw.procs(), vec![]);
    eprintln!("done after {:.1}s", t0.elapsed().as_secs_f64());
}
