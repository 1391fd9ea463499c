//! Pieces every ANN index shares: metric-aware distance, query preparation (COSINE
//! normalisation) and Milvus-style parameter reading. The bounded top-k heap is
//! [`crate::topk::TopK`].

use super::IndexError;
use crate::distance;
use crate::types::Metric;

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
