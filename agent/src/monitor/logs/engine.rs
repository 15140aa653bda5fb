//! From a line to findings: node-problem-detector's translation of plain lines, a spec's rules
//! applied to messages, and the replay behind `rules test`.

use std::time::SystemTime;

use nodekeeper_proto::v1::ConditionStatus;
use regex::bytes::Regex;

use super::records::{parse_journal, parse_kmsg};
use crate::monitor::matcher::{self, Match, Matcher};
use crate::monitor::rules::{Input, LogMonitorSpec};
use crate::monitor::{Finding, Problem};

/// How a plain line becomes a message: node-problem-detector's filelog translation.
pub struct Translator {
    skip: Vec<String>,
    timestamp: Option<(Regex, String)>,
    message: Option<Regex>,
}

impl Translator {
    pub fn new(spec: &LogMonitorSpec) -> Translator {
        let (timestamp, message) = match &spec.input {
            Input::File { timestamp, timestamp_format, message, .. } => (
                timestamp
                    .as_ref()
                    .zip(timestamp_format.as_ref())
                    .and_then(|(r, f)| matcher::compile(r).ok().map(|r| (r, f.clone()))),
                message.as_ref().and_then(|m| matcher::compile(m).ok()),
            ),
            _ => (None, None),
        };
        Translator { skip: spec.skip.clone(), timestamp, message }
    }

    /// The line's message and time, or None if it is skipped or does not have the configured
    /// shape (node-problem-detector drops those too). The message is the message regex's last
    /// capture group, or its whole match.
    pub fn translate<'a>(&self, line: &'a str) -> Option<(&'a str, Option<SystemTime>)> {
        if self.skip.iter().any(|s| line.contains(s.as_str())) {
            return None;
        }
        let time = match &self.timestamp {
            Some((re, layout)) => {
                let caps = re.captures(line.as_bytes())?;
                let text = line.get(caps.iter().flatten().last()?.range())?;
                Some(crate::monitor::gotime::parse_layout(layout, text)?)
            }
            None => None,
        };
        let message = match &self.message {
            Some(re) => {
                let caps = re.captures(line.as_bytes())?;
                // A match that ends inside a multi-byte character: no message of this shape.
                caps.iter().flatten().last().map_or(Some(""), |m| line.get(m.range()))?
            }
            None => line,
        };
        Some((message, time))
    }
}

/// A spec's rules applied to messages.
pub struct RuleEngine {
    pub spec: LogMonitorSpec,
    matcher: Matcher,
    matches: Vec<Match>,
}

impl RuleEngine {
    pub fn new(spec: LogMonitorSpec) -> RuleEngine {
        let patterns: Vec<&str> = spec.rules.iter().map(|r| r.pattern.as_str()).collect();
        let matcher = Matcher::new(&patterns, spec.buffer_size).expect("patterns were validated when loaded");
        RuleEngine { spec, matcher, matches: Vec::new() }
    }

    /// Puts a message into the buffer without matching (already processed before a restart).
    pub fn prime(&mut self, message: &str) {
        self.matcher.push(message);
    }

    /// Matches a message; appends what it finds.
    pub fn feed(&mut self, message: &str, time: Option<SystemTime>, out: &mut Vec<Finding>) {
        self.matches.clear();
        self.matcher.feed(message, &mut self.matches);
        for m in self.matches.drain(..) {
            let rule = &self.spec.rules[m.rule];
            let mut f = match &rule.condition {
                Some(c) => {
                    let status = if rule.clears { ConditionStatus::False } else { ConditionStatus::True };
                    Finding::condition(&self.spec.source, c, status, &rule.reason, m.message, rule.class)
                }
                None => Finding::temporary(&self.spec.source, &rule.reason, m.message, rule.class),
            };
            if let Some(t) = time {
                f.time = t;
            }
            out.push(f);
        }
    }
}

/// Input formats of `rules test`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Kmsg,
    JournalJson,
    Plain,
}

impl Format {
    /// Guesses a log's format from its first non-empty line.
    pub fn detect(text: &str) -> Format {
        let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        if first.starts_with('{') {
            Format::JournalJson
        } else if parse_kmsg(first).is_some() {
            Format::Kmsg
        } else {
            Format::Plain
        }
    }
}

/// What `rules test` prints: a finding and the 1-based number of the newest line of its match.
pub struct Replayed {
    pub line: usize,
    pub finding: Finding,
}

/// Replays a log through the monitors as the agent would, from a fresh state: temporary problems
/// for every match, conditions only when they change.
pub fn replay(specs: &[LogMonitorSpec], text: &str, format: Format) -> Vec<Replayed> {
    let mut engines: Vec<(RuleEngine, Translator)> =
        specs.iter().map(|s| (RuleEngine::new(s.clone()), Translator::new(s))).collect();
    let mut status: std::collections::HashMap<String, ConditionStatus> = Default::default();
    let mut out = Vec::new();
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let message = match format {
            Format::Kmsg => match parse_kmsg(line) {
                Some(r) => r.message,
                None => continue,
            },
            Format::JournalJson => match parse_journal(line) {
                Some(r) => r.message,
                None => continue,
            },
            Format::Plain => line.to_owned(),
        };
        for (engine, translator) in &mut engines {
            let (msg, time) = match format {
                Format::Plain => match translator.translate(&message) {
                    Some(x) => x,
                    None => continue,
                },
                _ => (message.as_str(), None),
            };
            found.clear();
            engine.feed(msg, time, &mut found);
            for f in found.drain(..) {
                if let Problem::Permanent { condition, status: s } = &f.problem {
                    let current = status.get(condition).copied().unwrap_or(ConditionStatus::False);
                    if current == *s {
                        continue;
                    }
                    status.insert(condition.clone(), *s);
                }
                out.push(Replayed { line: n + 1, finding: f });
            }
        }
    }
    out
}
