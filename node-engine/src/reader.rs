//! The reader role (`shoal-engine reader`): serves searches over the committed segments of the
//! shared data directory, read-only.
//!
//! A reader connects to the metadata store without migrating it (it never writes there either),
//! opens every collection as a read-only replica ([`Collection::open_read_only`]: no WAL, no
//! committer, no stray-file removal, nothing written to the data directory, so the mount may be
//! read-only), and follows the catalogue: every `--poll-interval`, on a `NotifySegments` push,
//! and when a request carries a `min_catalog_version` newer than what it serves, it reads a
//! [`crate::core::meta::CatalogSnapshot`] and applies it (new and dropped segments, tombstone
//! versions, the writer's committed ANN index files, load state, new and dropped collections).
//!
//! It serves the Reader gRPC service ([`ReaderService`] over [`ReplicaCatalog`]) and `/healthz`,
//! `/readyz` (ready once it caught up with the catalogue once) and `/metrics`. The GPU flags are
//! accepted (the operator passes them to GPU readers); search runs on the CPU until the GPU
//! search path is wired into the replica.

use crate::api::rest::MAX_TOPK;
use crate::cluster::catalog_sync::VersionGate;
use crate::cluster::pb::reader_server::ReaderServer;
use crate::cluster::pb::{
    GetRowsRequest, Hit, QueryHits, QueryShardRequest, ResultRow, RowsResponse,
};
use crate::cluster::reader_service::{
    ReaderService, ShardBackend, ShardError, ShardQuery, run_poller,
};
use crate::config::{ConfigError, LogFormat, default_node_id, load_toml, parse_duration};
use crate::core::engine::schema_of;
use crate::core::filter::Filter;
use crate::core::index::{IndexError, SearchParams};
use crate::core::meta::{CatalogSnapshot, MetaError, MetaStore, redact};
use crate::core::storage::collection::{
    Collection, CollectionError, CollectionRead, Output, ReplicaListing, RowOut, Schema,
    SegmentSelection,
};
use crate::gpu::args::GpuArgs;
use crate::writer::{incoming, require_meta, stop_servers};
use axum::extract::State;
use axum::http::StatusCode;
use clap::Args;
use parking_lot::RwLock;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// `shoal-engine reader`: a read-only search node.
#[derive(Debug, Clone, Args)]
pub struct ReaderArgs {
    /// TOML file with any of the keys below (snake_case: meta, data_dir, grpc_listen,
    /// metrics_listen, node_id, poll_interval, log_format).
    #[arg(long, env = "SHOAL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Metadata store URL: `mysql://user:password@host:3306/db` (or `sqlite://...?mode=ro`).
    #[arg(long, env = "SHOAL_META", hide_env_values = true)]
    pub meta: Option<String>,
    /// Shared data directory, mounted read-only [default: ./shoal-data].
    #[arg(long, env = "SHOAL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of the internal Reader gRPC service [default: 127.0.0.1:19531].
    #[arg(long, env = "SHOAL_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    /// Address of /healthz, /readyz and /metrics [default: 127.0.0.1:9091].
    #[arg(long, env = "SHOAL_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// This reader's name in logs and health answers [default: $POD_NAME, else the host name].
    #[arg(long, env = "SHOAL_NODE_ID")]
    pub node_id: Option<String>,
    /// How often the catalogue is polled (the fallback when a push is lost) [default: 1s].
    #[arg(long, env = "SHOAL_POLL_INTERVAL")]
    pub poll_interval: Option<String>,
    /// Log format [default: text].
    #[arg(long, env = "SHOAL_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(flatten)]
    pub gpu: GpuArgs,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReaderFile {
    meta: Option<String>,
    data_dir: Option<PathBuf>,
    grpc_listen: Option<SocketAddr>,
    metrics_listen: Option<SocketAddr>,
    node_id: Option<String>,
    poll_interval: Option<String>,
    log_format: Option<LogFormat>,
}

/// Resolved reader configuration.
#[derive(Clone)]
pub struct ReaderConfig {
    pub meta_url: String,
    pub data_dir: PathBuf,
    pub grpc_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub node_id: String,
    pub poll_interval: Duration,
    pub log_format: LogFormat,
    pub gpu: GpuArgs,
}

impl std::fmt::Debug for ReaderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReaderConfig")
            .field("meta_url", &redact(&self.meta_url))
            .field("data_dir", &self.data_dir)
            .field("grpc_listen", &self.grpc_listen)
            .field("metrics_listen", &self.metrics_listen)
            .field("node_id", &self.node_id)
            .field("poll_interval", &self.poll_interval)
            .field("gpu", &self.gpu)
            .finish()
    }
}

impl ReaderArgs {
    /// Merge flags/env with the TOML file and defaults.
    pub fn resolve(self) -> Result<ReaderConfig, ConfigError> {
        let file: ReaderFile = load_toml(self.config.as_deref())?;
        let poll = self
            .poll_interval
            .or(file.poll_interval)
            .unwrap_or_else(|| "1s".into());
        Ok(ReaderConfig {
            meta_url: require_meta(self.meta.or(file.meta))?,
            data_dir: self
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("./shoal-data")),
            grpc_listen: self
                .grpc_listen
                .or(file.grpc_listen)
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 19531))),
            metrics_listen: self
                .metrics_listen
                .or(file.metrics_listen)
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9091))),
            node_id: self
                .node_id
                .or(file.node_id)
                .filter(|n| !n.trim().is_empty())
                .unwrap_or_else(default_node_id),
            poll_interval: parse_duration(&poll).map_err(|reason| ConfigError::Invalid {
                key: "poll_interval",
                reason,
            })?,
            log_format: self.log_format.or(file.log_format).unwrap_or_default(),
            gpu: self.gpu,
        })
    }
}

/// Why the reader stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReaderRunError {
    #[error("failed to connect to the metadata store")]
    Meta(#[from] MetaError),
    #[error("failed to listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A listed segment that failed to load: (collection id, segment id, reason).
type Failed = (i64, u64, String);

/// How long a listed segment may fail to load (e.g. the shared filesystem has not shown the
/// writer's files to this client yet) before the reader serves newer versions without it
/// (requests naming it then fail as unavailable, so the router asks another reader).
const FAILED_SEGMENT_GRACE: Duration = Duration::from_secs(30);

/// Every collection of the catalogue as a read-only replica: the reader's [`ShardBackend`].
pub struct ReplicaCatalog {
    meta: MetaStore,
    data_dir: PathBuf,
    collections: RwLock<BTreeMap<String, Arc<Collection>>>,
    /// One refresh at a time (poller, pushes and catch-ups share it).
    refresh_lock: tokio::sync::Mutex<()>,
    served: AtomicU64,
    caught_up: AtomicBool,
    /// Since when each failing (collection, segment) has failed.
    failing_since: parking_lot::Mutex<BTreeMap<(i64, u64), Instant>>,
}

impl ReplicaCatalog {
    pub fn new(meta: MetaStore, data_dir: PathBuf) -> Self {
        Self {
            meta,
            data_dir,
            collections: RwLock::new(BTreeMap::new()),
            refresh_lock: tokio::sync::Mutex::new(()),
            served: AtomicU64::new(0),
            caught_up: AtomicBool::new(false),
            failing_since: parking_lot::Mutex::new(BTreeMap::new()),
        }
    }

    /// The catalogue version served (every segment and tombstone committed up to it).
    pub fn served_version(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }

    /// Whether a refresh has succeeded at least once.
    pub fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::SeqCst)
    }

    /// Served collections by name.
    pub fn collections(&self) -> Vec<(String, Arc<Collection>)> {
        self.collections
            .read()
            .iter()
            .map(|(n, c)| (n.clone(), c.clone()))
            .collect()
    }

    fn get(&self, name: &str) -> Result<Arc<Collection>, ShardError> {
        self.collections
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| ShardError::CollectionNotFound(name.to_string()))
    }

    /// Apply one snapshot; returns the segments that failed to load (collection id, segment
    /// id, reason).
    async fn apply(&self, snap: &CatalogSnapshot) -> Result<Vec<Failed>, ShardError> {
        let mut failed = Vec::new();
        let mut next: BTreeMap<String, Arc<Collection>> = BTreeMap::new();
        for rec in &snap.collections {
            let listing = ReplicaListing {
                segments: snap.segments.get(&rec.id).map(Vec::as_slice).unwrap_or(&[]),
                indexes: snap.indexes.get(&rec.id).map(Vec::as_slice).unwrap_or(&[]),
                segment_indexes: snap
                    .segment_indexes
                    .get(&rec.id)
                    .map(Vec::as_slice)
                    .unwrap_or(&[]),
            };
            let existing = self.collections.read().get(&rec.name).cloned();
            let c = match existing {
                Some(c) if c.collection_id() == rec.id => {
                    let out = c
                        .refresh(rec, listing)
                        .await
                        .map_err(|e| ShardError::Catalogue(chain(&e)))?;
                    failed.extend(out.failed.into_iter().map(|(s, r)| (rec.id, s, r)));
                    c
                }
                _ => {
                    let schema = match schema_of(rec) {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::error!(collection = %rec.name, error = %e, "cannot serve a collection with an invalid definition");
                            continue;
                        }
                    };
                    let (c, out) = Collection::open_read_only(
                        self.meta.clone(),
                        rec,
                        schema,
                        &self.data_dir,
                        listing,
                    )
                    .await
                    .map_err(|e| ShardError::Catalogue(chain(&e)))?;
                    tracing::info!(collection = %rec.name, segments = c.segment_ids().len(), "serving collection");
                    failed.extend(out.failed.into_iter().map(|(s, r)| (rec.id, s, r)));
                    Arc::new(c)
                }
            };
            next.insert(rec.name.clone(), c);
        }
        *self.collections.write() = next;
        Ok(failed)
    }

    fn check_loaded(c: &Collection) -> Result<(), ShardError> {
        if c.is_loaded() {
            Ok(())
        } else {
            Err(ShardError::InvalidRequest(format!(
                "collection {:?} is not loaded",
                c.schema().name
            )))
        }
    }
}

fn parse_filter(f: Option<&str>) -> Result<Option<Filter>, ShardError> {
    match f.map(str::trim).filter(|f| !f.is_empty()) {
        None => Ok(None),
        Some(f) => Filter::parse(f)
            .map(Some)
            .map_err(|e| ShardError::InvalidRequest(format!("filter: {e}"))),
    }
}

fn output_of(s: &Schema, names: &[String]) -> Output {
    let all = names.iter().any(|n| n == "*");
    Output {
        vector: all || names.contains(&s.vector_field),
        fields: all
            || names
                .iter()
                .any(|n| *n != s.vector_field && *n != s.pk_field),
    }
}

/// The requested output fields of a row as a JSON object (`*` = every dynamic field and the
/// vector); empty bytes when none were requested.
fn fields_json(s: &Schema, names: &[String], row: &RowOut) -> Vec<u8> {
    if names.is_empty() {
        return Vec::new();
    }
    let mut o = Map::new();
    for n in names {
        if n == "*" {
            for (k, v) in &row.fields {
                o.insert(k.clone(), v.clone());
            }
            if let Some(v) = &row.vector {
                o.insert(s.vector_field.clone(), Value::from(v.clone()));
            }
        } else if *n == s.pk_field {
            o.insert(n.clone(), Value::from(row.id));
        } else if *n == s.vector_field {
            if let Some(v) = &row.vector {
                o.insert(n.clone(), Value::from(v.clone()));
            }
        } else if let Some(v) = row.fields.get(n) {
            o.insert(n.clone(), v.clone());
        }
    }
    serde_json::to_vec(&Value::Object(o)).unwrap_or_default()
}

fn collection_err(e: CollectionError) -> ShardError {
    match e {
        e @ (CollectionError::InvalidRow { .. }
        | CollectionError::InvalidParam { .. }
        | CollectionError::NotLoaded(_)
        | CollectionError::Index(IndexError::InvalidParam { .. })
        | CollectionError::Index(IndexError::DimensionMismatch { .. })) => {
            ShardError::InvalidRequest(e.to_string())
        }
        e @ (CollectionError::Index(IndexError::Corrupt { .. } | IndexError::Io { .. })
        | CollectionError::Wal(_)
        | CollectionError::Segment(_)
        | CollectionError::Meta(_)
        | CollectionError::WriterStopped
        | CollectionError::Task(_)) => ShardError::SegmentUnavailable {
            segment: 0,
            reason: chain(&e),
        },
    }
}

/// Requested segments that failed to load here: the router must ask another reader.
fn check_available(sel: &SegmentSelection) -> Result<(), ShardError> {
    match sel.unavailable.first() {
        Some((segment, reason)) => Err(ShardError::SegmentUnavailable {
            segment: *segment,
            reason: reason.clone(),
        }),
        None => Ok(()),
    }
}

fn check_limit(what: &str, n: u64) -> Result<usize, ShardError> {
    match usize::try_from(n) {
        Ok(v) if v <= MAX_TOPK => Ok(v),
        _ => Err(ShardError::InvalidRequest(format!(
            "{what} {n} is outside [0, {MAX_TOPK}]"
        ))),
    }
}

impl ShardBackend for ReplicaCatalog {
    fn search(&self, q: &ShardQuery) -> Result<(Vec<QueryHits>, Vec<u64>), ShardError> {
        let c = self.get(&q.collection)?;
        Self::check_loaded(&c)?;
        let s = c.schema();
        if q.dim != s.dim {
            return Err(ShardError::InvalidRequest(format!(
                "dimension {} differs from the collection's {}",
                q.dim, s.dim
            )));
        }
        let top_k = check_limit("top_k", q.top_k as u64)?;
        let filter = parse_filter(q.filter.as_deref())?;
        let params = SearchParams {
            nprobe: q.nprobe,
            ef: q.ef,
        };
        let (hits, sel) = c
            .search_segments(
                &q.segment_ids,
                &q.queries,
                top_k,
                &params,
                filter.as_ref(),
                output_of(s, &q.output_fields),
            )
            .map_err(collection_err)?;
        check_available(&sel)?;
        let results = hits
            .into_iter()
            .map(|hs| QueryHits {
                hits: hs
                    .into_iter()
                    .map(|h| Hit {
                        id: h.row.id,
                        distance: h.distance,
                        fields_json: fields_json(s, &q.output_fields, &h.row),
                    })
                    .collect(),
            })
            .collect();
        Ok((results, sel.unknown))
    }

    fn get_rows(&self, r: &GetRowsRequest) -> Result<RowsResponse, ShardError> {
        let c = self.get(&r.collection)?;
        Self::check_loaded(&c)?;
        let s = c.schema();
        let (rows, sel) = c.get_in_segments(&r.segment_ids, &r.ids, output_of(s, &r.output_fields));
        check_available(&sel)?;
        Ok(RowsResponse {
            match_count: rows.len() as u64,
            rows: rows
                .iter()
                .map(|row| ResultRow {
                    id: row.id,
                    fields_json: fields_json(s, &r.output_fields, row),
                })
                .collect(),
            unknown_segments: sel.unknown,
            catalog_version: 0,
        })
    }

    fn query(&self, r: &QueryShardRequest) -> Result<RowsResponse, ShardError> {
        let c = self.get(&r.collection)?;
        Self::check_loaded(&c)?;
        let s = c.schema();
        let limit = check_limit("limit", r.limit)?;
        let filter = parse_filter(Some(&r.filter))?;
        let (rows, count, sel) = c.query_segments(
            &r.segment_ids,
            filter.as_ref(),
            limit,
            output_of(s, &r.output_fields),
        );
        check_available(&sel)?;
        Ok(RowsResponse {
            rows: rows
                .iter()
                .map(|row| ResultRow {
                    id: row.id,
                    fields_json: fields_json(s, &r.output_fields, row),
                })
                .collect(),
            match_count: count as u64,
            unknown_segments: sel.unknown,
            catalog_version: 0,
        })
    }

    async fn refresh(&self) -> Result<u64, ShardError> {
        let _one = self.refresh_lock.lock().await;
        let mut attempts = 0;
        let (snap, failed) = loop {
            attempts += 1;
            let snap = self
                .meta
                .catalog_snapshot()
                .await
                .map_err(|e| ShardError::Catalogue(chain(&e)))?;
            let failed = self.apply(&snap).await?;
            // A load failure can be a race with a newer commit (a compaction removed the files
            // after our snapshot): look again.
            let newer = !failed.is_empty()
                && attempts < 3
                && self
                    .meta
                    .catalog_version()
                    .await
                    .is_ok_and(|v| v > snap.version);
            if !newer {
                break (snap, failed);
            }
        };
        self.hold_back_for(&failed, snap.version)?;
        self.served.fetch_max(snap.version, Ordering::SeqCst);
        self.caught_up.store(true, Ordering::SeqCst);
        Ok(snap.version)
    }
}

impl ReplicaCatalog {
    /// Refuse to report `version` as served while a listed segment has failed for less than
    /// [`FAILED_SEGMENT_GRACE`] (the next poll retries it).
    fn hold_back_for(&self, failed: &[Failed], version: u64) -> Result<(), ShardError> {
        let now = Instant::now();
        let mut since = self.failing_since.lock();
        since.retain(|k, _| failed.iter().any(|f| (f.0, f.1) == *k));
        for f in failed {
            since.entry((f.0, f.1)).or_insert(now);
        }
        match failed.iter().find(|f| {
            since
                .get(&(f.0, f.1))
                .is_some_and(|t| now.duration_since(*t) < FAILED_SEGMENT_GRACE)
        }) {
            Some((c, seg, reason)) => Err(ShardError::Catalogue(format!(
                "segment {seg} of collection id {c} is listed at catalogue version {version} but cannot be loaded yet: {reason}"
            ))),
            None => Ok(()),
        }
    }
}

// ---------------------------------------------------------------- the process

fn ops_router(backend: Arc<ReplicaCatalog>) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(b): State<Arc<ReplicaCatalog>>| async move {
                if b.caught_up() {
                    (StatusCode::OK, "ready".to_string())
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not caught up with the catalogue yet".to_string(),
                    )
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(b): State<Arc<ReplicaCatalog>>| async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    render_metrics(&b),
                )
            }),
        )
        .with_state(backend)
}

/// OpenMetrics text: served catalogue version, readiness, segments and live rows per collection
/// (collection names are `[A-Za-z0-9_]`, so they need no escaping).
fn render_metrics(b: &ReplicaCatalog) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# HELP shoal_reader_catalog_version Catalogue version served."
    );
    let _ = writeln!(s, "# TYPE shoal_reader_catalog_version gauge");
    let _ = writeln!(s, "shoal_reader_catalog_version {}", b.served_version());
    let _ = writeln!(
        s,
        "# HELP shoal_reader_ready Whether the reader caught up once."
    );
    let _ = writeln!(s, "# TYPE shoal_reader_ready gauge");
    let _ = writeln!(s, "shoal_reader_ready {}", u8::from(b.caught_up()));
    let cols = b.collections();
    let _ = writeln!(s, "# HELP shoal_reader_segments Sealed segments served.");
    let _ = writeln!(s, "# TYPE shoal_reader_segments gauge");
    for (n, c) in &cols {
        let _ = writeln!(
            s,
            "shoal_reader_segments{{collection=\"{n}\"}} {}",
            c.segment_ids().len()
        );
    }
    let _ = writeln!(s, "# HELP shoal_reader_rows Live rows served.");
    let _ = writeln!(s, "# TYPE shoal_reader_rows gauge");
    for (n, c) in &cols {
        let _ = writeln!(
            s,
            "shoal_reader_rows{{collection=\"{n}\"}} {}",
            c.stats().live_rows
        );
    }
    // ANN indexes mapped from the writer's committed files (segments without one use FLAT).
    let progress: Vec<_> = cols.iter().map(|(n, c)| (n, c.index_progress())).collect();
    let _ = writeln!(
        s,
        "# HELP shoal_reader_index_bytes Bytes of the ANN indexes served (mapped)."
    );
    let _ = writeln!(s, "# TYPE shoal_reader_index_bytes gauge");
    for (n, p) in &progress {
        let _ = writeln!(
            s,
            "shoal_reader_index_bytes{{collection=\"{n}\"}} {}",
            p.index_bytes
        );
    }
    let _ = writeln!(
        s,
        "# HELP shoal_reader_indexed_segments Segments searched through their ANN index."
    );
    let _ = writeln!(s, "# TYPE shoal_reader_indexed_segments gauge");
    for (n, p) in &progress {
        let _ = writeln!(
            s,
            "shoal_reader_indexed_segments{{collection=\"{n}\"}} {}",
            p.indexed_segments
        );
    }
    let _ = writeln!(
        s,
        "# HELP shoal_reader_index_load_failures Index files that failed verification here (their segments use FLAT)."
    );
    let _ = writeln!(s, "# TYPE shoal_reader_index_load_failures counter");
    for (n, p) in &progress {
        let _ = writeln!(
            s,
            "shoal_reader_index_load_failures_total{{collection=\"{n}\"}} {}",
            p.load_failures
        );
    }
    s.push_str("# EOF\n");
    s
}

/// Run the reader until `shutdown` resolves.
pub async fn run(
    cfg: ReaderConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ReaderRunError> {
    let meta = MetaStore::connect_read_only(&cfg.meta_url).await?;
    tracing::info!(gpu_devices = %cfg.gpu.gpu_devices, gpu_memory_budget = cfg.gpu.gpu_memory_budget,
        "GPU flags accepted; this reader searches on the CPU");
    let backend = Arc::new(ReplicaCatalog::new(meta, cfg.data_dir.clone()));
    let gate = Arc::new(VersionGate::new(0));
    match backend.refresh().await {
        Ok(v) => gate.advance(v),
        Err(e) => {
            tracing::warn!(error = %e, "first catalogue read failed; retrying every poll interval")
        }
    }
    let poller = tokio::spawn(run_poller(backend.clone(), gate.clone(), cfg.poll_interval));
    let svc = ReaderService::new(
        backend.clone(),
        gate,
        cfg.node_id.clone(),
        Duration::from_secs(5),
    );
    let bind = |addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ReaderRunError::Bind { addr, source })
    };
    let grpc_l = bind(cfg.grpc_listen).await?;
    let ops_l = bind(cfg.metrics_listen).await?;
    tracing::info!(grpc = %cfg.grpc_listen, metrics = %cfg.metrics_listen, node_id = %cfg.node_id,
        data_dir = %cfg.data_dir.display(), "shoal reader listening");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|v| *v).await;
        }
    };
    let ops = ops_router(backend.clone());
    let ops_task = crate::api::spawn_http(ops_l, ops, stopped());
    let grpc_task = tokio::spawn({
        let stop = stopped();
        async move {
            tonic::transport::Server::builder()
                .add_service(ReaderServer::new(svc))
                .serve_with_incoming_shutdown(incoming(grpc_l), stop)
                .await
                .map_err(|e| chain(&e))
        }
    });
    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    poller.abort();
    stop_servers([("ops", ops_task), ("gRPC", grpc_task)]).await;
    Ok(())
}
