//! Managed dependencies: MariaDB for the catalogue and Redis (append-only file on) for JuiceFS
//! metadata, each a one-replica StatefulSet with its own volume and a Service. Nothing is built
//! for the external variants.

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, PodSpec, PodTemplateSpec, Probe,
    SecretKeySelector, Service, ServicePort, ServiceSpec, TCPSocketAction, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::storage::claim_template;
use super::{object_meta, stamp};
use crate::names::{
    Component, KEY_MYSQL_PASSWORD, KEY_MYSQL_ROOT_PASSWORD, KEY_REDIS_PASSWORD, MYSQL_DATABASE,
    MYSQL_USER, PORT_MYSQL, PORT_REDIS,
};
use crate::validate::{MetadataSource, RedisSource, ValidatedCluster};

/// Env var from a key of the generated Secret.
pub(crate) fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn plain_env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn tcp_probe(port: i32, initial_delay: i32) -> Probe {
    Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::Int(port),
            ..TCPSocketAction::default()
        }),
        initial_delay_seconds: Some(initial_delay),
        period_seconds: Some(10),
        ..Probe::default()
    }
}

fn service(vc: &ValidatedCluster, name: String, component: Component, port: i32) -> Service {
    stamp(
        Service {
            metadata: object_meta(vc, name, component),
            spec: Some(ServiceSpec {
                cluster_ip: Some("None".into()),
                selector: Some(vc.names.selector_labels(component)),
                ports: Some(vec![ServicePort {
                    name: Some(component.as_str().into()),
                    port,
                    target_port: Some(IntOrString::Int(port)),
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        },
        |s| &mut s.metadata,
    )
}

struct SingleDb<'a> {
    name: String,
    component: Component,
    container: Container,
    storage: &'a str,
    class: Option<&'a String>,
}

fn single_replica_set(vc: &ValidatedCluster, db: SingleDb<'_>) -> StatefulSet {
    let labels = vc.names.selector_labels(db.component);
    stamp(
        StatefulSet {
            metadata: object_meta(vc, db.name.clone(), db.component),
            spec: StatefulSetSpec {
                replicas: Some(1),
                service_name: Some(db.name.clone()),
                selector: LabelSelector {
                    match_labels: Some(labels),
                    ..LabelSelector::default()
                },
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(vc.names.labels(db.component)),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(PodSpec {
                        containers: vec![db.container],
                        ..PodSpec::default()
                    }),
                },
                volume_claim_templates: Some(vec![claim_template(
                    vc,
                    "data",
                    db.component,
                    db.storage,
                    db.class,
                )]),
                ..StatefulSetSpec::default()
            },
            ..StatefulSet::default()
        },
        |s| &mut s.metadata,
    )
}

/// MariaDB StatefulSet + headless Service, when the metadata store is managed.
pub fn build_mysql(vc: &ValidatedCluster) -> Option<(Service, StatefulSet)> {
    let MetadataSource::Managed(m) = &vc.metadata else {
        return None;
    };
    let n = &vc.names;
    let secret = n.generated_secret();
    let container = Container {
        name: "mysql".into(),
        image: Some(m.image.clone()),
        env: Some(vec![
            secret_env("MARIADB_ROOT_PASSWORD", &secret, KEY_MYSQL_ROOT_PASSWORD),
            secret_env("MARIADB_PASSWORD", &secret, KEY_MYSQL_PASSWORD),
            plain_env("MARIADB_DATABASE", MYSQL_DATABASE),
            plain_env("MARIADB_USER", MYSQL_USER),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("mysql".into()),
            container_port: PORT_MYSQL,
            ..ContainerPort::default()
        }]),
        volume_mounts: Some(vec![VolumeMount {
            name: "data".into(),
            mount_path: "/var/lib/mysql".into(),
            ..VolumeMount::default()
        }]),
        readiness_probe: Some(tcp_probe(PORT_MYSQL, 5)),
        liveness_probe: Some(tcp_probe(PORT_MYSQL, 30)),
        resources: m.resources.clone(),
        ..Container::default()
    };
    let sts = single_replica_set(
        vc,
        SingleDb {
            name: n.mysql(),
            component: Component::Mysql,
            container,
            storage: &m.storage,
            class: m.storage_class_name.as_ref(),
        },
    );
    Some((service(vc, n.mysql(), Component::Mysql, PORT_MYSQL), sts))
}

/// Redis StatefulSet (AOF, fsync every second, password from the generated Secret) + Service,
/// when JuiceFS metadata is managed.
pub fn build_redis(vc: &ValidatedCluster) -> Option<(Service, StatefulSet)> {
    let RedisSource::Managed(r) = &vc.redis else {
        return None;
    };
    let n = &vc.names;
    let container = Container {
        name: "redis".into(),
        image: Some(r.image.clone()),
        // $(VAR) is expanded by the kubelet from the env below, so the password is not in the spec.
        args: Some(
            [
                "redis-server",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--dir",
                "/data",
                "--requirepass",
                "$(REDIS_PASSWORD)",
            ]
            .map(String::from)
            .to_vec(),
        ),
        command: None,
        env: Some(vec![secret_env(
            "REDIS_PASSWORD",
            &n.generated_secret(),
            KEY_REDIS_PASSWORD,
        )]),
        ports: Some(vec![ContainerPort {
            name: Some("redis".into()),
            container_port: PORT_REDIS,
            ..ContainerPort::default()
        }]),
        volume_mounts: Some(vec![VolumeMount {
            name: "data".into(),
            mount_path: "/data".into(),
            ..VolumeMount::default()
        }]),
        readiness_probe: Some(tcp_probe(PORT_REDIS, 2)),
        liveness_probe: Some(tcp_probe(PORT_REDIS, 15)),
        resources: r.resources.clone(),
        ..Container::default()
    };
    let sts = single_replica_set(
        vc,
        SingleDb {
            name: n.redis(),
            component: Component::Redis,
            container,
            storage: &r.storage,
            class: r.storage_class_name.as_ref(),
        },
    );
    Some((service(vc, n.redis(), Component::Redis, PORT_REDIS), sts))
}
