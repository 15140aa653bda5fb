//! Conversions between `SystemTime` and protobuf timestamps and durations.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub fn to_timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

pub fn now_timestamp() -> prost_types::Timestamp {
    to_timestamp(SystemTime::now())
}

/// Milliseconds since the Unix epoch; 0 for times before it.
pub fn to_unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).unwrap_or(0)
}

pub fn timestamp_from_unix_ms(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

pub fn timestamp_to_unix_ms(ts: &prost_types::Timestamp) -> i64 {
    ts.seconds.saturating_mul(1000).saturating_add(i64::from(ts.nanos / 1_000_000))
}

/// A timestamp as Kubernetes and Alertmanager write times: RFC 3339 in UTC, whole seconds.
pub fn rfc3339(ts: &prost_types::Timestamp) -> String {
    let ms = timestamp_to_unix_ms(ts).max(0) as u64;
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

pub fn to_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A protobuf duration as a `Duration`; `None` when unset, negative or zero.
pub fn from_duration(d: Option<&prost_types::Duration>) -> Option<Duration> {
    let d = d?;
    if d.seconds < 0 || d.nanos < 0 || (d.seconds == 0 && d.nanos == 0) {
        return None;
    }
    Some(Duration::new(d.seconds as u64, d.nanos as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_ms_round_trip() {
        for ms in [0_i64, 1, 999, 1_700_000_000_123, -1500] {
            assert_eq!(timestamp_to_unix_ms(&timestamp_from_unix_ms(ms)), ms);
        }
    }

    #[test]
    fn durations() {
        let d = Duration::from_millis(1500);
        assert_eq!(from_duration(Some(&to_duration(d))), Some(d));
        assert_eq!(from_duration(Some(&prost_types::Duration { seconds: -1, nanos: 0 })), None);
        assert_eq!(from_duration(None), None);
    }
}
