//! Distance kernels between f32 vectors. Every index and the FLAT path call these, so they are
//! the one place to optimise: the instruction set is chosen once at run time (AVX-512F, then
//! AVX2+FMA on x86-64; NEON on aarch64, where it is always present) with a portable fallback
//! that compiles everywhere.
//!
//! Guarantees: `a.len() == b.len()` is the caller's invariant (debug-asserted); results are the
//! plain mathematical values (squared L2, dot product) up to f32 rounding, summed in a fixed order
//! per instruction set, so repeated calls on one machine are bit-identical. The batched forms
//! (`*_batch`, one query against consecutive rows) give exactly the values of the single forms.
//! [`dot_rows`] is the exception: several rows share one reduction, so its sums may differ in
//! the last bits; it ranks candidates that are then scored exactly.

#![allow(unsafe_code)]

use std::sync::atomic::{AtomicU8, Ordering};

const LANES: usize = 16;

/// The instruction set the kernels run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// 16 lanes, masked tails (x86-64 with AVX-512F).
    Avx512,
    /// 8 lanes with fused multiply-add (x86-64 with AVX2 and FMA).
    Avx2,
    /// 4 lanes (aarch64).
    Neon,
    /// Plain Rust the compiler vectorises for the build's baseline.
    Portable,
}

static ISA: AtomicU8 = AtomicU8::new(0);

/// The instruction set chosen for this process (detected once, then cached).
#[inline]
pub fn isa() -> Isa {
    match ISA.load(Ordering::Relaxed) {
        1 => Isa::Avx512,
        2 => Isa::Avx2,
        3 => Isa::Neon,
        4 => Isa::Portable,
        _ => detect(),
    }
}

#[cold]
fn detect() -> Isa {
    let found = detect_isa();
    let code = match found {
        Isa::Avx512 => 1,
        Isa::Avx2 => 2,
        Isa::Neon => 3,
        Isa::Portable => 4,
    };
    ISA.store(code, Ordering::Relaxed);
    found
}

fn detect_isa() -> Isa {
    if std::env::var_os("SHOAL_PORTABLE_KERNELS").is_some() {
        return Isa::Portable;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // Every AVX-512 CPU also has AVX2 and FMA; requiring them lets the AVX2-only kernels
        // (`dot_rows`, the SQ8 ones) run under `Isa::Avx512` as well.
        // Every AVX2 CPU also converts half precision (F16C); requiring it lets
        // `dot_rows_f16` run under both instruction sets.
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c");
        if std::arch::is_x86_feature_detected!("avx512f") && avx2 {
            return Isa::Avx512;
        }
        if avx2 {
            return Isa::Avx2;
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        return Isa::Neon;
    }
    #[allow(unreachable_code)]
    Isa::Portable
}

/// Squared Euclidean distance.
#[inline]
pub fn l2_sq(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx512 only when the CPU reports avx512f.
        Isa::Avx512 => unsafe { x86::l2_avx512(a, b) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx2 only when the CPU reports avx2 and fma.
        Isa::Avx2 => unsafe { x86::l2_avx2(a, b) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => arm::l2_neon(a, b),
        _ => l2_sq_portable(a, b),
    }
}

/// Inner product.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx512 only when the CPU reports avx512f.
        Isa::Avx512 => unsafe { x86::dot_avx512(a, b) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx2 only when the CPU reports avx2 and fma.
        Isa::Avx2 => unsafe { x86::dot_avx2(a, b) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => arm::dot_neon(a, b),
        _ => dot_portable(a, b),
    }
}

/// Squared norm.
#[inline]
pub fn norm_sq(a: &[f32]) -> f32 {
    dot(a, a)
}

/// Ask the CPU to start loading the cache lines of `v` (a graph search calls this for the
/// vectors it will score next, so their loads overlap the current distance work). A hint only:
/// it never faults and does nothing on targets without a prefetch instruction.
#[inline]
pub fn prefetch<T>(v: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let bytes = std::mem::size_of_val(v);
        let base = v.as_ptr().cast::<i8>();
        let mut off = 0;
        while off < bytes {
            // SAFETY: `off < bytes`, so the address is inside `v`; a prefetch never faults
            // and SSE is part of the x86-64 baseline.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(base.add(off)) };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = v;
}

/// Normalise `v` in place to unit length; a zero vector is left as is.
pub fn normalize(v: &mut [f32]) {
    let n = norm_sq(v).sqrt();
    if n > 0.0 {
        for x in v.iter_mut() {
            *x /= n;
        }
    }
}

/// The shape check of the one-query, many-rows kernels: `rows` must hold `out.len()` rows of
/// `q.len()` values (f32, or halves for [`dot_rows_f16`]; panics otherwise). `false`, with
/// `out` zeroed, for empty vectors.
fn rows_fit<T>(q: &[f32], rows: &[T], out: &mut [f32]) -> bool {
    assert_eq!(
        rows.len(),
        q.len() * out.len(),
        "rows must hold out.len() rows of q.len() values"
    );
    if q.is_empty() {
        out.fill(0.0);
        return false;
    }
    true
}

/// `out[i] = l2_sq(q, row i of rows)` for the `out.len()` consecutive rows of `q.len()` floats.
/// Dispatches once for the whole run of rows.
pub fn l2_sq_batch(q: &[f32], rows: &[f32], out: &mut [f32]) {
    if !rows_fit(q, rows, out) {
        return;
    }
    let d = q.len();
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx512 only when the CPU reports avx512f.
        Isa::Avx512 => unsafe { x86::l2_batch_avx512(q, rows, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx2 only when the CPU reports avx2 and fma.
        Isa::Avx2 => unsafe { x86::l2_batch_avx2(q, rows, out) },
        _ => {
            for (o, r) in out.iter_mut().zip(rows.chunks_exact(d)) {
                *o = l2_sq(q, r);
            }
        }
    }
}

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
        Isa::Avx512 => unsafe { x86::sq8_l2_avx512(qs, &step[..n], &code[..n]) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx2 only when the CPU reports avx2 and fma.
        Isa::Avx2 => unsafe { x86::sq8_l2_avx2(qs, &step[..n], &code[..n]) },
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
        Isa::Avx512 => unsafe { x86::sq8_dot_avx512(qs, &code[..n]) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx2 only when the CPU reports avx2 and fma.
        Isa::Avx2 => unsafe { x86::sq8_dot_avx2(qs, &code[..n]) },
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
        Isa::Avx512 => unsafe { x86::sq8_l2_batch_avx512(qs, step, codes, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx2 only when the CPU reports avx2 and fma.
        Isa::Avx2 => unsafe { x86::sq8_l2_batch_avx2(qs, step, codes, out) },
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
        Isa::Avx512 => unsafe { x86::sq8_dot_batch_avx512(qs, codes, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx2 only when the CPU reports avx2 and fma.
        Isa::Avx2 => unsafe { x86::sq8_dot_batch_avx2(qs, codes, out) },
        _ => {
            for (o, c) in out.iter_mut().zip(rows) {
                *o = sq8_dot(qs, c);
            }
        }
    }
}

/// `out[i] = dot(q, row i of rows)`, like [`l2_sq_batch`].
pub fn dot_batch(q: &[f32], rows: &[f32], out: &mut [f32]) {
    if !rows_fit(q, rows, out) {
        return;
    }
    let d = q.len();
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx512 only when the CPU reports avx512f.
        Isa::Avx512 => unsafe { x86::dot_batch_avx512(q, rows, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx2 only when the CPU reports avx2 and fma.
        Isa::Avx2 => unsafe { x86::dot_batch_avx2(q, rows, out) },
        _ => {
            for (o, r) in out.iter_mut().zip(rows.chunks_exact(d)) {
                *o = dot(q, r);
            }
        }
    }
}

/// The first index `i >= from` with `xs[i] < bound` (`<=` with `or_equal`), or `xs.len()` when
/// there is none; NaN never qualifies. What a top-k scan uses to skip, eight values per compare,
/// the long runs of rows that cannot enter (once the bound has settled, almost all of them).
#[inline]
pub fn next_below(xs: &[f32], from: usize, bound: f32, or_equal: bool) -> usize {
    let from = from.min(xs.len());
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx2 or Avx512 only when the CPU reports avx2.
        Isa::Avx2 | Isa::Avx512 => unsafe { x86::next_below_avx2(xs, from, bound, or_equal) },
        _ => next_below_portable(xs, from, bound, or_equal),
    }
}

fn next_below_portable(xs: &[f32], from: usize, bound: f32, or_equal: bool) -> usize {
    xs[from..]
        .iter()
        .position(|&x| x < bound || (or_equal && x == bound))
        .map_or(xs.len(), |i| from + i)
}

/// `out[i] = dot(q, row i of rows)` up to f32 rounding, computed several rows at a time (the
/// query is loaded once per step for eight rows, and eight sums share one horizontal
/// reduction). Faster than [`dot_batch`] but summed in another order, so the values may differ
/// from [`dot`]'s in the last bits: for ranking candidates that are then re-scored with
/// [`dot`] / [`l2_sq`] (the IVF coarse step), not for reported distances.
pub fn dot_rows(q: &[f32], rows: &[f32], out: &mut [f32]) {
    if !rows_fit(q, rows, out) {
        return;
    }
    let d = q.len();
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx512 or Avx2 only when the CPU reports avx2, fma and f16c.
        Isa::Avx512 | Isa::Avx2 => unsafe { x86::dot_rows_avx2(q, rows, out) },
        _ => {
            for (o, r) in out.iter_mut().zip(rows.chunks_exact(d)) {
                *o = dot(q, r);
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
        Isa::Avx512 | Isa::Avx2 => unsafe { x86::dot_rows_f16_avx2(q, rows, out) },
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
            x86::pq_tables_avx512(x, books_t, init, scale, dsub, ksub, stride, out)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx2 only when the CPU reports avx2 and fma.
        Isa::Avx2 => unsafe {
            x86::pq_tables_avx2(x, books_t, init, scale, dsub, ksub, stride, out)
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
        Isa::Avx512 if m.is_multiple_of(16) => unsafe { x86::adc8_avx512(lut, codes, m, out) },
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
fn pq_tables_body(
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

/// Portable squared L2 (16 independent partial sums, which compilers turn into SIMD).
pub fn l2_sq_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, ta) = a.as_chunks::<LANES>();
    let (cb, tb) = b.as_chunks::<LANES>();
    for (x, y) in ca.iter().zip(cb) {
        for l in 0..LANES {
            let d = x[l] - y[l];
            acc[l] += d * d;
        }
    }
    let mut tail = 0f32;
    for (x, y) in ta.iter().zip(tb) {
        let d = x - y;
        tail += d * d;
    }
    acc.iter().sum::<f32>() + tail
}

/// Portable inner product.
pub fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, ta) = a.as_chunks::<LANES>();
    let (cb, tb) = b.as_chunks::<LANES>();
    for (x, y) in ca.iter().zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ta.iter().zip(tb) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! x86-64 kernels. Each is `unsafe` only because it must run on a CPU with the named
    //! features; memory is touched through slices' in-bounds pointers (tails through masked or
    //! bounds-checked loads).
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
                acc0 =
                    _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), acc0);
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
                acc0 =
                    _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), acc0);
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
        super::pq_tables_body(x, books_t, init, scale, dsub, ksub, stride, out)
    }

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
        super::pq_tables_body(x, books_t, init, scale, dsub, ksub, stride, out)
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

    /// Rows ahead of the one being scored whose cache lines a batch scan prefetches: a 4 KiB
    /// page ahead at 128-d, so the loads never wait at a page boundary, where the hardware
    /// prefetcher stops (a single-query scan is bound by memory, not arithmetic).
    const PREFETCH_BYTES_AHEAD: usize = 4096;

    /// Prefetch row `i + ahead` of `rows` (`d` floats per row) when it exists. SSE only (the
    /// x86-64 baseline), so it inlines into the AVX2 and the AVX-512 kernels.
    #[inline(always)]
    fn prefetch_row(rows: &[f32], d: usize, i: usize, ahead: usize) {
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

    /// One SQ8 kernel over consecutive codes of `qs.len()` bytes: the per-code kernel inlined
    /// into a loop compiled for its instruction set, so the run pays one dispatch.
    macro_rules! sq8_batch {
        ($name:ident, $feat:literal, $one:ident, l2) => {
            #[target_feature(enable = $feat)]
            pub(super) fn $name(qs: &[f32], step: &[f32], codes: &[u8], out: &mut [f32]) {
                for (o, c) in out.iter_mut().zip(codes.chunks_exact(qs.len().max(1))) {
                    *o = $one(qs, step, c);
                }
            }
        };
        ($name:ident, $feat:literal, $one:ident, dot) => {
            #[target_feature(enable = $feat)]
            pub(super) fn $name(qs: &[f32], codes: &[u8], out: &mut [f32]) {
                for (o, c) in out.iter_mut().zip(codes.chunks_exact(qs.len().max(1))) {
                    *o = $one(qs, c);
                }
            }
        };
    }
    sq8_batch!(sq8_l2_batch_avx512, "avx512f", sq8_l2_avx512, l2);
    sq8_batch!(sq8_dot_batch_avx512, "avx512f", sq8_dot_avx512, dot);
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
                acc0 =
                    _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
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
                acc0 =
                    _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
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
}

#[cfg(target_arch = "aarch64")]
mod arm {
    //! aarch64 kernels: NEON is part of the baseline, so no detection is needed.
    use std::arch::aarch64::*;

    pub(super) fn l2_neon(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut i = 0;
        // SAFETY: every load reads 4 floats at i with i + 8 <= n or i + 4 <= n.
        unsafe {
            let mut acc0 = vdupq_n_f32(0.0);
            let mut acc1 = vdupq_n_f32(0.0);
            while i + 8 <= n {
                let d0 = vsubq_f32(vld1q_f32(pa.add(i)), vld1q_f32(pb.add(i)));
                let d1 = vsubq_f32(vld1q_f32(pa.add(i + 4)), vld1q_f32(pb.add(i + 4)));
                acc0 = vfmaq_f32(acc0, d0, d0);
                acc1 = vfmaq_f32(acc1, d1, d1);
                i += 8;
            }
            if i + 4 <= n {
                let d0 = vsubq_f32(vld1q_f32(pa.add(i)), vld1q_f32(pb.add(i)));
                acc0 = vfmaq_f32(acc0, d0, d0);
                i += 4;
            }
            let mut s = vaddvq_f32(vaddq_f32(acc0, acc1));
            while i < n {
                let d = a[i] - b[i];
                s += d * d;
                i += 1;
            }
            s
        }
    }

    pub(super) fn dot_neon(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut i = 0;
        // SAFETY: every load reads 4 floats at i with i + 8 <= n or i + 4 <= n.
        unsafe {
            let mut acc0 = vdupq_n_f32(0.0);
            let mut acc1 = vdupq_n_f32(0.0);
            while i + 8 <= n {
                acc0 = vfmaq_f32(acc0, vld1q_f32(pa.add(i)), vld1q_f32(pb.add(i)));
                acc1 = vfmaq_f32(acc1, vld1q_f32(pa.add(i + 4)), vld1q_f32(pb.add(i + 4)));
                i += 8;
            }
            if i + 4 <= n {
                acc0 = vfmaq_f32(acc0, vld1q_f32(pa.add(i)), vld1q_f32(pb.add(i)));
                i += 4;
            }
            let mut s = vaddvq_f32(vaddq_f32(acc0, acc1));
            while i < n {
                s += a[i] * b[i];
                i += 1;
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_below_finds_the_first_value_under_the_bound() {
        let mut rng = 0x9e37_79b9_u32;
        let mut xs: Vec<f32> = (0..203)
            .map(|_| {
                rng = rng.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (rng >> 20) as f32 / 64.0
            })
            .collect();
        xs[17] = f32::NAN;
        xs[90] = f32::NAN;
        for bound in [-1.0, 0.0, 3.0, 20.0, 40.0, f32::INFINITY, f32::NAN] {
            for or_equal in [false, true] {
                for from in [0, 1, 7, 8, 9, 17, 100, 196, 202, 203, 500] {
                    let want = (from.min(xs.len())..xs.len())
                        .find(|&i| xs[i] < bound || (or_equal && xs[i] == bound))
                        .unwrap_or(xs.len());
                    assert_eq!(
                        next_below(&xs, from, bound, or_equal),
                        want,
                        "{bound} {or_equal} {from}"
                    );
                    assert_eq!(
                        next_below_portable(&xs, from.min(xs.len()), bound, or_equal),
                        want
                    );
                }
            }
        }
        // An exact tie is found only with `or_equal`.
        let ties = [5.0f32; 11];
        assert_eq!(next_below(&ties, 0, 5.0, false), 11);
        assert_eq!(next_below(&ties, 3, 5.0, true), 3);
    }

    #[test]
    fn sq8_kernels_equal_the_plain_sums_for_every_length() {
        for d in [1usize, 7, 15, 16, 17, 31, 32, 96, 128, 130] {
            let qs: Vec<f32> = (0..d).map(|j| (j as f32 * 0.37).sin() * 3.0).collect();
            let step: Vec<f32> = (0..d).map(|j| 0.01 + (j % 5) as f32 * 0.003).collect();
            let code: Vec<u8> = (0..d).map(|j| ((j * 97 + 13) % 256) as u8).collect();
            let want_l2: f32 = (0..d)
                .map(|j| {
                    let x = qs[j] - f32::from(code[j]) * step[j];
                    x * x
                })
                .sum();
            let want_dot: f32 = (0..d).map(|j| qs[j] * f32::from(code[j])).sum();
            let (l2, dot) = (sq8_l2(&qs, &step, &code), sq8_dot(&qs, &code));
            assert!(
                (l2 - want_l2).abs() <= 1e-4 * want_l2.abs().max(1.0),
                "d={d}: {l2} vs {want_l2}"
            );
            assert!(
                (dot - want_dot).abs() <= 1e-4 * want_dot.abs().max(1.0),
                "d={d}: {dot} vs {want_dot}"
            );
        }
    }

    #[test]
    fn pq_tables_equal_the_plain_sums() {
        let (m, dsub, ksub, stride) = (3usize, 5usize, 19usize, 24usize);
        let x: Vec<f32> = (0..m * dsub).map(|i| (i as f32 * 0.41).sin()).collect();
        let bt: Vec<f32> = (0..m * dsub * ksub)
            .map(|i| (i as f32 * 0.13).cos())
            .collect();
        let init: Vec<f32> = (0..m * ksub).map(|i| i as f32 * 0.5).collect();
        for with_init in [false, true] {
            let mut out = vec![7.0f32; m * stride];
            let init_s: &[f32] = if with_init { &init } else { &[] };
            pq_tables(&x, &bt, init_s, -2.0, dsub, ksub, stride, &mut out);
            for s in 0..m {
                for j in 0..stride {
                    let want = if j >= ksub {
                        7.0
                    } else {
                        let base = if with_init { init[s * ksub + j] } else { 0.0 };
                        base + (0..dsub)
                            .map(|t| -2.0 * x[s * dsub + t] * bt[(s * dsub + t) * ksub + j])
                            .sum::<f32>()
                    };
                    let got = out[s * stride + j];
                    assert!(
                        (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "s={s} j={j}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn pq_adc8_batch_equals_the_plain_table_sums() {
        for m in [1usize, 3, 4, 8, 16, 32, 48] {
            let lut: Vec<f32> = (0..m * 256).map(|i| (i as f32 * 0.173).sin()).collect();
            let n = 37;
            let codes: Vec<u8> = (0..n * m).map(|i| ((i * 131 + 7) % 256) as u8).collect();
            let mut out = vec![0f32; n];
            pq_adc8_batch(&lut, &codes, m, &mut out);
            for (i, code) in codes.chunks_exact(m).enumerate() {
                let want: f32 = code
                    .iter()
                    .enumerate()
                    .map(|(s, &c)| lut[s * 256 + usize::from(c)])
                    .sum();
                assert!(
                    (out[i] - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "m={m} code {i}"
                );
                assert!((pq_adc8(&lut, code) - want).abs() <= 1e-4 * want.abs().max(1.0));
            }
        }
    }

    fn vecs(d: usize) -> (Vec<f32>, Vec<f32>) {
        let a: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..d).map(|i| (i as f32 * 0.11).cos()).collect();
        (a, b)
    }

    #[test]
    fn kernels_match_naive_sums_for_odd_lengths() {
        for d in [0usize, 1, 3, 7, 8, 15, 16, 17, 31, 32, 33, 100, 128, 131] {
            let (a, b) = vecs(d);
            let l2: f32 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
            let ip: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            for (name, got_l2, got_ip) in [
                ("dispatched", l2_sq(&a, &b), dot(&a, &b)),
                ("portable", l2_sq_portable(&a, &b), dot_portable(&a, &b)),
            ] {
                assert!(
                    (got_l2 - l2).abs() <= 1e-4 * l2.abs().max(1.0),
                    "{name} l2 d={d}"
                );
                assert!(
                    (got_ip - ip).abs() <= 1e-4 * ip.abs().max(1.0),
                    "{name} dot d={d}"
                );
            }
        }
    }

    #[test]
    fn batched_kernels_give_exactly_the_single_kernel_values() {
        for d in [1usize, 5, 8, 16, 24, 40, 96, 128, 131] {
            let (q, _) = vecs(d);
            let rows: Vec<f32> = (0..d * 11).map(|i| (i as f32 * 0.013).cos()).collect();
            let mut l2 = vec![0.0; 11];
            let mut ip = vec![0.0; 11];
            l2_sq_batch(&q, &rows, &mut l2);
            dot_batch(&q, &rows, &mut ip);
            for (i, r) in rows.chunks_exact(d).enumerate() {
                assert_eq!(l2[i].to_bits(), l2_sq(&q, r).to_bits(), "d={d} row {i}");
                assert_eq!(ip[i].to_bits(), dot(&q, r).to_bits(), "d={d} row {i}");
            }
        }
    }

    #[test]
    fn sq8_batch_kernels_give_exactly_the_single_kernel_values() {
        for d in [1usize, 8, 15, 24, 96, 128, 130] {
            let qs: Vec<f32> = (0..d).map(|j| (j as f32 * 0.29).cos() * 2.0).collect();
            let step: Vec<f32> = (0..d).map(|j| 0.02 + (j % 7) as f32 * 0.001).collect();
            for n in [0usize, 1, 5, 33] {
                let codes: Vec<u8> = (0..d * n).map(|j| ((j * 53 + 7) % 256) as u8).collect();
                let (mut l2, mut ip) = (vec![f32::NAN; n], vec![f32::NAN; n]);
                sq8_l2_batch(&qs, &step, &codes, &mut l2);
                sq8_dot_batch(&qs, &codes, &mut ip);
                for (i, c) in codes.chunks_exact(d).enumerate() {
                    assert_eq!(
                        l2[i].to_bits(),
                        sq8_l2(&qs, &step, c).to_bits(),
                        "d={d} {i}"
                    );
                    assert_eq!(ip[i].to_bits(), sq8_dot(&qs, c).to_bits(), "d={d} {i}");
                }
            }
        }
    }

    #[test]
    fn half_precision_round_trips_and_rounds_to_nearest_even() {
        // Exactly representable values come back unchanged.
        for x in [
            0.0f32,
            -0.0,
            1.0,
            -2.5,
            0.333_251_95,
            65504.0,
            6.103_515_6e-5,
            5.960_464_5e-8,
        ] {
            assert_eq!(f16_to_f32(f32_to_f16(x)).to_bits(), x.to_bits(), "{x}");
        }
        // Every half decodes to a value that encodes back to it (NaNs aside).
        for h in 0..=u16::MAX {
            let x = f16_to_f32(h);
            if !x.is_nan() {
                assert_eq!(f32_to_f16(x), h, "{h:#06x}");
            }
        }
        // Halfway cases go to the even significand; beyond the range is infinity.
        assert_eq!(f32_to_f16(1.0 + 1.0 / 2048.0), 0x3c00);
        assert_eq!(f32_to_f16(1.0 + 3.0 / 2048.0), 0x3c02);
        assert_eq!(f32_to_f16(70000.0), 0x7c00);
        assert!(f16_to_f32(f32_to_f16(f32::NAN)).is_nan());
        // The rounding error is at most half a unit in the last place.
        for i in 0..10_000 {
            let x = (i as f32 * 0.7311).sin() * 300.0;
            let back = f16_to_f32(f32_to_f16(x));
            assert!((back - x).abs() <= x.abs() / 2048.0 + 3e-8, "{x} -> {back}");
        }
    }

    #[test]
    fn dot_rows_f16_equals_the_plain_sums_of_the_widened_halves() {
        for d in [1usize, 5, 8, 13, 96, 128, 131] {
            for n in [0usize, 3, 8, 9, 33] {
                let (q, _) = vecs(d);
                let rows: Vec<u16> = (0..d * n)
                    .map(|i| f32_to_f16((i as f32 * 0.017).cos() * 4.0))
                    .collect();
                let mut out = vec![f32::NAN; n];
                dot_rows_f16(&q, &rows, &mut out);
                for (i, r) in rows.chunks_exact(d).enumerate() {
                    let want: f32 = q.iter().zip(r).map(|(a, &h)| a * f16_to_f32(h)).sum();
                    assert!(
                        (out[i] - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "d={d} n={n} row {i}: {} vs {want}",
                        out[i]
                    );
                }
            }
        }
    }

    #[test]
    fn dot_rows_equals_the_plain_sums() {
        // Row counts around the 8-row step and dimensions with and without an 8-float tail.
        for d in [1usize, 5, 8, 13, 16, 24, 96, 128, 131] {
            for n in [0usize, 1, 7, 8, 9, 17, 64] {
                let (q, _) = vecs(d);
                let rows: Vec<f32> = (0..d * n).map(|i| (i as f32 * 0.017).cos()).collect();
                let mut out = vec![f32::NAN; n];
                dot_rows(&q, &rows, &mut out);
                for (i, r) in rows.chunks_exact(d).enumerate() {
                    let want: f32 = q.iter().zip(r).map(|(a, b)| a * b).sum();
                    assert!(
                        (out[i] - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "d={d} n={n} row {i}: {} vs {want}",
                        out[i]
                    );
                }
            }
        }
    }

    #[test]
    fn the_detected_instruction_set_is_one_this_cpu_supports() {
        let isa = isa();
        #[cfg(target_arch = "x86_64")]
        match isa {
            Isa::Avx512 => assert!(std::arch::is_x86_feature_detected!("avx512f")),
            Isa::Avx2 => assert!(std::arch::is_x86_feature_detected!("avx2")),
            Isa::Portable => {}
            Isa::Neon => panic!("NEON chosen on x86-64"),
        }
        assert_eq!(isa, super::isa(), "detection is stable");
    }

    #[test]
    fn normalize_gives_unit_length_and_leaves_zero_alone() {
        let mut v = vec![3.0, 4.0];
        normalize(&mut v);
        assert!((norm_sq(&v) - 1.0).abs() < 1e-6);
        let mut z = vec![0.0; 4];
        normalize(&mut z);
        assert_eq!(z, vec![0.0; 4]);
    }
}
