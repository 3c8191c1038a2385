//! Key-value access for the node API's upstream CRUD and for the fleet manager.
//!
//! Owns: the small [`ConfigStore`] trait (prefix reads, single puts, atomic write sets,
//! with or without a bump of `/commit`), an in-memory fake (`MemStore`, built for tests
//! and the `test-util` feature only) and the real implementation [`KvStore`] on the
//! etcd layer's [`Kv`] (so TLS, user/password, timeouts and re-authentication are
//! `crate::etcd`'s, configured by the global `--etcd-*` flags).
//! Must not: interpret keys (callers build and parse them) or open its own etcd
//! connection.

use crate::etcd::Kv;
use futures::future::BoxFuture;
use std::collections::BTreeMap;
use std::sync::Arc;
#[cfg(any(test, feature = "test-util"))]
use std::sync::Mutex;

pub use crate::etcd::{EtcdError as StoreError, WriteOp};

/// The key whose change makes every node reconcile (DESIGN §5).
pub const COMMIT_KEY: &str = crate::etcd::COMMIT_KEY;

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
    /// Apply `ops` in one transaction; returns its store revision.
    fn write(&self, ops: Vec<WriteOp>) -> BoxFuture<'_, Result<i64, StoreError>>;
    /// Apply `ops` and put `/commit` (the current unix time, as an operator would) in one
    /// transaction, so the reconcilers never see half an edit. Returns the store
    /// revision of that transaction, which is `/commit`'s new mod revision.
    fn write_and_commit(&self, mut ops: Vec<WriteOp>) -> BoxFuture<'_, Result<i64, StoreError>> {
        ops.push(WriteOp::Put {
            key: COMMIT_KEY.to_string(),
            value: commit_value(),
        });
        self.write(ops)
    }
    /// Put `/commit` alone.
    fn bump_commit(&self) -> BoxFuture<'_, Result<i64, StoreError>> {
        self.write_and_commit(Vec::new())
    }
}

fn commit_value() -> String {
    crate::etcd::status::unix_now().to_string()
}

/// In-memory store with etcd's revision semantics (one revision per write or
/// transaction). `set_failing(true)` makes every call fail, as an unreachable etcd.
#[cfg(any(test, feature = "test-util"))]
#[derive(Debug, Default, Clone)]
pub struct MemStore {
    inner: Arc<Mutex<MemInner>>,
}

#[cfg(any(test, feature = "test-util"))]
#[derive(Debug, Default)]
struct MemInner {
    revision: i64,
    kvs: BTreeMap<String, Versioned>,
    failing: bool,
}

#[cfg(any(test, feature = "test-util"))]
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
            return Err(StoreError::Unavailable {
                op,
                key: key.to_string(),
            });
        }
        Ok(g)
    }
}

#[cfg(any(test, feature = "test-util"))]
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

    fn write(&self, ops: Vec<WriteOp>) -> BoxFuture<'_, Result<i64, StoreError>> {
        let first = ops.first().map(|o| o.key().to_string()).unwrap_or_default();
        let r = self.check("txn", &first).map(|mut g| {
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
            rev
        });
        Box::pin(async move { r })
    }
}

/// [`ConfigStore`] on the etcd layer ([`crate::etcd::EtcdKv`] in the daemon and the
/// CLI, `crate::etcd::MemKv` in tests).
#[derive(Clone)]
pub struct KvStore {
    pub kv: Arc<dyn Kv>,
}

impl std::fmt::Debug for KvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KvStore")
    }
}

impl KvStore {
    pub fn new(kv: Arc<dyn Kv>) -> Self {
        Self { kv }
    }
}

impl ConfigStore for KvStore {
    fn get_prefix(
        &self,
        prefix: &str,
    ) -> BoxFuture<'_, Result<BTreeMap<String, String>, StoreError>> {
        let prefix = prefix.to_string();
        Box::pin(async move { self.kv.get_prefix(&prefix).await.map(|(m, _)| m) })
    }

    fn get(&self, key: &str) -> BoxFuture<'_, Result<Option<Versioned>, StoreError>> {
        let key = key.to_string();
        Box::pin(async move {
            Ok(self.kv.get(&key).await?.map(|e| Versioned {
                value: e.value,
                mod_revision: e.mod_revision,
            }))
        })
    }

    fn put(&self, key: &str, value: &str) -> BoxFuture<'_, Result<(), StoreError>> {
        let (key, value) = (key.to_string(), value.to_string());
        Box::pin(async move { self.kv.put(&key, &value).await.map(|_| ()) })
    }

    fn delete_prefix(&self, prefix: &str) -> BoxFuture<'_, Result<(), StoreError>> {
        let prefix = prefix.to_string();
        Box::pin(async move { self.kv.delete_prefix(&prefix).await.map(|_| ()) })
    }

    fn write(&self, ops: Vec<WriteOp>) -> BoxFuture<'_, Result<i64, StoreError>> {
        Box::pin(async move { self.kv.write_batch(&ops).await })
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
