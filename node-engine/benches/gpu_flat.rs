//! GPU FLAT / IVF_FLAT benchmark against the engine's CPU FLAT path and the device's own SGEMM
//! peak. Needs an NVIDIA GPU (driver, libcublas.so.12, libnvrtc.so.12). Prints one line per
//! measurement; nothing here is a stored figure.
//!
//! `cargo bench -p shoal-engine --bench gpu_flat` with, optionally:
//! - `SHOAL_BENCH_ROWS` (default 1000000), `SHOAL_BENCH_DIM` (128), `SHOAL_BENCH_SEED` (1)
//! - `SHOAL_BENCH_CPU_QUERIES` batch sizes run on the CPU path (default `1,100,10000`)
//! - `SHOAL_BENCH_WORKSPACE` GPU scratch bytes per device (default 4GiB)
//! - `SHOAL_BENCH_DATA_DIR` where base/queries are written for `gpu-bench/cupy_flat.py`
//! - `SHOAL_BENCH_IVF`: `1` (default) both IVF_FLAT sweeps, `engine` only the engine-index one,
//!   `lists` only the list-scan one, `0` none
//! - `SHOAL_BENCH_NLIST` lists of the engine's IVF_FLAT index (default 1024)
//! - `SHOAL_BENCH_IVF_CPU_QUERIES` queries the engine index's CPU path runs (default 1000)
//!
//! The two IVF_FLAT sweeps: `ivf_flat` scans lists of a quick quantiser (sampled centroids,
//! coarse step on the GPU) through `GpuSearch::search_ivf` directly; `ivf_flat_engine` builds
//! the engine's own IVF_FLAT index (`IvfIndex`, k-means) and searches it the way a reader does,
//! through `GpuOffload` (coarse step on the CPU, the same lists the CPU search probes, list scan
//! on the GPU) beside the index's CPU search at the same nprobe.
#![allow(clippy::unwrap_used)]

use rand::{Rng, SeedableRng};
use shoal_engine::core::index::flat::FlatIndex;
use shoal_engine::core::index::ivf::{Codec, IvfIndex};
use shoal_engine::core::index::{SearchParams, VectorIndexRead};
use shoal_engine::core::storage::collection::{FlatOffload, SegmentKey};
use shoal_engine::core::types::{IndexType, Metric, Neighbor};
use shoal_engine::gpu::args::parse_bytes;
use shoal_engine::gpu::backend::GpuBackend;
use shoal_engine::gpu::cuda::{self, CudaBackend};
use shoal_engine::gpu::{DeviceSelection, GpuOffload, GpuSearch, GpuSearcher, IvfList};
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Clustered data (1024 centres + uniform noise), so IVF has structure to find.
fn clustered(rng: &mut impl Rng, n: usize, dim: usize, centers: &[f32]) -> Vec<f32> {
    let nc = centers.len() / dim;
    let mut out = Vec::with_capacity(n * dim);
    for _ in 0..n {
        let c = rng.random_range(0..nc);
        for d in 0..dim {
            out.push(centers[c * dim + d] + rng.random_range(-0.2f32..0.2));
        }
    }
    out
}

/// Median seconds of `f` over at least 3 runs and about 2 s (at most 20 runs), after one warm-up.
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let mut runs = Vec::new();
    let start = Instant::now();
    while runs.len() < 3 || (start.elapsed().as_secs_f64() < 2.0 && runs.len() < 20) {
        let t = Instant::now();
        f();
        runs.push(t.elapsed().as_secs_f64());
    }
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

fn write_f32(path: &std::path::Path, data: &[f32]) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for x in data {
        f.write_all(&x.to_le_bytes()).unwrap();
    }
}

fn recall(res: &[Vec<Neighbor>], truth: &[Vec<Neighbor>], k: usize) -> f64 {
    let hit: usize = res
        .iter()
        .zip(truth)
        .map(|(r, t)| {
            r.iter()
                .take(k)
                .filter(|h| t.iter().take(k).any(|x| x.row == h.row))
                .count()
        })
        .sum();
    hit as f64 / (truth.len() * k) as f64
}

fn main() {
    // `cargo test --all-targets` runs bench targets without `--bench`: a GPU benchmark has
    // nothing to check there (the GPU checks are tests/gpu_cuda.rs).
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "gpu_flat: benchmark only; run it with `cargo bench -p shoal-engine --bench gpu_flat`"
        );
        return;
    }
    let rows: usize = env_or("SHOAL_BENCH_ROWS", "1000000").parse().unwrap();
    let dim: usize = env_or("SHOAL_BENCH_DIM", "128").parse().unwrap();
    let seed: u64 = env_or("SHOAL_BENCH_SEED", "1").parse().unwrap();
    let workspace = parse_bytes(&env_or("SHOAL_BENCH_WORKSPACE", "4GiB")).unwrap();
    let cpu_batches: Vec<usize> = env_or("SHOAL_BENCH_CPU_QUERIES", "1,100,10000")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    let max_nq = 10_000;

    let devices = cuda::probe(&DeviceSelection::List(vec![0]))
        .unwrap_or_else(|e| panic!("no usable GPU: {e}"));
    let dev = &devices[0];
    let (free, total) = dev.memory().unwrap();
    println!(
        "device\tordinal=0\tname={}\tcompute_capability={:?}\tmemory_total_bytes={total}\tmemory_free_bytes={free}\tthreads={}",
        dev.name(),
        dev.compute_capability(),
        rayon::current_num_threads()
    );
    for tf32 in [false, true] {
        let flops = dev.measure_gemm_peak(8192, 20, tf32).unwrap();
        println!(
            "gemm_peak\tn=8192\tmath={}\ttflops={:.2}",
            if tf32 { "tf32" } else { "fp32" },
            flops / 1e12
        );
    }
    let sgemm_peak = dev.measure_gemm_peak(8192, 20, false).unwrap();

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let centers: Vec<f32> = (0..1024 * dim)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let t = Instant::now();
    let base = clustered(&mut rng, rows, dim, &centers);
    let queries = clustered(&mut rng, max_nq, dim, &centers);
    println!(
        "data\trows={rows}\tdim={dim}\tqueries={max_nq}\tseed={seed}\tgen_secs={:.1}",
        t.elapsed().as_secs_f64()
    );
    if let Ok(dir) = std::env::var("SHOAL_BENCH_DATA_DIR") {
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        write_f32(&dir.join("base.f32"), &base);
        write_f32(&dir.join("queries.f32"), &queries);
        println!("data_written\tdir={}", dir.display());
    }

    let searcher = GpuSearcher::new(
        devices,
        (free as u64).saturating_sub(workspace + (1 << 30)),
        0,
        workspace,
    )
    .unwrap();
    let t = Instant::now();
    searcher
        .search_flat(1, &base, dim, Metric::L2, &queries[..dim], 1, None)
        .unwrap();
    println!("gpu_upload\tsecs={:.3}", t.elapsed().as_secs_f64());

    let cpu = FlatIndex::new(base.as_slice(), dim, Metric::L2).unwrap();
    let params = SearchParams::default();
    for k in [10usize, 100] {
        for nq in [1usize, 100, 10_000] {
            let q = &queries[..nq * dim];
            let secs = time(|| {
                searcher
                    .search_flat(1, &base, dim, Metric::L2, q, k, None)
                    .unwrap();
            });
            let flops = 2.0 * nq as f64 * rows as f64 * dim as f64 / secs;
            println!(
                "flat\tpath=gpu\tmetric=L2\tnq={nq}\tk={k}\tsecs={secs:.6}\tqps={:.1}\tgemm_tflops={:.2}\tpct_of_sgemm_peak={:.1}",
                nq as f64 / secs,
                flops / 1e12,
                100.0 * flops / sgemm_peak
            );
            if cpu_batches.contains(&nq) {
                let secs = time(|| {
                    cpu.search(q, k, &params, None).unwrap();
                });
                println!(
                    "flat\tpath=cpu\tmetric=L2\tnq={nq}\tk={k}\tsecs={secs:.6}\tqps={:.1}",
                    nq as f64 / secs
                );
            }
        }
    }
    // Exactness spot check on the benchmark data (GPU vs the engine's CPU FLAT).
    let gq = &queries[..100 * dim];
    let g = searcher
        .search_flat(1, &base, dim, Metric::L2, gq, 10, None)
        .unwrap();
    let c = cpu.search(gq, 10, &params, None).unwrap();
    println!(
        "flat_check\tnq=100\tk=10\trecall_gpu_vs_cpu={:.4}",
        recall(&g, &c, 10)
    );

    let ivf = env_or("SHOAL_BENCH_IVF", "1");
    if ivf == "1" || ivf == "lists" {
        ivf_sweep(&searcher, &base, &queries, dim, rows);
    }
    if ivf == "1" || ivf == "engine" {
        let nlist: usize = env_or("SHOAL_BENCH_NLIST", "1024").parse().unwrap();
        let cpu_nq: usize = env_or("SHOAL_BENCH_IVF_CPU_QUERIES", "1000")
            .parse()
            .unwrap();
        ivf_engine_sweep(Arc::new(searcher), &base, &queries, dim, nlist, cpu_nq);
    }
}

/// IVF_FLAT through the engine's index and the reader's offload (see the module docs): an
/// nprobe sweep until recall@10 (vs GPU FLAT ground truth) reaches 0.95, the GPU path on all
/// queries, the CPU path on the first `cpu_nq`, each line with its own recall.
fn ivf_engine_sweep(
    searcher: Arc<GpuSearcher<CudaBackend>>,
    base: &[f32],
    queries: &[f32],
    dim: usize,
    nlist: usize,
    cpu_nq: usize,
) {
    let nq = queries.len() / dim;
    let cpu_nq = cpu_nq.min(nq);
    let truth = searcher
        .search_flat(1, base, dim, Metric::L2, queries, 10, None)
        .unwrap();
    let t = Instant::now();
    let index = IvfIndex::build(
        IndexType::IVF_FLAT,
        Metric::L2,
        dim,
        nlist,
        Codec::Flat,
        base,
    )
    .unwrap();
    println!(
        "ivf_engine_build	nlist={}	secs={:.2}",
        index.nlist(),
        t.elapsed().as_secs_f64()
    );
    let offload = GpuOffload::new(searcher);
    let key = SegmentKey {
        collection_id: 1,
        segment: 4,
        manifest_crc: 0,
    };
    let mut nprobe = 1usize;
    while nprobe <= index.nlist() {
        let params = SearchParams {
            nprobe: Some(nprobe),
            ef: None,
        };
        let mut out = Vec::new();
        let secs = time(|| {
            out = offload
                .search_ivf_flat(key, 0, &index, queries, 10, &params, None)
                .expect("the GPU path answered (no fallback)");
        });
        let r = recall(&out, &truth, 10);
        println!(
            "ivf_flat_engine	path=gpu	nq={nq}	k=10	nlist={}	nprobe={nprobe}	recall_at_10={r:.4}	qps={:.1}",
            index.nlist(),
            nq as f64 / secs
        );
        let cq = &queries[..cpu_nq * dim];
        let mut cpu = Vec::new();
        let secs = time(|| {
            cpu = index.search(cq, 10, &params, None).unwrap();
        });
        println!(
            "ivf_flat_engine	path=cpu	nq={cpu_nq}	k=10	nlist={}	nprobe={nprobe}	recall_at_10={:.4}	qps={:.1}	same_rows_as_gpu={:.4}",
            index.nlist(),
            recall(&cpu, &truth[..cpu_nq], 10),
            cpu_nq as f64 / secs,
            recall(&out[..cpu_nq], &cpu, 10)
        );
        if r >= 0.95 {
            break;
        }
        nprobe *= 2;
    }
    assert_eq!(offload.fallbacks(), 0, "a GPU scan fell back to the CPU");
}

/// IVF_FLAT: nlist = 1024 centroids sampled from the data, rows assigned on the GPU, then an
/// nprobe sweep until recall@10 (vs GPU FLAT ground truth) reaches 0.95.
fn ivf_sweep(
    searcher: &GpuSearcher<CudaBackend>,
    base: &[f32],
    queries: &[f32],
    dim: usize,
    rows: usize,
) {
    let nlist = 1024usize;
    let nq = queries.len() / dim;
    let truth = searcher
        .search_flat(1, base, dim, Metric::L2, queries, 10, None)
        .unwrap();
    let step = rows / nlist;
    let centroids: Vec<f32> = (0..nlist)
        .flat_map(|l| base[l * step * dim..(l * step + 1) * dim].to_vec())
        .collect();
    let t = Instant::now();
    let assign = searcher
        .search_flat(2, &centroids, dim, Metric::L2, base, 1, None)
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
    println!(
        "ivf_build\tnlist={nlist}\tsecs={:.2}",
        t.elapsed().as_secs_f64()
    );
    for nprobe in [1usize, 2, 4, 8, 16, 32, 64, 128] {
        let mut out = Vec::new();
        let secs = time(|| {
            let probes: Vec<Vec<u32>> = searcher
                .search_flat(2, &centroids, dim, Metric::L2, queries, nprobe, None)
                .unwrap()
                .into_iter()
                .map(|h| h.into_iter().map(|n| n.row).collect())
                .collect();
            out = searcher
                .search_ivf(3, &lists, &probes, dim, Metric::L2, queries, 10, None)
                .unwrap();
        });
        let r = recall(&out, &truth, 10);
        println!(
            "ivf_flat\tpath=gpu\tnq={nq}\tk=10\tnprobe={nprobe}\trecall_at_10={r:.4}\tqps={:.1}",
            nq as f64 / secs
        );
        if r >= 0.95 {
            break;
        }
    }
}
