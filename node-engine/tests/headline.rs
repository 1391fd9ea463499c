//! The headline benchmark of issue #4, by hand in release (never in CI, it is `#[ignore]`d):
//!
//! ```text
//! nice -n 19 cargo test --release -p shoal-engine --test headline --no-run
//! flock /tmp/s4-bench.lock cargo test --release -p shoal-engine --test headline -- --ignored --nocapture
//! ```
//!
//! Redis + a JuiceFS filesystem (local-file object storage) mounted read-write for the writer
//! and read-only once per reader, MariaDB for the catalogue, 1 writer + 2 readers + router as
//! release processes. 1,000,000 rows of 128-d vectors (`base.fvecs`) go in through the router's
//! REST API in batches of 100,000 (each batch is one `entities/insert` request, about 130 MB of
//! JSON, so it has one acknowledgement), with a seeded random pause of 1-8 s between batches. After each batch's acknowledgement a query equal to
//! one of its vectors (k = 1) is searched through the router in a tight loop until a search
//! returns a row of that batch:
//! - (a) visibility lag: from the acknowledgement to the end of that first search;
//! - (b) first-query retrieval time: the latency of that first search (the one that has to
//!   reach the new segment).
//!
//! Then batch search QPS through the router with 1, 2 and 4 readers on the same data
//! (`query.fvecs`, a fixed number of queries, several client tasks, `nq` queries per request).
//!
//! Output: one `HEADLINE {json}` line per batch, `HEADLINE-SUMMARY {json}` (avg/p99 of (a) and
//! (b)) and `HEADLINE-QPS {json}` per reader count. Environment knobs: `SHOAL_HEADLINE_DATA`
//! (directory with base.fvecs and query.fvecs), `SHOAL_HEADLINE_ROWS` (a smaller prefix for a
//! smoke run), `SHOAL_HEADLINE_QUERIES`, `SHOAL_HEADLINE_SEED`, `SHOAL_HEADLINE_WAL`
//! (`local` [default]: the writer's WAL on local disk; `shared`: on the JuiceFS mount),
//! `SHOAL_HEADLINE_INDEX` (an index definition built on every sealed segment, e.g.
//! `{"indexType":"IVF_FLAT","params":{"nlist":256}}`) with `SHOAL_HEADLINE_SEARCH_PARAMS` (the
//! searches' `searchParams`, e.g. `{"params":{"nprobe":16}}`), `SHOAL_HEADLINE_STORE` (JuiceFS's
//! object store: `file` [default], a local directory; `wasb`, Azurite; `s3`, moto's S3 server;
//! the last two started on a loopback port by the testkit, issue #21).
//!
//! Issue #21's figures besides (a) and (b), after the QPS part: one more 100,000-row batch (the
//! first batch's vectors under new ids) is inserted and `collections/flush` timed from its
//! acknowledgement (flush time: the growing rows sealed into a segment written through JuiceFS
//! to the store, committed, and served by the readers; one `HEADLINE-FLUSH {json}`); then that
//! newest segment's files are read through fresh read-only JuiceFS mounts (a reader's cold load of a new
//! segment at the file level): with `--cache-size 0` (every block from the store), and twice
//! through mounts sharing one local cache directory (the first read fills it; the second, on
//! a new mount with an empty page cache, is served from it). One `HEADLINE-COLD-LOAD {json}`.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::engine::Engine;
use serde_json::{Value, json};
use shoal_testkit::mariadb::MariaDb;
use shoal_testkit::{
    JuiceFs, JuiceFsMount, ObjectStoreKind, ObjectStoreServer, RedisServer, free_port,
};

const DIM: usize = 128;
const BATCH: usize = 100_000;
const COLLECTION: &str = "headline";

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `.fvecs`: per vector an int32 dimension then that many little-endian float32.
fn read_fvecs(path: &Path, max_rows: usize) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let rec = 4 + DIM * 4;
    assert_eq!(
        bytes.len() % rec,
        0,
        "{} is not {DIM}-d fvecs",
        path.display()
    );
    let rows = (bytes.len() / rec).min(max_rows);
    let mut out = Vec::with_capacity(rows * DIM);
    for r in bytes.chunks_exact(rec).take(rows) {
        let d = i32::from_le_bytes(r[..4].try_into().unwrap());
        assert_eq!(
            d as usize,
            DIM,
            "{}: a row of dimension {d}",
            path.display()
        );
        out.extend(
            r[4..]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap())),
        );
    }
    out
}

/// splitmix64: the seeded pause sequence, reproducible without a dependency.
struct Seeded(u64);

impl Seeded {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi) milliseconds.
    fn pause(&mut self, lo_ms: u64, hi_ms: u64) -> Duration {
        Duration::from_millis(lo_ms + self.next() % (hi_ms - lo_ms))
    }
}

#[derive(Clone)]
struct Rest {
    http: reqwest::Client,
    base: String,
}

impl Rest {
    async fn post(&self, path: &str, body: String) -> Value {
        let r = self
            .http
            .post(format!("{}/v2/vectordb/{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        r.json().await.unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    async fn ok(&self, path: &str, body: Value) -> Value {
        let v = self.post(path, body.to_string()).await;
        assert_eq!(v["code"], 0, "{path}: {v}");
        v
    }
}

/// `{"collectionName":..,"data":[{"id":..,"vector":[..]},..]}` built by hand (fast enough
/// that encoding never dominates a batch).
fn insert_body(base: &[f32], first_id: usize, rows: usize) -> String {
    insert_body_as(base, first_id, rows, 0)
}

/// [`insert_body`] with every id shifted by `id_offset` (the same vectors again as new rows).
fn insert_body_as(base: &[f32], first_id: usize, rows: usize, id_offset: usize) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(rows * DIM * 11 + 64);
    write!(s, "{{\"collectionName\":\"{COLLECTION}\",\"data\":[").unwrap();
    for r in 0..rows {
        let id = first_id + r;
        if r > 0 {
            s.push(',');
        }
        let shown = id + id_offset;
        write!(s, "{{\"id\":{shown},\"vector\":[").unwrap();
        for (j, x) in base[id * DIM..(id + 1) * DIM].iter().enumerate() {
            if j > 0 {
                s.push(',');
            }
            write!(s, "{x}").unwrap();
        }
        s.push_str("]}");
    }
    s.push_str("]}");
    s
}

/// `SHOAL_HEADLINE_SEARCH_PARAMS`: the search's `searchParams` as JSON (e.g. `{"params":{"nprobe":16}}`).
fn search_params() -> Option<Value> {
    std::env::var("SHOAL_HEADLINE_SEARCH_PARAMS")
        .ok()
        .map(|s| serde_json::from_str(&s).expect("SHOAL_HEADLINE_SEARCH_PARAMS must be JSON"))
}

fn search_body(queries: &[&[f32]], k: usize) -> String {
    let mut body = json!({"collectionName": COLLECTION, "data": queries, "limit": k});
    if let Some(p) = search_params() {
        body["searchParams"] = p;
    }
    body.to_string()
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Nearest-rank p99.
fn p99(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return 0.0;
    }
    let rank = ((s.len() as f64) * 0.99).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

fn write_readers_file(path: &Path, ports: &[u16]) {
    let text: String = ports.iter().map(|p| format!("127.0.0.1:{p}\n")).collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// How long the router may take to see its readers live.
const LIVE_WITHIN: Duration = Duration::from_secs(60);

struct ReaderProc {
    proc: Engine,
    grpc: u16,
    // Declared after the process: the reader stops before its mount goes away.
    _mount: JuiceFsMount,
}

fn start_reader(i: usize, meta: &str, jfs: &JuiceFs, logs: &Path) -> ReaderProc {
    let mount = jfs
        .mount_with(&["--read-only"])
        .expect("read-only JuiceFS mount");
    let grpc = free_port().unwrap();
    let proc = Engine::spawn_logged(
        &format!("reader-{i}"),
        "reader",
        &[
            "--meta".into(),
            meta.into(),
            "--data-dir".into(),
            mount.path().join("data").display().to_string(),
            "--grpc-listen".into(),
            format!("127.0.0.1:{grpc}"),
            "--node-id".into(),
            format!("reader-{i}"),
        ],
        logs,
    );
    ReaderProc {
        proc,
        grpc,
        _mount: mount,
    }
}

/// The newest segment directory under `data` (`collections/c<id>/segments/<id>`, ids
/// zero-padded).
fn newest_segment(data: &Path) -> PathBuf {
    let mut newest: Option<PathBuf> = None;
    for c in std::fs::read_dir(data.join("collections"))
        .unwrap()
        .flatten()
    {
        let Ok(segs) = std::fs::read_dir(c.path().join("segments")) else {
            continue;
        };
        for s in segs.flatten() {
            let p = s.path();
            let key = |p: &Path| p.file_name().map(|n| n.to_os_string());
            if p.join("manifest.json").exists() && newest.as_ref().is_none_or(|n| key(&p) > key(n))
            {
                newest = Some(p);
            }
        }
    }
    newest.unwrap_or_else(|| panic!("no sealed segment under {}", data.display()))
}

/// Reads every file of `seg` (relative to the writer's data dir) under `mount`; bytes and s.
fn read_segment(mount: &JuiceFsMount, rel: &Path) -> (u64, f64) {
    let dir = mount.path().join("data").join(rel);
    let t = Instant::now();
    let mut bytes = 0u64;
    for f in std::fs::read_dir(&dir).unwrap().flatten() {
        if f.file_type().unwrap().is_file() {
            bytes += std::fs::read(f.path()).unwrap().len() as u64;
        }
    }
    (bytes, t.elapsed().as_secs_f64())
}

/// Issue #21's reader cold-load figures for the newest segment (see the module docs).
fn cold_load(jfs: &JuiceFs, writer_data: &Path, store: &str, work: &Path) {
    let seg = newest_segment(writer_data);
    let rel = seg.strip_prefix(writer_data).unwrap().to_path_buf();
    let no_cache = jfs
        .mount_with(&["--read-only", "--cache-size", "0"])
        .expect("read-only mount without cache");
    let (bytes, no_cache_s) = read_segment(&no_cache, &rel);
    drop(no_cache);
    let cache_dir = work.join("cold-load-cache");
    let cache_arg = cache_dir.display().to_string();
    let first = jfs
        .mount_with(&["--read-only", "--cache-dir", &cache_arg])
        .expect("read-only mount with a local cache");
    let (_, fill_s) = read_segment(&first, &rel);
    drop(first);
    let second = jfs
        .mount_with(&["--read-only", "--cache-dir", &cache_arg])
        .expect("read-only mount over the filled cache");
    let (_, cached_s) = read_segment(&second, &rel);
    drop(second);
    let line = json!({
        "store": store, "segment": rel.display().to_string(), "bytes": bytes,
        "no_local_cache_s": no_cache_s, "empty_local_cache_s": fill_s,
        "from_local_cache_s": cached_s,
    });
    println!("HEADLINE-COLD-LOAD {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: 1M rows in release, run by hand (see the module docs)"]
async fn headline_visibility_lag_first_query_time_and_qps_scaling() {
    let _watchdog = shoal_testkit::watchdog("headline", Duration::from_secs(40 * 60));
    let data_dir = PathBuf::from(
        std::env::var("SHOAL_HEADLINE_DATA")
            .unwrap_or_else(|_| "/tmp/shoal-bench-data/clustered-1m-128".into()),
    );
    let rows: usize = env_or("SHOAL_HEADLINE_ROWS", 1_000_000);
    let n_queries: usize = env_or("SHOAL_HEADLINE_QUERIES", 400);
    let seed: u64 = env_or("SHOAL_HEADLINE_SEED", 4);
    let shared_wal = std::env::var("SHOAL_HEADLINE_WAL").is_ok_and(|v| v == "shared");
    let t_load = Instant::now();
    let base = read_fvecs(&data_dir.join("base.fvecs"), rows);
    let rows = base.len() / DIM;
    let queries = read_fvecs(&data_dir.join("query.fvecs"), n_queries);
    eprintln!(
        "read {rows} base and {} query vectors in {:?}",
        queries.len() / DIM,
        t_load.elapsed()
    );

    // ---- the stack
    let work = tempfile::Builder::new()
        .prefix("shoal-headline-")
        .tempdir()
        .unwrap();
    let logs = work.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let store_name = std::env::var("SHOAL_HEADLINE_STORE").unwrap_or_else(|_| "file".into());
    let store = match store_name.as_str() {
        "file" => None,
        "wasb" => Some(ObjectStoreServer::start(ObjectStoreKind::Azurite).expect("Azurite")),
        "s3" => Some(ObjectStoreServer::start(ObjectStoreKind::S3).expect("moto S3 server")),
        other => panic!("SHOAL_HEADLINE_STORE={other}: expected file, wasb or s3"),
    };
    println!("HEADLINE-STORE {}", json!({"store": store_name}));
    let redis = RedisServer::start().expect("Redis");
    let jfs = match &store {
        None => JuiceFs::format(&redis.url(1), "headline"),
        Some(os) => JuiceFs::format_on(&redis.url(1), "headline", os),
    }
    .expect("juicefs format");
    let wmount = jfs.mount().expect("writer JuiceFS mount");
    let db = MariaDb::start().expect("MariaDB");
    let meta = db.url();
    let wal = if shared_wal {
        wmount.path().join("wal")
    } else {
        work.path().join("wal")
    };
    let (wg, wrest) = (free_port().unwrap(), free_port().unwrap());
    let mut writer = Engine::spawn_logged(
        "writer",
        "writer",
        &[
            "--meta".into(),
            meta.clone(),
            "--data-dir".into(),
            wmount.path().join("data").display().to_string(),
            "--wal-dir".into(),
            wal.display().to_string(),
            "--grpc-listen".into(),
            format!("127.0.0.1:{wg}"),
            "--listen".into(),
            format!("127.0.0.1:{wrest}"),
            "--node-id".into(),
            "writer".into(),
        ],
        &logs,
    );
    writer.ready(Duration::from_secs(120)).await;
    let mut readers: Vec<ReaderProc> = Vec::new();
    for i in 0..2 {
        let mut r = start_reader(i, &meta, &jfs, &logs);
        r.proc.ready(Duration::from_secs(120)).await;
        readers.push(r);
    }
    let readers_file = work.path().join("readers.txt");
    write_readers_file(
        &readers_file,
        &readers.iter().map(|r| r.grpc).collect::<Vec<_>>(),
    );
    let rest_port = free_port().unwrap();
    let mut router = Engine::spawn_logged(
        "router",
        "router",
        &[
            "--meta".into(),
            meta.clone(),
            "--writer".into(),
            format!("127.0.0.1:{wg}"),
            "--readers-file".into(),
            readers_file.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{rest_port}"),
            "--health-interval".into(),
            "200ms".into(),
            "--request-timeout".into(),
            "60s".into(),
        ],
        &logs,
    );
    router.ready(Duration::from_secs(120)).await;
    router.wait_live_readers(2, LIVE_WITHIN).await;
    let rest = Rest {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()
            .unwrap(),
        base: format!("http://127.0.0.1:{rest_port}"),
    };
    rest.ok(
        "collections/create",
        json!({"collectionName": COLLECTION, "dimension": DIM, "metricType": "L2"}),
    )
    .await;
    // `SHOAL_HEADLINE_INDEX`: an index definition (`indexes/create`'s `indexParams` entry, e.g.
    // `{"indexType":"IVF_FLAT","params":{"nlist":256}}`) built on every sealed segment in the
    // background; without it every segment is searched exact (FLAT).
    let mut index_name = String::new();
    if let Ok(ix) = std::env::var("SHOAL_HEADLINE_INDEX") {
        let mut def: Value = serde_json::from_str(&ix).expect("SHOAL_HEADLINE_INDEX must be JSON");
        // Quick create made a FLAT index on the vector field: redefine it under its name.
        let listed = rest
            .ok("indexes/list", json!({"collectionName": COLLECTION}))
            .await;
        let name = listed["data"][0].as_str().unwrap_or("vector").to_string();
        def["fieldName"] = json!("vector");
        def["indexName"] = json!(name);
        def["metricType"] = json!("L2");
        rest.ok(
            "indexes/create",
            json!({"collectionName": COLLECTION, "indexParams": [def]}),
        )
        .await;
        println!("HEADLINE-INDEX {def}");
        index_name = name;
    }

    // ---- batches: insert, then probe until visible
    let base = Arc::new(base);
    let mut pauses = Seeded(seed);
    let (mut lags, mut firsts) = (Vec::new(), Vec::new());
    let n_batches = rows.div_ceil(BATCH);
    for b in 0..n_batches {
        let (lo, hi) = (b * BATCH, ((b + 1) * BATCH).min(rows));
        // Encode outside the timed part.
        let body: String = {
            let base = base.clone();
            tokio::task::spawn_blocking(move || insert_body(&base, lo, hi - lo))
                .await
                .unwrap()
        };
        let t0 = Instant::now();
        let v = rest.post("entities/insert", body).await;
        assert_eq!(
            v["code"],
            0,
            "insert: {}",
            &v.to_string()[..200.min(v.to_string().len())]
        );
        let acked = Instant::now();
        let insert_s = (acked - t0).as_secs_f64();
        // A vector of this batch; the hit must be a row of this batch.
        let probe_id = lo + (hi - lo) / 2;
        let q = &base[probe_id * DIM..(probe_id + 1) * DIM];
        let body = search_body(&[q], 1);
        let mut polls = 0usize;
        let (lag, first) = loop {
            polls += 1;
            let s0 = Instant::now();
            let v = rest.post("entities/search", body.clone()).await;
            let done = Instant::now();
            assert_eq!(v["code"], 0, "search: {v}");
            let hit = v["data"][0]["id"].as_i64().unwrap_or(-1);
            if hit >= lo as i64 && hit < hi as i64 {
                break ((done - acked).as_secs_f64(), (done - s0).as_secs_f64());
            }
            assert!(
                acked.elapsed() < Duration::from_secs(120),
                "batch {b} not visible after 120 s"
            );
        };
        lags.push(lag);
        firsts.push(first);
        let line = json!({
            "batch": b, "rows": hi - lo, "insert_s": insert_s, "visibility_lag_s": lag,
            "first_query_s": first, "polls": polls,
        });
        println!("HEADLINE {line}");
        if b + 1 < n_batches {
            tokio::time::sleep(pauses.pause(1000, 8000)).await;
        }
    }
    let summary = json!({
        "store": store_name, "rows": rows, "batches": n_batches,
        "visibility_lag_avg_s": mean(&lags), "visibility_lag_p99_s": p99(&lags),
        "first_query_avg_s": mean(&firsts), "first_query_p99_s": p99(&firsts),
        "target_visibility_lag_avg_s": 1.5, "target_first_query_avg_s": 0.016,
        "anchor_milvus_first_query_avg_s": 0.032,
    });
    println!("HEADLINE-SUMMARY {summary}");

    // ---- QPS with 1, 2 and 4 readers on the same data
    rest.ok("collections/flush", json!({"collectionName": COLLECTION}))
        .await;
    if std::env::var("SHOAL_HEADLINE_INDEX").is_ok() {
        // Measure QPS once every sealed segment is searched through its index.
        let t = Instant::now();
        loop {
            let v = rest
                .ok(
                    "indexes/describe",
                    json!({"collectionName": COLLECTION, "indexName": index_name}),
                )
                .await;
            if v["data"][0]["indexState"] == "Finished" {
                println!("HEADLINE-INDEX-BUILT {}", v["data"][0]);
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(900),
                "index not built after 900 s: {v}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    for i in 2..4 {
        let mut r = start_reader(i, &meta, &jfs, &logs);
        r.proc.ready(Duration::from_secs(120)).await;
        readers.push(r);
    }
    let queries = Arc::new(queries);
    let n_q = queries.len() / DIM;
    const NQ: usize = 10;
    const CLIENTS: usize = 4;
    for n in [1usize, 2, 4] {
        write_readers_file(
            &readers_file,
            &readers[..n].iter().map(|r| r.grpc).collect::<Vec<_>>(),
        );
        router.wait_live_readers(n, LIVE_WITHIN).await;
        // flush returns once every live reader serves the catalogue; one warm-up round loads
        // the segments each reader now owns.
        rest.ok("collections/flush", json!({"collectionName": COLLECTION}))
            .await;
        for c in 0..n_q.min(2 * NQ * CLIENTS) / NQ {
            let qs: Vec<&[f32]> = (c * NQ..(c + 1) * NQ)
                .map(|i| &queries[i * DIM..(i + 1) * DIM])
                .collect();
            rest.ok(
                "entities/search",
                serde_json::from_str(&search_body(&qs, 10)).unwrap(),
            )
            .await;
        }
        let next = Arc::new(AtomicUsize::new(0));
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..CLIENTS {
            let (rest, next, queries) = (rest.clone(), next.clone(), queries.clone());
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                loop {
                    let start = next.fetch_add(NQ, Ordering::SeqCst);
                    if start + NQ > n_q {
                        return lat;
                    }
                    let qs: Vec<&[f32]> = (start..start + NQ)
                        .map(|i| &queries[i * DIM..(i + 1) * DIM])
                        .collect();
                    let s0 = Instant::now();
                    let v = rest.post("entities/search", search_body(&qs, 10)).await;
                    assert_eq!(v["code"], 0, "search: {v}");
                    lat.push(s0.elapsed().as_secs_f64());
                }
            }));
        }
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.unwrap());
        }
        let secs = t0.elapsed().as_secs_f64();
        let done = lat.len() * NQ;
        let line = json!({
            "readers": n, "queries": done, "nq_per_request": NQ, "clients": CLIENTS, "k": 10,
            "seconds": secs, "qps": done as f64 / secs,
            "request_avg_s": mean(&lat), "request_p99_s": p99(&lat),
        });
        println!("HEADLINE-QPS {line}");
    }

    // ---- issue #21: flush time of a fresh 100k-row batch, then its segment's cold load
    let n = BATCH.min(rows);
    let body: String = {
        let base = base.clone();
        tokio::task::spawn_blocking(move || insert_body_as(&base, 0, n, rows))
            .await
            .unwrap()
    };
    rest.ok("entities/insert", serde_json::from_str(&body).unwrap())
        .await;
    let f0 = Instant::now();
    rest.ok("collections/flush", json!({"collectionName": COLLECTION}))
        .await;
    let line =
        json!({"store": store_name, "rows": n, "ack_to_flushed_s": f0.elapsed().as_secs_f64()});
    println!("HEADLINE-FLUSH {line}");
    cold_load(&jfs, &wmount.path().join("data"), &store_name, work.path());

    // Teardown: engine processes, then the mounts, then Redis and MariaDB.
    drop(router);
    drop(readers);
    drop(writer);
    drop(wmount);
    drop(jfs);
    drop(db);
    drop(redis);
    drop(store);
}
