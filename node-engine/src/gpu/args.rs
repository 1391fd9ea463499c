//! The reader's GPU command-line flags (`--gpu-devices`, `--gpu-memory-budget`,
//! `--gpu-search-threshold`, `--gpu-workspace`) and their pure parsers.
//! Depends on clap only; the flags mean the same with or without the `gpu` cargo feature (without
//! it every selection resolves to CPU mode).

use std::fmt;

/// Which CUDA devices a reader may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSelection {
    /// Every device the driver reports.
    All,
    /// No GPU: CPU search only.
    None,
    /// These ordinals, in the order given, without duplicates.
    List(Vec<u32>),
}

impl fmt::Display for DeviceSelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSelection::All => f.write_str("all"),
            DeviceSelection::None => f.write_str("none"),
            DeviceSelection::List(ids) => {
                let parts: Vec<String> = ids.iter().map(u32::to_string).collect();
                f.write_str(&parts.join(","))
            }
        }
    }
}

/// Errors from parsing or resolving the GPU flags.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuArgsError {
    #[error(
        "invalid --gpu-devices {input:?}: {reason}; expected \"all\", \"none\" or ordinals like \"0,1\""
    )]
    ParseDevices { input: String, reason: String },
    #[error("invalid byte size {input:?}: {reason}; expected e.g. 4294967296, 4GiB, 512MiB or 8GB")]
    ParseBytes { input: String, reason: String },
    #[error("--gpu-devices names GPU {ordinal} but only {count} CUDA device(s) are visible")]
    ResolveDevices { ordinal: u32, count: u32 },
}

/// Parse `--gpu-devices`: `all`, `none` (or empty), or a comma-separated list of ordinals.
///
/// Errors: a non-numeric or empty item, or a repeated ordinal.
pub fn parse_device_list(input: &str) -> Result<DeviceSelection, GpuArgsError> {
    let trimmed = input.trim();
    if trimmed.eq_ignore_ascii_case("all") {
        return Ok(DeviceSelection::All);
    }
    if trimmed.is_empty() || trimmed.eq_ignore_ascii_case("none") {
        return Ok(DeviceSelection::None);
    }
    let mut ids = Vec::new();
    for item in trimmed.split(',') {
        let item = item.trim();
        let bad = |reason: String| GpuArgsError::ParseDevices {
            input: input.to_string(),
            reason,
        };
        if item.is_empty() {
            return Err(bad("empty item".into()));
        }
        let id: u32 = item
            .parse()
            .map_err(|_| bad(format!("{item:?} is not a device ordinal")))?;
        if ids.contains(&id) {
            return Err(bad(format!("device {id} is listed twice")));
        }
        ids.push(id);
    }
    Ok(DeviceSelection::List(ids))
}

impl DeviceSelection {
    /// The ordinals to open given `count` visible devices.
    ///
    /// Errors: `ResolveDevices` when a listed ordinal is not below `count`.
    pub fn resolve(&self, count: u32) -> Result<Vec<u32>, GpuArgsError> {
        match self {
            DeviceSelection::All => Ok((0..count).collect()),
            DeviceSelection::None => Ok(Vec::new()),
            DeviceSelection::List(ids) => {
                if let Some(&ordinal) = ids.iter().find(|&&id| id >= count) {
                    return Err(GpuArgsError::ResolveDevices { ordinal, count });
                }
                Ok(ids.clone())
            }
        }
    }
}

/// Parse a byte size: a plain integer, or a number with a binary (`KiB`, `MiB`, `GiB`, `TiB`,
/// Kubernetes' `Ki`, `Mi`, `Gi`, `Ti` as the operator passes `readers.gpu.memoryBudget`, or `K`,
/// `M`, `G`, `T`) or decimal (`KB`, `MB`, `GB`, `TB`) suffix. Fractions are allowed with a
/// suffix (`1.5GiB`).
pub fn parse_bytes(input: &str) -> Result<u64, GpuArgsError> {
    let s = input.trim();
    let bad = |reason: &str| GpuArgsError::ParseBytes {
        input: input.to_string(),
        reason: reason.to_string(),
    };
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(bad("no number"));
    }
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        // `Ki`/`Mi`/`Gi`/`Ti`: Kubernetes quantity spelling (the operator passes `8Gi`).
        "k" | "ki" | "kib" => 1 << 10,
        "m" | "mi" | "mib" => 1 << 20,
        "g" | "gi" | "gib" => 1 << 30,
        "t" | "ti" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(bad("unknown unit")),
    };
    if mult == 1 {
        return num
            .parse::<u64>()
            .map_err(|_| bad("not a whole number of bytes"));
    }
    let value: f64 = num.parse().map_err(|_| bad("not a number"))?;
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(bad("too large"));
    }
    Ok(bytes as u64)
}

/// GPU flags the reader role flattens into its command line (`#[command(flatten)]`).
#[derive(Debug, Clone, clap::Args)]
pub struct GpuArgs {
    /// CUDA devices to search on: "all", "none", or ordinals like "0,1".
    #[arg(long = "gpu-devices", env = "SHOAL_GPU_DEVICES", default_value = "all", value_parser = parse_device_list)]
    pub gpu_devices: DeviceSelection,
    /// GPU memory per device for resident segment vectors and IVF lists (LRU-evicted beyond it),
    /// e.g. 8GiB.
    #[arg(long = "gpu-memory-budget", env = "SHOAL_GPU_MEMORY_BUDGET", default_value = "4GiB", value_parser = parse_bytes)]
    pub gpu_memory_budget: u64,
    /// Query batches smaller than this are searched on the CPU (Milvus's gpu_search_threshold).
    #[arg(
        long = "gpu-search-threshold",
        env = "SHOAL_GPU_SEARCH_THRESHOLD",
        default_value_t = 1000
    )]
    pub gpu_search_threshold: usize,
    /// GPU scratch memory per device for one query batch's distance tile, e.g. 1GiB.
    #[arg(long = "gpu-workspace", env = "SHOAL_GPU_WORKSPACE", default_value = "1GiB", value_parser = parse_bytes)]
    pub gpu_workspace: u64,
}

impl Default for GpuArgs {
    fn default() -> Self {
        Self {
            gpu_devices: DeviceSelection::All,
            gpu_memory_budget: 4 << 30,
            gpu_search_threshold: 1000,
            gpu_workspace: 1 << 30,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        gpu: GpuArgs,
    }

    #[test]
    fn device_list_accepts_all_none_and_ordinals_in_given_order() {
        assert_eq!(parse_device_list("all").unwrap(), DeviceSelection::All);
        assert_eq!(parse_device_list("ALL").unwrap(), DeviceSelection::All);
        assert_eq!(parse_device_list("none").unwrap(), DeviceSelection::None);
        assert_eq!(parse_device_list("").unwrap(), DeviceSelection::None);
        assert_eq!(
            parse_device_list("0,1").unwrap(),
            DeviceSelection::List(vec![0, 1])
        );
        assert_eq!(
            parse_device_list(" 3 , 1 ").unwrap(),
            DeviceSelection::List(vec![3, 1])
        );
    }

    #[test]
    fn device_list_rejects_garbage_empty_items_and_duplicates() {
        for bad in ["0,,1", "a", "0,-1", "1,1", "0;1", ","] {
            let err = parse_device_list(bad).unwrap_err();
            assert!(
                matches!(err, GpuArgsError::ParseDevices { .. }),
                "{bad}: {err}"
            );
        }
        assert!(
            parse_device_list("1,1")
                .unwrap_err()
                .to_string()
                .contains("listed twice")
        );
    }

    #[test]
    fn device_selection_resolves_against_visible_count_and_names_missing_ordinal() {
        assert_eq!(DeviceSelection::All.resolve(2).unwrap(), vec![0, 1]);
        assert_eq!(DeviceSelection::All.resolve(0).unwrap(), Vec::<u32>::new());
        assert_eq!(DeviceSelection::None.resolve(4).unwrap(), Vec::<u32>::new());
        assert_eq!(DeviceSelection::List(vec![1]).resolve(2).unwrap(), vec![1]);
        let err = DeviceSelection::List(vec![0, 2]).resolve(2).unwrap_err();
        assert_eq!(
            err,
            GpuArgsError::ResolveDevices {
                ordinal: 2,
                count: 2
            }
        );
    }

    #[test]
    fn device_selection_display_round_trips_through_the_parser() {
        for s in [
            DeviceSelection::All,
            DeviceSelection::None,
            DeviceSelection::List(vec![2, 0]),
        ] {
            assert_eq!(parse_device_list(&s.to_string()).unwrap(), s);
        }
    }

    #[test]
    fn byte_sizes_accept_binary_and_decimal_units() {
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_bytes("8Gi").unwrap(), 8 << 30);
        assert_eq!(parse_bytes("512Mi").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("4g").unwrap(), 4 << 30);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("8GB").unwrap(), 8_000_000_000);
        assert_eq!(parse_bytes("1.5GiB").unwrap(), 3 << 29);
        // Kubernetes quantities, as the operator passes readers.gpu.memoryBudget (e.g. 40Gi).
        assert_eq!(parse_bytes("40Gi").unwrap(), 40 << 30);
        assert_eq!(parse_bytes("512Mi").unwrap(), 512 << 20);
        for bad in ["", "GiB", "12XB", "1.5", "-3", "1e30TiB"] {
            assert!(
                matches!(parse_bytes(bad), Err(GpuArgsError::ParseBytes { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn gpu_args_flatten_into_a_cli_with_defaults_and_reject_bad_values() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.gpu.gpu_devices, DeviceSelection::All);
        assert_eq!(
            cli.gpu.gpu_memory_budget,
            GpuArgs::default().gpu_memory_budget
        );
        assert_eq!(cli.gpu.gpu_search_threshold, 1000);
        let cli = Cli::try_parse_from([
            "x",
            "--gpu-devices",
            "0,1",
            "--gpu-memory-budget",
            "2GiB",
            "--gpu-search-threshold",
            "64",
        ])
        .unwrap();
        assert_eq!(cli.gpu.gpu_devices, DeviceSelection::List(vec![0, 1]));
        assert_eq!(cli.gpu.gpu_memory_budget, 2 << 30);
        assert_eq!(cli.gpu.gpu_search_threshold, 64);
        let err = Cli::try_parse_from(["x", "--gpu-devices", "0,x"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--gpu-devices"), "{err}");
    }
}
