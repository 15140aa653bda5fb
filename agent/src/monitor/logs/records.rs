//! The record formats of log sources: /dev/kmsg records and `journalctl -o json` entries.

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
}
