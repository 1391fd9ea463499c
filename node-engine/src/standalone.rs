//! The standalone role: writer, reader and router in one process — the engine over SQLite and
//! a local data directory, the REST API and the health/metrics listener.

use crate::api::lifecycle::Lifecycle;
use crate::api::{self, backend::LocalBackend, metrics::Metrics, rest::AppState};
use crate::config::StandaloneConfig;
use crate::core::engine::{Engine, EngineConfig, EngineError};
use crate::core::storage::collection::StorageOptions;
use crate::gpu::GpuRuntime;
use std::future::Future;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("failed to open the engine")]
    OpenEngine(#[from] EngineError),
    #[error(transparent)]
    Bind(#[from] crate::api::BindError),
}

/// Open the engine and build the REST and ops routers over one shared state.
pub async fn build(
    cfg: &StandaloneConfig,
) -> Result<(Arc<AppState>, axum::Router, axum::Router), ServeError> {
    let engine = Engine::open(&EngineConfig {
        data_dir: cfg.data_dir.clone(),
        meta_url: cfg.meta_url.clone(),
        flush_interval: cfg.flush_interval,
        storage: StorageOptions::default(),
    })
    .await?;
    let metrics = Metrics::new().with_gpu(Arc::new(GpuRuntime::telemetry_only(
        &cfg.gpu,
        "standalone searches on the CPU; GPU search runs in the reader role",
    )));
    Ok(build_with_engine(engine, cfg.auth_token.clone(), metrics))
}

/// The REST and ops routers over an open engine (the writer role serves the same REST API
/// over its fenced engine).
pub fn build_with_engine(
    engine: Arc<Engine>,
    auth_token: Option<String>,
    metrics: Metrics,
) -> (Arc<AppState>, axum::Router, axum::Router) {
    let state = Arc::new(AppState {
        backend: Arc::new(LocalBackend::new(engine)),
        auth_token,
        metrics: Arc::new(metrics),
    });
    let rest = api::milvus::with_grpc(api::rest::router(state.clone()), state.clone());
    let ops = api::ops_router(state.clone());
    (state, rest, ops)
}

/// Serve until `shutdown` resolves, report not ready for the shutdown delay while still
/// serving, then stop accepting, drain in-flight requests, flush every collection and stop.
pub async fn run(
    cfg: StandaloneConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let life = Lifecycle::starting("opening the engine (replaying WALs)");
    let ops_l = api::bind(cfg.metrics_listen).await?;
    let stop = api::StopSignal::default();
    let ops_task = api::spawn_http(ops_l, life.router(), stop.wait());
    let (state, rest, ops) = match build(&cfg).await {
        Ok(b) => b,
        Err(e) => {
            stop.stop();
            api::stop_servers([("ops", ops_task)]).await;
            return Err(e);
        }
    };
    life.serve(ops);
    let flusher = state.engine.spawn_flusher(cfg.flush_interval);
    let rest_l = api::bind(cfg.listen).await?;
    tracing::info!(rest = %cfg.listen, metrics = %cfg.metrics_listen, data_dir = %cfg.data_dir.display(), "shoal standalone listening");
    let rest_task = api::spawn_http(rest_l, rest, stop.wait());
    life.shutdown_after(shutdown, cfg.shutdown_delay).await;
    stop.stop();
    api::stop_servers([("REST", rest_task), ("ops", ops_task)]).await;
    flusher.abort();
    tracing::info!("shutting down: flushing collections");
    state.engine.shutdown().await;
    Ok(())
}
