//! Distance kernels between f32 vectors. Every index and the FLAT path call these, so they are
//! the one place to optimise (run-time SIMD dispatch belongs here, behind these signatures).
//!
//! Guarantees: `a.len() == b.len()` is the caller's invariant (debug-asserted); results are the
//! plain mathematical values (squared L2, dot product), summed in a fixed order so repeated calls
//! are bit-identical.

const LANES: usize = 16;

/// Squared Euclidean distance.
#[inline]
pub fn l2_sq(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; LANES];
    let chunks = a.len() / LANES;
    for c in 0..chunks {
        let x = &a[c * LANES..(c + 1) * LANES];
        let y = &b[c * LANES..(c + 1) * LANES];
        for l in 0..LANES {
            let d = x[l] - y[l];
            acc[l] += d * d;
        }
    }
    let mut tail = 0f32;
    for i in chunks * LANES..a.len() {
        let d = a[i] - b[i];
        tail += d * d;
    }
    acc.iter().sum::<f32>() + tail
}

/// Inner product.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; LANES];
    let chunks = a.len() / LANES;
    for c in 0..chunks {
        let x = &a[c * LANES..(c + 1) * LANES];
        let y = &b[c * LANES..(c + 1) * LANES];
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for i in chunks * LANES..a.len() {
        tail += a[i] * b[i];
    }
    acc.iter().sum::<f32>() + tail
}

/// Squared norm.
#[inline]
pub fn norm_sq(a: &[f32]) -> f32 {
    dot(a, a)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_match_naive_sums_for_odd_lengths() {
        for d in [1usize, 3, 16, 17, 128, 131] {
            let a: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..d).map(|i| (i as f32 * 0.11).cos()).collect();
            let l2: f32 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
            let ip: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((l2_sq(&a, &b) - l2).abs() <= 1e-4 * l2.abs().max(1.0), "d={d}");
            assert!((dot(&a, &b) - ip).abs() <= 1e-4 * ip.abs().max(1.0), "d={d}");
        }
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
