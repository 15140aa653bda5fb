//! Real storage targets for the storage syncer's tests: a tgt iSCSI target (Debian's `tgt`) with
//! a LUN on a file, and an nfs-ganesha server (Debian's `nfs-ganesha` with its VFS FSAL) exporting
//! a directory, each on a test address, with their clients: libiscsi's `iscsi-inq` and libnfs's
//! `nfs-ls` (userspace, run in a host's network namespace). And the syncer itself as a process.
//! All installed by scripts/install-test-deps.sh; everything is stopped when dropped.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::{bin, free_port, wait_for};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs a command to its end: whether it succeeded (its output discarded).
pub fn succeeds(mut c: Command) -> bool {
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    c.spawn().and_then(|mut ch| ch.wait()).map(|s| s.success()).unwrap_or(false)
}

/// Runs a command and returns its standard output; panics with its error output if it fails.
pub fn stdout_of(mut c: Command) -> String {
    let what = format!("{c:?}");
    let out = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|ch| ch.wait_with_output())
        .unwrap_or_else(|e| panic!("{what}: {e} (scripts/install-test-deps.sh installs it)"));
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A tgtd of its own (its own management port) with target 1, `iqn`, and one LUN.
pub struct Tgt {
    pub control_port: u16,
    pub portal: String,
    pub iqn: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Tgt {
    pub async fn start(addr: IpAddr) -> Tgt {
        let dir = tempfile::tempdir().expect("tempdir");
        let lun = dir.path().join("lun.img");
        std::fs::File::create(&lun).and_then(|f| f.set_len(4 << 20)).expect("the LUN's file");
        // tgtd's management channel is a unix socket named by this number (at most 32767), not a
        // TCP port.
        let control_port = 1_000 + (std::process::id() % 31_000) as u16 + NEXT.fetch_add(1, Ordering::Relaxed) as u16;
        let portal = format!("{addr}:{}", free_port());
        let child = Command::new("tgtd")
            .args(["-f", "-C", &control_port.to_string(), "--iscsi", &format!("portal={portal}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tgtd (scripts/install-test-deps.sh installs tgt)");
        let iqn = format!("iqn.2026-12.io.nodekeeper.test:vol{control_port}");
        let t = Tgt { control_port, portal, iqn, child, _dir: dir };
        wait_for("tgtd's management socket", Duration::from_secs(10), || async {
            succeeds(t.tgtadm(&["--op", "show", "--mode", "target"])).then_some(())
        })
        .await;
        stdout_of(t.tgtadm(&["--op", "new", "--mode", "target", "--tid", "1", "-T", &t.iqn]));
        let mut lu = t.tgtadm(&["--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b"]);
        lu.arg(&lun);
        stdout_of(lu);
        t
    }

    pub fn tgtadm(&self, args: &[&str]) -> Command {
        let mut c = Command::new("tgtadm");
        c.args(["-C", &self.control_port.to_string(), "--lld", "iscsi"]).args(args);
        c
    }

    /// Target 1's ACL as tgtadm shows it.
    pub fn acl(&self) -> Vec<String> {
        let show = stdout_of(self.tgtadm(&["--op", "show", "--mode", "target"]));
        let mut out: Vec<String> = show
            .lines()
            .skip_while(|l| l.trim() != "ACL information:")
            .skip(1)
            .take_while(|l| l.starts_with("        "))
            .map(|l| l.trim().to_owned())
            .collect();
        out.sort();
        out
    }

    /// Binds (`bind`) or unbinds an initiator name by hand, as an operator would.
    pub fn edit(&self, op: &str, initiator: &str) {
        stdout_of(self.tgtadm(&["--op", op, "--mode", "target", "--tid", "1", "-Q", initiator]));
    }

    /// Whether initiator `name` in namespace `ns` logs in and reads LUN 1's inquiry data.
    pub fn inquiry_succeeds(&self, ns: &str, name: &str) -> bool {
        let mut c = crate::netns::Net::command(ns, Path::new("iscsi-inq"));
        c.args(["-i", name, &format!("iscsi://{}/{}/1", self.portal, self.iqn)]);
        succeeds(c)
    }

    /// The syncer's `[target.backend]` for target 1.
    pub fn backend_toml(&self) -> String {
        format!("backend = {{ kind = \"tgt\", tid = 1, control_port = {} }}\n", self.control_port)
    }
}

impl Drop for Tgt {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(format!("/var/run/tgtd/socket.{}", self.control_port));
        let _ = std::fs::remove_file(format!("/var/run/tgtd/socket.{}.lock", self.control_port));
    }
}

/// An nfs-ganesha (NFSv4 only) exporting a directory as `/vol`, whose clients lie between the
/// storage syncer's markers for target `vol` (none at first: nobody may mount).
pub struct Ganesha {
    pub addr: IpAddr,
    pub port: u16,
    pub config: PathBuf,
    pub pid_file: PathBuf,
    child: Child,
    dir: tempfile::TempDir,
}

impl Ganesha {
    pub async fn start(addr: IpAddr) -> Ganesha {
        let dir = tempfile::tempdir().expect("tempdir");
        let export = dir.path().join("export");
        std::fs::create_dir_all(&export).expect("the export");
        std::fs::write(export.join("hello.txt"), "hello\n").expect("a file to list");
        let port = free_port();
        let config = dir.path().join("ganesha.conf");
        std::fs::write(
            &config,
            format!(
                "NFS_CORE_PARAM {{\n    Protocols = 4;\n    NFS_Port = {port};\n    Bind_addr = {addr};\n    Enable_NLM = false;\n    Enable_RQUOTA = false;\n}}\n\
                 NFSV4 {{\n    Graceless = true;\n    RecoveryRoot = \"{root}\";\n}}\n\
                 NFS_KRB5 {{ Active_krb5 = false; }}\n\
                 EXPORT {{\n    Export_Id = 1;\n    Path = \"{export}\";\n    Pseudo = /vol;\n    Protocols = 4;\n    SecType = sys;\n    Squash = No_Root_Squash;\n    Access_Type = None;\n    FSAL {{ Name = VFS; }}\n    # BEGIN nodekeeper-storage vol\n    # END nodekeeper-storage vol\n}}\n",
                root = dir.path().join("recovery").display(),
                export = export.display(),
            ),
        )
        .expect("ganesha's config");
        let pid_file = dir.path().join("ganesha.pid");
        let child = Command::new("ganesha.nfsd")
            .arg("-F")
            .arg("-L")
            .arg(dir.path().join("ganesha.log"))
            .arg("-f")
            .arg(&config)
            .arg("-p")
            .arg(&pid_file)
            .args(["-N", "NIV_EVENT"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ganesha.nfsd (scripts/install-test-deps.sh installs nfs-ganesha)");
        let g = Ganesha { addr, port, config, pid_file, child, dir };
        wait_for("ganesha serving NFS", Duration::from_secs(20), || async {
            (g.pid_file.exists() && std::net::TcpStream::connect((addr, port)).is_ok()).then_some(())
        })
        .await;
        g
    }

    /// Whether namespace `ns` lists the export (NFSv4, libnfs, as root).
    pub fn listing_succeeds(&self, ns: &str) -> bool {
        let mut c = crate::netns::Net::command(ns, Path::new("nfs-ls"));
        c.arg(format!("nfs://{}/vol?version=4&nfsport={}", self.addr, self.port));
        succeeds(c)
    }

    pub fn backend_toml(&self) -> String {
        format!(
            "backend = {{ kind = \"ganesha\", config = \"{}\", pid_file = \"{}\" }}\n",
            self.config.display(),
            self.pid_file.display()
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ganesha.log")).unwrap_or_default()
    }
}

impl Drop for Ganesha {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A nodekeeper-storage for cluster c1 named `storage-c1`, plaintext to `center`, with its
/// `/metrics` on a free port; its state directory survives restarts. Killed when dropped.
pub struct Syncer {
    pub config: PathBuf,
    pub metrics: String,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Syncer {
    /// `extra`: top-level settings (e.g. `resync_interval`); `targets`: the `[[target]]` tables.
    pub fn start(center: &str, extra: &str, targets: &str) -> Syncer {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("storage.toml");
        let port = free_port();
        std::fs::write(
            &config,
            format!(
                "name = \"storage-c1\"\ncluster = \"c1\"\ncenter = \"{center}\"\ninsecure = true\nstate_dir = \"{}\"\nmetrics_listen = \"127.0.0.1:{port}\"\n{extra}\n{targets}",
                dir.path().join("state").display()
            ),
        )
        .expect("write config");
        let mut s = Syncer { config, metrics: format!("http://127.0.0.1:{port}/metrics"), child: None, _dir: dir };
        s.spawn();
        s
    }

    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new(bin("nodekeeper-storage"))
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn nodekeeper-storage");
        self.child = Some(child);
    }

    /// SIGTERM, and waits for it to stop.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        crate::signal(child.id(), "TERM");
        child.wait().expect("wait for nodekeeper-storage")
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
