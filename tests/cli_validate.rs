//! `simclr validate`: every kind of problem, located and explained, all in one pass.

use assert_cmd::Command;

fn simclr() -> Command {
    Command::cargo_bin("simclr").unwrap()
}

#[test]
fn every_error_comes_out_together_with_file_line_col() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "\
name: bad
seed: 1
stages:
  - { id: data, kind: cifar10, path: no/such/folder }
  - { id: crop, kind: identiy }
  - { id: views, kind: views, cont: 2 }
  - { id: views, kind: views, count: two }
  - { id: more, kind: identity, input: nowhere }
  - { id: a, kind: identity, input: b }
  - { id: b, kind: identity, input: a }
  - { id: src2, kind: counter, count: 10 }
  - { id: v2, kind: views, input: src2 }
",
    )
    .unwrap();
    let out = simclr().arg("validate").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let f = file.display().to_string();
    let expect = [
        // missing file
        (format!("{f}:4:"), "stage 'data': the CIFAR data"),
        // unknown kind, with a suggestion
        (format!("{f}:5:23:"), "unknown stage kind `identiy`"),
        // unknown field, with a suggestion
        (format!("{f}:6:31:"), "unknown field `cont`"),
        // duplicate id
        (format!("{f}:7:11:"), "duplicate stage id"),
        // mistyped field
        (format!("{f}:7:"), "invalid type"),
        // dangling input
        (format!("{f}:8:40:"), "input `nowhere` is not a stage"),
        // cycle
        (format!("{f}:"), "cycle: "),
        // port type mismatch
        (format!("{f}:12:"), "port type mismatch"),
    ];
    for (prefix, what) in &expect {
        assert!(
            err.lines().any(|l| l.starts_with(prefix.as_str()) && l.contains(what)),
            "no line starting with {prefix:?} containing {what:?} in:\n{err}"
        );
    }
    assert!(err.contains("did you mean `identity`"), "{err}");
    assert!(err.contains("did you mean `count`"), "{err}");
    assert!(
        err.contains("(") && err.lines().filter(|l| l.starts_with(&f)).all(|l| l.ends_with(')')),
        "every error says how to fix it:\n{err}"
    );
}

#[test]
fn a_valid_file_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ok.yaml");
    std::fs::write(
        &file,
        "name: ok\nstages:\n  - { id: data, kind: counter, count: 5 }\n  - { id: sink, kind: null }\n",
    )
    .unwrap();
    simclr().arg("validate").arg(&file).assert().success();
}

#[test]
fn yaml_syntax_errors_have_a_position() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("syntax.yaml");
    std::fs::write(&file, "name: x\nstages:\n  - { id: data, kind: counter\n").unwrap();
    let out = simclr().arg("validate").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with(&format!("{}:", file.display())) && err.contains("invalid YAML"), "{err}");
}

#[test]
fn set_overrides_and_removes_stages() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    std::fs::write(
        &file,
        "name: p\nstages:\n  - { id: data, kind: counter, count: 5 }\n  - { id: bad, kind: views }\n  - { id: sink, kind: null }\n",
    )
    .unwrap();
    // `views` after a counter is a port mismatch; switching it off makes the file valid.
    simclr().arg("validate").arg(&file).assert().code(2);
    simclr().args(["validate", "--set", "bad=off"]).arg(&file).assert().success();
    let out = simclr().args(["validate", "--set", "dta.count=3"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("did you mean `data`"));
}

#[test]
fn no_arguments_points_to_the_demo() {
    let out = simclr().output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("simclr demo"));
}

/// `simclr kinds KIND` describes one kind from its schema; a misspelt kind gets a suggestion.
#[test]
fn kinds_describes_one_kind() {
    let out = Command::cargo_bin("simclr").unwrap().args(["kinds", "random_resized_crop"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "random_resized_crop: ",
        "  size: integer, required",
        "  scale: array of number (2 items), default [0.08,1.0]",
        "  interpolation: one of: bilinear, bicubic, area",
        "every stage also takes: id, kind",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    let out = Command::cargo_bin("simclr").unwrap().args(["kinds", "random_resize_crop"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("did you mean `random_resized_crop`?"));
}

/// A source's `shuffle`, `limit`, `shard`, `on_error` are checked by the core, the same way for
/// every source kind (the `counter` once skipped the `limit: 0` check), with their positions
/// and did-you-mean hints that know them.
#[test]
fn source_options_are_checked_for_every_source() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("src.yaml");
    std::fs::write(
        &file,
        "name: s\nstages:\n  - { id: a, kind: counter, count: 4, limit: 0 }\n  - { id: b, kind: synthetic_shapes, shufle: true }\n  - { id: c, kind: counter, count: 4, shard: { index: 2, count: 2 } }\n  - { id: d, kind: counter, count: 4, on_error: ignore }\n",
    )
    .unwrap();
    let out = simclr().arg("validate").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        ":3:39: stage 'a': `limit: 0` leaves no data",
        ":4:38: stage 'b': unknown field `shufle` (did you mean `shuffle`?",
        ":5:39: stage 'c': shard index 2 of 2 is out of range",
        ":6:39: stage 'd': unknown variant `ignore`",
    ] {
        assert!(err.contains(want), "missing {want:?} in\n{err}");
    }
}
