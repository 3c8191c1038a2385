//! `meduza status` and `meduza snapshot`: the etcd-only subcommands. They return the
//! text to print; `main.rs` prints it.

use std::path::PathBuf;

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
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
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
        EtcdCommand::Status { node, json } => {
            let st = read_status(kv, node).await?;
            if *json {
                let mut s = serde_json::to_string_pretty(&st).unwrap_or_default();
                s.push('\n');
                Ok(s)
            } else {
                Ok(render_status_table(&st))
            }
        }
        EtcdCommand::Snapshot { out } => {
            let keys = dump_snapshot(kv).await?;
            let mut text = serde_json::to_string_pretty(&keys).unwrap_or_default();
            text.push('\n');
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
                json: false,
            },
            &kv,
        )
        .await
        .unwrap();
        assert!(table.contains("online") && table.contains("yes"), "{table}");
        let json = run_command(
            &EtcdCommand::Status {
                node: "n".into(),
                json: true,
            },
            &kv,
        )
        .await
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["online"], true);
        assert_eq!(v["node_id"], "n");
    }
}
