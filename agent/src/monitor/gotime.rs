//! The two pieces of Go's time formats that node-problem-detector files use: durations ("5m",
//! "1m30s", "300ms") and reference-time layouts for log timestamps ("Jan _2 15:04:05").

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A Go duration string: a sequence of decimal numbers with units ns, us, µs, ms, s, m, h.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut rest = s.trim();
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    Some(Duration::from_secs_f64(total))
}

/// Parses `text` with a Go reference-time `layout`, as UTC. A layout without a year takes the
/// current one (as node-problem-detector does). Supported elements: Jan January 01 1 _2 02 2
/// 2006 06 15 03 3 04 4 05 5 PM pm Mon Monday MST -0700 -07:00 Z07:00 Z0700 and fractional
/// seconds (.000, .999999, ...).
pub fn parse_layout(layout: &str, text: &str) -> Option<SystemTime> {
    let mut l = layout;
    let mut t = text;
    let (mut year, mut month, mut day, mut hour, mut min, mut sec, mut nanos) =
        (None, 1u32, 1u32, 0u32, 0u32, 0u32, 0u32);
    let mut pm = None;
    let mut offset = 0i64;
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    const FULL_MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
    const FULL_DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    fn digits(t: &mut &str, min: usize, max: usize) -> Option<u32> {
        let n = t.bytes().take(max).take_while(u8::is_ascii_digit).count();
        if n < min {
            return None;
        }
        let v = t[..n].parse().ok()?;
        *t = &t[n..];
        Some(v)
    }
    fn word(t: &mut &str, words: &[&str]) -> Option<usize> {
        let i = words.iter().position(|w| t.starts_with(w))?;
        *t = &t[words[i].len()..];
        Some(i)
    }
    while !l.is_empty() {
        let token = [
            "January", "Monday", "2006", "Z07:00", "-07:00", "Z0700", "-0700", "Jan", "Mon", "MST", "_2", "01", "02",
            "03", "04", "05", "06", "15", "PM", "pm", "1", "2", "3", "4", "5",
        ]
        .into_iter()
        .find(|tok| l.starts_with(tok));
        if let Some(tok) = token {
            l = &l[tok.len()..];
            match tok {
                "January" => month = word(&mut t, &FULL_MONTHS)? as u32 + 1,
                "Jan" => month = word(&mut t, &MONTHS)? as u32 + 1,
                "Monday" => {
                    word(&mut t, &FULL_DAYS)?;
                }
                "Mon" => {
                    word(&mut t, &DAYS)?;
                }
                "2006" => year = Some(digits(&mut t, 4, 4)? as i64),
                "06" => year = Some(2000 + digits(&mut t, 2, 2)? as i64),
                "01" => month = digits(&mut t, 2, 2)?,
                "1" => month = digits(&mut t, 1, 2)?,
                "_2" => {
                    t = t.strip_prefix(' ').unwrap_or(t);
                    day = digits(&mut t, 1, 2)?;
                }
                "02" => day = digits(&mut t, 2, 2)?,
                "2" => day = digits(&mut t, 1, 2)?,
                "15" => hour = digits(&mut t, 1, 2)?,
                "03" => hour = digits(&mut t, 2, 2)?,
                "3" => hour = digits(&mut t, 1, 2)?,
                "04" => min = digits(&mut t, 2, 2)?,
                "4" => min = digits(&mut t, 1, 2)?,
                "05" => sec = digits(&mut t, 2, 2)?,
                "5" => sec = digits(&mut t, 1, 2)?,
                "PM" => pm = Some(word(&mut t, &["PM", "AM"])? == 0),
                "pm" => pm = Some(word(&mut t, &["pm", "am"])? == 0),
                "MST" => {
                    let n = t.bytes().take_while(u8::is_ascii_uppercase).count();
                    t = &t[n..];
                }
                _ => {
                    // Zone offsets.
                    if tok.starts_with('Z') && t.starts_with('Z') {
                        t = &t[1..];
                    } else {
                        let sign = match t.as_bytes().first()? {
                            b'+' => 1,
                            b'-' => -1,
                            _ => return None,
                        };
                        t = &t[1..];
                        let h = digits(&mut t, 2, 2)? as i64;
                        t = t.strip_prefix(':').unwrap_or(t);
                        let m = digits(&mut t, 2, 2)? as i64;
                        offset = sign * (h * 3600 + m * 60);
                    }
                }
            }
            continue;
        }
        // Fractional seconds: ".000" or ",999" after seconds.
        if (l.starts_with(".0") || l.starts_with(".9") || l.starts_with(",0") || l.starts_with(",9")) && !t.is_empty() {
            let n = l[1..].bytes().take_while(|b| *b == b'0' || *b == b'9').count();
            l = &l[1 + n..];
            if t.starts_with(['.', ',']) {
                t = &t[1..];
                let d = t.bytes().take_while(u8::is_ascii_digit).count();
                let frac = &t[..d.min(9)];
                nanos = format!("{frac:0<9}").parse().ok()?;
                t = &t[d..];
            }
            continue;
        }
        let c = l.chars().next()?;
        if !t.starts_with(c) {
            return None;
        }
        l = &l[c.len_utf8()..];
        t = &t[c.len_utf8()..];
    }
    if let Some(pm) = pm {
        hour = hour % 12 + if pm { 12 } else { 0 };
    }
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let year = year.unwrap_or_else(current_year);
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + i64::from(hour) * 3600 + i64::from(min) * 60 + i64::from(sec) - offset;
    let secs = u64::try_from(secs).ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

fn current_year() -> i64 {
    let days = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() / 86_400).unwrap_or(0) as i64;
    civil_from_days(days).0
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(t: SystemTime) -> u64 {
        t.duration_since(UNIX_EPOCH).unwrap().as_secs()
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("300ms"), Some(Duration::from_millis(300)));
        assert_eq!(parse_go_duration("10h"), Some(Duration::from_secs(36_000)));
        assert_eq!(parse_go_duration("soon"), None);
        assert_eq!(parse_go_duration("5"), None);
    }

    #[test]
    fn layouts() {
        // 2026-11-22T08:01:55Z = 1795334515
        assert_eq!(unix(parse_layout("2006-01-02T15:04:05Z07:00", "2026-11-22T08:01:55Z").unwrap()), 1_795_334_515);
        assert_eq!(
            unix(parse_layout("2006-01-02T15:04:05Z07:00", "2026-11-22T09:01:55+01:00").unwrap()),
            1_795_334_515
        );
        assert_eq!(unix(parse_layout("2006 Jan _2 15:04:05", "2026 Nov 22 08:01:55").unwrap()), 1_795_334_515);
        assert_eq!(
            unix(parse_layout("2006 Jan _2 15:04:05", "2026 Nov  2 08:01:55").unwrap()),
            1_795_334_515 - 20 * 86_400
        );
        let t = parse_layout("2006-01-02 15:04:05.000", "2026-11-22 08:01:55.250").unwrap();
        assert_eq!(t.duration_since(UNIX_EPOCH).unwrap().subsec_millis(), 250);
        // Without a year: this year.
        let t = parse_layout("Jan _2 15:04:05", "Jan  2 08:01:55").unwrap();
        assert_eq!(civil_from_days(unix(t) as i64 / 86_400).0, current_year());
        assert!(parse_layout("Jan _2 15:04:05", "Foo  2 08:01:55").is_none());
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
    }
}
