//! The small trait every GPU call goes through. The CUDA implementation lives in
//! [`crate::gpu::cuda`]; the searcher ([`crate::gpu::search`]) only sees this trait, so its
//! tiling, budget and merge logic are tested in CI against a host implementation of the same
//! contract (in the tests below), without CUDA.

use crate::core::bitset::Bitset;
use crate::core::types::{Metric, Neighbor};
use crate::gpu::GpuError;
use std::ops::Range;

/// Device operations of one GPU.
///
/// Contract for [`GpuBackend::tile_topk`]: for every uploaded query `q` (in upload order) it
/// returns at most `k` hits over the block rows in `rows` whose mask bit is set (all rows when
/// no mask), sorted by [`Neighbor::cmp_rank`]; `Neighbor::row` is the *block* row (not
/// tile-relative); `dist` is the internal distance (squared L2, or negated inner product of the
/// vectors, normalised first for COSINE). Ties at the k-th distance may pick any of the tied rows.
pub trait GpuBackend: Send + Sync + 'static {
    /// Base vectors resident on the device (a FLAT segment or one IVF list).
    type Block: Send + Sync + 'static;
    /// A batch of queries on the device.
    type Queries;
    /// Allowed-row bits for a block.
    type Mask;

    /// CUDA ordinal.
    fn ordinal(&self) -> u32;
    /// Human-readable device name.
    fn name(&self) -> &str;
    /// Device bytes a block of `rows x dim` occupies (charged to the memory budget).
    fn block_bytes(&self, rows: usize, dim: usize) -> u64 {
        4 * rows as u64 * (dim as u64 + 1)
    }
    /// Copy `vectors` (row-major, `dim` per row) to the device for searching with `metric`.
    fn upload_block(
        &self,
        vectors: &[f32],
        dim: usize,
        metric: Metric,
    ) -> Result<Self::Block, GpuError>;
    /// Copy a query batch to the device.
    fn upload_queries(
        &self,
        queries: &[f32],
        dim: usize,
        metric: Metric,
    ) -> Result<Self::Queries, GpuError>;
    /// Copy a row filter to the device (`allowed.len()` = the block's rows).
    fn upload_mask(&self, allowed: &Bitset) -> Result<Self::Mask, GpuError>;
    /// Distances of all queries to `rows` of `block` and their top-`k` (see the trait docs).
    fn tile_topk(
        &self,
        block: &Self::Block,
        rows: Range<usize>,
        queries: &Self::Queries,
        k: usize,
        mask: Option<&Self::Mask>,
    ) -> Result<Vec<Vec<Neighbor>>, GpuError>;
}

/// Host implementation of [`GpuBackend`] for tests of the orchestration logic: it keeps the
/// "device" buffers in RAM and counts uploads so tests can see residency and eviction.
#[cfg(test)]
pub(crate) mod host {
    use super::*;
    use crate::core::distance;
    use crate::core::topk::TopK;
    use std::sync::atomic::{AtomicUsize, Ordering};

    pub struct HostBlock {
        pub vectors: Vec<f32>,
        pub dim: usize,
        pub metric: Metric,
    }

    pub struct HostQueries {
        data: Vec<f32>,
        dim: usize,
        metric: Metric,
    }

    pub struct HostBackend {
        pub ordinal: u32,
        pub block_uploads: AtomicUsize,
        pub tile_calls: AtomicUsize,
        /// When set, `tile_topk` fails (to test fallbacks).
        pub fail_search: bool,
    }

    impl HostBackend {
        pub fn new(ordinal: u32) -> Self {
            Self {
                ordinal,
                block_uploads: AtomicUsize::new(0),
                tile_calls: AtomicUsize::new(0),
                fail_search: false,
            }
        }
    }

    pub fn prepare(v: &[f32], dim: usize, metric: Metric) -> Vec<f32> {
        let mut out = v.to_vec();
        if metric == Metric::COSINE {
            for row in out.chunks_mut(dim) {
                distance::normalize(row);
            }
        }
        out
    }

    impl GpuBackend for HostBackend {
        type Block = HostBlock;
        type Queries = HostQueries;
        type Mask = Bitset;

        fn ordinal(&self) -> u32 {
            self.ordinal
        }
        fn name(&self) -> &str {
            "host"
        }
        fn upload_block(
            &self,
            vectors: &[f32],
            dim: usize,
            metric: Metric,
        ) -> Result<HostBlock, GpuError> {
            self.block_uploads.fetch_add(1, Ordering::SeqCst);
            Ok(HostBlock {
                vectors: prepare(vectors, dim, metric),
                dim,
                metric,
            })
        }
        fn upload_queries(
            &self,
            queries: &[f32],
            dim: usize,
            metric: Metric,
        ) -> Result<HostQueries, GpuError> {
            Ok(HostQueries {
                data: prepare(queries, dim, metric),
                dim,
                metric,
            })
        }
        fn upload_mask(&self, allowed: &Bitset) -> Result<Bitset, GpuError> {
            Ok(allowed.clone())
        }
        fn tile_topk(
            &self,
            block: &HostBlock,
            rows: Range<usize>,
            queries: &HostQueries,
            k: usize,
            mask: Option<&Bitset>,
        ) -> Result<Vec<Vec<Neighbor>>, GpuError> {
            self.tile_calls.fetch_add(1, Ordering::SeqCst);
            if self.fail_search {
                return Err(GpuError::LaunchKernel {
                    ordinal: self.ordinal,
                    reason: "injected failure".into(),
                });
            }
            assert_eq!(block.dim, queries.dim);
            assert_eq!(block.metric, queries.metric);
            let dim = block.dim;
            Ok(queries
                .data
                .chunks(dim)
                .map(|q| {
                    let mut top = TopK::new(k);
                    for r in rows.clone() {
                        if mask.is_some_and(|m| !m.contains(r)) {
                            continue;
                        }
                        let x = &block.vectors[r * dim..(r + 1) * dim];
                        let dist = match block.metric {
                            Metric::L2 => distance::l2_sq(q, x),
                            Metric::IP | Metric::COSINE => -distance::dot(q, x),
                        };
                        top.push(Neighbor {
                            row: r as u32,
                            dist,
                        });
                    }
                    top.into_sorted()
                })
                .collect())
        }
    }
}
