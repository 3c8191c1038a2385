//! The pure half of a reconcile pass: desired render vs observed files and the last
//! applied render → the operations to perform, per domain.
//!
//! A domain is "changed" when one of its files differs from disk (level-triggered:
//! the disk is reread each pass, so a file edited by hand is repaired) or its service
//! specs differ from the last applied ones. Unchanged domains produce no operation, so
//! they are not reloaded.

use meduza_generators::render::{Domain, DomainOutput, FileOut};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// One operation of a pass, in the order they must run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Write a file (content differs on disk or the file is missing).
    WriteFile {
        domain: Domain,
        path: String,
        mode: u32,
    },
    /// Remove a file the domain rendered before and no longer does.
    RemoveFile { domain: Domain, path: String },
    /// A domain that is new on this node: write, then start its services.
    Start { domain: Domain },
    /// A domain whose files or services changed: apply its reload strategy.
    Reload { domain: Domain },
    /// A domain no longer wanted: stop its services (files are removed too).
    Stop { domain: Domain },
}

/// Observed state of one file on disk.
pub type Observed<'a> = &'a dyn Fn(&str) -> Option<(Vec<u8>, u32)>;

/// Compute the operations that take the system from `applied` (last pass) and the
/// observed files to `desired`.
pub fn plan(
    applied: &BTreeMap<Domain, DomainOutput>,
    desired: &BTreeMap<Domain, DomainOutput>,
    observed: Observed<'_>,
) -> Vec<Op> {
    let mut ops = Vec::new();
    for (domain, out) in desired {
        let prev = applied.get(domain);
        let mut changed = false;
        for f in &out.files {
            if needs_write(f, observed) {
                ops.push(Op::WriteFile {
                    domain: domain.clone(),
                    path: f.path.clone(),
                    mode: f.mode,
                });
                changed = true;
            }
        }
        if let Some(prev) = prev {
            let now: BTreeSet<&str> = out.files.iter().map(|f| f.path.as_str()).collect();
            for f in prev.files.iter().filter(|f| !now.contains(f.path.as_str())) {
                ops.push(Op::RemoveFile {
                    domain: domain.clone(),
                    path: f.path.clone(),
                });
                changed = true;
            }
            if prev.services != out.services {
                changed = true;
            }
            if changed {
                ops.push(Op::Reload {
                    domain: domain.clone(),
                });
            }
        } else {
            ops.push(Op::Start {
                domain: domain.clone(),
            });
        }
    }
    for (domain, prev) in applied {
        if desired.contains_key(domain) {
            continue;
        }
        ops.push(Op::Stop {
            domain: domain.clone(),
        });
        for f in &prev.files {
            ops.push(Op::RemoveFile {
                domain: domain.clone(),
                path: f.path.clone(),
            });
        }
    }
    ops
}

fn needs_write(f: &FileOut, observed: Observed<'_>) -> bool {
    match observed(&f.path) {
        Some((content, mode)) => content != f.content.as_bytes() || mode != f.mode,
        None => true,
    }
}

/// Domains touched by `ops` (for logging and status).
pub fn changed_domains(ops: &[Op]) -> BTreeSet<Domain> {
    ops.iter()
        .map(|op| match op {
            Op::WriteFile { domain, .. }
            | Op::RemoveFile { domain, .. }
            | Op::Start { domain }
            | Op::Reload { domain }
            | Op::Stop { domain } => domain.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn file(path: &str, content: &str) -> FileOut {
        FileOut {
            path: path.into(),
            content: content.into(),
            mode: 0o644,
        }
    }

    fn out(files: Vec<FileOut>) -> DomainOutput {
        DomainOutput {
            files,
            services: vec![],
        }
    }

    #[test]
    fn unchanged_domain_produces_nothing_and_changed_one_reloads() {
        let disk: RefCell<BTreeMap<String, (Vec<u8>, u32)>> = RefCell::default();
        disk.borrow_mut()
            .insert("/etc/frr/frr.conf".into(), (b"a".to_vec(), 0o644));
        disk.borrow_mut()
            .insert("/etc/tinc/mesh/tinc.conf".into(), (b"t".to_vec(), 0o644));
        let observed = |p: &str| disk.borrow().get(p).cloned();
        let applied = BTreeMap::from([
            (Domain::Frr, out(vec![file("/etc/frr/frr.conf", "a")])),
            (
                Domain::Tinc,
                out(vec![file("/etc/tinc/mesh/tinc.conf", "t")]),
            ),
        ]);
        let mut desired = applied.clone();
        assert!(plan(&applied, &desired, &observed).is_empty());
        desired.insert(Domain::Frr, out(vec![file("/etc/frr/frr.conf", "b")]));
        let ops = plan(&applied, &desired, &observed);
        assert_eq!(
            ops,
            vec![
                Op::WriteFile {
                    domain: Domain::Frr,
                    path: "/etc/frr/frr.conf".into(),
                    mode: 0o644
                },
                Op::Reload {
                    domain: Domain::Frr
                },
            ]
        );
    }

    #[test]
    fn hand_edited_file_is_repaired_new_domain_started_gone_domain_stopped() {
        let observed = |_: &str| Some((b"edited".to_vec(), 0o644));
        let applied = BTreeMap::from([(
            Domain::Tinc,
            out(vec![file("/etc/tinc/mesh/tinc.conf", "t")]),
        )]);
        let desired = BTreeMap::from([(
            Domain::Openvpn("office".into()),
            out(vec![file("/etc/openvpn/office.conf", "o")]),
        )]);
        let ops = plan(&applied, &desired, &observed);
        assert_eq!(
            ops,
            vec![
                Op::WriteFile {
                    domain: Domain::Openvpn("office".into()),
                    path: "/etc/openvpn/office.conf".into(),
                    mode: 0o644
                },
                Op::Start {
                    domain: Domain::Openvpn("office".into())
                },
                Op::Stop {
                    domain: Domain::Tinc
                },
                Op::RemoveFile {
                    domain: Domain::Tinc,
                    path: "/etc/tinc/mesh/tinc.conf".into()
                },
            ]
        );
    }
}
