//! Step 1 of the reconcile pipeline: turn a `VectorCluster` into a [`ValidatedCluster`] or a
//! [`ValidationError`] a human can act on.
//!
//! The schema already refuses most bad input (types, enums, minimums); this module checks what a
//! structural schema cannot express (one-of choices, cross-field rules, name lengths) and resolves
//! defaults into plain enums, so builders never see an ambiguous spec. Pure: no API calls.

use crate::crd::{
    ExternalMetadata, ExternalRedis, ManagedDatabase, ManagedRedis, ObjectStorageType,
    VectorCluster, VectorClusterSpec,
};
use crate::names::Names;

/// The longest cluster name whose derived names (`NAME-writer-0`, pod template hashes) stay
/// within the 63-character label limit.
pub const MAX_CLUSTER_NAME: usize = 40;

/// A spec the operator refuses, with what to change.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ValidationError {
    #[error("object has no {0}; the API server always sets it")]
    MissingField(&'static str),
    #[error("cluster name {name:?} is {len} characters; use at most {MAX_CLUSTER_NAME}")]
    NameTooLong { name: String, len: usize },
    #[error("spec.metadata sets both managed and external; choose one")]
    MetadataBothSet,
    #[error("spec.storage.redis sets both managed and external; choose one")]
    RedisBothSet,
    #[error("spec.readers.replicas is {0}; it must be 0 or more")]
    NegativeReplicas(i32),
    #[error("spec.readers.gpu is set but spec.readers.replicas is 0; add readers or remove gpu")]
    GpuWithoutReaders,
    #[error("spec.readers.gpu.count is {0}; it must be 1 or more")]
    GpuCount(i32),
    #[error(
        "spec.readers.gpu.memoryBudget is {0:?}; use a size of at least one byte (and below 16Ei) such as 40Gi"
    )]
    GpuMemoryBudget(String),
    #[error("spec.readers.replicationFactor is {0}; it must be 1 or more")]
    ReplicationFactor(i32),
    #[error("spec.router.replicas is {0}; it must be 1 or more")]
    RouterReplicas(i32),
    #[error("spec.router.service.port is {0}; it must be within 1..=65535")]
    RouterPort(i32),
    #[error("{field} is {value:?}, not a Kubernetes quantity such as 10Gi")]
    Quantity { field: &'static str, value: String },
    #[error("spec.engine.flushInterval is {0:?}; use a duration such as 500ms, 1s or 2m")]
    FlushInterval(String),
    #[error(
        "{0} is empty; set it (only objectStorage.type redis with the managed Redis may omit the bucket)"
    )]
    Empty(&'static str),
    #[error(
        "spec.storage.objectStorage.bucket is {0:?}; with type file it must be an absolute directory"
    )]
    FileBucket(String),
    #[error(
        "spec.storage.objectStorage.bucket is {0:?}; with type wasb it must be \
         http(s)://CONTAINER.HOST[:PORT] (JuiceFS takes the container from the first label of \
         the host, and an IP address has none)"
    )]
    WasbBucket(String),
    #[error(
        "spec.storage.objectStorage.credentialsSecretRef.connectionStringKey is set but type is \
         {0}; a connection string is for type wasb only"
    )]
    ConnectionStringNotWasb(&'static str),
}

impl ValidationError {
    /// Condition reason (CamelCase, stable).
    pub fn reason(&self) -> &'static str {
        match self {
            ValidationError::MissingField(_) => "MissingField",
            ValidationError::NameTooLong { .. } => "NameTooLong",
            ValidationError::MetadataBothSet => "MetadataBothSet",
            ValidationError::RedisBothSet => "RedisBothSet",
            ValidationError::NegativeReplicas(_) => "NegativeReplicas",
            ValidationError::GpuWithoutReaders => "GpuWithoutReaders",
            ValidationError::GpuCount(_) => "InvalidGpuCount",
            ValidationError::GpuMemoryBudget(_) => "InvalidGpuMemoryBudget",
            ValidationError::ReplicationFactor(_) => "InvalidReplicationFactor",
            ValidationError::RouterReplicas(_) => "InvalidRouterReplicas",
            ValidationError::RouterPort(_) => "InvalidRouterPort",
            ValidationError::Quantity { .. } => "InvalidQuantity",
            ValidationError::FlushInterval(_) => "InvalidFlushInterval",
            ValidationError::Empty(_) => "EmptyField",
            ValidationError::FileBucket(_) | ValidationError::WasbBucket(_) => "InvalidBucket",
            ValidationError::ConnectionStringNotWasb(_) => "InvalidCredentials",
        }
    }
}

/// Where the catalogue lives.
#[derive(Clone, Debug, PartialEq)]
pub enum MetadataSource {
    Managed(ManagedDatabase),
    External(ExternalMetadata),
}

/// Where JuiceFS metadata lives.
#[derive(Clone, Debug, PartialEq)]
pub enum RedisSource {
    Managed(ManagedRedis),
    External(ExternalRedis),
}

/// A spec that passed validation, with its identity. Builders take only this.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedCluster {
    pub names: Names,
    pub uid: String,
    pub generation: i64,
    pub spec: VectorClusterSpec,
    pub metadata: MetadataSource,
    pub redis: RedisSource,
}

/// Validates a VectorCluster.
///
/// Errors: the first rule the spec breaks, worded so the user knows what to change.
pub fn validate(vc: &VectorCluster) -> Result<ValidatedCluster, ValidationError> {
    let name = vc
        .metadata
        .name
        .clone()
        .ok_or(ValidationError::MissingField("metadata.name"))?;
    let namespace = vc
        .metadata
        .namespace
        .clone()
        .ok_or(ValidationError::MissingField("metadata.namespace"))?;
    let uid = vc
        .metadata
        .uid
        .clone()
        .ok_or(ValidationError::MissingField("metadata.uid"))?;
    if name.len() > MAX_CLUSTER_NAME {
        return Err(ValidationError::NameTooLong {
            len: name.len(),
            name,
        });
    }
    let spec = &vc.spec;
    let metadata = match (&spec.metadata.managed, &spec.metadata.external) {
        (Some(_), Some(_)) => return Err(ValidationError::MetadataBothSet),
        (Some(m), None) => MetadataSource::Managed(m.clone()),
        (None, Some(e)) => MetadataSource::External(e.clone()),
        (None, None) => MetadataSource::Managed(ManagedDatabase::default()),
    };
    let redis = match (&spec.storage.redis.managed, &spec.storage.redis.external) {
        (Some(_), Some(_)) => return Err(ValidationError::RedisBothSet),
        (Some(m), None) => RedisSource::Managed(m.clone()),
        (None, Some(e)) => RedisSource::External(e.clone()),
        (None, None) => RedisSource::Managed(ManagedRedis::default()),
    };
    if spec.engine.image.trim().is_empty() {
        return Err(ValidationError::Empty("spec.engine.image"));
    }
    if !is_duration(&spec.engine.flush_interval) {
        return Err(ValidationError::FlushInterval(
            spec.engine.flush_interval.clone(),
        ));
    }
    let readers = &spec.readers;
    if readers.replicas < 0 {
        return Err(ValidationError::NegativeReplicas(readers.replicas));
    }
    if readers.replication_factor < 1 {
        return Err(ValidationError::ReplicationFactor(
            readers.replication_factor,
        ));
    }
    if let Some(gpu) = &readers.gpu {
        if readers.replicas == 0 {
            return Err(ValidationError::GpuWithoutReaders);
        }
        if gpu.count < 1 {
            return Err(ValidationError::GpuCount(gpu.count));
        }
        if gpu.resource_name.trim().is_empty() {
            return Err(ValidationError::Empty("spec.readers.gpu.resourceName"));
        }
        if let Some(b) = &gpu.memory_budget {
            check_quantity("spec.readers.gpu.memoryBudget", b)?;
            if quantity_bytes(b).is_none_or(|n| n == 0) {
                return Err(ValidationError::GpuMemoryBudget(b.clone()));
            }
        }
    }
    if spec.router.replicas < 1 {
        return Err(ValidationError::RouterReplicas(spec.router.replicas));
    }
    if !(1..=65535).contains(&spec.router.service.port) {
        return Err(ValidationError::RouterPort(spec.router.service.port));
    }
    check_quantity("spec.storage.capacity", &spec.storage.capacity)?;
    check_quantity("spec.writer.wal.storage", &spec.writer.wal.storage)?;
    if let MetadataSource::Managed(m) = &metadata {
        check_quantity("spec.metadata.managed.storage", &m.storage)?;
    }
    if let RedisSource::Managed(r) = &redis {
        check_quantity("spec.storage.redis.managed.storage", &r.storage)?;
    }
    let os = &spec.storage.object_storage;
    let redis_in_managed =
        os.type_ == ObjectStorageType::Redis && matches!(redis, RedisSource::Managed(_));
    if os.bucket.trim().is_empty() && !redis_in_managed {
        return Err(ValidationError::Empty("spec.storage.objectStorage.bucket"));
    }
    if os.type_ == ObjectStorageType::File && !os.bucket.starts_with('/') {
        return Err(ValidationError::FileBucket(os.bucket.clone()));
    }
    if os.type_ == ObjectStorageType::Wasb && bucket_host_is_ip(&os.bucket) {
        return Err(ValidationError::WasbBucket(os.bucket.clone()));
    }
    if os.type_ != ObjectStorageType::Wasb
        && os
            .credentials_secret_ref
            .as_ref()
            .is_some_and(|r| r.connection_string_key.is_some())
    {
        return Err(ValidationError::ConnectionStringNotWasb(os.type_.as_str()));
    }
    Ok(ValidatedCluster {
        names: Names::new(&name, &namespace),
        uid,
        generation: vc.metadata.generation.unwrap_or(0),
        spec: spec.clone(),
        metadata,
        redis,
    })
}

/// True when a bucket URL's host is an IPv4 address or a bracketed IPv6 one.
fn bucket_host_is_ip(bucket: &str) -> bool {
    let rest = bucket.split_once("://").map_or(bucket, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.starts_with('[') {
        return true;
    }
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    host.parse::<std::net::Ipv4Addr>().is_ok()
}

fn check_quantity(field: &'static str, value: &str) -> Result<(), ValidationError> {
    if is_quantity(value) {
        Ok(())
    } else {
        Err(ValidationError::Quantity {
            field,
            value: value.to_string(),
        })
    }
}

/// A non-negative decimal with an optional binary or decimal suffix (the forms users write).
fn is_quantity(s: &str) -> bool {
    const SUFFIXES: [&str; 13] = [
        "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "k", "M", "G", "T", "P", "E", "",
    ];
    SUFFIXES.iter().any(|suf| {
        s.strip_suffix(suf).is_some_and(|num| {
            let mut parts = num.splitn(2, '.');
            let int = parts.next().unwrap_or("");
            let frac = parts.next();
            !int.is_empty()
                && int.bytes().all(|b| b.is_ascii_digit())
                && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
        })
    })
}

/// The number of bytes a quantity [`is_quantity`] accepts stands for, the Kubernetes way: binary
/// suffixes (`Ki` .. `Ei`) are powers of 1024, decimal ones (`k`, `M`, `G`, `T`, `P`, `E`)
/// powers of 1000; a fraction is rounded down to whole bytes. `None` when `s` is not a quantity
/// or the count does not fit a u64.
///
/// The engine's own byte-size flags read `G` as GiB, so the operator passes sizes to it as
/// this plain byte count, which both sides read the same way.
pub fn quantity_bytes(s: &str) -> Option<u64> {
    const UNITS: [(&str, u128); 13] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("Pi", 1 << 50),
        ("Ei", 1 << 60),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("P", 1_000_000_000_000_000),
        ("E", 1_000_000_000_000_000_000),
        ("", 1),
    ];
    if !is_quantity(s) {
        return None;
    }
    UNITS.iter().find_map(|&(suffix, unit)| {
        let num = s.strip_suffix(suffix)?;
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        if int.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        // 19 fractional digits already resolve below one byte for every unit up to Ei.
        let frac = &frac[..frac.len().min(19)];
        let whole = int.parse::<u128>().ok()?.checked_mul(unit)?;
        let part = if frac.is_empty() {
            0
        } else {
            frac.parse::<u128>().ok()?.checked_mul(unit)? / 10u128.pow(frac.len() as u32)
        };
        u64::try_from(whole.checked_add(part)?).ok()
    })
}

fn is_duration(s: &str) -> bool {
    ["ms", "s", "m"].iter().any(|suf| {
        s.strip_suffix(suf)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_accept_what_users_write_and_refuse_the_rest() {
        for ok in ["10Gi", "1Ti", "500M", "1.5Gi", "1024"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "Gi", "10 Gi", "-1Gi", "ten", "1.Gi", "10GB"] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }

    #[test]
    fn quantities_convert_to_bytes_with_binary_and_decimal_suffixes() {
        for (q, bytes) in [
            ("40Gi", 40u64 << 30),
            ("40G", 40_000_000_000),
            ("512Mi", 512 << 20),
            ("500M", 500_000_000),
            ("1.5Gi", 3 << 29),
            ("0.5k", 500),
            ("1024", 1024),
            ("1Ei", 1 << 60),
            ("15Ei", 15 << 60),
        ] {
            assert_eq!(quantity_bytes(q), Some(bytes), "{q}");
        }
        for none in ["16Ei", "20E", "99999999999999999999", "10GB", "", "1.Gi"] {
            assert_eq!(quantity_bytes(none), None, "{none}");
        }
    }

    #[test]
    fn durations_need_a_unit() {
        assert!(is_duration("1s") && is_duration("500ms") && is_duration("2m"));
        assert!(!is_duration("1") && !is_duration("s") && !is_duration("1h"));
    }
}
