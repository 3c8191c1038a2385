//! Connection settings: `ETCD_ENDPOINTS`, `ETCD_CA`/`ETCD_CERT`/`ETCD_KEY`,
//! `ETCD_USER`/`ETCD_PASS` (DESIGN §2), validated into an [`EtcdConfig`].

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use super::EtcdError;

/// The default endpoint when `ETCD_ENDPOINTS` is unset.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:2379";

/// Command-line flags with their environment fallbacks. Flatten this into a clap
/// command; flags win over the environment, which wins over the default.
#[derive(Clone, Default, clap::Args)]
pub struct EtcdArgs {
    /// Comma-separated etcd endpoints, `http(s)://host:port`.
    #[arg(long = "etcd-endpoints", env = "ETCD_ENDPOINTS", default_value = DEFAULT_ENDPOINT)]
    pub endpoints: String,
    /// PEM file of the CA that signed the etcd server certificate (enables TLS).
    #[arg(long = "etcd-ca", env = "ETCD_CA")]
    pub ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS.
    #[arg(long = "etcd-cert", env = "ETCD_CERT")]
    pub cert: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[arg(long = "etcd-key", env = "ETCD_KEY")]
    pub key: Option<PathBuf>,
    /// etcd user name (enables authentication).
    #[arg(long = "etcd-user", env = "ETCD_USER")]
    pub user: Option<String>,
    /// etcd password of `--etcd-user`.
    #[arg(long = "etcd-pass", env = "ETCD_PASS", hide_env_values = true)]
    pub pass: Option<String>,
}

impl fmt::Debug for EtcdArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdArgs")
            .field("endpoints", &self.endpoints)
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("user", &self.user)
            .field("pass", &self.pass.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Timeouts of the connection. Every call is bounded by `request` on our side (all its
/// attempts on all members together), each attempt on one member by
/// [`EtcdTimeouts::attempt`], because tonic waits without limit for a ready endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EtcdTimeouts {
    /// TCP + TLS connect.
    pub connect: Duration,
    /// One call (a unary RPC or the creation of a stream), with its failover to other
    /// members.
    pub request: Duration,
    /// HTTP/2 keep-alive ping interval.
    pub keep_alive_interval: Duration,
    /// HTTP/2 keep-alive ping timeout: a connection that does not answer is dropped.
    pub keep_alive_timeout: Duration,
}

/// The longest one attempt on one member may take when other members could answer
/// instead (see [`EtcdTimeouts::attempt`]).
pub const CLUSTER_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

impl EtcdTimeouts {
    /// How long one attempt on one member may take before the call moves on to the
    /// next member and the silent one is handed to the background probe. With one
    /// member there is nowhere to go: the whole `request` timeout. With several, at
    /// most [`CLUSTER_ATTEMPT_TIMEOUT`]: a healthy member answers in milliseconds,
    /// and a dead or frozen one must not hold a call (a reconcile pass, a status
    /// write, a lease keep-alive) for the full request timeout.
    pub fn attempt(&self, members: usize) -> Duration {
        if members > 1 {
            self.request.min(CLUSTER_ATTEMPT_TIMEOUT)
        } else {
            self.request
        }
    }
}

impl Default for EtcdTimeouts {
    fn default() -> Self {
        EtcdTimeouts {
            connect: Duration::from_secs(3),
            request: Duration::from_secs(5),
            keep_alive_interval: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(5),
        }
    }
}

/// Validated connection settings.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Endpoints with their scheme, e.g. `https://10.0.0.1:2379`.
    pub endpoints: Vec<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// User and password, both or neither.
    pub user: Option<(String, String)>,
    pub timeouts: EtcdTimeouts,
}

impl fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field("timeouts", &self.timeouts)
            .finish()
    }
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: vec![DEFAULT_ENDPOINT.to_owned()],
            ca: None,
            cert: None,
            key: None,
            user: None,
            timeouts: EtcdTimeouts::default(),
        }
    }
}

impl EtcdConfig {
    /// Validates parsed flags.
    pub fn from_args(args: &EtcdArgs) -> Result<Self, EtcdError> {
        Self::build(
            &args.endpoints,
            args.ca.clone(),
            args.cert.clone(),
            args.key.clone(),
            args.user.clone(),
            args.pass.clone(),
        )
    }

    /// Reads `ETCD_*` from the process environment (for code paths without clap).
    pub fn from_env() -> Result<Self, EtcdError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self::build(
            &var("ETCD_ENDPOINTS").unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned()),
            var("ETCD_CA").map(PathBuf::from),
            var("ETCD_CERT").map(PathBuf::from),
            var("ETCD_KEY").map(PathBuf::from),
            var("ETCD_USER"),
            var("ETCD_PASS"),
        )
    }

    /// Validates raw settings.
    ///
    /// A bare `host:port` gets `https://` when a CA is given and `http://` otherwise.
    /// `https` needs `ETCD_CA`: the client trusts no system roots.
    pub fn build(
        endpoints: &str,
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        user: Option<String>,
        pass: Option<String>,
    ) -> Result<Self, EtcdError> {
        let tls_wanted = ca.is_some();
        let mut eps = Vec::new();
        for raw in endpoints
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            eps.push(normalize_endpoint(raw, tls_wanted)?);
        }
        if eps.is_empty() {
            return Err(config_err("ETCD_ENDPOINTS", endpoints, "no endpoint given"));
        }
        let https = eps.iter().filter(|e| e.starts_with("https://")).count();
        if https != 0 && https != eps.len() {
            return Err(config_err(
                "ETCD_ENDPOINTS",
                endpoints,
                "mixes http:// and https:// endpoints",
            ));
        }
        if https == 0 && tls_wanted {
            return Err(config_err(
                "ETCD_ENDPOINTS",
                endpoints,
                "ETCD_CA is set but the endpoints use http://",
            ));
        }
        if https != 0 && !tls_wanted {
            return Err(config_err(
                "ETCD_CA",
                "",
                "https:// endpoints need the CA certificate of the etcd server",
            ));
        }
        match (&cert, &key) {
            (Some(_), None) => {
                return Err(config_err(
                    "ETCD_KEY",
                    "",
                    "ETCD_CERT is set without ETCD_KEY",
                ))
            }
            (None, Some(_)) => {
                return Err(config_err(
                    "ETCD_CERT",
                    "",
                    "ETCD_KEY is set without ETCD_CERT",
                ))
            }
            _ => {}
        }
        let user = match (user, pass) {
            (Some(u), Some(p)) => Some((u, p)),
            (None, None) => None,
            (Some(u), None) => {
                return Err(config_err(
                    "ETCD_PASS",
                    "",
                    &format!("ETCD_USER={u} has no password"),
                ))
            }
            (None, Some(_)) => {
                return Err(config_err(
                    "ETCD_USER",
                    "",
                    "ETCD_PASS is set without ETCD_USER",
                ))
            }
        };
        Ok(EtcdConfig {
            endpoints: eps,
            ca,
            cert,
            key,
            user,
            timeouts: EtcdTimeouts::default(),
        })
    }

    /// Whether the endpoints are TLS.
    pub fn uses_tls(&self) -> bool {
        self.ca.is_some()
    }

    /// The endpoints joined for messages.
    pub fn endpoints_display(&self) -> String {
        self.endpoints.join(",")
    }

    /// etcd-client options: timeouts, HTTP/2 keep-alive, TLS files read now, user with
    /// automatic refresh of an expired token, and "require leader": a member cut off
    /// from its leader cancels our streams (after 3 election timeouts) instead of
    /// leaving a watch hanging forever (etcd#8980, kubernetes PR #89881).
    pub fn connect_options(&self) -> Result<ConnectOptions, EtcdError> {
        let t = &self.timeouts;
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(t.connect)
            .with_timeout(t.request)
            .with_keep_alive(t.keep_alive_interval, t.keep_alive_timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let Some(ca) = &self.ca {
            let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca)?));
            if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            opts = opts.with_tls(tls);
        }
        if let Some((user, pass)) = &self.user {
            opts = opts
                .with_user(user.clone(), pass.clone())
                .with_auto_token_refresh(true);
        }
        Ok(opts)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|source| EtcdError::TlsFile {
        path: path.to_owned(),
        source,
    })
}

fn config_err(setting: &'static str, value: &str, reason: &str) -> EtcdError {
    EtcdError::Config {
        setting,
        value: value.to_owned(),
        reason: reason.to_owned(),
    }
}

fn normalize_endpoint(raw: &str, tls_wanted: bool) -> Result<String, EtcdError> {
    let (scheme, rest) = if let Some(rest) = raw.strip_prefix("http://") {
        ("http://", rest)
    } else if let Some(rest) = raw.strip_prefix("https://") {
        ("https://", rest)
    } else if raw.contains("://") {
        return Err(config_err(
            "ETCD_ENDPOINTS",
            raw,
            "scheme must be http:// or https://",
        ));
    } else if tls_wanted {
        ("https://", raw)
    } else {
        ("http://", raw)
    };
    let rest = rest.trim_end_matches('/');
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(config_err("ETCD_ENDPOINTS", raw, "expected host:port"));
    };
    let host_ok = !host.is_empty()
        && !host.contains('/')
        && (!host.contains(':') || (host.starts_with('[') && host.ends_with(']')));
    if !host_ok {
        return Err(config_err("ETCD_ENDPOINTS", raw, "invalid host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(format!("{scheme}{host}:{p}")),
        _ => Err(config_err("ETCD_ENDPOINTS", raw, "port must be 1-65535")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(eps: &str, ca: Option<&str>) -> Result<EtcdConfig, EtcdError> {
        EtcdConfig::build(eps, ca.map(PathBuf::from), None, None, None, None)
    }

    #[test]
    fn endpoints_are_split_and_normalized() {
        let c = build(" http://10.0.0.1:2379 , 10.0.0.2:2379,[::1]:2380", None).unwrap();
        assert_eq!(
            c.endpoints,
            vec![
                "http://10.0.0.1:2379",
                "http://10.0.0.2:2379",
                "http://[::1]:2380"
            ]
        );
        assert!(!c.uses_tls());
        let c = build("10.0.0.1:2379,https://e2:2379", Some("/ca.pem")).unwrap();
        assert_eq!(
            c.endpoints,
            vec!["https://10.0.0.1:2379", "https://e2:2379"]
        );
        assert!(c.uses_tls());
    }

    #[test]
    fn bad_endpoints_name_the_setting_and_value() {
        for (eps, ca) in [
            ("", None),
            ("ftp://x:1", None),
            ("http://x", None),
            ("http://x:0", None),
            ("http://x:99999", None),
            ("http://a:1,https://b:2", Some("/ca")),
            ("http://a:1", Some("/ca")),
            ("https://a:1", None),
            ("http://::1:2379", None),
        ] {
            let err = build(eps, ca).unwrap_err();
            assert!(matches!(err, EtcdError::Config { .. }), "{eps}: {err:?}");
        }
        let err = build("http://x:abc", None).unwrap_err().to_string();
        assert!(
            err.contains("ETCD_ENDPOINTS") && err.contains("http://x:abc"),
            "{err}"
        );
    }

    #[test]
    fn user_and_password_go_together() {
        let ok =
            EtcdConfig::build("a:1", None, None, None, Some("u".into()), Some("p".into())).unwrap();
        assert_eq!(ok.user, Some(("u".into(), "p".into())));
        assert!(
            !format!("{ok:?}").contains("\"p\""),
            "password must not be logged"
        );
        assert!(EtcdConfig::build("a:1", None, None, None, Some("u".into()), None).is_err());
        assert!(EtcdConfig::build("a:1", None, None, None, None, Some("p".into())).is_err());
        assert!(EtcdConfig::build(
            "a:1",
            Some("/ca".into()),
            Some("/c".into()),
            None,
            None,
            None
        )
        .is_err());
    }

    #[test]
    fn one_attempt_is_short_only_when_another_member_could_answer() {
        let t = EtcdTimeouts::default();
        assert_eq!(t.attempt(1), t.request);
        assert_eq!(t.attempt(3), CLUSTER_ATTEMPT_TIMEOUT);
        let short = EtcdTimeouts {
            request: Duration::from_millis(500),
            ..t
        };
        assert_eq!(short.attempt(3), Duration::from_millis(500));
    }

    #[test]
    fn missing_tls_file_is_reported_with_its_path() {
        let c = build("https://a:1", Some("/nonexistent/ca.pem")).unwrap();
        let err = c.connect_options().unwrap_err();
        assert!(
            matches!(&err, EtcdError::TlsFile { path, .. } if path == Path::new("/nonexistent/ca.pem"))
        );
    }
}
