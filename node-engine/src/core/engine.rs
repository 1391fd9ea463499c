//! The collection catalogue: creates, opens, drops and looks up collections, backed by the
//! metadata store and the data directory, and runs the periodic flusher. The standalone role
//! and the writer role build on this; it knows nothing of HTTP or gRPC.
//!
//! The writer role opens it with [`Engine::open_with_meta`]: a metadata store already fenced
//! with the writer's lease epoch, and optionally a separate WAL root (`<wal_root>/c<id>`).

use crate::core::meta::{CollectionRecord, MetaError, MetaStore};
use crate::core::storage::collection::{
    Collection, CollectionError, CollectionWrite, Schema, StorageOptions, collection_dir,
    wal_dir_of,
};
use crate::core::types::Metric;
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
        let engine = Arc::new(Self {
            meta: meta.clone(),
            data_dir: cfg.data_dir.clone(),
            opts: cfg.storage.clone(),
            collections: RwLock::new(BTreeMap::new()),
            ddl: tokio::sync::Mutex::new(()),
            wal_root: wal_root.clone(),
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
        Ok(engine)
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
        for d in [&dir, &wal_dir] {
            if d.exists() {
                // Leftover of a drop that crashed after its metadata commit.
                std::fs::remove_dir_all(d).map_err(|source| EngineError::Io {
                    action: "remove",
                    path: d.clone(),
                    source,
                })?;
            }
        }
        let c = Arc::new(
            Collection::open_with_wal(
                self.meta.clone(),
                &rec,
                schema,
                &self.data_dir,
                self.wal_root.as_deref(),
                self.opts.clone(),
            )
            .await?,
        );
        self.collections.write().insert(rec.name.clone(), c.clone());
        Ok(c)
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
                tracing::error!(collection = %crate::core::storage::collection::CollectionRead::schema(&*c).name, error = %e, "flush failed");
            }
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

    /// Flush and stop every collection's committer.
    pub async fn shutdown(&self) {
        self.flush_all(false).await;
        for c in self.all() {
            c.close().await;
        }
    }
}
