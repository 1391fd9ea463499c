//! The driver's test double: a [`Mounter`] over a temp dir (symlinks stand in for mounts),
//! so the rules run without root or FUSE; `tests/csi_node.rs` runs the same rules for real.
#![allow(clippy::unwrap_used)]
pub(super) use super::*;
pub(super) use crate::csi;
pub(super) use crate::csi::volume_capability::access_mode::Mode as AccessMode;
pub(super) use crate::csi::volume_capability::{AccessMode as Am, AccessType, MountVolume};
pub(super) use crate::mounter::MountState;
pub(super) use crate::mountinfo::MountEntry;
pub(super) use crate::secrets::JuiceFsSecrets;
pub(super) use std::collections::HashMap;
pub(super) use std::fs;
pub(super) use std::path::{Path, PathBuf};
pub(super) use std::sync::atomic::{AtomicUsize, Ordering};
pub(super) use std::sync::{Arc, Mutex};
pub(super) use std::time::Duration;

#[derive(Debug, Clone)]
pub(super) struct FakeMount {
    pub(super) at: PathBuf,
    pub(super) read_only: bool,
    pub(super) dead: bool,
}

/// "Mounts" are symlinks into one directory that plays the filesystem.
#[derive(Debug)]
pub(super) struct TempDirMounter {
    pub(super) fs_root: PathBuf,
    pub(super) table: Mutex<Vec<FakeMount>>,
    pub(super) fs_mounts: AtomicUsize,
    /// Per path: how many more plain (non-lazy) unmounts fail, and with which errno.
    pub(super) refuse: Mutex<HashMap<PathBuf, (usize, i32)>>,
    /// Every unmount attempt: (path, lazy).
    pub(super) unmounts: Mutex<Vec<(PathBuf, bool)>>,
    /// Plays pod mode: a mount pod replaces dead mounts and is released on unstage.
    pub(super) pod_mode: std::sync::atomic::AtomicBool,
    /// `release <path>` and `unmount <path>`, in order.
    pub(super) events: Mutex<Vec<String>>,
}

impl TempDirMounter {
    pub(super) fn new(fs_root: PathBuf) -> Self {
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
    pub(super) fn refuse_unmount(&self, path: &Path, times: usize, errno: i32) {
        self.refuse
            .lock()
            .unwrap()
            .insert(path.to_path_buf(), (times, errno));
    }
    pub(super) fn unmount_attempts(&self, path: &Path) -> Vec<bool> {
        self.unmounts
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, lazy)| *lazy)
            .collect()
    }
    pub(super) fn replace_with_link(at: &Path, to: &Path) {
        if let Some(parent) = at.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        let _ = fs::remove_dir(at);
        std::os::unix::fs::symlink(to, at).unwrap();
    }
    pub(super) fn kill_all(&self) {
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

pub(super) struct Fixture {
    pub(super) dir: tempfile::TempDir,
    pub(super) mounter: Arc<TempDirMounter>,
    pub(super) driver: Driver<TempDirMounter>,
}

pub(super) fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mounter = Arc::new(TempDirMounter::new(dir.path().join("fs")));
    let driver = driver_over(dir.path(), mounter.clone());
    Fixture {
        dir,
        mounter,
        driver,
    }
}

pub(super) fn driver_over(dir: &Path, mounter: Arc<TempDirMounter>) -> Driver<TempDirMounter> {
    let config = Config {
        node_id: "n1".into(),
        state_dir: dir.join("state"),
        mode: Mode::All,
        watchdog_interval: Duration::from_millis(100),
        max_volumes_per_node: DEFAULT_MAX_VOLUMES_PER_NODE,
    };
    Driver::new(config, mounter, Arc::new(Metrics::new())).unwrap()
}

pub(super) fn secrets() -> HashMap<String, String> {
    [("name", "fake"), ("metaurl", "redis://:pw@127.0.0.1:1/1")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub(super) fn cap(mode: AccessMode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(Am { mode: mode as i32 }),
    }
}

impl Fixture {
    pub(super) fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    pub(super) fn create(&self, name: &str, bytes: i64) -> Result<csi::Volume, CsiError> {
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
    pub(super) fn stage(&self, vol: &csi::Volume, staging: &str) -> Result<(), CsiError> {
        self.driver.stage(csi::NodeStageVolumeRequest {
            volume_id: vol.volume_id.clone(),
            staging_target_path: self.p(staging).display().to_string(),
            volume_capability: Some(cap(AccessMode::MultiNodeMultiWriter)),
            secrets: secrets(),
            volume_context: vol.volume_context.clone(),
            ..Default::default()
        })
    }
    pub(super) fn publish(
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
