//! The Node RPCs (stage, unstage, publish, unpublish, volume stats, expand) and the
//! watchdog's healing pass over the staged volumes.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::{BUSY_RETRIES, BUSY_RETRY_DELAY, Detach, Driver, io_err};
use crate::csi;
use crate::error::CsiError;
use crate::mounter::{MountState, Mounter};
use crate::secrets::JuiceFsSecrets;
use crate::state::{SecretMap, StagedVolume, Target};
use crate::validate;

impl<M: Mounter> Driver<M> {
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
    #![allow(clippy::unwrap_used)]
    use super::super::testing::*;
    use super::*;

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
