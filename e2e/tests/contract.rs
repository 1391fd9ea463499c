//! The operator and the engine agree on the engine's command line: every container the operator
//! builds for the writer, the readers and the router (from every example and every operator
//! fixture) is fed through the engine's own parser (`shoal_engine::cli::check_invocation`), with
//! its arguments, its own environment and the engine ConfigMap it loads with `envFrom`.
//!
//! A renamed flag, a renamed variable (the operator once set `SHOAL_REPLICATION_FACTOR` while
//! the engine reads `SHOAL_REPLICATION`, so `spec.readers.replicationFactor` never reached the
//! router) or a value the engine refuses fails here, at build time, instead of in a pod.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, Container};
use shoal_operator::build::secret::Credentials;
use shoal_operator::build::{Desired, Inputs, build_all};
use shoal_operator::crd::VectorCluster;
use shoal_operator::validate::validate;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Every VectorCluster the repository ships: the examples and the operator's test fixtures.
fn clusters() -> Vec<(String, VectorCluster)> {
    let mut out = Vec::new();
    for dir in ["examples", "operator/tests/fixtures"] {
        for entry in std::fs::read_dir(repo_root().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
                if v["kind"] == "VectorCluster" {
                    let mut vc: VectorCluster = serde_json::from_value(v).unwrap();
                    if vc.metadata.namespace.is_none() {
                        vc.metadata.namespace = Some("default".into());
                    }
                    out.push((path.display().to_string(), vc));
                }
            }
        }
    }
    assert!(out.len() >= 5, "examples and fixtures not found: {out:?}");
    out
}

fn inputs() -> Inputs {
    Inputs {
        credentials: Credentials {
            mysql_root_password: "rootpw".into(),
            mysql_password: "userpw".into(),
            redis_password: "redispw".into(),
        },
        external_redis_url: Some("redis://:pw@redis.example:6379/1".into()),
        object_keys: Some(("AK".into(), "SK".into())),
        azure_connection_string: None,
    }
}

/// What a Secret reference resolves to in a pod, for the variables the operator fills from
/// Secrets: a value of the right shape.
fn secret_value(var: &str) -> String {
    match var {
        "SHOAL_META" => "mysql://shoal:userpw@demo-mysql.default.svc:3306/shoal".into(),
        "SHOAL_AUTH_TOKEN" => "admin:secret".into(),
        other => panic!("the operator fills {other} from a Secret; teach this test its shape"),
    }
}

/// The container's argv (without the binary) and environment as the kubelet gives them.
fn invocation(c: &Container, config: &ConfigMap) -> (Vec<String>, BTreeMap<String, String>) {
    let mut env = BTreeMap::new();
    for from in c.env_from.iter().flatten() {
        let name = from.config_map_ref.as_ref().unwrap().name.clone();
        assert_eq!(
            Some(name.clone()),
            config.metadata.name,
            "container {} loads an unknown ConfigMap {name}",
            c.name
        );
        env.extend(config.data.clone().unwrap_or_default());
    }
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) if from.secret_key_ref.is_some() => secret_value(&e.name),
            (None, Some(from)) if from.field_ref.is_some() => "demo-reader-7c98c8dddc-z2gtg".into(),
            _ => panic!("env {} of {} has no value", e.name, c.name),
        };
        env.insert(e.name.clone(), value);
    }
    // The kubelet expands $(VAR) references to the container's own variables.
    let args = c
        .args
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|a| {
            env.iter()
                .fold(a, |a, (k, v)| a.replace(&format!("$({k})"), v))
        })
        .collect();
    (args, env)
}

#[test]
fn every_engine_container_the_operator_builds_parses_with_the_engines_own_command_line() {
    let mut checked = 0;
    for (file, vc) in clusters() {
        let Ok(valid) = validate(&vc) else {
            continue; // fixtures of invalid specs build nothing
        };
        let desired = build_all(&valid, &inputs());
        let config = desired
            .objects
            .iter()
            .find_map(|o| match o {
                Desired::ConfigMap(c) => Some(c.clone()),
                _ => None,
            })
            .expect("the engine ConfigMap");
        let containers: Vec<Container> = desired
            .objects
            .iter()
            .filter_map(|o| match o {
                Desired::StatefulSet(s) => s.spec.template.spec.clone(),
                Desired::Deployment(d) => d.spec.template.spec.clone(),
                _ => None,
            })
            .flat_map(|p| p.containers)
            .filter(|c| c.command.as_deref() == Some(&["shoal-engine".to_string()][..]))
            .collect();
        assert!(containers.len() >= 3, "{file}: writer, readers, router");
        let mut read_by_some_role = std::collections::BTreeSet::new();
        for c in &containers {
            let (args, mut env) = invocation(c, &config);
            let role = args.first().cloned().unwrap_or_default();
            let reads = shoal_engine::cli::env_names(&role)
                .unwrap_or_else(|e| panic!("{file}: container {}: {e}", c.name));
            // The ConfigMap is shared by every role: each role is held to what it reads of it,
            // and every variable in it must be read by some role (below).
            let shared = config.data.clone().unwrap_or_default();
            for k in shared.keys() {
                if reads.contains(k) {
                    read_by_some_role.insert(k.clone());
                }
                let own = c.env.iter().flatten().any(|e| &e.name == k);
                if !reads.contains(k) && !own {
                    env.remove(k);
                }
            }
            shoal_engine::cli::check_invocation(&args, &env).unwrap_or_else(|e| {
                panic!(
                    "{file}: the operator's {} container does not parse: {e}",
                    c.name
                )
            });
            checked += 1;
        }
        for k in config.data.clone().unwrap_or_default().keys() {
            if k.starts_with("SHOAL_") {
                assert!(
                    read_by_some_role.contains(k),
                    "{file}: the engine ConfigMap sets {k}, which no engine role reads"
                );
            }
        }
    }
    assert!(checked >= 12, "only {checked} containers checked");
}

#[test]
fn the_contract_check_refuses_a_variable_no_role_reads() {
    // The bug this test guards: a variable the engine does not know is silently ignored in a pod.
    let args: Vec<String> = ["router", "--writer", "w:19531", "--readers-dns", "r:19531"]
        .map(String::from)
        .to_vec();
    let env = BTreeMap::from([
        (
            "SHOAL_META".to_string(),
            "mysql://u:p@h:3306/db".to_string(),
        ),
        ("SHOAL_REPLICATION_FACTOR".to_string(), "2".to_string()),
    ]);
    let err = shoal_engine::cli::check_invocation(&args, &env).unwrap_err();
    assert!(err.contains("SHOAL_REPLICATION_FACTOR"), "{err}");
}
