//! DNS upstream CRUD against a real etcd: the keys written match DESIGN §3, `/commit`
//! is bumped in the same transaction, the generators' model parses what the API wrote,
//! and the API token follows `/nodes/<id>/api/token` live.

use meduza_test_support::{fake_node, fleet_etcd};

use fake_node::*;
use meduza::api::*;
use meduza_generators::{Config, Snapshot};
use reqwest::StatusCode;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

async fn dump(c: &mut etcd_client::Client, prefix: &str) -> BTreeMap<String, String> {
    c.get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .unwrap()
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_string(),
                kv.value_str().unwrap().to_string(),
            )
        })
        .collect()
}

async fn commit_rev(c: &mut etcd_client::Client) -> i64 {
    c.get("/commit", None)
        .await
        .unwrap()
        .kvs()
        .first()
        .map(|kv| kv.mod_revision())
        .unwrap_or(0)
}

async fn wait_status(http: &reqwest::Client, url: &str, token: &str, want: StatusCode) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = http
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status();
        if st == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{url} with token stayed {st}, wanted {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn upstream_crud_writes_design_keys_and_bumps_commit() {
    let etcd = fleet_etcd::Etcd::start().await;
    let mut c = etcd.client().await;
    c.put("/nodes/n1/api/token", "tok-1-aaaaaaaaaaaaaaaa", None)
        .await
        .unwrap();
    c.put("/global/dns/upstreams/g1/addresses", "198.51.100.1", None)
        .await
        .unwrap();
    c.put("/global/dns/upstreams/g1/priority", "5", None)
        .await
        .unwrap();
    c.put("/commit", "1", None).await.unwrap();

    let token = etcd.follow("/nodes/n1/api/token").await;
    let store = etcd.store();
    let state = ApiState::new("n1", token, FakeNode::new("n1"), store, fake_ifaces(1, 1));
    let api = RunningApi::start(
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        state,
    )
    .await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = |p: &str| format!("{}{p}", api.url());
    wait_status(
        &http,
        &url("/v1/status"),
        "tok-1-aaaaaaaaaaaaaaaa",
        StatusCode::OK,
    )
    .await;

    // Create.
    let before = commit_rev(&mut c).await;
    let r = http
        .post(url("/v1/dns/upstreams"))
        .bearer_auth("tok-1-aaaaaaaaaaaaaaaa")
        .json(&serde_json::json!({
            "name": "cf", "addresses": ["1.1.1.1", "1.0.0.1:5353"], "priority": 2,
            "health_check": {"interval": 10, "timeout": 2}, "failover": {"threshold": 4}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let body: serde_json::Value = r.json().await.unwrap();
    let after = commit_rev(&mut c).await;
    assert!(after > before);
    assert_eq!(body["commit_revision"].as_i64(), Some(after));
    let keys = dump(&mut c, "/nodes/n1/dns/upstreams/").await;
    let want: BTreeMap<String, String> = [
        ("addresses", "1.1.1.1\n1.0.0.1:5353"),
        ("priority", "2"),
        ("enable", "true"),
        ("health_check/enable", "true"),
        ("health_check/interval", "10"),
        ("health_check/timeout", "2"),
        ("failover/enable", "true"),
        ("failover/threshold", "4"),
    ]
    .into_iter()
    .map(|(k, v)| (format!("/nodes/n1/dns/upstreams/cf/{k}"), v.to_string()))
    .collect();
    assert_eq!(keys, want);
    // Same revision: the keys and /commit were one transaction.
    let kv_rev = c
        .get("/nodes/n1/dns/upstreams/cf/addresses", None)
        .await
        .unwrap()
        .kvs()[0]
        .mod_revision();
    assert_eq!(kv_rev, after);

    // The generators' model reads back exactly this group.
    let snap = Snapshot(dump(&mut c, "/").await);
    let cfg =
        Config::parse(&snap).unwrap_or_else(|e| panic!("model rejected what the API wrote: {e:?}"));
    let node = cfg.node("n1").expect("node n1 in the model");
    let groups = cfg.dns_upstreams_for(node);
    let cf = groups.iter().find(|g| g.name == "cf").unwrap();
    assert_eq!(
        cf.addresses,
        vec![
            "1.1.1.1:53".parse().unwrap(),
            "1.0.0.1:5353".parse().unwrap()
        ]
    );
    assert_eq!(
        (
            cf.priority,
            cf.health_check.interval_secs,
            cf.health_check.timeout_secs,
            cf.failover.threshold
        ),
        (2, 10, 2, 4)
    );

    // Duplicate create: 409, nothing written.
    let r = http
        .post(url("/v1/dns/upstreams"))
        .bearer_auth("tok-1-aaaaaaaaaaaaaaaa")
        .json(&serde_json::json!({"name": "cf", "addresses": ["9.9.9.9"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(commit_rev(&mut c).await, after);

    // Invalid update: 400 naming the field, nothing written.
    let r = http
        .put(url("/v1/dns/upstreams/cf"))
        .bearer_auth("tok-1-aaaaaaaaaaaaaaaa")
        .json(&serde_json::json!({"addresses": ["1.1.1.1"], "failover": {"threshold": 0}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["field"],
        "failover.threshold"
    );
    assert_eq!(commit_rev(&mut c).await, after);

    // Update: replaces the whole group (omitted fields back to defaults).
    let r = http
        .put(url("/v1/dns/upstreams/cf"))
        .bearer_auth("tok-1-aaaaaaaaaaaaaaaa")
        .json(&serde_json::json!({"addresses": ["8.8.8.8"], "enable": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let after_put = commit_rev(&mut c).await;
    assert!(after_put > after);
    let keys = dump(&mut c, "/nodes/n1/dns/upstreams/cf/").await;
    assert_eq!(keys["/nodes/n1/dns/upstreams/cf/addresses"], "8.8.8.8");
    assert_eq!(keys["/nodes/n1/dns/upstreams/cf/enable"], "false");
    assert_eq!(
        keys["/nodes/n1/dns/upstreams/cf/health_check/interval"],
        "30"
    );
    assert_eq!(keys["/nodes/n1/dns/upstreams/cf/priority"], "1");

    // A global group can be overridden on the node, but not deleted from here.
    let r = http
        .put(url("/v1/dns/upstreams/g1"))
        .bearer_auth("tok-1-aaaaaaaaaaaaaaaa")
        .json(&serde_json::json!({"addresses": ["198.51.100.2"], "priority": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let list: serde_json::Value = http
        .get(url("/v1/dns/upstreams"))
        .bearer_auth("tok-1-aaaaaaaaaaaaaaaa")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let g1 = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "g1")
        .unwrap();
    assert_eq!(g1["source"], "node");
    let r = http
        .delete(url("/v1/dns/upstreams/g1"))
        .bearer_auth("tok-1-aaaaaaaaaaaaaaaa")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = http
        .delete(url("/v1/dns/upstreams/g1"))
        .bearer_auth("tok-1-aaaaaaaaaaaaaaaa")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(
        dump(&mut c, "/global/dns/upstreams/g1/").await.len(),
        2,
        "global keys untouched"
    );

    // Delete.
    let before_del = commit_rev(&mut c).await;
    let r = http
        .delete(url("/v1/dns/upstreams/cf"))
        .bearer_auth("tok-1-aaaaaaaaaaaaaaaa")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(dump(&mut c, "/nodes/n1/dns/upstreams/").await.is_empty());
    assert!(commit_rev(&mut c).await > before_del);
    let r = http
        .get(url("/v1/dns/upstreams/cf"))
        .bearer_auth("tok-1-aaaaaaaaaaaaaaaa")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // The token follows etcd: rotate, then remove.
    c.put("/nodes/n1/api/token", "tok-2-bbbbbbbbbbbbbbbb", None)
        .await
        .unwrap();
    wait_status(
        &http,
        &url("/v1/status"),
        "tok-1-aaaaaaaaaaaaaaaa",
        StatusCode::UNAUTHORIZED,
    )
    .await;
    wait_status(
        &http,
        &url("/v1/status"),
        "tok-2-bbbbbbbbbbbbbbbb",
        StatusCode::OK,
    )
    .await;
    c.delete("/nodes/n1/api/token", None).await.unwrap();
    wait_status(
        &http,
        &url("/v1/status"),
        "tok-2-bbbbbbbbbbbbbbbb",
        StatusCode::UNAUTHORIZED,
    )
    .await;
    api.stop().await;
}
