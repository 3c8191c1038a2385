//! [`MemKv`]: an in-memory etcd for unit tests of every module that reads or writes
//! etcd. It models what the daemon relies on: one store revision bumped per write,
//! per-key create/mod revisions and versions, leases that delete their keys,
//! compaction (reads and watches below the floor fail the way etcd's do), watches
//! that replay history from a start revision, and two faults: an outage
//! ([`MemKv::set_down`]: every call fails, open watches break) and a stall
//! ([`MemKv::set_stalled`]: watches stop answering, like a SIGSTOPped server).
//! Leases do not expire by time; tests expire them explicitly.
//! Built only for tests and the `test-util` feature (docs/testing.md, "Test support").

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::kv::{EventKind, KeyRange, Kv, KvEntry, KvEvent, WatchConn, WatchMsg, WriteOp};
use super::EtcdError;

type Feed = mpsc::UnboundedSender<Result<WatchMsg, EtcdError>>;

struct Watcher {
    id: u64,
    ranges: Vec<KeyRange>,
    tx: Feed,
    /// Messages withheld while stalled, delivered when the stall ends.
    held: Vec<WatchMsg>,
}

#[derive(Default)]
struct State {
    revision: i64,
    compacted: i64,
    kvs: BTreeMap<String, KvEntry>,
    history: Vec<KvEvent>,
    leases: BTreeMap<i64, BTreeSet<String>>,
    next_lease: i64,
    next_watch: u64,
    watchers: Vec<Watcher>,
    down: bool,
    watch_refused: bool,
    stalled: bool,
    /// Catch-up replays of the ranges of a new watch stream go out last range first.
    replay_reversed: bool,
    /// The next watch stream breaks after this many catch-up messages (one-shot).
    break_after_replay: Option<usize>,
    puts: u64,
}

impl State {
    fn check_up(&self, op: &'static str, key: &str) -> Result<(), EtcdError> {
        if self.down {
            Err(EtcdError::Unavailable {
                op,
                key: key.to_owned(),
            })
        } else {
            Ok(())
        }
    }

    fn deliver(&mut self, msg: WatchMsg) {
        let stalled = self.stalled;
        for w in &mut self.watchers {
            let events: Vec<KvEvent> = msg
                .events
                .iter()
                .filter(|e| w.ranges.iter().any(|r| r.contains(&e.key)))
                .cloned()
                .collect();
            if events.is_empty() {
                continue;
            }
            let m = WatchMsg {
                events,
                ..msg.clone()
            };
            if stalled {
                w.held.push(m);
            } else {
                // A closed receiver is pruned below.
                let _ = w.tx.send(Ok(m));
            }
        }
        self.watchers.retain(|w| !w.tx.is_closed());
    }

    /// Applies the events of one revision (already numbered) and notifies watchers.
    fn commit(&mut self, events: Vec<KvEvent>) {
        self.history.extend(events.iter().cloned());
        self.deliver(WatchMsg {
            header_revision: self.revision,
            events,
            ..WatchMsg::default()
        });
    }

    /// Sets `key` at the already allocated revision `rev`; returns its event.
    fn set(&mut self, key: &str, value: &str, lease: i64, rev: i64) -> KvEvent {
        self.puts += 1;
        let e = self.kvs.entry(key.to_owned()).or_insert_with(|| KvEntry {
            key: key.to_owned(),
            value: String::new(),
            create_revision: rev,
            mod_revision: rev,
            version: 0,
            lease: 0,
        });
        if e.lease != 0 && e.lease != lease {
            if let Some(keys) = self.leases.get_mut(&e.lease) {
                keys.remove(key);
            }
        }
        e.value = value.to_owned();
        e.mod_revision = rev;
        e.version += 1;
        e.lease = lease;
        if lease != 0 {
            self.leases.entry(lease).or_default().insert(key.to_owned());
        }
        KvEvent {
            kind: EventKind::Put,
            key: key.to_owned(),
            value: value.to_owned(),
            mod_revision: rev,
        }
    }

    /// Removes `key` at the already allocated revision `rev`; its event if it existed.
    fn unset(&mut self, key: &str, rev: i64) -> Option<KvEvent> {
        let e = self.kvs.remove(key)?;
        if let Some(lk) = self.leases.get_mut(&e.lease) {
            lk.remove(key);
        }
        Some(KvEvent {
            kind: EventKind::Delete,
            key: key.to_owned(),
            value: String::new(),
            mod_revision: rev,
        })
    }

    fn put(&mut self, key: &str, value: &str, lease: i64) -> i64 {
        self.revision += 1;
        let rev = self.revision;
        let ev = self.set(key, value, lease, rev);
        self.commit(vec![ev]);
        rev
    }

    fn delete_keys(&mut self, keys: Vec<String>) -> i64 {
        if keys.is_empty() {
            return 0;
        }
        self.revision += 1;
        let rev = self.revision;
        let events: Vec<KvEvent> = keys.iter().filter_map(|k| self.unset(k, rev)).collect();
        let n = events.len() as i64;
        self.commit(events);
        n
    }

    /// Every write of `ops` at one new revision, delivered as one watch response.
    fn write_batch(&mut self, ops: &[WriteOp]) -> i64 {
        self.revision += 1;
        let rev = self.revision;
        let mut events = Vec::new();
        for op in ops {
            match op {
                WriteOp::Put { key, value } => events.push(self.set(key, value, 0, rev)),
                WriteOp::Delete { key } => events.extend(self.unset(key, rev)),
            }
        }
        self.commit(events);
        rev
    }

    fn keys_in(&self, range: &KeyRange) -> Vec<String> {
        self.kvs
            .keys()
            .filter(|k| range.contains(k))
            .cloned()
            .collect()
    }
}

/// The in-memory etcd. Cloning shares the store.
#[derive(Clone, Default)]
pub struct MemKv {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for MemKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("MemKv")
            .field("revision", &s.revision)
            .field("keys", &s.kvs.len())
            .finish_non_exhaustive()
    }
}

impl MemKv {
    /// An empty store at revision 1 (etcd starts there too).
    pub fn new() -> Self {
        let kv = MemKv::default();
        kv.lock().revision = 1;
        kv
    }

    /// A store holding `keys`, each written in order.
    pub fn with_keys<'a>(keys: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let kv = Self::new();
        {
            let mut s = kv.lock();
            for (k, v) in keys {
                s.put(k, v, 0);
            }
        }
        kv
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a test failure already; keep going so
        // the panic message of that test is the one reported.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current store revision.
    pub fn revision(&self) -> i64 {
        self.lock().revision
    }

    /// How many puts were applied (to check "write only when changed").
    pub fn put_count(&self) -> u64 {
        self.lock().puts
    }

    /// Every key and value, ignoring outages (for assertions).
    pub fn dump(&self) -> BTreeMap<String, String> {
        self.lock()
            .kvs
            .iter()
            .map(|(k, e)| (k.clone(), e.value.clone()))
            .collect()
    }

    /// Models an outage: while down every call fails and open watches break.
    pub fn set_down(&self, down: bool) {
        let mut s = self.lock();
        s.down = down;
        if down {
            for w in s.watchers.drain(..) {
                let _ = w.tx.send(Err(EtcdError::Watch {
                    reason: "connection reset (fake outage)".into(),
                }));
            }
        }
    }

    /// Refuses new watches and breaks open ones while unary calls keep working, so a
    /// test can change history while a watcher is disconnected.
    pub fn set_watch_refused(&self, refused: bool) {
        let mut s = self.lock();
        s.watch_refused = refused;
        if refused {
            for w in s.watchers.drain(..) {
                let _ = w.tx.send(Err(EtcdError::Watch {
                    reason: "connection reset (fake)".into(),
                }));
            }
        }
    }

    /// Sends the catch-up replays of a new watch stream last range first, as etcd may:
    /// its watchers catch up independently, in no order across watches.
    pub fn set_replay_reversed(&self, reversed: bool) {
        self.lock().replay_reversed = reversed;
    }

    /// The next watch stream delivers its creation answers and only `messages`
    /// catch-up responses, then breaks (the connection dropped mid-catch-up).
    pub fn break_next_watch_after_replay(&self, messages: usize) {
        self.lock().break_after_replay = Some(messages);
    }

    /// Models a stalled server: watch responses and progress answers are withheld
    /// until the stall ends; unary calls still work.
    pub fn set_stalled(&self, stalled: bool) {
        let mut s = self.lock();
        s.stalled = stalled;
        if !stalled {
            for w in &mut s.watchers {
                for m in w.held.drain(..) {
                    let _ = w.tx.send(Ok(m));
                }
            }
        }
    }

    /// Expires a lease as if its TTL ran out: its keys are deleted.
    pub fn expire_lease(&self, id: i64) {
        let mut s = self.lock();
        if let Some(keys) = s.leases.remove(&id) {
            s.delete_keys(keys.into_iter().collect());
        }
    }

    /// Expires every lease.
    pub fn expire_all_leases(&self) {
        let ids: Vec<i64> = self.lock().leases.keys().copied().collect();
        for id in ids {
            self.expire_lease(id);
        }
    }

    /// Live lease ids.
    pub fn leases(&self) -> Vec<i64> {
        self.lock().leases.keys().copied().collect()
    }

    /// Open watch streams.
    pub fn watcher_count(&self) -> usize {
        let mut s = self.lock();
        s.watchers.retain(|w| !w.tx.is_closed());
        s.watchers.len()
    }
}

#[async_trait]
impl Kv for MemKv {
    async fn get(&self, key: &str) -> Result<Option<KvEntry>, EtcdError> {
        let s = self.lock();
        s.check_up("get", key)?;
        Ok(s.kvs.get(key).cloned())
    }

    async fn get_ranges(
        &self,
        ranges: &[KeyRange],
    ) -> Result<(BTreeMap<String, String>, i64), EtcdError> {
        let s = self.lock();
        s.check_up("get", ranges.first().map(KeyRange::as_str).unwrap_or(""))?;
        let out = s
            .kvs
            .iter()
            .filter(|(k, _)| ranges.iter().any(|r| r.contains(k)))
            .map(|(k, e)| (k.clone(), e.value.clone()))
            .collect();
        Ok((out, s.revision))
    }

    async fn put(&self, key: &str, value: &str) -> Result<i64, EtcdError> {
        let mut s = self.lock();
        s.check_up("put", key)?;
        Ok(s.put(key, value, 0))
    }

    async fn put_with_lease(&self, key: &str, value: &str, lease: i64) -> Result<i64, EtcdError> {
        let mut s = self.lock();
        s.check_up("put", key)?;
        if !s.leases.contains_key(&lease) {
            return Err(EtcdError::LeaseNotFound { id: lease });
        }
        Ok(s.put(key, value, lease))
    }

    async fn put_if_changed(&self, key: &str, value: &str) -> Result<bool, EtcdError> {
        let mut s = self.lock();
        s.check_up("put", key)?;
        if s.kvs.get(key).is_some_and(|e| e.value == value) {
            return Ok(false);
        }
        s.put(key, value, 0);
        Ok(true)
    }

    async fn write_batch(&self, ops: &[WriteOp]) -> Result<i64, EtcdError> {
        let mut s = self.lock();
        s.check_up("txn", ops.first().map(WriteOp::key).unwrap_or_default())?;
        Ok(s.write_batch(ops))
    }

    async fn delete(&self, key: &str) -> Result<i64, EtcdError> {
        let mut s = self.lock();
        s.check_up("delete", key)?;
        let keys = s.keys_in(&KeyRange::Key(key.to_owned()));
        Ok(s.delete_keys(keys))
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<i64, EtcdError> {
        let mut s = self.lock();
        s.check_up("delete", prefix)?;
        let keys = s.keys_in(&KeyRange::Prefix(prefix.to_owned()));
        Ok(s.delete_keys(keys))
    }

    async fn compact(&self, revision: i64) -> Result<(), EtcdError> {
        let mut s = self.lock();
        s.check_up("compact", &revision.to_string())?;
        if revision <= s.compacted {
            return Err(EtcdError::Compacted {
                op: "compact",
                key: String::new(),
                revision,
                compact_revision: s.compacted,
            });
        }
        s.compacted = revision.min(s.revision);
        let floor = s.compacted;
        s.history.retain(|e| e.mod_revision >= floor);
        Ok(())
    }

    async fn lease_grant(&self, _ttl_secs: i64) -> Result<i64, EtcdError> {
        let mut s = self.lock();
        s.check_up("lease-grant", "")?;
        s.next_lease += 1;
        let id = 0x1000 + s.next_lease;
        s.leases.insert(id, BTreeSet::new());
        Ok(id)
    }

    async fn lease_keep_alive(&self, id: i64) -> Result<bool, EtcdError> {
        let s = self.lock();
        s.check_up("lease-keep-alive", &format!("{id:x}"))?;
        Ok(s.leases.contains_key(&id))
    }

    async fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        {
            let s = self.lock();
            s.check_up("lease-revoke", &format!("{id:x}"))?;
            if !s.leases.contains_key(&id) {
                return Err(EtcdError::LeaseNotFound { id });
            }
        }
        self.expire_lease(id);
        Ok(())
    }

    async fn watch(&self, ranges: &[(KeyRange, i64)]) -> Result<Box<dyn WatchConn>, EtcdError> {
        let mut s = self.lock();
        let first = ranges.first().map(|r| r.0.as_str()).unwrap_or("");
        s.check_up("watch", first)?;
        if s.watch_refused {
            return Err(EtcdError::Unavailable {
                op: "watch",
                key: first.to_owned(),
            });
        }
        let (tx, rx) = mpsc::unbounded_channel();
        s.next_watch += 1;
        let id = s.next_watch;
        let header = s.revision;
        // etcd answers each create request, then cancels a watch whose start is below
        // the compaction floor (`mvcc/watchable_store.go`: minRev < compactRev).
        let mut msgs: Vec<WatchMsg> = ranges
            .iter()
            .map(|_| WatchMsg {
                header_revision: header,
                created: true,
                ..WatchMsg::default()
            })
            .collect();
        let compacted = s.compacted;
        if ranges
            .iter()
            .any(|&(_, start)| start > 0 && start < compacted)
        {
            msgs.push(WatchMsg {
                header_revision: header,
                canceled: true,
                compact_revision: compacted,
                cancel_reason: "mvcc: required revision has been compacted".into(),
                ..WatchMsg::default()
            });
        } else {
            // Each watch catches up on its own, as etcd's unsynced watchers do.
            let mut replays: Vec<WatchMsg> = ranges
                .iter()
                .filter(|&&(_, start)| start > 0)
                .map(|(range, start)| WatchMsg {
                    header_revision: header,
                    events: s
                        .history
                        .iter()
                        .filter(|e| e.mod_revision >= *start && range.contains(&e.key))
                        .cloned()
                        .collect(),
                    ..WatchMsg::default()
                })
                .filter(|m| !m.events.is_empty())
                .collect();
            if s.replay_reversed {
                replays.reverse();
            }
            if let Some(n) = s.break_after_replay.take() {
                replays.truncate(n);
                msgs.extend(replays);
                for m in msgs {
                    let _ = tx.send(Ok(m));
                }
                let _ = tx.send(Err(EtcdError::Watch {
                    reason: "connection reset during catch-up (fake)".into(),
                }));
                return Ok(Box::new(MemWatch {
                    id,
                    rx,
                    state: self.state.clone(),
                }));
            }
            msgs.extend(replays);
        }
        let mut held = Vec::new();
        if s.stalled {
            held = msgs;
        } else {
            for m in msgs {
                let _ = tx.send(Ok(m));
            }
        }
        s.watchers.push(Watcher {
            id,
            ranges: ranges.iter().map(|(r, _)| r.clone()).collect(),
            tx,
            held,
        });
        Ok(Box::new(MemWatch {
            id,
            rx,
            state: self.state.clone(),
        }))
    }
}

struct MemWatch {
    id: u64,
    rx: mpsc::UnboundedReceiver<Result<WatchMsg, EtcdError>>,
    state: Arc<Mutex<State>>,
}

impl Drop for MemWatch {
    fn drop(&mut self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.watchers.retain(|w| w.id != self.id);
    }
}

#[async_trait]
impl WatchConn for MemWatch {
    async fn next(&mut self) -> Result<Option<WatchMsg>, EtcdError> {
        match self.rx.recv().await {
            Some(r) => r.map(Some),
            None => Ok(None),
        }
    }

    async fn request_progress(&mut self) -> Result<(), EtcdError> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.check_up("watch-progress", "")?;
        let msg = WatchMsg {
            header_revision: s.revision,
            ..WatchMsg::default()
        };
        let stalled = s.stalled;
        if let Some(w) = s.watchers.iter_mut().find(|w| w.id == self.id) {
            if stalled {
                w.held.push(msg);
            } else {
                let _ = w.tx.send(Ok(msg));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn revisions_and_versions_follow_etcd() {
        let kv = MemKv::new();
        assert_eq!(kv.revision(), 1);
        assert_eq!(kv.put("/a", "1").await.unwrap(), 2);
        assert_eq!(kv.put("/a", "2").await.unwrap(), 3);
        let e = kv.get("/a").await.unwrap().unwrap();
        assert_eq!((e.create_revision, e.mod_revision, e.version), (2, 3, 2));
        assert!(!kv.put_if_changed("/a", "2").await.unwrap());
        assert!(kv.put_if_changed("/a", "3").await.unwrap());
        assert!(kv.put_if_changed("/b", "x").await.unwrap());
        let (m, rev) = kv.get_prefix("/").await.unwrap();
        assert_eq!(rev, 5);
        assert_eq!(m.len(), 2);
        assert_eq!(kv.delete_prefix("/").await.unwrap(), 2);
        assert_eq!(kv.revision(), 6, "one delete-range is one revision");
    }

    #[tokio::test]
    async fn a_write_batch_is_one_revision_and_one_watch_response() {
        let kv = MemKv::with_keys([("/x", "old")]);
        let mut w = kv
            .watch(&[(KeyRange::Prefix("/".into()), 0)])
            .await
            .unwrap();
        assert!(w.next().await.unwrap().unwrap().created);
        let rev = kv
            .write_batch(&[
                WriteOp::Put {
                    key: "/a".into(),
                    value: "1".into(),
                },
                WriteOp::Delete { key: "/x".into() },
                WriteOp::Delete {
                    key: "/absent".into(),
                },
                WriteOp::Put {
                    key: "/commit".into(),
                    value: "c".into(),
                },
            ])
            .await
            .unwrap();
        assert_eq!(rev, kv.revision());
        assert_eq!(kv.get("/a").await.unwrap().unwrap().mod_revision, rev);
        assert_eq!(kv.get("/commit").await.unwrap().unwrap().mod_revision, rev);
        assert!(kv.get("/x").await.unwrap().is_none());
        let m = w.next().await.unwrap().unwrap();
        let keys: Vec<_> = m.events.iter().map(|e| (e.kind, e.key.as_str())).collect();
        assert_eq!(
            keys,
            [
                (EventKind::Put, "/a"),
                (EventKind::Delete, "/x"),
                (EventKind::Put, "/commit")
            ]
        );
        kv.set_down(true);
        assert!(kv.write_batch(&[]).await.is_err());
    }

    #[tokio::test]
    async fn leases_delete_their_keys() {
        let kv = MemKv::new();
        let id = kv.lease_grant(15).await.unwrap();
        kv.put_with_lease("/online", "1", id).await.unwrap();
        assert!(kv.lease_keep_alive(id).await.unwrap());
        kv.expire_lease(id);
        assert!(!kv.lease_keep_alive(id).await.unwrap());
        assert!(kv.get("/online").await.unwrap().is_none());
        assert!(matches!(
            kv.put_with_lease("/online", "1", id).await,
            Err(EtcdError::LeaseNotFound { .. })
        ));
    }

    #[tokio::test]
    async fn watch_replays_from_start_and_cancels_below_compaction() {
        let kv = MemKv::new();
        let r1 = kv.put("/commit", "1").await.unwrap();
        kv.put("/other", "x").await.unwrap();
        kv.put("/commit", "2").await.unwrap();
        let ranges = [(KeyRange::Key("/commit".into()), r1)];
        let mut w = kv.watch(&ranges).await.unwrap();
        assert!(w.next().await.unwrap().unwrap().created);
        let m = w.next().await.unwrap().unwrap();
        let vals: Vec<_> = m.events.iter().map(|e| e.value.as_str()).collect();
        assert_eq!(vals, ["1", "2"]);
        kv.put("/commit", "3").await.unwrap();
        assert_eq!(w.next().await.unwrap().unwrap().events[0].value, "3");

        kv.compact(kv.revision()).await.unwrap();
        let mut w = kv.watch(&ranges).await.unwrap();
        assert!(w.next().await.unwrap().unwrap().created);
        let m = w.next().await.unwrap().unwrap();
        assert!(m.canceled);
        assert_eq!(m.compact_revision, kv.revision());
    }

    #[tokio::test]
    async fn outage_fails_calls_and_breaks_watches() {
        let kv = MemKv::new();
        let mut w = kv
            .watch(&[(KeyRange::Prefix("/".into()), 0)])
            .await
            .unwrap();
        assert!(w.next().await.unwrap().unwrap().created);
        kv.set_down(true);
        assert!(w.next().await.is_err());
        assert!(matches!(
            kv.put("/a", "1").await,
            Err(EtcdError::Unavailable { .. })
        ));
        kv.set_down(false);
        kv.put("/a", "1").await.unwrap();
    }
}
