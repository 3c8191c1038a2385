//! Automatic rollback (docs/operations.md, "Automatic rollback"): the confirm window
//! after a commit is applied, as a pure state machine, and its state file.
//!
//! A commit read from etcd and applied is *pending* until an etcd round trip that
//! started after the apply finished completes (or, for a commit made with
//! `meduza commit --confirm`, until `/confirmed` reaches its revision). A pending
//! commit whose window ends is rolled back to the previous good configuration and
//! refused from then on. [`decide`] takes the time as input (STYLE 5), so the windows
//! are tested without sleeping.
//!
//! Owns: [`State`] and its file `$MEDUZA_STATE_DIR/rollback.json`, the keys
//! `/commit_confirm` and `/confirmed` and their value formats, and `meduza confirm`
//! ([`confirm`]). Must not: apply anything or read the clock — the reconciler does,
//! and feeds events in; the state machine itself never talks to etcd.

use crate::etcd::status::RollbackEntry;
use crate::files::write_atomic;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

/// The state file in `MEDUZA_STATE_DIR`.
pub const STATE_FILE: &str = "rollback.json";
/// Written by `meduza commit --confirm <secs>` in the same transaction as `/commit`:
/// `<secs>`. It applies to the commit whose mod revision equals its own, so a later
/// plain commit (which does not touch it) needs no confirmation.
pub const COMMIT_CONFIRM_KEY: &str = "/commit_confirm";
/// Written by `meduza confirm`: the commit revision the operator confirms (every
/// revision up to it is confirmed).
pub const CONFIRMED_KEY: &str = "/confirmed";
/// How often a pending commit probes etcd.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// A probe that takes longer counts as failed: a black-holed path never answers.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Refused revisions remembered (newest kept): a refused revision only comes back
/// while `/commit` still points at it, so a few are enough.
const REFUSED_MAX: usize = 16;

/// The value of [`COMMIT_CONFIRM_KEY`] for a window of `secs`.
pub fn commit_confirm_value(secs: u64) -> String {
    secs.to_string()
}

/// Parses [`COMMIT_CONFIRM_KEY`]: whole seconds in the `confirm_timeout` range.
pub fn parse_commit_confirm(value: &str) -> Result<u64, String> {
    use meduza_generators::model::{CONFIRM_TIMEOUT_MAX_SECS, CONFIRM_TIMEOUT_MIN_SECS};
    let secs: u64 = value
        .trim()
        .parse()
        .map_err(|_| format!("{value:?} is not a whole number of seconds"))?;
    if (CONFIRM_TIMEOUT_MIN_SECS..=CONFIRM_TIMEOUT_MAX_SECS).contains(&secs) {
        Ok(secs)
    } else {
        Err(format!(
            "{secs} out of range {CONFIRM_TIMEOUT_MIN_SECS}-{CONFIRM_TIMEOUT_MAX_SECS}"
        ))
    }
}

/// Parses [`CONFIRMED_KEY`]: a commit revision.
pub fn parse_confirmed(value: &str) -> Option<i64> {
    value.trim().parse().ok()
}

/// `meduza confirm [--revision N]`: writes [`CONFIRMED_KEY`] = `N`, by default the
/// current `/commit` revision; returns the revision confirmed.
pub async fn confirm(
    kv: &dyn crate::etcd::Kv,
    revision: Option<i64>,
) -> Result<i64, crate::etcd::EtcdError> {
    let revision = match revision {
        Some(r) => r,
        None => kv.get("/commit").await?.map_or(0, |e| e.mod_revision),
    };
    kv.put(CONFIRMED_KEY, &revision.to_string()).await?;
    Ok(revision)
}

/// What confirms a pending commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Any etcd round trip after the apply (`confirm_timeout`).
    Reach,
    /// `/confirmed` >= the revision (`meduza commit --confirm`).
    Explicit,
}

/// An applied commit not confirmed yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub revision: i64,
    /// The revision of the previous good configuration it would roll back to.
    pub previous: i64,
    /// When the apply finished, seconds since the epoch (wall clock: the window
    /// survives a reboot).
    pub applied_at: u64,
    pub timeout_secs: u64,
    pub mode: Mode,
}

impl Pending {
    pub fn deadline(&self) -> u64 {
        self.applied_at.saturating_add(self.timeout_secs)
    }
}

/// Everything persisted between runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub pending: Option<Pending>,
    /// Revisions rolled back, never applied again (oldest first).
    pub refused: Vec<i64>,
    /// The last rollback, republished at every start until a newer one.
    pub last: Option<RollbackEntry>,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An etcd round trip that started after the apply finished completed;
    /// `confirmed` is `/confirmed` when the round trip read it.
    Reached { confirmed: Option<i64> },
    /// A timer fired (or a pass starts): is the window over?
    Tick,
}

/// What to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing pending.
    Idle,
    /// Still pending; the window ends at `deadline` (unix seconds).
    Wait { deadline: u64 },
    /// The pending commit is good.
    Confirm { revision: i64 },
    /// Apply `previous` again and refuse `revision`.
    RollBack {
        revision: i64,
        previous: i64,
        reason: String,
    },
}

/// The confirm/rollback decision for `event` at `now` (unix seconds).
pub fn decide(state: &State, event: &Event, now: u64) -> Decision {
    let Some(p) = &state.pending else {
        return Decision::Idle;
    };
    if let Event::Reached { confirmed } = event {
        let confirms = match p.mode {
            Mode::Reach => true,
            Mode::Explicit => confirmed.is_some_and(|c| c >= p.revision),
        };
        if confirms {
            return Decision::Confirm {
                revision: p.revision,
            };
        }
    }
    if now >= p.deadline() {
        let reason = match p.mode {
            Mode::Reach => format!(
                "etcd unreachable for {} s after applying revision {}",
                p.timeout_secs, p.revision
            ),
            Mode::Explicit => format!(
                "revision {} not confirmed (meduza confirm) within {} s",
                p.revision, p.timeout_secs
            ),
        };
        return Decision::RollBack {
            revision: p.revision,
            previous: p.previous,
            reason,
        };
    }
    Decision::Wait {
        deadline: p.deadline(),
    }
}

impl State {
    /// The state in `dir`, or the empty one (no file, or unreadable: logged).
    pub fn load(dir: &Path) -> Self {
        let path = dir.join(STATE_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).unwrap_or_else(|err| {
                tracing::warn!(path = %path.display(), %err, "rollback state unreadable; ignored");
                State::default()
            }),
            Err(_) => State::default(),
        }
    }

    /// Writes the state durably (atomic rename, fsync).
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let body = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        write_atomic(&dir.join(STATE_FILE), &body, 0o600)
    }

    pub fn is_refused(&self, revision: i64) -> bool {
        self.refused.contains(&revision)
    }

    /// `revision` was applied and waits for confirmation.
    pub fn arm(&mut self, pending: Pending) {
        self.pending = Some(pending);
    }

    /// The pending commit is good.
    pub fn confirm(&mut self) {
        self.pending = None;
    }

    /// The pending commit was rolled back at `at`.
    pub fn rolled_back(&mut self, revision: i64, reason: String, at: u64) -> RollbackEntry {
        self.pending = None;
        if !self.refused.contains(&revision) {
            self.refused.push(revision);
        }
        let extra = self.refused.len().saturating_sub(REFUSED_MAX);
        self.refused.drain(..extra);
        let entry = RollbackEntry {
            revision,
            reason,
            at,
        };
        self.last = Some(entry.clone());
        entry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(mode: Mode) -> State {
        State {
            pending: Some(Pending {
                revision: 20,
                previous: 12,
                applied_at: 1000,
                timeout_secs: 90,
                mode,
            }),
            ..State::default()
        }
    }

    #[test]
    fn nothing_pending_is_idle() {
        let s = State::default();
        assert_eq!(decide(&s, &Event::Tick, 5000), Decision::Idle);
        let reached = Event::Reached { confirmed: None };
        assert_eq!(decide(&s, &reached, 5000), Decision::Idle);
    }

    #[test]
    fn reach_mode_table() {
        let s = pending(Mode::Reach);
        let reached = Event::Reached { confirmed: None };
        let cases = [
            (Event::Tick, 1000, Decision::Wait { deadline: 1090 }),
            (Event::Tick, 1089, Decision::Wait { deadline: 1090 }),
            (reached.clone(), 1001, Decision::Confirm { revision: 20 }),
            // A round trip that completes as the window ends still confirms.
            (reached, 1095, Decision::Confirm { revision: 20 }),
        ];
        for (event, now, want) in cases {
            assert_eq!(decide(&s, &event, now), want, "{event:?} at {now}");
        }
        match decide(&s, &Event::Tick, 1090) {
            Decision::RollBack {
                revision: 20,
                previous: 12,
                reason,
            } => assert!(reason.contains("etcd unreachable for 90 s"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn explicit_mode_needs_confirmed_at_or_past_the_revision() {
        let s = pending(Mode::Explicit);
        let with = |c| Event::Reached { confirmed: c };
        assert_eq!(
            decide(&s, &with(None), 1010),
            Decision::Wait { deadline: 1090 },
            "reaching etcd is not enough"
        );
        assert_eq!(
            decide(&s, &with(Some(19)), 1010),
            Decision::Wait { deadline: 1090 },
            "an older confirmation does not count"
        );
        assert_eq!(
            decide(&s, &with(Some(20)), 1010),
            Decision::Confirm { revision: 20 }
        );
        assert_eq!(
            decide(&s, &with(Some(25)), 1010),
            Decision::Confirm { revision: 20 }
        );
        match decide(&s, &with(Some(19)), 1090) {
            Decision::RollBack { reason, .. } => {
                assert!(reason.contains("not confirmed"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rollback_refuses_the_revision_and_survives_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = pending(Mode::Reach);
        let entry = s.rolled_back(20, "etcd unreachable".into(), 1090);
        assert_eq!(entry.revision, 20);
        assert!(s.pending.is_none() && s.is_refused(20) && !s.is_refused(21));
        s.save(dir.path()).unwrap();
        let back = State::load(dir.path());
        assert_eq!(back, s);
        assert_eq!(decide(&back, &Event::Tick, 99_999), Decision::Idle);
    }

    #[test]
    fn a_window_resumed_after_a_reboot_keeps_its_deadline() {
        let dir = tempfile::tempdir().unwrap();
        pending(Mode::Reach).save(dir.path()).unwrap();
        let s = State::load(dir.path());
        assert_eq!(
            decide(&s, &Event::Tick, 1050),
            Decision::Wait { deadline: 1090 }
        );
        assert!(matches!(
            decide(&s, &Event::Tick, 4000),
            Decision::RollBack { revision: 20, .. }
        ));
    }

    #[test]
    fn refused_revisions_are_bounded_newest_kept() {
        let mut s = State::default();
        for rev in 1..=40 {
            s.rolled_back(rev, "x".into(), 0);
        }
        assert_eq!(s.refused.len(), REFUSED_MAX);
        assert!(s.is_refused(40) && !s.is_refused(1));
    }

    #[tokio::test]
    async fn meduza_confirm_writes_the_current_commit_revision() {
        use crate::etcd::Kv as _;
        let kv = crate::etcd::MemKv::with_keys([("/commit", "x")]);
        let rev = kv.get("/commit").await.unwrap().unwrap().mod_revision;
        assert_eq!(confirm(&kv, None).await.unwrap(), rev);
        let v = kv.get(CONFIRMED_KEY).await.unwrap().unwrap().value;
        assert_eq!(parse_confirmed(&v), Some(rev));
        assert_eq!(confirm(&kv, Some(99)).await.unwrap(), 99);
    }

    #[test]
    fn commit_confirm_and_confirmed_values() {
        assert_eq!(parse_commit_confirm(&commit_confirm_value(120)), Ok(120));
        assert!(parse_commit_confirm("5")
            .unwrap_err()
            .contains("out of range"));
        assert!(parse_commit_confirm("2m").is_err());
        assert_eq!(parse_confirmed("42\n"), Some(42));
        assert_eq!(parse_confirmed("x"), None);
    }
}
