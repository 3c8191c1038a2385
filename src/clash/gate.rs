//! The health gate of the crash monitor: a pure state machine ([`step`]) deciding when
//! TPROXY goes on and off as mihomo's health changes (DESIGN §9).
//!
//! Owns: the gate's state ([`MonitorState`]), its inputs, outputs and hysteresis
//! ([`MonitorConfig`]), the published phase and its value format ([`HealthStatus`]),
//! and when the driver should wake next ([`next_wake`]). The time comes in as an
//! argument, so every rule is table-tested without sleeping.
//! Must not: do I/O of any kind: no tasks, timers, probes, logging or gate calls (the
//! driver in `monitor` runs the [`Action`]s).
//!
//! Policy (see docs/clash.md):
//! * removal is immediate on the first definitive failure: a process exit event, one
//!   failed probe (API refused, 401, stalled past the probe timeout), or every URLTest
//!   group `REJECT`/empty. Traffic then goes direct, which is recoverable; keeping a
//!   TPROXY towards a dead proxy black-holes the LAN.
//! * a *degraded* mihomo (some URLTest groups down) keeps TPROXY but is reported
//!   `unhealthy` and does not count towards recovery.
//! * re-apply needs `ok_threshold` consecutive strictly healthy probes (probed at
//!   `confirm_interval` once the first one passed) and a hold-down since the last
//!   removal. The hold-down starts at `hold_down_base` and doubles (up to
//!   `hold_down_max`) when TPROXY is removed again within `flap_window` of its last
//!   application, so a flapping mihomo cannot flap the ruleset.

use crate::backoff::{Backoff, Jitter};
use crate::clash::api::Health;
use std::time::Duration;
use tokio::time::Instant;

/// Timings and thresholds of the health gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorConfig {
    /// Time between probes in steady state.
    pub probe_interval: Duration,
    /// Time to the next probe after a healthy one while recovery is being confirmed.
    pub confirm_interval: Duration,
    /// Consecutive failed probes before TPROXY is removed.
    pub fail_threshold: u32,
    /// Consecutive strictly healthy probes before TPROXY is (re-)applied.
    pub ok_threshold: u32,
    /// First hold-down after a removal.
    pub hold_down_base: Duration,
    /// Longest hold-down.
    pub hold_down_max: Duration,
    /// A removal within this long of the last application doubles the hold-down.
    pub flap_window: Duration,
    /// Clash runs in TPROXY mode: the gate is driven. In `mixed` mode health is still
    /// tracked and published, but TPROXY is never applied.
    pub manage_tproxy: bool,
}

impl MonitorConfig {
    /// The hold-down after `n` flaps in a row: `hold_down_base · 2ⁿ`, at most
    /// `hold_down_max`; no jitter (one gateway's own ruleset, nothing to spread).
    pub fn hold_down(&self) -> Backoff {
        Backoff::new(self.hold_down_base, self.hold_down_max, Jitter::None)
    }
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            probe_interval: Duration::from_millis(500),
            confirm_interval: Duration::from_millis(200),
            fail_threshold: 1,
            ok_threshold: 2,
            hold_down_base: Duration::from_secs(1),
            hold_down_max: Duration::from_secs(60),
            flap_window: Duration::from_secs(30),
            manage_tproxy: true,
        }
    }
}

/// Published health phase (`/updated/<id>/clash/health`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// mihomo (re)started and has not yet been confirmed healthy.
    Waiting,
    Healthy,
    Unhealthy,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Waiting => "waiting",
            Phase::Healthy => "healthy",
            Phase::Unhealthy => "unhealthy",
        }
    }
}

/// What is published: the phase and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthStatus {
    pub phase: Phase,
    pub reason: String,
}

/// Inputs of the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The supervisor started mihomo.
    ProcessStarted,
    /// The supervisor saw mihomo exit (`detail`: exit status or signal).
    ProcessExited { detail: String },
    /// A probe found mihomo strictly healthy.
    ProbeOk,
    /// A probe found some URLTest groups down.
    ProbeDegraded { reason: String },
    /// A probe failed: API unreachable, stalled or refusing us, or every group down.
    ProbeFailed { reason: String },
    /// The startup chain's prerequisites are met: TPROXY may be applied.
    Arm,
    /// TPROXY must go and stay off (Clash disabled, mode changed, shutdown).
    Disarm { reason: String },
    /// The gate failed to apply; TPROXY is believed off.
    ApplyFailed { reason: String },
    /// The gate failed to remove; retried on every later probe or tick.
    RemoveFailed { reason: String },
    /// A timer fired without a probe result (hold-down expiry, removal retry).
    Tick,
}

impl From<Health> for Input {
    fn from(h: Health) -> Self {
        match h {
            Health::Healthy => Input::ProbeOk,
            Health::Degraded { reason } => Input::ProbeDegraded { reason },
            Health::Unhealthy { reason } => Input::ProbeFailed { reason },
        }
    }
}

/// Log events, rendered by the driver in the predecessor's words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    /// `[clash-monitor] Mihomo crashed, removing TProxy`
    Crashed { reason: String },
    /// `[clash-monitor] Mihomo recovered, reapplying TProxy`
    Recovered,
    /// `[clash] Mihomo is healthy, applying TProxy` (first application)
    FirstApply,
    /// `[clash] Mihomo is healthy`
    BecameHealthy,
    /// `[clash-monitor] Mihomo degraded, keeping TProxy`
    Degraded { reason: String },
    /// `[clash-monitor] Mihomo healthy again, TProxy re-apply held down`
    HeldDown {
        remaining: Duration,
        hold_down: Duration,
    },
    /// `[clash-monitor] TProxy removed (disarmed)`
    Disarmed { reason: String },
    /// `[clash-monitor] TProxy apply failed`
    ApplyFailed { reason: String },
    /// `[clash-monitor] TProxy removal failed, retrying`
    RemoveFailed { reason: String },
}

/// Outputs of the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    RemoveTproxy { reason: String },
    ApplyTproxy { reason: String },
    Publish(HealthStatus),
    Log(LogEvent),
}

/// The health gate's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorState {
    pub phase: Phase,
    pub reason: String,
    pub process_alive: bool,
    pub armed: bool,
    /// TPROXY is (believed) installed.
    pub applied: bool,
    /// A removal failed and must be retried.
    pub remove_pending: bool,
    pub ok_streak: u32,
    pub fail_streak: u32,
    pub last_applied: Option<Instant>,
    pub last_removed: Option<Instant>,
    pub hold_down: Duration,
    /// Removals in a row, each within `flap_window` of the application before it.
    pub flaps: u32,
    /// The hold-down deferral was already logged for the current recovery.
    pub held_logged: bool,
    pub published: Option<HealthStatus>,
}

impl MonitorState {
    /// Initial state. `process_alive` is the supervisor's view when the monitor starts.
    pub fn new(cfg: &MonitorConfig, process_alive: bool) -> Self {
        Self {
            phase: Phase::Waiting,
            reason: "waiting for mihomo to become healthy".to_string(),
            process_alive,
            armed: false,
            applied: false,
            remove_pending: false,
            ok_streak: 0,
            fail_streak: 0,
            last_applied: None,
            last_removed: None,
            hold_down: cfg.hold_down_base,
            flaps: 0,
            held_logged: false,
            published: None,
        }
    }

    pub fn status(&self) -> HealthStatus {
        HealthStatus {
            phase: self.phase,
            reason: self.reason.clone(),
        }
    }
}

/// One transition. Pure: the time comes in as `now`.
pub fn step(
    cfg: &MonitorConfig,
    mut s: MonitorState,
    input: Input,
    now: Instant,
) -> (MonitorState, Vec<Action>) {
    let mut out = Vec::new();
    let input_kind = if matches!(
        input,
        Input::ApplyFailed { .. } | Input::RemoveFailed { .. }
    ) {
        InputKind::GateFailed
    } else {
        InputKind::Other
    };
    match input {
        Input::ProcessStarted => {
            s.process_alive = true;
            s.ok_streak = 0;
            s.fail_streak = 0;
            s.phase = Phase::Waiting;
            s.reason = "mihomo started, waiting for it to become healthy".to_string();
        }
        Input::ProcessExited { detail } => {
            s.process_alive = false;
            s.ok_streak = 0;
            s.phase = Phase::Unhealthy;
            s.reason = format!("mihomo exited ({detail})");
            if s.applied {
                remove(cfg, &mut s, &mut out, now, true);
            }
        }
        Input::ProbeOk => {
            if s.process_alive {
                s.fail_streak = 0;
                s.ok_streak = s.ok_streak.saturating_add(1);
                if s.ok_streak >= cfg.ok_threshold && s.phase != Phase::Healthy {
                    s.phase = Phase::Healthy;
                    s.reason = "api ok, every URLTest group alive".to_string();
                    out.push(Action::Log(LogEvent::BecameHealthy));
                }
            }
        }
        Input::ProbeDegraded { reason } => {
            if s.process_alive {
                s.ok_streak = 0;
                s.fail_streak = 0;
                if s.phase == Phase::Waiting && !s.applied {
                    s.reason = reason;
                } else {
                    if s.phase == Phase::Healthy && s.applied {
                        out.push(Action::Log(LogEvent::Degraded {
                            reason: reason.clone(),
                        }));
                    }
                    s.phase = Phase::Unhealthy;
                    s.reason = reason;
                }
            }
        }
        Input::ProbeFailed { reason } => {
            // With the process gone the exit reason stays; failures are expected.
            if s.process_alive {
                s.ok_streak = 0;
                s.fail_streak = s.fail_streak.saturating_add(1);
                if s.fail_streak >= cfg.fail_threshold {
                    if s.phase != Phase::Waiting || s.applied {
                        s.phase = Phase::Unhealthy;
                    }
                    s.reason = reason;
                    if s.applied {
                        remove(cfg, &mut s, &mut out, now, true);
                    }
                }
            }
        }
        Input::Arm => s.armed = true,
        Input::Disarm { reason } => {
            s.armed = false;
            if s.applied || s.remove_pending {
                out.push(Action::Log(LogEvent::Disarmed {
                    reason: reason.clone(),
                }));
                s.applied = false;
                s.remove_pending = false;
                out.push(Action::RemoveTproxy { reason });
            }
        }
        Input::ApplyFailed { reason } => {
            s.applied = false;
            out.push(Action::Log(LogEvent::ApplyFailed { reason }));
        }
        Input::RemoveFailed { reason } => {
            s.applied = false;
            s.remove_pending = true;
            out.push(Action::Log(LogEvent::RemoveFailed { reason }));
        }
        Input::Tick => {}
    }
    // Gate failures are retried on the next probe or tick, never within the same
    // step: the driver feeds them back at once, so that would spin.
    let gate_failed = matches!(input_kind, InputKind::GateFailed);
    let retrying = !gate_failed
        && s.remove_pending
        && !out.iter().any(|a| matches!(a, Action::RemoveTproxy { .. }));
    if retrying {
        s.remove_pending = false;
        out.push(Action::RemoveTproxy {
            reason: format!("retrying removal: {}", s.reason),
        });
    }
    if !gate_failed {
        maybe_apply(cfg, &mut s, &mut out, now);
    }
    let status = s.status();
    if s.published.as_ref() != Some(&status) {
        s.published = Some(status.clone());
        out.push(Action::Publish(status));
    }
    (s, out)
}

enum InputKind {
    GateFailed,
    Other,
}

fn remove(
    cfg: &MonitorConfig,
    s: &mut MonitorState,
    out: &mut Vec<Action>,
    now: Instant,
    crash: bool,
) {
    if crash {
        let flapping = s
            .last_applied
            .is_some_and(|t| now.saturating_duration_since(t) < cfg.flap_window);
        s.flaps = if flapping {
            s.flaps.saturating_add(1)
        } else {
            0
        };
        s.hold_down = cfg.hold_down().nominal(s.flaps);
    }
    s.applied = false;
    s.remove_pending = false;
    s.last_removed = Some(now);
    s.held_logged = false;
    out.push(Action::Log(LogEvent::Crashed {
        reason: s.reason.clone(),
    }));
    out.push(Action::RemoveTproxy {
        reason: s.reason.clone(),
    });
}

fn hold_down_remaining(s: &MonitorState, now: Instant) -> Duration {
    match s.last_removed {
        Some(t) => (t + s.hold_down).saturating_duration_since(now),
        None => Duration::ZERO,
    }
}

fn maybe_apply(cfg: &MonitorConfig, s: &mut MonitorState, out: &mut Vec<Action>, now: Instant) {
    let ready = cfg.manage_tproxy
        && s.armed
        && s.process_alive
        && !s.applied
        && !s.remove_pending
        && s.phase == Phase::Healthy
        && s.ok_streak >= cfg.ok_threshold;
    if !ready {
        return;
    }
    let remaining = hold_down_remaining(s, now);
    if !remaining.is_zero() {
        if !s.held_logged {
            s.held_logged = true;
            out.push(Action::Log(LogEvent::HeldDown {
                remaining,
                hold_down: s.hold_down,
            }));
        }
        return;
    }
    let first = s.last_removed.is_none();
    s.applied = true;
    s.last_applied = Some(now);
    s.held_logged = false;
    out.push(Action::Log(if first {
        LogEvent::FirstApply
    } else {
        LogEvent::Recovered
    }));
    out.push(Action::ApplyTproxy {
        reason: if first {
            "mihomo healthy".to_string()
        } else {
            "mihomo recovered".to_string()
        },
    });
}

/// When the driver should probe (or tick) next.
pub fn next_wake(cfg: &MonitorConfig, s: &MonitorState, now: Instant) -> Duration {
    let mut wait = cfg.probe_interval;
    if s.process_alive && s.ok_streak > 0 && s.ok_streak < cfg.ok_threshold {
        wait = cfg.confirm_interval;
    }
    let held = cfg.manage_tproxy
        && s.armed
        && !s.applied
        && s.phase == Phase::Healthy
        && s.ok_streak >= cfg.ok_threshold;
    if held {
        let remaining = hold_down_remaining(s, now);
        if !remaining.is_zero() {
            wait = wait.min(remaining);
        }
    }
    wait
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Feeds `(at_ms, input)` pairs; returns the final state and every action.
    fn run(
        cfg: &MonitorConfig,
        mut s: MonitorState,
        t0: Instant,
        inputs: Vec<(u64, Input)>,
    ) -> (MonitorState, Vec<Action>) {
        let mut all = Vec::new();
        for (at, input) in inputs {
            let (next, actions) = step(cfg, s, input, t0 + ms(at));
            s = next;
            all.extend(actions);
        }
        (s, all)
    }

    fn gate_actions(actions: &[Action]) -> Vec<&'static str> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::ApplyTproxy { .. } => Some("apply"),
                Action::RemoveTproxy { .. } => Some("remove"),
                _ => None,
            })
            .collect()
    }

    fn published(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                // As published (`clash/health`, etcd::status owns the format).
                Action::Publish(s) => Some(
                    crate::etcd::status::StateLine::new(s.phase.as_str(), 0, s.reason.clone())
                        .value(),
                ),
                _ => None,
            })
            .collect()
    }

    fn failed(reason: &str) -> Input {
        Input::ProbeFailed {
            reason: reason.into(),
        }
    }

    fn exited(detail: &str) -> Input {
        Input::ProcessExited {
            detail: detail.into(),
        }
    }

    /// The default configuration, its start time and [`applied`]'s monitor.
    fn applied_default() -> (MonitorConfig, Instant, MonitorState) {
        let cfg = MonitorConfig::default();
        let t0 = Instant::now();
        let s = applied(&cfg, t0);
        (cfg, t0, s)
    }

    /// A monitor that is armed, healthy and has TPROXY applied at t=400 ms.
    fn applied(cfg: &MonitorConfig, t0: Instant) -> MonitorState {
        let (s, actions) = run(
            cfg,
            MonitorState::new(cfg, true),
            t0,
            vec![
                (0, Input::Arm),
                (200, Input::ProbeOk),
                (400, Input::ProbeOk),
            ],
        );
        assert_eq!(gate_actions(&actions), ["apply"]);
        assert!(s.applied);
        s
    }

    #[test]
    fn startup_waits_for_confirmation_and_arm() {
        let cfg = MonitorConfig::default();
        let t0 = Instant::now();
        let (s, actions) = run(
            &cfg,
            MonitorState::new(&cfg, true),
            t0,
            vec![
                (0, Input::Tick),
                (
                    100,
                    failed("mihomo API http://127.0.0.1:9090/proxies: unreachable"),
                ),
                (600, Input::ProbeOk),
                (800, Input::ProbeOk),
            ],
        );
        assert!(
            gate_actions(&actions).is_empty(),
            "not armed: nothing applied"
        );
        assert_eq!(
            published(&actions),
            [
                "waiting 0 waiting for mihomo to become healthy",
                "waiting 0 mihomo API http://127.0.0.1:9090/proxies: unreachable",
                "healthy 0 api ok, every URLTest group alive",
            ]
        );
        let (s, actions) = step(&cfg, s, Input::Arm, t0 + ms(900));
        assert!(s.applied);
        assert_eq!(
            actions,
            vec![
                Action::Log(LogEvent::FirstApply),
                Action::ApplyTproxy {
                    reason: "mihomo healthy".into()
                }
            ]
        );
    }

    #[test]
    fn one_ok_probe_is_not_enough() {
        let cfg = MonitorConfig::default();
        let t0 = Instant::now();
        let (s, actions) = run(
            &cfg,
            MonitorState::new(&cfg, true),
            t0,
            vec![
                (0, Input::Arm),
                (100, Input::ProbeOk),
                (300, failed("timeout")),
                (800, Input::ProbeOk),
            ],
        );
        assert!(gate_actions(&actions).is_empty());
        assert_eq!(s.phase, Phase::Waiting);
        assert_eq!(next_wake(&cfg, &s, t0 + ms(800)), cfg.confirm_interval);
    }

    #[test]
    fn process_exit_removes_at_once() {
        let (cfg, t0, s) = applied_default();
        let (s, actions) = step(&cfg, s, exited("signal 9"), t0 + ms(5000));
        assert!(!s.applied);
        assert_eq!(
            actions,
            vec![
                Action::Log(LogEvent::Crashed {
                    reason: "mihomo exited (signal 9)".into()
                }),
                Action::RemoveTproxy {
                    reason: "mihomo exited (signal 9)".into()
                },
                Action::Publish(HealthStatus {
                    phase: Phase::Unhealthy,
                    reason: "mihomo exited (signal 9)".into()
                }),
            ]
        );
        // Probes while the process is gone change nothing (no stale re-apply).
        let (s, actions) = run(
            &cfg,
            s,
            t0,
            vec![
                (5100, Input::ProbeOk),
                (5200, Input::ProbeOk),
                (9000, Input::ProbeOk),
            ],
        );
        assert!(actions.is_empty(), "{actions:?}");
        assert!(!s.applied);
    }

    #[test]
    fn first_failed_probe_removes_and_recovery_reapplies() {
        let (cfg, t0, s) = applied_default();
        let (s, actions) = step(&cfg, s, failed("no answer within 700 ms"), t0 + ms(60_000));
        assert_eq!(gate_actions(&actions), ["remove"]);
        assert_eq!(published(&actions), ["unhealthy 0 no answer within 700 ms"]);
        assert_eq!(
            s.hold_down, cfg.hold_down_base,
            "stable for a minute: base hold-down"
        );
        let (s, actions) = run(
            &cfg,
            s,
            t0,
            vec![(61_100, Input::ProbeOk), (61_300, Input::ProbeOk)],
        );
        assert_eq!(gate_actions(&actions), ["apply"]);
        assert!(actions.contains(&Action::Log(LogEvent::Recovered)));
        assert!(s.applied);
    }

    #[test]
    fn hold_down_defers_reapply_until_tick() {
        let (cfg, t0, s) = applied_default();
        let (s, _) = step(&cfg, s, failed("refused"), t0 + ms(60_000));
        let (s, actions) = run(
            &cfg,
            s,
            t0,
            vec![(60_200, Input::ProbeOk), (60_400, Input::ProbeOk)],
        );
        assert!(gate_actions(&actions).is_empty());
        assert!(actions.contains(&Action::Log(LogEvent::HeldDown {
            remaining: ms(600),
            hold_down: ms(1000)
        })));
        assert_eq!(next_wake(&cfg, &s, t0 + ms(60_700)), ms(300));
        let (s, actions) = step(&cfg, s, Input::Tick, t0 + ms(61_000));
        assert_eq!(gate_actions(&actions), ["apply"]);
        assert!(s.applied);
    }

    #[test]
    fn flapping_grows_the_hold_down_and_stability_resets_it() {
        let cfg = MonitorConfig::default();
        let t0 = Instant::now();
        let mut s = applied(&cfg, t0);
        let mut t = 400;
        let mut seen = Vec::new();
        for _ in 0..8 {
            // Fails 2 s after each application: flapping.
            t += 2000;
            let (next, actions) = step(&cfg, s, failed("refused"), t0 + ms(t));
            assert_eq!(gate_actions(&actions), ["remove"]);
            seen.push(next.hold_down.as_secs());
            t += next.hold_down.as_millis() as u64;
            let (next, actions) = run(
                &cfg,
                next,
                t0,
                vec![(t, Input::ProbeOk), (t, Input::ProbeOk)],
            );
            assert_eq!(gate_actions(&actions), ["apply"]);
            s = next;
        }
        assert_eq!(seen, [2, 4, 8, 16, 32, 60, 60, 60]);
        // Stable longer than the flap window: the next removal starts from the base.
        let (s, _) = step(&cfg, s, failed("refused"), t0 + ms(t + 31_000));
        assert_eq!(s.hold_down, cfg.hold_down_base);
    }

    #[test]
    fn degraded_keeps_tproxy_but_blocks_reapply() {
        let (cfg, t0, s) = applied_default();
        let degraded = Input::ProbeDegraded {
            reason: "1 of 2 URLTest groups down: hk=REJECT".into(),
        };
        let (s, actions) = step(&cfg, s, degraded.clone(), t0 + ms(1000));
        assert!(gate_actions(&actions).is_empty());
        assert_eq!(
            published(&actions),
            ["unhealthy 0 1 of 2 URLTest groups down: hk=REJECT"]
        );
        assert!(s.applied);
        // All groups down: removed.
        let (s, actions) = step(
            &cfg,
            s,
            failed("every URLTest group is down: hk=REJECT, us=REJECT"),
            t0 + ms(60_000),
        );
        assert_eq!(gate_actions(&actions), ["remove"]);
        // Degraded probes never count towards recovery.
        let (s, actions) = run(
            &cfg,
            s,
            t0,
            vec![
                (62_000, degraded.clone()),
                (62_500, degraded.clone()),
                (63_000, Input::ProbeOk),
                (63_500, degraded),
            ],
        );
        assert!(gate_actions(&actions).is_empty(), "{actions:?}");
        assert!(!s.applied);
    }

    #[test]
    fn gate_failures_are_retried() {
        let (cfg, t0, s) = applied_default();
        let (s, actions) = step(
            &cfg,
            s,
            Input::ApplyFailed {
                reason: "nft: busy".into(),
            },
            t0 + ms(450),
        );
        assert!(!s.applied);
        assert!(gate_actions(&actions).is_empty());
        let (s, actions) = step(&cfg, s, Input::ProbeOk, t0 + ms(900));
        assert_eq!(
            gate_actions(&actions),
            ["apply"],
            "retried on the next healthy probe"
        );
        let (s, _) = step(&cfg, s, exited("exit 2"), t0 + ms(2000));
        let (s, actions) = step(
            &cfg,
            s,
            Input::RemoveFailed {
                reason: "nft: busy".into(),
            },
            t0 + ms(2001),
        );
        assert!(s.remove_pending);
        assert!(gate_actions(&actions).is_empty());
        let (s, actions) = step(&cfg, s, Input::Tick, t0 + ms(2500));
        assert_eq!(gate_actions(&actions), ["remove"]);
        assert!(!s.remove_pending);
    }

    #[test]
    fn disarm_removes_without_hold_down_and_stays_off() {
        let (cfg, t0, s) = applied_default();
        let (s, actions) = step(
            &cfg,
            s,
            Input::Disarm {
                reason: "clash disabled".into(),
            },
            t0 + ms(1000),
        );
        assert_eq!(
            actions,
            vec![
                Action::Log(LogEvent::Disarmed {
                    reason: "clash disabled".into()
                }),
                Action::RemoveTproxy {
                    reason: "clash disabled".into()
                }
            ]
        );
        let (s, actions) = run(
            &cfg,
            s,
            t0,
            vec![(1500, Input::ProbeOk), (2000, Input::ProbeOk)],
        );
        assert!(gate_actions(&actions).is_empty());
        assert!(!s.applied);
    }

    #[test]
    fn mixed_mode_never_applies() {
        let cfg = MonitorConfig {
            manage_tproxy: false,
            ..MonitorConfig::default()
        };
        let t0 = Instant::now();
        let (s, actions) = run(
            &cfg,
            MonitorState::new(&cfg, true),
            t0,
            vec![
                (0, Input::Arm),
                (100, Input::ProbeOk),
                (300, Input::ProbeOk),
            ],
        );
        assert!(gate_actions(&actions).is_empty());
        assert_eq!(s.phase, Phase::Healthy);
    }

    #[test]
    fn restart_goes_back_to_waiting() {
        let (cfg, t0, s) = applied_default();
        let (_, actions) = run(
            &cfg,
            s,
            t0,
            vec![
                (1000, exited("exit status 1")),
                (2000, Input::ProcessStarted),
                (2100, failed("refused")),
                (4000, Input::ProbeOk),
                (4200, Input::ProbeOk),
            ],
        );
        assert_eq!(gate_actions(&actions), ["remove", "apply"]);
        assert_eq!(
            published(&actions),
            [
                "unhealthy 0 mihomo exited (exit status 1)",
                "waiting 0 mihomo started, waiting for it to become healthy",
                "waiting 0 refused",
                "healthy 0 api ok, every URLTest group alive",
            ]
        );
    }
}
