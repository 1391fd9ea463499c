//! shoal-csi: a CSI v1 driver that provisions volumes as directories of a JuiceFS filesystem and
//! mounts them into pods.
//!
//! Layers, outermost first: [`authority_shim`] (HTTP/2 front that makes kubelets < 1.26 work)
//! → [`service`] (tonic, unix socket, watchdog task) → [`driver`] (CSI logic, blocking) →
//! [`mounter`] (the `Mounter` seam: `juicefs` and mount(2)), or [`mountpod`] (the same seam with
//! one mount pod per staged filesystem, so the client outlives the plugin's container). Pure
//! helpers:
//! [`mountinfo`], [`validate`], [`secrets`], [`error`]. See README.md for the design and its
//! remaining limit.

pub mod authority_shim;
pub mod driver;
pub mod error;
pub mod guard;
pub mod metrics;
pub mod mounter;
pub mod mountinfo;
pub mod mountpod;
pub mod release;
pub mod secrets;
pub mod service;
pub mod state;
pub mod validate;

/// The CSI driver name (`GetPluginInfo.name`, the `CSIDriver` object, StorageClass provisioner).
pub const DRIVER_NAME: &str = "csi.shoal.dev";

/// `GetPluginInfo.vendor_version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The CSI v1 messages and gRPC stubs generated from `proto/csi.proto`.
#[allow(clippy::all, missing_docs)]
pub mod csi {
    tonic::include_proto!("csi.v1");
}
