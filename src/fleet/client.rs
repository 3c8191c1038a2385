//! The HTTP edge of the fleet manager: one authenticated request to a node's API
//! ([`NodeClient`]; the real one is [`HttpNodeClient`]), the route every request to a
//! node takes (directly, else through `/fleet/proxy`: `direct_then_proxy`, with each
//! caller's fallback rule), and the TLS policy toward nodes (trust from a node's pin,
//! `--node-ca` and `/fleet/ca`: [`NodeTrust`]).
//!
//! Must not: follow redirects (they could carry the token elsewhere), use the
//! `*_PROXY` variables for a direct request, or echo a proxy URL (it may carry
//! credentials).

use super::FleetError;
use crate::tls::{Fingerprint, ServerTrust};
use futures::future::BoxFuture;
use rustls::pki_types::CertificateDer;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

/// Why one HTTP fetch failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PullError {
    #[error("{url}: {reason}")]
    Transport { url: String, reason: String },
    #[error("{url}: HTTP {status}{}", if error.is_empty() { String::new() } else { format!(": {error}") })]
    Status {
        url: String,
        status: u16,
        /// The `error` of the node API's JSON answer, when it has one.
        error: String,
    },
    #[error("proxy {reason}")]
    Proxy { reason: String },
}

/// The network edge: one authenticated request to a node's API. The real one is
/// [`HttpNodeClient`].
pub trait NodeClient: Send + Sync + 'static {
    /// `method url` with `Authorization: Bearer <token>` and, when given, a JSON `body`;
    /// directly when `proxy` is `None`. The answer's body when the status is 2xx.
    fn request(
        &self,
        method: reqwest::Method,
        url: String,
        token: Option<String>,
        body: Option<Vec<u8>>,
        proxy: Option<String>,
    ) -> BoxFuture<'static, Result<Vec<u8>, PullError>>;

    /// GET `url` (the pull round's requests).
    fn get(
        &self,
        url: String,
        token: Option<String>,
        proxy: Option<String>,
    ) -> BoxFuture<'static, Result<Vec<u8>, PullError>> {
        self.request(reqwest::Method::GET, url, token, None, proxy)
    }

    /// The trust in node certificates read from etcd this round; clients that do not
    /// speak TLS ignore it.
    fn set_trust(&self, _trust: NodeTrust) {}
}

/// Why a request failed by both routes, or by the one it was allowed.
pub(super) struct RouteFailure<E> {
    pub direct: E,
    /// The attempt through the proxy, when one was made.
    pub proxy: Option<E>,
}

/// The route choice of every request to a node: `attempt(None)` directly, then, when
/// that fails, a proxy is configured and `falls_back(&error)`, `attempt(Some(proxy))`.
/// On success, the proxy the answer came through (`None`: direct).
///
/// `falls_back` is the caller's on purpose; the two differ. The pull round only reads
/// (`GET`), so any failure — refused, timed out, an HTTP error, an answer that is not
/// the expected JSON — is worth one more try by the other route. A console action may
/// change the node (fail over, test an upstream): once the node has answered, even with
/// an error, the request reached it, and sending it again through the proxy could act
/// twice; only a transport error leaves the proxy to try.
pub(super) async fn direct_then_proxy<T, E, Fut>(
    proxy: Option<String>,
    falls_back: impl Fn(&E) -> bool,
    attempt: impl Fn(Option<String>) -> Fut,
) -> Result<(T, Option<String>), RouteFailure<E>>
where
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let direct = match attempt(None).await {
        Ok(v) => return Ok((v, None)),
        Err(e) => e,
    };
    let Some(p) = proxy.filter(|_| falls_back(&direct)) else {
        return Err(RouteFailure {
            direct,
            proxy: None,
        });
    };
    match attempt(Some(p.clone())).await {
        Ok(v) => Ok((v, Some(p))),
        Err(e) => Err(RouteFailure {
            direct,
            proxy: Some(e),
        }),
    }
}

/// Trust in node certificates learned from etcd (docs/fleet.md, "HTTPS"), handed to
/// the client each round: a node's pin wins; else the CAs (`--node-ca` and
/// `/fleet/ca`); else the webpki roots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeTrust {
    /// `/fleet/ca` (PEM).
    pub ca_pem: Option<String>,
    /// Origin of a node's api_url (`https://host:port`) → its pinned certificate
    /// (`/fleet/nodes/<id>/cert_sha256`).
    pub pins: BTreeMap<String, Fingerprint>,
}

/// `scheme://host:port` of `url`, the key of [`NodeTrust::pins`].
pub fn origin(url: &str) -> Option<String> {
    reqwest::Url::parse(url)
        .ok()
        .map(|u| u.origin().ascii_serialization())
}

/// reqwest-based [`NodeClient`]: one reqwest client per (proxy, trust). The direct
/// clients ignore `*_PROXY` environment variables so "direct" means direct.
pub struct HttpNodeClient {
    timeout: Duration,
    /// `--node-ca`: trusted together with `/fleet/ca`.
    node_ca: Vec<CertificateDer<'static>>,
    trust: Mutex<NodeTrust>,
    clients: Mutex<HashMap<(Option<String>, ServerTrust), reqwest::Client>>,
}

impl HttpNodeClient {
    pub fn new(timeout: Duration) -> Result<Self, FleetError> {
        Ok(Self {
            timeout,
            node_ca: Vec::new(),
            trust: Mutex::new(NodeTrust::default()),
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// Trust node certificates signed by the CA certificates in the PEM file `path`
    /// (`--node-ca`).
    pub fn with_node_ca_file(mut self, path: &std::path::Path) -> Result<Self, FleetError> {
        let invalid = |reason: String| FleetError::Invalid {
            field: "--node-ca",
            value: path.display().to_string(),
            reason,
        };
        let pem = crate::tls::read_pem("--node-ca", path).map_err(|e| invalid(e.to_string()))?;
        self.node_ca =
            crate::tls::ca_certs("--node-ca", &pem).map_err(|e| invalid(e.to_string()))?;
        Ok(self)
    }

    /// How the certificate of the node at `url` is checked.
    fn trust_for(&self, url: &str) -> Result<ServerTrust, PullError> {
        if !url.starts_with("https://") {
            return Ok(ServerTrust::Default);
        }
        let t = self.trust.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pin) = origin(url).and_then(|o| t.pins.get(&o).copied()) {
            return Ok(ServerTrust::Pin(pin));
        }
        let mut cas = self.node_ca.clone();
        if let Some(pem) = &t.ca_pem {
            let etcd_ca =
                crate::tls::ca_certs("/fleet/ca", pem).map_err(|e| PullError::Transport {
                    url: url.to_string(),
                    reason: e.to_string(),
                })?;
            cas.extend(etcd_ca);
        }
        Ok(if cas.is_empty() {
            ServerTrust::Default
        } else {
            ServerTrust::Ca(cas)
        })
    }

    fn client_for(&self, url: &str, proxy: Option<&str>) -> Result<reqwest::Client, PullError> {
        let key = (proxy.map(str::to_string), self.trust_for(url)?);
        let mut map = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(&key) {
            return Ok(c.clone());
        }
        let builder = crate::tls::client_builder(&key.1).map_err(|e| PullError::Transport {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
        let builder = match proxy {
            None => builder.no_proxy(),
            // Never echo the proxy URL: it may carry credentials.
            Some(p) => builder.proxy(reqwest::Proxy::all(p).map_err(|_| PullError::Proxy {
                reason: "URL in /fleet/proxy is not valid".into(),
            })?),
        };
        // A node API never redirects; following one could carry the token elsewhere.
        let c = builder
            .redirect(reqwest::redirect::Policy::none())
            .timeout(self.timeout)
            .connect_timeout(self.timeout)
            .build()
            .map_err(|e| PullError::Transport {
                url: url.to_string(),
                reason: e.to_string(),
            })?;
        map.insert(key, c.clone());
        Ok(c)
    }
}

impl NodeClient for HttpNodeClient {
    fn set_trust(&self, trust: NodeTrust) {
        let mut t = self.trust.lock().unwrap_or_else(|e| e.into_inner());
        if *t != trust {
            *t = trust;
            // Clients built for the old CA or pins are not used again.
            self.clients
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        }
    }

    fn request(
        &self,
        method: reqwest::Method,
        url: String,
        token: Option<String>,
        body: Option<Vec<u8>>,
        proxy: Option<String>,
    ) -> BoxFuture<'static, Result<Vec<u8>, PullError>> {
        let client = self.client_for(&url, proxy.as_deref());
        Box::pin(async move {
            let client = client?;
            let mut req = client.request(method, &url);
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            if let Some(b) = body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(b);
            }
            let resp = req.send().await.map_err(|e| PullError::Transport {
                url: url.clone(),
                reason: describe(&e),
            })?;
            if !resp.status().is_success() {
                let status = resp.status().as_u16();
                // The node API's JSON error names the field; keep its message only.
                let error = resp
                    .json::<serde_json::Value>()
                    .await
                    .ok()
                    .and_then(|v| v.get("error")?.as_str().map(str::to_string))
                    .map(|e| e.chars().take(300).collect())
                    .unwrap_or_default();
                return Err(PullError::Status { url, status, error });
            }
            let body = resp.bytes().await.map_err(|e| PullError::Transport {
                url: url.clone(),
                reason: describe(&e),
            })?;
            Ok(body.to_vec())
        })
    }
}

/// reqwest's Display hides the cause; walk the source chain. A certificate the trust
/// refuses is named as such ("certificate not trusted: ...").
fn describe(e: &reqwest::Error) -> String {
    if let Some(why) = crate::tls::untrusted_reason(e) {
        return why;
    }
    let mut parts = Vec::new();
    if e.is_timeout() {
        parts.push("timed out".to_string());
    } else if e.is_connect() {
        parts.push("connect failed".to_string());
    }
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = src {
        parts.push(s.to_string());
        src = s.source();
    }
    if parts.is_empty() {
        parts.push(e.to_string());
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct fails with `direct`; the proxy answers unless `proxy_fails`.
    async fn route(
        proxy: Option<&str>,
        falls_back: fn(&String) -> bool,
        direct: &str,
        proxy_fails: bool,
    ) -> Result<(String, Option<String>), (String, Option<String>)> {
        direct_then_proxy(proxy.map(str::to_string), falls_back, |via| async move {
            match via {
                None => Err(direct.to_string()),
                Some(_) if proxy_fails => Err("proxy: refused".to_string()),
                Some(p) => Ok(format!("answer via {p}")),
            }
        })
        .await
        .map_err(|f| (f.direct, f.proxy))
    }

    #[tokio::test]
    async fn the_route_choice_follows_each_callers_fallback_rule() {
        let any: fn(&String) -> bool = |_| true;
        let transport: fn(&String) -> bool = |e| e.starts_with("transport");
        let p = Some("http://proxy:3128");
        let via = |s: &str| Ok((format!("answer via {s}"), Some(s.to_string())));
        assert_eq!(
            route(p, any, "HTTP 500", false).await,
            via("http://proxy:3128")
        );
        assert_eq!(
            route(p, transport, "HTTP 500", false).await,
            Err(("HTTP 500".to_string(), None)),
            "an answering node is not asked again"
        );
        assert_eq!(
            route(p, transport, "transport: refused", false).await,
            via("http://proxy:3128")
        );
        assert_eq!(
            route(None, any, "transport: refused", false).await,
            Err(("transport: refused".to_string(), None))
        );
        assert_eq!(
            route(p, any, "HTTP 500", true).await,
            Err(("HTTP 500".to_string(), Some("proxy: refused".to_string())))
        );
    }
}
