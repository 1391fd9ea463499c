//! Readiness checks of the directories a role needs: the filesystem under a directory answers
//! (`statfs`; a dead FUSE mount answers `ENOTCONN`, "Transport endpoint is not connected"), and
//! for a directory the role writes (the writer's WAL), a small file can be created, written,
//! fsynced and removed. `/readyz` runs them; an answer is cached for [`CHECK_EVERY`] so a probe
//! stays cheap, and a check that hangs (a stuck mount) is cut after [`CHECK_TIMEOUT`].
//!
//! They decide readiness only, never liveness: a dead mount takes the pod out of its Services
//! (the router stops sending it work) and shows the cause in `/readyz`, but does not restart
//! the pod, since a restart cannot heal the node's mount (the CSI driver does).
//!
//! Owns no HTTP: the roles put the results in their `/readyz` answers.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a check's answer is reused.
pub const CHECK_EVERY: Duration = Duration::from_secs(3);
/// How long one check may take before the directory counts as not answering (the kubelet's
/// default probe timeout is 1 s for the whole `/readyz` answer).
pub const CHECK_TIMEOUT: Duration = Duration::from_millis(500);

/// What a [`DirProbe`] checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirCheck {
    /// The filesystem answers `statfs` (read-only data directories).
    Filesystem,
    /// The filesystem answers and a file can be written, fsynced and removed (the WAL).
    Writable,
}

/// One directory's readiness check, cached (cheap to clone).
#[derive(Debug, Clone)]
pub struct DirProbe {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    what: &'static str,
    path: PathBuf,
    check: DirCheck,
    last: tokio::sync::Mutex<Option<(Instant, Result<(), String>)>>,
}

impl DirProbe {
    /// A probe of `path`, named `what` in its failure reasons ("WAL directory").
    pub fn new(what: &'static str, path: PathBuf, check: DirCheck) -> Self {
        Self {
            inner: Arc::new(Inner {
                what,
                path,
                check,
                last: tokio::sync::Mutex::new(None),
            }),
        }
    }

    /// `Err(reason)` when the directory cannot serve the role (cached for [`CHECK_EVERY`]).
    pub async fn check(&self) -> Result<(), String> {
        let mut last = self.inner.last.lock().await;
        if let Some((at, r)) = last.as_ref()
            && at.elapsed() < CHECK_EVERY
        {
            return r.clone();
        }
        let (path, check) = (self.inner.path.clone(), self.inner.check);
        let r = match tokio::time::timeout(
            CHECK_TIMEOUT,
            tokio::task::spawn_blocking(move || check_now(&path, check)),
        )
        .await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(format!("check failed to run: {e}")),
            Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
        }
        .map_err(|e| {
            format!(
                "{} {} unusable: {e}",
                self.inner.what,
                self.inner.path.display()
            )
        });
        *last = Some((Instant::now(), r.clone()));
        r
    }
}

fn check_now(path: &Path, check: DirCheck) -> Result<(), String> {
    if check == DirCheck::Writable {
        // The writer creates it on first use anyway; a missing WAL root is not a fault.
        std::fs::create_dir_all(path).map_err(|e| format!("cannot create it: {e}"))?;
    }
    nix::sys::statfs::statfs(path)
        .map_err(|e| format!("filesystem not answering (statfs: {e})"))?;
    if check == DirCheck::Writable {
        let probe = path.join(format!(".shoal-ready-probe-{}", std::process::id()));
        let written = std::fs::File::create(&probe).and_then(|mut f| {
            f.write_all(b"shoal readiness probe\n")?;
            f.sync_all()
        });
        let removed = std::fs::remove_file(&probe);
        written.map_err(|e| format!("cannot write and fsync a file: {e}"))?;
        removed.map_err(|e| format!("cannot remove a file: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_writable_directory_passes_and_one_under_a_regular_file_fails_with_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = DirProbe::new("WAL directory", dir.path().join("wal"), DirCheck::Writable);
        assert_eq!(ok.check().await, Ok(()));
        assert!(
            std::fs::read_dir(dir.path().join("wal"))
                .expect("created")
                .next()
                .is_none(),
            "the probe file is removed"
        );

        // Root ignores permission bits, so make the path impossible instead: its parent is a
        // regular file (ENOTDIR for everyone).
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").expect("write");
        let bad = DirProbe::new("WAL directory", file.join("wal"), DirCheck::Writable);
        let reason = bad.check().await.expect_err("a path under a regular file");
        assert!(reason.contains("WAL directory"), "{reason}");
        assert!(reason.contains("not-a-dir/wal"), "{reason}");
        let gone = DirProbe::new("data directory", file.join("d"), DirCheck::Filesystem);
        let reason = gone.check().await.expect_err("statfs of a missing path");
        assert!(reason.contains("statfs"), "{reason}");
    }

    #[tokio::test]
    async fn an_answer_is_reused_for_the_check_interval() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("mkdir");
        let p = DirProbe::new("data directory", data.clone(), DirCheck::Filesystem);
        assert_eq!(p.check().await, Ok(()));
        std::fs::remove_dir(&data).expect("rmdir");
        assert_eq!(p.check().await, Ok(()), "cached within CHECK_EVERY");
    }
}
