//! The standalone role: writer, reader and router in one process — the engine over SQLite and
//! a local data directory, the REST API and the health/metrics listener.

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
    #[error("HTTP server failed")]
    Serve(#[source] std::io::Error),
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
    let rest = api::rest::router(state.clone());
    let ops = api::ops_router(state.clone());
    (state, rest, ops)
}

/// Serve until `shutdown` resolves, then flush every collection and stop.
pub async fn run(
    cfg: StandaloneConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (state, rest, ops) = build(&cfg).await?;
    let flusher = state.engine.spawn_flusher(cfg.flush_interval);
    let rest_l = api::bind(cfg.listen).await?;
    let ops_l = api::bind(cfg.metrics_listen).await?;
    tracing::info!(rest = %cfg.listen, metrics = %cfg.metrics_listen, data_dir = %cfg.data_dir.display(), "shoal standalone listening");
    api::serve_rest_and_ops(rest_l, rest, ops_l, ops, shutdown)
        .await
        .map_err(ServeError::Serve)?;
    flusher.abort();
    tracing::info!("shutting down: flushing collections");
    state.engine.shutdown().await;
    Ok(())
}
