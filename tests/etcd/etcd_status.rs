//! The status publisher against a real etcd: the online lease, change-only writes,
//! and the queue that survives an etcd outage.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meduza::backoff::Jitter;
use meduza::etcd::status::PublisherConfig;
use meduza::etcd::{read_status, EtcdKv, Kv, StatusPublisher};
use meduza_test_support::etcd::TestEtcd;

/// DESIGN's TTL is 15 s; tests use 3 s to stay short (etcd's floor is ~1.5 s).
fn short_ttl() -> PublisherConfig {
    PublisherConfig {
        ttl_secs: 3,
        keep_alive_interval: Duration::from_secs(1),
        retry_min: Duration::from_millis(200),
        retry_max: Duration::from_secs(1),
        jitter: Jitter::None,
    }
}

async fn wait_for<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn value(kv: &dyn Kv, key: &str) -> Option<String> {
    kv.get(key).await.ok().flatten().map(|e| e.value)
}

#[tokio::test]
async fn online_is_kept_alive_and_vanishes_after_the_publisher_dies() {
    let etcd = TestEtcd::start();
    let kv: Arc<dyn Kv> = Arc::new(EtcdKv::connect(etcd.config()).await.unwrap());
    let p = StatusPublisher::spawn(kv.clone(), "gw1", short_ttl());
    p.set_last("boot");
    p.set_errors(&[]);
    p.set_service("mihomo", "running");
    assert!(p.flush().await);
    // Alive well past the TTL thanks to keep-alives.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        value(&*kv, "/updated/gw1/online").await.as_deref(),
        Some("1")
    );
    let st = read_status(&*kv, "gw1").await.unwrap();
    assert!(st.online);
    assert!(st.last.unwrap().ends_with(" boot"));
    assert!(st.services["mihomo"].starts_with("running "));

    let died = Instant::now();
    drop(p); // like a crash: no revoke
    wait_for("online vanishes", Duration::from_secs(8), || async {
        value(&*kv, "/updated/gw1/online").await.is_none()
    })
    .await;
    let gone = died.elapsed();
    eprintln!("online vanished {gone:?} after the publisher died (TTL 3 s)");
    assert!(
        gone >= Duration::from_secs(1),
        "not before the TTL: {gone:?}"
    );
    assert_eq!(
        value(&*kv, "/updated/gw1/errors").await.as_deref(),
        Some("[]"),
        "other status keys stay"
    );
}

#[tokio::test]
async fn unchanged_values_are_not_rewritten() {
    let etcd = TestEtcd::start();
    let kv: Arc<dyn Kv> = Arc::new(EtcdKv::connect(etcd.config()).await.unwrap());
    let p = StatusPublisher::spawn(kv.clone(), "gw1", short_ttl());
    p.set("tproxy", "applied 1 ok");
    assert!(p.flush().await);
    let rev = kv
        .get("/updated/gw1/tproxy")
        .await
        .unwrap()
        .unwrap()
        .mod_revision;
    for _ in 0..5 {
        p.set("tproxy", "applied 1 ok");
    }
    assert!(p.flush().await);
    assert_eq!(
        kv.get("/updated/gw1/tproxy")
            .await
            .unwrap()
            .unwrap()
            .mod_revision,
        rev
    );
    p.shutdown().await;
    assert!(
        value(&*kv, "/updated/gw1/online").await.is_none(),
        "orderly shutdown revokes at once"
    );
}

#[tokio::test]
async fn queue_flushes_after_etcd_comes_back() {
    let mut etcd = TestEtcd::start();
    let kv: Arc<dyn Kv> = Arc::new(EtcdKv::connect(etcd.config()).await.unwrap());
    let p = StatusPublisher::spawn(kv.clone(), "gw1", short_ttl());
    p.set_applied(7);
    assert!(p.flush().await);

    etcd.kill();
    let t = Instant::now();
    p.set("last", "100 first");
    p.set("last", "200 newest");
    p.set_clash_health("unhealthy", "api down");
    assert!(
        t.elapsed() < Duration::from_millis(50),
        "set never blocks, even with etcd down"
    );
    // Down longer than the TTL: the lease may be gone when etcd is back.
    tokio::time::sleep(Duration::from_secs(4)).await;
    etcd.start_again();
    let back = Instant::now();
    wait_for("queue flushed", Duration::from_secs(20), || async {
        value(&*kv, "/updated/gw1/last").await.as_deref() == Some("200 newest")
            && value(&*kv, "/updated/gw1/clash/health")
                .await
                .is_some_and(|v| v.starts_with("unhealthy ") && v.ends_with(" api down"))
            && value(&*kv, "/updated/gw1/online").await.as_deref() == Some("1")
    })
    .await;
    eprintln!("queue flushed {:?} after etcd restart", back.elapsed());
    // online must be on a live lease: still there after another TTL.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        value(&*kv, "/updated/gw1/online").await.as_deref(),
        Some("1")
    );
    assert!(value(&*kv, "/updated/gw1/applied")
        .await
        .is_some_and(|v| v.starts_with("7 ")));
}
