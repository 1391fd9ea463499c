//! The writer role (`shoal-engine writer`): the one process of a cluster that writes.
//!
//! Startup (the ops listener answers from the first moment, `/readyz` 503 with the step): connect
//! to the metadata store (migrating it; retried until `--meta-startup-timeout`), wait for the
//! writer lease (another
//! writer holding an unexpired one keeps us waiting), fence the store with the lease epoch so
//! every metadata commit checks it, open the engine (replaying each collection's WAL: the WAL
//! must live where a successor sees it, the shared data directory by default or `--wal-dir`),
//! then serve the Writer gRPC service, the standalone REST API over the same engine, and
//! `/healthz`, `/readyz`, `/metrics`.
//!
//! While running: the lease is renewed every `ttl / 3`; a write is acknowledged (gRPC and REST)
//! only while the lease is valid locally. When the lease is lost (a successor took it), the
//! process exits non-zero without flushing (its commits would be fenced anyway). On SIGTERM it
//! reports not ready and keeps serving for `--shutdown-delay`, then stops accepting, drains,
//! flushes, releases the lease (so a successor need not wait for the expiry) and exits 0.
//!
//! `/readyz` is 503 with the reason unless it holds the lease, the WAL directory takes a
//! write + fsync, the data directory's filesystem answers ([`crate::probes`]) and the metadata
//! store answers; `/healthz` is liveness only (a dead mount is not healed by a restart).

pub mod lease;
pub mod service;

use crate::api::error::{ApiError, code};
use crate::api::rest::{AppState, Ctx};
use crate::config::{
    ConfigError, DEFAULT_GRPC_LISTEN, DEFAULT_LISTEN, DEFAULT_METRICS_LISTEN, LogFormat,
    auth_token, default_node_id, duration, load_toml, require_meta,
};
use crate::core::engine::{Engine, EngineConfig, EngineError};
use crate::core::error::{Classify, ErrorKind};
use crate::core::error_chain as chain;
use crate::core::filter::Filter;
use crate::core::meta::{MetaError, MetaStore, redact};
use crate::core::storage::collection::{
    Collection, CollectionError, CollectionRead, CollectionWrite, Schema, StorageOptions,
};
use crate::core::storage::wal::RowBatch;
use crate::core::types::Metric;
use crate::probes::{DirCheck, DirProbe};
use crate::rpc::pb::writer_server::WriterServer;
use crate::rpc::pb::{CreateCollectionRequest, CreateIndexRequest, InsertRequest, Row};
use crate::server::lifecycle::Lifecycle;
use crate::server::spawn_grpc;
use crate::server::startup::{MetaAccess, MetaStartupError, connect_meta};
use crate::server::stop_servers;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use clap::Args;
use lease::{LeaseError, LeaseKeeper};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use service::{WriteError, WriterBackend, WriterService};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// `shoal-engine writer`: the cluster's single, fenced writer.
#[derive(Debug, Clone, Default, Args)]
pub struct WriterArgs {
    /// TOML file with any of the keys below (snake_case: meta, data_dir, wal_dir, listen,
    /// grpc_listen, metrics_listen, node_id, lease_ttl, flush_interval, log_format, auth_token,
    /// shutdown_delay, meta_startup_timeout).
    #[arg(long, env = "SHOAL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Metadata store URL: `mysql://user:password@host:3306/db` or `sqlite:///path/meta.db`.
    #[arg(long, env = "SHOAL_META", hide_env_values = true)]
    pub meta: Option<String>,
    /// Shared data directory (segments; the WALs too unless --wal-dir) [default: ./shoal-data].
    #[arg(long, env = "SHOAL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Directory for the collections' WALs (`<dir>/c<id>`) [default: inside each collection's
    /// directory under --data-dir]. A writer taking over after a failover must see the same
    /// WAL directory (shared filesystem, or the same volume re-attached).
    #[arg(long, env = "SHOAL_WAL_DIR")]
    pub wal_dir: Option<PathBuf>,
    /// Address of the REST API (Milvus REST v2, as standalone) [default: 127.0.0.1:19530].
    #[arg(long, env = "SHOAL_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address of the internal Writer gRPC service [default: 127.0.0.1:19531].
    #[arg(long, env = "SHOAL_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    /// Address of /healthz, /readyz and /metrics [default: 127.0.0.1:9091].
    #[arg(long, env = "SHOAL_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Lease holder name [default: $POD_NAME, else the host name]. A restarted writer with the
    /// same id takes the lease over at once.
    #[arg(long, env = "SHOAL_NODE_ID")]
    pub node_id: Option<String>,
    /// Writer lease time-to-live, renewed every third of it, e.g. `10s` [default: 10s].
    #[arg(long, env = "SHOAL_LEASE_TTL")]
    pub lease_ttl: Option<String>,
    /// How often the growing buffer is sealed into a segment [default: 1s].
    #[arg(long, env = "SHOAL_FLUSH_INTERVAL")]
    pub flush_interval: Option<String>,
    /// Log format [default: text].
    #[arg(long, env = "SHOAL_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Require `Authorization: Bearer <user:password>` on every REST request.
    #[arg(long, env = "SHOAL_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// After SIGTERM: how long the process reports not ready on /readyz while it keeps
    /// serving, before it stops accepting and drains in-flight requests; `0s` for none. Must
    /// exceed the time the router and Kubernetes endpoints take to drop it [default: 5s].
    #[arg(long, env = "SHOAL_SHUTDOWN_DELAY")]
    pub shutdown_delay: Option<String>,
    /// How long start-up retries an unreachable metadata store (its name may not resolve yet
    /// on a fresh cluster) before exiting with the cause [default: 60s].
    #[arg(long, env = "SHOAL_META_STARTUP_TIMEOUT")]
    pub meta_startup_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WriterFile {
    meta: Option<String>,
    data_dir: Option<PathBuf>,
    wal_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    grpc_listen: Option<SocketAddr>,
    metrics_listen: Option<SocketAddr>,
    node_id: Option<String>,
    lease_ttl: Option<String>,
    flush_interval: Option<String>,
    log_format: Option<LogFormat>,
    auth_token: Option<String>,
    shutdown_delay: Option<String>,
    meta_startup_timeout: Option<String>,
}

/// Resolved writer configuration.
#[derive(Clone)]
pub struct WriterConfig {
    pub meta_url: String,
    pub data_dir: PathBuf,
    pub wal_dir: Option<PathBuf>,
    pub listen: SocketAddr,
    pub grpc_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub node_id: String,
    pub lease_ttl: Duration,
    pub flush_interval: Duration,
    pub log_format: LogFormat,
    pub auth_token: Option<String>,
    pub shutdown_delay: Duration,
    pub meta_startup_timeout: Duration,
}

impl std::fmt::Debug for WriterConfig {
    // Never print the token or the metadata URL's password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterConfig")
            .field("meta_url", &redact(&self.meta_url))
            .field("data_dir", &self.data_dir)
            .field("wal_dir", &self.wal_dir)
            .field("listen", &self.listen)
            .field("grpc_listen", &self.grpc_listen)
            .field("metrics_listen", &self.metrics_listen)
            .field("node_id", &self.node_id)
            .field("lease_ttl", &self.lease_ttl)
            .field("flush_interval", &self.flush_interval)
            .field("auth", &self.auth_token.is_some())
            .finish()
    }
}

impl WriterArgs {
    /// Merge flags/env with the TOML file and defaults.
    pub fn resolve(self) -> Result<WriterConfig, ConfigError> {
        let file: WriterFile = load_toml(self.config.as_deref())?;
        let lease_ttl = duration("lease_ttl", self.lease_ttl.or(file.lease_ttl), "10s")?;
        if lease_ttl < Duration::from_millis(300) {
            return Err(ConfigError::Invalid {
                key: "lease_ttl",
                reason: "must be at least 300ms".into(),
            });
        }
        let auth_token = auth_token(self.auth_token, file.auth_token)?;
        Ok(WriterConfig {
            meta_url: require_meta(self.meta.or(file.meta))?,
            data_dir: self
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("./shoal-data")),
            wal_dir: self.wal_dir.or(file.wal_dir),
            listen: self.listen.or(file.listen).unwrap_or(DEFAULT_LISTEN),
            grpc_listen: self
                .grpc_listen
                .or(file.grpc_listen)
                .unwrap_or(DEFAULT_GRPC_LISTEN),
            metrics_listen: self
                .metrics_listen
                .or(file.metrics_listen)
                .unwrap_or(DEFAULT_METRICS_LISTEN),
            node_id: self
                .node_id
                .or(file.node_id)
                .filter(|n| !n.trim().is_empty())
                .unwrap_or_else(default_node_id),
            lease_ttl,
            flush_interval: duration(
                "flush_interval",
                self.flush_interval.or(file.flush_interval),
                "1s",
            )?,
            log_format: self.log_format.or(file.log_format).unwrap_or_default(),
            auth_token,
            shutdown_delay: crate::config::shutdown_delay(
                self.shutdown_delay,
                file.shutdown_delay,
            )?,
            meta_startup_timeout: crate::config::meta_startup_timeout(
                self.meta_startup_timeout,
                file.meta_startup_timeout,
            )?,
        })
    }
}

/// Why the writer stopped.
#[derive(Debug, thiserror::Error)]
pub enum WriterRunError {
    #[error(transparent)]
    MetaStartup(#[from] MetaStartupError),
    #[error("failed to read the metadata store")]
    Meta(#[from] MetaError),
    #[error("writer lease failed")]
    Lease(#[from] LeaseError),
    #[error("failed to open the engine")]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Bind(#[from] crate::server::BindError),
    #[error("{what} server failed: {detail}")]
    Serve { what: &'static str, detail: String },
    /// The shutdown signal came during start-up (not an error: the process exits 0).
    #[error("stopped during start-up")]
    StoppedStarting,
    /// Another writer took the lease: this process must stop (the exit status is non-zero).
    #[error("writer lease lost (epoch {epoch}); stopped acknowledging writes")]
    LeaseLost { epoch: u64 },
}

// ---------------------------------------------------------------- the gRPC backend

/// The one mapping from a core error to the writer's answer, by its [`ErrorKind`]: a user error
/// is the request's fault (its message, without the causes), a fenced commit tells the router
/// this process is no longer the writer, anything else is a storage failure (with its causes).
fn core_err<E: Classify>(e: &E) -> WriteError {
    match e.kind() {
        ErrorKind::InvalidRequest
        | ErrorKind::NotFound
        | ErrorKind::AlreadyExists
        | ErrorKind::NotLoaded => WriteError::InvalidRequest(e.to_string()),
        ErrorKind::Fenced => WriteError::Fenced(e.to_string()),
        ErrorKind::Unavailable => WriteError::Storage(chain(e)),
    }
}

fn meta_err(e: MetaError) -> WriteError {
    core_err(&e)
}

fn collection_err(e: CollectionError) -> WriteError {
    match e {
        // The metadata store's own message (a fenced commit names the epochs).
        CollectionError::Meta(m) => meta_err(m),
        e => core_err(&e),
    }
}

fn engine_err(e: EngineError) -> WriteError {
    match e {
        // The variants that name a collection answer with their own codes and the bare name.
        EngineError::CollectionNotFound(n) => WriteError::CollectionNotFound(n),
        EngineError::CollectionExists(n) => WriteError::CollectionExists(n),
        EngineError::InvalidParam { name, reason } => {
            WriteError::InvalidRequest(format!("{name}: {reason}"))
        }
        EngineError::Meta(m) => meta_err(m),
        EngineError::Collection(c) => collection_err(c),
        e @ EngineError::Io { .. } => core_err(&e),
    }
}

/// REST-layer errors from the shared index handlers, by the kind the REST error kept from its
/// cause (a fenced commit stays recognisable without reading the message).
fn api_err(e: ApiError) -> WriteError {
    match e.kind {
        ErrorKind::NotFound => WriteError::CollectionNotFound(e.message),
        ErrorKind::Fenced => WriteError::Fenced(e.message),
        ErrorKind::Unavailable => WriteError::Storage(e.message),
        ErrorKind::InvalidRequest | ErrorKind::AlreadyExists | ErrorKind::NotLoaded => {
            WriteError::InvalidRequest(e.message)
        }
    }
}

/// Convert gRPC rows to a batch with the same rules as REST `entities/insert|upsert`.
fn rows_to_batch(c: &Collection, rows: &[Row], upsert: bool) -> Result<RowBatch, WriteError> {
    let s = c.schema();
    if rows.is_empty() {
        return Err(WriteError::InvalidRequest(
            "rows: must contain at least one row".into(),
        ));
    }
    let auto = s.auto_id && !upsert;
    let mut b = RowBatch::new(s.dim);
    b.vectors.reserve(rows.len() * s.dim);
    let mut seen = std::collections::HashSet::new();
    for (i, row) in rows.iter().enumerate() {
        let bad = |reason: String| WriteError::InvalidRequest(format!("invalid row {i}: {reason}"));
        match (auto, row.id) {
            (true, Some(_)) => {
                return Err(bad(format!(
                    "{} is generated (autoID); do not send it",
                    s.pk_field
                )));
            }
            (true, None) => {}
            (false, None) => return Err(bad(format!("missing primary key {}", s.pk_field))),
            (false, Some(id)) => {
                if !seen.insert(id) {
                    return Err(bad(format!("duplicate primary key {id} in one request")));
                }
                b.ids.push(id);
            }
        }
        if row.vector.len() != s.dim {
            return Err(bad(format!(
                "vector has {} components, the collection's dimension is {}",
                row.vector.len(),
                s.dim
            )));
        }
        b.vectors.extend_from_slice(&row.vector);
        let fields = if row.dynamic_json.is_empty() {
            Map::new()
        } else {
            match serde_json::from_slice::<Value>(&row.dynamic_json) {
                Ok(Value::Object(m)) => m,
                Ok(_) => return Err(bad("dynamic_json must be a JSON object".into())),
                Err(e) => return Err(bad(format!("dynamic_json is not valid JSON: {e}"))),
            }
        };
        if !fields.is_empty() && !s.dynamic {
            return Err(bad(
                "the collection has no dynamic fields; send only the id and the vector".into(),
            ));
        }
        if let Some(k) = fields
            .keys()
            .find(|k| **k == s.pk_field || **k == s.vector_field)
        {
            return Err(bad(format!(
                "{k:?} must not appear among the dynamic fields"
            )));
        }
        b.fields.push(if fields.is_empty() {
            Vec::new()
        } else {
            serde_json::to_vec(&Value::Object(fields))
                .map_err(|e| bad(format!("dynamic fields: {e}")))?
        });
    }
    if auto {
        b.ids = c.alloc_ids(rows.len());
    }
    Ok(b)
}

/// [`WriterBackend`] over the engine and the REST state it shares with the REST API, so both
/// front doors run the same code (index definitions go through the REST index handlers).
pub struct EngineWriter {
    state: Arc<AppState>,
}

impl EngineWriter {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    fn engine(&self) -> &Engine {
        &self.state.engine
    }

    fn version(&self) -> u64 {
        self.engine().meta().last_version()
    }

    fn collection(&self, name: &str) -> Result<Arc<Collection>, WriteError> {
        self.engine().collection(name).map_err(engine_err)
    }
}

const CTX: Ctx = Ctx {
    int64_numbers: true,
};

impl WriterBackend for EngineWriter {
    async fn create_collection(
        &self,
        r: CreateCollectionRequest,
        _epoch: u64,
    ) -> Result<u64, WriteError> {
        let metric = if r.metric_type.trim().is_empty() {
            Metric::COSINE
        } else {
            r.metric_type
                .parse::<Metric>()
                .map_err(|e| WriteError::InvalidRequest(format!("metric_type: {e}")))?
        };
        let or = |v: String, d: &str| if v.is_empty() { d.to_string() } else { v };
        let schema = Schema {
            name: r.collection,
            dim: r.dimension as usize,
            metric,
            auto_id: r.auto_id,
            pk_field: or(r.primary_field_name, "id"),
            vector_field: or(r.vector_field_name, "vector"),
            dynamic: r.enable_dynamic_field,
        };
        // The engine writes the default index row too, all or nothing.
        self.engine()
            .create_collection(schema)
            .await
            .map_err(engine_err)?;
        Ok(self.version())
    }

    async fn drop_collection(&self, name: String, _epoch: u64) -> Result<u64, WriteError> {
        let c = self.collection(&name)?;
        self.state.indexes.forget(&c);
        self.engine()
            .drop_collection(&name)
            .await
            .map_err(engine_err)?;
        Ok(self.version())
    }

    async fn insert(&self, r: InsertRequest, _epoch: u64) -> Result<Vec<i64>, WriteError> {
        let c = self.collection(&r.collection)?;
        let b = rows_to_batch(&c, &r.rows, r.upsert)?;
        let n = b.len();
        let ids = c.upsert(b).await.map_err(collection_err)?;
        self.state.metrics.rows_inserted(n);
        self.state.indexes.maybe_kick(&c);
        Ok(ids)
    }

    async fn delete(
        &self,
        collection: String,
        filter: String,
        _epoch: u64,
    ) -> Result<u64, WriteError> {
        let c = self.collection(&collection)?;
        if filter.trim().is_empty() {
            return Err(WriteError::InvalidRequest(
                "filter: required (e.g. \"id in [1, 2]\")".into(),
            ));
        }
        let f = Filter::parse(&filter)
            .map_err(|e| WriteError::InvalidRequest(format!("filter: {e}")))?;
        let ids = c.ids_matching(&f);
        let n = c.delete(ids).await.map_err(collection_err)?;
        Ok(n as u64)
    }

    async fn flush(&self, collection: Option<String>, _epoch: u64) -> Result<u64, WriteError> {
        let targets = match collection {
            Some(name) => vec![self.collection(&name)?],
            None => self.engine().all(),
        };
        for c in targets {
            c.flush().await.map_err(collection_err)?;
            self.state.indexes.kick(&c);
        }
        Ok(self.version())
    }

    async fn set_loaded(
        &self,
        collection: String,
        loaded: bool,
        _epoch: u64,
    ) -> Result<u64, WriteError> {
        self.engine()
            .set_loaded(&collection, loaded)
            .await
            .map_err(engine_err)?;
        Ok(self.version())
    }

    async fn create_index(&self, r: CreateIndexRequest, _epoch: u64) -> Result<u64, WriteError> {
        let mut p = Map::new();
        p.insert("fieldName".into(), Value::from(r.field_name));
        for (k, v) in [
            ("indexName", r.index_name),
            ("indexType", r.index_type),
            ("metricType", r.metric_type),
        ] {
            if !v.trim().is_empty() {
                p.insert(k.into(), Value::from(v));
            }
        }
        let params = if r.params_json.is_empty() {
            Value::Object(Map::new())
        } else {
            serde_json::from_slice::<Value>(&r.params_json)
                .map_err(|e| WriteError::InvalidRequest(format!("params_json: {e}")))?
        };
        p.insert("params".into(), params);
        let mut m = Map::new();
        m.insert("collectionName".into(), Value::from(r.collection));
        m.insert("indexParams".into(), json!([Value::Object(p)]));
        crate::api::indexes::create(self.state.clone(), CTX, m)
            .await
            .map_err(api_err)?;
        Ok(self.version())
    }

    async fn drop_index(
        &self,
        collection: String,
        index_name: String,
        _epoch: u64,
    ) -> Result<u64, WriteError> {
        let mut m = Map::new();
        m.insert("collectionName".into(), Value::from(collection));
        m.insert("indexName".into(), Value::from(index_name));
        crate::api::indexes::drop(self.state.clone(), CTX, m)
            .await
            .map_err(api_err)?;
        Ok(self.version())
    }

    fn catalog_version(&self) -> u64 {
        self.version()
    }
}

// ---------------------------------------------------------------- the process

/// REST answer while this process may not acknowledge writes.
fn not_the_writer(e: &LeaseError) -> axum::response::Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        json!({"code": code::INTERNAL, "message": format!("this process is not the writer: {e}")})
            .to_string(),
    )
        .into_response()
}

struct Ops {
    state: Arc<AppState>,
    keeper: LeaseKeeper,
    /// The WAL directory accepts a write + fsync + remove.
    wal: DirProbe,
    /// The shared data directory's filesystem answers (with `--wal-dir`; without, `wal` covers it).
    data: Option<DirProbe>,
}

impl Ops {
    /// Ready when this process holds the lease, the WAL directory is writable, the data
    /// directory's filesystem answers and the metadata store answers.
    async fn ready(&self) -> Result<(), String> {
        if let Err(e) = self.keeper.check() {
            return Err(format!("not the writer: {e}"));
        }
        // Concurrently: the kubelet's default probe timeout is 1 s for the whole answer.
        let data = async {
            match &self.data {
                Some(d) => d.check().await,
                None => Ok(()),
            }
        };
        let meta =
            tokio::time::timeout(Duration::from_millis(500), self.state.engine.meta().ping());
        let (wal, data, meta) = tokio::join!(self.wal.check(), data, meta);
        wal?;
        data?;
        match meta {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("metadata store unavailable: {}", chain(&e))),
            Err(_) => Err("metadata store unavailable: no answer within 500ms".into()),
        }
    }
}

/// `/healthz`, `/readyz` (see [`Ops::ready`]; 503 with the reason), `/metrics`.
fn ops_router(ops: Arc<Ops>) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(o): State<Arc<Ops>>| async move {
                match o.ready().await {
                    Ok(()) => (StatusCode::OK, "ready".to_string()),
                    Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason),
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(o): State<Arc<Ops>>| async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    {
                        o.state.metrics.update_collections(&o.state.engine);
                        o.state.metrics.render()
                    },
                )
            }),
        )
        .with_state(ops)
}

/// Wait until the lease can be taken, then take it; also returns the instant from before the
/// successful attempt (the keeper's local deadline counts from it).
async fn acquire(
    pool: &sqlx::AnyPool,
    node_id: &str,
    ttl: Duration,
    poll: Duration,
) -> Result<(lease::Lease, tokio::time::Instant), LeaseError> {
    let mut logged = false;
    loop {
        let t = tokio::time::Instant::now();
        match lease::try_acquire(pool, node_id, ttl, lease::now_ms()).await {
            Ok(l) => return Ok((l, t)),
            Err(LeaseError::Held {
                holder,
                expires_at_ms,
            }) => {
                if !logged {
                    tracing::info!(%holder, expires_at_ms, "writer lease held by another writer; waiting");
                    logged = true;
                }
                tokio::time::sleep(poll).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Connect to the metadata store (retrying until the start-up deadline) and wait for the
/// lease; `life`'s `/readyz` says which step it is at.
async fn start(
    cfg: &WriterConfig,
    life: &Lifecycle,
) -> Result<(MetaStore, lease::Lease, tokio::time::Instant), WriterRunError> {
    let meta = connect_meta(
        &cfg.meta_url,
        MetaAccess::Migrate,
        cfg.meta_startup_timeout,
        life,
    )
    .await?;
    let poll = (cfg.lease_ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(2));
    tracing::info!(node_id = %cfg.node_id, meta = %redact(&cfg.meta_url), "waiting for the writer lease");
    life.set_starting("waiting for the writer lease");
    let (lease, taken_at) = acquire(meta.pool(), &cfg.node_id, cfg.lease_ttl, poll).await?;
    Ok((meta, lease, taken_at))
}

/// Resolves when the keeper reports that another writer took the lease.
async fn lease_lost(keeper: LeaseKeeper) -> u64 {
    loop {
        if let Err(LeaseError::Lost { epoch }) = keeper.check() {
            return epoch;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Run the writer until `shutdown` resolves (clean exit, lease released) or the lease is lost
/// (`Err(LeaseLost)`: the caller exits non-zero).
pub async fn run(
    cfg: WriterConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WriterRunError> {
    // The ops listener answers from the start: live, and not ready until the writer serves.
    let life = Lifecycle::starting("connecting to the metadata store");
    let ops_l = crate::server::bind(cfg.metrics_listen).await?;
    let stop = crate::server::StopSignal::default();
    let ops_task = crate::server::spawn_http(ops_l, life.router(), stop.wait());
    let mut shutdown = std::pin::pin!(shutdown);
    let started = tokio::select! {
        r = start(&cfg, &life) => r,
        () = &mut shutdown => {
            tracing::info!("stopped during start-up");
            Err(WriterRunError::StoppedStarting)
        }
    };
    let (meta, lease, taken_at) = match started {
        Ok(s) => s,
        Err(e) => {
            stop.stop();
            stop_servers([("ops", ops_task)]).await;
            return match e {
                WriterRunError::StoppedStarting => Ok(()),
                e => Err(e),
            };
        }
    };
    let pool = meta.pool().clone();
    // The successor's renewals must never outlive the store's expiry: stop acknowledging a
    // quarter of the TTL before it.
    let keeper = LeaseKeeper::new(&lease, cfg.lease_ttl, cfg.lease_ttl / 4, taken_at);
    let renewer = tokio::spawn(keeper.clone().run(pool.clone(), lease.clone()));
    meta.set_fence(lease.epoch);
    meta.catalog_version().await?;
    tracing::info!(epoch = lease.epoch, node_id = %cfg.node_id, "writer lease acquired; opening collections (replaying WALs)");
    life.set_starting("opening collections (replaying WALs)");
    let engine = Engine::open_with_meta(
        &EngineConfig {
            data_dir: cfg.data_dir.clone(),
            meta_url: None,
            flush_interval: cfg.flush_interval,
            storage: StorageOptions::default(),
        },
        meta.clone(),
        cfg.wal_dir.clone(),
    )
    .await?;
    let (state, rest, _standalone_ops) = crate::api::build_local(
        engine.clone(),
        cfg.auth_token.clone(),
        crate::api::metrics::Metrics::new(),
    );
    let flusher = engine.spawn_flusher(cfg.flush_interval);

    // REST acknowledges writes only under a valid lease, like gRPC.
    let k = keeper.clone();
    let rest = rest.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let k = k.clone();
            async move {
                if let Err(e) = k.check() {
                    return not_the_writer(&e);
                }
                let resp = next.run(req).await;
                match k.check() {
                    Ok(_) => resp,
                    Err(e) => not_the_writer(&e),
                }
            }
        },
    ));
    let ops = ops_router(Arc::new(Ops {
        state: state.clone(),
        keeper: keeper.clone(),
        wal: DirProbe::new(
            "WAL directory",
            cfg.wal_dir.clone().unwrap_or_else(|| cfg.data_dir.clone()),
            DirCheck::Writable,
        ),
        data: cfg
            .wal_dir
            .as_ref()
            .map(|_| DirProbe::new("data directory", cfg.data_dir.clone(), DirCheck::Filesystem)),
    }));
    let svc = WriterService::new(
        Arc::new(EngineWriter::new(state.clone())),
        keeper.clone(),
        cfg.node_id.clone(),
    );
    let rest_l = crate::server::bind(cfg.listen).await?;
    let grpc_l = crate::server::bind(cfg.grpc_listen).await?;
    tracing::info!(rest = %cfg.listen, grpc = %cfg.grpc_listen, metrics = %cfg.metrics_listen,
        data_dir = %cfg.data_dir.display(), epoch = lease.epoch, "shoal writer ready");

    life.serve(ops);
    let rest_task = crate::server::spawn_http(rest_l, rest, stop.wait());
    // The router forwards REST inserts of up to the REST body limit (256 MiB) in one message;
    // tonic's 4 MiB default refused a 10,000 x 128-d insert.
    let grpc = tonic::service::Routes::new(
        WriterServer::new(svc)
            .max_decoding_message_size(crate::api::rest::MAX_BODY_BYTES)
            .max_encoding_message_size(crate::api::rest::MAX_BODY_BYTES),
    );
    let grpc_task = spawn_grpc(grpc_l, grpc, stop.wait());

    let outcome = tokio::select! {
        () = life.shutdown_after(&mut shutdown, cfg.shutdown_delay) => Ok(()),
        epoch = lease_lost(keeper.clone()) => Err(WriterRunError::LeaseLost { epoch }),
    };
    stop.stop();
    flusher.abort();
    stop_servers([("REST", rest_task), ("ops", ops_task), ("gRPC", grpc_task)]).await;
    match outcome {
        Ok(()) => {
            tracing::info!("shutting down: flushing collections and releasing the lease");
            engine.shutdown().await;
            renewer.abort();
            if let Err(e) = lease::release(&pool, &lease).await {
                tracing::warn!(error = %e, "releasing the writer lease failed; a successor waits for its expiry");
            }
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "writer lease lost; exiting without flushing (the WAL keeps acknowledged writes for the new writer)");
            renewer.abort();
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        role: Role,
    }

    #[derive(clap::Subcommand)]
    enum Role {
        Writer(WriterArgs),
        Reader(crate::roles::reader::ReaderArgs),
    }

    fn parse(args: &[&str]) -> Role {
        Cli::try_parse_from(std::iter::once("shoal-engine").chain(args.iter().copied()))
            .unwrap()
            .role
    }

    #[test]
    fn writer_flags_file_and_defaults_resolve_and_the_metadata_url_is_required() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.toml");
        std::fs::write(&p, "wal_dir = \"/wal\"\nlease_ttl = \"4s\"\n").unwrap();
        let Role::Writer(w) = parse(&[
            "writer",
            "--meta",
            "mysql://u:secret@db:3306/shoal",
            "--config",
            p.to_str().unwrap(),
            "--node-id",
            "w-0",
        ]) else {
            panic!("not the writer");
        };
        let c = w.resolve().unwrap();
        assert_eq!(c.wal_dir, Some(PathBuf::from("/wal")));
        assert_eq!(c.lease_ttl, Duration::from_secs(4));
        assert_eq!(c.grpc_listen.port(), 19531);
        assert_eq!(c.node_id, "w-0");
        assert!(!format!("{c:?}").contains("secret"), "{c:?}");

        let missing = WriterArgs::default().resolve().unwrap_err().to_string();
        assert!(missing.contains("meta"), "{missing}");
        let bad = WriterArgs {
            meta: Some("postgres://x".into()),
            ..Default::default()
        };
        assert!(bad.resolve().is_err());
        let short = WriterArgs {
            meta: Some("sqlite://m.db".into()),
            lease_ttl: Some("100ms".into()),
            ..Default::default()
        };
        assert!(short.resolve().is_err());
    }

    #[test]
    fn reader_accepts_the_operators_gpu_flags() {
        let Role::Reader(r) = parse(&[
            "reader",
            "--meta",
            "mysql://u:p@db/shoal",
            "--node-id",
            "reader-abc",
            "--gpu-devices",
            "0,1",
            "--gpu-memory-budget",
            "8Gi",
        ]) else {
            panic!("not the reader");
        };
        let c = r.resolve().unwrap();
        assert_eq!(
            c.gpu.gpu_devices,
            crate::gpu::args::DeviceSelection::List(vec![0, 1])
        );
        assert_eq!(c.gpu.gpu_memory_budget, 8 << 30);
        assert_eq!(c.poll_interval, Duration::from_secs(1));
        assert_eq!(c.node_id, "reader-abc");
    }
}
