//! The standalone role: writer, reader and router in one process — the engine over SQLite and
//! a local data directory, the REST API and the health/metrics listener.

use crate::api::{self, metrics::Metrics, rest::AppState};
use crate::config::StandaloneConfig;
use crate::core::engine::{Engine, EngineConfig, EngineError};
use crate::core::storage::collection::StorageOptions;
use crate::gpu::GpuRuntime;
use crate::server;
use crate::server::lifecycle::Lifecycle;
use std::future::Future;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("failed to open the engine")]
    OpenEngine(#[from] EngineError),
    #[error(transparent)]
    Bind(#[from] crate::server::BindError),
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
    Ok(api::build_local(engine, cfg.auth_token.clone(), metrics))
}

/// The REST and ops routers over an open engine (the writer role serves the same REST API
/// over its fenced engine).
/// Serve until `shutdown` resolves, report not ready for the shutdown delay while still
/// serving, then stop accepting, drain in-flight requests, flush every collection and stop.
pub async fn run(
    cfg: StandaloneConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let life = Lifecycle::starting("opening the engine (replaying WALs)");
    let ops_l = server::bind(cfg.metrics_listen).await?;
    let stop = server::StopSignal::default();
    let ops_task = server::spawn_http(ops_l, life.router(), stop.wait());
    let (state, rest, ops) = match build(&cfg).await {
        Ok(b) => b,
        Err(e) => {
            stop.stop();
            server::stop_servers([("ops", ops_task)]).await;
            return Err(e);
        }
    };
    life.serve(ops);
    let flusher = state.engine.spawn_flusher(cfg.flush_interval);
    let rest_l = server::bind(cfg.listen).await?;
    tracing::info!(rest = %cfg.listen, metrics = %cfg.metrics_listen, data_dir = %cfg.data_dir.display(), "shoal standalone listening");
    let rest_task = server::spawn_http(rest_l, rest, stop.wait());
    life.shutdown_after(shutdown, cfg.shutdown_delay).await;
    stop.stop();
    server::stop_servers([("REST", rest_task), ("ops", ops_task)]).await;
    flusher.abort();
    tracing::info!("shutting down: flushing collections");
    state.engine.shutdown().await;
    Ok(())
}
