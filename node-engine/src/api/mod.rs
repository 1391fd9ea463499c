//! Network adapters over the core: the public REST API and the health/metrics listener.
//! Everything HTTP lives here; `core` never sees axum types.

pub mod error;
pub mod indexes;
pub mod metrics;
pub mod rest;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use std::sync::Arc;

fn rest_collection(
    st: &rest::AppState,
    m: &serde_json::Map<String, serde_json::Value>,
) -> Result<Arc<crate::core::storage::collection::Collection>, error::ApiError> {
    match rest::opt_str(m, "dbName")? {
        None | Some("" | "default" | "_default") => {}
        Some(other) => {
            return Err(error::ApiError::invalid(
                "dbName",
                format!("database {other:?} does not exist"),
            ));
        }
    }
    let name = rest::req_str(m, "collectionName")?;
    Ok(st.engine.collection(name)?)
}

/// `/healthz` (process is up), `/readyz` (metadata store answers), `/metrics`.
pub fn ops_router(state: Arc<rest::AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(s): State<Arc<rest::AppState>>| async move {
                match s.engine.meta().ping().await {
                    Ok(()) => (StatusCode::OK, "ready".to_string()).into_response(),
                    Err(e) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("metadata store unavailable: {e}"),
                    )
                        .into_response(),
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(s): State<Arc<rest::AppState>>| async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    s.metrics.render(&s.engine),
                )
            }),
        )
        .with_state(state)
}
