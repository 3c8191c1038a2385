//! `meduza commit`: the operator's way to change the fleet.
//!
//! Owns: reading the live configuration keys with their mod revisions at one store
//! revision and the snapshot at the previous `/commit`, handing both to the report
//! (`report`: validation with the gateways' own model, rendering and diffing each
//! node), and bumping `/commit` in one conditional etcd
//! transaction that fails if any configuration key was added, changed or deleted since
//! the read ([`guard_txn`]). Two operators cannot interleave, and nothing unvalidated
//! goes out (with more keys than etcd's `--max-txn-ops`, a deletion in the last
//! milliseconds is reported after the fact instead: see [`guard_txn`]).
//!
//! Must not: write any key but `/commit`, or commit a snapshot with errors. The report
//! is built as data ([`Report`]) by pure functions; only [`run`] does I/O.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp, TxnOpResponse, TxnResponse};
use meduza_generators::Snapshot;

use crate::etcd::{EtcdConfig, EtcdError, COMMIT_KEY, SNAPSHOT_PREFIXES};
use crate::offline;
use crate::output::{to_json, OutputArgs, OutputFormat};
use crate::reconcile::rollback::{commit_confirm_value, COMMIT_CONFIRM_KEY};

mod report;

pub use report::{
    plan, render_text, Change, FileChange, NodeReport, Outcome, Previous, PreviousInfo, Report,
    ServiceChange,
};

/// Exit code: validation errors, nothing committed (as `meduza validate`).
pub const EXIT_INVALID: u8 = offline::EXIT_INVALID as u8;
/// Exit code: a configuration key changed between the validation and the commit.
pub const EXIT_CONFLICT: u8 = 3;

/// Test knob: when set, `commit` creates `<file>.waiting` right before its transaction
/// (after validating and re-reading) and waits (at most 60 s) until `<file>` exists,
/// so a test can change a key in between. Never set in production.
pub const PAUSE_FILE_ENV: &str = "MEDUZA_TEST_COMMIT_PAUSE_FILE";

/// etcd's default `--max-txn-ops`: the most compares one transaction may carry.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;

#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct CommitArgs {
    /// Validate and show the diff without committing.
    #[arg(long)]
    pub dry_run: bool,
    /// Show only this node (repeatable). Errors anywhere still refuse the commit: a
    /// gateway refuses a snapshot with any error in it.
    #[arg(long = "node", value_name = "ID")]
    pub nodes: Vec<String>,
    #[command(flatten)]
    pub output: OutputArgs,
    /// The etcd server's `--max-txn-ops`: up to this many keys get a compare of their
    /// own in the commit transaction (see docs/operations.md).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_TXN_OPS)]
    pub max_txn_ops: usize,
    /// Try mode: every gateway rolls this commit back unless `meduza confirm` arrives
    /// within SECS seconds of its apply (`/commit_confirm`, written in the same
    /// transaction as `/commit`; docs/operations.md "Automatic rollback").
    #[arg(long, value_name = "SECS", value_parser = parse_confirm)]
    pub confirm: Option<u64>,
    /// Commit only what a dry run at this revision showed: refused (exit 3) when any
    /// configuration key differs from what it was at REV (the fleet console's
    /// "dry run, then confirm"; scripts: `--dry-run -o json`, then its `revision`).
    #[arg(long, value_name = "REV")]
    pub expect_revision: Option<i64>,
}

/// `--confirm`: the gateways' own parser of `/commit_confirm`, so the CLI refuses what
/// a gateway would ignore.
fn parse_confirm(v: &str) -> Result<u64, String> {
    crate::reconcile::rollback::parse_commit_confirm(v)
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("etcd {op} failed: {source}")]
    Rpc {
        op: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd holds a key or value that is not UTF-8 under {prefix}")]
    NotUtf8 { prefix: String },
    #[error("{PAUSE_FILE_ENV}: {path}: {source}")]
    Pause {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Keys under [`SNAPSHOT_PREFIXES`] with their values and mod revisions.
type Keys = BTreeMap<String, (String, i64)>;

fn options(prefix: &str, revision: Option<i64>) -> GetOptions {
    let mut o = GetOptions::new();
    if prefix.ends_with('/') {
        o = o.with_prefix();
    }
    if let Some(rev) = revision {
        o = o.with_revision(rev);
    }
    o
}

fn collect(out: &mut Keys, prefix: &str, kvs: &[etcd_client::KeyValue]) -> Result<(), CommitError> {
    for kv in kvs {
        let bad = || CommitError::NotUtf8 {
            prefix: prefix.to_string(),
        };
        let k = kv.key_str().map_err(|_| bad())?;
        let v = kv.value_str().map_err(|_| bad())?;
        out.insert(k.to_string(), (v.to_string(), kv.mod_revision()));
    }
    Ok(())
}

/// The live keys in one transaction (one store revision) and that revision.
async fn read_current(client: &mut Client) -> Result<(Keys, i64), CommitError> {
    let ops: Vec<TxnOp> = SNAPSHOT_PREFIXES
        .iter()
        .map(|p| TxnOp::get(*p, Some(options(p, None))))
        .collect();
    let resp = client
        .txn(Txn::new().and_then(ops))
        .await
        .map_err(|source| CommitError::Rpc { op: "read", source })?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let mut keys = Keys::new();
    for (op, prefix) in resp.op_responses().iter().zip(SNAPSHOT_PREFIXES) {
        if let TxnOpResponse::Get(get) = op {
            collect(&mut keys, prefix, get.kvs())?;
        }
    }
    Ok((keys, revision))
}

/// The snapshot as it was at `revision` (reads at one fixed revision agree with each
/// other); the reason when etcd no longer has it (compacted).
async fn read_at(client: &mut Client, revision: i64) -> Result<Snapshot, String> {
    let mut keys = Keys::new();
    for prefix in SNAPSHOT_PREFIXES {
        let resp = client
            .get(prefix, Some(options(prefix, Some(revision))))
            .await
            .map_err(|e| match e {
                etcd_client::Error::GRpcStatus(s) => s.message().to_string(),
                other => other.to_string(),
            })?;
        collect(&mut keys, prefix, resp.kvs()).map_err(|e| e.to_string())?;
    }
    Ok(snapshot_of(&keys))
}

fn snapshot_of(keys: &Keys) -> Snapshot {
    Snapshot(
        keys.iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect(),
    )
}

/// The conditional commit: a put of `/commit` that etcd applies only if, at that
/// moment:
/// - no key under the configuration prefixes has a mod revision above `revision`: a
///   range compare per prefix, whatever the number of keys, which catches keys
///   *changed* or *added* since the read;
/// - `/commit` still has the mod revision it had (0 = still absent): no other commit
///   in between;
/// - when they fit ([`Guard::per_key`]), every key read still has its mod revision:
///   this catches keys *deleted* since the read, which leave nothing for a range
///   compare to see. etcd counts every compare of a transaction, nested ones
///   included, against `--max-txn-ops` (default 128), so a larger snapshot cannot
///   have them; its deletions are caught by the re-read just before the transaction
///   and, after the fact, by the key counts the transaction reads ([`Guard::counts`]).
///
/// With `confirm`, `/commit_confirm` is written by the same transaction (a gateway
/// honours it only when its mod revision is `/commit`'s).
pub fn guard_txn(
    keys: &Keys,
    revision: i64,
    commit_value: &str,
    confirm: Option<u64>,
    max_ops: usize,
) -> Guard {
    let prefixes: Vec<&str> = SNAPSHOT_PREFIXES
        .iter()
        .copied()
        .filter(|p| p.ends_with('/'))
        .collect();
    let mut compares: Vec<Compare> = prefixes
        .iter()
        .map(|p| Compare::mod_revision(*p, CompareOp::Less, revision + 1).with_prefix())
        .collect();
    let commit_rev = keys.get(COMMIT_KEY).map_or(0, |(_, r)| *r);
    compares.push(Compare::mod_revision(
        COMMIT_KEY,
        CompareOp::Equal,
        commit_rev,
    ));
    let others = keys.iter().filter(|(k, _)| k.as_str() != COMMIT_KEY);
    let per_key = compares.len() + others.clone().count() <= max_ops;
    if per_key {
        compares.extend(
            others.map(|(k, (_, rev))| Compare::mod_revision(k.as_str(), CompareOp::Equal, *rev)),
        );
    }
    let mut ops = vec![TxnOp::put(COMMIT_KEY, commit_value, None)];
    if let Some(secs) = confirm {
        ops.push(TxnOp::put(
            COMMIT_CONFIRM_KEY,
            commit_confirm_value(secs),
            None,
        ));
    }
    ops.extend(
        prefixes
            .iter()
            .map(|p| TxnOp::get(*p, Some(GetOptions::new().with_prefix().with_count_only()))),
    );
    let counts = keys
        .keys()
        .filter(|k| prefixes.iter().any(|p| k.starts_with(p)))
        .count();
    Guard {
        txn: Txn::new().when(compares).and_then(ops),
        per_key,
        counts,
    }
}

/// [`guard_txn`]'s transaction and what to check its answer against.
#[derive(Debug)]
pub struct Guard {
    pub txn: Txn,
    /// Every key has its own compare (deletions are refused by etcd itself).
    pub per_key: bool,
    /// Keys under the configuration prefixes at validation: the transaction reads the
    /// count after its put; fewer means a deletion slipped in.
    pub counts: usize,
}

/// The key count the guard's transaction read after its put.
fn counted(resp: &TxnResponse) -> usize {
    resp.op_responses()
        .iter()
        .map(|op| match op {
            TxnOpResponse::Get(g) => usize::try_from(g.count()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

/// Keys added, changed or deleted between two reads.
fn changed_keys<V: PartialEq>(
    before: &BTreeMap<String, V>,
    after: &BTreeMap<String, V>,
) -> Vec<String> {
    report::changes(before, after)
        .into_iter()
        .map(|(k, change)| {
            let how = match change {
                Change::Added => "added",
                Change::Removed => "deleted",
                Change::Changed => "changed",
            };
            format!("{k} ({how})")
        })
        .collect()
}

/// The test knob [`PAUSE_FILE_ENV`].
async fn test_pause() -> Result<(), CommitError> {
    let Some(path) = std::env::var_os(PAUSE_FILE_ENV).map(PathBuf::from) else {
        return Ok(());
    };
    let mut waiting = path.clone().into_os_string();
    waiting.push(".waiting");
    let waiting = PathBuf::from(waiting);
    std::fs::write(&waiting, b"").map_err(|source| CommitError::Pause {
        path: waiting.clone(),
        source,
    })?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The commit of a valid report: re-read (a change since the validation refuses at
/// once), then the guarded transaction ([`guard_txn`]).
async fn commit(
    client: &mut Client,
    keys: &Keys,
    revision: i64,
    confirm: Option<u64>,
    max_ops: usize,
    report: &mut Report,
) -> Result<(), CommitError> {
    let conflict = |report: &mut Report, changed: Vec<String>| {
        report.outcome = Outcome::Conflict;
        report.changed_keys = changed;
        report.message = format!(
            "refused: configuration keys changed since the validation at revision \
             {revision}; nothing committed (run `meduza commit` again)"
        );
    };
    let (now, _) = read_current(client).await?;
    let changed = changed_keys(keys, &now);
    if !changed.is_empty() {
        conflict(report, changed);
        return Ok(());
    }
    test_pause().await?;
    let value = crate::etcd::status::unix_now().to_string();
    let guard = guard_txn(keys, revision, &value, confirm, max_ops);
    let resp = client
        .txn(guard.txn)
        .await
        .map_err(|source| CommitError::Rpc {
            op: "commit",
            source,
        })?;
    if !resp.succeeded() {
        let (now, _) = read_current(client).await?;
        conflict(report, changed_keys(keys, &now));
        return Ok(());
    }
    let rev = resp.header().map_or(0, |h| h.revision());
    report.commit_revision = Some(rev);
    if counted(&resp) == guard.counts {
        report.outcome = Outcome::Committed;
        report.message = format!("committed: /commit = {value} at revision {rev}");
        return Ok(());
    }
    // Only without per-key compares: a key deleted between the re-read and the
    // transaction. The commit is out; say so, loudly, with the keys.
    let mut at_commit = Keys::new();
    for prefix in SNAPSHOT_PREFIXES {
        let resp = client
            .get(prefix, Some(options(prefix, Some(rev))))
            .await
            .map_err(|source| CommitError::Rpc { op: "read", source })?;
        collect(&mut at_commit, prefix, resp.kvs())?;
    }
    at_commit.remove(COMMIT_KEY);
    let mut validated = keys.clone();
    validated.remove(COMMIT_KEY);
    report.outcome = Outcome::Conflict;
    report.changed_keys = changed_keys(&validated, &at_commit);
    report.message = format!(
        "committed at revision {rev}, but configuration keys were deleted between the \
         validation and the commit (more keys than --max-txn-ops {max_ops} can guard one \
         by one): the gateways may apply a snapshot that was not validated; run \
         `meduza commit` again"
    );
    Ok(())
}

/// `meduza commit`: returns the text to print and the exit code.
pub async fn run(args: &CommitArgs, config: &EtcdConfig) -> Result<(String, u8), CommitError> {
    let report = execute(args, config).await?;
    let text = match args.output.format() {
        OutputFormat::Json => to_json(&report),
        OutputFormat::Table => render_text(&report),
    };
    Ok((text, report.outcome.exit_code()))
}

/// Validate, diff and (unless a dry run, or invalid) commit; the CLI and the fleet
/// console's commit both come here. `args.output` is not used.
pub async fn execute(args: &CommitArgs, config: &EtcdConfig) -> Result<Report, CommitError> {
    let opts = config.connect_options()?;
    let mut client = Client::connect(config.endpoints.clone(), Some(opts))
        .await
        .map_err(|source| EtcdError::Connect {
            endpoints: config.endpoints.join(","),
            source,
        })?;
    let (keys, revision) = read_current(&mut client).await?;
    let previous = match keys.get(COMMIT_KEY) {
        None => Previous::None,
        Some((_, rev)) => match read_at(&mut client, *rev).await {
            Ok(snap) => Previous::At(*rev, snap),
            Err(why) => Previous::Unavailable(*rev, why),
        },
    };
    let env = offline::env_from_process(offline::OFFLINE_CLASH_SECRET.to_string());
    let mut report = plan(&snapshot_of(&keys), revision, &previous, &args.nodes, &env);
    if report.outcome != Outcome::DryRun || args.dry_run {
        return Ok(report);
    }
    if let Some(expected) = args.expect_revision.filter(|e| *e != revision) {
        let changed = match read_at(&mut client, expected).await {
            Ok(mut then) => {
                let mut now = snapshot_of(&keys);
                then.0.remove(COMMIT_KEY);
                now.0.remove(COMMIT_KEY);
                changed_keys(&then.0, &now.0)
            }
            Err(why) => vec![format!("(revision {expected} unavailable: {why})")],
        };
        if !changed.is_empty() {
            report.outcome = Outcome::Conflict;
            report.changed_keys = changed;
            report.message = format!(
                "refused: configuration keys changed since the dry run at revision \
                 {expected}; nothing committed (run the dry run again)"
            );
            return Ok(report);
        }
    }
    commit(
        &mut client,
        &keys,
        revision,
        args.confirm,
        args.max_txn_ops,
        &mut report,
    )
    .await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_compares_each_key_only_while_etcd_takes_them() {
        let keys = |n: usize| -> Keys {
            let mut k: Keys = (0..n)
                .map(|i| (format!("/dns/hosts/h{i}"), (String::new(), 5)))
                .collect();
            k.insert(COMMIT_KEY.into(), ("1".into(), 4));
            k
        };
        let g = guard_txn(&keys(10), 9, "x", None, DEFAULT_MAX_TXN_OPS);
        assert!(g.per_key);
        assert_eq!(g.counts, 10, "/commit is not under a configuration prefix");
        // 3 prefix compares + /commit + 124 keys = 128.
        assert!(guard_txn(&keys(124), 9, "x", None, DEFAULT_MAX_TXN_OPS).per_key);
        assert!(!guard_txn(&keys(125), 9, "x", None, DEFAULT_MAX_TXN_OPS).per_key);
        assert!(guard_txn(&keys(125), 9, "x", None, 1000).per_key);
    }

    #[test]
    fn changed_keys_names_added_changed_and_deleted() {
        let k = |v: &[(&str, i64)]| -> Keys {
            v.iter()
                .map(|(k, r)| ((*k).to_string(), (String::new(), *r)))
                .collect()
        };
        let before = k(&[("/a", 1), ("/b", 2), ("/c", 3)]);
        let after = k(&[("/a", 1), ("/b", 7), ("/d", 8)]);
        assert_eq!(
            changed_keys(&before, &after),
            ["/b (changed)", "/c (deleted)", "/d (added)"]
        );
    }
}
