//! The writer's flags, environment variables and `--config` keys, resolved with the shared
//! precedence of [`crate::config`].

use crate::config::{
    ConfigError, DEFAULT_GRPC_LISTEN, DEFAULT_LISTEN, DEFAULT_METRICS_LISTEN, LogFormat,
    auth_token, default_node_id, duration, load_toml, require_meta,
};
use crate::core::meta::redact;
use clap::Args;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `shoal-engine writer`: the cluster's single, fenced writer.
#[derive(Debug, Clone, Default, Args)]
pub struct WriterArgs {
    /// TOML file with any of the keys below (snake_case: meta, data_dir, wal_dir, listen,
    /// grpc_listen, metrics_listen, node_id, lease_ttl, flush_interval, log_format, auth_token,
    /// shutdown_delay, meta_startup_timeout).
    #[arg(long, env = "SHOAL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Metadata store URL: `mysql://user:password@host:3306/db` or `sqlite:///path/meta.db`.
    #[arg(long, env = "SHOAL_META", hide_env_values = true)]
    pub meta: Option<String>,
    /// Shared data directory (segments; the WALs too unless --wal-dir) [default: ./shoal-data].
    #[arg(long, env = "SHOAL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Directory for the collections' WALs (`<dir>/c<id>`) [default: inside each collection's
    /// directory under --data-dir]. A writer taking over after a failover must see the same
    /// WAL directory (shared filesystem, or the same volume re-attached).
    #[arg(long, env = "SHOAL_WAL_DIR")]
    pub wal_dir: Option<PathBuf>,
    /// Address of the REST API (Milvus REST v2, as standalone) [default: 127.0.0.1:19530].
    #[arg(long, env = "SHOAL_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address of the internal Writer gRPC service [default: 127.0.0.1:19531].
    #[arg(long, env = "SHOAL_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
    /// Address of /healthz, /readyz and /metrics [default: 127.0.0.1:9091].
    #[arg(long, env = "SHOAL_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Lease holder name [default: $POD_NAME, else the host name]. A restarted writer with the
    /// same id takes the lease over at once.
    #[arg(long, env = "SHOAL_NODE_ID")]
    pub node_id: Option<String>,
    /// Writer lease time-to-live, renewed every third of it, e.g. `10s` [default: 10s].
    #[arg(long, env = "SHOAL_LEASE_TTL")]
    pub lease_ttl: Option<String>,
    /// How often the growing buffer is sealed into a segment [default: 1s].
    #[arg(long, env = "SHOAL_FLUSH_INTERVAL")]
    pub flush_interval: Option<String>,
    /// Log format [default: text].
    #[arg(long, env = "SHOAL_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Require `Authorization: Bearer <user:password>` on every REST request.
    #[arg(long, env = "SHOAL_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// After SIGTERM: how long the process reports not ready on /readyz while it keeps
    /// serving, before it stops accepting and drains in-flight requests; `0s` for none. Must
    /// exceed the time the router and Kubernetes endpoints take to drop it [default: 5s].
    #[arg(long, env = "SHOAL_SHUTDOWN_DELAY")]
    pub shutdown_delay: Option<String>,
    /// How long start-up retries an unreachable metadata store (its name may not resolve yet
    /// on a fresh cluster) before exiting with the cause [default: 60s].
    #[arg(long, env = "SHOAL_META_STARTUP_TIMEOUT")]
    pub meta_startup_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WriterFile {
    meta: Option<String>,
    data_dir: Option<PathBuf>,
    wal_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    grpc_listen: Option<SocketAddr>,
    metrics_listen: Option<SocketAddr>,
    node_id: Option<String>,
    lease_ttl: Option<String>,
    flush_interval: Option<String>,
    log_format: Option<LogFormat>,
    auth_token: Option<String>,
    shutdown_delay: Option<String>,
    meta_startup_timeout: Option<String>,
}

/// Resolved writer configuration.
#[derive(Clone)]
pub struct WriterConfig {
    pub meta_url: String,
    pub data_dir: PathBuf,
    pub wal_dir: Option<PathBuf>,
    pub listen: SocketAddr,
    pub grpc_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub node_id: String,
    pub lease_ttl: Duration,
    pub flush_interval: Duration,
    pub log_format: LogFormat,
    pub auth_token: Option<String>,
    pub shutdown_delay: Duration,
    pub meta_startup_timeout: Duration,
}

impl std::fmt::Debug for WriterConfig {
    // Never print the token or the metadata URL's password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterConfig")
            .field("meta_url", &redact(&self.meta_url))
            .field("data_dir", &self.data_dir)
            .field("wal_dir", &self.wal_dir)
            .field("listen", &self.listen)
            .field("grpc_listen", &self.grpc_listen)
            .field("metrics_listen", &self.metrics_listen)
            .field("node_id", &self.node_id)
            .field("lease_ttl", &self.lease_ttl)
            .field("flush_interval", &self.flush_interval)
            .field("auth", &self.auth_token.is_some())
            .finish()
    }
}

impl WriterArgs {
    /// Merge flags/env with the TOML file and defaults.
    pub fn resolve(self) -> Result<WriterConfig, ConfigError> {
        let file: WriterFile = load_toml(self.config.as_deref())?;
        let lease_ttl = duration("lease_ttl", self.lease_ttl.or(file.lease_ttl), "10s")?;
        if lease_ttl < Duration::from_millis(300) {
            return Err(ConfigError::Invalid {
                key: "lease_ttl",
                reason: "must be at least 300ms".into(),
            });
        }
        let auth_token = auth_token(self.auth_token, file.auth_token)?;
        Ok(WriterConfig {
            meta_url: require_meta(self.meta.or(file.meta))?,
            data_dir: self
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("./shoal-data")),
            wal_dir: self.wal_dir.or(file.wal_dir),
            listen: self.listen.or(file.listen).unwrap_or(DEFAULT_LISTEN),
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
            lease_ttl,
            flush_interval: duration(
                "flush_interval",
                self.flush_interval.or(file.flush_interval),
                "1s",
            )?,
            log_format: self.log_format.or(file.log_format).unwrap_or_default(),
            auth_token,
            shutdown_delay: crate::config::shutdown_delay(
                self.shutdown_delay,
                file.shutdown_delay,
            )?,
            meta_startup_timeout: crate::config::meta_startup_timeout(
                self.meta_startup_timeout,
                file.meta_startup_timeout,
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        role: Role,
    }

    #[derive(clap::Subcommand)]
    enum Role {
        Writer(WriterArgs),
        Reader(crate::roles::reader::config::ReaderArgs),
    }

    fn parse(args: &[&str]) -> Role {
        Cli::try_parse_from(std::iter::once("shoal-engine").chain(args.iter().copied()))
            .unwrap()
            .role
    }

    #[test]
    fn writer_flags_file_and_defaults_resolve_and_the_metadata_url_is_required() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.toml");
        std::fs::write(&p, "wal_dir = \"/wal\"\nlease_ttl = \"4s\"\n").unwrap();
        let Role::Writer(w) = parse(&[
            "writer",
            "--meta",
            "mysql://u:secret@db:3306/shoal",
            "--config",
            p.to_str().unwrap(),
            "--node-id",
            "w-0",
        ]) else {
            panic!("not the writer");
        };
        let c = w.resolve().unwrap();
        assert_eq!(c.wal_dir, Some(PathBuf::from("/wal")));
        assert_eq!(c.lease_ttl, Duration::from_secs(4));
        assert_eq!(c.grpc_listen.port(), 19531);
        assert_eq!(c.node_id, "w-0");
        assert!(!format!("{c:?}").contains("secret"), "{c:?}");

        let missing = WriterArgs::default().resolve().unwrap_err().to_string();
        assert!(missing.contains("meta"), "{missing}");
        let bad = WriterArgs {
            meta: Some("postgres://x".into()),
            ..Default::default()
        };
        assert!(bad.resolve().is_err());
        let short = WriterArgs {
            meta: Some("sqlite://m.db".into()),
            lease_ttl: Some("100ms".into()),
            ..Default::default()
        };
        assert!(short.resolve().is_err());
    }

    #[test]
    fn reader_accepts_the_operators_gpu_flags() {
        let Role::Reader(r) = parse(&[
            "reader",
            "--meta",
            "mysql://u:p@db/shoal",
            "--node-id",
            "reader-abc",
            "--gpu-devices",
            "0,1",
            "--gpu-memory-budget",
            "8Gi",
        ]) else {
            panic!("not the reader");
        };
        let c = r.resolve().unwrap();
        assert_eq!(
            c.gpu.gpu_devices,
            crate::gpu::args::DeviceSelection::List(vec![0, 1])
        );
        assert_eq!(c.gpu.gpu_memory_budget, 8 << 30);
        assert_eq!(c.poll_interval, Duration::from_secs(1));
        assert_eq!(c.node_id, "reader-abc");
    }
}
