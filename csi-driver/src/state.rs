//! The node's durable record of what it staged and published, in `--state-dir`.
//!
//! Owns one JSON file per staged volume (`volumes/<hash>.json`, mode 0600 because it holds the
//! JuiceFS secret needed to remount after a restart), written with temp file + fsync + rename so
//! a crash leaves either the old or the new record. Must not mount anything: on start the node
//! service compares these records with `/proc/self/mountinfo` and re-adopts.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::CsiError;
use crate::secrets::fnv1a64;

/// A secret map that serialises but never prints.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretMap(pub BTreeMap<String, String>);

impl fmt::Debug for SecretMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretMap({} keys, values redacted)", self.0.len())
    }
}

/// One published target of a staged volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// Mounted read-only.
    pub read_only: bool,
}

/// A volume staged on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedVolume {
    /// CSI volume id.
    pub volume_id: String,
    /// Where the `juicefs mount` lives.
    pub staging_path: PathBuf,
    /// The volume's directory inside the filesystem (`None` = the root, static volumes).
    pub sub_path: Option<String>,
    /// Extra `juicefs mount` flags from the volume capability.
    pub mount_flags: Vec<String>,
    /// JuiceFS secret (to remount after a restart).
    pub secrets: SecretMap,
    /// Published targets.
    pub targets: BTreeMap<PathBuf, Target>,
}

impl StagedVolume {
    /// The directory that targets bind to.
    pub fn bind_source(&self) -> PathBuf {
        match &self.sub_path {
            Some(p) => self.staging_path.join(p),
            None => self.staging_path.clone(),
        }
    }
}

/// Reads and writes [`StagedVolume`] records.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// A store under `<state_dir>/volumes`, created if missing.
    pub fn open(state_dir: &Path) -> Result<Self, CsiError> {
        let dir = state_dir.join("volumes");
        fs::create_dir_all(&dir).map_err(|e| state_err(&dir, e))?;
        Ok(Self { dir })
    }

    fn path_of(&self, volume_id: &str) -> PathBuf {
        self.dir
            .join(format!("{:016x}.json", fnv1a64(volume_id.as_bytes())))
    }

    /// Every record; a corrupt file is an error naming it (never silently dropped).
    pub fn load_all(&self) -> Result<Vec<StagedVolume>, CsiError> {
        let mut out = Vec::new();
        let entries = fs::read_dir(&self.dir).map_err(|e| state_err(&self.dir, e))?;
        for entry in entries {
            let path = entry.map_err(|e| state_err(&self.dir, e))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let text = fs::read(&path).map_err(|e| state_err(&path, e))?;
            let rec: StagedVolume =
                serde_json::from_slice(&text).map_err(|e| state_err(&path, e))?;
            out.push(rec);
        }
        Ok(out)
    }

    /// Writes a record durably (temp + fsync + rename).
    pub fn save(&self, rec: &StagedVolume) -> Result<(), CsiError> {
        let path = self.path_of(&rec.volume_id);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(rec).map_err(|e| state_err(&path, e))?;
        let mut f = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| state_err(&tmp, e))?;
        f.write_all(&bytes).map_err(|e| state_err(&tmp, e))?;
        f.sync_all().map_err(|e| state_err(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| state_err(&path, e))?;
        if let Ok(d) = fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Removes a record; absent is success.
    pub fn remove(&self, volume_id: &str) -> Result<(), CsiError> {
        let path = self.path_of(volume_id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(state_err(&path, e)),
        }
    }
}

fn state_err(path: &Path, e: impl fmt::Display) -> CsiError {
    CsiError::State {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn records_round_trip_privately_and_debug_hides_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let mut secrets = BTreeMap::new();
        secrets.insert("metaurl".to_string(), "redis://:pw123@h/1".to_string());
        let mut rec = StagedVolume {
            volume_id: "pvc-1".into(),
            staging_path: "/stage/pvc-1".into(),
            sub_path: Some("pvc-1".into()),
            mount_flags: vec![],
            secrets: SecretMap(secrets),
            targets: BTreeMap::new(),
        };
        rec.targets
            .insert("/t/1".into(), Target { read_only: true });
        store.save(&rec).unwrap();
        assert_eq!(store.load_all().unwrap(), vec![rec.clone()]);
        let file = fs::read_dir(dir.path().join("volumes"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(file.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!format!("{rec:?}").contains("pw123"));
        assert_eq!(rec.bind_source(), PathBuf::from("/stage/pvc-1/pvc-1"));
        store.remove("pvc-1").unwrap();
        store.remove("pvc-1").unwrap();
        assert!(store.load_all().unwrap().is_empty());
    }

    #[test]
    fn a_corrupt_record_is_reported_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        fs::write(dir.path().join("volumes/x.json"), b"{not json").unwrap();
        assert!(matches!(store.load_all(), Err(CsiError::State { .. })));
    }
}
