//! The read-only replica side of [`Collection`], used by the reader role.
//!
//! A replica maps the committed sealed segments of a collection from the shared data directory
//! and follows the metadata store: [`Collection::refresh`] applies a catalogue listing (new
//! segments, dropped segments, new tombstone versions) by loading what changed on the blocking
//! pool and swapping it in under the state lock.
//!
//! A replica also maps the ANN index files the writer committed for its segments
//! (`shoal_segment_indexes`, listed in the same catalogue snapshot): the same verified loading as
//! the writer ([`ann::load_committed`]: committed checksum, the file's own CRC, shape), and an
//! index that fails verification leaves its segment on FLAT (logged and counted, never fatal)
//! until the writer commits a rebuilt file.
//!
//! Guarantees: a replica never writes to the data directory (no WAL, no committer, no stray-file
//! removal, no tombstone clean-up; writes and flushes fail with `WriterStopped`), so it runs on a
//! read-only mount. Searches over a subset of segments return the engine's internal distances
//! (smaller is better), which the router merges across readers.

use super::*;
use crate::error_chain;
use crate::index::ivf::{Codec, IvfIndex};
use crate::meta::{IndexRecord, SegmentIndexRecord};
use std::collections::BinaryHeap;

/// How many index load failure reasons a replica keeps for `indexes/describe` and logs.
const MAX_LOAD_REASONS: usize = 16;

/// The committed index file a replica mapped for a segment, or failed to.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct AnnServed {
    file: String,
    crc: i64,
    /// A rebuilt file may have the same path and checksum; its commit time differs.
    built_ms: i64,
    loaded: bool,
}

impl AnnServed {
    fn of(r: &SegmentIndexRecord, loaded: bool) -> Self {
        Self {
            file: r.file.clone(),
            crc: r.crc,
            built_ms: r.built_ms,
            loaded,
        }
    }

    fn same_file(&self, r: &SegmentIndexRecord) -> bool {
        self.file == r.file && self.crc == r.crc && self.built_ms == r.built_ms
    }
}

/// What the catalogue lists for one collection, as a replica applies it.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplicaListing<'a> {
    pub segments: &'a [SegmentRecord],
    /// Index definitions of the collection (the one on the vector field is used).
    pub indexes: &'a [IndexRecord],
    /// Committed segment index files of the collection.
    pub segment_indexes: &'a [SegmentIndexRecord],
}

/// What a [`Collection::refresh`] changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RefreshOutcome {
    /// Whether the served segment set or a tombstone version changed.
    pub changed: bool,
    /// Segments listed in the catalogue that could not be loaded (not served; retried at the
    /// next refresh): `(segment id, reason)`.
    pub failed: Vec<(u64, String)>,
}

/// How the requested segment ids relate to what a replica serves.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SegmentSelection {
    /// Ids this replica does not know (dropped, or newer than its catalogue).
    pub unknown: Vec<u64>,
    /// Ids listed in the catalogue that failed to load here: `(segment id, reason)`.
    pub unavailable: Vec<(u64, String)>,
}

/// Identity of a sealed segment's vectors for caches outside core (the reader's GPU residency):
/// equal keys mean equal data, because the manifest checksum covers the segment's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SegmentKey {
    pub collection_id: i64,
    pub segment: u64,
    pub manifest_crc: u32,
}

/// Runs a sealed segment's FLAT scan, or its IVF_FLAT list scan, somewhere other than the CPU:
/// the reader's GPU searcher (`crate::gpu::offload::GpuOffload`). Core only defines the hook, so
/// the storage core depends on nothing outside core.
pub trait FlatOffload: Send + Sync {
    /// Exact top-`k` of each query over `vectors` (row-major, `dim` per row), only rows set in
    /// `allowed` (live and matching the filter; all rows when `None`), internal distances as the
    /// CPU FLAT index defines them, each list sorted best first with rows below the segment's
    /// row count. `None` = answer this segment on the CPU (the batch is below the offload's
    /// threshold, or the device failed: the offload counts and logs that, never the caller).
    #[allow(clippy::too_many_arguments)]
    fn search_flat(
        &self,
        key: SegmentKey,
        vectors: &[f32],
        dim: usize,
        metric: Metric,
        queries: &[f32],
        k: usize,
        allowed: Option<&Bitset>,
    ) -> Option<Vec<Vec<Neighbor>>>;

    /// The same for a sealed segment searched through an IVF_FLAT index: the top-`k` of each
    /// query that `index.search(queries, k, params, allowed)` answers on the CPU (the lists
    /// [`IvfIndex::probe_lists`] names, scanned exactly: same rows, distances within float
    /// tolerance). `index_crc` is the committed checksum of the index file, so `(key,
    /// index_crc)` identifies the lists' data. `None` = answer on the CPU (as for
    /// [`FlatOffload::search_flat`]); the default offers nothing.
    #[allow(clippy::too_many_arguments)]
    fn search_ivf_flat(
        &self,
        key: SegmentKey,
        index_crc: u32,
        index: &IvfIndex,
        queries: &[f32],
        k: usize,
        params: &SearchParams,
        allowed: Option<&Bitset>,
    ) -> Option<Vec<Vec<Neighbor>>> {
        let _ = (key, index_crc, index, queries, k, params, allowed);
        None
    }
}

/// A search hit with the engine's internal distance (smaller is better).
#[derive(Debug, Clone, PartialEq)]
pub struct ShardHit {
    pub distance: f32,
    pub row: RowOut,
}

impl Collection {
    /// Open a read-only replica of a committed collection and load `listing` (the catalogue's
    /// segments and index files for it). Touches nothing on disk but reads.
    ///
    /// Errors: only a failed background task; segments that fail to load are reported in the
    /// outcome and not served; index files that fail to load leave their segment on FLAT.
    pub async fn open_read_only(
        meta: MetaStore,
        rec: &CollectionRecord,
        schema: Schema,
        data_root: &Path,
        listing: ReplicaListing<'_>,
    ) -> Result<(Self, RefreshOutcome), CollectionError> {
        let dir = collection_dir(data_root, rec.id);
        let dim = schema.dim;
        let inner = Arc::new(Inner {
            schema,
            collection_id: rec.id,
            wal_dir: wal_dir_of(&dir, None, rec.id),
            dir,
            wal: Mutex::new(None),
            state: RwLock::new(State {
                sealed: BTreeMap::new(),
                // Never a segment id: a replica has no growing buffer.
                growing: Growing {
                    id: u64::MAX,
                    rows: RowBatch::new(dim),
                    deleted: Vec::new(),
                },
                pk: HashMap::new(),
                applied_seq: 0,
                next_segment_id: u64::MAX,
                dirty_tombs: BTreeSet::new(),
            }),
            wal_bytes: AtomicU64::new(0),
            flushed_seq: AtomicU64::new(rec.flushed_seq.max(0) as u64),
            flush_wanted: AtomicBool::new(false),
            flush_bytes: usize::MAX,
        });
        let c = Self {
            inner,
            meta,
            opts: StorageOptions::default(),
            tx: Mutex::new(None),
            committer: Mutex::new(None),
            flush_lock: tokio::sync::Mutex::new(()),
            next_auto_id: AtomicI64::new(0),
            loaded: AtomicBool::new(rec.loaded),
            closed: AtomicBool::new(false),
            corrupt: Mutex::new(Vec::new()),
            read_only: true,
            served: Mutex::new(HashMap::new()),
            // Set by the first refresh from the listing's index definitions.
            ann_def: RwLock::new(None),
            ann_failed: Mutex::new(BTreeMap::new()),
            ann_building: Mutex::new(BTreeSet::new()),
            ann_load_failures: AtomicU64::new(0),
            ann_load_reasons: Mutex::new(Vec::new()),
            ann_served: Mutex::new(HashMap::new()),
        };
        let out = c.refresh(rec, listing).await?;
        Ok((c, out))
    }

    /// Bring a replica to the catalogue's `listing` for this collection: load new segments and
    /// new tombstone versions, forget dropped segments, take the load state from `rec`, and map
    /// the committed index files of the current index definition. Segments that fail to load
    /// are not served until a later refresh loads them; an index file that fails to load leaves
    /// its segment on FLAT until the writer commits another file for it.
    ///
    /// Errors: called on a writable collection, or a failed background task.
    pub async fn refresh(
        &self,
        rec: &CollectionRecord,
        listing: ReplicaListing<'_>,
    ) -> Result<RefreshOutcome, CollectionError> {
        if !self.read_only {
            return Err(CollectionError::Task(
                "refresh applies to read-only replicas only".into(),
            ));
        }
        self.loaded.store(rec.loaded, Ordering::SeqCst);
        let mut out = self.refresh_segments(listing.segments).await?;
        out.changed |= self
            .refresh_indexes(listing.indexes, listing.segment_indexes)
            .await?;
        Ok(out)
    }

    /// The segment part of [`Collection::refresh`].
    async fn refresh_segments(
        &self,
        segments: &[SegmentRecord],
    ) -> Result<RefreshOutcome, CollectionError> {
        let wanted: BTreeSet<u64> = segments.iter().map(|r| r.id as u64).collect();
        let (plan, dropped) = {
            let st = self.inner.state.read();
            let served = self.served.lock();
            let plan: Vec<(SegmentRecord, Option<Arc<SegmentData>>)> = segments
                .iter()
                .filter_map(|r| {
                    let id = r.id as u64;
                    let same_data = served.get(&id) == Some(&(r.manifest_crc as u32));
                    match st.sealed.get(&id) {
                        Some(e) if same_data && e.tomb_seq == r.tomb_seq as u64 => None,
                        Some(e) if same_data => Some((r.clone(), Some(e.data.clone()))),
                        _ => Some((r.clone(), None)),
                    }
                })
                .collect();
            let dropped = st.sealed.keys().any(|id| !wanted.contains(id));
            (plan, dropped)
        };
        if plan.is_empty() && !dropped {
            self.corrupt.lock().clear();
            return Ok(RefreshOutcome::default());
        }
        let seg_root = self.inner.seg_root();
        let metric = self.inner.schema.metric;
        type Loaded = Result<(Arc<SegmentData>, Bitset), String>;
        let loaded: Vec<(SegmentRecord, Loaded)> = tokio::task::spawn_blocking(move || {
            plan.into_iter()
                .map(|(r, data)| {
                    let id = r.id as u64;
                    let res = match data {
                        Some(d) => Ok(d),
                        None => segment::load_segment(&seg_root, id, r.manifest_crc as u32, metric)
                            .map(Arc::new),
                    }
                    .and_then(|d| {
                        let del = segment::load_tombstones(
                            &seg_root,
                            id,
                            r.tomb_seq as u64,
                            r.tomb_crc as u32,
                            d.rows(),
                        )?;
                        Ok((d, del))
                    })
                    .map_err(|e| error_chain(&e));
                    (r, res)
                })
                .collect()
        })
        .await
        .map_err(join_err)?;
        let mut failed = Vec::new();
        {
            let mut st = self.inner.state.write();
            let mut served = self.served.lock();
            st.sealed.retain(|id, _| wanted.contains(id));
            served.retain(|id, _| wanted.contains(id));
            for (r, res) in loaded {
                let id = r.id as u64;
                match res {
                    Ok((data, deleted)) => {
                        // A new tombstone version keeps the segment's data, and so its index.
                        let ann = st
                            .sealed
                            .get(&id)
                            .filter(|e| Arc::ptr_eq(&e.data, &data))
                            .and_then(|e| e.ann.clone());
                        st.sealed.insert(
                            id,
                            SegEntry {
                                data,
                                deleted,
                                committed: true,
                                tomb_seq: r.tomb_seq as u64,
                                ann,
                            },
                        );
                        served.insert(id, r.manifest_crc as u32);
                    }
                    Err(reason) => {
                        st.sealed.remove(&id);
                        served.remove(&id);
                        failed.push((id, reason));
                    }
                }
            }
            let mut pk = HashMap::with_capacity(st.pk.len());
            for (sid, e) in &st.sealed {
                for (row, &id) in e.data.ids().iter().enumerate() {
                    if !e.deleted.contains(row) {
                        pk.insert(id, (*sid, row as u32));
                    }
                }
            }
            st.pk = pk;
        }
        for (segment, reason) in &failed {
            tracing::warn!(collection = %self.inner.schema.name, segment, %reason, "segment could not be loaded; not served until a later refresh loads it");
        }
        *self.corrupt.lock() = failed.clone();
        Ok(RefreshOutcome {
            changed: true,
            failed,
        })
    }

    /// The index part of [`Collection::refresh`]: follow the index definition on the vector
    /// field and map each served segment's committed file for it (blocking pool), dropping
    /// indexes whose record is gone. Returns whether any segment's index changed.
    async fn refresh_indexes(
        &self,
        indexes: &[IndexRecord],
        segment_indexes: &[SegmentIndexRecord],
    ) -> Result<bool, CollectionError> {
        let def = AnnDef::for_field(indexes, &self.inner.schema.vector_field);
        // A changed definition releases every mapped index (those segments use FLAT at once).
        let mut changed = self.set_ann_def(def.clone());
        if changed {
            self.ann_served.lock().clear();
        }
        let Some(def) = def else {
            return Ok(changed);
        };
        let files: HashMap<u64, &SegmentIndexRecord> = segment_indexes
            .iter()
            .filter(|r| def.matches(r))
            .map(|r| (r.segment_id as u64, r))
            .collect();
        let plan: Vec<(SegmentIndexRecord, usize)> = {
            let mut st = self.inner.state.write();
            let mut served = self.ann_served.lock();
            served.retain(|id, _| st.sealed.contains_key(id) && files.contains_key(id));
            let mut plan = Vec::new();
            for (id, e) in st.sealed.iter_mut() {
                match files.get(id) {
                    None => changed |= e.ann.take().is_some(),
                    Some(r) => {
                        let done = served
                            .get(id)
                            .is_some_and(|s| s.same_file(r) && (e.ann.is_some() || !s.loaded));
                        if !done {
                            plan.push(((*r).clone(), e.data.rows()));
                        }
                    }
                }
            }
            plan
        };
        if plan.is_empty() {
            return Ok(changed);
        }
        let dir = self.inner.dir.clone();
        let (dim, metric) = (self.inner.schema.dim, self.inner.schema.metric);
        let loaded: Vec<_> = tokio::task::spawn_blocking(move || {
            plan.into_iter()
                .map(|(r, rows)| {
                    let res = ann::load_committed(&dir, &r, rows, dim, metric);
                    (r, res)
                })
                .collect()
        })
        .await
        .map_err(join_err)?;
        // Lock order: definition, then state (as the writer's builder installs).
        let cur = self.ann_def.read();
        if cur.as_ref() != Some(&def) {
            return Ok(changed);
        }
        let mut st = self.inner.state.write();
        let mut served = self.ann_served.lock();
        for (r, res) in loaded {
            let id = r.segment_id as u64;
            let Some(e) = st.sealed.get_mut(&id) else {
                continue;
            };
            match res {
                Ok(ix) => {
                    e.ann = Some(ix);
                    served.insert(id, AnnServed::of(&r, true));
                    changed = true;
                }
                Err(err) => {
                    tracing::error!(collection = %self.inner.schema.name, segment = id, index = %def.index_name,
                        file = %r.file, error = %err,
                        "index file failed verification; this reader searches the segment with FLAT until the writer commits another");
                    changed |= e.ann.take().is_some();
                    served.insert(id, AnnServed::of(&r, false));
                    self.ann_load_failures.fetch_add(1, Ordering::Relaxed);
                    let mut reasons = self.ann_load_reasons.lock();
                    reasons.retain(|(s, _)| *s != id);
                    reasons.push((id, err.to_string()));
                    let extra = reasons.len().saturating_sub(MAX_LOAD_REASONS);
                    reasons.drain(..extra);
                }
            }
        }
        Ok(changed)
    }

    /// Ids of the sealed segments served now, ascending.
    pub fn segment_ids(&self) -> Vec<u64> {
        self.inner.state.read().sealed.keys().copied().collect()
    }

    /// Split requested ids into served ones and the rest (deduplicated, ascending).
    fn select(&self, st: &State, ids: &[u64]) -> (Vec<u64>, SegmentSelection) {
        let corrupt = self.corrupt.lock();
        let mut sel = SegmentSelection::default();
        let mut present = Vec::new();
        let uniq: BTreeSet<u64> = ids.iter().copied().collect();
        for id in uniq {
            if st.sealed.contains_key(&id) {
                present.push(id);
            } else if let Some((_, reason)) = corrupt.iter().find(|(c, _)| *c == id) {
                sel.unavailable.push((id, reason.clone()));
            } else {
                sel.unknown.push(id);
            }
        }
        (present, sel)
    }

    /// Top-`k` per query over the sealed segments `segment_ids` only, filter and deletes
    /// applied, hits sorted by (internal distance, id).
    ///
    /// Errors: `NotLoaded` after a release; a query length that is not a multiple of the dimension.
    pub fn search_segments(
        &self,
        segment_ids: &[u64],
        queries: &[f32],
        k: usize,
        params: &SearchParams,
        filter: Option<&Filter>,
        out: Output,
    ) -> Result<(Vec<Vec<ShardHit>>, SegmentSelection), CollectionError> {
        self.search_segments_with(segment_ids, queries, k, params, filter, out, None)
    }

    /// [`Collection::search_segments`] with FLAT segment scans and IVF_FLAT list scans offered
    /// to `offload` first (the reader's GPU); a segment it declines is searched on the CPU. Filters and deletes reach the
    /// offload as the same allow-bitset the CPU index gets, and both paths' hits go through the
    /// same merge.
    #[allow(clippy::too_many_arguments)]
    pub fn search_segments_with(
        &self,
        segment_ids: &[u64],
        queries: &[f32],
        k: usize,
        params: &SearchParams,
        filter: Option<&Filter>,
        out: Output,
        offload: Option<&dyn FlatOffload>,
    ) -> Result<(Vec<Vec<ShardHit>>, SegmentSelection), CollectionError> {
        if !self.is_loaded() {
            return Err(CollectionError::NotLoaded(self.inner.schema.name.clone()));
        }
        let dim = self.inner.schema.dim;
        if dim == 0 || queries.is_empty() || !queries.len().is_multiple_of(dim) {
            return Err(IndexError::DimensionMismatch {
                expected: dim,
                got: queries.len(),
            }
            .into());
        }
        let nq = queries.len() / dim;
        // Knobs are checked against the definition, as on the writer, whether or not this
        // replica has mapped the index files yet.
        if let Some(def) = self.ann_def.read().as_ref() {
            crate::index::validate_search_params(def.index_type, &def.params, params, k)?;
        }
        let matcher = Matcher::new(filter, self.inner.schema.pk_field.as_str());
        let st = self.inner.state.read();
        let (present, sel) = self.select(&st, segment_ids);
        let per_seg: Vec<Result<SegHits, CollectionError>> = present
            .par_iter()
            .filter_map(|sid| st.sealed.get(sid).map(|e| (*sid, e)))
            .map(|(sid, e)| {
                let rows = e.data.rows();
                let allowed = if filter.is_some() || e.deleted.count_ones() > 0 {
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
                if allowed.as_ref().is_some_and(|b| b.count_ones() == 0) || k == 0 {
                    return Ok((sid, vec![Vec::new(); nq]));
                }
                let segment_key = || {
                    let manifest_crc = *self.served.lock().get(&sid)?;
                    Some(SegmentKey {
                        collection_id: self.inner.collection_id,
                        segment: sid,
                        manifest_crc,
                    })
                };
                // Filters and deletes travel into the index (or the GPU scan) as the allow-bitset.
                if let Some(ix) = &e.ann {
                    // IVF_FLAT lists can be scanned on the GPU; other indexes stay on the CPU.
                    let offloaded = offload.and_then(|o| {
                        let ivf = ix.as_ivf().filter(|i| i.codec() == Codec::Flat)?;
                        let key = segment_key()?;
                        let index_crc = self
                            .ann_served
                            .lock()
                            .get(&sid)
                            .filter(|s| s.loaded)
                            .map(|s| s.crc as u32)?;
                        o.search_ivf_flat(key, index_crc, ivf, queries, k, params, allowed.as_ref())
                    });
                    return match offloaded {
                        Some(hits) => Ok((sid, hits)),
                        None => Ok((sid, ix.search(queries, k, params, allowed.as_ref())?)),
                    };
                }
                let flat = e.data.flat();
                let offloaded = offload.and_then(|o| {
                    let key = segment_key()?;
                    let metric = self.inner.schema.metric;
                    o.search_flat(key, flat.data(), dim, metric, queries, k, allowed.as_ref())
                });
                match offloaded {
                    Some(hits) => Ok((sid, hits)),
                    None => Ok((sid, flat.search(queries, k, params, allowed.as_ref())?)),
                }
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
        let results = all
            .into_iter()
            .map(|mut cands| {
                cands.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                cands.truncate(k);
                cands
                    .into_iter()
                    .filter_map(|(d, _, loc)| {
                        Self::row_at(&st, loc, out).map(|row| ShardHit { distance: d, row })
                    })
                    .collect()
            })
            .collect();
        Ok((results, sel))
    }

    /// Live rows matching `filter` in the segments `segment_ids`: the `limit` smallest ids
    /// (ascending) and the number of matches.
    pub fn query_segments(
        &self,
        segment_ids: &[u64],
        filter: Option<&Filter>,
        limit: usize,
        out: Output,
    ) -> (Vec<RowOut>, usize, SegmentSelection) {
        let matcher = Matcher::new(filter, self.inner.schema.pk_field.as_str());
        let st = self.inner.state.read();
        let (present, sel) = self.select(&st, segment_ids);
        let mut count = 0usize;
        // Max-heap of the smallest `limit` ids seen so far.
        let mut best: BinaryHeap<(i64, u64, u32)> = BinaryHeap::new();
        for sid in present {
            let Some(e) = st.sealed.get(&sid) else {
                continue;
            };
            for r in 0..e.data.rows() {
                let id = e.data.ids()[r];
                if e.deleted.contains(r) || !matcher.matches(id, e.data.fields(r)) {
                    continue;
                }
                count += 1;
                if limit == 0 {
                    continue;
                }
                if best.len() < limit {
                    best.push((id, sid, r as u32));
                } else if best.peek().is_some_and(|top| id < top.0) {
                    best.pop();
                    best.push((id, sid, r as u32));
                }
            }
        }
        let rows = best
            .into_sorted_vec()
            .into_iter()
            .filter_map(|(_, sid, r)| Self::row_at(&st, (sid, r), out))
            .collect();
        (rows, count, sel)
    }

    /// Live rows with the given ids that lie in the segments `segment_ids`, ascending by id.
    pub fn get_in_segments(
        &self,
        segment_ids: &[u64],
        ids: &[i64],
        out: Output,
    ) -> (Vec<RowOut>, SegmentSelection) {
        let st = self.inner.state.read();
        let (present, sel) = self.select(&st, segment_ids);
        let present: BTreeSet<u64> = present.into_iter().collect();
        let wanted: BTreeSet<i64> = ids.iter().copied().collect();
        let rows = wanted
            .into_iter()
            .filter_map(|id| st.pk.get(&id).copied())
            .filter(|loc| present.contains(&loc.0))
            .filter_map(|loc| Self::row_at(&st, loc, out))
            .collect();
        (rows, sel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use crate::types::IndexType;
    use std::time::SystemTime;

    /// Every file under `root` with its size and modification time.
    fn listing(root: &Path) -> Vec<(PathBuf, u64, SystemTime)> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let m = e.metadata().unwrap();
                if m.is_dir() {
                    stack.push(e.path());
                }
                out.push((e.path(), m.len(), m.modified().unwrap()));
            }
        }
        out.sort();
        out
    }

    fn batch(ids: std::ops::Range<i64>) -> RowBatch {
        let mut b = RowBatch::new(4);
        for id in ids {
            b.ids.push(id);
            b.vectors.extend([id as f32, 1.0, 0.0, 0.0]);
            b.fields.push(Vec::new());
        }
        b
    }

    /// A listing with segments and no index.
    fn only(segments: &[SegmentRecord]) -> ReplicaListing<'_> {
        ReplicaListing {
            segments,
            ..ReplicaListing::default()
        }
    }

    #[tokio::test]
    async fn a_replica_follows_flushes_deletes_and_compaction_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let (meta, rec, schema) = l2_collection(dir.path(), "r", 4).await;
        let opts = StorageOptions {
            compact_deleted_fraction: 0.5,
            ..StorageOptions::default()
        };
        let w = Collection::open(meta.clone(), &rec, schema.clone(), &data, opts)
            .await
            .unwrap();
        w.upsert(batch(0..20)).await.unwrap();
        w.flush().await.unwrap();
        w.upsert(batch(20..40)).await.unwrap();
        w.flush().await.unwrap();
        let segs = meta.segments(rec.id).await.unwrap();
        assert_eq!(segs.len(), 2);

        let before = listing(&data);
        let (r, out) = Collection::open_read_only(meta.clone(), &rec, schema, &data, only(&segs))
            .await
            .unwrap();
        assert!(out.failed.is_empty() && out.changed, "{out:?}");
        assert_eq!(
            listing(&data),
            before,
            "opening a replica wrote to the data directory"
        );
        assert_eq!(r.segment_ids(), all_ids(&segs));
        let (hits, sel) = r
            .search_segments(
                &all_ids(&segs),
                &[5.0, 1.0, 0.0, 0.0],
                3,
                &SearchParams::default(),
                None,
                Output::default(),
            )
            .unwrap();
        assert_eq!(sel, SegmentSelection::default());
        let ids: Vec<i64> = hits[0].iter().map(|h| h.row.id).collect();
        assert_eq!(ids, vec![5, 4, 6]);
        assert_eq!(hits[0][0].distance, 0.0);
        // Only the named segments are searched; unknown ids are reported.
        let (rows, sel) = r.get_in_segments(&[segs[0].id as u64, 999], &[5, 25], Output::default());
        assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), vec![5]);
        assert_eq!(sel.unknown, vec![999]);

        // A delete reaches the replica as a new tombstone version.
        w.delete(vec![5]).await.unwrap();
        w.flush().await.unwrap();
        let segs = meta.segments(rec.id).await.unwrap();
        assert!(r.refresh(&rec, only(&segs)).await.unwrap().changed);
        assert!(
            r.get_in_segments(&all_ids(&segs), &[5], Output::default())
                .0
                .is_empty()
        );
        let (first, count, _) = r.query_segments(&all_ids(&segs), None, 3, Output::default());
        assert_eq!(count, 39);
        assert_eq!(
            first.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        // Nothing changed: a refresh is a no-op.
        assert!(!r.refresh(&rec, only(&segs)).await.unwrap().changed);

        // Compaction replaces the first segment; the replica drops it and maps the new one.
        w.delete((0..15).collect()).await.unwrap();
        w.flush().await.unwrap();
        let segs2 = meta.segments(rec.id).await.unwrap();
        assert_ne!(all_ids(&segs2), all_ids(&segs), "no compaction happened");
        let before = listing(&data);
        r.refresh(&rec, only(&segs2)).await.unwrap();
        assert_eq!(
            listing(&data),
            before,
            "a refresh wrote to the data directory"
        );
        assert_eq!(r.segment_ids(), all_ids(&segs2));
        let (_, count, sel) = r.query_segments(&all_ids(&segs), None, 0, Output::default());
        assert_eq!(count, 20, "the old segment id must not be served");
        assert_eq!(sel.unknown, vec![segs[0].id as u64]);
        assert_eq!(
            r.query_segments(&all_ids(&segs2), None, 0, Output::default())
                .1,
            25
        );

        // A replica refuses writes.
        assert!(matches!(
            r.upsert(batch(100..101)).await,
            Err(CollectionError::WriterStopped)
        ));
        assert!(r.flush().await.is_err());
        // A released collection refuses searches.
        let released = CollectionRecord {
            loaded: false,
            ..rec.clone()
        };
        r.refresh(&released, only(&segs2)).await.unwrap();
        assert!(matches!(
            r.search_segments(
                &all_ids(&segs2),
                &[0.0; 4],
                1,
                &SearchParams::default(),
                None,
                Output::default()
            ),
            Err(CollectionError::NotLoaded(_))
        ));
        w.close().await;
    }

    #[tokio::test]
    async fn a_replica_searches_through_committed_index_files_and_falls_back_to_flat_on_a_corrupt_one()
     {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let (meta, rec, schema) = l2_collection(dir.path(), "ann", 8).await;
        let (w, first) = two_ivf_flat_segments(&meta, &rec, &schema, &data).await;

        let listing = |snap: &crate::meta::CatalogSnapshot| catalog_of(snap, rec.id);
        let (segs, ixs, files) = listing(&meta.catalog_snapshot().await.unwrap());
        assert_eq!(files.len(), 2, "{files:?}");
        let full = ReplicaListing {
            segments: &segs,
            indexes: &ixs,
            segment_indexes: &files,
        };
        let (r, out) = Collection::open_read_only(meta.clone(), &rec, schema.clone(), &data, full)
            .await
            .unwrap();
        assert!(out.failed.is_empty(), "{out:?}");
        let p = r.index_progress();
        assert_eq!(
            (p.indexed_segments, p.indexed_rows, p.load_failures),
            (2, 1200, 0),
            "{p:?}"
        );
        assert!(p.index_bytes > 0, "{p:?}");
        // The exact answer: a replica that ignores the index files.
        let (flat, _) =
            Collection::open_read_only(meta.clone(), &rec, schema.clone(), &data, only(&segs))
                .await
                .unwrap();
        let queries = random_batch(5000..5020).vectors;
        let ids = all_ids(&segs);
        let search = |c: &Collection, nprobe: Option<usize>| {
            let params = SearchParams { nprobe, ef: None };
            ids_of(
                &c.search_segments(&ids, &queries, 10, &params, None, Output::default())
                    .unwrap()
                    .0,
            )
        };
        let exact = search(&flat, Some(1));
        // Probing every list is exact; probing one list of 16 misses neighbours, which FLAT never
        // does: the answer came through the IVF index.
        assert_eq!(search(&r, Some(16)), exact);
        let one = search(&r, Some(1));
        let found: usize = one
            .iter()
            .zip(&exact)
            .map(|(a, b)| a.iter().filter(|id| b.contains(id)).count())
            .sum();
        assert!(
            found < 10 * exact.len(),
            "nprobe=1 found every exact neighbour"
        );
        assert!(found > 0);
        // The definition's range applies on the replica too.
        assert!(matches!(
            r.search_segments(
                &ids,
                &queries,
                10,
                &SearchParams {
                    nprobe: Some(17),
                    ef: None
                },
                None,
                Output::default()
            ),
            Err(CollectionError::Index(IndexError::InvalidParam { .. }))
        ));

        // A corrupt file: a fresh replica serves that segment with FLAT, says so, and does not fail.
        let path = collection_dir(&data, rec.id)
            .join(&first.file)
            .join(crate::index::INDEX_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let (bad, out) =
            Collection::open_read_only(meta.clone(), &rec, schema.clone(), &data, full)
                .await
                .unwrap();
        assert!(out.failed.is_empty(), "{out:?}");
        let p = bad.index_progress();
        assert_eq!(
            (p.indexed_segments, p.flat_segments, p.load_failures),
            (1, 1, 1),
            "{p:?}"
        );
        assert_eq!(p.load_failure_reasons[0].0, first.segment_id as u64);
        assert_eq!(search(&bad, Some(16)), exact);
        // An unchanged listing is not read again.
        assert!(!bad.refresh(&rec, full).await.unwrap().changed);
        assert_eq!(bad.index_progress().load_failures, 1);

        // The writer commits a rebuilt file: the replica maps it at its next refresh.
        let job_dir = collection_dir(&data, rec.id).join(&first.file);
        let seg = w
            .inner
            .state
            .read()
            .sealed
            .get(&(first.segment_id as u64))
            .map(|e| e.data.clone())
            .unwrap();
        let ix = crate::index::build(
            IndexType::IVF_FLAT,
            Metric::L2,
            8,
            &serde_json::json!({"nlist": 16}),
            seg.flat().data(),
        )
        .unwrap();
        ix.persist(&job_dir).unwrap();
        let (crc, _) = crate::index::stored_crc(&job_dir).unwrap();
        let rebuilt = SegmentIndexRecord {
            crc: i64::from(crc),
            built_ms: 2,
            ..first.clone()
        };
        assert!(meta.commit_segment_index(&rebuilt).await.unwrap());
        let (segs, ixs, files) = listing(&meta.catalog_snapshot().await.unwrap());
        let next = ReplicaListing {
            segments: &segs,
            indexes: &ixs,
            segment_indexes: &files,
        };
        assert!(bad.refresh(&rec, next).await.unwrap().changed);
        assert_eq!(bad.index_progress().indexed_segments, 2);
        assert_ne!(search(&bad, Some(1)), exact);

        // Dropping the index puts every segment back on FLAT.
        meta.drop_index(rec.id, "vector").await.unwrap();
        let (segs, ixs, files) = listing(&meta.catalog_snapshot().await.unwrap());
        let next = ReplicaListing {
            segments: &segs,
            indexes: &ixs,
            segment_indexes: &files,
        };
        assert!(bad.refresh(&rec, next).await.unwrap().changed);
        let p = bad.index_progress();
        assert_eq!((p.indexed_segments, p.index_bytes), (0, 0), "{p:?}");
        assert_eq!(search(&bad, Some(1)), exact);
        w.close().await;
    }
}
