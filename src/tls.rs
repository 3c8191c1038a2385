//! HTTPS for the node API and the fleet page (server side), and the fleet manager's
//! trust in node certificates (client side), on rustls with the ring provider.
//!
//! Owns: loading a certificate chain and private key from PEM (files, or etcd values
//! decoded by `meduza_generators::parse`) into a rustls [`ServerConfig`] with the leaf's
//! SHA-256 [`Fingerprint`]; [`serve`], which serves an axum `Router` plain or over TLS
//! on one listener, choosing per connection from a `watch` channel, so a new
//! certificate (or TLS switched on or off) takes effect for the next connection without
//! rebinding; the client trust of the manager ([`ServerTrust`]: a CA, a pinned
//! fingerprint, or the webpki roots) as a `reqwest::Client`; and naming a certificate
//! failure ("certificate not trusted: ...") in a handshake error.
//! Must not: log, return or publish key material (an error about a key names the key
//! and what is wrong, never its content); read etcd (callers hand the PEM in).

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, ServerConfig, SignatureScheme};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// A TLS handshake that has not finished by then is dropped (a client that opens a
/// connection and sends nothing must not hold a task forever).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// `what` names the key, flag or variable; `reason` never quotes a key.
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("{what}: cannot read {path}: {reason}")]
    Read {
        what: String,
        path: String,
        reason: String,
    },
}

fn invalid(what: &str, reason: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        what: what.to_string(),
        reason: reason.into(),
    }
}

/// The ring provider (the one in the tree; no aws-lc).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// SHA-256 of a certificate's DER: what `/updated/<id>/api_tls` publishes and
/// `/fleet/nodes/<id>/cert_sha256` pins. Shown as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(der: &[u8]) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, der);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Fingerprint(out)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{self}")
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = String;

    /// 64 hex digits, any case, optionally `sha256:`-prefixed and `:`-separated (as
    /// `openssl x509 -fingerprint -sha256` prints it).
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let s = s
            .strip_prefix("sha256:")
            .or_else(|| s.strip_prefix("SHA256:"))
            .or_else(|| s.strip_prefix("sha256 Fingerprint="))
            .unwrap_or(s);
        let hex: Vec<u8> = s.bytes().filter(|b| *b != b':').collect();
        if hex.len() != 64 {
            return Err("must be a SHA-256 fingerprint: 64 hex digits".into());
        }
        let mut out = [0u8; 32];
        for (i, pair) in hex.chunks(2).enumerate() {
            let text = std::str::from_utf8(pair).map_err(|_| "not hex".to_string())?;
            out[i] = u8::from_str_radix(text, 16).map_err(|_| "not hex".to_string())?;
        }
        Ok(Fingerprint(out))
    }
}

/// A loaded server identity.
#[derive(Clone)]
pub struct ServerIdentity {
    pub config: Arc<ServerConfig>,
    /// Of the leaf certificate.
    pub fingerprint: Fingerprint,
}

impl fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerIdentity({:?})", self.fingerprint)
    }
}

/// Build the server identity from PEM text. `cert_what` / `key_what` name where each
/// came from (the etcd key, or the variable and path) for errors.
pub fn server_identity(
    cert_what: &str,
    cert_pem: &str,
    key_what: &str,
    key_pem: &str,
) -> Result<ServerIdentity, TlsError> {
    let certs =
        meduza_generators::parse::parse_pem_certs(cert_pem).map_err(|r| invalid(cert_what, r))?;
    let key = meduza_generators::parse::parse_pem_key(key_pem).map_err(|r| invalid(key_what, r))?;
    let fingerprint = Fingerprint::of(certs[0].as_ref());
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(cert_what, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        // rustls' reasons here (key does not match the certificate, unsupported key
        // type) describe the key, never quote it.
        .map_err(|e| invalid(key_what, format!("not usable with {cert_what}: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(ServerIdentity {
        config: Arc::new(config),
        fingerprint,
    })
}

/// Read a PEM file named by `what` (a flag or variable).
pub fn read_pem(what: &str, path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|e| TlsError::Read {
        what: what.to_string(),
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// [`server_identity`] from two files.
pub fn server_identity_from_files(
    cert_what: &str,
    cert: &Path,
    key_what: &str,
    key: &Path,
) -> Result<ServerIdentity, TlsError> {
    let cert_name = format!("{cert_what} ({})", cert.display());
    let key_name = format!("{key_what} ({})", key.display());
    server_identity(
        &cert_name,
        &read_pem(cert_what, cert)?,
        &key_name,
        &read_pem(key_what, key)?,
    )
}

/// What [`serve`] speaks on each new connection: `None` plain HTTP, `Some` TLS. The
/// value is read per connection; connections already open keep theirs.
pub type ServerTls = watch::Receiver<Option<Arc<ServerConfig>>>;

/// A [`ServerTls`] that never changes.
pub fn fixed(config: Option<Arc<ServerConfig>>) -> ServerTls {
    watch::channel(config).1
}

/// Serve `app` on `listener` until `shutdown` resolves, then finish the requests in
/// flight (axum's graceful shutdown). Each connection is plain or TLS as `tls` says
/// when it is accepted.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    tls: ServerTls,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(SwitchingListener::new(listener, tls), app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// A connection as axum sees it: a TCP stream or a TLS stream over one.
trait Conn: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Conn for T {}

/// An axum listener that accepts TCP in a task and runs each TLS handshake in its own
/// task (with [`HANDSHAKE_TIMEOUT`]), so one slow client does not hold back the others.
struct SwitchingListener {
    local: std::io::Result<SocketAddr>,
    ready: mpsc::Receiver<(Box<dyn Conn>, SocketAddr)>,
    task: JoinHandle<()>,
}

impl SwitchingListener {
    fn new(listener: TcpListener, tls: ServerTls) -> Self {
        let local = listener.local_addr();
        let (tx, ready) = mpsc::channel(64);
        let task = tokio::spawn(accept_loop(listener, tls, tx));
        Self { local, ready, task }
    }
}

impl Drop for SwitchingListener {
    fn drop(&mut self) {
        // axum drops the listener when shutdown starts: stop accepting at once.
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: ServerTls,
    tx: mpsc::Sender<(Box<dyn Conn>, SocketAddr)>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(err) => {
                // EMFILE and the like: back off instead of spinning.
                warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let config = tls.borrow().clone();
        let Some(config) = config else {
            if tx.send((Box::new(tcp), peer)).await.is_err() {
                return;
            }
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = tx.send((Box::new(stream), peer)).await;
                }
                Ok(Err(err)) => debug!(%peer, %err, "tls handshake failed"),
                Err(_) => debug!(%peer, "tls handshake timed out"),
            }
        });
    }
}

impl axum::serve::Listener for SwitchingListener {
    type Io = Box<dyn Conn>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept task ended (it only does when nobody receives): no more
            // connections.
            None => futures::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match &self.local {
            Ok(a) => Ok(*a),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        }
    }
}

/// How the fleet manager trusts a node's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ServerTrust {
    /// The webpki roots (reqwest's default).
    Default,
    /// Signed by one of these CA certificates (DER), for the URL's host name or IP.
    Ca(Vec<CertificateDer<'static>>),
    /// The leaf's SHA-256 is this; chain and name are not checked (the pin is the
    /// identity). The handshake signature is still verified.
    Pin(Fingerprint),
}

/// The CA certificates of a PEM value named `what` (`--node-ca`, `/fleet/ca`).
pub fn ca_certs(what: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    meduza_generators::parse::parse_pem_certs(pem).map_err(|r| invalid(what, r))
}

/// A reqwest builder that trusts node certificates as `trust` says.
pub fn client_builder(trust: &ServerTrust) -> Result<reqwest::ClientBuilder, TlsError> {
    let builder = reqwest::Client::builder();
    let versions = |p: Arc<CryptoProvider>| {
        rustls::ClientConfig::builder_with_provider(p)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("tls client", e.to_string()))
    };
    let config = match trust {
        ServerTrust::Default => return Ok(builder),
        ServerTrust::Ca(cas) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in cas {
                roots
                    .add(c.clone())
                    .map_err(|e| invalid("node CA", format!("not a usable CA: {e}")))?;
            }
            versions(provider())?
                .with_root_certificates(roots)
                .with_no_client_auth()
        }
        ServerTrust::Pin(pin) => {
            let p = provider();
            let verifier = PinVerifier {
                pin: *pin,
                algs: p.signature_verification_algorithms,
            };
            versions(p)?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth()
        }
    };
    Ok(builder.use_preconfigured_tls(config))
}

/// The leaf's fingerprint differs from the pin.
#[derive(Debug)]
struct PinMismatch {
    expected: Fingerprint,
    presented: Fingerprint,
}

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SHA-256 {} does not match the pinned {}",
            self.presented, self.expected
        )
    }
}

impl std::error::Error for PinMismatch {}

/// Accepts exactly the pinned leaf certificate (rustls has no pinning verifier).
#[derive(Debug)]
struct PinVerifier {
    pin: Fingerprint,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = Fingerprint::of(end_entity.as_ref());
        if presented == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(PinMismatch {
                    expected: self.pin,
                    presented,
                })),
            )))
        }
    }

    // The peer must still prove it holds the pinned certificate's key.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// "certificate not trusted: <why>" when `err`'s source chain holds rustls' verdict on
/// the peer's certificate. hyper-rustls wraps it in an `io::Error` inside another
/// `io::Error`, and `io::Error::source` skips the wrapped error, so each `io::Error` is
/// also opened with `get_ref`.
pub fn untrusted_reason(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut todo = vec![err];
    while let Some(e) = todo.pop() {
        if let Some(rustls::Error::InvalidCertificate(c)) = e.downcast_ref::<rustls::Error>() {
            let why = match c {
                CertificateError::Other(o) => o.to_string(),
                other => other.to_string(),
            };
            return Some(format!("certificate not trusted: {why}"));
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            todo.push(inner);
        }
        todo.extend(e.source());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A throwaway CA-less self-signed pair (ECDSA P-256), made once with
    /// `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes
    /// -subj /CN=test -addext subjectAltName=IP:127.0.0.1 -days 36500`.
    const CERT: &str = include_str!("../tests/data/tls/self.crt");
    const KEY: &str = include_str!("../tests/data/tls/self.key");
    const OTHER_KEY: &str = include_str!("../tests/data/tls/other.key");

    #[test]
    fn loads_a_certificate_and_its_key() {
        let id = server_identity("/nodes/a/api/tls/cert", CERT, "/nodes/a/api/tls/key", KEY)
            .expect("good pair");
        let der = meduza_generators::parse::parse_pem_certs(CERT).unwrap();
        assert_eq!(id.fingerprint, Fingerprint::of(der[0].as_ref()));
        assert_eq!(id.fingerprint.to_string().len(), 64);
    }

    #[test]
    fn a_bad_key_is_named_and_never_quoted() {
        let garbage =
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1ieXRlcw==\n-----END PRIVATE KEY-----\n";
        for key in [garbage, "secret-key-bytes", OTHER_KEY] {
            let err = server_identity("/nodes/a/api/tls/cert", CERT, "/nodes/a/api/tls/key", key)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("/nodes/a/api/tls/key: "), "{err}");
            assert!(
                !err.contains("secret-key") && !err.contains("c2VjcmV0"),
                "{err}"
            );
            assert!(!err.contains(OTHER_KEY.lines().nth(1).unwrap()), "{err}");
        }
        let err = server_identity("/nodes/a/api/tls/cert", "nope", "/nodes/a/api/tls/key", KEY)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/nodes/a/api/tls/cert: "), "{err}");
    }

    #[test]
    fn fingerprints_parse_in_the_usual_spellings() {
        let fp = Fingerprint([0xab; 32]);
        let plain = fp.to_string();
        let colons = plain
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap().to_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        for s in [
            plain.clone(),
            format!("sha256:{plain}"),
            colons.clone(),
            format!("sha256 Fingerprint={colons}"),
        ] {
            assert_eq!(s.parse::<Fingerprint>(), Ok(fp), "{s}");
        }
        assert!("abcd".parse::<Fingerprint>().is_err());
        assert!("zz".repeat(32).parse::<Fingerprint>().is_err());
    }

    fn verifier(pin: Fingerprint) -> PinVerifier {
        PinVerifier {
            pin,
            algs: provider().signature_verification_algorithms,
        }
    }

    #[test]
    fn the_pin_verifier_accepts_only_the_pinned_leaf() {
        let der = meduza_generators::parse::parse_pem_certs(CERT).unwrap();
        let name = ServerName::try_from("node.example").unwrap();
        let now = UnixTime::now();
        let good = verifier(Fingerprint::of(der[0].as_ref()));
        // Name and chain do not matter: the pin is the identity.
        assert!(good
            .verify_server_cert(&der[0], &[], &name, &[], now)
            .is_ok());
        let bad = verifier(Fingerprint([0; 32]));
        let err = bad
            .verify_server_cert(&der[0], &[], &name, &[], now)
            .unwrap_err();
        // As hyper-rustls hands it up: an io::Error inside an io::Error.
        let io = std::io::Error::other(std::io::Error::other(err));
        let why = untrusted_reason(&io).expect("a certificate error");
        assert!(
            why.starts_with("certificate not trusted: SHA-256 ")
                && why.ends_with(&format!(
                    "does not match the pinned {}",
                    Fingerprint([0; 32])
                )),
            "{why}"
        );
        assert!(!bad.supported_verify_schemes().is_empty());
    }
}
