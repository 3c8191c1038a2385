//! Child subreaper and orphan reaping (DESIGN §2: meduza "reaps every orphan").
//!
//! Owns: `PR_SET_CHILD_SUBREAPER` on our process, and reaping zombies that are our
//! children but that nobody in meduza waits for (daemons' grandchildren reparented to
//! us when their parent died).
//! Must not: steal an exit status someone else waits for. Two rules ensure that:
//! pids in the spawner's [`ChildRegistry`] are never touched, and any other zombie is
//! reaped only after it has stayed a zombie for [`ORPHAN_AGE`]. Direct children of
//! other code in meduza (an `exec` probe, `nft` run by the nftables crate, std
//! `Command::output()`) are waited for by their owner as soon as they exit, so a
//! zombie that lingers that long is an orphan. A blanket `waitpid(-1)` would race them.
//!
//! There is no syscall that lists one's zombie children, so we scan `/proc/*/stat`
//! (ppid and state fields, proc(5)); that runs only on SIGCHLD, not periodically.

use super::spawn::ChildRegistry;
use super::SuperviseError;
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;

/// How long a foreign zombie must linger before we reap it.
pub const ORPHAN_AGE: Duration = Duration::from_secs(1);

/// Make this process the reaper of its descendants' orphans (prctl(2)).
pub fn become_subreaper() -> Result<(), SuperviseError> {
    nix::sys::prctl::set_child_subreaper(true).map_err(SuperviseError::Subreaper)
}

/// Zombie children of `parent` listed in `/proc`.
pub fn zombie_children(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let entry = e.ok()?;
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
        let (state, ppid) = parse_stat(&stat)?;
        (state == 'Z' && ppid == parent).then_some(pid)
    })
    .collect()
}

/// (state, ppid) from a `/proc/<pid>/stat` line. The command name (field 2) is in
/// parentheses and may itself contain spaces and parentheses, so split after the
/// last `)`.
pub fn parse_stat(stat: &str) -> Option<(char, u32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Reap lingering foreign zombies until shutdown; run it as a task.
pub fn spawn(registry: ChildRegistry) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut sigchld = match signal(SignalKind::child()) {
            Ok(s) => s,
            Err(err) => {
                tracing::error!(%err, "cannot watch SIGCHLD; orphans will not be reaped");
                return;
            }
        };
        let me = std::process::id();
        let mut first_seen: HashMap<u32, Instant> = HashMap::new();
        loop {
            // Scan once per SIGCHLD, and again while a zombie is waiting to age.
            if first_seen.is_empty() {
                if sigchld.recv().await.is_none() {
                    return;
                }
            } else {
                tokio::select! {
                    r = sigchld.recv() => if r.is_none() { return },
                    _ = tokio::time::sleep(ORPHAN_AGE) => {}
                }
            }
            let now = Instant::now();
            let registered = registry.lock();
            let zombies: Vec<u32> = zombie_children(me)
                .into_iter()
                .filter(|pid| !registered.contains(pid))
                .collect();
            drop(registered);
            first_seen.retain(|pid, _| zombies.contains(pid));
            for pid in zombies {
                let seen = *first_seen.entry(pid).or_insert(now);
                if now.duration_since(seen) < ORPHAN_AGE {
                    continue;
                }
                let Ok(raw) = i32::try_from(pid) else {
                    continue;
                };
                match waitpid(Pid::from_raw(raw), Some(WaitPidFlag::WNOHANG)) {
                    Ok(status) => tracing::debug!(pid, ?status, "reaped orphan"),
                    Err(err) => tracing::debug!(pid, %err, "orphan already reaped"),
                }
                first_seen.remove(&pid);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_command_name() {
        let stat = "4242 (we ird) (x)) Z 17 4242 4242 0 -1 4228164 0 0";
        assert_eq!(parse_stat(stat), Some(('Z', 17)));
        assert_eq!(parse_stat("garbage"), None);
    }
}
