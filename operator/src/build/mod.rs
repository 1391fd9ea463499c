//! Step 2 of the reconcile pipeline: pure builders from a [`ValidatedCluster`] (plus the few
//! values read from Secrets, [`Inputs`]) to the Kubernetes objects the cluster needs.
//!
//! No API calls and no clocks or randomness here: the same input always yields the same
//! objects, which is what makes the applied-hash comparison (zero writes at steady state) and
//! the fixture tests possible. Each object carries the cluster's labels, an owner reference
//! (except the cluster-scoped PersistentVolume) and the hash of its own content.

pub mod config;
pub mod database;
pub mod engine;
pub mod secret;
pub mod storage;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolume, PersistentVolumeClaim, Secret, Service,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::names::{ANNOTATION_APPLIED_HASH, Component};
use crate::validate::ValidatedCluster;

/// Values the builders need that live in Secrets (read by `apply`, never logged).
#[derive(Clone, PartialEq, Eq)]
pub struct Inputs {
    /// Contents of the generated Secret.
    pub credentials: secret::Credentials,
    /// The external Redis URL, when `storage.redis.external` is used.
    pub external_redis_url: Option<String>,
    /// Object storage access key and secret key, when a credentials Secret is referenced
    /// without a connection string.
    pub object_keys: Option<(String, String)>,
    /// The Azure Storage connection string, when the credentials Secret reference names one.
    pub azure_connection_string: Option<String>,
}

impl Inputs {
    /// Every credential these inputs hold, and the parts of compound ones a message could
    /// quote on their own (the password of a Redis URL, the `AccountKey` of an Azure
    /// connection string): what [`crate::status::redact_secrets`] keeps out of the status.
    pub fn secret_values(&self) -> Vec<String> {
        let c = &self.credentials;
        let mut out = vec![
            c.mysql_root_password.clone(),
            c.mysql_password.clone(),
            c.redis_password.clone(),
        ];
        if let Some(url) = &self.external_redis_url {
            out.push(url.clone());
            // scheme://[user]:password@host...
            if let Some(userinfo) = url
                .split_once("://")
                .and_then(|(_, rest)| rest.rsplit_once('@'))
                .map(|(u, _)| u)
                && let Some((_, pw)) = userinfo.split_once(':')
            {
                out.push(pw.to_string());
            }
        }
        if let Some((ak, sk)) = &self.object_keys {
            out.push(ak.clone());
            out.push(sk.clone());
        }
        if let Some(cs) = &self.azure_connection_string {
            out.push(cs.clone());
            for part in cs.split(';') {
                if let Some((k, v)) = part.split_once('=')
                    && matches!(k.trim(), "AccountKey" | "SharedAccessSignature")
                {
                    out.push(v.trim().to_string());
                }
            }
        }
        out.retain(|v| !v.is_empty());
        out
    }
}

impl std::fmt::Debug for Inputs {
    // Secrets never reach logs, not even through Debug.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inputs").finish_non_exhaustive()
    }
}

/// One object the cluster needs, in the order apply must create it.
// About 15 per reconcile, built once and walked in order: boxing would only add indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Desired {
    Secret(Secret),
    ConfigMap(ConfigMap),
    Service(Service),
    StatefulSet(StatefulSet),
    PersistentVolume(PersistentVolume),
    PersistentVolumeClaim(PersistentVolumeClaim),
    Deployment(Deployment),
    PodDisruptionBudget(PodDisruptionBudget),
}

impl Desired {
    pub fn kind(&self) -> &'static str {
        match self {
            Desired::Secret(_) => "Secret",
            Desired::ConfigMap(_) => "ConfigMap",
            Desired::Service(_) => "Service",
            Desired::StatefulSet(_) => "StatefulSet",
            Desired::PersistentVolume(_) => "PersistentVolume",
            Desired::PersistentVolumeClaim(_) => "PersistentVolumeClaim",
            Desired::Deployment(_) => "Deployment",
            Desired::PodDisruptionBudget(_) => "PodDisruptionBudget",
        }
    }
    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Desired::Secret(o) => &o.metadata,
            Desired::ConfigMap(o) => &o.metadata,
            Desired::Service(o) => &o.metadata,
            Desired::StatefulSet(o) => &o.metadata,
            Desired::PersistentVolume(o) => &o.metadata,
            Desired::PersistentVolumeClaim(o) => &o.metadata,
            Desired::Deployment(o) => &o.metadata,
            Desired::PodDisruptionBudget(o) => &o.metadata,
        }
    }
    pub fn name(&self) -> &str {
        self.meta().name.as_deref().unwrap_or_default()
    }
}

/// The whole desired state, in creation order: dependencies (secrets, config, MySQL, Redis,
/// shared volume) before the engine (writer, then readers, then router).
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredState {
    pub objects: Vec<Desired>,
}

impl DesiredState {
    /// Finds an object by kind and name.
    pub fn get(&self, kind: &str, name: &str) -> Option<&Desired> {
        self.objects
            .iter()
            .find(|d| d.kind() == kind && d.name() == name)
    }
}

/// Builds every object of the cluster.
pub fn build_all(vc: &ValidatedCluster, inputs: &Inputs) -> DesiredState {
    let cfg = config::build_config_map(vc);
    let config_hash = cfg
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_APPLIED_HASH))
        .cloned()
        .unwrap_or_default();
    let mut objects = vec![Desired::ConfigMap(cfg)];
    if let Some((svc, sts)) = database::build_mysql(vc) {
        objects.push(Desired::Service(svc));
        objects.push(Desired::StatefulSet(sts));
    }
    if let Some((svc, sts)) = database::build_redis(vc) {
        objects.push(Desired::Service(svc));
        objects.push(Desired::StatefulSet(sts));
    }
    objects.push(Desired::Secret(storage::build_juicefs_secret(vc, inputs)));
    objects.push(Desired::PersistentVolume(storage::build_shared_pv(vc)));
    objects.push(Desired::PersistentVolumeClaim(storage::build_shared_pvc(
        vc,
    )));
    objects.push(Desired::Service(engine::build_writer_service(vc)));
    objects.push(Desired::StatefulSet(engine::build_writer(vc, &config_hash)));
    objects.push(Desired::Service(engine::build_readers_service(vc)));
    objects.push(Desired::Deployment(engine::build_readers(vc, &config_hash)));
    objects.push(Desired::PodDisruptionBudget(engine::build_readers_pdb(vc)));
    objects.push(Desired::Deployment(engine::build_router(vc, &config_hash)));
    objects.push(Desired::Service(engine::build_router_service(vc)));
    DesiredState { objects }
}

/// The owner reference every namespaced object carries (garbage collection on CR deletion).
pub fn owner_reference(vc: &ValidatedCluster) -> OwnerReference {
    OwnerReference {
        api_version: "shoal.dev/v1alpha1".into(),
        kind: "VectorCluster".into(),
        name: vc.names.cluster.clone(),
        uid: vc.uid.clone(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Metadata of a namespaced object owned by the cluster.
pub fn object_meta(vc: &ValidatedCluster, name: String, component: Component) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(vc.names.namespace.clone()),
        labels: Some(vc.names.labels(component)),
        owner_references: Some(vec![owner_reference(vc)]),
        ..ObjectMeta::default()
    }
}

/// Hex SHA-256 (first 16 bytes) of a value's JSON form.
pub fn content_hash<T: Serialize>(value: &T) -> String {
    // Serialising k8s-openapi types to JSON cannot fail (no non-string map keys).
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
    hex::encode(&digest[..16])
}

/// Stamps `shoal.dev/applied-hash` with the hash of everything else in the object.
pub fn stamp<T: Serialize>(mut obj: T, meta: fn(&mut T) -> &mut ObjectMeta) -> T {
    let hash = content_hash(&obj);
    meta(&mut obj)
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(ANNOTATION_APPLIED_HASH.into(), hash);
    obj
}

/// The hash an existing object was applied with, if any.
pub fn applied_hash(meta: &ObjectMeta) -> Option<&str> {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_APPLIED_HASH))
        .map(String::as_str)
}
