//! A hang guard for multi-process tests: CI has a hard time limit and keeps no output of a run
//! that hits it, so a test that hangs must fail loudly instead.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::Duration;

/// Disarms its watchdog when dropped: keep it alive for the whole test
/// (`let _watchdog = watchdog(..)`), so other tests of the same binary are not cut short.
#[must_use = "the watchdog is disarmed as soon as this guard is dropped"]
#[derive(Debug)]
pub struct Watchdog {
    _disarm: mpsc::Sender<()>,
}

/// Spawns a thread that, if the guard is still alive after `limit`, prints which test hung,
/// kills every descendant process (servers and engines the test started; `Drop` will not run)
/// and exits the test process with status 1.
pub fn watchdog(name: &str, limit: Duration) -> Watchdog {
    let (disarm, armed) = mpsc::channel::<()>();
    let test = name.to_string();
    let spawned = std::thread::Builder::new()
        .name(format!("watchdog-{name}"))
        .spawn(move || {
            if !matches!(
                armed.recv_timeout(limit),
                Err(mpsc::RecvTimeoutError::Timeout)
            ) {
                return;
            }
            eprintln!(
                "WATCHDOG: test {test} still running after {limit:?}; killing its child processes and aborting"
            );
            for pid in descendants(std::process::id()) {
                // The `kill` program keeps this crate free of unsafe code; a failure only means
                // the process is already gone.
                let _ = std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status();
            }
            std::process::exit(1);
        });
    if let Err(e) = spawned {
        eprintln!("WATCHDOG: could not start the watchdog thread for {name}: {e}");
    }
    Watchdog { _disarm: disarm }
}

/// Every process whose parent chain leads to `root` (read from `/proc/*/stat`).
fn descendants(root: u32) -> Vec<u32> {
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // `pid (comm) state ppid ...`; comm may contain spaces, so split after the last ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            out.push(c);
            stack.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spawned_child_is_listed_among_the_descendants() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let found = descendants(std::process::id()).contains(&child.id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(found, "the sleep child was not found under this process");
    }
}
