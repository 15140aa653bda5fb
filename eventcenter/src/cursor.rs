//! Cursors on the wire are opaque strings. Today they are the decimal commit position; clients
//! must not rely on that.

use tonic::Status;

/// Parses a cursor a client sent; empty means "none" (position 0).
pub fn parse(s: &str) -> Result<u64, Status> {
    if s.is_empty() {
        return Ok(0);
    }
    if s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Status::invalid_argument(format!("malformed cursor {:?}", truncate(s))));
    }
    s.parse().map_err(|_| Status::invalid_argument(format!("malformed cursor {:?}", truncate(s))))
}

pub fn format(c: u64) -> String {
    c.to_string()
}

fn truncate(s: &str) -> &str {
    let mut end = s.len().min(40);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The error for resuming after a cursor whose successors were removed by retention.
pub fn expired(after: u64, floor: u64) -> Status {
    Status::failed_precondition(format!(
        "cursor expired: events after cursor {after} up to {floor} were removed by retention; \
         resume from the oldest retained event (start=OLDEST) and reconcile"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert_eq!(parse("").unwrap(), 0);
        assert_eq!(parse("42").unwrap(), 42);
        for bad in ["-1", "abc", "1e3", "99999999999999999999999"] {
            assert_eq!(parse(bad).unwrap_err().code(), tonic::Code::InvalidArgument, "{bad}");
        }
    }
}
