//! Cursors come from clients as strings.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(c) = nodekeeper_eventcenter::cursor::parse(s)
    {
        assert_eq!(nodekeeper_eventcenter::cursor::parse(&nodekeeper_eventcenter::cursor::format(c)).ok(), Some(c));
    }
});
