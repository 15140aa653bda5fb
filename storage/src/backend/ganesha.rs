//! nfs-ganesha: the clients of one export, kept between two marker lines inside its EXPORT block
//! of ganesha's config (as Ansible's blockinfile marks what it owns), then ganesha told to reload
//! its exports (SIGHUP). Only what lies between the markers is ours; a list edited there by hand
//! is read back as the target's list and repaired like any other.
//!
//! ```text
//! EXPORT {
//!     Export_Id = 1; Path = /srv/vol1; Pseudo = /vol1; Access_Type = None; FSAL { Name = VFS; }
//!     # BEGIN nodekeeper-storage vol1
//!     # END nodekeeper-storage vol1
//! }
//! ```

use std::collections::BTreeSet;
use std::path::PathBuf;

pub struct Ganesha {
    /// The target's name, in the markers.
    pub name: String,
    pub config: PathBuf,
    pub pid_file: PathBuf,
    /// The clients' access (`RW` or `RO`).
    pub access_type: String,
}

impl Ganesha {
    fn markers(&self) -> (String, String) {
        (format!("# BEGIN nodekeeper-storage {}", self.name), format!("# END nodekeeper-storage {}", self.name))
    }

    /// The config, and the byte range of what lies between the markers.
    fn read(&self) -> Result<(String, std::ops::Range<usize>), String> {
        let text = std::fs::read_to_string(&self.config).map_err(|e| format!("{}: {e}", self.config.display()))?;
        let (begin, end) = self.markers();
        let missing = || {
            format!(
                "{}: no lines \"{begin}\" and \"{end}\" (in this order) inside the export's EXPORT block",
                self.config.display()
            )
        };
        let b = text.find(&begin).ok_or_else(missing)?;
        let start = text[b..].find('\n').map(|i| b + i + 1).ok_or_else(missing)?;
        let e = text[start..].find(&end).map(|i| start + i).ok_or_else(missing)?;
        // The END marker's own indentation stays where it is.
        let e = text[..e].rfind('\n').map_or(e, |i| i + 1).max(start);
        Ok((text, start..e))
    }

    pub fn list(&self) -> Result<BTreeSet<String>, String> {
        let (text, range) = self.read()?;
        Ok(clients(&text[range]))
    }

    /// Writes `entries` between the markers (the file replaced atomically) and has ganesha reload.
    pub fn write(&self, entries: &BTreeSet<String>) -> Result<(), String> {
        let (text, range) = self.read()?;
        let mut block = String::new();
        if !entries.is_empty() {
            let list: Vec<&str> = entries.iter().map(String::as_str).collect();
            block = format!(
                "    # Written by nodekeeper-storage: edits here are undone.\n    CLIENT {{\n        Clients = {};\n        Access_Type = {};\n    }}\n",
                list.join(", "),
                self.access_type
            );
        }
        let new = format!("{}{block}{}", &text[..range.start], &text[range.end..]);
        let tmp = self.config.with_extension("nodekeeper.tmp");
        std::fs::write(&tmp, new)
            .and_then(|()| std::fs::rename(&tmp, &self.config))
            .map_err(|e| format!("cannot write {}: {e}", self.config.display()))?;
        self.reload()
    }

    fn reload(&self) -> Result<(), String> {
        let pid = std::fs::read_to_string(&self.pid_file)
            .map_err(|e| format!("ganesha's pid file {}: {e}", self.pid_file.display()))?;
        let pid: i32 =
            pid.trim().parse().map_err(|_| format!("ganesha's pid file {} holds no pid", self.pid_file.display()))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGHUP)
            .map_err(|e| format!("cannot signal ganesha (pid {pid}) to reload: {e}"))
    }
}

/// Every client of the `Clients = a, b;` lines of a config fragment.
fn clients(block: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in block.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.split_once('=') else { continue };
        if key.trim().eq_ignore_ascii_case("clients") {
            let value = value.trim().trim_end_matches(';');
            out.extend(value.split(',').map(|c| c.trim().trim_matches('"').to_owned()).filter(|c| !c.is_empty()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "EXPORT {\n    Export_Id = 1;\n    # BEGIN nodekeeper-storage vol\n    CLIENT {\n        Clients = 10.0.0.1, \"10.0.0.2\";\n        Access_Type = RW;\n    }\n    # END nodekeeper-storage vol\n    CLIENT { Clients = 10.9.9.9; }\n}\n";

    fn ganesha(dir: &std::path::Path) -> Ganesha {
        Ganesha {
            name: "vol".into(),
            config: dir.join("ganesha.conf"),
            pid_file: dir.join("none.pid"),
            access_type: "RW".into(),
        }
    }

    #[test]
    fn only_the_clients_between_the_markers_are_ours_and_rewriting_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let g = ganesha(dir.path());
        std::fs::write(&g.config, CONFIG).unwrap();
        assert_eq!(g.list().unwrap().into_iter().collect::<Vec<_>>(), ["10.0.0.1", "10.0.0.2"]);
        // No ganesha to signal: the file is written, the reload's failure said.
        let e = g.write(&["10.0.0.3".to_owned()].into()).unwrap_err();
        assert!(e.contains("none.pid"), "{e}");
        let text = std::fs::read_to_string(&g.config).unwrap();
        assert!(text.contains("Clients = 10.0.0.3;") && text.contains("Clients = 10.9.9.9;"), "{text}");
        assert!(text.contains("    # END nodekeeper-storage vol\n    CLIENT"), "{text}");
        assert_eq!(g.list().unwrap().into_iter().collect::<Vec<_>>(), ["10.0.0.3"]);
        let _ = g.write(&BTreeSet::new());
        assert!(g.list().unwrap().is_empty());
        assert!(std::fs::read_to_string(&g.config).unwrap().contains("Clients = 10.9.9.9;"));
    }

    #[test]
    fn missing_markers_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let g = ganesha(dir.path());
        std::fs::write(&g.config, "EXPORT { Export_Id = 1; }\n").unwrap();
        let e = g.list().unwrap_err();
        assert!(e.contains("# BEGIN nodekeeper-storage vol") && e.contains("ganesha.conf"), "{e}");
    }
}
