//! A YAML document as a tree whose every node remembers its line and column.
//!
//! serde_yaml is archived, and serde-level YAML crates lose positions once a value is inside a
//! stage's free-form config. Building our own small tree on the event parser of `saphyr-parser`
//! keeps a position on every key and value, so any error (unknown field, wrong type, bad
//! range, dangling input) can point at `FILE:LINE:COL`. Resource use is bounded: nesting depth
//! and node count are capped, and aliases are refused (no billion-laughs expansion).

use std::fmt;

use saphyr_parser::{Event, Parser, ScalarStyle};

/// Deepest nesting accepted; pipeline files need a handful of levels.
pub const MAX_DEPTH: usize = 64;
/// Most nodes accepted in one document.
pub const MAX_NODES: usize = 1_000_000;

/// A 1-based line and column.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// A value with where it was written.
#[derive(Clone, Debug, PartialEq)]
pub struct Spanned<T> {
    pub value: T,
    pub pos: Pos,
}

impl<T> Spanned<T> {
    pub fn new(value: T, pos: Pos) -> Self {
        Self { value, pos }
    }
}

/// A YAML value, typed by the YAML 1.2 core schema.
#[derive(Clone, Debug, PartialEq)]
pub enum Node {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Spanned<Node>>),
    Map(Vec<(Spanned<String>, Spanned<Node>)>),
}

impl Node {
    /// What a user would call this value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Node::Null => "null",
            Node::Bool(_) => "a boolean",
            Node::Int(_) => "an integer",
            Node::Float(_) => "a number",
            Node::Str(_) => "a string",
            Node::Seq(_) => "a list",
            Node::Map(_) => "a mapping",
        }
    }

    /// Looks a key up in a mapping.
    pub fn get(&self, key: &str) -> Option<&Spanned<Node>> {
        match self {
            Node::Map(entries) => entries.iter().find(|(k, _)| k.value == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The JSON value serde deserializes a stage config from.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            Node::Null => Value::Null,
            Node::Bool(b) => Value::Bool(*b),
            Node::Int(i) => Value::from(*i),
            Node::Float(f) => serde_json::Number::from_f64(*f)
                .map(Value::Number)
                // JSON has no inf/nan: keep them as strings so serde reports a type error
                // pointing at the field instead of silently accepting a null.
                .unwrap_or_else(|| Value::String(f.to_string())),
            Node::Str(s) => Value::String(s.clone()),
            Node::Seq(items) => Value::Array(items.iter().map(|n| n.value.to_json()).collect()),
            Node::Map(entries) => {
                Value::Object(entries.iter().map(|(k, v)| (k.value.clone(), v.value.to_json())).collect())
            }
        }
    }

    /// Follows a serde path (`a.b[2].c`-like segments) to the node it names.
    pub fn find<'a>(node: &'a Spanned<Node>, path: &[PathSeg]) -> Option<&'a Spanned<Node>> {
        let mut cur = node;
        for seg in path {
            cur = match (seg, &cur.value) {
                (PathSeg::Key(k), Node::Map(entries)) => &entries.iter().find(|(ek, _)| &ek.value == k)?.1,
                (PathSeg::Index(i), Node::Seq(items)) => items.get(*i)?,
                _ => return None,
            };
        }
        Some(cur)
    }

    /// Position of a key (rather than its value) in a mapping.
    pub fn key_pos(&self, key: &str) -> Option<Pos> {
        match self {
            Node::Map(entries) => entries.iter().find(|(k, _)| k.value == key).map(|(k, _)| k.pos),
            _ => None,
        }
    }
}

/// One step of a path into a document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathSeg {
    Key(String),
    Index(usize),
}

/// A document that is not well-formed YAML, or exceeds the resource bounds.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{pos}: {message}")]
pub struct YamlError {
    pub pos: Pos,
    pub message: String,
}

fn pos_of(marker: &saphyr_parser::Marker) -> Pos {
    Pos {
        line: u32::try_from(marker.line()).unwrap_or(u32::MAX),
        col: u32::try_from(marker.col() + 1).unwrap_or(u32::MAX),
    }
}

/// Resolves a plain scalar by the YAML 1.2 core schema.
fn plain_scalar(s: &str) -> Node {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Node::Null,
        "true" | "True" | "TRUE" => return Node::Bool(true),
        "false" | "False" | "FALSE" => return Node::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => return Node::Float(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => return Node::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Node::Float(f64::NAN),
        _ => {}
    }
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(i) = s.parse::<i64>() {
            return Node::Int(i);
        }
    }
    if let Some(hex) = s.strip_prefix("0x") {
        if let Ok(i) = i64::from_str_radix(hex, 16) {
            return Node::Int(i);
        }
    }
    if let Some(oct) = s.strip_prefix("0o") {
        if let Ok(i) = i64::from_str_radix(oct, 8) {
            return Node::Int(i);
        }
    }
    let looks_numeric = digits.bytes().next().is_some_and(|b| b.is_ascii_digit() || b == b'.')
        && digits.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'));
    if looks_numeric {
        if let Ok(f) = s.parse::<f64>() {
            return Node::Float(f);
        }
    }
    Node::Str(s.to_string())
}

enum Frame {
    Seq(Pos, Vec<Spanned<Node>>),
    Map(Pos, Vec<(Spanned<String>, Spanned<Node>)>, Option<Spanned<String>>),
}

/// Parses one YAML document into a positioned tree. An empty document is `Null`.
pub fn parse(src: &str) -> Result<Spanned<Node>, YamlError> {
    let mut stack: Vec<Frame> = Vec::new();
    let mut root: Option<Spanned<Node>> = None;
    let mut nodes = 0usize;
    let mut documents = 0usize;
    for event in Parser::new_from_str(src) {
        let (event, span) =
            event.map_err(|e| YamlError { pos: pos_of(e.marker()), message: e.info().to_string() })?;
        let pos = pos_of(&span.start);
        let done: Option<Spanned<Node>> = match event {
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd | Event::Nothing => None,
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    return Err(YamlError {
                        pos,
                        message:
                            "more than one YAML document; a pipeline file holds one (remove the extra `---`)"
                                .into(),
                    });
                }
                None
            }
            Event::Alias(_) => {
                return Err(YamlError {
                    pos,
                    message: "YAML aliases (*name) are not supported; write the value out".into(),
                })
            }
            Event::Scalar(text, style, _, tag) => {
                let node = if tag.as_ref().is_some_and(|t| t.handle == "!!" && t.suffix == "str")
                    || !matches!(style, ScalarStyle::Plain)
                {
                    Node::Str(text.into_owned())
                } else {
                    plain_scalar(&text)
                };
                Some(Spanned::new(node, pos))
            }
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(YamlError {
                        pos,
                        message: format!("nesting deeper than {MAX_DEPTH} levels"),
                    });
                }
                stack.push(if matches!(event, Event::SequenceStart(..)) {
                    Frame::Seq(pos, Vec::new())
                } else {
                    Frame::Map(pos, Vec::new(), None)
                });
                None
            }
            Event::SequenceEnd => match stack.pop() {
                Some(Frame::Seq(p, items)) => Some(Spanned::new(Node::Seq(items), p)),
                _ => return Err(YamlError { pos, message: "unbalanced sequence".into() }),
            },
            Event::MappingEnd => match stack.pop() {
                Some(Frame::Map(p, entries, None)) => Some(Spanned::new(Node::Map(entries), p)),
                _ => return Err(YamlError { pos, message: "unbalanced mapping".into() }),
            },
        };
        let Some(node) = done else { continue };
        nodes += 1;
        if nodes > MAX_NODES {
            return Err(YamlError { pos, message: format!("more than {MAX_NODES} values") });
        }
        match stack.last_mut() {
            None => root = Some(node),
            Some(Frame::Seq(_, items)) => items.push(node),
            Some(Frame::Map(_, entries, pending)) => match pending.take() {
                None => {
                    let key = match node.value {
                        Node::Str(s) => s,
                        Node::Int(i) => i.to_string(),
                        Node::Bool(b) => b.to_string(),
                        Node::Null => "null".to_string(),
                        Node::Float(f) => f.to_string(),
                        other => {
                            return Err(YamlError {
                                pos: node.pos,
                                message: format!(
                                    "a mapping key must be a plain value, not {}",
                                    other.type_name()
                                ),
                            })
                        }
                    };
                    if let Some((prev, _)) = entries.iter().find(|(k, _)| k.value == key) {
                        return Err(YamlError {
                            pos: node.pos,
                            message: format!(
                                "duplicate key `{key}` (first written at {}); keep one",
                                prev.pos
                            ),
                        });
                    }
                    *pending = Some(Spanned::new(key, node.pos));
                }
                Some(key) => entries.push((key, node)),
            },
        }
    }
    Ok(root.unwrap_or(Spanned::new(Node::Null, Pos { line: 1, col: 1 })))
}

/// Parses a command-line value (`--set a.b=VALUE`) as a YAML flow value.
pub fn parse_value(src: &str) -> Result<Node, YamlError> {
    Ok(parse(src)?.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_follow_the_core_schema() {
        let doc = parse("a: 1\nb: 1.5\nc: true\nd: ~\ne: '1'\nf: hello\ng: -3\nh: 1e3\n").unwrap();
        let get = |k: &str| doc.value.get(k).unwrap().value.clone();
        assert_eq!(get("a"), Node::Int(1));
        assert_eq!(get("b"), Node::Float(1.5));
        assert_eq!(get("c"), Node::Bool(true));
        assert_eq!(get("d"), Node::Null);
        assert_eq!(get("e"), Node::Str("1".into()));
        assert_eq!(get("f"), Node::Str("hello".into()));
        assert_eq!(get("g"), Node::Int(-3));
        assert_eq!(get("h"), Node::Float(1000.0));
    }

    #[test]
    fn positions_are_one_based() {
        let doc = parse("name: x\nstages:\n  - id: a\n    kind: counter\n").unwrap();
        let stages = doc.value.get("stages").unwrap();
        let Node::Seq(items) = &stages.value else { panic!("not a seq") };
        assert_eq!(items[0].value.key_pos("kind"), Some(Pos { line: 4, col: 5 }));
        assert_eq!(doc.value.key_pos("stages"), Some(Pos { line: 2, col: 1 }));
    }

    #[test]
    fn duplicate_keys_and_aliases_are_refused() {
        let e = parse("a: 1\na: 2\n").unwrap_err();
        assert_eq!(e.pos.line, 2);
        assert!(e.message.contains("duplicate key"));
        assert!(parse("a: &x 1\nb: *x\n").unwrap_err().message.contains("alias"));
    }

    #[test]
    fn depth_is_bounded() {
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert!(parse(&deep).unwrap_err().message.contains("nesting"));
    }
}
