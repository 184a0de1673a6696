//! Text renderings for the CLI: the stage graph.

use simclr_core::yaml::Node;
use simclr_core::Plan;

/// Short `key=value` lines of a stage's scalar fields, for graph labels.
fn params(fields: &Node) -> Vec<String> {
    let Node::Map(entries) = fields else { return Vec::new() };
    entries
        .iter()
        .filter_map(|(k, v)| {
            let text = match &v.value {
                Node::Bool(b) => b.to_string(),
                Node::Int(i) => i.to_string(),
                Node::Float(f) => f.to_string(),
                Node::Str(s) if s.len() <= 24 => s.clone(),
                Node::Str(s) => format!("{}...", &s[..s.char_indices().nth(21).map_or(s.len(), |(i, _)| i)]),
                Node::Seq(items) if items.len() <= 4 => {
                    let parts: Vec<String> = items
                        .iter()
                        .map(|i| match &i.value {
                            Node::Int(x) => x.to_string(),
                            Node::Float(x) => x.to_string(),
                            Node::Str(x) => x.clone(),
                            other => other.type_name().to_string(),
                        })
                        .collect();
                    format!("[{}]", parts.join(", "))
                }
                _ => return None,
            };
            Some(format!("{}={}", k.value, text))
        })
        .take(5)
        .collect()
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The plan as Graphviz dot or Mermaid text.
pub fn graph_text(plan: &Plan, mermaid: bool) -> String {
    let mut out = String::new();
    if mermaid {
        out.push_str("flowchart LR\n");
    } else {
        out.push_str(&format!(
            "digraph \"{}\" {{\n  rankdir=LR;\n  node [shape=box, fontname=\"Helvetica\"];\n",
            escape(&plan.spec.name)
        ));
    }
    for (i, s) in plan.stages.iter().enumerate() {
        let mut lines = vec![s.id.clone(), format!("{} ({:?})", s.kind, s.role).to_lowercase()];
        lines.extend(params(&s.fields.value));
        if mermaid {
            let label = lines.iter().map(|l| l.replace('"', "'")).collect::<Vec<_>>().join("<br/>");
            out.push_str(&format!("  s{i}[\"{label}\"]\n"));
        } else {
            let label = lines.iter().map(|l| escape(l)).collect::<Vec<_>>().join("\\n");
            out.push_str(&format!("  s{i} [label=\"{label}\"];\n"));
        }
    }
    for (i, s) in plan.stages.iter().enumerate() {
        for &j in &s.inputs {
            let port = plan.stages[j].output_port.to_string();
            if mermaid {
                out.push_str(&format!("  s{j} -->|{port}| s{i}\n"));
            } else {
                out.push_str(&format!("  s{j} -> s{i} [label=\"{port}\"];\n"));
            }
        }
        for (r, j) in &s.refs {
            if mermaid {
                out.push_str(&format!("  s{j} -.->|{}| s{i}\n", r.field));
            } else {
                out.push_str(&format!("  s{j} -> s{i} [style=dashed, label=\"{}\"];\n", escape(&r.field)));
            }
        }
    }
    if !mermaid {
        out.push_str("}\n");
    }
    out
}
