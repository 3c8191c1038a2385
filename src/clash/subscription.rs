//! Clash subscriptions: download, validation, the last good copy, periodic refresh,
//! and hot-reloading mihomo with verification.
//!
//! Owns: fetching the active subscription (through mihomo while it is healthy, direct
//! otherwise), refusing anything that is not a usable Clash document, keeping the last
//! good copy on disk (mihomo's provider file), reloading mihomo via
//! `PUT /configs?force=true` — verified, because mihomo answers 204 even when applying
//! fails — with SIGHUP as the fallback, and the periodic refresh that ties these
//! together ([`refresh_loop`], [`refresh_once`]) with its outcome ([`RefreshOutcome`]).
//! Must not: render mihomo's config (generators merge base + subscription; the
//! integrator writes it), send signals itself (the supervisor does, via [`Signaller`]),
//! or publish status (the integrator does, from the [`RefreshOutcome`]).

use crate::clash::api::{MihomoApi, MihomoError};
use crate::clash::monitor::{HealthStatus, Phase};
use crate::clash::rules::{write_if_changed, Fetcher, Route, RulesError};
use crate::etcd::status::StateLine;
use serde_norway::Value as Yaml;
use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::watch;

/// Errors of subscription handling and mihomo reloads.
#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    #[error("subscription {url}: invalid: {reason}")]
    Invalid { url: String, reason: String },
    #[error("subscription download failed: {0}")]
    Download(#[from] RulesError),
    #[error("mihomo config {path}: {reason}")]
    BadConfig { path: PathBuf, reason: String },
    #[error("mihomo rejected {path}: {source}")]
    Rejected {
        path: PathBuf,
        #[source]
        source: MihomoError,
    },
    #[error("mihomo did not apply {path} (API and SIGHUP tried); missing: {missing:?}")]
    NotApplied { path: PathBuf, missing: Vec<String> },
}

/// What a valid subscription holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub proxies: usize,
    pub providers: usize,
}

/// A subscription is usable when it is a YAML mapping with a non-empty `proxies` list
/// (each entry a mapping with `name` and `type`) or a non-empty `proxy-providers`
/// mapping. A provider payload (a file with just `proxies:`) passes the same check.
pub fn validate(text: &str) -> Result<Summary, String> {
    let doc: Yaml = serde_norway::from_str(text).map_err(|e| format!("not YAML: {e}"))?;
    let map = doc.as_mapping().ok_or("not a YAML mapping")?;
    let mut proxies = 0;
    if let Some(list) = map.get("proxies") {
        let list = list.as_sequence().ok_or("proxies is not a list")?;
        for (i, p) in list.iter().enumerate() {
            let named = p
                .get("name")
                .and_then(Yaml::as_str)
                .is_some_and(|n| !n.is_empty());
            if !named || p.get("type").is_none() {
                return Err(format!("proxies[{i}] has no name or type"));
            }
        }
        proxies = list.len();
    }
    let providers = match map.get("proxy-providers") {
        Some(p) => p
            .as_mapping()
            .ok_or("proxy-providers is not a mapping")?
            .len(),
        None => 0,
    };
    if proxies == 0 && providers == 0 {
        return Err("no proxies and no proxy-providers".to_string());
    }
    Ok(Summary { proxies, providers })
}

/// The proxy names a subscription gives mihomo's proxy provider: its `proxies[].name`
/// (a provider reads only `proxies`; groups and rules in the document are ignored).
pub fn subscription_names(text: &str) -> Result<Vec<String>, String> {
    let doc: Yaml = serde_norway::from_str(text).map_err(|e| format!("not YAML: {e}"))?;
    let names: BTreeSet<String> = doc
        .get("proxies")
        .and_then(Yaml::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("name").and_then(Yaml::as_str))
        .map(str::to_string)
        .collect();
    Ok(names.into_iter().collect())
}

/// The route of a subscription download: through mihomo only while it is healthy.
pub fn subscription_route(health: &HealthStatus) -> Route {
    Route::for_clash(health.phase == Phase::Healthy)
}

/// What a successful [`SubscriptionStore::refresh`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refreshed {
    /// The stored copy was rewritten (its content changed).
    pub changed: bool,
    pub summary: Summary,
}

/// The last good subscription, kept in one file: mihomo's proxy-provider file, so the
/// stored copy is what mihomo loads on its next reload.
#[derive(Debug, Clone)]
pub struct SubscriptionStore {
    path: PathBuf,
}

impl SubscriptionStore {
    /// `path`, e.g. `$MEDUZA_STATE_DIR/clash/subscription-<name>.yaml`.
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn last_good(&self) -> Option<String> {
        std::fs::read_to_string(&self.path).ok()
    }

    /// Downloads and validates `url`; stores it if valid and different. On any failure
    /// the last good copy stays. The copy is read by mihomo as a proxy provider, which
    /// takes only the `proxies` list, so a document without proxies (only
    /// `proxy-providers`) is refused here although [`validate`] accepts it.
    pub async fn refresh(
        &self,
        fetcher: &Fetcher,
        url: &str,
        route: &Route,
    ) -> Result<Refreshed, SubscriptionError> {
        let body = fetcher.fetch(url, route).await?;
        let invalid = |reason: String| SubscriptionError::Invalid {
            url: url.to_string(),
            reason,
        };
        let text = String::from_utf8(body).map_err(|_| invalid("not UTF-8".to_string()))?;
        let summary = validate(&text).map_err(invalid)?;
        if summary.proxies == 0 {
            return Err(invalid(
                "no proxies list (only proxy-providers): mihomo's proxy provider reads `proxies`"
                    .to_string(),
            ));
        }
        let changed = write_if_changed(&self.path, text.as_bytes())?;
        tracing::info!(%url, %route, proxies = summary.proxies, changed,
            "[clash-refresh] subscription downloaded");
        Ok(Refreshed { changed, summary })
    }
}

/// Sends SIGHUP to the running mihomo (the supervisor knows its pid).
pub trait Signaller: Send + Sync {
    fn sighup(&self) -> impl Future<Output = Result<(), String>> + Send;
}

/// Names a reload must make visible in `GET /proxies`: every `proxies[].name` and
/// `proxy-groups[].name` of the config.
pub fn expected_names(config_yaml: &str) -> Result<Vec<String>, String> {
    let doc: Yaml = serde_norway::from_str(config_yaml).map_err(|e| format!("not YAML: {e}"))?;
    let mut names = BTreeSet::new();
    for key in ["proxies", "proxy-groups"] {
        for entry in doc
            .get(key)
            .and_then(Yaml::as_sequence)
            .into_iter()
            .flatten()
        {
            if let Some(name) = entry.get("name").and_then(Yaml::as_str) {
                names.insert(name.to_string());
            }
        }
    }
    Ok(names.into_iter().collect())
}

/// How a reload got through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadMethod {
    Api,
    Sighup,
}

/// How long to wait for a reload to show in `GET /proxies`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyPolicy {
    pub timeout: Duration,
    pub poll: Duration,
}

impl Default for VerifyPolicy {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            poll: Duration::from_millis(100),
        }
    }
}

async fn missing_names(api: &MihomoApi, expected: &[String], policy: VerifyPolicy) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + policy.timeout;
    loop {
        let missing: Vec<String> = match api.proxies().await {
            Ok(v) => {
                let have = v.get("proxies").and_then(serde_json::Value::as_object);
                expected
                    .iter()
                    .filter(|n| !have.is_some_and(|m| m.contains_key(n.as_str())))
                    .cloned()
                    .collect()
            }
            Err(_) => expected.to_vec(),
        };
        if missing.is_empty() || tokio::time::Instant::now() >= deadline {
            return missing;
        }
        tokio::time::sleep(policy.poll).await;
    }
}

/// Hot-reloads mihomo from `config_path` (already written, absolute, inside mihomo's
/// home) whose content is `config_yaml`, and verifies the result. A 400 (parse error)
/// is final: SIGHUP would read the same file. Anything else that does not verify is
/// retried once with SIGHUP, which also re-creates the controller.
pub async fn hot_reload<S: Signaller>(
    api: &MihomoApi,
    signaller: &S,
    config_path: &Path,
    config_yaml: &str,
    policy: VerifyPolicy,
) -> Result<ReloadMethod, SubscriptionError> {
    let expected = expected_names(config_yaml).map_err(|reason| SubscriptionError::BadConfig {
        path: config_path.to_path_buf(),
        reason,
    })?;
    hot_reload_expecting(api, signaller, config_path, &expected, policy).await
}

/// [`hot_reload`] with the names the reload must make visible given explicitly (e.g.
/// the config's names plus the proxies of a provider file it loads).
pub async fn hot_reload_expecting<S: Signaller>(
    api: &MihomoApi,
    signaller: &S,
    config_path: &Path,
    expected: &[String],
    policy: VerifyPolicy,
) -> Result<ReloadMethod, SubscriptionError> {
    let expected = expected.to_vec();
    match api.reload_path(config_path).await {
        Ok(()) => {
            let missing = missing_names(api, &expected, policy).await;
            if missing.is_empty() {
                tracing::info!(path = %config_path.display(), "[clash] mihomo reloaded via API");
                return Ok(ReloadMethod::Api);
            }
            tracing::warn!(path = %config_path.display(), ?missing,
                "[clash] mihomo answered 204 but did not apply the config, sending SIGHUP");
        }
        Err(err @ MihomoError::Status { status: 400, .. }) => {
            return Err(SubscriptionError::Rejected {
                path: config_path.to_path_buf(),
                source: err,
            });
        }
        Err(err) => {
            tracing::warn!(path = %config_path.display(), %err, "[clash] API reload failed, sending SIGHUP");
        }
    }
    if let Err(reason) = signaller.sighup().await {
        tracing::warn!(%reason, "[clash] SIGHUP to mihomo failed");
    }
    let missing = missing_names(api, &expected, policy).await;
    if missing.is_empty() {
        tracing::info!(path = %config_path.display(), "[clash] mihomo reloaded via SIGHUP");
        Ok(ReloadMethod::Sighup)
    } else {
        Err(SubscriptionError::NotApplied {
            path: config_path.to_path_buf(),
            missing,
        })
    }
}

/// The mihomo a refresh reloads: its API, how to signal it, its config file (absolute,
/// inside its home; it names the provider file the store writes) and how long to wait
/// for a reload to show.
pub struct ReloadTarget<S> {
    pub api: MihomoApi,
    pub signaller: S,
    pub config_path: PathBuf,
    pub policy: VerifyPolicy,
}

/// What one refresh round came to; the integrator publishes it
/// (`/updated/<id>/clash/subscription`, [`RefreshOutcome::status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// A new subscription is stored and mihomo verifiably runs it.
    Reloaded {
        summary: Summary,
        method: ReloadMethod,
    },
    /// The download equals the stored copy, which mihomo already runs.
    Unchanged { summary: Summary },
    /// Download or validation failed: the last good copy stays, mihomo untouched.
    DownloadFailed { reason: String },
    /// The new copy is stored but mihomo did not take it (retried next round).
    ReloadFailed { summary: Summary, reason: String },
}

impl RefreshOutcome {
    /// The `clash/subscription` line, `ok|failed <unix-ts> <detail>` (the key and its
    /// rendering are [`crate::etcd::status`]'s).
    pub fn status(&self, now: u64) -> StateLine {
        match self {
            Self::Reloaded { summary, method } => {
                let via = match method {
                    ReloadMethod::Api => "api",
                    ReloadMethod::Sighup => "sighup",
                };
                let detail = format!("{} proxies, reloaded via {via}", summary.proxies);
                StateLine::new("ok", now, detail)
            }
            Self::Unchanged { summary } => {
                StateLine::new("ok", now, format!("{} proxies, unchanged", summary.proxies))
            }
            Self::DownloadFailed { reason } => StateLine::new(
                "failed",
                now,
                format!("{reason}; keeping the last good subscription"),
            ),
            Self::ReloadFailed { reason, .. } => {
                StateLine::new("failed", now, format!("{reason}; retrying next refresh"))
            }
        }
    }
}

/// One refresh round: download over `route` into `store`; when the stored copy changed
/// (or an earlier reload of it failed: `reload_pending`) hot-reload mihomo and verify
/// that every name of its config and every proxy of the new subscription shows up.
pub async fn refresh_once<S: Signaller>(
    fetcher: &Fetcher,
    store: &SubscriptionStore,
    url: &str,
    route: &Route,
    target: &ReloadTarget<S>,
    reload_pending: &mut bool,
) -> RefreshOutcome {
    let refreshed = match store.refresh(fetcher, url, route).await {
        Ok(r) => r,
        Err(err) => {
            tracing::warn!(%url, %route, %err,
                "[clash-refresh] refresh failed, keeping last good subscription");
            return RefreshOutcome::DownloadFailed {
                reason: err.to_string(),
            };
        }
    };
    let summary = refreshed.summary;
    if !refreshed.changed && !*reload_pending {
        tracing::info!(%url, proxies = summary.proxies, "[clash-refresh] subscription unchanged");
        return RefreshOutcome::Unchanged { summary };
    }
    *reload_pending = true;
    let reload_failed = |reason: String| {
        tracing::warn!(%reason, "[clash-refresh] hot reload failed; retrying next refresh");
        RefreshOutcome::ReloadFailed { summary, reason }
    };
    let bad_config = |reason: String| SubscriptionError::BadConfig {
        path: target.config_path.clone(),
        reason,
    };
    let expected = std::fs::read_to_string(&target.config_path)
        .map_err(|e| bad_config(e.to_string()))
        .and_then(|cfg| expected_names(&cfg).map_err(bad_config))
        .and_then(|mut names| {
            let text = store.last_good().unwrap_or_default();
            let subs = subscription_names(&text).map_err(|reason| SubscriptionError::Invalid {
                url: url.to_string(),
                reason,
            })?;
            names.extend(subs);
            names.sort();
            names.dedup();
            Ok(names)
        });
    let expected = match expected {
        Ok(names) => names,
        Err(err) => return reload_failed(err.to_string()),
    };
    match hot_reload_expecting(
        &target.api,
        &target.signaller,
        &target.config_path,
        &expected,
        target.policy,
    )
    .await
    {
        Ok(method) => {
            *reload_pending = false;
            tracing::info!(
                ?method,
                proxies = summary.proxies,
                "[clash-refresh] mihomo reloaded with the new subscription"
            );
            RefreshOutcome::Reloaded { summary, method }
        }
        Err(err) => reload_failed(err.to_string()),
    }
}

/// Runs [`refresh_once`] every `interval` (a fixed cadence: health changes do not
/// postpone it) until the health channel closes, routing each download through mihomo
/// while it is healthy, and hands every outcome to `report`.
pub async fn refresh_loop<S: Signaller, R: Fn(&RefreshOutcome) + Send>(
    fetcher: Fetcher,
    store: SubscriptionStore,
    url: String,
    interval: Duration,
    mut health: watch::Receiver<HealthStatus>,
    target: ReloadTarget<S>,
    report: R,
) {
    let mut reload_pending = false;
    let mut next = tokio::time::Instant::now() + interval;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            changed = health.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        }
        let route = subscription_route(&health.borrow_and_update());
        let outcome =
            refresh_once(&fetcher, &store, &url, &route, &target, &mut reload_pending).await;
        report(&outcome);
        // The next round is one interval after this one was due, or one interval after
        // it ended when it overran (a slow download with retries).
        let now = tokio::time::Instant::now();
        next = if next + interval > now {
            next + interval
        } else {
            now + interval
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::status::StatusUpdate;

    #[test]
    fn validate_table() {
        let ok = [
            ("proxies:\n  - {name: a, type: ss}\n", Summary { proxies: 1, providers: 0 }),
            ("proxy-providers:\n  p: {type: http, url: 'http://x', path: ./p.yaml}\n", Summary { proxies: 0, providers: 1 }),
            (
                "mixed-port: 7890\nproxies:\n  - {name: a, type: ss}\n  - {name: b, type: vmess}\nproxy-providers: {p: {type: file, path: x}}\n",
                Summary { proxies: 2, providers: 1 },
            ),
        ];
        for (text, want) in ok {
            assert_eq!(validate(text), Ok(want), "{text}");
        }
        let bad = [
            ("<html>blocked</html>", "not a YAML mapping"),
            ("- a\n- b\n", "not a YAML mapping"),
            ("mixed-port: 7890\n", "no proxies and no proxy-providers"),
            ("proxies: []\n", "no proxies and no proxy-providers"),
            ("proxies: {a: 1}\n", "proxies is not a list"),
            (
                "proxies:\n  - {type: ss}\n",
                "proxies[0] has no name or type",
            ),
            ("proxies: [\n", "not YAML"),
        ];
        for (text, want) in bad {
            let err = validate(text).expect_err(text);
            assert!(err.starts_with(want), "{text}: {err}");
        }
    }

    #[test]
    fn names_from_config() {
        let cfg = "proxies:\n  - {name: b, type: ss}\n  - {name: a, type: ss}\nproxy-groups:\n  - {name: auto, type: url-test, proxies: [a]}\n";
        assert_eq!(
            expected_names(cfg),
            Ok(vec!["a".into(), "auto".into(), "b".into()])
        );
        assert_eq!(expected_names("mode: rule\n"), Ok(vec![]));
    }

    #[test]
    fn provider_names_are_the_proxies_only() {
        let sub = "proxies:\n  - {name: sg1, type: ss}\n  - {name: hk1, type: ss}\nproxy-groups:\n  - {name: G, type: select, proxies: [hk1]}\n";
        assert_eq!(
            subscription_names(sub),
            Ok(vec!["hk1".into(), "sg1".into()])
        );
        assert_eq!(subscription_names("mode: rule\n"), Ok(vec![]));
        assert!(subscription_names("proxies: [\n").is_err());
    }

    #[test]
    fn outcome_status_lines() {
        let summary = Summary {
            proxies: 3,
            providers: 0,
        };
        let cases = [
            (
                RefreshOutcome::Reloaded {
                    summary,
                    method: ReloadMethod::Api,
                },
                "ok 7 3 proxies, reloaded via api",
            ),
            (
                RefreshOutcome::Reloaded {
                    summary,
                    method: ReloadMethod::Sighup,
                },
                "ok 7 3 proxies, reloaded via sighup",
            ),
            (
                RefreshOutcome::Unchanged { summary },
                "ok 7 3 proxies, unchanged",
            ),
            (
                RefreshOutcome::DownloadFailed {
                    reason: "subscription u: invalid: not a YAML mapping".into(),
                },
                "failed 7 subscription u: invalid: not a YAML mapping; keeping the last good subscription",
            ),
            (
                RefreshOutcome::ReloadFailed {
                    summary,
                    reason: "mihomo did not apply".into(),
                },
                "failed 7 mihomo did not apply; retrying next refresh",
            ),
        ];
        for (outcome, want) in cases {
            assert_eq!(outcome.status(7).value(), want);
            assert_eq!(
                StatusUpdate::ClashSubscription(outcome.status(7)).value(),
                want
            );
        }
    }

    #[test]
    fn route_depends_on_health() {
        let healthy = HealthStatus {
            phase: Phase::Healthy,
            reason: String::new(),
        };
        let waiting = HealthStatus {
            phase: Phase::Waiting,
            reason: String::new(),
        };
        assert!(matches!(subscription_route(&healthy), Route::Proxy { .. }));
        assert_eq!(subscription_route(&waiting), Route::Direct);
    }
}
