//! The fleet console's actions: what an operator does from the web page.
//!
//! Owns: the `/fleet/api/` write and detail routes: add and remove nodes, DNS upstream
//! groups (global, and per-node overrides) listed, created, edited and deleted, a
//! node's configuration keys (secrets redacted) with its errors, warnings and
//! rollback, and the node actions (test an upstream, fail over, read the failover
//! log) relayed to the node's API with its token; and the validated commit (a dry run
//! with each node's diff, then a commit of exactly what it showed).
//! Must not: write through a second implementation — nodes go through
//! [`super::add_node`], upstream groups through [`crate::api::upstream_store`] (the
//! node API's rules), the commit through [`crate::commit::execute`] (the CLI's); send a
//! node's token anywhere but to that node; or return a secret value. Access control
//! (session, bearer, CSRF) is [`super::web`]'s.

use super::manager::{Manager, NodeCallError, PullError};
use super::web::WebState;
use super::FleetError;
use crate::api::upstream_store::{self, Apply, Scope};
use crate::api::upstreams;
use crate::api::{body_bytes, ApiError, ConfigStore};
use crate::commit::{self, CommitArgs};
use crate::etcd::status::{self, StatusKey};
use crate::etcd::EtcdConfig;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use tracing::info;

/// What the console acts through.
pub struct Console {
    manager: Arc<Manager>,
    /// The etcd of `meduza commit`; without it the commit routes answer 503.
    etcd: Option<EtcdConfig>,
}

impl Console {
    pub fn new(manager: Arc<Manager>, etcd: Option<EtcdConfig>) -> Self {
        Self { manager, etcd }
    }

    fn store(&self) -> Arc<dyn ConfigStore> {
        self.manager.store()
    }
}

/// The console's routes (mounted behind the web guard).
pub(super) fn routes() -> Router<WebState> {
    Router::new()
        .route("/fleet/api/nodes", post(add_node))
        .route("/fleet/api/nodes/{id}", delete(remove_node))
        .route("/fleet/api/nodes/{id}/config", get(node_config))
        .route(
            "/fleet/api/nodes/{id}/upstreams/{name}/test",
            post(test_upstream),
        )
        .route("/fleet/api/nodes/{id}/failover", post(failover))
        .route("/fleet/api/nodes/{id}/failover-log", get(failover_log))
        .route(
            "/fleet/api/upstreams",
            get(list_upstreams).post(create_upstream),
        )
        .route(
            "/fleet/api/upstreams/{name}",
            put(update_upstream).delete(delete_upstream),
        )
        .route("/fleet/api/commit", post(commit_route))
}

fn console(st: &WebState) -> Result<Arc<Console>, ApiError> {
    st.console.clone().ok_or(ApiError::Unavailable {
        what: "fleet console".into(),
        reason: "actions are not enabled on this manager".into(),
    })
}

fn check_id(id: &str) -> Result<(), ApiError> {
    meduza_generators::parse::validate_name(id).map_err(|reason| ApiError::Invalid {
        field: "id".into(),
        reason,
    })
}

fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body_bytes(body)?;
    serde_json::from_slice(&body).map_err(|e| ApiError::BadJson {
        reason: e.to_string(),
    })
}

impl From<FleetError> for ApiError {
    fn from(e: FleetError) -> Self {
        match e {
            FleetError::Store(s) => ApiError::Store(s),
            FleetError::Invalid { field, reason, .. } => ApiError::Invalid {
                field: field.trim_start_matches("--").replace('-', "_"),
                reason,
            },
            other => ApiError::Internal {
                what: "fleet".into(),
                reason: other.to_string(),
            },
        }
    }
}

impl From<NodeCallError> for ApiError {
    fn from(e: NodeCallError) -> Self {
        match e {
            NodeCallError::Unknown { id } => ApiError::NotFound {
                what: format!("node {id}"),
            },
            NodeCallError::Registry(f) => f.into(),
            // The node's own refusal (an unknown upstream, a bad target) keeps its
            // status and message; an unreachable node is a 502-class failure.
            NodeCallError::Node(PullError::Status { status, error, .. })
                if (400..500).contains(&status) && status != 401 =>
            {
                ApiError::Body {
                    status,
                    reason: error,
                }
            }
            NodeCallError::Node(p) => ApiError::Unavailable {
                what: "node".into(),
                reason: p.to_string(),
            },
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewNode {
    id: String,
    api_url: String,
    /// The node API's token, written to `/nodes/<id>/api/token` (never read back).
    #[serde(default)]
    token: Option<String>,
}

/// `POST /fleet/api/nodes {id, api_url, token?}`.
async fn add_node(
    State(st): State<WebState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let c = console(&st)?;
    let n: NewNode = json_body(body)?;
    let token = n.token.filter(|t| !t.is_empty());
    if let Some(t) = &token {
        meduza_generators::parse::parse_api_token(t).map_err(|reason| ApiError::Invalid {
            field: "token".into(),
            reason,
        })?;
    }
    let store = c.store();
    let mut has_token = super::add_node(&*store, &n.id, &n.api_url).await?;
    if let Some(t) = token {
        store.put(&format!("/nodes/{}/api/token", n.id), &t).await?;
        has_token = true;
    }
    info!(node = %n.id, "fleet console: node added");
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"id": n.id, "has_token": has_token})),
    )
        .into_response())
}

/// `DELETE /fleet/api/nodes/{id}`: the registration and the published status (the
/// node's configuration under `/nodes/<id>/` stays).
async fn remove_node(
    State(st): State<WebState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_id(&id)?;
    super::remove_node(&*console(&st)?.store(), &id).await?;
    info!(node = %id, "fleet console: node removed");
    Ok(Json(serde_json::json!({ "removed": id })))
}

/// `GET /fleet/api/nodes/{id}/config`: the node's keys (secret values redacted) and
/// what it reported: errors, warnings, rollback, applied revision.
async fn node_config(
    State(st): State<WebState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_id(&id)?;
    let store = console(&st)?.store();
    let keys: BTreeMap<String, String> = store
        .get_prefix(&format!("/nodes/{id}/"))
        .await?
        .into_iter()
        .map(|(k, v)| {
            let v = crate::api::redact_value(&k, v);
            (k, v)
        })
        .collect();
    let updated = store.get_prefix(&status::node_prefix(&id)).await?;
    let reported = |key: StatusKey| updated.get(&key.key(&id));
    // Warnings and the rollback entry are JSON documents; shown as they are.
    let json = |key: StatusKey| -> serde_json::Value {
        reported(key)
            .and_then(|v| serde_json::from_str(v).ok())
            .unwrap_or(serde_json::Value::Null)
    };
    let errors = reported(StatusKey::Errors)
        .and_then(|v| status::parse_errors(v).ok())
        .unwrap_or_default();
    Ok(Json(serde_json::json!({
        "id": id,
        "keys": keys,
        "errors": crate::api::redact_errors(errors),
        "warnings": json(StatusKey::Warnings),
        "rollback": json(StatusKey::Rollback),
        "applied": reported(StatusKey::Applied).and_then(|v| status::parse_applied(v)),
        "online": reported(StatusKey::Online).is_some(),
    })))
}

/// Relay one request to node `id`'s API and return its JSON.
async fn relay(
    st: &WebState,
    id: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<Response, ApiError> {
    check_id(id)?;
    let c = console(st)?;
    let answer = c.manager.call_node(id, method, path, body).await?;
    let v: serde_json::Value =
        serde_json::from_slice(&answer).map_err(|e| ApiError::Unavailable {
            what: format!("node {id}"),
            reason: format!("answer is not JSON: {e}"),
        })?;
    Ok(Json(v).into_response())
}

/// `POST /fleet/api/nodes/{id}/upstreams/{name}/test`: the node tests the group.
async fn test_upstream(
    State(st): State<WebState>,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    upstreams::check_name(&name)?;
    let path = format!("/v1/dns/upstreams/{name}/test");
    relay(&st, &id, reqwest::Method::POST, &path, None).await
}

/// `POST /fleet/api/nodes/{id}/failover {target?}`: the node fails over.
async fn failover(
    State(st): State<WebState>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body)?.to_vec();
    let r = relay(
        &st,
        &id,
        reqwest::Method::POST,
        "/v1/dns/failover",
        Some(body),
    )
    .await?;
    info!(node = %id, "fleet console: dns failover");
    Ok(r)
}

/// `GET /fleet/api/nodes/{id}/failover-log`.
async fn failover_log(
    State(st): State<WebState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    relay(&st, &id, reqwest::Method::GET, "/v1/dns/failover-log", None).await
}

/// `?node=ID`: a node's overrides; absent: the global groups.
#[derive(Deserialize)]
struct ScopeParam {
    node: Option<String>,
}

impl ScopeParam {
    fn scope(self) -> Result<Scope, ApiError> {
        match self.node.filter(|n| !n.is_empty()) {
            None => Ok(Scope::Global),
            Some(id) => {
                check_id(&id)?;
                Ok(Scope::Node(id))
            }
        }
    }
}

/// `GET /fleet/api/upstreams[?node=ID]`: the groups that scope sees, as the node API
/// lists them (source: node, global or default).
async fn list_upstreams(
    State(st): State<WebState>,
    Query(q): Query<ScopeParam>,
) -> Result<Json<Vec<upstream_store::UpstreamView>>, ApiError> {
    let store = console(&st)?.store();
    let groups = upstream_store::effective(&*store, &q.scope()?).await?;
    Ok(Json(upstream_store::by_priority(groups)))
}

/// Upstream writes are staged: the operator commits them through the validated commit.
async fn create_upstream(
    State(st): State<WebState>,
    Query(q): Query<ScopeParam>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let store = console(&st)?.store();
    let spec = upstreams::parse_body(&body_bytes(body)?, None)?;
    let rev = upstream_store::create(&*store, &q.scope()?, &spec, Apply::Stage).await?;
    info!(upstream = %spec.name, revision = rev, "fleet console: dns upstream created (staged)");
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"upstream": spec, "revision": rev, "committed": false})),
    )
        .into_response())
}

async fn update_upstream(
    State(st): State<WebState>,
    Path(name): Path<String>,
    Query(q): Query<ScopeParam>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let store = console(&st)?.store();
    upstreams::check_name(&name)?;
    let spec = upstreams::parse_body(&body_bytes(body)?, Some(&name))?;
    let rev = upstream_store::update(&*store, &q.scope()?, &name, &spec, Apply::Stage).await?;
    info!(upstream = %name, revision = rev, "fleet console: dns upstream updated (staged)");
    Ok(Json(
        serde_json::json!({"upstream": spec, "revision": rev, "committed": false}),
    ))
}

async fn delete_upstream(
    State(st): State<WebState>,
    Path(name): Path<String>,
    Query(q): Query<ScopeParam>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let store = console(&st)?.store();
    let rev = upstream_store::delete(&*store, &q.scope()?, &name, Apply::Stage).await?;
    info!(upstream = %name, revision = rev, "fleet console: dns upstream deleted (staged)");
    Ok(Json(
        serde_json::json!({"deleted": name, "revision": rev, "committed": false}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommitRequest {
    /// Validate and diff only.
    #[serde(default)]
    dry_run: bool,
    /// Commit only what the dry run at this revision showed.
    #[serde(default)]
    expect_revision: Option<i64>,
    /// Show only these nodes.
    #[serde(default)]
    nodes: Vec<String>,
}

/// `POST /fleet/api/commit {dry_run, expect_revision?, nodes?}`: `meduza commit`'s
/// report (outcome, per-node errors, warnings, file and service diffs).
async fn commit_route(
    State(st): State<WebState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let c = console(&st)?;
    let req: CommitRequest = json_body(body)?;
    let etcd = c.etcd.as_ref().ok_or(ApiError::Unavailable {
        what: "commit".into(),
        reason: "the manager was started without etcd connection settings".into(),
    })?;
    for n in &req.nodes {
        check_id(n)?;
    }
    let args = CommitArgs {
        dry_run: req.dry_run,
        nodes: req.nodes,
        output: crate::output::OutputArgs::default(),
        max_txn_ops: commit::DEFAULT_MAX_TXN_OPS,
        confirm: None,
        expect_revision: req.expect_revision,
    };
    let report = commit::execute(&args, etcd)
        .await
        .map_err(|e| ApiError::Unavailable {
            what: "etcd".into(),
            reason: e.to_string(),
        })?;
    info!(outcome = ?report.outcome, revision = report.revision, "fleet console: commit");
    let status = match report.outcome {
        commit::Outcome::Committed | commit::Outcome::DryRun => StatusCode::OK,
        commit::Outcome::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
        commit::Outcome::Conflict => StatusCode::CONFLICT,
    };
    Ok((status, Json(report)).into_response())
}
