//! Golden files: every node of the example snapshot (with tinc, and switched to
//! EasyTier) rendered by every generator, compared byte for byte with
//! `tests/golden/<scenario>/<node>/<domain>.txt` and `plans.json`.
//! `UPDATE_GOLDEN=1 cargo test -p meduza-generators --test render golden::` rewrites them.

use crate::common;

use meduza_generators::render::{render_node, DomainOutput, Rendered};
use meduza_generators::Snapshot;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn golden_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn domain_text(d: &DomainOutput) -> String {
    let mut s = String::new();
    for f in &d.files {
        let _ = write!(
            s,
            "===== {} (mode {:04o}) =====\n{}",
            f.path, f.mode, f.content
        );
        if !f.content.ends_with('\n') {
            s.push_str("\n<no newline at end of file>\n");
        }
    }
    let _ = writeln!(
        s,
        "===== services =====\n{}",
        serde_json::to_string_pretty(&d.services).expect("services serialize")
    );
    s
}

fn plans_text(r: &Rendered) -> String {
    let v = serde_json::json!({
        "domains": r.domains.keys().map(|d| d.label()).collect::<Vec<_>>(),
        "frr_enabled": r.frr_enabled,
        "tproxy": r.tproxy,
        "dns": r.dns,
        "wireguard": r.wireguard,
        "clash": r.clash,
        "mosdns": r.mosdns,
    });
    serde_json::to_string_pretty(&v).expect("plans serialize") + "\n"
}

/// Everything one scenario renders: relative path → content.
fn render_scenario(snap: &Snapshot) -> BTreeMap<String, String> {
    let cfg = common::parse(snap);
    let mut out = BTreeMap::new();
    for id in cfg.nodes.keys() {
        let r = match render_node(&cfg, id, &common::env()) {
            Ok(r) => r,
            Err(e) => panic!("node {id} must render: {e}"),
        };
        for (domain, d) in &r.domains {
            let name = domain.label().replace('/', "_");
            out.insert(format!("{id}/{name}.txt"), domain_text(d));
        }
        out.insert(format!("{id}/plans.json"), plans_text(&r));
    }
    out
}

fn existing(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Ok(nodes) = std::fs::read_dir(dir) else {
        return out;
    };
    for node in nodes.flatten() {
        for f in std::fs::read_dir(node.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let rel = format!(
                "{}/{}",
                node.file_name().to_string_lossy(),
                f.file_name().to_string_lossy()
            );
            out.insert(rel, std::fs::read_to_string(f.path()).unwrap_or_default());
        }
    }
    out
}

fn check(scenario: &str, snap: &Snapshot) {
    let dir = golden_root().join(scenario);
    let rendered = render_scenario(snap);
    if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1") {
        let _ = std::fs::remove_dir_all(&dir);
        for (rel, content) in &rendered {
            let p = dir.join(rel);
            std::fs::create_dir_all(p.parent().expect("has parent")).expect("mkdir golden");
            std::fs::write(&p, content).expect("write golden");
        }
        return;
    }
    let on_disk = existing(&dir);
    let mut problems = Vec::new();
    for (rel, content) in &rendered {
        match on_disk.get(rel) {
            None => problems.push(format!("missing golden {scenario}/{rel}")),
            Some(g) if g != content => {
                let line = g
                    .lines()
                    .zip(content.lines())
                    .position(|(a, b)| a != b)
                    .map_or_else(|| "length".to_string(), |n| format!("line {}", n + 1));
                problems.push(format!("{scenario}/{rel} differs at {line}"));
            }
            Some(_) => {}
        }
    }
    for rel in on_disk.keys().filter(|k| !rendered.contains_key(*k)) {
        problems.push(format!(
            "stale golden {scenario}/{rel} (no longer rendered)"
        ));
    }
    assert!(
        problems.is_empty(),
        "golden mismatch (run with UPDATE_GOLDEN=1 to accept):\n{}",
        problems.join("\n")
    );
}

#[test]
fn example_with_tinc_matches_golden() {
    check("three-nodes", &common::example_snapshot());
}

#[test]
fn example_with_easytier_matches_golden() {
    check("three-nodes-easytier", &common::example_easytier_snapshot());
}

#[test]
fn every_generator_is_exercised_by_the_goldens() {
    let mut labels = std::collections::BTreeSet::new();
    for snap in [
        common::example_snapshot(),
        common::example_easytier_snapshot(),
    ] {
        let cfg = common::parse(&snap);
        for id in cfg.nodes.keys() {
            let r = render_node(&cfg, id, &common::env()).expect("renders");
            for d in r.domains.keys() {
                labels.insert(d.label().split('/').next().unwrap_or_default().to_string());
            }
        }
    }
    let want = [
        "clash",
        "easytier",
        "frr",
        "hosts",
        "mosdns",
        "openvpn",
        "tinc",
        "wireguard",
    ];
    for w in want {
        assert!(
            labels.contains(w),
            "no example node renders {w}: {labels:?}"
        );
    }
}
