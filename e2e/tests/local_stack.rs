//! The whole stack on one machine, always in CI: the real `shoal-csi` over its unix socket stages
//! a JuiceFS volume (real Redis, real `juicefs`) and publishes it read-write for the writer and
//! read-only for each reader; MariaDB holds the catalogue; `shoal-engine writer`, `reader` and
//! `router` run as processes on those targets. A client inserts 200,000 vectors through the
//! router and checks every search against an exact oracle while the readers scale 2 → 4 → 1 → 2,
//! a reader is `kill -9`ed, and the JuiceFS mount process is `kill -9`ed (the CSI watchdog
//! remounts and re-binds). Then pymilvus runs the Milvus quickstart through the router's gRPC
//! API (`e2e/milvus/pymilvus_quickstart.py`). Everything is torn down and unmounted at the end,
//! even on failure.
//!
//! The same run goes once per object store under JuiceFS: local files, Azurite (`wasb`, with a
//! connection string through the JuiceFS Secret's `envs`) and moto's S3 server (`s3`, path-style
//! bucket), the last two started on loopback ports by the testkit (`make deps`).
//!
//! Prints one `E2E-FIGURES {json}` line (BENCHMARKS.md, "End-to-end"):
//! `cargo test -p shoal-e2e --test local_stack -- --nocapture`.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shoal_csi::csi;
use shoal_csi::csi::controller_client::ControllerClient;
use shoal_csi::csi::node_client::NodeClient;
use shoal_csi::csi::volume_capability::access_mode::Mode;
use shoal_csi::csi::volume_capability::{AccessMode, AccessType, MountVolume};
use shoal_testkit::mariadb::MariaDb;
use shoal_testkit::{ObjectStoreKind, ObjectStoreServer, RedisOptions, RedisServer, free_port};
use tonic::transport::Channel;

const DIM: usize = 32;
const ROWS: usize = 200_000;
const BATCH: usize = 10_000;
const K: usize = 10;
const COLLECTION: &str = "e2e_vectors";

/// Binaries of the other workspace packages sit next to this test's directory
/// (`target/debug/deps/local_stack-*` → `target/debug/`).
fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing; build the workspace first (`cargo test --workspace` builds it)",
        p.display()
    );
    p
}

/// One engine or plugin process, killed on drop.
struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, program: &Path, args: &[String], logs: &Path) -> Proc {
        let log = logs.join(format!("{name}.log"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(program)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn assert_running(&mut self) {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(st)) = c.try_wait()
        {
            panic!("{} exited with {st}:\n{}", self.name, self.log_tail());
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Kills juicefs processes serving paths under `root` and detaches every mount there (deepest
/// first): runs first on teardown, before Redis stops, so nothing can block on a lost metadata
/// server.
struct MountSweeper(PathBuf);

impl Drop for MountSweeper {
    fn drop(&mut self) {
        for pid in juicefs_pids_for(&self.0) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        for _ in 0..4 {
            let table = shoal_csi::mountinfo::read_self().unwrap_or_default();
            let mut under: Vec<PathBuf> = table
                .iter()
                .map(|e| e.mount_point.clone())
                .filter(|p| p.starts_with(&self.0))
                .collect();
            if under.is_empty() {
                break;
            }
            under.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
            for p in under {
                let _ = Command::new("timeout")
                    .args(["10", "umount", "-l"])
                    .arg(&p)
                    .status();
            }
        }
    }
}

fn juicefs_pids_for(path: &Path) -> Vec<u32> {
    let needle = path.to_string_lossy().to_string();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains("juicefs") && cmd.contains(" mount ") && cmd.contains(&needle) {
            pids.push(pid);
        }
    }
    pids
}

async fn csi_connect(socket: &Path) -> Option<(ControllerClient<Channel>, NodeClient<Channel>)> {
    let path = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::try_from("http://[::1]:50051")
        .ok()?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .ok()?;
    Some((
        ControllerClient::new(channel.clone()),
        NodeClient::new(channel),
    ))
}

fn rwx() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode {
            mode: Mode::MultiNodeMultiWriter as i32,
        }),
    }
}

/// Deterministic pseudo-random vectors (SplitMix64), no extra dependency.
fn vectors(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    let mut out = Vec::with_capacity(n * DIM);
    for _ in 0..n * DIM {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        out.push((z >> 40) as f32 / (1u64 << 24) as f32);
    }
    out
}

fn l2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Exact top-K ids (ties by id) over `base` rows whose id is their index.
fn oracle(base: &[f32], q: &[f32]) -> Vec<(f32, i64)> {
    let mut all: Vec<(f32, i64)> = base
        .chunks_exact(DIM)
        .enumerate()
        .map(|(i, v)| (l2(v, q), i as i64))
        .collect();
    all.select_nth_unstable_by(K, |a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    all.truncate(K);
    all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    all
}

/// A search result is exact when it returns K hits whose true distances equal the oracle's
/// (ids may differ only between equal distances).
fn is_exact(base: &[f32], q: &[f32], want: &[(f32, i64)], got: &Value) -> bool {
    let Some(hits) = got["data"].as_array() else {
        return false;
    };
    if hits.len() != want.len() {
        return false;
    }
    hits.iter().zip(want).all(|(h, (d, _))| {
        let Some(id) = h["id"].as_i64() else {
            return false;
        };
        let Some(row) = base.chunks_exact(DIM).nth(id as usize) else {
            return false;
        };
        (l2(row, q) - d).abs() <= 1e-4 * d.max(1.0)
    })
}

struct Rest {
    http: reqwest::Client,
    base: String,
}

impl Rest {
    async fn call(&self, path: &str, body: Value) -> Result<Value, String> {
        let r = self
            .http
            .post(format!("{}/v2/vectordb/{path}", self.base))
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("{path}: {e}"))?;
        let v: Value = r.json().await.map_err(|e| format!("{path}: {e}"))?;
        if v["code"] != 0 {
            return Err(format!("{path}: {v}"));
        }
        Ok(v)
    }
}

async fn wait_http_ok(url: &str, limit: Duration, what: &str, procs: &mut [&mut Proc]) -> Duration {
    let start = Instant::now();
    let http = reqwest::Client::new();
    loop {
        if let Ok(r) = http.get(url).timeout(Duration::from_secs(2)).send().await
            && r.status().is_success()
        {
            return start.elapsed();
        }
        for p in procs.iter_mut() {
            p.assert_running();
        }
        assert!(
            start.elapsed() < limit,
            "{what} not ready at {url} after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

struct Reader {
    proc: Proc,
    grpc: u16,
    metrics: u16,
}

struct Stack {
    root: PathBuf,
    logs: PathBuf,
    db_url: String,
    writer_grpc: u16,
}

impl Stack {
    fn reader(&self, i: usize) -> Reader {
        let grpc = free_port().unwrap();
        let metrics = free_port().unwrap();
        let proc = Proc::spawn(
            &format!("reader-{i}"),
            &bin("shoal-engine"),
            &[
                "reader".into(),
                "--meta".into(),
                self.db_url.clone(),
                "--data-dir".into(),
                self.root
                    .join(format!("pods/reader-{i}"))
                    .display()
                    .to_string(),
                "--grpc-listen".into(),
                addr(grpc),
                "--metrics-listen".into(),
                addr(metrics),
                "--node-id".into(),
                format!("reader-{i}"),
            ],
            &self.logs,
        );
        Reader {
            proc,
            grpc,
            metrics,
        }
    }
}

fn write_readers_file(path: &Path, readers: &[&Reader]) {
    let text: String = readers
        .iter()
        .map(|r| format!("{}\n", addr(r.grpc)))
        .collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[derive(Default)]
struct LoadStats {
    ok: AtomicU64,
    failed: AtomicU64,
    inexact: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_stack_stays_exact_through_scaling_a_reader_kill_and_a_mount_kill() {
    local_stack(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_stack_stays_exact_through_scaling_a_reader_kill_and_a_mount_kill_on_azurite() {
    local_stack(Some(ObjectStoreKind::Azurite)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_stack_stays_exact_through_scaling_a_reader_kill_and_a_mount_kill_on_s3() {
    local_stack(Some(ObjectStoreKind::S3)).await;
}

/// The JuiceFS secret fields that choose the object store (a local directory when `None`).
fn store_secrets(
    store: Option<&ObjectStoreServer>,
    root: &Path,
    fs: &str,
) -> Vec<(&'static str, String)> {
    match store {
        None => vec![
            ("storage", "file".to_string()),
            ("bucket", format!("{}/", root.join("bucket").display())),
        ],
        Some(os) => {
            os.create_bucket(fs).unwrap();
            match os.kind() {
                ObjectStoreKind::Azurite => vec![
                    ("storage", "wasb".to_string()),
                    ("bucket", os.bucket_url(fs)),
                    (
                        "envs",
                        json!({ "AZURE_STORAGE_CONNECTION_STRING": os.connection_string() })
                            .to_string(),
                    ),
                ],
                ObjectStoreKind::S3 => vec![
                    ("storage", "s3".to_string()),
                    ("bucket", os.bucket_url(fs)),
                    (
                        "access-key",
                        shoal_testkit::objstore::S3_ACCESS_KEY.to_string(),
                    ),
                    (
                        "secret-key",
                        shoal_testkit::objstore::S3_SECRET_KEY.to_string(),
                    ),
                ],
            }
        }
    }
}

async fn local_stack(store: Option<ObjectStoreKind>) {
    let _watchdog = shoal_testkit::watchdog("local_stack", Duration::from_secs(480));
    shoal_testkit::require_fuse().unwrap();
    let t_start = Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix("shoal-e2e-")
        .tempdir()
        .unwrap();
    let root = tmp.path().to_path_buf();
    let logs = root.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let redis = RedisServer::start_with(RedisOptions {
        password: Some("e2e-redis-pw".into()),
        appendonly: false,
    })
    .unwrap();
    let db = MariaDb::start().unwrap();
    let object_store = store.map(|k| ObjectStoreServer::start(k).unwrap());
    // Declared after the services so it drops first: mounts go before Redis does.
    let _sweeper = MountSweeper(root.clone());

    // --- CSI: one staged JuiceFS volume, a rw target for the writer, ro targets for readers.
    let socket = root.join("csi.sock");
    let mut plugin = Proc::spawn(
        "shoal-csi",
        &bin("shoal-csi"),
        &[
            "--endpoint".into(),
            format!("unix://{}", socket.display()),
            "--node-id".into(),
            "e2e-node".into(),
            "--mode".into(),
            "all".into(),
            "--state-dir".into(),
            root.join("csi-state").display().to_string(),
            "--juicefs".into(),
            shoal_testkit::juicefs_binary()
                .unwrap()
                .display()
                .to_string(),
            "--metrics-listen".into(),
            addr(free_port().unwrap()),
            "--watchdog-interval-ms".into(),
            "200".into(),
        ],
        &logs,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut controller, mut node) = loop {
        if let Some(c) = csi_connect(&socket).await {
            break c;
        }
        plugin.assert_running();
        assert!(Instant::now() < deadline, "shoal-csi never answered");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let secrets: HashMap<String, String> = [
        ("name", "shoale2e".to_string()),
        ("metaurl", redis.url(1)),
        ("format-options", "trash-days=0".to_string()),
    ]
    .into_iter()
    .chain(store_secrets(object_store.as_ref(), &root, "shoale2e"))
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let vol = controller
        .create_volume(csi::CreateVolumeRequest {
            name: "shoal-e2e-data".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 1 << 30,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![rwx()],
            secrets: secrets.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let staging = root.join("staging");
    node.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(rwx()),
        secrets: secrets.clone(),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut targets = vec![("writer".to_string(), false)];
    targets.extend((0..4).map(|i| (format!("reader-{i}"), true)));
    for (pod, ro) in &targets {
        node.node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            target_path: root.join("pods").join(pod).display().to_string(),
            volume_capability: Some(rwx()),
            readonly: *ro,
            volume_context: vol.volume_context.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }

    // --- Engine processes.
    let stack = Stack {
        root: root.clone(),
        logs: logs.clone(),
        db_url: db.url(),
        writer_grpc: free_port().unwrap(),
    };
    let writer_rest = free_port().unwrap();
    let writer_metrics = free_port().unwrap();
    let mut writer = Proc::spawn(
        "writer",
        &bin("shoal-engine"),
        &[
            "writer".into(),
            "--meta".into(),
            stack.db_url.clone(),
            "--data-dir".into(),
            root.join("pods/writer").display().to_string(),
            "--wal-dir".into(),
            root.join("wal").display().to_string(),
            "--listen".into(),
            addr(writer_rest),
            "--grpc-listen".into(),
            addr(stack.writer_grpc),
            "--metrics-listen".into(),
            addr(writer_metrics),
            "--node-id".into(),
            "writer-0".into(),
        ],
        &logs,
    );
    wait_http_ok(
        &format!("http://{}/readyz", addr(writer_metrics)),
        Duration::from_secs(60),
        "writer",
        &mut [&mut writer],
    )
    .await;
    let mut readers: Vec<Option<Reader>> = (0..4).map(|_| None).collect();
    for (i, slot) in readers.iter_mut().enumerate().take(2) {
        *slot = Some(stack.reader(i));
    }
    for r in readers.iter_mut().flatten() {
        let url = format!("http://{}/readyz", addr(r.metrics));
        wait_http_ok(&url, Duration::from_secs(60), "reader", &mut [&mut r.proc]).await;
    }
    let readers_file = root.join("readers.txt");
    write_readers_file(&readers_file, &readers.iter().flatten().collect::<Vec<_>>());
    let router_rest = free_port().unwrap();
    let router_metrics = free_port().unwrap();
    let mut router = Proc::spawn(
        "router",
        &bin("shoal-engine"),
        &[
            "router".into(),
            "--meta".into(),
            stack.db_url.clone(),
            "--writer".into(),
            addr(stack.writer_grpc),
            "--readers-file".into(),
            readers_file.display().to_string(),
            "--listen".into(),
            addr(router_rest),
            "--metrics-listen".into(),
            addr(router_metrics),
        ],
        &logs,
    );
    wait_http_ok(
        &format!("http://{}/readyz", addr(router_metrics)),
        Duration::from_secs(60),
        "router",
        &mut [&mut router],
    )
    .await;

    // --- Data through the router.
    let rest = Rest {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap(),
        base: format!("http://{}", addr(router_rest)),
    };
    rest.call(
        "collections/create",
        json!({"collectionName": COLLECTION, "dimension": DIM, "metricType": "L2"}),
    )
    .await
    .unwrap();
    let base = Arc::new(vectors(ROWS, 7));
    let t_insert = Instant::now();
    for (b, chunk) in base.chunks(BATCH * DIM).enumerate() {
        let rows: Vec<Value> = chunk
            .chunks_exact(DIM)
            .enumerate()
            .map(|(i, v)| json!({"id": (b * BATCH + i) as i64, "vector": v}))
            .collect();
        let r = rest
            .call(
                "entities/insert",
                json!({"collectionName": COLLECTION, "data": rows}),
            )
            .await
            .unwrap();
        assert_eq!(r["data"]["insertCount"], BATCH);
    }
    let insert_s = t_insert.elapsed().as_secs_f64();
    rest.call("collections/flush", json!({"collectionName": COLLECTION}))
        .await
        .unwrap();
    let queries = vectors(64, 99);
    let want: Arc<Vec<Vec<(f32, i64)>>> = Arc::new(
        queries
            .chunks_exact(DIM)
            .map(|q| oracle(&base, q))
            .collect(),
    );
    let first = rest
        .call(
            "entities/search",
            json!({"collectionName": COLLECTION, "data": [&queries[..DIM]], "limit": K}),
        )
        .await
        .unwrap();
    assert!(
        is_exact(&base, &queries[..DIM], &want[0], &first),
        "first search is not exact: {first}"
    );
    let searchable_s = t_start.elapsed().as_secs_f64();
    let count = rest
        .call(
            "entities/query",
            json!({"collectionName": COLLECTION, "filter": "id >= 0", "outputFields": ["count(*)"]}),
        )
        .await
        .unwrap();
    assert_eq!(count["data"][0]["count(*)"], ROWS, "{count}");

    // --- Search load in the background for the rest of the test.
    let stats = Arc::new(LoadStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let latencies = Arc::new(latency::Lat::default());
    let load = {
        let (stats, stop, base, want, lat) = (
            stats.clone(),
            stop.clone(),
            base.clone(),
            want.clone(),
            latencies.clone(),
        );
        let queries = queries.clone();
        let url = format!("http://{}/v2/vectordb/entities/search", addr(router_rest));
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let qi = i % want.len();
                let q = &queries[qi * DIM..(qi + 1) * DIM];
                let t = Instant::now();
                let r = http
                    .post(&url)
                    .json(&json!({"collectionName": COLLECTION, "data": [q], "limit": K}))
                    .send()
                    .await;
                let v = match r {
                    Ok(r) => r.json::<Value>().await.ok(),
                    Err(_) => None,
                };
                match v {
                    Some(v) if v["code"] == 0 => {
                        lat.push(t.elapsed());
                        if is_exact(&base, q, &want[qi], &v) {
                            stats.ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            stats.inexact.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    _ => {
                        stats.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += 1;
            }
        })
    };
    let phase = |name: &'static str| {
        let stats = stats.clone();
        async move {
            let before = stats.ok.load(Ordering::Relaxed);
            let t = Instant::now();
            // Each phase runs until 150 more exact answers arrived (a condition, not a sleep).
            while stats.ok.load(Ordering::Relaxed) < before + 150 {
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "phase {name}: searches stopped succeeding"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            eprintln!("phase {name}: {:?}", t.elapsed());
        }
    };
    phase("2 readers").await;

    // Scale 2 → 4.
    for (i, slot) in readers.iter_mut().enumerate().skip(2) {
        let mut r = stack.reader(i);
        let url = format!("http://{}/readyz", addr(r.metrics));
        wait_http_ok(&url, Duration::from_secs(60), "reader", &mut [&mut r.proc]).await;
        *slot = Some(r);
    }
    write_readers_file(&readers_file, &readers.iter().flatten().collect::<Vec<_>>());
    phase("4 readers").await;
    // Scale 4 → 1: leave the list first (as a Service drops a terminating pod), then stop.
    write_readers_file(&readers_file, &[readers[0].as_ref().unwrap()]);
    phase("1 reader (others still running)").await;
    for r in readers.iter_mut().skip(1) {
        *r = None;
    }
    phase("1 reader").await;
    let failed_before_kill = stats.failed.load(Ordering::Relaxed);

    // Back to 2, then kill -9 one reader while it is listed.
    let mut r1 = stack.reader(1);
    let url = format!("http://{}/readyz", addr(r1.metrics));
    wait_http_ok(&url, Duration::from_secs(60), "reader", &mut [&mut r1.proc]).await;
    readers[1] = Some(r1);
    write_readers_file(&readers_file, &readers.iter().flatten().collect::<Vec<_>>());
    phase("2 readers again").await;
    let t_kill = Instant::now();
    if let Some(r) = readers[1].as_mut() {
        r.proc.kill();
    }
    phase("after reader kill -9").await;
    let reader_recovery_s = t_kill.elapsed().as_secs_f64();
    let failed_by_reader_kill = stats.failed.load(Ordering::Relaxed) - failed_before_kill;
    write_readers_file(&readers_file, &[readers[0].as_ref().unwrap()]);

    // kill -9 the JuiceFS mount process: the CSI watchdog remounts and re-binds the targets.
    let pids = juicefs_pids_for(&staging);
    assert!(
        !pids.is_empty(),
        "no juicefs process serves {}",
        staging.display()
    );
    let t_mount = Instant::now();
    for pid in &pids {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    // Recovered = new data written by the writer after the kill is searchable through the router.
    let extra = vectors(1, 12345);
    let new_id = ROWS as i64;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last_error: String;
    loop {
        let step = async {
            rest.call(
                "entities/upsert",
                json!({"collectionName": COLLECTION, "data": [{"id": new_id, "vector": extra}]}),
            )
            .await?;
            rest.call("collections/flush", json!({"collectionName": COLLECTION}))
                .await?;
            let v = rest
                .call(
                    "entities/search",
                    json!({"collectionName": COLLECTION, "data": [&extra], "limit": 1}),
                )
                .await?;
            if v["data"][0]["id"] == new_id {
                Ok(())
            } else {
                Err(format!("the new row is not found yet: {v}"))
            }
        };
        match step.await {
            Ok(()) => break,
            Err(e) => last_error = e,
        }
        writer.assert_running();
        if Instant::now() > deadline {
            panic!(
                "the stack did not recover from the mount kill: {last_error}\n--- writer:\n{}\n--- router:\n{}\n--- reader-0:\n{}\n--- shoal-csi:\n{}",
                writer.log_tail(),
                router.log_tail(),
                readers[0]
                    .as_ref()
                    .map(|r| r.proc.log_tail())
                    .unwrap_or_default(),
                plugin.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mount_recovery_s = t_mount.elapsed().as_secs_f64();
    phase("after mount kill").await;

    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let (p50, p99, n) = latencies.percentiles();
    let searched_s = t_start.elapsed().as_secs_f64() - searchable_s;
    let figures = json!({
        "rows": ROWS, "dim": DIM,
        "nothing_to_searchable_s": searchable_s,
        "insert_rows_per_s": ROWS as f64 / insert_s,
        "searches_ok": stats.ok.load(Ordering::Relaxed),
        "searches_failed": stats.failed.load(Ordering::Relaxed),
        "searches_failed_by_reader_kill": failed_by_reader_kill,
        "searches_inexact": stats.inexact.load(Ordering::Relaxed),
        "search_qps": n as f64 / searched_s,
        "search_p50_ms": p50 * 1e3, "search_p99_ms": p99 * 1e3,
        "reader_kill_to_next_exact_s": reader_recovery_s,
        "mount_kill_to_new_data_searchable_s": mount_recovery_s,
    });
    println!("E2E-FIGURES {figures}");
    assert_eq!(
        stats.inexact.load(Ordering::Relaxed),
        0,
        "inexact results: {figures}"
    );
    assert_eq!(
        failed_before_kill, 0,
        "searches failed while scaling readers: {figures}"
    );

    // --- The Milvus gRPC API through the router: pymilvus (`make deps`) runs the Milvus
    // quickstart against its oracle (once, on the local-files store).
    if store.is_none() {
        pymilvus_quickstart(&addr(router_rest), &router).await;
    }

    // --- Teardown in order: engines, targets, staging, plugin; then the sweeper and services.
    drop(router);
    readers.clear();
    drop(writer);
    // ABORTED is the CSI spec's "another operation on this volume is in progress, retry" (the
    // watchdog may still be healing the mount killed above): retry as a kubelet does.
    for (pod, _) in &targets {
        let req = csi::NodeUnpublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            target_path: root.join("pods").join(pod).display().to_string(),
        };
        until_not_aborted("unpublish", || {
            let (mut n, r) = (node.clone(), req.clone());
            async move { n.node_unpublish_volume(r).await }
        })
        .await;
    }
    let req = csi::NodeUnstageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
    };
    until_not_aborted("unstage", || {
        let (mut n, r) = (node.clone(), req.clone());
        async move { n.node_unstage_volume(r).await }
    })
    .await;
    let left: Vec<_> = shoal_csi::mountinfo::read_self()
        .unwrap()
        .into_iter()
        .filter(|e| {
            e.mount_point.starts_with(&staging) || e.mount_point.starts_with(root.join("pods"))
        })
        .map(|e| e.mount_point)
        .collect();
    assert!(
        left.is_empty(),
        "node mounts left after unpublish/unstage: {left:?}"
    );
    drop(plugin);
}

/// Runs `e2e/milvus/pymilvus_quickstart.py` against the router at `addr`; fails with the
/// script's output and the router's log when it does.
async fn pymilvus_quickstart(addr: &str, router: &Proc) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/milvus/pymilvus_quickstart.py");
    let run = tokio::process::Command::new("python3")
        .args([script, &format!("http://{addr}"), "--flush-after-writes"])
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the pymilvus quickstart finishes within 3 minutes")
        .expect("python3 runs (pymilvus comes from `make deps`)");
    assert!(
        out.status.success(),
        "pymilvus quickstart through the router failed:\n{}\n{}\nrouter{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        router.log_tail()
    );
}

/// Latency samples shared with the load task (a mutex is enough at this rate).
mod latency {
    use std::sync::Mutex;
    use std::time::Duration;

    #[derive(Default)]
    pub struct Lat(Mutex<Vec<f64>>);

    impl Lat {
        pub fn push(&self, d: Duration) {
            if let Ok(mut v) = self.0.lock() {
                v.push(d.as_secs_f64());
            }
        }
        /// (p50, p99, count) in seconds.
        pub fn percentiles(&self) -> (f64, f64, usize) {
            let mut v = self.0.lock().map(|v| v.clone()).unwrap_or_default();
            if v.is_empty() {
                return (0.0, 0.0, 0);
            }
            v.sort_by(f64::total_cmp);
            let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
            (at(0.5), at(0.99), v.len())
        }
    }
}

/// Calls `call` until it answers anything but ABORTED (at most 30 s), and requires success.
async fn until_not_aborted<T, F, Fut>(what: &str, mut call: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match call().await {
            Ok(_) => return,
            Err(s) if s.code() == tonic::Code::Aborted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("{what}: {s:?}"),
        }
    }
}
