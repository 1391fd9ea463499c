//! Network adapters over the core: the public REST API and the health/metrics listener.
//! Everything HTTP lives here; `core` never sees axum types. The REST handlers are generic over
//! a [`backend::Backend`]: the local engine (standalone, writer) or the cluster (router).

pub mod backend;
pub mod error;
pub mod indexes;
pub mod metrics;
pub mod rest;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use backend::Backend;
use rest::RestState;
use std::sync::Arc;

/// `/healthz` (process is up), `/readyz` (the backend can serve: metadata store answers, or for
/// the router the writer and at least one reader), `/metrics`.
pub fn ops_router<B: Backend>(state: Arc<RestState<B>>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(s): State<Arc<RestState<B>>>| async move {
                match s.backend.ready().await {
                    Ok(()) => (StatusCode::OK, "ready".to_string()).into_response(),
                    Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e).into_response(),
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(s): State<Arc<RestState<B>>>| async move {
                s.backend.update_gauges(&s.metrics);
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    s.metrics.render(),
                )
            }),
        )
        .with_state(state)
}
