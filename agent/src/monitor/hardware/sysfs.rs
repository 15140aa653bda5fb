//! Devices seen in /sys: EDAC memory controllers, CPU thermal throttling, NIC carriers.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nodekeeper_proto::v1::{Category, RecommendedAction, Severity};

use super::{Check, SOURCE, def, entries, name_of, read_trim, read_u64, status};
use crate::monitor::rules::ConditionDef;
use crate::monitor::{Class, Finding};

pub struct Edac {
    sys: PathBuf,
    last_ce: Option<u64>,
}

impl Edac {
    pub fn new(sys: &Path) -> Edac {
        Edac { sys: sys.to_owned(), last_ce: None }
    }
}

const EDAC_UE: &str = "EdacUncorrectableErrors";

impl Check for Edac {
    fn name(&self) -> &'static str {
        "edac"
    }

    fn conditions(&self) -> Vec<ConditionDef> {
        vec![def(EDAC_UE, "NoEdacUncorrectableErrors", "memory controllers report no uncorrectable errors")]
    }

    fn check(&mut self) -> Vec<Finding> {
        let mcs = entries(&self.sys.join("devices/system/edac/mc"), "mc");
        if mcs.is_empty() {
            return Vec::new();
        }
        let (mut ce, mut ue) = (0u64, 0u64);
        let mut ue_where = Vec::new();
        for mc in &mcs {
            ce += read_u64(&mc.join("ce_count")).unwrap_or(0);
            let n = read_u64(&mc.join("ue_count")).unwrap_or(0);
            if n > 0 {
                ue_where.push(format!("{}: {n}", name_of(mc)));
            }
            ue += n;
        }
        let mut out = Vec::new();
        if let Some(last) = self.last_ce
            && ce > last
        {
            out.push(
                Finding::temporary(
                    SOURCE,
                    "CorrectableMemoryErrors",
                    format!("{} new correctable memory errors ({ce} since boot)", ce - last),
                    Class::new(Severity::Warning, Category::Hardware, RecommendedAction::None),
                )
                .with("new", ce - last)
                .with("total", ce),
            );
        }
        self.last_ce = Some(ce);
        let d = &self.conditions()[0];
        let class = Class::new(Severity::Critical, Category::Hardware, RecommendedAction::HardwareRepair);
        let problem = (ue > 0)
            .then(|| ("EdacUncorrectableErrors", format!("uncorrectable memory errors: {}", ue_where.join(", "))));
        out.push(status(d, problem, class));
        out
    }
}

// --- thermal throttling ------------------------------------------------------------------------

pub struct Thermal {
    sys: PathBuf,
    last: Option<u64>,
}

impl Thermal {
    pub fn new(sys: &Path) -> Thermal {
        Thermal { sys: sys.to_owned(), last: None }
    }
}

impl Check for Thermal {
    fn name(&self) -> &'static str {
        "thermal"
    }

    fn conditions(&self) -> Vec<ConditionDef> {
        Vec::new()
    }

    fn check(&mut self) -> Vec<Finding> {
        let mut total = 0u64;
        let mut cpus = 0;
        for cpu in entries(&self.sys.join("devices/system/cpu"), "cpu") {
            let t = cpu.join("thermal_throttle");
            if !t.is_dir() {
                continue;
            }
            cpus += 1;
            total += read_u64(&t.join("core_throttle_count")).unwrap_or(0);
            total += read_u64(&t.join("package_throttle_count")).unwrap_or(0);
        }
        if cpus == 0 {
            return Vec::new();
        }
        let mut out = Vec::new();
        if let Some(last) = self.last
            && total > last
        {
            out.push(
                Finding::temporary(
                    SOURCE,
                    "CPUThermalThrottling",
                    format!("CPUs were thermally throttled {} times since the last check", total - last),
                    Class::new(Severity::Warning, Category::Hardware, RecommendedAction::None),
                )
                .with("events", total - last),
            );
        }
        self.last = Some(total);
        out
    }
}

// --- network interfaces --------------------------------------------------------------------------

pub struct Nics {
    sys: PathBuf,
    /// Interfaces to watch; empty: every physical one (those with a `device` link).
    interfaces: Vec<String>,
    flap_threshold: u64,
    flap_window: Duration,
    last: HashMap<String, u64>,
    changes: VecDeque<(Instant, String, u64)>,
}

impl Nics {
    pub fn new(sys: &Path, interfaces: Vec<String>, flap_threshold: u64, flap_window: Duration) -> Nics {
        Nics {
            sys: sys.to_owned(),
            interfaces,
            flap_threshold,
            flap_window,
            last: HashMap::new(),
            changes: VecDeque::new(),
        }
    }
}

impl Check for Nics {
    fn name(&self) -> &'static str {
        "nic"
    }

    fn conditions(&self) -> Vec<ConditionDef> {
        vec![
            def("NICLinkDown", "NICLinksUp", "every watched network interface has a link"),
            def("NICLinkFlapping", "NICLinksStable", "network links are stable"),
        ]
    }

    fn check(&mut self) -> Vec<Finding> {
        let net = self.sys.join("class/net");
        let ifaces: Vec<PathBuf> = if self.interfaces.is_empty() {
            entries(&net, "").into_iter().filter(|p| p.join("device").exists()).collect()
        } else {
            self.interfaces.iter().map(|i| net.join(i)).filter(|p| p.exists()).collect()
        };
        if ifaces.is_empty() {
            return Vec::new();
        }
        let now = Instant::now();
        let mut down = Vec::new();
        for p in &ifaces {
            let name = name_of(p);
            let flags =
                read_trim(&p.join("flags")).and_then(|f| u64::from_str_radix(f.trim_start_matches("0x"), 16).ok());
            let admin_up = flags.is_none_or(|f| f & 1 == 1);
            // Reading carrier of an interface that is administratively down fails: not a fault.
            if admin_up && read_trim(&p.join("carrier")).as_deref() == Some("0") {
                down.push(name.clone());
            }
            if let Some(c) = read_u64(&p.join("carrier_changes"))
                && let Some(prev) = self.last.insert(name.clone(), c)
                && c > prev
            {
                self.changes.push_back((now, name, c - prev));
            }
        }
        while self.changes.front().is_some_and(|(t, _, _)| now.duration_since(*t) > self.flap_window) {
            self.changes.pop_front();
        }
        let mut flaps: HashMap<&str, u64> = HashMap::new();
        for (_, name, n) in &self.changes {
            *flaps.entry(name).or_default() += n;
        }
        let mut flapping: Vec<String> = flaps
            .iter()
            .filter(|(_, n)| **n >= self.flap_threshold)
            .map(|(k, n)| format!("{k} ({n} changes)"))
            .collect();
        flapping.sort();
        let defs = self.conditions();
        let class = Class::new(Severity::Error, Category::Network, RecommendedAction::Manual);
        vec![
            status(
                &defs[0],
                (!down.is_empty()).then(|| ("NICLinkDown", format!("no carrier on {}", down.join(", ")))),
                class,
            ),
            status(
                &defs[1],
                (!flapping.is_empty()).then(|| {
                    (
                        "NICLinkFlapping",
                        format!(
                            "link flapping within {}: {}",
                            humantime::format_duration(self.flap_window),
                            flapping.join(", ")
                        ),
                    )
                }),
                class,
            ),
        ]
    }
}
