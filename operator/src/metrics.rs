//! Prometheus metrics and the `/metrics` + `/healthz` HTTP server.
//!
//! Labels are static strings (`ReconcileError::category()`), never error text, so the series
//! count stays bounded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CategoryLabels {
    pub category: &'static str,
}

/// The operator's metrics.
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Family<ResultLabels, Counter>,
    pub errors: Family<CategoryLabels, Counter>,
    pub duration: Histogram,
    /// Set once the process holds the leader Lease (reported on `/metrics` and logged).
    pub leader: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("shoal_operator");
        let reconciles = Family::<ResultLabels, Counter>::default();
        let errors = Family::<CategoryLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        registry.register(
            "reconciles",
            "Reconciles by result (ok, invalid, error)",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconciles by error category",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile",
            duration.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            duration,
            leader: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    pub fn observe(&self, result: &'static str, category: Option<&'static str>, took: Duration) {
        self.reconciles
            .get_or_create(&ResultLabels { result })
            .inc();
        if let Some(category) = category {
            self.errors
                .get_or_create(&CategoryLabels { category })
                .inc();
        }
        self.duration.observe(took.as_secs_f64());
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        let leader = u8::from(self.leader.load(Ordering::Relaxed));
        out.insert_str(
            0,
            &format!(
                "# HELP shoal_operator_leader Whether this replica holds the leader Lease.\n# TYPE shoal_operator_leader gauge\nshoal_operator_leader {leader}\n"
            ),
        );
        out
    }
}

async fn metrics_handler(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok")
}

/// Serves `/metrics` and `/healthz` until the task is dropped.
///
/// Errors: if the address cannot be bound or the server fails.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .with_state(metrics);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_counted_by_category_and_leadership_is_exported() {
        let m = Metrics::default();
        m.observe("error", Some("apply"), Duration::from_millis(3));
        m.observe("ok", None, Duration::from_millis(1));
        m.leader.store(true, Ordering::Relaxed);
        let text = m.render();
        assert!(
            text.contains("shoal_operator_reconcile_errors_total{category=\"apply\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("shoal_operator_reconciles_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(text.contains("shoal_operator_leader 1"), "{text}");
    }
}
