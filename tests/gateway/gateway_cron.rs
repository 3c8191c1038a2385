//! Scheduled restarts end to end (issue 14): the cron timer of the real `meduza run`,
//! configured through etcd keys, not `Supervisor::restart(Cron)`.
//!
//! `MEDUZA_MINUTE_MS=600` (the test knob, docs/supervision.md) makes one minute of
//! supervision time last 600 ms: "every 10 minutes" fires every 6 s, the 120 s
//! cooldown lasts 1.2 s and the rolling hour 36 s, while the log keeps the
//! predecessor's numbers ("need 120s", "5/5 per hour"). Two generic tunnels run `sleep`:
//!
//! - `tunnel-cron` (`restart/cron_minutes` 10): restarted by the timer at 10, 20, 30,
//!   40 and 50 minutes (new pid, a `<ts> cron` line in its state file, the counters in
//!   `/metrics`); at 60 minutes the sixth restart in the hour is DENIED by the budget:
//!   ACTION REQUIRED, state `fatal`, the process left alone.
//! - `tunnel-hc` (the same schedule and a TCP health check every 9 minutes on a closed
//!   port): the health check restarts it at about 9 minutes, so its scheduled restart
//!   at 10 minutes is SKIPPED by the cooldown.
//!
//! Needs root, etcd and curl; a missing one fails the test.

use meduza_test_support::{gateway, mesh};

use gateway::{commit, field, Gateway};
use mesh::{wait_for, Mesh, NsEtcd};
use std::time::{Duration, Instant};

const TOKEN: &str = "test-token-0123456789abcdef";
/// One minute of supervision time, in real milliseconds.
const MINUTE_MS: u64 = 600;
/// Ten minutes of supervision time: the scheduled-restart period, in real seconds.
const PERIOD_SECS: f64 = 10.0 * MINUTE_MS as f64 / 1000.0;

const TRIGGERED: &str = "=== Cron Restart Triggered: ";
const ALLOWED: &str = "Restart ALLOWED";
const RESTARTED: &str = "=== Cron Restart Complete: Service restarted ===";
const SKIPPED: &str = "Restart SKIPPED: cooldown active (";
const PROTECTED: &str = "=== Cron Restart Complete: Restart skipped (protection active) ===";
const DENIED: &str = "Restart DENIED: limit reached (5/5 per hour)";
const ACTION: &str = "ACTION REQUIRED: Check service health manually - automatic restarts stopped";

fn tunnel(etcd: &NsEtcd, name: &str, seconds: &str, extra: &[(&str, &str)]) {
    let p = format!("/nodes/gw0/tunnels/{name}");
    etcd.put(&format!("{p}/enable"), "true");
    etcd.put(&format!("{p}/kind"), "generic");
    etcd.put(&format!("{p}/command"), "/bin/sleep");
    etcd.put(&format!("{p}/args"), seconds);
    for (k, v) in extra {
        etcd.put(&format!("{p}/{k}"), v);
    }
}

/// Wait until the counters of `svc` in `/metrics` are `(last_hour, total)`.
fn wait_counters(gw: &Gateway, svc: &str, want: (u64, u64)) {
    wait_for(
        &format!("{svc} restart counters {want:?} in /metrics"),
        Duration::from_secs(5),
        || {
            let got = (
                gw.service_metric(TOKEN, "meduza_service_restarts_last_hour", svc)?,
                gw.service_metric(TOKEN, "meduza_service_restarts_total", svc)?,
            );
            (got == want).then_some(())
        },
    );
}

/// One log line of a service: seconds of the day (from the line's timestamp) and the
/// whole line.
struct Line {
    at: f64,
    text: String,
}

/// The lines meduza logged about `svc` (field `svc=<svc>`), in order.
fn lines_of(log: &str, svc: &str) -> Vec<Line> {
    log.lines()
        .filter(|l| field(l, "svc").as_deref() == Some(svc))
        .map(|l| Line {
            at: seconds_of_day(l),
            text: l.to_string(),
        })
        .collect()
}

/// `2025-02-14T11:00:00.123456Z ...` → 39600.123456.
fn seconds_of_day(line: &str) -> f64 {
    let ts = line.split_whitespace().next().unwrap_or_default();
    let time = ts
        .split_once('T')
        .map(|(_, t)| t.trim_end_matches('Z'))
        .unwrap_or_default();
    let mut parts = time
        .split(':')
        .map(|p| p.parse::<f64>().unwrap_or(f64::NAN));
    let (h, m, s) = (parts.next(), parts.next(), parts.next());
    match (h, m, s) {
        (Some(h), Some(m), Some(s)) => h * 3600.0 + m * 60.0 + s,
        _ => panic!("no timestamp in log line {line:?}"),
    }
}

/// Real seconds from `a` to `b` (log timestamps; across midnight too).
fn gap(a: f64, b: f64) -> f64 {
    (b - a).rem_euclid(86_400.0)
}

/// Index of the first line at or after `from` containing `needle`.
fn find(lines: &[Line], from: usize, needle: &str) -> Option<usize> {
    lines[from..]
        .iter()
        .position(|l| l.text.contains(needle))
        .map(|i| from + i)
}

/// Assert that `needles` appear in this order, each after the previous one; returns
/// their indices.
fn in_order(lines: &[Line], from: usize, needles: &[&str]) -> Vec<usize> {
    let mut at = from;
    let mut out = Vec::new();
    for n in needles {
        let i = find(lines, at, n).unwrap_or_else(|| {
            let text: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
            panic!("no {n:?} after line {at} in:\n{}", text.join("\n"))
        });
        out.push(i);
        at = i + 1;
    }
    out
}

fn count(lines: &[Line], needle: &str) -> usize {
    lines.iter().filter(|l| l.text.contains(needle)).count()
}

/// The `pid=` of every `service started` line.
fn started_pids(lines: &[Line]) -> Vec<u32> {
    lines
        .iter()
        .filter(|l| l.text.contains("service started"))
        .filter_map(|l| field(&l.text, "pid")?.parse().ok())
        .collect()
}

/// Wait for the `n`th line of `svc` containing `needle`; returns the log of that moment.
fn wait_line(gw: &Gateway, svc: &str, needle: &str, n: usize, timeout: Duration) -> String {
    wait_for(&format!("{svc}: {needle:?} #{n}"), timeout, || {
        let log = gw.run_log();
        (count(&lines_of(&log, svc), needle) >= n).then_some(log)
    })
}

/// The state file's lines of `svc`: (unix time of supervision time, source).
fn state_lines(gw: &Gateway, svc: &str) -> Vec<(u64, String)> {
    let text =
        std::fs::read_to_string(gw.state.join(format!("restart/{svc}.state"))).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (ts, source) = l.split_once(' ')?;
            Some((ts.parse().ok()?, source.to_string()))
        })
        .collect()
}

/// `(ago, by, need, wait)` of `Restart SKIPPED: cooldown active (50s ago by health,
/// need 120s, wait 70s more)`.
fn skipped_numbers(line: &str) -> (u64, String, u64, u64) {
    let inner = line
        .split_once(SKIPPED)
        .and_then(|(_, r)| r.split_once(')'))
        .map(|(i, _)| i)
        .unwrap_or_else(|| panic!("not a cooldown line: {line}"));
    let words: Vec<&str> = inner.split_whitespace().collect();
    let secs = |w: &str| -> u64 {
        w.trim_end_matches(',')
            .trim_end_matches('s')
            .parse()
            .unwrap_or_else(|_| panic!("{w:?} in {line}"))
    };
    // ["50s", "ago", "by", "health,", "need", "120s,", "wait", "70s", "more"]
    assert_eq!(words.len(), 9, "{line}");
    (
        secs(words[0]),
        words[3].trim_end_matches(',').to_string(),
        secs(words[5]),
        secs(words[7]),
    )
}

#[test]
fn scheduled_restart_happens_is_skipped_by_cooldown_and_denied_by_budget() {
    let t0 = Instant::now();
    let mesh = Mesh::new(1);
    let etcd = NsEtcd::start(&mesh.hub, Mesh::HUB_IP, 2379, &mesh.path("etcd"));
    etcd.put("/nodes/gw0/api/token", TOKEN);
    tunnel(&etcd, "cron", "3601", &[("restart/cron_minutes", "10")]);
    // Port 9 (discard) is closed in the gateway's namespace: every probe is refused.
    tunnel(
        &etcd,
        "hc",
        "3602",
        &[
            ("restart/cron_minutes", "10"),
            ("health/kind", "tcp"),
            ("health/target", "127.0.0.1:9"),
            ("health/interval", "540"),
        ],
    );
    let rev = commit(&etcd);
    let mut gw = Gateway::new(&mesh, 0, &etcd.endpoint);
    gw.env
        .push(("MEDUZA_MINUTE_MS".into(), MINUTE_MS.to_string()));
    gw.start();
    gw.wait_applied(&etcd, rev, Duration::from_secs(30));
    let cron0 = gw.wait_pid("sleep 3601", Duration::from_secs(5));
    let hc0 = gw.wait_pid("sleep 3602", Duration::from_secs(5));
    assert!(
        gw.run_log()
            .contains("supervision time scaled by MEDUZA_MINUTE_MS (test knob)"),
        "the knob is announced"
    );

    // (2) tunnel-hc: health restart at ~9 minutes, scheduled restart at 10 skipped.
    let log = wait_line(&gw, "tunnel-hc", SKIPPED, 1, Duration::from_secs(30));
    let hc1 = gw.pid_of("sleep 3602").expect("tunnel-hc running");
    let hc_state = state_lines(&gw, "tunnel-hc");
    let hc = lines_of(&log, "tunnel-hc");
    let at = in_order(
        &hc,
        0,
        &[
            "service started",
            "=== Health Check Start: tunnel-hc ===",
            "Health check FAIL (attempt 1/3): TCP connect to 127.0.0.1:9",
            "Health check FAIL (attempt 3/3)",
            "=== Health Check FAILED: tunnel-hc is unhealthy ===",
            ALLOWED,
            "service started",
            "=== Cron Restart Triggered: tunnel-hc ===",
            SKIPPED,
            PROTECTED,
        ],
    );
    assert_eq!(field(&hc[at[5]].text, "source").as_deref(), Some("health"));
    assert_eq!(count(&hc, ALLOWED), 1, "only the health restart happened");
    let (ago, by, need, wait) = skipped_numbers(&hc[at[8]].text);
    assert_eq!((by.as_str(), need), ("health", 120), "{}", hc[at[8]].text);
    assert!(
        ago > 0 && ago < 120 && ago + wait == 120,
        "{}",
        hc[at[8]].text
    );
    assert_ne!(hc1, hc0, "the health check restarted tunnel-hc");
    assert_eq!(
        started_pids(&hc),
        [hc0, hc1],
        "the skipped scheduled restart left the process alone"
    );
    assert_eq!(
        hc_state.iter().map(|(_, s)| s.as_str()).collect::<Vec<_>>(),
        ["health"],
        "a skipped restart is not recorded"
    );
    let hc_health = gap(hc[at[0]].at, hc[at[5]].at);
    let hc_cron = gap(hc[at[0]].at, hc[at[7]].at);

    // (1) tunnel-cron: the first scheduled restart, 10 minutes after the start.
    let log = wait_line(&gw, "tunnel-cron", RESTARTED, 1, Duration::from_secs(30));
    let cron_state = state_lines(&gw, "tunnel-cron");
    let cron1 = gw.pid_of("sleep 3601").expect("tunnel-cron running");
    let cr = lines_of(&log, "tunnel-cron");
    let at = in_order(
        &cr,
        0,
        &[
            "service started",
            "=== Cron Restart Triggered: tunnel-cron ===",
            ALLOWED,
            "service stopped",
            "service started",
            RESTARTED,
        ],
    );
    assert_eq!(field(&cr[at[2]].text, "source").as_deref(), Some("cron"));
    assert_ne!(cron1, cron0, "the scheduled restart replaced the process");
    assert_eq!(started_pids(&cr), [cron0, cron1]);
    assert_eq!(
        cron_state
            .iter()
            .map(|(_, s)| s.as_str())
            .collect::<Vec<_>>(),
        ["cron"]
    );
    wait_counters(&gw, "tunnel-cron", (1, 1));
    let first_cron = gap(cr[at[0]].at, cr[at[1]].at);
    assert!(
        (first_cron - PERIOD_SECS).abs() < 0.5,
        "first scheduled restart {first_cron:.3}s after the start, want {PERIOD_SECS}s"
    );

    // (3) tunnel-cron: five scheduled restarts in the hour, the sixth DENIED.
    let log = wait_line(&gw, "tunnel-cron", DENIED, 1, Duration::from_secs(60));
    let cron_now = gw.pid_of("sleep 3601").expect("tunnel-cron still running");
    let cron_state = state_lines(&gw, "tunnel-cron");
    let cr = lines_of(&log, "tunnel-cron");
    let denied_at = find(&cr, 0, DENIED).expect("denied line");
    let before = &cr[..denied_at];
    assert_eq!(
        count(before, RESTARTED),
        5,
        "five restarts before the denial"
    );
    assert_eq!(count(before, ALLOWED), 5);
    let sixth = before
        .iter()
        .rposition(|l| l.text.contains(TRIGGERED))
        .expect("a trigger before the denial");
    let at = in_order(&cr, sixth, &[TRIGGERED, DENIED, ACTION, PROTECTED]);
    assert_eq!(at[1], denied_at);
    assert_eq!(count(&cr[sixth..at[3]], ALLOWED), 0);
    let pids = started_pids(&cr);
    assert_eq!(pids.len(), 6, "the first start and five restarts: {pids:?}");
    assert_eq!(
        pids.last(),
        Some(&cron_now),
        "the denied restart left the process alone"
    );
    assert!(
        cron_state.len() == 5 && cron_state.iter().all(|(_, s)| s == "cron"),
        "five `<ts> cron` lines: {cron_state:?}"
    );
    wait_counters(&gw, "tunnel-cron", (5, 5));
    let status = wait_for("tunnel-cron fatal", Duration::from_secs(5), || {
        gw.status(&etcd, "services/tunnel-cron/status")
            .filter(|s| s.starts_with("fatal "))
    });

    // tunnel-hc's probe kept failing: its health restarts (every ~9 minutes) and the
    // scheduled ones the cooldown let through share the one budget, used up as well.
    let hc = lines_of(&log, "tunnel-hc");
    let hc_state = state_lines(&gw, "tunnel-hc");
    assert!(count(&hc, DENIED) >= 1, "tunnel-hc's budget is used up too");
    assert_eq!(hc_state.len(), 5, "{hc_state:?}");
    assert!(
        hc_state.iter().all(|(_, s)| s == "health" || s == "cron")
            && hc_state.iter().filter(|(_, s)| s == "health").count() >= 3,
        "{hc_state:?}"
    );

    // Timings: the timer every 10 minutes (6 s), the restarts 600 s of supervision time
    // apart in the state file (the scaled clock agrees with the scaled timer).
    let triggers: Vec<f64> = cr
        .iter()
        .filter(|l| l.text.contains(TRIGGERED))
        .map(|l| l.at)
        .collect();
    assert_eq!(triggers.len(), 6, "six triggers up to the denial");
    let gaps: Vec<f64> = triggers.windows(2).map(|w| gap(w[0], w[1])).collect();
    for g in &gaps {
        assert!(
            (g - PERIOD_SECS).abs() < 0.5,
            "triggers {gaps:?} s apart, want {PERIOD_SECS}"
        );
    }
    let recorded: Vec<u64> = cron_state.windows(2).map(|w| w[1].0 - w[0].0).collect();
    for r in &recorded {
        assert!(
            (595..=610).contains(r),
            "restarts {recorded:?} s of supervision time apart, want 600"
        );
    }
    let denial = gap(cr[0].at, cr[denied_at].at);

    // The decisions as logged (shown with --nocapture).
    for svc in ["tunnel-hc", "tunnel-cron"] {
        for l in lines_of(&gw.run_log(), svc) {
            if l.text.contains("Restart") || l.text.contains("ACTION") {
                eprintln!("{}", l.text);
            }
        }
    }
    let st = gw.terminate(Duration::from_secs(20));
    assert!(st.success(), "meduza exited with {st}");
    assert_eq!(gw.procs(), vec![], "no process left in the namespace");
    eprintln!(
        "tunnel-hc: health restart {hc_health:.2}s after start, scheduled trigger \
         {hc_cron:.2}s, skipped: {ago}s ago by {by}, wait {wait}s more\n\
         tunnel-cron: first trigger {first_cron:.2}s after start, triggers {gaps:.2?}s \
         apart, recorded {recorded:?}s apart (supervision time), denied {denial:.2}s \
         after start, status {status:?}\n\
         done after {:.1}s",
        t0.elapsed().as_secs_f64()
    );
}
