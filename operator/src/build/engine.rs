//! The engine: writer StatefulSet (1 replica, read-write shared mount, WAL volume), reader
//! Deployment (read-only mount, GPUs, spread across nodes) with its headless discovery Service
//! and PodDisruptionBudget, and the router Deployment with the public Service.
//!
//! Every engine pod runs `shoal-engine ROLE ...` with the metadata URI in `SHOAL_META` (from a
//! Secret, never in arguments), settings from the engine ConfigMap (`envFrom`) and the
//! ConfigMap's hash as a pod annotation, and is probed on `/readyz` and `/healthz` (:9091).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment, StatefulSet,
    StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    ConfigMapEnvSource, Container, ContainerPort, EnvFromSource, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, PersistentVolumeClaimVolumeSource, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, ResourceRequirements, Service, ServicePort, ServiceSpec,
    Toleration, TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::database::secret_env;
use super::storage::claim_template;
use super::{object_meta, stamp};
use crate::crd::GpuSpec;
use crate::names::{
    ANNOTATION_CONFIG_HASH, Component, DATA_DIR, KEY_META_URI, PORT_GRPC, PORT_METRICS, PORT_REST,
    WAL_DIR,
};
use crate::validate::{MetadataSource, ValidatedCluster, quantity_bytes};

fn listen(port: i32) -> String {
    format!("0.0.0.0:{port}")
}

fn http_probe(path: &str, initial_delay: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("metrics".into()),
            ..HTTPGetAction::default()
        }),
        initial_delay_seconds: Some(initial_delay),
        period_seconds: Some(10),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    }
}

/// The UID/GID the engine images run as (the Dockerfiles' `USER 65532:65532`).
pub const ENGINE_UID: i64 = 65532;

/// Every engine pod runs as the images' non-root user, and its writable volumes are handed to
/// that group (`fsGroup`): most provisioners create a volume root as `root:root 0755`, which the
/// writer could not write its WAL into. `OnRootMismatch` skips the recursive chown when the root
/// already has the right owner, so a large WAL volume does not slow every restart. The shared
/// JuiceFS volume is not touched (the CSIDriver's `fsGroupPolicy: None`).
fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_user: Some(ENGINE_UID),
        run_as_group: Some(ENGINE_UID),
        run_as_non_root: Some(true),
        fs_group: Some(ENGINE_UID),
        fs_group_change_policy: Some("OnRootMismatch".into()),
        ..PodSecurityContext::default()
    }
}

fn port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }
}

/// The `SHOAL_META` variable: the generated Secret's URI or the user's external one.
fn meta_env(vc: &ValidatedCluster) -> EnvVar {
    match &vc.metadata {
        MetadataSource::Managed(_) => {
            secret_env("SHOAL_META", &vc.names.generated_secret(), KEY_META_URI)
        }
        MetadataSource::External(e) => {
            secret_env("SHOAL_META", &e.uri_secret_ref.name, &e.uri_secret_ref.key)
        }
    }
}

fn pod_name_env() -> EnvVar {
    EnvVar {
        name: "POD_NAME".into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "metadata.name".into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

struct EngineContainer {
    role: Component,
    args: Vec<String>,
    env: Vec<EnvVar>,
    ports: Vec<ContainerPort>,
    mounts: Vec<VolumeMount>,
    resources: Option<ResourceRequirements>,
}

fn engine_container(vc: &ValidatedCluster, c: EngineContainer) -> Container {
    let mut env = vec![pod_name_env(), meta_env(vc)];
    env.extend(c.env);
    let mut args = vec![c.role.as_str().to_string()];
    args.extend(c.args);
    let mut ports = c.ports;
    ports.push(port("metrics", PORT_METRICS));
    Container {
        name: c.role.as_str().into(),
        image: Some(vc.spec.engine.image.clone()),
        image_pull_policy: vc
            .spec
            .engine
            .image_pull_policy
            .map(|p| p.as_str().to_string()),
        command: Some(vec!["shoal-engine".into()]),
        args: Some(args),
        env: Some(env),
        env_from: Some(vec![EnvFromSource {
            config_map_ref: Some(ConfigMapEnvSource {
                name: vc.names.config_map(),
                optional: Some(false),
            }),
            ..EnvFromSource::default()
        }]),
        ports: Some(ports),
        volume_mounts: if c.mounts.is_empty() {
            None
        } else {
            Some(c.mounts)
        },
        // A container that dies reports its last log lines (the error it died with) in the
        // pod's status, where the operator's conditions pick them up.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        readiness_probe: Some(http_probe("/readyz", 2, 3)),
        liveness_probe: Some(http_probe("/healthz", 10, 6)),
        resources: c.resources,
        ..Container::default()
    }
}

fn template(
    vc: &ValidatedCluster,
    component: Component,
    config_hash: &str,
    spec: PodSpec,
) -> PodTemplateSpec {
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(vc.names.labels(component)),
            annotations: Some(BTreeMap::from([(
                ANNOTATION_CONFIG_HASH.to_string(),
                config_hash.to_string(),
            )])),
            ..ObjectMeta::default()
        }),
        spec: Some(spec),
    }
}

fn shared_volume(vc: &ValidatedCluster, read_only: bool) -> (Volume, VolumeMount) {
    (
        Volume {
            name: "data".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: vc.names.shared_pvc(),
                read_only: Some(read_only),
            }),
            ..Volume::default()
        },
        VolumeMount {
            name: "data".into(),
            mount_path: DATA_DIR.into(),
            read_only: Some(read_only),
            ..VolumeMount::default()
        },
    )
}

fn selector(vc: &ValidatedCluster, component: Component) -> LabelSelector {
    LabelSelector {
        match_labels: Some(vc.names.selector_labels(component)),
        ..LabelSelector::default()
    }
}

fn non_empty<K: Ord, V>(m: &BTreeMap<K, V>) -> Option<BTreeMap<K, V>>
where
    BTreeMap<K, V>: Clone,
{
    if m.is_empty() { None } else { Some(m.clone()) }
}

fn non_empty_vec<T: Clone>(v: &[T]) -> Option<Vec<T>> {
    if v.is_empty() { None } else { Some(v.to_vec()) }
}

fn service_port(name: &str, port: i32, target: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::Int(target)),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }
}

fn headless_service(
    vc: &ValidatedCluster,
    name: String,
    component: Component,
    ports: Vec<ServicePort>,
) -> Service {
    stamp(
        Service {
            metadata: object_meta(vc, name, component),
            spec: Some(ServiceSpec {
                cluster_ip: Some("None".into()),
                selector: Some(vc.names.selector_labels(component)),
                ports: Some(ports),
                publish_not_ready_addresses: Some(false),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        },
        |s| &mut s.metadata,
    )
}

/// Headless Service the writer StatefulSet is governed by (the router dials it).
pub fn build_writer_service(vc: &ValidatedCluster) -> Service {
    headless_service(
        vc,
        vc.names.writer(),
        Component::Writer,
        vec![
            service_port("grpc", PORT_GRPC, PORT_GRPC),
            service_port("http", PORT_REST, PORT_REST),
        ],
    )
}

/// The writer: one replica (the engine fences a second one through its metadata lease anyway).
pub fn build_writer(vc: &ValidatedCluster, config_hash: &str) -> StatefulSet {
    let w = &vc.spec.writer;
    let (data_vol, data_mount) = shared_volume(vc, false);
    let container = engine_container(
        vc,
        EngineContainer {
            role: Component::Writer,
            args: [
                "--data-dir",
                DATA_DIR,
                "--wal-dir",
                WAL_DIR,
                "--listen",
                &listen(PORT_REST),
                "--grpc-listen",
                &listen(PORT_GRPC),
                "--metrics-listen",
                &listen(PORT_METRICS),
            ]
            .map(String::from)
            .to_vec(),
            env: vec![],
            ports: vec![port("http", PORT_REST), port("grpc", PORT_GRPC)],
            mounts: vec![
                data_mount,
                VolumeMount {
                    name: "wal".into(),
                    mount_path: WAL_DIR.into(),
                    ..VolumeMount::default()
                },
            ],
            resources: w.resources.clone(),
        },
    );
    let pod = PodSpec {
        containers: vec![container],
        volumes: Some(vec![data_vol]),
        security_context: Some(pod_security()),
        node_selector: non_empty(&w.node_selector),
        tolerations: non_empty_vec(&w.tolerations),
        termination_grace_period_seconds: Some(60),
        ..PodSpec::default()
    };
    stamp(
        StatefulSet {
            metadata: object_meta(vc, vc.names.writer(), Component::Writer),
            spec: StatefulSetSpec {
                replicas: Some(1),
                service_name: Some(vc.names.writer()),
                selector: selector(vc, Component::Writer),
                template: template(vc, Component::Writer, config_hash, pod),
                volume_claim_templates: Some(vec![claim_template(
                    vc,
                    "wal",
                    Component::Writer,
                    &w.wal.storage,
                    w.wal.storage_class_name.as_ref(),
                )]),
                ..StatefulSetSpec::default()
            },
            ..StatefulSet::default()
        },
        |s| &mut s.metadata,
    )
}

/// Headless Service whose DNS name lists the ready readers (`--readers-dns`).
pub fn build_readers_service(vc: &ValidatedCluster) -> Service {
    headless_service(
        vc,
        vc.names.readers_headless(),
        Component::Reader,
        vec![service_port("grpc", PORT_GRPC, PORT_GRPC)],
    )
}

/// Engine flags for GPU readers: the device plugin exposes the pod's GPUs as 0..count, and the
/// memory budget goes as a plain byte count (the engine reads `40G` as GiB, Kubernetes as 10^9
/// bytes; a byte count means the same to both).
pub fn gpu_args(gpu: &GpuSpec) -> Vec<String> {
    let devices = (0..gpu.count)
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut args = vec!["--gpu-devices".to_string(), devices];
    // Validation refused a budget that does not convert.
    if let Some(bytes) = gpu.memory_budget.as_deref().and_then(quantity_bytes) {
        args.push("--gpu-memory-budget".into());
        args.push(bytes.to_string());
    }
    args
}

/// Reader resources: the user's, plus the GPU limit (extended resources go in limits).
fn reader_resources(vc: &ValidatedCluster) -> Option<ResourceRequirements> {
    let r = &vc.spec.readers;
    let Some(gpu) = &r.gpu else {
        return r.resources.clone();
    };
    let mut res = r.resources.clone().unwrap_or_default();
    res.limits
        .get_or_insert_with(BTreeMap::new)
        .insert(gpu.resource_name.clone(), Quantity(gpu.count.to_string()));
    Some(res)
}

pub fn build_readers(vc: &ValidatedCluster, config_hash: &str) -> Deployment {
    let r = &vc.spec.readers;
    let (data_vol, data_mount) = shared_volume(vc, true);
    let mut args: Vec<String> = [
        "--data-dir",
        DATA_DIR,
        "--grpc-listen",
        &listen(PORT_GRPC),
        "--metrics-listen",
        &listen(PORT_METRICS),
        "--node-id",
        "$(POD_NAME)",
    ]
    .map(String::from)
    .to_vec();
    let mut tolerations = r.tolerations.clone();
    if let Some(gpu) = &r.gpu {
        args.extend(gpu_args(gpu));
        let tol = Toleration {
            key: Some(gpu.resource_name.clone()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Toleration::default()
        };
        if !tolerations.contains(&tol) {
            tolerations.push(tol);
        }
    }
    let container = engine_container(
        vc,
        EngineContainer {
            role: Component::Reader,
            args,
            env: vec![],
            ports: vec![port("grpc", PORT_GRPC)],
            mounts: vec![data_mount],
            resources: reader_resources(vc),
        },
    );
    let pod = PodSpec {
        containers: vec![container],
        volumes: Some(vec![data_vol]),
        security_context: Some(pod_security()),
        node_selector: non_empty(&r.node_selector),
        tolerations: non_empty_vec(&tolerations),
        affinity: r.affinity.clone(),
        topology_spread_constraints: Some(vec![TopologySpreadConstraint {
            max_skew: 1,
            topology_key: "kubernetes.io/hostname".into(),
            when_unsatisfiable: "ScheduleAnyway".into(),
            label_selector: Some(selector(vc, Component::Reader)),
            ..TopologySpreadConstraint::default()
        }]),
        ..PodSpec::default()
    };
    // GPU nodes rarely have a spare GPU for a surge pod: replace in place instead.
    let (surge, unavailable) = if r.gpu.is_some() { (0, 1) } else { (1, 0) };
    stamp(
        Deployment {
            metadata: object_meta(vc, vc.names.readers(), Component::Reader),
            spec: DeploymentSpec {
                replicas: Some(r.replicas),
                selector: selector(vc, Component::Reader),
                strategy: Some(DeploymentStrategy {
                    type_: Some("RollingUpdate".into()),
                    rolling_update: Some(RollingUpdateDeployment {
                        max_surge: Some(IntOrString::Int(surge)),
                        max_unavailable: Some(IntOrString::Int(unavailable)),
                    }),
                }),
                template: template(vc, Component::Reader, config_hash, pod),
                ..DeploymentSpec::default()
            },
            ..Deployment::default()
        },
        |d| &mut d.metadata,
    )
}

/// At most one reader voluntarily evicted at a time.
pub fn build_readers_pdb(vc: &ValidatedCluster) -> PodDisruptionBudget {
    stamp(
        PodDisruptionBudget {
            metadata: object_meta(vc, vc.names.readers_pdb(), Component::Reader),
            spec: Some(PodDisruptionBudgetSpec {
                max_unavailable: Some(IntOrString::Int(1)),
                selector: Some(selector(vc, Component::Reader)),
                ..PodDisruptionBudgetSpec::default()
            }),
            ..PodDisruptionBudget::default()
        },
        |p| &mut p.metadata,
    )
}

pub fn build_router(vc: &ValidatedCluster, config_hash: &str) -> Deployment {
    let rt = &vc.spec.router;
    let n = &vc.names;
    let mut env = vec![];
    if let Some(auth) = &rt.auth {
        env.push(secret_env(
            "SHOAL_AUTH_TOKEN",
            &auth.token_secret_ref.name,
            &auth.token_secret_ref.key,
        ));
    }
    let container = engine_container(
        vc,
        EngineContainer {
            role: Component::Router,
            args: vec![
                "--writer".into(),
                n.writer_grpc_addr(),
                "--readers-dns".into(),
                n.readers_dns(),
                "--listen".into(),
                listen(PORT_REST),
                "--metrics-listen".into(),
                listen(PORT_METRICS),
            ],
            env,
            ports: vec![port("http", PORT_REST)],
            mounts: vec![],
            resources: rt.resources.clone(),
        },
    );
    let pod = PodSpec {
        containers: vec![container],
        security_context: Some(pod_security()),
        ..PodSpec::default()
    };
    stamp(
        Deployment {
            metadata: object_meta(vc, n.router(), Component::Router),
            spec: DeploymentSpec {
                replicas: Some(rt.replicas),
                selector: selector(vc, Component::Router),
                template: template(vc, Component::Router, config_hash, pod),
                ..DeploymentSpec::default()
            },
            ..Deployment::default()
        },
        |d| &mut d.metadata,
    )
}

/// The public Service (named after the cluster).
pub fn build_router_service(vc: &ValidatedCluster) -> Service {
    let s = &vc.spec.router.service;
    let mut meta = object_meta(vc, vc.names.router_service(), Component::Router);
    meta.annotations = non_empty(&s.annotations);
    stamp(
        Service {
            metadata: meta,
            spec: Some(ServiceSpec {
                type_: Some(s.type_.as_str().into()),
                selector: Some(vc.names.selector_labels(Component::Router)),
                ports: Some(vec![service_port("http", s.port, PORT_REST)]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        },
        |s| &mut s.metadata,
    )
}
