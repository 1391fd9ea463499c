//! The router's [`Backend`]: the public REST API served by forwarding writes to the writer and
//! fanning reads out to the readers.
//!
//! Owns:
//! - the **cached catalogue** ([`Catalog`]: collections, their sealed segments and indexes, and
//!   the catalogue version it reflects), refreshed on a poll (a newer version is pushed to the
//!   readers first, so they load new segments before a search names them), after every write this router
//!   forwards (to at least the version the writer returned), and on demand when a request names
//!   a collection the cache does not know; a search never scans the metadata store;
//! - **writes**: collection and index DDL, load/release, insert/upsert, delete and flush are
//!   forwarded to the writer's gRPC service; `flush` returns once every live reader serves the
//!   flushed catalogue version ([`super::fanout::wait_readers_caught_up`]); readers that
//!   lag are marked failed so they get no traffic until their next health check passes;
//!   while the writer cannot be reached (restarted, or replaced behind the same name) a
//!   forwarded write is retried with backoff for up to `writer_failover`; a write whose
//!   connection broke with the request in flight is retried only when replaying it cannot
//!   change the result (upsert with ids, flush, load/release), otherwise the client gets an
//!   "outcome unknown" error ([`forward_failure`]);
//! - **reads**: search through [`super::fanout::search`] (rendezvous plan with the replication
//!   factor, parallel calls, failover to the next reader in hash order, global top-k merge),
//!   and get/query/count through the same plan with the same failover ([`Self::fan_rows`]),
//!   merged by id with offset/limit applied after the merge;
//! - **membership**: the reader set from discovery (static list or headless-Service DNS) and
//!   gRPC `Health` probes ([`super::membership`]), plus failures seen by requests.
//!
//! The REST layer validates every request before it gets here, so the router and the
//! standalone role answer the same bad request with the same code. gRPC statuses from the
//! writer and readers map to Milvus codes in one place ([`status_to_api`]).

use super::fanout::wait_readers_caught_up;
use super::fanout::{self, FanoutError, ReaderClients, ShardSearch, is_retryable};
use super::hrw::{self, SegmentId};
use super::membership::{self, Discovery, HealthPolicy, Membership, ReaderState};
use crate::api::backend::{
    Backend, CollectionDetails, CollectionMeta, FilterExpr, IndexProgress, QueryRequest,
    ReadFields, SearchRequest, WriteRows,
};
use crate::api::error::{ApiError, code};
use crate::api::metrics::Metrics;
use crate::core::error_chain as chain;
use crate::core::merge;
use crate::core::meta::{IndexRecord, MetaStore, SegmentRecord};
use crate::core::storage::collection::{Hit, RowOut, Schema};
use crate::core::types::Metric;
use crate::rpc::pb::writer_client::WriterClient;
use crate::rpc::pb::{
    CreateCollectionRequest, CreateIndexRequest, DeleteRequest, DropCollectionRequest,
    DropIndexRequest, FlushRequest, GetRowsRequest, HealthRequest, InsertRequest,
    QueryShardRequest, ResultRow, Row, RowsResponse, SearchParams as PbSearchParams,
    SearchShardRequest, SetLoadedRequest,
};
use crate::rpc::status::{ForwardFailure, forward_failure, internal, status_to_api};
use parking_lot::{Mutex, RwLock};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

/// How the router reaches and treats the cluster.
#[derive(Debug, Clone)]
pub struct RouterOptions {
    /// `host:port` of the writer's gRPC service.
    pub writer: String,
    pub discovery: Discovery,
    /// Readers that hold each segment (rendezvous owners).
    pub replication: usize,
    /// Deadline of one gRPC call to a reader or the writer.
    pub request_timeout: Duration,
    /// How long `collections/flush` waits for the readers to serve the flushed version.
    pub flush_timeout: Duration,
    /// Catalogue poll interval (the fallback when no write went through this router).
    pub catalog_poll: Duration,
    /// Reader discovery + health probe interval.
    pub health_interval: Duration,
    pub connect_timeout: Duration,
    /// How long a forwarded write keeps retrying while the writer cannot be reached.
    pub writer_failover: Duration,
}

/// One collection as the cache holds it.
#[derive(Debug, Clone)]
pub struct CachedCollection {
    pub meta: CollectionMeta,
    pub segments: Vec<SegmentRecord>,
    pub indexes: Vec<IndexRecord>,
}

/// The router's cached catalogue.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// Every commit up to this version is reflected.
    pub version: u64,
    pub collections: BTreeMap<String, CachedCollection>,
}

/// The cluster-facing backend of the router role.
pub struct RouterBackend {
    meta: MetaStore,
    writer: WriterClient<Channel>,
    readers: ReaderClients,
    membership: Arc<Mutex<Membership>>,
    catalog: RwLock<Arc<Catalog>>,
    refresh_lock: tokio::sync::Mutex<Instant>,
    spread: AtomicU64,
    opts: RouterOptions,
}

impl std::fmt::Debug for RouterBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterBackend")
            .field("writer", &self.opts.writer)
            .field("discovery", &self.opts.discovery)
            .finish()
    }
}

/// Why the router could not start.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("invalid writer address {addr:?}")]
    WriterAddress {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
}

fn fanout_to_api(e: FanoutError) -> ApiError {
    match e {
        FanoutError::Rejected { addr, status } => status_to_api(&format!("reader {addr}"), &status),
        FanoutError::ReaderAddress { .. }
        | FanoutError::NoReaderLeft { .. }
        | FanoutError::Malformed { .. } => internal(chain(&e)),
    }
}

/// The `output_fields` a reader is asked for.
fn output_fields(s: &Schema, f: &ReadFields) -> Vec<String> {
    let mut out = Vec::new();
    if f.all_dynamic {
        out.push("*".to_string());
    }
    if f.vector {
        out.push(s.vector_field.clone());
    }
    out.extend(f.names.iter().cloned());
    out
}

/// Split a reader's JSON fields into the vector (when asked) and the dynamic fields.
fn row_out(s: &Schema, f: &ReadFields, id: i64, fields_json: &[u8]) -> RowOut {
    let mut fields = match serde_json::from_slice::<Value>(fields_json) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    let vector = fields.remove(&s.vector_field).and_then(|v| match v {
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_f64().map(|f| f as f32))
            .collect::<Option<Vec<f32>>>(),
        _ => None,
    });
    fields.remove(&s.pk_field);
    RowOut {
        id,
        vector: if f.vector { vector } else { None },
        fields,
    }
}

/// What the readers hold for one copy of the collection's sealed segments, from the cached
/// catalogue (no reader call): per row the vector, the id and the field offset, as a loaded
/// segment maps them. Dynamic fields are not in the catalogue and not counted.
fn catalog_memory_bytes(c: &CachedCollection) -> usize {
    let per_row = c.meta.schema.dim * 4 + 16;
    c.segments
        .iter()
        .map(|s| usize::try_from(s.rows).unwrap_or(0) * per_row)
        .sum()
}

fn segment_ids(c: &CachedCollection) -> Vec<SegmentId> {
    c.segments.iter().map(|s| s.id.max(0) as u64).collect()
}

impl RouterBackend {
    /// Build the backend; nothing is contacted yet (clients connect lazily). Call
    /// [`Self::refresh`] and [`Self::spawn_loops`] before serving.
    pub fn new(meta: MetaStore, opts: RouterOptions) -> Result<Self, RouterError> {
        let ep = Endpoint::from_shared(format!("http://{}", opts.writer))
            .map_err(|source| RouterError::WriterAddress {
                addr: opts.writer.clone(),
                source,
            })?
            .connect_timeout(opts.connect_timeout)
            .tcp_nodelay(true);
        let writer = WriterClient::new(ep.connect_lazy())
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20);
        Ok(Self {
            meta,
            writer,
            readers: ReaderClients::new(opts.connect_timeout),
            membership: Arc::new(Mutex::new(Membership::new(HealthPolicy::default()))),
            catalog: RwLock::new(Arc::new(Catalog::default())),
            refresh_lock: tokio::sync::Mutex::new(Instant::now()),
            spread: AtomicU64::new(0),
            opts,
        })
    }

    /// The catalogue as cached now.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.read().clone()
    }

    /// Readers that get traffic now.
    pub fn routable_readers(&self) -> Vec<String> {
        self.membership.lock().routable()
    }

    /// Ask the writer for its catalogue version.
    async fn writer_version(&self) -> Result<u64, tonic::Status> {
        let mut req = tonic::Request::new(HealthRequest {});
        req.set_timeout(self.opts.request_timeout);
        let mut c = self.writer.clone();
        let r = tokio::time::timeout(self.opts.request_timeout, c.health(req))
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("writer health check timed out"))??;
        Ok(r.into_inner().catalog_version)
    }

    /// Re-read the catalogue from the metadata store (one snapshot transaction). `at_least`: the
    /// version the caller knows was committed (from a forwarded write); nothing is read when the
    /// cache already reflects it.
    pub async fn refresh(&self, at_least: u64) -> Result<Arc<Catalog>, ApiError> {
        let mut last = self.refresh_lock.lock().await;
        let cur = self.catalog();
        if at_least > 0 && cur.version >= at_least {
            return Ok(cur);
        }
        // One read transaction: the collections and segments as of exactly `snap.version`.
        let snap = self.meta.catalog_snapshot().await?;
        let mut collections = BTreeMap::new();
        for rec in snap.collections {
            let metric = rec
                .metric
                .parse::<Metric>()
                .map_err(|e| internal(format!("collection {:?}: {e}", rec.name)))?;
            let schema = Schema {
                name: rec.name.clone(),
                dim: rec.dim.max(0) as usize,
                metric,
                auto_id: rec.auto_id,
                pk_field: rec.pk_field.clone(),
                vector_field: rec.vector_field.clone(),
                dynamic: rec.dynamic,
            };
            let segments = snap.segments.get(&rec.id).cloned().unwrap_or_default();
            // Index definitions change rarely and are not part of the snapshot transaction;
            // an index committed after the snapshot shows at the next refresh.
            let indexes = self.meta.indexes(rec.id).await?;
            collections.insert(
                rec.name.clone(),
                CachedCollection {
                    meta: CollectionMeta {
                        schema,
                        id: rec.id,
                        loaded: rec.loaded,
                    },
                    segments,
                    indexes,
                },
            );
        }
        let version = snap.version;
        let next = Arc::new(Catalog {
            version,
            collections,
        });
        *self.catalog.write() = next.clone();
        *last = Instant::now();
        Ok(next)
    }

    /// The cached collection, refreshing once on a miss (a collection created elsewhere), at
    /// most every 200 ms so a stream of requests for an unknown name cannot hammer the store.
    async fn cached(&self, name: &str) -> Result<CachedCollection, ApiError> {
        if let Some(c) = self.catalog().collections.get(name) {
            return Ok(c.clone());
        }
        let recent = self.refresh_lock.lock().await.elapsed() < Duration::from_millis(200);
        let cat = if recent {
            self.catalog()
        } else {
            self.refresh(0).await?
        };
        cat.collections.get(name).cloned().ok_or_else(|| {
            ApiError::new(
                code::COLLECTION_NOT_FOUND,
                format!("collection not found: {name}"),
            )
        })
    }

    /// The routable readers, or an error when there are none.
    fn readers_or_err(&self) -> Result<Vec<String>, ApiError> {
        let r = self.routable_readers();
        if r.is_empty() {
            Err(internal("no reader is available to serve the request"))
        } else {
            Ok(r)
        }
    }

    fn note_failures(&self, failed: &[String]) {
        let mut m = self.membership.lock();
        for a in failed {
            m.record_failure(a);
        }
    }

    /// Start the catalogue poll and the membership loop; abort the handles to stop them.
    pub fn spawn_loops(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        let me = Arc::downgrade(self);
        let poll = self.opts.catalog_poll;
        let catalog = tokio::spawn(async move {
            let mut tick = tokio::time::interval(poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(b) = me.upgrade() else { return };
                b.readers_load_before_publish().await;
                if let Err(e) = b.refresh(0).await {
                    tracing::warn!(error = %e.message, "catalogue refresh failed; keeping the cached one");
                }
            }
        });
        let me = Arc::downgrade(self);
        let membership = self.membership.clone();
        let discovery = self.opts.discovery.clone();
        let interval = self.opts.health_interval;
        let timeout = self.opts.request_timeout.min(Duration::from_secs(2));
        let health = tokio::spawn(async move {
            let probe = move |addr: String| {
                let me = me.clone();
                async move {
                    let Some(b) = me.upgrade() else {
                        return membership::Probe::Failed;
                    };
                    b.probe_reader(&addr, timeout).await
                }
            };
            membership::run_membership_loop(membership, discovery, interval, probe).await;
        });
        vec![catalog, health]
    }

    /// Before the poll publishes a newer catalogue version, push it to the routable readers and
    /// wait (bounded, 2 s at most) until they serve it: otherwise the first search that names a
    /// new segment makes its reader catch up inside that request (open and check the segment on
    /// its mount), which the headline benchmark measured as a 0.3-0.7 s first query. A reader
    /// that does not confirm in time is not marked failed; it still catches up on demand.
    async fn readers_load_before_publish(&self) {
        let Ok(v) = self.meta.catalog_version().await else {
            return; // the refresh that follows reports the store error
        };
        if v <= self.catalog().version {
            return;
        }
        let readers = self.routable_readers();
        let timeout = self.opts.request_timeout.min(Duration::from_secs(2));
        let slow = wait_readers_caught_up(&self.readers, &readers, v, timeout).await;
        if !slow.is_empty() {
            tracing::debug!(
                ?slow,
                version = v,
                "readers had not loaded the new catalogue version before it was published"
            );
        }
    }

    /// One membership round now (discovery + health probes); used at start-up.
    pub async fn refresh_membership(&self) {
        let timeout = self.opts.request_timeout.min(Duration::from_secs(2));
        let probe = |addr: String| async move { self.probe_reader(&addr, timeout).await };
        membership::refresh(&self.membership, &self.opts.discovery, &probe).await;
        let known = self.membership.lock().known();
        self.readers.retain(&known);
    }

    async fn probe_reader(&self, addr: &str, timeout: Duration) -> membership::Probe {
        let Ok(mut c) = self.readers.get(addr) else {
            return membership::Probe::Failed;
        };
        let mut req = tonic::Request::new(HealthRequest {});
        req.set_timeout(timeout);
        // Any answer counts as alive: `ready` is false on a fresh cluster whose catalogue
        // version is still 0, and requests carry `min_catalog_version`, so a reader that is
        // behind catches up (or fails over) per request anyway. A draining reader still serves
        // until its shutdown delay ends.
        match tokio::time::timeout(timeout, c.health(req)).await {
            Ok(Ok(r)) if r.get_ref().draining => membership::Probe::Draining,
            Ok(Ok(_)) => membership::Probe::Serving,
            Ok(Err(_)) | Err(_) => membership::Probe::Failed,
        }
    }

    /// Run a rows call (`GetRows` / `QueryShard`) over every segment of `c`: plan onto the
    /// routable readers, call in parallel, re-send a failed reader's segments to the next
    /// reader in hash order. Returns every reader's answer.
    async fn fan_rows<F, Fut>(
        &self,
        segments: &[SegmentId],
        call: F,
    ) -> Result<Vec<RowsResponse>, ApiError>
    where
        F: Fn(crate::rpc::pb::reader_client::ReaderClient<Channel>, Vec<SegmentId>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<RowsResponse>, tonic::Status>>,
    {
        if segments.is_empty() {
            return Ok(Vec::new());
        }
        let readers = self.readers_or_err()?;
        let spread = self.spread.fetch_add(1, Ordering::Relaxed);
        let mut plan = hrw::plan(segments, &readers, self.opts.replication, spread)
            .map_err(|e| internal(chain(&e)))?;
        let mut excluded = BTreeSet::new();
        let mut out = Vec::new();
        let mut failed_readers = Vec::new();
        let timeout = self.opts.request_timeout;
        while !plan.is_empty() {
            let calls = plan.per_reader.into_iter().map(|(idx, segs)| {
                let addr = readers[idx].clone();
                let client = self.readers.get(&addr);
                let fut = client.map(|c| call(c, segs.clone()));
                async move {
                    let r = match fut {
                        Err(e) => Err(Err(e)),
                        Ok(f) => match tokio::time::timeout(timeout, f).await {
                            Err(_) => Err(Ok(tonic::Status::deadline_exceeded("timed out"))),
                            Ok(r) => r.map_err(Ok),
                        },
                    };
                    (idx, addr, segs, r)
                }
            });
            let mut failed_segments = Vec::new();
            for (idx, addr, segs, r) in futures::future::join_all(calls).await {
                match r {
                    Ok(resp) => out.push(resp.into_inner()),
                    Err(Ok(status)) if is_retryable(status.code()) => {
                        tracing::warn!(reader = %addr, error = %status, "reader failed; re-sending its segments");
                        excluded.insert(idx);
                        failed_readers.push(addr);
                        failed_segments.extend(segs);
                    }
                    Err(Ok(status)) => {
                        self.note_failures(&failed_readers);
                        return Err(status_to_api(&format!("reader {addr}"), &status));
                    }
                    Err(Err(e)) => return Err(fanout_to_api(e)),
                }
            }
            plan = match hrw::replan(&failed_segments, &readers, &excluded) {
                Ok(p) => p,
                Err(e) => {
                    self.note_failures(&failed_readers);
                    return Err(internal(format!("no reader could serve the request: {e}")));
                }
            };
        }
        self.note_failures(&failed_readers);
        Ok(out)
    }

    /// `fan_rows` that re-reads the catalogue and retries once when a reader did not know a
    /// planned segment (it was compacted away since the cache was read).
    async fn rows_with_retry<F, Fut>(
        &self,
        name: &str,
        call: F,
    ) -> Result<(CachedCollection, Vec<RowsResponse>), ApiError>
    where
        F: Fn(crate::rpc::pb::reader_client::ReaderClient<Channel>, Vec<SegmentId>, u64) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<RowsResponse>, tonic::Status>>,
    {
        let mut attempt = 0;
        loop {
            let version = self.catalog().version;
            let c = self.cached(name).await?;
            let segs = segment_ids(&c);
            let parts = self
                .fan_rows(&segs, |client, s| call(client, s, version))
                .await?;
            if attempt == 0 && parts.iter().any(|p| !p.unknown_segments.is_empty()) {
                attempt += 1;
                self.refresh(0).await?;
                continue;
            }
            return Ok((c, parts));
        }
    }

    async fn after_write(&self, version: u64) -> Result<(), ApiError> {
        self.refresh(version.max(1)).await.map(|_| ())
    }

    fn writer_call<T>(&self, t: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(t);
        r.set_timeout(self.opts.request_timeout);
        r
    }

    /// Send one write to the writer, retrying (bounded by `writer_failover`, with backoff) while
    /// the writer cannot be reached, and after a broken in-flight call only when `replay` is
    /// safe.
    ///
    /// Errors: the writer's own answer mapped by [`status_to_api`]; an "outcome unknown" error
    /// (code 65535) when the connection broke mid-request and the write is not safe to replay;
    /// a "writer unreachable" error once `writer_failover` has passed.
    async fn forward<T, R, F, Fut>(
        &self,
        what: &'static str,
        replay: Replay,
        timeout: Duration,
        msg: T,
        call: F,
    ) -> Result<R, ApiError>
    where
        T: Clone,
        F: Fn(WriterClient<Channel>, tonic::Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(20);
        loop {
            let mut req = tonic::Request::new(msg.clone());
            req.set_timeout(timeout);
            let s = match call(self.writer.clone(), req).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) => s,
            };
            match (forward_failure(&s), replay) {
                (ForwardFailure::Answered, _) => return Err(writer_err(s)),
                (ForwardFailure::Unknown, Replay::Unsafe) => {
                    return Err(ApiError::new(
                        code::INTERNAL,
                        format!(
                            "outcome unknown: the connection to the writer {} broke while the {what} \
                             was in flight ({}); it may or may not have been applied. Check before \
                             sending it again, or use upsert with explicit ids, which is safe to repeat",
                            self.opts.writer,
                            s.message()
                        ),
                    ));
                }
                (ForwardFailure::NotSent | ForwardFailure::Unknown, _) => {}
            }
            if started.elapsed() + backoff > self.opts.writer_failover {
                return Err(ApiError::new(
                    code::INTERNAL,
                    format!(
                        "writer {} unreachable for {:?}; the {what} was not applied: {}",
                        self.opts.writer,
                        started.elapsed(),
                        s.message()
                    ),
                ));
            }
            tracing::warn!(writer = %self.opts.writer, what, error = %s.message(), ?backoff, "writer unreachable; retrying the forwarded write");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }
}

fn writer_err(s: tonic::Status) -> ApiError {
    status_to_api("writer", &s)
}

/// Whether sending a write twice leaves the same state and answer as sending it once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replay {
    Safe,
    Unsafe,
}

fn loaded(c: &CollectionMeta) -> Result<(), ApiError> {
    if c.loaded {
        Ok(())
    } else {
        Err(ApiError::new(
            code::COLLECTION_NOT_LOADED,
            format!(
                "collection {:?} is not loaded; call collections/load",
                c.schema.name
            ),
        ))
    }
}

impl Backend for RouterBackend {
    async fn collection(&self, name: &str) -> Result<CollectionMeta, ApiError> {
        Ok(self.cached(name).await?.meta)
    }

    async fn create_collection(&self, s: Schema) -> Result<(), ApiError> {
        let msg = CreateCollectionRequest {
            collection: s.name.clone(),
            dimension: u32::try_from(s.dim).unwrap_or(u32::MAX),
            metric_type: s.metric.as_str().into(),
            auto_id: s.auto_id,
            primary_field_name: s.pk_field.clone(),
            vector_field_name: s.vector_field.clone(),
            enable_dynamic_field: s.dynamic,
        };
        let v = self
            .forward(
                "collection create",
                Replay::Unsafe,
                self.opts.request_timeout,
                msg,
                |mut w, r| async move { w.create_collection(r).await },
            )
            .await?
            .catalog_version;
        self.after_write(v).await
    }

    async fn describe_collection(&self, c: &CollectionMeta) -> Result<CollectionDetails, ApiError> {
        let cc = self.cached(&c.schema.name).await?;
        let memory_bytes = catalog_memory_bytes(&cc);
        Ok(CollectionDetails {
            indexes: cc.indexes,
            index_bytes: Default::default(),
            memory_bytes,
            corrupt_segments: Vec::new(),
        })
    }

    async fn list_collections(&self) -> Result<Vec<String>, ApiError> {
        Ok(self.catalog().collections.keys().cloned().collect())
    }

    async fn drop_collection(&self, c: &CollectionMeta) -> Result<(), ApiError> {
        let msg = DropCollectionRequest {
            collection: c.schema.name.clone(),
        };
        let v = self
            .forward(
                "collection drop",
                Replay::Unsafe,
                self.opts.request_timeout,
                msg,
                |mut w, r| async move { w.drop_collection(r).await },
            )
            .await?
            .catalog_version;
        self.after_write(v).await
    }

    async fn row_count(&self, c: &CollectionMeta) -> Result<u64, ApiError> {
        if c.loaded {
            return self.count_rows(c, None).await;
        }
        // Released: readers do not serve it; the committed row counts (deletes not subtracted).
        let cc = self.cached(&c.schema.name).await?;
        Ok(cc.segments.iter().map(|s| s.rows.max(0) as u64).sum())
    }

    async fn set_loaded(&self, c: &CollectionMeta, loaded: bool) -> Result<(), ApiError> {
        let msg = SetLoadedRequest {
            collection: c.schema.name.clone(),
            loaded,
        };
        let v = self
            .forward(
                "load/release",
                Replay::Safe,
                self.opts.request_timeout,
                msg,
                |mut w, r| async move { w.set_loaded(r).await },
            )
            .await?
            .catalog_version;
        self.after_write(v).await
    }

    async fn flush(&self, c: &CollectionMeta) -> Result<(), ApiError> {
        let msg = FlushRequest {
            collection: c.schema.name.clone(),
        };
        let v = self
            .forward(
                "flush",
                Replay::Safe,
                self.opts.flush_timeout,
                msg,
                |mut w, r| async move { w.flush(r).await },
            )
            .await?
            .catalog_version;
        self.after_write(v).await?;
        let readers = self.routable_readers();
        let laggards =
            wait_readers_caught_up(&self.readers, &readers, v, self.opts.flush_timeout).await;
        if !laggards.is_empty() {
            tracing::warn!(
                ?laggards,
                version = v,
                "readers did not reach the flushed catalogue version; marking them failed"
            );
            self.note_failures(&laggards);
        }
        Ok(())
    }

    async fn write(&self, c: &CollectionMeta, rows: WriteRows) -> Result<Vec<i64>, ApiError> {
        let b = rows.batch;
        let dim = b.dim.max(1);
        let auto = b.ids.is_empty();
        let out_rows: Vec<Row> = b
            .vectors
            .chunks_exact(dim)
            .zip(b.fields)
            .enumerate()
            .map(|(i, (v, f))| Row {
                id: if auto { None } else { b.ids.get(i).copied() },
                vector: v.to_vec(),
                dynamic_json: f,
            })
            .collect();
        // An upsert with ids replaces the same rows however often it runs; an insert (or
        // auto ids) would add them twice.
        let (what, replay) = match (rows.upsert, auto) {
            (true, false) => ("upsert", Replay::Safe),
            (true, true) => ("upsert", Replay::Unsafe),
            (false, _) => ("insert", Replay::Unsafe),
        };
        let msg = InsertRequest {
            collection: c.schema.name.clone(),
            rows: out_rows,
            upsert: rows.upsert,
        };
        Ok(self
            .forward(
                what,
                replay,
                self.opts.request_timeout,
                msg,
                |mut w, r| async move { w.insert(r).await },
            )
            .await?
            .ids)
    }

    async fn delete(&self, c: &CollectionMeta, filter: FilterExpr) -> Result<u64, ApiError> {
        // Not replayed after a broken call: the second run would report 0 deleted rows.
        let msg = DeleteRequest {
            collection: c.schema.name.clone(),
            filter: filter.text,
        };
        Ok(self
            .forward(
                "delete",
                Replay::Unsafe,
                self.opts.request_timeout,
                msg,
                |mut w, r| async move { w.delete(r).await },
            )
            .await?
            .delete_count)
    }

    async fn get(
        &self,
        c: &CollectionMeta,
        ids: Vec<i64>,
        fields: ReadFields,
    ) -> Result<Vec<RowOut>, ApiError> {
        loaded(c)?;
        let of = output_fields(&c.schema, &fields);
        let name = c.schema.name.clone();
        let (cc, parts) = self
            .rows_with_retry(&c.schema.name, |mut client, segs, version| {
                let mut req = tonic::Request::new(GetRowsRequest {
                    collection: name.clone(),
                    segment_ids: segs,
                    ids: ids.clone(),
                    output_fields: of.clone(),
                    min_catalog_version: version,
                });
                req.set_timeout(self.opts.request_timeout);
                async move { client.get_rows(req).await }
            })
            .await?;
        let mut by_id: HashMap<i64, ResultRow> = HashMap::new();
        for p in parts {
            for r in p.rows {
                by_id.entry(r.id).or_insert(r);
            }
        }
        let mut seen = BTreeSet::new();
        Ok(ids
            .iter()
            .filter(|id| seen.insert(**id))
            .filter_map(|id| by_id.get(id))
            .map(|r| row_out(&cc.meta.schema, &fields, r.id, &r.fields_json))
            .collect())
    }

    async fn query(&self, c: &CollectionMeta, q: QueryRequest) -> Result<Vec<RowOut>, ApiError> {
        loaded(c)?;
        let of = output_fields(&c.schema, &q.fields);
        let name = c.schema.name.clone();
        let filter = q
            .filter
            .as_ref()
            .map(|f| f.text.clone())
            .unwrap_or_default();
        let want = (q.offset + q.limit) as u64;
        let (cc, parts) = self
            .rows_with_retry(&c.schema.name, |mut client, segs, version| {
                let mut req = tonic::Request::new(QueryShardRequest {
                    collection: name.clone(),
                    segment_ids: segs,
                    filter: filter.clone(),
                    output_fields: of.clone(),
                    limit: want,
                    min_catalog_version: version,
                });
                req.set_timeout(self.opts.request_timeout);
                async move { client.query_shard(req).await }
            })
            .await?;
        let rows = merge::merge_rows(
            parts.into_iter().map(|p| p.rows).collect(),
            |r: &ResultRow| r.id,
            q.offset,
            q.limit,
        );
        Ok(rows
            .into_iter()
            .map(|r| row_out(&cc.meta.schema, &q.fields, r.id, &r.fields_json))
            .collect())
    }

    async fn count(&self, c: &CollectionMeta, filter: Option<FilterExpr>) -> Result<u64, ApiError> {
        loaded(c)?;
        self.count_rows(c, filter).await
    }

    async fn search(
        &self,
        c: &CollectionMeta,
        s: SearchRequest,
    ) -> Result<Vec<Vec<Hit>>, ApiError> {
        loaded(c)?;
        let schema = c.schema.clone();
        let shard = |version: u64| ShardSearch {
            request: SearchShardRequest {
                collection: schema.name.clone(),
                segment_ids: Vec::new(),
                dimension: u32::try_from(schema.dim).unwrap_or(u32::MAX),
                queries: s.queries.clone(),
                top_k: u32::try_from(s.top_k).unwrap_or(u32::MAX),
                params: Some(PbSearchParams {
                    nprobe: s.params.nprobe.map(|v| v as u32),
                    ef: s.params.ef.map(|v| v as u32),
                }),
                filter: s
                    .filter
                    .as_ref()
                    .map(|f| f.text.clone())
                    .unwrap_or_default(),
                output_fields: output_fields(&schema, &s.fields),
                min_catalog_version: version,
            },
            nq: s.nq,
            timeout: self.opts.request_timeout,
        };
        let mut attempt = 0;
        let outcome = loop {
            let version = self.catalog().version;
            let cc = self.cached(&schema.name).await?;
            let segs = segment_ids(&cc);
            if segs.is_empty() {
                return Ok(vec![Vec::new(); s.nq]);
            }
            let readers = self.readers_or_err()?;
            let spread = self.spread.fetch_add(1, Ordering::Relaxed);
            let out = fanout::search(
                &self.readers,
                &readers,
                &segs,
                self.opts.replication,
                spread,
                &shard(version),
            )
            .await;
            match out {
                Ok(o) => {
                    self.note_failures(&o.failed_readers);
                    if attempt == 0 && !o.unknown_segments.is_empty() {
                        attempt += 1;
                        self.refresh(0).await?;
                        continue;
                    }
                    break o;
                }
                Err(e) => return Err(fanout_to_api(e)),
            }
        };
        Ok(outcome
            .results
            .into_iter()
            .map(|hits| {
                hits.into_iter()
                    .map(|h| Hit {
                        score: schema.metric.user_score(h.distance),
                        row: row_out(&schema, &s.fields, h.id, &h.fields_json),
                    })
                    .collect()
            })
            .collect())
    }

    async fn indexes(&self, c: &CollectionMeta) -> Result<Vec<IndexRecord>, ApiError> {
        Ok(self.cached(&c.schema.name).await?.indexes)
    }

    async fn create_indexes(
        &self,
        c: &CollectionMeta,
        recs: Vec<IndexRecord>,
    ) -> Result<(), ApiError> {
        let mut v = 0;
        for r in recs {
            let req = self.writer_call(CreateIndexRequest {
                collection: c.schema.name.clone(),
                index_name: r.index_name,
                field_name: r.field_name,
                index_type: r.index_type,
                metric_type: r.metric,
                params_json: r.params.into_bytes(),
            });
            v = self
                .writer
                .clone()
                .create_index(req)
                .await
                .map_err(writer_err)?
                .into_inner()
                .catalog_version;
        }
        self.after_write(v).await
    }

    async fn drop_index(&self, c: &CollectionMeta, index_name: &str) -> Result<(), ApiError> {
        let req = self.writer_call(DropIndexRequest {
            collection: c.schema.name.clone(),
            index_name: index_name.to_string(),
        });
        let v = self
            .writer
            .clone()
            .drop_index(req)
            .await
            .map_err(writer_err)?
            .into_inner()
            .catalog_version;
        self.after_write(v).await
    }

    async fn index_progress(
        &self,
        c: &CollectionMeta,
        index: &IndexRecord,
    ) -> Result<IndexProgress, ApiError> {
        use crate::core::storage::ann::AnnDef;
        use crate::core::storage::collection::StorageOptions;
        // Progress from the catalogue: committed segments and the index files the writer's
        // builder committed for them, read afresh (describe is rare; a build shows at once).
        // Rows still in the writer's growing buffer are not counted (no segment yet), and a
        // failed build is known to the writer only: its segment stays pending here.
        let segments = self.meta.segments(c.id).await?;
        let total: u64 = segments.iter().map(|s| s.rows.max(0) as u64).sum();
        let def = AnnDef::from_record(index).filter(|_| index.field_name == c.schema.vector_field);
        let Some(def) = def else {
            // FLAT searches every row exactly as soon as it is written.
            return Ok(IndexProgress {
                indexed_rows: total,
                total_rows: total,
                flat_segments: segments.len() as u64,
                ..IndexProgress::default()
            });
        };
        let files: HashMap<i64, i64> = self
            .meta
            .segment_indexes(c.id)
            .await?
            .into_iter()
            .filter(|r| def.matches(r))
            .map(|r| (r.segment_id, r.bytes.max(0)))
            .collect();
        let min_rows = StorageOptions::default().index_min_rows.max(1) as u64;
        let mut p = IndexProgress {
            total_rows: total,
            ..IndexProgress::default()
        };
        for s in &segments {
            let rows = s.rows.max(0) as u64;
            match files.get(&s.id) {
                Some(bytes) => {
                    p.indexed_rows += rows;
                    p.indexed_segments += 1;
                    p.index_bytes += *bytes as u64;
                }
                None => {
                    p.flat_segments += 1;
                    if rows >= min_rows {
                        p.pending_rows += rows;
                    }
                }
            }
        }
        Ok(p)
    }

    async fn ready(&self) -> Result<(), String> {
        self.writer_version()
            .await
            .map_err(|e| format!("writer {} unreachable: {}", self.opts.writer, e.message()))?;
        if self.routable_readers().is_empty() {
            return Err("no live reader".into());
        }
        Ok(())
    }

    fn update_gauges(&self, metrics: &Metrics) {
        let m = self.membership.lock();
        let mut counts = [
            ("joining", 0),
            ("live", 0),
            ("suspect", 0),
            ("dead", 0),
            ("draining", 0),
        ];
        for a in m.known() {
            let i = match m.state(&a) {
                Some(ReaderState::Joining) | None => 0,
                Some(ReaderState::Live) => 1,
                Some(ReaderState::Suspect { .. }) => 2,
                Some(ReaderState::Dead { .. }) => 3,
                Some(ReaderState::Draining) => 4,
            };
            counts[i].1 += 1;
        }
        drop(m);
        let cat = self.catalog();
        let segs: Vec<(String, usize)> = cat
            .collections
            .iter()
            .map(|(n, c)| (n.clone(), c.segments.len()))
            .collect();
        metrics.update_router(&counts, cat.version, &segs);
    }
}

impl RouterBackend {
    async fn count_rows(
        &self,
        c: &CollectionMeta,
        filter: Option<FilterExpr>,
    ) -> Result<u64, ApiError> {
        let name = c.schema.name.clone();
        let filter = filter.map(|f| f.text).unwrap_or_default();
        let (_, parts) = self
            .rows_with_retry(&c.schema.name, |mut client, segs, version| {
                let mut req = tonic::Request::new(QueryShardRequest {
                    collection: name.clone(),
                    segment_ids: segs,
                    filter: filter.clone(),
                    output_fields: Vec::new(),
                    limit: 0,
                    min_catalog_version: version,
                });
                req.set_timeout(self.opts.request_timeout);
                async move { client.query_shard(req).await }
            })
            .await?;
        Ok(parts.iter().map(|p| p.match_count).sum())
    }
}
