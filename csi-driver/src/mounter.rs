//! The `Mounter` seam between CSI logic and the host: JuiceFS format/mount/quota, bind mounts,
//! unmounts and mount health.
//!
//! Owns: spawning `juicefs` (each `juicefs mount` in its own session via `setsid(2)`, so a
//! restart of shoal-csi or a signal to its process group does not take the mounts down),
//! waiting for a mount to appear in `/proc/self/mountinfo`, and classifying a mount point as
//! healthy, dead (`ENOTCONN`) or absent, and readying a mount point for a new client (what the
//! mount pod does first). Must not know CSI messages, volume bookkeeping or Kubernetes (pod mode
//! lives in [`crate::mountpod`]).
//! Blocking by design: callers run it on `spawn_blocking`.
#![allow(unsafe_code)]

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::mount::{MntFlags, MsFlags};

use crate::error::CsiError;
use crate::mountinfo::{self, MountEntry};
use crate::secrets::{JuiceFsSecrets, fnv1a64};

/// What a path currently is, seen from the mount table and the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountState {
    /// Not a mount point.
    NotMounted,
    /// A mount point whose filesystem answers.
    Healthy(MountEntry),
    /// A mount point whose FUSE daemon is gone (`ENOTCONN`) or that errors on `statfs`.
    Dead(MountEntry),
}

/// Host operations the CSI services need. Implementations must be idempotent where noted.
pub trait Mounter: Send + Sync + 'static {
    /// Checks that the `juicefs` binary runs. Errors: a human-readable reason.
    fn probe(&self) -> Result<(), String>;
    /// `juicefs format --no-update`: creates the filesystem when new, leaves an existing one
    /// alone (idempotent).
    fn format(&self, secrets: &JuiceFsSecrets) -> Result<(), CsiError>;
    /// Mounts the whole filesystem at `at` with a `juicefs mount` in its own session; returns
    /// once the mount is in the mount table. `flags` are extra `--key=value` mount options.
    fn mount_fs(
        &self,
        secrets: &JuiceFsSecrets,
        at: &Path,
        flags: &[String],
    ) -> Result<(), CsiError>;
    /// Sets a hard capacity quota (rounded up to GiB) on a directory of the filesystem.
    fn set_quota(
        &self,
        secrets: &JuiceFsSecrets,
        dir_in_fs: &str,
        capacity_bytes: u64,
    ) -> Result<(), CsiError>;
    /// Bind-mounts `source` onto `target` (made read-only when asked).
    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<(), CsiError>;
    /// Unmounts `path`; `lazy` detaches even a dead or busy mount. Not mounted is success.
    fn unmount(&self, path: &Path, lazy: bool) -> Result<(), CsiError>;
    /// The current mount table.
    fn mounts(&self) -> Result<Vec<MountEntry>, CsiError>;
    /// Classifies `path`.
    fn state(&self, path: &Path) -> Result<MountState, CsiError> {
        let table = self.mounts()?;
        Ok(classify(&table, path))
    }
    /// Stops whatever keeps serving the filesystem mounted at `at` by [`Mounter::mount_fs`],
    /// before the driver unmounts it for good (pod mode: deletes the mount pod, whose restart
    /// policy would otherwise mount again, and its Secret). Nothing to stop is success.
    /// The default has nothing to stop: unmounting ends a `juicefs mount` process.
    fn release_fs(&self, _at: &Path) -> Result<(), CsiError> {
        Ok(())
    }
    /// True when whatever serves the mount at `at` clears a dead mount there and mounts again
    /// by itself (pod mode: the mount pod's restart does). The driver then leaves a dead
    /// staging mount alone and waits in [`Mounter::mount_fs`], instead of detaching it from
    /// under the restarting client (which could detach the fresh mount instead).
    fn replaces_dead_mounts(&self, _at: &Path) -> bool {
        false
    }
}

/// The `juicefs mount` arguments (after the binary) shared by process and pod mode: the client
/// runs in the foreground, credentials come from the environment ([`JuiceFsSecrets::child_env`]),
/// and `--check-storage` makes it write, read and delete a test object before mounting, so
/// wrong object storage credentials fail the mount with the store's answer instead of
/// mounting a filesystem whose every read and upload then fails.
pub fn juicefs_mount_args(
    secrets: &JuiceFsSecrets,
    cache_dir: &Path,
    flags: &[String],
    at: &Path,
) -> Vec<String> {
    let mut args = vec![
        "mount".to_string(),
        "--no-usage-report".to_string(),
        "--metrics=127.0.0.1:0".to_string(),
        format!("--cache-dir={}", cache_dir.display()),
        "--check-storage".to_string(),
    ];
    args.extend(flags.iter().cloned());
    args.push(secrets.meta_url().without_password);
    args.push(at.display().to_string());
    args
}

/// Readies `at` for a new `juicefs mount` (the mount pod's first step): a dead mount left there
/// by a client that crashed (`ENOTCONN`) is detached lazily, and a missing directory created.
/// Returns what was found there.
///
/// Errors: reading the mount table, the lazy unmount or creating the directory failed.
pub fn prepare_mount_point(at: &Path) -> Result<MountState, CsiError> {
    let table = mountinfo::read_self().map_err(|source| CsiError::Io {
        action: "read",
        path: PathBuf::from("/proc/self/mountinfo"),
        source,
    })?;
    let found = classify(&table, at);
    if let MountState::Dead(_) = &found {
        match nix::mount::umount2(at, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
            Err(e) => {
                return Err(CsiError::Unmount {
                    path: at.to_path_buf(),
                    source: std::io::Error::from(e),
                });
            }
        }
    }
    fs::create_dir_all(at).map_err(|source| CsiError::Io {
        action: "create mount point",
        path: at.to_path_buf(),
        source,
    })?;
    Ok(found)
}

/// Classifies `path` against a mount table using `statfs(2)`, which always reaches the FUSE
/// daemon (a plain `stat` can be answered from the kernel's attribute cache after it died).
pub fn classify(table: &[MountEntry], path: &Path) -> MountState {
    match mountinfo::find(table, path) {
        None => MountState::NotMounted,
        Some(entry) => match nix::sys::statvfs::statvfs(path) {
            Ok(_) => MountState::Healthy(entry.clone()),
            Err(_) => MountState::Dead(entry.clone()),
        },
    }
}

/// The real implementation: the `juicefs` binary and Linux mount(2).
#[derive(Debug, Clone)]
pub struct JuiceFsMounter {
    binary: PathBuf,
    state_dir: PathBuf,
    mount_timeout: Duration,
    exited: Arc<tokio::sync::Notify>,
}

impl JuiceFsMounter {
    /// A mounter running `binary`, keeping logs and cache under `state_dir`.
    pub fn new(binary: PathBuf, state_dir: PathBuf) -> Self {
        Self {
            binary,
            state_dir,
            mount_timeout: Duration::from_secs(60),
            exited: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Notified whenever a `juicefs mount` this process started exits (the watchdog listens).
    pub fn exit_notify(&self) -> Arc<tokio::sync::Notify> {
        self.exited.clone()
    }

    fn log_path(&self, at: &Path) -> PathBuf {
        self.state_dir.join("logs").join(format!(
            "mount-{:016x}.log",
            fnv1a64(at.as_os_str().as_encoded_bytes())
        ))
    }

    /// Runs a short `juicefs` command (format, quota) to completion, killing it after
    /// [`COMMAND_TIMEOUT`]: an object store that accepts connections but never answers must not
    /// hang the CSI call.
    fn run(&self, what: &str, secrets: &JuiceFsSecrets, args: &[String]) -> Result<(), String> {
        let mut child = Command::new(&self.binary)
            .args(args)
            .envs(secrets.child_env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        // Drain stderr on a thread so a chatty child never blocks on a full pipe.
        let stderr = child.stderr.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut text = Vec::new();
                let _ = pipe.read_to_end(&mut text);
                String::from_utf8_lossy(&text).to_string()
            })
        });
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(format!("waiting for {what}: {e}")),
            }
        };
        let stderr = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
        let detail = match status {
            Some(status) if status.success() => return Ok(()),
            Some(status) => format!("{what} exited with {status}: {}", juicefs_failure(&stderr)),
            None => format!(
                "{what} did not finish within {COMMAND_TIMEOUT:?} (is the object storage \
                 reachable?): {}",
                juicefs_failure(&stderr)
            ),
        };
        Err(secrets.scrubber().scrub(&detail))
    }
}

/// How long `juicefs format` or `juicefs quota` may run. Format retries a failing object store
/// three times (about 12 s against a store that refuses the credentials).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// What a failed `juicefs` run said, for a CSI error: its last `<FATAL>`/`<ERROR>` line (cut
/// before the source location) and the object store's status and error code lines (an Azure
/// or S3 answer spans many lines, and its last ones are only request ids); the last lines when
/// it said neither.
pub(crate) fn juicefs_failure(text: &str) -> String {
    let mut picked: Vec<String> = Vec::new();
    if let Some(l) = text
        .lines()
        .rev()
        .find(|l| l.contains("<FATAL>") || l.contains("<ERROR>"))
    {
        let from = l.find("<FATAL>").or_else(|| l.find("<ERROR>")).unwrap_or(0);
        let l = &l[from..];
        let l = l.rsplit_once(" [").map_or(l, |(msg, _)| msg);
        picked.push(l.trim().to_string());
    }
    for l in text.lines().map(str::trim) {
        let answer = l.starts_with("RESPONSE ") || l.starts_with("ERROR CODE:");
        if answer && !picked.iter().any(|p| p == l) {
            picked.push(l.to_string());
        }
        if picked.len() >= 4 {
            break;
        }
    }
    if picked.is_empty() {
        last_lines(text, 3)
    } else {
        picked.join(" | ")
    }
}

/// The last `n` non-empty lines of `text`, joined with ` | `.
pub(crate) fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

fn tail_of_file(path: &Path, bytes: u64) -> String {
    let mut s = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(bytes)));
        let _ = f.read_to_string(&mut s);
    }
    juicefs_failure(&s)
}

impl Mounter for JuiceFsMounter {
    fn probe(&self) -> Result<(), String> {
        let out = Command::new(&self.binary)
            .arg("version")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} version exited with {}",
                self.binary.display(),
                out.status
            ))
        }
    }

    fn format(&self, secrets: &JuiceFsSecrets) -> Result<(), CsiError> {
        let mut args = vec!["format".to_string(), "--no-update".to_string()];
        args.extend(secrets.format_args());
        args.push(secrets.meta_url().without_password);
        args.push(secrets.name.clone());
        self.run("juicefs format", secrets, &args)
            .map_err(|detail| CsiError::Format {
                fs: secrets.name.clone(),
                detail,
            })
    }

    fn mount_fs(
        &self,
        secrets: &JuiceFsSecrets,
        at: &Path,
        flags: &[String],
    ) -> Result<(), CsiError> {
        let fail = |detail: String| CsiError::Mount {
            fs: secrets.name.clone(),
            path: at.to_path_buf(),
            detail,
        };
        let io = |action: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| CsiError::Io {
                action,
                path,
                source,
            }
        };
        fs::create_dir_all(at).map_err(io("create mount point", at))?;
        let log = self.log_path(at);
        if let Some(dir) = log.parent() {
            fs::create_dir_all(dir).map_err(io("create log dir", dir))?;
        }
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io("open log", &log))?;
        let log_err = log_file.try_clone().map_err(io("open log", &log))?;
        let cache = self.state_dir.join("cache");
        let mut cmd = Command::new(&self.binary);
        cmd.args(juicefs_mount_args(secrets, &cache, flags, at))
            .envs(secrets.child_env())
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err);
        // SAFETY: `setsid` is async-signal-safe and touches no memory of the parent; it runs in
        // the forked child before exec, as pre_exec requires.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| fail(format!("cannot run {}: {e}", self.binary.display())))?;
        let deadline = Instant::now() + self.mount_timeout;
        loop {
            let table = self.mounts()?;
            if mountinfo::find(&table, at).is_some_and(|e| e.is_juicefs()) {
                break;
            }
            match child.try_wait() {
                Ok(Some(status)) => {
                    return Err(fail(secrets.scrubber().scrub(&format!(
                        "juicefs mount exited with {status}: {}",
                        tail_of_file(&log, 16 * 1024)
                    ))));
                }
                Ok(None) => {}
                Err(e) => return Err(fail(format!("waiting for juicefs mount: {e}"))),
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!(
                    "not mounted after {:?}: {}",
                    self.mount_timeout,
                    secrets.scrubber().scrub(&tail_of_file(&log, 16 * 1024))
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Reap the supervisor when it ends and wake the watchdog; the process itself lives on
        // in its own session if shoal-csi goes away first.
        let exited = self.exited.clone();
        std::thread::spawn(move || {
            let _ = child.wait();
            exited.notify_one();
        });
        Ok(())
    }

    fn set_quota(
        &self,
        secrets: &JuiceFsSecrets,
        dir_in_fs: &str,
        capacity_bytes: u64,
    ) -> Result<(), CsiError> {
        const GIB: u64 = 1 << 30;
        let gib = capacity_bytes.div_ceil(GIB).max(1);
        let args = vec![
            "quota".to_string(),
            "set".to_string(),
            secrets.meta_url().without_password,
            format!("--path={dir_in_fs}"),
            format!("--capacity={gib}"),
        ];
        self.run("juicefs quota set", secrets, &args)
            .map_err(|detail| CsiError::Quota {
                path: dir_in_fs.to_string(),
                detail,
            })
    }

    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<(), CsiError> {
        let bind_err = |e: nix::Error| CsiError::Bind {
            source_path: source.to_path_buf(),
            target: target.to_path_buf(),
            source: std::io::Error::from(e),
        };
        fs::create_dir_all(target).map_err(|source| CsiError::Io {
            action: "create target",
            path: target.to_path_buf(),
            source,
        })?;
        nix::mount::mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(bind_err)?;
        if read_only {
            let flags = MsFlags::MS_BIND
                | MsFlags::MS_REMOUNT
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV;
            if let Err(e) =
                nix::mount::mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
            {
                // Never leave a writable bind behind a failed read-only request.
                let _ = nix::mount::umount2(target, MntFlags::MNT_DETACH);
                return Err(bind_err(e));
            }
        }
        Ok(())
    }

    fn unmount(&self, path: &Path, lazy: bool) -> Result<(), CsiError> {
        let flags = if lazy {
            MntFlags::MNT_DETACH
        } else {
            MntFlags::empty()
        };
        match nix::mount::umount2(path, flags) {
            Ok(()) => Ok(()),
            // Not a mount point, or the path is gone: already unmounted.
            Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => Ok(()),
            Err(e) => Err(CsiError::Unmount {
                path: path.to_path_buf(),
                source: std::io::Error::from(e),
            }),
        }
    }

    fn mounts(&self) -> Result<Vec<MountEntry>, CsiError> {
        mountinfo::read_self().map_err(|source| CsiError::Io {
            action: "read",
            path: PathBuf::from("/proc/self/mountinfo"),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_juicefs_failure_is_summarised_by_its_fatal_line_and_the_stores_answer() {
        let log = "2026/12/07 01:06:47.7 juicefs[1] <INFO>: Data use wasb://jfs/fs1/ [mount@mount.go:620]
2026/12/07 01:06:59.8 juicefs[1] <FATAL>: Failed to create bucket wasb://jfs/fs1/: PUT http://127.0.0.1:1/devstoreaccount1/jfs
--------------------------------------------------------------------------------
RESPONSE 403: 403 Server failed to authenticate the request.
ERROR CODE: AuthorizationFailure
--------------------------------------------------------------------------------
RequestId:0346931c
Time:2026-12-07T01:03:31.065Z</Message>
-------------------------------------------------------------------------------- [format@format.go:574]
";
        assert_eq!(
            juicefs_failure(log),
            "<FATAL>: Failed to create bucket wasb://jfs/fs1/: PUT \
             http://127.0.0.1:1/devstoreaccount1/jfs | RESPONSE 403: 403 Server failed to \
             authenticate the request. | ERROR CODE: AuthorizationFailure"
        );
        assert_eq!(juicefs_failure("a\n\nb\nc\nd\n"), "b | c | d");
    }

    #[test]
    fn probe_reports_a_missing_juicefs_binary() {
        let m = JuiceFsMounter::new("/nonexistent/juicefs".into(), std::env::temp_dir());
        let err = m.probe().unwrap_err();
        assert!(err.contains("/nonexistent/juicefs"), "{err}");
    }

    #[test]
    fn a_path_that_is_not_a_mount_point_is_not_mounted() {
        let table = mountinfo::read_self().unwrap_or_default();
        assert_eq!(
            classify(&table, Path::new("/definitely/not/mounted")),
            MountState::NotMounted
        );
    }
}
