//! The `Kv` trait, snapshots and the `status`/`snapshot` commands against a real etcd.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use meduza::etcd::{dump_snapshot, load_snapshot, read_status, EtcdError, EtcdKv, KeyRange, Kv};
use meduza_test_support::etcd::TestEtcd;

#[tokio::test]
async fn get_put_delete_and_ranges() {
    let etcd = TestEtcd::start();
    let kv = EtcdKv::connect(etcd.config()).await.unwrap();

    let r1 = kv.put("/global/mesh_type", "tinc").await.unwrap();
    let r2 = kv.put("/global/mesh_type", "easytier").await.unwrap();
    assert_eq!(r2, r1 + 1);
    let e = kv.get("/global/mesh_type").await.unwrap().unwrap();
    assert_eq!(
        (e.value.as_str(), e.version, e.mod_revision),
        ("easytier", 2, r2)
    );
    assert!(kv.get("/missing").await.unwrap().is_none());

    assert!(!kv
        .put_if_changed("/global/mesh_type", "easytier")
        .await
        .unwrap());
    assert!(kv
        .put_if_changed("/global/mesh_type", "tinc")
        .await
        .unwrap());
    assert!(kv.put_if_changed("/global/new", "x").await.unwrap());

    kv.put("/nodes/a/lan", "10.0.0.0/24\n10.0.1.0/24")
        .await
        .unwrap();
    kv.put("/commit", "1").await.unwrap();
    kv.put("/commitment", "not the commit key").await.unwrap();
    let (m, rev) = kv
        .get_ranges(&[
            KeyRange::Prefix("/global/".into()),
            KeyRange::Key("/commit".into()),
        ])
        .await
        .unwrap();
    assert_eq!(rev, etcd.revision());
    assert_eq!(
        m.keys().map(String::as_str).collect::<Vec<_>>(),
        ["/commit", "/global/mesh_type", "/global/new"]
    );
    assert_eq!(
        kv.get_prefix("/nodes/").await.unwrap().0["/nodes/a/lan"],
        "10.0.0.0/24\n10.0.1.0/24",
        "multi-line values survive"
    );

    assert_eq!(kv.delete("/global/new").await.unwrap(), 1);
    assert_eq!(kv.delete("/global/new").await.unwrap(), 0);
    assert_eq!(kv.delete_prefix("/global/").await.unwrap(), 1);
    assert!(kv.get_prefix("/global/").await.unwrap().0.is_empty());
}

#[tokio::test]
async fn lease_keys_vanish_with_the_lease() {
    let etcd = TestEtcd::start();
    let kv = EtcdKv::connect(etcd.config()).await.unwrap();
    let id = kv.lease_grant(2).await.unwrap();
    kv.put_with_lease("/updated/n/online", "1", id)
        .await
        .unwrap();
    assert_eq!(
        kv.get("/updated/n/online").await.unwrap().unwrap().lease,
        id
    );
    // Kept alive past its TTL.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(kv.lease_keep_alive(id).await.unwrap());
    }
    assert!(kv.get("/updated/n/online").await.unwrap().is_some());
    kv.lease_revoke(id).await.unwrap();
    assert!(kv.get("/updated/n/online").await.unwrap().is_none());
    assert!(
        !kv.lease_keep_alive(id).await.unwrap(),
        "revoked lease is gone"
    );
    assert!(matches!(
        kv.lease_revoke(id).await,
        Err(EtcdError::LeaseNotFound { .. })
    ));
}

#[tokio::test]
async fn compaction_makes_old_revisions_unreadable_for_watches() {
    let etcd = TestEtcd::start();
    let kv = EtcdKv::connect(etcd.config()).await.unwrap();
    let first = kv.put("/commit", "1").await.unwrap();
    let now = kv.put("/commit", "2").await.unwrap();
    kv.compact(now).await.unwrap();
    let mut w = kv
        .watch(&[(KeyRange::Key("/commit".into()), first)])
        .await
        .unwrap();
    let mut saw = None;
    for _ in 0..3 {
        let m = w.next().await.unwrap().unwrap();
        if m.compact_revision > 0 {
            saw = Some(m.compact_revision);
            break;
        }
    }
    assert_eq!(saw, Some(now), "a watch below the floor reports the floor");
}

#[tokio::test]
async fn calls_fail_fast_while_etcd_is_down_and_work_once_it_is_up() {
    let mut etcd = TestEtcd::start();
    etcd.kill();
    let kv = EtcdKv::new(etcd.config());
    let t = Instant::now();
    let err = kv.put("/commit", "1").await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(6),
        "bounded by the timeouts, took {:?}: {err}",
        t.elapsed()
    );
    etcd.start_again();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match kv.put("/commit", "2").await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "still failing: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(kv.get("/commit").await.unwrap().unwrap().value, "2");
}

#[tokio::test]
async fn snapshot_is_consistent_and_cli_commands_work() {
    let etcd = TestEtcd::start();
    let kv = EtcdKv::connect(etcd.config()).await.unwrap();
    for (k, v) in [
        ("/global/mesh_type", "tinc"),
        ("/nodes/a/lan", "10.0.0.0/24"),
        ("/nodes/b/tinc/address", "b.example"),
        ("/dns/hosts/nas", "10.0.0.5"),
        ("/fleet/proxy", "socks5://p:1080"),
        ("/updated/a/online", "1"),
        ("/updated/a/errors", "[]"),
    ] {
        kv.put(k, v).await.unwrap();
    }
    let commit_rev = kv.put("/commit", "42").await.unwrap();
    kv.put("/updated/a/applied", &format!("{commit_rev} 1700000000"))
        .await
        .unwrap();

    let (snap, rev) = load_snapshot(&kv, "a").await.unwrap();
    assert_eq!(rev, etcd.revision());
    let want: BTreeMap<String, String> = [
        ("/commit", "42"),
        ("/dns/hosts/nas", "10.0.0.5"),
        ("/global/mesh_type", "tinc"),
        ("/nodes/a/lan", "10.0.0.0/24"),
        ("/nodes/b/tinc/address", "b.example"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(snap, want);

    let dump = dump_snapshot(&kv).await.unwrap();
    assert_eq!(
        dump.get("/fleet/proxy").map(String::as_str),
        Some("socks5://p:1080")
    );
    assert!(!dump.keys().any(|k| k.starts_with("/updated/")));

    let st = read_status(&kv, "a").await.unwrap();
    assert!(st.online);
    assert_eq!(st.up_to_date(), Some(true));

    let bin = env!("CARGO_BIN_EXE_meduza");
    let out = Command::new(bin)
        .env("ETCD_ENDPOINTS", etcd.endpoint())
        .args(["status", "--node", "a"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("online") && table.contains("yes"), "{table}");
    assert!(table.contains("up to date"), "{table}");

    let out = Command::new(bin)
        .args(["--etcd-endpoints", &etcd.endpoint(), "snapshot"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: BTreeMap<String, String> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(parsed, dump);

    let out = Command::new(bin)
        .env("ETCD_ENDPOINTS", "ftp://nope:1")
        .arg("snapshot")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ETCD_ENDPOINTS"),
        "a bad setting is named"
    );
}
