//! The engine ConfigMap: settings every engine process reads from `SHOAL_*` environment
//! variables (`envFrom`). Its content hash goes on the pod templates, so a change rolls them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;

use super::{object_meta, stamp};
use crate::names::{Component, DATA_DIR};
use crate::validate::ValidatedCluster;

pub fn build_config_map(vc: &ValidatedCluster) -> ConfigMap {
    let spec = &vc.spec;
    let data = BTreeMap::from([
        ("SHOAL_DATA_DIR".to_string(), DATA_DIR.to_string()),
        (
            "SHOAL_FLUSH_INTERVAL".to_string(),
            spec.engine.flush_interval.clone(),
        ),
        // The engine's log filter is the standard tracing one.
        ("RUST_LOG".to_string(), spec.engine.log_level.clone()),
        (
            "SHOAL_REPLICATION".to_string(),
            spec.readers.replication_factor.to_string(),
        ),
    ]);
    stamp(
        ConfigMap {
            metadata: object_meta(vc, vc.names.config_map(), Component::Config),
            data: Some(data),
            ..ConfigMap::default()
        },
        |c| &mut c.metadata,
    )
}
