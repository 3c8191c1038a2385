//! A real `meduza run` against a real 3-member etcd cluster (heartbeat 100 ms,
//! election timeout 1 s, `ETCD_ENDPOINTS` naming all three, the data plane off, one
//! generic tunnel child) while members fail: the leader killed (`kill -9`), the
//! member holding the gateway's watch killed, a member frozen (`SIGSTOP`) briefly and
//! for 30 s, a member restarted, a member replaced (removed, a new one added with an
//! empty data dir), and quorum lost (2 of 3 down) and regained.
//!
//! After each failure a `/commit` is written through the surviving members and the
//! time until `/updated/<id>/applied` reports it is measured (polled every 20 ms
//! through a surviving member); `FIGURE` lines print p50 and p99 (the 2 s p99
//! target is a measured figure, docs/benchmarks.md, not a wall-clock assertion: on two
//! shared cores one restart case once took 2.7 s). Asserted: no commit with one member
//! lost waits [`STALL_LIMIT`] or more (the failure this guards against stalled 20 s and
//! longer), every commit applied, `/updated/<id>/online` present in
//! every read while a quorum exists (polled every 100 ms by a thread), the child's
//! pid unchanged throughout, and after the quorum loss the gateway still running its
//! configuration and applying the next commit by itself.
//!
//! A second test drives the client alone: the member its reads go to (found from the
//! members' Range counters) is frozen, then killed; a frozen member may cost one call
//! one attempt timeout, the calls after it nothing. The two tests take a lock so
//! their timings do not disturb each other. About 1.5 minutes together.

use meduza_test_support::etcd_cluster as cluster;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::{percentile, Cluster, Gateway};
use meduza::etcd::{EtcdConfig, EtcdKv, Kv, CLUSTER_ATTEMPT_TIMEOUT};

/// The tests of this file measure latencies: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const NODE: &str = "gw1";
/// A commit → applied this slow with one member lost is a stall: the client waited
/// on a dead member instead of failing over (what issue 13 found: 20 s and more).
const STALL_LIMIT: Duration = Duration::from_secs(10);
/// Give up on one commit after this long: it was missed.
const APPLY_LIMIT: Duration = Duration::from_secs(20);

/// What the `online` poller knows and found.
#[derive(Default)]
struct OnlineLog {
    /// Client URLs of the members the poller may read through.
    live: Vec<String>,
    /// Whether a quorum runs (the poller only judges then).
    quorum: bool,
    /// Reads answered while a quorum ran.
    checked: u64,
    /// Reads that found `online` missing while a quorum ran.
    missing: Vec<String>,
}

/// Polls `/updated/<id>/online` every 100 ms through a live member.
struct OnlinePoller {
    log: Arc<Mutex<OnlineLog>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OnlinePoller {
    fn start(start: Instant) -> Self {
        let log = Arc::new(Mutex::new(OnlineLog::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (log.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let rt = cluster::runtime();
            let key = format!("/updated/{NODE}/online");
            while !s.load(Ordering::SeqCst) {
                let (live, quorum) = {
                    let g = l.lock().unwrap();
                    (g.live.clone(), g.quorum)
                };
                for endpoint in live {
                    let res = rt.block_on(async {
                        let mut c = etcd_client::Client::connect([endpoint.as_str()], None)
                            .await
                            .ok()?;
                        tokio::time::timeout(Duration::from_millis(500), c.get(key.as_str(), None))
                            .await
                            .ok()?
                            .ok()
                    });
                    let Some(resp) = res else { continue };
                    let mut g = l.lock().unwrap();
                    // Judged only if the quorum still ran when the answer came.
                    if quorum && g.quorum {
                        g.checked += 1;
                        if resp.kvs().is_empty() {
                            let at = start.elapsed().as_secs_f64();
                            g.missing.push(format!("{at:.2}s via {endpoint}"));
                        }
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        OnlinePoller {
            log,
            stop,
            thread: Some(thread),
        }
    }

    /// Tells the poller which members it may read through and whether a quorum runs.
    fn set(&self, c: &Cluster, quorum: bool) {
        let mut g = self.log.lock().unwrap();
        g.live = c.live().into_iter().map(|i| c.endpoint(i)).collect();
        g.quorum = quorum;
    }
}

impl Drop for OnlinePoller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The test's state: the cluster, the gateway and the measurements.
struct Bench {
    cluster: Cluster,
    gw: Gateway,
    online: OnlinePoller,
    start: Instant,
    commits: u64,
    /// (case, commit → applied) with one member lost.
    samples: Vec<(&'static str, Duration)>,
}

/// The revision in `/updated/<id>/applied`, read through a live member.
fn applied(c: &Cluster) -> Option<i64> {
    let key = format!("/updated/{NODE}/applied");
    for i in c.live() {
        if let Ok(v) = c.get_on(i, &key, Duration::from_millis(300)) {
            return v?.split_whitespace().next()?.parse().ok();
        }
    }
    None
}

/// Writes `/commit` through a surviving member and waits until the gateway
/// published it as applied; returns how long that took after the write returned.
fn commit_and_measure(c: &Cluster, gw: &Gateway, n: &mut u64, what: &str) -> Duration {
    *n += 1;
    let wrote = Instant::now();
    let rev = c.put("/commit", &format!("round-{n}"), Duration::from_secs(20));
    let t0 = Instant::now();
    let put = t0 - wrote;
    loop {
        if applied(c).is_some_and(|a| a >= rev) {
            break;
        }
        assert!(
            t0.elapsed() < APPLY_LIMIT,
            "{what}: commit {rev} not applied within {APPLY_LIMIT:?} (missed); gateway log:\n{}",
            gw.log_tail(80)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = t0.elapsed();
    eprintln!(
        "round {n:>2} {what:<28} put {:>6.0} ms, commit -> applied {:>6.0} ms (revision {rev}, written at {} UTC)",
        put.as_secs_f64() * 1000.0,
        took.as_secs_f64() * 1000.0,
        utc_time_of(t0)
    );
    took
}

/// `HH:MM:SS.mmm` UTC of an instant, to find a round in the gateway's log.
fn utc_time_of(at: Instant) -> String {
    let now = std::time::SystemTime::now() - at.elapsed();
    let ms = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        ms % 1000
    )
}

impl Bench {
    fn measure(&mut self, case: &'static str) -> Duration {
        let d = commit_and_measure(&self.cluster, &self.gw, &mut self.commits, case);
        self.samples.push((case, d));
        d
    }

    fn heal_and_wait(&mut self) {
        self.cluster.wait_healthy(Duration::from_secs(30));
        self.online.set(&self.cluster, true);
    }

    fn kill(&mut self, i: usize, quorum_after: bool) {
        eprintln!(
            "kill member {i} ({}) at {} UTC",
            self.cluster.endpoint(i),
            utc_time_of(Instant::now())
        );
        self.cluster.kill(i);
        self.online.set(&self.cluster, quorum_after);
    }

    fn start_again(&mut self, i: usize) {
        self.cluster.start_again(i);
    }

    fn pause(&mut self, i: usize) {
        // The poller must stop reading through it first: a read in flight would
        // only time out, but it would not count either way.
        {
            let mut g = self.online.log.lock().unwrap();
            let e = self.cluster.endpoint(i);
            g.live.retain(|x| *x != e);
        }
        eprintln!(
            "freeze member {i} ({}) at {} UTC",
            self.cluster.endpoint(i),
            utc_time_of(Instant::now())
        );
        self.cluster.pause(i);
    }

    fn resume(&mut self, i: usize) {
        self.cluster.resume(i);
    }
}

/// The member `kv`'s reads go to: the one whose Range count grows while it reads.
fn serving_member(c: &Cluster, rt: &tokio::runtime::Runtime, kv: &EtcdKv) -> usize {
    let before: Vec<f64> = (0..c.len())
        .map(|i| c.ranges_served(i).unwrap_or(0.0))
        .collect();
    for _ in 0..20 {
        rt.block_on(kv.get("/probe")).expect("reads work");
    }
    (0..c.len())
        .max_by(|&a, &b| {
            let grew = |i: usize| c.ranges_served(i).unwrap_or(0.0) - before[i];
            grew(a).total_cmp(&grew(b))
        })
        .expect("members")
}

/// `n` reads one after the other; how long each took.
fn timed_reads(rt: &tokio::runtime::Runtime, kv: &EtcdKv, n: usize) -> Vec<Duration> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            rt.block_on(kv.get("/probe"))
                .expect("a read through the others");
            t.elapsed()
        })
        .collect()
}

/// The client alone (no gateway): the member its calls go to is frozen, then killed.
/// A frozen member costs one attempt timeout once (the call that found it), not one
/// per call; a killed one costs nothing (refused at once).
#[test]
fn a_lost_member_costs_one_attempt_timeout_once() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = Cluster::start(3);
    let rt = cluster::runtime();
    let cfg = EtcdConfig::build(&c.endpoints(), None, None, None, None, None).expect("config");
    let kv = EtcdKv::new(cfg);
    rt.block_on(kv.put("/probe", "1")).expect("put");
    let ms = |d: &Duration| d.as_millis();

    // Followers: losing the leader would add an election, which no client can skip.
    let frozen = serving_member(&c, &rt, &kv);
    c.move_leader_off(frozen);
    c.pause(frozen);
    let reads = timed_reads(&rt, &kv, 30);
    c.resume(frozen);
    let slow: Vec<&Duration> = reads
        .iter()
        .filter(|d| **d > Duration::from_millis(300))
        .collect();
    println!(
        "FIGURE etcd_client_frozen_member first_ms={} max_later_ms={} slow_calls={}",
        ms(&reads[0]),
        reads[1..].iter().map(ms).max().unwrap_or(0),
        slow.len()
    );
    assert!(
        slow.len() <= 1 && reads[0] < CLUSTER_ATTEMPT_TIMEOUT + Duration::from_millis(500),
        "a frozen member costs one attempt timeout once: {reads:?}"
    );
    c.wait_healthy(Duration::from_secs(20));

    let killed = serving_member(&c, &rt, &kv);
    c.move_leader_off(killed);
    c.kill(killed);
    let reads = timed_reads(&rt, &kv, 30);
    println!(
        "FIGURE etcd_client_killed_member first_ms={} max_ms={}",
        ms(&reads[0]),
        reads.iter().map(ms).max().unwrap_or(0)
    );
    assert!(
        reads.iter().all(|d| *d < Duration::from_millis(300)),
        "a refused member is skipped at once: {reads:?}"
    );
}

#[test]
fn gateway_rides_out_member_failures_of_a_three_member_cluster() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let start = Instant::now();
    let cluster = Cluster::start(3);
    eprintln!(
        "cluster up in {:.1}s: {}",
        start.elapsed().as_secs_f64(),
        cluster.endpoints()
    );
    // One generic tunnel child with an argument no other process has.
    let arg = format!("{}", 7_000_000 + std::process::id());
    let t = format!("/nodes/{NODE}/tunnels/t1");
    let long = Duration::from_secs(10);
    cluster.put(&format!("{t}/enable"), "true", long);
    cluster.put(&format!("{t}/kind"), "generic", long);
    cluster.put(&format!("{t}/command"), "/bin/sleep", long);
    cluster.put(&format!("{t}/args"), &arg, long);
    let first = cluster.put("/commit", "initial", long);

    let gw = Gateway::start(NODE, &cluster.endpoints(), 5);
    let online = OnlinePoller::start(start);
    let mut b = Bench {
        cluster,
        gw,
        online,
        start,
        commits: 0,
        samples: Vec::new(),
    };
    let t0 = Instant::now();
    while applied(&b.cluster).is_none_or(|a| a < first) {
        assert!(
            t0.elapsed() < APPLY_LIMIT,
            "first commit not applied; gateway log:\n{}",
            b.gw.log_tail(80)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let argv = ["/bin/sleep", arg.as_str()];
    let child = loop {
        match b.gw.children(&argv).as_slice() {
            [pid] => break *pid,
            _ => {
                assert!(t0.elapsed() < APPLY_LIMIT, "the tunnel child did not start");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    while b
        .cluster
        .get(&format!("/updated/{NODE}/online"), long)
        .is_none()
    {
        assert!(t0.elapsed() < APPLY_LIMIT, "online never written");
        std::thread::sleep(Duration::from_millis(50));
    }
    b.online.set(&b.cluster, true);
    eprintln!(
        "gateway applied and online after {:.1}s (child pid {child})",
        start.elapsed().as_secs_f64()
    );
    b.measure("all members up");
    b.samples.clear();

    // 20 rounds, one member lost in each, the kinds interleaved.
    for round in 0..20 {
        match round % 5 {
            0 => {
                let l = b.cluster.wait_leader(long);
                b.kill(l, true);
                b.measure("leader killed");
                b.start_again(l);
            }
            // The watch member as a follower: the commit can be written at once,
            // so the whole time the gateway takes to move its watch is measured.
            1 => {
                let w = b.cluster.wait_watch_member(long);
                b.cluster.move_leader_off(w);
                b.kill(w, true);
                b.measure("watch member killed");
                b.start_again(w);
            }
            2 => {
                let w = b.cluster.wait_watch_member(long);
                b.cluster.move_leader_off(w);
                b.pause(w);
                b.measure("watch member frozen");
                b.resume(w);
            }
            3 => {
                // Restarted: killed and started again at once, the commit made while
                // it comes up (it may be the watch member or the leader).
                let i = round % b.cluster.len();
                b.kill(i, true);
                b.start_again(i);
                b.measure("member restarting");
            }
            _ => {
                let l = b.cluster.wait_leader(long);
                b.pause(l);
                b.measure("leader frozen");
                b.resume(l);
            }
        }
        b.heal_and_wait();
    }

    // The member holding the watch frozen for 30 s, a commit every 3 s meanwhile.
    let w = b.cluster.wait_watch_member(long);
    b.cluster.move_leader_off(w);
    let frozen = Instant::now();
    b.pause(w);
    b.measure("frozen 30 s: first commit");
    while frozen.elapsed() < Duration::from_secs(27) {
        std::thread::sleep(Duration::from_secs(3));
        b.measure("frozen 30 s: later commits");
    }
    while frozen.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    b.resume(w);
    b.heal_and_wait();
    b.measure("after the 30 s freeze");

    // A member replaced: killed, removed, a new one added and started empty.
    let w = b.cluster.wait_watch_member(long);
    {
        let Bench {
            cluster,
            gw,
            commits,
            samples,
            online,
            ..
        } = &mut b;
        online.set(cluster, true);
        let mut step = |c: &Cluster, what: &str| {
            online.set(c, true);
            let case = match what {
                "member killed" => "replace: killed",
                "member removed" => "replace: removed",
                "member added" => "replace: added, not started",
                _ => "replace: new member started",
            };
            samples.push((case, commit_and_measure(c, gw, commits, case)));
        };
        cluster.replace(w, &mut step);
    }
    b.heal_and_wait();

    // Quorum lost: two members down. Nothing can be written; the gateway must keep
    // running what it has and come back by itself.
    let applied_before = applied(&b.cluster).expect("applied readable");
    let l = b.cluster.wait_leader(long);
    let other = (0..3).find(|&i| i != l).expect("another member");
    b.kill(other, false);
    b.kill(l, false);
    std::thread::sleep(Duration::from_secs(8));
    assert!(b.gw.running(), "meduza runs through the quorum loss");
    assert_eq!(
        b.gw.children(&argv),
        [child],
        "the child keeps running through the quorum loss"
    );
    assert!(
        b.gw.dir.path().join("state/last-good.json").is_file(),
        "the last good configuration is kept on disk"
    );
    b.start_again(l);
    b.start_again(other);
    let back = Instant::now();
    b.heal_and_wait();
    let healthy = back.elapsed();
    let resumed = commit_and_measure(&b.cluster, &b.gw, &mut b.commits, "quorum regained");
    assert!(applied(&b.cluster).unwrap_or(0) > applied_before);

    // The verdict.
    let one_lost: Vec<Duration> = b.samples.iter().map(|(_, d)| *d).collect();
    let p50 = percentile(&one_lost, 50.0);
    let p99 = percentile(&one_lost, 99.0);
    let max = one_lost.iter().max().copied().unwrap_or_default();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut cases: Vec<&str> = b.samples.iter().map(|(c, _)| *c).collect();
    cases.dedup();
    cases.sort();
    cases.dedup();
    for case in cases {
        let ds: Vec<Duration> = b
            .samples
            .iter()
            .filter(|(c, _)| *c == case)
            .map(|(_, d)| *d)
            .collect();
        println!(
            "FIGURE etcd_cluster case=\"{case}\" n={} median_ms={:.0} max_ms={:.0}",
            ds.len(),
            ms(percentile(&ds, 50.0)),
            ms(ds.iter().max().copied().unwrap_or_default())
        );
    }
    println!(
        "FIGURE etcd_cluster_commit_to_applied n={} p50_ms={:.0} p99_ms={:.0} max_ms={:.0}",
        one_lost.len(),
        ms(p50),
        ms(p99),
        ms(max)
    );
    println!(
        "FIGURE etcd_cluster_quorum_regained healthy_after_ms={:.0} commit_to_applied_ms={:.0}",
        ms(healthy),
        ms(resumed)
    );
    let (checked, missing) = {
        let g = b.online.log.lock().unwrap();
        (g.checked, g.missing.clone())
    };
    println!(
        "FIGURE etcd_cluster_online_checks n={checked} missing={}",
        missing.len()
    );
    println!(
        "FIGURE etcd_cluster_wall_s={:.0}",
        b.start.elapsed().as_secs_f64()
    );

    assert!(
        max < STALL_LIMIT,
        "a commit stalled: max commit -> applied {max:?} with one member lost \
         (p99 {p99:?}); samples: {:?}",
        b.samples
    );
    assert!(checked > 100, "online was checked ({checked} reads)");
    assert!(
        missing.is_empty(),
        "online missing while a quorum ran: {missing:?}"
    );
    assert!(b.gw.running(), "meduza still runs");
    assert_eq!(
        b.gw.children(&argv),
        [child],
        "the child was never restarted"
    );
}
