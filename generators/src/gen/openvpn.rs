//! OpenVPN 2.6: one `/etc/openvpn/<name>.conf` and one `openvpn-<name>` service per
//! enabled instance.
//!
//! Point-to-point tunnels: a static key (`secret`) or TLS (`ca`+`cert`+`key`, with the
//! `tcp-server` side, or a `udp` side without `remote`, acting as TLS server). Keys are
//! inline blocks (`<secret>`, `<ca>`, ...), so the file is mode 0600.
//!
//! Static-key mode is deprecated in OpenVPN 2.6 (it logs `DEPRECATED OPTION`) but still
//! works; 2.7 removes it unless `allow-deprecated-insecure-static-crypto` is given, an
//! option 2.6 refuses (checked: openvpn 2.6.14 exits with "Unrecognized option"), so it
//! is not written. In static-key mode the data-channel cipher defaults to
//! `AES-256-CBC`: 2.6's own default, BF-CBC, is not available with OpenSSL 3 ("Cipher
//! BF-CBC not supported", checked), so both ends must say the same `cipher`.
//!
//! Status comes from the management interface on a unix socket
//! (`/run/meduza/openvpn-<name>.sock`), which needs no password because only root can
//! open it.

use super::{apply_service_overrides, header_hash, service, MODE_SECRET};
use crate::error::ValidationError;
use crate::model::{Node, OpenVpn, OvpnProto};
use crate::plan::service::ReloadStrategy;
use crate::render::{DomainOutput, FileOut, RenderEnv};
use std::fmt::Write as _;

/// Static-key data-channel cipher when `cipher` is not set.
pub const DEFAULT_STATIC_CIPHER: &str = "AES-256-CBC";

pub fn config_path(inst: &OpenVpn) -> String {
    format!("/etc/openvpn/{}.conf", inst.name)
}

/// The management socket the status loop reads (`state`, `bytecount`).
pub fn management_socket(inst: &OpenVpn) -> String {
    format!("/run/meduza/openvpn-{}.sock", inst.name)
}

pub fn service_name(inst: &OpenVpn) -> String {
    format!("openvpn-{}", inst.name)
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
    s.push_str("persist-tun\npersist-key\nscript-security 1\nverb 3\n");
    let _ = writeln!(s, "management {} unix", management_socket(inst));
    if let Some(d) = inst.key_direction {
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
        // TLS: the listening side is the TLS server.
        let server = match inst.proto {
            OvpnProto::TcpServer => true,
            OvpnProto::TcpClient => false,
            OvpnProto::Udp => inst.remotes.is_empty(),
        };
        if server {
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
    }
    if let Some(v) = &inst.tls_auth {
        inline(&mut s, "tls-auth", v);
    }
    if let Some(v) = &inst.tls_crypt {
        inline(&mut s, "tls-crypt", v);
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
        vec![env.bins.openvpn.clone(), "--config".into(), path.clone()],
        &["CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"],
        vec![path.clone()],
        ReloadStrategy::Restart,
    );
    Ok(DomainOutput {
        files: vec![FileOut::new(path, config_text(node, inst), MODE_SECRET)],
        services: vec![apply_service_overrides(node, svc)?],
    })
}
