//! GPU readers: NVML telemetry ([`telemetry`]), GPU FLAT / IVF_FLAT list-scan search
//! ([`search`]) through the small device trait in [`backend`], implemented with CUDA in
//! [`cuda`] (driver, cuBLAS and NVRTC loaded at run time; only with the `gpu` feature), and the
//! reader's hook into the replica search ([`offload`]: threshold routing, CPU fallback).
//! The pure parts ([`args`], [`budget`], [`plan`], the searcher's orchestration) are tested in CI
//! without a GPU.
//!
//! Depends on `core` (types, bitset, distance, the `VectorIndexRead` trait) and never on the
//! API/role layers; a reader builds one [`GpuRuntime`] at start and asks it for the searcher and
//! the `/readyz` details. No GPU, no NVML or no CUDA libraries is never an error: the runtime
//! says why and the reader searches on the CPU.

pub mod args;
pub mod backend;
pub mod budget;
#[cfg(feature = "gpu")]
pub mod cuda;
pub mod offload;
pub mod plan;
pub mod search;
pub mod telemetry;

pub use args::{DeviceSelection, GpuArgs};
pub use offload::GpuOffload;
pub use search::{GpuSearch, GpuSearcher, IvfList, ResidentStats};
pub use telemetry::{GpuInventory, GpuTelemetry};

use crate::gpu::backend::GpuBackend;
use crate::gpu::telemetry::GpuLabels;
use prometheus_client::registry::Registry;
use serde::Serialize;
use std::sync::Arc;

/// Errors from GPU setup and GPU search. Every one of them makes the caller answer on the CPU.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// A CUDA library could not be loaded (no driver, no toolkit libraries on the search path).
    #[error(
        "CUDA unavailable: cannot load {library}; set LD_LIBRARY_PATH to the CUDA libraries or run without GPU search"
    )]
    CudaUnavailable { library: &'static str },
    /// The driver loaded but reports no device, or `--gpu-devices none` left none.
    #[error("no CUDA device to search on")]
    NoDevices,
    /// `--gpu-devices` does not match the machine.
    #[error(transparent)]
    SelectDevices(#[from] args::GpuArgsError),
    #[error("failed to open CUDA device {ordinal}: {reason}")]
    OpenDevice { ordinal: u32, reason: String },
    #[error("failed to compile the top-k kernel with NVRTC: {reason}")]
    CompileKernel { reason: String },
    #[error("failed to allocate {bytes} bytes on CUDA device {ordinal}: {reason}")]
    Allocate {
        ordinal: u32,
        bytes: u64,
        reason: String,
    },
    #[error("failed to copy between host and CUDA device {ordinal}: {reason}")]
    Copy { ordinal: u32, reason: String },
    #[error("cuBLAS SGEMM failed on CUDA device {ordinal}: {reason}")]
    Gemm { ordinal: u32, reason: String },
    #[error("top-k kernel failed on CUDA device {ordinal}: {reason}")]
    LaunchKernel { ordinal: u32, reason: String },
    /// A block does not fit the per-device memory budget.
    #[error(transparent)]
    Budget(#[from] budget::ExceedsBudget),
    /// The per-device workspace cannot hold one query's tile.
    #[error(transparent)]
    Workspace(#[from] plan::WorkspaceTooSmall),
    /// The request's shapes are inconsistent or outside what the GPU path serves.
    #[error("invalid GPU search request: {reason}")]
    InvalidRequest { reason: String },
    /// The device answered with something the CPU index could not have (a row outside the
    /// segment, a filtered-out row, too many or unsorted hits).
    #[error("GPU search returned an invalid result: {reason}")]
    InvalidResult { reason: String },
}

/// GPU part of `/readyz`: which mode this reader searches in and what it has.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuStatus {
    /// `"gpu"` when searches at or above the threshold run on a GPU, else `"cpu"`.
    pub mode: &'static str,
    /// Why the reader is in CPU mode (or why telemetry is off).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    pub search_threshold: usize,
    pub driver_version: Option<String>,
    pub cuda_driver_version: Option<String>,
    pub devices: Vec<telemetry::GpuInfo>,
    pub samples: Vec<telemetry::GpuSample>,
    pub resident: Vec<ResidentStats>,
}

/// What a reader holds for GPUs: telemetry always, a searcher when CUDA search is possible.
pub struct GpuRuntime {
    telemetry: Arc<GpuTelemetry>,
    searcher: Option<Arc<dyn GpuSearch>>,
    search_off_reason: Option<String>,
    threshold: usize,
}

impl GpuRuntime {
    /// Discover GPUs (NVML) and open the CUDA devices `args` selects. Never fails: without NVML,
    /// CUDA libraries or devices it logs why and returns a CPU-mode runtime.
    pub fn start(args: &GpuArgs) -> Self {
        let telemetry = Arc::new(GpuTelemetry::discover());
        #[cfg(feature = "gpu")]
        {
            Self::start_with(args, telemetry, cuda::probe)
        }
        #[cfg(not(feature = "gpu"))]
        {
            Self::start_with(
                args,
                telemetry,
                |_: &DeviceSelection| -> Result<Vec<NoBackend>, GpuError> {
                    Err(GpuError::CudaUnavailable {
                        library: "CUDA (built without the `gpu` feature)",
                    })
                },
            )
        }
    }

    /// Telemetry without GPU search, for a role whose searches run on the CPU (standalone today):
    /// NVML discovery as in [`GpuRuntime::start`] (skipped with `--gpu-devices none`), no CUDA
    /// device is opened, and `/readyz` reports CPU mode with `why_cpu` as the reason.
    pub fn telemetry_only(args: &GpuArgs, why_cpu: &str) -> Self {
        let telemetry = if args.gpu_devices == DeviceSelection::None {
            let reason = "GPU telemetry off (--gpu-devices none)".to_string();
            tracing::info!("{reason}");
            GpuTelemetry::off(reason)
        } else {
            GpuTelemetry::discover()
        };
        Self::without_search(args, Arc::new(telemetry), why_cpu.to_string())
    }

    fn without_search(args: &GpuArgs, telemetry: Arc<GpuTelemetry>, reason: String) -> Self {
        Self {
            telemetry,
            searcher: None,
            search_off_reason: Some(reason),
            threshold: args.gpu_search_threshold,
        }
    }

    /// [`GpuRuntime::start`] with the device probe supplied (tests and other backends).
    pub fn start_with<B: GpuBackend>(
        args: &GpuArgs,
        telemetry: Arc<GpuTelemetry>,
        probe: impl FnOnce(&DeviceSelection) -> Result<Vec<B>, GpuError>,
    ) -> Self {
        let threshold = args.gpu_search_threshold;
        let opened = if args.gpu_devices == DeviceSelection::None {
            Err("GPU search disabled by --gpu-devices none".to_string())
        } else {
            probe(&args.gpu_devices)
                .and_then(|b| {
                    GpuSearcher::new(b, args.gpu_memory_budget, threshold, args.gpu_workspace)
                })
                .map_err(|e| e.to_string())
        };
        match opened {
            Ok(s) => {
                let names: Vec<String> = s
                    .backends()
                    .map(|b| format!("{}:{}", b.ordinal(), b.name()))
                    .collect();
                tracing::info!(devices = ?names, budget = args.gpu_memory_budget, threshold, "GPU search enabled");
                Self {
                    telemetry,
                    searcher: Some(Arc::new(s)),
                    search_off_reason: None,
                    threshold,
                }
            }
            Err(reason) => {
                tracing::warn!("GPU search off, searching on the CPU: {reason}");
                Self::without_search(args, telemetry, reason)
            }
        }
    }

    /// The GPU searcher, when GPU search is on.
    pub fn searcher(&self) -> Option<Arc<dyn GpuSearch>> {
        self.searcher.clone()
    }

    pub fn telemetry(&self) -> &Arc<GpuTelemetry> {
        &self.telemetry
    }

    /// Register the `shoal_gpu_*` gauges into `registry`.
    pub fn register_metrics(&self, registry: &mut Registry) {
        self.telemetry.register(registry);
    }

    /// Refresh the gauges (NVML sample and residency) and build the `/readyz` details.
    pub fn status(&self) -> GpuStatus {
        let samples = self.telemetry.sample();
        let resident = self
            .searcher
            .as_ref()
            .map(|s| s.resident())
            .unwrap_or_default();
        let inv = self.telemetry.inventory();
        let m = self.telemetry.metrics();
        for r in &resident {
            let name = inv
                .devices
                .iter()
                .find(|d| d.index == r.ordinal)
                .map(|d| d.name.clone())
                .unwrap_or_else(|| r.name.clone());
            let l = GpuLabels {
                gpu: r.ordinal.to_string(),
                name,
            };
            m.resident_bytes.get_or_create(&l).set(r.used_bytes as f64);
            m.resident_budget_bytes
                .get_or_create(&l)
                .set(r.budget_bytes as f64);
        }
        let reasons = [self.search_off_reason.clone(), inv.unavailable.clone()]
            .into_iter()
            .flatten()
            .collect();
        GpuStatus {
            mode: if self.searcher.is_some() {
                "gpu"
            } else {
                "cpu"
            },
            reasons,
            search_threshold: self.threshold,
            driver_version: inv.driver_version.clone(),
            cuda_driver_version: inv.cuda_driver_version.clone(),
            devices: inv.devices.clone(),
            samples,
            resident,
        }
    }
}

/// Placeholder backend type for builds without the `gpu` feature: never constructed.
#[cfg(not(feature = "gpu"))]
pub enum NoBackend {}

#[cfg(not(feature = "gpu"))]
impl GpuBackend for NoBackend {
    type Block = ();
    type Queries = ();
    type Mask = ();
    fn ordinal(&self) -> u32 {
        match *self {}
    }
    fn name(&self) -> &str {
        match *self {}
    }
    fn upload_block(
        &self,
        _: &[f32],
        _: usize,
        _: crate::core::types::Metric,
    ) -> Result<(), GpuError> {
        match *self {}
    }
    fn upload_queries(
        &self,
        _: &[f32],
        _: usize,
        _: crate::core::types::Metric,
    ) -> Result<(), GpuError> {
        match *self {}
    }
    fn upload_mask(&self, _: &crate::core::bitset::Bitset) -> Result<(), GpuError> {
        match *self {}
    }
    fn tile_topk(
        &self,
        _: &(),
        _: std::ops::Range<usize>,
        _: &(),
        _: usize,
        _: Option<&()>,
    ) -> Result<Vec<Vec<crate::core::types::Neighbor>>, GpuError> {
        match *self {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::backend::host::HostBackend;

    fn no_nvml() -> Arc<GpuTelemetry> {
        Arc::new(GpuTelemetry::discover_with(Some(std::ffi::OsStr::new(
            "/nonexistent/libnvidia-ml.so.1",
        ))))
    }

    #[test]
    fn runtime_falls_back_to_cpu_mode_with_the_probe_error_as_reason() {
        let rt = GpuRuntime::start_with(
            &GpuArgs::default(),
            no_nvml(),
            |_| -> Result<Vec<HostBackend>, GpuError> {
                Err(GpuError::CudaUnavailable {
                    library: "libcuda.so.1",
                })
            },
        );
        assert!(rt.searcher().is_none());
        let st = rt.status();
        assert_eq!(st.mode, "cpu");
        assert!(
            st.reasons.iter().any(|r| r.contains("libcuda.so.1")),
            "{:?}",
            st.reasons
        );
        let json = serde_json::to_value(&st).unwrap();
        assert_eq!(json["mode"], "cpu");
        assert_eq!(json["search_threshold"], 1000);
    }

    #[test]
    fn runtime_with_devices_none_never_probes() {
        let args = GpuArgs {
            gpu_devices: DeviceSelection::None,
            ..GpuArgs::default()
        };
        let rt = GpuRuntime::start_with(
            &args,
            no_nvml(),
            |_| -> Result<Vec<HostBackend>, GpuError> {
                panic!("probe must not run with --gpu-devices none")
            },
        );
        assert!(rt.searcher().is_none());
        assert!(
            rt.status()
                .reasons
                .iter()
                .any(|r| r.contains("--gpu-devices none"))
        );
    }

    #[test]
    fn runtime_with_a_working_backend_searches_on_it_and_reports_residency_in_metrics() {
        let args = GpuArgs {
            gpu_search_threshold: 2,
            ..GpuArgs::default()
        };
        let rt = GpuRuntime::start_with(&args, no_nvml(), |sel| {
            assert_eq!(sel, &DeviceSelection::All);
            Ok(vec![HostBackend::new(0)])
        });
        let s = rt.searcher().unwrap();
        assert_eq!(s.threshold(), 2);
        let hits = s
            .search_flat(
                1,
                &[0.0, 0.0, 1.0, 1.0],
                2,
                crate::core::types::Metric::L2,
                &[0.9, 0.9],
                1,
                None,
            )
            .unwrap();
        assert_eq!(hits[0][0].row, 1);
        let st = rt.status();
        assert_eq!(st.mode, "gpu");
        assert_eq!(st.resident[0].blocks, 1);
        let mut reg = Registry::default();
        rt.register_metrics(&mut reg);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(
            text.contains("shoal_gpu_resident_bytes{gpu=\"0\",name=\"host\"} 24"),
            "{text}"
        );
    }
}
