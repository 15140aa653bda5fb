//! RPM package names and versions: validated before they go anywhere near a command line, and
//! ordered as rpm orders them (`rpm-version`, proven equal to `rpm.vercmp` by a differential test).

use std::cmp::Ordering;
use std::fmt;

/// An exact package version: epoch, version and release (`E:V-R`; the epoch may be omitted and
/// then is 0).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Evr {
    pub epoch: u64,
    pub version: String,
    pub release: String,
}

impl Evr {
    /// Parses `[E:]V-R` (validated by `nodekeeper_common::names::evr`).
    pub fn parse(s: &str) -> Result<Evr, String> {
        nodekeeper_common::names::evr(s).map_err(|e| e.to_string())?;
        let (epoch, rest) = match s.split_once(':') {
            Some((e, rest)) => {
                (e.parse::<u64>().map_err(|_| format!("invalid version {s:?}: epoch out of range"))?, rest)
            }
            None => (0, s),
        };
        let (version, release) = rest.rsplit_once('-').expect("validated");
        Ok(Evr { epoch, version: version.to_owned(), release: release.to_owned() })
    }

    /// The form dnf takes after a package name: `name-[E:]V-R`.
    pub fn nevr(&self, name: &str) -> String {
        if self.epoch == 0 {
            format!("{name}-{}-{}", self.version, self.release)
        } else {
            format!("{name}-{}:{}-{}", self.epoch, self.version, self.release)
        }
    }
}

impl fmt::Display for Evr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}-{}", self.epoch, self.version, self.release)
    }
}

impl Ord for Evr {
    fn cmp(&self, other: &Evr) -> Ordering {
        let e1 = self.epoch.to_string();
        let e2 = other.epoch.to_string();
        rpm_version::Evr::new(e1.as_str(), &self.version, &self.release).cmp(&rpm_version::Evr::new(
            e2.as_str(),
            &other.version,
            &other.release,
        ))
    }
}

impl PartialOrd for Evr {
    fn partial_cmp(&self, other: &Evr) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// rpm's comparison of two version strings (`rpmvercmp`), as `rpm.vercmp` does for `V` alone.
pub fn vercmp(a: &str, b: &str) -> Ordering {
    rpm_version::rpm_evr_compare(a, b)
}

/// An RPM package name (`nodekeeper_common::names::package`).
pub fn package_name(s: &str) -> Result<(), String> {
    nodekeeper_common::names::package(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_order() {
        let a = Evr::parse("1.0-1").unwrap();
        assert_eq!(a.to_string(), "0:1.0-1");
        assert_eq!(a.nevr("kubelet"), "kubelet-1.0-1");
        let b = Evr::parse("2:0.9-1.el9").unwrap();
        assert_eq!(b.nevr("kubelet"), "kubelet-2:0.9-1.el9");
        assert!(b > a, "the epoch wins");
        assert!(Evr::parse("1.0~rc1-1").unwrap() < a);
        assert!(Evr::parse("1.0^git1-1").unwrap() > a);
    }

    #[test]
    fn bad_versions_and_names_are_rejected() {
        for bad in ["1.0", "x:1.0-1", "1.0-1;rm -rf /", "1.0 -1", "-1", "1.0-", "$(id)-1"] {
            assert!(Evr::parse(bad).is_err(), "{bad:?}");
        }
        for bad in ["", "-rf", "a b", "pkg;reboot", "pkg$(id)", "../x"] {
            assert!(package_name(bad).is_err(), "{bad:?}");
        }
        package_name("containerd.io").unwrap();
        package_name("kubelet").unwrap();
    }
}
