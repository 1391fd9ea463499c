#!/usr/bin/env python3
"""What hnswlib's Python binding adds to a single-query call.

Prints JSON lines:
  * "floor": the time of one `knn_query` call (k, ef 10, one thread) on an index of 1 vector
    (the binding and almost no search) and on one of 256 vectors (what the peer kit's
    `call_floor_us` measures, search included); best of 5 runs of --calls calls.
  * with DATASET: single-query QPS through the binding, on the protocol of
    `shoal-engine bench --mode single` and `hnswlib_core.sh` (the first --single queries, one
    call each, one thread, the median of --reps runs), after a 2-thread build with M and
    efConstruction as given. Run it beside hnswlib_core.sh to see the binding's share.
The dataset is read with the bench kit's common.read_vecs ($SHOAL_BENCH_KIT, default
../shared/bench beside the project).

Example:
  /tmp/shoal-peers-venv/bin/python node-engine/scripts/hnswlib_binding.py \\
      --dataset /tmp/shoal-bench-data/clustered-100k-128 --ef 10,20
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import hnswlib

KIT = os.environ.get(
    "SHOAL_BENCH_KIT",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "bench"),
)
sys.path.insert(0, KIT)
from common import read_vecs  # noqa: E402


def floor(dim, calls):
    rng = np.random.default_rng(3)
    for n, k in ((1, 1), (256, 10)):
        x = rng.standard_normal((n, dim)).astype(np.float32)
        p = hnswlib.Index(space="l2", dim=dim)
        p.init_index(max_elements=n, M=16, ef_construction=200, random_seed=100)
        p.add_items(x, np.arange(n), num_threads=1)
        p.set_ef(10)
        q = rng.standard_normal((1, dim)).astype(np.float32)
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(calls):
                p.knn_query(q, k=k, num_threads=1)
            best = min(best, (time.perf_counter() - t) / calls)
        print(json.dumps({"floor": True, "index_rows": n, "k": k, "ef": 10, "us_per_call": round(best * 1e6, 2)}))


def dataset(args):
    base = read_vecs(f"{args.dataset}/base.fvecs")
    query = read_vecs(f"{args.dataset}/query.fvecs")
    p = hnswlib.Index(space=args.space, dim=base.shape[1])
    p.init_index(max_elements=base.shape[0], M=args.M, ef_construction=args.ef_construction, random_seed=100)
    t = time.perf_counter()
    p.add_items(base, np.arange(base.shape[0]), num_threads=2)
    build_s = time.perf_counter() - t
    n = min(args.single, query.shape[0])
    for ef in [int(v) for v in args.ef.split(",")]:
        p.set_ef(ef)
        runs = []
        for _ in range(args.reps):
            t = time.perf_counter()
            for i in range(n):
                p.knn_query(query[i:i + 1], k=10, num_threads=1)
            runs.append(time.perf_counter() - t)
        runs.sort()
        print(json.dumps({"system": "hnswlib-binding", "M": args.M, "efConstruction": args.ef_construction,
                          "ef": ef, "build_s": round(build_s, 3), "queries": n, "reps": args.reps,
                          "qps": round(n / runs[len(runs) // 2], 1)}))
        sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", help="a directory with base.fvecs and query.fvecs")
    ap.add_argument("--space", default="l2", choices=["l2", "ip"])
    ap.add_argument("--M", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--ef", default="10", help="comma-separated ef values")
    ap.add_argument("--single", type=int, default=10000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dim", type=int, default=128, help="dimension of the floor indexes")
    ap.add_argument("--calls", type=int, default=20000, help="calls per floor run")
    args = ap.parse_args()
    floor(args.dim, args.calls)
    if args.dataset:
        dataset(args)


if __name__ == "__main__":
    main()
