//! Orphan reaping as a child subreaper: a supervised child double-forks a grandchild
//! that outlives it; when the grandchild exits it must not stay a zombie, and the
//! reaper must not steal exit statuses of children others wait for. This binary
//! makes the test process itself a subreaper (process-wide), so it has one test.

use meduza::supervise::reaper::{self, zombie_children};
use meduza::supervise::{
    EventKind, ExitInfo, RealSpawner, ServiceState, Supervisor, SupervisorConfig, SystemClock,
};
use meduza_generators::plan::service::ServiceSpec;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn ppid_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    reaper::parse_stat(&stat).map(|(_, ppid)| ppid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_reaped_and_our_statuses_are_not_stolen() {
    reaper::become_subreaper().expect("subreaper");
    let spawner = RealSpawner::new();
    let reaper_task = reaper::spawn(spawner.registry());
    let dir = tempfile::tempdir().expect("tempdir");
    let pidfile = dir.path().join("grandchild");
    let me = std::process::id();

    let sup = Supervisor::new(
        Arc::new(spawner),
        Arc::new(SystemClock),
        SupervisorConfig::new(dir.path()),
    );
    let mut events = sup.subscribe();
    // The middle shell backgrounds a sleeper, records its pid and exits at once, so
    // the sleeper is reparented to us (the nearest subreaper).
    let script = format!(
        "sh -c 'sleep 1.5 & echo $! > {}'; exec sleep 30",
        pidfile.display()
    );
    let parent = ServiceSpec::new("forker", vec!["/bin/sh".into(), "-c".into(), script]);
    let quitter = ServiceSpec::new(
        "quitter",
        vec!["/bin/sh".into(), "-c".into(), "sleep 0.3; exit 7".into()],
    );
    sup.apply(vec![parent, quitter], &BTreeSet::new())
        .await
        .expect("apply");

    let deadline = Instant::now() + Duration::from_secs(5);
    let grandchild: u32 = loop {
        if let Some(pid) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break pid;
        }
        assert!(Instant::now() < deadline, "grandchild never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // While it lives, the orphan is ours.
    let deadline = Instant::now() + Duration::from_secs(1);
    while ppid_of(grandchild) != Some(me) {
        assert!(Instant::now() < deadline, "orphan not reparented to us");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Meanwhile, children that other code waits for keep their statuses.
    for _ in 0..20 {
        let st = tokio::process::Command::new("/bin/sh")
            .args(["-c", "exit 5"])
            .status()
            .await
            .expect("status");
        assert_eq!(st.code(), Some(5));
        let st = std::process::Command::new("/bin/true")
            .status()
            .expect("status");
        assert!(st.success());
    }

    // The orphan exits after 1.5 s and is reaped within ORPHAN_AGE + a scan.
    let deadline = Instant::now() + Duration::from_secs(6);
    while std::path::Path::new(&format!("/proc/{grandchild}")).exists() {
        assert!(
            Instant::now() < deadline,
            "orphan {grandchild} left as a zombie"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(zombie_children(me).is_empty(), "{:?}", zombie_children(me));

    // Our own child's exit status reached the supervisor intact.
    let mut quitter_exit = None;
    while let Ok(ev) = events.try_recv() {
        if let ("quitter", EventKind::Exited { status, .. }) = (ev.name.as_str(), ev.kind) {
            quitter_exit.get_or_insert(status);
        }
    }
    assert_eq!(quitter_exit, Some(ExitInfo::Code(7)));
    let forker = sup
        .status()
        .into_iter()
        .find(|s| s.name == "forker")
        .expect("forker");
    assert_eq!(forker.state, ServiceState::Running);
    sup.shutdown().await;
    reaper_task.abort();
}
