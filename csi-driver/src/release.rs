//! Releasing the controller's own whole-filesystem mounts when it stops.
//!
//! The controller mounts each filesystem once (to create and delete volume directories) with a
//! `juicefs mount` client in its own container. When the controller's process exits, the
//! container runtime kills every process left in its PID namespace, the juicefs clients
//! included. A client killed after it had read a FUSE request and before it answered leaves the
//! thread that sent the request waiting without end: the kernel waits uninterruptibly for the
//! answer to a request already read, and juicefs's supervisor process still holds the
//! connection's device, so the connection is not aborted. Seen on the real node: the pod stuck
//! in `Terminating`, unkillable, until the connection was aborted by hand through fusectl.
//!
//! So before exiting, the controller unmounts each of its mounts for good: a plain unmount
//! (the kernel then ends the connection, and the client exits), or where the mount is busy, an
//! abort of its FUSE connection through fusectl followed by a lazy unmount. Then it waits,
//! bounded, until its child processes are gone, so none is killed mid-request.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::mountinfo::MountEntry;

/// Where the kernel's FUSE control filesystem is (or gets) mounted.
pub const FUSECTL_DIR: &str = "/sys/fs/fuse/connections";

/// How one controller mount was released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Released {
    /// A plain unmount succeeded: the kernel ended the connection.
    Unmounted,
    /// It was busy: its FUSE connection was aborted, then it was detached.
    Aborted,
    /// It could not be released; the reason.
    Failed(String),
}

/// The fusectl directory name of a FUSE mount's connection: the kernel names it after the
/// superblock's device number, `major << 20 | minor` (the kernel's `MKDEV`), from mountinfo's
/// `major:minor`. `None` when the field is malformed.
pub fn fuse_connection_id(major_minor: &str) -> Option<u32> {
    let (major, minor) = major_minor.split_once(':')?;
    let major: u32 = major.parse().ok()?;
    let minor: u32 = minor.parse().ok()?;
    if major >= 1 << 12 || minor >= 1 << 20 {
        return None;
    }
    Some((major << 20) | minor)
}

/// The mounts at or under `dir`, deepest first (the order to unmount them in).
pub fn mounts_under<'a>(table: &'a [MountEntry], dir: &Path) -> Vec<&'a MountEntry> {
    let mut found: Vec<&MountEntry> = table
        .iter()
        .filter(|m| m.mount_point.starts_with(dir))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.mount_point.components().count()));
    found
}

/// Abort the FUSE connection `id` through fusectl, mounting fusectl first when it is not.
fn abort_connection(id: u32) -> Result<(), String> {
    let abort = Path::new(FUSECTL_DIR).join(id.to_string()).join("abort");
    let write = || std::fs::write(&abort, b"1");
    match write() {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // fusectl may simply not be mounted in this container.
            nix::mount::mount(
                Some("fusectl"),
                FUSECTL_DIR,
                Some("fusectl"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|m| format!("fusectl is not mounted and mounting it failed: {m}"))?;
            write().map_err(|e| format!("writing {}: {e}", abort.display()))
        }
        Err(e) => Err(format!("writing {}: {e}", abort.display())),
    }
}

/// Release one mount: a plain unmount, or when that fails an abort of its FUSE connection
/// and a lazy unmount.
pub fn release_mount(m: &MountEntry) -> Released {
    let path = &m.mount_point;
    if nix::mount::umount2(path, nix::mount::MntFlags::empty()).is_ok() {
        return Released::Unmounted;
    }
    let aborted = if m.fs_type.starts_with("fuse") {
        match fuse_connection_id(&m.major_minor) {
            Some(id) => abort_connection(id),
            None => Err(format!("unexpected device number {:?}", m.major_minor)),
        }
    } else {
        Err(format!("not a FUSE mount ({})", m.fs_type))
    };
    match (
        aborted,
        nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH),
    ) {
        (Ok(()), Ok(())) => Released::Aborted,
        (Ok(()), Err(e)) => Released::Failed(format!("aborted, then detaching failed: {e}")),
        (Err(a), Ok(())) => Released::Failed(format!(
            "busy; detached, but its connection was not aborted: {a}"
        )),
        (Err(a), Err(e)) => Released::Failed(format!("busy; abort failed ({a}); detach: {e}")),
    }
}

/// Release every mount at or under `dir` (deepest first), then wait up to `wait` until this
/// process has no live child process left (the juicefs clients exit once their mount is
/// gone). Returns each mount's path and outcome, and whether the children were all gone.
pub fn release_mounts_under(
    table: &[MountEntry],
    dir: &Path,
    wait: Duration,
) -> (Vec<(PathBuf, Released)>, bool) {
    let outcomes = mounts_under(table, dir)
        .into_iter()
        .map(|m| (m.mount_point.clone(), release_mount(m)))
        .collect();
    let deadline = Instant::now() + wait;
    loop {
        if live_children().is_empty() {
            return (outcomes, true);
        }
        if Instant::now() >= deadline {
            return (outcomes, false);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Pids of this process's children that have not exited (zombies are gone already: their
/// parent just has not collected the status).
pub fn live_children() -> Vec<i32> {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
            let rest = &stat[stat.rfind(')')? + 1..];
            let mut fields = rest.split_whitespace();
            let state = fields.next()?;
            let ppid = fields.next()?;
            (ppid == me && state != "Z" && state != "X").then_some(pid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(point: &str, dev: &str) -> MountEntry {
        let line = format!(
            "36 35 {dev} / {point} rw,relatime shared:1 - fuse.juicefs JuiceFS:x rw,user_id=0"
        );
        crate::mountinfo::parse(&line)
            .expect("parse")
            .pop()
            .expect("one entry")
    }

    #[test]
    fn the_connection_id_is_the_kernels_device_number() {
        assert_eq!(fuse_connection_id("0:42"), Some(42));
        assert_eq!(fuse_connection_id("0:1048575"), Some(1_048_575));
        assert_eq!(fuse_connection_id("8:1"), Some((8 << 20) | 1));
        for bad in ["", "42", "0:", ":1", "a:b", "0:1048576", "4096:0"] {
            assert_eq!(fuse_connection_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn mounts_under_the_directory_come_deepest_first_and_others_are_left_alone() {
        let table = vec![
            entry("/state/controller/fs-a", "0:50"),
            entry("/state/controller/fs-a/inner", "0:51"),
            entry("/state/controllerx", "0:52"),
            entry("/other", "0:53"),
        ];
        let got: Vec<&str> = mounts_under(&table, Path::new("/state/controller"))
            .iter()
            .map(|m| m.major_minor.as_str())
            .collect();
        assert_eq!(got, ["0:51", "0:50"]);
    }
}
