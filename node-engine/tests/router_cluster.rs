//! The router role end to end over gRPC: search through the router equals the exact oracle
//! (L2, IP, COSINE; offset/limit, filter, outputFields), get/query/count merged across readers,
//! delete/upsert visible after flush, flush waiting for readers, failover when a reader dies
//! mid-load, a late reader joining, and bad requests answered with the same Milvus codes as the
//! standalone role.
//!
//! The writer and readers here are small in-process gRPC services (the real `Writer`/`Reader`
//! protocol over loopback TCP) over an in-memory segment store and a real SQLite metadata store,
//! so the router's own logic is tested without the writer/reader roles; the router itself is
//! the real one (`shoal_engine::roles::router::build`).
#![allow(clippy::unwrap_used)]

mod common;

use common::engine::Engine;

use serde_json::{Map, Value, json};
use shoal_engine::config::LogFormat;
use shoal_engine::core::distance::{dot, l2_sq, norm_sq};
use shoal_engine::core::filter::Filter;
use shoal_engine::core::meta::{
    CollectionRecord, FlushCommit, IndexRecord, MetaStore, SegmentRecord,
};
use shoal_engine::core::types::Metric;
use shoal_engine::roles::router::config::RouterConfig;
use shoal_engine::roles::router::membership::Discovery;
use shoal_engine::rpc::pb::reader_server::{Reader, ReaderServer};
use shoal_engine::rpc::pb::writer_server::{Writer, WriterServer};
use shoal_engine::rpc::pb::*;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

// ------------------------------------------------------------------ in-memory cluster doubles

#[derive(Clone, Debug)]
struct FRow {
    id: i64,
    v: Vec<f32>,
    fields: Map<String, Value>,
}

struct FColl {
    id: i64,
    metric: Metric,
    vector_field: String,
    growing: Vec<FRow>,
    sealed: BTreeMap<u64, Vec<FRow>>,
}

/// What the fake writer commits and the fake readers serve (the "shared filesystem").
#[derive(Default)]
struct Store {
    version: AtomicU64,
    next_seg: AtomicU64,
    next_id: AtomicI64,
    colls: parking_lot::Mutex<HashMap<String, FColl>>,
}

impl Store {
    /// The last catalogue version a commit returned (what every answer carries).
    fn current(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }
}

struct FakeWriter {
    store: Arc<Store>,
    meta: MetaStore,
}

impl FakeWriter {
    /// The metadata store's id of collection `name`.
    fn coll_id(&self, name: &str) -> Result<i64, Status> {
        Ok(self
            .store
            .colls
            .lock()
            .get(name)
            .ok_or_else(|| not_found(name))?
            .id)
    }

    /// The metadata store's catalogue version after a commit (what a real writer returns).
    async fn version(&self) -> Result<u64, Status> {
        let v = self.meta.catalog_version().await.map_err(st_internal)?;
        self.store.version.fetch_max(v, Ordering::SeqCst);
        Ok(v)
    }
}

fn st_internal<E: std::fmt::Display>(e: E) -> Status {
    Status::unavailable(e.to_string())
}

fn not_found(name: &str) -> Status {
    Status::not_found(format!("collection not found: {name}"))
}

fn row_source(r: &FRow) -> Map<String, Value> {
    let mut m = r.fields.clone();
    m.insert("id".into(), json!(r.id));
    m
}

#[tonic::async_trait]
impl Writer for FakeWriter {
    async fn create_collection(
        &self,
        req: Request<CreateCollectionRequest>,
    ) -> Result<Response<CreateCollectionResponse>, Status> {
        let r = req.into_inner();
        if self.store.colls.lock().contains_key(&r.collection) {
            return Err(Status::already_exists(format!(
                "collection {:?} already exists",
                r.collection
            )));
        }
        let metric: Metric = r.metric_type.parse().map_err(Status::invalid_argument)?;
        let rec = CollectionRecord {
            id: 0,
            name: r.collection.clone(),
            dim: i64::from(r.dimension),
            metric: r.metric_type.clone(),
            auto_id: r.auto_id,
            pk_field: r.primary_field_name.clone(),
            vector_field: r.vector_field_name.clone(),
            dynamic: r.enable_dynamic_field,
            loaded: true,
            flushed_seq: 0,
            created_ms: 0,
        };
        let id = self
            .meta
            .create_collection(&rec)
            .await
            .map_err(st_internal)?;
        self.meta
            .put_index(&IndexRecord {
                collection_id: id,
                index_name: r.vector_field_name.clone(),
                field_name: r.vector_field_name.clone(),
                index_type: "FLAT".into(),
                metric: r.metric_type.clone(),
                params: "{}".into(),
            })
            .await
            .map_err(st_internal)?;
        self.store.colls.lock().insert(
            r.collection,
            FColl {
                id,
                metric,
                vector_field: r.vector_field_name,
                growing: Vec::new(),
                sealed: BTreeMap::new(),
            },
        );
        Ok(Response::new(CreateCollectionResponse {
            catalog_version: self.version().await?,
        }))
    }

    async fn drop_collection(
        &self,
        req: Request<DropCollectionRequest>,
    ) -> Result<Response<DropCollectionResponse>, Status> {
        let name = req.into_inner().collection;
        let id = self
            .store
            .colls
            .lock()
            .remove(&name)
            .ok_or_else(|| not_found(&name))?
            .id;
        self.meta.drop_collection(id).await.map_err(st_internal)?;
        Ok(Response::new(DropCollectionResponse {
            catalog_version: self.version().await?,
        }))
    }

    async fn insert(
        &self,
        req: Request<InsertRequest>,
    ) -> Result<Response<InsertResponse>, Status> {
        let r = req.into_inner();
        let mut colls = self.store.colls.lock();
        let c = colls
            .get_mut(&r.collection)
            .ok_or_else(|| not_found(&r.collection))?;
        let mut ids = Vec::new();
        for row in r.rows {
            let id = row
                .id
                .unwrap_or_else(|| self.store.next_id.fetch_add(1, Ordering::SeqCst) + 1_000_000);
            if r.upsert {
                c.growing.retain(|x| x.id != id);
                for seg in c.sealed.values_mut() {
                    seg.retain(|x| x.id != id);
                }
            }
            let fields = match serde_json::from_slice::<Value>(&row.dynamic_json) {
                Ok(Value::Object(m)) => m,
                _ => Map::new(),
            };
            c.growing.push(FRow {
                id,
                v: row.vector,
                fields,
            });
            ids.push(id);
        }
        Ok(Response::new(InsertResponse { ids, epoch: 1 }))
    }

    async fn delete(
        &self,
        req: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let r = req.into_inner();
        let f = Filter::parse(&r.filter).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut colls = self.store.colls.lock();
        let c = colls
            .get_mut(&r.collection)
            .ok_or_else(|| not_found(&r.collection))?;
        let mut n = 0u64;
        let mut keep = |x: &FRow| {
            let hit = f.matches(&row_source(x));
            n += u64::from(hit);
            !hit
        };
        c.growing.retain(&mut keep);
        for seg in c.sealed.values_mut() {
            seg.retain(&mut keep);
        }
        Ok(Response::new(DeleteResponse { delete_count: n }))
    }

    async fn flush(&self, req: Request<FlushRequest>) -> Result<Response<FlushResponse>, Status> {
        let name = req.into_inner().collection;
        let (cid, seg, rows) = {
            let mut colls = self.store.colls.lock();
            let c = colls.get_mut(&name).ok_or_else(|| not_found(&name))?;
            if c.growing.is_empty() {
                return Ok(Response::new(FlushResponse {
                    catalog_version: self.store.current(),
                }));
            }
            let seg = self.store.next_seg.fetch_add(1, Ordering::SeqCst) + 1;
            let rows = std::mem::take(&mut c.growing);
            let n = rows.len();
            c.sealed.insert(seg, rows);
            (c.id, seg, n)
        };
        self.meta
            .commit_flush(&FlushCommit {
                collection_id: cid,
                new_segments: vec![SegmentRecord {
                    collection_id: cid,
                    id: seg as i64,
                    rows: rows as i64,
                    manifest_crc: 0,
                    tomb_seq: 0,
                    tomb_crc: 0,
                }],
                ..Default::default()
            })
            .await
            .map_err(st_internal)?;
        Ok(Response::new(FlushResponse {
            catalog_version: self.version().await?,
        }))
    }

    async fn set_loaded(
        &self,
        req: Request<SetLoadedRequest>,
    ) -> Result<Response<SetLoadedResponse>, Status> {
        let r = req.into_inner();
        let id = self.coll_id(&r.collection)?;
        self.meta
            .set_loaded(id, r.loaded)
            .await
            .map_err(st_internal)?;
        Ok(Response::new(SetLoadedResponse {
            catalog_version: self.version().await?,
        }))
    }

    async fn create_index(
        &self,
        req: Request<CreateIndexRequest>,
    ) -> Result<Response<CreateIndexResponse>, Status> {
        let r = req.into_inner();
        let id = self.coll_id(&r.collection)?;
        self.meta
            .put_index(&IndexRecord {
                collection_id: id,
                index_name: r.index_name,
                field_name: r.field_name,
                index_type: r.index_type,
                metric: r.metric_type,
                params: String::from_utf8_lossy(&r.params_json).into_owned(),
            })
            .await
            .map_err(st_internal)?;
        Ok(Response::new(CreateIndexResponse {
            catalog_version: self.version().await?,
        }))
    }

    async fn drop_index(
        &self,
        req: Request<DropIndexRequest>,
    ) -> Result<Response<DropIndexResponse>, Status> {
        let r = req.into_inner();
        let id = self.coll_id(&r.collection)?;
        self.meta
            .drop_index(id, &r.index_name)
            .await
            .map_err(st_internal)?;
        Ok(Response::new(DropIndexResponse {
            catalog_version: self.version().await?,
        }))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse {
            node_id: "fake-writer".into(),
            role: "writer".into(),
            ready: true,
            catalog_version: self.store.current(),
            epoch: 1,
            draining: false,
        }))
    }
}

/// A reader over the shared store; `dead` makes every call fail like a killed process.
struct FakeReader {
    store: Arc<Store>,
    dead: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
}

fn internal_dist(m: Metric, q: &[f32], v: &[f32]) -> f32 {
    match m {
        Metric::L2 => l2_sq(q, v),
        Metric::IP => -dot(q, v),
        Metric::COSINE => {
            -dot(q, v) / (norm_sq(q).sqrt() * norm_sq(v).sqrt()).max(f32::MIN_POSITIVE)
        }
    }
}

fn fields_json(r: &FRow, vector_field: &str, out: &[String]) -> Vec<u8> {
    if out.is_empty() {
        return Vec::new();
    }
    let mut m = Map::new();
    for o in out {
        if o == "*" {
            m.extend(r.fields.clone());
            m.insert(vector_field.into(), json!(r.v));
        } else if o == vector_field {
            m.insert(vector_field.into(), json!(r.v));
        } else if let Some(v) = r.fields.get(o) {
            m.insert(o.clone(), v.clone());
        }
    }
    serde_json::to_vec(&m).unwrap()
}

fn result_row(r: &FRow, vector_field: &str, out: &[String]) -> ResultRow {
    ResultRow {
        id: r.id,
        fields_json: fields_json(r, vector_field, out),
    }
}

impl FakeReader {
    fn check(&self) -> Result<(), Status> {
        if self.dead.load(Ordering::SeqCst) {
            Err(Status::unavailable("reader is gone"))
        } else {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// A get/query answer: `rows` of `match_count` matches, at the current catalogue version.
    fn rows_response(
        &self,
        match_count: usize,
        rows: Vec<ResultRow>,
        unknown: Vec<u64>,
    ) -> Response<RowsResponse> {
        Response::new(RowsResponse {
            match_count: match_count as u64,
            rows,
            unknown_segments: unknown,
            catalog_version: self.store.current(),
        })
    }

    /// Rows of the given segments matching the filter, sorted by id; and unknown segments.
    fn rows(
        &self,
        coll: &str,
        segs: &[u64],
        filter: &str,
    ) -> Result<(Vec<FRow>, String, Metric, Vec<u64>), Status> {
        let f = if filter.trim().is_empty() {
            None
        } else {
            Some(Filter::parse(filter).map_err(|e| Status::invalid_argument(e.to_string()))?)
        };
        let colls = self.store.colls.lock();
        let c = colls.get(coll).ok_or_else(|| not_found(coll))?;
        let mut out = Vec::new();
        let mut unknown = Vec::new();
        for s in segs {
            match c.sealed.get(s) {
                None => unknown.push(*s),
                Some(rows) => out.extend(
                    rows.iter()
                        .filter(|r| f.as_ref().is_none_or(|f| f.matches(&row_source(r))))
                        .cloned(),
                ),
            }
        }
        out.sort_by_key(|r| r.id);
        Ok((out, c.vector_field.clone(), c.metric, unknown))
    }
}

#[tonic::async_trait]
impl Reader for FakeReader {
    async fn search_shard(
        &self,
        req: Request<SearchShardRequest>,
    ) -> Result<Response<SearchShardResponse>, Status> {
        self.check()?;
        let r = req.into_inner();
        let (rows, vf, metric, unknown) = self.rows(&r.collection, &r.segment_ids, &r.filter)?;
        let dim = r.dimension as usize;
        let results = r
            .queries
            .chunks(dim)
            .map(|q| {
                let mut hits: Vec<Hit> = rows
                    .iter()
                    .map(|x| Hit {
                        id: x.id,
                        distance: internal_dist(metric, q, &x.v),
                        fields_json: fields_json(x, &vf, &r.output_fields),
                    })
                    .collect();
                hits.sort_by(|a, b| a.distance.total_cmp(&b.distance).then(a.id.cmp(&b.id)));
                hits.truncate(r.top_k as usize);
                QueryHits { hits }
            })
            .collect();
        Ok(Response::new(SearchShardResponse {
            results,
            unknown_segments: unknown,
            catalog_version: self.store.current(),
        }))
    }

    async fn get_rows(
        &self,
        req: Request<GetRowsRequest>,
    ) -> Result<Response<RowsResponse>, Status> {
        self.check()?;
        let r = req.into_inner();
        let (rows, vf, _, unknown) = self.rows(&r.collection, &r.segment_ids, "")?;
        let rows: Vec<ResultRow> = rows
            .iter()
            .filter(|x| r.ids.contains(&x.id))
            .map(|x| result_row(x, &vf, &r.output_fields))
            .collect();
        Ok(self.rows_response(rows.len(), rows, unknown))
    }

    async fn query_shard(
        &self,
        req: Request<QueryShardRequest>,
    ) -> Result<Response<RowsResponse>, Status> {
        self.check()?;
        let r = req.into_inner();
        let (rows, vf, _, unknown) = self.rows(&r.collection, &r.segment_ids, &r.filter)?;
        let page = rows
            .iter()
            .take(r.limit as usize)
            .map(|x| result_row(x, &vf, &r.output_fields))
            .collect();
        Ok(self.rows_response(rows.len(), page, unknown))
    }

    async fn notify_segments(
        &self,
        _: Request<NotifySegmentsRequest>,
    ) -> Result<Response<NotifySegmentsResponse>, Status> {
        self.check()?;
        Ok(Response::new(NotifySegmentsResponse {
            catalog_version: self.store.current(),
        }))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        self.check()?;
        Ok(Response::new(HealthResponse {
            node_id: "fake-reader".into(),
            role: "reader".into(),
            ready: true,
            catalog_version: self.store.current(),
            epoch: 0,
            draining: false,
        }))
    }
}

fn incoming(
    l: tokio::net::TcpListener,
) -> impl futures::Stream<Item = Result<tokio::net::TcpStream, std::io::Error>> {
    futures::stream::unfold(l, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    })
}

struct ReaderHandle {
    addr: String,
    dead: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl ReaderHandle {
    /// Stop accepting connections and fail every call on the open ones (a killed process).
    fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        self.task.abort();
    }
}

async fn serve_reader(store: Arc<Store>, listener: tokio::net::TcpListener) -> ReaderHandle {
    let addr = listener.local_addr().unwrap().to_string();
    let dead = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ReaderServer::new(FakeReader {
        store,
        dead: dead.clone(),
        calls: calls.clone(),
    });
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming(listener))
            .await;
    });
    ReaderHandle {
        addr,
        dead,
        calls,
        task,
    }
}

/// A fake cluster (writer + readers over SQLite) and the real router in front of it.
struct Cluster {
    store: Arc<Store>,
    readers: Vec<ReaderHandle>,
    router: shoal_engine::roles::router::Built,
    _dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for l in &self.router.loops {
            l.abort();
        }
        for r in &self.readers {
            r.task.abort();
        }
    }
}

async fn bind() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// `late`: reader listeners that are in the static list but not started yet (returned).
async fn cluster(
    n_readers: usize,
    late: usize,
    replication: usize,
) -> (Cluster, Vec<tokio::net::TcpListener>) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("meta.db").display());
    let meta = MetaStore::connect(&url).await.unwrap();
    let store = Arc::new(Store::default());
    let wl = bind().await;
    let writer_addr = wl.local_addr().unwrap().to_string();
    let w = WriterServer::new(FakeWriter {
        store: store.clone(),
        meta,
    });
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(w)
            .serve_with_incoming(incoming(wl))
            .await;
    });
    let mut readers = Vec::new();
    for _ in 0..n_readers {
        readers.push(serve_reader(store.clone(), bind().await).await);
    }
    let mut pending = Vec::new();
    for _ in 0..late {
        pending.push(bind().await);
    }
    let mut list: Vec<String> = readers.iter().map(|r| r.addr.clone()).collect();
    list.extend(pending.iter().map(|l| l.local_addr().unwrap().to_string()));
    let cfg = RouterConfig {
        meta_url: url,
        writer: writer_addr,
        discovery: Discovery::Static(list),
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        replication,
        auth_token: None,
        log_format: LogFormat::Text,
        request_timeout: Duration::from_secs(2),
        flush_timeout: Duration::from_secs(10),
        catalog_poll: Duration::from_millis(200),
        health_interval: Duration::from_millis(100),
        writer_failover_timeout: Duration::from_secs(10),
        shutdown_delay: Duration::ZERO,
        meta_startup_timeout: Duration::from_secs(10),
    };
    let router = shoal_engine::roles::router::build(&cfg).await.unwrap();
    (
        Cluster {
            store,
            readers,
            router,
            _dir: dir,
        },
        pending,
    )
}

async fn raw(r: &axum::Router, path: &str, body: &str) -> Value {
    let req = axum::http::Request::post(format!("/v2/vectordb/{path}"))
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body.to_string()))
        .unwrap();
    let (_, bytes) = common::call(r, req).await;
    serde_json::from_slice(&bytes).unwrap()
}

impl Cluster {
    async fn post(&self, path: &str, body: Value) -> Value {
        raw(&self.router.rest, path, &body.to_string()).await
    }
    async fn ok(&self, path: &str, body: Value) -> Value {
        let v = self.post(path, body.clone()).await;
        assert_eq!(v["code"], 0, "{path} {body} -> {v}");
        v
    }
    async fn get_ops(&self, path: &str) -> (u16, String) {
        let req = axum::http::Request::get(path)
            .body(axum::body::Body::empty())
            .unwrap();
        let (status, bytes) = common::call(&self.router.ops, req).await;
        (
            status.as_u16(),
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }
    /// Wait (with a deadline) until the router routes to `n` readers.
    async fn wait_live(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let live = self.router.state.backend.routable_readers().len();
            if live == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "router routes to {live} readers, expected {n}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

// ------------------------------------------------------------------ data and oracle

fn vectors(n: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect())
        .collect()
}

/// Exact top-k (id, user score) over `rows` for one query.
fn oracle(
    metric: Metric,
    rows: &[(i64, Vec<f32>, i64)],
    q: &[f32],
    k: usize,
    tag: Option<i64>,
) -> Vec<(i64, f32)> {
    let mut all: Vec<(f32, i64)> = rows
        .iter()
        .filter(|r| tag.is_none_or(|t| r.2 == t))
        .map(|(id, v, _)| (internal_dist(metric, q, v), *id))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    all.into_iter()
        .take(k)
        .map(|(d, id)| (id, metric.user_score(d)))
        .collect()
}

fn hits_of(v: &Value) -> Vec<(i64, f32)> {
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["id"].as_i64().unwrap(),
                h["distance"].as_f64().unwrap() as f32,
            )
        })
        .collect()
}

fn assert_same(got: &[(i64, f32)], want: &[(i64, f32)], what: &str) {
    assert_eq!(
        got.iter().map(|h| h.0).collect::<Vec<_>>(),
        want.iter().map(|h| h.0).collect::<Vec<_>>(),
        "{what}: ids differ"
    );
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g.1 - w.1).abs() <= 1e-4 * w.1.abs().max(1.0),
            "{what}: score {} vs {}",
            g.1,
            w.1
        );
    }
}

const DIM: usize = 16;

/// Create `name`, insert `n` rows in batches, flushing every `per_segment` rows (several
/// segments), return the rows (id, vector, tag).
async fn load(
    c: &Cluster,
    name: &str,
    metric: &str,
    n: usize,
    per_segment: usize,
) -> Vec<(i64, Vec<f32>, i64)> {
    c.ok(
        "collections/create",
        json!({"collectionName": name, "dimension": DIM, "metricType": metric}),
    )
    .await;
    let vs = vectors(n, DIM, 7);
    let rows: Vec<(i64, Vec<f32>, i64)> = vs
        .into_iter()
        .enumerate()
        .map(|(i, v)| (i as i64, v, (i % 5) as i64))
        .collect();
    for chunk in rows.chunks(per_segment) {
        let data: Vec<Value> = chunk
            .iter()
            .map(
                |(id, v, tag)| json!({"id": id, "vector": v, "tag": tag, "name": format!("r{id}")}),
            )
            .collect();
        let r = c
            .ok(
                "entities/insert",
                json!({"collectionName": name, "data": data}),
            )
            .await;
        assert_eq!(r["data"]["insertCount"], chunk.len());
        c.ok("collections/flush", json!({"collectionName": name}))
            .await;
    }
    rows
}

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn router_search_equals_the_exact_oracle_for_every_metric_with_paging_filter_and_fields() {
    let _watchdog = shoal_testkit::watchdog("router search oracle", Duration::from_secs(120));
    let (c, _) = cluster(3, 0, 1).await;
    c.wait_live(3).await;
    let queries = vectors(4, DIM, 99);
    for (name, metric) in [
        ("l2c", Metric::L2),
        ("ipc", Metric::IP),
        ("cosc", Metric::COSINE),
    ] {
        let rows = load(&c, name, metric.as_str(), 2000, 400).await;
        assert_eq!(
            c.router.state.backend.catalog().collections[name]
                .segments
                .len(),
            5
        );
        // Several queries at once, limit 10.
        let v = c
            .ok(
                "entities/search",
                json!({"collectionName": name, "data": queries, "limit": 10}),
            )
            .await;
        assert_eq!(v["topks"], json!([10, 10, 10, 10]));
        let got = hits_of(&v);
        for (qi, q) in queries.iter().enumerate() {
            assert_same(
                &got[qi * 10..(qi + 1) * 10],
                &oracle(metric, &rows, q, 10, None),
                &format!("{name} query {qi}"),
            );
        }
        // offset + limit is a window of the global order.
        let v = c
            .ok(
                "entities/search",
                json!({"collectionName": name, "data": [queries[0]], "limit": 7, "offset": 5}),
            )
            .await;
        assert_same(
            &hits_of(&v),
            &oracle(metric, &rows, &queries[0], 12, None)[5..],
            "offset",
        );
        // filter + output fields.
        let v = c
            .ok(
                "entities/search",
                json!({"collectionName": name, "data": [queries[1]], "limit": 5, "filter": "tag == 3", "outputFields": ["name", "tag"]}),
            )
            .await;
        assert_same(
            &hits_of(&v),
            &oracle(metric, &rows, &queries[1], 5, Some(3)),
            "filter",
        );
        for h in v["data"].as_array().unwrap() {
            assert_eq!(h["tag"], 3);
            assert_eq!(h["name"], format!("r{}", h["id"]));
            assert!(h.get("vector").is_none(), "{h}");
        }
    }
    // The planned readers all served (segments spread over them).
    for r in &c.readers {
        assert!(
            r.calls.load(Ordering::SeqCst) > 0,
            "reader {} got no call",
            r.addr
        );
    }
    let (status, body) = c.get_ops("/readyz").await;
    assert_eq!(status, 200, "{body}");
    let (_, metrics) = c.get_ops("/metrics").await;
    assert!(
        metrics.contains("shoal_router_readers{state=\"live\"} 3"),
        "{metrics}"
    );
}

#[tokio::test]
async fn get_query_count_merge_across_readers_and_deletes_and_upserts_show_after_flush() {
    let _watchdog = shoal_testkit::watchdog("router get/query/count", Duration::from_secs(120));
    let (c, _) = cluster(3, 0, 2).await;
    c.wait_live(3).await;
    let rows = load(&c, "docs", "L2", 1500, 300).await;
    let count = |filter: &str| json!({"collectionName": "docs", "filter": filter, "outputFields": ["count(*)"]});
    let v = c.ok("entities/query", count("")).await;
    assert_eq!(v["data"][0]["count(*)"], 1500);
    let v = c.ok("entities/query", count("tag == 2")).await;
    assert_eq!(v["data"][0]["count(*)"], 300);
    let v = c
        .ok("collections/get_stats", json!({"collectionName": "docs"}))
        .await;
    assert_eq!(v["data"]["rowCount"], 1500);
    // Query pages are windows of the id order across every segment.
    let v = c
        .ok(
            "entities/query",
            json!({"collectionName": "docs", "filter": "id >= 100", "limit": 20, "offset": 290, "outputFields": ["tag"]}),
        )
        .await;
    let ids: Vec<i64> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, (390..410).collect::<Vec<_>>());
    assert_eq!(v["data"][0]["tag"], 0);
    // get keeps request order, skips unknown ids, returns the vector by default.
    let v = c
        .ok(
            "entities/get",
            json!({"collectionName": "docs", "id": [1203, 5, 999_999, 77]}),
        )
        .await;
    let got = v["data"].as_array().unwrap();
    assert_eq!(
        got.iter()
            .map(|r| r["id"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        vec![1203, 5, 77]
    );
    let v5: Vec<f32> = serde_json::from_value(got[1]["vector"].clone()).unwrap();
    assert_eq!(v5, rows[5].1);
    assert_eq!(got[1]["name"], "r5");
    // Delete and upsert, then flush: visible through every path.
    let v = c
        .ok(
            "entities/delete",
            json!({"collectionName": "docs", "filter": "id in [0, 1, 2]"}),
        )
        .await;
    assert_eq!(v["data"]["deleteCount"], 3);
    let newv = vec![0.5f32; DIM];
    c.ok(
        "entities/upsert",
        json!({"collectionName": "docs", "data": [{"id": 10, "vector": newv, "tag": 42}]}),
    )
    .await;
    c.ok("collections/flush", json!({"collectionName": "docs"}))
        .await;
    let v = c.ok("entities/query", count("")).await;
    assert_eq!(v["data"][0]["count(*)"], 1497);
    let v = c
        .ok(
            "entities/get",
            json!({"collectionName": "docs", "id": [0, 10]}),
        )
        .await;
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert_eq!(v["data"][0]["tag"], 42);
    let v = c
        .ok(
            "entities/search",
            json!({"collectionName": "docs", "data": [newv], "limit": 1}),
        )
        .await;
    assert_eq!(hits_of(&v)[0].0, 10);
    // Release: searches refuse with 101, get_load_state follows; load brings them back.
    c.ok("collections/release", json!({"collectionName": "docs"}))
        .await;
    let v = c
        .post(
            "entities/search",
            json!({"collectionName": "docs", "data": [newv]}),
        )
        .await;
    assert_eq!(v["code"], 101, "{v}");
    let v = c
        .ok(
            "collections/get_load_state",
            json!({"collectionName": "docs"}),
        )
        .await;
    assert_eq!(v["data"]["loadState"], "LoadStateNotLoad");
    c.ok("collections/load", json!({"collectionName": "docs"}))
        .await;
    c.ok(
        "entities/search",
        json!({"collectionName": "docs", "data": [newv]}),
    )
    .await;
    // Index DDL goes through the writer and shows in the cached catalogue.
    c.ok(
        "indexes/drop",
        json!({"collectionName": "docs", "indexName": "vector"}),
    )
    .await;
    let v = c
        .ok("indexes/list", json!({"collectionName": "docs"}))
        .await;
    assert_eq!(v["data"], json!([]));
    c.ok(
        "indexes/create",
        json!({"collectionName": "docs", "indexParams": [{"fieldName": "vector", "indexName": "vidx", "metricType": "L2", "indexType": "FLAT"}]}),
    )
    .await;
    let v = c
        .ok("indexes/list", json!({"collectionName": "docs"}))
        .await;
    assert_eq!(v["data"], json!(["vidx"]));
    let v = c
        .ok("collections/describe", json!({"collectionName": "docs"}))
        .await;
    assert_eq!(v["data"]["indexes"][0]["indexName"], "vidx");
    assert_eq!(v["data"]["load"], "LoadStateLoaded");
    // Drop through the router.
    c.ok("collections/drop", json!({"collectionName": "docs"}))
        .await;
    let v = c
        .ok("collections/has", json!({"collectionName": "docs"}))
        .await;
    assert_eq!(v["data"]["has"], false);
}

/// Searches from several tasks until stopped, counting the answers (each `search` call checks
/// its own answer).
struct SearchLoad {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SearchLoad {
    /// `n` tasks; task `t` runs `search(t)`, `search(t + n)`, ... until [`SearchLoad::stop`].
    fn start<F, Fut>(n: usize, search: F) -> SearchLoad
    where
        F: Fn(usize) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let (stop, answered) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let search = Arc::new(search);
        let tasks = (0..n)
            .map(|t| {
                let (stop, answered, search) = (stop.clone(), answered.clone(), search.clone());
                tokio::spawn(async move {
                    let mut i = t;
                    while !stop.load(Ordering::SeqCst) {
                        search(i).await;
                        answered.fetch_add(1, Ordering::SeqCst);
                        i += n;
                    }
                })
            })
            .collect();
        SearchLoad {
            stop,
            answered,
            tasks,
        }
    }

    fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }

    /// Wait (bounded) until `n` searches were answered.
    async fn wait_answers(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.answered() < n {
            assert!(Instant::now() < deadline, "search load stalled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stop the tasks, wait for them (a panicked one fails the test); the answers in all.
    async fn stop(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.expect("search task panicked");
        }
        self.answered.load(Ordering::SeqCst)
    }
}

/// Searches from 4 tasks against collection `f` while reader 1 of `c` is killed: every answer
/// must be code 0 and exact (the router re-sends a dead reader's segments within the request).
/// Returns the number of answers after the kill.
async fn kill_a_reader_under_search_load(
    c: &mut Cluster,
    rows: &Arc<Vec<(i64, Vec<f32>, i64)>>,
    queries: &Arc<Vec<Vec<f32>>>,
) -> usize {
    let rest = c.router.rest.clone();
    let (rows, queries) = (rows.clone(), queries.clone());
    let load = SearchLoad::start(4, move |i| {
        let (rest, rows, queries) = (rest.clone(), rows.clone(), queries.clone());
        async move {
            let q = &queries[i % queries.len()];
            let body = json!({"collectionName": "f", "data": [q], "limit": 10});
            let v = raw(&rest, "entities/search", &body.to_string()).await;
            assert_eq!(v["code"], 0, "search during failover: {v}");
            assert_same(
                &hits_of(&v),
                &oracle(Metric::IP, &rows, q, 10, None),
                "failover",
            );
        }
    });
    load.wait_answers(20).await;
    let victim = c.readers.remove(1);
    victim.kill();
    let before = load.answered();
    load.wait_answers(before + 40).await;
    load.stop().await - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_replication_2_a_reader_kill_fails_no_search() {
    let _watchdog = shoal_testkit::watchdog("router failover rf=2", Duration::from_secs(120));
    let (mut c, _) = cluster(3, 0, 2).await;
    c.wait_live(3).await;
    let rows = Arc::new(load(&c, "f", "IP", 2000, 100).await);
    let queries = Arc::new(vectors(8, DIM, 6));
    let after_kill = kill_a_reader_under_search_load(&mut c, &rows, &queries).await;
    assert!(after_kill >= 40, "{after_kill} answers after the kill");
    c.wait_live(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_killed_during_a_search_load_fails_over_and_a_late_reader_gets_segments() {
    let _watchdog = shoal_testkit::watchdog("router failover", Duration::from_secs(120));
    let (mut c, mut late) = cluster(3, 1, 1).await;
    c.wait_live(3).await;
    let rows = Arc::new(load(&c, "f", "IP", 2000, 100).await);
    let queries = Arc::new(vectors(8, DIM, 5));
    // Search load from several tasks while one reader is killed: every answer stays exact.
    kill_a_reader_under_search_load(&mut c, &rows, &queries).await;
    // The dead reader leaves the routable set; the late reader joins once it listens.
    c.wait_live(2).await;
    let joined = serve_reader(c.store.clone(), late.remove(0)).await;
    c.wait_live(3).await;
    let routable = c.router.state.backend.routable_readers();
    assert!(routable.contains(&joined.addr), "{routable:?}");
    let segs: Vec<u64> = c.router.state.backend.catalog().collections["f"]
        .segments
        .iter()
        .map(|s| s.id as u64)
        .collect();
    let plan = shoal_engine::roles::router::hrw::plan(&segs, &routable, 1, 0).unwrap();
    let idx = routable.iter().position(|a| *a == joined.addr).unwrap();
    assert!(
        plan.per_reader.contains_key(&idx),
        "20 segments, none on the new reader: {plan:?}"
    );
    for q in queries.iter() {
        let v = c
            .ok(
                "entities/search",
                json!({"collectionName": "f", "data": [q], "limit": 10}),
            )
            .await;
        assert_same(
            &hits_of(&v),
            &oracle(Metric::IP, &rows, q, 10, None),
            "after join",
        );
    }
    assert!(
        joined.calls.load(Ordering::SeqCst) > 0,
        "the new reader got no search"
    );
    c.readers.push(joined);
    // Every reader dead: a clear 65535, never a hang.
    for r in &c.readers {
        r.kill();
    }
    let v = c
        .post(
            "entities/search",
            json!({"collectionName": "f", "data": [queries[0]]}),
        )
        .await;
    assert_eq!(v["code"], 65535, "{v}");
}

/// Requests every role must reject, against a collection `c` (dim 4, L2) and an unknown `nope`.
fn bad_cases() -> Vec<(&'static str, String)> {
    let v4 = "[0.1, 0.2, 0.3, 0.4]";
    let good = format!("{{\"id\": 100, \"vector\": {v4}}}");
    let mut cases: Vec<(&'static str, String)> = vec![
        (
            "entities/insert",
            "{\"collectionName\": \"c\", \"data\": [".into(),
        ),
        ("collections/create", "[1, 2]".into()),
        ("collections/create", "{\"dimension\": 4}".into()),
        (
            "collections/create",
            "{\"collectionName\": \"c\", \"dimension\": 4}".into(),
        ),
        (
            "collections/create",
            "{\"collectionName\": \"d\", \"dimension\": 40000}".into(),
        ),
        (
            "collections/create",
            "{\"collectionName\": \"1bad\", \"dimension\": 4}".into(),
        ),
        (
            "collections/create",
            "{\"collectionName\": \"d\", \"dimension\": 4, \"metricType\": \"HAMMING\"}".into(),
        ),
        ("entities/insert", "{\"collectionName\": \"c\"}".into()),
        ("entities/search", "{\"collectionName\": \"c\"}".into()),
        ("entities/get", "{\"collectionName\": \"c\"}".into()),
        ("entities/delete", "{\"collectionName\": \"c\"}".into()),
        ("collections/describe", "{}".into()),
        (
            "entities/search",
            "{\"collectionName\": \"c\", \"data\": [[0.1, 0.2]]}".into(),
        ),
        (
            "entities/search",
            format!("{{\"collectionName\": \"c\", \"data\": [{v4}], \"limit\": 0}}"),
        ),
        (
            "entities/search",
            format!("{{\"collectionName\": \"c\", \"data\": [{v4}], \"filter\": \"id >\"}}"),
        ),
        (
            "entities/query",
            "{\"collectionName\": \"c\", \"filter\": \"(tag == 1\"}".into(),
        ),
        (
            "entities/delete",
            "{\"collectionName\": \"c\", \"filter\": \"tag === 1\"}".into(),
        ),
        (
            "indexes/create",
            "{\"collectionName\": \"c\", \"indexParams\": [{\"fieldName\": \"other\"}]}".into(),
        ),
        (
            "indexes/describe",
            "{\"collectionName\": \"c\", \"indexName\": \"nope\"}".into(),
        ),
    ];
    for bad in [
        "{\"id\": 101, \"vector\": [0.1, 0.2, 0.3]}".to_string(),
        "{\"id\": 101, \"vector\": [0.1, 0.2, 0.3, 1e39]}".to_string(),
        format!("{{\"vector\": {v4}}}"),
        format!("{{\"id\": 100, \"vector\": {v4}}}"),
    ] {
        cases.push((
            "entities/insert",
            format!("{{\"collectionName\": \"c\", \"data\": [{good}, {bad}]}}"),
        ));
    }
    for ep in [
        "collections/describe",
        "collections/drop",
        "collections/get_stats",
        "collections/load",
        "collections/flush",
        "entities/insert",
        "entities/delete",
        "entities/get",
        "entities/query",
        "entities/search",
        "indexes/list",
        "indexes/create",
    ] {
        cases.push((
            ep,
            format!("{{\"collectionName\": \"nope\", \"data\": [{good}], \"id\": 1, \"filter\": \"id > 0\", \"indexName\": \"vector\"}}"),
        ));
    }
    cases
}

/// Every bad request gets the same Milvus code from the router as from the standalone role.
#[tokio::test]
async fn bad_requests_get_the_same_codes_through_the_router_as_standalone() {
    let _watchdog = shoal_testkit::watchdog("router codes", Duration::from_secs(120));
    let (c, _) = cluster(2, 0, 1).await;
    c.wait_live(2).await;
    let app = common::App::new(None).await;
    let setup = json!({"collectionName": "c", "dimension": 4, "metricType": "L2"});
    c.ok("collections/create", setup.clone()).await;
    app.ok("collections/create", setup).await;
    let cases = bad_cases();
    for (ep, body) in &cases {
        let via_router = raw(&c.router.rest, ep, body).await;
        let (_, standalone) = app.raw(ep, body, &[]).await;
        assert_ne!(
            standalone["code"], 0,
            "{ep} {body}: the case must be an error"
        );
        assert_eq!(
            via_router["code"], standalone["code"],
            "{ep} {body}: router {via_router} vs standalone {standalone}"
        );
    }
    // Nothing reached the data: the collection is still empty and alone.
    let v = c.ok("collections/list", json!({})).await;
    assert_eq!(v["data"], json!(["c"]));
}

// ------------------------------------------------------------------ the real processes

/// How long a router may take to see its readers live.
const LIVE_WITHIN: Duration = Duration::from_secs(20);

fn port() -> u16 {
    shoal_testkit::free_port().unwrap()
}

fn reader_proc(name: &'static str, meta: &str, data: &std::path::Path, grpc: u16) -> Engine {
    reader_proc_with(name, meta, data, grpc, &[])
}

/// As [`reader_proc`], with `extra` arguments.
fn reader_proc_with(
    name: &'static str,
    meta: &str,
    data: &std::path::Path,
    grpc: u16,
    extra: &[&str],
) -> Engine {
    let mut args = vec![
        "--meta".to_string(),
        meta.into(),
        "--data-dir".into(),
        data.display().to_string(),
        "--grpc-listen".into(),
        format!("127.0.0.1:{grpc}"),
        "--node-id".into(),
        name.into(),
        "--poll-interval".into(),
        "200ms".into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    Engine::spawn(name, "reader", &args)
}

async fn post_http(http: &reqwest::Client, base: &str, path: &str, body: &str) -> Value {
    http.post(format!("{base}/v2/vectordb/{path}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Insert `rows` into `collection` through `base`, then flush it.
async fn insert_flushed(http: &reqwest::Client, base: &str, collection: &str, rows: Vec<Value>) {
    let insert = json!({"collectionName": collection, "data": rows});
    ok_http(http, base, "entities/insert", insert).await;
    let flush = json!({"collectionName": collection});
    ok_http(http, base, "collections/flush", flush).await;
}

async fn ok_http(http: &reqwest::Client, base: &str, path: &str, body: Value) -> Value {
    let v = post_http(http, base, path, &body.to_string()).await;
    assert_eq!(v["code"], 0, "{path} {body} -> {v}");
    v
}

/// `shoal-engine writer`, two `reader`s and `router` as processes on MariaDB: the router's
/// answers equal the exact oracle (L2, IP), deletes/upserts show after flush, a reader killed
/// with SIGKILL under search load changes no answer, a reader started later (already in the
/// static list) takes over segments, bad requests get the standalone role's codes, and an
/// IVF_FLAT index the writer builds is reported by the router and searched on the reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_writer_readers_and_router_processes_on_mariadb() {
    let _watchdog = shoal_testkit::watchdog(
        "real_writer_readers_and_router_processes_on_mariadb",
        Duration::from_secs(240),
    );
    let db = shoal_testkit::mariadb::MariaDb::start().expect("MariaDB");
    let url = db.url();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (wg, rest) = (port(), port());
    let mut w = Engine::spawn(
        "writer",
        "writer",
        &[
            "--meta".into(),
            url.clone(),
            "--data-dir".into(),
            data.display().to_string(),
            "--grpc-listen".into(),
            format!("127.0.0.1:{wg}"),
            "--listen".into(),
            format!("127.0.0.1:{}", port()),
            "--node-id".into(),
            "writer".into(),
            "--flush-interval".into(),
            "60s".into(),
        ],
    );
    w.ready(Duration::from_secs(60)).await;
    let (g1, g2, g3) = (port(), port(), port());
    let mut r1 = reader_proc("r1", &url, &data, g1);
    let mut r2 = reader_proc("r2", &url, &data, g2);
    r1.ready(Duration::from_secs(60)).await;
    r2.ready(Duration::from_secs(60)).await;
    let mut router = Engine::spawn(
        "router",
        "router",
        &[
            "--meta".into(),
            url.clone(),
            "--writer".into(),
            format!("127.0.0.1:{wg}"),
            "--readers".into(),
            format!("127.0.0.1:{g1},127.0.0.1:{g2},127.0.0.1:{g3}"),
            "--listen".into(),
            format!("127.0.0.1:{rest}"),
            "--request-timeout".into(),
            "3s".into(),
            "--catalog-poll".into(),
            "500ms".into(),
            "--health-interval".into(),
            "200ms".into(),
        ],
    );
    router.ready(Duration::from_secs(60)).await;
    router.wait_live_readers(2, LIVE_WITHIN).await;
    let base = format!("http://127.0.0.1:{rest}");
    let http = reqwest::Client::new();

    // Two metrics, 2000 rows each in four flushed batches (four segments).
    let queries = vectors(6, DIM, 11);
    let mut data_of = HashMap::new();
    for (name, metric) in [("l2", Metric::L2), ("ip", Metric::IP)] {
        ok_http(
            &http,
            &base,
            "collections/create",
            json!({"collectionName": name, "dimension": DIM, "metricType": metric.as_str()}),
        )
        .await;
        let rows: Vec<(i64, Vec<f32>, i64)> = vectors(2000, DIM, 3)
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i as i64, v, (i % 5) as i64))
            .collect();
        for chunk in rows.chunks(500) {
            let batch: Vec<Value> = chunk
                .iter()
                .map(|(id, v, tag)| json!({"id": id, "vector": v, "tag": tag}))
                .collect();
            ok_http(
                &http,
                &base,
                "entities/insert",
                json!({"collectionName": name, "data": batch}),
            )
            .await;
            ok_http(
                &http,
                &base,
                "collections/flush",
                json!({"collectionName": name}),
            )
            .await;
        }
        // flush returned: every reader serves the rows now.
        for q in &queries {
            let v = ok_http(
                &http,
                &base,
                "entities/search",
                json!({"collectionName": name, "data": [q], "limit": 10}),
            )
            .await;
            assert_same(&hits_of(&v), &oracle(metric, &rows, q, 10, None), name);
        }
        let v = ok_http(
            &http,
            &base,
            "entities/search",
            json!({"collectionName": name, "data": [queries[0]], "limit": 5, "offset": 3, "filter": "tag in [1, 4]", "outputFields": ["tag"]}),
        )
        .await;
        let mut want = oracle(metric, &rows, &queries[0], 200, None);
        want.retain(|(id, _)| id % 5 == 1 || id % 5 == 4);
        assert_same(&hits_of(&v), &want[3..8], "filter + offset");
        data_of.insert(name, rows);
    }

    // Delete and upsert through the router, visible after flush.
    let v = ok_http(
        &http,
        &base,
        "entities/delete",
        json!({"collectionName": "l2", "filter": "id < 10"}),
    )
    .await;
    assert_eq!(v["data"]["deleteCount"], 10);
    let target = vec![3.0f32; DIM];
    ok_http(
        &http,
        &base,
        "entities/upsert",
        json!({"collectionName": "l2", "data": [{"id": 500, "vector": target, "tag": 99}]}),
    )
    .await;
    ok_http(
        &http,
        &base,
        "collections/flush",
        json!({"collectionName": "l2"}),
    )
    .await;
    let v = ok_http(
        &http,
        &base,
        "entities/query",
        json!({"collectionName": "l2", "filter": "", "outputFields": ["count(*)"]}),
    )
    .await;
    assert_eq!(v["data"][0]["count(*)"], 1990);
    let v = ok_http(
        &http,
        &base,
        "entities/get",
        json!({"collectionName": "l2", "id": [3, 500]}),
    )
    .await;
    assert_eq!(v["data"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["data"][0]["tag"], 99);
    let v = ok_http(
        &http,
        &base,
        "entities/search",
        json!({"collectionName": "l2", "data": [target], "limit": 1}),
    )
    .await;
    assert_eq!(hits_of(&v)[0].0, 500);
    let mut rows_l2: Vec<(i64, Vec<f32>, i64)> = data_of["l2"]
        .iter()
        .filter(|r| r.0 >= 10 && r.0 != 500)
        .cloned()
        .collect();
    rows_l2.push((500, target.clone(), 99));
    let rows_ip = data_of["ip"].clone();

    // One insert larger than gRPC's 4 MiB default message size (the router forwards it to the
    // writer as one message).
    ok_http(
        &http,
        &base,
        "collections/create",
        json!({"collectionName": "wide", "dimension": 1024, "metricType": "L2"}),
    )
    .await;
    let wide: Vec<Value> = vectors(1100, 1024, 5)
        .into_iter()
        .enumerate()
        .map(|(i, v)| json!({"id": i, "vector": v}))
        .collect();
    let v = ok_http(
        &http,
        &base,
        "entities/insert",
        json!({"collectionName": "wide", "data": wide}),
    )
    .await;
    assert_eq!(v["data"]["insertCount"], 1100, "{v}");
    ok_http(
        &http,
        &base,
        "collections/drop",
        json!({"collectionName": "wide"}),
    )
    .await;

    // describe reports what the readers hold (the sealed rows' vectors at least).
    let v = ok_http(
        &http,
        &base,
        "collections/describe",
        json!({"collectionName": "l2"}),
    )
    .await;
    let mem = v["data"]["memoryBytes"].as_u64().unwrap_or(0);
    assert!(
        mem >= 2000 * DIM as u64 * 4,
        "memoryBytes through the router: {v}"
    );

    // Bad requests: the standalone role's codes.
    ok_http(
        &http,
        &base,
        "collections/create",
        json!({"collectionName": "c", "dimension": 4, "metricType": "L2"}),
    )
    .await;
    let app = common::App::new(None).await;
    app.ok(
        "collections/create",
        json!({"collectionName": "c", "dimension": 4, "metricType": "L2"}),
    )
    .await;
    for (ep, body) in bad_cases() {
        let via_router = post_http(&http, &base, ep, &body).await;
        let (_, standalone) = app.raw(ep, &body, &[]).await;
        assert_eq!(
            via_router["code"], standalone["code"],
            "{ep} {body}: router {via_router} vs standalone {standalone}"
        );
    }

    // Search load while r1 is killed with SIGKILL: every answer stays exact.
    let load = SearchLoad::start(3, {
        let (http, base) = (http.clone(), base.clone());
        let (queries, rows_l2, rows_ip) = (queries.clone(), rows_l2.clone(), rows_ip.clone());
        move |i| {
            let (http, base) = (http.clone(), base.clone());
            let (queries, rows_l2, rows_ip) = (queries.clone(), rows_l2.clone(), rows_ip.clone());
            async move {
                let q = &queries[i % queries.len()];
                let (name, metric, rows) = if i % 2 == 0 {
                    ("l2", Metric::L2, &rows_l2)
                } else {
                    ("ip", Metric::IP, &rows_ip)
                };
                let v = post_http(
                    &http,
                    &base,
                    "entities/search",
                    &json!({"collectionName": name, "data": [q], "limit": 10}).to_string(),
                )
                .await;
                assert_eq!(v["code"], 0, "search during failover: {v}");
                assert_same(&hits_of(&v), &oracle(metric, rows, q, 10, None), "failover");
            }
        }
    });
    load.wait_answers(15).await;
    r1.child.kill().unwrap();
    let _ = r1.child.wait();
    let before = load.answered();
    load.wait_answers(before + 30).await;
    load.stop().await;
    router.wait_live_readers(1, LIVE_WITHIN).await;

    // r3 (in the static list from the start) comes up; then r2 goes too: r3 alone serves every
    // segment, so it did get them.
    let mut r3 = reader_proc("r3", &url, &data, g3);
    r3.ready(Duration::from_secs(60)).await;
    router.wait_live_readers(2, LIVE_WITHIN).await;
    drop(r2);
    router.wait_live_readers(1, LIVE_WITHIN).await;
    for q in &queries {
        let v = ok_http(
            &http,
            &base,
            "entities/search",
            json!({"collectionName": "l2", "data": [q], "limit": 10}),
        )
        .await;
        assert_same(
            &hits_of(&v),
            &oracle(Metric::L2, &rows_l2, q, 10, None),
            "r3 alone",
        );
    }

    // An IVF_FLAT index built by the writer reaches the reader: 3000 rows in two segments
    // (each above the writer's 1024-row index threshold), index created through the router.
    let ann_rows: Vec<(i64, Vec<f32>, i64)> = vectors(3000, DIM, 17)
        .into_iter()
        .enumerate()
        .map(|(i, v)| (i as i64, v, 0))
        .collect();
    ok_http(
        &http,
        &base,
        "collections/create",
        json!({"collectionName": "ann", "dimension": DIM, "metricType": "L2"}),
    )
    .await;
    for chunk in ann_rows.chunks(1500) {
        let batch: Vec<Value> = chunk
            .iter()
            .map(|(id, v, _)| json!({"id": id, "vector": v}))
            .collect();
        insert_flushed(&http, &base, "ann", batch).await;
    }
    ok_http(
        &http,
        &base,
        "indexes/create",
        json!({"collectionName": "ann", "indexParams": [{"fieldName": "vector", "indexName": "vector",
            "metricType": "L2", "indexType": "IVF_FLAT", "params": {"nlist": 16}}]}),
    )
    .await;
    // The router's describe reports the writer's build progress from the catalogue.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = ok_http(
            &http,
            &base,
            "indexes/describe",
            json!({"collectionName": "ann", "indexName": "vector"}),
        )
        .await;
        let d = &v["data"][0];
        assert_eq!(d["totalRows"], 3000, "{v}");
        if d["indexedRows"] == 3000 {
            assert_eq!(d["indexState"], "Finished", "{v}");
            assert_eq!(d["indexedSegments"], 2, "{v}");
            assert!(d["indexBytes"].as_u64().unwrap() > 0, "{v}");
            break;
        }
        assert_eq!(d["indexState"], "InProgress", "{v}");
        assert!(Instant::now() < deadline, "the index was never built: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The reader maps both committed index files (its poll interval is 200 ms).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = r3.metrics().await;
        if m.contains("shoal_reader_indexed_segments{collection=\"ann\"} 2\n") {
            let bytes = m
                .lines()
                .find_map(|l| l.strip_prefix("shoal_reader_index_bytes{collection=\"ann\"} "))
                .and_then(|b| b.parse::<u64>().ok());
            assert!(bytes.is_some_and(|b| b > 0), "{m}");
            assert!(
                m.contains("shoal_reader_index_load_failures_total{collection=\"ann\"} 0\n"),
                "{m}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reader never served the index:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Through router and reader: probing all 16 lists is exact; probing a few keeps recall
    // above a floor; probing one misses neighbours FLAT would find (the answer came through
    // the IVF index).
    let ann_queries = vectors(20, DIM, 19);
    let mut found = [0usize; 3];
    for q in &ann_queries {
        let want = oracle(Metric::L2, &ann_rows, q, 10, None);
        for (i, nprobe) in [16, 6, 1].into_iter().enumerate() {
            let v = ok_http(
                &http,
                &base,
                "entities/search",
                json!({"collectionName": "ann", "data": [q], "limit": 10,
                    "searchParams": {"params": {"nprobe": nprobe}}}),
            )
            .await;
            let got = hits_of(&v);
            if nprobe == 16 {
                assert_same(&got, &want, "IVF_FLAT nprobe=nlist");
            }
            found[i] += got
                .iter()
                .filter(|h| want.iter().any(|w| w.0 == h.0))
                .count();
        }
    }
    let total = 10 * ann_queries.len();
    let recall = |n: usize| n as f64 / total as f64;
    eprintln!(
        "IVF_FLAT through router+reader: recall@10 nprobe=6 {:.3}, nprobe=1 {:.3}",
        recall(found[1]),
        recall(found[2])
    );
    assert!(
        recall(found[1]) >= 0.8,
        "nprobe=6 recall {}",
        recall(found[1])
    );
    assert!(found[2] < total, "nprobe=1 found every exact neighbour");
    let v = post_http(
        &http,
        &base,
        "entities/search",
        &json!({"collectionName": "ann", "data": [ann_queries[0]], "limit": 10,
            "searchParams": {"params": {"nprobe": 17}}})
        .to_string(),
    )
    .await;
    assert_eq!(v["code"], 1100, "nprobe beyond nlist: {v}");

    // Stop the processes before MariaDB (drop order: router, readers, writer, then db).
    drop(router);
    drop(r3);
    drop(r1);
    drop(w);
    drop(db);
}

// ------------------------------------------------------------------ outages under load

fn writer_proc(url: &str, data: &std::path::Path, grpc: u16, rest: u16) -> Engine {
    Engine::spawn(
        "writer",
        "writer",
        &[
            "--meta".into(),
            url.into(),
            "--data-dir".into(),
            data.display().to_string(),
            "--grpc-listen".into(),
            format!("127.0.0.1:{grpc}"),
            "--listen".into(),
            format!("127.0.0.1:{rest}"),
            "--node-id".into(),
            "writer".into(),
            "--flush-interval".into(),
            "300ms".into(),
            // Short, so an outage of a few seconds outlives it (the keeper's hardest case).
            "--lease-ttl".into(),
            "2s".into(),
        ],
    )
}

fn router_proc(url: &str, writer_grpc: u16, readers: &[u16], rest: u16) -> Engine {
    let list = readers
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    router_proc_with(url, writer_grpc, ["--readers".into(), list], rest)
}

/// As [`router_proc`], finding its readers with `discovery` (`--readers LIST`,
/// `--readers-file PATH`, ...).
fn router_proc_with(url: &str, writer_grpc: u16, discovery: [String; 2], rest: u16) -> Engine {
    let [how, what] = discovery;
    Engine::spawn(
        "router",
        "router",
        &[
            "--meta".into(),
            url.into(),
            "--writer".into(),
            format!("127.0.0.1:{writer_grpc}"),
            how,
            what,
            "--listen".into(),
            format!("127.0.0.1:{rest}"),
            "--request-timeout".into(),
            "3s".into(),
            "--catalog-poll".into(),
            "300ms".into(),
            "--health-interval".into(),
            "200ms".into(),
        ],
    )
}

/// Rows per write of the streams below (small: the final check reads every row back in one
/// query of at most 16,384).
const ROWS_PER_WRITE: i64 = 4;

/// What a stream of writes through the router saw.
#[derive(Default)]
struct StreamLog {
    /// Ids of every acknowledged row.
    acked: Vec<i64>,
    /// `(code, message)` of every refused write.
    errors: Vec<(i64, String)>,
    /// Acknowledged writes since the counter was last reset.
    acked_since_mark: usize,
    /// Successful searches since the counter was last reset.
    searched_since_mark: usize,
}

/// Insert `rows_per_batch` rows with fresh ids per request (`upsert` picks the endpoint) and
/// search once per request, until `stop`; every outcome goes into `log`.
fn spawn_stream(
    base: String,
    collection: &'static str,
    upsert: bool,
    first_id: i64,
    log: Arc<parking_lot::Mutex<StreamLog>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let rows_per_batch = ROWS_PER_WRITE;
        let mut next = first_id;
        while !stop.load(Ordering::SeqCst) {
            let ids: Vec<i64> = (next..next + rows_per_batch).collect();
            next += rows_per_batch;
            let data: Vec<Value> = ids
                .iter()
                .map(|id| json!({"id": id, "vector": vectors(1, DIM, *id as u64)[0]}))
                .collect();
            let ep = if upsert {
                "entities/upsert"
            } else {
                "entities/insert"
            };
            let body = json!({"collectionName": collection, "data": data}).to_string();
            let v = match http
                .post(format!("{base}/v2/vectordb/{ep}"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
            {
                Ok(r) => r.json::<Value>().await.unwrap_or(Value::Null),
                Err(e) => panic!("the router itself failed a request: {e}"),
            };
            {
                let mut l = log.lock();
                if v["code"] == 0 {
                    l.acked.extend(&ids);
                    l.acked_since_mark += 1;
                } else {
                    let code = v["code"].as_i64().unwrap_or(-1);
                    let msg = v["message"].as_str().unwrap_or("").to_string();
                    l.errors.push((code, msg));
                }
            }
            let q = vectors(1, DIM, ids[0] as u64)[0].clone();
            let s = post_http(
                &http,
                &base,
                "entities/search",
                &json!({"collectionName": collection, "data": [q], "limit": 3}).to_string(),
            )
            .await;
            if s["code"] == 0 {
                log.lock().searched_since_mark += 1;
            }
        }
    })
}

/// A writer, one reader and a router as processes on MariaDB `url` and data dir `data`, with an
/// L2 collection `collection` of `DIM` created through the router.
struct OneReaderStack {
    w: Engine,
    r1: Engine,
    router: Engine,
    /// The router's REST base URL.
    base: String,
    /// The writer's gRPC and REST ports (to restart it on the same addresses).
    wg: u16,
    wrest: u16,
}

async fn one_reader_stack(url: &str, data: &std::path::Path, collection: &str) -> OneReaderStack {
    let (wg, wrest, g1, rest) = (port(), port(), port(), port());
    let mut w = writer_proc(url, data, wg, wrest);
    w.ready(Duration::from_secs(60)).await;
    let mut r1 = reader_proc("r1", url, data, g1);
    r1.ready(Duration::from_secs(60)).await;
    let mut router = router_proc(url, wg, &[g1], rest);
    router.ready(Duration::from_secs(60)).await;
    router.wait_live_readers(1, LIVE_WITHIN).await;
    let base = format!("http://127.0.0.1:{rest}");
    let http = reqwest::Client::new();
    ok_http(
        &http,
        &base,
        "collections/create",
        json!({"collectionName": collection, "dimension": DIM, "metricType": "L2"}),
    )
    .await;
    OneReaderStack {
        w,
        r1,
        router,
        base,
        wg,
        wrest,
    }
}

/// Wait (bounded) until the stream acknowledged `writes` writes and answered `searches`
/// searches since the last mark.
async fn wait_stream(
    log: &parking_lot::Mutex<StreamLog>,
    writes: usize,
    searches: usize,
    within: Duration,
    what: &str,
) {
    let deadline = Instant::now() + within;
    loop {
        {
            let l = log.lock();
            if l.acked_since_mark >= writes && l.searched_since_mark >= searches {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: only {} writes and {} searches succeeded within {within:?}; last errors: {:?}",
                l.acked_since_mark,
                l.searched_since_mark,
                &l.errors[l.errors.len().saturating_sub(3)..]
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn mark(log: &parking_lot::Mutex<StreamLog>) {
    let mut l = log.lock();
    l.acked_since_mark = 0;
    l.searched_since_mark = 0;
}

/// After the stream: flush (retried until the cluster accepts it, bounded) and check that every
/// acknowledged id is stored exactly once and nothing else beyond `maybe` (refused writes whose
/// rows may or may not have landed).
async fn assert_acked_exactly_once(base: &str, collection: &str, acked: &[i64], maybe: usize) {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = post_http(
            &http,
            base,
            "collections/flush",
            &json!({"collectionName": collection}).to_string(),
        )
        .await;
        if v["code"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "flush never succeeded: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let v = ok_http(
        &http,
        base,
        "entities/query",
        json!({"collectionName": collection, "filter": "id >= 0", "outputFields": ["id"], "limit": 16384}),
    )
    .await;
    let mut seen: HashMap<i64, usize> = HashMap::new();
    for r in v["data"].as_array().unwrap() {
        *seen.entry(r["id"].as_i64().unwrap()).or_default() += 1;
    }
    for id in acked {
        assert_eq!(
            seen.get(id).copied().unwrap_or(0),
            1,
            "acknowledged id {id} is not stored exactly once"
        );
    }
    let dupes: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dupes.is_empty(), "ids stored twice: {dupes:?}");
    assert!(
        seen.len() <= acked.len() + maybe,
        "{} rows stored, {} acknowledged, {maybe} unknown",
        seen.len(),
        acked.len()
    );
}

/// "MySQL restarted under load": MariaDB is stopped while inserts and searches stream through
/// the router, stays down longer than the writer's lease TTL, and comes back on the same port
/// and data. Writes may be refused meanwhile (with a clear code, nothing acknowledged is lost);
/// afterwards writes and searches succeed again without restarting any Shoal process, the
/// writer still holds the lease with the same epoch, and every acknowledged id is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_restarted_under_load_recovers_without_restarting_any_shoal_process() {
    let _watchdog = shoal_testkit::watchdog(
        "mariadb_restarted_under_load_recovers_without_restarting_any_shoal_process",
        Duration::from_secs(150),
    );
    let mut db = shoal_testkit::mariadb::MariaDb::start().expect("MariaDB");
    let url = db.url();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let OneReaderStack {
        mut w,
        mut r1,
        mut router,
        base,
        ..
    } = one_reader_stack(&url, &data, "m").await;
    let epoch_before = db
        .root_sql("SELECT epoch FROM shoal.shoal_writer_lease WHERE id = 1")
        .expect("lease row");

    let log = Arc::new(parking_lot::Mutex::new(StreamLog::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let stream = spawn_stream(base.clone(), "m", false, 0, log.clone(), stop.clone());
    wait_stream(&log, 20, 20, Duration::from_secs(30), "before the outage").await;

    // Down for longer than the lease TTL (2 s): the writer's local deadline passes.
    tokio::task::block_in_place(|| db.stop()).expect("stopping MariaDB");
    let down = Instant::now();
    mark(&log);
    while down.elapsed() < Duration::from_secs(4) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::task::block_in_place(|| db.start_again()).expect("starting MariaDB again");
    mark(&log);
    let recovered = Instant::now();
    wait_stream(
        &log,
        20,
        20,
        Duration::from_secs(40),
        "after MariaDB came back",
    )
    .await;
    eprintln!(
        "writes and searches flow again {:?} after MariaDB came back",
        recovered.elapsed()
    );
    stop.store(true, Ordering::SeqCst);
    stream.await.expect("stream task panicked");

    for p in [&mut w, &mut r1, &mut router] {
        assert!(
            p.child.try_wait().unwrap().is_none(),
            "{} exited during the MariaDB outage",
            p.name
        );
    }
    let epoch_after = db
        .root_sql("SELECT epoch FROM shoal.shoal_writer_lease WHERE id = 1")
        .expect("lease row");
    assert_eq!(
        epoch_before, epoch_after,
        "the writer should keep its lease (same epoch) across the outage"
    );
    let (acked, errors) = {
        let l = log.lock();
        (l.acked.clone(), l.errors.clone())
    };
    for (code, msg) in &errors {
        assert_ne!(*code, 0);
        assert!(!msg.is_empty(), "a refused write without a message");
    }
    eprintln!(
        "{} rows acknowledged, {} writes refused during the outage (first: {:?})",
        acked.len(),
        errors.len(),
        errors.first()
    );
    assert_acked_exactly_once(&base, "m", &acked, errors.len() * ROWS_PER_WRITE as usize).await;
    drop(router);
    drop(r1);
    drop(w);
    drop(db);
}

/// Router writer failover: the writer is killed with SIGKILL while inserts and id-carrying
/// upserts stream through the router, and a new writer process comes up on the same address a
/// moment later. Writes sent while no writer listens wait in the router and succeed once the
/// new writer answers; the only write allowed to fail is an insert whose connection broke in
/// flight, and it says that its outcome is unknown; upserts never fail (the router replays
/// them). Every acknowledged id is stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_holds_forwarded_writes_while_the_writer_restarts_after_kill_9() {
    let _watchdog = shoal_testkit::watchdog(
        "the_router_holds_forwarded_writes_while_the_writer_restarts_after_kill_9",
        Duration::from_secs(150),
    );
    let db = shoal_testkit::mariadb::MariaDb::start().expect("MariaDB");
    let url = db.url();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let OneReaderStack {
        mut w,
        r1,
        mut router,
        base,
        wg,
        wrest,
        ..
    } = one_reader_stack(&url, &data, "f").await;

    let inserts = Arc::new(parking_lot::Mutex::new(StreamLog::default()));
    let upserts = Arc::new(parking_lot::Mutex::new(StreamLog::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let s1 = spawn_stream(base.clone(), "f", false, 0, inserts.clone(), stop.clone());
    let s2 = spawn_stream(
        base.clone(),
        "f",
        true,
        1_000_000,
        upserts.clone(),
        stop.clone(),
    );
    wait_stream(
        &inserts,
        20,
        20,
        Duration::from_secs(30),
        "inserts before the kill",
    )
    .await;
    wait_stream(
        &upserts,
        20,
        20,
        Duration::from_secs(30),
        "upserts before the kill",
    )
    .await;

    w.child.kill().unwrap();
    let _ = w.child.wait();
    mark(&inserts);
    mark(&upserts);
    // The stream keeps sending while no writer listens (connection refused at the router).
    let down = Instant::now();
    while down.elapsed() < Duration::from_millis(1500) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Same node id, same address: it takes the lease over at once and replays the WAL.
    let mut w2 = writer_proc(&url, &data, wg, wrest);
    w2.ready(Duration::from_secs(60)).await;
    wait_stream(
        &inserts,
        20,
        20,
        Duration::from_secs(40),
        "inserts after the restart",
    )
    .await;
    wait_stream(
        &upserts,
        20,
        20,
        Duration::from_secs(40),
        "upserts after the restart",
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    s1.await.expect("insert stream panicked");
    s2.await.expect("upsert stream panicked");

    let (ins_acked, ins_errors) = {
        let l = inserts.lock();
        (l.acked.clone(), l.errors.clone())
    };
    let (ups_acked, ups_errors) = {
        let l = upserts.lock();
        (l.acked.clone(), l.errors.clone())
    };
    eprintln!(
        "inserts: {} rows acknowledged, refused: {ins_errors:?}; upserts: {} rows acknowledged",
        ins_acked.len(),
        ups_acked.len()
    );
    assert!(
        ups_errors.is_empty(),
        "an upsert with ids failed across the writer restart: {ups_errors:?}"
    );
    assert!(
        ins_errors.len() <= 2,
        "more inserts failed than were in flight at the kill: {ins_errors:?}"
    );
    for (code, msg) in &ins_errors {
        assert_eq!(*code, 65535, "{msg}");
        assert!(msg.contains("outcome unknown"), "{msg}");
    }
    let mut acked = ins_acked;
    acked.extend(ups_acked);
    assert_acked_exactly_once(
        &base,
        "f",
        &acked,
        ins_errors.len() * ROWS_PER_WRITE as usize,
    )
    .await;
    assert!(
        router.child.try_wait().unwrap().is_none(),
        "the router exited"
    );
    drop(router);
    drop(r1);
    drop(w2);
    drop(db);
}

/// A rolling upgrade of a single reader, as Kubernetes does it: the old reader gets SIGTERM
/// and serves for its shutdown delay, while the router learns of its successor only later
/// (discovery — a file here, DNS in Kubernetes — lags). The router keeps sending work to the
/// draining reader until the successor has answered a probe, then moves to it: not one search
/// fails, and every answer is complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_draining_reader_serves_until_the_router_has_probed_its_successor() {
    let _watchdog = shoal_testkit::watchdog(
        "a_single_draining_reader_serves_until_the_router_has_probed_its_successor",
        Duration::from_secs(150),
    );
    let db = shoal_testkit::mariadb::MariaDb::start().expect("MariaDB");
    let url = db.url();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let readers_file = dir.path().join("readers.txt");
    let (wg, wrest, g1, g2, rest) = (port(), port(), port(), port(), port());
    let mut w = writer_proc(&url, &data, wg, wrest);
    w.ready(Duration::from_secs(60)).await;
    let reader = |name: &'static str, grpc: u16| {
        reader_proc_with(name, &url, &data, grpc, &["--shutdown-delay", "5s"])
    };
    let write_readers = |ports: &[u16]| {
        let tmp = readers_file.with_extension("tmp");
        let text: String = ports.iter().map(|p| format!("127.0.0.1:{p}\n")).collect();
        std::fs::write(&tmp, text).expect("write the readers file");
        std::fs::rename(&tmp, &readers_file).expect("replace the readers file");
    };
    let mut old = reader("old", g1);
    old.ready(Duration::from_secs(60)).await;
    write_readers(&[g1]);
    let readers_arg = ["--readers-file".into(), readers_file.display().to_string()];
    let mut router = router_proc_with(&url, wg, readers_arg, rest);
    router.ready(Duration::from_secs(60)).await;
    router.wait_live_readers(1, LIVE_WITHIN).await;
    let base = format!("http://127.0.0.1:{rest}");
    let http = reqwest::Client::new();
    ok_http(
        &http,
        &base,
        "collections/create",
        json!({"collectionName": "d", "dimension": DIM, "metricType": "L2"}),
    )
    .await;
    let n = 300;
    let rows: Vec<Value> = vectors(n, DIM, 5)
        .into_iter()
        .enumerate()
        .map(|(i, v)| json!({"id": i, "vector": v}))
        .collect();
    insert_flushed(&http, &base, "d", rows).await;

    // Searches in a loop; each must succeed with `limit` hits.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let answered = Arc::new(AtomicUsize::new(0));
    let load = {
        let (base, stop, failures, answered) = (
            base.clone(),
            stop.clone(),
            failures.clone(),
            answered.clone(),
        );
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let q = vectors(1, DIM, 1_000 + i)[0].clone();
                i += 1;
                let body = json!({"collectionName": "d", "data": [q], "limit": 5});
                let v = post_http(&http, &base, "entities/search", &body.to_string()).await;
                let hits = v["data"].as_array().map_or(0, Vec::len);
                if v["code"] == 0 && hits == 5 {
                    answered.fetch_add(1, Ordering::SeqCst);
                } else {
                    failures.lock().push(v.to_string());
                }
            }
        })
    };
    let wait_answers = |more: usize, what: &'static str| {
        let answered = answered.clone();
        async move {
            let want = answered.load(Ordering::SeqCst) + more;
            let deadline = Instant::now() + Duration::from_secs(30);
            while answered.load(Ordering::SeqCst) < want {
                assert!(
                    Instant::now() < deadline,
                    "no {more} answered searches {what}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_answers(20, "before the upgrade").await;

    // The successor starts and becomes ready; the old reader gets SIGTERM; discovery still
    // lists only the old one for longer than the router needs to count three failed probes.
    let mut new = reader("new", g2);
    new.ready(Duration::from_secs(60)).await;
    common::engine::sigterm(&old);
    let sigterm = Instant::now();
    while sigterm.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_answers(5, "from the draining reader").await;
    write_readers(&[g2]);
    router.wait_live_readers(1, LIVE_WITHIN).await;
    let status = tokio::task::block_in_place(|| old.exit_status(Duration::from_secs(30)));
    assert!(status.success(), "the old reader: {status}");
    wait_answers(20, "after the old reader exited").await;
    stop.store(true, Ordering::SeqCst);
    load.await.expect("search load task");
    let failures = failures.lock().clone();
    assert!(
        failures.is_empty(),
        "{} of {} searches failed during the single-reader replacement; first: {}",
        failures.len(),
        failures.len() + answered.load(Ordering::SeqCst),
        failures[0]
    );
    drop(router);
    drop(new);
    drop(w);
    drop(db);
}

/// pymilvus's quick setup names the metric in its index, and Shoal re-creates an empty
/// collection to adopt it. Through a router the row count covers flushed rows only, so rows
/// acknowledged a moment before a CreateIndex naming another metric must still count: the
/// request is refused (1100) and every acknowledged row stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_milvus_create_index_with_another_metric_never_drops_acknowledged_unflushed_rows() {
    use shoal_engine::api::milvus::pb::common::KeyValuePair;
    use shoal_engine::api::milvus::pb::milvus::CreateIndexRequest;
    use shoal_engine::api::milvus::pb::milvus::milvus_service_client::MilvusServiceClient;
    let _watchdog = shoal_testkit::watchdog(
        "a_milvus_create_index_with_another_metric_never_drops_acknowledged_unflushed_rows",
        Duration::from_secs(120),
    );
    let db = shoal_testkit::mariadb::MariaDb::start().expect("MariaDB");
    let url = db.url();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let stack = one_reader_stack(&url, &data, "q").await;
    let base = stack.base.clone();
    let http = reqwest::Client::new();
    let rows: Vec<Value> = vectors(50, DIM, 3)
        .into_iter()
        .enumerate()
        .map(|(i, v)| json!({"id": i, "vector": v}))
        .collect();
    ok_http(
        &http,
        &base,
        "entities/insert",
        json!({"collectionName": "q", "data": rows}),
    )
    .await;
    let channel = tonic::transport::Channel::from_shared(base.clone())
        .unwrap()
        .connect()
        .await
        .expect("gRPC on the router's port");
    let mut grpc = MilvusServiceClient::new(channel);
    let kv = |k: &str, v: &str| KeyValuePair {
        key: k.into(),
        value: v.into(),
    };
    let st = grpc
        .create_index(CreateIndexRequest {
            collection_name: "q".into(),
            field_name: "vector".into(),
            extra_params: vec![kv("index_type", "FLAT"), kv("metric_type", "IP")],
            ..Default::default()
        })
        .await
        .expect("CreateIndex answers")
        .into_inner();
    assert_eq!(
        st.code, 1100,
        "another metric over rows must be refused: {st:?}"
    );
    ok_http(
        &http,
        &base,
        "collections/flush",
        json!({"collectionName": "q"}),
    )
    .await;
    let v = ok_http(
        &http,
        &base,
        "entities/query",
        json!({"collectionName": "q", "filter": "id >= 0", "outputFields": ["count(*)"]}),
    )
    .await;
    assert_eq!(
        v["data"][0]["count(*)"], 50,
        "acknowledged rows were dropped: {v}"
    );
}
