//! Builders from YAML fixture CRs: every object each fixture produces is checked.
#![allow(clippy::unwrap_used)]

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Container, Secret, Service};
use shoal_operator::build::secret::Credentials;
use shoal_operator::build::{
    Desired, DesiredState, Inputs, build_all, secret::build_generated_secret,
};
use shoal_operator::crd::VectorCluster;
use shoal_operator::names::{ANNOTATION_APPLIED_HASH, ANNOTATION_CONFIG_HASH, CSI_DRIVER};
use shoal_operator::validate::{ValidatedCluster, ValidationError, validate};

fn fixture(name: &str) -> VectorCluster {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn creds() -> Credentials {
    Credentials {
        mysql_root_password: "rootpw".into(),
        mysql_password: "userpw".into(),
        redis_password: "redispw".into(),
    }
}

fn inputs(external_redis: Option<&str>, keys: bool) -> Inputs {
    Inputs {
        credentials: creds(),
        external_redis_url: external_redis.map(String::from),
        object_keys: keys.then(|| ("AK".to_string(), "SK".to_string())),
        azure_connection_string: None,
    }
}

fn build(name: &str, inputs: &Inputs) -> (ValidatedCluster, DesiredState) {
    let v = validate(&fixture(name)).unwrap();
    let d = build_all(&v, inputs);
    (v, d)
}

fn sts<'a>(d: &'a DesiredState, name: &str) -> &'a StatefulSet {
    match d.get("StatefulSet", name) {
        Some(Desired::StatefulSet(s)) => s,
        other => panic!("no StatefulSet {name}: {other:?}"),
    }
}
fn deploy<'a>(d: &'a DesiredState, name: &str) -> &'a Deployment {
    match d.get("Deployment", name) {
        Some(Desired::Deployment(s)) => s,
        other => panic!("no Deployment {name}: {other:?}"),
    }
}
fn svc<'a>(d: &'a DesiredState, name: &str) -> &'a Service {
    match d.get("Service", name) {
        Some(Desired::Service(s)) => s,
        other => panic!("no Service {name}: {other:?}"),
    }
}
fn secret<'a>(d: &'a DesiredState, name: &str) -> &'a Secret {
    match d.get("Secret", name) {
        Some(Desired::Secret(s)) => s,
        other => panic!("no Secret {name}: {other:?}"),
    }
}
fn container(spec: Option<&k8s_openapi::api::core::v1::PodSpec>) -> &Container {
    &spec.unwrap().containers[0]
}
fn secret_str(s: &Secret, key: &str) -> String {
    String::from_utf8(s.data.as_ref().unwrap()[key].0.clone()).unwrap()
}
fn order(d: &DesiredState) -> Vec<String> {
    d.objects
        .iter()
        .map(|o| format!("{} {}", o.kind(), o.name()))
        .collect()
}

#[test]
fn minimal_cluster_builds_dependencies_before_the_engine_in_a_fixed_order() {
    let (_, d) = build("minimal.yaml", &inputs(None, true));
    assert_eq!(
        order(&d),
        [
            "ConfigMap demo-engine-config",
            "Service demo-mysql",
            "StatefulSet demo-mysql",
            "Service demo-redis",
            "StatefulSet demo-redis",
            "Secret demo-juicefs",
            "PersistentVolume shoal-shoal-demo-data",
            "PersistentVolumeClaim demo-data",
            "Service demo-writer",
            "StatefulSet demo-writer",
            "Service demo-readers",
            "Deployment demo-reader",
            "PodDisruptionBudget demo-reader",
            "Deployment demo-router",
            "Service demo",
        ]
    );
    for o in &d.objects {
        let m = o.meta();
        assert!(
            m.annotations
                .as_ref()
                .unwrap()
                .contains_key(ANNOTATION_APPLIED_HASH),
            "{}",
            o.name()
        );
        assert_eq!(m.labels.as_ref().unwrap()["shoal.dev/cluster"], "demo");
        assert_eq!(
            m.labels.as_ref().unwrap()["app.kubernetes.io/managed-by"],
            "shoal-operator"
        );
        if o.kind() == "PersistentVolume" {
            assert!(
                m.owner_references.is_none() && m.namespace.is_none(),
                "PV is cluster-scoped"
            );
        } else {
            let owner = &m.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (owner.kind.as_str(), owner.name.as_str()),
                ("VectorCluster", "demo")
            );
            assert_eq!(owner.uid, "6f1c1a2e-0000-4000-8000-000000000001");
            assert_eq!(owner.controller, Some(true));
            assert_eq!(m.namespace.as_deref(), Some("shoal"));
        }
    }
}

#[test]
fn building_twice_gives_identical_objects_and_hashes() {
    let (_, a) = build("gpu.yaml", &inputs(None, false));
    let (_, b) = build("gpu.yaml", &inputs(None, false));
    assert_eq!(a, b);
}

#[test]
fn managed_mysql_and_redis_take_passwords_from_the_generated_secret() {
    let (v, d) = build("minimal.yaml", &inputs(None, true));
    let mysql = sts(&d, "demo-mysql");
    let spec = &mysql.spec;
    assert_eq!(spec.replicas, Some(1));
    let c = container(spec.template.spec.as_ref());
    assert_eq!(c.image.as_deref(), Some("mariadb:11.4"));
    let env = c.env.as_ref().unwrap();
    let root = env
        .iter()
        .find(|e| e.name == "MARIADB_ROOT_PASSWORD")
        .unwrap();
    let sel = root
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!(
        (sel.name.as_str(), sel.key.as_str()),
        ("demo-credentials", "mysql-root-password")
    );
    let claim = &spec.volume_claim_templates.as_ref().unwrap()[0];
    assert_eq!(
        claim
            .spec
            .as_ref()
            .unwrap()
            .resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()["storage"]
            .0,
        "10Gi"
    );
    assert_eq!(
        svc(&d, "demo-mysql")
            .spec
            .as_ref()
            .unwrap()
            .ports
            .as_ref()
            .unwrap()[0]
            .port,
        3306
    );

    let redis = sts(&d, "demo-redis");
    let rc = container(redis.spec.template.spec.as_ref());
    let args = rc.args.as_ref().unwrap().join(" ");
    assert!(
        args.contains("--appendonly yes") && args.contains("--requirepass $(REDIS_PASSWORD)"),
        "{args}"
    );
    assert!(
        !args.contains("redispw"),
        "password must not be in the spec"
    );

    let generated = build_generated_secret(&v, &creds());
    assert_eq!(
        secret_str(&generated, "meta-uri"),
        "mysql://shoal:userpw@demo-mysql.shoal.svc:3306/shoal"
    );
    assert_eq!(secret_str(&generated, "redis-password"), "redispw");
}

#[test]
fn juicefs_secret_uses_the_csi_field_names_and_the_managed_redis_url() {
    let (_, d) = build("minimal.yaml", &inputs(None, true));
    let s = secret(&d, "demo-juicefs");
    assert_eq!(secret_str(s, "name"), "shoal-demo");
    assert_eq!(
        secret_str(s, "metaurl"),
        "redis://:redispw@demo-redis.shoal.svc:6379/1"
    );
    assert_eq!(secret_str(s, "storage"), "minio");
    assert_eq!(
        secret_str(s, "bucket"),
        "http://minio.storage.svc:9000/shoal"
    );
    assert_eq!(secret_str(s, "access-key"), "AK");
    assert_eq!(secret_str(s, "secret-key"), "SK");
    assert!(!s.data.as_ref().unwrap().contains_key("format-options"));
}

#[test]
fn an_azure_connection_string_goes_to_the_juicefs_secret_as_envs_and_nowhere_else() {
    const CS: &str = "DefaultEndpointsProtocol=https;AccountName=shoal;AccountKey=QUJD;\
                      EndpointSuffix=core.windows.net";
    let inputs = Inputs {
        azure_connection_string: Some(CS.to_string()),
        ..inputs(None, false)
    };
    let (v, d) = build("azure-blob.yaml", &inputs);
    let s = secret(&d, &v.names.juicefs_secret());
    assert_eq!(secret_str(s, "storage"), "wasb");
    assert_eq!(
        secret_str(s, "bucket"),
        "https://shoal.blob.core.windows.net"
    );
    let envs: std::collections::BTreeMap<String, String> =
        serde_json::from_str(&secret_str(s, "envs")).unwrap();
    assert_eq!(
        envs,
        [(
            "AZURE_STORAGE_CONNECTION_STRING".to_string(),
            CS.to_string()
        )]
        .into()
    );
    let data = s.data.as_ref().unwrap();
    assert!(!data.contains_key("access-key") && !data.contains_key("secret-key"));
    // The string is in that one Secret only: no other object carries it or its key.
    for o in &d.objects {
        if o.kind() == "Secret" && o.name() == v.names.juicefs_secret() {
            continue;
        }
        let text = format!("{o:?}");
        assert!(
            !text.contains("QUJD"),
            "{} {} carries the key",
            o.kind(),
            o.name()
        );
    }
}

#[test]
fn a_wasb_bucket_on_an_ip_address_and_a_connection_string_off_wasb_are_rejected() {
    let mut vc = fixture("azure-blob.yaml");
    vc.spec.storage.object_storage.bucket = "http://10.0.0.5:10000/devstoreaccount1/shoal".into();
    let e = validate(&vc).unwrap_err();
    assert!(matches!(e, ValidationError::WasbBucket(_)), "{e}");
    assert_eq!(e.reason(), "InvalidBucket");
    let mut vc = fixture("azure-blob.yaml");
    vc.spec.storage.object_storage.type_ = shoal_operator::crd::ObjectStorageType::S3;
    vc.spec.storage.object_storage.bucket = "http://10.0.0.5:9000/shoal".into();
    let e = validate(&vc).unwrap_err();
    assert!(
        matches!(e, ValidationError::ConnectionStringNotWasb("s3")),
        "{e}"
    );
    assert_eq!(e.reason(), "InvalidCredentials");
}

#[test]
fn shared_volume_is_a_static_rwx_csi_volume_bound_to_its_claim() {
    let (_, d) = build("minimal.yaml", &inputs(None, true));
    let Some(Desired::PersistentVolume(pv)) = d.get("PersistentVolume", "shoal-shoal-demo-data")
    else {
        panic!()
    };
    let spec = pv.spec.as_ref().unwrap();
    let csi = spec.csi.as_ref().unwrap();
    assert_eq!(csi.driver, CSI_DRIVER);
    assert_eq!(csi.volume_handle, "shoal-demo");
    assert_eq!(
        csi.node_stage_secret_ref.as_ref().unwrap().name.as_deref(),
        Some("demo-juicefs")
    );
    assert_eq!(spec.access_modes.as_ref().unwrap(), &["ReadWriteMany"]);
    assert_eq!(
        spec.persistent_volume_reclaim_policy.as_deref(),
        Some("Retain")
    );
    assert_eq!(
        spec.claim_ref.as_ref().unwrap().name.as_deref(),
        Some("demo-data")
    );
    let Some(Desired::PersistentVolumeClaim(pvc)) = d.get("PersistentVolumeClaim", "demo-data")
    else {
        panic!()
    };
    let ps = pvc.spec.as_ref().unwrap();
    assert_eq!(ps.volume_name.as_deref(), Some("shoal-shoal-demo-data"));
    assert_eq!(ps.storage_class_name.as_deref(), Some(""));
    assert_eq!(ps.access_modes.as_ref().unwrap(), &["ReadWriteMany"]);
}

#[test]
fn writer_is_one_replica_with_rw_data_wal_claim_and_engine_probes() {
    let (_, d) = build("gpu.yaml", &inputs(None, false));
    let w = sts(&d, "gpu-writer");
    let spec = &w.spec;
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(spec.service_name.as_deref(), Some("gpu-writer"));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.node_selector.as_ref().unwrap()["pool"], "cpu");
    let c = &pod.containers[0];
    assert_eq!(
        c.image.as_deref(),
        Some("registry.example/shoal-engine:1.2.3")
    );
    assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
    assert_eq!(c.command.as_ref().unwrap(), &["shoal-engine"]);
    assert_eq!(
        c.args.as_ref().unwrap().join(" "),
        "writer --data-dir /data --wal-dir /wal --listen 0.0.0.0:19530 --grpc-listen 0.0.0.0:19531 --metrics-listen 0.0.0.0:9091"
    );
    let data = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == "data")
        .unwrap();
    assert_eq!(data.read_only, Some(false));
    assert_eq!(
        c.readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/readyz")
    );
    assert_eq!(
        c.liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/healthz")
    );
    let meta = c
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "SHOAL_META")
        .unwrap();
    assert_eq!(
        meta.value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap()
            .key,
        "meta-uri"
    );
    let wal = &spec.volume_claim_templates.as_ref().unwrap()[0];
    let ws = wal.spec.as_ref().unwrap();
    assert_eq!(ws.storage_class_name.as_deref(), Some("fast-local"));
    assert_eq!(
        ws.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"].0,
        "20Gi"
    );
    assert!(
        spec.template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()
            .contains_key(ANNOTATION_CONFIG_HASH)
    );
}

#[test]
fn gpu_readers_get_limits_tolerations_spread_readonly_mount_and_engine_gpu_flags() {
    let (_, d) = build("gpu.yaml", &inputs(None, false));
    let r = deploy(&d, "gpu-reader");
    let spec = &r.spec;
    assert_eq!(spec.replicas, Some(4));
    let ru = spec
        .strategy
        .as_ref()
        .unwrap()
        .rolling_update
        .as_ref()
        .unwrap();
    assert_eq!(
        ru.max_surge,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(0))
    );
    let pod = spec.template.spec.as_ref().unwrap();
    let c = &pod.containers[0];
    let args = c.args.as_ref().unwrap().join(" ");
    assert!(
        args.starts_with("reader --data-dir /data --grpc-listen 0.0.0.0:19531"),
        "{args}"
    );
    assert!(args.contains("--node-id $(POD_NAME)"), "{args}");
    assert!(
        // memoryBudget 40Gi as bytes: the engine would read a decimal `40G` as GiB.
        args.ends_with("--gpu-devices 0,1 --gpu-memory-budget 42949672960"),
        "{args}"
    );
    let res = c.resources.as_ref().unwrap();
    assert_eq!(res.limits.as_ref().unwrap()["nvidia.com/gpu"].0, "2");
    assert_eq!(res.limits.as_ref().unwrap()["memory"].0, "32Gi");
    assert_eq!(res.requests.as_ref().unwrap()["cpu"].0, "4");
    let tols = pod.tolerations.as_ref().unwrap();
    assert!(tols.iter().any(|t| t.key.as_deref() == Some("dedicated")));
    assert!(
        tols.iter()
            .any(|t| t.key.as_deref() == Some("nvidia.com/gpu")
                && t.operator.as_deref() == Some("Exists"))
    );
    assert_eq!(pod.node_selector.as_ref().unwrap()["pool"], "gpu");
    let spread = &pod.topology_spread_constraints.as_ref().unwrap()[0];
    assert_eq!(spread.topology_key, "kubernetes.io/hostname");
    let m = &c.volume_mounts.as_ref().unwrap()[0];
    assert_eq!((m.mount_path.as_str(), m.read_only), ("/data", Some(true)));
    assert_eq!(
        pod.volumes.as_ref().unwrap()[0]
            .persistent_volume_claim
            .as_ref()
            .unwrap()
            .read_only,
        Some(true)
    );

    let Some(Desired::PodDisruptionBudget(pdb)) = d.get("PodDisruptionBudget", "gpu-reader") else {
        panic!()
    };
    assert_eq!(
        pdb.spec
            .as_ref()
            .unwrap()
            .selector
            .as_ref()
            .unwrap()
            .match_labels,
        spec.selector.match_labels
    );
    let hs = svc(&d, "gpu-readers").spec.clone().unwrap();
    assert_eq!(hs.cluster_ip.as_deref(), Some("None"));
    assert_eq!(hs.selector, spec.selector.match_labels);
}

#[test]
fn gpu_memory_budget_reaches_the_engine_as_the_byte_count_kubernetes_means() {
    let reader_args = |budget: &str| {
        let mut vc = fixture("gpu.yaml");
        if let Some(gpu) = vc.spec.readers.gpu.as_mut() {
            gpu.memory_budget = Some(budget.into());
        }
        let d = build_all(&validate(&vc).unwrap(), &inputs(None, false));
        container(deploy(&d, "gpu-reader").spec.template.spec.as_ref())
            .args
            .clone()
            .unwrap()
            .join(" ")
    };
    // Decimal suffixes are powers of 1000 in Kubernetes (the engine alone would read G as GiB).
    for (budget, bytes) in [
        ("40G", "40000000000"),
        ("1.5Gi", "1610612736"),
        ("512Mi", "536870912"),
    ] {
        let args = reader_args(budget);
        assert!(
            args.ends_with(&format!("--gpu-memory-budget {bytes}")),
            "{budget}: {args}"
        );
    }
    let mut vc = fixture("gpu.yaml");
    if let Some(gpu) = vc.spec.readers.gpu.as_mut() {
        gpu.memory_budget = Some("0".into());
    }
    let err = validate(&vc).unwrap_err();
    assert_eq!(err, ValidationError::GpuMemoryBudget("0".into()));
    assert_eq!(err.reason(), "InvalidGpuMemoryBudget");
    // Without a budget the engine's default applies: no flag.
    let mut vc = fixture("gpu.yaml");
    if let Some(gpu) = vc.spec.readers.gpu.as_mut() {
        gpu.memory_budget = None;
    }
    let d = build_all(&validate(&vc).unwrap(), &inputs(None, false));
    let args = container(deploy(&d, "gpu-reader").spec.template.spec.as_ref())
        .args
        .clone()
        .unwrap()
        .join(" ");
    assert!(args.ends_with("--gpu-devices 0,1"), "{args}");
}

#[test]
fn cpu_readers_have_no_gpu_limits_and_surge_during_rollouts() {
    let (_, d) = build("minimal.yaml", &inputs(None, true));
    let r = deploy(&d, "demo-reader");
    let spec = &r.spec;
    assert_eq!(spec.replicas, Some(2));
    let c = container(spec.template.spec.as_ref());
    assert!(c.resources.is_none());
    assert!(
        !c.args
            .as_ref()
            .unwrap()
            .iter()
            .any(|a| a.starts_with("--gpu"))
    );
    assert!(spec.template.spec.as_ref().unwrap().tolerations.is_none());
}

#[test]
fn router_dials_the_writer_and_discovers_readers_and_its_service_follows_the_spec() {
    let (_, d) = build("gpu.yaml", &inputs(None, false));
    let r = deploy(&d, "gpu-router");
    let spec = &r.spec;
    assert_eq!(spec.replicas, Some(3));
    let c = container(spec.template.spec.as_ref());
    assert_eq!(
        c.args.as_ref().unwrap().join(" "),
        "router --writer gpu-writer.ml.svc:19531 --readers-dns gpu-readers.ml.svc:19531 --listen 0.0.0.0:19530 --metrics-listen 0.0.0.0:9091"
    );
    let s = svc(&d, "gpu");
    let ss = s.spec.as_ref().unwrap();
    assert_eq!(ss.type_.as_deref(), Some("LoadBalancer"));
    let p = &ss.ports.as_ref().unwrap()[0];
    assert_eq!(p.port, 80);
    assert_eq!(
        p.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(19530))
    );
    assert_eq!(
        s.metadata.annotations.as_ref().unwrap()["service.beta.kubernetes.io/aws-load-balancer-type"],
        "nlb"
    );
}

#[test]
fn delete_reclaim_policy_marks_the_volume_for_the_driver_to_delete() {
    let (_, d) = build("gpu.yaml", &inputs(None, false));
    let Some(Desired::PersistentVolume(pv)) = d.get("PersistentVolume", "shoal-ml-gpu-data") else {
        panic!()
    };
    assert_eq!(
        pv.spec
            .as_ref()
            .unwrap()
            .persistent_volume_reclaim_policy
            .as_deref(),
        Some("Delete")
    );
    assert_eq!(
        pv.metadata.annotations.as_ref().unwrap()["pv.kubernetes.io/provisioned-by"],
        CSI_DRIVER
    );
    assert_eq!(
        pv.spec
            .as_ref()
            .unwrap()
            .csi
            .as_ref()
            .unwrap()
            .volume_attributes
            .as_ref()
            .unwrap()["cache-size"],
        "10240"
    );
    let s = secret(&d, "gpu-juicefs");
    assert_eq!(secret_str(s, "format-options"), "--trash-days=0");
    assert!(!s.data.as_ref().unwrap().contains_key("access-key"));
}

#[test]
fn external_services_build_no_database_pods_and_use_the_users_secrets() {
    let (_, d) = build(
        "external.yaml",
        &inputs(Some("redis://:x@redis.example:6379/2"), true),
    );
    assert!(d.get("StatefulSet", "prod-mysql").is_none());
    assert!(d.get("StatefulSet", "prod-redis").is_none());
    assert!(d.get("Service", "prod-mysql").is_none());
    let s = secret(&d, "prod-juicefs");
    assert_eq!(secret_str(s, "metaurl"), "redis://:x@redis.example:6379/2");
    let w = sts(&d, "prod-writer");
    let c = container(w.spec.template.spec.as_ref());
    let meta = c
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "SHOAL_META")
        .unwrap();
    let sel = meta
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!((sel.name.as_str(), sel.key.as_str()), ("prod-mysql", "uri"));
    let r = deploy(&d, "prod-router");
    let rc = container(r.spec.template.spec.as_ref());
    let tok = rc
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "SHOAL_AUTH_TOKEN")
        .unwrap();
    assert_eq!(
        tok.value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap()
            .name,
        "prod-token"
    );
    assert_eq!(deploy(&d, "prod-reader").spec.replicas, Some(0));
}

#[test]
fn a_config_change_changes_the_pod_template_hash_but_a_scale_does_not() {
    let base = fixture("minimal.yaml");
    let hash = |vc: &VectorCluster| {
        let d = build_all(&validate(vc).unwrap(), &inputs(None, true));
        let w = sts(&d, "demo-writer").clone();
        w.spec.template.metadata.unwrap().annotations.unwrap()[ANNOTATION_CONFIG_HASH].clone()
    };
    let mut flush = base.clone();
    flush.spec.engine.flush_interval = "5s".into();
    let mut scaled = base.clone();
    scaled.spec.readers.replicas = 7;
    assert_ne!(hash(&base), hash(&flush));
    assert_eq!(hash(&base), hash(&scaled));
}

#[test]
fn invalid_specs_are_refused_with_an_actionable_reason() {
    let err = validate(&fixture("invalid-gpu-without-readers.yaml")).unwrap_err();
    assert_eq!(err, ValidationError::GpuWithoutReaders);
    assert_eq!(err.reason(), "GpuWithoutReaders");
    let mut vc = fixture("minimal.yaml");
    vc.spec.readers.replicas = -1;
    assert_eq!(
        validate(&vc).unwrap_err(),
        ValidationError::NegativeReplicas(-1)
    );
    let mut vc = fixture("minimal.yaml");
    vc.spec.metadata.managed = Some(Default::default());
    vc.spec.metadata.external = Some(
        serde_json::from_value(serde_json::json!({"uriSecretRef": {"name": "a", "key": "b"}}))
            .unwrap(),
    );
    assert_eq!(validate(&vc).unwrap_err(), ValidationError::MetadataBothSet);
    let mut vc = fixture("minimal.yaml");
    vc.spec.storage.capacity = "lots".into();
    assert!(
        validate(&vc)
            .unwrap_err()
            .to_string()
            .contains("spec.storage.capacity")
    );
    // A bad object storage type never gets past deserialisation (the schema's enum).
    let bad = std::fs::read_to_string(format!(
        "{}/tests/fixtures/minimal.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
    .replace("type: minio", "type: floppy");
    assert!(serde_yaml::from_str::<VectorCluster>(&bad).is_err());
}

#[test]
fn redis_storage_without_a_bucket_keeps_data_blocks_in_database_2_of_the_managed_redis() {
    let (_, d) = build("redis-storage.yaml", &inputs(None, false));
    let s = secret(&d, "demo-juicefs");
    assert_eq!(secret_str(s, "storage"), "redis");
    assert_eq!(
        secret_str(s, "bucket"),
        "redis://:redispw@demo-redis.shoal.svc:6379/2"
    );
    assert_eq!(
        secret_str(s, "metaurl"),
        "redis://:redispw@demo-redis.shoal.svc:6379/1"
    );
}

#[test]
fn redis_storage_without_a_bucket_is_refused_with_an_external_redis() {
    let mut vc = fixture("redis-storage.yaml");
    let mut value = serde_json::to_value(&vc).unwrap();
    value["spec"]["storage"]["redis"] =
        serde_json::json!({"external": {"urlSecretRef": {"name": "r", "key": "url"}}});
    vc = serde_json::from_value(value).unwrap();
    assert!(matches!(
        validate(&vc),
        Err(ValidationError::Empty("spec.storage.objectStorage.bucket"))
    ));
}

#[test]
fn engine_pods_run_as_the_image_user_and_own_their_writable_volumes() {
    // A provisioner's fresh volume root is root:root 0755: without fsGroup the writer (UID
    // 65532) cannot create its WAL there, and the cluster never becomes usable.
    let (_, d) = build("minimal.yaml", &inputs(None, false));
    let pods = [
        sts(&d, "demo-writer").spec.template.spec.as_ref().unwrap(),
        deploy(&d, "demo-reader")
            .spec
            .template
            .spec
            .as_ref()
            .unwrap(),
        deploy(&d, "demo-router")
            .spec
            .template
            .spec
            .as_ref()
            .unwrap(),
    ];
    for pod in pods {
        let sc = pod.security_context.as_ref().expect("pod securityContext");
        assert_eq!(sc.run_as_user, Some(65532));
        assert_eq!(sc.run_as_group, Some(65532));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.fs_group, Some(65532));
        assert_eq!(sc.fs_group_change_policy.as_deref(), Some("OnRootMismatch"));
    }
}

#[test]
fn the_generated_secret_outlives_a_retain_cluster_and_goes_with_a_delete_one() {
    let (v, _) = build("minimal.yaml", &inputs(None, false));
    let s = build_generated_secret(&v, &creds());
    assert!(s.metadata.owner_references.is_none(), "Retain: no owner");
    let (v, _) = build("gpu.yaml", &inputs(None, false));
    let s = build_generated_secret(&v, &creds());
    assert_eq!(
        s.metadata.owner_references.unwrap().len(),
        1,
        "Delete: owned"
    );
}
