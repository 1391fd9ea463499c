//! The read-only replica side of [`Collection`], used by the reader role.
//!
//! A replica maps the committed sealed segments of a collection from the shared data directory
//! and follows the metadata store: [`Collection::refresh`] applies a catalogue listing (new
//! segments, dropped segments, new tombstone versions) by loading what changed on the blocking
//! pool and swapping it in under the state lock.
//!
//! Guarantees: a replica never writes to the data directory (no WAL, no committer, no stray-file
//! removal, no tombstone clean-up; writes and flushes fail with `WriterStopped`), so it runs on a
//! read-only mount. Searches over a subset of segments return the engine's internal distances
//! (smaller is better), which the router merges across readers.

use super::*;
use std::collections::BinaryHeap;

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

/// Runs a sealed segment's FLAT scan somewhere other than the CPU: the reader's GPU searcher
/// (`crate::gpu::offload::GpuOffload`). Core only defines the hook, so the storage core depends
/// on nothing outside core.
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
}

/// A search hit with the engine's internal distance (smaller is better).
#[derive(Debug, Clone, PartialEq)]
pub struct ShardHit {
    pub distance: f32,
    pub row: RowOut,
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl Collection {
    /// Open a read-only replica of a committed collection and load `segments` (the catalogue's
    /// listing for it). Touches nothing on disk but reads.
    ///
    /// Errors: only a failed background task; segments that fail to load are reported in the
    /// outcome and not served.
    pub async fn open_read_only(
        meta: MetaStore,
        rec: &CollectionRecord,
        schema: Schema,
        data_root: &Path,
        segments: &[SegmentRecord],
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
            // Readers search sealed segments with FLAT for now; mapping the writer's committed
            // index files here is the next step (the files and their metadata rows are shared).
            ann_def: RwLock::new(None),
            ann_failed: Mutex::new(BTreeMap::new()),
            ann_building: Mutex::new(BTreeSet::new()),
            ann_load_failures: AtomicU64::new(0),
            ann_load_reasons: Mutex::new(Vec::new()),
        };
        let out = c.refresh(rec, segments).await?;
        Ok((c, out))
    }

    /// Bring a replica to the catalogue's listing `segments` for this collection: load new
    /// segments and new tombstone versions, forget dropped segments, and take the load state
    /// from `rec`. Segments that fail to load are not served until a later refresh loads them.
    ///
    /// Errors: called on a writable collection, or a failed background task.
    pub async fn refresh(
        &self,
        rec: &CollectionRecord,
        segments: &[SegmentRecord],
    ) -> Result<RefreshOutcome, CollectionError> {
        if !self.read_only {
            return Err(CollectionError::Task(
                "refresh applies to read-only replicas only".into(),
            ));
        }
        self.loaded.store(rec.loaded, Ordering::SeqCst);
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
                        st.sealed.insert(
                            id,
                            SegEntry {
                                data,
                                deleted,
                                committed: true,
                                tomb_seq: r.tomb_seq as u64,
                                ann: None,
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

    /// [`Collection::search_segments`] with FLAT segment scans offered to `offload` first (the
    /// reader's GPU); a segment it declines is scanned on the CPU. Filters and deletes reach the
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
                let flat = e.data.flat();
                let offloaded = offload.and_then(|o| {
                    let manifest_crc = *self.served.lock().get(&sid)?;
                    let key = SegmentKey {
                        collection_id: self.inner.collection_id,
                        segment: sid,
                        manifest_crc,
                    };
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

    fn all_ids(meta_segs: &[SegmentRecord]) -> Vec<u64> {
        meta_segs.iter().map(|s| s.id as u64).collect()
    }

    #[tokio::test]
    async fn a_replica_follows_flushes_deletes_and_compaction_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let meta = MetaStore::open_sqlite(&dir.path().join("meta.db"))
            .await
            .unwrap();
        let mut rec = CollectionRecord {
            id: 0,
            name: "r".into(),
            dim: 4,
            metric: "L2".into(),
            auto_id: false,
            pk_field: "id".into(),
            vector_field: "vector".into(),
            dynamic: true,
            loaded: true,
            flushed_seq: 0,
            created_ms: 0,
        };
        rec.id = meta.create_collection(&rec).await.unwrap();
        let schema = Schema {
            name: "r".into(),
            dim: 4,
            metric: Metric::L2,
            auto_id: false,
            pk_field: "id".into(),
            vector_field: "vector".into(),
            dynamic: true,
        };
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
        let (r, out) = Collection::open_read_only(meta.clone(), &rec, schema, &data, &segs)
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
        assert!(r.refresh(&rec, &segs).await.unwrap().changed);
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
        assert!(!r.refresh(&rec, &segs).await.unwrap().changed);

        // Compaction replaces the first segment; the replica drops it and maps the new one.
        w.delete((0..15).collect()).await.unwrap();
        w.flush().await.unwrap();
        let segs2 = meta.segments(rec.id).await.unwrap();
        assert_ne!(all_ids(&segs2), all_ids(&segs), "no compaction happened");
        let before = listing(&data);
        r.refresh(&rec, &segs2).await.unwrap();
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
        r.refresh(&released, &segs2).await.unwrap();
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
}
