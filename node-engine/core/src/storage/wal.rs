//! Write-ahead log of one collection: length-prefixed, CRC-checked records, each with a
//! monotonically increasing sequence number, in files `wal/<first-seq>.log`.
//!
//! Guarantees: [`WalWriter::append`] returns only after the records are written and
//! `fdatasync`ed, so one call is one group commit for every op in it. Replay skips records with
//! `seq <= after` (they are already in committed segments), so replaying twice is harmless.
//! A torn record at the tail of the newest file (a crash mid-write, never acknowledged) is cut
//! off; a bad record anywhere else is corruption and an error. Knows nothing of segments, the
//! metadata store or the network.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// A batch of rows as logged and as held by the growing buffer (columnar).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RowBatch {
    pub dim: usize,
    pub ids: Vec<i64>,
    /// `ids.len() * dim` floats, row-major.
    pub vectors: Vec<f32>,
    /// Per row: the dynamic fields as a compact JSON object, empty when the row has none.
    pub fields: Vec<Vec<u8>>,
}

impl RowBatch {
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            ..Default::default()
        }
    }
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    pub fn vector(&self, i: usize) -> &[f32] {
        &self.vectors[i * self.dim..(i + 1) * self.dim]
    }
}

/// One logged operation. An upsert replaces any live row with the same id.
#[derive(Debug, Clone, PartialEq)]
pub enum WalOp {
    Upsert(RowBatch),
    Delete(Vec<i64>),
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("failed to {action} WAL file {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("WAL file {path} is corrupt at byte {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> WalError + 'a {
    move |source| WalError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

const KIND_UPSERT: u8 = 1;
const KIND_DELETE: u8 = 2;
const HEADER: usize = 8;
/// Encode-buffer capacity kept between appends: a group of bulk inserts (4 x 10,000 rows of
/// 128-d is ~21 MB) reuses it instead of mapping fresh pages each time; a one-off larger
/// group is not kept.
const KEEP_BUF_BYTES: usize = 32 << 20;

fn encode(seq: u64, op: &WalOp, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER]);
    out.extend_from_slice(&seq.to_le_bytes());
    match op {
        WalOp::Upsert(b) => {
            out.push(KIND_UPSERT);
            out.extend_from_slice(&(b.ids.len() as u32).to_le_bytes());
            out.extend_from_slice(&(b.dim as u32).to_le_bytes());
            for id in &b.ids {
                out.extend_from_slice(&id.to_le_bytes());
            }
            for v in &b.vectors {
                out.extend_from_slice(&v.to_le_bytes());
            }
            for f in &b.fields {
                out.extend_from_slice(&(f.len() as u32).to_le_bytes());
                out.extend_from_slice(f);
            }
        }
        WalOp::Delete(ids) => {
            out.push(KIND_DELETE);
            out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
            for id in ids {
                out.extend_from_slice(&id.to_le_bytes());
            }
        }
    }
    let body_len = (out.len() - start - HEADER) as u32;
    let crc = crc32fast::hash(&out[start + HEADER..]);
    out[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or("record body too short")?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}

fn decode(body: &[u8]) -> Result<(u64, WalOp), String> {
    let mut c = Cursor { buf: body, pos: 0 };
    let seq = c.u64()?;
    let kind = c.take(1)?[0];
    let op = match kind {
        KIND_UPSERT => {
            let n = c.u32()? as usize;
            let dim = c.u32()? as usize;
            let mut b = RowBatch::new(dim);
            b.ids = c
                .take(n * 8)?
                .chunks_exact(8)
                .map(|x| i64::from_le_bytes(x.try_into().unwrap_or([0; 8])))
                .collect();
            b.vectors = c
                .take(n * dim * 4)?
                .chunks_exact(4)
                .map(|x| f32::from_le_bytes(x.try_into().unwrap_or([0; 4])))
                .collect();
            for _ in 0..n {
                let l = c.u32()? as usize;
                b.fields.push(c.take(l)?.to_vec());
            }
            WalOp::Upsert(b)
        }
        KIND_DELETE => {
            let n = c.u32()? as usize;
            WalOp::Delete(
                c.take(n * 8)?
                    .chunks_exact(8)
                    .map(|x| i64::from_le_bytes(x.try_into().unwrap_or([0; 8])))
                    .collect(),
            )
        }
        k => return Err(format!("unknown record kind {k}")),
    };
    if c.pos != body.len() {
        return Err("trailing bytes in record".into());
    }
    Ok((seq, op))
}

fn wal_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, WalError> {
    let mut files = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(files),
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    for e in rd {
        let e = e.map_err(io_err("list", dir))?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if let Some(first) = name
            .strip_suffix(".log")
            .and_then(|stem| stem.parse::<u64>().ok())
        {
            files.push((first, e.path()));
        }
    }
    files.sort();
    Ok(files)
}

/// Everything replay found: the ops newer than `after` in order, and the highest sequence seen.
#[derive(Debug, Default)]
pub struct Replay {
    pub ops: Vec<(u64, WalOp)>,
    pub last_seq: u64,
}

/// Read every WAL file in `dir`, returning ops with `seq > after`.
///
/// Errors: `Corrupt` when a record other than the newest file's tail fails its checksum.
pub fn replay(dir: &Path, after: u64) -> Result<Replay, WalError> {
    let files = wal_files(dir)?;
    let mut out = Replay {
        ops: Vec::new(),
        last_seq: after,
    };
    let n = files.len();
    for (i, (_, path)) in files.iter().enumerate() {
        let mut buf = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut buf))
            .map_err(io_err("read", path))?;
        let mut pos = 0usize;
        let mut bad: Option<String> = None;
        while pos < buf.len() {
            if buf.len() - pos < HEADER {
                bad = Some("truncated header".into());
                break;
            }
            let len =
                u32::from_le_bytes([buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]]) as usize;
            let crc = u32::from_le_bytes([buf[pos + 4], buf[pos + 5], buf[pos + 6], buf[pos + 7]]);
            let Some(body) = buf.get(pos + HEADER..pos + HEADER + len) else {
                bad = Some("truncated body".into());
                break;
            };
            if crc32fast::hash(body) != crc {
                bad = Some("checksum mismatch".into());
                break;
            }
            match decode(body) {
                Ok((seq, op)) => {
                    out.last_seq = out.last_seq.max(seq);
                    if seq > after {
                        out.ops.push((seq, op));
                    }
                }
                Err(reason) => {
                    bad = Some(reason);
                    break;
                }
            }
            pos += HEADER + len;
        }
        if let Some(reason) = bad {
            if i + 1 == n {
                // Torn tail of the newest file: never acknowledged (fsync had not returned). Cut it.
                tracing::warn!(path = %path.display(), offset = pos, %reason, "cutting torn WAL tail");
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(io_err("open", path))?;
                f.set_len(pos as u64).map_err(io_err("truncate", path))?;
                f.sync_all().map_err(io_err("fsync", path))?;
            } else {
                return Err(WalError::Corrupt {
                    path: path.clone(),
                    offset: pos as u64,
                    reason,
                });
            }
        }
    }
    Ok(out)
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// Appends records; owned by one committer at a time (the collection's write side).
#[derive(Debug)]
pub struct WalWriter {
    dir: PathBuf,
    file: File,
    path: PathBuf,
    next_seq: u64,
    buf: Vec<u8>,
    bytes_written: u64,
    /// Length of the file up to the last fully appended group.
    len: u64,
    /// Set when a failed append could not be rolled back: nothing more may be appended.
    poisoned: bool,
}

impl WalWriter {
    /// Start a fresh file whose first record will carry `next_seq`.
    pub fn open(dir: &Path, next_seq: u64) -> Result<Self, WalError> {
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        let path = dir.join(format!("{next_seq:020}.log"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        let len = file.metadata().map_err(io_err("stat", &path))?.len();
        sync_dir(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            file,
            path,
            next_seq,
            buf: Vec::new(),
            bytes_written: 0,
            len,
            poisoned: false,
        })
    }

    /// Sequence number the next record will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Total bytes appended since this writer opened (for metrics).
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// Append `ops` as consecutive records and fsync once. Returns the first sequence number.
    ///
    /// Errors: on a failed write or fsync the file is cut back to its previous length, so a
    /// partial group never sits between acknowledged records; if even that fails the writer
    /// refuses every later append (a restart recovers from what is durable).
    pub fn append(&mut self, ops: &[&WalOp]) -> Result<u64, WalError> {
        if self.poisoned {
            return Err(WalError::Io {
                action: "append to (after an unrecoverable earlier failure)",
                path: self.path.clone(),
                source: io::Error::other("WAL writer is poisoned"),
            });
        }
        let first = self.next_seq;
        self.buf.clear();
        for (i, op) in ops.iter().enumerate() {
            encode(first + i as u64, op, &mut self.buf);
        }
        let res = self
            .file
            .write_all(&self.buf)
            .map_err(io_err("append to", &self.path))
            .and_then(|()| self.file.sync_data().map_err(io_err("fsync", &self.path)));
        if let Err(e) = res {
            if self
                .file
                .set_len(self.len)
                .and_then(|()| self.file.sync_data())
                .is_err()
            {
                self.poisoned = true;
            }
            return Err(e);
        }
        self.len += self.buf.len() as u64;
        self.next_seq += ops.len() as u64;
        self.bytes_written += self.buf.len() as u64;
        // Do not keep the buffer of an unusually large group.
        if self.buf.capacity() > KEEP_BUF_BYTES {
            self.buf = Vec::new();
        }
        Ok(first)
    }

    /// Continue in a new file so everything before it can be removed once committed.
    pub fn rotate(&mut self) -> Result<(), WalError> {
        *self = Self::open(&self.dir, self.next_seq)?;
        Ok(())
    }

    /// Remove files holding only records with `seq <= upto` (never the file being written).
    pub fn remove_upto(&self, upto: u64) -> Result<(), WalError> {
        let files = wal_files(&self.dir)?;
        for w in files.windows(2) {
            let ((_, path), (next_first, _)) = (&w[0], &w[1]);
            if next_first.saturating_sub(1) <= upto && *path != self.path {
                fs::remove_file(path).map_err(io_err("remove", path))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(ids: &[i64]) -> RowBatch {
        RowBatch {
            dim: 2,
            ids: ids.to_vec(),
            vectors: ids.iter().flat_map(|&i| [i as f32, -(i as f32)]).collect(),
            fields: ids
                .iter()
                .map(|i| format!("{{\"k\":{i}}}").into_bytes())
                .collect(),
        }
    }

    #[test]
    fn replay_returns_only_records_after_the_flushed_sequence_and_is_repeatable() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = WalWriter::open(dir.path(), 1).unwrap();
        let a = WalOp::Upsert(batch(&[1, 2]));
        let b = WalOp::Delete(vec![1]);
        assert_eq!(w.append(&[&a, &b]).unwrap(), 1);
        w.rotate().unwrap();
        let c = WalOp::Upsert(batch(&[3]));
        assert_eq!(w.append(&[&c]).unwrap(), 3);
        let r = replay(dir.path(), 1).unwrap();
        assert_eq!(r.ops, vec![(2, b.clone()), (3, c.clone())]);
        assert_eq!(r.last_seq, 3);
        let again = replay(dir.path(), 1).unwrap();
        assert_eq!(again.ops, r.ops);
        w.remove_upto(2).unwrap();
        assert_eq!(replay(dir.path(), 0).unwrap().ops, vec![(3, c)]);
    }

    #[test]
    fn torn_tail_is_cut_but_corruption_in_an_older_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = WalWriter::open(dir.path(), 1).unwrap();
        w.append(&[&WalOp::Upsert(batch(&[1]))]).unwrap();
        let path = w.path.clone();
        drop(w);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        let r = replay(dir.path(), 0).unwrap();
        assert_eq!(r.ops.len(), 1);
        assert_eq!(replay(dir.path(), 0).unwrap().ops.len(), 1);
        // Flip a byte of the first file's record, then add a newer file: now it is corruption.
        let mut bytes = fs::read(&path).unwrap();
        bytes[HEADER + 3] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let mut w2 = WalWriter::open(dir.path(), 2).unwrap();
        w2.append(&[&WalOp::Delete(vec![1])]).unwrap();
        assert!(matches!(
            replay(dir.path(), 0),
            Err(WalError::Corrupt { .. })
        ));
    }
}
