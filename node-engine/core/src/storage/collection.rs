//! One collection's data: the write side (WAL group commit → growing buffer → flush → sealed
//! segments, tombstones, compaction) and the read side (search / query / get over a consistent
//! view of sealed segments + growing buffer), exposed through the [`CollectionWrite`] and
//! [`CollectionRead`] traits so cluster roles can hold only the side they need.
//!
//! Invariants:
//! - a write is acknowledged only after its WAL record is fsynced *and* applied to the in-memory
//!   state, so an acknowledged row is immediately visible to reads;
//! - primary keys are unique among live rows: an upsert (and an insert of an existing id)
//!   tombstones the previous row first;
//! - the WAL is truncated only up to the sequence number committed in the metadata store with
//!   the segments and tombstones that cover it; recovery = committed segments + WAL suffix.
//!
//! Lock order: `wal` before `state`. No network types here.

mod replica;

pub use replica::{
    FlatOffload, RefreshOutcome, ReplicaListing, SegmentKey, SegmentSelection, ShardHit,
};

use super::ann::{self, AnnDef, IndexJob, IndexProgress};
use super::segment::{self, SegmentData, SegmentError};
use super::wal::{self, RowBatch, WalError, WalOp, WalWriter};
use crate::bitset::Bitset;
use crate::filter::{FieldSource, Filter};
use crate::index::flat::search_slice;
use crate::index::{IndexError, SearchParams, VectorIndexRead};
use crate::meta::{CollectionRecord, FlushCommit, MetaError, MetaStore, SegmentRecord};
use crate::types::{Metric, Neighbor};
use parking_lot::{Mutex, RwLock};
use rayon::prelude::*;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Errors of collection operations. `InvalidRow`/`InvalidParam` are the caller's fault and
/// change nothing; the rest are service failures.
#[derive(Debug, thiserror::Error)]
pub enum CollectionError {
    #[error("invalid row {row}: {reason}")]
    InvalidRow { row: usize, reason: String },
    #[error("invalid parameter {name}: {reason}")]
    InvalidParam { name: String, reason: String },
    #[error("collection {0} is not loaded")]
    NotLoaded(String),
    #[error("WAL write failed")]
    Wal(#[from] WalError),
    #[error("segment I/O failed")]
    Segment(#[from] SegmentError),
    #[error("metadata store failed")]
    Meta(#[from] MetaError),
    #[error("search failed")]
    Index(#[from] IndexError),
    #[error("the collection's write path has stopped (dropped or shutting down)")]
    WriterStopped,
    #[error("background task failed: {0}")]
    Task(String),
}

impl crate::error::Classify for CollectionError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            CollectionError::InvalidRow { .. } | CollectionError::InvalidParam { .. } => {
                ErrorKind::InvalidRequest
            }
            CollectionError::NotLoaded(_) => ErrorKind::NotLoaded,
            CollectionError::Index(e) => e.kind(),
            CollectionError::Meta(e) => e.kind(),
            CollectionError::Wal(_)
            | CollectionError::Segment(_)
            | CollectionError::WriterStopped
            | CollectionError::Task(_) => ErrorKind::Unavailable,
        }
    }
}

/// Static definition of a collection.
#[derive(Debug, Clone, PartialEq)]
pub struct Schema {
    pub name: String,
    pub dim: usize,
    pub metric: Metric,
    pub auto_id: bool,
    pub pk_field: String,
    pub vector_field: String,
    pub dynamic: bool,
}

/// Tunables shared by every collection.
#[derive(Debug, Clone)]
pub struct StorageOptions {
    /// Flush when the growing buffer holds this many vector bytes (besides the timer).
    pub flush_bytes: usize,
    /// Rewrite a sealed segment once this fraction of its rows is deleted.
    pub compact_deleted_fraction: f64,
    /// Sealed segments with fewer rows stay FLAT (an index would not pay for itself).
    pub index_min_rows: usize,
    /// Threads of the background index builder; 0 = max(1, cores / 2).
    pub index_build_threads: usize,
    /// Run the background index builder (the writer and standalone do; a read-only reader
    /// only maps committed index files).
    pub build_indexes: bool,
}

impl Default for StorageOptions {
    fn default() -> Self {
        Self {
            flush_bytes: 64 << 20,
            compact_deleted_fraction: 0.3,
            index_min_rows: 1024,
            index_build_threads: 0,
            build_indexes: true,
        }
    }
}

/// A row as returned to readers.
#[derive(Debug, Clone, PartialEq)]
pub struct RowOut {
    pub id: i64,
    pub vector: Option<Vec<f32>>,
    /// Dynamic fields (empty map when none or not requested).
    pub fields: Map<String, Value>,
}

/// One search hit with its user-facing score.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub score: f32,
    pub row: RowOut,
}

/// What a read should return besides the id.
#[derive(Debug, Clone, Copy, Default)]
pub struct Output {
    pub vector: bool,
    pub fields: bool,
}

/// Counters for stats and metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CollectionStats {
    pub live_rows: usize,
    pub sealed_segments: usize,
    pub growing_rows: usize,
    pub corrupt_segments: Vec<(u64, String)>,
    pub wal_bytes: u64,
    /// Everything held in memory or mapped, ANN indexes included.
    pub memory_bytes: usize,
    /// The loaded ANN indexes' share of `memory_bytes`.
    pub index_bytes: usize,
}

/// The read side.
pub trait CollectionRead: Send + Sync {
    fn schema(&self) -> &Schema;
    /// Top-`k` per query (`queries.len() / dim` of them), best first, filter and deletes applied.
    fn search(
        &self,
        queries: &[f32],
        k: usize,
        params: &SearchParams,
        filter: Option<&Filter>,
        out: Output,
    ) -> Result<Vec<Vec<Hit>>, CollectionError>;
    /// Rows matching `filter` in storage order, skipping `offset`, at most `limit`.
    fn query(
        &self,
        filter: Option<&Filter>,
        offset: usize,
        limit: usize,
        out: Output,
    ) -> Vec<RowOut>;
    fn count(&self, filter: Option<&Filter>) -> usize;
    fn get(&self, ids: &[i64], out: Output) -> Vec<RowOut>;
    fn stats(&self) -> CollectionStats;
}

/// The write side.
#[allow(async_fn_in_trait)]
pub trait CollectionWrite {
    /// Durably upsert rows; returns the ids written.
    async fn upsert(&self, batch: RowBatch) -> Result<Vec<i64>, CollectionError>;
    /// Durably delete the given ids; returns how many were live.
    async fn delete(&self, ids: Vec<i64>) -> Result<usize, CollectionError>;
    /// Seal the growing buffer and persist tombstones; then compact. Returns when committed.
    async fn flush(&self) -> Result<(), CollectionError>;
}

/// One segment's per-query hits.
type SegHits = (u64, Vec<Vec<Neighbor>>);
/// (internal distance, id, (segment, row)).
type Candidate = (f32, i64, (u64, u32));

struct SegEntry {
    data: Arc<SegmentData>,
    deleted: Bitset,
    committed: bool,
    tomb_seq: u64,
    /// The segment's ANN index for the collection's current definition, once built or mapped;
    /// `None` = searched with FLAT.
    ann: Option<Arc<dyn VectorIndexRead>>,
}

struct Growing {
    id: u64,
    rows: RowBatch,
    deleted: Vec<bool>,
}

struct State {
    sealed: BTreeMap<u64, SegEntry>,
    growing: Growing,
    pk: HashMap<i64, (u64, u32)>,
    applied_seq: u64,
    next_segment_id: u64,
    dirty_tombs: BTreeSet<u64>,
}

impl State {
    fn mark_deleted(&mut self, loc: (u64, u32)) {
        if loc.0 == self.growing.id {
            if let Some(d) = self.growing.deleted.get_mut(loc.1 as usize) {
                *d = true;
            }
        } else if let Some(e) = self
            .sealed
            .get_mut(&loc.0)
            .filter(|e| (loc.1 as usize) < e.deleted.len())
        {
            e.deleted.insert(loc.1 as usize);
            self.dirty_tombs.insert(loc.0);
        }
    }

    /// Apply one logged op. Idempotent with respect to the final state: replaying an op whose
    /// effect is already present leaves live rows unchanged.
    fn apply(&mut self, seq: u64, op: &WalOp) {
        match op {
            WalOp::Upsert(b) => {
                for i in 0..b.len() {
                    let id = b.ids[i];
                    if let Some(old) = self.pk.get(&id).copied() {
                        self.mark_deleted(old);
                    }
                    let row = self.growing.rows.len() as u32;
                    self.growing.rows.ids.push(id);
                    self.growing.rows.vectors.extend_from_slice(b.vector(i));
                    self.growing.rows.fields.push(b.fields[i].clone());
                    self.growing.deleted.push(false);
                    self.pk.insert(id, (self.growing.id, row));
                }
            }
            WalOp::Delete(ids) => {
                for id in ids {
                    if let Some(old) = self.pk.remove(id) {
                        self.mark_deleted(old);
                    }
                }
            }
        }
        self.applied_seq = self.applied_seq.max(seq);
    }

    fn live_rows(&self) -> usize {
        self.pk.len()
    }
}

/// A row seen by the filter: the primary key by its field name, dynamic fields by theirs.
struct RowSource<'a> {
    pk_field: &'a str,
    id: i64,
    fields: Option<Map<String, Value>>,
}

impl FieldSource for RowSource<'_> {
    fn field(&self, name: &str) -> Option<Cow<'_, Value>> {
        if name == self.pk_field {
            return Some(Cow::Owned(Value::from(self.id)));
        }
        self.fields
            .as_ref()
            .and_then(|m| m.get(name))
            .map(Cow::Borrowed)
    }
}

fn parse_fields(bytes: &[u8]) -> Map<String, Value> {
    if bytes.is_empty() {
        return Map::new();
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

struct Matcher<'a> {
    filter: Option<&'a Filter>,
    pk_field: &'a str,
    needs_fields: bool,
}

impl<'a> Matcher<'a> {
    fn new(filter: Option<&'a Filter>, pk_field: &'a str) -> Self {
        let needs_fields =
            filter.is_some_and(|f| f.referenced_fields().iter().any(|n| n != pk_field));
        Self {
            filter,
            pk_field,
            needs_fields,
        }
    }
    fn matches(&self, id: i64, fields: &[u8]) -> bool {
        let Some(f) = self.filter else { return true };
        let src = RowSource {
            pk_field: self.pk_field,
            id,
            fields: if self.needs_fields {
                Some(parse_fields(fields))
            } else {
                None
            },
        };
        f.matches(&src)
    }
}

struct Inner {
    schema: Schema,
    collection_id: i64,
    dir: PathBuf,
    wal_dir: PathBuf,
    /// `None` for a read-only (reader role) collection.
    wal: Mutex<Option<WalWriter>>,
    state: RwLock<State>,
    wal_bytes: AtomicU64,
    /// The WAL mark last committed in the metadata store.
    flushed_seq: AtomicU64,
    flush_wanted: AtomicBool,
    flush_bytes: usize,
}

impl Inner {
    fn seg_root(&self) -> PathBuf {
        self.dir.join("segments")
    }
}

struct Req {
    op: WalOp,
    done: tokio::sync::oneshot::Sender<Result<(), CollectionError>>,
}

/// A collection: both sides, plus its committer thread and flush serialisation.
pub struct Collection {
    inner: Arc<Inner>,
    meta: MetaStore,
    opts: StorageOptions,
    tx: Mutex<Option<mpsc::Sender<Req>>>,
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
    flush_lock: tokio::sync::Mutex<()>,
    next_auto_id: AtomicI64,
    loaded: AtomicBool,
    closed: AtomicBool,
    corrupt: Mutex<Vec<(u64, String)>>,
    /// Read-only replica (reader role): no WAL, no committer, never writes the data directory.
    read_only: bool,
    /// Read-only replica: manifest CRC of every served segment (a re-used id is reloaded).
    served: Mutex<HashMap<u64, u32>>,
    ann_def: RwLock<Option<AnnDef>>,
    /// Segments whose build failed for the current definition (not retried until it changes).
    ann_failed: Mutex<BTreeMap<u64, String>>,
    /// Segments a builder is working on.
    ann_building: Mutex<BTreeSet<u64>>,
    ann_load_failures: AtomicU64,
    ann_load_reasons: Mutex<Vec<(u64, String)>>,
    /// Read-only replica: the committed index file each segment's index was mapped from (or
    /// failed to map from), so an unchanged record is not read again at every refresh.
    ann_served: Mutex<HashMap<u64, replica::AnnServed>>,
}

impl std::fmt::Debug for Collection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collection")
            .field("name", &self.inner.schema.name)
            .finish()
    }
}

fn join_err(e: tokio::task::JoinError) -> CollectionError {
    CollectionError::Task(e.to_string())
}

/// Where a collection's WAL lives: `<wal_root>/c<id>`, or `<collection dir>/wal` by default.
pub fn wal_dir_of(collection_dir: &Path, wal_root: Option<&Path>, collection_id: i64) -> PathBuf {
    match wal_root {
        Some(r) => r.join(format!("c{collection_id}")),
        None => collection_dir.join("wal"),
    }
}

/// Directory of a collection under the data root.
pub fn collection_dir(data_root: &Path, collection_id: i64) -> PathBuf {
    data_root
        .join("collections")
        .join(format!("c{collection_id}"))
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

impl Collection {
    /// Open (or recover) a collection: load and verify committed segments and tombstones,
    /// replay the WAL after the committed sequence number, start the committer.
    ///
    /// A segment that fails verification is reported (`stats().corrupt_segments`, an error
    /// log) and never served; the rest of the collection opens.
    pub async fn open(
        meta: MetaStore,
        rec: &CollectionRecord,
        schema: Schema,
        data_root: &Path,
        opts: StorageOptions,
    ) -> Result<Self, CollectionError> {
        Self::open_with_wal(meta, rec, schema, data_root, None, opts).await
    }

    /// [`Self::open`] with the WAL under `wal_root` (`<wal_root>/c<id>`) instead of inside the
    /// collection directory (`None`). A writer that takes over after a failover must see the
    /// same WAL directory to replay what its predecessor acknowledged.
    pub async fn open_with_wal(
        meta: MetaStore,
        rec: &CollectionRecord,
        schema: Schema,
        data_root: &Path,
        wal_root: Option<&Path>,
        opts: StorageOptions,
    ) -> Result<Self, CollectionError> {
        let dir = collection_dir(data_root, rec.id);
        let wal_dir = wal_dir_of(&dir, wal_root, rec.id);
        let wal_dir2 = wal_dir.clone();
        let seg_root = dir.join("segments");
        let records = meta.segments(rec.id).await?;
        let ann_def = AnnDef::for_field(&meta.indexes(rec.id).await?, &schema.vector_field);
        let seg_indexes = meta.segment_indexes(rec.id).await?;
        let metric = schema.metric;
        let dim = schema.dim;
        let ann_def2 = ann_def.clone();
        let flushed = rec.flushed_seq.max(0) as u64;
        let dir2 = dir.clone();
        let (sealed, corrupt, replay, ann_failures) = tokio::task::spawn_blocking(move || {
            let mut sealed = BTreeMap::new();
            let mut corrupt = Vec::new();
            let committed: Vec<u64> = records.iter().map(|r| r.id as u64).collect();
            std::fs::create_dir_all(&seg_root).map_err(|source| {
                segment::SegmentError::Io {
                    action: "create",
                    path: seg_root.clone(),
                    source,
                }
            })?;
            segment::remove_strays(&seg_root, &committed)?;
            for r in &records {
                let id = r.id as u64;
                let loaded = segment::load_segment(&seg_root, id, r.manifest_crc as u32, metric).and_then(|d| {
                    let del = segment::load_tombstones(&seg_root, id, r.tomb_seq as u64, r.tomb_crc as u32, d.rows())?;
                    Ok((d, del))
                });
                match loaded {
                    Ok((d, del)) => {
                        segment::remove_old_tombstones(&seg_root, id, r.tomb_seq as u64);
                        sealed.insert(
                            id,
                            SegEntry { data: Arc::new(d), deleted: del, committed: true, tomb_seq: r.tomb_seq as u64, ann: None },
                        );
                    }
                    Err(SegmentError::Corrupt { segment, reason }) => {
                        tracing::error!(segment, %reason, "segment failed verification; it will not be served");
                        corrupt.push((segment, reason));
                    }
                    Err(e) => return Err(CollectionError::Segment(e)),
                }
            }
            // Committed index files are mapped, not rebuilt; one that fails verification is
            // reported and its segment searched with FLAT until the builder replaces it.
            let mut ann_failures = Vec::new();
            let keep = ann_def2.as_ref().map(AnnDef::dir_name);
            for id in sealed.keys() {
                ann::remove_stale_index_dirs(&segment::segment_dir(&seg_root, *id), keep.as_deref());
            }
            if let Some(def) = &ann_def2 {
                for r in seg_indexes.iter().filter(|r| def.matches(r)) {
                    let Some(e) = sealed.get_mut(&(r.segment_id as u64)) else {
                        continue;
                    };
                    match ann::load_committed(&dir2, r, e.data.rows(), dim, metric) {
                        Ok(idx) => e.ann = Some(idx),
                        Err(err) => {
                            tracing::error!(segment = r.segment_id, index = %def.index_name, error = %err, "index file failed verification; searching the segment with FLAT and rebuilding it");
                            ann_failures.push((r.segment_id as u64, err.to_string()));
                        }
                    }
                }
            }
            let replay = wal::replay(&wal_dir2, flushed)?;
            Ok::<_, CollectionError>((sealed, corrupt, replay, ann_failures))
        })
        .await
        .map_err(join_err)??;

        let mut pk = HashMap::new();
        let mut max_id = i64::MIN;
        for (sid, e) in &sealed {
            for (row, &id) in e.data.ids().iter().enumerate() {
                max_id = max_id.max(id);
                if !e.deleted.contains(row) {
                    pk.insert(id, (*sid, row as u32));
                }
            }
        }
        let max_seg = sealed
            .keys()
            .copied()
            .chain(corrupt.iter().map(|c| c.0))
            .max()
            .unwrap_or(0);
        let mut state = State {
            sealed,
            growing: Growing {
                id: max_seg + 1,
                rows: RowBatch::new(schema.dim),
                deleted: Vec::new(),
            },
            pk,
            applied_seq: flushed,
            next_segment_id: max_seg + 2,
            dirty_tombs: BTreeSet::new(),
        };
        let replayed = replay.ops.len();
        for (seq, op) in &replay.ops {
            if let Some(m) = match op {
                WalOp::Upsert(b) => b.ids.iter().max(),
                WalOp::Delete(_) => None,
            } {
                max_id = max_id.max(*m);
            }
            state.apply(*seq, op);
        }
        let next_seq = replay.last_seq.max(flushed) + 1;
        let wal = WalWriter::open(&wal_dir, next_seq)?;
        tracing::info!(collection = %schema.name, segments = state.sealed.len(), replayed, next_seq, "collection opened");
        let inner = Arc::new(Inner {
            schema,
            collection_id: rec.id,
            dir,
            wal_dir,
            wal: Mutex::new(Some(wal)),
            state: RwLock::new(state),
            wal_bytes: AtomicU64::new(0),
            flushed_seq: AtomicU64::new(flushed),
            flush_wanted: AtomicBool::new(false),
            flush_bytes: opts.flush_bytes,
        });
        let (tx, rx) = mpsc::channel::<Req>();
        let inner2 = inner.clone();
        let handle = std::thread::Builder::new()
            .name(format!("wal-{}", rec.id))
            .spawn(move || committer(inner2, rx))
            .map_err(|e| CollectionError::Task(format!("spawn WAL committer: {e}")))?;
        Ok(Self {
            inner,
            meta,
            opts,
            tx: Mutex::new(Some(tx)),
            committer: Mutex::new(Some(handle)),
            flush_lock: tokio::sync::Mutex::new(()),
            next_auto_id: AtomicI64::new(max_id.saturating_add(1).max(now_micros())),
            loaded: AtomicBool::new(rec.loaded),
            closed: AtomicBool::new(false),
            corrupt: Mutex::new(corrupt),
            read_only: false,
            served: Mutex::new(HashMap::new()),
            ann_def: RwLock::new(ann_def),
            ann_failed: Mutex::new(BTreeMap::new()),
            ann_building: Mutex::new(BTreeSet::new()),
            ann_load_failures: AtomicU64::new(ann_failures.len() as u64),
            ann_load_reasons: Mutex::new(ann_failures),
            ann_served: Mutex::new(HashMap::new()),
        })
    }

    pub fn collection_id(&self) -> i64 {
        self.inner.collection_id
    }
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }
    /// The directory holding this collection's WAL (nothing is written there when read-only).
    pub fn wal_dir(&self) -> &Path {
        &self.inner.wal_dir
    }
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::SeqCst)
    }
    pub fn set_loaded(&self, v: bool) {
        self.loaded.store(v, Ordering::SeqCst);
    }
    /// Whether the growing buffer passed its size threshold since the last flush.
    pub fn wants_flush(&self) -> bool {
        self.inner.flush_wanted.load(Ordering::Relaxed)
    }

    /// Reserve `n` fresh auto ids (unique across restarts: above every id ever stored and the
    /// wall clock in microseconds at open).
    pub fn alloc_ids(&self, n: usize) -> Vec<i64> {
        let first = self.next_auto_id.fetch_add(n as i64, Ordering::SeqCst);
        (first..first + n as i64).collect()
    }

    /// Check a batch against the schema. Errors name the row and the reason; nothing is written.
    pub fn validate(&self, b: &RowBatch) -> Result<(), CollectionError> {
        let dim = self.inner.schema.dim;
        if b.dim != dim || b.vectors.len() != b.ids.len() * dim || b.fields.len() != b.ids.len() {
            return Err(CollectionError::InvalidRow {
                row: 0,
                reason: format!("vectors must have dimension {dim}"),
            });
        }
        for (i, v) in b.vectors.chunks_exact(dim.max(1)).enumerate() {
            if v.iter().any(|x| !x.is_finite()) {
                return Err(CollectionError::InvalidRow {
                    row: i,
                    reason: "vector has a NaN or infinite component".into(),
                });
            }
        }
        Ok(())
    }

    async fn submit(&self, op: WalOp) -> Result<(), CollectionError> {
        let (done, rx) = tokio::sync::oneshot::channel();
        {
            let tx = self.tx.lock();
            let tx = tx.as_ref().ok_or(CollectionError::WriterStopped)?;
            tx.send(Req { op, done })
                .map_err(|_| CollectionError::WriterStopped)?;
        }
        rx.await.map_err(|_| CollectionError::WriterStopped)?
    }

    /// Stop the committer (pending requests finish first). Used by drop and shutdown.
    pub async fn close(&self) {
        // Wait for a running flush/compaction, and stop later ones from touching the files.
        let _flush = self.flush_lock.lock().await;
        self.closed.store(true, Ordering::SeqCst);
        self.tx.lock().take();
        let h = self.committer.lock().take();
        if let Some(h) = h {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }

    /// Ids of live rows matching `filter` (for delete-by-filter).
    pub fn ids_matching(&self, filter: &Filter) -> Vec<i64> {
        self.query(Some(filter), 0, usize::MAX, Output::default())
            .into_iter()
            .map(|r| r.id)
            .collect()
    }

    /// The metadata store this collection commits to.
    pub fn meta(&self) -> &MetaStore {
        &self.meta
    }

    /// Let the builder try segment `id` again (its last attempt was superseded, not failed).
    pub fn forget_index_failure(&self, id: u64) {
        self.ann_failed.lock().remove(&id);
    }

    /// The active ANN index definition (`None`: every segment is searched with FLAT).
    pub fn ann_def(&self) -> Option<AnnDef> {
        self.ann_def.read().clone()
    }

    /// Switch to a new ANN definition (or none). When it differs from the current one every
    /// loaded index is released (those segments are searched with FLAT at once) and build
    /// failures are forgotten. Returns whether anything changed; the caller then removes stale
    /// index directories ([`Collection::remove_stale_index_files`]) and wakes the builder.
    pub fn set_ann_def(&self, def: Option<AnnDef>) -> bool {
        let mut cur = self.ann_def.write();
        if *cur == def {
            return false;
        }
        // Lock order: definition, then state (the builder's install takes them the same way).
        let mut st = self.inner.state.write();
        for e in st.sealed.values_mut() {
            e.ann = None;
        }
        *cur = def;
        self.ann_failed.lock().clear();
        true
    }

    /// Delete index directories of other definitions in every segment directory (blocking I/O).
    pub fn remove_stale_index_files(&self) {
        let keep = self.ann_def().map(|d| d.dir_name());
        let seg_root = self.inner.seg_root();
        let ids: Vec<u64> = self.inner.state.read().sealed.keys().copied().collect();
        for id in ids {
            ann::remove_stale_index_dirs(&segment::segment_dir(&seg_root, id), keep.as_deref());
        }
    }

    /// The next committed segment that needs an ANN index (large enough, none loaded, no
    /// failed build, not being built), claimed for the caller until [`Collection::finish_index`].
    pub fn claim_index_job(&self) -> Option<IndexJob> {
        if self.closed.load(Ordering::SeqCst) {
            return None;
        }
        let def = self.ann_def.read().clone()?;
        let st = self.inner.state.read();
        let failed = self.ann_failed.lock();
        let mut building = self.ann_building.lock();
        let (id, e) = st.sealed.iter().find(|(id, e)| {
            e.committed
                && e.ann.is_none()
                && e.data.rows() >= self.opts.index_min_rows.max(1)
                && !failed.contains_key(id)
                && !building.contains(id)
        })?;
        building.insert(*id);
        let seg_dir = segment::segment_dir(&self.inner.seg_root(), *id);
        let dir = seg_dir.join(def.dir_name());
        let rel = dir
            .strip_prefix(&self.inner.dir)
            .map(|p| p.to_string_lossy().to_string())
            .unwrap_or_else(|_| dir.to_string_lossy().to_string());
        Some(IndexJob {
            collection_id: self.inner.collection_id,
            collection: self.inner.schema.name.clone(),
            segment_id: *id,
            def,
            metric: self.inner.schema.metric,
            dim: self.inner.schema.dim,
            data: e.data.clone(),
            dir,
            rel,
        })
    }

    /// Release a claimed job: serve `result`'s index for the segment if the definition is still
    /// the one it was built for and the segment still exists, or record the failure. Returns
    /// whether the index is now served.
    pub fn finish_index(
        &self,
        job: &IndexJob,
        result: Result<Arc<dyn VectorIndexRead>, String>,
    ) -> bool {
        let cur = self.ann_def.read();
        let served = if cur.as_ref() == Some(&job.def) {
            match result {
                Ok(ix) => {
                    let mut st = self.inner.state.write();
                    match st.sealed.get_mut(&job.segment_id) {
                        Some(e) if e.data.rows() == ix.len() => {
                            e.ann = Some(ix);
                            true
                        }
                        _ => false,
                    }
                }
                Err(reason) => {
                    self.ann_failed.lock().insert(job.segment_id, reason);
                    false
                }
            }
        } else {
            false
        };
        self.ann_building.lock().remove(&job.segment_id);
        served
    }

    /// Build progress and memory of the ANN index, for `indexes/describe` and metrics.
    pub fn index_progress(&self) -> IndexProgress {
        let def = self.ann_def.read().clone();
        let st = self.inner.state.read();
        let failed = self.ann_failed.lock();
        let mut p = IndexProgress {
            index: def.as_ref().map(|d| (d.index_name.clone(), d.index_type)),
            total_rows: st.growing.rows.len(),
            failed: failed.iter().map(|(k, v)| (*k, v.clone())).collect(),
            load_failures: self.ann_load_failures.load(Ordering::Relaxed),
            load_failure_reasons: self.ann_load_reasons.lock().clone(),
            ..Default::default()
        };
        for (id, e) in &st.sealed {
            let rows = e.data.rows();
            p.total_rows += rows;
            match &e.ann {
                Some(ix) => {
                    p.indexed_rows += rows;
                    p.indexed_segments += 1;
                    p.index_bytes += ix.memory_bytes();
                }
                None => {
                    p.flat_segments += 1;
                    if def.is_some()
                        && rows >= self.opts.index_min_rows.max(1)
                        && !failed.contains_key(id)
                    {
                        p.pending_rows += rows;
                    }
                }
            }
        }
        p
    }

    fn compaction_candidates(&self) -> Vec<u64> {
        let st = self.inner.state.read();
        st.sealed
            .iter()
            .filter(|(_, e)| {
                e.committed && e.data.rows() > 0 && {
                    let frac = e.deleted.count_ones() as f64 / e.data.rows() as f64;
                    frac >= self.opts.compact_deleted_fraction
                }
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// Rewrite segment `old` without its deleted rows (or drop it when none are left).
    async fn compact_one(&self, old: u64) -> Result<(), CollectionError> {
        let (data, snap_deleted, new_id) = {
            let mut st = self.inner.state.write();
            let Some(e) = st.sealed.get(&old) else {
                return Ok(());
            };
            let r = (e.data.clone(), e.deleted.clone());
            let id = st.next_segment_id;
            st.next_segment_id += 1;
            (r.0, r.1, id)
        };
        let metric = self.inner.schema.metric;
        let seg_root = self.inner.seg_root();
        let dim = self.inner.schema.dim;
        let data2 = data.clone();
        let snap2 = snap_deleted.clone();
        let written = tokio::task::spawn_blocking(move || {
            let mut b = RowBatch::new(dim);
            let mut map = Vec::new();
            for row in 0..data2.rows() {
                if !snap2.contains(row) {
                    b.ids.push(data2.ids()[row]);
                    b.vectors.extend_from_slice(data2.vector(row));
                    b.fields.push(data2.fields(row).to_vec());
                    map.push(row);
                }
            }
            if b.is_empty() {
                return Ok::<_, CollectionError>(None);
            }
            let seg = SegmentData::from_batch(new_id, b, metric)?;
            let crc = segment::write_segment(&seg_root, &seg)?;
            let loaded = segment::map_written_segment(&seg_root, new_id, crc, metric)?;
            Ok(Some((loaded, crc, map)))
        })
        .await
        .map_err(join_err)??;
        let mut commit = FlushCommit {
            collection_id: self.inner.collection_id,
            dropped_segments: vec![old as i64],
            ..Default::default()
        };
        if let Some((loaded, crc, _)) = &written {
            commit.new_segments.push(SegmentRecord {
                collection_id: self.inner.collection_id,
                id: new_id as i64,
                rows: loaded.rows() as i64,
                manifest_crc: i64::from(*crc),
                tomb_seq: 0,
                tomb_crc: 0,
            });
        }
        self.meta.commit_flush(&commit).await?;
        {
            let mut st = self.inner.state.write();
            let cur_deleted = st.sealed.get(&old).map(|e| e.deleted.clone());
            st.sealed.remove(&old);
            st.dirty_tombs.remove(&old);
            if let Some((loaded, _, map)) = written {
                let mut del = Bitset::new_empty(loaded.rows());
                let mut dirty = false;
                for (new_row, &old_row) in map.iter().enumerate() {
                    let id = loaded.ids()[new_row];
                    let still_live = cur_deleted.as_ref().is_some_and(|d| !d.contains(old_row));
                    if still_live && st.pk.get(&id) == Some(&(old, old_row as u32)) {
                        st.pk.insert(id, (new_id, new_row as u32));
                    } else {
                        del.insert(new_row);
                        dirty = true;
                    }
                }
                if dirty {
                    st.dirty_tombs.insert(new_id);
                }
                st.sealed.insert(
                    new_id,
                    SegEntry {
                        data: Arc::new(loaded),
                        deleted: del,
                        committed: true,
                        tomb_seq: 0,
                        ann: None,
                    },
                );
            }
        }
        let dir = segment::segment_dir(&self.inner.seg_root(), old);
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        tracing::info!(collection = %self.inner.schema.name, old, new = new_id, "compacted segment");
        Ok(())
    }

    /// Read one row (id + requested parts) at a location; `None` if the location is stale.
    fn row_at(st: &State, loc: (u64, u32), out: Output) -> Option<RowOut> {
        let row = loc.1 as usize;
        if loc.0 == st.growing.id {
            let g = &st.growing.rows;
            let id = *g.ids.get(row)?;
            return Some(RowOut {
                id,
                vector: out.vector.then(|| g.vector(row).to_vec()),
                fields: if out.fields {
                    parse_fields(&g.fields[row])
                } else {
                    Map::new()
                },
            });
        }
        let e = st.sealed.get(&loc.0)?;
        let id = *e.data.ids().get(row)?;
        Some(RowOut {
            id,
            vector: out.vector.then(|| e.data.vector(row).to_vec()),
            fields: if out.fields {
                parse_fields(e.data.fields(row))
            } else {
                Map::new()
            },
        })
    }
}

/// The committer thread: drain queued writes, append them with one fsync, apply, acknowledge.
fn committer(inner: Arc<Inner>, rx: mpsc::Receiver<Req>) {
    const MAX_BATCH: usize = 256;
    while let Ok(first) = rx.recv() {
        let mut reqs = vec![first];
        while reqs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => reqs.push(r),
                Err(_) => break,
            }
        }
        let ops: Vec<&WalOp> = reqs.iter().map(|r| &r.op).collect();
        let mut guard = inner.wal.lock();
        let Some(wal) = guard.as_mut() else {
            drop(guard);
            for r in reqs {
                let _ = r.done.send(Err(CollectionError::WriterStopped));
            }
            continue;
        };
        let before = wal.bytes_written();
        match wal.append(&ops) {
            Ok(first_seq) => {
                inner
                    .wal_bytes
                    .fetch_add(wal.bytes_written() - before, Ordering::Relaxed);
                let mut st = inner.state.write();
                for (i, r) in reqs.iter().enumerate() {
                    st.apply(first_seq + i as u64, &r.op);
                }
                if st.growing.rows.vectors.len() * 4 >= inner.flush_bytes {
                    inner.flush_wanted.store(true, Ordering::Relaxed);
                }
                drop(st);
                drop(guard);
                for r in reqs {
                    let _ = r.done.send(Ok(()));
                }
            }
            Err(e) => {
                drop(guard);
                tracing::error!(error = %e, "WAL append failed; writes in this group are rejected");
                let msg = e.to_string();
                for r in reqs {
                    let _ = r.done.send(Err(CollectionError::Task(msg.clone())));
                }
            }
        }
    }
}

impl CollectionWrite for Collection {
    async fn upsert(&self, batch: RowBatch) -> Result<Vec<i64>, CollectionError> {
        self.validate(&batch)?;
        let ids = batch.ids.clone();
        if batch.is_empty() {
            return Ok(ids);
        }
        self.submit(WalOp::Upsert(batch)).await?;
        Ok(ids)
    }

    async fn delete(&self, ids: Vec<i64>) -> Result<usize, CollectionError> {
        let live = {
            let st = self.inner.state.read();
            ids.iter().filter(|id| st.pk.contains_key(id)).count()
        };
        if ids.is_empty() {
            return Ok(0);
        }
        self.submit(WalOp::Delete(ids)).await?;
        Ok(live)
    }

    async fn flush(&self) -> Result<(), CollectionError> {
        let _guard = self.flush_lock.lock().await;
        if self.closed.load(Ordering::SeqCst) {
            return Ok(());
        }
        let inner = &self.inner;
        let metric = inner.schema.metric;
        // 1. Freeze: under both locks, so the cut is exactly at `seal_seq`.
        let (seal_seq, to_write, tombs) = {
            let mut wal = inner.wal.lock();
            let Some(wal) = wal.as_mut() else {
                // A read-only replica never writes segments.
                return Err(CollectionError::WriterStopped);
            };
            let mut st = inner.state.write();
            let seal_seq = st.applied_seq;
            if !st.growing.rows.is_empty() {
                let new_growing = Growing {
                    id: st.next_segment_id,
                    rows: RowBatch::new(inner.schema.dim),
                    deleted: Vec::new(),
                };
                st.next_segment_id += 1;
                let g = std::mem::replace(&mut st.growing, new_growing);
                let live = if g.deleted.iter().any(|d| *d) {
                    let mut live = RowBatch::new(g.rows.dim);
                    for row in 0..g.rows.len() {
                        if !g.deleted[row] {
                            let id = g.rows.ids[row];
                            st.pk.insert(id, (g.id, live.len() as u32));
                            live.ids.push(id);
                            live.vectors.extend_from_slice(g.rows.vector(row));
                            live.fields.push(g.rows.fields[row].clone());
                        }
                    }
                    live
                } else {
                    // Nothing deleted: every row keeps its index, so the primary-key map is
                    // already right and the buffer becomes the segment without a second copy.
                    g.rows
                };
                if !live.is_empty() {
                    let n = live.len();
                    let data = SegmentData::from_batch(g.id, live, metric)?;
                    st.sealed.insert(
                        g.id,
                        SegEntry {
                            data: Arc::new(data),
                            deleted: Bitset::new_empty(n),
                            committed: false,
                            tomb_seq: 0,
                            ann: None,
                        },
                    );
                }
            }
            inner.flush_wanted.store(false, Ordering::Relaxed);
            let to_write: Vec<Arc<SegmentData>> = st
                .sealed
                .values()
                .filter(|e| !e.committed)
                .map(|e| e.data.clone())
                .collect();
            let dirty: Vec<u64> = std::mem::take(&mut st.dirty_tombs).into_iter().collect();
            let mut tombs = Vec::new();
            for id in dirty {
                match st.sealed.get(&id) {
                    Some(e) if e.committed => tombs.push((id, e.deleted.clone())),
                    Some(_) => {
                        st.dirty_tombs.insert(id);
                    }
                    None => {}
                }
            }
            // Uncommitted segments' deletes wait for the next flush, once their segment exists.
            let pending: Vec<u64> = st
                .sealed
                .values()
                .filter(|e| !e.committed && e.deleted.count_ones() > 0)
                .map(|e| e.data.id)
                .collect();
            st.dirty_tombs.extend(pending);
            if to_write.is_empty()
                && tombs.is_empty()
                && seal_seq == inner.flushed_seq.load(Ordering::SeqCst)
            {
                (seal_seq, None, tombs)
            } else {
                wal.rotate()?;
                (seal_seq, Some(to_write), tombs)
            }
        };
        let Some(to_write) = to_write else {
            return Ok(());
        };
        // 2. Write segment files and tombstone versions (no locks held).
        let seg_root = inner.seg_root();
        let seg_root2 = seg_root.clone();
        let to_write2 = to_write.clone();
        let tombs2 = tombs.clone();
        let started = Instant::now();
        let written = tokio::task::spawn_blocking(move || {
            let mut segs = Vec::new();
            for d in &to_write2 {
                segs.push((d.id, d.rows(), segment::write_segment(&seg_root2, d)?));
            }
            let mut ts = Vec::new();
            for (id, del) in &tombs2 {
                ts.push((
                    *id,
                    segment::write_tombstones(&seg_root2, *id, seal_seq, del)?,
                ));
            }
            Ok::<_, CollectionError>((segs, ts))
        })
        .await
        .map_err(join_err)?;
        let (segs, ts) = match written {
            Ok(x) => x,
            Err(e) => {
                inner
                    .state
                    .write()
                    .dirty_tombs
                    .extend(tombs.iter().map(|t| t.0));
                return Err(e);
            }
        };
        // 3. Commit segments, tombstone versions and the WAL mark in one transaction.
        let commit = FlushCommit {
            collection_id: inner.collection_id,
            new_segments: segs
                .iter()
                .map(|(id, rows, crc)| SegmentRecord {
                    collection_id: inner.collection_id,
                    id: *id as i64,
                    rows: *rows as i64,
                    manifest_crc: i64::from(*crc),
                    tomb_seq: 0,
                    tomb_crc: 0,
                })
                .collect(),
            dropped_segments: Vec::new(),
            tombstones: ts
                .iter()
                .map(|(id, crc)| (*id as i64, seal_seq as i64, i64::from(*crc)))
                .collect(),
            flushed_seq: Some(seal_seq as i64),
        };
        if let Err(e) = self.meta.commit_flush(&commit).await {
            inner
                .state
                .write()
                .dirty_tombs
                .extend(tombs.iter().map(|t| t.0));
            return Err(e.into());
        }
        // 4. Serve the committed files by mmap; truncate the WAL; drop superseded tombstones.
        let ids: Vec<(u64, u32)> = segs.iter().map(|(id, _, crc)| (*id, *crc)).collect();
        let seg_root3 = seg_root.clone();
        let mapped = tokio::task::spawn_blocking(move || {
            ids.iter()
                .map(|(id, crc)| segment::map_written_segment(&seg_root3, *id, *crc, metric))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(join_err)??;
        {
            let mut st = inner.state.write();
            for d in mapped {
                if let Some(e) = st.sealed.get_mut(&d.id) {
                    e.data = Arc::new(d);
                    e.committed = true;
                }
            }
            for (id, _) in &ts {
                if let Some(e) = st.sealed.get_mut(id) {
                    e.tomb_seq = seal_seq;
                }
            }
        }
        inner.flushed_seq.store(seal_seq, Ordering::SeqCst);
        if let Some(w) = inner.wal.lock().as_ref() {
            w.remove_upto(seal_seq)?;
        }
        for (id, _) in &ts {
            segment::remove_old_tombstones(&seg_root, *id, seal_seq);
        }
        if !segs.is_empty() || !ts.is_empty() {
            tracing::debug!(
                collection = %inner.schema.name,
                segments = segs.len(),
                tombstones = ts.len(),
                seal_seq,
                ms = started.elapsed().as_millis() as u64,
                "flushed"
            );
        }
        // 5. Compaction (same serialisation as flush).
        for id in self.compaction_candidates() {
            self.compact_one(id).await?;
        }
        Ok(())
    }
}

impl CollectionRead for Collection {
    fn schema(&self) -> &Schema {
        &self.inner.schema
    }

    fn search(
        &self,
        queries: &[f32],
        k: usize,
        params: &SearchParams,
        filter: Option<&Filter>,
        out: Output,
    ) -> Result<Vec<Vec<Hit>>, CollectionError> {
        let dim = self.inner.schema.dim;
        let metric = self.inner.schema.metric;
        if dim == 0 || !queries.len().is_multiple_of(dim) {
            return Err(IndexError::DimensionMismatch {
                expected: dim,
                got: queries.len(),
            }
            .into());
        }
        let nq = queries.len() / dim;
        // Knobs are checked against the definition up front, so the answer does not depend on
        // how far the builder has got.
        if let Some(def) = self.ann_def.read().as_ref() {
            crate::index::validate_search_params(def.index_type, &def.params, params, k)?;
        }
        let pk_field = self.inner.schema.pk_field.as_str();
        let matcher = Matcher::new(filter, pk_field);
        let st = self.inner.state.read();
        // Per segment: allowed rows (live and matching), then exact top-k in that segment.
        let per_seg: Vec<Result<SegHits, CollectionError>> = st
            .sealed
            .par_iter()
            .map(|(sid, e)| {
                let rows = e.data.rows();
                let any_deleted = e.deleted.count_ones() > 0;
                let allowed = if filter.is_some() || any_deleted {
                    let mut b = Bitset::new_empty(rows);
                    for r in 0..rows {
                        if !e.deleted.contains(r)
                            && matcher.matches(e.data.ids()[r], e.data.fields(r))
                        {
                            b.insert(r);
                        }
                    }
                    Some(b)
                } else {
                    None
                };
                if allowed.as_ref().is_some_and(|b| b.count_ones() == 0) {
                    return Ok((*sid, vec![Vec::new(); nq]));
                }
                // Filters and deletes travel into the index as the allow-bitset.
                let res = match &e.ann {
                    Some(ix) => ix.search(queries, k, params, allowed.as_ref())?,
                    None => e.data.flat().search(queries, k, params, allowed.as_ref())?,
                };
                Ok((*sid, res))
            })
            .collect();
        let mut all: Vec<Vec<Candidate>> = vec![Vec::new(); nq];
        for r in per_seg {
            let (sid, res) = r?;
            let Some(e) = st.sealed.get(&sid) else {
                continue;
            };
            for (qi, hits) in res.into_iter().enumerate() {
                for n in hits {
                    all[qi].push((n.dist, e.data.ids()[n.row as usize], (sid, n.row)));
                }
            }
        }
        let g = &st.growing;
        if !g.rows.is_empty() {
            let mut b = Bitset::new_empty(g.rows.len());
            for r in 0..g.rows.len() {
                if !g.deleted[r] && matcher.matches(g.rows.ids[r], &g.rows.fields[r]) {
                    b.insert(r);
                }
            }
            if b.count_ones() > 0 {
                let res = search_slice(&g.rows.vectors, dim, metric, queries, k, Some(&b))?;
                for (qi, hits) in res.into_iter().enumerate() {
                    for n in hits {
                        all[qi].push((n.dist, g.rows.ids[n.row as usize], (g.id, n.row)));
                    }
                }
            }
        }
        let mut out_hits = Vec::with_capacity(nq);
        for mut cands in all {
            cands.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            cands.truncate(k);
            let hits = cands
                .into_iter()
                .filter_map(|(d, _, loc)| {
                    Self::row_at(&st, loc, out).map(|row| Hit {
                        score: metric.user_score(d),
                        row,
                    })
                })
                .collect();
            out_hits.push(hits);
        }
        Ok(out_hits)
    }

    fn query(
        &self,
        filter: Option<&Filter>,
        offset: usize,
        limit: usize,
        out: Output,
    ) -> Vec<RowOut> {
        let matcher = Matcher::new(filter, &self.inner.schema.pk_field);
        let st = self.inner.state.read();
        let mut skipped = 0usize;
        let mut res = Vec::new();
        let locs = st
            .sealed
            .iter()
            .flat_map(|(sid, e)| {
                (0..e.data.rows())
                    .filter(|r| !e.deleted.contains(*r))
                    .map(move |r| (*sid, r as u32, e.data.ids()[r], e.data.fields(r)))
            })
            .chain(
                (0..st.growing.rows.len())
                    .filter(|r| !st.growing.deleted[*r])
                    .map(|r| {
                        (
                            st.growing.id,
                            r as u32,
                            st.growing.rows.ids[r],
                            st.growing.rows.fields[r].as_slice(),
                        )
                    }),
            );
        for (sid, row, id, fields) in locs {
            if res.len() >= limit {
                break;
            }
            if !matcher.matches(id, fields) {
                continue;
            }
            if skipped < offset {
                skipped += 1;
                continue;
            }
            if let Some(r) = Self::row_at(&st, (sid, row), out) {
                res.push(r);
            }
        }
        res
    }

    fn count(&self, filter: Option<&Filter>) -> usize {
        if filter.is_none() {
            return self.inner.state.read().live_rows();
        }
        self.query(filter, 0, usize::MAX, Output::default()).len()
    }

    fn get(&self, ids: &[i64], out: Output) -> Vec<RowOut> {
        let st = self.inner.state.read();
        ids.iter()
            .filter_map(|id| st.pk.get(id).and_then(|loc| Self::row_at(&st, *loc, out)))
            .collect()
    }

    fn stats(&self) -> CollectionStats {
        let st = self.inner.state.read();
        let index_bytes: usize = st
            .sealed
            .values()
            .filter_map(|e| e.ann.as_ref().map(|a| a.memory_bytes()))
            .sum();
        CollectionStats {
            live_rows: st.live_rows(),
            sealed_segments: st.sealed.len(),
            growing_rows: st.growing.rows.len(),
            corrupt_segments: self.corrupt.lock().clone(),
            wal_bytes: self.inner.wal_bytes.load(Ordering::Relaxed),
            memory_bytes: st
                .sealed
                .values()
                .map(|e| e.data.memory_bytes())
                .sum::<usize>()
                + st.growing.rows.vectors.len() * 4
                + st.pk.len() * 24
                + index_bytes,
            index_bytes,
        }
    }
}
