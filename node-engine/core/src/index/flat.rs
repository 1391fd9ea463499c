//! FLAT: exact brute-force search, the oracle every ANN index is tested against.
//!
//! Owns: [`FlatIndex`] over any row-major `f32` storage (a `Vec`, an mmapped segment file) and
//! [`search_slice`] for plain slices such as the writer's growing buffer. Both share one engine:
//! - one query (or a handful): a SIMD scan through [`crate::distance`] feeding a bounded
//!   heap, the base split across the rayon pool when the pool has more than one thread;
//! - a batch: queries x base tiles through a blocked matrix multiply (dot products), the top-k
//!   selection fused per tile so the distance matrix never leaves the cache, rayon over
//!   (query block, base chunk) tasks.
//!
//! Distances are internal (smaller is better): squared L2, negated inner product, negated
//! cosine (stored vectors stay raw; per-row norms are precomputed by [`FlatIndex::new`]).
//! Whatever path selected the candidates, the distances returned are recomputed with the direct
//! kernels, so single and batch searches report the same value for the same pair.
//!
//! Must not depend on anything outside `core` (no storage, no network).

#![allow(unsafe_code)]

use crate::bitset::Bitset;
use crate::distance;
use crate::index::{IndexError, SearchParams, VectorIndexRead};
use crate::topk::TopK;
use crate::types::{IndexType, Metric, Neighbor};
use rayon::prelude::*;

/// Below this many queries a batch is answered query by query (a GEMM tile would be mostly empty).
const BATCH_MIN_QUERIES: usize = 8;
/// Rows per base tile in the batch path: a tile's dot products for a query block stay in L2.
const BASE_TILE: usize = 512;
/// Queries per block in the portable batch path (the block's dot-product tile stays in L2).
const QUERY_BLOCK: usize = 128;
/// Queries per block in the fused AVX-512 path: the packed block (512 KiB at 128-d) stays in L2
/// while the base streams past it once per block.
#[cfg(target_arch = "x86_64")]
const FUSED_QUERY_BLOCK: usize = 1024;
/// A single-query scan splits the base across threads only above this many rows per part.
const PAR_SCAN_MIN_ROWS: usize = 32 * 1024;
/// Rows scored per kernel call in the single-query scan.
const SCAN_CHUNK: usize = 256;

/// Exact index over `data` (row-major, `dim` floats per row).
pub struct FlatIndex<S: AsRef<[f32]> + Send + Sync> {
    data: S,
    dim: usize,
    metric: Metric,
    /// L2: squared norm per row; COSINE: inverse norm per row (0 for a zero row); IP: empty.
    /// Computed on the first search that uses them (a batch, or any COSINE search), not when
    /// the index is made: a segment mapped right after its flush is not read (and its pages
    /// not made resident) until a search needs it, and a single L2 query never needs them.
    row_terms: std::sync::OnceLock<Vec<f32>>,
}

impl<S: AsRef<[f32]> + Send + Sync> FlatIndex<S> {
    /// Wrap `data`; the per-row terms the metric needs are computed by the first search that
    /// uses them.
    ///
    /// Errors: `InvalidParam` when `dim` is 0 or `data.len()` is not a multiple of `dim`.
    pub fn new(data: S, dim: usize, metric: Metric) -> Result<Self, IndexError> {
        check_shape(data.as_ref().len(), dim)?;
        Ok(Self {
            data,
            dim,
            metric,
            row_terms: std::sync::OnceLock::new(),
        })
    }

    /// The indexed vectors, row-major.
    pub fn data(&self) -> &[f32] {
        self.data.as_ref()
    }

    /// The borrowed form for a search of `nq` queries, with the per-row terms when that search
    /// uses them (computing them once, on first need).
    fn view(&self, nq: usize) -> View<'_> {
        let data = self.data.as_ref();
        let needs_terms = self.metric == Metric::COSINE
            || (nq >= BATCH_MIN_QUERIES && data.len() / self.dim >= BASE_TILE);
        let row_terms: &[f32] = if needs_terms {
            self.row_terms
                .get_or_init(|| row_terms(data, self.dim, self.metric))
        } else {
            self.row_terms.get().map_or(&[], Vec::as_slice)
        };
        View {
            data,
            dim: self.dim,
            metric: self.metric,
            row_terms,
        }
    }
}

impl<S: AsRef<[f32]> + Send + Sync> VectorIndexRead for FlatIndex<S> {
    fn index_type(&self) -> IndexType {
        IndexType::FLAT
    }
    fn metric(&self) -> Metric {
        self.metric
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn len(&self) -> usize {
        self.data.as_ref().len() / self.dim
    }
    fn memory_bytes(&self) -> usize {
        std::mem::size_of_val(self.data.as_ref())
            + self
                .row_terms
                .get()
                .map_or(0, |t| std::mem::size_of_val(t.as_slice()))
    }
    fn search(
        &self,
        queries: &[f32],
        k: usize,
        _params: &SearchParams,
        filter: Option<&Bitset>,
    ) -> Result<Vec<Vec<Neighbor>>, IndexError> {
        self.view(queries.len() / self.dim)
            .search(queries, k, filter)
    }
}

/// Exact search over a plain row-major slice with the semantics of [`FlatIndex`] (for data too
/// small or too short-lived to keep per-row norms, like the growing buffer).
///
/// Errors: `InvalidParam` for `dim == 0` or a `data` length that is not a multiple of `dim`;
/// `DimensionMismatch` when `queries.len()` is not a multiple of `dim`.
pub fn search_slice(
    data: &[f32],
    dim: usize,
    metric: Metric,
    queries: &[f32],
    k: usize,
    filter: Option<&Bitset>,
) -> Result<Vec<Vec<Neighbor>>, IndexError> {
    check_shape(data.len(), dim)?;
    let nq = queries.len().checked_div(dim).unwrap_or(0);
    // Per-row terms are only worth computing when a batch will use them many times.
    let terms = if nq >= BATCH_MIN_QUERIES || metric == Metric::COSINE {
        row_terms(data, dim, metric)
    } else {
        Vec::new()
    };
    View {
        data,
        dim,
        metric,
        row_terms: &terms,
    }
    .search(queries, k, filter)
}

fn check_shape(len: usize, dim: usize) -> Result<(), IndexError> {
    if dim == 0 {
        return Err(IndexError::InvalidParam {
            name: "dim".into(),
            reason: "must be at least 1".into(),
        });
    }
    if !len.is_multiple_of(dim) {
        return Err(IndexError::InvalidParam {
            name: "data".into(),
            reason: format!("{len} floats is not a whole number of {dim}-d rows"),
        });
    }
    Ok(())
}

fn row_terms(data: &[f32], dim: usize, metric: Metric) -> Vec<f32> {
    match metric {
        Metric::IP => Vec::new(),
        Metric::L2 => data.par_chunks_exact(dim).map(distance::norm_sq).collect(),
        Metric::COSINE => data
            .par_chunks_exact(dim)
            .map(|r| inv_norm(distance::norm_sq(r)))
            .collect(),
    }
}

/// `1/sqrt(n2)`, with 0 for a zero vector so its cosine to anything is 0.
#[inline]
fn inv_norm(n2: f32) -> f32 {
    if n2 > 0.0 { 1.0 / n2.sqrt() } else { 0.0 }
}

/// Borrowed form of an index: what the search code works on.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    dim: usize,
    metric: Metric,
    row_terms: &'a [f32],
}

impl View<'_> {
    fn n(&self) -> usize {
        self.data.len() / self.dim
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    fn search(
        &self,
        queries: &[f32],
        k: usize,
        filter: Option<&Bitset>,
    ) -> Result<Vec<Vec<Neighbor>>, IndexError> {
        if !queries.len().is_multiple_of(self.dim) {
            return Err(IndexError::DimensionMismatch {
                expected: self.dim,
                got: queries.len(),
            });
        }
        let nq = queries.len() / self.dim;
        if nq == 0 {
            return Ok(Vec::new());
        }
        let k = k.min(self.n());
        if k == 0 {
            return Ok(vec![Vec::new(); nq]);
        }
        if nq < BATCH_MIN_QUERIES || self.n() < BASE_TILE {
            return Ok(queries
                .chunks_exact(self.dim)
                .map(|q| self.search_one(q, k, filter))
                .collect());
        }
        Ok(self.search_batch(queries, k, filter))
    }

    /// Exact internal distance of `q` (with `q_term` from [`View::query_term`]) to row `i`.
    #[inline]
    fn exact_dist(&self, q: &[f32], q_term: f32, i: usize) -> f32 {
        match self.metric {
            Metric::L2 => distance::l2_sq(q, self.row(i)),
            Metric::IP => -distance::dot(q, self.row(i)),
            Metric::COSINE => -(distance::dot(q, self.row(i)) * self.cos_term(i) * q_term),
        }
    }

    #[inline]
    fn cos_term(&self, i: usize) -> f32 {
        match self.row_terms.get(i) {
            Some(t) => *t,
            None => inv_norm(distance::norm_sq(self.row(i))),
        }
    }

    fn query_term(&self, q: &[f32]) -> f32 {
        match self.metric {
            Metric::L2 => distance::norm_sq(q),
            Metric::IP => 0.0,
            Metric::COSINE => inv_norm(distance::norm_sq(q)),
        }
    }

    fn search_one(&self, q: &[f32], k: usize, filter: Option<&Bitset>) -> Vec<Neighbor> {
        let n = self.n();
        let threads = rayon::current_num_threads();
        let parts = if threads > 1 {
            (n / PAR_SCAN_MIN_ROWS).clamp(1, threads * 4)
        } else {
            1
        };
        if parts == 1 {
            let mut top = TopK::new(k);
            self.scan_range(q, 0, n, filter, &mut top);
            return top.into_sorted();
        }
        let per = n.div_ceil(parts);
        let tops: Vec<TopK> = (0..parts)
            .into_par_iter()
            .map(|p| {
                let mut top = TopK::new(k);
                self.scan_range(q, p * per, ((p + 1) * per).min(n), filter, &mut top);
                top
            })
            .collect();
        merge(tops, k)
    }

    /// Push rows `lo..hi` that pass `filter` into `top`, in increasing row order.
    fn scan_range(&self, q: &[f32], lo: usize, hi: usize, filter: Option<&Bitset>, top: &mut TopK) {
        let q_term = self.query_term(q);
        let mut buf = [0f32; SCAN_CHUNK];
        let mut start = lo;
        while start < hi {
            let end = (start + SCAN_CHUNK).min(hi);
            let rows = &self.data[start * self.dim..end * self.dim];
            let out = &mut buf[..end - start];
            match self.metric {
                Metric::L2 => distance::l2_sq_batch(q, rows, out),
                Metric::IP | Metric::COSINE => distance::dot_batch(q, rows, out),
            }
            if self.metric != Metric::L2 {
                for (j, d) in out.iter_mut().enumerate() {
                    *d = match self.metric {
                        Metric::IP => -*d,
                        _ => -(*d * self.cos_term(start + j) * q_term),
                    };
                }
            }
            for (j, &d) in out.iter().enumerate() {
                let row = start + j;
                if filter.is_none_or(|f| f.contains(row)) {
                    top.push_row(row as u32, d);
                }
            }
            start = end;
        }
    }

    fn search_batch(
        &self,
        queries: &[f32],
        k: usize,
        filter: Option<&Bitset>,
    ) -> Vec<Vec<Neighbor>> {
        let n = self.n();
        let dim = self.dim;
        let nq = queries.len() / dim;
        let threads = rayon::current_num_threads();
        #[cfg(target_arch = "x86_64")]
        let use_fused = distance::isa() == distance::Isa::Avx512;
        #[cfg(target_arch = "x86_64")]
        let max_block = if use_fused {
            FUSED_QUERY_BLOCK
        } else {
            QUERY_BLOCK
        };
        #[cfg(not(target_arch = "x86_64"))]
        let max_block = QUERY_BLOCK;
        // Even blocks, a multiple of 32 queries, no larger than the cache allows.
        let qblocks = nq.div_ceil(max_block);
        let qblock = nq.div_ceil(qblocks).div_ceil(32) * 32;
        let qblocks = nq.div_ceil(qblock);
        // Enough tasks to keep every thread busy: split the base when queries alone do not.
        let want_tasks = threads * 4;
        let chunks = if qblocks >= want_tasks {
            1
        } else {
            want_tasks.div_ceil(qblocks).min(n.div_ceil(BASE_TILE))
        };
        let per_chunk = n.div_ceil(chunks).div_ceil(BASE_TILE) * BASE_TILE;
        let chunks = n.div_ceil(per_chunk);
        let l2_terms: Vec<f32>;
        let bterms: &[f32] = match self.metric {
            Metric::L2 if self.row_terms.len() == n => self.row_terms,
            Metric::L2 => {
                l2_terms = row_terms(self.data, dim, Metric::L2);
                &l2_terms
            }
            Metric::IP | Metric::COSINE => self.row_terms,
        };
        let q_terms: Vec<f32> = queries
            .chunks_exact(dim)
            .map(|q| self.query_term(q))
            .collect();
        let results: Vec<Vec<TopK>> = (0..qblocks * chunks)
            .into_par_iter()
            .map(|task| {
                let (qb, c) = (task / chunks, task % chunks);
                let q0 = qb * qblock;
                let q1 = (q0 + qblock).min(nq);
                let b0 = c * per_chunk;
                let b1 = (b0 + per_chunk).min(n);
                let qs = &queries[q0 * dim..q1 * dim];
                #[cfg(target_arch = "x86_64")]
                if use_fused {
                    return fused::block_topk(
                        self,
                        qs,
                        &q_terms[q0..q1],
                        bterms,
                        b0,
                        b1,
                        k,
                        filter,
                    );
                }
                self.block_topk(qs, &q_terms[q0..q1], bterms, b0, b1, k, filter)
            })
            .collect();
        // results[qb * chunks + c][i] = top-k of query qb*qblock+i over chunk c.
        let mut per_query: Vec<Vec<TopK>> = (0..nq).map(|_| Vec::with_capacity(chunks)).collect();
        for (task, tops) in results.into_iter().enumerate() {
            let qb = task / chunks;
            for (i, t) in tops.into_iter().enumerate() {
                per_query[qb * qblock + i].push(t);
            }
        }
        per_query
            .into_par_iter()
            .enumerate()
            .map(|(qi, tops)| {
                let q = &queries[qi * dim..(qi + 1) * dim];
                let qt = q_terms[qi];
                let mut hits: Vec<Neighbor> = tops
                    .into_iter()
                    .flat_map(TopK::into_unsorted)
                    .map(|nb| Neighbor {
                        row: nb.row,
                        dist: self.exact_dist(q, qt, nb.row as usize),
                    })
                    .collect();
                hits.sort_by(|a, b| a.cmp_rank(b));
                hits.truncate(k);
                hits
            })
            .collect()
    }

    /// Top-k (by the GEMM form of the distance) of each query in `qs` over rows `b0..b1`.
    #[allow(clippy::too_many_arguments)]
    fn block_topk(
        &self,
        qs: &[f32],
        q_terms: &[f32],
        bterms: &[f32],
        b0: usize,
        b1: usize,
        k: usize,
        filter: Option<&Bitset>,
    ) -> Vec<TopK> {
        let dim = self.dim;
        let m = qs.len() / dim;
        let mut tops: Vec<TopK> = (0..m).map(|_| TopK::new(k)).collect();
        let mut tile = vec![0f32; m * BASE_TILE];
        let mut t0 = b0;
        while t0 < b1 {
            let t1 = (t0 + BASE_TILE).min(b1);
            let nb = t1 - t0;
            let rows = &self.data[t0 * dim..t1 * dim];
            // SAFETY: `tile` holds m x nb floats written row-major with row stride nb; `qs` is
            // m x dim row-major; `rows` is nb x dim row-major, read as its transpose (dim x nb)
            // with row stride 1 and column stride dim. All pointers are valid for those extents
            // and `tile` does not alias the inputs.
            unsafe {
                gemm::gemm(
                    m,
                    nb,
                    dim,
                    tile.as_mut_ptr(),
                    1,
                    nb as isize,
                    false,
                    qs.as_ptr(),
                    1,
                    dim as isize,
                    rows.as_ptr(),
                    dim as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for (i, top) in tops.iter_mut().enumerate() {
                let dists = &mut tile[i * nb..(i + 1) * nb];
                let qt = q_terms[i];
                // The ranking distances in place, one metric branch per tile row so the loops
                // vectorise; then one compare per row against a threshold kept in a register.
                match self.metric {
                    Metric::L2 => {
                        for (d, &t) in dists.iter_mut().zip(&bterms[t0..t1]) {
                            *d = t - 2.0 * *d;
                        }
                    }
                    Metric::IP => dists.iter_mut().for_each(|d| *d = -*d),
                    Metric::COSINE => {
                        for (d, &t) in dists.iter_mut().zip(&bterms[t0..t1]) {
                            *d = -(*d * t * qt);
                        }
                    }
                }
                let mut j = distance::next_below(dists, 0, top.bound(), false);
                while j < nb {
                    let row = t0 + j;
                    if filter.is_none_or(|f| f.contains(row)) {
                        top.push_row(row as u32, dists[j]);
                    }
                    j = distance::next_below(dists, j + 1, top.bound(), false);
                }
            }
            t0 = t1;
        }
        tops
    }
}

#[cfg(target_arch = "x86_64")]
mod fused {
    //! The batch path on AVX-512: a register-blocked dot-product micro-kernel (MR base rows x NR
    //! queries, 28 of the 32 zmm registers as accumulators) whose epilogue turns each dot product
    //! into the ranking distance and compares it with the query's current top-k threshold, so
    //! the distance matrix is never written out. Operands are packed k-major: a query block once
    //! per task (it stays in L2), each base micro-panel once per block (it stays in L1).
    use super::{TopK, View};
    use crate::bitset::Bitset;
    use crate::types::Metric;
    use std::arch::x86_64::*;

    /// Base rows per micro-panel (broadcast operand).
    const MR: usize = 14;
    /// Queries per strip (two zmm registers).
    const NR: usize = 32;

    /// Top-k by `acc * s_row + t_row` (the ranking form of the metric) of each query in `qs`
    /// over rows `b0..b1`; see [`View::block_topk`] for the contract.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn block_topk(
        view: &View<'_>,
        qs: &[f32],
        q_terms: &[f32],
        bterms: &[f32],
        b0: usize,
        b1: usize,
        k: usize,
        filter: Option<&Bitset>,
    ) -> Vec<TopK> {
        let dim = view.dim;
        let m = qs.len() / dim;
        let strips = m.div_ceil(NR);
        let mut tops: Vec<TopK> = (0..m).map(|_| TopK::new(k)).collect();
        // thresholds, padded lanes at -inf so nothing ever enters them
        let mut thr = vec![f32::NEG_INFINITY; strips * NR];
        thr[..m].fill(f32::INFINITY);
        let mut qpack = vec![0f32; strips * dim * NR];
        for (qi, q) in qs.chunks_exact(dim).enumerate() {
            let scale = if view.metric == Metric::COSINE {
                q_terms[qi]
            } else {
                1.0
            };
            let (s, j) = (qi / NR, qi % NR);
            let strip = &mut qpack[s * dim * NR..(s + 1) * dim * NR];
            for (kk, &x) in q.iter().enumerate() {
                strip[kk * NR + j] = x * scale;
            }
        }
        let mut apack = vec![0f32; dim * MR];
        let mut sv = [0f32; MR];
        let mut tv = [0f32; MR];
        let mut p0 = b0;
        while p0 < b1 {
            let rows = (b1 - p0).min(MR);
            let mut live = false;
            for i in 0..MR {
                let row = p0 + i;
                let allowed = i < rows && filter.is_none_or(|f| f.contains(row));
                live |= allowed;
                (sv[i], tv[i]) = match view.metric {
                    _ if !allowed => (0.0, f32::INFINITY),
                    Metric::L2 => (-2.0, bterms[row]),
                    Metric::IP => (-1.0, 0.0),
                    Metric::COSINE => (-bterms[row], 0.0),
                };
            }
            if live {
                for i in 0..MR {
                    if i < rows {
                        let r = view.row(p0 + i);
                        for (kk, &x) in r.iter().enumerate() {
                            apack[kk * MR + i] = x;
                        }
                    } else {
                        for kk in 0..dim {
                            apack[kk * MR + i] = 0.0;
                        }
                    }
                }
                for s in 0..strips {
                    let hi = ((s + 1) * NR).min(m);
                    let strip_thr: &mut [f32; NR] =
                        match (&mut thr[s * NR..(s + 1) * NR]).try_into() {
                            Ok(t) => t,
                            Err(_) => unreachable!("a strip is NR wide"),
                        };
                    // SAFETY: the CPU has AVX-512F (the caller checked `distance::isa()`);
                    // `apack` holds dim x MR and the strip dim x NR floats, as `panel` reads.
                    unsafe {
                        panel(
                            &apack,
                            &qpack[s * dim * NR..(s + 1) * dim * NR],
                            dim,
                            &sv,
                            &tv,
                            strip_thr,
                            &mut tops[s * NR..hi],
                            p0 as u32,
                        );
                    }
                }
            }
            p0 += rows;
        }
        tops
    }

    /// One micro-panel against one query strip: MR x NR dot products over `dim`, then
    /// `d = acc * s[i] + t[i]`, pushing every `d < thr[j]` into `tops[j]` in increasing row order.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    fn panel(
        a: &[f32],
        b: &[f32],
        dim: usize,
        s: &[f32; MR],
        t: &[f32; MR],
        thr: &mut [f32; NR],
        tops: &mut [TopK],
        row0: u32,
    ) {
        assert!(a.len() >= dim * MR && b.len() >= dim * NR);
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for kk in 0..dim {
            // SAFETY: kk < dim, so kk*NR+32 <= dim*NR <= b.len() and kk*MR+i < dim*MR <= a.len().
            unsafe {
                let b0 = _mm512_loadu_ps(bp.add(kk * NR));
                let b1 = _mm512_loadu_ps(bp.add(kk * NR + 16));
                let arow = ap.add(kk * MR);
                for (i, acc_i) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*arow.add(i));
                    acc_i[0] = _mm512_fmadd_ps(av, b0, acc_i[0]);
                    acc_i[1] = _mm512_fmadd_ps(av, b1, acc_i[1]);
                }
            }
        }
        for (i, acc_i) in acc.iter().enumerate() {
            let si = _mm512_set1_ps(s[i]);
            let ti = _mm512_set1_ps(t[i]);
            let d0 = _mm512_fmadd_ps(acc_i[0], si, ti);
            let d1 = _mm512_fmadd_ps(acc_i[1], si, ti);
            // SAFETY: thr holds NR = 32 floats.
            let (th0, th1) = unsafe {
                (
                    _mm512_loadu_ps(thr.as_ptr()),
                    _mm512_loadu_ps(thr.as_ptr().add(16)),
                )
            };
            let m0 = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(d0, th0);
            let m1 = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(d1, th1);
            let mut mask = u32::from(m0) | (u32::from(m1) << 16);
            if mask != 0 {
                let mut buf = [0f32; NR];
                // SAFETY: buf holds NR = 32 floats.
                unsafe {
                    _mm512_storeu_ps(buf.as_mut_ptr(), d0);
                    _mm512_storeu_ps(buf.as_mut_ptr().add(16), d1);
                }
                while mask != 0 {
                    let j = mask.trailing_zeros() as usize;
                    mask &= mask - 1;
                    if let Some(top) = tops.get_mut(j) {
                        top.push_row(row0 + i as u32, buf[j]);
                        thr[j] = top.bound();
                    }
                }
            }
        }
    }
}

fn merge(tops: Vec<TopK>, k: usize) -> Vec<Neighbor> {
    let mut all: Vec<Neighbor> = tops.into_iter().flat_map(TopK::into_unsorted).collect();
    all.sort_by(|a, b| a.cmp_rank(b));
    all.truncate(k);
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Small integers: every distance is exact in f32, so any summation order agrees bit for bit.
    fn int_data(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n * dim)
            .map(|_| rng.random_range(-4i32..=4) as f32)
            .collect()
    }

    fn naive(
        data: &[f32],
        dim: usize,
        metric: Metric,
        q: &[f32],
        k: usize,
        filter: Option<&Bitset>,
    ) -> Vec<Neighbor> {
        let qn = q.iter().map(|x| x * x).sum::<f32>().sqrt();
        let mut all: Vec<Neighbor> = data
            .chunks_exact(dim)
            .enumerate()
            .filter(|(i, _)| filter.is_none_or(|f| f.contains(*i)))
            .map(|(i, r)| {
                let ip: f32 = r.iter().zip(q).map(|(a, b)| a * b).sum();
                let dist = match metric {
                    Metric::L2 => r.iter().zip(q).map(|(a, b)| (a - b) * (a - b)).sum(),
                    Metric::IP => -ip,
                    Metric::COSINE => {
                        let rn = r.iter().map(|x| x * x).sum::<f32>().sqrt();
                        if rn == 0.0 || qn == 0.0 {
                            -0.0
                        } else {
                            -(ip / (rn * qn))
                        }
                    }
                };
                Neighbor {
                    row: i as u32,
                    dist,
                }
            })
            .collect();
        all.sort_by(|a, b| a.cmp_rank(b));
        all.truncate(k);
        all
    }

    fn assert_same(got: &[Neighbor], want: &[Neighbor], metric: Metric) {
        assert_eq!(
            got.len(),
            want.len(),
            "{metric}: lengths differ\n got {got:?}\nwant {want:?}"
        );
        for (g, w) in got.iter().zip(want) {
            match metric {
                Metric::COSINE => {
                    // cosine goes through a reciprocal square root: compare with a tolerance, and
                    // rows where the rank is clear
                    assert!(
                        (g.dist - w.dist).abs() <= 1e-5,
                        "{metric}: {got:?} vs {want:?}"
                    );
                }
                Metric::L2 | Metric::IP => assert_eq!(g, w, "{metric}: {got:?}\nvs {want:?}"),
            }
        }
        if metric != Metric::COSINE {
            assert_eq!(got, want);
        }
    }

    fn every_path(dim: usize, n: usize, nq: usize, k: usize, filter: Option<&Bitset>) {
        let data = int_data(n, dim, 7 + n as u64);
        let queries = int_data(nq, dim, 99 + nq as u64);
        for metric in [Metric::L2, Metric::IP, Metric::COSINE] {
            let index = FlatIndex::new(data.clone(), dim, metric).unwrap();
            let batch = index
                .search(&queries, k, &SearchParams::default(), filter)
                .unwrap();
            let slice = search_slice(&data, dim, metric, &queries, k, filter).unwrap();
            assert_eq!(batch.len(), nq);
            for (qi, q) in queries.chunks_exact(dim).enumerate() {
                let want = naive(&data, dim, metric, q, k, filter);
                assert_same(&batch[qi], &want, metric);
                assert_same(&slice[qi], &want, metric);
                let one = index
                    .search(q, k, &SearchParams::default(), filter)
                    .unwrap();
                assert_same(&one[0], &want, metric);
            }
        }
    }

    #[test]
    fn single_and_batch_searches_agree_with_the_naive_oracle_for_every_metric() {
        every_path(16, 700, 3, 10, None);
        every_path(33, 1500, 40, 10, None);
        every_path(128, 2100, 20, 7, None);
    }

    #[test]
    fn integer_data_with_many_equal_distances_ranks_ties_by_smaller_row() {
        // values in -4..=4 over 3 dims: thousands of rows share each distance
        every_path(3, 3000, 12, 50, None);
        let data = vec![1.0f32; 4 * 600];
        let index = FlatIndex::new(data, 4, Metric::L2).unwrap();
        let q = vec![1.0f32; 4 * 9];
        for hits in index.search(&q, 5, &SearchParams::default(), None).unwrap() {
            assert_eq!(
                hits.iter().map(|h| h.row).collect::<Vec<_>>(),
                vec![0, 1, 2, 3, 4]
            );
        }
    }

    #[test]
    fn k_larger_than_the_row_count_returns_every_row_once() {
        every_path(8, 30, 2, 100, None);
        every_path(8, 600, 9, 1000, None);
    }

    #[test]
    fn filtered_rows_never_appear_and_k_allowed_rows_still_come_back() {
        let n = 3000;
        let mut sparse = Bitset::new_empty(n);
        for i in (0..n).step_by(97) {
            sparse.insert(i);
        }
        every_path(24, n, 10, 10, Some(&sparse));
        let mut half = Bitset::new_full(n);
        for i in (0..n).step_by(2) {
            half.remove(i);
        }
        every_path(24, n, 10, 20, Some(&half));
        let data = int_data(n, 24, 1);
        let index = FlatIndex::new(data, 24, Metric::L2).unwrap();
        let q = int_data(12, 24, 2);
        let res = index
            .search(&q, 10, &SearchParams::default(), Some(&sparse))
            .unwrap();
        for hits in &res {
            assert_eq!(hits.len(), 10);
            assert!(hits.iter().all(|h| sparse.contains(h.row as usize)));
        }
    }

    #[test]
    fn an_empty_filter_returns_nothing_for_every_query() {
        let n = 1000;
        let empty = Bitset::new_empty(n);
        let data = int_data(n, 16, 3);
        let q = int_data(20, 16, 4);
        for metric in [Metric::L2, Metric::IP, Metric::COSINE] {
            let index = FlatIndex::new(data.clone(), 16, metric).unwrap();
            for nq in [1, 20] {
                let res = index
                    .search(&q[..nq * 16], 10, &SearchParams::default(), Some(&empty))
                    .unwrap();
                assert_eq!(res.len(), nq);
                assert!(res.iter().all(|r| r.is_empty()));
            }
        }
    }

    #[test]
    fn queries_of_the_wrong_dimension_are_rejected() {
        let index = FlatIndex::new(int_data(10, 8, 5), 8, Metric::L2).unwrap();
        let err = index
            .search(&[0.0; 12], 3, &SearchParams::default(), None)
            .unwrap_err();
        assert!(
            matches!(err, IndexError::DimensionMismatch { expected: 8, .. }),
            "{err}"
        );
        let err = search_slice(&[0.0; 16], 8, Metric::IP, &[1.0; 7], 3, None).unwrap_err();
        assert!(
            matches!(err, IndexError::DimensionMismatch { expected: 8, .. }),
            "{err}"
        );
        assert!(matches!(
            FlatIndex::new(vec![0.0; 10], 3, Metric::L2),
            Err(IndexError::InvalidParam { .. })
        ));
        assert!(matches!(
            FlatIndex::new(vec![0.0; 10], 0, Metric::L2),
            Err(IndexError::InvalidParam { .. })
        ));
    }

    #[test]
    fn float_data_results_match_the_oracle_within_rounding() {
        let (n, dim) = (5000, 100);
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let data: Vec<f32> = (0..n * dim).map(|_| rng.random::<f32>() - 0.5).collect();
        let q: Vec<f32> = (0..50 * dim).map(|_| rng.random::<f32>() - 0.5).collect();
        for metric in [Metric::L2, Metric::IP, Metric::COSINE] {
            let index = FlatIndex::new(data.clone(), dim, metric).unwrap();
            let res = index
                .search(&q, 10, &SearchParams::default(), None)
                .unwrap();
            for (qi, qv) in q.chunks_exact(dim).enumerate() {
                let want = naive(&data, dim, metric, qv, 10, None);
                let same = res[qi]
                    .iter()
                    .zip(&want)
                    .filter(|(g, w)| g.row == w.row)
                    .count();
                assert!(same >= 9, "{metric} q{qi}: {:?} vs {want:?}", res[qi]);
                for (g, w) in res[qi].iter().zip(&want) {
                    assert!((g.dist - w.dist).abs() <= 1e-3 * w.dist.abs().max(1.0));
                }
            }
        }
    }

    #[test]
    fn one_thread_and_many_threads_give_identical_results() {
        let data = int_data(5000, 32, 21);
        let q = int_data(64, 32, 22);
        let index = FlatIndex::new(data, 32, Metric::L2).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let one = pool.install(|| {
            index
                .search(&q, 10, &SearchParams::default(), None)
                .unwrap()
        });
        let pool4 = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap();
        let many = pool4.install(|| {
            index
                .search(&q, 10, &SearchParams::default(), None)
                .unwrap()
        });
        assert_eq!(one, many);
        let one1 = pool.install(|| {
            index
                .search(&q[..32], 10, &SearchParams::default(), None)
                .unwrap()
        });
        assert_eq!(one1[0], many[0]);
    }
}
