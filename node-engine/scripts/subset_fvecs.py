#!/usr/bin/env python3
"""Cut the first N base rows out of an fvecs dataset and recompute its exact ground truth.

The dataset layout is the bench kit's (`../shared/bench/README.md`): DATASET_DIR holds
base.fvecs, query.fvecs, groundtruth.ivecs and meta.json. The subset keeps every query and
gets its own exact top-k (the kit's `exact_ground_truth`: faiss flat candidates re-ranked in
float64, ties by id), so recall figures on the subset are exact, not inherited from the full set.

Example (the 100k subset BENCHMARKS.md uses):
  /tmp/shoal-peers-venv/bin/python node-engine/scripts/subset_fvecs.py \\
      /tmp/shoal-bench-data/clustered-1m-128 100000
  -> /tmp/shoal-bench-data/clustered-100k-128
"""
import argparse
import json
import os
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="source dataset directory (base.fvecs, query.fvecs, meta.json)")
    ap.add_argument("n", type=int, help="number of leading base rows to keep")
    ap.add_argument("--out", help="output directory (default: <src parent>/<name with the row count replaced>)")
    ap.add_argument("--k", type=int, default=100, help="ground-truth depth (default 100)")
    ap.add_argument("--kit", default=os.environ.get("SHOAL_BENCH_KIT", "/work/shared/bench"),
                    help="bench kit directory holding common.py (default $SHOAL_BENCH_KIT or /work/shared/bench)")
    a = ap.parse_args()
    sys.path.insert(0, a.kit)
    import numpy as np
    from common import exact_ground_truth, read_vecs, write_vecs

    with open(os.path.join(a.src, "meta.json")) as f:
        meta = json.load(f)
    base = read_vecs(os.path.join(a.src, "base.fvecs"))
    if not 0 < a.n <= base.shape[0]:
        ap.error(f"n must be in [1, {base.shape[0]}], got {a.n}")
    base = np.ascontiguousarray(base[: a.n])
    q = np.ascontiguousarray(read_vecs(os.path.join(a.src, "query.fvecs")))
    name = os.path.basename(os.path.normpath(a.src))
    label = f"{a.n // 1000}k" if a.n % 1000 == 0 else str(a.n)
    parts = name.split("-")
    sub_name = "-".join([parts[0], label] + parts[2:]) if len(parts) >= 3 else f"{name}-{label}"
    out = a.out or os.path.join(os.path.dirname(os.path.normpath(a.src)), sub_name)
    os.makedirs(out, exist_ok=True)
    metric = meta.get("metric", "l2")
    gt = exact_ground_truth(base, q, k=a.k, metric=metric)
    write_vecs(os.path.join(out, "base.fvecs"), base)
    write_vecs(os.path.join(out, "query.fvecs"), q)
    write_vecs(os.path.join(out, "groundtruth.ivecs"), np.asarray(gt, dtype=np.int32))
    meta.update({
        "name": f"{sub_name} (first {a.n} rows of {name})",
        "n_base": a.n,
        "k_gt": a.k,
        "subset_of": name,
        "sha256": None,
    })
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(out)


if __name__ == "__main__":
    main()
