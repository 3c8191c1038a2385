//! Which etcd member a call goes to: a pure state machine, with the time as input
//! (STYLE 5). [`super::EtcdKv`] holds one etcd-client `Client` per member and asks
//! [`Failover`] for the order in which to try them; it reports every outcome back.
//!
//! Owns: each member's up/down state, the cool-off before a member that failed is
//! tried again, which member calls prefer, and how long a call may wait while no
//! member answers. Must not: do I/O, sleep or log; the caller does all of that.
//!
//! The rules, and why:
//! - calls stick to one *preferred* member (like etcd's Go client pins one), so a
//!   gateway's reads, writes and watch normally use one connection, and move on only
//!   when it fails. The first preferred member is chosen at random, so a fleet spreads
//!   over the cluster instead of all dialing the first endpoint;
//! - a member that failed *fast* ([`Failure::Refused`]: connection refused or reset,
//!   "etcdserver: no leader", server stopping) is cheap to try again, so calls retry
//!   it themselves, after its cool-off, when no member is up;
//! - a member that *timed out* ([`Failure::TimedOut`]: a dead host, a frozen process)
//!   is never tried by a call again: only the background probe does, so a frozen
//!   member costs one attempt timeout once, not one per call;
//! - the cool-off grows per consecutive failure with the shared [`Backoff`] (equal
//!   jitter, so a fleet's probes of a restarted member do not arrive together);
//! - when every member is down, calls wait for one to come back for at most
//!   `outage_grace` after the last one went down — long enough to ride out a leader
//!   election (one to two election timeouts) without failing — and fail at once
//!   after that, leaving the retries to the callers' own backoff.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::SeedableRng as _;
use tokio::time::Instant;

use crate::backoff::{Backoff, Jitter};

/// How an attempt on a member failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The member (or its host) answered at once that it cannot serve: connection
    /// refused or reset, no leader, stopping. Cheap to try again.
    Refused,
    /// No answer within the attempt timeout. Only the background probe tries again.
    TimedOut,
}

/// One member's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    Up,
    Down {
        /// When the member went down (the first of `failures`).
        since: Instant,
        /// Consecutive failures.
        failures: u32,
        /// End of the cool-off: calls may retry a refused member from here on, and
        /// the probe tries it then.
        retry_at: Instant,
        /// How the newest failure went.
        last: Failure,
    },
}

/// Timing of the failover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverPolicy {
    /// Cool-off after the n-th consecutive failure of a member: `base · 2ⁿ⁻¹` up to
    /// `max`, jittered.
    pub cooloff: Backoff,
    /// How long after the last member went down calls still wait for one.
    pub outage_grace: Duration,
}

impl Default for FailoverPolicy {
    fn default() -> Self {
        FailoverPolicy {
            // 0.2 s → 2 s: a probe is one cheap request; a member back after a restart
            // is in use again within about 2 s.
            cooloff: Backoff::new(
                Duration::from_millis(200),
                Duration::from_secs(2),
                Jitter::Equal,
            ),
            // An election takes one to two election timeouts (etcd's default and the
            // usual tuning: 1 s); 3 s covers it with a margin.
            outage_grace: Duration::from_secs(3),
        }
    }
}

/// What recording an outcome means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recorded {
    /// The member went from up to down or back: wake waiting calls, log it once.
    pub transition: bool,
    /// Start the background probe of this member (none is running).
    pub start_probe: bool,
}

/// What a call that has no member left to try does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// A member is available again: try the candidates once more.
    Retry,
    /// Wait until this instant or until a member comes back, whichever is first.
    Until(Instant),
    /// Fail now with the last error.
    GiveUp,
}

/// The members' health and the preferred member.
#[derive(Debug)]
pub struct Failover {
    members: Vec<MemberState>,
    probing: Vec<bool>,
    preferred: usize,
    all_down_since: Option<Instant>,
    policy: FailoverPolicy,
    rng: StdRng,
}

impl Failover {
    /// `members` members, all up, calls starting with `preferred` (modulo the count);
    /// `seed` seeds the cool-off jitter (tests pass a fixed one).
    pub fn new(members: usize, preferred: usize, policy: FailoverPolicy, seed: u64) -> Self {
        let members = members.max(1);
        Failover {
            members: vec![MemberState::Up; members],
            probing: vec![false; members],
            preferred: preferred % members,
            all_down_since: None,
            policy,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    pub fn state(&self, i: usize) -> MemberState {
        self.members[i]
    }

    pub fn is_up(&self, i: usize) -> bool {
        self.members[i] == MemberState::Up
    }

    /// The member calls try first while it is up.
    pub fn preferred(&self) -> usize {
        self.preferred
    }

    /// The members to try now, best first: the up ones, from the preferred one round
    /// the ring; then the refused ones whose cool-off is over, longest waiting first.
    /// A member that timed out is left to its probe.
    pub fn candidates(&self, now: Instant) -> Vec<usize> {
        let n = self.members.len();
        let mut out: Vec<usize> = (0..n)
            .map(|k| (self.preferred + k) % n)
            .filter(|&i| self.is_up(i))
            .collect();
        let mut retry: Vec<(Instant, usize)> = self
            .members
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match *s {
                MemberState::Down {
                    retry_at,
                    last: Failure::Refused,
                    ..
                } if retry_at <= now => Some((retry_at, i)),
                _ => None,
            })
            .collect();
        retry.sort();
        out.extend(retry.into_iter().map(|(_, i)| i));
        out
    }

    /// Member `i` answered (successfully, or with an error that is not the member's
    /// fault, such as "permission denied" or "compacted").
    pub fn succeeded(&mut self, i: usize, _now: Instant) -> Recorded {
        let was_down = !self.is_up(i);
        self.members[i] = MemberState::Up;
        self.all_down_since = None;
        if !self.is_up(self.preferred) {
            self.preferred = i;
        }
        Recorded {
            transition: was_down,
            start_probe: false,
        }
    }

    /// An attempt on member `i` failed.
    pub fn failed(&mut self, i: usize, failure: Failure, now: Instant) -> Recorded {
        let (since, failures) = match self.members[i] {
            MemberState::Up => (now, 1),
            MemberState::Down {
                since, failures, ..
            } => (since, failures.saturating_add(1)),
        };
        let nominal = self.policy.cooloff.nominal(failures - 1);
        let wait = self.policy.cooloff.jitter().apply(nominal, &mut self.rng);
        let was_up = self.is_up(i);
        self.members[i] = MemberState::Down {
            since,
            failures,
            retry_at: now + wait,
            last: failure,
        };
        if self.all_down_since.is_none() && !self.members.contains(&MemberState::Up) {
            self.all_down_since = Some(now);
        }
        let start_probe = !self.probing[i];
        self.probing[i] = true;
        Recorded {
            transition: was_up,
            start_probe,
        }
    }

    /// For the probe of member `i`: when to try it next, or `None` when it is up again
    /// (the probe ends, and a later failure starts a new one).
    pub fn probe_due(&mut self, i: usize) -> Option<Instant> {
        match self.members[i] {
            MemberState::Up => {
                self.probing[i] = false;
                None
            }
            MemberState::Down { retry_at, .. } => Some(retry_at),
        }
    }

    /// For a call that tried every candidate (or had none): retry, wait, or give up.
    /// `deadline` is the end of the call's own budget.
    pub fn wait(&self, now: Instant, deadline: Instant) -> Wait {
        let mut until = deadline;
        for s in &self.members {
            match *s {
                MemberState::Up => return Wait::Retry,
                MemberState::Down {
                    retry_at,
                    last: Failure::Refused,
                    ..
                } => {
                    if retry_at <= now {
                        return Wait::Retry;
                    }
                    until = until.min(retry_at);
                }
                MemberState::Down { .. } => {}
            }
        }
        let Some(since) = self.all_down_since else {
            return Wait::Retry;
        };
        let grace_end = since + self.policy.outage_grace;
        if now >= grace_end || now >= deadline {
            return Wait::GiveUp;
        }
        Wait::Until(until.min(grace_end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// No jitter, so cool-offs are exact: 200, 400, 800, 1600, 2000 ms.
    fn exact() -> FailoverPolicy {
        FailoverPolicy {
            cooloff: Backoff::new(ms(200), ms(2000), Jitter::None),
            outage_grace: ms(3000),
        }
    }

    fn three(preferred: usize) -> (Failover, Instant) {
        (Failover::new(3, preferred, exact(), 1), Instant::now())
    }

    fn retry_at(f: &Failover, i: usize) -> Instant {
        match f.state(i) {
            MemberState::Down { retry_at, .. } => retry_at,
            MemberState::Up => panic!("member {i} is up"),
        }
    }

    #[test]
    fn calls_start_at_the_preferred_member_and_go_round_the_ring() {
        let (f, t) = three(1);
        assert_eq!(f.candidates(t), [1, 2, 0]);
        let (f, t) = three(5);
        assert_eq!(f.preferred(), 2, "taken modulo the member count");
        assert_eq!(f.candidates(t), [2, 0, 1]);
    }

    #[test]
    fn a_failed_member_is_skipped_and_the_next_becomes_preferred() {
        let (mut f, t) = three(0);
        let r = f.failed(0, Failure::Refused, t);
        assert_eq!(
            r,
            Recorded {
                transition: true,
                start_probe: true
            }
        );
        assert_eq!(
            f.candidates(t),
            [1, 2],
            "the failed member waits out its cool-off"
        );
        let r = f.succeeded(1, t);
        assert!(!r.transition, "1 was up all along");
        assert_eq!(f.preferred(), 1);
        // After the cool-off a refused member is a last resort, never before the up ones.
        let later = t + ms(250);
        assert_eq!(f.candidates(later), [1, 2, 0]);
        // Its coming back does not move the calls away from the member that works.
        assert!(f.succeeded(0, later).transition);
        assert_eq!(f.preferred(), 1);
        assert_eq!(f.candidates(later), [1, 2, 0]);
    }

    #[test]
    fn a_timed_out_member_is_left_to_the_probe() {
        let (mut f, t) = three(0);
        f.failed(0, Failure::TimedOut, t);
        f.succeeded(1, t);
        // Long after its cool-off, calls still do not try it: a frozen member would
        // cost every call a timeout.
        assert_eq!(f.candidates(t + Duration::from_secs(60)), [1, 2]);
        // Not even when the others are down too.
        f.failed(1, Failure::Refused, t);
        f.failed(2, Failure::Refused, t);
        assert_eq!(f.candidates(t + Duration::from_secs(60)), [1, 2]);
        // The probe brings it back.
        assert_eq!(f.probe_due(0), Some(t + ms(200)));
        assert!(f.succeeded(0, t + ms(200)).transition);
        assert_eq!(f.candidates(t + ms(200))[0], 0);
    }

    #[test]
    fn the_cool_off_doubles_per_consecutive_failure_and_resets_on_success() {
        let (mut f, t) = three(0);
        let mut now = t;
        let mut waits = Vec::new();
        for _ in 0..6 {
            f.failed(0, Failure::Refused, now);
            waits.push((retry_at(&f, 0) - now).as_millis());
            now += ms(10);
        }
        assert_eq!(waits, [200, 400, 800, 1600, 2000, 2000]);
        match f.state(0) {
            MemberState::Down {
                since, failures, ..
            } => assert_eq!((since, failures), (t, 6)),
            MemberState::Up => panic!("down"),
        }
        f.succeeded(0, now);
        f.failed(0, Failure::Refused, now);
        assert_eq!(retry_at(&f, 0) - now, ms(200));
    }

    #[test]
    fn the_jitter_keeps_the_cool_off_between_half_and_the_nominal_wait() {
        let mut f = Failover::new(1, 0, FailoverPolicy::default(), 7);
        let t = Instant::now();
        for (n, nominal) in [200, 400, 800, 1600, 2000, 2000].into_iter().enumerate() {
            f.failed(0, Failure::Refused, t);
            let wait = retry_at(&f, 0) - t;
            assert!(
                wait >= ms(nominal / 2) && wait <= ms(nominal),
                "failure {}: {wait:?}",
                n + 1
            );
        }
    }

    #[test]
    fn only_one_probe_per_member() {
        let (mut f, t) = three(0);
        assert!(f.failed(2, Failure::TimedOut, t).start_probe);
        assert!(!f.failed(2, Failure::TimedOut, t + ms(300)).start_probe);
        assert_eq!(f.probe_due(2), Some(t + ms(300) + ms(400)));
        // Back up: the probe learns it and ends; the next failure starts a new one.
        f.succeeded(2, t + ms(800));
        assert_eq!(f.probe_due(2), None);
        let r = f.failed(2, Failure::Refused, t + ms(900));
        assert!(r.start_probe && r.transition);
    }

    #[test]
    fn with_no_member_up_calls_retry_refused_ones_after_their_cool_off() {
        let (mut f, t) = three(0);
        let deadline = t + Duration::from_secs(5);
        f.failed(0, Failure::Refused, t);
        f.failed(1, Failure::Refused, t + ms(50));
        f.failed(2, Failure::TimedOut, t + ms(100));
        assert_eq!(f.candidates(t + ms(100)), Vec::<usize>::new());
        assert_eq!(f.wait(t + ms(100), deadline), Wait::Until(t + ms(200)));
        assert_eq!(f.wait(t + ms(200), deadline), Wait::Retry);
        assert_eq!(f.candidates(t + ms(260)), [0, 1], "longest waiting first");
    }

    #[test]
    fn a_whole_outage_is_waited_out_for_the_grace_then_calls_fail_at_once() {
        let (mut f, t) = three(0);
        let deadline = t + Duration::from_secs(5);
        // Every member timed out (e.g. the leader froze and the followers' reads hung):
        // only probes will bring them back; calls wait for that, up to the grace.
        for i in 0..3 {
            f.failed(i, Failure::TimedOut, t);
        }
        assert_eq!(f.wait(t, deadline), Wait::Until(t + ms(3000)));
        assert_eq!(
            f.wait(t + ms(1000), t + ms(2000)),
            Wait::Until(t + ms(2000)),
            "never past the call's own deadline"
        );
        assert_eq!(f.wait(t + ms(2000), t + ms(2000)), Wait::GiveUp);
        assert_eq!(f.wait(t + ms(3000), deadline), Wait::GiveUp);
        // Still down later: calls fail at once (the callers' backoff takes over).
        f.failed(0, Failure::TimedOut, t + Duration::from_secs(10));
        assert_eq!(
            f.wait(t + Duration::from_secs(10), t + Duration::from_secs(15)),
            Wait::GiveUp
        );
        // One member back ends the outage; the next one starts a new grace.
        f.succeeded(1, t + Duration::from_secs(11));
        assert_eq!(
            f.wait(t + Duration::from_secs(11), t + Duration::from_secs(16)),
            Wait::Retry
        );
        f.failed(1, Failure::TimedOut, t + Duration::from_secs(12));
        assert_eq!(
            f.wait(t + Duration::from_secs(12), t + Duration::from_secs(17)),
            Wait::Until(t + Duration::from_secs(15))
        );
    }

    #[test]
    fn a_member_recovered_meanwhile_means_retry() {
        let (mut f, t) = three(0);
        for i in 0..3 {
            f.failed(i, Failure::TimedOut, t);
        }
        f.succeeded(2, t + ms(500));
        assert_eq!(f.wait(t + ms(500), t + ms(5000)), Wait::Retry);
        assert_eq!(f.preferred(), 2);
        assert_eq!(f.candidates(t + ms(500)), [2]);
    }

    #[test]
    fn losing_the_leader_then_a_new_election() {
        // The story of a killed leader (member 0) seen from a gateway preferring it:
        // refused at once, the followers answer "no leader" until they elect one.
        let (mut f, t) = three(0);
        let deadline = t + Duration::from_secs(5);
        f.failed(0, Failure::Refused, t);
        f.failed(1, Failure::Refused, t + ms(1));
        f.failed(2, Failure::Refused, t + ms(2));
        let Wait::Until(wake) = f.wait(t + ms(2), deadline) else {
            panic!("waits for the election")
        };
        assert_eq!(wake, t + ms(200));
        assert_eq!(f.candidates(wake), [0]);
        f.failed(0, Failure::Refused, wake);
        let wake = wake + ms(1);
        assert_eq!(f.candidates(wake + ms(1)), [1, 2]);
        // Member 2 won the election: the call goes on there, and stays there.
        f.failed(1, Failure::Refused, wake);
        assert!(f.succeeded(2, wake).transition);
        assert_eq!(f.preferred(), 2);
        assert_eq!(f.candidates(wake)[0], 2);
    }

    #[test]
    fn a_single_member_is_tried_again_after_its_cool_off() {
        let mut f = Failover::new(1, 0, exact(), 1);
        let t = Instant::now();
        f.failed(0, Failure::Refused, t);
        assert_eq!(f.candidates(t), Vec::<usize>::new());
        assert_eq!(f.wait(t, t + ms(5000)), Wait::Until(t + ms(200)));
        assert_eq!(f.candidates(t + ms(200)), [0]);
    }
}
