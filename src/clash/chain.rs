//! The startup chain (DESIGN §9): DNS frontend up → mihomo healthy → MosDNS rule files
//! downloaded through mihomo → MosDNS started → TPROXY armed; and the periodic rule
//! refresh that restarts MosDNS only when a file changed.
//!
//! Owns: the order of those steps ([`plan`], pure) and running them ([`run_chain`]) as
//! one task that waits without timeout and never blocks anything else.
//! Must not: start processes or touch TPROXY itself: every effect goes through
//! [`ChainDeps`], which the integrator implements on the supervisor, the DNS frontend
//! and the [`crate::clash::MonitorHandle`].

use crate::clash::rules::{Route, RulesError, RulesReport};
use std::future::Future;
use std::time::Duration;

/// What is enabled on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainConfig {
    pub clash_enabled: bool,
    /// `clash/mode` is `tproxy` (not `mixed`).
    pub tproxy_mode: bool,
    pub mosdns_enabled: bool,
    /// mihomo's mixed port as a proxy URL ([`crate::clash::MIXED_PROXY_URL`] on a
    /// gateway; tests point it at the double's port).
    pub proxy_url: String,
}

impl ChainConfig {
    pub fn new(clash_enabled: bool, tproxy_mode: bool, mosdns_enabled: bool) -> Self {
        Self {
            clash_enabled,
            tproxy_mode,
            mosdns_enabled,
            proxy_url: crate::clash::MIXED_PROXY_URL.to_string(),
        }
    }
}

/// One step of the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainStep {
    WaitDnsUp,
    WaitMihomoHealthy,
    DownloadRules { route: Route },
    StartMosdns,
    ArmTproxy,
}

/// The steps for a configuration, in order.
pub fn plan(cfg: &ChainConfig) -> Vec<ChainStep> {
    let mut steps = vec![ChainStep::WaitDnsUp];
    if cfg.clash_enabled {
        steps.push(ChainStep::WaitMihomoHealthy);
    }
    if cfg.mosdns_enabled {
        let route = if cfg.clash_enabled {
            Route::Proxy {
                url: cfg.proxy_url.clone(),
            }
        } else {
            Route::Direct
        };
        steps.push(ChainStep::DownloadRules { route });
        steps.push(ChainStep::StartMosdns);
    }
    if cfg.clash_enabled && cfg.tproxy_mode {
        steps.push(ChainStep::ArmTproxy);
    }
    steps
}

/// The effects the chain needs; implemented by the integrator.
pub trait ChainDeps: Send + Sync {
    /// Resolves once the DNS frontend serves.
    fn dns_up(&self) -> impl Future<Output = ()> + Send;
    /// Resolves once mihomo is confirmed healthy (`MonitorHandle::wait_healthy`).
    fn mihomo_healthy(&self) -> impl Future<Output = ()> + Send;
    /// Downloads every rule file over `route` (`rules::download_rule_files`).
    fn download_rules(
        &self,
        route: &Route,
    ) -> impl Future<Output = Result<RulesReport, RulesError>> + Send;
    /// Asks the supervisor to start MosDNS.
    fn start_mosdns(&self) -> impl Future<Output = Result<(), String>> + Send;
    /// Asks the supervisor to restart MosDNS (it has no reload signal).
    fn restart_mosdns(&self) -> impl Future<Output = Result<(), String>> + Send;
    /// Lets the monitor apply TPROXY (`MonitorHandle::arm`).
    fn arm_tproxy(&self) -> impl Future<Output = ()> + Send;
}

/// Downloads until every rule file exists on disk. A file that failed but has a
/// previous copy does not block MosDNS (stale rules beat no rules); a file with no
/// copy does, and the round is retried after `retry`. While Clash is enabled each
/// round first waits for mihomo to be healthy, since the download must go through it.
async fn download_until_complete<D: ChainDeps>(
    deps: &D,
    route: &Route,
    retry: Duration,
) -> RulesReport {
    loop {
        if matches!(route, Route::Proxy { .. }) {
            deps.mihomo_healthy().await;
            tracing::info!("[mosdns] Downloading rules via Mihomo proxy (Clash is enabled)");
        } else {
            tracing::info!("[mosdns] Downloading rules directly (Clash is disabled)");
        }
        match deps.download_rules(route).await {
            Ok(report) if report.complete() => return report,
            Ok(report) => {
                let missing: Vec<String> = report
                    .missing
                    .iter()
                    .map(|(p, r)| format!("{}: {r}", p.display()))
                    .collect();
                tracing::error!(
                    ?missing,
                    retry_secs = retry.as_secs(),
                    "[mosdns] rule files missing, MosDNS not started; retrying"
                );
            }
            Err(err) => {
                tracing::error!(%err, retry_secs = retry.as_secs(), "[mosdns] rule download failed; retrying");
            }
        }
        tokio::time::sleep(retry).await;
    }
}

/// Runs `steps` in order. Never gives up: waits have no timeout and failed steps are
/// retried every `retry`. Spawn it; nothing else waits on it.
pub async fn run_chain<D: ChainDeps>(deps: &D, steps: &[ChainStep], retry: Duration) {
    for step in steps {
        match step {
            ChainStep::WaitDnsUp => {
                deps.dns_up().await;
                tracing::info!("[mosdns] DNS frontend is up");
            }
            ChainStep::WaitMihomoHealthy => {
                tracing::info!("[mosdns] Waiting for Mihomo to become healthy (no timeout)");
                deps.mihomo_healthy().await;
                tracing::info!("[mosdns] Mihomo is healthy, proceeding");
            }
            ChainStep::DownloadRules { route } => {
                let report = download_until_complete(deps, route, retry).await;
                tracing::info!(
                    changed = report.changed.len(),
                    unchanged = report.unchanged.len(),
                    stale = report.stale.len(),
                    "[mosdns] rule files ready"
                );
            }
            ChainStep::StartMosdns => loop {
                match deps.start_mosdns().await {
                    Ok(()) => {
                        tracing::info!("[mosdns] MosDNS started");
                        break;
                    }
                    Err(reason) => {
                        tracing::error!(%reason, "[mosdns] MosDNS start failed; retrying");
                        tokio::time::sleep(retry).await;
                    }
                }
            },
            ChainStep::ArmTproxy => {
                deps.arm_tproxy().await;
                tracing::info!("[clash] TProxy armed (applied while Mihomo is healthy)");
            }
        }
    }
}

/// One rule refresh (`mosdns/refresh` minutes, default 1440): download over `route`
/// and restart MosDNS only if a file changed. Returns whether it restarted MosDNS.
pub async fn refresh_rules_once<D: ChainDeps>(deps: &D, route: &Route) -> bool {
    if matches!(route, Route::Proxy { .. }) {
        deps.mihomo_healthy().await;
    }
    let report = match deps.download_rules(route).await {
        Ok(report) => report,
        Err(err) => {
            tracing::warn!(%err, "[mosdns] rule refresh failed, keeping current files");
            return false;
        }
    };
    if report.changed.is_empty() {
        tracing::info!("[mosdns] rule files unchanged, MosDNS keeps running");
        return false;
    }
    match deps.restart_mosdns().await {
        Ok(()) => {
            tracing::info!(
                changed = report.changed.len(),
                "[mosdns] rule files changed, MosDNS restarted"
            );
            true
        }
        Err(reason) => {
            tracing::error!(%reason, "[mosdns] MosDNS restart failed");
            false
        }
    }
}

/// The refresh loop: [`refresh_rules_once`] every `interval`, forever.
pub async fn refresh_rules_loop<D: ChainDeps>(deps: &D, route: Route, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        refresh_rules_once(deps, &route).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::Mutex;

    #[test]
    fn plans() {
        let proxy = Route::for_clash(true);
        let cases = [
            (
                ChainConfig::new(true, true, true),
                vec![
                    ChainStep::WaitDnsUp,
                    ChainStep::WaitMihomoHealthy,
                    ChainStep::DownloadRules {
                        route: proxy.clone(),
                    },
                    ChainStep::StartMosdns,
                    ChainStep::ArmTproxy,
                ],
            ),
            (
                ChainConfig::new(true, false, true),
                vec![
                    ChainStep::WaitDnsUp,
                    ChainStep::WaitMihomoHealthy,
                    ChainStep::DownloadRules { route: proxy },
                    ChainStep::StartMosdns,
                ],
            ),
            (
                ChainConfig::new(false, true, true),
                vec![
                    ChainStep::WaitDnsUp,
                    ChainStep::DownloadRules {
                        route: Route::Direct,
                    },
                    ChainStep::StartMosdns,
                ],
            ),
            (
                ChainConfig::new(true, true, false),
                vec![
                    ChainStep::WaitDnsUp,
                    ChainStep::WaitMihomoHealthy,
                    ChainStep::ArmTproxy,
                ],
            ),
            (
                ChainConfig::new(false, false, false),
                vec![ChainStep::WaitDnsUp],
            ),
        ];
        for (cfg, want) in cases {
            assert_eq!(plan(&cfg), want, "{cfg:?}");
        }
    }

    /// Records calls; rule downloads answer from a script.
    struct Fake {
        calls: Mutex<Vec<String>>,
        downloads: Mutex<Vec<RulesReport>>,
        start_failures: Mutex<u32>,
    }

    impl Fake {
        fn new(downloads: Vec<RulesReport>) -> Self {
            Self {
                calls: Mutex::new(Vec::new()),
                downloads: Mutex::new(downloads),
                start_failures: Mutex::new(0),
            }
        }
        fn log(&self, s: &str) {
            self.calls.lock().expect("lock").push(s.to_string());
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().expect("lock").clone()
        }
    }

    impl ChainDeps for Fake {
        async fn dns_up(&self) {
            self.log("dns_up");
        }
        async fn mihomo_healthy(&self) {
            self.log("mihomo_healthy");
        }
        async fn download_rules(&self, route: &Route) -> Result<RulesReport, RulesError> {
            self.log(&format!("download {route}"));
            let mut d = self.downloads.lock().expect("lock");
            Ok(if d.is_empty() {
                RulesReport::default()
            } else {
                d.remove(0)
            })
        }
        async fn start_mosdns(&self) -> Result<(), String> {
            self.log("start_mosdns");
            let mut f = self.start_failures.lock().expect("lock");
            if *f > 0 {
                *f -= 1;
                return Err("spawn failed".into());
            }
            Ok(())
        }
        async fn restart_mosdns(&self) -> Result<(), String> {
            self.log("restart_mosdns");
            Ok(())
        }
        async fn arm_tproxy(&self) {
            self.log("arm_tproxy");
        }
    }

    fn missing() -> RulesReport {
        RulesReport {
            missing: vec![(PathBuf::from("/r/a.txt"), "HTTP 503".into())],
            ..RulesReport::default()
        }
    }

    #[tokio::test]
    async fn full_chain_runs_in_order_and_retries_missing_rules() {
        let fake = Fake::new(vec![missing(), RulesReport::default()]);
        *fake.start_failures.lock().expect("lock") = 1;
        let cfg = ChainConfig::new(true, true, true);
        run_chain(&fake, &plan(&cfg), Duration::from_millis(1)).await;
        assert_eq!(
            fake.calls(),
            [
                "dns_up",
                "mihomo_healthy",
                "mihomo_healthy",
                "download proxy http://127.0.0.1:7890",
                "mihomo_healthy",
                "download proxy http://127.0.0.1:7890",
                "start_mosdns",
                "start_mosdns",
                "arm_tproxy",
            ]
        );
    }

    #[tokio::test]
    async fn stale_rules_do_not_block_mosdns() {
        let stale = RulesReport {
            stale: vec![(PathBuf::from("/r/a.txt"), "HTTP 503".into())],
            ..RulesReport::default()
        };
        let fake = Fake::new(vec![stale]);
        let cfg = ChainConfig::new(false, true, true);
        run_chain(&fake, &plan(&cfg), Duration::from_millis(1)).await;
        assert_eq!(fake.calls(), ["dns_up", "download direct", "start_mosdns"]);
    }

    #[tokio::test]
    async fn refresh_restarts_only_on_change() {
        let changed = RulesReport {
            changed: vec![PathBuf::from("/r/a.txt")],
            ..RulesReport::default()
        };
        let unchanged = RulesReport {
            unchanged: vec![PathBuf::from("/r/a.txt")],
            ..RulesReport::default()
        };
        let fake = Fake::new(vec![unchanged, changed]);
        assert!(!refresh_rules_once(&fake, &Route::Direct).await);
        assert!(refresh_rules_once(&fake, &Route::Direct).await);
        assert_eq!(
            fake.calls(),
            ["download direct", "download direct", "restart_mosdns"]
        );
    }
}
