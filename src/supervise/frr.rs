//! FRR under meduza: its daemons as supervised services and the reload of a changed
//! `frr.conf` (DESIGN §5: `frr-reload.py`, falling back to `vtysh -f`).
//!
//! Owns: the argv of zebra/staticd/bgpd/ospfd (foreground, logging to stdout so the
//! supervisor captures `[zebra] ...` lines), loading the integrated config into freshly
//! started daemons, and the diff reload. Must not: render the config (generators) or
//! decide whether FRR runs (the reconciler).
//!
//! meduza supervises the FRR daemons directly instead of running `watchfrr`: one
//! supervisor with one restart policy and one status tree, and a daemon crash is seen
//! at once. After any daemon (re)start the whole config is pushed again with
//! `vtysh -f`, because FRR daemons start empty in integrated-config mode.
//!
//! `vtysh -f` only adds: a line the new config no longer has (a `match as-path` of a
//! `no_transit` turned off, a `neighbor ... weight`) stays in the running daemons. So
//! the fallback first undoes, with `no <line>` inside its contexts, every line of the
//! config it last pushed that the new one lacks (`undo_script`), as
//! `frr-reload.py` would, then pushes the new config (tests/gateway/frr_policy.rs shows a
//! policy turned off through the fallback taking effect).

use super::config::FrrReloader;
use super::spawn::clean_command;
use futures::future::BoxFuture;
use meduza_generators::plan::service::{ReloadStrategy, ServiceSpec};
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

/// The integrated config inside the root (the generator that writes it owns the path).
pub use meduza_generators::gen::frr::FRR_CONF;

/// The FRR daemons meduza supervises (as services `frr-<name>`).
pub const DAEMONS: [&str; 4] = ["zebra", "staticd", "bgpd", "ospfd"];

/// Capabilities FRR's daemons start with.
const FRR_CAPS: [&str; 10] = [
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_NET_BIND_SERVICE",
    "CAP_SETUID",
    "CAP_SETGID",
    "CAP_SYS_ADMIN",
    "CAP_DAC_OVERRIDE",
    "CAP_CHOWN",
    "CAP_FOWNER",
    "CAP_KILL",
];

/// Where FRR's programs are and how they are addressed.
#[derive(Debug, Clone)]
pub struct FrrControl {
    /// Directory of zebra, bgpd, ... (`MEDUZA_FRR_DIR`, default `/usr/lib/frr`).
    pub daemon_dir: PathBuf,
    /// `MEDUZA_BIN_VTYSH` (default `vtysh`).
    pub vtysh: String,
    /// `MEDUZA_BIN_FRR_RELOAD` (default `/usr/lib/frr/frr-reload.py`).
    pub frr_reload: String,
    /// FRR pathspace (`-N`), so several gateways can share one machine in tests
    /// (`MEDUZA_FRR_PATHSPACE`); `None` on a gateway.
    pub pathspace: Option<String>,
    /// Host path of `frr.conf` (`MEDUZA_ROOT` + [`FRR_CONF`]).
    pub conf_path: PathBuf,
    /// The `frr.conf` text last pushed into the daemons: what the `vtysh -f`
    /// fallback must undo where the new config differs.
    last_pushed: Arc<Mutex<Option<String>>>,
}

impl FrrControl {
    /// `vtysh` and `frr_reload` are the resolved settings (`MEDUZA_BIN_VTYSH`,
    /// `MEDUZA_BIN_FRR_RELOAD`, handed down from `main`); `None` keeps the defaults.
    /// The daemon directory and the pathspace are test knobs, read here.
    pub fn new(root: &Path, vtysh: Option<&Path>, frr_reload: Option<&Path>) -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let path = |p: &Path| p.display().to_string();
        Self {
            daemon_dir: var("MEDUZA_FRR_DIR")
                .unwrap_or_else(|| "/usr/lib/frr".into())
                .into(),
            vtysh: vtysh.map_or_else(|| "vtysh".into(), path),
            frr_reload: frr_reload.map_or_else(|| "/usr/lib/frr/frr-reload.py".into(), path),
            pathspace: var("MEDUZA_FRR_PATHSPACE"),
            conf_path: root.join(FRR_CONF.trim_start_matches('/')),
            last_pushed: Arc::default(),
        }
    }

    fn set_pushed(&self, text: Option<String>) {
        if let Ok(mut last) = self.last_pushed.lock() {
            *last = text;
        }
    }

    fn pushed(&self) -> Option<String> {
        self.last_pushed.lock().ok().and_then(|l| l.clone())
    }

    fn pathspace_args(&self) -> Vec<String> {
        match &self.pathspace {
            Some(ns) => vec!["-N".into(), ns.clone()],
            None => Vec::new(),
        }
    }

    /// Service specs of the FRR daemons. zebra carries the config file and the
    /// `FrrReload` strategy, so one changed `frr.conf` means one reload.
    pub fn specs(&self) -> Vec<ServiceSpec> {
        let mut out = Vec::new();
        for name in DAEMONS {
            let mut argv = vec![self.daemon_dir.join(name).display().to_string()];
            argv.extend([
                "--log".into(),
                "stdout".into(),
                "-A".into(),
                "127.0.0.1".into(),
            ]);
            argv.extend(self.pathspace_args());
            let mut spec = ServiceSpec::new(format!("frr-{name}"), argv);
            // The daemons start as root and drop to user frr themselves (setgroups,
            // setuid), creating their run/tmp directories first; they keep what they
            // need (bgpd: port 179; zebra: routes). Everything else is dropped.
            spec.caps = FRR_CAPS.iter().map(|c| (*c).to_string()).collect();
            if name != "zebra" {
                spec.after = vec!["frr-zebra".into()];
            } else {
                spec.config_files = vec![FRR_CONF.into()];
                spec.reload = ReloadStrategy::FrrReload;
            }
            out.push(spec);
        }
        out
    }

    async fn vtysh(&self, args: &[&str]) -> Result<String, String> {
        let out = clean_command(&self.vtysh)
            .args(self.pathspace_args())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| format!("{}: {e}", self.vtysh))?;
        output_text(&format!("vtysh {args:?}"), &out)
    }

    /// Wait (up to `timeout`) until vtysh reaches every daemon, then push the whole
    /// config with `vtysh -f`.
    ///
    /// `vtysh -f` silently skips a daemon whose vty socket is not up yet (it only
    /// talks to the daemons it could connect to), so "vtysh answers" is not enough:
    /// `show daemons` must list all of them, else bgpd would start without its config.
    pub async fn load(&self, timeout: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let listed = self
                .vtysh(&["-c", "show daemons"])
                .await
                .unwrap_or_default();
            let up: Vec<&str> = listed.split_whitespace().collect();
            if DAEMONS.iter().all(|d| up.contains(d)) {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "FRR daemons did not all answer vtysh (connected: {})",
                    up.join(" ")
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let conf = self.conf_path.display().to_string();
        let text = tokio::fs::read_to_string(&self.conf_path).await.ok();
        self.vtysh(&["-f", &conf]).await.map(|_| ())?;
        self.set_pushed(text);
        info!(conf = %conf, "frr config loaded");
        Ok(())
    }

    /// `vtysh -f /dev/stdin` with `script` on its standard input.
    async fn vtysh_script(&self, script: &str) -> Result<String, String> {
        let mut child = clean_command(&self.vtysh)
            .args(self.pathspace_args())
            .args(["-f", "/dev/stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{}: {e}", self.vtysh))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .await
                .map_err(|e| format!("{}: stdin: {e}", self.vtysh))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| format!("{}: {e}", self.vtysh))?;
        output_text("vtysh -f", &out)
    }

    /// The fallback reload: undo the lines of the last pushed config that `text`
    /// lacks, then push the whole file with `vtysh -f`.
    async fn reload_by_vtysh(&self, conf: &str, text: Option<String>) -> Result<(), String> {
        if let (Some(old), Some(new)) = (self.pushed(), text.as_deref()) {
            let undo = undo_script(&old, new);
            if !undo.is_empty() {
                // A `no` FRR refuses leaves that line running: say so, but still push
                // the new config, which is right in every other line.
                match self.vtysh_script(&undo).await {
                    Ok(_) => info!(undo = %undo.trim(), "vtysh fallback: removed lines undone"),
                    Err(err) => {
                        warn!(%err, undo = %undo.trim(), "vtysh fallback: some removed lines could not be undone")
                    }
                }
            }
        }
        self.vtysh(&["-f", conf]).await.map(|_| ())?;
        self.set_pushed(text);
        Ok(())
    }

    /// `frr-reload.py --reload`, falling back to `vtysh -f` when it fails.
    pub async fn reload_diff(&self) -> Result<(), String> {
        let conf = self.conf_path.display().to_string();
        let mut cmd = clean_command(&self.frr_reload);
        cmd.arg("--reload").arg("--stdout");
        if let Some(ns) = &self.pathspace {
            cmd.args(["--pathspace", ns]);
        }
        let vtysh_dir = Path::new(&self.vtysh)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(|p| p.display().to_string());
        if let Some(dir) = vtysh_dir {
            cmd.args(["--bindir", &dir]);
        }
        cmd.arg(&conf).stdin(Stdio::null());
        // Read before the reload: what the daemons get is what the fallback must
        // later diff against.
        let text = tokio::fs::read_to_string(&self.conf_path).await.ok();
        match cmd.output().await {
            Ok(out) if out.status.success() => {
                info!(conf = %conf, "frr-reload.py applied the diff");
                self.set_pushed(text);
                Ok(())
            }
            Ok(out) => {
                warn!(status = %out.status, stderr = %String::from_utf8_lossy(&out.stderr).trim(), "frr-reload.py failed; falling back to vtysh -f");
                self.reload_by_vtysh(&conf, text).await
            }
            Err(err) => {
                warn!(%err, "frr-reload.py not runnable; falling back to vtysh -f");
                self.reload_by_vtysh(&conf, text).await
            }
        }
    }
}

/// One line of an FRR config with the headers of the contexts it sits in (outermost
/// first), e.g. `(["router bgp 65001", "address-family ipv4 unicast"],
/// "neighbor 10.0.0.2 weight 100")`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ConfLine {
    ctx: Vec<String>,
    line: String,
    /// The line opens a context (`router bgp`, `route-map ...`, `interface ...`).
    header: bool,
}

/// The lines of an integrated config as FRR writes it (and as meduza generates it):
/// a context's lines are indented one step deeper than its header, and `exit` /
/// `exit-address-family` close it. `!` comments and `end` carry nothing.
fn conf_lines(text: &str) -> Vec<ConfLine> {
    let sig: Vec<(usize, &str)> = text
        .lines()
        .map(|l| (l.len() - l.trim_start().len(), l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('!') && *l != "end")
        .collect();
    let is_exit = |l: &str| l == "exit" || l.starts_with("exit-");
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut out = Vec::new();
    for (i, &(indent, line)) in sig.iter().enumerate() {
        if is_exit(line) {
            stack.pop();
            continue;
        }
        while stack.last().is_some_and(|(d, _)| *d >= indent) {
            stack.pop();
        }
        // A header is followed by deeper lines, or directly by its own `exit` (an
        // empty `route-map X permit 10`).
        let header = sig
            .get(i + 1)
            .is_some_and(|&(next, l)| next > indent || (next == indent && is_exit(l)));
        out.push(ConfLine {
            ctx: stack.iter().map(|(_, h)| h.clone()).collect(),
            line: line.to_string(),
            header,
        });
        if header {
            stack.push((indent, line.to_string()));
        }
    }
    out
}

/// The `vtysh` script that removes from running daemons, loaded with `old`, what
/// `new` no longer has: `no <line>` inside the line's contexts (`<line>` for a line
/// that starts with `no`). A removed `router ...` or `route-map ...` context goes
/// with `no <header>`, a removed neighbor with `no neighbor X remote-as ...`; other
/// contexts (`interface`, `address-family`) cannot be removed whole, so their lines
/// are undone one by one. Lines kept in `new` are not touched, so sessions and
/// adjacencies they carry stay up. Empty when nothing was removed.
fn undo_script(old: &str, new: &str) -> String {
    let keep: BTreeSet<(Vec<String>, String)> = conf_lines(new)
        .into_iter()
        .map(|c| (c.ctx, c.line))
        .collect();
    let removed: Vec<ConfLine> = conf_lines(old)
        .into_iter()
        .filter(|c| !keep.contains(&(c.ctx.clone(), c.line.clone())))
        .collect();
    let whole = |c: &ConfLine| {
        c.header && (c.line.starts_with("router ") || c.line.starts_with("route-map "))
    };
    let gone_ctx: Vec<Vec<String>> = removed
        .iter()
        .filter(|c| whole(c))
        .map(|c| {
            let mut p = c.ctx.clone();
            p.push(c.line.clone());
            p
        })
        .collect();
    // (router context, "neighbor X ") of neighbors removed whole.
    let gone_nbr: Vec<(String, String)> = removed
        .iter()
        .filter_map(|c| {
            let w: Vec<&str> = c.line.split_whitespace().collect();
            match (c.ctx.first(), w.as_slice()) {
                (Some(router), ["neighbor", ip, "remote-as", _]) => {
                    Some((router.clone(), format!("neighbor {ip} ")))
                }
                _ => None,
            }
        })
        .collect();
    let mut s = String::new();
    for c in &removed {
        if c.header && !whole(c) {
            continue;
        }
        if gone_ctx.iter().any(|p| c.ctx.starts_with(p)) {
            continue;
        }
        // The version and defaults lines cannot be negated, and `service
        // integrated-vtysh-config` is vtysh's own (never dropped by meduza).
        if ["frr ", "service ", "hostname "]
            .iter()
            .any(|p| c.line.starts_with(p))
        {
            continue;
        }
        let nbr_gone = gone_nbr.iter().any(|(router, nbr)| {
            c.ctx.first() == Some(router)
                && c.line.starts_with(nbr.as_str())
                && !c.line.contains(" remote-as ")
        });
        if nbr_gone {
            continue;
        }
        for (depth, h) in c.ctx.iter().enumerate() {
            let _ = writeln!(s, "{}{h}", " ".repeat(depth));
        }
        let neg = match c.line.strip_prefix("no ") {
            Some(rest) => rest.to_string(),
            None => format!("no {}", c.line),
        };
        let _ = writeln!(s, "{}{neg}", " ".repeat(c.ctx.len()));
        for (depth, h) in c.ctx.iter().enumerate().rev() {
            let exit = if h.starts_with("address-family") {
                "exit-address-family"
            } else {
                "exit"
            };
            let _ = writeln!(s, "{}{exit}", " ".repeat(depth));
        }
    }
    s
}

impl FrrReloader for FrrControl {
    fn reload<'a>(
        &'a self,
        _spec: &'a ServiceSpec,
        _changed: &'a [String],
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(self.reload_diff())
    }
}

/// A finished vtysh's stdout and stderr: the text on success, else an error naming
/// `what` with its exit status.
fn output_text(what: &str, out: &std::process::Output) -> Result<String, String> {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{what} exited {}: {}", out.status, text.trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zebra_carries_the_config_and_others_start_after_it() {
        let c = FrrControl {
            daemon_dir: "/usr/lib/frr".into(),
            vtysh: "vtysh".into(),
            frr_reload: "frr-reload.py".into(),
            pathspace: Some("gw1".into()),
            conf_path: "/tmp/r/etc/frr/frr.conf".into(),
            last_pushed: Arc::default(),
        };
        let specs = c.specs();
        assert_eq!(specs[0].name, "frr-zebra");
        assert_eq!(specs[0].reload, ReloadStrategy::FrrReload);
        assert_eq!(specs[0].config_files, vec![FRR_CONF.to_string()]);
        assert!(specs[0].argv.windows(2).any(|w| w == ["-N", "gw1"]));
        assert!(specs[1..]
            .iter()
            .all(|s| s.after == vec!["frr-zebra".to_string()] && s.config_files.is_empty()));
    }

    const OLD: &str = "\
frr version 8.4
frr defaults traditional
hostname gw3
service integrated-vtysh-config
!
ip prefix-list MEDUZA-FILTER-IN seq 10 deny 10.81.0.0/24
ip prefix-list MEDUZA-FILTER-IN seq 20 permit 0.0.0.0/0 le 32
!
bgp as-path access-list MEDUZA-NO-TRANSIT seq 10 deny ^.+ .+ .+
bgp as-path access-list MEDUZA-NO-TRANSIT seq 20 permit .*
!
route-map MEDUZA-EBGP-WG-c-IN permit 10
 match ip address prefix-list MEDUZA-FILTER-IN
 match as-path MEDUZA-NO-TRANSIT
 set community 65004:9999 additive
exit
!
route-map MEDUZA-EBGP-WG-c-OUT deny 6
 match community MEDUZA-EBGP-LEARNED
exit
!
route-map MEDUZA-OSPF-TO-BGP permit 10
exit
!
interface tnc0
 no ip ospf passive
exit
!
router bgp 65004
 bgp router-id 10.255.0.4
 neighbor 172.20.3.1 remote-as 65003
 neighbor 172.20.3.1 description wireguard c
 neighbor 172.20.9.1 remote-as 65009
 neighbor 172.20.9.1 update-source wg-x
 !
 address-family ipv4 unicast
  network 10.53.0.0/24
  neighbor 172.20.3.1 activate
  neighbor 172.20.3.1 weight 100
  neighbor 172.20.3.1 route-map MEDUZA-EBGP-WG-c-IN in
  neighbor 172.20.9.1 activate
  neighbor 172.20.9.1 route-map MEDUZA-EBGP-WG-c-IN in
 exit-address-family
exit
!
end
";

    #[test]
    fn conf_lines_carry_their_contexts() {
        let lines = conf_lines(OLD);
        let find = |l: &str| lines.iter().find(|c| c.line == l).expect(l).clone();
        assert_eq!(
            find("neighbor 172.20.3.1 weight 100").ctx,
            ["router bgp 65004", "address-family ipv4 unicast"]
        );
        assert_eq!(
            find("match as-path MEDUZA-NO-TRANSIT").ctx,
            ["route-map MEDUZA-EBGP-WG-c-IN permit 10"]
        );
        assert!(find("route-map MEDUZA-OSPF-TO-BGP permit 10").header);
        assert!(
            find("bgp as-path access-list MEDUZA-NO-TRANSIT seq 20 permit .*")
                .ctx
                .is_empty()
        );
        assert!(find("interface tnc0").header);
        assert!(!find("network 10.53.0.0/24").header);
    }

    #[test]
    fn nothing_to_undo_when_nothing_was_removed() {
        assert_eq!(undo_script(OLD, OLD), "");
        // Added lines are vtysh -f's job.
        let more = OLD.replace(
            "  network 10.53.0.0/24\n",
            "  network 10.53.0.0/24\n  network 10.77.0.0/24\n",
        );
        assert_eq!(undo_script(OLD, &more), "");
    }

    #[test]
    fn removed_lines_are_negated_inside_their_contexts() {
        // no_transit and the weight turned off, the OUT entry of no_forward gone, the
        // interface made passive again.
        let new = OLD
            .replace("bgp as-path access-list MEDUZA-NO-TRANSIT seq 10 deny ^.+ .+ .+\n", "")
            .replace("bgp as-path access-list MEDUZA-NO-TRANSIT seq 20 permit .*\n", "")
            .replace(" match as-path MEDUZA-NO-TRANSIT\n", "")
            .replace("  neighbor 172.20.3.1 weight 100\n", "")
            .replace(
                "route-map MEDUZA-EBGP-WG-c-OUT deny 6\n match community MEDUZA-EBGP-LEARNED\nexit\n",
                "",
            )
            .replace(" no ip ospf passive\n", "");
        assert_eq!(
            undo_script(OLD, &new),
            "\
no bgp as-path access-list MEDUZA-NO-TRANSIT seq 10 deny ^.+ .+ .+
no bgp as-path access-list MEDUZA-NO-TRANSIT seq 20 permit .*
route-map MEDUZA-EBGP-WG-c-IN permit 10
 no match as-path MEDUZA-NO-TRANSIT
exit
no route-map MEDUZA-EBGP-WG-c-OUT deny 6
interface tnc0
 ip ospf passive
exit
router bgp 65004
 address-family ipv4 unicast
  no neighbor 172.20.3.1 weight 100
 exit-address-family
exit
"
        );
    }

    #[test]
    fn a_removed_neighbor_or_router_goes_whole() {
        let new = OLD
            .replace(" neighbor 172.20.9.1 remote-as 65009\n", "")
            .replace(" neighbor 172.20.9.1 update-source wg-x\n", "")
            .replace("  neighbor 172.20.9.1 activate\n", "")
            .replace(
                "  neighbor 172.20.9.1 route-map MEDUZA-EBGP-WG-c-IN in\n",
                "",
            );
        assert_eq!(
            undo_script(OLD, &new),
            "router bgp 65004\n no neighbor 172.20.9.1 remote-as 65009\nexit\n"
        );
        let new = OLD.replace("router bgp 65004", "router bgp 65005");
        assert_eq!(undo_script(OLD, &new), "no router bgp 65004\n");
    }
}
