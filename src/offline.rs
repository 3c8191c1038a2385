//! Offline commands: `validate`, `render` and the predecessor's `gen <tool>`.
//!
//! Owns: reading a snapshot file and running the same parse → render pipeline the
//! daemon runs, printing errors as `key: value: reason` (exit 2) and unknown keys as
//! `warning: key: reason` (exit unchanged), or writing the files
//! a gateway would get. Must not: talk to etcd, start processes or touch the system.

use crate::boot::Tool;
use crate::files::Fs as _;
use crate::files::RootFs;
use meduza_generators::render::{self, Bins, RenderEnv};
use meduza_generators::{Config, Snapshot, ValidationError, Warning};
use std::collections::BTreeMap;
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

/// Summary of one offline render.
#[derive(Debug, Default)]
pub struct RenderSummary {
    pub written: Vec<String>,
    pub unchanged: Vec<String>,
    pub diff: String,
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
    let mut summary = RenderSummary::default();
    let io_err =
        |path: &str, e: String| vec![ValidationError::new("<render>", path.to_string(), e)];
    for (domain, output) in &rendered.domains {
        for f in &output.files {
            if want_diff {
                let old = fs
                    .read(&f.path)
                    .map(|b| String::from_utf8_lossy(&b).into_owned());
                summary.diff.push_str(&unified_diff(
                    &f.path,
                    old.as_deref().unwrap_or(""),
                    &f.content,
                ));
            }
            let wrote = fs
                .write_if_changed(&f.path, f.content.as_bytes(), f.mode)
                .map_err(|e| io_err(&f.path, e.to_string()))?;
            let line = format!("{:<14} {:o} {}", domain.label(), f.mode, f.path);
            if wrote {
                summary.written.push(line);
            } else {
                summary.unchanged.push(line);
            }
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
        .header(&format!("a{path}"), &format!("b{path}"))
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
