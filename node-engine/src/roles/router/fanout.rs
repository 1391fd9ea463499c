//! The router's search fan-out: plan segments onto readers ([`super::hrw`]), call `SearchShard`
//! on every planned reader in parallel with a deadline, re-send a failed reader's segments to
//! the next reader in hash order within the same request, and merge ([`crate::core::merge`]).
//!
//! Owns the gRPC clients to readers (one lazily connected channel per address) and the rule of
//! which reader failures are retried elsewhere (unavailable, timeout, internal) and which are
//! the caller's error and returned at once (invalid argument, not found). Must not depend on
//! the REST layer; the router's backend calls [`search`].

use super::hrw::{self, PlanError, SegmentId};
use crate::core::merge::{self, QueryCountMismatch};
use crate::rpc::pb::reader_client::ReaderClient;
use crate::rpc::pb::{Hit, NotifySegmentsRequest, SearchShardRequest};
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

/// Why a fanned-out search failed.
#[derive(Debug, thiserror::Error)]
pub enum FanoutError {
    /// A reader address cannot be turned into a gRPC endpoint.
    #[error("invalid reader address {addr:?}")]
    ReaderAddress {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// Every reader that could serve a segment failed in this request. `failures` says how
    /// each one failed in this request (a timeout: a reader can be stuck loading a new segment
    /// from the shared filesystem while its object store does not answer), the cause a client
    /// and an operator need; empty when no reader was live to begin with.
    #[error("no reader could serve the search ({})", failures_text(.failures))]
    NoReaderLeft {
        #[source]
        source: PlanError,
        failures: Vec<(String, String)>,
    },
    /// A reader rejected the request itself (bad filter, unknown collection, bad parameter):
    /// retrying elsewhere would fail the same way.
    #[error("reader {addr} rejected the search: {status}")]
    Rejected { addr: String, status: tonic::Status },
    /// A reader's answer did not match the request.
    #[error("reader {addr} answered a malformed result")]
    Malformed {
        addr: String,
        #[source]
        source: QueryCountMismatch,
    },
}

fn failures_text(failures: &[(String, String)]) -> String {
    if failures.is_empty() {
        return "no reader is live".into();
    }
    failures
        .iter()
        .map(|(addr, why)| format!("reader {addr}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Whether a failed call should be re-sent to the next reader (the reader or the network is at
/// fault) or returned to the client (the request is at fault). Exhaustive on purpose.
pub fn is_retryable(code: Code) -> bool {
    match code {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Internal
        | Code::Unknown
        | Code::Cancelled
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::DataLoss
        | Code::Unimplemented
        | Code::FailedPrecondition => true,
        Code::Ok
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::OutOfRange
        | Code::Unauthenticated => false,
    }
}

/// Lazily connected gRPC clients, one per reader address.
#[derive(Debug)]
pub struct ReaderClients {
    clients: Mutex<HashMap<String, ReaderClient<Channel>>>,
    connect_timeout: Duration,
}

impl ReaderClients {
    pub fn new(connect_timeout: Duration) -> Self {
        Self {
            clients: Mutex::new(HashMap::new()),
            connect_timeout,
        }
    }

    /// The client for `addr` (`host:port`), created on first use without connecting yet.
    pub fn get(&self, addr: &str) -> Result<ReaderClient<Channel>, FanoutError> {
        let mut map = self.clients.lock();
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let ep = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|source| FanoutError::ReaderAddress {
                addr: addr.to_string(),
                source,
            })?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        let c = ReaderClient::new(ep.connect_lazy());
        map.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Forget clients of readers no longer known (their channels close when dropped).
    pub fn retain(&self, known: &[String]) {
        self.clients
            .lock()
            .retain(|a, _| known.iter().any(|k| k == a));
    }
}

/// What the router asks of one search, independent of which reader gets which segments.
#[derive(Debug, Clone)]
pub struct ShardSearch {
    /// Template; `segment_ids` is filled per reader. `top_k` must already be offset + limit.
    pub request: SearchShardRequest,
    /// Number of queries in `request.queries`.
    pub nq: usize,
    /// Per-call deadline; a reader slower than this is treated as failed.
    pub timeout: Duration,
}

/// The merged result and what the router should learn from it.
#[derive(Debug, Clone, Default)]
pub struct SearchOutcome {
    /// Per query, the global top-`top_k`, sorted by (distance, id).
    pub results: Vec<Vec<Hit>>,
    /// Readers that failed during this request (the caller marks them suspect).
    pub failed_readers: Vec<String>,
    /// Segments some reader did not know (dropped since the router's catalogue was read).
    pub unknown_segments: Vec<SegmentId>,
}

enum CallError {
    Retry(String),
    Fatal(FanoutError),
}

async fn call(
    clients: &ReaderClients,
    addr: &str,
    segments: Vec<SegmentId>,
    s: &ShardSearch,
) -> Result<crate::rpc::pb::SearchShardResponse, CallError> {
    let mut client = clients.get(addr).map_err(CallError::Fatal)?;
    let mut req = tonic::Request::new(SearchShardRequest {
        segment_ids: segments,
        ..s.request.clone()
    });
    req.set_timeout(s.timeout);
    let started = std::time::Instant::now();
    let timed_out = || CallError::Retry(format!("timed out after {:?}", s.timeout));
    match tokio::time::timeout(s.timeout, client.search_shard(req)).await {
        Err(_elapsed) => Err(timed_out()),
        // tonic's own deadline (the grpc-timeout above) fires as `Cancelled`: say what it was.
        Ok(Err(status)) if is_retryable(status.code()) && started.elapsed() >= s.timeout => {
            Err(timed_out())
        }
        Ok(Err(status)) if is_retryable(status.code()) => Err(CallError::Retry(format!(
            "{:?}: {}",
            status.code(),
            status.message()
        ))),
        Ok(Err(status)) => Err(CallError::Fatal(FanoutError::Rejected {
            addr: addr.to_string(),
            status,
        })),
        Ok(Ok(resp)) => {
            let resp = resp.into_inner();
            if resp.results.len() != s.nq {
                return Err(CallError::Fatal(FanoutError::Malformed {
                    addr: addr.to_string(),
                    source: QueryCountMismatch {
                        expected: s.nq,
                        got: resp.results.len(),
                    },
                }));
            }
            Ok(resp)
        }
    }
}

/// Search `segments` across `readers` (the routable set, any order).
///
/// Each segment is searched by exactly one reader that answered; a reader that errors
/// (retryable) or times out has its segments re-sent to the next reader in each segment's hash
/// order, repeatedly, until all are answered or no reader is left.
///
/// Errors: `NoReaderLeft` when every reader for some segment failed; `Rejected` when a reader
/// refused the request itself; `Malformed` when an answer had the wrong number of queries.
pub async fn search(
    clients: &ReaderClients,
    readers: &[String],
    segments: &[SegmentId],
    replication: usize,
    spread: u64,
    s: &ShardSearch,
) -> Result<SearchOutcome, FanoutError> {
    let mut failures: Vec<(String, String)> = Vec::new();
    let no_reader_left = |source, failures: &[(String, String)]| FanoutError::NoReaderLeft {
        source,
        failures: failures.to_vec(),
    };
    let mut plan = hrw::plan(segments, readers, replication, spread)
        .map_err(|source| no_reader_left(source, &failures))?;
    let mut excluded = BTreeSet::new();
    let mut parts: Vec<Vec<Vec<Hit>>> = Vec::new();
    let mut out = SearchOutcome::default();
    while !plan.is_empty() {
        let calls = plan.per_reader.into_iter().map(|(idx, segs)| {
            let addr = readers[idx].clone();
            async move {
                let r = call(clients, &addr, segs.clone(), s).await;
                (idx, addr, segs, r)
            }
        });
        let mut failed_segments = Vec::new();
        for (idx, addr, segs, r) in futures::future::join_all(calls).await {
            match r {
                Ok(resp) => {
                    out.unknown_segments.extend(resp.unknown_segments);
                    parts.push(resp.results.into_iter().map(|q| q.hits).collect());
                }
                Err(CallError::Retry(why)) => {
                    tracing::warn!(reader = %addr, error = %why, segments = segs.len(), "reader failed; re-sending its segments");
                    excluded.insert(idx);
                    failures.push((addr.clone(), why));
                    out.failed_readers.push(addr);
                    failed_segments.extend(segs);
                }
                Err(CallError::Fatal(e)) => return Err(e),
            }
        }
        plan = hrw::replan(&failed_segments, readers, &excluded)
            .map_err(|source| no_reader_left(source, &failures))?;
    }
    let k = s.request.top_k as usize;
    // Counts were checked per answer, so the batch merge cannot fail here.
    out.results =
        merge::merge_batches(parts, s.nq, k).map_err(|source| FanoutError::Malformed {
            addr: "merge".into(),
            source,
        })?;
    out.unknown_segments.sort_unstable();
    out.unknown_segments.dedup();
    Ok(out)
}

/// Push `version` to every reader in `readers` and wait until each serves it.
/// Returns the readers that did not confirm within `timeout` (error or too slow).
pub async fn wait_readers_caught_up(
    clients: &ReaderClients,
    readers: &[String],
    version: u64,
    timeout: Duration,
) -> Vec<String> {
    let calls = readers.iter().map(|addr| async move {
        let ok = match clients.get(addr) {
            Err(_) => false,
            Ok(mut c) => {
                let mut req = tonic::Request::new(NotifySegmentsRequest {
                    catalog_version: version,
                });
                req.set_timeout(timeout);
                match tokio::time::timeout(timeout, c.notify_segments(req)).await {
                    Ok(Ok(resp)) => resp.into_inner().catalog_version >= version,
                    Ok(Err(_)) | Err(_) => false,
                }
            }
        };
        (addr.clone(), ok)
    });
    futures::future::join_all(calls)
        .await
        .into_iter()
        .filter(|(_, ok)| !ok)
        .map(|(a, _)| a)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::distance::l2_sq;
    use crate::rpc::pb::reader_server::{Reader, ReaderServer};
    use crate::rpc::pb::{
        GetRowsRequest, HealthRequest, HealthResponse, NotifySegmentsRequest,
        NotifySegmentsResponse, QueryHits, QueryShardRequest, RowsResponse, SearchShardResponse,
    };
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tonic::{Request, Response, Status};

    /// How a test reader behaves.
    #[derive(Clone, Copy, PartialEq)]
    enum Mode {
        Serve,
        Unavailable,
        Hang,
        Reject,
    }

    /// Segment id -> rows (id, vector).
    type Shards = Arc<BTreeMap<u64, Vec<(i64, Vec<f32>)>>>;

    /// An in-process reader over in-memory segments, served over real gRPC on loopback.
    struct TestReader {
        segments: Shards,
        mode: Mode,
        calls: Arc<AtomicUsize>,
    }

    #[tonic::async_trait]
    impl Reader for TestReader {
        async fn search_shard(
            &self,
            req: Request<SearchShardRequest>,
        ) -> Result<Response<SearchShardResponse>, Status> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            match self.mode {
                Mode::Unavailable => return Err(Status::unavailable("going away")),
                Mode::Reject => return Err(Status::invalid_argument("bad filter at 3")),
                Mode::Hang => std::future::pending::<()>().await,
                Mode::Serve => {}
            }
            let r = req.into_inner();
            let dim = r.dimension as usize;
            let results = r
                .queries
                .chunks(dim)
                .map(|q| {
                    let mut hits: Vec<Hit> = r
                        .segment_ids
                        .iter()
                        .flat_map(|s| self.segments.get(s).into_iter().flatten())
                        .map(|(id, v)| Hit {
                            id: *id,
                            distance: l2_sq(q, v),
                            fields_json: vec![],
                        })
                        .collect();
                    hits.sort_by(merge::cmp_hits);
                    hits.truncate(r.top_k as usize);
                    QueryHits { hits }
                })
                .collect();
            Ok(Response::new(SearchShardResponse {
                results,
                unknown_segments: vec![],
                catalog_version: 1,
            }))
        }
        async fn get_rows(
            &self,
            _: Request<GetRowsRequest>,
        ) -> Result<Response<RowsResponse>, Status> {
            Err(Status::unimplemented("test reader"))
        }
        async fn query_shard(
            &self,
            _: Request<QueryShardRequest>,
        ) -> Result<Response<RowsResponse>, Status> {
            Err(Status::unimplemented("test reader"))
        }
        async fn notify_segments(
            &self,
            _: Request<NotifySegmentsRequest>,
        ) -> Result<Response<NotifySegmentsResponse>, Status> {
            Err(Status::unimplemented("test reader"))
        }
        async fn health(
            &self,
            _: Request<HealthRequest>,
        ) -> Result<Response<HealthResponse>, Status> {
            Err(Status::unimplemented("test reader"))
        }
    }

    async fn spawn_reader(
        segments: Shards,
        mode: Mode,
    ) -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = ReaderServer::new(TestReader {
            segments,
            mode,
            calls: calls.clone(),
        });
        let incoming = tokio_stream_incoming(listener);
        let h = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
        (addr, calls, h)
    }

    fn tokio_stream_incoming(
        l: tokio::net::TcpListener,
    ) -> impl futures::Stream<Item = Result<tokio::net::TcpStream, std::io::Error>> {
        futures::stream::unfold(l, |l| async move {
            let r = l.accept().await.map(|(s, _)| s);
            Some((r, l))
        })
    }

    fn data() -> Shards {
        let mut m = BTreeMap::new();
        for seg in 0..30u64 {
            let rows = (0..20)
                .map(|r| {
                    let id = (seg * 100 + r) as i64;
                    (
                        id,
                        vec![(id % 17) as f32, (id % 5) as f32, (id / 7) as f32 * 0.01],
                    )
                })
                .collect();
            m.insert(seg, rows);
        }
        Arc::new(m)
    }

    fn oracle(d: &BTreeMap<u64, Vec<(i64, Vec<f32>)>>, q: &[f32], k: usize) -> Vec<(i64, f32)> {
        let mut all: Vec<Hit> = d
            .values()
            .flatten()
            .map(|(id, v)| Hit {
                id: *id,
                distance: l2_sq(q, v),
                fields_json: vec![],
            })
            .collect();
        all.sort_by(merge::cmp_hits);
        all.into_iter()
            .take(k)
            .map(|h| (h.id, h.distance))
            .collect()
    }

    fn request(queries: &[Vec<f32>], k: u32, timeout: Duration) -> ShardSearch {
        ShardSearch {
            request: SearchShardRequest {
                collection: "c".into(),
                dimension: 3,
                queries: queries.concat(),
                top_k: k,
                ..Default::default()
            },
            nq: queries.len(),
            timeout,
        }
    }

    fn ids(v: &[Hit]) -> Vec<(i64, f32)> {
        v.iter().map(|h| (h.id, h.distance)).collect()
    }

    #[tokio::test]
    async fn fanned_out_search_equals_the_single_node_oracle() {
        let d = data();
        let mut readers = vec![];
        for _ in 0..3 {
            readers.push(spawn_reader(d.clone(), Mode::Serve).await);
        }
        let addrs: Vec<String> = readers.iter().map(|r| r.0.clone()).collect();
        let clients = ReaderClients::new(Duration::from_secs(2));
        let segs: Vec<u64> = d.keys().copied().collect();
        let qs = vec![vec![3.0, 1.0, 0.5], vec![16.0, 4.0, 2.0]];
        let out = search(
            &clients,
            &addrs,
            &segs,
            1,
            0,
            &request(&qs, 7, Duration::from_secs(5)),
        )
        .await
        .unwrap();
        assert!(out.failed_readers.is_empty());
        for (q, res) in qs.iter().zip(&out.results) {
            assert_eq!(ids(res), oracle(&d, q, 7));
        }
        // Exactly the planned readers were called, once each.
        let planned = hrw::plan(&segs, &addrs, 1, 0).unwrap();
        for (i, r) in readers.iter().enumerate() {
            let expect = usize::from(planned.per_reader.contains_key(&i));
            assert_eq!(r.1.load(Ordering::SeqCst), expect);
        }
    }

    #[tokio::test]
    async fn a_failing_or_hanging_reader_has_its_segments_resent_to_the_next_reader() {
        let d = data();
        for bad_mode in [Mode::Unavailable, Mode::Hang] {
            let good1 = spawn_reader(d.clone(), Mode::Serve).await;
            let bad = spawn_reader(d.clone(), bad_mode).await;
            let good2 = spawn_reader(d.clone(), Mode::Serve).await;
            let addrs = vec![good1.0.clone(), bad.0.clone(), good2.0.clone()];
            let clients = ReaderClients::new(Duration::from_secs(2));
            let segs: Vec<u64> = d.keys().copied().collect();
            let qs = vec![vec![1.0, 2.0, 0.1]];
            let out = search(
                &clients,
                &addrs,
                &segs,
                1,
                0,
                &request(&qs, 10, Duration::from_millis(500)),
            )
            .await
            .unwrap();
            assert_eq!(out.failed_readers, vec![bad.0.clone()]);
            assert_eq!(ids(&out.results[0]), oracle(&d, &qs[0], 10));
        }
    }

    #[tokio::test]
    async fn a_dead_reader_address_fails_over_and_all_dead_is_an_error() {
        let d = data();
        let good = spawn_reader(d.clone(), Mode::Serve).await;
        // A port with nothing listening: connection refused.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let clients = ReaderClients::new(Duration::from_secs(1));
        let segs: Vec<u64> = d.keys().copied().collect();
        let qs = vec![vec![0.0, 0.0, 0.0]];
        let s = request(&qs, 5, Duration::from_secs(2));
        let out = search(&clients, &[good.0.clone(), dead.clone()], &segs, 1, 3, &s)
            .await
            .unwrap();
        assert_eq!(ids(&out.results[0]), oracle(&d, &qs[0], 5));
        assert_eq!(out.failed_readers, vec![dead.clone()]);
        let err = search(&clients, std::slice::from_ref(&dead), &segs, 1, 0, &s)
            .await
            .unwrap_err();
        assert!(matches!(err, FanoutError::NoReaderLeft { .. }), "{err:?}");
        // The error says how each reader failed, not only that none was left.
        assert!(
            err.to_string().contains(&format!("reader {dead}: ")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn when_every_reader_hangs_the_error_names_each_readers_timeout() {
        // What a store outage does to readers stuck loading a new segment from JuiceFS.
        let d = data();
        let a = spawn_reader(d.clone(), Mode::Hang).await;
        let b = spawn_reader(d.clone(), Mode::Hang).await;
        let clients = ReaderClients::new(Duration::from_secs(1));
        let segs: Vec<u64> = d.keys().copied().collect();
        let qs = vec![vec![0.0, 0.0, 0.0]];
        let s = request(&qs, 5, Duration::from_millis(200));
        let err = search(&clients, &[a.0.clone(), b.0.clone()], &segs, 1, 0, &s)
            .await
            .unwrap_err();
        let text = err.to_string();
        for r in [&a.0, &b.0] {
            assert!(
                text.contains(&format!("reader {r}: timed out after 200ms")),
                "{text}"
            );
        }
    }

    #[tokio::test]
    async fn a_rejected_request_is_returned_at_once_and_not_retried() {
        let d = data();
        let bad = spawn_reader(d.clone(), Mode::Reject).await;
        let good = spawn_reader(d.clone(), Mode::Serve).await;
        let clients = ReaderClients::new(Duration::from_secs(1));
        let segs: Vec<u64> = d.keys().copied().collect();
        let qs = vec![vec![0.0, 0.0, 0.0]];
        let err = search(
            &clients,
            &[bad.0.clone(), good.0.clone()],
            &segs,
            1,
            0,
            &request(&qs, 5, Duration::from_secs(2)),
        )
        .await
        .unwrap_err();
        match err {
            FanoutError::Rejected { status, .. } => {
                assert_eq!(status.code(), Code::InvalidArgument)
            }
            other => panic!("expected Rejected, got {other:?}"),
        }
        assert_eq!(bad.1.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn only_reader_side_failures_are_retried() {
        assert!(is_retryable(Code::Unavailable));
        assert!(is_retryable(Code::DeadlineExceeded));
        assert!(!is_retryable(Code::InvalidArgument));
        assert!(!is_retryable(Code::NotFound));
    }
}

/// The router's flush wait against fake readers, each serving from its own [`VersionGate`].
#[cfg(test)]
mod flush_tests {
    use super::*;
    use crate::roles::reader::service::VersionGate;
    use crate::rpc::pb::reader_server::{Reader, ReaderServer};
    use crate::rpc::pb::{
        GetRowsRequest, HealthRequest, HealthResponse, NotifySegmentsResponse, QueryShardRequest,
        RowsResponse, SearchShardRequest, SearchShardResponse,
    };
    use std::sync::Arc;
    use tonic::{Request, Response, Status};

    /// A reader whose gate is advanced by a "poller" after a delay.
    struct GateReader {
        gate: Arc<VersionGate>,
    }

    #[tonic::async_trait]
    impl Reader for GateReader {
        async fn search_shard(
            &self,
            _: Request<SearchShardRequest>,
        ) -> Result<Response<SearchShardResponse>, Status> {
            Err(Status::unimplemented("test reader"))
        }
        async fn get_rows(
            &self,
            _: Request<GetRowsRequest>,
        ) -> Result<Response<RowsResponse>, Status> {
            Err(Status::unimplemented("test reader"))
        }
        async fn query_shard(
            &self,
            _: Request<QueryShardRequest>,
        ) -> Result<Response<RowsResponse>, Status> {
            Err(Status::unimplemented("test reader"))
        }
        async fn notify_segments(
            &self,
            req: Request<NotifySegmentsRequest>,
        ) -> Result<Response<NotifySegmentsResponse>, Status> {
            let v = req.into_inner().catalog_version;
            match self.gate.wait_for(v, Duration::from_secs(5)).await {
                Ok(have) => Ok(Response::new(NotifySegmentsResponse {
                    catalog_version: have,
                })),
                Err(e) => Err(Status::deadline_exceeded(e.to_string())),
            }
        }
        async fn health(
            &self,
            _: Request<HealthRequest>,
        ) -> Result<Response<HealthResponse>, Status> {
            Err(Status::unimplemented("test reader"))
        }
    }

    async fn spawn(gate: Arc<VersionGate>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let incoming = futures::stream::unfold(listener, |l| async move {
            let r = l.accept().await.map(|(s, _)| s);
            Some((r, l))
        });
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(ReaderServer::new(GateReader { gate }))
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
        addr
    }

    #[tokio::test]
    async fn flush_waits_until_every_reader_serves_the_version_and_names_laggards() {
        let fast = Arc::new(VersionGate::new(0));
        let slow = Arc::new(VersionGate::new(0));
        let stuck = Arc::new(VersionGate::new(0));
        let addrs = vec![
            spawn(fast.clone()).await,
            spawn(slow.clone()).await,
            spawn(stuck.clone()).await,
        ];
        fast.advance(7);
        let slow2 = slow.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            slow2.advance(7);
        });
        let clients = ReaderClients::new(Duration::from_secs(1));
        let laggards =
            wait_readers_caught_up(&clients, &addrs, 7, Duration::from_millis(1500)).await;
        assert_eq!(laggards, vec![addrs[2].clone()]);
        assert_eq!(slow.current(), 7);
    }
}
