//! The DNS frontend (DESIGN §8): answers `/dns/hosts/` names, caches, and forwards
//! everything else along MosDNS → mihomo → upstream groups with health checks and
//! failover. Replaces the predecessor's dnsmasq.
//!
//! Owns: the listeners on `MEDUZA_DNS_LISTEN` (UDP and TCP), host records and the
//! `/etc/etcd_hosts` file format, the cache, the forwarding chain, upstream health and
//! the failover log.
//! Must not: read etcd or publish to it (the integrator feeds [`DnsHandle`] from the
//! reconciler and publishes what [`DnsHandle::subscribe`] reports), supervise MosDNS or
//! mihomo (their state arrives through [`DnsHandle::set_chain_state`]), or filter
//! answers (private-range answers pass through; no rebinding filter).
//!
//! Layout: `wire` (hot-path parsing/building), `cache`, `hosts`, `failover` (pure state
//! machine), `exchange` (one query to one upstream; the OS edge behind a trait),
//! `frontend` (the request path), `health_checks` (the upstream groups' health tasks),
//! `server` (sockets), `sockopt` (socket options of `server` and `exchange`), `cli`
//! (`meduza dns serve`), `resolv` (the gateway's own resolver file).

pub mod cache;
pub mod cli;
pub mod exchange;
pub mod failover;
pub mod frontend;
#[cfg(any(test, feature = "test-util"))]
pub mod fuzzing;
pub mod health_checks;
pub mod hosts;
pub mod resolv;
pub mod server;
mod sockopt;
#[cfg(test)]
mod test_support;
pub mod wire;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use meduza_generators::plan::dns::{DnsPlan, CLASH_DNS_ADDR, MOSDNS_ADDR};
use tokio::sync::watch;

pub use exchange::{Exchange, ExchangeError, NetExchange};
pub use failover::{FailoverAction, FailoverLogEntry, Health, UpstreamStatus};
pub use frontend::{ChainState, Counters, DnsStatus, Frontend, Local, Proto};
pub use health_checks::TestResult;
pub use hosts::{render_hosts_file, write_hosts_file_if_changed};

/// Default of `MEDUZA_DNS_LISTEN` (DESIGN §2).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:53,[::]:53";

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("invalid dns setting {setting}={value:?}: {reason}")]
    Config {
        setting: &'static str,
        value: String,
        reason: String,
    },
    #[error("cannot bind dns {proto} listener {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        proto: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("unknown upstream group {upstream:?}")]
    UnknownUpstream { upstream: String },
    #[error(transparent)]
    Failover(#[from] failover::FailoverError),
}

/// How UDP is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UdpMode {
    /// Our receive loops, one SO_REUSEPORT socket per worker (default).
    Native,
    /// hickory-server's UDP path (one socket per address), kept for comparison.
    Hickory,
}

/// Settings of the frontend that do not come from etcd.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    pub listen: Vec<SocketAddr>,
    /// MosDNS's listener (tests point it at a loopback port of their own).
    pub mosdns_addr: SocketAddr,
    /// mihomo's DNS listener.
    pub clash_addr: SocketAddr,
    /// Forwarded queries in flight before new ones get SERVFAIL at once.
    pub max_inflight: usize,
    /// Cache entries; 0 disables the cache.
    pub cache_size: usize,
    pub max_cache_ttl: u32,
    /// Cap on negative-answer TTLs (RFC 2308 §5 suggests one to three hours).
    pub max_negative_ttl: u32,
    /// TTL of host-record answers (0 like dnsmasq's default local-ttl: records are live).
    pub hosts_ttl: u32,
    /// Per upstream address attempt.
    pub attempt_timeout: Duration,
    /// Within an attempt, resend the query once when no answer came after this long.
    pub retransmit_after: Duration,
    /// For a whole forwarded query across the chain.
    pub query_budget: Duration,
    /// Name the health check asks an `A` for.
    pub health_check_name: String,
    /// UDP sockets (and receive loops) per listen address; 0 = one per core.
    pub udp_workers: usize,
    pub udp_mode: UdpMode,
    /// Idle timeout of TCP client connections.
    pub tcp_timeout: Duration,
    /// UDP sockets per upstream address used to multiplex forwarded queries.
    pub upstream_sockets: usize,
    /// Queries in flight to one upstream address; more queue for a slot.
    pub upstream_max_inflight: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            listen: parse_listen(DEFAULT_LISTEN).unwrap_or_default(),
            mosdns_addr: MOSDNS_ADDR
                .parse()
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 1153))),
            clash_addr: CLASH_DNS_ADDR
                .parse()
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 1053))),
            max_inflight: 1024,
            cache_size: 10_000,
            max_cache_ttl: 86_400,
            max_negative_ttl: 3_600,
            hosts_ttl: 0,
            attempt_timeout: Duration::from_secs(2),
            retransmit_after: Duration::from_millis(400),
            query_budget: Duration::from_secs(5),
            health_check_name: "example.com".to_string(),
            udp_workers: 0,
            udp_mode: UdpMode::Native,
            tcp_timeout: Duration::from_secs(10),
            upstream_sockets: 4,
            upstream_max_inflight: exchange::MAX_INFLIGHT_PER_UPSTREAM,
        }
    }
}

impl DnsConfig {
    /// Defaults with `listen` from `MEDUZA_DNS_LISTEN` when set.
    pub fn from_env() -> Result<Self, DnsError> {
        let mut c = Self::default();
        if let Ok(v) = std::env::var("MEDUZA_DNS_LISTEN") {
            c.listen = parse_listen(&v)?;
        }
        Ok(c)
    }
}

/// Parses a comma-separated list of socket addresses (`0.0.0.0:53,[::]:53`).
pub fn parse_listen(s: &str) -> Result<Vec<SocketAddr>, DnsError> {
    let addrs = s
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<SocketAddr>().map_err(|e| DnsError::Config {
                setting: "MEDUZA_DNS_LISTEN",
                value: s.to_string(),
                reason: format!("{p:?}: {e}"),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if addrs.is_empty() {
        return Err(DnsError::Config {
            setting: "MEDUZA_DNS_LISTEN",
            value: s.to_string(),
            reason: "no address".into(),
        });
    }
    Ok(addrs)
}

/// The running frontend. Dropping it stops the listeners and health checks.
pub struct DnsHandle {
    frontend: Arc<Frontend>,
    listeners: Option<server::Listeners>,
}

/// Starts the frontend with the real network exchange.
pub async fn start(config: DnsConfig, plan: DnsPlan) -> Result<DnsHandle, DnsError> {
    let exchange = Arc::new(NetExchange::with_limits(
        config.upstream_sockets,
        config.upstream_max_inflight,
    ));
    start_with_exchange(config, plan, exchange).await
}

/// Starts the frontend with an injected exchange (tests use a fake).
pub async fn start_with_exchange(
    config: DnsConfig,
    plan: DnsPlan,
    exchange: Arc<dyn Exchange>,
) -> Result<DnsHandle, DnsError> {
    let workers = match config.udp_workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let listen = config.listen.clone();
    let (mode, tcp_timeout) = (config.udp_mode, config.tcp_timeout);
    let frontend = Frontend::new(config, &plan, exchange)?;
    frontend.start_health_checks();
    let listeners = server::start(frontend.clone(), &listen, workers, mode, tcp_timeout)?;
    Ok(DnsHandle {
        frontend,
        listeners: Some(listeners),
    })
}

impl DnsHandle {
    /// Bound addresses (UDP and TCP share each), in `listen` order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .as_ref()
            .map(|l| l.local_addrs.clone())
            .unwrap_or_default()
    }

    /// Replaces the host records; visible to the next query.
    pub fn set_hosts(&self, hosts: BTreeMap<String, Vec<IpAddr>>) {
        self.frontend.set_hosts(&hosts);
    }

    pub fn set_chain_state(&self, state: ChainState) {
        self.frontend.set_chain_state(state);
    }

    pub fn update_plan(&self, plan: DnsPlan) {
        self.frontend.update_plan(&plan);
    }

    pub fn upstream_status(&self) -> Vec<UpstreamStatus> {
        self.frontend.upstream_status()
    }

    pub fn failover_log(&self) -> Vec<FailoverLogEntry> {
        self.frontend.failover_log()
    }

    /// Status snapshots, sent after every health check and every failover-log entry.
    pub fn subscribe(&self) -> watch::Receiver<DnsStatus> {
        self.frontend.subscribe()
    }

    pub async fn test_upstream(&self, name: &str) -> Result<TestResult, DnsError> {
        self.frontend.test_upstream(name).await
    }

    /// Moves traffic to `target`, or (None) to the next healthy group by priority.
    /// Returns the group now active. The choice holds until that group fails.
    pub fn manual_failover(&self, target: Option<String>) -> Result<String, DnsError> {
        self.frontend.manual_failover(target)
    }

    pub fn counters(&self) -> Counters {
        self.frontend.counters()
    }

    pub fn chain_order(&self) -> Vec<String> {
        self.frontend.chain_order()
    }

    pub fn frontend(&self) -> &Arc<Frontend> {
        &self.frontend
    }

    pub async fn shutdown(mut self) {
        self.frontend.stop_health_checks();
        if let Some(l) = self.listeners.take() {
            l.shutdown().await;
        }
    }
}

impl Drop for DnsHandle {
    fn drop(&mut self) {
        self.frontend.stop_health_checks();
    }
}

/// `meduza dns serve`: the frontend alone, until SIGINT/SIGTERM. Without a supervisor
/// the chain members the plan enables are assumed running; one that is not answers
/// ECONNREFUSED on loopback and is skipped at once.
pub async fn serve_standalone_with(plan: DnsPlan, config: DnsConfig) -> anyhow::Result<()> {
    let state = ChainState {
        mosdns_running: plan.mosdns_enabled,
        clash_healthy: plan.clash_enabled,
    };
    let handle = start(config, plan).await?;
    handle.set_chain_state(state);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    tracing::info!(counters = ?handle.counters(), "dns frontend stopping");
    handle.shutdown().await;
    Ok(())
}
