//! The public REST API (Milvus REST v2) and its ops endpoints over the core. The REST handlers
//! are generic over a [`backend::Backend`]: the local engine (standalone, writer) or the cluster
//! (router). Listeners, the stop signal and `/readyz`'s body live in [`crate::server`]; roles
//! build on both; this module never imports a role.

pub mod backend;
pub mod error;
pub mod indexes;
pub mod metrics;
pub mod milvus;
pub mod rest;
pub mod rows;

use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use backend::Backend;
use rest::RestState;
use std::sync::Arc;

/// The REST API and ops endpoints over one local engine (standalone, and the writer's own REST
/// listener): the shared state, the REST router and the ops router.
pub fn build_local(
    engine: Arc<crate::core::engine::Engine>,
    auth_token: Option<String>,
    metrics: metrics::Metrics,
) -> (Arc<rest::AppState>, Router, Router) {
    let state = Arc::new(rest::AppState {
        backend: Arc::new(backend::LocalBackend::new(engine)),
        auth_token,
        metrics: Arc::new(metrics),
    });
    let rest = milvus::with_grpc(rest::router(state.clone()), state.clone());
    let ops = ops_router(state.clone());
    (state, rest, ops)
}

/// `/healthz` (process is up), `/readyz` (the backend can serve: metadata store answers, or for
/// the router the writer and at least one reader), `/metrics`.
pub fn ops_router<B: Backend>(state: Arc<RestState<B>>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(s): State<Arc<RestState<B>>>| async move {
                let (status, body) =
                    crate::server::readiness(s.backend.ready().await, s.metrics.gpu_status());
                (status, axum::Json(body)).into_response()
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
