//! Rule-file and subscription downloads: through the mihomo double's mixed port while
//! Clash is enabled (the origin sees the proxy's source address 127.0.0.2 and its Via
//! header), direct when disabled, retries with backoff, last-good on failure.

use meduza_test_support::doubles;

use doubles::{FakeMihomo, MihomoOpts, Origin};
use meduza::clash::rules::{
    download_rule_files, parse_rule_files, Backoff, Fetcher, Route, RuleFile, RulesReport,
};
use meduza::clash::subscription::SubscriptionStore;
use std::net::IpAddr;
use std::time::{Duration, Instant};

fn fast_fetcher(attempts: u32, first_delay_ms: u64) -> Fetcher {
    Fetcher {
        backoff: Backoff {
            attempts,
            first_delay: Duration::from_millis(first_delay_ms),
        },
        timeout: Duration::from_secs(5),
        ..Fetcher::default()
    }
}

/// One rule file, /etc/mosdns/r.txt, that an origin serves at /r.txt, downloaded into
/// a scratch root.
struct OneFile {
    origin: Origin,
    root: tempfile::TempDir,
    files: Vec<RuleFile>,
}

impl OneFile {
    async fn serving(body: &str) -> Self {
        let origin = Origin::start().await;
        origin.route("/r.txt", body);
        let root = tempfile::tempdir().expect("root");
        let files = parse_rule_files(&format!(
            r#"{{"/etc/mosdns/r.txt": "{}"}}"#,
            origin.url("/r.txt")
        ))
        .expect("files");
        Self {
            origin,
            root,
            files,
        }
    }

    async fn download(&self, fetcher: Fetcher, route: &Route) -> RulesReport {
        download_rule_files(
            &fetcher,
            self.root.path(),
            "/etc/mosdns",
            &self.files,
            route,
        )
        .await
        .expect("download")
    }
}

fn proxied(seen: &doubles::Seen) -> bool {
    seen.peer.ip() == "127.0.0.2".parse::<IpAddr>().expect("ip")
        && seen.header("Via") == Some("1.1 fake-mihomo")
}

#[tokio::test]
async fn rules_go_through_the_proxy_and_report_changes() {
    let m = FakeMihomo::start(MihomoOpts::default()).await;
    let origin = Origin::start().await;
    origin.route("/direct.txt", "full:a.example\n");
    origin.route("/ip.txt", "10.0.0.0/8\n");
    let root = tempfile::tempdir().expect("root");
    let json = format!(
        r#"{{"/etc/mosdns/rules/direct.txt": "{}", "rules/ip.txt": "{}"}}"#,
        origin.url("/direct.txt"),
        origin.url("/ip.txt")
    );
    let files = parse_rule_files(&json).expect("rule files");
    let route = Route::Proxy { url: m.proxy_url() };
    let fetcher = fast_fetcher(5, 10);

    let report = download_rule_files(&fetcher, root.path(), "/etc/mosdns", &files, &route)
        .await
        .expect("download");
    let direct = root.path().join("etc/mosdns/rules/direct.txt");
    let ip = root.path().join("etc/mosdns/rules/ip.txt");
    assert_eq!(report.changed, vec![direct.clone(), ip.clone()]);
    assert!(report.complete());
    assert_eq!(
        std::fs::read_to_string(&direct).expect("read"),
        "full:a.example\n"
    );
    let seen = origin.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter().all(proxied),
        "every request came from the proxy: {seen:?}"
    );
    assert!(
        seen[0].request_line.starts_with("GET /direct.txt "),
        "origin-form after the proxy: {seen:?}"
    );

    // Same content: nothing changed, MosDNS need not restart.
    let report = download_rule_files(&fetcher, root.path(), "/etc/mosdns", &files, &route)
        .await
        .expect("download");
    assert!(report.changed.is_empty());
    assert_eq!(report.unchanged.len(), 2);

    // One file changes upstream.
    origin.route("/ip.txt", "10.0.0.0/8\n192.168.0.0/16\n");
    let report = download_rule_files(&fetcher, root.path(), "/etc/mosdns", &files, &route)
        .await
        .expect("download");
    assert_eq!(report.changed, vec![ip]);
}

#[tokio::test]
async fn clash_disabled_downloads_directly() {
    let one = OneFile::serving("domain:b.example\n").await;
    let origin = &one.origin;
    let report = one
        .download(fast_fetcher(5, 10), &Route::for_clash(false))
        .await;
    assert_eq!(report.changed.len(), 1);
    let seen = origin.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].peer.ip(),
        "127.0.0.1".parse::<IpAddr>().expect("ip")
    );
    assert_eq!(seen[0].header("Via"), None);
}

#[tokio::test]
async fn five_attempts_with_backoff_then_failure_keeps_previous_file() {
    let m = FakeMihomo::start(MihomoOpts::default()).await;
    let one = OneFile::serving("full:c.example\n").await;
    let (origin, root) = (&one.origin, &one.root);
    *origin.fail_first.lock().expect("lock") = 1000;
    let route = Route::Proxy { url: m.proxy_url() };

    let t = Instant::now();
    let report = one.download(fast_fetcher(5, 40), &route).await;
    let took = t.elapsed();
    assert_eq!(origin.seen().len(), 5, "exactly 5 attempts");
    // Waits of 40 + 80 + 160 + 320 ms between them.
    assert!(
        took >= Duration::from_millis(600),
        "backoff too short: {took:?}"
    );
    assert_eq!(report.missing.len(), 1, "{report:?}");
    assert!(
        report.missing[0].1.contains("HTTP 503")
            && report.missing[0].1.contains("after 5 attempts"),
        "{report:?}"
    );
    assert!(!report.complete());

    // Succeeds on the 3rd attempt.
    *origin.fail_first.lock().expect("lock") = 2;
    let report = one.download(fast_fetcher(5, 10), &route).await;
    assert_eq!(report.changed.len(), 1);
    assert_eq!(origin.seen().len(), 8);

    // All attempts fail again: the previous copy is kept and reported stale.
    *origin.fail_first.lock().expect("lock") = 1000;
    let report = one.download(fast_fetcher(2, 10), &route).await;
    assert_eq!(report.stale.len(), 1);
    assert!(report.complete());
    assert_eq!(
        std::fs::read_to_string(root.path().join("etc/mosdns/r.txt")).expect("kept"),
        "full:c.example\n"
    );
}

#[tokio::test]
async fn never_direct_while_clash_is_enabled() {
    // Clash enabled but mihomo not listening: every attempt fails; the origin never
    // sees a direct request.
    let origin = Origin::start().await;
    origin.route("/r.txt", "full:d.example\n");
    let dead_proxy = format!("http://127.0.0.1:{}", doubles::free_port());
    let fetcher = fast_fetcher(3, 10);
    let err = fetcher
        .fetch(&origin.url("/r.txt"), &Route::Proxy { url: dead_proxy })
        .await
        .expect_err("no proxy");
    assert!(err.to_string().contains("after 3 attempts"), "{err}");
    assert!(origin.seen().is_empty());
}

#[tokio::test]
async fn html_body_is_rejected() {
    let one = OneFile::serving("<html><body>captive portal</body></html>").await;
    let root = &one.root;
    let report = one.download(fast_fetcher(1, 10), &Route::Direct).await;
    assert_eq!(report.missing.len(), 1);
    assert!(report.missing[0].1.contains("HTML"));
    assert!(!root.path().join("etc/mosdns/r.txt").exists());
}

#[tokio::test]
async fn subscription_via_proxy_keeps_last_good() {
    let m = FakeMihomo::start(MihomoOpts::default()).await;
    let origin = Origin::start().await;
    let good = "proxies:\n  - {name: jp1, type: vmess, server: 192.0.2.9, port: 443, uuid: x}\n";
    origin.route("/sub", good);
    let dir = tempfile::tempdir().expect("dir");
    let store = SubscriptionStore::new(dir.path().join("sub.yaml"));
    let route = Route::Proxy { url: m.proxy_url() };
    let fetcher = fast_fetcher(2, 10);

    let first = store
        .refresh(&fetcher, &origin.url("/sub"), &route)
        .await
        .expect("first");
    assert!(first.changed);
    assert_eq!(first.summary.proxies, 1);
    assert!(
        !store
            .refresh(&fetcher, &origin.url("/sub"), &route)
            .await
            .expect("same")
            .changed
    );
    let seen = origin.seen();
    assert!(seen.iter().all(proxied), "{seen:?}");
    assert_eq!(seen[0].header("User-Agent"), Some("clash.meta (meduza)"));

    // The server now returns an error page, then garbage: the last good copy stays.
    origin.route("/sub", "<html>oops</html>");
    let err = store
        .refresh(&fetcher, &origin.url("/sub"), &route)
        .await
        .expect_err("invalid");
    assert!(err.to_string().contains("invalid"), "{err}");
    // Valid Clash, but a provider file needs `proxies`: refused too.
    origin.route(
        "/sub",
        "proxy-providers:\n  p: {type: http, url: 'http://x', path: ./p.yaml}\n",
    );
    let err = store
        .refresh(&fetcher, &origin.url("/sub"), &route)
        .await
        .expect_err("providers only");
    assert!(err.to_string().contains("no proxies list"), "{err}");
    *origin.fail_first.lock().expect("lock") = 10;
    store
        .refresh(&fetcher, &origin.url("/sub"), &route)
        .await
        .expect_err("503");
    assert_eq!(store.last_good().as_deref(), Some(good));
}
