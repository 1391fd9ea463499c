//! The reader's GPU hook: [`GpuOffload`] implements the storage core's [`FlatOffload`] over a
//! [`GpuSearch`], so a `SearchShard` scans each FLAT segment on the GPU when the query batch
//! reaches `--gpu-search-threshold`, and on the CPU otherwise. A GPU error (device, memory
//! budget, a result that fails the shape check) never reaches the client: that segment is
//! answered on the CPU, counted in `shoal_gpu_search_fallbacks_total` and logged at most once a
//! minute. Filters and deletes go to the GPU as the same allow-bitset the CPU index gets.
//!
//! It also owns the mapping from a replica's segment identity ([`SegmentKey`]: collection,
//! segment id, manifest checksum; segment ids are only unique inside a collection) to the
//! searcher's resident-block id, so the reader can drop the device copies of segments it no
//! longer serves ([`GpuOffload::forget_segment`]).
//!
//! Depends on `core` (the hook, bitset, types) and the GPU searcher; no API or role code.

use crate::core::bitset::Bitset;
use crate::core::storage::collection::{FlatOffload, SegmentKey};
use crate::core::types::{Metric, Neighbor};
use crate::gpu::GpuError;
use crate::gpu::plan::{self, Route};
use crate::gpu::search::{GpuSearch, MAX_GPU_TOPK};
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A repeated GPU failure is logged at most this often (every one is counted).
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Where a batch of `nq` queries at top-`k` runs: the GPU when `nq >= threshold` and `k` is
/// within what the GPU top-k serves, else the CPU.
pub fn route(nq: usize, k: usize, threshold: usize) -> Route {
    if k > MAX_GPU_TOPK {
        return Route::CpuBelowThreshold;
    }
    plan::route(nq, threshold, true)
}

/// The searcher's block id of a segment: FNV-1a over (collection, segment, manifest checksum),
/// so equal ids mean equal vectors (up to a 64-bit hash collision).
pub fn gpu_segment_id(key: &SegmentKey) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = key
        .collection_id
        .to_le_bytes()
        .into_iter()
        .chain(key.segment.to_le_bytes())
        .chain(key.manifest_crc.to_le_bytes());
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

/// Counters of the offload, exported as `shoal_gpu_segment_searches_total{route}` and
/// `shoal_gpu_search_fallbacks_total`.
#[derive(Debug, Clone, Default)]
struct OffloadMetrics {
    segment_searches: Family<RouteLabels, Counter>,
    fallbacks: Counter,
}

/// The reader's GPU side of `SearchShard` (see the module docs).
pub struct GpuOffload {
    gpu: Arc<dyn GpuSearch>,
    metrics: OffloadMetrics,
    last_warn: Mutex<Option<Instant>>,
    suppressed_warnings: AtomicU64,
    /// Block ids handed to the searcher per (collection, segment), for eviction.
    blocks: Mutex<HashMap<(i64, u64), BTreeSet<u64>>>,
}

impl GpuOffload {
    pub fn new(gpu: Arc<dyn GpuSearch>) -> Self {
        Self {
            gpu,
            metrics: OffloadMetrics::default(),
            last_warn: Mutex::new(None),
            suppressed_warnings: AtomicU64::new(0),
            blocks: Mutex::new(HashMap::new()),
        }
    }

    /// Batches smaller than this run on the CPU.
    pub fn threshold(&self) -> usize {
        self.gpu.threshold()
    }

    /// Register the counters into `registry` (as `shoal_gpu_*`).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("shoal_gpu");
        r.register(
            "segment_searches",
            "Sealed FLAT segment scans of SearchShard by where they ran: gpu, cpu_below_threshold (batch under --gpu-search-threshold or top-k above the GPU limit), cpu_fallback (the GPU failed)",
            self.metrics.segment_searches.clone(),
        );
        r.register(
            "search_fallbacks",
            "GPU segment scans that failed and were answered on the CPU",
            self.metrics.fallbacks.clone(),
        );
    }

    /// GPU failures answered on the CPU since start.
    pub fn fallbacks(&self) -> u64 {
        self.metrics.fallbacks.get()
    }

    /// Segment scans answered on the GPU since start.
    pub fn gpu_searches(&self) -> u64 {
        self.count("gpu")
    }

    /// Segment scans sent to the CPU because the batch was below the threshold, since start.
    pub fn below_threshold(&self) -> u64 {
        self.count("cpu_below_threshold")
    }

    fn count(&self, route: &'static str) -> u64 {
        self.metrics
            .segment_searches
            .get_or_create(&RouteLabels { route })
            .get()
    }

    /// Drop the device copies of a segment the reader no longer serves (compacted away, or its
    /// collection dropped). A later search of the same key uploads it again.
    pub fn forget_segment(&self, collection_id: i64, segment: u64) {
        let ids = self.blocks.lock().remove(&(collection_id, segment));
        for id in ids.into_iter().flatten() {
            self.gpu.evict_segment(id);
        }
    }

    fn remember(&self, key: &SegmentKey, id: u64) {
        let mut blocks = self.blocks.lock();
        blocks
            .entry((key.collection_id, key.segment))
            .or_default()
            .insert(id);
    }

    fn fall_back(&self, key: &SegmentKey, e: &GpuError) {
        self.metrics.fallbacks.inc();
        self.metrics
            .segment_searches
            .get_or_create(&RouteLabels {
                route: "cpu_fallback",
            })
            .inc();
        let now = Instant::now();
        let mut last = self.last_warn.lock();
        if last.is_some_and(|t| now.duration_since(t) < WARN_EVERY) {
            self.suppressed_warnings.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(now);
        let suppressed = self.suppressed_warnings.swap(0, Ordering::Relaxed);
        tracing::warn!(
            collection_id = key.collection_id,
            segment = key.segment,
            error = %e,
            suppressed_since_last_warning = suppressed,
            "GPU search failed; answering on the CPU (shoal_gpu_search_fallbacks_total counts every fallback, this warning repeats at most once a minute)"
        );
    }
}

/// The GPU's answer must have the shape the CPU index's has before the merge trusts it:
/// one list per query, at most `k` hits, sorted, rows inside the segment and allowed.
fn check_hits(
    hits: &[Vec<Neighbor>],
    nq: usize,
    rows: usize,
    k: usize,
    allowed: Option<&Bitset>,
) -> Result<(), GpuError> {
    let bad = |reason: String| Err(GpuError::InvalidResult { reason });
    if hits.len() != nq {
        return bad(format!("{} result lists for {nq} queries", hits.len()));
    }
    for list in hits {
        if list.len() > k {
            return bad(format!("{} hits for top-{k}", list.len()));
        }
        if let Some(h) = list.iter().find(|h| h.row as usize >= rows) {
            return bad(format!("row {} outside a {rows}-row segment", h.row));
        }
        if let Some(h) = allowed.and_then(|a| list.iter().find(|h| !a.contains(h.row as usize))) {
            return bad(format!("row {} is filtered out or deleted", h.row));
        }
        if list
            .windows(2)
            .any(|w| w[0].dist.total_cmp(&w[1].dist).is_gt())
        {
            return bad("hits are not sorted by distance".into());
        }
    }
    Ok(())
}

impl FlatOffload for GpuOffload {
    fn search_flat(
        &self,
        key: SegmentKey,
        vectors: &[f32],
        dim: usize,
        metric: Metric,
        queries: &[f32],
        k: usize,
        allowed: Option<&Bitset>,
    ) -> Option<Vec<Vec<Neighbor>>> {
        let nq = queries.len() / dim.max(1);
        if route(nq, k, self.gpu.threshold()) != Route::Gpu {
            self.metrics
                .segment_searches
                .get_or_create(&RouteLabels {
                    route: "cpu_below_threshold",
                })
                .inc();
            return None;
        }
        let id = gpu_segment_id(&key);
        self.remember(&key, id);
        let rows = vectors.len() / dim.max(1);
        let res = self
            .gpu
            .search_flat(id, vectors, dim, metric, queries, k, allowed)
            .and_then(|hits| check_hits(&hits, nq, rows, k, allowed).map(|()| hits));
        match res {
            Ok(hits) => {
                self.metrics
                    .segment_searches
                    .get_or_create(&RouteLabels { route: "gpu" })
                    .inc();
                Some(hits)
            }
            Err(e) => {
                self.fall_back(&key, &e);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::backend::host::HostBackend;
    use crate::gpu::search::{GpuSearcher, IvfList, ResidentStats};
    use rand::{Rng, SeedableRng};

    fn key(segment: u64) -> SegmentKey {
        SegmentKey {
            collection_id: 7,
            segment,
            manifest_crc: 0xdead_beef,
        }
    }

    fn random(rng: &mut impl Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn host(threshold: usize, fail: bool) -> Arc<GpuSearcher<HostBackend>> {
        let mut b = HostBackend::new(0);
        b.fail_search = fail;
        Arc::new(GpuSearcher::new(vec![b], 1 << 30, threshold, 1 << 20).expect("host searcher"))
    }

    fn tile_calls(s: &GpuSearcher<HostBackend>) -> usize {
        s.backends()
            .map(|b| b.tile_calls.load(Ordering::SeqCst))
            .sum()
    }

    fn metrics_text(o: &GpuOffload) -> String {
        let mut reg = Registry::default();
        o.register(&mut reg);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).expect("encode");
        text
    }

    #[test]
    fn routing_needs_the_threshold_and_a_top_k_the_gpu_serves() {
        assert_eq!(route(3, 10, 4), Route::CpuBelowThreshold);
        assert_eq!(route(4, 10, 4), Route::Gpu);
        assert_eq!(route(1, 10, 0), Route::Gpu);
        assert_eq!(route(10_000, MAX_GPU_TOPK, 4), Route::Gpu);
        assert_eq!(route(10_000, MAX_GPU_TOPK + 1, 4), Route::CpuBelowThreshold);
    }

    #[test]
    fn batches_below_the_threshold_never_touch_the_gpu() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let (rows, dim) = (50, 4);
        let base = random(&mut rng, rows * dim);
        let s = host(4, false);
        let o = GpuOffload::new(s.clone());
        let q3 = random(&mut rng, 3 * dim);
        assert!(
            o.search_flat(key(1), &base, dim, Metric::L2, &q3, 5, None)
                .is_none()
        );
        assert_eq!(tile_calls(&s), 0);
        assert_eq!(
            (o.below_threshold(), o.gpu_searches(), o.fallbacks()),
            (1, 0, 0)
        );
        let q4 = random(&mut rng, 4 * dim);
        let hits = o
            .search_flat(key(1), &base, dim, Metric::L2, &q4, 5, None)
            .expect("4 queries reach the threshold");
        assert_eq!(hits.len(), 4);
        assert!(tile_calls(&s) > 0);
        assert_eq!(o.gpu_searches(), 1);
    }

    #[test]
    fn a_failing_gpu_is_counted_as_a_fallback_and_answered_by_the_caller() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let (rows, dim) = (40, 8);
        let base = random(&mut rng, rows * dim);
        let q = random(&mut rng, 2 * dim);
        let o = GpuOffload::new(host(1, true));
        for _ in 0..3 {
            assert!(
                o.search_flat(key(2), &base, dim, Metric::IP, &q, 3, None)
                    .is_none()
            );
        }
        assert_eq!(o.fallbacks(), 3);
        assert_eq!(o.gpu_searches(), 0);
        let text = metrics_text(&o);
        assert!(
            text.contains("shoal_gpu_search_fallbacks_total 3"),
            "{text}"
        );
        assert!(
            text.contains("shoal_gpu_segment_searches_total{route=\"cpu_fallback\"} 3"),
            "{text}"
        );
        // A segment over the memory budget is a fallback too, not an error.
        let tiny = GpuSearcher::new(vec![HostBackend::new(0)], 16, 1, 1 << 20).expect("searcher");
        let o = GpuOffload::new(Arc::new(tiny));
        assert!(
            o.search_flat(key(3), &base, dim, Metric::L2, &q, 3, None)
                .is_none()
        );
        assert_eq!(o.fallbacks(), 1);
    }

    /// A device that answers with rows the segment does not have.
    struct Garbage;
    impl GpuSearch for Garbage {
        fn threshold(&self) -> usize {
            1
        }
        fn search_flat(
            &self,
            _: u64,
            _: &[f32],
            _: usize,
            _: Metric,
            queries: &[f32],
            _: usize,
            _: Option<&Bitset>,
        ) -> Result<Vec<Vec<Neighbor>>, GpuError> {
            Ok(vec![
                vec![Neighbor {
                    row: 9999,
                    dist: 0.0
                }];
                queries.len() / 2
            ])
        }
        fn search_ivf(
            &self,
            _: u64,
            _: &[IvfList<'_>],
            _: &[Vec<u32>],
            _: usize,
            _: Metric,
            _: &[f32],
            _: usize,
            _: Option<&Bitset>,
        ) -> Result<Vec<Vec<Neighbor>>, GpuError> {
            Ok(Vec::new())
        }
        fn evict_segment(&self, _: u64) {}
        fn resident(&self) -> Vec<ResidentStats> {
            Vec::new()
        }
    }

    #[test]
    fn a_result_with_rows_outside_the_segment_or_filtered_out_is_refused() {
        let o = GpuOffload::new(Arc::new(Garbage));
        assert!(
            o.search_flat(key(1), &[0.0; 20], 2, Metric::L2, &[0.0; 4], 1, None)
                .is_none()
        );
        assert_eq!(o.fallbacks(), 1);
        let n = |row, dist| Neighbor { row, dist };
        let mut allowed = Bitset::new_empty(10);
        allowed.insert(3);
        assert!(check_hits(&[vec![n(3, 0.1)]], 1, 10, 1, Some(&allowed)).is_ok());
        for (hits, nq, k) in [
            (vec![vec![n(4, 0.1)]], 1, 1),            // filtered out
            (vec![vec![n(3, 0.1)]], 2, 1),            // a list missing
            (vec![vec![n(3, 0.1), n(3, 0.2)]], 1, 1), // more than k
            (vec![vec![n(3, 0.2), n(3, 0.1)]], 1, 2), // unsorted
        ] {
            assert!(
                matches!(
                    check_hits(&hits, nq, 10, k, Some(&allowed)),
                    Err(GpuError::InvalidResult { .. })
                ),
                "{hits:?}"
            );
        }
    }

    #[test]
    fn segments_of_different_collections_or_data_get_different_blocks_and_forgetting_evicts() {
        let a = key(1);
        let b = SegmentKey {
            collection_id: 8,
            ..a
        };
        let c = SegmentKey {
            manifest_crc: 1,
            ..a
        };
        assert_ne!(gpu_segment_id(&a), gpu_segment_id(&b));
        assert_ne!(gpu_segment_id(&a), gpu_segment_id(&c));
        assert_eq!(gpu_segment_id(&a), gpu_segment_id(&key(1)));

        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let dim = 4;
        let s = host(1, false);
        let o = GpuOffload::new(s.clone());
        let q = random(&mut rng, dim);
        for k in [a, b, c] {
            let base = random(&mut rng, 30 * dim);
            assert!(
                o.search_flat(k, &base, dim, Metric::L2, &q, 2, None)
                    .is_some()
            );
        }
        assert_eq!(s.resident()[0].blocks, 3);
        // Segment 1 of collection 7 had two versions (crc); both go, collection 8's stays.
        o.forget_segment(7, 1);
        assert_eq!(s.resident()[0].blocks, 1);
        o.forget_segment(8, 1);
        assert_eq!(s.resident()[0].blocks, 0);
    }
}
