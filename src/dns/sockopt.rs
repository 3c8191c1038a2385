//! Socket options shared by the listeners (`server`) and the upstream sockets
//! (`exchange`). A leaf module: it keeps those two from importing each other.
//!
//! Owns: how a socket's receive buffer is raised.
//! Must not: create, bind or read sockets.

/// Raises a socket's receive buffer: SO_RCVBUFFORCE when we have CAP_NET_ADMIN
/// (`meduza run` does), else SO_RCVBUF capped by net.core.rmem_max (212 KiB by
/// default, about 200 small datagrams: too few for 500 outstanding queries).
pub(crate) fn set_rcvbuf<F: std::os::fd::AsFd>(fd: &F, bytes: usize) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(fd, sockopt::RcvBufForce, &bytes).is_err() {
        let _ = setsockopt(fd, sockopt::RcvBuf, &bytes);
    }
}
