//! [`EtcdKv`]: the [`Kv`] trait on etcd-client.
//!
//! etcd-client neither reconnects a watch nor bounds a call while no endpoint is
//! ready (etcdv3/etcd-client#17, #48), so every call here is bounded by the request
//! timeout, connects lazily (a daemon started before etcd must come up anyway), and
//! re-authenticates once and retries when etcd refuses the token.

use std::collections::BTreeMap;
use std::future::Future;

use async_trait::async_trait;
use etcd_client::{
    Client, CompactionOptions, Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, PutOptions,
    Txn, TxnOp, TxnOpResponse, WatchOptions, WatchStream,
};
use tokio::sync::Mutex;
use tracing::{debug, warn};

use super::kv::{EventKind, KeyRange, Kv, KvEntry, KvEvent, WatchConn, WatchMsg, WriteOp};
use super::{EtcdConfig, EtcdError};

/// The real etcd, behind the [`Kv`] trait.
pub struct EtcdKv {
    config: EtcdConfig,
    client: Mutex<Option<Client>>,
}

impl std::fmt::Debug for EtcdKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdKv")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl EtcdKv {
    /// A client that connects on first use (and again after a failed connect).
    pub fn new(config: EtcdConfig) -> Self {
        EtcdKv {
            config,
            client: Mutex::new(None),
        }
    }

    /// A client connected (and authenticated) now; fails if etcd is unreachable.
    pub async fn connect(config: EtcdConfig) -> Result<Self, EtcdError> {
        let kv = Self::new(config);
        kv.client().await?;
        Ok(kv)
    }

    /// The settings this client uses.
    pub fn config(&self) -> &EtcdConfig {
        &self.config
    }

    async fn client(&self) -> Result<Client, EtcdError> {
        let mut guard = self.client.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let opts = self.config.connect_options()?;
        let endpoints = self.config.endpoints_display();
        // Connecting authenticates when a user is set, so bound it like a request.
        let limit = self.config.timeouts.connect + self.config.timeouts.request;
        let client = match tokio::time::timeout(
            limit,
            Client::connect(self.config.endpoints.clone(), Some(opts)),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(source)) => return Err(EtcdError::Connect { endpoints, source }),
            Err(_) => {
                return Err(EtcdError::Timeout {
                    op: "connect",
                    key: endpoints,
                    timeout: limit,
                })
            }
        };
        debug!(endpoints = %endpoints, "etcd client connected");
        *guard = Some(client.clone());
        Ok(client)
    }

    async fn timed<T, Fut>(&self, op: &'static str, key: &str, fut: Fut) -> Result<T, EtcdError>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let timeout = self.config.timeouts.request;
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(EtcdError::Rpc {
                op,
                key: key.to_owned(),
                source,
            }),
            Err(_) => Err(EtcdError::Timeout {
                op,
                key: key.to_owned(),
                timeout,
            }),
        }
    }

    /// Runs `f` on a client; on an auth refusal, re-authenticates and retries once.
    async fn call<T, F, Fut>(&self, op: &'static str, key: &str, f: F) -> Result<T, EtcdError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let client = self.client().await?;
        match self.timed(op, key, f(client.clone())).await {
            Err(e) if e.is_auth() && self.config.user.is_some() => {
                warn!(op, key, err = %e, "etcd refused the auth token; re-authenticating");
                self.timed("authenticate", key, client.refresh_token())
                    .await?;
                self.timed(op, key, f(client)).await
            }
            other => other,
        }
    }
}

fn range_options(range: &KeyRange) -> (String, GetOptions) {
    match range {
        KeyRange::Key(k) => (k.clone(), GetOptions::new()),
        KeyRange::Prefix(p) if p.is_empty() => (String::new(), GetOptions::new().with_all_keys()),
        KeyRange::Prefix(p) => (p.clone(), GetOptions::new().with_prefix()),
    }
}

fn utf8_pair(kv: &KeyValue) -> Result<(String, String), EtcdError> {
    let key = String::from_utf8_lossy(kv.key()).into_owned();
    match (kv.key_str(), kv.value_str()) {
        (Ok(k), Ok(v)) => Ok((k.to_owned(), v.to_owned())),
        _ => Err(EtcdError::NotUtf8 { key }),
    }
}

fn entry(kv: &KeyValue) -> Result<KvEntry, EtcdError> {
    let (key, value) = utf8_pair(kv)?;
    Ok(KvEntry {
        key,
        value,
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: kv.lease(),
    })
}

#[async_trait]
impl Kv for EtcdKv {
    async fn get(&self, key: &str) -> Result<Option<KvEntry>, EtcdError> {
        let resp = self
            .call("get", key, |mut c| async move { c.get(key, None).await })
            .await?;
        resp.kvs().first().map(entry).transpose()
    }

    async fn get_ranges(
        &self,
        ranges: &[KeyRange],
    ) -> Result<(BTreeMap<String, String>, i64), EtcdError> {
        let label = ranges
            .iter()
            .map(KeyRange::as_str)
            .collect::<Vec<_>>()
            .join(",");
        let resp = self
            .call("get", &label, |mut c| {
                let txn = Txn::new().and_then(
                    ranges
                        .iter()
                        .map(|r| {
                            let (k, o) = range_options(r);
                            TxnOp::get(k, Some(o))
                        })
                        .collect::<Vec<_>>(),
                );
                async move { c.txn(txn).await }
            })
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
        let mut out = BTreeMap::new();
        for op in resp.op_responses() {
            if let TxnOpResponse::Get(get) = op {
                for kv in get.kvs() {
                    let (k, v) = utf8_pair(kv)?;
                    out.insert(k, v);
                }
            }
        }
        Ok((out, revision))
    }

    async fn put(&self, key: &str, value: &str) -> Result<i64, EtcdError> {
        let resp = self
            .call(
                "put",
                key,
                |mut c| async move { c.put(key, value, None).await },
            )
            .await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or_default())
    }

    async fn put_with_lease(&self, key: &str, value: &str, lease: i64) -> Result<i64, EtcdError> {
        let resp = self
            .call("put", key, |mut c| async move {
                c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                    .await
            })
            .await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or_default())
    }

    async fn put_if_changed(&self, key: &str, value: &str) -> Result<bool, EtcdError> {
        // A value compare on a missing key is false (etcd `applyCompare`), so a
        // missing key also takes the put branch.
        let resp = self
            .call("put", key, |mut c| {
                let txn = Txn::new()
                    .when([Compare::value(key, CompareOp::Equal, value)])
                    .or_else([TxnOp::put(key, value, None)]);
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(!resp.succeeded())
    }

    async fn write_batch(&self, ops: &[WriteOp]) -> Result<i64, EtcdError> {
        let key = ops.first().map(WriteOp::key).unwrap_or_default();
        let resp = self
            .call("txn", key, |mut c| {
                let txn = Txn::new().and_then(
                    ops.iter()
                        .map(|op| match op {
                            WriteOp::Put { key, value } => {
                                TxnOp::put(key.as_str(), value.as_str(), None)
                            }
                            WriteOp::Delete { key } => TxnOp::delete(key.as_str(), None),
                        })
                        .collect::<Vec<_>>(),
                );
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or_default())
    }

    async fn delete(&self, key: &str) -> Result<i64, EtcdError> {
        let resp = self
            .call(
                "delete",
                key,
                |mut c| async move { c.delete(key, None).await },
            )
            .await?;
        Ok(resp.deleted())
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<i64, EtcdError> {
        let opts = if prefix.is_empty() {
            DeleteOptions::new().with_all_keys()
        } else {
            DeleteOptions::new().with_prefix()
        };
        let resp = self
            .call("delete", prefix, |mut c| {
                let opts = opts.clone();
                async move { c.delete(prefix, Some(opts)).await }
            })
            .await?;
        Ok(resp.deleted())
    }

    async fn compact(&self, revision: i64) -> Result<(), EtcdError> {
        let key = revision.to_string();
        self.call("compact", &key, |mut c| async move {
            c.compact(revision, Some(CompactionOptions::new().with_physical()))
                .await
        })
        .await?;
        Ok(())
    }

    async fn lease_grant(&self, ttl_secs: i64) -> Result<i64, EtcdError> {
        let resp = self
            .call("lease-grant", "", |mut c| async move {
                c.lease_grant(ttl_secs, None).await
            })
            .await?;
        Ok(resp.id())
    }

    async fn lease_keep_alive(&self, id: i64) -> Result<bool, EtcdError> {
        let key = format!("{id:x}");
        // `lease_keep_alive` sends one request and reads its answer before returning;
        // it reports an expired lease (TTL <= 0) as this error.
        let res = self
            .call("lease-keep-alive", &key, |mut c| async move {
                c.lease_keep_alive(id).await.map(|_| ())
            })
            .await;
        match res {
            Ok(()) => Ok(true),
            Err(EtcdError::Rpc {
                source: etcd_client::Error::LeaseKeepAliveError(_),
                ..
            }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        let key = format!("{id:x}");
        let res = self
            .call("lease-revoke", &key, |mut c| async move {
                c.lease_revoke(id).await
            })
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(EtcdError::Rpc {
                source: etcd_client::Error::GRpcStatus(s),
                ..
            }) if s.code() == tonic::Code::NotFound => Err(EtcdError::LeaseNotFound { id }),
            Err(e) => Err(e),
        }
    }

    async fn watch(&self, ranges: &[(KeyRange, i64)]) -> Result<Box<dyn WatchConn>, EtcdError> {
        let Some((first, rest)) = ranges.split_first() else {
            return Err(EtcdError::Watch {
                reason: "no range to watch".into(),
            });
        };
        let opts = |(r, start): &(KeyRange, i64)| {
            let o = WatchOptions::new().with_start_revision((*start).max(0));
            match r {
                KeyRange::Key(_) => o,
                KeyRange::Prefix(p) if p.is_empty() => o.with_all_keys(),
                KeyRange::Prefix(_) => o.with_prefix(),
            }
        };
        let stream = self
            .call("watch", first.0.as_str(), |mut c| async move {
                let mut s = c.watch(first.0.as_str(), Some(opts(first))).await?;
                for r in rest {
                    s.watch(r.0.as_str(), Some(opts(r))).await?;
                }
                Ok(s)
            })
            .await?;
        Ok(Box::new(RealWatch { stream }))
    }

    async fn reauthenticate(&self) -> Result<(), EtcdError> {
        if self.config.user.is_none() {
            return Ok(());
        }
        let client = self.client().await?;
        self.timed("authenticate", "", client.refresh_token()).await
    }
}

struct RealWatch {
    stream: WatchStream,
}

#[async_trait]
impl WatchConn for RealWatch {
    async fn next(&mut self) -> Result<Option<WatchMsg>, EtcdError> {
        let resp = self.stream.message().await.map_err(|e| EtcdError::Watch {
            reason: e.to_string(),
        })?;
        let Some(resp) = resp else { return Ok(None) };
        let mut events = Vec::with_capacity(resp.events().len());
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let kind = match ev.event_type() {
                etcd_client::EventType::Put => EventKind::Put,
                etcd_client::EventType::Delete => EventKind::Delete,
            };
            let (key, value) = utf8_pair(kv)?;
            events.push(KvEvent {
                kind,
                key,
                value,
                mod_revision: kv.mod_revision(),
            });
        }
        Ok(Some(WatchMsg {
            header_revision: resp.header().map(|h| h.revision()).unwrap_or_default(),
            created: resp.created(),
            canceled: resp.canceled(),
            compact_revision: resp.compact_revision(),
            cancel_reason: resp.cancel_reason().to_owned(),
            events,
        }))
    }

    async fn request_progress(&mut self) -> Result<(), EtcdError> {
        self.stream
            .request_progress()
            .await
            .map_err(|e| EtcdError::Watch {
                reason: e.to_string(),
            })
    }
}
