//! Authentication (token expiry, token invalidation, restart) and TLS against a real
//! etcd.

use std::sync::Arc;
use std::time::Duration;

use meduza::backoff::Jitter;
use meduza::etcd::{spawn_watcher, EtcdConfig, EtcdKv, Kv, WatchEvent, WatcherConfig};
use meduza_test_support::etcd::{EtcdOptions, TestEtcd};

fn watcher_config() -> WatcherConfig {
    WatcherConfig {
        progress_interval: Duration::from_secs(1),
        stall_timeout: Duration::from_secs(2),
        backoff_min: Duration::from_millis(200),
        backoff_max: Duration::from_secs(1),
        jitter: Jitter::None,
        tick_interval: None,
    }
}

async fn next_commit(rx: &mut tokio::sync::mpsc::UnboundedReceiver<WatchEvent>) -> String {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("commit within 20 s")
            .expect("watcher running");
        if let WatchEvent::Commit { value: Some(v), .. } = ev {
            return v;
        }
    }
}

#[tokio::test]
async fn user_password_works_and_expired_tokens_are_renewed() {
    let mut etcd = TestEtcd::start_with(EtcdOptions {
        auth_token_ttl: Some(2),
        ..EtcdOptions::default()
    });
    etcd.enable_auth("meduza", "s3cret");

    // Without credentials etcd refuses.
    let mut anon = etcd.config();
    anon.user = None;
    let anon = EtcdKv::new(anon);
    assert!(anon.put("/commit", "x").await.is_err());

    // A wrong password fails to connect.
    let mut wrong = etcd.config();
    wrong.user = Some(("meduza".into(), "wrong".into()));
    assert!(EtcdKv::connect(wrong).await.is_err());

    let kv = EtcdKv::connect(etcd.config()).await.unwrap();
    kv.put("/commit", "1").await.unwrap();
    // The simple token lives 2 s; every call after this needs a fresh one.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(kv.get("/commit").await.unwrap().unwrap().value, "1");
    kv.put("/commit", "2").await.unwrap();
    let id = kv.lease_grant(5).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(kv.lease_keep_alive(id).await.unwrap());
}

#[tokio::test]
async fn invalidated_tokens_lead_to_reauthentication() {
    let mut etcd = TestEtcd::start();
    etcd.enable_auth("meduza", "s3cret");
    let kv = EtcdKv::connect(etcd.config()).await.unwrap();
    kv.put("/commit", "1").await.unwrap();
    // Disabling auth drops every simple token; the old one is refused afterwards.
    etcd.cycle_auth();
    kv.put("/commit", "2").await.unwrap();
    assert_eq!(kv.get("/commit").await.unwrap().unwrap().value, "2");
}

#[tokio::test]
async fn watch_survives_restart_with_auth() {
    // Simple tokens live in etcd's memory: a restart invalidates them all, and a watch
    // created with a stale token is canceled ("permission denied"), not failed.
    let mut etcd = TestEtcd::start();
    etcd.enable_auth("meduza", "s3cret");
    let kv: Arc<dyn Kv> = Arc::new(EtcdKv::connect(etcd.config()).await.unwrap());
    let start = kv.put("/commit", "0").await.unwrap();
    let (_w, mut rx) = spawn_watcher(kv.clone(), watcher_config(), start);
    etcd.put("/commit", "1");
    assert_eq!(next_commit(&mut rx).await, "1");
    etcd.restart();
    etcd.put("/commit", "2");
    assert_eq!(next_commit(&mut rx).await, "2");
    kv.put("/commit", "3").await.unwrap();
    assert_eq!(next_commit(&mut rx).await, "3");
}

#[tokio::test]
async fn tls_with_client_certificate() {
    let etcd = TestEtcd::start_with(EtcdOptions {
        tls: true,
        ..EtcdOptions::default()
    });
    assert!(etcd.endpoint().starts_with("https://"));
    let kv: Arc<dyn Kv> = Arc::new(EtcdKv::connect(etcd.config()).await.unwrap());
    let start = kv.put("/commit", "0").await.unwrap();
    let (_w, mut rx) = spawn_watcher(kv.clone(), watcher_config(), start);
    etcd.put("/commit", "1");
    assert_eq!(next_commit(&mut rx).await, "1");
    assert_eq!(kv.get("/commit").await.unwrap().unwrap().value, "1");

    // The same settings through the environment-style constructor.
    let t = etcd.tls_files().unwrap();
    let from_env = EtcdConfig::build(
        &format!("127.0.0.1:{}", etcd.addr().port()),
        Some(t.ca.clone()),
        Some(t.client_cert.clone()),
        Some(t.client_key.clone()),
        None,
        None,
    )
    .unwrap();
    assert!(from_env.endpoints[0].starts_with("https://"));
    let kv2 = EtcdKv::connect(from_env).await.unwrap();
    assert_eq!(kv2.get("/commit").await.unwrap().unwrap().value, "1");

    // The server demands a client certificate.
    let mut no_cert = etcd.config();
    no_cert.cert = None;
    no_cert.key = None;
    assert!(EtcdKv::new(no_cert).get("/commit").await.is_err());

    // A CA that did not sign the server certificate is refused.
    let mut wrong_ca = etcd.config();
    wrong_ca.ca = Some(t.client_cert.clone());
    assert!(EtcdKv::new(wrong_ca).get("/commit").await.is_err());
}
