//! Starting and signalling child processes, behind the `Spawner` trait.
//!
//! Owns: fork/exec of a `ServiceSpec` (argv without a shell, a fresh environment,
//! user switch, capability sets), capture of stdout/stderr as `[svc] line` log lines,
//! and the registry of our own child pids that the orphan reaper must not touch.
//! Also owns the environment of *every* program meduza starts ([`clean_command`],
//! [`clean_std_command`]): services, probes, wireguard-go, vtysh, frr-reload.py, nft
//! and modprobe all start from [`CHILD_ENV`] and nothing of meduza's own environment
//! (which holds `ETCD_PASS`).
//! Must not: decide when to start or stop (that is `supervisor`), or reap pids that
//! are not its own children (that is `reaper`).
//!
//! `RealSpawner` is the one real implementation; `FakeSpawner` models processes in
//! memory (exit on SIGTERM/SIGKILL, recorded calls) for tests of the supervisor; it is
//! built only for tests and the `test-util` feature.

use super::logbuf::LogBuffer;
use super::SuperviseError;
use caps::{CapSet, Capability, CapsHashSet};
use futures::future::BoxFuture;
use meduza_generators::plan::service::{Redact, ServiceSpec};
use nix::sys::signal::{self, Signal};
use nix::unistd::{Gid, Pid, Uid, User};
use serde::Serialize;
#[cfg(any(test, feature = "test-util"))]
use std::collections::HashMap;
use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fmt;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
#[cfg(any(test, feature = "test-util"))]
use tokio::sync::oneshot;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitInfo {
    Code(i32),
    Signal(i32),
    /// The wait itself failed (should not happen; logged where it does).
    Unknown,
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Code(c) => write!(f, "exit code {c}"),
            Self::Signal(s) => match Signal::try_from(*s) {
                Ok(sig) => write!(f, "killed by {sig}"),
                Err(_) => write!(f, "killed by signal {s}"),
            },
            Self::Unknown => f.write_str("unknown exit"),
        }
    }
}

/// A started child: its pid and a future that resolves once it has exited and been
/// reaped. The future must be polled for the child to be reaped.
pub struct Spawned {
    pub pid: u32,
    pub exited: BoxFuture<'static, ExitInfo>,
}

/// `PATH` of every child: fixed, so neither the environment meduza was started with
/// nor a relative entry decides which program a bare name (`vtysh`, `nft`) runs.
pub const CHILD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The whole environment a child starts with, before what its caller adds (a
/// service's `HOME`/`USER` and the `env` of its spec, wireguard-go's `LOG_LEVEL`).
/// Nothing is inherited: meduza's own environment carries its settings, `ETCD_PASS`
/// among them (DESIGN §2). No locale variable on purpose: children run in the POSIX
/// locale, so the output meduza reads back (nft, vtysh, modprobe) stays in English.
pub const CHILD_ENV: &[(&str, &str)] = &[("PATH", CHILD_PATH)];

/// A command for `program` with an explicit environment ([`CHILD_ENV`]) instead of
/// meduza's. Every program meduza starts goes through here (or [`clean_command`]).
/// A bare program name is looked up in [`CHILD_PATH`] (std uses the child's `PATH`
/// when one is set on the command).
pub fn clean_std_command(program: impl AsRef<OsStr>) -> std::process::Command {
    let mut cmd = std::process::Command::new(program);
    cmd.env_clear().envs(CHILD_ENV.iter().copied());
    cmd
}

/// [`clean_std_command`] for tokio.
pub fn clean_command(program: impl AsRef<OsStr>) -> tokio::process::Command {
    clean_std_command(program).into()
}

/// Starts and signals children.
pub trait Spawner: Send + Sync + 'static {
    /// Start `spec`; stdout/stderr lines go to `log` (and to tracing as `[svc] line`).
    fn spawn(&self, spec: &ServiceSpec, log: Arc<LogBuffer>) -> Result<Spawned, SuperviseError>;
    /// Send `signal` to the child `pid` of `service`. SIGKILL goes to the child's
    /// whole process group, so helpers it forked die with it.
    fn signal(&self, service: &str, pid: u32, signal: Signal) -> Result<(), SuperviseError>;
}

/// Pids of children we spawned and will wait for ourselves; the orphan reaper skips
/// them. Spawning holds the lock from fork until the pid is inserted, so the reaper
/// can never see one of our children without its pid being registered.
#[derive(Debug, Clone, Default)]
pub struct ChildRegistry(Arc<Mutex<HashSet<u32>>>);

impl ChildRegistry {
    pub fn lock(&self) -> MutexGuard<'_, HashSet<u32>> {
        // The set stays consistent whatever panicked while holding it (single inserts
        // and removes), so a poisoned lock is still usable.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn contains(&self, pid: u32) -> bool {
        self.lock().contains(&pid)
    }
}

/// Everything the child needs after fork, computed before it: no allocation and no
/// lookups happen between fork and exec.
struct Prepared {
    /// (uid, gid) to switch to.
    user: Option<(Uid, Gid)>,
    keep: CapsHashSet,
    /// Capabilities in our bounding set that the child must lose.
    drop_bounding: Vec<Capability>,
    keep_list: Vec<Capability>,
}

impl Prepared {
    /// Runs in the forked child, before exec. Order matters:
    /// 1. drop the bounding set while we still have CAP_SETPCAP;
    /// 2. inheritable = keep (needed for ambient, capabilities(7));
    /// 3. switch user with PR_SET_KEEPCAPS, so permitted survives setuid;
    /// 4. effective = keep, then permitted = keep (effective must stay ⊆ permitted);
    /// 5. raise ambient = keep, which makes the set survive exec as a non-root user
    ///    (for root, exec gives permitted = bounding = keep).
    fn apply_in_child(&self) -> std::io::Result<()> {
        let fail = |_| std::io::Error::last_os_error();
        for cap in &self.drop_bounding {
            caps::drop(None, CapSet::Bounding, *cap).map_err(fail)?;
        }
        caps::set(None, CapSet::Inheritable, &self.keep).map_err(fail)?;
        if let Some((uid, gid)) = self.user {
            nix::sys::prctl::set_keepcaps(true).map_err(std::io::Error::from)?;
            nix::unistd::setgroups(&[gid]).map_err(std::io::Error::from)?;
            nix::unistd::setgid(gid).map_err(std::io::Error::from)?;
            nix::unistd::setuid(uid).map_err(std::io::Error::from)?;
        }
        caps::set(None, CapSet::Effective, &self.keep).map_err(fail)?;
        caps::set(None, CapSet::Permitted, &self.keep).map_err(fail)?;
        caps::clear(None, CapSet::Ambient).map_err(fail)?;
        for cap in &self.keep_list {
            caps::raise(None, CapSet::Ambient, *cap).map_err(fail)?;
        }
        Ok(())
    }
}

/// Parse capability names (`CAP_NET_ADMIN`, case-insensitive, `CAP_` optional).
pub fn parse_caps(service: &str, names: &[String]) -> Result<Vec<Capability>, SuperviseError> {
    names
        .iter()
        .map(|n| {
            let upper = n.to_ascii_uppercase();
            let full = if upper.starts_with("CAP_") {
                upper
            } else {
                format!("CAP_{upper}")
            };
            full.parse::<Capability>()
                .map_err(|_| SuperviseError::InvalidSpec {
                    service: service.to_string(),
                    field: "caps",
                    value: n.clone(),
                    reason: "unknown capability".into(),
                })
        })
        .collect()
}

/// The real spawner: tokio processes, one process group per child.
#[derive(Debug, Clone, Default)]
pub struct RealSpawner {
    registry: ChildRegistry,
}

/// Longest line kept from a child; longer output is split (a child printing without
/// newlines must not grow our memory).
const MAX_LINE: u64 = 8192;

impl RealSpawner {
    pub fn new() -> Self {
        Self::default()
    }

    /// The pids this spawner waits for itself; give it to `reaper::spawn`.
    pub fn registry(&self) -> ChildRegistry {
        self.registry.clone()
    }

    fn prepare(spec: &ServiceSpec) -> Result<(Prepared, BTreeMap<String, String>), SuperviseError> {
        let keep_list = parse_caps(&spec.name, &spec.caps)?;
        let keep: CapsHashSet = keep_list.iter().copied().collect();
        let bounding = caps::read(None, CapSet::Bounding).map_err(|e| SuperviseError::Caps {
            service: spec.name.clone(),
            reason: e.to_string(),
        })?;
        let drop_bounding = bounding.difference(&keep).copied().collect();
        // On top of CHILD_ENV (clean_command); the spec's own env may override it.
        let mut env = BTreeMap::new();
        let user = match &spec.user {
            Some(name) => {
                let u = User::from_name(name)
                    .map_err(|source| SuperviseError::UserLookup {
                        service: spec.name.clone(),
                        user: name.clone(),
                        source,
                    })?
                    .ok_or_else(|| SuperviseError::UnknownUser {
                        service: spec.name.clone(),
                        user: name.clone(),
                    })?;
                env.insert("HOME".into(), u.dir.to_string_lossy().into_owned());
                env.insert("USER".into(), u.name.clone());
                Some((u.uid, u.gid))
            }
            None => {
                env.insert("HOME".into(), "/root".into());
                None
            }
        };
        env.extend(spec.env.clone());
        Ok((
            Prepared {
                user,
                keep,
                drop_bounding,
                keep_list,
            },
            env,
        ))
    }
}

impl Spawner for RealSpawner {
    fn spawn(&self, spec: &ServiceSpec, log: Arc<LogBuffer>) -> Result<Spawned, SuperviseError> {
        let program = spec
            .argv
            .first()
            .ok_or_else(|| SuperviseError::InvalidSpec {
                service: spec.name.clone(),
                field: "argv",
                value: String::new(),
                reason: "empty argv".into(),
            })?;
        let (prepared, env) = Self::prepare(spec)?;
        let mut cmd = clean_command(program);
        cmd.args(&spec.argv[1..])
            .envs(&env)
            .current_dir(spec.workdir.as_deref().unwrap_or("/"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group: a Ctrl-C on meduza's terminal does not reach the
            // children directly (we stop them in order), and SIGKILL can take the group.
            .process_group(0)
            .kill_on_drop(false);
        // SAFETY: the closure runs between fork and exec in the child. It only calls
        // capget/capset/prctl (through `caps`, which allocates only when building an
        // error string) and setgroups/setgid/setuid (through nix, thin syscall
        // wrappers) on data prepared before the fork; it takes no locks shared with
        // other threads of the parent.
        unsafe {
            cmd.pre_exec(move || prepared.apply_in_child());
        }

        let mut registry = self.registry.lock();
        let mut child = cmd.spawn().map_err(|source| SuperviseError::Spawn {
            service: spec.name.clone(),
            program: program.clone(),
            source,
        })?;
        let Some(pid) = child.id() else {
            // tokio returns None only after the child was reaped, which cannot have
            // happened before our first wait.
            return Err(SuperviseError::Spawn {
                service: spec.name.clone(),
                program: program.clone(),
                source: std::io::Error::other("child has no pid"),
            });
        };
        registry.insert(pid);
        drop(registry);

        if let Some(out) = child.stdout.take() {
            tokio::spawn(pump(
                spec.name.clone(),
                out,
                log.clone(),
                spec.redact.clone(),
            ));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(pump(spec.name.clone(), err, log, spec.redact.clone()));
        }
        let registry = self.registry.clone();
        let service = spec.name.clone();
        let exited = Box::pin(async move {
            let status = child.wait().await;
            registry.lock().remove(&pid);
            match status {
                Ok(st) => {
                    use std::os::unix::process::ExitStatusExt;
                    match (st.code(), st.signal()) {
                        (Some(c), _) => ExitInfo::Code(c),
                        (None, Some(s)) => ExitInfo::Signal(s),
                        (None, None) => ExitInfo::Unknown,
                    }
                }
                Err(err) => {
                    tracing::error!(svc = %service, pid, %err, "waiting for child failed");
                    ExitInfo::Unknown
                }
            }
        });
        Ok(Spawned { pid, exited })
    }

    fn signal(&self, service: &str, pid: u32, sig: Signal) -> Result<(), SuperviseError> {
        let raw = i32::try_from(pid).map_err(|_| SuperviseError::Signal {
            service: service.to_string(),
            pid,
            signal: sig,
            source: nix::Error::EINVAL,
        })?;
        // Only signal pids we are still waiting for: once reaped, the pid may belong
        // to someone else.
        if !self.registry.contains(pid) {
            return Err(SuperviseError::Signal {
                service: service.to_string(),
                pid,
                signal: sig,
                source: nix::Error::ESRCH,
            });
        }
        let target = if sig == Signal::SIGKILL {
            Pid::from_raw(-raw)
        } else {
            Pid::from_raw(raw)
        };
        signal::kill(target, sig).map_err(|source| SuperviseError::Signal {
            service: service.to_string(),
            pid,
            signal: sig,
            source,
        })
    }
}

/// Copy a child's output into its log buffer and tracing, line by line, with the
/// spec's secrets cut out.
async fn pump(
    service: String,
    stream: impl AsyncRead + Unpin,
    log: Arc<LogBuffer>,
    redact: Redact,
) {
    use tokio::io::AsyncReadExt;
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::with_capacity(256);
    loop {
        buf.clear();
        match (&mut reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut buf)
            .await
        {
            Ok(0) => break,
            Ok(_) => {
                while matches!(buf.last(), Some(b'\n' | b'\r')) {
                    buf.pop();
                }
                let line = redact.apply(String::from_utf8_lossy(&buf).into_owned());
                // The `[svc] line` form is the contract for child output (DESIGN §6).
                tracing::info!(target: "meduza::child", svc = %service, "[{service}] {line}");
                log.push(line);
            }
            Err(err) => {
                tracing::warn!(svc = %service, %err, "reading child output failed");
                break;
            }
        }
    }
}

/// One call the fake recorded.
#[cfg(any(test, feature = "test-util"))]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeCall {
    Spawn {
        service: String,
        pid: u32,
    },
    Signal {
        service: String,
        pid: u32,
        signal: Signal,
    },
}

#[cfg(any(test, feature = "test-util"))]
#[derive(Default)]
struct FakeState {
    next_pid: u32,
    calls: Vec<FakeCall>,
    running: HashMap<u32, (String, oneshot::Sender<ExitInfo>)>,
    specs: HashMap<u32, ServiceSpec>,
    logs: HashMap<String, Arc<LogBuffer>>,
    fail: HashSet<String>,
    ignore_term: HashSet<String>,
}

/// In-memory processes. SIGTERM, SIGINT and SIGKILL end a fake process (SIGTERM is
/// ignored by services marked with [`FakeSpawner::ignore_sigterm`]); other signals
/// are only recorded.
#[cfg(any(test, feature = "test-util"))]
#[derive(Clone, Default)]
pub struct FakeSpawner {
    state: Arc<Mutex<FakeState>>,
}

#[cfg(any(test, feature = "test-util"))]
impl FakeSpawner {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, FakeState> {
        // Test double: a panic elsewhere must not hide the recorded calls.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn calls(&self) -> Vec<FakeCall> {
        self.lock().calls.clone()
    }

    /// Names of spawned services, in spawn order.
    pub fn spawned(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                FakeCall::Spawn { service, .. } => Some(service),
                FakeCall::Signal { .. } => None,
            })
            .collect()
    }

    /// Services that received `sig`, in order.
    pub fn signalled(&self, sig: Signal) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                FakeCall::Signal {
                    service, signal, ..
                } if signal == sig => Some(service),
                _ => None,
            })
            .collect()
    }

    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// Make spawning `service` fail (like a missing binary).
    pub fn fail_spawn(&self, service: &str, fail: bool) {
        let mut s = self.lock();
        if fail {
            s.fail.insert(service.to_string());
        } else {
            s.fail.remove(service);
        }
    }

    /// Make `service` ignore SIGTERM (it then needs SIGKILL).
    pub fn ignore_sigterm(&self, service: &str) {
        self.lock().ignore_term.insert(service.to_string());
    }

    /// The pid of `service`'s running fake process.
    pub fn pid_of(&self, service: &str) -> Option<u32> {
        self.lock()
            .running
            .iter()
            .find(|(_, (name, _))| name == service)
            .map(|(pid, _)| *pid)
    }

    /// The spec a fake process was spawned with.
    pub fn spec_of(&self, pid: u32) -> Option<ServiceSpec> {
        self.lock().specs.get(&pid).cloned()
    }

    /// Simulate `service` exiting on its own; false when it is not running.
    pub fn exit(&self, service: &str, status: ExitInfo) -> bool {
        let mut s = self.lock();
        let pid = s
            .running
            .iter()
            .find(|(_, (name, _))| name == service)
            .map(|(pid, _)| *pid);
        match pid.and_then(|p| s.running.remove(&p)) {
            Some((_, tx)) => tx.send(status).is_ok(),
            None => false,
        }
    }

    /// Simulate `service` printing a line.
    pub fn print(&self, service: &str, line: &str) {
        if let Some(log) = self.lock().logs.get(service) {
            log.push(line.to_string());
        }
    }
}

#[cfg(any(test, feature = "test-util"))]
impl Spawner for FakeSpawner {
    fn spawn(&self, spec: &ServiceSpec, log: Arc<LogBuffer>) -> Result<Spawned, SuperviseError> {
        parse_caps(&spec.name, &spec.caps)?;
        let mut s = self.lock();
        if s.fail.contains(&spec.name) {
            return Err(SuperviseError::Spawn {
                service: spec.name.clone(),
                program: spec.argv.first().cloned().unwrap_or_default(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        s.next_pid += 1;
        let pid = 1000 + s.next_pid;
        let (tx, rx) = oneshot::channel();
        s.running.insert(pid, (spec.name.clone(), tx));
        s.specs.insert(pid, spec.clone());
        s.logs.insert(spec.name.clone(), log);
        s.calls.push(FakeCall::Spawn {
            service: spec.name.clone(),
            pid,
        });
        Ok(Spawned {
            pid,
            exited: Box::pin(async move { rx.await.unwrap_or(ExitInfo::Unknown) }),
        })
    }

    fn signal(&self, service: &str, pid: u32, sig: Signal) -> Result<(), SuperviseError> {
        let mut s = self.lock();
        s.calls.push(FakeCall::Signal {
            service: service.to_string(),
            pid,
            signal: sig,
        });
        if !s.running.contains_key(&pid) {
            return Err(SuperviseError::Signal {
                service: service.to_string(),
                pid,
                signal: sig,
                source: nix::Error::ESRCH,
            });
        }
        let ends = match sig {
            Signal::SIGKILL | Signal::SIGINT => true,
            Signal::SIGTERM => !s.ignore_term.contains(service),
            _ => false,
        };
        if ends {
            if let Some((_, tx)) = s.running.remove(&pid) {
                // The receiver may be gone if the supervisor already dropped the child.
                let _ = tx.send(ExitInfo::Signal(sig as i32));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(out: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(out)
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn clean_std_command_gives_exactly_the_allowlist() {
        // The test runs with a full environment (cargo's, the shell's, maybe ETCD_*):
        // none of it reaches the child. `env` as a bare name also shows the lookup
        // goes through CHILD_PATH.
        let out = clean_std_command("env").output().expect("run env");
        assert!(out.status.success(), "{out:?}");
        assert_eq!(lines(&out.stdout), vec![format!("PATH={CHILD_PATH}")]);
    }

    #[tokio::test]
    async fn clean_command_gives_the_allowlist_plus_what_the_caller_adds() {
        let out = clean_command("env")
            .env("LOG_LEVEL", "error")
            .output()
            .await
            .expect("run env");
        assert!(out.status.success(), "{out:?}");
        let mut got = lines(&out.stdout);
        got.sort();
        assert_eq!(
            got,
            vec!["LOG_LEVEL=error".to_string(), format!("PATH={CHILD_PATH}")]
        );
    }

    #[test]
    fn a_service_gets_home_and_its_spec_env_on_top() {
        let mut spec = ServiceSpec::new("svc", vec!["/bin/true".into()]);
        spec.env.insert("FOO".into(), "bar".into());
        let (_, env) = RealSpawner::prepare(&spec).expect("prepare");
        let keys: Vec<&str> = env.keys().map(String::as_str).collect();
        assert_eq!(keys, ["FOO", "HOME"]);
    }
}
