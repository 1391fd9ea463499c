//! Request validation shared by the controller and node services: names, paths, capabilities,
//! capacity ranges, parameters. Pure functions; every rejection is a [`CsiError`] whose code
//! tells the CO the request itself is wrong.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use crate::csi;
use crate::csi::volume_capability::AccessType;
use crate::csi::volume_capability::access_mode::Mode;
use crate::error::CsiError;

/// Key in `CreateVolume.parameters` that chooses what DeleteVolume does with the data.
pub const PARAM_ON_DELETE: &str = "onDelete";
/// Key in the volume context naming the volume's directory inside the filesystem.
pub const CTX_SUB_PATH: &str = "subPath";

/// What DeleteVolume does with the volume's directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDelete {
    /// Remove the directory and its data.
    Delete,
    /// Keep the directory; only forget the volume.
    Retain,
}

/// A capability this driver can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    /// The access mode only allows reading.
    pub reader_only: bool,
    /// Extra `juicefs mount` flags, normalised to `--key[=value]`.
    pub mount_flags: Vec<String>,
}

/// Requires a non-empty string field.
pub fn required<'a>(field: &'static str, value: &'a str) -> Result<&'a str, CsiError> {
    if value.is_empty() {
        Err(CsiError::MissingField { field })
    } else {
        Ok(value)
    }
}

/// A volume name / id usable as one directory name: `[A-Za-z0-9._-]{1,128}`, not starting
/// with `.` (so it can never be `..` or our `.shoal-csi` bookkeeping directory).
pub fn volume_name(field: &'static str, value: &str) -> Result<String, CsiError> {
    required(field, value)?;
    let ok = value.len() <= 128
        && !value.starts_with('.')
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(value.to_string())
    } else {
        Err(CsiError::InvalidField {
            field,
            reason: "must be 1-128 characters of [A-Za-z0-9._-] not starting with '.'".into(),
        })
    }
}

/// An absolute path without `..` components.
pub fn abs_path(field: &'static str, value: &str) -> Result<PathBuf, CsiError> {
    required(field, value)?;
    let p = Path::new(value);
    if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) {
        return Err(CsiError::InvalidField {
            field,
            reason: "must be an absolute path without '..'".into(),
        });
    }
    Ok(p.to_path_buf())
}

/// The optional `subPath` of a volume context: relative, no `..`.
pub fn sub_path(context: &HashMap<String, String>) -> Result<Option<String>, CsiError> {
    match context.get(CTX_SUB_PATH).map(|s| s.trim_matches('/')) {
        None | Some("") => Ok(None),
        Some(s) => {
            let p = Path::new(s);
            if p.components().all(|c| matches!(c, Component::Normal(_))) {
                Ok(Some(s.to_string()))
            } else {
                Err(CsiError::InvalidField {
                    field: "volume_context.subPath",
                    reason: "must be a relative path without '..'".into(),
                })
            }
        }
    }
}

/// Checks one capability. Block access and foreign filesystem types are refused.
pub fn capability(cap: Option<&csi::VolumeCapability>) -> Result<Capability, CsiError> {
    let cap = cap.ok_or(CsiError::MissingField {
        field: "volume_capability",
    })?;
    let mount = match &cap.access_type {
        None => {
            return Err(CsiError::MissingField {
                field: "volume_capability.access_type",
            });
        }
        Some(AccessType::Block(_)) => {
            return Err(CsiError::UnsupportedCapability {
                reason: "block access; JuiceFS volumes are filesystems (use mount)".into(),
            });
        }
        Some(AccessType::Mount(m)) => m,
    };
    if !(mount.fs_type.is_empty() || mount.fs_type == "juicefs") {
        return Err(CsiError::UnsupportedCapability {
            reason: format!("fs_type {:?}; only \"juicefs\" (or empty)", mount.fs_type),
        });
    }
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or(CsiError::MissingField {
            field: "volume_capability.access_mode",
        })?
        .mode;
    let reader_only = match Mode::try_from(mode) {
        Ok(Mode::Unknown) | Err(_) => {
            return Err(CsiError::InvalidField {
                field: "volume_capability.access_mode",
                reason: format!("unknown access mode {mode}"),
            });
        }
        Ok(Mode::SingleNodeReaderOnly) | Ok(Mode::MultiNodeReaderOnly) => true,
        Ok(Mode::SingleNodeWriter)
        | Ok(Mode::MultiNodeSingleWriter)
        | Ok(Mode::MultiNodeMultiWriter)
        | Ok(Mode::SingleNodeSingleWriter)
        | Ok(Mode::SingleNodeMultiWriter) => false,
    };
    let mount_flags = mount
        .mount_flags
        .iter()
        .map(|f| mount_flag(f))
        .collect::<Result<_, _>>()?;
    Ok(Capability {
        reader_only,
        mount_flags,
    })
}

/// Normalises a `juicefs mount` option (`cache-size=1024` or `--cache-size=1024`).
/// The value is not echoed in errors: mount flags MAY be sensitive (spec).
fn mount_flag(flag: &str) -> Result<String, CsiError> {
    let f = flag.trim().trim_start_matches("--");
    let key = f.split('=').next().unwrap_or_default();
    let forbidden = matches!(key, "d" | "background" | "log" | "update-fstab");
    let ok = !key.is_empty()
        && !forbidden
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !key.starts_with('-');
    if ok {
        Ok(format!("--{f}"))
    } else {
        Err(CsiError::UnsupportedCapability {
            reason: "a mount flag is not a juicefs mount option of the form key[=value] \
                     (background/log/update-fstab are managed by the driver)"
                .into(),
        })
    }
}

/// Every capability of a list (REQUIRED non-empty).
pub fn capabilities(caps: &[csi::VolumeCapability]) -> Result<Vec<Capability>, CsiError> {
    if caps.is_empty() {
        return Err(CsiError::MissingField {
            field: "volume_capabilities",
        });
    }
    caps.iter().map(|c| capability(Some(c))).collect()
}

/// The capacity to record for a range: `required` if set, else `limit`, else 0 (unlimited).
///
/// Errors: negative values ([`CsiError::InvalidField`]); `required > limit`
/// ([`CsiError::CapacityOutOfRange`]).
pub fn capacity(range: Option<&csi::CapacityRange>) -> Result<u64, CsiError> {
    let Some(r) = range else { return Ok(0) };
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err(CsiError::InvalidField {
            field: "capacity_range",
            reason: "bytes must not be negative".into(),
        });
    }
    if r.limit_bytes > 0 && r.required_bytes > r.limit_bytes {
        return Err(CsiError::CapacityOutOfRange {
            reason: format!(
                "required_bytes {} exceeds limit_bytes {}",
                r.required_bytes, r.limit_bytes
            ),
        });
    }
    let bytes = if r.required_bytes > 0 {
        r.required_bytes
    } else {
        r.limit_bytes
    };
    Ok(u64::try_from(bytes).unwrap_or(0))
}

/// Parses CreateVolume parameters. Unknown keys are refused (a typo must not silently change
/// what DeleteVolume does); the CO's own `csi.storage.k8s.io/` keys are ignored.
pub fn parameters(params: &HashMap<String, String>) -> Result<OnDelete, CsiError> {
    let mut on_delete = OnDelete::Delete;
    for (k, v) in params {
        if k.starts_with("csi.storage.k8s.io/") {
            continue;
        }
        match k.as_str() {
            PARAM_ON_DELETE => {
                on_delete = match v.to_ascii_lowercase().as_str() {
                    "delete" => OnDelete::Delete,
                    "retain" => OnDelete::Retain,
                    _ => {
                        return Err(CsiError::InvalidField {
                            field: "parameters.onDelete",
                            reason: "must be \"delete\" or \"retain\"".into(),
                        });
                    }
                }
            }
            _ => {
                return Err(CsiError::InvalidField {
                    field: "parameters",
                    reason: format!("unknown parameter {k:?} (known: {PARAM_ON_DELETE})"),
                });
            }
        }
    }
    Ok(on_delete)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::csi::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn cap(mode: Mode, access: Option<AccessType>) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_type: access,
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    fn mount(flags: &[&str]) -> Option<AccessType> {
        Some(AccessType::Mount(MountVolume {
            fs_type: String::new(),
            mount_flags: flags.iter().map(|s| s.to_string()).collect(),
            volume_mount_group: String::new(),
        }))
    }

    #[test]
    fn reader_modes_are_read_only_and_block_is_refused() {
        let c = capability(Some(&cap(Mode::MultiNodeReaderOnly, mount(&[])))).unwrap();
        assert!(c.reader_only);
        let c = capability(Some(&cap(
            Mode::MultiNodeMultiWriter,
            mount(&["cache-size=0"]),
        )))
        .unwrap();
        assert!(!c.reader_only);
        assert_eq!(c.mount_flags, vec!["--cache-size=0"]);
        let e = capability(Some(&cap(
            Mode::MultiNodeMultiWriter,
            Some(AccessType::Block(BlockVolume {})),
        )));
        assert!(matches!(e, Err(CsiError::UnsupportedCapability { .. })));
        let e = capability(Some(&cap(Mode::Unknown, mount(&[]))));
        assert!(matches!(e, Err(CsiError::InvalidField { .. })));
        assert!(matches!(
            capability(None),
            Err(CsiError::MissingField { .. })
        ));
        let e = capability(Some(&cap(Mode::SingleNodeWriter, mount(&["-d"]))));
        assert!(matches!(e, Err(CsiError::UnsupportedCapability { .. })));
    }

    #[test]
    fn names_paths_and_capacity_are_checked() {
        assert!(volume_name("name", "pvc-1234_a.b").is_ok());
        for bad in ["", "..", ".shoal-csi", "a/b", "a b"] {
            assert!(volume_name("name", bad).is_err(), "{bad}");
        }
        assert!(abs_path("target_path", "relative").is_err());
        assert!(abs_path("target_path", "/a/../b").is_err());
        let r = |req, lim| csi::CapacityRange {
            required_bytes: req,
            limit_bytes: lim,
        };
        assert_eq!(capacity(Some(&r(5, 10))).unwrap(), 5);
        assert_eq!(capacity(Some(&r(0, 10))).unwrap(), 10);
        assert!(matches!(
            capacity(Some(&r(11, 10))),
            Err(CsiError::CapacityOutOfRange { .. })
        ));
        assert!(matches!(
            capacity(Some(&r(-1, 0))),
            Err(CsiError::InvalidField { .. })
        ));
        let ctx: HashMap<String, String> = [("subPath".to_string(), "../x".to_string())].into();
        assert!(sub_path(&ctx).is_err());
    }

    #[test]
    fn parameters_accept_on_delete_and_refuse_unknown_keys() {
        let p = |k: &str, v: &str| -> HashMap<String, String> {
            [(k.to_string(), v.to_string())].into()
        };
        assert_eq!(
            parameters(&p("onDelete", "Retain")).unwrap(),
            OnDelete::Retain
        );
        assert_eq!(parameters(&HashMap::new()).unwrap(), OnDelete::Delete);
        assert!(parameters(&p("onDelete", "keep")).is_err());
        assert!(parameters(&p("ondelete", "retain")).is_err());
        assert!(parameters(&p("csi.storage.k8s.io/pvc/name", "x")).is_ok());
    }
}
