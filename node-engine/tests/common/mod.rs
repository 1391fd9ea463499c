//! Shared helpers for the engine's integration tests: an in-process REST app and JSON posting,
//! and `shoal-engine` role processes ([`engine::Engine`]).
#![allow(dead_code, clippy::unwrap_used)]

pub mod engine;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::Value;
use shoal_engine::config::{LogFormat, StandaloneConfig};
use std::time::Duration;
use tower::ServiceExt;

pub struct App {
    pub rest: axum::Router,
    pub ops: axum::Router,
    pub state: std::sync::Arc<shoal_engine::api::rest::AppState>,
    pub dir: tempfile::TempDir,
}

pub fn config(dir: &std::path::Path, token: Option<&str>) -> StandaloneConfig {
    StandaloneConfig {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        log_format: LogFormat::Text,
        auth_token: token.map(str::to_string),
        flush_interval: Duration::from_secs(3600),
        meta_url: None,
        shutdown_delay: std::time::Duration::ZERO,
        gpu: Default::default(),
    }
}

/// Send `req` to an in-process router; its status and whole body.
pub async fn call(router: &axum::Router, req: Request<Body>) -> (StatusCode, axum::body::Bytes) {
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, bytes)
}

impl App {
    pub async fn new(token: Option<&str>) -> App {
        App::open(tempfile::tempdir().unwrap(), token).await
    }

    /// The standalone role over `dir`.
    async fn open(dir: tempfile::TempDir, token: Option<&str>) -> App {
        let (state, rest, ops) = shoal_engine::roles::standalone::build(&config(dir.path(), token))
            .await
            .unwrap();
        App {
            rest,
            ops,
            state,
            dir,
        }
    }

    /// Reopen the same data directory (a clean restart).
    pub async fn reopen(self) -> App {
        self.state.engine.shutdown().await;
        let dir = self.dir;
        drop(self.rest);
        drop(self.ops);
        drop(self.state);
        App::open(dir, None).await
    }

    pub async fn raw(
        &self,
        path: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut req = Request::post(format!("/v2/vectordb/{path}"))
            .header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let (status, bytes) =
            call(&self.rest, req.body(Body::from(body.to_string())).unwrap()).await;
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    pub async fn post(&self, path: &str, body: Value) -> Value {
        self.raw(path, &body.to_string(), &[]).await.1
    }

    /// Post and assert success; returns `data`.
    pub async fn ok(&self, path: &str, body: Value) -> Value {
        let v = self.post(path, body.clone()).await;
        assert_eq!(v["code"], 0, "{path} {body} -> {v}");
        v["data"].clone()
    }

    pub async fn get_ops(&self, path: &str) -> (StatusCode, String) {
        let (status, bytes) =
            call(&self.ops, Request::get(path).body(Body::empty()).unwrap()).await;
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }
}
