//! The etcd layer: connection, key/value access, snapshots, the resilient watch and
//! status publishing.
//!
//! Owns: turning `ETCD_*` settings into a connected client (TLS, user/password with
//! token refresh and re-authentication, failover between the members of a cluster),
//! the [`Kv`] trait every other module uses to read and write etcd (with the real
//! [`EtcdKv`] and the in-memory `MemKv`, built for tests and the `test-util` feature
//! only), loading a consistent snapshot at one revision, the watch on `/commit` and
//! `/dns/hosts/` that survives disconnects, compaction, stalls and the loss of its
//! member, the `/updated/<id>/...` status keys (DESIGN §4), and the `meduza status` /
//! `meduza snapshot` commands.
//!
//! Must not: parse configuration values (that is `meduza-generators`), decide what a
//! change means (the reconciler does; the watcher only *triggers*), or block a caller
//! on etcd being reachable: status writes are queued and flushed when etcd is back.

mod cli;
mod config;
mod error;
mod failover;
mod kv;
#[cfg(any(test, feature = "test-util"))]
mod mem;
mod real;
mod snapshot;
pub mod status;
mod watch;

pub use cli::{run_command, EtcdCommand};
pub use config::{EtcdArgs, EtcdConfig, EtcdTimeouts, CLUSTER_ATTEMPT_TIMEOUT};
pub use error::{is_auth_error, EtcdError};
pub use kv::{EventKind, KeyRange, Kv, KvEntry, KvEvent, WatchConn, WatchMsg, WriteOp};
#[cfg(any(test, feature = "test-util"))]
pub use mem::MemKv;
pub use real::EtcdKv;
pub use snapshot::{dump_snapshot, load_config, load_snapshot, SNAPSHOT_PREFIXES};
pub use status::{read_status, render_status_table, NodeStatus, StatusPublisher};
pub use watch::{spawn_watcher, WatchEvent, Watcher, WatcherConfig, COMMIT_KEY};
