//! x86-64 kernels for AVX-512F: 16 lanes, masked tails. Each is `unsafe` only because it must
//! run on a CPU with the named features (see [`super::detect`]); memory is touched through
//! slices' in-bounds pointers (tails through masked or bounds-checked loads).
#![allow(unsafe_code)]

use super::avx2::{PREFETCH_BYTES_AHEAD, prefetch_row};
use std::arch::x86_64::*;

#[inline]
#[target_feature(enable = "avx512f")]
fn l2_512(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc0 = _mm512_setzero_ps();
    let mut acc1 = _mm512_setzero_ps();
    let mut i = 0;
    // SAFETY (all loads below): i + 32 <= n, i + 16 <= n, or a mask covering only i..n.
    while i + 32 <= n {
        unsafe {
            let d0 = _mm512_sub_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)));
            let d1 = _mm512_sub_ps(
                _mm512_loadu_ps(pa.add(i + 16)),
                _mm512_loadu_ps(pb.add(i + 16)),
            );
            acc0 = _mm512_fmadd_ps(d0, d0, acc0);
            acc1 = _mm512_fmadd_ps(d1, d1, acc1);
        }
        i += 32;
    }
    if i + 16 <= n {
        unsafe {
            let d0 = _mm512_sub_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)));
            acc0 = _mm512_fmadd_ps(d0, d0, acc0);
        }
        i += 16;
    }
    if i < n {
        let m: __mmask16 = ((1u32 << (n - i)) - 1) as __mmask16;
        unsafe {
            let d0 = _mm512_sub_ps(
                _mm512_maskz_loadu_ps(m, pa.add(i)),
                _mm512_maskz_loadu_ps(m, pb.add(i)),
            );
            acc1 = _mm512_fmadd_ps(d0, d0, acc1);
        }
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
}

#[inline]
#[target_feature(enable = "avx512f")]
fn dot_512(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc0 = _mm512_setzero_ps();
    let mut acc1 = _mm512_setzero_ps();
    let mut i = 0;
    // SAFETY (all loads below): i + 32 <= n, i + 16 <= n, or a mask covering only i..n.
    while i + 32 <= n {
        unsafe {
            acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm512_fmadd_ps(
                _mm512_loadu_ps(pa.add(i + 16)),
                _mm512_loadu_ps(pb.add(i + 16)),
                acc1,
            );
        }
        i += 32;
    }
    if i + 16 <= n {
        unsafe {
            acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), acc0);
        }
        i += 16;
    }
    if i < n {
        let m: __mmask16 = ((1u32 << (n - i)) - 1) as __mmask16;
        unsafe {
            acc1 = _mm512_fmadd_ps(
                _mm512_maskz_loadu_ps(m, pa.add(i)),
                _mm512_maskz_loadu_ps(m, pb.add(i)),
                acc1,
            );
        }
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
}

#[target_feature(enable = "avx512f")]
pub(super) fn l2_avx512(a: &[f32], b: &[f32]) -> f32 {
    l2_512(a, b)
}

#[target_feature(enable = "avx512f")]
pub(super) fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    dot_512(a, b)
}

/// 16 u8 codes widened to f32 lanes. SAFETY: the caller keeps `i + 16 <= code.len()`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn codes16(code: &[u8], i: usize) -> __m512 {
    // SAFETY: 16 bytes from `i` are inside `code` (caller's contract).
    let c8 = unsafe { _mm_loadu_si128(code.as_ptr().add(i).cast::<__m128i>()) };
    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c8))
}

#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn sq8_l2_avx512(qs: &[f32], step: &[f32], code: &[u8]) -> f32 {
    let n = qs.len().min(step.len()).min(code.len());
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n, within all three slices.
        unsafe {
            let c = codes16(code, i);
            let d = _mm512_fnmadd_ps(
                c,
                _mm512_loadu_ps(step.as_ptr().add(i)),
                _mm512_loadu_ps(qs.as_ptr().add(i)),
            );
            acc = _mm512_fmadd_ps(d, d, acc);
        }
        i += 16;
    }
    let mut s = _mm512_reduce_add_ps(acc);
    while i < n {
        let d = qs[i] - f32::from(code[i]) * step[i];
        s += d * d;
        i += 1;
    }
    s
}

#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn sq8_dot_avx512(qs: &[f32], code: &[u8]) -> f32 {
    let n = qs.len().min(code.len());
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n, within both slices.
        unsafe {
            let c = codes16(code, i);
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(qs.as_ptr().add(i)), c, acc);
        }
        i += 16;
    }
    let mut s = _mm512_reduce_add_ps(acc);
    while i < n {
        s += qs[i] * f32::from(code[i]);
        i += 1;
    }
    s
}

#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(super) fn pq_tables_avx512(
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

/// [`super::pq_adc8_batch`] for `m` a multiple of 16: per code, `m / 16` gathers of 16
/// table entries (lane `l` of group `g` reads table `16g + l` at the code byte).
/// SAFETY (caller): `lut.len() >= m * 256`, `codes.len() == m * out.len()`, `m % 16 == 0`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn adc8_avx512(lut: &[f32], codes: &[u8], m: usize, out: &mut [f32]) {
    let lanes = _mm512_setr_epi32(
        0,
        256,
        2 * 256,
        3 * 256,
        4 * 256,
        5 * 256,
        6 * 256,
        7 * 256,
        8 * 256,
        9 * 256,
        10 * 256,
        11 * 256,
        12 * 256,
        13 * 256,
        14 * 256,
        15 * 256,
    );
    for (o, code) in out.iter_mut().zip(codes.chunks_exact(m)) {
        let mut acc = _mm512_setzero_ps();
        let mut g = 0;
        while g + 16 <= m {
            // SAFETY: bytes g..g + 16 lie inside `code` (m bytes); each index is
            // (g + l) * 256 + byte < m * 256 <= lut.len(), so every gathered f32 is in `lut`.
            unsafe {
                let c8 = _mm_loadu_si128(code.as_ptr().add(g).cast::<__m128i>());
                let base = _mm512_add_epi32(lanes, _mm512_set1_epi32((g * 256) as i32));
                let idx = _mm512_add_epi32(base, _mm512_cvtepu8_epi32(c8));
                acc = _mm512_add_ps(acc, _mm512_i32gather_ps::<4>(idx, lut.as_ptr().cast()));
            }
            g += 16;
        }
        *o = _mm512_reduce_add_ps(acc);
    }
}

#[target_feature(enable = "avx512f")]
pub(super) fn l2_batch_avx512(q: &[f32], rows: &[f32], out: &mut [f32]) {
    let d = q.len();
    let ahead = (PREFETCH_BYTES_AHEAD / (d * 4)).max(1);
    for (i, (o, r)) in out.iter_mut().zip(rows.chunks_exact(d)).enumerate() {
        prefetch_row(rows, d, i, ahead);
        *o = l2_512(q, r);
    }
}

#[target_feature(enable = "avx512f")]
pub(super) fn dot_batch_avx512(q: &[f32], rows: &[f32], out: &mut [f32]) {
    let d = q.len();
    let ahead = (PREFETCH_BYTES_AHEAD / (d * 4)).max(1);
    for (i, (o, r)) in out.iter_mut().zip(rows.chunks_exact(d)).enumerate() {
        prefetch_row(rows, d, i, ahead);
        *o = dot_512(q, r);
    }
}

sq8_batch!(sq8_l2_batch_avx512, "avx512f", sq8_l2_avx512, l2);
sq8_batch!(sq8_dot_batch_avx512, "avx512f", sq8_dot_avx512, dot);
