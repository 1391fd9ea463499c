//! The pure planning half of GPU search: threshold routing, tiling of query batches and base
//! rows to fit the device workspace (per-tile results merge through the core's one `TopK`),
//! grouping IVF queries by probed list, and placing blocks on devices. No CUDA, no I/O: all
//! unit-tested in CI.

use std::ops::Range;

/// Where a query batch runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Gpu,
    /// Not enough queries to amortise the GPU's fixed costs (Milvus's `gpu_search_threshold`).
    CpuBelowThreshold,
    /// No usable GPU in this process.
    CpuNoGpu,
}

/// Route a batch of `nq` queries: the GPU only when one is usable and `nq >= threshold`.
pub fn route(nq: usize, threshold: usize, gpu_ready: bool) -> Route {
    if !gpu_ready {
        Route::CpuNoGpu
    } else if nq < threshold {
        Route::CpuBelowThreshold
    } else {
        Route::Gpu
    }
}

/// How one search is cut into device-sized pieces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TilePlan {
    /// Queries uploaded and searched together.
    pub query_batch: usize,
    /// Base rows per distance tile (one GEMM + one top-k launch).
    pub row_tile: usize,
}

/// The workspace cannot hold even one query against one minimal tile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "GPU workspace of {workspace} bytes is too small for dim {dim}, k {k} (needs at least {needed})"
)]
pub struct WorkspaceTooSmall {
    pub workspace: u64,
    pub dim: usize,
    pub k: usize,
    pub needed: u64,
}

/// Largest row tile: keeps one top-k launch's rows addressable with 32-bit ints and GEMM
/// dimensions inside cuBLAS's `int` arguments.
pub const MAX_ROW_TILE: usize = 1 << 22;

/// Bytes of workspace one query needs for a tile of `row_tile` rows: its vector, its distance
/// row, and its k (row, dist) outputs plus a count.
pub fn workspace_per_query(row_tile: usize, dim: usize, k: usize) -> u64 {
    4 * (dim as u64 + row_tile as u64 + 2 * k as u64 + 1)
}

/// Choose tile sizes for `nq` queries over `rows` base rows of `dim` dims, top-`k`, within
/// `workspace` bytes.
///
/// Guarantees: `1 <= query_batch <= max(nq, 1)`, `1 <= row_tile <= max(rows, 1)`,
/// `row_tile <= MAX_ROW_TILE`, and `query_batch * workspace_per_query(row_tile, dim, k) <= workspace`.
/// Rows are preferred over queries (whole segment in one tile when it fits with at least one query),
/// because every extra row tile adds a host-side merge.
///
/// Errors: `WorkspaceTooSmall` when not even one query with a one-row tile fits.
pub fn plan_tiles(
    nq: usize,
    rows: usize,
    dim: usize,
    k: usize,
    workspace: u64,
) -> Result<TilePlan, WorkspaceTooSmall> {
    let nq = nq.max(1);
    let rows = rows.max(1);
    let needed = workspace_per_query(1, dim, k);
    if needed > workspace {
        return Err(WorkspaceTooSmall {
            workspace,
            dim,
            k,
            needed,
        });
    }
    // Rows one query can afford, capped by the segment and by MAX_ROW_TILE.
    let fixed = 4 * (dim as u64 + 2 * k as u64 + 1);
    let affordable_rows = ((workspace - fixed) / 4).min(u64::MAX / 8) as usize;
    let row_tile = rows.min(MAX_ROW_TILE).min(affordable_rows).max(1);
    let per_query = workspace_per_query(row_tile, dim, k);
    let query_batch = ((workspace / per_query) as usize).clamp(1, nq);
    Ok(TilePlan {
        query_batch,
        row_tile,
    })
}

/// Split `0..n` into consecutive ranges of at most `tile` (the last may be shorter).
pub fn tiles(n: usize, tile: usize) -> impl Iterator<Item = Range<usize>> {
    let tile = tile.max(1);
    (0..n.div_ceil(tile)).map(move |i| i * tile..((i + 1) * tile).min(n))
}

/// IVF list scan work: for each probed list, the queries that probe it.
///
/// `probes[q]` holds the list ids query `q` probes. Returns `(list, queries)` pairs sorted by list
/// id, each query list ascending and without duplicates (a list probed twice by one query is scanned
/// once for it).
pub fn group_queries_by_list(probes: &[Vec<u32>]) -> Vec<(u32, Vec<u32>)> {
    let mut pairs: Vec<(u32, u32)> = probes
        .iter()
        .enumerate()
        .flat_map(|(q, lists)| lists.iter().map(move |&l| (l, q as u32)))
        .collect();
    pairs.sort_unstable();
    pairs.dedup();
    let mut out: Vec<(u32, Vec<u32>)> = Vec::new();
    for (list, q) in pairs {
        match out.last_mut() {
            Some((l, qs)) if *l == list => qs.push(q),
            _ => out.push((list, vec![q])),
        }
    }
    out
}

/// Stable device placement for a block: the same block always lands on the same device, so its
/// resident copy is reused. (FNV-1a over the key; `devices > 0`.)
pub fn device_for(segment: u64, part: u32, devices: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in segment.to_le_bytes().into_iter().chain(part.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % devices.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::topk::TopK;
    use crate::core::types::Neighbor;
    use rand::{Rng, SeedableRng};

    #[test]
    fn routing_sends_small_batches_and_gpu_less_processes_to_the_cpu() {
        assert_eq!(route(999, 1000, true), Route::CpuBelowThreshold);
        assert_eq!(route(1000, 1000, true), Route::Gpu);
        assert_eq!(route(1, 0, true), Route::Gpu);
        assert_eq!(route(100_000, 1000, false), Route::CpuNoGpu);
    }

    #[test]
    fn tile_plan_fits_workspace_and_covers_whole_segment_when_possible() {
        // 1M x 128, top-100, 1 GiB: the whole segment is one tile, 255 queries at once.
        let p = plan_tiles(10_000, 1_000_000, 128, 100, 1 << 30).unwrap();
        assert_eq!(p.row_tile, 1_000_000);
        assert!(p.query_batch as u64 * workspace_per_query(p.row_tile, 128, 100) <= 1 << 30);
        assert!((p.query_batch + 1) as u64 * workspace_per_query(p.row_tile, 128, 100) > 1 << 30);
        // Few queries: the batch is never larger than the request.
        assert_eq!(plan_tiles(3, 1000, 16, 10, 1 << 30).unwrap().query_batch, 3);
    }

    #[test]
    fn tile_plan_splits_rows_when_one_query_cannot_hold_the_segment() {
        let ws = 4 * (8 + 2 * 10 + 1) + 4 * 1000; // room for exactly 1000 rows for one query
        let p = plan_tiles(50, 1_000_000, 8, 10, ws).unwrap();
        assert_eq!(
            p,
            TilePlan {
                query_batch: 1,
                row_tile: 1000
            }
        );
        let e = plan_tiles(1, 10, 1000, 10, 100).unwrap_err();
        assert_eq!(e.needed, workspace_per_query(1, 1000, 10));
    }

    #[test]
    fn tile_plan_invariants_hold_for_random_shapes() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..2000 {
            let nq = rng.random_range(0..20_000);
            let rows = rng.random_range(0..5_000_000);
            let dim = rng.random_range(1..2048);
            let k = rng.random_range(1..1024);
            let ws = rng.random_range(1..(4u64 << 30));
            match plan_tiles(nq, rows, dim, k, ws) {
                Ok(p) => {
                    assert!(p.query_batch >= 1 && p.query_batch <= nq.max(1));
                    assert!(
                        p.row_tile >= 1 && p.row_tile <= rows.max(1) && p.row_tile <= MAX_ROW_TILE
                    );
                    assert!(p.query_batch as u64 * workspace_per_query(p.row_tile, dim, k) <= ws);
                }
                Err(e) => assert!(workspace_per_query(1, dim, k) > ws, "{e}"),
            }
        }
    }

    #[test]
    fn tiles_cover_the_range_exactly_once_in_order() {
        let t: Vec<_> = tiles(10, 4).collect();
        assert_eq!(t, vec![0..4, 4..8, 8..10]);
        assert_eq!(tiles(0, 4).count(), 0);
        assert_eq!(tiles(8, 4).collect::<Vec<_>>(), vec![0..4, 4..8]);
    }

    fn n(row: u32, dist: f32) -> Neighbor {
        Neighbor { row, dist }
    }

    #[test]
    fn topk_equals_sort_and_truncate_including_ties() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for _ in 0..200 {
            let k = rng.random_range(0..50);
            let items: Vec<Neighbor> = (0..rng.random_range(0..300))
                .map(|i| n(i, rng.random_range(0..20) as f32 * 0.5))
                .collect();
            let mut top = TopK::new(k);
            top.extend(items.iter().copied());
            let mut expect = items.clone();
            expect.sort_by(Neighbor::cmp_rank);
            expect.truncate(k);
            assert_eq!(top.into_sorted(), expect);
        }
    }

    #[test]
    fn merging_tile_results_gives_the_global_topk() {
        // Per-tile top-k of a split row range, merged, equals the top-k of the whole range.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let dists: Vec<f32> = (0..1000).map(|_| rng.random::<f32>()).collect();
        let k = 17;
        let mut global = TopK::new(k);
        for r in tiles(dists.len(), 64) {
            let mut tile = TopK::new(k);
            tile.extend(r.map(|i| n(i as u32, dists[i])));
            global.extend(tile.into_sorted());
        }
        let mut expect: Vec<Neighbor> = dists
            .iter()
            .enumerate()
            .map(|(i, &d)| n(i as u32, d))
            .collect();
        expect.sort_by(Neighbor::cmp_rank);
        expect.truncate(k);
        assert_eq!(global.into_sorted(), expect);
    }

    #[test]
    fn ivf_grouping_lists_each_probing_query_once_sorted() {
        let probes = vec![vec![3, 1], vec![1], vec![], vec![3, 3, 0]];
        let g = group_queries_by_list(&probes);
        assert_eq!(g, vec![(0, vec![3]), (1, vec![0, 1]), (3, vec![0, 3])]);
    }

    #[test]
    fn device_placement_is_stable_and_spreads_blocks() {
        let mut counts = [0usize; 2];
        for seg in 0..1000u64 {
            let d = device_for(seg, u32::MAX, 2);
            assert_eq!(d, device_for(seg, u32::MAX, 2));
            counts[d] += 1;
        }
        assert!(counts[0] > 400 && counts[1] > 400, "{counts:?}");
        assert_eq!(device_for(42, 0, 1), 0);
    }
}
