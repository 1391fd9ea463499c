//! A test watchdog: fail loudly instead of letting a hung test run into the CI time limit.

use std::time::Duration;

/// Start a detached thread that, once `limit` has passed, prints which test hung and exits
/// the whole test process with status 1 (so CI fails with output instead of timing out).
/// Call it first in every test that starts processes; it never fires in a test that finishes.
pub fn watchdog(name: &str, limit: Duration) {
    let test = name.to_string();
    let spawned = std::thread::Builder::new()
        .name(format!("watchdog-{name}"))
        .spawn(move || {
            let name = test;
            std::thread::sleep(limit);
            eprintln!(
                "WATCHDOG: test {name} still running after {limit:?}; aborting the test process"
            );
            std::process::exit(1);
        });
    if let Err(e) = spawned {
        eprintln!("WATCHDOG: could not start the watchdog thread for {name}: {e}");
    }
}
