//! The reader's flags, environment variables and `--config` keys (GPU flags included,
//! [`crate::gpu::args::GpuArgs`]), resolved with the shared precedence of [`crate::config`].

use crate::config::{
    ConfigError, DEFAULT_GRPC_LISTEN, DEFAULT_METRICS_LISTEN, LogFormat, default_node_id, duration,
    load_toml, require_meta,
};
use crate::core::meta::redact;
use crate::gpu::args::GpuArgs;
use clap::Args;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `shoal-engine reader`: a read-only search node.
#[derive(Debug, Clone, Args)]
pub struct ReaderArgs {
    /// TOML file with any of the keys below (snake_case: meta, data_dir, grpc_listen,
    /// metrics_listen, node_id, poll_interval, log_format, shutdown_delay, meta_startup_timeout).
    #[arg(long, env = "SHOAL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Metadata store URL: `mysql://user:password@host:3306/db` (or `sqlite://...?mode=ro`).
    #[arg(long, env = "SHOAL_META", hide_env_values = true)]
    pub meta: Option<String>,
    /// Shared data directory, mounted read-only [default: ./shoal-data].
    #[arg(long, env = "SHOAL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of the internal Reader gRPC service [default: 127.0.0.1:19531].
    #[arg(long, env = "SHOAL_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    /// Address of /healthz, /readyz and /metrics [default: 127.0.0.1:9091].
    #[arg(long, env = "SHOAL_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// This reader's name in logs and health answers [default: $POD_NAME, else the host name].
    #[arg(long, env = "SHOAL_NODE_ID")]
    pub node_id: Option<String>,
    /// How often the catalogue is polled (the fallback when a push is lost) [default: 1s].
    #[arg(long, env = "SHOAL_POLL_INTERVAL")]
    pub poll_interval: Option<String>,
    /// Log format [default: text].
    #[arg(long, env = "SHOAL_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// After SIGTERM: how long the process reports not ready on /readyz while it keeps
    /// serving, before it stops accepting and drains in-flight requests; `0s` for none. Must
    /// exceed the time the router and Kubernetes endpoints take to drop it [default: 5s].
    #[arg(long, env = "SHOAL_SHUTDOWN_DELAY")]
    pub shutdown_delay: Option<String>,
    /// How long start-up retries an unreachable metadata store (its name may not resolve yet
    /// on a fresh cluster) before exiting with the cause [default: 60s].
    #[arg(long, env = "SHOAL_META_STARTUP_TIMEOUT")]
    pub meta_startup_timeout: Option<String>,
    #[command(flatten)]
    pub gpu: GpuArgs,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReaderFile {
    meta: Option<String>,
    data_dir: Option<PathBuf>,
    grpc_listen: Option<SocketAddr>,
    metrics_listen: Option<SocketAddr>,
    node_id: Option<String>,
    poll_interval: Option<String>,
    log_format: Option<LogFormat>,
    shutdown_delay: Option<String>,
    meta_startup_timeout: Option<String>,
}

/// Resolved reader configuration.
#[derive(Clone)]
pub struct ReaderConfig {
    pub meta_url: String,
    pub data_dir: PathBuf,
    pub grpc_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub node_id: String,
    pub poll_interval: Duration,
    pub log_format: LogFormat,
    pub shutdown_delay: Duration,
    pub meta_startup_timeout: Duration,
    pub gpu: GpuArgs,
}

impl std::fmt::Debug for ReaderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReaderConfig")
            .field("meta_url", &redact(&self.meta_url))
            .field("data_dir", &self.data_dir)
            .field("grpc_listen", &self.grpc_listen)
            .field("metrics_listen", &self.metrics_listen)
            .field("node_id", &self.node_id)
            .field("poll_interval", &self.poll_interval)
            .field("gpu", &self.gpu)
            .finish()
    }
}

impl ReaderArgs {
    /// Merge flags/env with the TOML file and defaults.
    pub fn resolve(self) -> Result<ReaderConfig, ConfigError> {
        let file: ReaderFile = load_toml(self.config.as_deref())?;
        Ok(ReaderConfig {
            meta_url: require_meta(self.meta.or(file.meta))?,
            data_dir: self
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("./shoal-data")),
            grpc_listen: self
                .grpc_listen
                .or(file.grpc_listen)
                .unwrap_or(DEFAULT_GRPC_LISTEN),
            metrics_listen: self
                .metrics_listen
                .or(file.metrics_listen)
                .unwrap_or(DEFAULT_METRICS_LISTEN),
            node_id: self
                .node_id
                .or(file.node_id)
                .filter(|n| !n.trim().is_empty())
                .unwrap_or_else(default_node_id),
            poll_interval: duration(
                "poll_interval",
                self.poll_interval.or(file.poll_interval),
                "1s",
            )?,
            log_format: self.log_format.or(file.log_format).unwrap_or_default(),
            shutdown_delay: crate::config::shutdown_delay(
                self.shutdown_delay,
                file.shutdown_delay,
            )?,
            meta_startup_timeout: crate::config::meta_startup_timeout(
                self.meta_startup_timeout,
                file.meta_startup_timeout,
            )?,
            gpu: self.gpu,
        })
    }
}
