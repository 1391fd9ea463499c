//! Step 4 of the reconcile pipeline: the status a user reads (`kubectl get vc`, conditions).
//!
//! Pure: computed from the apply report (live objects) and the previous status, with the clock
//! passed in. A condition keeps its `lastTransitionTime` while its status is unchanged, so a
//! steady state computes an identical status and no write is made.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::apply::{Action, ApplyReport, Observed, writer_rolled_out};
use crate::crd::{Phase, ReadersStatus, VectorClusterStatus};
use crate::names::Component;
use crate::validate::{MetadataSource, RedisSource, ValidatedCluster, ValidationError};

pub const METADATA_READY: &str = "MetadataReady";
pub const STORAGE_READY: &str = "StorageReady";
pub const WRITER_READY: &str = "WriterReady";
pub const READERS_READY: &str = "ReadersReady";
pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// One condition before timestamps are attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

fn cond(type_: &'static str, status: bool, reason: &str, message: impl Into<String>) -> Cond {
    Cond {
        type_,
        status,
        reason: reason.into(),
        message: message.into(),
    }
}

/// Merges computed conditions into the previous list, keeping transition times of
/// conditions whose status did not change.
pub fn merge_conditions(
    previous: &[Condition],
    computed: &[Cond],
    generation: i64,
    now: &Time,
) -> Vec<Condition> {
    computed
        .iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" }.to_string();
            let prev = previous.iter().find(|p| p.type_ == c.type_);
            let last_transition_time = match prev {
                Some(p) if p.status == status => p.last_transition_time.clone(),
                _ => now.clone(),
            };
            Condition {
                type_: c.type_.to_string(),
                status,
                reason: c.reason.clone(),
                message: c.message.clone(),
                observed_generation: Some(generation),
                last_transition_time,
            }
        })
        .collect()
}

fn sts_ready(s: Option<&StatefulSet>) -> (i32, i32) {
    let want = s.and_then(|s| s.spec.replicas).unwrap_or(1);
    let ready = s
        .and_then(|s| s.status.as_ref())
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    (ready, want)
}

/// `(replicas, ready, updated, want)` of a Deployment.
fn deploy_counts(d: Option<&Deployment>) -> (i32, i32, i32, i32) {
    let want = d.and_then(|d| d.spec.replicas).unwrap_or(1);
    let st = d.and_then(|d| d.status.as_ref());
    (
        st.and_then(|s| s.replicas).unwrap_or(0),
        st.and_then(|s| s.ready_replicas).unwrap_or(0),
        st.and_then(|s| s.updated_replicas).unwrap_or(0),
        want,
    )
}

/// The newest of `events` (the kubelet's volume Warnings) about `pod`: `(reason, message)`.
fn newest_volume_event<'a>(events: &'a [Event], pod: &Pod) -> Option<(&'a str, &'a str)> {
    let name = pod.metadata.name.as_deref()?;
    let uid = pod.metadata.uid.as_deref();
    events
        .iter()
        .filter(|e| {
            e.involved_object.name.as_deref() == Some(name)
                && (uid.is_none()
                    || e.involved_object.uid.is_none()
                    || e.involved_object.uid.as_deref() == uid)
        })
        .max_by_key(|e| {
            e.last_timestamp
                .as_ref()
                .map(|t| t.0)
                .or_else(|| e.event_time.as_ref().map(|t| t.0))
        })
        .map(|e| {
            (
                e.reason.as_deref().unwrap_or("FailedMount"),
                e.message.as_deref().unwrap_or("").trim(),
            )
        })
}

/// Why the first not-ready pod of a component is not ready, in the kubelet's and the
/// container's own words: a waiting reason (`CrashLoopBackOff`, `ImagePullBackOff`, ...) with
/// the last exit and its termination message (the engine's containers fall back to their last
/// log lines, so this is the error the process died with), why it cannot be scheduled, or, for
/// a pod still creating its containers, the kubelet's newest `FailedMount`/`FailedAttachVolume`
/// Event (which carries the CSI driver's error: a wrong object storage key, an unreachable
/// store). `None` when every pod of the component is ready or none exists yet.
pub fn pod_problem(obs: &Observed, component: &str) -> Option<String> {
    const MAX: usize = 400;
    let pods = &obs.pods;
    let of_component = pods.iter().filter(|p| {
        p.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(crate::names::LABEL_COMPONENT))
            .is_some_and(|c| c == component)
            && p.metadata.deletion_timestamp.is_none()
    });
    for pod in of_component {
        let name = pod.metadata.name.as_deref().unwrap_or("?");
        let Some(st) = pod.status.as_ref() else {
            continue;
        };
        let conds = st.conditions.as_deref().unwrap_or(&[]);
        if conds
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
        {
            continue;
        }
        if let Some(c) = conds
            .iter()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        {
            return Some(format!(
                "pod {name} cannot be scheduled: {}",
                c.message.as_deref().unwrap_or("no reason given")
            ));
        }
        let creating = st.phase.as_deref() == Some("Pending")
            && st
                .container_statuses
                .as_deref()
                .unwrap_or(&[])
                .iter()
                .all(|cs| {
                    cs.state
                        .as_ref()
                        .and_then(|s| s.waiting.as_ref())
                        .is_none_or(|w| w.reason.as_deref() == Some("ContainerCreating"))
                });
        if creating && let Some((reason, msg)) = newest_volume_event(&obs.pod_volume_events, pod) {
            let msg: String = msg.chars().take(MAX).collect();
            return Some(format!(
                "pod {name} cannot start: its volume does not mount ({reason}): {msg}"
            ));
        }
        for cs in st.container_statuses.as_deref().unwrap_or(&[]) {
            let mut parts = Vec::new();
            if let Some(w) = cs.state.as_ref().and_then(|s| s.waiting.as_ref()) {
                let reason = w.reason.as_deref().unwrap_or("Waiting");
                match w.message.as_deref() {
                    Some(m) if !m.is_empty() => parts.push(format!("{reason}: {m}")),
                    _ => parts.push(reason.to_string()),
                }
            }
            let last = cs
                .state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .or_else(|| cs.last_state.as_ref().and_then(|s| s.terminated.as_ref()));
            if let Some(t) = last {
                let msg = t.message.as_deref().unwrap_or("").trim();
                let msg: String = msg
                    .chars()
                    .rev()
                    .take(MAX)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                parts.push(format!(
                    "last exit {} ({}){}{msg}",
                    t.exit_code,
                    t.reason.as_deref().unwrap_or("Error"),
                    if msg.is_empty() { "" } else { ": " }
                ));
            }
            if !parts.is_empty() {
                return Some(format!("pod {name}: {}", parts.join("; ")));
            }
            if cs.state.as_ref().is_some_and(|s| s.running.is_some()) && !cs.ready {
                return Some(format!(
                    "pod {name} runs but is not ready (its readiness probe fails; `kubectl describe pod {name}`)"
                ));
            }
        }
    }
    None
}

fn with_cause(message: String, obs: &Observed, component: &str) -> String {
    match pod_problem(obs, component) {
        Some(p) => format!("{message}; {p}"),
        None => message,
    }
}

/// Secrets shorter than this are left alone: too short to be a real credential, and replacing
/// them would garble ordinary words of a message.
const MIN_REDACTED_LEN: usize = 6;

/// Replaces every occurrence of one of `secrets` in the condition messages with `<redacted>`.
/// Messages quote other components' words (the kubelet's Events carry the CSI driver's error,
/// a container's termination message carries the engine's last log line); a component that
/// printed a credential must not get it into `kubectl get vc -o yaml`.
///
/// Guarantees: afterwards no message contains a secret of at least [`MIN_REDACTED_LEN`] bytes.
pub fn redact_secrets(st: &mut VectorClusterStatus, secrets: &[String]) {
    let mut secrets: Vec<&str> = secrets
        .iter()
        .map(String::as_str)
        .filter(|s| s.len() >= MIN_REDACTED_LEN)
        .collect();
    // Longest first: a secret containing another is replaced whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for c in &mut st.conditions {
        for s in &secrets {
            if c.message.contains(s) {
                c.message = c.message.replace(s, "<redacted>");
            }
        }
        debug_assert!(
            secrets.iter().all(|s| !c.message.contains(s)),
            "a condition message still quotes a secret"
        );
    }
}

/// Status after a successful apply.
pub fn compute_status(
    vc: &ValidatedCluster,
    report: &ApplyReport,
    previous: Option<&VectorClusterStatus>,
    now: &Time,
) -> VectorClusterStatus {
    let obs = &report.observed;
    let metadata = match &vc.metadata {
        MetadataSource::External(_) => cond(
            METADATA_READY,
            true,
            "External",
            "using the external MySQL from spec.metadata.external",
        ),
        MetadataSource::Managed(_) => {
            let (ready, want) = sts_ready(obs.mysql.as_ref());
            if ready >= want {
                cond(
                    METADATA_READY,
                    true,
                    "MysqlReady",
                    "managed MariaDB is ready",
                )
            } else {
                cond(
                    METADATA_READY,
                    false,
                    "MysqlNotReady",
                    with_cause(
                        format!(
                            "StatefulSet {} has {ready}/{want} ready pods; check its pods and volume claim",
                            vc.names.mysql()
                        ),
                        obs,
                        Component::Mysql.as_str(),
                    ),
                )
            }
        }
    };
    let redis_ok = match &vc.redis {
        RedisSource::External(_) => Ok(()),
        RedisSource::Managed(_) => {
            let (ready, want) = sts_ready(obs.redis.as_ref());
            if ready >= want {
                Ok(())
            } else {
                Err(with_cause(
                    format!(
                        "StatefulSet {} has {ready}/{want} ready pods",
                        vc.names.redis()
                    ),
                    obs,
                    Component::Redis.as_str(),
                ))
            }
        }
    };
    let pvc_phase = obs
        .shared_pvc
        .as_ref()
        .and_then(|p| p.status.as_ref())
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Pending".into());
    let storage = match (&redis_ok, pvc_phase.as_str()) {
        (Ok(()), "Bound") => cond(
            STORAGE_READY,
            true,
            "VolumeBound",
            "JuiceFS metadata is ready and the shared volume is bound",
        ),
        (Err(m), _) => cond(STORAGE_READY, false, "RedisNotReady", m.clone()),
        (Ok(()), phase) => cond(
            STORAGE_READY,
            false,
            "VolumeNotBound",
            // A static volume binds through the PV controller, not the CSI driver: name the
            // claim's phase and leave the driver out of it.
            format!(
                "PersistentVolumeClaim {} is {phase}, waiting to bind PersistentVolume {}",
                vc.names.shared_pvc(),
                vc.names.shared_pv()
            ),
        ),
    };
    let writer = match obs.writer.as_ref() {
        Some(w) if writer_rolled_out(w) => {
            cond(WRITER_READY, true, "WriterReady", "the writer is ready")
        }
        _ => {
            let (ready, want) = sts_ready(obs.writer.as_ref());
            cond(
                WRITER_READY,
                false,
                "WriterNotReady",
                with_cause(
                    format!(
                        "StatefulSet {} has {ready}/{want} ready, updated pods",
                        vc.names.writer()
                    ),
                    obs,
                    Component::Writer.as_str(),
                ),
            )
        }
    };
    let (r_replicas, r_ready, r_updated, r_want) = deploy_counts(obs.readers.as_ref());
    let readers_ok = r_ready >= r_want && r_updated >= r_want;
    let readers = if r_want == 0 {
        cond(READERS_READY, true, "ScaledToZero", "no readers requested")
    } else if readers_ok {
        cond(
            READERS_READY,
            true,
            "ReadersReady",
            format!("{r_ready}/{r_want} readers ready"),
        )
    } else {
        cond(
            READERS_READY,
            false,
            "ReadersNotReady",
            with_cause(
                format!(
                    "{r_ready}/{r_want} readers ready ({r_updated} updated); check Deployment {}",
                    vc.names.readers()
                ),
                obs,
                Component::Reader.as_str(),
            ),
        )
    };
    let (_, rt_ready, rt_updated, rt_want) = deploy_counts(obs.router.as_ref());
    let router_ok = rt_ready >= rt_want && rt_updated >= rt_want;
    let parts = [&metadata, &storage, &writer, &readers];
    let all_ok = parts.iter().all(|c| c.status) && router_ok;
    let ready = if all_ok {
        cond(READY, true, "ClusterReady", "every component is ready")
    } else {
        let waiting: Vec<&str> = parts
            .iter()
            .filter(|c| !c.status)
            .map(|c| c.type_)
            .chain((!router_ok).then_some("RouterReady"))
            .collect();
        cond(
            READY,
            false,
            "ComponentsNotReady",
            format!("waiting for {}", waiting.join(", ")),
        )
    };
    let changed: Vec<String> = report
        .names_with(Action::Created)
        .into_iter()
        .chain(report.names_with(Action::Updated))
        .collect();
    let deferred = report.names_with(Action::Deferred);
    let progressing = if !deferred.is_empty() {
        cond(
            PROGRESSING,
            true,
            "WaitingForWriterRollout",
            format!(
                "{} will update once the writer has rolled out",
                deferred.join(", ")
            ),
        )
    } else if !all_ok {
        cond(
            PROGRESSING,
            true,
            "Rollout",
            "waiting for pods to become ready",
        )
    } else {
        cond(PROGRESSING, false, "Stable", "nothing to change")
    };
    let was_running = previous.is_some_and(|p| p.phase == Some(Phase::Running));
    // Degraded: was running, and now fewer pods are ready than exist with the current template
    // (a crash or node loss), not merely a rollout in progress.
    let lost_readers = r_want > 0 && r_updated >= r_want && r_ready < r_want;
    let degraded = if !all_ok && (was_running || lost_readers) && changed.is_empty() {
        cond(DEGRADED, true, "ComponentsLost", ready.message.clone())
    } else {
        cond(DEGRADED, false, "Healthy", "no component lost")
    };
    let phase = if all_ok {
        Phase::Running
    } else if degraded.status {
        Phase::Degraded
    } else {
        Phase::Provisioning
    };
    let conds = [
        metadata,
        storage,
        writer,
        readers,
        ready,
        progressing,
        degraded,
    ];
    let prev_conds = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    VectorClusterStatus {
        phase: Some(phase),
        observed_generation: Some(vc.generation),
        conditions: merge_conditions(prev_conds, &conds, vc.generation, now),
        readers: ReadersStatus {
            replicas: r_replicas,
            ready_replicas: r_ready,
            selector: vc.names.readers_selector_string(),
        },
        endpoint: Some(vc.names.endpoint(vc.spec.router.service.port)),
    }
}

/// Status for a spec that failed validation: `Ready=False` with the reason, phase Failed.
/// `observedGeneration` stays where it was (nothing of this generation was applied).
pub fn invalid_status(
    err: &ValidationError,
    generation: i64,
    previous: Option<&VectorClusterStatus>,
    now: &Time,
) -> VectorClusterStatus {
    let mut st = previous.cloned().unwrap_or_default();
    let computed = [
        cond(READY, false, err.reason(), err.to_string()),
        cond(
            PROGRESSING,
            false,
            "InvalidSpec",
            "fix the spec; nothing is applied until then",
        ),
    ];
    let merged = merge_conditions(&st.conditions, &computed, generation, now);
    st.conditions
        .retain(|c| c.type_ != READY && c.type_ != PROGRESSING);
    st.conditions.extend(merged);
    st.conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
    st.phase = Some(Phase::Failed);
    st
}

/// Status when an API call failed mid-way: keeps everything, marks Progressing with the error.
pub fn failed_apply_status(
    message: &str,
    generation: i64,
    previous: Option<&VectorClusterStatus>,
    now: &Time,
) -> VectorClusterStatus {
    let mut st = previous.cloned().unwrap_or_default();
    let computed = [cond(
        PROGRESSING,
        true,
        "ApplyFailed",
        format!("{message}; retrying"),
    )];
    let merged = merge_conditions(&st.conditions, &computed, generation, now);
    st.conditions.retain(|c| c.type_ != PROGRESSING);
    st.conditions.extend(merged);
    if st.phase.is_none() {
        st.phase = Some(Phase::Pending);
    }
    st
}
