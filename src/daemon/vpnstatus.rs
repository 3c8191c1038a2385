//! OpenVPN and WireGuard link status for `/updated/<id>/{openvpn,wireguard}/<name>/status`.
//!
//! OpenVPN: its management socket's `state` command (CONNECTED → up; any other state →
//! connecting; no socket → down). WireGuard: the newest handshake age
//! (`dataplane::wireguard::status_of`).

use std::path::Path;
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

/// Map the reply of the management `state` command to a link state. The reply is
/// CSV lines `time,STATE,detail,...` ended by `END`; the greeting and notifications
/// start with `>`.
pub fn parse_state_reply(reply: &str) -> LinkState {
    let state = reply
        .lines()
        .filter(|l| !l.starts_with('>') && *l != "END")
        .filter_map(|l| l.split(',').nth(1))
        .next_back();
    match state {
        Some("CONNECTED") => LinkState::Up,
        Some(_) => LinkState::Connecting,
        None => LinkState::Down,
    }
}

/// Ask OpenVPN's management socket for its state (1 s budget).
pub async fn openvpn_state(socket: &Path) -> LinkState {
    let attempt = async {
        let mut stream = UnixStream::connect(socket).await.ok()?;
        stream.write_all(b"state\n").await.ok()?;
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
        assert_eq!(
            parse_state_reply(&format!(
                "{greeting}1700000000,CONNECTED,SUCCESS,10.8.0.1,,,,\nEND\n"
            )),
            LinkState::Up
        );
        assert_eq!(
            parse_state_reply(&format!("{greeting}1700000000,TCP_CONNECT,,,,,,\nEND\n")),
            LinkState::Connecting
        );
        assert_eq!(parse_state_reply(greeting), LinkState::Down);
    }
}
