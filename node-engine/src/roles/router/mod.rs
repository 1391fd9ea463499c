//! The router role: the public REST API (and /healthz, /readyz, /metrics) of a cluster over
//! [`RouterBackend`]. It connects to the metadata store without migrating it (it only reads the
//! catalogue; the writer owns the schema), retrying until `--meta-startup-timeout`
//! ([`crate::server::startup`]), waits for nothing else at start-up (the writer and readers may
//! come later: `/readyz` says when it can serve), runs the catalogue poll and the reader
//! membership loop, and on signal drains ([`crate::server::lifecycle`]) and stops.

pub mod backend;
pub mod config;
pub mod fanout;
pub mod hrw;
pub mod membership;

use crate::api::{self, metrics::Metrics, rest::RestState};
use crate::server;
use crate::server::lifecycle::Lifecycle;
use crate::server::startup::{MetaAccess, MetaStartupError, connect_meta};
use backend::{RouterBackend, RouterError, RouterOptions};
use config::RouterConfig;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum RouterServeError {
    #[error(transparent)]
    Meta(#[from] MetaStartupError),
    #[error(transparent)]
    Backend(#[from] RouterError),
    #[error(transparent)]
    Bind(#[from] crate::server::BindError),
}

/// The router's REST state and routers, and its background loops (abort them to stop).
pub struct Built {
    pub state: Arc<RestState<RouterBackend>>,
    pub rest: axum::Router,
    pub ops: axum::Router,
    pub loops: Vec<tokio::task::JoinHandle<()>>,
}

/// Connect to the metadata store, read the catalogue once, probe the readers once, start the
/// loops and build the HTTP routers.
pub async fn build(cfg: &RouterConfig) -> Result<Built, RouterServeError> {
    build_with(cfg, &Lifecycle::default()).await
}

/// [`build`], reporting on `life`'s `/readyz` what start-up waits for.
pub async fn build_with(cfg: &RouterConfig, life: &Lifecycle) -> Result<Built, RouterServeError> {
    let meta = connect_meta(
        &cfg.meta_url,
        MetaAccess::ReadOnly,
        cfg.meta_startup_timeout,
        life,
    )
    .await?;
    let backend = Arc::new(RouterBackend::new(
        meta,
        RouterOptions {
            writer: cfg.writer.clone(),
            discovery: cfg.discovery.clone(),
            replication: cfg.replication,
            request_timeout: cfg.request_timeout,
            flush_timeout: cfg.flush_timeout,
            catalog_poll: cfg.catalog_poll,
            health_interval: cfg.health_interval,
            connect_timeout: cfg.request_timeout.min(Duration::from_secs(3)),
            writer_failover: cfg.writer_failover_timeout,
        },
    )?);
    if let Err(e) = backend.refresh(0).await {
        tracing::warn!(error = %e.message, "first catalogue read failed; the poll retries");
    }
    backend.refresh_membership().await;
    let loops = backend.spawn_loops();
    let state = Arc::new(RestState {
        backend,
        auth_token: cfg.auth_token.clone(),
        metrics: Arc::new(Metrics::new()),
    });
    let rest = api::milvus::with_grpc(api::rest::router(state.clone()), state.clone());
    let ops = api::ops_router(state.clone());
    Ok(Built {
        state,
        rest,
        ops,
        loops,
    })
}

/// Serve until `shutdown` resolves, then report not ready for the shutdown delay while still
/// serving, then stop accepting and drain in-flight requests.
pub async fn run(
    cfg: RouterConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RouterServeError> {
    // The ops listener answers from the start: live, and not ready until the router serves.
    let life = Lifecycle::starting("connecting to the metadata store");
    let ops_l = server::bind(cfg.metrics_listen).await?;
    let stop = server::StopSignal::default();
    let ops_task = server::spawn_http(ops_l, life.router(), stop.wait());
    let mut shutdown = std::pin::pin!(shutdown);
    let b = tokio::select! {
        b = build_with(&cfg, &life) => b?,
        () = &mut shutdown => {
            tracing::info!("stopped during start-up");
            stop.stop();
            server::stop_servers([("ops", ops_task)]).await;
            return Ok(());
        }
    };
    life.serve(b.ops);
    let rest_l = server::bind(cfg.listen).await?;
    tracing::info!(rest = %cfg.listen, metrics = %cfg.metrics_listen, writer = %cfg.writer, discovery = ?cfg.discovery, replication = cfg.replication, "shoal router listening");
    let rest_task = server::spawn_http(rest_l, b.rest, stop.wait());
    life.shutdown_after(shutdown, cfg.shutdown_delay).await;
    stop.stop();
    server::stop_servers([("REST", rest_task), ("ops", ops_task)]).await;
    for l in b.loops {
        l.abort();
    }
    Ok(())
}
