//! A collection's ANN index bookkeeping, shared by the background builder and the search path:
//! the active index definition, where a segment's index file lives, loading committed index
//! files (checksum against the metadata store, then the file's own CRC), and progress figures.
//!
//! Index files live next to their segment: `segments/<id>/ix-<name>-<defhash>/index.shoal`, so
//! compaction or a segment drop removes them with the segment, and a changed definition never
//! overwrites a file a reader still maps. No network types here.

use crate::index::{self, IndexError, VectorIndexRead};
use crate::meta::{IndexRecord, SegmentIndexRecord};
use crate::types::IndexType;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The collection's ANN index definition (FLAT has none: it is the segment itself).
#[derive(Debug, Clone, PartialEq)]
pub struct AnnDef {
    pub index_name: String,
    pub index_type: IndexType,
    /// Build parameters exactly as stored in the metadata store (compared on commit).
    pub params_text: String,
    pub params: serde_json::Value,
}

impl AnnDef {
    /// The ANN definition a stored index record describes; `None` for FLAT or an unreadable
    /// record (logged: the collection then searches with FLAT).
    pub fn from_record(r: &IndexRecord) -> Option<Self> {
        let index_type = match r.index_type.parse::<IndexType>() {
            Ok(IndexType::FLAT) => return None,
            Ok(t) => t,
            Err(e) => {
                tracing::error!(index = %r.index_name, error = %e, "stored index type is unknown; searching with FLAT");
                return None;
            }
        };
        let params = match serde_json::from_str(&r.params) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(index = %r.index_name, error = %e, "stored index parameters are not JSON; searching with FLAT");
                return None;
            }
        };
        Some(Self {
            index_name: r.index_name.clone(),
            index_type,
            params_text: r.params.clone(),
            params,
        })
    }

    /// The ANN definition among a collection's index records (the one on its vector field).
    pub fn for_field(recs: &[IndexRecord], vector_field: &str) -> Option<Self> {
        recs.iter()
            .filter(|r| r.field_name == vector_field)
            .find_map(Self::from_record)
    }

    /// Directory name of this definition's index inside a segment directory: the name plus a
    /// hash of type and parameters, so a redefined index never reuses a mapped file's path.
    pub fn dir_name(&self) -> String {
        let mut h = crc32fast::Hasher::new();
        h.update(self.index_type.as_str().as_bytes());
        h.update(b"\0");
        h.update(self.params_text.as_bytes());
        format!("ix-{}-{:08x}", self.index_name, h.finalize())
    }

    /// Whether a committed segment index was built from this definition.
    pub fn matches(&self, r: &SegmentIndexRecord) -> bool {
        r.index_name == self.index_name
            && r.index_type == self.index_type.as_str()
            && r.params == self.params_text
    }
}

/// Prefix of every index directory inside a segment directory.
pub const INDEX_DIR_PREFIX: &str = "ix-";

/// One segment waiting for its index.
#[derive(Clone)]
pub struct IndexJob {
    pub collection_id: i64,
    pub collection: String,
    pub segment_id: u64,
    pub def: AnnDef,
    pub metric: crate::types::Metric,
    pub dim: usize,
    pub data: Arc<super::segment::SegmentData>,
    /// Absolute index directory.
    pub dir: PathBuf,
    /// `dir` relative to the collection directory (what the metadata store records).
    pub rel: String,
}

impl IndexJob {
    /// The metadata record committing this job's index file (`crc`, `bytes` from
    /// `index::stored_crc` of `dir`), built at `built_ms` (Unix milliseconds).
    pub fn index_record(&self, crc: u32, bytes: u64, built_ms: i64) -> SegmentIndexRecord {
        SegmentIndexRecord {
            collection_id: self.collection_id,
            segment_id: self.segment_id as i64,
            index_name: self.def.index_name.clone(),
            index_type: self.def.index_type.as_str().into(),
            params: self.def.params_text.clone(),
            file: self.rel.clone(),
            crc: i64::from(crc),
            bytes: bytes as i64,
            rows: self.data.rows() as i64,
            built_ms,
        }
    }
}

impl std::fmt::Debug for IndexJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexJob")
            .field("collection", &self.collection)
            .field("segment", &self.segment_id)
            .field("index", &self.def.index_name)
            .finish()
    }
}

/// Build progress and memory of a collection's ANN index (for `indexes/describe`, metrics).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IndexProgress {
    /// The active ANN definition's name and type, if any.
    pub index: Option<(String, IndexType)>,
    /// Rows in sealed segments searched through their ANN index.
    pub indexed_rows: usize,
    /// Every stored row (sealed, growing), deleted rows not yet compacted included.
    pub total_rows: usize,
    /// Rows in sealed segments large enough for an index that do not have one yet.
    pub pending_rows: usize,
    pub indexed_segments: usize,
    /// Sealed segments searched with FLAT (small, pending, failed or corrupt).
    pub flat_segments: usize,
    /// Bytes of loaded ANN indexes (mapped or owned).
    pub index_bytes: usize,
    /// Segments whose build failed for the current definition, with the reason.
    pub failed: Vec<(u64, String)>,
    /// Index files that failed verification at load since start (each then searched with FLAT
    /// and rebuilt), and the latest reasons.
    pub load_failures: u64,
    pub load_failure_reasons: Vec<(u64, String)>,
}

/// Map a committed index file, checking it against its metadata record first.
///
/// Errors: `Io` when missing; `Corrupt` when its header CRC differs from the committed one, its
/// own checksum fails, or it does not describe `rows` x `dim` vectors of `metric`.
pub fn load_committed(
    collection_dir: &Path,
    rec: &SegmentIndexRecord,
    rows: usize,
    dim: usize,
    metric: crate::types::Metric,
) -> Result<Arc<dyn VectorIndexRead>, IndexError> {
    let dir = collection_dir.join(&rec.file);
    let corrupt = |reason: String| IndexError::Corrupt {
        path: dir.display().to_string(),
        reason,
    };
    let (crc, _) = index::stored_crc(&dir)?;
    if i64::from(crc) != rec.crc {
        return Err(corrupt(format!(
            "header checksum {crc:08x} differs from the committed {:08x}",
            rec.crc
        )));
    }
    let idx = index::load(&dir)?;
    if idx.len() != rows || idx.dim() != dim || idx.metric() != metric {
        return Err(corrupt(format!(
            "index holds {} x {} {} vectors, the segment {rows} x {dim} {metric}",
            idx.len(),
            idx.dim(),
            idx.metric()
        )));
    }
    Ok(Arc::from(idx))
}

/// Remove index directories in `seg_dir` other than `keep` (stale definitions, dropped index).
pub fn remove_stale_index_dirs(seg_dir: &Path, keep: Option<&str>) {
    let Ok(rd) = std::fs::read_dir(seg_dir) else {
        return;
    };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if n.starts_with(INDEX_DIR_PREFIX)
            && Some(n.as_str()) != keep
            && let Err(err) = std::fs::remove_dir_all(e.path())
        {
            tracing::warn!(dir = %e.path().display(), error = %err, "could not remove a stale index directory");
        }
    }
}
