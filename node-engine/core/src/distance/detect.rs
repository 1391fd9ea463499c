//! Which instruction set the kernels run on: detected once per process (AVX-512F, then
//! AVX2+FMA+F16C on x86-64; NEON on aarch64; `SHOAL_PORTABLE_KERNELS` forces the portable ones).

use std::sync::atomic::{AtomicU8, Ordering};

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
