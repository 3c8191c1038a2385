//! The last lines a child printed, kept in memory for the log-scan probe and the API.
//!
//! Owns: a bounded ring per service. Lines carry the generation (one per spawned
//! process) so a log scan looks only at the current process: an error printed by the
//! process a restart replaced must not fail the new one.

use std::collections::VecDeque;
use std::sync::Mutex;

#[derive(Debug)]
pub struct LogBuffer {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    generation: u64,
    lines: VecDeque<(u64, String)>,
}

impl LogBuffer {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the ring inconsistent (each
        // operation is a single push/pop), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new process starts: later lines belong to it.
    pub fn next_generation(&self) {
        self.lock().generation += 1;
    }

    pub fn push(&self, line: String) {
        let mut inner = self.lock();
        let generation = inner.generation;
        if inner.lines.len() == self.capacity {
            inner.lines.pop_front();
        }
        inner.lines.push_back((generation, line));
    }

    /// The last `n` lines of any process, oldest first.
    pub fn recent(&self, n: usize) -> Vec<String> {
        let inner = self.lock();
        let skip = inner.lines.len().saturating_sub(n);
        inner
            .lines
            .iter()
            .skip(skip)
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// The last `n` lines of the current process, oldest first.
    pub fn current(&self, n: usize) -> Vec<String> {
        let inner = self.lock();
        let generation = inner.generation;
        let mine: Vec<&String> = inner
            .lines
            .iter()
            .filter(|(g, _)| *g == generation)
            .map(|(_, l)| l)
            .collect();
        let skip = mine.len().saturating_sub(n);
        mine.into_iter().skip(skip).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_per_generation() {
        let b = LogBuffer::new(3);
        for l in ["a", "b", "c", "d"] {
            b.push(l.into());
        }
        assert_eq!(b.recent(10), ["b", "c", "d"]);
        b.next_generation();
        b.push("e".into());
        assert_eq!(b.current(10), ["e"]);
        assert_eq!(b.recent(2), ["d", "e"]);
    }
}
