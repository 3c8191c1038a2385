//! Free loopback ports for servers the tests start as separate processes (etcd).
//!
//! Asking the kernel for port 0 and closing the socket leaves a window before the
//! server binds it; a test running in parallel in the same binary may be handed the
//! same port in that window, and two etcds then fight over it (one fails to bind and
//! the other test unknowingly talks to a neighbour's server). Within one test process
//! a port is therefore handed out at most once (this module is the one set: every
//! helper of this crate asks it); across binaries `cargo test` runs them one after
//! the other.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback TCP port free now and never returned before by this process.
pub fn unique_free_port() -> u16 {
    let mut guard = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let seen = guard.get_or_insert_with(HashSet::new);
    // Keep the refused sockets open until a fresh port comes up, so the kernel does
    // not offer the same one again.
    let mut held = Vec::new();
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port");
        let port = l.local_addr().expect("local addr").port();
        if seen.insert(port) {
            return port;
        }
        held.push(l);
    }
}
