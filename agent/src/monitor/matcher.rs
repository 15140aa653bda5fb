//! Rule matching with node-problem-detector's semantics: the monitor keeps the last `buffer_size`
//! lines; a rule matches when its regex matches the buffer (lines joined by "\n") up to the end of
//! the newest line. So a pattern spanning two lines matches only when its last line is the newest,
//! and lines rotated out of the buffer no longer match.
//!
//! Most patterns cannot match a newline; for them a match that ends at the end of the buffer lies
//! within the newest line, so they are matched against that line alone, all at once with one
//! `RegexSet`. Only patterns that can match a newline look at the joined buffer.

use std::collections::VecDeque;

use regex::bytes::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};
use regex_syntax::hir::{Class, Hir, HirKind};

/// The pattern as it is matched: anchored at the end of the text.
pub fn anchored(pattern: &str) -> String {
    format!("(?:{pattern})\\z")
}

/// Memory for each regex's lazy DFA cache: plenty for rule sets, small enough for the agent.
const DFA_CACHE: usize = 256 * 1024;

/// Compiles a pattern as rules are matched: on bytes, in ASCII mode like Go's regexp (RE2), so
/// `\\d`, `\\w` and `\\s` are ASCII and `.` is any byte but a newline.
pub fn compile(pattern: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(pattern).unicode(false).dfa_size_limit(DFA_CACHE).build()
}

/// Whether the pattern can match text that contains a newline.
fn spans_lines(pattern: &str) -> bool {
    let mut parser = regex_syntax::ParserBuilder::new().unicode(false).utf8(false).build();
    match parser.parse(pattern) {
        Ok(hir) => can_match_newline(&hir),
        Err(_) => true,
    }
}

fn can_match_newline(hir: &Hir) -> bool {
    match hir.kind() {
        HirKind::Empty | HirKind::Look(_) => false,
        HirKind::Literal(l) => l.0.contains(&b'\n'),
        HirKind::Class(Class::Unicode(c)) => c.ranges().iter().any(|r| r.start() <= '\n' && '\n' <= r.end()),
        HirKind::Class(Class::Bytes(c)) => c.ranges().iter().any(|r| r.start() <= b'\n' && b'\n' <= r.end()),
        HirKind::Repetition(r) => can_match_newline(&r.sub),
        HirKind::Capture(c) => can_match_newline(&c.sub),
        HirKind::Concat(v) | HirKind::Alternation(v) => v.iter().any(can_match_newline),
    }
}

/// A rule that matched: its index in the rule list and the matched lines (oldest first, joined
/// by "\n"), which become the finding's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub rule: usize,
    pub message: String,
}

pub struct Matcher {
    /// Single-line rules, matched against the newest line.
    set: RegexSet,
    set_rules: Vec<usize>,
    /// Rules that may span lines, matched against the joined buffer.
    multi: Vec<(usize, Regex)>,
    buffer: VecDeque<String>,
    capacity: usize,
    joined: String,
    hits: Vec<usize>,
}

impl Matcher {
    /// `patterns` in rule order; they were validated when the rules were loaded.
    pub fn new(patterns: &[&str], buffer_size: usize) -> Result<Matcher, regex::Error> {
        let mut single = Vec::new();
        let mut set_rules = Vec::new();
        let mut multi = Vec::new();
        for (i, p) in patterns.iter().enumerate() {
            if spans_lines(p) {
                multi.push((i, compile(&anchored(p))?));
            } else {
                single.push(anchored(p));
                set_rules.push(i);
            }
        }
        Ok(Matcher {
            set: RegexSetBuilder::new(&single).unicode(false).dfa_size_limit(DFA_CACHE).build()?,
            set_rules,
            multi,
            buffer: VecDeque::with_capacity(buffer_size.max(1)),
            capacity: buffer_size.max(1),
            joined: String::new(),
            hits: Vec::new(),
        })
    }

    /// Adds the newest line to the buffer (forgetting the oldest) without matching: used to prime
    /// the buffer with lines already processed before a restart.
    pub fn push(&mut self, line: &str) {
        let mut slot = if self.buffer.len() == self.capacity {
            self.buffer.pop_front().unwrap_or_default()
        } else {
            String::new()
        };
        slot.clear();
        slot.push_str(line);
        self.buffer.push_back(slot);
    }

    /// Adds the newest line and appends the rules that match to `out`, in rule order.
    pub fn feed(&mut self, line: &str, out: &mut Vec<Match>) {
        self.push(line);
        self.hits.clear();
        if !self.set_rules.is_empty() {
            for i in self.set.matches(line.as_bytes()).iter() {
                self.hits.push(self.set_rules[i]);
            }
        }
        let first = out.len();
        for &rule in &self.hits {
            out.push(Match { rule, message: line.to_owned() });
        }
        if !self.multi.is_empty() {
            self.joined.clear();
            for (i, l) in self.buffer.iter().enumerate() {
                if i > 0 {
                    self.joined.push('\n');
                }
                self.joined.push_str(l);
            }
            for (rule, re) in &self.multi {
                if let Some(m) = re.find(self.joined.as_bytes()) {
                    // The whole lines the match covers.
                    let start =
                        self.joined.as_bytes()[..m.start()].iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
                    out.push(Match { rule: *rule, message: self.joined[start..].to_owned() });
                }
            }
            out[first..].sort_by_key(|m| m.rule);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(patterns: &[&str], buffer: usize, lines: &[&str]) -> Vec<(usize, usize, String)> {
        let mut m = Matcher::new(patterns, buffer).unwrap();
        let mut out = Vec::new();
        let mut found = Vec::new();
        for (n, l) in lines.iter().enumerate() {
            out.clear();
            m.feed(l, &mut out);
            found.extend(out.iter().map(|x| (n + 1, x.rule, x.message.clone())));
        }
        found
    }

    #[test]
    fn a_pattern_must_match_to_the_end_of_the_newest_line() {
        let p = ["Remounting filesystem read-only"];
        assert_eq!(run(&p, 10, &["EXT4-fs (sda1): Remounting filesystem read-only"]).len(), 1);
        assert!(run(&p, 10, &["EXT4-fs (sda1): Remounting filesystem read-only, sort of"]).is_empty());
    }

    #[test]
    fn multi_line_patterns_match_only_when_their_last_line_is_the_newest() {
        let p = ["first line\\nsecond line"];
        let found = run(&p, 3, &["first line", "second line", "third line"]);
        assert_eq!(found, vec![(2, 0, "first line\nsecond line".to_owned())]);
    }

    #[test]
    fn lines_rotated_out_of_the_buffer_no_longer_match() {
        let p = ["first line\\nx\\nsecond line"];
        assert_eq!(run(&p, 3, &["first line", "x", "second line"]).len(), 1);
        assert!(run(&p, 2, &["first line", "x", "second line"]).is_empty(), "a buffer of 2 cannot hold 3 lines");
    }

    #[test]
    fn newline_detection() {
        assert!(!spans_lines("task \\S+:\\w+ blocked for more than \\w+ seconds\\."));
        assert!(!spans_lines(".*\\[Hardware Error\\]: event severity: fatal$"));
        assert!(spans_lines("a\\nb"));
        assert!(spans_lines("a\\sb"));
        assert!(spans_lines("a[^x]b"));
        assert!(spans_lines("(?s)a.b"));
    }
}
