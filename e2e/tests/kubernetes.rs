//! The whole stack on a real Kubernetes cluster. Runs only when `KUBECONFIG` is set (CI has no
//! cluster); without it the test prints that it was skipped and does nothing else.
//!
//! ```text
//! KUBECONFIG=~/.kube/config cargo test -p shoal-e2e --test kubernetes -- --nocapture
//! ```
//! Environment:
//! - `SHOAL_E2E_NAMESPACE` (default `shoal-e2e`): where the chart and the examples go.
//! - `SHOAL_E2E_VALUES`: a values file for the chart (image repositories/tags your nodes can pull).
//! - `SHOAL_E2E_EXAMPLES` (default `minimal`): comma list of `examples/*.yaml` names to apply;
//!   `gpu-readers` needs GPU nodes, `external-services` needs its Secrets to point at real services.
//! - `SHOAL_E2E_UPGRADE_IMAGE`: an engine image to roll to; without it the rollout changes
//!   `spec.engine.logLevel`, which also replaces every engine pod.
//! - `SHOAL_E2E_TIMEOUT_S` (default 900): how long each wait may take.
//!
//! The scenario: render the chart with the real Helm SDK and server-side apply it (CRD first);
//! wait for the operator and the CSI node plugin; per example: apply, wait for `Ready=True` (a
//! watch on the condition, not a sleep), scale the readers through the scale subresource to 4 and
//! wait for 4 ready readers, roll the engine, wait for `Ready` again at the new generation, delete
//! and wait until every object labelled with the cluster is gone. On failure the CR status, the
//! namespace's Events and the cluster's pod logs are printed before the test fails.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Event, Namespace, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, LogParams, Patch, PatchParams};
use kube::discovery::{ApiCapabilities, ApiResource, Discovery, Scope};
use kube::runtime::wait::await_condition;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use shoal_operator::crd::VectorCluster;

const MANAGER: &str = "shoal-e2e";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn timeout() -> Duration {
    Duration::from_secs(
        std::env::var("SHOAL_E2E_TIMEOUT_S")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(900),
    )
}

type Res<T> = Result<T, String>;

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// The chart rendered by the Helm SDK: every manifest split into YAML documents.
fn render_chart(ns: &str) -> Res<Vec<Value>> {
    let script = repo_root().join("e2e/scripts/helm_chart.py");
    let values = std::env::var("SHOAL_E2E_VALUES").unwrap_or_else(|_| "-".into());
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(repo_root().join("charts/shoal"))
        .args(["shoal", ns, &values])
        .output()
        .map_err(err("running helm_chart.py"))?;
    if !out.status.success() {
        return Err(format!(
            "helm_chart.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let v: Value = serde_json::from_slice(&out.stdout).map_err(err("helm_chart.py output"))?;
    let set = &v["sets"][0];
    if let Some(e) = set.get("error") {
        return Err(format!("chart render failed: {e}"));
    }
    let mut docs = Vec::new();
    let rendered = set["rendered"].as_object().ok_or("no rendered manifests")?;
    for (template, text) in rendered {
        if template.ends_with("NOTES.txt") {
            continue;
        }
        for doc in serde_yaml::Deserializer::from_str(text.as_str().unwrap_or("")) {
            let v: Value = serde::Deserialize::deserialize(doc).map_err(err(template))?;
            if v.is_object() {
                docs.push(v);
            }
        }
    }
    // CRDs first, as `helm install` does.
    for entry in std::fs::read_dir(repo_root().join("charts/shoal/crds")).map_err(err("crds"))? {
        let path = entry.map_err(err("crds"))?.path();
        let text = std::fs::read_to_string(&path).map_err(err("crd file"))?;
        let v: Value = serde_yaml::from_str(&text).map_err(err("crd yaml"))?;
        docs.insert(0, v);
    }
    Ok(docs)
}

fn resource_for(disc: &Discovery, obj: &Value) -> Res<(ApiResource, ApiCapabilities)> {
    let api_version = obj["apiVersion"]
        .as_str()
        .ok_or("object without apiVersion")?;
    let kind = obj["kind"].as_str().ok_or("object without kind")?;
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let gvk = kube::api::GroupVersionKind::gvk(group, version, kind);
    disc.resolve_gvk(&gvk)
        .ok_or_else(|| format!("the API server does not serve {api_version} {kind}"))
}

/// Server-side apply of one object (namespaced ones into `ns` unless they name their own).
async fn apply(client: &Client, disc: &Discovery, ns: &str, obj: &Value) -> Res<()> {
    let (ar, caps) = resource_for(disc, obj)?;
    let name = obj["metadata"]["name"]
        .as_str()
        .ok_or("object without a name")?
        .to_string();
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Cluster => Api::all_with(client.clone(), &ar),
        Scope::Namespaced => {
            let ns = obj["metadata"]["namespace"].as_str().unwrap_or(ns);
            Api::namespaced_with(client.clone(), ns, &ar)
        }
    };
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(err(&format!("applying {} {name}", ar.kind)))?;
    Ok(())
}

async fn wait_deployment_available(client: &Client, ns: &str, name: &str) -> Res<()> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let cond = await_condition(api, name, |d: Option<&Deployment>| {
        d.and_then(|d| d.status.as_ref())
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| {
                c.iter().any(|c| {
                    c.type_.as_deref() == Some("Available") && c.status.as_deref() == Some("True")
                })
            })
    });
    tokio::time::timeout(timeout(), cond)
        .await
        .map_err(|_| format!("Deployment {name} not available in time"))?
        .map_err(err("watching Deployment"))?;
    Ok(())
}

async fn wait_daemonset_ready(client: &Client, ns: &str, name: &str) -> Res<()> {
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), ns);
    let cond = await_condition(api, name, |d: Option<&DaemonSet>| {
        d.and_then(|d| d.status.as_ref()).is_some_and(|s| {
            s.desired_number_scheduled > 0 && s.number_ready == s.desired_number_scheduled
        })
    });
    tokio::time::timeout(timeout(), cond)
        .await
        .map_err(|_| format!("DaemonSet {name} not ready in time"))?
        .map_err(err("watching DaemonSet"))?;
    Ok(())
}

fn is_ready(vc: &VectorCluster, generation: i64, ready_readers: Option<i32>) -> bool {
    let Some(st) = &vc.status else { return false };
    let ready = st.conditions.iter().any(|c| {
        c.type_ == "Ready" && c.status == "True" && c.observed_generation.unwrap_or(0) >= generation
    });
    ready && ready_readers.is_none_or(|n| st.readers.ready_replicas == n)
}

async fn wait_ready(api: &Api<VectorCluster>, name: &str, readers: Option<i32>) -> Res<()> {
    let generation = api
        .get(name)
        .await
        .map_err(err("reading the VectorCluster"))?
        .metadata
        .generation
        .unwrap_or(0);
    let cond = await_condition(api.clone(), name, move |vc: Option<&VectorCluster>| {
        vc.is_some_and(|vc| is_ready(vc, generation, readers))
    });
    tokio::time::timeout(timeout(), cond)
        .await
        .map_err(|_| format!("VectorCluster {name} not Ready (generation {generation}) in time"))?
        .map_err(err("watching the VectorCluster"))?;
    Ok(())
}

async fn dump_diagnostics(client: &Client, ns: &str, cluster: &str) {
    let vcs: Api<VectorCluster> = Api::namespaced(client.clone(), ns);
    if let Ok(vc) = vcs.get(cluster).await {
        eprintln!(
            "--- VectorCluster {cluster} status:\n{}",
            serde_json::to_string_pretty(&vc.status).unwrap_or_default()
        );
    }
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    if let Ok(list) = events.list(&ListParams::default()).await {
        eprintln!("--- Events in {ns}:");
        for e in list {
            eprintln!(
                "{} {} {}: {}",
                e.type_.unwrap_or_default(),
                e.involved_object.name.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.message.unwrap_or_default()
            );
        }
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&format!("shoal.dev/cluster={cluster}"));
    if let Ok(list) = pods.list(&lp).await {
        for p in list {
            let name = p.name_any();
            let logs = pods
                .logs(
                    &name,
                    &LogParams {
                        tail_lines: Some(100),
                        ..LogParams::default()
                    },
                )
                .await
                .unwrap_or_else(|e| format!("(no logs: {e})"));
            eprintln!("--- logs of pod {name}:\n{logs}");
        }
    }
}

async fn example_scenario(client: &Client, disc: &Discovery, ns: &str, example: &str) -> Res<()> {
    let path = repo_root().join("examples").join(format!("{example}.yaml"));
    let text = std::fs::read_to_string(&path).map_err(err("reading the example"))?;
    let mut cluster = None;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc).map_err(err("example yaml"))?;
        if v["kind"] == "VectorCluster" {
            cluster = v["metadata"]["name"].as_str().map(str::to_string);
        }
        apply(client, disc, ns, &v).await?;
    }
    let name = cluster.ok_or("the example has no VectorCluster")?;
    let api: Api<VectorCluster> = Api::namespaced(client.clone(), ns);
    let outcome = async {
        wait_ready(&api, &name, None).await?;
        eprintln!("{example}: {name} is Ready");

        // kubectl scale vc/NAME --replicas=4 is a patch of the scale subresource.
        api.patch_scale(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 4}})),
        )
        .await
        .map_err(err("scaling the readers"))?;
        wait_ready(&api, &name, Some(4)).await?;
        let readers: Api<Deployment> = Api::namespaced(client.clone(), ns);
        let d = readers
            .get(&format!("{name}-reader"))
            .await
            .map_err(err("reading the reader Deployment"))?;
        let replicas = d.spec.replicas;
        if replicas != Some(4) {
            return Err(format!(
                "reader Deployment has {replicas:?} replicas, wanted 4"
            ));
        }
        eprintln!("{example}: scaled to 4 ready readers");

        let patch = match std::env::var("SHOAL_E2E_UPGRADE_IMAGE") {
            Ok(image) => json!({"spec": {"engine": {"image": image}}}),
            Err(_) => json!({"spec": {"engine": {"logLevel": "debug"}}}),
        };
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(err("rolling the engine"))?;
        wait_ready(&api, &name, Some(4)).await?;
        let writer: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
        let w = writer
            .get(&format!("{name}-writer"))
            .await
            .map_err(err("reading the writer"))?;
        let template = serde_json::to_string(&w.spec.template).unwrap_or_default();
        let expected = match std::env::var("SHOAL_E2E_UPGRADE_IMAGE") {
            Ok(image) => image,
            Err(_) => "debug".into(),
        };
        if !template.contains(&expected) {
            return Err(format!(
                "the writer's pod template does not carry {expected:?}"
            ));
        }
        eprintln!("{example}: rolled the engine and is Ready again");
        Ok(())
    }
    .await;
    if outcome.is_err() {
        dump_diagnostics(client, ns, &name).await;
    }
    api.delete(&name, &DeleteParams::foreground())
        .await
        .map_err(err("deleting the VectorCluster"))?;
    // Everything the operator made carries the cluster label and an owner reference.
    let lp = ListParams::default().labels(&format!("shoal.dev/cluster={name}"));
    let deadline = tokio::time::Instant::now() + timeout();
    loop {
        let d = Api::<Deployment>::namespaced(client.clone(), ns)
            .list(&lp)
            .await
            .map_err(err("listing"))?
            .items
            .len();
        let s = Api::<StatefulSet>::namespaced(client.clone(), ns)
            .list(&lp)
            .await
            .map_err(err("listing"))?
            .items
            .len();
        let vc_gone = api.get_opt(&name).await.map_err(err("get"))?.is_none();
        if d + s == 0 && vc_gone {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "{d} Deployments and {s} StatefulSets of {name} remain after delete"
            ));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    eprintln!("{example}: deleted, every object is gone");
    outcome
}

#[tokio::test]
async fn chart_and_examples_reach_ready_scale_roll_and_clean_up() {
    if std::env::var_os("KUBECONFIG").is_none() {
        eprintln!("KUBECONFIG is not set: the Kubernetes suite is skipped (see the module docs)");
        return;
    }
    let client = Client::try_default()
        .await
        .expect("KUBECONFIG is set but no client could be built from it");
    let ns = std::env::var("SHOAL_E2E_NAMESPACE").unwrap_or_else(|_| "shoal-e2e".into());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            &ns,
            &PatchParams::apply(MANAGER),
            &Patch::Apply(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            ),
        )
        .await
        .expect("creating the test namespace");

    let docs = render_chart(&ns).expect("rendering the chart");
    let mut disc = Discovery::new(client.clone())
        .run()
        .await
        .expect("API discovery");
    for d in docs
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
    {
        apply(&client, &disc, &ns, d)
            .await
            .expect("applying the CRD");
    }
    // The CRD's kind is served once discovery sees it.
    let deadline = tokio::time::Instant::now() + timeout();
    while resource_for(
        &disc,
        &json!({"apiVersion": "shoal.dev/v1alpha1", "kind": "VectorCluster"}),
    )
    .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the CRD was never served"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        disc = Discovery::new(client.clone())
            .run()
            .await
            .expect("API discovery");
    }
    for d in docs
        .iter()
        .filter(|d| d["kind"] != "CustomResourceDefinition")
    {
        apply(&client, &disc, &ns, d)
            .await
            .expect("applying the chart");
    }
    wait_deployment_available(&client, &ns, "shoal-operator")
        .await
        .expect("the operator");
    wait_daemonset_ready(&client, &ns, "shoal-csi-node")
        .await
        .expect("the CSI node plugin");

    let examples = std::env::var("SHOAL_E2E_EXAMPLES").unwrap_or_else(|_| "minimal".into());
    let mut failures = Vec::new();
    for ex in examples.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if let Err(e) = example_scenario(&client, &disc, &ns, ex).await {
            failures.push(format!("{ex}: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "examples failed:\n{}",
        failures.join("\n")
    );
}
