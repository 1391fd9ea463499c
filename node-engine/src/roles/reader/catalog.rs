//! The reader's side of catalogue-version synchronisation.
//!
//! Every metadata commit has a catalogue version (the lease row's commit sequence, see the
//! writer's `lease::fence`). A reader serves "version V" once it has loaded every segment and
//! tombstone committed up to V. [`VersionGate`] is the reader's served version, advanced by its
//! poller or a push, and awaited by `NotifySegments` / `min_catalog_version` requests. The
//! router's side (push a version to every reader and wait) is `router::fanout::
//! wait_readers_caught_up`.

use std::time::Duration;
use tokio::sync::watch;

/// A reader could not reach the wanted version in time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("catalogue version {wanted} not reached within the deadline (serving {have})")]
pub struct NotCaughtUp {
    pub wanted: u64,
    pub have: u64,
}

/// The version a reader serves; monotonic.
#[derive(Debug)]
pub struct VersionGate {
    tx: watch::Sender<u64>,
}

impl VersionGate {
    pub fn new(initial: u64) -> Self {
        let (tx, _rx) = watch::channel(initial);
        Self { tx }
    }

    pub fn current(&self) -> u64 {
        *self.tx.borrow()
    }

    /// Record that version `v` is served; never moves backwards.
    pub fn advance(&self, v: u64) {
        self.tx.send_if_modified(|cur| {
            if v > *cur {
                *cur = v;
                true
            } else {
                false
            }
        });
    }

    /// Wait until the served version is at least `wanted`.
    ///
    /// Errors: [`NotCaughtUp`] when `timeout` passes first.
    pub async fn wait_for(&self, wanted: u64, timeout: Duration) -> Result<u64, NotCaughtUp> {
        let mut rx = self.tx.subscribe();
        let res = tokio::time::timeout(timeout, rx.wait_for(|v| *v >= wanted)).await;
        match res {
            Ok(Ok(v)) => Ok(*v),
            // The sender lives in `self`, so the channel cannot close while we wait.
            Ok(Err(_)) | Err(_) => Err(NotCaughtUp {
                wanted,
                have: self.current(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn the_gate_only_moves_forward_and_wakes_waiters() {
        let g = Arc::new(VersionGate::new(3));
        g.advance(2);
        assert_eq!(g.current(), 3);
        assert_eq!(g.wait_for(3, Duration::from_millis(1)).await, Ok(3));
        let g2 = g.clone();
        let waiter = tokio::spawn(async move { g2.wait_for(5, Duration::from_secs(10)).await });
        g.advance(4);
        g.advance(6);
        assert_eq!(waiter.await.unwrap(), Ok(6));
        assert_eq!(
            g.wait_for(9, Duration::from_millis(20)).await,
            Err(NotCaughtUp { wanted: 9, have: 6 })
        );
    }
}
