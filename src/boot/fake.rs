//! A fake [`BootOs`] that models the state the boot duties change (mounts, loaded
//! modules, loopback, hostname, subreaper), so tests can check that duties converge
//! and that a second run changes nothing.
//!
//! Owns: the model only. Must not: touch the real machine.
//! Built only for tests and the `test-util` feature (docs/testing.md, "Test support").

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use super::os::{BootOs, MountRequest};
use super::BootError;

/// The modelled machine. Public so tests build the machine they need.
#[derive(Debug, Clone, Default)]
pub struct FakeState {
    /// Mount points (other than `/`, which always is one) and what was mounted there.
    pub mounts: BTreeMap<PathBuf, MountRequest>,
    /// Mount points that are read-only; put `/` here for a read-only root.
    pub read_only: BTreeSet<PathBuf>,
    /// Directories that exist.
    pub dirs: BTreeSet<PathBuf>,
    /// Files that exist. `/proc/modules` and `/proc/...` are served from the model
    /// instead, and only while `/proc` is mounted; `/sys/...` and `/dev/...` entries
    /// are visible only while `/sys` and `/dev` are mounted.
    pub files: BTreeMap<PathBuf, Vec<u8>>,
    pub kernel_release: String,
    /// Modules `modprobe` can load, with the modules each pulls in.
    pub available_modules: BTreeMap<String, Vec<String>>,
    pub loaded_modules: BTreeSet<String>,
    pub loopback_up: bool,
    pub hostname: String,
    pub subreaper: bool,
    /// Operations that fail: `"mount:/path"`, `"modprobe:name"`, `"loopback"`,
    /// `"sethostname"`, `"subreaper"`.
    pub failing: BTreeSet<String>,
    /// Every state-changing call, in order (`"mount /proc proc"`, `"modprobe tun"`).
    pub calls: Vec<String>,
}

/// The fake OS: a [`FakeState`] behind a `RefCell` (the trait takes `&self`).
#[derive(Debug, Default)]
pub struct FakeBootOs {
    state: RefCell<FakeState>,
}

impl FakeBootOs {
    pub fn new(state: FakeState) -> Self {
        Self {
            state: RefCell::new(state),
        }
    }

    /// A snapshot of the model for assertions.
    pub fn state(&self) -> FakeState {
        self.state.borrow().clone()
    }

    /// Change the model between runs.
    pub fn with_state(&self, f: impl FnOnce(&mut FakeState)) {
        f(&mut self.state.borrow_mut());
    }
}

fn errno(op: &'static str, e: Errno) -> BootError {
    BootError::Syscall { op, source: e }
}

impl FakeState {
    fn is_mounted(&self, p: &Path) -> bool {
        p == Path::new("/") || self.mounts.contains_key(p)
    }

    /// The mount point holding `p` (longest prefix).
    fn mount_of(&self, p: &Path) -> PathBuf {
        p.ancestors()
            .find(|a| self.is_mounted(a))
            .unwrap_or(Path::new("/"))
            .to_path_buf()
    }

    fn visible(&self, p: &Path) -> bool {
        for api in ["/proc", "/sys", "/dev"] {
            if p.starts_with(api) && !self.mounts.contains_key(Path::new(api)) {
                return false;
            }
        }
        true
    }

    fn proc_modules(&self) -> String {
        self.loaded_modules
            .iter()
            .map(|m| format!("{m} 16384 0 - Live 0x0000000000000000\n"))
            .collect()
    }
}

impl BootOs for FakeBootOs {
    fn is_mount_point(&self, path: &Path) -> Result<bool, BootError> {
        Ok(self.state.borrow().is_mounted(path))
    }

    fn is_read_only(&self, path: &Path) -> Result<bool, BootError> {
        let s = self.state.borrow();
        Ok(s.read_only.contains(&s.mount_of(path)))
    }

    fn create_dir_all(&self, path: &Path) -> Result<(), BootError> {
        let mut s = self.state.borrow_mut();
        if s.dirs.contains(path) {
            return Ok(());
        }
        if s.read_only.contains(&s.mount_of(path)) {
            return Err(BootError::Io {
                op: "mkdir",
                path: path.to_path_buf(),
                source: std::io::Error::from_raw_os_error(libc::EROFS),
            });
        }
        for a in path.ancestors() {
            s.dirs.insert(a.to_path_buf());
        }
        s.calls.push(format!("mkdir {}", path.display()));
        Ok(())
    }

    fn mount(&self, req: &MountRequest) -> Result<(), BootError> {
        let mut s = self.state.borrow_mut();
        let fail = |e| BootError::Mount {
            target: req.target.clone(),
            fstype: req.fstype.clone(),
            source: e,
        };
        if s.failing
            .contains(&format!("mount:{}", req.target.display()))
        {
            return Err(fail(Errno::ENODEV));
        }
        if !s.dirs.contains(&req.target) {
            return Err(fail(Errno::ENOENT));
        }
        if s.is_mounted(&req.target) {
            // The kernel would stack a second mount; model it as an error so a
            // non-idempotent duty shows up in tests.
            return Err(fail(Errno::EBUSY));
        }
        s.calls
            .push(format!("mount {} {}", req.target.display(), req.fstype));
        s.mounts.insert(req.target.clone(), req.clone());
        Ok(())
    }

    fn read_file(&self, path: &Path) -> Result<Option<String>, BootError> {
        let s = self.state.borrow();
        if !s.visible(path) {
            return Ok(None);
        }
        if path == Path::new("/proc/modules") {
            return Ok(Some(s.proc_modules()));
        }
        Ok(s.files
            .get(path)
            .map(|b| String::from_utf8_lossy(b).into_owned()))
    }

    fn read_head(&self, path: &Path, len: usize) -> Result<Vec<u8>, BootError> {
        let s = self.state.borrow();
        match s.files.get(path).filter(|_| s.visible(path)) {
            Some(b) => Ok(b.iter().take(len).copied().collect()),
            None => Err(BootError::Io {
                op: "open",
                path: path.to_path_buf(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            }),
        }
    }

    fn list_dir(&self, path: &Path) -> Result<Vec<String>, BootError> {
        let s = self.state.borrow();
        if !s.visible(path) {
            return Ok(Vec::new());
        }
        let mut names = BTreeSet::new();
        for p in s.files.keys().chain(s.dirs.iter()) {
            if let Ok(rest) = p.strip_prefix(path) {
                if let Some(first) = rest.components().next() {
                    names.insert(first.as_os_str().to_string_lossy().into_owned());
                }
            }
        }
        Ok(names.into_iter().collect())
    }

    fn kernel_release(&self) -> Result<String, BootError> {
        Ok(self.state.borrow().kernel_release.clone())
    }

    fn modprobe(&self, module: &str) -> Result<(), BootError> {
        let mut s = self.state.borrow_mut();
        s.calls.push(format!("modprobe {module}"));
        let deps = match s.available_modules.get(module) {
            Some(d) if !s.failing.contains(&format!("modprobe:{module}")) => d.clone(),
            _ => {
                return Err(BootError::Modprobe {
                    module: module.to_string(),
                    status: "exit status: 1".into(),
                    stderr: format!("modprobe: module {module} not found in modules.dep"),
                })
            }
        };
        s.loaded_modules.extend(deps);
        s.loaded_modules.insert(module.to_string());
        Ok(())
    }

    fn loopback_up(&self) -> Result<bool, BootError> {
        let mut s = self.state.borrow_mut();
        if s.failing.contains("loopback") {
            return Err(errno("ioctl(SIOCSIFFLAGS, lo)", Errno::EPERM));
        }
        if s.loopback_up {
            return Ok(false);
        }
        s.calls.push("loopback up".into());
        s.loopback_up = true;
        Ok(true)
    }

    fn hostname(&self) -> Result<String, BootError> {
        Ok(self.state.borrow().hostname.clone())
    }

    fn set_hostname(&self, name: &str) -> Result<(), BootError> {
        let mut s = self.state.borrow_mut();
        if s.failing.contains("sethostname") {
            return Err(errno("sethostname", Errno::EPERM));
        }
        s.calls.push(format!("sethostname {name}"));
        s.hostname = name.to_string();
        Ok(())
    }

    fn is_child_subreaper(&self) -> Result<bool, BootError> {
        Ok(self.state.borrow().subreaper)
    }

    fn set_child_subreaper(&self) -> Result<(), BootError> {
        let mut s = self.state.borrow_mut();
        if s.failing.contains("subreaper") {
            return Err(errno("prctl(PR_SET_CHILD_SUBREAPER)", Errno::EINVAL));
        }
        s.calls.push("subreaper".into());
        s.subreaper = true;
        Ok(())
    }
}
