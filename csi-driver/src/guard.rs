//! Per-volume admission: at most one CSI call per volume id at a time.
//!
//! The spec lets a plugin answer a second in-flight call on the same volume with `ABORTED`
//! ("Operation pending for volume"); the CO retries with back-off. Owns only the in-flight set;
//! must not block (a waiting queue would let a slow mount pile up calls).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::CsiError;

/// The set of volume ids with a call in flight.
#[derive(Debug, Clone, Default)]
pub struct VolumeGuard {
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Held while a call works on a volume; releases the volume on drop (also on panic).
#[derive(Debug)]
pub struct VolumeLease {
    busy: Arc<Mutex<HashSet<String>>>,
    volume_id: String,
}

impl VolumeGuard {
    /// Takes the volume, or fails at once.
    ///
    /// Errors: [`CsiError::OperationInProgress`] when another call holds it.
    pub fn try_acquire(&self, volume_id: &str) -> Result<VolumeLease, CsiError> {
        let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        if !busy.insert(volume_id.to_string()) {
            return Err(CsiError::OperationInProgress {
                volume_id: volume_id.to_string(),
            });
        }
        Ok(VolumeLease {
            busy: self.busy.clone(),
            volume_id: volume_id.to_string(),
        })
    }
}

impl Drop for VolumeLease {
    fn drop(&mut self) {
        self.busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.volume_id);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn second_caller_on_the_same_volume_is_aborted_until_the_first_finishes() {
        let g = VolumeGuard::default();
        let lease = g.try_acquire("v1").unwrap();
        assert!(matches!(
            g.try_acquire("v1"),
            Err(CsiError::OperationInProgress { .. })
        ));
        let _other = g.try_acquire("v2").unwrap();
        drop(lease);
        assert!(g.try_acquire("v1").is_ok());
    }
}
