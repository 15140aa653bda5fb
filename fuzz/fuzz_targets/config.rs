//! Any text as a config file of the event center and of the agent: parsed, located errors
//! rendered, validated. Must never panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("fuzz.toml");
    match nodekeeper_common::config::parse::<nodekeeper_eventcenter::config::Config>(path, text) {
        Ok(c) => drop(c.validate()),
        Err(e) => drop(e.to_string()),
    }
    match nodekeeper_common::config::parse::<nodekeeper_agent::config::Config>(path, text) {
        Ok(c) => drop(c.validate()),
        Err(e) => drop(e.to_string()),
    }
});
