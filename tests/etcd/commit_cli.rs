//! `meduza commit` (issue 15, part 2) and unknown-key warnings (part 3): the real
//! binary against a real etcd. A dry run shows each node's diff and leaves `/commit`
//! alone; a commit bumps it; a snapshot with errors is refused (exit 2) with the
//! errors listed per node; a key added, changed or deleted between the validation and
//! the transaction makes it refuse (exit 3, nothing committed; with more keys than
//! etcd's `--max-txn-ops`, a deletion is reported after the fact); `-o json` parses; a compacted
//! previous commit is reported, not diffed; and a real `meduza run` gateway publishes
//! `/updated/<id>/warnings` for a misspelled key, `[]` once it is fixed, which
//! `meduza validate` prints too.
//!
//! The change between validation and transaction is injected with the documented test
//! knob `MEDUZA_TEST_COMMIT_PAUSE_FILE`. Needs etcd; a missing one fails the test.

use meduza_test_support::etcd::TestEtcd;
use meduza_test_support::ports::unique_free_port;
use meduza_test_support::process;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Two valid nodes; gw-a runs OSPF, so it renders FRR files.
fn seed(etcd: &TestEtcd) {
    for (k, v) in [
        ("/global/mesh_type", "tinc"),
        ("/nodes/gw-a/lan", "10.0.0.0/24"),
        ("/nodes/gw-a/ospf/enable", "true"),
        ("/nodes/gw-a/ospf/router_id", "10.255.0.1"),
        ("/nodes/gw-b/lan", "10.0.1.0/24"),
    ] {
        etcd.put(k, v);
    }
}

fn meduza_cmd(etcd: &TestEtcd, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meduza"));
    cmd.args(args)
        .env_remove("NODE_ID")
        .env_remove(meduza::commit::PAUSE_FILE_ENV)
        .env("ETCD_ENDPOINTS", etcd.endpoint())
        .env("MEDUZA_LOG", "warn")
        .stdin(Stdio::null());
    cmd
}

fn meduza(etcd: &TestEtcd, args: &[&str]) -> (i32, String, String) {
    let out = meduza_cmd(etcd, args).output().expect("run meduza");
    split(out)
}

fn split(out: Output) -> (i32, String, String) {
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `/commit`'s mod revision (0 when absent) and value.
fn commit_key(etcd: &TestEtcd) -> (i64, String) {
    let out = etcd.etcdctl(&["get", "/commit", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
    match v["kvs"].get(0) {
        None => (0, String::new()),
        Some(kv) => {
            use base64::Engine as _;
            let value = base64::engine::general_purpose::STANDARD
                .decode(kv["value"].as_str().unwrap_or_default())
                .expect("base64");
            (
                kv["mod_revision"].as_i64().expect("mod_revision"),
                String::from_utf8_lossy(&value).into_owned(),
            )
        }
    }
}

#[test]
fn dry_run_shows_the_diff_and_commit_bumps_the_commit_key() {
    let etcd = TestEtcd::start();
    seed(&etcd);

    // First commit: no previous one, every file is new.
    let (code, out, err) = meduza(&etcd, &["commit"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("no previous commit"), "{out}");
    assert!(out.contains("+++ b/etc/frr/frr.conf"), "{out}");
    let (first, _) = commit_key(&etcd);
    assert!(first > 0);
    assert!(out.contains("committed: /commit = "), "{out}");
    assert!(out.contains(&format!("at revision {first}")), "{out}");

    // A change, shown by a dry run against that commit and not committed.
    etcd.put("/nodes/gw-a/ospf/router_id", "10.255.0.9");
    let (code, out, err) = meduza(&etcd, &["commit", "--dry-run"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("against the commit at revision {first}")),
        "{out}"
    );
    assert!(out.contains("node gw-a\n"), "{out}");
    assert!(out.contains("file Changed: /etc/frr/frr.conf"), "{out}");
    assert!(
        out.contains("-")
            && out.contains("10.255.0.1")
            && out.contains("+")
            && out.contains("10.255.0.9"),
        "{out}"
    );
    assert!(out.contains("node gw-b\n  no change"), "{out}");
    assert!(out.contains("nothing committed"), "{out}");
    assert_eq!(commit_key(&etcd).0, first, "a dry run must not commit");

    // --node limits what is shown.
    let (code, out, _) = meduza(&etcd, &["commit", "--dry-run", "--node", "gw-b"]);
    assert_eq!(code, 0);
    assert!(
        !out.contains("node gw-a") && out.contains("node gw-b"),
        "{out}"
    );

    // The commit itself.
    let (code, out, err) = meduza(&etcd, &["commit"]);
    assert_eq!(code, 0, "{out}{err}");
    let (second, _) = commit_key(&etcd);
    assert!(second > first);
    assert!(out.contains(&format!("at revision {second}")), "{out}");

    // Nothing changed since: the diff is empty.
    let (code, out, _) = meduza(&etcd, &["commit", "--dry-run"]);
    assert_eq!(code, 0);
    assert!(out.contains("node gw-a\n  no change"), "{out}");
}

/// `--expect-revision`: the commit of what a dry run showed. A key changed after that
/// dry run refuses it (exit 3, the key named); unchanged keys commit even when other
/// writes moved the store revision on.
#[test]
fn expect_revision_commits_only_what_the_dry_run_showed() {
    let etcd = TestEtcd::start();
    seed(&etcd);
    let dry = |etcd: &TestEtcd| -> i64 {
        let (code, out, err) = meduza(etcd, &["commit", "--dry-run", "-o", "json"]);
        assert_eq!(code, 0, "{out}{err}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        v["revision"].as_i64().expect("revision")
    };
    let shown = dry(&etcd);
    etcd.put("/nodes/gw-b/lan", "10.0.9.0/24");
    let (code, out, _) = meduza(&etcd, &["commit", "--expect-revision", &shown.to_string()]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("/nodes/gw-b/lan (changed)"), "{out}");
    assert!(out.contains("since the dry run"), "{out}");
    assert_eq!(commit_key(&etcd).0, 0, "refused: nothing committed");

    let shown = dry(&etcd);
    // A status write (not configuration) moves the revision; the commit still goes.
    etcd.put("/updated/gw-b/online", "1");
    let (code, out, err) = meduza(&etcd, &["commit", "--expect-revision", &shown.to_string()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(commit_key(&etcd).0 > shown);
}

#[test]
fn errors_are_refused_per_node_and_json_parses() {
    let etcd = TestEtcd::start();
    seed(&etcd);
    let (code, _, _) = meduza(&etcd, &["commit"]);
    assert_eq!(code, 0);
    let (before, _) = commit_key(&etcd);

    etcd.put("/nodes/gw-b/lan", "banana");
    etcd.put("/nodes/gw-a/lann", "10.0.9.0/24");
    let (code, out, err) = meduza(&etcd, &["commit"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        out.contains("node gw-b\n  error: /nodes/gw-b/lan: banana: not a CIDR"),
        "{out}"
    );
    assert!(
        out.contains(
            "node gw-a\n  warning: /nodes/gw-a/lann: unknown key; did you mean /nodes/gw-a/lan?"
        ),
        "{out}"
    );
    assert!(
        out.contains("refused: 1 invalid key(s); nothing committed"),
        "{out}"
    );
    assert_eq!(commit_key(&etcd).0, before, "nothing committed");

    let (code, out, _) = meduza(&etcd, &["commit", "-o", "json"]);
    assert_eq!(code, 2);
    let v: serde_json::Value = serde_json::from_str(&out).expect("-o json is JSON");
    assert_eq!(v["outcome"], "invalid");
    assert_eq!(v["previous"]["revision"], before);
    assert_eq!(v["nodes"][1]["node"], "gw-b");
    assert_eq!(v["nodes"][1]["errors"][0]["key"], "/nodes/gw-b/lan");
    assert_eq!(v["nodes"][1]["errors"][0]["value"], "banana");
    assert_eq!(
        v["nodes"][0]["warnings"][0]["did_you_mean"],
        "/nodes/gw-a/lan"
    );

    // Fixed: a warning alone does not block; JSON of a dry run.
    etcd.put("/nodes/gw-b/lan", "10.0.1.0/24");
    etcd.put("/nodes/gw-a/ospf/router_id", "10.255.0.7");
    let (code, out, _) = meduza(&etcd, &["commit", "--dry-run", "-o", "json"]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("-o json is JSON");
    assert_eq!(v["outcome"], "dry-run");
    assert_eq!(v["commit_revision"], serde_json::Value::Null);
    assert_eq!(v["nodes"][0]["files"][0]["change"], "changed");
    assert!(v["nodes"][0]["files"][0]["diff"]
        .as_str()
        .is_some_and(|d| d.contains("+ ospf router-id 10.255.0.7") || d.contains("10.255.0.7")));
    assert_eq!(v["nodes"][0]["warnings"][0]["key"], "/nodes/gw-a/lann");
    let (code, out, _) = meduza(&etcd, &["commit", "-o", "json"]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("-o json is JSON");
    assert_eq!(v["outcome"], "committed");
    assert_eq!(v["commit_revision"], commit_key(&etcd).0);
}

/// Runs `meduza commit` paused between validation and transaction, applies `change`
/// meanwhile, and returns what the commit did.
fn commit_with_change(etcd: &TestEtcd, dir: &Path, change: impl FnOnce()) -> (i32, String) {
    let pause = dir.join(format!("pause-{}", unique_free_port()));
    let waiting = dir.join(format!(
        "{}.waiting",
        pause.file_name().unwrap().to_string_lossy()
    ));
    let child: Child = meduza_cmd(etcd, &["commit"])
        .env(meduza::commit::PAUSE_FILE_ENV, &pause)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn meduza commit");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !waiting.exists() {
        assert!(Instant::now() < deadline, "commit never reached its pause");
        std::thread::sleep(Duration::from_millis(20));
    }
    change();
    std::fs::write(&pause, b"").expect("release the commit");
    let (code, out, err) = split(child.wait_with_output().expect("wait commit"));
    (code, format!("{out}{err}"))
}

#[test]
fn a_key_changed_between_validation_and_commit_is_refused() {
    let etcd = TestEtcd::start();
    let dir = tempfile::tempdir().expect("temp dir");
    seed(&etcd);
    etcd.put("/nodes/gw-b/private_lan", "10.1.0.0/24");

    // Without interference the paused commit goes through.
    let (code, out) = commit_with_change(&etcd, dir.path(), || {});
    assert_eq!(code, 0, "{out}");
    let (committed, _) = commit_key(&etcd);

    // The change lands after the re-read, right before the transaction: etcd's
    // compares refuse it. Few keys: each has its own compare, deletions included.
    type Change<'a> = Box<dyn Fn() + 'a>;
    let cases: [(&str, Change<'_>); 4] = [
        (
            "/nodes/gw-a/lan (changed)",
            Box::new(|| etcd.put("/nodes/gw-a/lan", "10.0.5.0/24")),
        ),
        (
            "/nodes/gw-b/private_lan (deleted)",
            Box::new(|| {
                etcd.etcdctl(&["del", "/nodes/gw-b/private_lan"]);
            }),
        ),
        (
            "/global/tinc/netname (added)",
            Box::new(|| etcd.put("/global/tinc/netname", "other")),
        ),
        // Another operator's commit in between.
        (
            "/commit (changed)",
            Box::new(|| etcd.put("/commit", "other")),
        ),
    ];
    for (named, change) in cases {
        let (code, out) = commit_with_change(&etcd, dir.path(), change);
        assert_eq!(code, 3, "{named}: {out}");
        assert!(
            out.contains("refused: configuration keys changed since the validation"),
            "{out}"
        );
        assert!(out.contains(named), "{named}: {out}");
        let (now, _) = commit_key(&etcd);
        if named.starts_with("/commit") {
            assert!(now > committed, "the other operator's commit");
        } else {
            assert_eq!(now, committed, "{named}: nothing committed");
        }
    }

    // More keys than etcd's --max-txn-ops (128) can compare one by one: a change or
    // an addition is still refused by the range compares; a deletion goes out and is
    // reported (exit 3, the keys named) from the counts the transaction read.
    for i in 0..150 {
        etcd.put(
            &format!("/dns/hosts/h{i:03}"),
            &format!("10.9.0.{}", i % 250 + 1),
        );
    }
    let (code, out, _) = meduza(&etcd, &["commit"]);
    assert_eq!(code, 0, "{out}");
    let (committed, _) = commit_key(&etcd);
    let (code, out) = commit_with_change(&etcd, dir.path(), || {
        etcd.put("/dns/hosts/h149", "10.9.9.9")
    });
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("/dns/hosts/h149 (changed)") && out.contains("nothing committed"),
        "{out}"
    );
    assert_eq!(commit_key(&etcd).0, committed);
    let (code, out) = commit_with_change(&etcd, dir.path(), || {
        etcd.etcdctl(&["del", "/dns/hosts/h007"]);
    });
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("were deleted between the validation and the commit"),
        "{out}"
    );
    assert!(out.contains("/dns/hosts/h007 (deleted)"), "{out}");
    assert!(commit_key(&etcd).0 > committed);

    // Run again: validated anew, committed.
    let (code, out, _) = meduza(&etcd, &["commit"]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn a_compacted_previous_commit_is_reported_not_diffed() {
    let etcd = TestEtcd::start();
    seed(&etcd);
    let (code, _, _) = meduza(&etcd, &["commit"]);
    assert_eq!(code, 0);
    etcd.put("/nodes/gw-a/ospf/router_id", "10.255.0.3");
    etcd.put("/unrelated", "x");
    etcd.compact(etcd.revision());
    let (code, out, err) = meduza(&etcd, &["commit", "--dry-run"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("previous unavailable"), "{out}");
    assert!(out.contains("compacted"), "{out}");
    assert!(out.contains("node gw-a\n  diff unavailable"), "{out}");
}

#[test]
fn validate_prints_warnings_without_failing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let snap = dir.path().join("s.json");
    std::fs::write(
        &snap,
        r#"{"/nodes/gw-a/lan": "10.0.0.0/24", "/nodes/gw-a/lann": "10.0.1.0/24"}"#,
    )
    .expect("write snapshot");
    let out = Command::new(env!("CARGO_BIN_EXE_meduza"))
        .args(["validate", "--snapshot"])
        .arg(&snap)
        .output()
        .expect("run meduza validate");
    let (code, out, err) = split(out);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok: 1 node(s): gw-a"), "{out}");
    assert!(
        err.contains("warning: /nodes/gw-a/lann: unknown key; did you mean /nodes/gw-a/lan?"),
        "{err}"
    );
}

/// `meduza run` for `node` with everything local in `dir`; killed on drop.
struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_key(etcd: &TestEtcd, key: &str, want: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = etcd.etcdctl(&["get", key, "--print-value-only"]);
        let v = v.trim_end_matches('\n');
        if want(v) {
            return v.to_string();
        }
        assert!(Instant::now() < deadline, "{key} is still {v:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_gateway_publishes_unknown_keys_as_warnings_and_still_applies() {
    let etcd = TestEtcd::start();
    let dir = tempfile::tempdir().expect("temp dir");
    seed(&etcd);
    etcd.put("/nodes/gw-b/lann", "10.0.9.0/24");
    let (code, out, _) = meduza(&etcd, &["commit"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("warning: /nodes/gw-b/lann: unknown key; did you mean /nodes/gw-b/lan?"),
        "{out}"
    );
    let mut cmd = process::meduza_run("gw-b", &etcd.endpoint(), dir.path(), false);
    cmd.env(
        "MEDUZA_API_LISTEN",
        format!("127.0.0.1:{}", unique_free_port()),
    );
    let child = process::spawn_logged(&mut cmd, &dir.path().join("meduza.log"));
    let _gw = Gateway(child);

    let (rev, _) = commit_key(&etcd);
    let warnings = wait_for_key(&etcd, "/updated/gw-b/warnings", |v| !v.is_empty());
    let parsed: serde_json::Value = serde_json::from_str(&warnings).expect("warnings JSON");
    assert_eq!(
        parsed,
        serde_json::json!([{
            "key": "/nodes/gw-b/lann",
            "reason": "unknown key; did you mean /nodes/gw-b/lan?",
            "did_you_mean": "/nodes/gw-b/lan",
        }])
    );
    // A warning never blocks: the commit is applied.
    wait_for_key(&etcd, "/updated/gw-b/applied", |v| {
        v.split(' ').next() == Some(&rev.to_string())
    });
    assert_eq!(
        etcd.etcdctl(&["get", "/updated/gw-b/errors", "--print-value-only"])
            .trim(),
        "[]"
    );

    // Fixed and committed: cleared to [].
    etcd.etcdctl(&["del", "/nodes/gw-b/lann"]);
    let (code, out, _) = meduza(&etcd, &["commit"]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("warning"), "{out}");
    wait_for_key(&etcd, "/updated/gw-b/warnings", |v| v == "[]");
}
