//! The node API's keys: `/nodes/<id>/api/token` and `/nodes/<id>/api/tls/{cert,key}`.
//!
//! Owns: their types and validation (PEM that decodes; both TLS keys or neither).
//! Must not: load them into rustls (`meduza::tls`) or echo a secret in an error.

use crate::parse::{self, Reader};

/// `/nodes/<id>/api/tls/cert` and `/nodes/<id>/api/tls/key` (PEM), both checked to
/// decode; whether the key belongs to the certificate is checked where rustls loads
/// them (`meduza::tls`). `Debug` never shows the key.
#[derive(Clone, PartialEq)]
pub struct ApiTls {
    /// Certificate chain, leaf first.
    pub cert_pem: String,
    /// Private key: a secret, never logged, serialized or published.
    pub key_pem: String,
}

impl std::fmt::Debug for ApiTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiTls")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// `/nodes/<id>/api/*` (`p` is `/nodes/<id>/`): the bearer token and the TLS pair.
pub(super) fn parse_api(r: &mut Reader<'_>, p: &str) -> (Option<String>, Option<ApiTls>) {
    let k = |s: &str| format!("{p}{s}");
    let api_token = r.parsed(&k("api/token"), parse::parse_api_token);
    let api_tls = parse_api_tls(r, &k("api/tls/cert"), &k("api/tls/key"));
    (api_token, api_tls)
}

/// The node API's certificate and key: both or neither (an error names the missing
/// one); each must decode as PEM (the error names the key, never the key's value).
fn parse_api_tls(r: &mut Reader<'_>, cert_key: &str, key_key: &str) -> Option<ApiTls> {
    let cert = r.parsed(cert_key, |v| {
        parse::parse_pem_certs(v).map(|_| v.to_string())
    });
    let key = r.parsed(key_key, |v| parse::parse_pem_key(v).map(|_| v.to_string()));
    let (cert_set, key_set) = (r.str(cert_key).is_some(), r.str(key_key).is_some());
    match (cert, key) {
        (Some(cert_pem), Some(key_pem)) => Some(ApiTls { cert_pem, key_pem }),
        _ => {
            if cert_set && !key_set {
                r.error(key_key, "", format!("missing: {cert_key} is set"));
            } else if key_set && !cert_set {
                r.error(cert_key, "", format!("missing: {key_key} is set"));
            }
            None
        }
    }
}
