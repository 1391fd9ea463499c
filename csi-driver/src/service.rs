//! The gRPC face: tonic's Identity, Controller and Node traits over a [`Driver`], served on a
//! unix socket, plus the watchdog task.
//!
//! Owns: running each blocking driver method off the async runtime, counting calls and errors,
//! logging outcomes (volume ids, paths and codes only — never a request's `Debug`, which would
//! print secrets) and scrubbing every status message with the call's secrets. Must not hold
//! CSI logic; that lives in [`crate::driver`].

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tokio::net::UnixListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::authority_shim;
use crate::csi;
use crate::csi::controller_server::{Controller, ControllerServer};
use crate::csi::identity_server::{Identity, IdentityServer};
use crate::csi::node_server::{Node, NodeServer};
use crate::driver::Driver;
use crate::error::CsiError;
use crate::mounter::Mounter;
use crate::secrets::{Scrubber, keys};
use crate::{DRIVER_NAME, VERSION};

/// All three CSI services over one driver.
pub struct CsiService<M: Mounter> {
    driver: Arc<Driver<M>>,
}

impl<M: Mounter> Clone for CsiService<M> {
    fn clone(&self) -> Self {
        Self {
            driver: self.driver.clone(),
        }
    }
}

/// A scrubber for a request's secrets plus any secret-named key of its volume context.
fn scrubber_for(secrets: &HashMap<String, String>, context: &HashMap<String, String>) -> Scrubber {
    let secret_keys = [
        keys::METAURL,
        keys::ACCESS_KEY,
        keys::SECRET_KEY,
        keys::BUCKET,
        keys::ENVS,
    ];
    let from_context: HashMap<String, String> = context
        .iter()
        .filter(|(k, _)| secret_keys.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Scrubber::from_map(secrets).merge(&Scrubber::from_map(&from_context))
}

impl<M: Mounter> CsiService<M> {
    /// Services over `driver`.
    pub fn new(driver: Arc<Driver<M>>) -> Self {
        Self { driver }
    }

    async fn run<T, F>(
        &self,
        method: &'static str,
        volume_id: &str,
        scrubber: Scrubber,
        f: F,
    ) -> Result<Response<T>, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Driver<M>) -> Result<T, CsiError> + Send + 'static,
    {
        let driver = self.driver.clone();
        driver.metrics.call(method);
        let started = Instant::now();
        let outcome = tokio::task::spawn_blocking(move || f(&driver)).await;
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        let status = match outcome {
            Ok(Ok(value)) => {
                debug!(method, volume_id, elapsed_ms, "ok");
                return Ok(Response::new(value));
            }
            Ok(Err(e)) => {
                let category = e.category();
                let status = e.into_status(&scrubber);
                warn!(method, volume_id, elapsed_ms, code = ?status.code(), category, message = status.message(), "failed");
                status
            }
            Err(join) => {
                warn!(method, volume_id, "handler panicked: {}", join.is_panic());
                Status::internal("internal error in the CSI handler")
            }
        };
        self.driver.metrics.error(method, status.code());
        Err(status)
    }
}

#[tonic::async_trait]
impl<M: Mounter> Identity for CsiService<M> {
    /// GetPluginInfo: the driver name and version. Stateless, so trivially idempotent.
    async fn get_plugin_info(
        &self,
        _req: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        self.driver.metrics.call("GetPluginInfo");
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: DRIVER_NAME.to_string(),
            vendor_version: VERSION.to_string(),
            manifest: HashMap::new(),
        }))
    }

    /// GetPluginCapabilities: CONTROLLER_SERVICE when this process serves it.
    async fn get_plugin_capabilities(
        &self,
        _req: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        use csi::plugin_capability::{Service, Type, service};
        self.driver.metrics.call("GetPluginCapabilities");
        let mut capabilities = Vec::new();
        if self.driver.config.mode.controller() {
            capabilities.push(csi::PluginCapability {
                r#type: Some(Type::Service(Service {
                    r#type: service::Type::ControllerService as i32,
                })),
            });
        }
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    /// Probe: `ready = true` only when the `juicefs` binary runs and the state dir is writable;
    /// otherwise a successful response with `ready = false` ("still initializing").
    async fn probe(
        &self,
        _req: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        self.driver.metrics.call("Probe");
        let driver = self.driver.clone();
        let ready = match tokio::task::spawn_blocking(move || driver.probe()).await {
            Ok(Ok(())) => true,
            Ok(Err(reason)) => {
                warn!(reason, "probe: not ready");
                false
            }
            Err(_) => false,
        };
        Ok(Response::new(csi::ProbeResponse { ready: Some(ready) }))
    }
}

#[tonic::async_trait]
impl<M: Mounter> Controller for CsiService<M> {
    /// See [`Driver::create_volume`] for the spec's idempotency rule.
    async fn create_volume(
        &self,
        req: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let req = req.into_inner();
        let scrub = scrubber_for(&req.secrets, &HashMap::new());
        let name = req.name.clone();
        self.run("CreateVolume", &name, scrub, move |d| {
            d.create_volume(req)
                .map(|v| csi::CreateVolumeResponse { volume: Some(v) })
        })
        .await
    }

    /// See [`Driver::delete_volume`] for the spec's idempotency rule.
    async fn delete_volume(
        &self,
        req: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let req = req.into_inner();
        let scrub = scrubber_for(&req.secrets, &HashMap::new());
        let id = req.volume_id.clone();
        self.run("DeleteVolume", &id, scrub, move |d| {
            d.delete_volume(req).map(|()| csi::DeleteVolumeResponse {})
        })
        .await
    }

    /// See [`Driver::validate_volume_capabilities`].
    async fn validate_volume_capabilities(
        &self,
        req: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = req.into_inner();
        let scrub = scrubber_for(&req.secrets, &req.volume_context);
        let id = req.volume_id.clone();
        self.run("ValidateVolumeCapabilities", &id, scrub, move |d| {
            d.validate_volume_capabilities(req)
        })
        .await
    }

    /// ControllerGetCapabilities: CREATE_DELETE_VOLUME. Stateless.
    async fn controller_get_capabilities(
        &self,
        _req: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        use csi::controller_service_capability::{Rpc, Type, rpc};
        self.driver.metrics.call("ControllerGetCapabilities");
        let capabilities = [rpc::Type::CreateDeleteVolume]
            .into_iter()
            .map(|t| csi::ControllerServiceCapability {
                r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
            })
            .collect();
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }
}

#[tonic::async_trait]
impl<M: Mounter> Node for CsiService<M> {
    /// See [`Driver::stage`] for the spec's idempotency rule.
    async fn node_stage_volume(
        &self,
        req: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let req = req.into_inner();
        let scrub = scrubber_for(&req.secrets, &req.volume_context);
        let id = req.volume_id.clone();
        self.run("NodeStageVolume", &id, scrub, move |d| {
            d.stage(req).map(|()| csi::NodeStageVolumeResponse {})
        })
        .await
    }

    /// See [`Driver::unstage`] for the spec's idempotency rule.
    async fn node_unstage_volume(
        &self,
        req: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let req = req.into_inner();
        let id = req.volume_id.clone();
        self.run("NodeUnstageVolume", &id, Scrubber::default(), move |d| {
            d.unstage(req).map(|()| csi::NodeUnstageVolumeResponse {})
        })
        .await
    }

    /// See [`Driver::publish`] for the spec's idempotency rule.
    async fn node_publish_volume(
        &self,
        req: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let scrub = scrubber_for(&req.secrets, &req.volume_context);
        let id = req.volume_id.clone();
        self.run("NodePublishVolume", &id, scrub, move |d| {
            d.publish(req).map(|()| csi::NodePublishVolumeResponse {})
        })
        .await
    }

    /// See [`Driver::unpublish`] for the spec's idempotency rule.
    async fn node_unpublish_volume(
        &self,
        req: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let id = req.volume_id.clone();
        self.run("NodeUnpublishVolume", &id, Scrubber::default(), move |d| {
            d.unpublish(req)
                .map(|()| csi::NodeUnpublishVolumeResponse {})
        })
        .await
    }

    /// NodeGetVolumeStats: bytes and inodes; reads only, so repeatable.
    async fn node_get_volume_stats(
        &self,
        req: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let req = req.into_inner();
        let id = req.volume_id.clone();
        self.run("NodeGetVolumeStats", &id, Scrubber::default(), move |d| {
            d.volume_stats(req)
                .map(|usage| csi::NodeGetVolumeStatsResponse {
                    usage,
                    volume_condition: None,
                })
        })
        .await
    }

    /// See [`Driver::expand`]: success without work, so a kubelet's resize never fails a mount.
    async fn node_expand_volume(
        &self,
        req: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let req = req.into_inner();
        let scrub = scrubber_for(&req.secrets, &HashMap::new());
        let id = req.volume_id.clone();
        self.run("NodeExpandVolume", &id, scrub, move |d| {
            d.expand(req)
                .map(|capacity_bytes| csi::NodeExpandVolumeResponse { capacity_bytes })
        })
        .await
    }

    /// NodeGetCapabilities: STAGE_UNSTAGE_VOLUME, GET_VOLUME_STATS and EXPAND_VOLUME (see
    /// [`Driver::expand`]). Stateless.
    async fn node_get_capabilities(
        &self,
        _req: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        use csi::node_service_capability::{Rpc, Type, rpc};
        self.driver.metrics.call("NodeGetCapabilities");
        let capabilities = [
            rpc::Type::StageUnstageVolume,
            rpc::Type::GetVolumeStats,
            rpc::Type::ExpandVolume,
        ]
        .into_iter()
        .map(|t| csi::NodeServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities,
        }))
    }

    /// NodeGetInfo: this node's id, a positive volume limit (the kubelet rejects 0; see
    /// [`crate::driver::DEFAULT_MAX_VOLUMES_PER_NODE`]); no topology (the filesystem is
    /// reachable from every node).
    async fn node_get_info(
        &self,
        _req: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        self.driver.metrics.call("NodeGetInfo");
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.driver.config.node_id.clone(),
            max_volumes_per_node: self.driver.config.max_volumes_per_node,
            accessible_topology: None,
        }))
    }
}

/// A failure to start serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The endpoint is not `unix://PATH`.
    #[error("endpoint {0:?} must be unix:///absolute/path")]
    BadEndpoint(String),
    /// The socket could not be bound.
    #[error("cannot listen on {path:?}: {source}")]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Parses `unix:///path`, `unix:/path` or `/path`.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, ServeError> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if path.starts_with('/') {
        Ok(PathBuf::from(path))
    } else {
        Err(ServeError::BadEndpoint(endpoint.to_string()))
    }
}

/// How accepted connections reach tonic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Front {
    /// Through [`authority_shim`], which replaces the socket-path `:authority` that kubelets
    /// before 1.26 send (h2 rejects it). The default.
    #[default]
    AuthorityShim,
    /// Straight to tonic: only for clients that send a valid `:authority` (kubelet >= 1.26).
    Direct,
}

/// Binds the unix socket (replacing a stale one) and serves until `shutdown` resolves, each
/// connection through `front`.
pub async fn serve<M: Mounter>(
    driver: Arc<Driver<M>>,
    socket: &Path,
    front: Front,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let listen_err = |source| ServeError::Listen {
        path: socket.to_path_buf(),
        source,
    };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(listen_err)?;
    }
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(listen_err(e)),
    }
    let listener = UnixListener::bind(socket).map_err(listen_err)?;
    let mode = driver.config.mode;
    let svc = CsiService::new(driver);
    info!(socket = %socket.display(), ?mode, ?front, "serving CSI");
    let router = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(svc.clone()))
        .add_optional_service(
            mode.controller()
                .then(|| ControllerServer::new(svc.clone())),
        )
        .add_optional_service(mode.node().then(|| NodeServer::new(svc.clone())));
    let accepted = UnixListenerStream::new(listener);
    match front {
        Front::AuthorityShim => {
            let incoming = accepted.map(|conn| conn.map(authority_shim::front));
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await?
        }
        Front::Direct => {
            router
                .serve_with_incoming_shutdown(accepted, shutdown)
                .await?
        }
    }
    Ok(())
}

/// Runs the watchdog forever: a pass every `config.watchdog_interval`, and at once when a
/// `juicefs mount` process started by this process exits.
pub async fn watchdog<M: Mounter>(driver: Arc<Driver<M>>, wake: Arc<tokio::sync::Notify>) {
    let interval = driver.config.watchdog_interval;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = wake.notified() => {}
        }
        let d = driver.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || d.reconcile()).await {
            warn!("watchdog pass panicked: {e}");
        }
    }
}
