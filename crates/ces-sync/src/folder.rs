//! The manifests-folder source: YAML/JSON files and folders, and a `ces-conf.yaml`. Only changed files are parsed
//! again; an edit that changes pods only is applied to the loop's snapshot in place (`Source::update`).

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ces_config::CesConfig;
use ces_snapshot::manifests::{self, ParsedFile};
use ces_snapshot::{Churn, Snapshot};

use crate::Source;

pub struct Folder {
    pub manifests: Vec<PathBuf>,
    /// `None`: the embedded default config.
    pub config: Option<PathBuf>,
    /// Each file parsed, with the size and modification time it had: only changed files are parsed again.
    cache: HashMap<PathBuf, (u64, ParsedFile)>,
    /// The files and the config's stamp of the last load or update.
    files: Vec<PathBuf>,
    config_stamp: Option<u64>,
    /// How long a changed file must have been left alone before it is read: a writer that pauses between its pieces
    /// for less is never caught half-way. Default 2 ms; the sync loop's debounce (the whole input left alone) is the
    /// wider guard.
    pub quiet: std::time::Duration,
    /// How long a file must have stayed empty before it is read as empty: a writer in place truncates first, and a
    /// writer descheduled between the truncate and its first write leaves an empty file for milliseconds, which
    /// would read as every pod of the file gone (and back). Default 500 ms.
    pub empty_quiet: std::time::Duration,
}

impl Folder {
    pub fn new(manifests: Vec<PathBuf>, config: Option<PathBuf>) -> Folder {
        Folder {
            manifests,
            config,
            cache: HashMap::new(),
            files: Vec::new(),
            config_stamp: None,
            quiet: std::time::Duration::from_millis(2),
            empty_quiet: std::time::Duration::from_millis(500),
        }
    }
}

/// Parses a file and returns it with its stamp: read once it has been left alone for `quiet` (an empty file once it
/// has stayed empty for `empty_quiet`), and again until it did not change while it was read, so a file being written
/// (editors and `kubectl` write in place) is never taken half-written as a state of the cluster.
fn read_whole(path: &Path, quiet: Duration, empty_quiet: Duration) -> Result<(u64, ParsedFile), String> {
    for _ in 0..50 {
        wait_quiet(path, quiet)?;
        if wait_filled(path, empty_quiet)? {
            wait_quiet(path, quiet)?;
        }
        let before = stamp(path)?;
        let parsed = manifests::parse_file(path).map_err(|e| e.to_string())?;
        if stamp(path)? == before {
            return Ok((before, parsed));
        }
    }
    Err(format!("{}: still being written after 50 reads; it is read again at the next pass", path.display()))
}

/// While `path` is empty, waits (at most 2 s) until it is written or has stayed empty for `empty_quiet`; whether
/// it was written meanwhile.
fn wait_filled(path: &Path, empty_quiet: Duration) -> Result<bool, String> {
    let start = std::time::Instant::now();
    let mut waited = false;
    loop {
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.len() > 0 {
            return Ok(waited);
        }
        let age = meta.modified().ok().and_then(|m| m.elapsed().ok()).unwrap_or(empty_quiet);
        if age >= empty_quiet || start.elapsed() > Duration::from_secs(2) {
            return Ok(false);
        }
        waited = true;
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits (at most 2 s) until `path` was last modified `quiet` ago.
fn wait_quiet(path: &Path, quiet: Duration) -> Result<(), String> {
    let waited = std::time::Instant::now();
    while waited.elapsed() < std::time::Duration::from_secs(2) {
        let modified =
            std::fs::metadata(path).and_then(|m| m.modified()).map_err(|e| format!("{}: {e}", path.display()))?;
        match modified.elapsed() {
            Ok(age) if age < quiet => std::thread::sleep(quiet - age),
            _ => break,
        }
    }
    Ok(())
}

/// Size and modification time of a file, hashed.
fn stamp(path: &Path) -> Result<u64, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut h = DefaultHasher::new();
    meta.len().hash(&mut h);
    if let Ok(m) = meta.modified() {
        m.hash(&mut h);
    }
    Ok(h.finish())
}

fn walk(path: &Path, h: &mut DefaultHasher) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    path.hash(h);
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for e in entries {
            walk(&e, h)?;
        }
    } else {
        meta.len().hash(h);
        if let Ok(m) = meta.modified() {
            m.hash(h);
        }
    }
    Ok(())
}

impl Source for Folder {
    /// Paths, sizes and modification times of every file: any edit, addition or removal changes it.
    fn version(&mut self) -> Result<u64, String> {
        let mut h = DefaultHasher::new();
        for p in self.manifests.iter().chain(&self.config) {
            walk(p, &mut h)?;
        }
        Ok(h.finish())
    }

    /// Loads everything. Inputs that define an object twice are refused, as `ces compile` refuses them: which
    /// definition counted would depend on file order. The backend then keeps what it last applied.
    fn load(&mut self) -> Result<(Snapshot, CesConfig), String> {
        let files = manifests::files(&self.manifests).map_err(|e| e.to_string())?;
        let mut cache = HashMap::with_capacity(files.len());
        for f in &files {
            let now = stamp(f)?;
            let (stamp, parsed) = match self.cache.remove(f) {
                Some((s, parsed)) if s == now => (s, parsed),
                _ => read_whole(f, self.quiet, self.empty_quiet)?,
            };
            cache.insert(f.clone(), (stamp, parsed));
        }
        self.cache = cache;
        self.config_stamp = self.config.as_deref().map(stamp).transpose()?;
        let parsed: Vec<&ParsedFile> = files.iter().map(|f| &self.cache[f].1).collect();
        let (snapshot, _) = manifests::build(&parsed);
        snapshot.refuse_duplicates()?;
        self.files = files;
        let config = match &self.config {
            Some(p) => CesConfig::from_file(p).map_err(|e| e.to_string())?,
            None => CesConfig::embedded_default(),
        };
        Ok((snapshot, config))
    }

    /// Pod churn: when the changed files differ from their last version in pods only, those pods are moved in
    /// the snapshot. Any other change (the config, files added or removed, any other object, endpoints, a pod defined
    /// twice) leaves it to `load`; the files parsed here stay cached for it.
    fn update(&mut self, snapshot: &mut Snapshot) -> Result<Option<Churn>, String> {
        if self.config.as_deref().map(stamp).transpose()? != self.config_stamp {
            return Ok(None);
        }
        let files = manifests::files(&self.manifests).map_err(|e| e.to_string())?;
        if files != self.files {
            return Ok(None);
        }
        let mut changes = Vec::new();
        let mut only_pods = true;
        for f in &files {
            let now = stamp(f)?;
            let Some((then, old)) = self.cache.get(f) else { return Ok(None) };
            if *then == now {
                continue;
            }
            let (now, new) = read_whole(f, self.quiet, self.empty_quiet)?;
            if only_pods {
                let (before, _) = manifests::build(&[old]);
                let (after, _) = manifests::build(&[&new]);
                // A Service's endpoints may come from several files: a file's own endpoints are not the Service's,
                // so a change of endpoints is left to `load`.
                match before.churn(&after) {
                    Some(churn) if churn.endpoints.is_empty() => changes.extend(churn.pods),
                    _ => only_pods = false,
                }
            }
            self.cache.insert(f.clone(), (now, new));
        }
        let churn = Churn { pods: changes, endpoints: Vec::new() };
        if !only_pods || snapshot.apply_churn(&churn).is_err() {
            return Ok(None);
        }
        Ok(Some(churn))
    }
}
