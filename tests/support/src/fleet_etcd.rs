//! Minimal real-etcd harness for the api_* and fleet_* tests: Debian's `etcd` on free
//! loopback ports with a temporary data dir, killed on drop, plus the node API's store
//! on it (through `meduza::etcd`) and a follower of one key (what the daemon does for
//! the API token after each reconcile pass). A missing `etcd` binary fails the test
//! (scripts/test installs etcd-server).

use meduza::api::KvStore;
use meduza::etcd::{EtcdConfig, EtcdKv};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub struct Etcd {
    child: Child,
    _dir: tempfile::TempDir,
    pub endpoint: String,
}

impl Etcd {
    pub async fn start() -> Etcd {
        let dir = tempfile::tempdir().expect("temp dir");
        let (client, peer) = (
            crate::ports::unique_free_port(),
            crate::ports::unique_free_port(),
        );
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(crate::etcd_args::etcd_args(
                "fleet-test",
                dir.path(),
                &endpoint,
                &peer_url,
            ))
            .args(["--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd must be installed (Debian package etcd-server)");
        let etcd = Etcd {
            child,
            _dir: dir,
            endpoint,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = etcd_client::Client::connect([etcd.endpoint.as_str()], None).await {
                if c.get("/", None).await.is_ok() {
                    return etcd;
                }
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become ready on {}",
                etcd.endpoint
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.endpoint.as_str()], None)
            .await
            .expect("connect to test etcd")
    }

    /// The `ConfigStore` the daemon and `meduza fleet` use, on this etcd.
    pub fn store(&self) -> Arc<KvStore> {
        let cfg = EtcdConfig::build(&self.endpoint, None, None, None, None, None)
            .expect("etcd config of the test endpoint");
        Arc::new(KvStore::new(Arc::new(EtcdKv::new(cfg))))
    }

    /// A channel equal to `key` (`None` while absent), updated from a watch until
    /// every receiver is dropped.
    pub async fn follow(&self, key: &str) -> watch::Receiver<Option<String>> {
        let mut c = self.client().await;
        let resp = c.get(key, None).await.expect("get followed key");
        let rev = resp.header().expect("header").revision();
        let first = resp
            .kvs()
            .first()
            .map(|kv| kv.value_str().expect("utf-8 value").to_string());
        let (tx, rx) = watch::channel(first);
        let mut stream = c
            .watch(
                key,
                Some(etcd_client::WatchOptions::new().with_start_revision(rev + 1)),
            )
            .await
            .expect("watch followed key");
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    msg = stream.message() => {
                        let Ok(Some(msg)) = msg else { return };
                        for ev in msg.events() {
                            let v = match ev.event_type() {
                                etcd_client::EventType::Put => ev
                                    .kv()
                                    .and_then(|kv| kv.value_str().ok().map(str::to_string)),
                                etcd_client::EventType::Delete => None,
                            };
                            tx.send_replace(v);
                        }
                    }
                }
            }
        });
        rx
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
