//! Zero-failed-request rollouts: on SIGTERM a role reports not ready on `/readyz` at once,
//! keeps serving requests for `--shutdown-delay` (while endpoints and routers drop it), then
//! stops accepting, drains what is in flight and exits 0. Shown on a real `shoal-engine
//! standalone` process (the cluster roles share the sequence; `cluster_roles.rs` shows it on a
//! reader).
#![allow(clippy::unwrap_used)]

mod common;

use common::engine::{Engine, get, sigterm, wait_answer};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

async fn post(base: &str, path: &str, body: Value) -> Result<Value, reqwest::Error> {
    reqwest::Client::new()
        .post(format!("{base}/v2/vectordb/{path}"))
        .json(&body)
        .timeout(Duration::from_secs(5))
        .send()
        .await?
        .json()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigterm_standalone_is_unready_at_once_serves_through_the_delay_then_exits() {
    let _watchdog = shoal_testkit::watchdog(
        "after_sigterm_standalone_is_unready_at_once_serves_through_the_delay_then_exits",
        Duration::from_secs(60),
    );
    let dir = tempfile::tempdir().unwrap();
    let port = shoal_testkit::free_port().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let delay = Duration::from_secs(3);
    let mut e = Engine::spawn_logged(
        "standalone",
        "standalone",
        &[
            "--data-dir".into(),
            dir.path().join("data").display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--shutdown-delay".into(),
            "3s".into(),
        ],
        dir.path(),
    );
    e.ready(Duration::from_secs(30)).await;
    let r = post(
        &base,
        "collections/create",
        json!({"collectionName": "c", "dimension": 2}),
    )
    .await
    .unwrap();
    assert_eq!(r["code"], 0, "{r}");

    let t = Instant::now();
    sigterm(&e);
    wait_answer(
        &mut e,
        "/readyz",
        503,
        "shutting down",
        Duration::from_secs(1),
    )
    .await;
    let mut served = 0;
    // Requests during the delay still succeed (up to a margin before it ends).
    while t.elapsed() < delay - Duration::from_millis(700) {
        let r = post(
            &base,
            "entities/insert",
            json!({"collectionName": "c", "data": [{"id": served, "vector": [0.5, 1.0]}]}),
        )
        .await
        .unwrap_or_else(|err| panic!("request {served} during the shutdown delay failed: {err}"));
        assert_eq!(r["code"], 0, "{r}");
        served += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served > 5, "only {served} requests during the delay");
    assert!(get(&e, "/healthz").await.is_some_and(|(s, _)| s == 200));
    let status = e.exit_status(Duration::from_secs(20));
    assert!(status.success(), "{status}{}", e.log_tail());
    assert!(
        t.elapsed() >= delay,
        "exited {:?} after SIGTERM, before the delay",
        t.elapsed()
    );
}
