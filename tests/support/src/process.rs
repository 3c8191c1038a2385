//! Starting meduza (and other programs) as a child of a test: the log file every
//! test reads after a failure, the command line of `meduza run` on the loopback and
//! of `meduza fleet serve` in a namespace, whose common part each test used to write
//! out again, stopping a child with SIGTERM, and a WireGuard key pair from `wg`.
//! Must not: wait for readiness or assert; the tests do, each for what it checks.

use crate::pki::Ca;
use crate::ports::unique_free_port;
use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Starts `cmd` with no stdin, and its stdout and stderr in a new file `log`.
pub fn spawn_logged(cmd: &mut Command, log: &Path) -> Child {
    let out =
        std::fs::File::create(log).unwrap_or_else(|e| panic!("create log {}: {e}", log.display()));
    let err = out.try_clone().expect("log fd");
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_args().collect::<Vec<_>>()))
}

/// Sends SIGTERM to `child` and waits for its exit; kills it and panics when it has
/// not exited within `timeout`.
pub fn terminate(mut child: Child, timeout: Duration) -> ExitStatus {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return st;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("pid {pid} did not exit within {timeout:?} of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `meduza run` as node `node` of the etcd at `endpoint`, on the loopback: its root
/// and state under `dir`, a DNS listener on a free port, the data plane off, info
/// logs. With `clean_env` it inherits nothing but `PATH`. The caller adds the rest
/// (API listener, credentials, tools) and starts it.
pub fn meduza_run(node: &str, endpoint: &str, dir: &Path, clean_env: bool) -> Command {
    let mut cmd = Command::new(crate::meduza_bin());
    cmd.arg("run");
    if clean_env {
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    }
    cmd.env("NODE_ID", node)
        .env("ETCD_ENDPOINTS", endpoint)
        .env("MEDUZA_ROOT", dir.join("root"))
        .env("MEDUZA_STATE_DIR", dir.join("state"))
        .env(
            "MEDUZA_DNS_LISTEN",
            format!("127.0.0.1:{}", unique_free_port()),
        )
        .env("MEDUZA_DATAPLANE", "off")
        .env("MEDUZA_LOG", "info");
    cmd
}

/// `meduza fleet serve` inside namespace `hub`: etcd at `etcd`, the page on HTTPS at
/// `listen` with the certificate `page` (certificate, key), nodes trusted when `ca`
/// signed them, the admin token `admin_token`, a 3 s node timeout. The caller adds
/// its own flags and log filter and starts it.
pub fn fleet_serve(
    hub: &str,
    etcd: &str,
    listen: &str,
    page: (&Path, &Path),
    ca: &Ca,
    admin_token: &str,
) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", hub])
        .arg(crate::meduza_bin())
        .args(["--etcd-endpoints", etcd, "fleet", "serve"])
        .args(["--listen", listen, "--timeout", "3"])
        .arg("--tls-cert")
        .arg(page.0)
        .arg("--tls-key")
        .arg(page.1)
        .arg("--node-ca")
        .arg(&ca.cert)
        .env("MEDUZA_FLEET_TOKEN", admin_token);
    cmd
}

/// A WireGuard key pair (private, public) from `wg genkey` and `wg pubkey`.
pub fn wg_keypair() -> (String, String) {
    let out = Command::new("wg")
        .arg("genkey")
        .output()
        .expect("wg must be installed (scripts/install-deps)");
    assert!(out.status.success(), "wg genkey failed");
    let private = String::from_utf8(out.stdout)
        .expect("key")
        .trim()
        .to_string();
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("wg pubkey");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(private.as_bytes())
        .expect("write the private key");
    let out = child.wait_with_output().expect("wg pubkey");
    let public = String::from_utf8(out.stdout)
        .expect("key")
        .trim()
        .to_string();
    (private, public)
}
