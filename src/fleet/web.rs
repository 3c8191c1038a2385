//! The fleet manager's web page and its JSON, behind the admin token.
//!
//! Owns: sign-in (`/?token=ADMIN` once, or the form at `/` posting to `/login`; either
//! gives an HttpOnly, SameSite=Strict session cookie holding a random session id, never
//! the token), `GET /fleet/api/nodes` (cookie or `Authorization: Bearer ADMIN`), and
//! the one self-contained HTML page. Must not: serve anything without a valid session
//! or token, or put node data into markup (the page builds DOM nodes with textContent).

use super::manager::FleetView;
use axum::extract::{Form, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use subtle::ConstantTimeEq as _;
use tokio::sync::watch;
use tracing::info;

const PAGE: &str = include_str!("page.html");
const COOKIE: &str = "meduza_fleet_session";
/// Sessions kept; the oldest is dropped past this (each sign-in makes one).
const MAX_SESSIONS: usize = 256;

#[derive(Clone)]
pub struct WebState {
    admin_token: Arc<str>,
    view: watch::Receiver<FleetView>,
    sessions: Arc<Mutex<VecDeque<String>>>,
    /// `Secure` on the session cookie (the page is served over HTTPS).
    secure: bool,
}

impl WebState {
    pub fn new(admin_token: impl Into<String>, view: watch::Receiver<FleetView>) -> Self {
        Self {
            admin_token: Arc::from(admin_token.into()),
            view,
            sessions: Arc::new(Mutex::new(VecDeque::new())),
            secure: false,
        }
    }

    /// Mark the session cookie `Secure` (set when the page is served over HTTPS).
    pub fn secure_cookies(mut self, on: bool) -> Self {
        self.secure = on;
        self
    }

    fn token_ok(&self, given: &str) -> bool {
        !self.admin_token.is_empty()
            && bool::from(given.as_bytes().ct_eq(self.admin_token.as_bytes()))
    }

    fn new_session(&self) -> String {
        let id =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() >= MAX_SESSIONS {
            s.pop_front();
        }
        s.push_back(id.clone());
        id
    }

    fn session_ok(&self, headers: &HeaderMap) -> bool {
        let Some(id) = cookie(headers, COOKIE) else {
            return false;
        };
        let s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        s.iter()
            .any(|k| bool::from(k.as_bytes().ct_eq(id.as_bytes())))
    }

    fn bearer_ok(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| self.token_ok(t.trim()))
    }

    fn allowed(&self, headers: &HeaderMap) -> bool {
        self.session_ok(headers) || self.bearer_ok(headers)
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
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Meduza fleet: sign in</title>\
<style>body{{font:14px system-ui,sans-serif;background:#f6f8fa;display:grid;place-items:center;height:100vh;margin:0}}\
form{{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:20px;display:grid;gap:10px}}\
.msg{{color:#cf222e}}</style></head><body><form id=\"login\" method=\"post\" action=\"/login\">\
<h1>Meduza fleet</h1><p class=\"msg\">{message}</p><label>Admin token <input type=\"password\" name=\"token\" autocomplete=\"current-password\" autofocus></label>\
<button type=\"submit\">Sign in</button></form></body></html>"
    );
    secure_headers((status, Html(body)).into_response())
}

fn signed_in(st: &WebState) -> Response {
    let id = st.new_session();
    info!("fleet web sign-in");
    let mut r = Redirect::to("/").into_response();
    let secure = if st.secure { "; Secure" } else { "" };
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict{secure}"
    )) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    secure_headers(r)
}

#[derive(serde::Deserialize)]
struct TokenParam {
    token: Option<String>,
}

async fn index(
    State(st): State<WebState>,
    Query(q): Query<TokenParam>,
    headers: HeaderMap,
) -> Response {
    if let Some(t) = q.token {
        return if st.token_ok(&t) {
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

async fn login(State(st): State<WebState>, Form(f): Form<TokenParam>) -> Response {
    match f.token {
        Some(t) if st.token_ok(&t) => signed_in(&st),
        _ => login_page("Wrong token.", StatusCode::UNAUTHORIZED),
    }
}

async fn nodes(State(st): State<WebState>, headers: HeaderMap) -> Response {
    if !st.allowed(&headers) {
        let mut r = (
            StatusCode::UNAUTHORIZED,
            Json(serde_json::json!({"error": "unauthorized"})),
        )
            .into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"meduza-fleet\""),
        );
        return secure_headers(r);
    }
    let v = st.view.borrow().clone();
    secure_headers(Json(v).into_response())
}

/// The web routes.
pub fn router(state: WebState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/login", post(login))
        .route("/fleet/api/nodes", get(nodes))
        .layer(axum::extract::DefaultBodyLimit::max(4096))
        .with_state(state)
}
