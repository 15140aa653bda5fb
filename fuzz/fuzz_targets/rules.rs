//! Any text as a monitor rule file (node-problem-detector JSON and nodekeeper TOML) and as a
//! component spec file; a rule file that loads replays the same text as a kernel log and as a
//! plain log, which drives the kmsg parser and the matcher. Must never panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use nodekeeper_agent::components::spec;
use nodekeeper_agent::monitor::logs::{Format, replay};
use nodekeeper_agent::monitor::rules::{self, MonitorSpec};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for name in ["fuzz.json", "fuzz.toml"] {
        match rules::parse(Path::new(name), text) {
            Ok(MonitorSpec::Log(l)) => {
                for format in [Format::Kmsg, Format::Plain, Format::JournalJson] {
                    drop(replay(std::slice::from_ref(&l), text, format));
                }
            }
            Ok(MonitorSpec::Plugin(_)) => {}
            Err(e) => drop(e.to_string()),
        }
    }
    if let Ok(specs) = spec::parse(Path::new("spec.toml"), text) {
        for s in &specs {
            drop(spec::validate(s, &[std::path::PathBuf::from("/etc")]));
        }
    }
    // The built-in rules on arbitrary log text.
    let kernel = rules::default_kernel_monitor(Path::new("/dev/kmsg"));
    drop(replay(std::slice::from_ref(&kernel), text, Format::detect(text)));
});
