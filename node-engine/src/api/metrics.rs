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
    gpu: Option<Arc<GpuRuntime>>,
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

    /// Refresh the per-collection gauges and render the text exposition format.
    pub fn render(&self, engine: &Engine) -> String {
        self.refresh_collections(engine);
        self.encode()
    }

    /// Refresh the GPU gauges (one NVML sample per GPU, microseconds to a few milliseconds) and
    /// render everything registered, for roles without a local engine.
    pub fn encode(&self) -> String {
        if let Some(g) = &self.gpu {
            // Sampling also refreshes the residency gauges; the status itself is not needed.
            let _ = g.status();
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }

    fn refresh_collections(&self, engine: &Engine) {
        self.rows.clear();
        self.segments.clear();
        self.corrupt_segments.clear();
        self.wal_bytes.clear();
        self.memory_bytes.clear();
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
        }
    }
}
