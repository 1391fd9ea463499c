//! NVML discovery and sampling: what GPUs this reader has (count, model, memory, driver,
//! compute capability) and their live memory/utilisation/temperature/power as Prometheus
//! gauges and as `/readyz` details. NVML is loaded at run time (nvml-wrapper); when the library
//! is missing, or the crate is built without the `gpu` feature, discovery logs one line and the
//! reader runs in CPU mode. Nothing here may panic or fail the process.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Static facts about one GPU, read once at start.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub memory_total_bytes: u64,
    /// `"9.0"` for an H100.
    pub compute_capability: String,
}

/// One sample of one GPU; a field is `None` when NVML does not support it on that device.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GpuSample {
    pub index: u32,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub utilization_percent: Option<u32>,
    pub temperature_celsius: Option<u32>,
    pub power_watts: Option<f64>,
}

/// Result of NVML discovery: either GPUs, or why there are none.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuInventory {
    pub driver_version: Option<String>,
    /// CUDA version the driver supports, e.g. `"12.4"`.
    pub cuda_driver_version: Option<String>,
    pub devices: Vec<GpuInfo>,
    /// Set when NVML could not be used; the reader is in CPU mode for telemetry.
    pub unavailable: Option<String>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuLabels {
    pub gpu: String,
    pub name: String,
}

/// Labels of `shoal_gpu_device_info`: the static facts of one GPU.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuInfoLabels {
    pub gpu: String,
    pub name: String,
    pub uuid: String,
    pub compute_capability: String,
}

/// Labels of `shoal_gpu_driver_info`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriverLabels {
    pub driver_version: String,
    pub cuda_driver_version: String,
}

/// The per-GPU gauges, registered under the `shoal_gpu` prefix.
#[derive(Debug, Clone, Default)]
pub struct GpuMetrics {
    pub devices: Gauge,
    /// Always 1, one series per GPU; the labels carry model, UUID and compute capability.
    pub device_info: Family<GpuInfoLabels, Gauge>,
    /// Always 1 when NVML answered; the labels carry the driver and its CUDA version.
    pub driver_info: Family<DriverLabels, Gauge>,
    pub memory_used_bytes: Family<GpuLabels, Gauge<f64, AtomicU64>>,
    pub memory_total_bytes: Family<GpuLabels, Gauge<f64, AtomicU64>>,
    pub utilization_ratio: Family<GpuLabels, Gauge<f64, AtomicU64>>,
    pub temperature_celsius: Family<GpuLabels, Gauge<f64, AtomicU64>>,
    pub power_watts: Family<GpuLabels, Gauge<f64, AtomicU64>>,
    pub resident_bytes: Family<GpuLabels, Gauge<f64, AtomicU64>>,
    pub resident_budget_bytes: Family<GpuLabels, Gauge<f64, AtomicU64>>,
}

impl GpuMetrics {
    /// Register every gauge into `registry` (as `shoal_gpu_*`).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("shoal_gpu");
        r.register(
            "devices",
            "GPUs discovered through NVML",
            self.devices.clone(),
        );
        r.register(
            "device_info",
            "One series per discovered GPU (value 1): model, UUID, compute capability",
            self.device_info.clone(),
        );
        r.register(
            "driver_info",
            "NVIDIA driver and the CUDA version it supports (value 1); absent without NVML",
            self.driver_info.clone(),
        );
        r.register(
            "memory_used_bytes",
            "GPU memory in use (NVML)",
            self.memory_used_bytes.clone(),
        );
        r.register(
            "memory_total_bytes",
            "GPU memory installed (NVML)",
            self.memory_total_bytes.clone(),
        );
        r.register(
            "utilization_ratio",
            "GPU busy fraction over NVML's last sample period",
            self.utilization_ratio.clone(),
        );
        r.register(
            "temperature_celsius",
            "GPU core temperature",
            self.temperature_celsius.clone(),
        );
        r.register(
            "power_watts",
            "GPU board power draw",
            self.power_watts.clone(),
        );
        r.register(
            "resident_bytes",
            "Segment vectors and IVF lists resident on the GPU",
            self.resident_bytes.clone(),
        );
        r.register(
            "resident_budget_bytes",
            "GPU memory budget for resident vectors (--gpu-memory-budget)",
            self.resident_budget_bytes.clone(),
        );
    }

    /// Write what discovery found: the GPU count (0 without NVML) and the info series.
    pub fn record_inventory(&self, inv: &GpuInventory) {
        self.devices
            .set(i64::try_from(inv.devices.len()).unwrap_or(i64::MAX));
        self.device_info.clear();
        for d in &inv.devices {
            self.device_info
                .get_or_create(&GpuInfoLabels {
                    gpu: d.index.to_string(),
                    name: d.name.clone(),
                    uuid: d.uuid.clone(),
                    compute_capability: d.compute_capability.clone(),
                })
                .set(1);
        }
        self.driver_info.clear();
        if let Some(driver) = &inv.driver_version {
            self.driver_info
                .get_or_create(&DriverLabels {
                    driver_version: driver.clone(),
                    cuda_driver_version: inv.cuda_driver_version.clone().unwrap_or_default(),
                })
                .set(1);
        }
    }

    /// Write one sample into the gauges.
    pub fn record(&self, info: &GpuInfo, s: &GpuSample) {
        let l = GpuLabels {
            gpu: info.index.to_string(),
            name: info.name.clone(),
        };
        if let Some(v) = s.memory_used_bytes {
            self.memory_used_bytes.get_or_create(&l).set(v as f64);
        }
        if let Some(v) = s.memory_total_bytes {
            self.memory_total_bytes.get_or_create(&l).set(v as f64);
        }
        if let Some(v) = s.utilization_percent {
            self.utilization_ratio
                .get_or_create(&l)
                .set(f64::from(v) / 100.0);
        }
        if let Some(v) = s.temperature_celsius {
            self.temperature_celsius.get_or_create(&l).set(f64::from(v));
        }
        if let Some(v) = s.power_watts {
            self.power_watts.get_or_create(&l).set(v);
        }
    }
}

/// NVML handle plus what discovery found. Cheap to share (`Arc`).
pub struct GpuTelemetry {
    #[cfg(feature = "gpu")]
    nvml: Option<nvml_wrapper::Nvml>,
    inventory: GpuInventory,
    metrics: GpuMetrics,
}

impl GpuTelemetry {
    /// Discover GPUs through the system's NVML library (`libnvidia-ml.so.1`).
    pub fn discover() -> Self {
        Self::discover_with(None)
    }

    /// Discover GPUs through NVML at `lib_path` (or the system default when `None`). Never fails:
    /// a missing library or driver gives an inventory with `unavailable` set and one log line.
    pub fn discover_with(lib_path: Option<&std::ffi::OsStr>) -> Self {
        let metrics = GpuMetrics::default();
        #[cfg(feature = "gpu")]
        {
            let mut builder = nvml_wrapper::Nvml::builder();
            if let Some(p) = lib_path {
                builder.lib_path(p);
            }
            match builder.init() {
                Ok(nvml) => {
                    let inventory = nvml_inventory(&nvml);
                    metrics.record_inventory(&inventory);
                    for d in &inventory.devices {
                        tracing::info!(
                            gpu = d.index,
                            name = %d.name,
                            memory_total_bytes = d.memory_total_bytes,
                            compute_capability = %d.compute_capability,
                            driver = inventory.driver_version.as_deref().unwrap_or("?"),
                            "GPU discovered"
                        );
                    }
                    let t = Self {
                        nvml: Some(nvml),
                        inventory,
                        metrics,
                    };
                    t.sample();
                    t
                }
                Err(e) => {
                    let reason = format!("NVML unavailable ({e}); GPU telemetry off, CPU mode");
                    tracing::warn!("{reason}");
                    Self {
                        nvml: None,
                        inventory: unavailable(reason),
                        metrics,
                    }
                }
            }
        }
        #[cfg(not(feature = "gpu"))]
        {
            let _ = lib_path;
            let reason = "built without the `gpu` feature; CPU mode".to_string();
            tracing::info!("{reason}");
            Self {
                inventory: unavailable(reason),
                metrics,
            }
        }
    }

    /// Telemetry switched off without loading NVML (e.g. `--gpu-devices none`): no GPUs, the
    /// gauges say 0, `reason` explains why. Logs nothing; the caller says why once.
    pub fn off(reason: String) -> Self {
        Self {
            #[cfg(feature = "gpu")]
            nvml: None,
            inventory: unavailable(reason),
            metrics: GpuMetrics::default(),
        }
    }

    pub fn inventory(&self) -> &GpuInventory {
        &self.inventory
    }

    pub fn metrics(&self) -> &GpuMetrics {
        &self.metrics
    }

    /// Register the gauges into `registry`.
    pub fn register(&self, registry: &mut Registry) {
        self.metrics.register(registry);
    }

    /// Read every GPU now and update the gauges. Devices NVML cannot read are skipped (logged at
    /// debug); without NVML this returns an empty list.
    pub fn sample(&self) -> Vec<GpuSample> {
        #[cfg(feature = "gpu")]
        if let Some(nvml) = &self.nvml {
            let mut out = Vec::with_capacity(self.inventory.devices.len());
            for info in &self.inventory.devices {
                match nvml.device_by_index(info.index) {
                    Ok(dev) => {
                        let s = sample_device(info.index, &dev);
                        self.metrics.record(info, &s);
                        out.push(s);
                    }
                    Err(e) => tracing::debug!(gpu = info.index, error = %e, "NVML sample failed"),
                }
            }
            return out;
        }
        Vec::new()
    }

    /// Sample every `period` on a background thread until the returned handle is dropped.
    pub fn spawn_sampler(self: &Arc<Self>, period: Duration) -> SamplerHandle {
        let (stop, rx) = mpsc::channel::<()>();
        let me = Arc::clone(self);
        let thread = std::thread::Builder::new()
            .name("gpu-telemetry".into())
            .spawn(move || {
                // recv_timeout doubles as the period timer and the stop signal (sender dropped).
                while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(period) {
                    me.sample();
                }
            });
        match thread {
            Ok(t) => SamplerHandle {
                stop: Some(stop),
                thread: Some(t),
            },
            Err(e) => {
                tracing::warn!(error = %e, "could not start the GPU telemetry thread; gauges update on demand only");
                SamplerHandle {
                    stop: None,
                    thread: None,
                }
            }
        }
    }
}

/// Stops the sampler thread when dropped.
pub struct SamplerHandle {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl SamplerHandle {
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for SamplerHandle {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn unavailable(reason: String) -> GpuInventory {
    GpuInventory {
        driver_version: None,
        cuda_driver_version: None,
        devices: Vec::new(),
        unavailable: Some(reason),
    }
}

#[cfg(feature = "gpu")]
fn nvml_inventory(nvml: &nvml_wrapper::Nvml) -> GpuInventory {
    let driver_version = nvml.sys_driver_version().ok();
    let cuda_driver_version = nvml
        .sys_cuda_driver_version()
        .ok()
        .map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10));
    let count = match nvml.device_count() {
        Ok(c) => c,
        Err(e) => {
            let reason = format!("NVML loaded but could not count GPUs ({e}); CPU mode");
            tracing::warn!("{reason}");
            return GpuInventory {
                driver_version,
                cuda_driver_version,
                devices: Vec::new(),
                unavailable: Some(reason),
            };
        }
    };
    let mut devices = Vec::new();
    for index in 0..count {
        match nvml.device_by_index(index) {
            Ok(d) => devices.push(GpuInfo {
                index,
                name: d.name().unwrap_or_else(|_| "unknown".into()),
                uuid: d.uuid().unwrap_or_default(),
                memory_total_bytes: d.memory_info().map(|m| m.total).unwrap_or(0),
                compute_capability: d
                    .cuda_compute_capability()
                    .map(|c| format!("{}.{}", c.major, c.minor))
                    .unwrap_or_else(|_| "unknown".into()),
            }),
            Err(e) => tracing::warn!(gpu = index, error = %e, "NVML cannot open GPU; skipping it"),
        }
    }
    let unavailable = devices
        .is_empty()
        .then(|| "NVML reports no usable GPU; CPU mode".to_string());
    GpuInventory {
        driver_version,
        cuda_driver_version,
        devices,
        unavailable,
    }
}

#[cfg(feature = "gpu")]
fn sample_device(index: u32, dev: &nvml_wrapper::Device<'_>) -> GpuSample {
    use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
    let mem = dev.memory_info().ok();
    GpuSample {
        index,
        memory_used_bytes: mem.as_ref().map(|m| m.used),
        memory_total_bytes: mem.as_ref().map(|m| m.total),
        utilization_percent: dev.utilization_rates().ok().map(|u| u.gpu),
        temperature_celsius: dev.temperature(TemperatureSensor::Gpu).ok(),
        power_watts: dev.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn missing_nvml_library_gives_cpu_mode_with_a_reason_instead_of_failing() {
        let t = GpuTelemetry::discover_with(Some(std::ffi::OsStr::new(
            "/nonexistent/libnvidia-ml.so.1",
        )));
        let inv = t.inventory();
        assert!(inv.devices.is_empty());
        let reason = inv.unavailable.as_deref().unwrap();
        assert!(reason.contains("CPU mode"), "{reason}");
        assert!(t.sample().is_empty());
        // The sampler runs and stops cleanly without NVML.
        let t = Arc::new(t);
        let h = t.spawn_sampler(Duration::from_millis(5));
        assert!(h.is_running());
        drop(h);
    }

    #[test]
    fn discovery_on_this_machine_never_panics_and_is_consistent() {
        let t = GpuTelemetry::discover();
        let inv = t.inventory();
        // Either GPUs with facts, or none with a reason: never both empty and unexplained.
        assert_eq!(inv.devices.is_empty(), inv.unavailable.is_some(), "{inv:?}");
        for d in &inv.devices {
            assert!(d.memory_total_bytes > 0, "{d:?}");
        }
        assert_eq!(t.sample().len(), inv.devices.len());
    }

    #[test]
    fn recorded_samples_appear_in_the_prometheus_text_with_gpu_labels() {
        let m = GpuMetrics::default();
        let mut reg = Registry::default();
        m.register(&mut reg);
        let info = GpuInfo {
            index: 0,
            name: "NVIDIA H100 80GB HBM3".into(),
            uuid: "GPU-x".into(),
            memory_total_bytes: 80,
            compute_capability: "9.0".into(),
        };
        m.record(
            &info,
            &GpuSample {
                index: 0,
                memory_used_bytes: Some(1024),
                memory_total_bytes: Some(4096),
                utilization_percent: Some(50),
                temperature_celsius: Some(40),
                power_watts: Some(123.5),
            },
        );
        let mut text = String::new();
        encode(&mut text, &reg).unwrap();
        for want in [
            "shoal_gpu_memory_used_bytes{gpu=\"0\",name=\"NVIDIA H100 80GB HBM3\"} 1024",
            "shoal_gpu_memory_total_bytes{gpu=\"0\",name=\"NVIDIA H100 80GB HBM3\"} 4096",
            "shoal_gpu_utilization_ratio{gpu=\"0\",name=\"NVIDIA H100 80GB HBM3\"} 0.5",
            "shoal_gpu_temperature_celsius{gpu=\"0\",name=\"NVIDIA H100 80GB HBM3\"} 40",
            "shoal_gpu_power_watts{gpu=\"0\",name=\"NVIDIA H100 80GB HBM3\"} 123.5",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
    }

    #[test]
    fn a_fake_two_gpu_snapshot_renders_count_info_and_per_gpu_gauges() {
        let m = GpuMetrics::default();
        let mut reg = Registry::default();
        m.register(&mut reg);
        let gpu = |index: u32| GpuInfo {
            index,
            name: "NVIDIA H200".into(),
            uuid: format!("GPU-{index}"),
            memory_total_bytes: 150 << 30,
            compute_capability: "9.0".into(),
        };
        let inv = GpuInventory {
            driver_version: Some("550.54.15".into()),
            cuda_driver_version: Some("12.4".into()),
            devices: vec![gpu(0), gpu(1)],
            unavailable: None,
        };
        m.record_inventory(&inv);
        m.record(
            &inv.devices[1],
            &GpuSample {
                index: 1,
                memory_used_bytes: Some(2048),
                memory_total_bytes: Some(8192),
                utilization_percent: Some(100),
                temperature_celsius: None,
                power_watts: None,
            },
        );
        let mut text = String::new();
        encode(&mut text, &reg).unwrap();
        for want in [
            "shoal_gpu_devices 2",
            "shoal_gpu_device_info{gpu=\"0\",name=\"NVIDIA H200\",uuid=\"GPU-0\",compute_capability=\"9.0\"} 1",
            "shoal_gpu_device_info{gpu=\"1\",name=\"NVIDIA H200\",uuid=\"GPU-1\",compute_capability=\"9.0\"} 1",
            "shoal_gpu_driver_info{driver_version=\"550.54.15\",cuda_driver_version=\"12.4\"} 1",
            "shoal_gpu_memory_used_bytes{gpu=\"1\",name=\"NVIDIA H200\"} 2048",
            "shoal_gpu_utilization_ratio{gpu=\"1\",name=\"NVIDIA H200\"} 1",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
        // A field NVML did not report is absent, not a made-up 0.
        assert!(!text.contains("shoal_gpu_temperature_celsius{"), "{text}");

        // Rediscovery that finds nothing (driver gone): count 0, no stale info series.
        m.record_inventory(&unavailable("NVML unavailable; CPU mode".into()));
        let mut text = String::new();
        encode(&mut text, &reg).unwrap();
        assert!(text.contains("shoal_gpu_devices 0"), "{text}");
        assert!(!text.contains("shoal_gpu_device_info{"), "{text}");
        assert!(!text.contains("shoal_gpu_driver_info{"), "{text}");
    }

    #[test]
    fn switched_off_telemetry_loads_nothing_and_reports_zero_gpus() {
        let t = GpuTelemetry::off("GPU telemetry off (--gpu-devices none)".into());
        assert!(t.inventory().devices.is_empty());
        assert!(t.sample().is_empty());
        let mut reg = Registry::default();
        t.register(&mut reg);
        let mut text = String::new();
        encode(&mut text, &reg).unwrap();
        assert!(text.contains("shoal_gpu_devices 0"), "{text}");
    }
}
