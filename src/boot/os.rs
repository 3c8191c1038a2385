//! The OS edge of the boot duties: the [`BootOs`] trait and its one real
//! implementation, [`RealBootOs`] (syscalls, `/proc`, `/sys`, `modprobe`).
//!
//! Owns: one small method per OS operation the duties need, nothing more.
//! Must not: decide anything (what to mount, which module to load): that is `boot`'s
//! pure logic, tested against the fake in `boot::fake`.

use std::fs;
use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use nix::sys::statvfs::{statvfs, FsFlags};

use super::BootError;

/// Mount options meduza uses (a small subset of `MS_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MountOpts {
    pub nosuid: bool,
    pub nodev: bool,
    pub noexec: bool,
    pub noatime: bool,
}

/// One mount(2) call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountRequest {
    pub source: String,
    pub target: PathBuf,
    pub fstype: String,
    pub opts: MountOpts,
    /// Filesystem-specific data (`mode=0755`, overlay dirs).
    pub data: Option<String>,
}

/// Operations of the OS the boot duties use. Each is one small step; none decides.
pub trait BootOs {
    /// True if `path` is a mount point; false if not or if it does not exist.
    fn is_mount_point(&self, path: &Path) -> Result<bool, BootError>;
    /// True if the filesystem holding `path` is mounted read-only.
    fn is_read_only(&self, path: &Path) -> Result<bool, BootError>;
    fn create_dir_all(&self, path: &Path) -> Result<(), BootError>;
    fn mount(&self, req: &MountRequest) -> Result<(), BootError>;
    /// Contents of a text file; `None` if it does not exist.
    fn read_file(&self, path: &Path) -> Result<Option<String>, BootError>;
    /// The first `len` bytes of a file or block device (fewer if it is shorter).
    fn read_head(&self, path: &Path, len: usize) -> Result<Vec<u8>, BootError>;
    /// Entry names of a directory; empty if it does not exist.
    fn list_dir(&self, path: &Path) -> Result<Vec<String>, BootError>;
    /// `uname -r`.
    fn kernel_release(&self) -> Result<String, BootError>;
    /// Load one kernel module (with its dependencies).
    fn modprobe(&self, module: &str) -> Result<(), BootError>;
    /// Set `lo` up; returns whether it was down before.
    fn loopback_up(&self) -> Result<bool, BootError>;
    fn hostname(&self) -> Result<String, BootError>;
    fn set_hostname(&self, name: &str) -> Result<(), BootError>;
    fn is_child_subreaper(&self) -> Result<bool, BootError>;
    /// `prctl(PR_SET_CHILD_SUBREAPER, 1)` for this process.
    fn set_child_subreaper(&self) -> Result<(), BootError>;
}

/// The real OS.
#[derive(Debug, Clone)]
pub struct RealBootOs {
    modprobe: PathBuf,
}

impl RealBootOs {
    /// `modprobe` is the program to run (busybox's or kmod's), normally `/sbin/modprobe`.
    pub fn new(modprobe: impl Into<PathBuf>) -> Self {
        Self {
            modprobe: modprobe.into(),
        }
    }
}

impl Default for RealBootOs {
    fn default() -> Self {
        Self::new("/sbin/modprobe")
    }
}

fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> BootError {
    BootError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl BootOs for RealBootOs {
    fn is_mount_point(&self, path: &Path) -> Result<bool, BootError> {
        // Same test as mountpoint(1): a different device than the parent, or the root
        // (its parent is itself).
        let meta = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err("stat", path, e)),
        };
        let parent_path = path.join("..");
        let parent = fs::metadata(&parent_path).map_err(|e| io_err("stat", &parent_path, e))?;
        Ok(meta.dev() != parent.dev() || meta.ino() == parent.ino())
    }

    fn is_read_only(&self, path: &Path) -> Result<bool, BootError> {
        let st = statvfs(path).map_err(|e| io_err("statvfs", path, e.into()))?;
        Ok(st.flags().contains(FsFlags::ST_RDONLY))
    }

    fn create_dir_all(&self, path: &Path) -> Result<(), BootError> {
        fs::create_dir_all(path).map_err(|e| io_err("mkdir", path, e))
    }

    fn mount(&self, req: &MountRequest) -> Result<(), BootError> {
        let mut flags = MsFlags::empty();
        flags.set(MsFlags::MS_NOSUID, req.opts.nosuid);
        flags.set(MsFlags::MS_NODEV, req.opts.nodev);
        flags.set(MsFlags::MS_NOEXEC, req.opts.noexec);
        flags.set(MsFlags::MS_NOATIME, req.opts.noatime);
        nix::mount::mount(
            Some(req.source.as_str()),
            &req.target,
            Some(req.fstype.as_str()),
            flags,
            req.data.as_deref(),
        )
        .map_err(|errno| BootError::Mount {
            target: req.target.clone(),
            fstype: req.fstype.clone(),
            source: errno,
        })
    }

    fn read_file(&self, path: &Path) -> Result<Option<String>, BootError> {
        match fs::read_to_string(path) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", path, e)),
        }
    }

    fn read_head(&self, path: &Path, len: usize) -> Result<Vec<u8>, BootError> {
        let file = fs::File::open(path).map_err(|e| io_err("open", path, e))?;
        let mut buf = Vec::with_capacity(len);
        file.take(len as u64)
            .read_to_end(&mut buf)
            .map_err(|e| io_err("read", path, e))?;
        Ok(buf)
    }

    fn list_dir(&self, path: &Path) -> Result<Vec<String>, BootError> {
        let entries = match fs::read_dir(path) {
            Ok(it) => it,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("readdir", path, e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_err("readdir", path, e))?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    fn kernel_release(&self) -> Result<String, BootError> {
        let uts = nix::sys::utsname::uname().map_err(|e| BootError::Syscall {
            op: "uname",
            source: e,
        })?;
        Ok(uts.release().to_string_lossy().into_owned())
    }

    fn modprobe(&self, module: &str) -> Result<(), BootError> {
        // argv only: the module name is one of our constants, never a shell string.
        // modprobe needs nothing of meduza's environment (which holds ETCD_PASS).
        let out = crate::supervise::spawn::clean_std_command(&self.modprobe)
            .arg(module)
            .output()
            .map_err(|e| io_err("exec", &self.modprobe, e))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(BootError::Modprobe {
                module: module.to_string(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    fn loopback_up(&self) -> Result<bool, BootError> {
        // SIOCGIFFLAGS/SIOCSIFFLAGS on a throwaway datagram socket: the smallest
        // synchronous way to set IFF_UP before any async runtime (rtnetlink) exists.
        // The kernel then assigns 127.0.0.1/8 and ::1 to lo by itself.
        let sock = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| BootError::Syscall {
            op: "socket",
            source: e,
        })?;
        // SAFETY: ifreq is a plain C struct/union for which all-zero bytes are valid.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        // SAFETY: valid fd, request number matches the argument type (struct ifreq *),
        // and `req` outlives the call.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) };
        if rc < 0 {
            return Err(BootError::Syscall {
                op: "ioctl(SIOCGIFFLAGS, lo)",
                source: nix::errno::Errno::last(),
            });
        }
        // SAFETY: SIOCGIFFLAGS filled the ifru_flags member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        let up = libc::IFF_UP as libc::c_short;
        if flags & up != 0 {
            return Ok(false);
        }
        req.ifr_ifru.ifru_flags = flags | up;
        // SAFETY: as above; SIOCSIFFLAGS reads ifru_flags, which we just wrote.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &mut req) };
        if rc < 0 {
            return Err(BootError::Syscall {
                op: "ioctl(SIOCSIFFLAGS, lo)",
                source: nix::errno::Errno::last(),
            });
        }
        Ok(true)
    }

    fn hostname(&self) -> Result<String, BootError> {
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .map_err(|e| BootError::Syscall {
                op: "gethostname",
                source: e,
            })
    }

    fn set_hostname(&self, name: &str) -> Result<(), BootError> {
        nix::unistd::sethostname(name).map_err(|e| BootError::Syscall {
            op: "sethostname",
            source: e,
        })
    }

    fn is_child_subreaper(&self) -> Result<bool, BootError> {
        nix::sys::prctl::get_child_subreaper().map_err(|e| BootError::Syscall {
            op: "prctl(PR_GET_CHILD_SUBREAPER)",
            source: e,
        })
    }

    fn set_child_subreaper(&self) -> Result<(), BootError> {
        nix::sys::prctl::set_child_subreaper(true).map_err(|e| BootError::Syscall {
            op: "prctl(PR_SET_CHILD_SUBREAPER)",
            source: e,
        })
    }
}
