//! The fleet console's sign-in, sessions and page.
//!
//! Owns: the admin credential ([`AdminAuth`]: a token, or a password hashed with
//! argon2 in a file or in `/fleet/admin/password_hash`), sign-in (`/?token=ADMIN` once,
//! or the form posting to `/login`), sessions (an HttpOnly, SameSite=Strict cookie
//! holding a random id, `Secure` under HTTPS; each session has its own CSRF token),
//! the access check in front of every `/fleet/api/` route (session or
//! `Authorization: Bearer ADMIN`; every write from a session must carry the session's
//! `X-CSRF-Token`), `GET /fleet/api/nodes`, and the one self-contained HTML page.
//! Must not: serve anything without a valid session or token, put node data into
//! markup (the page builds DOM nodes with textContent), or send a node's token to the
//! browser. The actions themselves are [`super::console`]'s.

use super::console::{self, Console};
use super::manager::FleetView;
use crate::api::ConfigStore;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::Argon2;
use axum::extract::{Form, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use subtle::ConstantTimeEq as _;
use tokio::sync::watch;
use tracing::{info, warn};

const PAGE: &str = include_str!("page.html");
const COOKIE: &str = "meduza_fleet_session";
/// The header a session's writes carry ([`WebState::csrf_ok`]).
pub const CSRF_HEADER: &str = "x-csrf-token";
/// The etcd key of the admin password's argon2 hash (PHC string).
pub const PASSWORD_HASH_KEY: &str = "/fleet/admin/password_hash";
/// Sessions kept; the oldest is dropped past this (each sign-in makes one).
const MAX_SESSIONS: usize = 256;

/// An argon2id PHC string for `password` (`meduza fleet hash-password`).
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

fn argon2_ok(hash: &str, given: &str) -> bool {
    match PasswordHash::new(hash.trim()) {
        Ok(h) => Argon2::default()
            .verify_password(given.as_bytes(), &h)
            .is_ok(),
        Err(e) => {
            warn!(error = %e, "the admin password hash is not a PHC string; password sign-in refused");
            false
        }
    }
}

/// Who may sign in: the admin token, and/or a password checked against an argon2
/// hash (from `--password-hash-file`, else `/fleet/admin/password_hash` in etcd,
/// read at each sign-in so a change needs no restart).
#[derive(Clone, Default)]
pub struct AdminAuth {
    pub token: Option<String>,
    pub password_hash: Option<String>,
    pub store: Option<Arc<dyn ConfigStore>>,
}

impl AdminAuth {
    pub fn token(token: impl Into<String>) -> Self {
        Self {
            token: Some(token.into()).filter(|t: &String| !t.trim().is_empty()),
            ..Self::default()
        }
    }

    fn token_ok(&self, given: &str) -> bool {
        self.token
            .as_deref()
            .is_some_and(|t| bool::from(given.as_bytes().ct_eq(t.as_bytes())))
    }

    /// The token, or the password against the hash.
    async fn sign_in_ok(&self, given: &str) -> bool {
        if given.is_empty() {
            return false;
        }
        if self.token_ok(given) {
            return true;
        }
        let hash = match (&self.password_hash, &self.store) {
            (Some(h), _) => Some(h.clone()),
            (None, Some(store)) => store
                .get(PASSWORD_HASH_KEY)
                .await
                .ok()
                .flatten()
                .map(|v| v.value),
            (None, None) => None,
        };
        let Some(hash) = hash else {
            return false;
        };
        let given = given.to_string();
        tokio::task::spawn_blocking(move || argon2_ok(&hash, &given))
            .await
            .unwrap_or(false)
    }
}

struct Session {
    id: String,
    csrf: String,
}

/// How a request is authenticated.
enum Access {
    /// A browser session, with its CSRF token.
    Session { csrf: String },
    /// `Authorization: Bearer ADMIN` (scripts; no ambient credential, so no CSRF).
    Bearer,
}

#[derive(Clone)]
pub struct WebState {
    auth: Arc<AdminAuth>,
    view: watch::Receiver<FleetView>,
    sessions: Arc<Mutex<VecDeque<Session>>>,
    /// `Secure` on the session cookie (the page is served over HTTPS).
    secure: bool,
    pub(super) console: Option<Arc<Console>>,
}

fn random_id() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

impl WebState {
    pub fn new(auth: AdminAuth, view: watch::Receiver<FleetView>) -> Self {
        Self {
            auth: Arc::new(auth),
            view,
            sessions: Arc::new(Mutex::new(VecDeque::new())),
            secure: false,
            console: None,
        }
    }

    /// Mark the session cookie `Secure` (set when the page is served over HTTPS).
    pub fn secure_cookies(mut self, on: bool) -> Self {
        self.secure = on;
        self
    }

    /// Enable the console's actions (without, the page only shows the fleet).
    pub fn with_console(mut self, console: Console) -> Self {
        self.console = Some(Arc::new(console));
        self
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, VecDeque<Session>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_session(&self) -> String {
        let id = random_id();
        let mut s = self.sessions();
        if s.len() >= MAX_SESSIONS {
            s.pop_front();
        }
        s.push_back(Session {
            id: id.clone(),
            csrf: random_id(),
        });
        id
    }

    fn session_csrf(&self, headers: &HeaderMap) -> Option<String> {
        let id = cookie(headers, COOKIE)?;
        self.sessions()
            .iter()
            .find(|s| bool::from(s.id.as_bytes().ct_eq(id.as_bytes())))
            .map(|s| s.csrf.clone())
    }

    fn end_session(&self, headers: &HeaderMap) {
        if let Some(id) = cookie(headers, COOKIE) {
            self.sessions()
                .retain(|s| !bool::from(s.id.as_bytes().ct_eq(id.as_bytes())));
        }
    }

    fn bearer_ok(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| self.auth.token_ok(t.trim()))
    }

    fn access(&self, headers: &HeaderMap) -> Option<Access> {
        if let Some(csrf) = self.session_csrf(headers) {
            return Some(Access::Session { csrf });
        }
        self.bearer_ok(headers).then_some(Access::Bearer)
    }

    fn allowed(&self, headers: &HeaderMap) -> bool {
        self.access(headers).is_some()
    }
}

fn csrf_ok(headers: &HeaderMap, csrf: &str) -> bool {
    headers
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|given| bool::from(given.as_bytes().ct_eq(csrf.as_bytes())))
}

fn json_error(status: StatusCode, message: &str) -> Response {
    let mut r = (status, Json(serde_json::json!({ "error": message }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"meduza-fleet\""),
        );
    }
    secure_headers(r)
}

/// In front of every `/fleet/api/` route: a session or the admin token; a session's
/// writes need its CSRF token.
async fn guard(State(st): State<WebState>, req: Request, next: Next) -> Response {
    match st.access(req.headers()) {
        None => json_error(StatusCode::UNAUTHORIZED, "unauthorized"),
        Some(Access::Session { csrf })
            if !matches!(*req.method(), Method::GET | Method::HEAD)
                && !csrf_ok(req.headers(), &csrf) =>
        {
            warn!(method = %req.method(), path = %req.uri().path(), "fleet console write without a valid CSRF token refused");
            json_error(StatusCode::FORBIDDEN, "missing or wrong CSRF token")
        }
        Some(_) => secure_headers(next.run(req).await),
    }
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn secure_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
        ),
    );
    r
}

fn login_page(message: &str, status: StatusCode) -> Response {
    let body = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>Meduza fleet: sign in</title>\
<style>body{{font:14px system-ui,sans-serif;background:#f6f8fa;display:grid;place-items:center;height:100vh;margin:0}}\
form{{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:20px;display:grid;gap:10px}}\
.msg{{color:#cf222e}}</style></head><body><form id=\"login\" method=\"post\" action=\"/login\">\
<h1>Meduza fleet</h1><p class=\"msg\" id=\"login-message\">{message}</p><label>Admin password or token \
<input type=\"password\" id=\"password\" name=\"password\" autocomplete=\"current-password\" autofocus></label>\
<button type=\"submit\" id=\"sign-in\">Sign in</button></form></body></html>"
    );
    secure_headers((status, Html(body)).into_response())
}

fn session_cookie(st: &WebState, value: &str, max_age: Option<u32>) -> Option<HeaderValue> {
    let secure = if st.secure { "; Secure" } else { "" };
    let age = max_age
        .map(|a| format!("; Max-Age={a}"))
        .unwrap_or_default();
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict{secure}{age}"
    ))
    .ok()
}

fn signed_in(st: &WebState) -> Response {
    let id = st.new_session();
    info!("fleet web sign-in");
    let mut r = Redirect::to("/").into_response();
    if let Some(v) = session_cookie(st, &id, None) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    secure_headers(r)
}

#[derive(serde::Deserialize)]
struct TokenParam {
    token: Option<String>,
}

#[derive(serde::Deserialize)]
struct LoginForm {
    /// The admin password, or the admin token (`token` is the older field name).
    #[serde(alias = "token")]
    password: Option<String>,
}

async fn index(
    State(st): State<WebState>,
    Query(q): Query<TokenParam>,
    headers: HeaderMap,
) -> Response {
    if let Some(t) = q.token {
        return if st.auth.token_ok(&t) {
            // Redirect so the token leaves the address bar and history.
            signed_in(&st)
        } else {
            login_page("Wrong token.", StatusCode::UNAUTHORIZED)
        };
    }
    if st.allowed(&headers) {
        return secure_headers(Html(PAGE).into_response());
    }
    login_page("", StatusCode::UNAUTHORIZED)
}

async fn login(State(st): State<WebState>, Form(f): Form<LoginForm>) -> Response {
    if st
        .auth
        .sign_in_ok(f.password.as_deref().unwrap_or(""))
        .await
    {
        return signed_in(&st);
    }
    warn!("fleet web sign-in refused: wrong password or token");
    login_page("Wrong password or token.", StatusCode::UNAUTHORIZED)
}

/// `POST /logout` (a write: the session's CSRF token is required).
async fn logout(State(st): State<WebState>, headers: HeaderMap) -> Response {
    st.end_session(&headers);
    let mut r = Json(serde_json::json!({"signed_out": true})).into_response();
    if let Some(v) = session_cookie(&st, "", Some(0)) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// `GET /fleet/api/session`: the session's CSRF token for the page's writes, and
/// whether the console's actions are on.
async fn session(State(st): State<WebState>, headers: HeaderMap) -> Response {
    let csrf = st.session_csrf(&headers);
    Json(serde_json::json!({"csrf": csrf, "console": st.console.is_some()})).into_response()
}

async fn nodes(State(st): State<WebState>) -> Response {
    let v = st.view.borrow().clone();
    Json(v).into_response()
}

/// The web routes; everything under `/fleet/api/` and `/logout` behind [`guard`].
pub fn router(state: WebState) -> Router {
    let api = Router::new()
        .route("/fleet/api/nodes", get(nodes))
        .route("/fleet/api/session", get(session))
        .route("/logout", post(logout))
        .merge(console::routes())
        .route_layer(middleware::from_fn_with_state(state.clone(), guard));
    Router::new()
        .route("/", get(index))
        .route("/login", post(login))
        .merge(api)
        .layer(axum::extract::DefaultBodyLimit::max(crate::api::BODY_LIMIT))
        .with_state(state)
}
