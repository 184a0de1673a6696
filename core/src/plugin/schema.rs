//! The config schema of a plugin kind: the subset of JSON Schema plugins may use (`type`,
//! `properties`, `required`, ranges, enums, defaults), checked at load and used to validate
//! configs at FILE:LINE:COL without running the plugin.

use serde_json::Value;

use crate::yaml::PathSeg;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Type {
    Object,
    Number,
    Integer,
    String,
    Boolean,
    Array,
}

impl Type {
    pub(super) fn parse(s: &str) -> Option<Type> {
        Some(match s {
            "object" => Type::Object,
            "number" => Type::Number,
            "integer" => Type::Integer,
            "string" => Type::String,
            "boolean" => Type::Boolean,
            "array" => Type::Array,
            _ => return None,
        })
    }

    pub(super) fn expected(self) -> &'static str {
        match self {
            Type::Object => "a mapping",
            Type::Number => "a number",
            Type::Integer => "an integer",
            Type::String => "a string",
            Type::Boolean => "a boolean",
            Type::Array => "a list",
        }
    }
}

#[derive(Clone, Debug, Default)]
pub(super) struct Schema {
    pub(super) ty: Option<Type>,
    pub(super) properties: Vec<(String, Schema)>,
    pub(super) required: Vec<String>,
    pub(super) additional: bool,
    pub(super) minimum: Option<f64>,
    pub(super) maximum: Option<f64>,
    pub(super) exclusive_minimum: Option<f64>,
    pub(super) exclusive_maximum: Option<f64>,
    pub(super) enumeration: Option<Vec<Value>>,
    pub(super) items: Option<Box<Schema>>,
    pub(super) min_items: Option<usize>,
    pub(super) max_items: Option<usize>,
    pub(super) default: Option<Value>,
}

/// One way a config misses its schema.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Violation {
    pub(super) path: Vec<PathSeg>,
    pub(super) message: String,
    /// `None`: structural (the config does not have the right shape: a [`ConfigError`]);
    /// `Some(fix)`: a value out of range (a [`Problem`] with this fix).
    pub(super) range_fix: Option<String>,
}

pub(super) fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean `{b}`"),
        Value::Number(n) if n.is_f64() => format!("floating point `{n}`"),
        Value::Number(n) => format!("integer `{n}`"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "sequence".into(),
        Value::Object(_) => "map".into(),
    }
}

/// A JSON value as a YAML flow value (`[3, 9]`, not `[3,9]`), for fixes.
pub(super) fn yaml_like(v: &Value) -> String {
    match v {
        Value::Array(a) => format!("[{}]", a.iter().map(yaml_like).collect::<Vec<_>>().join(", ")),
        Value::Object(m) => {
            format!(
                "{{{}}}",
                m.iter().map(|(k, v)| format!("{k}: {}", yaml_like(v))).collect::<Vec<_>>().join(", ")
            )
        }
        other => other.to_string(),
    }
}

pub(super) fn field_name(path: &[PathSeg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            PathSeg::Key(k) if s.is_empty() => s.push_str(k),
            PathSeg::Key(k) => {
                s.push('.');
                s.push_str(k);
            }
            PathSeg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

pub(super) fn expected_list(names: &[&str]) -> String {
    match names {
        [] => "there are no fields".into(),
        [a] => format!("expected `{a}`"),
        [a, b] => format!("expected `{a}` or `{b}`"),
        _ => format!(
            "expected one of {}",
            names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
        ),
    }
}

pub(super) fn number(v: &Value, key: &str) -> Result<Option<f64>, String> {
    match v.get(key) {
        None => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(_) => Err(format!("`{key}` must be a number")),
    }
}

pub(super) fn count(v: &Value, key: &str) -> Result<Option<usize>, String> {
    match v.get(key) {
        None => Ok(None),
        Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64().map(|n| n as usize)),
        Some(_) => Err(format!("`{key}` must be a non-negative integer")),
    }
}

impl Schema {
    /// The top level: an object schema.
    pub(super) fn parse_top(v: &Value) -> Result<Schema, String> {
        let s = Schema::parse(v, "the schema")?;
        if s.ty != Some(Type::Object) {
            return Err("the top level must be {\"type\": \"object\", ...}".into());
        }
        Ok(s)
    }

    pub(super) fn parse(v: &Value, at: &str) -> Result<Schema, String> {
        const KEYWORDS: &[&str] = &[
            "type",
            "properties",
            "required",
            "additionalProperties",
            "minimum",
            "maximum",
            "exclusiveMinimum",
            "exclusiveMaximum",
            "enum",
            "items",
            "minItems",
            "maxItems",
            "default",
            "description",
            "title",
            "$schema",
        ];
        let Value::Object(m) = v else {
            return Err(format!("{at} must be a JSON object"));
        };
        if let Some(k) = m.keys().find(|k| !KEYWORDS.contains(&k.as_str())) {
            return Err(format!("{at} uses `{k}`, which this host does not support"));
        }
        let ty = match m.get("type") {
            None => None,
            Some(Value::String(t)) => {
                Some(Type::parse(t).ok_or_else(|| format!("{at} has an unsupported type \"{t}\""))?)
            }
            Some(_) => return Err(format!("{at}: `type` must be one type name (a string)")),
        };
        let mut s = Schema { ty, additional: true, ..Schema::default() };
        if let Some(p) = m.get("properties") {
            let Value::Object(props) = p else {
                return Err(format!("{at}: `properties` must be an object"));
            };
            for (name, sub) in props {
                if name == "views" {
                    return Err(format!(
                        "{at} declares `views`, which the host handles (the views a stage acts on)"
                    ));
                }
                s.properties.push((name.clone(), Schema::parse(sub, &format!("property `{name}`"))?));
            }
        }
        if let Some(r) = m.get("required") {
            let names = r.as_array().filter(|a| a.iter().all(Value::is_string));
            let Some(names) = names else {
                return Err(format!("{at}: `required` must be a list of names"));
            };
            s.required = names.iter().filter_map(|n| n.as_str().map(str::to_string)).collect();
            if let Some(n) = s.required.iter().find(|n| !s.properties.iter().any(|(p, _)| p == *n)) {
                return Err(format!("{at}: required field `{n}` is not among its properties"));
            }
        }
        match m.get("additionalProperties") {
            None => {}
            Some(Value::Bool(b)) => s.additional = *b,
            Some(_) => return Err(format!("{at}: `additionalProperties` must be true or false")),
        }
        s.minimum = number(v, "minimum").map_err(|e| format!("{at}: {e}"))?;
        s.maximum = number(v, "maximum").map_err(|e| format!("{at}: {e}"))?;
        s.exclusive_minimum = number(v, "exclusiveMinimum").map_err(|e| format!("{at}: {e}"))?;
        s.exclusive_maximum = number(v, "exclusiveMaximum").map_err(|e| format!("{at}: {e}"))?;
        s.min_items = count(v, "minItems").map_err(|e| format!("{at}: {e}"))?;
        s.max_items = count(v, "maxItems").map_err(|e| format!("{at}: {e}"))?;
        if let Some(e) = m.get("enum") {
            match e {
                Value::Array(a) if !a.is_empty() => s.enumeration = Some(a.clone()),
                _ => return Err(format!("{at}: `enum` must be a non-empty list")),
            }
        }
        if let Some(i) = m.get("items") {
            s.items = Some(Box::new(Schema::parse(i, &format!("{at}'s items"))?));
        }
        if let Some(d) = m.get("default") {
            let mut errs = Vec::new();
            s.validate(d, &mut Vec::new(), &mut errs);
            if let Some(e) = errs.first() {
                return Err(format!("{at}: its default {d} does not fit it: {}", e.message));
            }
            s.default = Some(d.clone());
        }
        Ok(s)
    }

    /// Appends every violation of `v` (at `path`) to `out`.
    pub(super) fn validate(&self, v: &Value, path: &mut Vec<PathSeg>, out: &mut Vec<Violation>) {
        let structural =
            |path: &[PathSeg], message: String| Violation { path: path.to_vec(), message, range_fix: None };
        if let Some(t) = self.ty {
            let fits = match t {
                Type::Object => v.is_object(),
                Type::Number => v.is_number(),
                Type::Integer => v.is_i64() || v.is_u64(),
                Type::String => v.is_string(),
                Type::Boolean => v.is_boolean(),
                Type::Array => v.is_array(),
            };
            if !fits {
                out.push(structural(
                    path,
                    format!("invalid type: {}, expected {}", describe(v), t.expected()),
                ));
                return;
            }
        }
        if let Some(options) = &self.enumeration {
            if !options.contains(v) {
                let names: Vec<String> = options
                    .iter()
                    .map(|o| o.as_str().map_or_else(|| o.to_string(), str::to_string))
                    .collect();
                let shown = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                out.push(structural(
                    path,
                    format!(
                        "unknown variant `{shown}`, {}",
                        expected_list(&names.iter().map(String::as_str).collect::<Vec<_>>())
                    ),
                ));
                return;
            }
        }
        match v {
            Value::Object(m) => {
                let known: Vec<&str> = self.properties.iter().map(|(k, _)| k.as_str()).collect();
                for (key, value) in m {
                    path.push(PathSeg::Key(key.clone()));
                    match self.properties.iter().find(|(k, _)| k == key) {
                        Some((_, sub)) => sub.validate(value, path, out),
                        None if !self.additional => {
                            // serde's wording, so the validator's "did you mean" works; the host
                            // also takes `views` at the top level.
                            let mut names = known.clone();
                            if path.len() == 1 {
                                names.push("views");
                            }
                            out.push(structural(
                                path,
                                format!("unknown field `{key}`, {}", expected_list(&names)),
                            ));
                        }
                        None => {}
                    }
                    path.pop();
                }
                for r in &self.required {
                    if !m.contains_key(r) {
                        out.push(structural(path, format!("missing field `{r}`")));
                    }
                }
            }
            Value::Array(items) => {
                let n = items.len();
                let example =
                    self.default.as_ref().map(|d| format!(", e.g. `{}: {}`", field_name(path), yaml_like(d)));
                let too_few = self.min_items.is_some_and(|m| n < m);
                let too_many = self.max_items.is_some_and(|m| n > m);
                if too_few || too_many {
                    let want = match (self.min_items, self.max_items) {
                        (Some(a), Some(b)) if a == b => format!("{a}"),
                        (Some(a), Some(b)) => format!("{a} to {b}"),
                        (Some(a), None) => format!("at least {a}"),
                        (None, Some(b)) => format!("at most {b}"),
                        (None, None) => String::new(),
                    };
                    out.push(Violation {
                        path: path.clone(),
                        message: format!("`{}` has {n} items, expected {want}", field_name(path)),
                        range_fix: Some(format!("write {want} items{}", example.unwrap_or_default())),
                    });
                }
                if let Some(sub) = &self.items {
                    for (i, item) in items.iter().enumerate() {
                        path.push(PathSeg::Index(i));
                        sub.validate(item, path, out);
                        path.pop();
                    }
                }
            }
            Value::Number(n) => {
                let x = n.as_f64().unwrap_or(f64::NAN);
                let bad = self.minimum.is_some_and(|m| x < m)
                    || self.maximum.is_some_and(|m| x > m)
                    || self.exclusive_minimum.is_some_and(|m| x <= m)
                    || self.exclusive_maximum.is_some_and(|m| x >= m);
                if bad {
                    let lo = self
                        .minimum
                        .map(|m| format!("at least {m}"))
                        .or(self.exclusive_minimum.map(|m| format!("above {m}")));
                    let hi = self
                        .maximum
                        .map(|m| format!("at most {m}"))
                        .or(self.exclusive_maximum.map(|m| format!("below {m}")));
                    let want = match (self.minimum, self.maximum) {
                        (Some(lo), Some(hi)) => format!("from {lo} to {hi}"),
                        _ => [lo, hi].into_iter().flatten().collect::<Vec<_>>().join(" and "),
                    };
                    out.push(Violation {
                        path: path.clone(),
                        message: format!("`{}` = {n} is out of range", field_name(path)),
                        range_fix: Some(format!("use a value {want}")),
                    });
                }
            }
            _ => {}
        }
    }
}
