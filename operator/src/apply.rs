//! Step 3 of the reconcile pipeline: make the API server hold the desired objects.
//!
//! Server-side apply with one field manager ([`FIELD_MANAGER`]), in the fixed order
//! [`crate::build::build_all`] returns. An object whose `shoal.dev/applied-hash` already matches
//! is not sent again, so a steady-state reconcile makes only reads. The generated Secret is
//! created once and never overwritten. Engine image changes roll the writer first: readers and
//! router keep their old template until the writer has rolled out. Labelled objects the spec no
//! longer asks for are deleted (only ones this cluster owns).
//!
//! Owns every write the operator makes except status and finalizers (`controller`).

use std::collections::BTreeSet;
use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    ConfigMap, Event, PersistentVolume, PersistentVolumeClaim, Pod, Secret, Service,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::build::secret::{Credentials, build_generated_secret};
use crate::build::{Desired, DesiredState, Inputs, applied_hash};
use crate::crd::ReclaimPolicy;
use crate::names::FIELD_MANAGER;
use crate::validate::{RedisSource, ValidatedCluster};

/// A failed API call while applying; `category()` labels metrics.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("failed to read {kind} {name}")]
    Get {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to apply {kind} {name}")]
    Apply {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to patch {kind} {name} ({what})")]
    Patch {
        kind: &'static str,
        name: String,
        what: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("failed to create the generated Secret {name}")]
    CreateSecret {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "Secret {name} lacks key {key:?} (or it is not UTF-8); add it, the cluster waits for it"
    )]
    SecretKeyMissing { name: String, key: String },
    #[error("Secret {name} does not exist; create it, the cluster waits for it")]
    SecretMissing { name: String },
    #[error("failed to list {kind} objects for orphan removal")]
    ListOrphans {
        kind: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("failed to delete orphaned {kind} {name}")]
    DeleteOrphan {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl ApplyError {
    /// A static label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            ApplyError::Get { .. } => "read",
            ApplyError::Apply { .. } | ApplyError::Patch { .. } => "apply",
            ApplyError::CreateSecret { .. } => "secret",
            ApplyError::SecretKeyMissing { .. } | ApplyError::SecretMissing { .. } => "user_secret",
            ApplyError::ListOrphans { .. } | ApplyError::DeleteOrphan { .. } => "orphans",
        }
    }
}

/// What apply did to one object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Created,
    Updated,
    Unchanged,
    /// Held back until the writer has rolled out (readers/router on an image change).
    Deferred,
}

/// The live objects status needs, as they are after apply.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub mysql: Option<StatefulSet>,
    pub redis: Option<StatefulSet>,
    pub shared_pvc: Option<PersistentVolumeClaim>,
    pub writer: Option<StatefulSet>,
    pub readers: Option<Deployment>,
    pub router: Option<Deployment>,
    /// The cluster's pods, for the cause of a component that is not ready.
    pub pods: Vec<Pod>,
    /// The kubelet's volume Warnings (`FailedMount`, `FailedAttachVolume`) about those pods: a
    /// pod stuck in `ContainerCreating` has no container status saying why, only these.
    pub pod_volume_events: Vec<Event>,
}

/// Result of one apply pass.
#[derive(Clone, Debug, Default)]
pub struct ApplyReport {
    /// `(kind, name, action)` in apply order.
    pub actions: Vec<(&'static str, String, Action)>,
    /// `(kind, name)` of deleted orphans.
    pub deleted: Vec<(&'static str, String)>,
    /// A retained shared volume left `Released` by a deleted cluster was re-bound.
    pub rebound_volume: bool,
    pub observed: Observed,
}

impl ApplyReport {
    pub fn names_with(&self, action: Action) -> Vec<String> {
        self.actions
            .iter()
            .filter(|(_, _, a)| *a == action)
            .map(|(k, n, _)| format!("{k} {n}"))
            .collect()
    }
}

fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

async fn read_secret(api: &Api<Secret>, name: &str) -> Result<Secret, ApplyError> {
    api.get_opt(name)
        .await
        .map_err(|source| ApplyError::Get {
            kind: "Secret",
            name: name.to_string(),
            source,
        })?
        .ok_or_else(|| ApplyError::SecretMissing {
            name: name.to_string(),
        })
}

fn key_of(secret: &Secret, name: &str, key: &str) -> Result<String, ApplyError> {
    secret_value(secret, key).ok_or_else(|| ApplyError::SecretKeyMissing {
        name: name.to_string(),
        key: key.to_string(),
    })
}

/// Ensures the generated Secret exists (never overwriting it) and reads the user's Secrets the
/// builders need. Returns whether the generated Secret was created now.
pub async fn gather_inputs(
    client: &Client,
    vc: &ValidatedCluster,
    new_credentials: impl FnOnce() -> Credentials,
) -> Result<(Inputs, bool), ApplyError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &vc.names.namespace);
    let gen_name = vc.names.generated_secret();
    let existing = secrets
        .get_opt(&gen_name)
        .await
        .map_err(|source| ApplyError::Get {
            kind: "Secret",
            name: gen_name.clone(),
            source,
        })?;
    if let Some(secret) = &existing {
        release_retained_secret(&secrets, vc, secret).await?;
    }
    let (credentials, created) = match existing.as_ref().and_then(Credentials::from_secret) {
        Some(c) => (c, false),
        None if existing.is_some() => {
            // Edited by hand into something unusable: report instead of replacing it.
            return Err(ApplyError::SecretKeyMissing {
                name: gen_name,
                key: crate::names::KEY_REDIS_PASSWORD.into(),
            });
        }
        None => {
            let creds = new_credentials();
            let secret = build_generated_secret(vc, &creds);
            match secrets.create(&PostParams::default(), &secret).await {
                Ok(_) => (creds, true),
                // Created concurrently (another reconcile): use what is there, never overwrite.
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    let s = secrets
                        .get(&gen_name)
                        .await
                        .map_err(|source| ApplyError::Get {
                            kind: "Secret",
                            name: gen_name.clone(),
                            source,
                        })?;
                    let c = Credentials::from_secret(&s).ok_or(ApplyError::SecretKeyMissing {
                        name: gen_name.clone(),
                        key: crate::names::KEY_REDIS_PASSWORD.into(),
                    })?;
                    (c, false)
                }
                Err(source) => {
                    return Err(ApplyError::CreateSecret {
                        name: gen_name,
                        source,
                    });
                }
            }
        }
    };
    let external_redis_url = match &vc.redis {
        RedisSource::External(e) => {
            let s = read_secret(&secrets, &e.url_secret_ref.name).await?;
            Some(key_of(&s, &e.url_secret_ref.name, &e.url_secret_ref.key)?)
        }
        RedisSource::Managed(_) => None,
    };
    let (object_keys, azure_connection_string) =
        match &vc.spec.storage.object_storage.credentials_secret_ref {
            Some(r) => {
                let s = read_secret(&secrets, &r.name).await?;
                match &r.connection_string_key {
                    Some(key) => (None, Some(key_of(&s, &r.name, key)?)),
                    None => (
                        Some((
                            key_of(&s, &r.name, &r.access_key_key)?,
                            key_of(&s, &r.name, &r.secret_key_key)?,
                        )),
                        None,
                    ),
                }
            }
            None => (None, None),
        };
    Ok((
        Inputs {
            credentials,
            external_redis_url,
            object_keys,
            azure_connection_string,
        },
        created,
    ))
}

/// Under `reclaimPolicy: Retain`, the generated Secret must survive the cluster with the
/// volumes it unlocks: one made with an owner reference (by a `Delete` cluster, or an operator
/// before 0.1.1) has it removed, so the garbage collector leaves it when the cluster goes.
async fn release_retained_secret(
    api: &Api<Secret>,
    vc: &ValidatedCluster,
    secret: &Secret,
) -> Result<(), ApplyError> {
    let retain = vc.spec.storage.reclaim_policy == ReclaimPolicy::Retain;
    if !retain || secret.owner_references().is_empty() {
        return Ok(());
    }
    let name = secret.name_any();
    let patch = serde_json::json!({"metadata": {"ownerReferences": null}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| ApplyError::Patch {
            kind: "Secret",
            name,
            what: "keep it beyond the cluster under reclaimPolicy Retain",
            source,
        })?;
    Ok(())
}

/// A retained shared volume left `Released` by a deleted cluster still names the deleted
/// claim's UID, so the re-created claim of the same name can never bind to it (the PV
/// controller only binds a `Released` volume to the exact claim it was bound to). When the
/// volume's claim reference names this cluster's claim, the stale UID is cleared: the volume
/// becomes `Available`, pre-bound by name, and the new claim binds to the old data.
/// Returns whether it patched.
pub async fn rebind_released_volume(
    api: &Api<PersistentVolume>,
    vc: &ValidatedCluster,
    live: &PersistentVolume,
) -> Result<bool, ApplyError> {
    let released = live
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Released");
    let claim = live.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
    let ours = claim.is_some_and(|c| {
        c.name.as_deref() == Some(vc.names.shared_pvc().as_str())
            && c.namespace.as_deref() == Some(vc.names.namespace.as_str())
    });
    let stale_uid = claim.is_some_and(|c| c.uid.as_deref().is_some_and(|u| !u.is_empty()));
    if !released || !ours || !stale_uid {
        return Ok(false);
    }
    let name = live.name_any();
    let patch = serde_json::json!({"spec": {"claimRef": {"uid": null, "resourceVersion": null}}});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| ApplyError::Patch {
            kind: "PersistentVolume",
            name,
            what: "clear the deleted claim's UID so the re-created claim binds",
            source,
        })?;
    Ok(true)
}

/// The desired shared volume, carrying the claim UID the PV controller bound it with.
///
/// `claimRef` is an atomic field: applying the built volume (which pre-binds by name, without
/// a UID) over a bound one would take the UID away, after which the volume looks pre-bound
/// rather than bound: when its claim is deleted it turns `Available` instead of `Released`, and
/// a `Delete` volume is then never deleted. A `Released` volume's stale UID is not kept (see
/// [`rebind_released_volume`]).
fn keep_bound_claim(
    desired: &PersistentVolume,
    live: Option<&PersistentVolume>,
) -> PersistentVolume {
    let mut out = desired.clone();
    let Some(live) = live else { return out };
    let released = live
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Released");
    let live_claim = live.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
    if let (false, Some(lc), Some(dc)) = (
        released,
        live_claim,
        out.spec.as_mut().and_then(|s| s.claim_ref.as_mut()),
    ) && lc.name == dc.name
        && lc.namespace == dc.namespace
    {
        dc.uid = lc.uid.clone();
    }
    out
}

/// GET, then server-side apply unless the applied hash already matches.
async fn apply_one<K>(api: &Api<K>, desired: &K) -> Result<(Action, K), ApplyError>
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
    K::DynamicType: Default,
{
    let existing = get_existing(api, desired).await?;
    apply_over(api, desired, existing).await
}

async fn get_existing<K>(api: &Api<K>, desired: &K) -> Result<Option<K>, ApplyError>
where
    K: Resource + Clone + Debug + DeserializeOwned,
    K::DynamicType: Default,
{
    let name = desired.meta().name.clone().unwrap_or_default();
    api.get_opt(&name).await.map_err(|source| ApplyError::Get {
        kind: kind_of::<K>(),
        name,
        source,
    })
}

/// Server-side apply over the live object `existing`, unless its applied hash matches.
async fn apply_over<K>(
    api: &Api<K>,
    desired: &K,
    existing: Option<K>,
) -> Result<(Action, K), ApplyError>
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
    K::DynamicType: Default,
{
    let kind = kind_of::<K>();
    let name = desired.meta().name.clone().unwrap_or_default();
    if let Some(cur) = &existing
        && applied_hash(cur.meta()).is_some()
        && applied_hash(cur.meta()) == applied_hash(desired.meta())
    {
        return Ok((Action::Unchanged, cur.clone()));
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let applied = api
        .patch(&name, &params, &Patch::Apply(desired))
        .await
        .map_err(|source| ApplyError::Apply {
            kind,
            name: name.clone(),
            source,
        })?;
    let action = if existing.is_some() {
        Action::Updated
    } else {
        Action::Created
    };
    Ok((action, applied))
}

fn kind_of<K: Resource>() -> &'static str
where
    K::DynamicType: Default,
{
    // The kinds we apply are all static k8s-openapi types; leak-free mapping via match.
    match K::kind(&K::DynamicType::default()).as_ref() {
        "Secret" => "Secret",
        "ConfigMap" => "ConfigMap",
        "Service" => "Service",
        "StatefulSet" => "StatefulSet",
        "PersistentVolume" => "PersistentVolume",
        "PersistentVolumeClaim" => "PersistentVolumeClaim",
        "Deployment" => "Deployment",
        "PodDisruptionBudget" => "PodDisruptionBudget",
        _ => "object",
    }
}

/// The writer has rolled out its current template and is ready.
pub fn writer_rolled_out(sts: &StatefulSet) -> bool {
    let generation = sts.metadata.generation;
    let Some(st) = &sts.status else { return false };
    let want = sts.spec.replicas.unwrap_or(1);
    st.observed_generation.is_some()
        && st.observed_generation >= generation
        && st.updated_replicas.unwrap_or(0) >= want
        && st.ready_replicas.unwrap_or(0) >= want
        && (st.update_revision.is_none() || st.current_revision == st.update_revision)
}

fn first_image(d: &Deployment) -> Option<&str> {
    d.spec
        .template
        .spec
        .as_ref()
        .and_then(|p| p.containers.first())
        .and_then(|c| c.image.as_deref())
}

/// Applies everything in order and removes orphans when `sweep` is set.
///
/// Errors: the first failing call; objects applied before it stay applied, and the next
/// reconcile continues from there (every step is idempotent).
pub async fn apply_all(
    client: &Client,
    vc: &ValidatedCluster,
    desired: &DesiredState,
    sweep: bool,
) -> Result<ApplyReport, ApplyError> {
    let ns = &vc.names.namespace;
    let mut report = ApplyReport::default();
    let mut writer_ready = true;
    for obj in &desired.objects {
        let kind = obj.kind();
        let name = obj.name().to_string();
        let action = match obj {
            Desired::Secret(o) => apply_one(&Api::namespaced(client.clone(), ns), o).await?.0,
            Desired::ConfigMap(o) => {
                apply_one::<ConfigMap>(&Api::namespaced(client.clone(), ns), o)
                    .await?
                    .0
            }
            Desired::Service(o) => {
                apply_one::<Service>(&Api::namespaced(client.clone(), ns), o)
                    .await?
                    .0
            }
            Desired::PersistentVolume(o) => {
                let api: Api<PersistentVolume> = Api::all(client.clone());
                let existing = get_existing(&api, o).await?;
                let desired = keep_bound_claim(o, existing.as_ref());
                let (a, live) = apply_over(&api, &desired, existing).await?;
                if rebind_released_volume(&api, vc, &live).await? {
                    report.rebound_volume = true;
                }
                a
            }
            Desired::PersistentVolumeClaim(o) => {
                let (a, live) =
                    apply_one::<PersistentVolumeClaim>(&Api::namespaced(client.clone(), ns), o)
                        .await?;
                report.observed.shared_pvc = Some(live);
                a
            }
            Desired::PodDisruptionBudget(o) => {
                apply_one::<PodDisruptionBudget>(&Api::namespaced(client.clone(), ns), o)
                    .await?
                    .0
            }
            Desired::StatefulSet(o) => {
                let (a, live) =
                    apply_one::<StatefulSet>(&Api::namespaced(client.clone(), ns), o).await?;
                if name == vc.names.writer() {
                    writer_ready = writer_rolled_out(&live);
                    report.observed.writer = Some(live);
                } else if name == vc.names.mysql() {
                    report.observed.mysql = Some(live);
                } else if name == vc.names.redis() {
                    report.observed.redis = Some(live);
                }
                a
            }
            Desired::Deployment(o) => {
                let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
                let existing = get_existing(&api, o).await?;
                let image_change = existing
                    .as_ref()
                    .is_some_and(|cur| first_image(cur) != first_image(o));
                let (a, live) = match existing {
                    // Safe order on an image change: readers and router wait for the writer.
                    Some(cur) if image_change && !writer_ready => (Action::Deferred, cur),
                    existing => apply_over(&api, o, existing).await?,
                };
                if name == vc.names.readers() {
                    report.observed.readers = Some(live);
                } else if name == vc.names.router() {
                    report.observed.router = Some(live);
                }
                a
            }
        };
        report.actions.push((kind, name, action));
    }
    if sweep {
        report.deleted = sweep_orphans(client, vc, desired).await?;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&vc.names.cluster_selector());
    report.observed.pods = pods
        .list(&lp)
        .await
        .map_err(|source| ApplyError::Get {
            kind: "Pod",
            name: vc.names.cluster_selector(),
            source,
        })?
        .items;
    report.observed.pod_volume_events =
        pod_volume_events(client, ns, &report.observed.pods).await?;
    Ok(report)
}

/// Event reasons the kubelet gives when a pod's volume cannot be attached or mounted (the CSI
/// driver's error is in the message).
pub const POD_VOLUME_EVENT_REASONS: [&str; 2] = ["FailedMount", "FailedAttachVolume"];

/// The kubelet's volume Warnings about `pods` (only when one of them is not running: a
/// steady-state reconcile makes no extra call).
async fn pod_volume_events(
    client: &Client,
    ns: &str,
    pods: &[Pod],
) -> Result<Vec<Event>, ApplyError> {
    let waiting = |p: &&Pod| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Running")
            && p.metadata.deletion_timestamp.is_none()
    };
    let names: BTreeSet<&str> = pods
        .iter()
        .filter(waiting)
        .filter_map(|p| p.metadata.name.as_deref())
        .collect();
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().fields("involvedObject.kind=Pod,type=Warning");
    let list = events.list(&lp).await.map_err(|source| ApplyError::Get {
        kind: "Event",
        name: "involvedObject.kind=Pod,type=Warning".into(),
        source,
    })?;
    Ok(list
        .items
        .into_iter()
        .filter(|e| {
            e.involved_object
                .name
                .as_deref()
                .is_some_and(|n| names.contains(n))
                && e.reason
                    .as_deref()
                    .is_some_and(|r| POD_VOLUME_EVENT_REASONS.contains(&r))
        })
        .collect())
}

async fn sweep_kind<K>(
    client: &Client,
    vc: &ValidatedCluster,
    desired: &DesiredState,
    keep: &BTreeSet<String>,
    out: &mut Vec<(&'static str, String)>,
) -> Result<(), ApplyError>
where
    K: Resource<Scope = NamespaceResourceScope> + Clone + Debug + DeserializeOwned,
    K::DynamicType: Default,
{
    let kind = kind_of::<K>();
    let api: Api<K> = Api::namespaced(client.clone(), &vc.names.namespace);
    let lp = ListParams::default().labels(&vc.names.cluster_selector());
    let list = api
        .list(&lp)
        .await
        .map_err(|source| ApplyError::ListOrphans { kind, source })?;
    for obj in list.items {
        let name = obj.name_any();
        let ours = obj.owner_references().iter().any(|o| o.uid == vc.uid);
        if !ours || desired.get(kind, &name).is_some() || keep.contains(&name) {
            continue;
        }
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => out.push((kind, name)),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => return Err(ApplyError::DeleteOrphan { kind, name, source }),
        }
    }
    Ok(())
}

/// Deletes labelled, owned objects that the desired state no longer contains (e.g. the managed
/// MySQL after switching to an external one). Volumes are never swept: data goes only through
/// the `Delete` reclaim policy on deletion of the cluster.
pub async fn sweep_orphans(
    client: &Client,
    vc: &ValidatedCluster,
    desired: &DesiredState,
) -> Result<Vec<(&'static str, String)>, ApplyError> {
    let keep = BTreeSet::from([vc.names.generated_secret()]);
    let mut out = Vec::new();
    sweep_kind::<Deployment>(client, vc, desired, &keep, &mut out).await?;
    sweep_kind::<StatefulSet>(client, vc, desired, &keep, &mut out).await?;
    sweep_kind::<Service>(client, vc, desired, &keep, &mut out).await?;
    sweep_kind::<PodDisruptionBudget>(client, vc, desired, &keep, &mut out).await?;
    sweep_kind::<ConfigMap>(client, vc, desired, &keep, &mut out).await?;
    sweep_kind::<Secret>(client, vc, desired, &keep, &mut out).await?;
    Ok(out)
}

/// Under `reclaimPolicy: Delete`: deletes the engine's workloads (writer, readers, router: the
/// shared claim stays in use, and so undeletable, while their pods run), the cluster's claims
/// (shared volume and the StatefulSets' data volumes) and the generated Secret (whose passwords
/// only those volumes used); the shared PersistentVolume then follows its `Delete` reclaim
/// policy through the CSI driver, which still needs the managed Redis (JuiceFS metadata), so
/// MariaDB and Redis are left to the garbage collector. Returns what it deleted.
pub async fn delete_data(
    client: &Client,
    vc_name: &str,
    namespace: &str,
) -> Result<Vec<String>, kube::Error> {
    let names = crate::names::Names::new(vc_name, namespace);
    let mut deleted = Vec::new();
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let writer = names.writer();
    match sts.delete(&writer, &DeleteParams::background()).await {
        Ok(_) => deleted.push(format!("StatefulSet {writer}")),
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e),
    }
    for d in [names.readers(), names.router()] {
        match deps.delete(&d, &DeleteParams::background()).await {
            Ok(_) => deleted.push(format!("Deployment {d}")),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let lp = ListParams::default().labels(&names.cluster_selector());
    for pvc in api.list(&lp).await?.items {
        let name = pvc.name_any();
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => deleted.push(name),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = names.generated_secret();
    match secrets.delete(&secret, &DeleteParams::background()).await {
        Ok(_) => deleted.push(format!("Secret {secret}")),
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(e),
    }
    Ok(deleted)
}
