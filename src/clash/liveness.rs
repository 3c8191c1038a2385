//! Active liveness tests: asking mihomo to test the nodes its URLTest groups use.
//!
//! Owns: the periodic round ([`run`]) that reads `GET /proxies`, decides what to test
//! ([`plan`], pure), and asks mihomo to do it. Must not: judge health or touch TPROXY
//! (the monitor's probe reads the results from `GET /proxies` and decides), or render
//! mihomo's configuration.
//!
//! Why meduza tests at all (docs/clash.md, "How fast a dead node is noticed"): mihomo
//! tests a group's members every `interval` (300 s by default) and only while the group
//! carries traffic (`lazy`), and a url-test group keeps `now` on a dead pick. So a dead
//! node would be noticed minutes late, or, once TPROXY is off and no LAN traffic
//! reaches mihomo, never. Each round therefore:
//! * tests the leaf every healthy group uses (`GET /proxies/{leaf}/delay`): one request
//!   through the node in use; a failure makes mihomo mark it `alive: false`, which the
//!   next probe sees;
//! * tests every member of a group whose leaf is down (`GET /group/{name}/delay`), so
//!   mihomo re-picks a live member, and a node that came back is noticed;
//! * asks mihomo to fetch again (`PUT /providers/proxies/{name}`) an HTTP provider that
//!   holds no proxies while some group sits on `COMPATIBLE`.

use crate::clash::api::MihomoApi;
use crate::clash::verdict::{resolve, Down, Pick};
use serde_json::Value;
use std::collections::BTreeSet;
use std::time::Duration;

/// What a round tests and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LivenessConfig {
    /// Used when a group reports no `testUrl` of its own.
    pub test_url: String,
    /// Time between rounds (`clash/health/probe_interval`).
    pub every: Duration,
    /// Longest a single delay test may take (`clash/health/timeout`).
    pub timeout: Duration,
}

/// One request of a round.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Test {
    /// Test the proxy a healthy group uses.
    Leaf { leaf: String, url: String },
    /// Test every member of a group whose pick is down.
    Group { group: String, url: String },
    /// Fetch an empty HTTP provider again.
    Provider { name: String },
}

/// The tests for one round, from the groups' picks and (when some group sits on
/// `COMPATIBLE`) the `GET /providers/proxies` reply. Sorted and without repeats.
pub fn plan(picks: &[Pick], providers: Option<&Value>, default_url: &str) -> Vec<Test> {
    let mut tests = BTreeSet::new();
    for pick in picks {
        let url = pick.test_url.as_deref().unwrap_or(default_url).to_string();
        match &pick.down {
            None => {
                tests.insert(Test::Leaf {
                    leaf: pick.leaf().to_string(),
                    url,
                });
            }
            Some(Down::NotAlive | Down::Empty) => {
                tests.insert(Test::Group {
                    group: pick.group.clone(),
                    url,
                });
            }
            // Nothing to test: an empty provider is fetched below; REJECT and loops
            // are the configuration's doing.
            Some(Down::Compatible | Down::Reject | Down::TooDeep) => {}
        }
    }
    let compatible = picks.iter().any(|p| p.down == Some(Down::Compatible));
    let empty_http = providers
        .and_then(|v| v.get("providers"))
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter(|(_, p)| p.get("vehicleType").and_then(Value::as_str) == Some("HTTP"))
        .filter(|(_, p)| {
            p.get("proxies")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty)
        });
    if compatible {
        for (name, _) in empty_http {
            tests.insert(Test::Provider { name: name.clone() });
        }
    }
    tests.into_iter().collect()
}

async fn execute(api: &MihomoApi, test: &Test, timeout: Duration) {
    match test {
        Test::Leaf { leaf, url } => match api.proxy_delay(leaf, url, timeout).await {
            Ok(ms) => {
                tracing::debug!(%leaf, delay_ms = ms, "[clash-liveness] node in use answered")
            }
            Err(err) => {
                tracing::warn!(%leaf, %url, %err, "[clash-liveness] node in use failed its delay test")
            }
        },
        Test::Group { group, url } => match api.group_delay(group, url, timeout).await {
            Ok(alive) => tracing::info!(%group, %alive, "[clash-liveness] group re-tested"),
            Err(err) => {
                tracing::info!(%group, %err, "[clash-liveness] group re-tested: no member answered")
            }
        },
        Test::Provider { name } => match api.update_provider(name).await {
            Ok(()) => {
                tracing::info!(provider = %name, "[clash-liveness] empty provider fetched again")
            }
            Err(err) => {
                tracing::warn!(provider = %name, %err, "[clash-liveness] empty provider: fetch failed")
            }
        },
    }
}

/// One round; the API's own failures are left to the monitor's probe.
pub async fn round(api: &MihomoApi, cfg: &LivenessConfig) {
    let Ok(proxies) = api.proxies().await else {
        return;
    };
    let picks = resolve(&proxies).unwrap_or_default();
    let providers = if picks.iter().any(|p| p.down == Some(Down::Compatible)) {
        api.providers().await.ok()
    } else {
        None
    };
    let tests = plan(&picks, providers.as_ref(), &cfg.test_url);
    futures::future::join_all(tests.iter().map(|t| execute(api, t, cfg.timeout))).await;
}

/// Runs a round every `cfg.every` until the task is aborted (with the monitor).
pub async fn run(api: MihomoApi, cfg: LivenessConfig) {
    let mut tick = tokio::time::interval(cfg.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        round(&api, &cfg).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const URL: &str = "http://probe/204";

    fn picks(reply: Value) -> Vec<Pick> {
        resolve(&reply).expect("proxies object")
    }

    #[test]
    fn healthy_groups_test_their_leaf_once() {
        let reply = json!({"proxies": {
            "a": {"type": "URLTest", "now": "n1", "testUrl": "http://own/204"},
            "b": {"type": "URLTest", "now": "sel"},
            "sel": {"type": "Selector", "now": "n2"},
            "c": {"type": "URLTest", "now": "n2"},
            "n1": {"type": "Socks5", "alive": true},
            "n2": {"type": "Shadowsocks", "alive": true}
        }});
        assert_eq!(
            plan(&picks(reply), None, URL),
            vec![
                Test::Leaf {
                    leaf: "n1".into(),
                    url: "http://own/204".into()
                },
                Test::Leaf {
                    leaf: "n2".into(),
                    url: URL.into()
                },
            ]
        );
    }

    #[test]
    fn a_dead_pick_retests_the_whole_group() {
        let reply = json!({"proxies": {
            "PROXY": {"type": "URLTest", "now": "node-a", "alive": true},
            "node-a": {"type": "Socks5", "alive": false}
        }});
        assert_eq!(
            plan(&picks(reply), None, URL),
            vec![Test::Group {
                group: "PROXY".into(),
                url: URL.into()
            }]
        );
    }

    #[test]
    fn compatible_fetches_empty_http_providers_only() {
        let reply = json!({"proxies": {
            "PROXY": {"type": "URLTest", "now": "COMPATIBLE"},
            "COMPATIBLE": {"type": "Compatible", "alive": true}
        }});
        let providers = json!({"providers": {
            "default": {"vehicleType": "Compatible", "proxies": []},
            "sub": {"vehicleType": "HTTP", "proxies": []},
            "full": {"vehicleType": "HTTP", "proxies": [{"name": "x"}]},
            "file": {"vehicleType": "File", "proxies": []}
        }});
        assert_eq!(
            plan(&picks(reply.clone()), Some(&providers), URL),
            vec![Test::Provider { name: "sub".into() }]
        );
        // Without a COMPATIBLE group an empty provider is left alone.
        let healthy = json!({"proxies": {
            "PROXY": {"type": "URLTest", "now": "x"},
            "x": {"type": "Socks5", "alive": true}
        }});
        assert_eq!(
            plan(&picks(healthy), Some(&providers), URL),
            vec![Test::Leaf {
                leaf: "x".into(),
                url: URL.into()
            }]
        );
    }

    #[test]
    fn reject_is_not_tested() {
        let reply = json!({"proxies": {
            "PROXY": {"type": "URLTest", "now": "REJECT"},
            "REJECT": {"type": "Reject", "alive": true}
        }});
        assert!(plan(&picks(reply), None, URL).is_empty());
    }
}
