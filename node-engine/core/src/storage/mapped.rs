//! Read-only memory maps of segment files viewed as typed slices. The one place in storage that
//! needs `unsafe`: mapping a file and reinterpreting its bytes as `f32`.
#![allow(unsafe_code)]

use memmap2::Mmap;
use std::fs::File;
use std::io;
use std::path::Path;

/// A mapped file of little-endian `f32`s (vectors), page-aligned so rows start 64-byte aligned.
#[derive(Debug)]
pub struct MappedF32 {
    map: Option<Mmap>,
}

impl MappedF32 {
    /// Map `path`. Errors when it cannot be opened/mapped or its length is not a multiple of 4.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        if len % 4 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "vector file length is not a multiple of 4",
            ));
        }
        if len == 0 {
            return Ok(Self { map: None });
        }
        // SAFETY: segment files are immutable once renamed into place (the writer never rewrites
        // them; compaction writes new segments), so the mapped bytes do not change under us.
        let map = unsafe { Mmap::map(&file)? };
        Ok(Self { map: Some(map) })
    }

    /// Raw bytes (for checksums).
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

impl AsRef<[f32]> for MappedF32 {
    fn as_ref(&self) -> &[f32] {
        let bytes = self.bytes();
        if bytes.is_empty() {
            return &[];
        }
        // SAFETY: the mapping starts page-aligned (>= 4-byte alignment for f32), its length is a
        // multiple of 4 (checked in `open`), every bit pattern is a valid f32, the platform is
        // little-endian like the file format (checked at compile time below), and the returned
        // slice borrows `self`, which owns the mapping.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), bytes.len() / 4) }
    }
}

#[cfg(not(target_endian = "little"))]
compile_error!("segment files are little-endian; big-endian hosts are not supported");

/// A mapped byte file (the dynamic-field blob).
#[derive(Debug)]
pub struct MappedBytes {
    map: Option<Mmap>,
}

impl MappedBytes {
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        if file.metadata()?.len() == 0 {
            return Ok(Self { map: None });
        }
        // SAFETY: as for `MappedF32::open`: segment files are immutable once committed.
        let map = unsafe { Mmap::map(&file)? };
        Ok(Self { map: Some(map) })
    }
}

impl AsRef<[u8]> for MappedBytes {
    fn as_ref(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}
