//! The crash monitor driving a recording TPROXY gate against the real mihomo v1.19.2
//! on loopback (`tests/support/src/real_mihomo.rs`), with a second real mihomo as the proxy
//! node and this test playing the supervisor (it spawns mihomo and reports exits).
//! Faults are the real program's: `kill -9`, SIGSTOP (the API stalls), a url-test group
//! whose only member is `REJECT` (a hot reload), a proxy provider that is not loaded
//! (`COMPATIBLE`) and a dead node found by a delay test. Measures kill -9 → remove, API
//! stall → remove, healthy → apply, node dead → remove (docs/benchmarks-clash.md).

use meduza_test_support::doubles;

use doubles::Origin;
use meduza::clash::liveness::{self, LivenessConfig};
use meduza::clash::monitor::{
    ClashHealthSink, ClashMonitor, GateError, HealthStatus, MonitorConfig, MonitorHandle, Phase,
    ProcessEvent, TproxyGate,
};
use meduza_test_support::real_mihomo::{subscription, Members, Node, RealMihomo};
use nix::sys::signal::Signal;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The delay-test URL: the origin answers 204 there, reached through the node.
const GEN_204: &str = "/generate_204";

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
        // The line the daemon publishes as `clash/health`.
        let _ = self
            .0
            .send(meduza::daemon::clash::health_line(status, 0).value());
    }
    fn tproxy(&self, applied: bool, reason: &str) {
        let _ = self.0.send(format!("tproxy {applied} {reason}"));
    }
}

struct Rig {
    origin: Origin,
    node: Node,
    m: RealMihomo,
    gate_rx: mpsc::UnboundedReceiver<(Gate, Instant)>,
    sink_rx: mpsc::UnboundedReceiver<String>,
    events: mpsc::Sender<ProcessEvent>,
    handle: MonitorHandle,
}

/// What `PROXY` starts with.
enum Start {
    Node,
    RejectOnly,
    /// An HTTP provider at the origin's `/sub.yaml` (404 until the test serves it).
    Provider,
}

impl Rig {
    async fn start(cfg: MonitorConfig, start: Start) -> Self {
        let origin = Origin::start().await;
        origin.route_204(GEN_204);
        let node = Node::start().await;
        let members = match start {
            Start::Node => node.members(),
            Start::RejectOnly => Members::RejectOnly,
            Start::Provider => Members::Provider(origin.url("/sub.yaml")),
        };
        let m = RealMihomo::start(&members, &origin.url(GEN_204)).await;
        let (gtx, gate_rx) = mpsc::unbounded_channel();
        let (stx, sink_rx) = mpsc::unbounded_channel();
        let (events, erx) = mpsc::channel(8);
        let (monitor, handle) =
            ClashMonitor::new(cfg, m.api(), RecGate(gtx), RecSink(stx), erx, true);
        tokio::spawn(monitor.run());
        let mut rig = Self {
            origin,
            node,
            m,
            gate_rx,
            sink_rx,
            events,
            handle,
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

    /// Restarts mihomo with its last configuration, as the supervisor would.
    async fn respawn(&mut self) {
        self.m.spawn().await;
        self.events
            .send(ProcessEvent::Started { pid: self.m.pid })
            .await
            .expect("send");
        self.supervise();
    }

    /// meduza's liveness rounds (`clash/health/probe_interval` = `every`,
    /// `clash/health/timeout` = `timeout`), as `meduza run` starts them beside the
    /// monitor.
    fn liveness(&self, every: Duration, timeout: Duration) {
        let cfg = LivenessConfig {
            test_url: self.origin.url(GEN_204),
            every,
            timeout,
        };
        tokio::spawn(liveness::run(self.m.api(), cfg));
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

    /// kill -9 of the running mihomo; returns when the signal was sent.
    fn kill9_current(&self) -> Instant {
        let t = Instant::now();
        self.m.signal(Signal::SIGKILL);
        t
    }

    /// `PROXY` on the node (a hot reload).
    async fn healthy(&self) {
        self.m.apply(&self.node.members()).await;
    }
}

/// A random 0–500 ms pause, so an event starts at a random point of the probe cycle.
async fn random_phase() {
    tokio::time::sleep(Duration::from_millis(rand::random_range(0..500))).await;
}

#[tokio::test]
async fn crash_stall_and_recovery_with_default_timings() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let mut rig = Rig::start(MonitorConfig::default(), Start::RejectOnly).await;
    rig.handle.arm().await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    rig.no_gate_call();
    let st = rig.statuses();
    assert!(
        st.iter().any(|s| s
            .starts_with("waiting 0 every URLTest group is down: PROXY=REJECT (rejects)")),
        "{st:?}"
    );
    assert_eq!(rig.handle.health().borrow().phase, Phase::Waiting);

    // Healthy (the group reloaded onto the node) → applied.
    let t = Instant::now();
    rig.healthy().await;
    let (g, at) = rig.next_gate(Duration::from_secs(2)).await;
    assert_eq!(g, Gate::Apply);
    let healthy_to_apply = at - t;
    assert!(
        healthy_to_apply < Duration::from_secs(1),
        "{healthy_to_apply:?}"
    );

    // API stall (SIGSTOP) → removed.
    let t = Instant::now();
    rig.m.signal(Signal::SIGSTOP);
    let (g, at) = rig.next_gate(Duration::from_secs(3)).await;
    assert_eq!(g, Gate::Remove);
    let stall_to_remove = at - t;
    assert!(
        stall_to_remove < Duration::from_secs(2),
        "{stall_to_remove:?}"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await; // past the 1-2 s hold-down
    rig.no_gate_call();
    let st = rig.statuses();
    assert!(
        st.iter()
            .any(|s| s.starts_with("unhealthy 0 mihomo API") && s.contains("no answer within")),
        "{st:?}"
    );

    // Recovered (SIGCONT) → re-applied.
    let t = Instant::now();
    rig.m.signal(Signal::SIGCONT);
    let (g, at) = rig.next_gate(Duration::from_secs(3)).await;
    assert_eq!(g, Gate::Apply);
    let recovered_to_apply = at - t;

    // Every group REJECT while applied (a hot reload) → removed.
    rig.m.apply(&Members::RejectOnly).await;
    let (g, _) = rig.next_gate(Duration::from_secs(2)).await;
    assert_eq!(g, Gate::Remove);
    let st = rig.statuses();
    assert!(
        st.iter()
            .any(|s| s
                .starts_with("unhealthy 0 every URLTest group is down: PROXY=REJECT (rejects)")),
        "{st:?}"
    );
    rig.healthy().await;
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
    let mut rig = Rig::start(cfg, Start::Node).await;
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
        random_phase().await;
        let t = Instant::now();
        rig.m.signal(Signal::SIGSTOP);
        let (g, at) = rig.next_gate(Duration::from_secs(3)).await;
        assert_eq!(g, Gate::Remove);
        stall.push(at - t);
        tokio::time::sleep(Duration::from_millis(300 + rand::random_range(0..500))).await;

        let t = Instant::now();
        rig.m.signal(Signal::SIGCONT);
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
    let origin = Origin::start().await;
    origin.route_204(GEN_204);
    let node = Node::start().await;
    let m = RealMihomo::start(&node.members(), &origin.url(GEN_204)).await;
    let (gtx, mut gate_rx) = mpsc::unbounded_channel();
    let (stx, _sink_rx) = mpsc::unbounded_channel();
    let (_events, erx) = mpsc::channel(1);
    let (monitor, handle) = ClashMonitor::new(
        MonitorConfig::default(),
        m.api(),
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
    let t = Instant::now();
    m.signal(Signal::SIGKILL);
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

/// The two ways the real mihomo passes a dead pick off as a live group (docs/clash.md,
/// "What counts as healthy"), with meduza's liveness rounds running as in
/// `meduza run` (`probe_interval` 1 s, `timeout` 1000 ms):
/// 1. the provider is not loaded: `PROXY` holds `COMPATIBLE` (DIRECT, a leak) and
///    TPROXY is never applied, while each round has mihomo fetch it again; once it is
///    served, mihomo replaces `COMPATIBLE` (its url-test pick is cached up to 10 s) and
///    TPROXY is applied;
/// 2. the node dies: `PROXY` keeps `now: node-a` and `alive: true`; the round's delay
///    test marks `node-a` dead and TPROXY is removed within
///    `probe_interval + timeout + 0.5 s`; the node back → re-applied.
#[tokio::test]
async fn compatible_never_applies_and_a_dead_node_is_removed_after_a_delay_test() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let (every, timeout) = (Duration::from_secs(1), Duration::from_millis(1000));
    let mut rig = Rig::start(MonitorConfig::default(), Start::Provider).await;
    rig.liveness(every, timeout);
    rig.handle.arm().await;

    // 1. COMPATIBLE: waiting, never applied, the provider fetched again each round.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    rig.no_gate_call();
    let st = rig.statuses();
    assert!(
        st.iter().any(|s| s.starts_with(
            "waiting 0 every URLTest group is down: PROXY=COMPATIBLE (provider not loaded, traffic would go direct)"
        )),
        "{st:?}"
    );
    assert_eq!(rig.handle.health().borrow().phase, Phase::Waiting);
    let proxies = rig.m.api().proxies().await.expect("GET /proxies");
    assert_eq!(proxies["proxies"]["PROXY"]["now"], "COMPATIBLE");
    assert_eq!(proxies["proxies"]["COMPATIBLE"]["type"], "Compatible");
    // Once at mihomo's start, then again on each round's `PUT /providers/proxies/sub`.
    let fetches = rig.origin.seen_path("/sub.yaml").len();
    assert!(
        fetches >= 2,
        "mihomo fetched the provider {fetches} times: never again after its start"
    );

    // Why COMPATIBLE counts as down: a request through mihomo's mixed port reaches the
    // origin on mihomo's own connection (DIRECT), not through the node.
    rig.origin
        .track_owners(&[("node", rig.node.pid()), ("mihomo", rig.m.pid)]);
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(rig.m.proxy_url()).expect("proxy"))
        .build()
        .expect("client");
    let resp = client
        .get(rig.origin.url("/leak"))
        .send()
        .await
        .expect("a request through the mixed port");
    assert_eq!(resp.status(), 404);
    let leak = rig.origin.seen_path("/leak");
    assert_eq!(leak.len(), 1, "{leak:?}");
    assert_eq!(leak[0].owner.as_deref(), Some("mihomo"), "{leak:?}");

    // The subscription appears: a round has mihomo load it, the group picks the node.
    let t = Instant::now();
    rig.origin.route("/sub.yaml", &subscription(rig.node.port));
    let (g, at) = rig.next_gate(Duration::from_secs(20)).await;
    assert_eq!(g, Gate::Apply);
    let served_to_apply = at - t;
    // The next round (≤ 1 s) + mihomo's cached url-test pick (≤ 10 s) + the probe that
    // sees the node and its confirmation (0.7 s), with 1.3 s for a loaded machine.
    let bound = every + Duration::from_secs(12);
    assert!(
        served_to_apply < bound,
        "provider served -> applied took {served_to_apply:?}, bound {bound:?}"
    );

    // 2. The node dies: mihomo keeps `now` on it; the round's delay test finds it dead.
    random_phase().await;
    let t = Instant::now();
    rig.node.kill().await;
    let (g, at) = rig.next_gate(Duration::from_secs(5)).await;
    assert_eq!(g, Gate::Remove);
    let node_dead_to_remove = at - t;
    let bound = every + timeout + Duration::from_millis(500);
    assert!(
        node_dead_to_remove < bound,
        "node dead -> removed took {node_dead_to_remove:?}, bound {bound:?}"
    );
    let st = rig.statuses();
    assert!(
        st.iter()
            .any(|s| s
                .starts_with("unhealthy 0 every URLTest group is down: PROXY=node-a (not alive)")),
        "{st:?}"
    );
    let proxies = rig.m.api().proxies().await.expect("GET /proxies");
    assert_eq!(proxies["proxies"]["PROXY"]["now"], "node-a");
    assert_eq!(proxies["proxies"]["PROXY"]["alive"], true);
    assert_eq!(proxies["proxies"]["node-a"]["alive"], false);

    // The node back: the round re-tests the group, mihomo marks it alive, re-applied
    // after the hold-down (2 s: removed within 30 s of the application).
    let t = Instant::now();
    rig.node.restart().await;
    let (g, at) = rig.next_gate(Duration::from_secs(10)).await;
    assert_eq!(g, Gate::Apply);
    let node_back_to_apply = at - t;
    eprintln!(
        "real mihomo: provider served->apply {served_to_apply:?}, node dead->remove \
         {node_dead_to_remove:?} (bound {bound:?}), node back->apply {node_back_to_apply:?}"
    );
    rig.handle.shutdown().await;
}
