//! Lines of a file that may grow, with their byte offsets.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use super::MAX_LINE;

/// Reads lines from a file that may grow, keeping its byte offset; lines are cut at MAX_LINE.
pub(super) struct LineReader {
    file: File,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Offset in the file of the next unread line.
    pub(super) offset: u64,
    line: String,
    skipping: bool,
}

impl LineReader {
    pub(super) fn new(file: File) -> LineReader {
        LineReader { file, buf: vec![0; 64 * 1024], start: 0, end: 0, offset: 0, line: String::new(), skipping: false }
    }

    pub(super) fn seek(&mut self, offset: u64) -> std::io::Result<()> {
        self.file.seek(SeekFrom::Start(offset))?;
        self.start = 0;
        self.end = 0;
        self.offset = offset;
        self.skipping = false;
        Ok(())
    }

    /// The next complete line (without its newline), or None at the end of what is written.
    pub(super) fn next_line(&mut self) -> std::io::Result<Option<&str>> {
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
