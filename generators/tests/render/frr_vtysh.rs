//! The generated `frr.conf` of every example node is accepted by Debian's FRR:
//! `vtysh -C -f FILE` (dry run: parses every line against vtysh's command tree, no
//! daemons needed) exits 0. Fails, never skips, when vtysh is missing.

use crate::common;

use meduza_generators::render::{render_node, Domain};
use std::path::Path;
use std::process::{Command, Output};

const VTYSH: &str = "/usr/bin/vtysh";

/// `vtysh -C -f path`: the dry run of one configuration file.
fn vtysh_check(path: &Path) -> Output {
    Command::new(VTYSH)
        .arg("-C")
        .arg("-f")
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {VTYSH} (install Debian's frr): {e}"))
}

fn check_snapshot(snap: &meduza_generators::Snapshot, label: &str) -> usize {
    let cfg = common::parse(snap);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut checked = 0;
    for id in cfg.nodes.keys() {
        let r = render_node(&cfg, id, &common::env()).expect("renders");
        let Some(frr) = r.domains.get(&Domain::Frr) else {
            continue;
        };
        let conf = frr
            .files
            .iter()
            .find(|f| f.path == "/etc/frr/frr.conf")
            .expect("frr domain has frr.conf");
        let path = dir.path().join(format!("{label}-{id}.conf"));
        std::fs::write(&path, &conf.content).expect("write frr.conf");
        let out = vtysh_check(&path);
        assert!(
            out.status.success(),
            "vtysh -C refused {label}/{id} frr.conf ({}):\n{}{}\n--- file ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            conf.content
        );
        checked += 1;
    }
    checked
}

#[test]
fn vtysh_accepts_every_generated_frr_conf() {
    let n = check_snapshot(&common::example_snapshot(), "tinc")
        + check_snapshot(&common::example_easytier_snapshot(), "easytier");
    assert_eq!(n, 6, "every example node runs FRR in both scenarios");
}

#[test]
fn vtysh_check_can_fail() {
    // The check is meaningful: a broken line is refused.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.conf");
    std::fs::write(&path, "router bgp 65010\n neighbor 10.0.0.1 remote-ass 1\n").expect("write");
    assert!(!vtysh_check(&path).status.success());
}
