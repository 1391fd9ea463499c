//! Reconcile scenarios against an in-memory API server behind `tower_test::mock::pair`
//! (tests/common), one scenario per test, each request recorded and checked.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{FakeApi, Req};
use serde_json::{Value, json};
use shoal_operator::controller::{Context, Outcome, ReconcileError, reconcile_inner};
use shoal_operator::crd::{Phase, VectorCluster};
use shoal_operator::metrics::Metrics;

const TIMEOUT: Duration = Duration::from_secs(20);

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let v: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    serde_json::to_value(v).unwrap()
}

fn vc_path(ns: &str, name: &str) -> String {
    format!("/apis/shoal.dev/v1alpha1/namespaces/{ns}/vectorclusters/{name}")
}

fn core(ns: &str, res: &str, name: &str) -> String {
    format!("/api/v1/namespaces/{ns}/{res}/{name}")
}

fn apps(ns: &str, res: &str, name: &str) -> String {
    format!("/apis/apps/v1/namespaces/{ns}/{res}/{name}")
}

struct Env {
    fake: FakeApi,
    ctx: Context,
    ns: String,
    name: String,
}

impl Env {
    fn new(fixture_name: &str) -> Self {
        let (fake, client) = FakeApi::start();
        let mut vc = fixture(fixture_name);
        vc["metadata"]["resourceVersion"] = json!("1");
        let ns = vc["metadata"]["namespace"].as_str().unwrap().to_string();
        let name = vc["metadata"]["name"].as_str().unwrap().to_string();
        fake.put(&vc_path(&ns, &name), vc);
        // The object storage keys the minimal fixture references.
        fake.put(
            &core(&ns, "secrets", "demo-minio"),
            json!({"apiVersion":"v1","kind":"Secret","metadata":{"name":"demo-minio","namespace":ns},
                   "data":{"access-key":"QUs=","secret-key":"U0s="}}),
        );
        let ctx = Context::new(client, Arc::new(Metrics::default()), None);
        Env {
            fake,
            ctx,
            ns,
            name,
        }
    }

    fn vc(&self) -> VectorCluster {
        serde_json::from_value(self.fake.get(&vc_path(&self.ns, &self.name)).unwrap()).unwrap()
    }

    fn edit(&self, f: impl FnOnce(&mut Value)) {
        let path = vc_path(&self.ns, &self.name);
        let mut v = self.fake.get(&path).unwrap();
        f(&mut v);
        let g = v["metadata"]["generation"].as_i64().unwrap_or(1);
        v["metadata"]["generation"] = json!(g + 1);
        self.fake.put(&path, v);
    }

    /// One reconcile of the stored object; returns its result and the requests it made.
    async fn reconcile(&self) -> (Result<Outcome, ReconcileError>, Vec<Req>, Duration) {
        self.fake.take_log();
        let vc = self.vc();
        let start = Instant::now();
        let res = tokio::time::timeout(TIMEOUT, reconcile_inner(&vc, &self.ctx))
            .await
            .expect("reconcile hung");
        let took = start.elapsed();
        (res, self.fake.take_log(), took)
    }
}

fn writes(log: &[Req]) -> Vec<String> {
    log.iter()
        .filter(|r| r.is_write() && !r.is_event())
        .map(Req::short)
        .collect()
}

fn events(log: &[Req]) -> Vec<(String, String, String)> {
    log.iter()
        .filter(|r| r.is_event() && r.method == "POST")
        .map(|r| {
            let b = r.body.as_ref().unwrap();
            (
                b["type"].as_str().unwrap_or_default().to_string(),
                b["reason"].as_str().unwrap_or_default().to_string(),
                b["note"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn condition(vc: &VectorCluster, type_: &str) -> (String, String, String) {
    let c = vc
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap();
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

const CREATE_ORDER: [&str; 17] = [
    "POST secrets",
    "PATCH configmaps/demo-engine-config",
    "PATCH services/demo-mysql",
    "PATCH statefulsets/demo-mysql",
    "PATCH services/demo-redis",
    "PATCH statefulsets/demo-redis",
    "PATCH secrets/demo-juicefs",
    "PATCH persistentvolumes/shoal-shoal-demo-data",
    "PATCH persistentvolumeclaims/demo-data",
    "PATCH services/demo-writer",
    "PATCH statefulsets/demo-writer",
    "PATCH services/demo-readers",
    "PATCH deployments/demo-reader",
    "PATCH poddisruptionbudgets/demo-reader",
    "PATCH deployments/demo-router",
    "PATCH services/demo",
    "PATCH vectorclusters/demo/status",
];

#[tokio::test]
async fn fresh_cluster_is_created_in_dependency_order_and_reaches_running() {
    let env = Env::new("minimal.yaml");
    let (res, log, _) = env.reconcile().await;
    assert_eq!(res.unwrap(), Outcome::Applied(true));
    assert_eq!(writes(&log), CREATE_ORDER);
    // Every object write is server-side apply with our field manager, forced.
    for r in log
        .iter()
        .filter(|r| r.method == "PATCH" && !r.path.ends_with("/status"))
    {
        assert_eq!(r.content_type, "application/apply-patch+yaml", "{}", r.path);
        assert!(
            r.query.contains("fieldManager=shoal-operator") && r.query.contains("force=true"),
            "{}",
            r.query
        );
    }
    let vc = env.vc();
    let st = vc.status.as_ref().unwrap();
    assert_eq!(st.phase, Some(Phase::Running));
    assert_eq!(st.observed_generation, Some(1));
    assert_eq!(st.readers.replicas, 2);
    assert_eq!(
        st.readers.selector,
        "app.kubernetes.io/component=reader,app.kubernetes.io/instance=demo,app.kubernetes.io/name=shoal,shoal.dev/cluster=demo"
    );
    assert_eq!(st.endpoint.as_deref(), Some("http://demo.shoal.svc:19530"));
    for t in [
        "MetadataReady",
        "StorageReady",
        "WriterReady",
        "ReadersReady",
        "Ready",
    ] {
        assert_eq!(condition(&vc, t).0, "True", "{t}");
    }
    assert_eq!(condition(&vc, "Degraded").0, "False");
    let ev = events(&log);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!((ev[0].0.as_str(), ev[0].1.as_str()), ("Normal", "Created"));
    assert!(
        ev[0].2.contains("Secret demo-credentials") && ev[0].2.contains("StatefulSet demo-writer"),
        "{}",
        ev[0].2
    );
    // Retain: no finalizer.
    assert!(vc.metadata.finalizers.is_none());
    // The generated secret has what MySQL, Redis and the engine need; its values stay out of
    // every other object (the JuiceFS secret excepted, which csi.shoal.dev must read).
    let generated = env
        .fake
        .get(&core("shoal", "secrets", "demo-credentials"))
        .unwrap();
    for k in [
        "mysql-root-password",
        "mysql-password",
        "meta-uri",
        "redis-password",
    ] {
        assert!(generated["data"][k].is_string(), "{k}");
    }
}

#[tokio::test]
async fn reconciling_an_unchanged_cluster_makes_no_writes() {
    let env = Env::new("minimal.yaml");
    env.reconcile().await.0.unwrap();
    let before = env
        .fake
        .paths_with_prefix("/")
        .into_iter()
        .map(|p| {
            (
                p.clone(),
                env.fake.get(&p).unwrap()["metadata"]["resourceVersion"].clone(),
            )
        })
        .collect::<Vec<_>>();
    let (res, log, _) = env.reconcile().await;
    assert_eq!(res.unwrap(), Outcome::Applied(true));
    assert!(
        log.iter().all(|r| r.method == "GET"),
        "writes: {:?}",
        writes(&log)
    );
    assert!(events(&log).is_empty());
    let after = env
        .fake
        .paths_with_prefix("/")
        .into_iter()
        .map(|p| {
            (
                p.clone(),
                env.fake.get(&p).unwrap()["metadata"]["resourceVersion"].clone(),
            )
        })
        .collect::<Vec<_>>();
    assert_eq!(before, after, "a no-op reconcile changed a resourceVersion");
}

#[tokio::test]
async fn scaling_readers_changes_only_the_reader_deployment() {
    let env = Env::new("minimal.yaml");
    env.reconcile().await.0.unwrap();
    env.edit(|v| v["spec"]["readers"]["replicas"] = json!(8));
    let (res, log, _) = env.reconcile().await;
    assert_eq!(res.unwrap(), Outcome::Applied(true));
    assert_eq!(
        writes(&log),
        [
            "PATCH deployments/demo-reader",
            "PATCH vectorclusters/demo/status"
        ]
    );
    let d = env
        .fake
        .get(&apps("shoal", "deployments", "demo-reader"))
        .unwrap();
    assert_eq!(d["spec"]["replicas"], 8);
    let vc = env.vc();
    assert_eq!(vc.status.as_ref().unwrap().readers.replicas, 8);
    assert_eq!(vc.status.as_ref().unwrap().observed_generation, Some(2));
    let ev = events(&log);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].1, "Updated");
    assert!(ev[0].2.contains("Deployment demo-reader"));
}

#[tokio::test]
async fn image_change_rolls_the_writer_before_readers_and_router() {
    let env = Env::new("minimal.yaml");
    env.reconcile().await.0.unwrap();
    env.fake.set_ready_on_apply(false);
    env.edit(|v| v["spec"]["engine"] = json!({"image": "ghcr.io/shoal-db/shoal-engine:0.2.0"}));
    let (res, log, _) = env.reconcile().await;
    assert_eq!(res.unwrap(), Outcome::Applied(false));
    assert_eq!(
        writes(&log),
        [
            "PATCH statefulsets/demo-writer",
            "PATCH vectorclusters/demo/status"
        ]
    );
    let vc = env.vc();
    let (st, reason, msg) = condition(&vc, "Progressing");
    assert_eq!(
        (st.as_str(), reason.as_str()),
        ("True", "WaitingForWriterRollout")
    );
    assert!(
        msg.contains("Deployment demo-reader") && msg.contains("Deployment demo-router"),
        "{msg}"
    );
    let reader = env
        .fake
        .get(&apps("shoal", "deployments", "demo-reader"))
        .unwrap();
    assert_eq!(
        reader["spec"]["template"]["spec"]["containers"][0]["image"],
        "ghcr.io/shoal-db/shoal-engine:0.1.0"
    );

    // The writer's controller rolls it out; the next reconcile moves readers and router.
    env.fake
        .settle(&apps("shoal", "statefulsets", "demo-writer"));
    env.fake.set_ready_on_apply(true);
    let (res, log, _) = env.reconcile().await;
    assert_eq!(res.unwrap(), Outcome::Applied(true));
    assert_eq!(
        writes(&log),
        [
            "PATCH deployments/demo-reader",
            "PATCH deployments/demo-router",
            "PATCH vectorclusters/demo/status"
        ]
    );
    for d in ["demo-reader", "demo-router"] {
        let o = env.fake.get(&apps("shoal", "deployments", d)).unwrap();
        assert_eq!(
            o["spec"]["template"]["spec"]["containers"][0]["image"],
            "ghcr.io/shoal-db/shoal-engine:0.2.0"
        );
    }
    assert_eq!(condition(&env.vc(), "Progressing").1, "Stable");
}

#[tokio::test]
async fn switching_to_external_mysql_removes_the_managed_one() {
    let env = Env::new("minimal.yaml");
    env.reconcile().await.0.unwrap();
    env.fake.put(
        &core("shoal", "secrets", "ext-mysql"),
        json!({"apiVersion":"v1","kind":"Secret","metadata":{"name":"ext-mysql","namespace":"shoal"},
               "data":{"uri":"bXlzcWw6Ly91OnBAaDozMzA2L2Q="}}),
    );
    env.edit(|v| {
        v["spec"]["metadata"] =
            json!({"external": {"uriSecretRef": {"name": "ext-mysql", "key": "uri"}}})
    });
    let (res, log, _) = env.reconcile().await;
    res.unwrap();
    let w = writes(&log);
    assert!(
        w.contains(&"DELETE statefulsets/demo-mysql".to_string()),
        "{w:?}"
    );
    assert!(
        w.contains(&"DELETE services/demo-mysql".to_string()),
        "{w:?}"
    );
    assert_eq!(
        w.iter().filter(|x| x.starts_with("DELETE")).count(),
        2,
        "{w:?}"
    );
    assert!(
        env.fake
            .get(&apps("shoal", "statefulsets", "demo-mysql"))
            .is_none()
    );
    assert!(
        env.fake
            .get(&core("shoal", "services", "demo-mysql"))
            .is_none()
    );
    // The generated Secret (passwords) is never swept.
    assert!(
        env.fake
            .get(&core("shoal", "secrets", "demo-credentials"))
            .is_some()
    );
    let writer = env
        .fake
        .get(&apps("shoal", "statefulsets", "demo-writer"))
        .unwrap();
    let meta_env = writer["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "SHOAL_META")
        .unwrap()
        .clone();
    assert_eq!(meta_env["valueFrom"]["secretKeyRef"]["name"], "ext-mysql");
    assert!(
        events(&log)
            .iter()
            .any(|e| e.1 == "DeletedOrphans" && e.2.contains("StatefulSet demo-mysql"))
    );
    assert_eq!(condition(&env.vc(), "MetadataReady").1, "External");
}

#[tokio::test]
async fn deleting_a_delete_policy_cluster_removes_its_volume_claims_then_the_finalizer() {
    let env = Env::new("gpu.yaml");
    let (res, log, _) = env.reconcile().await;
    res.unwrap();
    assert_eq!(
        writes(&log)[0],
        "PATCH vectorclusters/gpu",
        "finalizer first"
    );
    assert_eq!(env.vc().metadata.finalizers.unwrap(), ["shoal.dev/cleanup"]);
    // Claims the StatefulSet controller made from the templates carry the template labels.
    let labels = json!({"shoal.dev/cluster":"gpu","app.kubernetes.io/managed-by":"shoal-operator"});
    for c in ["data-gpu-mysql-0", "wal-gpu-writer-0"] {
        env.fake.put(&core("ml", "persistentvolumeclaims", c),
            json!({"apiVersion":"v1","kind":"PersistentVolumeClaim","metadata":{"name":c,"namespace":"ml","labels":labels}}));
    }
    env.fake.put(&core("ml", "persistentvolumeclaims", "unrelated"),
        json!({"apiVersion":"v1","kind":"PersistentVolumeClaim","metadata":{"name":"unrelated","namespace":"ml"}}));
    let path = vc_path("ml", "gpu");
    let mut v = env.fake.get(&path).unwrap();
    v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    env.fake.put(&path, v);
    // First pass: the engine's workloads, the claims and the credentials go; the shared
    // volume is still there (the CSI driver deletes it), so the finalizer stays.
    let (res, log, _) = env.reconcile().await;
    assert_eq!(res.unwrap(), Outcome::DeletingData);
    let mut w = writes(&log);
    w.sort();
    assert_eq!(
        w,
        [
            "DELETE deployments/gpu-reader",
            "DELETE deployments/gpu-router",
            "DELETE persistentvolumeclaims/data-gpu-mysql-0",
            "DELETE persistentvolumeclaims/gpu-data",
            "DELETE persistentvolumeclaims/wal-gpu-writer-0",
            "DELETE secrets/gpu-credentials",
            "DELETE statefulsets/gpu-writer",
        ]
    );
    assert!(env.fake.get(&path).is_some(), "finalizer kept");
    assert!(events(&log).iter().any(|e| e.1 == "DeletedData"));
    let pv = env
        .fake
        .get("/api/v1/persistentvolumes/shoal-ml-gpu-data")
        .unwrap();
    assert_eq!(
        pv["metadata"]["annotations"]["volume.kubernetes.io/provisioner-deletion-secret-name"],
        "gpu-juicefs"
    );
    // The external-provisioner deleted the volume through the CSI driver.
    env.fake
        .remove("/api/v1/persistentvolumes/shoal-ml-gpu-data");
    let (res, log, _) = env.reconcile().await;
    assert_eq!(res.unwrap(), Outcome::Deleted);
    assert_eq!(
        writes(&log).last().map(String::as_str),
        Some("PATCH vectorclusters/gpu"),
        "the finalizer goes last"
    );
    assert!(
        env.fake.get(&path).is_none(),
        "finalizer removed, object gone"
    );
    assert!(
        env.fake
            .get(&core("ml", "persistentvolumeclaims", "unrelated"))
            .is_some()
    );
}

#[tokio::test]
async fn a_retain_cluster_keeps_its_credentials_beyond_itself_so_a_recreated_one_can_log_in() {
    let env = Env::new("minimal.yaml");
    // As an older operator made it: owned by the cluster, so the garbage collector would
    // delete the passwords the retained MariaDB and Redis volumes were initialised with.
    let secret = core("shoal", "secrets", "demo-credentials");
    env.fake.put(&secret, json!({"apiVersion":"v1","kind":"Secret",
        "metadata":{"name":"demo-credentials","namespace":"shoal",
            "ownerReferences":[{"apiVersion":"shoal.dev/v1alpha1","kind":"VectorCluster","name":"demo",
                "uid":"6f1c1a2e-0000-4000-8000-000000000001","controller":true}]},
        "data":{"mysql-root-password":"cg==","mysql-password":"dQ==","meta-uri":"bQ==","redis-password":"cA=="}}));
    let (res, log, _) = env.reconcile().await;
    res.unwrap();
    assert!(
        writes(&log).contains(&"PATCH secrets/demo-credentials".to_string()),
        "{:?}",
        writes(&log)
    );
    let live = env.fake.get(&secret).unwrap();
    assert!(
        live["metadata"]["ownerReferences"].is_null(),
        "{}",
        live["metadata"]
    );
    // The same passwords are used, not new ones.
    assert_eq!(live["data"]["redis-password"], "cA==");
}

#[tokio::test]
async fn a_retained_volume_released_by_a_deleted_cluster_binds_to_the_recreated_claim() {
    let env = Env::new("minimal.yaml");
    env.reconcile().await.0.unwrap();
    // The cluster was deleted: its claim went, the PV controller marked the volume Released
    // and it still names the deleted claim's UID.
    let pv = "/api/v1/persistentvolumes/shoal-shoal-demo-data";
    let mut v = env.fake.get(pv).unwrap();
    v["spec"]["claimRef"]["uid"] = json!("uid-of-the-deleted-claim");
    v["spec"]["claimRef"]["resourceVersion"] = json!("41");
    v["status"] = json!({"phase": "Released"});
    env.fake.put(pv, v);
    env.fake
        .remove(&core("shoal", "persistentvolumeclaims", "demo-data"));
    let (res, log, _) = env.reconcile().await;
    res.unwrap();
    let patch = log
        .iter()
        .find(|r| {
            r.method == "PATCH"
                && r.path == pv
                && r.content_type.starts_with("application/merge-patch")
        })
        .expect("a merge patch of the Released volume");
    assert_eq!(
        patch.body.as_ref().unwrap()["spec"]["claimRef"],
        json!({"uid": null, "resourceVersion": null})
    );
    let claim = &env.fake.get(pv).unwrap()["spec"]["claimRef"];
    assert!(claim["uid"].is_null(), "{claim}");
    assert_eq!(claim["name"], "demo-data");
    assert!(
        events(&log).iter().any(|e| e.1 == "RetainedVolumeRebound"),
        "{:?}",
        events(&log)
    );
    // A volume that is Bound (or Released for someone else's claim) is left alone.
    let (_, log, _) = env.reconcile().await;
    assert!(
        !log.iter()
            .any(|r| r.path == pv && r.content_type.starts_with("application/merge-patch")),
    );
}

#[tokio::test]
async fn deleting_a_retain_policy_cluster_leaves_data_and_makes_no_calls() {
    let env = Env::new("minimal.yaml");
    env.reconcile().await.0.unwrap();
    let path = vc_path("shoal", "demo");
    let mut v = env.fake.get(&path).unwrap();
    v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    env.fake.put(&path, v);
    let (res, log, _) = env.reconcile().await;
    assert_eq!(res.unwrap(), Outcome::Deleted);
    assert!(
        log.is_empty(),
        "{:?}",
        log.iter().map(Req::short).collect::<Vec<_>>()
    );
    assert!(
        env.fake
            .get(&core("shoal", "persistentvolumeclaims", "demo-data"))
            .is_some()
    );
    assert!(
        env.fake
            .get("/api/v1/persistentvolumes/shoal-shoal-demo-data")
            .is_some()
    );
}

#[tokio::test]
async fn an_api_error_mid_way_is_reported_and_the_next_reconcile_finishes() {
    let env = Env::new("minimal.yaml");
    // Write #6 (0-based) is the JuiceFS Secret.
    env.fake.fail_write(6);
    let (res, log, _) = env.reconcile().await;
    let err = res.unwrap_err();
    assert_eq!(err.category(), "apply");
    assert!(err.to_string().contains("Secret demo-juicefs"), "{err}");
    assert_eq!(
        writes(&log).len(),
        8,
        "stopped at the failure, then status: {:?}",
        writes(&log)
    );
    // The API server's own message reaches the Event and the condition, not only "failed to
    // apply Secret demo-juicefs".
    let ev = events(&log);
    assert!(
        ev.iter().any(|e| e.0 == "Warning"
            && e.1 == "ApplyFailed"
            && e.2.contains("demo-juicefs")
            && e.2.contains("injected failure")),
        "{ev:?}"
    );
    let (st, reason, message) = condition(&env.vc(), "Progressing");
    assert_eq!((st.as_str(), reason.as_str()), ("True", "ApplyFailed"));
    assert!(
        message.contains("injected failure") && message.contains("HTTP 500"),
        "{message}"
    );

    let (res, log, _) = env.reconcile().await;
    assert_eq!(res.unwrap(), Outcome::Applied(true));
    let w = writes(&log);
    // What was applied before the failure is not sent again; the generated secret is reused.
    assert_eq!(
        w.first().map(String::as_str),
        Some("PATCH secrets/demo-juicefs"),
        "{w:?}"
    );
    assert_eq!(w.len(), 11, "{w:?}");
    assert_eq!(env.vc().status.unwrap().phase, Some(Phase::Running));
}

#[tokio::test]
async fn an_invalid_spec_sets_a_condition_and_a_warning_event_and_applies_nothing() {
    let env = Env::new("invalid-gpu-without-readers.yaml");
    let (res, log, _) = env.reconcile().await;
    assert_eq!(res.unwrap(), Outcome::Invalid);
    assert_eq!(writes(&log), ["PATCH vectorclusters/broken/status"]);
    let ev = events(&log);
    assert_eq!(ev.len(), 1);
    assert_eq!(
        (ev[0].0.as_str(), ev[0].1.as_str()),
        ("Warning", "InvalidSpec")
    );
    assert!(ev[0].2.contains("spec.readers.gpu"), "{}", ev[0].2);
    let vc = env.vc();
    assert_eq!(vc.status.as_ref().unwrap().phase, Some(Phase::Failed));
    let (st, reason, msg) = condition(&vc, "Ready");
    assert_eq!(
        (st.as_str(), reason.as_str()),
        ("False", "GpuWithoutReaders")
    );
    assert!(msg.contains("add readers or remove gpu"));
    // Reconciling again neither rewrites the status nor repeats the event.
    let (res, log, _) = env.reconcile().await;
    assert_eq!(res.unwrap(), Outcome::Invalid);
    assert!(log.iter().all(|r| r.method == "GET"), "{:?}", writes(&log));
}

#[tokio::test]
async fn a_missing_user_secret_is_a_clear_error_and_creates_no_engine_objects() {
    let env = Env::new("minimal.yaml");
    env.fake.remove(&core("shoal", "secrets", "demo-minio"));
    let (res, log, _) = env.reconcile().await;
    let err = res.unwrap_err();
    assert_eq!(err.category(), "user_secret");
    assert!(
        err.to_string().contains("Secret demo-minio does not exist"),
        "{err}"
    );
    assert_eq!(
        writes(&log),
        ["POST secrets", "PATCH vectorclusters/demo/status"]
    );
}

/// Figures for BENCHMARKS.md ("Operator"): API calls and wall time of the first reconcile, a
/// no-op reconcile and a scale from 2 to 8 readers, counted from the recorded requests.
/// Run: `cargo test -p shoal-operator --test reconcile -- --nocapture operator_api_call_figures`
#[tokio::test]
async fn operator_api_call_figures() {
    fn line(what: &str, log: &[Req], took: Duration) -> String {
        let reads = log.iter().filter(|r| r.method == "GET").count();
        let writes = log.iter().filter(|r| r.is_write() && !r.is_event()).count();
        let ev = log.iter().filter(|r| r.is_event()).count();
        format!(
            "| {what} | {} | {reads} | {writes} | {ev} | {:.2} ms |",
            log.len(),
            took.as_secs_f64() * 1e3
        )
    }
    let env = Env::new("minimal.yaml");
    let (res, first, t1) = env.reconcile().await;
    res.unwrap();
    let (res, noop, t2) = env.reconcile().await;
    res.unwrap();
    let (res, _, _) = env.reconcile().await;
    res.unwrap();
    env.edit(|v| v["spec"]["readers"]["replicas"] = json!(8));
    let (res, scale, t3) = env.reconcile().await;
    res.unwrap();
    assert_eq!(noop.iter().filter(|r| r.is_write()).count(), 0);
    println!("| reconcile | API calls | reads (GET) | writes | events | time (mock API) |");
    println!("|---|---|---|---|---|---|");
    println!(
        "{}",
        line("first reconcile (new cluster, minimal.yaml)", &first, t1)
    );
    println!("{}", line("no-op reconcile (steady state)", &noop, t2));
    println!("{}", line("scale readers 2 → 8", &scale, t3));
}

/// `(apiGroup, resource, verb)` a recorded request needs.
/// The RBAC permissions one request needs. A server-side apply (`PATCH` with
/// `application/apply-patch+yaml`) creates the object when it does not exist, so the API server
/// checks `create` as well as `patch` (the blocker a fresh `helm install` hit: no `create` meant
/// the operator could build nothing, while every mock scenario passed).
fn rbac_needs(r: &Req) -> Vec<(String, String, String)> {
    let segs: Vec<&str> = r.path.trim_matches('/').split('/').collect();
    let (group, rest) = if segs[0] == "api" {
        ("", &segs[2..])
    } else {
        (segs[1], &segs[3..])
    };
    let rest: Vec<&str> = if rest.first() == Some(&"namespaces") {
        rest[2..].to_vec()
    } else {
        rest.to_vec()
    };
    let resource = match rest.as_slice() {
        [res, _, sub] => format!("{res}/{sub}"),
        [res, ..] => res.to_string(),
        [] => unreachable!(),
    };
    let verbs: &[&str] = match (r.method.as_str(), rest.len()) {
        ("GET", 1) => &["list"],
        ("GET", _) => &["get"],
        ("POST", _) => &["create"],
        // Apply on a subresource (status) never creates the object.
        ("PATCH", 2) if r.content_type.starts_with("application/apply-patch") => {
            &["patch", "create"]
        }
        ("PATCH", _) => &["patch"],
        ("PUT", _) => &["update"],
        ("DELETE", _) => &["delete"],
        (m, _) => panic!("{m}"),
    };
    verbs
        .iter()
        .map(|v| (group.to_string(), resource.clone(), v.to_string()))
        .collect()
}

#[test]
fn a_server_side_apply_needs_create_as_well_as_patch() {
    let apply = Req {
        method: "PATCH".into(),
        path: "/api/v1/namespaces/ml/configmaps/demo-engine-config".into(),
        query: "fieldManager=shoal-operator&force=true".into(),
        content_type: "application/apply-patch+yaml".into(),
        body: None,
    };
    let needs = rbac_needs(&apply);
    assert!(needs.contains(&("".into(), "configmaps".into(), "create".into())));
    assert!(needs.contains(&("".into(), "configmaps".into(), "patch".into())));
    let merge = Req {
        content_type: "application/merge-patch+json".into(),
        ..apply
    };
    assert_eq!(
        rbac_needs(&merge),
        vec![("".into(), "configmaps".into(), "patch".into())]
    );
}

#[tokio::test]
async fn every_request_the_scenarios_make_is_allowed_by_the_rbac_list() {
    let text =
        std::fs::read_to_string(format!("{}/rbac.yaml", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let mut allowed = std::collections::BTreeSet::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).unwrap();
        for rule in v["rules"].as_sequence().unwrap() {
            for g in rule["apiGroups"].as_sequence().unwrap() {
                for res in rule["resources"].as_sequence().unwrap() {
                    for verb in rule["verbs"].as_sequence().unwrap() {
                        allowed.insert((
                            g.as_str().unwrap().to_string(),
                            res.as_str().unwrap().to_string(),
                            verb.as_str().unwrap().to_string(),
                        ));
                    }
                }
            }
        }
    }
    let mut log = Vec::new();
    let env = Env::new("gpu.yaml");
    log.extend(env.reconcile().await.1);
    env.edit(|v| {
        v["spec"]["metadata"] = json!({"external": {"uriSecretRef": {"name": "m", "key": "uri"}}})
    });
    env.fake.put(&core("ml", "secrets", "m"), json!({"apiVersion":"v1","kind":"Secret","metadata":{"name":"m","namespace":"ml"},"data":{"uri":"eA=="}}));
    log.extend(env.reconcile().await.1);
    let path = vc_path("ml", "gpu");
    let mut v = env.fake.get(&path).unwrap();
    v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    env.fake.put(&path, v);
    log.extend(env.reconcile().await.1);
    let env = Env::new("invalid-gpu-without-readers.yaml");
    log.extend(env.reconcile().await.1);
    // A pending pod: the kubelet's volume Events are read.
    let env = Env::new("minimal.yaml");
    env.fake.set_ready_on_apply(false);
    put_reader_pod_that_cannot_mount(&env, "a CSI error");
    log.extend(env.reconcile().await.1);
    let mut used = std::collections::BTreeSet::new();
    for r in &log {
        for need in rbac_needs(r) {
            assert!(
                allowed.contains(&need),
                "{} {} needs {need:?}, not in operator/rbac.yaml",
                r.method,
                r.path
            );
            used.insert(need);
        }
    }
    // Every verb used on the kinds we apply shows up (the list is not wider than it must be
    // for these; watch and the Lease are exercised by the controller and leader tests).
    for need in [
        ("apps", "statefulsets", "delete"),
        ("", "persistentvolumeclaims", "delete"),
        ("", "secrets", "create"),
        ("", "events", "list"),
        ("shoal.dev", "vectorclusters/status", "patch"),
    ] {
        assert!(
            used.contains(&(need.0.to_string(), need.1.to_string(), need.2.to_string())),
            "{need:?} not exercised"
        );
    }
}

#[tokio::test]
async fn a_crashing_writer_is_named_with_the_error_it_died_with_and_the_cluster_is_not_running() {
    let env = Env::new("minimal.yaml");
    env.fake.set_ready_on_apply(false);
    // What the kubelet reports for a writer whose WAL volume it cannot write (the container's
    // last log line is its termination message: FallbackToLogsOnError).
    env.fake.put(
        &core("shoal", "pods", "demo-writer-0"),
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "demo-writer-0", "namespace": "shoal",
                "labels": {"shoal.dev/cluster": "demo", "app.kubernetes.io/managed-by": "shoal-operator",
                           "app.kubernetes.io/component": "writer"}},
            "status": {"phase": "Running",
                "conditions": [{"type": "Ready", "status": "False"}],
                "containerStatuses": [{"name": "writer", "ready": false, "restartCount": 3, "image": "x", "imageID": "",
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
                    "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                        "message": "error: cannot open the WAL in /wal: Permission denied (os error 13)"}}}]}}),
    );
    let (res, _, _) = env.reconcile().await;
    assert_eq!(res.unwrap(), Outcome::Applied(false));
    let vc = env.vc();
    let (st, reason, msg) = condition(&vc, "WriterReady");
    assert_eq!((st.as_str(), reason.as_str()), ("False", "WriterNotReady"));
    assert!(
        msg.contains("demo-writer-0")
            && msg.contains("CrashLoopBackOff")
            && msg.contains("Permission denied"),
        "{msg}"
    );
    assert_ne!(vc.status.unwrap().phase, Some(Phase::Running));
}

/// A reader pod the kubelet cannot start because its shared volume does not mount, with the
/// kubelet's `FailedMount` Warning carrying `csi_message` (what it reports for a CSI
/// NodeStageVolume error).
fn put_reader_pod_that_cannot_mount(env: &Env, csi_message: &str) {
    env.fake.put(
        &core("shoal", "pods", "demo-reader-7c9d-x2x"),
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "demo-reader-7c9d-x2x", "namespace": "shoal", "uid": "pod-uid-1",
                "labels": {"shoal.dev/cluster": "demo", "app.kubernetes.io/managed-by": "shoal-operator",
                           "app.kubernetes.io/component": "reader"}},
            "status": {"phase": "Pending",
                "conditions": [{"type": "PodScheduled", "status": "True"},
                               {"type": "Ready", "status": "False"}],
                "containerStatuses": [{"name": "reader", "ready": false, "restartCount": 0, "image": "x", "imageID": "",
                    "state": {"waiting": {"reason": "ContainerCreating"}}}]}}),
    );
    // An older, different Warning about the same pod: the newest one is quoted.
    for (name, ts, msg) in [
        (
            "demo-reader-7c9d-x2x.1",
            "2026-01-01T00:00:00Z",
            "an older mount error".to_string(),
        ),
        (
            "demo-reader-7c9d-x2x.2",
            "2026-01-01T00:05:00Z",
            format!(
                "MountVolume.MountDevice failed for volume \"shoal-shoal-demo-data\" : rpc error: code = Internal desc = {csi_message}"
            ),
        ),
    ] {
        env.fake.put(
            &core("shoal", "events", name),
            json!({"apiVersion": "v1", "kind": "Event",
                "metadata": {"name": name, "namespace": "shoal"},
                "involvedObject": {"kind": "Pod", "name": "demo-reader-7c9d-x2x", "namespace": "shoal", "uid": "pod-uid-1"},
                "reason": "FailedMount", "type": "Warning", "count": 3,
                "lastTimestamp": ts, "message": msg}),
        );
    }
}

#[tokio::test]
async fn a_reader_whose_volume_does_not_mount_is_named_with_the_csi_error_and_no_secret_in_status()
{
    let env = Env::new("minimal.yaml");
    env.fake.set_ready_on_apply(false);
    // The object storage keys the cluster uses; the CSI message below (a careless driver)
    // quotes the secret key.
    let (access, secret) = ("shoal-access-key-0042", "wrong-secret-key-value-0042");
    env.fake.put(
        &core("shoal", "secrets", "demo-minio"),
        json!({"apiVersion":"v1","kind":"Secret","metadata":{"name":"demo-minio","namespace":"shoal"},
               "data":{"access-key": b64(access), "secret-key": b64(secret)}}),
    );
    put_reader_pod_that_cannot_mount(
        &env,
        &format!(
            "juicefs mount failed: the object storage refused the credentials \
             (InvalidAccessKeyId: key {access}, secret {secret}): check the credentials Secret"
        ),
    );
    let (res, _, took) = env.reconcile().await;
    assert_eq!(res.unwrap(), Outcome::Applied(false));
    assert!(took < TIMEOUT);
    let vc = env.vc();
    let (st, reason, msg) = condition(&vc, "ReadersReady");
    assert_eq!((st.as_str(), reason.as_str()), ("False", "ReadersNotReady"));
    assert!(
        msg.contains("demo-reader-7c9d-x2x")
            && msg.contains("does not mount (FailedMount)")
            && msg.contains("InvalidAccessKeyId")
            && !msg.contains("an older mount error"),
        "{msg}"
    );
    // No credential reaches the status, whoever quoted it.
    let status = serde_json::to_string(&vc.status).unwrap();
    for s in [access, secret] {
        assert!(!status.contains(s), "the status quotes {s}: {status}");
    }
    assert!(msg.contains("<redacted>"), "{msg}");
}

/// Secret `data` encoding (k8s-openapi's `ByteString` serializes as base64).
fn b64(s: &str) -> Value {
    serde_json::to_value(k8s_openapi::ByteString(s.as_bytes().to_vec())).unwrap()
}

#[tokio::test]
async fn reapplying_a_bound_shared_volume_keeps_the_claim_uid_it_was_bound_with() {
    // Applying the built volume (pre-bound by name, no UID) over a bound one took the UID away:
    // the volume then looked pre-bound, turned Available instead of Released when its claim was
    // deleted, and a Delete cluster's finalizer waited forever for it to be deleted.
    let env = Env::new("minimal.yaml");
    env.reconcile().await.0.unwrap();
    let pv = "/api/v1/persistentvolumes/shoal-shoal-demo-data";
    let mut v = env.fake.get(pv).unwrap();
    v["spec"]["claimRef"]["uid"] = json!("uid-of-the-bound-claim");
    v["status"] = json!({"phase": "Bound"});
    env.fake.put(pv, v);
    env.edit(|v| v["spec"]["storage"]["reclaimPolicy"] = json!("Delete"));
    let (res, log, _) = env.reconcile().await;
    res.unwrap();
    let apply = log
        .iter()
        .find(|r| {
            r.method == "PATCH"
                && r.path == pv
                && r.content_type.starts_with("application/apply-patch")
        })
        .expect("the volume is re-applied (its reclaim policy changed)");
    assert_eq!(
        apply.body.as_ref().unwrap()["spec"]["claimRef"]["uid"],
        "uid-of-the-bound-claim"
    );
    assert_eq!(
        env.fake.get(pv).unwrap()["spec"]["persistentVolumeReclaimPolicy"],
        "Delete"
    );
}
