//! Users and groups as the target root knows them: config files are owned by the accounts of the
//! system they are written to. For `/` that is the name service (so LDAP or SSSD accounts
//! resolve); for an installroot it is that root's `/etc/passwd` and `/etc/group`, as rpm itself
//! resolves the owners of the files it installs there.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default)]
pub struct Accounts {
    /// None: this system (`/`).
    root: Option<PathBuf>,
}

impl Accounts {
    pub fn new(root: Option<&Path>) -> Accounts {
        Accounts { root: root.map(Path::to_owned) }
    }

    /// Where the accounts are looked up, for messages.
    pub fn source(&self, what: &str) -> String {
        match &self.root {
            None => "on this system".into(),
            Some(r) => format!("in {}", r.join("etc").join(what).display()),
        }
    }

    pub fn uid(&self, user: &str) -> Option<u32> {
        match &self.root {
            None => nix::unistd::User::from_name(user).ok().flatten().map(|u| u.uid.as_raw()),
            Some(r) => id_in(&r.join("etc/passwd"), user),
        }
    }

    pub fn gid(&self, group: &str) -> Option<u32> {
        match &self.root {
            None => nix::unistd::Group::from_name(group).ok().flatten().map(|g| g.gid.as_raw()),
            Some(r) => id_in(&r.join("etc/group"), group),
        }
    }

    /// The owner and group of a config file as ids; an empty name leaves that id unchanged.
    pub fn ids(&self, owner: &str, group: &str) -> Result<(Option<u32>, Option<u32>), String> {
        let uid = match owner {
            "" => None,
            u => Some(self.uid(u).ok_or_else(|| format!("owner {u:?} does not exist {}", self.source("passwd")))?),
        };
        let gid = match group {
            "" => None,
            g => Some(self.gid(g).ok_or_else(|| format!("group {g:?} does not exist {}", self.source("group")))?),
        };
        Ok((uid, gid))
    }
}

/// The id of `name` in a passwd or group file (`name:password:id:...`).
fn id_in(file: &Path, name: &str) -> Option<u32> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let mut fields = l.split(':');
        (fields.next()? == name).then(|| fields.nth(1)?.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_installroot_answers_from_its_own_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/passwd"), "root:x:0:0::/root:/bin/sh\netcd:x:977:975::/:/sbin/nologin\n")
            .unwrap();
        std::fs::write(dir.path().join("etc/group"), "root:x:0:\netcd:x:975:\n").unwrap();
        let a = Accounts::new(Some(dir.path()));
        assert_eq!(a.ids("etcd", "etcd").unwrap(), (Some(977), Some(975)));
        assert_eq!(a.ids("", "").unwrap(), (None, None));
        let err = a.ids("containerd", "").unwrap_err();
        assert!(err.contains("owner \"containerd\" does not exist in") && err.ends_with("etc/passwd"), "{err}");
        // Without the files, nothing exists there.
        assert!(Accounts::new(Some(&dir.path().join("empty"))).uid("root").is_none());
        assert_eq!(Accounts::new(None).uid("root"), Some(0));
    }
}
