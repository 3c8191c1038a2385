//! OpenVPN 2.6: one `/etc/openvpn/<name>.conf` and one `openvpn-<name>` service per
//! enabled instance.
//!
//! Owns: the text of the configuration file, the argv of the child and the management
//! socket's path. Which standard OpenVPN directives may be passed through from etcd
//! ([`DIRECTIVES`], checked by [`check_directive`]) is validation, owned by
//! [`crate::model::openvpn`] and re-exported here. Must not: let a value from etcd add
//! a directive that runs a program, reads or writes a file of its choosing, or opens
//! another control channel (see `docs/openvpn.md`).
//!
//! Point-to-point tunnels: a static key (`secret`) or TLS (`ca`+`cert`+`key`, with the
//! `tcp-server` side, or a `udp` side without `remote`, acting as TLS server). Keys are
//! inline blocks (`<secret>`, `<ca>`, ...), so the file is mode 0600. OpenVPN ends an
//! inline block at the first line that starts with its closing tag, so no line of an
//! inline value may start with `<` ([`check_inline`]): a value holding `</ca>` would
//! otherwise add directives of its own.
//!
//! Static-key mode is deprecated in OpenVPN 2.6 (it logs `DEPRECATED OPTION`) but still
//! works; 2.7 removes it unless `allow-deprecated-insecure-static-crypto` is given, an
//! option 2.6 refuses (checked: openvpn 2.6.14 exits with "Unrecognized option"), so it
//! is not written. In static-key mode the data-channel cipher defaults to
//! `AES-256-CBC`: 2.6's own default, BF-CBC, is not available with OpenSSL 3 ("Cipher
//! BF-CBC not supported", checked), so both ends must say the same `cipher`.
//!
//! Status comes from the management interface on a unix socket
//! ([`management_socket`]), which needs no password because only root can open it.
//! It is given on the command line, not in the file: the daemon re-roots `/var/...`
//! arguments under `MEDUZA_ROOT`, so two gateways under test on one host get a socket
//! each (a path inside the file would be shared).

use super::{apply_service_overrides, header_hash, service, MODE_SECRET};
use crate::error::ValidationError;
use crate::model::{Node, OpenVpn, OvpnProto};
// The directive allowlist is validation, so the model owns it; re-exported here, next
// to the file whose content it limits.
pub use crate::model::openvpn::{check_directive, check_inline, DirectiveArg, DIRECTIVES};
use crate::output::{DomainOutput, FileOut, RenderEnv};
use crate::plan::service::ReloadStrategy;
use std::fmt::Write as _;

/// Static-key data-channel cipher when `cipher` is not set.
pub const DEFAULT_STATIC_CIPHER: &str = "AES-256-CBC";

pub fn config_path(inst: &OpenVpn) -> String {
    format!("/etc/openvpn/{}.conf", inst.name)
}

/// The management socket of instance `name`, which the status loop reads (`state all`).
/// `/var/run` is `/run` on the image (and on Debian); under `/var` the daemon re-roots
/// it with the other arguments. A unix socket path holds at most 107 bytes
/// (`sun_path`, unix(7)), root included.
pub fn management_socket(name: &str) -> String {
    format!("/var/run/meduza/openvpn-{name}.sock")
}

pub fn service_name(inst: &OpenVpn) -> String {
    format!("openvpn-{}", inst.name)
}

/// Whether this end is the TLS server: the listening side (`tcp-server`, or `udp`
/// without `remote`).
pub fn is_tls_server(inst: &OpenVpn) -> bool {
    match inst.proto {
        OvpnProto::TcpServer => true,
        OvpnProto::TcpClient => false,
        OvpnProto::Udp => inst.remotes.is_empty(),
    }
}

/// `key-direction`: the `key_direction` key, else in TLS mode with `tls_auth` the
/// usual pairing (server 0, client 1) so that each direction has its own HMAC key. In
/// static-key mode only an explicit value is written (both ends may omit it).
pub fn key_direction(inst: &OpenVpn) -> Option<u8> {
    inst.key_direction.or_else(|| {
        (inst.secret.is_none() && inst.tls_auth.is_some()).then(|| {
            if is_tls_server(inst) {
                0
            } else {
                1
            }
        })
    })
}

/// The configuration file text.
pub fn config_text(node: &Node, inst: &OpenVpn) -> String {
    let mut s = header_hash(&node.id, &format!("openvpn/{}", inst.name));
    let _ = writeln!(s, "dev {}", inst.dev);
    s.push_str("dev-type tun\n");
    let proto = match inst.proto {
        OvpnProto::TcpServer => "tcp-server",
        OvpnProto::TcpClient => "tcp-client",
        OvpnProto::Udp => "udp",
    };
    let _ = writeln!(s, "proto {proto}");
    match inst.proto {
        OvpnProto::TcpClient => s.push_str("nobind\n"),
        _ => {
            let _ = writeln!(s, "lport {}", inst.port);
        }
    }
    for (host, port) in &inst.remotes {
        let _ = writeln!(s, "remote {host} {port}");
    }
    if let Some((local, remote)) = inst.ifconfig {
        let _ = writeln!(s, "ifconfig {local} {remote}");
    }
    if let Some((interval, timeout)) = inst.keepalive {
        let _ = writeln!(s, "keepalive {interval} {timeout}");
    }
    // The management socket is on the command line (see the module comment).
    s.push_str("persist-tun\npersist-key\nscript-security 1\nverb 3\n");
    if !inst.directives.is_empty() {
        let _ = writeln!(
            s,
            "# Passed through from /nodes/{}/openvpn/{}/<directive>:",
            node.id, inst.name
        );
    }
    for (name, args) in &inst.directives {
        let sep = if args.is_empty() { "" } else { " " };
        let _ = writeln!(s, "{name}{sep}{args}");
    }
    if let Some(d) = key_direction(inst) {
        let _ = writeln!(s, "key-direction {d}");
    }
    if let Some(secret) = &inst.secret {
        let _ = writeln!(
            s,
            "cipher {}",
            inst.cipher.as_deref().unwrap_or(DEFAULT_STATIC_CIPHER)
        );
        inline(&mut s, "secret", secret);
    } else {
        // TLS: the listening side is the TLS server. `dh none`: ECDHE only (OpenVPN
        // 2.4+), so no DH parameter file is needed.
        if is_tls_server(inst) {
            s.push_str("tls-server\ndh none\n");
        } else {
            s.push_str("tls-client\n");
        }
        if let Some(c) = &inst.cipher {
            let _ = writeln!(s, "data-ciphers {c}");
        }
        for (tag, v) in [("ca", &inst.ca), ("cert", &inst.cert), ("key", &inst.key)] {
            if let Some(v) = v {
                inline(&mut s, tag, v);
            }
        }
        if let Some(v) = &inst.tls_auth {
            inline(&mut s, "tls-auth", v);
        }
        if let Some(v) = &inst.tls_crypt {
            inline(&mut s, "tls-crypt", v);
        }
    }
    s
}

/// `<tag>\n...\n</tag>`; `content` ends with a newline (the model guarantees it).
fn inline(s: &mut String, tag: &str, content: &str) {
    let _ = write!(s, "<{tag}>\n{content}");
    if !content.ends_with('\n') {
        s.push('\n');
    }
    let _ = writeln!(s, "</{tag}>");
}

/// The file and the `openvpn-<name>` service of one enabled instance.
pub fn render(
    node: &Node,
    inst: &OpenVpn,
    env: &RenderEnv,
) -> Result<DomainOutput, ValidationError> {
    let path = config_path(inst);
    let svc = service(
        &service_name(inst),
        vec![
            env.bins.openvpn.clone(),
            "--config".into(),
            path.clone(),
            "--management".into(),
            management_socket(&inst.name),
            "unix".into(),
        ],
        &["CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"],
        vec![path.clone()],
        ReloadStrategy::Restart,
    );
    Ok(DomainOutput {
        files: vec![FileOut::new(path, config_text(node, inst), MODE_SECRET)],
        services: vec![apply_service_overrides(node, svc)?],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Config;
    use crate::snapshot::Snapshot;

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIBbjCC\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEA\n-----END PRIVATE KEY-----\n";
    const STATIC: &str = "#\n# 2048 bit OpenVPN static key\n#\n\
        -----BEGIN OpenVPN Static key V1-----\n0123abcd\n\
        -----END OpenVPN Static key V1-----\n";
    const BASE: &str = "/nodes/a/openvpn/t/";

    /// A TLS instance `t` on node `a` plus `extra` keys (relative to the instance).
    fn snap(extra: &[(&str, &str)]) -> Snapshot {
        let mut s = Snapshot::default();
        for (k, v) in [
            ("enable", "true"),
            ("proto", "udp"),
            ("ifconfig", "10.8.0.1 10.8.0.2"),
            ("ca", CERT),
            ("cert", CERT),
            ("key", KEY),
        ]
        .iter()
        .chain(extra)
        {
            s.0.insert(format!("{BASE}{k}"), (*v).to_string());
        }
        s.0.retain(|_, v| !v.is_empty());
        s
    }

    fn text(extra: &[(&str, &str)]) -> String {
        let cfg = Config::parse(&snap(extra)).expect("validates");
        let node = cfg.node("a").expect("node a");
        config_text(node, &node.openvpn[0])
    }

    /// The `(key, reason)` of every error.
    fn errors(extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let e = Config::parse(&snap(extra)).expect_err("must be refused");
        e.0.into_iter().map(|e| (e.key, e.reason)).collect()
    }

    fn refused(extra: &[(&str, &str)], key: &str, reason_part: &str) {
        let errs = errors(extra);
        assert!(
            errs.iter()
                .any(|(k, r)| k == &format!("{BASE}{key}") && r.contains(reason_part)),
            "expected an error on {key} containing {reason_part:?}, got {errs:?}"
        );
    }

    /// [`refused`] for each `(key, value, reason part)`, the key set alone.
    fn refused_each(cases: &[(&str, &str, &str)]) {
        for (key, value, reason_part) in cases {
            refused(&[(key, value)], key, reason_part);
        }
    }

    #[test]
    fn tls_server_with_tls_auth_gets_key_direction_0_and_inline_blocks() {
        let t = text(&[("tls_auth", STATIC)]);
        assert!(t.contains("tls-server\ndh none\n"), "{t}");
        assert!(t.contains("key-direction 0\n"), "{t}");
        assert!(t.contains("<ca>\n-----BEGIN CERTIFICATE-----"), "{t}");
        assert!(t.contains("<key>\n-----BEGIN PRIVATE KEY-----"), "{t}");
        assert!(
            t.contains("<tls-auth>\n#\n# 2048 bit OpenVPN static key\n"),
            "{t}"
        );
        assert!(
            t.ends_with("-----END OpenVPN Static key V1-----\n</tls-auth>\n"),
            "{t}"
        );
        assert!(!t.contains("tls-crypt"), "{t}");
        assert!(!t.contains("management"), "on the command line: {t}");
    }

    #[test]
    fn tls_client_with_tls_crypt_needs_no_key_direction() {
        let t = text(&[("remote", "192.0.2.1 1194"), ("tls_crypt", STATIC)]);
        assert!(t.contains("tls-client\n"), "{t}");
        assert!(!t.contains("tls-server"), "{t}");
        assert!(!t.contains("key-direction"), "{t}");
        assert!(t.contains("<tls-crypt>\n#\n"), "{t}");
        assert!(t.ends_with("</tls-crypt>\n"), "{t}");
        // tls_auth's client side: direction 1; an explicit key_direction wins.
        let t = text(&[("remote", "192.0.2.1"), ("tls_auth", STATIC)]);
        assert!(t.contains("key-direction 1\n"), "{t}");
        let t = text(&[("tls_auth", STATIC), ("key_direction", "1")]);
        assert!(t.contains("key-direction 1\n"), "{t}");
    }

    #[test]
    fn management_socket_is_on_the_command_line() {
        let cfg = Config::parse(&snap(&[])).expect("validates");
        let node = cfg.node("a").expect("node a");
        let env = RenderEnv {
            default_gw: None,
            clash_secret: String::new(),
            bins: crate::output::Bins::default(),
        };
        let out = render(node, &node.openvpn[0], &env).expect("renders");
        assert_eq!(
            out.services[0].argv[1..],
            [
                "--config",
                "/etc/openvpn/t.conf",
                "--management",
                "/var/run/meduza/openvpn-t.sock",
                "unix"
            ]
        );
        assert_eq!(out.files[0].mode, MODE_SECRET);
    }

    #[test]
    fn allowed_directives_pass_through_sorted() {
        let t = text(&[
            ("tun-mtu", "1400"),
            ("float", "true"),
            ("mssfix", "0"),
            ("explicit-exit-notify", "2"),
            ("tls-version-min", "1.2 or-highest"),
            ("verify-x509-name", "gw-b name"),
            ("connect-retry", "2  30"),
            (
                "tls-cipher",
                "TLS-ECDHE-ECDSA-WITH-AES-256-GCM-SHA384:@SECLEVEL=2",
            ),
            ("local", "10.99.0.11"),
            ("remote-cert-tls", "client"),
        ]);
        let block: Vec<&str> = t
            .lines()
            .skip_while(|l| !l.starts_with("# Passed through from /nodes/a/openvpn/t/"))
            .skip(1)
            .take_while(|l| !l.starts_with("tls-server"))
            .collect();
        assert_eq!(
            block,
            [
                "connect-retry 2 30",
                "explicit-exit-notify 2",
                "float",
                "local 10.99.0.11",
                "mssfix 0",
                "remote-cert-tls client",
                "tls-cipher TLS-ECDHE-ECDSA-WITH-AES-256-GCM-SHA384:@SECLEVEL=2",
                "tls-version-min 1.2 or-highest",
                "tun-mtu 1400",
                "verify-x509-name gw-b name",
            ],
            "{t}"
        );
        // A flag set to false writes nothing (nor the header line).
        let t = text(&[("float", "false")]);
        assert!(!t.contains("float") && !t.contains("Passed through"), "{t}");
    }

    #[test]
    fn directives_that_run_programs_or_touch_files_are_refused_naming_the_key() {
        for name in [
            "up",
            "down",
            "route-up",
            "tls-verify",
            "plugin",
            "script-security",
            "iproute",
            "config",
            "cd",
            "log",
            "log-append",
            "status",
            "writepid",
            "crl-verify",
            "askpass",
            "auth-user-pass",
            "setenv",
            "tls-crypt-v2",
        ] {
            refused(
                &[(name, "/tmp/x")],
                name,
                "runs a program or reads or writes a file",
            );
        }
        for name in ["management", "management-client-auth", "management-hold"] {
            refused(&[(name, "/tmp/m.sock unix")], name, "management interface");
        }
        refused_each(&[
            ("route", "10.0.0.0 255.0.0.0", "come from FRR"),
            ("redirect-gateway", "def1", "FRR"),
            ("compress", "lz4", "VORACLE"),
            ("comp-lzo", "yes", "VORACLE"),
            ("mark", "1", "TPROXY"),
            ("user", "nobody", "supervisor"),
            ("verb", "9", "set by meduza"),
            ("dev-type", "tap", "`dev` key"),
            ("tls-auth", "x", "`tls_auth` key"),
            ("data-ciphers", "AES-128-GCM", "`cipher` key"),
            ("mode", "server", "point-to-point"),
            ("frobnicate", "1", "allowed: tun-mtu, mssfix"),
            ("tun_mtu", "1400", "spelled `tun-mtu`"),
        ]);
    }

    #[test]
    fn directive_values_are_checked() {
        refused_each(&[
            ("tun-mtu", "99", "out of range 576-9000"),
            ("tun-mtu", "1400 1500", "takes one value"),
            ("tun-mtu", "big", "not a whole number"),
            ("float", "yes", "\"true\" or \"false\""),
            ("local", "gw.example", "not an IP address"),
            ("remote-cert-tls", "peer", "server, client"),
            ("tls-version-min", "1.0", "`1.2` or `1.3`"),
            ("auth", "none", "not `none`"),
            ("tls-cipher", "A:B C", "takes one value"),
            ("connect-retry", "30 5", "out of range 30-86400"),
            ("verify-x509-name", "CN=a b c", "name [subject"),
            ("verify-x509-name", "gw-b cn", "subject, name"),
        ]);
        // Characters OpenVPN's parser gives a meaning: comments, quotes, escapes,
        // inline blocks; and a second line.
        for v in [
            "1400 #x",
            "1400;x",
            "\"1400\"",
            "14\\00",
            "<ca>",
            "1400\nup /bin/sh",
        ] {
            let errs = errors(&[("tun-mtu", v)]);
            assert!(
                errs.iter().any(|(k, _)| k == &format!("{BASE}tun-mtu")),
                "{v:?} must be refused: {errs:?}"
            );
        }
        // explicit-exit-notify and float are UDP mechanisms.
        refused(
            &[("proto", "tcp-server"), ("explicit-exit-notify", "1")],
            "explicit-exit-notify",
            "needs proto udp",
        );
        refused(
            &[("proto", "tcp-server"), ("float", "true")],
            "float",
            "udp",
        );
    }

    #[test]
    fn refused_key_material_is_not_echoed() {
        let e = Config::parse(&snap(&[("tls-crypt", STATIC)])).expect_err("refused");
        let err = e.0.iter().find(|e| e.key == format!("{BASE}tls-crypt"));
        let err = err.expect("an error on tls-crypt");
        assert_eq!(err.value, "<redacted>");
        assert!(err.reason.contains("`tls_crypt` key"), "{}", err.reason);
        // A one-line value is shown, so the operator sees what was refused.
        let e = Config::parse(&snap(&[("tun-mtu", "99")])).expect_err("refused");
        assert_eq!(e.0[0].value, "99");
    }

    #[test]
    fn inline_values_cannot_close_their_block() {
        let evil = format!("{CERT}</ca>\nscript-security 2\nup /bin/sh\n<ca>\n");
        refused(&[("ca", &evil)], "ca", "may start with `<`");
        let evil = STATIC.replace("#\n", "  </tls-crypt>\n");
        refused(&[("tls_crypt", &evil)], "tls_crypt", "may start with `<`");
        refused(
            &[("key", &format!("{KEY}\u{1b}[2J"))],
            "key",
            "printable ASCII",
        );
        assert!(check_inline(STATIC).is_ok());
        assert!(check_inline(CERT).is_ok());
    }

    #[test]
    fn key_material_must_form_one_mode() {
        refused(
            &[("tls_auth", STATIC), ("tls_crypt", STATIC)],
            "tls_crypt",
            "mutually exclusive",
        );
        refused(&[("secret", STATIC)], "secret", "cannot be combined");
        refused(&[("cert", "")], "cert", "ca, cert and key go together");
        refused(
            &[("ca", ""), ("cert", ""), ("key", "")],
            "secret",
            "needs a static secret",
        );
        refused(&[("ca", "/etc/openvpn/ca.crt")], "ca", "not a file path");
        refused(
            &[("tls_auth", "/etc/openvpn/ta.key")],
            "tls_auth",
            "-----BEGIN",
        );
    }
}
