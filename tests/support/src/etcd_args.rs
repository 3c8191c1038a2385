//! The command line of a single-member test etcd, shared by every harness that starts
//! one (loopback servers in `etcd.rs` and `fleet_etcd.rs`, the servers inside network
//! namespaces in `mesh.rs` and `doubles/gateway_lab.rs`), and the `etcdctl put` the
//! namespace harnesses write keys with.

use std::ffi::OsString;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// `--name`, `--data-dir`, client and peer URLs (listen = advertise) and the one-member
/// initial cluster. `name` must be unique per server when a start checks identity.
pub fn etcd_args(name: &str, data_dir: &Path, client_url: &str, peer_url: &str) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["--name".into(), name.into(), "--data-dir".into()];
    args.push(data_dir.as_os_str().to_owned());
    for (flag, value) in [
        ("--listen-client-urls", client_url),
        ("--advertise-client-urls", client_url),
        ("--listen-peer-urls", peer_url),
        ("--initial-advertise-peer-urls", peer_url),
    ] {
        args.push(flag.into());
        args.push(value.into());
    }
    args.push("--initial-cluster".into());
    args.push(format!("{name}={peer_url}").into());
    args
}

/// `etcdctl put key` inside network namespace `ns`, the value on stdin (so a value
/// starting with `-` or spanning lines is taken as it is); panics on failure.
pub fn etcdctl_put_in_netns(ns: &str, endpoint: &str, key: &str, value: &str) {
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "etcdctl",
            "--endpoints",
            endpoint,
            "put",
            key,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("etcdctl must be installed (scripts/install-deps)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(value.as_bytes())
        .expect("write value");
    assert!(
        child.wait().expect("etcdctl").success(),
        "etcdctl put {key} failed"
    );
}
