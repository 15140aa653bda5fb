//! A node's root for component manager tests: an installroot, a state folder, a stand-in
//! systemctl, and `nodekeeper-agent components apply` run on it; and what rpm and dnf say of it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::{bin, rpm_installed, rpm_repo};

/// A node's root for one test: an installroot, a state directory, a stand-in systemctl that
/// records what it is asked (systemd does not run here), and hook marker files.
pub struct Node {
    pub dir: tempfile::TempDir,
}

impl Default for Node {
    fn default() -> Self {
        Node::new()
    }
}

impl Node {
    pub fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("root")).unwrap();
        let systemctl = dir.path().join("systemctl");
        std::fs::write(&systemctl, format!("#!/bin/sh\necho \"$@\" >> {}/systemctl.log\n", dir.path().display()))
            .unwrap();
        std::fs::set_permissions(&systemctl, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        Node { dir }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn installed(&self) -> Option<String> {
        rpm_installed(&self.root(), "nk-demo")
    }

    pub fn config(&self) -> Option<String> {
        std::fs::read_to_string(self.root().join("etc/nk-demo/demo.conf")).ok()
    }

    pub fn restarts(&self) -> usize {
        std::fs::read_to_string(self.path("systemctl.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("restart nk-demo.service"))
            .count()
    }

    /// A hook or check that, while `block-<name>` exists, signals `reached-<name>` and waits.
    pub fn blocking(&self, name: &str, then: &str) -> String {
        let (block, reached) = (self.path(&format!("block-{name}")), self.path(&format!("reached-{name}")));
        format!(
            r#"["/bin/sh", "-c", "if [ -e {b} ]; then touch {r}; while [ -e {b} ]; do sleep 0.05; done; exit 9; fi; {then}"]"#,
            b = block.display(),
            r = reached.display()
        )
    }

    pub fn spec(&self, version: &str, setting: &str, extra: &str) -> PathBuf {
        let health = format!("grep -qx ok {}/usr/lib/nk-demo/HEALTH", self.root().display());
        self.spec_with(version, setting, &format!("command = {}\n", self.blocking("check", &health)), extra)
    }

    pub fn spec_with(&self, version: &str, setting: &str, health: &str, extra: &str) -> PathBuf {
        let path = self.path("spec.toml");
        std::fs::write(
            &path,
            format!(
                r#"[[component]]
name = "demo"
package = "nk-demo"
version = "{version}"
unit = "nk-demo.service"
pre_hook = {pre}
post_hook = {post}
{extra}
[[component.repositories]]
id = "nk-test"
base_url = "{url}"

[[component.config_files]]
path = "/etc/nk-demo/demo.conf"
content = "setting = {setting}\n"
mode = "0640"

[component.health_check]
{health}timeout = "2s"
deadline = "2s"
"#,
                pre = self.blocking("pre", "true"),
                post = self.blocking("post", "true"),
                url = rpm_repo().url(),
            ),
        )
        .unwrap();
        path
    }

    pub fn command(&self, spec: &Path) -> std::process::Command {
        let mut c = std::process::Command::new(bin("nodekeeper-agent"));
        c.args(["components", "apply", "--spec"])
            .arg(spec)
            .arg("--installroot")
            .arg(self.root())
            .arg("--state-dir")
            .arg(self.path("state"))
            .args(["--config-root", "/etc/nk-demo", "--systemctl"])
            .arg(self.path("systemctl"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// Runs one pass; (exit code, stdout + stderr).
    pub fn apply(&self, spec: &Path) -> (i32, String) {
        let out = self.command(spec).spawn().unwrap().wait_with_output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), text)
    }
}

/// Waits until `p` exists (60 s at most).
pub fn wait_for_file(p: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !p.exists() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {}", p.display());
        std::thread::park_timeout(Duration::from_millis(20));
    }
}

/// A spec file `<name>.toml` with one component `name`: `package` at `version` from the test
/// repository, then the TOML in `extra` (for the repository table).
pub fn one_component(n: &Node, name: &str, package: &str, version: &str, extra: &str) -> PathBuf {
    let path = n.path(&format!("{name}.toml"));
    let text = format!(
        "[[component]]\nname = \"{name}\"\npackage = \"{package}\"\nversion = \"{version}\"\n[[component.repositories]]\nid = \"nk-test\"\nbase_url = \"{}\"\n{extra}",
        rpm_repo().url()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A spec for the package with holdable scriptlets, nk-slow, at `version`.
pub fn slow_spec(n: &Node, version: &str) -> PathBuf {
    one_component(n, "slow", "nk-slow", version, "")
}

/// A command's success and output (stdout and stderr).
pub fn run(mut c: std::process::Command) -> (bool, String) {
    let out = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap().wait_with_output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// What rpm and dnf say of the root: every recorded version of nk-slow, whether `rpm -V` passes
/// for it, whether `dnf check` passes.
pub fn rpm_truth(root: &Path) -> (Vec<String>, (bool, String), (bool, String)) {
    let mut q = std::process::Command::new("rpm");
    q.arg("--root").arg(root).args(["-q", "--qf", "%{EPOCHNUM}:%{VERSION}-%{RELEASE}\n", "nk-slow"]);
    let versions = run(q).1.lines().map(str::to_owned).collect();
    let mut v = std::process::Command::new("rpm");
    v.arg("--root").arg(root).args(["-V", "nk-slow"]);
    let mut check = std::process::Command::new("dnf");
    check.arg(format!("--installroot={}", root.display())).args(["--releasever=1", "-q", "check"]);
    (versions, run(v), run(check))
}

/// Starts an upgrade of nk-slow from 1.0 to 2.0 held in `phase`'s scriptlet; returns the
/// running agent (in a process group of its own, with its dnf) once the scriptlet is reached.
pub fn held_upgrade(n: &Node, phase: &str) -> std::process::Child {
    assert_eq!(n.apply(&slow_spec(n, "1.0-1")).0, 0);
    nix::unistd::mkfifo(&n.root().join(format!("nk-block-{phase}")), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let mut cmd = n.command(&slow_spec(n, "2.0-1"));
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = cmd.spawn().unwrap();
    wait_for_file(&n.root().join(format!("nk-reached-{phase}")));
    child
}

/// The root's dnf transactions, newest first, as (action, packages altered). rpm's INSTALLTID
/// cannot tell them apart: it is a time in seconds, and two transactions may share one.
pub fn transactions(root: &Path) -> Vec<(String, String)> {
    let mut q = std::process::Command::new("dnf");
    q.arg(format!("--installroot={}", root.display())).args(["--releasever=1", "-q", "history", "list"]);
    let (ok, out) = run(q);
    assert!(ok, "dnf history: {out}");
    out.lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split('|').map(str::trim).collect();
            (cols.len() == 5 && cols[0].parse::<u32>().is_ok()).then(|| (cols[3].to_owned(), cols[4].to_owned()))
        })
        .collect()
}
