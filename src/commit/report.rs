//! The report of `meduza commit`, built as data: validating a snapshot with the
//! gateways' own model, rendering each selected node and diffing its files, in-process
//! plans and services against the previous commit's rendering ([`plan`]), and the human
//! text of the result ([`render_text`]).
//!
//! Must not: do I/O (reading etcd and committing are [`super`]'s).

use std::collections::{BTreeMap, BTreeSet};

use meduza_generators::render::{self, RenderEnv, Rendered};
use meduza_generators::{Config, Snapshot, ValidationError, Warning};
use serde::Serialize;

use super::{EXIT_CONFLICT, EXIT_INVALID};
use crate::offline;

/// How the run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// `/commit` was bumped.
    Committed,
    /// `--dry-run` and valid: nothing committed.
    DryRun,
    /// Validation errors: nothing committed (exit 2).
    Invalid,
    /// A key changed since the validation: nothing committed (exit 3).
    Conflict,
}

impl Outcome {
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Committed | Outcome::DryRun => 0,
            Outcome::Invalid => EXIT_INVALID,
            Outcome::Conflict => EXIT_CONFLICT,
        }
    }
}

/// What the diff was computed against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PreviousInfo {
    /// Mod revision of `/commit` (the snapshot gateways applied last); `None` before
    /// the first commit.
    pub revision: Option<i64>,
    /// Whether that snapshot could be read and rendered.
    pub available: bool,
    /// Why not (compacted, did not validate).
    pub reason: Option<String>,
}

/// The previous commit's snapshot, as far as it could be had.
#[derive(Debug, Clone, PartialEq)]
pub enum Previous {
    /// No `/commit` yet: every file is new.
    None,
    At(i64, Snapshot),
    Unavailable(i64, String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Change {
    Added,
    Changed,
    Removed,
}

/// One file of a node that differs from the previous commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileChange {
    pub path: String,
    pub change: Change,
    /// Unified diff, `a<path>` → `b<path>`.
    pub diff: String,
}

/// One supervised service of a node that differs from the previous commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceChange {
    pub name: String,
    pub change: Change,
}

/// One node's part of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeReport {
    pub node: String,
    /// Errors on this node's keys (`/nodes/<id>/...`) and its rendering.
    pub errors: Vec<ValidationError>,
    /// Unknown keys under `/nodes/<id>/`.
    pub warnings: Vec<Warning>,
    /// Empty when nothing changed, and when the previous commit is unavailable.
    pub files: Vec<FileChange>,
    pub services: Vec<ServiceChange>,
}

/// Everything `meduza commit` found; `-o json` prints it as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub outcome: Outcome,
    /// Store revision the keys were read and validated at.
    pub revision: i64,
    pub previous: PreviousInfo,
    /// New mod revision of `/commit` when committed.
    pub commit_revision: Option<i64>,
    /// Errors on keys outside any node (`/global/`, `/dns/hosts/`, ...).
    pub errors: Vec<ValidationError>,
    /// Unknown keys under `/global/`.
    pub warnings: Vec<Warning>,
    pub nodes: Vec<NodeReport>,
    /// On a conflict: the keys added, changed or deleted since the validation.
    pub changed_keys: Vec<String>,
    /// One line for people.
    pub message: String,
}

impl Report {
    /// Every error, the node ones included.
    pub fn error_count(&self) -> usize {
        self.errors.len() + self.nodes.iter().map(|n| n.errors.len()).sum::<usize>()
    }
}

/// The node a key belongs to (`/nodes/<id>/...` → `id`).
fn node_of(key: &str) -> Option<&str> {
    key.strip_prefix("/nodes/")?
        .split_once('/')
        .map(|(id, _)| id)
}

/// Validate `current`, render the selected nodes and diff them against `previous`.
/// Pure: the outcome is `Invalid` or, when valid, `DryRun` (the caller commits).
pub fn plan(
    current: &Snapshot,
    revision: i64,
    previous: &Previous,
    only: &[String],
    env: &RenderEnv,
) -> Report {
    let (parsed, warnings) = Config::parse_checked(current);
    let mut errors = match &parsed {
        Ok(_) => Vec::new(),
        Err(e) => e.0.clone(),
    };
    let all_nodes = current.children("/nodes/");
    let selected: Vec<String> = if only.is_empty() {
        all_nodes.clone()
    } else {
        only.to_vec()
    };
    for id in &selected {
        if !all_nodes.contains(id) {
            errors.push(ValidationError::new(
                format!("/nodes/{id}/"),
                id.as_str(),
                "no keys under this node (--node)",
            ));
        }
    }
    let (prev_cfg, prev_info) = match previous {
        Previous::None => (
            None,
            PreviousInfo {
                revision: None,
                available: true,
                reason: None,
            },
        ),
        Previous::At(rev, snap) => match Config::parse(snap) {
            Ok(cfg) => (
                Some(cfg),
                PreviousInfo {
                    revision: Some(*rev),
                    available: true,
                    reason: None,
                },
            ),
            Err(e) => (
                None,
                PreviousInfo {
                    revision: Some(*rev),
                    available: false,
                    reason: Some(format!("the previous commit did not validate ({e})")),
                },
            ),
        },
        Previous::Unavailable(rev, why) => (
            None,
            PreviousInfo {
                revision: Some(*rev),
                available: false,
                reason: Some(why.clone()),
            },
        ),
    };

    let mut nodes = Vec::new();
    for id in &selected {
        let mut node = NodeReport {
            node: id.clone(),
            errors: Vec::new(),
            warnings: warnings
                .iter()
                .filter(|w| node_of(&w.key) == Some(id))
                .cloned()
                .collect(),
            files: Vec::new(),
            services: Vec::new(),
        };
        if let Ok(cfg) = &parsed {
            match render::render_node(cfg, id, env) {
                Ok(new) => {
                    if prev_info.available {
                        let old = prev_cfg
                            .as_ref()
                            .filter(|c| c.node(id).is_some())
                            .and_then(|c| render::render_node(c, id, env).ok());
                        let (files, services) = diff_rendered(old.as_ref(), &new);
                        node.files = files;
                        node.services = services;
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        nodes.push(node);
    }
    // Each error goes to its node when that node is shown, else to the top level.
    let mut top = Vec::new();
    for e in errors {
        match nodes
            .iter_mut()
            .find(|n| node_of(&e.key) == Some(n.node.as_str()))
        {
            Some(n) => n.errors.push(e),
            None => top.push(e),
        }
    }
    let mut report = Report {
        outcome: Outcome::DryRun,
        revision,
        previous: prev_info,
        commit_revision: None,
        errors: top,
        warnings: warnings
            .into_iter()
            .filter(|w| node_of(&w.key).is_none())
            .collect(),
        nodes,
        changed_keys: Vec::new(),
        message: String::new(),
    };
    let count = report.error_count();
    if count > 0 {
        report.outcome = Outcome::Invalid;
        report.message = format!("refused: {count} invalid key(s); nothing committed");
    } else {
        report.message = format!("dry run: revision {revision} is valid; nothing committed");
    }
    report
}

fn pretty<T: Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

/// Files and services of `new` against `old` (`None`: nothing before).
fn diff_rendered(old: Option<&Rendered>, new: &Rendered) -> (Vec<FileChange>, Vec<ServiceChange>) {
    // Files, and the plans meduza applies in-process (the DNS frontend's upstreams and
    // host records, the TPROXY plan), shown as `plan:dns` and `plan:tproxy` in JSON,
    // so an upstream edit is not a "no change". No plan shown here holds a secret.
    let files_of = |r: Option<&Rendered>| -> BTreeMap<String, String> {
        let mut m: BTreeMap<String, String> = r
            .into_iter()
            .flat_map(|r| r.domains.values())
            .flat_map(|d| d.files.iter())
            .map(|f| (f.path.clone(), f.content.clone()))
            .collect();
        if let Some(r) = r {
            m.insert("plan:dns".into(), pretty(&r.dns));
            if let Some(t) = &r.tproxy {
                m.insert("plan:tproxy".into(), pretty(t));
            }
        }
        m
    };
    let services_of = |r: Option<&Rendered>| {
        r.into_iter()
            .flat_map(|r| r.domains.values())
            .flat_map(|d| d.services.iter())
            .map(|s| (s.name.clone(), s.clone()))
            .collect::<BTreeMap<_, _>>()
    };
    let (old_files, new_files) = (files_of(old), files_of(Some(new)));
    let files = changes(&old_files, &new_files)
        .into_iter()
        .map(|(path, change)| FileChange {
            path: path.clone(),
            change,
            diff: offline::unified_diff(
                path,
                old_files.get(path).map_or("", String::as_str),
                new_files.get(path).map_or("", String::as_str),
            ),
        })
        .collect();
    let (old_svc, new_svc) = (services_of(old), services_of(Some(new)));
    let services = changes(&old_svc, &new_svc)
        .into_iter()
        .map(|(name, change)| ServiceChange {
            name: name.clone(),
            change,
        })
        .collect();
    (files, services)
}

/// Each name of `old` or `new` whose value differs between them, in name order.
pub(super) fn changes<'a, V: PartialEq>(
    old: &'a BTreeMap<String, V>,
    new: &'a BTreeMap<String, V>,
) -> Vec<(&'a String, Change)> {
    let names: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    names
        .into_iter()
        .filter_map(|name| {
            let change = match (old.get(name), new.get(name)) {
                (None, Some(_)) => Change::Added,
                (Some(_), None) => Change::Removed,
                (Some(a), Some(b)) if a != b => Change::Changed,
                _ => return None,
            };
            Some((name, change))
        })
        .collect()
}

/// The human text of a report.
pub fn render_text(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let prev = match (&r.previous.revision, r.previous.available) {
        (None, _) => "no previous commit".to_string(),
        (Some(p), true) => format!("against the commit at revision {p}"),
        (Some(p), false) => format!(
            "previous unavailable (commit at revision {p}: {})",
            r.previous.reason.as_deref().unwrap_or("")
        ),
    };
    let _ = writeln!(out, "validated revision {}; {prev}", r.revision);
    if !r.errors.is_empty() || !r.warnings.is_empty() {
        let _ = writeln!(out, "global");
        for e in &r.errors {
            let _ = writeln!(out, "  error: {e}");
        }
        for w in &r.warnings {
            let _ = writeln!(out, "  warning: {w}");
        }
    }
    for n in &r.nodes {
        let _ = writeln!(out, "node {}", n.node);
        for e in &n.errors {
            let _ = writeln!(out, "  error: {e}");
        }
        for w in &n.warnings {
            let _ = writeln!(out, "  warning: {w}");
        }
        for s in &n.services {
            let _ = writeln!(out, "  service {:?}: {}", s.change, s.name);
        }
        if n.files.is_empty() && n.services.is_empty() && n.errors.is_empty() {
            let what = if r.previous.available {
                "no change"
            } else {
                "diff unavailable"
            };
            let _ = writeln!(out, "  {what}");
        }
        for f in &n.files {
            let _ = writeln!(out, "  file {:?}: {}", f.change, f.path);
        }
        for f in &n.files {
            out.push_str(&f.diff);
        }
    }
    if !r.changed_keys.is_empty() {
        let _ = writeln!(out, "changed since validation:");
        for k in &r.changed_keys {
            let _ = writeln!(out, "  {k}");
        }
    }
    let _ = writeln!(out, "{}", r.message);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(keys: &[(&str, &str)]) -> Snapshot {
        Snapshot(
            keys.iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
        )
    }

    fn env() -> RenderEnv {
        offline::render_env(None, &BTreeMap::new(), offline::OFFLINE_CLASH_SECRET.into())
    }

    const BASE: &[(&str, &str)] = &[
        ("/global/mesh_type", "tinc"),
        ("/nodes/gw-a/lan", "10.0.0.0/24"),
        ("/nodes/gw-b/lan", "10.0.1.0/24"),
    ];

    /// An upstream edit changes no file: it shows as the DNS plan's diff.
    #[test]
    fn an_upstream_edit_shows_as_the_dns_plan() {
        let mut prev: Vec<(&str, &str)> = BASE.to_vec();
        prev.push(("/global/dns/upstreams/u1/addresses", "9.9.9.9"));
        let mut now: Vec<(&str, &str)> = BASE.to_vec();
        now.push(("/global/dns/upstreams/u1/addresses", "9.9.9.9\n1.1.1.1"));
        let r = plan(&snap(&now), 9, &Previous::At(5, snap(&prev)), &[], &env());
        for n in &r.nodes {
            let dns = n.files.iter().find(|f| f.path == "plan:dns");
            let dns = dns.unwrap_or_else(|| panic!("{}: {:#?}", n.node, n.files));
            assert_eq!(dns.change, Change::Changed);
            assert!(dns.diff.contains("+++ b/plan:dns"), "{}", dns.diff);
            assert!(dns.diff.contains("+        \"1.1.1.1:53\""), "{}", dns.diff);
        }
    }

    #[test]
    fn diff_against_previous_lists_changed_files_and_services() {
        let prev = snap(BASE);
        let mut now: Vec<(&str, &str)> = BASE.to_vec();
        now.push(("/nodes/gw-a/ospf/enable", "true"));
        now.push(("/nodes/gw-a/ospf/router_id", "10.255.0.1"));
        now.push(("/nodes/gw-a/tunnels/t1/enable", "true"));
        now.push(("/nodes/gw-a/tunnels/t1/kind", "generic"));
        now.push(("/nodes/gw-a/tunnels/t1/command", "/bin/sleep"));
        now.push(("/nodes/gw-a/tunnels/t1/args", "3600"));
        let r = plan(&snap(&now), 9, &Previous::At(5, prev), &[], &env());
        assert_eq!(r.outcome, Outcome::DryRun, "{r:#?}");
        let a = &r.nodes[0];
        assert_eq!(a.node, "gw-a");
        assert!(
            a.files
                .iter()
                .any(|f| f.path.contains("frr") && !f.diff.is_empty()),
            "{a:#?}"
        );
        assert_eq!(a.services.len(), 1, "{a:#?}");
        assert_eq!(a.services[0].change, Change::Added);
        assert!(r.nodes[1].files.is_empty() && r.nodes[1].services.is_empty());
        let text = render_text(&r);
        assert!(text.contains("node gw-b\n  no change"), "{text}");
    }

    #[test]
    fn errors_are_listed_per_node_and_refuse() {
        let mut now: Vec<(&str, &str)> = BASE.to_vec();
        now.push(("/nodes/gw-b/lan", "banana"));
        now.push(("/global/mesh_type", "carrier-pigeon"));
        now.push(("/nodes/gw-a/lann", "10.0.9.0/24"));
        let r = plan(&snap(&now), 9, &Previous::None, &[], &env());
        assert_eq!(r.outcome, Outcome::Invalid);
        assert_eq!(r.outcome.exit_code(), 2);
        assert_eq!(r.nodes[1].errors[0].key, "/nodes/gw-b/lan");
        assert_eq!(r.errors[0].key, "/global/mesh_type");
        assert_eq!(r.nodes[0].warnings[0].key, "/nodes/gw-a/lann");
        let text = render_text(&r);
        assert!(
            text.contains("node gw-b\n  error: /nodes/gw-b/lan: banana: "),
            "{text}"
        );
        assert!(
            text.contains("warning: /nodes/gw-a/lann: unknown key; did you mean /nodes/gw-a/lan?"),
            "{text}"
        );
    }

    #[test]
    fn node_filter_and_unknown_node() {
        let r = plan(
            &snap(BASE),
            3,
            &Previous::None,
            &["gw-b".into(), "gw-z".into()],
            &env(),
        );
        let shown: Vec<&str> = r.nodes.iter().map(|n| n.node.as_str()).collect();
        assert_eq!(shown, ["gw-b", "gw-z"]);
        assert_eq!(r.outcome, Outcome::Invalid);
        assert_eq!(r.nodes[1].errors[0].key, "/nodes/gw-z/");
    }

    #[test]
    fn unavailable_previous_is_said_not_diffed() {
        let r = plan(
            &snap(BASE),
            3,
            &Previous::Unavailable(2, "compacted".into()),
            &[],
            &env(),
        );
        assert!(!r.previous.available);
        assert!(r.nodes.iter().all(|n| n.files.is_empty()));
        assert!(render_text(&r).contains("previous unavailable"));
    }
}
