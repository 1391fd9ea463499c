//! The router role: the public REST API (and /healthz, /readyz, /metrics) of a cluster over
//! [`RouterBackend`]. It connects to the metadata store without migrating it (it only reads the
//! catalogue; the writer owns the schema), waits
//! for nothing else at start-up (the writer and readers may come later: `/readyz` says when it
//! can serve), runs the catalogue poll and the reader membership loop, and stops on signal.

use crate::api::{self, metrics::Metrics, rest::RestState};
use crate::cluster::router_backend::{RouterBackend, RouterError, RouterOptions};
use crate::config::RouterConfig;
use crate::core::meta::{MetaError, MetaStore};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum RouterServeError {
    #[error("metadata store unreachable for {waited:?}")]
    Meta {
        waited: Duration,
        #[source]
        source: MetaError,
    },
    #[error(transparent)]
    Backend(#[from] RouterError),
    #[error(transparent)]
    Bind(#[from] crate::api::BindError),
    #[error("HTTP server failed")]
    Serve(#[source] std::io::Error),
}

/// How long start-up retries the metadata store before giving up.
const META_STARTUP: Duration = Duration::from_secs(60);

async fn connect_meta(url: &str) -> Result<MetaStore, RouterServeError> {
    let started = Instant::now();
    loop {
        match MetaStore::connect_read_only(url).await {
            Ok(m) => return Ok(m),
            Err(source) if started.elapsed() >= META_STARTUP => {
                return Err(RouterServeError::Meta {
                    waited: started.elapsed(),
                    source,
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "metadata store not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
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
    let meta = connect_meta(&cfg.meta_url).await?;
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
    let rest = api::rest::router(state.clone());
    let ops = api::ops_router(state.clone());
    Ok(Built {
        state,
        rest,
        ops,
        loops,
    })
}

/// Serve until `shutdown` resolves.
pub async fn run(
    cfg: RouterConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RouterServeError> {
    let b = build(&cfg).await?;
    let rest_l = api::bind(cfg.listen).await?;
    let ops_l = api::bind(cfg.metrics_listen).await?;
    tracing::info!(rest = %cfg.listen, metrics = %cfg.metrics_listen, writer = %cfg.writer, discovery = ?cfg.discovery, replication = cfg.replication, "shoal router listening");
    let res = api::serve_rest_and_ops(rest_l, b.rest, ops_l, b.ops, shutdown)
        .await
        .map_err(RouterServeError::Serve);
    for l in b.loops {
        l.abort();
    }
    res
}
