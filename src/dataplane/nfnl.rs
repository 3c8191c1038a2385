//! Raw nfnetlink (`NETLINK_NETFILTER`) for nf_tables: the message writer, the
//! ruleset generation (`NFT_MSG_GETGEN`), the "does table `inet <name>` exist?" probe
//! (`NFT_MSG_GETTABLE`) and the sending of one batch as one kernel transaction.
//!
//! Owns: the nfnetlink envelope (`struct nfgenmsg`, the `NFNL_MSG_BATCH_BEGIN … END`
//! batch, sequence numbers and the names of acknowledged messages), the writing of
//! messages and attributes into one buffer, and the reading of acknowledgements.
//! Must not: decide what a batch contains (that is `nfnl_ruleset`), or run `nft`.
//!
//! The netlink framing itself — `nlmsghdr`, attribute TLVs, nesting flags, 4-byte
//! alignment, `NLMSG_ERROR` — is `netlink-packet-core`'s (`NetlinkHeader`,
//! `NetlinkBuffer`, `NlaBuffer`, `NlasIterator`, `ErrorBuffer`), the crate rtnetlink
//! already brings. What is ours: the nfnetlink and nf_tables numbers (no crate has
//! nf_tables message types: `nftables` wraps the `nft` binary, and the pure-Rust
//! nf_tables crates do not write the rule comments and set key byte order `nft list`
//! reads back) and a streaming writer, so 10,000 prefixes are written in place
//! without building a tree of attribute values first. Constants from
//! `include/uapi/linux/netfilter/nf_tables.h`, `nfnetlink.h` and `netlink.h`.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;

use netlink_packet_core::{
    Emitable, ErrorBuffer, NetlinkBuffer, NetlinkHeader, NlaBuffer, NlasIterator, NLA_ALIGNTO,
    NLA_F_NET_BYTEORDER, NLA_HEADER_SIZE, NLMSG_DONE, NLMSG_ERROR,
};
use rtnetlink::sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};

pub use netlink_packet_core::{
    NLA_F_NESTED, NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST,
};

pub const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub const NFNL_MSG_BATCH_BEGIN: u16 = 16;
pub const NFNL_MSG_BATCH_END: u16 = 17;

pub const NFT_MSG_NEWTABLE: u16 = 0;
pub const NFT_MSG_GETTABLE: u16 = 1;
pub const NFT_MSG_DELTABLE: u16 = 2;
pub const NFT_MSG_NEWCHAIN: u16 = 3;
pub const NFT_MSG_NEWRULE: u16 = 6;
pub const NFT_MSG_NEWSET: u16 = 9;
pub const NFT_MSG_NEWSETELEM: u16 = 12;
pub const NFT_MSG_NEWGEN: u16 = 15;
pub const NFT_MSG_GETGEN: u16 = 16;

pub const NFPROTO_UNSPEC: u8 = 0;
pub const NFPROTO_INET: u8 = 1;

/// `NLMSGERR_ATTR_MSG` and `NLMSGERR_ATTR_OFFS` of an extended ack.
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLMSGERR_ATTR_OFFS: u16 = 2;
/// `sizeof(struct nlmsghdr)`.
const NLMSG_HDRLEN: usize = 16;

const NFTA_TABLE_NAME: u16 = 1;
const NFTA_GEN_ID: u16 = 1;

/// Multicast group of nf_tables change notifications (`NFNLGRP_NFTABLES`).
pub const NFNLGRP_NFTABLES: u32 = 7;

/// The largest attribute: its length is a `u16` (`struct nlattr`).
pub const NLA_MAX_LEN: usize = u16::MAX as usize;

/// Errors of nfnetlink I/O and of a rejected batch.
#[derive(Debug, thiserror::Error)]
pub enum NfnlError {
    #[error("netlink {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The kernel refused one message (or the commit, reported on the batch header);
    /// the whole transaction was aborted.
    #[error("kernel rejected {what}: {source}{}", kernel_detail(.message, .offset))]
    Rejected {
        what: String,
        #[source]
        source: io::Error,
        /// The extended-ack text, when the kernel gave one.
        message: Option<String>,
        /// Byte offset of the offending attribute inside that message.
        offset: Option<u32>,
    },
    #[error("no acknowledgement for {what} (transaction state unknown)")]
    MissingAck { what: String },
    #[error("attribute too long ({len} bytes) in {what}")]
    AttrTooLong { what: String, len: usize },
    #[error("malformed netlink reply: {reason}")]
    BadReply { reason: &'static str },
}

fn kernel_detail(message: &Option<String>, offset: &Option<u32>) -> String {
    match (message, offset) {
        (Some(m), Some(o)) => format!(" ({m}; attribute at byte {o})"),
        (Some(m), None) => format!(" ({m})"),
        (None, Some(o)) => format!(" (attribute at byte {o})"),
        (None, None) => String::new(),
    }
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> NfnlError {
    move |source| NfnlError::Io { op, source }
}

/// What one message of a batch does, to name it in an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageInfo {
    pub seq: u32,
    pub what: String,
}

/// An encoded batch: `NFNL_MSG_BATCH_BEGIN`, the messages (each with `NLM_F_ACK` and
/// its own sequence number), `NFNL_MSG_BATCH_END`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub bytes: Vec<u8>,
    /// Sequence number of the batch header: errors of the commit itself and of the
    /// batch as a whole are reported against it.
    pub begin_seq: u32,
    /// The acknowledged messages, in order.
    pub messages: Vec<MessageInfo>,
}

/// Writes netlink messages and attributes into one buffer (host byte order for the
/// netlink headers, as the kernel expects; values as each attribute defines).
#[derive(Debug)]
pub struct Writer {
    buf: Vec<u8>,
    msg_start: usize,
    seq: u32,
    begin_seq: u32,
    messages: Vec<MessageInfo>,
    too_long: Option<(String, usize)>,
}

impl Writer {
    /// A batch for subsystem nf_tables, sequence numbers from `first_seq`.
    pub fn batch(first_seq: u32) -> Self {
        let mut w = Self {
            buf: Vec::with_capacity(8192),
            msg_start: 0,
            seq: first_seq,
            begin_seq: first_seq,
            messages: Vec::new(),
            too_long: None,
        };
        w.header(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            NFPROTO_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
        );
        w.finish_message();
        w
    }

    fn header(&mut self, msg_type: u16, flags: u16, family: u8, res_id: u16) {
        self.msg_start = self.buf.len();
        let mut header = NetlinkHeader::default();
        header.message_type = msg_type;
        header.flags = flags;
        header.sequence_number = self.seq;
        // Length set by `finish_message`; port id 0: the kernel's.
        self.buf.resize(self.msg_start + header.buffer_len(), 0);
        header.emit(&mut self.buf[self.msg_start..]);
        self.seq = self.seq.wrapping_add(1);
        // struct nfgenmsg { nfgen_family, version = NFNETLINK_V0, res_id (be16) }
        self.buf.push(family);
        self.buf.push(0);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
    }

    /// Start an nf_tables message `msg_type` with `flags` (plus `NLM_F_REQUEST` and
    /// `NLM_F_ACK`) for `family`; `what` names it in errors.
    pub fn message(&mut self, msg_type: u16, flags: u16, family: u8, what: String) {
        let seq = self.seq;
        self.header(
            (NFNL_SUBSYS_NFTABLES << 8) | msg_type,
            NLM_F_REQUEST | NLM_F_ACK | flags,
            family,
            0,
        );
        self.messages.push(MessageInfo { seq, what });
    }

    /// Close the current message (set its length).
    pub fn finish_message(&mut self) {
        let len = self.buf.len() - self.msg_start;
        NetlinkBuffer::new(&mut self.buf[self.msg_start..])
            .set_length(u32::try_from(len).unwrap_or(u32::MAX));
    }

    /// Close the batch.
    pub fn into_batch(mut self) -> Result<Batch, NfnlError> {
        if let Some((what, len)) = self.too_long.take() {
            return Err(NfnlError::AttrTooLong { what, len });
        }
        self.header(
            NFNL_MSG_BATCH_END,
            NLM_F_REQUEST,
            NFPROTO_UNSPEC,
            NFNL_SUBSYS_NFTABLES,
        );
        self.finish_message();
        Ok(Batch {
            bytes: self.buf,
            begin_seq: self.begin_seq,
            messages: self.messages,
        })
    }

    /// One attribute with raw `data`, zero-padded to the netlink alignment.
    pub fn put(&mut self, kind: u16, data: &[u8]) {
        let len = NLA_HEADER_SIZE + data.len();
        if len > NLA_MAX_LEN {
            self.note_too_long(len);
        }
        let at = self.buf.len();
        self.buf.resize(at + nla_align(len), 0);
        let mut nla = NlaBuffer::new(&mut self.buf[at..at + len]);
        nla.set_kind(kind);
        // An oversized length wraps here; `into_batch` refuses the batch.
        nla.set_length(len as u16);
        self.buf[at + NLA_HEADER_SIZE..at + len].copy_from_slice(data);
    }

    /// A NUL-terminated string attribute (`NLA_STRING`/`NLA_NUL_STRING`).
    pub fn put_str(&mut self, kind: u16, value: &str) {
        let mut data = Vec::with_capacity(value.len() + 1);
        data.extend_from_slice(value.as_bytes());
        data.push(0);
        self.put(kind, &data);
    }

    /// A `u32` in network byte order (nf_tables' `nla_get_be32` attributes).
    pub fn put_be32(&mut self, kind: u16, value: u32) {
        self.put(kind, &value.to_be_bytes());
    }

    /// Open a nested attribute; close it with [`end_nest`](Self::end_nest). Bit 14
    /// of `kind` is kept (as `NLA_F_NET_BYTEORDER`): the elements of a set list are
    /// numbered past 16,383 as libnftnl numbers them.
    pub fn nest(&mut self, kind: u16) -> usize {
        let at = self.buf.len();
        self.buf.resize(at + NLA_HEADER_SIZE, 0);
        let mut nla = NlaBuffer::new(&mut self.buf[at..]);
        nla.set_kind(kind);
        if kind & NLA_F_NET_BYTEORDER != 0 {
            nla.set_network_byte_order_flag();
        }
        nla.set_nested_flag();
        at
    }

    pub fn end_nest(&mut self, at: usize) {
        let len = self.buf.len() - at;
        if len > NLA_MAX_LEN {
            self.note_too_long(len);
        }
        // Everything inside is aligned, so the nest is too.
        NlaBuffer::new(&mut self.buf[at..]).set_length(len as u16);
    }

    /// Bytes written since `at` (the length a nest opened there has so far).
    pub fn len_since(&self, at: usize) -> usize {
        self.buf.len() - at
    }

    fn note_too_long(&mut self, len: usize) {
        if self.too_long.is_none() {
            let what = self
                .messages
                .last()
                .map_or_else(|| "batch header".to_string(), |m| m.what.clone());
            self.too_long = Some((what, len));
        }
    }
}

/// `NLA_ALIGN`: attributes (and messages) start on 4-byte boundaries.
fn nla_align(len: usize) -> usize {
    (len + NLA_ALIGNTO - 1) & !(NLA_ALIGNTO - 1)
}

/// The value of an attribute (its length field, not the padding, bounds it).
fn nla_value<'a>(nla: &NlaBuffer<&'a [u8]>) -> &'a [u8] {
    &nla.into_inner()[NLA_HEADER_SIZE..usize::from(nla.length())]
}

/// One message of a reply datagram.
struct Reply {
    msg_type: u16,
    flags: u16,
    seq: u32,
    body: Vec<u8>,
}

fn parse_replies(buf: &[u8]) -> Result<Vec<Reply>, NfnlError> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let msg = NetlinkBuffer::new_checked(&buf[off..]).map_err(|_| NfnlError::BadReply {
            reason: "short netlink message",
        })?;
        out.push(Reply {
            msg_type: msg.message_type(),
            flags: msg.flags(),
            seq: msg.sequence_number(),
            body: msg.payload().to_vec(),
        });
        off += nla_align(msg.length() as usize);
    }
    Ok(out)
}

/// The error code of an `NLMSG_ERROR` body (0: an acknowledgement).
fn error_code(body: &[u8]) -> Result<i32, NfnlError> {
    ErrorBuffer::new_checked(body)
        .map(|e| e.code().map_or(0, i32::from))
        .map_err(|_| NfnlError::BadReply {
            reason: "short NLMSG_ERROR",
        })
}

/// An `NLMSG_ERROR` body: the error code (0 = ack) and the extended-ack text and
/// attribute offset when present. The socket has `NETLINK_CAP_ACK` set, so only the
/// header of the original message is echoed.
fn parse_error(r: &Reply) -> (i32, Option<String>, Option<u32>) {
    let code = error_code(&r.body).unwrap_or(-libc::EBADMSG);
    let (mut message, mut offset) = (None, None);
    if r.flags & NLM_F_ACK_TLVS != 0 {
        // struct nlmsgerr { int error; struct nlmsghdr msg; } then attributes.
        let tlvs = r.body.get(4 + NLMSG_HDRLEN..).unwrap_or_default();
        for nla in NlasIterator::new(tlvs).map_while(Result::ok) {
            let data = nla_value(&nla);
            match nla.kind() {
                NLMSGERR_ATTR_MSG => {
                    let text = data.split(|b| *b == 0).next().unwrap_or_default();
                    message = Some(String::from_utf8_lossy(text).into_owned());
                }
                NLMSGERR_ATTR_OFFS => {
                    offset = <[u8; 4]>::try_from(data).ok().map(u32::from_ne_bytes);
                }
                _ => {}
            }
        }
    }
    (code, message, offset)
}

fn open_socket() -> Result<Socket, NfnlError> {
    let mut sock = Socket::new(NETLINK_NETFILTER).map_err(io_err("open socket"))?;
    sock.bind_auto().map_err(io_err("bind socket"))?;
    sock.connect(&SocketAddr::new(0, 0))
        .map_err(io_err("connect socket"))?;
    Ok(sock)
}

fn set_int_opt(sock: &Socket, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    // SAFETY: `sock` is an open socket for the duration of the call; the option value
    // is a c_int on the stack whose size is passed alongside it.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        // Best effort: without the option the send fails with a clear EMSGSIZE, or
        // errors come without the kernel's text.
        tracing::debug!(
            name,
            err = %io::Error::last_os_error(),
            "netlink socket option not set"
        );
    }
}

/// A socket for one batch of `len` bytes, in the calling thread's network namespace.
pub fn batch_socket(len: usize) -> Result<Socket, NfnlError> {
    let sock = open_socket()?;
    sock.set_cap_ack(true)
        .map_err(io_err("set NETLINK_CAP_ACK"))?;
    sock.set_ext_ack(true)
        .map_err(io_err("set NETLINK_EXT_ACK"))?;
    // A batch is one datagram: netlink refuses one larger than the send buffer
    // (`netlink_sendmsg`: EMSGSIZE), and 10,000 prefixes are ~400 KB. nft does the
    // same (SO_SNDBUFFORCE needs CAP_NET_ADMIN, which changing nftables needs anyway).
    let want = i32::try_from(len + 4096).unwrap_or(i32::MAX);
    set_int_opt(&sock, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, want);
    let timeout = libc::timeval {
        // `time_t` is i64 on every target we build; i32 converts into it losslessly
        // (naming `libc::time_t` is deprecated on musl, whose time_t is changing).
        tv_sec: RECV_TIMEOUT_SECS.into(),
        tv_usec: 0,
    };
    // SAFETY: `sock` is open; `timeout` is a timeval on the stack whose size is passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(NfnlError::Io {
            op: "set SO_RCVTIMEO",
            source: io::Error::last_os_error(),
        });
    }
    Ok(sock)
}

/// Send `batch` as one transaction in the calling thread's network namespace.
pub fn send_batch(batch: &Batch) -> Result<(), NfnlError> {
    send_batch_on(&batch_socket(batch.bytes.len())?, batch)
}

/// Send `batch` on `sock` (from [`batch_socket`]) and wait for the kernel's verdict
/// on every message. The kernel processes a batch inside `sendmsg` and queues one
/// reply per message flagged `NLM_F_ACK` (errors included) after the commit or
/// abort, or a single error against the batch header when the batch as a whole or
/// the commit failed (`nfnetlink_rcv_batch`).
pub fn send_batch_on(sock: &Socket, batch: &Batch) -> Result<(), NfnlError> {
    let sent = sock.send(&batch.bytes, 0).map_err(io_err("send batch"))?;
    if sent != batch.bytes.len() {
        return Err(NfnlError::Io {
            op: "send batch",
            source: io::Error::new(io::ErrorKind::WriteZero, "short send"),
        });
    }
    let mut pending: HashMap<u32, &str> = batch
        .messages
        .iter()
        .map(|m| (m.seq, m.what.as_str()))
        .collect();
    let mut first_error: Option<NfnlError> = None;
    let mut buf = vec![0u8; 65536];
    while !pending.is_empty() {
        let n = match sock.recv(&mut &mut buf[..], 0) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                break;
            }
            Err(source) => {
                return Err(NfnlError::Io {
                    op: "receive acknowledgements",
                    source,
                })
            }
        };
        for r in parse_replies(&buf[..n])? {
            if r.msg_type != NLMSG_ERROR {
                continue;
            }
            let (code, message, offset) = parse_error(&r);
            if r.seq == batch.begin_seq && !pending.contains_key(&r.seq) {
                // The batch as a whole or its commit failed: nothing more follows.
                return Err(NfnlError::Rejected {
                    what: "the transaction (batch or commit)".into(),
                    source: io::Error::from_raw_os_error(-code),
                    message,
                    offset,
                });
            }
            let Some(what) = pending.remove(&r.seq) else {
                continue;
            };
            if code != 0 && first_error.is_none() {
                first_error = Some(NfnlError::Rejected {
                    what: what.to_string(),
                    source: io::Error::from_raw_os_error(-code),
                    message,
                    offset,
                });
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    if let Some(what) = batch
        .messages
        .iter()
        .find(|m| pending.contains_key(&m.seq))
        .map(|m| m.what.clone())
    {
        return Err(NfnlError::MissingAck { what });
    }
    Ok(())
}

/// How long to wait for acknowledgements. The kernel answers before `sendmsg`
/// returns; this only bounds a kernel that answers nothing.
const RECV_TIMEOUT_SECS: i32 = 10;

/// A single request (not a batch) and its replies, up to `NLMSG_DONE` or the ack.
fn request(msg: &[u8]) -> io::Result<Vec<(u16, Vec<u8>)>> {
    let sock = open_socket().map_err(|e| match e {
        NfnlError::Io { source, .. } => source,
        other => io::Error::other(other.to_string()),
    })?;
    sock.send(msg, 0)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let n = sock.recv(&mut &mut buf[..], 0)?;
        let replies =
            parse_replies(&buf[..n]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let mut done = false;
        for r in replies {
            if r.msg_type == NLMSG_ERROR {
                let code = error_code(&r.body)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
                done = true;
            } else if r.msg_type == NLMSG_DONE {
                done = true;
            } else {
                out.push((r.msg_type, r.body));
            }
        }
        if done || !out.is_empty() {
            return Ok(out);
        }
    }
}

/// A single nf_tables request message with sequence number 1.
fn single(msg_type: u16, flags: u16, family: u8, attrs: impl FnOnce(&mut Writer)) -> Vec<u8> {
    let mut w = Writer {
        buf: Vec::with_capacity(64),
        msg_start: 0,
        seq: 1,
        begin_seq: 1,
        messages: Vec::new(),
        too_long: None,
    };
    w.header((NFNL_SUBSYS_NFTABLES << 8) | msg_type, flags, family, 0);
    attrs(&mut w);
    w.finish_message();
    w.buf
}

/// The nf_tables ruleset generation of the calling thread's network namespace.
pub fn generation() -> io::Result<u32> {
    let replies = request(&single(
        NFT_MSG_GETGEN,
        NLM_F_REQUEST,
        NFPROTO_UNSPEC,
        |_| {},
    ))?;
    for (msg_type, body) in replies {
        if msg_type & 0xff != NFT_MSG_NEWGEN {
            continue;
        }
        // nfgenmsg, then attributes.
        let attrs = body.get(4..).unwrap_or_default();
        for nla in NlasIterator::new(attrs).map_while(Result::ok) {
            if let (NFTA_GEN_ID, Ok(id)) = (nla.kind(), <[u8; 4]>::try_from(nla_value(&nla))) {
                // NLA_U32 in network byte order (nla_put_be32).
                return Ok(u32::from_be_bytes(id));
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
    let msg = single(
        NFT_MSG_GETTABLE,
        NLM_F_REQUEST | NLM_F_ACK,
        NFPROTO_INET,
        |w| w.put_str(NFTA_TABLE_NAME, name),
    );
    match request(&msg) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_ne_bytes(b[off..off + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_ne_bytes(b[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn batch_envelope_has_begin_end_and_acked_messages() {
        let mut w = Writer::batch(7);
        w.message(NFT_MSG_DELTABLE, 0, NFPROTO_INET, "delete table".into());
        w.put_str(NFTA_TABLE_NAME, "meduza");
        w.finish_message();
        let b = w.into_batch().unwrap();
        assert_eq!(b.begin_seq, 7);
        assert_eq!(
            b.messages,
            vec![MessageInfo {
                seq: 8,
                what: "delete table".into()
            }]
        );
        let bytes = &b.bytes;
        // BATCH_BEGIN: 20 bytes, type 16, request only, res_id = htons(10).
        assert_eq!(u32_at(bytes, 0), 20);
        assert_eq!(u16_at(bytes, 4), NFNL_MSG_BATCH_BEGIN);
        assert_eq!(u16_at(bytes, 6), NLM_F_REQUEST);
        assert_eq!(u32_at(bytes, 8), 7);
        assert_eq!(&bytes[16..20], &[0, 0, 0, 10]);
        // DELTABLE: header 16 + nfgenmsg 4 + name "meduza\0" padded (4 + 7 → 12).
        assert_eq!(u32_at(bytes, 20), 32);
        assert_eq!(u16_at(bytes, 24), (10 << 8) | NFT_MSG_DELTABLE);
        assert_eq!(u16_at(bytes, 26), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32_at(bytes, 28), 8);
        assert_eq!(&bytes[36..40], &[NFPROTO_INET, 0, 0, 0]);
        assert_eq!(u16_at(bytes, 40), 11);
        assert_eq!(u16_at(bytes, 42), NFTA_TABLE_NAME);
        assert_eq!(&bytes[44..52], b"meduza\0\0");
        // BATCH_END.
        assert_eq!(u32_at(bytes, 52), 20);
        assert_eq!(u16_at(bytes, 56), NFNL_MSG_BATCH_END);
        assert_eq!(u32_at(bytes, 60), 9);
        assert_eq!(bytes.len(), 72);
    }

    #[test]
    fn nests_carry_their_length_and_the_nested_flag() {
        let mut w = Writer::batch(0);
        w.message(NFT_MSG_NEWRULE, 0, NFPROTO_INET, "rule".into());
        let at = w.nest(4);
        w.put_be32(2, 0xffff_ff6a);
        w.put(1, &[1]);
        w.end_nest(at);
        w.finish_message();
        let b = w.into_batch().unwrap();
        let m = &b.bytes[20..];
        assert_eq!(u32_at(m, 0), 20 + 4 + 8 + 8);
        assert_eq!(u16_at(m, 20), 20);
        assert_eq!(u16_at(m, 22), 4 | NLA_F_NESTED);
        assert_eq!(&m[28..32], &[0xff, 0xff, 0xff, 0x6a]);
        // A one-byte attribute: length 5, padded to 8.
        assert_eq!(u16_at(m, 32), 5);
        assert_eq!(&m[36..40], &[1, 0, 0, 0]);
    }

    #[test]
    fn oversized_attribute_is_an_error_naming_the_message() {
        let mut w = Writer::batch(0);
        w.message(NFT_MSG_NEWSETELEM, 0, NFPROTO_INET, "add elements".into());
        w.put(1, &vec![0u8; NLA_MAX_LEN]);
        w.finish_message();
        match w.into_batch() {
            Err(NfnlError::AttrTooLong { what, len }) => {
                assert_eq!(what, "add elements");
                assert_eq!(len, NLA_MAX_LEN + 4);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn error_replies_yield_code_text_and_offset() {
        // NLMSG_ERROR with NLM_F_ACK_TLVS: error -17, echoed header, MSG, OFFS.
        let mut body = Vec::new();
        body.extend_from_slice(&(-17i32).to_ne_bytes());
        body.extend_from_slice(&[0u8; 16]);
        body.extend_from_slice(&9u16.to_ne_bytes());
        body.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        body.extend_from_slice(b"bad\0\0\0\0\0");
        body.extend_from_slice(&8u16.to_ne_bytes());
        body.extend_from_slice(&NLMSGERR_ATTR_OFFS.to_ne_bytes());
        body.extend_from_slice(&36u32.to_ne_bytes());
        let mut msg = Vec::new();
        msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        msg.extend_from_slice(&NLM_F_ACK_TLVS.to_ne_bytes());
        msg.extend_from_slice(&5u32.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&body);
        let replies = parse_replies(&msg).unwrap();
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].seq, 5);
        assert_eq!(
            parse_error(&replies[0]),
            (-17, Some("bad".to_string()), Some(36))
        );
        assert!(parse_replies(&msg[..msg.len() - 1]).is_err());
    }
}
