//! Userspace WireGuard: start `wireguard-go -f <dev>` and configure it through its
//! UAPI socket `/var/run/wireguard/<dev>.sock` (https://www.wireguard.com/xplatform/).
//!
//! Owns: the wireguard-go processes it started, the UAPI text protocol (keys are
//! lowercase hex there, not base64). Must not: pass any configuration value on a
//! command line (only the device name, validated upstream, is an argument).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::Child;

use super::{Key, LinkOps, PeerChange, WgBackend, WgError, WgPeerState, WgSet, WgState};

/// The wireguard-go program when the settings name none (`MEDUZA_BIN_WIREGUARD_GO`),
/// looked up in the children's fixed `PATH`.
pub const DEFAULT_PROGRAM: &str = "wireguard-go";
/// Where wireguard-go (and boringtun) put their UAPI sockets (fixed upstream).
pub const SOCKET_DIR: &str = "/var/run/wireguard";
/// How long a starting wireguard-go may take to open its socket.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// Lowercase hex of a key, as UAPI wants it.
pub fn hex(k: &Key) -> String {
    k.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Parse a 64-character hex key.
pub fn unhex(s: &str) -> Option<Key> {
    if s.len() != 64 {
        return None;
    }
    let mut k = [0u8; 32];
    for (i, out) in k.iter_mut().enumerate() {
        *out = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(k)
}

/// The `set=1` request for a [`WgSet`], ending with the blank line. Pure.
pub fn render_set(set: &WgSet) -> String {
    let mut s = String::from("set=1\n");
    // `let _ =`: writing to a String cannot fail.
    if let Some(k) = &set.private_key {
        let _ = writeln!(s, "private_key={}", hex(k));
    }
    if let Some(p) = set.listen_port {
        let _ = writeln!(s, "listen_port={p}");
    }
    for change in &set.peers {
        match change {
            PeerChange::Remove(k) => {
                let _ = writeln!(s, "public_key={}\nremove=true", hex(k));
            }
            PeerChange::Upsert(p) => {
                let _ = writeln!(s, "public_key={}", hex(&p.public_key));
                // All zeros clears a preshared key.
                let _ = writeln!(
                    s,
                    "preshared_key={}",
                    hex(&p.preshared_key.unwrap_or([0; 32]))
                );
                if let Some(e) = p.endpoint {
                    let _ = writeln!(s, "endpoint={e}");
                }
                let _ = writeln!(
                    s,
                    "persistent_keepalive_interval={}",
                    p.persistent_keepalive
                );
                let _ = writeln!(s, "replace_allowed_ips=true");
                for ip in &p.allowed_ips {
                    let _ = writeln!(s, "allowed_ip={ip}");
                }
            }
        }
    }
    s.push('\n');
    s
}

/// Parse the reply to `get=1`. Pure.
pub fn parse_get(text: &str) -> Result<WgState, String> {
    let mut st = WgState::default();
    let mut errno: Option<i64> = None;
    let mut hs_sec: i64 = 0;
    let mut hs_nsec: i64 = 0;
    let finish_peer = |st: &mut WgState, sec: i64, nsec: i64| {
        if let Some(p) = st.peers.last_mut() {
            if sec > 0 {
                p.last_handshake = Some(
                    SystemTime::UNIX_EPOCH
                        + Duration::from_secs(sec.unsigned_abs())
                        + Duration::from_nanos(nsec.unsigned_abs()),
                );
            }
            p.allowed_ips.sort();
        }
    };
    for line in text.lines() {
        if line.is_empty() {
            break;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("bad line {line:?}"))?;
        let num = || {
            v.parse::<i64>()
                .map_err(|_| format!("bad number in {line:?}"))
        };
        match k {
            "private_key" => {
                st.private_key = unhex(v).filter(|k| *k != [0; 32]);
            }
            "listen_port" => st.listen_port = v.parse().map_err(|_| format!("bad port {v:?}"))?,
            "public_key" => {
                finish_peer(&mut st, hs_sec, hs_nsec);
                hs_sec = 0;
                hs_nsec = 0;
                let key = unhex(v).ok_or_else(|| format!("bad key in {line:?}"))?;
                st.peers.push(WgPeerState::new(key));
            }
            "errno" => errno = Some(num()?),
            _ => {
                let Some(p) = st.peers.last_mut() else {
                    continue; // device keys we do not use (fwmark, ...)
                };
                match k {
                    "preshared_key" => p.preshared_key = unhex(v).filter(|k| *k != [0; 32]),
                    "endpoint" => {
                        p.endpoint = Some(
                            v.parse::<SocketAddr>()
                                .map_err(|_| format!("bad endpoint {v:?}"))?,
                        )
                    }
                    "persistent_keepalive_interval" => {
                        p.persistent_keepalive =
                            v.parse().map_err(|_| format!("bad keepalive {v:?}"))?
                    }
                    "allowed_ip" => p.allowed_ips.push(
                        v.parse::<IpNet>()
                            .map_err(|_| format!("bad allowed_ip {v:?}"))?,
                    ),
                    "last_handshake_time_sec" => hs_sec = num()?,
                    "last_handshake_time_nsec" => hs_nsec = num()?,
                    "rx_bytes" => p.rx_bytes = num()?.unsigned_abs(),
                    "tx_bytes" => p.tx_bytes = num()?.unsigned_abs(),
                    _ => {}
                }
            }
        }
    }
    finish_peer(&mut st, hs_sec, hs_nsec);
    match errno {
        Some(0) => Ok(st),
        Some(n) => Err(format!("errno={n}")),
        None => Err("reply without errno".into()),
    }
}

/// wireguard-go driven over UAPI.
#[derive(Debug)]
pub struct UserspaceWg {
    program: OsString,
    socket_dir: PathBuf,
    links: LinkOps,
    children: Mutex<HashMap<String, Child>>,
}

impl UserspaceWg {
    /// `program` is the resolved setting `MEDUZA_BIN_WIREGUARD_GO` (handed down from
    /// `main`, never read from the environment here); `None` means [`DEFAULT_PROGRAM`].
    pub fn new(links: LinkOps, program: Option<OsString>) -> Self {
        Self {
            program: program.unwrap_or_else(|| OsString::from(DEFAULT_PROGRAM)),
            socket_dir: PathBuf::from(SOCKET_DIR),
            links,
            children: Mutex::new(HashMap::new()),
        }
    }

    pub fn socket_path(&self, dev: &str) -> PathBuf {
        self.socket_dir.join(format!("{dev}.sock"))
    }

    fn children(&self) -> MutexGuard<'_, HashMap<String, Child>> {
        // A map of handles; poisoning cannot leave it inconsistent.
        self.children.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn uapi_err(&self, dev: &str, detail: impl Into<String>) -> WgError {
        WgError::Uapi {
            dev: dev.to_string(),
            path: self.socket_path(dev).display().to_string(),
            detail: detail.into(),
        }
    }

    /// Send one request and read the reply up to its terminating blank line.
    async fn exchange(&self, dev: &str, request: &str) -> Result<String, WgError> {
        let io = |e: std::io::Error| self.uapi_err(dev, e.to_string());
        let mut sock = UnixStream::connect(self.socket_path(dev))
            .await
            .map_err(io)?;
        sock.write_all(request.as_bytes()).await.map_err(io)?;
        let mut reader = BufReader::new(sock);
        let mut reply = String::new();
        loop {
            let mut line = String::new();
            let n = reader.read_line(&mut line).await.map_err(io)?;
            if n == 0 || line == "\n" {
                break;
            }
            reply.push_str(&line);
        }
        Ok(reply)
    }

    fn program_name(&self) -> String {
        self.program.to_string_lossy().into_owned()
    }

    async fn start(&self, dev: &str) -> Result<(), WgError> {
        // An explicit environment: wireguard-go needs only LOG_LEVEL, and meduza's own
        // holds ETCD_PASS.
        let mut child = crate::supervise::spawn::clean_command(&self.program)
            .arg("-f")
            .arg(dev)
            .env("LOG_LEVEL", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Our devices end with us: an orderly shutdown drops the manager.
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| WgError::Spawn {
                dev: dev.to_string(),
                program: self.program_name(),
                source,
            })?;
        if let Some(stderr) = child.stderr.take() {
            let dev = dev.to_string();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::warn!(dev = %dev, line = %line, "[wireguard-go]");
                }
            });
        }
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(WgError::DaemonExited {
                    dev: dev.to_string(),
                    program: self.program_name(),
                    detail: status.to_string(),
                });
            }
            if self.socket_path(dev).exists() && self.get(dev).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                // Best effort: the child is ours and useless without its socket.
                let _ = child.start_kill();
                return Err(self.uapi_err(dev, "no socket within 5 s of starting wireguard-go"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.children().insert(dev.to_string(), child);
        tracing::info!(dev, program = %self.program_name(), "wireguard-go started");
        Ok(())
    }
}

impl WgBackend for UserspaceWg {
    async fn create(&self, dev: &str) -> Result<(), WgError> {
        if self.socket_path(dev).exists() && self.get(dev).await.is_ok() {
            return Ok(());
        }
        self.start(dev).await
    }

    async fn get(&self, dev: &str) -> Result<WgState, WgError> {
        let reply = self.exchange(dev, "get=1\n\n").await?;
        parse_get(&reply).map_err(|d| self.uapi_err(dev, d))
    }

    async fn set(&self, dev: &str, set: &WgSet) -> Result<(), WgError> {
        if set.is_empty() {
            return Ok(());
        }
        let reply = self.exchange(dev, &render_set(set)).await?;
        match reply.trim() {
            "errno=0" => Ok(()),
            other => Err(self.uapi_err(dev, format!("set refused: {other}"))),
        }
    }

    async fn delete(&self, dev: &str) -> Result<(), WgError> {
        // Deleting the TUN link makes wireguard-go exit and remove its socket.
        self.links.delete(dev).await?;
        let child = self.children().remove(dev);
        if let Some(mut child) = child {
            match tokio::time::timeout(Duration::from_secs(2), child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    tracing::warn!(
                        dev,
                        "wireguard-go did not exit after link deletion, killing"
                    );
                    // Best effort: kill then reap; errors mean it is already gone.
                    let _ = child.kill().await;
                }
            }
        }
        let path = self.socket_path(dev);
        if path.exists() {
            // Stale socket of a process that is gone.
            let _ = std::fs::remove_file(&path);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::wireguard::{apply_set, WgPeerConfig};

    fn peer(b: u8) -> WgPeerConfig {
        WgPeerConfig {
            public_key: [b; 32],
            preshared_key: None,
            endpoint: Some("[2001:db8::1]:51820".parse().unwrap()),
            persistent_keepalive: 25,
            allowed_ips: vec![
                "10.9.0.2/32".parse().unwrap(),
                "fd09::2/128".parse().unwrap(),
            ],
        }
    }

    #[test]
    fn keys_are_lowercase_hex() {
        let k = [0xab; 32];
        assert_eq!(hex(&k), "ab".repeat(32));
        assert_eq!(unhex(&hex(&k)), Some(k));
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn set_request_has_device_keys_then_peer_sections() {
        let set = WgSet {
            private_key: Some([1; 32]),
            listen_port: Some(51820),
            peers: vec![PeerChange::Upsert(peer(2)), PeerChange::Remove([3; 32])],
        };
        let text = render_set(&set);
        let expected = format!(
            "set=1\nprivate_key={}\nlisten_port=51820\npublic_key={}\npreshared_key={}\n\
             endpoint=[2001:db8::1]:51820\npersistent_keepalive_interval=25\n\
             replace_allowed_ips=true\nallowed_ip=10.9.0.2/32\nallowed_ip=fd09::2/128\n\
             public_key={}\nremove=true\n\n",
            "01".repeat(32),
            "02".repeat(32),
            "00".repeat(32),
            "03".repeat(32)
        );
        assert_eq!(text, expected);
    }

    #[test]
    fn get_reply_parses_peers_and_handshakes() {
        let reply = format!(
            "private_key={}\nlisten_port=51820\npublic_key={}\npreshared_key={}\n\
             protocol_version=1\nendpoint=10.0.0.2:51820\nlast_handshake_time_sec=1700000000\n\
             last_handshake_time_nsec=5\ntx_bytes=10\nrx_bytes=20\n\
             persistent_keepalive_interval=25\nallowed_ip=10.9.0.2/32\n\
             public_key={}\nlast_handshake_time_sec=0\nlast_handshake_time_nsec=0\nerrno=0\n",
            "01".repeat(32),
            "02".repeat(32),
            "00".repeat(32),
            "03".repeat(32)
        );
        let st = parse_get(&reply).unwrap();
        assert_eq!(st.private_key, Some([1; 32]));
        assert_eq!(st.listen_port, 51820);
        assert_eq!(st.peers.len(), 2);
        let p = &st.peers[0];
        assert_eq!(p.preshared_key, None);
        assert_eq!(p.endpoint, Some("10.0.0.2:51820".parse().unwrap()));
        assert_eq!(p.persistent_keepalive, 25);
        assert_eq!(p.allowed_ips, vec!["10.9.0.2/32".parse::<IpNet>().unwrap()]);
        assert_eq!(
            p.last_handshake,
            Some(
                SystemTime::UNIX_EPOCH
                    + Duration::from_secs(1_700_000_000)
                    + Duration::from_nanos(5)
            )
        );
        assert_eq!((p.rx_bytes, p.tx_bytes), (20, 10));
        assert_eq!(st.peers[1].last_handshake, None);
        assert!(parse_get("errno=5\n").is_err());
        assert!(parse_get("listen_port=1\n").is_err());
    }

    #[test]
    fn rendered_set_round_trips_through_the_model() {
        // What a UAPI server would hold after the set, read back in get format.
        let set = WgSet {
            private_key: Some([1; 32]),
            listen_port: Some(51820),
            peers: vec![PeerChange::Upsert(peer(2))],
        };
        let mut st = WgState::default();
        apply_set(&mut st, &set);
        let p = &st.peers[0];
        let reply = format!(
            "private_key={}\nlisten_port=51820\npublic_key={}\nendpoint={}\n\
             persistent_keepalive_interval=25\nallowed_ip={}\nallowed_ip={}\nerrno=0\n",
            hex(&[1; 32]),
            hex(&p.public_key),
            p.endpoint.unwrap(),
            p.allowed_ips[0],
            p.allowed_ips[1]
        );
        assert_eq!(parse_get(&reply).unwrap(), st);
    }
}
