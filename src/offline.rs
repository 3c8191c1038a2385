//! Offline commands: `validate`, `render` and the predecessor's `gen <tool>`.
//!
//! Owns: reading a snapshot file and running the same parse → render pipeline the
//! daemon runs, printing errors as `key: value: reason` (exit 2) and unknown keys as
//! `warning: key: reason` (exit unchanged), or writing the files
//! a gateway would get; and the `-o json` schemas of `validate`, `render` and of a
//! refused snapshot ([`ValidateReport`], [`RenderSummary`], [`InvalidReport`];
//! docs/cli-output.md). Must not: talk to etcd, start processes or touch the system.

use crate::boot::Tool;
use crate::files::Fs as _;
use crate::files::RootFs;
use crate::output::{to_json, OutputFormat};
use meduza_generators::render::{self, Bins, RenderEnv};
use meduza_generators::{Config, Snapshot, ValidationError, Warning};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::io::Read as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// Exit code for invalid configuration (DESIGN: 2).
pub const EXIT_INVALID: i32 = 2;

/// Placeholder written where the daemon would use the per-node generated Clash
/// secret; offline rendering must stay deterministic and never invents a real secret.
pub const OFFLINE_CLASH_SECRET: &str = "generated-per-node-at-runtime";

/// Read a snapshot file (`-` = stdin).
pub fn read_snapshot(path: &Path) -> Result<Snapshot, Vec<ValidationError>> {
    let text = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).map_err(|e| {
            vec![ValidationError::new(
                "<snapshot>",
                "-",
                format!("reading stdin: {e}"),
            )]
        })?;
        s
    } else {
        std::fs::read_to_string(path).map_err(|e| {
            vec![ValidationError::new(
                "<snapshot>",
                path.display().to_string(),
                format!("cannot read: {e}"),
            )]
        })?
    };
    Snapshot::from_json(&text).map_err(|e| vec![e])
}

/// Parse and validate a snapshot; on failure, every error.
pub fn validate(path: &Path) -> Result<Config, Vec<ValidationError>> {
    validate_checked(path).0
}

/// [`validate`] plus the warnings (unknown keys), which never make it fail.
pub fn validate_checked(path: &Path) -> (Result<Config, Vec<ValidationError>>, Vec<Warning>) {
    match read_snapshot(path) {
        Ok(snap) => {
            let (cfg, warnings) = Config::parse_checked(&snap);
            (cfg.map_err(|e| e.0), warnings)
        }
        Err(errors) => (Err(errors), Vec::new()),
    }
}

/// Print errors one per line as `key: value: reason` on stderr.
pub fn print_errors(errors: &[ValidationError]) {
    for e in errors {
        eprintln!("{e}");
    }
}

/// Print warnings one per line as `warning: key: reason` on stderr.
pub fn print_warnings(warnings: &[Warning]) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
}

/// A refused snapshot as `-o json` prints it (`validate`, `render`, `dataplane`; exit
/// 2). Values of secret keys are already `<redacted>` in the errors (the parser never
/// keeps them), exactly as in the text output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InvalidReport<'a> {
    /// Always `false`.
    pub ok: bool,
    /// Every error, in key order: `{key, value, reason}`.
    pub errors: &'a [ValidationError],
}

/// Print a refused snapshot: `key: value: reason` lines and a summary on stderr, or
/// [`InvalidReport`] on stdout. Returns the exit code ([`EXIT_INVALID`]) either way.
pub fn print_invalid(errors: &[ValidationError], format: OutputFormat) -> u8 {
    match format {
        OutputFormat::Table => {
            print_errors(errors);
            eprintln!("meduza: {} invalid key(s); nothing applied", errors.len());
        }
        OutputFormat::Json => print!("{}", to_json(&InvalidReport { ok: false, errors })),
    }
    EXIT_INVALID as u8
}

/// `meduza validate`'s result; `-o json` prints it as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ValidateReport {
    /// Whether the snapshot is valid (exit 0; otherwise exit 2).
    pub ok: bool,
    /// The node ids of a valid snapshot, sorted; empty when invalid.
    pub nodes: Vec<String>,
    /// Every error, in key order: `{key, value, reason}` (secrets `<redacted>`).
    pub errors: Vec<ValidationError>,
    /// Unknown keys: `{key, reason, did_you_mean}`; they never fail validation.
    pub warnings: Vec<Warning>,
}

impl ValidateReport {
    /// Validate the snapshot file at `path` (`-` = stdin).
    pub fn of_file(path: &Path) -> Self {
        let (cfg, warnings) = validate_checked(path);
        let (nodes, errors) = match cfg {
            Ok(cfg) => (cfg.nodes.keys().cloned().collect(), Vec::new()),
            Err(errors) => (Vec::new(), errors),
        };
        Self {
            ok: errors.is_empty(),
            nodes,
            errors,
            warnings,
        }
    }

    /// 0 when valid, else [`EXIT_INVALID`]: the same in both formats.
    pub fn exit_code(&self) -> u8 {
        if self.ok {
            0
        } else {
            EXIT_INVALID as u8
        }
    }

    /// Print it in `format` and return [`Self::exit_code`]. Text: `ok: <n> node(s):
    /// a, b` on stdout; warnings, then errors as [`print_invalid`] does, on stderr.
    pub fn print(&self, format: OutputFormat) -> u8 {
        match format {
            OutputFormat::Json => print!("{}", to_json(self)),
            OutputFormat::Table => {
                print_warnings(&self.warnings);
                if !self.ok {
                    return print_invalid(&self.errors, format);
                }
                let nodes = self.nodes.join(", ");
                println!("ok: {} node(s): {nodes}", self.nodes.len());
            }
        }
        self.exit_code()
    }
}

/// `RenderEnv` from the environment (`DEFAULT_GW`, `MEDUZA_BIN_*`): the offline
/// commands, which resolve no settings. `meduza run` uses [`render_env`] with its
/// resolved settings instead.
pub fn env_from_process(clash_secret: String) -> RenderEnv {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let bins = Tool::ALL
        .into_iter()
        .filter_map(|t| var(&format!("MEDUZA_BIN_{}", t.env_suffix())).map(|v| (t, v.into())))
        .collect();
    render_env(
        var("DEFAULT_GW").and_then(|v| v.parse().ok()),
        &bins,
        clash_secret,
    )
}

/// The generators' `RenderEnv` from typed settings: `bins` holds the programs set
/// explicitly (`MEDUZA_BIN_*`, `[bin]` in meduza.toml); the others keep the image's
/// paths ([`Bins::default`]).
pub fn render_env(
    default_gw: Option<IpAddr>,
    bins: &BTreeMap<Tool, PathBuf>,
    clash_secret: String,
) -> RenderEnv {
    let d = Bins::default();
    let bin = |t: Tool, default: String| {
        bins.get(&t)
            .map_or(default, |p| p.to_string_lossy().into_owned())
    };
    RenderEnv {
        default_gw,
        clash_secret,
        bins: Bins {
            mihomo: bin(Tool::Mihomo, d.mihomo),
            mosdns: bin(Tool::Mosdns, d.mosdns),
            easytier: bin(Tool::Easytier, d.easytier),
            tincd: bin(Tool::Tincd, d.tincd),
            openvpn: bin(Tool::Openvpn, d.openvpn),
        },
    }
}

/// One file of an offline render.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RenderedFile {
    /// The config domain it belongs to (`clash`, `tinc`, `openvpn/<name>`, ...).
    pub domain: String,
    /// Permission bits in octal, as `ls` and the table show them (`"644"`).
    pub mode: String,
    /// Path under the output directory, as on the gateway (`/etc/...`).
    pub path: String,
    /// Whether this render wrote it (`false`: already identical, left alone).
    pub written: bool,
}

impl fmt::Display for RenderedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<14} {} {}", self.domain, self.mode, self.path)
    }
}

/// Summary of one offline render; `meduza render -o json` prints it as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RenderSummary {
    /// Always `true` (a refused snapshot prints an [`InvalidReport`] instead).
    pub ok: bool,
    pub node: String,
    /// The output directory (`--out`).
    pub out: PathBuf,
    /// Every file the node gets, grouped by domain, in the order they are rendered.
    pub files: Vec<RenderedFile>,
    /// `plans.json` in the output directory: the TPROXY/DNS/WireGuard plans and the
    /// service specs.
    pub plans: PathBuf,
    /// With `--diff`: a unified diff against the files that were in the directory
    /// (`""` when identical); `null` without it.
    pub diff: Option<String>,
}

impl RenderSummary {
    /// The text output: the diff (with `--diff`), then `wrote`, `unchanged` and
    /// `plans` lines.
    pub fn text(&self) -> String {
        use fmt::Write as _;
        let mut out = self.diff.clone().unwrap_or_default();
        for f in self.files.iter().filter(|f| f.written) {
            let _ = writeln!(out, "wrote     {f}");
        }
        for f in self.files.iter().filter(|f| !f.written) {
            let _ = writeln!(out, "unchanged {f}");
        }
        let _ = writeln!(out, "plans     {}", self.plans.display());
        out
    }
}

/// Render node `node` of the snapshot into `out` (as if `out` were `MEDUZA_ROOT`),
/// plus `plans.json` with the TPROXY/DNS/WireGuard plans and service specs.
pub fn render_to_dir(
    cfg: &Config,
    node: &str,
    out: &Path,
    want_diff: bool,
) -> Result<RenderSummary, Vec<ValidationError>> {
    let env = env_from_process(OFFLINE_CLASH_SECRET.to_string());
    let rendered = render::render_node(cfg, node, &env).map_err(|e| vec![e])?;
    let fs = RootFs::new(out);
    let mut summary = RenderSummary {
        ok: true,
        node: node.to_string(),
        out: out.to_path_buf(),
        files: Vec::new(),
        plans: out.join("plans.json"),
        diff: want_diff.then(String::new),
    };
    let io_err =
        |path: &str, e: String| vec![ValidationError::new("<render>", path.to_string(), e)];
    for (domain, output) in &rendered.domains {
        for f in &output.files {
            if let Some(diff) = &mut summary.diff {
                let old = fs
                    .read(&f.path)
                    .map(|b| String::from_utf8_lossy(&b).into_owned());
                diff.push_str(&unified_diff(
                    &f.path,
                    old.as_deref().unwrap_or(""),
                    &f.content,
                ));
            }
            let wrote = fs
                .write_if_changed(&f.path, f.content.as_bytes(), f.mode)
                .map_err(|e| io_err(&f.path, e.to_string()))?;
            summary.files.push(RenderedFile {
                domain: domain.label(),
                mode: format!("{:o}", f.mode),
                path: f.path.clone(),
                written: wrote,
            });
        }
    }
    let services: Vec<_> = rendered
        .domains
        .values()
        .flat_map(|d| d.services.iter())
        .collect();
    let plans = serde_json::json!({
        "node": node,
        "tproxy": rendered.tproxy,
        "dns": rendered.dns,
        "wireguard": rendered.wireguard.iter().map(|w| serde_json::json!({
            "name": w.name, "dev": w.dev, "listen_port": w.listen_port,
            "addresses": w.addresses, "peers": w.peers.iter().map(|p| &p.name).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "clash": rendered.clash,
        "mosdns": rendered.mosdns,
        "frr_enabled": rendered.frr_enabled,
        "services": services,
    });
    let text = serde_json::to_string_pretty(&plans).unwrap_or_default() + "\n";
    fs.write_if_changed("/plans.json", text.as_bytes(), 0o644)
        .map_err(|e| io_err("/plans.json", e.to_string()))?;
    Ok(summary)
}

/// A unified diff of `old` → `new` labelled with `path` ("" when identical).
pub fn unified_diff(path: &str, old: &str, new: &str) -> String {
    if old == new {
        return String::new();
    }
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(
            &format!("a/{}", path.trim_start_matches('/')),
            &format!("b/{}", path.trim_start_matches('/')),
        )
        .to_string()
}

/// `meduza gen <tool>`: the predecessor's JSON interface on stdin/stdout.
pub fn gen_legacy(tool: &str) -> Result<String, String> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| format!("reading stdin: {e}"))?;
    meduza_generators::legacy::gen_legacy(tool, &input)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot_file(dir: &Path, keys: &[(&str, &str)]) -> PathBuf {
        let map: BTreeMap<&str, &str> = keys.iter().copied().collect();
        let path = dir.join("snapshot.json");
        std::fs::write(&path, serde_json::to_string(&map).unwrap()).unwrap();
        path
    }

    #[test]
    fn validate_json_of_a_valid_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = snapshot_file(
            dir.path(),
            &[
                ("/nodes/gw-b/lan", "10.0.1.0/24"),
                ("/nodes/gw-a/lan", "10.0.0.0/24"),
                ("/nodes/gw-a/lann", "10.0.2.0/24"),
            ],
        );
        let report = ValidateReport::of_file(&path);
        let v: serde_json::Value = serde_json::from_str(&to_json(&report)).unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(v["nodes"], serde_json::json!(["gw-a", "gw-b"]));
        assert_eq!(v["errors"], serde_json::json!([]));
        assert_eq!(v["warnings"][0]["key"], "/nodes/gw-a/lann");
        assert_eq!(v["warnings"][0]["did_you_mean"], "/nodes/gw-a/lan");
        assert!(v["warnings"][0]["reason"].is_string(), "{v}");
    }

    /// Errors are `{key, value, reason}` objects, and a secret's value is as redacted
    /// as in `key: value: reason`.
    #[test]
    fn validate_json_errors_are_objects_with_secrets_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let path = snapshot_file(
            dir.path(),
            &[
                ("/nodes/gw-a/lan", "not-a-cidr"),
                ("/nodes/gw-a/api/token", "short"),
            ],
        );
        let report = ValidateReport::of_file(&path);
        assert!(!report.ok);
        let v: serde_json::Value = serde_json::from_str(&to_json(&report)).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["nodes"], serde_json::json!([]));
        let errors = v["errors"].as_array().unwrap();
        let lan = errors
            .iter()
            .find(|e| e["key"] == "/nodes/gw-a/lan")
            .unwrap_or_else(|| panic!("no lan error in {v}"));
        assert_eq!(lan["value"], "not-a-cidr");
        assert!(lan["reason"].is_string(), "{v}");
        let token = errors
            .iter()
            .find(|e| e["key"] == "/nodes/gw-a/api/token")
            .unwrap_or_else(|| panic!("no token error in {v}"));
        assert_eq!(token["value"], "<redacted>");
        assert!(!to_json(&report).contains("short\""), "{v}");
        let text: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
        assert!(
            text.iter()
                .any(|l| l.starts_with("/nodes/gw-a/api/token: <redacted>: ")),
            "{text:?}"
        );

        let invalid = InvalidReport {
            ok: false,
            errors: &report.errors,
        };
        let v: serde_json::Value = serde_json::from_str(&to_json(&invalid)).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["errors"].as_array().unwrap().len(), report.errors.len());
        assert_eq!(
            v.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["errors", "ok"]
        );
    }

    #[test]
    fn an_unreadable_snapshot_is_an_error_naming_the_file() {
        let report = ValidateReport::of_file(Path::new("/nonexistent/snap.json"));
        assert!(!report.ok);
        assert_eq!(report.errors[0].key, "<snapshot>");
        assert_eq!(report.errors[0].value, "/nonexistent/snap.json");
    }

    #[test]
    fn render_json_lists_files_and_the_plans() {
        let dir = tempfile::tempdir().unwrap();
        let path = snapshot_file(
            dir.path(),
            &[
                ("/global/mesh_type", "tinc"),
                ("/nodes/gw-a/lan", "10.0.0.0/24"),
            ],
        );
        let cfg = validate(&path).unwrap();
        let out = dir.path().join("out");
        let first = render_to_dir(&cfg, "gw-a", &out, false).unwrap();
        let v: serde_json::Value = serde_json::from_str(&to_json(&first)).unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(v["node"], "gw-a");
        assert_eq!(v["out"], out.display().to_string());
        assert_eq!(v["plans"], out.join("plans.json").display().to_string());
        assert!(v["diff"].is_null(), "{v}");
        let files = v["files"].as_array().unwrap();
        assert!(!files.is_empty(), "{v}");
        for f in files {
            assert!(f["domain"].is_string() && f["path"].is_string(), "{f}");
            assert!(
                f["mode"]
                    .as_str()
                    .is_some_and(|m| m.chars().all(|c| c.is_digit(8))),
                "{f}"
            );
            assert_eq!(f["written"], true);
        }
        assert!(first.text().lines().any(|l| l.starts_with("wrote     ")));

        // Again, with --diff: nothing written, an empty diff.
        let again = render_to_dir(&cfg, "gw-a", &out, true).unwrap();
        assert!(again.files.iter().all(|f| !f.written));
        assert_eq!(again.diff.as_deref(), Some(""));
        let text = again.text();
        assert!(text.lines().all(|l| !l.starts_with("wrote")), "{text}");
        assert!(
            text.ends_with(&format!("plans     {}\n", out.join("plans.json").display())),
            "{text}"
        );
    }

    #[test]
    fn diff_is_empty_for_identical_and_marks_changes() {
        assert_eq!(unified_diff("/x", "a\n", "a\n"), "");
        let d = unified_diff("/etc/x", "a\nb\n", "a\nc\n");
        assert!(
            d.contains("-b") && d.contains("+c") && d.contains("a/etc/x"),
            "{d}"
        );
    }
}
