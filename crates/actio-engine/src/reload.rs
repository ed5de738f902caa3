//! Files that reload without a restart: rule sets and models.
//!
//! A [`Reloadable`] holds the compiled content of one file behind an [`ArcSwap`]:
//! a message loads the current value once (one atomic load, no lock) and keeps it
//! for its whole evaluation, so a swap lands between messages, never inside one.
//! [`Reload::reload`] reads and compiles the file on the caller's thread (a
//! watcher's, a signal's, an admin request's: never a worker's); a file whose bytes
//! did not change is not recompiled, so a burst of file events swaps at most once.
//! A file that does not compile leaves the value in force, and the error (file,
//! line, field) is kept and counted for the service's logs and metrics.
//!
//! One mechanism for every kind of file: a kind's value says how it is versioned
//! ([`Versioned`]) and what it carries over from the value it replaces (a rule
//! set's per-rule counters, so `/metrics` counters never go back).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use crate::EngineError;

/// What a reloadable value says about itself.
pub trait Versioned: Send + Sync + fmt::Debug + 'static {
    /// The version its file declares.
    fn version(&self) -> &str;
    /// Takes over what must outlive a reload from `old` (counters).
    fn carry_from(&mut self, _old: &Self) {}
}

/// Compiles a file's text (the path names it in errors).
type Compile<T> = Box<dyn Fn(&str, &Path) -> Result<T, EngineError> + Send + Sync>;

/// A file's compiled content, swapped atomically on reload.
pub struct Reloadable<T> {
    /// What the file is ("rules", "model"), for logs and metrics.
    what: &'static str,
    /// The stage it belongs to.
    stage: String,
    path: PathBuf,
    compile: Compile<T>,
    current: ArcSwap<T>,
    /// The bytes the value in force was compiled from.
    source: Mutex<String>,
    swaps: AtomicU64,
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl<T> fmt::Debug for Reloadable<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloadable").field("what", &self.what).field("stage", &self.stage).field("path", &self.path).finish_non_exhaustive()
    }
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The file's bytes are those in force: nothing compiled, nothing swapped.
    Unchanged,
    /// The new content is in force.
    Swapped {
        /// Version before.
        from: String,
        /// Version now.
        to: String,
    },
}

/// The reload state of one file, for metrics and the admin endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadStatus {
    /// "rules", "model".
    pub what: &'static str,
    /// The stage it belongs to.
    pub stage: String,
    /// The file.
    pub path: PathBuf,
    /// The version in force.
    pub version: String,
    /// Successful swaps since start.
    pub swaps: u64,
    /// Reloads that failed (the old content stayed in force).
    pub failures: u64,
    /// The last failure, if the file has not compiled since.
    pub last_error: Option<String>,
}

/// A reloadable file, whatever it compiles to.
pub trait Reload: Send + Sync + fmt::Debug {
    /// The file.
    fn path(&self) -> &Path;
    /// Reads the file; compiles and swaps it in if its bytes changed. On error the
    /// content in force stays, and the error is kept for [`Reload::status`].
    fn reload(&self) -> Result<ReloadOutcome, EngineError>;
    /// Where it stands.
    fn status(&self) -> ReloadStatus;
}

impl<T: Versioned> Reloadable<T> {
    /// Loads `path` with `compile` (text, path → value): the first load's error is
    /// the caller's (a pipeline that does not load does not start).
    pub fn load(
        what: &'static str,
        stage: &str,
        path: &Path,
        compile: impl Fn(&str, &Path) -> Result<T, EngineError> + Send + Sync + 'static,
    ) -> Result<Self, EngineError> {
        let text = crate::read(path)?;
        let value = compile(&text, path)?;
        Ok(Reloadable {
            what,
            stage: stage.to_string(),
            path: path.to_path_buf(),
            compile: Box::new(compile),
            current: ArcSwap::from_pointee(value),
            source: Mutex::new(text),
            swaps: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_error: Mutex::new(None),
        })
    }

    /// The content in force, to keep (describe, status, counters).
    pub fn current(&self) -> Arc<T> {
        self.current.load_full()
    }

    /// The content in force for one message: load it once and use it for the
    /// message. Unlike [`Reloadable::current`] it touches no shared reference
    /// count, which every worker would otherwise write on every message.
    pub fn for_message(&self) -> arc_swap::Guard<Arc<T>> {
        self.current.load()
    }

    /// Under the `source` lock (held by the caller), so reloads from several
    /// triggers run one at a time and their outcomes are recorded in order.
    fn try_reload(&self, source: &mut String) -> Result<ReloadOutcome, EngineError> {
        let text = crate::read(&self.path)?;
        if *source == text {
            return Ok(ReloadOutcome::Unchanged);
        }
        // A compile that panics (a bug) keeps the version in force like any error.
        let compiled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.compile)(&text, &self.path)))
            .unwrap_or_else(|_| Err(EngineError::new(crate::ErrorKind::Invalid, &self.path, None, None, "compiling it panicked (a bug: please report it); the version in force stays")));
        let mut value = compiled?;
        let old = self.current.load_full();
        value.carry_from(&old);
        let to = value.version().to_string();
        self.current.store(Arc::new(value));
        *source = text;
        self.swaps.fetch_add(1, Ordering::Relaxed);
        Ok(ReloadOutcome::Swapped { from: old.version().to_string(), to })
    }
}

impl<T: Versioned> Reload for Reloadable<T> {
    fn path(&self) -> &Path {
        &self.path
    }

    fn reload(&self) -> Result<ReloadOutcome, EngineError> {
        let mut source = self.source.lock();
        match self.try_reload(&mut source) {
            Ok(o) => {
                *self.last_error.lock() = None;
                Ok(o)
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                *self.last_error.lock() = Some(e.to_string());
                Err(e)
            }
        }
    }

    fn status(&self) -> ReloadStatus {
        ReloadStatus {
            what: self.what,
            stage: self.stage.clone(),
            path: self.path.clone(),
            version: self.current.load().version().to_string(),
            swaps: self.swaps.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            last_error: self.last_error.lock().clone(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[derive(Debug)]
    struct V {
        version: String,
        carried: u32,
    }

    impl Versioned for V {
        fn version(&self) -> &str {
            &self.version
        }
        fn carry_from(&mut self, old: &Self) {
            self.carried = old.carried + 1;
        }
    }

    fn compile(text: &str, path: &Path) -> Result<V, EngineError> {
        match text.strip_prefix("v=") {
            Some(v) => Ok(V { version: v.trim().to_string(), carried: 0 }),
            None => Err(EngineError::new(ErrorKind::Syntax, path, Some("v".to_string()), Some(1), "expected v=…")),
        }
    }

    #[test]
    fn swaps_on_change_keeps_the_old_value_on_error_and_skips_unchanged_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "v=1").unwrap();
        let r = Reloadable::load("rules", "s", &path, compile).unwrap();
        assert_eq!(r.reload().unwrap(), ReloadOutcome::Unchanged);
        std::fs::write(&path, "v=2").unwrap();
        assert_eq!(r.reload().unwrap(), ReloadOutcome::Swapped { from: "1".into(), to: "2".into() });
        assert_eq!(r.current().carried, 1, "what outlives a reload is carried over");
        std::fs::write(&path, "broken").unwrap();
        let e = r.reload().unwrap_err();
        assert_eq!(r.current().version, "2", "a bad edit keeps the value in force");
        let s = r.status();
        assert_eq!((s.swaps, s.failures), (1, 1));
        assert!(s.last_error.as_deref().unwrap().contains("expected v="), "{e}");
        std::fs::write(&path, "v=3").unwrap();
        r.reload().unwrap();
        assert_eq!(r.status().last_error, None, "a good edit clears the error");
        assert_eq!(r.current().version, "3");
        std::fs::remove_file(&path).unwrap();
        assert!(r.reload().is_err(), "a missing file is an error, not an empty set");
        assert_eq!(r.current().version, "3");
    }
}
