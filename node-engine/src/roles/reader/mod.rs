//! The reader role (`shoal-engine reader`): serves searches over the committed segments of the
//! shared data directory, read-only.
//!
//! A reader connects to the metadata store without migrating it (it never writes there either),
//! opens every collection as a read-only replica ([`Collection::open_read_only`]: no WAL, no
//! committer, no stray-file removal, nothing written to the data directory, so the mount may be
//! read-only), and follows the catalogue: every `--poll-interval`, on a `NotifySegments` push,
//! and when a request carries a `min_catalog_version` newer than what it serves, it reads a
//! [`crate::core::meta::CatalogSnapshot`] and applies it (new and dropped segments, tombstone
//! versions, the writer's committed ANN index files, load state, new and dropped collections).
//!
//! It serves the Reader gRPC service ([`ReaderService`] over [`ReplicaCatalog`]) and `/healthz`
//! (liveness only), `/readyz` (ready once it caught up with the catalogue once, while its data
//! directory's filesystem and the metadata store answer; JSON with the reason and the GPU
//! details) and `/metrics`. The ops listener is up before the metadata store is reached (which
//! start-up retries until `--meta-startup-timeout`); on SIGTERM `/readyz` fails and the gRPC
//! health check answers `draining` at once while it keeps serving for `--shutdown-delay`, then
//! it drains and stops.
//!
//! GPUs: at start the reader builds a [`GpuRuntime`] from its `--gpu-*` flags. When it opens a
//! CUDA device, `SearchShard` offers every sealed FLAT segment scan to the GPU
//! ([`GpuOffload`]): batches of at least `--gpu-search-threshold` queries run there, with the
//! filter and deletes as the allow-bitset, smaller ones and any GPU failure on the CPU (counted
//! in `shoal_gpu_search_fallbacks_total`); both paths' hits go through the replica's one merge.
//! Without NVML, CUDA or a device the runtime logs why and the reader searches on the CPU.

pub mod catalog;
pub mod config;
pub mod service;

use crate::core::storage::collection::CollectionRead;
use crate::gpu::{GpuOffload, GpuRuntime};
use crate::probes::{DirCheck, DirProbe};
use crate::rpc::pb::reader_server::ReaderServer;
use crate::server::lifecycle::Lifecycle;
use crate::server::spawn_grpc;
use crate::server::startup::{MetaAccess, MetaStartupError, connect_meta};
use crate::server::stop_servers;
use axum::extract::State;
use catalog::ReplicaCatalog;
use config::ReaderConfig;
use service::{ReaderService, ShardBackend, VersionGate, run_poller};
use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Why the reader stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReaderRunError {
    #[error(transparent)]
    Meta(#[from] MetaStartupError),
    #[error(transparent)]
    Bind(#[from] crate::server::BindError),
}

// ---------------------------------------------------------------- the process

/// What the ops listener serves from.
struct Ops {
    backend: Arc<ReplicaCatalog>,
    gpu: Arc<GpuRuntime>,
    /// The `shoal_gpu_*` telemetry gauges and offload counters.
    registry: prometheus_client::registry::Registry,
    /// The shared data directory's filesystem answers.
    data: DirProbe,
}

impl Ops {
    /// Ready when the data directory's filesystem answers, the metadata store answers and the
    /// catalogue was read once.
    async fn ready(&self) -> Result<(), String> {
        // Concurrently: the kubelet's default probe timeout is 1 s for the whole answer.
        let (data, meta) = tokio::join!(self.data.check(), self.backend.ping_meta());
        data?;
        meta?;
        if self.backend.caught_up() {
            Ok(())
        } else {
            Err("not caught up with the catalogue yet".to_string())
        }
    }
}

fn ops_router(ops: Arc<Ops>) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(o): State<Arc<Ops>>| async move {
                let (status, body) =
                    crate::server::readiness(o.ready().await, Some(o.gpu.status()));
                (status, axum::Json(body))
            }),
        )
        .route(
            "/metrics",
            get(|State(o): State<Arc<Ops>>| async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    render_metrics(&o),
                )
            }),
        )
        .with_state(ops)
}

/// OpenMetrics text: served catalogue version, readiness, segments and live rows per collection
/// (collection names are `[A-Za-z0-9_]`, so they need no escaping), then the GPU gauges and
/// counters (which end the text with `# EOF`).
fn render_metrics(o: &Ops) -> String {
    let b = &o.backend;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# HELP shoal_reader_catalog_version Catalogue version served."
    );
    let _ = writeln!(s, "# TYPE shoal_reader_catalog_version gauge");
    let _ = writeln!(s, "shoal_reader_catalog_version {}", b.served_version());
    let _ = writeln!(
        s,
        "# HELP shoal_reader_ready Whether the reader caught up once."
    );
    let _ = writeln!(s, "# TYPE shoal_reader_ready gauge");
    let _ = writeln!(s, "shoal_reader_ready {}", u8::from(b.caught_up()));
    let cols = b.collections();
    per_collection(
        &mut s,
        "shoal_reader_segments",
        "gauge",
        "Sealed segments served.",
        cols.iter().map(|(n, c)| (n, c.segment_ids().len())),
    );
    per_collection(
        &mut s,
        "shoal_reader_rows",
        "gauge",
        "Live rows served.",
        cols.iter().map(|(n, c)| (n, c.stats().live_rows)),
    );
    // ANN indexes mapped from the writer's committed files (segments without one use FLAT).
    let progress: Vec<_> = cols.iter().map(|(n, c)| (n, c.index_progress())).collect();
    per_collection(
        &mut s,
        "shoal_reader_index_bytes",
        "gauge",
        "Bytes of the ANN indexes served (mapped).",
        progress.iter().map(|(n, p)| (n, p.index_bytes)),
    );
    per_collection(
        &mut s,
        "shoal_reader_indexed_segments",
        "gauge",
        "Segments searched through their ANN index.",
        progress.iter().map(|(n, p)| (n, p.indexed_segments)),
    );
    per_collection(
        &mut s,
        "shoal_reader_index_load_failures",
        "counter",
        "Index files that failed verification here (their segments use FLAT).",
        progress.iter().map(|(n, p)| (n, p.load_failures)),
    );
    // One NVML sample per GPU, which also refreshes the residency gauges.
    let _ = o.gpu.status();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut s, &o.registry) {
        tracing::error!(error = %e, "encoding the GPU metrics failed");
        s.push_str("# EOF\n");
    }
    s
}

/// One OpenMetrics family `family` of `kind` (`gauge` or `counter`; a counter's samples end in
/// `_total`) with one sample per collection.
fn per_collection<N: std::fmt::Display, V: std::fmt::Display>(
    s: &mut String,
    family: &str,
    kind: &str,
    help: &str,
    samples: impl IntoIterator<Item = (N, V)>,
) {
    let _ = writeln!(s, "# HELP {family} {help}");
    let _ = writeln!(s, "# TYPE {family} {kind}");
    let suffix = if kind == "counter" { "_total" } else { "" };
    for (collection, value) in samples {
        let _ = writeln!(s, "{family}{suffix}{{collection=\"{collection}\"}} {value}");
    }
}

/// Run the reader until `shutdown` resolves, then report not ready (`/readyz` and the gRPC
/// health check) for the shutdown delay while still serving, then drain and stop.
pub async fn run(
    cfg: ReaderConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ReaderRunError> {
    // The ops listener answers from the start: live, and not ready until the reader serves.
    let life = Lifecycle::starting("connecting to the metadata store");
    let ops_l = crate::server::bind(cfg.metrics_listen).await?;
    let stop = crate::server::StopSignal::default();
    let ops_task = crate::server::spawn_http(ops_l, life.router(), stop.wait());
    let mut shutdown = std::pin::pin!(shutdown);
    let connect = connect_meta(
        &cfg.meta_url,
        MetaAccess::ReadOnly,
        cfg.meta_startup_timeout,
        &life,
    );
    let meta = tokio::select! {
        m = connect => match m {
            Ok(m) => m,
            Err(e) => {
                stop.stop();
                stop_servers([("ops", ops_task)]).await;
                return Err(e.into());
            }
        },
        () = &mut shutdown => {
            tracing::info!("stopped during start-up");
            stop.stop();
            stop_servers([("ops", ops_task)]).await;
            return Ok(());
        }
    };
    life.set_starting("reading the catalogue");
    // Never fails: without NVML, CUDA or a device it logs why and the reader searches on the CPU.
    let gpu = Arc::new(GpuRuntime::start(&cfg.gpu));
    let mut registry = prometheus_client::registry::Registry::default();
    gpu.register_metrics(&mut registry);
    let mut catalog = ReplicaCatalog::new(meta, cfg.data_dir.clone());
    if let Some(searcher) = gpu.searcher() {
        let offload = Arc::new(GpuOffload::new(searcher));
        offload.register(&mut registry);
        catalog = catalog.with_gpu(offload);
    }
    let backend = Arc::new(catalog);
    let gate = Arc::new(VersionGate::new(0));
    match backend.refresh().await {
        Ok(v) => gate.advance(v),
        Err(e) => {
            tracing::warn!(error = %e, "first catalogue read failed; retrying every poll interval")
        }
    }
    let poller = tokio::spawn(run_poller(backend.clone(), gate.clone(), cfg.poll_interval));
    let svc = ReaderService::new(
        backend.clone(),
        gate,
        cfg.node_id.clone(),
        Duration::from_secs(5),
    )
    .with_lifecycle(life.clone());
    let grpc_l = crate::server::bind(cfg.grpc_listen).await?;
    tracing::info!(grpc = %cfg.grpc_listen, metrics = %cfg.metrics_listen, node_id = %cfg.node_id,
        data_dir = %cfg.data_dir.display(), "shoal reader listening");
    life.serve(ops_router(Arc::new(Ops {
        backend: backend.clone(),
        gpu,
        registry,
        data: DirProbe::new("data directory", cfg.data_dir.clone(), DirCheck::Filesystem),
    })));
    let grpc_task = spawn_grpc(
        grpc_l,
        tonic::service::Routes::new(ReaderServer::new(svc)),
        stop.wait(),
    );
    life.shutdown_after(shutdown, cfg.shutdown_delay).await;
    stop.stop();
    poller.abort();
    stop_servers([("gRPC", grpc_task), ("ops", ops_task)]).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::config::ReaderArgs;
    use super::service::ShardQuery;
    use super::*;
    use crate::core::engine::schema_of;
    use crate::core::meta::CollectionRecord;
    use crate::core::meta::MetaStore;
    use crate::core::storage::collection::Collection;
    use crate::core::storage::collection::{CollectionWrite, StorageOptions};
    use crate::core::storage::wal::RowBatch;
    use crate::core::types::Metric;
    use crate::gpu::args::GpuArgs;
    use crate::gpu::backend::host::HostBackend;
    use crate::gpu::telemetry::GpuTelemetry;
    use crate::gpu::{GpuError, GpuSearch, GpuSearcher};
    use crate::rpc::pb::QueryHits;
    use rand::{Rng, SeedableRng};
    use std::path::Path;

    const DIM: usize = 8;
    const DELETED: [i64; 3] = [3, 150, 299];

    /// A SQLite catalogue and data directory with one collection per metric ("l2", "ip",
    /// "cos"), each flushed as three 100-row segments, then three rows deleted.
    async fn written(dir: &Path) -> MetaStore {
        let meta = MetaStore::open_sqlite(&dir.join("meta.db"))
            .await
            .expect("open sqlite");
        let data = dir.join("data");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
        for (name, metric) in [
            ("l2", Metric::L2),
            ("ip", Metric::IP),
            ("cos", Metric::COSINE),
        ] {
            let mut rec = CollectionRecord::new(name, DIM, metric.as_str());
            rec.id = meta.create_collection(&rec).await.expect("create");
            let schema = schema_of(&rec).expect("schema");
            let w = Collection::open(meta.clone(), &rec, schema, &data, StorageOptions::default())
                .await
                .expect("open writer");
            for part in 0..3i64 {
                let mut b = RowBatch::new(DIM);
                for id in part * 100..part * 100 + 100 {
                    b.ids.push(id);
                    b.vectors
                        .extend((0..DIM).map(|_| rng.random_range(-1.0f32..1.0)));
                    b.fields.push(Vec::new());
                }
                w.upsert(b).await.expect("upsert");
                w.flush().await.expect("flush");
            }
            w.delete(DELETED.to_vec()).await.expect("delete");
            w.flush().await.expect("flush deletes");
            w.close().await;
        }
        meta
    }

    fn host_searcher(threshold: usize, fail: bool) -> Arc<GpuSearcher<HostBackend>> {
        let mut b = HostBackend::new(0);
        b.fail_search = fail;
        Arc::new(GpuSearcher::new(vec![b], 1 << 30, threshold, 1 << 20).expect("host searcher"))
    }

    fn query(
        name: &str,
        segment_ids: Vec<u64>,
        queries: &[f32],
        filter: Option<&str>,
    ) -> ShardQuery {
        ShardQuery {
            collection: name.into(),
            segment_ids,
            dim: DIM,
            queries: queries.to_vec(),
            top_k: 10,
            nprobe: None,
            ef: None,
            filter: filter.map(String::from),
            output_fields: Vec::new(),
        }
    }

    /// Same ids in the same order, distances within float tolerance.
    fn assert_same_hits(want: &[QueryHits], got: &[QueryHits], what: &str) {
        assert_eq!(want.len(), got.len(), "{what}");
        for (qi, (w, g)) in want.iter().zip(got).enumerate() {
            let ids = |h: &QueryHits| h.hits.iter().map(|h| h.id).collect::<Vec<_>>();
            assert_eq!(ids(w), ids(g), "{what} query {qi}");
            for (a, b) in w.hits.iter().zip(&g.hits) {
                let tol = 1e-4 * a.distance.abs().max(1.0);
                assert!(
                    (a.distance - b.distance).abs() <= tol,
                    "{what} query {qi} id {}: cpu {} gpu {}",
                    a.id,
                    a.distance,
                    b.distance
                );
            }
        }
    }

    #[test]
    fn reader_accepts_the_gpu_flags_the_operator_passes() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            reader: ReaderArgs,
        }
        // What the operator's `gpu_args` emits for `readers.gpu: {count: 2, memoryBudget: 40Gi}`
        // (operator/tests/builders.rs asserts the same strings on its side).
        let cli = Cli::try_parse_from([
            "reader",
            "--meta",
            "mysql://u:p@db/shoal",
            "--gpu-devices",
            "0,1",
            "--gpu-memory-budget",
            "42949672960",
        ])
        .expect("the operator's reader flags parse");
        let c = cli.reader.resolve().expect("resolve");
        assert_eq!(
            c.gpu.gpu_devices,
            crate::gpu::DeviceSelection::List(vec![0, 1])
        );
        assert_eq!(c.gpu.gpu_memory_budget, 40 << 30);
        assert_eq!(c.gpu.gpu_search_threshold, 1000);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn search_shard_on_the_host_gpu_backend_equals_the_cpu_path_for_l2_ip_and_cosine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let meta = written(dir.path()).await;
        let data = dir.path().join("data");
        let cpu = ReplicaCatalog::new(meta.clone(), data.clone());
        let searcher = host_searcher(1, false);
        let offload = Arc::new(GpuOffload::new(searcher.clone()));
        let gpu = ReplicaCatalog::new(meta.clone(), data).with_gpu(offload.clone());
        cpu.refresh().await.expect("cpu replica refresh");
        gpu.refresh().await.expect("gpu replica refresh");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let queries: Vec<f32> = (0..5 * DIM)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let mut scans = 0;
        for name in ["l2", "ip", "cos"] {
            let segs = cpu.get(name).expect("served").segment_ids();
            assert!(segs.len() >= 2, "{name}: {segs:?}");
            for filter in [None, Some("id >= 40 and id < 250")] {
                let q = query(name, segs.clone(), &queries, filter);
                let before = offload.gpu_searches();
                let (want, unknown) = cpu.search(&q).expect("cpu search");
                let (got, _) = gpu.search(&q).expect("gpu search");
                assert!(unknown.is_empty());
                assert_eq!(
                    offload.gpu_searches() - before,
                    segs.len() as u64,
                    "{name}: every segment is scanned on the (host) GPU"
                );
                scans += segs.len();
                assert_same_hits(&want, &got, &format!("{name} filter {filter:?}"));
                for h in got.iter().flat_map(|q| &q.hits) {
                    assert!(!DELETED.contains(&h.id), "{name}: deleted id {}", h.id);
                    if filter.is_some() {
                        assert!((40..250).contains(&h.id), "{name}: id {}", h.id);
                    }
                }
                assert!(got.iter().all(|q| q.hits.len() == 10), "{name}");
            }
        }
        assert_eq!(offload.fallbacks(), 0);
        let resident = searcher.resident()[0].blocks;
        assert!(resident > 0 && resident <= scans, "{resident}");

        // A collection that is no longer served leaves the GPU with its segments.
        let l2_segments = cpu.get("l2").expect("served").segment_ids().len();
        let mut snap = meta.catalog_snapshot().await.expect("snapshot");
        snap.collections.retain(|c| c.name != "l2");
        gpu.apply(&snap).await.expect("apply");
        assert!(gpu.get("l2").is_err());
        assert_eq!(searcher.resident()[0].blocks, resident - l2_segments);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn search_shard_answers_on_the_cpu_below_the_threshold_and_when_the_gpu_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let meta = written(dir.path()).await;
        let data = dir.path().join("data");
        let cpu = ReplicaCatalog::new(meta.clone(), data.clone());
        let failing = Arc::new(GpuOffload::new(host_searcher(1, true)));
        let broken = ReplicaCatalog::new(meta.clone(), data.clone()).with_gpu(failing.clone());
        let high = host_searcher(6, false);
        let below = Arc::new(GpuOffload::new(high.clone()));
        let small = ReplicaCatalog::new(meta.clone(), data).with_gpu(below.clone());
        for r in [&cpu, &broken, &small] {
            r.refresh().await.expect("refresh");
        }
        let queries: Vec<f32> = (0..5 * DIM).map(|i| (i % 7) as f32 - 3.0).collect();
        let segs = cpu.get("ip").expect("served").segment_ids();
        let q = query("ip", segs.clone(), &queries, Some("id > 10"));
        let (want, _) = cpu.search(&q).expect("cpu search");
        let (got, _) = broken
            .search(&q)
            .expect("a GPU failure is not a search failure");
        assert_same_hits(&want, &got, "failing GPU");
        assert_eq!(failing.fallbacks(), segs.len() as u64);
        assert_eq!(failing.gpu_searches(), 0);

        // 5 queries under a threshold of 6: the GPU is never asked.
        let (got, _) = small.search(&q).expect("search below the threshold");
        assert_same_hits(&want, &got, "below threshold");
        assert_eq!(below.below_threshold(), segs.len() as u64);
        assert_eq!((below.gpu_searches(), below.fallbacks()), (0, 0));
        assert_eq!(high.resident()[0].blocks, 0);

        // /metrics carries the reader gauges, the GPU telemetry and the offload counters, and
        // ends once with `# EOF`; /readyz's GPU part says the mode.
        let no_nvml = Arc::new(GpuTelemetry::discover_with(Some(std::ffi::OsStr::new(
            "/nonexistent/libnvidia-ml.so.1",
        ))));
        let rt = GpuRuntime::start_with(&GpuArgs::default(), no_nvml, |_| {
            Ok::<_, GpuError>(vec![HostBackend::new(0)])
        });
        assert!(rt.searcher().is_some_and(|s| s.threshold() == 1000));
        let mut registry = prometheus_client::registry::Registry::default();
        rt.register_metrics(&mut registry);
        failing.register(&mut registry);
        let ops = Ops {
            backend: Arc::new(broken),
            gpu: Arc::new(rt),
            registry,
            data: DirProbe::new("data directory", dir.path().into(), DirCheck::Filesystem),
        };
        let text = render_metrics(&ops);
        assert!(text.contains("shoal_reader_ready 1"), "{text}");
        assert!(
            text.contains(&format!("shoal_gpu_search_fallbacks_total {}", segs.len())),
            "{text}"
        );
        assert!(text.contains("shoal_gpu_devices 0"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(ops.gpu.status().mode, "gpu");
    }
}
