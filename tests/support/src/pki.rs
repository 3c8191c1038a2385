//! Test certificates made with the `openssl` CLI (Debian package `openssl`): a CA and
//! the certificates it issues, P-256 keys, valid two days.

use std::path::{Path, PathBuf};
use std::process::Command;

const EC: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

fn openssl(args: &mut Command) {
    let out = args
        .output()
        .unwrap_or_else(|e| panic!("openssl must be installed (Debian package openssl): {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA in `dir` (`<name>.pem`, `<name>.key`).
pub struct Ca {
    pub dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Self {
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        openssl(
            Command::new("openssl")
                .args(["req", "-x509"])
                .args(EC)
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .args(["-days", "2", "-subj", &format!("/CN=meduza-test-{name}")]),
        );
        Self {
            dir: dir.to_path_buf(),
            cert,
            key,
        }
    }

    /// A certificate `<name>.pem` and key `<name>.key` for `usage` (`serverAuth`,
    /// `clientAuth`) with `san` (`IP:10.0.0.1,DNS:localhost`, or empty).
    pub fn issue(&self, name: &str, usage: &str, san: &str) -> (PathBuf, PathBuf) {
        let p = |ext: &str| self.dir.join(format!("{name}.{ext}"));
        let san = if san.is_empty() {
            String::new()
        } else {
            format!("subjectAltName={san}\n")
        };
        std::fs::write(
            p("ext"),
            format!(
                "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n{san}"
            ),
        )
        .expect("write ext file");
        openssl(
            Command::new("openssl")
                .arg("req")
                .args(EC)
                .arg("-keyout")
                .arg(p("key"))
                .arg("-out")
                .arg(p("csr"))
                .args(["-subj", &format!("/CN=meduza-test-{name}")]),
        );
        openssl(
            Command::new("openssl")
                .args(["x509", "-req", "-in"])
                .arg(p("csr"))
                .arg("-CA")
                .arg(&self.cert)
                .arg("-CAkey")
                .arg(&self.key)
                .arg("-CAcreateserial")
                .arg("-out")
                .arg(p("pem"))
                .args(["-days", "2", "-extfile"])
                .arg(p("ext")),
        );
        (p("pem"), p("key"))
    }
}
