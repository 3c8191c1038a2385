//! Fuzz target for the DNS frontend's request path: any bytes as a query (UDP and
//! TCP) and as an upstream answer going through the cache.
//!
//!   cargo fuzz run dns_request -- -max_len=1500
//!
//! The same `Harness::exercise` runs on random input in the unit tests
//! (`dns::frontend::tests::random_packets_never_panic`).

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use meduza::dns::fuzzing::Harness;

static HARNESS: LazyLock<Harness> = LazyLock::new(|| Harness::new().expect("harness"));

fuzz_target!(|data: &[u8]| {
    HARNESS.exercise(data);
});
