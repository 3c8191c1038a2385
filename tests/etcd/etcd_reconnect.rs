//! A gentle fleet (issue 13 item 3): 100 gateways' etcd clients against one real
//! 3-member cluster; the whole cluster stopped for 30 s and started again. Measures,
//! with the shared `Backoff`'s equal jitter and without jitter:
//! * the peak request rate at etcd in the first seconds after the restart (the sum over
//!   the members of `grpc_server_started_total`, sampled every 250 ms, as requests per
//!   second over a sliding 1 s window);
//! * the time from the restart until all 100 have published `applied` for the newest
//!   `/commit`, written as soon as the cluster has a leader again.
//!
//! Each gateway is what `meduza run` does with etcd, in one process: its own
//! [`EtcdKv`] over all three members, the resilient watch on `/commit` and
//! `/dns/hosts/`, the status publisher with its `online` lease, and on every commit a
//! snapshot read of its keys followed by `applied`. Figures are printed as `FIGURE`
//! lines (docs/benchmarks.md); the test asserts that every gateway converges, with and
//! without jitter, and leaves the comparison to the figures.

use meduza_test_support::etcd_cluster;

use etcd_cluster::Cluster;
use meduza::backoff::{Backoff, Jitter};
use meduza::etcd::status::PublisherConfig;
use meduza::etcd::{
    spawn_watcher, EtcdConfig, EtcdKv, Kv, StatusPublisher, WatchEvent, WatcherConfig,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

const GATEWAYS: usize = 100;
const OUTAGE: Duration = Duration::from_secs(30);

/// Requests started on every live member so far.
fn requests_started(cluster: &Cluster) -> u64 {
    (0..cluster.len())
        .filter_map(|i| cluster.metrics(i))
        .flat_map(|text| {
            text.lines()
                .filter(|l| l.starts_with("grpc_server_started_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .collect::<Vec<_>>()
        })
        .sum::<f64>() as u64
}

/// One gateway's etcd side, until the task is aborted.
async fn gateway(id: String, endpoints: String, jitter: Jitter) {
    let config = EtcdConfig::build(&endpoints, None, None, None, None, None).expect("config");
    let kv: Arc<dyn Kv> = Arc::new(EtcdKv::new(config));
    let publisher = StatusPublisher::spawn(
        Arc::clone(&kv),
        &id,
        PublisherConfig {
            jitter,
            ..PublisherConfig::default()
        },
    );
    let (_watcher, mut events) = spawn_watcher(
        Arc::clone(&kv),
        WatcherConfig {
            jitter,
            ..WatcherConfig::for_members(3)
        },
        0,
    );
    let prefix = format!("/nodes/{id}/");
    // The reconciler's snapshot retry (`reconcile::retry_backoff`): 1 s → 30 s.
    let mut retry = Backoff::new(Duration::from_secs(1), Duration::from_secs(30), jitter);
    while let Some(ev) = events.recv().await {
        let revision = match ev {
            WatchEvent::Commit { revision, .. } | WatchEvent::Resync { revision, .. } => revision,
            WatchEvent::Hosts { .. } | WatchEvent::Tick => continue,
        };
        loop {
            match kv.get_prefix(&prefix).await {
                Ok(_) => break,
                Err(_) => tokio::time::sleep(retry.next()).await,
            }
        }
        retry.reset();
        let commit = kv.get("/commit").await.ok().flatten();
        let applied = commit.map(|c| c.mod_revision).unwrap_or(revision);
        publisher.set_applied(applied);
    }
}

struct Figures {
    peak_rps: u64,
    converged: Duration,
}

/// One storm: start the fleet, stop the cluster for [`OUTAGE`], start it, commit.
fn storm(jitter: Jitter) -> Figures {
    let mut cluster = Cluster::start(3);
    // A runtime of its own threads: the fleet runs while the test thread sleeps.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let endpoints = cluster.endpoints();
    let tasks: Vec<_> = (0..GATEWAYS)
        .map(|i| rt.spawn(gateway(format!("gw{i:03}"), endpoints.clone(), jitter)))
        .collect();
    // One prefix read per check, so the test's own reads barely count.
    let applied_everywhere = |rt: &tokio::runtime::Runtime, value: &str| {
        rt.block_on(async {
            let eps: Vec<String> = endpoints.split(',').map(str::to_string).collect();
            let Ok(mut client) = etcd_client::Client::connect(eps, None).await else {
                return false;
            };
            let opts = etcd_client::GetOptions::new().with_prefix();
            let Ok(Ok(resp)) =
                tokio::time::timeout(Duration::from_secs(2), client.get("/updated/", Some(opts)))
                    .await
            else {
                return false;
            };
            let done = resp
                .kvs()
                .iter()
                .filter(|kv| kv.key_str().is_ok_and(|k| k.ends_with("/applied")))
                .filter(|kv| {
                    kv.value_str()
                        .is_ok_and(|v| v.split(' ').next() == Some(value))
                })
                .count();
            done == GATEWAYS
        })
    };
    let first = cluster.put("/commit", "1", Duration::from_secs(10));
    let start = Instant::now();
    while !applied_everywhere(&rt, &first.to_string()) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the fleet never applied the first commit"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    for i in 0..cluster.len() {
        cluster.kill(i);
    }
    std::thread::sleep(OUTAGE);
    let restarted = Instant::now();
    for i in 0..cluster.len() {
        cluster.start_again(i);
    }
    cluster.wait_leader(Duration::from_secs(20));
    let leader_at = restarted.elapsed();
    let newest = cluster.put("/commit", "2", Duration::from_secs(10));
    println!(
        "storm {jitter:?}: members started and a leader after {leader_at:?}, /commit written after {:?}",
        restarted.elapsed()
    );

    // Sample the request counters while waiting for convergence.
    let mut samples: Vec<(Instant, u64)> = Vec::new();
    let mut converged = None;
    while restarted.elapsed() < Duration::from_secs(120) {
        samples.push((Instant::now(), requests_started(&cluster)));
        if converged.is_none()
            && samples.len() % 8 == 0
            && applied_everywhere(&rt, &newest.to_string())
        {
            converged = Some(restarted.elapsed());
        }
        if converged.is_some() && restarted.elapsed() > Duration::from_secs(15) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let converged = converged.unwrap_or_else(|| {
        panic!("not every gateway applied the newest commit within 120 s ({jitter:?})")
    });
    // Peak over any 1 s window (4 samples apart).
    let peak_rps = samples
        .windows(5)
        .map(|w| {
            let (t0, c0) = w[0];
            let (t1, c1) = w[4];
            (c1.saturating_sub(c0) as f64 / (t1 - t0).as_secs_f64()) as u64
        })
        .max()
        .unwrap_or(0);
    for t in tasks {
        t.abort();
    }
    drop(rt);
    Figures {
        peak_rps,
        converged,
    }
}

#[test]
fn fleet_reconnects_gently_after_a_cluster_outage() {
    for (name, jitter) in [("jitter", Jitter::Equal), ("no_jitter", Jitter::None)] {
        let f = storm(jitter);
        println!("FIGURE reconnect_{name}_peak_requests_per_s={}", f.peak_rps);
        println!(
            "FIGURE reconnect_{name}_restart_to_all_applied_ms={:.0}",
            f.converged.as_secs_f64() * 1000.0
        );
    }
}
