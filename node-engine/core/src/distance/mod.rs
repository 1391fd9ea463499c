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

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod detect;
#[cfg(target_arch = "aarch64")]
mod neon;
mod portable;
mod quant;

pub use detect::{Isa, isa};
use portable::next_below_portable;
pub use portable::{dot_portable, l2_sq_portable};
pub use quant::{
    dot_rows_f16, f16_to_f32, f32_to_f16, pq_adc8, pq_adc8_batch, pq_tables, sq8_dot,
    sq8_dot_batch, sq8_l2, sq8_l2_batch,
};

/// Squared Euclidean distance.
#[inline]
pub fn l2_sq(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx512 only when the CPU reports avx512f.
        Isa::Avx512 => unsafe { avx512::l2_avx512(a, b) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx2 only when the CPU reports avx2 and fma.
        Isa::Avx2 => unsafe { avx2::l2_avx2(a, b) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => neon::l2_neon(a, b),
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
        Isa::Avx512 => unsafe { avx512::dot_avx512(a, b) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx2 only when the CPU reports avx2 and fma.
        Isa::Avx2 => unsafe { avx2::dot_avx2(a, b) },
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => neon::dot_neon(a, b),
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
        Isa::Avx512 => unsafe { avx512::l2_batch_avx512(q, rows, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx2 only when the CPU reports avx2 and fma.
        Isa::Avx2 => unsafe { avx2::l2_batch_avx2(q, rows, out) },
        _ => {
            for (o, r) in out.iter_mut().zip(rows.chunks_exact(d)) {
                *o = l2_sq(q, r);
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
        Isa::Avx512 => unsafe { avx512::dot_batch_avx512(q, rows, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returns Avx2 only when the CPU reports avx2 and fma.
        Isa::Avx2 => unsafe { avx2::dot_batch_avx2(q, rows, out) },
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
        Isa::Avx2 | Isa::Avx512 => unsafe { avx2::next_below_avx2(xs, from, bound, or_equal) },
        _ => next_below_portable(xs, from, bound, or_equal),
    }
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
        Isa::Avx512 | Isa::Avx2 => unsafe { avx2::dot_rows_avx2(q, rows, out) },
        _ => {
            for (o, r) in out.iter_mut().zip(rows.chunks_exact(d)) {
                *o = dot(q, r);
            }
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
