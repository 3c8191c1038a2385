//! The supervisor against the fake spawner, under tokio's paused clock: apply
//! (dependency order, only changed children touched, reload strategies), shutdown
//! order, exit backoff, the persisted restart budget, health restarts.

use futures::future::BoxFuture;
use meduza::supervise::spawn::FakeCall;
use meduza::supervise::{
    Decision, EventKind, ExitInfo, FakeClock, FakeSpawner, FrrReloader, Op, RestartSource,
    ServiceEvent, ServiceState, Supervisor, SupervisorConfig,
};
use meduza_generators::plan::service::{HealthSpec, Probe, ReloadStrategy, ServiceSpec};
use nix::sys::signal::Signal;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;

const T0: u64 = 1_800_000_000;

fn spec(name: &str, after: &[&str]) -> ServiceSpec {
    let mut s = ServiceSpec::new(name, vec![format!("/usr/bin/{name}")]);
    s.after = after.iter().map(|a| a.to_string()).collect();
    s
}

fn supervisor(fake: &FakeSpawner, dir: &std::path::Path) -> Supervisor {
    supervisor_at(fake, dir, T0)
}

fn supervisor_at(fake: &FakeSpawner, dir: &std::path::Path, base: u64) -> Supervisor {
    let mut config = SupervisorConfig::new(dir);
    config.stop_timeout = Duration::from_secs(10);
    Supervisor::new(
        Arc::new(fake.clone()),
        Arc::new(FakeClock::new(base)),
        config,
    )
}

fn none() -> BTreeSet<String> {
    BTreeSet::new()
}

#[derive(Default)]
struct RecordingFrr {
    calls: Mutex<Vec<(String, Vec<String>)>>,
    fail: bool,
}

impl FrrReloader for RecordingFrr {
    fn reload<'a>(
        &'a self,
        spec: &'a ServiceSpec,
        files: &'a [String],
    ) -> BoxFuture<'a, Result<(), String>> {
        self.calls
            .lock()
            .expect("lock")
            .push((spec.name.clone(), files.to_vec()));
        let fail = self.fail;
        Box::pin(async move {
            if fail {
                Err("frr-reload.py exited 1".into())
            } else {
                Ok(())
            }
        })
    }
}

async fn next_started(
    rx: &mut broadcast::Receiver<ServiceEvent>,
    name: &str,
) -> tokio::time::Instant {
    loop {
        let ev = rx.recv().await.expect("event");
        if ev.name == name && matches!(ev.kind, EventKind::Started { .. }) {
            return tokio::time::Instant::now();
        }
    }
}

async fn next_exited(rx: &mut broadcast::Receiver<ServiceEvent>, name: &str) -> ExitInfo {
    loop {
        let ev = rx.recv().await.expect("event");
        if let (true, EventKind::Exited { status, .. }) = (ev.name == name, ev.kind) {
            return status;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn dependencies_order_startup_and_shutdown_is_reversed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeSpawner::new();
    let sup = supervisor(&fake, dir.path());
    let desired = vec![
        spec("mosdns", &["mihomo"]),
        spec("mihomo", &[]),
        spec("frr", &[]),
        spec("tinc", &["frr"]),
    ];
    sup.apply(desired, &none()).await.expect("apply");
    assert_eq!(fake.spawned(), ["mihomo", "mosdns", "frr", "tinc"]);

    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = sup.status();
    assert_eq!(status.len(), 4);
    assert!(
        status.iter().all(|s| s.state == ServiceState::Running),
        "{status:?}"
    );
    // As the daemon publishes it (etcd::status owns the format).
    let published = meduza::etcd::status::StatusUpdate::Service {
        name: status[0].name.clone(),
        state: status[0].state.to_string(),
        since: status[0].since,
    };
    assert_eq!(published.value(), format!("running {}", status[0].since));

    sup.shutdown().await;
    assert_eq!(
        fake.signalled(Signal::SIGTERM),
        ["tinc", "frr", "mosdns", "mihomo"]
    );
    assert!(sup
        .status()
        .iter()
        .all(|s| s.state == ServiceState::Stopped));
}

#[tokio::test(start_paused = true)]
async fn only_changed_children_are_touched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeSpawner::new();
    let frr_reloader = Arc::new(RecordingFrr::default());
    let sup = supervisor(&fake, dir.path()).with_frr_reloader(frr_reloader.clone());

    let mut ovpn_a = spec("openvpn-a", &[]);
    ovpn_a.config_files = vec!["/etc/openvpn/a.conf".into()];
    let mut ovpn_b = spec("openvpn-b", &[]);
    ovpn_b.config_files = vec!["/etc/openvpn/b.conf".into()];
    let mut mihomo = spec("mihomo", &[]);
    mihomo.reload = ReloadStrategy::Sighup;
    mihomo.config_files = vec!["/etc/mihomo/config.yaml".into()];
    let mut frr = spec("frr", &[]);
    frr.reload = ReloadStrategy::FrrReload;
    frr.config_files = vec!["/etc/frr/frr.conf".into()];
    let base = vec![ovpn_a.clone(), ovpn_b.clone(), mihomo.clone(), frr.clone()];
    sup.apply(base.clone(), &none()).await.expect("apply");
    let pid_b = fake.pid_of("openvpn-b").expect("b runs");
    fake.clear_calls();

    // Same list, nothing changed: nothing happens.
    let ops = sup.apply(base.clone(), &none()).await.expect("apply");
    assert!(ops.is_empty());
    assert!(fake.calls().is_empty());

    // a's config changed: only a restarts; mihomo gets SIGHUP; frr is reloaded.
    let changed: BTreeSet<String> = [
        "/etc/openvpn/a.conf",
        "/etc/mihomo/config.yaml",
        "/etc/frr/frr.conf",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    sup.apply(base.clone(), &changed).await.expect("apply");
    assert_eq!(fake.spawned(), ["openvpn-a"]);
    assert_eq!(fake.signalled(Signal::SIGTERM), ["openvpn-a"]);
    assert_eq!(fake.signalled(Signal::SIGHUP), ["mihomo"]);
    assert_eq!(
        *frr_reloader.calls.lock().expect("lock"),
        vec![("frr".to_string(), vec!["/etc/frr/frr.conf".to_string()])]
    );
    assert_eq!(fake.pid_of("openvpn-b"), Some(pid_b));
    fake.clear_calls();

    // A new instance appears and b disappears: a, mihomo, frr untouched.
    let ovpn_c = spec("openvpn-c", &[]);
    let ops = sup
        .apply(
            vec![ovpn_a.clone(), mihomo.clone(), frr.clone(), ovpn_c],
            &none(),
        )
        .await
        .expect("apply");
    assert_eq!(
        ops,
        vec![Op::Stop("openvpn-b".into()), Op::Start("openvpn-c".into())]
    );
    assert_eq!(fake.spawned(), ["openvpn-c"]);
    assert_eq!(fake.signalled(Signal::SIGTERM), ["openvpn-b"]);
    assert!(sup.status().iter().all(|s| s.name != "openvpn-b"));
    fake.clear_calls();

    // argv changed: the process is replaced with the new argv.
    let mut ovpn_a2 = ovpn_a.clone();
    ovpn_a2.argv.push("--verb".into());
    sup.apply(vec![ovpn_a2, mihomo, frr, spec("openvpn-c", &[])], &none())
        .await
        .expect("apply");
    assert_eq!(fake.spawned(), ["openvpn-a"]);
    let pid = fake.pid_of("openvpn-a").expect("a runs");
    assert_eq!(
        fake.spec_of(pid).expect("spec").argv,
        ["/usr/bin/openvpn-a", "--verb"]
    );
    sup.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn failed_frr_reload_falls_back_to_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeSpawner::new();
    let reloader = Arc::new(RecordingFrr {
        fail: true,
        ..Default::default()
    });
    let sup = supervisor(&fake, dir.path()).with_frr_reloader(reloader);
    let mut frr = spec("frr", &[]);
    frr.reload = ReloadStrategy::FrrReload;
    frr.config_files = vec!["/etc/frr/frr.conf".into()];
    sup.apply(vec![frr.clone()], &none()).await.expect("apply");
    let changed: BTreeSet<String> = ["/etc/frr/frr.conf".to_string()].into();
    sup.apply(vec![frr], &changed).await.expect("apply");
    assert_eq!(fake.spawned(), ["frr", "frr"]);
    sup.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn exits_back_off_exponentially_and_never_give_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeSpawner::new();
    let sup = supervisor(&fake, dir.path());
    let mut events = sup.subscribe();
    sup.apply(vec![spec("crashy", &[])], &none())
        .await
        .expect("apply");
    let mut last = next_started(&mut events, "crashy").await;
    let mut gaps = Vec::new();
    for _ in 0..9 {
        assert!(fake.exit("crashy", ExitInfo::Code(1)));
        next_exited(&mut events, "crashy").await;
        let st = sup.status();
        assert_eq!(st[0].state, ServiceState::Backoff);
        assert_eq!(st[0].last_exit, Some(ExitInfo::Code(1)));
        let now = next_started(&mut events, "crashy").await;
        gaps.push((now - last).as_secs());
        last = now;
    }
    assert_eq!(gaps, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    // Up for a minute: the next exit restarts after 1 s again.
    tokio::time::sleep(Duration::from_secs(61)).await;
    let before = tokio::time::Instant::now();
    assert!(fake.exit("crashy", ExitInfo::Signal(11)));
    let now = next_started(&mut events, "crashy").await;
    assert_eq!((now - before).as_secs(), 1);
    // Exit restarts are recorded with source `exit`.
    let text = std::fs::read_to_string(dir.path().join("restart/crashy.state")).expect("state");
    assert!(text.lines().all(|l| l.ends_with(" exit")), "{text}");
    sup.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn spawn_failure_backs_off_until_the_program_appears() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeSpawner::new();
    fake.fail_spawn("missing", true);
    let sup = supervisor(&fake, dir.path());
    sup.apply(vec![spec("missing", &[])], &none())
        .await
        .expect("apply");
    assert_eq!(sup.status()[0].state, ServiceState::Backoff);
    fake.fail_spawn("missing", false);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sup.status()[0].state, ServiceState::Running);
    sup.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn budget_is_enforced_and_survives_a_new_supervisor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeSpawner::new();
    let start = tokio::time::Instant::now();
    let sup = supervisor(&fake, dir.path());
    sup.apply(vec![spec("tun", &[])], &none())
        .await
        .expect("apply");
    let mut decisions = Vec::new();
    for _ in 0..6 {
        decisions.push(
            sup.restart("tun", RestartSource::Cron)
                .await
                .expect("restart"),
        );
        // Just inside the cooldown, then just past it.
        tokio::time::sleep(Duration::from_secs(119)).await;
        let skipped = sup
            .restart("tun", RestartSource::Health)
            .await
            .expect("restart");
        assert!(
            matches!(
                skipped,
                Some(Decision::Skipped { .. }) | Some(Decision::Denied { .. })
            ),
            "{skipped:?}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let allowed = decisions
        .iter()
        .filter(|d| matches!(d, Some(Decision::Restart { .. })))
        .count();
    assert_eq!(allowed, 5, "{decisions:?}");
    assert_eq!(
        decisions[5].expect("decision").to_string(),
        "Restart DENIED: limit reached (5/5 per hour)"
    );
    let st = &sup.status()[0];
    assert_eq!(st.state, ServiceState::Fatal);
    assert_eq!(st.restarts_last_hour, 5);
    // Fatal stops automatic restarts, not the process.
    assert!(fake.pid_of("tun").is_some());
    // A manual restart is still allowed.
    assert!(matches!(
        sup.restart("tun", RestartSource::Manual)
            .await
            .expect("restart"),
        Some(Decision::Restart { .. })
    ));
    sup.shutdown().await;

    // "meduza restarts": a new supervisor over the same state dir keeps the budget.
    let fake2 = FakeSpawner::new();
    let sup2 = supervisor_at(&fake2, dir.path(), T0 + start.elapsed().as_secs());
    sup2.apply(vec![spec("tun", &[])], &none())
        .await
        .expect("apply");
    tokio::time::sleep(Duration::from_secs(200)).await;
    let d = sup2
        .restart("tun", RestartSource::Cron)
        .await
        .expect("restart");
    assert!(
        matches!(
            d,
            Some(Decision::Denied {
                count: 5,
                max: 5,
                ..
            })
        ),
        "{d:?}"
    );
    let text = std::fs::read_to_string(dir.path().join("restart/tun.state")).expect("state");
    assert_eq!(text.lines().filter(|l| l.ends_with(" cron")).count(), 5);
    assert_eq!(text.lines().filter(|l| l.ends_with(" manual")).count(), 1);
    sup2.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn sigkill_after_stop_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeSpawner::new();
    fake.ignore_sigterm("stubborn");
    let sup = supervisor(&fake, dir.path());
    sup.apply(vec![spec("stubborn", &[])], &none())
        .await
        .expect("apply");
    let start = tokio::time::Instant::now();
    sup.shutdown().await;
    assert_eq!(start.elapsed().as_secs(), 10);
    let signals: Vec<Signal> = fake
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            FakeCall::Signal { signal, .. } => Some(signal),
            FakeCall::Spawn { .. } => None,
        })
        .collect();
    assert_eq!(signals, [Signal::SIGTERM, Signal::SIGKILL]);
}

#[tokio::test(start_paused = true)]
async fn log_scan_failure_restarts_through_the_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeSpawner::new();
    let sup = supervisor(&fake, dir.path());
    let mut events = sup.subscribe();
    let mut s = spec("paqet-server", &[]);
    s.health = Some(HealthSpec::with_defaults(
        Probe::LogScan {
            pattern: "connection error".into(),
            lines: 50,
        },
        60,
    ));
    sup.apply(vec![s], &none()).await.expect("apply");
    let first = fake.pid_of("paqet-server").expect("runs");
    // Healthy for a few intervals.
    tokio::time::sleep(Duration::from_secs(200)).await;
    assert_eq!(fake.pid_of("paqet-server"), Some(first));
    fake.print("paqet-server", "2025/02/14 Connection ERROR: reset by peer");
    // Next probe at 240 s: 3 attempts 5 s apart, then a health restart.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let second = fake.pid_of("paqet-server").expect("runs");
    assert_ne!(second, first);
    let mut restarted = Vec::new();
    while let Ok(ev) = events.try_recv() {
        if let EventKind::Restarted { source } = ev.kind {
            restarted.push(source);
        }
    }
    assert_eq!(restarted, [RestartSource::Health]);
    // The new process prints the same error: the next failure is within the cooldown.
    fake.print("paqet-server", "connection error again");
    tokio::time::sleep(Duration::from_secs(70)).await;
    assert_eq!(fake.pid_of("paqet-server"), Some(second));
    // After the cooldown the next failure restarts again.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_ne!(fake.pid_of("paqet-server"), Some(second));
    let text =
        std::fs::read_to_string(dir.path().join("restart/paqet-server.state")).expect("state");
    assert_eq!(text.lines().filter(|l| l.ends_with(" health")).count(), 2);
    sup.shutdown().await;
}
