//! The run directory: where a run writes its files, their names, and how they are written
//! (whole or not at all).

/// The resolved pipeline a run ran (see [`resolved_pipeline`]).
pub const PIPELINE_FILE: &str = "pipeline.yaml";
/// One JSON line per training step and epoch.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// Every final metric; written last, so its presence means the run finished.
pub const RESULTS_FILE: &str = "results.json";
/// Why a sweep variant failed (instead of `results.json`).
pub const FAILURE_FILE: &str = "failure.json";
/// The trained encoder (torchvision ResNet names).
pub const ENCODER_FILE: &str = "encoder.safetensors";
/// The training state `--resume` continues from.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// The run's report (tables and plots).
pub const REPORT_FILE: &str = "report.md";
/// Source images and their augmented views.
pub const PREVIEW_FILE: &str = "views.png";
/// TensorBoard event files.
pub const TB_DIR: &str = "tb";

/// Writes a file so that it exists either whole or not at all: a temporary file beside it
/// (`NAME.tmp`), synced, then renamed over it.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut tmp_name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        // A full disk: do not leave a partial temporary file taking the space (the previous
        // file is untouched).
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // The rename reaches the disk with the directory (best effort: not every filesystem can
    // sync a directory).
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// The default run directory of a pipeline named `name`: `runs/<name>/<timestamp>`.
pub fn default_dir(name: &str) -> std::path::PathBuf {
    std::path::Path::new("runs").join(name).join(timestamp())
}

/// `YYYYMMDD-HHMMSS` in UTC, for run directories (sortable, no colons).
pub fn timestamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The pipeline a run ran, as a document that reproduces it from anywhere: overrides and the
/// profile applied (the `sweep:`, `profiles:` and `profile:` keys dropped), every stage's
/// defaults written out (from its kind's schema: the values the parser would use), and relative
/// paths (`path:` fields, `plugins:` entries with a `/`) made absolute.
pub fn resolved_pipeline(plan: &crate::Plan, registry: &crate::Registry) -> serde_json::Value {
    use serde_json::Value;
    let base = plan.base_dir();
    let base = std::path::absolute(&base).unwrap_or(base);
    let absolute = |p: &str| -> String {
        let path = std::path::Path::new(p);
        if path.is_absolute() {
            p.to_string()
        } else {
            base.join(path).display().to_string()
        }
    };
    let mut doc = plan.spec.doc.value.to_json();
    let Some(top) = doc.as_object_mut() else { return doc };
    for k in ["sweep", "profiles", "profile"] {
        top.remove(k);
    }
    top.insert("name".into(), Value::String(plan.spec.name.clone()));
    top.insert("seed".into(), Value::from(plan.spec.seed));
    if let Some(Value::Array(plugins)) = top.get_mut("plugins") {
        for p in plugins.iter_mut() {
            let path = match p {
                Value::Object(entry) => entry.get_mut("path"),
                other => Some(other),
            };
            if let Some(p) = path {
                if let Some(s) = p.as_str().filter(|s| s.contains('/')) {
                    *p = Value::String(absolute(s));
                }
            }
        }
    }
    let mut generator = schemars::generate::SchemaSettings::draft2020_12().into_generator();
    if let Some(Value::Array(stages)) = top.get_mut("stages") {
        for stage in stages.iter_mut().filter_map(Value::as_object_mut) {
            let kind = match stage.get("kind") {
                Some(Value::String(k)) => k.clone(),
                Some(Value::Null) => "null".to_string(),
                _ => continue,
            };
            if let Some(Value::String(p)) = stage.get("path") {
                let p = absolute(p);
                stage.insert("path".into(), Value::String(p));
            }
            let Some(factory) = registry.get(&kind) else { continue };
            let schema = factory.schema(&mut generator);
            if let Some(Value::Object(props)) = schema.get("properties") {
                for (field, prop) in props {
                    if let Some(default) = prop.get("default") {
                        let mut d = default.clone();
                        crate::schema::shorten_f32(&mut d);
                        stage.entry(field.clone()).or_insert(d);
                    }
                }
            }
        }
    }
    doc
}

/// Writes `RUN_DIR/pipeline.yaml`: the resolved pipeline of `plan` (see
/// [`resolved_pipeline`]) under a header saying what produced it (`producer`, e.g.
/// `simclr 0.1.0`) and how to run it again.
pub fn write_pipeline(
    dir: &std::path::Path,
    plan: &crate::Plan,
    registry: &crate::Registry,
    producer: &str,
) -> std::io::Result<()> {
    let path = dir.join(PIPELINE_FILE);
    let header = format!(
        "The pipeline this run ran, resolved: {} with its overrides applied, every stage's\n\
         defaults written out and paths made absolute ({producer}, {} UTC).\n\
         Rerun it from anywhere: simclr run {}",
        plan.spec.file.display(),
        timestamp(),
        path.display()
    );
    std::fs::write(&path, to_yaml(&resolved_pipeline(plan, registry), &header))
}

/// Writes a pipeline document as block YAML: top-level keys one per line, each stage one line
/// as a flow mapping (`id` and `kind` first). Strings are plain where that reads back as the
/// same string, else double-quoted with JSON escapes (valid YAML); numbers keep serde_json's
/// shortest round-trip form. `header` lines become `# ` comments at the top.
pub fn to_yaml(doc: &serde_json::Value, header: &str) -> String {
    use serde_json::Value;
    let mut out = String::new();
    // `\r` (in a path, say) would end a YAML comment line early.
    let header = header.replace('\r', " ");
    for line in header.lines() {
        out += format!("# {line}").trim_end();
        out.push('\n');
    }
    let Value::Object(top) = doc else {
        out += &flow(doc);
        out.push('\n');
        return out;
    };
    let order = ["name", "seed", "fuse", "chunk", "plugins", "stages"];
    let mut keys: Vec<&String> = top.keys().collect();
    keys.sort_by_key(|k| (order.iter().position(|o| o == k).unwrap_or(order.len()), k.as_str()));
    for k in keys {
        let v = &top[k.as_str()];
        match (k.as_str(), v) {
            ("stages", Value::Array(stages)) if !stages.is_empty() => {
                out += "stages:\n";
                for s in stages {
                    out += &format!("  - {}\n", flow(s));
                }
            }
            _ => out += &format!("{}: {}\n", scalar_key(k), flow(v)),
        }
    }
    out
}

/// One value in flow style (`{ a: 1, b: [2, 3] }`); stage-like maps put `id`, `kind` first.
fn flow(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => scalar_string(s),
        Value::Array(items) => format!("[{}]", items.iter().map(flow).collect::<Vec<_>>().join(", ")),
        Value::Object(m) if m.is_empty() => "{}".into(),
        Value::Object(m) => {
            let first = ["id", "kind", "name", "input", "inputs"];
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort_by_key(|k| (first.iter().position(|o| o == k).unwrap_or(first.len()), k.as_str()));
            let fields: Vec<String> =
                keys.iter().map(|k| format!("{}: {}", scalar_key(k), flow(&m[k.as_str()]))).collect();
            format!("{{ {} }}", fields.join(", "))
        }
    }
}

fn scalar_key(k: &str) -> String {
    scalar_string(k)
}

/// A string as a plain scalar when it cannot read as anything else, else double-quoted.
fn scalar_string(s: &str) -> String {
    let plain = s.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '/')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "_./-".contains(c))
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "null" | "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n" | "inf" | "nan"
        );
    if plain {
        s.to_string()
    } else {
        serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A full disk (the temporary file is /dev/full): the error says so, the previous file is
    /// whole and no temporary file is left behind.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_full_disk_keeps_the_previous_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint.safetensors");
        write_atomic(&path, b"first").unwrap();
        let tmp = dir.path().join("checkpoint.safetensors.tmp");
        std::os::unix::fs::symlink("/dev/full", &tmp).unwrap();
        let e = write_atomic(&path, b"second, longer").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        assert!(std::fs::symlink_metadata(&tmp).is_err(), "the temporary file was left");
        write_atomic(&path, b"third").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"third");
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(serde_json::Value::from),
            (-1e12f64..1e12).prop_map(serde_json::Value::from),
            "[ -~]{0,12}".prop_map(serde_json::Value::String),
            "[a-z_./-]{1,8}".prop_map(serde_json::Value::String),
            prop_oneof![
                Just("true"),
                Just("null"),
                Just("off"),
                Just("1.5"),
                Just("-x"),
                Just("a: b"),
                Just("#c")
            ]
            .prop_map(|s| serde_json::Value::String(s.into())),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
                proptest::collection::btree_map("[a-z_]{1,6}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// What `to_yaml` writes reads back (with this crate's YAML parser) as the same value.
        #[test]
        fn yaml_round_trips(stages in proptest::collection::vec(json_value(), 0..4), name in "[ -~]{1,10}", extra in json_value()) {
            let doc = serde_json::json!({"name": name, "seed": 3, "stages": stages, "extra": extra});
            let text = to_yaml(&doc, "made by a test\nsecond line");
            let back = crate::yaml::parse(&text).map_err(|e| TestCaseError::fail(format!("{e:?}\n{text}")))?;
            prop_assert_eq!(back.value.to_json(), doc, "{}", text);
        }
    }
}
