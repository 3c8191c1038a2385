//! Services as data (DESIGN §6): what the supervisor runs, how it probes it and how
//! restarts are protected. Built by generators; executed by `meduza::supervise`.
//!
//! Owns: the `ServiceSpec` family of plain data types and the tunnel presets
//! ([`tunnel_preset`]), which are pure functions of plain arguments.
//! Must not: do I/O, look up users, parse capabilities against the running kernel or
//! read the clock. The supervisor validates a spec when it applies it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How a changed configuration reaches a running child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ReloadStrategy {
    /// Stop and start again (EasyTier, Tinc, MosDNS, OpenVPN/tunnel instances).
    #[default]
    Restart,
    /// Send SIGHUP (mihomo re-reads its `-f` file).
    Sighup,
    /// FRR: `frr-reload.py --reload`, falling back to `vtysh -f`.
    FrrReload,
}

/// One supervised child.
///
/// Every field but `name` and `argv` has a serde default, so a services file for
/// `meduza supervise --services FILE.json` can stay short.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// Unique name, also the log prefix `[name]`, the status key and the restart
    /// state file name: 1–64 chars of `[A-Za-z0-9_.@-]`.
    pub name: String,
    /// argv[0] is the program; never run through a shell.
    pub argv: Vec<String>,
    /// The child's whole environment besides `PATH` and `HOME` (the supervisor does
    /// not pass its own environment on: it holds etcd credentials).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Run as this user (name); `None` keeps root. The group is the user's primary group.
    #[serde(default)]
    pub user: Option<String>,
    /// Capabilities kept (e.g. `CAP_NET_ADMIN`); every other one is dropped, from the
    /// bounding set too. Empty = no capabilities at all.
    #[serde(default)]
    pub caps: Vec<String>,
    /// Services that must be started before this one (and stopped after it).
    #[serde(default)]
    pub after: Vec<String>,
    /// Working directory of the child; `None` = `/`.
    #[serde(default)]
    pub workdir: Option<String>,
    /// Files whose content, when changed, requires the reload strategy.
    #[serde(default)]
    pub config_files: Vec<String>,
    #[serde(default)]
    pub reload: ReloadStrategy,
    #[serde(default)]
    pub health: Option<HealthSpec>,
    /// Scheduled restart every N minutes (10 min .. 24 h).
    #[serde(default)]
    pub scheduled_restart_minutes: Option<u32>,
    #[serde(default)]
    pub protection: RestartProtection,
    /// Secrets the child is known to print (easytier-core 2.0.3 prints its whole
    /// config, network secret included, when it starts): the supervisor replaces
    /// each occurrence in a captured output line with [`Redact::MARK`] before the
    /// line reaches the log or the log buffer.
    #[serde(default, skip_serializing)]
    pub redact: Redact,
}

/// Strings to cut out of a child's output. Never serialized and never printed by
/// `Debug` (only their count): the values are secrets.
#[derive(Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(transparent)]
pub struct Redact(pub Vec<String>);

impl Redact {
    /// What replaces a secret in a line.
    pub const MARK: &'static str = "<redacted>";

    /// `line` with every non-empty secret replaced by [`Self::MARK`].
    pub fn apply(&self, line: String) -> String {
        self.0.iter().filter(|s| !s.is_empty()).fold(line, |l, s| {
            if l.contains(s.as_str()) {
                l.replace(s.as_str(), Self::MARK)
            } else {
                l
            }
        })
    }
}

impl std::fmt::Debug for Redact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redact({} values)", self.0.len())
    }
}

impl ServiceSpec {
    /// A spec with every optional field at its default: root, no capabilities,
    /// no dependencies, restart on change, no health check, seed protection numbers.
    pub fn new(name: impl Into<String>, argv: Vec<String>) -> Self {
        Self {
            name: name.into(),
            argv,
            env: BTreeMap::new(),
            user: None,
            caps: Vec::new(),
            after: Vec::new(),
            workdir: None,
            config_files: Vec::new(),
            reload: ReloadStrategy::Restart,
            health: None,
            scheduled_restart_minutes: None,
            protection: RestartProtection::default(),
            redact: Redact::default(),
        }
    }

    /// True when `other` differs only in what can change without touching the
    /// process (health probe, scheduled restart, protection, reload strategy,
    /// config file list).
    pub fn same_process(&self, other: &ServiceSpec) -> bool {
        self.name == other.name
            && self.argv == other.argv
            && self.env == other.env
            && self.user == other.user
            && self.caps == other.caps
            && self.workdir == other.workdir
    }
}

/// Shortest and longest scheduled-restart period (seed: 10 minutes to 24 hours).
pub const SCHEDULED_RESTART_MINUTES: std::ops::RangeInclusive<u32> = 10..=1440;

/// A health probe (the predecessor's tunnel watchdog, generalised).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Probe {
    /// The process is alive.
    Process,
    /// A TCP connect to `addr` (`host:port`) succeeds.
    Tcp { addr: String },
    /// HTTP GET `url` answers with a status in 200..400 (or `expect_status`).
    Http {
        url: String,
        #[serde(default)]
        expect_status: Option<u16>,
    },
    /// A GET of `url` through the SOCKS5 proxy at `proxy` (`host:port`) answers with a
    /// status in 200..400 (names are resolved by the proxy, `socks5h`).
    Socks5 { proxy: String, url: String },
    /// A DNS query for `name` (type A) at `server` (`ip:port`) gets a NOERROR or
    /// NXDOMAIN answer.
    Dns { server: String, name: String },
    /// `argv` exits 0 (no shell).
    Exec { argv: Vec<String> },
    /// None of the current process's last `lines` log lines contains `pattern`
    /// (a substring, case-insensitive).
    LogScan { pattern: String, lines: usize },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthSpec {
    pub probe: Probe,
    /// Seconds between probes.
    pub interval_secs: u64,
    /// Attempts before declaring failure (3).
    pub attempts: u32,
    /// Seconds between attempts (5).
    pub retry_delay_secs: u64,
    /// No probe this many seconds after start (30).
    pub grace_secs: u64,
    /// Per-attempt timeout.
    pub timeout_secs: u64,
}

impl HealthSpec {
    /// The seed's defaults around a probe: 3 attempts 5 s apart, 30 s grace.
    pub fn with_defaults(probe: Probe, interval_secs: u64) -> Self {
        Self {
            probe,
            interval_secs,
            attempts: 3,
            retry_delay_secs: 5,
            grace_secs: 30,
            timeout_secs: 10,
        }
    }
}

/// Restart protection shared by health and scheduled restarts (seed numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartProtection {
    /// Seconds that must pass after any restart before the next one (120).
    pub cooldown_secs: u64,
    /// Health and scheduled restarts allowed in any rolling hour (5).
    pub max_per_hour: u32,
}

impl Default for RestartProtection {
    fn default() -> Self {
        Self {
            cooldown_secs: 120,
            max_per_hour: 5,
        }
    }
}

/// `/nodes/<id>/tunnels/<name>/kind` (DESIGN §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelKind {
    Paqet,
    Icmptunnel,
    Waterwall,
    /// No preset: command, args and health come from the keys.
    Generic,
}

/// `/nodes/<id>/tunnels/<name>/role`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelRole {
    Client,
    Server,
}

/// Default health-check interval of a tunnel (DESIGN §6: 5 min).
pub const TUNNEL_HEALTH_INTERVAL_SECS: u64 = 300;
/// URL fetched through a client tunnel's SOCKS5 port (the predecessor used httpbin).
pub const TUNNEL_TEST_URL: &str = "https://httpbin.org/ip";

/// The plain values a tunnel preset is built from; the model fills them from
/// `/nodes/<id>/tunnels/<name>/...`. `None` means "the preset's default".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TunnelParams {
    /// Tunnel name; the service is called `tunnel-<name>`.
    pub name: String,
    /// Program path (`command` key); default: the kind's binary name.
    pub command: Option<String>,
    /// Full argument list (`args` key, newline-separated there); default: the
    /// kind's `config_file` arguments.
    pub args: Option<Vec<String>>,
    /// The tunnel's config file as written by its generator: passed with `-c`
    /// (paqet) or `-config` (ICMPTunnel); WaterWall reads `core.json` from its
    /// working directory, the directory of this file.
    pub config_file: Option<String>,
    /// Client SOCKS5 port (paqet, icmptunnel); default 1080.
    pub socks_port: Option<u16>,
    /// URL the client probe fetches through the SOCKS5 port; default
    /// [`TUNNEL_TEST_URL`].
    pub test_url: Option<String>,
    /// Client TCP listener `host:port` (waterwall).
    pub listen_addr: Option<String>,
    /// Override of the whole probe (`health/*` keys); `None` = the preset's probe.
    pub probe: Option<Probe>,
    /// Override of the probe interval in seconds.
    pub health_interval_secs: Option<u64>,
    /// Scheduled restart period in minutes (`restart/*` keys).
    pub scheduled_restart_minutes: Option<u32>,
    /// Override of the restart protection (`restart/*` keys).
    pub protection: Option<RestartProtection>,
}

/// The service spec of one tunnel: argv and health probe from the kind's preset
/// (client: SOCKS5 fetch through the tunnel, waterwall client: TCP listener check,
/// server: log scan), with every override in `p` applied.
pub fn tunnel_preset(kind: TunnelKind, role: TunnelRole, p: &TunnelParams) -> ServiceSpec {
    // Without a config file the preset passes no config flag (the operator's args say
    // it all).
    let with_config = |mut before: Vec<String>, flag: &str| match &p.config_file {
        Some(c) => {
            before.extend([flag.to_string(), c.clone()]);
            before
        }
        None => before,
    };
    let (program, default_args, log_pattern): (&str, Vec<String>, &str) = match kind {
        // paqet's cobra command `run` with `-c/--config` (cmd/run/run.go).
        TunnelKind::Paqet => ("paqet", with_config(vec!["run".into()], "-c"), "error"),
        // ICMPTunnel's Go flag `-config` (Qteam-official/ICMPTunnel install.sh units).
        TunnelKind::Icmptunnel => ("icmptunnel", with_config(Vec::new(), "-config"), "error"),
        // WaterWall takes no arguments: it reads core.json from its working directory
        // (core/main.c), set below.
        TunnelKind::Waterwall => ("Waterwall", Vec::new(), "error"),
        TunnelKind::Generic => ("", Vec::new(), "error"),
    };
    let program = p.command.clone().unwrap_or_else(|| program.to_string());
    let mut argv = vec![program];
    argv.extend(p.args.clone().unwrap_or(default_args));

    let socks = format!("127.0.0.1:{}", p.socks_port.unwrap_or(1080));
    let preset_probe = match (kind, role) {
        (TunnelKind::Generic, _) => None,
        (TunnelKind::Waterwall, TunnelRole::Client) => p
            .listen_addr
            .clone()
            .map(|addr| Probe::Tcp { addr })
            .or(Some(Probe::Process)),
        (_, TunnelRole::Client) => Some(Probe::Socks5 {
            proxy: socks,
            url: p
                .test_url
                .clone()
                .unwrap_or_else(|| TUNNEL_TEST_URL.to_string()),
        }),
        (_, TunnelRole::Server) => Some(Probe::LogScan {
            pattern: log_pattern.to_string(),
            lines: 50,
        }),
    };
    let interval = p
        .health_interval_secs
        .unwrap_or(TUNNEL_HEALTH_INTERVAL_SECS);
    let health = p
        .probe
        .clone()
        .or(preset_probe)
        .map(|probe| HealthSpec::with_defaults(probe, interval));

    let mut spec = ServiceSpec::new(format!("tunnel-{}", p.name), argv);
    // The config's directory: WaterWall needs it (core.json, its `log/`); ICMPTunnel's
    // own units run it there too (a closed binary may look beside its config).
    if matches!(kind, TunnelKind::Waterwall | TunnelKind::Icmptunnel) {
        spec.workdir = p
            .config_file
            .as_deref()
            .and_then(|f| f.rsplit_once('/'))
            .map(|(dir, _)| if dir.is_empty() { "/" } else { dir }.to_string());
    }
    // Raw sockets (icmptunnel, paqet's pcap) and TUN devices need these two; WaterWall
    // listeners are often on ports below 1024 (443), which need CAP_NET_BIND_SERVICE
    // even as root once the capability set is reduced.
    spec.caps = match kind {
        TunnelKind::Generic => Vec::new(),
        TunnelKind::Waterwall => vec![
            "CAP_NET_ADMIN".into(),
            "CAP_NET_BIND_SERVICE".into(),
            "CAP_NET_RAW".into(),
        ],
        _ => vec!["CAP_NET_ADMIN".into(), "CAP_NET_RAW".into()],
    };
    spec.config_files = p.config_file.iter().cloned().collect();
    spec.health = health;
    spec.scheduled_restart_minutes = p.scheduled_restart_minutes;
    spec.protection = p.protection.unwrap_or_default();
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_cuts_every_secret_and_never_shows_them() {
        let r = Redact(vec!["s3cret".into(), String::new(), "k\\\"q".into()]);
        assert_eq!(
            r.apply("network_secret = 's3cret' and s3cret, \"k\\\"q\"".into()),
            "network_secret = '<redacted>' and <redacted>, \"<redacted>\""
        );
        assert_eq!(r.apply("nothing here".into()), "nothing here");
        assert_eq!(format!("{r:?}"), "Redact(3 values)");
        let mut spec = ServiceSpec::new("x", vec!["/bin/true".into()]);
        spec.redact = r;
        let json = serde_json::to_string(&spec).expect("serialize");
        assert!(
            !json.contains("s3cret") && !json.contains("redact"),
            "{json}"
        );
    }

    fn params() -> TunnelParams {
        TunnelParams {
            name: "t1".into(),
            config_file: Some("/etc/meduza/tunnels/t1/config.yaml".into()),
            ..Default::default()
        }
    }

    #[test]
    fn paqet_client_probes_socks() {
        let s = tunnel_preset(TunnelKind::Paqet, TunnelRole::Client, &params());
        assert_eq!(s.name, "tunnel-t1");
        assert_eq!(
            s.argv,
            ["paqet", "run", "-c", "/etc/meduza/tunnels/t1/config.yaml"]
        );
        let h = s.health.expect("health");
        assert_eq!(h.interval_secs, 300);
        assert_eq!((h.attempts, h.retry_delay_secs, h.grace_secs), (3, 5, 30));
        assert_eq!(
            h.probe,
            Probe::Socks5 {
                proxy: "127.0.0.1:1080".into(),
                url: TUNNEL_TEST_URL.into()
            }
        );
    }

    #[test]
    fn server_roles_scan_logs_and_overrides_win() {
        let mut p = params();
        p.command = Some("/opt/icmp".into());
        p.args = Some(vec!["-s".into()]);
        p.health_interval_secs = Some(120);
        let s = tunnel_preset(TunnelKind::Icmptunnel, TunnelRole::Server, &p);
        assert_eq!(s.argv, ["/opt/icmp", "-s"]);
        let h = s.health.expect("health");
        assert!(matches!(h.probe, Probe::LogScan { .. }));
        assert_eq!(h.interval_secs, 120);
    }

    #[test]
    fn waterwall_client_checks_listener_in_config_dir() {
        let mut p = params();
        p.config_file = Some("/etc/meduza/tunnels/t1/core.json".into());
        p.listen_addr = Some("127.0.0.1:4443".into());
        let s = tunnel_preset(TunnelKind::Waterwall, TunnelRole::Client, &p);
        assert_eq!(s.argv, ["Waterwall"]);
        assert_eq!(s.workdir.as_deref(), Some("/etc/meduza/tunnels/t1"));
        assert_eq!(
            s.health.expect("health").probe,
            Probe::Tcp {
                addr: "127.0.0.1:4443".into()
            }
        );
    }

    #[test]
    fn generic_has_no_preset_probe() {
        let mut p = params();
        p.command = Some("/usr/bin/mytun".into());
        let s = tunnel_preset(TunnelKind::Generic, TunnelRole::Client, &p);
        assert_eq!(s.argv, ["/usr/bin/mytun"]);
        assert!(s.health.is_none());
        assert!(s.caps.is_empty());
    }

    #[test]
    fn short_json_spec_gets_defaults() {
        let s: ServiceSpec =
            serde_json::from_str(r#"{"name":"a","argv":["/bin/sleep","1"]}"#).expect("json");
        assert_eq!(
            s,
            ServiceSpec::new("a", vec!["/bin/sleep".into(), "1".into()])
        );
    }
}
