//! JuiceFS credentials as CSI hands them over, under JuiceFS CSI's field names.
//!
//! Owns: reading the secret map (`name`, `metaurl`, `storage`, `bucket`, `access-key`,
//! `secret-key`, `format-options`, `envs`), keeping every credential out of command lines (a
//! `juicefs` child gets them in its environment, which `ps` does not show to other users and
//! the mount pod reads from a Secret), and the [`Scrubber`] that removes every secret value from
//! text before it is logged or returned.
//! Must not: implement `Display`, or a `Debug` that shows a value. Nothing else in the crate
//! ever formats a raw secret map.
//!
//! Object storage credentials, as JuiceFS takes them:
//! - S3 and most stores: `access-key`/`secret-key` (`ACCESS_KEY`/`SECRET_KEY` in the child's
//!   environment, which `juicefs` reads when the flags are absent).
//! - Azure Blob (`storage: wasb`): either the account name and key as `access-key`/`secret-key`
//!   with bucket `https://CONTAINER.blob.core.windows.net`, or a connection string in
//!   `AZURE_STORAGE_CONNECTION_STRING`, given through `envs`. JuiceFS takes the container name
//!   from the first label of the bucket's host and, with a connection string, the endpoint from
//!   the string (so Azurite's bucket is `http://CONTAINER.127.0.0.1:PORT`).
//!
//! Why `envs` and no dedicated `connection-string` key: `envs` is JuiceFS CSI's own field (a
//! JSON or YAML map of environment variables for the client), so a Secret written for JuiceFS
//! CSI works unchanged here; the variable is the one `juicefs` itself reads, so nothing has to
//! translate it; and the same field carries every other setting JuiceFS takes from the
//! environment (`AWS_*` session tokens, `GOOGLE_APPLICATION_CREDENTIALS`, ...) without a new key
//! each. Its values are treated as secrets throughout. Variables that would change what the
//! child runs (`LD_*`, `PATH`) or shadow the driver's own (`META_PASSWORD`, `ACCESS_KEY`,
//! `SECRET_KEY`) are refused.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// Secret keys, exactly as JuiceFS CSI names them.
pub mod keys {
    /// Filesystem name (`juicefs format ... NAME`).
    pub const NAME: &str = "name";
    /// Metadata engine URL (may embed a password).
    pub const METAURL: &str = "metaurl";
    /// Object storage type (`file`, `s3`, ...); its presence asks for `juicefs format`.
    pub const STORAGE: &str = "storage";
    /// Object storage bucket URL or directory.
    pub const BUCKET: &str = "bucket";
    /// Object storage access key.
    pub const ACCESS_KEY: &str = "access-key";
    /// Object storage secret key.
    pub const SECRET_KEY: &str = "secret-key";
    /// Extra `juicefs format` options, comma-separated `key=value` or `flag`.
    pub const FORMAT_OPTIONS: &str = "format-options";
    /// Environment variables for the `juicefs` client: a JSON or YAML map (JuiceFS CSI's field),
    /// e.g. `{"AZURE_STORAGE_CONNECTION_STRING": "DefaultEndpointsProtocol=..."}`.
    pub const ENVS: &str = "envs";
}

/// The environment variables the driver sets itself; `envs` may not shadow them.
const DRIVER_ENV: [&str; 3] = ["META_PASSWORD", "ACCESS_KEY", "SECRET_KEY"];

/// A secret field that is required and absent or empty.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReadSecrets {
    /// The secret map lacks a required key.
    #[error("secret field {key:?} is required")]
    MissingKey { key: &'static str },
    /// A `format-options` entry is not `key=value` or `flag` with safe characters.
    #[error(
        "secret field \"format-options\" has an invalid entry (use key=value, comma separated)"
    )]
    BadFormatOption,
    /// `envs` is not a map of variable names to scalar values (the text is not repeated: it
    /// holds credentials).
    #[error("secret field \"envs\" is not a JSON or YAML map of environment variables")]
    BadEnvs,
    /// An `envs` name is not a plain variable name, changes what the child runs, or shadows a
    /// variable the driver sets.
    #[error("secret field \"envs\" may not set {name:?} ({why})")]
    ForbiddenEnv { name: String, why: &'static str },
    /// A `wasb` bucket whose host is an IP address: JuiceFS would take its first number as the
    /// container name.
    #[error(
        "secret field \"bucket\" for storage wasb must be http(s)://CONTAINER.HOST[:PORT]: \
         JuiceFS takes the container name from the first label of the host (got an IP address)"
    )]
    WasbBucketWithoutContainer,
}

/// JuiceFS credentials for one filesystem. `Debug` shows which fields are set, never values.
#[derive(Clone, PartialEq, Eq)]
pub struct JuiceFsSecrets {
    /// Filesystem name.
    pub name: String,
    meta_url: String,
    storage: Option<String>,
    bucket: Option<String>,
    access_key: Option<String>,
    secret_key: Option<String>,
    format_options: Vec<String>,
    envs: BTreeMap<String, String>,
}

impl fmt::Debug for JuiceFsSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |o: &Option<String>| if o.is_some() { "<set>" } else { "<unset>" };
        f.debug_struct("JuiceFsSecrets")
            .field("name", &self.name)
            .field("metaurl", &"<redacted>")
            .field("storage", &self.storage)
            .field("bucket", &set(&self.bucket))
            .field("access-key", &set(&self.access_key))
            .field("secret-key", &set(&self.secret_key))
            .field("format-options", &self.format_options.len())
            .field("envs", &self.envs.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The metadata URL split so that its password travels in `META_PASSWORD`, not in argv.
#[derive(Clone, PartialEq, Eq)]
pub struct MetaUrl {
    /// URL without the password (safe to pass as an argument).
    pub without_password: String,
    /// The password, when the URL had one.
    pub password: Option<String>,
}

impl fmt::Debug for MetaUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetaUrl")
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl JuiceFsSecrets {
    /// Reads the CSI secret map (plus, for static volumes, the volume context as fallback).
    ///
    /// Errors: [`ReadSecrets::MissingKey`] for an absent `name` or `metaurl`;
    /// [`ReadSecrets::BadFormatOption`] for a `format-options` entry that is not a plain flag;
    /// [`ReadSecrets::BadEnvs`] / [`ReadSecrets::ForbiddenEnv`] for an unusable `envs`;
    /// [`ReadSecrets::WasbBucketWithoutContainer`] for a `wasb` bucket on an IP address.
    pub fn from_maps(
        secrets: &HashMap<String, String>,
        context: &HashMap<String, String>,
    ) -> Result<Self, ReadSecrets> {
        let get = |k: &str| {
            secrets
                .get(k)
                .or_else(|| context.get(k))
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let name = get(keys::NAME).ok_or(ReadSecrets::MissingKey { key: keys::NAME })?;
        let meta_url = get(keys::METAURL).ok_or(ReadSecrets::MissingKey { key: keys::METAURL })?;
        let format_options = match get(keys::FORMAT_OPTIONS) {
            None => Vec::new(),
            Some(raw) => raw
                .split(',')
                .map(str::trim)
                .filter(|o| !o.is_empty())
                .map(|o| {
                    let key = o.split('=').next().unwrap_or_default();
                    let ok = !key.is_empty()
                        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                        && !key.starts_with('-');
                    if ok {
                        Ok(format!("--{o}"))
                    } else {
                        Err(ReadSecrets::BadFormatOption)
                    }
                })
                .collect::<Result<_, _>>()?,
        };
        let envs = match get(keys::ENVS) {
            None => BTreeMap::new(),
            Some(raw) => parse_envs(&raw)?,
        };
        let storage = get(keys::STORAGE);
        let bucket = get(keys::BUCKET);
        if storage.as_deref() == Some("wasb")
            && let Some(b) = &bucket
            && bucket_host_is_ip(b)
        {
            return Err(ReadSecrets::WasbBucketWithoutContainer);
        }
        Ok(Self {
            name,
            meta_url,
            storage,
            bucket,
            access_key: get(keys::ACCESS_KEY),
            secret_key: get(keys::SECRET_KEY),
            format_options,
            envs,
        })
    }

    /// True when the secret asks for `juicefs format` (it names an object storage).
    pub fn wants_format(&self) -> bool {
        self.storage.is_some() || self.bucket.is_some()
    }

    /// The metadata URL, password split off.
    pub fn meta_url(&self) -> MetaUrl {
        split_meta_password(&self.meta_url)
    }

    /// `--storage/--bucket` and the `format-options` flags (no credential among them).
    pub fn format_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(s) = &self.storage {
            args.push(format!("--storage={s}"));
        }
        if let Some(b) = &self.bucket {
            args.push(format!("--bucket={b}"));
        }
        args.extend(self.format_options.iter().cloned());
        args
    }

    /// Environment for a `juicefs` child: credentials go here, never into argv. The `envs`
    /// variables come first; none of them shares a name with the driver's own.
    pub fn child_env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .envs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(p) = self.meta_url().password {
            env.push(("META_PASSWORD".into(), p));
        }
        if let Some(a) = &self.access_key {
            env.push(("ACCESS_KEY".into(), a.clone()));
        }
        if let Some(s) = &self.secret_key {
            env.push(("SECRET_KEY".into(), s.clone()));
        }
        env
    }

    /// A stable, non-secret key for this filesystem (used for directory names).
    pub fn fs_key(&self) -> String {
        format!(
            "{}-{:016x}",
            sanitize(&self.name),
            fnv1a64(self.meta_url.as_bytes())
        )
    }

    /// A scrubber that removes every value of these secrets from text.
    pub fn scrubber(&self) -> Scrubber {
        let mut values = vec![self.meta_url.clone()];
        values.extend(self.meta_url().password);
        values.extend(self.access_key.iter().cloned());
        values.extend(self.secret_key.iter().cloned());
        // Numbers and booleans in `envs` are settings, not credentials; scrubbing "1" from every
        // message would only garble it.
        values.extend(
            self.envs
                .values()
                .filter(|v| v.parse::<f64>().is_err() && *v != "true" && *v != "false")
                .cloned(),
        );
        Scrubber::new(values)
    }

    /// Serialises for the node's state dir (file mode 0600, root-only): needed to remount after
    /// a restart without the CO. Never logged.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert(keys::NAME.to_string(), self.name.clone());
        m.insert(keys::METAURL.to_string(), self.meta_url.clone());
        let opt = [
            (keys::STORAGE, &self.storage),
            (keys::BUCKET, &self.bucket),
            (keys::ACCESS_KEY, &self.access_key),
            (keys::SECRET_KEY, &self.secret_key),
        ];
        for (k, v) in opt {
            if let Some(v) = v {
                m.insert(k.to_string(), v.clone());
            }
        }
        if !self.format_options.is_empty() {
            let raw: Vec<&str> = self
                .format_options
                .iter()
                .map(|o| o.trim_start_matches("--"))
                .collect();
            m.insert(keys::FORMAT_OPTIONS.to_string(), raw.join(","));
        }
        if !self.envs.is_empty() {
            // A map of strings always serialises.
            m.insert(
                keys::ENVS.to_string(),
                serde_json::to_string(&self.envs).unwrap_or_default(),
            );
        }
        m
    }
}

/// Parses `envs`: a JSON or YAML map (YAML is a superset of JSON) of variable names to scalar
/// values; names are checked, values kept verbatim.
fn parse_envs(raw: &str) -> Result<BTreeMap<String, String>, ReadSecrets> {
    let map: BTreeMap<String, serde_yaml::Value> =
        serde_yaml::from_str(raw).map_err(|_| ReadSecrets::BadEnvs)?;
    let mut out = BTreeMap::new();
    for (name, value) in map {
        let value = match value {
            serde_yaml::Value::String(s) => s,
            serde_yaml::Value::Number(n) => n.to_string(),
            serde_yaml::Value::Bool(b) => b.to_string(),
            serde_yaml::Value::Null
            | serde_yaml::Value::Sequence(_)
            | serde_yaml::Value::Mapping(_)
            | serde_yaml::Value::Tagged(_) => return Err(ReadSecrets::BadEnvs),
        };
        let forbid = |why| ReadSecrets::ForbiddenEnv {
            name: name.clone(),
            why,
        };
        let plain = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !plain {
            return Err(forbid("not a variable name"));
        }
        if name.starts_with("LD_") || name == "PATH" {
            return Err(forbid("it changes what the client runs"));
        }
        if DRIVER_ENV.contains(&name.as_str()) {
            return Err(forbid(
                "the driver sets it from metaurl, access-key, secret-key",
            ));
        }
        out.insert(name, value);
    }
    Ok(out)
}

/// True when a bucket URL's host is an IPv4 address (or `[IPv6]`).
fn bucket_host_is_ip(bucket: &str) -> bool {
    let rest = bucket.split_once("://").map_or(bucket, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.starts_with('[') {
        return true;
    }
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    host.parse::<std::net::Ipv4Addr>().is_ok()
}

/// The credential parts of an Azure connection string (`AccountKey=...;SharedAccessSignature=...`),
/// which a client may echo on their own.
fn connection_string_secrets(value: &str) -> Vec<String> {
    value
        .split(';')
        .filter_map(|part| part.split_once('='))
        .filter(|(k, _)| {
            let k = k.trim();
            k.eq_ignore_ascii_case("AccountKey") || k.eq_ignore_ascii_case("SharedAccessSignature")
        })
        .map(|(_, v)| v.trim().to_string())
        .collect()
}

/// Splits `scheme://user:password@host/...` into the URL without the password and the password.
pub fn split_meta_password(url: &str) -> MetaUrl {
    let unchanged = MetaUrl {
        without_password: url.to_string(),
        password: None,
    };
    let Some(scheme_end) = url.find("://") else {
        return unchanged;
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return unchanged;
    };
    let userinfo = &authority[..at];
    let Some(colon) = userinfo.find(':') else {
        return unchanged;
    };
    let user = &userinfo[..colon];
    let password = &userinfo[colon + 1..];
    if password.is_empty() {
        return unchanged;
    }
    let host_and_path = &rest[at + 1..];
    let without_password = if user.is_empty() {
        format!("{}{}", &url[..scheme_end + 3], host_and_path)
    } else {
        format!("{}{}@{}", &url[..scheme_end + 3], user, host_and_path)
    };
    MetaUrl {
        without_password,
        password: Some(password.to_string()),
    }
}

/// Replaces every secret value found in a text with `<redacted>`.
#[derive(Clone, Default)]
pub struct Scrubber {
    values: Vec<String>,
}

impl fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scrubber({} values)", self.values.len())
    }
}

impl Scrubber {
    /// A scrubber for these values and the key parts of any Azure connection string among
    /// them (empty ones ignored; longest replaced first).
    pub fn new(values: impl IntoIterator<Item = String>) -> Self {
        let mut values: Vec<String> = values.into_iter().filter(|v| !v.is_empty()).collect();
        let parts: Vec<String> = values
            .iter()
            .flat_map(|v| connection_string_secrets(v))
            .collect();
        values.extend(parts.into_iter().filter(|v| !v.is_empty()));
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        values.dedup();
        Self { values }
    }

    /// A scrubber for every value of a raw CSI secret map.
    pub fn from_map(secrets: &HashMap<String, String>) -> Self {
        let mut values: Vec<String> = secrets.values().cloned().collect();
        if let Some(url) = secrets.get(keys::METAURL) {
            values.extend(split_meta_password(url).password);
        }
        // The values inside `envs`, even when the map as a whole is malformed elsewhere.
        if let Some(raw) = secrets.get(keys::ENVS)
            && let Ok(map) = serde_yaml::from_str::<BTreeMap<String, serde_yaml::Value>>(raw)
        {
            values.extend(map.into_values().filter_map(|v| match v {
                serde_yaml::Value::String(s) => Some(s),
                serde_yaml::Value::Number(n) => Some(n.to_string()),
                serde_yaml::Value::Null
                | serde_yaml::Value::Bool(_)
                | serde_yaml::Value::Sequence(_)
                | serde_yaml::Value::Mapping(_)
                | serde_yaml::Value::Tagged(_) => None,
            }));
        }
        // Names of filesystems and storage types (`wasb`, `s3`) are not secret in JuiceFS CSI
        // either; keep errors readable.
        for key in [keys::NAME, keys::STORAGE] {
            if let Some(plain) = secrets.get(key) {
                values.retain(|v| v != plain);
            }
        }
        Self::new(values)
    }

    /// Adds the values of another scrubber.
    pub fn merge(mut self, other: &Scrubber) -> Self {
        self.values.extend(other.values.iter().cloned());
        Self::new(self.values)
    }

    /// The text with every secret value replaced.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        for v in &self.values {
            if out.contains(v.as_str()) {
                out = out.replace(v.as_str(), "<redacted>");
            }
        }
        out
    }
}

/// A filesystem-safe rendering of a name.
pub fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect()
}

/// FNV-1a, 64 bit: a stable hash for directory names (not for security).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn splits_the_password_out_of_a_redis_url() {
        let m = split_meta_password("redis://:hunter2@127.0.0.1:6379/1");
        assert_eq!(m.without_password, "redis://127.0.0.1:6379/1");
        assert_eq!(m.password.as_deref(), Some("hunter2"));
        let m = split_meta_password("mysql://root:pw@(127.0.0.1:3306)/juicefs");
        assert_eq!(m.without_password, "mysql://root@(127.0.0.1:3306)/juicefs");
        let m = split_meta_password("redis://127.0.0.1:6379/1");
        assert_eq!(m.password, None);
        assert_eq!(split_meta_password("nourl").without_password, "nourl");
    }

    #[test]
    fn debug_output_never_shows_a_secret_value() {
        let s = JuiceFsSecrets::from_maps(
            &map(&[
                ("name", "fs1"),
                ("metaurl", "redis://:hunter2@h/1"),
                ("access-key", "AKIAXYZ"),
                ("secret-key", "verysecret"),
                ("bucket", "/tmp/b"),
            ]),
            &HashMap::new(),
        )
        .unwrap();
        let d = format!("{s:?} {:?} {:?}", s.meta_url(), s.scrubber());
        for v in ["hunter2", "AKIAXYZ", "verysecret", "redis://"] {
            assert!(!d.contains(v), "{d}");
        }
        assert!(s.wants_format());
        assert!(s.child_env().iter().any(|(k, _)| *k == "META_PASSWORD"));
    }

    #[test]
    fn scrubber_removes_every_secret_value_and_the_embedded_password() {
        let raw = map(&[
            ("name", "fs1"),
            ("metaurl", "redis://:hunter2@h/1"),
            ("secret-key", "verysecret"),
        ]);
        let s = Scrubber::from_map(&raw);
        let t = s.scrub("dial redis://:hunter2@h/1 failed; auth hunter2; key verysecret on fs1");
        assert_eq!(
            t,
            "dial <redacted> failed; auth <redacted>; key <redacted> on fs1"
        );
    }

    const CONN: &str = "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;\
                        AccountKey=S0mE+Key/Value==;BlobEndpoint=http://127.0.0.1:1/devstoreaccount1;";

    #[test]
    fn a_connection_string_in_envs_reaches_the_child_environment_and_never_argv_or_debug() {
        for envs in [
            format!("{{\"AZURE_STORAGE_CONNECTION_STRING\": \"{CONN}\", \"JFS_X\": 1}}"),
            format!("AZURE_STORAGE_CONNECTION_STRING: \"{CONN}\"\nJFS_X: 1\n"),
        ] {
            let s = JuiceFsSecrets::from_maps(
                &map(&[
                    ("name", "az"),
                    ("metaurl", "redis://:pw@h/1"),
                    ("storage", "wasb"),
                    ("bucket", "http://jfs.127.0.0.1:10000"),
                    ("envs", &envs),
                ]),
                &HashMap::new(),
            )
            .unwrap();
            let env = s.child_env();
            assert!(
                env.contains(&("AZURE_STORAGE_CONNECTION_STRING".into(), CONN.into())),
                "{env:?}"
            );
            assert!(env.contains(&("JFS_X".into(), "1".into())));
            assert_eq!(
                s.format_args(),
                vec!["--storage=wasb", "--bucket=http://jfs.127.0.0.1:10000"]
            );
            let shown = format!("{s:?}");
            assert!(!shown.contains("S0mE") && shown.contains("AZURE_STORAGE_CONNECTION_STRING"));
            // Persisted for remounts and read back the same.
            let back =
                JuiceFsSecrets::from_maps(&s.to_map().into_iter().collect(), &HashMap::new())
                    .unwrap();
            assert_eq!(back, s);
        }
    }

    #[test]
    fn account_name_and_key_go_to_access_key_and_secret_key_variables() {
        let s = JuiceFsSecrets::from_maps(
            &map(&[
                ("name", "az"),
                ("metaurl", "redis://h/1"),
                ("storage", "wasb"),
                ("bucket", "https://jfs.blob.core.windows.net"),
                ("access-key", "myaccount"),
                ("secret-key", "bXlrZXk="),
            ]),
            &HashMap::new(),
        )
        .unwrap();
        assert_eq!(
            s.child_env(),
            vec![
                ("ACCESS_KEY".to_string(), "myaccount".to_string()),
                ("SECRET_KEY".to_string(), "bXlrZXk=".to_string())
            ]
        );
        assert!(s.format_args().iter().all(|a| !a.contains("bXlrZXk")));
    }

    #[test]
    fn unusable_envs_and_a_wasb_bucket_on_an_ip_address_are_refused() {
        let with = |extra: &[(&str, &str)]| {
            let mut m = map(&[("name", "a"), ("metaurl", "redis://h")]);
            m.extend(map(extra));
            JuiceFsSecrets::from_maps(&m, &HashMap::new())
        };
        assert_eq!(with(&[("envs", "[1, 2]")]), Err(ReadSecrets::BadEnvs));
        assert_eq!(with(&[("envs", "{A: [1]}")]), Err(ReadSecrets::BadEnvs));
        assert_eq!(with(&[("envs", "{\"x")]), Err(ReadSecrets::BadEnvs));
        for name in [
            "LD_PRELOAD",
            "PATH",
            "META_PASSWORD",
            "SECRET_KEY",
            "A-B",
            "1X",
        ] {
            let e = with(&[("envs", &format!("{{\"{name}\": \"v\"}}"))]).unwrap_err();
            assert!(
                matches!(&e, ReadSecrets::ForbiddenEnv { name: n, .. } if n == name),
                "{e:?}"
            );
        }
        // The error never repeats the value.
        let e = with(&[("envs", "{\"AZURE\": [\"s3cr3t\"]}")]).unwrap_err();
        assert!(!e.to_string().contains("s3cr3t"));
        for bucket in [
            "http://127.0.0.1:10000/devstoreaccount1/jfs",
            "http://[::1]:10000/x",
        ] {
            assert_eq!(
                with(&[("storage", "wasb"), ("bucket", bucket)]),
                Err(ReadSecrets::WasbBucketWithoutContainer)
            );
        }
        // The same path-style URL is how S3-compatible servers are addressed.
        assert!(with(&[("storage", "s3"), ("bucket", "http://127.0.0.1:9000/b")]).is_ok());
        assert!(with(&[("storage", "wasb"), ("bucket", "http://jfs.127.0.0.1:1")]).is_ok());
        assert!(with(&[("envs", "{}")]).is_ok_and(|s| s.child_env().is_empty()));
    }

    #[test]
    fn scrubber_removes_envs_values_and_the_account_key_inside_a_connection_string() {
        let raw = map(&[
            ("name", "fs1"),
            ("metaurl", "redis://h/1"),
            (
                "envs",
                &format!("{{\"AZURE_STORAGE_CONNECTION_STRING\": \"{CONN}\"}}"),
            ),
        ]);
        let text = format!(
            "bad string {CONN}; key S0mE+Key/Value== rejected for devstoreaccount1 on wasb://fs1"
        );
        let want =
            "bad string <redacted>; key <redacted> rejected for devstoreaccount1 on wasb://fs1";
        assert_eq!(Scrubber::from_map(&raw).scrub(&text), want);
        let parsed = JuiceFsSecrets::from_maps(&raw, &HashMap::new()).unwrap();
        assert_eq!(parsed.scrubber().scrub(&text), want);
    }

    #[test]
    fn missing_name_or_metaurl_is_rejected_and_format_options_are_checked() {
        let e = JuiceFsSecrets::from_maps(&map(&[("metaurl", "redis://h")]), &HashMap::new());
        assert_eq!(e, Err(ReadSecrets::MissingKey { key: "name" }));
        let e = JuiceFsSecrets::from_maps(&map(&[("name", "a")]), &HashMap::new());
        assert_eq!(e, Err(ReadSecrets::MissingKey { key: "metaurl" }));
        let ok = JuiceFsSecrets::from_maps(
            &map(&[
                ("name", "a"),
                ("metaurl", "redis://h"),
                ("format-options", "trash-days=0, block-size=4096"),
            ]),
            &HashMap::new(),
        )
        .unwrap();
        assert_eq!(
            ok.format_args(),
            vec!["--trash-days=0", "--block-size=4096"]
        );
        assert_eq!(
            JuiceFsSecrets::from_maps(&ok.to_map().into_iter().collect(), &HashMap::new()).unwrap(),
            ok
        );
        let bad = JuiceFsSecrets::from_maps(
            &map(&[
                ("name", "a"),
                ("metaurl", "redis://h"),
                ("format-options", "--x;rm"),
            ]),
            &HashMap::new(),
        );
        assert_eq!(bad, Err(ReadSecrets::BadFormatOption));
    }
}
