//! The collection catalogue: creates, opens, drops and looks up collections, backed by the
//! metadata store and the data directory, and runs the periodic flusher. The standalone role
//! and the writer role build on this; it knows nothing of HTTP or gRPC.
//!
//! The writer role opens it with [`Engine::open_with_meta`]: a metadata store already fenced
//! with the writer's lease epoch, and optionally a separate WAL root (`<wal_root>/c<id>`).

use crate::index::IndexError;
use crate::indexer::IndexBuilder;
use crate::meta::{CollectionRecord, IndexRecord, MetaError, MetaStore};
use crate::storage::ann::AnnDef;
use crate::storage::collection::{
    Collection, CollectionError, CollectionRead, CollectionWrite, Schema, StorageOptions,
    collection_dir, wal_dir_of,
};
use crate::types::{IndexType, Metric};
use parking_lot::RwLock;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("collection {0:?} not found")]
    CollectionNotFound(String),
    #[error("collection {0:?} already exists")]
    CollectionExists(String),
    #[error("invalid parameter {name}: {reason}")]
    InvalidParam { name: String, reason: String },
    #[error("failed to {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error(transparent)]
    Collection(#[from] CollectionError),
}

impl crate::error::Classify for EngineError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            EngineError::CollectionNotFound(_) => ErrorKind::NotFound,
            EngineError::CollectionExists(_) => ErrorKind::AlreadyExists,
            EngineError::InvalidParam { .. } => ErrorKind::InvalidRequest,
            EngineError::Io { .. } => ErrorKind::Unavailable,
            EngineError::Meta(e) => e.kind(),
            EngineError::Collection(e) => e.kind(),
        }
    }
}

impl From<IndexError> for EngineError {
    fn from(e: IndexError) -> Self {
        EngineError::Collection(CollectionError::Index(e))
    }
}

/// Where the engine keeps its data and how it flushes.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub data_dir: PathBuf,
    /// `None` = SQLite at `<data_dir>/meta.db`.
    pub meta_url: Option<String>,
    pub flush_interval: Duration,
    pub storage: StorageOptions,
}

/// Check a collection or field name the way Milvus does: a letter or `_` first, then letters,
/// digits and `_`, at most 255 characters.
pub fn validate_name(what: &str, name: &str) -> Result<(), EngineError> {
    let bad = |reason: &str| EngineError::InvalidParam {
        name: what.into(),
        reason: format!("{name:?} {reason}"),
    };
    let mut chars = name.chars();
    match chars.next() {
        None => return Err(bad("is empty")),
        Some(c) if !(c.is_ascii_alphabetic() || c == '_') => {
            return Err(bad("must start with a letter or underscore"));
        }
        _ => {}
    }
    if name.len() > 255 {
        return Err(bad("is longer than 255 characters"));
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(bad("may contain only letters, digits and underscores"));
    }
    Ok(())
}

/// Largest vector dimension accepted (Milvus's limit).
pub const MAX_DIM: usize = 32_768;

/// Check a new collection's names and dimension (what `create_collection` accepts), so a
/// front end can reject a bad definition before forwarding it. Errors: `InvalidParam`.
pub fn validate_schema(schema: &Schema) -> Result<(), EngineError> {
    validate_name("collectionName", &schema.name)?;
    validate_name("primaryFieldName", &schema.pk_field)?;
    validate_name("vectorFieldName", &schema.vector_field)?;
    if schema.pk_field == schema.vector_field {
        return Err(EngineError::InvalidParam {
            name: "vectorFieldName".into(),
            reason: "must differ from primaryFieldName".into(),
        });
    }
    if schema.dim == 0 || schema.dim > MAX_DIM {
        return Err(EngineError::InvalidParam {
            name: "dimension".into(),
            reason: format!("{} is outside [1, {MAX_DIM}]", schema.dim),
        });
    }
    Ok(())
}

/// The catalogue of open collections.
pub struct Engine {
    meta: MetaStore,
    data_dir: PathBuf,
    opts: StorageOptions,
    collections: RwLock<BTreeMap<String, Arc<Collection>>>,
    ddl: tokio::sync::Mutex<()>,
    /// `None` = each collection's WAL inside its directory.
    wal_root: Option<PathBuf>,
    builder: Arc<IndexBuilder>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("data_dir", &self.data_dir)
            .finish()
    }
}

/// The schema a collection record describes.
///
/// Errors: `InvalidParam` when the stored metric is unknown.
pub fn schema_of(r: &CollectionRecord) -> Result<Schema, EngineError> {
    Ok(Schema {
        name: r.name.clone(),
        dim: r.dim as usize,
        metric: r
            .metric
            .parse::<Metric>()
            .map_err(|reason| EngineError::InvalidParam {
                name: "metricType".into(),
                reason,
            })?,
        auto_id: r.auto_id,
        pk_field: r.pk_field.clone(),
        vector_field: r.vector_field.clone(),
        dynamic: r.dynamic,
    })
}

impl Engine {
    /// Open the metadata store and every collection in it (recovering each from its WAL).
    pub async fn open(cfg: &EngineConfig) -> Result<Arc<Self>, EngineError> {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|source| EngineError::Io {
            action: "create data directory",
            path: cfg.data_dir.clone(),
            source,
        })?;
        let meta = match &cfg.meta_url {
            Some(url) => MetaStore::connect(url).await?,
            None => MetaStore::open_sqlite(&cfg.data_dir.join("meta.db")).await?,
        };
        Self::open_with_meta(cfg, meta, None).await
    }

    /// Open every collection of an already connected (and, for a writer, fenced) metadata
    /// store, with the WALs under `wal_root` when given (`cfg.meta_url` is ignored).
    pub async fn open_with_meta(
        cfg: &EngineConfig,
        meta: MetaStore,
        wal_root: Option<PathBuf>,
    ) -> Result<Arc<Self>, EngineError> {
        for dir in std::iter::once(&cfg.data_dir).chain(wal_root.as_ref()) {
            std::fs::create_dir_all(dir).map_err(|source| EngineError::Io {
                action: "create data directory",
                path: dir.clone(),
                source,
            })?;
        }
        let builder =
            IndexBuilder::new(cfg.storage.index_build_threads).map_err(|e| EngineError::Io {
                action: "start the index builder for",
                path: cfg.data_dir.clone(),
                source: std::io::Error::other(e),
            })?;
        let engine = Arc::new(Self {
            meta: meta.clone(),
            data_dir: cfg.data_dir.clone(),
            opts: cfg.storage.clone(),
            collections: RwLock::new(BTreeMap::new()),
            ddl: tokio::sync::Mutex::new(()),
            wal_root: wal_root.clone(),
            builder,
        });
        for rec in meta.list_collections().await? {
            let schema = schema_of(&rec)?;
            let c = Collection::open_with_wal(
                meta.clone(),
                &rec,
                schema,
                &cfg.data_dir,
                wal_root.as_deref(),
                cfg.storage.clone(),
            )
            .await?;
            engine
                .collections
                .write()
                .insert(rec.name.clone(), Arc::new(c));
        }
        // Segments without a committed, verified index (new, or a build cut short by a restart,
        // or a corrupt file) are picked up by the builder from here.
        if cfg.storage.build_indexes {
            engine.builder.start(Arc::downgrade(&engine));
        }
        Ok(engine)
    }

    /// The background index builder (wake it after a flush; read its counters).
    pub fn index_builder(&self) -> &IndexBuilder {
        &self.builder
    }

    /// Check index definitions for collection `name` without storing them: the field is the
    /// vector field, the metric is the collection's, FLAT takes no parameters, ANN parameters
    /// are in range for the dimension, and a field keeps one index name.
    ///
    /// Errors: `CollectionNotFound`; `InvalidParam` naming the parameter and its allowed range.
    pub async fn validate_indexes(
        &self,
        name: &str,
        defs: &[IndexRecord],
    ) -> Result<Arc<Collection>, EngineError> {
        let c = self.collection(name)?;
        let s = c.schema();
        let bad = |name: &str, reason: String| EngineError::InvalidParam {
            name: name.into(),
            reason,
        };
        for d in defs {
            if d.collection_id != c.collection_id() {
                return Err(bad(
                    "collectionName",
                    format!("index {:?} belongs to another collection", d.index_name),
                ));
            }
            validate_name("indexName", &d.index_name)?;
            if d.field_name != s.vector_field {
                return Err(bad(
                    "fieldName",
                    format!(
                        "{:?} is not the vector field {:?}",
                        d.field_name, s.vector_field
                    ),
                ));
            }
            let metric = d
                .metric
                .parse::<Metric>()
                .map_err(|e| bad("metricType", e))?;
            if metric != s.metric {
                return Err(bad(
                    "metricType",
                    format!("{metric} differs from the collection's {}", s.metric),
                ));
            }
            let t = d
                .index_type
                .parse::<IndexType>()
                .map_err(|e| bad("indexType", e))?;
            let params: serde_json::Value = serde_json::from_str(&d.params)
                .map_err(|e| bad("params", format!("must be a JSON object: {e}")))?;
            match t {
                IndexType::FLAT => {
                    if let Some(k) = params.as_object().and_then(|o| {
                        o.keys()
                            .find(|k| k.as_str() != "metric_type" && k.as_str() != "index_type")
                    }) {
                        return Err(bad(
                            &format!("params.{k}"),
                            "FLAT takes no build parameters".into(),
                        ));
                    }
                }
                IndexType::IVF_FLAT | IndexType::IVF_SQ8 | IndexType::IVF_PQ | IndexType::HNSW => {
                    crate::index::validate_build_params_for_dim(t, s.dim, &params)?;
                }
            }
        }
        let existing = self.meta.indexes(c.collection_id()).await?;
        for d in defs {
            let clash = existing
                .iter()
                .map(|e| (&e.field_name, &e.index_name))
                .chain(defs.iter().map(|e| (&e.field_name, &e.index_name)))
                .any(|(f, n)| *f == d.field_name && *n != d.index_name);
            if clash {
                return Err(bad(
                    "indexName",
                    format!(
                        "field {:?} already has an index with another name; drop it first",
                        d.field_name
                    ),
                ));
            }
        }
        Ok(c)
    }

    /// Create or replace index definitions of collection `name` (what `indexes/create` and
    /// the cluster writer call). Validates everything first (see [`Engine::validate_indexes`]),
    /// so a rejected call changes nothing; then commits the definitions, releases indexes built
    /// from a replaced definition (those segments are searched with FLAT meanwhile), removes
    /// their files and wakes the builder. An identical definition is a no-op.
    pub async fn put_indexes(&self, name: &str, defs: &[IndexRecord]) -> Result<(), EngineError> {
        let _g = self.ddl.lock().await;
        let c = self.validate_indexes(name, defs).await?;
        self.meta.put_indexes(defs).await?;
        self.refresh_ann(&c).await?;
        Ok(())
    }

    /// Drop index `index_name` of collection `name`: the definition and its segment index rows
    /// go in one transaction, the collection falls back to FLAT, the files are removed.
    ///
    /// Errors: `CollectionNotFound`; `InvalidParam { name: "indexName" }` when it does not exist.
    pub async fn drop_index(&self, name: &str, index_name: &str) -> Result<(), EngineError> {
        let _g = self.ddl.lock().await;
        let c = self.collection(name)?;
        let recs = self.meta.indexes(c.collection_id()).await?;
        if !recs.iter().any(|r| r.index_name == index_name) {
            return Err(EngineError::InvalidParam {
                name: "indexName".into(),
                reason: format!("index {index_name:?} does not exist"),
            });
        }
        self.meta.drop_index(c.collection_id(), index_name).await?;
        self.refresh_ann(&c).await?;
        Ok(())
    }

    /// Re-read the collection's ANN definition from the store and apply it.
    async fn refresh_ann(&self, c: &Arc<Collection>) -> Result<(), EngineError> {
        let recs = self.meta.indexes(c.collection_id()).await?;
        let def = AnnDef::for_field(&recs, &c.schema().vector_field);
        if c.set_ann_def(def) {
            let c2 = c.clone();
            let _ = tokio::task::spawn_blocking(move || c2.remove_stale_index_files()).await;
        }
        self.builder.kick();
        Ok(())
    }

    pub fn meta(&self) -> &MetaStore {
        &self.meta
    }
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Create and open a collection. Errors: `CollectionExists`, `InvalidParam`.
    pub async fn create_collection(&self, schema: Schema) -> Result<Arc<Collection>, EngineError> {
        validate_schema(&schema)?;
        let _g = self.ddl.lock().await;
        if self.collections.read().contains_key(&schema.name) {
            return Err(EngineError::CollectionExists(schema.name));
        }
        let mut rec = CollectionRecord {
            id: 0,
            name: schema.name.clone(),
            dim: schema.dim as i64,
            metric: schema.metric.as_str().into(),
            auto_id: schema.auto_id,
            pk_field: schema.pk_field.clone(),
            vector_field: schema.vector_field.clone(),
            dynamic: schema.dynamic,
            loaded: true,
            flushed_seq: 0,
            created_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
        };
        rec.id = self.meta.create_collection(&rec).await?;
        let dir = collection_dir(&self.data_dir, rec.id);
        let wal_dir = wal_dir_of(&dir, self.wal_root.as_deref(), rec.id);
        match self.finish_create(&rec, schema, &dir, &wal_dir).await {
            Ok(c) => {
                self.collections.write().insert(rec.name.clone(), c.clone());
                Ok(c)
            }
            Err(e) => {
                // All or nothing: a collection that cannot take writes must not stay listed.
                tracing::warn!(collection = %rec.name, error = %crate::error_chain(&e),
                    "creating the collection failed after its catalogue row was written; rolling back");
                if let Err(r) = self.meta.drop_collection(rec.id).await {
                    tracing::error!(collection = %rec.name, error = %crate::error_chain(&r),
                        "rolling back the catalogue row failed; it stays until a drop or restart");
                }
                for d in [&dir, &wal_dir] {
                    let _ = std::fs::remove_dir_all(d);
                }
                Err(e)
            }
        }
    }

    /// The steps of a create after the catalogue row: its default index row (Milvus gives every
    /// new collection one on the vector field: FLAT), its directories, its WAL.
    async fn finish_create(
        &self,
        rec: &CollectionRecord,
        schema: Schema,
        dir: &Path,
        wal_dir: &Path,
    ) -> Result<Arc<Collection>, EngineError> {
        self.meta
            .put_index(&IndexRecord {
                collection_id: rec.id,
                index_name: schema.vector_field.clone(),
                field_name: schema.vector_field.clone(),
                index_type: IndexType::FLAT.as_str().into(),
                metric: schema.metric.as_str().into(),
                params: "{}".into(),
            })
            .await?;
        for d in [dir, wal_dir] {
            if d.exists() {
                // Leftover of a drop that crashed after its metadata commit.
                std::fs::remove_dir_all(d).map_err(|source| EngineError::Io {
                    action: "remove",
                    path: d.to_path_buf(),
                    source,
                })?;
            }
        }
        let c = Collection::open_with_wal(
            self.meta.clone(),
            rec,
            schema,
            &self.data_dir,
            self.wal_root.as_deref(),
            self.opts.clone(),
        )
        .await?;
        Ok(Arc::new(c))
    }

    /// Drop a collection: metadata first (so a crash never resurrects it), then files.
    pub async fn drop_collection(&self, name: &str) -> Result<(), EngineError> {
        let _g = self.ddl.lock().await;
        let c = self.collection(name)?;
        self.meta.drop_collection(c.collection_id()).await?;
        self.collections.write().remove(name);
        c.close().await;
        let dir = c.dir().to_path_buf();
        let wal_dir = c.wal_dir().to_path_buf();
        let _ = tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_dir_all(dir);
            // A WAL outside the collection directory goes too (inside, it is already gone).
            let _ = std::fs::remove_dir_all(wal_dir);
        })
        .await;
        Ok(())
    }

    pub fn collection(&self, name: &str) -> Result<Arc<Collection>, EngineError> {
        self.collections
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| EngineError::CollectionNotFound(name.to_string()))
    }

    pub fn list(&self) -> Vec<String> {
        self.collections.read().keys().cloned().collect()
    }

    pub fn all(&self) -> Vec<Arc<Collection>> {
        self.collections.read().values().cloned().collect()
    }

    /// Load or release (release makes searches and queries fail with "not loaded").
    pub async fn set_loaded(&self, name: &str, loaded: bool) -> Result<(), EngineError> {
        let c = self.collection(name)?;
        self.meta.set_loaded(c.collection_id(), loaded).await?;
        c.set_loaded(loaded);
        Ok(())
    }

    /// Flush every collection once (errors are logged; the WAL keeps the data safe meanwhile).
    pub async fn flush_all(&self, only_wanted: bool) {
        for c in self.all() {
            if only_wanted && !c.wants_flush() {
                continue;
            }
            if let Err(e) = c.flush().await {
                tracing::error!(collection = %c.schema().name, error = %e, "flush failed");
            }
            self.builder.kick();
        }
    }

    /// Start the background flusher: every `interval`, and early when a buffer passes its size.
    pub fn spawn_flusher(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let engine = Arc::downgrade(self);
        tokio::spawn(async move {
            let tick = Duration::from_millis(50).min(interval);
            let mut last = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(tick).await;
                let Some(e) = engine.upgrade() else { return };
                if last.elapsed() >= interval {
                    last = tokio::time::Instant::now();
                    e.flush_all(false).await;
                } else {
                    e.flush_all(true).await;
                }
            }
        })
    }

    /// Stop the index builder, flush and stop every collection's committer.
    pub async fn shutdown(&self) {
        self.builder.stop().await;
        self.flush_all(false).await;
        for c in self.all() {
            c.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(name: &str) -> Schema {
        Schema {
            name: name.into(),
            dim: 4,
            metric: Metric::L2,
            auto_id: false,
            pk_field: "id".into(),
            vector_field: "vector".into(),
            dynamic: true,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_create_that_fails_after_the_catalogue_row_leaves_nothing_and_can_be_retried() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let wal = dir.path().join("wal");
        let meta = MetaStore::open_sqlite(&dir.path().join("meta.db"))
            .await
            .expect("sqlite");
        let cfg = EngineConfig {
            data_dir: data.clone(),
            meta_url: None,
            flush_interval: Duration::from_secs(3600),
            storage: StorageOptions::default(),
        };
        let engine = Engine::open_with_meta(&cfg, meta.clone(), Some(wal.clone()))
            .await
            .expect("open");
        // The WAL root turns into a regular file: every WAL directory under it fails with
        // ENOTDIR, also for root (which ignores permission bits).
        std::fs::remove_dir(&wal).expect("rmdir wal");
        std::fs::write(&wal, b"not a directory").expect("write");

        let err = engine
            .create_collection(schema("c"))
            .await
            .expect_err("the WAL directory cannot be created");
        let msg = crate::error_chain(&err);
        assert!(msg.to_lowercase().contains("not a directory"), "{msg}");
        assert!(engine.list().is_empty(), "listed after a failed create");
        assert!(
            meta.list_collections().await.expect("list").is_empty(),
            "catalogue row left behind"
        );
        let ids: Vec<_> = std::fs::read_dir(data.join("collections"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(ids.is_empty(), "collection directory left behind: {ids:?}");

        // Fixed: the same name can be created and written.
        std::fs::remove_file(&wal).expect("rm");
        std::fs::create_dir(&wal).expect("mkdir");
        let c = engine
            .create_collection(schema("c"))
            .await
            .expect("create after the fix");
        assert_eq!(engine.list(), vec!["c".to_string()]);
        let idx = meta.indexes(c.collection_id()).await.expect("indexes");
        assert_eq!(idx.len(), 1, "the default index row: {idx:?}");
        assert_eq!(idx[0].index_type, "FLAT");
        engine.shutdown().await;
    }
}
