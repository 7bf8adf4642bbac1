//! The layering rule, read from `cargo metadata`: a lower layer never depends on an upper one.
//!
//! mvm-queue and mvm-os name no other layer; mvm-component names only mvm-queue; mvm-superpeer
//! sits above the three; the mvm binary and the fuzz targets (mvm-fuzz) on top. Dev-dependencies (tests) are exempt.

use std::collections::BTreeMap;
use std::process::Command;

fn rank(name: &str) -> Option<u8> {
    match name {
        "mvm-queue" | "mvm-os" => Some(0),
        "mvm-component" => Some(1),
        "mvm-superpeer" => Some(2),
        "mvm" | "mvm-fuzz" => Some(3),
        _ => None,
    }
}

/// Which layers each layer may name.
fn allowed(name: &str) -> &'static [&'static str] {
    match name {
        "mvm-queue" | "mvm-os" => &[],
        "mvm-component" => &["mvm-queue"],
        "mvm-superpeer" => &["mvm-queue", "mvm-os", "mvm-component"],
        _ => &["mvm-queue", "mvm-os", "mvm-component", "mvm-superpeer"],
    }
}

fn layer_dependencies() -> BTreeMap<String, Vec<String>> {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
    let mut deps = BTreeMap::new();
    for p in meta["packages"].as_array().expect("packages") {
        let name = p["name"].as_str().expect("name").to_owned();
        if rank(&name).is_none() {
            continue;
        }
        let layers: Vec<String> = p["dependencies"]
            .as_array()
            .expect("dependencies")
            .iter()
            .filter(|d| d["kind"].as_str() != Some("dev"))
            .filter_map(|d| d["name"].as_str())
            .filter(|d| rank(d).is_some())
            .map(str::to_owned)
            .collect();
        deps.insert(name, layers);
    }
    deps
}

#[test]
fn every_layer_is_in_the_workspace() {
    let deps = layer_dependencies();
    for name in [
        "mvm-queue",
        "mvm-os",
        "mvm-component",
        "mvm-superpeer",
        "mvm",
    ] {
        assert!(
            deps.contains_key(name),
            "{name} is missing from the workspace"
        );
    }
}

#[test]
fn lower_layers_never_name_upper_ones() {
    for (name, layers) in layer_dependencies() {
        for dep in layers {
            assert!(
                allowed(&name).contains(&dep.as_str()),
                "layering: {name} depends on {dep}, which it may not name"
            );
        }
    }
}
