//! The resilient watcher against a real etcd: delivery, restart with replay,
//! compaction while disconnected, a SIGSTOPped (stalled) server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meduza::backoff::Jitter;
use meduza::etcd::{spawn_watcher, EtcdKv, Kv, WatchEvent, Watcher, WatcherConfig};
use meduza_test_support::etcd::{CutProxy, TestEtcd};
use tokio::sync::mpsc::UnboundedReceiver;

fn config() -> WatcherConfig {
    WatcherConfig {
        progress_interval: Duration::from_secs(1),
        stall_timeout: Duration::from_secs(1),
        backoff_min: Duration::from_millis(200),
        backoff_max: Duration::from_secs(1),
        jitter: Jitter::None,
        tick_interval: None,
    }
}

async fn recv(rx: &mut UnboundedReceiver<WatchEvent>, within: Duration) -> WatchEvent {
    tokio::time::timeout(within, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no watch event within {within:?}"))
        .expect("watcher running")
}

/// Collects `/commit` values until `want` were seen; fails on a Resync.
async fn commits(rx: &mut UnboundedReceiver<WatchEvent>, want: usize) -> Vec<(i64, String)> {
    let mut got = Vec::new();
    while got.len() < want {
        match recv(rx, Duration::from_secs(20)).await {
            WatchEvent::Commit {
                revision,
                value: Some(v),
            } => got.push((revision, v)),
            WatchEvent::Resync { reason, .. } => panic!("unexpected resync: {reason}"),
            _ => {}
        }
    }
    got
}

#[tokio::test]
async fn watch_delivers_commits_and_hosts() {
    let etcd = TestEtcd::start();
    let kv: Arc<dyn Kv> = Arc::new(EtcdKv::connect(etcd.config()).await.unwrap());
    let start = kv.put("/commit", "0").await.unwrap();
    let (_w, mut rx) = spawn_watcher(kv.clone(), config(), start);
    let t = Instant::now();
    etcd.put("/commit", "1");
    etcd.put("/dns/hosts/nas", "10.0.0.5\n10.0.0.6");
    etcd.put("/nodes/a/lan", "10.0.0.0/24");
    // `/commit` and `/dns/hosts/` are two watches on one stream: etcd orders events
    // within a watch, not across them, so the two may arrive in either order.
    let (mut commit, mut hosts) = (None, None);
    while commit.is_none() || hosts.is_none() {
        match recv(&mut rx, Duration::from_secs(10)).await {
            WatchEvent::Commit { value, .. } => commit = Some(value),
            WatchEvent::Hosts { changes, .. } => hosts = Some(changes),
            WatchEvent::Resync { reason, .. } => panic!("unexpected resync: {reason}"),
            WatchEvent::Tick => {}
        }
    }
    assert_eq!(commit.flatten().as_deref(), Some("1"));
    let changes = hosts.unwrap_or_default();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].key, "/dns/hosts/nas");
    assert_eq!(changes[0].value, "10.0.0.5\n10.0.0.6");
    eprintln!("etcdctl put x2 -> events delivered in {:?}", t.elapsed());
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "/nodes/ is not watched"
    );
}

#[tokio::test]
async fn restart_mid_watch_replays_without_missing_events() {
    let mut etcd = TestEtcd::start();
    let kv: Arc<dyn Kv> = Arc::new(EtcdKv::connect(etcd.config()).await.unwrap());
    let start = kv.put("/commit", "0").await.unwrap();
    let (_w, mut rx) = spawn_watcher(kv.clone(), config(), start);
    etcd.put("/commit", "1");
    assert_eq!(commits(&mut rx, 1).await[0].1, "1");

    etcd.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    etcd.start_again();
    // Written right after the restart, while the watcher is still reconnecting.
    for i in 2..=6 {
        etcd.put("/commit", &i.to_string());
    }
    let t = Instant::now();
    let got = commits(&mut rx, 5).await;
    eprintln!("resumed after restart in {:?}", t.elapsed());
    let values: Vec<&str> = got.iter().map(|(_, v)| v.as_str()).collect();
    assert_eq!(
        values,
        ["2", "3", "4", "5", "6"],
        "every commit, in order, once"
    );
    assert!(got.windows(2).all(|w| w[1].0 == w[0].0 + 1));

    etcd.put("/commit", "7");
    assert_eq!(commits(&mut rx, 1).await[0].1, "7");
}

/// A watcher that reaches etcd through a proxy the test can cut, past its first
/// commit ("1").
async fn watching_through_a_proxy() -> (TestEtcd, CutProxy, Watcher, UnboundedReceiver<WatchEvent>)
{
    let etcd = TestEtcd::start();
    let proxy = CutProxy::start(etcd.addr()).await;
    let kv: Arc<dyn Kv> = Arc::new(
        EtcdKv::connect(etcd.config_for(&proxy.endpoint("http")))
            .await
            .unwrap(),
    );
    let start = kv.put("/commit", "0").await.unwrap();
    let (w, mut rx) = spawn_watcher(kv, config(), start);
    etcd.put("/commit", "1");
    assert_eq!(commits(&mut rx, 1).await[0].1, "1");
    (etcd, proxy, w, rx)
}

#[tokio::test]
async fn events_while_cut_off_are_replayed() {
    let (etcd, proxy, _w, mut rx) = watching_through_a_proxy().await;

    proxy.set_cut(true);
    // Made while the watcher is disconnected: etcd must replay them on resume.
    etcd.put("/commit", "2");
    etcd.put("/dns/hosts/a", "10.0.0.1");
    etcd.put("/commit", "3");
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.set_cut(false);

    let mut commit_values = Vec::new();
    let mut hosts = Vec::new();
    while commit_values.len() < 2 || hosts.is_empty() {
        match recv(&mut rx, Duration::from_secs(20)).await {
            WatchEvent::Commit { value: Some(v), .. } => commit_values.push(v),
            WatchEvent::Hosts { changes, .. } => hosts.extend(changes),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(commit_values, ["2", "3"]);
    assert_eq!(hosts[0].key, "/dns/hosts/a");
}

#[tokio::test]
async fn compaction_while_disconnected_forces_resync() {
    let (etcd, proxy, _w, mut rx) = watching_through_a_proxy().await;

    proxy.set_cut(true);
    etcd.put("/commit", "2");
    etcd.put("/other", "x");
    let floor = etcd.revision();
    etcd.compact(floor);
    proxy.set_cut(false);

    let t = Instant::now();
    let (reason, revision) = loop {
        match recv(&mut rx, Duration::from_secs(20)).await {
            WatchEvent::Resync { reason, revision } => break (reason, revision),
            WatchEvent::Commit { value, .. } => {
                panic!("commit {value:?} delivered from a compacted revision")
            }
            _ => {}
        }
    };
    eprintln!("resync after reconnect in {:?}: {reason}", t.elapsed());
    assert!(reason.contains("compacted"), "{reason}");
    assert!(revision >= floor);

    etcd.put("/commit", "3");
    assert_eq!(commits(&mut rx, 1).await[0].1, "3");
}

#[tokio::test]
async fn stalled_server_is_detected_and_watch_recreated() {
    let etcd = TestEtcd::start();
    let kv: Arc<dyn Kv> = Arc::new(EtcdKv::connect(etcd.config()).await.unwrap());
    let start = kv.put("/commit", "0").await.unwrap();
    let (_w, mut rx) = spawn_watcher(kv.clone(), config(), start);
    etcd.put("/commit", "1");
    assert_eq!(commits(&mut rx, 1).await[0].1, "1");

    etcd.pause();
    // Longer than progress interval + stall timeout (2 s): the watcher must notice.
    tokio::time::sleep(Duration::from_secs(4)).await;
    etcd.resume();
    let t = Instant::now();
    let reason = match recv(&mut rx, Duration::from_secs(20)).await {
        WatchEvent::Resync { reason, .. } => reason,
        other => panic!("expected a resync, got {other:?}"),
    };
    eprintln!("stalled watch re-created {:?} after SIGCONT", t.elapsed());
    assert!(reason.contains("stalled"), "{reason}");
    etcd.put("/commit", "2");
    assert_eq!(commits(&mut rx, 1).await[0].1, "2");
}
