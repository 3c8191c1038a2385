//! The persisted restart budget: `$MEDUZA_STATE_DIR/restart/<svc>.state`, one line
//! `"<unix-ts> <source>"` per restart, pruned past one hour (DESIGN §6).
//!
//! Owns: that directory and its files. Writes go through [`crate::files::write_atomic`]
//! (temp file in the same directory, fsync, rename, fsync of the directory), so a crash
//! or a power cut leaves the old or the new file, never half.
//! Must not: decide anything; the policy is in `policy`.

use super::policy::{RestartRecord, RestartSource, WINDOW_SECS};
use super::SuperviseError;
use std::path::{Path, PathBuf};

/// Parse a state file; malformed lines are skipped (the file is ours, but a
/// hand-edited or truncated file must not stop a service from starting).
pub fn parse(text: &str) -> Vec<RestartRecord> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let at = words.next()?.parse().ok()?;
            let source = RestartSource::parse(words.next()?)?;
            Some(RestartRecord { at, source })
        })
        .collect()
}

pub fn render(records: &[RestartRecord]) -> String {
    records
        .iter()
        .map(|r| format!("{} {}\n", r.at, r.source))
        .collect()
}

/// Mode of a state file: not a secret (timestamps and restart sources).
const STATE_FILE_MODE: u32 = 0o644;

/// The restart state directory.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// `state_dir` is `$MEDUZA_STATE_DIR`; files live in its `restart/` subdirectory.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("restart"),
        }
    }

    pub fn path(&self, service: &str) -> PathBuf {
        self.dir.join(format!("{service}.state"))
    }

    /// The records of the last hour; a missing file is an empty history.
    pub fn load(&self, service: &str, now: u64) -> Result<Vec<RestartRecord>, SuperviseError> {
        let path = self.path(service);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let mut records = parse(&text);
                records.retain(|r| now.saturating_sub(r.at) < WINDOW_SECS);
                records.sort_by_key(|r| r.at);
                Ok(records)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(SuperviseError::StateFile {
                service: service.to_string(),
                path,
                source,
            }),
        }
    }

    /// Replace the file with `records`, atomically and durably: the budget must survive
    /// a power cut, or a crash-looping service would get a fresh one after each reboot.
    pub fn save(&self, service: &str, records: &[RestartRecord]) -> Result<(), SuperviseError> {
        let path = self.path(service);
        let err = |source| SuperviseError::StateFile {
            service: service.to_string(),
            path: path.clone(),
            source,
        };
        crate::files::write_atomic(&path, render(records).as_bytes(), STATE_FILE_MODE).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_prunes_and_skips_garbage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = StateStore::new(dir.path());
        assert!(store.load("svc", 10_000).expect("load").is_empty());
        let records = parse("5000 health\n9000 cron\nbogus line\n9500 exit\n9600 reboot\n");
        assert_eq!(records.len(), 3);
        store.save("svc", &records).expect("save");
        let text = std::fs::read_to_string(dir.path().join("restart/svc.state")).expect("read");
        assert_eq!(text, "5000 health\n9000 cron\n9500 exit\n");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("restart"))
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["svc.state"], "no temp file left");
        let loaded = store.load("svc", 9000 + 3599).expect("load");
        assert_eq!(
            loaded.iter().map(|r| r.at).collect::<Vec<_>>(),
            vec![9000, 9500]
        );
    }
}
