//! The [`Kv`] trait: the part of etcd the daemon uses, small enough for an in-memory
//! fake (`MemKv`, built for tests and the `test-util` feature only) that models
//! revisions, leases, compaction and watches.

use std::collections::BTreeMap;

use async_trait::async_trait;

use super::EtcdError;

/// A key or every key under a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRange {
    /// Exactly this key.
    Key(String),
    /// Every key starting with this string. The empty prefix means every key.
    Prefix(String),
}

impl KeyRange {
    /// Whether `key` falls in the range.
    pub fn contains(&self, key: &str) -> bool {
        match self {
            KeyRange::Key(k) => k == key,
            KeyRange::Prefix(p) => key.starts_with(p.as_str()),
        }
    }

    /// The key or prefix itself, for messages.
    pub fn as_str(&self) -> &str {
        match self {
            KeyRange::Key(k) | KeyRange::Prefix(k) => k,
        }
    }
}

/// One key with its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    pub key: String,
    pub value: String,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    /// The lease the key is attached to, 0 for none.
    pub lease: i64,
}

/// Put or delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One write of an atomic batch ([`Kv::write_batch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    Put { key: String, value: String },
    Delete { key: String },
}

impl WriteOp {
    /// The key written, for messages.
    pub fn key(&self) -> &str {
        match self {
            WriteOp::Put { key, .. } | WriteOp::Delete { key } => key,
        }
    }
}

/// One change of one key, as a watch delivers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEvent {
    pub kind: EventKind,
    pub key: String,
    /// The new value; empty for a delete.
    pub value: String,
    /// The revision of the change.
    pub mod_revision: i64,
}

/// One response of a watch stream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WatchMsg {
    /// The store revision when the response was sent. Not a safe resume point by
    /// itself: an unsynced watcher may still owe events below it.
    pub header_revision: i64,
    /// The answer to a create request.
    pub created: bool,
    /// The watch is gone; see `compact_revision` and `cancel_reason`.
    pub canceled: bool,
    /// Non-zero when the start revision was compacted: the oldest revision left.
    pub compact_revision: i64,
    pub cancel_reason: String,
    pub events: Vec<KvEvent>,
}

/// An open watch stream with one or more watched ranges.
#[async_trait]
pub trait WatchConn: Send {
    /// The next response; `Ok(None)` when the server closed the stream.
    async fn next(&mut self) -> Result<Option<WatchMsg>, EtcdError>;
    /// Asks the server for a progress response (an empty response with a header).
    async fn request_progress(&mut self) -> Result<(), EtcdError>;

    /// The watcher gives up on this stream: the server left a progress request
    /// unanswered. The real client then avoids that member (a frozen process answers
    /// nothing at all) until it answers its probe again.
    fn mark_unresponsive(&mut self) {}
}

/// What the daemon needs from etcd. Revisions are etcd store revisions.
#[async_trait]
pub trait Kv: Send + Sync {
    /// One key, or `None` when absent.
    async fn get(&self, key: &str) -> Result<Option<KvEntry>, EtcdError>;

    /// Every key under `prefix` with the store revision of the read.
    async fn get_prefix(&self, prefix: &str) -> Result<(BTreeMap<String, String>, i64), EtcdError> {
        self.get_ranges(&[KeyRange::Prefix(prefix.to_owned())])
            .await
    }

    /// Several ranges read atomically at one revision (a single transaction).
    async fn get_ranges(
        &self,
        ranges: &[KeyRange],
    ) -> Result<(BTreeMap<String, String>, i64), EtcdError>;

    /// Writes a key; returns the new store revision.
    async fn put(&self, key: &str, value: &str) -> Result<i64, EtcdError>;

    /// Writes a key attached to a lease (it vanishes with the lease).
    async fn put_with_lease(&self, key: &str, value: &str, lease: i64) -> Result<i64, EtcdError>;

    /// Writes a key only when its value differs (one transaction); true if written.
    async fn put_if_changed(&self, key: &str, value: &str) -> Result<bool, EtcdError>;

    /// Applies puts and deletes in one transaction (one revision, all or nothing);
    /// returns the new store revision. etcd refuses a key written twice in one batch.
    async fn write_batch(&self, ops: &[WriteOp]) -> Result<i64, EtcdError>;

    /// Deletes a key; returns how many keys were deleted (0 or 1).
    async fn delete(&self, key: &str) -> Result<i64, EtcdError>;

    /// Deletes every key under a prefix; returns how many.
    async fn delete_prefix(&self, prefix: &str) -> Result<i64, EtcdError>;

    /// Compacts the history up to `revision` (physically, before returning).
    async fn compact(&self, revision: i64) -> Result<(), EtcdError>;

    /// Grants a lease of `ttl_secs`; returns its id.
    async fn lease_grant(&self, ttl_secs: i64) -> Result<i64, EtcdError>;

    /// Refreshes a lease once; `Ok(false)` when it expired or is unknown.
    async fn lease_keep_alive(&self, id: i64) -> Result<bool, EtcdError>;

    /// Revokes a lease, deleting its keys.
    async fn lease_revoke(&self, id: i64) -> Result<(), EtcdError>;

    /// Opens one watch stream with one watch per range, each delivering events from
    /// its own start revision (inclusive; 0 = from now). The watches catch up
    /// independently: events of different ranges may arrive out of revision order.
    async fn watch(&self, ranges: &[(KeyRange, i64)]) -> Result<Box<dyn WatchConn>, EtcdError>;

    /// Obtains a fresh auth token (no-op without credentials).
    async fn reauthenticate(&self) -> Result<(), EtcdError> {
        Ok(())
    }

    /// Resolves when etcd answers again after calls failed: a member that was down
    /// came back. A hint for loops waiting out a backoff to retry now rather than at
    /// its end. Only changes after the call count; the default never resolves.
    async fn recovered(&self) {
        std::future::pending::<()>().await;
    }
}
