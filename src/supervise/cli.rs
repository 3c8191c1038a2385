//! `meduza supervise --services FILE.json`: run only the supervisor, with a list of
//! services from a JSON file (a `ServiceSpec` array). Used by the supervisor
//! benchmark and for debugging a service definition outside `meduza run`.
//!
//! Owns: that entry point (subreaper, orphan reaper, signal handling, shutdown).
//! Must not: read etcd or render configuration.

use super::clock::SystemClock;
use super::config::SupervisorConfig;
use super::spawn::RealSpawner;
use super::supervisor::Supervisor;
use super::{reaper, SuperviseError};
use meduza_generators::plan::service::ServiceSpec;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Debug, Clone, clap::Args)]
pub struct SuperviseArgs {
    /// JSON array of service specs.
    #[arg(long)]
    pub services: PathBuf,
    /// Where restart budgets are kept (`restart/<svc>.state`).
    #[arg(long, env = "MEDUZA_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Seconds between SIGTERM and SIGKILL at shutdown.
    #[arg(long, default_value_t = 10)]
    pub stop_timeout_secs: u64,
}

/// `$MEDUZA_STATE_DIR`, else `$MEDUZA_ROOT/var/lib/meduza` (DESIGN §2).
pub fn default_state_dir() -> PathBuf {
    let root = std::env::var_os("MEDUZA_ROOT").unwrap_or_else(|| "/".into());
    Path::new(&root).join("var/lib/meduza")
}

pub fn load_services(path: &Path) -> Result<Vec<ServiceSpec>, SuperviseError> {
    let text = std::fs::read_to_string(path).map_err(|source| SuperviseError::ServicesFile {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| SuperviseError::ServicesJson {
        path: path.to_path_buf(),
        source,
    })
}

/// Run the services until SIGTERM or SIGINT, then stop them in reverse order.
pub async fn run(args: SuperviseArgs) -> Result<(), SuperviseError> {
    let specs = load_services(&args.services)?;
    reaper::become_subreaper()?;
    let spawner = RealSpawner::new();
    let reaper = reaper::spawn(spawner.registry());
    let mut term = signal(SignalKind::terminate()).map_err(SuperviseError::SignalHandler)?;
    let mut int = signal(SignalKind::interrupt()).map_err(SuperviseError::SignalHandler)?;
    let mut config = SupervisorConfig::new(args.state_dir.unwrap_or_else(default_state_dir));
    config.stop_timeout = Duration::from_secs(args.stop_timeout_secs);
    let supervisor = Supervisor::new(Arc::new(spawner), Arc::new(SystemClock), config);
    supervisor.apply(specs, &BTreeSet::new()).await?;
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
    }
    supervisor.shutdown().await;
    reaper.abort();
    Ok(())
}
