//! Prometheus metrics: requests and latency per endpoint, rows, segments, WAL bytes, and (when a
//! [`GpuRuntime`] is attached with [`Metrics::with_gpu`]) the `shoal_gpu_*` NVML telemetry.

use crate::core::engine::Engine;
use crate::core::storage::collection::CollectionRead;
use crate::gpu::{GpuRuntime, GpuStatus};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReaderLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CollectionLabels {
    collection: String,
}

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<EndpointLabels, Histogram>,
    rows_inserted: Counter,
    rows: Family<CollectionLabels, Gauge>,
    segments: Family<CollectionLabels, Gauge>,
    corrupt_segments: Family<CollectionLabels, Gauge>,
    wal_bytes: Family<CollectionLabels, Gauge<u64, AtomicU64>>,
    memory_bytes: Family<CollectionLabels, Gauge>,
    readers: Family<ReaderLabels, Gauge>,
    catalog_version: Gauge,
    index_bytes: Family<CollectionLabels, Gauge>,
    index_pending_rows: Family<CollectionLabels, Gauge>,
    index_load_failures: Family<CollectionLabels, Gauge<u64, AtomicU64>>,
    index_builds: Family<BuildLabels, Gauge<u64, AtomicU64>>,
    gpu: Option<Arc<GpuRuntime>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    result: &'static str,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        // The engine's metrics live under `shoal_`; the root stays unprefixed so the GPU gauges
        // can register their own `shoal_gpu_` prefix later ([`Metrics::with_gpu`]).
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("shoal");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<EndpointLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 20))
        });
        let rows_inserted = Counter::default();
        let rows = Family::default();
        let segments = Family::default();
        let corrupt_segments = Family::default();
        let wal_bytes = Family::default();
        let memory_bytes = Family::default();
        let readers = Family::default();
        let catalog_version = Gauge::default();
        let index_bytes = Family::default();
        let index_pending_rows = Family::default();
        let index_load_failures = Family::default();
        let index_builds = Family::default();
        registry.register(
            "collection_index_bytes",
            "Bytes of loaded ANN indexes per collection (part of collection_memory_bytes)",
            index_bytes.clone(),
        );
        registry.register(
            "collection_index_pending_rows",
            "Rows in sealed segments waiting for their ANN index (searched with FLAT meanwhile)",
            index_pending_rows.clone(),
        );
        registry.register(
            "collection_index_load_failures",
            "Index files that failed verification at load since start (searched with FLAT, rebuilt)",
            index_load_failures.clone(),
        );
        registry.register(
            "index_builds",
            "Segment index builds since start by result (built, failed, discarded)",
            index_builds.clone(),
        );
        registry.register(
            "rest_requests",
            "REST requests by endpoint and result",
            requests.clone(),
        );
        registry.register(
            "rest_request_seconds",
            "REST request latency by endpoint",
            latency.clone(),
        );
        registry.register(
            "rows_inserted",
            "Rows inserted or upserted through the API",
            rows_inserted.clone(),
        );
        registry.register("collection_rows", "Live rows per collection", rows.clone());
        registry.register(
            "collection_segments",
            "Sealed segments per collection",
            segments.clone(),
        );
        registry.register(
            "collection_corrupt_segments",
            "Segments that failed verification and are not served",
            corrupt_segments.clone(),
        );
        registry.register(
            "wal_bytes",
            "WAL bytes appended since start per collection",
            wal_bytes.clone(),
        );
        registry.register(
            "collection_memory_bytes",
            "Bytes held in memory or mapped per collection",
            memory_bytes.clone(),
        );
        registry.register(
            "router_readers",
            "Readers known to the router by health state (router only)",
            readers.clone(),
        );
        registry.register(
            "router_catalog_version",
            "Catalogue version the router's cache reflects (router only)",
            catalog_version.clone(),
        );
        Self {
            registry: root,
            requests,
            latency,
            rows_inserted,
            rows,
            segments,
            corrupt_segments,
            wal_bytes,
            memory_bytes,
            readers,
            catalog_version,
            index_bytes,
            index_pending_rows,
            index_load_failures,
            index_builds,
            gpu: None,
        }
    }

    /// Attach a GPU runtime: its `shoal_gpu_*` gauges (GPU count, per-GPU info, memory,
    /// utilisation, temperature, power, residency) are exported and refreshed on each scrape.
    pub fn with_gpu(mut self, gpu: Arc<GpuRuntime>) -> Self {
        gpu.register_metrics(&mut self.registry);
        self.gpu = Some(gpu);
        self
    }

    /// The GPU part of `/readyz` (samples NVML now), when a runtime is attached.
    pub fn gpu_status(&self) -> Option<GpuStatus> {
        self.gpu.as_ref().map(|g| g.status())
    }

    pub fn observe_request(&self, endpoint: &'static str, result: &'static str, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels { endpoint, result })
            .inc();
        self.latency
            .get_or_create(&EndpointLabels { endpoint })
            .observe(took.as_secs_f64());
    }

    pub fn rows_inserted(&self, n: usize) {
        self.rows_inserted.inc_by(n as u64);
    }

    /// Set the per-collection gauges from the local engine.
    pub fn update_collections(&self, engine: &Engine) {
        self.rows.clear();
        self.segments.clear();
        self.corrupt_segments.clear();
        self.wal_bytes.clear();
        self.memory_bytes.clear();
        self.index_bytes.clear();
        self.index_pending_rows.clear();
        self.index_load_failures.clear();
        let b = &engine.index_builder().stats;
        for (result, v) in [
            ("built", &b.built),
            ("failed", &b.failed),
            ("discarded", &b.discarded),
        ] {
            self.index_builds
                .get_or_create(&BuildLabels { result })
                .set(v.load(std::sync::atomic::Ordering::Relaxed));
        }
        for c in engine.all() {
            let s = c.stats();
            let l = CollectionLabels {
                collection: c.schema().name.clone(),
            };
            self.rows.get_or_create(&l).set(s.live_rows as i64);
            self.segments
                .get_or_create(&l)
                .set(s.sealed_segments as i64);
            self.corrupt_segments
                .get_or_create(&l)
                .set(s.corrupt_segments.len() as i64);
            self.wal_bytes.get_or_create(&l).set(s.wal_bytes);
            self.memory_bytes
                .get_or_create(&l)
                .set(s.memory_bytes as i64);
            let p = c.index_progress();
            self.index_bytes.get_or_create(&l).set(p.index_bytes as i64);
            self.index_pending_rows
                .get_or_create(&l)
                .set(p.pending_rows as i64);
            self.index_load_failures
                .get_or_create(&l)
                .set(p.load_failures);
        }
    }

    /// Set the router's gauges: readers per health state, catalogue version, sealed segments
    /// per collection as the router's cached catalogue sees them.
    pub fn update_router(
        &self,
        readers: &[(&'static str, usize)],
        catalog_version: u64,
        segments: &[(String, usize)],
    ) {
        for (state, n) in readers {
            self.readers
                .get_or_create(&ReaderLabels { state })
                .set(*n as i64);
        }
        self.catalog_version.set(catalog_version as i64);
        self.segments.clear();
        for (collection, n) in segments {
            self.segments
                .get_or_create(&CollectionLabels {
                    collection: collection.clone(),
                })
                .set(*n as i64);
        }
    }

    /// Render the text exposition format (call an `update_*` first).
    pub fn render(&self) -> String {
        if let Some(g) = &self.gpu {
            // One NVML sample per GPU also refreshes the residency gauges.
            let _ = g.status();
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}
