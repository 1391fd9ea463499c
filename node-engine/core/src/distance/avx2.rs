//! x86-64 kernels for AVX2 + FMA (+ F16C for half-precision rows): 8 lanes. Every AVX-512 CPU
//! has these too, so the AVX2-only kernels (`dot_rows`, the SQ8 ones) also run under
//! `Isa::Avx512`. Each is `unsafe` only because it must run on a CPU with the named features
//! (see [`super::detect`]); memory is touched through slices' in-bounds pointers (tails
//! through bounds-checked loads). The row prefetch (SSE, the x86-64 baseline) is shared with
//! the AVX-512 kernels.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) fn pq_tables_avx2(
    x: &[f32],
    books_t: &[f32],
    init: &[f32],
    scale: f32,
    dsub: usize,
    ksub: usize,
    stride: usize,
    out: &mut [f32],
) {
    super::quant::pq_tables_body(x, books_t, init, scale, dsub, ksub, stride, out)
}

/// Rows ahead of the one being scored whose cache lines a batch scan prefetches: a 4 KiB
/// page ahead at 128-d, so the loads never wait at a page boundary, where the hardware
/// prefetcher stops (a single-query scan is bound by memory, not arithmetic).
pub(super) const PREFETCH_BYTES_AHEAD: usize = 4096;

/// Prefetch row `i + ahead` of `rows` (`d` floats per row) when it exists. SSE only (the
/// x86-64 baseline), so it inlines into the AVX2 and the AVX-512 kernels.
#[inline(always)]
pub(super) fn prefetch_row(rows: &[f32], d: usize, i: usize, ahead: usize) {
    let start = (i + ahead) * d;
    if start + d <= rows.len() {
        let row = &rows[start..start + d];
        let mut off = 0;
        while off < d {
            // SAFETY: `off < d`, so the pointer is inside `row`; a prefetch never faults.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().add(off).cast::<i8>()) };
            off += 16;
        }
    }
}

/// 8 u8 codes widened to f32 lanes. SAFETY: the caller keeps `i + 8 <= code.len()`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn codes8(code: &[u8], i: usize) -> __m256 {
    // SAFETY: 8 bytes from `i` are inside `code` (caller's contract).
    let c8 = unsafe { _mm_loadl_epi64(code.as_ptr().add(i).cast::<__m128i>()) };
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c8))
}

#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn sq8_l2_avx2(qs: &[f32], step: &[f32], code: &[u8]) -> f32 {
    let n = qs.len().min(step.len()).min(code.len());
    let (pq, ps) = (qs.as_ptr(), step.as_ptr());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    // SAFETY (all loads below): i + 16 <= n or i + 8 <= n, within all three slices.
    while i + 16 <= n {
        unsafe {
            let d0 = _mm256_fnmadd_ps(
                codes8(code, i),
                _mm256_loadu_ps(ps.add(i)),
                _mm256_loadu_ps(pq.add(i)),
            );
            let d1 = _mm256_fnmadd_ps(
                codes8(code, i + 8),
                _mm256_loadu_ps(ps.add(i + 8)),
                _mm256_loadu_ps(pq.add(i + 8)),
            );
            acc0 = _mm256_fmadd_ps(d0, d0, acc0);
            acc1 = _mm256_fmadd_ps(d1, d1, acc1);
        }
        i += 16;
    }
    if i + 8 <= n {
        unsafe {
            let d0 = _mm256_fnmadd_ps(
                codes8(code, i),
                _mm256_loadu_ps(ps.add(i)),
                _mm256_loadu_ps(pq.add(i)),
            );
            acc0 = _mm256_fmadd_ps(d0, d0, acc0);
        }
        i += 8;
    }
    let mut s = hsum256(_mm256_add_ps(acc0, acc1));
    while i < n {
        let d = qs[i] - f32::from(code[i]) * step[i];
        s += d * d;
        i += 1;
    }
    s
}

#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn sq8_dot_avx2(qs: &[f32], code: &[u8]) -> f32 {
    let n = qs.len().min(code.len());
    let pq = qs.as_ptr();
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    // SAFETY (all loads below): i + 16 <= n or i + 8 <= n, within both slices.
    while i + 16 <= n {
        unsafe {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pq.add(i)), codes8(code, i), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(pq.add(i + 8)), codes8(code, i + 8), acc1);
        }
        i += 16;
    }
    if i + 8 <= n {
        unsafe {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pq.add(i)), codes8(code, i), acc0);
        }
        i += 8;
    }
    let mut s = hsum256(_mm256_add_ps(acc0, acc1));
    while i < n {
        s += qs[i] * f32::from(code[i]);
        i += 1;
    }
    s
}

sq8_batch!(sq8_l2_batch_avx2, "avx2,fma", sq8_l2_avx2, l2);
sq8_batch!(sq8_dot_batch_avx2, "avx2,fma", sq8_dot_avx2, dot);

/// Rows per step of [`dot_rows_avx2`]: eight accumulators hide the multiply-add latency.
const ROWS: usize = 8;

/// Rows of f32 or of IEEE halves, widened to f32 eight at a time.
trait Row8: Copy {
    /// Eight elements from `p` as f32. SAFETY: 8 elements from `p` are readable.
    unsafe fn load8(p: *const Self) -> __m256;
    fn widen(self) -> f32;
}

impl Row8 for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: the caller's contract.
        unsafe { _mm256_loadu_ps(p) }
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Row8 for u16 {
    #[inline(always)]
    unsafe fn load8(p: *const u16) -> __m256 {
        // SAFETY: the caller's contract; the f16c feature is enabled by every caller
        // (`dot8` runs inside `#[target_feature(enable = "avx2,fma,f16c")]` functions).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast::<__m128i>())) }
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        super::f16_to_f32(self)
    }
}

/// Dot products of `q` with eight consecutive rows: each 8-float slice of `q` is loaded once
/// for all eight, and the eight sums are reduced together. SAFETY: the caller keeps
/// `(i + ROWS) * q.len() <= rows.len()`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot8<T: Row8>(q: &[f32], rows: &[T], i: usize, out: &mut [f32; ROWS]) {
    let d = q.len();
    let pq = q.as_ptr();
    // SAFETY: rows i..i + ROWS lie inside `rows` (caller's contract).
    let base = unsafe { rows.as_ptr().add(i * d) };
    let mut acc = [_mm256_setzero_ps(); ROWS];
    let mut j = 0;
    while j + 8 <= d {
        // SAFETY: j + 8 <= d, so q[j..j + 8] and every row's j..j + 8 are in bounds.
        unsafe {
            let qv = _mm256_loadu_ps(pq.add(j));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(qv, T::load8(base.add(r * d + j)), *a);
            }
        }
        j += 8;
    }
    // Eight sums in one register: pairwise horizontal adds, then the two 128-bit halves.
    let t0 = _mm256_hadd_ps(acc[0], acc[1]);
    let t1 = _mm256_hadd_ps(acc[2], acc[3]);
    let t2 = _mm256_hadd_ps(acc[4], acc[5]);
    let t3 = _mm256_hadd_ps(acc[6], acc[7]);
    let u0 = _mm256_hadd_ps(t0, t1);
    let u1 = _mm256_hadd_ps(t2, t3);
    let sum = _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(u0, u1),
        _mm256_permute2f128_ps::<0x31>(u0, u1),
    );
    // SAFETY: `out` holds ROWS floats.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sum) };
    if j < d {
        for (r, o) in out.iter_mut().enumerate() {
            let row = &rows[(i + r) * d + j..(i + r + 1) * d];
            *o += q[j..]
                .iter()
                .zip(row)
                .map(|(a, b)| a * b.widen())
                .sum::<f32>();
        }
    }
}

/// [`dot8`] over every full group of eight rows, then one row at a time.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_rows_256<T: Row8>(q: &[f32], rows: &[T], out: &mut [f32]) {
    let d = q.len();
    let n = out.len().min(rows.len() / d.max(1));
    let mut i = 0;
    let mut buf = [0f32; ROWS];
    while i + ROWS <= n {
        // SAFETY: (i + ROWS) * d <= n * d <= rows.len().
        unsafe { dot8(q, rows, i, &mut buf) };
        out[i..i + ROWS].copy_from_slice(&buf);
        i += ROWS;
    }
    while i < n {
        out[i] = q
            .iter()
            .zip(&rows[i * d..(i + 1) * d])
            .map(|(a, b)| a * b.widen())
            .sum();
        i += 1;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn dot_rows_f16_avx2(q: &[f32], rows: &[u16], out: &mut [f32]) {
    dot_rows_256(q, rows, out);
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn dot_rows_avx2(q: &[f32], rows: &[f32], out: &mut [f32]) {
    dot_rows_256(q, rows, out);
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum256(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps::<1>(v);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn l2_256(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    // SAFETY (all loads below): i + 16 <= n or i + 8 <= n.
    while i + 16 <= n {
        unsafe {
            let d0 = _mm256_sub_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)));
            let d1 = _mm256_sub_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
            );
            acc0 = _mm256_fmadd_ps(d0, d0, acc0);
            acc1 = _mm256_fmadd_ps(d1, d1, acc1);
        }
        i += 16;
    }
    if i + 8 <= n {
        unsafe {
            let d0 = _mm256_sub_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)));
            acc0 = _mm256_fmadd_ps(d0, d0, acc0);
        }
        i += 8;
    }
    let mut s = hsum256(_mm256_add_ps(acc0, acc1));
    while i < n {
        let d = a[i] - b[i];
        s += d * d;
        i += 1;
    }
    s
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn dot_256(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    // SAFETY (all loads below): i + 16 <= n or i + 8 <= n.
    while i + 16 <= n {
        unsafe {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                acc1,
            );
        }
        i += 16;
    }
    if i + 8 <= n {
        unsafe {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
        }
        i += 8;
    }
    let mut s = hsum256(_mm256_add_ps(acc0, acc1));
    while i < n {
        s += a[i] * b[i];
        i += 1;
    }
    s
}

#[target_feature(enable = "avx2,fma")]
pub(super) fn l2_avx2(a: &[f32], b: &[f32]) -> f32 {
    l2_256(a, b)
}

#[target_feature(enable = "avx2,fma")]
pub(super) fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_256(a, b)
}

/// Rows per group of [`batch_256`].
const GROUP: usize = 4;

/// `l2_256` (`L2`) or `dot_256` of `q` with each of `out.len()` consecutive rows, four rows
/// at a time: each slice of `q` is loaded once for the group, and every row is summed in
/// exactly the single kernel's order (two accumulators over 16-float steps, one more
/// 8-float step, the horizontal sum, then the scalar tail), so the values are bit-identical.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn batch_256<const L2: bool>(q: &[f32], rows: &[f32], out: &mut [f32]) {
    let d = q.len();
    let n = out.len().min(rows.len() / d.max(1));
    let pq = q.as_ptr();
    let mut i = 0;
    let ahead = (PREFETCH_BYTES_AHEAD / (d.max(1) * 4)).max(1);
    while i + GROUP <= n {
        let group = &rows[i * d..(i + GROUP) * d];
        let pr = group.as_ptr();
        for r in 0..GROUP {
            prefetch_row(rows, d, i + r, ahead);
        }
        let mut acc0 = [_mm256_setzero_ps(); GROUP];
        let mut acc1 = [_mm256_setzero_ps(); GROUP];
        let mut j = 0;
        // SAFETY (all loads below): j + 16 <= d or j + 8 <= d, and r < GROUP, so every
        // load reads inside `q` or inside row r of `group`.
        while j + 16 <= d {
            unsafe {
                let q0 = _mm256_loadu_ps(pq.add(j));
                let q1 = _mm256_loadu_ps(pq.add(j + 8));
                for r in 0..GROUP {
                    let b0 = _mm256_loadu_ps(pr.add(r * d + j));
                    let b1 = _mm256_loadu_ps(pr.add(r * d + j + 8));
                    if L2 {
                        let d0 = _mm256_sub_ps(q0, b0);
                        let d1 = _mm256_sub_ps(q1, b1);
                        acc0[r] = _mm256_fmadd_ps(d0, d0, acc0[r]);
                        acc1[r] = _mm256_fmadd_ps(d1, d1, acc1[r]);
                    } else {
                        acc0[r] = _mm256_fmadd_ps(q0, b0, acc0[r]);
                        acc1[r] = _mm256_fmadd_ps(q1, b1, acc1[r]);
                    }
                }
            }
            j += 16;
        }
        if j + 8 <= d {
            unsafe {
                let q0 = _mm256_loadu_ps(pq.add(j));
                for (r, a) in acc0.iter_mut().enumerate() {
                    let b0 = _mm256_loadu_ps(pr.add(r * d + j));
                    if L2 {
                        let d0 = _mm256_sub_ps(q0, b0);
                        *a = _mm256_fmadd_ps(d0, d0, *a);
                    } else {
                        *a = _mm256_fmadd_ps(q0, b0, *a);
                    }
                }
            }
            j += 8;
        }
        for r in 0..GROUP {
            let mut s = hsum256(_mm256_add_ps(acc0[r], acc1[r]));
            for (&a, &b) in q[j..].iter().zip(&group[r * d + j..(r + 1) * d]) {
                if L2 {
                    let t = a - b;
                    s += t * t;
                } else {
                    s += a * b;
                }
            }
            out[i + r] = s;
        }
        i += GROUP;
    }
    for (o, r) in out[i..n]
        .iter_mut()
        .zip(rows[i * d..].chunks_exact(d.max(1)))
    {
        *o = if L2 { l2_256(q, r) } else { dot_256(q, r) };
    }
}

#[target_feature(enable = "avx2,fma")]
pub(super) fn l2_batch_avx2(q: &[f32], rows: &[f32], out: &mut [f32]) {
    batch_256::<true>(q, rows, out);
}

#[target_feature(enable = "avx2,fma")]
pub(super) fn dot_batch_avx2(q: &[f32], rows: &[f32], out: &mut [f32]) {
    batch_256::<false>(q, rows, out);
}

/// [`super::next_below`] (`from <= xs.len()`, checked by the caller).
#[target_feature(enable = "avx2")]
pub(super) fn next_below_avx2(xs: &[f32], from: usize, bound: f32, or_equal: bool) -> usize {
    let b = _mm256_set1_ps(bound);
    let mut i = from;
    while i + 8 <= xs.len() {
        // SAFETY: i + 8 <= xs.len(), so the eight floats at i are inside `xs`.
        let v = unsafe { _mm256_loadu_ps(xs.as_ptr().add(i)) };
        // Ordered, quiet compares: NaN lanes are false.
        let m = if or_equal {
            _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LE_OQ>(v, b))
        } else {
            _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(v, b))
        };
        if m != 0 {
            return i + m.trailing_zeros() as usize;
        }
        i += 8;
    }
    super::next_below_portable(xs, i, bound, or_equal)
}
