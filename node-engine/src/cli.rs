//! The engine's command line as one parser: the four roles ([`Role`]; the binary adds its
//! benchmark tools beside them), and the contract check the operator's containers are tested
//! against ([`check_invocation`]): the argv and environment the operator gives an engine
//! container must parse with this very parser, and every `SHOAL_*` variable it sets must be one
//! that role reads, so a renamed flag or variable fails a test instead of being ignored in a pod.
//!
//! Owns no configuration values (`crate::config` and the role modules do).

use crate::config::StandaloneArgs;
use crate::roles::reader::config::ReaderArgs;
use crate::roles::router::config::RouterArgs;
use crate::roles::writer::config::WriterArgs;
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser, Subcommand};
use std::collections::BTreeMap;

/// A role subcommand of `shoal-engine`.
#[derive(Debug, Subcommand)]
pub enum Role {
    /// Run writer, reader and router in one process (SQLite metadata, local data directory).
    Standalone(StandaloneArgs),
    /// The cluster's single writer: takes the metadata lease, replays the WAL, serves the Writer
    /// gRPC service and the REST API; exits non-zero when another writer takes the lease.
    Writer(WriterArgs),
    /// A read-only search node over the shared data directory (Reader gRPC service).
    Reader(ReaderArgs),
    /// Cluster front end: REST API; writes to the writer, searches fanned out to the readers.
    Router(RouterArgs),
}

/// Just the roles, to look a role's arguments up.
#[derive(Parser)]
#[command(name = "shoal-engine")]
struct Roles {
    #[command(subcommand)]
    role: Role,
}

/// The role names `shoal-engine` accepts as its first argument.
pub const ROLES: [&str; 4] = ["standalone", "writer", "reader", "router"];

fn role_command(role: &str) -> Result<clap::Command, String> {
    Roles::command()
        .find_subcommand(role)
        .cloned()
        .ok_or_else(|| format!("unknown role {role:?}; expected one of {ROLES:?}"))
}

/// The environment variables `role` reads (each is the `SHOAL_*` twin of a flag), sorted.
///
/// Errors: an unknown role.
pub fn env_names(role: &str) -> Result<Vec<String>, String> {
    let cmd = role_command(role)?;
    let mut names: Vec<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Check an engine container's invocation: `args` is argv without the binary name (the role
/// first), `env` the container's environment (plain values, ConfigMap keys from `envFrom`, and a
/// placeholder for values that come from Secrets).
///
/// The environment is applied as clap applies it (a flag given in `args` wins over its
/// variable) without reading or changing this process's environment: each variable a role
/// reads is passed as its flag unless the flag is given. Then the role's configuration is
/// resolved as at start-up (durations, URLs, required settings).
///
/// Errors: one message naming every problem: an unknown role, an unknown flag or bad value (the
/// parser's message), a configuration the role rejects, and every `SHOAL_*` variable in `env`
/// that the role does not read (e.g. `SHOAL_REPLICATION_FACTOR`, `SHOAL_LOG`).
pub fn check_invocation(args: &[String], env: &BTreeMap<String, String>) -> Result<(), String> {
    let Some(role) = args.first() else {
        return Err(format!(
            "no role: the first argument must be one of {ROLES:?}"
        ));
    };
    let cmd = role_command(role)?;
    let mut problems = Vec::new();
    let read = env_names(role)?;
    let unknown: Vec<&str> = env
        .keys()
        .filter(|k| k.starts_with("SHOAL_") && !read.contains(k))
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        problems.push(format!(
            "{role} reads none of these variables: {} (it reads {})",
            unknown.join(", "),
            read.join(", ")
        ));
    }

    // The environment as flags; the parser itself must not look at the process environment.
    let given = |long: &str| {
        args.iter()
            .any(|a| a == &format!("--{long}") || a.starts_with(&format!("--{long}=")))
    };
    let mut argv: Vec<String> = args.to_vec();
    for a in cmd.get_arguments() {
        let (Some(var), Some(long)) = (a.get_env(), a.get_long()) else {
            continue;
        };
        let Some(value) = env.get(&*var.to_string_lossy()) else {
            continue;
        };
        if given(long) {
            continue;
        }
        match a.get_action() {
            ArgAction::SetTrue | ArgAction::SetFalse => {
                if matches!(
                    value.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                ) {
                    argv.push(format!("--{long}"));
                }
            }
            _ => argv.push(format!("--{long}={value}")),
        }
    }
    let mut cmd = cmd.mut_args(|a| a.env(None::<&str>)).no_binary_name(false);
    match cmd.try_get_matches_from_mut(argv.iter()) {
        Err(e) => problems.push(format!("{role}: {}", e.render().to_string().trim())),
        Ok(m) => {
            if let Err(e) = resolve(role, &m) {
                problems.push(format!("{role}: {e}"));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Resolve the parsed arguments of `role` as the role does at start-up.
fn resolve(role: &str, m: &clap::ArgMatches) -> Result<(), String> {
    let e = |e: clap::Error| e.to_string();
    let c = |e: crate::config::ConfigError| crate::core::error_chain(&e);
    match role {
        "standalone" => StandaloneArgs::from_arg_matches(m)
            .map_err(e)?
            .resolve()
            .map(drop)
            .map_err(c),
        "writer" => WriterArgs::from_arg_matches(m)
            .map_err(e)?
            .resolve()
            .map(drop)
            .map_err(c),
        "reader" => ReaderArgs::from_arg_matches(m)
            .map_err(e)?
            .resolve()
            .map(drop)
            .map_err(c),
        "router" => RouterArgs::from_arg_matches(m)
            .map_err(e)?
            .resolve()
            .map(drop)
            .map_err(c),
        other => Err(format!("unknown role {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn env(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const META: (&str, &str) = ("SHOAL_META", "mysql://u:p@demo-mysql:3306/shoal");

    #[test]
    fn a_router_invocation_with_flags_and_shoal_variables_passes() {
        let e = env(&[
            META,
            ("SHOAL_REPLICATION", "2"),
            ("SHOAL_DATA_DIR", "/data"),
            ("SHOAL_FLUSH_INTERVAL", "1s"),
            ("SHOAL_SHUTDOWN_DELAY", "5s"),
            ("RUST_LOG", "info"),
            ("POD_NAME", "router-0"),
        ]);
        let a = args(&[
            "router",
            "--listen",
            "0.0.0.0:19530",
            "--metrics-listen=0.0.0.0:9091",
            "--writer",
            "demo-writer:19531",
            "--readers-dns",
            "demo-readers:19531",
        ]);
        // SHOAL_DATA_DIR and SHOAL_FLUSH_INTERVAL come from the shared ConfigMap and the
        // router does not read them: that is reported.
        let err = check_invocation(&a, &e).expect_err("router does not read data dir");
        assert!(err.contains("SHOAL_DATA_DIR"), "{err}");
        assert!(err.contains("SHOAL_FLUSH_INTERVAL"), "{err}");
        let e = env(&[META, ("SHOAL_REPLICATION", "2"), ("RUST_LOG", "info")]);
        assert_eq!(check_invocation(&a, &e), Ok(()));
    }

    #[test]
    fn writer_and_reader_invocations_like_the_operators_pass() {
        let e = env(&[
            META,
            ("SHOAL_DATA_DIR", "/data"),
            ("SHOAL_FLUSH_INTERVAL", "1s"),
            ("SHOAL_LOG_FORMAT", "json"),
        ]);
        let w = args(&[
            "writer",
            "--listen",
            "0.0.0.0:19530",
            "--grpc-listen",
            "0.0.0.0:19531",
            "--wal-dir",
            "/data/wal",
        ]);
        assert_eq!(check_invocation(&w, &e), Ok(()));
        let e = env(&[
            META,
            ("SHOAL_DATA_DIR", "/data"),
            ("SHOAL_GPU_DEVICES", "0"),
        ]);
        let r = args(&["reader", "--grpc-listen", "0.0.0.0:19531"]);
        assert_eq!(check_invocation(&r, &e), Ok(()));
    }

    #[test]
    fn an_unknown_shoal_variable_is_named() {
        let a = args(&["router", "--writer", "w:19531", "--readers-dns", "r:19531"]);
        let err = check_invocation(
            &a,
            &env(&[
                META,
                ("SHOAL_REPLICATION_FACTOR", "2"),
                ("SHOAL_LOG", "debug"),
            ]),
        )
        .expect_err("unknown variables");
        let unknown = err.split(" (it reads").next().unwrap_or_default();
        assert!(unknown.contains("SHOAL_REPLICATION_FACTOR"), "{err}");
        assert!(unknown.contains("SHOAL_LOG,"), "{err}");
        assert!(!unknown.contains("SHOAL_META"), "{err}");
    }

    #[test]
    fn an_unknown_flag_a_bad_value_and_a_bad_setting_are_named() {
        let e = env(&[META]);
        let err = check_invocation(&args(&["reader", "--replication-factor", "2"]), &e)
            .expect_err("unknown flag");
        assert!(err.contains("--replication-factor"), "{err}");
        let err = check_invocation(&args(&["reader", "--grpc-listen", "not-an-address"]), &e)
            .expect_err("bad address");
        assert!(err.contains("not-an-address"), "{err}");
        // A bad value from the environment is named by the flag it feeds.
        let err = check_invocation(
            &args(&["writer"]),
            &env(&[META, ("SHOAL_LISTEN", "nowhere")]),
        )
        .expect_err("bad env value");
        assert!(err.contains("nowhere") && err.contains("--listen"), "{err}");
        let err = check_invocation(
            &args(&["writer"]),
            &env(&[META, ("SHOAL_FLUSH_INTERVAL", "1 hour")]),
        )
        .expect_err("bad duration");
        assert!(err.contains("flush_interval"), "{err}");
        let err = check_invocation(&args(&["reader"]), &env(&[])).expect_err("no metadata URL");
        assert!(err.contains("meta"), "{err}");
        let err = check_invocation(&args(&["mover"]), &e).expect_err("unknown role");
        assert!(err.contains("mover"), "{err}");
    }

    #[test]
    fn a_flag_on_the_command_line_wins_over_its_variable() {
        let a = args(&["writer", "--flush-interval", "2s"]);
        assert_eq!(
            check_invocation(&a, &env(&[META, ("SHOAL_FLUSH_INTERVAL", "bogus")])),
            Ok(())
        );
    }

    #[test]
    fn every_role_reads_its_shoal_variables_and_only_shoal_ones() {
        for role in ROLES {
            let names = env_names(role).expect("a role");
            assert!(
                names.contains(&"SHOAL_SHUTDOWN_DELAY".to_string()),
                "{role}"
            );
            assert!(names.iter().all(|n| n.starts_with("SHOAL_")), "{names:?}");
        }
        let router = env_names("router").expect("router");
        assert!(router.contains(&"SHOAL_REPLICATION".to_string()));
        assert!(router.contains(&"SHOAL_META_STARTUP_TIMEOUT".to_string()));
    }
}
