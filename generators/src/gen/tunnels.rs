//! Tunnel presets (DESIGN §6): the configuration files of paqet, ICMPTunnel and
//! WaterWall, generated from `/nodes/<id>/tunnels/<name>/...`, and the tunnel's service.
//!
//! Owns: the text and paths of every tunnel configuration file (all under
//! `/etc/meduza/tunnels/<name>/`), and composing a tunnel's service from its kind's
//! preset ([`tunnel_preset`]: argv, probe, capabilities), its files and its
//! `health|restart/*` overrides. Must not: put a key or password anywhere but a mode
//! 0600 file (never argv, environment or a log), or decide whether a tunnel runs
//! (that is [`crate::render`]).
//!
//! Formats, from the programs' own sources (docs/tunnels.md has the links):
//! - paqet (hanselime/paqet, `internal/conf/*.go`, `example/*.yaml.example`): one YAML
//!   file, `paqet run -c <file>`. Strings are written double-quoted with JSON escapes,
//!   which YAML 1.1 and 1.2 read alike, so a key such as `on` or `0123` stays a string.
//!   The server receives on `network.ipv4.addr`'s port (`socket.New` uses
//!   `cfg.Network.Port`); `listen.addr` carries the same port, as paqet's examples ask.
//! - ICMPTunnel (Qteam-official/ICMPTunnel, closed source: its README's key table and
//!   its installer's `config.json` and units): one JSON file, `icmptunnel -config
//!   <file>`. `listen_port_socks` and `api_port` are JSON strings, `key` and `timeout`
//!   numbers, `encrypt_data` a boolean, as the README and the installer write them.
//! - WaterWall (radkesvat/WaterWall, `core/main.c`, `core/readme.md`,
//!   `tunnels/*/description.md`): `core.json` read from the working directory, which
//!   names the node file `config.json`; no arguments.

use super::{apply_overrides, header_hash, MODE_PUBLIC, MODE_SECRET};
use crate::error::ValidationError;
use crate::model::{
    IcmptunnelSettings, Node, PaqetSettings, Tunnel, TunnelKind as K, TunnelRole as R,
    TunnelSettings, WaterwallSettings,
};
use crate::output::{DomainOutput, FileOut};
use crate::plan::service::{tunnel_preset, TunnelParams};
use serde_json::json;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Directory of tunnel `name`'s files.
pub fn dir(name: &str) -> String {
    format!("/etc/meduza/tunnels/{name}")
}

/// The file the program is started with (`-c`/`-config`; WaterWall's `core.json`).
pub fn main_file(t: &Tunnel) -> Option<String> {
    let leaf = match t.kind {
        K::Paqet => "config.yaml",
        K::Icmptunnel => "config.json",
        K::Waterwall => "core.json",
        K::Generic => return None,
    };
    Some(format!("{}/{leaf}", dir(&t.name)))
}

/// The tunnel's files and its `tunnel-<name>` service.
pub fn render(node: &Node, t: &Tunnel) -> Result<DomainOutput, ValidationError> {
    let base = format!("/nodes/{}/tunnels/{}/", node.id, t.name);
    let files = match (&t.kind, &t.settings) {
        (K::Generic, _) => Vec::new(),
        (K::Paqet, Some(TunnelSettings::Paqet(s))) => vec![paqet(node, t, s)],
        (K::Icmptunnel, Some(TunnelSettings::Icmptunnel(s))) => vec![icmptunnel(t, s)],
        (K::Waterwall, Some(TunnelSettings::Waterwall(s))) => waterwall(node, t, s),
        // The model reports the missing key of an enabled preset; this is a backstop.
        _ => {
            return Err(ValidationError::new(
                format!("{base}kind"),
                "",
                "the preset's required keys are missing (docs/tunnels.md)",
            ))
        }
    };
    let params = TunnelParams {
        name: t.name.clone(),
        command: t.command.clone(),
        args: (!t.args.is_empty()).then(|| t.args.clone()),
        config_file: main_file(t),
        socks_port: Some(t.socks_port),
        test_url: t.test_url.clone(),
        listen_addr: match &t.settings {
            Some(TunnelSettings::Waterwall(s)) => Some(probe_addr(s.listen).to_string()),
            _ => t.listen.clone(),
        },
        ..TunnelParams::default()
    };
    let mut spec = tunnel_preset(t.kind, t.role, &params);
    spec.config_files = files.iter().map(|f| f.path.clone()).collect();
    apply_overrides(&base, &t.overrides, &mut spec)?;
    if spec.argv.first().is_none_or(|p| p.is_empty()) {
        return Err(ValidationError::new(
            format!("{base}command"),
            "",
            "this tunnel needs a command",
        ));
    }
    Ok(DomainOutput {
        files,
        services: vec![spec],
    })
}

/// Where the TCP probe connects to a listener bound to `listen`: the loopback of the
/// same family when it binds every address.
fn probe_addr(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(a) if a.is_unspecified() => (Ipv4Addr::LOCALHOST, listen.port()).into(),
        IpAddr::V6(a) if a.is_unspecified() => (Ipv6Addr::LOCALHOST, listen.port()).into(),
        _ => listen,
    }
}

/// A YAML double-quoted scalar: JSON's string syntax is a subset of it (YAML 1.2 §5.7;
/// PyYAML and go-yaml read `\"`, `\\` and `\uXXXX` alike), so no value can turn into
/// a number, a boolean or a new key.
fn q(v: &str) -> String {
    serde_json::Value::String(v.to_string()).to_string()
}

/// paqet's YAML (`role`, `log`, `socks5`/`listen`, `network`, `server`, `transport`).
fn paqet(node: &Node, t: &Tunnel, s: &PaqetSettings) -> FileOut {
    let mut y = header_hash(&node.id, &format!("tunnel/{}", t.name));
    let client = t.role == R::Client;
    let _ = writeln!(y, "role: {}", q(if client { "client" } else { "server" }));
    // paqet's default level is "none": nothing would reach the log-scan probe.
    let _ = writeln!(y, "log:\n  level: {}", q("info"));
    if client {
        let _ = writeln!(
            y,
            "socks5:\n  - listen: {}",
            q(&format!("127.0.0.1:{}", t.socks_port))
        );
    } else if let Some(port) = s.port {
        let _ = writeln!(y, "listen:\n  addr: {}", q(&format!(":{port}")));
    }
    // A client sends from an ephemeral port (0); a server receives on `port`.
    let local_port = if client { 0 } else { s.port.unwrap_or(0) };
    let _ = writeln!(y, "network:\n  interface: {}", q(&s.interface));
    let _ = writeln!(
        y,
        "  ipv4:\n    addr: {}\n    router_mac: {}",
        q(&format!("{}:{local_port}", s.local_ip)),
        q(&s.router_mac)
    );
    let _ = writeln!(y, "  tcp:\n    local_flag: [{}]", q("PA"));
    if client {
        let _ = writeln!(y, "    remote_flag: [{}]", q("PA"));
        if let Some(server) = s.server {
            let _ = writeln!(y, "server:\n  addr: {}", q(&server.to_string()));
        }
    }
    let _ = writeln!(y, "transport:\n  protocol: {}\n  conn: 1", q("kcp"));
    let _ = writeln!(
        y,
        "  kcp:\n    mode: {}\n    mtu: {}\n    key: {}",
        q("fast"),
        s.mtu,
        q(&s.key)
    );
    FileOut::new(format!("{}/config.yaml", dir(&t.name)), y, MODE_SECRET)
}

/// ICMPTunnel's `config.json` (the README's table; a server leaves `server` and
/// `listen_port_socks` empty, as the predecessor's setup did).
fn icmptunnel(t: &Tunnel, s: &IcmptunnelSettings) -> FileOut {
    let client = t.role == R::Client;
    let v = json!({
        "type": if client { "client" } else { "server" },
        "listen_port_socks": if client { t.socks_port.to_string() } else { String::new() },
        "server": s.server.map(|a| a.to_string()).unwrap_or_default(),
        "timeout": s.timeout_secs,
        "dns": s.dns.to_string(),
        "key": s.key,
        "api_port": s.api_port.to_string(),
        "encrypt_data": s.encrypt_key.is_some(),
        "encrypt_data_key": s.encrypt_key.clone().unwrap_or_default(),
    });
    FileOut::new(
        format!("{}/config.json", dir(&t.name)),
        pretty(&v),
        MODE_SECRET,
    )
}

/// WaterWall's `core.json` and `config.json`: `TcpListener` → [`EncryptionClient` |
/// `EncryptionServer`] → `TcpConnector`.
fn waterwall(node: &Node, t: &Tunnel, s: &WaterwallSettings) -> Vec<FileOut> {
    let client = t.role == R::Client;
    let logger = |file: &str, level: &str, console: bool| json!({"loglevel": level, "file": file, "console": console});
    let core = json!({
        // Relative to the working directory (the tunnel's directory); WaterWall always
        // writes its log files, and the console copy is what the supervisor scans.
        "log": {
            "path": "log/",
            "core": logger("core.log", "INFO", true),
            "network": logger("network.log", "INFO", true),
            "dns": logger("dns.log", "SILENT", false),
        },
        "misc": {
            "workers": 0,
            "ram-profile": if client { "client" } else { "server" },
            // Off: WaterWall would otherwise rewrite net.core.default_qdisc and
            // net.ipv4.tcp_congestion_control, which meduza does not own.
            "try-enabling-bbr": false,
            "libs-path": "libs/",
        },
        "configs": ["config.json"],
    });
    let mut nodes = vec![json!({
        "name": "input",
        "type": "TcpListener",
        "settings": {
            "address": s.listen.ip().to_string(),
            "port": s.listen.port(),
            "nodelay": true,
        },
        "next": if s.password.is_some() { "encryption" } else { "output" },
    })];
    if let Some(password) = &s.password {
        nodes.push(json!({
            "name": "encryption",
            "type": if client { "EncryptionClient" } else { "EncryptionServer" },
            "settings": { "password": password },
            "next": "output",
        }));
    }
    nodes.push(json!({
        "name": "output",
        "type": "TcpConnector",
        "settings": {
            "address": s.connect.0,
            "port": s.connect.1,
            "nodelay": true,
        },
    }));
    let config = json!({
        "name": format!("meduza-{}-tunnel-{}", node.id, t.name),
        "author": "meduza",
        "config-version": 1,
        "core-minimum-version": 1,
        "nodes": nodes,
    });
    let d = dir(&t.name);
    vec![
        FileOut::new(format!("{d}/core.json"), pretty(&core), MODE_PUBLIC),
        FileOut::new(
            format!("{d}/config.json"),
            pretty(&config),
            if s.password.is_some() {
                MODE_SECRET
            } else {
                MODE_PUBLIC
            },
        ),
    ]
}

fn pretty(v: &serde_json::Value) -> String {
    // Serializing a `Value` cannot fail (string keys only).
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Config;
    use crate::plan::service::Probe;
    use crate::snapshot::Snapshot;

    fn parse(keys: &[(&str, &str)]) -> Result<Config, crate::error::ValidationErrors> {
        let mut s = Snapshot::default();
        for (k, v) in keys {
            s.0.insert((*k).to_string(), (*v).to_string());
        }
        Config::parse(&s)
    }

    fn tunnel_out(keys: &[(&str, &str)]) -> DomainOutput {
        let cfg = parse(keys).expect("valid");
        let node = cfg.node("n1").expect("node");
        render(node, &node.tunnels[0]).expect("renders")
    }

    const PAQET_CLIENT: &[(&str, &str)] = &[
        ("/nodes/n1/tunnels/pq/enable", "true"),
        ("/nodes/n1/tunnels/pq/kind", "paqet"),
        ("/nodes/n1/tunnels/pq/interface", "wan0"),
        ("/nodes/n1/tunnels/pq/local_ip", "10.0.0.2"),
        ("/nodes/n1/tunnels/pq/router_mac", "AA-BB-CC-DD-EE-0F"),
        ("/nodes/n1/tunnels/pq/server", "203.0.113.9:9999"),
        ("/nodes/n1/tunnels/pq/key", "on \"x\"\\y"),
        ("/nodes/n1/tunnels/pq/socks_port", "1081"),
    ];

    #[test]
    fn paqet_client_config_is_yaml_with_the_keys() {
        let out = tunnel_out(PAQET_CLIENT);
        let f = &out.files[0];
        assert_eq!(f.path, "/etc/meduza/tunnels/pq/config.yaml");
        assert_eq!(f.mode, MODE_SECRET);
        let y: serde_norway::Value = serde_norway::from_str(&f.content).expect("YAML");
        assert_eq!(y["role"], "client");
        assert_eq!(y["socks5"][0]["listen"], "127.0.0.1:1081");
        assert_eq!(y["network"]["interface"], "wan0");
        assert_eq!(y["network"]["ipv4"]["addr"], "10.0.0.2:0");
        assert_eq!(y["network"]["ipv4"]["router_mac"], "aa:bb:cc:dd:ee:0f");
        assert_eq!(y["server"]["addr"], "203.0.113.9:9999");
        assert_eq!(y["transport"]["protocol"], "kcp");
        // A key that YAML 1.1 would read as a boolean stays a string, escapes intact.
        assert_eq!(y["transport"]["kcp"]["key"], "on \"x\"\\y");
        assert_eq!(y["transport"]["kcp"]["mtu"], 1350);
        let svc = &out.services[0];
        assert_eq!(
            svc.argv,
            ["paqet", "run", "-c", "/etc/meduza/tunnels/pq/config.yaml"]
        );
        assert_eq!(svc.config_files, std::slice::from_ref(&f.path));
        assert!(svc.env.is_empty());
        assert!(!svc.argv.iter().any(|a| a.contains("on \"x\"")));
        assert_eq!(
            svc.health.as_ref().expect("probe").probe,
            Probe::Socks5 {
                proxy: "127.0.0.1:1081".into(),
                url: crate::plan::service::TUNNEL_TEST_URL.into()
            }
        );
    }

    #[test]
    fn paqet_server_receives_on_port() {
        let out = tunnel_out(&[
            ("/nodes/n1/tunnels/pq/enable", "true"),
            ("/nodes/n1/tunnels/pq/kind", "paqet"),
            ("/nodes/n1/tunnels/pq/role", "server"),
            ("/nodes/n1/tunnels/pq/interface", "eth0"),
            ("/nodes/n1/tunnels/pq/local_ip", "203.0.113.9"),
            ("/nodes/n1/tunnels/pq/router_mac", "aa:bb:cc:dd:ee:ff"),
            ("/nodes/n1/tunnels/pq/port", "9999"),
            ("/nodes/n1/tunnels/pq/key", "k"),
            ("/nodes/n1/tunnels/pq/mtu", "1200"),
        ]);
        let y: serde_norway::Value = serde_norway::from_str(&out.files[0].content).expect("YAML");
        assert_eq!(y["role"], "server");
        assert_eq!(y["listen"]["addr"], ":9999");
        assert_eq!(y["network"]["ipv4"]["addr"], "203.0.113.9:9999");
        assert_eq!(y["transport"]["kcp"]["mtu"], 1200);
        assert!(y.get("socks5").is_none() && y.get("server").is_none());
        assert!(matches!(
            out.services[0].health.as_ref().expect("probe").probe,
            Probe::LogScan { .. }
        ));
    }

    #[test]
    fn icmptunnel_config_uses_the_readme_types() {
        let out = tunnel_out(&[
            ("/nodes/n1/tunnels/ic/enable", "true"),
            ("/nodes/n1/tunnels/ic/kind", "icmptunnel"),
            ("/nodes/n1/tunnels/ic/server", "203.0.113.9"),
            ("/nodes/n1/tunnels/ic/key", "20201204"),
            ("/nodes/n1/tunnels/ic/encrypt_key", "Ysh!io19"),
            ("/nodes/n1/tunnels/ic/socks_port", "1010"),
            ("/nodes/n1/tunnels/ic/test_url", "http://10.1.1.1/x"),
        ]);
        let f = &out.files[0];
        assert_eq!(
            (f.path.as_str(), f.mode),
            ("/etc/meduza/tunnels/ic/config.json", MODE_SECRET)
        );
        let v: serde_json::Value = serde_json::from_str(&f.content).expect("JSON");
        assert_eq!(v["type"], "client");
        assert_eq!(v["listen_port_socks"], "1010");
        assert_eq!(v["server"], "203.0.113.9");
        assert_eq!(v["key"], 20_201_204);
        assert_eq!(v["api_port"], "8080");
        assert_eq!(v["timeout"], 20);
        assert_eq!(v["dns"], "8.8.8.8");
        assert_eq!(v["encrypt_data"], true);
        assert_eq!(v["encrypt_data_key"], "Ysh!io19");
        let svc = &out.services[0];
        assert_eq!(
            svc.argv,
            [
                "icmptunnel",
                "-config",
                "/etc/meduza/tunnels/ic/config.json"
            ]
        );
        assert_eq!(svc.workdir.as_deref(), Some("/etc/meduza/tunnels/ic"));
        assert_eq!(
            svc.health.as_ref().expect("probe").probe,
            Probe::Socks5 {
                proxy: "127.0.0.1:1010".into(),
                url: "http://10.1.1.1/x".into()
            }
        );
    }

    #[test]
    fn waterwall_chain_with_and_without_encryption() {
        let keys = [
            ("/nodes/n1/tunnels/ww/enable", "true"),
            ("/nodes/n1/tunnels/ww/kind", "waterwall"),
            ("/nodes/n1/tunnels/ww/listen", "0.0.0.0:443"),
            ("/nodes/n1/tunnels/ww/server", "ww.example.net:8443"),
        ];
        let out = tunnel_out(&keys);
        let [core, cfg] = &out.files[..] else {
            panic!("two files")
        };
        assert_eq!(core.path, "/etc/meduza/tunnels/ww/core.json");
        assert_eq!(
            (cfg.path.as_str(), cfg.mode),
            ("/etc/meduza/tunnels/ww/config.json", MODE_PUBLIC)
        );
        let c: serde_json::Value = serde_json::from_str(&core.content).expect("JSON");
        assert_eq!(c["configs"], json!(["config.json"]));
        assert_eq!(c["misc"]["try-enabling-bbr"], false);
        let n: serde_json::Value = serde_json::from_str(&cfg.content).expect("JSON");
        let nodes = n["nodes"].as_array().expect("nodes");
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0]["type"], "TcpListener");
        assert_eq!(nodes[0]["settings"]["address"], "0.0.0.0");
        assert_eq!(nodes[0]["settings"]["port"], 443);
        assert_eq!(nodes[0]["next"], "output");
        assert_eq!(nodes[1]["type"], "TcpConnector");
        assert_eq!(nodes[1]["settings"]["address"], "ww.example.net");
        assert_eq!(nodes[1]["settings"]["port"], 8443);
        let svc = &out.services[0];
        assert_eq!(svc.argv, ["Waterwall"]);
        assert_eq!(svc.workdir.as_deref(), Some("/etc/meduza/tunnels/ww"));
        assert_eq!(svc.config_files.len(), 2);
        assert!(svc.caps.iter().any(|c| c == "CAP_NET_BIND_SERVICE"));
        assert_eq!(
            svc.health.as_ref().expect("probe").probe,
            Probe::Tcp {
                addr: "127.0.0.1:443".into()
            }
        );

        let mut keys = keys.to_vec();
        keys.push(("/nodes/n1/tunnels/ww/password", "pw"));
        let out = tunnel_out(&keys);
        let cfg = &out.files[1];
        assert_eq!(cfg.mode, MODE_SECRET);
        let n: serde_json::Value = serde_json::from_str(&cfg.content).expect("JSON");
        assert_eq!(n["nodes"][1]["type"], "EncryptionClient");
        assert_eq!(n["nodes"][1]["settings"]["password"], "pw");
        assert_eq!(n["nodes"][0]["next"], "encryption");
    }

    #[test]
    fn missing_and_bad_keys_are_named_and_secrets_redacted() {
        let errs = parse(&[
            ("/nodes/n1/tunnels/pq/enable", "true"),
            ("/nodes/n1/tunnels/pq/kind", "paqet"),
            ("/nodes/n1/tunnels/pq/router_mac", "aa:bb"),
            ("/nodes/n1/tunnels/ic/enable", "true"),
            ("/nodes/n1/tunnels/ic/kind", "icmptunnel"),
            ("/nodes/n1/tunnels/ic/key", "secret-word"),
            ("/nodes/n1/tunnels/ic/api_port", "1080"),
            ("/nodes/n1/tunnels/ww/enable", "true"),
            ("/nodes/n1/tunnels/ww/kind", "waterwall"),
            ("/nodes/n1/tunnels/ww/role", "server"),
            ("/nodes/n1/tunnels/ww/listen", "host.example:80"),
        ])
        .expect_err("invalid");
        let keys: Vec<&str> = errs.0.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "/nodes/n1/tunnels/ic/api_port",
                "/nodes/n1/tunnels/ic/key",
                "/nodes/n1/tunnels/ic/server",
                "/nodes/n1/tunnels/pq/interface",
                "/nodes/n1/tunnels/pq/key",
                "/nodes/n1/tunnels/pq/local_ip",
                "/nodes/n1/tunnels/pq/router_mac",
                "/nodes/n1/tunnels/pq/server",
                "/nodes/n1/tunnels/ww/backend",
                "/nodes/n1/tunnels/ww/listen",
            ],
            "{errs}"
        );
        let key_err = errs
            .0
            .iter()
            .find(|e| e.key.ends_with("ic/key"))
            .expect("key");
        assert_eq!(key_err.value, "<redacted>");
        // A disabled tunnel may be incomplete.
        let cfg = parse(&[
            ("/nodes/n1/tunnels/pq/kind", "paqet"),
            ("/nodes/n1/tunnels/pq/enable", "false"),
        ])
        .expect("a disabled tunnel may lack keys");
        assert!(cfg.node("n1").expect("n1").tunnels[0].settings.is_none());
    }
}
