//! `meduza fleet`: the fleet manager (DESIGN §9).
//!
//! Owns: node registration (`/fleet/nodes/<id>/api_url`), the pull loop and push/pull
//! status ([`manager`], [`status`]), the terminal table and the web page ([`web`]),
//! and the `fleet` subcommands ([`fleet_cli`]). Must not: copy node tokens anywhere
//! (they stay in `/nodes/<id>/api/token` and are only sent to their node) or write
//! node configuration.

pub mod client;
pub mod console;
pub mod manager;
pub mod registry;
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
    /// Read a password on stdin and print its argon2id hash, for
    /// `serve --password-hash-file` or /fleet/admin/password_hash.
    HashPassword,
    /// Pull every node once and print the fleet as a table (`-o json`: the fleet
    /// view, docs/cli-output.md; `--json` is the older spelling).
    Nodes {
        #[command(flatten)]
        output: crate::output::OutputArgs,
        /// Per-request timeout, seconds.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
        #[command(flatten)]
        nodes_tls: NodeTlsArgs,
    },
    /// Run the manager: pull loop, web page and console.
    Serve {
        #[command(flatten)]
        nodes_tls: NodeTlsArgs,
        /// Serve the page over HTTPS with this certificate chain (PEM); needs --tls-key.
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<std::path::PathBuf>,
        /// Private key (PEM) of --tls-cert.
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<std::path::PathBuf>,
        #[arg(long, default_value = "0.0.0.0:9200")]
        listen: SocketAddr,
        /// Admin token for the web page and /fleet/api/ (sign-in and Bearer).
        #[arg(long, env = "MEDUZA_FLEET_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// File holding the admin password's argon2 hash (`meduza fleet
        /// hash-password`); without it, /fleet/admin/password_hash in etcd.
        #[arg(long, value_name = "FILE")]
        password_hash_file: Option<std::path::PathBuf>,
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

/// How the manager checks node certificates (docs/fleet.md, "HTTPS").
#[derive(Debug, Clone, clap::Args)]
pub struct NodeTlsArgs {
    /// CA certificate(s) (PEM) that sign the nodes' API certificates; trusted together
    /// with /fleet/ca. A node's /fleet/nodes/<id>/cert_sha256 pin wins over both.
    #[arg(long, value_name = "FILE")]
    pub node_ca: Option<std::path::PathBuf>,
}

impl NodeTlsArgs {
    /// The node client with this trust and per-request `timeout`.
    pub fn client(&self, timeout: Duration) -> Result<HttpNodeClient, FleetError> {
        let client = HttpNodeClient::new(timeout)?;
        match &self.node_ca {
            Some(path) => client.with_node_ca_file(path),
            None => Ok(client),
        }
    }
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

/// Unregister a node: `/fleet/nodes/<id>/` and `/fleet/status/<id>` (its
/// configuration under `/nodes/<id>/` stays).
pub async fn remove_node(store: &dyn ConfigStore, id: &str) -> Result<(), FleetError> {
    meduza_generators::parse::validate_name(id).map_err(|reason| FleetError::Invalid {
        field: "--id",
        value: id.to_string(),
        reason,
    })?;
    store.delete_prefix(&format!("/fleet/nodes/{id}/")).await?;
    store.delete_prefix(&format!("/fleet/status/{id}")).await?;
    Ok(())
}

/// How `serve` runs the page: who may sign in, and the etcd of the console's commit.
#[derive(Clone, Default)]
pub struct ServeOptions {
    pub auth: web::AdminAuth,
    /// `meduza commit`'s etcd settings; the console's commit answers 503 without.
    pub etcd: Option<EtcdConfig>,
    /// `--tls-cert`/`--tls-key`: the page is served over HTTPS (and its session
    /// cookie is `Secure`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl ServeOptions {
    /// Sign-in with `token` only, no commit (tests, `fleet serve --token`).
    pub fn token(token: impl Into<String>) -> Self {
        Self {
            auth: web::AdminAuth::token(token),
            etcd: None,
            tls: None,
        }
    }
}

/// Serve the web page on `listener` and run the pull loop until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    manager: Arc<Manager>,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), FleetError> {
    let mut auth = opts.auth;
    auth.store = Some(manager.store());
    if auth.token.is_none() && auth.password_hash.is_none() {
        let in_etcd = manager
            .store()
            .get(web::PASSWORD_HASH_KEY)
            .await
            .ok()
            .flatten()
            .is_some();
        if !in_etcd {
            return Err(FleetError::Invalid {
                field: "--token",
                value: String::new(),
                reason: format!(
                    "an admin credential is required: --token (MEDUZA_FLEET_TOKEN), \
                     --password-hash-file, or {} in etcd",
                    web::PASSWORD_HASH_KEY
                ),
            });
        }
    }
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let app = web::router(
        web::WebState::new(auth, manager.subscribe())
            .secure_cookies(opts.tls.is_some())
            .with_console(console::Console::new(manager.clone(), opts.etcd)),
    );
    let m = manager.clone();
    let mut loop_stop = stop_rx.clone();
    let pull = tokio::spawn(async move {
        m.run(async move {
            let _ = loop_stop.wait_for(|s| *s).await;
        })
        .await
    });
    info!(%addr, https = opts.tls.is_some(), "fleet web listening");
    let stop = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let r = crate::tls::serve(listener, app, crate::tls::fixed(opts.tls), stop).await;
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
    let commit_etcd = config.clone();
    // `serve` starts even while etcd is down (each round retries); the one-shot
    // commands fail at once with the connection error.
    let kv = match args.cmd {
        FleetCmd::Serve { .. } | FleetCmd::HashPassword => EtcdKv::new(config),
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
            remove_node(&*store, &id).await?;
            println!("removed {id}");
        }
        FleetCmd::HashPassword => {
            let mut password = String::new();
            std::io::stdin()
                .read_line(&mut password)
                .context("reading the password on stdin")?;
            let password = password.trim_end_matches(['\r', '\n']);
            anyhow::ensure!(!password.is_empty(), "an empty password on stdin");
            println!(
                "{}",
                web::hash_password(password).map_err(anyhow::Error::msg)?
            );
        }
        FleetCmd::Nodes {
            output,
            timeout,
            nodes_tls,
        } => {
            let client = Arc::new(nodes_tls.client(Duration::from_secs(timeout))?);
            let m = Manager::new(store, client, ManagerConfig::default());
            let v = m.round(now_ms()).await?;
            match output.format() {
                crate::output::OutputFormat::Json => print!("{}", crate::output::to_json(&v)),
                crate::output::OutputFormat::Table => print!("{}", render_table(&v)),
            }
        }
        FleetCmd::Serve {
            listen,
            token,
            password_hash_file,
            pull_interval,
            pull_threshold,
            timeout,
            publish,
            nodes_tls,
            tls_cert,
            tls_key,
        } => {
            let client = Arc::new(nodes_tls.client(Duration::from_secs(timeout))?);
            let tls = match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => Some(
                    crate::tls::server_identity_from_files("--tls-cert", &cert, "--tls-key", &key)?
                        .config,
                ),
                _ => None,
            };
            let cfg = ManagerConfig {
                pull_interval: Duration::from_secs(pull_interval.max(1)),
                pull_threshold: Duration::from_secs(pull_threshold.max(1)),
                publish,
            };
            let m = Arc::new(Manager::new(store, client, cfg));
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let password_hash = match password_hash_file {
                Some(path) => Some(
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("--password-hash-file {}", path.display()))?
                        .trim()
                        .to_string(),
                ),
                None => None,
            };
            let opts = ServeOptions {
                auth: web::AdminAuth {
                    token: token.filter(|t| !t.trim().is_empty()),
                    password_hash,
                    store: None,
                },
                etcd: Some(commit_etcd),
                tls,
            };
            serve(listener, m, opts, shutdown_signal()).await?;
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
