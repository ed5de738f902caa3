//! Hot reload: the pipeline's rule files and models, reloaded while its stages run.
//!
//! Three triggers, one path ([`Reloader::reload_all`]): a change to a watched file
//! (the `notify` crate: inotify on Linux, FSEvents / kqueue elsewhere), SIGHUP, and
//! the stage service's `POST /admin/reload`. Each reload compiles off the hot path
//! (on the trigger's thread) and swaps atomically between messages
//! ([`actio_engine::reload`]); a file that does not compile keeps what is in force,
//! and the error is logged with file, line and field and counted on `/metrics`.
//!
//! The watcher watches each file's **directory**, not the file: editors save by
//! writing a temporary file and renaming it over the old one (a watch on the file
//! would follow the old inode), and a Kubernetes ConfigMap volume updates by
//! swapping the `..data` symlink under the directory, so the file's own path sees no
//! event at all. Any event on a watched file's name or on a `..`-prefixed entry
//! (the ConfigMap's) triggers one reload of every file after the burst settles;
//! files whose bytes did not change are not recompiled.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use actio_engine::reload::{Reload, ReloadOutcome, ReloadStatus};
use notify::{RecursiveMode, Watcher};

/// How long file events must be quiet before a reload: one save is several events
/// (create, write, rename), a ConfigMap update a few more.
pub const SETTLE: Duration = Duration::from_millis(100);

/// The reloadable files of a service (or of a whole embedded run).
#[derive(Debug)]
pub struct Reloader {
    files: Vec<Arc<dyn Reload>>,
}

/// What one reload of one file did.
#[derive(Debug)]
pub struct FileReload {
    /// The file.
    pub path: PathBuf,
    /// Swapped, unchanged, or why it was kept.
    pub outcome: Result<ReloadOutcome, actio_engine::EngineError>,
}

impl FileReload {
    /// As JSON: `{"file", "outcome": "swapped" | "unchanged" | "failed", …}`.
    pub fn to_json(&self) -> serde_json::Value {
        let file = self.path.display().to_string();
        match &self.outcome {
            Ok(ReloadOutcome::Swapped { from, to }) => serde_json::json!({"file": file, "outcome": "swapped", "from": from, "to": to}),
            Ok(ReloadOutcome::Unchanged) => serde_json::json!({"file": file, "outcome": "unchanged"}),
            Err(e) => serde_json::json!({"file": file, "outcome": "failed", "line": e.line, "field": e.field, "error": e.to_string()}),
        }
    }
}

/// A running watcher; dropping it stops watching.
#[derive(Debug)]
pub struct Watch {
    _watcher: notify::RecommendedWatcher,
}

impl Reloader {
    /// A reloader of `files`.
    pub fn new(files: Vec<Arc<dyn Reload>>) -> Arc<Self> {
        Arc::new(Reloader { files })
    }

    /// Reloads every file (those whose bytes changed are compiled and swapped in),
    /// logging each swap and each failure; `why` names the trigger in the log.
    pub fn reload_all(&self, why: &str) -> Vec<FileReload> {
        self.files
            .iter()
            .map(|f| {
                let outcome = f.reload();
                let path = f.path().to_path_buf();
                match &outcome {
                    Ok(ReloadOutcome::Swapped { from, to }) => tracing::info!(file = %path.display(), from, to, trigger = why, "reloaded: the new version is in force"),
                    Ok(ReloadOutcome::Unchanged) => tracing::debug!(file = %path.display(), trigger = why, "unchanged"),
                    Err(e) => tracing::error!(
                        file = %e.file.display(),
                        line = e.line,
                        field = e.field.as_deref().unwrap_or("-"),
                        trigger = why,
                        "reload failed, the version in force stays: {e}"
                    ),
                }
                FileReload { path, outcome }
            })
            .collect()
    }

    /// Where each file stands.
    pub fn status(&self) -> Vec<ReloadStatus> {
        self.files.iter().map(|f| f.status()).collect()
    }

    /// Where each file stands, as JSON (the admin endpoint's answer).
    pub fn status_json(&self) -> serde_json::Value {
        serde_json::Value::Array(
            self.status()
                .into_iter()
                .map(|s| {
                    serde_json::json!({
                        "file": s.path.display().to_string(), "what": s.what, "stage": s.stage, "version": s.version,
                        "swaps": s.swaps, "failures": s.failures, "last_error": s.last_error,
                    })
                })
                .collect(),
        )
    }

    /// Watches the files' directories and reloads after each burst of changes, on a
    /// thread of its own, until the [`Watch`] is dropped.
    pub fn watch(self: &Arc<Self>) -> Result<Watch, notify::Error> {
        let (tx, rx) = mpsc::channel::<notify::Result<notify::Event>>();
        let mut watcher = notify::recommended_watcher(tx)?;
        let names: BTreeSet<std::ffi::OsString> = self.files.iter().filter_map(|f| f.path().file_name().map(|n| n.to_os_string())).collect();
        let dirs: BTreeSet<PathBuf> = self.files.iter().map(|f| f.path().parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)).collect();
        for d in &dirs {
            watcher.watch(d, RecursiveMode::NonRecursive)?;
        }
        let me = self.clone();
        let relevant = move |e: &notify::Event| {
            !e.kind.is_access()
                && e.paths.iter().any(|p| p.file_name().is_some_and(|n| names.contains(n) || n.to_string_lossy().starts_with("..")))
        };
        std::thread::Builder::new()
            .name("reload-watch".into())
            .spawn(move || {
                // Ends when the watcher (the sender) is dropped.
                while let Ok(first) = rx.recv() {
                    let mut hit = matches!(&first, Ok(e) if relevant(e));
                    loop {
                        match rx.recv_timeout(SETTLE) {
                            Ok(next) => hit |= matches!(&next, Ok(e) if relevant(e)),
                            Err(mpsc::RecvTimeoutError::Timeout) => break,
                            Err(mpsc::RecvTimeoutError::Disconnected) => return,
                        }
                    }
                    if let Err(e) = &first {
                        tracing::warn!(error = %e, "watching the pipeline's files");
                    }
                    if hit {
                        me.reload_all("file changed");
                    }
                }
            })
            .map_err(notify::Error::io)?;
        Ok(Watch { _watcher: watcher })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
mod tests {
    use std::os::unix::fs::symlink;
    use std::time::Instant;

    use super::*;
    use actio_engine::reload::Reloadable;

    #[derive(Debug)]
    struct V(String);
    impl actio_engine::reload::Versioned for V {
        fn version(&self) -> &str {
            &self.0
        }
    }

    fn file(path: &Path) -> Arc<Reloadable<V>> {
        Arc::new(Reloadable::load("rules", "s", path, |t, _| Ok(V(t.trim().to_string()))).unwrap())
    }

    fn wait_for(f: &Reloadable<V>, version: &str) {
        let t0 = Instant::now();
        while f.current().0 != version {
            assert!(t0.elapsed() < Duration::from_secs(10), "still {:?}, waiting for {version:?}", f.current().0);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn an_editor_save_by_rename_is_picked_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.toml");
        std::fs::write(&path, "v1").unwrap();
        let f = file(&path);
        let r = Reloader::new(vec![f.clone()]);
        let _w = r.watch().unwrap();
        let tmp = dir.path().join(".rules.toml.swp");
        std::fs::write(&tmp, "v2").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        wait_for(&f, "v2");
        std::fs::write(&path, "v3").unwrap();
        wait_for(&f, "v3");
        assert_eq!(f.status().swaps, 2);
    }

    /// The kubelet's atomic writer: files are symlinks into `..data`, itself a
    /// symlink to a timestamped directory; an update writes a new directory and
    /// renames a new `..data` over the old.
    #[test]
    fn a_configmap_symlink_swap_is_picked_up() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("..2026_12_01_1")).unwrap();
        std::fs::write(d.join("..2026_12_01_1/rules.toml"), "v1").unwrap();
        symlink("..2026_12_01_1", d.join("..data")).unwrap();
        symlink("..data/rules.toml", d.join("rules.toml")).unwrap();
        let f = file(&d.join("rules.toml"));
        let r = Reloader::new(vec![f.clone()]);
        let _w = r.watch().unwrap();
        std::fs::create_dir(d.join("..2026_12_01_2")).unwrap();
        std::fs::write(d.join("..2026_12_01_2/rules.toml"), "v2").unwrap();
        symlink("..2026_12_01_2", d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        std::fs::remove_dir_all(d.join("..2026_12_01_1")).unwrap();
        wait_for(&f, "v2");
    }
}
