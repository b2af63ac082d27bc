//! The [`Journal`] on a local directory: one JSON file per migration in flight
//! (`<id>.json`), one per ended migration (`<id>.outcome.json`), written to a temporary file and
//! renamed into place, so that a record is either whole or absent.

use std::fs::File;
use std::io::Write;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::warn;

use crate::machine::PortError;
use crate::ports::Journal;
use crate::protocol::{ErrorCode, MigrationId};

/// Ended migrations' outcomes kept at most (the oldest go first).
const MAX_OUTCOMES: usize = 1000;

/// A journal in a directory of mode 0700.
#[derive(Debug, Clone)]
pub struct FileJournal<R, O> {
    dir: PathBuf,
    _types: PhantomData<fn() -> (R, O)>,
}

fn storage(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> PortError {
    let what = format!("{what} {}", path.display());
    move |e| PortError::caused(ErrorCode::Storage, &what, e)
}

impl<R, O> FileJournal<R, O> {
    /// Opens (creating, mode 0700) the journal directory `dir`.
    pub fn open(dir: &Path) -> Result<FileJournal<R, O>, PortError> {
        crate::dirs::private_dir(dir).map_err(storage("cannot create journal directory", dir))?;
        Ok(FileJournal {
            dir: dir.to_path_buf(),
            _types: PhantomData,
        })
    }

    fn record_path(&self, id: &MigrationId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn outcome_path(&self, id: &MigrationId) -> PathBuf {
        self.dir.join(format!("{id}.outcome.json"))
    }

    fn write(&self, path: &Path, body: &[u8]) -> Result<(), PortError> {
        let tmp = path.with_extension("tmp");
        let mut f = File::create(&tmp).map_err(storage("cannot write", &tmp))?;
        f.write_all(body).map_err(storage("cannot write", &tmp))?;
        // Not synced: a record guards against a crash of the process, which the page cache
        // survives; a crash of the machine takes what the record is about with it (the frozen or
        // restored copy, the image sets on tmpfs). Two of these writes are on the commit's
        // critical path, where an fsync cost milliseconds.
        std::fs::rename(&tmp, path).map_err(storage("cannot rename into", path))
    }

    fn prune_outcomes(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut outcomes: Vec<(std::time::SystemTime, PathBuf)> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".outcome.json"))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if outcomes.len() <= MAX_OUTCOMES {
            return;
        }
        outcomes.sort();
        for (_, p) in &outcomes[..outcomes.len() - MAX_OUTCOMES] {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl<R, O> Journal<R, O> for FileJournal<R, O>
where
    R: Serialize + DeserializeOwned + 'static,
    O: Serialize + DeserializeOwned + 'static,
{
    fn save(&self, id: &MigrationId, record: &R) -> Result<(), PortError> {
        let body = serde_json::to_vec_pretty(record)
            .map_err(|e| PortError::caused(ErrorCode::Internal, "encoding a journal record", e))?;
        self.write(&self.record_path(id), &body)
    }

    fn forget(&self, id: &MigrationId) -> Result<(), PortError> {
        let p = self.record_path(id);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(storage("cannot remove", &p)(e)),
        }
    }

    fn records(&self) -> Vec<(MigrationId, R)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut v = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            if stem.ends_with(".outcome") {
                continue;
            }
            let Ok(id) = stem.parse::<MigrationId>() else {
                continue;
            };
            match std::fs::read(e.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<R>(&b).ok())
            {
                Some(r) => v.push((id, r)),
                None => warn!("skipping unreadable journal record {}", e.path().display()),
            }
        }
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn end(&self, id: &MigrationId, outcome: &O) -> Result<(), PortError> {
        let body = serde_json::to_vec_pretty(outcome)
            .map_err(|e| PortError::caused(ErrorCode::Internal, "encoding an outcome", e))?;
        self.write(&self.outcome_path(id), &body)?;
        self.prune_outcomes();
        self.forget(id)
    }

    fn outcome(&self, id: &MigrationId) -> Option<O> {
        std::fs::read(self.outcome_path(id))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_outcomes_survive_a_reopen() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("j");
        let j: FileJournal<Vec<u32>, String> = FileJournal::open(&dir).expect("open");
        let a: MigrationId = "m-a".parse().expect("id");
        let b: MigrationId = "m-b".parse().expect("id");
        j.save(&a, &vec![1]).expect("save");
        j.save(&a, &vec![1, 2]).expect("replace");
        j.save(&b, &vec![3]).expect("save");
        j.end(&b, &"committed".to_string()).expect("end");
        std::fs::write(dir.join("m-c.json"), b"not json").expect("junk");
        let j: FileJournal<Vec<u32>, String> = FileJournal::open(&dir).expect("reopen");
        assert_eq!(j.records(), vec![(a.clone(), vec![1, 2])]);
        assert_eq!(j.outcome(&b), Some("committed".into()));
        assert_eq!(j.outcome(&a), None);
        j.forget(&a).expect("forget");
        j.forget(&a).expect("forget twice");
        assert!(j.records().is_empty());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dir).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
