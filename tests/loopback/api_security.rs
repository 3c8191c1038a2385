//! Node API security and format: every authenticated route answers 401 without a
//! token, with a wrong one, with another node's, and when no token is configured;
//! the token follows its watch channel live; bodies over 64 KiB get 413; no response
//! carries a configured secret; `/metrics` is well-formed exposition format 0.0.4.

use meduza_test_support::fake_node;

use fake_node::*;
use meduza::api::*;
use reqwest::{Method, StatusCode};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

const TOKEN: &str = "node1-token-7f3a9c2e5b8d41f6a0c3e9b2d7f14a8c";
const OTHER_TOKEN: &str = "node2-token-0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e";
const CLASH_SECRET: &str = "clash-secret-9d8c7b6a5f4e3d2c1b0a";
const WG_KEY: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";

fn routes() -> Vec<(Method, &'static str, Option<&'static str>)> {
    let up = r#"{"name":"cf","addresses":["1.1.1.1"]}"#;
    vec![
        (Method::GET, "/v1/status", None),
        (Method::GET, "/v1/stats", None),
        (Method::GET, "/metrics", None),
        (Method::GET, "/v1/dns/upstreams", None),
        (Method::POST, "/v1/dns/upstreams", Some(up)),
        (Method::GET, "/v1/dns/upstreams/primary", None),
        (
            Method::PUT,
            "/v1/dns/upstreams/primary",
            Some(r#"{"addresses":["9.9.9.9"]}"#),
        ),
        (Method::POST, "/v1/dns/upstreams/primary/test", None),
        (
            Method::POST,
            "/v1/dns/failover",
            Some(r#"{"target":"tertiary"}"#),
        ),
        (Method::GET, "/v1/dns/failover-log", None),
        (Method::DELETE, "/v1/dns/upstreams/primary", None),
    ]
}

struct Setup {
    api: RunningApi,
    store: MemStore,
    token_tx: tokio::sync::watch::Sender<Option<String>>,
    http: reqwest::Client,
}

async fn setup(token: Option<&str>) -> Setup {
    let store = MemStore::new();
    for (k, v) in [
        ("/nodes/n1/api/token", TOKEN),
        ("/nodes/n2/api/token", OTHER_TOKEN),
        ("/global/clash/secret", CLASH_SECRET),
        ("/nodes/n1/wireguard/wg0/private_key", WG_KEY),
        ("/global/dns/upstreams/primary/addresses", "192.0.2.1"),
        ("/global/dns/upstreams/primary/priority", "1"),
        (
            "/nodes/n1/dns/upstreams/primary/addresses",
            "192.0.2.1\n192.0.2.9:5353",
        ),
    ] {
        store.put(k, v).await.unwrap();
    }
    let node = FakeNode::new("n1");
    // Validation errors about secret keys: their values must not leave the node.
    node.status.lock().unwrap().errors = vec![
        ConfigError {
            key: "/nodes/n1/wireguard/wg0/private_key".into(),
            value: WG_KEY.into(),
            reason: "WireGuard key must decode to 32 bytes".into(),
        },
        ConfigError {
            key: "/global/clash/secret".into(),
            value: CLASH_SECRET.into(),
            reason: "example".into(),
        },
        ConfigError {
            key: "/nodes/n1/api/token".into(),
            value: TOKEN.into(),
            reason: "example".into(),
        },
    ];
    let (token_tx, token_rx) = token_channel(token);
    let state = ApiState::new(
        "n1",
        token_rx,
        node,
        Arc::new(store.clone()),
        fake_ifaces(100, 50),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Setup {
        api: RunningApi::start(listener, state).await,
        store,
        token_tx,
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
    }
}

async fn call(
    s: &Setup,
    m: &Method,
    path: &str,
    body: Option<&str>,
    auth: Option<&str>,
) -> (StatusCode, HashMap<String, String>, String) {
    let mut req = s.http.request(m.clone(), format!("{}{path}", s.api.url()));
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    if let Some(b) = body {
        req = req
            .header("Content-Type", "application/json")
            .body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
        .collect();
    (status, headers, resp.text().await.unwrap())
}

fn assert_401(what: &str, status: StatusCode, headers: &HashMap<String, String>, body: &str) {
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
    assert_eq!(
        headers.get("www-authenticate").map(String::as_str),
        Some("Bearer realm=\"meduza\""),
        "{what}"
    );
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {body}"));
    assert_eq!(v["error"], "unauthorized", "{what}");
}

#[tokio::test]
async fn every_route_rejects_missing_wrong_and_foreign_tokens() {
    let s = setup(Some(TOKEN)).await;
    let before = s.store.dump();
    let bad: [(&str, Option<String>); 6] = [
        ("no header", None),
        ("wrong token", Some("Bearer not-the-token".into())),
        ("other node's token", Some(format!("Bearer {OTHER_TOKEN}"))),
        (
            "token prefix",
            Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1])),
        ),
        ("token as Basic", Some(format!("Basic {TOKEN}"))),
        ("empty bearer", Some("Bearer ".into())),
    ];
    for (m, path, body) in routes() {
        for (what, auth) in &bad {
            let (st, h, b) = call(&s, &m, path, body, auth.as_deref()).await;
            assert_401(&format!("{m} {path} with {what}"), st, &h, &b);
        }
    }
    assert_eq!(
        s.store.dump(),
        before,
        "a rejected request wrote to the store"
    );

    // Health needs no token.
    let (st, _, b) = call(&s, &Method::GET, "/v1/health", None, None).await;
    assert_eq!((st, b.as_str()), (StatusCode::OK, r#"{"status":"ok"}"#));

    // The right token passes on every route (the DELETE runs last).
    for (m, path, body) in routes() {
        let (st, _, b) = call(&s, &m, path, body, Some(&format!("Bearer {TOKEN}"))).await;
        assert!(st.is_success(), "{m} {path}: {st} {b}");
    }
}

#[tokio::test]
async fn no_configured_token_means_401_and_token_changes_apply_live() {
    let s = setup(None).await;
    for (m, path, body) in routes() {
        for auth in [
            None,
            Some(format!("Bearer {TOKEN}")),
            Some("Bearer ".to_string()),
        ] {
            let (st, h, b) = call(&s, &m, path, body, auth.as_deref()).await;
            assert_401(&format!("{m} {path} with no token configured"), st, &h, &b);
        }
    }
    // An empty key counts as not configured.
    s.token_tx.send_replace(Some(String::new()));
    let (st, h, b) = call(&s, &Method::GET, "/v1/status", None, Some("Bearer ")).await;
    assert_401("empty configured token", st, &h, &b);

    s.token_tx.send_replace(Some(TOKEN.into()));
    let (st, _, _) = status_with(&s, TOKEN).await;
    assert_eq!(st, StatusCode::OK);

    // Rotation: the old token stops working at once.
    s.token_tx.send_replace(Some(OTHER_TOKEN.into()));
    let (st, h, b) = status_with(&s, TOKEN).await;
    assert_401("rotated-out token", st, &h, &b);
    let (st, _, _) = status_with(&s, OTHER_TOKEN).await;
    assert_eq!(st, StatusCode::OK);
}

/// `GET /v1/status` with `Authorization: Bearer TOKEN`.
async fn status_with(s: &Setup, token: &str) -> (StatusCode, HashMap<String, String>, String) {
    call(
        s,
        &Method::GET,
        "/v1/status",
        None,
        Some(&format!("Bearer {token}")),
    )
    .await
}

#[tokio::test]
async fn oversize_bodies_get_413_json() {
    let s = setup(Some(TOKEN)).await;
    let auth = format!("Bearer {TOKEN}");
    let before = s.store.dump();
    // Valid JSON of 65 KiB: a name list padded with spaces.
    let big = format!(
        r#"{{"name":"cf","addresses":["1.1.1.1"]{}}}"#,
        " ".repeat(65 * 1024)
    );
    for (m, path) in [
        (Method::POST, "/v1/dns/upstreams"),
        (Method::PUT, "/v1/dns/upstreams/primary"),
        (Method::POST, "/v1/dns/failover"),
        (Method::POST, "/v1/dns/upstreams/primary/test"),
    ] {
        let (st, _, b) = call(&s, &m, path, Some(&big), Some(&auth)).await;
        if path.ends_with("/test") {
            // The test route takes no body, so it never reads one.
            assert_eq!(st, StatusCode::OK, "{b}");
            continue;
        }
        assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE, "{m} {path}: {b}");
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["error"], "request body larger than 65536 bytes");
    }
    assert_eq!(s.store.dump(), before);
    // Just under the limit is read and parsed (and written).
    let fits = format!(
        r#"{{"name":"cf","addresses":["1.1.1.1"]{}}}"#,
        " ".repeat(60 * 1024)
    );
    let (st, _, b) = call(
        &s,
        &Method::POST,
        "/v1/dns/upstreams",
        Some(&fits),
        Some(&auth),
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
}

#[tokio::test]
async fn no_secret_in_any_response() {
    let s = setup(Some(TOKEN)).await;
    let auth = format!("Bearer {TOKEN}");
    let secrets = [TOKEN, OTHER_TOKEN, CLASH_SECRET, WG_KEY, "yAnz5TF"];
    let mut checked = 0;
    let mut extra = routes();
    extra.push((Method::GET, "/v1/health", None));
    extra.push((Method::GET, "/v1/dns/upstreams/nope", None));
    extra.push((
        Method::POST,
        "/v1/dns/upstreams",
        Some(r#"{"name":"x","addresses":["not-an-ip"]}"#),
    ));
    extra.push((Method::POST, "/v1/dns/upstreams", Some("{not json")));
    extra.push((Method::GET, "/no/such/route", None));
    for (m, path, body) in extra {
        for a in [Some(auth.as_str()), None] {
            let (st, headers, b) = call(&s, &m, path, body, a).await;
            for sec in secrets {
                assert!(!b.contains(sec), "{m} {path} ({st}) leaked a secret: {b}");
                for (k, v) in &headers {
                    assert!(!v.contains(sec), "{m} {path} header {k} leaked a secret");
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 30);
    // The redacted errors are still reported, with their keys.
    let (_, _, b) = call(&s, &Method::GET, "/v1/status", None, Some(&auth)).await;
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["errors"][0]["key"], "/nodes/n1/wireguard/wg0/private_key");
    assert_eq!(v["errors"][0]["value"], "<redacted>");
}

/// (method, path, body, expected status, expected `field`)
type ErrorCase = (
    Method,
    &'static str,
    Option<&'static str>,
    StatusCode,
    Option<&'static str>,
);

#[tokio::test]
async fn errors_are_json_with_field_and_status() {
    let s = setup(Some(TOKEN)).await;
    let auth = format!("Bearer {TOKEN}");
    let cases: Vec<ErrorCase> = vec![
        (
            Method::POST,
            "/v1/dns/upstreams",
            Some(r#"{"name":"a","addresses":["1.1.1.1","x"]}"#),
            StatusCode::BAD_REQUEST,
            Some("addresses[1]"),
        ),
        (
            Method::POST,
            "/v1/dns/upstreams",
            Some(r#"{"name":"primary","addresses":["1.1.1.1"]}"#),
            StatusCode::CONFLICT,
            Some("name"),
        ),
        (
            Method::POST,
            "/v1/dns/upstreams",
            Some("{"),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            Method::PUT,
            "/v1/dns/upstreams/missing",
            Some(r#"{"addresses":["1.1.1.1"]}"#),
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            Method::PUT,
            "/v1/dns/upstreams/bad%20name",
            Some(r#"{"addresses":["1.1.1.1"]}"#),
            StatusCode::BAD_REQUEST,
            Some("name"),
        ),
        (
            Method::GET,
            "/v1/dns/upstreams/..%2Fapi",
            None,
            StatusCode::BAD_REQUEST,
            Some("name"),
        ),
        (
            Method::DELETE,
            "/v1/dns/upstreams/missing",
            None,
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            Method::POST,
            "/v1/dns/upstreams/missing/test",
            None,
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            Method::POST,
            "/v1/dns/failover",
            Some(r#"{"target":"primary"}"#),
            StatusCode::CONFLICT,
            None,
        ),
        (
            Method::POST,
            "/v1/dns/failover",
            Some(r#"{"target":7}"#),
            StatusCode::BAD_REQUEST,
            Some("target"),
        ),
        (
            Method::POST,
            "/v1/dns/failover",
            Some(r#"{"to":"x"}"#),
            StatusCode::BAD_REQUEST,
            Some("to"),
        ),
        (
            Method::GET,
            "/v2/nothing",
            None,
            StatusCode::NOT_FOUND,
            None,
        ),
    ];
    for (m, path, body, want, field) in cases {
        let (st, _, b) = call(&s, &m, path, body, Some(&auth)).await;
        assert_eq!(st, want, "{m} {path}: {b}");
        let v: serde_json::Value =
            serde_json::from_str(&b).unwrap_or_else(|e| panic!("{m} {path}: {e}: {b}"));
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{b}");
        assert_eq!(v["field"].as_str(), field, "{m} {path}: {b}");
    }
    // The store is unavailable: 503, not a hang or a 500.
    s.store.set_failing(true);
    let (st, _, b) = call(&s, &Method::GET, "/v1/dns/upstreams", None, Some(&auth)).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{b}");
}

#[tokio::test]
async fn stats_status_failover_and_test_routes() {
    let s = setup(Some(TOKEN)).await;
    let auth = format!("Bearer {TOKEN}");
    let (_, _, b) = call(&s, &Method::GET, "/v1/stats", None, Some(&auth)).await;
    let stats: Vec<Stat> = serde_json::from_str(&b).unwrap();
    let m: BTreeMap<&str, u64> = stats.iter().map(|s| (s.name.as_str(), s.value)).collect();
    assert_eq!(m["iface>>>eth0>>>traffic>>>downlink"], 100);
    assert_eq!(m["iface>>>eth0>>>traffic>>>uplink"], 50);
    assert_eq!(m["service>>>mihomo>>>traffic>>>uplink"], 1000);
    assert_eq!(m["service>>>mihomo>>>traffic>>>downlink"], 5000);
    assert_eq!(m["tproxy>>>tproxy_tcp>>>traffic>>>bytes"], 4096);
    assert!(!m.keys().any(|k| k.contains(">>>lo>>>")));

    let (st, _, b) = call(
        &s,
        &Method::POST,
        "/v1/dns/upstreams/tertiary/test",
        None,
        Some(&auth),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let t: UpstreamTest = serde_json::from_str(&b).unwrap();
    assert_eq!((t.ok, t.results.len()), (true, 2));

    // No body: the next healthy group; then a named target.
    let (st, _, b) = call(&s, &Method::POST, "/v1/dns/failover", None, Some(&auth)).await;
    assert_eq!(
        st,
        StatusCode::CONFLICT,
        "only secondary is healthy and it is active: {b}"
    );
    let (st, _, b) = call(
        &s,
        &Method::POST,
        "/v1/dns/failover",
        Some(r#"{"target":"tertiary"}"#),
        Some(&auth),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let r: FailoverResult = serde_json::from_str(&b).unwrap();
    assert_eq!(
        (r.from.as_deref(), r.to.as_str()),
        (Some("secondary"), "tertiary")
    );
    let (_, _, b) = call(&s, &Method::GET, "/v1/dns/failover-log", None, Some(&auth)).await;
    let log: Vec<FailoverLogEntry> = serde_json::from_str(&b).unwrap();
    assert_eq!(log.last().unwrap().action, "manual_failover");

    // Upstream list: the node's entry overrides the global one and carries live state.
    let (_, _, b) = call(&s, &Method::GET, "/v1/dns/upstreams", None, Some(&auth)).await;
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v[0]["name"], "primary");
    assert_eq!(v[0]["source"], "node");
    assert_eq!(
        v[0]["config"]["addresses"],
        serde_json::json!(["192.0.2.1", "192.0.2.9:5353"])
    );
    assert_eq!(v[0]["live"]["status"], "down");
}

/// A strict reader of the 0.0.4 text format: HELP then TYPE before a family's
/// samples, one block per family, counters named `_total`, valid names/labels/values,
/// cumulative histogram buckets ending in `+Inf` equal to `_count`.
fn check_exposition(text: &str) -> Result<usize, String> {
    let name_ok = |n: &str| {
        let mut c = n.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
    };
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashMap<String, ()> = HashMap::new();
    let mut current: Option<String> = None;
    let mut closed: Vec<String> = Vec::new();
    let mut samples = 0;
    // histogram series key (family + labels without le) -> (last bucket, saw +Inf)
    let mut buckets: HashMap<String, (f64, Option<f64>)> = HashMap::new();
    let mut counts: HashMap<String, f64> = HashMap::new();
    if !text.ends_with('\n') {
        return Err("exposition must end with a newline".into());
    }
    for (i, line) in text.lines().enumerate() {
        let ln = i + 1;
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, _) = rest
                .split_once(' ')
                .ok_or(format!("line {ln}: HELP without text"))?;
            if helps.insert(name.to_string(), ()).is_some() {
                return Err(format!("line {ln}: second HELP for {name}"));
            }
            if closed.contains(&name.to_string()) || types.contains_key(name) {
                return Err(format!(
                    "line {ln}: HELP for {name} after its TYPE or samples"
                ));
            }
            if let Some(c) = current.take() {
                closed.push(c);
            }
            current = Some(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, t) = rest.split_once(' ').ok_or(format!("line {ln}: bad TYPE"))?;
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) {
                return Err(format!("line {ln}: unknown type {t}"));
            }
            if current.as_deref() != Some(name) {
                return Err(format!("line {ln}: TYPE {name} not right after its HELP"));
            }
            if t == "counter" && !name.ends_with("_total") {
                return Err(format!("line {ln}: counter {name} should end in _total"));
            }
            types.insert(name.to_string(), t.to_string());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            return Err(format!("line {ln}: unexpected line {line:?}"));
        }
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or(format!("line {ln}: no value"))?;
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            other => other
                .parse()
                .map_err(|_| format!("line {ln}: bad value {other}"))?,
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (
                n,
                l.strip_suffix('}')
                    .ok_or(format!("line {ln}: unclosed labels"))?,
            ),
            None => (series, ""),
        };
        if !name_ok(name) {
            return Err(format!("line {ln}: bad metric name {name}"));
        }
        let mut label_map = Vec::new();
        let mut rest = labels;
        while !rest.is_empty() {
            let (k, after) = rest
                .split_once("=\"")
                .ok_or(format!("line {ln}: bad label in {labels}"))?;
            if !name_ok(k) || k.contains(':') {
                return Err(format!("line {ln}: bad label name {k}"));
            }
            let mut val = String::new();
            let mut chars = after.char_indices();
            let mut end = None;
            while let Some((idx, c)) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some((_, 'n')) => val.push('\n'),
                        Some((_, '\\')) => val.push('\\'),
                        Some((_, '"')) => val.push('"'),
                        _ => return Err(format!("line {ln}: bad escape")),
                    },
                    '"' => {
                        end = Some(idx);
                        break;
                    }
                    c => val.push(c),
                }
            }
            let end = end.ok_or(format!("line {ln}: unterminated label value"))?;
            label_map.push((k.to_string(), val));
            rest = &after[end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
        let family = current
            .clone()
            .ok_or(format!("line {ln}: sample before any HELP"))?;
        let t = types
            .get(&family)
            .ok_or(format!("line {ln}: sample of {family} before TYPE"))?;
        let belongs = if t == "histogram" {
            [
                format!("{family}_bucket"),
                format!("{family}_sum"),
                format!("{family}_count"),
            ]
            .contains(&name.to_string())
        } else {
            name == family
        };
        if !belongs {
            return Err(format!(
                "line {ln}: sample {name} outside its family block ({family})"
            ));
        }
        if t == "histogram" {
            let key: String = label_map
                .iter()
                .filter(|(k, _)| k != "le")
                .map(|(k, v)| format!("{k}={v},"))
                .collect::<String>()
                + &family;
            if name.ends_with("_bucket") {
                let le = label_map
                    .iter()
                    .find(|(k, _)| k == "le")
                    .ok_or(format!("line {ln}: bucket without le"))?;
                let e = buckets.entry(key).or_insert((0.0, None));
                if v < e.0 {
                    return Err(format!("line {ln}: buckets not cumulative"));
                }
                e.0 = v;
                if le.1 == "+Inf" {
                    e.1 = Some(v);
                }
            } else if name.ends_with("_count") {
                counts.insert(key, v);
            }
        }
        samples += 1;
    }
    for (k, (_, inf)) in &buckets {
        let inf = inf.ok_or(format!("{k}: no +Inf bucket"))?;
        if counts.get(k) != Some(&inf) {
            return Err(format!(
                "{k}: +Inf bucket {inf} != _count {:?}",
                counts.get(k)
            ));
        }
    }
    Ok(samples)
}

#[tokio::test]
async fn metrics_are_valid_exposition_format() {
    let s = setup(Some(TOKEN)).await;
    let (st, h, b) = call(
        &s,
        &Method::GET,
        "/metrics",
        None,
        Some(&format!("Bearer {TOKEN}")),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        h["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let n = check_exposition(&b).unwrap_or_else(|e| panic!("{e}\n{b}"));
    assert!(n > 40, "{n} samples");
    for needle in [
        "meduza_service_state{service=\"tinc\",state=\"fatal\"} 1",
        "meduza_service_restarts_last_hour{service=\"tinc\"} 5",
        "meduza_reconcile_passes_total 2",
        "meduza_reconcile_duration_seconds_bucket{le=\"+Inf\"} 2",
        "meduza_dns_queries_total 103",
        "meduza_dns_cache_hits_total 40",
        "meduza_dns_failovers_total 1",
        "meduza_dns_upstream_health{upstream=\"primary\",state=\"down\"} 1",
        "meduza_dns_upstream_latency_seconds_bucket{upstream=\"secondary\",le=\"0.05\"} 1",
        "meduza_tproxy_applied 1",
    ] {
        assert!(b.contains(needle), "missing {needle}\n{b}");
    }
    // The checker itself rejects broken input.
    assert!(check_exposition("x_total 1\n").is_err());
    assert!(
        check_exposition("# HELP a_total h\n# TYPE a_total counter\na_total{l=\"x} 1\n").is_err()
    );
    assert!(check_exposition("# HELP a h\n# TYPE a counter\na 1\n").is_err());
}
