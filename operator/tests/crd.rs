//! The checked-in CRD (and the chart's copy) must equal `shoal-operator crd`; the CRD carries
//! the scale subresource, printer columns and descriptions; every `examples/*.yaml`
//! VectorCluster parses and validates.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use kube::core::CustomResourceExt;
use shoal_operator::crd::{VectorCluster, crd_yaml};
use shoal_operator::validate::validate;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn check_copy(rel: &str) {
    let path = repo().join(rel);
    let on_disk = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run `make crds`", path.display()));
    assert!(
        on_disk == crd_yaml().unwrap(),
        "{rel} differs from `shoal-operator crd`; run `make crds` and commit the result"
    );
}

#[test]
fn checked_in_crd_matches_the_generated_one() {
    check_copy("crds/vectorcluster.yaml");
}

#[test]
fn readme_crd_reference_matches_the_generated_one() {
    let path = repo().join("README.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let generated = shoal_operator::crd_docs::markdown().unwrap();
    let expected = shoal_operator::crd_docs::splice(&text, &generated, "README.md").unwrap();
    assert!(
        text == expected,
        "README.md's CRD reference differs from `shoal-operator crd-docs`; run `make crds` and commit"
    );
}

#[test]
fn chart_crd_copy_matches_the_generated_one() {
    check_copy("charts/shoal/crds/vectorcluster.yaml");
}

#[test]
fn crd_has_scale_subresource_printer_columns_short_name_and_descriptions() {
    let crd = serde_json::to_value(VectorCluster::crd()).unwrap();
    assert_eq!(crd["metadata"]["name"], "vectorclusters.shoal.dev");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "vc");
    let v = &crd["spec"]["versions"][0];
    assert_eq!(v["name"], "v1alpha1");
    let scale = &v["subresources"]["scale"];
    assert_eq!(scale["specReplicasPath"], ".spec.readers.replicas");
    assert_eq!(scale["statusReplicasPath"], ".status.readers.replicas");
    assert_eq!(scale["labelSelectorPath"], ".status.readers.selector");
    assert!(v["subresources"]["status"].is_object());
    let cols: Vec<&str> = v["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(cols, ["Readers", "Ready", "Phase", "Age"]);
    let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    let readers = &spec["readers"]["properties"];
    assert_eq!(readers["replicas"]["minimum"], 0.0);
    assert_eq!(readers["replicas"]["default"], 2);
    assert!(
        readers["replicas"]["description"]
            .as_str()
            .unwrap()
            .contains("scale")
    );
    assert_eq!(
        readers["gpu"]["properties"]["resourceName"]["default"],
        "nvidia.com/gpu"
    );
    let types: Vec<&str> =
        spec["storage"]["properties"]["objectStorage"]["properties"]["type"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
    assert!(types.contains(&"s3") && types.contains(&"file") && !types.contains(&"floppy"));
    assert_eq!(
        spec["storage"]["properties"]["reclaimPolicy"]["default"],
        "Retain"
    );
    // Every property of the spec is documented.
    fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(props) = schema["properties"].as_object() {
            for (k, s) in props {
                let p = format!("{path}.{k}");
                if s["description"].as_str().is_none_or(str::is_empty) {
                    missing.push(p.clone());
                }
                // k8s-openapi types (resources, tolerations, affinity) carry their own docs.
                if !["resources", "tolerations", "affinity"].contains(&k.as_str()) {
                    walk(&p, s, missing);
                    walk(&p, &s["items"], missing);
                }
            }
        }
    }
    let mut missing = Vec::new();
    walk(
        "spec",
        &v["schema"]["openAPIV3Schema"]["properties"]["spec"],
        &mut missing,
    );
    walk(
        "status",
        &v["schema"]["openAPIV3Schema"]["properties"]["status"],
        &mut missing,
    );
    assert!(missing.is_empty(), "undocumented fields: {missing:?}");
}

#[test]
fn every_example_vectorcluster_parses_and_validates() {
    let dir = repo().join("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc).unwrap();
            if value.get("kind").and_then(|k| k.as_str()) != Some("VectorCluster") {
                continue;
            }
            let mut vc: VectorCluster =
                serde_yaml::from_value(value).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // What the API server fills in.
            vc.metadata
                .namespace
                .get_or_insert_with(|| "default".into());
            vc.metadata.uid = Some("uid".into());
            validate(&vc).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 1, "no VectorCluster found in {}", dir.display());
}

use serde::Deserialize;
