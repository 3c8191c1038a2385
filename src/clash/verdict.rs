//! The pure health verdict on mihomo's `GET /proxies` reply.
//!
//! Owns: resolving each URLTest group to the leaf proxy that carries its traffic
//! ([`resolve`]) and deciding from those leaves whether mihomo passes LAN traffic
//! ([`verdict`]). Must not: do I/O or act on the verdict (the monitor decides when
//! TPROXY goes; `liveness` asks mihomo to test nodes).
//!
//! What real mihomo v1.19.2 reports, and why each case counts as down
//! (docs/clash.md, "What counts as healthy"):
//! * A group whose proxy provider is not loaded yet holds one member, `COMPATIBLE`
//!   (type `Compatible`), and mihomo sends its traffic DIRECT: proxied LAN traffic
//!   would leak past the proxy.
//! * A url-test group keeps `now` on its last pick when every member fails its delay
//!   test: the group says `alive: true`, the member itself `alive: false`. Traffic to
//!   it is black-holed, so the leaf's `alive` decides, not the group's.
//! * `REJECT` / `REJECT-DROP` (types `Reject`, `RejectDrop`) drop everything.
//! * `now` may name another group (nested groups); it is followed down to the leaf.

use serde_json::{Map, Value};

/// mihomo's health as the gateway sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Process alive, API answers, every URLTest group resolves to a live leaf.
    Healthy,
    /// Some, not all, URLTest groups are down: not strictly healthy (so TPROXY is not
    /// *re*-applied) but still passing traffic (so it is not removed).
    Degraded { reason: String },
    /// Process dead, API unreachable or stalled, or every URLTest group down.
    Unhealthy { reason: String },
}

impl Health {
    pub fn is_healthy(&self) -> bool {
        matches!(self, Health::Healthy)
    }
}

/// Longest chain of nested groups followed; deeper (or a cycle) counts as down.
const MAX_DEPTH: usize = 8;

/// Why a group's leaf does not carry traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Down {
    /// `now` is empty or names nothing mihomo lists.
    Empty,
    /// The provider is not loaded: mihomo's `COMPATIBLE` stand-in, which is DIRECT.
    Compatible,
    /// `REJECT` or `REJECT-DROP`.
    Reject,
    /// The leaf failed its last delay test (`alive: false`).
    NotAlive,
    /// Nested groups loop or go deeper than [`MAX_DEPTH`].
    TooDeep,
}

impl Down {
    fn describe(&self) -> &'static str {
        match self {
            Down::Empty => "no proxy",
            Down::Compatible => "provider not loaded, traffic would go direct",
            Down::Reject => "rejects",
            Down::NotAlive => "not alive",
            Down::TooDeep => "group loop",
        }
    }
}

/// One URLTest group followed to its leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pick {
    /// The URLTest group.
    pub group: String,
    /// The groups and the leaf `now` leads through, after the group itself.
    pub path: Vec<String>,
    /// The group's `testUrl`, when mihomo reports one.
    pub test_url: Option<String>,
    /// `None` when the leaf carries traffic.
    pub down: Option<Down>,
}

impl Pick {
    /// The proxy at the end of the chain (empty when `now` was empty).
    pub fn leaf(&self) -> &str {
        self.path.last().map(String::as_str).unwrap_or("")
    }

    /// `PROXY=node-a` or `PROXY=inner>node-a`, plus why it is down when it is.
    pub fn describe(&self) -> String {
        let chain = if self.path.is_empty() {
            "empty".to_string()
        } else {
            self.path.join(">")
        };
        match &self.down {
            None => format!("{}={chain}", self.group),
            Some(d) => format!("{}={chain} ({})", self.group, d.describe()),
        }
    }
}

fn kind(entry: &Value) -> &str {
    entry.get("type").and_then(Value::as_str).unwrap_or("")
}

fn now(entry: &Value) -> &str {
    entry.get("now").and_then(Value::as_str).unwrap_or("")
}

/// Follows `group`'s `now` to its leaf.
fn follow(map: &Map<String, Value>, group: &str, entry: &Value) -> Pick {
    let mut pick = Pick {
        group: group.to_string(),
        path: Vec::new(),
        test_url: entry
            .get("testUrl")
            .and_then(Value::as_str)
            .filter(|u| !u.is_empty())
            .map(str::to_string),
        down: None,
    };
    let mut current = entry;
    loop {
        let next = now(current);
        if next.is_empty() {
            pick.down = Some(Down::Empty);
            return pick;
        }
        if next == group || pick.path.iter().any(|p| p == next) || pick.path.len() >= MAX_DEPTH {
            pick.path.push(next.to_string());
            pick.down = Some(Down::TooDeep);
            return pick;
        }
        pick.path.push(next.to_string());
        let Some(entry) = map.get(next) else {
            pick.down = Some(Down::Empty);
            return pick;
        };
        // A group (it has a `now`): go one level down.
        if entry.get("now").is_some() {
            current = entry;
            continue;
        }
        pick.down = match kind(entry) {
            "Compatible" => Some(Down::Compatible),
            "Reject" | "RejectDrop" => Some(Down::Reject),
            _ if entry.get("alive").and_then(Value::as_bool) == Some(false) => Some(Down::NotAlive),
            _ => None,
        };
        return pick;
    }
}

/// Every URLTest group of a `GET /proxies` reply, followed to its leaf, sorted by
/// group name. `None` when the reply has no `proxies` object.
pub fn resolve(proxies: &Value) -> Option<Vec<Pick>> {
    let map = proxies.get("proxies").and_then(Value::as_object)?;
    let mut picks: Vec<Pick> = map
        .iter()
        .filter(|(_, entry)| kind(entry) == "URLTest")
        .map(|(name, entry)| follow(map, name, entry))
        .collect();
    picks.sort_by(|a, b| a.group.cmp(&b.group));
    Some(picks)
}

/// The verdict on a `GET /proxies` reply (`{"proxies": {name: {...}}}`).
///
/// No URLTest group at all is healthy (the API answered). Every group down is
/// unhealthy; some down is degraded. The reason names each group and its leaf.
pub fn verdict(proxies: &Value) -> Health {
    let Some(picks) = resolve(proxies) else {
        return Health::Unhealthy {
            reason: "malformed /proxies reply: no \"proxies\" object".to_string(),
        };
    };
    let down: Vec<String> = picks
        .iter()
        .filter(|p| p.down.is_some())
        .map(Pick::describe)
        .collect();
    if down.is_empty() {
        Health::Healthy
    } else if down.len() == picks.len() {
        Health::Unhealthy {
            reason: format!("every URLTest group is down: {}", down.join(", ")),
        }
    } else {
        Health::Degraded {
            reason: format!(
                "{} of {} URLTest groups down: {}",
                down.len(),
                picks.len(),
                down.join(", ")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn group(kind: &str, now: &str) -> Value {
        json!({"type": kind, "now": now, "all": ["a", "b"], "history": [], "alive": true})
    }

    fn leaf(kind: &str, alive: bool) -> Value {
        json!({"type": kind, "alive": alive, "history": []})
    }

    fn unhealthy(reason: &str) -> Health {
        Health::Unhealthy {
            reason: reason.to_string(),
        }
    }

    #[test]
    fn verdict_table() {
        let cases: Vec<(Value, Health)> = vec![
            (
                json!({}),
                unhealthy("malformed /proxies reply: no \"proxies\" object"),
            ),
            (
                json!({"proxies": {"DIRECT": leaf("Direct", true)}}),
                Health::Healthy,
            ),
            (
                json!({"proxies": {"auto": group("URLTest", "hk1"), "hk1": leaf("Shadowsocks", true)}}),
                Health::Healthy,
            ),
            (
                json!({"proxies": {"auto": group("URLTest", "REJECT"), "REJECT": leaf("Reject", true)}}),
                unhealthy("every URLTest group is down: auto=REJECT (rejects)"),
            ),
            (
                json!({"proxies": {"auto": group("URLTest", "REJECT-DROP"), "REJECT-DROP": leaf("RejectDrop", true)}}),
                unhealthy("every URLTest group is down: auto=REJECT-DROP (rejects)"),
            ),
            (
                json!({"proxies": {"auto": group("URLTest", "")}}),
                unhealthy("every URLTest group is down: auto=empty (no proxy)"),
            ),
            (
                json!({"proxies": {"auto": {"type": "URLTest", "all": []}}}),
                unhealthy("every URLTest group is down: auto=empty (no proxy)"),
            ),
            // `now` names a proxy mihomo does not list.
            (
                json!({"proxies": {"auto": group("URLTest", "gone")}}),
                unhealthy("every URLTest group is down: auto=gone (no proxy)"),
            ),
            (
                json!({"proxies": {
                    "hk": group("URLTest", "REJECT"), "REJECT": leaf("Reject", true),
                    "us": group("URLTest", "us1"), "us1": leaf("Vmess", true)}}),
                Health::Degraded {
                    reason: "1 of 2 URLTest groups down: hk=REJECT (rejects)".into(),
                },
            ),
            (
                json!({"proxies": {"us": group("URLTest", "REJECT"), "REJECT": leaf("Reject", true), "hk": group("URLTest", "")}}),
                unhealthy("every URLTest group is down: hk=empty (no proxy), us=REJECT (rejects)"),
            ),
            // Only URLTest groups are roots: a Selector on REJECT is an operator's choice.
            (
                json!({"proxies": {"sel": group("Selector", "REJECT"), "auto": group("URLTest", "x"), "x": leaf("Socks5", true)}}),
                Health::Healthy,
            ),
            (
                json!({"proxies": {"fb": group("Fallback", "REJECT")}}),
                Health::Healthy,
            ),
        ];
        for (input, want) in cases {
            assert_eq!(verdict(&input), want, "input {input}");
        }
    }

    /// The leak: real mihomo fills a group whose provider is not loaded with
    /// `COMPATIBLE` (shape copied from v1.19.2's `GET /proxies`).
    #[test]
    fn compatible_is_down() {
        let reply = json!({"proxies": {
            "COMPATIBLE": {"alive": true, "extra": {}, "history": [], "name": "COMPATIBLE", "type": "Compatible", "udp": true},
            "DIRECT": {"alive": true, "history": [], "name": "DIRECT", "type": "Direct"},
            "GLOBAL": {"alive": true, "all": ["DIRECT", "REJECT", "PROXY"], "now": "DIRECT", "type": "Selector"},
            "PROXY": {"alive": true, "all": ["COMPATIBLE"], "now": "COMPATIBLE", "type": "URLTest",
                      "testUrl": "http://203.0.113.2:8080/generate_204"},
            "REJECT": {"alive": true, "history": [], "type": "Reject"}
        }});
        assert_eq!(
            verdict(&reply),
            unhealthy(
                "every URLTest group is down: PROXY=COMPATIBLE (provider not loaded, traffic would go direct)"
            )
        );
        let picks = resolve(&reply).expect("picks");
        assert_eq!(
            picks[0].test_url.as_deref(),
            Some("http://203.0.113.2:8080/generate_204")
        );
    }

    /// The black hole: the group stays on its dead pick and says `alive: true`; the
    /// leaf says `alive: false` (shape copied from v1.19.2).
    #[test]
    fn dead_leaf_is_down_though_the_group_says_alive() {
        let reply = json!({"proxies": {
            "PROXY": {"alive": true, "all": ["node-a"], "now": "node-a", "type": "URLTest"},
            "node-a": {"alive": false, "type": "Socks5",
                       "extra": {"http://x/gen204": {"alive": false, "history": []}}}
        }});
        assert_eq!(
            verdict(&reply),
            unhealthy("every URLTest group is down: PROXY=node-a (not alive)")
        );
    }

    #[test]
    fn nested_groups_are_followed_to_the_leaf() {
        let mut reply = json!({"proxies": {
            "outer": group("URLTest", "mid"),
            "mid": group("Selector", "inner"),
            "inner": group("Fallback", "node-b"),
            "node-b": leaf("Trojan", true)
        }});
        assert_eq!(verdict(&reply), Health::Healthy);
        let picks = resolve(&reply).expect("picks");
        let outer = picks.iter().find(|p| p.group == "outer").expect("outer");
        assert_eq!(outer.leaf(), "node-b");
        assert_eq!(outer.describe(), "outer=mid>inner>node-b");

        reply["proxies"]["node-b"]["alive"] = json!(false);
        assert_eq!(
            verdict(&reply),
            unhealthy("every URLTest group is down: outer=mid>inner>node-b (not alive)")
        );
        reply["proxies"]["node-b"] = leaf("Compatible", true);
        assert!(matches!(verdict(&reply), Health::Unhealthy { .. }));
    }

    #[test]
    fn group_loops_end() {
        let reply = json!({"proxies": {
            "a": group("URLTest", "b"),
            "b": group("Selector", "a")
        }});
        assert_eq!(
            verdict(&reply),
            unhealthy("every URLTest group is down: a=b>a (group loop)")
        );
    }
}
