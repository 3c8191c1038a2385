//! Key-value access for the node API's upstream CRUD and for the fleet manager.
//!
//! Owns: the small [`ConfigStore`] trait (prefix reads, single puts, atomic write sets
//! that bump `/commit`), an in-memory fake ([`MemStore`]), a real implementation on
//! `etcd_client` ([`EtcdStore`]) and [`follow_key`], which keeps a `watch` channel equal
//! to one etcd key (the API token follows `/nodes/<id>/api/token` live).
//! Must not: interpret keys — callers build and parse them.

use futures::future::BoxFuture;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tracing::{debug, warn};

/// The key whose change makes every node reconcile (DESIGN §5).
pub const COMMIT_KEY: &str = "/commit";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcd {op} {key}: {reason}")]
    Etcd {
        op: &'static str,
        key: String,
        reason: String,
    },
    #[error("etcd connect {endpoints}: {reason}")]
    Connect { endpoints: String, reason: String },
    #[error("reading {path}: {reason}")]
    File { path: String, reason: String },
}

/// One operation of an atomic write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    Put { key: String, value: String },
    Delete { key: String },
}

/// A value with the revision that last modified it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: String,
    pub mod_revision: i64,
}

/// What the API and the fleet manager need from etcd.
pub trait ConfigStore: Send + Sync + 'static {
    /// Every key under `prefix` with its value.
    fn get_prefix(
        &self,
        prefix: &str,
    ) -> BoxFuture<'_, Result<BTreeMap<String, String>, StoreError>>;
    /// One key with its mod revision.
    fn get(&self, key: &str) -> BoxFuture<'_, Result<Option<Versioned>, StoreError>>;
    fn put(&self, key: &str, value: &str) -> BoxFuture<'_, Result<(), StoreError>>;
    fn delete_prefix(&self, prefix: &str) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Apply `ops` and put `/commit` (the current unix time, as an operator would) in one
    /// transaction, so the reconcilers never see half an edit. Returns the new `/commit`
    /// mod revision.
    fn write_and_commit(&self, ops: Vec<WriteOp>) -> BoxFuture<'_, Result<i64, StoreError>>;
    /// Put `/commit` alone.
    fn bump_commit(&self) -> BoxFuture<'_, Result<i64, StoreError>> {
        self.write_and_commit(Vec::new())
    }
}

fn commit_value() -> String {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .to_string()
}

/// In-memory store with etcd's revision semantics (one revision per write or
/// transaction). `set_failing(true)` makes every call fail, as an unreachable etcd.
#[derive(Debug, Default, Clone)]
pub struct MemStore {
    inner: Arc<Mutex<MemInner>>,
}

#[derive(Debug, Default)]
struct MemInner {
    revision: i64,
    kvs: BTreeMap<String, Versioned>,
    failing: bool,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set_failing(&self, failing: bool) {
        self.lock().failing = failing;
    }

    /// A copy of every key and value.
    pub fn dump(&self) -> BTreeMap<String, String> {
        self.lock()
            .kvs
            .iter()
            .map(|(k, v)| (k.clone(), v.value.clone()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemInner> {
        // A poisoned lock only means another test thread panicked mid-write; the map
        // itself is still consistent (each write is one insert/remove).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check(
        &self,
        op: &'static str,
        key: &str,
    ) -> Result<std::sync::MutexGuard<'_, MemInner>, StoreError> {
        let g = self.lock();
        if g.failing {
            return Err(StoreError::Etcd {
                op,
                key: key.to_string(),
                reason: "store unavailable (fake)".into(),
            });
        }
        Ok(g)
    }
}

impl ConfigStore for MemStore {
    fn get_prefix(
        &self,
        prefix: &str,
    ) -> BoxFuture<'_, Result<BTreeMap<String, String>, StoreError>> {
        let r = self.check("get", prefix).map(|g| {
            g.kvs
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| (k.clone(), v.value.clone()))
                .collect()
        });
        Box::pin(async move { r })
    }

    fn get(&self, key: &str) -> BoxFuture<'_, Result<Option<Versioned>, StoreError>> {
        let r = self.check("get", key).map(|g| g.kvs.get(key).cloned());
        Box::pin(async move { r })
    }

    fn put(&self, key: &str, value: &str) -> BoxFuture<'_, Result<(), StoreError>> {
        let r = self.check("put", key).map(|mut g| {
            g.revision += 1;
            let rev = g.revision;
            g.kvs.insert(
                key.to_string(),
                Versioned {
                    value: value.to_string(),
                    mod_revision: rev,
                },
            );
        });
        Box::pin(async move { r })
    }

    fn delete_prefix(&self, prefix: &str) -> BoxFuture<'_, Result<(), StoreError>> {
        let r = self.check("delete", prefix).map(|mut g| {
            g.revision += 1;
            g.kvs.retain(|k, _| !k.starts_with(prefix));
        });
        Box::pin(async move { r })
    }

    fn write_and_commit(&self, ops: Vec<WriteOp>) -> BoxFuture<'_, Result<i64, StoreError>> {
        let r = self.check("txn", COMMIT_KEY).map(|mut g| {
            g.revision += 1;
            let rev = g.revision;
            for op in ops {
                match op {
                    WriteOp::Put { key, value } => {
                        g.kvs.insert(
                            key,
                            Versioned {
                                value,
                                mod_revision: rev,
                            },
                        );
                    }
                    WriteOp::Delete { key } => {
                        g.kvs.remove(&key);
                    }
                }
            }
            g.kvs.insert(
                COMMIT_KEY.to_string(),
                Versioned {
                    value: commit_value(),
                    mod_revision: rev,
                },
            );
            rev
        });
        Box::pin(async move { r })
    }
}

/// How to reach etcd (DESIGN §2 `ETCD_*`).
#[derive(Debug, Clone, Default)]
pub struct EtcdSettings {
    pub endpoints: Vec<String>,
    pub user: Option<(String, String)>,
    pub ca: Option<String>,
    pub cert_key: Option<(String, String)>,
}

impl EtcdSettings {
    /// From `ETCD_ENDPOINTS` (default `http://127.0.0.1:2379`), `ETCD_USER`/`ETCD_PASS`,
    /// `ETCD_CA`, `ETCD_CERT`/`ETCD_KEY`.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            endpoints: var("ETCD_ENDPOINTS")
                .unwrap_or_else(|| "http://127.0.0.1:2379".into())
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            user: var("ETCD_USER").zip(var("ETCD_PASS")),
            ca: var("ETCD_CA"),
            cert_key: var("ETCD_CERT").zip(var("ETCD_KEY")),
        }
    }
}

/// [`ConfigStore`] on a real etcd.
#[derive(Clone)]
pub struct EtcdStore {
    client: etcd_client::Client,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EtcdStore")
    }
}

fn read_file(path: &str) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|e| StoreError::File {
        path: path.to_string(),
        reason: e.to_string(),
    })
}

impl EtcdStore {
    pub fn new(client: etcd_client::Client) -> Self {
        Self { client }
    }

    pub async fn connect(s: &EtcdSettings) -> Result<Self, StoreError> {
        let mut opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10));
        if let Some((u, p)) = &s.user {
            opts = opts.with_user(u.clone(), p.clone());
        }
        if s.ca.is_some() || s.cert_key.is_some() {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &s.ca {
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read_file(ca)?));
            }
            if let Some((c, k)) = &s.cert_key {
                tls = tls.identity(etcd_client::Identity::from_pem(
                    read_file(c)?,
                    read_file(k)?,
                ));
            }
            opts = opts.with_tls(tls);
        }
        let client = etcd_client::Client::connect(&s.endpoints, Some(opts))
            .await
            .map_err(|e| StoreError::Connect {
                endpoints: s.endpoints.join(","),
                reason: e.to_string(),
            })?;
        Ok(Self { client })
    }

    pub fn client(&self) -> etcd_client::Client {
        self.client.clone()
    }
}

fn etcd_err(op: &'static str, key: &str, e: etcd_client::Error) -> StoreError {
    StoreError::Etcd {
        op,
        key: key.to_string(),
        reason: e.to_string(),
    }
}

impl ConfigStore for EtcdStore {
    fn get_prefix(
        &self,
        prefix: &str,
    ) -> BoxFuture<'_, Result<BTreeMap<String, String>, StoreError>> {
        let prefix = prefix.to_string();
        let mut c = self.client.clone();
        Box::pin(async move {
            let resp = c
                .get(
                    prefix.as_str(),
                    Some(etcd_client::GetOptions::new().with_prefix()),
                )
                .await
                .map_err(|e| etcd_err("get", &prefix, e))?;
            Ok(resp
                .kvs()
                .iter()
                .filter_map(|kv| {
                    Some((
                        kv.key_str().ok()?.to_string(),
                        kv.value_str().ok()?.to_string(),
                    ))
                })
                .collect())
        })
    }

    fn get(&self, key: &str) -> BoxFuture<'_, Result<Option<Versioned>, StoreError>> {
        let key = key.to_string();
        let mut c = self.client.clone();
        Box::pin(async move {
            let resp = c
                .get(key.as_str(), None)
                .await
                .map_err(|e| etcd_err("get", &key, e))?;
            Ok(resp.kvs().first().and_then(|kv| {
                Some(Versioned {
                    value: kv.value_str().ok()?.to_string(),
                    mod_revision: kv.mod_revision(),
                })
            }))
        })
    }

    fn put(&self, key: &str, value: &str) -> BoxFuture<'_, Result<(), StoreError>> {
        let (key, value) = (key.to_string(), value.to_string());
        let mut c = self.client.clone();
        Box::pin(async move {
            c.put(key.as_str(), value, None)
                .await
                .map_err(|e| etcd_err("put", &key, e))?;
            Ok(())
        })
    }

    fn delete_prefix(&self, prefix: &str) -> BoxFuture<'_, Result<(), StoreError>> {
        let prefix = prefix.to_string();
        let mut c = self.client.clone();
        Box::pin(async move {
            c.delete(
                prefix.as_str(),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| etcd_err("delete", &prefix, e))?;
            Ok(())
        })
    }

    fn write_and_commit(&self, ops: Vec<WriteOp>) -> BoxFuture<'_, Result<i64, StoreError>> {
        let mut c = self.client.clone();
        Box::pin(async move {
            let mut txn_ops: Vec<etcd_client::TxnOp> = ops
                .into_iter()
                .map(|op| match op {
                    WriteOp::Put { key, value } => etcd_client::TxnOp::put(key, value, None),
                    WriteOp::Delete { key } => etcd_client::TxnOp::delete(key, None),
                })
                .collect();
            txn_ops.push(etcd_client::TxnOp::put(COMMIT_KEY, commit_value(), None));
            let resp = c
                .txn(etcd_client::Txn::new().and_then(txn_ops))
                .await
                .map_err(|e| etcd_err("txn", COMMIT_KEY, e))?;
            Ok(resp.header().map(|h| h.revision()).unwrap_or_default())
        })
    }
}

/// A `watch` channel that follows one etcd key: `None` while it is absent. Survives etcd
/// outages (keeps the last value, re-reads and re-watches with a 1 s → 30 s backoff).
/// The task ends when every receiver is dropped.
pub fn follow_key(client: etcd_client::Client, key: String) -> watch::Receiver<Option<String>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut backoff = Duration::from_secs(1);
        loop {
            match follow_once(client.clone(), &key, &tx).await {
                Ok(()) => return, // every receiver dropped
                Err(e) => {
                    warn!(key = %key, error = %e, "key watch failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    if tx.is_closed() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

async fn follow_once(
    mut client: etcd_client::Client,
    key: &str,
    tx: &watch::Sender<Option<String>>,
) -> Result<(), etcd_client::Error> {
    let resp = client.get(key, None).await?;
    let rev = resp.header().map(|h| h.revision()).unwrap_or_default();
    let value = resp
        .kvs()
        .first()
        .and_then(|kv| kv.value_str().ok().map(str::to_string));
    tx.send_replace(value);
    let mut stream = client
        .watch(
            key,
            Some(etcd_client::WatchOptions::new().with_start_revision(rev + 1)),
        )
        .await?;
    loop {
        tokio::select! {
            _ = tx.closed() => return Ok(()),
            msg = stream.message() => {
                let Some(msg) = msg? else {
                    return Err(etcd_client::Error::WatchError("watch stream ended".into()));
                };
                if msg.canceled() {
                    return Err(etcd_client::Error::WatchError(msg.cancel_reason().to_string()));
                }
                for ev in msg.events() {
                    let v = match ev.event_type() {
                        etcd_client::EventType::Put => ev.kv().and_then(|kv| kv.value_str().ok().map(str::to_string)),
                        etcd_client::EventType::Delete => None,
                    };
                    debug!(key = %key, present = v.is_some(), "followed key changed");
                    tx.send_replace(v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn mem_store_commit_is_atomic_and_versioned() {
        let s = MemStore::new();
        s.put("/a/x", "1").await.unwrap();
        let rev = s
            .write_and_commit(vec![
                WriteOp::Put {
                    key: "/a/y".into(),
                    value: "2".into(),
                },
                WriteOp::Delete { key: "/a/x".into() },
            ])
            .await
            .unwrap();
        assert_eq!(rev, 2);
        let all = s.get_prefix("/a/").await.unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(s.get(COMMIT_KEY).await.unwrap().unwrap().mod_revision, 2);
        s.set_failing(true);
        assert!(s.get_prefix("/a/").await.is_err());
    }
}
