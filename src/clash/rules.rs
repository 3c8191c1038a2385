//! Downloads for the Clash/MosDNS side: the HTTP fetcher with its route and retry
//! policy, and MosDNS rule files (`/global/mosdns/rule_files`).
//!
//! Owns: choosing the route of a download (through mihomo's mixed port while Clash is
//! enabled — never direct then — and direct otherwise), retrying with exponential
//! backoff ([`RetryPolicy`]), and writing rule files atomically under `MEDUZA_ROOT`,
//! reporting which ones changed so MosDNS is restarted only when one did.
//! Must not: start or restart MosDNS (the chain asks the supervisor), or decide when to
//! download (the chain and the refresh loop do).

use crate::backoff::Jitter;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

/// The etcd key holding the rule-file map.
pub const RULE_FILES_KEY: &str = "/global/mosdns/rule_files";

/// Errors of downloads and rule files.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("{key}: {reason} (value {value:?})")]
    BadRuleFiles {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("download {url} via {route}: {reason} (after {attempts} attempts)")]
    Download {
        url: String,
        route: String,
        attempts: u32,
        reason: String,
    },
    #[error("building HTTP client for {route}: {reason}")]
    Client { route: String, reason: String },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How a download leaves the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Through an HTTP proxy (mihomo's mixed port, `http://127.0.0.1:7890`).
    Proxy { url: String },
    /// Straight out, ignoring any `*_proxy` environment.
    Direct,
}

impl Route {
    /// The route the design mandates: the mixed port while Clash is enabled, else direct.
    pub fn for_clash(clash_enabled: bool) -> Self {
        if clash_enabled {
            Route::Proxy {
                url: crate::clash::MIXED_PROXY_URL.to_string(),
            }
        } else {
            Route::Direct
        }
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Proxy { url } => write!(f, "proxy {url}"),
            Route::Direct => f.write_str("direct"),
        }
    }
}

/// Retry policy of a download: `attempts` tries, waiting `first_delay`, then twice as
/// long each time ([`crate::backoff::Backoff`] without jitter: the waits 1, 2, 4, 8 s are
/// documented in docs/clash.md, and a download goes to its own origin, not to etcd).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub first_delay: Duration,
}

/// The old name of [`RetryPolicy`], kept while `tests/loopback/clash_rules.rs` and
/// `tests/loopback/clash_chain.rs` still use it; [`crate::backoff::Backoff`] is the backoff.
pub type Backoff = RetryPolicy;

impl Default for RetryPolicy {
    /// 5 attempts, waiting 1, 2, 4, 8 s between them.
    fn default() -> Self {
        Self {
            attempts: 5,
            first_delay: Duration::from_secs(1),
        }
    }
}

impl RetryPolicy {
    /// The waits between attempts, uncapped and exact.
    pub fn backoff(&self) -> crate::backoff::Backoff {
        crate::backoff::Backoff::new(self.first_delay, Duration::MAX, Jitter::None)
    }

    /// The waits between attempts (one fewer than `attempts`).
    pub fn delays(&self) -> Vec<Duration> {
        let mut backoff = self.backoff();
        (1..self.attempts).map(|_| backoff.next()).collect()
    }
}

/// What a [`Fetcher`] downloads, for the predecessor's log prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// MosDNS rule files (`[mosdns]`).
    RuleFiles,
    /// The Clash subscription (`[clash-refresh]`).
    Subscription,
}

/// An HTTP fetcher with a retry policy and a per-attempt timeout.
#[derive(Debug, Clone)]
pub struct Fetcher {
    /// Which log prefix the download attempts carry.
    pub purpose: Purpose,
    pub backoff: RetryPolicy,
    pub timeout: Duration,
    pub user_agent: String,
}

impl Default for Fetcher {
    fn default() -> Self {
        Self {
            purpose: Purpose::RuleFiles,
            backoff: RetryPolicy::default(),
            timeout: Duration::from_secs(30),
            // Subscription services pick the Clash YAML format from a "clash" UA.
            user_agent: "clash.meta (meduza)".to_string(),
        }
    }
}

impl Fetcher {
    fn client(&self, route: &Route) -> Result<reqwest::Client, RulesError> {
        let builder = reqwest::Client::builder()
            .timeout(self.timeout)
            .connect_timeout(self.timeout)
            .user_agent(self.user_agent.clone());
        let builder = match route {
            // An explicit proxy turns off reqwest's environment proxies; every scheme
            // (http and https via CONNECT) goes to mihomo.
            Route::Proxy { url } => {
                let proxy = reqwest::Proxy::all(url).map_err(|e| RulesError::Client {
                    route: route.to_string(),
                    reason: e.to_string(),
                })?;
                builder.proxy(proxy)
            }
            Route::Direct => builder.no_proxy(),
        };
        builder.build().map_err(|e| RulesError::Client {
            route: route.to_string(),
            reason: e.to_string(),
        })
    }

    /// GET `url` over `route`, retrying per the backoff. Any non-2xx status counts as a
    /// failed attempt.
    pub async fn fetch(&self, url: &str, route: &Route) -> Result<Vec<u8>, RulesError> {
        let client = self.client(route)?;
        let mut backoff = self.backoff.backoff();
        let attempts = self.backoff.attempts.max(1);
        let mut last = String::new();
        for attempt in 1..=attempts {
            match fetch_once(&client, url).await {
                Ok(body) => return Ok(body),
                Err(reason) => {
                    match self.purpose {
                        Purpose::RuleFiles => {
                            tracing::warn!(%url, %route, attempt, attempts, %reason, "[mosdns] download attempt failed")
                        }
                        Purpose::Subscription => {
                            tracing::warn!(%url, %route, attempt, attempts, %reason, "[clash-refresh] download attempt failed")
                        }
                    }
                    last = reason;
                }
            }
            if attempt < attempts {
                tokio::time::sleep(backoff.next()).await;
            }
        }
        Err(RulesError::Download {
            url: url.to_string(),
            route: route.to_string(),
            attempts,
            reason: last,
        })
    }
}

async fn fetch_once(client: &reqwest::Client, url: &str) -> Result<Vec<u8>, String> {
    let resp = client.get(url).send().await.map_err(|e| error_chain(&e))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    let body = resp.bytes().await.map_err(|e| error_chain(&e))?;
    Ok(body.to_vec())
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}

/// One rule file: where MosDNS reads it (as written in etcd) and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleFile {
    /// The path as given in etcd: absolute on the device, or relative to MosDNS's
    /// working directory.
    pub path: String,
    pub url: String,
}

/// Parses `/global/mosdns/rule_files` (`{"path": "url"}`), sorted by path.
pub fn parse_rule_files(value: &str) -> Result<Vec<RuleFile>, RulesError> {
    let bad = |reason: String| RulesError::BadRuleFiles {
        key: RULE_FILES_KEY,
        value: value.to_string(),
        reason,
    };
    let parsed: Value = serde_json::from_str(value).map_err(|e| bad(format!("not JSON: {e}")))?;
    let map = parsed
        .as_object()
        .ok_or_else(|| bad("not a JSON object {\"path\": \"url\"}".to_string()))?;
    let mut files = BTreeMap::new();
    for (path, url) in map {
        let url = url
            .as_str()
            .ok_or_else(|| bad(format!("url of {path:?} is not a string")))?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(bad(format!("url of {path:?} is not http(s): {url:?}")));
        }
        if path.is_empty()
            || Path::new(path)
                .components()
                .any(|c| c == Component::ParentDir)
        {
            return Err(bad(format!("path {path:?} is empty or contains '..'")));
        }
        files.insert(path.clone(), url.to_string());
    }
    Ok(files
        .into_iter()
        .map(|(path, url)| RuleFile { path, url })
        .collect())
}

/// Where a rule file lands: absolute device paths go under `root`; relative ones under
/// `root/<mosdns_dir>` (MosDNS resolves them against its `-d` directory).
pub fn local_path(root: &Path, mosdns_dir: &str, path: &str) -> PathBuf {
    let rel = |p: &str| -> PathBuf {
        Path::new(p)
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect()
    };
    if path.starts_with('/') {
        root.join(rel(path))
    } else {
        root.join(rel(mosdns_dir)).join(rel(path))
    }
}

/// The outcome of one download round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RulesReport {
    /// Written because the content differs (or the file was new).
    pub changed: Vec<PathBuf>,
    /// Downloaded, same content as on disk; not rewritten.
    pub unchanged: Vec<PathBuf>,
    /// Download failed; the previous copy on disk is kept.
    pub stale: Vec<(PathBuf, String)>,
    /// Download failed and there is no copy on disk: MosDNS cannot load its config.
    pub missing: Vec<(PathBuf, String)>,
}

impl RulesReport {
    /// MosDNS can start (every referenced file exists).
    pub fn complete(&self) -> bool {
        self.missing.is_empty()
    }
}

/// Rejects bodies that cannot be a rule list: not UTF-8, or an HTML page (a captive
/// portal or an error page served with 200), which would make MosDNS fail to start.
fn check_rule_body(body: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(body).map_err(|_| "not UTF-8 text".to_string())?;
    if text.trim_start().starts_with('<') {
        return Err("looks like HTML, not a rule list".to_string());
    }
    Ok(())
}

/// Downloads every rule file over `route` and writes the changed ones atomically.
pub async fn download_rule_files(
    fetcher: &Fetcher,
    root: &Path,
    mosdns_dir: &str,
    files: &[RuleFile],
    route: &Route,
) -> Result<RulesReport, RulesError> {
    let mut report = RulesReport::default();
    tracing::info!(%route, files = files.len(), "[mosdns] Downloading rules");
    for file in files {
        let dest = local_path(root, mosdns_dir, &file.path);
        let fetched = fetcher
            .fetch(&file.url, route)
            .await
            .map_err(|e| e.to_string())
            .and_then(|body| check_rule_body(&body).map(|()| body));
        match fetched {
            Ok(body) => {
                if write_if_changed(&dest, &body)? {
                    tracing::info!(path = %dest.display(), url = %file.url, "[mosdns] rule file updated");
                    report.changed.push(dest);
                } else {
                    report.unchanged.push(dest);
                }
            }
            Err(reason) => {
                if dest.exists() {
                    tracing::warn!(path = %dest.display(), %reason, "[mosdns] rule download failed, keeping previous file");
                    report.stale.push((dest, reason));
                } else {
                    tracing::error!(path = %dest.display(), %reason, "[mosdns] rule download failed, no previous file");
                    report.missing.push((dest, reason));
                }
            }
        }
    }
    Ok(report)
}

/// Mode of rule files and the subscription: MosDNS and mihomo read them.
const RULE_FILE_MODE: u32 = 0o644;

/// Writes `content` to `path` atomically and durably ([`crate::files::write_if_changed`]),
/// only when it (or the file's mode) differs. Returns whether the file was written.
pub fn write_if_changed(path: &Path, content: &[u8]) -> Result<bool, RulesError> {
    crate::files::write_if_changed(path, content, RULE_FILE_MODE).map_err(|source| {
        RulesError::Write {
            path: path.to_path_buf(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_delays() {
        assert_eq!(
            RetryPolicy::default().delays(),
            [1, 2, 4, 8].map(Duration::from_secs).to_vec()
        );
        let b = RetryPolicy {
            attempts: 1,
            first_delay: Duration::from_secs(1),
        };
        assert!(b.delays().is_empty());
    }

    #[test]
    fn route_follows_clash() {
        assert_eq!(
            Route::for_clash(true),
            Route::Proxy {
                url: "http://127.0.0.1:7890".into()
            }
        );
        assert_eq!(Route::for_clash(false), Route::Direct);
    }

    #[test]
    fn rule_files_parse() {
        let files = parse_rule_files(
            r#"{"/etc/mosdns/rules/b.txt": "https://x/b", "rules/a.txt": "http://x/a"}"#,
        )
        .expect("valid");
        assert_eq!(
            files,
            vec![
                RuleFile {
                    path: "/etc/mosdns/rules/b.txt".into(),
                    url: "https://x/b".into()
                },
                RuleFile {
                    path: "rules/a.txt".into(),
                    url: "http://x/a".into()
                },
            ]
        );
        for bad in [
            "[]",
            "not json",
            r#"{"/a": 1}"#,
            r#"{"/a": "ftp://x"}"#,
            r#"{"/etc/../shadow": "http://x"}"#,
            r#"{"": "http://x"}"#,
        ] {
            let err = parse_rule_files(bad).expect_err(bad);
            assert!(err.to_string().starts_with(RULE_FILES_KEY), "{err}");
        }
    }

    #[test]
    fn local_paths_stay_under_root() {
        let root = Path::new("/tmp/r");
        assert_eq!(
            local_path(root, "/etc/mosdns", "/etc/mosdns/rules/x.txt"),
            PathBuf::from("/tmp/r/etc/mosdns/rules/x.txt")
        );
        assert_eq!(
            local_path(root, "/etc/mosdns", "rules/x.txt"),
            PathBuf::from("/tmp/r/etc/mosdns/rules/x.txt")
        );
    }

    #[test]
    fn html_is_not_a_rule_list() {
        assert!(check_rule_body(b"full:a.example\n").is_ok());
        assert!(check_rule_body(b"  <!DOCTYPE html><html>").is_err());
        assert!(check_rule_body(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn write_only_when_changed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a/b/rules.txt");
        assert!(write_if_changed(&path, b"x\n").expect("write"));
        assert!(!write_if_changed(&path, b"x\n").expect("same"));
        assert!(write_if_changed(&path, b"y\n").expect("changed"));
        assert_eq!(std::fs::read(&path).expect("read"), b"y\n");
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))
            .expect("readdir")
            .collect();
        assert_eq!(leftovers.len(), 1, "no temp files left");
    }
}
