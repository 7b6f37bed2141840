//! How the CLI prints admin API answers: aligned tables by default, the
//! API's JSON with `--output json`.

use clap::ValueEnum;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// One column: its header and how to read it from a resource.
pub struct Column {
    pub header: &'static str,
    pub read: fn(&Value) -> String,
}

impl Column {
    pub fn new(header: &'static str, read: fn(&Value) -> String) -> Column {
        Column { header, read }
    }
}

pub fn json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

/// Prints `items` as a table with a header row, columns padded to the
/// widest cell.
pub fn table(items: &[Value], columns: &[Column]) {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|item| columns.iter().map(|c| clean((c.read)(item))).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([c.header.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(columns.iter().map(|c| c.header.to_string()).collect());
    for row in rows {
        line(row);
    }
}

/// Prints one resource as `field: value` lines, with `spec` flattened.
pub fn fields(value: &Value) {
    let mut pairs: Vec<(String, String)> = Vec::new();
    flatten("", value, &mut pairs);
    // The id first; the rest stay in their (alphabetical) order.
    pairs.sort_by_key(|(k, _)| k != "id");
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in pairs {
        println!(
            "{:<width$}  {}",
            format!("{k}:"),
            clean(v),
            width = width + 1
        );
    }
}

fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                // `spec.` adds nothing for a reader.
                let key = if prefix.is_empty() || prefix == "spec" {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => out.push((prefix.to_string(), text(other))),
    }
}

/// A JSON value as a cell: strings bare, null as `-`, lists comma-joined.
pub fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.is_empty() => "-".into(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(","),
        Value::Object(map) if map.is_empty() => "-".into(),
        other => other.to_string(),
    }
}

/// Keeps a table on one line per row whatever a description holds.
fn clean(cell: String) -> String {
    cell.replace(['\n', '\r', '\t'], " ")
}

/// `namespaceAccesses` as `ns=permission,...`.
pub fn namespace_accesses(access: &Value) -> String {
    match access["namespaceAccesses"].as_object() {
        Some(map) if !map.is_empty() => map
            .iter()
            .map(|(ns, a)| format!("{ns}={}", text(&a["permission"])))
            .collect::<Vec<_>>()
            .join(","),
        _ => "-".into(),
    }
}
