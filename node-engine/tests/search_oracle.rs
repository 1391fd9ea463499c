//! Search correctness against a brute-force oracle: for L2, IP and COSINE, with filters,
//! deletes and upserts, over sealed segments, the growing buffer and a compacted segment, and
//! after a restart.
#![allow(clippy::unwrap_used)]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shoal_engine::core::engine::{Engine, EngineConfig};
use shoal_engine::core::filter::Filter;
use shoal_engine::core::index::SearchParams;
use shoal_engine::core::storage::collection::{
    CollectionRead, CollectionWrite, Output, Schema, StorageOptions,
};
use shoal_engine::core::storage::wal::RowBatch;
use shoal_engine::core::types::Metric;
use std::collections::BTreeMap;
use std::time::Duration;

const DIM: usize = 24;

/// The oracle's version of a filter: (id, the row's numeric field) -> kept.
type RowPredicate = fn(i64, f64) -> bool;

fn oracle_score(metric: Metric, q: &[f32], v: &[f32]) -> f32 {
    let dot: f32 = q.iter().zip(v).map(|(a, b)| a * b).sum();
    match metric {
        Metric::L2 => q.iter().zip(v).map(|(a, b)| (a - b) * (a - b)).sum(),
        Metric::IP => dot,
        Metric::COSINE => {
            let nq = q.iter().map(|x| x * x).sum::<f32>().sqrt();
            let nv = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            if nq == 0.0 || nv == 0.0 {
                0.0
            } else {
                dot / (nq * nv)
            }
        }
    }
}

struct Model {
    rows: BTreeMap<i64, (Vec<f32>, i64, f64)>,
}

fn batch(rows: &[(i64, Vec<f32>, i64, f64)]) -> RowBatch {
    RowBatch {
        dim: DIM,
        ids: rows.iter().map(|r| r.0).collect(),
        vectors: rows.iter().flat_map(|r| r.1.clone()).collect(),
        fields: rows
            .iter()
            .map(|r| serde_json::to_vec(&serde_json::json!({"tag": r.2, "score": r.3})).unwrap())
            .collect(),
    }
}

fn check(
    metric: Metric,
    c: &dyn CollectionRead,
    m: &Model,
    queries: &[Vec<f32>],
    filter: Option<(&str, RowPredicate)>,
    k: usize,
) {
    let parsed = filter.map(|(s, _)| Filter::parse(s).unwrap());
    let flat: Vec<f32> = queries.iter().flatten().copied().collect();
    let got = c
        .search(
            &flat,
            k,
            &SearchParams::default(),
            parsed.as_ref(),
            Output::default(),
        )
        .unwrap();
    for (qi, q) in queries.iter().enumerate() {
        let mut want: Vec<(f32, i64)> = m
            .rows
            .iter()
            .filter(|(_, (_, tag, score))| filter.is_none_or(|(_, f)| f(*tag, *score)))
            .map(|(id, (v, _, _))| (oracle_score(metric, q, v), *id))
            .collect();
        match metric {
            Metric::L2 => want.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1))),
            Metric::IP | Metric::COSINE => {
                want.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)))
            }
        }
        want.truncate(k);
        let g = &got[qi];
        assert_eq!(g.len(), want.len(), "{metric} q{qi}: result count");
        for (rank, (h, w)) in g.iter().zip(&want).enumerate() {
            let tol = 1e-3 * w.0.abs().max(1.0);
            assert!(
                (h.score - w.0).abs() <= tol,
                "{metric} q{qi} rank {rank}: score {} vs oracle {}",
                h.score,
                w.0
            );
            if h.row.id != w.1 {
                // Only a tie may reorder ids: the oracle's score for the returned id must match.
                let (v, _, _) = &m.rows[&h.row.id];
                assert!(
                    (oracle_score(metric, q, v) - w.0).abs() <= tol,
                    "{metric} q{qi} rank {rank}: id {} vs {}",
                    h.row.id,
                    w.1
                );
            }
        }
    }
}

async fn run_metric(metric: Metric) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = EngineConfig {
        data_dir: dir.path().to_path_buf(),
        meta_url: None,
        flush_interval: Duration::from_secs(3600),
        storage: StorageOptions {
            flush_bytes: 64 << 20,
            compact_deleted_fraction: 0.3,
            ..StorageOptions::default()
        },
    };
    let engine = Engine::open(&cfg).await.unwrap();
    let schema = Schema {
        name: "o".into(),
        dim: DIM,
        metric,
        auto_id: false,
        pk_field: "id".into(),
        vector_field: "vector".into(),
        dynamic: true,
    };
    let c = engine.create_collection(schema).await.unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut model = Model {
        rows: BTreeMap::new(),
    };
    let gen_rows =
        |rng: &mut ChaCha8Rng, ids: std::ops::Range<i64>| -> Vec<(i64, Vec<f32>, i64, f64)> {
            ids.map(|id| {
                let center = (id % 7) as f32;
                let v: Vec<f32> = (0..DIM)
                    .map(|_| center + rng.random_range(-1.0f32..1.0))
                    .collect();
                (id, v, id % 5, rng.random_range(0.0..1.0))
            })
            .collect()
        };
    // Three sealed segments, then rows in the growing buffer.
    for part in 0..3 {
        let rows = gen_rows(&mut rng, part * 700..(part + 1) * 700);
        c.upsert(batch(&rows)).await.unwrap();
        for r in rows {
            model.rows.insert(r.0, (r.1, r.2, r.3));
        }
        c.flush().await.unwrap();
    }
    let rows = gen_rows(&mut rng, 2100..2500);
    c.upsert(batch(&rows)).await.unwrap();
    for r in rows {
        model.rows.insert(r.0, (r.1, r.2, r.3));
    }
    // Upserts across segments and the buffer move rows; deletes hit both.
    let ups: Vec<_> = (0..60)
        .map(|i| {
            let id = i * 41 % 2500;
            let v: Vec<f32> = (0..DIM).map(|_| rng.random_range(-3.0f32..3.0)).collect();
            (id, v, 4, 0.99)
        })
        .collect();
    c.upsert(batch(&ups)).await.unwrap();
    for r in ups {
        model.rows.insert(r.0, (r.1, r.2, r.3));
    }
    let dels: Vec<i64> = (0..2500).filter(|i| i % 9 == 0).collect();
    c.delete(dels.clone()).await.unwrap();
    for d in &dels {
        model.rows.remove(d);
    }
    // Most of the first segment deleted: the next flush compacts it.
    let dels2: Vec<i64> = (0..700).filter(|i| i % 9 != 0 && i % 2 == 0).collect();
    c.delete(dels2.clone()).await.unwrap();
    for d in &dels2 {
        model.rows.remove(d);
    }
    let queries: Vec<Vec<f32>> = (0..12)
        .map(|i| {
            (0..DIM)
                .map(|_| (i % 7) as f32 + rng.random_range(-1.5f32..1.5))
                .collect()
        })
        .collect();
    let filt: (&str, fn(i64, f64) -> bool) = ("tag in [1, 4] and score > 0.25", |t, s| {
        (t == 1 || t == 4) && s > 0.25
    });
    let filt2: (&str, fn(i64, f64) -> bool) =
        ("not (tag == 2) or score < 0.1", |t, s| t != 2 || s < 0.1);
    check(metric, &*c, &model, &queries, None, 10);
    check(metric, &*c, &model, &queries, Some(filt), 25);
    check(metric, &*c, &model, &queries[..1], Some(filt2), 300);
    assert_eq!(c.count(None), model.rows.len());
    let before = c.stats().sealed_segments;
    c.flush().await.unwrap();
    assert!(
        c.stats().sealed_segments <= before + 1,
        "compaction rewrote the mostly-deleted segment"
    );
    check(metric, &*c, &model, &queries, Some(filt), 25);
    // Restart: committed segments + tombstones + WAL give the same answers.
    engine.shutdown().await;
    drop(c);
    drop(engine);
    let engine = Engine::open(&cfg).await.unwrap();
    let c = engine.collection("o").unwrap();
    check(metric, &*c, &model, &queries, None, 10);
    check(metric, &*c, &model, &queries, Some(filt), 25);
    assert_eq!(c.count(None), model.rows.len());
    let got = c.get(
        &[3, 41, 9],
        Output {
            vector: true,
            fields: true,
        },
    );
    assert_eq!(got.len(), 2, "9 was deleted");
    for r in got {
        assert_eq!(r.vector.as_ref().unwrap(), &model.rows[&r.id].0);
    }
}

#[tokio::test]
async fn l2_search_matches_brute_force_with_filters_deletes_upserts_and_restart() {
    run_metric(Metric::L2).await;
}

#[tokio::test]
async fn ip_search_matches_brute_force_with_filters_deletes_upserts_and_restart() {
    run_metric(Metric::IP).await;
}

#[tokio::test]
async fn cosine_search_matches_brute_force_with_filters_deletes_upserts_and_restart() {
    run_metric(Metric::COSINE).await;
}
