//! Inverted-file indexes: IVF_FLAT, IVF_SQ8 and IVF_PQ. A k-means coarse quantizer splits the
//! rows into `nlist` lists stored contiguously (list order), each entry holding the row id and
//! its code: the raw vector (FLAT), 8-bit per-dimension scalar codes of the residual from the
//! list centroid (SQ8, min/max per dimension trained over all residuals), or product-quantized residual codes (PQ, ADC lookup tables,
//! optional exact re-rank from stored raw vectors).
//!
//! Filters and tombstones are applied while scanning: a row whose bit is unset is skipped before
//! its distance is computed, so the result still holds `k` allowed rows when `nprobe` lists
//! contain them.

use super::common::{TopK, check_queries, dist, prepare};
use super::persist::{Buf, FileReader, FileWriter};
use super::{IndexError, SearchParams, VectorIndex, VectorIndexRead, kmeans};
use crate::core::bitset::Bitset;
use crate::core::types::{IndexType, Metric, Neighbor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::Path;

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
}

/// Batches of at least this many unfiltered queries rank their lists through the FLAT batch
/// kernel ([`IvfIndex::coarse_batch`]).
const COARSE_BATCH_MIN_QUERIES: usize = 16;

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
            kmeans::train(&data, dim, k, KMEANS_ITERS, 256, SEED)
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
        Ok(Self {
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
        })
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
        let idx = Self {
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

    /// (ranking distance, list) of every list for the prepared query `q`: one batch kernel call
    /// over the contiguous centroids; the same values as [`dist`] per centroid.
    fn coarse(&self, q: &[f32]) -> Vec<(f32, u32)> {
        let mut d = vec![0f32; self.centroids.len() / self.meta.dim.max(1)];
        match self.probe_metric() {
            Metric::IP => {
                crate::core::distance::dot_batch(q, &self.centroids, &mut d);
                d.iter_mut().for_each(|x| *x = -*x);
            }
            _ => crate::core::distance::l2_sq_batch(q, &self.centroids, &mut d),
        }
        d.into_iter()
            .enumerate()
            .map(|(l, x)| (x, l as u32))
            .collect()
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
        let want = (nprobe + 8).min(nlist);
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
                    .map(|q| self.top_lists(self.coarse(q), nprobe))
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

    /// The `nprobe` best of `(distance, list)`, nearest first, ties to the smaller list.
    fn top_lists(&self, mut c: Vec<(f32, u32)>, nprobe: usize) -> Vec<u32> {
        let by_dist = |a: &(f32, u32), b: &(f32, u32)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
        c.sort_unstable_by(by_dist);
        c.truncate(nprobe);
        c.into_iter().map(|(_, l)| l).collect()
    }

    /// One query. `probe`: the lists to scan, chosen by [`coarse_batch`](Self::coarse_batch)
    /// for an unfiltered batch; `None` ranks the lists here.
    fn search_one(
        &self,
        q: &[f32],
        k: usize,
        nprobe: usize,
        filter: Option<&Bitset>,
        probe: Option<&[u32]>,
    ) -> Vec<Neighbor> {
        let (dim, metric) = (self.meta.dim, self.meta.metric);
        let q = prepare(metric, dim, q);
        let mut coarse: Vec<(f32, u32)> = match (probe, filter) {
            (Some(lists), None) => lists.iter().map(|&l| (0.0, l)).collect(),
            _ => self.coarse(&q),
        };
        let nprobe = nprobe.min(coarse.len());
        if nprobe == 0 || k == 0 {
            return Vec::new();
        }
        let by_dist = |a: &(f32, u32), b: &(f32, u32)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
        let mut nprobe = nprobe;
        if let Some(f) = filter {
            // A filter keeping a fraction `p` of the rows widens the probe to `nprobe / p` lists,
            // so about as many allowed rows are scored as an unfiltered search would score; lists
            // beyond that are still probed (nearest first) until `k` allowed rows were seen.
            let allowed = f.count_ones().min(self.meta.n).max(1);
            let widened = (nprobe as f64 * self.meta.n as f64 / allowed as f64).ceil();
            nprobe = (widened.min(coarse.len() as f64) as usize).max(nprobe);
            coarse.sort_unstable_by(by_dist);
        } else if probe.is_none() {
            coarse.select_nth_unstable_by(nprobe - 1, by_dist);
            coarse.truncate(nprobe);
        }
        let allowed = |row: u32| filter.is_none_or(|f| f.contains(row as usize));
        match self.meta.codec {
            Codec::Flat => {
                let mut top = TopK::new(k);
                let mut scratch = Vec::new();
                for (i, &(_, l)) in coarse.iter().enumerate() {
                    if i >= nprobe && top.len() >= k {
                        break;
                    }
                    let (s, e) = self.list(l);
                    if filter.is_none() {
                        // Unfiltered: one kernel call per list over its contiguous vectors.
                        scratch.resize(e - s, 0.0);
                        let rows = &self.vectors[s * dim..e * dim];
                        match metric {
                            Metric::L2 => {
                                crate::core::distance::l2_sq_batch(&q, rows, &mut scratch)
                            }
                            Metric::IP | Metric::COSINE => {
                                crate::core::distance::dot_batch(&q, rows, &mut scratch);
                                scratch.iter_mut().for_each(|d| *d = -*d);
                            }
                        }
                        for (p, &d) in (s..e).zip(&scratch) {
                            if d <= top.bound() {
                                top.push(self.ids[p], d);
                            }
                        }
                        continue;
                    }
                    for p in s..e {
                        let row = self.ids[p];
                        if allowed(row) {
                            top.push(row, dist(metric, &q, &self.vectors[p * dim..(p + 1) * dim]));
                        }
                    }
                }
                top.into_sorted()
            }
            Codec::Sq8 => {
                let (lo, step) = (&*self.aux_a, &*self.aux_b);
                let mut top = TopK::new(k);
                match metric {
                    Metric::L2 => {
                        let mut qs = vec![0f32; dim];
                        for (i, &(_, l)) in coarse.iter().enumerate() {
                            if i >= nprobe && top.len() >= k {
                                break;
                            }
                            let c = &self.centroids[l as usize * dim..(l as usize + 1) * dim];
                            for j in 0..dim {
                                qs[j] = q[j] - c[j] - lo[j];
                            }
                            let (s, e) = self.list(l);
                            for p in s..e {
                                let row = self.ids[p];
                                if allowed(row) {
                                    top.push(
                                        row,
                                        sq8_l2(&qs, step, &self.codes[p * dim..(p + 1) * dim]),
                                    );
                                }
                            }
                        }
                    }
                    Metric::IP | Metric::COSINE => {
                        let q_lo: f32 = q.iter().zip(lo).map(|(x, m)| x * m).sum();
                        let qs: Vec<f32> = q.iter().zip(step).map(|(x, s)| x * s).collect();
                        for (i, &(_, l)) in coarse.iter().enumerate() {
                            if i >= nprobe && top.len() >= k {
                                break;
                            }
                            let c = &self.centroids[l as usize * dim..(l as usize + 1) * dim];
                            let base = q_lo + crate::core::distance::dot(&q, c);
                            let (s, e) = self.list(l);
                            for p in s..e {
                                let row = self.ids[p];
                                if allowed(row) {
                                    top.push(
                                        row,
                                        -(base + sq8_dot(&qs, &self.codes[p * dim..(p + 1) * dim])),
                                    );
                                }
                            }
                        }
                    }
                }
                top.into_sorted()
            }
            Codec::Pq {
                m,
                nbits,
                refine,
                refine_k,
            } => {
                let ksub = 1usize << nbits;
                let dsub = dim / m;
                let books = &*self.aux_a;
                let cs = pq_code_size(m, nbits);
                let fetch = if refine {
                    k.saturating_mul(refine_k)
                } else {
                    k
                };
                let mut top = TopK::new(fetch);
                let mut lut = vec![0f32; m * ksub];
                let ip_lut = |lut: &mut [f32]| {
                    for s in 0..m {
                        for j in 0..ksub {
                            let w = &books[(s * ksub + j) * dsub..(s * ksub + j + 1) * dsub];
                            lut[s * ksub + j] =
                                -crate::core::distance::dot(&q[s * dsub..(s + 1) * dsub], w);
                        }
                    }
                };
                if metric != Metric::L2 {
                    ip_lut(&mut lut);
                }
                let mut rq = vec![0f32; dim];
                for (i, &(_, l)) in coarse.iter().enumerate() {
                    if i >= nprobe && top.len() >= fetch.min(k) {
                        break;
                    }
                    let c = &self.centroids[l as usize * dim..(l as usize + 1) * dim];
                    let base = match metric {
                        Metric::L2 => {
                            for j in 0..dim {
                                rq[j] = q[j] - c[j];
                            }
                            for s in 0..m {
                                for j in 0..ksub {
                                    let w =
                                        &books[(s * ksub + j) * dsub..(s * ksub + j + 1) * dsub];
                                    lut[s * ksub + j] = crate::core::distance::l2_sq(
                                        &rq[s * dsub..(s + 1) * dsub],
                                        w,
                                    );
                                }
                            }
                            0.0
                        }
                        Metric::IP | Metric::COSINE => -crate::core::distance::dot(&q, c),
                    };
                    let (s0, e0) = self.list(l);
                    for p in s0..e0 {
                        let row = self.ids[p];
                        if !allowed(row) {
                            continue;
                        }
                        let code = &self.codes[p * cs..(p + 1) * cs];
                        let mut d = base;
                        if nbits <= 8 {
                            for (s, &c) in code.iter().enumerate() {
                                d += lut[s * ksub + c as usize];
                            }
                        } else {
                            for s in 0..m {
                                let c = u16::from_le_bytes([code[2 * s], code[2 * s + 1]]) as usize;
                                d += lut[s * ksub + c];
                            }
                        }
                        if refine {
                            // Remember the list position, not the row, so re-ranking finds the vector.
                            top.push(p as u32, d);
                        } else {
                            top.push(row, d);
                        }
                    }
                }
                if !refine {
                    return top.into_sorted();
                }
                let mut exact = TopK::new(k);
                for cand in top.into_sorted() {
                    let p = cand.row as usize;
                    exact.push(
                        self.ids[p],
                        dist(metric, &q, &self.vectors[p * dim..(p + 1) * dim]),
                    );
                }
                exact.into_sorted()
            }
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
        let nprobe = params.nprobe.unwrap_or(DEFAULT_NPROBE);
        let max = self.meta.requested_nlist.max(1);
        if nprobe == 0 || nprobe > max {
            return Err(IndexError::InvalidParam {
                name: "nprobe".into(),
                reason: format!("must be in [1, nlist = {max}], got {nprobe}"),
            });
        }
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
                .map(|q| self.top_lists(self.coarse(q), nprobe))
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
        // The widening `search_one` applies to a filtered query (kept in step with it; the
        // GPU-versus-CPU equality tests in `gpu::offload` fail if the two drift apart).
        let allowed = f.count_ones().min(self.meta.n).max(1);
        let widened = (nprobe as f64 * self.meta.n as f64 / allowed as f64).ceil();
        let widened = (widened.min(self.meta.nlist as f64) as usize).max(nprobe);
        Ok(prepared
            .par_chunks_exact(dim)
            .map(|q| {
                let ranked = self.top_lists(self.coarse(q), self.meta.nlist);
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
    }
    fn search(
        &self,
        queries: &[f32],
        k: usize,
        params: &SearchParams,
        filter: Option<&Bitset>,
    ) -> Result<Vec<Vec<Neighbor>>, IndexError> {
        let nq = check_queries(queries, self.meta.dim)?;
        let nprobe = params.nprobe.unwrap_or(DEFAULT_NPROBE);
        let max = self.meta.requested_nlist.max(1);
        if nprobe == 0 || nprobe > max {
            return Err(IndexError::InvalidParam {
                name: "nprobe".into(),
                reason: format!("must be in [1, nlist = {max}], got {nprobe}"),
            });
        }
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
        let probes = (filter.is_none() && nq >= COARSE_BATCH_MIN_QUERIES)
            .then(|| self.coarse_batch(&prepare(self.meta.metric, dim, queries), nprobe));
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

/// Σ (qs_j − code_j · step_j)², with `qs = q − min` (SIMD where the CPU has it).
#[inline]
fn sq8_l2(qs: &[f32], step: &[f32], code: &[u8]) -> f32 {
    crate::core::distance::sq8_l2(qs, step, code)
}

/// Σ qs_j · code_j, with `qs = q · step`.
#[inline]
fn sq8_dot(qs: &[f32], code: &[u8]) -> f32 {
    crate::core::distance::sq8_dot(qs, code)
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
    (0..m)
        .flat_map(|s| {
            kmeans::train(
                &sub_rows(resid, dim, s, dsub),
                dsub,
                ksub,
                KMEANS_ITERS,
                256,
                SEED + s as u64,
            )
        })
        .collect()
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
