//! A certificate authority and the identities tests present, made with `nodekeeper certs` (the
//! operators' own tool), and event centers that require them.

use std::path::{Path, PathBuf};

use nodekeeper_common::tls::TlsFiles;

use crate::{EventCenter, bin};

/// Runs `nodekeeper certs ARGS --dir DIR`; panics with its stderr if it fails.
pub async fn certs(dir: &Path, args: &[&str]) {
    let out = tokio::process::Command::new(bin("nodekeeper"))
        .arg("certs")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .await
        .expect("run nodekeeper certs");
    assert!(out.status.success(), "nodekeeper certs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA in a temporary directory with the center's server certificate (`eventcenter`, for
/// 127.0.0.1), an `admin`, and the identities a test asks for.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// `identities`: (kind, name, cluster; "" for none) as `nodekeeper certs issue` takes them.
    pub async fn new(identities: &[(&str, &str, &str)]) -> Pki {
        let pki = Pki { dir: tempfile::tempdir().expect("tempdir") };
        let d = pki.dir.path();
        certs(d, &["init"]).await;
        certs(d, &["issue", "--kind", "server", "--name", "eventcenter", "--san", "127.0.0.1"]).await;
        certs(d, &["issue", "--kind", "admin", "--name", "admin"]).await;
        for (kind, name, cluster) in identities {
            let mut args = vec!["issue", "--kind", kind, "--name", name];
            if !cluster.is_empty() {
                args.extend(["--cluster", cluster]);
            }
            certs(d, &args).await;
        }
        pki
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    pub fn files(&self, name: &str) -> TlsFiles {
        TlsFiles::in_dir(self.dir.path(), name)
    }

    /// A center configuration: `settings`, then its `[tls]` table with the server certificate.
    pub fn center_config(&self, settings: &str) -> String {
        let f = self.files("eventcenter");
        format!(
            "{settings}\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            f.ca.display(),
            f.cert.display(),
            f.key.display()
        )
    }

    /// A center with `settings` that requires these certificates; the harness talks to it as
    /// `admin`.
    pub async fn center(&self, settings: &str) -> EventCenter {
        EventCenter::start_tls(&self.center_config(settings), self.files("admin")).await
    }
}
