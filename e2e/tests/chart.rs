//! CI checks of the Helm chart `charts/shoal`, its example manifests and its images, no cluster
//! needed.
//!
//! The chart is linted and rendered offline by the real Helm SDK (PyPI `helm-python-sdk`, driven
//! by `e2e/scripts/helm_chart.py`) with the default values and every `charts/shoal/ci/*.yaml`
//! values file. Every rendered object must parse as its Kubernetes type without a field being
//! dropped (a misspelt or misplaced field fails here instead of being silently ignored by a
//! client), and the chart's constants (CSI driver name, ports, image and binary names, version,
//! CRDs) must match the crates that own them.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use k8s_openapi::Resource;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shoal_csi::DRIVER_NAME;
use shoal_operator::crd::{DEFAULT_ENGINE_IMAGE, VectorCluster};
use shoal_operator::names::{self, Names};

const RELEASE: &str = "shoal";
const NAMESPACE: &str = "shoal-system";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn chart_dir() -> PathBuf {
    repo_root().join("charts/shoal")
}

/// One values set as the Helm SDK linted and rendered it.
#[derive(Debug)]
struct RenderedSet {
    values_file: String,
    lint: Value,
    /// Template path → manifest, or the render error.
    rendered: Result<BTreeMap<String, String>, String>,
}

/// Runs `e2e/scripts/helm_chart.py` on the chart with these values files ("-" = defaults).
fn helm(values_files: &[String]) -> Vec<RenderedSet> {
    let script = repo_root().join("e2e/scripts/helm_chart.py");
    let output = Command::new("python3")
        .arg(&script)
        .arg(chart_dir())
        .arg(RELEASE)
        .arg(NAMESPACE)
        .args(values_files)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run python3 ({e}); the chart checks need Python 3 and the Helm SDK: run `make deps`")
        });
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{} failed ({}): {stderr}\n(the chart checks need the Helm SDK: run `make deps`)",
        script.display(),
        output.status
    );
    let out: Value = serde_json::from_slice(&output.stdout).unwrap();
    out["sets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|set| RenderedSet {
            values_file: set["values_file"].as_str().unwrap().to_string(),
            lint: set["lint"].clone(),
            rendered: match set.get("rendered") {
                Some(r) => Ok(serde_json::from_value(r.clone()).unwrap()),
                None => Err(set["error"].as_str().unwrap_or_default().to_string()),
            },
        })
        .collect()
}

/// Default values plus every `ci/*.yaml`, rendered once per test binary.
fn all_sets() -> &'static [RenderedSet] {
    static SETS: OnceLock<Vec<RenderedSet>> = OnceLock::new();
    SETS.get_or_init(|| {
        let mut files = vec!["-".to_string()];
        let mut ci: Vec<String> = std::fs::read_dir(chart_dir().join("ci"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .map(|p| p.display().to_string())
            .collect();
        ci.sort();
        assert!(!ci.is_empty(), "charts/shoal/ci/ holds no values files");
        files.extend(ci);
        helm(&files)
    })
}

fn set_named(suffix: &str) -> &'static RenderedSet {
    all_sets()
        .iter()
        .find(|s| s.values_file.ends_with(suffix))
        .unwrap_or_else(|| panic!("no values set {suffix}"))
}

/// Every object of a rendered set, as JSON, with the template it came from.
fn objects(set: &RenderedSet) -> Vec<(String, Value)> {
    let rendered = set
        .rendered
        .as_ref()
        .unwrap_or_else(|e| panic!("{} does not render: {e}", set.values_file));
    let mut out = Vec::new();
    for (template, manifest) in rendered {
        if template.ends_with("NOTES.txt") {
            continue;
        }
        for doc in serde_yaml::Deserializer::from_str(manifest) {
            let value = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{template} is not valid YAML: {e}"));
            if !value.is_null() {
                out.push((template.clone(), value));
            }
        }
    }
    out
}

/// Paths present in `orig` that the typed round trip lost or changed: a field the Kubernetes type
/// does not have (typo, wrong nesting) is dropped by serde and shows up here.
fn lost_fields(orig: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (orig, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    Some(w) => lost_fields(v, w, &p, out),
                    None if v.is_null() => {}
                    None => out.push(format!("{p} (unknown field)")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                lost_fields(v, w, &format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {a} became {b}")),
    }
}

fn round_trip<K: DeserializeOwned + Serialize>(obj: &Value) -> Result<K, String> {
    let typed: K = serde_json::from_value(obj.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut lost = Vec::new();
    lost_fields(obj, &back, "", &mut lost);
    if lost.is_empty() {
        Ok(typed)
    } else {
        Err(format!("fields lost in parsing: {}", lost.join(", ")))
    }
}

/// Parses `obj` as the Kubernetes type its apiVersion/kind name.
fn parse_typed(obj: &Value) -> Result<(), String> {
    let api_version = obj["apiVersion"].as_str().unwrap_or_default();
    let kind = obj["kind"].as_str().unwrap_or_default();
    macro_rules! dispatch {
        ($($t:ty),* $(,)?) => {
            $(
                if api_version == <$t as Resource>::API_VERSION && kind == <$t as Resource>::KIND {
                    return round_trip::<$t>(obj).map(|_| ());
                }
            )*
        };
    }
    dispatch!(
        ServiceAccount,
        Secret,
        Service,
        ConfigMap,
        ClusterRole,
        ClusterRoleBinding,
        Role,
        RoleBinding,
        Deployment,
        DaemonSet,
        CSIDriver,
        StorageClass,
        CustomResourceDefinition,
    );
    Err(format!(
        "{api_version}/{kind} is not a kind the chart is expected to render"
    ))
}

/// The single object of type `K` named `name` in a rendered set.
fn get<K: Resource + DeserializeOwned + Serialize>(set: &RenderedSet, name: &str) -> K {
    let found: Vec<K> = objects(set)
        .into_iter()
        .filter(|(_, o)| {
            o["apiVersion"] == K::API_VERSION
                && o["kind"] == K::KIND
                && o["metadata"]["name"] == name
        })
        .map(|(_, o)| round_trip::<K>(&o).unwrap())
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{} {name} rendered {} times",
        K::KIND,
        found.len()
    );
    found.into_iter().next().unwrap()
}

fn all_of<K: Resource + DeserializeOwned + Serialize>(set: &RenderedSet) -> Vec<K> {
    objects(set)
        .into_iter()
        .filter(|(_, o)| o["apiVersion"] == K::API_VERSION && o["kind"] == K::KIND)
        .map(|(_, o)| round_trip::<K>(&o).unwrap())
        .collect()
}

fn pod_spec_of_deployment(d: &Deployment) -> &PodSpec {
    d.spec.template.spec.as_ref().unwrap()
}

fn container<'a>(pod: &'a PodSpec, name: &str) -> &'a Container {
    pod.containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn args(c: &Container) -> Vec<&str> {
    c.args.iter().flatten().map(String::as_str).collect()
}

/// The value after `flag` in `args` (`--flag value` or `--flag=value`).
fn flag<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    let eq = format!("{flag}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if *a == flag {
            args.get(i + 1).copied()
        } else {
            a.strip_prefix(eq.as_str())
        }
    })
}

/// `[[bin]] name` of a crate, read from its manifest: the code's own name for the binary.
fn bin_name(crate_dir: &str) -> String {
    let manifest = std::fs::read_to_string(repo_root().join(crate_dir).join("Cargo.toml")).unwrap();
    let table: toml::Table = toml::from_str(&manifest).unwrap();
    let bins = table["bin"].as_array().unwrap();
    assert_eq!(bins.len(), 1, "{crate_dir} builds one binary");
    bins[0]["name"].as_str().unwrap().to_string()
}

/// `registry/` prefix and tag of the engine image the CRD defaults to.
fn default_image_registry_and_tag() -> (String, String) {
    let (repo, tag) = DEFAULT_ENGINE_IMAGE.rsplit_once(':').unwrap();
    let registry = repo
        .strip_suffix(&bin_name("node-engine"))
        .unwrap_or_else(|| {
            panic!(
                "DEFAULT_ENGINE_IMAGE {DEFAULT_ENGINE_IMAGE} is not named after the engine binary"
            )
        });
    (registry.to_string(), tag.to_string())
}

fn fullname(component: &str) -> String {
    format!("{RELEASE}-{component}")
}

#[test]
fn helm_lint_reports_no_errors_or_warnings_for_default_and_ci_values() {
    for set in all_sets() {
        let errors = set.lint["errors"].as_array().unwrap();
        assert!(
            errors.is_empty(),
            "{}: helm lint errors {errors:?}",
            set.values_file
        );
        let warnings: Vec<&Value> = set.lint["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["severity"].as_i64().unwrap_or(3) >= 2)
            .collect();
        assert!(
            warnings.is_empty(),
            "{}: helm lint {warnings:?}",
            set.values_file
        );
    }
}

#[test]
fn every_rendered_object_parses_as_its_kubernetes_type_without_lost_fields() {
    for set in all_sets() {
        let objs = objects(set);
        assert!(!objs.is_empty(), "{} renders nothing", set.values_file);
        let mut seen = BTreeSet::new();
        for (template, obj) in &objs {
            let id = format!(
                "{}/{}/{}",
                obj["kind"].as_str().unwrap_or("?"),
                obj["metadata"]["namespace"].as_str().unwrap_or(""),
                obj["metadata"]["name"].as_str().unwrap_or("?")
            );
            if let Err(e) = parse_typed(obj) {
                panic!("{}: {template}: {id}: {e}", set.values_file);
            }
            assert!(
                seen.insert(id.clone()),
                "{}: {id} rendered twice",
                set.values_file
            );
        }
    }
}

#[test]
fn the_typed_round_trip_catches_a_misspelt_field() {
    // Guards the check above: a field that does not exist must be reported, not dropped quietly.
    let obj = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "x"},
        "spec": {"selector": {}, "template": {"spec": {"containers": [
            {"name": "c", "volumeMounts": [{"name": "v", "mountPath": "/v", "mountPropogation": "Bidirectional"}]}
        ]}}}
    });
    let err = parse_typed(&obj).unwrap_err();
    assert!(err.contains("mountPropogation"), "{err}");
}

#[test]
fn csi_driver_object_names_the_drivers_name_without_attach_and_with_pod_info() {
    assert_eq!(
        names::CSI_DRIVER,
        DRIVER_NAME,
        "the operator's PVs name the driver the chart installs"
    );
    let set = set_named("-");
    let driver: CSIDriver = get(set, DRIVER_NAME);
    let spec = driver.spec;
    assert_eq!(spec.attach_required, Some(false));
    assert_eq!(spec.pod_info_on_mount, Some(true));
    assert_eq!(all_of::<CSIDriver>(set).len(), 1);
}

#[test]
fn csi_node_daemonset_is_privileged_with_bidirectional_kubelet_dir_fuse_and_both_sidecars() {
    for suffix in ["-", "custom-registry-values.yaml", "gpu-nodes-values.yaml"] {
        let set = set_named(suffix);
        let ds: DaemonSet = get(set, &fullname("csi-node"));
        let pod = ds.spec.template.spec.as_ref().unwrap();
        let plugin = container(pod, "shoal-csi");
        let a = args(plugin);
        assert_eq!(flag(&a, "--mode"), Some("node"), "{suffix}");
        assert_eq!(flag(&a, "--endpoint"), Some("unix:///csi/csi.sock"));
        assert_eq!(flag(&a, "--node-id"), Some("$(NODE_NAME)"));
        assert!(
            flag(&a, "--state-dir").unwrap().starts_with("/csi/"),
            "state dir on the host"
        );
        let sc = plugin.security_context.as_ref().unwrap();
        assert_eq!(sc.privileged, Some(true));

        let kubelet_mount = plugin
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "kubelet-dir")
            .unwrap();
        assert_eq!(
            kubelet_mount.mount_propagation.as_deref(),
            Some("Bidirectional")
        );
        let volumes = pod.volumes.as_ref().unwrap();
        let host_path = |name: &str| {
            volumes
                .iter()
                .find(|v| v.name == name)
                .and_then(|v| v.host_path.clone())
                .unwrap_or_else(|| panic!("{suffix}: no hostPath volume {name}"))
        };
        let kubelet_dir = host_path("kubelet-dir").path;
        assert_eq!(
            kubelet_mount.mount_path, kubelet_dir,
            "{suffix}: same path inside and out"
        );
        assert!(!kubelet_dir.ends_with('/'), "{suffix}: {kubelet_dir}");
        let fuse = host_path("fuse-device");
        assert_eq!(
            (fuse.path.as_str(), fuse.type_.as_deref()),
            ("/dev/fuse", Some("CharDevice"))
        );
        assert!(
            plugin
                .volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == "fuse-device")
        );
        let plugin_dir = format!("{kubelet_dir}/plugins/{}", DRIVER_NAME);
        assert_eq!(host_path("plugin-dir").path, plugin_dir);

        let registrar = container(pod, "node-driver-registrar");
        assert_eq!(
            flag(&args(registrar), "--kubelet-registration-path"),
            Some(format!("{plugin_dir}/csi.sock").as_str()),
            "{suffix}"
        );
        let probe = container(pod, "liveness-probe");
        let health = flag(&args(probe), "--health-port").unwrap();
        let served = plugin
            .liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        let port_name = match &served.port {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s.clone(),
            other => panic!("probe port {other:?}"),
        };
        let port = plugin
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(port_name.as_str()))
            .unwrap();
        assert_eq!(
            port.container_port.to_string(),
            health,
            "the kubelet probes the sidecar's port"
        );
        // The node plugin must land on GPU nodes too.
        assert!(!pod.tolerations.as_ref().unwrap().is_empty(), "{suffix}");
    }
}

#[test]
fn csi_controller_runs_shoal_csi_in_controller_mode_beside_the_external_provisioner() {
    let set = set_named("-");
    let d: Deployment = get(set, &fullname("csi-controller"));
    let pod = pod_spec_of_deployment(&d);
    let plugin = container(pod, "shoal-csi");
    let a = args(plugin);
    assert_eq!(flag(&a, "--mode"), Some("controller"));
    let sock = flag(&a, "--endpoint")
        .unwrap()
        .strip_prefix("unix://")
        .unwrap();
    let provisioner = container(pod, "csi-provisioner");
    assert!(
        provisioner
            .image
            .as_deref()
            .unwrap()
            .contains("/csi-provisioner:")
    );
    assert_eq!(flag(&args(provisioner), "--csi-address"), Some(sock));
    // The provisioner's ServiceAccount is bound to a ClusterRole that can create PVs.
    let sa = pod.service_account_name.as_deref().unwrap();
    let binding = all_of::<ClusterRoleBinding>(set)
        .into_iter()
        .find(|b| b.subjects.iter().flatten().any(|s| s.name == sa))
        .unwrap();
    let role: ClusterRole = get(set, &binding.role_ref.name);
    assert!(role.rules.iter().flatten().any(|r| {
        r.resources
            .iter()
            .flatten()
            .any(|x| x == "persistentvolumes")
            && r.verbs.iter().any(|v| v == "create")
    }));
}

#[test]
fn every_service_account_a_pod_runs_as_is_rendered_and_bound() {
    for set in all_sets() {
        let accounts: BTreeSet<String> = all_of::<ServiceAccount>(set)
            .into_iter()
            .map(|s| s.metadata.name.unwrap())
            .collect();
        let mut bound: BTreeSet<String> = BTreeSet::new();
        for b in all_of::<ClusterRoleBinding>(set) {
            bound.extend(b.subjects.into_iter().flatten().map(|s| s.name));
        }
        for b in all_of::<RoleBinding>(set) {
            bound.extend(b.subjects.into_iter().flatten().map(|s| s.name));
        }
        let mut pods: Vec<PodSpec> = all_of::<Deployment>(set)
            .into_iter()
            .map(|d| d.spec.template.spec.unwrap())
            .collect();
        pods.extend(
            all_of::<DaemonSet>(set)
                .into_iter()
                .map(|d| d.spec.template.spec.unwrap()),
        );
        assert!(!pods.is_empty());
        for pod in pods {
            let sa = pod.service_account_name.unwrap();
            assert!(
                accounts.contains(&sa),
                "{}: {sa} not rendered",
                set.values_file
            );
            // The CSI node plugin needs no API access; everyone else must be bound.
            if !sa.ends_with("csi-node") {
                assert!(bound.contains(&sa), "{}: {sa} not bound", set.values_file);
            }
        }
        for b in all_of::<RoleBinding>(set) {
            let role: Role = get(set, &b.role_ref.name);
            assert_eq!(role.metadata.namespace.as_deref(), Some(NAMESPACE));
        }
        for b in all_of::<ClusterRoleBinding>(set) {
            let _: ClusterRole = get(set, &b.role_ref.name);
        }
    }
}

#[test]
fn operator_cluster_role_and_lease_role_are_exactly_the_operators_rbac_list() {
    // operator/rbac.yaml is written next to the code that makes the calls and checked against
    // the requests its reconcile scenarios make (operator/tests/reconcile.rs).
    let text = std::fs::read_to_string(repo_root().join("operator/rbac.yaml")).unwrap();
    let mut want_cluster = None;
    let mut want_lease = None;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let obj = Value::deserialize(doc).unwrap();
        match obj["kind"].as_str() {
            Some("ClusterRole") => want_cluster = Some(round_trip::<ClusterRole>(&obj).unwrap()),
            Some("Role") => want_lease = Some(round_trip::<Role>(&obj).unwrap()),
            other => panic!("operator/rbac.yaml: unexpected {other:?}"),
        }
    }
    let set = set_named("-");
    let cluster: ClusterRole = get(set, &fullname("operator"));
    assert_eq!(
        cluster.rules,
        want_cluster.unwrap().rules,
        "charts/shoal/templates/operator-rbac.yaml ClusterRole differs from operator/rbac.yaml"
    );
    let lease: Role = get(set, &fullname("operator-leader-election"));
    assert_eq!(
        lease.rules,
        want_lease.unwrap().rules,
        "leader-election Role differs from operator/rbac.yaml"
    );

    // The operator runs as the ServiceAccount both are bound to, and is told where its Lease is.
    let d: Deployment = get(set, &fullname("operator"));
    let pod = pod_spec_of_deployment(&d);
    let sa = pod.service_account_name.as_deref().unwrap();
    let crb: ClusterRoleBinding = get(set, &fullname("operator"));
    assert_eq!(crb.role_ref.name, fullname("operator"));
    assert!(
        crb.subjects
            .iter()
            .flatten()
            .any(|s| s.name == sa && s.namespace.as_deref() == Some(NAMESPACE))
    );
    let rb: RoleBinding = get(set, &fullname("operator-leader-election"));
    assert!(rb.subjects.iter().flatten().any(|s| s.name == sa));
    assert_eq!(lease.metadata.namespace.as_deref(), Some(NAMESPACE));
    let operator = container(pod, "operator");
    assert_eq!(args(operator), ["run"]);
    let env = operator.env.as_ref().unwrap();
    let lease_ns = env
        .iter()
        .find(|e| e.name == "SHOAL_LEASE_NAMESPACE")
        .unwrap();
    let from = lease_ns
        .value_from
        .as_ref()
        .unwrap()
        .field_ref
        .as_ref()
        .unwrap();
    assert_eq!(
        from.field_path, "metadata.namespace",
        "the Lease lives where the Role grants it"
    );
}

#[test]
fn chart_version_and_app_version_follow_the_crates() {
    let chart: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap())
            .unwrap();
    let crates = env!("CARGO_PKG_VERSION");
    assert_eq!(chart["version"].as_str(), Some(crates));
    assert_eq!(chart["appVersion"].as_str(), Some(crates));
    let (_, tag) = default_image_registry_and_tag();
    assert_eq!(
        tag, crates,
        "the CRD's default engine image tag follows the crates"
    );
}

#[test]
fn chart_images_and_commands_are_the_binaries_the_dockerfiles_install() {
    let (registry, tag) = default_image_registry_and_tag();
    let set = set_named("-");
    let operator: Deployment = get(set, &fullname("operator"));
    let csi_node: DaemonSet = get(set, &fullname("csi-node"));
    let csi_controller: Deployment = get(set, &fullname("csi-controller"));
    let cases = [
        (
            "operator",
            container(pod_spec_of_deployment(&operator), "operator"),
        ),
        (
            "csi-driver",
            container(csi_node.spec.template.spec.as_ref().unwrap(), "shoal-csi"),
        ),
        (
            "csi-driver",
            container(pod_spec_of_deployment(&csi_controller), "shoal-csi"),
        ),
    ];
    for (crate_dir, c) in cases {
        let bin = bin_name(crate_dir);
        assert_eq!(
            c.image.as_deref(),
            Some(format!("{registry}{bin}:{tag}").as_str())
        );
        let path = format!("/usr/local/bin/{bin}");
        assert_eq!(c.command.as_deref(), Some([path.clone()].as_slice()));
        let dockerfile =
            std::fs::read_to_string(repo_root().join(crate_dir).join("Dockerfile")).unwrap();
        assert!(
            dockerfile.contains(&format!("-p {}", crate_package(crate_dir))),
            "{crate_dir}/Dockerfile builds its crate"
        );
        assert!(
            dockerfile.contains(&path),
            "{crate_dir}/Dockerfile installs {path}"
        );
    }
    let engine_dockerfile =
        std::fs::read_to_string(repo_root().join("node-engine/Dockerfile")).unwrap();
    assert!(engine_dockerfile.contains(&format!("/usr/local/bin/{}", bin_name("node-engine"))));
    let csi_dockerfile =
        std::fs::read_to_string(repo_root().join("csi-driver/Dockerfile")).unwrap();
    let juicefs = flag(
        &args(container(
            pod_spec_of_deployment(&csi_controller),
            "shoal-csi",
        )),
        "--juicefs",
    )
    .unwrap()
    .to_string();
    assert!(
        csi_dockerfile.contains(&juicefs),
        "the CSI image carries {juicefs}"
    );
}

fn crate_package(crate_dir: &str) -> String {
    let manifest = std::fs::read_to_string(repo_root().join(crate_dir).join("Cargo.toml")).unwrap();
    let table: toml::Table = toml::from_str(&manifest).unwrap();
    table["package"]["name"].as_str().unwrap().to_string()
}

#[test]
fn custom_values_reach_every_image_and_the_kubelet_dir() {
    let set = set_named("custom-registry-values.yaml");
    for (_, obj) in objects(set) {
        let text = obj.to_string();
        assert!(
            !text.contains("ghcr.io/shoal-db/"),
            "default registry left in {text}"
        );
        // A path or flag value that still starts at the default kubelet dir.
        for start in ["\"/var/lib/kubelet", "=/var/lib/kubelet"] {
            assert!(!text.contains(start), "default kubelet dir left in {text}");
        }
    }
    let node: DaemonSet = get(set, &fullname("csi-node"));
    let pod = node.spec.template.spec.unwrap();
    assert_eq!(
        pod.image_pull_secrets.unwrap()[0].name,
        "registry-credentials"
    );
}

#[test]
fn disabling_csi_leaves_only_the_operator() {
    let set = set_named("no-csi-values.yaml");
    assert!(all_of::<CSIDriver>(set).is_empty());
    assert!(all_of::<DaemonSet>(set).is_empty());
    let deployments: Vec<String> = all_of::<Deployment>(set)
        .into_iter()
        .map(|d| d.metadata.name.unwrap())
        .collect();
    assert_eq!(deployments, [fullname("operator")]);
}

#[test]
fn storage_class_provisions_on_the_driver_with_its_juicefs_secret_for_provision_and_stage() {
    assert!(
        all_of::<StorageClass>(set_named("-")).is_empty(),
        "optional, off by default"
    );
    let set = set_named("storageclass-values.yaml");
    let sc: StorageClass = get(set, "shoal-juicefs-s3");
    assert_eq!(sc.provisioner, DRIVER_NAME);
    let p = sc.parameters.unwrap();
    // The driver's own CreateVolume parameter check accepts what the chart passes.
    let params: std::collections::HashMap<String, String> = p.clone().into_iter().collect();
    assert_eq!(
        shoal_csi::validate::parameters(&params).unwrap(),
        shoal_csi::validate::OnDelete::Delete
    );
    assert!(p.contains_key(shoal_csi::validate::PARAM_ON_DELETE));
    for stage in ["provisioner", "node-stage"] {
        assert_eq!(
            p.get(&format!("csi.storage.k8s.io/{stage}-secret-name"))
                .map(String::as_str),
            Some("shoal-juicefs")
        );
        assert_eq!(
            p.get(&format!("csi.storage.k8s.io/{stage}-secret-namespace"))
                .map(String::as_str),
            Some("vector-prod")
        );
    }
}

#[test]
fn storage_class_without_its_juicefs_secret_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.yaml");
    std::fs::write(&values, "storageClass:\n  create: true\n").unwrap();
    let sets = helm(&[values.display().to_string()]);
    let err = sets[0].rendered.as_ref().unwrap_err();
    assert!(
        err.contains("storageClass.secret.name is required"),
        "{err}"
    );
}

#[test]
fn a_misspelt_value_is_refused_by_the_values_schema_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.yaml");
    std::fs::write(&values, "csi:\n  kubletDir: /var/lib/k0s/kubelet\n").unwrap();
    let sets = helm(&[values.display().to_string()]);
    let err = sets[0].rendered.as_ref().unwrap_err();
    assert!(err.contains("kubletDir"), "{err}");
    assert!(!sets[0].lint["errors"].as_array().unwrap().is_empty());
}

#[test]
fn notes_tell_the_next_commands_with_the_routers_service_and_rest_port() {
    let set = set_named("-");
    let notes = &set.rendered.as_ref().unwrap()[&format!("{RELEASE}/templates/NOTES.txt")];
    let demo = Names::new("demo", "default");
    assert!(
        notes.contains("kubectl apply -f examples/minimal.yaml"),
        "{notes}"
    );
    assert!(
        notes.contains("kubectl scale vc/demo --replicas="),
        "{notes}"
    );
    let forward = format!(
        "kubectl port-forward svc/{} {port}:{port}",
        demo.router_service(),
        port = names::PORT_REST
    );
    assert!(
        notes.contains(&forward),
        "NOTES should say `{forward}`:\n{notes}"
    );
    assert!(notes.contains(&format!("localhost:{}/v2/vectordb/", names::PORT_REST)));
}

#[test]
fn chart_crds_are_byte_identical_to_the_top_level_crds() {
    let yaml_files = |dir: PathBuf| -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|x| x == "yaml" || x == "yml" || x == "json")
            })
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect()
    };
    let top = yaml_files(repo_root().join("crds"));
    let chart = yaml_files(chart_dir().join("crds"));
    assert!(!top.is_empty(), "crds/ is empty: run `make crds`");
    assert_eq!(
        top.keys().collect::<Vec<_>>(),
        chart.keys().collect::<Vec<_>>(),
        "charts/shoal/crds/ must hold the same files as crds/: run `make crds`"
    );
    for (name, bytes) in &top {
        assert!(
            chart[name] == *bytes,
            "charts/shoal/crds/{name} differs from crds/{name}: run `make crds`"
        );
        let text = String::from_utf8(bytes.clone()).unwrap();
        let as_json: Value = serde_yaml::from_str(&text).unwrap();
        let crd: CustomResourceDefinition = round_trip(&as_json).unwrap();
        assert_eq!(crd.spec.group, "shoal.dev");
    }
    let vc = top
        .values()
        .map(|b| serde_yaml::from_slice::<CustomResourceDefinition>(b).unwrap())
        .find(|c| c.spec.names.kind == "VectorCluster")
        .expect("a CRD for VectorCluster");
    assert_eq!(
        vc.metadata.name,
        Some(VectorCluster::crd_name().to_string())
    );
    let scale = vc.spec.versions[0]
        .subresources
        .as_ref()
        .and_then(|s| s.scale.clone())
        .expect("the scale subresource `kubectl scale vc` needs");
    assert_eq!(scale.spec_replicas_path, ".spec.readers.replicas");
}

/// Every `{name, key?}` object under a key ending in `SecretRef` in a VectorCluster spec.
fn secret_refs(v: &Value, out: &mut Vec<(String, Option<String>)>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                if k.ends_with("SecretRef") {
                    let name = child["name"].as_str().unwrap_or_default().to_string();
                    // Credentials refs name their keys with *Key fields; the others with `key`.
                    // A connection string (Azure Blob) replaces the access and secret keys.
                    let by_connection_string = child.get("connectionStringKey").is_some();
                    let mut keys: Vec<String> = child
                        .as_object()
                        .into_iter()
                        .flatten()
                        .filter(|(f, _)| *f == "key" || f.ends_with("Key"))
                        .filter(|(f, _)| {
                            !(by_connection_string
                                && (*f == "accessKeyKey" || *f == "secretKeyKey"))
                        })
                        .filter_map(|(_, k)| k.as_str().map(str::to_string))
                        .collect();
                    if keys.is_empty() {
                        out.push((name.clone(), None));
                    }
                    for k in keys.drain(..) {
                        out.push((name.clone(), Some(k)));
                    }
                } else {
                    secret_refs(child, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|c| secret_refs(c, out)),
        _ => {}
    }
}

#[test]
fn every_example_says_when_to_use_it_parses_validates_and_brings_its_secrets() {
    let dir = repo_root().join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for wanted in ["minimal.yaml", "gpu-readers.yaml", "external-services.yaml"] {
        assert!(
            names.iter().any(|n| n == wanted),
            "examples/{wanted} is missing"
        );
    }
    let mut clusters = BTreeMap::new();
    for path in &files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(path).unwrap();
        let header: String = text
            .lines()
            .take_while(|l| l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            header.lines().count() >= 2 && header.to_lowercase().contains("use this"),
            "{file} must open with a comment saying when to use it"
        );
        let mut secrets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut refs = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let obj = Value::deserialize(doc).unwrap();
            if obj.is_null() {
                continue;
            }
            match (obj["apiVersion"].as_str(), obj["kind"].as_str()) {
                (Some("v1"), Some("Secret")) => {
                    let s: Secret = round_trip(&obj).unwrap_or_else(|e| panic!("{file}: {e}"));
                    let keys = s
                        .string_data
                        .into_iter()
                        .flatten()
                        .map(|(k, _)| k)
                        .chain(s.data.into_iter().flatten().map(|(k, _)| k));
                    secrets.insert(s.metadata.name.unwrap(), keys.collect());
                }
                (Some("shoal.dev/v1alpha1"), Some("VectorCluster")) => {
                    let mut vc: VectorCluster = serde_json::from_value(obj.clone())
                        .unwrap_or_else(|e| panic!("{file}: not a VectorCluster: {e}"));
                    assert_eq!(
                        vc.metadata.namespace, None,
                        "{file}: examples go to the current namespace"
                    );
                    // What the API server fills in before the operator sees it.
                    vc.metadata.namespace = Some("default".into());
                    vc.metadata.uid = Some("00000000-0000-0000-0000-000000000000".into());
                    vc.metadata.generation = Some(1);
                    if let Err(e) = shoal_operator::validate::validate(&vc) {
                        panic!("{file}: the operator refuses it: {e}");
                    }
                    // Typed spec back to JSON, so defaulted keys (access-key, ...) count too.
                    secret_refs(&serde_json::to_value(&vc.spec).unwrap(), &mut refs);
                    clusters.insert(file.clone(), vc);
                }
                other => panic!("{file}: unexpected object {other:?}"),
            }
        }
        // A Secret the cluster needs is in the file, or the header says how to create it.
        for (name, key) in refs {
            match secrets.get(&name) {
                Some(keys) => {
                    if let Some(key) = key {
                        assert!(
                            keys.contains(&key),
                            "{file}: Secret {name} has no key {key}"
                        );
                    }
                }
                None => assert!(
                    header.contains(&format!("kubectl create secret generic {name}")),
                    "{file}: Secret {name} is neither in the file nor created by the header"
                ),
            }
        }
    }
    if let Some(minimal) = clusters.get("minimal.yaml") {
        assert_eq!(
            minimal.metadata.name.as_deref(),
            Some("demo"),
            "README and NOTES say `kubectl scale vc/demo`"
        );
    }
    let gpu = &clusters["gpu-readers.yaml"].spec;
    assert!(gpu.readers.gpu.is_some());
    assert_eq!(
        gpu.engine.image,
        format!("{DEFAULT_ENGINE_IMAGE}-gpu"),
        "the README's GPU image tag"
    );
    let external = &clusters["external-services.yaml"].spec;
    assert!(external.metadata.external.is_some() && external.storage.redis.external.is_some());
}
