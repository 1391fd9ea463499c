//! Per-segment vector indexes behind two traits: readers only ever see [`VectorIndexRead`];
//! the writer's build path produces a [`VectorIndex`] that can also persist itself.
//! FLAT (exact) is the oracle every ANN index is tested against.
//!
//! Conventions every implementation keeps:
//! - vectors are row-major `f32`, `dim` per row; row `i` of the segment is `Neighbor::row == i`;
//! - distances are internal (smaller is better; see [`crate::types::Neighbor`]);
//! - `filter`, when given, is applied *inside* the search: rows whose bit is unset are never
//!   returned, and the index still returns up to `k` allowed rows when that many exist;
//! - results per query are sorted by [`Neighbor::cmp_rank`] and hold at most `k` entries.

pub mod flat;

#[cfg(test)]
mod ann_tests;
mod common;
pub mod hnsw;
pub mod ivf;
pub mod kmeans;
pub mod persist;
mod registry;

pub use persist::stored_crc;
pub use registry::{
    INDEX_FILE, MAX_EF, build, load, validate_build_params, validate_build_params_for_dim,
    validate_search_params,
};

use crate::bitset::Bitset;
use crate::types::{IndexType, Metric, Neighbor};
use std::path::Path;

/// Search-time knobs (Milvus names); `None` means the index's default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SearchParams {
    /// IVF: number of lists probed.
    pub nprobe: Option<usize>,
    /// HNSW: size of the dynamic candidate list.
    pub ef: Option<usize>,
}

/// Errors from building, loading or searching an index.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// A build or search parameter is outside its allowed range; the message names the parameter
    /// and the range (surfaced to users as Milvus code 1100).
    #[error("invalid index parameter {name}: {reason}")]
    InvalidParam { name: String, reason: String },
    /// The query batch does not match the index's dimension.
    #[error("query dimension {got} does not match index dimension {expected}")]
    DimensionMismatch { expected: usize, got: usize },
    /// An index file failed its checksum or structural checks.
    #[error("index file {path} is corrupt: {reason}")]
    Corrupt { path: String, reason: String },
    /// Reading or writing index files failed.
    #[error("index I/O on {path} failed")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl crate::error::Classify for IndexError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            IndexError::InvalidParam { .. } | IndexError::DimensionMismatch { .. } => {
                ErrorKind::InvalidRequest
            }
            IndexError::Corrupt { .. } | IndexError::Io { .. } => ErrorKind::Unavailable,
        }
    }
}

/// The read side of an index: what readers and the search path use.
pub trait VectorIndexRead: Send + Sync {
    fn index_type(&self) -> IndexType;
    fn metric(&self) -> Metric;
    fn dim(&self) -> usize;
    /// Number of rows indexed (the segment's row count).
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes this index holds in memory or mapped (for `/metrics` and `describe`).
    fn memory_bytes(&self) -> usize;
    /// Top-`k` per query for a batch of `queries.len() / dim` queries.
    ///
    /// Errors: `DimensionMismatch` when `queries.len()` is not a multiple of `dim`;
    /// `InvalidParam` for out-of-range search knobs.
    fn search(
        &self,
        queries: &[f32],
        k: usize,
        params: &SearchParams,
        filter: Option<&Bitset>,
    ) -> Result<Vec<Vec<Neighbor>>, IndexError>;
    /// The IVF index behind this one, for callers that scan its lists elsewhere (the reader's
    /// GPU offload); `None` for every other index type.
    fn as_ivf(&self) -> Option<&ivf::IvfIndex> {
        None
    }
}

/// The write side: an index that was just built and can persist itself next to its segment.
pub trait VectorIndex: VectorIndexRead {
    /// Write the index's files into `dir` (temp file + fsync + rename, checksummed).
    fn persist(&self, dir: &Path) -> Result<(), IndexError>;
}
