//! The mihomo API client and health verdict against the mihomo double on loopback.

use meduza_test_support::doubles;

use doubles::{FakeMihomo, MihomoOpts, SECRET};
use meduza::clash::api::{Health, MihomoApi, MihomoError, PROBE_TIMEOUT};
use meduza::clash::subscription::{
    hot_reload, ReloadMethod, Signaller, SubscriptionError, VerifyPolicy,
};
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test]
async fn auth_is_required() {
    let m = FakeMihomo::start(MihomoOpts::default()).await;
    for secret in ["", "wrong"] {
        let api = MihomoApi::new(&m.controller, secret, PROBE_TIMEOUT).expect("client");
        let err = api.hello().await.expect_err("must be refused");
        assert!(matches!(err, MihomoError::Unauthorized { .. }), "{err:?}");
        assert!(
            matches!(api.probe().await, Health::Unhealthy { ref reason } if reason.contains("unauthorized"))
        );
    }
    let api = MihomoApi::new(&m.controller, SECRET, PROBE_TIMEOUT).expect("client");
    api.hello().await.expect("hello");
    assert!(api.version().await.expect("version").starts_with('v'));
}

#[tokio::test]
async fn proxies_shape_and_verdicts() {
    let m = FakeMihomo::start(MihomoOpts {
        groups: vec!["auto", "hk auto"],
        ..Default::default()
    })
    .await;
    let api = MihomoApi::new(&m.controller, SECRET, PROBE_TIMEOUT).expect("client");
    let proxies = api.proxies().await.expect("proxies");
    let map = proxies["proxies"].as_object().expect("map");
    for builtin in [
        "DIRECT",
        "REJECT",
        "REJECT-DROP",
        "COMPATIBLE",
        "PASS",
        "GLOBAL",
    ] {
        assert!(map.contains_key(builtin), "{builtin} missing");
    }
    let auto = api.proxy("hk auto").await.expect("group by escaped name");
    assert_eq!(auto["type"], "URLTest");
    assert_eq!(auto["now"], "hk1");
    for field in ["all", "history", "alive", "name", "udp", "testUrl", "fixed"] {
        assert!(auto.get(field).is_some(), "URLTest entry lacks {field}");
    }
    assert_eq!(api.probe().await, Health::Healthy);

    m.control(json!({"groups": {"auto": "REJECT"}})).await;
    assert_eq!(
        api.probe().await,
        Health::Degraded {
            reason: "1 of 2 URLTest groups down: auto=REJECT (rejects)".into()
        }
    );
    m.control(json!({"reject_all": true})).await;
    assert_eq!(
        api.probe().await,
        Health::Unhealthy {
            reason: "every URLTest group is down: auto=REJECT (rejects), hk auto=REJECT (rejects)"
                .into()
        }
    );
    m.control(json!({"groups": {"auto": ""}, "reject_all": false}))
        .await;
    assert!(
        matches!(api.probe().await, Health::Degraded { ref reason } if reason.contains("auto=empty"))
    );
    m.control(json!({})).await;
    assert_eq!(api.probe().await, Health::Healthy);
}

#[tokio::test]
async fn single_rejected_group_is_named() {
    let m = FakeMihomo::start(MihomoOpts {
        control: json!({"groups": {"auto": "REJECT"}}),
        ..Default::default()
    })
    .await;
    let api = MihomoApi::new(&m.controller, SECRET, PROBE_TIMEOUT).expect("client");
    assert_eq!(
        api.probe().await,
        Health::Unhealthy {
            reason: "every URLTest group is down: auto=REJECT (rejects)".into()
        }
    );
}

#[tokio::test]
async fn stalled_api_fails_within_the_timeout() {
    let m = FakeMihomo::start(MihomoOpts::default()).await;
    let api = MihomoApi::new(&m.controller, SECRET, PROBE_TIMEOUT).expect("client");
    assert_eq!(api.probe().await, Health::Healthy);
    m.control(json!({"stall_api": true})).await;
    let t = Instant::now();
    let health = api.probe().await;
    let took = t.elapsed();
    assert!(
        matches!(health, Health::Unhealthy { ref reason } if reason.contains("no answer within 700 ms")),
        "{health:?}"
    );
    assert!(
        took >= PROBE_TIMEOUT && took < PROBE_TIMEOUT + Duration::from_millis(300),
        "took {took:?}"
    );
    m.control(json!({})).await;
    assert_eq!(api.probe().await, Health::Healthy);
}

#[tokio::test]
async fn dead_api_is_unreachable() {
    let mut m = FakeMihomo::start(MihomoOpts::default()).await;
    let api = MihomoApi::new(&m.controller, SECRET, PROBE_TIMEOUT).expect("client");
    m.child.as_mut().expect("child").kill().await.expect("kill");
    let err = api.proxies().await.expect_err("dead");
    assert!(matches!(err, MihomoError::Unreachable { .. }), "{err:?}");
}

/// Sends SIGHUP to the double, as the supervisor would.
struct Hup(u32);

impl Signaller for Hup {
    async fn sighup(&self) -> Result<(), String> {
        let pid = nix::unistd::Pid::from_raw(self.0 as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).map_err(|e| e.to_string())
    }
}

#[tokio::test]
async fn reload_is_verified_and_falls_back_to_sighup() {
    let m = FakeMihomo::start(MihomoOpts::default()).await;
    let api = MihomoApi::new(&m.controller, SECRET, PROBE_TIMEOUT).expect("client");
    let policy = VerifyPolicy {
        timeout: Duration::from_millis(600),
        poll: Duration::from_millis(50),
    };
    let hup = Hup(m.pid());

    // A new group through the API.
    let cfg = m.config_with_groups(&["auto", "second"]);
    std::fs::write(&m.config_path, &cfg).expect("write");
    assert_eq!(
        hot_reload(&api, &hup, &m.config_path, &cfg, policy)
            .await
            .expect("reload"),
        ReloadMethod::Api
    );
    assert_eq!(
        api.proxy("second").await.expect("second")["type"],
        "URLTest"
    );

    // mihomo answers 204 but applies nothing: verification catches it, SIGHUP applies.
    m.control(json!({"fail_apply": true})).await;
    let cfg = m.config_with_groups(&["auto", "third"]);
    std::fs::write(&m.config_path, &cfg).expect("write");
    assert_eq!(
        hot_reload(&api, &hup, &m.config_path, &cfg, policy)
            .await
            .expect("reload"),
        ReloadMethod::Sighup
    );
    assert!(api.proxy("third").await.is_ok());

    // A relative path is a 400: final, no SIGHUP.
    let err = hot_reload(
        &api,
        &hup,
        std::path::Path::new("config.yaml"),
        &cfg,
        policy,
    )
    .await
    .expect_err("400");
    assert!(
        matches!(
            err,
            SubscriptionError::Rejected {
                source: MihomoError::Status { status: 400, .. },
                ..
            }
        ),
        "{err:?}"
    );

    // A file mihomo cannot parse: 400 with mihomo's message.
    std::fs::write(&m.config_path, "proxies: [\n").expect("write");
    let err = api
        .reload_path(&m.config_path)
        .await
        .expect_err("parse error");
    assert!(
        matches!(err, MihomoError::Status { status: 400, .. }),
        "{err:?}"
    );
    // ...and SIGHUP with a broken file keeps the running config.
    hup.sighup().await.expect("hup");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        api.proxy("third").await.is_ok(),
        "running config kept after a failed SIGHUP reload"
    );
}

#[tokio::test]
async fn payload_reload_and_totals() {
    let m = FakeMihomo::start(MihomoOpts::default()).await;
    let api = MihomoApi::new(&m.controller, SECRET, PROBE_TIMEOUT).expect("client");
    let cfg = m.config_with_groups(&["payload-group"]);
    api.reload_payload(&cfg).await.expect("payload");
    assert!(api.proxy("payload-group").await.is_ok());
    let before = api.totals().await.expect("totals");

    let origin = doubles::Origin::start().await;
    origin.route("/x", "0123456789");
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(m.proxy_url()).expect("proxy"))
        .build()
        .expect("client");
    let body = client
        .get(origin.url("/x"))
        .send()
        .await
        .expect("get")
        .text()
        .await
        .expect("body");
    assert_eq!(body, "0123456789");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = api.totals().await.expect("totals");
    assert!(
        after.download >= before.download + 10,
        "{before:?} -> {after:?}"
    );
    assert!(after.upload > before.upload);
}

#[tokio::test]
async fn dns_listener_answers() {
    let m = FakeMihomo::start(MihomoOpts::default()).await;
    let server = format!("127.0.0.1:{}", m.dns_port).parse().expect("addr");
    assert_eq!(
        doubles::dns_a(server, "example.com").await,
        Some("198.18.0.1".parse().expect("ip"))
    );
}
