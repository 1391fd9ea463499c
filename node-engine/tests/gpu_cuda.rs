//! GPU search on a real CUDA device against the CPU oracle. Every test here needs an NVIDIA GPU
//! with the driver, cuBLAS 12 and NVRTC 12 loadable, so they are `#[ignore]`d in CI; run them on a
//! GPU machine with
//! `cargo test -p shoal-engine --release --test gpu_cuda -- --ignored --test-threads=1`
//! (BENCHMARKS.md, "GPU readers", has the full list, including compute-sanitizer).
#![allow(clippy::unwrap_used)]
#![cfg(feature = "gpu")]

use rand::{Rng, SeedableRng};
use shoal_engine::core::bitset::Bitset;
use shoal_engine::core::distance;
use shoal_engine::core::types::{Metric, Neighbor};
use shoal_engine::gpu::backend::GpuBackend;
use shoal_engine::gpu::cuda::{self, CudaBackend};
use shoal_engine::gpu::{DeviceSelection, GpuSearch, GpuSearcher, IvfList};

const NEEDS_GPU: &str = "needs an NVIDIA GPU with libcuda, libcublas.so.12 and libnvrtc.so.12";

fn searcher(budget: u64, workspace: u64) -> GpuSearcher<CudaBackend> {
    let devices = cuda::probe(&DeviceSelection::All).unwrap_or_else(|e| panic!("{NEEDS_GPU}: {e}"));
    GpuSearcher::new(devices, budget, 0, workspace).unwrap()
}

/// Gaussian-ish clustered data: `centers` random centres, points = centre + noise.
fn clustered(rng: &mut impl Rng, n: usize, dim: usize, centers: usize) -> Vec<f32> {
    let c: Vec<f32> = (0..centers * dim)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let mut out = Vec::with_capacity(n * dim);
    for _ in 0..n {
        let ci = rng.random_range(0..centers);
        for d in 0..dim {
            out.push(c[ci * dim + d] + rng.random_range(-0.15f32..0.15));
        }
    }
    out
}

/// Exact CPU oracle (f32 kernels of the engine), sorted by rank.
fn oracle(
    base: &[f32],
    dim: usize,
    metric: Metric,
    queries: &[f32],
    k: usize,
    allowed: Option<&Bitset>,
) -> Vec<Vec<Neighbor>> {
    let prep = |v: &[f32]| {
        let mut v = v.to_vec();
        if metric == Metric::COSINE {
            distance::normalize(&mut v);
        }
        v
    };
    let base_p: Vec<Vec<f32>> = base.chunks(dim).map(prep).collect();
    queries
        .chunks(dim)
        .map(|q| {
            let q = prep(q);
            let mut all: Vec<Neighbor> = base_p
                .iter()
                .enumerate()
                .filter(|(r, _)| allowed.is_none_or(|a| a.contains(*r)))
                .map(|(r, x)| Neighbor {
                    row: r as u32,
                    dist: match metric {
                        Metric::L2 => distance::l2_sq(&q, x),
                        Metric::IP | Metric::COSINE => -distance::dot(&q, x),
                    },
                })
                .collect();
            all.sort_by(Neighbor::cmp_rank);
            all.truncate(k);
            all
        })
        .collect()
}

/// GPU hits equal the oracle: same length, distances within `tol` rank by rank, and any id that
/// differs is a tie at the boundary (its exact distance within `tol` of the oracle's k-th).
fn assert_matches(gpu: &[Vec<Neighbor>], cpu: &[Vec<Neighbor>], tol: f32, what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: query count");
    let mut differing = 0usize;
    for (qi, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        assert_eq!(g.len(), c.len(), "{what}: query {qi} hit count");
        for (i, (a, b)) in g.iter().zip(c).enumerate() {
            let t = tol * (1.0 + b.dist.abs());
            assert!(
                (a.dist - b.dist).abs() <= t,
                "{what}: query {qi} rank {i}: gpu {a:?} cpu {b:?}"
            );
        }
        let kth = c.last().map(|n| n.dist).unwrap_or(0.0);
        for a in g {
            if !c.iter().any(|b| b.row == a.row) {
                differing += 1;
                assert!(
                    (a.dist - kth).abs() <= tol * (1.0 + kth.abs()),
                    "{what}: query {qi}: gpu row {a:?} not in cpu top-k"
                );
            }
        }
    }
    let total: usize = cpu.iter().map(Vec::len).sum();
    assert!(
        differing * 1000 <= total,
        "{what}: {differing} of {total} ids differ (boundary ties)"
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU with libcuda, libcublas.so.12 and libnvrtc.so.12"]
fn gpu_flat_equals_the_cpu_oracle_for_l2_ip_and_cosine_at_top10_and_top100() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let (n, dim, nq) = (20_000, 128, 300);
    let base = clustered(&mut rng, n, dim, 64);
    let queries = clustered(&mut rng, nq, dim, 64);
    let s = searcher(1 << 30, 256 << 20);
    for metric in [Metric::L2, Metric::IP, Metric::COSINE] {
        for k in [10, 100] {
            let gpu = s
                .search_flat(1, &base, dim, metric, &queries, k, None)
                .unwrap();
            let cpu = oracle(&base, dim, metric, &queries, k, None);
            assert_matches(&gpu, &cpu, 1e-4, &format!("{metric} k={k}"));
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU with libcuda, libcublas.so.12 and libnvrtc.so.12"]
fn gpu_flat_tiles_rows_and_queries_when_the_workspace_is_small_and_stays_exact() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(43);
    let (n, dim, nq, k) = (50_003, 96, 257, 50);
    let base = clustered(&mut rng, n, dim, 32);
    let queries = clustered(&mut rng, nq, dim, 32);
    // 8 MiB: a few queries per batch and several row tiles.
    let s = searcher(1 << 30, 8 << 20);
    let gpu = s
        .search_flat(2, &base, dim, Metric::L2, &queries, k, None)
        .unwrap();
    assert_matches(
        &gpu,
        &oracle(&base, dim, Metric::L2, &queries, k, None),
        1e-4,
        "tiled L2",
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU with libcuda, libcublas.so.12 and libnvrtc.so.12"]
fn gpu_flat_honours_filters_and_returns_every_allowed_row_when_fewer_than_k() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(44);
    let (n, dim, nq) = (10_000, 64, 64);
    let base = clustered(&mut rng, n, dim, 16);
    let queries = clustered(&mut rng, nq, dim, 16);
    let s = searcher(1 << 30, 64 << 20);
    let mut half = Bitset::new_empty(n);
    for r in (0..n).filter(|r| r % 2 == 1) {
        half.insert(r);
    }
    let gpu = s
        .search_flat(3, &base, dim, Metric::IP, &queries, 20, Some(&half))
        .unwrap();
    assert_matches(
        &gpu,
        &oracle(&base, dim, Metric::IP, &queries, 20, Some(&half)),
        1e-4,
        "filtered IP",
    );
    assert!(gpu.iter().flatten().all(|h| h.row % 2 == 1));
    let mut few = Bitset::new_empty(n);
    for r in [5usize, 500, 5000] {
        few.insert(r);
    }
    let gpu = s
        .search_flat(3, &base, dim, Metric::L2, &queries, 20, Some(&few))
        .unwrap();
    assert!(gpu.iter().all(|h| h.len() == 3));
    // A segment smaller than k returns all its rows.
    let small = &base[..40 * dim];
    let gpu = s
        .search_flat(4, small, dim, Metric::L2, &queries, 100, None)
        .unwrap();
    assert_matches(
        &gpu,
        &oracle(small, dim, Metric::L2, &queries, 100, None),
        1e-4,
        "k > rows",
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU with libcuda, libcublas.so.12 and libnvrtc.so.12"]
fn gpu_flat_returns_valid_hits_when_many_rows_tie_at_the_kth_distance() {
    let dim = 32;
    // 1000 copies of the same vector and 10 closer ones: the k-th distance is a 1000-way tie.
    let mut base = vec![0.5f32; 1000 * dim];
    base.extend(std::iter::repeat_n(0.1f32, 10 * dim));
    let queries = vec![0.0f32; 4 * dim];
    let s = searcher(1 << 30, 64 << 20);
    let gpu = s
        .search_flat(5, &base, dim, Metric::L2, &queries, 25, None)
        .unwrap();
    for hits in &gpu {
        assert_eq!(hits.len(), 25);
        let rows: std::collections::HashSet<u32> = hits.iter().map(|h| h.row).collect();
        assert_eq!(rows.len(), 25, "no duplicate rows");
        assert!(
            (1000..1010).all(|r| rows.contains(&r)),
            "the 10 closer rows are all in"
        );
        assert!(hits.windows(2).all(|w| w[0].cmp_rank(&w[1]).is_le()));
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU with libcuda, libcublas.so.12 and libnvrtc.so.12"]
fn gpu_residency_stays_within_the_budget_and_evicted_segments_are_reloaded_correctly() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(45);
    let (n, dim, nq, k) = (20_000, 64, 32, 10);
    let segs: Vec<Vec<f32>> = (0..3).map(|_| clustered(&mut rng, n, dim, 8)).collect();
    let queries = clustered(&mut rng, nq, dim, 8);
    let block = 4 * n as u64 * (dim as u64 + 1);
    let s = searcher(2 * block, 64 << 20);
    for round in 0..3 {
        for (i, seg) in segs.iter().enumerate() {
            let gpu = s
                .search_flat(10 + i as u64, seg, dim, Metric::L2, &queries, k, None)
                .unwrap();
            assert_matches(
                &gpu,
                &oracle(seg, dim, Metric::L2, &queries, k, None),
                1e-4,
                &format!("round {round} seg {i}"),
            );
            let used: u64 = s.resident().iter().map(|r| r.used_bytes).sum();
            assert!(
                s.resident().iter().all(|r| r.used_bytes <= r.budget_bytes),
                "{:?}",
                s.resident()
            );
            assert!(used <= 2 * block * s.resident().len() as u64);
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU with libcuda, libcublas.so.12 and libnvrtc.so.12"]
fn gpu_ivf_list_scan_finds_exactly_what_the_cpu_list_scan_finds_at_the_same_nprobe() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(46);
    let (n, dim, nq, k, nlist, nprobe) = (30_000, 64, 500, 10, 64, 8);
    let base = clustered(&mut rng, n, dim, 128);
    let queries = clustered(&mut rng, nq, dim, 128);
    // Coarse quantiser: nlist rows of the data as centroids, every row to its nearest one.
    let centroids: Vec<f32> = base[..nlist * dim].to_vec();
    let s = searcher(1 << 30, 256 << 20);
    let assign = s
        .search_flat(100, &centroids, dim, Metric::L2, &base, 1, None)
        .unwrap();
    let mut list_rows: Vec<Vec<u32>> = vec![Vec::new(); nlist];
    for (r, a) in assign.iter().enumerate() {
        list_rows[a[0].row as usize].push(r as u32);
    }
    let list_vecs: Vec<Vec<f32>> = list_rows
        .iter()
        .map(|rs| {
            rs.iter()
                .flat_map(|&r| base[r as usize * dim..(r as usize + 1) * dim].to_vec())
                .collect()
        })
        .collect();
    let lists: Vec<IvfList> = (0..nlist)
        .map(|l| IvfList {
            vectors: &list_vecs[l],
            rows: &list_rows[l],
        })
        .collect();
    let probes: Vec<Vec<u32>> = oracle(&centroids, dim, Metric::L2, &queries, nprobe, None)
        .into_iter()
        .map(|hits| hits.into_iter().map(|h| h.row).collect())
        .collect();
    let gpu = s
        .search_ivf(7, &lists, &probes, dim, Metric::L2, &queries, k, None)
        .unwrap();
    // CPU list scan: exact search restricted to the probed lists' rows.
    let mut cpu = Vec::new();
    for (qi, p) in probes.iter().enumerate() {
        let mut allowed = Bitset::new_empty(n);
        for &l in p {
            for &r in &list_rows[l as usize] {
                allowed.insert(r as usize);
            }
        }
        cpu.extend(oracle(
            &base,
            dim,
            Metric::L2,
            &queries[qi * dim..(qi + 1) * dim],
            k,
            Some(&allowed),
        ));
    }
    assert_matches(&gpu, &cpu, 1e-4, "IVF_FLAT list scan");
    // Same recall@k against exact FLAT as the CPU scan.
    let exact = oracle(&base, dim, Metric::L2, &queries, k, None);
    let recall = |res: &[Vec<Neighbor>]| -> f64 {
        let hit: usize = res
            .iter()
            .zip(&exact)
            .map(|(r, e)| {
                r.iter()
                    .filter(|h| e.iter().any(|x| x.row == h.row))
                    .count()
            })
            .sum();
        hit as f64 / (nq * k) as f64
    };
    let (rg, rc) = (recall(&gpu), recall(&cpu));
    assert!((rg - rc).abs() <= 0.002, "recall gpu {rg} cpu {rc}");
}

/// The reader's IVF_FLAT path on the device: the engine's own IVF_FLAT index searched through
/// `GpuOffload` (coarse step on the CPU, the index's probed lists scanned on the GPU) finds what
/// the index's CPU search finds at the same nprobe (ids, distances within 1e-4 relative; an id
/// may differ only at a tie on the k-th distance), so recall@10 against exact FLAT is the
/// CPU's, for L2/IP/COSINE, unfiltered and with a filter bitset (deletes + a predicate).
#[test]
#[ignore = "needs an NVIDIA GPU with libcuda, libcublas.so.12 and libnvrtc.so.12"]
fn gpu_ivf_flat_index_equals_the_cpu_ivf_flat_search_and_recall_at_the_same_nprobe() {
    use shoal_engine::core::index::ivf::{Codec, IvfIndex};
    use shoal_engine::core::index::{SearchParams, VectorIndexRead};
    use shoal_engine::core::storage::collection::{FlatOffload, SegmentKey};
    use shoal_engine::core::types::IndexType;
    use shoal_engine::gpu::GpuOffload;
    use std::sync::Arc;

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(47);
    let (n, dim, nq, k, nlist) = (40_000, 64, 400, 10, 256);
    let base = clustered(&mut rng, n, dim, 128);
    let queries = clustered(&mut rng, nq, dim, 128);
    let mut allowed = Bitset::new_empty(n);
    for r in (0..n).filter(|r| r % 3 != 0 && r % 101 != 0) {
        allowed.insert(r);
    }
    let offload = GpuOffload::new(Arc::new(searcher(1 << 30, 256 << 20)));
    for (i, metric) in [Metric::L2, Metric::IP, Metric::COSINE]
        .into_iter()
        .enumerate()
    {
        let index =
            IvfIndex::build(IndexType::IVF_FLAT, metric, dim, nlist, Codec::Flat, &base).unwrap();
        let key = SegmentKey {
            collection_id: 1,
            segment: i as u64,
            manifest_crc: 0,
        };
        for nprobe in [4usize, 16] {
            let params = SearchParams {
                nprobe: Some(nprobe),
                ef: None,
            };
            for filter in [None, Some(&allowed)] {
                let what = format!("{metric} nprobe={nprobe} filtered={}", filter.is_some());
                let cpu = index.search(&queries, k, &params, filter).unwrap();
                let gpu = offload
                    .search_ivf_flat(key, 1, &index, &queries, k, &params, filter)
                    .unwrap_or_else(|| panic!("{what}: the GPU path declined or failed"));
                assert_matches(&gpu, &cpu, 1e-4, &what);
                let exact = oracle(&base, dim, metric, &queries, k, filter);
                let recall = |res: &[Vec<Neighbor>]| -> f64 {
                    let hit: usize = res
                        .iter()
                        .zip(&exact)
                        .map(|(r, e)| {
                            r.iter()
                                .filter(|h| e.iter().any(|x| x.row == h.row))
                                .count()
                        })
                        .sum();
                    hit as f64 / (nq * k) as f64
                };
                let (rg, rc) = (recall(&gpu), recall(&cpu));
                assert!((rg - rc).abs() <= 0.002, "{what}: recall gpu {rg} cpu {rc}");
            }
        }
    }
    assert_eq!(offload.fallbacks(), 0);
}

#[test]
#[ignore = "needs an NVIDIA GPU with libcuda, libcublas.so.12 and libnvrtc.so.12"]
fn every_visible_device_opens_and_reports_memory() {
    let devices = cuda::probe(&DeviceSelection::All).unwrap_or_else(|e| panic!("{NEEDS_GPU}: {e}"));
    for d in &devices {
        let (free, total) = d.memory().unwrap();
        assert!(total > 0 && free <= total, "{}: {free}/{total}", d.name());
        assert!(d.compute_capability().0 >= 7);
    }
    let count = cuda::device_count().unwrap();
    assert!(matches!(
        cuda::probe(&DeviceSelection::List(vec![count])),
        Err(shoal_engine::gpu::GpuError::SelectDevices(_))
    ));
}

/// A committed collection `name` (`metric`, `dim`, explicit ids) in `meta`, and its schema.
async fn create_collection(
    meta: &shoal_engine::core::meta::MetaStore,
    name: &str,
    metric: &str,
    dim: usize,
) -> (
    shoal_engine::core::meta::CollectionRecord,
    shoal_engine::core::storage::collection::Schema,
) {
    let mut rec = shoal_engine::core::meta::CollectionRecord::new(name, dim, metric);
    rec.id = meta.create_collection(&rec).await.unwrap();
    let schema = shoal_engine::core::engine::schema_of(&rec).unwrap();
    (rec, schema)
}

/// A `SearchShard` answer as neighbour lists (row = the hit's id) for [`assert_matches`].
fn as_neighbors(hits: &[shoal_engine::rpc::pb::QueryHits]) -> Vec<Vec<Neighbor>> {
    hits.iter()
        .map(|h| {
            h.hits
                .iter()
                .map(|x| Neighbor {
                    row: x.id as u32,
                    dist: x.distance,
                })
                .collect()
        })
        .collect()
}

/// The reader path on the real device: `SearchShard` over a replica whose FLAT segments are
/// scanned through `GpuOffload` equals the CPU replica (ids, distances within 1e-4 relative;
/// an id may differ only at a tie on the k-th distance) for every metric, with a filter and
/// deletes, and every segment scan ran on the GPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an NVIDIA GPU with libcuda, libcublas.so.12 and libnvrtc.so.12"]
async fn reader_search_shard_on_the_gpu_equals_the_cpu_replica_for_every_metric() {
    use shoal_engine::core::meta::MetaStore;
    use shoal_engine::core::storage::collection::{Collection, CollectionWrite, StorageOptions};
    use shoal_engine::core::storage::wal::RowBatch;
    use shoal_engine::gpu::GpuOffload;
    use shoal_engine::roles::reader::catalog::ReplicaCatalog;
    use shoal_engine::roles::reader::service::{ShardBackend, ShardQuery};
    use std::sync::Arc;

    let (dim, per_segment, nq, k) = (64usize, 20_000i64, 1_200usize, 10usize);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let meta = MetaStore::open_sqlite(&dir.path().join("meta.db"))
        .await
        .unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let deleted: Vec<i64> = (0..3 * per_segment).step_by(97).collect();
    for (name, metric) in [("l2", "L2"), ("ip", "IP"), ("cos", "COSINE")] {
        let (rec, schema) = create_collection(&meta, name, metric, dim).await;
        let w = Collection::open(meta.clone(), &rec, schema, &data, StorageOptions::default())
            .await
            .unwrap();
        for part in 0..3 {
            let mut b = RowBatch::new(dim);
            b.vectors = clustered(&mut rng, per_segment as usize, dim, 32);
            b.ids = (part * per_segment..(part + 1) * per_segment).collect();
            b.fields = vec![Vec::new(); per_segment as usize];
            w.upsert(b).await.unwrap();
            w.flush().await.unwrap();
        }
        w.delete(deleted.clone()).await.unwrap();
        w.flush().await.unwrap();
        w.close().await;
    }
    let cpu = ReplicaCatalog::new(meta.clone(), data.clone());
    let offload = Arc::new(GpuOffload::new(Arc::new(searcher(4 << 30, 512 << 20))));
    let gpu = ReplicaCatalog::new(meta, data).with_gpu(offload.clone());
    cpu.refresh().await.unwrap();
    gpu.refresh().await.unwrap();
    let queries = clustered(&mut rng, nq, dim, 32);
    for (name, _) in cpu.collections() {
        let segs: Vec<u64> = cpu
            .collections()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, c)| c.segment_ids())
            .unwrap();
        for filter in [None, Some("id >= 5000 and id < 52000".to_string())] {
            let q = ShardQuery {
                collection: name.clone(),
                segment_ids: segs.clone(),
                dim,
                queries: queries.clone(),
                top_k: k,
                nprobe: None,
                ef: None,
                filter: filter.clone(),
                output_fields: Vec::new(),
            };
            let before = offload.gpu_searches();
            let (want, _) = cpu.search(&q).unwrap();
            let (got, _) = gpu.search(&q).unwrap();
            assert_eq!(
                offload.gpu_searches() - before,
                segs.len() as u64,
                "{name}: every segment on the GPU"
            );
            assert_matches(
                &as_neighbors(&got),
                &as_neighbors(&want),
                1e-4,
                &format!("{name} filter {filter:?}"),
            );
            for h in got.iter().flat_map(|q| &q.hits) {
                assert!(!deleted.contains(&h.id), "{name}: deleted id {}", h.id);
            }
        }
    }
    assert_eq!(offload.fallbacks(), 0);
}

/// The reader path for IVF_FLAT on the real device: `SearchShard` over a replica that maps the
/// writer's IVF_FLAT index files, with the index's probed lists scanned through `GpuOffload`,
/// equals the CPU replica (ids, distances within 1e-4 relative; an id may differ only at a tie
/// on the k-th distance) at the same nprobe for every metric, with a filter and deletes, and
/// every segment scan ran on the GPU as an IVF_FLAT scan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs an NVIDIA GPU with libcuda, libcublas.so.12 and libnvrtc.so.12"]
async fn reader_search_shard_on_the_gpu_answers_ivf_flat_segments_like_the_cpu_replica() {
    use shoal_engine::core::meta::{IndexRecord, MetaStore};
    use shoal_engine::core::storage::ann::AnnDef;
    use shoal_engine::core::storage::collection::{Collection, CollectionWrite, StorageOptions};
    use shoal_engine::core::storage::wal::RowBatch;
    use shoal_engine::gpu::GpuOffload;
    use shoal_engine::gpu::offload::{ScanKind, ScanRoute};
    use shoal_engine::roles::reader::catalog::ReplicaCatalog;
    use shoal_engine::roles::reader::service::{ShardBackend, ShardQuery};
    use std::sync::Arc;

    let (dim, per_segment, nq, k) = (64usize, 20_000i64, 1_200usize, 10usize);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let meta = MetaStore::open_sqlite(&dir.path().join("meta.db"))
        .await
        .unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(10);
    let deleted: Vec<i64> = (0..2 * per_segment).step_by(89).collect();
    for (name, metric) in [("l2", "L2"), ("ip", "IP"), ("cos", "COSINE")] {
        let (rec, schema) = create_collection(&meta, name, metric, dim).await;
        let opts = StorageOptions {
            index_min_rows: 1000,
            build_indexes: false,
            ..StorageOptions::default()
        };
        let w = Collection::open(meta.clone(), &rec, schema, &data, opts)
            .await
            .unwrap();
        for part in 0..2 {
            let mut b = RowBatch::new(dim);
            b.vectors = clustered(&mut rng, per_segment as usize, dim, 256);
            b.ids = (part * per_segment..(part + 1) * per_segment).collect();
            b.fields = vec![Vec::new(); per_segment as usize];
            w.upsert(b).await.unwrap();
            w.flush().await.unwrap();
        }
        let def = IndexRecord {
            collection_id: rec.id,
            index_name: "vector".into(),
            field_name: "vector".into(),
            index_type: "IVF_FLAT".into(),
            metric: metric.into(),
            params: r#"{"nlist":128}"#.into(),
        };
        meta.put_index(&def).await.unwrap();
        assert!(w.set_ann_def(AnnDef::from_record(&def)));
        // What the writer's background builder does for each segment: build, persist, commit.
        while let Some(job) = w.claim_index_job() {
            let ix = shoal_engine::core::index::build(
                job.def.index_type,
                job.metric,
                job.dim,
                &job.def.params,
                job.data.flat().data(),
            )
            .unwrap();
            ix.persist(&job.dir).unwrap();
            let (crc, bytes) = shoal_engine::core::index::stored_crc(&job.dir).unwrap();
            let r = job.index_record(crc, bytes, 1);
            assert!(meta.commit_segment_index(&r).await.unwrap());
            let mapped = shoal_engine::core::index::load(&job.dir).unwrap();
            assert!(w.finish_index(&job, Ok(Arc::from(mapped))));
        }
        w.delete(deleted.clone()).await.unwrap();
        w.flush().await.unwrap();
        w.close().await;
    }
    let cpu = ReplicaCatalog::new(meta.clone(), data.clone());
    let offload = Arc::new(GpuOffload::new(Arc::new(searcher(4 << 30, 512 << 20))));
    let gpu = ReplicaCatalog::new(meta, data).with_gpu(offload.clone());
    cpu.refresh().await.unwrap();
    gpu.refresh().await.unwrap();
    let queries = clustered(&mut rng, nq, dim, 256);
    for (name, c) in cpu.collections() {
        let segs = c.segment_ids();
        assert_eq!(c.index_progress().indexed_segments, segs.len(), "{name}");
        for filter in [None, Some("id >= 5000 and id < 32000".to_string())] {
            let q = ShardQuery {
                collection: name.clone(),
                segment_ids: segs.clone(),
                dim,
                queries: queries.clone(),
                top_k: k,
                nprobe: Some(16),
                ef: None,
                filter: filter.clone(),
                output_fields: Vec::new(),
            };
            let before = offload.scans(ScanRoute::Gpu, ScanKind::IvfFlat);
            let (want, _) = cpu.search(&q).unwrap();
            let (got, _) = gpu.search(&q).unwrap();
            assert_eq!(
                offload.scans(ScanRoute::Gpu, ScanKind::IvfFlat) - before,
                segs.len() as u64,
                "{name}: every segment's lists on the GPU"
            );
            assert_matches(
                &as_neighbors(&got),
                &as_neighbors(&want),
                1e-4,
                &format!("{name} filter {filter:?}"),
            );
            for h in got.iter().flat_map(|q| &q.hits) {
                assert!(!deleted.contains(&h.id), "{name}: deleted id {}", h.id);
            }
        }
    }
    assert_eq!(offload.fallbacks(), 0);
}
