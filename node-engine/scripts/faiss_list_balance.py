#!/usr/bin/env python3
"""How many list entries a faiss IVF query scans, for comparison with the `rows_scanned` and
`list_imbalance` fields that `shoal-engine bench` prints for IVF indexes.

Builds faiss IVF-Flat on DATASET (the bench kit's layout: base.fvecs, query.fvecs) exactly as
the kit's bench_peers.py does (a seeded sample of 64 * nlist training rows, k-means seed 1234,
2 threads), then prints one JSON line per nprobe with
  * rows_scanned: the mean over the queries of the summed lengths of the lists each probes;
  * list_imbalance: nlist * sum(len^2) / n^2, faiss's own invlists.imbalance_factor().

Example:
  /tmp/shoal-peers-venv/bin/python node-engine/scripts/faiss_list_balance.py \\
      /tmp/shoal-bench-data/clustered-1m-128 --nlist 4096 --nprobe 3,5
"""
import argparse
import json
import os
import sys

import numpy as np


def read_fvecs(path):
    raw = np.fromfile(path, dtype=np.int32)
    if raw.size == 0:
        sys.exit(f"{path}: empty file")
    d = int(raw[0])
    if d <= 0 or raw.size % (d + 1):
        sys.exit(f"{path}: not an fvecs file (dimension {d}, {raw.size} words)")
    return raw.reshape(-1, d + 1)[:, 1:].view(np.float32).copy()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset")
    ap.add_argument("--nlist", type=int, default=0, help="0: 4096 if n >= 500k else 1024 (the kit's rule)")
    ap.add_argument("--nprobe", default="1,2,3,4,5,6,8", help="comma-separated")
    ap.add_argument("--metric", choices=["l2", "ip"], default="l2")
    a = ap.parse_args()
    import faiss

    base = read_fvecs(os.path.join(a.dataset, "base.fvecs"))
    queries = read_fvecs(os.path.join(a.dataset, "query.fvecs"))
    n, d = base.shape
    nlist = a.nlist or (4096 if n >= 500_000 else 1024)
    try:
        nprobes = [int(x) for x in a.nprobe.split(",")]
    except ValueError:
        sys.exit(f"--nprobe must be comma-separated integers, got {a.nprobe!r}")
    if any(p < 1 or p > nlist for p in nprobes):
        sys.exit(f"--nprobe values must lie in 1..{nlist}")
    faiss.omp_set_num_threads(2)
    metric = faiss.METRIC_L2 if a.metric == "l2" else faiss.METRIC_INNER_PRODUCT
    quant = faiss.IndexFlatL2(d) if a.metric == "l2" else faiss.IndexFlatIP(d)
    ix = faiss.IndexIVFFlat(quant, d, nlist, metric)
    ix.cp.seed = 1234
    ntrain = min(n, 64 * nlist)
    rng = np.random.default_rng(7)
    ix.train(base[np.sort(rng.choice(n, ntrain, replace=False))])
    ix.add(base)
    sizes = np.array([ix.invlists.list_size(l) for l in range(nlist)], dtype=np.float64)
    imbalance = float(nlist * (sizes**2).sum() / sizes.sum() ** 2)
    _, probed = quant.search(queries, max(nprobes))
    for p in nprobes:
        scanned = sizes[probed[:, :p]].sum(axis=1).mean()
        print(json.dumps({"system": "faiss-ivf", "nlist": nlist, "nprobe": p,
                          "rows_scanned": round(float(scanned), 1),
                          "list_imbalance": round(imbalance, 3),
                          "faiss_imbalance_factor": round(float(ix.invlists.imbalance_factor()), 3)}))


if __name__ == "__main__":
    main()
