//! The entry points the storage, REST and bench layers use for ANN indexes: parameter
//! validation with Milvus names, defaults and ranges; [`build`]; [`load`] from a segment's index
//! directory. FLAT is not built here: it is the segment itself, searched by
//! [`super::flat::FlatIndex`].
//!
//! Build parameters (JSON numbers or numeric strings):
//! | index | name | range | default |
//! |---|---|---|---|
//! | IVF_FLAT, IVF_SQ8, IVF_PQ | `nlist` | 1..=65536 | 128 |
//! | IVF_PQ | `m` | 1..=dim, `dim % m == 0` | required |
//! | IVF_PQ | `nbits` | 1..=16 | 8 |
//! | IVF_PQ | `refine` (re-rank with raw vectors) | bool | false |
//! | IVF_PQ | `refine_k` (candidates per hit re-ranked) | 1..=100 | 4 |
//! | HNSW | `M` | 2..=2048 | 30 |
//! | HNSW | `efConstruction` | 1..=2^31−1 | 360 |
//!
//! Search parameters: IVF `nprobe` 1..=nlist (default 8); HNSW `ef` k..=2^31−1 (default max(16, k)).

use super::common::{bool_param, int_param};
use super::hnsw::{self, HnswIndex};
use super::ivf::{self, Codec, IvfIndex};
use super::persist::FileReader;
use super::{IndexError, SearchParams, VectorIndex, VectorIndexRead};
use crate::types::{IndexType, Metric};
use std::path::Path;

pub use super::persist::INDEX_FILE;

/// Largest `ef` accepted (Milvus: int max).
pub const MAX_EF: usize = i32::MAX as usize;
const MAX_NLIST: i64 = 65536;

/// A fully validated build configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Config {
    Ivf { nlist: usize, codec: Codec },
    Hnsw { m: usize, ef_construction: usize },
}

fn not_buildable() -> IndexError {
    IndexError::InvalidParam {
        name: "index_type".into(),
        reason: "must be IVF_FLAT, IVF_SQ8, IVF_PQ or HNSW (FLAT is exact and has no build step)"
            .into(),
    }
}

fn parse(
    index_type: IndexType,
    dim: Option<usize>,
    params: &serde_json::Value,
) -> Result<Config, IndexError> {
    if !(params.is_object() || params.is_null()) {
        return Err(IndexError::InvalidParam {
            name: "params".into(),
            reason: format!("must be a JSON object, got {params}"),
        });
    }
    let nlist =
        || int_param(params, "nlist", ivf::DEFAULT_NLIST as i64, 1, MAX_NLIST).map(|v| v as usize);
    match index_type {
        IndexType::FLAT => Err(not_buildable()),
        IndexType::IVF_FLAT => Ok(Config::Ivf {
            nlist: nlist()?,
            codec: Codec::Flat,
        }),
        IndexType::IVF_SQ8 => Ok(Config::Ivf {
            nlist: nlist()?,
            codec: Codec::Sq8,
        }),
        IndexType::IVF_PQ => {
            let nlist = nlist()?;
            let hi = dim.map_or(65536, |d| d as i64);
            if params.get("m").is_none_or(serde_json::Value::is_null) {
                return Err(IndexError::InvalidParam {
                    name: "m".into(),
                    reason: format!(
                        "is required for IVF_PQ: an integer in [1, {hi}] that divides the dimension"
                    ),
                });
            }
            let m = int_param(params, "m", 0, 1, hi)? as usize;
            if let Some(d) = dim
                && !d.is_multiple_of(m)
            {
                return Err(IndexError::InvalidParam {
                    name: "m".into(),
                    reason: format!("must divide the dimension {d}, got {m}"),
                });
            }
            let nbits = int_param(params, "nbits", 8, 1, 16)? as usize;
            let refine = bool_param(params, "refine", false)?;
            let refine_k = int_param(params, "refine_k", 4, 1, 100)? as usize;
            Ok(Config::Ivf {
                nlist,
                codec: Codec::Pq {
                    m,
                    nbits,
                    refine,
                    refine_k,
                },
            })
        }
        IndexType::HNSW => {
            let m = int_param(params, "M", hnsw::DEFAULT_M as i64, 2, 2048)? as usize;
            let ef_construction = int_param(
                params,
                "efConstruction",
                hnsw::DEFAULT_EF_CONSTRUCTION as i64,
                1,
                i32::MAX as i64,
            )? as usize;
            Ok(Config::Hnsw { m, ef_construction })
        }
    }
}

/// Check build parameters without data (what `indexes/create` does before accepting).
///
/// Errors: `InvalidParam` naming the parameter and its range; FLAT is rejected (no build step).
pub fn validate_build_params(
    index_type: IndexType,
    params: &serde_json::Value,
) -> Result<(), IndexError> {
    parse(index_type, None, params).map(|_| ())
}

/// As [`validate_build_params`], also checking what depends on the dimension (IVF_PQ `m`).
pub fn validate_build_params_for_dim(
    index_type: IndexType,
    dim: usize,
    params: &serde_json::Value,
) -> Result<(), IndexError> {
    parse(index_type, Some(dim), params).map(|_| ())
}

/// Check search knobs for an index built with `build_params`, for top-`k`.
///
/// Errors: `InvalidParam { name: "nprobe" | "ef" }` with the allowed range.
pub fn validate_search_params(
    index_type: IndexType,
    build_params: &serde_json::Value,
    params: &SearchParams,
    k: usize,
) -> Result<(), IndexError> {
    match index_type {
        IndexType::FLAT => Ok(()),
        IndexType::IVF_FLAT | IndexType::IVF_SQ8 | IndexType::IVF_PQ => {
            let nlist = int_param(
                build_params,
                "nlist",
                ivf::DEFAULT_NLIST as i64,
                1,
                MAX_NLIST,
            )? as usize;
            match params.nprobe {
                Some(p) if p == 0 || p > nlist => Err(IndexError::InvalidParam {
                    name: "nprobe".into(),
                    reason: format!("must be in [1, nlist = {nlist}], got {p}"),
                }),
                _ => Ok(()),
            }
        }
        IndexType::HNSW => match params.ef {
            Some(ef) if ef < k.max(1) || ef > MAX_EF => Err(IndexError::InvalidParam {
                name: "ef".into(),
                reason: format!("must be in [k = {k}, {MAX_EF}], got {ef}"),
            }),
            _ => Ok(()),
        },
    }
}

/// Build an ANN index over `vectors` (row-major, `dim` per row) on the current rayon pool.
///
/// Errors: `InvalidParam` for bad parameters (FLAT included: it has no build step), for
/// `dim == 0` or a vector buffer that is not whole rows, and for IVF_PQ segments with fewer
/// than `2^nbits` rows.
pub fn build(
    index_type: IndexType,
    metric: Metric,
    dim: usize,
    params: &serde_json::Value,
    vectors: &[f32],
) -> Result<Box<dyn VectorIndex>, IndexError> {
    if dim == 0 || !vectors.len().is_multiple_of(dim) {
        return Err(IndexError::InvalidParam {
            name: "dim".into(),
            reason: format!(
                "must be at least 1 and divide the {} floats given, got {dim}",
                vectors.len()
            ),
        });
    }
    match parse(index_type, Some(dim), params)? {
        Config::Ivf { nlist, codec } => Ok(Box::new(IvfIndex::build(
            index_type, metric, dim, nlist, codec, vectors,
        )?)),
        Config::Hnsw { m, ef_construction } => Ok(Box::new(HnswIndex::build(
            metric,
            dim,
            m,
            ef_construction,
            vectors,
        ))),
    }
}

/// Map the index persisted in `dir` (by [`VectorIndex::persist`]) without rebuilding it.
///
/// Errors: `Io` when the file is missing or unreadable; `Corrupt` when its checksum or
/// structure is wrong (the caller falls back to FLAT until the index is rebuilt).
pub fn load(dir: &Path) -> Result<Box<dyn VectorIndexRead>, IndexError> {
    let reader = FileReader::open(dir)?;
    match reader.meta()["kind"].as_str() {
        Some("ivf") => Ok(Box::new(IvfIndex::load(&reader)?)),
        Some("hnsw") => Ok(Box::new(HnswIndex::load(&reader)?)),
        other => Err(reader.corrupt(format!("unknown index kind {other:?}"))),
    }
}
