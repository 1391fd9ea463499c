//! The reader role's gRPC service, generic over where the shard data comes from.
//!
//! Owns: the `Reader` gRPC surface (SearchShard, GetRows, QueryShard, NotifySegments, Health),
//! waiting for `min_catalog_version` before answering, the catalogue poller loop, and the one
//! exhaustive mapping from shard errors to gRPC status codes (which decides whether the router
//! retries elsewhere; the router reads it with `roles::router::fanout::is_retryable`).
//!
//! Does not own segment loading or search: a [`ShardBackend`] does (the adapter over the
//! storage core mmaps segments from the shared, read-only data directory). Searches run on
//! the blocking pool so a large batch never stalls the gRPC runtime.

use crate::rpc::pb::reader_server::Reader;
use crate::rpc::pb::{
    GetRowsRequest, HealthRequest, HealthResponse, NotifySegmentsRequest, NotifySegmentsResponse,
    QueryHits, QueryShardRequest, RowsResponse, SearchShardRequest, SearchShardResponse,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// Errors a shard backend reports.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// The collection is unknown to this reader's catalogue.
    #[error("collection {0:?} not found")]
    CollectionNotFound(String),
    /// The request itself is wrong (filter syntax, dimension, parameter range).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A segment's files failed their checksum or could not be read: this reader cannot serve
    /// it, another reader (or a later reload) may.
    #[error("segment {segment} unavailable: {reason}")]
    SegmentUnavailable { segment: u64, reason: String },
    /// Reading the catalogue from the metadata store failed.
    #[error("catalogue refresh failed: {0}")]
    Catalogue(String),
}

/// The one mapping from shard errors to gRPC codes (no catch-all arm).
pub fn to_status(e: &ShardError) -> Status {
    match e {
        ShardError::CollectionNotFound(_) => Status::not_found(e.to_string()),
        ShardError::InvalidRequest(_) => Status::invalid_argument(e.to_string()),
        ShardError::SegmentUnavailable { .. } => Status::unavailable(e.to_string()),
        ShardError::Catalogue(_) => Status::unavailable(e.to_string()),
    }
}

/// A search over some of a collection's segments.
#[derive(Debug, Clone)]
pub struct ShardQuery {
    pub collection: String,
    pub segment_ids: Vec<u64>,
    pub dim: usize,
    pub queries: Vec<f32>,
    pub top_k: usize,
    pub nprobe: Option<usize>,
    pub ef: Option<usize>,
    pub filter: Option<String>,
    pub output_fields: Vec<String>,
}

/// What a reader serves from. Implementations are cheap to share (`Arc`) and thread-safe.
pub trait ShardBackend: Send + Sync + 'static {
    /// Top-`top_k` per query over the given segments, hits sorted by (distance, id); also the
    /// requested segments this reader does not know.
    fn search(&self, q: &ShardQuery) -> Result<(Vec<QueryHits>, Vec<u64>), ShardError>;
    /// Rows by id over the given segments.
    fn get_rows(&self, r: &GetRowsRequest) -> Result<RowsResponse, ShardError>;
    /// Rows matching a filter over the given segments (smallest `limit` ids) and the count.
    fn query(&self, r: &QueryShardRequest) -> Result<RowsResponse, ShardError>;
    /// Re-read the catalogue and load/drop segments; returns the catalogue version now served.
    fn refresh(&self) -> impl std::future::Future<Output = Result<u64, ShardError>> + Send;
}

/// The reader's gRPC service.
pub struct ReaderService<B> {
    backend: Arc<B>,
    gate: Arc<VersionGate>,
    node_id: String,
    /// How long a request waits for the reader to reach its `min_catalog_version`.
    catch_up: Duration,
    /// The process's phase: while draining, `Health` answers `draining` (and not ready) so
    /// routers send work elsewhere as soon as another reader is live (requests that still
    /// arrive are served).
    lifecycle: crate::server::lifecycle::Lifecycle,
}

impl<B: ShardBackend> ReaderService<B> {
    pub fn new(
        backend: Arc<B>,
        gate: Arc<VersionGate>,
        node_id: String,
        catch_up: Duration,
    ) -> Self {
        Self {
            backend,
            gate,
            node_id,
            catch_up,
            lifecycle: Default::default(),
        }
    }

    /// Answer `draining` from `Health` once `life` drains (after SIGTERM).
    pub fn with_lifecycle(mut self, life: crate::server::lifecycle::Lifecycle) -> Self {
        self.lifecycle = life;
        self
    }

    /// Wait until the served version reaches `min`, triggering a refresh first (a push is
    /// faster than waiting for the next poll).
    async fn catch_up_to(&self, min: u64) -> Result<(), Status> {
        if self.gate.current() >= min {
            return Ok(());
        }
        match self.backend.refresh().await {
            Ok(v) => self.gate.advance(v),
            Err(e) => tracing::warn!(error = %e, "catalogue refresh on demand failed"),
        }
        self.gate
            .wait_for(min, self.catch_up)
            .await
            .map(|_| ())
            .map_err(|e| Status::unavailable(format!("reader {} is behind: {e}", self.node_id)))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ShardError> + Send + 'static,
) -> Result<T, Status> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(to_status(&e)),
        Err(join) => Err(Status::internal(format!("shard task failed: {join}"))),
    }
}

#[tonic::async_trait]
impl<B: ShardBackend> Reader for ReaderService<B> {
    async fn search_shard(
        &self,
        req: Request<SearchShardRequest>,
    ) -> Result<Response<SearchShardResponse>, Status> {
        let r = req.into_inner();
        self.catch_up_to(r.min_catalog_version).await?;
        let dim = r.dimension as usize;
        if dim == 0 || r.queries.is_empty() || !r.queries.len().is_multiple_of(dim) {
            return Err(Status::invalid_argument(format!(
                "{} query floats do not form queries of dimension {dim}",
                r.queries.len()
            )));
        }
        let params = r.params.unwrap_or_default();
        let q = ShardQuery {
            collection: r.collection,
            segment_ids: r.segment_ids,
            dim,
            queries: r.queries,
            top_k: r.top_k as usize,
            nprobe: params.nprobe.map(|v| v as usize),
            ef: params.ef.map(|v| v as usize),
            filter: Some(r.filter).filter(|f| !f.trim().is_empty()),
            output_fields: r.output_fields,
        };
        let backend = self.backend.clone();
        let (results, unknown_segments) = blocking(move || backend.search(&q)).await?;
        Ok(Response::new(SearchShardResponse {
            results,
            unknown_segments,
            catalog_version: self.gate.current(),
        }))
    }

    async fn get_rows(
        &self,
        req: Request<GetRowsRequest>,
    ) -> Result<Response<RowsResponse>, Status> {
        let r = req.into_inner();
        self.catch_up_to(r.min_catalog_version).await?;
        let backend = self.backend.clone();
        let mut resp = blocking(move || backend.get_rows(&r)).await?;
        resp.catalog_version = self.gate.current();
        Ok(Response::new(resp))
    }

    async fn query_shard(
        &self,
        req: Request<QueryShardRequest>,
    ) -> Result<Response<RowsResponse>, Status> {
        let r = req.into_inner();
        self.catch_up_to(r.min_catalog_version).await?;
        let backend = self.backend.clone();
        let mut resp = blocking(move || backend.query(&r)).await?;
        resp.catalog_version = self.gate.current();
        Ok(Response::new(resp))
    }

    async fn notify_segments(
        &self,
        req: Request<NotifySegmentsRequest>,
    ) -> Result<Response<NotifySegmentsResponse>, Status> {
        let v = req.into_inner().catalog_version;
        self.catch_up_to(v).await?;
        Ok(Response::new(NotifySegmentsResponse {
            catalog_version: self.gate.current(),
        }))
    }

    async fn health(
        &self,
        _req: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        let v = self.gate.current();
        let draining = self.lifecycle.is_draining();
        Ok(Response::new(HealthResponse {
            node_id: self.node_id.clone(),
            role: "reader".into(),
            ready: v > 0 && !draining,
            catalog_version: v,
            epoch: 0,
            draining,
        }))
    }
}

/// Poll the catalogue every `interval` (the fallback when a push is lost) until dropped.
pub async fn run_poller<B: ShardBackend>(
    backend: Arc<B>,
    gate: Arc<VersionGate>,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match backend.refresh().await {
            Ok(v) => gate.advance(v),
            Err(e) => {
                tracing::warn!(error = %e, "catalogue poll failed; serving the last known segments")
            }
        }
    }
}

/// The reader's side of catalogue-version synchronisation. Every metadata commit has a
/// catalogue version (the lease row's commit sequence, see the writer's `lease::fence`); a reader
/// serves "version V" once it has loaded every segment and tombstone committed up to V. The
/// router's side (push a version to every reader and wait) is
/// `router::fanout::wait_readers_caught_up`.
/// A reader could not reach the wanted version in time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("catalogue version {wanted} not reached within the deadline (serving {have})")]
pub struct NotCaughtUp {
    pub wanted: u64,
    pub have: u64,
}

/// The version a reader serves; monotonic.
#[derive(Debug)]
pub struct VersionGate {
    tx: watch::Sender<u64>,
}

impl VersionGate {
    pub fn new(initial: u64) -> Self {
        let (tx, _rx) = watch::channel(initial);
        Self { tx }
    }

    pub fn current(&self) -> u64 {
        *self.tx.borrow()
    }

    /// Record that version `v` is served; never moves backwards.
    pub fn advance(&self, v: u64) {
        self.tx.send_if_modified(|cur| {
            if v > *cur {
                *cur = v;
                true
            } else {
                false
            }
        });
    }

    /// Wait until the served version is at least `wanted`.
    ///
    /// Errors: [`NotCaughtUp`] when `timeout` passes first.
    pub async fn wait_for(&self, wanted: u64, timeout: Duration) -> Result<u64, NotCaughtUp> {
        let mut rx = self.tx.subscribe();
        let res = tokio::time::timeout(timeout, rx.wait_for(|v| *v >= wanted)).await;
        match res {
            Ok(Ok(v)) => Ok(*v),
            // The sender lives in `self`, so the channel cannot close while we wait.
            Ok(Err(_)) | Err(_) => Err(NotCaughtUp {
                wanted,
                have: self.current(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roles::router::fanout::{self, ReaderClients, ShardSearch};
    use crate::rpc::pb::Hit;
    use crate::rpc::pb::reader_client::ReaderClient;
    use crate::rpc::pb::reader_server::ReaderServer;
    use parking_lot::Mutex;
    use std::collections::BTreeMap;

    /// Segments of one collection `c` held in memory; `pending` segments appear at the next
    /// refresh, as if the writer had just committed them.
    type Rows = Vec<(i64, f32)>;
    /// (catalogue version, segment id -> rows).
    type Live = (u64, BTreeMap<u64, Rows>);
    /// (version, segment id, rows) committed but not yet seen by the reader.
    type Pending = Option<(u64, u64, Rows)>;

    #[derive(Default)]
    struct MemShards {
        live: Mutex<Live>,
        pending: Mutex<Pending>,
    }

    impl ShardBackend for MemShards {
        fn search(&self, q: &ShardQuery) -> Result<(Vec<QueryHits>, Vec<u64>), ShardError> {
            if q.collection != "c" {
                return Err(ShardError::CollectionNotFound(q.collection.clone()));
            }
            if q.filter.as_deref() == Some("bad ==") {
                return Err(ShardError::InvalidRequest(
                    "filter: expected a value at 6".into(),
                ));
            }
            let live = self.live.lock();
            let unknown: Vec<u64> = q
                .segment_ids
                .iter()
                .copied()
                .filter(|s| !live.1.contains_key(s))
                .collect();
            let results = q
                .queries
                .chunks(q.dim)
                .map(|qv| {
                    let mut hits: Vec<Hit> = q
                        .segment_ids
                        .iter()
                        .flat_map(|s| live.1.get(s).into_iter().flatten())
                        .map(|(id, x)| Hit {
                            id: *id,
                            distance: (qv[0] - x).powi(2),
                            fields_json: vec![],
                        })
                        .collect();
                    hits.sort_by(crate::core::merge::cmp_hits);
                    hits.truncate(q.top_k);
                    QueryHits { hits }
                })
                .collect();
            Ok((results, unknown))
        }
        fn get_rows(&self, _r: &GetRowsRequest) -> Result<RowsResponse, ShardError> {
            Ok(RowsResponse::default())
        }
        fn query(&self, _r: &QueryShardRequest) -> Result<RowsResponse, ShardError> {
            Ok(RowsResponse::default())
        }
        async fn refresh(&self) -> Result<u64, ShardError> {
            let mut live = self.live.lock();
            if let Some((v, seg, rows)) = self.pending.lock().take() {
                live.1.insert(seg, rows);
                live.0 = v;
            }
            Ok(live.0)
        }
    }

    async fn serve(backend: Arc<MemShards>) -> (String, Arc<VersionGate>) {
        let gate = Arc::new(VersionGate::new(backend.live.lock().0));
        let svc = ReaderService::new(backend, gate.clone(), "r1".into(), Duration::from_secs(2));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let incoming = futures::stream::unfold(listener, |l| async move {
            let r = l.accept().await.map(|(s, _)| s);
            Some((r, l))
        });
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(ReaderServer::new(svc))
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
        (addr, gate)
    }

    fn backend() -> Arc<MemShards> {
        let b = MemShards::default();
        {
            let mut l = b.live.lock();
            l.0 = 1;
            l.1.insert(1, vec![(10, 1.0), (11, 2.0)]);
            l.1.insert(2, vec![(20, 3.0), (21, 4.0)]);
        }
        Arc::new(b)
    }

    fn req(segs: Vec<u64>, min_version: u64) -> SearchShardRequest {
        SearchShardRequest {
            collection: "c".into(),
            segment_ids: segs,
            dimension: 1,
            queries: vec![2.1],
            top_k: 2,
            min_catalog_version: min_version,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn search_shard_over_grpc_returns_the_shards_top_k_and_names_unknown_segments() {
        let (addr, _gate) = serve(backend()).await;
        let mut c = ReaderClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let r = c
            .search_shard(req(vec![1, 2, 9], 0))
            .await
            .unwrap()
            .into_inner();
        let ids: Vec<i64> = r.results[0].hits.iter().map(|h| h.id).collect();
        assert_eq!(ids, vec![11, 20]);
        assert_eq!(r.unknown_segments, vec![9]);
        assert_eq!(r.catalog_version, 1);
    }

    #[tokio::test]
    async fn a_request_newer_than_the_catalogue_makes_the_reader_catch_up_first() {
        let b = backend();
        *b.pending.lock() = Some((5, 3, vec![(30, 2.0)]));
        let (addr, gate) = serve(b).await;
        let mut c = ReaderClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let r = c.search_shard(req(vec![3], 5)).await.unwrap().into_inner();
        assert_eq!(r.results[0].hits[0].id, 30);
        assert_eq!(gate.current(), 5);
        // A version nobody committed yet: the reader says it is behind (retryable), not "no rows".
        let err = c.search_shard(req(vec![3], 99)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
    }

    #[tokio::test]
    async fn notify_segments_returns_once_the_pushed_version_is_served() {
        let b = backend();
        *b.pending.lock() = Some((2, 3, vec![(30, 2.0)]));
        let (addr, _gate) = serve(b).await;
        let clients = ReaderClients::new(Duration::from_secs(1));
        let laggards = crate::roles::router::fanout::wait_readers_caught_up(
            &clients,
            std::slice::from_ref(&addr),
            2,
            Duration::from_secs(2),
        )
        .await;
        assert!(laggards.is_empty());
    }

    #[tokio::test]
    async fn shard_errors_map_to_codes_the_router_does_not_retry_when_the_request_is_wrong() {
        let (addr, _gate) = serve(backend()).await;
        let mut c = ReaderClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let mut bad = req(vec![1], 0);
        bad.filter = "bad ==".into();
        let e = c.search_shard(bad).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(!fanout::is_retryable(e.code()));
        let mut nf = req(vec![1], 0);
        nf.collection = "nope".into();
        assert_eq!(
            c.search_shard(nf).await.unwrap_err().code(),
            tonic::Code::NotFound
        );
        let mut wrong_dim = req(vec![1], 0);
        wrong_dim.dimension = 0;
        assert_eq!(
            c.search_shard(wrong_dim).await.unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert!(fanout::is_retryable(
            to_status(&ShardError::SegmentUnavailable {
                segment: 1,
                reason: "crc".into()
            })
            .code()
        ));
    }

    #[tokio::test]
    async fn router_fanout_over_real_reader_services_matches_one_reader_holding_everything() {
        let (a, _) = serve(backend()).await;
        let (b, _) = serve(backend()).await;
        let clients = ReaderClients::new(Duration::from_secs(1));
        let s = ShardSearch {
            request: req(vec![], 0),
            nq: 1,
            timeout: Duration::from_secs(2),
        };
        let out = fanout::search(&clients, &[a.clone(), b], &[1, 2], 1, 0, &s)
            .await
            .unwrap();
        let single = fanout::search(&clients, &[a], &[1, 2], 1, 0, &s)
            .await
            .unwrap();
        assert_eq!(out.results, single.results);
        assert_eq!(
            out.results[0].iter().map(|h| h.id).collect::<Vec<_>>(),
            vec![11, 20]
        );
    }
}

#[cfg(test)]
mod gate_tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn the_gate_only_moves_forward_and_wakes_waiters() {
        let g = Arc::new(VersionGate::new(3));
        g.advance(2);
        assert_eq!(g.current(), 3);
        assert_eq!(g.wait_for(3, Duration::from_millis(1)).await, Ok(3));
        let g2 = g.clone();
        let waiter = tokio::spawn(async move { g2.wait_for(5, Duration::from_secs(10)).await });
        g.advance(4);
        g.advance(6);
        assert_eq!(waiter.await.unwrap(), Ok(6));
        assert_eq!(
            g.wait_for(9, Duration::from_millis(20)).await,
            Err(NotCaughtUp { wanted: 9, have: 6 })
        );
    }
}
