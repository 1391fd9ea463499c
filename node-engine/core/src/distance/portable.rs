//! Portable kernels: plain Rust the compiler vectorises for the build's baseline. The fallback
//! on every CPU, and the reference the SIMD kernels are tested against.

const LANES: usize = 16;

pub(super) fn next_below_portable(xs: &[f32], from: usize, bound: f32, or_equal: bool) -> usize {
    xs[from..]
        .iter()
        .position(|&x| x < bound || (or_equal && x == bound))
        .map_or(xs.len(), |i| from + i)
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
