//! Merging partial top-k results from readers (and from segments inside one reader) into the
//! global top-k, for every metric.
//!
//! Owns the one ranking rule of the cluster: internal distance ascending (smaller is better for
//! every metric, see [`crate::types::Neighbor`]; IP/COSINE are negated similarities), ties
//! by smaller id, NaN last; an id that appears in several parts (a row found twice, e.g. by a
//! re-sent segment) is kept once with its best distance. Also merges `query` rows (by id) and
//! counts. Pure: no I/O.

use std::cmp::Ordering;
use std::collections::HashSet;

/// A hit that can be ranked: a user id and an internal distance (smaller is better).
pub trait Ranked {
    fn id(&self) -> i64;
    fn dist(&self) -> f32;
}

/// The total order of hits: distance ascending (`total_cmp`, so NaN sorts after +inf and never
/// panics), ties by smaller id.
pub fn cmp_hits<H: Ranked>(a: &H, b: &H) -> Ordering {
    a.dist().total_cmp(&b.dist()).then(a.id().cmp(&b.id()))
}

/// Merge per-part top-k lists of ONE query into the global top-`k`.
///
/// Guarantees: the result is sorted by [`cmp_hits`], holds each id at most once (its best
/// hit), and has `min(k, distinct ids)` entries. Parts need not be sorted.
pub fn merge_topk<H: Ranked, I: IntoIterator<Item = Vec<H>>>(parts: I, k: usize) -> Vec<H> {
    let mut all: Vec<H> = parts.into_iter().flatten().collect();
    all.sort_unstable_by(cmp_hits);
    let mut seen = HashSet::with_capacity(k.min(all.len()));
    let mut out = Vec::with_capacity(k.min(all.len()));
    for h in all {
        if out.len() == k {
            break;
        }
        if seen.insert(h.id()) {
            out.push(h);
        }
    }
    out
}

/// A part answered a different number of queries than were asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a reader answered {got} queries, expected {expected}")]
pub struct QueryCountMismatch {
    pub expected: usize,
    pub got: usize,
}

/// Merge whole batch answers: `parts[p][q]` is part `p`'s top-k for query `q`.
/// Returns one merged top-`k` per query.
///
/// Errors: [`QueryCountMismatch`] when a part does not hold exactly `nq` query results.
pub fn merge_batches<H: Ranked>(
    parts: Vec<Vec<Vec<H>>>,
    nq: usize,
    k: usize,
) -> Result<Vec<Vec<H>>, QueryCountMismatch> {
    let mut per_query: Vec<Vec<Vec<H>>> =
        (0..nq).map(|_| Vec::with_capacity(parts.len())).collect();
    for part in parts {
        if part.len() != nq {
            return Err(QueryCountMismatch {
                expected: nq,
                got: part.len(),
            });
        }
        for (q, hits) in part.into_iter().enumerate() {
            per_query[q].push(hits);
        }
    }
    Ok(per_query.into_iter().map(|p| merge_topk(p, k)).collect())
}

/// Apply a user's `offset`/`limit` to a merged top-(offset+limit) list.
pub fn page<H>(mut merged: Vec<H>, offset: usize, limit: usize) -> Vec<H> {
    if offset >= merged.len() {
        return Vec::new();
    }
    merged.drain(..offset);
    merged.truncate(limit);
    merged
}

/// Merge `query` rows from several parts: sorted by id, each id once, the first `limit` after
/// skipping `offset`. Each part must have returned its smallest `offset + limit` matching ids.
pub fn merge_rows<R, F: Fn(&R) -> i64>(
    parts: Vec<Vec<R>>,
    id_of: F,
    offset: usize,
    limit: usize,
) -> Vec<R> {
    let mut all: Vec<R> = parts.into_iter().flatten().collect();
    all.sort_by_key(&id_of);
    all.dedup_by(|a, b| id_of(a) == id_of(b));
    page(all, offset, limit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distance::{dot, l2_sq};
    use crate::types::Metric;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[derive(Debug, Clone, Copy, PartialEq)]
    struct H {
        id: i64,
        d: f32,
    }
    impl Ranked for H {
        fn id(&self) -> i64 {
            self.id
        }
        fn dist(&self) -> f32 {
            self.d
        }
    }

    fn internal(metric: Metric, q: &[f32], v: &[f32]) -> f32 {
        match metric {
            Metric::L2 => l2_sq(q, v),
            Metric::IP => metric.internal_dist(dot(q, v)),
            Metric::COSINE => {
                let n = (dot(q, q) * dot(v, v)).sqrt().max(f32::MIN_POSITIVE);
                metric.internal_dist(dot(q, v) / n)
            }
        }
    }

    /// Shard random rows over segments and readers, take each shard's local top-k, merge, and
    /// compare with the brute-force top-k over all rows: must be identical for every metric.
    #[test]
    fn merged_shard_topk_equals_global_brute_force_for_every_metric() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let dim = 8;
        let n = 500;
        let rows: Vec<Vec<f32>> = (0..n)
            .map(|_| (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect())
            .collect();
        for metric in [Metric::L2, Metric::IP, Metric::COSINE] {
            for k in [1usize, 10, 37] {
                let q: Vec<f32> = (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect();
                let all: Vec<H> = rows
                    .iter()
                    .enumerate()
                    .map(|(i, v)| H {
                        id: i as i64,
                        d: internal(metric, &q, v),
                    })
                    .collect();
                let shards = 7;
                let parts: Vec<Vec<H>> = (0..shards)
                    .map(|s| {
                        let mut p: Vec<H> = all
                            .iter()
                            .copied()
                            .filter(|h| h.id as usize % shards == s)
                            .collect();
                        p.sort_by(cmp_hits);
                        p.truncate(k);
                        p
                    })
                    .collect();
                let mut expect = all.clone();
                expect.sort_by(cmp_hits);
                expect.truncate(k);
                assert_eq!(merge_topk(parts, k), expect, "{metric} k={k}");
                // User-facing order: L2 ascending, IP/COSINE descending.
                let scores: Vec<f32> = expect.iter().map(|h| metric.user_score(h.d)).collect();
                for w in scores.windows(2) {
                    match metric {
                        Metric::L2 => assert!(w[0] <= w[1]),
                        Metric::IP | Metric::COSINE => assert!(w[0] >= w[1]),
                    }
                }
            }
        }
    }

    #[test]
    fn equal_distances_are_ordered_by_smaller_id() {
        let parts = vec![
            vec![H { id: 9, d: 1.0 }, H { id: 3, d: 1.0 }],
            vec![H { id: 5, d: 1.0 }],
        ];
        let ids: Vec<i64> = merge_topk(parts, 3).iter().map(|h| h.id).collect();
        assert_eq!(ids, vec![3, 5, 9]);
    }

    #[test]
    fn an_id_found_by_two_parts_is_returned_once_with_its_best_distance() {
        let parts = vec![
            vec![H { id: 1, d: 0.5 }, H { id: 2, d: 0.7 }],
            vec![H { id: 1, d: 0.2 }, H { id: 3, d: 0.9 }],
        ];
        let m = merge_topk(parts, 3);
        assert_eq!(
            m,
            vec![
                H { id: 1, d: 0.2 },
                H { id: 2, d: 0.7 },
                H { id: 3, d: 0.9 }
            ]
        );
    }

    #[test]
    fn nan_distances_sort_last_and_do_not_panic() {
        let parts = vec![
            vec![
                H { id: 1, d: f32::NAN },
                H {
                    id: 2,
                    d: f32::INFINITY,
                },
            ],
            vec![H { id: 3, d: -1.0 }],
        ];
        let ids: Vec<i64> = merge_topk(parts, 3).iter().map(|h| h.id).collect();
        assert_eq!(ids, vec![3, 2, 1]);
    }

    #[test]
    fn fewer_hits_than_k_returns_all_distinct_hits() {
        assert_eq!(
            merge_topk(vec![vec![H { id: 1, d: 0.0 }], vec![]], 10).len(),
            1
        );
        assert!(merge_topk(Vec::<Vec<H>>::new(), 10).is_empty());
        assert!(merge_topk(vec![vec![H { id: 1, d: 0.0 }]], 0).is_empty());
    }

    #[test]
    fn batch_merge_keeps_queries_apart_and_rejects_a_short_answer() {
        let a = vec![vec![H { id: 1, d: 1.0 }], vec![H { id: 2, d: 2.0 }]];
        let b = vec![vec![H { id: 3, d: 0.5 }], vec![H { id: 4, d: 3.0 }]];
        let m = merge_batches(vec![a.clone(), b], 2, 1).unwrap();
        assert_eq!(
            m,
            vec![vec![H { id: 3, d: 0.5 }], vec![H { id: 2, d: 2.0 }]]
        );
        assert_eq!(
            merge_batches(vec![a, vec![vec![]]], 2, 1),
            Err(QueryCountMismatch {
                expected: 2,
                got: 1
            })
        );
    }

    #[test]
    fn offset_and_limit_page_the_merged_list() {
        let v: Vec<i32> = (0..10).collect();
        assert_eq!(page(v.clone(), 3, 4), vec![3, 4, 5, 6]);
        assert_eq!(page(v.clone(), 8, 4), vec![8, 9]);
        assert!(page(v, 10, 4).is_empty());
    }

    #[test]
    fn query_rows_merge_by_id_with_offset_and_limit() {
        let parts = vec![vec![1i64, 4, 7], vec![2, 4, 9], vec![3]];
        assert_eq!(merge_rows(parts, |r| *r, 1, 4), vec![2, 3, 4, 7]);
    }
}
