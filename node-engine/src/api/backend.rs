//! What the REST layer needs from whatever serves the data: the [`Backend`] trait, its typed
//! requests and answers, and [`LocalBackend`], the in-process implementation over
//! [`Engine`] (the standalone role and the writer use it).
//!
//! Owns the split between parsing and serving: `rest.rs`/`indexes.rs` parse and validate every
//! request in full (Milvus codes 1100/1801/1802/1804, the Int64 header, auth) and hand a
//! backend typed values; a backend only answers them and maps its own failures to
//! [`ApiError`]. The router's backend (`crate::roles::router::backend`) implements the same
//! trait by forwarding to the writer and fanning out to readers, so both roles answer the same
//! request with the same code.

use super::error::ApiError;
use super::indexes::IndexService;
use super::metrics::Metrics;
use crate::core::engine::Engine;
use crate::core::filter::Filter;
use crate::core::index::SearchParams;
use crate::core::meta::IndexRecord;
use crate::core::storage::collection::{
    CollectionError, CollectionRead, CollectionWrite, Hit, Output, RowOut, Schema,
};
use crate::core::storage::wal::RowBatch;
use std::future::Future;
use std::sync::Arc;

/// A collection as the REST layer needs it to validate a request.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectionMeta {
    pub schema: Schema,
    /// Internal id (shown as `collectionID`).
    pub id: i64,
    pub loaded: bool,
}

/// `collections/describe` beyond the schema.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CollectionDetails {
    pub indexes: Vec<IndexRecord>,
    /// Bytes of loaded ANN index files per index name (absent = none loaded here).
    pub index_bytes: std::collections::BTreeMap<String, u64>,
    pub memory_bytes: usize,
    /// (segment id, reason) of segments that failed verification.
    pub corrupt_segments: Vec<(u64, String)>,
}

/// A parsed, validated filter: the text (what travels to other processes) and its tree.
#[derive(Debug, Clone)]
pub struct FilterExpr {
    pub text: String,
    pub parsed: Filter,
}

/// Which fields a read returns besides the primary key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadFields {
    pub vector: bool,
    /// Every dynamic field (`*`).
    pub all_dynamic: bool,
    /// Dynamic fields by name.
    pub names: Vec<String>,
}

impl ReadFields {
    pub fn output(&self) -> Output {
        Output {
            vector: self.vector,
            fields: self.all_dynamic || !self.names.is_empty(),
        }
    }
}

/// Validated rows to write. `batch.ids` is empty when the backend assigns ids (autoID insert);
/// `rows` is the number of rows either way.
#[derive(Debug, Clone)]
pub struct WriteRows {
    pub batch: RowBatch,
    pub rows: usize,
    /// Replace rows with the same id.
    pub upsert: bool,
}

/// A validated search.
#[derive(Debug, Clone)]
pub struct SearchRequest {
    /// `nq * dim` floats, row-major.
    pub queries: Vec<f32>,
    pub nq: usize,
    /// Per-query hits wanted: the user's `offset + limit` (the REST layer skips `offset`).
    pub top_k: usize,
    pub params: SearchParams,
    pub filter: Option<FilterExpr>,
    pub fields: ReadFields,
}

/// A validated filter query (rows, or the count).
#[derive(Debug, Clone)]
pub struct QueryRequest {
    pub filter: Option<FilterExpr>,
    pub offset: usize,
    pub limit: usize,
    pub fields: ReadFields,
}

/// `indexes/describe` progress.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexProgress {
    pub indexed_rows: u64,
    pub total_rows: u64,
    pub pending_rows: u64,
    /// Segments whose build failed for the current definition, with the reason.
    pub fail_reason: String,
    /// Bytes of loaded ANN indexes.
    pub index_bytes: u64,
    pub indexed_segments: u64,
    /// Sealed segments searched with FLAT (small, pending, failed or corrupt).
    pub flat_segments: u64,
    /// Index files that failed verification at load since start, and the latest reasons.
    pub load_failures: u64,
    pub load_failure_reasons: Vec<(u64, String)>,
}

/// Everything the REST API does, over some storage. Methods get validated input; every error
/// is already an [`ApiError`] with its Milvus code (100 for an unknown collection).
pub trait Backend: Send + Sync + 'static {
    /// The collection's schema and load state. Errors: code 100 when it does not exist.
    fn collection(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<CollectionMeta, ApiError>> + Send;
    fn create_collection(
        &self,
        schema: Schema,
    ) -> impl Future<Output = Result<(), ApiError>> + Send;
    fn describe_collection(
        &self,
        c: &CollectionMeta,
    ) -> impl Future<Output = Result<CollectionDetails, ApiError>> + Send;
    fn list_collections(&self) -> impl Future<Output = Result<Vec<String>, ApiError>> + Send;
    fn drop_collection(
        &self,
        c: &CollectionMeta,
    ) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// Live rows (`collections/get_stats`).
    fn row_count(&self, c: &CollectionMeta) -> impl Future<Output = Result<u64, ApiError>> + Send;
    fn set_loaded(
        &self,
        c: &CollectionMeta,
        loaded: bool,
    ) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// Returns once everything acknowledged before is durable in segments and searchable.
    fn flush(&self, c: &CollectionMeta) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// Durably write rows; returns their ids in request order.
    fn write(
        &self,
        c: &CollectionMeta,
        rows: WriteRows,
    ) -> impl Future<Output = Result<Vec<i64>, ApiError>> + Send;
    /// Delete the rows matching `filter`; returns how many were live.
    fn delete(
        &self,
        c: &CollectionMeta,
        filter: FilterExpr,
    ) -> impl Future<Output = Result<u64, ApiError>> + Send;
    /// Rows by id (missing ids are skipped), in request order.
    fn get(
        &self,
        c: &CollectionMeta,
        ids: Vec<i64>,
        fields: ReadFields,
    ) -> impl Future<Output = Result<Vec<RowOut>, ApiError>> + Send;
    /// Rows matching the filter after `offset`, at most `limit`.
    fn query(
        &self,
        c: &CollectionMeta,
        q: QueryRequest,
    ) -> impl Future<Output = Result<Vec<RowOut>, ApiError>> + Send;
    /// Number of live rows matching the filter.
    fn count(
        &self,
        c: &CollectionMeta,
        filter: Option<FilterExpr>,
    ) -> impl Future<Output = Result<u64, ApiError>> + Send;
    /// Per query, the best `top_k` hits with user-facing scores, best first.
    fn search(
        &self,
        c: &CollectionMeta,
        s: SearchRequest,
    ) -> impl Future<Output = Result<Vec<Vec<Hit>>, ApiError>> + Send;
    fn indexes(
        &self,
        c: &CollectionMeta,
    ) -> impl Future<Output = Result<Vec<IndexRecord>, ApiError>> + Send;
    /// Store validated index definitions (all or nothing as far as validation goes).
    fn create_indexes(
        &self,
        c: &CollectionMeta,
        recs: Vec<IndexRecord>,
    ) -> impl Future<Output = Result<(), ApiError>> + Send;
    fn drop_index(
        &self,
        c: &CollectionMeta,
        index_name: &str,
    ) -> impl Future<Output = Result<(), ApiError>> + Send;
    fn index_progress(
        &self,
        c: &CollectionMeta,
        index: &IndexRecord,
    ) -> impl Future<Output = Result<IndexProgress, ApiError>> + Send;
    /// `/readyz`: `Err(reason)` while the backend cannot serve.
    fn ready(&self) -> impl Future<Output = Result<(), String>> + Send;
    /// Refresh backend-specific gauges before `/metrics` renders.
    fn update_gauges(&self, metrics: &Metrics);
}

/// The in-process backend over the storage core.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    pub engine: Arc<Engine>,
    pub indexes: IndexService,
}

impl LocalBackend {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self {
            indexes: IndexService::new(engine.clone()),
            engine,
        }
    }

    fn open(
        &self,
        c: &CollectionMeta,
    ) -> Result<Arc<crate::core::storage::collection::Collection>, ApiError> {
        Ok(self.engine.collection(&c.schema.name)?)
    }
}

fn loaded(c: &CollectionMeta) -> Result<(), ApiError> {
    if c.loaded {
        Ok(())
    } else {
        Err(CollectionError::NotLoaded(c.schema.name.clone()).into())
    }
}

fn blocking_err(e: tokio::task::JoinError) -> ApiError {
    ApiError::new(
        super::error::code::INTERNAL,
        format!("internal error: search task: {e}"),
    )
}

impl Backend for LocalBackend {
    async fn collection(&self, name: &str) -> Result<CollectionMeta, ApiError> {
        let c = self.engine.collection(name)?;
        Ok(CollectionMeta {
            schema: c.schema().clone(),
            id: c.collection_id(),
            loaded: c.is_loaded(),
        })
    }

    async fn create_collection(&self, schema: Schema) -> Result<(), ApiError> {
        // The engine writes the default index row too, all or nothing.
        self.engine.create_collection(schema).await?;
        Ok(())
    }

    async fn describe_collection(&self, c: &CollectionMeta) -> Result<CollectionDetails, ApiError> {
        let col = self.open(c)?;
        let stats = col.stats();
        let p = col.index_progress();
        Ok(CollectionDetails {
            index_bytes: p
                .index
                .map(|(name, _)| (name, p.index_bytes as u64))
                .into_iter()
                .collect(),
            indexes: self.engine.meta().indexes(c.id).await?,
            memory_bytes: stats.memory_bytes,
            corrupt_segments: stats.corrupt_segments,
        })
    }

    async fn list_collections(&self) -> Result<Vec<String>, ApiError> {
        Ok(self.engine.list())
    }

    async fn drop_collection(&self, c: &CollectionMeta) -> Result<(), ApiError> {
        let col = self.open(c)?;
        self.indexes.forget(&col);
        self.engine.drop_collection(&c.schema.name).await?;
        Ok(())
    }

    async fn row_count(&self, c: &CollectionMeta) -> Result<u64, ApiError> {
        Ok(self.open(c)?.stats().live_rows as u64)
    }

    async fn set_loaded(&self, c: &CollectionMeta, loaded: bool) -> Result<(), ApiError> {
        self.engine.set_loaded(&c.schema.name, loaded).await?;
        Ok(())
    }

    async fn flush(&self, c: &CollectionMeta) -> Result<(), ApiError> {
        let col = self.open(c)?;
        col.flush().await?;
        self.indexes.kick(&col);
        Ok(())
    }

    async fn write(&self, c: &CollectionMeta, rows: WriteRows) -> Result<Vec<i64>, ApiError> {
        let col = self.open(c)?;
        let mut b = rows.batch;
        if b.ids.is_empty() {
            b.ids = col.alloc_ids(rows.rows);
        }
        let ids = col.upsert(b).await?;
        if !rows.upsert {
            self.indexes.maybe_kick(&col);
        }
        Ok(ids)
    }

    async fn delete(&self, c: &CollectionMeta, filter: FilterExpr) -> Result<u64, ApiError> {
        let col = self.open(c)?;
        let ids = col.ids_matching(&filter.parsed);
        Ok(col.delete(ids).await? as u64)
    }

    async fn get(
        &self,
        c: &CollectionMeta,
        ids: Vec<i64>,
        fields: ReadFields,
    ) -> Result<Vec<RowOut>, ApiError> {
        let col = self.open(c)?;
        loaded(c)?;
        Ok(col.get(&ids, fields.output()))
    }

    async fn query(&self, c: &CollectionMeta, q: QueryRequest) -> Result<Vec<RowOut>, ApiError> {
        let col = self.open(c)?;
        loaded(c)?;
        Ok(col.query(
            q.filter.as_ref().map(|f| &f.parsed),
            q.offset,
            q.limit,
            q.fields.output(),
        ))
    }

    async fn count(&self, c: &CollectionMeta, filter: Option<FilterExpr>) -> Result<u64, ApiError> {
        let col = self.open(c)?;
        loaded(c)?;
        Ok(col.count(filter.as_ref().map(|f| &f.parsed)) as u64)
    }

    async fn search(
        &self,
        c: &CollectionMeta,
        s: SearchRequest,
    ) -> Result<Vec<Vec<Hit>>, ApiError> {
        let col = self.open(c)?;
        loaded(c)?;
        let out = s.fields.output();
        let hits = tokio::task::spawn_blocking(move || {
            col.search(
                &s.queries,
                s.top_k,
                &s.params,
                s.filter.as_ref().map(|f| &f.parsed),
                out,
            )
        })
        .await
        .map_err(blocking_err)??;
        Ok(hits)
    }

    async fn indexes(&self, c: &CollectionMeta) -> Result<Vec<IndexRecord>, ApiError> {
        Ok(self.engine.meta().indexes(c.id).await?)
    }

    async fn create_indexes(
        &self,
        c: &CollectionMeta,
        recs: Vec<IndexRecord>,
    ) -> Result<(), ApiError> {
        use crate::core::engine::EngineError;
        use crate::core::index::IndexError;
        use crate::core::storage::collection::CollectionError;
        self.engine
            .put_indexes(&c.schema.name, &recs)
            .await
            .map_err(|e| match e {
                EngineError::InvalidParam { name, reason } => {
                    ApiError::invalid(&format!("indexParams.{name}"), reason)
                }
                EngineError::Collection(CollectionError::Index(IndexError::InvalidParam {
                    name,
                    reason,
                })) => ApiError::invalid(&format!("indexParams.params.{name}"), reason),
                other => other.into(),
            })
    }

    async fn drop_index(&self, c: &CollectionMeta, index_name: &str) -> Result<(), ApiError> {
        self.engine.drop_index(&c.schema.name, index_name).await?;
        Ok(())
    }

    async fn index_progress(
        &self,
        c: &CollectionMeta,
        index: &IndexRecord,
    ) -> Result<IndexProgress, ApiError> {
        let p = self.open(c)?.index_progress();
        let is_ann = p
            .index
            .as_ref()
            .is_some_and(|(n, _)| *n == index.index_name);
        if !is_ann {
            // FLAT searches every row exactly as soon as it is written.
            return Ok(IndexProgress {
                indexed_rows: p.total_rows as u64,
                total_rows: p.total_rows as u64,
                ..IndexProgress::default()
            });
        }
        Ok(IndexProgress {
            indexed_rows: p.indexed_rows as u64,
            total_rows: p.total_rows as u64,
            pending_rows: p.pending_rows as u64,
            fail_reason: p
                .failed
                .iter()
                .map(|(seg, why)| format!("segment {seg}: {why}"))
                .collect::<Vec<_>>()
                .join("; "),
            index_bytes: p.index_bytes as u64,
            indexed_segments: p.indexed_segments as u64,
            flat_segments: p.flat_segments as u64,
            load_failures: p.load_failures,
            load_failure_reasons: p.load_failure_reasons,
        })
    }

    async fn ready(&self) -> Result<(), String> {
        self.engine
            .meta()
            .ping()
            .await
            .map_err(|e| format!("metadata store unavailable: {e}"))
    }

    fn update_gauges(&self, metrics: &Metrics) {
        metrics.update_collections(&self.engine);
    }
}
