//! shoal-operator: turns a `VectorCluster` into a running Shoal cluster.
//!
//! Pipeline per reconcile: [`validate`] → [`build`] (pure) → [`apply`] (server-side apply,
//! fixed order, orphan sweep) → [`status`] (conditions). [`controller`] wires it to kube-runtime;
//! [`metrics`] and [`leader`] serve the process around it.

pub mod apply;
pub mod build;
pub mod controller;
pub mod crd;
pub mod crd_docs;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod status;
pub mod validate;
