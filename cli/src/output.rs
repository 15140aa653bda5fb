//! Writing results: tables for people, canonical protobuf JSON for programs.

use std::io::Write;

use nodekeeper_proto::json::to_json;
use prost::Message;

/// Writes a line to stdout; a closed pipe (`| head`) ends the program quietly.
pub fn println(line: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{line}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        other => other,
    }
}

pub fn eprintln(line: &str) -> std::io::Result<()> {
    writeln!(std::io::stderr().lock(), "{line}")
}

/// One message as one line of canonical JSON.
pub fn json_line<M: Message>(full_name: &str, msg: &M) -> anyhow::Result<()> {
    let v = to_json(full_name, msg)?;
    println(&serde_json::to_string(&v)?)?;
    Ok(())
}

/// "Key   value" lines of one object, keys padded to `width`, then an empty line; rows whose key
/// is in `optional` are left out when their value is empty.
pub fn fields(rows: &[(&str, String)], width: usize, optional: &[&str]) -> std::io::Result<()> {
    for (k, v) in rows.iter().filter(|(k, v)| !(v.is_empty() && optional.contains(k))) {
        println(&format!("{k:<width$} {v}"))?;
    }
    println("")
}

/// A table with a header row, columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_owned()
    };
    println(&line(header.to_vec()))?;
    for row in rows {
        println(&line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

pub fn time(ts: Option<&prost_types::Timestamp>) -> String {
    match ts {
        Some(t) if t.seconds > 0 => {
            let t = std::time::UNIX_EPOCH + std::time::Duration::new(t.seconds as u64, t.nanos.max(0) as u32);
            humantime::format_rfc3339_seconds(t).to_string()
        }
        _ => "-".into(),
    }
}

/// An enum value's name without its type prefix, lowercased: `SEVERITY_ERROR` → `error`.
pub fn enum_name(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_ascii_lowercase()
}
