//! A role's life as the kubelet sees it through the ops listener (`/healthz`, `/readyz`,
//! `/metrics`): **starting** (the listener is up from the first moment, `/healthz` answers,
//! `/readyz` is 503 with what start-up is waiting for), **serving** (the role's own ops routes
//! answer) and **draining** (after SIGTERM: `/readyz` is 503 at once while the role keeps
//! serving for the shutdown delay, so endpoints and the router's reader list drop it before it
//! stops accepting; then the role stops its listeners and drains in-flight requests).
//!
//! Owns the phase and the shutdown sequence; the roles own their routes. Must not depend on a
//! role.

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tower::ServiceExt;

/// The ops listener's phase, shared by the role's start-up, its servers and the shutdown
/// sequence (cheap to clone).
#[derive(Clone, Default)]
pub struct Lifecycle {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The role's ops routes once it serves.
    routes: parking_lot::RwLock<Option<Router>>,
    /// What start-up is waiting for (the `/readyz` reason until the role serves).
    starting: parking_lot::RwLock<String>,
    draining: AtomicBool,
}

/// The 503 `/readyz` answer with `reason`.
fn unavailable(reason: String) -> Response {
    let (status, body) = super::readiness(Err(reason), None);
    (status, axum::Json(body)).into_response()
}

impl Lifecycle {
    /// Starting, with `reason` as the `/readyz` answer.
    pub fn starting(reason: impl Into<String>) -> Self {
        let l = Self::default();
        l.set_starting(reason);
        l
    }

    /// Say what start-up waits for now (e.g. the last metadata connection error).
    pub fn set_starting(&self, reason: impl Into<String>) {
        *self.inner.starting.write() = reason.into();
    }

    /// What start-up waits for now.
    pub fn starting_reason(&self) -> String {
        self.inner.starting.read().clone()
    }

    /// The role serves: its own ops routes answer from now on (`/readyz` stays 503 while
    /// draining).
    pub fn serve(&self, routes: Router) {
        *self.inner.routes.write() = Some(routes);
    }

    /// Report not ready from now on (SIGTERM).
    pub fn drain(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// The router to serve on the ops listener for the whole life of the process.
    pub fn router(&self) -> Router {
        let me = self.clone();
        Router::new().fallback_service(tower::service_fn(move |req: Request| {
            let me = me.clone();
            async move { Ok::<_, Infallible>(me.dispatch(req).await) }
        }))
    }

    async fn dispatch(&self, req: Request) -> Response {
        let path = req.uri().path().to_string();
        if path == "/readyz" && self.is_draining() {
            return unavailable("shutting down".into());
        }
        let routes = self.inner.routes.read().clone();
        match (routes, path.as_str()) {
            (Some(r), _) => match r.oneshot(req).await {
                Ok(resp) => resp,
                Err(never) => match never {},
            },
            (None, "/healthz") => "ok".into_response(),
            (None, "/readyz") => unavailable(format!("starting: {}", self.starting_reason())),
            (None, _) => (StatusCode::SERVICE_UNAVAILABLE, "starting").into_response(),
        }
    }

    /// Wait for `signal`, then report not ready at once and keep serving for `delay`;
    /// resolves when the role must stop accepting and drain its in-flight requests.
    pub async fn shutdown_after(&self, signal: impl Future<Output = ()>, delay: Duration) {
        signal.await;
        self.drain();
        tracing::info!(
            ?delay,
            "shutdown requested: reporting not ready and serving for the shutdown delay"
        );
        tokio::time::sleep(delay).await;
        tracing::info!("shutdown delay over: no new connections; draining in-flight requests");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::get;

    async fn get_path(r: &Router, path: &str) -> (StatusCode, String) {
        let resp = r
            .clone()
            .oneshot(
                axum::http::Request::get(path)
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("infallible");
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("body");
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn ops_answer_live_but_unready_while_starting_then_the_roles_routes_then_unready_when_draining()
     {
        let life = Lifecycle::starting("connecting to the metadata store");
        let ops = life.router();
        assert_eq!(get_path(&ops, "/healthz").await.0, StatusCode::OK);
        let (s, body) = get_path(&ops, "/readyz").await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("connecting to the metadata store"), "{body}");
        life.set_starting("metadata store: dns error");
        assert!(get_path(&ops, "/readyz").await.1.contains("dns error"));

        life.serve(
            Router::new()
                .route("/readyz", get(|| async { "ready" }))
                .route("/metrics", get(|| async { "m 1" })),
        );
        assert_eq!(
            get_path(&ops, "/readyz").await,
            (StatusCode::OK, "ready".into())
        );

        life.drain();
        let (s, body) = get_path(&ops, "/readyz").await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("shutting down"), "{body}");
        assert_eq!(get_path(&ops, "/metrics").await.1, "m 1");
    }
}
