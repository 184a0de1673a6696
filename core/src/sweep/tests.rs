use std::path::Path;

use super::report::csv_field;
use super::*;
use crate::yaml::Pos;

const BASE: &str = "name: t\nstages:\n  - { id: data, kind: counter, count: 10 }\n  - { id: first, kind: identity }\n  - { id: second, kind: identity, workers: 2 }\n  - { id: color, kind: color_distort, strength: 0.5 }\n  - { id: sink, kind: null }\n";

fn sweep_of(section: &str) -> Result<Option<Sweep>, Diagnostics> {
    let src = format!("{BASE}{section}");
    let doc = crate::yaml::parse(&src).unwrap();
    parse(Path::new("p.yaml"), &doc)
}

fn ok(section: &str) -> Sweep {
    match sweep_of(section) {
        Ok(Some(s)) => s,
        Ok(None) => panic!("no sweep"),
        Err(d) => panic!("{d}"),
    }
}

fn err(section: &str) -> String {
    match sweep_of(section) {
        Err(d) => d.to_string(),
        Ok(_) => panic!("expected errors for {section}"),
    }
}

fn names(s: &Sweep) -> Vec<&str> {
    s.variants.iter().map(|v| v.name.as_str()).collect()
}

fn stage<'a>(doc: &'a Spanned<Node>, id: &str) -> Option<&'a Spanned<Node>> {
    let Node::Seq(items) = &doc.value.get("stages")?.value else { return None };
    items.iter().find(|s| s.value.get("id").and_then(|i| i.value.as_str()) == Some(id))
}

fn stage_ids(doc: &Spanned<Node>) -> Vec<String> {
    let Some(Node::Seq(items)) = doc.value.get("stages").map(|s| &s.value) else { return vec![] };
    items.iter().filter_map(|s| s.value.get("id")?.value.as_str().map(String::from)).collect()
}

const FIG5: &str = "sweep:\n  ops:\n    crop: { kind: random_resized_crop, size: 8, views: [0] }\n    cutout: { kind: cutout, views: [0] }\n    color: { kind: color_distort, views: [0] }\n  grid:\n    - { stage: first, ops: [crop, cutout, color] }\n    - { stage: second, ops: [crop, cutout, color] }\n  diagonal: alone\n";

#[test]
fn no_sweep_section_is_none() {
    assert!(sweep_of("").unwrap().is_none());
}

#[test]
fn a_list_keeps_file_order_and_names() {
    let s = ok("sweep:\n  metrics: [simclr.knn_top1]\n  variants:\n    base: {}\n    weak: { color.strength: 0.25 }\n    none: { color: off }\n");
    assert_eq!(names(&s), ["base", "weak", "none"]);
    assert_eq!(s.metrics, ["simclr.knn_top1"]);
    assert!(s.variants[0].changes.is_empty());
    assert_eq!(s.variants[1].describe(), "color.strength=0.25");
    assert_eq!(s.variants[2].describe(), "color=off");
    assert!(s.matrix().is_none());
    // The sweep section is not part of the variants' pipelines.
    assert!(s.variants[0].doc.value.get("sweep").is_none());
}

#[test]
fn metrics_default() {
    let s = ok("sweep:\n  variants: { a: {} }\n");
    assert_eq!(s.metrics, DEFAULT_METRICS);
}

#[test]
fn a_grid_is_the_cartesian_product_first_axis_outermost() {
    let s = ok("sweep:\n  grid:\n    - { crop: {}, nocrop: { first: off } }\n    - { s1: { color.strength: 1.0 }, s2: { color.strength: 2.0 }, s3: { color: off } }\n");
    assert_eq!(s.variants.len(), 6);
    assert_eq!(names(&s), ["crop+s1", "crop+s2", "crop+s3", "nocrop+s1", "nocrop+s2", "nocrop+s3"]);
    assert_eq!(s.variants[4].cell, [1, 1]);
    assert_eq!(s.variants[4].describe(), "first=off; color.strength=2.0");
    assert_eq!(stage_ids(&s.variants[5].doc), ["data", "second", "sink"]);
    let three = ok(
        "sweep:\n  grid:\n    - { a: {}, b: {} }\n    - { c: {}, d: {} }\n    - { e: {}, f: {}, g: {} }\n",
    );
    assert_eq!(three.variants.len(), 12);
    assert_eq!(three.variants[11].name, "b+d+g");
}

#[test]
fn figure5_diagonal_is_the_op_alone() {
    let s = ok(FIG5);
    assert_eq!(s.variants.len(), 9);
    assert_eq!(
        names(&s),
        [
            "crop",
            "crop+cutout",
            "crop+color",
            "cutout+crop",
            "cutout",
            "cutout+color",
            "color+crop",
            "color+cutout",
            "color"
        ]
    );
    // (cutout, cutout) swaps `first` only; `second` stays the base identity.
    let alone = &s.variants[4];
    assert_eq!(alone.cell, [1, 1]);
    assert_eq!(stage(&alone.doc, "first").unwrap().value.get("kind").unwrap().value.as_str(), Some("cutout"));
    assert_eq!(
        stage(&alone.doc, "second").unwrap().value.get("kind").unwrap().value.as_str(),
        Some("identity")
    );
    let pair = &s.variants[5];
    assert_eq!(
        stage(&pair.doc, "second").unwrap().value.get("kind").unwrap().value.as_str(),
        Some("color_distort")
    );
    let m = s.matrix().unwrap();
    assert_eq!(m.rows, ["crop", "cutout", "color"]);
    assert_eq!(m.cols, m.rows);
    assert_eq!(m.cells[1][1], Some(4));
    assert_eq!(m.cells[2][0], Some(6));
    // Without `alone` the diagonal applies both.
    let both = ok(&FIG5.replace("  diagonal: alone\n", ""));
    assert_eq!(both.variants[4].name, "cutout+cutout");
    assert_eq!(
        stage(&both.variants[4].doc, "second").unwrap().value.get("kind").unwrap().value.as_str(),
        Some("cutout")
    );
}

#[test]
fn unordered_skips_the_mirror_and_the_matrix_shows_it() {
    let s = ok(&format!("{FIG5}  unordered: true\n"));
    assert_eq!(names(&s), ["crop", "crop+cutout", "crop+color", "cutout", "cutout+color", "color"]);
    let m = s.matrix().unwrap();
    // (cutout, crop) was not run: the cell shows (crop, cutout).
    assert_eq!(m.cells[1][0], Some(1));
    assert_eq!(m.cells[0][1], Some(1));
    assert_eq!(m.cells[2][2], Some(5));
    let plain = ok(FIG5);
    assert_eq!(plain.matrix().unwrap().cells[1][0], Some(3));
}

#[test]
fn a_swap_keeps_id_position_and_wiring() {
    let s = ok("sweep:\n  variants:\n    j: { second: { kind: color_jitter, brightness: 0.4 } }\n    k: { second: { kind: cutout, workers: 1 } }\n");
    let doc = &s.variants[0].doc;
    assert_eq!(stage_ids(doc), ["data", "first", "second", "color", "sink"]);
    let st = stage(doc, "second").unwrap();
    assert_eq!(st.value.get("kind").unwrap().value.as_str(), Some("color_jitter"));
    assert_eq!(st.value.get("brightness").unwrap().value, Node::Float(0.4));
    // Threading carries over unless the swap gives it.
    assert_eq!(st.value.get("workers").unwrap().value, Node::Int(2));
    assert_eq!(
        stage(&s.variants[1].doc, "second").unwrap().value.get("workers").unwrap().value,
        Node::Int(1)
    );
    // The swapped stage points at where the swap is written (line 10 of the file).
    assert_eq!(st.pos.line, 10);
    // The base's own fields of the old stage are gone.
    assert!(stage(doc, "second").unwrap().value.get("strength").is_none());
}

#[test]
fn the_command_line_can_swap_a_stage_too() {
    let mut doc = crate::yaml::parse(BASE).unwrap();
    spec::apply_override(&mut doc, "second={kind: cutout, p: 0.5}").unwrap();
    let st = stage(&doc, "second").unwrap();
    assert_eq!(st.value.get("kind").unwrap().value.as_str(), Some("cutout"));
    assert_eq!(st.value.get("workers").unwrap().value, Node::Int(2));
    // A command-line value has no place in the file: it keeps the replaced stage's.
    assert_eq!(st.pos.line, 5);
    let e = spec::apply_override(&mut doc, "second={p: 1}").unwrap_err();
    assert!(e.0.contains("can only be switched `off` or swapped"), "{e:?}");
    let e = spec::apply_override(&mut doc, "second={kind: cutout, id: other}").unwrap_err();
    assert!(e.0.contains("keeps the stage id"), "{e:?}");
}

#[test]
fn the_command_line_reaches_into_the_sweep_section() {
    let src = format!("{BASE}sweep:\n  variants: {{ a: {{}} }}\n");
    let mut doc = crate::yaml::parse(&src).unwrap();
    spec::apply_override(&mut doc, "sweep.metrics=[simclr.knn_top1]").unwrap();
    spec::apply_override(&mut doc, "sweep.variants.b={color: off}").unwrap();
    let s = parse(Path::new("p.yaml"), &doc).unwrap().unwrap();
    assert_eq!(s.metrics, ["simclr.knn_top1"]);
    assert_eq!(names(&s), ["a", "b"]);
}

#[test]
fn overrides_set_nested_fields_and_top_level_keys() {
    let s = ok("sweep:\n  variants:\n    a: { color.strength: 0.125, color.extra.deep: 3, seed: 7 }\n");
    let doc = &s.variants[0].doc;
    let color = stage(doc, "color").unwrap();
    assert_eq!(color.value.get("strength").unwrap().value, Node::Float(0.125));
    assert_eq!(color.value.get("extra").unwrap().value.get("deep").unwrap().value, Node::Int(3));
    assert_eq!(doc.value.get("seed").unwrap().value, Node::Int(7));
    // The new value is positioned where the variant writes it.
    assert_eq!(color.value.get("strength").unwrap().pos, Pos { line: 10, col: 26 });
}

#[test]
fn bad_changes_point_at_the_change_and_name_the_variant() {
    let e = err("sweep:\n  variants:\n    a: {}\n    b: { colr.strength: 1 }\n    c: { color: 3 }\n");
    assert!(e.contains("p.yaml:11:10: variant 'b': `colr.strength`: no stage `colr`"), "{e}");
    assert!(e.contains("did you mean `color`"), "{e}");
    assert!(
        e.contains("p.yaml:12:10: variant 'c': `color`: a whole stage can only be switched `off` or swapped"),
        "{e}"
    );
    // The same bad change in several cells is reported once, naming them.
    let e = err("sweep:\n  grid:\n    - { x: { nope: off } }\n    - { a: {}, b: {} }\n");
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("every variant: `nope`: no stage `nope`"), "{e}");
}

#[test]
fn shape_errors_are_all_reported_with_positions() {
    let e = err("sweep:\n  variants: { a: 3, .bad: {} }\n  metric: [x]\n  diagonal: alone\n");
    assert!(e.contains("p.yaml:9:18: sweep: variant `a` must be a mapping of changes"), "{e}");
    assert!(e.contains("p.yaml:9:21: sweep: invalid variant name `.bad`"), "{e}");
    assert!(e.contains("p.yaml:10:3: sweep: unknown key `metric`"), "{e}");
    assert!(e.contains("did you mean `metrics`"), "{e}");
    assert!(e.contains("p.yaml:11:13: sweep: `diagonal` applies to a grid of two or more axes"), "{e}");
    let e =
        err("sweep:\n  ops: { crop: { kind: cutout } }\n  grid:\n    - { stage: first, ops: [crop, crp] }\n");
    assert!(e.contains("p.yaml:11:35: sweep: no op `crp` (did you mean `crop`?"), "{e}");
    assert!(err("sweep: {}\n").contains("no `variants` or `grid`"));
    let e = err("sweep:\n  grid:\n    - { a: {}, b: {} }\n    - { a: {}, b: {} }\n  unordered: 3\n");
    assert!(e.contains("p.yaml:12:14: sweep: `unordered` must be true or false, found `3`"), "{e}");
    let e = err("sweep:\n  grid:\n    - { a: {} }\n    - { b: {} }\n  diagonal: alone\n");
    assert!(e.contains("no cell picks the same name"), "{e}");
}

#[test]
fn duplicate_variant_names_are_refused() {
    let e = err("sweep:\n  grid:\n    - { a+b: {}, a: {} }\n    - { c: {}, b+c: {} }\n");
    assert!(e.contains("two variants are named `a+b+c`"), "{e}");
}

#[test]
fn check_reports_every_variant_with_its_name() {
    let s = ok("sweep:\n  variants:\n    good: {}\n    bad: { color.strength: -1 }\n    worse: { color.strength: -2 }\n");
    let e = s
        .check(|v, spec| {
            let node = spec.stages[3].config.value.get("strength").cloned();
            match node.as_ref().map(|n| &n.value) {
                Some(Node::Float(f)) if *f >= 0.0 => Ok(v.name.clone()),
                _ => {
                    let pos = node.map_or(Pos::default(), |n| n.pos);
                    Err(Diagnostics(vec![Diagnostic::new("p.yaml", pos, "out of range").stage("color")]))
                }
            }
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("p.yaml:11:28: variant 'bad': stage 'color': out of range"), "{e}");
    assert!(e.contains("p.yaml:12:30: variant 'worse': stage 'color': out of range"), "{e}");
    assert!(!e.contains("'good'"), "{e}");
}

struct Fake {
    ran: Vec<String>,
    /// This variant's run fails (the sweep goes on).
    fail_on: Option<String>,
    /// This variant's loss turns NaN at step 11 (the sweep goes on).
    diverge_on: Option<String>,
    /// This variant's run is interrupted (the sweep stops).
    stop_on: Option<String>,
}

impl Fake {
    fn new() -> Self {
        Fake { ran: vec![], fail_on: None, diverge_on: None, stop_on: None }
    }
}

impl VariantRunner for Fake {
    type Error = String;
    fn run(&mut self, index: usize, v: &Variant, dir: &Path) -> Result<Result<(), VariantFailure>, String> {
        self.ran.push(v.name.clone());
        let is = |o: &Option<String>| o.as_deref() == Some(v.name.as_str());
        if is(&self.stop_on) {
            std::fs::write(dir.join("metrics.jsonl"), "{}\n").map_err(|e| e.to_string())?;
            return Err(format!("{} interrupted", v.name));
        }
        if is(&self.fail_on) {
            return Ok(Err(VariantFailure::Failed {
                reason: format!("error: {} broke\nsecond line", v.name),
            }));
        }
        if is(&self.diverge_on) {
            return Ok(Err(VariantFailure::Diverged { step: 11, reason: "loss is NaN".into() }));
        }
        let json = serde_json::to_string_pretty(&v.doc.value.to_json()).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("pipeline.yaml"), json).map_err(|e| e.to_string())?;
        let results = serde_json::json!({
            "simclr": { "linear_top1": 50.0 + index as f64, "knn_top1": 40.0 + index as f64 },
            "chains": [],
        });
        write_atomic(&dir.join(RESULTS_FILE), results.to_string().as_bytes()).map_err(|e| e.to_string())?;
        Ok(Ok(()))
    }
}

impl From<SweepError> for String {
    fn from(e: SweepError) -> String {
        e.to_string()
    }
}

#[test]
fn resume_skips_finished_variants_and_reruns_unfinished_ones() {
    let s = ok("sweep:\n  variants:\n    a: {}\n    b: { color.strength: 0.25 }\n    c: { color: off }\n");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sweep");
    let mut fake = Fake { stop_on: Some("b".into()), ..Fake::new() };
    let e = run(&s, &dir, &mut fake, RunOptions::default(), |_| {}).unwrap_err();
    assert_eq!(e, "b interrupted");
    assert_eq!(fake.ran, ["a", "b"]);
    assert!(finished(&dir.join("a")) && !finished(&dir.join("b")));

    let mut fake = Fake::new();
    let mut events = Vec::new();
    run(&s, &dir, &mut fake, RunOptions::default(), |e| {
        events.push(match e {
            Event::Skipped { variant, .. } => format!("skip {}", variant.name),
            Event::MovedAside { variant, to } => {
                format!("aside {} {}", variant.name, to.file_name().unwrap().to_string_lossy())
            }
            Event::Starting { index, total, variant, .. } => {
                format!("start {} {index}/{total}", variant.name)
            }
            other => format!("{other:?}"),
        })
    })
    .unwrap();
    assert_eq!(fake.ran, ["b", "c"]);
    assert_eq!(events, ["skip a", "aside b b.1", "start b 1/3", "start c 2/3"]);
    // The interrupted run's files were kept, out of the way.
    assert!(dir.join(".partial/b.1/metrics.jsonl").is_file());
    assert!(!dir.join("b/metrics.jsonl").exists());

    // Everything finished: nothing runs.
    let mut fake = Fake::new();
    run(&s, &dir, &mut fake, RunOptions::default(), |_| {}).unwrap();
    assert!(fake.ran.is_empty());

    // The report has a row per variant with the metrics.
    let rep = report(&s, &dir);
    assert_eq!(rep.rows.len(), 3);
    assert_eq!(rep.rows[1].values, [Some(51.0), Some(41.0)]);
    let csv = rep.to_csv();
    assert_eq!(
        csv,
        "variant,changes,status,simclr.linear_top1,simclr.knn_top1\na,,finished,50,40\nb,color.strength=0.25,finished,51,41\nc,color=off,finished,52,42\n"
    );
    let md = rep.to_markdown(&s, Some("chart.png"));
    assert!(md.contains("| b | `color.strength=0.25` | 51.00 | 41.00 |"), "{md}");
    assert!(md.contains("| a | (base) | 50.00 | 40.00 |"), "{md}");

    // A finished variant whose pipeline changed since is refused before anything runs.
    let changed = ok(
        "sweep:\n  variants:\n    a: {}\n    b: { color.strength: 0.5 }\n    c: { color: off }\n    d: {}\n",
    );
    let mut fake = Fake::new();
    let e = run(&changed, &dir, &mut fake, RunOptions::default(), |_| {}).unwrap_err();
    assert!(e.contains("finished variant 'b' ran with a different pipeline"), "{e}");
    assert!(fake.ran.is_empty());
}

#[test]
fn a_failed_or_diverged_variant_is_recorded_and_the_sweep_goes_on() {
    let s = ok("sweep:\n  variants:\n    a: { color.strength: 0.1 }\n    b: { color.strength: 0.25 }\n    c: { color: off }\n    d: { color.strength: 0.75 }\n");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sweep");
    let mut fake = Fake { diverge_on: Some("a".into()), fail_on: Some("c".into()), ..Fake::new() };
    let mut events = Vec::new();
    let failed = run(&s, &dir, &mut fake, RunOptions::default(), |e| {
        if let Event::Failed { variant, failure } = e {
            events.push(format!("{}: {}", variant.name, failure.describe()));
        }
    })
    .unwrap();
    assert_eq!(fake.ran, ["a", "b", "c", "d"]);
    assert_eq!(events, ["a: diverged at step 11", "c: failed: c broke"]);
    let names: Vec<&str> = failed.iter().map(|(v, _)| v.name.as_str()).collect();
    assert_eq!(names, ["a", "c"]);
    assert_eq!(
        failure(&dir.join("a")),
        Some(VariantFailure::Diverged { step: 11, reason: "loss is NaN".into() })
    );
    assert!(failure(&dir.join("b")).is_none() && finished(&dir.join("b")) && finished(&dir.join("d")));

    let rep = report(&s, &dir);
    let status: Vec<String> = rep.rows.iter().map(|r| r.status()).collect();
    assert_eq!(status, ["diverged at step 11", "finished", "failed: c broke", "finished"]);
    assert_eq!(rep.rows[0].values, [None, None]);
    let csv = rep.to_csv();
    assert!(csv.contains("\na,color.strength=0.1,diverged at step 11,,\n"), "{csv}");
    let md = rep.to_markdown(&s, None);
    assert!(md.contains("4 variants, 2 finished, 2 failed or diverged."), "{md}");
    assert!(md.contains("| a (diverged at step 11) |"), "{md}");

    // --fail-fast: the first failure ends the sweep.
    let dir = tmp.path().join("fast");
    let mut fake = Fake { diverge_on: Some("b".into()), ..Fake::new() };
    let failed = run(&s, &dir, &mut fake, RunOptions { fail_fast: true }, |_| {}).unwrap();
    assert_eq!(fake.ran, ["a", "b"]);
    assert_eq!(failed.len(), 1);

    // A rerun runs the failed variants again, the finished ones not.
    let mut fake = Fake::new();
    let failed = run(&s, &dir, &mut fake, RunOptions::default(), |_| {}).unwrap();
    assert_eq!(fake.ran, ["b", "c", "d"]);
    assert!(failed.is_empty() && failure(&dir.join("b")).is_none());
}

#[test]
fn variants_with_the_same_pipeline_run_once_and_report_under_each_name() {
    // `b` sets the value the base already has, `d` repeats `c`: two runs are saved.
    let s = ok("sweep:\n  variants:\n    a: {}\n    b: { color.strength: 0.5 }\n    c: { color: off }\n    d: { color: off }\n");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sweep");
    let mut fake = Fake::new();
    let mut same = Vec::new();
    run(&s, &dir, &mut fake, RunOptions::default(), |e| {
        if let Event::SameAs { variant, of } = e {
            same.push(format!("{}={}", variant.name, of.name));
        }
    })
    .unwrap();
    assert_eq!(fake.ran, ["a", "c"]);
    assert_eq!(same, ["b=a", "d=c"]);
    let rep = report(&s, &dir);
    let values: Vec<Option<f64>> = rep.rows.iter().map(|r| r.values[0]).collect();
    assert_eq!(values, [Some(50.0), Some(50.0), Some(52.0), Some(52.0)]);
    assert!(dir.join("d/SAME_AS").is_file());

    // A copy of a failure is a failure.
    let dir = tmp.path().join("failing");
    let mut fake = Fake { fail_on: Some("c".into()), ..Fake::new() };
    let failed = run(&s, &dir, &mut fake, RunOptions::default(), |_| {}).unwrap();
    let names: Vec<&str> = failed.iter().map(|(v, _)| v.name.as_str()).collect();
    assert_eq!(names, ["c", "d"]);
    assert_eq!(fake.ran, ["a", "c"]);
}

#[test]
fn report_leaves_missing_metrics_empty() {
    let s = ok("sweep:\n  metrics: [simclr.linear_top1, chains.0.samples, nope.x]\n  variants: { a: {}, b: {}, c: {} }\n");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    std::fs::create_dir_all(dir.join("a")).unwrap();
    std::fs::create_dir_all(dir.join("c")).unwrap();
    std::fs::write(dir.join("a/results.json"), r#"{"chains": [{"samples": 50}]}"#).unwrap();
    std::fs::write(dir.join("c/results.json"), "{not json").unwrap();
    let rep = report(&s, &dir);
    assert_eq!(rep.rows[0].values, [None, Some(50.0), None]);
    assert!(rep.rows[0].finished && !rep.rows[1].finished);
    assert_eq!(rep.rows[2].values, [None, None, None]);
    assert_eq!(rep.warnings.len(), 1);
    assert!(rep.to_csv().contains("\na,,finished,,50,\nb,,not finished,,,\n"), "{}", rep.to_csv());
    let md = rep.to_markdown(&s, None);
    assert!(md.contains("| b (not finished) |"), "{md}");
    assert!(md.contains("## Warnings"), "{md}");
}

/// A report in which every variant finished with its index as the first metric.
fn numbered_report(s: &Sweep) -> Report {
    let rows = s
        .variants
        .iter()
        .enumerate()
        .map(|(i, v)| Row {
            variant: v.name.clone(),
            changes: v.describe(),
            finished: true,
            failure: None,
            values: vec![Some(i as f64), None],
        })
        .collect();
    Report { metrics: s.metrics.clone(), rows, warnings: vec![] }
}

#[test]
fn markdown_has_the_matrix_for_a_2d_grid() {
    let s = ok(FIG5);
    let rep = numbered_report(&s);
    let md = rep.to_markdown(&s, Some("chart.png"));
    assert!(md.contains("| | crop | cutout | color |"), "{md}");
    assert!(md.contains("| **cutout** | 3.00 | 4.00 | 5.00 |"), "{md}");
    assert!(md.contains("![simclr.linear_top1](chart.png)"), "{md}");
}

#[test]
fn csv_quotes_what_needs_it() {
    assert_eq!(csv_field("a,b"), "\"a,b\"");
    assert_eq!(csv_field("say \"x\""), "\"say \"\"x\"\"\"");
    assert_eq!(csv_field("plain"), "plain");
}

#[test]
fn write_atomic_replaces_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let p = dir.join("results.json");
    write_atomic(&p, b"one").unwrap();
    write_atomic(&p, b"two").unwrap();
    assert_eq!(std::fs::read_to_string(&p).unwrap(), "two");
    assert!(!dir.join("results.json.tmp").exists());
}

#[test]
fn seeds_run_every_variant_once_per_seed() {
    let s = ok("sweep:\n  variants:\n    a: {}\n    b: { color.strength: 0.25 }\n  seeds: [42, 7]\n");
    assert_eq!(names(&s), ["a+seed42", "a+seed7", "b+seed42", "b+seed7"]);
    assert_eq!(s.seeds, [42, 7]);
    let bases: Vec<&str> = s.variants.iter().map(|v| v.base.as_str()).collect();
    assert_eq!(bases, ["a", "a", "b", "b"]);
    assert_eq!(s.variants[3].seed, Some(7));
    assert_eq!(s.variants[3].describe(), "color.strength=0.25; seed=7");
    // The seed is the pipeline's own `seed`, set after the variant's changes.
    assert_eq!(s.variants[1].doc.value.get("seed").map(|n| n.value.clone()), Some(Node::Int(7)));
    assert_eq!(s.variants[0].doc.value.get("seed").map(|n| n.value.clone()), Some(Node::Int(42)));
    // Without `seeds:` nothing changes: one run per variant, named as before.
    let plain = ok("sweep:\n  variants: { a: {}, b: {} }\n");
    assert_eq!(names(&plain), ["a", "b"]);
    assert!(plain.variants.iter().all(|v| v.seed.is_none() && v.base == v.name));
}

#[test]
fn bad_seeds_are_reported_at_their_position() {
    let e = err("sweep:\n  variants: { a: {} }\n  seeds: []\n");
    assert!(e.contains("p.yaml:10:10") && e.contains("non-empty list of seeds"), "{e}");
    let e = err("sweep:\n  variants: { a: {} }\n  seeds: [1, -2, x, 1]\n");
    assert!(e.contains("p.yaml:10:14: sweep: a seed is a whole number from 0, found `-2`"), "{e}");
    assert!(e.contains("p.yaml:10:18: sweep: a seed is a whole number from 0, found `x`"), "{e}");
    assert!(e.contains("p.yaml:10:21: sweep: seed 1 is listed twice"), "{e}");
    let e = err("sweep:\n  variants: { a: {} }\n  seeds: 3\n");
    assert!(e.contains("`seeds` must be a non-empty list"), "{e}");
}

#[test]
fn the_report_averages_each_variant_over_its_seeds() {
    let s = ok("sweep:\n  metrics: [simclr.linear_top1]\n  variants: { a: {}, b: { color.strength: 1.0 } }\n  seeds: [1, 2, 3]\n");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    // a: 50, 52, 54 (mean 52, sd 2); b: 60 and one run not finished.
    for (name, v) in [("a+seed1", 50.0), ("a+seed2", 52.0), ("a+seed3", 54.0), ("b+seed1", 60.0)] {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        std::fs::write(
            dir.join(name).join("results.json"),
            format!(r#"{{"simclr": {{"linear_top1": {v}}}}}"#),
        )
        .unwrap();
    }
    let rep = report(&s, &dir);
    let g = rep.groups(&s);
    assert_eq!(g.len(), 2);
    assert_eq!((g[0].variant.as_str(), g[0].finished, g[0].rows.len()), ("a", 3, 3));
    let a = g[0].stats[0].unwrap();
    assert!((a.mean - 52.0).abs() < 1e-12 && (a.sd.unwrap() - 2.0).abs() < 1e-12 && a.n == 3, "{a:?}");
    assert_eq!(g[1].stats[0], Some(Stat { mean: 60.0, sd: None, n: 1 }));
    assert_eq!((g[1].finished, g[1].changes.as_str()), (1, "color.strength=1.0"));
    assert_eq!(rep.shown_value(&s, 1), Some(52.0));
    let md = rep.to_markdown(&s, None);
    assert!(md.contains("## Mean ± standard deviation over seeds 1, 2, 3"), "{md}");
    assert!(md.contains("| a | (base) | 3/3 | 52.00 ± 2.00 |"), "{md}");
    assert!(md.contains("| b | `color.strength=1.0` | 1/3 | 60.00 |"), "{md}");
    let csv = rep.to_mean_csv(&s).unwrap();
    assert!(
        csv.starts_with("variant,changes,runs,finished,simclr.linear_top1_mean,simclr.linear_top1_sd\n"),
        "{csv}"
    );
    assert!(csv.contains("\na,,3,3,52,2\n") && csv.contains("\nb,color.strength=1.0,3,1,60,\n"), "{csv}");
    // Without seeds there is no mean table and no mean CSV.
    let plain = ok("sweep:\n  variants: { a: {} }\n");
    let rep = report(&plain, &dir);
    assert!(rep.groups(&plain).is_empty() && rep.to_mean_csv(&plain).is_none());
    assert!(!rep.to_markdown(&plain, None).contains("Mean ±"));
}

#[test]
fn a_grid_with_seeds_shows_the_mean_in_its_matrix() {
    let s = ok(&format!("{FIG5}  seeds: [5, 6]\n"));
    assert_eq!(s.variants.len(), 18);
    assert_eq!(s.variants[0].name, "crop+seed5");
    let rep = numbered_report(&s);
    let md = rep.to_markdown(&s, None);
    // Row `cutout`: cells (cutout, crop) = runs 6, 7; (cutout) alone = 8, 9; (cutout, color) = 10, 11.
    assert!(md.contains("| **cutout** | 6.50 | 8.50 | 10.50 |"), "{md}");
    assert!(md.contains("mean over the seeds"), "{md}");
}
