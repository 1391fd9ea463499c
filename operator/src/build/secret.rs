//! The generated Secret: MySQL root/user passwords, the engine's metadata URI and the Redis
//! password. Created once and never overwritten (a new password would lock the engine out of
//! data the old one protects), so it is built but not hash-applied like the rest.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use rand::Rng;
use rand::distr::Alphanumeric;

use super::object_meta;
use crate::crd::ReclaimPolicy;
use crate::names::{
    Component, KEY_META_URI, KEY_MYSQL_PASSWORD, KEY_MYSQL_ROOT_PASSWORD, KEY_REDIS_PASSWORD,
    MYSQL_DATABASE, MYSQL_USER, PORT_MYSQL,
};
use crate::validate::ValidatedCluster;

/// Passwords of the generated Secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub mysql_root_password: String,
    pub mysql_password: String,
    pub redis_password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

impl Credentials {
    /// Fresh random passwords (32 alphanumerics: URI-safe, no escaping needed).
    pub fn generate<R: Rng>(rng: &mut R) -> Self {
        let mut pw = || -> String {
            (0..32)
                .map(|_| char::from(rng.sample(Alphanumeric)))
                .collect()
        };
        Self {
            mysql_root_password: pw(),
            mysql_password: pw(),
            redis_password: pw(),
        }
    }

    /// Reads the passwords back from an existing generated Secret; `None` if a key is missing
    /// or not UTF-8 (someone edited it by hand).
    pub fn from_secret(secret: &Secret) -> Option<Self> {
        let data = secret.data.as_ref()?;
        let get = |k: &str| -> Option<String> {
            data.get(k)
                .and_then(|b| String::from_utf8(b.0.clone()).ok())
        };
        Some(Self {
            mysql_root_password: get(KEY_MYSQL_ROOT_PASSWORD)?,
            mysql_password: get(KEY_MYSQL_PASSWORD)?,
            redis_password: get(KEY_REDIS_PASSWORD)?,
        })
    }
}

/// The generated Secret for these credentials.
///
/// Under `reclaimPolicy: Retain` it has no owner reference: the managed MariaDB's and Redis's
/// volumes outlive a deleted cluster, and a re-created cluster of the same name must find the
/// passwords those volumes were initialised with (new random ones could never log in). Under
/// `Delete` the finalizer deletes it with the volumes.
pub fn build_generated_secret(vc: &ValidatedCluster, creds: &Credentials) -> Secret {
    let n = &vc.names;
    let uri = format!(
        "mysql://{MYSQL_USER}:{}@{}:{PORT_MYSQL}/{MYSQL_DATABASE}",
        creds.mysql_password,
        n.svc_host(&n.mysql())
    );
    let data = BTreeMap::from([
        (
            KEY_MYSQL_ROOT_PASSWORD.to_string(),
            ByteString(creds.mysql_root_password.clone().into_bytes()),
        ),
        (
            KEY_MYSQL_PASSWORD.to_string(),
            ByteString(creds.mysql_password.clone().into_bytes()),
        ),
        (KEY_META_URI.to_string(), ByteString(uri.into_bytes())),
        (
            KEY_REDIS_PASSWORD.to_string(),
            ByteString(creds.redis_password.clone().into_bytes()),
        ),
    ]);
    let mut metadata = object_meta(vc, n.generated_secret(), Component::Config);
    if vc.spec.storage.reclaim_policy == ReclaimPolicy::Retain {
        metadata.owner_references = None;
    }
    Secret {
        metadata,
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Secret::default()
    }
}
