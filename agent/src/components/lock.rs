//! The version lock: the packages of the node's components listed in dnf's main `excludepkgs`
//! (the target root's `/etc/dnf/dnf.conf`), so that a plain `dnf upgrade` (or `install`) on the
//! node leaves them where the agent put them. The agent's own transactions lift it for
//! themselves (`--setopt=excludepkgs=` with everyone else's entries only).
//!
//! The agent owns the entries of the packages it manages; everything else in the file, the
//! operator's own excludes included, is kept as it was. Which entries are the agent's is recorded
//! in its state (`locked.json`), so a package whose component leaves the spec is unlocked again.
//! dnf hides excluded packages from everything, removal included: an operator who must act on
//! one by hand runs dnf with `--disableexcludes=main`.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use super::files::write_atomic;

pub struct VersionLock {
    /// dnf's main configuration in the target root.
    conf: PathBuf,
    /// The configuration dnf reads while the root has none of its own (the host's, for an
    /// installroot): the root's is written from it, so that dnf's settings stay as they were.
    fallback: Option<PathBuf>,
    /// The packages whose entries are the agent's.
    record: PathBuf,
}

/// The lines of a dnf.conf and where the `[main]` section's excludes are.
struct Conf {
    lines: Vec<String>,
    /// The index of the `[main]` header line.
    main: Option<usize>,
    /// Indices of the exclude lines of `[main]` (with their continuation lines).
    exclude_lines: Vec<usize>,
    /// Every package pattern they name, in order.
    excluded: Vec<String>,
}

impl Conf {
    fn parse(text: &str) -> Conf {
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let (mut main, mut in_main, mut in_exclude) = (None, false, false);
        let (mut exclude_lines, mut excluded) = (Vec::new(), Vec::new());
        let mut add = |v: &str| excluded.extend(v.split([',', ' ', '\t']).filter(|p| !p.is_empty()).map(str::to_owned));
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim();
            if t.starts_with('[') {
                in_main = t == "[main]";
                if in_main && main.is_none() {
                    main = Some(i);
                }
                in_exclude = false;
                continue;
            }
            if !in_main {
                continue;
            }
            // An indented line continues the value above it.
            if in_exclude && line.starts_with([' ', '\t']) && !t.is_empty() {
                exclude_lines.push(i);
                add(t);
                continue;
            }
            in_exclude = false;
            if let Some((key, value)) = t.split_once('=')
                && matches!(key.trim(), "excludepkgs" | "exclude")
            {
                exclude_lines.push(i);
                add(value);
                in_exclude = true;
            }
        }
        Conf { lines, main, exclude_lines, excluded }
    }

    /// The text with `[main]`'s excludes replaced by one `excludepkgs` line of `excluded`.
    fn with_excludes(&self, excluded: &[String]) -> String {
        let line = (!excluded.is_empty()).then(|| format!("excludepkgs={}", excluded.join(",")));
        let mut out: Vec<String> = Vec::new();
        for (i, l) in self.lines.iter().enumerate() {
            if self.exclude_lines.contains(&i) {
                continue;
            }
            out.push(l.clone());
            if Some(i) == self.main
                && let Some(line) = &line
            {
                out.push(line.clone());
            }
        }
        if let (None, Some(line)) = (self.main, &line) {
            if out.last().is_some_and(|l| !l.trim().is_empty()) {
                out.push(String::new());
            }
            out.push("[main]".into());
            out.push(line.clone());
        }
        let mut text = out.join("\n");
        text.push('\n');
        text
    }
}

/// The text and mode of the first of `paths` that exists (dnf reads the root's configuration,
/// else the host's).
pub(super) fn read_first<'a>(paths: impl IntoIterator<Item = &'a PathBuf>) -> Result<Option<(String, u32)>, String> {
    for path in paths {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let mode = std::fs::metadata(path).map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o644);
                return Ok(Some((text, mode)));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        }
    }
    Ok(None)
}

impl VersionLock {
    pub fn new(conf: PathBuf, fallback: Option<PathBuf>, record: PathBuf) -> VersionLock {
        VersionLock { conf, fallback, record }
    }

    fn read_conf(&self) -> Result<(Conf, u32), String> {
        let found = read_first(std::iter::once(&self.conf).chain(&self.fallback))?;
        let (text, mode) = found.unwrap_or_else(|| (String::new(), 0o644));
        Ok((Conf::parse(&text), mode))
    }

    fn ours(&self) -> BTreeSet<String> {
        std::fs::read(&self.record).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    fn save_ours(&self, ours: &BTreeSet<String>) -> Result<(), String> {
        write_atomic(&self.record, &serde_json::to_vec(ours).expect("serializable"), 0o600, (None, None))
    }

    /// Makes the agent's entries exactly `packages`; true when the file changed.
    pub fn set(&self, packages: &BTreeSet<String>) -> Result<bool, String> {
        let before = self.ours();
        if before == *packages && !self.conf.exists() && packages.is_empty() {
            return Ok(false);
        }
        let (conf, mode) = self.read_conf()?;
        let others: Vec<String> =
            conf.excluded.iter().filter(|p| !before.contains(*p) && !packages.contains(*p)).cloned().collect();
        let mut wanted = others.clone();
        wanted.extend(packages.iter().cloned());
        let unchanged = wanted.iter().collect::<BTreeSet<_>>() == conf.excluded.iter().collect::<BTreeSet<_>>()
            && conf.exclude_lines.len() <= 1;
        if unchanged {
            if before != *packages {
                self.save_ours(packages)?;
            }
            return Ok(false);
        }
        // What may be the agent's in the file at any moment is in the record first.
        self.save_ours(&before.union(packages).cloned().collect())?;
        write_atomic(&self.conf, conf.with_excludes(&wanted).as_bytes(), mode, (None, None))?;
        self.save_ours(packages)?;
        Ok(true)
    }

    /// The excludes that are not the agent's, for its own transactions (None: there are no
    /// excludes at all, nothing to lift).
    pub fn others_excluded(&self) -> Option<Vec<String>> {
        let (conf, _) = self.read_conf().ok()?;
        if conf.excluded.is_empty() {
            return None;
        }
        let ours = self.ours();
        Some(conf.excluded.into_iter().filter(|p| !ours.contains(p)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(packages: &[&str]) -> BTreeSet<String> {
        packages.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn the_agents_entries_join_and_leave_the_operators() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("dnf.conf");
        std::fs::write(
            &conf,
            "# node's dnf\n[main]\ngpgcheck=1\nexclude=kernel* ,foo\n  bar\nbest=False\n[other]\nexclude=x\n",
        )
        .unwrap();
        let lock = VersionLock::new(conf.clone(), None, dir.path().join("locked.json"));
        assert!(lock.set(&set(&["kubelet", "kubeadm"])).unwrap());
        let text = std::fs::read_to_string(&conf).unwrap();
        assert_eq!(
            text,
            "# node's dnf\n[main]\nexcludepkgs=kernel*,foo,bar,kubeadm,kubelet\ngpgcheck=1\nbest=False\n[other]\nexclude=x\n"
        );
        assert_eq!(lock.others_excluded().unwrap(), ["kernel*", "foo", "bar"]);
        assert!(!lock.set(&set(&["kubelet", "kubeadm"])).unwrap(), "unchanged: not written again");
        assert!(lock.set(&set(&["kubelet"])).unwrap());
        assert!(std::fs::read_to_string(&conf).unwrap().contains("excludepkgs=kernel*,foo,bar,kubelet\n"));
        assert!(lock.set(&set(&[])).unwrap());
        assert!(std::fs::read_to_string(&conf).unwrap().contains("excludepkgs=kernel*,foo,bar\n"));
    }

    #[test]
    fn a_root_without_a_config_gets_the_one_dnf_read_before() {
        let dir = tempfile::tempdir().unwrap();
        let (conf, host) = (dir.path().join("root/etc/dnf/dnf.conf"), dir.path().join("host.conf"));
        std::fs::write(&host, "[main]\nbest=False\n").unwrap();
        let lock = VersionLock::new(conf.clone(), Some(host), dir.path().join("locked.json"));
        assert!(lock.set(&set(&["containerd"])).unwrap());
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), "[main]\nexcludepkgs=containerd\nbest=False\n");
    }

    #[test]
    fn a_config_without_a_main_section_gets_one() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("etc/dnf/dnf.conf");
        let lock = VersionLock::new(conf.clone(), None, dir.path().join("locked.json"));
        assert!(!lock.set(&set(&[])).unwrap(), "nothing to lock: no file written");
        assert!(!conf.exists());
        assert!(lock.set(&set(&["containerd"])).unwrap());
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), "[main]\nexcludepkgs=containerd\n");
        assert_eq!(lock.others_excluded().unwrap(), Vec::<String>::new());
        lock.set(&set(&[])).unwrap();
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), "[main]\n");
        assert_eq!(lock.others_excluded(), None);
    }
}
