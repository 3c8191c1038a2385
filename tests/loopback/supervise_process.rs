//! The supervisor with real processes. The children are `/bin/sh -c` scripts written
//! here, in the test's own argv (never a configuration value).

use meduza::supervise::{
    EventKind, ExitInfo, RealSpawner, RestartSource, ServiceEvent, ServiceState, Supervisor,
    SupervisorConfig, SystemClock,
};
use meduza_generators::plan::service::{HealthSpec, Probe, RestartProtection, ServiceSpec};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

fn sh(name: &str, script: &str) -> ServiceSpec {
    ServiceSpec::new(name, vec!["/bin/sh".into(), "-c".into(), script.into()])
}

fn supervisor(dir: &Path) -> Supervisor {
    let mut config = SupervisorConfig::new(dir);
    config.stop_timeout = Duration::from_secs(3);
    Supervisor::new(Arc::new(RealSpawner::new()), Arc::new(SystemClock), config)
}

/// `/proc/<pid>/status` field `key` (e.g. `CapEff`).
fn proc_status(pid: u32, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

async fn wait_state(sup: &Supervisor, name: &str, state: ServiceState, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if sup
            .status()
            .iter()
            .any(|s| s.name == name && s.state == state)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never reached {state}: {:?}",
            sup.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn drain(rx: &mut broadcast::Receiver<ServiceEvent>) -> Vec<ServiceEvent> {
    let mut out = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        out.push(ev);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_backs_off_without_a_restart_storm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sup = supervisor(dir.path());
    let mut events = sup.subscribe();
    sup.apply(vec![sh("crashy", "echo boom; exit 3")], &BTreeSet::new())
        .await
        .expect("apply");
    tokio::time::sleep(Duration::from_millis(10_000)).await;
    let evs = drain(&mut events);
    let starts = evs
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Started { .. }))
        .count();
    let exits: Vec<ExitInfo> = evs
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Exited { status, .. } => Some(status),
            _ => None,
        })
        .collect();
    // Starts at ~0, 1, 3, 7 s: at most 5 in 10 s (systemd's burst parity), at least 4.
    assert!((4..=5).contains(&starts), "starts in 10 s: {starts}");
    assert!(exits.iter().all(|e| *e == ExitInfo::Code(3)), "{exits:?}");
    let st = &sup.status()[0];
    assert!(
        matches!(st.state, ServiceState::Backoff | ServiceState::Starting),
        "{st:?}"
    );
    assert_eq!(st.last_exit, Some(ExitInfo::Code(3)));
    assert!(st.restarts_last_hour >= 3);
    let logs = sup.logs("crashy", 10).await.expect("logs");
    assert!(
        logs.iter().all(|l| l == "boom") && !logs.is_empty(),
        "{logs:?}"
    );
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backoff_gaps_grow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sup = supervisor(dir.path());
    let mut events = sup.subscribe();
    sup.apply(vec![sh("crashy2", "exit 1")], &BTreeSet::new())
        .await
        .expect("apply");
    let mut starts = Vec::new();
    while starts.len() < 4 {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .expect("event in time")
            .expect("event");
        if matches!(ev.kind, EventKind::Started { .. }) {
            starts.push(Instant::now());
        }
    }
    let gaps: Vec<f64> = starts
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    for (gap, want) in gaps.iter().zip([1.0, 2.0, 4.0]) {
        assert!(
            (want - 0.05..want + 0.6).contains(gap),
            "gaps {gaps:?} not ~1, 2, 4 s"
        );
    }
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_reverse_start_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let order_file = dir.path().join("order");
    let script = |name: &str| {
        format!(
            "trap 'echo {name} >> {}; exit 0' TERM; while :; do sleep 0.05; done",
            order_file.display()
        )
    };
    let mut b = sh("b", &script("b"));
    b.after = vec!["a".into()];
    let mut c = sh("c", &script("c"));
    c.after = vec!["b".into()];
    let sup = supervisor(dir.path());
    sup.apply(vec![c, b, sh("a", &script("a"))], &BTreeSet::new())
        .await
        .expect("apply");
    assert_eq!(sup.start_order().await, ["a", "b", "c"]);
    for n in ["a", "b", "c"] {
        wait_state(&sup, n, ServiceState::Running, Duration::from_secs(5)).await;
    }
    sup.shutdown().await;
    let order = std::fs::read_to_string(&order_file).expect("order file");
    assert_eq!(order.lines().collect::<Vec<_>>(), ["c", "b", "a"]);
    assert!(sup
        .status()
        .iter()
        .all(|s| s.state == ServiceState::Stopped && s.pid.is_none()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ignored_means_sigkill_after_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sup = supervisor(dir.path());
    let mut events = sup.subscribe();
    sup.apply(
        vec![sh("stubborn", "trap '' TERM; while :; do sleep 0.05; done")],
        &BTreeSet::new(),
    )
    .await
    .expect("apply");
    wait_state(
        &sup,
        "stubborn",
        ServiceState::Running,
        Duration::from_secs(5),
    )
    .await;
    let t = Instant::now();
    sup.shutdown().await;
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let exited: Vec<ExitInfo> = drain(&mut events)
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::Exited { status, .. } => Some(status),
            _ => None,
        })
        .collect();
    assert_eq!(exited, [ExitInfo::Signal(9)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_runs_with_listed_caps_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sup = supervisor(dir.path());
    let mut as_nobody = ServiceSpec::new("capped-nobody", vec!["/bin/sleep".into(), "30".into()]);
    as_nobody.user = Some("nobody".into());
    as_nobody.caps = vec!["CAP_NET_ADMIN".into(), "net_bind_service".into()];
    let mut as_root = ServiceSpec::new("capped-root", vec!["/bin/sleep".into(), "30".into()]);
    as_root.caps = vec!["CAP_NET_RAW".into()];
    let none = ServiceSpec::new("nocaps", vec!["/bin/sleep".into(), "30".into()]);
    sup.apply(vec![as_nobody, as_root, none], &BTreeSet::new())
        .await
        .expect("apply");
    let pid = |n: &str| {
        sup.status()
            .into_iter()
            .find(|s| s.name == n)
            .and_then(|s| s.pid)
            .expect("pid")
    };
    // CAP_NET_BIND_SERVICE = 10, CAP_NET_ADMIN = 12, CAP_NET_RAW = 13.
    let nobody = pid("capped-nobody");
    assert_eq!(proc_status(nobody, "CapEff"), "0000000000001400");
    assert_eq!(proc_status(nobody, "CapPrm"), "0000000000001400");
    assert_eq!(proc_status(nobody, "CapAmb"), "0000000000001400");
    assert_eq!(proc_status(nobody, "CapBnd"), "0000000000001400");
    assert_eq!(proc_status(nobody, "Uid"), "65534\t65534\t65534\t65534");
    assert!(proc_status(nobody, "Gid").starts_with("65534\t"));
    let root = pid("capped-root");
    assert_eq!(proc_status(root, "CapEff"), "0000000000002000");
    assert_eq!(proc_status(root, "CapBnd"), "0000000000002000");
    assert!(proc_status(root, "Uid").starts_with("0\t"));
    assert_eq!(proc_status(pid("nocaps"), "CapEff"), "0000000000000000");
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_user_backs_off_instead_of_running_as_root() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sup = supervisor(dir.path());
    let mut s = ServiceSpec::new("ghost", vec!["/bin/sleep".into(), "30".into()]);
    s.user = Some("no-such-user-meduza".into());
    sup.apply(vec![s], &BTreeSet::new()).await.expect("apply");
    let st = &sup.status()[0];
    assert_eq!(st.state, ServiceState::Backoff);
    assert!(st.pid.is_none());
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_is_only_the_specs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("env");
    let mut s = sh("envy", &format!("env > {}; exec sleep 30", out.display()));
    s.env.insert("FOO".into(), "bar baz".into());
    // The supervisor's own environment (etcd credentials) must not reach children.
    std::env::set_var("ETCD_PASS", "secret");
    let sup = supervisor(dir.path());
    sup.apply(vec![s], &BTreeSet::new()).await.expect("apply");
    wait_state(&sup, "envy", ServiceState::Running, Duration::from_secs(5)).await;
    let env = std::fs::read_to_string(&out).expect("env file");
    assert!(env.lines().any(|l| l == "FOO=bar baz"), "{env}");
    assert!(!env.contains("ETCD_PASS"), "{env}");
    sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_health_check_restarts_once_then_cooldown() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A port nothing listens on: bind, note, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut s = ServiceSpec::new("tunnel-x", vec!["/bin/sleep".into(), "60".into()]);
    s.health = Some(HealthSpec {
        probe: Probe::Tcp {
            addr: format!("127.0.0.1:{port}"),
        },
        interval_secs: 1,
        attempts: 3,
        retry_delay_secs: 0,
        grace_secs: 1,
        timeout_secs: 1,
    });
    s.protection = RestartProtection {
        cooldown_secs: 120,
        max_per_hour: 5,
    };
    let sup = supervisor(dir.path());
    let mut events = sup.subscribe();
    sup.apply(vec![s], &BTreeSet::new()).await.expect("apply");
    let first = sup.status()[0].pid.expect("pid");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let restarts: Vec<RestartSource> = drain(&mut events)
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::Restarted { source } => Some(source),
            _ => None,
        })
        .collect();
    // One health restart; later failures fall inside the 120 s cooldown.
    assert_eq!(restarts, [RestartSource::Health]);
    let st = &sup.status()[0];
    assert_ne!(st.pid, Some(first));
    assert_eq!(st.restarts_last_hour, 1);
    let state = std::fs::read_to_string(dir.path().join("restart/tunnel-x.state")).expect("state");
    assert!(state.trim_end().ends_with(" health"), "{state}");
    sup.shutdown().await;
}
