//! The crash monitor driving a recording TPROXY gate against the mihomo double, with
//! this test playing the supervisor (it spawns the double and reports exits). Measures
//! kill -9 → remove, API stall → remove and healthy → apply (docs/benchmarks-clash.md).

#[path = "doubles/harness.rs"]
mod harness;

use harness::{FakeMihomo, MihomoOpts, SECRET};
use meduza::clash::api::{MihomoApi, PROBE_TIMEOUT};
use meduza::clash::monitor::{
    ClashHealthSink, ClashMonitor, GateError, HealthStatus, MonitorConfig, MonitorHandle, Phase,
    ProcessEvent, TproxyGate,
};
use serde_json::json;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    Apply,
    Remove,
}

struct RecGate(mpsc::UnboundedSender<(Gate, Instant)>);

impl TproxyGate for RecGate {
    async fn apply(&self) -> Result<(), GateError> {
        let _ = self.0.send((Gate::Apply, Instant::now()));
        Ok(())
    }
    async fn remove(&self) -> Result<(), GateError> {
        let _ = self.0.send((Gate::Remove, Instant::now()));
        Ok(())
    }
}

struct RecSink(mpsc::UnboundedSender<String>);

impl ClashHealthSink for RecSink {
    fn health(&self, status: &HealthStatus) {
        let _ = self.0.send(status.render(0));
    }
    fn tproxy(&self, applied: bool, reason: &str) {
        let _ = self.0.send(format!("tproxy {applied} {reason}"));
    }
}

struct Rig {
    m: FakeMihomo,
    gate_rx: mpsc::UnboundedReceiver<(Gate, Instant)>,
    sink_rx: mpsc::UnboundedReceiver<String>,
    events: mpsc::Sender<ProcessEvent>,
    handle: MonitorHandle,
    pid: u32,
}

impl Rig {
    async fn start(cfg: MonitorConfig, control: serde_json::Value) -> Self {
        let m = FakeMihomo::start(MihomoOpts {
            control,
            ..Default::default()
        })
        .await;
        let api = MihomoApi::new(&m.controller, SECRET, PROBE_TIMEOUT).expect("client");
        let (gtx, gate_rx) = mpsc::unbounded_channel();
        let (stx, sink_rx) = mpsc::unbounded_channel();
        let (events, erx) = mpsc::channel(8);
        let (monitor, handle) = ClashMonitor::new(cfg, api, RecGate(gtx), RecSink(stx), erx, true);
        tokio::spawn(monitor.run());
        let pid = m.pid();
        let mut rig = Self {
            m,
            gate_rx,
            sink_rx,
            events,
            handle,
            pid,
        };
        rig.supervise();
        rig
    }

    /// Plays the supervisor: reports the child's exit as a process event.
    fn supervise(&mut self) {
        let mut child = self.m.child.take().expect("child");
        let events = self.events.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let detail = format!("{status:?}");
            let _ = events.send(ProcessEvent::Exited { detail }).await;
        });
    }

    async fn respawn(&mut self) {
        self.m.spawn(Some("127.0.0.2")).await;
        let pid = self.m.pid();
        self.pid = pid;
        self.events
            .send(ProcessEvent::Started { pid })
            .await
            .expect("send");
        self.supervise();
    }

    async fn next_gate(&mut self, within: Duration) -> (Gate, Instant) {
        tokio::time::timeout(within, self.gate_rx.recv())
            .await
            .expect("gate call in time")
            .expect("open")
    }

    fn no_gate_call(&mut self) {
        assert!(self.gate_rx.try_recv().is_err(), "unexpected gate call");
    }

    fn statuses(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(s) = self.sink_rx.try_recv() {
            out.push(s);
        }
        out
    }

    /// kill -9 of the running double; returns when the signal was sent.
    fn kill9_current(&self) -> Instant {
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        let t = Instant::now();
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill");
        t
    }
}

#[tokio::test]
async fn crash_stall_and_recovery_with_default_timings() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let mut rig = Rig::start(MonitorConfig::default(), json!({"reject_all": true})).await;
    rig.handle.arm().await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    rig.no_gate_call();
    let st = rig.statuses();
    assert!(
        st.iter()
            .any(|s| s.starts_with("waiting 0 every URLTest group is down: auto=REJECT")),
        "{st:?}"
    );
    assert_eq!(rig.handle.health().borrow().phase, Phase::Waiting);

    // Healthy → applied.
    let t = Instant::now();
    rig.m.control_now(json!({}));
    let (g, at) = rig.next_gate(Duration::from_secs(2)).await;
    assert_eq!(g, Gate::Apply);
    let healthy_to_apply = at - t;
    assert!(
        healthy_to_apply < Duration::from_secs(1),
        "{healthy_to_apply:?}"
    );

    // API stall → removed.
    let t = Instant::now();
    rig.m.control_now(json!({"stall_api": true}));
    let (g, at) = rig.next_gate(Duration::from_secs(3)).await;
    assert_eq!(g, Gate::Remove);
    let stall_to_remove = at - t;
    assert!(
        stall_to_remove < Duration::from_secs(2),
        "{stall_to_remove:?}"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await; // past the 1-2 s hold-down
    rig.no_gate_call();

    // Recovered → re-applied.
    let t = Instant::now();
    rig.m.control_now(json!({}));
    let (g, at) = rig.next_gate(Duration::from_secs(3)).await;
    assert_eq!(g, Gate::Apply);
    let recovered_to_apply = at - t;

    // Every group REJECT while applied → removed.
    rig.m.control_now(json!({"reject_all": true}));
    let (g, _) = rig.next_gate(Duration::from_secs(2)).await;
    assert_eq!(g, Gate::Remove);
    rig.m.control(json!({})).await;
    let (g, _) = rig.next_gate(Duration::from_secs(10)).await;
    assert_eq!(g, Gate::Apply);

    // kill -9 → removed at once through the supervisor's exit event.
    let t = rig.kill9_current();
    let (g, at) = rig.next_gate(Duration::from_secs(2)).await;
    assert_eq!(g, Gate::Remove);
    let kill_to_remove = at - t;
    assert!(
        kill_to_remove < Duration::from_millis(250),
        "{kill_to_remove:?}"
    );
    let st = rig.statuses();
    assert!(
        st.iter()
            .any(|s| s.starts_with("unhealthy 0 mihomo exited")),
        "{st:?}"
    );

    // Restarted by the supervisor → waiting → healthy → re-applied (after hold-down).
    rig.respawn().await;
    let (g, _) = rig.next_gate(Duration::from_secs(20)).await;
    assert_eq!(g, Gate::Apply);
    let st = rig.statuses();
    assert!(
        st.iter().any(|s| s.starts_with("waiting 0 mihomo started")),
        "{st:?}"
    );
    assert_eq!(
        st.last().map(String::as_str),
        Some("tproxy true mihomo recovered")
    );

    // Shutdown removes TPROXY.
    rig.handle.shutdown().await;
    let (g, _) = rig.next_gate(Duration::from_secs(2)).await;
    assert_eq!(g, Gate::Remove);
    eprintln!(
        "default timings: healthy->apply {healthy_to_apply:?}, stall->remove {stall_to_remove:?}, \
         recovered->apply {recovered_to_apply:?}, kill-9->remove {kill_to_remove:?}"
    );
}

fn summary(name: &str, v: &mut [Duration]) -> Duration {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    eprintln!(
        "BENCH {name}: n={} min={:.1}ms median={:.1}ms max={:.1}ms",
        v.len(),
        ms(v[0]),
        ms(v[v.len() / 2]),
        ms(v[v.len() - 1])
    );
    v[v.len() - 1]
}

/// Repeated measurements. The hold-down is shortened so rounds do not wait for it;
/// the measured paths (exit event, probe timeout, confirmation) use the defaults.
#[tokio::test]
async fn timings_over_repeats() {
    let cfg = MonitorConfig {
        hold_down_base: Duration::from_millis(100),
        hold_down_max: Duration::from_millis(100),
        ..MonitorConfig::default()
    };
    let mut rig = Rig::start(cfg, json!({})).await;
    rig.handle.arm().await;
    let (g, _) = rig.next_gate(Duration::from_secs(3)).await;
    assert_eq!(g, Gate::Apply);
    let rounds = 12;
    let (mut kill, mut stall, mut heal) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = rig.kill9_current();
        let (g, at) = rig.next_gate(Duration::from_secs(2)).await;
        assert_eq!(g, Gate::Remove);
        kill.push(at - t);
        rig.respawn().await;
        let (g, _) = rig.next_gate(Duration::from_secs(5)).await;
        assert_eq!(g, Gate::Apply);

        // A random phase against the 500 ms probe clock, so min/max span the cycle.
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..500))).await;
        let t = Instant::now();
        rig.m.control_now(json!({"stall_api": true}));
        let (g, at) = rig.next_gate(Duration::from_secs(3)).await;
        assert_eq!(g, Gate::Remove);
        stall.push(at - t);
        tokio::time::sleep(Duration::from_millis(300 + rand::random_range(0..500))).await;

        let t = Instant::now();
        rig.m.control_now(json!({}));
        let (g, at) = rig.next_gate(Duration::from_secs(3)).await;
        assert_eq!(g, Gate::Apply);
        heal.push(at - t);
    }
    assert!(summary("kill-9 -> TproxyGate::remove", &mut kill) < Duration::from_millis(250));
    assert!(summary("API stall -> TproxyGate::remove", &mut stall) < Duration::from_secs(2));
    assert!(summary("healthy -> TproxyGate::apply", &mut heal) < Duration::from_secs(1));
}

/// Without process events (the API alone), a dead mihomo is noticed by the next probe.
#[tokio::test]
async fn dead_api_without_process_events() {
    let m = FakeMihomo::start(MihomoOpts::default()).await;
    let api = MihomoApi::new(&m.controller, SECRET, PROBE_TIMEOUT).expect("client");
    let (gtx, mut gate_rx) = mpsc::unbounded_channel();
    let (stx, _sink_rx) = mpsc::unbounded_channel();
    let (_events, erx) = mpsc::channel(1);
    let (monitor, handle) = ClashMonitor::new(
        MonitorConfig::default(),
        api,
        RecGate(gtx),
        RecSink(stx),
        erx,
        true,
    );
    tokio::spawn(monitor.run());
    handle.arm().await;
    let (g, _) = tokio::time::timeout(Duration::from_secs(3), gate_rx.recv())
        .await
        .expect("apply")
        .expect("open");
    assert_eq!(g, Gate::Apply);
    let pid = nix::unistd::Pid::from_raw(m.pid() as i32);
    let t = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill");
    let (g, at) = tokio::time::timeout(Duration::from_secs(2), gate_rx.recv())
        .await
        .expect("remove")
        .expect("open");
    assert_eq!(g, Gate::Remove);
    let took = at - t;
    assert!(took < Duration::from_millis(700), "{took:?}");
    eprintln!("BENCH kill-9 -> remove, API probe only: {took:?}");
    drop(m);
}
