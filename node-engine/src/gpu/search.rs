//! GPU FLAT and IVF_FLAT list-scan search over a set of devices: which device holds a block,
//! what stays resident under the memory budget (LRU), how a query batch is tiled to fit the
//! workspace, and how per-tile results merge into each query's top-k. Every device call goes
//! through [`GpuBackend`]; this module holds no CUDA code and is tested without a GPU.
//!
//! The reader reaches it through [`crate::gpu::offload`], which routes a batch here or to the
//! CPU and answers on the CPU when a call fails.

use crate::core::bitset::Bitset;
use crate::core::topk::TopK;
use crate::core::types::{Metric, Neighbor};
use crate::gpu::GpuError;
use crate::gpu::backend::GpuBackend;
use crate::gpu::budget::LruBudget;
use crate::gpu::plan;
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;

/// `BlockKey::part` of a whole FLAT segment (IVF lists use their list id).
pub const FLAT_PART: u32 = u32::MAX;

/// Largest top-k the GPU path serves (Milvus's limit); larger requests go to the CPU.
pub const MAX_GPU_TOPK: usize = 16_384;

/// Identity of a resident block: a whole FLAT segment or one IVF list of a segment, prepared for
/// one metric (COSINE blocks hold normalised vectors). Sealed segments are immutable, so the key
/// alone says whether the device copy is current.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub segment: u64,
    pub part: u32,
    pub metric: Metric,
}

/// One IVF list of a segment, as the IVF index holds it on the host.
#[derive(Debug, Clone, Copy)]
pub struct IvfList<'a> {
    /// Row-major vectors of the list's members.
    pub vectors: &'a [f32],
    /// Segment row of each member (same order as `vectors`).
    pub rows: &'a [u32],
}

/// Residency of one device, for `/metrics` and `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResidentStats {
    pub ordinal: u32,
    pub name: String,
    pub blocks: usize,
    pub used_bytes: u64,
    pub budget_bytes: u64,
}

/// What a reader needs from the GPU searcher, object-safe so the reader holds
/// `Option<Arc<dyn GpuSearch>>` without knowing the backend.
pub trait GpuSearch: Send + Sync {
    /// Batches smaller than this go to the CPU.
    fn threshold(&self) -> usize;
    /// Exact top-`k` of each query over one FLAT segment's `vectors`.
    ///
    /// Errors: `InvalidRequest` for inconsistent shapes or `k > MAX_GPU_TOPK`; device errors as
    /// they happen (the caller falls back to the CPU).
    #[allow(clippy::too_many_arguments)]
    fn search_flat(
        &self,
        segment: u64,
        vectors: &[f32],
        dim: usize,
        metric: Metric,
        queries: &[f32],
        k: usize,
        filter: Option<&Bitset>,
    ) -> Result<Vec<Vec<Neighbor>>, GpuError>;
    /// Scan the probed IVF lists of one segment: `probes[q]` are the list ids query `q` probes
    /// (the coarse step runs on the CPU). Returned rows are segment rows.
    #[allow(clippy::too_many_arguments)]
    fn search_ivf(
        &self,
        segment: u64,
        lists: &[IvfList<'_>],
        probes: &[Vec<u32>],
        dim: usize,
        metric: Metric,
        queries: &[f32],
        k: usize,
        filter: Option<&Bitset>,
    ) -> Result<Vec<Vec<Neighbor>>, GpuError>;
    /// Drop every resident block of `segment` (segment released or compacted away).
    fn evict_segment(&self, segment: u64);
    /// Per-device residency.
    fn resident(&self) -> Vec<ResidentStats>;
}

struct Resident<T> {
    lru: LruBudget<BlockKey>,
    blocks: HashMap<BlockKey, Arc<T>>,
}

struct Slot<B: GpuBackend> {
    backend: B,
    resident: Mutex<Resident<B::Block>>,
}

/// GPU searcher over one or more devices of backend `B`.
pub struct GpuSearcher<B: GpuBackend> {
    slots: Vec<Slot<B>>,
    threshold: usize,
    workspace: u64,
}

impl<B: GpuBackend> GpuSearcher<B> {
    /// `budget` and `workspace` are per device, in bytes.
    ///
    /// Errors: `NoDevices` when `backends` is empty.
    pub fn new(
        backends: Vec<B>,
        budget: u64,
        threshold: usize,
        workspace: u64,
    ) -> Result<Self, GpuError> {
        if backends.is_empty() {
            return Err(GpuError::NoDevices);
        }
        let slots = backends
            .into_iter()
            .map(|backend| Slot {
                backend,
                resident: Mutex::new(Resident {
                    lru: LruBudget::new(budget),
                    blocks: HashMap::new(),
                }),
            })
            .collect();
        Ok(Self {
            slots,
            threshold,
            workspace,
        })
    }

    /// The backends, in `--gpu-devices` order.
    pub fn backends(&self) -> impl Iterator<Item = &B> {
        self.slots.iter().map(|s| &s.backend)
    }

    fn slot_for(&self, key: BlockKey) -> &Slot<B> {
        &self.slots[plan::device_for(key.segment, key.part, self.slots.len())]
    }

    /// The resident copy of `key`, uploading it (and evicting LRU blocks) when absent.
    fn resident_block(
        &self,
        slot: &Slot<B>,
        key: BlockKey,
        vectors: &[f32],
        dim: usize,
        metric: Metric,
    ) -> Result<Arc<B::Block>, GpuError> {
        let mut res = slot.resident.lock();
        if let Some(block) = res.blocks.get(&key).cloned() {
            res.lru.touch(&key);
            return Ok(block);
        }
        let bytes = slot.backend.block_bytes(vectors.len() / dim, dim);
        // Evicted blocks still used by an in-flight search stay alive (Arc) until it ends, so the
        // device may briefly hold more than the budget; the budget bounds what stays resident.
        let evicted = res.lru.admit(key, bytes)?;
        for k in evicted {
            res.blocks.remove(&k);
        }
        match slot.backend.upload_block(vectors, dim, metric) {
            Ok(block) => {
                let block = Arc::new(block);
                res.blocks.insert(key, block.clone());
                Ok(block)
            }
            Err(e) => {
                res.lru.remove(&key);
                Err(e)
            }
        }
    }

    /// Top-k of `queries` (row-major, `dim`) against one resident block, tiled to the workspace.
    /// `map_row` turns block rows into segment rows.
    #[allow(clippy::too_many_arguments)]
    fn search_block(
        &self,
        slot: &Slot<B>,
        block: &B::Block,
        rows: usize,
        dim: usize,
        metric: Metric,
        queries: &[f32],
        k: usize,
        mask: Option<&B::Mask>,
        out: &mut [TopK<Neighbor>],
        map_row: impl Fn(u32) -> u32,
    ) -> Result<(), GpuError> {
        let nq = queries.len() / dim;
        let tp = plan::plan_tiles(nq, rows, dim, k, self.workspace)?;
        for qr in plan::tiles(nq, tp.query_batch) {
            let q =
                slot.backend
                    .upload_queries(&queries[qr.start * dim..qr.end * dim], dim, metric)?;
            for rr in plan::tiles(rows, tp.row_tile) {
                let hits = slot.backend.tile_topk(block, rr, &q, k, mask)?;
                if hits.len() != qr.len() {
                    return Err(GpuError::LaunchKernel {
                        ordinal: slot.backend.ordinal(),
                        reason: format!(
                            "top-k returned {} result lists for {} queries",
                            hits.len(),
                            qr.len()
                        ),
                    });
                }
                for (top, list) in out[qr.clone()].iter_mut().zip(hits) {
                    top.extend(list.into_iter().map(|n| Neighbor {
                        row: map_row(n.row),
                        dist: n.dist,
                    }));
                }
            }
        }
        Ok(())
    }
}

fn check_shapes(
    vectors_len: usize,
    dim: usize,
    queries: &[f32],
    k: usize,
    filter: Option<&Bitset>,
    rows: usize,
) -> Result<(), GpuError> {
    let bad = |reason: String| Err(GpuError::InvalidRequest { reason });
    if dim == 0 {
        return bad("dimension is 0".into());
    }
    if !vectors_len.is_multiple_of(dim) {
        return bad(format!(
            "{vectors_len} base floats are not a multiple of dim {dim}"
        ));
    }
    if !queries.len().is_multiple_of(dim) {
        return bad(format!(
            "{} query floats are not a multiple of dim {dim}",
            queries.len()
        ));
    }
    if k > MAX_GPU_TOPK {
        return bad(format!("top-k {k} exceeds the GPU limit {MAX_GPU_TOPK}"));
    }
    if let Some(f) = filter
        && f.len() != rows
    {
        return bad(format!(
            "filter covers {} rows, segment has {rows}",
            f.len()
        ));
    }
    Ok(())
}

impl<B: GpuBackend> GpuSearch for GpuSearcher<B> {
    fn threshold(&self) -> usize {
        self.threshold
    }

    fn search_flat(
        &self,
        segment: u64,
        vectors: &[f32],
        dim: usize,
        metric: Metric,
        queries: &[f32],
        k: usize,
        filter: Option<&Bitset>,
    ) -> Result<Vec<Vec<Neighbor>>, GpuError> {
        let rows = vectors.len() / dim.max(1);
        check_shapes(vectors.len(), dim, queries, k, filter, rows)?;
        let nq = queries.len() / dim;
        if k == 0 || rows == 0 || nq == 0 || filter.is_some_and(|f| f.count_ones() == 0) {
            return Ok(vec![Vec::new(); nq]);
        }
        let key = BlockKey {
            segment,
            part: FLAT_PART,
            metric,
        };
        let slot = self.slot_for(key);
        let block = self.resident_block(slot, key, vectors, dim, metric)?;
        let mask = filter.map(|f| slot.backend.upload_mask(f)).transpose()?;
        let mut tops: Vec<TopK<Neighbor>> = (0..nq).map(|_| TopK::new(k)).collect();
        self.search_block(
            slot,
            &block,
            rows,
            dim,
            metric,
            queries,
            k,
            mask.as_ref(),
            &mut tops,
            |r| r,
        )?;
        Ok(tops.into_iter().map(TopK::into_sorted).collect())
    }

    fn search_ivf(
        &self,
        segment: u64,
        lists: &[IvfList<'_>],
        probes: &[Vec<u32>],
        dim: usize,
        metric: Metric,
        queries: &[f32],
        k: usize,
        filter: Option<&Bitset>,
    ) -> Result<Vec<Vec<Neighbor>>, GpuError> {
        let nq = queries.len() / dim.max(1);
        if probes.len() != nq {
            return Err(GpuError::InvalidRequest {
                reason: format!("{} probe lists for {nq} queries", probes.len()),
            });
        }
        for list in lists {
            check_shapes(list.vectors.len(), dim, queries, k, None, 0)?;
            if list.vectors.len() / dim != list.rows.len() {
                return Err(GpuError::InvalidRequest {
                    reason: format!(
                        "IVF list has {} vectors but {} row ids",
                        list.vectors.len() / dim,
                        list.rows.len()
                    ),
                });
            }
        }
        let mut tops: Vec<TopK<Neighbor>> = (0..nq).map(|_| TopK::new(k)).collect();
        if k == 0 {
            return Ok(vec![Vec::new(); nq]);
        }
        for (list_id, members) in plan::group_queries_by_list(probes) {
            let Some(list) = lists.get(list_id as usize) else {
                return Err(GpuError::InvalidRequest {
                    reason: format!("probe names list {list_id}, the index has {}", lists.len()),
                });
            };
            if list.rows.is_empty() {
                continue;
            }
            let local_mask = match filter {
                Some(f) => {
                    let mut m = Bitset::new_empty(list.rows.len());
                    for (i, &r) in list.rows.iter().enumerate() {
                        if f.contains(r as usize) {
                            m.insert(i);
                        }
                    }
                    if m.count_ones() == 0 {
                        continue;
                    }
                    Some(m)
                }
                None => None,
            };
            let key = BlockKey {
                segment,
                part: list_id,
                metric,
            };
            let slot = self.slot_for(key);
            let block = self.resident_block(slot, key, list.vectors, dim, metric)?;
            let mask = local_mask
                .as_ref()
                .map(|m| slot.backend.upload_mask(m))
                .transpose()?;
            let mut sub: Vec<f32> = Vec::with_capacity(members.len() * dim);
            for &q in &members {
                sub.extend_from_slice(&queries[q as usize * dim..(q as usize + 1) * dim]);
            }
            let mut sub_tops: Vec<TopK<Neighbor>> = members.iter().map(|_| TopK::new(k)).collect();
            self.search_block(
                slot,
                &block,
                list.rows.len(),
                dim,
                metric,
                &sub,
                k,
                mask.as_ref(),
                &mut sub_tops,
                |r| list.rows[r as usize],
            )?;
            for (&q, top) in members.iter().zip(sub_tops) {
                tops[q as usize].extend(top.into_sorted());
            }
        }
        Ok(tops.into_iter().map(TopK::into_sorted).collect())
    }

    fn evict_segment(&self, segment: u64) {
        for slot in &self.slots {
            let mut res = slot.resident.lock();
            for key in res.lru.remove_where(|k| k.segment == segment) {
                res.blocks.remove(&key);
            }
        }
    }

    fn resident(&self) -> Vec<ResidentStats> {
        self.slots
            .iter()
            .map(|s| {
                let res = s.resident.lock();
                ResidentStats {
                    ordinal: s.backend.ordinal(),
                    name: s.backend.name().to_string(),
                    blocks: res.blocks.len(),
                    used_bytes: res.lru.used(),
                    budget_bytes: res.lru.capacity(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::distance;
    use crate::gpu::backend::host::HostBackend;
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::Ordering;

    /// Brute-force oracle: exact top-k by sorting every allowed row.
    fn oracle(
        base: &[f32],
        dim: usize,
        metric: Metric,
        queries: &[f32],
        k: usize,
        filter: Option<&Bitset>,
    ) -> Vec<Vec<Neighbor>> {
        let prep = |v: &[f32]| {
            let mut v = v.to_vec();
            if metric == Metric::COSINE {
                distance::normalize(&mut v);
            }
            v
        };
        queries
            .chunks(dim)
            .map(|q| {
                let q = prep(q);
                let mut all: Vec<Neighbor> = base
                    .chunks(dim)
                    .enumerate()
                    .filter(|(r, _)| filter.is_none_or(|f| f.contains(*r)))
                    .map(|(r, x)| {
                        let x = prep(x);
                        let dist = match metric {
                            Metric::L2 => distance::l2_sq(&q, &x),
                            Metric::IP | Metric::COSINE => -distance::dot(&q, &x),
                        };
                        Neighbor {
                            row: r as u32,
                            dist,
                        }
                    })
                    .collect();
                all.sort_by(Neighbor::cmp_rank);
                all.truncate(k);
                all
            })
            .collect()
    }

    fn random(rng: &mut impl Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn flat_search_tiled_over_rows_and_queries_equals_the_oracle_for_every_metric() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let (rows, dim, nq, k) = (997, 13, 41, 10);
        let base = random(&mut rng, rows * dim);
        let queries = random(&mut rng, nq * dim);
        // Workspace for 3 queries x 250 rows: forces several query batches and row tiles.
        let ws = 3 * plan::workspace_per_query(250, dim, k);
        let searcher = GpuSearcher::new(vec![HostBackend::new(0)], 1 << 30, 1, ws).unwrap();
        for metric in [Metric::L2, Metric::IP, Metric::COSINE] {
            let got = searcher
                .search_flat(1, &base, dim, metric, &queries, k, None)
                .unwrap();
            assert_eq!(
                got,
                oracle(&base, dim, metric, &queries, k, None),
                "{metric}"
            );
        }
        let tiles = searcher
            .backends()
            .next()
            .unwrap()
            .tile_calls
            .load(Ordering::SeqCst);
        assert!(tiles > 3 * 4, "expected many tiles, got {tiles}");
    }

    #[test]
    fn flat_search_honours_the_filter_and_returns_fewer_hits_when_few_rows_are_allowed() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let (rows, dim, k) = (300, 8, 20);
        let base = random(&mut rng, rows * dim);
        let queries = random(&mut rng, 5 * dim);
        let mut filter = Bitset::new_empty(rows);
        for r in (0..rows).step_by(37) {
            filter.insert(r);
        }
        let searcher = GpuSearcher::new(vec![HostBackend::new(0)], 1 << 30, 1, 1 << 20).unwrap();
        let got = searcher
            .search_flat(9, &base, dim, Metric::L2, &queries, k, Some(&filter))
            .unwrap();
        assert_eq!(
            got,
            oracle(&base, dim, Metric::L2, &queries, k, Some(&filter))
        );
        assert!(
            got.iter()
                .all(|hits| hits.len() == 9 && hits.iter().all(|h| h.row % 37 == 0))
        );
        let none = Bitset::new_empty(rows);
        let got = searcher
            .search_flat(9, &base, dim, Metric::L2, &queries, k, Some(&none))
            .unwrap();
        assert!(got.iter().all(Vec::is_empty));
    }

    #[test]
    fn resident_blocks_are_reused_and_evicted_least_recently_used_under_the_budget() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (rows, dim) = (100, 4);
        let segs: Vec<Vec<f32>> = (0..3).map(|_| random(&mut rng, rows * dim)).collect();
        let q = random(&mut rng, dim);
        let block = 4 * rows as u64 * (dim as u64 + 1);
        // Room for two segments.
        let searcher = GpuSearcher::new(vec![HostBackend::new(0)], 2 * block, 1, 1 << 20).unwrap();
        let uploads = || {
            searcher
                .backends()
                .next()
                .unwrap()
                .block_uploads
                .load(Ordering::SeqCst)
        };
        let search = |s: usize| {
            searcher
                .search_flat(s as u64, &segs[s], dim, Metric::L2, &q, 1, None)
                .unwrap()
        };
        search(0);
        search(1);
        search(0);
        assert_eq!(uploads(), 2, "segment 0 stayed resident");
        search(2); // evicts 1, the least recently used
        assert_eq!(uploads(), 3);
        search(0);
        assert_eq!(uploads(), 3, "segment 0 is still resident");
        search(1);
        assert_eq!(uploads(), 4, "segment 1 had been evicted");
        let stats = searcher.resident();
        assert_eq!(stats[0].blocks, 2);
        assert_eq!(stats[0].used_bytes, 2 * block);
        searcher.evict_segment(1);
        assert_eq!(searcher.resident()[0].blocks, 1);
    }

    #[test]
    fn a_segment_larger_than_the_budget_is_refused_with_a_budget_error() {
        let base = vec![0.5f32; 100 * 4];
        let searcher = GpuSearcher::new(vec![HostBackend::new(0)], 100, 1, 1 << 20).unwrap();
        let err = searcher
            .search_flat(1, &base, 4, Metric::L2, &[0.0; 4], 1, None)
            .unwrap_err();
        assert!(matches!(err, GpuError::Budget(_)), "{err}");
        assert_eq!(searcher.resident()[0].used_bytes, 0);
    }

    #[test]
    fn bad_shapes_are_rejected_before_touching_the_device() {
        let searcher = GpuSearcher::new(vec![HostBackend::new(0)], 1 << 20, 1, 1 << 20).unwrap();
        let base = [0.0f32; 40];
        for (b, q, dim, k) in [
            (&base[..39], &[0.0f32; 4][..], 4, 1),
            (&base[..], &[0.0; 3][..], 4, 1),
            (&base[..], &[0.0; 4][..], 0, 1),
            (&base[..], &[0.0; 4][..], 4, MAX_GPU_TOPK + 1),
        ] {
            let err = searcher
                .search_flat(1, b, dim, Metric::L2, q, k, None)
                .unwrap_err();
            assert!(matches!(err, GpuError::InvalidRequest { .. }), "{err}");
        }
        assert_eq!(
            searcher
                .backends()
                .next()
                .unwrap()
                .block_uploads
                .load(Ordering::SeqCst),
            0
        );
    }

    #[test]
    fn blocks_spread_over_several_devices_and_results_do_not_depend_on_the_device_count() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let (rows, dim, k) = (200, 6, 5);
        let q = random(&mut rng, 7 * dim);
        let one = GpuSearcher::new(vec![HostBackend::new(0)], 1 << 30, 1, 1 << 20).unwrap();
        let two = GpuSearcher::new(
            vec![HostBackend::new(0), HostBackend::new(1)],
            1 << 30,
            1,
            1 << 20,
        )
        .unwrap();
        for seg in 0..20u64 {
            let base = random(&mut rng, rows * dim);
            assert_eq!(
                one.search_flat(seg, &base, dim, Metric::IP, &q, k, None)
                    .unwrap(),
                two.search_flat(seg, &base, dim, Metric::IP, &q, k, None)
                    .unwrap()
            );
        }
        let blocks: Vec<usize> = two.resident().iter().map(|s| s.blocks).collect();
        assert!(
            blocks.iter().all(|&b| b > 0) && blocks.iter().sum::<usize>() == 20,
            "{blocks:?}"
        );
    }

    #[test]
    fn ivf_list_scan_equals_brute_force_over_the_probed_lists() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
        let (rows, dim, nlist, nq, k) = (500, 8, 7, 23, 10);
        let base = random(&mut rng, rows * dim);
        // Assign rows to lists at random; keep list vectors contiguous as an IVF index does.
        let assign: Vec<u32> = (0..rows)
            .map(|_| rng.random_range(0..nlist as u32))
            .collect();
        let mut list_rows: Vec<Vec<u32>> = vec![Vec::new(); nlist];
        for (r, &l) in assign.iter().enumerate() {
            list_rows[l as usize].push(r as u32);
        }
        let list_vecs: Vec<Vec<f32>> = list_rows
            .iter()
            .map(|rs| {
                rs.iter()
                    .flat_map(|&r| base[r as usize * dim..(r as usize + 1) * dim].to_vec())
                    .collect()
            })
            .collect();
        let lists: Vec<IvfList> = (0..nlist)
            .map(|l| IvfList {
                vectors: &list_vecs[l],
                rows: &list_rows[l],
            })
            .collect();
        let queries = random(&mut rng, nq * dim);
        let probes: Vec<Vec<u32>> = (0..nq)
            .map(|_| (0..3).map(|_| rng.random_range(0..nlist as u32)).collect())
            .collect();
        let mut filter = Bitset::new_full(rows);
        for r in (0..rows).step_by(3) {
            filter.remove(r);
        }
        let ws = 2 * plan::workspace_per_query(30, dim, k);
        let searcher = GpuSearcher::new(
            vec![HostBackend::new(0), HostBackend::new(1)],
            1 << 30,
            1,
            ws,
        )
        .unwrap();
        for metric in [Metric::L2, Metric::COSINE] {
            let got = searcher
                .search_ivf(5, &lists, &probes, dim, metric, &queries, k, Some(&filter))
                .unwrap();
            for (qi, hits) in got.iter().enumerate() {
                let mut allowed = Bitset::new_empty(rows);
                for &l in &probes[qi] {
                    for &r in &list_rows[l as usize] {
                        if filter.contains(r as usize) {
                            allowed.insert(r as usize);
                        }
                    }
                }
                let expect = oracle(
                    &base,
                    dim,
                    metric,
                    &queries[qi * dim..(qi + 1) * dim],
                    k,
                    Some(&allowed),
                );
                assert_eq!(hits, &expect[0], "{metric} query {qi}");
            }
        }
        let bad = vec![vec![nlist as u32]; nq];
        assert!(matches!(
            searcher.search_ivf(5, &lists, &bad, dim, Metric::L2, &queries, k, None),
            Err(GpuError::InvalidRequest { .. })
        ));
    }
}
