//! The hardware watchdog of `meduza run` on a firmware (docs/operations.md, "Watchdog").
//!
//! Owns: the watchdog device (`MEDUZA_WATCHDOG`, e.g. `/dev/watchdog`): opening it (which
//! arms it), its timeout (`WDIOC_SETTIMEOUT`), petting it (`WDIOC_KEEPALIVE`) from a
//! thread of its own, and the magic close on an orderly shutdown; the heartbeats the
//! daemon's parts beat and the pure rule deciding whether a pet is deserved
//! ([`Liveness`]). The device is petted every third of its timeout, and only when each
//! of the three parts (the tokio runtime that runs the daemon's main loop, the
//! reconciler, the supervisor) showed progress since the previous pet.
//! Must not: decide what the parts do, load kernel modules (the firmware's init loads
//! `softdog` when no hardware watchdog exists: `overlay/etc/init.d/S01watchdog`), or
//! pet unconditionally: a process that pets while its parts are stuck only hides them.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// Written last before `close()`, it asks the driver to disarm (the kernel's
/// Documentation/watchdog/watchdog-api.rst, "Magic Close"); ignored by drivers built
/// or loaded with `nowayout`.
pub const MAGIC_CLOSE: &[u8] = b"V";

/// How often each probe looks at its part.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Longest reconcile pass still taken for progress: a pass fetches a subscription or
/// rule sets (30 s timeouts each) and waits for mihomo (10 s gates); five minutes is
/// far beyond a healthy pass and still catches a pass that never ends.
pub const RECONCILE_PASS_MAX: Duration = Duration::from_secs(300);

/// Longest wait for the supervisor's registry still taken for progress: an `apply`
/// holds it while it stops children (10 s each before SIGKILL) and starts new ones.
pub const SUPERVISOR_BUSY_MAX: Duration = Duration::from_secs(120);

/// Errors of the watchdog device; each names the device.
#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    #[error("opening watchdog {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("watchdog {path}: WDIOC_SETTIMEOUT {secs} s and WDIOC_GETTIMEOUT failed: {errno}")]
    Timeout {
        path: PathBuf,
        secs: u32,
        errno: nix::errno::Errno,
    },
    #[error("watchdog {path}: keepalive failed: {errno}")]
    Keepalive {
        path: PathBuf,
        errno: nix::errno::Errno,
    },
    #[error("watchdog {path}: magic close failed: {source}")]
    Close {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A counter a part of the daemon advances while it makes progress. Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct Heartbeat(Arc<AtomicU64>);

impl Heartbeat {
    pub fn beat(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The parts whose progress earns a pet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// The tokio runtime of `meduza run` (every task of the daemon, its main loop
    /// among them): a ticking task is scheduled.
    MainLoop,
    /// The reconciler: idle waiting for a trigger, or in a pass younger than
    /// [`RECONCILE_PASS_MAX`].
    Reconciler,
    /// The supervisor: its registry can be locked within [`SUPERVISOR_BUSY_MAX`].
    Supervisor,
}

impl Component {
    pub const ALL: [Component; 3] = [
        Component::MainLoop,
        Component::Reconciler,
        Component::Supervisor,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Component::MainLoop => "main loop",
            Component::Reconciler => "reconciler",
            Component::Supervisor => "supervisor",
        }
    }
}

/// One heartbeat per [`Component`], in [`Component::ALL`]'s order.
#[derive(Debug, Clone, Default)]
pub struct Heartbeats {
    pub main_loop: Heartbeat,
    pub reconciler: Heartbeat,
    pub supervisor: Heartbeat,
}

impl Heartbeats {
    pub fn counts(&self) -> [u64; 3] {
        [
            self.main_loop.count(),
            self.reconciler.count(),
            self.supervisor.count(),
        ]
    }
}

/// A part that has not advanced its heartbeat since the previous check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stalled {
    pub component: Component,
    /// Since its heartbeat last advanced.
    pub silent_for: Duration,
}

/// What one check decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pet,
    Withhold(Vec<Stalled>),
}

/// The pet rule, pure (the time is an input): a pet is deserved iff every heartbeat
/// advanced since the previous check. Checks run every third of the timeout, so a
/// part that stops leaves the watchdog unpetted for at least two thirds of it before
/// the reset: between one and two checks' worth of silence is tolerated, never more.
#[derive(Debug, Clone)]
pub struct Liveness {
    last: [u64; 3],
    since: [Instant; 3],
}

impl Liveness {
    /// `counts` are the heartbeats when the device was opened.
    pub fn new(now: Instant, counts: [u64; 3]) -> Self {
        Self {
            last: counts,
            since: [now; 3],
        }
    }

    pub fn check(&mut self, now: Instant, counts: [u64; 3]) -> Verdict {
        let mut stalled = Vec::new();
        for (i, component) in Component::ALL.into_iter().enumerate() {
            if counts[i] != self.last[i] {
                self.last[i] = counts[i];
                self.since[i] = now;
            } else {
                stalled.push(Stalled {
                    component,
                    silent_for: now.saturating_duration_since(self.since[i]),
                });
            }
        }
        if stalled.is_empty() {
            Verdict::Pet
        } else {
            Verdict::Withhold(stalled)
        }
    }
}

/// When a part's current unit of work (a reconcile pass) began; `None` while idle.
/// Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct Busy(Arc<Mutex<Option<Instant>>>);

impl Busy {
    pub fn start(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    pub fn done(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Idle, or busy for less than `max`.
    pub fn responsive(&self, now: Instant, max: Duration) -> bool {
        let since = *self.0.lock().unwrap_or_else(|p| p.into_inner());
        busy_responsive(since, now, max)
    }
}

/// The rule behind [`Busy::responsive`]: waiting for work is progress, as long as the
/// loop is waiting; a unit of work counts until it is `max` old.
pub fn busy_responsive(busy_since: Option<Instant>, now: Instant, max: Duration) -> bool {
    busy_since.is_none_or(|t| now.saturating_duration_since(t) < max)
}

/// Beat `hb` every [`PROBE_INTERVAL`] on the current tokio runtime: the main loop's
/// heartbeat (the runtime schedules tasks).
pub fn spawn_tick(hb: Heartbeat) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PROBE_INTERVAL);
        loop {
            tick.tick().await;
            hb.beat();
        }
    })
}

/// Beat `hb` every [`PROBE_INTERVAL`] while `probe` answers `true`. A probe that takes
/// time (waiting for a lock) still counts as progress until it is `max_wait` old.
pub fn spawn_probe<F, Fut>(
    hb: Heartbeat,
    max_wait: Duration,
    probe: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    tokio::spawn(async move {
        loop {
            let started = Instant::now();
            let answer = probe();
            tokio::pin!(answer);
            let ok = loop {
                tokio::select! {
                    ok = &mut answer => break ok,
                    _ = tokio::time::sleep(PROBE_INTERVAL) => {
                        if busy_responsive(Some(started), Instant::now(), max_wait) {
                            hb.beat();
                        }
                    }
                }
            };
            if ok {
                hb.beat();
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    })
}

/// The device as the petting thread uses it (one real implementation, one fake).
pub trait WatchdogDevice: Send {
    fn keepalive(&mut self) -> Result<(), WatchdogError>;
    /// Write [`MAGIC_CLOSE`] and close: the driver disarms (unless `nowayout`).
    fn magic_close(self: Box<Self>) -> Result<(), WatchdogError>;
}

/// `struct watchdog_info` of `<linux/watchdog.h>`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct WatchdogInfo {
    options: u32,
    firmware_version: u32,
    identity: [u8; 32],
}

// <linux/watchdog.h>: WATCHDOG_IOCTL_BASE 'W'.
nix::ioctl_read!(wdioc_getsupport, b'W', 0, WatchdogInfo);
nix::ioctl_read!(wdioc_keepalive, b'W', 5, libc::c_int);
nix::ioctl_readwrite!(wdioc_settimeout, b'W', 6, libc::c_int);
nix::ioctl_read!(wdioc_gettimeout, b'W', 7, libc::c_int);

/// What the driver reported when the device was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The timeout in force (a driver may round the one asked for).
    pub timeout: u32,
    /// `WDIOC_GETSUPPORT`'s identity (`"Software Watchdog"`, `"i6300ESB timer"`).
    pub identity: Option<String>,
}

/// A `/dev/watchdog*` character device.
#[derive(Debug)]
pub struct DevWatchdog {
    file: File,
    path: PathBuf,
}

impl DevWatchdog {
    /// Open `path` (this arms the watchdog) and set its timeout to `timeout` seconds.
    pub fn open(path: &Path, timeout: u32) -> Result<(Self, Opened), WatchdogError> {
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|source| WatchdogError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let fd = file.as_raw_fd();
        let mut secs = libc::c_int::try_from(timeout).unwrap_or(libc::c_int::MAX);
        // SAFETY: `fd` is open for the lifetime of `file`; the argument is a valid
        // `int` the driver reads and overwrites with the timeout it set.
        let set = unsafe { wdioc_settimeout(fd, &mut secs) };
        let timeout = match set {
            Ok(_) => u32::try_from(secs).unwrap_or(timeout),
            Err(set_err) => {
                // A driver without WDIOF_SETTIMEOUT keeps its own timeout.
                let mut cur: libc::c_int = 0;
                // SAFETY: as above; the driver writes one `int`.
                match unsafe { wdioc_gettimeout(fd, &mut cur) } {
                    Ok(_) if cur > 0 => {
                        warn!(
                            device = %path.display(),
                            wanted = timeout,
                            timeout = cur,
                            err = %set_err,
                            "watchdog timeout cannot be set; using the driver's"
                        );
                        u32::try_from(cur).unwrap_or(timeout)
                    }
                    _ => {
                        return Err(WatchdogError::Timeout {
                            path: path.to_path_buf(),
                            secs: timeout,
                            errno: set_err,
                        })
                    }
                }
            }
        };
        let mut info = WatchdogInfo::default();
        // SAFETY: as above; the driver fills one `struct watchdog_info`.
        let identity = unsafe { wdioc_getsupport(fd, &mut info) }.ok().map(|_| {
            let end = info.identity.iter().position(|&b| b == 0).unwrap_or(32);
            String::from_utf8_lossy(&info.identity[..end]).into_owned()
        });
        let dev = Self {
            file,
            path: path.to_path_buf(),
        };
        Ok((dev, Opened { timeout, identity }))
    }
}

impl WatchdogDevice for DevWatchdog {
    fn keepalive(&mut self) -> Result<(), WatchdogError> {
        let mut dummy: libc::c_int = 0;
        // SAFETY: the fd is open for the lifetime of `self.file`; the driver ignores
        // the argument (Documentation/watchdog/watchdog-api.rst).
        unsafe { wdioc_keepalive(self.file.as_raw_fd(), &mut dummy) }
            .map(|_| ())
            .map_err(|errno| WatchdogError::Keepalive {
                path: self.path.clone(),
                errno,
            })
    }

    fn magic_close(mut self: Box<Self>) -> Result<(), WatchdogError> {
        self.file
            .write_all(MAGIC_CLOSE)
            .map_err(|source| WatchdogError::Close {
                path: self.path.clone(),
                source,
            })
        // The file closes on drop, right after the 'V'.
    }
}

enum Msg {
    /// Orderly shutdown begun: the parts stop one by one, so pet without asking them.
    Stopping,
    /// Orderly shutdown done: magic close.
    Close,
}

/// The running watchdog: a thread pets the device. Dropped without [`Watchdog::close`]
/// (an error path, a panic), the thread closes the device *without* the magic
/// character, so the watchdog stays armed and resets the machine unless a restarted
/// meduza opens it again in time.
pub struct Watchdog {
    tx: std_mpsc::Sender<Msg>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Start petting `device` every `timeout / 3` while `heartbeats` all advance.
    pub fn start(
        device: Box<dyn WatchdogDevice>,
        timeout: Duration,
        heartbeats: Heartbeats,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std_mpsc::channel();
        let interval = timeout / 3;
        let thread = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || pet_loop(device, interval, &heartbeats, &rx))?;
        Ok(Self {
            tx,
            thread: Some(thread),
        })
    }

    /// The orderly shutdown has begun: keep petting until [`Watchdog::close`].
    pub fn stopping(&self) {
        let _ = self.tx.send(Msg::Stopping);
    }

    /// Disarm with the magic close and wait for the thread.
    pub fn close(mut self) {
        let _ = self.tx.send(Msg::Close);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pet_loop(
    mut device: Box<dyn WatchdogDevice>,
    interval: Duration,
    heartbeats: &Heartbeats,
    rx: &std_mpsc::Receiver<Msg>,
) {
    let mut liveness = Liveness::new(Instant::now(), heartbeats.counts());
    let mut stopping = false;
    fn pet(device: &mut Box<dyn WatchdogDevice>) {
        if let Err(err) = device.keepalive() {
            error!(%err, "watchdog keepalive failed");
        }
    }
    pet(&mut device);
    loop {
        match rx.recv_timeout(interval) {
            Ok(Msg::Stopping) => stopping = true,
            Ok(Msg::Close) => {
                match device.magic_close() {
                    Ok(()) => info!("watchdog disarmed (magic close)"),
                    Err(err) => {
                        warn!(%err, "watchdog not disarmed; it resets the machine unless petted")
                    }
                }
                return;
            }
            Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                warn!("watchdog closed without magic close; it stays armed");
                return;
            }
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
        }
        if stopping {
            pet(&mut device);
            continue;
        }
        match liveness.check(Instant::now(), heartbeats.counts()) {
            Verdict::Pet => pet(&mut device),
            // One line per withheld pet: at most three before the reset.
            Verdict::Withhold(stalled) => {
                let parts: Vec<&str> = stalled.iter().map(|s| s.component.as_str()).collect();
                let silent_ms = stalled
                    .iter()
                    .map(|s| s.silent_for.as_millis() as u64)
                    .max()
                    .unwrap_or(0);
                warn!(stalled = ?parts, silent_ms, "watchdog pet withheld: no progress");
            }
        }
    }
}

/// Open `path`, log what it is, and start petting it. `None` (logged as an error)
/// when the device cannot be opened: the gateway still runs, unprotected.
pub fn start(path: &Path, timeout: u32, heartbeats: Heartbeats) -> Option<Watchdog> {
    let (dev, opened) = match DevWatchdog::open(path, timeout) {
        Ok(x) => x,
        Err(err) => {
            error!(%err, "watchdog not armed; the gateway runs without one");
            return None;
        }
    };
    info!(
        device = %path.display(),
        timeout_s = opened.timeout,
        pet_every_ms = (u64::from(opened.timeout) * 1000 / 3),
        identity = opened.identity.as_deref().unwrap_or("unknown"),
        "watchdog armed"
    );
    match Watchdog::start(
        Box::new(dev),
        Duration::from_secs(u64::from(opened.timeout)),
        heartbeats,
    ) {
        Ok(w) => Some(w),
        Err(err) => {
            error!(%err, "watchdog thread not started; the watchdog resets the machine");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn pets_when_every_part_advanced() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, [0, 0, 0]);
        assert_eq!(l.check(t0 + T, [1, 5, 2]), Verdict::Pet);
        assert_eq!(l.check(t0 + 2 * T, [2, 6, 3]), Verdict::Pet);
    }

    #[test]
    fn withholds_naming_the_stalled_part() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, [0, 0, 0]);
        assert_eq!(l.check(t0 + T, [1, 1, 1]), Verdict::Pet);
        assert_eq!(
            l.check(t0 + 2 * T, [2, 1, 2]),
            Verdict::Withhold(vec![Stalled {
                component: Component::Reconciler,
                silent_for: T,
            }])
        );
        assert_eq!(
            l.check(t0 + 3 * T, [3, 1, 3]),
            Verdict::Withhold(vec![Stalled {
                component: Component::Reconciler,
                silent_for: 2 * T,
            }])
        );
    }

    #[test]
    fn a_frozen_process_withholds_for_all_parts() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, [4, 4, 4]);
        let Verdict::Withhold(stalled) = l.check(t0 + T, [4, 4, 4]) else {
            panic!("pet while nothing advanced");
        };
        let parts: Vec<Component> = stalled.iter().map(|s| s.component).collect();
        assert_eq!(parts, Component::ALL.to_vec());
    }

    #[test]
    fn resumes_petting_once_the_part_advances() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, [0, 0, 0]);
        assert!(matches!(l.check(t0 + T, [1, 1, 0]), Verdict::Withhold(_)));
        assert_eq!(l.check(t0 + 2 * T, [2, 2, 1]), Verdict::Pet);
    }

    #[test]
    fn opening_counts_are_the_baseline() {
        // Beats before the device was opened do not earn the first pet.
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, [9, 9, 9]);
        assert!(matches!(l.check(t0 + T, [9, 10, 10]), Verdict::Withhold(_)));
    }

    #[test]
    fn idle_is_responsive_and_a_long_unit_of_work_is_not() {
        let t0 = Instant::now();
        let max = Duration::from_secs(300);
        assert!(busy_responsive(None, t0, max));
        assert!(busy_responsive(
            Some(t0),
            t0 + Duration::from_secs(299),
            max
        ));
        assert!(!busy_responsive(Some(t0), t0 + max, max));
        let b = Busy::default();
        assert!(b.responsive(Instant::now(), max));
        b.start();
        assert!(!b.responsive(Instant::now() + max, max));
        b.done();
        assert!(b.responsive(Instant::now() + max, max));
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Ev {
        Pet,
        MagicClose,
    }

    struct FakeDevice(Arc<Mutex<Vec<Ev>>>);

    impl WatchdogDevice for FakeDevice {
        fn keepalive(&mut self) -> Result<(), WatchdogError> {
            self.0.lock().unwrap().push(Ev::Pet);
            Ok(())
        }
        fn magic_close(self: Box<Self>) -> Result<(), WatchdogError> {
            self.0.lock().unwrap().push(Ev::MagicClose);
            Ok(())
        }
    }

    fn pets(log: &Mutex<Vec<Ev>>) -> usize {
        log.lock()
            .unwrap()
            .iter()
            .filter(|e| **e == Ev::Pet)
            .count()
    }

    #[test]
    fn thread_pets_only_with_progress_and_magic_closes() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let hb = Heartbeats::default();
        // 30 ms timeout: a check every 10 ms.
        let wd = Watchdog::start(
            Box::new(FakeDevice(log.clone())),
            Duration::from_millis(30),
            hb.clone(),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(pets(&log), 1, "only the pet on opening without heartbeats");
        // Deadlines, not counts of sleeps: a loaded test machine may delay the thread.
        let deadline = Instant::now() + Duration::from_secs(10);
        while pets(&log) < 4 && Instant::now() < deadline {
            hb.main_loop.beat();
            hb.reconciler.beat();
            hb.supervisor.beat();
            std::thread::sleep(Duration::from_millis(15));
        }
        let with_progress = pets(&log);
        assert!(with_progress >= 4, "pets with progress: {with_progress}");
        wd.stopping();
        while pets(&log) <= with_progress + 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            pets(&log) > with_progress + 1,
            "pets during an orderly shutdown without heartbeats"
        );
        wd.close();
        assert_eq!(log.lock().unwrap().last(), Some(&Ev::MagicClose));
    }

    #[test]
    fn dropped_without_close_leaves_it_armed() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let wd = Watchdog::start(
            Box::new(FakeDevice(log.clone())),
            Duration::from_millis(30),
            Heartbeats::default(),
        )
        .unwrap();
        let Watchdog { tx, thread } = wd;
        drop(tx);
        thread.unwrap().join().unwrap();
        assert!(!log.lock().unwrap().contains(&Ev::MagicClose));
    }
}
