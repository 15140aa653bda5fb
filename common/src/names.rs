//! Validation of the names that cross the wire. Everything a producer names (nodes, clusters,
//! event types, producer and report ids) is checked here before it is stored, logged as a key,
//! or used in a path.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid {what} {value:?}: {why}")]
pub struct NameError {
    pub what: &'static str,
    pub value: String,
    pub why: &'static str,
}

fn err(what: &'static str, value: &str, why: &'static str) -> NameError {
    let mut value = value.to_owned();
    if value.len() > 80 {
        let mut cut = 80;
        while !value.is_char_boundary(cut) {
            cut -= 1;
        }
        value.truncate(cut);
        value.push('…');
    }
    NameError { what, value, why }
}

/// A Kubernetes node name: a DNS-1123 subdomain (lowercase alphanumerics, '-' and '.', at most
/// 253 characters, starting and ending alphanumeric).
pub fn node(value: &str) -> Result<(), NameError> {
    dns_subdomain("node name", value)
}

/// A cluster name: a DNS-1123 label (lowercase alphanumerics and '-', at most 63 characters).
pub fn cluster(value: &str) -> Result<(), NameError> {
    const WHAT: &str = "cluster name";
    if value.is_empty() {
        return Err(err(WHAT, value, "must not be empty"));
    }
    if value.len() > 63 {
        return Err(err(WHAT, value, "must be at most 63 characters"));
    }
    dns_label(WHAT, value)
}

/// A producer id or a durable consumer name: like a node name, at most 253 characters.
pub fn producer(value: &str) -> Result<(), NameError> {
    dns_subdomain("producer id", value)
}

/// A rollout's name: like a node name (`kubelet-1.31.2`, `containerd.2026-11`).
pub fn rollout(value: &str) -> Result<(), NameError> {
    dns_subdomain("rollout name", value)
}

/// A component's name (containerd, kubelet, node-exporter): a DNS-1123 label.
pub fn component(value: &str) -> Result<(), NameError> {
    const WHAT: &str = "component name";
    if value.is_empty() || value.len() > 63 {
        return Err(err(WHAT, value, "must be 1 to 63 characters"));
    }
    dns_label(WHAT, value)
}

/// An RPM package name: letters, digits and `. _ + -`, starting with a letter or digit, at most
/// 200 characters.
pub fn package(value: &str) -> Result<(), NameError> {
    const WHAT: &str = "package name";
    let ok = !value.is_empty()
        && value.len() <= 200
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-'));
    if ok { Ok(()) } else { Err(err(WHAT, value, "letters, digits and . _ + - only, starting with a letter or digit")) }
}

/// An exact RPM version `[epoch:]version-release`; version and release take letters, digits and
/// `. _ + ~ ^` (at most 128 characters each), the epoch digits.
pub fn evr(value: &str) -> Result<(), NameError> {
    const WHAT: &str = "version";
    let part = |s: &str| {
        !s.is_empty()
            && s.len() <= 128
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '~' | '^'))
    };
    let rest = match value.split_once(':') {
        Some((e, rest)) if !e.is_empty() && e.len() <= 10 && e.chars().all(|c| c.is_ascii_digit()) => rest,
        Some(_) => return Err(err(WHAT, value, "the epoch before ':' must be a number")),
        None => value,
    };
    match rest.rsplit_once('-') {
        Some((v, r)) if part(v) && part(r) => Ok(()),
        Some(_) => Err(err(WHAT, value, "version and release take letters, digits and . _ + ~ ^")),
        None => Err(err(WHAT, value, "expected epoch:version-release, e.g. 1:1.7.2-1.el9")),
    }
}

/// A durable consumer's name.
pub fn consumer(value: &str) -> Result<(), NameError> {
    dns_subdomain("consumer name", value)
}

/// An event or condition type, or a reason: CamelCase identifiers as Kubernetes uses them
/// (ASCII letters and digits, starting with a letter, at most 128 characters).
pub fn event_type(value: &str) -> Result<(), NameError> {
    identifier("event type", value)
}

/// A reason; may be empty.
pub fn reason(value: &str) -> Result<(), NameError> {
    if value.is_empty() {
        return Ok(());
    }
    identifier("reason", value)
}

/// A producer-chosen report id: printable ASCII without spaces, at most 256 characters.
pub fn report_id(value: &str) -> Result<(), NameError> {
    const WHAT: &str = "report id";
    if value.is_empty() {
        return Err(err(WHAT, value, "must not be empty"));
    }
    if value.len() > 256 {
        return Err(err(WHAT, value, "must be at most 256 characters"));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(err(WHAT, value, "must be printable ASCII without spaces"));
    }
    Ok(())
}

/// A boot id as the kernel gives it (a UUID); also accepts any 1–64 character hex-and-dash string.
pub fn boot_id(value: &str) -> Result<(), NameError> {
    const WHAT: &str = "boot id";
    if value.is_empty() || value.len() > 64 {
        return Err(err(WHAT, value, "must be 1 to 64 characters"));
    }
    if !value.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return Err(err(WHAT, value, "must be hexadecimal digits and '-'"));
    }
    Ok(())
}

fn identifier(what: &'static str, value: &str) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(err(what, value, "must not be empty"));
    }
    if value.len() > 128 {
        return Err(err(what, value, "must be at most 128 characters"));
    }
    let mut bytes = value.bytes();
    if !bytes.next().is_some_and(|b| b.is_ascii_alphabetic()) {
        return Err(err(what, value, "must start with a letter"));
    }
    if !bytes.all(|b| b.is_ascii_alphanumeric()) {
        return Err(err(what, value, "must be ASCII letters and digits only"));
    }
    Ok(())
}

fn dns_subdomain(what: &'static str, value: &str) -> Result<(), NameError> {
    if value.is_empty() {
        return Err(err(what, value, "must not be empty"));
    }
    if value.len() > 253 {
        return Err(err(what, value, "must be at most 253 characters"));
    }
    for label in value.split('.') {
        if label.is_empty() {
            return Err(err(what, value, "must not have empty parts between dots"));
        }
        dns_label(what, label).map_err(|e| NameError { value: value.to_owned(), ..e })?;
    }
    Ok(())
}

fn dns_label(what: &'static str, value: &str) -> Result<(), NameError> {
    if !value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return Err(err(what, value, "must be lowercase letters, digits, '-' and '.'"));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(err(what, value, "must start and end with a letter or digit"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_kubernetes_names() {
        for ok in ["node-1", "ip-10-0-0-1.ec2.internal", "a", "n0"] {
            node(ok).unwrap();
        }
        cluster("prod-eu-1").unwrap();
        event_type("KernelDeadlock").unwrap();
        boot_id("0b7c2b2e-7a3d-4bb8-9a52-9f0f1a1c2d3e").unwrap();
        report_id("detector-a/node-1/NodeUnreachable/17").unwrap();
    }

    #[test]
    fn rejects_bad_names_with_reason() {
        for bad in ["", "Node1", "-a", "a-", "a..b", "a b", "a/b", "ä"] {
            let e = node(bad).unwrap_err();
            assert_eq!(e.what, "node name");
        }
        assert!(node(&"a".repeat(254)).is_err());
        assert!(cluster("a.b").is_err());
        assert!(cluster(&"a".repeat(64)).is_err());
        assert!(event_type("1Bad").is_err());
        assert!(event_type("Bad Type").is_err());
        assert!(boot_id("../etc").is_err());
        assert!(report_id("has space").is_err());
        let e = node("Bad").unwrap_err();
        assert!(e.to_string().contains("invalid node name \"Bad\""), "{e}");
    }

    #[test]
    fn long_values_are_cut_in_errors() {
        let e = node(&format!("{}X", "a".repeat(300))).unwrap_err();
        assert!(e.value.chars().count() <= 81);
    }
}
