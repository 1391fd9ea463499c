#!/usr/bin/env python3
"""faiss exact search (IndexFlatL2 / IndexFlatIP) timed the way `shoal-engine bench --index FLAT`
times ours, so the two can run back to back on the same data and threads.

Usage:
  faiss_flat.py DATASET_DIR --mode single|batch [--threads N] [-k K] [--queries N] [--reps R]

  single: the first --queries queries (default 100), one search() call each, 1 thread;
          prints QPS, p50/p99 latency in microseconds.
  batch:  the first --queries queries (default: all) in one search() call on --threads threads.
Each run prints one JSON line (median QPS over --reps runs, the per-run wall and CPU seconds,
recall@k against groundtruth.ivecs). Reads the kit's files with ../shared/bench/common.py; set
SHOAL_BENCH_KIT to its directory if the repository is not beside ../shared.
For faiss at its best on AVX-512 machines run it with OPENBLAS_CORETYPE=SkylakeX.
"""
import argparse
import json
import os
import resource
import sys
import time

import numpy as np

KIT = os.environ.get(
    "SHOAL_BENCH_KIT",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "bench"),
)
sys.path.insert(0, KIT)
from common import read_vecs  # noqa: E402

import faiss  # noqa: E402


def cpu_s():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def recall(ids, gt, k):
    hits = sum(len(set(ids[i, :k]) & set(gt[i, :k])) for i in range(ids.shape[0]))
    return hits / (ids.shape[0] * k)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset")
    ap.add_argument("--mode", choices=["single", "batch"], required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=0)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()

    meta_path = os.path.join(a.dataset, "meta.json")
    metric = "l2"
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            metric = json.load(f).get("metric", "l2").lower()
    base = read_vecs(os.path.join(a.dataset, "base.fvecs"))
    q = read_vecs(os.path.join(a.dataset, "query.fvecs"))
    gt = read_vecs(os.path.join(a.dataset, "groundtruth.ivecs"))
    nq = a.queries or (100 if a.mode == "single" else q.shape[0])
    q = np.ascontiguousarray(q[:nq])
    index = faiss.IndexFlatIP(base.shape[1]) if metric == "ip" else faiss.IndexFlatL2(base.shape[1])
    index.add(base)
    threads = 1 if a.mode == "single" else a.threads
    faiss.omp_set_num_threads(threads)
    index.search(q[:1], a.k)  # warm-up: page in the base vectors

    runs, cpus, lat_us, ids = [], [], [], None
    for _ in range(a.reps):
        c0, t0 = cpu_s(), time.perf_counter()
        if a.mode == "single":
            out = []
            for i in range(nq):
                s = time.perf_counter()
                _, I = index.search(q[i:i + 1], a.k)
                lat_us.append((time.perf_counter() - s) * 1e6)
                out.append(I[0])
            ids = np.array(out)
        else:
            _, ids = index.search(q, a.k)
        runs.append(time.perf_counter() - t0)
        cpus.append(cpu_s() - c0)
    med = sorted(runs)[len(runs) // 2]
    res = {
        "system": "faiss-" + type(index).__name__,
        "faiss": faiss.__version__,
        "mode": a.mode,
        "threads": threads,
        "k": a.k,
        "queries": nq,
        "qps": round(nq / med, 1),
        "runs_s": [round(r, 4) for r in runs],
        "cpu_s": [round(c, 2) for c in cpus],
        "recall_at_k": round(recall(ids, gt[:nq], a.k), 4),
        "gflops": round(2.0 * base.shape[1] * base.shape[0] * nq / med / 1e9, 1),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", ""),
    }
    if lat_us:
        lat = np.array(lat_us)
        res["p50_us"] = round(float(np.percentile(lat, 50)), 1)
        res["p99_us"] = round(float(np.percentile(lat, 99)), 1)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
