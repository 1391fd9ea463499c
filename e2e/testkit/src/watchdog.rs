//! A last-resort guard for integration tests: if a test is still running after `limit`, print
//! which one hung and exit the process, so CI fails with output instead of timing out silently.

use std::time::Duration;

/// Start a detached watchdog thread for test `name` that exits the process with status 1 once
/// `limit` has passed. Call it first thing in a test; a test that finishes in time leaves the
/// thread parked until the test binary exits.
pub fn watchdog(name: &str, limit: Duration) {
    let name = name.to_string();
    let spawned = std::thread::Builder::new()
        .name(format!("watchdog-{name}"))
        .spawn({
            let name = name.clone();
            move || {
                std::thread::sleep(limit);
                eprintln!("watchdog: test {name} still running after {limit:?}; exiting");
                std::process::exit(1);
            }
        });
    if let Err(e) = spawned {
        eprintln!("watchdog: could not start for {name}: {e}");
    }
}
