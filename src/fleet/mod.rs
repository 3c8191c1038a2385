//! `meduza fleet`: the fleet manager (DESIGN §9).
//!
//! Owns: node registration (`/fleet/nodes/<id>/api_url`), the pull loop and push/pull
//! status ([`manager`], [`status`]), the terminal table and the web page ([`web`]),
//! and the `fleet` subcommands ([`fleet_cli`]). Must not: copy node tokens anywhere
//! (they stay in `/nodes/<id>/api/token` and are only sent to their node) or write
//! node configuration.

pub mod manager;
pub mod status;
pub mod web;

use crate::api::{ConfigStore, KvStore, StoreError};
use crate::etcd::{EtcdArgs, EtcdConfig, EtcdKv};
use anyhow::Context as _;
use manager::{now_ms, FleetView, HttpNodeClient, Manager, ManagerConfig};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::info;

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("http client: {reason}")]
    Http { reason: String },
    #[error("{field} {value:?}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("listen {addr}: {reason}")]
    Listen { addr: String, reason: String },
}

/// `meduza fleet ...` (etcd comes from the global `--etcd-*` flags / `ETCD_*`).
#[derive(Debug, clap::Args)]
pub struct FleetArgs {
    #[command(subcommand)]
    pub cmd: FleetCmd,
}

#[derive(Debug, clap::Subcommand)]
pub enum FleetCmd {
    /// Register a node: writes /fleet/nodes/<id>/api_url. Its token stays in
    /// /nodes/<id>/api/token.
    AddNode {
        #[arg(long)]
        id: String,
        #[arg(long = "api-url")]
        api_url: String,
    },
    /// Unregister a node (deletes /fleet/nodes/<id>/ and /fleet/status/<id>).
    RemoveNode {
        #[arg(long)]
        id: String,
    },
    /// Pull every node once and print the fleet as a table.
    Nodes {
        /// Print the fleet view as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Per-request timeout, seconds.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
    /// Run the manager: pull loop and web page.
    Serve {
        #[arg(long, default_value = "0.0.0.0:9200")]
        listen: SocketAddr,
        /// Admin token for the web page and /fleet/api/nodes.
        #[arg(long, env = "MEDUZA_FLEET_TOKEN", hide_env_values = true)]
        token: String,
        /// Seconds between pulls.
        #[arg(long, default_value_t = 10)]
        pull_interval: u64,
        /// Seconds without a successful pull before pull status is unavailable.
        #[arg(long, default_value_t = 60)]
        pull_threshold: u64,
        /// Per-request timeout, seconds.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
        /// Publish each node's computed status to /fleet/status/<id>.
        #[arg(long)]
        publish: bool,
    },
}

/// Validate and write a registration.
pub async fn add_node(
    store: &dyn ConfigStore,
    id: &str,
    api_url: &str,
) -> Result<bool, FleetError> {
    meduza_generators::parse::validate_name(id).map_err(|reason| FleetError::Invalid {
        field: "--id",
        value: id.to_string(),
        reason,
    })?;
    let url = meduza_generators::parse::parse_http_url(api_url.trim()).map_err(|reason| {
        FleetError::Invalid {
            field: "--api-url",
            value: api_url.to_string(),
            reason,
        }
    })?;
    store
        .put(
            &format!("/fleet/nodes/{id}/api_url"),
            url.trim_end_matches('/'),
        )
        .await?;
    Ok(store
        .get(&format!("/nodes/{id}/api/token"))
        .await?
        .is_some())
}

/// Serve the web page on `listener` and run the pull loop until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    manager: Arc<Manager>,
    admin_token: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), FleetError> {
    if admin_token.trim().is_empty() {
        return Err(FleetError::Invalid {
            field: "--token",
            value: String::new(),
            reason: "an admin token is required (MEDUZA_FLEET_TOKEN or --token)".into(),
        });
    }
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let app = web::router(web::WebState::new(admin_token, manager.subscribe()));
    let m = manager.clone();
    let mut loop_stop = stop_rx.clone();
    let pull = tokio::spawn(async move {
        m.run(async move {
            let _ = loop_stop.wait_for(|s| *s).await;
        })
        .await
    });
    info!(%addr, "fleet web listening");
    let r = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        })
        .await;
    let _ = pull.await;
    r.map_err(|e| FleetError::Listen {
        addr,
        reason: e.to_string(),
    })
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

fn ago(ms: Option<u64>, now: u64) -> String {
    match ms {
        None => "never".into(),
        Some(t) => format!("{}s ago", now.saturating_sub(t) / 1000),
    }
}

/// The `nodes` table.
pub fn render_table(v: &FleetView) -> String {
    let rev = |r: Option<i64>| r.map(|r| r.to_string()).unwrap_or_else(|| "-".into());
    let rows: Vec<[String; 8]> = v
        .nodes
        .iter()
        .map(|n| {
            [
                n.id.clone(),
                if n.online { "yes" } else { "no" }.into(),
                format!("{:?}", n.push).to_lowercase(),
                format!("{:?}", n.pull).to_lowercase(),
                format!("{}/{}", rev(n.applied_revision), rev(n.commit_revision)),
                human_bytes(n.usage_bytes),
                ago(n.last_pull_ms, v.generated_ms),
                n.route
                    .map(|r| format!("{r:?}").to_lowercase())
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let head = [
        "ID",
        "ONLINE",
        "PUSH",
        "PULL",
        "APPLIED/COMMIT",
        "USAGE",
        "LAST PULL",
        "ROUTE",
    ];
    let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(head.to_vec());
    out.push('\n');
    for r in &rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => futures::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

/// Run one `meduza fleet` subcommand against the etcd of the global `--etcd-*` flags.
pub async fn fleet_cli(args: FleetArgs, etcd: &EtcdArgs) -> anyhow::Result<()> {
    let config = EtcdConfig::from_args(etcd)?;
    // `serve` starts even while etcd is down (each round retries); the one-shot
    // commands fail at once with the connection error.
    let kv = match args.cmd {
        FleetCmd::Serve { .. } => EtcdKv::new(config),
        _ => EtcdKv::connect(config)
            .await
            .context("connecting to etcd")?,
    };
    let store = Arc::new(KvStore::new(Arc::new(kv)));
    match args.cmd {
        FleetCmd::AddNode { id, api_url } => {
            let has_token = add_node(&*store, &id, &api_url).await?;
            println!(
                "registered {id} at {}",
                api_url.trim().trim_end_matches('/')
            );
            if !has_token {
                println!("note: /nodes/{id}/api/token is not set; the manager cannot pull this node until it is");
            }
        }
        FleetCmd::RemoveNode { id } => {
            meduza_generators::parse::validate_name(&id).map_err(|reason| FleetError::Invalid {
                field: "--id",
                value: id.clone(),
                reason,
            })?;
            store.delete_prefix(&format!("/fleet/nodes/{id}/")).await?;
            store.delete_prefix(&format!("/fleet/status/{id}")).await?;
            println!("removed {id}");
        }
        FleetCmd::Nodes { json, timeout } => {
            let client = Arc::new(HttpNodeClient::new(Duration::from_secs(timeout))?);
            let m = Manager::new(store, client, ManagerConfig::default());
            let v = m.round(now_ms()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", render_table(&v));
            }
        }
        FleetCmd::Serve {
            listen,
            token,
            pull_interval,
            pull_threshold,
            timeout,
            publish,
        } => {
            let client = Arc::new(HttpNodeClient::new(Duration::from_secs(timeout))?);
            let cfg = ManagerConfig {
                pull_interval: Duration::from_secs(pull_interval.max(1)),
                pull_threshold: Duration::from_secs(pull_threshold.max(1)),
                publish,
            };
            let m = Arc::new(Manager::new(store, client, cfg));
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            serve(listener, m, token, shutdown_signal()).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::MemStore;

    #[tokio::test]
    async fn add_node_validates() {
        let s = MemStore::new();
        assert!(add_node(&s, "bad id", "http://x").await.is_err());
        assert!(add_node(&s, "n1", "ftp://x").await.is_err());
        assert!(!add_node(&s, "n1", "http://10.0.0.1:9100/").await.unwrap());
        assert_eq!(s.dump()["/fleet/nodes/n1/api_url"], "http://10.0.0.1:9100");
    }

    #[test]
    fn table_columns() {
        let v = FleetView {
            generated_ms: 100_000,
            commit_revision: Some(7),
            proxy_configured: false,
            nodes: vec![manager::NodeRow {
                id: "gw-1".into(),
                api_url: "http://x".into(),
                online: true,
                push: status::PushStatus::Dirty,
                pull: status::PullStatus::Available,
                applied_revision: Some(6),
                commit_revision: Some(7),
                errors: vec![],
                usage_bytes: 3 * 1024 * 1024,
                last_pull_ms: Some(90_000),
                route: Some(status::Route::Proxy),
                last_error: None,
                has_token: true,
                status: None,
                failover_log: vec![],
            }],
        };
        let t = render_table(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("ID"));
        let cells: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            cells,
            vec![
                "gw-1",
                "yes",
                "dirty",
                "available",
                "6/7",
                "3.0",
                "MiB",
                "10s",
                "ago",
                "proxy"
            ]
        );
    }
}
