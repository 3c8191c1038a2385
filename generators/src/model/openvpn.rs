//! OpenVPN instances: `/nodes/<id>/openvpn/<name>/*`, including the standard
//! directives passed through and the key material of each mode.
//!
//! Owns: the instance's types, defaults and validation: which mode's keys go together,
//! inline key material that cannot close its block ([`check_inline`]), and which
//! standard OpenVPN directives may be passed through ([`DIRECTIVES`], checked by
//! [`check_directive`]; why the others are refused is in `docs/openvpn.md`).
//! Must not: write the configuration file (`gen::openvpn`).

use super::instance_dev;
use super::routing::{parse_bgp_peer, BgpPeer};
use crate::parse::{self, Reader};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

/// OpenVPN transport (`proto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OvpnProto {
    TcpServer,
    TcpClient,
    Udp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpenVpn {
    pub name: String,
    pub enable: bool,
    pub dev: String,
    pub proto: OvpnProto,
    pub port: u16,
    /// `(host, port)`; port defaults to `port`.
    pub remotes: Vec<(String, u16)>,
    pub ifconfig: Option<(Ipv4Addr, Ipv4Addr)>,
    pub keepalive: Option<(u32, u32)>,
    pub cipher: Option<String>,
    pub key_direction: Option<u8>,
    #[serde(skip)]
    pub secret: Option<String>,
    pub ca: Option<String>,
    pub cert: Option<String>,
    #[serde(skip)]
    pub key: Option<String>,
    #[serde(skip)]
    pub tls_auth: Option<String>,
    #[serde(skip)]
    pub tls_crypt: Option<String>,
    /// Standard OpenVPN directives passed through from `openvpn/<name>/<directive>`
    /// keys (name → arguments, empty for a flag), checked against
    /// [`DIRECTIVES`].
    pub directives: BTreeMap<String, String>,
    pub bgp: Option<BgpPeer>,
}

/// Every `<prefix><name>/` instance (`prefix` is `/nodes/<id>/openvpn/`).
pub(super) fn parse_openvpn(r: &mut Reader<'_>, prefix: &str) -> Vec<OpenVpn> {
    let mut openvpn = Vec::new();
    for (name, b) in r.named_children(prefix, "enable", "instance") {
        let proto = r
            .choice(
                &format!("{b}proto"),
                &[
                    ("tcp-server", OvpnProto::TcpServer),
                    ("tcp-client", OvpnProto::TcpClient),
                    ("udp", OvpnProto::Udp),
                ],
                Some(OvpnProto::Udp),
            )
            .unwrap_or(OvpnProto::Udp);
        let port = r.port(&format!("{b}port")).unwrap_or(1194);
        let Some(dev) = instance_dev(r, &b, "ovpn-", &name) else {
            continue;
        };
        let remotes = r.list(&format!("{b}remote"), |line| {
            let mut words = line.split_whitespace();
            let host = words.next().ok_or("empty remote")?;
            parse::validate_host(host)?;
            let p = match words.next() {
                Some(w) => parse::parse_port(w)?,
                None => port,
            };
            if words.next().is_some() {
                return Err("remote is `host [port]`".into());
            }
            Ok((host.to_string(), p))
        });
        let ifconfig = r.parsed(&format!("{b}ifconfig"), |v| {
            let parts: Vec<&str> = v.split_whitespace().collect();
            match parts.as_slice() {
                [a, b] => Ok((
                    a.parse().map_err(|_| "ifconfig local is not IPv4")?,
                    b.parse().map_err(|_| "ifconfig remote is not IPv4")?,
                )),
                _ => Err("ifconfig is `local remote`".into()),
            }
        });
        let keepalive = r.parsed(&format!("{b}keepalive"), |v| {
            let parts: Vec<&str> = v.split_whitespace().collect();
            match parts.as_slice() {
                [a, b] => {
                    let a = parse::parse_u32_in(a, 1, 3600)?;
                    let b = parse::parse_u32_in(b, 1, 86_400)?;
                    if b <= a {
                        return Err("keepalive timeout must exceed the interval".into());
                    }
                    Ok((a, b))
                }
                _ => Err("keepalive is `interval timeout`".into()),
            }
        });
        let inst = OpenVpn {
            name: name.clone(),
            enable: r.bool(&format!("{b}enable"), false),
            dev,
            proto,
            port,
            remotes,
            ifconfig,
            keepalive,
            cipher: r.parsed(&format!("{b}cipher"), parse::parse_token),
            key_direction: r
                .u32_in(&format!("{b}key_direction"), 0, 1)
                .map(|d| d as u8),
            secret: r.parsed(&format!("{b}secret"), ovpn_static_key),
            ca: r.parsed(&format!("{b}ca"), |v| ovpn_pem(v, "CERTIFICATE")),
            cert: r.parsed(&format!("{b}cert"), |v| ovpn_pem(v, "CERTIFICATE")),
            key: r.parsed(&format!("{b}key"), |v| ovpn_pem(v, "PRIVATE KEY")),
            tls_auth: r.parsed(&format!("{b}tls_auth"), ovpn_static_key),
            tls_crypt: r.parsed(&format!("{b}tls_crypt"), ovpn_static_key),
            directives: parse_ovpn_directives(r, &b, proto),
            bgp: parse_bgp_peer(r, &b),
        };
        if inst.enable {
            if inst.proto == OvpnProto::TcpClient && inst.remotes.is_empty() {
                r.error(
                    &format!("{b}remote"),
                    "",
                    "tcp-client needs at least one remote",
                );
            }
            check_ovpn_keys(r, &b, &inst);
        }
        openvpn.push(inst);
    }
    openvpn
}

/// The keys of an OpenVPN instance itself (besides `bgp/...`); every other key right
/// under `openvpn/<name>/` is a standard OpenVPN directive.
const OPENVPN_KEYS: &[&str] = &[
    "enable",
    "dev",
    "proto",
    "port",
    "remote",
    "ifconfig",
    "keepalive",
    "cipher",
    "key_direction",
    "secret",
    "ca",
    "cert",
    "key",
    "tls_auth",
    "tls_crypt",
];

/// `openvpn/<name>/<directive>` keys: each must be on the allowlist of
/// [`DIRECTIVES`] with a valid value; an error names the key.
fn parse_ovpn_directives(
    r: &mut Reader<'_>,
    base: &str,
    proto: OvpnProto,
) -> BTreeMap<String, String> {
    let snap = r.snap;
    let mut out = BTreeMap::new();
    for (key, value) in snap.prefix(base) {
        let leaf = &key[base.len()..];
        if !leaf.contains('/') {
            r.note(key); // a known key or a directive, checked below
        }
        let value = value.trim();
        if leaf.is_empty() || leaf.contains('/') || OPENVPN_KEYS.contains(&leaf) || value.is_empty()
        {
            continue;
        }
        match check_directive(leaf, value, proto) {
            Ok(Some(args)) => {
                out.insert(leaf.to_string(), args);
            }
            Ok(None) => {}
            Err(reason) => {
                // Key material pasted under OpenVPN's hyphenated spelling
                // (`tls-auth`, `tls-crypt`) must not be echoed into the published
                // errors: multi-line and PEM values are never shown.
                let shown = if value.contains('\n') || value.contains("-----BEGIN") {
                    "<redacted>"
                } else {
                    value
                };
                r.error(key, shown, reason)
            }
        }
    }
    out
}

/// An inline OpenVPN static key (`secret`, `tls_auth`, `tls_crypt`).
fn ovpn_static_key(v: &str) -> Result<String, String> {
    let v = inline_block(v, "OpenVPN Static key V1")?;
    check_inline(&v)?;
    Ok(v)
}

/// Inline OpenVPN PEM (`ca`, `cert`, `key`).
fn ovpn_pem(v: &str, kind: &str) -> Result<String, String> {
    let v = parse::parse_inline_pem(v, kind)?;
    check_inline(&v)?;
    Ok(v)
}

/// The key material of an enabled instance: a static `secret`, or TLS with `ca`,
/// `cert` and `key` together and at most one of `tls_auth` / `tls_crypt` (OpenVPN
/// refuses both, and refuses either without TLS).
fn check_ovpn_keys(r: &mut Reader<'_>, b: &str, inst: &OpenVpn) {
    let tls_parts = [("ca", &inst.ca), ("cert", &inst.cert), ("key", &inst.key)];
    let any_tls = tls_parts.iter().any(|(_, v)| v.is_some())
        || inst.tls_auth.is_some()
        || inst.tls_crypt.is_some();
    if inst.secret.is_some() {
        if any_tls {
            r.error(
                &format!("{b}secret"),
                "",
                "static-key mode cannot be combined with ca/cert/key/tls_auth/tls_crypt; \
                 keep one mode",
            );
        }
        return;
    }
    // A value that did not parse was reported on its own key already.
    let present: Vec<bool> = tls_parts
        .iter()
        .map(|(k, _)| r.str(&format!("{b}{k}")).is_some())
        .collect();
    if !present.contains(&true) {
        r.error(
            &format!("{b}secret"),
            "",
            "needs a static secret or ca+cert+key",
        );
        return;
    }
    for ((k, _), there) in tls_parts.iter().zip(present) {
        if !there {
            r.error(
                &format!("{b}{k}"),
                "",
                "required for TLS: ca, cert and key go together",
            );
        }
    }
    if inst.tls_auth.is_some() && inst.tls_crypt.is_some() {
        r.error(
            &format!("{b}tls_crypt"),
            "",
            "tls_auth and tls_crypt are mutually exclusive (OpenVPN refuses both)",
        );
    }
}

fn inline_block(v: &str, marker: &str) -> Result<String, String> {
    if v.contains(&format!("-----BEGIN {marker}-----")) {
        Ok(format!("{}\n", v.trim_end()))
    } else {
        Err(format!(
            "must be inline content starting with -----BEGIN {marker}-----"
        ))
    }
}

/// Check an inline value (`<ca>`, `<secret>`, `<tls-crypt>`, ...): printable ASCII
/// lines, none starting with `<`. OpenVPN closes the block at the first line that
/// starts (after blanks) with `</tag>` (`read_inline_file` in `options.c`), so such a
/// line would end the block early and turn the rest of the value into directives.
pub fn check_inline(v: &str) -> Result<(), String> {
    if let Some(c) = v
        .chars()
        .find(|c| !(c.is_ascii_graphic() || matches!(c, ' ' | '\t' | '\n' | '\r')))
    {
        return Err(format!(
            "inline content must be printable ASCII (found {c:?})"
        ));
    }
    if v.lines().any(|l| l.trim_start().starts_with('<')) {
        return Err(
            "no line of inline content may start with `<` (it would end the \
                    OpenVPN inline block)"
                .into(),
        );
    }
    Ok(())
}

/// How the value of a passed-through directive is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectiveArg {
    /// `true` writes the bare directive, `false` leaves it out.
    Flag,
    /// One whole number in `min..=max`.
    Uint(u64, u64),
    /// One of these words.
    Word(&'static [&'static str]),
    /// An IP address literal (no host name: nothing is resolved at start).
    Ip,
    /// A `:`-separated list of OpenSSL names (`A-Z a-z 0-9 _ - + ! @ = .`).
    NameList,
    /// `n [max]` seconds (`connect-retry`).
    RetrySecs,
    /// `n` seconds or `infinite` (`resolv-retry`).
    SecsOrInfinite,
    /// `1.2|1.3 [or-highest]` (`tls-version-min`): TLS 1.0 and 1.1 are refused.
    TlsVersion,
    /// `name [subject|name|name-prefix]` (`verify-x509-name`).
    X509Name,
}

/// The standard OpenVPN directives that may be set as
/// `/nodes/<id>/openvpn/<name>/<directive>` (named exactly as in openvpn(8)). Each only
/// tunes the link or tightens TLS: none runs a program, names a file, opens a socket
/// other than the link's, changes routes (FRR owns them) or weakens the crypto. Why
/// each other kind is left out is in [`refusal`] and `docs/openvpn.md`.
pub const DIRECTIVES: &[(&str, DirectiveArg)] = &[
    // The link.
    ("tun-mtu", DirectiveArg::Uint(576, 9000)),
    ("mssfix", DirectiveArg::Uint(0, 9000)),
    ("sndbuf", DirectiveArg::Uint(0, 16 << 20)),
    ("rcvbuf", DirectiveArg::Uint(0, 16 << 20)),
    ("txqueuelen", DirectiveArg::Uint(1, 100_000)),
    ("local", DirectiveArg::Ip),
    ("float", DirectiveArg::Flag),
    ("explicit-exit-notify", DirectiveArg::Uint(1, 10)),
    ("connect-retry", DirectiveArg::RetrySecs),
    ("resolv-retry", DirectiveArg::SecsOrInfinite),
    // TLS.
    ("hand-window", DirectiveArg::Uint(1, 3600)),
    ("reneg-sec", DirectiveArg::Uint(0, 604_800)),
    ("tls-version-min", DirectiveArg::TlsVersion),
    ("tls-cipher", DirectiveArg::NameList),
    ("tls-ciphersuites", DirectiveArg::NameList),
    ("tls-groups", DirectiveArg::NameList),
    ("auth", DirectiveArg::NameList),
    ("remote-cert-tls", DirectiveArg::Word(&["server", "client"])),
    ("verify-x509-name", DirectiveArg::X509Name),
];

/// Why a directive that is not on [`DIRECTIVES`] is refused, for the well-known ones.
fn refusal(name: &str) -> Option<String> {
    let owned = |key: &str| Some(format!("set by meduza from the `{key}` key"));
    match name {
        "dev" | "dev-type" | "dev-node" => owned("dev"),
        "proto" => owned("proto"),
        "port" | "lport" | "bind" | "nobind" => owned("port"),
        "remote" | "rport" | "remote-random" => owned("remote"),
        "ifconfig" => owned("ifconfig"),
        "keepalive" | "ping" | "ping-restart" | "ping-exit" => owned("keepalive"),
        "cipher" | "data-ciphers" | "data-ciphers-fallback" | "ncp-ciphers" => owned("cipher"),
        "key-direction" => owned("key_direction"),
        "secret" | "ca" | "cert" | "key" | "tls-auth" | "tls-crypt" => {
            owned(&name.replace('-', "_"))
        }
        "tls-server" | "tls-client" | "mode" | "server" | "client" | "pull" | "dh" => {
            Some("meduza runs point-to-point links; the TLS role follows proto and remote".into())
        }
        "persist-tun" | "persist-key" | "verb" | "mute" | "status-version" => {
            Some("set by meduza (supervision and logging)".into())
        }
        "route" | "route-ipv6" | "route-gateway" | "redirect-gateway" | "redirect-private"
        | "route-nopull" | "route-noexec" | "route-metric" | "route-delay" | "ifconfig-ipv6" => {
            Some("routes over the tunnel come from FRR (openvpn/<name>/bgp/...)".into())
        }
        "comp-lzo" | "compress" | "allow-compression" | "comp-noadapt" => Some(
            "compression before encryption leaks plaintext (VORACLE); OpenVPN 2.6 \
             disables it by default"
                .into(),
        ),
        "mark" => Some("packet marks belong to meduza's TPROXY rules".into()),
        "user" | "group" | "chroot" | "daemon" | "nice" | "setcon" => {
            Some("the supervisor owns the process (user, directory, priority)".into())
        }
        _ if name.starts_with("management") => {
            Some("meduza owns the management interface (status)".into())
        }
        "up"
        | "down"
        | "route-up"
        | "route-pre-down"
        | "ipchange"
        | "tls-verify"
        | "learn-address"
        | "client-connect"
        | "client-disconnect"
        | "auth-user-pass-verify"
        | "plugin"
        | "script-security"
        | "iproute"
        | "cd"
        | "setenv"
        | "setenv-safe"
        | "up-restart"
        | "down-pre"
        | "up-delay"
        | "config"
        | "log"
        | "log-append"
        | "status"
        | "writepid"
        | "syslog"
        | "tmp-dir"
        | "replay-persist"
        | "crl-verify"
        | "capath"
        | "pkcs12"
        | "extra-certs"
        | "askpass"
        | "auth-user-pass"
        | "tls-export-cert"
        | "tls-crypt-v2"
        | "peer-fingerprint"
        | "http-proxy"
        | "socks-proxy"
        | "ifconfig-pool-persist"
        | "client-config-dir"
        | "echo"
        | "dev-node-file" => Some(
            "it runs a program or reads or writes a file on the gateway; values from \
             etcd never do"
                .into(),
        ),
        _ => None,
    }
}

/// Check the value of the passed-through directive `name` for an instance using
/// `proto`. `Ok(None)`: a flag set to `false` (nothing written); `Ok(Some(args))`: the
/// arguments as written after the name (empty for a flag).
pub fn check_directive(
    name: &str,
    value: &str,
    proto: OvpnProto,
) -> Result<Option<String>, String> {
    let Some((_, arg)) = DIRECTIVES.iter().find(|(n, _)| *n == name) else {
        let allowed: Vec<&str> = DIRECTIVES.iter().map(|(n, _)| *n).collect();
        let hyphen = name.replace('_', "-");
        if hyphen != name && DIRECTIVES.iter().any(|(n, _)| *n == hyphen) {
            return Err(format!(
                "not a known key; the OpenVPN directive is spelled `{hyphen}`"
            ));
        }
        return Err(match refusal(name) {
            Some(why) => format!("OpenVPN directive `{name}` is not passed through: {why}"),
            None => format!(
                "not a known key nor an allowed OpenVPN directive (allowed: {})",
                allowed.join(", ")
            ),
        });
    };
    // OpenVPN's config parser: `#`/`;` start comments, quotes and `\` escape, `<`/`>`
    // open inline blocks. None is needed by an allowed directive.
    if value.contains('\n') {
        return Err("must be one line".into());
    }
    if let Some(c) = value.chars().find(|c| {
        !(c.is_ascii_graphic() || *c == ' ')
            || matches!(c, '#' | ';' | '"' | '\'' | '\\' | '<' | '>')
    }) {
        return Err(format!(
            "character {c:?} is not allowed in a directive value"
        ));
    }
    // openvpn(8): explicit-exit-notify is a UDP mechanism (TCP sees the close itself);
    // float follows a peer whose UDP source address changes.
    if matches!(name, "explicit-exit-notify" | "float") && proto != OvpnProto::Udp {
        return Err(format!("`{name}` needs proto udp"));
    }
    let words: Vec<&str> = value.split_whitespace().collect();
    let one = || match words.as_slice() {
        [w] => Ok(*w),
        _ => Err(format!("`{name}` takes one value")),
    };
    let uint = |w: &str, min: u64, max: u64| match w.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        Ok(_) => Err(format!("out of range {min}-{max}")),
        Err(_) => Err("not a whole number".to_string()),
    };
    let args = match *arg {
        DirectiveArg::Flag => {
            return match one()? {
                "true" => Ok(Some(String::new())),
                "false" => Ok(None),
                _ => Err(format!("`{name}` is a flag: \"true\" or \"false\"")),
            }
        }
        DirectiveArg::Uint(min, max) => uint(one()?, min, max)?.to_string(),
        DirectiveArg::Word(choices) => {
            let w = one()?;
            if !choices.contains(&w) {
                return Err(format!("must be one of: {}", choices.join(", ")));
            }
            w.to_string()
        }
        DirectiveArg::Ip => one()?
            .parse::<IpAddr>()
            .map_err(|_| "not an IP address".to_string())?
            .to_string(),
        DirectiveArg::NameList => {
            let w = one()?;
            let ok = w.len() <= 256
                && w.chars().all(|c| {
                    c.is_ascii_alphanumeric()
                        || matches!(c, '_' | '-' | '+' | '!' | '@' | '=' | '.' | ':')
                });
            if !ok || w.eq_ignore_ascii_case("none") {
                return Err(
                    "must be OpenSSL names separated by `:` (A-Z a-z 0-9 _ - + ! @ = .), \
                     not `none`"
                        .into(),
                );
            }
            w.to_string()
        }
        DirectiveArg::RetrySecs => match words.as_slice() {
            [n] => uint(n, 1, 3600)?.to_string(),
            [n, max] => {
                let n = uint(n, 1, 3600)?;
                let max = uint(max, n, 86_400)?;
                format!("{n} {max}")
            }
            _ => return Err("`connect-retry` is `seconds [max-seconds]`".into()),
        },
        DirectiveArg::SecsOrInfinite => match one()? {
            "infinite" => "infinite".into(),
            w => uint(w, 0, 86_400)?.to_string(),
        },
        DirectiveArg::TlsVersion => match words.as_slice() {
            [v] if matches!(*v, "1.2" | "1.3") => (*v).to_string(),
            [v, "or-highest"] if matches!(*v, "1.2" | "1.3") => format!("{v} or-highest"),
            _ => return Err("must be `1.2` or `1.3`, optionally followed by `or-highest`".into()),
        },
        DirectiveArg::X509Name => {
            let (n, kind) = match words.as_slice() {
                [n] => (*n, None),
                [n, k] => (*n, Some(*k)),
                _ => return Err("`verify-x509-name` is `name [subject|name|name-prefix]`".into()),
            };
            let ok = n.len() <= 256
                && n.chars().all(|c| {
                    c.is_ascii_alphanumeric()
                        || matches!(c, '.' | '_' | '-' | '@' | '=' | ',' | ':')
                });
            if !ok {
                return Err("the name may hold A-Z a-z 0-9 . _ - @ = , : (no spaces)".into());
            }
            match kind {
                None => n.to_string(),
                Some(k) if matches!(k, "subject" | "name" | "name-prefix") => format!("{n} {k}"),
                Some(_) => return Err("the type is subject, name or name-prefix".into()),
            }
        }
    };
    Ok(Some(args))
}
