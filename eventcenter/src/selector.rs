//! Label selectors, "k=v,k2=v2": equality on every pair, as components and readiness gates use
//! them.

use std::collections::HashMap;

/// "k=v,k2=v2" → pairs; every key and value non-empty.
pub fn parse(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() && !v.trim().is_empty() => {
                out.push((k.trim().to_owned(), v.trim().to_owned()))
            }
            _ => return Err(format!("invalid selector {s:?}: expected key=value pairs separated by commas")),
        }
    }
    if out.is_empty() {
        return Err("empty selector".into());
    }
    Ok(out)
}

/// The labels hold every pair of a valid selector.
pub fn matches(selector: &str, labels: &HashMap<String, String>) -> bool {
    parse(selector).is_ok_and(|pairs| pairs.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// The desired-components target of a valid selector: "selector:" and its pairs in the order
/// given, trimmed (one selector, one row, however it was spaced).
pub fn target(s: &str) -> Result<String, String> {
    let canonical: Vec<String> = parse(s)?.iter().map(|(k, v)| format!("{k}={v}")).collect();
    Ok(format!("selector:{}", canonical.join(",")))
}
