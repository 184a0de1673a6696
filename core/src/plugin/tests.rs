//! Tests of the plugin host's schema subset and checks (the libraries are tested in
//! tests/plugins.rs).

use super::schema::*;
use super::stage::*;
use super::*;
use serde_json::json;

fn schema() -> Schema {
    Schema::parse_top(&json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["bits"],
        "properties": {
            "bits": {"type": "integer", "minimum": 1, "maximum": 8},
            "p": {"type": "number", "minimum": 0, "maximum": 1, "default": 1.0},
            "mode": {"type": "string", "enum": ["fast", "exact"], "default": "fast"},
            "range": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0},
                      "minItems": 2, "maxItems": 2, "default": [1, 2]},
            "on": {"type": "boolean"},
            "sub": {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": false}
        }
    }))
    .unwrap()
}

fn violations(v: Value) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    schema().validate(&v, &mut Vec::new(), &mut out);
    out.into_iter().map(|v| (field_name(&v.path), v.message, v.range_fix.is_some())).collect()
}

#[test]
fn valid_configs_pass() {
    assert!(violations(json!({"bits": 3})).is_empty());
    assert!(violations(
        json!({"bits": 8, "p": 0, "mode": "exact", "range": [0.5, 3], "on": true, "sub": {"a": 1}})
    )
    .is_empty());
}

#[test]
fn structural_errors_use_serde_wording() {
    let v = violations(json!({"bits": 3, "btis": 2}));
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].0, "btis");
    assert!(v[0].1.starts_with("unknown field `btis`, expected one of `bits`"), "{}", v[0].1);
    assert!(v[0].1.contains("`views`"));
    assert_eq!(violations(json!({}))[0].1, "missing field `bits`");
    assert_eq!(
        violations(json!({"bits": 2.5}))[0].1,
        "invalid type: floating point `2.5`, expected an integer"
    );
    assert_eq!(violations(json!({"bits": "x"}))[0].1, "invalid type: string \"x\", expected an integer");
    assert_eq!(
        violations(json!({"bits": 1, "mode": "slow"}))[0].1,
        "unknown variant `slow`, expected `fast` or `exact`"
    );
    let nested = violations(json!({"bits": 1, "sub": {"b": 1}}));
    assert_eq!(nested[0].0, "sub.b");
    assert!(!nested[0].1.contains("views"));
    assert!(violations(json!({"bits": 1, "range": [1, "a"]}))[0].0 == "range[1]");
}

#[test]
fn ranges_are_problems_with_fixes() {
    let v = violations(json!({"bits": 9}));
    assert_eq!(v, vec![("bits".into(), "`bits` = 9 is out of range".into(), true)]);
    let v = violations(json!({"bits": 1, "range": [0, 1, 2]}));
    assert_eq!(v.len(), 2, "{v:?}");
    assert!(v.iter().all(|x| x.2));
    assert_eq!(v[0].1, "`range` has 3 items, expected 2");
    assert_eq!(v[1].0, "range[0]");
}

#[test]
fn unsupported_schemas_are_refused() {
    for bad in [
        json!({"type": "array"}),
        json!({"type": "object", "oneOf": []}),
        json!({"type": "object", "properties": {"a": {"type": ["number", "null"]}}}),
        json!({"type": "object", "properties": {"a": {"type": "integer", "minimum": 2, "default": 1}}}),
        json!({"type": "object", "required": ["a"]}),
        json!({"type": "object", "properties": {"views": {"type": "array"}}}),
    ] {
        assert!(Schema::parse_top(&bad).is_err(), "{bad}");
    }
}

#[test]
fn canary_blocks_are_found() {
    let mut out = canary(100);
    assert_eq!(unwritten_block(&out), Some(0));
    out[..64].fill(1);
    assert_eq!(unwritten_block(&out), Some(64));
    out[64..96].fill(2);
    // The last 4 bytes are too few to judge.
    assert_eq!(unwritten_block(&out), None);
    let mut out = canary(3 * 17);
    out[..32].fill(0);
    assert_eq!(unwritten_block(&out), Some(32));
}

#[test]
fn resolve_finds_bare_names_in_the_search_path() {
    let dir = std::env::temp_dir().join(format!("simclr-resolve-{}", std::process::id()));
    let sub = dir.join("lib");
    std::fs::create_dir_all(&sub).unwrap();
    let file = format!("{}thing{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    std::fs::write(sub.join(&file), b"x").unwrap();
    let search = std::env::join_paths([dir.join("nowhere"), sub.clone()]).unwrap();
    assert_eq!(resolve("thing", &dir, Some(&search)).unwrap(), sub.join(&file));
    assert_eq!(resolve(&file, &dir, Some(&search)).unwrap(), sub.join(&file));
    assert_eq!(resolve(&format!("lib/{file}"), &dir, None).unwrap(), dir.join("lib").join(&file));
    let e = resolve("other", &dir, Some(&search)).unwrap_err();
    assert!(e.problem.contains("not found") && e.fix.contains(SEARCH_PATH_VAR), "{e}");
    assert!(resolve("./missing.so", &dir, None).unwrap_err().problem.contains("no such file"));
    let _ = std::fs::remove_dir_all(&dir);
}
