//! The fleet manager against a real etcd and three node APIs served in-process:
//! n1 and n2 reachable directly, n3 only through `/fleet/proxy` (its listener admits
//! only the proxy's source address 127.0.0.3). Checks available/dirty/unavailable
//! transitions: a killed node, a node that cannot apply a commit, a proxy-only node,
//! recovery; the web JSON behind the admin token; and the `meduza fleet` CLI.
//! The pull period (300 ms) and the pull threshold (2 s) are shortened; the real 60 s
//! threshold is table-tested as a pure function in `fleet::status`.

#[path = "common/fake_node.rs"]
mod fake_node;
#[path = "common/fleet_etcd.rs"]
mod fleet_etcd;
#[path = "common/fleet_proxy.rs"]
mod fleet_proxy;

use fake_node::*;
use fleet_proxy::{FirewalledListener, Proxy};
use meduza::api::store::follow_key;
use meduza::api::*;
use meduza::fleet::manager::{FleetView, HttpNodeClient, Manager, ManagerConfig, NodeRow};
use meduza::fleet::status::{
    pull_status, push_status, NodeFacts, PullStatus, PushStatus, Route, PULL_THRESHOLD_MS,
};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

const ADMIN: &str = "admin-token-3c9f0e1d2b4a5968";
const INTERVAL: Duration = Duration::from_millis(300);
const THRESHOLD: Duration = Duration::from_secs(2);

fn token(id: &str) -> String {
    format!("{id}-api-token-0123456789abcdef")
}

fn row<'a>(v: &'a FleetView, id: &str) -> &'a NodeRow {
    v.nodes
        .iter()
        .find(|n| n.id == id)
        .unwrap_or_else(|| panic!("{id} not in view"))
}

/// Wait until `pred` holds for the view; returns how long it took.
async fn wait_view(
    rx: &mut watch::Receiver<FleetView>,
    what: &str,
    limit: Duration,
    pred: impl Fn(&FleetView) -> bool,
) -> Duration {
    let start = Instant::now();
    let ok = matches!(
        tokio::time::timeout(limit, rx.wait_for(|v| pred(v))).await,
        Ok(Ok(_))
    );
    match ok {
        true => start.elapsed(),
        false => {
            let v = rx.borrow().clone();
            let summary: Vec<String> = v
                .nodes
                .iter()
                .map(|n| {
                    format!(
                        "{} online={} push={:?} pull={:?} route={:?} err={:?}",
                        n.id, n.online, n.push, n.pull, n.route, n.last_error
                    )
                })
                .collect();
            panic!("timed out after {limit:?} waiting for {what}: {summary:#?}");
        }
    }
}

async fn node_state(c: &etcd_client::Client, id: &str) -> ApiState {
    let view = FakeNode::new(id);
    ApiState::new(
        id,
        follow_key(c.clone(), format!("/nodes/{id}/api/token")),
        view,
        Arc::new(EtcdStore::new(c.clone())),
        fake_ifaces(1_000_000, 250_000),
    )
}

async fn publish_node(c: &mut etcd_client::Client, id: &str, applied: i64, errors: &str) {
    c.put(format!("/updated/{id}/online"), "1", None)
        .await
        .unwrap();
    c.put(
        format!("/updated/{id}/applied"),
        format!("{applied} 1700000000"),
        None,
    )
    .await
    .unwrap();
    c.put(format!("/updated/{id}/errors"), errors, None)
        .await
        .unwrap();
}

async fn commit(c: &mut etcd_client::Client) -> i64 {
    c.put("/commit", "bump", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_available_dirty_unavailable_and_back() {
    let etcd = fleet_etcd::Etcd::start().await;
    let mut c = etcd.client().await;
    let proxy = Proxy::start().await;
    for id in ["n1", "n2", "n3"] {
        c.put(format!("/nodes/{id}/api/token"), token(id), None)
            .await
            .unwrap();
    }
    let rev = commit(&mut c).await;

    // n1, n2: plain listeners. n3: only the proxy's address gets in.
    let n1 = RunningApi::start(
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        node_state(&c, "n1").await,
    )
    .await;
    let l2 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let n2_addr = l2.local_addr().unwrap();
    let n2 = RunningApi::start(l2, node_state(&c, "n2").await).await;
    let dropped = Arc::new(AtomicUsize::new(0));
    let fw = FirewalledListener {
        inner: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        allowed: fleet_proxy::PROXY_SOURCE.parse().unwrap(),
        dropped: dropped.clone(),
    };
    let n3_addr = fw.inner.local_addr().unwrap();
    let n3_router = router(node_state(&c, "n3").await);
    let _n3 = tokio::spawn(async move {
        let _ = axum::serve(fw, n3_router).await;
    });

    // Registration through the CLI for n1, through the library for the others.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meduza"))
        .args([
            "fleet",
            "--etcd",
            &etcd.endpoint,
            "add-node",
            "--id",
            "n1",
            "--api-url",
            &format!("{}/", n1.url()),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store = Arc::new(EtcdStore::new(c.clone()));
    assert!(
        meduza::fleet::add_node(&*store, "n2", &format!("http://{n2_addr}"))
            .await
            .unwrap()
    );
    assert!(
        meduza::fleet::add_node(&*store, "n3", &format!("http://{n3_addr}"))
            .await
            .unwrap()
    );
    c.put("/fleet/proxy", proxy.url(), None).await.unwrap();
    for id in ["n1", "n2", "n3"] {
        publish_node(&mut c, id, rev, "[]").await;
    }

    let manager = Arc::new(Manager::new(
        store.clone(),
        Arc::new(HttpNodeClient::new(Duration::from_secs(1)).unwrap()),
        ManagerConfig {
            pull_interval: INTERVAL,
            pull_threshold: THRESHOLD,
            publish: true,
        },
    ));
    let mut rx = manager.subscribe();
    let web = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let web_addr = web.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serve = tokio::spawn(meduza::fleet::serve(
        web,
        manager.clone(),
        ADMIN.into(),
        async {
            let _ = stop_rx.await;
        },
    ));

    // 1. Steady state.
    wait_view(
        &mut rx,
        "n1,n2 available and n3 dirty via proxy",
        Duration::from_secs(10),
        |v| {
            v.nodes.len() == 3
                && ["n1", "n2"].iter().all(|id| {
                    row(v, id).push == PushStatus::Available
                        && row(v, id).pull == PullStatus::Available
                })
                && row(v, "n3").push == PushStatus::Dirty
                && row(v, "n3").pull == PullStatus::Available
        },
    )
    .await;
    let v = rx.borrow().clone();
    assert_eq!(row(&v, "n1").route, Some(Route::Direct));
    assert_eq!(row(&v, "n3").route, Some(Route::Proxy));
    assert!(
        proxy.count() >= 3,
        "stats, status and failover log of n3 went through the proxy"
    );
    assert!(
        dropped.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "a direct attempt to n3 was refused"
    );
    assert_eq!(row(&v, "n1").usage_bytes, 1_250_000);
    let st = row(&v, "n3")
        .status
        .as_ref()
        .expect("n3 status fetched through the proxy");
    assert_eq!(st.node_id, "n3");
    assert_eq!(row(&v, "n2").failover_log.len(), 1);
    let published: serde_json::Value = serde_json::from_str(
        c.get("/fleet/status/n3", None).await.unwrap().kvs()[0]
            .value_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (published["push"].as_str(), published["route"].as_str()),
        (Some("dirty"), Some("proxy"))
    );

    // The web JSON: admin token only; no node token in it.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let api = format!("http://{web_addr}/fleet/api/nodes");
    assert_eq!(http.get(&api).send().await.unwrap().status(), 401);
    assert_eq!(
        http.get(&api)
            .bearer_auth(token("n1"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let body = http
        .get(&api)
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(body.contains("\"id\":\"n2\""));
    for id in ["n1", "n2", "n3"] {
        assert!(!body.contains(&token(id)), "node token in fleet JSON");
    }
    assert!(!body.contains(ADMIN));

    // The CLI table while all three are up.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meduza"))
        .args(["fleet", "--etcd", &etcd.endpoint, "nodes"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("meduza fleet nodes:\n{table}");
    let line = |id: &str| -> Vec<String> {
        table
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("{id} missing in\n{table}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        &line("n1")[..5],
        [
            "n1",
            "yes",
            "available",
            "available",
            &format!("{rev}/{rev}")
        ]
    );
    assert_eq!(&line("n3")[..4], ["n3", "yes", "dirty", "available"]);
    assert_eq!(line("n3").last().map(String::as_str), Some("proxy"));

    // 2. Kill n2: server gone and its online key deleted (its lease would expire).
    // With the real settings (10 s period, 60 s threshold) the same facts give pull
    // unavailable 70 s after the last pull, and still available at 59 s.
    let last = row(&rx.borrow(), "n2").last_pull_ms.expect("n2 pulled");
    let facts = NodeFacts {
        online: false,
        applied_revision: Some(rev),
        commit_revision: Some(rev),
        error_count: 0,
        last_pull: Some((last, Route::Direct)),
        first_seen_ms: last - 1_000,
    };
    assert_eq!(
        pull_status(&facts, last + 59_000, PULL_THRESHOLD_MS),
        PullStatus::Available
    );
    assert_eq!(
        pull_status(&facts, last + 70_000, PULL_THRESHOLD_MS),
        PullStatus::Unavailable
    );
    assert_eq!(
        push_status(&facts, last + 70_000, PULL_THRESHOLD_MS),
        PushStatus::Unavailable
    );
    let killed = Instant::now();
    n2.stop().await;
    c.delete("/updated/n2/online", None).await.unwrap();
    let push_after = wait_view(
        &mut rx,
        "n2 push unavailable",
        Duration::from_secs(5),
        |v| row(v, "n2").push == PushStatus::Unavailable,
    )
    .await;
    wait_view(&mut rx, "n2 pull unavailable", THRESHOLD * 4, |v| {
        row(v, "n2").pull == PullStatus::Unavailable
    })
    .await;
    let both = killed.elapsed();
    println!("killed node: push unavailable after {push_after:?}, pull unavailable after {both:?} (threshold {THRESHOLD:?}, period {INTERVAL:?})");
    assert!(
        both >= THRESHOLD - INTERVAL,
        "pull went unavailable before the threshold: {both:?}"
    );
    assert!(
        both <= THRESHOLD + 5 * INTERVAL + Duration::from_secs(1),
        "{both:?}"
    );
    {
        let v = rx.borrow().clone();
        assert!(!row(&v, "n2").online);
        assert!(row(&v, "n2").last_error.is_some());
        assert_eq!(
            row(&v, "n1").push,
            PushStatus::Available,
            "others unaffected"
        );
    }

    // 3. n2 comes back on the same address.
    let n2 = RunningApi::start(
        tokio::net::TcpListener::bind(n2_addr).await.unwrap(),
        node_state(&c, "n2").await,
    )
    .await;
    c.put("/updated/n2/online", "1", None).await.unwrap();
    wait_view(
        &mut rx,
        "n2 available again",
        Duration::from_secs(10),
        |v| {
            row(v, "n2").push == PushStatus::Available && row(v, "n2").pull == PullStatus::Available
        },
    )
    .await;

    // 4. A commit n1 cannot apply: it keeps the old revision and publishes errors.
    let rev2 = commit(&mut c).await;
    publish_node(&mut c, "n2", rev2, "[]").await;
    publish_node(&mut c, "n3", rev2, "[]").await;
    c.put(
        "/updated/n1/errors",
        r#"[{"key":"/nodes/n1/lan","value":"10.0.0.1/24","reason":"host bits set"}]"#,
        None,
    )
    .await
    .unwrap();
    wait_view(
        &mut rx,
        "n1 dirty after a failed commit",
        Duration::from_secs(10),
        |v| {
            row(v, "n1").push == PushStatus::Dirty
                && row(v, "n2").push == PushStatus::Available
                && v.commit_revision == Some(rev2)
        },
    )
    .await;
    assert_eq!(rx.borrow().nodes[0].errors[0].key, "/nodes/n1/lan");
    // n1 fixed: applies rev2 without errors.
    publish_node(&mut c, "n1", rev2, "[]").await;
    wait_view(
        &mut rx,
        "n1 available after applying",
        Duration::from_secs(10),
        |v| row(v, "n1").push == PushStatus::Available,
    )
    .await;

    // 5. A node that has not applied the newest commit (no errors yet) is unavailable.
    let rev3 = commit(&mut c).await;
    for id in ["n1", "n3"] {
        publish_node(&mut c, id, rev3, "[]").await;
    }
    wait_view(
        &mut rx,
        "n2 behind the commit",
        Duration::from_secs(10),
        |v| {
            row(v, "n2").push == PushStatus::Unavailable
                && row(v, "n2").pull == PullStatus::Available
                && row(v, "n1").push == PushStatus::Available
        },
    )
    .await;

    let _ = stop_tx.send(());
    serve.await.unwrap().unwrap();
    drop(n2);
    drop(n1);
}
