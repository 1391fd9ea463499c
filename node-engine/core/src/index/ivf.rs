//! Inverted-file indexes: IVF_FLAT, IVF_SQ8 and IVF_PQ. A k-means coarse quantizer splits the
//! rows into `nlist` lists stored contiguously (list order), each entry holding the row id and
//! its code: the raw vector (FLAT), 8-bit per-dimension scalar codes of the residual from the
//! list centroid (SQ8, min/max per dimension trained over all residuals), or product-quantized residual codes (PQ, ADC lookup tables,
//! optional exact re-rank from stored raw vectors).
//!
//! Filters and tombstones are applied while scanning: a row whose bit is unset is skipped before
//! its distance is computed, so the result still holds `k` allowed rows when `nprobe` lists
//! contain them.

use super::common::{check_queries, dist, prepare};
use super::persist::{Buf, FileReader, FileWriter};
use super::{IndexError, SearchParams, VectorIndex, VectorIndexRead, kmeans};
use crate::bitset::Bitset;
use crate::distance;
use crate::topk::TopK;
use crate::types::{IndexType, Metric, Neighbor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::cmp::Ordering;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

pub const DEFAULT_NLIST: usize = 128;
pub const DEFAULT_NPROBE: usize = 8;
const KMEANS_ITERS: usize = 10;
const SEED: u64 = 0x5407_1d5e;

/// Which code each list entry carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Codec {
    Flat,
    Sq8,
    Pq {
        m: usize,
        nbits: usize,
        refine: bool,
        refine_k: usize,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    index_type: IndexType,
    metric: Metric,
    dim: usize,
    n: usize,
    nlist: usize,
    requested_nlist: usize,
    codec: Codec,
}

/// An IVF index over one segment.
pub struct IvfIndex {
    meta: Meta,
    centroids: Buf<f32>,
    /// `offsets[l]..offsets[l + 1]` are list `l`'s entries.
    offsets: Buf<u64>,
    ids: Buf<u32>,
    /// FLAT: the vectors; PQ with refine: the vectors for re-ranking; otherwise empty.
    vectors: Buf<f32>,
    /// SQ8: per-dimension minimum and step; PQ: codebooks (m × ksub × dsub).
    aux_a: Buf<f32>,
    aux_b: Buf<f32>,
    /// SQ8: `dim` bytes per entry; PQ: `m` (nbits ≤ 8) or `2m` bytes per entry.
    codes: Buf<u8>,
    /// PQ only, derived from the codebooks on build and load (never persisted): the codebooks
    /// transposed to `dim × ksub` and every code word's squared norm (`m × ksub`), what
    /// [`distance::pq_tables`] reads.
    pq_books_t: Vec<f32>,
    pq_ynorm: Vec<f32>,
    /// Derived on build and load (never persisted), for the fast coarse ranking
    /// ([`IvfIndex::rank_lists`]): every centroid's squared norm.
    cnorm: Vec<f32>,
    /// When the centroids are larger than [`HALF_COARSE_MIN_BYTES`]: a half-precision copy of
    /// them, and per centroid the bound term `2‖c − half(c)‖ + 4η‖c‖` (η =
    /// [`ROUNDING_SLACK`]) of [`IvfIndex::rank_lists`]; empty otherwise.
    cent16: Vec<u16>,
    cent16_a: Vec<f32>,
}

/// Centroid sets larger than this (in f32) are ranked through a half-precision copy: 1 MiB, a
/// typical per-core L2, beyond which every single query streams them from L3 (at 1M rows,
/// nlist 4096, 128-d, the f32 ranking was 46% of a query, bound by bandwidth).
const HALF_COARSE_MIN_BYTES: usize = 1 << 20;

/// Relative rounding allowance of the bounded coarse ranking: the f32 error of a fast score or
/// of an exact distance stays far below `η (‖q‖ + ‖c‖)²` at any dimension the API accepts.
const ROUNDING_SLACK: f32 = 4e-5;

/// Buffers one thread's searches reuse, so that a query allocates only its result.
#[derive(Default)]
struct Scratch {
    /// The prepared query.
    q: Vec<f32>,
    /// Centroid distances; IVF_FLAT: then one list's distances.
    dists: Vec<f32>,
    /// The lists to scan, nearest first.
    lists: Vec<(f32, u32)>,
    /// SQ8: the query in code space; PQ: the query's residual from a list centroid.
    qs: Vec<f32>,
    /// PQ lookup table.
    lut: Vec<f32>,
    top: TopK,
    /// PQ re-rank: the candidates' list positions, then the exact top-k.
    cand: Vec<u32>,
    exact: TopK,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// One query's scan: the prepared query and the lists to visit.
struct Scan<'a> {
    q: &'a [f32],
    k: usize,
    nprobe: usize,
    filter: Option<&'a Bitset>,
    /// Nearest first; a filtered search lists every list and stops once `nprobe` were scanned
    /// and `k` allowed rows found.
    lists: &'a [(f32, u32)],
}

impl Scan<'_> {
    #[inline]
    fn allowed(&self, row: u32) -> bool {
        self.filter.is_none_or(|f| f.contains(row as usize))
    }
}

/// Order of `(distance, list)`: nearer first, ties to the smaller list.
fn by_dist(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    a.0.total_cmp(&b.0).then(a.1.cmp(&b.1))
}

/// The `n` nearest of `dists` (indexed by list) as `(distance, list)`, nearest first, into
/// `out`: one pass keeping a sorted window of `n`, so no allocation once `out` has grown. Once
/// the window is full, a list enters only if strictly nearer than the window's last (NaN never
/// does); lists come in increasing order, so ties keep the smaller list.
fn nearest_lists(dists: &[f32], n: usize, out: &mut Vec<(f32, u32)>) {
    out.clear();
    if n == 0 {
        return;
    }
    let mut worst = f32::INFINITY;
    for (l, &d) in dists.iter().enumerate() {
        if out.len() == n {
            #[allow(clippy::neg_cmp_op_on_partial_ord)]
            if !(d < worst) {
                continue;
            }
            out.pop();
        }
        let pos = out.partition_point(|e| e.0.total_cmp(&d) != Ordering::Greater);
        out.insert(pos, (d, l as u32));
        if let (true, Some(last)) = (out.len() == n, out.last()) {
            worst = last.0;
        }
    }
}

/// Push a scored list (`dists[i]` the distance of row `ids[i]`) into `top`: the entries that
/// cannot enter are skipped eight compares at a time ([`distance::next_below`]), so only those
/// that can touch the heap.
fn push_scored(top: &mut TopK, ids: &[u32], dists: &[f32]) {
    let dists = &dists[..dists.len().min(ids.len())];
    let mut i = distance::next_below(dists, 0, top.bound(), true);
    while i < dists.len() {
        top.push_row(ids[i], dists[i]);
        i = distance::next_below(dists, i + 1, top.bound(), true);
    }
}

/// Lists beyond the wanted number that a fast coarse ranking keeps and re-scores exactly
/// ([`IvfIndex::rank_lists`], [`IvfIndex::coarse_batch`]): the fast scores differ from the
/// exact distances only by rounding, so the exact `n` nearest are among the fast `n + 8`.
const RERANK_SLACK: usize = 8;

/// Every centroid's squared norm.
fn centroid_norms(centroids: &[f32], dim: usize) -> Vec<f32> {
    if dim == 0 {
        return Vec::new();
    }
    centroids.chunks_exact(dim).map(distance::norm_sq).collect()
}

/// The half-precision copy of the centroids and each one's bound term `2‖c − half(c)‖ +
/// 4η‖c‖` (see [`IvfIndex::rank_lists`]); both empty when a coordinate is not finite or beyond
/// the half range (the f32 ranking is used then).
fn half_centroids(centroids: &[f32], dim: usize) -> (Vec<u16>, Vec<f32>) {
    if dim == 0
        || centroids
            .iter()
            .any(|x| !x.is_finite() || x.abs() > 65000.0)
    {
        return (Vec::new(), Vec::new());
    }
    let half: Vec<u16> = centroids.iter().map(|&x| distance::f32_to_f16(x)).collect();
    let a = centroids
        .chunks_exact(dim)
        .zip(half.chunks_exact(dim))
        .map(|(c, h)| {
            let (mut err, mut norm) = (0f64, 0f64);
            for (&x, &y) in c.iter().zip(h) {
                let e = f64::from(x) - f64::from(distance::f16_to_f32(y));
                err += e * e;
                norm += f64::from(x) * f64::from(x);
            }
            // Rounded up a little, so the f32 term is never below the f64 value.
            ((2.0 * err.sqrt() + 4.0 * f64::from(ROUNDING_SLACK) * norm.sqrt()) * 1.001) as f32
        })
        .collect();
    (half, a)
}

/// Σ_s lut[s · ksub + code_s] for 16-bit little-endian codes; a code outside its table (only
/// in a damaged file) scores as infinitely far.
fn adc16(lut: &[f32], ksub: usize, code: &[u8]) -> f32 {
    code.chunks_exact(2)
        .enumerate()
        .map(|(s, c)| {
            let j = usize::from(u16::from_le_bytes([c[0], c[1]]));
            if j < ksub {
                lut.get(s * ksub + j).copied().unwrap_or(f32::INFINITY)
            } else {
                f32::INFINITY
            }
        })
        .sum()
}

/// The codebooks (`m × ksub × dsub`) transposed to `dim × ksub`, and the squared norm of
/// every code word (`m × ksub`).
fn pq_derived(books: &[f32], dim: usize, m: usize, nbits: usize) -> (Vec<f32>, Vec<f32>) {
    let ksub = 1usize << nbits;
    let dsub = dim / m.max(1);
    let mut bt = vec![0f32; dim * ksub];
    let mut yn = vec![0f32; m * ksub];
    for s in 0..m {
        for j in 0..ksub {
            let w = &books[(s * ksub + j) * dsub..(s * ksub + j + 1) * dsub];
            yn[s * ksub + j] = w.iter().map(|x| x * x).sum();
            for (t, &v) in w.iter().enumerate() {
                bt[(s * dsub + t) * ksub + j] = v;
            }
        }
    }
    (bt, yn)
}

/// Batches of at least this many unfiltered queries rank their lists through the FLAT batch
/// kernel ([`IvfIndex::coarse_batch`]).
const COARSE_BATCH_MIN_QUERIES: usize = 16;

/// Bytes at the head of the next list that a single-query scan prefetches
/// ([`IvfIndex::prefetch_list_head`]).
const LIST_PREFETCH_BYTES: usize = 4096;

/// Bytes of a list read at once by a list-by-list batch ([`IvfIndex::search_list_major`]): well
/// inside a per-core L2, so the tile stays cached while every query probing the list scores it.
const LIST_MAJOR_TILE_BYTES: usize = 128 << 10;

/// Top-k entries (queries × k × threads) a list-by-list batch may hold at once, about 32 MiB;
/// larger batches run in chunks of queries.
const LIST_MAJOR_TOPK_ENTRIES: usize = 1 << 22;

/// Queries per chunk of a list-by-list batch on `threads` threads with top-`k`.
fn list_major_chunk(threads: usize, k: usize) -> usize {
    (LIST_MAJOR_TOPK_ENTRIES / (threads.max(1) * k.max(1))).max(1)
}

impl IvfIndex {
    /// Build from `vectors` (n × dim). `nlist` is clamped to `n` so tiny segments still build.
    pub fn build(
        index_type: IndexType,
        metric: Metric,
        dim: usize,
        nlist: usize,
        codec: Codec,
        vectors: &[f32],
    ) -> Result<Self, IndexError> {
        let n = vectors.len() / dim;
        let data = prepare(metric, dim, vectors);
        let k = nlist.min(n).max(1);
        let by_ip = metric == Metric::IP;
        let centroids = if n == 0 {
            vec![0.0; dim]
        } else {
            kmeans::train(&data, dim, k, KMEANS_ITERS, 256, SEED, by_ip)
        };
        let labels = if n == 0 {
            Vec::new()
        } else {
            kmeans::assign(&data, &centroids, dim, by_ip).0
        };
        let mut offsets = vec![0u64; k + 1];
        for &l in &labels {
            offsets[l as usize + 1] += 1;
        }
        for i in 0..k {
            offsets[i + 1] += offsets[i];
        }
        let mut fill: Vec<u64> = offsets[..k].to_vec();
        let mut ids = vec![0u32; n];
        for (row, &l) in labels.iter().enumerate() {
            ids[fill[l as usize] as usize] = row as u32;
            fill[l as usize] += 1;
        }
        let ordered = |src: &[f32]| -> Vec<f32> {
            ids.iter()
                .flat_map(|&r| {
                    src[r as usize * dim..(r as usize + 1) * dim]
                        .iter()
                        .copied()
                })
                .collect()
        };
        let (mut vecs, mut a, mut b, mut codes) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        match codec {
            Codec::Flat => vecs = ordered(&data),
            Codec::Sq8 => {
                // Residuals from the list centroid span a far smaller range than the vectors,
                // so the 8-bit steps are finer (faiss's by_residual).
                let resid = residuals(&data, &centroids, &labels, dim);
                let (lo, step) = sq8_train(&resid, dim);
                codes = ids
                    .par_iter()
                    .flat_map_iter(|&r| {
                        sq8_encode(&resid[r as usize * dim..(r as usize + 1) * dim], &lo, &step)
                    })
                    .collect();
                a = lo;
                b = step;
            }
            Codec::Pq {
                m, nbits, refine, ..
            } => {
                if n < (1 << nbits) {
                    return Err(IndexError::InvalidParam {
                        name: "nbits".into(),
                        reason: format!(
                            "must leave at least 2^nbits = {} rows to train on, the segment has {n}",
                            1usize << nbits
                        ),
                    });
                }
                let resid = residuals(&data, &centroids, &labels, dim);
                let books = pq_train(&resid, dim, m, nbits);
                let per_row = pq_encode(&resid, dim, m, nbits, &books);
                let cs = pq_code_size(m, nbits);
                codes = ids
                    .iter()
                    .flat_map(|&r| {
                        per_row[r as usize * cs..(r as usize + 1) * cs]
                            .iter()
                            .copied()
                    })
                    .collect();
                a = books;
                if refine {
                    vecs = ordered(&data);
                }
            }
        }
        let (pq_books_t, pq_ynorm) = match codec {
            Codec::Pq { m, nbits, .. } => pq_derived(&a, dim, m, nbits),
            Codec::Flat | Codec::Sq8 => (Vec::new(), Vec::new()),
        };
        let mut idx = Self {
            pq_books_t,
            pq_ynorm,
            cnorm: Vec::new(),
            cent16: Vec::new(),
            cent16_a: Vec::new(),
            meta: Meta {
                index_type,
                metric,
                dim,
                n,
                nlist: k,
                requested_nlist: nlist,
                codec,
            },
            centroids: centroids.into(),
            offsets: offsets.into(),
            ids: ids.into(),
            vectors: vecs.into(),
            aux_a: a.into(),
            aux_b: b.into(),
            codes: codes.into(),
        };
        idx.derive_coarse();
        Ok(idx)
    }

    /// The coarse ranking's derived arrays: centroid norms, and the half-precision copy when
    /// the centroids are larger than [`HALF_COARSE_MIN_BYTES`].
    fn derive_coarse(&mut self) {
        let dim = self.meta.dim;
        self.cnorm = centroid_norms(&self.centroids, dim);
        (self.cent16, self.cent16_a) = if self.centroids.bytes() > HALF_COARSE_MIN_BYTES {
            half_centroids(&self.centroids, dim)
        } else {
            (Vec::new(), Vec::new())
        };
    }

    /// Map a persisted IVF index (file already checksum-verified by `reader`).
    pub fn load(reader: &FileReader) -> Result<Self, IndexError> {
        let meta: Meta = serde_json::from_value(reader.meta()["ivf"].clone())
            .map_err(|e| reader.corrupt(format!("bad IVF header: {e}")))?;
        let (n, dim, k) = (meta.n, meta.dim, meta.nlist);
        let (vec_len, a_len, b_len, code_len) = match meta.codec {
            Codec::Flat => (n * dim, 0, 0, 0),
            Codec::Sq8 => (0, dim, dim, n * dim),
            Codec::Pq {
                m, nbits, refine, ..
            } => {
                if m == 0 || dim % m != 0 || !(1..=16).contains(&nbits) {
                    return Err(reader.corrupt("bad PQ shape"));
                }
                (
                    if refine { n * dim } else { 0 },
                    dim << nbits,
                    0,
                    n * pq_code_size(m, nbits),
                )
            }
        };
        let mut idx = Self {
            pq_books_t: Vec::new(),
            pq_ynorm: Vec::new(),
            cnorm: Vec::new(),
            cent16: Vec::new(),
            cent16_a: Vec::new(),
            centroids: reader.section("centroids", Some(k * dim))?,
            offsets: reader.section("offsets", Some(k + 1))?,
            ids: reader.section("ids", Some(n))?,
            vectors: reader.section("vectors", Some(vec_len))?,
            aux_a: reader.section("aux_a", Some(a_len))?,
            aux_b: reader.section("aux_b", Some(b_len))?,
            codes: reader.section("codes", Some(code_len))?,
            meta,
        };
        let offs = &*idx.offsets;
        if offs.first() != Some(&0)
            || offs.last() != Some(&(n as u64))
            || offs.windows(2).any(|w| w[0] > w[1])
        {
            return Err(reader.corrupt("IVF list offsets are inconsistent"));
        }
        if idx.ids.iter().any(|&r| r as usize >= n) {
            return Err(reader.corrupt("IVF row id out of range"));
        }
        if let Codec::Pq { m, nbits, .. } = idx.meta.codec {
            (idx.pq_books_t, idx.pq_ynorm) = pq_derived(&idx.aux_a, dim, m, nbits);
        }
        idx.derive_coarse();
        Ok(idx)
    }

    pub fn nlist(&self) -> usize {
        self.meta.nlist
    }

    /// The metric lists are ranked by: inner product for IP, L2 otherwise (COSINE vectors are
    /// normalised, where L2 and cosine order agree).
    fn probe_metric(&self) -> Metric {
        if self.meta.metric == Metric::IP {
            Metric::IP
        } else {
            Metric::L2
        }
    }

    /// The ranking distance of every list's centroid to the prepared query `q`, into `out`: one
    /// batch kernel call over the contiguous centroids; the same values as [`dist`] per centroid.
    fn centroid_dists(&self, q: &[f32], out: &mut Vec<f32>) {
        out.clear();
        out.resize(self.centroids.len() / self.meta.dim.max(1), 0.0);
        match self.probe_metric() {
            Metric::IP => {
                distance::dot_batch(q, &self.centroids, out);
                out.iter_mut().for_each(|x| *x = -*x);
            }
            _ => distance::l2_sq_batch(q, &self.centroids, out),
        }
    }

    /// For an unfiltered batch: the `nprobe` nearest lists of every query, nearest first, as
    /// [`search_one`](Self::search_one) would choose them. The centroid distances of the whole
    /// batch go through the FLAT batch kernel (a matrix product instead of `nq x nlist` separate
    /// distance calls); to choose exactly the single-query path's lists, it keeps a few more
    /// candidates than `nprobe` and ranks them by their directly computed distances with ties
    /// to the smaller list, as the single path does.
    fn coarse_batch(&self, prepared: &[f32], nprobe: usize) -> Vec<Vec<u32>> {
        let dim = self.meta.dim;
        let nlist = self.centroids.len() / dim.max(1);
        let want = (nprobe + RERANK_SLACK).min(nlist);
        let cand = match super::flat::search_slice(
            &self.centroids,
            dim,
            self.probe_metric(),
            prepared,
            want,
            None,
        ) {
            Ok(c) => c,
            // Shapes are the index's own: cannot fail; fall back to the exact path anyway.
            Err(_) => {
                return prepared
                    .chunks_exact(dim)
                    .map(|q| self.nearest_of(q, nprobe))
                    .collect();
            }
        };
        cand.into_iter()
            .zip(prepared.chunks_exact(dim))
            .map(|(c, q)| {
                let ranked = c
                    .into_iter()
                    .map(|n| {
                        let cen = &self.centroids[n.row as usize * dim..(n.row as usize + 1) * dim];
                        (dist(self.probe_metric(), q, cen), n.row)
                    })
                    .collect();
                self.top_lists(ranked, nprobe)
            })
            .collect()
    }

    /// The probe of a query whose filter keeps a fraction `p` of the rows: `nprobe / p` lists
    /// (at most every list), so about as many allowed rows are scored as unfiltered.
    fn widened_nprobe(&self, nprobe: usize, filter: &Bitset) -> usize {
        let nlist = self.centroids.len() / self.meta.dim.max(1);
        let allowed = filter.count_ones().min(self.meta.n).max(1);
        let widened = (nprobe as f64 * self.meta.n as f64 / allowed as f64).ceil();
        (widened.min(nlist as f64) as usize).max(nprobe)
    }

    /// `searchParams.nprobe` (default [`DEFAULT_NPROBE`]) checked against the requested nlist.
    fn checked_nprobe(&self, params: &SearchParams) -> Result<usize, IndexError> {
        let nprobe = params.nprobe.unwrap_or(DEFAULT_NPROBE);
        let max = self.meta.requested_nlist.max(1);
        if nprobe == 0 || nprobe > max {
            return Err(IndexError::InvalidParam {
                name: "nprobe".into(),
                reason: format!("must be in [1, nlist = {max}], got {nprobe}"),
            });
        }
        Ok(nprobe)
    }

    /// The `n` nearest lists of the prepared query `q`, nearest first, ranked as the
    /// single-query search ranks them.
    fn nearest_of(&self, q: &[f32], n: usize) -> Vec<u32> {
        let (mut d, mut lists) = (Vec::new(), Vec::new());
        if n >= self.meta.nlist {
            // Every list: one sort (the filtered search's order).
            self.centroid_dists(q, &mut d);
            lists.extend(d.iter().enumerate().map(|(l, &x)| (x, l as u32)));
            lists.sort_unstable_by(by_dist);
        } else {
            self.rank_lists(q, n, (&mut d, &mut Vec::new()), &mut lists);
        }
        lists.into_iter().map(|(_, l)| l).collect()
    }

    /// The `n` nearest lists of the prepared query `q` into `out` as `(distance, list)`, nearest
    /// first by the exact distance ([`dist`]), ties to the smaller list: the lists
    /// [`coarse_batch`](Self::coarse_batch) chooses. Every centroid gets a fast score
    /// ([`distance::dot_rows`]: ‖c‖² − 2⟨q, c⟩ for L2, −⟨q, c⟩ for IP, which rank as the
    /// distances do) and the best are re-scored exactly: the `n + RERANK_SLACK` best, or, when
    /// the scores come from the half-precision copy, every list a bound cannot exclude.
    /// `scores` and `bounds` are buffers.
    ///
    /// The bound: half(c) moves a score by at most 2‖q‖‖c − half(c)‖, and f32 rounding (of the
    /// score and of the exact distance) by at most η(‖q‖ + ‖c‖)²; call the sum `b`. Every list of
    /// the exact top `n` has `score − b ≤ T`, with `T` the `n`-th smallest `score + b`, so
    /// re-scoring the lists that pass that test makes the choice exact.
    fn rank_lists(
        &self,
        q: &[f32],
        n: usize,
        (scores, bounds): (&mut Vec<f32>, &mut Vec<f32>),
        out: &mut Vec<(f32, u32)>,
    ) {
        let dim = self.meta.dim;
        let nlist = self.centroids.len() / dim.max(1);
        let metric = self.probe_metric();
        let half = !self.cent16.is_empty();
        scores.clear();
        scores.resize(nlist, 0.0);
        if half {
            distance::dot_rows_f16(q, &self.cent16, scores);
        } else {
            distance::dot_rows(q, &self.centroids, scores);
        }
        debug_assert_eq!(self.cnorm.len(), nlist);
        if metric == Metric::IP {
            scores.iter_mut().for_each(|x| *x = -*x);
        } else {
            for (x, &c) in scores.iter_mut().zip(&self.cnorm) {
                *x = c - 2.0 * *x;
            }
        }
        if half {
            let qn2 = distance::norm_sq(q);
            let qn = qn2.sqrt();
            let bound = |a: f32, cn2: f32| qn * a + 2.0 * ROUNDING_SLACK * (qn2 + cn2);
            bounds.clear();
            bounds.extend(
                scores
                    .iter()
                    .zip(self.cent16_a.iter().zip(&self.cnorm))
                    .map(|(&x, (&a, &cn2))| x + bound(a, cn2)),
            );
            nearest_lists(bounds, n.min(nlist), out);
            let t = out.last().map_or(f32::INFINITY, |e| e.0);
            out.clear();
            for (l, (&x, (&a, &cn2))) in scores
                .iter()
                .zip(self.cent16_a.iter().zip(&self.cnorm))
                .enumerate()
            {
                if x - bound(a, cn2) <= t {
                    out.push((x, l as u32));
                }
            }
        } else {
            nearest_lists(scores, (n + RERANK_SLACK).min(nlist), out);
        }
        for e in out.iter_mut() {
            let l = e.1 as usize;
            e.0 = dist(metric, q, &self.centroids[l * dim..(l + 1) * dim]);
        }
        out.sort_unstable_by(by_dist);
        out.truncate(n);
    }

    /// The `nprobe` best of `(distance, list)`, nearest first, ties to the smaller list.
    fn top_lists(&self, mut c: Vec<(f32, u32)>, nprobe: usize) -> Vec<u32> {
        c.sort_unstable_by(by_dist);
        c.truncate(nprobe);
        c.into_iter().map(|(_, l)| l).collect()
    }

    /// One query. `probe`: the lists to scan, chosen by [`coarse_batch`](Self::coarse_batch)
    /// for an unfiltered batch; `None` ranks the lists here. Works in this thread's
    /// [`Scratch`], so the only allocation is the returned vector.
    fn search_one(
        &self,
        q: &[f32],
        k: usize,
        nprobe: usize,
        filter: Option<&Bitset>,
        probe: Option<&[u32]>,
    ) -> Vec<Neighbor> {
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut s) => self.search_in(&mut s, q, k, nprobe, filter, probe),
            // Only if a search ran inside another on this thread: fresh buffers then.
            Err(_) => self.search_in(&mut Scratch::default(), q, k, nprobe, filter, probe),
        })
    }

    fn search_in(
        &self,
        s: &mut Scratch,
        q: &[f32],
        k: usize,
        nprobe: usize,
        filter: Option<&Bitset>,
        probe: Option<&[u32]>,
    ) -> Vec<Neighbor> {
        let (dim, metric) = (self.meta.dim, self.meta.metric);
        let nlist = self.centroids.len() / dim.max(1);
        let mut nprobe = nprobe.min(nlist);
        if nprobe == 0 || k == 0 {
            return Vec::new();
        }
        s.q.clear();
        s.q.extend_from_slice(q);
        if metric == Metric::COSINE {
            distance::normalize(&mut s.q);
        }
        if let Some(f) = filter {
            // A filter keeping a fraction `p` of the rows widens the probe to `nprobe / p` lists,
            // so about as many allowed rows are scored as an unfiltered search would score; lists
            // beyond that are still probed (nearest first) until `k` allowed rows were seen.
            self.centroid_dists(&s.q, &mut s.dists);
            nprobe = self.widened_nprobe(nprobe, f);
            s.lists.clear();
            s.lists
                .extend(s.dists.iter().enumerate().map(|(l, &d)| (d, l as u32)));
            s.lists.sort_unstable_by(by_dist);
        } else if let Some(p) = probe {
            s.lists.clear();
            s.lists.extend(p.iter().map(|&l| (0.0, l)));
        } else {
            // `qs` is free until the scan: the bounds' buffer.
            self.rank_lists(&s.q, nprobe, (&mut s.dists, &mut s.qs), &mut s.lists);
        }
        let Scratch {
            q,
            dists,
            lists,
            qs,
            lut,
            top,
            cand,
            exact,
        } = s;
        let scan = Scan {
            q,
            k,
            nprobe,
            filter,
            lists,
        };
        match self.meta.codec {
            Codec::Flat | Codec::Sq8 => self.scan_lists(&scan, qs, dists, top),
            Codec::Pq {
                m,
                nbits,
                refine,
                refine_k,
            } => self.scan_pq(
                &scan,
                (m, nbits, refine, refine_k),
                (qs, lut, dists),
                top,
                (cand, exact),
            ),
        }
    }

    /// IVF_FLAT and IVF_SQ8: the lists nearest first. An unfiltered list is scored in one kernel
    /// call ([`Self::score_rows`]) and pushed against the bound; a filtered one scores only its
    /// allowed rows. The head of the next list is prefetched while the current one is scored.
    fn scan_lists(
        &self,
        sc: &Scan<'_>,
        qs: &mut Vec<f32>,
        buf: &mut Vec<f32>,
        top: &mut TopK,
    ) -> Vec<Neighbor> {
        let (dim, metric, codec) = (self.meta.dim, self.meta.metric, self.meta.codec);
        let q = sc.q;
        top.reset(sc.k);
        for (i, &(_, l)) in sc.lists.iter().enumerate() {
            if i >= sc.nprobe && top.len() >= sc.k {
                break;
            }
            if let Some(&(_, next)) = sc.lists.get(i + 1) {
                self.prefetch_list_head(next);
            }
            let (s, e) = self.list(l);
            if sc.filter.is_none() {
                self.score_rows(q, l, s..e, qs, buf);
                push_scored(top, &self.ids[s..e], buf);
                continue;
            }
            // SQ8: the query in this list's code space, once per list.
            let base = if codec == Codec::Sq8 {
                self.sq8_query(q, l, qs)
            } else {
                0.0
            };
            for p in s..e {
                let row = self.ids[p];
                if !sc.allowed(row) {
                    continue;
                }
                let d = match codec {
                    Codec::Sq8 if metric == Metric::L2 => {
                        distance::sq8_l2(qs, &self.aux_b, &self.codes[p * dim..(p + 1) * dim])
                    }
                    Codec::Sq8 => {
                        -(base + distance::sq8_dot(qs, &self.codes[p * dim..(p + 1) * dim]))
                    }
                    _ => dist(metric, q, &self.vectors[p * dim..(p + 1) * dim]),
                };
                top.push_row(row, d);
            }
        }
        top.take_sorted()
    }

    /// IVF_SQ8: the prepared query `q` moved into list `l`'s code space, into `qs`, and the
    /// distance's constant term. L2: the residual `q − c − lo` (scored with the steps); IP and
    /// COSINE: `q ⊙ step` and ⟨q, c + lo⟩, since ⟨q, c + lo + step ⊙ code⟩ is their sum plus
    /// ⟨q ⊙ step, code⟩.
    fn sq8_query(&self, q: &[f32], l: u32, qs: &mut Vec<f32>) -> f32 {
        let dim = self.meta.dim;
        let (lo, step) = (&*self.aux_a, &*self.aux_b);
        let c = &self.centroids[l as usize * dim..(l as usize + 1) * dim];
        qs.clear();
        if self.meta.metric == Metric::L2 {
            qs.extend(q.iter().zip(c).zip(lo).map(|((&x, &cj), &lj)| x - cj - lj));
            0.0
        } else {
            qs.extend(q.iter().zip(step).map(|(&x, &st)| x * st));
            distance::dot(q, lo) + distance::dot(q, c)
        }
    }

    /// IVF_PQ: asymmetric distances from lookup tables, then (with `refine`) the best
    /// `refine_k * k` candidates re-ranked by their raw vectors.
    ///
    /// L2 uses ‖r − y‖² = ‖r‖² + Σ_s (‖y_s‖² − 2⟨r_s, y_s⟩) for the residual r = q − c, so a
    /// list's table is one multiply-add pass over the transposed codebooks; IP's table
    /// (−⟨q_s, y_s⟩) does not depend on the list and is built once per query.
    fn scan_pq(
        &self,
        sc: &Scan<'_>,
        (m, nbits, refine, refine_k): (usize, usize, bool, usize),
        (rq, lut, buf): (&mut Vec<f32>, &mut Vec<f32>, &mut Vec<f32>),
        top: &mut TopK,
        (cand, exact): (&mut Vec<u32>, &mut TopK),
    ) -> Vec<Neighbor> {
        let (dim, metric) = (self.meta.dim, self.meta.metric);
        let q = sc.q;
        let ksub = 1usize << nbits;
        let dsub = dim / m.max(1);
        let cs = pq_code_size(m, nbits);
        // 8-bit tables are padded to 256 entries per sub-quantizer so that a code byte indexes
        // them without a bounds check (encoding never produces a code >= ksub).
        let stride = if nbits <= 8 { 256 } else { ksub };
        let fetch = if refine {
            sc.k.saturating_mul(refine_k)
        } else {
            sc.k
        };
        top.reset(fetch);
        lut.resize(m * stride, 0.0);
        let l2 = metric == Metric::L2;
        if !l2 {
            distance::pq_tables(q, &self.pq_books_t, &[], -1.0, dsub, ksub, stride, lut);
        }
        rq.clear();
        rq.resize(dim, 0.0);
        for (i, &(_, l)) in sc.lists.iter().enumerate() {
            if i >= sc.nprobe && top.len() >= fetch.min(sc.k) {
                break;
            }
            let c = &self.centroids[l as usize * dim..(l as usize + 1) * dim];
            let base = if l2 {
                for ((r, &a), &b) in rq.iter_mut().zip(q).zip(c) {
                    *r = a - b;
                }
                distance::pq_tables(
                    rq,
                    &self.pq_books_t,
                    &self.pq_ynorm,
                    -2.0,
                    dsub,
                    ksub,
                    stride,
                    lut,
                );
                distance::norm_sq(rq)
            } else {
                -distance::dot(q, c)
            };
            let (s0, e0) = self.list(l);
            let codes = &self.codes[s0 * cs..e0 * cs];
            // With a re-rank, remember the list position so the raw vector is found.
            let key = |p: usize| if refine { p as u32 } else { self.ids[p] };
            if nbits <= 8 && sc.filter.is_none() {
                // Unfiltered 8-bit codes: the whole list through the batch kernel.
                buf.clear();
                buf.resize(e0 - s0, 0.0);
                distance::pq_adc8_batch(lut, codes, m, buf);
                for (p, &d) in (s0..e0).zip(buf.iter()) {
                    let d = base + d;
                    if d <= top.bound() {
                        top.push_row(key(p), d);
                    }
                }
                continue;
            }
            for (p, code) in (s0..e0).zip(codes.chunks_exact(cs.max(1))) {
                if !sc.allowed(self.ids[p]) {
                    continue;
                }
                let d = base
                    + if nbits <= 8 {
                        distance::pq_adc8(lut, code)
                    } else {
                        adc16(lut, ksub, code)
                    };
                top.push_row(key(p), d);
            }
        }
        if !refine {
            return top.take_sorted();
        }
        // The candidates' raw vectors lie scattered over the segment: ask for all of them
        // first so their cache misses overlap instead of queueing one behind another.
        cand.clear();
        cand.extend(top.drain().map(|c| c.row));
        for &p in cand.iter() {
            let p = p as usize;
            distance::prefetch(&self.vectors[p * dim..(p + 1) * dim]);
        }
        exact.reset(sc.k);
        for &p in cand.iter() {
            let p = p as usize;
            exact.push_row(
                self.ids[p],
                dist(metric, q, &self.vectors[p * dim..(p + 1) * dim]),
            );
        }
        exact.take_sorted()
    }

    /// IVF_FLAT and IVF_SQ8: into `buf` (resized to the range), the distances from the prepared
    /// query `q` to the entries `rows` (a sub-range of list `l`), exactly as every unfiltered
    /// scan computes them. `qs` is scratch (SQ8: the query moved into code space).
    fn score_rows(
        &self,
        q: &[f32],
        l: u32,
        rows: std::ops::Range<usize>,
        qs: &mut Vec<f32>,
        buf: &mut Vec<f32>,
    ) {
        let (dim, metric) = (self.meta.dim, self.meta.metric);
        buf.clear();
        buf.resize(rows.len(), 0.0);
        let (s, e) = (rows.start, rows.end);
        match (self.meta.codec, metric) {
            (Codec::Flat, Metric::L2) => {
                distance::l2_sq_batch(q, &self.vectors[s * dim..e * dim], buf);
            }
            (Codec::Flat, Metric::IP | Metric::COSINE) => {
                distance::dot_batch(q, &self.vectors[s * dim..e * dim], buf);
                buf.iter_mut().for_each(|d| *d = -*d);
            }
            (Codec::Sq8, _) => {
                let base = self.sq8_query(q, l, qs);
                let codes = &self.codes[s * dim..e * dim];
                if metric == Metric::L2 {
                    distance::sq8_l2_batch(qs, &self.aux_b, codes, buf);
                } else {
                    distance::sq8_dot_batch(qs, codes, buf);
                    buf.iter_mut().for_each(|d| *d = -(base + *d));
                }
            }
            (Codec::Pq { .. }, _) => unreachable!("score_rows serves IVF_FLAT and IVF_SQ8"),
        }
    }

    /// An unfiltered IVF_FLAT or IVF_SQ8 batch, list by list: every list that some query probes
    /// is read once per tile of [`LIST_MAJOR_TILE_BYTES`] and scored against each of those
    /// queries while the tile is in cache, instead of once per query (at 1M rows the per-query
    /// scan waits on memory). `probes[i]` are query `i`'s lists (from [`Self::coarse_batch`]);
    /// at most `chunk` queries are in flight, each worker thread holding a top-k per query; a
    /// tile is `tile` rows ([`Self::list_major_tile`]).
    ///
    /// The distances are [`Self::score_rows`]'s and the top-k is a total order (distance, then
    /// row), so every result equals the query-by-query search's.
    fn search_list_major(
        &self,
        prepared: &[f32],
        k: usize,
        probes: &[Vec<u32>],
        (chunk, tile): (usize, usize),
    ) -> Vec<Vec<Neighbor>> {
        let dim = self.meta.dim;
        let mut out = Vec::with_capacity(probes.len());
        if k == 0 || dim == 0 {
            out.resize(probes.len(), Vec::new());
            return out;
        }
        for (qs, ps) in prepared
            .chunks(chunk.max(1) * dim)
            .zip(probes.chunks(chunk.max(1)))
        {
            out.extend(self.list_major_chunk(qs, k, ps, tile.max(1)));
        }
        out
    }

    /// Rows per tile of [`Self::search_list_major`]: [`LIST_MAJOR_TILE_BYTES`] of codes.
    fn list_major_tile(&self) -> usize {
        let row_bytes = match self.meta.codec {
            Codec::Flat => self.meta.dim * size_of::<f32>(),
            _ => self.meta.dim,
        };
        (LIST_MAJOR_TILE_BYTES / row_bytes.max(1)).max(16)
    }

    fn list_major_chunk(
        &self,
        queries: &[f32],
        k: usize,
        probes: &[Vec<u32>],
        tile: usize,
    ) -> Vec<Vec<Neighbor>> {
        let (dim, nlist, nq) = (self.meta.dim, self.meta.nlist, probes.len());
        // Which queries probe each list: `members[first[l]..first[l + 1]]`.
        let mut first = vec![0usize; nlist + 1];
        for &l in probes.iter().flatten() {
            first[l as usize + 1] += 1;
        }
        for l in 0..nlist {
            first[l + 1] += first[l];
        }
        let mut fill = first.clone();
        let mut members = vec![0u32; first[nlist]];
        for (i, p) in probes.iter().enumerate() {
            for &l in p {
                members[fill[l as usize]] = i as u32;
                fill[l as usize] += 1;
            }
        }
        // One top-k per query per worker thread; a worker only ever locks its own.
        let threads = rayon::current_num_threads().max(1);
        let accs: Vec<Mutex<Vec<TopK>>> = (0..threads).map(|_| Mutex::new(Vec::new())).collect();
        (0..nlist)
            .into_par_iter()
            .filter(|&l| first[l] < first[l + 1])
            .for_each(|l| {
                let t = rayon::current_thread_index().unwrap_or(0) % threads;
                let mut acc = accs[t].lock().unwrap_or_else(PoisonError::into_inner);
                if acc.is_empty() {
                    acc.extend((0..nq).map(|_| TopK::new(k)));
                }
                let who = &members[first[l]..first[l + 1]];
                let (s, e) = self.list(l as u32);
                SCRATCH.with(|cell| {
                    let mut fresh = Scratch::default();
                    let mut held = cell.try_borrow_mut();
                    let sc = match held.as_deref_mut() {
                        Ok(sc) => sc,
                        Err(_) => &mut fresh,
                    };
                    let mut ts = s;
                    while ts < e {
                        let te = (ts + tile).min(e);
                        for &i in who {
                            let i = i as usize;
                            let q = &queries[i * dim..(i + 1) * dim];
                            self.score_rows(q, l as u32, ts..te, &mut sc.qs, &mut sc.dists);
                            push_scored(&mut acc[i], &self.ids[ts..te], &sc.dists);
                        }
                        ts = te;
                    }
                });
            });
        let accs: Vec<Vec<TopK>> = accs
            .into_iter()
            .map(|m| m.into_inner().unwrap_or_else(PoisonError::into_inner))
            .collect();
        (0..nq)
            .into_par_iter()
            .map(|i| {
                let mut top = TopK::new(k);
                for n in accs.iter().filter_map(|a| a.get(i)).flat_map(TopK::iter) {
                    top.push_row(n.row, n.dist);
                }
                top.into_sorted()
            })
            .collect()
    }

    /// Starts loading the first [`LIST_PREFETCH_BYTES`] of list `l`'s vectors (IVF_FLAT) or
    /// codes (IVF_SQ8) while the current list is scored: lists lie apart in memory, and a
    /// hardware prefetcher only follows a stream once it has begun.
    fn prefetch_list_head(&self, l: u32) {
        let (s, e) = self.list(l);
        let dim = self.meta.dim;
        match self.meta.codec {
            Codec::Flat => {
                let rows = (LIST_PREFETCH_BYTES / (dim * size_of::<f32>()).max(1)).min(e - s);
                distance::prefetch(&self.vectors[s * dim..(s + rows) * dim]);
            }
            Codec::Sq8 => {
                let rows = (LIST_PREFETCH_BYTES / dim.max(1)).min(e - s);
                distance::prefetch(&self.codes[s * dim..(s + rows) * dim]);
            }
            Codec::Pq { .. } => {}
        }
    }

    fn list(&self, l: u32) -> (usize, usize) {
        (
            self.offsets[l as usize] as usize,
            self.offsets[l as usize + 1] as usize,
        )
    }

    // Pieces for scanning the lists somewhere else (the reader's GPU, `crate::gpu::offload`)
    // with exactly the CPU search's lists and distances.

    /// How many entries list `l` holds (0 for a list id outside `0..nlist()`).
    pub fn list_len(&self, l: u32) -> usize {
        if l as usize >= self.meta.nlist {
            return 0;
        }
        let (s, e) = self.list(l);
        e - s
    }

    /// The code the list entries carry.
    pub fn codec(&self) -> Codec {
        self.meta.codec
    }

    /// IVF_FLAT only (`None` for SQ8/PQ or a list id outside `0..nlist()`): list `l`'s stored
    /// vectors (row-major, `dim` per row; unit length for COSINE, as the index stores them) and
    /// the segment row of each, in the same order.
    pub fn flat_list(&self, l: u32) -> Option<(&[f32], &[u32])> {
        if self.meta.codec != Codec::Flat || l as usize >= self.meta.nlist {
            return None;
        }
        let (s, e) = self.list(l);
        let dim = self.meta.dim;
        Some((&self.vectors[s * dim..e * dim], &self.ids[s..e]))
    }

    /// The lists [`VectorIndexRead::search`] scans for each query of `queries` with top-`k`,
    /// `params.nprobe` and `filter`, so that an exact scan of them (only rows allowed by
    /// `filter`) returns the CPU search's answer:
    /// - unfiltered: the `nprobe` nearest lists (ranked as the batch or the single-query path
    ///   ranks them, whichever the CPU search takes for this batch size);
    /// - filtered: the nearest lists in order up to the widened probe (`nprobe` scaled by the
    ///   fraction of allowed rows), then further lists until they hold `k` allowed rows.
    ///
    /// Errors: as `search` (`DimensionMismatch`, `InvalidParam` for `nprobe`).
    pub fn probe_lists(
        &self,
        queries: &[f32],
        k: usize,
        params: &SearchParams,
        filter: Option<&Bitset>,
    ) -> Result<Vec<Vec<u32>>, IndexError> {
        let nq = check_queries(queries, self.meta.dim)?;
        let nprobe = self.checked_nprobe(params)?;
        let dim = self.meta.dim;
        let prepared = prepare(self.meta.metric, dim, queries);
        let nprobe = nprobe.min(self.meta.nlist);
        if k == 0 {
            return Ok(vec![Vec::new(); nq]);
        }
        let Some(f) = filter else {
            // `search`'s split: batches of COARSE_BATCH_MIN_QUERIES (> 1) or more rank through
            // the batch kernel, smaller ones per query (both choose the same lists).
            const { assert!(COARSE_BATCH_MIN_QUERIES > 1) };
            if nq >= COARSE_BATCH_MIN_QUERIES {
                return Ok(self.coarse_batch(&prepared, nprobe));
            }
            return Ok(prepared
                .par_chunks_exact(dim)
                .map(|q| self.nearest_of(q, nprobe))
                .collect());
        };
        // Allowed rows per list, to know where the CPU scan stops (it has `k` allowed rows).
        let allowed_in: Vec<usize> = (0..self.meta.nlist as u32)
            .map(|l| {
                let (s, e) = self.list(l);
                self.ids[s..e]
                    .iter()
                    .filter(|&&r| f.contains(r as usize))
                    .count()
            })
            .collect();
        // The widening the CPU search applies to a filtered query.
        let widened = self.widened_nprobe(nprobe, f);
        Ok(prepared
            .par_chunks_exact(dim)
            .map(|q| {
                let ranked = self.nearest_of(q, self.meta.nlist);
                let mut seen = 0usize;
                let mut out = Vec::new();
                for (i, l) in ranked.into_iter().enumerate() {
                    if i >= widened && seen >= k {
                        break;
                    }
                    seen += allowed_in[l as usize];
                    out.push(l);
                }
                out
            })
            .collect())
    }
}

impl VectorIndexRead for IvfIndex {
    fn index_type(&self) -> IndexType {
        self.meta.index_type
    }
    fn as_ivf(&self) -> Option<&IvfIndex> {
        Some(self)
    }
    fn metric(&self) -> Metric {
        self.meta.metric
    }
    fn dim(&self) -> usize {
        self.meta.dim
    }
    fn len(&self) -> usize {
        self.meta.n
    }
    fn memory_bytes(&self) -> usize {
        self.centroids.bytes()
            + self.offsets.bytes()
            + self.ids.bytes()
            + self.vectors.bytes()
            + self.aux_a.bytes()
            + self.aux_b.bytes()
            + self.codes.bytes()
            + (self.pq_books_t.len() + self.pq_ynorm.len() + self.cnorm.len() + self.cent16_a.len())
                * size_of::<f32>()
            + self.cent16.len() * size_of::<u16>()
    }
    fn search(
        &self,
        queries: &[f32],
        k: usize,
        params: &SearchParams,
        filter: Option<&Bitset>,
    ) -> Result<Vec<Vec<Neighbor>>, IndexError> {
        let nq = check_queries(queries, self.meta.dim)?;
        let nprobe = self.checked_nprobe(params)?;
        let dim = self.meta.dim;
        if nq <= 1 {
            return Ok(queries
                .chunks_exact(dim)
                .map(|q| self.search_one(q, k, nprobe, filter, None))
                .collect());
        }
        // An unfiltered batch ranks every query's lists in one matrix product (for a large
        // nlist and a small nprobe that is most of the work); a filtered one widens nprobe per
        // query and ranks in `search_one`.
        let mut probes = None;
        if filter.is_none() && nq >= COARSE_BATCH_MIN_QUERIES {
            let prepared = prepare(self.meta.metric, dim, queries);
            let lists = self.coarse_batch(&prepared, nprobe);
            if matches!(self.meta.codec, Codec::Pq { .. }) {
                // IVF_PQ builds a lookup table per query and list: query by query.
                probes = Some(lists);
            } else {
                let chunk = list_major_chunk(rayon::current_num_threads(), k);
                let tile = self.list_major_tile();
                return Ok(self.search_list_major(&prepared, k, &lists, (chunk, tile)));
            }
        }
        Ok(queries
            .par_chunks_exact(dim)
            .enumerate()
            .map(|(i, q)| {
                let probe = probes.as_ref().map(|p| p[i].as_slice());
                self.search_one(q, k, nprobe, filter, probe)
            })
            .collect())
    }
}

impl VectorIndex for IvfIndex {
    fn persist(&self, dir: &Path) -> Result<(), IndexError> {
        let meta = serde_json::json!({ "kind": "ivf", "ivf": self.meta });
        let mut w = FileWriter::new(meta);
        w.add("centroids", &self.centroids);
        w.add("offsets", &self.offsets);
        w.add("ids", &self.ids);
        w.add("vectors", &self.vectors);
        w.add("aux_a", &self.aux_a);
        w.add("aux_b", &self.aux_b);
        w.add("codes", &self.codes);
        w.write(dir)
    }
}

/// `x − centroid(label)` for every row.
fn residuals(data: &[f32], centroids: &[f32], labels: &[u32], dim: usize) -> Vec<f32> {
    let mut resid = vec![0f32; data.len()];
    resid.par_chunks_mut(dim).enumerate().for_each(|(r, out)| {
        let c = labels[r] as usize;
        for j in 0..dim {
            out[j] = data[r * dim + j] - centroids[c * dim + j];
        }
    });
    resid
}

/// Per-dimension minimum and step so that `min + 255 * step` is the maximum.
fn sq8_train(data: &[f32], dim: usize) -> (Vec<f32>, Vec<f32>) {
    let mut lo = vec![f32::INFINITY; dim];
    let mut hi = vec![f32::NEG_INFINITY; dim];
    for row in data.chunks_exact(dim) {
        for j in 0..dim {
            lo[j] = lo[j].min(row[j]);
            hi[j] = hi[j].max(row[j]);
        }
    }
    let step = lo
        .iter()
        .zip(&hi)
        .map(|(l, h)| if h > l { (h - l) / 255.0 } else { 0.0 })
        .collect();
    for l in lo.iter_mut() {
        if !l.is_finite() {
            *l = 0.0;
        }
    }
    (lo, step)
}

fn sq8_encode(v: &[f32], lo: &[f32], step: &[f32]) -> Vec<u8> {
    v.iter()
        .zip(lo.iter().zip(step))
        .map(|(x, (l, s))| {
            if *s > 0.0 {
                ((x - l) / s).round().clamp(0.0, 255.0) as u8
            } else {
                0
            }
        })
        .collect()
}

fn pq_code_size(m: usize, nbits: usize) -> usize {
    if nbits <= 8 { m } else { 2 * m }
}

fn sub_rows(x: &[f32], dim: usize, s: usize, dsub: usize) -> Vec<f32> {
    x.chunks_exact(dim)
        .flat_map(|r| r[s * dsub..(s + 1) * dsub].iter().copied())
        .collect()
}

/// One codebook per subspace (m × ksub × dsub), trained on residuals.
fn pq_train(resid: &[f32], dim: usize, m: usize, nbits: usize) -> Vec<f32> {
    let dsub = dim / m;
    let ksub = 1usize << nbits;
    // Sub-quantizers train independently (each seeded by its index), so in parallel.
    (0..m)
        .into_par_iter()
        .map(|s| {
            kmeans::train(
                &sub_rows(resid, dim, s, dsub),
                dsub,
                ksub,
                KMEANS_ITERS,
                256,
                SEED + s as u64,
                false,
            )
        })
        .collect::<Vec<_>>()
        .concat()
}

fn pq_encode(resid: &[f32], dim: usize, m: usize, nbits: usize, books: &[f32]) -> Vec<u8> {
    let n = resid.len() / dim;
    let dsub = dim / m;
    let ksub = 1usize << nbits;
    let cs = pq_code_size(m, nbits);
    let mut codes = vec![0u8; n * cs];
    for s in 0..m {
        let (labels, _) = kmeans::assign(
            &sub_rows(resid, dim, s, dsub),
            &books[s * ksub * dsub..(s + 1) * ksub * dsub],
            dsub,
            false,
        );
        for (r, &l) in labels.iter().enumerate() {
            if nbits <= 8 {
                codes[r * cs + s] = l as u8;
            } else {
                codes[r * cs + 2 * s..r * cs + 2 * s + 2]
                    .copy_from_slice(&(l as u16).to_le_bytes());
            }
        }
    }
    codes
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The exact ranking: every list by [`dist`], nearest first, ties to the smaller list.
    fn exact_lists(idx: &IvfIndex, q: &[f32], n: usize) -> Vec<u32> {
        let dim = idx.meta.dim;
        let mut all: Vec<(f32, u32)> = idx
            .centroids
            .chunks_exact(dim)
            .enumerate()
            .map(|(l, c)| (dist(idx.probe_metric(), q, c), l as u32))
            .collect();
        all.sort_by(by_dist);
        all.into_iter().take(n).map(|(_, l)| l).collect()
    }

    impl IvfIndex {
        /// The half-precision coarse ranking whatever the centroids' size.
        fn force_half(&mut self) {
            (self.cent16, self.cent16_a) = half_centroids(&self.centroids, self.meta.dim);
            assert!(!self.cent16.is_empty());
        }
    }

    fn ivf_flat(metric: Metric, dim: usize, nlist: usize, rows: &[f32]) -> IvfIndex {
        IvfIndex::build(IndexType::IVF_FLAT, metric, dim, nlist, Codec::Flat, rows).expect("build")
    }

    #[test]
    fn list_by_list_batches_return_the_query_by_query_results() {
        let dim = 24;
        let mut rng = ChaCha8Rng::seed_from_u64(78);
        let mut rows: Vec<f32> = (0..2000 * dim)
            .map(|_| rng.random_range(-4.0f32..4.0) + 3.0)
            .collect();
        // 300 exact duplicates: equal distances, ordered by row in every path.
        rows.extend_from_within(..300 * dim);
        let queries: Vec<f32> = (0..40 * dim)
            .map(|_| rng.random_range(-4.0f32..4.0) + 3.0)
            .collect();
        for codec in [Codec::Flat, Codec::Sq8] {
            for metric in [Metric::L2, Metric::IP, Metric::COSINE] {
                let t = if codec == Codec::Flat {
                    IndexType::IVF_FLAT
                } else {
                    IndexType::IVF_SQ8
                };
                let idx = IvfIndex::build(t, metric, dim, 64, codec, &rows).expect("build");
                let prepared = prepare(metric, dim, &queries);
                for (k, nprobe) in [(1, 1), (10, 3), (500, 5)] {
                    let want: Vec<Vec<Neighbor>> = queries
                        .chunks_exact(dim)
                        .map(|q| idx.search_one(q, k, nprobe, None, None))
                        .collect();
                    // k = 500 is more than 5 lists of ~36 rows hold: every row of them comes back.
                    let full = want.iter().filter(|r| r.len() == k).count();
                    assert_eq!(full, if k <= 10 { want.len() } else { 0 }, "{t} k={k}");
                    let probes = idx.coarse_batch(&prepared, nprobe);
                    // Chunks and tiles that split the batch and the lists unevenly, and the
                    // sizes `search` picks.
                    for shape in [
                        (1, 1),
                        (7, 5),
                        (40, 1000),
                        (list_major_chunk(2, k), idx.list_major_tile()),
                    ] {
                        let got = idx.search_list_major(&prepared, k, &probes, shape);
                        assert_eq!(got, want, "{t} {metric:?} k={k} nprobe={nprobe} {shape:?}");
                    }
                    let params = SearchParams {
                        nprobe: Some(nprobe),
                        ef: None,
                    };
                    let batch = idx.search(&queries, k, &params, None).expect("search");
                    assert_eq!(batch, want, "{t} {metric:?} k={k} through search");
                }
                // An index over no rows answers a batch with empty results.
                let empty = IvfIndex::build(t, metric, dim, 64, codec, &[]).expect("build");
                let got = empty
                    .search(&queries, 10, &SearchParams::default(), None)
                    .expect("search");
                assert_eq!(
                    got,
                    vec![Vec::<Neighbor>::new(); 40],
                    "{t} {metric:?} empty"
                );
            }
        }
    }

    #[test]
    fn the_fast_coarse_ranking_chooses_the_exact_nearest_lists() {
        let dim = 24;
        let mut rng = ChaCha8Rng::seed_from_u64(77);
        let rows: Vec<f32> = (0..3000 * dim)
            .map(|_| rng.random_range(-4.0f32..4.0) + 20.0)
            .collect();
        let queries: Vec<f32> = (0..64 * dim)
            .map(|_| rng.random_range(-4.0f32..4.0) + 20.0)
            .collect();
        for metric in [Metric::L2, Metric::IP, Metric::COSINE] {
            let mut idx = ivf_flat(metric, dim, 100, &rows);
            assert!(idx.cent16.is_empty(), "9.6 KB of centroids stay in f32");
            let prepared = prepare(metric, dim, &queries);
            for half in [false, true] {
                if half {
                    // The half-precision ranking, as indexes with large centroid sets use it.
                    idx.force_half();
                }
                for n in [1usize, 2, 5, 17, 99] {
                    let batch = idx.coarse_batch(&prepared, n);
                    for (i, q) in prepared.chunks_exact(dim).enumerate() {
                        let want = exact_lists(&idx, q, n);
                        let got = idx.nearest_of(q, n);
                        assert_eq!(got, want, "{metric:?} half {half} n={n} query {i}");
                        assert_eq!(batch[i], want, "{metric:?} n={n} batch query {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn lists_at_equal_distance_go_to_the_smaller_list_number() {
        // Centroids on the integer grid {0, 1, 2}^3 and queries on it and between its points:
        // many centroids tie exactly, and the fast scores tie too.
        let dim = 3;
        let rows: Vec<f32> = (0..300).map(|i| ((i * 7) % 3) as f32).collect();
        let mut idx = ivf_flat(Metric::L2, dim, 8, &rows);
        let grid: Vec<f32> = (0..27)
            .flat_map(|c| [(c / 9) as f32, ((c / 3) % 3) as f32, (c % 3) as f32])
            .collect();
        idx.centroids = grid.into();
        idx.meta.nlist = 27;
        for half in [false, true] {
            idx.derive_coarse();
            if half {
                idx.force_half();
            }
            for q in [
                [1.0f32, 1.0, 1.0],
                [0.5, 0.5, 0.5],
                [1.5, 0.0, 2.0],
                [0.0, 0.0, 0.0],
            ] {
                for n in [1usize, 3, 6, 10] {
                    let got = idx.nearest_of(&q, n);
                    assert_eq!(got, exact_lists(&idx, &q, n), "half {half} q={q:?} n={n}");
                }
            }
            // The six face neighbours of the centre tie at distance 1: smallest numbers first.
            assert_eq!(idx.nearest_of(&[1.0, 1.0, 1.0], 4), vec![13, 4, 10, 12]);
        }
    }

    #[test]
    fn half_centroids_bound_their_rounding_and_refuse_values_beyond_the_half_range() {
        let dim = 4;
        let c = [1.0f32, 0.1, -3.3, 1000.7, 0.0, 0.0, 0.0, 0.0];
        let (half, a) = half_centroids(&c, dim);
        assert_eq!((half.len(), a.len()), (8, 2));
        for (row, (h, &ai)) in c.chunks_exact(dim).zip(half.chunks_exact(dim).zip(&a)) {
            let err: f32 = row
                .iter()
                .zip(h)
                .map(|(&x, &y)| (x - distance::f16_to_f32(y)).powi(2))
                .sum::<f32>()
                .sqrt();
            assert!(ai >= 2.0 * err, "{ai} < 2 x {err}");
        }
        assert!(a[0] > 0.0, "1000.7 and 0.1 are not halves");
        assert_eq!(a[1], 0.0, "a zero centroid is exact");
        assert!(half_centroids(&[1.0, 70_000.0], 2).0.is_empty());
        assert!(half_centroids(&[1.0, f32::NAN], 2).0.is_empty());
    }

    #[test]
    fn nearest_lists_keeps_the_n_smallest_with_ties_to_the_smaller_list() {
        let d = [3.0f32, 1.0, 2.0, 1.0, f32::NAN, 0.5, 2.0];
        let mut out = Vec::new();
        nearest_lists(&d, 3, &mut out);
        assert_eq!(out, vec![(0.5, 5), (1.0, 1), (1.0, 3)]);
        nearest_lists(&d, 0, &mut out);
        assert!(out.is_empty());
        nearest_lists(&d[..2], 5, &mut out);
        assert_eq!(out, vec![(1.0, 1), (3.0, 0)]);
    }
}
