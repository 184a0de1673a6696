//! `simclr kinds [KIND] [--plugin LIB]...`: the stage kinds, or one kind's fields.

use serde_json::Value;

use crate::failure::Failure;
use crate::load::registry;
use crate::plugins_cmd;

/// Lists every kind (plugin ones marked with their library), or describes `kind`.
pub fn run(kind: Option<&str>, plugins: &[String]) -> Result<(), Failure> {
    let mut registry = registry();
    let from = plugins_cmd::register_libraries(plugins, &mut registry).map_err(Failure::Invalid)?;
    let Some(kind) = kind else {
        let mut kinds: Vec<_> = registry.kinds().collect();
        kinds.sort_by(|a, b| a.kind().cmp(b.kind()));
        for f in kinds {
            let origin = from.get(f.kind()).map(|lib| format!("  [plugin: {lib}]")).unwrap_or_default();
            println!(
                "{:<22} {:<7} {}{origin}",
                f.kind(),
                format!("{:?}", f.role()).to_lowercase(),
                f.about()
            );
        }
        println!("\n`simclr kinds KIND` describes one kind's fields.");
        return Ok(());
    };
    let Some(factory) = registry.get(kind) else {
        let hint = simclr_core::suggest(kind, registry.kinds().map(|f| f.kind()))
            .map(|s| format!("did you mean `{s}`? "))
            .unwrap_or_default();
        return Err(Failure::Invalid(format!(
            "no stage kind `{kind}`: {hint}`simclr kinds` lists them (plugin kinds need `--plugin LIB`)"
        )));
    };
    let schema = simclr_core::schema::pipeline_schema(&registry);
    let stage = schema["$defs"]["stage"]["oneOf"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["title"] == kind))
        .cloned()
        .unwrap_or_default();
    print!("{}", describe(kind, factory.about(), from.get(kind), &stage, &schema["$defs"]));
    Ok(())
}

/// The text of `simclr kinds KIND`: what the kind does, then each of its own fields with its
/// type, default and documentation (the keys every stage takes are listed once at the end).
fn describe(kind: &str, about: &str, plugin: Option<&String>, stage: &Value, defs: &Value) -> String {
    let mut out = format!("{kind}: {about}\n");
    if let Some(lib) = plugin {
        out += &format!("from plugin library {lib}\n");
    }
    if let Some(d) = stage.get("description").and_then(Value::as_str).filter(|d| *d != about) {
        out += &format!("\n{}\n", d.trim());
    }
    let required: Vec<&str> = stage["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let common = simclr_core::spec::COMMON_STAGE_KEYS;
    let mut fields: Vec<(&String, &Value)> = stage["properties"]
        .as_object()
        .map(|p| p.iter().filter(|(k, _)| !common.contains(&k.as_str())).collect())
        .unwrap_or_default();
    fields.sort_by_key(|(k, _)| k.as_str());
    out += if fields.is_empty() { "\nno fields of its own\n" } else { "\nfields:\n" };
    for (name, prop) in fields {
        let mut line = format!("  {name}: {}", type_of(prop, defs));
        if required.contains(&name.as_str()) {
            line += ", required";
        }
        if let Some(d) = prop.get("default") {
            line += &format!(", default {d}");
        }
        out += &line;
        out.push('\n');
        if let Some(doc) = prop.get("description").and_then(Value::as_str) {
            for l in doc.lines() {
                out += &format!("      {}\n", l.trim());
            }
        }
    }
    out += &format!("\nevery stage also takes: {}\n", common.join(", "));
    out
}

/// A field's type in words: `number`, `array of number (2 items)`, `one of: a, b`, ...
fn type_of(prop: &Value, defs: &Value) -> String {
    if let Some(r) = prop.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/$defs/");
        return type_of(&defs[name], defs);
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(alts) = prop.get(key).and_then(Value::as_array) {
            let consts: Vec<String> = alts
                .iter()
                .filter_map(|a| a.get("const").or_else(|| a.get("enum").and_then(|e| e.get(0))))
                .map(|c| c.as_str().map_or_else(|| c.to_string(), str::to_string))
                .collect();
            if consts.len() == alts.len() {
                return format!("one of: {}", consts.join(", "));
            }
            let kinds: Vec<String> = alts.iter().map(|a| type_of(a, defs)).collect();
            return kinds.join(" or ");
        }
    }
    if let Some(e) = prop.get("enum").and_then(Value::as_array) {
        let names: Vec<String> =
            e.iter().map(|c| c.as_str().map_or_else(|| c.to_string(), str::to_string)).collect();
        return format!("one of: {}", names.join(", "));
    }
    let ty = match prop.get("type") {
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" or "),
        _ if prop.get("properties").is_some() => "object".into(),
        _ => "any".into(),
    };
    let mut s = if ty == "array" {
        let items = prop.get("items").map_or_else(|| "any".into(), |i| type_of(i, defs));
        match (prop.get("minItems"), prop.get("maxItems")) {
            (Some(a), Some(b)) if a == b => format!("array of {items} ({a} items)"),
            _ => format!("array of {items}"),
        }
    } else {
        ty
    };
    let range = |k: &str| prop.get(k).filter(|v| v.is_number()).map(|v| v.to_string());
    match (range("minimum").or_else(|| range("exclusiveMinimum")), range("maximum")) {
        (Some(lo), Some(hi)) => s += &format!(" in [{lo}, {hi}]"),
        (Some(lo), None) if lo != "0" => s += &format!(" >= {lo}"),
        _ => {}
    }
    s
}
