//! The reader's view of the catalogue: [`ReplicaCatalog`], every collection as a read-only
//! replica of its sealed segments (the reader's [`ShardBackend`]: it follows the catalogue,
//! loads and preloads segments, and answers SearchShard/GetRows/QueryShard). The version it
//! serves is tracked by the service's `VersionGate`.

use super::service::{ShardBackend, ShardError, ShardQuery};
use crate::api::rest::MAX_TOPK;
use crate::core::engine::schema_of;
use crate::core::error::Classify;
use crate::core::error_chain as chain;
use crate::core::filter::Filter;
use crate::core::index::SearchParams;
use crate::core::meta::{CatalogSnapshot, MetaStore};
use crate::core::storage::collection::{
    Collection, CollectionError, CollectionRead, FlatOffload, Output, ReplicaListing, RowOut,
    Schema, SegmentSelection,
};
use crate::gpu::GpuOffload;
use crate::rpc::pb::{GetRowsRequest, Hit, QueryHits, QueryShardRequest, ResultRow, RowsResponse};
use parking_lot::RwLock;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A listed segment that failed to load: (collection id, segment id, reason).
type Failed = (i64, u64, String);

/// How long a listed segment may fail to load (e.g. the shared filesystem has not shown the
/// writer's files to this client yet) before the reader serves newer versions without it
/// (requests naming it then fail as unavailable, so the router asks another reader).
const FAILED_SEGMENT_GRACE: Duration = Duration::from_secs(30);

/// How long `/readyz` waits for the metadata store's answer.
const META_PING_TIMEOUT: Duration = Duration::from_millis(500);

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
    /// Where FLAT segment scans go before the CPU (`None`: CPU only).
    gpu: Option<Arc<GpuOffload>>,
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
            gpu: None,
        }
    }

    /// Search FLAT segments through `gpu` first (see the module docs).
    pub fn with_gpu(mut self, gpu: Arc<GpuOffload>) -> Self {
        self.gpu = Some(gpu);
        self
    }

    /// (collection id, segment id) of every segment served now.
    fn served_segments(&self) -> BTreeSet<(i64, u64)> {
        self.collections
            .read()
            .values()
            .flat_map(|c| {
                let id = c.collection_id();
                c.segment_ids().into_iter().map(move |s| (id, s))
            })
            .collect()
    }

    /// The catalogue version served (every segment and tombstone committed up to it).
    pub fn served_version(&self) -> u64 {
        self.served.load(Ordering::SeqCst)
    }

    /// `Err(reason)` when the metadata store does not answer within [`META_PING_TIMEOUT`].
    pub async fn ping_meta(&self) -> Result<(), String> {
        match tokio::time::timeout(META_PING_TIMEOUT, self.meta.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("metadata store unavailable: {}", chain(&e))),
            Err(_) => Err(format!(
                "metadata store unavailable: no answer within {META_PING_TIMEOUT:?}"
            )),
        }
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

    pub(super) fn get(&self, name: &str) -> Result<Arc<Collection>, ShardError> {
        self.collections
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| ShardError::CollectionNotFound(name.to_string()))
    }

    /// Apply one snapshot; returns the segments that failed to load (collection id, segment
    /// id, reason).
    pub(super) async fn apply(&self, snap: &CatalogSnapshot) -> Result<Vec<Failed>, ShardError> {
        let before = self.gpu.as_ref().map(|_| self.served_segments());
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
        // Segments no longer served (compacted away, collection dropped) leave the GPU too.
        if let (Some(gpu), Some(before)) = (&self.gpu, before) {
            let after = self.served_segments();
            for (c, seg) in before.difference(&after) {
                gpu.forget_segment(*c, *seg);
            }
        }
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

/// A get/query answer: `rows` with their requested output fields, of `match_count` matches
/// (the service sets the catalogue version).
fn rows_response(
    s: &Schema,
    names: &[String],
    rows: &[RowOut],
    match_count: usize,
    unknown: Vec<u64>,
) -> RowsResponse {
    RowsResponse {
        match_count: match_count as u64,
        rows: rows
            .iter()
            .map(|row| ResultRow {
                id: row.id,
                fields_json: fields_json(s, names, row),
            })
            .collect(),
        unknown_segments: unknown,
        catalog_version: 0,
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

/// A core error as the reader's answer, by its kind: a user error is the request's fault (the
/// router must not retry it elsewhere); any service error makes the router ask another reader.
fn collection_err(e: CollectionError) -> ShardError {
    if e.kind().is_user() {
        ShardError::InvalidRequest(e.to_string())
    } else {
        ShardError::SegmentUnavailable {
            segment: 0,
            reason: chain(&e),
        }
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
        let offload = self.gpu.as_deref().map(|g| g as &dyn FlatOffload);
        let (hits, sel) = c
            .search_segments_with(
                &q.segment_ids,
                &q.queries,
                top_k,
                &params,
                filter.as_ref(),
                output_of(s, &q.output_fields),
                offload,
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
        Ok(rows_response(
            s,
            &r.output_fields,
            &rows,
            rows.len(),
            sel.unknown,
        ))
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
        Ok(rows_response(
            s,
            &r.output_fields,
            &rows,
            count,
            sel.unknown,
        ))
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
