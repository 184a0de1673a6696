//! `simclr schema`: a valid draft 2020-12 JSON Schema, kept current in schema/, that every
//! shipped pipeline passes and that catches what editors should flag.

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn generated() -> Value {
    let out = Command::cargo_bin("simclr").unwrap().arg("schema").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn yaml_to_json(path: &Path) -> Value {
    let src = std::fs::read_to_string(path).unwrap();
    simclr_core::yaml::parse(&src).unwrap_or_else(|e| panic!("{}: {e:?}", path.display())).value.to_json()
}

fn pipelines(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            pipelines(&p, out);
        } else if p.extension().is_some_and(|x| x == "yaml") {
            out.push(p);
        }
    }
}

fn errors(schema: &Value, doc: &Value) -> Vec<String> {
    let v = jsonschema::draft202012::new(schema).unwrap();
    v.iter_errors(doc).map(|e| format!("{} at {}", e, e.instance_path())).collect()
}

#[test]
fn the_schema_is_valid_and_the_shipped_file_is_current() {
    let schema = generated();
    jsonschema::draft202012::meta::validate(&schema).unwrap();
    let shipped: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("schema/pipeline.schema.json")).unwrap())
            .unwrap();
    assert!(
        shipped == schema,
        "schema/pipeline.schema.json is out of date: regenerate it with `cargo run -- schema > schema/pipeline.schema.json`"
    );
    // Descriptions come from the config types' doc comments, defaults from their serde defaults.
    let crop = schema["$defs"]["stage"]["oneOf"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["title"] == "random_resized_crop")
        .unwrap();
    assert_eq!(crop["properties"]["scale"]["default"], serde_json::json!([0.08, 1.0]));
    assert!(crop["properties"]["size"]["description"].as_str().is_some_and(|d| !d.is_empty()));
}

#[test]
fn every_shipped_pipeline_passes_and_names_the_schema() {
    let schema = generated();
    let mut files = Vec::new();
    pipelines(&root().join("pipelines"), &mut files);
    assert!(files.len() >= 10, "{files:?}");
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let first = text.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("# yaml-language-server: $schema=")
                && first.ends_with("schema/pipeline.schema.json"),
            "{}: the first line should be the schema modeline, found {first:?}",
            f.display()
        );
        let rel = first.trim_start_matches("# yaml-language-server: $schema=");
        assert!(f.parent().unwrap().join(rel).is_file(), "{}: {rel} does not exist", f.display());
        let doc = yaml_to_json(f);
        if doc.get("plugins").is_some() {
            continue; // their kinds come from the plugin: tests/plugins.rs checks these files
        }
        let errs = errors(&schema, &doc);
        assert!(errs.is_empty(), "{}: {errs:#?}", f.display());
    }
}

#[test]
fn mistakes_fail_the_schema() {
    let schema = generated();
    let doc = |stage: &str| -> Value {
        let src = format!("name: t\nstages:\n  - {{ id: data, kind: synthetic_shapes }}\n  - {stage}\n");
        simclr_core::yaml::parse(&src).unwrap().value.to_json()
    };
    assert!(errors(&schema, &doc("{ id: crop, kind: random_resized_crop, size: 32, scale: [0.2, 1.0] }"))
        .is_empty());
    for bad in [
        "{ id: crop, kind: random_resized_crop, size: 32, scael: [0.2, 1.0] }", // misspelt field
        "{ id: crop, kind: random_resized_crop, size: big }",                   // wrong type
        "{ id: crop, kind: random_resized_crp, size: 32 }",                     // unknown kind
        "{ id: flip, kind: horizontal_flip, p: 1.5 }",                          // out of range
        "{ kind: horizontal_flip }",                                            // no id
    ] {
        assert!(!errors(&schema, &doc(bad)).is_empty(), "{bad} passed");
    }
}

/// Every shipped pipeline's resolved form (what a run directory's `pipeline.yaml` holds:
/// defaults written out, paths absolute) validates again and still passes the schema.
#[test]
fn resolved_pipelines_validate_again() {
    let schema = generated();
    let mut files = Vec::new();
    pipelines(&root().join("pipelines"), &mut files);
    let registry = || {
        let mut r = simclr_stages::registry();
        simclr_train::register(&mut r);
        r
    };
    let mut checked = 0;
    for f in files.iter().filter(|f| yaml_to_json(f).get("plugins").is_none()) {
        let spec = simclr_core::spec::load(f, &[]).unwrap();
        // Pipelines whose data sets are not here (ImageNet, CIFAR) do not validate as they are.
        let Ok(plan) = simclr_core::validate(spec, &registry()) else { continue };
        checked += 1;
        let resolved = simclr_core::run_dir::resolved_pipeline(&plan, &registry());
        let text = simclr_core::run_dir::to_yaml(&resolved, "resolved");
        let doc = simclr_core::yaml::parse(&text).unwrap().value.to_json();
        assert_eq!(doc, resolved, "{}", f.display());
        let errs = errors(&schema, &doc);
        assert!(errs.is_empty(), "{}: {errs:#?}", f.display());
        let spec = simclr_core::spec::parse(&std::env::temp_dir().join("resolved.yaml"), &text, &[]).unwrap();
        if let Err(d) = simclr_core::validate(spec, &registry()) {
            panic!("{}: the resolved form does not validate:\n{d}\n{text}", f.display());
        }
    }
    assert!(checked >= 8, "{checked}");
}
