//! Every name, label, annotation and port the operator uses, in one place.
//!
//! Builders, apply and status take names from here so that the object a builder makes and the
//! object apply looks up can never disagree. Pure; depends only on the CRD types.

use std::collections::BTreeMap;

/// Field manager for server-side apply (one for everything the operator writes).
pub const FIELD_MANAGER: &str = "shoal-operator";
/// Finalizer added only when `storage.reclaimPolicy` is `Delete`.
pub const FINALIZER: &str = "shoal.dev/cleanup";
/// Label naming the VectorCluster an object belongs to.
pub const LABEL_CLUSTER: &str = "shoal.dev/cluster";
/// Label naming the component (writer, reader, router, mysql, redis, ...).
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
/// Standard labels.
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Value of `app.kubernetes.io/managed-by` and `app.kubernetes.io/name`.
pub const MANAGED_BY: &str = "shoal-operator";
pub const APP_NAME: &str = "shoal";
/// Annotation on every applied object: hash of what the operator applied, so an unchanged
/// object is not sent again (steady state makes no writes).
pub const ANNOTATION_APPLIED_HASH: &str = "shoal.dev/applied-hash";
/// Pod template annotation: hash of the engine ConfigMap, so a config change rolls the pods.
pub const ANNOTATION_CONFIG_HASH: &str = "shoal.dev/config-hash";
/// CSI driver of the shared volume.
pub const CSI_DRIVER: &str = "csi.shoal.dev";

/// Public REST port.
pub const PORT_REST: i32 = 19530;
/// Internal gRPC port.
pub const PORT_GRPC: i32 = 19531;
/// `/healthz`, `/readyz`, `/metrics` port.
pub const PORT_METRICS: i32 = 9091;
pub const PORT_MYSQL: i32 = 3306;
pub const PORT_REDIS: i32 = 6379;

/// Keys of the generated Secret.
pub const KEY_MYSQL_ROOT_PASSWORD: &str = "mysql-root-password";
pub const KEY_MYSQL_PASSWORD: &str = "mysql-password";
pub const KEY_META_URI: &str = "meta-uri";
pub const KEY_REDIS_PASSWORD: &str = "redis-password";
/// Database and user of a managed MySQL.
pub const MYSQL_DATABASE: &str = "shoal";
pub const MYSQL_USER: &str = "shoal";
/// Redis database index used for JuiceFS metadata.
pub const REDIS_DB: u32 = 1;
/// Redis database index for JuiceFS data blocks when `objectStorage.type` is `redis` and no
/// bucket is given (kept apart from the metadata database).
pub const REDIS_DATA_DB: u32 = 2;

/// Mount points inside engine containers.
pub const DATA_DIR: &str = "/data";
pub const WAL_DIR: &str = "/wal";

/// Components, as they appear in labels and names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Mysql,
    Redis,
    Storage,
    Config,
    Writer,
    Reader,
    Router,
}

impl Component {
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Mysql => "mysql",
            Component::Redis => "redis",
            Component::Storage => "storage",
            Component::Config => "config",
            Component::Writer => "writer",
            Component::Reader => "reader",
            Component::Router => "router",
        }
    }
}

/// Names of every object of one VectorCluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    pub cluster: String,
    pub namespace: String,
}

impl Names {
    pub fn new(cluster: &str, namespace: &str) -> Self {
        Self {
            cluster: cluster.to_string(),
            namespace: namespace.to_string(),
        }
    }
    /// Generated credentials (never overwritten once made).
    pub fn generated_secret(&self) -> String {
        format!("{}-credentials", self.cluster)
    }
    pub fn config_map(&self) -> String {
        format!("{}-engine-config", self.cluster)
    }
    pub fn mysql(&self) -> String {
        format!("{}-mysql", self.cluster)
    }
    pub fn redis(&self) -> String {
        format!("{}-redis", self.cluster)
    }
    /// Secret `csi.shoal.dev` reads (JuiceFS field names).
    pub fn juicefs_secret(&self) -> String {
        format!("{}-juicefs", self.cluster)
    }
    /// Cluster-scoped PersistentVolume: namespaced to stay unique across namespaces.
    pub fn shared_pv(&self) -> String {
        format!("shoal-{}-{}-data", self.namespace, self.cluster)
    }
    pub fn shared_pvc(&self) -> String {
        format!("{}-data", self.cluster)
    }
    /// CSI volume handle (also the JuiceFS subdirectory).
    pub fn volume_handle(&self) -> String {
        format!("{}-{}", self.namespace, self.cluster)
    }
    /// JuiceFS filesystem name (`juicefs format NAME`).
    pub fn juicefs_name(&self) -> String {
        format!("shoal-{}", self.cluster)
    }
    pub fn writer(&self) -> String {
        format!("{}-writer", self.cluster)
    }
    pub fn readers(&self) -> String {
        format!("{}-reader", self.cluster)
    }
    /// Headless Service for reader discovery.
    pub fn readers_headless(&self) -> String {
        format!("{}-readers", self.cluster)
    }
    pub fn readers_pdb(&self) -> String {
        format!("{}-reader", self.cluster)
    }
    pub fn router(&self) -> String {
        format!("{}-router", self.cluster)
    }
    /// The public Service carries the cluster's own name.
    pub fn router_service(&self) -> String {
        self.cluster.clone()
    }
    pub fn svc_host(&self, service: &str) -> String {
        format!("{service}.{}.svc", self.namespace)
    }
    /// The writer's gRPC address for the router.
    pub fn writer_grpc_addr(&self) -> String {
        format!("{}:{PORT_GRPC}", self.svc_host(&self.writer()))
    }
    /// `NAME:PORT` the router resolves for readers.
    pub fn readers_dns(&self) -> String {
        format!("{}:{PORT_GRPC}", self.svc_host(&self.readers_headless()))
    }
    pub fn endpoint(&self, port: i32) -> String {
        format!("http://{}:{port}", self.svc_host(&self.router_service()))
    }

    /// Labels that select every object of this cluster (orphan sweep, cleanup).
    pub fn cluster_selector(&self) -> String {
        format!(
            "{LABEL_CLUSTER}={},{LABEL_MANAGED_BY}={MANAGED_BY}",
            self.cluster
        )
    }
    /// Labels on every object of a component.
    pub fn labels(&self, component: Component) -> BTreeMap<String, String> {
        let mut l = self.selector_labels(component);
        l.insert(LABEL_MANAGED_BY.into(), MANAGED_BY.into());
        l
    }
    /// Labels a component's pods are selected by (immutable in workload selectors).
    pub fn selector_labels(&self, component: Component) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_NAME.to_string(), APP_NAME.to_string()),
            (LABEL_INSTANCE.to_string(), self.cluster.clone()),
            (LABEL_CLUSTER.to_string(), self.cluster.clone()),
            (LABEL_COMPONENT.to_string(), component.as_str().to_string()),
        ])
    }
    /// Selector string of the reader pods, reported in status for the scale subresource.
    pub fn readers_selector_string(&self) -> String {
        self.selector_labels(Component::Reader)
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_prefixed_by_the_cluster_and_pv_is_unique_per_namespace() {
        let n = Names::new("demo", "team-a");
        assert_eq!(n.writer(), "demo-writer");
        assert_eq!(n.shared_pv(), "shoal-team-a-demo-data");
        assert_eq!(n.readers_dns(), "demo-readers.team-a.svc:19531");
        assert_eq!(
            n.readers_selector_string(),
            "app.kubernetes.io/component=reader,app.kubernetes.io/instance=demo,app.kubernetes.io/name=shoal,shoal.dev/cluster=demo"
        );
    }
}
