#!/usr/bin/env python3
"""Index memory of the peers, for issue 3's "index memory <= 1.1x faiss's" comparison.

Builds each peer index on DATASET (the bench kit's layout) with the parameters given, on
2 threads, and prints one JSON line per index with
  * serialized_bytes: the size of the index as the library writes it (faiss.serialize_index,
    hnswlib save_index, usearch save): vectors/codes, ids, graph or lists, centroids;
  * rss_growth_bytes: how much this process's resident memory grew across the build (the
    training sample and the kit's arrays are allocated before the first reading).
Compare with the `index_bytes` that `shoal-engine bench` prints for the same parameters.

Example:
  /tmp/shoal-peers-venv/bin/python node-engine/scripts/peer_index_bytes.py \\
      /tmp/shoal-bench-data/clustered-100k-128 --nlist 1024 --pq-m 32 --hnsw-m 16 --ef-construction 200
"""
import argparse
import gc
import json
import os
import sys
import tempfile


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset")
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--pq-m", type=int, default=32, help="IVF-PQ sub-quantizers")
    ap.add_argument("--pq-nbits", type=int, default=8)
    ap.add_argument("--hnsw-m", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--systems", default="faiss-ivf,faiss-ivfsq8,faiss-ivfpq,faiss-hnsw,hnswlib,usearch")
    ap.add_argument("--kit", default=os.environ.get("SHOAL_BENCH_KIT", "/work/shared/bench"))
    a = ap.parse_args()
    sys.path.insert(0, a.kit)
    import numpy as np
    import faiss
    import hnswlib
    from usearch.index import Index as UIndex
    from common import read_vecs

    meta = json.load(open(os.path.join(a.dataset, "meta.json")))
    ip = meta.get("metric", "l2").lower() == "ip"
    base = np.ascontiguousarray(read_vecs(os.path.join(a.dataset, "base.fvecs")), dtype=np.float32)
    n, d = base.shape
    faiss.omp_set_num_threads(2)
    fmetric = faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2
    rng = np.random.default_rng(7)
    xt = base[np.sort(rng.choice(n, min(n, 64 * a.nlist), replace=False))]

    def quantizer():
        return faiss.IndexFlatIP(d) if ip else faiss.IndexFlatL2(d)

    def faiss_ivf(make):
        q = quantizer()
        ix = make(q)
        ix.train(xt)
        ix.add(base)
        return ix, len(faiss.serialize_index(ix)), q

    def build(name):
        if name == "faiss-ivf":
            return faiss_ivf(lambda q: faiss.IndexIVFFlat(q, d, a.nlist, fmetric)), {"nlist": a.nlist}
        if name == "faiss-ivfsq8":
            return faiss_ivf(lambda q: faiss.IndexIVFScalarQuantizer(
                q, d, a.nlist, faiss.ScalarQuantizer.QT_8bit, fmetric)), {"nlist": a.nlist}
        if name == "faiss-ivfpq":
            return faiss_ivf(lambda q: faiss.IndexIVFPQ(q, d, a.nlist, a.pq_m, a.pq_nbits, fmetric)), {
                "nlist": a.nlist, "m": a.pq_m, "nbits": a.pq_nbits}
        if name == "faiss-hnsw":
            ix = faiss.IndexHNSWFlat(d, a.hnsw_m, fmetric)
            ix.hnsw.efConstruction = a.ef_construction
            ix.add(base)
            return (ix, len(faiss.serialize_index(ix))), {"M": a.hnsw_m, "efConstruction": a.ef_construction}
        if name == "hnswlib":
            ix = hnswlib.Index(space="ip" if ip else "l2", dim=d)
            ix.init_index(max_elements=n, M=a.hnsw_m, ef_construction=a.ef_construction, random_seed=100)
            ix.set_num_threads(2)
            ix.add_items(base, np.arange(n))
            with tempfile.TemporaryDirectory() as t:
                p = os.path.join(t, "h.bin")
                ix.save_index(p)
                size = os.path.getsize(p)
            return (ix, size), {"M": a.hnsw_m, "efConstruction": a.ef_construction}
        if name == "usearch":
            ix = UIndex(ndim=d, metric="ip" if ip else "l2sq", dtype="f32",
                        connectivity=a.hnsw_m, expansion_add=a.ef_construction)
            ix.add(np.arange(n), base, threads=2)
            with tempfile.TemporaryDirectory() as t:
                p = os.path.join(t, "u.usearch")
                ix.save(p)
                size = os.path.getsize(p)
            return (ix, size), {"connectivity": a.hnsw_m, "expansion_add": a.ef_construction}
        raise SystemExit(f"unknown system {name}")

    for name in a.systems.split(","):
        gc.collect()
        before = rss_bytes()
        built, params = build(name)
        after = rss_bytes()
        print(json.dumps({"system": name, "n": n, "dim": d, "metric": "IP" if ip else "L2", "params": params,
                          "serialized_bytes": built[1], "rss_growth_bytes": after - before}), flush=True)
        del built
        gc.collect()


if __name__ == "__main__":
    main()
