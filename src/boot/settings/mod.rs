//! Local (image-level) settings of meduza itself: DESIGN §2.
//!
//! Owns: the [`Settings`] type, the four input layers — command-line flags (built by
//! the CLI from [`SettingsLayer`]'s fields), the environment (`env`),
//! `/etc/meduza/meduza.toml` (`toml_file`) and the kernel command line
//! (`kernel_cmdline`), each parsing its values with the rules of `values` — and
//! their merge in priority order `flags > env > toml > cmdline > defaults`
//! ([`resolve_settings`], here).
//! Must not: read the environment, files or `/proc` itself; callers pass what they read,
//! so every rule here is tested as data.

mod env;
mod kernel_cmdline;
mod toml_file;
mod values;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use values::parse_node_id;

/// Path of the defaults file inside the image (relative to `MEDUZA_ROOT`).
pub const TOML_PATH: &str = "etc/meduza/meduza.toml";
/// Default etcd endpoint.
pub const DEFAULT_ETCD: &str = "http://127.0.0.1:2379";
/// Default DNS frontend sockets.
pub const DEFAULT_DNS_LISTEN: &[&str] = &["0.0.0.0:53", "[::]:53"];
/// Default node API socket.
pub const DEFAULT_API_LISTEN: &str = "0.0.0.0:9100";
/// Default state partition: the ext4 filesystem label genimage gives it.
pub const DEFAULT_STATE_DEVICE: &str = "LABEL=meduza-state";
/// Default watchdog timeout, seconds (`MEDUZA_WATCHDOG_TIMEOUT`; docs/operations.md).
pub const DEFAULT_WATCHDOG_TIMEOUT: u32 = 30;
/// Accepted watchdog timeouts, seconds: meduza pets every third of it, and 600 s is
/// below every common driver's maximum (i6300esb 2046 s, iTCO 613 s, softdog 65535 s).
pub const WATCHDOG_TIMEOUT_RANGE: std::ops::RangeInclusive<u32> = 5..=600;

/// Where a setting came from; carried by errors so an operator knows what to fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Flag,
    Env,
    Toml,
    Cmdline,
    /// The machine's hostname, the node id of last resort.
    Hostname,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::Flag => "command-line flag",
            Origin::Env => "environment",
            Origin::Toml => "/etc/meduza/meduza.toml",
            Origin::Cmdline => "kernel command line",
            Origin::Hostname => "hostname",
        })
    }
}

/// Errors of the settings loader.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    #[error("{origin}: invalid {key}={value:?}: {reason}")]
    Invalid {
        origin: Origin,
        key: String,
        value: String,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Toml { path: String, reason: String },
    #[error("no node id: set NODE_ID, node_id in meduza.toml, meduza.node_id= on the kernel command line, or a hostname")]
    NoNodeId,
}

/// How the data plane is applied (`MEDUZA_DATAPLANE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dataplane {
    /// Real nftables and netlink.
    #[default]
    Nft,
    /// Plan only; log what would be applied.
    Off,
}

impl Dataplane {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "nft" => Ok(Dataplane::Nft),
            "off" => Ok(Dataplane::Off),
            _ => Err("expected \"nft\" or \"off\"".into()),
        }
    }
}

/// Child programs whose path can be overridden with `MEDUZA_BIN_<TOOL>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tool {
    Mihomo,
    Mosdns,
    Easytier,
    Tincd,
    Openvpn,
    WireguardGo,
    FrrReload,
    Vtysh,
}

impl Tool {
    pub const ALL: [Tool; 8] = [
        Tool::Mihomo,
        Tool::Mosdns,
        Tool::Easytier,
        Tool::Tincd,
        Tool::Openvpn,
        Tool::WireguardGo,
        Tool::FrrReload,
        Tool::Vtysh,
    ];

    /// Suffix of the environment variable (`MEDUZA_BIN_<suffix>`).
    pub fn env_suffix(self) -> &'static str {
        match self {
            Tool::Mihomo => "MIHOMO",
            Tool::Mosdns => "MOSDNS",
            Tool::Easytier => "EASYTIER",
            Tool::Tincd => "TINCD",
            Tool::Openvpn => "OPENVPN",
            Tool::WireguardGo => "WIREGUARD_GO",
            Tool::FrrReload => "FRR_RELOAD",
            Tool::Vtysh => "VTYSH",
        }
    }

    /// Key in the `[bin]` table of meduza.toml.
    pub fn toml_key(self) -> &'static str {
        match self {
            Tool::Mihomo => "mihomo",
            Tool::Mosdns => "mosdns",
            Tool::Easytier => "easytier",
            Tool::Tincd => "tincd",
            Tool::Openvpn => "openvpn",
            Tool::WireguardGo => "wireguard_go",
            Tool::FrrReload => "frr_reload",
            Tool::Vtysh => "vtysh",
        }
    }

    /// Where the firmware image installs the program (buildroot/package/*, Buildroot's
    /// FRR/tinc/OpenVPN packages with their default `--sbindir=/usr/sbin`).
    pub fn image_path(self) -> &'static str {
        match self {
            Tool::Mihomo => "/usr/bin/mihomo",
            Tool::Mosdns => "/usr/bin/mosdns",
            Tool::Easytier => "/usr/bin/easytier-core",
            Tool::Tincd => "/usr/sbin/tincd",
            Tool::Openvpn => "/usr/sbin/openvpn",
            Tool::WireguardGo => "/usr/bin/wireguard-go",
            Tool::FrrReload => "/usr/sbin/frr-reload.py",
            Tool::Vtysh => "/usr/bin/vtysh",
        }
    }
}

/// One layer of optional settings. Flags are built by the CLI directly from these
/// public fields; the other layers come from the `from_*` constructors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SettingsLayer {
    pub node_id: Option<String>,
    pub etcd_endpoints: Option<Vec<String>>,
    pub etcd_ca: Option<PathBuf>,
    pub etcd_cert: Option<PathBuf>,
    pub etcd_key: Option<PathBuf>,
    pub etcd_user: Option<String>,
    pub etcd_pass: Option<String>,
    pub default_gw: Option<IpAddr>,
    pub root: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    /// State partition: `/dev/...`, `LABEL=...` or `PARTLABEL=...`; `none` disables it.
    pub state_device: Option<String>,
    pub dns_listen: Option<Vec<SocketAddr>>,
    pub api_listen: Option<SocketAddr>,
    /// HTTPS certificate chain and key of the node API (PEM files).
    pub api_tls_cert: Option<PathBuf>,
    pub api_tls_key: Option<PathBuf>,
    pub dataplane: Option<Dataplane>,
    pub bins: BTreeMap<Tool, PathBuf>,
    /// Run the boot duties (`MEDUZA_BOOT=1`, `meduza.boot`, `--boot`).
    pub boot: Option<bool>,
    /// Watchdog device (`/dev/...`) or `off`.
    pub watchdog: Option<String>,
    /// Watchdog timeout, seconds.
    pub watchdog_timeout: Option<u32>,
    /// The resolver file pointed at the DNS frontend (absolute path) or `off`.
    pub resolv_conf: Option<String>,
}

/// The resolved settings meduza runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub node_id: String,
    pub etcd_endpoints: Vec<String>,
    pub etcd_ca: Option<PathBuf>,
    pub etcd_cert: Option<PathBuf>,
    pub etcd_key: Option<PathBuf>,
    pub etcd_user: Option<String>,
    pub etcd_pass: Option<String>,
    pub default_gw: Option<IpAddr>,
    pub root: PathBuf,
    pub state_dir: PathBuf,
    /// `None` when disabled with `none`.
    pub state_device: Option<String>,
    pub dns_listen: Vec<SocketAddr>,
    pub api_listen: SocketAddr,
    /// `MEDUZA_API_TLS_CERT` and `MEDUZA_API_TLS_KEY`: the node API serves HTTPS with
    /// these files (both or neither); they take precedence over the etcd keys.
    pub api_tls_files: Option<(PathBuf, PathBuf)>,
    pub dataplane: Dataplane,
    pub bins: BTreeMap<Tool, PathBuf>,
    pub boot: bool,
    /// The watchdog device meduza arms and pets; `None` (the default, `off`): none.
    pub watchdog: Option<PathBuf>,
    /// Seconds without a pet before the watchdog resets the machine.
    pub watchdog_timeout: u32,
    /// The gateway's own resolver file (`/etc/resolv.conf` in the image), kept
    /// pointing at the DNS frontend; `None` (the default, `off`): left alone.
    pub resolv_conf: Option<PathBuf>,
}

impl Settings {
    /// Path of a child program.
    pub fn bin(&self, tool: Tool) -> &Path {
        match self.bins.get(&tool) {
            Some(p) => p,
            None => Path::new(tool.image_path()),
        }
    }
}

/// Merge the layers: flags > env > toml > cmdline > built-in defaults. A field takes the
/// first layer that sets it; `bins` merge per tool. `hostname` is the fallback node id
/// DESIGN §2 allows when none of the layers names one.
pub fn resolve_settings(
    flags: &SettingsLayer,
    env: &SettingsLayer,
    toml: &SettingsLayer,
    cmdline: &SettingsLayer,
    hostname: Option<&str>,
) -> Result<Settings, SettingsError> {
    let layers = [flags, env, toml, cmdline];
    fn pick<T: Clone>(
        layers: &[&SettingsLayer; 4],
        f: impl Fn(&SettingsLayer) -> &Option<T>,
    ) -> Option<T> {
        layers.iter().find_map(|l| f(l).clone())
    }

    let node_id = match pick(&layers, |l| &l.node_id) {
        Some(id) => id,
        None => match hostname.map(str::trim).filter(|h| !h.is_empty()) {
            Some(h) => parse_node_id(Origin::Hostname, "hostname", h)?,
            None => return Err(SettingsError::NoNodeId),
        },
    };
    let root = pick(&layers, |l| &l.root).unwrap_or_else(|| PathBuf::from("/"));
    let state_dir = pick(&layers, |l| &l.state_dir).unwrap_or_else(|| root.join("var/lib/meduza"));
    let state_device = match pick(&layers, |l| &l.state_device) {
        Some(d) if d == "none" => None,
        Some(d) => Some(d),
        None => Some(DEFAULT_STATE_DEVICE.to_string()),
    };
    let mut bins = BTreeMap::new();
    for tool in Tool::ALL {
        let path = layers
            .iter()
            .find_map(|l| l.bins.get(&tool).cloned())
            .unwrap_or_else(|| PathBuf::from(tool.image_path()));
        bins.insert(tool, path);
    }
    Ok(Settings {
        node_id,
        etcd_endpoints: pick(&layers, |l| &l.etcd_endpoints)
            .unwrap_or_else(|| vec![DEFAULT_ETCD.to_string()]),
        etcd_ca: pick(&layers, |l| &l.etcd_ca),
        etcd_cert: pick(&layers, |l| &l.etcd_cert),
        etcd_key: pick(&layers, |l| &l.etcd_key),
        etcd_user: pick(&layers, |l| &l.etcd_user),
        etcd_pass: pick(&layers, |l| &l.etcd_pass),
        default_gw: pick(&layers, |l| &l.default_gw),
        root,
        state_dir,
        state_device,
        dns_listen: pick(&layers, |l| &l.dns_listen).unwrap_or_else(|| {
            DEFAULT_DNS_LISTEN
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect()
        }),
        api_listen: pick(&layers, |l| &l.api_listen)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 9100))),
        api_tls_files: api_tls_files(
            pick(&layers, |l| &l.api_tls_cert),
            pick(&layers, |l| &l.api_tls_key),
        )?,
        dataplane: pick(&layers, |l| &l.dataplane).unwrap_or_default(),
        bins,
        boot: pick(&layers, |l| &l.boot).unwrap_or(false),
        watchdog: pick(&layers, |l| &l.watchdog)
            .filter(|w| w != "off")
            .map(PathBuf::from),
        watchdog_timeout: pick(&layers, |l| &l.watchdog_timeout)
            .unwrap_or(DEFAULT_WATCHDOG_TIMEOUT),
        resolv_conf: pick(&layers, |l| &l.resolv_conf)
            .filter(|r| r != "off")
            .map(PathBuf::from),
    })
}

/// Both of `MEDUZA_API_TLS_CERT` / `MEDUZA_API_TLS_KEY` (`api_tls_cert` / `api_tls_key`
/// in meduza.toml), or neither.
fn api_tls_files(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<Option<(PathBuf, PathBuf)>, SettingsError> {
    let missing = |key: &str, other: &Path| SettingsError::Invalid {
        origin: Origin::Env,
        key: key.to_string(),
        value: String::new(),
        reason: format!("missing while the other half ({}) is set", other.display()),
    };
    match (cert, key) {
        (Some(c), Some(k)) => Ok(Some((c, k))),
        (None, None) => Ok(None),
        (Some(c), None) => Err(missing("MEDUZA_API_TLS_KEY", &c)),
        (None, Some(k)) => Err(missing("MEDUZA_API_TLS_CERT", &k)),
    }
}

/// An empty layer, for the layers' tests.
#[cfg(test)]
fn none() -> SettingsLayer {
    SettingsLayer::default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::cmdline::parse_cmdline;

    fn env(pairs: &[(&str, &str)]) -> SettingsLayer {
        SettingsLayer::from_env(pairs.iter().copied()).expect("valid env")
    }

    #[test]
    fn api_tls_files_come_in_pairs() {
        let (crt, key) = ("/etc/meduza/api.crt", "/etc/meduza/api.key");
        let both = env(&[("MEDUZA_API_TLS_CERT", crt), ("MEDUZA_API_TLS_KEY", key)]);
        let s = resolve_settings(&none(), &both, &none(), &none(), Some("b")).unwrap();
        assert_eq!(s.api_tls_files, Some((crt.into(), key.into())));
        let one = env(&[("MEDUZA_API_TLS_CERT", crt)]);
        let err = resolve_settings(&none(), &one, &none(), &none(), Some("b"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("MEDUZA_API_TLS_KEY") && err.contains(crt),
            "{err}"
        );
        let s = resolve_settings(&none(), &none(), &none(), &none(), Some("b")).unwrap();
        assert_eq!(s.api_tls_files, None);
    }
    #[test]
    fn defaults_match_design_table() {
        let s = resolve_settings(&none(), &none(), &none(), &none(), Some("box1")).unwrap();
        assert_eq!(s.node_id, "box1");
        assert_eq!(s.etcd_endpoints, vec!["http://127.0.0.1:2379"]);
        assert_eq!(s.root, PathBuf::from("/"));
        assert_eq!(s.state_dir, PathBuf::from("/var/lib/meduza"));
        assert_eq!(
            s.dns_listen,
            vec![
                "0.0.0.0:53".parse::<SocketAddr>().unwrap(),
                "[::]:53".parse().unwrap()
            ]
        );
        assert_eq!(s.api_listen, DEFAULT_API_LISTEN.parse().unwrap());
        assert_eq!(s.dataplane, Dataplane::Nft);
        assert_eq!(s.bin(Tool::Mihomo), Path::new("/usr/bin/mihomo"));
        assert_eq!(s.bin(Tool::FrrReload), Path::new("/usr/sbin/frr-reload.py"));
        assert_eq!(s.state_device.as_deref(), Some("LABEL=meduza-state"));
        assert!(!s.boot);
        assert_eq!(s.etcd_ca, None);
        assert_eq!(s.default_gw, None);
    }
    #[test]
    fn every_design_env_var_is_read() {
        let e = env(&[
            ("NODE_ID", "gw1"),
            (
                "ETCD_ENDPOINTS",
                "http://10.0.0.1:2379, https://10.0.0.2:2379",
            ),
            ("ETCD_CA", "/etc/meduza/ca.pem"),
            ("ETCD_CERT", "/etc/meduza/cert.pem"),
            ("ETCD_KEY", "/etc/meduza/key.pem"),
            ("ETCD_USER", "gw"),
            ("ETCD_PASS", "s3cret"),
            ("DEFAULT_GW", "192.168.1.1"),
            ("MEDUZA_ROOT", "/tmp/r"),
            ("MEDUZA_STATE_DIR", "/data/state"),
            ("MEDUZA_DNS_LISTEN", "127.0.0.1:5353"),
            ("MEDUZA_API_LISTEN", "127.0.0.1:9200"),
            ("MEDUZA_DATAPLANE", "off"),
            ("MEDUZA_BIN_MIHOMO", "/opt/mihomo"),
            ("MEDUZA_BIN_MOSDNS", "/opt/mosdns"),
            ("MEDUZA_BIN_EASYTIER", "/opt/easytier-core"),
            ("MEDUZA_BIN_TINCD", "/opt/tincd"),
            ("MEDUZA_BIN_OPENVPN", "/opt/openvpn"),
            ("MEDUZA_BIN_WIREGUARD_GO", "/opt/wireguard-go"),
            ("MEDUZA_BIN_FRR_RELOAD", "/opt/frr-reload.py"),
            ("MEDUZA_BIN_VTYSH", "/opt/vtysh"),
            ("MEDUZA_BOOT", "1"),
            ("PATH", "/usr/bin"),
        ]);
        let s = resolve_settings(&none(), &e, &none(), &none(), None).unwrap();
        assert_eq!(s.node_id, "gw1");
        assert_eq!(
            s.etcd_endpoints,
            vec!["http://10.0.0.1:2379", "https://10.0.0.2:2379"]
        );
        assert_eq!(s.etcd_ca, Some(PathBuf::from("/etc/meduza/ca.pem")));
        assert_eq!(s.etcd_cert, Some(PathBuf::from("/etc/meduza/cert.pem")));
        assert_eq!(s.etcd_key, Some(PathBuf::from("/etc/meduza/key.pem")));
        assert_eq!(s.etcd_user.as_deref(), Some("gw"));
        assert_eq!(s.etcd_pass.as_deref(), Some("s3cret"));
        assert_eq!(s.default_gw, Some("192.168.1.1".parse().unwrap()));
        assert_eq!(s.root, PathBuf::from("/tmp/r"));
        assert_eq!(s.state_dir, PathBuf::from("/data/state"));
        assert_eq!(s.dns_listen, vec!["127.0.0.1:5353".parse().unwrap()]);
        assert_eq!(s.api_listen, "127.0.0.1:9200".parse().unwrap());
        assert_eq!(s.dataplane, Dataplane::Off);
        for tool in Tool::ALL {
            let want = format!(
                "/opt/{}",
                Path::new(tool.image_path())
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
            );
            assert_eq!(s.bin(tool), Path::new(&want), "{tool:?}");
        }
        assert!(s.boot);
    }
    #[test]
    fn state_dir_follows_meduza_root() {
        let s = resolve_settings(
            &none(),
            &env(&[("MEDUZA_ROOT", "/tmp/x")]),
            &none(),
            &none(),
            Some("h"),
        )
        .unwrap();
        assert_eq!(s.state_dir, PathBuf::from("/tmp/x/var/lib/meduza"));
    }
    #[test]
    fn priority_is_flags_env_toml_cmdline_defaults() {
        let flags = SettingsLayer {
            api_listen: Some("127.0.0.1:1".parse().unwrap()),
            ..Default::default()
        };
        let e = env(&[
            ("MEDUZA_API_LISTEN", "127.0.0.1:2"),
            ("NODE_ID", "from-env"),
        ]);
        let t = SettingsLayer::from_toml(
            "node_id = \"from-toml\"\netcd_endpoints = [\"http://toml:2379\"]\n\
             api_listen = \"127.0.0.1:3\"\ndataplane = \"off\"\n",
            "meduza.toml",
        )
        .unwrap();
        let c = SettingsLayer::from_cmdline(&parse_cmdline(
            "meduza.node_id=from-cmdline meduza.etcd=http://cmdline:2379 \
             meduza.dataplane=nft meduza.default_gw=10.0.0.1 meduza.api_listen=127.0.0.1:4",
        ))
        .unwrap();
        let s = resolve_settings(&flags, &e, &t, &c, Some("host")).unwrap();
        assert_eq!(s.api_listen, "127.0.0.1:1".parse().unwrap(), "flag wins");
        assert_eq!(s.node_id, "from-env", "env beats toml and cmdline");
        assert_eq!(
            s.etcd_endpoints,
            vec!["http://toml:2379"],
            "toml beats cmdline"
        );
        assert_eq!(s.dataplane, Dataplane::Off, "toml beats cmdline");
        assert_eq!(
            s.default_gw,
            Some("10.0.0.1".parse().unwrap()),
            "cmdline beats default"
        );

        let s = resolve_settings(&none(), &none(), &none(), &c, Some("host")).unwrap();
        assert_eq!(s.node_id, "from-cmdline", "cmdline beats hostname");
        assert_eq!(s.etcd_endpoints, vec!["http://cmdline:2379"]);
    }
    #[test]
    fn bins_merge_per_tool() {
        let e = env(&[("MEDUZA_BIN_MIHOMO", "/env/mihomo")]);
        let t = SettingsLayer::from_toml(
            "[bin]\nmihomo = \"/toml/mihomo\"\nmosdns = \"/toml/mosdns\"\n",
            "t",
        )
        .unwrap();
        let s = resolve_settings(&none(), &e, &t, &none(), Some("h")).unwrap();
        assert_eq!(s.bin(Tool::Mihomo), Path::new("/env/mihomo"));
        assert_eq!(s.bin(Tool::Mosdns), Path::new("/toml/mosdns"));
        assert_eq!(s.bin(Tool::Tincd), Path::new("/usr/sbin/tincd"));
    }
    #[test]
    fn no_node_id_anywhere_is_an_error() {
        assert_eq!(
            resolve_settings(&none(), &none(), &none(), &none(), None),
            Err(SettingsError::NoNodeId)
        );
        assert_eq!(
            resolve_settings(&none(), &none(), &none(), &none(), Some("  ")),
            Err(SettingsError::NoNodeId)
        );
    }
    #[test]
    fn resolv_conf_is_left_alone_by_default_and_set_per_layer() {
        let s = resolve_settings(&none(), &none(), &none(), &none(), Some("h")).unwrap();
        assert_eq!(
            s.resolv_conf, None,
            "a development machine's file is not touched"
        );
        let t = SettingsLayer::from_toml("resolv_conf = \"/etc/resolv.conf\"\n", "t").unwrap();
        let c = SettingsLayer::from_cmdline(&parse_cmdline("meduza.resolv_conf=off")).unwrap();
        let s = resolve_settings(&none(), &none(), &t, &c, Some("h")).unwrap();
        assert_eq!(s.resolv_conf, Some(PathBuf::from("/etc/resolv.conf")));
        let e = env(&[("MEDUZA_RESOLV_CONF", "off")]);
        let s = resolve_settings(&none(), &e, &t, &c, Some("h")).unwrap();
        assert_eq!(s.resolv_conf, None, "off in the environment wins");
        let err = SettingsLayer::from_env([("MEDUZA_RESOLV_CONF", "resolv.conf")]).unwrap_err();
        assert!(err.to_string().contains("MEDUZA_RESOLV_CONF"), "{err}");
    }
    #[test]
    fn watchdog_is_off_by_default_and_set_per_layer() {
        let s = resolve_settings(&none(), &none(), &none(), &none(), Some("h")).unwrap();
        assert_eq!(s.watchdog, None, "off on a development machine");
        assert_eq!(s.watchdog_timeout, 30);
        let t = SettingsLayer::from_toml("watchdog = \"/dev/watchdog\"\n", "t").unwrap();
        let c = SettingsLayer::from_cmdline(&parse_cmdline(
            "meduza.watchdog=/dev/watchdog1 meduza.watchdog_timeout=60",
        ))
        .unwrap();
        let s = resolve_settings(&none(), &none(), &t, &c, Some("h")).unwrap();
        assert_eq!(
            s.watchdog,
            Some(PathBuf::from("/dev/watchdog")),
            "toml beats cmdline"
        );
        assert_eq!(s.watchdog_timeout, 60);
        let e = env(&[
            ("MEDUZA_WATCHDOG", "off"),
            ("MEDUZA_WATCHDOG_TIMEOUT", "10"),
        ]);
        let s = resolve_settings(&none(), &e, &t, &c, Some("h")).unwrap();
        assert_eq!(s.watchdog, None, "off in the environment wins");
        assert_eq!(s.watchdog_timeout, 10);
        for bad in ["watchdog", "/tmp/wd", "/dev/"] {
            let err = SettingsLayer::from_env([("MEDUZA_WATCHDOG", bad)]).unwrap_err();
            assert!(err.to_string().contains("MEDUZA_WATCHDOG"), "{err}");
        }
        for bad in ["4", "601", "30s", "-1"] {
            let err = SettingsLayer::from_env([("MEDUZA_WATCHDOG_TIMEOUT", bad)]).unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
        assert!(SettingsLayer::from_toml("watchdog_timeout = 3\n", "t").is_err());
    }
}
