//! The node HTTP API (DESIGN §9) on axum.
//!
//! Owns: routing, Bearer-token authentication (constant-time comparison against the
//! node's `/nodes/<id>/api/token`, followed live through a `watch` channel), bounded
//! request bodies, JSON errors, serving plain or HTTPS with the certificate followed
//! live ([`follow_tls`]; TLS itself is [`crate::tls`]), and the DNS upstream CRUD
//! that writes `/nodes/<id>/dns/upstreams/<name>/...` and bumps `/commit` in one
//! transaction.
//! Must not: hold or return secrets (tokens, keys, Clash secret), reach into the
//! daemon's internals (everything live comes through [`NodeView`]) or talk to etcd
//! except through [`ConfigStore`].

pub mod metrics;
pub mod stats;
pub mod store;
pub mod types;
pub mod upstream_store;
pub mod upstreams;

#[cfg(any(test, feature = "test-util"))]
pub use stats::FakeIfaces;
pub use stats::{IfaceCounter, IfaceCounters, ProcNetDev};
#[cfg(any(test, feature = "test-util"))]
pub use store::MemStore;
pub use store::{ConfigStore, KvStore, StoreError, WriteOp};
pub use types::*;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use subtle::ConstantTimeEq as _;
use tokio::sync::watch;
use tracing::{info, warn};
pub use upstream_store::{Apply, Scope, UpstreamSource, UpstreamView};
use upstreams::UpstreamSpec;

/// Default of `MEDUZA_API_LISTEN` (DESIGN §2).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:9100";
/// Largest request body accepted; larger ones get 413.
pub const BODY_LIMIT: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("unauthorized")]
    Unauthorized,
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{name}: {reason}")]
    Conflict { name: String, reason: String },
    /// Creating something that exists (409 naming the `name` field).
    #[error("{name}: {reason}")]
    Exists { name: String, reason: String },
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("request body is not valid JSON: {reason}")]
    BadJson { reason: String },
    #[error("request body larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("request body: {reason}")]
    Body { status: u16, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what} unavailable: {reason}")]
    Unavailable { what: String, reason: String },
    #[error("{what}: {reason}")]
    Internal { what: String, reason: String },
    #[error("MEDUZA_API_LISTEN {value}: {reason}")]
    Listen { value: String, reason: String },
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } | ApiError::Exists { .. } => StatusCode::CONFLICT,
            ApiError::Invalid { .. } | ApiError::BadJson { .. } => StatusCode::BAD_REQUEST,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Body { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST)
            }
            ApiError::Store(_) | ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal { .. } | ApiError::Listen { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let field = match &self {
            ApiError::Invalid { field, .. } => Some(field.as_str()),
            ApiError::Exists { .. } => Some("name"),
            _ => None,
        };
        let message = match &self {
            // The store error text names etcd keys and endpoints, never values.
            ApiError::Store(e) => format!("configuration store: {e}"),
            ApiError::Invalid { reason, .. } => reason.clone(),
            other => other.to_string(),
        };
        if status.is_server_error() {
            warn!(status = status.as_u16(), error = %message, "api request failed");
        }
        let mut resp = (
            status,
            Json(ErrorBody {
                error: message,
                field,
            }),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"meduza\""),
            );
        }
        resp
    }
}

/// Everything the handlers need.
#[derive(Clone)]
pub struct ApiState {
    node_id: Arc<str>,
    token: watch::Receiver<Option<String>>,
    view: Arc<dyn NodeView>,
    store: Arc<dyn ConfigStore>,
    ifaces: Arc<dyn IfaceCounters>,
}

impl ApiState {
    /// `token` follows `/nodes/<node_id>/api/token` (the daemon sends it after every
    /// reconcile pass); while it is `None` or empty every authenticated route answers 401.
    pub fn new(
        node_id: impl Into<String>,
        token: watch::Receiver<Option<String>>,
        view: Arc<dyn NodeView>,
        store: Arc<dyn ConfigStore>,
        ifaces: Arc<dyn IfaceCounters>,
    ) -> Self {
        Self {
            node_id: Arc::from(node_id.into()),
            token,
            view,
            store,
            ifaces,
        }
    }

    fn scope(&self) -> Scope {
        Scope::Node(self.node_id.to_string())
    }
}

/// Constant-time check of an `Authorization` header against the configured token.
/// Only the length of the configured token can leak through timing.
pub fn authorized(headers: &HeaderMap, configured: Option<&str>) -> bool {
    let Some(expected) = configured.filter(|t| !t.is_empty()) else {
        return false;
    };
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    bool::from(given.trim().as_bytes().ct_eq(expected.as_bytes()))
}

async fn require_token(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    let ok = {
        let tok = st.token.borrow();
        authorized(req.headers(), tok.as_deref())
    };
    if !ok {
        return ApiError::Unauthorized.into_response();
    }
    next.run(req).await
}

/// The API's routes; `GET /v1/health` is the only one without a token.
pub fn router(state: ApiState) -> Router {
    let authed = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/stats", get(stats_handler))
        .route("/metrics", get(metrics_handler))
        .route(
            "/v1/dns/upstreams",
            get(list_upstreams).post(create_upstream),
        )
        .route(
            "/v1/dns/upstreams/{name}",
            get(get_upstream)
                .put(update_upstream)
                .delete(delete_upstream),
        )
        .route("/v1/dns/upstreams/{name}/test", post(test_upstream))
        .route("/v1/dns/failover", post(failover))
        .route("/v1/dns/failover-log", get(failover_log))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/v1/health", get(health))
        .merge(authed)
        .fallback(|| async {
            ApiError::NotFound {
                what: "route".into(),
            }
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// Bind `addr` and serve until `shutdown` resolves, over HTTPS while `tls` holds a
/// configuration ([`follow_tls`]).
pub async fn serve(
    addr: SocketAddr,
    state: ApiState,
    tls: crate::tls::ServerTls,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ApiError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| ApiError::Listen {
            value: addr.to_string(),
            reason: e.to_string(),
        })?;
    serve_tls(listener, state, tls, shutdown).await
}

/// Serve plain HTTP on an already bound listener (tests bind port 0 first).
pub async fn serve_listener(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ApiError> {
    serve_tls(listener, state, crate::tls::fixed(None), shutdown).await
}

/// Serve on an already bound listener; each new connection is TLS or plain as `tls`
/// holds at that moment, so a new certificate needs no new listener.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    state: ApiState,
    tls: crate::tls::ServerTls,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ApiError> {
    let local = listener.local_addr().ok();
    info!(addr = ?local, node = %state.node_id, https = tls.borrow().is_some(), "node api listening");
    crate::tls::serve(listener, router(state), tls, shutdown)
        .await
        .map_err(|e| ApiError::Internal {
            what: "api server".into(),
            reason: e.to_string(),
        })
}

/// The node API's certificate: the `MEDUZA_API_TLS_CERT`/`_KEY` files when given
/// (`files`, loaded once at start; they win over etcd), else `/nodes/<id>/api/tls/...`
/// as each reconcile pass hands it in (`from_etcd`). Every change is sent to `out`
/// (read by [`serve_tls`] per connection) and published with `publish`: the
/// certificate's fingerprint and source, or `None` when serving plain HTTP. A pair
/// from etcd that rustls refuses (the key does not match the certificate) is logged by
/// key name and the previous configuration kept. Returns when `from_etcd` closes.
pub async fn follow_tls(
    node_id: &str,
    files: Option<crate::tls::ServerIdentity>,
    mut from_etcd: watch::Receiver<Option<meduza_generators::model::ApiTls>>,
    out: watch::Sender<Option<Arc<rustls::ServerConfig>>>,
    publish: impl Fn(Option<(&crate::tls::Fingerprint, &str)>),
) {
    let (cert_key, key_key) = (
        format!("/nodes/{node_id}/api/tls/cert"),
        format!("/nodes/{node_id}/api/tls/key"),
    );
    if let Some(id) = &files {
        out.send_replace(Some(id.config.clone()));
        publish(Some((&id.fingerprint, "file")));
        info!(fingerprint = %id.fingerprint, source = "file", "node api serves https");
    }
    loop {
        let wanted = from_etcd.borrow_and_update().clone();
        match (&files, wanted) {
            (Some(_), Some(_)) => {
                warn!(key = %cert_key, "ignored: MEDUZA_API_TLS_CERT/KEY files are in use")
            }
            (Some(_), None) => {}
            (None, None) => {
                if out.send_replace(None).is_some() {
                    info!("node api serves plain http");
                }
                publish(None);
            }
            (None, Some(t)) => {
                match crate::tls::server_identity(&cert_key, &t.cert_pem, &key_key, &t.key_pem) {
                    Ok(id) => {
                        out.send_replace(Some(id.config.clone()));
                        publish(Some((&id.fingerprint, "etcd")));
                        info!(fingerprint = %id.fingerprint, source = "etcd", "node api serves https");
                    }
                    Err(err) => {
                        warn!(%err, "node api certificate not usable; keeping the previous one")
                    }
                }
            }
        }
        if from_etcd.changed().await.is_err() {
            return;
        }
    }
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn status(State(st): State<ApiState>) -> Json<NodeStatus> {
    let mut s = st.view.status();
    s.errors = redact_errors(std::mem::take(&mut s.errors));
    Json(s)
}

async fn stats_handler(State(st): State<ApiState>) -> Result<Json<Vec<Stat>>, ApiError> {
    let ifaces = st.ifaces.read().map_err(|e| ApiError::Unavailable {
        what: "interface counters".into(),
        reason: e.to_string(),
    })?;
    Ok(Json(stats::build_stats(&ifaces, &st.view.stats_sources())))
}

async fn metrics_handler(State(st): State<ApiState>) -> Response {
    let body = metrics::render(&st.node_id, &st.view.metrics());
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response()
}

async fn effective_upstreams(st: &ApiState) -> Result<BTreeMap<String, UpstreamView>, ApiError> {
    let mut out = upstream_store::effective(&*st.store, &st.scope()).await?;
    for live in st.view.status().dns_upstreams {
        if let Some(v) = out.get_mut(&live.name) {
            v.live = Some(live);
        }
    }
    Ok(out)
}

async fn list_upstreams(State(st): State<ApiState>) -> Result<Json<Vec<UpstreamView>>, ApiError> {
    Ok(Json(upstream_store::by_priority(
        effective_upstreams(&st).await?,
    )))
}

async fn get_upstream(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<UpstreamView>, ApiError> {
    upstreams::check_name(&name)?;
    effective_upstreams(&st)
        .await?
        .remove(&name)
        .map(Json)
        .ok_or(ApiError::NotFound {
            what: format!("upstream {name}"),
        })
}

/// Map axum's body rejection (413 past [`BODY_LIMIT`]) to a JSON error.
pub fn body_bytes(
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Bytes, ApiError> {
    body.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge { limit: BODY_LIMIT }
        } else {
            ApiError::Body {
                status: rej.status().as_u16(),
                reason: rej.body_text(),
            }
        }
    })
}

#[derive(Serialize)]
struct WriteResult {
    upstream: UpstreamSpec,
    commit_revision: i64,
}

async fn create_upstream(
    State(st): State<ApiState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let spec = upstreams::parse_body(&body_bytes(body)?, None)?;
    let rev = upstream_store::create(&*st.store, &st.scope(), &spec, Apply::Commit).await?;
    info!(node = %st.node_id, upstream = %spec.name, revision = rev, "dns upstream created");
    Ok((
        StatusCode::CREATED,
        Json(WriteResult {
            upstream: spec,
            commit_revision: rev,
        }),
    )
        .into_response())
}

async fn update_upstream(
    State(st): State<ApiState>,
    Path(name): Path<String>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<WriteResult>, ApiError> {
    upstreams::check_name(&name)?;
    let spec = upstreams::parse_body(&body_bytes(body)?, Some(&name))?;
    let rev = upstream_store::update(&*st.store, &st.scope(), &name, &spec, Apply::Commit).await?;
    info!(node = %st.node_id, upstream = %name, revision = rev, "dns upstream updated");
    Ok(Json(WriteResult {
        upstream: spec,
        commit_revision: rev,
    }))
}

async fn delete_upstream(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let rev = upstream_store::delete(&*st.store, &st.scope(), &name, Apply::Commit).await?;
    info!(node = %st.node_id, upstream = %name, revision = rev, "dns upstream deleted");
    Ok(Json(
        serde_json::json!({"deleted": name, "commit_revision": rev}),
    ))
}

async fn test_upstream(
    State(st): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Json<UpstreamTest>, ApiError> {
    upstreams::check_name(&name)?;
    Ok(Json(st.view.dns_test(&name).await?))
}

async fn failover(
    State(st): State<ApiState>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<FailoverResult>, ApiError> {
    let body = body_bytes(body)?;
    let target = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| ApiError::BadJson {
                reason: e.to_string(),
            })?;
        let serde_json::Value::Object(obj) = v else {
            return Err(ApiError::BadJson {
                reason: "the body must be a JSON object".into(),
            });
        };
        if let Some(k) = obj.keys().find(|k| k.as_str() != "target") {
            return Err(ApiError::Invalid {
                field: k.clone(),
                reason: "unknown field".into(),
            });
        }
        match obj.get("target") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => {
                meduza_generators::parse::validate_name(s).map_err(|r| ApiError::Invalid {
                    field: "target".into(),
                    reason: r,
                })?;
                Some(s.clone())
            }
            Some(_) => {
                return Err(ApiError::Invalid {
                    field: "target".into(),
                    reason: "must be a string".into(),
                })
            }
        }
    };
    let r = st.view.dns_failover(target)?;
    info!(node = %st.node_id, from = ?r.from, to = %r.to, "manual dns failover");
    Ok(Json(r))
}

async fn failover_log(State(st): State<ApiState>) -> Json<Vec<FailoverLogEntry>> {
    Json(st.view.dns_failover_log())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn token_checks() {
        assert!(authorized(&hdr("Bearer abc"), Some("abc")));
        assert!(!authorized(&hdr("Bearer abd"), Some("abc")));
        assert!(!authorized(&hdr("Bearer abcd"), Some("abc")));
        assert!(!authorized(&hdr("Basic abc"), Some("abc")));
        assert!(!authorized(&hdr("Bearer "), Some("")));
        assert!(!authorized(&hdr("Bearer abc"), None));
        assert!(!authorized(&HeaderMap::new(), Some("abc")));
    }
}
