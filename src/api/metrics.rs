//! `/metrics`: Prometheus text exposition format 0.0.4.
//!
//! Owns: the pure rendering of a [`MetricsSnapshot`] — one `# HELP` and one `# TYPE`
//! line per family before its samples, escaped label values, `_total` counters,
//! cumulative histogram buckets ending in `le="+Inf"` with `_sum` and `_count`.
//! Must not: collect anything itself; the daemon fills the snapshot.

use super::types::{Histogram, MetricsSnapshot, ServiceState, UpstreamHealth};
use std::fmt::Write as _;

/// `Content-Type` of the 0.0.4 text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Label value escaping: backslash, double quote and line feed (exposition format spec).
fn esc_label(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// Sample values: Go's ParseFloat spellings for the special values.
fn num(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        // HELP text escaping: backslash and line feed.
        let help = help.replace('\\', r"\\").replace('\n', r"\n");
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: String) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", esc_label(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &Histogram) {
        for (bound, n) in &h.buckets {
            let le = num(*bound);
            let mut l = labels.to_vec();
            l.push(("le", &le));
            self.sample(&format!("{name}_bucket"), &l, n.to_string());
        }
        let mut l = labels.to_vec();
        l.push(("le", "+Inf"));
        self.sample(&format!("{name}_bucket"), &l, h.count.to_string());
        self.sample(&format!("{name}_sum"), labels, num(h.sum));
        self.sample(&format!("{name}_count"), labels, h.count.to_string());
    }
}

const SERVICE_STATES: [(ServiceState, &str); 5] = [
    (ServiceState::Starting, "starting"),
    (ServiceState::Running, "running"),
    (ServiceState::Backoff, "backoff"),
    (ServiceState::Fatal, "fatal"),
    (ServiceState::Stopped, "stopped"),
];

const UPSTREAM_STATES: [(UpstreamHealth, &str); 4] = [
    (UpstreamHealth::Healthy, "healthy"),
    (UpstreamHealth::Degraded, "degraded"),
    (UpstreamHealth::Down, "down"),
    (UpstreamHealth::Unknown, "unknown"),
];

fn flag(b: bool) -> String {
    if b { "1" } else { "0" }.to_string()
}

/// Render the whole exposition.
pub fn render(node_id: &str, m: &MetricsSnapshot) -> String {
    let mut o = Out(String::new());
    o.family(
        "meduza_build_info",
        "gauge",
        "Always 1; labels carry the node id and version.",
    );
    o.sample(
        "meduza_build_info",
        &[("node", node_id), ("version", env!("CARGO_PKG_VERSION"))],
        "1".into(),
    );

    o.family(
        "meduza_service_state",
        "gauge",
        "1 for the state each supervised service is in, 0 for the others.",
    );
    for s in &m.services {
        for (state, label) in SERVICE_STATES {
            o.sample(
                "meduza_service_state",
                &[("service", &s.name), ("state", label)],
                flag(s.state == state),
            );
        }
    }
    o.family(
        "meduza_service_restarts_total",
        "counter",
        "Restarts of each service since meduza started.",
    );
    for s in &m.services {
        o.sample(
            "meduza_service_restarts_total",
            &[("service", &s.name)],
            s.restarts_total.to_string(),
        );
    }
    o.family(
        "meduza_service_restarts_last_hour",
        "gauge",
        "Restarts in the rolling hour of the restart budget (at most 5 before fatal).",
    );
    for s in &m.services {
        o.sample(
            "meduza_service_restarts_last_hour",
            &[("service", &s.name)],
            s.restarts_last_hour.to_string(),
        );
    }

    let r = &m.reconcile;
    o.family(
        "meduza_reconcile_passes_total",
        "counter",
        "Reconcile passes run.",
    );
    o.sample(
        "meduza_reconcile_passes_total",
        &[],
        r.passes_total.to_string(),
    );
    o.family(
        "meduza_reconcile_failures_total",
        "counter",
        "Reconcile passes that did not apply (validation or apply errors).",
    );
    o.sample(
        "meduza_reconcile_failures_total",
        &[],
        r.failed_total.to_string(),
    );
    if let Some(d) = r.last_duration_seconds {
        o.family(
            "meduza_reconcile_last_duration_seconds",
            "gauge",
            "Duration of the last reconcile pass.",
        );
        o.sample("meduza_reconcile_last_duration_seconds", &[], num(d));
    }
    if let Some(rev) = r.applied_revision {
        o.family(
            "meduza_reconcile_applied_revision",
            "gauge",
            "The /commit revision last applied.",
        );
        o.sample("meduza_reconcile_applied_revision", &[], rev.to_string());
    }
    o.family(
        "meduza_reconcile_duration_seconds",
        "histogram",
        "Reconcile pass durations.",
    );
    o.histogram("meduza_reconcile_duration_seconds", &[], &r.duration);

    let d = &m.dns;
    o.family(
        "meduza_dns_queries_total",
        "counter",
        "DNS queries received by the frontend.",
    );
    o.sample("meduza_dns_queries_total", &[], d.queries_total.to_string());
    o.family(
        "meduza_dns_cache_hits_total",
        "counter",
        "DNS queries answered from the cache.",
    );
    o.sample(
        "meduza_dns_cache_hits_total",
        &[],
        d.cache_hits_total.to_string(),
    );
    o.family(
        "meduza_dns_overload_servfail_total",
        "counter",
        "Queries answered SERVFAIL because the queue was full.",
    );
    o.sample(
        "meduza_dns_overload_servfail_total",
        &[],
        d.servfail_overload_total.to_string(),
    );
    o.family(
        "meduza_dns_failovers_total",
        "counter",
        "Upstream failovers and failbacks.",
    );
    o.sample(
        "meduza_dns_failovers_total",
        &[],
        d.failovers_total.to_string(),
    );
    o.family(
        "meduza_dns_upstream_health",
        "gauge",
        "1 for the health state each upstream group is in, 0 for the others.",
    );
    for u in &d.upstreams {
        for (state, label) in UPSTREAM_STATES {
            o.sample(
                "meduza_dns_upstream_health",
                &[("upstream", &u.name), ("state", label)],
                flag(u.health == state),
            );
        }
    }
    o.family(
        "meduza_dns_upstream_queries_total",
        "counter",
        "Queries forwarded to each upstream group.",
    );
    for u in &d.upstreams {
        o.sample(
            "meduza_dns_upstream_queries_total",
            &[("upstream", &u.name)],
            u.queries_total.to_string(),
        );
    }
    o.family(
        "meduza_dns_upstream_failures_total",
        "counter",
        "Failed queries (timeouts, errors) per upstream group.",
    );
    for u in &d.upstreams {
        o.sample(
            "meduza_dns_upstream_failures_total",
            &[("upstream", &u.name)],
            u.failures_total.to_string(),
        );
    }
    o.family(
        "meduza_dns_upstream_latency_seconds",
        "histogram",
        "Upstream answer latency.",
    );
    for u in &d.upstreams {
        o.histogram(
            "meduza_dns_upstream_latency_seconds",
            &[("upstream", &u.name)],
            &u.latency,
        );
    }

    o.family(
        "meduza_tproxy_applied",
        "gauge",
        "1 while the TPROXY rules are applied.",
    );
    o.sample("meduza_tproxy_applied", &[], flag(m.tproxy_applied));

    if let Some(t) = m.mihomo_traffic {
        o.family(
            "meduza_mihomo_traffic_bytes_total",
            "counter",
            "Bytes through mihomo since meduza started (its /connections uploadTotal and downloadTotal, carried over mihomo restarts).",
        );
        for (direction, bytes) in [("uplink", t.uplink), ("downlink", t.downlink)] {
            o.sample(
                "meduza_mihomo_traffic_bytes_total",
                &[("direction", direction)],
                bytes.to_string(),
            );
        }
    }
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::{ServiceMetric, Traffic, UpstreamMetric};

    /// The lines of family `name`: its HELP and TYPE lines and its samples.
    fn family<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| {
                l.strip_prefix("# HELP ")
                    .or_else(|| l.strip_prefix("# TYPE "))
                    .unwrap_or(l)
                    .split(['{', ' '])
                    .next()
                    == Some(name)
            })
            .collect()
    }

    #[test]
    fn restart_counter_and_gauge() {
        let m = MetricsSnapshot {
            services: vec![ServiceMetric {
                name: "tinc".into(),
                state: ServiceState::Running,
                restarts_total: 12,
                restarts_last_hour: 2,
            }],
            ..Default::default()
        };
        let text = render("n1", &m);
        let total = family(&text, "meduza_service_restarts_total");
        assert_eq!(total.len(), 3, "{text}");
        assert!(total[0].starts_with("# HELP meduza_service_restarts_total "));
        assert_eq!(total[1], "# TYPE meduza_service_restarts_total counter");
        assert_eq!(
            total[2],
            r#"meduza_service_restarts_total{service="tinc"} 12"#
        );
        let hour = family(&text, "meduza_service_restarts_last_hour");
        assert_eq!(hour.len(), 3, "{text}");
        assert!(hour[0].starts_with("# HELP meduza_service_restarts_last_hour "));
        assert_eq!(hour[1], "# TYPE meduza_service_restarts_last_hour gauge");
        assert_eq!(
            hour[2],
            r#"meduza_service_restarts_last_hour{service="tinc"} 2"#
        );
    }

    #[test]
    fn mihomo_traffic_counter() {
        let off = render("n1", &MetricsSnapshot::default());
        assert!(
            family(&off, "meduza_mihomo_traffic_bytes_total").is_empty(),
            "no family while Clash is off or mihomo never answered: {off}"
        );
        let m = MetricsSnapshot {
            mihomo_traffic: Some(Traffic {
                uplink: 5,
                downlink: 7,
            }),
            ..Default::default()
        };
        let text = render("n1", &m);
        let lines = family(&text, "meduza_mihomo_traffic_bytes_total");
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("# HELP meduza_mihomo_traffic_bytes_total "));
        assert_eq!(lines[1], "# TYPE meduza_mihomo_traffic_bytes_total counter");
        assert_eq!(
            lines[2],
            r#"meduza_mihomo_traffic_bytes_total{direction="uplink"} 5"#
        );
        assert_eq!(
            lines[3],
            r#"meduza_mihomo_traffic_bytes_total{direction="downlink"} 7"#
        );
    }

    #[test]
    fn escapes_and_histograms() {
        let mut lat = Histogram::with_bounds(&[0.01, 0.1]);
        lat.observe(0.005);
        lat.observe(0.05);
        let m = MetricsSnapshot {
            services: vec![ServiceMetric {
                name: "we\"ird\\svc\n".into(),
                state: ServiceState::Running,
                restarts_total: 2,
                restarts_last_hour: 1,
            }],
            dns: crate::api::types::DnsMetrics {
                upstreams: vec![UpstreamMetric {
                    name: "cf".into(),
                    health: UpstreamHealth::Healthy,
                    queries_total: 2,
                    failures_total: 0,
                    latency: lat,
                }],
                ..Default::default()
            },
            ..Default::default()
        };
        let text = render("n1", &m);
        assert!(
            text.contains(r#"meduza_service_restarts_total{service="we\"ird\\svc\n"} 2"#),
            "{text}"
        );
        assert!(text
            .contains(r#"meduza_dns_upstream_latency_seconds_bucket{upstream="cf",le="0.01"} 1"#));
        assert!(text
            .contains(r#"meduza_dns_upstream_latency_seconds_bucket{upstream="cf",le="+Inf"} 2"#));
        assert!(text.contains(r#"meduza_dns_upstream_latency_seconds_count{upstream="cf"} 2"#));
        assert!(text
            .contains("meduza_service_state{service=\"we\\\"ird\\\\svc\\n\",state=\"running\"} 1"));
        assert_eq!(num(f64::INFINITY), "+Inf");
        assert_eq!(num(0.25), "0.25");
    }
}
