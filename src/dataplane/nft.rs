//! The nftables edge: run `nft` for listing and applying, read the ruleset generation
//! and watch nftables change notifications over netlink.
//!
//! Owns: the [`Nft`] trait, its real implementation [`CliNft`] (the `nftables`
//! crate's JSON batch, which runs `nft -j -f -`) and the in-memory [`FakeNft`] that
//! models a kernel table so repeated passes can be checked to converge. Must not:
//! decide what to install (that is `ruleset`), or name any table but `inet meduza`.

use std::ffi::OsString;
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use nftables::helper::{self, NftablesError};
use nftables::schema::Nftables;
use serde_json::Value;

use super::ruleset::TABLE;
use super::DataplaneError;

/// Environment variable naming the `nft` binary.
pub const ENV_BIN_NFT: &str = "MEDUZA_BIN_NFT";

/// The nftables operations the data plane needs, all on table `inet meduza`.
pub trait Nft: Send + Sync + 'static {
    /// `nft -j list table inet meduza`; `None` when the table does not exist.
    fn list_table(&self) -> impl Future<Output = Result<Option<Value>, DataplaneError>> + Send;
    /// Run one batch as one transaction.
    fn apply(
        &self,
        batch: &Nftables<'static>,
    ) -> impl Future<Output = Result<(), DataplaneError>> + Send;
    /// The ruleset generation: it changes on every committed transaction, of anyone.
    fn generation(&self) -> impl Future<Output = Result<u32, DataplaneError>> + Send;
}

/// The real implementation: the `nft` binary for list/apply, netlink for the
/// generation and for a cheap "does the table exist?" probe.
#[derive(Debug, Clone)]
pub struct CliNft {
    program: OsString,
}

impl CliNft {
    /// `nft` from `MEDUZA_BIN_NFT`, else `nft` on `PATH`.
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

impl Nft for CliNft {
    async fn list_table(&self) -> Result<Option<Value>, DataplaneError> {
        // `nft list` of an absent table is an error whose only signal is its text;
        // ask the kernel directly first (a few µs instead of a process).
        match nfnl::table_exists(TABLE) {
            Ok(false) => return Ok(None),
            Ok(true) => {}
            Err(err) => tracing::debug!(?err, "nftables table probe failed, asking nft"),
        }
        let args = ["list", "table", "inet", TABLE];
        match helper::get_current_ruleset_raw_async(Some(&self.program), args).await {
            Ok(out) => {
                serde_json::from_str(&out)
                    .map(Some)
                    .map_err(|e| DataplaneError::NftOutput {
                        reason: e.to_string(),
                    })
            }
            Err(NftablesError::NftFailed { stderr, .. })
                if stderr.contains("No such file or directory") =>
            {
                Ok(None)
            }
            Err(e) => Err(self.nft_error("list table", e)),
        }
    }

    async fn apply(&self, batch: &Nftables<'static>) -> Result<(), DataplaneError> {
        helper::apply_ruleset_with_args_async(batch, Some(&self.program), helper::DEFAULT_ARGS)
            .await
            .map_err(|e| self.nft_error("apply batch", e))
    }

    async fn generation(&self) -> Result<u32, DataplaneError> {
        nfnl::generation().map_err(|source| DataplaneError::Netlink {
            op: "read nftables generation",
            source,
        })
    }
}

/// A model of the kernel's view of table `inet meduza` (plus foreign tables, which a
/// correct caller never touches). Applies batches atomically, lists the table in the
/// shape `nft -j list` prints, and counts generations.
#[derive(Debug, Clone, Default)]
pub struct FakeNft {
    inner: Arc<Mutex<FakeNftState>>,
    log_batches: bool,
}

#[derive(Debug, Clone, Default)]
pub struct FakeNftState {
    /// Our table's objects (sets, chains, rules) when it exists.
    pub table: Option<Vec<Value>>,
    /// Names of other tables present; any batch command naming them is an error.
    pub foreign_tables: Vec<String>,
    pub generation: u32,
    pub applies: usize,
    pub lists: usize,
}

impl FakeNft {
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
    pub fn state(&self) -> FakeNftState {
        self.lock().clone()
    }

    /// Something else deletes our table (`nft delete table inet meduza`).
    pub fn delete_table_externally(&self) {
        let mut st = self.lock();
        st.table = None;
        st.generation += 1;
    }

    /// Something else changes an unrelated table (bumps the generation only).
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
        let Some(objs) = &st.table else {
            return Ok(None);
        };
        let mut out = vec![
            serde_json::json!({"metainfo": {"version": "fake", "json_schema_version": 1}}),
            serde_json::json!({"table": {"family": "inet", "name": TABLE, "handle": 1}}),
        ];
        for (i, o) in objs.iter().enumerate() {
            let mut o = o.clone();
            if let Some(Value::Object(inner)) =
                o.as_object_mut().and_then(|m| m.values_mut().next())
            {
                inner.insert("handle".into(), Value::from(i + 2));
            }
            out.push(o);
        }
        Ok(Some(serde_json::json!({ "nftables": out })))
    }

    async fn apply(&self, batch: &Nftables<'static>) -> Result<(), DataplaneError> {
        let doc = serde_json::to_value(batch).map_err(|e| fake_err(e.to_string()))?;
        if self.log_batches {
            tracing::info!(batch = %doc, "dataplane off: would apply nftables batch");
        }
        let mut st = self.lock();
        // Work on a copy: a failing command aborts the whole batch, as in the kernel.
        let mut table = st.table.clone();
        let cmds = doc["nftables"]
            .as_array()
            .ok_or_else(|| fake_err("no nftables array"))?;
        for cmd in cmds {
            let (verb, obj) = cmd
                .as_object()
                .and_then(|m| m.iter().next())
                .ok_or_else(|| fake_err("empty command"))?;
            let (kind, inner) = obj
                .as_object()
                .and_then(|m| m.iter().next())
                .ok_or_else(|| fake_err("empty object"))?;
            let table_name = if kind == "table" {
                inner["name"].as_str()
            } else {
                inner["table"].as_str()
            }
            .unwrap_or_default();
            if table_name != TABLE || inner["family"] != "inet" {
                return Err(fake_err(format!(
                    "batch touches foreign table {table_name}"
                )));
            }
            match (verb.as_str(), kind.as_str()) {
                ("add", "table") => {
                    table.get_or_insert_with(Vec::new);
                }
                ("delete", "table") => {
                    if table.take().is_none() {
                        return Err(fake_err("delete of absent table"));
                    }
                }
                ("add", _) => match table.as_mut() {
                    Some(objs) => objs.push(obj.clone()),
                    None => return Err(fake_err(format!("add {kind} to absent table"))),
                },
                (verb, kind) => return Err(fake_err(format!("unsupported {verb} {kind}"))),
            }
        }
        st.table = table;
        st.generation += 1;
        st.applies += 1;
        Ok(())
    }

    async fn generation(&self) -> Result<u32, DataplaneError> {
        Ok(self.lock().generation)
    }
}

/// Raw nfnetlink messages for the two questions no crate answers: the ruleset
/// generation (`NFT_MSG_GETGEN`) and whether one table exists (`NFT_MSG_GETTABLE`).
/// Hand-written because neither `nftables` (a wrapper around the `nft` binary) nor
/// `netlink-packet-*` has nf_tables message types. Constants from
/// `include/uapi/linux/netfilter/nf_tables.h` and `nfnetlink.h`.
pub mod nfnl {
    use std::io;

    use rtnetlink::sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

    const NFNL_SUBSYS_NFTABLES: u16 = 10;
    const NFT_MSG_GETTABLE: u16 = 1;
    const NFT_MSG_GETGEN: u16 = 16;
    const NFTA_TABLE_NAME: u16 = 1;
    const NFTA_GEN_ID: u16 = 1;
    const NFPROTO_INET: u8 = 1;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_ACK: u16 = 4;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    /// Multicast group of nf_tables change notifications (`NFNLGRP_NFTABLES`).
    pub const NFNLGRP_NFTABLES: u32 = 7;

    fn message(msg_type: u16, flags: u16, family: u8, attrs: &[u8]) -> Vec<u8> {
        let len = 16 + 4 + attrs.len();
        let mut m = Vec::with_capacity(len);
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | msg_type).to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        m.extend_from_slice(&0u32.to_ne_bytes()); // port id: kernel fills in
                                                  // struct nfgenmsg { nfgen_family, version = NFNETLINK_V0, res_id (be16) }
        m.extend_from_slice(&[family, 0, 0, 0]);
        m.extend_from_slice(attrs);
        m
    }

    fn attr_str(kind: u16, value: &str) -> Vec<u8> {
        let payload_len = value.len() + 1;
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + payload_len) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(value.as_bytes());
        a.push(0);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    struct Reply {
        msg_type: u16,
        body: Vec<u8>,
    }

    fn request(msg: &[u8]) -> io::Result<Vec<Reply>> {
        let mut sock = Socket::new(NETLINK_NETFILTER)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        sock.send(msg, 0)?;
        let mut out = Vec::new();
        loop {
            let mut buf = vec![0u8; 65536];
            let n = sock.recv(&mut &mut buf[..], 0)?;
            let mut off = 0;
            let mut done = false;
            while off + 16 <= n {
                let len = u32::from_ne_bytes(read4(&buf, off)) as usize;
                let msg_type = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
                if len < 16 || off + len > n {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "short netlink message",
                    ));
                }
                let body = buf[off + 16..off + len].to_vec();
                if msg_type == NLMSG_ERROR {
                    let code = i32::from_ne_bytes(read4(&body, 0));
                    if code != 0 {
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    done = true;
                } else if msg_type == NLMSG_DONE {
                    done = true;
                } else {
                    out.push(Reply { msg_type, body });
                }
                off += (len + 3) & !3;
            }
            if done || !out.is_empty() {
                return Ok(out);
            }
        }
    }

    fn read4(buf: &[u8], off: usize) -> [u8; 4] {
        let mut b = [0u8; 4];
        if let Some(s) = buf.get(off..off + 4) {
            b.copy_from_slice(s);
        }
        b
    }

    /// The nf_tables ruleset generation of the calling thread's network namespace.
    pub fn generation() -> io::Result<u32> {
        let replies = request(&message(NFT_MSG_GETGEN, NLM_F_REQUEST, 0, &[]))?;
        for r in replies {
            if r.msg_type & 0xff == NFT_MSG_GETGEN - 1 {
                // NFT_MSG_NEWGEN: nfgenmsg then attributes.
                let mut off = 4;
                while off + 4 <= r.body.len() {
                    let alen = u16::from_ne_bytes([r.body[off], r.body[off + 1]]) as usize;
                    let akind = u16::from_ne_bytes([r.body[off + 2], r.body[off + 3]]) & 0x3fff;
                    if alen < 4 {
                        break;
                    }
                    if akind == NFTA_GEN_ID && alen >= 8 {
                        // NLA_U32 in network byte order (nla_put_be32).
                        return Ok(u32::from_be_bytes(read4(&r.body, off + 4)));
                    }
                    off += (alen + 3) & !3;
                }
            }
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "no NFTA_GEN_ID in reply",
        ))
    }

    /// Whether table `inet <name>` exists in the calling thread's network namespace.
    pub fn table_exists(name: &str) -> io::Result<bool> {
        let msg = message(
            NFT_MSG_GETTABLE,
            NLM_F_REQUEST | NLM_F_ACK,
            NFPROTO_INET,
            &attr_str(NFTA_TABLE_NAME, name),
        );
        match request(&msg) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
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
