//! mihomo's REST API (external controller) client.
//!
//! Owns: HTTP calls to mihomo's controller with `Authorization: Bearer <secret>` and
//! short timeouts, and [`full_health`], which puts the process, the API and the pure
//! [`verdict`] (module `verdict`) together.
//! Must not: act on the verdict (the monitor decides when TPROXY goes), start or signal
//! mihomo, or write files.
//!
//! Upstream facts (child-interfaces.md §1): every route needs the Bearer secret when one
//! is set (401 `{"message":"Unauthorized"}` otherwise); `PUT /configs` answers 204 even
//! when applying the new configuration fails, so callers must verify a reload.

pub use crate::clash::verdict::{verdict, Health};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// Timeout of a health probe: a stalled API must be detected well inside 2 s.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(700);
/// Timeout of `PUT /configs`: applying a config may start listeners and providers.
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors talking to mihomo's controller. Each names the URL that failed.
#[derive(Debug, thiserror::Error)]
pub enum MihomoError {
    #[error("invalid external-controller address {addr:?}: {reason}")]
    BadController { addr: String, reason: String },
    #[error("mihomo API {url}: unauthorized (missing or wrong secret)")]
    Unauthorized { url: String },
    #[error("mihomo API {url}: no answer within {timeout_ms} ms")]
    Timeout { url: String, timeout_ms: u128 },
    #[error("mihomo API {url}: unreachable: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("mihomo API {url}: HTTP {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    #[error("mihomo API {url}: bad reply: {reason}")]
    BadReply { url: String, reason: String },
}

/// Full health: the supervisor's view of the process, then the API, then the verdict.
pub fn full_health(process_alive: bool, api: Result<&Value, &MihomoError>) -> Health {
    if !process_alive {
        return Health::Unhealthy {
            reason: "mihomo process is not running".to_string(),
        };
    }
    match api {
        Ok(proxies) => verdict(proxies),
        Err(err) => Health::Unhealthy {
            reason: err.to_string(),
        },
    }
}

/// The base URL to reach a controller configured as `external-controller`.
///
/// A wildcard listen address (`0.0.0.0`, `::`, empty host) is reached on loopback.
pub fn controller_url(addr: &str) -> Result<reqwest::Url, MihomoError> {
    let bad = |reason: &str| MihomoError::BadController {
        addr: addr.to_string(),
        reason: reason.to_string(),
    };
    let trimmed = addr.trim();
    let hostport = trimmed
        .strip_prefix("http://")
        .unwrap_or(trimmed)
        .trim_end_matches('/');
    if hostport.is_empty() {
        return Err(bad("empty"));
    }
    let Some((host, port)) = hostport.rsplit_once(':') else {
        return Err(bad("no port"));
    };
    let port: u16 = port.parse().map_err(|_| bad("port is not a number"))?;
    let host = match host {
        "" | "0.0.0.0" | "*" => "127.0.0.1",
        "[::]" | "::" => "[::1]",
        other => other,
    };
    reqwest::Url::parse(&format!("http://{host}:{port}/")).map_err(|e| bad(&e.to_string()))
}

/// Upload/download byte counters from `GET /connections`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub upload: u64,
    pub download: u64,
}

/// A client for one mihomo controller.
#[derive(Debug, Clone)]
pub struct MihomoApi {
    client: reqwest::Client,
    base: reqwest::Url,
    secret: String,
    timeout: Duration,
}

impl MihomoApi {
    /// `controller` is mihomo's `external-controller` value; `timeout` bounds every
    /// call except reloads ([`RELOAD_TIMEOUT`]).
    pub fn new(controller: &str, secret: &str, timeout: Duration) -> Result<Self, MihomoError> {
        let base = controller_url(controller)?;
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(timeout)
            .timeout(timeout)
            .build()
            .map_err(|e| MihomoError::BadController {
                addr: controller.to_string(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            client,
            base,
            secret: secret.to_string(),
            timeout,
        })
    }

    pub fn base_url(&self) -> &reqwest::Url {
        &self.base
    }

    fn url(&self, segments: &[&str]) -> reqwest::Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            // Percent-encodes each segment (group names may hold spaces or emoji).
            path.clear().extend(segments);
        }
        url
    }

    fn request(&self, method: reqwest::Method, url: reqwest::Url) -> reqwest::RequestBuilder {
        let req = self.client.request(method, url);
        if self.secret.is_empty() {
            req
        } else {
            req.bearer_auth(&self.secret)
        }
    }

    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        url: &reqwest::Url,
        timeout: Duration,
    ) -> Result<reqwest::Response, MihomoError> {
        let resp = req.timeout(timeout).send().await.map_err(|e| {
            if e.is_timeout() {
                MihomoError::Timeout {
                    url: url.to_string(),
                    timeout_ms: timeout.as_millis(),
                }
            } else {
                MihomoError::Unreachable {
                    url: url.to_string(),
                    source: e,
                }
            }
        })?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(MihomoError::Unauthorized {
                url: url.to_string(),
            });
        }
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            let message = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
                .unwrap_or(body);
            return Err(MihomoError::Status {
                url: url.to_string(),
                status: status.as_u16(),
                message,
            });
        }
        Ok(resp)
    }

    async fn get_json(&self, segments: &[&str]) -> Result<Value, MihomoError> {
        let url = self.url(segments);
        let resp = self
            .send(
                self.request(reqwest::Method::GET, url.clone()),
                &url,
                self.timeout,
            )
            .await?;
        resp.json::<Value>().await.map_err(|e| {
            if e.is_timeout() {
                MihomoError::Timeout {
                    url: url.to_string(),
                    timeout_ms: self.timeout.as_millis(),
                }
            } else {
                MihomoError::BadReply {
                    url: url.to_string(),
                    reason: e.to_string(),
                }
            }
        })
    }

    /// `GET /` → `{"hello":"mihomo"}`: the controller is up and the secret is right.
    pub async fn hello(&self) -> Result<(), MihomoError> {
        let v = self.get_json(&[]).await?;
        if v.get("hello").is_some() {
            Ok(())
        } else {
            Err(MihomoError::BadReply {
                url: self.base.to_string(),
                reason: format!("expected {{\"hello\":...}}, got {v}"),
            })
        }
    }

    /// `GET /version` → the `version` string.
    pub async fn version(&self) -> Result<String, MihomoError> {
        let v = self.get_json(&["version"]).await?;
        v.get("version")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| MihomoError::BadReply {
                url: self.url(&["version"]).to_string(),
                reason: "no \"version\" field".to_string(),
            })
    }

    /// `GET /proxies`, the whole reply.
    pub async fn proxies(&self) -> Result<Value, MihomoError> {
        self.get_json(&["proxies"]).await
    }

    /// `GET /proxies/{name}` (the name is percent-encoded).
    pub async fn proxy(&self, name: &str) -> Result<Value, MihomoError> {
        self.get_json(&["proxies", name]).await
    }

    /// `GET /proxies/{name}/delay?url=..&timeout=..`: mihomo tests `name` now, records
    /// the result (its `alive` flips on failure) and answers the delay in ms. A failed
    /// test is an error (mihomo answers 503 or 504).
    pub async fn proxy_delay(
        &self,
        name: &str,
        test_url: &str,
        timeout: Duration,
    ) -> Result<u64, MihomoError> {
        let v = self
            .delay(&["proxies", name, "delay"], test_url, timeout)
            .await?;
        v.get("delay")
            .and_then(Value::as_u64)
            .ok_or_else(|| MihomoError::BadReply {
                url: self.url(&["proxies", name, "delay"]).to_string(),
                reason: format!("no \"delay\" in {v}"),
            })
    }

    /// `GET /group/{name}/delay?url=..&timeout=..`: mihomo tests every member of the
    /// group (a url-test group then re-picks its fastest live member) and answers
    /// `{member: delay}` for the members that passed.
    pub async fn group_delay(
        &self,
        name: &str,
        test_url: &str,
        timeout: Duration,
    ) -> Result<Value, MihomoError> {
        self.delay(&["group", name, "delay"], test_url, timeout)
            .await
    }

    async fn delay(
        &self,
        segments: &[&str],
        test_url: &str,
        timeout: Duration,
    ) -> Result<Value, MihomoError> {
        let mut url = self.url(segments);
        url.query_pairs_mut()
            .append_pair("url", test_url)
            .append_pair("timeout", &timeout.as_millis().to_string());
        // mihomo bounds the test by `timeout`; the HTTP call gets a margin on top.
        let budget = timeout + self.timeout;
        let resp = self
            .send(
                self.request(reqwest::Method::GET, url.clone()),
                &url,
                budget,
            )
            .await?;
        resp.json::<Value>()
            .await
            .map_err(|e| MihomoError::BadReply {
                url: url.to_string(),
                reason: e.to_string(),
            })
    }

    /// `GET /providers/proxies`: every proxy provider with its `proxies` list.
    pub async fn providers(&self) -> Result<Value, MihomoError> {
        self.get_json(&["providers", "proxies"]).await
    }

    /// `PUT /providers/proxies/{name}`: mihomo fetches the provider again from its URL.
    pub async fn update_provider(&self, name: &str) -> Result<(), MihomoError> {
        let url = self.url(&["providers", "proxies", name]);
        let req = self.request(reqwest::Method::PUT, url.clone());
        self.send(req, &url, RELOAD_TIMEOUT).await.map(|_| ())
    }

    /// `GET /configs`: the running general configuration (ports, mode, ...).
    pub async fn configs(&self) -> Result<Value, MihomoError> {
        self.get_json(&["configs"]).await
    }

    /// `GET /connections` totals.
    pub async fn totals(&self) -> Result<Totals, MihomoError> {
        let v = self.get_json(&["connections"]).await?;
        let field = |k: &str| v.get(k).and_then(Value::as_u64);
        match (field("uploadTotal"), field("downloadTotal")) {
            (Some(upload), Some(download)) => Ok(Totals { upload, download }),
            _ => Err(MihomoError::BadReply {
                url: self.url(&["connections"]).to_string(),
                reason: "no uploadTotal/downloadTotal".to_string(),
            }),
        }
    }

    async fn put_configs(&self, body: Value) -> Result<(), MihomoError> {
        let mut url = self.url(&["configs"]);
        url.set_query(Some("force=true"));
        let req = self.request(reqwest::Method::PUT, url.clone()).json(&body);
        self.send(req, &url, RELOAD_TIMEOUT).await.map(|_| ())
    }

    /// `PUT /configs?force=true {"path": ...}`. `path` must be absolute (mihomo
    /// answers 400 otherwise) and, for mihomo's safe-path check, inside its home dir.
    /// Success only means mihomo parsed the file: verify the result.
    pub async fn reload_path(&self, path: &Path) -> Result<(), MihomoError> {
        self.put_configs(serde_json::json!({ "path": path.to_string_lossy() }))
            .await
    }

    /// `PUT /configs?force=true {"payload": ...}`. Same caveat as [`Self::reload_path`].
    pub async fn reload_payload(&self, yaml: &str) -> Result<(), MihomoError> {
        self.put_configs(serde_json::json!({ "payload": yaml }))
            .await
    }

    /// One health probe of the API: `GET /proxies` and the verdict on it.
    pub async fn probe(&self) -> Health {
        full_health(true, self.proxies().await.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn group(kind: &str, now: &str) -> Value {
        json!({"type": kind, "now": now, "all": ["a", "b"], "history": [], "alive": true})
    }

    #[test]
    fn full_health_order() {
        let ok = json!({"proxies": {"auto": group("URLTest", "x"), "x": {"type": "Socks5", "alive": true}}});
        assert!(matches!(
            full_health(false, Ok(&ok)),
            Health::Unhealthy { .. }
        ));
        assert_eq!(full_health(true, Ok(&ok)), Health::Healthy);
        let err = MihomoError::Timeout {
            url: "http://127.0.0.1:9090/proxies".into(),
            timeout_ms: 700,
        };
        assert_eq!(
            full_health(true, Err(&err)),
            Health::Unhealthy {
                reason: "mihomo API http://127.0.0.1:9090/proxies: no answer within 700 ms".into()
            }
        );
    }

    #[test]
    fn controller_addresses() {
        let cases = [
            ("0.0.0.0:9090", Some("http://127.0.0.1:9090/")),
            (":9090", Some("http://127.0.0.1:9090/")),
            ("127.0.0.1:19090", Some("http://127.0.0.1:19090/")),
            ("[::]:9090", Some("http://[::1]:9090/")),
            ("http://10.0.0.1:9090/", Some("http://10.0.0.1:9090/")),
            ("9090", None),
            ("", None),
            ("host:99999", None),
        ];
        for (addr, want) in cases {
            let got = controller_url(addr).ok().map(|u| u.to_string());
            assert_eq!(got.as_deref(), want, "addr {addr}");
        }
    }

    #[test]
    fn group_names_are_percent_encoded() {
        let api = MihomoApi::new("127.0.0.1:9090", "s", PROBE_TIMEOUT).expect("client");
        assert_eq!(
            api.url(&["proxies", "🇭🇰 auto/x"]).as_str(),
            "http://127.0.0.1:9090/proxies/%F0%9F%87%AD%F0%9F%87%B0%20auto%2Fx"
        );
    }
}
