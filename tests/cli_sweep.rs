//! `simclr sweep` end to end on a tiny pipeline without training: every variant runs into its
//! own folder, the report is written, a rerun resumes, and a bad variant stops everything
//! before anything runs.

use std::path::{Path, PathBuf};

use assert_cmd::Command;

fn simclr() -> Command {
    Command::cargo_bin("simclr").unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const TINY: &str = "name: tiny
seed: 3
stages:
  - { id: data, kind: synthetic_shapes, count: 50, size: 24 }
  - { id: views, kind: views }
  - { id: first, kind: identity }
  - { id: second, kind: identity }
  - { id: sink, kind: null }
sweep:
  metrics: [chains.0.samples, simclr.linear_top1]
  ops:
    crop: { kind: random_resized_crop, size: 16, views: [0] }
    color: { kind: color_distort, strength: 0.5, views: [0] }
  grid:
    - { stage: first, ops: [crop, color] }
    - { stage: second, ops: [crop, color] }
  diagonal: alone
";

fn sweep(file: &Path, out: &Path) -> (bool, String, String) {
    let o = simclr().arg("sweep").arg(file).arg("--out").arg(out).args(["--threads", "2"]).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn a_grid_sweep_runs_every_variant_reports_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let file = write(tmp.path(), "p.yaml", TINY);
    let out = tmp.path().join("sweep");

    let (ok, stdout, stderr) = sweep(&file, &out);
    assert!(ok, "{stdout}\n{stderr}");
    let variants = ["crop", "crop+color", "color+crop", "color"];
    for v in variants {
        let results: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(v).join("results.json")).unwrap())
                .unwrap();
        assert_eq!(results["chains"][0]["samples"], 50, "{v}");
        assert!(out.join(v).join("pipeline.yaml").is_file());
        assert!(!out.join(v).join("results.json.tmp").exists());
    }
    assert_eq!(stdout.matches("== variant").count(), 4, "{stdout}");
    // The variant's pipeline is the base with the ops swapped in.
    let color = simclr_core::yaml::parse(&std::fs::read_to_string(out.join("color/pipeline.yaml")).unwrap())
        .unwrap()
        .value
        .to_json();
    assert_eq!(color["stages"][2]["kind"], "color_distort");
    assert_eq!(color["stages"][3]["kind"], "identity");
    assert!(color.get("sweep").is_none());

    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(
        csv,
        "variant,changes,status,chains.0.samples,simclr.linear_top1\n\
         crop,first=crop,finished,50,\n\
         crop+color,first=crop; second=color,finished,50,\n\
         color+crop,first=color; second=crop,finished,50,\n\
         color,first=color,finished,50,\n"
    );
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.contains("| crop+color | `first=crop; second=color` | 50.00 |  |"), "{md}");
    assert!(md.contains("| **color** | 50.00 | 50.00 |"), "{md}");
    assert!(md.contains("![chains.0.samples](chart.png)"), "{md}");
    let chart = image::open(out.join("chart.png")).unwrap();
    assert!(chart.width() > 200 && chart.height() > 200);

    // Rerun: everything is finished, nothing runs again.
    let (ok, stdout, stderr) = sweep(&file, &out);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.matches("finished earlier").count(), 4, "{stdout}");
    assert_eq!(stdout.matches("== variant").count(), 0, "{stdout}");

    // An interrupted variant (no results.json) runs again; the others are skipped.
    std::fs::remove_file(out.join("crop+color/results.json")).unwrap();
    let (ok, stdout, stderr) = sweep(&file, &out);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.matches("== variant").count(), 1, "{stdout}");
    assert!(stdout.contains("== variant 2/4 'crop+color'"), "{stdout}");
    assert!(stdout.contains("moved to"), "{stdout}");
    assert!(out.join("crop+color/results.json").is_file());

    // Changing the pipeline under a finished sweep is refused, naming the variants.
    let changed = write(tmp.path(), "p.yaml", &TINY.replace("strength: 0.5", "strength: 1.0"));
    let (ok, _, stderr) = sweep(&changed, &out);
    assert!(!ok);
    assert!(stderr.contains("'crop+color', 'color+crop', 'color'"), "{stderr}");
}

/// A tiny training pipeline; the `huge` variant's unnormalized logits overflow at once.
const TRAINS: &str = "name: trains
seed: 3
stages:
  - { id: data, kind: synthetic_shapes, count: 32, size: 16, classes: 4, shuffle: true }
  - { id: views, kind: views, count: 2 }
  - { id: crop, kind: random_resized_crop, size: 16, scale: [0.5, 1.0] }
  - { id: tensor, kind: to_tensor }
  - { id: batch, kind: batch, batch_size: 16 }
  - id: train
    kind: simclr_train
    width: 0.125
    head: { hidden_dim: 32, out_dim: 16 }
    loss: { temperature: 0.5 }
    optimizer: { kind: lars, lr: 1.0, lr_scaling: none }
    epochs: 1
    warmup_epochs: 0
    checkpoint_every: 0
sweep:
  metrics: [train.steps]
  variants:
    huge: { train.loss.l2_normalize: false, train.loss.temperature: 1.0e-30 }
    ok: {}
    same: { train.loss.temperature: 0.5 }
";

#[test]
fn a_diverging_variant_is_recorded_and_the_sweep_goes_on_then_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let file = write(tmp.path(), "t.yaml", TRAINS);
    let out = tmp.path().join("sweep");
    let (ok, stdout, stderr) = sweep(&file, &out);
    assert!(!ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("variant 'huge': diverged at step 1; going on"), "{stdout}");
    assert!(stderr.contains("1 of 3 variants did not finish: 'huge' (diverged at step 1)"), "{stderr}");
    assert!(out.join("ok/results.json").is_file());
    // `same` is `ok` written differently: run once, reported twice.
    assert!(stdout.contains("variant 'same': the same pipeline as 'ok'"), "{stdout}");
    assert_eq!(stdout.matches("== variant").count(), 2, "{stdout}");
    assert!(out.join("same/results.json").is_file());
    let failure: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("huge/failure.json")).unwrap()).unwrap();
    assert_eq!(failure["status"], "diverged");
    assert_eq!(failure["step"], 1);
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let huge = csv.lines().find(|l| l.starts_with("huge,")).unwrap();
    assert!(huge.ends_with(",diverged at step 1,"), "{csv}");
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.contains("| huge (diverged at step 1) |"), "{md}");

    // --fail-fast stops at the first failure.
    let (ok, stdout, _) = {
        let o = simclr()
            .arg("sweep")
            .arg(&file)
            .arg("--out")
            .arg(tmp.path().join("fast"))
            .arg("--fail-fast")
            .output()
            .unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned(), ())
    };
    assert!(!ok);
    assert!(stdout.contains("stopping (--fail-fast)"), "{stdout}");
    assert_eq!(stdout.matches("== variant").count(), 1, "{stdout}");
}

#[test]
fn a_variant_that_does_not_validate_stops_the_sweep_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let text = "name: bad
stages:
  - { id: data, kind: synthetic_shapes, count: 50, size: 24 }
  - { id: views, kind: views }
  - { id: crop, kind: random_resized_crop, size: 16 }
  - { id: sink, kind: null }
sweep:
  variants:
    good: {}
    small: { crop.size: 0 }
    typo: { crop.sise: 8 }
";
    let file = write(tmp.path(), "p.yaml", text);
    let out = tmp.path().join("sweep");
    let o = simclr().arg("sweep").arg(&file).arg("--out").arg(&out).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("p.yaml:10:14: variant 'small': stage 'crop':"), "{stderr}");
    assert!(stderr.contains("p.yaml:11:13: variant 'typo': stage 'crop': unknown field `sise`"), "{stderr}");
    assert!(!stderr.contains("'good'"), "{stderr}");
    assert!(!out.exists(), "nothing may run");
    // `validate` checks the variants too.
    let o = simclr().arg("validate").arg(&file).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("variant 'typo'"));
}

#[test]
fn sweep_needs_a_sweep_section_and_validate_counts_variants() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = write(
        tmp.path(),
        "plain.yaml",
        "stages:\n  - { id: data, kind: counter, count: 5 }\n  - { id: sink, kind: null }\n",
    );
    let o = simclr().arg("sweep").arg(&plain).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no `sweep:` section"));
    let file = write(tmp.path(), "p.yaml", TINY);
    simclr()
        .arg("validate")
        .arg(&file)
        .assert()
        .success()
        .stdout(predicates::str::contains("sweep of 4 variants"));
}

#[test]
fn seeds_run_each_variant_per_seed_and_the_report_has_the_mean() {
    let tmp = tempfile::tempdir().unwrap();
    let file = write(
        tmp.path(),
        "p.yaml",
        "name: seeds\nseed: 3\nstages:\n  - { id: data, kind: synthetic_shapes, count: 20, size: 16 }\n  - { id: crop, kind: random_resized_crop, size: 8 }\n  - { id: sink, kind: null }\nsweep:\n  metrics: [chains.0.samples]\n  variants: { a: {}, b: { crop.size: 12 } }\n",
    );
    let out = tmp.path().join("sweep");
    let o = simclr()
        .arg("sweep")
        .arg(&file)
        .args(["--set", "sweep.seeds=[5, 6]", "--seed", "9", "--threads", "2", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("--seed is not used"), "{stdout}");
    for (v, seed) in [("a+seed5", 5), ("a+seed6", 6), ("b+seed5", 5), ("b+seed6", 6)] {
        let saved = std::fs::read_to_string(out.join(v).join("pipeline.yaml")).unwrap();
        assert!(saved.contains(&format!("seed: {seed}\n")), "{v}: {saved}");
    }
    let mean = std::fs::read_to_string(out.join("results-mean.csv")).unwrap();
    assert_eq!(
        mean,
        "variant,changes,runs,finished,chains.0.samples_mean,chains.0.samples_sd\na,,2,2,20,0\nb,crop.size=12,2,2,20,0\n"
    );
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.contains("## Mean ± standard deviation over seeds 5, 6"), "{md}");
    assert!(md.contains("| a | (base) | 2/2 | 20.00 ± 0.00 |"), "{md}");
    assert!(out.join("chart.png").is_file());
}
