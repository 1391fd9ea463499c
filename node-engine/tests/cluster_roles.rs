//! The cluster roles as real processes: `shoal-engine writer` and `shoal-engine reader` over a
//! real MariaDB metadata store (and a real JuiceFS volume for the shared data directory).
//!
//! - a writer and two readers: rows inserted through the Writer gRPC service and flushed are
//!   served by each reader's `SearchShard` exactly as a brute-force FLAT oracle ranks them, also
//!   when the segments are split between the readers, with filters, and after a delete; the
//!   readers run on a `juicefs mount --read-only` of the writer's volume, so any write to their
//!   data directory would fail;
//! - failover: a second writer waits while the first holds the lease; after the first is
//!   `kill -9`ed it takes over, replays the shared WAL, and every acknowledged id is present
//!   exactly once; the old epoch's commits are fenced; SIGTERM releases the lease; a writer whose
//!   lease is taken exits non-zero.
#![allow(clippy::unwrap_used)]

mod common;

use common::engine::Engine;
use serde_json::{Value, json};
use shoal_engine::core::meta::{MetaError, MetaStore};
use shoal_engine::roles::writer::lease;
use shoal_engine::rpc::pb::reader_client::ReaderClient;
use shoal_engine::rpc::pb::writer_client::WriterClient;
use shoal_engine::rpc::pb::{
    CreateCollectionRequest, DeleteRequest, FlushRequest, GetRowsRequest, HealthRequest,
    InsertRequest, NotifySegmentsRequest, QueryShardRequest, Row, SearchShardRequest,
};
use shoal_testkit::mariadb::MariaDb;
use shoal_testkit::{JuiceFs, JuiceFsMount, RedisServer, free_port, watchdog};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::Channel;

const DIM: usize = 8;

/// An engine process (killed on drop) and the gRPC and REST addresses it was given.
struct Proc {
    engine: Engine,
    grpc: String,
    rest: String,
}

impl std::ops::Deref for Proc {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        &self.engine
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }
}

/// `shoal-engine ROLE ARGS` on free gRPC (and, for a writer, REST) ports, node id `name`.
fn spawn(name: &'static str, role: &str, args: &[String]) -> Proc {
    let (g, r) = (free_port().unwrap(), free_port().unwrap());
    let mut args = args.to_vec();
    args.extend([
        "--grpc-listen".into(),
        format!("127.0.0.1:{g}"),
        "--node-id".into(),
        name.into(),
    ]);
    if role == "writer" {
        args.extend(["--listen".into(), format!("127.0.0.1:{r}")]);
    }
    Proc {
        engine: Engine::spawn(name, role, &args),
        grpc: format!("http://127.0.0.1:{g}"),
        rest: format!("http://127.0.0.1:{r}"),
    }
}

fn writer(name: &'static str, meta: &str, data: &Path, wal: Option<&Path>) -> Proc {
    let mut args = vec![
        "--meta".to_string(),
        meta.to_string(),
        "--data-dir".into(),
        data.display().to_string(),
        "--lease-ttl".into(),
        "2s".into(),
        "--flush-interval".into(),
        "300ms".into(),
    ];
    if let Some(w) = wal {
        args.extend(["--wal-dir".into(), w.display().to_string()]);
    }
    spawn(name, "writer", &args)
}

fn reader(name: &'static str, meta: &str, data: &Path) -> Proc {
    spawn(
        name,
        "reader",
        &[
            "--meta".to_string(),
            meta.to_string(),
            "--data-dir".into(),
            data.display().to_string(),
            "--poll-interval".into(),
            "200ms".into(),
            // What the operator passes to GPU readers; CPU search where CUDA is absent.
            "--gpu-devices".into(),
            "0,1".into(),
            "--gpu-memory-budget".into(),
            "8Gi".into(),
        ],
    )
}

impl Proc {
    async fn writer_client(&self) -> WriterClient<Channel> {
        WriterClient::connect(self.grpc.clone()).await.unwrap()
    }

    async fn reader_client(&self) -> ReaderClient<Channel> {
        ReaderClient::connect(self.grpc.clone()).await.unwrap()
    }
}

fn vector_of(id: i64) -> Vec<f32> {
    (0..DIM)
        .map(|j| ((id * 37 + j as i64 * 11) as f32 * 0.0173).sin())
        .collect()
}

fn row(id: i64) -> Row {
    Row {
        id: Some(id),
        vector: vector_of(id),
        dynamic_json: json!({"tag": id % 5}).to_string().into_bytes(),
    }
}

/// A JSON number array as f32s (JSON carries them as f64 text).
fn as_f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("a JSON array")
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}

fn l2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Exact top-k ids by (squared L2, id) over `live` ids passing `keep`.
fn oracle(
    q: &[f32],
    live: &BTreeSet<i64>,
    k: usize,
    keep: impl Fn(i64) -> bool,
) -> Vec<(i64, f32)> {
    let mut all: Vec<(f32, i64)> = live
        .iter()
        .filter(|id| keep(**id))
        .map(|id| (l2(q, &vector_of(*id)), *id))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    all.truncate(k);
    all.into_iter().map(|(d, id)| (id, d)).collect()
}

fn queries() -> Vec<Vec<f32>> {
    (0..4)
        .map(|i| vector_of(100_000 + i).iter().map(|x| x * 0.9).collect())
        .collect()
}

/// SearchShard on each (reader, segments) part, merged by (distance, id): what a router does.
async fn search(
    parts: &mut [(&mut ReaderClient<Channel>, Vec<u64>)],
    q: &[f32],
    k: usize,
    filter: &str,
    min_version: u64,
) -> Vec<(i64, f32)> {
    let mut merged = Vec::new();
    for (client, segs) in parts.iter_mut() {
        let r = client
            .search_shard(SearchShardRequest {
                collection: "docs".into(),
                segment_ids: segs.clone(),
                dimension: DIM as u32,
                queries: q.to_vec(),
                top_k: k as u32,
                filter: filter.into(),
                output_fields: vec!["tag".into()],
                min_catalog_version: min_version,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.unknown_segments.is_empty(), "{:?}", r.unknown_segments);
        assert!(r.catalog_version >= min_version);
        for h in &r.results[0].hits {
            let fields: Value = serde_json::from_slice(&h.fields_json).unwrap();
            assert_eq!(fields["tag"], json!(h.id % 5), "output field of {}", h.id);
            merged.push((h.id, h.distance));
        }
    }
    merged.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    merged.truncate(k);
    merged
}

fn assert_same(got: &[(i64, f32)], want: &[(i64, f32)], what: &str) {
    let ids = |v: &[(i64, f32)]| v.iter().map(|x| x.0).collect::<Vec<_>>();
    assert_eq!(
        ids(got),
        ids(want),
        "{what}: ids differ from the FLAT oracle"
    );
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g.1 - w.1).abs() <= 1e-4 * (1.0 + w.1.abs()),
            "{what}: distance of {} is {} instead of {}",
            g.0,
            g.1,
            w.1
        );
    }
}

async fn segment_ids(meta: &MetaStore, collection: &str) -> Vec<u64> {
    let snap = meta.catalog_snapshot().await.unwrap();
    let c = snap
        .collections
        .iter()
        .find(|c| c.name == collection)
        .unwrap();
    snap.segments
        .get(&c.id)
        .map(|s| s.iter().map(|s| s.id as u64).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writer_and_two_read_only_readers_serve_the_flat_oracle_and_see_deletes() {
    let _watchdog = watchdog(
        "writer_and_two_read_only_readers_serve_the_flat_oracle_and_see_deletes",
        Duration::from_secs(240),
    );
    let db = MariaDb::start().expect("MariaDB");
    let redis = RedisServer::start().expect("Redis");
    let jfs = JuiceFs::format(&redis.url(1), "shoal-roles").expect("juicefs format");
    let rw = jfs.mount().expect("juicefs mount");
    let ro = JuiceFsMount::mount_read_only(&jfs.meta_url, None).expect("juicefs mount --read-only");
    let url = db.url();

    let mut w = writer("w1", &url, &rw.path().join("data"), None);
    w.ready(Duration::from_secs(60)).await;
    // The readers' mount refuses writes even for root: a reader that wrote would fail.
    assert!(std::fs::write(ro.path().join("probe"), b"x").is_err());
    let mut r1 = reader("r1", &url, &ro.path().join("data"));
    let mut r2 = reader("r2", &url, &ro.path().join("data"));
    r1.ready(Duration::from_secs(60)).await;
    r2.ready(Duration::from_secs(60)).await;

    let mut wc = w.writer_client().await;
    wc.create_collection(CreateCollectionRequest {
        collection: "docs".into(),
        dimension: DIM as u32,
        metric_type: "L2".into(),
        enable_dynamic_field: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut live = BTreeSet::new();
    let mut version = 0;
    // Three flushed batches = three segments.
    for batch in 0..3i64 {
        let ids: Vec<i64> = (batch * 400..(batch + 1) * 400).collect();
        let resp = wc
            .insert(InsertRequest {
                collection: "docs".into(),
                rows: ids.iter().map(|i| row(*i)).collect(),
                upsert: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.ids, ids);
        live.extend(ids);
        let v = wc
            .flush(FlushRequest {
                collection: "docs".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .catalog_version;
        assert!(v > version, "flush did not advance the catalogue version");
        version = v;
    }
    let meta = MetaStore::connect_read_only(&url).await.unwrap();
    let segs = segment_ids(&meta, "docs").await;
    assert!(segs.len() >= 3, "{segs:?}");

    let mut c1 = r1.reader_client().await;
    let mut c2 = r2.reader_client().await;
    for c in [&mut c1, &mut c2] {
        let v = c
            .notify_segments(NotifySegmentsRequest {
                catalog_version: version,
            })
            .await
            .unwrap()
            .into_inner()
            .catalog_version;
        assert!(v >= version);
    }
    let half = segs.len() / 2;
    let k = 10;
    for (qi, q) in queries().iter().enumerate() {
        let want = oracle(q, &live, k, |_| true);
        // Each reader alone over every segment.
        for (name, c) in [("r1", &mut c1), ("r2", &mut c2)] {
            let got = search(&mut [(c, segs.clone())], q, k, "", version).await;
            assert_same(&got, &want, &format!("{name} q{qi}"));
        }
        // Segments split between the readers and merged.
        let got = search(
            &mut [
                (&mut c1, segs[..half].to_vec()),
                (&mut c2, segs[half..].to_vec()),
            ],
            q,
            k,
            "",
            version,
        )
        .await;
        assert_same(&got, &want, &format!("split q{qi}"));
        let want = oracle(q, &live, k, |id| id % 5 == 3);
        let got = search(&mut [(&mut c1, segs.clone())], q, k, "tag == 3", version).await;
        assert_same(&got, &want, &format!("filtered q{qi}"));
    }

    // Delete the best hits of every query; after the flush the readers no longer return them.
    let deleted: BTreeSet<i64> = queries()
        .iter()
        .flat_map(|q| oracle(q, &live, 3, |_| true))
        .map(|(id, _)| id)
        .collect();
    let n = wc
        .delete(DeleteRequest {
            collection: "docs".into(),
            filter: format!(
                "id in [{}]",
                deleted
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
        .await
        .unwrap()
        .into_inner()
        .delete_count;
    assert_eq!(n as usize, deleted.len());
    let v2 = wc
        .flush(FlushRequest {
            collection: "docs".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .catalog_version;
    assert!(v2 > version);
    for id in &deleted {
        live.remove(id);
    }
    let segs = segment_ids(&meta, "docs").await;
    for (qi, q) in queries().iter().enumerate() {
        let want = oracle(q, &live, k, |_| true);
        // No push: `min_catalog_version` makes each reader catch up before answering.
        for (name, c) in [("r1", &mut c1), ("r2", &mut c2)] {
            let got = search(&mut [(c, segs.clone())], q, k, "", v2).await;
            assert_same(&got, &want, &format!("{name} after delete q{qi}"));
        }
    }
    let counted = c2
        .query_shard(QueryShardRequest {
            collection: "docs".into(),
            segment_ids: segs.clone(),
            filter: "tag == 1".into(),
            output_fields: vec!["tag".into()],
            limit: 5,
            min_catalog_version: v2,
        })
        .await
        .unwrap()
        .into_inner();
    let want: Vec<i64> = live.iter().copied().filter(|id| id % 5 == 1).collect();
    assert_eq!(counted.match_count as usize, want.len());
    assert_eq!(
        counted.rows.iter().map(|r| r.id).collect::<Vec<_>>(),
        want[..5].to_vec()
    );
    let probe: Vec<i64> = deleted.iter().copied().chain([1, 2]).collect();
    let got = c1
        .get_rows(GetRowsRequest {
            collection: "docs".into(),
            segment_ids: segs.clone(),
            ids: probe,
            output_fields: vec!["vector".into()],
            min_catalog_version: v2,
        })
        .await
        .unwrap()
        .into_inner();
    let got_ids: Vec<i64> = got.rows.iter().map(|r| r.id).collect();
    let want_ids: Vec<i64> = [1, 2].into_iter().filter(|id| live.contains(id)).collect();
    assert_eq!(got_ids, want_ids, "deleted rows must not be returned");
    for r in &got.rows {
        let f: Value = serde_json::from_slice(&r.fields_json).unwrap();
        assert_eq!(as_f32s(&f["vector"]), vector_of(r.id));
    }
    let h = c1.health(HealthRequest {}).await.unwrap().into_inner();
    assert!(h.ready && h.role == "reader" && h.catalog_version >= v2);
    let metrics = reqwest::get(format!("{}/metrics", r1.ops))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("shoal_reader_segments{collection=\"docs\"}"),
        "{metrics}"
    );
    // The GPU flags above start a GPU runtime; without CUDA it says why and searches on the CPU.
    assert!(metrics.contains("shoal_gpu_devices"), "{metrics}");
    assert!(metrics.ends_with("# EOF\n"), "{metrics}");
    let ready: Value = serde_json::from_str(
        &reqwest::get(format!("{}/readyz", r1.ops))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(ready["status"], "ready", "{ready}");
    match ready["gpu"]["mode"].as_str() {
        Some("gpu") => {}
        Some("cpu") => assert!(ready["gpu"]["reasons"][0].is_string(), "{ready}"),
        other => panic!("gpu mode {other:?}: {ready}"),
    }
    // Teardown order: engine processes, then the mounts, then Redis and MariaDB (locals drop
    // in reverse order of declaration).
    drop((r1, r2, w));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiting_writer_takes_over_after_kill_9_replays_the_wal_and_fences_the_old_epoch() {
    let _watchdog = watchdog(
        "a_waiting_writer_takes_over_after_kill_9_replays_the_wal_and_fences_the_old_epoch",
        Duration::from_secs(240),
    );
    let db = MariaDb::start().expect("MariaDB");
    let url = db.url();
    let dir = tempfile::tempdir().unwrap();
    let (data, wal) = (dir.path().join("data"), dir.path().join("wal"));
    let meta = MetaStore::connect(&url).await.unwrap();

    let mut w1 = writer("w1", &url, &data, Some(&wal));
    w1.ready(Duration::from_secs(60)).await;
    let mut c1 = w1.writer_client().await;
    let e1 = c1
        .health(HealthRequest {})
        .await
        .unwrap()
        .into_inner()
        .epoch;
    assert!(e1 > 0);
    c1.create_collection(CreateCollectionRequest {
        collection: "fo".into(),
        dimension: DIM as u32,
        metric_type: "L2".into(),
        enable_dynamic_field: true,
        ..Default::default()
    })
    .await
    .unwrap();

    // A second writer waits while the first holds the lease.
    let mut w2 = writer("w2", &url, &data, Some(&wal));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        w2.child.try_wait().unwrap().is_none(),
        "w2 exited while waiting"
    );
    assert_eq!(lease::current(meta.pool()).await.unwrap().holder, "w1");
    // A waiting writer is live but not ready, and says what it waits for.
    common::engine::wait_answer(
        &mut w2,
        "/readyz",
        503,
        "waiting for the writer lease",
        Duration::from_secs(5),
    )
    .await;

    // Acknowledged writes, some flushed into segments and some only in the WAL, then more
    // writes in flight while w1 is killed.
    let acked: Arc<Mutex<BTreeSet<i64>>> = Arc::default();
    let attempted: Arc<Mutex<BTreeSet<i64>>> = Arc::default();
    for batch in 0..12i64 {
        let ids: Vec<i64> = (batch * 50..(batch + 1) * 50).collect();
        let r = c1
            .insert(InsertRequest {
                collection: "fo".into(),
                rows: ids.iter().map(|i| row(*i)).collect(),
                upsert: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.epoch, e1);
        acked.lock().unwrap().extend(ids.iter().copied());
        attempted.lock().unwrap().extend(ids);
        if batch == 5 {
            c1.flush(FlushRequest {
                collection: "fo".into(),
            })
            .await
            .unwrap();
        }
    }
    let (a2, t2) = (acked.clone(), attempted.clone());
    let mut c1b = c1.clone();
    let inflight = tokio::spawn(async move {
        for batch in 12..200i64 {
            let ids: Vec<i64> = (batch * 50..(batch + 1) * 50).collect();
            t2.lock().unwrap().extend(ids.iter().copied());
            let r = c1b
                .insert(InsertRequest {
                    collection: "fo".into(),
                    rows: ids.iter().map(|i| row(*i)).collect(),
                    upsert: false,
                })
                .await;
            match r {
                Ok(_) => a2.lock().unwrap().extend(ids),
                Err(_) => return,
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    w1.child.kill().unwrap(); // SIGKILL
    w1.child.wait().unwrap();
    tokio::time::timeout(Duration::from_secs(30), inflight)
        .await
        .expect("the client did not notice the kill")
        .unwrap();

    // w2 takes over once the lease expires and replays the WAL.
    w2.ready(Duration::from_secs(60)).await;
    let mut c2 = w2.writer_client().await;
    let h = c2.health(HealthRequest {}).await.unwrap().into_inner();
    assert_eq!(h.epoch, e1 + 1);
    let http = reqwest::Client::new();
    let listed: Value = http
        .post(format!("{}/v2/vectordb/entities/query", w2.rest))
        .json(&json!({"collectionName": "fo", "filter": "id >= 0", "limit": 16384, "outputFields": ["id"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["code"], 0, "{listed}");
    let mut seen: BTreeMap<i64, usize> = BTreeMap::new();
    for r in listed["data"].as_array().unwrap() {
        *seen.entry(r["id"].as_i64().unwrap()).or_default() += 1;
    }
    let acked = acked.lock().unwrap().clone();
    let attempted = attempted.lock().unwrap().clone();
    assert!(acked.len() >= 600);
    for id in &acked {
        assert_eq!(
            seen.get(id),
            Some(&1),
            "acknowledged id {id} not present exactly once"
        );
    }
    for (id, n) in &seen {
        assert!(
            attempted.contains(id) && *n == 1,
            "id {id} appeared {n} times"
        );
    }
    // Vectors survived the replay.
    let sample: Vec<i64> = acked.iter().copied().step_by(97).collect();
    let got: Value = http
        .post(format!("{}/v2/vectordb/entities/get", w2.rest))
        .json(&json!({"collectionName": "fo", "id": sample, "outputFields": ["vector"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for r in got["data"].as_array().unwrap() {
        let id = r["id"].as_i64().unwrap();
        assert_eq!(as_f32s(&r["vector"]), vector_of(id), "vector of {id}");
    }

    // The old epoch's commits are refused by the store itself and leave nothing behind.
    let stale = MetaStore::connect(&url).await.unwrap();
    stale.set_fence(e1);
    let cid = meta.list_collections().await.unwrap()[0].id;
    match stale.set_loaded(cid, false).await {
        Err(MetaError::Fenced { epoch, current }) => assert_eq!((epoch, current), (e1, e1 + 1)),
        other => panic!("expected a fenced commit, got {other:?}"),
    }
    assert!(meta.list_collections().await.unwrap()[0].loaded);
    // The new writer commits normally.
    let before = meta.catalog_version().await.unwrap();
    let v = c2
        .flush(FlushRequest {
            collection: "fo".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .catalog_version;
    assert!(v >= before);

    // SIGTERM: flush, release the lease, exit 0.
    let term = Command::new("timeout")
        .args(["10", "kill", "-TERM", &w2.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert!(w2.exit_status(Duration::from_secs(30)).success());
    assert_eq!(lease::current(meta.pool()).await.unwrap().holder, "");

    // A writer whose lease is taken away stops and exits non-zero.
    let mut w3 = writer("w3", &url, &data, Some(&wal));
    w3.ready(Duration::from_secs(60)).await;
    sqlx::query(
        "UPDATE shoal_writer_lease SET holder = 'intruder', epoch = epoch + 1 WHERE id = 1",
    )
    .execute(meta.pool())
    .await
    .unwrap();
    let status = w3.exit_status(Duration::from_secs(30));
    assert!(
        !status.success(),
        "a writer that lost its lease exited with {status}"
    );
    drop(w3);
}

/// A fresh cluster: the reader starts while its MariaDB is down (in Kubernetes: the managed
/// MariaDB's Service name does not resolve yet). It stays up, live but not ready with the cause
/// in `/readyz`, and serves once MariaDB answers; `/readyz` turns 503 again while MariaDB is
/// down. On SIGTERM it reports not ready at once, keeps answering for the shutdown delay, and
/// exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_started_before_its_mariadb_waits_unready_and_serves_once_mariadb_answers() {
    let _watchdog = watchdog(
        "a_reader_started_before_its_mariadb_waits_unready_and_serves_once_mariadb_answers",
        Duration::from_secs(180),
    );
    let mut db = MariaDb::start().expect("MariaDB");
    // A user only this server has: while it is down, another test's MariaDB may take over its
    // port, and the reader must not mistake that one for its own.
    db.root_sql(
        "CREATE USER 'early'@'127.0.0.1' IDENTIFIED BY 'early-pw'; \
         GRANT ALL PRIVILEGES ON shoal.* TO 'early'@'127.0.0.1'; FLUSH PRIVILEGES;",
    )
    .expect("create user");
    let url = format!("mysql://early:early-pw@127.0.0.1:{}/shoal", db.port());
    // The writer would have migrated the schema; do it here, then take the server down.
    drop(MetaStore::connect(&url).await.expect("migrate"));
    tokio::task::block_in_place(|| db.stop()).expect("stop MariaDB");
    let logs = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let g = free_port().unwrap();
    let mut r = Engine::spawn_logged(
        "early-reader",
        "reader",
        &[
            "--meta".into(),
            url.clone(),
            "--data-dir".into(),
            data.path().display().to_string(),
            "--grpc-listen".into(),
            format!("127.0.0.1:{g}"),
            "--poll-interval".into(),
            "200ms".into(),
            "--shutdown-delay".into(),
            "2s".into(),
        ],
        logs.path(),
    );
    common::engine::wait_answer(
        &mut r,
        "/readyz",
        503,
        "metadata store",
        Duration::from_secs(30),
    )
    .await;
    common::engine::wait_answer(&mut r, "/healthz", 200, "ok", Duration::from_secs(5)).await;

    tokio::task::block_in_place(|| db.start_again()).expect("start MariaDB");
    r.ready(Duration::from_secs(60)).await;
    let mut client = ReaderClient::connect(format!("http://127.0.0.1:{g}"))
        .await
        .unwrap();
    client.health(HealthRequest {}).await.expect("gRPC health");

    // No metadata connection: not ready, with the reason.
    tokio::task::block_in_place(|| db.stop()).expect("stop MariaDB again");
    common::engine::wait_answer(
        &mut r,
        "/readyz",
        503,
        "metadata store",
        Duration::from_secs(30),
    )
    .await;
    tokio::task::block_in_place(|| db.start_again()).expect("start MariaDB again");
    r.ready(Duration::from_secs(60)).await;

    // SIGTERM: unready at once (HTTP, and gRPC health says draining), still answering, then a
    // clean exit.
    let t = std::time::Instant::now();
    common::engine::sigterm(&r);
    common::engine::wait_answer(
        &mut r,
        "/readyz",
        503,
        "shutting down",
        Duration::from_secs(1),
    )
    .await;
    let h = client
        .health(HealthRequest {})
        .await
        .expect("a draining reader still answers its health check")
        .into_inner();
    assert!(
        h.draining && !h.ready,
        "a draining reader must say so and not ready: {h:?}"
    );
    assert!(
        common::engine::get(&r, "/metrics")
            .await
            .is_some_and(|(s, _)| s == 200)
    );
    let status = r.exit_status(Duration::from_secs(20));
    assert!(status.success(), "{status}{}", r.log_tail());
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "exited {:?} after SIGTERM, before the shutdown delay",
        t.elapsed()
    );
}

/// A metadata host that never resolves: the reader retries until its start-up deadline, then
/// exits non-zero saying how long it tried and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_whose_metadata_host_never_resolves_exits_with_the_cause_after_the_deadline() {
    let _watchdog = watchdog(
        "a_reader_whose_metadata_host_never_resolves_exits_with_the_cause_after_the_deadline",
        Duration::from_secs(60),
    );
    let logs = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let t = std::time::Instant::now();
    let mut r = Engine::spawn_logged(
        "lost-reader",
        "reader",
        &[
            "--meta".into(),
            "mysql://shoal:pw@shoal-no-such-host.invalid:3306/shoal".into(),
            "--data-dir".into(),
            data.path().display().to_string(),
            "--grpc-listen".into(),
            format!("127.0.0.1:{}", free_port().unwrap()),
            "--meta-startup-timeout".into(),
            "3s".into(),
        ],
        logs.path(),
    );
    let status = r.exit_status(Duration::from_secs(30));
    let waited = t.elapsed();
    let log = r.log_tail();
    assert!(!status.success(), "{status}{log}");
    assert!(
        waited >= Duration::from_secs(2),
        "gave up after {waited:?}{log}"
    );
    assert!(log.contains("gave up after"), "{log}");
    assert!(log.contains("shoal-no-such-host.invalid"), "{log}");
    assert!(!log.contains(":pw@"), "the password is logged{log}");
}

/// A writer whose WAL directory becomes unusable: `/readyz` says so (503), a collection create
/// fails with the real error, as the writer's own answer (not a transport failure), and leaves
/// nothing behind; once the directory is fixed the writer is ready again and the same create
/// succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_wal_makes_the_writer_unready_and_a_create_fails_whole_until_it_is_fixed() {
    let _watchdog = watchdog(
        "an_unwritable_wal_makes_the_writer_unready_and_a_create_fails_whole_until_it_is_fixed",
        Duration::from_secs(120),
    );
    let db = MariaDb::start().expect("MariaDB");
    let url = db.url();
    let dir = tempfile::tempdir().unwrap();
    let wal = dir.path().join("wal");
    let mut w = writer("w-wal", &url, &dir.path().join("data"), Some(&wal));
    w.ready(Duration::from_secs(60)).await;

    // Root ignores permission bits: make the WAL root a regular file instead (ENOTDIR).
    std::fs::remove_dir(&wal).expect("the WAL root is empty before any collection");
    std::fs::write(&wal, b"not a directory").unwrap();
    common::engine::wait_answer(
        &mut w,
        "/readyz",
        503,
        "WAL directory",
        Duration::from_secs(10),
    )
    .await;

    let create = CreateCollectionRequest {
        collection: "docs".into(),
        dimension: DIM as u32,
        metric_type: "L2".into(),
        ..Default::default()
    };
    let mut wc = w.writer_client().await;
    let s = wc
        .create_collection(create.clone())
        .await
        .expect_err("the WAL directory cannot be created");
    assert!(
        shoal_engine::rpc::status::is_answer(&s),
        "not marked as the writer's answer: {s:?}"
    );
    assert_eq!(
        shoal_engine::rpc::status::forward_failure(&s),
        shoal_engine::rpc::status::ForwardFailure::Answered
    );
    assert!(
        s.message().to_lowercase().contains("not a directory"),
        "{s:?}"
    );
    let meta = MetaStore::connect_read_only(&url).await.unwrap();
    assert!(
        meta.list_collections().await.unwrap().is_empty(),
        "half-created collection left in the catalogue"
    );

    std::fs::remove_file(&wal).unwrap();
    std::fs::create_dir(&wal).unwrap();
    w.ready(Duration::from_secs(10)).await;
    wc.create_collection(create)
        .await
        .expect("the same create once the WAL directory is fixed");
    let names: Vec<String> = meta
        .list_collections()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, vec!["docs".to_string()]);
}
