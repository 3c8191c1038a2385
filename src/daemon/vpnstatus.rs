//! OpenVPN and WireGuard link status for `/updated/<id>/{openvpn,wireguard}/<name>/status`.
//!
//! OpenVPN: the state history of its management socket (`state all`): CONNECTED now →
//! up; the process was CONNECTED earlier and is not now (the peer stopped, the link is
//! being re-established) → down; never connected yet (first handshake, or a handshake
//! that keeps failing, e.g. an untrusted certificate) → connecting; no socket → down.
//! The history is OpenVPN's own (the last 100 states, `MANAGEMENT_STATE_BUFFER_SIZE`
//! in `manage.h`), so a restart of meduza does not change the answer; after about a
//! hundred failed reconnects the earlier CONNECTED has scrolled out and the status
//! reads connecting again. WireGuard: the newest handshake age
//! (`dataplane::wireguard::status_of`).
//!
//! Must not: write to the socket anything but the read-only `state all` query.

use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixStream;

/// Link state as published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    Up,
    Connecting,
    Down,
}

impl LinkState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Connecting => "connecting",
            Self::Down => "down",
        }
    }
}

/// Map the reply of the management `state all` command to a link state. The reply is
/// CSV lines `time,STATE,detail,...`, oldest first, ended by `END`; the greeting and
/// notifications start with `>`.
pub fn parse_state_reply(reply: &str) -> LinkState {
    let states: Vec<&str> = reply
        .lines()
        .filter(|l| !l.starts_with('>') && *l != "END")
        .filter_map(|l| l.split(',').nth(1))
        .collect();
    match states.last() {
        None => LinkState::Down,
        Some(&"CONNECTED") => LinkState::Up,
        Some(&"EXITING") => LinkState::Down,
        Some(_) if states.contains(&"CONNECTED") => LinkState::Down,
        Some(_) => LinkState::Connecting,
    }
}

/// The host path of instance `name`'s management socket: the generator's path
/// ([`meduza_generators::gen::openvpn::management_socket`]) under `root`, as the daemon
/// re-roots the child's arguments.
pub fn openvpn_socket(root: &Path, name: &str) -> PathBuf {
    let path = meduza_generators::gen::openvpn::management_socket(name);
    root.join(path.trim_start_matches('/'))
}

/// Ask OpenVPN's management socket for its state history (1 s budget).
pub async fn openvpn_state(socket: &Path) -> LinkState {
    let attempt = async {
        let mut stream = UnixStream::connect(socket).await.ok()?;
        stream.write_all(b"state all\n").await.ok()?;
        let mut lines = BufReader::new(stream).lines();
        let mut reply = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            let end = line == "END";
            reply.push_str(&line);
            reply.push('\n');
            if end {
                break;
            }
        }
        Some(parse_state_reply(&reply))
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(LinkState::Down)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_replies() {
        let greeting =
            ">INFO:OpenVPN Management Interface Version 5 -- type 'help' for more info\n";
        let reply = |lines: &[&str]| format!("{greeting}{}\nEND\n", lines.join("\n"));
        let cases: &[(&[&str], LinkState)] = &[
            // Up: the newest state is CONNECTED (also after an earlier reconnect).
            (
                &[
                    "1700000000,CONNECTING,,,,,,",
                    "1700000001,WAIT,,,,,,",
                    "1700000002,CONNECTED,SUCCESS,10.8.0.1,,,,",
                ],
                LinkState::Up,
            ),
            (
                &[
                    "1700000002,CONNECTED,SUCCESS,10.8.0.1,,,,",
                    "1700000010,RECONNECTING,ping-restart,,,,,",
                    "1700000011,WAIT,,,,,,",
                    "1700000012,CONNECTED,SUCCESS,10.8.0.1,,,,",
                ],
                LinkState::Up,
            ),
            // Connecting: not connected yet, or TLS keeps failing (wrong CA).
            (&["1700000000,TCP_CONNECT,,,,,,"], LinkState::Connecting),
            (
                &[
                    "1700000000,CONNECTING,,,,,,",
                    "1700000000,AUTH,,,,,,",
                    "1700000000,RECONNECTING,tls-error,,,,,",
                    "1700000001,WAIT,,,,,,",
                ],
                LinkState::Connecting,
            ),
            // Down: was up, the peer went away (a UDP server stays in RECONNECTING,
            // a client goes on to WAIT; both seen with openvpn 2.6.14).
            (
                &[
                    "1700000002,CONNECTED,SUCCESS,10.8.0.1,,,,",
                    "1700000010,RECONNECTING,remote-exit,,,,,",
                ],
                LinkState::Down,
            ),
            (
                &[
                    "1700000002,CONNECTED,SUCCESS,10.8.0.1,,,,",
                    "1700000010,RECONNECTING,ping-restart,,,,,",
                    "1700000011,WAIT,,,,,,",
                ],
                LinkState::Down,
            ),
            (&["1700000000,EXITING,SIGTERM,,,,,"], LinkState::Down),
        ];
        for (lines, want) in cases {
            assert_eq!(parse_state_reply(&reply(lines)), *want, "{lines:?}");
        }
        assert_eq!(parse_state_reply(greeting), LinkState::Down);
        assert_eq!(parse_state_reply(""), LinkState::Down);
    }

    #[test]
    fn socket_is_the_generators_path_under_the_root() {
        assert_eq!(
            openvpn_socket(Path::new("/"), "office"),
            PathBuf::from("/var/run/meduza/openvpn-office.sock")
        );
        assert_eq!(
            openvpn_socket(Path::new("/tmp/r"), "office"),
            PathBuf::from("/tmp/r/var/run/meduza/openvpn-office.sock")
        );
    }
}
