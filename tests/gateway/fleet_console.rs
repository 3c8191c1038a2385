//! The fleet console clicked through in a real browser (issue 18, part 4): headless
//! Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`) in the
//! hub namespace, against the real `meduza fleet serve` (argon2 password from
//! `meduza fleet hash-password`) and a real gateway (`meduza run` in its namespace),
//! with a real etcd and two real dnsmasq upstreams in the hub.
//!
//! Flows: a wrong password is refused and the right one signs in; a node added from
//! the page (an invalid id first: the error shows at the field) is pulled and shown;
//! an upstream edited from the page is in etcd at once (staged), a dry run shows the
//! node's diff, Commit publishes it and the gateway's API reports the new address; an
//! invalid edit shows its error at the field; an upstream tested from the page shows
//! its latency; a group created for one node only, then deleted; a failover from the
//! node's dialog shows its result and the log entry; the node removed from the fleet;
//! a write with the session cookie but without the CSRF token is refused (403); the
//! page at a phone's width. A screenshot of each state goes to
//! `target/fleet-console/`; `UPDATE_SCREENSHOT=1` copies them to `docs/`.
//!
//! Needs root, etcd, dnsmasq, chromium and chromedriver; a missing one fails the test.

use meduza_test_support::{gateway, mesh, pki, process, webdriver};

use gateway::{commit, mod_revision, Gateway};
use mesh::{ns_try, wait_for, Mesh, NsEtcd};
use serde_json::Value;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use webdriver::Browser;

const ADMIN_TOKEN: &str = "fleet-console-admin-3b8e1f0a";
const PASSWORD: &str = "correct horse battery staple";
const NODE_TOKEN: &str = "gw0-console-token-9a8b7c6d5e";
const WEB_PORT: u16 = 9200;
const DRIVER_PORT: u16 = 9515;

/// A process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// dnsmasq answering every A query at HUB_IP:`port`.
fn dnsmasq(ns: &str, port: u16) -> Proc {
    let child = Command::new("ip")
        .args(["netns", "exec", ns, "dnsmasq", "--keep-in-foreground"])
        .args(["--conf-file=/dev/null", "--no-resolv", "--no-hosts"])
        .args(["--bind-interfaces", "--user=root", "--pid-file"])
        .arg(format!("--listen-address={}", Mesh::HUB_IP))
        .arg(format!("--port={port}"))
        // Every name (the health check's too) answers 10.7.7.7.
        .arg("--address=/#/10.7.7.7")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq must be installed (scripts/install-deps)");
    Proc(child)
}

fn upstream_keys(etcd: &NsEtcd, name: &str, addr: &str, priority: u32) {
    let base = format!("/global/dns/upstreams/{name}");
    etcd.put(&format!("{base}/addresses"), addr);
    etcd.put(&format!("{base}/priority"), &priority.to_string());
    etcd.put(&format!("{base}/health_check/interval"), "5");
    etcd.put(&format!("{base}/health_check/timeout"), "2");
}

fn hash_password(dir: &Path) -> PathBuf {
    let mut child = Command::new(env!("CARGO_BIN_EXE_meduza"))
        .args(["fleet", "hash-password"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("meduza fleet hash-password");
    writeln!(child.stdin.take().expect("stdin"), "{PASSWORD}").expect("write password");
    let out = child.wait_with_output().expect("hash-password output");
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).expect("utf-8");
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!hash.contains(PASSWORD));
    let path = dir.join("admin.hash");
    std::fs::write(&path, hash).expect("write hash file");
    path
}

/// The test PKI: a CA, gw0's API certificate, the fleet page's certificate.
struct Pki {
    ca: pki::Ca,
    node: (PathBuf, PathBuf),
    page: (PathBuf, PathBuf),
}

fn pki(dir: &Path) -> Pki {
    let ca = pki::Ca::new(dir, "fleet-ca");
    let node = ca.issue("gw0", "serverAuth", &format!("IP:{}", Mesh::gw_ip(0)));
    let page = ca.issue("page", "serverAuth", &format!("IP:{}", Mesh::HUB_IP));
    Pki { ca, node, page }
}

fn serve(hub: &str, etcd: &str, hash: &Path, pki: &Pki, log: &Path) -> Proc {
    let listen = format!("{}:{WEB_PORT}", Mesh::HUB_IP);
    let page = (pki.page.0.as_path(), pki.page.1.as_path());
    let mut cmd = process::fleet_serve(hub, etcd, &listen, page, &pki.ca, ADMIN_TOKEN);
    cmd.args(["--pull-interval", "2"])
        .arg("--password-hash-file")
        .arg(hash)
        .env("MEDUZA_LOG", "info");
    Proc(process::spawn_logged(&mut cmd, log))
}

/// Where the screenshots go (and, with UPDATE_SCREENSHOT=1, docs/).
fn shots_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fleet-console")
}

fn shot(b: &Browser, name: &str) {
    let p = b.screenshot(name);
    let png = std::fs::read(&p).expect("read screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 5_000,
        "{name}: not a real screenshot"
    );
    if std::env::var("UPDATE_SCREENSHOT").as_deref() == Ok("1") {
        let doc =
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("docs/fleet-console-{name}.png"));
        std::fs::copy(&p, doc).expect("copy screenshot to docs");
    }
}

#[test]
fn fleet_console_in_a_real_browser() {
    let t0 = Instant::now();
    let mesh = Mesh::new(1);
    let etcd = NsEtcd::start(&mesh.hub, Mesh::HUB_IP, 2379, &mesh.path("etcd"));
    let _dns_a = dnsmasq(&mesh.hub, 53);
    let _dns_b = dnsmasq(&mesh.hub, 5353);
    let pki = pki(&mesh.path(""));
    let read = |p: &Path| std::fs::read_to_string(p).expect("read pem");
    etcd.put("/nodes/gw0/api/token", NODE_TOKEN);
    etcd.put("/nodes/gw0/api/tls/cert", &read(&pki.node.0));
    etcd.put("/nodes/gw0/api/tls/key", &read(&pki.node.1));
    etcd.put("/nodes/gw0/lan", &gateway::lan(0));
    upstream_keys(&etcd, "primary", &Mesh::HUB_IP.to_string(), 1);
    upstream_keys(&etcd, "backup", &format!("{}:5353", Mesh::HUB_IP), 2);
    let rev1 = commit(&etcd);
    let mut gw = Gateway::new(&mesh, 0, &etcd.endpoint);
    gw.env
        .push(("MEDUZA_API_LISTEN".into(), "0.0.0.0:9100".into()));
    gw.start();
    gw.wait_applied(&etcd, rev1, Duration::from_secs(20));

    let hash = hash_password(&mesh.path(""));
    let log = mesh.path("fleet.log");
    let _serve = serve(&mesh.hub, &etcd.endpoint, &hash, &pki, &log);
    let base = format!("https://{}:{WEB_PORT}", Mesh::HUB_IP);
    let ca = pki.ca.cert.display().to_string();
    // Over HTTPS, verified against the test CA.
    let curl = |args: &[&str]| {
        let mut argv = vec!["curl", "-s", "--cacert", &ca, "--max-time", "5"];
        argv.extend_from_slice(args);
        ns_try(&mesh.hub, &argv)
    };
    wait_for("fleet serve over https", Duration::from_secs(20), || {
        curl(&["-o", "/dev/null", &format!("{base}/")])
            .status
            .success()
            .then_some(())
    });
    let b = Browser::start(&mesh.hub, DRIVER_PORT, &shots_dir());

    // Sign in: the wrong password is refused, the right one opens the page.
    b.goto(&format!("{base}/"));
    b.fill("#password", "wrong password");
    b.click("#sign-in");
    let msg = b.wait_text("#login-message", "the refusal", |t| !t.is_empty());
    assert_eq!(msg, "Wrong password or token.");
    shot(&b, "login-refused");
    b.fill("#password", PASSWORD);
    b.click("#sign-in");
    b.wait_text("#state", "the first refresh", |t| t.starts_with("updated"));
    let cookie = b.cookie("meduza_fleet_session").expect("session cookie");
    assert_eq!(cookie["secure"], true, "{cookie}");
    assert_eq!(cookie["httpOnly"], true, "{cookie}");
    assert_eq!(cookie["sameSite"], "Strict", "{cookie}");

    // Add a node: an invalid id first (the error at the id field), then gw0.
    b.click("#add-node");
    b.fill("#n-id", "gw 0");
    b.fill("#n-host", &Mesh::gw_ip(0).to_string());
    b.fill("#n-token", NODE_TOKEN);
    b.click("#n-https");
    b.click("#n-save");
    let err = b.wait_text(".field-error[data-for=id]", "the id error", |t| {
        !t.is_empty()
    });
    assert!(err.contains("may only contain"), "{err}");
    shot(&b, "add-node-invalid");
    b.fill("#n-id", "gw0");
    b.click("#n-save");
    let card = b.wait_text("#node-gw0", "gw0 available", |t| {
        t.contains("push: available") && t.contains("pull: available")
    });
    assert!(card.contains("primary"), "{card}");
    assert!(
        !b.body_text().contains(NODE_TOKEN),
        "the node token reached the page"
    );
    assert_eq!(
        etcd.get("/fleet/nodes/gw0/api_url").as_deref(),
        Some(format!("https://{}:9100", Mesh::gw_ip(0)).as_str())
    );
    shot(&b, "nodes");

    // A write from the page without the CSRF token (the browser still sends the
    // session cookie) is refused, and nothing is written.
    let v = b.js_async(
        "const done = arguments[arguments.length - 1];
         fetch('/fleet/api/nodes', {method: 'POST', credentials: 'same-origin',
           headers: {'Content-Type': 'application/json'},
           body: JSON.stringify({id: 'gw9', api_url: 'https://10.99.0.99:9100'})})
           .then(async r => done([r.status, await r.text()]));",
    );
    assert_eq!(v[0], 403, "{v}");
    assert!(v[1].as_str().unwrap_or_default().contains("CSRF"), "{v}");
    assert_eq!(etcd.get("/fleet/nodes/gw9/api_url"), None);

    // Edit the global "primary": an invalid priority (error at the field), then a
    // second address. Staged in etcd at once, not committed.
    b.click("#tab-upstreams");
    b.wait_text("#upstreams-table", "the groups", |t| t.contains("primary"));
    shot(&b, "upstreams");
    b.click("#upstream-primary button.edit");
    b.fill("#u-priority", "0");
    b.click("#u-save");
    let err = b.wait_text(
        ".field-error[data-for=priority]",
        "the priority error",
        |t| !t.is_empty(),
    );
    assert!(err.contains("1"), "{err}");
    shot(&b, "upstream-invalid");
    let new_addrs = format!("{}\n{}:5353", Mesh::HUB_IP, Mesh::HUB_IP);
    b.fill("#u-priority", "1");
    b.fill("#u-addresses", &new_addrs);
    b.click("#u-save");
    b.wait_text("#upstream-primary .addresses", "the new address", |t| {
        t.contains(":5353")
    });
    assert_eq!(
        etcd.get("/global/dns/upstreams/primary/addresses")
            .as_deref(),
        Some(new_addrs.as_str())
    );
    assert_eq!(
        mod_revision(&etcd, "/commit"),
        rev1,
        "staged, not committed"
    );

    // Commit: a dry run shows gw0's change, Commit publishes exactly that.
    b.click("#tab-commit");
    b.click("#dry-run");
    let msg = b.wait_text("#commit-message", "the dry run", |t| t.contains("dry run"));
    assert!(msg.contains("is valid"), "{msg}");
    let report = b.text("#commit-report");
    assert!(
        report.contains("gw0") && report.contains(":5353"),
        "{report}"
    );
    shot(&b, "commit-dry-run");
    b.click("#commit");
    let msg = b.wait_text("#commit-message", "the commit", |t| {
        t.starts_with("committed:")
    });
    let rev2 = mod_revision(&etcd, "/commit");
    assert!(rev2 > rev1 && msg.contains(&rev2.to_string()), "{msg}");
    shot(&b, "committed");
    gw.wait_applied(&etcd, rev2, Duration::from_secs(20));
    // On the node: its API (HTTPS, verified against the CA) reports the new address.
    let auth = format!("Authorization: Bearer {NODE_TOKEN}");
    let url = format!("https://{}:9100/v1/dns/upstreams/primary", Mesh::gw_ip(0));
    let out = curl(&["-f", "-H", &auth, &url]);
    assert!(out.status.success(), "node api over https");
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        v["config"]["addresses"][1],
        format!("{}:5353", Mesh::HUB_IP)
    );
    let applied_tls = etcd
        .get("/updated/gw0/api_tls")
        .expect("gw0 publishes api_tls");
    assert_eq!(
        applied_tls.split_whitespace().nth(2),
        Some("etcd"),
        "{applied_tls}"
    );

    // Test an upstream from gw0: its latency.
    b.click("#tab-upstreams");
    b.js(
        "const s = document.getElementById('upstream-scope'); s.value = 'gw0'; s.dispatchEvent(new Event('change'));",
        serde_json::json!([]),
    );
    b.wait_text("#upstreams-note", "the node scope", |t| {
        t.contains("node gw0")
    });
    b.click("#upstream-backup button.test");
    let res = b.wait_text("#upstream-test-result", "the test result", |t| {
        t.contains("answered") || t.contains("failed") || t.contains("no answer")
    });
    assert!(res.starts_with("backup: answered in"), "{res}");
    shot(&b, "upstream-test");

    // A per-node group: created for gw0 only (source "node"), then deleted.
    b.click("#new-upstream");
    b.fill("#u-name", "office");
    b.fill("#u-addresses", &format!("{}:5353", Mesh::HUB_IP));
    b.fill("#u-priority", "5");
    b.click("#u-save");
    b.wait_text("#upstream-office", "the node's group", |t| {
        t.contains("node")
    });
    assert_eq!(
        etcd.get("/nodes/gw0/dns/upstreams/office/addresses")
            .as_deref(),
        Some(format!("{}:5353", Mesh::HUB_IP).as_str())
    );
    assert_eq!(etcd.get("/global/dns/upstreams/office/addresses"), None);
    b.click("#upstream-office button.delete");
    b.accept_alert();
    b.wait_text("#upstream-test-result", "the deletion", |t| {
        t.contains("office deleted")
    });
    assert_eq!(etcd.get("/nodes/gw0/dns/upstreams/office/addresses"), None);

    // Fail over to "backup" from gw0's dialog: the result and the log entry.
    b.click("#tab-nodes");
    b.click("#node-gw0 button.manage");
    b.wait_text("#d-title", "the dialog", |t| t == "gw0");
    b.wait_text("#d-keys", "the node's keys", |t| {
        t.contains("/nodes/gw0/lan")
    });
    let keys = b.text("#d-keys");
    assert!(
        keys.contains("<redacted>") && !keys.contains(NODE_TOKEN),
        "{keys}"
    );
    b.js(
        "const s = document.getElementById('d-target'); s.value = 'backup';",
        serde_json::json!([]),
    );
    b.click("#d-failover");
    let res = b.wait_text("#d-result", "the failover", |t| !t.is_empty());
    assert!(res.contains("→ backup"), "{res}");
    let logtext = b.wait_text("#d-log", "the log entry", |t| t.contains("backup"));
    assert!(logtext.contains("manual"), "{logtext}");
    shot(&b, "failover");
    b.click("#detail-dialog [data-close]");

    // A phone's width: one column, nothing wider than the screen.
    b.resize(390, 844);
    std::thread::sleep(Duration::from_millis(500));
    let overflow = b.js(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth;",
        serde_json::json!([]),
    );
    assert!(
        overflow.as_i64().unwrap_or(99) <= 0,
        "horizontal overflow {overflow}"
    );
    shot(&b, "phone");
    b.click("#tab-upstreams");
    shot(&b, "phone-upstreams");

    // Remove the node from the fleet: its registration goes, its configuration stays.
    b.resize(1280, 900);
    b.click("#tab-nodes");
    b.click("#node-gw0 button.manage");
    b.wait_text("#d-title", "the dialog", |t| t == "gw0");
    b.click("#d-remove");
    b.accept_alert();
    b.wait_text("#empty-fleet", "the empty fleet", |t| {
        t.contains("No nodes")
    });
    assert_eq!(etcd.get("/fleet/nodes/gw0/api_url"), None);
    assert_eq!(
        etcd.get("/nodes/gw0/lan").as_deref(),
        Some(gateway::lan(0).as_str())
    );
    eprintln!(
        "fleet console browser test: {:.1} s; screenshots in {}",
        t0.elapsed().as_secs_f64(),
        shots_dir().display()
    );
}
