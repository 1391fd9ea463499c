//! What every role's process shares around its listeners: binding (an error that names the
//! address), serving HTTP (axum) and gRPC (tonic) until one [`StopSignal`], draining with a
//! grace period, and the `/readyz` body. Start-up against the metadata store and the
//! ready/draining state live in [`startup`] and [`lifecycle`].
//!
//! Must not import a role (`crate::roles`) or an API adapter (`crate::api`): they build on this.

pub mod lifecycle;
pub mod startup;

use axum::Router;
use axum::http::StatusCode;

/// Serve `router` on `listener` in a task until `stop` resolves (the cluster roles run several
/// such listeners side by side with one stop signal).
pub fn spawn_http(
    listener: tokio::net::TcpListener,
    router: Router,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<Result<(), String>> {
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(stop)
            .await
            .map_err(|e| e.to_string())
    })
}

/// A listener could not be bound (every role's start-up).
#[derive(Debug, thiserror::Error)]
#[error("failed to listen on {addr}")]
pub struct BindError {
    pub addr: std::net::SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Bind a TCP listener on `addr`.
///
/// Errors: [`BindError`] naming `addr`.
pub async fn bind(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener, BindError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// One stop signal for a role's servers: every [`StopSignal::wait`] future resolves once
/// [`StopSignal::stop`] was called (also when it was called before the wait began).
pub struct StopSignal(tokio::sync::watch::Sender<bool>);

impl Default for StopSignal {
    fn default() -> Self {
        StopSignal(tokio::sync::watch::channel(false).0)
    }
}

impl StopSignal {
    /// A future that resolves once the signal is given.
    pub fn wait(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.0.subscribe();
        async move {
            let _ = rx.wait_for(|v| *v).await;
        }
    }

    /// Give the signal.
    pub fn stop(&self) {
        self.0.send_replace(true);
    }
}

/// Wait (bounded) for servers told to stop to drain their in-flight requests; a server that
/// does not stop within the grace period is logged, not awaited.
pub async fn stop_servers<const N: usize>(
    tasks: [(&'static str, tokio::task::JoinHandle<Result<(), String>>); N],
) {
    let grace = std::time::Duration::from_secs(10);
    for (what, task) in tasks {
        match tokio::time::timeout(grace, task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                tracing::warn!(server = what, error = %e, "server stopped with an error")
            }
            Ok(Err(e)) => tracing::warn!(server = what, error = %e, "server task failed"),
            Err(_) => tracing::warn!(server = what, "server did not stop within the grace period"),
        }
    }
}

/// The `/readyz` answer: ready (200) when the backend can serve (standalone/writer: the metadata
/// store answers; router: the writer and a reader answer), else 503 with the backend's reason.
/// The GPU details (mode, reasons, devices, live samples) are reported either way and never
/// decide readiness: a reader without a GPU serves from the CPU.
pub fn readiness(
    backend: Result<(), String>,
    gpu: Option<crate::gpu::GpuStatus>,
) -> (StatusCode, serde_json::Value) {
    let (status, mut body) = match backend {
        Ok(()) => (StatusCode::OK, serde_json::json!({"status": "ready"})),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({
                "status": "unavailable",
                "reason": reason,
            }),
        ),
    };
    if let Some(g) = gpu {
        body["gpu"] = serde_json::to_value(g).unwrap_or_else(|e| {
            serde_json::Value::String(format!("GPU status not serialisable: {e}"))
        });
    }
    (status, body)
}

/// A TCP listener as the stream of connections tonic serves.
pub fn incoming(
    l: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(l, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    })
}

/// Serve the gRPC `routes` on `listener` in a task until `stop` resolves.
pub fn spawn_grpc(
    listener: tokio::net::TcpListener,
    routes: tonic::service::Routes,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<Result<(), String>> {
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming(listener), stop)
            .await
            .map_err(|e| crate::core::error_chain(&e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::GpuStatus;
    use crate::gpu::telemetry::{GpuInfo, GpuSample};

    fn fake_gpu() -> GpuStatus {
        GpuStatus {
            mode: "cpu",
            reasons: vec!["standalone searches on the CPU".into()],
            search_threshold: 1000,
            driver_version: Some("550.54.15".into()),
            cuda_driver_version: Some("12.4".into()),
            devices: vec![GpuInfo {
                index: 0,
                name: "NVIDIA H200".into(),
                uuid: "GPU-1234".into(),
                memory_total_bytes: 150 << 30,
                compute_capability: "9.0".into(),
            }],
            samples: vec![GpuSample {
                index: 0,
                memory_used_bytes: Some(1 << 30),
                memory_total_bytes: Some(150 << 30),
                utilization_percent: Some(7),
                temperature_celsius: Some(33),
                power_watts: Some(75.5),
            }],
            resident: vec![],
        }
    }

    #[test]
    fn readiness_reports_gpu_details_and_depends_only_on_the_backend() {
        let (status, body) = readiness(Ok(()), Some(fake_gpu()));
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["status"], "ready");
        assert_eq!(body["gpu"]["mode"], "cpu");
        assert_eq!(body["gpu"]["devices"][0]["name"], "NVIDIA H200");
        assert_eq!(body["gpu"]["devices"][0]["compute_capability"], "9.0");
        assert_eq!(body["gpu"]["driver_version"], "550.54.15");
        assert_eq!(body["gpu"]["samples"][0]["utilization_percent"], 7);
        assert_eq!(body["gpu"]["samples"][0]["power_watts"], 75.5);

        let (status, body) = readiness(Err("database is locked".into()), Some(fake_gpu()));
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["status"], "unavailable");
        assert!(
            body["reason"]
                .as_str()
                .is_some_and(|m| m.contains("database is locked")),
            "{body}"
        );
        assert_eq!(body["gpu"]["devices"][0]["index"], 0);

        let (_, body) = readiness(Ok(()), None);
        assert!(body.get("gpu").is_none(), "{body}");
    }
}
