//! HTTPS between the fleet manager and a node (issue 18, part 3), with the real
//! `meduza run` serving its API with the certificate and key it reads from etcd, and
//! the manager's real reqwest/rustls client; every socket on loopback. The PKI is the
//! test etcd's (a CA and a server certificate for 127.0.0.1, made with `openssl`),
//! plus one self-signed certificate no CA signed.
//!
//! (a) `/nodes/<id>/api/tls/{cert,key}` from etcd → the node publishes the
//!     certificate's SHA-256 in `/updated/<id>/api_tls`; a manager trusting the CA
//!     (`--node-ca`) pulls it over https: `available`; a manager with no CA but the
//!     node's `/fleet/nodes/<id>/cert_sha256` pin too;
//! (b) the node's certificate replaced in etcd by the self-signed one (taken without
//!     a restart: the new fingerprint is published and served) → the CA manager's pull
//!     fails with "certificate not trusted: ..." and pull goes `unavailable` when its
//!     minute runs out; the pinning manager's fails with the pin mismatch;
//! (c) the node registered at a plain `http://` URL while it serves HTTPS → refused
//!     with a clear error; a TCP listener at that address records what arrives and sees
//!     no connection, while a node without TLS registered at the same address does
//!     reach it with its own `Authorization` (the recorder works);
//! (d) the fleet page over HTTPS (`--tls-cert`/`--tls-key`): sign-in answers with a
//!     `Secure` session cookie; a plain-HTTP request to the same port gets no page;
//! (e) the node's TLS keys deleted → `api_tls` removed, its API plain HTTP again; no
//!     private key ever appeared in the node's log.
//!
//! Needs root (like every gateway test), etcd and openssl; a missing one fails.

use meduza::api::{ConfigStore, KvStore, WriteOp};
use meduza::etcd::EtcdKv;
use meduza::fleet::manager::{HttpNodeClient, Manager, ManagerConfig, NodeRow};
use meduza::fleet::status::{PullStatus, Route};
use meduza::tls::{Fingerprint, ServerTrust};
use meduza_test_support::etcd::{EtcdOptions, TestEtcd};
use meduza_test_support::ports::unique_free_port;
use meduza_test_support::process;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt as _;

const NODE: &str = "gw-tls";
const TOKEN: &str = "gw-tls-api-token-0123456789abcdef";
const PLAIN_NODE: &str = "gw-plain";
const PLAIN_TOKEN: &str = "gw-plain-api-token-fedcba9876543210";
const ADMIN: &str = "fleet-admin-token-9a8b7c6d5e4f";
const T0: u64 = 1_800_000_000_000;

struct Meduza {
    child: Child,
    log: PathBuf,
}

impl Drop for Meduza {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Meduza {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn start_meduza(etcd: &TestEtcd, dir: &Path, api_port: u16) -> Meduza {
    let pki = etcd.tls_files().expect("a TLS etcd");
    let log = dir.join("meduza.log");
    let mut cmd = process::meduza_run(NODE, &etcd.endpoint(), dir, true);
    cmd.env("ETCD_CA", &pki.ca)
        .env("ETCD_CERT", &pki.client_cert)
        .env("ETCD_KEY", &pki.client_key)
        .env("MEDUZA_API_LISTEN", format!("127.0.0.1:{api_port}"))
        .env("MEDUZA_LEASE_TTL", "5");
    let child = process::spawn_logged(&mut cmd, &log);
    Meduza { child, log }
}

/// A self-signed certificate for 127.0.0.1 that no CA signed.
fn self_signed(dir: &Path) -> (String, String) {
    let (cert, key) = (dir.join("wrong.pem"), dir.join("wrong.key"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=impostor", "-addext"])
        .arg("subjectAltName=IP:127.0.0.1")
        // A leaf, not a CA: rustls then answers UnknownIssuer, not CaUsedAsEndEntity.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl must be installed (Debian package openssl)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (read(&cert), read(&key))
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn fingerprint(cert_pem: &str) -> Fingerprint {
    let der = meduza_generators::parse::parse_pem_certs(cert_pem).expect("a certificate");
    Fingerprint::of(der[0].as_ref())
}

/// Puts `keys` and bumps `/commit` in one transaction.
async fn commit(store: &KvStore, keys: &[(&str, &str)]) {
    let ops = keys
        .iter()
        .map(|(k, v)| WriteOp::Put {
            key: k.to_string(),
            value: v.to_string(),
        })
        .collect();
    store.write_and_commit(ops).await.expect("commit");
}

/// Waits until `/updated/<NODE>/api_tls` names `want`.
async fn wait_published(store: &KvStore, want: Fingerprint, node: &Meduza) {
    let key = format!("/updated/{NODE}/api_tls");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = store.get(&key).await.expect("etcd get").map(|v| v.value);
        if v.as_deref()
            .and_then(meduza::etcd::status::api_tls_fingerprint)
            == Some(want)
        {
            let v = v.unwrap_or_default();
            assert!(v.ends_with(" etcd"), "{key} = {v}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{key} = {v:?}, never {want}; meduza log:\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn manager(store: &Arc<KvStore>, ca: Option<&Path>) -> Manager {
    let client = HttpNodeClient::new(Duration::from_secs(3)).unwrap();
    let client = match ca {
        Some(p) => client.with_node_ca_file(p).expect("the CA file loads"),
        None => client,
    };
    Manager::new(store.clone(), Arc::new(client), ManagerConfig::default())
}

async fn row(m: &Manager, id: &str, now: u64) -> NodeRow {
    let v = m.round(now).await.expect("a round");
    v.nodes
        .into_iter()
        .find(|r| r.id == id)
        .unwrap_or_else(|| panic!("no row for {id}"))
}

/// Pulls `m` at `T0`, then re-evaluates a minute and a second later: the row then.
async fn row_after_a_minute(m: &Manager, id: &str) -> (NodeRow, NodeRow) {
    let first = row(m, id, T0).await;
    m.reevaluate(T0 + 61_000).await.expect("re-evaluation");
    let later = m.subscribe().borrow().clone();
    let later = later.nodes.into_iter().find(|r| r.id == id).unwrap();
    (first, later)
}

/// A TCP listener that records every byte it receives, answering nothing.
struct Recorder {
    port: u16,
    seen: Arc<Mutex<Vec<u8>>>,
    connections: Arc<Mutex<usize>>,
}

impl Recorder {
    async fn start() -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (seen, connections) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(0)));
        let (s, c) = (seen.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = l.accept().await {
                *c.lock().unwrap() += 1;
                let s = s.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = sock.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        s.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
        Recorder {
            port,
            seen,
            connections,
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_to_nodes_pins_cas_and_refuses_plain_http() {
    let etcd = TestEtcd::start_with(EtcdOptions {
        tls: true,
        ..EtcdOptions::default()
    });
    let pki = etcd.tls_files().expect("the test PKI").clone();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(KvStore::new(Arc::new(EtcdKv::new(etcd.config()))));
    let (cert, key) = (read(&pki.server_cert), read(&pki.server_key));
    let (wrong_cert, wrong_key) = self_signed(dir.path());
    let (good_fp, wrong_fp) = (fingerprint(&cert), fingerprint(&wrong_cert));

    // (a) The node's certificate and key come from etcd.
    let api_port = unique_free_port();
    let https_url = format!("https://127.0.0.1:{api_port}");
    commit(
        &store,
        &[
            (&format!("/nodes/{NODE}/api/token"), TOKEN),
            (&format!("/nodes/{NODE}/api/tls/cert"), &cert),
            (&format!("/nodes/{NODE}/api/tls/key"), &key),
            (&format!("/fleet/nodes/{NODE}/api_url"), &https_url),
        ],
    )
    .await;
    let node = start_meduza(&etcd, dir.path(), api_port);
    wait_published(&store, good_fp, &node).await;
    assert!(!node.log().contains("PRIVATE KEY"), "{}", node.log());

    let with_ca = manager(&store, Some(&pki.ca));
    let r = row(&with_ca, NODE, T0).await;
    assert_eq!(
        (r.pull, r.route, r.last_error.as_deref()),
        (PullStatus::Available, Some(Route::Direct), None),
        "(a) CA: {r:?}\nmeduza log:\n{}",
        node.log()
    );
    assert_eq!(r.status.as_ref().map(|s| s.node_id.as_str()), Some(NODE));
    println!("(a) CA-verified pull over {https_url}: available");

    store
        .put(
            &format!("/fleet/nodes/{NODE}/cert_sha256"),
            &good_fp.to_string(),
        )
        .await
        .unwrap();
    let pinning = manager(&store, None);
    let r = row(&pinning, NODE, T0).await;
    assert_eq!(
        (r.pull, r.last_error.as_deref()),
        (PullStatus::Available, None),
        "(a) pin: {r:?}"
    );
    println!("(a) pinned pull (sha256 {good_fp}): available");

    // (b) A certificate no CA signed, swapped in without restarting the node.
    commit(
        &store,
        &[
            (&format!("/nodes/{NODE}/api/tls/cert"), &wrong_cert),
            (&format!("/nodes/{NODE}/api/tls/key"), &wrong_key),
        ],
    )
    .await;
    // The node swaps the configuration new connections read before it publishes the
    // fingerprint, and each manager here opens new connections.
    wait_published(&store, wrong_fp, &node).await;
    let (first, later) = row_after_a_minute(&manager(&store, None), NODE).await;
    let err = first.last_error.clone().unwrap_or_default();
    assert!(
        err.contains(&format!(
            "certificate not trusted: SHA-256 {wrong_fp} does not match the pinned {good_fp}"
        )),
        "(b) pin: {first:?}"
    );
    assert_eq!(later.pull, PullStatus::Unavailable, "{later:?}");
    println!("(b) pinning manager: {err}");
    store
        .delete_prefix(&format!("/fleet/nodes/{NODE}/cert_sha256"))
        .await
        .unwrap();

    let (first, later) = row_after_a_minute(&manager(&store, Some(&pki.ca)), NODE).await;
    let err = first.last_error.clone().unwrap_or_default();
    assert!(
        err.contains("certificate not trusted: ") && err.contains("UnknownIssuer"),
        "(b) CA: {first:?}"
    );
    assert_eq!(first.pull, PullStatus::Pending, "{first:?}");
    assert_eq!(later.pull, PullStatus::Unavailable, "{later:?}");
    println!("(b) self-signed certificate, CA manager: {err}; pull unavailable after the minute");

    // (c) A plain http:// registration of a node that serves HTTPS is refused; the
    // recorder at that address proves nothing went out. A node without TLS at the
    // same address is pulled (and its own token arrives): the recorder records.
    let rec = Recorder::start().await;
    let plain_url = format!("http://127.0.0.1:{}", rec.port);
    store
        .put(&format!("/fleet/nodes/{NODE}/api_url"), &plain_url)
        .await
        .unwrap();
    let (first, later) = row_after_a_minute(&manager(&store, Some(&pki.ca)), NODE).await;
    let err = first.last_error.clone().unwrap_or_default();
    assert!(
        err.starts_with(&format!(
            "refused: {plain_url} is plain http:// but the node serves its API over HTTPS (/updated/{NODE}/api_tls is set)"
        )),
        "(c) {first:?}"
    );
    assert_eq!(later.pull, PullStatus::Unavailable, "{later:?}");
    assert_eq!(*rec.connections.lock().unwrap(), 0, "{}", rec.text());
    println!("(c) {err}");

    store
        .put(&format!("/fleet/nodes/{PLAIN_NODE}/api_url"), &plain_url)
        .await
        .unwrap();
    store
        .put(&format!("/nodes/{PLAIN_NODE}/api/token"), PLAIN_TOKEN)
        .await
        .unwrap();
    let quick = Manager::new(
        store.clone(),
        Arc::new(HttpNodeClient::new(Duration::from_millis(500)).unwrap()),
        ManagerConfig::default(),
    );
    let r = row(&quick, NODE, T0).await;
    assert!(r.last_error.unwrap_or_default().starts_with("refused: "));
    let seen = rec.text();
    assert!(
        seen.contains(&format!("authorization: Bearer {PLAIN_TOKEN}")),
        "the recorder saw: {seen:?}"
    );
    assert!(
        !seen.contains(TOKEN),
        "{NODE}'s token went out in clear: {seen}"
    );
    println!(
        "(c) the recorder saw {} connection(s), only {PLAIN_NODE}'s: none from {NODE}",
        rec.connections.lock().unwrap()
    );
    store
        .delete_prefix(&format!("/fleet/nodes/{PLAIN_NODE}/"))
        .await
        .unwrap();

    // (d) The fleet page over HTTPS.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let web = listener.local_addr().unwrap();
    let identity = meduza::tls::server_identity_from_files(
        "--tls-cert",
        &pki.server_cert,
        "--tls-key",
        &pki.server_key,
    )
    .expect("the page's certificate loads");
    let mut opts = meduza::fleet::ServeOptions::token(ADMIN);
    opts.tls = Some(identity.config);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serve = tokio::spawn(meduza::fleet::serve(
        listener,
        Arc::new(manager(&store, Some(&pki.ca))),
        opts,
        async move {
            let _ = stop_rx.await;
        },
    ));
    let ca = meduza::tls::ca_certs("ca", &read(&pki.ca)).unwrap();
    let browser = meduza::tls::client_builder(&ServerTrust::Ca(ca))
        .unwrap()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap();
    let resp = browser
        .get(format!("https://127.0.0.1:{}/?token={ADMIN}", web.port()))
        .send()
        .await
        .expect("the page answers over https");
    let cookie = resp
        .headers()
        .get(reqwest::header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(resp.status().is_redirection(), "{:?}", resp.status());
    assert!(
        cookie.split(';').any(|a| a.trim() == "Secure") && cookie.contains("HttpOnly"),
        "(d) Set-Cookie: {cookie}"
    );
    let plain = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap()
        .get(format!("http://127.0.0.1:{}/", web.port()))
        .send()
        .await;
    assert!(plain.is_err(), "plain http got an answer: {plain:?}");
    println!(
        "(d) fleet page over https; Set-Cookie: {}",
        cookie.split('=').next().unwrap_or("")
    );
    // (e) The keys removed from etcd: back to plain HTTP, `api_tls` removed.
    store
        .write_and_commit(
            ["cert", "key"]
                .iter()
                .map(|k| WriteOp::Delete {
                    key: format!("/nodes/{NODE}/api/tls/{k}"),
                })
                .collect(),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let api_tls = format!("/updated/{NODE}/api_tls");
    while store.get(&api_tls).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "{api_tls} stays; {}", node.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let health = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://127.0.0.1:{api_port}/v1/health"))
        .send()
        .await
        .expect("plain http again");
    assert!(health.status().is_success(), "{:?}", health.status());
    println!("(e) TLS keys deleted: {api_tls} removed, plain http again");

    let log = node.log();
    for secret in [&key, &wrong_key] {
        let body = secret.lines().nth(1).expect("a PEM body line");
        assert!(!log.contains(body), "a private key in meduza's log");
    }
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(10), serve)
        .await
        .expect("the page stops")
        .unwrap()
        .unwrap();
    drop(node);
}
