//! Kernels over quantised vectors: SQ8 codes (per-dimension 8-bit steps), IEEE half-precision
//! rows, and product-quantisation tables and lookups (PQ ADC). Dispatched on [`isa`] like the
//! f32 kernels.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
use super::{Isa, avx2, avx512};
use super::{isa, rows_fit};

/// SQ8 code distance: `Σ (qs_j − code_j · step_j)²` (with `qs = q − min` per dimension), over
/// `qs.len()` dimensions; `step` and `code` hold at least as many.
pub fn sq8_l2(qs: &[f32], step: &[f32], code: &[u8]) -> f32 {
    let n = qs.len();
    assert!(
        step.len() >= n && code.len() >= n,
        "sq8_l2: step and code must cover every dimension"
    );
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx512 only when the CPU reports avx512f.
        Isa::Avx512 => unsafe { avx512::sq8_l2_avx512(qs, &step[..n], &code[..n]) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx2 only when the CPU reports avx2 and fma.
        Isa::Avx2 => unsafe { avx2::sq8_l2_avx2(qs, &step[..n], &code[..n]) },
        _ => {
            let mut s = 0f32;
            for j in 0..n {
                let d = qs[j] - f32::from(code[j]) * step[j];
                s += d * d;
            }
            s
        }
    }
}

/// SQ8 code inner product: `Σ qs_j · code_j` (with `qs = q · step`), like [`sq8_l2`].
pub fn sq8_dot(qs: &[f32], code: &[u8]) -> f32 {
    let n = qs.len();
    assert!(code.len() >= n, "sq8_dot: code must cover every dimension");
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx512 only when the CPU reports avx512f.
        Isa::Avx512 => unsafe { avx512::sq8_dot_avx512(qs, &code[..n]) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx2 only when the CPU reports avx2 and fma.
        Isa::Avx2 => unsafe { avx2::sq8_dot_avx2(qs, &code[..n]) },
        _ => qs.iter().zip(code).map(|(a, &c)| a * f32::from(c)).sum(),
    }
}

/// [`sq8_l2`] of `out.len()` consecutive codes of `qs.len()` bytes each, dispatched once for
/// the run; the same values as one call per code.
pub fn sq8_l2_batch(qs: &[f32], step: &[f32], codes: &[u8], out: &mut [f32]) {
    let n = qs.len();
    assert!(
        step.len() >= n && codes.len() == n * out.len(),
        "sq8_l2_batch: {} codes of {n} bytes and a step per dimension",
        out.len()
    );
    let step = &step[..n];
    let rows = codes.chunks_exact(n.max(1));
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx512 only when the CPU reports avx512f.
        Isa::Avx512 => unsafe { avx512::sq8_l2_batch_avx512(qs, step, codes, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx2 only when the CPU reports avx2 and fma.
        Isa::Avx2 => unsafe { avx2::sq8_l2_batch_avx2(qs, step, codes, out) },
        _ => {
            for (o, c) in out.iter_mut().zip(rows) {
                *o = sq8_l2(qs, step, c);
            }
        }
    }
}

/// [`sq8_dot`] of `out.len()` consecutive codes of `qs.len()` bytes each, like
/// [`sq8_l2_batch`].
pub fn sq8_dot_batch(qs: &[f32], codes: &[u8], out: &mut [f32]) {
    let n = qs.len();
    assert!(
        codes.len() == n * out.len(),
        "sq8_dot_batch: {} codes of {n} bytes",
        out.len()
    );
    let rows = codes.chunks_exact(n.max(1));
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx512 only when the CPU reports avx512f.
        Isa::Avx512 => unsafe { avx512::sq8_dot_batch_avx512(qs, codes, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx2 only when the CPU reports avx2 and fma.
        Isa::Avx2 => unsafe { avx2::sq8_dot_batch_avx2(qs, codes, out) },
        _ => {
            for (o, c) in out.iter_mut().zip(rows) {
                *o = sq8_dot(qs, c);
            }
        }
    }
}

/// IEEE half precision of `x`, rounded to nearest even; beyond the half range (|x| > 65504)
/// it saturates to infinity, NaN stays NaN.
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        // Subnormal half (or zero): shift the full significand into place, rounding to even.
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = m >> shift;
        let rem = m & ((1 << shift) - 1);
        let mid = 1 << (shift - 1);
        let up = rem > mid || (rem == mid && half & 1 == 1);
        return sign | (half + u32::from(up)) as u16;
    }
    let half = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    let up = rem > 0x1000 || (rem == 0x1000 && half & 1 == 1);
    // A carry out of the significand moves to the next exponent, up to infinity: still right.
    sign | (half + u32::from(up)) as u16
}

/// The f32 value of an IEEE half (exact: every half is an f32).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let man = u32::from(h & 0x3ff);
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: normalise the significand.
            let lead = man.leading_zeros() - 21;
            let m = (man << lead) & 0x3ff;
            sign | ((127 - 15 + 1 - lead) << 23) | (m << 13)
        }
        (0x1f, _) => sign | 0x7f80_0000 | (man << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// [`dot_rows`] over rows stored in half precision (`rows` holds `out.len()` rows of `q.len()`
/// halves): each half is widened exactly, then summed like [`dot_rows`]. Half the bytes of an
/// f32 copy, for ranking a set too large for the cache.
pub fn dot_rows_f16(q: &[f32], rows: &[u16], out: &mut [f32]) {
    if !rows_fit(q, rows, out) {
        return;
    }
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx512 or Avx2 only when the CPU reports avx2, fma and f16c.
        Isa::Avx512 | Isa::Avx2 => unsafe { avx2::dot_rows_f16_avx2(q, rows, out) },
        _ => {
            for (o, r) in out.iter_mut().zip(rows.chunks_exact(q.len())) {
                *o = q.iter().zip(r).map(|(&a, &h)| a * f16_to_f32(h)).sum();
            }
        }
    }
}

/// Product-quantizer lookup tables from a vector `x` (`m` sub-vectors of `dsub` floats):
/// `out[s * stride + j] = init[s * ksub + j] + scale · Σ_t x[s·dsub + t] · books_t[(s·dsub + t) · ksub + j]`
/// for every sub-quantizer `s` and code `j < ksub`, `init` reading as zeros when empty.
/// `books_t` holds the codebooks transposed (dimension-major: row `i` = coordinate `i` of every
/// code of sub-quantizer `i / dsub`), so each step is one contiguous multiply-add over `ksub`
/// floats, which vectorises. Entries of `out` from `ksub` to `stride` are left as they are.
#[allow(clippy::too_many_arguments)]
pub fn pq_tables(
    x: &[f32],
    books_t: &[f32],
    init: &[f32],
    scale: f32,
    dsub: usize,
    ksub: usize,
    stride: usize,
    out: &mut [f32],
) {
    let m = x.len().checked_div(dsub).unwrap_or(0);
    assert!(
        dsub > 0
            && stride >= ksub
            && books_t.len() >= m * dsub * ksub
            && out.len() >= m * stride
            && (init.is_empty() || init.len() >= m * ksub),
        "pq_tables: shapes do not cover m = {m} sub-quantizers of {ksub} codes"
    );
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx512 only when the CPU reports avx512f.
        Isa::Avx512 => unsafe {
            avx512::pq_tables_avx512(x, books_t, init, scale, dsub, ksub, stride, out)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx2 only when the CPU reports avx2 and fma.
        Isa::Avx2 => unsafe {
            avx2::pq_tables_avx2(x, books_t, init, scale, dsub, ksub, stride, out)
        },
        _ => pq_tables_body(x, books_t, init, scale, dsub, ksub, stride, out),
    }
}

/// Asymmetric distances of 8-bit product-quantizer codes: `out[i] = Σ_s lut[s · 256 + c_s]`
/// for the `out.len()` consecutive codes of `m` bytes in `codes` (`lut` holds `m` tables of 256
/// entries). With AVX-512 and `m` a multiple of 16, 16 table entries are gathered per step.
pub fn pq_adc8_batch(lut: &[f32], codes: &[u8], m: usize, out: &mut [f32]) {
    assert!(
        lut.len() >= m * 256 && codes.len() == m * out.len(),
        "pq_adc8_batch: {} codes of {m} bytes need m x 256 table entries",
        out.len()
    );
    if m == 0 {
        out.fill(0.0);
        return;
    }
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx512 only when the CPU reports avx512f; the shapes were
        // checked above (every gathered index is below m x 256).
        Isa::Avx512 if m.is_multiple_of(16) => unsafe { avx512::adc8_avx512(lut, codes, m, out) },
        _ => {
            for (o, c) in out.iter_mut().zip(codes.chunks_exact(m)) {
                *o = pq_adc8(lut, c);
            }
        }
    }
}

/// One code of [`pq_adc8_batch`] (`lut.len() >= 256 · code.len()`), in four independent sums so
/// the table loads overlap.
#[inline]
pub fn pq_adc8(lut: &[f32], code: &[u8]) -> f32 {
    let (tabs, _) = lut.as_chunks::<256>();
    let (t4, tt) = tabs.as_chunks::<4>();
    let (c4, ct) = code.as_chunks::<4>();
    let mut a = [0f32; 4];
    for (c, t) in c4.iter().zip(t4) {
        a[0] += t[0][usize::from(c[0])];
        a[1] += t[1][usize::from(c[1])];
        a[2] += t[2][usize::from(c[2])];
        a[3] += t[3][usize::from(c[3])];
    }
    let mut s = (a[0] + a[1]) + (a[2] + a[3]);
    for (&c, t) in ct.iter().zip(tt) {
        s += t[usize::from(c)];
    }
    s
}

/// The loop of [`pq_tables`], compiled once per instruction set by its callers.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn pq_tables_body(
    x: &[f32],
    books_t: &[f32],
    init: &[f32],
    scale: f32,
    dsub: usize,
    ksub: usize,
    stride: usize,
    out: &mut [f32],
) {
    for (s, (xs, o)) in x
        .chunks_exact(dsub)
        .zip(out.chunks_exact_mut(stride))
        .enumerate()
    {
        let o = &mut o[..ksub];
        if init.is_empty() {
            o.fill(0.0);
        } else {
            o.copy_from_slice(&init[s * ksub..(s + 1) * ksub]);
        }
        for (t, &xv) in xs.iter().enumerate() {
            let a = scale * xv;
            let row = &books_t[(s * dsub + t) * ksub..(s * dsub + t + 1) * ksub];
            for (ov, &r) in o.iter_mut().zip(row) {
                *ov += a * r;
            }
        }
    }
}
