//! Structured logs through `tracing`: human-readable text by default, JSON lines with `--log-format
//! json` (for a log shipper), or native journald entries with `--log-format journald` (every field
//! a journal field under its own name in capitals, the level as PRIORITY:
//! `journalctl -u nodekeeper-remediator NODE=worker-17 -p warning`). The filter comes from `RUST_LOG`, default `info`.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
    Journald,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            "journald" => Ok(Self::Journald),
            other => Err(format!("unknown log format {other:?}: expected \"text\", \"json\" or \"journald\"")),
        }
    }
}

/// Installs the global subscriber. Text and JSON go to stderr; journald falls back to text on
/// stderr (with a warning) when the journal's socket is not there.
pub fn init(format: LogFormat) {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let mut journald_error = None;
    // A second init (tests running several services in one process) keeps the first subscriber.
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        // Fields without tracing-journald's "F_" prefix: `journalctl NODE=worker-17` finds them.
        LogFormat::Journald => match tracing_journald::layer() {
            Ok(layer) => tracing_subscriber::registry()
                .with(filter())
                .with(layer.with_field_prefix(None))
                .try_init()
                .map_err(Into::into),
            Err(err) => {
                journald_error = Some(err);
                builder.try_init()
            }
        },
    };
    if let Err(err) = result {
        tracing::debug!(error = %err, "logging already initialised");
    }
    if let Some(err) = journald_error {
        tracing::warn!(error = %err, "cannot log to journald; logging text to stderr");
    }
}
