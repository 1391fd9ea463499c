//! `shoal-engine bench`: builds an index in-process from the classic ANN files (`.fvecs` base
//! and queries, `.ivecs` ground truth), sweeps the search knobs and prints one JSON line per
//! setting (recall@k, QPS, latency percentiles, build time, index and peak memory).
//!
//! Protocol (the benchmark kit's, `../shared/bench/README.md`): k = 10 by default; `single` =
//! the first `--single-queries` queries, one call each, on a 1-thread pool; `batch` = every query
//! in one call on a `--threads` pool (2 by default); the median of `--reps` runs is reported.
//!
//! Owns the file readers and the recall computation; builds indexes only through the engine's
//! own constructors (what the server runs), never a bench-only path.

use crate::core::index::flat::FlatIndex;
use crate::core::index::{SearchParams, VectorIndexRead};
use crate::core::types::{IndexType, Metric, Neighbor};
use anyhow::Context;
use serde_json::{Map, Value, json};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Command-line arguments of `shoal-engine bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Base vectors (.fvecs: per vector an int32 dimension then that many float32, little-endian).
    #[arg(long)]
    pub base: PathBuf,
    /// Query vectors (.fvecs), same dimension as the base.
    #[arg(long)]
    pub query: PathBuf,
    /// Exact neighbour ids per query (.ivecs), at least k per row, ties ranked by smaller id.
    #[arg(long)]
    pub groundtruth: PathBuf,
    /// Metric: L2, IP or COSINE.
    #[arg(long, default_value = "L2", value_parser = parse_metric)]
    pub metric: Metric,
    /// Index type: FLAT, IVF_FLAT, IVF_SQ8, IVF_PQ or HNSW.
    #[arg(long, default_value = "FLAT", value_parser = parse_index)]
    pub index: IndexType,
    /// Build parameters as a JSON object (Milvus names, e.g. '{"nlist":4096}').
    #[arg(long, default_value = "{}")]
    pub params: String,
    /// Search knobs to sweep, a JSON object of lists (e.g. '{"nprobe":[1,2,4]}'); a scalar is a
    /// one-value list. Every combination is measured.
    #[arg(long, default_value = "{}")]
    pub search_params: String,
    /// single: one query per call on one thread; batch: all queries in one call; both: single
    /// then batch over the same build (one line per mode and setting).
    #[arg(long, value_enum, default_value_t = Mode::Single)]
    pub mode: Mode,
    /// Threads for the search pool (default: 1 for single, 2 for batch).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Threads used to build the index.
    #[arg(long, default_value_t = 2)]
    pub build_threads: usize,
    /// Neighbours per query (recall is recall@k).
    #[arg(short = 'k', long, default_value_t = 10)]
    pub k: usize,
    /// Queries timed in single mode (the first N of the query file).
    #[arg(long, default_value_t = 2000)]
    pub single_queries: usize,
    /// Timed repetitions per setting; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
}

/// How queries are issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Single,
    Batch,
    Both,
}

fn parse_metric(s: &str) -> Result<Metric, String> {
    s.parse()
}

fn parse_index(s: &str) -> Result<IndexType, String> {
    s.parse()
}

/// Errors reading `.fvecs` / `.ivecs` files.
#[derive(Debug, thiserror::Error)]
pub enum VecsError {
    #[error("failed to read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid vector file: {reason}")]
    Malformed { path: String, reason: String },
}

/// A matrix read from a vector file: `rows` x `dim`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Vecs<T> {
    pub dim: usize,
    pub data: Vec<T>,
}

impl<T> Vecs<T> {
    pub fn rows(&self) -> usize {
        self.data.len().checked_div(self.dim).unwrap_or(0)
    }
}

/// Read a `.fvecs` file.
///
/// Errors: `Read` on I/O failure; `Malformed` for an empty file, a non-positive or changing
/// dimension, or a truncated last record.
pub fn read_fvecs(path: &Path) -> Result<Vecs<f32>, VecsError> {
    read_vecs(path, f32::from_le_bytes)
}

/// Read a `.ivecs` file (same layout with int32 components).
pub fn read_ivecs(path: &Path) -> Result<Vecs<i32>, VecsError> {
    read_vecs(path, i32::from_le_bytes)
}

fn read_vecs<T>(path: &Path, conv: fn([u8; 4]) -> T) -> Result<Vecs<T>, VecsError> {
    let p = path.display().to_string();
    let io = |source| VecsError::Read {
        path: p.clone(),
        source,
    };
    let bad = |reason: String| VecsError::Malformed {
        path: p.clone(),
        reason,
    };
    let file = File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut head = [0u8; 4];
    if size < 4 {
        return Err(bad(format!("{size} bytes is too short for a header")));
    }
    r.read_exact(&mut head).map_err(io)?;
    let d = i32::from_le_bytes(head);
    if d <= 0 || d > 1 << 20 {
        return Err(bad(format!("first record declares dimension {d}")));
    }
    let dim = d as usize;
    let rec = 4 + 4 * dim as u64;
    if size % rec != 0 {
        return Err(bad(format!(
            "size {size} is not a multiple of the {rec}-byte record of a {dim}-d vector (truncated or mixed dimensions)"
        )));
    }
    let rows = (size / rec) as usize;
    let mut data = Vec::with_capacity(rows * dim);
    let mut body = vec![0u8; 4 * dim];
    for row in 0..rows {
        if row > 0 {
            r.read_exact(&mut head).map_err(io)?;
            let d = i32::from_le_bytes(head);
            if d as i64 != dim as i64 {
                return Err(bad(format!(
                    "record {row} declares dimension {d}, the first declared {dim}"
                )));
            }
        }
        r.read_exact(&mut body).map_err(io)?;
        data.extend(body.chunks_exact(4).map(|c| conv([c[0], c[1], c[2], c[3]])));
    }
    Ok(Vecs { dim, data })
}

/// Mean over queries of |found ∩ truth[..k]| / k. `truth` rows must hold at least `k` ids.
pub fn recall_at_k(found: &[Vec<u32>], truth: &Vecs<i32>, k: usize) -> f64 {
    if found.is_empty() || k == 0 {
        return 0.0;
    }
    let mut sum = 0usize;
    for (qi, ids) in found.iter().enumerate() {
        let gt = &truth.data[qi * truth.dim..qi * truth.dim + k];
        sum += ids
            .iter()
            .take(k)
            .filter(|id| gt.contains(&(**id as i32)))
            .count();
    }
    sum as f64 / (found.len() * k) as f64
}

/// Peak resident set size of this process (VmHWM), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU time (user + system, all threads) this process has used so far, where the OS reports it
/// (`/proc/self/stat`, in the fixed 100 Hz USER_HZ units Linux exposes). On a shared machine the
/// CPU seconds of a run say more about a kernel's efficiency than its wall time does.
pub fn process_cpu_s() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// One combination of search knobs, with its JSON form for the output line.
fn sweep(spec: &str) -> anyhow::Result<Vec<(SearchParams, Value)>> {
    let v: Value = serde_json::from_str(spec)
        .with_context(|| format!("--search-params is not JSON: {spec}"))?;
    let obj = v
        .as_object()
        .with_context(|| format!("--search-params must be a JSON object, got {spec}"))?;
    let mut settings = vec![(SearchParams::default(), Map::new())];
    for (knob, vals) in obj {
        let list = match vals {
            Value::Array(a) => a.clone(),
            other => vec![other.clone()],
        };
        if list.is_empty() {
            anyhow::bail!("--search-params: {knob} has an empty list");
        }
        let mut next = Vec::new();
        for (sp, m) in &settings {
            for val in &list {
                let n = val.as_u64().filter(|n| *n >= 1).with_context(|| {
                    format!("--search-params: {knob} values must be positive integers, got {val}")
                })? as usize;
                let mut sp = sp.clone();
                match knob.as_str() {
                    "nprobe" => sp.nprobe = Some(n),
                    "ef" => sp.ef = Some(n),
                    other => anyhow::bail!(
                        "--search-params: unknown knob {other:?}; expected nprobe or ef"
                    ),
                }
                let mut m = m.clone();
                m.insert(knob.clone(), json!(n));
                next.push((sp, m));
            }
        }
        settings = next;
    }
    Ok(settings
        .into_iter()
        .map(|(sp, m)| (sp, Value::Object(m)))
        .collect())
}

fn build_index(
    args: &BenchArgs,
    params: &Value,
    base: Vecs<f32>,
) -> anyhow::Result<Box<dyn VectorIndexRead>> {
    match args.index {
        IndexType::FLAT => {
            if params.as_object().is_some_and(|o| !o.is_empty()) {
                anyhow::bail!("--params: FLAT takes no build parameters, got {params}");
            }
            Ok(Box::new(FlatIndex::new(base.data, base.dim, args.metric)?))
        }
        t @ (IndexType::IVF_FLAT | IndexType::IVF_SQ8 | IndexType::IVF_PQ | IndexType::HNSW) => {
            // The registry the background builder uses: same validation, same code.
            let ix: Box<dyn VectorIndexRead> =
                crate::core::index::build(t, args.metric, base.dim, params, &base.data)?;
            Ok(ix)
        }
    }
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn percentile_us(sorted_s: &[f64], p: f64) -> f64 {
    if sorted_s.is_empty() {
        return 0.0;
    }
    let i = ((p * sorted_s.len() as f64).ceil() as usize).clamp(1, sorted_s.len()) - 1;
    sorted_s[i] * 1e6
}

fn ids(res: &[Vec<Neighbor>]) -> Vec<Vec<u32>> {
    res.iter()
        .map(|r| r.iter().map(|n| n.row).collect())
        .collect()
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Run the benchmark described by `args`, printing one JSON line per search setting.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.k >= 1, "-k must be at least 1");
    anyhow::ensure!(args.reps >= 1, "--reps must be at least 1");
    anyhow::ensure!(
        args.build_threads >= 1,
        "--build-threads must be at least 1"
    );
    anyhow::ensure!(
        args.threads.is_none_or(|t| t >= 1),
        "--threads must be at least 1"
    );
    let params: Value = serde_json::from_str(&args.params)
        .with_context(|| format!("--params is not JSON: {}", args.params))?;
    anyhow::ensure!(
        params.is_object(),
        "--params must be a JSON object, got {params}"
    );
    let settings = sweep(&args.search_params)?;

    let base = read_fvecs(&args.base)?;
    let queries = read_fvecs(&args.query)?;
    let truth = read_ivecs(&args.groundtruth)?;
    anyhow::ensure!(
        queries.dim == base.dim,
        "query dimension {} differs from base dimension {}",
        queries.dim,
        base.dim
    );
    anyhow::ensure!(
        truth.rows() >= queries.rows(),
        "ground truth has {} rows for {} queries",
        truth.rows(),
        queries.rows()
    );
    anyhow::ensure!(
        truth.dim >= args.k,
        "ground truth holds {} ids per query, fewer than k = {}",
        truth.dim,
        args.k
    );
    let n_base = base.rows();
    if let Some(bad) = truth
        .data
        .iter()
        .find(|&&id| id < 0 || id as usize >= n_base)
    {
        anyhow::bail!("ground truth id {bad} is outside the base's {n_base} rows");
    }

    let build_pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.build_threads)
        .build()?;
    let t = Instant::now();
    let index = build_pool.install(|| build_index(&args, &params, base))?;
    let build_s = t.elapsed().as_secs_f64();
    drop(build_pool);

    let modes: &[Mode] = match args.mode {
        Mode::Single => &[Mode::Single],
        Mode::Batch => &[Mode::Batch],
        Mode::Both => &[Mode::Single, Mode::Batch],
    };
    for &mode in modes {
        let threads = args.threads.unwrap_or(match mode {
            Mode::Batch => 2,
            Mode::Single | Mode::Both => 1,
        });
        run_mode(
            &args, mode, threads, &*index, &queries, &truth, &settings, &params, build_s, n_base,
        )?;
    }
    Ok(())
}

/// IVF only (`None` otherwise), computed outside the timing: the mean number of list entries a
/// query scans with `sp` (the sum of its probed lists' lengths), and the lists' imbalance
/// factor `nlist · Σ len² / n²` (1 for equal lists; faiss reports the same quantity), which is
/// what the mean scan length tends to when queries follow the base's distribution.
fn ivf_balance(
    index: &dyn VectorIndexRead,
    qdata: &[f32],
    k: usize,
    sp: &SearchParams,
) -> anyhow::Result<Option<(f64, f64)>> {
    let Some(ivf) = index.as_ivf() else {
        return Ok(None);
    };
    let probed = ivf.probe_lists(qdata, k, sp, None)?;
    let scanned: usize = probed.iter().flatten().map(|&l| ivf.list_len(l)).sum();
    let nlist = ivf.nlist();
    let lens = (0..nlist as u32).map(|l| ivf.list_len(l) as f64);
    let n: f64 = lens.clone().sum();
    let sq: f64 = lens.map(|x| x * x).sum();
    let imbalance = if n > 0.0 {
        nlist as f64 * sq / (n * n)
    } else {
        1.0
    };
    Ok(Some((
        scanned as f64 / probed.len().max(1) as f64,
        imbalance,
    )))
}

/// Time every search setting in one mode and print its JSON line.
#[allow(clippy::too_many_arguments)]
fn run_mode(
    args: &BenchArgs,
    mode: Mode,
    threads: usize,
    index: &dyn VectorIndexRead,
    queries: &Vecs<f32>,
    truth: &Vecs<i32>,
    settings: &[(SearchParams, Value)],
    params: &Value,
    build_s: f64,
    n_base: usize,
) -> anyhow::Result<()> {
    let dim = queries.dim;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let nq = match mode {
        Mode::Single | Mode::Both => args.single_queries.min(queries.rows()),
        Mode::Batch => queries.rows(),
    };
    anyhow::ensure!(nq >= 1, "no queries to run");
    let qdata = &queries.data[..nq * dim];
    for (sp, sp_json) in settings {
        let (runs, cpu, lat_sorted, found) = pool.install(|| -> anyhow::Result<_> {
            match mode {
                Mode::Single | Mode::Both => {
                    for q in qdata.chunks_exact(dim).take(10) {
                        index.search(q, args.k, sp, None)?;
                    }
                    let mut runs = Vec::new();
                    let mut cpu = Vec::new();
                    let mut lats: Vec<Vec<f64>> = Vec::new();
                    let mut found = Vec::with_capacity(nq);
                    for rep in 0..args.reps {
                        let mut lat = Vec::with_capacity(nq);
                        let c0 = process_cpu_s();
                        let t0 = Instant::now();
                        for q in qdata.chunks_exact(dim) {
                            let t = Instant::now();
                            let mut r = index.search(q, args.k, sp, None)?;
                            lat.push(t.elapsed().as_secs_f64());
                            if rep == 0 {
                                found.push(r.pop().unwrap_or_default());
                            }
                        }
                        runs.push(t0.elapsed().as_secs_f64());
                        cpu.push(process_cpu_s().zip(c0).map(|(b, a)| b - a));
                        lats.push(lat);
                    }
                    // latencies of the median run
                    let med = median(&runs);
                    let pick = runs.iter().position(|r| *r == med).unwrap_or(0);
                    let mut lat = lats.swap_remove(pick);
                    lat.sort_by(f64::total_cmp);
                    Ok((runs, cpu, lat, found))
                }
                Mode::Batch => {
                    index.search(&qdata[..dim * nq.min(200)], args.k, sp, None)?;
                    let mut runs = Vec::new();
                    let mut cpu = Vec::new();
                    let mut found = Vec::new();
                    for _ in 0..args.reps {
                        let c0 = process_cpu_s();
                        let t0 = Instant::now();
                        let r = index.search(qdata, args.k, sp, None)?;
                        runs.push(t0.elapsed().as_secs_f64());
                        cpu.push(process_cpu_s().zip(c0).map(|(b, a)| b - a));
                        found = r;
                    }
                    Ok((runs, cpu, Vec::new(), found))
                }
            }
        })?;
        let med = median(&runs);
        let cpu_known: Vec<f64> = cpu.iter().flatten().copied().collect();
        let flop = 2.0 * dim as f64 * n_base as f64 * nq as f64;
        let gflops_per_cpu_s = (cpu_known.len() == runs.len() && median(&cpu_known) > 0.0)
            .then(|| round(flop / median(&cpu_known) / 1e9, 1));
        let recall = recall_at_k(&ids(&found), truth, args.k);
        let (p50, p99) = match mode {
            Mode::Single | Mode::Both => (
                json!(round(percentile_us(&lat_sorted, 0.5), 1)),
                json!(round(percentile_us(&lat_sorted, 0.99), 1)),
            ),
            Mode::Batch => (Value::Null, Value::Null),
        };
        let ivf = ivf_balance(index, qdata, args.k, sp)?;
        let line = json!({
            "index": args.index.as_str(),
            "metric": args.metric.as_str(),
            "params": params,
            "search_params": sp_json,
            "mode": match mode { Mode::Single | Mode::Both => "single", Mode::Batch => "batch" },
            "threads": threads,
            "k": args.k,
            "n_base": n_base,
            "dim": dim,
            "queries": nq,
            "recall_at_k": round(recall, 4),
            "qps": round(nq as f64 / med, 1),
            "p50_us": p50,
            "p99_us": p99,
            "runs_s": runs.iter().map(|r| round(*r, 4)).collect::<Vec<_>>(),
            "cpu_s": cpu.iter().map(|c| c.map(|c| round(c, 2))).collect::<Vec<_>>(),
            "gflops": round(flop / med / 1e9, 1),
            "gflops_per_cpu_s": gflops_per_cpu_s,
            "build_s": round(build_s, 3),
            "index_bytes": index.memory_bytes(),
            "peak_rss_bytes": peak_rss_bytes(),
            "kernels": format!("{:?}", crate::core::distance::isa()),
            "rows_scanned": ivf.map(|b| round(b.0, 1)),
            "list_imbalance": ivf.map(|b| round(b.1, 3)),
        });
        println!("{line}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_vecs(path: &Path, dim: i32, rows: &[Vec<[u8; 4]>]) {
        let mut f = File::create(path).unwrap();
        for r in rows {
            f.write_all(&dim.to_le_bytes()).unwrap();
            for c in r {
                f.write_all(c).unwrap();
            }
        }
    }

    #[test]
    fn fvecs_and_ivecs_files_read_back_row_major() {
        let dir = tempfile::tempdir().unwrap();
        let fp = dir.path().join("a.fvecs");
        let rows: Vec<Vec<[u8; 4]>> = (0..3)
            .map(|i| {
                (0..4)
                    .map(|j| ((i * 4 + j) as f32 * 0.5).to_le_bytes())
                    .collect()
            })
            .collect();
        write_vecs(&fp, 4, &rows);
        let v = read_fvecs(&fp).unwrap();
        assert_eq!(v.dim, 4);
        assert_eq!(v.rows(), 3);
        assert_eq!(v.data, (0..12).map(|x| x as f32 * 0.5).collect::<Vec<_>>());
        let ip = dir.path().join("g.ivecs");
        write_vecs(&ip, 2, &[vec![7i32.to_le_bytes(), (-1i32).to_le_bytes()]]);
        assert_eq!(
            read_ivecs(&ip).unwrap(),
            Vecs {
                dim: 2,
                data: vec![7, -1]
            }
        );
    }

    #[test]
    fn malformed_vector_files_are_rejected_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.fvecs");
        // truncated last record
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&2i32.to_le_bytes());
        bytes.extend_from_slice(&1f32.to_le_bytes());
        bytes.extend_from_slice(&2f32.to_le_bytes());
        bytes.extend_from_slice(&2i32.to_le_bytes());
        bytes.extend_from_slice(&1f32.to_le_bytes());
        std::fs::write(&p, &bytes).unwrap();
        let e = read_fvecs(&p).unwrap_err().to_string();
        assert!(e.contains("not a multiple"), "{e}");
        // changing dimension with a size that happens to divide
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&1i32.to_le_bytes());
        bytes.extend_from_slice(&1f32.to_le_bytes());
        bytes.extend_from_slice(&3i32.to_le_bytes());
        bytes.extend_from_slice(&1f32.to_le_bytes());
        std::fs::write(&p, &bytes).unwrap();
        let e = read_fvecs(&p).unwrap_err().to_string();
        assert!(e.contains("record 1 declares dimension 3"), "{e}");
        // zero / negative dimension, empty file, missing file
        std::fs::write(&p, 0i32.to_le_bytes()).unwrap();
        assert!(
            read_fvecs(&p)
                .unwrap_err()
                .to_string()
                .contains("dimension 0")
        );
        std::fs::write(&p, b"").unwrap();
        assert!(
            read_fvecs(&p)
                .unwrap_err()
                .to_string()
                .contains("too short")
        );
        let missing = dir.path().join("nope.fvecs");
        assert!(matches!(read_fvecs(&missing), Err(VecsError::Read { .. })));
    }

    #[test]
    fn recall_counts_found_ids_among_the_first_k_true_ids() {
        let truth = Vecs {
            dim: 4,
            data: vec![1, 2, 3, 4, 10, 11, 12, 13],
        };
        // query 0 finds 2 of {1,2}, query 1 finds 1 of {10,11}: recall@2 = 3/4
        let found = vec![vec![2, 1], vec![11, 12]];
        assert_eq!(recall_at_k(&found, &truth, 2), 0.75);
        assert_eq!(recall_at_k(&[vec![4, 3]], &truth, 2), 0.0);
    }

    #[test]
    fn search_param_sweeps_expand_to_every_combination_and_reject_unknown_knobs() {
        let s = sweep(r#"{"nprobe":[1,2],"ef":8}"#).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(
            s[1].0,
            SearchParams {
                nprobe: Some(2),
                ef: Some(8)
            }
        );
        assert_eq!(sweep("{}").unwrap().len(), 1);
        assert!(sweep(r#"{"nlist":[1]}"#).is_err());
        assert!(sweep(r#"{"nprobe":[0]}"#).is_err());
        assert!(sweep("[1]").is_err());
    }

    #[test]
    fn a_flat_bench_over_tiny_files_runs_end_to_end() {
        let dir = tempfile::tempdir().unwrap();
        let (n, d) = (300usize, 8usize);
        let base: Vec<Vec<f32>> = (0..n)
            .map(|i| (0..d).map(|j| ((i * 7 + j * 3) % 11) as f32).collect())
            .collect();
        let queries: Vec<Vec<f32>> = base.iter().step_by(37).cloned().collect();
        let enc = |rows: &[Vec<f32>]| -> Vec<Vec<[u8; 4]>> {
            rows.iter()
                .map(|r| r.iter().map(|x| x.to_le_bytes()).collect())
                .collect()
        };
        write_vecs(&dir.path().join("b.fvecs"), d as i32, &enc(&base));
        write_vecs(&dir.path().join("q.fvecs"), d as i32, &enc(&queries));
        // exact ground truth computed independently (naive sort, ties by smaller id)
        let gt: Vec<Vec<[u8; 4]>> = queries
            .iter()
            .map(|q| {
                let mut all: Vec<(f32, usize)> = base
                    .iter()
                    .enumerate()
                    .map(|(i, b)| (b.iter().zip(q).map(|(x, y)| (x - y) * (x - y)).sum(), i))
                    .collect();
                all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                all.iter()
                    .take(10)
                    .map(|(_, i)| (*i as i32).to_le_bytes())
                    .collect()
            })
            .collect();
        write_vecs(&dir.path().join("g.ivecs"), 10, &gt);
        let mut args = BenchArgs {
            base: dir.path().join("b.fvecs"),
            query: dir.path().join("q.fvecs"),
            groundtruth: dir.path().join("g.ivecs"),
            metric: Metric::L2,
            index: IndexType::FLAT,
            params: "{}".into(),
            search_params: "{}".into(),
            mode: Mode::Single,
            threads: None,
            build_threads: 1,
            k: 10,
            single_queries: 5,
            reps: 1,
        };
        run(args.clone()).unwrap();
        args.mode = Mode::Batch;
        run(args.clone()).unwrap();
        // recall of FLAT itself is what the bench prints; check the pieces it uses agree
        let index = FlatIndex::new(base.concat(), d, Metric::L2).unwrap();
        let res = index
            .search(&queries.concat(), 10, &SearchParams::default(), None)
            .unwrap();
        let truth = read_ivecs(&dir.path().join("g.ivecs")).unwrap();
        assert_eq!(recall_at_k(&ids(&res), &truth, 10), 1.0);
        args.k = 11;
        assert!(
            run(args.clone())
                .unwrap_err()
                .to_string()
                .contains("fewer than k")
        );
        args.k = 10;
        args.params = r#"{"nlist":4}"#.into();
        assert!(run(args).is_err());
    }
}
