//! Maintenance windows: days and hours in a time zone inside which new nodes may start changing.

use jiff::civil::Weekday;
use nodekeeper_proto::v1::MaintenanceWindow;

/// "HH:MM" → minutes after midnight.
pub fn minutes(hhmm: &str) -> Result<u32, String> {
    let bad = || format!("{hhmm:?}: expected HH:MM");
    let (h, m) = hhmm.split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 || hhmm.len() != 5 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

fn day_name(d: Weekday) -> &'static str {
    match d {
        Weekday::Monday => "mon",
        Weekday::Tuesday => "tue",
        Weekday::Wednesday => "wed",
        Weekday::Thursday => "thu",
        Weekday::Friday => "fri",
        Weekday::Saturday => "sat",
        Weekday::Sunday => "sun",
    }
}

/// Whether `now` is inside one of the windows (no window: always). Windows were validated when
/// the rollout was created; one that does not parse any more is never open.
pub fn open(windows: &[MaintenanceWindow], now: jiff::Timestamp) -> bool {
    windows.is_empty() || windows.iter().any(|w| inside(w, now))
}

fn inside(w: &MaintenanceWindow, now: jiff::Timestamp) -> bool {
    let tz = if w.time_zone.is_empty() { Ok(jiff::tz::TimeZone::UTC) } else { jiff::tz::TimeZone::get(&w.time_zone) };
    let (Ok(tz), Ok(start), Ok(end)) = (tz, minutes(&w.start), minutes(&w.end)) else { return false };
    let local = now.to_zoned(tz);
    let at = local.hour() as u32 * 60 + local.minute() as u32;
    let today = local.weekday();
    let on = |d: Weekday| w.days.is_empty() || w.days.iter().any(|x| x == day_name(d));
    if start < end {
        on(today) && start <= at && at < end
    } else {
        // Spans midnight: the evening of a listed day, or the morning after one.
        (on(today) && at >= start) || (on(today.previous()) && at < end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(days: &[&str], start: &str, end: &str, tz: &str) -> MaintenanceWindow {
        MaintenanceWindow {
            days: days.iter().map(|d| d.to_string()).collect(),
            start: start.into(),
            end: end.into(),
            time_zone: tz.into(),
        }
    }

    fn at(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn windows_are_local_to_their_time_zone_and_may_span_midnight() {
        // Saturday 2026-12-05.
        let w = window(&["sat"], "22:00", "04:00", "Europe/Berlin");
        assert!(open(std::slice::from_ref(&w), at("2026-12-05T21:30:00Z")), "22:30 in Berlin on Saturday");
        assert!(open(std::slice::from_ref(&w), at("2026-12-06T02:59:00Z")), "03:59 on Sunday morning, after Saturday");
        assert!(!open(std::slice::from_ref(&w), at("2026-12-06T03:00:00Z")), "04:00 ends it");
        assert!(!open(std::slice::from_ref(&w), at("2026-12-05T20:59:00Z")), "21:59 in Berlin is before it");
        assert!(!open(&[w], at("2026-12-06T21:30:00Z")), "Sunday evening is not listed");
        let weekdays = window(&["mon", "tue", "wed", "thu", "fri"], "09:00", "17:00", "");
        assert!(open(std::slice::from_ref(&weekdays), at("2026-12-01T09:00:00Z")), "Tuesday 09:00 UTC");
        assert!(!open(&[weekdays], at("2026-12-05T10:00:00Z")), "Saturday");
        assert!(open(&[], at("2026-12-05T10:00:00Z")), "no window: always");
    }
}
