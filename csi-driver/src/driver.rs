//! The CSI logic: what each Controller and Node RPC does, on top of a [`Mounter`].
//!
//! Owns the node's in-memory view of staged volumes (mirrored to [`StateStore`]), the
//! controller's own mounts of each filesystem (to create and delete volume directories), the
//! re-adoption of mounts at start and the watchdog's healing pass. Every method is blocking
//! and follows the same shape: validate → take the per-volume lease → act → return a
//! [`CsiError`] that the gRPC layer maps. Must not know about tonic or sockets.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::csi;
use crate::error::CsiError;
use crate::guard::VolumeGuard;
use crate::metrics::Metrics;
use crate::mounter::{MountState, Mounter};
use crate::secrets::JuiceFsSecrets;
use crate::state::{SecretMap, StagedVolume, StateStore, Target};
use crate::validate::{self, CTX_SUB_PATH, OnDelete};

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

    // ---------------------------------------------------------------- controller

    /// Mounts (once per filesystem, kept) the whole filesystem for the controller.
    fn controller_mount(&self, secrets: &JuiceFsSecrets) -> Result<PathBuf, CsiError> {
        let _one_at_a_time = self
            .controller_mounts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let at = self
            .config
            .state_dir
            .join("controller")
            .join(secrets.fs_key());
        match self.mounter.state(&at)? {
            MountState::Healthy(_) => return Ok(at),
            MountState::Dead(_) => self.mounter.unmount(&at, true)?,
            MountState::NotMounted => {}
        }
        if secrets.wants_format() {
            self.mounter.format(secrets)?;
        }
        self.mounter.mount_fs(secrets, &at, &[])?;
        Ok(at)
    }

    fn read_meta(root: &Path, name: &str) -> Result<Option<VolumeMeta>, CsiError> {
        let path = root.join(META_DIR).join(format!("{name}.json"));
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| CsiError::State {
                    path,
                    detail: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &path)(e)),
        }
    }

    fn write_meta(root: &Path, meta: &VolumeMeta) -> Result<(), CsiError> {
        let dir = root.join(META_DIR);
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let path = dir.join(format!("{}.json", meta.name));
        let tmp = dir.join(format!(".{}.json.tmp", meta.name));
        let bytes = serde_json::to_vec(meta).map_err(|e| CsiError::State {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        fs::write(&tmp, bytes).map_err(io_err("write", &tmp))?;
        fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io_err("fsync", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("rename", &path))
    }

    /// CreateVolume: one directory per volume in the filesystem named by the secret.
    ///
    /// Spec (idempotency): "If a volume corresponding to the specified volume `name` already
    /// exists, is accessible from `accessibility_requirements`, and is compatible with the
    /// specified `capacity_range`, `volume_capabilities`, `parameters` and
    /// `mutable_parameters` in the CreateVolumeRequest, the Plugin MUST reply 0 OK with the
    /// corresponding CreateVolumeResponse." Otherwise `ALREADY_EXISTS`.
    pub fn create_volume(&self, req: csi::CreateVolumeRequest) -> Result<csi::Volume, CsiError> {
        let name = validate::volume_name("name", &req.name)?;
        validate::capabilities(&req.volume_capabilities)?;
        if req.volume_content_source.is_some() {
            return Err(CsiError::UnsupportedCapability {
                reason: "volume_content_source (snapshots/clones are not supported)".into(),
            });
        }
        let capacity_bytes = validate::capacity(req.capacity_range.as_ref())?;
        let on_delete = validate::parameters(&req.parameters)?;
        let secrets = JuiceFsSecrets::from_maps(&req.secrets, &HashMap::new())?;
        let _lease = self.guard.try_acquire(&name)?;
        let root = self.controller_mount(&secrets)?;
        let wanted = VolumeMeta {
            name: name.clone(),
            capacity_bytes,
            on_delete,
        };
        match Self::read_meta(&root, &name)? {
            Some(existing) if existing == wanted => {}
            Some(_) => return Err(CsiError::VolumeExistsIncompatible { name }),
            None => {
                let dir = root.join(&name);
                match fs::create_dir(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io_err("create volume directory", &dir)(e)),
                }
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o777))
                    .map_err(io_err("chmod", &dir))?;
                if capacity_bytes > 0 {
                    self.mounter
                        .set_quota(&secrets, &format!("/{name}"), capacity_bytes)?;
                }
                Self::write_meta(&root, &wanted)?;
                info!(volume_id = %name, capacity_bytes, ?on_delete, "volume created");
            }
        }
        Ok(csi::Volume {
            capacity_bytes: i64::try_from(capacity_bytes).unwrap_or(i64::MAX),
            volume_id: name.clone(),
            volume_context: [(CTX_SUB_PATH.to_string(), name)].into(),
            content_source: None,
            accessible_topology: vec![],
        })
    }

    /// DeleteVolume: removes the volume's directory (or keeps it with `onDelete: retain`).
    ///
    /// Spec (idempotency): "If a volume corresponding to the specified `volume_id` does not
    /// exist or the artifacts associated with the volume do not exist anymore, the Plugin MUST
    /// reply 0 OK."
    pub fn delete_volume(&self, req: csi::DeleteVolumeRequest) -> Result<(), CsiError> {
        let name = validate::volume_name("volume_id", &req.volume_id)?;
        let secrets = JuiceFsSecrets::from_maps(&req.secrets, &HashMap::new())?;
        let _lease = self.guard.try_acquire(&name)?;
        let root = self.controller_mount(&secrets)?;
        let meta = Self::read_meta(&root, &name)?;
        let dir = root.join(&name);
        let retain = meta.as_ref().map(|m| m.on_delete) == Some(OnDelete::Retain);
        if !retain {
            match fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove volume directory", &dir)(e)),
            }
        }
        let meta_path = root.join(META_DIR).join(format!("{name}.json"));
        match fs::remove_file(&meta_path) {
            Ok(()) => info!(volume_id = %name, retain, "volume deleted"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &meta_path)(e)),
        }
        Ok(())
    }

    /// ValidateVolumeCapabilities: confirms when every capability is supported.
    ///
    /// Spec: "If a volume corresponding to the specified `volume_id` does not exist, the Plugin
    /// MUST reply 5 NOT_FOUND"; with no secrets the existence cannot be checked, and only the
    /// capabilities are validated. The call changes nothing, so repeating it is safe.
    pub fn validate_volume_capabilities(
        &self,
        req: csi::ValidateVolumeCapabilitiesRequest,
    ) -> Result<csi::ValidateVolumeCapabilitiesResponse, CsiError> {
        let name = validate::volume_name("volume_id", &req.volume_id)?;
        if req.volume_capabilities.is_empty() {
            return Err(CsiError::MissingField {
                field: "volume_capabilities",
            });
        }
        if !req.secrets.is_empty() {
            let secrets = JuiceFsSecrets::from_maps(&req.secrets, &HashMap::new())?;
            let root = self.controller_mount(&secrets)?;
            let exists = Self::read_meta(&root, &name)?.is_some() || root.join(&name).is_dir();
            if !exists {
                return Err(CsiError::VolumeNotFound { volume_id: name });
            }
        }
        Ok(match validate::capabilities(&req.volume_capabilities) {
            Ok(_) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                    mutable_parameters: HashMap::new(),
                }),
                message: String::new(),
            },
            Err(e) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: e.to_string(),
            },
        })
    }

    // ---------------------------------------------------------------- node

    /// NodeStageVolume: `juicefs format` (when the secret names a storage) and one
    /// `juicefs mount` of the filesystem at the staging path.
    ///
    /// Spec (idempotency): "If the volume corresponding to the `volume_id` has already been
    /// published at the specified `staging_target_path`, and is identical to the specified
    /// `volume_capability` the Plugin MUST reply 0 OK." If it is staged with an incompatible
    /// capability or elsewhere: `ALREADY_EXISTS`. A healthy JuiceFS mount already at the path
    /// (left by a previous run) is adopted, never mounted twice.
    pub fn stage(&self, req: csi::NodeStageVolumeRequest) -> Result<(), CsiError> {
        let volume_id = validate::required("volume_id", &req.volume_id)?.to_string();
        let staging = validate::abs_path("staging_target_path", &req.staging_target_path)?;
        let cap = validate::capability(req.volume_capability.as_ref())?;
        let sub_path = validate::sub_path(&req.volume_context)?;
        let secrets = JuiceFsSecrets::from_maps(&req.secrets, &req.volume_context)?;
        let _lease = self.guard.try_acquire(&volume_id)?;
        if let Some(rec) = self.staged().get(&volume_id).cloned()
            && (rec.staging_path != staging
                || rec.mount_flags != cap.mount_flags
                || rec.sub_path != sub_path)
        {
            return Err(CsiError::VolumeExistsIncompatible { name: volume_id });
        }
        if let Some(other) = self
            .staged()
            .values()
            .find(|r| r.staging_path == staging && r.volume_id != volume_id)
        {
            return Err(CsiError::StagingPathInUse {
                staging,
                other: other.volume_id.clone(),
            });
        }
        match self.mounter.state(&staging)? {
            MountState::Healthy(e) if e.is_juicefs() => {
                info!(volume_id, staging = %staging.display(), "staging mount already present; adopted");
            }
            MountState::Healthy(_) => {
                return Err(CsiError::InvalidField {
                    field: "staging_target_path",
                    reason: "already holds a mount that is not JuiceFS".into(),
                });
            }
            state => {
                // In pod mode the restarting mount pod clears a dead mount itself.
                if matches!(state, MountState::Dead(_))
                    && !self.mounter.replaces_dead_mounts(&staging)
                {
                    self.mounter.unmount(&staging, true)?;
                }
                if secrets.wants_format() {
                    self.mounter.format(&secrets)?;
                }
                self.mounter
                    .mount_fs(&secrets, &staging, &cap.mount_flags)?;
                info!(volume_id, staging = %staging.display(), "staged");
            }
        }
        let rec = StagedVolume {
            volume_id: volume_id.clone(),
            staging_path: staging.clone(),
            sub_path,
            mount_flags: cap.mount_flags,
            secrets: SecretMap(secrets.to_map()),
            targets: self
                .staged()
                .get(&volume_id)
                .map(|r| r.targets.clone())
                .unwrap_or_default(),
        };
        if !rec.bind_source().is_dir() {
            // The volume's directory is missing: it was never created or has been deleted.
            self.mounter.release_fs(&staging)?;
            self.unmount_patiently(&staging)?;
            return Err(CsiError::VolumeNotFound { volume_id });
        }
        self.store.save(&rec)?;
        self.staged().insert(volume_id, rec);
        self.update_mount_gauge();
        Ok(())
    }

    /// NodeUnstageVolume: unmounts the staging JuiceFS mount (only when nothing is published).
    ///
    /// Spec (idempotency): "If the volume corresponding to the `volume_id` is not staged to the
    /// `staging_target_path`, the Plugin MUST reply 0 OK."
    pub fn unstage(&self, req: csi::NodeUnstageVolumeRequest) -> Result<(), CsiError> {
        let volume_id = validate::required("volume_id", &req.volume_id)?.to_string();
        let staging = validate::abs_path("staging_target_path", &req.staging_target_path)?;
        let _lease = self.guard.try_acquire(&volume_id)?;
        let rec = self.staged().get(&volume_id).cloned();
        if let Some(rec) = &rec {
            if rec.staging_path != staging {
                // Staged elsewhere: this staging path holds nothing of this volume.
                return Ok(());
            }
            if !rec.targets.is_empty() {
                return Err(CsiError::StillPublished {
                    volume_id,
                    published: rec.targets.len(),
                });
            }
        }
        // First stop what serves the mount (pod mode: the mount pod, which would mount again).
        self.mounter.release_fs(&staging)?;
        match self.mounter.state(&staging)? {
            MountState::Healthy(e) if e.is_juicefs() => self.unmount_patiently(&staging)?,
            MountState::Dead(e) if e.is_juicefs() => self.mounter.unmount(&staging, true)?,
            MountState::Healthy(_) | MountState::Dead(_) | MountState::NotMounted => {}
        }
        self.store.remove(&volume_id)?;
        if self.staged().remove(&volume_id).is_some() {
            info!(volume_id, "unstaged");
        }
        self.update_mount_gauge();
        Ok(())
    }

    /// NodePublishVolume: bind mount of the volume's directory onto the target.
    ///
    /// Spec (idempotency): "If the volume corresponding to the `volume_id` has already been
    /// published at the specified `target_path`, and is compatible with the specified
    /// `volume_capability` and `readonly` flag, the Plugin MUST reply 0 OK." Incompatible:
    /// `ALREADY_EXISTS`.
    pub fn publish(&self, req: csi::NodePublishVolumeRequest) -> Result<(), CsiError> {
        let volume_id = validate::required("volume_id", &req.volume_id)?.to_string();
        let staging = validate::abs_path("staging_target_path", &req.staging_target_path)?;
        let target = validate::abs_path("target_path", &req.target_path)?;
        let cap = validate::capability(req.volume_capability.as_ref())?;
        let read_only = req.readonly || cap.reader_only;
        let _lease = self.guard.try_acquire(&volume_id)?;
        let not_staged = || CsiError::NotStaged {
            volume_id: volume_id.clone(),
            staging: staging.clone(),
        };
        let mut rec = self
            .staged()
            .get(&volume_id)
            .cloned()
            .filter(|r| r.staging_path == staging)
            .ok_or_else(not_staged)?;
        if !matches!(self.mounter.state(&staging)?, MountState::Healthy(_)) {
            return Err(not_staged());
        }
        if let Some(existing) = rec.targets.get(&target) {
            if existing.read_only != read_only {
                return Err(CsiError::TargetPublishedIncompatible { target });
            }
            match self.mounter.state(&target)? {
                MountState::Healthy(_) => return Ok(()),
                MountState::Dead(_) => self.mounter.unmount(&target, true)?,
                MountState::NotMounted => {}
            }
        } else if let MountState::Healthy(_) | MountState::Dead(_) = self.mounter.state(&target)? {
            return Err(CsiError::TargetPublishedIncompatible { target });
        }
        self.mounter.bind(&rec.bind_source(), &target, read_only)?;
        rec.targets.insert(target.clone(), Target { read_only });
        if let Err(e) = self.store.save(&rec) {
            let _ = self.mounter.unmount(&target, false);
            return Err(e);
        }
        self.staged().insert(volume_id.clone(), rec);
        info!(volume_id, target = %target.display(), read_only, "published");
        Ok(())
    }

    /// NodeUnpublishVolume: unmounts the bind and removes the target directory. A busy bind (a
    /// process still holds a file in it, as happens after the watchdog re-bound a healed
    /// mount) is retried briefly, then detached lazily, so the call still succeeds.
    ///
    /// Spec (idempotency): "If the volume corresponding to the `volume_id` is not mounted at
    /// the specified `target_path`, the Plugin MUST reply 0 OK."
    pub fn unpublish(&self, req: csi::NodeUnpublishVolumeRequest) -> Result<(), CsiError> {
        let volume_id = validate::required("volume_id", &req.volume_id)?.to_string();
        let target = validate::abs_path("target_path", &req.target_path)?;
        let _lease = self.guard.try_acquire(&volume_id)?;
        let ours = self
            .staged()
            .get(&volume_id)
            .is_some_and(|r| r.targets.contains_key(&target));
        let table = self.mounter.mounts()?;
        if ours || crate::mountinfo::find(&table, &target).is_some_and(|e| e.is_juicefs()) {
            self.detach_all(&target, Detach::Patiently)?;
        }
        match fs::remove_dir(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove target", &target)(e)),
        }
        let mut staged = self.staged();
        if let Some(rec) = staged.get_mut(&volume_id)
            && rec.targets.remove(&target).is_some()
        {
            self.store.save(rec)?;
            info!(volume_id, target = %target.display(), "unpublished");
        }
        Ok(())
    }

    /// NodeGetVolumeStats: bytes and inodes of a path where the volume is published or staged.
    ///
    /// Spec: `volume_path` "MUST be an absolute path in the root filesystem of the process
    /// serving this request" and is REQUIRED (absent: `INVALID_ARGUMENT`); "Volume does not
    /// exist | 5 NOT_FOUND | Indicates that a volume corresponding to the specified
    /// `volume_id` does not exist on specified `volume_path`." A relative path, a missing one,
    /// or one that is neither the volume's staging path nor one of its targets holds no volume
    /// of ours: `NOT_FOUND`. Reads only, so repeatable.
    pub fn volume_stats(
        &self,
        req: csi::NodeGetVolumeStatsRequest,
    ) -> Result<Vec<csi::VolumeUsage>, CsiError> {
        let volume_id = validate::required("volume_id", &req.volume_id)?;
        validate::required("volume_path", &req.volume_path)?;
        let path = PathBuf::from(&req.volume_path);
        let not_found = || CsiError::PathNotFound { path: path.clone() };
        if validate::abs_path("volume_path", &req.volume_path).is_err() || !path.exists() {
            return Err(not_found());
        }
        let ours = self
            .staged()
            .get(volume_id)
            .is_some_and(|r| r.staging_path == path || r.targets.contains_key(&path));
        if !ours {
            return Err(CsiError::VolumeNotFound {
                volume_id: volume_id.to_string(),
            });
        }
        let st = nix::sys::statvfs::statvfs(&path).map_err(|e| CsiError::Io {
            action: "statvfs",
            path: path.clone(),
            source: e.into(),
        })?;
        let frsize = st.fragment_size() as i128;
        let clamp = |v: i128| i64::try_from(v.max(0)).unwrap_or(i64::MAX);
        let total = st.blocks() as i128 * frsize;
        let avail = st.blocks_available() as i128 * frsize;
        let free = st.blocks_free() as i128 * frsize;
        let files = st.files() as i128;
        let files_free = st.files_free() as i128;
        Ok(vec![
            csi::VolumeUsage {
                available: clamp(avail),
                total: clamp(total),
                used: clamp(total - free),
                unit: csi::volume_usage::Unit::Bytes as i32,
            },
            csi::VolumeUsage {
                available: clamp(files_free),
                total: clamp(files),
                used: clamp(files - files_free),
                unit: csi::volume_usage::Unit::Inodes as i32,
            },
        ])
    }

    /// NodeExpandVolume: nothing on the node grows with a volume (a JuiceFS mount has no
    /// device or filesystem size; a volume's quota is the controller's), so a volume published
    /// or staged at `volume_path` answers success with the requested size, read-only or not.
    ///
    /// Why it exists: the kubelet calls it when a PV's capacity exceeds its PVC's
    /// `status.capacity`; without the node EXPAND_VOLUME capability that fails the writer's
    /// mount ("found CSI plugin ... to not support node expansion") and the PVC's status is
    /// never brought up to the PV's, so every read-only reader mount keeps raising a
    /// `FileSystemResizeFailed` event (the kubelet warns before it calls any driver). Spec:
    /// "Volume does not exist | 5 NOT_FOUND"; repeating the call changes nothing.
    pub fn expand(&self, req: csi::NodeExpandVolumeRequest) -> Result<i64, CsiError> {
        let volume_id = validate::required("volume_id", &req.volume_id)?;
        validate::required("volume_path", &req.volume_path)?;
        let path = PathBuf::from(&req.volume_path);
        let ours = self
            .staged()
            .get(volume_id)
            .is_some_and(|r| r.staging_path == path || r.targets.contains_key(&path));
        if !ours {
            return Err(CsiError::VolumeNotFound {
                volume_id: volume_id.to_string(),
            });
        }
        Ok(req
            .capacity_range
            .map(|r| r.required_bytes.max(r.limit_bytes).max(0))
            .unwrap_or(0))
    }

    /// Unmounts `path` without forcing first: a busy unmount (EBUSY) is retried for up to
    /// [`BUSY_RETRIES`] x [`BUSY_RETRY_DELAY`] (about a second), then the mount is detached
    /// lazily (`MNT_DETACH`), which always succeeds. Busy happens right after a mount (the
    /// `juicefs` supervisor still holds the mount point for its readiness check) and after the
    /// watchdog re-bound a target (a process still holds a file of the healed mount). Lazy is
    /// safe here: CSI no longer uses the mount, and the kernel keeps it alive only for the open
    /// files, which go on working until closed. Other errors are returned as they are.
    fn unmount_patiently(&self, path: &Path) -> Result<(), CsiError> {
        for _ in 0..BUSY_RETRIES {
            match self.mounter.unmount(path, false) {
                Ok(()) => return Ok(()),
                Err(CsiError::Unmount { source, .. })
                    if source.raw_os_error() == Some(libc::EBUSY) =>
                {
                    std::thread::sleep(BUSY_RETRY_DELAY);
                }
                Err(e) => return Err(e),
            }
        }
        warn!(path = %path.display(), "mount still busy; detaching lazily");
        self.mounter.unmount(path, true)
    }

    /// Unmounts every mount stacked at `path`, each [`Detach::Lazy`] or
    /// [`Detach::Patiently`] (see [`Driver::unmount_patiently`]).
    fn detach_all(&self, path: &Path, how: Detach) -> Result<(), CsiError> {
        for _ in 0..16 {
            let table = self.mounter.mounts()?;
            if crate::mountinfo::find(&table, path).is_none() {
                return Ok(());
            }
            match how {
                Detach::Lazy => self.mounter.unmount(path, true)?,
                Detach::Patiently => self.unmount_patiently(path)?,
            }
        }
        Err(CsiError::Unmount {
            path: path.to_path_buf(),
            source: std::io::Error::other("still mounted after 16 unmounts"),
        })
    }

    fn update_mount_gauge(&self) {
        let stagings: Vec<PathBuf> = self
            .staged()
            .values()
            .map(|r| r.staging_path.clone())
            .collect();
        let healthy = stagings
            .iter()
            .filter(|p| matches!(self.mounter.state(p), Ok(MountState::Healthy(_))))
            .count();
        self.metrics.set_mounts(healthy);
    }

    // ---------------------------------------------------------------- healing

    /// Re-adoption and healing, for every staged volume: a healthy staging mount is kept as is
    /// (never mounted twice); a dead (`ENOTCONN`) or missing one is detached, remounted, and
    /// every published target re-bound; a missing or dead target is re-bound.
    /// Volumes with a CSI call in flight are skipped (the next pass gets them).
    ///
    /// Returns how many volumes were remounted.
    pub fn reconcile(&self) -> usize {
        let ids: Vec<String> = self.staged().keys().cloned().collect();
        let mut remounted = 0;
        for id in ids {
            // Look first without the lease, so a healthy pass never makes a concurrent CSI
            // call on the volume fail with ABORTED.
            if !self.needs_healing(&id) {
                continue;
            }
            let Ok(_lease) = self.guard.try_acquire(&id) else {
                continue;
            };
            let Some(rec) = self.staged().get(&id).cloned() else {
                continue;
            };
            match self.heal(&rec) {
                Ok(true) => {
                    remounted += 1;
                    self.metrics.remount();
                    info!(volume_id = %id, targets = rec.targets.len(), "dead mount remounted and targets re-bound");
                }
                Ok(false) => {}
                Err(e) => warn!(volume_id = %id, error = %e, "healing failed; will retry"),
            }
        }
        self.update_mount_gauge();
        remounted
    }

    fn needs_healing(&self, volume_id: &str) -> bool {
        let Some(rec) = self.staged().get(volume_id).cloned() else {
            return false;
        };
        let healthy = |p: &Path| matches!(self.mounter.state(p), Ok(MountState::Healthy(_)));
        !(healthy(&rec.staging_path) && rec.targets.keys().all(|t| healthy(t)))
    }

    fn heal(&self, rec: &StagedVolume) -> Result<bool, CsiError> {
        let secret_map: HashMap<String, String> = rec.secrets.0.clone().into_iter().collect();
        let secrets = JuiceFsSecrets::from_maps(&secret_map, &HashMap::new())?;
        let remount = match self.mounter.state(&rec.staging_path)? {
            MountState::Healthy(_) => false,
            MountState::Dead(_) | MountState::NotMounted => true,
        };
        if remount {
            warn!(volume_id = %rec.volume_id, staging = %rec.staging_path.display(), "staging mount is dead or gone; remounting");
            for target in rec.targets.keys() {
                self.detach_all(target, Detach::Lazy)?;
            }
            // A mount pod clears the dead mount when it restarts the client; detaching here
            // as well could detach its fresh mount. `mount_fs` then waits for it.
            if !self.mounter.replaces_dead_mounts(&rec.staging_path) {
                self.detach_all(&rec.staging_path, Detach::Lazy)?;
            }
            self.mounter
                .mount_fs(&secrets, &rec.staging_path, &rec.mount_flags)?;
        }
        for (target, t) in &rec.targets {
            match self.mounter.state(target)? {
                MountState::Healthy(_) => continue,
                MountState::Dead(_) => self.detach_all(target, Detach::Lazy)?,
                MountState::NotMounted => {}
            }
            self.mounter.bind(&rec.bind_source(), target, t.read_only)?;
        }
        Ok(remount)
    }

    /// The ids of staged volumes and their targets (for tests and diagnostics).
    pub fn staged_snapshot(&self) -> BTreeMap<String, Vec<PathBuf>> {
        self.staged()
            .iter()
            .map(|(k, v)| (k.clone(), v.targets.keys().cloned().collect()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    //! Driver logic against a [`Mounter`] over a temp dir (symlinks stand in for mounts), so
    //! the rules run without root or FUSE; `tests/csi_node.rs` runs the same rules for real.
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::csi::volume_capability::access_mode::Mode as AccessMode;
    use crate::csi::volume_capability::{AccessMode as Am, AccessType, MountVolume};
    use crate::mountinfo::MountEntry;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Debug, Clone)]
    struct FakeMount {
        at: PathBuf,
        read_only: bool,
        dead: bool,
    }

    /// "Mounts" are symlinks into one directory that plays the filesystem.
    #[derive(Debug)]
    struct TempDirMounter {
        fs_root: PathBuf,
        table: Mutex<Vec<FakeMount>>,
        fs_mounts: AtomicUsize,
        /// Per path: how many more plain (non-lazy) unmounts fail, and with which errno.
        refuse: Mutex<HashMap<PathBuf, (usize, i32)>>,
        /// Every unmount attempt: (path, lazy).
        unmounts: Mutex<Vec<(PathBuf, bool)>>,
        /// Plays pod mode: a mount pod replaces dead mounts and is released on unstage.
        pod_mode: std::sync::atomic::AtomicBool,
        /// `release <path>` and `unmount <path>`, in order.
        events: Mutex<Vec<String>>,
    }

    impl TempDirMounter {
        fn new(fs_root: PathBuf) -> Self {
            fs::create_dir_all(&fs_root).unwrap();
            Self {
                fs_root,
                table: Mutex::new(Vec::new()),
                fs_mounts: AtomicUsize::new(0),
                refuse: Mutex::new(HashMap::new()),
                unmounts: Mutex::new(Vec::new()),
                pod_mode: Default::default(),
                events: Mutex::new(Vec::new()),
            }
        }
        /// The next `times` plain unmounts of `path` fail with `errno`.
        fn refuse_unmount(&self, path: &Path, times: usize, errno: i32) {
            self.refuse
                .lock()
                .unwrap()
                .insert(path.to_path_buf(), (times, errno));
        }
        fn unmount_attempts(&self, path: &Path) -> Vec<bool> {
            self.unmounts
                .lock()
                .unwrap()
                .iter()
                .filter(|(p, _)| p == path)
                .map(|(_, lazy)| *lazy)
                .collect()
        }
        fn replace_with_link(at: &Path, to: &Path) {
            if let Some(parent) = at.parent() {
                fs::create_dir_all(parent).unwrap();
            }
            let _ = fs::remove_dir(at);
            std::os::unix::fs::symlink(to, at).unwrap();
        }
        fn kill_all(&self) {
            for m in self.table.lock().unwrap().iter_mut() {
                m.dead = true;
            }
        }
    }

    impl Mounter for TempDirMounter {
        fn probe(&self) -> Result<(), String> {
            Ok(())
        }
        fn format(&self, _: &JuiceFsSecrets) -> Result<(), CsiError> {
            Ok(())
        }
        fn mount_fs(&self, _: &JuiceFsSecrets, at: &Path, _: &[String]) -> Result<(), CsiError> {
            if self.pod_mode.load(Ordering::SeqCst) {
                // The restarted mount pod clears the dead mount it finds, then mounts.
                let mut t = self.table.lock().unwrap();
                if let Some(i) = t.iter().rposition(|m| m.at == at && m.dead) {
                    t.remove(i);
                    fs::remove_file(at).unwrap();
                }
            }
            Self::replace_with_link(at, &self.fs_root);
            self.table.lock().unwrap().push(FakeMount {
                at: at.to_path_buf(),
                read_only: false,
                dead: false,
            });
            self.fs_mounts.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn set_quota(&self, _: &JuiceFsSecrets, _: &str, _: u64) -> Result<(), CsiError> {
            Ok(())
        }
        fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<(), CsiError> {
            let real = fs::canonicalize(source).unwrap();
            Self::replace_with_link(target, &real);
            self.table.lock().unwrap().push(FakeMount {
                at: target.to_path_buf(),
                read_only,
                dead: false,
            });
            Ok(())
        }
        fn release_fs(&self, at: &Path) -> Result<(), CsiError> {
            self.events
                .lock()
                .unwrap()
                .push(format!("release {}", at.display()));
            Ok(())
        }
        fn replaces_dead_mounts(&self, _: &Path) -> bool {
            self.pod_mode.load(Ordering::SeqCst)
        }
        fn unmount(&self, path: &Path, lazy: bool) -> Result<(), CsiError> {
            self.events
                .lock()
                .unwrap()
                .push(format!("unmount {}", path.display()));
            self.unmounts
                .lock()
                .unwrap()
                .push((path.to_path_buf(), lazy));
            if !lazy
                && let Some((left, errno)) = self.refuse.lock().unwrap().get_mut(path)
                && *left > 0
            {
                *left -= 1;
                return Err(CsiError::Unmount {
                    path: path.to_path_buf(),
                    source: std::io::Error::from_raw_os_error(*errno),
                });
            }
            let mut t = self.table.lock().unwrap();
            if let Some(i) = t.iter().rposition(|m| m.at == path) {
                t.remove(i);
                let _ = fs::remove_file(path);
                fs::create_dir_all(path).unwrap();
            }
            Ok(())
        }
        fn mounts(&self) -> Result<Vec<MountEntry>, CsiError> {
            Ok(self
                .table
                .lock()
                .unwrap()
                .iter()
                .enumerate()
                .map(|(i, m)| MountEntry {
                    mount_id: u32::try_from(i).unwrap(),
                    parent_id: 1,
                    major_minor: "0:99".into(),
                    root: "/".into(),
                    mount_point: m.at.clone(),
                    mount_options: vec![if m.read_only { "ro" } else { "rw" }.into()],
                    fs_type: "fuse.juicefs".into(),
                    source: "JuiceFS:fake".into(),
                    super_options: vec![],
                })
                .collect())
        }
        fn state(&self, path: &Path) -> Result<MountState, CsiError> {
            let entries = self.mounts()?;
            let t = self.table.lock().unwrap();
            Ok(match t.iter().rposition(|m| m.at == path) {
                None => MountState::NotMounted,
                Some(i) if t[i].dead => MountState::Dead(entries[i].clone()),
                Some(i) => MountState::Healthy(entries[i].clone()),
            })
        }
    }

    struct Fixture {
        dir: tempfile::TempDir,
        mounter: Arc<TempDirMounter>,
        driver: Driver<TempDirMounter>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mounter = Arc::new(TempDirMounter::new(dir.path().join("fs")));
        let driver = driver_over(dir.path(), mounter.clone());
        Fixture {
            dir,
            mounter,
            driver,
        }
    }

    fn driver_over(dir: &Path, mounter: Arc<TempDirMounter>) -> Driver<TempDirMounter> {
        let config = Config {
            node_id: "n1".into(),
            state_dir: dir.join("state"),
            mode: Mode::All,
            watchdog_interval: Duration::from_millis(100),
            max_volumes_per_node: DEFAULT_MAX_VOLUMES_PER_NODE,
        };
        Driver::new(config, mounter, Arc::new(Metrics::new())).unwrap()
    }

    fn secrets() -> HashMap<String, String> {
        [("name", "fake"), ("metaurl", "redis://:pw@127.0.0.1:1/1")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn cap(mode: AccessMode) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume::default())),
            access_mode: Some(Am { mode: mode as i32 }),
        }
    }

    impl Fixture {
        fn p(&self, rel: &str) -> PathBuf {
            self.dir.path().join(rel)
        }
        fn create(&self, name: &str, bytes: i64) -> Result<csi::Volume, CsiError> {
            self.driver.create_volume(csi::CreateVolumeRequest {
                name: name.into(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![cap(AccessMode::MultiNodeMultiWriter)],
                secrets: secrets(),
                ..Default::default()
            })
        }
        fn stage(&self, vol: &csi::Volume, staging: &str) -> Result<(), CsiError> {
            self.driver.stage(csi::NodeStageVolumeRequest {
                volume_id: vol.volume_id.clone(),
                staging_target_path: self.p(staging).display().to_string(),
                volume_capability: Some(cap(AccessMode::MultiNodeMultiWriter)),
                secrets: secrets(),
                volume_context: vol.volume_context.clone(),
                ..Default::default()
            })
        }
        fn publish(
            &self,
            vol: &csi::Volume,
            staging: &str,
            target: &str,
            mode: AccessMode,
        ) -> Result<(), CsiError> {
            self.driver.publish(csi::NodePublishVolumeRequest {
                volume_id: vol.volume_id.clone(),
                staging_target_path: self.p(staging).display().to_string(),
                target_path: self.p(target).display().to_string(),
                volume_capability: Some(cap(mode)),
                ..Default::default()
            })
        }
    }

    #[test]
    fn create_is_idempotent_by_name_and_refuses_a_different_capacity() {
        let f = fixture();
        let v = f.create("pvc-a", 1 << 20).unwrap();
        assert_eq!(f.create("pvc-a", 1 << 20).unwrap(), v);
        assert!(matches!(
            f.create("pvc-a", 2 << 20),
            Err(CsiError::VolumeExistsIncompatible { .. })
        ));
        assert!(f.p("fs/pvc-a").is_dir());
        assert_eq!(
            f.mounter.fs_mounts.load(Ordering::SeqCst),
            1,
            "controller mounts once"
        );
    }

    #[test]
    fn delete_removes_the_directory_unless_the_volume_asked_to_be_retained() {
        let f = fixture();
        f.create("pvc-gone", 0).unwrap();
        let mut keep = csi::CreateVolumeRequest {
            name: "pvc-kept".into(),
            volume_capabilities: vec![cap(AccessMode::MultiNodeReaderOnly)],
            secrets: secrets(),
            ..Default::default()
        };
        keep.parameters
            .insert(validate::PARAM_ON_DELETE.into(), "retain".into());
        f.driver.create_volume(keep).unwrap();
        fs::write(f.p("fs/pvc-kept/data"), b"x").unwrap();
        for id in ["pvc-gone", "pvc-kept", "pvc-gone", "pvc-never"] {
            f.driver
                .delete_volume(csi::DeleteVolumeRequest {
                    volume_id: id.into(),
                    secrets: secrets(),
                })
                .unwrap();
        }
        assert!(!f.p("fs/pvc-gone").exists());
        assert!(f.p("fs/pvc-kept/data").exists());
        assert!(!f.p("fs/.shoal-csi/pvc-kept.json").exists());
    }

    #[test]
    fn probe_fails_when_the_state_dir_is_not_writable() {
        let f = fixture();
        assert!(f.driver.probe().is_ok());
        fs::remove_dir_all(f.p("state")).unwrap();
        fs::write(f.p("state"), b"now a file").unwrap();
        assert!(f.driver.probe().is_err());
    }

    #[test]
    fn staging_twice_mounts_once_and_reader_modes_publish_read_only() {
        let f = fixture();
        let v = f.create("pvc-b", 0).unwrap();
        f.stage(&v, "stage").unwrap();
        f.stage(&v, "stage").unwrap();
        assert_eq!(
            f.mounter.fs_mounts.load(Ordering::SeqCst),
            2,
            "controller + one stage"
        );
        f.publish(&v, "stage", "t-ro", AccessMode::MultiNodeReaderOnly)
            .unwrap();
        let t = f.mounter.table.lock().unwrap().clone();
        assert!(t.iter().any(|m| m.at == f.p("t-ro") && m.read_only));
        drop(t);
        // Same target, now asked read-write: incompatible.
        assert!(matches!(
            f.publish(&v, "stage", "t-ro", AccessMode::MultiNodeMultiWriter),
            Err(CsiError::TargetPublishedIncompatible { .. })
        ));
    }

    #[test]
    fn a_second_call_on_a_busy_volume_is_aborted_without_side_effects() {
        let f = fixture();
        let v = f.create("pvc-c", 0).unwrap();
        let _held = f.driver.guard.try_acquire("pvc-c").unwrap();
        assert!(matches!(
            f.stage(&v, "stage"),
            Err(CsiError::OperationInProgress { .. })
        ));
        assert!(f.driver.staged_snapshot().is_empty());
    }

    #[test]
    fn reconcile_remounts_a_dead_stage_and_rebinds_every_target() {
        let f = fixture();
        let v = f.create("pvc-d", 0).unwrap();
        f.stage(&v, "stage").unwrap();
        f.publish(&v, "stage", "t1", AccessMode::MultiNodeMultiWriter)
            .unwrap();
        f.publish(&v, "stage", "t2", AccessMode::MultiNodeReaderOnly)
            .unwrap();
        assert_eq!(f.driver.reconcile(), 0, "healthy: nothing to do");
        f.mounter.kill_all();
        assert_eq!(f.driver.reconcile(), 1);
        let t = f.mounter.table.lock().unwrap().clone();
        assert!(t.iter().all(|m| !m.dead || m.at.starts_with(f.p("state"))));
        assert!(
            t.iter()
                .any(|m| m.at == f.p("t2") && m.read_only && !m.dead)
        );
        assert!(
            t.iter()
                .any(|m| m.at == f.p("t1") && !m.read_only && !m.dead)
        );
        assert!(
            f.driver
                .metrics
                .encode()
                .contains("shoal_csi_remounts_total 1")
        );
    }

    #[test]
    fn a_restarted_driver_readopts_healthy_mounts_without_mounting_again() {
        let f = fixture();
        let v = f.create("pvc-e", 0).unwrap();
        f.stage(&v, "stage").unwrap();
        f.publish(&v, "stage", "t", AccessMode::MultiNodeMultiWriter)
            .unwrap();
        let before = f.mounter.fs_mounts.load(Ordering::SeqCst);
        let again = driver_over(f.dir.path(), f.mounter.clone());
        assert_eq!(again.reconcile(), 0);
        assert_eq!(f.mounter.fs_mounts.load(Ordering::SeqCst), before);
        assert_eq!(again.staged_snapshot()["pvc-e"], vec![f.p("t")]);
        // Unstage while published is refused; after unpublish it succeeds.
        let unstage = || {
            again.unstage(csi::NodeUnstageVolumeRequest {
                volume_id: "pvc-e".into(),
                staging_target_path: f.p("stage").display().to_string(),
            })
        };
        assert!(matches!(unstage(), Err(CsiError::StillPublished { .. })));
        again
            .unpublish(csi::NodeUnpublishVolumeRequest {
                volume_id: "pvc-e".into(),
                target_path: f.p("t").display().to_string(),
            })
            .unwrap();
        unstage().unwrap();
        unstage().unwrap();
    }

    fn published_pvc(f: &Fixture, name: &str) -> csi::Volume {
        let v = f.create(name, 0).unwrap();
        f.stage(&v, "stage").unwrap();
        f.publish(&v, "stage", "t", AccessMode::MultiNodeMultiWriter)
            .unwrap();
        v
    }

    fn unpublish_t(f: &Fixture, v: &csi::Volume) -> Result<(), CsiError> {
        f.driver.unpublish(csi::NodeUnpublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            target_path: f.p("t").display().to_string(),
        })
    }

    #[test]
    fn unpublish_retries_a_briefly_busy_target_without_detaching_lazily() {
        let f = fixture();
        let v = published_pvc(&f, "pvc-busy");
        f.mounter.refuse_unmount(&f.p("t"), 3, libc::EBUSY);
        unpublish_t(&f, &v).unwrap();
        assert_eq!(
            f.mounter.unmount_attempts(&f.p("t")),
            vec![false; 4],
            "three busy attempts, the fourth plain unmount succeeds"
        );
        assert_eq!(f.mounter.state(&f.p("t")).unwrap(), MountState::NotMounted);
        assert!(f.driver.staged_snapshot()["pvc-busy"].is_empty());
    }

    #[test]
    fn unpublish_detaches_lazily_and_succeeds_when_the_target_stays_busy() {
        let f = fixture();
        let v = published_pvc(&f, "pvc-held");
        // Healed by the watchdog, then held open by a process: busy on every plain unmount.
        f.mounter.kill_all();
        assert_eq!(f.driver.reconcile(), 1);
        f.mounter.unmounts.lock().unwrap().clear();
        f.mounter.refuse_unmount(&f.p("t"), usize::MAX, libc::EBUSY);
        let started = std::time::Instant::now();
        unpublish_t(&f, &v).unwrap();
        let attempts = f.mounter.unmount_attempts(&f.p("t"));
        let plain = attempts.iter().filter(|lazy| !**lazy).count();
        assert_eq!(plain, BUSY_RETRIES as usize, "{attempts:?}");
        assert_eq!(attempts.len(), plain + 1, "{attempts:?}");
        assert_eq!(attempts.last(), Some(&true), "last resort is MNT_DETACH");
        assert!(started.elapsed() >= BUSY_RETRY_DELAY * BUSY_RETRIES);
        assert_eq!(f.mounter.state(&f.p("t")).unwrap(), MountState::NotMounted);
        assert!(!f.p("t").exists(), "target directory removed");
        assert!(f.driver.staged_snapshot()["pvc-held"].is_empty());
        // Idempotent afterwards, and the volume can be unstaged.
        unpublish_t(&f, &v).unwrap();
        f.driver
            .unstage(csi::NodeUnstageVolumeRequest {
                volume_id: v.volume_id.clone(),
                staging_target_path: f.p("stage").display().to_string(),
            })
            .unwrap();
    }

    #[test]
    fn unpublish_reports_an_unmount_error_other_than_busy_and_keeps_the_target() {
        let f = fixture();
        let v = published_pvc(&f, "pvc-eperm");
        f.mounter.refuse_unmount(&f.p("t"), 1, libc::EPERM);
        let err = unpublish_t(&f, &v).unwrap_err();
        assert!(matches!(err, CsiError::Unmount { .. }), "{err}");
        assert_eq!(f.mounter.unmount_attempts(&f.p("t")), vec![false]);
        assert_eq!(f.driver.staged_snapshot()["pvc-eperm"], vec![f.p("t")]);
        // The next try (the CO retries) succeeds.
        unpublish_t(&f, &v).unwrap();
        assert!(f.driver.staged_snapshot()["pvc-eperm"].is_empty());
    }

    #[test]
    fn in_pod_mode_a_dead_stage_is_left_to_the_mount_pod_and_every_target_is_rebound() {
        let f = fixture();
        f.mounter.pod_mode.store(true, Ordering::SeqCst);
        let v = f.create("pvc-pod", 0).unwrap();
        f.stage(&v, "stage").unwrap();
        f.publish(&v, "stage", "t1", AccessMode::MultiNodeMultiWriter)
            .unwrap();
        f.publish(&v, "stage", "t2", AccessMode::MultiNodeReaderOnly)
            .unwrap();
        f.mounter.kill_all();
        assert_eq!(f.driver.reconcile(), 1);
        assert!(
            f.mounter.unmount_attempts(&f.p("stage")).is_empty(),
            "the driver never detaches a dead stage a mount pod replaces"
        );
        assert_eq!(f.mounter.unmount_attempts(&f.p("t1")), vec![true]);
        let t = f.mounter.table.lock().unwrap().clone();
        for (target, ro) in [("t1", false), ("t2", true), ("stage", false)] {
            assert!(
                t.iter()
                    .any(|m| m.at == f.p(target) && m.read_only == ro && !m.dead),
                "{target}: {t:?}"
            );
        }
        drop(t);
        assert_eq!(f.driver.reconcile(), 0, "healed");
    }

    #[test]
    fn unstage_releases_the_mount_pod_before_unmounting_the_staging_path() {
        let f = fixture();
        f.mounter.pod_mode.store(true, Ordering::SeqCst);
        let v = f.create("pvc-rel", 0).unwrap();
        f.stage(&v, "stage").unwrap();
        f.mounter.events.lock().unwrap().clear();
        let req = || csi::NodeUnstageVolumeRequest {
            volume_id: "pvc-rel".into(),
            staging_target_path: f.p("stage").display().to_string(),
        };
        f.driver.unstage(req()).unwrap();
        let stage = f.p("stage").display().to_string();
        assert_eq!(
            f.mounter.events.lock().unwrap()[..2],
            [format!("release {stage}"), format!("unmount {stage}")]
        );
        // Not staged any more: still released (a lost record must not leak a mount pod).
        f.driver.unstage(req()).unwrap();
        assert_eq!(
            f.mounter.events.lock().unwrap().last(),
            Some(&format!("release {stage}"))
        );
    }

    #[test]
    fn volume_stats_is_not_found_for_a_path_that_holds_no_volume_and_invalid_without_one() {
        let f = fixture();
        let v = published_pvc(&f, "pvc-stats");
        let stats = |path: String| {
            f.driver.volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: v.volume_id.clone(),
                volume_path: path,
                staging_target_path: String::new(),
            })
        };
        assert_eq!(stats(f.p("t").display().to_string()).unwrap().len(), 2);
        assert_eq!(stats(f.p("stage").display().to_string()).unwrap().len(), 2);
        for path in [
            "t".to_string(),
            "relative/mount".to_string(),
            f.p("missing").display().to_string(),
            f.p("fs").display().to_string(),
        ] {
            let err = stats(path.clone()).unwrap_err();
            assert_eq!(err.code(), tonic::Code::NotFound, "{path}: {err}");
        }
        assert_eq!(
            stats(String::new()).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    #[test]
    fn node_expand_answers_success_for_a_read_only_target_and_not_found_elsewhere() {
        let f = fixture();
        let v = f.create("pvc-grow", 0).unwrap();
        f.stage(&v, "stage").unwrap();
        f.publish(&v, "stage", "ro", AccessMode::MultiNodeReaderOnly)
            .unwrap();
        let expand = |path: PathBuf| {
            f.driver.expand(csi::NodeExpandVolumeRequest {
                volume_id: v.volume_id.clone(),
                volume_path: path.display().to_string(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 2 << 30,
                    limit_bytes: 0,
                }),
                volume_capability: Some(cap(AccessMode::MultiNodeReaderOnly)),
                ..Default::default()
            })
        };
        let mounts_before = f.mounter.table.lock().unwrap().len();
        assert_eq!(expand(f.p("ro")).unwrap(), 2 << 30);
        assert_eq!(expand(f.p("ro")).unwrap(), 2 << 30, "repeatable");
        assert_eq!(f.mounter.table.lock().unwrap().len(), mounts_before);
        assert_eq!(
            expand(f.p("elsewhere")).unwrap_err().code(),
            tonic::Code::NotFound
        );
    }
}
