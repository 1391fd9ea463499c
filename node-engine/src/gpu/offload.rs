//! The reader's GPU hook: [`GpuOffload`] implements the storage core's [`FlatOffload`] over a
//! [`GpuSearch`], so a `SearchShard` scans each FLAT segment, and the probed lists of each
//! IVF_FLAT segment, on the GPU when the query batch reaches `--gpu-search-threshold`, and on the
//! CPU otherwise. For IVF_FLAT the coarse step stays on the CPU and is the index's own
//! ([`IvfIndex::probe_lists`]), so the GPU scans exactly the lists the CPU search would at the
//! same `nprobe` and finds the same rows. A GPU error (device, memory budget, a result that
//! fails the shape check) never reaches the client: that segment is answered on the CPU,
//! counted in `shoal_gpu_search_fallbacks_total` and logged at most once a minute. Filters and
//! deletes go to the GPU as the same allow-bitset the CPU index gets.
//!
//! It also owns the mapping from a replica's segment identity ([`SegmentKey`]: collection,
//! segment id, manifest checksum; segment ids are only unique inside a collection; plus the
//! index file's checksum for IVF lists) to the searcher's resident-block id, so the reader can
//! drop the device copies of segments it no longer serves ([`GpuOffload::forget_segment`]).
//!
//! Depends on `core` (the hook, bitset, types) and the GPU searcher; no API or role code.

use crate::core::bitset::Bitset;
use crate::core::index::SearchParams;
use crate::core::index::VectorIndexRead;
use crate::core::index::ivf::IvfIndex;
use crate::core::storage::collection::{FlatOffload, SegmentKey};
use crate::core::types::{Metric, Neighbor};
use crate::gpu::GpuError;
use crate::gpu::plan::{self, Route};
use crate::gpu::search::{GpuSearch, IvfList, MAX_GPU_TOPK};
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

fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn key_bytes(key: &SegmentKey) -> impl Iterator<Item = u8> {
    key.collection_id
        .to_le_bytes()
        .into_iter()
        .chain(key.segment.to_le_bytes())
        .chain(key.manifest_crc.to_le_bytes())
}

/// The searcher's block id of a segment: FNV-1a over (collection, segment, manifest checksum),
/// so equal ids mean equal vectors (up to a 64-bit hash collision).
pub fn gpu_segment_id(key: &SegmentKey) -> u64 {
    fnv1a(key_bytes(key))
}

/// The searcher's block id of a segment's IVF_FLAT lists: FNV-1a over the segment key, the
/// index file's checksum and a tag, so a rebuilt index (other lists over the same rows) never
/// reuses the old lists' resident copies, and never the segment's FLAT block id.
pub fn gpu_ivf_segment_id(key: &SegmentKey, index_crc: u32) -> u64 {
    fnv1a(
        key_bytes(key)
            .chain(index_crc.to_le_bytes())
            .chain(*b"ivf_flat"),
    )
}

/// What a segment scan searched: a whole FLAT segment or the probed lists of an IVF_FLAT index
/// (the `index` label of `shoal_gpu_segment_searches_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanKind {
    Flat,
    IvfFlat,
}

impl ScanKind {
    fn label(self) -> &'static str {
        match self {
            ScanKind::Flat => "flat",
            ScanKind::IvfFlat => "ivf_flat",
        }
    }
}

/// Where a segment scan ran (the `route` label of `shoal_gpu_segment_searches_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanRoute {
    /// On the GPU.
    Gpu,
    /// On the CPU: the batch was under `--gpu-search-threshold` or top-k above the GPU limit.
    CpuBelowThreshold,
    /// On the CPU after the GPU failed.
    CpuFallback,
}

impl ScanRoute {
    fn label(self) -> &'static str {
        match self {
            ScanRoute::Gpu => "gpu",
            ScanRoute::CpuBelowThreshold => "cpu_below_threshold",
            ScanRoute::CpuFallback => "cpu_fallback",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
    index: &'static str,
}

/// Counters of the offload, exported as `shoal_gpu_segment_searches_total{route,index}` and
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
            "Sealed segment scans of SearchShard (index: flat for a whole FLAT segment, ivf_flat for an IVF_FLAT segment's probed lists) by where they ran: gpu, cpu_below_threshold (batch under --gpu-search-threshold or top-k above the GPU limit), cpu_fallback (the GPU failed)",
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

    /// Segment scans (FLAT and IVF_FLAT) answered on the GPU since start.
    pub fn gpu_searches(&self) -> u64 {
        self.scans(ScanRoute::Gpu, ScanKind::Flat) + self.scans(ScanRoute::Gpu, ScanKind::IvfFlat)
    }

    /// Segment scans (FLAT and IVF_FLAT) sent to the CPU because the batch was below the
    /// threshold, since start.
    pub fn below_threshold(&self) -> u64 {
        let r = ScanRoute::CpuBelowThreshold;
        self.scans(r, ScanKind::Flat) + self.scans(r, ScanKind::IvfFlat)
    }

    /// Scans of one kind that took one route, since start.
    pub fn scans(&self, route: ScanRoute, kind: ScanKind) -> u64 {
        self.metrics
            .segment_searches
            .get_or_create(&Self::labels(route, kind))
            .get()
    }

    fn labels(route: ScanRoute, kind: ScanKind) -> RouteLabels {
        RouteLabels {
            route: route.label(),
            index: kind.label(),
        }
    }

    fn counted(&self, route: ScanRoute, kind: ScanKind) {
        self.metrics
            .segment_searches
            .get_or_create(&Self::labels(route, kind))
            .inc();
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

    fn fall_back(&self, key: &SegmentKey, kind: ScanKind, e: &GpuError) {
        self.metrics.fallbacks.inc();
        self.counted(ScanRoute::CpuFallback, kind);
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
            index = kind.label(),
            error = %e,
            suppressed_since_last_warning = suppressed,
            "GPU search failed; answering on the CPU (shoal_gpu_search_fallbacks_total counts every fallback, this warning repeats at most once a minute)"
        );
    }

    /// Count a GPU answer, or count and log its failure; `None` sends the scan to the CPU.
    fn answer(
        &self,
        key: &SegmentKey,
        kind: ScanKind,
        res: Result<Vec<Vec<Neighbor>>, GpuError>,
    ) -> Option<Vec<Vec<Neighbor>>> {
        match res {
            Ok(hits) => {
                self.counted(ScanRoute::Gpu, kind);
                Some(hits)
            }
            Err(e) => {
                self.fall_back(key, kind, &e);
                None
            }
        }
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
            self.counted(ScanRoute::CpuBelowThreshold, ScanKind::Flat);
            return None;
        }
        let id = gpu_segment_id(&key);
        self.remember(&key, id);
        let rows = vectors.len() / dim.max(1);
        let res = self
            .gpu
            .search_flat(id, vectors, dim, metric, queries, k, allowed)
            .and_then(|hits| check_hits(&hits, nq, rows, k, allowed).map(|()| hits));
        self.answer(&key, ScanKind::Flat, res)
    }

    fn search_ivf_flat(
        &self,
        key: SegmentKey,
        index_crc: u32,
        index: &IvfIndex,
        queries: &[f32],
        k: usize,
        params: &SearchParams,
        allowed: Option<&Bitset>,
    ) -> Option<Vec<Vec<Neighbor>>> {
        let dim = index.dim();
        let nq = queries.len() / dim.max(1);
        if route(nq, k, self.gpu.threshold()) != Route::Gpu {
            self.counted(ScanRoute::CpuBelowThreshold, ScanKind::IvfFlat);
            return None;
        }
        // Not IVF_FLAT, or a request the index refuses (bad shape or nprobe): the CPU search
        // answers it, with the index's own error. Nothing was scanned, so nothing is counted.
        let lists = (0..index.nlist() as u32)
            .map(|l| {
                index
                    .flat_list(l)
                    .map(|(vectors, rows)| IvfList { vectors, rows })
            })
            .collect::<Option<Vec<_>>>()?;
        let probes = index.probe_lists(queries, k, params, allowed).ok()?;
        let id = gpu_ivf_segment_id(&key, index_crc);
        self.remember(&key, id);
        let res = self
            .gpu
            .search_ivf(
                id,
                &lists,
                &probes,
                dim,
                index.metric(),
                queries,
                k,
                allowed,
            )
            .and_then(|hits| check_hits(&hits, nq, index.len(), k, allowed).map(|()| hits));
        self.answer(&key, ScanKind::IvfFlat, res)
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
            text.contains(
                "shoal_gpu_segment_searches_total{route=\"cpu_fallback\",index=\"flat\"} 3"
            ),
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

    /// Clustered rows (so IVF lists have structure and a small nprobe misses neighbours).
    fn clustered(rng: &mut impl Rng, n: usize, dim: usize, centres: &[f32]) -> Vec<f32> {
        let nc = centres.len() / dim;
        let mut out = Vec::with_capacity(n * dim);
        for _ in 0..n {
            let c = rng.random_range(0..nc);
            out.extend((0..dim).map(|d| centres[c * dim + d] + rng.random_range(-0.3f32..0.3)));
        }
        out
    }

    fn ivf_flat(metric: Metric, base: &[f32], dim: usize, nlist: usize) -> IvfIndex {
        use crate::core::index::ivf::Codec;
        use crate::core::types::IndexType;
        IvfIndex::build(IndexType::IVF_FLAT, metric, dim, nlist, Codec::Flat, base)
            .expect("build IVF_FLAT")
    }

    /// Same ids in the same order, distances within float tolerance.
    fn assert_same(cpu: &[Vec<Neighbor>], gpu: &[Vec<Neighbor>], what: &str) {
        assert_eq!(cpu.len(), gpu.len(), "{what}");
        for (qi, (c, g)) in cpu.iter().zip(gpu).enumerate() {
            let rows = |h: &[Neighbor]| h.iter().map(|n| n.row).collect::<Vec<_>>();
            assert_eq!(rows(c), rows(g), "{what} query {qi}");
            for (a, b) in c.iter().zip(g) {
                assert!(
                    (a.dist - b.dist).abs() <= 1e-4 * a.dist.abs().max(1.0),
                    "{what} query {qi} row {}: cpu {} gpu {}",
                    a.row,
                    a.dist,
                    b.dist
                );
            }
        }
    }

    /// Fraction of the exact top-k (FLAT over the allowed rows) found.
    fn recall(got: &[Vec<Neighbor>], exact: &[Vec<Neighbor>]) -> f64 {
        let hit: usize = got
            .iter()
            .zip(exact)
            .map(|(g, e)| {
                g.iter()
                    .filter(|h| e.iter().any(|x| x.row == h.row))
                    .count()
            })
            .sum();
        hit as f64 / exact.iter().map(Vec::len).sum::<usize>().max(1) as f64
    }

    #[test]
    fn ivf_flat_lists_on_the_gpu_path_find_what_the_cpu_ivf_search_finds_at_the_same_nprobe() {
        use crate::core::index::flat::FlatIndex;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let (rows, dim, nlist, k) = (3000, 16, 32, 10);
        // More clusters than lists: a list holds several, so one probe misses neighbours.
        let centres = random(&mut rng, 300 * dim);
        let base = clustered(&mut rng, rows, dim, &centres);
        // Deletes alone, deletes and a filter keeping a third, and a 1% filter (the CPU widens
        // the probe and keeps going until it has k allowed rows; the GPU must probe the same).
        let mut deletes = Bitset::new_full(rows);
        for r in (0..rows).step_by(7) {
            deletes.remove(r);
        }
        let mut third = Bitset::new_empty(rows);
        for r in (0..rows).filter(|r| r % 3 == 0 && r % 7 != 0) {
            third.insert(r);
        }
        let mut sparse = Bitset::new_empty(rows);
        for r in (0..rows).step_by(97) {
            sparse.insert(r);
        }
        let s = host(1, false);
        let o = GpuOffload::new(s.clone());
        let mut scans = 0;
        let mut extended = false;
        for metric in [Metric::L2, Metric::IP, Metric::COSINE] {
            let ivf = ivf_flat(metric, &base, dim, nlist);
            let exact_index = FlatIndex::new(base.as_slice(), dim, metric).expect("flat");
            // Only the rows of the upper half of the lists: a query whose widened probe (2x)
            // lies in the lower half finds no allowed row there and the CPU probes on, nearest
            // first, until it has k.
            let mut upper = Bitset::new_empty(rows);
            for l in nlist as u32 / 2..nlist as u32 {
                let (_, members) = ivf.flat_list(l).expect("an IVF_FLAT list");
                members.iter().for_each(|&r| upper.insert(r as usize));
            }
            let filters = [
                ("unfiltered", None),
                ("deletes", Some(&deletes)),
                ("filter+deletes", Some(&third)),
                ("1% filter", Some(&sparse)),
                ("upper lists", Some(&upper)),
            ];
            // 5 queries rank lists per query, 20 through the batch kernel (as the CPU does).
            for nq in [5usize, 20] {
                let queries = clustered(&mut rng, nq, dim, &centres);
                for nprobe in [1usize, 4] {
                    let params = SearchParams {
                        nprobe: Some(nprobe),
                        ef: None,
                    };
                    for (name, filter) in filters {
                        let what = format!("{metric} nq={nq} nprobe={nprobe} {name}");
                        let cpu = ivf.search(&queries, k, &params, filter).expect("cpu");
                        let gpu = o
                            .search_ivf_flat(key(4), 1, &ivf, &queries, k, &params, filter)
                            .unwrap_or_else(|| panic!("{what}: the GPU path declined"));
                        scans += 1;
                        assert_same(&cpu, &gpu, &what);
                        let exact = exact_index
                            .search(&queries, k, &SearchParams::default(), filter)
                            .expect("exact");
                        let (rc, rg) = (recall(&cpu, &exact), recall(&gpu, &exact));
                        assert_eq!(rc, rg, "{what}: recall");
                        if filter.is_none() && nprobe == 1 {
                            // The answer really is the probed lists', not an exact scan.
                            assert!(rg < 1.0, "{what}: recall {rg}");
                        }
                        if let Some(f) = filter {
                            assert!(gpu.iter().flatten().all(|h| f.contains(h.row as usize)));
                        }
                        if name == "upper lists" && nprobe == 1 {
                            let widened = rows.div_ceil(upper.count_ones());
                            let probes = ivf
                                .probe_lists(&queries, k, &params, filter)
                                .expect("probes");
                            extended |= probes.iter().any(|p| p.len() > widened);
                        }
                        assert!(gpu.iter().all(|h| h.len() == k), "{what}");
                    }
                }
            }
        }
        assert!(extended, "no query probed past its widened lists");
        assert_eq!(o.scans(ScanRoute::Gpu, ScanKind::IvfFlat), scans);
        assert_eq!(
            (o.fallbacks(), o.scans(ScanRoute::Gpu, ScanKind::Flat)),
            (0, 0)
        );
        // Lists are resident per list (and metric), and forgetting the segment drops them.
        let resident = s.resident()[0].blocks;
        assert!(resident > nlist && resident <= 3 * nlist, "{resident}");
        o.forget_segment(7, 4);
        assert_eq!(s.resident()[0].blocks, 0);
    }

    #[test]
    fn ivf_flat_below_the_threshold_or_on_a_failing_gpu_is_counted_and_left_to_the_cpu() {
        use crate::core::index::ivf::Codec;
        use crate::core::types::IndexType;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
        let (rows, dim, k) = (1000, 8, 5);
        let base = random(&mut rng, rows * dim);
        let ivf = ivf_flat(Metric::L2, &base, dim, 16);
        let params = SearchParams {
            nprobe: Some(2),
            ef: None,
        };
        let q3 = random(&mut rng, 3 * dim);
        let s = host(4, false);
        let o = GpuOffload::new(s.clone());
        assert!(
            o.search_ivf_flat(key(1), 9, &ivf, &q3, k, &params, None)
                .is_none()
        );
        assert_eq!(tile_calls(&s), 0);
        assert_eq!(o.scans(ScanRoute::CpuBelowThreshold, ScanKind::IvfFlat), 1);
        assert_eq!((o.below_threshold(), o.gpu_searches()), (1, 0));
        let q4 = random(&mut rng, 4 * dim);
        assert!(
            o.search_ivf_flat(key(1), 9, &ivf, &q4, k, &params, None)
                .is_some()
        );
        assert_eq!(o.scans(ScanRoute::Gpu, ScanKind::IvfFlat), 1);
        // A rebuilt index over the same segment (other checksum) gets its own resident lists.
        let blocks = s.resident()[0].blocks;
        assert!(
            o.search_ivf_flat(key(1), 10, &ivf, &q4, k, &params, None)
                .is_some()
        );
        assert_eq!(s.resident()[0].blocks, 2 * blocks);
        // An nprobe the index refuses is left to the CPU search (which reports it); not counted.
        let bad = SearchParams {
            nprobe: Some(17),
            ef: None,
        };
        assert!(
            o.search_ivf_flat(key(1), 9, &ivf, &q4, k, &bad, None)
                .is_none()
        );
        assert!(ivf.search(&q4, k, &bad, None).is_err());
        // IVF_SQ8 lists hold codes, not vectors: never offered to the GPU.
        let sq8 = IvfIndex::build(IndexType::IVF_SQ8, Metric::L2, dim, 16, Codec::Sq8, &base)
            .expect("build IVF_SQ8");
        assert!(
            o.search_ivf_flat(key(2), 9, &sq8, &q4, k, &params, None)
                .is_none()
        );
        assert_eq!(o.gpu_searches(), 2);
        assert_eq!(o.fallbacks(), 0);

        let failing = GpuOffload::new(host(1, true));
        for _ in 0..2 {
            assert!(
                failing
                    .search_ivf_flat(key(3), 9, &ivf, &q4, k, &params, None)
                    .is_none()
            );
        }
        assert_eq!(failing.fallbacks(), 2);
        let text = metrics_text(&failing);
        assert!(
            text.contains(
                "shoal_gpu_segment_searches_total{route=\"cpu_fallback\",index=\"ivf_flat\"} 2"
            ),
            "{text}"
        );
        let text = metrics_text(&o);
        for line in [
            "shoal_gpu_segment_searches_total{route=\"cpu_below_threshold\",index=\"ivf_flat\"} 1",
            "shoal_gpu_segment_searches_total{route=\"gpu\",index=\"ivf_flat\"} 2",
        ] {
            assert!(text.contains(line), "{line} in {text}");
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

    /// The offload hook end to end (the reader's `GpuOffload` over the host stand-in for a
    /// device, on a read-only `Collection` of shoal-core; moved here with the core split because
    /// the core cannot see this crate): IVF_FLAT segments go through `search_ivf_flat`, the small segment without an
    /// index through `search_flat`, and the answer equals the CPU replica's, with deletes and a
    /// filter.
    #[tokio::test]
    async fn a_replica_offers_ivf_flat_and_flat_segments_to_the_offload_and_gets_the_cpu_answer() {
        use crate::core::filter::Filter;
        use crate::core::storage::collection::{
            Collection, CollectionWrite, Output, ReplicaListing,
        };
        use crate::core::testing::{
            all_ids, catalog_of, ids_of, l2_collection, random_batch, two_ivf_flat_segments,
        };
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let (meta, rec, schema) = l2_collection(dir.path(), "gpu", 8).await;
        let (w, _) = two_ivf_flat_segments(&meta, &rec, &schema, &data).await;
        // Under index_min_rows: searched with FLAT.
        w.upsert(random_batch(1200..1250)).await.unwrap();
        w.flush().await.unwrap();
        let deleted: Vec<i64> = (0..1250).step_by(41).collect();
        w.delete(deleted.clone()).await.unwrap();
        w.flush().await.unwrap();
        let (segs, ixs, files) = catalog_of(&meta.catalog_snapshot().await.unwrap(), rec.id);
        assert_eq!((segs.len(), files.len()), (3, 2));
        let listing = ReplicaListing {
            segments: &segs,
            indexes: &ixs,
            segment_indexes: &files,
        };
        let (r, _) = Collection::open_read_only(meta.clone(), &rec, schema, &data, listing)
            .await
            .unwrap();
        let searcher = GpuSearcher::new(vec![HostBackend::new(0)], 1 << 30, 1, 1 << 20).unwrap();
        let offload = GpuOffload::new(Arc::new(searcher));
        let ids = all_ids(&segs);
        let queries = random_batch(5000..5020).vectors;
        let params = SearchParams {
            nprobe: Some(2),
            ef: None,
        };
        // Rows of all three segments match.
        let range = Filter::parse("id >= 300 and id < 1240").unwrap();
        for filter in [None, Some(&range)] {
            let search = |o: Option<&dyn FlatOffload>| {
                r.search_segments_with(&ids, &queries, 10, &params, filter, Output::default(), o)
                    .unwrap()
                    .0
            };
            let cpu = search(None);
            let before = (
                offload.scans(ScanRoute::Gpu, ScanKind::IvfFlat),
                offload.scans(ScanRoute::Gpu, ScanKind::Flat),
            );
            let gpu = search(Some(&offload));
            assert_eq!(
                (
                    offload.scans(ScanRoute::Gpu, ScanKind::IvfFlat) - before.0,
                    offload.scans(ScanRoute::Gpu, ScanKind::Flat) - before.1
                ),
                (2, 1),
                "filter {filter:?}: two IVF_FLAT segments and one FLAT segment on the GPU path"
            );
            assert_eq!(ids_of(&cpu), ids_of(&gpu), "filter {filter:?}");
            for (c, g) in cpu.iter().flatten().zip(gpu.iter().flatten()) {
                assert!((c.distance - g.distance).abs() <= 1e-4 * c.distance.abs().max(1.0));
            }
            for h in gpu.iter().flatten() {
                assert!(!deleted.contains(&h.row.id), "deleted id {}", h.row.id);
                if filter.is_some() {
                    assert!((300..1240).contains(&h.row.id), "id {}", h.row.id);
                }
            }
            assert!(gpu.iter().all(|q| q.len() == 10));
        }
        assert_eq!(offload.fallbacks(), 0);

        // A failing device and a batch under the threshold: every segment answered on the CPU,
        // counted per kind.
        let mut failing = HostBackend::new(0);
        failing.fail_search = true;
        let failing = GpuOffload::new(Arc::new(
            GpuSearcher::new(vec![failing], 1 << 30, 1, 1 << 20).unwrap(),
        ));
        let high = GpuSearcher::new(vec![HostBackend::new(0)], 1 << 30, 21, 1 << 20).unwrap();
        let below = GpuOffload::new(Arc::new(high));
        let cpu = r
            .search_segments(&ids, &queries, 10, &params, Some(&range), Output::default())
            .unwrap()
            .0;
        for (o, route) in [
            (&failing, ScanRoute::CpuFallback),
            (&below, ScanRoute::CpuBelowThreshold),
        ] {
            let got = r
                .search_segments_with(
                    &ids,
                    &queries,
                    10,
                    &params,
                    Some(&range),
                    Output::default(),
                    Some(o),
                )
                .unwrap()
                .0;
            assert_eq!(ids_of(&got), ids_of(&cpu), "{route:?}");
            assert_eq!(
                (
                    o.scans(route, ScanKind::IvfFlat),
                    o.scans(route, ScanKind::Flat)
                ),
                (2, 1),
                "{route:?}"
            );
            assert_eq!(o.gpu_searches(), 0);
        }
        assert_eq!((failing.fallbacks(), below.fallbacks()), (3, 0));
        w.close().await;
    }
}
