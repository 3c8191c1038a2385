//! Boot duties of meduza in the firmware image (init-adjacent work busybox init does
//! not do) and the loader of meduza's own local settings.
//!
//! Owns: mounting the kernel API filesystems if missing, a writable `/etc` over a
//! read-only root, the state partition at `MEDUZA_STATE_DIR`; loading the kernel
//! modules the data plane needs; bringing up `lo`; the hostname (= node id); the child
//! subreaper bit; parsing `/proc/cmdline` ([`cmdline`]) and resolving [`settings`].
//! Every duty is idempotent and independent: a failure is reported, never fatal.
//! Must not: run on a developer machine. [`boot_duties_wanted`] gates it (explicitly
//! requested *and* started by init); nothing here touches networking beyond `lo`,
//! nftables rules, or child processes.

pub mod cmdline;
#[cfg(any(test, feature = "test-util"))]
pub mod fake;
pub mod os;
pub mod settings;

use std::fmt;
use std::path::{Path, PathBuf};

pub use cmdline::{parse_cmdline, KernelCmdline};
#[cfg(any(test, feature = "test-util"))]
pub use fake::{FakeBootOs, FakeState};
pub use os::{BootOs, MountOpts, MountRequest, RealBootOs};
pub use settings::{
    resolve_settings, Dataplane, Origin, Settings, SettingsError, SettingsLayer, Tool,
};

/// Errors of one OS operation of a boot duty.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount {fstype} on {target}: {source}")]
    Mount {
        target: PathBuf,
        fstype: String,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("modprobe {module}: {status}: {stderr}")]
    Modprobe {
        module: String,
        status: String,
        stderr: String,
    },
    #[error("{op}: {source}")]
    Syscall {
        op: &'static str,
        #[source]
        source: nix::errno::Errno,
    },
}

/// Kernel modules the data plane needs (DESIGN §7): nftables with TPROXY, socket and
/// fib expressions, the nat chain type and `redirect` (LAN DNS hijack), `reject`
/// (QUIC/DoT/DoH blocking), WireGuard, TUN (mihomo, tinc, OpenVPN, EasyTier) and veth.
/// `nf_tproxy_*` and `nf_socket_*` are normally pulled in as dependencies; listing
/// them keeps the report explicit and covers kernels that split them differently.
pub const DATAPLANE_MODULES: &[&str] = &[
    "nf_tables",
    "nft_tproxy",
    "nf_tproxy_ipv4",
    "nf_tproxy_ipv6",
    "nft_socket",
    "nf_socket_ipv4",
    "nf_socket_ipv6",
    "nft_fib_inet",
    "nft_chain_nat",
    "nft_redir",
    "nft_reject_inet",
    "wireguard",
    "tun",
    "veth",
];

/// Where the upper layer of the writable `/etc` lives (tmpfs, rebuilt each boot: meduza
/// re-renders every file from etcd or its last-good snapshot on the state partition).
pub const ETC_OVERLAY_DIR: &str = "/run/meduza/etc-overlay";

/// One boot duty.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Duty {
    /// A kernel API filesystem (`/proc`, `/sys`, `/dev`, `/run`).
    Mount(PathBuf),
    /// An overlay making `/etc` writable when the root filesystem is read-only.
    EtcOverlay,
    /// The persistent state partition on `MEDUZA_STATE_DIR`.
    StatePartition,
    Module(String),
    Loopback,
    Hostname,
    Subreaper,
}

impl fmt::Display for Duty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Duty::Mount(p) => write!(f, "mount {}", p.display()),
            Duty::EtcOverlay => f.write_str("etc overlay"),
            Duty::StatePartition => f.write_str("state partition"),
            Duty::Module(m) => write!(f, "module {m}"),
            Duty::Loopback => f.write_str("loopback"),
            Duty::Hostname => f.write_str("hostname"),
            Duty::Subreaper => f.write_str("child subreaper"),
        }
    }
}

/// What a duty did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Changed something; the text says what.
    Done(String),
    /// Nothing to do: the machine already was as wanted.
    AlreadyDone,
    /// Not applicable here (built-in module, no state partition, writable root).
    Skipped(String),
    /// Tried and failed; boot continues.
    Failed(String),
}

/// The outcome of every duty, in the order they ran.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootReport {
    pub entries: Vec<(Duty, Outcome)>,
}

impl BootReport {
    pub fn outcome(&self, duty: &Duty) -> Option<&Outcome> {
        self.entries.iter().find(|(d, _)| d == duty).map(|(_, o)| o)
    }

    pub fn failures(&self) -> impl Iterator<Item = (&Duty, &str)> {
        self.entries.iter().filter_map(|(d, o)| match o {
            Outcome::Failed(why) => Some((d, why.as_str())),
            _ => None,
        })
    }

    /// True when no duty changed anything (a second run on a booted machine).
    pub fn is_noop(&self) -> bool {
        self.entries
            .iter()
            .all(|(_, o)| !matches!(o, Outcome::Done(_)))
    }

    fn push(&mut self, duty: Duty, outcome: Outcome) {
        match &outcome {
            Outcome::Done(what) => tracing::info!(duty = %duty, what = %what, "boot duty done"),
            Outcome::AlreadyDone => tracing::debug!(duty = %duty, "boot duty already done"),
            Outcome::Skipped(why) => tracing::info!(duty = %duty, why = %why, "boot duty skipped"),
            Outcome::Failed(err) => tracing::warn!(duty = %duty, err = %err, "boot duty failed"),
        }
        self.entries.push((duty, outcome));
    }
}

/// Settings as resolved from the real sources: `flags` (built by the CLI), the process
/// environment, `$MEDUZA_ROOT/etc/meduza/meduza.toml` (absent is fine), `/proc/cmdline`
/// (unreadable before `/proc` is mounted: call again after [`run_boot_duties`]) and the
/// hostname. Returns the settings and the unknown `meduza.*` kernel parameters, which
/// the caller should log.
pub fn load_settings(flags: &SettingsLayer) -> Result<(Settings, Vec<String>), SettingsError> {
    let env = SettingsLayer::from_env(std::env::vars())?;
    let root = flags
        .root
        .clone()
        .or_else(|| env.root.clone())
        .unwrap_or_else(|| PathBuf::from("/"));
    let toml_path = root.join(settings::TOML_PATH);
    let toml = match std::fs::read_to_string(&toml_path) {
        Ok(text) => SettingsLayer::from_toml(&text, &toml_path.to_string_lossy())?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => SettingsLayer::default(),
        Err(e) => {
            return Err(SettingsError::Toml {
                path: toml_path.to_string_lossy().into_owned(),
                reason: e.to_string(),
            })
        }
    };
    let cmdline = parse_cmdline(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    let cmdline_layer = SettingsLayer::from_cmdline(&cmdline)?;
    let hostname = nix::unistd::gethostname()
        .ok()
        .map(|h| h.to_string_lossy().into_owned());
    let settings = resolve_settings(flags, &env, &toml, &cmdline_layer, hostname.as_deref())?;
    Ok((settings, cmdline.unknown_keys()))
}

/// Whether `meduza run` should perform the boot duties: only when asked (`MEDUZA_BOOT=1`,
/// `meduza.boot`, `--boot`, all folded into `settings.boot`) *and* started by init
/// (parent pid 1) or being init itself. Both are required so a developer who exports
/// `MEDUZA_BOOT=1` in a shell never gets their machine remounted.
pub fn boot_duties_wanted(settings: &Settings, pid: u32, ppid: u32) -> bool {
    settings.boot && (ppid == 1 || pid == 1)
}

/// Perform every boot duty once, in order. Idempotent: on a machine where everything is
/// already in place the report is all `AlreadyDone`/`Skipped`.
pub fn run_boot_duties(os: &dyn BootOs, settings: &Settings) -> BootReport {
    let mut report = BootReport::default();
    let _span = tracing::info_span!("boot", node = %settings.node_id).entered();

    for (target, fstype, opts, data) in api_mounts() {
        let duty = Duty::Mount(PathBuf::from(target));
        let req = MountRequest {
            source: fstype.to_string(),
            target: PathBuf::from(target),
            fstype: fstype.to_string(),
            opts,
            data: data.map(str::to_string),
        };
        report.push(duty, ensure_mounted(os, &req));
    }
    report.push(Duty::EtcOverlay, etc_overlay(os));
    for module in DATAPLANE_MODULES {
        report.push(Duty::Module((*module).to_string()), load_module(os, module));
    }
    report.push(Duty::StatePartition, state_partition(os, settings));
    report.push(
        Duty::Loopback,
        match os.loopback_up() {
            Ok(true) => Outcome::Done("lo up".into()),
            Ok(false) => Outcome::AlreadyDone,
            Err(e) => Outcome::Failed(e.to_string()),
        },
    );
    report.push(Duty::Hostname, hostname(os, &settings.node_id));
    report.push(Duty::Subreaper, subreaper(os));
    report
}

fn api_mounts() -> [(&'static str, &'static str, MountOpts, Option<&'static str>); 4] {
    let nosuid_nodev_noexec = MountOpts {
        nosuid: true,
        nodev: true,
        noexec: true,
        noatime: false,
    };
    [
        ("/proc", "proc", nosuid_nodev_noexec, None),
        ("/sys", "sysfs", nosuid_nodev_noexec, None),
        (
            "/dev",
            "devtmpfs",
            MountOpts {
                nosuid: true,
                ..MountOpts::default()
            },
            Some("mode=0755"),
        ),
        (
            "/run",
            "tmpfs",
            MountOpts {
                nosuid: true,
                nodev: true,
                ..MountOpts::default()
            },
            Some("mode=0755"),
        ),
    ]
}

fn ensure_mounted(os: &dyn BootOs, req: &MountRequest) -> Outcome {
    match os.is_mount_point(&req.target) {
        Ok(true) => return Outcome::AlreadyDone,
        Ok(false) => {}
        Err(e) => return Outcome::Failed(e.to_string()),
    }
    let res = os.create_dir_all(&req.target).and_then(|()| os.mount(req));
    match res {
        Ok(()) => Outcome::Done(format!("{} on {}", req.fstype, req.target.display())),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

fn etc_overlay(os: &dyn BootOs) -> Outcome {
    match os.is_read_only(Path::new("/")) {
        Ok(false) => return Outcome::Skipped("root filesystem is writable".into()),
        Ok(true) => {}
        Err(e) => return Outcome::Failed(e.to_string()),
    }
    let upper = Path::new(ETC_OVERLAY_DIR).join("upper");
    let work = Path::new(ETC_OVERLAY_DIR).join("work");
    let req = MountRequest {
        source: "overlay".into(),
        target: PathBuf::from("/etc"),
        fstype: "overlay".into(),
        opts: MountOpts::default(),
        data: Some(format!(
            "lowerdir=/etc,upperdir={},workdir={}",
            upper.display(),
            work.display()
        )),
    };
    match os.is_mount_point(&req.target) {
        Ok(true) => return Outcome::AlreadyDone,
        Ok(false) => {}
        Err(e) => return Outcome::Failed(e.to_string()),
    }
    let res = os
        .create_dir_all(&upper)
        .and_then(|()| os.create_dir_all(&work))
        .and_then(|()| os.mount(&req));
    match res {
        Ok(()) => Outcome::Done(format!("overlay on /etc, upper {}", upper.display())),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// Where a wanted module stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleState {
    Loaded,
    BuiltIn,
    /// Listed in `modules.dep`, or the index is unreadable (then modprobe decides).
    Loadable,
    NotAvailable,
}

/// Normalize a module name or a `modules.*` path entry: basename, no `.ko[.xz|.zst|.gz]`,
/// `-` read as `_` (modprobe treats them alike).
pub fn module_name(entry: &str) -> String {
    let base = entry.rsplit('/').next().unwrap_or(entry);
    let base = base.split(".ko").next().unwrap_or(base);
    base.replace('-', "_")
}

/// Classify a module from `/proc/modules`, `modules.builtin` and `modules.dep`. Pure.
pub fn module_state(
    module: &str,
    proc_modules: Option<&str>,
    builtin: Option<&str>,
    modules_dep: Option<&str>,
) -> ModuleState {
    let want = module_name(module);
    let in_proc = proc_modules.is_some_and(|t| {
        t.lines()
            .filter_map(|l| l.split_whitespace().next())
            .any(|m| module_name(m) == want)
    });
    if in_proc {
        return ModuleState::Loaded;
    }
    if builtin.is_some_and(|t| t.lines().any(|l| module_name(l.trim()) == want)) {
        return ModuleState::BuiltIn;
    }
    match modules_dep {
        None => ModuleState::Loadable,
        Some(t) => {
            let listed = t
                .lines()
                .filter_map(|l| l.split(':').next())
                .any(|m| module_name(m.trim()) == want);
            if listed {
                ModuleState::Loadable
            } else {
                ModuleState::NotAvailable
            }
        }
    }
}

fn load_module(os: &dyn BootOs, module: &str) -> Outcome {
    let release = match os.kernel_release() {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let dir = Path::new("/lib/modules").join(release);
    let read = |p: &Path| os.read_file(p).ok().flatten();
    let state = module_state(
        module,
        read(Path::new("/proc/modules")).as_deref(),
        read(&dir.join("modules.builtin")).as_deref(),
        read(&dir.join("modules.dep")).as_deref(),
    );
    match state {
        ModuleState::Loaded => Outcome::AlreadyDone,
        ModuleState::BuiltIn => Outcome::Skipped("built into the kernel".into()),
        ModuleState::NotAvailable => Outcome::Skipped(format!(
            "not in {}/modules.dep (not built, or merged into another module)",
            dir.display()
        )),
        ModuleState::Loadable => match os.modprobe(module) {
            Ok(()) => Outcome::Done("loaded".into()),
            Err(e) => Outcome::Failed(e.to_string()),
        },
    }
}

/// ext2/3/4 volume label from the first 2 KiB of a block device. Pure.
/// The superblock starts at byte 1024; `s_magic` (0xEF53, little endian) is at offset
/// 0x38 and `s_volume_name[16]` at 0x78 (Documentation/filesystems/ext4/super.rst).
pub fn ext_label(head: &[u8]) -> Option<String> {
    const SB: usize = 1024;
    let magic = head.get(SB + 0x38..SB + 0x3A)?;
    if magic != [0x53, 0xEF] {
        return None;
    }
    let raw = head.get(SB + 0x78..SB + 0x88)?;
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    let label = std::str::from_utf8(&raw[..end]).ok()?;
    (!label.is_empty()).then(|| label.to_string())
}

/// A `KEY=value` line of a sysfs `uevent` file. Pure.
pub fn uevent_field<'a>(uevent: &'a str, key: &str) -> Option<&'a str> {
    uevent
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// Find the block device a state spec names: `/dev/...` as is, `LABEL=` by ext label,
/// `PARTLABEL=` by GPT partition name (sysfs `PARTNAME`).
fn find_state_device(os: &dyn BootOs, spec: &str) -> Result<Option<PathBuf>, BootError> {
    if spec.starts_with("/dev/") {
        return Ok(os
            .read_head(Path::new(spec), 0)
            .ok()
            .map(|_| PathBuf::from(spec)));
    }
    let sys = Path::new("/sys/class/block");
    for name in os.list_dir(sys)? {
        let uevent = os
            .read_file(&sys.join(&name).join("uevent"))?
            .unwrap_or_default();
        let devname = uevent_field(&uevent, "DEVNAME").unwrap_or(&name);
        let dev = Path::new("/dev").join(devname);
        if let Some(want) = spec.strip_prefix("PARTLABEL=") {
            if uevent_field(&uevent, "PARTNAME") == Some(want) {
                return Ok(Some(dev));
            }
        } else if let Some(want) = spec.strip_prefix("LABEL=") {
            // Unreadable devices (empty drives, locked media) are not the one.
            if let Ok(head) = os.read_head(&dev, 2048) {
                if ext_label(&head).as_deref() == Some(want) {
                    return Ok(Some(dev));
                }
            }
        }
    }
    Ok(None)
}

fn state_partition(os: &dyn BootOs, settings: &Settings) -> Outcome {
    let target = &settings.state_dir;
    let Some(spec) = settings.state_device.as_deref() else {
        return Outcome::Skipped("state partition disabled (state_device = none)".into());
    };
    match os.is_mount_point(target) {
        Ok(true) => return Outcome::AlreadyDone,
        Ok(false) => {}
        Err(e) => return Outcome::Failed(e.to_string()),
    }
    let found = match find_state_device(os, spec) {
        Ok(f) => f,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let Some(dev) = found else {
        let explicit = spec != settings::DEFAULT_STATE_DEVICE;
        let fallback = state_tmpfs_fallback(os, target);
        let why = format!("no block device matches {spec}{fallback}");
        return if explicit {
            Outcome::Failed(why)
        } else {
            Outcome::Skipped(why)
        };
    };
    let req = MountRequest {
        source: dev.to_string_lossy().into_owned(),
        target: target.clone(),
        fstype: "ext4".into(),
        opts: MountOpts {
            nosuid: true,
            nodev: true,
            noexec: true,
            noatime: true,
        },
        data: None,
    };
    match os.create_dir_all(target).and_then(|()| os.mount(&req)) {
        Ok(()) => Outcome::Done(format!(
            "{} ({spec}) on {}",
            dev.display(),
            target.display()
        )),
        Err(e) => Outcome::Failed(format!("{e}{}", state_tmpfs_fallback(os, target))),
    }
}

/// Without a state partition on a read-only root the state dir is unwritable; a tmpfs
/// keeps meduza running (restart budgets then do not survive a reboot).
fn state_tmpfs_fallback(os: &dyn BootOs, target: &Path) -> String {
    if !os.is_read_only(target).unwrap_or(false) {
        return "; state stays on the root filesystem".into();
    }
    let req = MountRequest {
        source: "tmpfs".into(),
        target: target.to_path_buf(),
        fstype: "tmpfs".into(),
        opts: MountOpts {
            nosuid: true,
            nodev: true,
            noexec: true,
            noatime: false,
        },
        data: Some("mode=0700".into()),
    };
    match os.mount(&req) {
        Ok(()) => "; tmpfs mounted instead (state is lost on reboot)".into(),
        Err(e) => format!("; tmpfs fallback failed too: {e}"),
    }
}

fn subreaper(os: &dyn BootOs) -> Outcome {
    match os.is_child_subreaper() {
        Ok(true) => Outcome::AlreadyDone,
        Ok(false) => match os.set_child_subreaper() {
            Ok(()) => Outcome::Done("PR_SET_CHILD_SUBREAPER".into()),
            Err(e) => Outcome::Failed(e.to_string()),
        },
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

fn hostname(os: &dyn BootOs, node_id: &str) -> Outcome {
    match os.hostname() {
        Ok(h) if h == node_id => Outcome::AlreadyDone,
        Ok(_) => match os.set_hostname(node_id) {
            Ok(()) => Outcome::Done(format!("hostname {node_id}")),
            Err(e) => Outcome::Failed(e.to_string()),
        },
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

#[cfg(test)]
mod tests;
