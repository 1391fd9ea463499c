#!/usr/bin/env python3
"""Generate `sphere-<N>-<D>-ip`: unit-normalised vectors for inner-product (cosine) search.

A second benchmark dataset in the bench kit's format (base.fvecs, query.fvecs,
groundtruth.ivecs, meta.json with "metric": "ip"), with a structure unlike clustered-1m-128's
Gaussian mixture: points live on the unit sphere, around 256 topic directions whose
concentration varies tenfold (tight and diffuse topics side by side), and 15% of the points
blend two topics (bridges between clusters, which is where IVF probing and graph routing get
hard). Everything is seeded numpy float64, elementwise (no BLAS), rounded once to float32, so
the bytes do not depend on thread count or BLAS kernel.

Model (model seed 7; base seed 1101, queries seed 2202):
  * topic directions  mu_k ~ N(0, I_D), normalised                      (k < 256)
  * topic weights     w_k ~ LogNormal(0, 0.75), normalised
  * topic spread      tau_k ~ LogUniform(0.15, 1.5)
  * point: pick k ~ w; with probability 0.15 also k2 ~ w and t ~ U(0.3, 0.7), else t = 0;
    x = (1 - t) mu_k + t mu_k2 + tau * z / sqrt(D),  z ~ N(0, I_D),  tau = tau_k;  x /= |x|
Ground truth: exact top-k by inner product (the kit's exact_ground_truth: faiss IndexFlatIP
candidates, float64 re-rank, ties by id).

Example (100k rows, 96 dimensions):
  /tmp/shoal-peers-venv/bin/python node-engine/scripts/gen_sphere_ip.py --n 100000 --out /tmp/shoal-bench-data
  -> /tmp/shoal-bench-data/sphere-100k-96-ip
Then: shoal-engine bench --metric IP ... and bench_peers.py read "metric": "ip" from meta.json.
"""
import argparse
import json
import os
import sys
import time

TOPICS = 256
BLEND = 0.15
MODEL_SEED, BASE_SEED, QUERY_SEED = 7, 1101, 2202
CHUNK = 100_000


def model(np, d):
    rng = np.random.default_rng(MODEL_SEED)
    mu = rng.standard_normal((TOPICS, d))
    mu /= np.sqrt((mu * mu).sum(axis=1, keepdims=True))
    w = rng.lognormal(0.0, 0.75, TOPICS)
    w /= w.sum()
    tau = np.exp(rng.uniform(np.log(0.15), np.log(1.5), TOPICS))
    return mu, w, tau


def sample(np, n, d, seed, m):
    mu, w, tau = m
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, CHUNK):
        c = min(CHUNK, n - s)
        k = rng.choice(TOPICS, size=c, p=w)
        k2 = rng.choice(TOPICS, size=c, p=w)
        t = np.where(rng.random(c) < BLEND, rng.uniform(0.3, 0.7, c), 0.0)
        z = rng.standard_normal((c, d))
        x = (1.0 - t)[:, None] * mu[k] + t[:, None] * mu[k2] + (tau[k] / np.sqrt(d))[:, None] * z
        x /= np.sqrt((x * x).sum(axis=1, keepdims=True))
        out[s:s + c] = x.astype(np.float32)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="base rows (default 100000)")
    ap.add_argument("--nq", type=int, default=10_000, help="queries (default 10000)")
    ap.add_argument("--dim", type=int, default=96, help="dimension (default 96)")
    ap.add_argument("--k", type=int, default=100, help="ground-truth depth (default 100)")
    ap.add_argument("--out", default=os.environ.get("BENCH_DATA", "/tmp/shoal-bench-data"),
                    help="parent directory (default $BENCH_DATA or /tmp/shoal-bench-data)")
    ap.add_argument("--kit", default=os.environ.get("SHOAL_BENCH_KIT", "/work/shared/bench"),
                    help="bench kit directory holding common.py (default $SHOAL_BENCH_KIT or /work/shared/bench)")
    a = ap.parse_args()
    if a.n < 1 or a.nq < 1 or a.dim < 2 or a.k < 1 or a.k > a.n:
        ap.error("need n >= 1, nq >= 1, dim >= 2, 1 <= k <= n")
    sys.path.insert(0, a.kit)
    import numpy as np
    from common import exact_ground_truth, sha256_file, write_vecs

    label = f"{a.n // 1000}k" if a.n % 1000 == 0 else str(a.n)
    if a.n % 1_000_000 == 0:
        label = f"{a.n // 1_000_000}m"
    name = f"sphere-{label}-{a.dim}-ip"
    out = os.path.join(a.out, name)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    m = model(np, a.dim)
    base = sample(np, a.n, a.dim, BASE_SEED, m)
    q = sample(np, a.nq, a.dim, QUERY_SEED, m)
    gen_s = time.time() - t0
    t0 = time.time()
    gt = exact_ground_truth(base, q, k=a.k, metric="ip")
    gt_s = time.time() - t0
    files = {"base.fvecs": base, "query.fvecs": q, "groundtruth.ivecs": np.asarray(gt, dtype=np.int32)}
    for f, arr in files.items():
        write_vecs(os.path.join(out, f), arr)
    meta = {
        "name": name,
        "dim": a.dim,
        "n_base": a.n,
        "n_query": a.nq,
        "k_gt": a.k,
        "metric": "ip",
        "generator": "node-engine/scripts/gen_sphere_ip.py",
        "seeds": {"model": MODEL_SEED, "base": BASE_SEED, "query": QUERY_SEED},
        "topics": TOPICS,
        "blend": BLEND,
        "numpy": np.__version__,
        "gen_seconds": round(gen_s, 1),
        "gt_seconds": round(gt_s, 1),
        "sha256": {f: sha256_file(os.path.join(out, f)) for f in files},
    }
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(out)


if __name__ == "__main__":
    main()
