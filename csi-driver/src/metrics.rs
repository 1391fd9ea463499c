//! Prometheus metrics and the `/metrics` HTTP endpoint.
//!
//! Owns the registry: `shoal_csi_calls_total{method}`, `shoal_csi_errors_total{method,code}`,
//! `shoal_csi_mounts` (healthy staged JuiceFS mounts), `shoal_csi_remounts_total`. Labels are
//! static strings (method names, gRPC code names), never request contents.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    method: &'static str,
    code: &'static str,
}

/// The driver's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    calls: Family<MethodLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    mounts: Gauge<i64, AtomicI64>,
    remounts: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("shoal_csi");
        let calls = Family::<MethodLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let mounts = Gauge::<i64, AtomicI64>::default();
        let remounts = Counter::default();
        registry.register("calls", "CSI calls received", calls.clone());
        registry.register(
            "errors",
            "CSI calls that failed, by gRPC code",
            errors.clone(),
        );
        registry.register("mounts", "Healthy staged JuiceFS mounts", mounts.clone());
        registry.register(
            "remounts",
            "Dead JuiceFS mounts the watchdog remounted",
            remounts.clone(),
        );
        Self {
            registry,
            calls,
            errors,
            mounts,
            remounts,
        }
    }

    /// Counts a call.
    pub fn call(&self, method: &'static str) {
        self.calls.get_or_create(&MethodLabels { method }).inc();
    }

    /// Counts a failed call.
    pub fn error(&self, method: &'static str, code: tonic::Code) {
        self.errors
            .get_or_create(&ErrorLabels {
                method,
                code: code_name(code),
            })
            .inc();
    }

    /// Sets the number of healthy staged mounts.
    pub fn set_mounts(&self, n: usize) {
        self.mounts.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts a remount by the watchdog.
    pub fn remount(&self) {
        self.remounts.inc();
    }

    /// Text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Serves `GET /metrics` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m.encode(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_calls_errors_and_remounts() {
        let m = Metrics::new();
        m.call("NodeStageVolume");
        m.error("NodeStageVolume", tonic::Code::Aborted);
        m.remount();
        m.set_mounts(2);
        let text = m.encode();
        assert!(
            text.contains("shoal_csi_calls_total{method=\"NodeStageVolume\"} 1"),
            "{text}"
        );
        assert!(text.contains("code=\"ABORTED\""), "{text}");
        assert!(text.contains("shoal_csi_remounts_total 1"), "{text}");
        assert!(text.contains("shoal_csi_mounts 2"), "{text}");
    }
}
