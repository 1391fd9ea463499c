//! Sealed segments: immutable column files in `segments/<id>/`, written as temp directory +
//! fsync + rename, each file CRC32-checked through a manifest whose own CRC lives in the metadata
//! store. Vectors are one contiguous little-endian `f32` file mapped read-only (page-aligned, so
//! every row starts 64-byte aligned for 128-d and any dimension that is a multiple of 16).
//! Tombstones are versioned side files (`tombstones.<seq>.bin`) so a new version never overwrites
//! the committed one.
//!
//! Owns the on-disk format only; no metadata store, no WAL, no network.

use super::mapped::{MappedBytes, MappedF32};
use super::wal::RowBatch;
use crate::bitset::Bitset;
use crate::index::flat::FlatIndex;
use crate::types::Metric;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("failed to {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A checksum or structural check failed: the segment must not be served.
    #[error("segment {segment} is corrupt: {reason}")]
    Corrupt { segment: u64, reason: String },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SegmentError + 'a {
    move |source| SegmentError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Vector storage of a segment: in memory while a frozen buffer is being written, mapped after.
#[derive(Debug)]
pub enum Vectors {
    Owned(Vec<f32>),
    Mapped(MappedF32),
}

impl AsRef<[f32]> for Vectors {
    fn as_ref(&self) -> &[f32] {
        match self {
            Vectors::Owned(v) => v,
            Vectors::Mapped(m) => m.as_ref(),
        }
    }
}

#[derive(Debug)]
enum Blob {
    Owned(Vec<u8>),
    Mapped(MappedBytes),
}

impl AsRef<[u8]> for Blob {
    fn as_ref(&self) -> &[u8] {
        match self {
            Blob::Owned(v) => v,
            Blob::Mapped(m) => m.as_ref(),
        }
    }
}

/// An immutable segment's rows: ids, vectors (behind the FLAT index) and dynamic fields.
pub struct SegmentData {
    pub id: u64,
    pub dim: usize,
    ids: Vec<i64>,
    flat: FlatIndex<Vectors>,
    field_offsets: Vec<u64>,
    fields: Blob,
    mapped: bool,
}

impl std::fmt::Debug for SegmentData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentData")
            .field("id", &self.id)
            .field("rows", &self.ids.len())
            .finish()
    }
}

impl SegmentData {
    /// Freeze a growing buffer's rows into an in-memory segment (searchable while it is written).
    pub fn from_batch(id: u64, batch: RowBatch, metric: Metric) -> Result<Self, SegmentError> {
        let mut offsets = Vec::with_capacity(batch.len() + 1);
        let mut blob = Vec::new();
        offsets.push(0u64);
        for f in &batch.fields {
            blob.extend_from_slice(f);
            offsets.push(blob.len() as u64);
        }
        let flat =
            FlatIndex::new(Vectors::Owned(batch.vectors), batch.dim, metric).map_err(|e| {
                SegmentError::Corrupt {
                    segment: id,
                    reason: e.to_string(),
                }
            })?;
        Ok(Self {
            id,
            dim: batch.dim,
            ids: batch.ids,
            flat,
            field_offsets: offsets,
            fields: Blob::Owned(blob),
            mapped: false,
        })
    }

    pub fn rows(&self) -> usize {
        self.ids.len()
    }
    pub fn ids(&self) -> &[i64] {
        &self.ids
    }
    pub fn is_mapped(&self) -> bool {
        self.mapped
    }
    pub fn flat(&self) -> &FlatIndex<Vectors> {
        &self.flat
    }
    pub fn vector(&self, row: usize) -> &[f32] {
        &self.flat.data()[row * self.dim..(row + 1) * self.dim]
    }
    /// The row's dynamic fields as JSON text (empty when none).
    pub fn fields(&self, row: usize) -> &[u8] {
        let (a, b) = (
            self.field_offsets[row] as usize,
            self.field_offsets[row + 1] as usize,
        );
        &self.fields.as_ref()[a..b]
    }
    /// Bytes held in memory or mapped.
    pub fn memory_bytes(&self) -> usize {
        self.ids.len() * 8
            + self.field_offsets.len() * 8
            + self.fields.as_ref().len()
            + self.flat.data().len() * 4
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct FileSum {
    bytes: u64,
    crc32: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    segment: u64,
    rows: u64,
    dim: u64,
    files: BTreeMap<String, FileSum>,
}

const F_VECTORS: &str = "vectors.f32";
const F_IDS: &str = "ids.i64";
const F_FIELDS: &str = "fields.json";
const F_OFFSETS: &str = "fields.off";
const F_MANIFEST: &str = "manifest.json";

/// Directory of segment `id` under `root`.
pub fn segment_dir(root: &Path, id: u64) -> PathBuf {
    root.join(format!("{id:020}"))
}

fn write_file(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    files: &mut BTreeMap<String, FileSum>,
) -> Result<(), SegmentError> {
    let path = dir.join(name);
    let mut f = File::create(&path).map_err(io_err("create", &path))?;
    f.write_all(bytes).map_err(io_err("write", &path))?;
    f.sync_all().map_err(io_err("fsync", &path))?;
    files.insert(
        name.to_string(),
        FileSum {
            bytes: bytes.len() as u64,
            crc32: crc32fast::hash(bytes),
        },
    );
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), SegmentError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

fn le_bytes<T: Copy, const N: usize>(xs: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    let mut out = Vec::with_capacity(xs.len() * N);
    for &x in xs {
        out.extend_from_slice(&f(x));
    }
    out
}

/// Write `seg` durably under `root` and return the manifest's CRC32 (to commit in metadata).
///
/// Guarantees: the directory appears under its final name only complete and fsynced; a crash
/// leaves at most a `.tmp-*` directory, which [`remove_strays`] deletes.
///
/// Errors: the segments directory must already exist (the collection creates it when it opens).
/// It is never re-created here: if the shared filesystem is briefly unmounted (a CSI driver
/// re-binding a healed mount), recreating the path would write the segment into the bare mount
/// point, where the new mount then hides it after its metadata commit.
pub fn write_segment(root: &Path, seg: &SegmentData) -> Result<u32, SegmentError> {
    if !root.is_dir() {
        return Err(io_err(
            "find the segments directory (is the data directory's filesystem mounted?)",
            root,
        )(io::Error::from(io::ErrorKind::NotFound)));
    }
    let tmp = root.join(format!(".tmp-{:020}", seg.id));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err("remove", &tmp))?;
    }
    fs::create_dir(&tmp).map_err(io_err("create", &tmp))?;
    let mut files = BTreeMap::new();
    let vec_bytes = le_bytes(seg.flat.data(), f32::to_le_bytes);
    write_file(&tmp, F_VECTORS, &vec_bytes, &mut files)?;
    drop(vec_bytes);
    write_file(
        &tmp,
        F_IDS,
        &le_bytes(&seg.ids, i64::to_le_bytes),
        &mut files,
    )?;
    write_file(&tmp, F_FIELDS, seg.fields.as_ref(), &mut files)?;
    write_file(
        &tmp,
        F_OFFSETS,
        &le_bytes(&seg.field_offsets, u64::to_le_bytes),
        &mut files,
    )?;
    let manifest = Manifest {
        format: 1,
        segment: seg.id,
        rows: seg.ids.len() as u64,
        dim: seg.dim as u64,
        files,
    };
    let mbytes = serde_json::to_vec_pretty(&manifest).map_err(|e| SegmentError::Corrupt {
        segment: seg.id,
        reason: format!("manifest encoding: {e}"),
    })?;
    let mut unused = BTreeMap::new();
    write_file(&tmp, F_MANIFEST, &mbytes, &mut unused)?;
    sync_dir(&tmp)?;
    let dst = segment_dir(root, seg.id);
    if dst.exists() {
        // Left by a flush that crashed after the rename but before its metadata commit.
        fs::remove_dir_all(&dst).map_err(io_err("remove", &dst))?;
    }
    fs::rename(&tmp, &dst).map_err(io_err("rename", &tmp))?;
    sync_dir(root)?;
    Ok(crc32fast::hash(&mbytes))
}

fn corrupt(segment: u64, reason: impl Into<String>) -> SegmentError {
    SegmentError::Corrupt {
        segment,
        reason: reason.into(),
    }
}

fn read_checked(dir: &Path, id: u64, name: &str, m: &Manifest) -> Result<Vec<u8>, SegmentError> {
    let path = dir.join(name);
    let bytes = fs::read(&path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => corrupt(id, format!("{name} is missing")),
        _ => SegmentError::Io {
            action: "read",
            path: path.clone(),
            source: e,
        },
    })?;
    check_sum(id, name, &bytes, m)?;
    Ok(bytes)
}

/// The manifest's entry for `name`, once `bytes` has the size it records.
fn check_size<'m>(
    id: u64,
    name: &str,
    bytes: &[u8],
    m: &'m Manifest,
) -> Result<&'m FileSum, SegmentError> {
    let sum = m
        .files
        .get(name)
        .ok_or_else(|| corrupt(id, format!("manifest lacks {name}")))?;
    if sum.bytes != bytes.len() as u64 {
        return Err(corrupt(
            id,
            format!(
                "{name} has {} bytes, manifest says {}",
                bytes.len(),
                sum.bytes
            ),
        ));
    }
    Ok(sum)
}

fn check_sum(id: u64, name: &str, bytes: &[u8], m: &Manifest) -> Result<(), SegmentError> {
    let sum = check_size(id, name, bytes, m)?;
    if crc32fast::hash(bytes) != sum.crc32 {
        return Err(corrupt(id, format!("{name} checksum mismatch")));
    }
    Ok(())
}

/// Load and verify a committed segment.
///
/// Errors: `Corrupt` when the manifest's CRC differs from `manifest_crc` (the committed value),
/// a file is missing, has the wrong size or fails its CRC, or the shapes disagree.
pub fn load_segment(
    root: &Path,
    id: u64,
    manifest_crc: u32,
    metric: Metric,
) -> Result<SegmentData, SegmentError> {
    open_segment(root, id, manifest_crc, metric, Verify::Everything)
}

/// Map a segment this process has just written with [`write_segment`] and fsynced: the
/// manifest, the ids and the field offsets are read and verified as in [`load_segment`], but the
/// mapped vector and field files are only checked for their size, not read back for their
/// CRC. Their checksums were computed from the very bytes that were written, and reading them
/// back would only read the page cache, while touching every page of the map (the whole
/// segment would count in the process's resident memory before any search needs it). Every
/// other open (restart, readers, index builds) verifies everything.
pub fn map_written_segment(
    root: &Path,
    id: u64,
    manifest_crc: u32,
    metric: Metric,
) -> Result<SegmentData, SegmentError> {
    open_segment(root, id, manifest_crc, metric, Verify::SizesOfMappedFiles)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verify {
    Everything,
    SizesOfMappedFiles,
}

fn check_mapped(
    id: u64,
    name: &str,
    bytes: &[u8],
    m: &Manifest,
    verify: Verify,
) -> Result<(), SegmentError> {
    match verify {
        Verify::Everything => check_sum(id, name, bytes, m),
        Verify::SizesOfMappedFiles => check_size(id, name, bytes, m).map(|_| ()),
    }
}

fn open_segment(
    root: &Path,
    id: u64,
    manifest_crc: u32,
    metric: Metric,
    verify: Verify,
) -> Result<SegmentData, SegmentError> {
    let dir = segment_dir(root, id);
    let mpath = dir.join(F_MANIFEST);
    let mbytes = fs::read(&mpath).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => corrupt(id, "manifest.json is missing"),
        _ => SegmentError::Io {
            action: "read",
            path: mpath.clone(),
            source: e,
        },
    })?;
    if crc32fast::hash(&mbytes) != manifest_crc {
        return Err(corrupt(
            id,
            "manifest checksum differs from the committed one",
        ));
    }
    let m: Manifest =
        serde_json::from_slice(&mbytes).map_err(|e| corrupt(id, format!("manifest: {e}")))?;
    let rows = m.rows as usize;
    let dim = m.dim as usize;
    let ids: Vec<i64> = read_checked(&dir, id, F_IDS, &m)?
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    let offsets: Vec<u64> = read_checked(&dir, id, F_OFFSETS, &m)?
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    let vpath = dir.join(F_VECTORS);
    let vectors = MappedF32::open(&vpath).map_err(io_err("map", &vpath))?;
    check_mapped(id, F_VECTORS, vectors.bytes(), &m, verify)?;
    let fpath = dir.join(F_FIELDS);
    let fields = MappedBytes::open(&fpath).map_err(io_err("map", &fpath))?;
    check_mapped(id, F_FIELDS, fields.as_ref(), &m, verify)?;
    if ids.len() != rows || offsets.len() != rows + 1 || vectors.as_ref().len() != rows * dim {
        return Err(corrupt(id, "column lengths disagree with the manifest"));
    }
    if offsets.windows(2).any(|w| w[0] > w[1])
        || offsets.last().copied() != Some(fields.as_ref().len() as u64)
    {
        return Err(corrupt(id, "field offsets are not monotonic"));
    }
    let flat = FlatIndex::new(Vectors::Mapped(vectors), dim, metric)
        .map_err(|e| corrupt(id, e.to_string()))?;
    Ok(SegmentData {
        id,
        dim,
        ids,
        flat,
        field_offsets: offsets,
        fields: Blob::Mapped(fields),
        mapped: true,
    })
}

fn tomb_path(root: &Path, id: u64, seq: u64) -> PathBuf {
    segment_dir(root, id).join(format!("tombstones.{seq:020}.bin"))
}

/// Write the deleted-row set of segment `id` as version `seq`; returns its CRC32.
pub fn write_tombstones(
    root: &Path,
    id: u64,
    seq: u64,
    deleted: &Bitset,
) -> Result<u32, SegmentError> {
    let rows: Vec<u32> = deleted.iter_ones().map(|r| r as u32).collect();
    let bytes = le_bytes(&rows, u32::to_le_bytes);
    let dir = segment_dir(root, id);
    let path = tomb_path(root, id, seq);
    let tmp = dir.join(format!(".tmp-tombstones.{seq:020}"));
    let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
    f.write_all(&bytes).map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(io_err("fsync", &tmp))?;
    fs::rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
    sync_dir(&dir)?;
    Ok(crc32fast::hash(&bytes))
}

/// Load tombstone version `seq` (0 = none) of a segment with `rows` rows.
pub fn load_tombstones(
    root: &Path,
    id: u64,
    seq: u64,
    crc: u32,
    rows: usize,
) -> Result<Bitset, SegmentError> {
    let mut b = Bitset::new_empty(rows);
    if seq == 0 {
        return Ok(b);
    }
    let path = tomb_path(root, id, seq);
    let bytes = fs::read(&path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => corrupt(id, format!("tombstone file version {seq} is missing")),
        _ => SegmentError::Io {
            action: "read",
            path: path.clone(),
            source: e,
        },
    })?;
    if crc32fast::hash(&bytes) != crc || bytes.len() % 4 != 0 {
        return Err(corrupt(id, "tombstone checksum mismatch"));
    }
    for c in bytes.chunks_exact(4) {
        let r = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize;
        if r >= rows {
            return Err(corrupt(id, "tombstone row out of range"));
        }
        b.insert(r);
    }
    Ok(b)
}

/// Remove tombstone versions of segment `id` other than `keep`.
pub fn remove_old_tombstones(root: &Path, id: u64, keep: u64) {
    let dir = segment_dir(root, id);
    let keep_name = format!("tombstones.{keep:020}.bin");
    if let Ok(rd) = fs::read_dir(&dir) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if n.starts_with("tombstones.") && n != keep_name {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// Delete segment directories not in `committed` (crashed flushes, dropped segments).
pub fn remove_strays(root: &Path, committed: &[u64]) -> Result<(), SegmentError> {
    let rd = match fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("list", root)(e)),
    };
    for e in rd {
        let e = e.map_err(io_err("list", root))?;
        let name = e.file_name().to_string_lossy().to_string();
        let keep = name.parse::<u64>().is_ok_and(|id| committed.contains(&id));
        if !keep {
            let p = e.path();
            fs::remove_dir_all(&p).map_err(io_err("remove", &p))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(n: usize, dim: usize) -> RowBatch {
        RowBatch {
            dim,
            ids: (0..n as i64).map(|i| i * 10).collect(),
            vectors: (0..n * dim).map(|i| i as f32 * 0.5).collect(),
            fields: (0..n)
                .map(|i| {
                    if i % 2 == 0 {
                        format!("{{\"a\":{i}}}").into_bytes()
                    } else {
                        Vec::new()
                    }
                })
                .collect(),
        }
    }

    #[test]
    fn written_segment_loads_back_identically_through_mmap() {
        let dir = tempfile::tempdir().unwrap();
        let seg = SegmentData::from_batch(7, batch(33, 16), Metric::L2).unwrap();
        let crc = write_segment(dir.path(), &seg).unwrap();
        let back = load_segment(dir.path(), 7, crc, Metric::L2).unwrap();
        assert!(back.is_mapped());
        assert_eq!(back.ids(), seg.ids());
        assert_eq!(back.flat().data(), seg.flat().data());
        assert_eq!(
            back.flat().data().as_ptr() as usize % 64,
            0,
            "vectors must be 64-byte aligned"
        );
        for r in 0..33 {
            assert_eq!(back.fields(r), seg.fields(r));
        }
    }

    #[test]
    fn a_flipped_byte_in_any_segment_file_is_detected_on_load() {
        for name in [F_VECTORS, F_IDS, F_FIELDS, F_OFFSETS, F_MANIFEST] {
            let dir = tempfile::tempdir().unwrap();
            let seg = SegmentData::from_batch(1, batch(8, 4), Metric::IP).unwrap();
            let crc = write_segment(dir.path(), &seg).unwrap();
            let p = segment_dir(dir.path(), 1).join(name);
            let mut bytes = fs::read(&p).unwrap();
            bytes[1] ^= 0x40;
            fs::write(&p, bytes).unwrap();
            let err = load_segment(dir.path(), 1, crc, Metric::IP).unwrap_err();
            assert!(
                matches!(err, SegmentError::Corrupt { segment: 1, .. }),
                "{name}: {err}"
            );
        }
    }

    #[test]
    fn a_just_written_segment_maps_without_reading_its_data_files_back() {
        let dir = tempfile::tempdir().unwrap();
        let seg = SegmentData::from_batch(4, batch(20, 8), Metric::L2).unwrap();
        let crc = write_segment(dir.path(), &seg).unwrap();
        let fresh = map_written_segment(dir.path(), 4, crc, Metric::L2).unwrap();
        assert!(fresh.is_mapped());
        assert_eq!(fresh.ids(), seg.ids());
        assert_eq!(fresh.flat().data(), seg.flat().data());

        // Sizes, the manifest, ids and offsets are still checked on this path...
        let vec_path = segment_dir(dir.path(), 4).join(F_VECTORS);
        let good = fs::read(&vec_path).unwrap();
        fs::write(&vec_path, &good[..good.len() - 4]).unwrap();
        assert!(matches!(
            map_written_segment(dir.path(), 4, crc, Metric::L2),
            Err(SegmentError::Corrupt { segment: 4, .. })
        ));
        assert!(map_written_segment(dir.path(), 4, crc ^ 1, Metric::L2).is_err());
        // ...while a flipped data byte is left to the full verification of every later open.
        let mut flipped = good.clone();
        flipped[3] ^= 0x40;
        fs::write(&vec_path, &flipped).unwrap();
        assert!(map_written_segment(dir.path(), 4, crc, Metric::L2).is_ok());
        assert!(matches!(
            load_segment(dir.path(), 4, crc, Metric::L2),
            Err(SegmentError::Corrupt { segment: 4, .. })
        ));
    }

    #[test]
    fn tombstones_round_trip_and_a_corrupt_version_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let seg = SegmentData::from_batch(3, batch(100, 2), Metric::L2).unwrap();
        write_segment(dir.path(), &seg).unwrap();
        let mut del = Bitset::new_empty(100);
        del.insert(5);
        del.insert(99);
        let crc = write_tombstones(dir.path(), 3, 12, &del).unwrap();
        assert_eq!(load_tombstones(dir.path(), 3, 12, crc, 100).unwrap(), del);
        assert!(load_tombstones(dir.path(), 3, 12, crc ^ 1, 100).is_err());
        remove_strays(dir.path(), &[]).unwrap();
        assert!(!segment_dir(dir.path(), 3).exists());
    }
}
