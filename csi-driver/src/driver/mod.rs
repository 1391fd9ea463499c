//! The CSI logic: what each Controller and Node RPC does, on top of a [`Mounter`].
//!
//! Owns the node's in-memory view of staged volumes (mirrored to [`StateStore`]), the
//! controller's own mounts of each filesystem (to create and delete volume directories), the
//! re-adoption of mounts at start and the watchdog's healing pass. Every method is blocking
//! and follows the same shape: validate → take the per-volume lease → act → return a
//! [`CsiError`] that the gRPC layer maps. Must not know about tonic or sockets.
//!
//! Laid out by service: `controller.rs` (CreateVolume, DeleteVolume,
//! ValidateVolumeCapabilities), `node.rs` (stage, publish, stats, expand, and the watchdog's
//! healing); this module holds the driver's state and configuration they share.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::CsiError;
use crate::guard::VolumeGuard;
use crate::metrics::Metrics;
use crate::mounter::Mounter;
use crate::state::{StagedVolume, StateStore};
use crate::validate::OnDelete;

/// Which services this process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Identity + Node (the DaemonSet).
    Node,
    /// Identity + Controller (the provisioner Deployment).
    Controller,
    /// All three (single-binary setups and tests).
    All,
}

impl Mode {
    /// Serves the Controller service.
    pub fn controller(self) -> bool {
        matches!(self, Mode::Controller | Mode::All)
    }
    /// Serves the Node service.
    pub fn node(self) -> bool {
        matches!(self, Mode::Node | Mode::All)
    }
}

/// Static settings of a driver instance.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's id (NodeGetInfo).
    pub node_id: String,
    /// Durable state, logs, caches and controller mounts live here.
    pub state_dir: PathBuf,
    /// Services served.
    pub mode: Mode,
    /// How often the watchdog checks mounts (it also wakes when a mount process exits).
    pub watchdog_interval: Duration,
    /// NodeGetInfo's `max_volumes_per_node` (positive; see [`DEFAULT_MAX_VOLUMES_PER_NODE`]).
    pub max_volumes_per_node: i64,
}

/// Default of [`Config::max_volumes_per_node`]. The kubelet turns this into the node's
/// attach limit for csi.shoal.dev (`CSINode` allocatable) and logs 0 ("no limit" in the CSI
/// spec) as an invalid attach limit at every registration. The real bound on a node is memory
/// for one JuiceFS client per staged volume and the node's pod limit (110 by default), far
/// below this, so the scheduler never refuses a pod because of it while the kubelet gets a
/// valid value; set `--max-volumes-per-node` lower to cap clients per node.
pub const DEFAULT_MAX_VOLUMES_PER_NODE: i64 = 1024;

/// Bookkeeping the controller keeps beside each volume directory, in `/.shoal-csi/<name>.json`
/// at the filesystem root (outside every volume, so pods never see it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct VolumeMeta {
    name: String,
    capacity_bytes: u64,
    on_delete: OnDelete,
}

const META_DIR: &str = ".shoal-csi";

/// How many times a busy (EBUSY) unmount is tried before detaching lazily.
const BUSY_RETRIES: u32 = 40;
/// Pause between busy unmount attempts.
const BUSY_RETRY_DELAY: Duration = Duration::from_millis(25);

/// How [`Driver::detach_all`] unmounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Detach {
    /// `MNT_DETACH` at once: for dead mounts the watchdog replaces.
    Lazy,
    /// A plain unmount, retried while busy, lazy only as the last resort (unpublish).
    Patiently,
}

/// The driver: configuration, the mounter and all mutable state.
pub struct Driver<M: Mounter> {
    /// Settings.
    pub config: Config,
    /// Host operations.
    pub mounter: Arc<M>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    guard: VolumeGuard,
    store: StateStore,
    staged: Mutex<HashMap<String, StagedVolume>>,
    controller_mounts: Mutex<()>,
}

impl<M: Mounter> std::fmt::Debug for Driver<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CsiError {
    let path = path.to_path_buf();
    move |source| CsiError::Io {
        action,
        path,
        source,
    }
}

impl<M: Mounter> Driver<M> {
    /// Opens the state dir and loads the staged-volume records (no mounting yet; see
    /// [`Driver::reconcile`]).
    pub fn new(config: Config, mounter: Arc<M>, metrics: Arc<Metrics>) -> Result<Self, CsiError> {
        let store = StateStore::open(&config.state_dir)?;
        let staged = store
            .load_all()?
            .into_iter()
            .map(|r| (r.volume_id.clone(), r))
            .collect();
        Ok(Self {
            config,
            mounter,
            metrics,
            guard: VolumeGuard::default(),
            store,
            staged: Mutex::new(staged),
            controller_mounts: Mutex::new(()),
        })
    }

    fn staged(&self) -> std::sync::MutexGuard<'_, HashMap<String, StagedVolume>> {
        self.staged.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Probe: ready when `juicefs` runs and the state dir is writable.
    pub fn probe(&self) -> Result<(), String> {
        self.mounter.probe()?;
        let marker = self.config.state_dir.join(".probe");
        fs::write(&marker, b"ok").map_err(|e| format!("state dir not writable: {e}"))?;
        let _ = fs::remove_file(&marker);
        Ok(())
    }
}

mod controller;
mod node;
#[cfg(test)]
mod testing;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::testing::*;

    #[test]
    fn probe_fails_when_the_state_dir_is_not_writable() {
        let f = fixture();
        assert!(f.driver.probe().is_ok());
        fs::remove_dir_all(f.p("state")).unwrap();
        fs::write(f.p("state"), b"now a file").unwrap();
        assert!(f.driver.probe().is_err());
    }
}
