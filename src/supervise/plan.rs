//! The plan of [`Supervisor::apply`](super::Supervisor::apply): desired service list
//! and current services → the operations that converge them. Pure.
//!
//! Owns: validation of a desired list (names, argv, capabilities, dependencies and
//! their order, schedule and health ranges) and the [`Op`] list, in execution order.
//! Must not: start, stop or signal anything, or read the clock or the disk (the
//! supervisor executes the plan).

use super::spawn::parse_caps;
use super::SuperviseError;
use meduza_generators::plan::service::{ReloadStrategy, ServiceSpec, SCHEDULED_RESTART_MINUTES};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// One step of `apply`, in execution order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", content = "service", rename_all = "snake_case")]
pub enum Op {
    /// Stop and forget a service that is no longer desired.
    Stop(String),
    /// Start a new service.
    Start(String),
    /// argv/env/user/caps/workdir changed: restart the process with the new spec.
    Replace(String),
    /// A config file changed: apply the service's reload strategy.
    Reload(String, ReloadStrategy),
    /// Only supervision settings changed (health, schedule, protection): no restart.
    Update(String),
}

/// Check a desired list: unique safe names, runnable argv, known capabilities,
/// dependencies present and acyclic, schedule and health in range. Returns the
/// specs in start order (dependencies first, otherwise the given order).
pub fn validate(desired: &[ServiceSpec]) -> Result<Vec<&ServiceSpec>, SuperviseError> {
    let invalid =
        |s: &ServiceSpec, field, value: String, reason: &str| SuperviseError::InvalidSpec {
            service: s.name.clone(),
            field,
            value,
            reason: reason.to_string(),
        };
    let mut names = BTreeSet::new();
    for s in desired {
        let name_ok = !s.name.is_empty()
            && s.name.len() <= 64
            && !s.name.starts_with('.')
            && s.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.@-".contains(c));
        if !name_ok {
            return Err(invalid(
                s,
                "name",
                s.name.clone(),
                "must be 1-64 chars of [A-Za-z0-9_.@-], not starting with '.'",
            ));
        }
        if !names.insert(s.name.as_str()) {
            return Err(SuperviseError::DuplicateService {
                service: s.name.clone(),
            });
        }
        if s.argv.first().is_none_or(|p| p.is_empty()) {
            return Err(invalid(
                s,
                "argv",
                format!("{:?}", s.argv),
                "needs a program",
            ));
        }
        parse_caps(&s.name, &s.caps)?;
        if let Some(m) = s.scheduled_restart_minutes {
            if !SCHEDULED_RESTART_MINUTES.contains(&m) {
                return Err(invalid(
                    s,
                    "scheduled_restart_minutes",
                    m.to_string(),
                    "must be 10..=1440",
                ));
            }
        }
        if let Some(h) = &s.health {
            if h.attempts == 0 || h.interval_secs == 0 || h.timeout_secs == 0 {
                return Err(invalid(
                    s,
                    "health",
                    format!("{h:?}"),
                    "attempts, interval and timeout must be > 0",
                ));
            }
        }
    }
    for s in desired {
        if let Some(dep) = s.after.iter().find(|d| !names.contains(d.as_str())) {
            return Err(SuperviseError::UnknownDependency {
                service: s.name.clone(),
                dependency: dep.clone(),
            });
        }
    }
    // Kahn's algorithm, stable: always take the first spec whose dependencies are placed.
    let mut placed: BTreeSet<&str> = BTreeSet::new();
    let mut order = Vec::with_capacity(desired.len());
    while order.len() < desired.len() {
        let next = desired.iter().find(|s| {
            !placed.contains(s.name.as_str()) && s.after.iter().all(|d| placed.contains(d.as_str()))
        });
        match next {
            Some(s) => {
                placed.insert(&s.name);
                order.push(s);
            }
            None => {
                let stuck = desired
                    .iter()
                    .find(|s| !placed.contains(s.name.as_str()))
                    .map(|s| s.name.clone())
                    .unwrap_or_default();
                return Err(SuperviseError::DependencyCycle { service: stuck });
            }
        }
    }
    Ok(order)
}

/// What `apply` must do to go from `current` (started in `started_order`) to
/// `desired`, given the config files that changed on disk. Pure.
pub fn plan(
    current: &BTreeMap<String, ServiceSpec>,
    started_order: &[String],
    desired: &[ServiceSpec],
    changed_files: &BTreeSet<String>,
) -> Result<Vec<Op>, SuperviseError> {
    let order = validate(desired)?;
    let wanted: BTreeSet<&str> = desired.iter().map(|s| s.name.as_str()).collect();
    let mut ops: Vec<Op> = started_order
        .iter()
        .rev()
        .filter(|n| current.contains_key(*n) && !wanted.contains(n.as_str()))
        .map(|n| Op::Stop(n.clone()))
        .collect();
    for s in &order {
        let Some(old) = current.get(&s.name) else {
            continue;
        };
        if !old.same_process(s) {
            ops.push(Op::Replace(s.name.clone()));
            continue;
        }
        if old != *s {
            ops.push(Op::Update(s.name.clone()));
        }
        if s.config_files.iter().any(|f| changed_files.contains(f)) {
            ops.push(Op::Reload(s.name.clone(), s.reload));
        }
    }
    ops.extend(
        order
            .iter()
            .filter(|s| !current.contains_key(&s.name))
            .map(|s| Op::Start(s.name.clone())),
    );
    Ok(ops)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A service `name` running `/usr/bin/<name>`, started after `after`.
    pub(crate) fn spec(name: &str, after: &[&str]) -> ServiceSpec {
        let mut s = ServiceSpec::new(name, vec![format!("/usr/bin/{name}")]);
        s.after = after.iter().map(|a| a.to_string()).collect();
        s
    }

    fn current(specs: &[ServiceSpec]) -> (BTreeMap<String, ServiceSpec>, Vec<String>) {
        (
            specs.iter().map(|s| (s.name.clone(), s.clone())).collect(),
            specs.iter().map(|s| s.name.clone()).collect(),
        )
    }

    #[test]
    fn plan_orders_dependencies_and_stops_in_reverse() {
        let desired = vec![
            spec("c", &["b"]),
            spec("b", &["a"]),
            spec("a", &[]),
            spec("d", &[]),
        ];
        let ops = plan(&BTreeMap::new(), &[], &desired, &BTreeSet::new()).expect("plan");
        let starts: Vec<Op> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| Op::Start(n.to_string()))
            .collect();
        assert_eq!(ops, starts);

        let (cur, order) = current(&[spec("a", &[]), spec("b", &[]), spec("c", &[])]);
        let ops = plan(&cur, &order, &[spec("b", &[])], &BTreeSet::new()).expect("plan");
        assert_eq!(ops, vec![Op::Stop("c".into()), Op::Stop("a".into())]);
    }

    #[test]
    fn plan_touches_only_what_changed() {
        let mut a = spec("a", &[]);
        a.config_files = vec!["/etc/a.conf".into()];
        let mut m = spec("mihomo", &[]);
        m.reload = ReloadStrategy::Sighup;
        m.config_files = vec!["/etc/mihomo.yaml".into()];
        let mut f = spec("frr", &[]);
        f.reload = ReloadStrategy::FrrReload;
        f.config_files = vec!["/etc/frr/frr.conf".into()];
        let (cur, order) = current(&[a.clone(), m.clone(), f.clone(), spec("same", &[])]);

        let mut a2 = a.clone();
        a2.argv.push("--verbose".into());
        let mut same2 = spec("same", &[]);
        same2.scheduled_restart_minutes = Some(60);
        let changed: BTreeSet<String> = [
            "/etc/mihomo.yaml".to_string(),
            "/etc/frr/frr.conf".to_string(),
        ]
        .into();
        let ops = plan(&cur, &order, &[a2, m, f, same2], &changed).expect("plan");
        assert_eq!(
            ops,
            vec![
                Op::Replace("a".into()),
                Op::Reload("mihomo".into(), ReloadStrategy::Sighup),
                Op::Reload("frr".into(), ReloadStrategy::FrrReload),
                Op::Update("same".into()),
            ]
        );
    }

    #[test]
    fn invalid_lists_are_rejected() {
        let cycle = vec![spec("a", &["b"]), spec("b", &["a"])];
        assert!(matches!(
            validate(&cycle),
            Err(SuperviseError::DependencyCycle { .. })
        ));
        let missing = vec![spec("a", &["zzz"])];
        assert!(matches!(
            validate(&missing),
            Err(SuperviseError::UnknownDependency { .. })
        ));
        let dup = vec![spec("a", &[]), spec("a", &[])];
        assert!(matches!(
            validate(&dup),
            Err(SuperviseError::DuplicateService { .. })
        ));
        let bad_name = vec![spec("../etc", &[])];
        assert!(matches!(
            validate(&bad_name),
            Err(SuperviseError::InvalidSpec { field: "name", .. })
        ));
        let mut caps = spec("a", &[]);
        caps.caps = vec!["CAP_FLY".into()];
        assert!(matches!(
            validate(&[caps]),
            Err(SuperviseError::InvalidSpec { field: "caps", .. })
        ));
        let mut cron = spec("a", &[]);
        cron.scheduled_restart_minutes = Some(5);
        assert!(validate(&[cron]).is_err());
        let empty = ServiceSpec::new("a", vec![]);
        assert!(validate(&[empty]).is_err());
    }
}
