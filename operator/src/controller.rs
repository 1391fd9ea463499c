//! The reconcile loop: wires `validate → build → apply → status` to kube-runtime, handles
//! deletion (finalizer only for `reclaimPolicy: Delete`), publishes Events and records metrics.
//!
//! [`reconcile`] is a plain async fn over a [`Context`] so tests drive it against a mock API
//! server without the watch machinery.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{PersistentVolume, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::apply::{self, Action, ApplyError};
use crate::build::{self, secret::Credentials};
use crate::crd::{ReclaimPolicy, VectorCluster, VectorClusterStatus};
use crate::metrics::Metrics;
use crate::names::{FINALIZER, LABEL_MANAGED_BY, MANAGED_BY};
use crate::status;
use crate::validate::validate;

/// Requeue while something is still coming up.
pub const REQUEUE_NOT_READY: Duration = Duration::from_secs(30);
/// Periodic resync of a ready cluster (watches on owned objects trigger sooner).
pub const REQUEUE_READY: Duration = Duration::from_secs(300);

/// A reconcile that failed; the next one retries from the start.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("failed to update the status of VectorCluster {name}")]
    PatchStatus {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to update the finalizers of VectorCluster {name}")]
    Finalizer {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to delete the data volumes of VectorCluster {name}")]
    DeleteData {
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl ReconcileError {
    /// A static label for the `reconcile_errors_total` metric.
    pub fn category(&self) -> &'static str {
        match self {
            ReconcileError::Apply(e) => e.category(),
            ReconcileError::PatchStatus { .. } => "status",
            ReconcileError::Finalizer { .. } => "finalizer",
            ReconcileError::DeleteData { .. } => "cleanup",
        }
    }
}

/// An error with every cause behind it, for status messages, Events and logs: "failed to apply
/// ConfigMap demo-engine-config: configmaps is forbidden: User ... cannot create ... (Forbidden,
/// HTTP 403)". The API server's message is what tells a user what to fix, so it is never
/// dropped; a kube API error is shown as its message, reason and code rather than its Debug form.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(e) = next {
        let part = match e.downcast_ref::<kube::Error>() {
            Some(kube::Error::Api(s)) => {
                next = None;
                format!("{} ({}, HTTP {})", s.message, s.reason, s.code)
            }
            _ => {
                next = e.source();
                e.to_string()
            }
        };
        if !out.contains(&part) {
            out.push_str(": ");
            out.push_str(&part);
        }
    }
    out
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
}

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>, instance: Option<String>) -> Self {
        let reporter = Reporter {
            controller: MANAGED_BY.into(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
        }
    }

    async fn event(
        &self,
        vc: &VectorCluster,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let ev = Event {
            type_,
            reason: reason.into(),
            // The API server caps notes at 1 kB.
            note: Some(note.chars().take(1000).collect()),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &vc.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "failed to publish event");
        }
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// Reconciles one VectorCluster, recording metrics.
pub async fn reconcile(
    vc: Arc<VectorCluster>,
    ctx: Arc<Context>,
) -> Result<Requeue, ReconcileError> {
    let start = Instant::now();
    let res = reconcile_inner(&vc, &ctx).await;
    let took = start.elapsed();
    match &res {
        Ok(Outcome::Applied(_)) | Ok(Outcome::Deleted) | Ok(Outcome::DeletingData) => {
            ctx.metrics.observe("ok", None, took)
        }
        Ok(Outcome::Invalid) => ctx.metrics.observe("invalid", None, took),
        Err(e) => ctx.metrics.observe("error", Some(e.category()), took),
    }
    res.map(|o| match o {
        Outcome::Applied(true) => Requeue::requeue(REQUEUE_READY),
        Outcome::Applied(false) => Requeue::requeue(REQUEUE_NOT_READY),
        Outcome::DeletingData => Requeue::requeue(Duration::from_secs(5)),
        Outcome::Invalid | Outcome::Deleted => Requeue::await_change(),
    })
}

/// Backoff after a failed reconcile.
pub fn error_policy(_vc: Arc<VectorCluster>, err: &ReconcileError, _ctx: Arc<Context>) -> Requeue {
    tracing::warn!(error = %error_chain(err), category = err.category(), "reconcile failed");
    match err {
        ReconcileError::Apply(
            ApplyError::SecretMissing { .. } | ApplyError::SecretKeyMissing { .. },
        ) => Requeue::requeue(Duration::from_secs(30)),
        ReconcileError::Apply(_)
        | ReconcileError::PatchStatus { .. }
        | ReconcileError::Finalizer { .. }
        | ReconcileError::DeleteData { .. } => Requeue::requeue(Duration::from_secs(5)),
    }
}

/// How one reconcile ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Applied; `true` when the cluster is Ready.
    Applied(bool),
    /// The spec is invalid; reported in status and an Event.
    Invalid,
    /// The cluster is being deleted; cleanup done.
    Deleted,
    /// The cluster is being deleted under `reclaimPolicy: Delete`: its claims are gone and the
    /// CSI driver is still deleting the shared volume (the finalizer stays until it is gone, so
    /// the JuiceFS Secret and metadata DeleteVolume needs outlive it).
    DeletingData,
}

async fn patch_status_if_changed(
    api: &Api<VectorCluster>,
    vc: &VectorCluster,
    new: &VectorClusterStatus,
) -> Result<bool, ReconcileError> {
    if vc.status.as_ref() == Some(new) {
        return Ok(false);
    }
    let name = vc.name_any();
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": new })),
    )
    .await
    .map_err(|source| ReconcileError::PatchStatus { name, source })?;
    Ok(true)
}

async fn set_finalizers(
    api: &Api<VectorCluster>,
    vc: &VectorCluster,
    finalizers: Vec<String>,
) -> Result<(), ReconcileError> {
    let name = vc.name_any();
    // resourceVersion makes this a compare-and-swap: a concurrent change gets 409, and we retry.
    let patch = json!({ "metadata": { "finalizers": finalizers, "resourceVersion": vc.resource_version() } });
    api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map_err(|source| ReconcileError::Finalizer { name, source })?;
    Ok(())
}

/// The pipeline. Public for tests.
pub async fn reconcile_inner(vc: &VectorCluster, ctx: &Context) -> Result<Outcome, ReconcileError> {
    let ns = vc.namespace().unwrap_or_default();
    let name = vc.name_any();
    let api: Api<VectorCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let has_finalizer = vc.finalizers().iter().any(|f| f == FINALIZER);
    let wants_finalizer = vc.spec.storage.reclaim_policy == ReclaimPolicy::Delete;

    if vc.meta().deletion_timestamp.is_some() {
        if has_finalizer {
            if wants_finalizer {
                let deleted =
                    apply::delete_data(&ctx.client, &name, &ns)
                        .await
                        .map_err(|source| ReconcileError::DeleteData {
                            name: name.clone(),
                            source,
                        })?;
                if !deleted.is_empty() {
                    ctx.event(
                        vc,
                        EventType::Normal,
                        "DeletedData",
                        "Delete",
                        format!(
                            "reclaimPolicy Delete: deleted volume claims and credentials {}",
                            deleted.join(", ")
                        ),
                    )
                    .await;
                }
                let pv = crate::names::Names::new(&name, &ns).shared_pv();
                let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
                let live = pvs
                    .get_opt(&pv)
                    .await
                    .map_err(|source| ReconcileError::DeleteData {
                        name: name.clone(),
                        source,
                    })?;
                if live.is_some() {
                    tracing::info!(volume = %pv, "waiting for the CSI driver to delete the shared volume");
                    return Ok(Outcome::DeletingData);
                }
            }
            let rest = vc
                .finalizers()
                .iter()
                .filter(|f| *f != FINALIZER)
                .cloned()
                .collect();
            set_finalizers(&api, vc, rest).await?;
        }
        return Ok(Outcome::Deleted);
    }

    let generation = vc.metadata.generation.unwrap_or(0);
    let valid = match validate(vc) {
        Ok(v) => v,
        Err(e) => {
            let st = status::invalid_status(&e, generation, vc.status.as_ref(), &now());
            if patch_status_if_changed(&api, vc, &st).await? {
                ctx.event(
                    vc,
                    EventType::Warning,
                    "InvalidSpec",
                    "Validate",
                    e.to_string(),
                )
                .await;
            }
            return Ok(Outcome::Invalid);
        }
    };

    if wants_finalizer != has_finalizer {
        let mut f: Vec<String> = vc
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .cloned()
            .collect();
        if wants_finalizer {
            f.push(FINALIZER.into());
        }
        set_finalizers(&api, vc, f).await?;
    }

    let result = async {
        let (inputs, created_secret) = apply::gather_inputs(&ctx.client, &valid, || {
            Credentials::generate(&mut rand::rng())
        })
        .await?;
        let desired = build::build_all(&valid, &inputs);
        let sweep = vc.status.as_ref().and_then(|s| s.observed_generation) != Some(generation);
        let report = apply::apply_all(&ctx.client, &valid, &desired, sweep).await?;
        Ok::<_, ApplyError>((created_secret, report, inputs.secret_values()))
    }
    .await;
    let (created_secret, report, secret_values) = match result {
        Ok(r) => r,
        Err(e) => {
            let msg = error_chain(&e);
            ctx.event(vc, EventType::Warning, "ApplyFailed", "Apply", msg.clone())
                .await;
            let st = status::failed_apply_status(&msg, generation, vc.status.as_ref(), &now());
            // The apply error is what matters; a status failure here would only hide it.
            if let Err(se) = patch_status_if_changed(&api, vc, &st).await {
                tracing::warn!(error = %error_chain(&se), "failed to record the apply failure in status");
            }
            return Err(e.into());
        }
    };

    let mut created = report.names_with(Action::Created);
    if created_secret {
        created.insert(0, format!("Secret {}", valid.names.generated_secret()));
    }
    if !created.is_empty() {
        ctx.event(
            vc,
            EventType::Normal,
            "Created",
            "Apply",
            format!("created {}", created.join(", ")),
        )
        .await;
    }
    let updated = report.names_with(Action::Updated);
    if !updated.is_empty() {
        ctx.event(
            vc,
            EventType::Normal,
            "Updated",
            "Apply",
            format!("updated {}", updated.join(", ")),
        )
        .await;
    }
    if !report.deleted.is_empty() {
        let d: Vec<String> = report
            .deleted
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        ctx.event(
            vc,
            EventType::Normal,
            "DeletedOrphans",
            "Delete",
            format!(
                "deleted objects the spec no longer asks for: {}",
                d.join(", ")
            ),
        )
        .await;
    }
    if report.rebound_volume {
        ctx.event(
            vc,
            EventType::Normal,
            "RetainedVolumeRebound",
            "Apply",
            format!(
                "PersistentVolume {} was Released by a deleted cluster (reclaimPolicy Retain); \
                 re-bound it so this cluster gets the old data",
                valid.names.shared_pv()
            ),
        )
        .await;
    }
    let mut st = status::compute_status(&valid, &report, vc.status.as_ref(), &now());
    status::redact_secrets(&mut st, &secret_values);
    let ready = st.phase == Some(crate::crd::Phase::Running);
    patch_status_if_changed(&api, vc, &st).await?;
    Ok(Outcome::Applied(ready))
}

/// Runs the controller until shutdown (SIGTERM/SIGINT).
pub async fn run(client: Client, metrics: Arc<Metrics>, instance: Option<String>) {
    let vcs: Api<VectorCluster> = Api::all(client.clone());
    let owned = watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGED_BY}"));
    let ctx = Arc::new(Context::new(client.clone(), metrics, instance));
    Controller::new(vcs, watcher::Config::default())
        .owns(Api::<StatefulSet>::all(client.clone()), owned.clone())
        .owns(Api::<Deployment>::all(client.clone()), owned.clone())
        .owns(Api::<Service>::all(client.clone()), owned)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(cluster = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile loop error"),
            }
        })
        .await;
}
