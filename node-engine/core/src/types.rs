//! Small value types shared by every layer of the engine: metrics, neighbours, index kinds.
//! Depends on nothing but serde.

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

/// Similarity metric of a collection (Milvus names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Metric {
    /// Squared Euclidean distance (Milvus reports L2 without the square root); smaller is better.
    L2,
    /// Inner product; larger is better.
    IP,
    /// Cosine similarity; larger is better.
    COSINE,
}

impl Metric {
    /// Convert an internal distance (smaller is always better, see [`Neighbor::dist`]) into the
    /// score a user sees: squared L2 as is, IP/COSINE similarity negated back.
    pub fn user_score(self, internal: f32) -> f32 {
        match self {
            Metric::L2 => internal,
            Metric::IP | Metric::COSINE => -internal,
        }
    }

    /// Inverse of [`Metric::user_score`].
    pub fn internal_dist(self, user: f32) -> f32 {
        match self {
            Metric::L2 => user,
            Metric::IP | Metric::COSINE => -user,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Metric::L2 => "L2",
            Metric::IP => "IP",
            Metric::COSINE => "COSINE",
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Metric {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "L2" => Ok(Metric::L2),
            "IP" => Ok(Metric::IP),
            "COSINE" => Ok(Metric::COSINE),
            other => Err(format!(
                "unknown metric type {other:?}; expected L2, IP or COSINE"
            )),
        }
    }
}

/// Index families (Milvus names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(non_camel_case_types)]
pub enum IndexType {
    FLAT,
    IVF_FLAT,
    IVF_SQ8,
    IVF_PQ,
    HNSW,
}

impl IndexType {
    pub fn as_str(self) -> &'static str {
        match self {
            IndexType::FLAT => "FLAT",
            IndexType::IVF_FLAT => "IVF_FLAT",
            IndexType::IVF_SQ8 => "IVF_SQ8",
            IndexType::IVF_PQ => "IVF_PQ",
            IndexType::HNSW => "HNSW",
        }
    }
}

impl fmt::Display for IndexType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for IndexType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "FLAT" => Ok(IndexType::FLAT),
            "IVF_FLAT" => Ok(IndexType::IVF_FLAT),
            "IVF_SQ8" => Ok(IndexType::IVF_SQ8),
            "IVF_PQ" => Ok(IndexType::IVF_PQ),
            "HNSW" => Ok(IndexType::HNSW),
            other => Err(format!(
                "unknown index type {other:?}; expected FLAT, IVF_FLAT, IVF_SQ8, IVF_PQ or HNSW"
            )),
        }
    }
}

/// One search hit inside a segment or index.
///
/// `row` is the row's offset inside the segment (not the user id); `dist` is the *internal*
/// distance where smaller is always better: squared L2, or the negated inner product / cosine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Neighbor {
    pub row: u32,
    pub dist: f32,
}

impl Neighbor {
    /// Total order used everywhere results are ranked: by distance, ties by smaller row.
    pub fn cmp_rank(&self, other: &Self) -> Ordering {
        self.dist
            .total_cmp(&other.dist)
            .then(self.row.cmp(&other.row))
    }
}
