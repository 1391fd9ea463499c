//! The object store under JuiceFS stops answering for 20 s while a client inserts and searches
//! through the router (issue #21): 1 writer (WAL on local disk) + 2 readers on JuiceFS mounts of
//! one filesystem whose data lives in Azurite (`wasb`) or moto's S3 server (`s3`), MariaDB for
//! the catalogue, Redis for JuiceFS metadata, all on loopback ports. The store is frozen with
//! SIGSTOP (connections are accepted, nothing is answered: what a store that hangs does) and
//! thawed with SIGCONT; no engine process is restarted.
//!
//! Asserts, for each store:
//! - every insert acknowledged before, during or after the outage is present exactly once after
//!   the store came back and a flush (the WAL is local; a lost or doubled write fails);
//! - every search answered at any time is exact (FLAT oracle over the rows flushed before the
//!   load; the rows inserted under load lie far from every query); searches of sealed data keep
//!   being answered during the outage, from the readers' mapped segments;
//! - a search that cannot be answered fails within the router's deadlines with an error that
//!   names each reader's timeout. The store is frozen right after the writer committed a
//!   segment (the worst moment, chosen on purpose: at a random moment 3 of 9 Azurite runs hit
//!   it): the router learns the new catalogue version at its next poll, the readers catching
//!   up to it block in the JuiceFS read of the new segment until the store answers, and
//!   searches, which must see that version, wait 10 s per reader and then fail or, re-sent to
//!   the other reader, are answered late. Before the router named the readers' failures this
//!   error said only "no live reader left to search segment 1";
//! - inserts keep being acknowledged during the outage (the WAL is local; the flush that writes
//!   their segment waits for the store);
//! - after the store answers again the stack recovers by itself: a new row is inserted,
//!   flushed (its segment written to the store) and found by a search, within 120 s.
//!
//! Prints one `OUTAGE-FIGURES {json}` line per store.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::engine::Engine;
use serde_json::{Value, json};
use shoal_engine::core::meta::MetaStore;
use shoal_testkit::mariadb::MariaDb;
use shoal_testkit::{JuiceFs, ObjectStoreKind, ObjectStoreServer, RedisServer, free_port};

const DIM: usize = 32;
const BASE_ROWS: usize = 20_000;
const K: usize = 10;
const INSERT_BATCH: usize = 200;
/// Ids of rows inserted under load start here (the base rows are `0..BASE_ROWS`).
const LOAD_ID0: i64 = 1_000_000;
const OUTAGE: Duration = Duration::from_secs(20);
const COLLECTION: &str = "outage";

/// Deterministic pseudo-random vectors in [0, 1) (SplitMix64).
fn vectors(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n * DIM)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

fn l2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Exact top-K distances over `base` (row id = index).
fn oracle(base: &[f32], q: &[f32]) -> Vec<f32> {
    let mut d: Vec<f32> = base.chunks_exact(DIM).map(|v| l2(v, q)).collect();
    d.sort_by(f32::total_cmp);
    d.truncate(K);
    d
}

/// K hits whose true distances equal the oracle's (ids may differ between equal distances).
fn is_exact(base: &[f32], q: &[f32], want: &[f32], got: &Value) -> bool {
    let Some(hits) = got["data"].as_array() else {
        return false;
    };
    hits.len() == want.len()
        && hits.iter().zip(want).all(|(h, d)| {
            let Some(row) = h["id"]
                .as_i64()
                .and_then(|id| base.chunks_exact(DIM).nth(usize::try_from(id).ok()?))
            else {
                return false;
            };
            (l2(row, q) - d).abs() <= 1e-4 * d.max(1.0)
        })
}

#[derive(Clone)]
struct Rest {
    http: reqwest::Client,
    base: String,
}

impl Rest {
    /// `Ok(body)` for `code == 0`, else the error in words (transport error or Milvus answer).
    async fn call(&self, path: &str, body: &Value) -> Result<Value, String> {
        let r = self
            .http
            .post(format!("{}/v2/vectordb/{path}", self.base))
            .json(body)
            .send()
            .await
            .map_err(|e| format!("{path}: transport: {e}"))?;
        let v: Value = r.json().await.map_err(|e| format!("{path}: body: {e}"))?;
        if v["code"] == 0 {
            Ok(v)
        } else {
            Err(format!("{path}: {v}"))
        }
    }
}

/// One request of the load: when it started and ended (since the test's origin) and its outcome.
#[derive(Clone, Debug)]
struct Op {
    start: Duration,
    end: Duration,
    outcome: Result<bool, String>,
}

#[derive(Default)]
struct Log {
    searches: Vec<Op>,
    inserts: Vec<(Op, i64)>,
}

fn summarize(ops: &[&Op]) -> Value {
    let ok = ops.iter().filter(|o| o.outcome == Ok(true)).count();
    let inexact = ops.iter().filter(|o| o.outcome == Ok(false)).count();
    let mut errors: Vec<String> = ops
        .iter()
        .filter_map(|o| o.outcome.clone().err())
        .map(|e| e.chars().take(300).collect())
        .collect();
    let failed = errors.len();
    errors.sort();
    errors.dedup();
    errors.truncate(5);
    let max_s = ops
        .iter()
        .map(|o| (o.end - o.start).as_secs_f64())
        .fold(0.0, f64::max);
    json!({"requests": ops.len(), "ok": ok, "inexact": inexact, "failed": failed,
           "max_latency_s": max_s, "errors": errors})
}

/// What the load saw before, during and after the outage (requests grouped by start time).
fn figures(log: &Log, paused_at: Duration, resumed_at: Duration) -> Value {
    let window = |a: Duration, b: Duration| move |o: &&Op| o.start >= a && o.start < b;
    let searches: Vec<&Op> = log.searches.iter().collect();
    let inserts: Vec<&Op> = log.inserts.iter().map(|(o, _)| o).collect();
    let part = |ops: &[&Op], a: Duration, b: Duration| {
        summarize(&ops.iter().copied().filter(window(a, b)).collect::<Vec<_>>())
    };
    // A request still running at the end shows as its start.
    json!({
        "searches_before": part(&searches, Duration::ZERO, paused_at),
        "searches_during": part(&searches, paused_at, resumed_at),
        "searches_after": part(&searches, resumed_at, Duration::MAX),
        "inserts_before": part(&inserts, Duration::ZERO, paused_at),
        "inserts_during": part(&inserts, paused_at, resumed_at),
        "inserts_after": part(&inserts, resumed_at, Duration::MAX),
        "last_search_start_s": searches.last().map(|o| o.start.as_secs_f64()),
        "last_insert_start_s": inserts.last().map(|o| o.start.as_secs_f64()),
        "paused_at_s": paused_at.as_secs_f64(), "resumed_at_s": resumed_at.as_secs_f64(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn azurite_stopped_for_20s_loses_no_acknowledged_write_and_recovers_without_restarts() {
    outage(ObjectStoreKind::Azurite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_stopped_for_20s_loses_no_acknowledged_write_and_recovers_without_restarts() {
    outage(ObjectStoreKind::S3).await;
}

fn writer_args(meta: &str, data: &Path, wal: &Path, grpc: u16, rest: u16) -> Vec<String> {
    vec![
        "--meta".into(),
        meta.into(),
        "--data-dir".into(),
        data.display().to_string(),
        "--wal-dir".into(),
        wal.display().to_string(),
        "--grpc-listen".into(),
        format!("127.0.0.1:{grpc}"),
        "--listen".into(),
        format!("127.0.0.1:{rest}"),
        "--node-id".into(),
        "writer".into(),
    ]
}

async fn outage(kind: ObjectStoreKind) {
    let _watchdog = shoal_testkit::watchdog("objstore_outage", Duration::from_secs(420));
    let work = tempfile::Builder::new()
        .prefix("shoal-outage-")
        .tempdir()
        .unwrap();
    let logs = work.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let store = ObjectStoreServer::start(kind).expect("object store (make deps)");
    let redis = RedisServer::start().expect("Redis");
    let db = MariaDb::start().expect("MariaDB");
    let jfs = JuiceFs::format_on(&redis.url(1), "outage", &store).expect("juicefs format");
    let wmount = jfs.mount().expect("writer JuiceFS mount");
    let rmounts: Vec<_> = (0..2)
        .map(|_| {
            jfs.mount_with(&["--read-only"])
                .expect("reader JuiceFS mount")
        })
        .collect();
    let meta = db.url();
    let (wg, wrest) = (free_port().unwrap(), free_port().unwrap());
    let mut writer = Engine::spawn_logged(
        "writer",
        "writer",
        &writer_args(
            &meta,
            &wmount.path().join("data"),
            &work.path().join("wal"),
            wg,
            wrest,
        ),
        &logs,
    );
    writer.ready(Duration::from_secs(60)).await;
    let mut readers = Vec::new();
    let mut reader_ports = String::new();
    for (i, m) in rmounts.iter().enumerate() {
        let grpc = free_port().unwrap();
        let mut r = Engine::spawn_logged(
            &format!("reader-{i}"),
            "reader",
            &[
                "--meta".into(),
                meta.clone(),
                "--data-dir".into(),
                m.path().join("data").display().to_string(),
                "--grpc-listen".into(),
                format!("127.0.0.1:{grpc}"),
                "--node-id".into(),
                format!("reader-{i}"),
            ],
            &logs,
        );
        r.ready(Duration::from_secs(60)).await;
        reader_ports.push_str(&format!("127.0.0.1:{grpc},"));
        readers.push(r);
    }
    let rest_port = free_port().unwrap();
    let mut router = Engine::spawn_logged(
        "router",
        "router",
        &[
            "--meta".into(),
            meta.clone(),
            "--writer".into(),
            format!("127.0.0.1:{wg}"),
            "--readers".into(),
            reader_ports.trim_end_matches(',').to_string(),
            "--listen".into(),
            format!("127.0.0.1:{rest_port}"),
            "--health-interval".into(),
            "200ms".into(),
            // The freeze comes right after a segment commit; the router learns it at its
            // next poll and pushes it to the readers, who must then read it from the store.
            "--catalog-poll".into(),
            "3s".into(),
        ],
        &logs,
    );
    router.ready(Duration::from_secs(60)).await;
    router.wait_live_readers(2, Duration::from_secs(60)).await;
    let rest = Rest {
        // Longer than the outage: a request the stack holds through it is seen completing.
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap(),
        base: format!("http://127.0.0.1:{rest_port}"),
    };
    rest.call(
        "collections/create",
        &json!({"collectionName": COLLECTION, "dimension": DIM, "metricType": "L2"}),
    )
    .await
    .unwrap();
    let base = Arc::new(vectors(BASE_ROWS, 7));
    for (b, chunk) in base.chunks(5_000 * DIM).enumerate() {
        let rows: Vec<Value> = chunk
            .chunks_exact(DIM)
            .enumerate()
            .map(|(i, v)| json!({"id": (b * 5_000 + i) as i64, "vector": v}))
            .collect();
        rest.call(
            "entities/insert",
            &json!({"collectionName": COLLECTION, "data": rows}),
        )
        .await
        .unwrap();
    }
    rest.call("collections/flush", &json!({"collectionName": COLLECTION}))
        .await
        .unwrap();
    let queries = Arc::new(vectors(32, 99));
    let want: Arc<Vec<Vec<f32>>> = Arc::new(
        queries
            .chunks_exact(DIM)
            .map(|q| oracle(&base, q))
            .collect(),
    );

    // ---- load: one inserting client and one searching client, every request logged.
    let origin = Instant::now();
    let log = Arc::new(Mutex::new(Log::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let searcher = {
        let (rest, log, stop, base, queries, want) = (
            rest.clone(),
            log.clone(),
            stop.clone(),
            base.clone(),
            queries.clone(),
            want.clone(),
        );
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let qi = i % want.len();
                let q = &queries[qi * DIM..(qi + 1) * DIM];
                let start = origin.elapsed();
                let r = rest
                    .call(
                        "entities/search",
                        &json!({"collectionName": COLLECTION, "data": [q], "limit": K}),
                    )
                    .await;
                let outcome = r.map(|v| is_exact(&base, q, &want[qi], &v));
                let end = origin.elapsed();
                log.lock().unwrap().searches.push(Op {
                    start,
                    end,
                    outcome,
                });
                i += 1;
            }
        })
    };
    let inserter = {
        let (rest, log, stop) = (rest.clone(), log.clone(), stop.clone());
        tokio::spawn(async move {
            // Paced (a rate, not a synchronisation): about 10 requests a second.
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut b = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                let id0 = LOAD_ID0 + b * INSERT_BATCH as i64;
                // Far from every query (queries lie in [0, 1)^DIM): never in a top-K.
                let rows: Vec<Value> = (0..INSERT_BATCH as i64)
                    .map(|i| json!({"id": id0 + i, "vector": vec![100.0 + i as f32; DIM]}))
                    .collect();
                let start = origin.elapsed();
                let r = rest
                    .call(
                        "entities/insert",
                        &json!({"collectionName": COLLECTION, "data": rows}),
                    )
                    .await;
                let outcome = r.map(|v| v["data"]["insertCount"] == INSERT_BATCH);
                let end = origin.elapsed();
                log.lock().unwrap().inserts.push((
                    Op {
                        start,
                        end,
                        outcome,
                    },
                    id0,
                ));
                b += 1;
            }
        })
    };
    let counts = |log: &Mutex<Log>, after: Duration| {
        let l = log.lock().unwrap();
        let s = l
            .searches
            .iter()
            .filter(|o| o.start >= after && o.outcome == Ok(true))
            .count();
        let i = l
            .inserts
            .iter()
            .filter(|(o, _)| o.start >= after && o.outcome == Ok(true))
            .count();
        (s, i)
    };
    // Under load before the outage: wait for answered requests (a condition).
    let t = Instant::now();
    while counts(&log, Duration::ZERO).0 < 20 || counts(&log, Duration::ZERO).1 < 10 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no load before the outage"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // ---- the outage, right after the writer committed a segment the readers have not loaded:
    // the worst moment (deterministic instead of a 1-in-3 race between a flush and the freeze).
    let catalog = MetaStore::connect_read_only(&meta).await.unwrap();
    let version = || async { catalog.catalog_snapshot().await.unwrap().version };
    let v0 = version().await;
    let t = Instant::now();
    while version().await == v0 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the writer committed nothing"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let paused_at = origin.elapsed();
    store.pause().unwrap();
    tokio::time::sleep(OUTAGE).await;
    store.resume().unwrap();
    let resumed_at = origin.elapsed();

    // ---- recovery, without restarting anything: a new row goes through the store.
    // Far from the queries and from the load's rows: found only by a search for itself.
    let probe = vec![50.0f32; DIM];
    let probe_id = 42_000_000i64;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last_error;
    let mut upserted = false;
    loop {
        for p in [&mut writer, &mut router]
            .into_iter()
            .chain(readers.iter_mut())
        {
            if let Some(st) = p.child.try_wait().unwrap() {
                panic!("{} exited with {st}{}", p.name, p.log_tail());
            }
        }
        let step = async {
            if !upserted {
                rest.call(
                    "entities/upsert",
                    &json!({"collectionName": COLLECTION, "data": [{"id": probe_id, "vector": probe}]}),
                )
                .await?;
                upserted = true;
            }
            rest.call("collections/flush", &json!({"collectionName": COLLECTION}))
                .await?;
            let v = rest
                .call(
                    "entities/search",
                    &json!({"collectionName": COLLECTION, "data": [&probe], "limit": 1}),
                )
                .await?;
            if v["data"][0]["id"] == probe_id {
                Ok(())
            } else {
                Err(format!("the probe row is not found: {v}"))
            }
        };
        match step.await {
            Ok(()) => break,
            Err(e) => last_error = e,
        }
        assert!(
            Instant::now() < deadline,
            "no recovery within 120 s of the store answering again: {last_error}\n{}\n--- writer{}\n--- router{}\n--- reader-0{}",
            figures(&log.lock().unwrap(), paused_at, resumed_at),
            writer.log_tail(),
            router.log_tail(),
            readers[0].log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovered_s = (origin.elapsed() - resumed_at).as_secs_f64();
    eprintln!(
        "recovered {recovered_s:.1} s after the store came back: {}",
        figures(&log.lock().unwrap(), paused_at, resumed_at)
    );
    // The load's own requests are answered again (each client may first finish one request
    // it sent during the outage).
    let t = Instant::now();
    let after = origin.elapsed();
    while counts(&log, after).0 < 10 || counts(&log, after).1 < 5 {
        if t.elapsed() > Duration::from_secs(90) {
            panic!(
                "the load did not resume within 90 s of the recovery: {}\n--- writer{}\n--- router{}\n--- reader-0{}\n--- reader-1{}",
                figures(&log.lock().unwrap(), paused_at, resumed_at),
                writer.log_tail(),
                router.log_tail(),
                readers[0].log_tail(),
                readers[1].log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    searcher.await.unwrap();
    inserter.await.unwrap();

    // ---- every acknowledged write exactly once
    rest.call("collections/flush", &json!({"collectionName": COLLECTION}))
        .await
        .unwrap();
    let log = Arc::try_unwrap(log).ok().unwrap().into_inner().unwrap();
    let acked: Vec<i64> = log
        .inserts
        .iter()
        .filter(|(o, _)| o.outcome == Ok(true))
        .map(|(_, id0)| *id0)
        .collect();
    let unsure: Vec<i64> = log
        .inserts
        .iter()
        .filter(|(o, _)| o.outcome != Ok(true))
        .map(|(_, id0)| *id0)
        .collect();
    let count = |filter: String| {
        let rest = rest.clone();
        async move {
            let v = rest
                .call(
                    "entities/query",
                    &json!({"collectionName": COLLECTION, "filter": filter, "outputFields": ["count(*)"]}),
                )
                .await
                .unwrap();
            v["data"][0]["count(*)"].as_i64().unwrap()
        }
    };
    let batch_filter = |id0: i64| format!("id >= {id0} and id < {}", id0 + INSERT_BATCH as i64);
    for id0 in &acked {
        assert_eq!(
            count(batch_filter(*id0)).await,
            INSERT_BATCH as i64,
            "acknowledged batch {id0}.. is not present exactly once"
        );
    }
    let mut unsure_present = 0;
    for id0 in &unsure {
        let n = count(batch_filter(*id0)).await;
        assert!(
            n == 0 || n == INSERT_BATCH as i64,
            "unacknowledged batch {id0}.. is partly there: {n} rows"
        );
        unsure_present += usize::from(n > 0);
    }
    let total = count("id >= 0".into()).await;
    assert_eq!(
        total as usize,
        BASE_ROWS + 1 + (acked.len() + unsure_present) * INSERT_BATCH,
        "rows beyond the acknowledged ones"
    );

    // ---- what the outage did
    let mut figures = figures(&log, paused_at, resumed_at);
    figures["store"] = json!(kind.juicefs_storage());
    figures["outage_s"] = json!(OUTAGE.as_secs_f64());
    figures["acked_batches"] = json!(acked.len());
    figures["unacked_batches"] = json!(unsure.len());
    figures["unacked_batches_present"] = json!(unsure_present);
    figures["resume_to_new_row_flushed_and_found_s"] = json!(recovered_s);
    println!("OUTAGE-FIGURES {figures}");
    if figures["searches_during"]["failed"] != 0 || std::env::var_os("SHOAL_OUTAGE_LOGS").is_some()
    {
        eprintln!(
            "--- writer{}\n--- router{}\n--- reader-0{}\n--- reader-1{}",
            writer.log_tail(),
            router.log_tail(),
            readers[0].log_tail(),
            readers[1].log_tail()
        );
    }
    let all = summarize(&log.searches.iter().collect::<Vec<_>>());
    assert_eq!(all["inexact"], 0, "a served search was wrong: {figures}");
    // Sealed data keeps being searched from the readers' mapped segments, and inserts keep
    // being acknowledged (the WAL is local), while the store does not answer.
    assert!(
        figures["searches_during"]["ok"].as_u64() > Some(0),
        "no search served during the outage: {figures}"
    );
    assert!(
        figures["inserts_during"]["ok"].as_u64() > Some(0)
            && figures["inserts_during"]["failed"] == 0,
        "inserts failed during the outage: {figures}"
    );
    // A search that cannot be served (a reader stuck loading a segment committed just before
    // the store stopped) fails within the router's deadlines (10 s per reader, 2 readers) with
    // an error naming each reader's timeout, instead of hanging or blaming "no live reader".
    assert!(
        all["max_latency_s"].as_f64().unwrap() < 25.0,
        "a search took longer than the router's deadlines: {figures}"
    );
    for e in log.searches.iter().filter_map(|o| o.outcome.as_ref().err()) {
        assert!(
            e.contains("no reader could serve the search (reader ")
                && e.contains("timed out after"),
            "an unclear search error: {e}"
        );
    }
    drop(router);
    drop(readers);
    drop(writer);
    drop(rmounts);
    drop(wmount);
}
