//! Log monitors: read a log source, match its lines against rules, report what matches.
//!
//! Sources: /dev/kmsg (or a file of kmsg records), the systemd journal (`journalctl -o json
//! --follow`), and plain files followed across rotation. Each monitor runs on its own thread, so
//! that a burst of log lines never delays the agent's heartbeats.
//!
//! Restarts: a monitor stores its position (kmsg sequence and boot, journal cursor, file inode and
//! offset) with every report, in the same transaction. On start it reads the source's lookback
//! window; lines at or before the stored position are only put into the match buffer, never
//! reported again.
//!
//! Floods: lines beyond a budget (a token bucket of `lines_per_second`, `burst`) are counted and
//! dropped without matching; a `LogFlood` event says so when it starts, `LogFloodEnded` with the
//! count when it ends. Lines are cut at `MAX_LINE` bytes; memory does not grow with the input.

mod engine;
mod reader;
mod records;
mod sources;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nodekeeper_proto::v1::{Category, RecommendedAction, Severity};
use serde::{Deserialize, Serialize};

pub use engine::{Format, Replayed, RuleEngine, Translator, replay};
pub use records::{JournalRecord, KmsgRecord, parse_journal, parse_kmsg};

use super::rules::{Input, LogMonitorSpec};
use super::state::Reporter;
use super::{Class, Finding};
use crate::metrics::Metrics;

/// Longest line kept; the rest of a longer line is discarded.
pub const MAX_LINE: usize = 16 * 1024;
/// How often a file source looks for new lines and rotation.
const FILE_POLL: Duration = Duration::from_millis(200);
/// How often the position is stored when nothing is reported.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(5);
/// A flood ends after this long without a dropped line.
const FLOOD_QUIET: Duration = Duration::from_secs(5);

/// The line budget of one monitor.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub lines_per_second: f64,
    pub burst: f64,
}

struct Bucket {
    budget: Budget,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(budget: Budget) -> Bucket {
        Bucket { budget, tokens: budget.burst, last: Instant::now() }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.budget.lines_per_second).min(self.budget.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Where a source is, stored with reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct Position {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    boot_id: String,
    #[serde(default)]
    seq: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    cursor: String,
    #[serde(default)]
    dev: u64,
    #[serde(default)]
    ino: u64,
    #[serde(default)]
    offset: u64,
}

/// A running log monitor; stopping it ends its thread (and its journalctl).
pub struct LogMonitorHandle {
    stop: Arc<AtomicBool>,
    child: Arc<Mutex<Option<u32>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LogMonitorHandle {
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(pid) = self.child.lock().expect("child lock").take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
        }
        // A kmsg reader may be blocked in poll for up to its timeout; files and journal stop at once.
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Monitor {
    engine: RuleEngine,
    translator: Translator,
    reporter: Reporter,
    metrics: Metrics,
    bucket: Bucket,
    boot_id: String,
    key: String,
    stop: Arc<AtomicBool>,
    findings: Vec<Finding>,
    position: Position,
    stored: Position,
    last_store: Instant,
    flood: Option<(Instant, u64)>,
    last_drop: Instant,
    dropped_total: u64,
}

/// Starts a monitor thread for `spec`.
pub fn spawn(
    spec: LogMonitorSpec,
    reporter: Reporter,
    metrics: Metrics,
    budget: Budget,
    boot_id: &str,
) -> LogMonitorHandle {
    let stop = Arc::new(AtomicBool::new(false));
    let child = Arc::new(Mutex::new(None));
    for c in &spec.conditions {
        reporter.declare(c);
    }
    let key = format!("log/{}/{}", spec.source, spec.file.display());
    let stored: Position =
        reporter.state(&key).ok().flatten().and_then(|v| serde_json::from_slice(&v).ok()).unwrap_or_default();
    let mut m = Monitor {
        translator: Translator::new(&spec),
        engine: RuleEngine::new(spec),
        reporter,
        metrics,
        bucket: Bucket::new(budget),
        boot_id: boot_id.to_owned(),
        key,
        stop: stop.clone(),
        findings: Vec::new(),
        position: stored.clone(),
        stored,
        last_store: Instant::now(),
        flood: None,
        last_drop: Instant::now(),
        dropped_total: 0,
    };
    let child2 = child.clone();
    let name = format!("log-{}", m.engine.spec.source);
    let thread = std::thread::Builder::new()
        .name(name.chars().take(15).collect())
        .spawn(move || {
            let source = m.engine.spec.source.clone();
            let thread = format!("log/{source}/{}", m.engine.spec.file.display());
            m.metrics.monitor_threads.lock().expect("metrics lock").push((thread, nix::unistd::gettid().as_raw()));
            let result = match m.engine.spec.input.clone() {
                Input::Kmsg { path } => m.run_kmsg(&path),
                Input::File { path, .. } => m.run_file(&path),
                Input::Journal { path, identifiers, units } => {
                    m.run_journal(path.as_deref(), &identifiers, &units, &child2)
                }
            };
            if let Err(err) = result {
                tracing::error!(monitor = %source, error = %err, "log monitor stopped");
            }
        })
        .expect("spawning a thread");
    LogMonitorHandle { stop, child, thread: Some(thread) }
}

impl Monitor {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Handles one message: budget, matching, reporting. `backlog`: read at start, before the
    /// source was first caught up; `old`: at or before the stored position, or outside the
    /// lookback window (only buffered).
    fn line(&mut self, message: &str, time: Option<SystemTime>, old: bool) -> std::io::Result<()> {
        self.metrics.log_lines.inc();
        if old {
            self.engine.prime(message);
            return Ok(());
        }
        if !self.bucket.take() {
            self.dropped_total += 1;
            self.metrics.log_lines_dropped.inc();
            self.last_drop = Instant::now();
            if self.flood.is_none() {
                self.flood = Some((Instant::now(), 0));
                let b = self.bucket.budget;
                let f = Finding::temporary(
                    &self.engine.spec.source,
                    "LogFlood",
                    format!(
                        "more than {} lines/s (burst {}) from {}: lines are counted and dropped, not matched, until the flood ends",
                        b.lines_per_second,
                        b.burst,
                        self.engine.spec.file.display()
                    ),
                    Class::new(Severity::Warning, Category::Resource, RecommendedAction::None),
                );
                self.findings.push(f);
                self.flush()?;
            }
            if let Some((_, n)) = &mut self.flood {
                *n += 1;
            }
            return Ok(());
        }
        self.end_flood_if_quiet()?;
        let Some((msg, ltime)) = self.translator.translate(message) else { return Ok(()) };
        let before = self.findings.len();
        self.engine.feed(msg, ltime.or(time), &mut self.findings);
        if self.findings.len() > before {
            self.metrics.log_matches.inc_by((self.findings.len() - before) as u64);
        }
        if self.findings.len() >= 256 {
            self.flush()?;
        }
        Ok(())
    }

    fn end_flood_if_quiet(&mut self) -> std::io::Result<()> {
        if let Some((start, n)) = self.flood
            && self.last_drop.elapsed() >= FLOOD_QUIET
        {
            self.flood = None;
            let f = Finding::temporary(
                &self.engine.spec.source,
                "LogFloodEnded",
                format!(
                    "the flood from {} ended after {}: {n} lines were dropped unmatched",
                    self.engine.spec.file.display(),
                    humantime::format_duration(Duration::from_secs(start.elapsed().as_secs()))
                ),
                Class::new(Severity::Info, Category::Resource, RecommendedAction::None),
            )
            .with("dropped", n);
            self.findings.push(f);
            self.flush()?;
        }
        Ok(())
    }

    /// Reports pending findings with the current position (or just the position, now and then).
    fn flush(&mut self) -> std::io::Result<()> {
        let due = self.last_store.elapsed() >= CHECKPOINT_EVERY && self.position != self.stored;
        if self.findings.is_empty() && !due {
            return Ok(());
        }
        let pos = serde_json::to_vec(&self.position).expect("serializable");
        self.reporter
            .report_blocking(&self.findings, &[(self.key.clone(), Some(pos))])
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.findings.clear();
        self.stored = self.position.clone();
        self.last_store = Instant::now();
        Ok(())
    }

    /// Idle: the source is caught up.
    fn idle(&mut self) -> std::io::Result<()> {
        self.end_flood_if_quiet()?;
        self.flush()
    }
}
