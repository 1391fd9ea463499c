//! CUDA implementation of [`GpuBackend`] through cudarc with run-time loading of the driver
//! (`libcuda.so.1`), cuBLAS (`libcublas.so.12`) and NVRTC (`libnvrtc.so.12`): nothing CUDA is
//! needed to build or link. Distances are one cuBLAS SGEMM per tile (`Q·Xᵀ`, FP32), turned into
//! internal distances inside the top-k kernel (L2 via the base norms, IP, COSINE on normalised
//! vectors); top-k is a per-query radix select compiled with NVRTC at device open.
//!
//! cudarc panics when a library or symbol is missing, so every entry point first checks that the
//! libraries load and runs the device calls under `catch_unwind`.
#![allow(unsafe_code)]

use crate::core::bitset::Bitset;
use crate::core::distance;
use crate::core::types::{Metric, Neighbor};
use crate::gpu::GpuError;
use crate::gpu::args::DeviceSelection;
use crate::gpu::backend::GpuBackend;
use cudarc::cublas::sys::{cublasMath_t, cublasOperation_t};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};
use parking_lot::Mutex;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

/// The top-k selection kernel (CUDA C, compiled by NVRTC).
///
/// One thread block per query row of the distance tile. Distances become order-preserving
/// 32-bit keys; a 4-pass radix select (8 bits per pass, shared-memory histogram) finds the k-th
/// smallest key, then one pass writes every key below it and enough keys equal to it. Masked-out
/// rows and NaN distances never qualify. When at most k rows qualify, all of them are written.
pub const TOPK_KERNEL: &str = r#"
#define SHOAL_EXCLUDED 0xFFFFFFFFu

__device__ __forceinline__ unsigned int shoal_key(float d) {
    unsigned int u = __float_as_uint(d);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float shoal_dist(const float* row, const float* xnorm, int metric, int i) {
    float dot = row[i];
    return metric == 0 ? xnorm[i] - 2.0f * dot : -dot;
}

__device__ __forceinline__ unsigned int shoal_key_at(const float* row, const float* xnorm, int metric,
        const unsigned long long* mask, int has_mask, int row0, int i) {
    if (has_mask) {
        unsigned int r = (unsigned int)(row0 + i);
        if (((mask[r >> 6] >> (r & 63u)) & 1ull) == 0ull) return SHOAL_EXCLUDED;
    }
    float d = shoal_dist(row, xnorm, metric, i);
    if (isnan(d)) return SHOAL_EXCLUDED;
    return shoal_key(d);
}

extern "C" __global__ void shoal_topk_select(
        const float* __restrict__ dots, int ncols,
        const float* __restrict__ xnorm, int metric,
        const unsigned long long* __restrict__ mask, int has_mask, int row0, int k,
        unsigned int* __restrict__ out_rows, float* __restrict__ out_dist,
        unsigned int* __restrict__ out_count) {
    __shared__ unsigned int hist[256];
    __shared__ unsigned int s_prefix, s_pmask, s_remaining, s_total, s_less, s_eq;
    const int q = blockIdx.x;
    const float* row = dots + (size_t)q * (size_t)ncols;
    unsigned int* orow = out_rows + (size_t)q * (size_t)k;
    float* odist = out_dist + (size_t)q * (size_t)k;
    if (threadIdx.x == 0) {
        s_prefix = 0u; s_pmask = 0u; s_remaining = (unsigned int)k; s_total = 0u; s_less = 0u; s_eq = 0u;
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0u;
        __syncthreads();
        const unsigned int prefix = s_prefix, pmask = s_pmask;
        for (int i = threadIdx.x; i < ncols; i += blockDim.x) {
            unsigned int key = shoal_key_at(row, xnorm, metric, mask, has_mask, row0, i);
            if (key != SHOAL_EXCLUDED && (key & pmask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            if (shift == 24) {
                unsigned int t = 0u;
                for (int b = 0; b < 256; ++b) t += hist[b];
                s_total = t;
            }
            if (s_total > (unsigned int)k) {
                unsigned int rem = s_remaining, cum = 0u;
                for (int b = 0; b < 256; ++b) {
                    unsigned int h = hist[b];
                    if (cum + h >= rem) {
                        s_prefix = prefix | ((unsigned int)b << shift);
                        s_pmask = pmask | (255u << shift);
                        s_remaining = rem - cum;
                        break;
                    }
                    cum += h;
                }
            }
        }
        __syncthreads();
        if (s_total <= (unsigned int)k) break;
    }
    const unsigned int total = s_total;
    if (total <= (unsigned int)k) {
        for (int i = threadIdx.x; i < ncols; i += blockDim.x) {
            unsigned int key = shoal_key_at(row, xnorm, metric, mask, has_mask, row0, i);
            if (key != SHOAL_EXCLUDED) {
                unsigned int pos = atomicAdd(&s_less, 1u);
                orow[pos] = (unsigned int)(row0 + i);
                odist[pos] = shoal_dist(row, xnorm, metric, i);
            }
        }
        if (threadIdx.x == 0) out_count[q] = total;
        return;
    }
    const unsigned int kth = s_prefix, remaining = s_remaining;
    const unsigned int less_slots = (unsigned int)k - remaining;
    for (int i = threadIdx.x; i < ncols; i += blockDim.x) {
        unsigned int key = shoal_key_at(row, xnorm, metric, mask, has_mask, row0, i);
        if (key == SHOAL_EXCLUDED) continue;
        if (key < kth) {
            unsigned int pos = atomicAdd(&s_less, 1u);
            orow[pos] = (unsigned int)(row0 + i);
            odist[pos] = shoal_dist(row, xnorm, metric, i);
        } else if (key == kth) {
            unsigned int pos = atomicAdd(&s_eq, 1u);
            if (pos < remaining) {
                orow[less_slots + pos] = (unsigned int)(row0 + i);
                odist[less_slots + pos] = shoal_dist(row, xnorm, metric, i);
            }
        }
    }
    if (threadIdx.x == 0) out_count[q] = (unsigned int)k;
}
"#;

const TOPK_THREADS: u32 = 256;

/// Check that the driver, cuBLAS and NVRTC libraries can be loaded.
///
/// Errors: `CudaUnavailable` naming the first library that cannot be loaded.
pub fn libraries_present() -> Result<(), GpuError> {
    // SAFETY: each check only dlopen()s candidate library names and closes them again; no symbol
    // is called.
    let driver = unsafe { cudarc::driver::sys::is_culib_present() };
    if !driver {
        return Err(GpuError::CudaUnavailable {
            library: "libcuda.so.1 (NVIDIA driver)",
        });
    }
    // SAFETY: as above.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(GpuError::CudaUnavailable {
            library: "libcublas.so.12 (cuBLAS)",
        });
    }
    // SAFETY: as above.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(GpuError::CudaUnavailable {
            library: "libnvrtc.so.12 (NVRTC)",
        });
    }
    Ok(())
}

/// Compile the top-k kernel to PTX for `arch` (e.g. `"sm_90"`). Needs only NVRTC, no GPU.
pub fn compile_topk_kernel(arch: &'static str) -> Result<cudarc::nvrtc::Ptx, GpuError> {
    // SAFETY: dlopen check only.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(GpuError::CudaUnavailable {
            library: "libnvrtc.so.12 (NVRTC)",
        });
    }
    let opts = CompileOptions {
        arch: Some(arch),
        ..Default::default()
    };
    guard(|| {
        compile_ptx_with_opts(TOPK_KERNEL, opts).map_err(|e| GpuError::CompileKernel {
            reason: compile_log(&e),
        })
    })
    .unwrap_or_else(|reason| Err(GpuError::CompileKernel { reason }))
}

fn compile_log(e: &cudarc::nvrtc::CompileError) -> String {
    match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
        other => format!("{other:?}"),
    }
}

/// Run `f`, turning a panic inside cudarc (missing library or symbol) into an error message.
fn guard<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic inside the CUDA bindings".into())
    })
}

/// Number of CUDA devices the driver reports.
pub fn device_count() -> Result<u32, GpuError> {
    libraries_present()?;
    match guard(CudaContext::device_count) {
        Ok(Ok(n)) => Ok(n.max(0) as u32),
        Ok(Err(e)) => Err(GpuError::OpenDevice {
            ordinal: 0,
            reason: format!("cuDeviceGetCount: {e}"),
        }),
        Err(reason) => Err(GpuError::OpenDevice { ordinal: 0, reason }),
    }
}

/// Open the selected devices (the probe [`crate::gpu::GpuRuntime::start`] uses).
///
/// Errors: `CudaUnavailable` when a library is missing, `SelectDevices` for an ordinal the
/// machine lacks, `NoDevices` when none is left, `OpenDevice`/`CompileKernel` per device.
pub fn probe(selection: &DeviceSelection) -> Result<Vec<CudaBackend>, GpuError> {
    let count = device_count()?;
    let ids = selection.resolve(count)?;
    if ids.is_empty() {
        return Err(GpuError::NoDevices);
    }
    ids.into_iter().map(CudaBackend::open).collect()
}

struct Workspace {
    dots: CudaSlice<f32>,
    out_rows: CudaSlice<u32>,
    out_dist: CudaSlice<f32>,
    out_count: CudaSlice<u32>,
}

struct Inner {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    ws: Option<Workspace>,
    no_mask: CudaSlice<u64>,
}

/// One CUDA device: context, stream, cuBLAS handle, compiled top-k kernel and a reusable
/// workspace. Device calls are serialised per device (one stream).
pub struct CudaBackend {
    ordinal: u32,
    name: String,
    compute_capability: (i32, i32),
    ctx: Arc<CudaContext>,
    topk: CudaFunction,
    inner: Mutex<Inner>,
}

/// Base vectors resident on a device, with their squared norms (for L2).
pub struct CudaBlock {
    vectors: CudaSlice<f32>,
    norms: CudaSlice<f32>,
    rows: usize,
    dim: usize,
    metric: Metric,
}

/// A query batch on the device, with host-side squared norms (L2 adds them back).
pub struct CudaQueries {
    data: CudaSlice<f32>,
    norms: Vec<f32>,
    n: usize,
    dim: usize,
    metric: Metric,
}

/// Allowed-row bits of a block on the device.
pub struct CudaMask {
    words: CudaSlice<u64>,
    len: usize,
}

fn arch_for(cc: (i32, i32)) -> &'static str {
    match cc {
        (9, _) => "sm_90",
        (8, 9) => "sm_89",
        (8, 6) | (8, 7) => "sm_86",
        (8, _) => "sm_80",
        (7, 5) => "sm_75",
        (7, _) => "sm_70",
        (10, _) => "sm_100",
        (12, _) => "sm_120",
        _ => "sm_70",
    }
}

impl CudaBackend {
    /// Open device `ordinal`: create its context and stream, cuBLAS handle, compile the kernel.
    pub fn open(ordinal: u32) -> Result<Self, GpuError> {
        libraries_present()?;
        let open_err = |reason: String| GpuError::OpenDevice { ordinal, reason };
        let opened = guard(|| -> Result<Self, GpuError> {
            let ctx = CudaContext::new(ordinal as usize).map_err(|e| open_err(format!("{e}")))?;
            let name = ctx.name().map_err(|e| open_err(format!("{e}")))?;
            let cc = ctx
                .compute_capability()
                .map_err(|e| open_err(format!("{e}")))?;
            let stream = ctx.new_stream().map_err(|e| open_err(format!("{e}")))?;
            let blas =
                CudaBlas::new(stream.clone()).map_err(|e| open_err(format!("cuBLAS: {e:?}")))?;
            let ptx = compile_topk_kernel(arch_for(cc))?;
            let module = ctx
                .load_module(ptx)
                .map_err(|e| open_err(format!("load top-k module: {e}")))?;
            let topk = module
                .load_function("shoal_topk_select")
                .map_err(|e| open_err(format!("{e}")))?;
            let no_mask = stream
                .alloc_zeros::<u64>(1)
                .map_err(|e| open_err(format!("{e}")))?;
            Ok(Self {
                ordinal,
                name,
                compute_capability: cc,
                ctx,
                topk,
                inner: Mutex::new(Inner {
                    stream,
                    blas,
                    ws: None,
                    no_mask,
                }),
            })
        });
        opened.unwrap_or_else(|reason| Err(open_err(reason)))
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// Free and total device memory in bytes (cuMemGetInfo).
    pub fn memory(&self) -> Result<(usize, usize), GpuError> {
        self.ctx.mem_get_info().map_err(|e| GpuError::OpenDevice {
            ordinal: self.ordinal,
            reason: format!("{e}"),
        })
    }

    fn copy_err(&self, e: impl std::fmt::Display) -> GpuError {
        GpuError::Copy {
            ordinal: self.ordinal,
            reason: e.to_string(),
        }
    }

    fn bind(&self) -> Result<(), GpuError> {
        self.ctx.bind_to_thread().map_err(|e| GpuError::OpenDevice {
            ordinal: self.ordinal,
            reason: format!("{e}"),
        })
    }

    /// Measure SGEMM throughput (FLOP/s) on `n x n` matrices over `iters` calls; with `tf32` the
    /// cuBLAS handle may use TF32 tensor cores for this measurement (reset afterwards).
    pub fn measure_gemm_peak(&self, n: usize, iters: usize, tf32: bool) -> Result<f64, GpuError> {
        self.bind()?;
        let inner = self.inner.lock();
        let host: Vec<f32> = (0..n * n)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let a = inner
            .stream
            .clone_htod(&host)
            .map_err(|e| self.copy_err(e))?;
        let b = inner
            .stream
            .clone_htod(&host)
            .map_err(|e| self.copy_err(e))?;
        let mut c = inner
            .stream
            .alloc_zeros::<f32>(n * n)
            .map_err(|e| self.copy_err(e))?;
        let mode = if tf32 {
            cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
        } else {
            cublasMath_t::CUBLAS_DEFAULT_MATH
        };
        // SAFETY: the handle is live (owned by `inner.blas`) and used only under the lock.
        let _ = unsafe { cudarc::cublas::sys::cublasSetMathMode(*inner.blas.handle(), mode) };
        let ni = n as i32;
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: ni,
            n: ni,
            k: ni,
            alpha: 1.0f32,
            lda: ni,
            ldb: ni,
            beta: 0.0f32,
            ldc: ni,
        };
        let gemm_err = |e: cudarc::cublas::result::CublasError| GpuError::Gemm {
            ordinal: self.ordinal,
            reason: format!("{e:?}"),
        };
        let run = |c: &mut CudaSlice<f32>| -> Result<(), GpuError> {
            // SAFETY: a, b, c each hold n*n floats, matching m = n = k = n and lda = ldb = ldc = n.
            unsafe { inner.blas.gemm(cfg, &a, &b, c) }.map_err(gemm_err)
        };
        run(&mut c)?; // warm-up (kernel selection)
        inner.stream.synchronize().map_err(|e| self.copy_err(e))?;
        let t0 = Instant::now();
        for _ in 0..iters {
            run(&mut c)?;
        }
        inner.stream.synchronize().map_err(|e| self.copy_err(e))?;
        let secs = t0.elapsed().as_secs_f64();
        // SAFETY: as above; restore FP32 math for searches.
        let _ = unsafe {
            cudarc::cublas::sys::cublasSetMathMode(
                *inner.blas.handle(),
                cublasMath_t::CUBLAS_DEFAULT_MATH,
            )
        };
        Ok(2.0 * (n as f64).powi(3) * iters as f64 / secs)
    }
}

fn prepared(v: &[f32], dim: usize, metric: Metric) -> (Vec<f32>, Vec<f32>) {
    let mut data = v.to_vec();
    if metric == Metric::COSINE {
        for row in data.chunks_mut(dim) {
            distance::normalize(row);
        }
    }
    let norms = data.chunks(dim).map(distance::norm_sq).collect();
    (data, norms)
}

impl GpuBackend for CudaBackend {
    type Block = CudaBlock;
    type Queries = CudaQueries;
    type Mask = CudaMask;

    fn ordinal(&self) -> u32 {
        self.ordinal
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn upload_block(
        &self,
        vectors: &[f32],
        dim: usize,
        metric: Metric,
    ) -> Result<CudaBlock, GpuError> {
        self.bind()?;
        let (data, norms) = prepared(vectors, dim, metric);
        let inner = self.inner.lock();
        let alloc_err = |e: cudarc::driver::DriverError| GpuError::Allocate {
            ordinal: self.ordinal,
            bytes: self.block_bytes(norms.len(), dim),
            reason: e.to_string(),
        };
        let vectors = inner.stream.clone_htod(&data).map_err(alloc_err)?;
        let norms_d = inner.stream.clone_htod(&norms).map_err(alloc_err)?;
        Ok(CudaBlock {
            vectors,
            norms: norms_d,
            rows: norms.len(),
            dim,
            metric,
        })
    }

    fn upload_queries(
        &self,
        queries: &[f32],
        dim: usize,
        metric: Metric,
    ) -> Result<CudaQueries, GpuError> {
        self.bind()?;
        let (data, norms) = prepared(queries, dim, metric);
        let inner = self.inner.lock();
        let data = inner
            .stream
            .clone_htod(&data)
            .map_err(|e| self.copy_err(e))?;
        Ok(CudaQueries {
            data,
            n: norms.len(),
            norms,
            dim,
            metric,
        })
    }

    fn upload_mask(&self, allowed: &Bitset) -> Result<CudaMask, GpuError> {
        self.bind()?;
        let mut words = vec![0u64; allowed.len().div_ceil(64).max(1)];
        for r in allowed.iter_ones() {
            words[r / 64] |= 1u64 << (r % 64);
        }
        let inner = self.inner.lock();
        let words = inner
            .stream
            .clone_htod(&words)
            .map_err(|e| self.copy_err(e))?;
        Ok(CudaMask {
            words,
            len: allowed.len(),
        })
    }

    fn tile_topk(
        &self,
        block: &CudaBlock,
        rows: Range<usize>,
        queries: &CudaQueries,
        k: usize,
        mask: Option<&CudaMask>,
    ) -> Result<Vec<Vec<Neighbor>>, GpuError> {
        let invalid = |reason: String| Err(GpuError::InvalidRequest { reason });
        if block.dim != queries.dim || block.metric != queries.metric {
            return invalid("query batch and block differ in dim or metric".into());
        }
        if rows.end > block.rows || rows.is_empty() || k == 0 {
            return invalid(format!(
                "row range {rows:?} of a {}-row block, k {k}",
                block.rows
            ));
        }
        if mask.is_some_and(|m| m.len != block.rows) {
            return invalid("mask length differs from the block's rows".into());
        }
        if rows.end > i32::MAX as usize || k > i32::MAX as usize || block.dim > i32::MAX as usize {
            return invalid("tile too large for 32-bit kernel arguments".into());
        }
        self.bind()?;
        let (nq, rt, dim) = (queries.n, rows.len(), block.dim);
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        // Grow the workspace when this tile needs more than the last one did.
        let need_dots = nq * rt;
        let need_out = nq * k;
        let fits = inner.ws.as_ref().is_some_and(|w| {
            w.dots.len() >= need_dots && w.out_rows.len() >= need_out && w.out_count.len() >= nq
        });
        if !fits {
            inner.ws = None; // free before allocating the larger one
            let (d, o, c) = (need_dots.max(1), need_out.max(1), nq.max(1));
            let alloc_err = |e: cudarc::driver::DriverError| GpuError::Allocate {
                ordinal: self.ordinal,
                bytes: 4 * (d + 2 * o + c) as u64,
                reason: e.to_string(),
            };
            // SAFETY: every element is written (GEMM with beta = 0, the kernel) before it is read.
            let ws = unsafe {
                Workspace {
                    dots: inner.stream.alloc::<f32>(d).map_err(alloc_err)?,
                    out_rows: inner.stream.alloc::<u32>(o).map_err(alloc_err)?,
                    out_dist: inner.stream.alloc::<f32>(o).map_err(alloc_err)?,
                    out_count: inner.stream.alloc::<u32>(c).map_err(alloc_err)?,
                }
            };
            inner.ws = Some(ws);
        }
        let Some(ws) = inner.ws.as_mut() else {
            return invalid("workspace missing".into());
        };
        // dots (column-major rt x nq, i.e. row-major nq x rt) = X[rows] · Qᵀ.
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: rt as i32,
            n: nq as i32,
            k: dim as i32,
            alpha: 1.0f32,
            lda: dim as i32,
            ldb: dim as i32,
            beta: 0.0f32,
            ldc: rt as i32,
        };
        let x = block.vectors.slice(rows.start * dim..rows.end * dim);
        // SAFETY: x holds rt*dim floats (lda = dim), queries hold nq*dim (ldb = dim), dots holds
        // at least rt*nq (ldc = rt), as the shapes above were checked.
        unsafe { inner.blas.gemm(cfg, &x, &queries.data, &mut ws.dots) }.map_err(|e| {
            GpuError::Gemm {
                ordinal: self.ordinal,
                reason: format!("{e:?}"),
            }
        })?;
        let xnorm = block.norms.slice(rows.clone());
        let metric_id: i32 = if block.metric == Metric::L2 { 0 } else { 1 };
        let (mask_words, has_mask) = match mask {
            Some(m) => (&m.words, 1i32),
            None => (&inner.no_mask, 0i32),
        };
        let (ncols, row0, k32) = (rt as i32, rows.start as i32, k as i32);
        let launch = LaunchConfig {
            grid_dim: (nq as u32, 1, 1),
            block_dim: (TOPK_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut builder = inner.stream.launch_builder(&self.topk);
        builder
            .arg(&ws.dots)
            .arg(&ncols)
            .arg(&xnorm)
            .arg(&metric_id)
            .arg(mask_words)
            .arg(&has_mask)
            .arg(&row0)
            .arg(&k32)
            .arg(&mut ws.out_rows)
            .arg(&mut ws.out_dist)
            .arg(&mut ws.out_count);
        // SAFETY: argument types and order match `shoal_topk_select`; dots holds nq rows of
        // ncols, xnorm ncols floats, the mask covers every block row when has_mask is set, and
        // the outputs hold nq*k (rows, dists) and nq counts.
        unsafe { builder.launch(launch) }.map_err(|e| GpuError::LaunchKernel {
            ordinal: self.ordinal,
            reason: e.to_string(),
        })?;
        let out_rows = inner
            .stream
            .clone_dtoh(&ws.out_rows.slice(0..need_out))
            .map_err(|e| self.copy_err(e))?;
        let out_dist = inner
            .stream
            .clone_dtoh(&ws.out_dist.slice(0..need_out))
            .map_err(|e| self.copy_err(e))?;
        let counts = inner
            .stream
            .clone_dtoh(&ws.out_count.slice(0..nq))
            .map_err(|e| self.copy_err(e))?;
        let mut out = Vec::with_capacity(nq);
        for (q, &count) in counts.iter().enumerate() {
            let c = (count as usize).min(k);
            let base = q * k;
            let mut hits: Vec<Neighbor> = (0..c)
                .map(|i| {
                    let d = out_dist[base + i];
                    let dist = if block.metric == Metric::L2 {
                        (d + queries.norms[q]).max(0.0)
                    } else {
                        d
                    };
                    Neighbor {
                        row: out_rows[base + i],
                        dist,
                    }
                })
                .collect();
            hits.sort_by(Neighbor::cmp_rank);
            out.push(hits);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probing_without_cuda_libraries_reports_which_library_is_missing() {
        match probe(&DeviceSelection::All) {
            // A machine with the driver and toolkit libraries: at least one device opened.
            Ok(devices) => assert!(!devices.is_empty()),
            Err(e @ GpuError::CudaUnavailable { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("cannot load lib"), "{msg}");
                assert!(libraries_present().is_err());
                assert!(matches!(
                    CudaBackend::open(0),
                    Err(GpuError::CudaUnavailable { .. })
                ));
            }
            Err(e @ (GpuError::NoDevices | GpuError::OpenDevice { .. })) => {
                // Libraries load but no usable device (e.g. a driver without a GPU).
                assert!(libraries_present().is_ok(), "{e}");
            }
            Err(e) => panic!("unexpected probe error: {e}"),
        }
    }

    #[test]
    fn top_k_kernel_compiles_with_nvrtc_when_nvrtc_is_present() {
        match compile_topk_kernel("sm_90") {
            Ok(ptx) => assert!(ptx.to_src().contains("shoal_topk_select")),
            Err(GpuError::CudaUnavailable { library }) => {
                assert!(library.contains("nvrtc"), "{library}")
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn architecture_follows_compute_capability() {
        assert_eq!(arch_for((9, 0)), "sm_90");
        assert_eq!(arch_for((8, 0)), "sm_80");
        assert_eq!(arch_for((8, 9)), "sm_89");
    }
}
