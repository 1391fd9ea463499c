//! Command-line, environment and TOML configuration: the one precedence every role resolves its
//! settings with (command-line flag, then `SHOAL_*` environment variable (clap merges those
//! two), then the `--config` TOML file, then the built-in default), the value parsers, the
//! defaults shared by the roles (listen addresses, shutdown delay, metadata start-up timeout,
//! node id, auth token), and the standalone role's settings. The cluster roles declare their
//! own flags next to their code (`roles::{writer,reader,router}`) and resolve them with these
//! functions. Imports no role.

use crate::gpu::GpuArgs;
use clap::{Args, ValueEnum};
use serde::Deserialize;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read config file {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is invalid")]
    ParseFile {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("invalid {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `shoal-engine standalone`: writer, reader and router in one process with SQLite metadata.
#[derive(Debug, Clone, Default, Args)]
pub struct StandaloneArgs {
    /// TOML file with any of the keys below (snake_case: data_dir, listen, metrics_listen,
    /// log_format, auth_token, flush_interval, meta_url, shutdown_delay).
    #[arg(long, env = "SHOAL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory for the WAL, segments and the SQLite metadata file [default: ./shoal-data].
    #[arg(long, env = "SHOAL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address of the public REST API (Milvus REST v2) [default: 127.0.0.1:19530].
    #[arg(long, env = "SHOAL_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address of /healthz, /readyz and /metrics [default: 127.0.0.1:9091].
    #[arg(long, env = "SHOAL_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Log format [default: text].
    #[arg(long, env = "SHOAL_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Require `Authorization: Bearer <user:password>` on every REST request.
    #[arg(long, env = "SHOAL_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// How often the growing buffer is sealed into a segment, e.g. `1s`, `500ms` [default: 1s].
    #[arg(long, env = "SHOAL_FLUSH_INTERVAL")]
    pub flush_interval: Option<String>,
    /// Metadata store URL (`sqlite://...` or `mysql://...`) [default: SQLite in the data dir].
    #[arg(long, env = "SHOAL_META_URL", hide_env_values = true)]
    pub meta_url: Option<String>,
    /// After SIGTERM: how long the process reports not ready on /readyz while it keeps
    /// serving, before it stops accepting and drains in-flight requests; `0s` for none. Must
    /// exceed the time the router and Kubernetes endpoints take to drop it [default: 5s].
    #[arg(long, env = "SHOAL_SHUTDOWN_DELAY")]
    pub shutdown_delay: Option<String>,
    /// GPU flags (command line and `SHOAL_GPU_*` only). Standalone searches on the CPU and uses
    /// them for NVML telemetry (`--gpu-devices none` turns it off); readers search with them.
    #[command(flatten)]
    pub gpu: GpuArgs,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    metrics_listen: Option<SocketAddr>,
    log_format: Option<LogFormat>,
    auth_token: Option<String>,
    flush_interval: Option<String>,
    meta_url: Option<String>,
    shutdown_delay: Option<String>,
}

/// Resolved standalone configuration.
#[derive(Clone)]
pub struct StandaloneConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub log_format: LogFormat,
    pub auth_token: Option<String>,
    pub flush_interval: Duration,
    pub meta_url: Option<String>,
    pub shutdown_delay: Duration,
    pub gpu: GpuArgs,
}

impl std::fmt::Debug for StandaloneConfig {
    // Never print the token or a metadata URL's password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandaloneConfig")
            .field("data_dir", &self.data_dir)
            .field("listen", &self.listen)
            .field("metrics_listen", &self.metrics_listen)
            .field("log_format", &self.log_format)
            .field("auth", &self.auth_token.is_some())
            .field("flush_interval", &self.flush_interval)
            .field(
                "meta_url",
                &self.meta_url.as_deref().map(crate::core::meta::redact),
            )
            .field("gpu", &self.gpu)
            .finish()
    }
}

/// Parse `1s`, `500ms`, `2m` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&s[..i], s[i..].trim()),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 1s or 500ms"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        other => return Err(format!("unknown unit {other:?} in {s:?}; use ms, s or m")),
    };
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("{s:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Read a role's TOML file (`deny_unknown_fields` structs reject misspelt keys).
///
/// Errors: `ReadFile`, `ParseFile`.
pub fn load_toml<T: serde::de::DeserializeOwned + Default>(
    path: Option<&std::path::Path>,
) -> Result<T, ConfigError> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str::<T>(&text).map_err(|source| ConfigError::ParseFile {
        path: path.to_path_buf(),
        source,
    })
}

/// Default address of the public REST API (Milvus REST v2).
pub const DEFAULT_LISTEN: SocketAddr = loopback(19530);
/// Default address of the cluster roles' internal gRPC services.
pub const DEFAULT_GRPC_LISTEN: SocketAddr = loopback(19531);
/// Default address of `/healthz`, `/readyz` and `/metrics`.
pub const DEFAULT_METRICS_LISTEN: SocketAddr = loopback(9091);

const fn loopback(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
}

/// A duration setting: the flag/env or file value `v` (see [`parse_duration`]), else `default`.
///
/// Errors: `Invalid { key }` when the value does not parse.
pub(crate) fn duration(
    key: &'static str,
    v: Option<String>,
    default: &str,
) -> Result<Duration, ConfigError> {
    parse_duration(v.as_deref().unwrap_or(default))
        .map_err(|reason| ConfigError::Invalid { key, reason })
}

/// Default of `--shutdown-delay`. The router re-resolves and probes its readers every
/// `--health-interval` (1 s) and sends a draining reader work only while no other reader is
/// live, so 5 s leaves room for a successor to appear in discovery (endpoints and DNS updates)
/// and answer its first probe.
pub const SHUTDOWN_DELAY: &str = "5s";

/// A delay setting: as [`duration`], and `0`/`0s`/`0ms` mean none.
///
/// Errors: `Invalid { key }` when the value does not parse.
pub(crate) fn delay(
    key: &'static str,
    v: Option<String>,
    default: &str,
) -> Result<Duration, ConfigError> {
    let v = v.unwrap_or_else(|| default.to_string());
    if matches!(v.trim(), "0" | "0s" | "0ms") {
        return Ok(Duration::ZERO);
    }
    duration(key, Some(v), default)
}

/// The metadata URL is required for the cluster roles; say where to put it when missing.
pub fn require_meta(v: Option<String>) -> Result<String, ConfigError> {
    match v.filter(|m| !m.trim().is_empty()) {
        Some(m)
            if m.starts_with("sqlite:") || m.starts_with("mysql:") || m.starts_with("mariadb:") =>
        {
            Ok(m)
        }
        Some(m) => Err(ConfigError::Invalid {
            key: "meta",
            reason: format!(
                "{:?} is not a mysql:// or sqlite: URL",
                crate::core::meta::redact(&m)
            ),
        }),
        None => Err(ConfigError::Invalid {
            key: "meta",
            reason: "required: pass --meta or set SHOAL_META (mysql://... or sqlite://...)".into(),
        }),
    }
}

/// Default of `--meta-startup-timeout`: how long start-up retries the metadata store.
pub const META_STARTUP_TIMEOUT: &str = "60s";

/// `--shutdown-delay`, resolved the same way for every role: the flag/env value, else the
/// file's, else [`SHUTDOWN_DELAY`]; `0s` for none.
///
/// Errors: `Invalid { key: "shutdown_delay" }` when the value does not parse.
pub fn shutdown_delay(flag: Option<String>, file: Option<String>) -> Result<Duration, ConfigError> {
    delay("shutdown_delay", flag.or(file), SHUTDOWN_DELAY)
}

/// `--meta-startup-timeout`, resolved the same way for every cluster role: the flag/env value,
/// else the file's, else [`META_STARTUP_TIMEOUT`].
///
/// Errors: `Invalid { key: "meta_startup_timeout" }` when the value does not parse.
pub fn meta_startup_timeout(
    flag: Option<String>,
    file: Option<String>,
) -> Result<Duration, ConfigError> {
    duration("meta_startup_timeout", flag.or(file), META_STARTUP_TIMEOUT)
}

/// The REST API's `user:password` token: the flag/env value, else the file's; empty means none.
///
/// Errors: `Invalid { key: "auth_token" }` when a token has no `:`.
pub(crate) fn auth_token(
    flag: Option<String>,
    file: Option<String>,
) -> Result<Option<String>, ConfigError> {
    let token = flag.or(file).filter(|t| !t.is_empty());
    if token.as_ref().is_some_and(|t| !t.contains(':')) {
        return Err(ConfigError::Invalid {
            key: "auth_token",
            reason: "must be user:password".into(),
        });
    }
    Ok(token)
}

/// A cluster node's default id: `$POD_NAME` (Kubernetes), else `$HOSTNAME`, else
/// `/etc/hostname`, else `shoal-<pid>`.
pub fn default_node_id() -> String {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    env("POD_NAME")
        .or_else(|| env("HOSTNAME"))
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| format!("shoal-{}", std::process::id()))
}

impl StandaloneArgs {
    /// Merge flags/env with the TOML file and defaults.
    pub fn resolve(self) -> Result<StandaloneConfig, ConfigError> {
        let file: FileConfig = load_toml(self.config.as_deref())?;
        let listen = self.listen.or(file.listen).unwrap_or(DEFAULT_LISTEN);
        let metrics_listen = self
            .metrics_listen
            .or(file.metrics_listen)
            .unwrap_or(DEFAULT_METRICS_LISTEN);
        let auth_token = auth_token(self.auth_token, file.auth_token)?;
        Ok(StandaloneConfig {
            data_dir: self
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("./shoal-data")),
            listen,
            metrics_listen,
            log_format: self.log_format.or(file.log_format).unwrap_or_default(),
            auth_token,
            flush_interval: duration(
                "flush_interval",
                self.flush_interval.or(file.flush_interval),
                "1s",
            )?,
            meta_url: self.meta_url.or(file.meta_url),
            shutdown_delay: shutdown_delay(self.shutdown_delay, file.shutdown_delay)?,
            gpu: self.gpu,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_the_file_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shoal.toml");
        std::fs::write(
            &p,
            "data_dir = \"/from/file\"\nlisten = \"127.0.0.1:1234\"\nflush_interval = \"250ms\"\n",
        )
        .unwrap();
        let args = StandaloneArgs {
            config: Some(p),
            listen: Some("127.0.0.1:999".parse().unwrap()),
            ..Default::default()
        };
        let c = args.resolve().unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/from/file"));
        assert_eq!(c.listen.port(), 999);
        assert_eq!(c.metrics_listen.port(), 9091);
        assert_eq!(c.flush_interval, Duration::from_millis(250));
    }

    #[test]
    fn unknown_file_keys_and_bad_durations_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shoal.toml");
        std::fs::write(&p, "dta_dir = \"x\"\n").unwrap();
        assert!(matches!(
            StandaloneArgs {
                config: Some(p),
                ..Default::default()
            }
            .resolve(),
            Err(ConfigError::ParseFile { .. })
        ));
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("0s").is_err());
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
    }
}
