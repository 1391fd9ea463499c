//! The reconcile scenarios against a real API server. Ignored by default; `make test-k8s` runs
//! them on `../shared/k8s` after the e2e suite; elsewhere run the built test binary with
//! `KUBECONFIG=... target/debug/deps/cluster-<hash> --ignored --test-threads=1`.
//! Needs rights to install the CRD and to create objects in `SHOAL_TEST_NAMESPACE` (default
//! `default`). Pods need not start: the scenarios check API objects and resourceVersions.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolume, PersistentVolumeClaim, Secret, Service,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::CustomResourceExt;
use kube::{Client, ResourceExt};
use serde_json::json;
use shoal_operator::controller::{Context, Outcome, reconcile_inner};
use shoal_operator::crd::VectorCluster;
use shoal_operator::metrics::Metrics;

/// The cluster KUBECONFIG names: this ignored test runs only when asked to, so a missing
/// KUBECONFIG is a failure that says so, never a silent pass.
async fn client() -> Client {
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "KUBECONFIG is not set: point it at a cluster (make test-k8s runs this on ../shared/k8s)"
    );
    Client::try_default()
        .await
        .expect("KUBECONFIG is set but unusable")
}

async fn setup(client: &Client, name: &str) -> (Api<VectorCluster>, String) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "vectorclusters.shoal.dev",
        &PatchParams::apply("shoal-operator-test").force(),
        &Patch::Apply(VectorCluster::crd()),
    )
    .await
    .unwrap();
    // Wait until the CRD is served (Established), by condition not by sleep.
    for _ in 0..100 {
        let c = crds.get("vectorclusters.shoal.dev").await.unwrap();
        let est = c
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if est {
            break;
        }
        tokio::task::yield_now().await;
    }
    let ns = std::env::var("SHOAL_TEST_NAMESPACE").unwrap_or_else(|_| "default".into());
    let api: Api<VectorCluster> = Api::namespaced(client.clone(), &ns);
    let _ = api.delete(name, &DeleteParams::foreground()).await;
    let vc: VectorCluster = serde_json::from_value(json!({
        "apiVersion": "shoal.dev/v1alpha1", "kind": "VectorCluster",
        "metadata": {"name": name},
        "spec": {"storage": {"objectStorage": {"type": "file", "bucket": "/var/lib/shoal-test"}}}
    }))
    .unwrap();
    api.create(&PostParams::default(), &vc).await.unwrap();
    (api, ns)
}

async fn versions(client: &Client, ns: &str, name: &str) -> BTreeMap<String, String> {
    let sel = format!("shoal.dev/cluster={name}");
    let lp = kube::api::ListParams::default().labels(&sel);
    let mut out = BTreeMap::new();
    macro_rules! grab {
        ($t:ty) => {
            for o in Api::<$t>::namespaced(client.clone(), ns)
                .list(&lp)
                .await
                .unwrap()
            {
                out.insert(
                    format!("{} {}", stringify!($t), o.name_any()),
                    o.resource_version().unwrap(),
                );
            }
        };
    }
    grab!(StatefulSet);
    grab!(Deployment);
    grab!(Service);
    grab!(ConfigMap);
    grab!(Secret);
    out
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (KUBECONFIG)"]
async fn real_cluster_create_noop_scale_and_invalid_spec() {
    let client = client().await;
    let name = "shoal-op-e2e";
    let (api, ns) = setup(&client, name).await;
    let ctx = Context::new(client.clone(), Arc::new(Metrics::default()), None);

    let vc = api.get(name).await.unwrap();
    assert!(matches!(
        reconcile_inner(&vc, &ctx).await.unwrap(),
        Outcome::Applied(_)
    ));
    let writer: StatefulSet = Api::namespaced(client.clone(), &ns)
        .get(&format!("{name}-writer"))
        .await
        .unwrap();
    assert_eq!(writer.owner_references()[0].uid, vc.uid().unwrap());

    // Steady state: a second pass (status settles) and a third change nothing.
    let vc = api.get(name).await.unwrap();
    reconcile_inner(&vc, &ctx).await.unwrap();
    let before = versions(&client, &ns, name).await;
    let vc = api.get(name).await.unwrap();
    let rv = vc.resource_version();
    reconcile_inner(&vc, &ctx).await.unwrap();
    assert_eq!(before, versions(&client, &ns, name).await);
    assert_eq!(rv, api.get(name).await.unwrap().resource_version());

    // Scale through the scale subresource, as kubectl scale does.
    api.patch_scale(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 5}})),
    )
    .await
    .unwrap();
    let vc = api.get(name).await.unwrap();
    reconcile_inner(&vc, &ctx).await.unwrap();
    let readers: Deployment = Api::namespaced(client.clone(), &ns)
        .get(&format!("{name}-reader"))
        .await
        .unwrap();
    assert_eq!(readers.spec.replicas, Some(5));

    // The schema refuses a negative replica count outright.
    let bad = api
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"readers": {"replicas": -1}}})),
        )
        .await;
    assert!(bad.is_err());
    // gpu without readers passes the schema and is reported in a condition.
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"readers": {"replicas": 0, "gpu": {"count": 1}}}})),
    )
    .await
    .unwrap();
    let vc = api.get(name).await.unwrap();
    assert_eq!(reconcile_inner(&vc, &ctx).await.unwrap(), Outcome::Invalid);
    let st = api.get(name).await.unwrap().status.unwrap();
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.reason == "GpuWithoutReaders")
    );

    api.delete(name, &DeleteParams::foreground()).await.unwrap();
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let _ = pvs
        .delete(&format!("shoal-{ns}-{name}-data"), &DeleteParams::default())
        .await;
    // The StatefulSets' claims outlive them (Kubernetes keeps volumeClaimTemplates' claims).
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    for pvc in pvcs.list(&Default::default()).await.unwrap() {
        if pvc.name_any().contains(&format!("-{name}-")) {
            let _ = pvcs.delete(&pvc.name_any(), &DeleteParams::default()).await;
        }
    }
}
