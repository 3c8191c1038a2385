//! The nftables edge: list table `inet meduza` with `nft -j list`, apply transactions
//! over nf_tables netlink, read the ruleset generation and watch nftables change
//! notifications.
//!
//! Owns: the [`Nft`] trait, its real implementation [`NetlinkNft`] (listing through
//! the `nft` binary; every change as one nfnetlink batch encoded by
//! [`nfnl_ruleset`](super::nfnl_ruleset), so no `nft` process and no parser is in the
//! apply path) and the in-memory [`FakeNft`] that models a kernel table so repeated
//! passes can be checked to converge. The fake receives the very batch bytes
//! `NetlinkNft` would send and decodes them ([`nfnl_ruleset::decode`]), so the unit
//! tests check the encoding the kernel gets. Must not: decide what to install (that
//! is `ruleset`), or name any table but `inet meduza`.

use std::ffi::OsString;
use std::future::Future;
use std::io;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::supervise::spawn::clean_command;
use nftables::helper::NftablesError;
use serde_json::Value;

use super::nfnl::{self, NfnlError};
use super::nfnl_ruleset::{self, model, NftMessage, TableModel};
use super::ruleset::{Ruleset, TABLE};
use super::DataplaneError;

/// Environment variable naming the `nft` binary.
pub const ENV_BIN_NFT: &str = "MEDUZA_BIN_NFT";

/// One transaction on table `inet meduza`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transaction<'a> {
    /// Create the table, known to be absent (no delete: see
    /// [`nfnl_ruleset::create`]).
    Create(&'a Ruleset),
    /// Make the table exactly this: add, delete and re-create it in one transaction.
    Replace(&'a Ruleset),
    /// Delete the table, whether or not it exists.
    Delete,
}

impl Transaction<'_> {
    /// The same transaction as one nf_tables netlink batch.
    pub fn netlink_batch(&self) -> Result<nfnl::Batch, nfnl_ruleset::EncodeError> {
        match self {
            Transaction::Create(rs) => nfnl_ruleset::create(rs),
            Transaction::Replace(rs) => nfnl_ruleset::replace(rs),
            Transaction::Delete => nfnl_ruleset::delete(),
        }
    }
}

/// The nftables operations the data plane needs, all on table `inet meduza`.
pub trait Nft: Send + Sync + 'static {
    /// `nft -j list table inet meduza`; `None` when the table does not exist.
    fn list_table(&self) -> impl Future<Output = Result<Option<Value>, DataplaneError>> + Send;
    /// Run one transaction; all of it or nothing takes effect.
    fn apply(&self, tx: Transaction<'_>)
        -> impl Future<Output = Result<(), DataplaneError>> + Send;
    /// The ruleset generation: it changes on every committed transaction, of anyone.
    fn generation(&self) -> impl Future<Output = Result<u32, DataplaneError>> + Send;
}

/// The real implementation: nf_tables netlink for transactions, the generation and a
/// cheap "does the table exist?" probe; the `nft` binary only to list the table
/// (its JSON is what [`view_of_listing`](super::ruleset::view_of_listing) compares).
#[derive(Debug, Clone)]
pub struct NetlinkNft {
    program: OsString,
}

impl NetlinkNft {
    /// Listing with `nft` from `MEDUZA_BIN_NFT`, else `nft` on the children's `PATH`
    /// (the `meduza dataplane` CLI; `meduza run` uses [`NetlinkNft::new`]).
    pub fn from_env() -> Self {
        Self::new(std::env::var_os(ENV_BIN_NFT).unwrap_or_else(|| OsString::from("nft")))
    }

    pub fn new(program: impl Into<OsString>) -> Self {
        Self {
            program: program.into(),
        }
    }

    fn nft_error(&self, op: &'static str, e: NftablesError) -> DataplaneError {
        DataplaneError::Nft {
            op,
            program: self.program.to_string_lossy().into_owned(),
            detail: match e {
                NftablesError::NftFailed { stderr, .. } => stderr.trim().to_string(),
                other => other.to_string(),
            },
        }
    }
}

impl Nft for NetlinkNft {
    async fn list_table(&self) -> Result<Option<Value>, DataplaneError> {
        // `nft list` of an absent table is an error whose only signal is its text;
        // ask the kernel directly first (a few µs instead of a process).
        match nfnl::table_exists(TABLE) {
            Ok(false) => return Ok(None),
            Ok(true) => {}
            Err(err) => tracing::debug!(?err, "nftables table probe failed, asking nft"),
        }
        // Started here rather than by `nftables::helper`, which would hand nft
        // meduza's whole environment (ETCD_PASS included): see supervise::spawn.
        let out = clean_command(&self.program)
            .args(["-j", "list", "table", "inet", TABLE])
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|inner| {
                self.nft_error(
                    "list table",
                    NftablesError::NftExecution {
                        program: self.program.clone(),
                        inner,
                    },
                )
            })?;
        let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
        if !out.status.success() {
            let stderr = text(out.stderr);
            // The children's POSIX locale keeps this message in English.
            if stderr.contains("No such file or directory") {
                return Ok(None);
            }
            return Err(self.nft_error(
                "list table",
                NftablesError::NftFailed {
                    program: self.program.clone(),
                    hint: format!("listing table inet {TABLE}"),
                    stdout: text(out.stdout),
                    stderr,
                },
            ));
        }
        serde_json::from_slice(&out.stdout)
            .map(Some)
            .map_err(|e| DataplaneError::NftOutput {
                reason: e.to_string(),
            })
    }

    async fn apply(&self, tx: Transaction<'_>) -> Result<(), DataplaneError> {
        let batch = tx.netlink_batch()?;
        // The socket is opened here, so it belongs to the calling thread's network
        // namespace; the kernel runs the whole transaction inside `sendmsg` (~10 ms
        // for 10,000 prefixes), which is left to a blocking thread.
        let sock = nfnl::batch_socket(batch.bytes.len())?;
        let (bytes, messages) = (batch.bytes.len(), batch.messages.len());
        tokio::task::spawn_blocking(move || nfnl::send_batch_on(&sock, &batch))
            .await
            .map_err(|e| NfnlError::Io {
                op: "send batch (worker thread)",
                source: io::Error::other(e.to_string()),
            })??;
        tracing::debug!(bytes, messages, "nf_tables transaction committed");
        Ok(())
    }

    async fn generation(&self) -> Result<u32, DataplaneError> {
        nfnl::generation().map_err(|source| DataplaneError::Netlink {
            op: "read nftables generation",
            source,
        })
    }
}

/// A model of the kernel's view of table `inet meduza` (plus foreign tables, which a
/// correct caller never touches). Encodes each transaction to the netlink batch
/// `NetlinkNft` would send, decodes those bytes and applies the messages atomically
/// ([`model::apply`]); lists the table in the shape `nft -j list` prints, and counts
/// generations.
#[derive(Debug, Clone, Default)]
pub struct FakeNft {
    inner: Arc<Mutex<FakeNftState>>,
    log_batches: bool,
}

#[derive(Debug, Clone, Default)]
pub struct FakeNftState {
    /// Our table as the decoded batches left it, when it exists.
    pub table: Option<TableModel>,
    /// The messages of the last batch applied, decoded from its netlink bytes.
    pub last_batch: Vec<NftMessage>,
    /// Names of other tables present; any batch command naming them is an error.
    pub foreign_tables: Vec<String>,
    pub generation: u32,
    pub applies: usize,
    pub lists: usize,
}

impl FakeNft {
    /// A silent model (tests); the `off` mode uses [`FakeNft::logging`].
    #[cfg(any(test, feature = "test-util"))]
    pub fn new() -> Self {
        Self::default()
    }

    /// The `MEDUZA_DATAPLANE=off` mode: keeps the model so passes converge, and logs
    /// each batch it would have sent.
    pub fn logging() -> Self {
        Self {
            log_batches: true,
            ..Self::default()
        }
    }

    fn lock(&self) -> MutexGuard<'_, FakeNftState> {
        // A poisoned lock only means a test thread panicked; the state is still
        // the last committed one.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the modelled state.
    #[cfg(any(test, feature = "test-util"))]
    pub fn state(&self) -> FakeNftState {
        self.lock().clone()
    }

    /// Something else deletes our table (`nft delete table inet meduza`).
    #[cfg(any(test, feature = "test-util"))]
    pub fn delete_table_externally(&self) {
        let mut st = self.lock();
        st.table = None;
        st.generation += 1;
    }

    /// Something else changes an unrelated table (bumps the generation only).
    #[cfg(any(test, feature = "test-util"))]
    pub fn touch_foreign(&self, name: &str) {
        let mut st = self.lock();
        if !st.foreign_tables.iter().any(|t| t == name) {
            st.foreign_tables.push(name.to_string());
        }
        st.generation += 1;
    }
}

fn fake_err(reason: impl Into<String>) -> DataplaneError {
    DataplaneError::Nft {
        op: "apply batch",
        program: "fake".into(),
        detail: reason.into(),
    }
}

impl Nft for FakeNft {
    async fn list_table(&self) -> Result<Option<Value>, DataplaneError> {
        let mut st = self.lock();
        st.lists += 1;
        Ok(st.table.as_ref().map(TableModel::listing))
    }

    async fn apply(&self, tx: Transaction<'_>) -> Result<(), DataplaneError> {
        let batch = tx.netlink_batch()?;
        let msgs = nfnl_ruleset::decode_batch(&batch.bytes).map_err(|e| fake_err(e.to_string()))?;
        if self.log_batches {
            tracing::info!(
                bytes = batch.bytes.len(),
                messages = batch.messages.len(),
                first = ?batch.messages.first().map(|m| &m.what),
                "dataplane off: would apply nftables batch"
            );
        }
        let mut st = self.lock();
        if let Some(foreign) = msgs
            .iter()
            .find(|m| st.foreign_tables.iter().any(|t| t == m.table()))
        {
            return Err(fake_err(format!(
                "batch touches foreign table {}",
                foreign.table()
            )));
        }
        // Work on a copy: a failing message aborts the whole batch, as in the kernel.
        let mut table = st.table.clone();
        model::apply(&mut table, &msgs).map_err(|e| fake_err(e.to_string()))?;
        st.table = table;
        st.last_batch = msgs;
        st.generation += 1;
        st.applies += 1;
        Ok(())
    }

    async fn generation(&self) -> Result<u32, DataplaneError> {
        Ok(self.lock().generation)
    }
}

/// A socket subscribed to nf_tables change notifications of the current network
/// namespace; each datagram means "something changed some table".
pub fn nft_monitor_socket() -> io::Result<rtnetlink::sys::TokioSocket> {
    use rtnetlink::sys::{protocols::NETLINK_NETFILTER, AsyncSocket, SocketAddr, TokioSocket};
    let mut sock = TokioSocket::new(NETLINK_NETFILTER)?;
    sock.socket_mut().bind(&SocketAddr::new(0, 0))?;
    sock.socket_mut().add_membership(nfnl::NFNLGRP_NFTABLES)?;
    Ok(sock)
}
