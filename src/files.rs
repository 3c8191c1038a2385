//! Files meduza owns, written under `MEDUZA_ROOT`, and the one atomic write.
//!
//! Owns: the atomic, durable write every file of meduza goes through ([`write_atomic`]:
//! temp file in the same directory, fsync, mode, rename, fsync of the directory — the
//! rendered configs, the hosts file, rule files, the subscription, the last good
//! snapshot, restart budgets, secrets), "write only when changed" ([`write_if_changed`]),
//! modes (secrets 0600), and removal of files a domain no longer renders.
//! Must not: let [`RootFs`] write outside the root, or follow a configuration value
//! into a path that escapes it (generators produce absolute paths; `..` is refused here).

#[cfg(any(test, feature = "test-util"))]
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(any(test, feature = "test-util"))]
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("path {path} is not absolute or escapes the root")]
    BadPath { path: String },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("removing {path}: {source}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
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

/// Write `content` to `target` atomically and durably, with permission bits `mode`.
///
/// The one owner of this sequence (STYLE 13; every file meduza writes goes through it):
/// 1. create missing parent directories, fsyncing each new one's parent;
/// 2. write a temp file in the same directory (a rename is atomic only within one
///    file system), created with `mode` and `fchmod`ed to it before any byte is
///    written, so a secret (0600) is never readable by others, even briefly;
/// 3. `fsync` the temp file: its data is on disk before its name can point at it
///    (with delayed allocation a file system may otherwise persist the rename before
///    the data, leaving an empty or partial file after a power cut);
/// 4. `rename` it over the target: readers see the old or the new file, never half;
/// 5. `fsync` the directory, so the rename itself survives a power cut (fsync(2):
///    "an explicit fsync() on a file descriptor for the directory is also needed").
///
/// On any error the temp file is removed and the target is untouched (except after a
/// failed directory fsync: the new file is in place, its durability unknown).
pub fn write_atomic(target: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    PendingWrite::prepare(target, content, mode)?.commit()
}

/// [`write_atomic`] only when the target's content or mode differ from `content` and
/// `mode`; returns whether it wrote. An unreadable target counts as different.
pub fn write_if_changed(target: &Path, content: &[u8], mode: u32) -> io::Result<bool> {
    if let Ok(meta) = std::fs::metadata(target) {
        let same_mode = meta.permissions().mode() & 0o7777 == mode;
        if same_mode && meta.is_file() && std::fs::read(target).is_ok_and(|c| c == content) {
            return Ok(false);
        }
    }
    write_atomic(target, content, mode)?;
    Ok(true)
}

/// Distinguishes temp files of concurrent writes of one target within this process.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Steps 1–3 of [`write_atomic`] done: a synced temp file beside its target. Dropping
/// it without [`commit`](Self::commit) removes the temp file.
#[derive(Debug)]
struct PendingWrite {
    tmp: PathBuf,
    target: PathBuf,
    dir: PathBuf,
    committed: bool,
}

impl PendingWrite {
    fn prepare(target: &Path, content: &[u8], mode: u32) -> io::Result<Self> {
        let name = target.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} has no file name", target.display()),
            )
        })?;
        let dir = match target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        create_dirs_durably(&dir)?;
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(
            ".meduza-tmp-{}-{}",
            std::process::id(),
            TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let pending = Self {
            tmp: dir.join(tmp_name),
            target: target.to_path_buf(),
            dir,
            committed: false,
        };
        // From here on, dropping `pending` (an error) removes the temp file.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&pending.tmp)?;
        // `mode` at open is filtered by the umask and ignored for a stale file of the
        // same name (a crash, then the same pid after a reboot): set it exactly.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(content)?;
        f.sync_all()?;
        Ok(pending)
    }

    fn commit(mut self) -> io::Result<()> {
        std::fs::rename(&self.tmp, &self.target)?;
        self.committed = true;
        sync_dir(&self.dir)
    }
}

impl Drop for PendingWrite {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// `create_dir_all`, then fsync the parent of every directory it created, so a new
/// directory (and the file about to be renamed into it) survives a power cut.
fn create_dirs_durably(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    std::fs::create_dir_all(dir)?;
    for created in missing {
        if let Some(parent) = created.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl Fs for RootFs {
    fn observe(&self, path: &str) -> Option<(Vec<u8>, u32)> {
        let target = self.resolve(path).ok()?;
        let mode = std::fs::metadata(&target).ok()?.permissions().mode() & 0o7777;
        Some((std::fs::read(&target).ok()?, mode))
    }

    fn write_if_changed(&self, path: &str, content: &[u8], mode: u32) -> Result<bool, FsError> {
        let target = self.resolve(path)?;
        write_if_changed(&target, content, mode).map_err(|source| FsError::Write {
            path: target,
            source,
        })
    }

    fn remove(&self, path: &str) -> Result<bool, FsError> {
        let target = self.resolve(path)?;
        match std::fs::remove_file(&target) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(FsError::Remove {
                path: target,
                source,
            }),
        }
    }
}

/// An in-memory file system for tests: path → (content, mode), plus a write count.
#[cfg(any(test, feature = "test-util"))]
#[derive(Debug, Default)]
pub struct MemFs {
    pub files: Mutex<BTreeMap<String, (Vec<u8>, u32)>>,
    pub writes: Mutex<Vec<String>>,
}

#[cfg(any(test, feature = "test-util"))]
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

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn write_atomic_sets_content_and_mode_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a/b/secret");
        write_atomic(&target, b"s3cret", 0o600).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"s3cret");
        assert_eq!(mode_of(&target), 0o600);
        // Replacing changes the mode too, whatever the old file had.
        write_atomic(&target, b"public", 0o644).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"public");
        assert_eq!(mode_of(&target), 0o644);
        write_atomic(&target, b"", 0o640).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"");
        assert_eq!(mode_of(&target), 0o640);
        assert_eq!(
            names(&dir.path().join("a/b")),
            ["secret"],
            "no temp file left"
        );
    }

    #[test]
    fn a_failed_write_leaves_no_temp_and_keeps_the_target() {
        let dir = tempfile::tempdir().unwrap();
        // The target is a directory: the temp file is written, the rename fails.
        let target = dir.path().join("conf");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("inside"), b"keep").unwrap();
        assert!(write_atomic(&target, b"x", 0o644).is_err());
        assert_eq!(names(dir.path()), ["conf"], "no temp file left");
        assert_eq!(std::fs::read(target.join("inside")).unwrap(), b"keep");
        // The parent is a file: nothing can be created at all.
        let file = dir.path().join("plain");
        std::fs::write(&file, b"old").unwrap();
        assert!(write_atomic(&file.join("x"), b"x", 0o644).is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["conf", "plain"]);
        // No file name at all.
        assert!(write_atomic(Path::new("/"), b"x", 0o644).is_err());
    }

    #[test]
    fn a_read_only_directory_fails_cleanly() {
        if nix::unistd::geteuid().is_root() {
            // root ignores directory permissions; the directory case above covers it.
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let ro = dir.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::write(ro.join("f"), b"old").unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        let result = write_atomic(&ro.join("f"), b"new", 0o644);
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(result.is_err());
        assert_eq!(std::fs::read(ro.join("f")).unwrap(), b"old");
        assert_eq!(names(&ro), ["f"], "no temp file left");
    }

    #[test]
    fn old_content_stays_readable_until_the_rename() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("frr.conf");
        write_atomic(&target, b"old", 0o644).unwrap();

        let pending = PendingWrite::prepare(&target, b"new", 0o600).unwrap();
        // Written and synced, not yet visible: readers still get the whole old file.
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        assert_eq!(mode_of(&target), 0o644);
        assert_eq!(std::fs::read(&pending.tmp).unwrap(), b"new");
        assert_eq!(mode_of(&pending.tmp), 0o600, "mode set before the rename");
        assert_eq!(pending.tmp.parent(), target.parent(), "same directory");
        pending.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert_eq!(mode_of(&target), 0o600);
        assert_eq!(names(dir.path()), ["frr.conf"]);

        // Abandoned before the rename (an error in between): the temp file goes away.
        let pending = PendingWrite::prepare(&target, b"never", 0o644).unwrap();
        let tmp = pending.tmp.clone();
        assert!(tmp.exists());
        drop(pending);
        assert!(!tmp.exists());
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
    }

    #[test]
    fn concurrent_readers_see_a_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("hosts");
        let a = vec![b'a'; 64 * 1024];
        let b = vec![b'b'; 192 * 1024];
        write_atomic(&target, &a, 0o644).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (target, a, b, stop) = (target.clone(), a.clone(), b.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0u32;
                while !stop.load(Ordering::Relaxed) || reads == 0 {
                    let got = std::fs::read(&target).unwrap();
                    assert!(got == a || got == b, "torn read of {} bytes", got.len());
                    reads += 1;
                }
                reads
            })
        };
        for i in 0..100 {
            write_atomic(&target, if i % 2 == 0 { &b } else { &a }, 0o644).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
        assert_eq!(names(dir.path()), ["hosts"]);
    }

    #[test]
    fn concurrent_writers_of_one_target_do_not_share_a_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("state");
        let writers: Vec<_> = (0..8u8)
            .map(|i| {
                let target = target.clone();
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        write_atomic(&target, &[i; 4096], 0o644).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let got = std::fs::read(&target).unwrap();
        assert_eq!(got.len(), 4096);
        assert!(
            got.iter().all(|&x| x == got[0]),
            "one writer's whole content"
        );
        assert_eq!(names(dir.path()), ["state"]);
    }

    #[test]
    fn write_if_changed_compares_content_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("new/dir/rules.txt");
        assert!(write_if_changed(&target, b"x\n", 0o644).unwrap());
        let before = std::fs::metadata(&target).unwrap().modified().unwrap();
        assert!(!write_if_changed(&target, b"x\n", 0o644).unwrap());
        assert_eq!(
            std::fs::metadata(&target).unwrap().modified().unwrap(),
            before
        );
        assert!(write_if_changed(&target, b"x\n", 0o600).unwrap());
        assert_eq!(mode_of(&target), 0o600);
        assert!(write_if_changed(&target, b"y\n", 0o600).unwrap());
        assert_eq!(std::fs::read(&target).unwrap(), b"y\n");
        assert_eq!(names(target.parent().unwrap()), ["rules.txt"]);
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
