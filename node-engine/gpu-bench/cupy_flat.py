#!/usr/bin/env python3
"""CuPy brute-force FLAT baseline (matrix product + top-k) and the device's GEMM peak.

Reads the exact data the Rust bench wrote (SHOAL_BENCH_DATA_DIR: base.f32, queries.f32, raw
little-endian float32) so both run on the same vectors, then prints one line per measurement in
the same format as `cargo bench --bench gpu_flat`:

    python3 node-engine/gpu-bench/cupy_flat.py --data DIR --rows 1000000 --dim 128

L2 distance = ||x||^2 - 2 q.x (+ ||q||^2, constant per query), top-k by argpartition + sort of the
k survivors, results copied back to the host (as the engine does). Query batches are cut so one
distance tile stays under --tile-bytes.
"""
import argparse
import os
import time

import numpy as np
import cupy as cp


def median_time(fn, min_runs=3, budget_s=2.0, max_runs=20):
    fn()
    cp.cuda.Device().synchronize()
    runs = []
    start = time.perf_counter()
    while len(runs) < min_runs or (time.perf_counter() - start < budget_s and len(runs) < max_runs):
        t = time.perf_counter()
        fn()
        cp.cuda.Device().synchronize()
        runs.append(time.perf_counter() - t)
    runs.sort()
    return runs[len(runs) // 2]


def gemm_peak(n=8192, iters=20, tf32=False):
    rng = cp.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=cp.float32)
    b = rng.standard_normal((n, n), dtype=cp.float32)
    # cuBLAS compute type for float32 matmul: PEDANTIC = strict FP32, TF32 = tensor cores.
    from cupy._core import _routines_linalg as linalg
    previous = linalg.get_compute_type(cp.float32)
    linalg.set_compute_type(cp.float32, linalg.COMPUTE_TYPE_TF32 if tf32 else linalg.COMPUTE_TYPE_PEDANTIC)
    c = a @ b
    cp.cuda.Device().synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        c = a @ b
    cp.cuda.Device().synchronize()
    secs = time.perf_counter() - t
    linalg.set_compute_type(cp.float32, previous)
    del c
    return 2.0 * n ** 3 * iters / secs


def flat_search(x, xnorm, q, k, tile_bytes):
    n = x.shape[0]
    batch = max(1, min(q.shape[0], tile_bytes // (4 * n)))
    ids_out, d_out = [], []
    for s in range(0, q.shape[0], batch):
        qb = q[s:s + batch]
        d = xnorm[None, :] - 2.0 * (qb @ x.T)
        if k < n:
            part = cp.argpartition(d, k - 1, axis=1)[:, :k]
        else:
            part = cp.broadcast_to(cp.arange(n), (qb.shape[0], n))
        pd = cp.take_along_axis(d, part, axis=1)
        order = cp.argsort(pd, axis=1)
        ids = cp.take_along_axis(part, order, axis=1)
        dist = cp.take_along_axis(pd, order, axis=1) + (qb * qb).sum(axis=1, keepdims=True)
        ids_out.append(cp.asnumpy(ids))
        d_out.append(cp.asnumpy(dist))
    return np.concatenate(ids_out), np.concatenate(d_out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("SHOAL_BENCH_DATA_DIR"), required=os.environ.get("SHOAL_BENCH_DATA_DIR") is None)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--tile-bytes", type=int, default=4 << 30)
    args = ap.parse_args()

    props = cp.cuda.runtime.getDeviceProperties(0)
    free, total = cp.cuda.runtime.memGetInfo()
    print(f"device\tordinal=0\tname={props['name'].decode()}\tcupy={cp.__version__}\tmemory_total_bytes={total}\tmemory_free_bytes={free}")
    for tf32 in (False, True):
        print(f"gemm_peak\tpeer=cupy\tn=8192\tmath={'tf32' if tf32 else 'fp32'}\ttflops={gemm_peak(tf32=tf32) / 1e12:.2f}")
    sgemm_peak = gemm_peak(tf32=False)

    base = np.fromfile(os.path.join(args.data, "base.f32"), dtype="<f4").reshape(args.rows, args.dim)
    queries = np.fromfile(os.path.join(args.data, "queries.f32"), dtype="<f4").reshape(-1, args.dim)
    x = cp.asarray(base)
    xnorm = (x * x).sum(axis=1)
    for k in (10, 100):
        for nq in (1, 100, 10_000):
            q = cp.asarray(queries[:nq])
            secs = median_time(lambda: flat_search(x, xnorm, q, k, args.tile_bytes))
            flops = 2.0 * nq * args.rows * args.dim / secs
            print(
                f"flat\tpath=cupy\tmetric=L2\tnq={nq}\tk={k}\tsecs={secs:.6f}\tqps={nq / secs:.1f}"
                f"\tgemm_tflops={flops / 1e12:.2f}\tpct_of_sgemm_peak={100.0 * flops / sgemm_peak:.1f}"
            )


if __name__ == "__main__":
    main()
