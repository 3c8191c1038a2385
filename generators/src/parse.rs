//! Typed readers for etcd values. Each reader records a [`ValidationError`] naming the
//! key and value when the value does not parse, and returns `None`/the default so the
//! rest of the snapshot is still checked (all errors are reported together).
//!
//! The reader also records every key the model asks for, present or not: that is the
//! model's vocabulary, owned by the parser itself rather than a second list of key
//! names. A key under `/global/` or `/nodes/<id>/` that was never asked for is an
//! unknown key ([`Reader::unknown_keys`]): a warning, with the nearest asked-for key as
//! a "did you mean". Warnings never block an apply.

use crate::error::ValidationError;
use crate::snapshot::{split_ml, Snapshot};
use ipnet::IpNet;
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

/// A key the model does not know (`/nodes/gw-a/lann`), with the nearest key it does
/// know when one is close. Published at `/updated/<id>/warnings`; never blocks.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Warning {
    pub key: String,
    /// `unknown key` or `unknown key; did you mean /nodes/gw-a/lan?`.
    pub reason: String,
    /// The suggested key, also named in `reason`.
    #[serde(default)]
    pub did_you_mean: Option<String>,
}

impl Warning {
    /// An unknown key, with its suggestion.
    pub fn unknown_key(key: &str, did_you_mean: Option<String>) -> Self {
        let reason = match &did_you_mean {
            Some(k) => format!("unknown key; did you mean {k}?"),
            None => "unknown key".to_string(),
        };
        Self {
            key: key.to_string(),
            reason,
            did_you_mean,
        }
    }

    /// Whether node `id` shows this warning: its own keys and the global ones.
    pub fn concerns_node(&self, id: &str) -> bool {
        self.key.starts_with("/global/") || self.key.starts_with(&format!("/nodes/{id}/"))
    }
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// Reads keys of one snapshot and collects every error.
#[derive(Debug)]
pub struct Reader<'a> {
    pub snap: &'a Snapshot,
    pub errors: Vec<ValidationError>,
    /// Every key asked for, present or not: the vocabulary behind [`Self::unknown_keys`].
    asked: RefCell<BTreeSet<String>>,
    /// Subtrees (prefixes ending in `/`) the model looked at as a whole: a rejected
    /// name (its error says so) or a disabled section it skips.
    subtrees: RefCell<BTreeSet<String>>,
}

impl<'a> Reader<'a> {
    pub fn new(snap: &'a Snapshot) -> Self {
        Self {
            snap,
            errors: Vec::new(),
            asked: RefCell::new(BTreeSet::new()),
            subtrees: RefCell::new(BTreeSet::new()),
        }
    }

    /// Record an error. The value of a secret key (tokens, private keys, secrets,
    /// passwords) is never echoed: errors are published to etcd and the node API.
    /// An error on a prefix (`/nodes/bad id/`) rejects its whole subtree, so its keys
    /// are not reported again as unknown.
    pub fn error(&mut self, key: &str, value: &str, reason: impl Into<String>) {
        if key.ends_with('/') {
            self.note_subtree(key);
        }
        let shown = if is_secret_key(key) && !value.is_empty() {
            "<redacted>"
        } else {
            value
        };
        self.errors.push(ValidationError::new(key, shown, reason));
    }

    /// Mark `key` as read by the model (for code that iterates [`Self::snap`] itself).
    pub fn note(&self, key: &str) {
        self.asked.borrow_mut().insert(key.to_string());
    }

    /// Mark every key under `prefix` as read: a section the model skips on purpose
    /// (a disabled BGP peer keeps its keys without warnings).
    pub fn note_subtree(&self, prefix: &str) {
        self.subtrees.borrow_mut().insert(prefix.to_string());
    }

    /// The keys under `/global/` and `/nodes/<id>/` the model never asked for, each
    /// with the nearest key it did ask for in the same scope ([`suggest`]). Call after
    /// parsing the whole snapshot.
    pub fn unknown_keys(&self) -> Vec<Warning> {
        let asked = self.asked.borrow();
        let subtrees = self.subtrees.borrow();
        let mut out = Vec::new();
        for (key, _) in self.snap.prefix("/") {
            let Some(scope) = key_scope(key) else {
                continue;
            };
            if key.len() == scope.len()
                || asked.contains(key)
                || subtrees.iter().any(|p| key.starts_with(p.as_str()))
            {
                continue;
            }
            let in_scope = asked
                .range(scope.to_string()..)
                .take_while(|k| k.starts_with(scope))
                .map(String::as_str);
            out.push(Warning::unknown_key(key, suggest(key, in_scope)));
        }
        out
    }

    /// The raw value, trimmed; `None` when absent or blank.
    pub fn str(&self, key: &str) -> Option<&'a str> {
        self.note(key);
        self.snap.get(key).map(str::trim).filter(|v| !v.is_empty())
    }

    /// A required key: when it is absent or blank, report it with an empty value and
    /// `reason`. (A present but invalid value has been reported by its parser.)
    pub fn require(&mut self, key: &str, reason: &str) {
        if self.str(key).is_none() {
            self.error(key, "", reason);
        }
    }

    /// The raw value untrimmed (certificates, YAML), `None` when absent or blank.
    pub fn text(&self, key: &str) -> Option<String> {
        self.note(key);
        self.snap
            .get(key)
            .filter(|v| !v.trim().is_empty())
            .map(|v| {
                let mut s = v.to_string();
                if !s.ends_with('\n') {
                    s.push('\n');
                }
                s
            })
    }

    /// The names under `prefix` (`/nodes/a/openvpn/` → `office`, ...) that are valid
    /// names, each with its key base `<prefix><name>/`. An invalid name is reported on
    /// `<base><leaf>` as "`what` name: reason" and skipped.
    pub fn named_children(
        &mut self,
        prefix: &str,
        leaf: &str,
        what: &str,
    ) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for name in self.snap.children(prefix) {
            let base = format!("{prefix}{name}/");
            match validate_name(&name) {
                Ok(()) => out.push((name, base)),
                Err(reason) => {
                    self.note_subtree(&base);
                    self.error(
                        &format!("{base}{leaf}"),
                        &name,
                        format!("{what} name: {reason}"),
                    )
                }
            }
        }
        out
    }

    /// A parsed value via `parse`, which returns the reason on failure.
    pub fn parsed<T>(
        &mut self,
        key: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let raw = self.str(key)?;
        match parse(raw) {
            Ok(v) => Some(v),
            Err(reason) => {
                self.error(key, raw, reason);
                None
            }
        }
    }

    /// Each line parsed via `parse`; bad lines are reported and skipped.
    pub fn list<T>(
        &mut self,
        key: &str,
        mut parse: impl FnMut(&str) -> Result<T, String>,
    ) -> Vec<T> {
        self.note(key);
        let Some(raw) = self.snap.get(key) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for line in split_ml(raw) {
            match parse(line) {
                Ok(v) => out.push(v),
                Err(reason) => self.error(key, line, reason),
            }
        }
        out
    }

    pub fn bool(&mut self, key: &str, default: bool) -> bool {
        self.parsed(key, parse_bool).unwrap_or(default)
    }

    pub fn port(&mut self, key: &str) -> Option<u16> {
        self.parsed(key, parse_port)
    }

    pub fn u32_in(&mut self, key: &str, min: u32, max: u32) -> Option<u32> {
        self.parsed(key, |v| parse_u32_in(v, min, max))
    }

    pub fn u64_in(&mut self, key: &str, min: u64, max: u64) -> Option<u64> {
        self.parsed(key, |v| parse_u64_in(v, min, max))
    }

    pub fn iface(&mut self, key: &str) -> Option<String> {
        self.parsed(key, parse_iface)
    }

    pub fn ipv4(&mut self, key: &str) -> Option<Ipv4Addr> {
        self.parsed(key, |v| {
            Ipv4Addr::from_str(v).map_err(|_| "not an IPv4 address".into())
        })
    }

    pub fn ip(&mut self, key: &str) -> Option<IpAddr> {
        self.parsed(key, |v| {
            IpAddr::from_str(v).map_err(|_| "not an IP address".into())
        })
    }

    pub fn cidrs(&mut self, key: &str) -> Vec<IpNet> {
        self.list(key, parse_cidr)
    }

    pub fn ports(&mut self, key: &str) -> Vec<u16> {
        // Accept newline-, comma- or space-separated ports.
        self.note(key);
        let Some(raw) = self.snap.get(key) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for tok in raw
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|t| !t.is_empty())
        {
            match parse_port(tok) {
                Ok(p) => out.push(p),
                Err(reason) => self.error(key, tok, reason),
            }
        }
        out
    }

    /// One of `choices`, or `default` when absent.
    pub fn choice<T: Copy>(
        &mut self,
        key: &str,
        choices: &[(&str, T)],
        default: Option<T>,
    ) -> Option<T> {
        let Some(raw) = self.str(key) else {
            return default;
        };
        if let Some((_, v)) = choices.iter().find(|(name, _)| *name == raw) {
            return Some(*v);
        }
        let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
        self.error(key, raw, format!("must be one of: {}", names.join(", ")));
        default
    }
}

/// The scope a key's unknown-ness is judged in: `/global/` or `/nodes/<id>/`; `None`
/// for keys outside the model's sections (`/commit`, `/dns/hosts/`, `/fleet/`, ...).
fn key_scope(key: &str) -> Option<&str> {
    if key.starts_with("/global/") {
        return Some("/global/");
    }
    let rest = key.strip_prefix("/nodes/")?;
    let id_len = rest.find('/')?;
    Some(&key[.."/nodes/".len() + id_len + 1])
}

/// The "did you mean" of an unknown key: the nearest candidate within two edits
/// (Levenshtein: `lann` → `lan`, `enabel` → `enable`; one edit when the last segment
/// is shorter than 6 characters, else `asn` would suggest `lan`), else the only
/// candidate with the same last segment at another level (`/nodes/a/asn` →
/// `/nodes/a/bgp/asn`).
pub fn suggest<'k>(key: &str, candidates: impl IntoIterator<Item = &'k str>) -> Option<String> {
    let last = |k: &'k str| k.rsplit('/').next().unwrap_or(k);
    let key_last = key.rsplit('/').next().unwrap_or(key);
    let max = (key_last.chars().count() / 3).clamp(1, 2);
    let mut best: Option<(usize, &str)> = None;
    let mut same_last: Vec<&str> = Vec::new();
    for c in candidates {
        let d = levenshtein(key, c);
        if d <= max && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
        if last(c) == key_last && !same_last.contains(&c) {
            same_last.push(c);
        }
    }
    match (best, same_last.as_slice()) {
        (Some((_, c)), _) => Some(c.to_string()),
        (None, [only]) => Some((*only).to_string()),
        _ => None,
    }
}

/// Edit distance (insertions, deletions, substitutions) between two keys, by chars.
/// Hand-written: a dozen lines, not worth a dependency.
pub fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1)
                .min(row[j] + 1)
                .min(diag + usize::from(ca != *cb));
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// Keys whose values are secrets: their last path segment names a token, key,
/// secret, password, pre-shared key or auth material (`api/token`,
/// `tinc/private_key`, `openvpn/<n>/secret`, `tls_auth`, `tls_crypt`, `clash/secret`).
pub fn is_secret_key(key: &str) -> bool {
    let last = key.rsplit('/').next().unwrap_or(key).to_ascii_lowercase();
    [
        "token",
        "secret",
        "pass",
        "key",
        "psk",
        "tls_auth",
        "tls_crypt",
    ]
    .iter()
    .any(|w| last.contains(w))
}

/// `/nodes/<id>/api/token`: the node API's bearer token (the model and the fleet
/// console's "add node" check it alike).
pub fn parse_api_token(v: &str) -> Result<String, String> {
    if v.len() >= 16 && v.chars().all(|c| c.is_ascii_graphic()) {
        Ok(v.to_string())
    } else {
        Err("token must be at least 16 printable characters without spaces".into())
    }
}

pub fn parse_bool(v: &str) -> Result<bool, String> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err("must be \"true\" or \"false\"".into()),
    }
}

pub fn parse_port(v: &str) -> Result<u16, String> {
    match v.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Ok(_) => Err("port out of range 1-65535".into()),
        Err(_) => Err("not a port number".into()),
    }
}

pub fn parse_u32_in(v: &str, min: u32, max: u32) -> Result<u32, String> {
    parse_whole_in(v, min, max)
}

pub fn parse_u64_in(v: &str, min: u64, max: u64) -> Result<u64, String> {
    parse_whole_in(v, min, max)
}

/// A whole number within `min..=max`.
fn parse_whole_in<T>(v: &str, min: T, max: T) -> Result<T, String>
where
    T: FromStr + PartialOrd + std::fmt::Display + Copy,
{
    match v.parse::<T>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        Ok(_) => Err(format!("out of range {min}-{max}")),
        Err(_) => Err("not a whole number".into()),
    }
}

/// Linux interface names: 1-15 bytes (IFNAMSIZ 16 with the NUL) of `[A-Za-z0-9_.-]`.
pub fn parse_iface(v: &str) -> Result<String, String> {
    if v.is_empty() || v.len() > 15 {
        return Err("interface name must be 1-15 characters".into());
    }
    if !v
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err("interface name may only contain A-Z a-z 0-9 _ . -".into());
    }
    if v == "." || v == ".." {
        return Err("interface name cannot be . or ..".into());
    }
    Ok(v.to_string())
}

/// A network in CIDR form (`10.0.0.0/24`); host bits must be zero.
pub fn parse_cidr(v: &str) -> Result<IpNet, String> {
    let net = IpNet::from_str(v).map_err(|_| "not a CIDR (expected address/prefix)".to_string())?;
    if net.trunc() != net {
        return Err(format!("host bits set; the network is {}", net.trunc()));
    }
    Ok(net)
}

/// An interface address in CIDR form (`10.0.0.1/24`); host bits allowed.
pub fn parse_if_addr(v: &str) -> Result<IpNet, String> {
    IpNet::from_str(v).map_err(|_| "not an address/prefix (e.g. 10.0.0.1/24)".to_string())
}

/// `ip` or `ip:port` (`[v6]:port`), port 53 when absent.
pub fn parse_dns_addr(v: &str) -> Result<SocketAddr, String> {
    if let Ok(ip) = IpAddr::from_str(v) {
        return Ok(SocketAddr::new(ip, 53));
    }
    if let Some(rest) = v.strip_prefix("udp://") {
        return parse_dns_addr(rest);
    }
    if v.contains("://") {
        return Err("only plain DNS (ip or ip:port) is supported by the frontend".into());
    }
    let sa = SocketAddr::from_str(v).map_err(|_| "not ip or ip:port".to_string())?;
    if sa.port() == 0 {
        return Err("port out of range 1-65535".into());
    }
    Ok(sa)
}

/// `host:port` where host is a name or an address; returns (host, port).
pub fn parse_host_port(v: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = v.strip_prefix('[') {
        let (h, p) = rest.split_once("]:").ok_or("expected [v6]:port")?;
        (h, p)
    } else {
        v.rsplit_once(':').ok_or("expected host:port")?
    };
    validate_host(host)?;
    Ok((host.to_string(), parse_port(port)?))
}

/// A DNS name or IP literal, without shell or whitespace characters.
pub fn validate_host(h: &str) -> Result<(), String> {
    if h.is_empty() || h.len() > 253 {
        return Err("host must be 1-253 characters".into());
    }
    if IpAddr::from_str(h).is_ok() {
        return Ok(());
    }
    if !h
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
    {
        return Err("host may only contain letters, digits, - . _".into());
    }
    Ok(())
}

/// A name used in file names and child arguments (instances, tunnels, services).
pub fn validate_name(v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > 64 {
        return Err("name must be 1-64 characters".into());
    }
    if !v
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        || v.starts_with('.')
    {
        return Err("name may only contain A-Z a-z 0-9 _ - . (not starting with .)".into());
    }
    Ok(())
}

/// A base64 WireGuard key (32 bytes).
pub fn parse_wg_key(v: &str) -> Result<String, String> {
    use base64::Engine as _;
    match base64::engine::general_purpose::STANDARD.decode(v) {
        Ok(b) if b.len() == 32 => Ok(v.to_string()),
        Ok(_) => Err("WireGuard key must decode to 32 bytes".into()),
        Err(_) => Err("WireGuard key must be base64".into()),
    }
}

/// Cipher/digest names: OpenSSL names such as `aes-256-cbc`, `sha256`.
pub fn parse_token(v: &str) -> Result<String, String> {
    if v.len() <= 64
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        Ok(v.to_string())
    } else {
        Err("must be a cipher/digest name of [A-Za-z0-9_-]".into())
    }
}

/// Check a PEM block (`-----BEGIN ... <kind>-----`); the whole value is kept.
pub fn parse_inline_pem(v: &str, kind: &str) -> Result<String, String> {
    if v.contains("-----BEGIN") && v.contains(kind) && v.contains("-----END") {
        Ok(format!("{}\n", v.trim_end()))
    } else {
        Err(format!(
            "must be inline PEM content containing `{kind}` (not a file path)"
        ))
    }
}

/// An absolute URL with http or https scheme.
pub fn parse_http_url(v: &str) -> Result<String, String> {
    let rest = v
        .strip_prefix("http://")
        .or_else(|| v.strip_prefix("https://"))
        .ok_or("URL must start with http:// or https://")?;
    if rest.is_empty() || v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("URL has no host or contains whitespace".into());
    }
    Ok(v.to_string())
}

/// The certificates of a PEM value (`/nodes/<id>/api/tls/cert`, a `--tls-cert` file):
/// one or more `CERTIFICATE` sections, leaf first. The one PEM decoder of the project
/// (rustls-pki-types); `meduza::tls` builds on it.
pub fn parse_pem_certs(v: &str) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
    use rustls_pki_types::pem::PemObject as _;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(v.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate chain: {}", pem_error(&e)))?;
    if certs.is_empty() {
        return Err("no \"BEGIN CERTIFICATE\" section".into());
    }
    Ok(certs)
}

/// The private key of a PEM value (PKCS#8, PKCS#1 or SEC1). The reason never quotes
/// the value: it is a secret.
pub fn parse_pem_key(v: &str) -> Result<rustls_pki_types::PrivateKeyDer<'static>, String> {
    use rustls_pki_types::pem::PemObject as _;
    rustls_pki_types::PrivateKeyDer::from_pem_slice(v.as_bytes()).map_err(|e| {
        format!(
            "not a PEM private key (PKCS#8, PKCS#1 or SEC1): {}",
            pem_error(&e)
        )
    })
}

/// A PEM error without the offending line (it may be part of a private key).
fn pem_error(e: &rustls_pki_types::pem::Error) -> &'static str {
    use rustls_pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { .. } => "a section has no END line",
        Error::IllegalSectionStart { .. } => "malformed BEGIN line",
        Error::Base64Decode(_) => "a section is not valid base64",
        Error::NoItemsFound => "no matching section",
        _ => "unreadable PEM",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_values_are_never_echoed() {
        let snap = Snapshot::from_json(r#"{"/nodes/a/api/token":"short"}"#).unwrap();
        let mut r = Reader::new(&snap);
        r.error("/nodes/a/api/token", "short", "too short");
        r.error("/nodes/a/lan", "x", "not a CIDR");
        assert_eq!(r.errors[0].value, "<redacted>");
        assert_eq!(r.errors[1].value, "x");
    }

    fn warnings_of(keys: &[(&str, &str)]) -> Vec<Warning> {
        let mut snap = Snapshot::default();
        for (k, v) in keys {
            snap.0.insert((*k).to_string(), (*v).to_string());
        }
        crate::Config::parse_checked(&snap).1
    }

    /// Each warning's key and its suggestion.
    fn suggestions(w: &[Warning]) -> Vec<(&str, Option<&str>)> {
        w.iter()
            .map(|w| (w.key.as_str(), w.did_you_mean.as_deref()))
            .collect()
    }

    #[test]
    fn misspelled_node_key_warns_with_did_you_mean() {
        let w = warnings_of(&[
            ("/nodes/gw-a/lan", "10.0.0.0/24"),
            ("/nodes/gw-a/lann", "10.0.1.0/24"),
        ]);
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(
            w[0].to_string(),
            "/nodes/gw-a/lann: unknown key; did you mean /nodes/gw-a/lan?"
        );
        assert_eq!(w[0].did_you_mean.as_deref(), Some("/nodes/gw-a/lan"));
        assert!(w[0].concerns_node("gw-a") && !w[0].concerns_node("gw-b"));
    }

    #[test]
    fn known_keys_absent_keys_and_other_sections_give_no_warning() {
        // `lan` is asked for although absent, so `lann` still finds it.
        let w = warnings_of(&[
            ("/nodes/a/lann", "10.0.1.0/24"),
            ("/nodes/a/tinc/enable", "false"),
            ("/global/mesh_type", "tinc"),
            ("/commit", "1"),
            ("/dns/hosts/x", "10.0.0.1"),
            ("/fleet/anything", "x"),
            ("/updated/a/online", "1"),
        ]);
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].did_you_mean.as_deref(), Some("/nodes/a/lan"));
    }

    #[test]
    fn suggestions_by_edit_distance_or_by_last_segment() {
        let w = warnings_of(&[
            ("/global/mesh_typ", "tinc"),
            ("/nodes/a/bgp/asnn", "65000"),
            ("/nodes/a/asn", "65000"),
            ("/nodes/a/totally/unrelated", "x"),
        ]);
        assert_eq!(
            suggestions(&w),
            vec![
                ("/global/mesh_typ", Some("/global/mesh_type")),
                ("/nodes/a/asn", Some("/nodes/a/bgp/asn")),
                ("/nodes/a/bgp/asnn", Some("/nodes/a/bgp/asn")),
                ("/nodes/a/totally/unrelated", None),
            ]
        );
        assert_eq!(w[3].to_string(), "/nodes/a/totally/unrelated: unknown key");
    }

    #[test]
    fn named_children_disabled_peers_and_directives_are_known() {
        let w = warnings_of(&[
            ("/nodes/a/openvpn/office/enable", "false"),
            ("/nodes/a/openvpn/office/verb", "3"),
            ("/nodes/a/openvpn/office/bgp/peer_asn", "65001"),
            ("/nodes/a/openvpn/office/enabel", "true"),
            ("/nodes/a/wireguard/wg1/peer/p1/public_key", "x"),
            ("/nodes/a/wireguard/wg1/peer/p1/publickey", "x"),
        ]);
        assert_eq!(
            suggestions(&w),
            vec![(
                "/nodes/a/wireguard/wg1/peer/p1/publickey",
                Some("/nodes/a/wireguard/wg1/peer/p1/public_key")
            )],
            "`enabel` is an unknown directive, already an error; {w:?}"
        );
    }

    #[test]
    fn the_documented_example_has_no_unknown_keys() {
        let text = include_str!("../../docs/examples/three-nodes.json");
        let snap = Snapshot::from_json(text).expect("example is JSON");
        let (cfg, w) = crate::Config::parse_checked(&snap);
        assert!(cfg.is_ok());
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn a_rejected_node_id_is_one_error_not_a_warning_per_key() {
        let w = warnings_of(&[("/nodes/bad id/lan", "10.0.0.0/24")]);
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn levenshtein_distances() {
        assert_eq!(levenshtein("lan", "lan"), 0);
        assert_eq!(levenshtein("lann", "lan"), 1);
        assert_eq!(levenshtein("enabel", "enable"), 2);
        assert_eq!(levenshtein("", "abc"), 3);
        assert_eq!(suggest("/x/abcdef", ["/x/zzzzzz"]), None);
    }

    #[test]
    fn iface_names() {
        assert!(parse_iface("eth0").is_ok());
        assert!(parse_iface("wg-office.1").is_ok());
        assert!(parse_iface("abcdefghijklmnop").is_err()); // 16 chars
        assert!(parse_iface("eth0;reboot").is_err());
        assert!(parse_iface("").is_err());
    }

    #[test]
    fn ports() {
        assert_eq!(parse_port("655"), Ok(655));
        assert!(parse_port("0").is_err());
        assert!(parse_port("70000").is_err());
        assert!(parse_port("http").is_err());
    }

    #[test]
    fn cidrs_need_network_address() {
        assert!(parse_cidr("10.0.0.0/24").is_ok());
        assert!(parse_cidr("fd00::/64").is_ok());
        assert!(parse_cidr("10.0.0.1/24").is_err());
        assert!(parse_cidr("10.0.0.0").is_err());
        assert!(parse_cidr("banana").is_err());
    }

    #[test]
    fn dns_addrs() {
        assert_eq!(parse_dns_addr("1.1.1.1").unwrap().port(), 53);
        assert_eq!(parse_dns_addr("127.0.0.1:5353").unwrap().port(), 5353);
        assert_eq!(parse_dns_addr("[::1]:53").unwrap().port(), 53);
        assert!(parse_dns_addr("tls://1.1.1.1").is_err());
    }

    #[test]
    fn host_ports() {
        assert_eq!(parse_host_port("vpn.example.com:1194").unwrap().1, 1194);
        assert!(parse_host_port("a b:1").is_err());
        assert!(parse_host_port("$(reboot):1").is_err());
    }
}
