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

pub mod config;
pub mod lease;
pub mod service;

use crate::api::error::{ApiError, code};
use crate::api::rest::{AppState, Ctx};
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
use config::WriterConfig;
use lease::{LeaseError, LeaseKeeper};
use serde_json::{Map, Value, json};
use service::{WriteError, WriterBackend, WriterService};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

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
