//! A hang guard for integration tests: if the test is still running after `limit`, print which
//! test hung and exit the whole test process with status 1, so CI fails with output instead of
//! running into its global timeout.

use std::time::Duration;

/// Start the guard for test `name`; it never fires if the process ends first.
pub fn watchdog(name: &str, limit: Duration) {
    let name = name.to_string();
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("watchdog: test {name:?} still running after {limit:?}; exiting with failure");
        std::process::exit(1);
    });
}
