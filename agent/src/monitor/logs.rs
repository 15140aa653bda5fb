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

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nodekeeper_proto::v1::{Category, ConditionStatus, RecommendedAction, Severity};
use regex::bytes::Regex;
use serde::{Deserialize, Serialize};

use super::matcher::{Match, Matcher};
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

// --- record formats ---------------------------------------------------------------------------

/// A /dev/kmsg record: `PRIO,SEQ,USEC,FLAGS[,...];message`, its message unescaped (`\xNN`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsgRecord {
    /// Syslog facility and level (`prio & 7` is the level).
    pub prio: u32,
    pub seq: u64,
    /// Microseconds since boot (CLOCK_MONOTONIC).
    pub usec: u64,
    pub flags: String,
    pub message: String,
}

/// Parses one kmsg record line. Continuation lines (starting with a space: `KEY=value`
/// dictionary entries of the record above) are not records: None.
pub fn parse_kmsg(line: &str) -> Option<KmsgRecord> {
    if line.starts_with(' ') {
        return None;
    }
    let (header, message) = line.split_once(';')?;
    let mut fields = header.split(',');
    let prio = fields.next()?.parse().ok()?;
    let seq = fields.next()?.parse().ok()?;
    let usec = fields.next()?.parse().ok()?;
    let flags = fields.next().unwrap_or("-").to_owned();
    Some(KmsgRecord { prio, seq, usec, flags, message: unescape_kmsg(message) })
}

/// The kernel escapes unprintable bytes as `\xNN`.
fn unescape_kmsg(s: &str) -> String {
    if !s.contains("\\x") {
        return s.to_owned();
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1] == b'x'
            && let Ok(v) = u8::from_str_radix(&s[i + 2..i + 4], 16)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One `journalctl -o json` entry: its message, cursor and time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalRecord {
    pub message: String,
    pub cursor: String,
    pub realtime_usec: u64,
}

pub fn parse_journal(line: &str) -> Option<JournalRecord> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let message = match v.get("MESSAGE")? {
        serde_json::Value::String(s) => s.clone(),
        // Non-UTF-8 messages come as an array of bytes.
        serde_json::Value::Array(a) => {
            String::from_utf8_lossy(&a.iter().filter_map(|b| b.as_u64().map(|b| b as u8)).collect::<Vec<_>>())
                .into_owned()
        }
        _ => return None,
    };
    Some(JournalRecord {
        message,
        cursor: v.get("__CURSOR").and_then(|c| c.as_str()).unwrap_or_default().to_owned(),
        realtime_usec: v.get("__REALTIME_TIMESTAMP").and_then(|t| t.as_str()).and_then(|t| t.parse().ok()).unwrap_or(0),
    })
}

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
                    .and_then(|(r, f)| super::matcher::compile(r).ok().map(|r| (r, f.clone()))),
                message.as_ref().and_then(|m| super::matcher::compile(m).ok()),
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
                Some(super::gotime::parse_layout(layout, text)?)
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

// --- matching lines into findings -----------------------------------------------------------------

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
                if let super::Problem::Permanent { condition, status: s } = &f.problem {
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

// --- the live monitor --------------------------------------------------------------------------

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

fn monotonic_now() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32))
        .unwrap_or_default()
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

    fn run_kmsg(&mut self, path: &Path) -> std::io::Result<()> {
        let file = std::fs::OpenOptions::new().read(true).custom_flags(nix::libc::O_NONBLOCK).open(path)?;
        let device = file.metadata()?.file_type().is_char_device();
        let lookback = self.engine.spec.lookback;
        let same_boot = self.stored.boot_id == self.boot_id;
        let after = if same_boot { self.stored.seq } else { 0 };
        self.position.boot_id = self.boot_id.clone();
        let boot_wall = SystemTime::now() - monotonic_now();
        let mut backlog = true;
        let handle = |m: &mut Monitor, line: &str, backlog: bool| -> std::io::Result<()> {
            let Some(r) = parse_kmsg(line) else { return Ok(()) };
            let age = monotonic_now().saturating_sub(Duration::from_micros(r.usec));
            let old = (same_boot && r.seq <= after) || (backlog && age > lookback);
            if r.seq > m.position.seq || !same_boot {
                m.position.seq = r.seq;
            }
            m.line(&r.message, Some(boot_wall + Duration::from_micros(r.usec)), old)
        };
        if device {
            // Each read returns one record; EAGAIN: caught up; EPIPE: records were overwritten.
            let mut file = file;
            let mut buf = vec![0u8; 8192];
            loop {
                if self.stopped() {
                    return Ok(());
                }
                match file.read(&mut buf) {
                    Ok(0) => return Ok(()),
                    Ok(n) => {
                        let text = String::from_utf8_lossy(&buf[..n]);
                        if let Some(line) = text.lines().next() {
                            handle(self, line, backlog)?;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        backlog = false;
                        self.idle()?;
                        let fd = std::os::fd::AsFd::as_fd(&file);
                        let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
                        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(500u16));
                    }
                    Err(e) if e.raw_os_error() == Some(nix::libc::EPIPE) => {
                        tracing::warn!(monitor = %self.engine.spec.source, "kernel log records were overwritten before they were read");
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        // A regular file of kmsg records (tests, replays): follow it like a log file.
        let mut reader = LineReader::new(file);
        loop {
            if self.stopped() {
                return Ok(());
            }
            match reader.next_line()? {
                Some(line) => {
                    let line = line.to_owned();
                    handle(self, &line, backlog)?;
                }
                None => {
                    backlog = false;
                    self.idle()?;
                    self.wait(FILE_POLL);
                }
            }
        }
    }

    fn wait(&self, d: Duration) {
        let deadline = Instant::now() + d;
        while !self.stopped() && Instant::now() < deadline {
            std::thread::park_timeout(Duration::from_millis(50));
        }
    }

    fn run_file(&mut self, path: &Path) -> std::io::Result<()> {
        let lookback = self.engine.spec.lookback;
        let mut first = true;
        loop {
            // Wait for the file to exist.
            let file = loop {
                if self.stopped() {
                    return Ok(());
                }
                match File::open(path) {
                    Ok(f) => break f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        self.idle()?;
                        self.wait(FILE_POLL);
                    }
                    Err(e) => return Err(e),
                }
            };
            let meta = file.metadata()?;
            let (dev, ino) = (meta.dev(), meta.ino());
            let mut reader = LineReader::new(file);
            let resume = first && self.stored.ino == ino && self.stored.dev == dev && self.stored.offset <= meta.len();
            let has_time = matches!(&self.engine.spec.input, Input::File { timestamp: Some(_), .. });
            if resume {
                reader.seek(self.stored.offset)?;
            }
            let backlog_cutoff = (first && !resume && has_time).then(|| SystemTime::now() - lookback);
            first = false;
            self.position = Position { dev, ino, offset: reader.offset, ..Default::default() };
            loop {
                if self.stopped() {
                    return Ok(());
                }
                match reader.next_line()? {
                    Some(line) => {
                        let line = line.to_owned();
                        self.position.offset = reader.offset;
                        let old = backlog_cutoff.is_some_and(|cut| {
                            self.translator.translate(&line).and_then(|(_, t)| t).is_some_and(|t| t < cut)
                        });
                        self.line(&line, None, old)?;
                    }
                    None => {
                        self.idle()?;
                        // Rotated (a new file at the path) or truncated?
                        match std::fs::metadata(path) {
                            Ok(m) if m.ino() != ino || m.dev() != dev => {
                                // Read what is left of the old file, then follow the new one.
                                while let Some(line) = reader.next_line()? {
                                    let line = line.to_owned();
                                    self.line(&line, None, false)?;
                                }
                                break;
                            }
                            Ok(m) if m.len() < reader.offset => {
                                reader.seek(0)?;
                                self.position.offset = 0;
                            }
                            _ => self.wait(FILE_POLL),
                        }
                    }
                }
            }
        }
    }

    fn run_journal(
        &mut self,
        path: Option<&Path>,
        identifiers: &[String],
        units: &[String],
        child_pid: &Mutex<Option<u32>>,
    ) -> std::io::Result<()> {
        let mut cmd = std::process::Command::new(journalctl());
        cmd.args(["--output=json", "--follow", "--no-pager", "--lines=all"]);
        if let Some(p) = path {
            if p.is_dir() {
                cmd.arg(format!("--directory={}", p.display()));
            } else if p.is_file() {
                cmd.arg(format!("--file={}", p.display()));
            }
        }
        for i in identifiers {
            cmd.arg(format!("--identifier={i}"));
        }
        for u in units {
            cmd.arg(format!("--unit={u}"));
        }
        let resume = !self.stored.cursor.is_empty();
        if resume {
            cmd.arg(format!("--after-cursor={}", self.stored.cursor));
        } else {
            let since = SystemTime::now() - self.engine.spec.lookback;
            cmd.arg(format!("--since=@{}", since.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()));
        }
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null()).stdin(std::process::Stdio::null());
        let mut child =
            cmd.spawn().map_err(|e| std::io::Error::new(e.kind(), format!("cannot run journalctl: {e}")))?;
        *child_pid.lock().expect("child lock") = Some(child.id());
        let stdout = child.stdout.take().expect("piped");
        let mut reader = BufReader::with_capacity(64 * 1024, stdout);
        let mut line = Vec::new();
        loop {
            if self.stopped() {
                break;
            }
            line.clear();
            let n = (&mut reader).take(MAX_LINE as u64 * 4).read_until(b'\n', &mut line)?;
            if n == 0 {
                break;
            }
            if line.last() != Some(&b'\n') {
                // Longer than we keep: skip the rest of it.
                let mut rest = Vec::new();
                reader.read_until(b'\n', &mut rest)?;
                continue;
            }
            let text = String::from_utf8_lossy(&line);
            if let Some(r) = parse_journal(&text) {
                self.position.cursor = r.cursor;
                let time = UNIX_EPOCH + Duration::from_micros(r.realtime_usec);
                let mut msg = r.message;
                if msg.len() > MAX_LINE {
                    let mut cut = MAX_LINE;
                    while !msg.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    msg.truncate(cut);
                }
                self.line(&msg, Some(time), false)?;
            }
            if reader.buffer().is_empty() {
                self.idle()?;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        self.flush()
    }
}

/// The journalctl to run (NODEKEEPER_JOURNALCTL overrides, for systems that keep it elsewhere).
fn journalctl() -> PathBuf {
    std::env::var_os("NODEKEEPER_JOURNALCTL").map(PathBuf::from).unwrap_or_else(|| "journalctl".into())
}

/// Reads lines from a file that may grow, keeping its byte offset; lines are cut at MAX_LINE.
struct LineReader {
    file: File,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Offset in the file of the next unread line.
    offset: u64,
    line: String,
    skipping: bool,
}

impl LineReader {
    fn new(file: File) -> LineReader {
        LineReader { file, buf: vec![0; 64 * 1024], start: 0, end: 0, offset: 0, line: String::new(), skipping: false }
    }

    fn seek(&mut self, offset: u64) -> std::io::Result<()> {
        self.file.seek(SeekFrom::Start(offset))?;
        self.start = 0;
        self.end = 0;
        self.offset = offset;
        self.skipping = false;
        Ok(())
    }

    /// The next complete line (without its newline), or None at the end of what is written.
    fn next_line(&mut self) -> std::io::Result<Option<&str>> {
        loop {
            if let Some(nl) = self.buf[self.start..self.end].iter().position(|b| *b == b'\n') {
                let line = &self.buf[self.start..self.start + nl];
                self.start += nl + 1;
                self.offset += nl as u64 + 1;
                if self.skipping {
                    // The tail of an over-long line.
                    self.skipping = false;
                    continue;
                }
                let line = &line[..line.len().min(MAX_LINE)];
                self.line.clear();
                self.line.push_str(&String::from_utf8_lossy(line));
                return Ok(Some(&self.line));
            }
            // No full line buffered: move the partial one to the front and read more.
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                // An over-long line: keep its first MAX_LINE bytes, skip the rest.
                let keep = MAX_LINE.min(self.end);
                self.line.clear();
                self.line.push_str(&String::from_utf8_lossy(&self.buf[..keep]));
                self.offset += self.end as u64;
                self.end = 0;
                let was_skipping = std::mem::replace(&mut self.skipping, true);
                if was_skipping {
                    continue;
                }
                return Ok(Some(&self.line));
            }
            let n = match self.file.read(&mut self.buf[self.end..]) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Ok(None);
            }
            self.end += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kmsg_records() {
        let r = parse_kmsg("3,1234,5140900,-;EXT4-fs error (device sda1): bad\\x0aentry").unwrap();
        assert_eq!((r.prio, r.seq, r.usec, r.flags.as_str()), (3, 1234, 5_140_900, "-"));
        assert_eq!(r.message, "EXT4-fs error (device sda1): bad\nentry");
        let r = parse_kmsg("6,339,5140900,c,more;fragment").unwrap();
        assert_eq!((r.flags.as_str(), r.message.as_str()), ("c", "fragment"));
        assert!(parse_kmsg(" SUBSYSTEM=block").is_none(), "a continuation line is not a record");
        assert!(parse_kmsg("not a record").is_none());
    }

    #[test]
    fn journal_records() {
        let r = parse_journal(r#"{"__CURSOR":"s=1;i=2","__REALTIME_TIMESTAMP":"1795334364507474","MESSAGE":"Started Kubernetes kubelet.","SYSLOG_IDENTIFIER":"systemd"}"#).unwrap();
        assert_eq!(r.message, "Started Kubernetes kubelet.");
        assert_eq!(r.cursor, "s=1;i=2");
        assert_eq!(r.realtime_usec, 1_795_334_364_507_474);
        let r = parse_journal(r#"{"MESSAGE":[104,105,255]}"#).unwrap();
        assert_eq!(r.message, "hi\u{fffd}");
    }

    #[test]
    fn line_reader_cuts_long_lines_and_keeps_offsets() {
        let t = tempfile::NamedTempFile::new().unwrap();
        let long = "x".repeat(200_000);
        std::fs::write(t.path(), format!("a\n{long}\nb\npartial")).unwrap();
        let mut r = LineReader::new(File::open(t.path()).unwrap());
        assert_eq!(r.next_line().unwrap(), Some("a"));
        assert_eq!(r.next_line().unwrap().map(str::len), Some(MAX_LINE));
        assert_eq!(r.next_line().unwrap(), Some("b"));
        assert_eq!(r.offset, 2 + 200_001 + 2);
        assert_eq!(r.next_line().unwrap(), None, "a partial line waits for its newline");
    }
}
