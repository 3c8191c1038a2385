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

use super::spawn::clean_command;
use super::supervisor::FrrReloader;
use futures::future::BoxFuture;
use meduza_generators::plan::service::{ReloadStrategy, ServiceSpec};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tracing::{info, warn};

/// The integrated config inside the root.
pub const FRR_CONF: &str = "/etc/frr/frr.conf";

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
        }
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
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!(
                "vtysh {args:?} exited {}: {}",
                out.status,
                text.trim()
            ))
        }
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
        self.vtysh(&["-f", &conf]).await.map(|_| ())?;
        info!(conf = %conf, "frr config loaded");
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
        match cmd.output().await {
            Ok(out) if out.status.success() => {
                info!(conf = %conf, "frr-reload.py applied the diff");
                Ok(())
            }
            Ok(out) => {
                warn!(status = %out.status, stderr = %String::from_utf8_lossy(&out.stderr).trim(), "frr-reload.py failed; falling back to vtysh -f");
                self.vtysh(&["-f", &conf]).await.map(|_| ())
            }
            Err(err) => {
                warn!(%err, "frr-reload.py not runnable; falling back to vtysh -f");
                self.vtysh(&["-f", &conf]).await.map(|_| ())
            }
        }
    }
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
}
