//! Crash safety of the real binary: a client streams inserts, the server is `kill -9`ed at
//! random points over several rounds and restarted; every acknowledged id must be present
//! exactly once with its exact vector, and nothing else but in-flight rows may appear.
#![allow(clippy::unwrap_used)]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DIM: usize = 8;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Server {
    child: Child,
    base: String,
}

impl Server {
    async fn start(dir: &std::path::Path) -> Server {
        let (p, m) = (free_port(), free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_shoal-engine"))
            .args(["standalone", "--data-dir"])
            .arg(dir)
            .args([
                "--listen",
                &format!("127.0.0.1:{p}"),
                "--metrics-listen",
                &format!("127.0.0.1:{m}"),
            ])
            .args(["--flush-interval", "150ms"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let s = Server {
            child,
            base: format!("http://127.0.0.1:{p}"),
        };
        // Wait for the condition "REST answers", bounded.
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = http
                .post(format!("{}/v2/vectordb/collections/list", s.base))
                .body("{}")
                .send()
                .await;
            if r.is_ok_and(|r| r.status().is_success()) {
                return s;
            }
            assert!(Instant::now() < deadline, "server did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill9(mut self) {
        self.child.kill().unwrap(); // SIGKILL on Unix
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn post(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    body: Value,
) -> Result<Value, String> {
    let r = http
        .post(format!("{base}/v2/vectordb/{path}"))
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let v: Value = r.json().await.map_err(|e| e.to_string())?;
    if v["code"] != 0 {
        return Err(v.to_string());
    }
    Ok(v["data"].clone())
}

fn vector_of(id: i64) -> Vec<f32> {
    (0..DIM)
        .map(|j| ((id * 31 + j as i64) as f32 * 0.013).sin())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_inserts_survive_repeated_kill_9_exactly_once_with_their_vectors() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let acked: Arc<Mutex<BTreeMap<i64, ()>>> = Arc::default();
    let mut attempted_max = 0i64;
    {
        let s = Server::start(dir.path()).await;
        post(
            &http,
            &s.base,
            "collections/create",
            json!({"collectionName": "crash", "dimension": DIM, "metricType": "L2"}),
        )
        .await
        .unwrap();
        s.kill9();
    }
    let next_id = Arc::new(std::sync::atomic::AtomicI64::new(0));
    for round in 0..5 {
        let s = Server::start(dir.path()).await;
        // Verify everything acknowledged so far.
        let ids: Vec<i64> = acked.lock().unwrap().keys().copied().collect();
        for chunk in ids.chunks(500) {
            let rows = post(
                &http,
                &s.base,
                "entities/get",
                json!({"collectionName": "crash", "id": chunk, "outputFields": ["vector"]}),
            )
            .await
            .unwrap();
            let rows = rows.as_array().unwrap();
            assert_eq!(
                rows.len(),
                chunk.len(),
                "round {round}: acknowledged ids missing"
            );
            for r in rows {
                let id = r["id"].as_i64().unwrap();
                let v: Vec<f32> = serde_json::from_value(r["vector"].clone()).unwrap();
                assert_eq!(v, vector_of(id), "round {round}: vector of {id}");
            }
        }
        let filter = format!("id >= 0 and id < {}", attempted_max.max(1));
        let total = post(
            &http,
            &s.base,
            "entities/query",
            json!({"collectionName": "crash", "filter": filter, "outputFields": ["count(*)"]}),
        )
        .await
        .unwrap()[0]["count(*)"]
            .as_i64()
            .unwrap();
        let all = post(
            &http,
            &s.base,
            "collections/get_stats",
            json!({"collectionName": "crash"}),
        )
        .await
        .unwrap()["rowCount"]
            .as_i64()
            .unwrap();
        assert_eq!(total, all, "round {round}: rows outside attempted ids");
        assert!(
            total as usize >= ids.len(),
            "round {round}: fewer rows than acknowledged"
        );
        assert!(
            total <= attempted_max,
            "round {round}: more rows than ever attempted (duplicates?)"
        );
        // Stream inserts from 4 clients; kill -9 at a random point.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (http, base, acked, next_id, stop) = (
                http.clone(),
                s.base.clone(),
                acked.clone(),
                next_id.clone(),
                stop.clone(),
            );
            tasks.push(tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let first = next_id.fetch_add(40, std::sync::atomic::Ordering::SeqCst);
                    let rows: Vec<Value> = (first..first + 40)
                        .map(|id| json!({"id": id, "vector": vector_of(id)}))
                        .collect();
                    match post(
                        &http,
                        &base,
                        "entities/insert",
                        json!({"collectionName": "crash", "data": rows}),
                    )
                    .await
                    {
                        Ok(d) => {
                            assert_eq!(d["insertCount"], 40);
                            let mut a = acked.lock().unwrap();
                            for id in first..first + 40 {
                                a.insert(id, ());
                            }
                        }
                        Err(_) => return, // the server died mid-request: not acknowledged
                    }
                }
            }));
        }
        let wait = Duration::from_millis(rng.random_range(200..1200));
        tokio::time::sleep(wait).await; // the random crash point, not synchronisation
        s.kill9();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for t in tasks {
            t.await.unwrap();
        }
        attempted_max = next_id.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            !acked.lock().unwrap().is_empty(),
            "round {round}: no insert was acknowledged"
        );
    }
    // Final check after the last crash.
    let s = Server::start(dir.path()).await;
    let ids: Vec<i64> = acked.lock().unwrap().keys().copied().collect();
    for chunk in ids.chunks(500) {
        let rows = post(
            &http,
            &s.base,
            "entities/get",
            json!({"collectionName": "crash", "id": chunk, "outputFields": ["vector"]}),
        )
        .await
        .unwrap();
        assert_eq!(rows.as_array().unwrap().len(), chunk.len());
    }
    let all = post(
        &http,
        &s.base,
        "collections/get_stats",
        json!({"collectionName": "crash"}),
    )
    .await
    .unwrap()["rowCount"]
        .as_i64()
        .unwrap();
    assert!(all as usize >= ids.len() && all <= attempted_max);
}
