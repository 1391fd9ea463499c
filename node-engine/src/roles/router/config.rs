//! The router's flags, environment variables and `--config` keys, resolved with the shared
//! precedence of [`crate::config`].

use crate::config::{
    ConfigError, DEFAULT_LISTEN, DEFAULT_METRICS_LISTEN, LogFormat, auth_token, duration,
    load_toml, meta_startup_timeout, shutdown_delay,
};
use clap::Args;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `shoal-engine router`: the public REST API of a cluster; writes go to the writer, searches
/// fan out to the readers.
#[derive(Debug, Clone, Default, Args)]
pub struct RouterArgs {
    /// TOML file with any of the keys below (snake_case: meta, writer, readers, readers_dns,
    /// readers_file, listen, metrics_listen, replication, auth_token, log_format, request_timeout,
    /// flush_timeout, catalog_poll, health_interval, writer_failover_timeout, shutdown_delay,
    /// meta_startup_timeout).
    #[arg(long, env = "SHOAL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Metadata store URL (`mysql://...`; the router only reads the catalogue from it).
    #[arg(long, env = "SHOAL_META", hide_env_values = true)]
    pub meta: Option<String>,
    /// `host:port` of the writer's internal gRPC service.
    #[arg(long, env = "SHOAL_WRITER")]
    pub writer: Option<String>,
    /// Static reader list: `a:19531,b:19531`.
    #[arg(long, env = "SHOAL_READERS", conflicts_with_all = ["readers_dns", "readers_file"])]
    pub readers: Option<String>,
    /// Readers from DNS: every address of `NAME:PORT` (a Kubernetes headless Service).
    #[arg(long, env = "SHOAL_READERS_DNS", conflicts_with = "readers_file")]
    pub readers_dns: Option<String>,
    /// Readers from a file of `host:port` lines, re-read at every health interval (outside
    /// Kubernetes: rewrite it to add or remove readers).
    #[arg(long, env = "SHOAL_READERS_FILE")]
    pub readers_file: Option<PathBuf>,
    /// Address of the public REST API (Milvus REST v2) [default: 127.0.0.1:19530].
    #[arg(long, env = "SHOAL_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address of /healthz, /readyz and /metrics [default: 127.0.0.1:9091].
    #[arg(long, env = "SHOAL_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Readers that serve each segment [default: 1].
    #[arg(long, env = "SHOAL_REPLICATION")]
    pub replication: Option<usize>,
    /// Require `Authorization: Bearer <user:password>` on every REST request.
    #[arg(long, env = "SHOAL_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// Log format [default: text].
    #[arg(long, env = "SHOAL_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Deadline of one call to a reader or the writer, e.g. `10s` [default: 10s].
    #[arg(long, env = "SHOAL_REQUEST_TIMEOUT")]
    pub request_timeout: Option<String>,
    /// How long `collections/flush` waits for the readers to serve the flush [default: 60s].
    #[arg(long, env = "SHOAL_FLUSH_TIMEOUT")]
    pub flush_timeout: Option<String>,
    /// Catalogue poll interval [default: 1s].
    #[arg(long, env = "SHOAL_CATALOG_POLL")]
    pub catalog_poll: Option<String>,
    /// Reader discovery and health-check interval [default: 1s].
    #[arg(long, env = "SHOAL_HEALTH_INTERVAL")]
    pub health_interval: Option<String>,
    /// How long a forwarded write keeps retrying while the writer cannot be reached (it is
    /// being restarted or replaced), e.g. `30s` [default: 30s].
    #[arg(long, env = "SHOAL_WRITER_FAILOVER_TIMEOUT")]
    pub writer_failover_timeout: Option<String>,
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
struct RouterFileConfig {
    meta: Option<String>,
    writer: Option<String>,
    readers: Option<String>,
    readers_dns: Option<String>,
    readers_file: Option<PathBuf>,
    listen: Option<SocketAddr>,
    metrics_listen: Option<SocketAddr>,
    replication: Option<usize>,
    auth_token: Option<String>,
    log_format: Option<LogFormat>,
    request_timeout: Option<String>,
    flush_timeout: Option<String>,
    catalog_poll: Option<String>,
    health_interval: Option<String>,
    writer_failover_timeout: Option<String>,
    shutdown_delay: Option<String>,
    meta_startup_timeout: Option<String>,
}

/// Resolved router configuration.
#[derive(Clone)]
pub struct RouterConfig {
    pub meta_url: String,
    pub writer: String,
    pub discovery: super::membership::Discovery,
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub replication: usize,
    pub auth_token: Option<String>,
    pub log_format: LogFormat,
    pub request_timeout: Duration,
    pub flush_timeout: Duration,
    pub catalog_poll: Duration,
    pub health_interval: Duration,
    pub writer_failover_timeout: Duration,
    pub shutdown_delay: Duration,
    pub meta_startup_timeout: Duration,
}

impl std::fmt::Debug for RouterConfig {
    // Never print the token or the metadata URL's password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterConfig")
            .field("meta_url", &crate::core::meta::redact(&self.meta_url))
            .field("writer", &self.writer)
            .field("discovery", &self.discovery)
            .field("listen", &self.listen)
            .field("metrics_listen", &self.metrics_listen)
            .field("replication", &self.replication)
            .field("auth", &self.auth_token.is_some())
            .field("request_timeout", &self.request_timeout)
            .field("flush_timeout", &self.flush_timeout)
            .field("writer_failover_timeout", &self.writer_failover_timeout)
            .finish()
    }
}

impl RouterArgs {
    /// Merge flags/env with the TOML file and defaults.
    pub fn resolve(self) -> Result<RouterConfig, ConfigError> {
        use super::membership::Discovery;
        let file: RouterFileConfig = load_toml(self.config.as_deref())?;
        let meta_url =
            self.meta
                .or(file.meta)
                .filter(|s| !s.is_empty())
                .ok_or(ConfigError::Invalid {
                    key: "meta",
                    reason: "required (--meta or SHOAL_META)".into(),
                })?;
        let writer = self
            .writer
            .or(file.writer)
            .filter(|s| !s.is_empty())
            .ok_or(ConfigError::Invalid {
                key: "writer",
                reason: "required: host:port of the writer's gRPC service".into(),
            })?;
        let discovery = match (
            self.readers.or(file.readers),
            self.readers_dns.or(file.readers_dns),
            self.readers_file.or(file.readers_file),
        ) {
            (Some(list), None, None) => Discovery::static_list(&list),
            (None, Some(dns), None) => Discovery::dns(&dns).map_err(|e| ConfigError::Invalid {
                key: "readers_dns",
                reason: e.to_string(),
            })?,
            (None, None, Some(path)) => Discovery::File(path),
            (None, None, None) => {
                return Err(ConfigError::Invalid {
                    key: "readers",
                    reason: "required: --readers a:19531,b:19531, --readers-dns NAME:PORT or --readers-file PATH"
                        .into(),
                });
            }
            _ => {
                return Err(ConfigError::Invalid {
                    key: "readers",
                    reason: "give only one of readers, readers_dns and readers_file".into(),
                });
            }
        };
        let replication = self.replication.or(file.replication).unwrap_or(1);
        if replication == 0 {
            return Err(ConfigError::Invalid {
                key: "replication",
                reason: "must be at least 1".into(),
            });
        }
        let auth_token = auth_token(self.auth_token, file.auth_token)?;
        Ok(RouterConfig {
            meta_url,
            writer,
            discovery,
            listen: self.listen.or(file.listen).unwrap_or(DEFAULT_LISTEN),
            metrics_listen: self
                .metrics_listen
                .or(file.metrics_listen)
                .unwrap_or(DEFAULT_METRICS_LISTEN),
            replication,
            auth_token,
            log_format: self.log_format.or(file.log_format).unwrap_or_default(),
            request_timeout: duration(
                "request_timeout",
                self.request_timeout.or(file.request_timeout),
                "10s",
            )?,
            flush_timeout: duration(
                "flush_timeout",
                self.flush_timeout.or(file.flush_timeout),
                "60s",
            )?,
            catalog_poll: duration(
                "catalog_poll",
                self.catalog_poll.or(file.catalog_poll),
                "1s",
            )?,
            health_interval: duration(
                "health_interval",
                self.health_interval.or(file.health_interval),
                "1s",
            )?,
            writer_failover_timeout: duration(
                "writer_failover_timeout",
                self.writer_failover_timeout
                    .or(file.writer_failover_timeout),
                "30s",
            )?,
            shutdown_delay: shutdown_delay(self.shutdown_delay, file.shutdown_delay)?,
            meta_startup_timeout: meta_startup_timeout(
                self.meta_startup_timeout,
                file.meta_startup_timeout,
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_needs_meta_writer_and_readers_and_reads_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("router.toml");
        std::fs::write(
            &p,
            "meta = \"mysql://u:p@db/shoal\"\nwriter = \"w:19531\"\nreaders_dns = \"readers:19531\"\nreplication = 2\n",
        )
        .unwrap();
        let c = RouterArgs {
            config: Some(p.clone()),
            request_timeout: Some("250ms".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(c.writer, "w:19531");
        assert_eq!(c.replication, 2);
        assert_eq!(c.request_timeout, Duration::from_millis(250));
        assert_eq!(
            c.discovery,
            super::super::membership::Discovery::Dns {
                name: "readers".into(),
                port: 19531
            }
        );
        assert!(!format!("{c:?}").contains(":p@"), "{c:?}");
        let no_readers = RouterArgs {
            meta: Some("mysql://x/y".into()),
            writer: Some("w:1".into()),
            ..Default::default()
        };
        assert!(matches!(
            no_readers.clone().resolve(),
            Err(ConfigError::Invalid { key: "readers", .. })
        ));
        assert!(matches!(
            RouterArgs {
                readers: Some("a:1".into()),
                replication: Some(0),
                ..no_readers
            }
            .resolve(),
            Err(ConfigError::Invalid {
                key: "replication",
                ..
            })
        ));
    }
}
