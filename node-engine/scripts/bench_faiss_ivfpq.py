#!/usr/bin/env python3
"""faiss IndexIVFPQ (optionally with a flat re-rank) under the bench kit's peer protocol.

The kit's bench_peers.py has no IVF-PQ system; this script adds one without copying the kit:
it imports bench_peers (from --kit), subclasses its FaissIVFAdapter to build
`IndexIVFPQ(nlist, m, nbits)` (same seeded 64 x nlist training sample, same k-means seed), wraps
it in `IndexRefineFlat(k_factor = refine_k)` when --refine is given (our IVF_PQ `refine` /
`refine_k`), and runs the kit's `run_ann` (build on 2 threads, nprobe sweep, single-query and
batch QPS at recall 0.90 / 0.95 / 0.99, `call_floor_us`). Output: the kit's JSON layout.

Example:
  /tmp/shoal-peers-venv/bin/python node-engine/scripts/bench_faiss_ivfpq.py \\
      /tmp/shoal-bench-data/clustered-100k-128 --m 32 --nbits 8 --refine 4 --out pq_peers.json
"""
import argparse
import json
import os
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", help="dataset directory (base.fvecs, query.fvecs, groundtruth.ivecs, meta.json)")
    ap.add_argument("--m", type=int, required=True, help="PQ sub-quantizers (must divide the dimension)")
    ap.add_argument("--nbits", type=int, default=8, help="bits per sub-quantizer code (default 8)")
    ap.add_argument("--nlist", type=int, default=0, help="0: 4096 if n >= 500k else 1024 (the kit's rule)")
    ap.add_argument("--refine", type=int, default=0, help="re-rank refine x k candidates with the raw vectors (0: off)")
    ap.add_argument("--single", type=int, default=2000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out")
    ap.add_argument("--kit", default=os.environ.get("SHOAL_BENCH_KIT", "/work/shared/bench"),
                    help="bench kit directory (default $SHOAL_BENCH_KIT or /work/shared/bench)")
    a = ap.parse_args()
    sys.path.insert(0, a.kit)
    import numpy as np
    import bench_peers as bp
    from common import read_vecs

    faiss = bp.faiss

    class FaissIVFPQAdapter(bp.FaissIVFAdapter):
        def __init__(self, metric, nlist):
            super().__init__(metric, nlist, "flat")
            self.index = f"IndexIVFPQ(m={a.m}, nbits={a.nbits})" + (f" + IndexRefineFlat(k_factor={a.refine})" if a.refine else "")

        def params(self):
            p = super().params()
            p.update({"m": a.m, "nbits": a.nbits, "refine_k": a.refine})
            return p

        def build(self, base):
            faiss.omp_set_num_threads(bp.BUILD_THREADS)
            n, d = base.shape
            self.ntrain = min(n, 64 * self.nlist)
            rng = np.random.default_rng(7)
            xt = base[np.sort(rng.choice(n, self.ntrain, replace=False))]
            self.ivf = faiss.IndexIVFPQ(self._quantizer(d), d, self.nlist, a.m, a.nbits, self.metric)
            self.ivf.cp.seed = 1234
            self.ix = faiss.IndexRefineFlat(self.ivf) if a.refine else self.ivf
            if a.refine:
                self.ix.k_factor = a.refine
            t0 = time.perf_counter()
            self.ix.train(xt)
            self.train_s = time.perf_counter() - t0
            self.kmeans_shared = False
            t1 = time.perf_counter()
            self.ix.add(base)
            self.add_s = time.perf_counter() - t1

        def set_knob(self, v):
            self.ivf.nprobe = v

        def free(self):
            del self.ix
            del self.ivf

    with open(os.path.join(a.dataset, "meta.json")) as f:
        meta = json.load(f)
    metric = meta["metric"]
    base = read_vecs(os.path.join(a.dataset, "base.fvecs"))
    q = read_vecs(os.path.join(a.dataset, "query.fvecs"))
    gt = read_vecs(os.path.join(a.dataset, "groundtruth.ivecs"))
    n, d = base.shape
    nlist = a.nlist or (4096 if n >= 500_000 else 1024)
    floor = bp.call_floor_us(lambda: bp.FaissIVFAdapter(metric, 4, "flat"), d, metric, 1)
    res = {"dataset": meta["name"], "n_base": n, "dim": d, "n_query": q.shape[0], "metric": metric,
           "versions": bp.versions(), "k": bp.K, "reps": a.reps, "single_queries": a.single,
           "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           "results": [bp.run_ann(FaissIVFPQAdapter(metric, nlist), base, q, gt, a.reps, a.single, floor)]}
    text = json.dumps(res, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
