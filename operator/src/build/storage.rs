//! The shared filesystem: the JuiceFS Secret `csi.shoal.dev` reads (JuiceFS CSI field names;
//! an Azure connection string goes in `envs` as `AZURE_STORAGE_CONNECTION_STRING`, the variable
//! `juicefs` reads, as JuiceFS CSI users write it),
//! the static PersistentVolume on that driver (ReadWriteMany) and the claim the engine pods
//! mount. Also the volume-claim template helper used by the StatefulSets.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, ObjectReference, PersistentVolume, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeSpec, Secret, SecretReference,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{Inputs, object_meta, stamp};
use crate::crd::ObjectStorageType;
use crate::crd::ReclaimPolicy;
use crate::names::{CSI_DRIVER, Component, PORT_REDIS, REDIS_DATA_DB, REDIS_DB};
use crate::validate::{RedisSource, ValidatedCluster};

/// The environment variable JuiceFS's `wasb` reads its connection string from.
pub const AZURE_CONNECTION_STRING_ENV: &str = "AZURE_STORAGE_CONNECTION_STRING";

/// The JuiceFS metadata URL for the cluster's Redis.
pub fn juicefs_meta_url(vc: &ValidatedCluster, inputs: &Inputs) -> String {
    match (&vc.redis, &inputs.external_redis_url) {
        (RedisSource::External(_), Some(url)) => url.clone(),
        // An external Redis whose URL could not be read never reaches build (apply fails
        // first); fall back to the managed address so this function stays total.
        (RedisSource::External(_), None) | (RedisSource::Managed(_), _) => format!(
            "redis://:{}@{}:{PORT_REDIS}/{REDIS_DB}",
            inputs.credentials.redis_password,
            vc.names.svc_host(&vc.names.redis())
        ),
    }
}

/// The JuiceFS bucket: as given, or, for `redis` storage with no bucket (validation allows that
/// only with the managed Redis), a separate database of the managed Redis.
pub fn juicefs_bucket(vc: &ValidatedCluster, inputs: &Inputs) -> String {
    let os = &vc.spec.storage.object_storage;
    if os.type_ == ObjectStorageType::Redis && os.bucket.trim().is_empty() {
        format!(
            "redis://:{}@{}:{PORT_REDIS}/{REDIS_DATA_DB}",
            inputs.credentials.redis_password,
            vc.names.svc_host(&vc.names.redis())
        )
    } else {
        os.bucket.clone()
    }
}

pub fn build_juicefs_secret(vc: &ValidatedCluster, inputs: &Inputs) -> Secret {
    let os = &vc.spec.storage.object_storage;
    let mut data = BTreeMap::from([
        ("name".to_string(), vc.names.juicefs_name()),
        ("metaurl".to_string(), juicefs_meta_url(vc, inputs)),
        ("storage".to_string(), os.type_.as_str().to_string()),
        ("bucket".to_string(), juicefs_bucket(vc, inputs)),
    ]);
    if let Some((ak, sk)) = &inputs.object_keys {
        data.insert("access-key".into(), ak.clone());
        data.insert("secret-key".into(), sk.clone());
    }
    if let Some(cs) = &inputs.azure_connection_string {
        let envs = serde_json::json!({ AZURE_CONNECTION_STRING_ENV: cs });
        data.insert("envs".into(), envs.to_string());
    }
    if let Some(opts) = &vc.spec.storage.juicefs.format_options {
        data.insert("format-options".into(), opts.clone());
    }
    stamp(
        Secret {
            metadata: object_meta(vc, vc.names.juicefs_secret(), Component::Storage),
            data: Some(
                data.into_iter()
                    .map(|(k, v)| (k, ByteString(v.into_bytes())))
                    .collect(),
            ),
            type_: Some("Opaque".into()),
            ..Secret::default()
        },
        |s| &mut s.metadata,
    )
}

/// The shared volume. Cluster-scoped, so it has no owner reference; with `reclaimPolicy:
/// Delete` it is marked as provisioned by the driver so the provisioner deletes the data.
pub fn build_shared_pv(vc: &ValidatedCluster) -> PersistentVolume {
    let n = &vc.names;
    let delete = vc.spec.storage.reclaim_policy == ReclaimPolicy::Delete;
    let mut meta = ObjectMeta {
        name: Some(n.shared_pv()),
        labels: Some(n.labels(Component::Storage)),
        ..ObjectMeta::default()
    };
    if delete {
        // The external-provisioner deletes a volume it provisioned (this annotation) through
        // DeleteVolume, with the Secret these annotations name: the same JuiceFS Secret the
        // nodes stage with, which the finalizer keeps alive until the volume is gone.
        meta.annotations = Some(BTreeMap::from([
            (
                "pv.kubernetes.io/provisioned-by".to_string(),
                CSI_DRIVER.to_string(),
            ),
            (
                "volume.kubernetes.io/provisioner-deletion-secret-name".to_string(),
                n.juicefs_secret(),
            ),
            (
                "volume.kubernetes.io/provisioner-deletion-secret-namespace".to_string(),
                n.namespace.clone(),
            ),
        ]));
    }
    let mut attrs = BTreeMap::new();
    if let Some(cache) = vc.spec.storage.juicefs.cache_size {
        attrs.insert("cache-size".to_string(), cache.to_string());
    }
    let secret_ref = SecretReference {
        name: Some(n.juicefs_secret()),
        namespace: Some(n.namespace.clone()),
    };
    stamp(
        PersistentVolume {
            metadata: meta,
            spec: Some(PersistentVolumeSpec {
                access_modes: Some(vec!["ReadWriteMany".into()]),
                capacity: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(vc.spec.storage.capacity.clone()),
                )])),
                persistent_volume_reclaim_policy: Some(
                    if delete { "Delete" } else { "Retain" }.into(),
                ),
                storage_class_name: Some(String::new()),
                volume_mode: Some("Filesystem".into()),
                claim_ref: Some(ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("PersistentVolumeClaim".into()),
                    name: Some(n.shared_pvc()),
                    namespace: Some(n.namespace.clone()),
                    ..ObjectReference::default()
                }),
                csi: Some(CSIPersistentVolumeSource {
                    driver: CSI_DRIVER.into(),
                    volume_handle: n.volume_handle(),
                    fs_type: None,
                    read_only: None,
                    node_stage_secret_ref: Some(secret_ref.clone()),
                    node_publish_secret_ref: Some(secret_ref.clone()),
                    controller_expand_secret_ref: None,
                    controller_publish_secret_ref: None,
                    volume_attributes: if attrs.is_empty() { None } else { Some(attrs) },
                    ..CSIPersistentVolumeSource::default()
                }),
                ..PersistentVolumeSpec::default()
            }),
            ..PersistentVolume::default()
        },
        |p| &mut p.metadata,
    )
}

pub fn build_shared_pvc(vc: &ValidatedCluster) -> PersistentVolumeClaim {
    let n = &vc.names;
    stamp(
        PersistentVolumeClaim {
            metadata: object_meta(vc, n.shared_pvc(), Component::Storage),
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteMany".into()]),
                storage_class_name: Some(String::new()),
                volume_name: Some(n.shared_pv()),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_string(),
                        Quantity(vc.spec.storage.capacity.clone()),
                    )])),
                    ..VolumeResourceRequirements::default()
                }),
                ..PersistentVolumeClaimSpec::default()
            }),
            ..PersistentVolumeClaim::default()
        },
        |p| &mut p.metadata,
    )
}

/// A StatefulSet volume-claim template (ReadWriteOnce). Labelled with the cluster so cleanup
/// under `reclaimPolicy: Delete` finds the claims the StatefulSet controller makes from it.
pub fn claim_template(
    vc: &ValidatedCluster,
    name: &str,
    component: Component,
    size: &str,
    class: Option<&String>,
) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(vc.names.labels(component)),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: class.cloned(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(size.to_string()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}
