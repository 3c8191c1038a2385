//! Harnesses and test doubles shared by meduza's integration tests (`tests/<group>/`).
//!
//! Owns: starting and tearing down what the tests run against (real etcd alone or as a
//! cluster, network namespaces and the gateway mesh, the namespace lab of the Clash and
//! DNS tests, dnsmasq upstreams, Chromium through WebDriver, a test PKI) and the doubles
//! of programs no registry here ships (`doubles/*.py`, driven by [`doubles`]).
//! Must not: hold assertions of a test; a helper panics only when what it starts
//! cannot be started. Everything it creates has a unique name in the process (a port
//! is handed out once, a namespace carries the pid and a counter) and is removed on drop.

use std::path::{Path, PathBuf};

pub mod dns;
pub mod doubles;
pub mod etcd;
pub mod etcd_args;
pub mod etcd_cluster;
pub mod fake_node;
pub mod fleet_etcd;
pub mod fleet_proxy;
pub mod gateway;
pub mod gateway_lab;
pub mod mesh;
pub mod netns;
pub mod pki;
pub mod ports;
pub mod process;
pub mod real_mihomo;
pub mod webdriver;

/// The repository's root (scripts, docs, `tests/data`).
pub fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// The `meduza` binary cargo built for this test run. Cargo passes its path
/// (`CARGO_BIN_EXE_meduza`) only to the compilation of an integration test, not to a
/// library it depends on; it is the binary beside the test executable's `deps/`
/// directory (`target/<profile>/deps/<test>-<hash>` → `target/<profile>/meduza`),
/// where cargo puts the binaries it builds for integration tests.
pub fn meduza_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|profile| profile.join("meduza"))
        .expect("test executable in target/<profile>/deps/");
    assert!(
        bin.is_file(),
        "no meduza binary at {}: run the tests with cargo test",
        bin.display()
    );
    bin
}

/// Cargo's scratch directory for tests (`CARGO_TARGET_TMPDIR`, `target/tmp`), which
/// outlives a test: logs kept for reading after a failure go there.
pub fn target_tmpdir() -> PathBuf {
    let dir = meduza_bin()
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/meduza")
        .join("tmp");
    std::fs::create_dir_all(&dir).expect("target/tmp");
    dir
}
