//! `-o json` of the operator CLI, through the built binary: `validate` (valid and
//! invalid: exit 2, errors as `{key, value, reason}` objects, secrets redacted),
//! `render`, `dataplane show` (without root: run as `nobody` when the test runs as
//! root, and with a data plane mode that would fail if `show` opened one), and
//! `completions`. `status` and `fleet nodes` need etcd and the nodes: their JSON is
//! checked here as the types they print, and their flags by parsing.
//!
//! The snapshot is the worked example, docs/examples/three-nodes.json (gw-a runs
//! Clash in TPROXY mode, so its plan is not empty).

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use clap::Parser;
use serde_json::Value;

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/examples/three-nodes.json")
}

fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meduza"));
    cmd.args(args)
        .env_remove("NODE_ID")
        .env_remove("DEFAULT_GW")
        .env("MEDUZA_LOG", "warn")
        .stdin(Stdio::null());
    cmd
}

fn run(mut cmd: Command) -> (i32, String, String) {
    let out = cmd.output().expect("run meduza");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn meduza(args: &[&str]) -> (i32, String, String) {
    run(command(args))
}

/// stdout must be exactly one JSON document.
fn json(stdout: &str, stderr: &str) -> Value {
    serde_json::from_str(stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}):\n{stdout}\n{stderr}"))
}

/// The example with `extra` keys added (overriding), written into `dir`.
fn snapshot_with(dir: &Path, extra: &[(&str, &str)]) -> PathBuf {
    let text = std::fs::read_to_string(example()).expect("read the example snapshot");
    let mut keys: serde_json::Map<String, Value> =
        serde_json::from_str(&text).expect("the example is a JSON object");
    for (k, v) in extra {
        keys.insert((*k).to_string(), Value::String((*v).to_string()));
    }
    let path = dir.join("snapshot.json");
    std::fs::write(&path, serde_json::to_string_pretty(&keys).expect("encode"))
        .expect("write snapshot");
    path
}

fn arg(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

#[test]
fn validate_json_of_a_valid_snapshot() {
    let snap = example();
    let (code, out, err) = meduza(&["validate", "--snapshot", arg(&snap), "-o", "json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v = json(&out, &err);
    assert_eq!(v["ok"], true);
    assert_eq!(v["nodes"], serde_json::json!(["gw-a", "gw-b", "gw-c"]));
    assert_eq!(v["errors"], serde_json::json!([]));
    assert!(v["warnings"].is_array(), "{v}");
    // The table output is unchanged.
    let (code, out, err) = meduza(&["validate", "--snapshot", arg(&snap)]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out, "ok: 3 node(s): gw-a, gw-b, gw-c\n");
}

#[test]
fn validate_json_of_an_invalid_snapshot_exits_2_with_error_objects() {
    let dir = tempfile::tempdir().expect("temp dir");
    let secret = "tiny-secret";
    let snap = snapshot_with(
        dir.path(),
        &[
            ("/nodes/gw-a/lan", "10.0.0.0/33"),
            ("/nodes/gw-b/api/token", secret),
            ("/nodes/gw-c/lann", "10.9.0.0/24"),
        ],
    );
    let (code, out, err) = meduza(&["validate", "--snapshot", arg(&snap), "-o", "json"]);
    assert_eq!(code, 2, "{out}{err}");
    let v = json(&out, &err);
    assert_eq!(v["ok"], false);
    assert_eq!(v["nodes"], serde_json::json!([]));
    let errors = v["errors"].as_array().expect("errors is an array");
    let lan = errors
        .iter()
        .find(|e| e["key"] == "/nodes/gw-a/lan")
        .unwrap_or_else(|| panic!("no error names /nodes/gw-a/lan: {v}"));
    assert_eq!(lan["value"], "10.0.0.0/33");
    assert!(
        lan["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{lan}"
    );
    let token = errors
        .iter()
        .find(|e| e["key"] == "/nodes/gw-b/api/token")
        .unwrap_or_else(|| panic!("no error names the token: {v}"));
    assert_eq!(token["value"], "<redacted>");
    assert!(!out.contains(secret), "the secret leaked: {out}");
    assert!(
        v["warnings"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w["key"] == "/nodes/gw-c/lann")),
        "{v}"
    );
    // JSON mode prints no `key: value: reason` lines.
    assert!(!err.contains("/nodes/gw-a/lan:"), "{err}");

    // The same exit code in the table format, the same redaction.
    let (code, out, err) = meduza(&["validate", "--snapshot", arg(&snap)]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("/nodes/gw-a/lan: 10.0.0.0/33: "), "{err}");
    assert!(err.contains("/nodes/gw-b/api/token: <redacted>: "), "{err}");
    assert!(!err.contains(secret), "{err}");
}

#[test]
fn render_json_summarises_the_files() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out_dir = dir.path().join("out");
    let snap = example();
    let args = [
        "render",
        "--snapshot",
        arg(&snap),
        "--node",
        "gw-a",
        "--out",
        arg(&out_dir),
        "-o",
        "json",
    ];
    let (code, out, err) = meduza(&args);
    assert_eq!(code, 0, "{out}{err}");
    let v = json(&out, &err);
    assert_eq!(v["ok"], true);
    assert_eq!(v["node"], "gw-a");
    assert_eq!(v["out"], arg(&out_dir));
    assert!(v["diff"].is_null(), "{v}");
    let plans = v["plans"].as_str().expect("plans is a path");
    assert!(Path::new(plans).is_file(), "{plans}");
    let files = v["files"].as_array().expect("files is an array");
    assert!(
        files.iter().any(|f| f["domain"] == "clash"),
        "gw-a runs Clash: {v}"
    );
    for f in files {
        let path = f["path"].as_str().expect("path");
        assert!(
            out_dir.join(path.trim_start_matches('/')).is_file(),
            "{path}"
        );
        assert!(f["mode"].is_string() && f["written"] == true, "{f}");
    }

    // Again with --diff: nothing written, an empty diff.
    let mut again = args.to_vec();
    again.push("--diff");
    let (code, out, err) = meduza(&again);
    assert_eq!(code, 0, "{out}{err}");
    let v = json(&out, &err);
    assert_eq!(v["diff"], "");
    assert!(
        v["files"]
            .as_array()
            .is_some_and(|f| f.iter().all(|f| f["written"] == false)),
        "{v}"
    );

    // A node the snapshot does not have: refused, exit 2, the invalid report.
    let (code, out, err) = meduza(&[
        "render",
        "--snapshot",
        arg(&snap),
        "--node",
        "gw-z",
        "--out",
        arg(&out_dir),
        "-o",
        "json",
    ]);
    assert_eq!(code, 2, "{out}{err}");
    let v = json(&out, &err);
    assert_eq!(v["ok"], false);
    assert!(
        v["errors"][0]["key"].is_string() && v["errors"][0]["reason"].is_string(),
        "{v}"
    );
}

/// Whether every directory above `path` can be entered, and `path` read, by anyone:
/// then `nobody` can run the binary on it.
fn world_reachable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.permissions().mode());
    mode(path) & 0o004 != 0 && path.ancestors().skip(1).all(|d| mode(d) & 0o001 != 0)
}

#[test]
fn dataplane_show_json_needs_no_root() {
    let snap = example();
    let bin = Path::new(env!("CARGO_BIN_EXE_meduza"));
    let mut cmd = command(&[
        "dataplane",
        "show",
        "--snapshot",
        arg(&snap),
        "--node",
        "gw-a",
        "-o",
        "json",
    ]);
    // `show` must not open the data plane: an unknown mode fails `apply` at once
    // (BadMode), and there is no nft to run.
    cmd.env("MEDUZA_DATAPLANE", "no-such-mode")
        .env("MEDUZA_BIN_NFT", "/nonexistent/nft");
    let as_nobody = nix::unistd::geteuid().is_root()
        && world_reachable(bin)
        && world_reachable(&snap)
        && world_reachable(Path::new(env!("CARGO_MANIFEST_DIR")));
    if as_nobody {
        cmd.uid(65534).gid(65534).current_dir("/");
    } else {
        eprintln!("not root or paths not reachable by nobody: running as the current user");
    }
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "{out}{err}");
    let v = json(&out, &err);
    assert_eq!(v["ok"], true);
    assert!(
        v["plan"]["proxy_src"]
            .as_array()
            .is_some_and(|s| !s.is_empty()),
        "{v}"
    );
    assert!(
        v["nftables"]
            .as_str()
            .is_some_and(|t| t.contains("table inet meduza")),
        "{v}"
    );
    assert!(
        v["routing"]["mark"].is_u64() && v["routing"]["table"].is_u64(),
        "{v}"
    );

    // The same mode makes `apply` fail before touching anything: proof that the
    // variable is read by the data plane, so `show` above really did not open it.
    let mut apply = command(&[
        "dataplane",
        "apply",
        "--snapshot",
        arg(&snap),
        "--node",
        "gw-a",
        "-o",
        "json",
    ]);
    apply.env("MEDUZA_DATAPLANE", "no-such-mode");
    let (code, out, err) = run(apply);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("no-such-mode"), "{err}");
    assert!(out.is_empty(), "{out}");
}

#[test]
fn completions_bash_covers_the_subcommands() {
    let (code, out, err) = meduza(&["completions", "bash"]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.is_empty());
    assert!(out.contains("fleet") && out.contains("validate"), "{out}");
    assert!(out.contains("--output"), "{out}");
    for shell in ["zsh", "fish"] {
        let (code, out, err) = meduza(&["completions", shell]);
        assert_eq!(code, 0, "{shell}: {err}");
        assert!(out.contains("fleet"), "{shell}: {out}");
    }
}

/// `fleet nodes -o json` prints the fleet view as is: its documented fields.
#[test]
fn fleet_nodes_json_schema_and_flags() {
    use meduza::fleet::manager::{FleetView, NodeRow};
    use meduza::fleet::status::{PullStatus, PushStatus};
    let view = FleetView {
        generated_ms: 100_000,
        commit_revision: Some(7),
        proxy_configured: false,
        nodes: vec![NodeRow {
            id: "gw-a".into(),
            api_url: "http://10.42.1.1:9100".into(),
            online: true,
            push: PushStatus::Dirty,
            pull: PullStatus::Available,
            applied_revision: Some(6),
            commit_revision: Some(7),
            errors: vec![meduza::api::ConfigError {
                key: "/nodes/gw-a/lan".into(),
                value: "x".into(),
                reason: "not a CIDR".into(),
            }],
            usage_bytes: 1024,
            last_pull_ms: Some(90_000),
            route: None,
            last_error: None,
            has_token: true,
            status: None,
            failover_log: vec![],
        }],
    };
    let v: Value = serde_json::from_str(&meduza::output::to_json(&view)).expect("JSON");
    for field in [
        "generated_ms",
        "commit_revision",
        "proxy_configured",
        "nodes",
    ] {
        assert!(v.get(field).is_some(), "no {field}: {v}");
    }
    let row = &v["nodes"][0];
    for field in [
        "id",
        "api_url",
        "online",
        "push",
        "pull",
        "applied_revision",
        "commit_revision",
        "errors",
        "usage_bytes",
        "last_pull_ms",
        "route",
        "last_error",
        "has_token",
    ] {
        assert!(row.get(field).is_some(), "no nodes[].{field}: {row}");
    }
    assert_eq!(row["id"], "gw-a");
    assert_eq!(
        row["errors"][0],
        serde_json::json!({"key": "/nodes/gw-a/lan", "value": "x", "reason": "not a CIDR"})
    );

    #[derive(Parser, Debug)]
    struct Fleet {
        #[command(subcommand)]
        cmd: meduza::fleet::FleetCmd,
    }
    let format = |args: &[&str]| match Fleet::try_parse_from(["fleet", "nodes"].iter().chain(args))
        .expect("parses")
        .cmd
    {
        meduza::fleet::FleetCmd::Nodes { output, .. } => output.format(),
        other => panic!("{other:?}"),
    };
    use meduza::output::OutputFormat;
    assert_eq!(format(&[]), OutputFormat::Table);
    assert_eq!(format(&["-o", "json"]), OutputFormat::Json);
    assert_eq!(format(&["--json"]), OutputFormat::Json);
}

/// `meduza commit -o` is the shared flag; `-o text` (its older name) still works.
#[test]
fn commit_takes_the_shared_output_flag() {
    #[derive(Parser, Debug)]
    struct Commit {
        #[command(flatten)]
        args: meduza::commit::CommitArgs,
    }
    use meduza::output::OutputFormat;
    let format = |args: &[&str]| {
        Commit::try_parse_from(std::iter::once(&"commit").chain(args))
            .expect("parses")
            .args
            .output
            .format()
    };
    assert_eq!(format(&[]), OutputFormat::Table);
    assert_eq!(format(&["-o", "text"]), OutputFormat::Table);
    assert_eq!(format(&["-o", "json"]), OutputFormat::Json);
}
