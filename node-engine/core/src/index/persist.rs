//! The on-disk form of every ANN index: one file of named, 64-byte-aligned little-endian arrays
//! behind a JSON header, checksummed (CRC32) as a whole, written with temp file + fsync + rename
//! and read back by mmap without copying ([`Buf::Mapped`]).
//!
//! Layout: `magic(8) | crc32(4) | header_len(4) | header JSON | pad | sections...`; the CRC covers
//! every byte after itself. Depends only on memmap2 and crc32fast; knows nothing of index kinds.
#![allow(unsafe_code)]

#[cfg(target_endian = "big")]
compile_error!("shoal index files are little-endian; big-endian targets are not supported");

use super::IndexError;
use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::marker::PhantomData;
use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

/// File name of the index inside its directory.
pub const INDEX_FILE: &str = "index.shoal";
const MAGIC: &[u8; 8] = b"SHOALIX1";
const ALIGN: usize = 64;

/// Plain old data: every bit pattern is a valid value and there is no padding.
///
/// # Safety
/// Implement only for primitive integer and float types.
pub unsafe trait Pod: Copy + Send + Sync + 'static {}
// SAFETY: primitive numeric types have no padding and accept every bit pattern.
unsafe impl Pod for u8 {}
// SAFETY: as above.
unsafe impl Pod for u16 {}
// SAFETY: as above.
unsafe impl Pod for u32 {}
// SAFETY: as above.
unsafe impl Pod for u64 {}
// SAFETY: as above.
unsafe impl Pod for f32 {}

/// An array that is either owned (just built) or a view into a mapped index file.
pub enum Buf<T: Pod> {
    Owned(Vec<T>),
    Mapped {
        map: Arc<Mmap>,
        off: usize,
        len: usize,
        _t: PhantomData<T>,
    },
}

impl<T: Pod> Deref for Buf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Buf::Owned(v) => v,
            Buf::Mapped { map, off, len, .. } => {
                // SAFETY: `FileReader::section` checked that `off..off + len * size_of::<T>()` lies
                // inside the map and that `map.as_ptr() + off` is aligned for `T`; `T: Pod` accepts
                // any bytes; the map is read-only and kept alive by the `Arc` as long as `self`.
                unsafe { std::slice::from_raw_parts(map.as_ptr().add(*off).cast::<T>(), *len) }
            }
        }
    }
}

impl<T: Pod> From<Vec<T>> for Buf<T> {
    fn from(v: Vec<T>) -> Self {
        Buf::Owned(v)
    }
}

impl<T: Pod> std::fmt::Debug for Buf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Buf::Owned(_) => "owned",
            Buf::Mapped { .. } => "mapped",
        };
        write!(
            f,
            "Buf<{}>({kind}, {} items)",
            std::any::type_name::<T>(),
            self.len()
        )
    }
}

impl<T: Pod> Buf<T> {
    pub fn bytes(&self) -> usize {
        self.len() * size_of::<T>()
    }

    /// The array moved into anonymous memory advised for transparent huge pages (Linux): a
    /// graph search reads rows at random, and 2 MiB pages spare it most TLB misses (about a
    /// fifth of an HNSW query's time on 100k x 96 vectors). A mapped array's file pages are
    /// dropped from this process once copied, so memory is not held twice. Arrays under one huge
    /// page, other systems, and any error keep the array as it was.
    pub fn into_huge_pages(self) -> Buf<T> {
        const HUGE_PAGE: usize = 2 << 20;
        if !cfg!(target_os = "linux") || self.bytes() < HUGE_PAGE {
            return self;
        }
        match self.huge_copy() {
            Ok(copy) => {
                self.release_pages();
                copy
            }
            Err(_) => self,
        }
    }

    fn huge_copy(&self) -> std::io::Result<Buf<T>> {
        let mut m = memmap2::MmapMut::map_anon(self.bytes())?;
        #[cfg(target_os = "linux")]
        m.advise(memmap2::Advice::HugePage)?;
        m.copy_from_slice(as_bytes(self));
        Ok(Buf::Mapped {
            map: Arc::new(m.make_read_only()?),
            off: 0,
            len: self.len(),
            _t: PhantomData,
        })
    }

    /// Drop a mapped array's pages from this process (the page cache keeps them).
    fn release_pages(&self) {
        #[cfg(unix)]
        if let Buf::Mapped { map, off, .. } = self {
            // SAFETY: the map is a read-only file mapping (`FileReader::open`) or a read-only
            // anonymous copy; after MADV_DONTNEED a file page reads back the same bytes from the
            // file, and the only reader of this range (`self`) is being dropped. A failure
            // leaves the pages mapped, which is harmless.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, *off, self.bytes())
            };
        }
    }
}

fn as_bytes<T: Pod>(s: &[T]) -> &[u8] {
    // SAFETY: `T: Pod` has no padding, so every byte of the slice is initialised; the length in
    // bytes is exactly `len * size_of::<T>()` and u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

#[derive(Serialize, Deserialize, Debug)]
struct SectionMeta {
    name: String,
    offset: usize,
    bytes: usize,
    elem: usize,
}

#[derive(Serialize, Deserialize, Debug)]
struct Header {
    meta: serde_json::Value,
    sections: Vec<SectionMeta>,
}

/// Collects named arrays, then writes them atomically.
pub struct FileWriter<'a> {
    meta: serde_json::Value,
    sections: Vec<(String, usize, &'a [u8])>,
}

impl<'a> FileWriter<'a> {
    pub fn new(meta: serde_json::Value) -> Self {
        Self {
            meta,
            sections: Vec::new(),
        }
    }

    pub fn add<T: Pod>(&mut self, name: &str, data: &'a [T]) {
        self.sections
            .push((name.to_string(), size_of::<T>(), as_bytes(data)));
    }

    /// Write `dir/INDEX_FILE` via a temp file, fsync it, rename it into place and fsync `dir`.
    pub fn write(self, dir: &Path) -> Result<(), IndexError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| IndexError::Io {
                path: path.clone(),
                source,
            }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        // Offsets depend on the header length, which depends on the offsets: iterate until the
        // header stops growing (two rounds in practice).
        let mut header_len = 0usize;
        let (header_bytes, metas) = loop {
            let mut off = (16 + header_len).next_multiple_of(ALIGN);
            let mut metas = Vec::new();
            for (name, elem, data) in &self.sections {
                metas.push(SectionMeta {
                    name: name.clone(),
                    offset: off,
                    bytes: data.len(),
                    elem: *elem,
                });
                off = (off + data.len()).next_multiple_of(ALIGN);
            }
            let header = Header {
                meta: self.meta.clone(),
                sections: metas,
            };
            let bytes = serde_json::to_vec(&header).map_err(|e| IndexError::Io {
                path: dir.display().to_string(),
                source: std::io::Error::other(e),
            })?;
            if bytes.len() <= header_len {
                break (bytes, header.sections);
            }
            header_len = bytes.len() + 64;
        };
        let mut head = Vec::with_capacity(16 + header_len);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&[0; 4]);
        head.extend_from_slice(&(header_len as u32).to_le_bytes());
        head.extend_from_slice(&header_bytes);
        head.resize(16 + header_len, b' ');
        // Assemble the body pieces (with zero padding) so the CRC and the write see the same bytes.
        let zeros = [0u8; ALIGN];
        let mut pieces: Vec<&[u8]> = Vec::new();
        let mut pos = head.len();
        for (m, (_, _, data)) in metas.iter().zip(&self.sections) {
            pieces.push(&zeros[..m.offset - pos]);
            pieces.push(data);
            pos = m.offset + data.len();
        }
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head[12..]);
        for p in &pieces {
            crc.update(p);
        }
        head[8..12].copy_from_slice(&crc.finalize().to_le_bytes());

        let tmp = dir.join(format!(".{INDEX_FILE}.tmp"));
        let fin = dir.join(INDEX_FILE);
        {
            let f = File::create(&tmp).map_err(io(&tmp))?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
            w.write_all(&head).map_err(io(&tmp))?;
            for p in &pieces {
                w.write_all(p).map_err(io(&tmp))?;
            }
            let f = w.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, &fin).map_err(io(&fin))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
        Ok(())
    }
}

/// The CRC32 recorded in `dir/INDEX_FILE`'s header and the file's size, read without mapping
/// or verifying the body (what the metadata store records beside the file).
///
/// Errors: `Io` when the file cannot be read; `Corrupt` when the header is not an index header.
pub fn stored_crc(dir: &Path) -> Result<(u32, u64), IndexError> {
    use std::io::Read;
    let p = dir.join(INDEX_FILE);
    let path = p.display().to_string();
    let io = |source| IndexError::Io {
        path: path.clone(),
        source,
    };
    let mut f = File::open(&p).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut head = [0u8; 12];
    f.read_exact(&mut head).map_err(io)?;
    if &head[..8] != MAGIC {
        return Err(IndexError::Corrupt {
            path,
            reason: "bad magic".into(),
        });
    }
    Ok((
        u32::from_le_bytes([head[8], head[9], head[10], head[11]]),
        len,
    ))
}

/// A mapped, checksum-verified index file.
pub struct FileReader {
    map: Arc<Mmap>,
    path: String,
    header: Header,
}

impl FileReader {
    /// Map `dir/INDEX_FILE` and verify magic, checksum and section bounds.
    ///
    /// Errors: `Io` when the file cannot be opened or mapped; `Corrupt` on any mismatch.
    pub fn open(dir: &Path) -> Result<Self, IndexError> {
        let p = dir.join(INDEX_FILE);
        let path = p.display().to_string();
        let f = File::open(&p).map_err(|source| IndexError::Io {
            path: path.clone(),
            source,
        })?;
        // SAFETY: index files are immutable once renamed into place (a rebuild writes a new temp
        // file and renames over it, which leaves this mapping on the old inode).
        let map = unsafe { Mmap::map(&f) }.map_err(|source| IndexError::Io {
            path: path.clone(),
            source,
        })?;
        let corrupt = |reason: String| IndexError::Corrupt {
            path: path.clone(),
            reason,
        };
        if map.len() < 16 || &map[..8] != MAGIC {
            return Err(corrupt("bad magic or truncated header".into()));
        }
        let stored = u32::from_le_bytes([map[8], map[9], map[10], map[11]]);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&map[12..]);
        let actual = crc.finalize();
        if stored != actual {
            return Err(corrupt(format!(
                "checksum mismatch (stored {stored:08x}, computed {actual:08x})"
            )));
        }
        let hlen = u32::from_le_bytes([map[12], map[13], map[14], map[15]]) as usize;
        let hbytes = map
            .get(16..16 + hlen)
            .ok_or_else(|| corrupt("header past end of file".into()))?;
        let header: Header = serde_json::from_slice(hbytes.trim_ascii_end())
            .map_err(|e| corrupt(format!("bad header: {e}")))?;
        for s in &header.sections {
            let end = s.offset.checked_add(s.bytes);
            if end.is_none_or(|e| e > map.len()) || s.offset % ALIGN != 0 {
                return Err(corrupt(format!("section {} out of bounds", s.name)));
            }
        }
        Ok(Self {
            map: Arc::new(map),
            path,
            header,
        })
    }

    pub fn meta(&self) -> &serde_json::Value {
        &self.header.meta
    }

    pub fn corrupt(&self, reason: impl Into<String>) -> IndexError {
        IndexError::Corrupt {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// The named array, exactly `expect_len` items when given.
    pub fn section<T: Pod>(
        &self,
        name: &str,
        expect_len: Option<usize>,
    ) -> Result<Buf<T>, IndexError> {
        let s = self
            .header
            .sections
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| self.corrupt(format!("missing section {name}")))?;
        if s.elem != size_of::<T>() || s.bytes % size_of::<T>() != 0 {
            return Err(self.corrupt(format!("section {name} has the wrong element size")));
        }
        let len = s.bytes / size_of::<T>();
        if expect_len.is_some_and(|e| e != len) {
            return Err(self.corrupt(format!(
                "section {name} has {len} items, expected {expect_len:?}"
            )));
        }
        // The map base is page-aligned and offsets are multiples of 64, so `T` is aligned.
        if !(self.map.as_ptr() as usize + s.offset).is_multiple_of(align_of::<T>()) {
            return Err(self.corrupt(format!("section {name} misaligned")));
        }
        Ok(Buf::Mapped {
            map: self.map.clone(),
            off: s.offset,
            len,
            _t: PhantomData,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_round_trip_through_a_mapped_file_and_a_flipped_byte_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let a: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
        let b: Vec<u8> = (0..77).map(|i| i as u8).collect();
        let mut w = FileWriter::new(serde_json::json!({"k": 1}));
        w.add("a", &a);
        w.add("b", &b);
        w.write(dir.path()).unwrap();
        let r = FileReader::open(dir.path()).unwrap();
        assert_eq!(r.meta()["k"], 1);
        assert_eq!(&*r.section::<f32>("a", Some(1000)).unwrap(), &a[..]);
        assert_eq!(&*r.section::<u8>("b", None).unwrap(), &b[..]);
        assert!(matches!(
            r.section::<u64>("a", None),
            Err(IndexError::Corrupt { .. })
        ));
        assert!(matches!(
            r.section::<f32>("a", Some(999)),
            Err(IndexError::Corrupt { .. })
        ));
        drop(r);
        let p = dir.path().join(INDEX_FILE);
        let mut bytes = std::fs::read(&p).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&p, &bytes).unwrap();
        match FileReader::open(dir.path()) {
            Err(IndexError::Corrupt { reason, .. }) => {
                assert!(reason.contains("checksum"), "{reason}")
            }
            other => panic!("expected Corrupt, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn arrays_moved_onto_huge_pages_keep_their_contents() {
        // 3 MiB: over one huge page, so both the owned and the mapped array are copied.
        let big: Vec<u32> = (0..(3 << 20) / 4)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761))
            .collect();
        let small: Vec<u32> = (0..100).collect();
        let dir = tempfile::tempdir().unwrap();
        let mut w = FileWriter::new(serde_json::json!({}));
        w.add("big", &big);
        w.add("small", &small);
        w.write(dir.path()).unwrap();
        let r = FileReader::open(dir.path()).unwrap();
        let mapped = r
            .section::<u32>("big", Some(big.len()))
            .unwrap()
            .into_huge_pages();
        assert_eq!(&*mapped, &big[..]);
        let owned = Buf::from(big.clone()).into_huge_pages();
        assert_eq!(&*owned, &big[..]);
        if cfg!(target_os = "linux") {
            assert!(matches!(owned, Buf::Mapped { .. }), "{owned:?}");
        }
        // The rest of the file is still readable after the big section's pages were dropped.
        assert_eq!(
            &*r.section::<u32>("small", None).unwrap().into_huge_pages(),
            &small[..]
        );
        assert_eq!(&*r.section::<u32>("big", None).unwrap(), &big[..]);
        assert!(matches!(
            Buf::from(small.clone()).into_huge_pages(),
            Buf::Owned(_)
        ));
    }
}
