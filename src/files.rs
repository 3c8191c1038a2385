//! Files meduza owns, written under `MEDUZA_ROOT`.
//!
//! Owns: atomic writes (temp file in the same directory + fsync + rename), modes
//! (secrets 0600), "write only when changed", and removal of files a domain no longer
//! renders. Must not: write outside the root, or follow a configuration value into a
//! path that escapes it (generators produce absolute paths; `..` is refused here).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("path {path} is not absolute or escapes the root")]
    BadPath { path: String },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("removing {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The file system as the reconciler sees it. Paths are absolute *inside* the root
/// (`/etc/frr/frr.conf`).
pub trait Fs: Send + Sync {
    /// Current content, `None` when absent or unreadable.
    fn read(&self, path: &str) -> Option<Vec<u8>> {
        self.observe(path).map(|(content, _)| content)
    }
    /// Current content and permission bits, `None` when absent or unreadable.
    fn observe(&self, path: &str) -> Option<(Vec<u8>, u32)>;
    /// Write atomically when content or mode differ; returns whether it wrote.
    fn write_if_changed(&self, path: &str, content: &[u8], mode: u32) -> Result<bool, FsError>;
    /// Remove a file; returns whether it existed.
    fn remove(&self, path: &str) -> Result<bool, FsError>;
}

/// The real file system under a root directory (`MEDUZA_ROOT`, `/` on a gateway).
#[derive(Debug, Clone)]
pub struct RootFs {
    root: PathBuf,
}

impl RootFs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Map an absolute in-root path to the host path, refusing `..` and relative paths.
    pub fn resolve(&self, path: &str) -> Result<PathBuf, FsError> {
        let p = Path::new(path);
        let ok = p.is_absolute()
            && p.components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if !ok {
            return Err(FsError::BadPath {
                path: path.to_string(),
            });
        }
        Ok(self.root.join(p.strip_prefix("/").unwrap_or(p)))
    }
}

/// Write `content` to `target` atomically with `mode`: a temp file in the same
/// directory is written, fsynced, chmod'ed and renamed over the target, so readers
/// (and a crash) see either the old or the new file, never half of one.
pub fn write_atomic(target: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = target.parent().unwrap_or_else(|| Path::new("/"));
    std::fs::create_dir_all(dir)?;
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("file");
    let tmp = dir.join(format!(".{name}.meduza-tmp-{}", std::process::id()));
    let result = (|| {
        // Created with the final mode so a secret is never world-readable, even briefly.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(content)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, target)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

impl Fs for RootFs {
    fn observe(&self, path: &str) -> Option<(Vec<u8>, u32)> {
        let target = self.resolve(path).ok()?;
        let mode = std::fs::metadata(&target).ok()?.permissions().mode() & 0o7777;
        Some((std::fs::read(&target).ok()?, mode))
    }

    fn write_if_changed(&self, path: &str, content: &[u8], mode: u32) -> Result<bool, FsError> {
        let target = self.resolve(path)?;
        if let Ok(meta) = std::fs::metadata(&target) {
            let same_mode = meta.permissions().mode() & 0o7777 == mode;
            if same_mode
                && std::fs::read(&target)
                    .map(|c| c == content)
                    .unwrap_or(false)
            {
                return Ok(false);
            }
        }
        write_atomic(&target, content, mode).map_err(|source| FsError::Write {
            path: target,
            source,
        })?;
        Ok(true)
    }

    fn remove(&self, path: &str) -> Result<bool, FsError> {
        let target = self.resolve(path)?;
        match std::fs::remove_file(&target) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(FsError::Remove {
                path: target,
                source,
            }),
        }
    }
}

/// An in-memory file system for tests: path → (content, mode), plus a write count.
#[derive(Debug, Default)]
pub struct MemFs {
    pub files: Mutex<BTreeMap<String, (Vec<u8>, u32)>>,
    pub writes: Mutex<Vec<String>>,
}

impl Fs for MemFs {
    fn observe(&self, path: &str) -> Option<(Vec<u8>, u32)> {
        self.files.lock().ok()?.get(path).cloned()
    }

    fn write_if_changed(&self, path: &str, content: &[u8], mode: u32) -> Result<bool, FsError> {
        let mut files = self
            .files
            .lock()
            .map_err(|_| FsError::BadPath { path: path.into() })?;
        if files.get(path) == Some(&(content.to_vec(), mode)) {
            return Ok(false);
        }
        files.insert(path.to_string(), (content.to_vec(), mode));
        if let Ok(mut w) = self.writes.lock() {
            w.push(path.to_string());
        }
        Ok(true)
    }

    fn remove(&self, path: &str) -> Result<bool, FsError> {
        let mut files = self
            .files
            .lock()
            .map_err(|_| FsError::BadPath { path: path.into() })?;
        Ok(files.remove(path).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_only_when_changed_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let fs = RootFs::new(dir.path());
        assert!(fs.write_if_changed("/etc/x/secret", b"a", 0o600).unwrap());
        assert!(!fs.write_if_changed("/etc/x/secret", b"a", 0o600).unwrap());
        let meta = std::fs::metadata(dir.path().join("etc/x/secret")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert!(fs.write_if_changed("/etc/x/secret", b"a", 0o644).unwrap());
        assert!(fs.write_if_changed("/etc/x/secret", b"b", 0o644).unwrap());
        assert_eq!(fs.read("/etc/x/secret").unwrap(), b"b");
        assert!(fs.remove("/etc/x/secret").unwrap());
        assert!(!fs.remove("/etc/x/secret").unwrap());
    }

    #[test]
    fn refuses_escaping_paths() {
        let fs = RootFs::new("/tmp/root");
        assert!(fs.resolve("/etc/../../x").is_err());
        assert!(fs.resolve("etc/x").is_err());
        assert_eq!(
            fs.resolve("/etc/x").unwrap(),
            PathBuf::from("/tmp/root/etc/x")
        );
    }
}
