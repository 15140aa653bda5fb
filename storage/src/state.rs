//! A target's memory on disk: one JSON file per target, replaced atomically.

use std::path::{Path, PathBuf};

use crate::plan::Memory;

fn path(dir: &Path, target: &str) -> PathBuf {
    dir.join(format!("{target}.json"))
}

/// The target's memory, empty when it has none yet.
pub fn load(dir: &Path, target: &str) -> anyhow::Result<Memory> {
    let p = path(dir, target);
    match std::fs::read(&p) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            anyhow::anyhow!("{}: not a storage syncer's state: {e} (move it away to start afresh)", p.display())
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Memory::default()),
        Err(e) => Err(anyhow::anyhow!("{}: {e}", p.display())),
    }
}

pub fn save(dir: &Path, target: &str, memory: &Memory) -> Result<(), String> {
    let p = path(dir, target);
    let tmp = p.with_extension("json.tmp");
    let bytes = serde_json::to_vec(memory).map_err(|e| e.to_string())?;
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &p)
    };
    write().map_err(|e| format!("cannot save {}: {e}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Seen;

    #[test]
    fn memory_survives_a_restart_and_a_broken_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path(), "t").unwrap(), Memory::default());
        let mut m = Memory::default();
        m.entries.insert("iqn.2026-12.io.x:a".into(), Seen { node: "a".into(), last_wanted_ms: 7 });
        save(dir.path(), "t", &m).unwrap();
        assert_eq!(load(dir.path(), "t").unwrap(), m);
        std::fs::write(dir.path().join("u.json"), "{").unwrap();
        let e = load(dir.path(), "u").unwrap_err().to_string();
        assert!(e.contains("u.json") && e.contains("not a storage syncer's state"), "{e}");
    }
}
