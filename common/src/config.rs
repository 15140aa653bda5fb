//! Typed TOML configuration. Every service's config struct denies unknown keys; a malformed file
//! yields an error that names the file, the line, the key and what was expected, before anything
//! binds a port.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use thiserror::Error;

/// Exit code for a configuration error (sysexits' EX_CONFIG); systemd units list it in
/// `RestartPreventExitStatus` so that a broken config is not restarted in a loop.
pub const EXIT_CONFIG: i32 = 78;
/// Exit code for a runtime failure.
pub const EXIT_FAILURE: i32 = 1;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}, line {line}, key `{key}`: {message}")]
    Invalid { path: PathBuf, line: usize, key: String, message: String },
    #[error("invalid config file {path}: {message}")]
    Value { path: PathBuf, message: String },
}

/// Parses `text` (read from `path`) into `T`.
pub fn parse<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let (line, key) = match e.span() {
            Some(span) => locate(text, span.start),
            None => (0, String::new()),
        };
        ConfigError::Invalid { path: path.to_owned(), line, key, message: e.message().trim().to_owned() }
    })
}

/// Reads and parses the config file at `path`.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    parse(path, &text)
}

/// The 1-based line of byte `offset` and the dotted key defined on that line (with the table
/// header above it), e.g. `store.commit_delay`.
fn locate(text: &str, offset: usize) -> (usize, String) {
    let before = &text[..offset.min(text.len())];
    let line_no = before.matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    let table = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_owned());
    let key = line.split_once('=').map(|(k, _)| k.trim().to_owned()).unwrap_or_else(|| line.trim().to_owned());
    let key = if line.trim_start().starts_with('[') {
        line.trim().trim_matches(|c| c == '[' || c == ']').trim().to_owned()
    } else {
        match table {
            Some(t) if !t.is_empty() => format!("{t}.{key}"),
            _ => key,
        }
    };
    (line_no, key)
}

/// Serde adapter for durations written as humantime strings ("10s", "2m", "500ms").
pub mod duration {
    use super::*;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!("expected a duration like \"10s\" or \"5m\", got {s:?}: {e}"))
        })
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    /// The same for an optional duration (`#[serde(default, with = "duration::option")]`).
    pub mod option {
        use super::*;

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            super::deserialize(d).map(Some)
        }

        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        #[allow(dead_code)]
        name: String,
        #[serde(default)]
        #[allow(dead_code)]
        store: Store,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Store {
        #[serde(default, with = "duration")]
        #[allow(dead_code)]
        delay: Duration,
    }

    #[test]
    fn unknown_key_is_named_with_file_and_line() {
        let e = parse::<Cfg>(Path::new("/etc/x.toml"), "name = \"a\"\n[store]\nbogus = 1\n").unwrap_err();
        let s = e.to_string();
        assert!(s.contains("/etc/x.toml"), "{s}");
        assert!(s.contains("line 3"), "{s}");
        assert!(s.contains("`store.bogus`"), "{s}");
        assert!(s.contains("unknown field"), "{s}");
    }

    #[test]
    fn wrong_type_names_key_and_expectation() {
        let e = parse::<Cfg>(Path::new("c.toml"), "name = 5\n").unwrap_err().to_string();
        assert!(e.contains("key `name`") && e.contains("expected a string"), "{e}");
        let e = parse::<Cfg>(Path::new("c.toml"), "name = \"a\"\n[store]\ndelay = \"soon\"\n").unwrap_err().to_string();
        assert!(e.contains("`store.delay`") && e.contains("expected a duration"), "{e}");
    }

    #[test]
    fn missing_file_is_named() {
        let e = load::<Cfg>(Path::new("/nonexistent/nk.toml")).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/nk.toml"), "{e}");
    }
}
