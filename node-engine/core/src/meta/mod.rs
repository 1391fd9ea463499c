//! The metadata store: collections, sealed segments (with their checksums and tombstone
//! versions), index definitions and the WAL high-water mark per collection.
//!
//! One code path for SQLite (standalone) and MySQL/MariaDB (cluster) through `sqlx::Any`; the
//! only dialect-specific text is the DDL in [`migrations`]. Every statement uses `?`
//! placeholders, which both backends accept. Must not depend on axum, tonic or kube.
//!
//! **Catalogue version and fencing.** The lease row (`shoal_writer_lease`, id 1, migration
//! step 2) carries `commit_seq`. Every metadata commit (create/drop collection, flush, set
//! loaded, put/drop index) first bumps it inside its own transaction, so `commit_seq` is a
//! monotonically increasing catalogue version: whoever reads version V and then the catalogue
//! sees everything committed up to V ([`MetaStore::catalog_version`],
//! [`MetaStore::catalog_snapshot`]). A writer that holds the lease calls
//! [`MetaStore::set_fence`] with its epoch; from then on the bump only matches while the row
//! still carries that epoch ([`fence`]), so a stale writer's commit fails with
//! [`MetaError::Fenced`] and rolls back. The standalone role never sets a fence (unfenced, but
//! versioned). Taking the row lock first in every commit also gives all commits one lock order.

mod migrations;

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{Any, AnyConnection, AnyPool, Row, Transaction};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Errors from the metadata store. Every variant is a service error (the database), never a
/// user error; callers map user-level conflicts before calling in.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("failed to connect to the metadata store at {url}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("failed to migrate the metadata store to version {version}")]
    Migrate {
        version: i64,
        #[source]
        source: sqlx::Error,
    },
    #[error("metadata query {what} failed")]
    Query {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("metadata store URL {0:?} is not sqlite:// or mysql://")]
    UnsupportedUrl(String),
    /// The commit carried a writer epoch that is no longer current: a newer writer took over.
    /// Nothing of the transaction was committed.
    #[error(
        "metadata commit fenced: writer epoch {epoch} is stale, the current epoch is {current}"
    )]
    Fenced { epoch: u64, current: u64 },
}

impl crate::error::Classify for MetaError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            MetaError::Fenced { .. } => ErrorKind::Fenced,
            MetaError::Connect { .. }
            | MetaError::Migrate { .. }
            | MetaError::Query { .. }
            | MetaError::UnsupportedUrl(_) => ErrorKind::Unavailable,
        }
    }
}

fn q(what: &'static str) -> impl FnOnce(sqlx::Error) -> MetaError {
    move |source| MetaError::Query { what, source }
}

/// The SQL dialect behind the pool (only the DDL differs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Mysql,
}

/// A collection's persistent definition.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectionRecord {
    /// Internal id, names the collection's directory (a re-created name gets a new id).
    pub id: i64,
    pub name: String,
    pub dim: i64,
    pub metric: String,
    pub auto_id: bool,
    pub pk_field: String,
    pub vector_field: String,
    pub dynamic: bool,
    pub loaded: bool,
    /// Every WAL record with a sequence number <= this is durable in committed segments.
    pub flushed_seq: i64,
    pub created_ms: i64,
}

impl CollectionRecord {
    /// A new collection's record (id 0 until the store assigns one): client-given ids in the
    /// primary key `id`, vectors in `vector`, dynamic fields on, loaded, nothing flushed yet.
    pub fn new(name: &str, dim: usize, metric: &str) -> Self {
        Self {
            id: 0,
            name: name.into(),
            dim: dim as i64,
            metric: metric.into(),
            auto_id: false,
            pk_field: "id".into(),
            vector_field: "vector".into(),
            dynamic: true,
            loaded: true,
            flushed_seq: 0,
            created_ms: 0,
        }
    }
}

/// A committed sealed segment.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentRecord {
    pub collection_id: i64,
    pub id: i64,
    pub rows: i64,
    /// CRC32 of the segment's manifest file.
    pub manifest_crc: i64,
    /// Version (flush sequence) of the committed tombstone file, 0 = none; and its CRC32.
    pub tomb_seq: i64,
    pub tomb_crc: i64,
}

/// A user-created index definition.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexRecord {
    pub collection_id: i64,
    pub index_name: String,
    pub field_name: String,
    pub index_type: String,
    pub metric: String,
    /// Build parameters as JSON text.
    pub params: String,
}

/// A built ANN index file of one sealed segment, committed after the file is durable.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentIndexRecord {
    pub collection_id: i64,
    pub segment_id: i64,
    pub index_name: String,
    /// The definition it was built from (a changed definition invalidates it).
    pub index_type: String,
    pub params: String,
    /// Path of the index directory relative to the collection directory.
    pub file: String,
    /// CRC32 stored in the index file's header (checked again when it is mapped).
    pub crc: i64,
    pub bytes: i64,
    pub rows: i64,
    pub built_ms: i64,
}

/// Reads a text column. MySQL `TEXT` arrives through `sqlx::Any` as bytes, SQLite's as text.
fn text(r: &sqlx::any::AnyRow, i: usize) -> Result<String, sqlx::Error> {
    match r.try_get::<String, _>(i) {
        Ok(s) => Ok(s),
        Err(_) => {
            let b: Vec<u8> = r.try_get(i)?;
            String::from_utf8(b).map_err(|e| sqlx::Error::Decode(Box::new(e)))
        }
    }
}

/// What one flush commits atomically.
#[derive(Debug, Clone, Default)]
pub struct FlushCommit {
    pub collection_id: i64,
    /// New sealed segment (absent when only tombstones changed).
    pub new_segments: Vec<SegmentRecord>,
    /// Segments removed (compaction).
    pub dropped_segments: Vec<i64>,
    /// (segment id, tomb_seq, tomb_crc) for segments whose tombstones changed.
    pub tombstones: Vec<(i64, i64, i64)>,
    /// New WAL high-water mark; `None` leaves it unchanged.
    pub flushed_seq: Option<i64>,
}

/// The whole catalogue as of one catalogue version (one read transaction).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CatalogSnapshot {
    /// Catalogue version (`commit_seq`) the snapshot includes everything up to.
    pub version: u64,
    pub collections: Vec<CollectionRecord>,
    /// Committed segments per collection id, sorted by segment id (absent = none).
    pub segments: BTreeMap<i64, Vec<SegmentRecord>>,
    /// Index definitions per collection id, sorted by index name (absent = none).
    pub indexes: BTreeMap<i64, Vec<IndexRecord>>,
    /// Committed segment index files per collection id, sorted by (segment id, index name).
    pub segment_indexes: BTreeMap<i64, Vec<SegmentIndexRecord>>,
}

/// Bump the catalogue version inside `conn`'s transaction, checking that the lease row still
/// carries `epoch`. Returns the new catalogue version.
///
/// Guarantees: on success the lease row stays write-locked by this transaction until it ends,
/// so no takeover can interleave with the commit. Errors: `Fenced` when the epoch is no longer
/// current; the caller must roll back (dropping the transaction does).
pub async fn fence(conn: &mut AnyConnection, epoch: u64) -> Result<u64, MetaError> {
    let res = sqlx::query(
        "UPDATE shoal_writer_lease SET commit_seq = commit_seq + 1 WHERE id = 1 AND epoch = ?",
    )
    .bind(epoch as i64)
    .execute(&mut *conn)
    .await
    .map_err(q("check the writer epoch"))?;
    let (current, seq) = read_lease_seq(conn).await?;
    // sqlx's MySQL driver sets CLIENT_FOUND_ROWS, so this counts matched rows on both stores.
    if res.rows_affected() == 1 {
        Ok(seq)
    } else {
        Err(MetaError::Fenced { epoch, current })
    }
}

/// Bump the catalogue version without an epoch check (the standalone role).
async fn bump(conn: &mut AnyConnection) -> Result<u64, MetaError> {
    sqlx::query("UPDATE shoal_writer_lease SET commit_seq = commit_seq + 1 WHERE id = 1")
        .execute(&mut *conn)
        .await
        .map_err(q("bump the catalogue version"))?;
    Ok(read_lease_seq(conn).await?.1)
}

/// (epoch, commit_seq) of the lease row.
async fn read_lease_seq(conn: &mut AnyConnection) -> Result<(u64, u64), MetaError> {
    let row = sqlx::query("SELECT epoch, commit_seq FROM shoal_writer_lease WHERE id = 1")
        .fetch_one(&mut *conn)
        .await
        .map_err(q("read the catalogue version"))?;
    let epoch: i64 = row.try_get(0).map_err(q("decode the lease epoch"))?;
    let seq: i64 = row.try_get(1).map_err(q("decode the catalogue version"))?;
    Ok((epoch.max(0) as u64, seq.max(0) as u64))
}

/// Handle to the metadata store (cheap to clone; clones share the fence and the version).
#[derive(Clone, Debug)]
pub struct MetaStore {
    pool: AnyPool,
    dialect: Dialect,
    /// Writer epoch every commit must carry; 0 = unfenced (standalone).
    fence_epoch: Arc<AtomicU64>,
    /// Highest catalogue version this process committed or read.
    version: Arc<AtomicU64>,
}

impl MetaStore {
    /// Open (creating when needed) the SQLite store at `path` and migrate it.
    pub async fn open_sqlite(path: &Path) -> Result<Self, MetaError> {
        let url = format!("sqlite://{}?mode=rwc", path.display());
        Self::connect(&url).await
    }

    /// Connect to `sqlite://...` or `mysql://...` and bring the schema up to date.
    ///
    /// Errors: `UnsupportedUrl`, `Connect`, `Migrate`.
    pub async fn connect(url: &str) -> Result<Self, MetaError> {
        let store = Self::connect_only(url).await?;
        migrations::run(&store.pool, store.dialect).await?;
        Ok(store)
    }

    /// Connect without touching the schema (the reader role never writes to the store). Reads
    /// fail with `Query` errors until a writer has migrated the schema; see [`Self::schema_ready`].
    ///
    /// Errors: `UnsupportedUrl`, `Connect`.
    pub async fn connect_read_only(url: &str) -> Result<Self, MetaError> {
        Self::connect_only(url).await
    }

    /// Whether the store's schema is at least this build's newest migration.
    pub async fn schema_ready(&self) -> Result<bool, MetaError> {
        let v: Option<i64> = sqlx::query("SELECT MAX(version) FROM shoal_schema_version")
            .fetch_one(&self.pool)
            .await
            .and_then(|r| r.try_get::<Option<i64>, _>(0))
            .map_err(q("read the schema version"))?;
        Ok(v.unwrap_or(0) >= migrations::latest())
    }

    async fn connect_only(url: &str) -> Result<Self, MetaError> {
        install_default_drivers();
        let dialect = dialect_of(url)?;
        // SQLite serialises writers anyway; one connection avoids "database is locked".
        let max = match dialect {
            Dialect::Sqlite => 1,
            Dialect::Mysql => 8,
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            // While the server is down a statement fails after this instead of sqlx's 30 s
            // default, so callers (lease renewal, flush, readiness) retry on their own cadence;
            // dead connections are dropped by the ping before each acquire and new ones are
            // opened when the server is back, so nothing needs a restart.
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(|source| MetaError::Connect {
                url: redact(url),
                source,
            })?;
        Ok(Self {
            pool,
            dialect,
            fence_epoch: Arc::new(AtomicU64::new(0)),
            version: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The connection pool (the cluster lease module runs its statements on it).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Fence every later commit of this store (and its clones) with the writer `epoch`; 0
    /// removes the fence.
    pub fn set_fence(&self, epoch: u64) {
        self.fence_epoch.store(epoch, Ordering::SeqCst);
    }

    /// The writer epoch commits carry, `None` when unfenced.
    pub fn fence_epoch(&self) -> Option<u64> {
        Some(self.fence_epoch.load(Ordering::SeqCst)).filter(|e| *e != 0)
    }

    /// The highest catalogue version this process committed or read (no query; 0 before any).
    pub fn last_version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }

    /// The catalogue version in the store now (one primary-key read).
    pub async fn catalog_version(&self) -> Result<u64, MetaError> {
        let mut conn = self.pool.acquire().await.map_err(q("acquire"))?;
        let (_, v) = read_lease_seq(&mut conn).await?;
        self.version.fetch_max(v, Ordering::SeqCst);
        Ok(v)
    }

    /// Every collection and committed segment as of one catalogue version, read in one
    /// transaction (readers and the router build their view from this).
    pub async fn catalog_snapshot(&self) -> Result<CatalogSnapshot, MetaError> {
        let mut tx = self.pool.begin().await.map_err(q("begin"))?;
        let (_, version) = read_lease_seq(&mut tx).await?;
        let collections = list_collections_on(&mut tx).await?;
        let rows = sqlx::query(
            "SELECT collection_id, id, row_count, manifest_crc, tomb_seq, tomb_crc FROM shoal_segments \
             ORDER BY collection_id, id",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(q("list segments"))?;
        let mut segments: BTreeMap<i64, Vec<SegmentRecord>> = BTreeMap::new();
        for r in &rows {
            let s = segment_from_row(r).map_err(q("decode segments"))?;
            segments.entry(s.collection_id).or_default().push(s);
        }
        // Index definitions and built index files as of the same version, so a reader maps an
        // index file only together with the segment it belongs to.
        let mut indexes: BTreeMap<i64, Vec<IndexRecord>> = BTreeMap::new();
        let rows = sqlx::query(
            "SELECT collection_id, index_name, field_name, index_type, metric, params FROM shoal_indexes \
             ORDER BY collection_id, index_name",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(q("list indexes"))?;
        for r in &rows {
            let i = index_from_row(r).map_err(q("decode indexes"))?;
            indexes.entry(i.collection_id).or_default().push(i);
        }
        let mut segment_indexes: BTreeMap<i64, Vec<SegmentIndexRecord>> = BTreeMap::new();
        let rows = sqlx::query(
            "SELECT collection_id, segment_id, index_name, index_type, params, file, crc, bytes, row_count, \
             built_ms FROM shoal_segment_indexes ORDER BY collection_id, segment_id, index_name",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(q("list segment indexes"))?;
        for r in &rows {
            let i = segment_index_from_row(r).map_err(q("decode segment indexes"))?;
            segment_indexes.entry(i.collection_id).or_default().push(i);
        }
        tx.rollback().await.map_err(q("end snapshot"))?;
        self.version.fetch_max(version, Ordering::SeqCst);
        Ok(CatalogSnapshot {
            version,
            collections,
            segments,
            indexes,
            segment_indexes,
        })
    }

    /// Begin a commit: bump the catalogue version first (fenced when a writer epoch is set).
    async fn begin_commit(&self) -> Result<(Transaction<'static, Any>, u64), MetaError> {
        let mut tx = self.pool.begin().await.map_err(q("begin"))?;
        let v = match self.fence_epoch.load(Ordering::SeqCst) {
            0 => bump(&mut tx).await?,
            epoch => fence(&mut tx, epoch).await?,
        };
        Ok((tx, v))
    }

    async fn finish_commit(
        &self,
        tx: Transaction<'static, Any>,
        v: u64,
        what: &'static str,
    ) -> Result<u64, MetaError> {
        tx.commit().await.map_err(q(what))?;
        self.version.fetch_max(v, Ordering::SeqCst);
        Ok(v)
    }

    /// Cheap liveness probe for `/readyz`.
    pub async fn ping(&self) -> Result<(), MetaError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(q("ping"))?;
        Ok(())
    }

    pub async fn list_collections(&self) -> Result<Vec<CollectionRecord>, MetaError> {
        let mut conn = self.pool.acquire().await.map_err(q("acquire"))?;
        list_collections_on(&mut conn).await
    }

    /// Insert a new collection; `id` is assigned by the store and returned.
    pub async fn create_collection(&self, c: &CollectionRecord) -> Result<i64, MetaError> {
        let (mut tx, v) = self.begin_commit().await?;
        let next: Option<i64> = sqlx::query("SELECT MAX(id) FROM shoal_collections")
            .fetch_one(&mut *tx)
            .await
            .and_then(|r| r.try_get::<Option<i64>, _>(0))
            .map_err(q("next collection id"))?;
        let next_seq: Option<i64> = sqlx::query("SELECT MAX(last_id) FROM shoal_sequences")
            .fetch_one(&mut *tx)
            .await
            .and_then(|r| r.try_get::<Option<i64>, _>(0))
            .map_err(q("collection id sequence"))?;
        let id = next.unwrap_or(0).max(next_seq.unwrap_or(0)) + 1;
        sqlx::query("DELETE FROM shoal_sequences")
            .execute(&mut *tx)
            .await
            .map_err(q("bump sequence"))?;
        sqlx::query("INSERT INTO shoal_sequences (last_id) VALUES (?)")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(q("bump sequence"))?;
        sqlx::query(
            "INSERT INTO shoal_collections (id, name, dim, metric, auto_id, pk_field, vector_field, \
             dynamic_field, loaded, flushed_seq, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(id)
        .bind(c.name.clone())
        .bind(c.dim)
        .bind(c.metric.clone())
        .bind(i64::from(c.auto_id))
        .bind(c.pk_field.clone())
        .bind(c.vector_field.clone())
        .bind(i64::from(c.dynamic))
        .bind(i64::from(c.loaded))
        .bind(c.flushed_seq)
        .bind(c.created_ms)
        .execute(&mut *tx)
        .await
        .map_err(q("insert collection"))?;
        self.finish_commit(tx, v, "commit create collection")
            .await?;
        Ok(id)
    }

    /// Remove a collection with its segments and indexes in one transaction.
    pub async fn drop_collection(&self, id: i64) -> Result<(), MetaError> {
        let (mut tx, v) = self.begin_commit().await?;
        for stmt in [
            "DELETE FROM shoal_segments WHERE collection_id = ?",
            "DELETE FROM shoal_segment_indexes WHERE collection_id = ?",
            "DELETE FROM shoal_indexes WHERE collection_id = ?",
            "DELETE FROM shoal_collections WHERE id = ?",
        ] {
            sqlx::query(stmt)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(q("drop collection"))?;
        }
        self.finish_commit(tx, v, "commit drop collection")
            .await
            .map(|_| ())
    }

    pub async fn set_loaded(&self, id: i64, loaded: bool) -> Result<(), MetaError> {
        let (mut tx, v) = self.begin_commit().await?;
        sqlx::query("UPDATE shoal_collections SET loaded = ? WHERE id = ?")
            .bind(i64::from(loaded))
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(q("set loaded"))?;
        self.finish_commit(tx, v, "commit set loaded")
            .await
            .map(|_| ())
    }

    pub async fn segments(&self, collection_id: i64) -> Result<Vec<SegmentRecord>, MetaError> {
        let rows = sqlx::query(
            "SELECT collection_id, id, row_count, manifest_crc, tomb_seq, tomb_crc FROM shoal_segments \
             WHERE collection_id = ? ORDER BY id",
        )
        .bind(collection_id)
        .fetch_all(&self.pool)
        .await
        .map_err(q("list segments"))?;
        rows.iter()
            .map(segment_from_row)
            .collect::<Result<_, sqlx::Error>>()
            .map_err(q("decode segments"))
    }

    /// Commit a flush (new segment, tombstone versions, compaction drops, WAL mark) atomically.
    pub async fn commit_flush(&self, c: &FlushCommit) -> Result<(), MetaError> {
        let (mut tx, v) = self.begin_commit().await?;
        for s in &c.new_segments {
            // A retried commit whose first attempt did commit (the connection died between
            // COMMIT and its answer, e.g. MySQL restarted) finds its own row: the same segment
            // with the same checksum is already there, so the retry is a no-op for it.
            let existing: Option<i64> = sqlx::query(
                "SELECT manifest_crc FROM shoal_segments WHERE collection_id = ? AND id = ?",
            )
            .bind(s.collection_id)
            .bind(s.id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(q("look up segment"))?
            .map(|r| r.try_get::<i64, _>(0))
            .transpose()
            .map_err(q("decode segment checksum"))?;
            if existing == Some(s.manifest_crc) {
                continue;
            }
            sqlx::query(
                "INSERT INTO shoal_segments (collection_id, id, row_count, manifest_crc, tomb_seq, tomb_crc) \
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(s.collection_id)
            .bind(s.id)
            .bind(s.rows)
            .bind(s.manifest_crc)
            .bind(s.tomb_seq)
            .bind(s.tomb_crc)
            .execute(&mut *tx)
            .await
            .map_err(q("insert segment"))?;
        }
        for id in &c.dropped_segments {
            sqlx::query("DELETE FROM shoal_segments WHERE collection_id = ? AND id = ?")
                .bind(c.collection_id)
                .bind(*id)
                .execute(&mut *tx)
                .await
                .map_err(q("drop segment"))?;
            sqlx::query(
                "DELETE FROM shoal_segment_indexes WHERE collection_id = ? AND segment_id = ?",
            )
            .bind(c.collection_id)
            .bind(*id)
            .execute(&mut *tx)
            .await
            .map_err(q("drop segment indexes"))?;
        }
        for (seg, seq, crc) in &c.tombstones {
            sqlx::query(
                "UPDATE shoal_segments SET tomb_seq = ?, tomb_crc = ? WHERE collection_id = ? AND id = ?",
            )
            .bind(*seq)
            .bind(*crc)
            .bind(c.collection_id)
            .bind(*seg)
            .execute(&mut *tx)
            .await
            .map_err(q("update tombstones"))?;
        }
        if let Some(seq) = c.flushed_seq {
            sqlx::query("UPDATE shoal_collections SET flushed_seq = ? WHERE id = ?")
                .bind(seq)
                .bind(c.collection_id)
                .execute(&mut *tx)
                .await
                .map_err(q("update flushed seq"))?;
        }
        self.finish_commit(tx, v, "commit flush").await.map(|_| ())
    }

    pub async fn indexes(&self, collection_id: i64) -> Result<Vec<IndexRecord>, MetaError> {
        let rows = sqlx::query(
            "SELECT collection_id, index_name, field_name, index_type, metric, params FROM shoal_indexes \
             WHERE collection_id = ? ORDER BY index_name",
        )
        .bind(collection_id)
        .fetch_all(&self.pool)
        .await
        .map_err(q("list indexes"))?;
        rows.iter()
            .map(index_from_row)
            .collect::<Result<_, sqlx::Error>>()
            .map_err(q("decode indexes"))
    }

    /// Replace the collection's index definitions in one transaction. A definition whose type
    /// or parameters change loses its committed segment index files (their rows are deleted
    /// here; the caller removes the files). Returns the names whose segment indexes were
    /// invalidated.
    pub async fn put_indexes(&self, defs: &[IndexRecord]) -> Result<Vec<String>, MetaError> {
        let (mut tx, v) = self.begin_commit().await?;
        let mut changed = Vec::new();
        for i in defs {
            let old = sqlx::query(
                "SELECT index_type, params FROM shoal_indexes WHERE collection_id = ? AND index_name = ?",
            )
            .bind(i.collection_id)
            .bind(i.index_name.clone())
            .fetch_optional(&mut *tx)
            .await
            .map_err(q("read index"))?;
            let same = match &old {
                Some(r) => {
                    let t = text(r, 0).map_err(q("decode index"))?;
                    let p = text(r, 1).map_err(q("decode index"))?;
                    t == i.index_type && p == i.params
                }
                None => false,
            };
            if !same {
                sqlx::query(
                    "DELETE FROM shoal_segment_indexes WHERE collection_id = ? AND index_name = ?",
                )
                .bind(i.collection_id)
                .bind(i.index_name.clone())
                .execute(&mut *tx)
                .await
                .map_err(q("invalidate segment indexes"))?;
                changed.push(i.index_name.clone());
            }
            sqlx::query("DELETE FROM shoal_indexes WHERE collection_id = ? AND index_name = ?")
                .bind(i.collection_id)
                .bind(i.index_name.clone())
                .execute(&mut *tx)
                .await
                .map_err(q("replace index"))?;
            sqlx::query(
                "INSERT INTO shoal_indexes (collection_id, index_name, field_name, index_type, metric, params) \
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(i.collection_id)
            .bind(i.index_name.clone())
            .bind(i.field_name.clone())
            .bind(i.index_type.clone())
            .bind(i.metric.clone())
            .bind(i.params.clone())
            .execute(&mut *tx)
            .await
            .map_err(q("insert index"))?;
        }
        self.finish_commit(tx, v, "commit index").await?;
        Ok(changed)
    }

    /// Replace the collection's index definition named `index_name`.
    pub async fn put_index(&self, i: &IndexRecord) -> Result<(), MetaError> {
        self.put_indexes(std::slice::from_ref(i)).await.map(|_| ())
    }

    /// Remove an index definition and every segment index built from it, atomically.
    pub async fn drop_index(&self, collection_id: i64, index_name: &str) -> Result<(), MetaError> {
        let (mut tx, v) = self.begin_commit().await?;
        for stmt in [
            "DELETE FROM shoal_segment_indexes WHERE collection_id = ? AND index_name = ?",
            "DELETE FROM shoal_indexes WHERE collection_id = ? AND index_name = ?",
        ] {
            sqlx::query(stmt)
                .bind(collection_id)
                .bind(index_name.to_string())
                .execute(&mut *tx)
                .await
                .map_err(q("drop index"))?;
        }
        self.finish_commit(tx, v, "commit drop index")
            .await
            .map(|_| ())
    }

    /// Every committed segment index of a collection.
    pub async fn segment_indexes(
        &self,
        collection_id: i64,
    ) -> Result<Vec<SegmentIndexRecord>, MetaError> {
        let rows = sqlx::query(
            "SELECT collection_id, segment_id, index_name, index_type, params, file, crc, bytes, row_count, \
             built_ms FROM shoal_segment_indexes WHERE collection_id = ? ORDER BY segment_id, index_name",
        )
        .bind(collection_id)
        .fetch_all(&self.pool)
        .await
        .map_err(q("list segment indexes"))?;
        rows.iter()
            .map(segment_index_from_row)
            .collect::<Result<_, sqlx::Error>>()
            .map_err(q("decode segment indexes"))
    }

    /// Commit a built segment index, replacing an older one of the same name — but only while
    /// its segment is still committed and the index definition is still the one it was built
    /// from. Returns `false` (nothing written) otherwise; the caller then deletes the file.
    pub async fn commit_segment_index(&self, r: &SegmentIndexRecord) -> Result<bool, MetaError> {
        let (mut tx, v) = self.begin_commit().await?;
        let seg = sqlx::query("SELECT id FROM shoal_segments WHERE collection_id = ? AND id = ?")
            .bind(r.collection_id)
            .bind(r.segment_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(q("check segment"))?;
        let def = sqlx::query(
            "SELECT index_type, params FROM shoal_indexes WHERE collection_id = ? AND index_name = ?",
        )
        .bind(r.collection_id)
        .bind(r.index_name.clone())
        .fetch_optional(&mut *tx)
        .await
        .map_err(q("check index definition"))?;
        let current = match &def {
            Some(d) => {
                text(d, 0).map_err(q("decode index"))? == r.index_type
                    && text(d, 1).map_err(q("decode index"))? == r.params
            }
            None => false,
        };
        if seg.is_none() || !current {
            return Ok(false);
        }
        sqlx::query(
            "DELETE FROM shoal_segment_indexes WHERE collection_id = ? AND segment_id = ? AND index_name = ?",
        )
        .bind(r.collection_id)
        .bind(r.segment_id)
        .bind(r.index_name.clone())
        .execute(&mut *tx)
        .await
        .map_err(q("replace segment index"))?;
        sqlx::query(
            "INSERT INTO shoal_segment_indexes (collection_id, segment_id, index_name, index_type, params, \
             file, crc, bytes, row_count, built_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(r.collection_id)
        .bind(r.segment_id)
        .bind(r.index_name.clone())
        .bind(r.index_type.clone())
        .bind(r.params.clone())
        .bind(r.file.clone())
        .bind(r.crc)
        .bind(r.bytes)
        .bind(r.rows)
        .bind(r.built_ms)
        .execute(&mut *tx)
        .await
        .map_err(q("insert segment index"))?;
        self.finish_commit(tx, v, "commit segment index").await?;
        Ok(true)
    }
}

fn dialect_of(url: &str) -> Result<Dialect, MetaError> {
    if url.starts_with("sqlite:") {
        Ok(Dialect::Sqlite)
    } else if url.starts_with("mysql:") || url.starts_with("mariadb:") {
        Ok(Dialect::Mysql)
    } else {
        Err(MetaError::UnsupportedUrl(redact(url)))
    }
}

/// Bring the schema of an existing pool up to date (for code that manages its own pool, e.g.
/// tests of the lease module). `MetaStore::connect` does this itself.
///
/// Errors: `UnsupportedUrl`, `Migrate`.
pub async fn migrate_pool(pool: &AnyPool) -> Result<(), MetaError> {
    let url = pool.connect_options().database_url.to_string();
    migrations::run(pool, dialect_of(&url)?).await
}

async fn list_collections_on(conn: &mut AnyConnection) -> Result<Vec<CollectionRecord>, MetaError> {
    let rows = sqlx::query(
        "SELECT id, name, dim, metric, auto_id, pk_field, vector_field, dynamic_field, loaded, \
         flushed_seq, created_ms FROM shoal_collections ORDER BY name",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(q("list collections"))?;
    rows.iter()
        .map(|r| {
            Ok(CollectionRecord {
                id: r.try_get(0)?,
                name: r.try_get(1)?,
                dim: r.try_get(2)?,
                metric: r.try_get(3)?,
                auto_id: r.try_get::<i64, _>(4)? != 0,
                pk_field: r.try_get(5)?,
                vector_field: r.try_get(6)?,
                dynamic: r.try_get::<i64, _>(7)? != 0,
                loaded: r.try_get::<i64, _>(8)? != 0,
                flushed_seq: r.try_get(9)?,
                created_ms: r.try_get(10)?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(q("decode collections"))
}

fn segment_from_row(r: &sqlx::any::AnyRow) -> Result<SegmentRecord, sqlx::Error> {
    Ok(SegmentRecord {
        collection_id: r.try_get(0)?,
        id: r.try_get(1)?,
        rows: r.try_get(2)?,
        manifest_crc: r.try_get(3)?,
        tomb_seq: r.try_get(4)?,
        tomb_crc: r.try_get(5)?,
    })
}

/// An `IndexRecord` from `collection_id, index_name, field_name, index_type, metric, params`.
fn index_from_row(r: &sqlx::any::AnyRow) -> Result<IndexRecord, sqlx::Error> {
    Ok(IndexRecord {
        collection_id: r.try_get(0)?,
        index_name: text(r, 1)?,
        field_name: text(r, 2)?,
        index_type: text(r, 3)?,
        metric: text(r, 4)?,
        params: text(r, 5)?,
    })
}

/// A `SegmentIndexRecord` from `collection_id, segment_id, index_name, index_type, params,
/// file, crc, bytes, row_count, built_ms`.
fn segment_index_from_row(r: &sqlx::any::AnyRow) -> Result<SegmentIndexRecord, sqlx::Error> {
    Ok(SegmentIndexRecord {
        collection_id: r.try_get(0)?,
        segment_id: r.try_get(1)?,
        index_name: text(r, 2)?,
        index_type: text(r, 3)?,
        params: text(r, 4)?,
        file: text(r, 5)?,
        crc: r.try_get(6)?,
        bytes: r.try_get(7)?,
        rows: r.try_get(8)?,
        built_ms: r.try_get(9)?,
    })
}

/// Hide a password in a connection URL before it reaches an error or a log line.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}://{}:***@{}", &url[..s], user, &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_the_password_and_keeps_the_host() {
        assert_eq!(
            redact("mysql://root:secret@127.0.0.1:3306/shoal"),
            "mysql://root:***@127.0.0.1:3306/shoal"
        );
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
    }

    #[tokio::test]
    async fn sqlite_store_round_trips_collections_segments_and_flush_commits() {
        let dir = tempfile::tempdir().unwrap();
        let m = MetaStore::open_sqlite(&dir.path().join("meta.db"))
            .await
            .unwrap();
        let rec = record("c");
        let id = m.create_collection(&rec).await.unwrap();
        let seg = SegmentRecord {
            collection_id: id,
            id: 1,
            rows: 10,
            manifest_crc: 7,
            tomb_seq: 0,
            tomb_crc: 0,
        };
        m.commit_flush(&FlushCommit {
            collection_id: id,
            new_segments: vec![seg.clone()],
            flushed_seq: Some(42),
            ..Default::default()
        })
        .await
        .unwrap();
        m.commit_flush(&FlushCommit {
            collection_id: id,
            tombstones: vec![(1, 50, 9)],
            ..Default::default()
        })
        .await
        .unwrap();
        let cs = m.list_collections().await.unwrap();
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].flushed_seq, 42);
        let segs = m.segments(id).await.unwrap();
        assert_eq!(
            segs,
            vec![SegmentRecord {
                tomb_seq: 50,
                tomb_crc: 9,
                ..seg
            }]
        );
        // Reopening migrates nothing twice and sees the same data.
        drop(m);
        let m = MetaStore::open_sqlite(&dir.path().join("meta.db"))
            .await
            .unwrap();
        m.drop_collection(id).await.unwrap();
        assert!(m.list_collections().await.unwrap().is_empty());
        // A re-created name gets a fresh id (its directory never collides with the old one).
        assert!(m.create_collection(&rec).await.unwrap() > id);
    }

    fn record(name: &str) -> CollectionRecord {
        CollectionRecord {
            created_ms: 1,
            ..CollectionRecord::new(name, 4, "L2")
        }
    }

    fn seg(collection_id: i64, id: i64) -> SegmentRecord {
        SegmentRecord {
            collection_id,
            id,
            rows: 10,
            manifest_crc: 7,
            tomb_seq: 0,
            tomb_crc: 0,
        }
    }

    /// Step 2 is applied, every commit bumps the catalogue version, and once a newer epoch owns
    /// the lease row every commit of the old one is refused and leaves nothing behind.
    async fn versions_and_fencing(old: MetaStore, new: MetaStore) {
        let v: i64 = sqlx::query("SELECT MAX(version) FROM shoal_schema_version")
            .fetch_one(old.pool())
            .await
            .unwrap()
            .get(0);
        assert!(v >= 2, "migration step 2 missing (schema version {v})");
        assert!(old.schema_ready().await.unwrap());
        // Re-running the migrations changes nothing.
        migrate_pool(old.pool()).await.unwrap();

        // Unfenced (standalone): commits still bump the version.
        let v0 = old.catalog_version().await.unwrap();
        let id = old.create_collection(&record("c")).await.unwrap();
        assert_eq!(old.last_version(), v0 + 1);
        assert_eq!(new.catalog_version().await.unwrap(), v0 + 1);

        // Writer "old" holds epoch 1 and commits under its fence.
        sqlx::query("UPDATE shoal_writer_lease SET holder = 'old', epoch = 1 WHERE id = 1")
            .execute(old.pool())
            .await
            .unwrap();
        old.set_fence(1);
        assert_eq!(old.fence_epoch(), Some(1));
        old.commit_flush(&FlushCommit {
            collection_id: id,
            new_segments: vec![seg(id, 1)],
            flushed_seq: Some(5),
            ..Default::default()
        })
        .await
        .unwrap();
        let v1 = old.last_version();
        assert_eq!(v1, v0 + 2);

        // Writer "new" takes over with epoch 2.
        sqlx::query("UPDATE shoal_writer_lease SET holder = 'new', epoch = 2 WHERE id = 1")
            .execute(new.pool())
            .await
            .unwrap();
        new.set_fence(2);
        let fenced = |r: Result<(), MetaError>| {
            assert!(
                matches!(
                    r,
                    Err(MetaError::Fenced {
                        epoch: 1,
                        current: 2
                    })
                ),
                "{r:?}"
            );
        };
        fenced(
            old.commit_flush(&FlushCommit {
                collection_id: id,
                new_segments: vec![seg(id, 2)],
                flushed_seq: Some(9),
                ..Default::default()
            })
            .await,
        );
        fenced(old.set_loaded(id, false).await);
        fenced(
            old.put_index(&IndexRecord {
                collection_id: id,
                index_name: "i".into(),
                field_name: "vector".into(),
                index_type: "FLAT".into(),
                metric: "L2".into(),
                params: "{}".into(),
            })
            .await,
        );
        fenced(old.drop_index(id, "i").await);
        fenced(old.drop_collection(id).await);
        fenced(old.create_collection(&record("d")).await.map(|_| ()));
        // Nothing of the refused commits is visible, and the version did not move.
        let snap = new.catalog_snapshot().await.unwrap();
        assert_eq!(snap.version, v1);
        assert_eq!(snap.collections.len(), 1);
        assert!(snap.collections[0].loaded);
        assert_eq!(snap.collections[0].flushed_seq, 5);
        assert_eq!(snap.segments.get(&id), Some(&vec![seg(id, 1)]));
        assert!(new.indexes(id).await.unwrap().is_empty());

        // The new writer commits; the version keeps increasing across writers.
        new.commit_flush(&FlushCommit {
            collection_id: id,
            new_segments: vec![seg(id, 2)],
            flushed_seq: Some(9),
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(new.last_version(), v1 + 1);
        let snap = old.catalog_snapshot().await.unwrap();
        assert_eq!(snap.version, v1 + 1);
        assert_eq!(snap.segments.get(&id).map(Vec::len), Some(2));
    }

    #[tokio::test]
    async fn sqlite_migrations_version_every_commit_and_fence_a_stale_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        let old = MetaStore::open_sqlite(&path).await.unwrap();
        let new = MetaStore::open_sqlite(&path).await.unwrap();
        versions_and_fencing(old, new).await;
    }

    #[tokio::test]
    async fn mariadb_migrations_version_every_commit_and_fence_a_stale_epoch() {
        let db = shoal_testkit::mariadb::MariaDb::start().unwrap();
        let url = db.url();
        // Processes starting together migrate one at a time (named lock), none fails.
        let (a, b, c) = tokio::join!(
            MetaStore::connect(&url),
            MetaStore::connect(&url),
            MetaStore::connect(&url)
        );
        let (old, new) = (a.unwrap(), b.unwrap());
        drop(c.unwrap());
        // A read-only connection (readers) sees the same catalogue without migrating.
        let ro = MetaStore::connect_read_only(&url).await.unwrap();
        assert!(ro.schema_ready().await.unwrap());
        versions_and_fencing(old, new).await;
        assert_eq!(ro.catalog_snapshot().await.unwrap().collections.len(), 1);
    }

    #[tokio::test]
    async fn segment_indexes_commit_only_for_live_segments_and_current_definitions() {
        let dir = tempfile::tempdir().unwrap();
        let m = MetaStore::open_sqlite(&dir.path().join("meta.db"))
            .await
            .unwrap();
        let rec = record("c");
        let cid = m.create_collection(&rec).await.unwrap();
        let seg = |id| SegmentRecord {
            collection_id: cid,
            id,
            rows: 10,
            manifest_crc: 7,
            tomb_seq: 0,
            tomb_crc: 0,
        };
        m.commit_flush(&FlushCommit {
            collection_id: cid,
            new_segments: vec![seg(1), seg(2)],
            ..Default::default()
        })
        .await
        .unwrap();
        let def = IndexRecord {
            collection_id: cid,
            index_name: "vector".into(),
            field_name: "vector".into(),
            index_type: "HNSW".into(),
            metric: "L2".into(),
            params: "{\"M\":8}".into(),
        };
        assert_eq!(
            m.put_indexes(std::slice::from_ref(&def)).await.unwrap(),
            vec!["vector"]
        );
        let six = |segment_id, params: &str| SegmentIndexRecord {
            collection_id: cid,
            segment_id,
            index_name: "vector".into(),
            index_type: "HNSW".into(),
            params: params.into(),
            file: format!("segments/{segment_id}/ix"),
            crc: 0xdead_beef,
            bytes: 100,
            rows: 10,
            built_ms: 5,
        };
        assert!(m.commit_segment_index(&six(1, "{\"M\":8}")).await.unwrap());
        assert!(m.commit_segment_index(&six(2, "{\"M\":8}")).await.unwrap());
        // Re-committing replaces; a stale definition or a missing segment commits nothing.
        assert!(m.commit_segment_index(&six(2, "{\"M\":8}")).await.unwrap());
        assert!(!m.commit_segment_index(&six(2, "{\"M\":9}")).await.unwrap());
        assert!(!m.commit_segment_index(&six(3, "{\"M\":8}")).await.unwrap());
        assert_eq!(
            m.segment_indexes(cid).await.unwrap(),
            vec![six(1, "{\"M\":8}"), six(2, "{\"M\":8}")]
        );
        // The same definition again keeps the built files; a changed one invalidates them.
        assert!(
            m.put_indexes(std::slice::from_ref(&def))
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(m.segment_indexes(cid).await.unwrap().len(), 2);
        // Compaction dropping segment 1 drops its index row in the same commit.
        m.commit_flush(&FlushCommit {
            collection_id: cid,
            dropped_segments: vec![1],
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(
            m.segment_indexes(cid).await.unwrap(),
            vec![six(2, "{\"M\":8}")]
        );
        let changed = IndexRecord {
            params: "{\"M\":9}".into(),
            ..def.clone()
        };
        assert_eq!(m.put_indexes(&[changed]).await.unwrap(), vec!["vector"]);
        assert!(m.segment_indexes(cid).await.unwrap().is_empty());
        assert!(m.commit_segment_index(&six(2, "{\"M\":9}")).await.unwrap());
        m.drop_index(cid, "vector").await.unwrap();
        assert!(m.segment_indexes(cid).await.unwrap().is_empty());
        assert!(m.indexes(cid).await.unwrap().is_empty());
    }
}
