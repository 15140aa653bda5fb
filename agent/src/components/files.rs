//! The component's config files: written atomically with their owner from the target root,
//! compared with the spec (drift), backed up before a change and restored by a rollback.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nodekeeper_proto::v1::ComponentSpec;
use serde::{Deserialize, Serialize};

use super::Manager;

/// A config file as it was before a change (kept in the journal).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Backup {
    pub(super) path: String,
    /// None: the file did not exist.
    content: Option<Vec<u8>>,
    mode: u32,
    /// The file's owner and group (journals of older agents have none: left as written).
    #[serde(default)]
    uid: Option<u32>,
    #[serde(default)]
    gid: Option<u32>,
}

fn io(what: &str, p: &Path, e: std::io::Error) -> String {
    format!("{what} {}: {e}", p.display())
}

/// Writes a file atomically: a temporary file in the same directory, fsynced, then renamed;
/// with `ids`, owned by that user and group.
pub(crate) fn write_atomic(
    path: &Path,
    content: &[u8],
    mode: u32,
    ids: (Option<u32>, Option<u32>),
) -> Result<(), String> {
    use std::io::Write;
    let dir = path.parent().ok_or_else(|| format!("{} has no directory", path.display()))?;
    std::fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
    let tmp = dir.join(format!(".{}.nodekeeper-tmp", path.file_name().unwrap_or_default().to_string_lossy()));
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("creating", &tmp, e))?;
    f.write_all(content).map_err(|e| io("writing", &tmp, e))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(|e| io("setting the mode of", &tmp, e))?;
    if let (None, None) = ids {
    } else {
        let (uid, gid) = (ids.0.map(nix::unistd::Uid::from_raw), ids.1.map(nix::unistd::Gid::from_raw));
        nix::unistd::chown(&tmp, uid, gid).map_err(|e| format!("chown {}: {e}", tmp.display()))?;
    }
    f.sync_all().map_err(|e| io("syncing", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("renaming onto", path, e))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io("syncing", dir, e))
}

impl Manager {
    /// Config files of `spec` whose content, mode or owner differ from the spec.
    pub(super) fn drift(&self, spec: &ComponentSpec) -> Vec<String> {
        let mut out = Vec::new();
        for f in &spec.config_files {
            let p = self.tools.path(Path::new(&f.path));
            let same = match (std::fs::read(&p), std::fs::metadata(&p)) {
                (Ok(content), Ok(meta)) => {
                    use std::os::unix::fs::MetadataExt;
                    let (uid, gid) = self.accounts.ids(&f.owner, &f.group).unwrap_or((None, None));
                    content == f.content
                        && meta.permissions().mode() & 0o7777 == f.mode
                        && uid.is_none_or(|u| meta.uid() == u)
                        && gid.is_none_or(|g| meta.gid() == g)
                }
                _ => false,
            };
            if !same {
                out.push(f.path.clone());
            }
        }
        out
    }

    pub(super) fn backups(&self, spec: &ComponentSpec) -> Vec<Backup> {
        spec.config_files
            .iter()
            .map(|f| {
                use std::os::unix::fs::MetadataExt;
                let p = self.tools.path(Path::new(&f.path));
                let meta = std::fs::metadata(&p).ok();
                Backup {
                    path: f.path.clone(),
                    content: std::fs::read(&p).ok(),
                    mode: meta.as_ref().map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o644),
                    uid: meta.as_ref().map(|m| m.uid()),
                    gid: meta.as_ref().map(|m| m.gid()),
                }
            })
            .collect()
    }

    pub(super) fn write_configs(&self, spec: &ComponentSpec) -> Result<(), String> {
        for f in &spec.config_files {
            let ids = self.accounts.ids(&f.owner, &f.group)?;
            write_atomic(&self.tools.path(Path::new(&f.path)), &f.content, f.mode, ids)?;
        }
        Ok(())
    }

    pub(super) fn restore(&self, backups: &[Backup]) -> Result<(), String> {
        for b in backups {
            let p = self.tools.path(Path::new(&b.path));
            match &b.content {
                Some(c) => write_atomic(&p, c, b.mode, (b.uid, b.gid))?,
                None => match std::fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io("removing", &p, e)),
                },
            }
        }
        Ok(())
    }
}
