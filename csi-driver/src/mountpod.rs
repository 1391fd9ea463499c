//! Pod mount mode: one mount pod per staged filesystem per node, so the `juicefs` client
//! outlives the node plugin's container (the design juicefs-csi uses).
//!
//! Owns: the deterministic name of a mount pod and of its Secret (from node and staging path),
//! the pure builders of both objects, the [`MountPodApi`] seam (the few Kubernetes calls the
//! mode makes, with a kube-rs implementation) and [`PodMounter`], a [`Mounter`] that stages a
//! filesystem through a mount pod and hands everything else (format, quota, binds, unmounts,
//! the mount table) to a host mounter. The mount pod runs `shoal-csi mount-pod`, which clears a
//! dead mount left by a crashed client and `exec`s `juicefs mount` in the foreground; the mount
//! reaches the plugin (and the kubelet) through the kubelet dir mounted `Bidirectional` in both.
//! Must not know CSI messages or volume bookkeeping (the driver's), nor log a secret value: the
//! credentials travel only in the Secret, read by the pod as environment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    Container, ContainerState, EnvFromSource, HostPathVolumeSource, Pod, PodSpec, Secret,
    SecretEnvSource, SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tracing::{info, warn};

use crate::error::CsiError;
use crate::mounter::{MountState, Mounter, juicefs_mount_args};
use crate::mountinfo::MountEntry;
use crate::secrets::{JuiceFsSecrets, fnv1a64};

/// Label on every object this mode creates.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "shoal-csi");
/// Label naming the node a mount pod serves.
pub const NODE_LABEL: &str = "shoal.dev/node";
/// Annotation with the staging path a mount pod serves (paths do not fit a label).
pub const STAGING_ANNOTATION: &str = "shoal.dev/staging-path";
/// The mount pod's one container.
pub const CONTAINER: &str = "juicefs";
/// Where the JuiceFS cache hostPath is mounted inside a mount pod.
pub const POD_CACHE_DIR: &str = "/var/cache/shoal-juicefs";

/// Settings of pod mode, from the node plugin's flags.
#[derive(Debug, Clone)]
pub struct MountPodConfig {
    /// Namespace of the mount pods and Secrets (the plugin's own, `POD_NAMESPACE`).
    pub namespace: String,
    /// The node (`spec.nodeName` of every mount pod; the plugin's node id).
    pub node_name: String,
    /// Image with `shoal-csi` and `juicefs` (the plugin's own image).
    pub image: String,
    /// `imagePullPolicy` of the mount pods.
    pub image_pull_policy: String,
    /// The kubelet root dir: staging paths live under it; mounted at the same path,
    /// `Bidirectional`, in the mount pods.
    pub kubelet_dir: PathBuf,
    /// Host directory of the JuiceFS cache (a hostPath in every mount pod).
    pub cache_host_dir: PathBuf,
    /// `priorityClassName` of the mount pods; `None` for none.
    pub priority_class: Option<String>,
    /// `shoal-csi` inside the image.
    pub shoal_csi: PathBuf,
    /// `juicefs` inside the image.
    pub juicefs: PathBuf,
    /// How long staging waits for a mount pod's mount.
    pub mount_timeout: Duration,
    /// `terminationGracePeriodSeconds`: time juicefs gets to unmount on SIGTERM.
    pub termination_grace_seconds: i64,
    /// Pause between two looks at the mount table while waiting.
    pub poll: Duration,
}

/// `shoal-mount-<16 hex>`: one name per (node, staging path), for the pod and its Secret, so a
/// restarted plugin finds the objects it made and never makes a second pair.
pub fn mount_pod_name(node: &str, staging: &Path) -> String {
    let mut key = node.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(staging.as_os_str().as_encoded_bytes());
    format!("shoal-mount-{:016x}", fnv1a64(&key))
}

/// A node name as a label value (at most 63 characters; node names may have 253).
fn node_label_value(node: &str) -> String {
    if node.len() <= 63 {
        node.to_string()
    } else {
        let head: String = node.chars().take(46).collect();
        format!(
            "{}-{:016x}",
            head.trim_end_matches(['-', '.']),
            fnv1a64(node.as_bytes())
        )
    }
}

fn labels(cfg: &MountPodConfig) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        (NODE_LABEL.to_string(), node_label_value(&cfg.node_name)),
        (
            "app.kubernetes.io/component".to_string(),
            "mount-pod".to_string(),
        ),
    ])
}

fn metadata(cfg: &MountPodConfig, name: &str, staging: &Path) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(cfg.namespace.clone()),
        labels: Some(labels(cfg)),
        annotations: Some(BTreeMap::from([(
            STAGING_ANNOTATION.to_string(),
            staging.display().to_string(),
        )])),
        ..ObjectMeta::default()
    }
}

/// The Secret holding the `juicefs` child environment ([`JuiceFsSecrets::child_env`]: meta
/// password, object storage keys); the mount pod reads it with `envFrom`, so no credential is
/// ever in an argument list or a pod spec.
pub fn build_secret(
    cfg: &MountPodConfig,
    name: &str,
    secrets: &JuiceFsSecrets,
    staging: &Path,
) -> Secret {
    Secret {
        metadata: metadata(cfg, name, staging),
        data: Some(
            secrets
                .child_env()
                .into_iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
                .collect(),
        ),
        type_: Some("Opaque".into()),
        ..Secret::default()
    }
}

/// The mount pod: pinned to the node, restarted always, privileged (FUSE and mount
/// propagation), tolerating every taint, with the kubelet dir at the same path
/// (`Bidirectional`, so its mount reaches the kubelet and the plugin), `/dev/fuse` and the cache
/// hostPath. Its container runs `shoal-csi mount-pod --mount-point STAGING -- juicefs mount ...`
/// with the flags of process mode.
pub fn build_pod(
    cfg: &MountPodConfig,
    name: &str,
    secrets: &JuiceFsSecrets,
    staging: &Path,
    flags: &[String],
) -> Pod {
    let kubelet = cfg.kubelet_dir.display().to_string();
    let mut command = vec![
        cfg.shoal_csi.display().to_string(),
        "mount-pod".to_string(),
        "--mount-point".to_string(),
        staging.display().to_string(),
        "--".to_string(),
        cfg.juicefs.display().to_string(),
    ];
    command.extend(juicefs_mount_args(
        secrets,
        Path::new(POD_CACHE_DIR),
        flags,
        staging,
    ));
    let host_path = |vol: &str, path: String, kind: &str| Volume {
        name: vol.to_string(),
        host_path: Some(HostPathVolumeSource {
            path,
            type_: Some(kind.to_string()),
        }),
        ..Volume::default()
    };
    let mount = |vol: &str, path: String, propagation: Option<&str>| VolumeMount {
        name: vol.to_string(),
        mount_path: path,
        mount_propagation: propagation.map(str::to_string),
        ..VolumeMount::default()
    };
    Pod {
        metadata: metadata(cfg, name, staging),
        spec: Some(PodSpec {
            node_name: Some(cfg.node_name.clone()),
            restart_policy: Some("Always".into()),
            priority_class_name: cfg.priority_class.clone(),
            tolerations: Some(vec![Toleration {
                operator: Some("Exists".into()),
                ..Toleration::default()
            }]),
            // The client talks to the metadata engine and object storage only.
            automount_service_account_token: Some(false),
            termination_grace_period_seconds: Some(cfg.termination_grace_seconds),
            containers: vec![Container {
                name: CONTAINER.into(),
                image: Some(cfg.image.clone()),
                image_pull_policy: Some(cfg.image_pull_policy.clone()),
                command: Some(command),
                env_from: Some(vec![EnvFromSource {
                    secret_ref: Some(SecretEnvSource {
                        name: name.to_string(),
                        optional: Some(false),
                    }),
                    ..EnvFromSource::default()
                }]),
                security_context: Some(SecurityContext {
                    privileged: Some(true),
                    ..SecurityContext::default()
                }),
                volume_mounts: Some(vec![
                    mount("kubelet-dir", kubelet.clone(), Some("Bidirectional")),
                    mount("fuse-device", "/dev/fuse".into(), None),
                    mount("cache", POD_CACHE_DIR.into(), None),
                ]),
                ..Container::default()
            }],
            volumes: Some(vec![
                host_path("kubelet-dir", kubelet, "Directory"),
                host_path("fuse-device", "/dev/fuse".into(), "CharDevice"),
                host_path(
                    "cache",
                    cfg.cache_host_dir.display().to_string(),
                    "DirectoryOrCreate",
                ),
            ]),
            ..PodSpec::default()
        }),
        status: None,
    }
}

/// What the API server said about a failed call (or why the client could not ask).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiFailure {
    /// HTTP status code, when the API server answered.
    pub code: Option<u16>,
    /// The API server's message (or the client's error).
    pub message: String,
}

/// A failed Kubernetes call of pod mode, named for its action.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountPodError {
    /// Creating or updating the mount pod's Secret failed.
    #[error("failed to apply Secret {name}: {source}")]
    ApplySecret { name: String, source: ApiFailure },
    /// Creating the mount pod failed (other than: it exists).
    #[error("failed to create mount pod {name}: {source}")]
    CreatePod { name: String, source: ApiFailure },
    /// Reading the mount pod failed.
    #[error("failed to get mount pod {name}: {source}")]
    GetPod { name: String, source: ApiFailure },
    /// Deleting the mount pod failed (other than: it is gone).
    #[error("failed to delete mount pod {name}: {source}")]
    DeletePod { name: String, source: ApiFailure },
    /// Deleting the Secret failed (other than: it is gone).
    #[error("failed to delete Secret {name}: {source}")]
    DeleteSecret { name: String, source: ApiFailure },
    /// The mount pod was deleted but still serves the mount after the grace period.
    #[error("mount pod {name} still serves {staging:?} {waited:?} after its deletion")]
    PodOutlivedDeletion {
        name: String,
        staging: PathBuf,
        waited: Duration,
    },
}

/// The outcome of a create that may find the object already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// Made now.
    New,
    /// One with this name exists (made by an earlier call or an earlier run).
    AlreadyExists,
}

/// The Kubernetes calls pod mode makes, in the plugin's namespace. Blocking, like [`Mounter`].
pub trait MountPodApi: Send + Sync + 'static {
    /// Creates the Secret or replaces its data (server-side apply).
    fn apply_secret(&self, secret: &Secret) -> Result<(), MountPodError>;
    /// Creates the pod; one with the same name is [`Created::AlreadyExists`].
    fn create_pod(&self, pod: &Pod) -> Result<Created, MountPodError>;
    /// The pod, `None` when there is none.
    fn get_pod(&self, name: &str) -> Result<Option<Pod>, MountPodError>;
    /// Deletes the pod with this grace period; gone already is success.
    fn delete_pod(&self, name: &str, grace_seconds: i64) -> Result<(), MountPodError>;
    /// Deletes the Secret; gone already is success.
    fn delete_secret(&self, name: &str) -> Result<(), MountPodError>;
    /// The last `lines` lines of the mount container's log (for error messages).
    fn pod_log_tail(&self, name: &str, lines: i64) -> Result<String, MountPodError>;
}

/// [`MountPodApi`] over kube-rs. Its blocking methods run the async calls on the runtime
/// `handle`, so they must be called off the runtime's worker threads (`spawn_blocking`), as
/// every [`Mounter`] method is.
#[derive(Clone)]
pub struct KubeMountPodApi {
    pods: kube::Api<Pod>,
    secrets: kube::Api<Secret>,
    handle: tokio::runtime::Handle,
}

impl std::fmt::Debug for KubeMountPodApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeMountPodApi").finish_non_exhaustive()
    }
}

/// The field manager of the Secret's server-side apply.
pub const FIELD_MANAGER: &str = "shoal-csi";

fn failure(e: kube::Error) -> ApiFailure {
    match e {
        kube::Error::Api(status) => ApiFailure {
            code: Some(status.code),
            message: if status.message.is_empty() {
                status.reason.clone()
            } else {
                status.message.clone()
            },
        },
        other => ApiFailure {
            code: None,
            message: other.to_string(),
        },
    }
}

fn is_code(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == code)
}

impl KubeMountPodApi {
    /// Calls in `namespace` through `client`, run on `handle`.
    pub fn new(client: kube::Client, namespace: &str, handle: tokio::runtime::Handle) -> Self {
        Self {
            pods: kube::Api::namespaced(client.clone(), namespace),
            secrets: kube::Api::namespaced(client, namespace),
            handle,
        }
    }
}

impl MountPodApi for KubeMountPodApi {
    fn apply_secret(&self, secret: &Secret) -> Result<(), MountPodError> {
        let name = secret.metadata.name.clone().unwrap_or_default();
        let mut body = secret.clone();
        body.metadata.managed_fields = None;
        let params = kube::api::PatchParams::apply(FIELD_MANAGER).force();
        let body = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": body.metadata,
            "type": body.type_,
            "data": body.data,
        });
        self.handle
            .block_on(
                self.secrets
                    .patch(&name, &params, &kube::api::Patch::Apply(&body)),
            )
            .map(|_| ())
            .map_err(|e| MountPodError::ApplySecret {
                name,
                source: failure(e),
            })
    }

    fn create_pod(&self, pod: &Pod) -> Result<Created, MountPodError> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        match self
            .handle
            .block_on(self.pods.create(&kube::api::PostParams::default(), pod))
        {
            Ok(_) => Ok(Created::New),
            Err(e) if is_code(&e, 409) => Ok(Created::AlreadyExists),
            Err(e) => Err(MountPodError::CreatePod {
                name,
                source: failure(e),
            }),
        }
    }

    fn get_pod(&self, name: &str) -> Result<Option<Pod>, MountPodError> {
        self.handle
            .block_on(self.pods.get_opt(name))
            .map_err(|e| MountPodError::GetPod {
                name: name.to_string(),
                source: failure(e),
            })
    }

    fn delete_pod(&self, name: &str, grace_seconds: i64) -> Result<(), MountPodError> {
        let params = kube::api::DeleteParams {
            grace_period_seconds: u32::try_from(grace_seconds).ok(),
            ..kube::api::DeleteParams::default()
        };
        match self.handle.block_on(self.pods.delete(name, &params)) {
            Ok(_) => Ok(()),
            Err(e) if is_code(&e, 404) => Ok(()),
            Err(e) => Err(MountPodError::DeletePod {
                name: name.to_string(),
                source: failure(e),
            }),
        }
    }

    fn delete_secret(&self, name: &str) -> Result<(), MountPodError> {
        match self.handle.block_on(
            self.secrets
                .delete(name, &kube::api::DeleteParams::default()),
        ) {
            Ok(_) => Ok(()),
            Err(e) if is_code(&e, 404) => Ok(()),
            Err(e) => Err(MountPodError::DeleteSecret {
                name: name.to_string(),
                source: failure(e),
            }),
        }
    }

    fn pod_log_tail(&self, name: &str, lines: i64) -> Result<String, MountPodError> {
        let params = kube::api::LogParams {
            container: Some(CONTAINER.to_string()),
            tail_lines: Some(lines),
            ..kube::api::LogParams::default()
        };
        self.handle
            .block_on(self.pods.logs(name, &params))
            .map_err(|e| MountPodError::GetPod {
                name: format!("{name}/log"),
                source: failure(e),
            })
    }
}

/// One line on a mount pod for error messages: phase, the container's state, restarts.
pub fn describe_pod(pod: &Pod) -> String {
    let status = pod.status.as_ref();
    let phase = status
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Unknown".into());
    let mut out = format!("phase {phase}");
    if pod.metadata.deletion_timestamp.is_some() {
        out.push_str(", terminating");
    }
    let container = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == CONTAINER));
    match container {
        None => out.push_str(", container not started"),
        Some(c) => {
            out.push_str(&format!(
                ", container {}, {} restart(s)",
                describe_state(c.state.as_ref()),
                c.restart_count
            ));
            if let Some(last) = c.last_state.as_ref().filter(|s| s.terminated.is_some()) {
                out.push_str(&format!(", last {}", describe_state(Some(last))));
            }
        }
    }
    out
}

fn describe_state(state: Option<&ContainerState>) -> String {
    let Some(state) = state else {
        return "in no state".into();
    };
    if let Some(w) = &state.waiting {
        let mut s = format!("waiting ({})", w.reason.as_deref().unwrap_or("no reason"));
        if let Some(m) = w.message.as_deref().filter(|m| !m.is_empty()) {
            s.push_str(&format!(": {m}"));
        }
        s
    } else if let Some(t) = &state.terminated {
        format!(
            "terminated with exit code {} ({})",
            t.exit_code,
            t.reason.as_deref().unwrap_or("no reason")
        )
    } else if state.running.is_some() {
        "running".into()
    } else {
        "in no state".into()
    }
}

fn container_running(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == CONTAINER))
        .and_then(|c| c.state.as_ref())
        .is_some_and(|s| s.running.is_some())
}

fn pod_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// A [`Mounter`] whose filesystem mounts under the kubelet dir are served by mount pods; the
/// rest (format, quota, binds, unmounts, the mount table, and mounts elsewhere, such as the
/// controller's own) goes to `host`.
#[derive(Debug)]
pub struct PodMounter<A: MountPodApi, H: Mounter> {
    api: A,
    host: H,
    cfg: MountPodConfig,
}

impl<A: MountPodApi, H: Mounter> PodMounter<A, H> {
    /// Pod mode over `api`, with `host` for everything else.
    pub fn new(api: A, host: H, cfg: MountPodConfig) -> Self {
        Self { api, host, cfg }
    }

    /// The settings.
    pub fn config(&self) -> &MountPodConfig {
        &self.cfg
    }

    fn served_by_pod(&self, at: &Path) -> bool {
        at.starts_with(&self.cfg.kubelet_dir)
    }

    fn mounted(&self, at: &Path) -> Result<bool, CsiError> {
        Ok(matches!(self.host.state(at)?, MountState::Healthy(e) if e.is_juicefs()))
    }

    /// Why a mount pod has not mounted yet, for the error: its state and its last log lines,
    /// scrubbed of the filesystem's secrets.
    fn diagnose(&self, name: &str, secrets: &JuiceFsSecrets) -> String {
        let pod = match self.api.get_pod(name) {
            Ok(Some(pod)) => describe_pod(&pod),
            Ok(None) => "pod gone".into(),
            Err(e) => e.to_string(),
        };
        let log = match self.api.pod_log_tail(name, 5) {
            Ok(text) => crate::mounter::last_lines(&text, 5),
            Err(e) => format!("no log ({e})"),
        };
        secrets
            .scrubber()
            .scrub(&format!("mount pod {name}: {pod}; log: {log}"))
    }

    fn mount_through_pod(
        &self,
        secrets: &JuiceFsSecrets,
        at: &Path,
        flags: &[String],
    ) -> Result<(), CsiError> {
        if self.mounted(at)? {
            return Ok(());
        }
        let name = mount_pod_name(&self.cfg.node_name, at);
        self.api
            .apply_secret(&build_secret(&self.cfg, &name, secrets, at))?;
        let pod = build_pod(&self.cfg, &name, secrets, at, flags);
        match self.api.create_pod(&pod)? {
            Created::New => info!(pod = %name, staging = %at.display(), "mount pod created"),
            Created::AlreadyExists => {
                info!(pod = %name, staging = %at.display(), "mount pod exists; waiting for its mount")
            }
        }
        let started = Instant::now();
        let mut last_look = started;
        loop {
            if self.mounted(at)? {
                return Ok(());
            }
            // Look at the pod now and then: it may have been deleted or have stopped for good
            // (evicted), and then it is replaced under the same name.
            if last_look.elapsed() >= self.cfg.poll * 10 {
                last_look = Instant::now();
                match self.api.get_pod(&name)? {
                    None => {
                        warn!(pod = %name, "mount pod gone; creating it again");
                        self.api.create_pod(&pod)?;
                    }
                    Some(p) if pod_finished(&p) && p.metadata.deletion_timestamp.is_none() => {
                        warn!(pod = %name, state = %describe_pod(&p), "mount pod stopped for good; replacing it");
                        self.api.delete_pod(&name, 0)?;
                    }
                    Some(_) => {}
                }
            }
            if started.elapsed() > self.cfg.mount_timeout {
                let mut detail = format!(
                    "not mounted after {:?}: {}",
                    self.cfg.mount_timeout,
                    self.diagnose(&name, secrets)
                );
                // A client that runs but never mounts (or hangs on a mount the watchdog
                // detached) is never restarted by the kubelet: replace it on the next try.
                if let Ok(Some(p)) = self.api.get_pod(&name)
                    && container_running(&p)
                {
                    match self
                        .api
                        .delete_pod(&name, self.cfg.termination_grace_seconds)
                    {
                        Ok(()) => detail.push_str(
                            "; deleted the stuck mount pod, the next attempt starts a new one",
                        ),
                        Err(e) => detail.push_str(&format!("; {e}")),
                    }
                }
                return Err(CsiError::Mount {
                    fs: secrets.name.clone(),
                    path: at.to_path_buf(),
                    detail,
                });
            }
            std::thread::sleep(self.cfg.poll);
        }
    }
}

impl<A: MountPodApi, H: Mounter> Mounter for PodMounter<A, H> {
    fn probe(&self) -> Result<(), String> {
        self.host.probe()
    }

    fn format(&self, secrets: &JuiceFsSecrets) -> Result<(), CsiError> {
        self.host.format(secrets)
    }

    /// Under the kubelet dir: applies the Secret, creates the mount pod (one that exists is
    /// kept, never duplicated) and waits until its mount is in the mount table and answers.
    /// Elsewhere: the host mounter.
    fn mount_fs(
        &self,
        secrets: &JuiceFsSecrets,
        at: &Path,
        flags: &[String],
    ) -> Result<(), CsiError> {
        if self.served_by_pod(at) {
            self.mount_through_pod(secrets, at, flags)
        } else {
            self.host.mount_fs(secrets, at, flags)
        }
    }

    fn set_quota(
        &self,
        secrets: &JuiceFsSecrets,
        dir_in_fs: &str,
        capacity_bytes: u64,
    ) -> Result<(), CsiError> {
        self.host.set_quota(secrets, dir_in_fs, capacity_bytes)
    }

    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<(), CsiError> {
        self.host.bind(source, target, read_only)
    }

    fn unmount(&self, path: &Path, lazy: bool) -> Result<(), CsiError> {
        self.host.unmount(path, lazy)
    }

    fn mounts(&self) -> Result<Vec<MountEntry>, CsiError> {
        self.host.mounts()
    }

    fn state(&self, path: &Path) -> Result<MountState, CsiError> {
        self.host.state(path)
    }

    /// Deletes the mount pod (juicefs gets SIGTERM and its grace period to unmount), waits
    /// until it stopped serving `at` (pod gone, or its mount gone or dead), then deletes the
    /// Secret. The driver unmounts whatever is left.
    fn release_fs(&self, at: &Path) -> Result<(), CsiError> {
        if !self.served_by_pod(at) {
            return self.host.release_fs(at);
        }
        let name = mount_pod_name(&self.cfg.node_name, at);
        self.api
            .delete_pod(&name, self.cfg.termination_grace_seconds)?;
        let grace =
            Duration::from_secs(u64::try_from(self.cfg.termination_grace_seconds).unwrap_or(0));
        let limit = grace + Duration::from_secs(15);
        let started = Instant::now();
        loop {
            // Not serving any more (its mount gone or dead, or the pod gone): a pod being
            // deleted is not restarted, so the driver may unmount what is left.
            if !self.mounted(at)? || self.api.get_pod(&name)?.is_none() {
                break;
            }
            if started.elapsed() > limit {
                return Err(MountPodError::PodOutlivedDeletion {
                    name,
                    staging: at.to_path_buf(),
                    waited: limit,
                }
                .into());
            }
            std::thread::sleep(self.cfg.poll);
        }
        self.api.delete_secret(&name)?;
        info!(pod = %name, staging = %at.display(), "mount pod deleted");
        Ok(())
    }

    fn replaces_dead_mounts(&self, at: &Path) -> bool {
        self.served_by_pod(at) || self.host.replaces_dead_mounts(at)
    }
}

#[cfg(test)]
mod tests {
    //! The builders as pure functions, and the pod-mode flow against a small in-memory
    //! cluster ([`World`]) that plays the API server, the kubelet running mount pods and the
    //! node's mount table. The kube-rs adapter is checked against `tower_test`'s mock service.
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    const PASSWORD: &str = "pw-Secret-4711";
    const SECRET_KEY: &str = "sk-never-in-a-pod-spec";

    fn secrets() -> JuiceFsSecrets {
        let map: HashMap<String, String> = [
            ("name", "fs1"),
            ("metaurl", "redis://:pw-Secret-4711@redis.ns.svc:6379/1"),
            ("access-key", "AK-1"),
            ("secret-key", SECRET_KEY),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        JuiceFsSecrets::from_maps(&map, &HashMap::new()).unwrap()
    }

    fn cfg() -> MountPodConfig {
        MountPodConfig {
            namespace: "shoal-system".into(),
            node_name: "node-a".into(),
            image: "ghcr.io/shoal-db/shoal-csi:0.1.0".into(),
            image_pull_policy: "IfNotPresent".into(),
            kubelet_dir: "/var/lib/kubelet".into(),
            cache_host_dir: "/var/lib/kubelet/plugins/csi.shoal.dev/state/cache".into(),
            priority_class: Some("system-node-critical".into()),
            shoal_csi: "/usr/local/bin/shoal-csi".into(),
            juicefs: "/usr/local/bin/juicefs".into(),
            mount_timeout: Duration::from_millis(300),
            termination_grace_seconds: 0,
            poll: Duration::from_millis(1),
        }
    }

    const STAGING: &str = "/var/lib/kubelet/plugins/kubernetes.io/csi/csi.shoal.dev/ab/globalmount";

    #[test]
    fn mount_pod_names_are_stable_per_node_and_staging_path_and_valid_object_names() {
        let a = mount_pod_name("node-a", Path::new(STAGING));
        assert_eq!(a, mount_pod_name("node-a", Path::new(STAGING)));
        assert_ne!(a, mount_pod_name("node-b", Path::new(STAGING)));
        assert_ne!(a, mount_pod_name("node-a", Path::new("/var/lib/kubelet/x")));
        assert!(a.starts_with("shoal-mount-") && a.len() == "shoal-mount-".len() + 16);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
        let long = "n".repeat(200);
        let label = node_label_value(&long);
        assert!(label.len() <= 63, "{label}");
        assert_eq!(node_label_value("node-a"), "node-a");
    }

    #[test]
    fn the_mount_pod_is_pinned_privileged_tolerant_and_shares_the_kubelet_dir_bidirectionally() {
        let c = cfg();
        let name = mount_pod_name(&c.node_name, Path::new(STAGING));
        let flags = vec!["--cache-size=100".to_string()];
        let pod = build_pod(&c, &name, &secrets(), Path::new(STAGING), &flags);
        let labels = pod.metadata.labels.clone().unwrap();
        assert_eq!(labels[MANAGED_BY.0], MANAGED_BY.1);
        assert_eq!(labels[NODE_LABEL], "node-a");
        assert_eq!(pod.metadata.namespace.as_deref(), Some("shoal-system"));
        assert_eq!(
            pod.metadata.annotations.clone().unwrap()[STAGING_ANNOTATION],
            STAGING
        );
        let spec = pod.spec.clone().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node-a"));
        assert_eq!(spec.restart_policy.as_deref(), Some("Always"));
        assert_eq!(
            spec.priority_class_name.as_deref(),
            Some("system-node-critical")
        );
        let tolerations = spec.tolerations.unwrap();
        assert_eq!(tolerations.len(), 1);
        assert_eq!(tolerations[0].operator.as_deref(), Some("Exists"));
        assert_eq!(tolerations[0].key, None, "every taint");
        let container = &spec.containers[0];
        assert_eq!(container.name, CONTAINER);
        assert_eq!(container.image.as_deref(), Some(c.image.as_str()));
        assert_eq!(
            container.security_context.as_ref().unwrap().privileged,
            Some(true)
        );
        let command = container.command.clone().unwrap();
        let dashes = command.iter().position(|a| a == "--").unwrap();
        assert_eq!(
            command[..dashes],
            [
                "/usr/local/bin/shoal-csi",
                "mount-pod",
                "--mount-point",
                STAGING
            ]
        );
        // The same `juicefs mount` as process mode, cache dir aside.
        let mut want = vec!["/usr/local/bin/juicefs".to_string()];
        want.extend(juicefs_mount_args(
            &secrets(),
            Path::new(POD_CACHE_DIR),
            &flags,
            Path::new(STAGING),
        ));
        assert_eq!(command[dashes + 1..], want[..]);
        assert!(command.contains(&"--cache-size=100".to_string()));
        assert_eq!(command.last().map(String::as_str), Some(STAGING));
        assert!(command.contains(&"redis://redis.ns.svc:6379/1".to_string()));
        let env_from = container.env_from.clone().unwrap();
        assert_eq!(env_from[0].secret_ref.as_ref().unwrap().name, name);

        let mounts = container.volume_mounts.clone().unwrap();
        let volumes = spec.volumes.unwrap();
        let host = |vol: &str| {
            volumes
                .iter()
                .find(|v| v.name == vol)
                .and_then(|v| v.host_path.clone())
                .unwrap()
        };
        let mount = |vol: &str| mounts.iter().find(|m| m.name == vol).unwrap().clone();
        assert_eq!(host("kubelet-dir").path, "/var/lib/kubelet");
        assert_eq!(mount("kubelet-dir").mount_path, "/var/lib/kubelet");
        assert_eq!(
            mount("kubelet-dir").mount_propagation.as_deref(),
            Some("Bidirectional")
        );
        assert!(Path::new(STAGING).starts_with(mount("kubelet-dir").mount_path));
        assert_eq!(host("fuse-device").path, "/dev/fuse");
        assert_eq!(host("fuse-device").type_.as_deref(), Some("CharDevice"));
        assert_eq!(host("cache").path, c.cache_host_dir.display().to_string());
        assert_eq!(mount("cache").mount_path, POD_CACHE_DIR);
        assert!(command.contains(&format!("--cache-dir={POD_CACHE_DIR}")));
    }

    #[test]
    fn credentials_go_to_the_secret_and_never_into_the_pod_spec() {
        let c = cfg();
        let s = secrets();
        let name = mount_pod_name(&c.node_name, Path::new(STAGING));
        let secret = build_secret(&c, &name, &s, Path::new(STAGING));
        assert_eq!(secret.metadata.name.as_deref(), Some(name.as_str()));
        assert_eq!(
            secret.metadata.labels.as_ref().unwrap()[MANAGED_BY.0],
            MANAGED_BY.1
        );
        let data = secret.data.unwrap();
        let want: BTreeMap<String, ByteString> = s
            .child_env()
            .into_iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
            .collect();
        assert_eq!(data, want);
        assert_eq!(data["META_PASSWORD"], ByteString(PASSWORD.into()));
        let pod =
            serde_json::to_string(&build_pod(&c, &name, &s, Path::new(STAGING), &[])).unwrap();
        for v in [PASSWORD, SECRET_KEY, "AK-1"] {
            assert!(!pod.contains(v), "{v} in {pod}");
        }
    }

    // ------------------------------------------------------------ the in-memory cluster

    /// How the fake kubelet runs a created mount pod.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Kubelet {
        /// The pod mounts after this many looks at the mount table.
        MountsAfter(usize),
        /// The container never starts: waits in CrashLoopBackOff, logging the meta URL.
        CrashLoops,
        /// The first pod is deleted by someone before it mounts; the next one mounts at once.
        VanishesOnce,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Mnt {
        Healthy,
        Dead,
    }

    struct World {
        kubelet: Kubelet,
        pods: Mutex<BTreeMap<String, Pod>>,
        secrets: Mutex<BTreeMap<String, Secret>>,
        mounts: Mutex<BTreeMap<PathBuf, Mnt>>,
        /// (path, looks left before the mount appears)
        pending: Mutex<Option<(PathBuf, usize)>>,
        calls: Mutex<Vec<String>>,
        vanished: std::sync::atomic::AtomicBool,
    }

    impl World {
        fn new(kubelet: Kubelet) -> Arc<World> {
            Arc::new(World {
                kubelet,
                pods: Mutex::default(),
                secrets: Mutex::default(),
                mounts: Mutex::default(),
                pending: Mutex::default(),
                calls: Mutex::default(),
                vanished: Default::default(),
            })
        }
        fn call(&self, what: String) {
            self.calls.lock().unwrap().push(what);
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
        fn writes(&self) -> Vec<String> {
            self.calls()
                .into_iter()
                .filter(|c| !c.starts_with("get") && !c.starts_with("log"))
                .collect()
        }
        /// The kubelet starts (or restarts) the pod's client, which mounts at its path.
        fn start(&self, pod: &Pod) {
            let staging = PathBuf::from(
                pod.metadata.annotations.as_ref().unwrap()[STAGING_ANNOTATION].clone(),
            );
            match self.kubelet {
                Kubelet::MountsAfter(n) => *self.pending.lock().unwrap() = Some((staging, n)),
                Kubelet::VanishesOnce => *self.pending.lock().unwrap() = Some((staging, 0)),
                Kubelet::CrashLoops => {}
            }
        }
    }

    struct FakeApi(Arc<World>);

    impl MountPodApi for FakeApi {
        fn apply_secret(&self, secret: &Secret) -> Result<(), MountPodError> {
            let name = secret.metadata.name.clone().unwrap();
            self.0.call(format!("apply secret {name}"));
            self.0.secrets.lock().unwrap().insert(name, secret.clone());
            Ok(())
        }
        fn create_pod(&self, pod: &Pod) -> Result<Created, MountPodError> {
            let name = pod.metadata.name.clone().unwrap();
            self.0.call(format!("create pod {name}"));
            let mut pods = self.0.pods.lock().unwrap();
            if pods.contains_key(&name) {
                return Ok(Created::AlreadyExists);
            }
            if self.0.kubelet == Kubelet::VanishesOnce
                && !self
                    .0
                    .vanished
                    .swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                return Ok(Created::New);
            }
            let mut running = pod.clone();
            running.status = Some(match self.0.kubelet {
                Kubelet::MountsAfter(_) | Kubelet::VanishesOnce => {
                    serde_json::from_value(serde_json::json!({
                        "phase": "Running",
                        "containerStatuses": [{"name": CONTAINER, "image": "", "imageID": "",
                            "ready": true, "restartCount": 0, "state": {"running": {}}}]
                    }))
                    .unwrap()
                }
                Kubelet::CrashLoops => serde_json::from_value(serde_json::json!({
                    "phase": "Running",
                    "containerStatuses": [{"name": CONTAINER, "image": "", "imageID": "",
                        "ready": false, "restartCount": 4,
                        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                        "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}}]
                }))
                .unwrap(),
            });
            pods.insert(name, running.clone());
            drop(pods);
            self.0.start(&running);
            Ok(Created::New)
        }
        fn get_pod(&self, name: &str) -> Result<Option<Pod>, MountPodError> {
            self.0.call(format!("get pod {name}"));
            Ok(self.0.pods.lock().unwrap().get(name).cloned())
        }
        fn delete_pod(&self, name: &str, _grace: i64) -> Result<(), MountPodError> {
            self.0.call(format!("delete pod {name}"));
            if let Some(pod) = self.0.pods.lock().unwrap().remove(name) {
                // juicefs unmounts on SIGTERM.
                let staging = &pod.metadata.annotations.as_ref().unwrap()[STAGING_ANNOTATION];
                self.0.mounts.lock().unwrap().remove(Path::new(staging));
            }
            Ok(())
        }
        fn delete_secret(&self, name: &str) -> Result<(), MountPodError> {
            self.0.call(format!("delete secret {name}"));
            self.0.secrets.lock().unwrap().remove(name);
            Ok(())
        }
        fn pod_log_tail(&self, name: &str, _lines: i64) -> Result<String, MountPodError> {
            self.0.call(format!("log {name}"));
            Ok(format!(
                "connecting to redis://:{PASSWORD}@redis.ns.svc:6379/1\nmeta: connection refused\n"
            ))
        }
    }

    struct FakeHost(Arc<World>);

    fn entry(at: &Path) -> MountEntry {
        MountEntry {
            mount_id: 1,
            parent_id: 1,
            major_minor: "0:99".into(),
            root: "/".into(),
            mount_point: at.to_path_buf(),
            mount_options: vec!["rw".into()],
            fs_type: "fuse.juicefs".into(),
            source: "JuiceFS:fs1".into(),
            super_options: vec![],
        }
    }

    impl Mounter for FakeHost {
        fn probe(&self) -> Result<(), String> {
            Ok(())
        }
        fn format(&self, _: &JuiceFsSecrets) -> Result<(), CsiError> {
            Ok(())
        }
        fn mount_fs(&self, _: &JuiceFsSecrets, at: &Path, _: &[String]) -> Result<(), CsiError> {
            self.0.call(format!("host mount {}", at.display()));
            self.0
                .mounts
                .lock()
                .unwrap()
                .insert(at.to_path_buf(), Mnt::Healthy);
            Ok(())
        }
        fn set_quota(&self, _: &JuiceFsSecrets, _: &str, _: u64) -> Result<(), CsiError> {
            Ok(())
        }
        fn bind(&self, _: &Path, _: &Path, _: bool) -> Result<(), CsiError> {
            Ok(())
        }
        fn unmount(&self, path: &Path, _: bool) -> Result<(), CsiError> {
            self.0.mounts.lock().unwrap().remove(path);
            Ok(())
        }
        fn mounts(&self) -> Result<Vec<MountEntry>, CsiError> {
            Ok(self
                .0
                .mounts
                .lock()
                .unwrap()
                .keys()
                .map(|p| entry(p))
                .collect())
        }
        fn state(&self, path: &Path) -> Result<MountState, CsiError> {
            let mut pending = self.0.pending.lock().unwrap();
            if let Some((at, left)) = pending.as_mut()
                && at == path
            {
                if *left == 0 {
                    self.0
                        .mounts
                        .lock()
                        .unwrap()
                        .insert(at.clone(), Mnt::Healthy);
                    *pending = None;
                } else {
                    *left -= 1;
                }
            }
            Ok(match self.0.mounts.lock().unwrap().get(path) {
                None => MountState::NotMounted,
                Some(Mnt::Healthy) => MountState::Healthy(entry(path)),
                Some(Mnt::Dead) => MountState::Dead(entry(path)),
            })
        }
    }

    fn pod_mounter(world: &Arc<World>) -> PodMounter<FakeApi, FakeHost> {
        PodMounter::new(FakeApi(world.clone()), FakeHost(world.clone()), cfg())
    }

    fn name() -> String {
        mount_pod_name("node-a", Path::new(STAGING))
    }

    #[test]
    fn staging_creates_one_secret_and_one_pod_and_returns_once_the_pod_has_mounted() {
        let world = World::new(Kubelet::MountsAfter(5));
        let m = pod_mounter(&world);
        m.mount_fs(&secrets(), Path::new(STAGING), &[]).unwrap();
        assert!(matches!(
            m.state(Path::new(STAGING)).unwrap(),
            MountState::Healthy(_)
        ));
        let n = name();
        assert_eq!(
            world.writes(),
            [format!("apply secret {n}"), format!("create pod {n}")]
        );
        assert!(world.pods.lock().unwrap().contains_key(&n));
        assert!(world.secrets.lock().unwrap().contains_key(&n));
        assert!(m.replaces_dead_mounts(Path::new(STAGING)));
    }

    #[test]
    fn a_mount_pod_that_exists_without_its_mount_is_waited_on_not_duplicated() {
        let world = World::new(Kubelet::MountsAfter(0));
        let m = pod_mounter(&world);
        m.mount_fs(&secrets(), Path::new(STAGING), &[]).unwrap();
        // The client died: the mount is dead, the kubelet restarts the container, which clears
        // the dead mount and mounts again.
        world
            .mounts
            .lock()
            .unwrap()
            .insert(STAGING.into(), Mnt::Dead);
        *world.pending.lock().unwrap() = Some((STAGING.into(), 3));
        m.mount_fs(&secrets(), Path::new(STAGING), &[]).unwrap();
        assert_eq!(world.pods.lock().unwrap().len(), 1);
        let creates = world
            .calls()
            .into_iter()
            .filter(|c| c.starts_with("create pod"))
            .count();
        assert_eq!(
            creates,
            2,
            "the second create found the pod: {:?}",
            world.calls()
        );
        assert!(!world.writes().iter().any(|c| c.starts_with("delete")));
    }

    #[test]
    fn a_healthy_mount_is_adopted_without_a_call_to_the_api() {
        let world = World::new(Kubelet::MountsAfter(0));
        world
            .mounts
            .lock()
            .unwrap()
            .insert(STAGING.into(), Mnt::Healthy);
        pod_mounter(&world)
            .mount_fs(&secrets(), Path::new(STAGING), &[])
            .unwrap();
        assert!(world.calls().is_empty(), "{:?}", world.calls());
    }

    #[test]
    fn a_mount_pod_that_never_mounts_fails_with_its_state_and_its_log_scrubbed() {
        let world = World::new(Kubelet::CrashLoops);
        let err = pod_mounter(&world)
            .mount_fs(&secrets(), Path::new(STAGING), &[])
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, CsiError::Mount { .. }), "{text}");
        assert!(text.contains("CrashLoopBackOff"), "{text}");
        assert!(text.contains("exit code 1"), "{text}");
        assert!(text.contains("4 restart(s)"), "{text}");
        assert!(text.contains("connection refused"), "{text}");
        assert!(!text.contains(PASSWORD), "{text}");
        // A container that is not running is left to the kubelet's restarts.
        assert!(!world.writes().iter().any(|c| c.starts_with("delete")));
    }

    #[test]
    fn a_mount_pod_deleted_before_it_mounted_is_created_again_while_waiting() {
        let world = World::new(Kubelet::VanishesOnce);
        pod_mounter(&world)
            .mount_fs(&secrets(), Path::new(STAGING), &[])
            .unwrap();
        let n = name();
        let calls = world.calls();
        let creates = calls.iter().filter(|c| c.starts_with("create pod")).count();
        assert_eq!(creates, 2, "{calls:?}");
        assert!(calls.contains(&format!("get pod {n}")), "{calls:?}");
        assert_eq!(world.pods.lock().unwrap().len(), 1);
    }

    #[test]
    fn release_deletes_the_pod_then_the_secret_and_absent_objects_are_success() {
        let world = World::new(Kubelet::MountsAfter(0));
        let m = pod_mounter(&world);
        m.mount_fs(&secrets(), Path::new(STAGING), &[]).unwrap();
        m.release_fs(Path::new(STAGING)).unwrap();
        let n = name();
        let writes = world.writes();
        assert_eq!(
            writes[writes.len() - 2..],
            [format!("delete pod {n}"), format!("delete secret {n}")]
        );
        assert!(world.pods.lock().unwrap().is_empty());
        assert!(world.secrets.lock().unwrap().is_empty());
        assert_eq!(m.state(Path::new(STAGING)).unwrap(), MountState::NotMounted);
        m.release_fs(Path::new(STAGING)).unwrap();
    }

    #[test]
    fn mounts_outside_the_kubelet_dir_stay_in_process() {
        let world = World::new(Kubelet::MountsAfter(0));
        let m = pod_mounter(&world);
        let controller = Path::new("/var/lib/shoal-csi/controller/fs1");
        m.mount_fs(&secrets(), controller, &[]).unwrap();
        m.release_fs(controller).unwrap();
        assert!(!m.replaces_dead_mounts(controller));
        assert_eq!(
            world.calls(),
            [format!("host mount {}", controller.display())]
        );
    }

    // ------------------------------------------------------------ the kube-rs adapter

    /// Answers each request with the next (status, body) and records (method, path, query,
    /// content type).
    async fn serve(
        mut handle: tower_test::mock::Handle<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >,
        answers: Vec<(u16, serde_json::Value)>,
    ) -> Vec<(String, String, String)> {
        let mut seen = Vec::new();
        for (code, body) in answers {
            let (req, send) = handle.next_request().await.unwrap();
            seen.push((
                req.method().to_string(),
                req.uri().path().to_string(),
                format!(
                    "{}|{}",
                    req.uri().query().unwrap_or_default(),
                    req.headers()
                        .get(http::header::CONTENT_TYPE)
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_default()
                ),
            ));
            send.send_response(
                http::Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
        }
        seen
    }

    fn status(code: u16, reason: &str) -> serde_json::Value {
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": format!("{reason} here"), "reason": reason, "code": code})
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_kube_adapter_treats_conflict_as_existing_and_not_found_as_gone() {
        let (svc, handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let client = kube::Client::new(svc, "default");
        let c = cfg();
        let n = name();
        let pod = build_pod(&c, &n, &secrets(), Path::new(STAGING), &[]);
        let secret = build_secret(&c, &n, &secrets(), Path::new(STAGING));
        let pod_json = serde_json::to_value(&pod).unwrap();
        let answers = vec![
            (200, serde_json::to_value(&secret).unwrap()),
            (201, pod_json.clone()),
            (409, status(409, "AlreadyExists")),
            (404, status(404, "NotFound")),
            (404, status(404, "NotFound")),
            (404, status(404, "NotFound")),
            (403, status(403, "Forbidden")),
        ];
        let server = tokio::spawn(serve(handle, answers));
        let api = KubeMountPodApi::new(client, "shoal-system", tokio::runtime::Handle::current());
        let results = tokio::task::spawn_blocking(move || {
            (
                api.apply_secret(&secret),
                api.create_pod(&pod),
                api.create_pod(&pod),
                api.get_pod(&n),
                api.delete_pod(&n, 30),
                api.delete_secret(&n),
                api.delete_pod(&n, 30),
            )
        })
        .await
        .unwrap();
        assert_eq!(results.0, Ok(()));
        assert_eq!(results.1, Ok(Created::New));
        assert_eq!(results.2, Ok(Created::AlreadyExists));
        assert_eq!(results.3, Ok(None));
        assert_eq!(results.4, Ok(()));
        assert_eq!(results.5, Ok(()));
        assert!(
            matches!(&results.6, Err(MountPodError::DeletePod { source, .. }) if source.code == Some(403) && source.message == "Forbidden here"),
            "{:?}",
            results.6
        );
        let seen = server.await.unwrap();
        let n = name();
        let ns = "/api/v1/namespaces/shoal-system";
        assert_eq!(seen[0].0, "PATCH");
        assert_eq!(seen[0].1, format!("{ns}/secrets/{n}"));
        assert!(
            seen[0].2.contains("fieldManager=shoal-csi"),
            "{:?}",
            seen[0]
        );
        assert!(seen[0].2.contains("force=true"), "{:?}", seen[0]);
        assert!(
            seen[0].2.contains("application/apply-patch+yaml"),
            "{:?}",
            seen[0]
        );
        assert_eq!(
            (seen[1].0.as_str(), seen[1].1.as_str()),
            ("POST", format!("{ns}/pods").as_str())
        );
        assert_eq!(seen[3].0, "GET");
        assert_eq!(seen[4].0, "DELETE");
        assert_eq!(seen[5].1, format!("{ns}/secrets/{n}"));
    }
}
