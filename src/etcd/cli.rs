//! `meduza status` and `meduza snapshot`: the etcd-only subcommands.
//!
//! Owns: their clap definitions and the text they print (`status -o json` is
//! [`NodeStatus`](super::status::NodeStatus) as is; docs/cli-output.md). Must not:
//! print (they return the text; `main.rs` prints it) or write to etcd.

use std::path::PathBuf;

use crate::output::{to_json, OutputArgs, OutputFormat};

use super::kv::Kv;
use super::snapshot::dump_snapshot;
use super::status::{read_status, render_status_table};
use super::EtcdError;

/// Subcommands served by the etcd layer; flatten into the binary's command enum.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum EtcdCommand {
    /// Show a node's published status (online, applied vs current /commit, errors,
    /// services, tunnels, Clash, TPROXY, DNS upstreams).
    Status {
        /// Node id (defaults to NODE_ID).
        #[arg(long, env = "NODE_ID")]
        node: String,
        /// `-o json`: the status as one JSON object (`--json` is the older spelling).
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Dump every key except /updated/ as a flat JSON object {"/key": "value"}, the
    /// input of `meduza render --snapshot`.
    Snapshot {
        /// Write to this file instead of stdout.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
}

/// Runs a subcommand; returns what to print on stdout.
pub async fn run_command(cmd: &EtcdCommand, kv: &dyn Kv) -> Result<String, EtcdError> {
    match cmd {
        EtcdCommand::Status { node, output } => {
            let st = read_status(kv, node).await?;
            Ok(match output.format() {
                OutputFormat::Json => to_json(&st),
                OutputFormat::Table => render_status_table(&st),
            })
        }
        EtcdCommand::Snapshot { out } => {
            let keys = dump_snapshot(kv).await?;
            let text = to_json(&keys);
            match out {
                Some(path) => {
                    std::fs::write(path, text).map_err(|source| EtcdError::Output {
                        path: path.clone(),
                        source,
                    })?;
                    Ok(String::new())
                }
                None => Ok(text),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::MemKv;
    use std::collections::BTreeMap;

    #[tokio::test]
    async fn snapshot_round_trips_as_flat_json() {
        let kv = MemKv::with_keys([
            ("/global/a", "1"),
            ("/nodes/n/lan", "10.0.0.0/24\n10.0.1.0/24"),
            ("/updated/n/online", "1"),
        ]);
        let out = run_command(&EtcdCommand::Snapshot { out: None }, &kv)
            .await
            .unwrap();
        let parsed: BTreeMap<String, String> = serde_json::from_str(&out).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed["/nodes/n/lan"], "10.0.0.0/24\n10.0.1.0/24");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.json");
        let printed = run_command(
            &EtcdCommand::Snapshot {
                out: Some(path.clone()),
            },
            &kv,
        )
        .await
        .unwrap();
        assert!(printed.is_empty());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), out);
    }

    #[tokio::test]
    async fn status_json_and_table() {
        let kv = MemKv::with_keys([("/updated/n/online", "1"), ("/updated/n/errors", "[]")]);
        let table = run_command(
            &EtcdCommand::Status {
                node: "n".into(),
                output: OutputFormat::Table.into(),
            },
            &kv,
        )
        .await
        .unwrap();
        assert!(table.contains("online") && table.contains("yes"), "{table}");
        let json = run_command(
            &EtcdCommand::Status {
                node: "n".into(),
                output: OutputFormat::Json.into(),
            },
            &kv,
        )
        .await
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["online"], true);
        assert_eq!(v["node_id"], "n");
    }

    /// The documented `status -o json` schema (docs/cli-output.md): every field, and
    /// errors as `{key, value, reason}` objects.
    #[tokio::test]
    async fn status_json_schema() {
        let kv = MemKv::with_keys([
            ("/updated/n/online", "1"),
            ("/updated/n/applied", "7 1700000000"),
            (
                "/updated/n/errors",
                r#"[{"key":"/nodes/n/lan","value":"x","reason":"not a CIDR"}]"#,
            ),
            ("/updated/n/services/clash/status", "running"),
        ]);
        let cmd = EtcdCommand::Status {
            node: "n".into(),
            output: OutputFormat::Json.into(),
        };
        let v: serde_json::Value =
            serde_json::from_str(&run_command(&cmd, &kv).await.unwrap()).unwrap();
        for field in [
            "node_id",
            "online",
            "last",
            "applied",
            "applied_revision",
            "commit_revision",
            "errors",
            "errors_unparsed",
            "services",
            "openvpn",
            "wireguard",
            "clash_health",
            "tproxy",
            "dns_upstreams",
            "failover_log",
            "other",
        ] {
            assert!(v.get(field).is_some(), "no {field} in {v}");
        }
        assert_eq!(v["applied_revision"], 7);
        assert_eq!(v["errors"][0]["key"], "/nodes/n/lan");
        assert_eq!(v["errors"][0]["value"], "x");
        assert_eq!(v["errors"][0]["reason"], "not a CIDR");
        assert_eq!(v["services"]["clash"], "running");
    }

    #[test]
    fn status_takes_dash_o_and_the_older_json_flag() {
        #[derive(clap::Parser, Debug)]
        struct Cli {
            #[command(subcommand)]
            cmd: EtcdCommand,
        }
        let format = |args: &[&str]| {
            let cli = <Cli as clap::Parser>::try_parse_from(
                ["meduza", "status", "--node", "n"].iter().chain(args),
            )
            .unwrap();
            match cli.cmd {
                EtcdCommand::Status { output, .. } => output.format(),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(format(&[]), OutputFormat::Table);
        assert_eq!(format(&["-o", "json"]), OutputFormat::Json);
        assert_eq!(format(&["--json"]), OutputFormat::Json);
    }
}
