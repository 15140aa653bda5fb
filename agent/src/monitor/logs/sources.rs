//! Where lines come from: /dev/kmsg (or a file of its records), plain files followed across
//! rotation and truncation, and the systemd journal through `journalctl --follow`. Each source
//! resumes from the position stored with the monitor's last report.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::reader::LineReader;
use super::records::{parse_journal, parse_kmsg};
use super::{FILE_POLL, MAX_LINE, Monitor, Position};
use crate::monitor::rules::Input;

impl Monitor {
    pub(super) fn run_kmsg(&mut self, path: &Path) -> std::io::Result<()> {
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

    pub(super) fn run_file(&mut self, path: &Path) -> std::io::Result<()> {
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

    pub(super) fn run_journal(
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

fn monotonic_now() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32))
        .unwrap_or_default()
}

/// The journalctl to run (NODEKEEPER_JOURNALCTL overrides, for systems that keep it elsewhere).
fn journalctl() -> PathBuf {
    std::env::var_os("NODEKEEPER_JOURNALCTL").map(PathBuf::from).unwrap_or_else(|| "journalctl".into())
}
