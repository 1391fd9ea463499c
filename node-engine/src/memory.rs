//! Process-wide allocator settings for the server roles.
//!
//! glibc's malloc serves an allocation above its mmap threshold with its own mapping and unmaps
//! it on free, but after such a free it raises the threshold to that size (up to 32 MiB). From
//! then on the REST path's large, short-lived buffers (request bodies of ~14 MB per 10,000-row
//! batch, the row batches, the WAL's group buffer) come from malloc's arenas, which keep the
//! memory after it is freed, one arena per busy thread. A fixed threshold returns every large
//! buffer to the system when it is freed; small allocations are unaffected. The price is some
//! CPU for the kernel to map and zero fresh pages; BENCHMARKS.md ("REST insert") has both.
#![allow(unsafe_code)]

/// Allocations of this size or more get their own mapping, returned to the system on free.
pub const MMAP_THRESHOLD_BYTES: i32 = 1 << 20;

/// Applies the settings above. Call once at start, before the runtime's threads exist; a no-op
/// where the C library is not glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes glibc malloc's tunables; it is called before any other
        // thread is started, and the value is in its documented range.
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) };
        if ok != 1 {
            tracing::warn!(
                "could not set malloc's mmap threshold; large buffers may be kept after use"
            );
        }
    }
}
