//! Fixtures shared by the core's unit tests and the engine crate's tests of what plugs into the
//! core (the reader's GPU offload searches a read-only `Collection` built with these). Compiled
//! only for tests and under the `test-support` feature, never into a production build.
#![allow(clippy::unwrap_used)]

use crate::meta::{CollectionRecord, IndexRecord, MetaStore, SegmentIndexRecord, SegmentRecord};
use crate::storage::ann::AnnDef;
use crate::storage::collection::{Collection, CollectionWrite, Schema, ShardHit, StorageOptions};
use crate::storage::wal::RowBatch;
use crate::types::Metric;
use std::sync::Arc;

/// A SQLite metadata store in `root` with one committed L2 collection `name` of `dim`.
pub async fn l2_collection(
    root: &std::path::Path,
    name: &str,
    dim: usize,
) -> (MetaStore, CollectionRecord, Schema) {
    let meta = MetaStore::open_sqlite(&root.join("meta.db")).await.unwrap();
    let mut rec = CollectionRecord::new(name, dim, "L2");
    rec.id = meta.create_collection(&rec).await.unwrap();
    let schema = Schema {
        name: name.into(),
        dim,
        metric: Metric::L2,
        auto_id: false,
        pk_field: "id".into(),
        vector_field: "vector".into(),
        dynamic: true,
    };
    (meta, rec, schema)
}

pub fn all_ids(meta_segs: &[SegmentRecord]) -> Vec<u64> {
    meta_segs.iter().map(|s| s.id as u64).collect()
}

/// Rows with pseudo-random vectors in [0, 1)^8 (a fixed LCG, so the test is deterministic).
pub fn random_batch(ids: std::ops::Range<i64>) -> RowBatch {
    let mut b = RowBatch::new(8);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for id in ids {
        b.ids.push(id);
        for _ in 0..8 {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407 ^ id as u64);
            b.vectors.push((x >> 40) as f32 / (1u64 << 24) as f32);
        }
        b.fields.push(Vec::new());
    }
    b
}

/// What the writer's background builder does for one claimed job: build, persist, commit.
pub async fn build_and_commit(
    meta: &MetaStore,
    w: &Collection,
    built_ms: i64,
) -> SegmentIndexRecord {
    let job = w.claim_index_job().expect("a segment waits for its index");
    let ix = crate::index::build(
        job.def.index_type,
        job.metric,
        job.dim,
        &job.def.params,
        job.data.flat().data(),
    )
    .expect("build");
    ix.persist(&job.dir).expect("persist");
    let (crc, bytes) = crate::index::stored_crc(&job.dir).expect("crc");
    let rec = job.index_record(crc, bytes, built_ms);
    assert!(meta.commit_segment_index(&rec).await.expect("commit"));
    let mapped = crate::index::load(&job.dir).expect("load");
    assert!(w.finish_index(&job, Ok(Arc::from(mapped))));
    rec
}

/// A writer `Collection` (index_min_rows 100) with two flushed 600-row segments (ids
/// 0..1200) and an IVF_FLAT (nlist 16) index built and committed for each; returns the
/// writer and the first segment's index record.
pub async fn two_ivf_flat_segments(
    meta: &MetaStore,
    rec: &CollectionRecord,
    schema: &Schema,
    data: &std::path::Path,
) -> (Collection, SegmentIndexRecord) {
    let opts = StorageOptions {
        index_min_rows: 100,
        ..StorageOptions::default()
    };
    let w = Collection::open(meta.clone(), rec, schema.clone(), data, opts)
        .await
        .unwrap();
    for part in 0..2 {
        w.upsert(random_batch(part * 600..(part + 1) * 600))
            .await
            .unwrap();
        w.flush().await.unwrap();
    }
    let def = IndexRecord {
        collection_id: rec.id,
        index_name: "vector".into(),
        field_name: "vector".into(),
        index_type: "IVF_FLAT".into(),
        metric: "L2".into(),
        params: r#"{"nlist":16}"#.into(),
    };
    meta.put_index(&def).await.unwrap();
    assert!(w.set_ann_def(AnnDef::from_record(&def)));
    let first = build_and_commit(meta, &w, 1).await;
    build_and_commit(meta, &w, 1).await;
    (w, first)
}

/// Collection `id`'s segments, index definitions and committed index files in `snap`.
pub fn catalog_of(
    snap: &crate::meta::CatalogSnapshot,
    id: i64,
) -> (
    Vec<SegmentRecord>,
    Vec<IndexRecord>,
    Vec<SegmentIndexRecord>,
) {
    (
        snap.segments.get(&id).cloned().unwrap_or_default(),
        snap.indexes.get(&id).cloned().unwrap_or_default(),
        snap.segment_indexes.get(&id).cloned().unwrap_or_default(),
    )
}

pub fn ids_of(hits: &[Vec<ShardHit>]) -> Vec<Vec<i64>> {
    hits.iter()
        .map(|q| q.iter().map(|h| h.row.id).collect())
        .collect()
}
