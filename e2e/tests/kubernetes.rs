//! The whole product on a real Kubernetes node: the chart, the operator, the CSI driver's mount
//! and the engine's pods, driven the way a user drives them. `make test` runs it on the
//! single-node Kubernetes 1.24 of `../shared/k8s` with images built from this checkout
//! (`e2e/images/build.sh`); with any other `KUBECONFIG` (kind, EKS, GKE) it runs the same way
//! once the images are on the nodes (`SHOAL_E2E_VALUES` for the chart's image settings).
//!
//! ```text
//! KUBECONFIG=/var/lib/shoal-k8s/admin.kubeconfig \
//!   cargo test -p shoal-e2e --test kubernetes -- --ignored --nocapture
//! ```
//! Environment:
//! - `SHOAL_E2E_NAMESPACE` (default `shoal-e2e`): where the chart and the cluster go.
//! - `SHOAL_E2E_VALUES`: a values file for the chart (image repositories/tags your nodes can pull).
//! - `SHOAL_E2E_UPGRADE_IMAGE` (default: the engine image with tag `<version>-rollout`, which
//!   `build.sh` imports): the engine image the rolling upgrade moves to.
//! - `SHOAL_E2E_ROUTER_URL`: how this process reaches the router Service (default: its
//!   ClusterIP, which the kit's node routes to the host).
//! - `SHOAL_E2E_TIMEOUT_S` (default 600): how long each wait may take.
//! - `SHOAL_E2E_OBJECT_STORE_IP`: the address of this machine the pods reach, where the suite
//!   starts Azurite for `examples/azure-blob.yaml` (default: the node's InternalIP when it is
//!   an address of this machine, as on `../shared/k8s`). On a remote cluster with no such
//!   address the run fails unless `SHOAL_E2E_SKIP_AZURE_BLOB=1`, which skips that step and
//!   says so.
//!
//! The scenario, each step waiting on a condition (a watch or a polled API answer), never on a
//! fixed sleep: chart install (CRD first, as `helm install`) → `examples/minimal.yaml` → `Ready`
//! → through the router: create, insert 100k rows, every search checked against an exact oracle
//! → `kubectl scale` 2 → 4 → 1 readers under a search load (zero failed searches) → a rolling
//! upgrade of `spec.engine.image` under searches and inserts (zero failed searches, no
//! acknowledged row lost) → the CSI node plugin pod deleted (mounts keep working, no engine pod
//! restarts) → the writer pod deleted mid-insert (every acknowledged row there once, writes
//! resume) → delete and re-create under `Retain` (old data back) and under `Delete` (empty) →
//! `examples/azure-blob.yaml` on an Azurite the suite starts where the pods reach it → `helm
//! uninstall`. Leftovers of an earlier, aborted run in the namespace are removed first.
//!
//! Prints `E2E-K8S-FIGURE name=value` lines (BENCHMARKS.md, "Kubernetes").
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    Event, Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod, Secret, Service,
};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, LogParams, Patch, PatchParams};
use kube::discovery::{ApiCapabilities, ApiResource, Discovery, Scope};
use kube::runtime::wait::await_condition;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use shoal_operator::crd::VectorCluster;

const MANAGER: &str = "shoal-e2e";
const CLUSTER: &str = "demo";
const DIM: usize = 16;
const ROWS: usize = 100_000;
const BATCH: usize = 5_000;
const K: usize = 10;
const COLLECTION: &str = "e2e_k8s";
const MANAGED: &str = "app.kubernetes.io/managed-by=shoal-operator";

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
            .unwrap_or(600),
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

fn figure(name: &str, value: impl std::fmt::Display) {
    eprintln!("E2E-K8S-FIGURE {name}={value}");
}

/// Polls `check` once a second until it answers `Ok(true)`; `Err` ends the wait at once.
async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F) -> Res<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Res<bool>>,
{
    let t = Instant::now();
    loop {
        if check().await? {
            return Ok(t.elapsed());
        }
        if t.elapsed() > limit {
            return Err(format!("{what}: not reached within {limit:?}"));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn is_ready(vc: &VectorCluster, generation: i64, ready_readers: Option<i32>) -> bool {
    let Some(st) = &vc.status else { return false };
    let ready = st.conditions.iter().any(|c| {
        c.type_ == "Ready" && c.status == "True" && c.observed_generation.unwrap_or(0) >= generation
    });
    ready && ready_readers.is_none_or(|n| st.readers.ready_replicas == n)
}

async fn wait_ready(api: &Api<VectorCluster>, name: &str, readers: Option<i32>) -> Res<Duration> {
    let t = Instant::now();
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
    Ok(t.elapsed())
}

/// Every workload of the cluster runs its newest template on all its replicas.
async fn rolled_out(client: &Client, ns: &str, image: &str) -> Res<bool> {
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let w = sts
        .get(&format!("{CLUSTER}-writer"))
        .await
        .map_err(err("writer"))?;
    let ws = w.status.clone().unwrap_or_default();
    let writer_done = ws.observed_generation == w.metadata.generation
        && ws.update_revision.is_some()
        && ws.current_revision == ws.update_revision
        && ws.ready_replicas == Some(1);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let mut done = writer_done;
    for d in [format!("{CLUSTER}-reader"), format!("{CLUSTER}-router")] {
        let d = deps.get(&d).await.map_err(err("deployment"))?;
        let want = d.spec.replicas.unwrap_or(1);
        let st = d.status.clone().unwrap_or_default();
        done &= st.observed_generation == d.metadata.generation
            && st.updated_replicas == Some(want)
            && st.replicas == Some(want)
            && st.ready_replicas == Some(want);
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&format!("shoal.dev/cluster={CLUSTER}"));
    for p in pods.list(&lp).await.map_err(err("pods"))? {
        let component = p.labels().get("app.kubernetes.io/component").cloned();
        if !matches!(component.as_deref(), Some("writer" | "reader" | "router")) {
            continue;
        }
        let img = p
            .spec
            .as_ref()
            .map(|s| s.containers[0].image.clone().unwrap_or_default())
            .unwrap_or_default();
        done &= img == image;
    }
    Ok(done)
}

/// Restart counts of the engine's pods (writer, readers, router), by pod name.
async fn engine_restarts(client: &Client, ns: &str) -> Res<BTreeMap<String, i32>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&format!("shoal.dev/cluster={CLUSTER}"));
    let mut out = BTreeMap::new();
    for p in pods.list(&lp).await.map_err(err("pods"))? {
        let component = p.labels().get("app.kubernetes.io/component").cloned();
        if !matches!(component.as_deref(), Some("writer" | "reader" | "router")) {
            continue;
        }
        let restarts = p
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .map(|cs| cs.iter().map(|c| c.restart_count).sum())
            .unwrap_or(0);
        out.insert(p.name_any(), restarts);
    }
    Ok(out)
}

async fn engine_pods_ready(client: &Client, ns: &str) -> Res<bool> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&format!("shoal.dev/cluster={CLUSTER}"));
    Ok(pods.list(&lp).await.map_err(err("pods"))?.iter().all(|p| {
        p.metadata.deletion_timestamp.is_some()
            || p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    }))
}

// ---------------------------------------------------------------------------------------------
// Data and the exact oracle.

/// Deterministic pseudo-random vectors (SplitMix64).
fn vectors(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    let mut out = Vec::with_capacity(n * DIM);
    for _ in 0..n * DIM {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        out.push((z >> 40) as f32 / (1u64 << 24) as f32);
    }
    out
}

fn l2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Exact top-K distances over `base` (rows whose id is their index).
fn oracle(base: &[f32], q: &[f32]) -> Vec<f32> {
    let mut all: Vec<f32> = base.chunks_exact(DIM).map(|v| l2(v, q)).collect();
    all.select_nth_unstable_by(K, f32::total_cmp);
    all.truncate(K);
    all.sort_by(f32::total_cmp);
    all
}

/// K hits whose true distances (recomputed from the ids) equal the oracle's; ids may differ only
/// between equal distances. Rows inserted later in the scenario have ids >= ROWS and vectors
/// far from every query (all coordinates 10), so they never enter a top-K.
fn is_exact(base: &[f32], q: &[f32], want: &[f32], got: &Value) -> bool {
    let Some(hits) = got["data"].as_array() else {
        return false;
    };
    hits.len() == want.len()
        && hits.iter().zip(want).all(|(h, d)| {
            let Some(row) = h["id"]
                .as_i64()
                .and_then(|id| base.chunks_exact(DIM).nth(id as usize))
            else {
                return false;
            };
            (l2(row, q) - d).abs() <= 1e-4 * d.max(1.0)
        })
}

#[derive(Clone)]
struct Rest {
    http: reqwest::Client,
    base: String,
}

impl Rest {
    /// A client that opens a new connection per request, so each request is balanced by the
    /// Service to a ready router (a pooled keep-alive connection stays pinned to one pod).
    fn new(base: String) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        Rest { http, base }
    }

    async fn call(&self, path: &str, body: Value) -> Res<Value> {
        let r = self
            .http
            .post(format!("{}/v2/vectordb/{path}", self.base))
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("{path}: {e}"))?;
        let v: Value = r.json().await.map_err(|e| format!("{path}: {e}"))?;
        if v["code"] != 0 {
            return Err(format!("{path}: {v}"));
        }
        Ok(v)
    }

    async fn count(&self) -> Res<u64> {
        let v = self
            .call(
                "entities/query",
                json!({"collectionName": COLLECTION, "filter": "id >= 0", "outputFields": ["count(*)"]}),
            )
            .await?;
        v["data"][0]["count(*)"]
            .as_u64()
            .ok_or_else(|| format!("count(*) answer without a count: {v}"))
    }

    /// Flush, then wait until the router counts `want` rows.
    async fn flush_and_count(&self, want: u64) -> Res<Duration> {
        let t = Instant::now();
        self.call("collections/flush", json!({"collectionName": COLLECTION}))
            .await?;
        let last = Arc::new(AtomicU64::new(0));
        wait_until(&format!("{want} rows visible"), timeout(), || {
            let (rest, last) = (self.clone(), last.clone());
            async move {
                if let Ok(n) = rest.count().await {
                    last.store(n, Ordering::Relaxed);
                }
                Ok(last.load(Ordering::Relaxed) == want)
            }
        })
        .await
        .map_err(|e| format!("{e} (last count {})", last.load(Ordering::Relaxed)))?;
        Ok(t.elapsed())
    }

    /// Each of `queries` (flat, `DIM` apart) answers exactly `want`'s distances over `base`.
    async fn check_exact(&self, base: &[f32], queries: &[f32], want: &[Vec<f32>]) -> Res<()> {
        for (qi, q) in queries.chunks_exact(DIM).enumerate() {
            let v = self
                .call(
                    "entities/search",
                    json!({"collectionName": COLLECTION, "data": [q], "limit": K}),
                )
                .await?;
            if !is_exact(base, q, &want[qi], &v) {
                return Err(format!("search {qi} is not exact: {v}"));
            }
        }
        Ok(())
    }

    /// Every id appears exactly once: prints `FIGURE=<missing ids>` (the rows lost), then
    /// fails naming the first missing or doubled id, if any.
    async fn check_present_once(&self, ids: &[i64], figure_name: &str) -> Res<()> {
        let (mut missing, mut problems) = (0usize, Vec::new());
        for chunk in ids.chunks(1000) {
            let list = chunk
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let v = self
                .call(
                    "entities/query",
                    json!({"collectionName": COLLECTION, "filter": format!("id in [{list}]"),
                           "outputFields": ["id"], "limit": chunk.len() * 2}),
                )
                .await?;
            let mut seen: HashMap<i64, usize> = HashMap::new();
            for row in v["data"].as_array().cloned().unwrap_or_default() {
                *seen.entry(row["id"].as_i64().unwrap_or(-1)).or_default() += 1;
            }
            for id in chunk {
                match seen.get(id) {
                    Some(1) => {}
                    Some(n) => problems.push(format!("acknowledged row {id} is there {n} times")),
                    None => {
                        missing += 1;
                        problems.push(format!("acknowledged row {id} is missing"));
                    }
                }
            }
        }
        figure(figure_name, missing);
        match problems.first() {
            None => Ok(()),
            Some(first) => Err(format!("{} problems; first: {first}", problems.len())),
        }
    }
}

/// Searches in a loop until stopped: every answer checked against the oracle.
#[derive(Default)]
struct SearchLoad {
    ok: AtomicU64,
    inexact: AtomicU64,
    failed: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl SearchLoad {
    fn note(&self, what: String) {
        let mut e = self.errors.lock().unwrap();
        if e.len() < 20 {
            e.push(what);
        }
    }

    fn summary(&self) -> String {
        format!(
            "{} exact, {} inexact, {} failed; first problems: {:?}",
            self.ok.load(Ordering::Relaxed),
            self.inexact.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.errors.lock().unwrap()
        )
    }

    /// Waits until `n` more exact answers arrived (searches are really being served).
    async fn more(&self, n: u64, what: &str) -> Res<()> {
        let before = self.ok.load(Ordering::Relaxed);
        wait_until(what, Duration::from_secs(120), || async {
            Ok(self.ok.load(Ordering::Relaxed) >= before + n)
        })
        .await
        .map(|_| ())
        .map_err(|e| format!("{e}: {}", self.summary()))
    }
}

fn start_searches(
    rest: Rest,
    base: Arc<Vec<f32>>,
    queries: Arc<Vec<f32>>,
    want: Arc<Vec<Vec<f32>>>,
    stop: Arc<AtomicBool>,
) -> (Arc<SearchLoad>, tokio::task::JoinHandle<()>) {
    let load = Arc::new(SearchLoad::default());
    let l = load.clone();
    let task = tokio::spawn(async move {
        let mut i = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let qi = i % want.len();
            let q = &queries[qi * DIM..(qi + 1) * DIM];
            match rest
                .call(
                    "entities/search",
                    json!({"collectionName": COLLECTION, "data": [q], "limit": K}),
                )
                .await
            {
                Ok(v) if is_exact(&base, q, &want[qi], &v) => {
                    l.ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok(v) => {
                    l.inexact.fetch_add(1, Ordering::Relaxed);
                    l.note(format!("inexact: {v}"));
                }
                Err(e) => {
                    l.failed.fetch_add(1, Ordering::Relaxed);
                    l.note(e);
                }
            }
            i += 1;
        }
    });
    (load, task)
}

/// Inserts batches of far-away rows with fresh ids until stopped; records what was acknowledged.
/// Failures are expected while the writer is replaced and only counted.
#[derive(Default)]
struct InsertLoad {
    acked: Mutex<Vec<i64>>,
    failed: AtomicU64,
    /// When the last acknowledged batch was answered.
    last_ack: Mutex<Option<Instant>>,
}

fn start_inserts(
    rest: Rest,
    first_id: i64,
    stop: Arc<AtomicBool>,
) -> (Arc<InsertLoad>, tokio::task::JoinHandle<i64>) {
    let load = Arc::new(InsertLoad::default());
    let l = load.clone();
    let task = tokio::spawn(async move {
        let mut next = first_id;
        while !stop.load(Ordering::Relaxed) {
            let ids: Vec<i64> = (next..next + 100).collect();
            next += 100;
            let rows: Vec<Value> = ids
                .iter()
                .map(|id| json!({"id": id, "vector": vec![10.0f32; DIM]}))
                .collect();
            match rest
                .call(
                    "entities/insert",
                    json!({"collectionName": COLLECTION, "data": rows}),
                )
                .await
            {
                Ok(v) if v["data"]["insertCount"] == 100 => {
                    l.acked.lock().unwrap().extend(ids);
                    *l.last_ack.lock().unwrap() = Some(Instant::now());
                }
                Ok(_) | Err(_) => {
                    l.failed.fetch_add(1, Ordering::Relaxed);
                    // Not a retry of the same batch: the next batch has new ids, so an
                    // unacknowledged batch that did land cannot be mistaken for a duplicate.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        next
    });
    (load, task)
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
    // The cluster's pods, the operator, the CSI driver and its mount pods.
    let selectors = [
        format!("shoal.dev/cluster={cluster}"),
        "app.kubernetes.io/name=shoal".to_string(),
        "app.kubernetes.io/managed-by=shoal-csi".to_string(),
    ];
    let mut seen = std::collections::BTreeSet::new();
    for sel in selectors {
        let Ok(list) = pods.list(&ListParams::default().labels(&sel)).await else {
            continue;
        };
        for p in list {
            let name = p.name_any();
            if !seen.insert(name.clone()) {
                continue;
            }
            let phase = p.status.as_ref().and_then(|s| s.phase.clone());
            for c in p
                .spec
                .as_ref()
                .map(|s| s.containers.clone())
                .unwrap_or_default()
            {
                let logs = pods
                    .logs(
                        &name,
                        &LogParams {
                            container: Some(c.name.clone()),
                            tail_lines: Some(60),
                            ..LogParams::default()
                        },
                    )
                    .await
                    .unwrap_or_else(|e| format!("(no logs: {e})"));
                eprintln!("--- pod {name} ({phase:?}) container {}:\n{logs}", c.name);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cluster lifecycle.

fn example_objects(reclaim: &str) -> Res<Vec<Value>> {
    let path = repo_root().join("examples/minimal.yaml");
    let text = std::fs::read_to_string(&path).map_err(err("reading examples/minimal.yaml"))?;
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let mut v: Value = serde::Deserialize::deserialize(doc).map_err(err("example yaml"))?;
        if v["kind"] == "VectorCluster" {
            if v["metadata"]["name"] != CLUSTER {
                return Err(format!(
                    "examples/minimal.yaml names {}",
                    v["metadata"]["name"]
                ));
            }
            v["spec"]["storage"]["reclaimPolicy"] = json!(reclaim);
        }
        out.push(v);
    }
    Ok(out)
}

async fn create_cluster(client: &Client, disc: &Discovery, ns: &str, reclaim: &str) -> Res<()> {
    for v in example_objects(reclaim)? {
        apply(client, disc, ns, &v).await?;
    }
    Ok(())
}

/// Deletes the VectorCluster `demo` and waits until it and every workload it made are gone.
async fn delete_cluster(client: &Client, ns: &str) -> Res<Duration> {
    delete_named_cluster(client, ns, CLUSTER).await
}

/// Deletes the VectorCluster `name` and waits until it and every workload it made are gone.
async fn delete_named_cluster(client: &Client, ns: &str, name: &str) -> Res<Duration> {
    let t = Instant::now();
    let api: Api<VectorCluster> = Api::namespaced(client.clone(), ns);
    // Background propagation, as `kubectl delete` does.
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(format!("deleting the VectorCluster: {e}")),
    }
    let lp = ListParams::default().labels(&format!("shoal.dev/cluster={name}"));
    wait_until(
        "the VectorCluster and its workloads gone",
        timeout(),
        || {
            let (client, lp, api) = (client.clone(), lp.clone(), api.clone());
            async move {
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
                let p = Api::<Pod>::namespaced(client, ns)
                    .list(&lp)
                    .await
                    .map_err(err("listing"))?
                    .items
                    .len();
                let vc_gone = api.get_opt(name).await.map_err(err("get"))?.is_none();
                Ok(d + s + p == 0 && vc_gone)
            }
        },
    )
    .await?;
    Ok(t.elapsed())
}

/// What a `Retain` cluster leaves behind on purpose (claims, its credentials, the Released
/// shared volume), removed so the next run starts from nothing: the leftovers of an aborted
/// run, and this run's at the end.
async fn remove_retained_data(client: &Client, ns: &str) -> Res<()> {
    let lp = ListParams::default().labels(MANAGED);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    for p in pvcs.list(&lp).await.map_err(err("claims"))? {
        let _ = pvcs
            .delete(&p.name_any(), &DeleteParams::background())
            .await;
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for s in secrets.list(&lp).await.map_err(err("secrets"))? {
        let _ = secrets
            .delete(&s.name_any(), &DeleteParams::background())
            .await;
    }
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let ours = |pv: &PersistentVolume| {
        pv.labels()
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str)
            == Some("shoal-operator")
            && pv
                .spec
                .as_ref()
                .and_then(|s| s.claim_ref.as_ref())
                .and_then(|c| c.namespace.as_deref())
                == Some(ns)
    };
    for pv in pvs.list(&ListParams::default()).await.map_err(err("PVs"))? {
        if ours(&pv) {
            let _ = pvs
                .delete(&pv.name_any(), &DeleteParams::background())
                .await;
        }
    }
    wait_until("retained claims and volumes removed", timeout(), || {
        let (pvcs, pvs) = (pvcs.clone(), pvs.clone());
        let lp = lp.clone();
        async move {
            let claims = pvcs.list(&lp).await.map_err(err("claims"))?.items.len();
            let vols = pvs
                .list(&ListParams::default())
                .await
                .map_err(err("PVs"))?
                .items
                .iter()
                .filter(|pv| ours(pv))
                .count();
            Ok(claims + vols == 0)
        }
    })
    .await?;
    Ok(())
}

async fn install_chart(client: &Client, ns: &str) -> Res<(Discovery, Vec<Value>)> {
    let docs = render_chart(ns)?;
    let mut disc = Discovery::new(client.clone())
        .run()
        .await
        .map_err(err("API discovery"))?;
    for d in docs
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
    {
        apply(client, &disc, ns, d).await?;
    }
    // The CRD's kind is served once discovery sees it (re-run discovery until then).
    let vc_kind = json!({"apiVersion": "shoal.dev/v1alpha1", "kind": "VectorCluster"});
    let t = Instant::now();
    while resource_for(&disc, &vc_kind).is_err() {
        if t.elapsed() > timeout() {
            return Err("the VectorCluster CRD was never served".into());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        disc = Discovery::new(client.clone())
            .run()
            .await
            .map_err(err("API discovery"))?;
    }
    for d in docs
        .iter()
        .filter(|d| d["kind"] != "CustomResourceDefinition")
    {
        apply(client, &disc, ns, d).await?;
    }
    wait_deployment_available(client, ns, "shoal-operator").await?;
    wait_deployment_available(client, ns, "shoal-csi-controller").await?;
    wait_daemonset_ready(client, ns, "shoal-csi-node").await?;
    Ok((disc, docs))
}

/// `helm uninstall`: every object the chart made, in reverse order (CRDs stay, as Helm leaves
/// them); waits until the operator's and the CSI driver's pods are gone.
async fn uninstall_chart(client: &Client, disc: &Discovery, ns: &str, docs: &[Value]) -> Res<()> {
    for d in docs
        .iter()
        .rev()
        .filter(|d| d["kind"] != "CustomResourceDefinition")
    {
        let (ar, caps) = resource_for(disc, d)?;
        let name = d["metadata"]["name"].as_str().unwrap_or_default();
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Cluster => Api::all_with(client.clone(), &ar),
            Scope::Namespaced => Api::namespaced_with(client.clone(), ns, &ar),
        };
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(format!("uninstalling {} {name}: {e}", ar.kind)),
        }
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels("app.kubernetes.io/name=shoal");
    wait_until("the chart's pods gone", timeout(), || {
        let (pods, lp) = (pods.clone(), lp.clone());
        async move { Ok(pods.list(&lp).await.map_err(err("pods"))?.items.is_empty()) }
    })
    .await?;
    Ok(())
}

async fn router_url(client: &Client, ns: &str) -> Res<String> {
    if let Ok(u) = std::env::var("SHOAL_E2E_ROUTER_URL") {
        return Ok(u);
    }
    service_url(client, ns, CLUSTER).await
}

/// `http://CLUSTER-IP:19530` of the router Service of cluster `name`.
async fn service_url(client: &Client, ns: &str, name: &str) -> Res<String> {
    let svc: Api<Service> = Api::namespaced(client.clone(), ns);
    let s = svc.get(name).await.map_err(err("router Service"))?;
    let ip = s
        .spec
        .and_then(|s| s.cluster_ip)
        .ok_or("the router Service has no ClusterIP")?;
    Ok(format!("http://{ip}:19530"))
}

/// The router Service answers: `Ready` comes from pod readiness, and kube-proxy programs a new
/// Service's address on its own schedule (seconds on a loaded node).
async fn router_answering(client: &Client, ns: &str) -> Res<Rest> {
    let rest = Rest::new(router_url(client, ns).await?);
    wait_until("the router Service answers", timeout(), || {
        let rest = rest.clone();
        async move { Ok(rest.call("collections/list", json!({})).await.is_ok()) }
    })
    .await?;
    Ok(rest)
}

fn upgrade_image() -> String {
    std::env::var("SHOAL_E2E_UPGRADE_IMAGE")
        .unwrap_or_else(|_| format!("{}-rollout", shoal_operator::crd::DEFAULT_ENGINE_IMAGE))
}

// ---------------------------------------------------------------------------------------------
// The scenario.

async fn scenario(client: &Client, disc: &Discovery, ns: &str, t_install: Instant) -> Res<()> {
    let vcs: Api<VectorCluster> = Api::namespaced(client.clone(), ns);
    create_cluster(client, disc, ns, "Retain").await?;
    wait_ready(&vcs, CLUSTER, Some(2)).await?;
    figure(
        "install_to_ready_s",
        format!("{:.1}", t_install.elapsed().as_secs_f64()),
    );
    eprintln!("chart + minimal.yaml: Ready");

    let rest = router_answering(client, ns).await?;
    rest.call(
        "collections/create",
        json!({"collectionName": COLLECTION, "dimension": DIM, "metricType": "L2"}),
    )
    .await?;
    let base = Arc::new(vectors(ROWS, 7));
    let t = Instant::now();
    for (b, chunk) in base.chunks(BATCH * DIM).enumerate() {
        let rows: Vec<Value> = chunk
            .chunks_exact(DIM)
            .enumerate()
            .map(|(i, v)| json!({"id": (b * BATCH + i) as i64, "vector": v}))
            .collect();
        let r = rest
            .call(
                "entities/insert",
                json!({"collectionName": COLLECTION, "data": rows}),
            )
            .await?;
        if r["data"]["insertCount"] != BATCH {
            return Err(format!("insert answered {r}"));
        }
    }
    figure("insert_100k_s", format!("{:.1}", t.elapsed().as_secs_f64()));
    let mut total = ROWS as u64;
    rest.flush_and_count(total).await?;
    let queries = Arc::new(vectors(32, 99));
    let want: Arc<Vec<Vec<f32>>> = Arc::new(
        queries
            .chunks_exact(DIM)
            .map(|q| oracle(&base, q))
            .collect(),
    );
    rest.check_exact(&base, &queries, &want).await?;
    eprintln!("100k rows inserted; 32 searches exact");

    // Readers 2 → 4 → 1 under a search load.
    let stop = Arc::new(AtomicBool::new(false));
    let (load, search_task) = start_searches(
        rest.clone(),
        base.clone(),
        queries.clone(),
        want.clone(),
        stop.clone(),
    );
    load.more(50, "searches before scaling").await?;
    let t = Instant::now();
    vcs.patch_scale(
        CLUSTER,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 4}})),
    )
    .await
    .map_err(err("scaling the readers to 4"))?;
    wait_ready(&vcs, CLUSTER, Some(4)).await?;
    figure(
        "scale_2_to_4_serving_s",
        format!("{:.1}", t.elapsed().as_secs_f64()),
    );
    load.more(100, "searches with 4 readers").await?;
    vcs.patch_scale(
        CLUSTER,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 1}})),
    )
    .await
    .map_err(err("scaling the readers to 1"))?;
    wait_ready(&vcs, CLUSTER, Some(1)).await?;
    wait_until("scaled-down reader pods gone", timeout(), || async {
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let lp = ListParams::default().labels(&format!(
            "shoal.dev/cluster={CLUSTER},app.kubernetes.io/component=reader"
        ));
        Ok(pods.list(&lp).await.map_err(err("pods"))?.items.len() == 1)
    })
    .await?;
    load.more(100, "searches with 1 reader").await?;
    figure("scale_failed_searches", load.failed.load(Ordering::Relaxed));
    eprintln!("scaled 2 -> 4 -> 1: {}", load.summary());

    // A rolling upgrade of the engine image under searches and inserts, with a single reader:
    // the router must keep sending searches to the draining old reader until it has found and
    // probed the new one (DNS lists the new pod a moment after it is Ready).
    let image = upgrade_image();
    let stop_inserts = Arc::new(AtomicBool::new(false));
    let (inserts, insert_task) = start_inserts(rest.clone(), 1_000_000, stop_inserts.clone());
    let t = Instant::now();
    vcs.patch(
        CLUSTER,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"engine": {"image": image}}})),
    )
    .await
    .map_err(err("changing spec.engine.image"))?;
    wait_ready(&vcs, CLUSTER, Some(1)).await?;
    wait_until("every engine pod on the new image", timeout(), || async {
        rolled_out(client, ns, &image).await
    })
    .await?;
    figure(
        "rolling_upgrade_s",
        format!("{:.1}", t.elapsed().as_secs_f64()),
    );
    load.more(100, "searches after the upgrade").await?;
    // Writes resume on the new writer before the insert load stops.
    let acked_before = inserts.acked.lock().unwrap().len();
    wait_until(
        "inserts acknowledged by the upgraded writer",
        timeout(),
        || async { Ok(inserts.acked.lock().unwrap().len() >= acked_before + 500) },
    )
    .await?;
    stop_inserts.store(true, Ordering::Relaxed);
    let next_id = insert_task.await.map_err(err("insert task"))?;
    let acked = inserts.acked.lock().unwrap().clone();
    total += acked.len() as u64;
    rest.flush_and_count(total).await?;
    rest.check_present_once(&acked, "rolling_upgrade_acked_rows_lost")
        .await?;
    figure(
        "rolling_upgrade_failed_searches",
        load.failed.load(Ordering::Relaxed),
    );
    eprintln!(
        "rolled to {image}: {} acknowledged inserts all there ({} failed attempts while the writer rolled); {}",
        acked.len(),
        inserts.failed.load(Ordering::Relaxed),
        load.summary()
    );

    // The CSI node plugin pod deleted: the FUSE clients live in mount pods and survive it.
    let restarts_before = engine_restarts(client, ns).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let plugin_lp = ListParams::default().labels("app.kubernetes.io/component=csi-node");
    let plugin = pods
        .list(&plugin_lp)
        .await
        .map_err(err("plugin pods"))?
        .items
        .first()
        .map(ResourceExt::name_any)
        .ok_or("no CSI node plugin pod")?;
    let t = Instant::now();
    pods.delete(&plugin, &DeleteParams::default())
        .await
        .map_err(err("deleting the CSI node plugin pod"))?;
    wait_until("a new CSI node plugin pod", timeout(), || async {
        let list = pods.list(&plugin_lp).await.map_err(err("pods"))?;
        Ok(list.items.iter().any(|p| p.name_any() != plugin))
    })
    .await?;
    wait_daemonset_ready(client, ns, "shoal-csi-node").await?;
    // The mounts work: the writer writes a new segment through its mount, the readers read it
    // through theirs, and every engine pod stays ready.
    let fresh: Vec<Value> = (0..1000)
        .map(|i| json!({"id": 2_000_000 + i, "vector": vec![10.0f32; DIM]}))
        .collect();
    rest.call(
        "entities/insert",
        json!({"collectionName": COLLECTION, "data": fresh}),
    )
    .await?;
    total += 1000;
    rest.flush_and_count(total).await?;
    wait_until(
        "engine pods ready after the plugin restart",
        Duration::from_secs(30),
        || engine_pods_ready(client, ns),
    )
    .await?;
    figure(
        "csi_plugin_restart_mounts_healthy_s",
        format!("{:.1}", t.elapsed().as_secs_f64()),
    );
    let restarts_after = engine_restarts(client, ns).await?;
    let changed = restarts_before
        .keys()
        .chain(restarts_after.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|pod| restarts_before.get(*pod) != restarts_after.get(*pod))
        .count();
    figure("csi_plugin_restart_engine_restarts", changed);
    if changed > 0 {
        return Err(format!(
            "engine pods restarted around the CSI plugin restart: {restarts_before:?} -> {restarts_after:?}"
        ));
    }
    load.more(50, "searches after the plugin restart").await?;
    eprintln!("CSI node plugin restarted: mounts kept working, no engine restart");

    // The writer pod deleted mid-insert.
    let stop_inserts = Arc::new(AtomicBool::new(false));
    let (inserts, insert_task) = start_inserts(rest.clone(), next_id, stop_inserts.clone());
    wait_until("inserts flowing", timeout(), || async {
        Ok(inserts.acked.lock().unwrap().len() >= 500)
    })
    .await?;
    let writer = format!("{CLUSTER}-writer-0");
    let old_uid = pods
        .get(&writer)
        .await
        .map_err(err("writer pod"))?
        .metadata
        .uid;
    let t = Instant::now();
    pods.delete(&writer, &DeleteParams::default())
        .await
        .map_err(err("deleting the writer pod"))?;
    wait_until("a new writer pod", timeout(), || async {
        Ok(pods
            .get_opt(&writer)
            .await
            .map_err(err("writer pod"))?
            .is_some_and(|p| p.metadata.uid != old_uid))
    })
    .await?;
    let new_pod_seen = Instant::now();
    wait_until("writes accepted by the new writer", timeout(), || async {
        Ok(inserts
            .last_ack
            .lock()
            .unwrap()
            .is_some_and(|at| at > new_pod_seen))
    })
    .await?;
    figure(
        "writer_delete_to_writes_s",
        format!("{:.1}", t.elapsed().as_secs_f64()),
    );
    stop_inserts.store(true, Ordering::Relaxed);
    insert_task.await.map_err(err("insert task"))?;
    let acked = inserts.acked.lock().unwrap().clone();
    total += acked.len() as u64;
    rest.flush_and_count(total).await?;
    rest.check_present_once(&acked, "writer_delete_acked_rows_lost")
        .await?;
    eprintln!(
        "writer pod deleted mid-insert: {} acknowledged rows there once ({} failed attempts)",
        acked.len(),
        inserts.failed.load(Ordering::Relaxed)
    );

    stop.store(true, Ordering::Relaxed);
    search_task.await.map_err(err("search task"))?;
    let (failed, inexact) = (
        load.failed.load(Ordering::Relaxed),
        load.inexact.load(Ordering::Relaxed),
    );
    figure("searches_total", load.ok.load(Ordering::Relaxed));
    figure("searches_failed", failed);
    if failed + inexact > 0 {
        return Err(format!("searches under load: {}", load.summary()));
    }

    // Delete and re-create under Retain: the old data comes back.
    let took = delete_cluster(client, ns).await?;
    eprintln!("deleted (Retain) in {took:?}");
    let t = Instant::now();
    create_cluster(client, disc, ns, "Retain").await?;
    wait_ready(&vcs, CLUSTER, Some(2)).await?;
    let rest = router_answering(client, ns).await?;
    wait_until("the retained rows served again", timeout(), || async {
        Ok(rest.count().await.ok() == Some(total))
    })
    .await?;
    figure(
        "recreate_retain_ready_with_data_s",
        format!("{:.1}", t.elapsed().as_secs_f64()),
    );
    eprintln!("re-created under Retain: {total} rows back");

    // Under Delete: switch the policy, delete (the finalizer deletes the data), re-create: empty.
    vcs.patch(
        CLUSTER,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"storage": {"reclaimPolicy": "Delete"}}})),
    )
    .await
    .map_err(err("switching to reclaimPolicy Delete"))?;
    wait_ready(&vcs, CLUSTER, None).await?;
    delete_cluster(client, ns).await?;
    let t = Instant::now();
    create_cluster(client, disc, ns, "Delete").await?;
    wait_ready(&vcs, CLUSTER, Some(2)).await?;
    let rest = router_answering(client, ns).await?;
    let list = rest.call("collections/list", json!({})).await?;
    if list["data"].as_array().is_none_or(|a| !a.is_empty()) {
        return Err(format!(
            "a cluster re-created after a Delete has data: {list}"
        ));
    }
    figure(
        "recreate_delete_ready_empty_s",
        format!("{:.1}", t.elapsed().as_secs_f64()),
    );
    eprintln!("re-created under Delete: empty");
    delete_cluster(client, ns).await?;

    azure_blob_cluster(client, disc, ns).await
}

/// The VectorCluster of `examples/azure-blob.yaml`.
const AZURE_CLUSTER: &str = "azure";

/// The address pods reach this machine at, for an object store the suite starts here:
/// `SHOAL_E2E_OBJECT_STORE_IP`, else the node's InternalIP when it is an address of this
/// machine (the `../shared/k8s` node). `None` when neither applies (a remote cluster).
async fn object_store_ip(client: &Client) -> Res<Option<std::net::Ipv4Addr>> {
    if let Ok(v) = std::env::var("SHOAL_E2E_OBJECT_STORE_IP") {
        return v
            .parse()
            .map(Some)
            .map_err(|e| format!("SHOAL_E2E_OBJECT_STORE_IP={v:?}: {e}"));
    }
    let nodes: Api<Node> = Api::all(client.clone());
    for node in nodes
        .list(&ListParams::default())
        .await
        .map_err(err("nodes"))?
    {
        let addrs = node.status.and_then(|s| s.addresses).unwrap_or_default();
        for a in addrs.iter().filter(|a| a.type_ == "InternalIP") {
            if let Ok(ip) = a.address.parse::<std::net::Ipv4Addr>()
                // Only an address of this machine can be bound.
                && std::net::TcpListener::bind((ip, 0)).is_ok()
            {
                return Ok(Some(ip));
            }
        }
    }
    Ok(None)
}

/// `examples/azure-blob.yaml` end to end on Azurite (Microsoft's Azure Storage server) started
/// on this machine where the node's pods reach it: the example's Secret gets Azurite's
/// connection string and the cluster Azurite's container as its bucket (nothing else changes
/// but one reader and `reclaimPolicy: Delete`, to spare the node); it must come `Ready`, take
/// rows, flush them into blobs and answer exact searches, then be deleted with its data.
async fn azure_blob_cluster(client: &Client, disc: &Discovery, ns: &str) -> Res<()> {
    let Some(ip) = object_store_ip(client).await? else {
        if std::env::var_os("SHOAL_E2E_SKIP_AZURE_BLOB").is_some() {
            eprintln!(
                "SKIPPED the examples/azure-blob.yaml step (SHOAL_E2E_SKIP_AZURE_BLOB is set): \
                 no address of this machine that the pods reach"
            );
            return Ok(());
        }
        return Err(
            "the examples/azure-blob.yaml step needs an Azurite the pods reach: set \
                    SHOAL_E2E_OBJECT_STORE_IP to this machine's address as the pods see it, or \
                    SHOAL_E2E_SKIP_AZURE_BLOB=1 to skip the step"
                .into(),
        );
    };
    let azurite = shoal_testkit::objstore::ObjectStoreServer::start_on(
        shoal_testkit::objstore::ObjectStoreKind::Azurite,
        ip,
    )
    .map_err(err("starting Azurite"))?;
    let path = repo_root().join("examples/azure-blob.yaml");
    let text = std::fs::read_to_string(&path).map_err(err("reading examples/azure-blob.yaml"))?;
    let mut secret_name = None;
    let t = Instant::now();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let mut v: Value = serde::Deserialize::deserialize(doc).map_err(err("example yaml"))?;
        match v["kind"].as_str() {
            Some("Secret") => {
                v["stringData"]["connection-string"] = json!(azurite.connection_string());
                secret_name = v["metadata"]["name"].as_str().map(String::from);
            }
            Some("VectorCluster") => {
                if v["metadata"]["name"] != AZURE_CLUSTER {
                    return Err(format!(
                        "examples/azure-blob.yaml names {}",
                        v["metadata"]["name"]
                    ));
                }
                if v["spec"]["storage"]["objectStorage"]["type"] != "wasb" {
                    return Err("examples/azure-blob.yaml is not of type wasb".into());
                }
                v["spec"]["storage"]["objectStorage"]["bucket"] =
                    json!(azurite.bucket_url("shoal"));
                v["spec"]["storage"]["reclaimPolicy"] = json!("Delete");
                v["spec"]["readers"]["replicas"] = json!(1);
            }
            _ => {}
        }
        apply(client, disc, ns, &v).await?;
    }
    let vcs: Api<VectorCluster> = Api::namespaced(client.clone(), ns);
    wait_ready(&vcs, AZURE_CLUSTER, Some(1)).await?;
    let rest = Rest::new(service_url(client, ns, AZURE_CLUSTER).await?);
    wait_until("the azure router Service answers", timeout(), || {
        let rest = rest.clone();
        async move { Ok(rest.call("collections/list", json!({})).await.is_ok()) }
    })
    .await?;
    figure(
        "azure_blob_apply_to_ready_s",
        format!("{:.1}", t.elapsed().as_secs_f64()),
    );
    rest.call(
        "collections/create",
        json!({"collectionName": COLLECTION, "dimension": DIM, "metricType": "L2"}),
    )
    .await?;
    const N: usize = 5_000;
    let base = vectors(N, 11);
    let rows: Vec<Value> = base
        .chunks_exact(DIM)
        .enumerate()
        .map(|(i, v)| json!({"id": i as i64, "vector": v}))
        .collect();
    rest.call(
        "entities/insert",
        json!({"collectionName": COLLECTION, "data": rows}),
    )
    .await?;
    rest.flush_and_count(N as u64).await?;
    let queries = vectors(8, 98);
    let want: Vec<Vec<f32>> = queries
        .chunks_exact(DIM)
        .map(|q| oracle(&base, q))
        .collect();
    rest.check_exact(&base, &queries, &want)
        .await
        .map_err(|e| format!("azure-blob: {e}"))?;
    // The flushed segment's data went to Azurite as blobs (JuiceFS chunks).
    let blobs = azurite
        .list_objects("shoal")
        .map_err(err("listing Azurite's container"))?;
    let bytes: u64 = blobs.iter().map(|(_, n)| n).sum();
    if bytes < (N * DIM * 4) as u64 {
        return Err(format!(
            "Azurite's container holds {bytes} bytes in {} blobs after a flush of {N} rows",
            blobs.len()
        ));
    }
    figure("azure_blob_bytes_after_flush", bytes);
    eprintln!(
        "examples/azure-blob.yaml on Azurite: Ready, {N} rows flushed into {} blobs ({bytes} bytes), 8 searches exact",
        blobs.len()
    );
    delete_named_cluster(client, ns, AZURE_CLUSTER).await?;
    if let Some(name) = secret_name {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
        let _ = secrets.delete(&name, &DeleteParams::background()).await;
    }
    // The Delete finalizer waits until the CSI driver deleted the volume on Azurite: the PV
    // of this cluster is gone by now.
    drop(azurite);
    Ok(())
}

#[tokio::test]
#[ignore = "needs a Kubernetes cluster (KUBECONFIG) with Shoal's images on its nodes; `make test` runs it on ../shared/k8s"]
async fn the_chart_and_a_vector_cluster_survive_scaling_upgrades_plugin_and_writer_restarts_and_recreation()
 {
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "KUBECONFIG is not set: point it at a cluster (make test uses ../shared/k8s)"
    );
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
    // An aborted earlier run may have left the chart, a cluster and its retained data behind:
    // remove them (the leftover operator handles the cluster's finalizer), so this run's pods
    // run this run's images even when the tags did not change.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    if deployments
        .get_opt("shoal-operator")
        .await
        .expect("reading the operator Deployment")
        .is_some()
    {
        let (disc, docs) = install_chart(&client, &ns)
            .await
            .expect("the leftover chart");
        delete_cluster(&client, &ns)
            .await
            .expect("removing a leftover cluster");
        delete_named_cluster(&client, &ns, AZURE_CLUSTER)
            .await
            .expect("removing a leftover azure-blob cluster");
        remove_retained_data(&client, &ns)
            .await
            .expect("removing leftover retained data");
        uninstall_chart(&client, &disc, &ns, &docs)
            .await
            .expect("uninstalling the leftover chart");
    } else {
        // A cluster whose operator is gone cannot finish its finalizer; say so rather than hang.
        let vcs: Api<VectorCluster> = Api::namespaced(client.clone(), &ns);
        if let Ok(Some(vc)) = vcs.get_opt(CLUSTER).await {
            panic!(
                "namespace {ns} holds VectorCluster {} without an operator; delete it first",
                vc.name_any()
            );
        }
        remove_retained_data(&client, &ns)
            .await
            .expect("removing leftover retained data");
    }
    let t_install = Instant::now();
    let (disc, docs) = install_chart(&client, &ns)
        .await
        .expect("installing the chart");
    let outcome = scenario(&client, &disc, &ns, t_install).await;
    if outcome.is_err() {
        dump_diagnostics(&client, &ns, CLUSTER).await;
    }
    let cleanup = async {
        delete_cluster(&client, &ns).await?;
        delete_named_cluster(&client, &ns, AZURE_CLUSTER).await?;
        remove_retained_data(&client, &ns).await?;
        uninstall_chart(&client, &disc, &ns, &docs).await
    }
    .await;
    outcome.expect("the scenario");
    cleanup.expect("cleaning up");
}
