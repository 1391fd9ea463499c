//! A per-test watchdog: a test that hangs (a stuck unmount, a wait without an answer) fails CI
//! with its name instead of running CI into its time limit with no output.

use std::sync::mpsc;
use std::time::Duration;

/// Starts a thread that, after `limit`, prints that test `name` hung and exits the whole test
/// process with status 1. Dropping the returned sender (keep it alive for the test's length:
/// `let _watchdog = watchdog(..)`) disarms it.
pub fn watchdog(name: &str, limit: Duration) -> mpsc::Sender<()> {
    let (disarm, rx) = mpsc::channel::<()>();
    let name = name.to_string();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            eprintln!("watchdog: test {name} still running after {limit:?}; exiting with status 1");
            std::process::exit(1);
        }
    });
    disarm
}
