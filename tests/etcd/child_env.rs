//! No secret in a child's environment (issue 13, item 5): the real `meduza run`,
//! started with etcd user and password (against a real etcd with auth enabled), a
//! fleet token and an unrelated variable in its environment, runs two tunnels (one of
//! them a shell with a child of its own) and FRR. Every process below meduza is found
//! by walking `/proc` for the parent pid, recursively, and its `/proc/<pid>/environ`
//! must hold none of those secrets, no `ETCD_*`, and (for meduza's own children) only
//! the documented allowlist (`supervise::spawn::CHILD_ENV` plus a service's
//! `HOME`/`USER`), while meduza still authenticates, applies each commit and publishes
//! `applied`.
//!
//! The short-lived programs meduza runs itself rather than as services, `vtysh` and
//! `frr-reload.py`, are stand-ins (FRR's daemons too, through the `MEDUZA_FRR_DIR`
//! knob): each copies its own `/proc/$$/environ` into a file before answering, so the
//! same checks apply to them. Needs root (the supervisor drops capabilities) and etcd;
//! a missing one fails the test.

use meduza::supervise::spawn::CHILD_PATH;
use meduza_test_support::etcd::TestEtcd;
use meduza_test_support::ports::unique_free_port;
use meduza_test_support::process;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

const NODE: &str = "envgw";
const USER: &str = "meduza-envgw";
/// Distinctive values: any of them in a child's environment is a leak.
const PASS: &str = "Pw-child-env-7f3a9c1e5b";
const FLEET_TOKEN: &str = "fleet-token-child-env-4b2d8e";
const API_TOKEN: &str = "api-token-child-env-0123456789";
const INHERITED: &str = "inherited-child-env-91c3";

/// `meduza run`; SIGTERM (then SIGKILL) on drop.
struct Meduza {
    child: Option<Child>,
    log: PathBuf,
}

impl Meduza {
    fn pid(&self) -> u32 {
        self.child.as_ref().expect("meduza running").id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let mut tail: Vec<&str> = log.lines().rev().take(40).collect();
        tail.reverse();
        tail.join("\n")
    }

    /// SIGTERM and wait for the exit.
    fn terminate(&mut self, timeout: Duration) -> std::process::ExitStatus {
        process::terminate(self.child.take().expect("meduza running"), timeout)
    }
}

impl Drop for Meduza {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // Children first: once meduza is gone they would be orphans of init.
        for pid in descendants(child.id()) {
            signal(pid, nix::sys::signal::Signal::SIGKILL);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid"));
    let _ = nix::sys::signal::kill(pid, sig);
}

/// The parent pid from `/proc/<pid>/stat` (the command name may hold spaces and
/// parentheses: the fields after it follow the last `)`).
fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Every live process below `root` (children, their children, ...).
fn descendants(root: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, ppid(pid)?)))
        .collect();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    found.remove(0);
    found
}

/// NUL-separated fields of a `/proc/<pid>/` file; `None` once the process is gone.
fn proc_fields(pid: u32, file: &str) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/{file}")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|f| !f.is_empty())
            .map(|f| String::from_utf8_lossy(f).into_owned())
            .collect(),
    )
}

fn wait_for<T>(
    what: &str,
    timeout: Duration,
    meduza: &Meduza,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}; meduza log tail:\n{}",
            meduza.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn status(etcd: &TestEtcd, key: &str) -> Option<String> {
    let out = etcd.etcdctl(&[
        "get",
        &format!("/updated/{NODE}/{key}"),
        "--print-value-only",
    ]);
    let v = out.trim_end_matches('\n');
    (!v.is_empty()).then(|| v.to_string())
}

fn mod_revision(etcd: &TestEtcd, key: &str) -> i64 {
    let out = etcd.etcdctl(&["get", key, "-w", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("etcdctl json");
    v["kvs"][0]["mod_revision"].as_i64().expect("mod_revision")
}

fn tunnel(etcd: &TestEtcd, name: &str, command: &str, args: &str) {
    let p = format!("/nodes/{NODE}/tunnels/{name}");
    etcd.put(&format!("{p}/enable"), "true");
    etcd.put(&format!("{p}/kind"), "generic");
    etcd.put(&format!("{p}/command"), command);
    // `--`: the value may start with a dash.
    etcd.etcdctl(&["put", "--", &format!("{p}/args"), args]);
}

fn write_script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(path.parent().expect("parent")).expect("script dir");
    std::fs::write(path, format!("#!/bin/sh\n{body}")).expect("write script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// FRR stand-ins under `dir`: the four daemons (a long sleep each), `vtysh` and
/// `frr-reload.py`. Each records the environment meduza started it with in
/// `dir/environ/<name>.<pid>` (`/proc/$$/environ` of the shell running the script).
fn fake_frr(dir: &Path) {
    let record = |name: &str| {
        format!(
            "/bin/cat /proc/$$/environ > '{}/environ/{name}.'$$\n",
            dir.display()
        )
    };
    std::fs::create_dir_all(dir.join("environ")).expect("environ dir");
    for (i, daemon) in ["zebra", "staticd", "bgpd", "ospfd"].iter().enumerate() {
        write_script(
            &dir.join("frr").join(daemon),
            &format!("{}exec /bin/sleep {}\n", record(daemon), 3620 + i),
        );
    }
    write_script(
        &dir.join("bin/vtysh"),
        &format!(
            "{}case \"$*\" in *'show daemons'*) echo 'zebra staticd bgpd ospfd' ;; esac\n",
            record("vtysh")
        ),
    );
    write_script(&dir.join("bin/frr-reload.py"), &record("frr-reload"));
}

/// The environments the stand-ins recorded: (file name, variables).
fn recorded(dir: &Path) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = std::fs::read_dir(dir.join("environ"))
        .expect("environ dir")
        .filter_map(|e| {
            let e = e.ok()?;
            let raw = std::fs::read(e.path()).ok()?;
            let vars = raw
                .split(|b| *b == 0)
                .filter(|f| !f.is_empty())
                .map(|f| String::from_utf8_lossy(f).into_owned())
                .collect();
            Some((e.file_name().to_string_lossy().into_owned(), vars))
        })
        .collect();
    out.sort();
    out
}

fn start_meduza(etcd: &TestEtcd, dir: &Path) -> Meduza {
    let log = dir.join("meduza.log");
    let mut cmd = process::meduza_run(NODE, &etcd.endpoint(), dir, true);
    cmd.env("ETCD_USER", USER)
        .env("ETCD_PASS", PASS)
        .env("MEDUZA_FLEET_TOKEN", FLEET_TOKEN)
        .env("MEDUZA_TEST_INHERITED", INHERITED)
        .env(
            "MEDUZA_API_LISTEN",
            format!("127.0.0.1:{}", unique_free_port()),
        )
        .env("MEDUZA_LEASE_TTL", "5")
        .env("MEDUZA_FRR_DIR", dir.join("frr"))
        .env("MEDUZA_BIN_VTYSH", dir.join("bin/vtysh"))
        .env("MEDUZA_BIN_FRR_RELOAD", dir.join("bin/frr-reload.py"));
    let child = process::spawn_logged(&mut cmd, &log);
    Meduza {
        child: Some(child),
        log,
    }
}

/// Checks one child's environment; `direct`: started by meduza itself (then only the
/// allowlist may be there; deeper processes may carry what their parent added, as a
/// shell exports `PWD`).
fn check_environ(who: &str, environ: &[String], direct: bool, secrets: &[&str]) {
    let allowed: BTreeSet<&str> = ["PATH", "HOME", "USER"].into();
    for var in environ {
        for secret in secrets {
            assert!(
                !var.contains(secret),
                "{who} has a secret in its environment: {var}"
            );
        }
        let name = var.split('=').next().unwrap_or_default();
        assert!(!name.starts_with("ETCD_"), "{who} has {var}");
        assert!(
            allowed.contains(name) || !direct,
            "{who}: {name} is not in the allowlist; environment {environ:?}"
        );
    }
    assert!(
        environ.contains(&format!("PATH={CHILD_PATH}")),
        "{who}: {environ:?}"
    );
}

fn commit(etcd: &TestEtcd, value: &str) -> i64 {
    etcd.put("/commit", value);
    mod_revision(etcd, "/commit")
}

fn wait_applied(etcd: &TestEtcd, meduza: &Meduza, rev: i64) {
    wait_for(
        &format!("applied {rev} published"),
        Duration::from_secs(30),
        meduza,
        || {
            let applied = status(etcd, "applied")?;
            let r: i64 = applied.split_whitespace().next()?.parse().ok()?;
            (r >= rev).then_some(())
        },
    );
}

#[test]
fn children_of_a_gateway_with_etcd_credentials_hold_no_secret() {
    let mut etcd = TestEtcd::start();
    etcd.enable_auth(USER, PASS);
    etcd.put(&format!("/nodes/{NODE}/api/token"), API_TOKEN);
    // A shell with a child of its own (the walk must go below meduza's children), and
    // a plain program.
    tunnel(&etcd, "ta", "/bin/sh", "-c\n/bin/sleep 3611 & wait");
    tunnel(&etcd, "tb", "/bin/sleep", "3612");
    // FRR (stand-ins): vtysh loads the config once the daemons run.
    etcd.put(&format!("/nodes/{NODE}/bgp/enable"), "true");
    etcd.put(&format!("/nodes/{NODE}/bgp/asn"), "65001");
    etcd.put(&format!("/nodes/{NODE}/bgp/router_id"), "10.99.0.1");
    let rev = commit(&etcd, "child-env-1");

    let dir = tempfile::Builder::new()
        .prefix("meduza-child-env-")
        .tempdir()
        .expect("temp dir");
    fake_frr(dir.path());
    let mut meduza = start_meduza(&etcd, dir.path());
    let pid = meduza.pid();

    // meduza itself got the credentials (else this test proves nothing) and used them:
    // with auth enabled nothing is read or published without them.
    let own = wait_for(
        "meduza's environment",
        Duration::from_secs(5),
        &meduza,
        || proc_fields(pid, "environ").filter(|e| !e.is_empty()),
    );
    assert!(own.contains(&format!("ETCD_PASS={PASS}")), "{own:?}");
    wait_applied(&etcd, &meduza, rev);
    for svc in ["tunnel-ta", "tunnel-tb", "frr-zebra", "frr-bgpd"] {
        wait_for(svc, Duration::from_secs(10), &meduza, || {
            status(&etcd, &format!("services/{svc}/status")).filter(|s| s.starts_with("running"))
        });
    }
    wait_for("vtysh -f", Duration::from_secs(20), &meduza, || {
        meduza.log().contains("frr config loaded").then_some(())
    });
    // A changed frr.conf goes through frr-reload.py.
    etcd.put(&format!("/nodes/{NODE}/bgp/router_id"), "10.99.0.2");
    let rev = commit(&etcd, "child-env-2");
    wait_applied(&etcd, &meduza, rev);
    wait_for("frr-reload.py", Duration::from_secs(20), &meduza, || {
        meduza
            .log()
            .contains("frr-reload.py applied the diff")
            .then_some(())
    });

    let procs = wait_for(
        "every sleep below meduza",
        Duration::from_secs(10),
        &meduza,
        || {
            let procs: Vec<(u32, String)> = descendants(pid)
                .into_iter()
                .filter_map(|p| Some((p, proc_fields(p, "cmdline")?.join(" "))))
                .collect();
            let has = |n: &str| procs.iter().any(|(_, c)| c == n);
            let all = ["3611", "3612", "3620", "3621", "3622", "3623"]
                .iter()
                .all(|n| has(&format!("/bin/sleep {n}")));
            all.then_some(procs)
        },
    );
    let grandchild = procs
        .iter()
        .find(|(_, c)| c == "/bin/sleep 3611")
        .map(|(p, _)| *p)
        .expect("sleep 3611");
    assert_ne!(ppid(grandchild), Some(pid), "sleep 3611 is a grandchild");

    let clash_secret = std::fs::read_to_string(dir.path().join("state/clash-secret"))
        .expect("generated clash secret")
        .trim()
        .to_string();
    let secrets = [
        PASS,
        FLEET_TOKEN,
        API_TOKEN,
        INHERITED,
        clash_secret.as_str(),
    ];
    let mut checked = 0;
    for (child, cmdline) in &procs {
        let Some(environ) = proc_fields(*child, "environ") else {
            continue; // exited meanwhile
        };
        checked += 1;
        // The FRR stand-ins exec their sleep from a shell, which exports PWD; what
        // meduza handed them is in their records, checked below.
        let stand_in = cmdline.starts_with("/bin/sleep 362");
        let direct = ppid(*child) == Some(pid) && !stand_in;
        check_environ(
            &format!("pid {child} ({cmdline})"),
            &environ,
            direct,
            &secrets,
        );
    }
    assert!(checked >= 7, "checked {checked} processes: {procs:?}");
    let records = recorded(dir.path());
    for (name, environ) in &records {
        check_environ(name, environ, true, &secrets);
    }
    let ran = |p: &str| records.iter().filter(|(n, _)| n.starts_with(p)).count();
    assert!(ran("vtysh.") >= 2, "vtysh show daemons and -f: {records:?}");
    assert!(ran("frr-reload.") >= 1, "frr-reload.py: {records:?}");
    assert!(
        ran("zebra.") >= 1 && ran("bgpd.") >= 1,
        "daemons: {records:?}"
    );
    eprintln!(
        "{checked} processes below meduza and {} recorded environments checked: {procs:?}",
        records.len()
    );

    // And nothing of it in meduza's log either.
    assert!(!meduza.log().contains(PASS), "the password is in the log");

    let st = meduza.terminate(Duration::from_secs(20));
    assert!(st.success(), "meduza exited with {st}");
    assert_eq!(descendants(pid), Vec::<u32>::new(), "children left behind");
}
