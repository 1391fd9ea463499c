//! The Controller RPCs: CreateVolume, DeleteVolume, ValidateVolumeCapabilities, over the
//! controller's own mount of each filesystem.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::PoisonError;

use tracing::info;

use super::{Driver, META_DIR, VolumeMeta, io_err};
use crate::csi;
use crate::error::CsiError;
use crate::mounter::{MountState, Mounter};
use crate::secrets::JuiceFsSecrets;
use crate::validate::{self, CTX_SUB_PATH, OnDelete};

impl<M: Mounter> Driver<M> {
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
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::testing::*;
    use super::*;

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
}
