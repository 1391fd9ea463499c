//! Pieces every ANN index shares: metric-aware distance, the bounded top-k heap, query
//! preparation (COSINE normalisation) and Milvus-style parameter reading.

use super::IndexError;
use crate::distance;
use crate::types::{Metric, Neighbor};
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Internal distance between two prepared vectors (COSINE vectors are already unit length).
#[inline]
pub fn dist(metric: Metric, a: &[f32], b: &[f32]) -> f32 {
    match metric {
        Metric::L2 => distance::l2_sq(a, b),
        Metric::IP | Metric::COSINE => -distance::dot(a, b),
    }
}

/// The vectors as the index stores them: normalised copies for COSINE, as given otherwise.
pub fn prepare(metric: Metric, dim: usize, v: &[f32]) -> Vec<f32> {
    let mut out = v.to_vec();
    if metric == Metric::COSINE {
        for row in out.chunks_exact_mut(dim) {
            distance::normalize(row);
        }
    }
    out
}

/// Heap entry ordered by [`Neighbor::cmp_rank`] (max at the top: the worst kept hit).
#[derive(Clone, Copy, Debug)]
pub struct Ranked(pub Neighbor);

impl PartialEq for Ranked {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Ranked {}
impl PartialOrd for Ranked {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Ranked {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.cmp_rank(&o.0)
    }
}

/// Keeps the `k` best neighbours seen.
pub struct TopK {
    k: usize,
    heap: BinaryHeap<Ranked>,
}

impl Default for TopK {
    fn default() -> Self {
        Self::new(0)
    }
}

impl TopK {
    pub fn new(k: usize) -> Self {
        Self {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
        }
    }

    /// Distance a candidate must beat to enter (infinite until full).
    #[inline]
    pub fn bound(&self) -> f32 {
        if self.heap.len() < self.k {
            f32::INFINITY
        } else {
            self.heap.peek().map_or(f32::INFINITY, |r| r.0.dist)
        }
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    #[inline]
    pub fn push(&mut self, row: u32, dist: f32) {
        if self.k == 0 {
            return;
        }
        let n = Neighbor { row, dist };
        if self.heap.len() < self.k {
            self.heap.push(Ranked(n));
        } else if let Some(top) = self.heap.peek()
            && n.cmp_rank(&top.0) == Ordering::Less
        {
            self.heap.pop();
            self.heap.push(Ranked(n));
        }
    }

    /// Empty the heap for a new search keeping `k` hits, reusing its allocation.
    pub fn reset(&mut self, k: usize) {
        self.k = k;
        self.heap.clear();
    }

    /// The kept hits in rank order; the heap is left empty with its allocation (for
    /// [`reset`](Self::reset)), so only the returned vector is allocated.
    /// The entries held, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = Neighbor> + '_ {
        self.heap.iter().map(|r| r.0)
    }

    pub fn take_sorted(&mut self) -> Vec<Neighbor> {
        let mut out: Vec<Neighbor> = self.heap.drain().map(|r| r.0).collect();
        out.sort_unstable_by(Neighbor::cmp_rank);
        out
    }

    /// The kept hits in no particular order, leaving the heap empty with its allocation.
    pub fn drain(&mut self) -> impl Iterator<Item = Neighbor> + '_ {
        self.heap.drain().map(|r| r.0)
    }

    pub fn into_sorted(self) -> Vec<Neighbor> {
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|r| r.0)
            .collect()
    }
}

/// Reads an optional integer parameter, accepting JSON numbers or numeric strings (Milvus
/// clients send both), and checks it against `lo..=hi`.
pub fn int_param(
    params: &serde_json::Value,
    name: &str,
    default: i64,
    lo: i64,
    hi: i64,
) -> Result<i64, IndexError> {
    let bad = |why: String| IndexError::InvalidParam {
        name: name.to_string(),
        reason: why,
    };
    let v = match params.get(name) {
        None | Some(serde_json::Value::Null) => return Ok(default),
        Some(serde_json::Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| bad(format!("must be an integer in [{lo}, {hi}], got {n}")))?,
        Some(serde_json::Value::String(s)) => s
            .trim()
            .parse::<i64>()
            .map_err(|_| bad(format!("must be an integer in [{lo}, {hi}], got {s:?}")))?,
        Some(other) => {
            return Err(bad(format!(
                "must be an integer in [{lo}, {hi}], got {other}"
            )));
        }
    };
    if v < lo || v > hi {
        return Err(bad(format!("must be in [{lo}, {hi}], got {v}")));
    }
    Ok(v)
}

/// Reads an optional boolean parameter (JSON bool or "true"/"false").
pub fn bool_param(
    params: &serde_json::Value,
    name: &str,
    default: bool,
) -> Result<bool, IndexError> {
    match params.get(name) {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(serde_json::Value::Bool(b)) => Ok(*b),
        Some(serde_json::Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(true),
        Some(serde_json::Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(false),
        Some(other) => Err(IndexError::InvalidParam {
            name: name.to_string(),
            reason: format!("must be true or false, got {other}"),
        }),
    }
}

/// Checks a query batch against `dim` and returns the number of queries.
pub fn check_queries(queries: &[f32], dim: usize) -> Result<usize, IndexError> {
    if dim == 0 || !queries.len().is_multiple_of(dim) {
        return Err(IndexError::DimensionMismatch {
            expected: dim,
            got: queries.len(),
        });
    }
    Ok(queries.len() / dim)
}
