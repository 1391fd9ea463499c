//! The `VectorCluster` custom resource (`shoal.dev/v1alpha1`): spec, status and the generated CRD.
//!
//! Owns the wire shape users write in YAML. Doc comments become the schema's descriptions; serde
//! defaults become schema defaults; schemars attributes carry the validation the API server
//! enforces. Must not depend on the reconcile modules: everything else reads these types.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use kube::core::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Default engine image, kept in step with the chart's `values.yaml`.
pub const DEFAULT_ENGINE_IMAGE: &str = "ghcr.io/shoal-db/shoal-engine:0.1.0";
/// Default MariaDB image for a managed metadata store.
pub const DEFAULT_MYSQL_IMAGE: &str = "mariadb:11.4";
/// Default Redis image for managed JuiceFS metadata.
pub const DEFAULT_REDIS_IMAGE: &str = "redis:7.2";
/// Default extended resource name for GPUs.
pub const DEFAULT_GPU_RESOURCE: &str = "nvidia.com/gpu";

/// A Shoal vector search cluster: one writer, N (GPU) readers and a router sharing one JuiceFS
/// filesystem, with MySQL for the catalogue and Redis for JuiceFS metadata (managed or external).
// clippy reads the repeated `printcolumn(type_ = ...)` keys of kube's attribute as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "shoal.dev",
    version = "v1alpha1",
    kind = "VectorCluster",
    namespaced,
    shortname = "vc",
    doc = "A Shoal vector search cluster: one writer, N (GPU) readers and a router sharing one JuiceFS filesystem.",
    status = "VectorClusterStatus",
    derive = "PartialEq",
    scale(
        spec_replicas_path = ".spec.readers.replicas",
        status_replicas_path = ".status.readers.replicas",
        label_selector_path = ".status.readers.selector"
    ),
    printcolumn(
        name = "Readers",
        type_ = "integer",
        json_path = ".spec.readers.replicas",
        description = "Desired reader replicas"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readers.readyReplicas",
        description = "Ready reader replicas"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Lifecycle phase"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct VectorClusterSpec {
    /// The Shoal engine image and settings shared by the writer, readers and router.
    #[serde(default)]
    pub engine: EngineSpec,
    /// The SQL metadata store (catalogue of collections and segments): a managed MariaDB
    /// StatefulSet (the default) or an external MySQL-compatible server.
    #[serde(default)]
    pub metadata: MetadataSpec,
    /// The shared filesystem: JuiceFS with Redis metadata and data in object storage.
    pub storage: StorageSpec,
    /// The single writer (one replica, read-write mount, write-ahead log on its own volume).
    #[serde(default)]
    pub writer: WriterSpec,
    /// The readers that serve searches (read-only mount, optionally on GPUs). The scale
    /// subresource maps to `readers.replicas`.
    #[serde(default)]
    pub readers: ReadersSpec,
    /// The router: the public REST API that forwards writes and fans searches out.
    #[serde(default)]
    pub router: RouterSpec,
}

/// Engine image and settings. A change here rolls writer, readers and router (writer first).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EngineSpec {
    /// Container image of `shoal-engine`.
    #[serde(default = "default_engine_image")]
    #[schemars(length(min = 1))]
    pub image: String,
    /// Image pull policy (Always, IfNotPresent or Never); Kubernetes' default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// How often the writer seals the growing buffer into a segment, e.g. `1s`, `500ms`.
    #[serde(default = "default_flush_interval")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m)$"))]
    pub flush_interval: String,
    /// Log filter for every engine process (`RUST_LOG` syntax), e.g. `info` or `shoal=debug`.
    #[serde(default = "default_log_level")]
    #[schemars(length(min = 1))]
    pub log_level: String,
}

impl Default for EngineSpec {
    fn default() -> Self {
        Self {
            image: default_engine_image(),
            image_pull_policy: None,
            flush_interval: default_flush_interval(),
            log_level: default_log_level(),
        }
    }
}

/// Image pull policy.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    /// Always pull.
    Always,
    /// Pull only when the image is missing on the node.
    IfNotPresent,
    /// Never pull.
    Never,
}

impl PullPolicy {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// The MySQL metadata store: set `managed` or `external`, not both (neither means managed
/// with defaults).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetadataSpec {
    /// A MariaDB StatefulSet run by the operator, with credentials in a generated Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<ManagedDatabase>,
    /// An existing MySQL-compatible server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalMetadata>,
}

/// A database the operator runs as a one-replica StatefulSet.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManagedDatabase {
    /// Container image.
    #[serde(default = "default_mysql_image")]
    #[schemars(length(min = 1))]
    pub image: String,
    /// Size of the data volume, a Kubernetes quantity such as `10Gi`.
    #[serde(default = "default_db_storage")]
    #[schemars(length(min = 1))]
    pub storage: String,
    /// StorageClass of the data volume; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// CPU and memory requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

impl Default for ManagedDatabase {
    fn default() -> Self {
        Self {
            image: default_mysql_image(),
            storage: default_db_storage(),
            storage_class_name: None,
            resources: None,
        }
    }
}

/// A reference to one key of a Secret in the cluster's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key inside the Secret.
    #[schemars(length(min = 1))]
    pub key: String,
}

/// An existing MySQL server.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalMetadata {
    /// Secret key holding the full URI, `mysql://user:password@host:3306/database`.
    pub uri_secret_ref: SecretKeyRef,
}

/// The shared filesystem.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Redis holding JuiceFS metadata: managed (AOF on) or external.
    #[serde(default)]
    pub redis: RedisSpec,
    /// Where JuiceFS stores file data.
    pub object_storage: ObjectStorageSpec,
    /// JuiceFS format and mount settings.
    #[serde(default)]
    pub juicefs: JuiceFsSpec,
    /// Capacity announced by the shared PersistentVolume (JuiceFS itself is elastic).
    #[serde(default = "default_volume_capacity")]
    #[schemars(length(min = 1))]
    pub capacity: String,
    /// What happens to data when the VectorCluster is deleted: `Retain` keeps the shared volume,
    /// the database volumes and the generated credentials that open them, and a VectorCluster
    /// re-created under the same name gets the old data back; `Delete` removes them all.
    #[serde(default)]
    pub reclaim_policy: ReclaimPolicy,
}

/// Redis for JuiceFS metadata: set `managed` or `external`, not both (neither means managed).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisSpec {
    /// A Redis StatefulSet run by the operator (append-only file on, password generated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<ManagedRedis>,
    /// An existing Redis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalRedis>,
}

/// A Redis the operator runs.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManagedRedis {
    /// Container image.
    #[serde(default = "default_redis_image")]
    #[schemars(length(min = 1))]
    pub image: String,
    /// Size of the data volume (append-only file), a Kubernetes quantity such as `5Gi`.
    #[serde(default = "default_redis_storage")]
    #[schemars(length(min = 1))]
    pub storage: String,
    /// StorageClass of the data volume; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// CPU and memory requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

impl Default for ManagedRedis {
    fn default() -> Self {
        Self {
            image: default_redis_image(),
            storage: default_redis_storage(),
            storage_class_name: None,
            resources: None,
        }
    }
}

/// An existing Redis.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalRedis {
    /// Secret key holding the JuiceFS metadata URL, `redis://[:password@]host:6379/1`.
    pub url_secret_ref: SecretKeyRef,
}

/// Object storage for JuiceFS data.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectStorageSpec {
    /// JuiceFS storage type.
    #[serde(rename = "type")]
    pub type_: ObjectStorageType,
    /// Bucket URL as JuiceFS expects it, e.g. `https://mybucket.s3.us-east-1.amazonaws.com`,
    /// `http://minio.storage:9000/shoal`, `https://CONTAINER.blob.core.windows.net` for `wasb`
    /// (JuiceFS takes the container from the first label of the host), or a directory for `file`. Required for every type but
    /// `redis` with the managed Redis, where empty means "database 2 of the managed Redis".
    #[serde(default)]
    pub bucket: String,
    /// Secret with the access and secret keys (for `wasb`: the account name and key) or, for
    /// `wasb`, an Azure Storage connection string; omit for storage that needs none (`file`) or
    /// uses workload identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<CredentialsSecretRef>,
}

/// JuiceFS storage types Shoal supports.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ObjectStorageType {
    /// Amazon S3 or any S3-compatible service.
    S3,
    /// Google Cloud Storage.
    Gs,
    /// Azure Blob Storage.
    Wasb,
    /// Alibaba Cloud OSS.
    Oss,
    /// MinIO.
    Minio,
    /// Ceph RADOS gateway.
    Ceph,
    /// A local or network directory (single node or a shared NFS path).
    File,
    /// Data blocks kept in Redis: no extra service for a first try (the managed Redis serves
    /// both metadata and data). Production wants S3-class object storage.
    Redis,
}

impl ObjectStorageType {
    /// The name `juicefs format --storage` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectStorageType::S3 => "s3",
            ObjectStorageType::Gs => "gs",
            ObjectStorageType::Wasb => "wasb",
            ObjectStorageType::Oss => "oss",
            ObjectStorageType::Minio => "minio",
            ObjectStorageType::Ceph => "ceph",
            ObjectStorageType::File => "file",
            ObjectStorageType::Redis => "redis",
        }
    }
}

/// Where the object storage keys live.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key of the access key.
    #[serde(default = "default_access_key_key")]
    pub access_key_key: String,
    /// Key of the secret key.
    #[serde(default = "default_secret_key_key")]
    pub secret_key_key: String,
    /// Key of an Azure Storage connection string (type `wasb` only). When set, the access and
    /// secret keys are not read: the string reaches `juicefs` as
    /// `AZURE_STORAGE_CONNECTION_STRING` through the JuiceFS Secret's `envs` field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub connection_string_key: Option<String>,
}

/// JuiceFS settings.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JuiceFsSpec {
    /// Extra `juicefs format` options, e.g. `--trash-days=0 --block-size=4096`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format_options: Option<String>,
    /// Local cache size per mount in MiB (`juicefs mount --cache-size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub cache_size: Option<i64>,
}

/// What deleting the VectorCluster does to data.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ReclaimPolicy {
    /// Keep the shared volume and database volumes (the default).
    #[default]
    Retain,
    /// Remove the shared volume and database volumes with the cluster.
    Delete,
}

/// The writer.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WriterSpec {
    /// CPU and memory requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node labels the writer pod must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the writer pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// The write-ahead log volume (local to the writer, not on the shared filesystem).
    #[serde(default)]
    pub wal: WalSpec,
}

/// The write-ahead log volume.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WalSpec {
    /// Size, a Kubernetes quantity such as `10Gi`.
    #[serde(default = "default_wal_storage")]
    #[schemars(length(min = 1))]
    pub storage: String,
    /// StorageClass; the cluster default when unset. Prefer a fast local disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

impl Default for WalSpec {
    fn default() -> Self {
        Self {
            storage: default_wal_storage(),
            storage_class_name: None,
        }
    }
}

/// The readers.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReadersSpec {
    /// Number of reader pods (the scale subresource and an HPA change this).
    #[serde(default = "default_reader_replicas")]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// GPUs per reader; readers run on CPU when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<GpuSpec>,
    /// How many readers keep each segment hot (the router's rendezvous-hash replication).
    #[serde(default = "default_replication_factor")]
    #[schemars(range(min = 1))]
    pub replication_factor: i32,
    /// CPU and memory requests and limits (GPU limits are added from `gpu`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node labels reader pods must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of reader pods (a toleration for the GPU resource is added when `gpu` is set).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Affinity of reader pods; readers are also spread across nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
}

impl Default for ReadersSpec {
    fn default() -> Self {
        Self {
            replicas: default_reader_replicas(),
            gpu: None,
            replication_factor: default_replication_factor(),
            resources: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            affinity: None,
        }
    }
}

/// GPUs for each reader.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuSpec {
    /// GPUs per reader pod.
    #[schemars(range(min = 1))]
    pub count: i32,
    /// Extended resource name of the GPU device plugin.
    #[serde(default = "default_gpu_resource")]
    #[schemars(length(min = 1))]
    pub resource_name: String,
    /// GPU memory the engine may use for resident segments, per reader, e.g. `40Gi`
    /// (`--gpu-memory-budget`); the engine's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_budget: Option<String>,
}

/// The router.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouterSpec {
    /// Number of router pods.
    #[serde(default = "default_router_replicas")]
    #[schemars(range(min = 1))]
    pub replicas: i32,
    /// The Service clients connect to.
    #[serde(default)]
    pub service: RouterServiceSpec,
    /// Token authentication for the public API; open when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,
    /// CPU and memory requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

impl Default for RouterSpec {
    fn default() -> Self {
        Self {
            replicas: default_router_replicas(),
            service: RouterServiceSpec::default(),
            auth: None,
            resources: None,
        }
    }
}

/// The router's Service.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouterServiceSpec {
    /// Service type.
    #[serde(rename = "type", default)]
    pub type_: ServiceType,
    /// Port of the public REST API.
    #[serde(default = "default_router_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Annotations for the Service (load balancer settings).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Default for RouterServiceSpec {
    fn default() -> Self {
        Self {
            type_: ServiceType::default(),
            port: default_router_port(),
            annotations: BTreeMap::new(),
        }
    }
}

/// Kubernetes Service type.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    /// Reachable inside the cluster.
    #[default]
    ClusterIP,
    /// Also on a port of every node.
    NodePort,
    /// Also through a cloud load balancer.
    LoadBalancer,
}

impl ServiceType {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Public API authentication.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// Secret key holding the accepted token (`user:password`).
    pub token_secret_ref: SecretKeyRef,
}

/// Observed state, written only by the operator.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VectorClusterStatus {
    /// Lifecycle phase: Pending, Provisioning, Running, Degraded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// MetadataReady, StorageReady, WriterReady, ReadersReady, Ready, Progressing, Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Reader counts and the selector the scale subresource reports.
    #[serde(default)]
    pub readers: ReadersStatus,
    /// In-cluster URL of the public REST API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// Reader counts.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReadersStatus {
    /// Reader pods that exist.
    #[serde(default)]
    pub replicas: i32,
    /// Reader pods that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of reader pods (for the scale subresource and HPAs).
    #[serde(default)]
    pub selector: String,
}

/// Lifecycle phase.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Accepted, nothing created yet.
    Pending,
    /// Objects created, waiting for them to become ready.
    Provisioning,
    /// Every component is ready.
    Running,
    /// Was running, now some component is not ready.
    Degraded,
    /// The spec cannot be reconciled; see the conditions.
    Failed,
}

fn default_engine_image() -> String {
    DEFAULT_ENGINE_IMAGE.to_string()
}
fn default_flush_interval() -> String {
    "1s".to_string()
}
fn default_log_level() -> String {
    "info".to_string()
}
fn default_mysql_image() -> String {
    DEFAULT_MYSQL_IMAGE.to_string()
}
fn default_redis_image() -> String {
    DEFAULT_REDIS_IMAGE.to_string()
}
fn default_db_storage() -> String {
    "10Gi".to_string()
}
fn default_redis_storage() -> String {
    "5Gi".to_string()
}
fn default_wal_storage() -> String {
    "10Gi".to_string()
}
fn default_volume_capacity() -> String {
    "1Ti".to_string()
}
fn default_access_key_key() -> String {
    "access-key".to_string()
}
fn default_secret_key_key() -> String {
    "secret-key".to_string()
}
fn default_reader_replicas() -> i32 {
    2
}
fn default_replication_factor() -> i32 {
    1
}
fn default_gpu_resource() -> String {
    DEFAULT_GPU_RESOURCE.to_string()
}
fn default_router_replicas() -> i32 {
    1
}
fn default_router_port() -> i32 {
    19530
}

/// The CRD as YAML, exactly what `crds/vectorcluster.yaml` holds.
///
/// Errors: only if serialisation fails, which would be a bug in the types.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    let crd = VectorCluster::crd();
    Ok(format!(
        "# Generated by `shoal-operator crd`; do not edit (make crds).\n{}",
        serde_yaml::to_string(&crd)?
    ))
}
