//! The contract's limits on one observation and the one check of them, shared by the agent (at
//! `Emit`, and when its monitors make observations) and the event center (at ingest). Because both
//! run the same function with the same limits, nothing an agent acknowledges to its caller can be
//! refused by the center later, and one bad observation can never hold up the ones behind it.

use std::collections::HashMap;

use nodekeeper_proto::v1::{ConditionStatus, Observation};

use crate::names;

/// Largest message (of an observation or its condition) and attribute value, in bytes.
pub const MAX_TEXT_BYTES: usize = 8 << 10;
/// Most attributes on one observation.
pub const MAX_ATTRIBUTES: usize = 32;
/// Longest attribute key, in bytes.
pub const MAX_KEY_BYTES: usize = 128;
/// Longest source (the monitor or probe that made the observation), in bytes.
pub const MAX_SOURCE_BYTES: usize = 128;
/// Highest sequence number a store holds (a signed 64-bit integer in SQLite and PostgreSQL).
pub const MAX_SEQUENCE: u64 = i64::MAX as u64;
/// The attribute `fit` sets when it shortened anything; its value lists what.
pub const TRUNCATED_ATTRIBUTE: &str = "truncated";

/// Checks one observation against the contract: valid type and reason names, text within the
/// limits, a condition (if any) of the observation's own type with a defined status. The error
/// says what is wrong, without the observation's name (callers add it).
pub fn validate(o: &Observation) -> Result<(), String> {
    names::event_type(&o.r#type).map_err(|e| e.to_string())?;
    names::reason(&o.reason).map_err(|e| e.to_string())?;
    text("message", &o.message)?;
    attributes(&o.attributes)?;
    if o.source.len() > MAX_SOURCE_BYTES {
        return Err(format!("source is {} bytes, at most {MAX_SOURCE_BYTES} allowed", o.source.len()));
    }
    if let Some(c) = &o.condition {
        names::event_type(&c.r#type).map_err(|e| format!("condition: {e}"))?;
        names::reason(&c.reason).map_err(|e| format!("condition: {e}"))?;
        text("condition message", &c.message)?;
        match ConditionStatus::try_from(c.status) {
            Ok(ConditionStatus::True | ConditionStatus::False | ConditionStatus::Unknown) => {}
            _ => return Err(format!("condition {} has no valid status", c.r#type)),
        }
        if c.r#type != o.r#type {
            return Err(format!("condition type {} differs from the observation type {}", c.r#type, o.r#type));
        }
    }
    Ok(())
}

fn text(what: &str, s: &str) -> Result<(), String> {
    if s.len() > MAX_TEXT_BYTES {
        return Err(format!("{what} is {} bytes, at most {MAX_TEXT_BYTES} allowed", s.len()));
    }
    Ok(())
}

/// At most `MAX_ATTRIBUTES`, each with a key of 1 to `MAX_KEY_BYTES` bytes and a value within
/// `MAX_TEXT_BYTES`.
pub fn attributes(a: &HashMap<String, String>) -> Result<(), String> {
    if a.len() > MAX_ATTRIBUTES {
        return Err(format!("{} attributes, at most {MAX_ATTRIBUTES} allowed", a.len()));
    }
    match a.iter().find(|(k, v)| k.is_empty() || k.len() > MAX_KEY_BYTES || v.len() > MAX_TEXT_BYTES) {
        Some((k, _)) => {
            Err(format!("attribute {:?} has an empty or oversize key or value", k.chars().take(40).collect::<String>()))
        }
        None => Ok(()),
    }
}

/// Shortens what a monitor made to the limits, so that it passes `validate` as long as its names
/// are valid: long texts are cut at a character boundary and end with "…", attributes beyond the
/// limit (by key order) and attributes with unusable keys are dropped. When anything was cut, the
/// attribute `truncated` lists what ("message", "attributes", ...). Returns whether it cut.
pub fn fit(o: &mut Observation) -> bool {
    let mut cut: Vec<&str> = Vec::new();
    if shorten(&mut o.message, MAX_TEXT_BYTES) {
        cut.push("message");
    }
    if shorten(&mut o.source, MAX_SOURCE_BYTES) {
        cut.push("source");
    }
    if let Some(c) = &mut o.condition
        && shorten(&mut c.message, MAX_TEXT_BYTES)
    {
        cut.push("condition_message");
    }
    let before = o.attributes.len();
    o.attributes.retain(|k, _| !k.is_empty() && k.len() <= MAX_KEY_BYTES);
    let keys_dropped = o.attributes.len() < before;
    let mut values_cut = false;
    for v in o.attributes.values_mut() {
        values_cut |= shorten(v, MAX_TEXT_BYTES);
    }
    if values_cut {
        cut.push("attribute_values");
    }
    // Room for the marker itself whenever anything is cut, dropped attributes included.
    let marked = !cut.is_empty() || keys_dropped || o.attributes.len() > MAX_ATTRIBUTES;
    let room = if marked { MAX_ATTRIBUTES - 1 } else { MAX_ATTRIBUTES };
    if o.attributes.len() > room {
        let mut keys: Vec<String> = o.attributes.keys().cloned().collect();
        keys.sort();
        for k in &keys[room..] {
            o.attributes.remove(k);
        }
    }
    if o.attributes.len() < before {
        cut.push("attributes");
    }
    if cut.is_empty() {
        return false;
    }
    o.attributes.insert(TRUNCATED_ATTRIBUTE.to_owned(), cut.join(","));
    true
}

/// Cuts `s` to at most `max` bytes at a character boundary, ending with "…". Returns whether it cut.
fn shorten(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    const ELLIPSIS: &str = "…";
    let mut end = max - ELLIPSIS.len();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push_str(ELLIPSIS);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodekeeper_proto::v1::Condition;
    use proptest::prelude::*;

    fn valid() -> Observation {
        Observation { r#type: "Test".into(), reason: "Because".into(), message: "m".into(), ..Default::default() }
    }

    #[test]
    fn each_limit_is_refused_with_its_reason() {
        let mut o = valid();
        o.message = "x".repeat(MAX_TEXT_BYTES + 1);
        assert!(validate(&o).unwrap_err().contains("message is 8193 bytes"));
        let mut o = valid();
        o.attributes = (0..=MAX_ATTRIBUTES).map(|i| (format!("k{i}"), "v".into())).collect();
        assert!(validate(&o).unwrap_err().contains("33 attributes"));
        let mut o = valid();
        o.source = "s".repeat(MAX_SOURCE_BYTES + 1);
        assert!(validate(&o).unwrap_err().contains("source"));
        let mut o = valid();
        o.condition =
            Some(Condition { r#type: "Other".into(), status: ConditionStatus::True as i32, ..Default::default() });
        assert!(validate(&o).unwrap_err().contains("differs"));
        assert_eq!(validate(&valid()), Ok(()));
    }

    #[test]
    fn fit_marks_what_it_cut_and_leaves_valid_observations_alone() {
        let mut o = valid();
        assert!(!fit(&mut o));
        assert_eq!(o, valid());
        o.message = "é".repeat(MAX_TEXT_BYTES);
        o.attributes = (0..40).map(|i| (format!("k{i:02}"), "v".into())).collect();
        assert!(fit(&mut o));
        assert_eq!(validate(&o), Ok(()));
        assert!(o.message.ends_with('…') && o.message.len() <= MAX_TEXT_BYTES);
        assert_eq!(o.attributes[TRUNCATED_ATTRIBUTE], "message,attributes");
        assert_eq!(o.attributes.len(), MAX_ATTRIBUTES);
        assert!(o.attributes.contains_key("k00") && !o.attributes.contains_key("k39"), "kept by key order");
        // Exactly the limit once an unusable key is gone: the marker must still fit (found by the
        // property below).
        let mut o = valid();
        o.attributes = (0..MAX_ATTRIBUTES).map(|i| (format!("k{i:02}"), "v".into())).collect();
        o.attributes.insert("x".repeat(MAX_KEY_BYTES + 1), "v".into());
        assert!(fit(&mut o));
        assert_eq!(validate(&o), Ok(()));
        assert_eq!(o.attributes[TRUNCATED_ATTRIBUTE], "attributes");
    }

    proptest! {
        /// Whatever a monitor makes of valid names, `fit` makes it pass `validate`.
        #[test]
        fn fit_always_yields_a_valid_observation(
            message in ".{0,300}",
            repeat in 1usize..200,
            source_len in 0usize..400,
            attrs in proptest::collection::hash_map("[a-z_]{0,200}", ".{0,40}", 0..60),
            value_repeat in 1usize..400,
        ) {
            let mut o = valid();
            o.message = message.repeat(repeat);
            o.source = "s".repeat(source_len);
            o.attributes = attrs.into_iter().map(|(k, v)| (k, v.repeat(value_repeat))).collect();
            o.condition = Some(Condition {
                r#type: "Test".into(),
                status: ConditionStatus::True as i32,
                reason: "R".into(),
                message: o.message.clone(),
                ..Default::default()
            });
            let cut = fit(&mut o);
            prop_assert_eq!(validate(&o), Ok(()));
            prop_assert_eq!(cut, o.attributes.contains_key(TRUNCATED_ATTRIBUTE));
        }
    }
}
