//! Command-line, environment and TOML configuration of the roles. Precedence: command-line flag,
//! then `SHOAL_*` environment variable (clap merges those two), then the `--config` TOML file,
//! then the built-in default.

use crate::gpu::GpuArgs;
use clap::{Args, ValueEnum};
use serde::Deserialize;
use std::net::SocketAddr;
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
    /// log_format, auth_token, flush_interval, meta_url).
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

impl StandaloneArgs {
    /// Merge flags/env with the TOML file and defaults.
    pub fn resolve(self) -> Result<StandaloneConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
                        path: path.clone(),
                        source,
                    })?;
                toml::from_str::<FileConfig>(&text).map_err(|source| ConfigError::ParseFile {
                    path: path.clone(),
                    source,
                })?
            }
            None => FileConfig::default(),
        };
        let flush = self
            .flush_interval
            .or(file.flush_interval)
            .unwrap_or_else(|| "1s".into());
        let listen = self
            .listen
            .or(file.listen)
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 19530)));
        let metrics_listen = self
            .metrics_listen
            .or(file.metrics_listen)
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9091)));
        let auth_token = self
            .auth_token
            .or(file.auth_token)
            .filter(|t| !t.is_empty());
        if auth_token.as_ref().is_some_and(|t| !t.contains(':')) {
            return Err(ConfigError::Invalid {
                key: "auth_token",
                reason: "must be user:password".into(),
            });
        }
        Ok(StandaloneConfig {
            data_dir: self
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("./shoal-data")),
            listen,
            metrics_listen,
            log_format: self.log_format.or(file.log_format).unwrap_or_default(),
            auth_token,
            flush_interval: parse_duration(&flush).map_err(|reason| ConfigError::Invalid {
                key: "flush_interval",
                reason,
            })?,
            meta_url: self.meta_url.or(file.meta_url),
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
