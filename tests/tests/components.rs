//! The component manager with real rpm tooling: RPMs built by rpmbuild, published by createrepo_c,
//! installed by dnf into an installroot, read back from the RPM database. Driven through
//! `nodekeeper-agent components apply` (one pass from a local spec), killed with -9 mid-change
//! and run again.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nodekeeper_tests::{bin, rpm_installed, rpm_repo};

/// A node's root for one test: an installroot, a state directory, a stand-in systemctl that
/// records what it is asked (systemd does not run here), and hook marker files.
struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("root")).unwrap();
        let systemctl = dir.path().join("systemctl");
        std::fs::write(&systemctl, format!("#!/bin/sh\necho \"$@\" >> {}/systemctl.log\n", dir.path().display()))
            .unwrap();
        std::fs::set_permissions(&systemctl, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        Node { dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn installed(&self) -> Option<String> {
        rpm_installed(&self.root(), "nk-demo")
    }

    fn config(&self) -> Option<String> {
        std::fs::read_to_string(self.root().join("etc/nk-demo/demo.conf")).ok()
    }

    fn restarts(&self) -> usize {
        std::fs::read_to_string(self.path("systemctl.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("restart nk-demo.service"))
            .count()
    }

    /// A hook or check that, while `block-<name>` exists, signals `reached-<name>` and waits.
    fn blocking(&self, name: &str, then: &str) -> String {
        let (block, reached) = (self.path(&format!("block-{name}")), self.path(&format!("reached-{name}")));
        format!(
            r#"["/bin/sh", "-c", "if [ -e {b} ]; then touch {r}; while [ -e {b} ]; do sleep 0.05; done; exit 9; fi; {then}"]"#,
            b = block.display(),
            r = reached.display()
        )
    }

    fn spec(&self, version: &str, setting: &str, extra: &str) -> PathBuf {
        let health = format!("grep -qx ok {}/usr/lib/nk-demo/HEALTH", self.root().display());
        self.spec_with(version, setting, &format!("command = {}\n", self.blocking("check", &health)), extra)
    }

    fn spec_with(&self, version: &str, setting: &str, health: &str, extra: &str) -> PathBuf {
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

    fn command(&self, spec: &Path) -> std::process::Command {
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
    fn apply(&self, spec: &Path) -> (i32, String) {
        let out = self.command(spec).spawn().unwrap().wait_with_output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), text)
    }
}

fn wait_for_file(p: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !p.exists() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {}", p.display());
        std::thread::park_timeout(Duration::from_millis(20));
    }
}

#[test]
fn install_upgrade_downgrade_into_an_installroot() {
    let n = Node::new();
    let (code, out) = n.apply(&n.spec("1.0-1", "10", ""));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("demo: install nk-demo 0:1.0-1") && out.contains("demo: converged at 0:1.0-1"), "{out}");
    assert!(out.contains("demo: converged (changed), installed 0:1.0-1, desired 1.0-1"), "{out}");
    assert_eq!(n.installed().as_deref(), Some("0:1.0-1"));
    assert_eq!(n.config().as_deref(), Some("setting = 10\n"), "the spec's config replaces the package's");
    let mode = std::fs::metadata(n.root().join("etc/nk-demo/demo.conf")).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o7777, 0o640);
    assert_eq!(n.restarts(), 1);

    // Converged: a second pass changes nothing.
    let (code, out) = n.apply(&n.spec("1.0-1", "10", ""));
    assert_eq!(code, 0, "{out}");
    assert!(
        !out.contains("install nk-demo") && out.contains("demo: converged (unchanged), installed 0:1.0-1"),
        "{out}"
    );
    assert_eq!(n.restarts(), 1, "no change, no restart");

    let (code, out) = n.apply(&n.spec("1.1-1", "11", ""));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("demo: upgrade nk-demo from 0:1.0-1 to 0:1.1-1"), "{out}");
    assert_eq!(n.installed().as_deref(), Some("0:1.1-1"));
    assert_eq!(n.config().as_deref(), Some("setting = 11\n"));

    let (code, out) = n.apply(&n.spec("0:1.0-1", "10", ""));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("demo: downgrade nk-demo from 0:1.1-1 to 0:1.0-1"), "{out}");
    assert_eq!(n.installed().as_deref(), Some("0:1.0-1"));

    // Drift in the config file is repaired (and the unit restarted).
    std::fs::write(n.root().join("etc/nk-demo/demo.conf"), "setting = tampered\n").unwrap();
    let (code, out) = n.apply(&n.spec("1.0-1", "10", ""));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("demo: repair config /etc/nk-demo/demo.conf"), "{out}");
    assert_eq!(n.config().as_deref(), Some("setting = 10\n"));
    assert_eq!(n.restarts(), 4);
}

#[test]
fn an_unhealthy_version_is_rolled_back_with_its_config() {
    let n = Node::new();
    assert_eq!(n.apply(&n.spec("1.1-1", "11", "")).0, 0);
    let (code, out) = n.apply(&n.spec("1.2-1", "12", ""));
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("not healthy within 2s") && out.contains("rolling back to 0:1.1-1") && out.contains("ROLLED BACK"),
        "{out}"
    );
    assert_eq!(n.installed().as_deref(), Some("0:1.1-1"), "the previous version runs again");
    assert_eq!(n.config().as_deref(), Some("setting = 11\n"), "and its config");
    // The rolled-back version is not tried again until the desired state changes.
    let (code, out) = n.apply(&n.spec("1.2-1", "12", ""));
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("was rolled back") && !out.contains("upgrade nk-demo"), "{out}");
    assert_eq!(n.installed().as_deref(), Some("0:1.1-1"));
}

#[test]
fn errors_change_nothing() {
    let n = Node::new();
    assert_eq!(n.apply(&n.spec("1.0-1", "10", "")).0, 0);
    let unchanged = |n: &Node, out: &str| {
        assert_eq!(n.installed().as_deref(), Some("0:1.0-1"), "{out}");
        assert_eq!(n.config().as_deref(), Some("setting = 10\n"), "{out}");
    };
    // Version missing from the repository.
    let (code, out) = n.apply(&n.spec("9.9-1", "99", ""));
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("package or version not found"), "{out}");
    unchanged(&n, &out);
    // Bad version string: the spec is invalid.
    let (code, out) = n.apply(&n.spec("1.1", "11", ""));
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("invalid version \"1.1\": expected epoch:version-release"), "{out}");
    unchanged(&n, &out);
    // Repository unreachable.
    let spec = n.spec("1.1-1", "11", "");
    let text = std::fs::read_to_string(&spec).unwrap().replace(&rpm_repo().url(), "file:///nonexistent/nk-repo");
    std::fs::write(&spec, text).unwrap();
    let (code, out) = n.apply(&spec);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("repository unreachable"), "{out}");
    unchanged(&n, &out);
    // Config path outside the allowed roots.
    let spec = n.spec("1.1-1", "11", "");
    std::fs::write(&spec, std::fs::read_to_string(&spec).unwrap().replace("/etc/nk-demo/demo.conf", "/etc/passwd"))
        .unwrap();
    let (code, out) = n.apply(&spec);
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("config path \"/etc/passwd\" is outside the allowed roots"), "{out}");
    unchanged(&n, &out);
    // Dependency conflict.
    let spec = n.path("conflict.toml");
    std::fs::write(
        &spec,
        format!("[[component]]\nname = \"conflict\"\npackage = \"nk-conflict\"\nversion = \"1.0-1\"\n[[component.repositories]]\nid = \"nk-test\"\nbase_url = \"{}\"\n", rpm_repo().url()),
    )
    .unwrap();
    let (code, out) = n.apply(&spec);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("dependency conflict") && out.contains("nk-libmissing"), "{out}");
    assert_eq!(rpm_installed(&n.root(), "nk-conflict"), None);
    unchanged(&n, &out);
}

/// Kills `components apply` with -9 while it waits at `step`, then runs it again.
/// The 1-based line of the first occurrence of `needle` in `text`.
fn line_of(text: &str, needle: &str) -> usize {
    text[..text.find(needle).expect(needle)].matches('\n').count() + 1
}

#[test]
fn every_spec_defect_is_named_with_its_line_and_changes_nothing() {
    let n = Node::new();
    // The root's own accounts: config owners are looked up there, not on the host.
    std::fs::create_dir_all(n.root().join("etc")).unwrap();
    std::fs::write(n.root().join("etc/passwd"), "root:x:0:0::/root:/bin/sh\nnkdemo:x:4242:4243::/:/sbin/nologin\n")
        .unwrap();
    std::fs::write(n.root().join("etc/group"), "root:x:0:\nnkdemo:x:4243:\n").unwrap();
    assert_eq!(n.apply(&n.spec("1.0-1", "10", "")).0, 0);
    let base = std::fs::read_to_string(n.spec("1.1-1", "11", "")).unwrap();
    let second = |name: &str, package: &str, version: &str| {
        format!("\n[[component]]\nname = \"{name}\"\npackage = \"{package}\"\nversion = \"{version}\"\n")
    };
    let owned = |owner: &str, group: &str| {
        base.replace("mode = \"0640\"", &format!("mode = \"0640\"\nowner = \"{owner}\"\ngroup = \"{group}\""))
    };
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "a component listed twice",
            base.clone() + &second("demo", "nk-other", "1.0-1"),
            "name = \"demo\"\npackage = \"nk-other\"",
            "component \"demo\" is listed twice",
        ),
        (
            "a package claimed twice",
            base.clone() + &second("demo2", "nk-demo", "1.0-1"),
            "name = \"demo2\"",
            "package \"nk-demo\" is already claimed by component \"demo\"",
        ),
        (
            "an owner the root does not have",
            owned("containerd", "nkdemo"),
            "name = \"demo\"",
            "owner \"containerd\" does not exist in",
        ),
        (
            "a group the root does not have",
            owned("nkdemo", "dockerr"),
            "name = \"demo\"",
            "group \"dockerr\" does not exist in",
        ),
        (
            "two kinds of health check",
            base.replace(
                "[component.health_check]\n",
                "[component.health_check]\nhttp_url = \"http://127.0.0.1:1/\"\n",
            ),
            "name = \"demo\"",
            "set one of command, http_url or unit_active",
        ),
        (
            "an unknown field",
            base.replace("unit = ", "restart = \"always\"\nunit = "),
            "restart = ",
            "unknown field `restart`",
        ),
        (
            "one bad entry beside a good one",
            base.clone() + &second("other", "nk-conflict", "1.0"),
            "name = \"other\"",
            "invalid version \"1.0\"",
        ),
    ];
    for (what, text, at, says) in cases {
        let spec = n.path("defect.toml");
        std::fs::write(&spec, &text).unwrap();
        let (code, out) = n.apply(&spec);
        assert_eq!(code, 78, "{what}: {out}");
        // `file:line:` for a defect of the spec, the config loader's `file, line N` for TOML itself.
        let line = line_of(&text, at);
        let located = out.contains(&format!("{}:{line}:", spec.display()))
            || out.contains(&format!("{}, line {line},", spec.display()));
        assert!(located && out.contains(says), "{what}: expected line {line} … {says}: {out}");
        assert!(!out.contains("upgrade nk-demo") && !out.contains("ROLLED BACK"), "{what}: {out}");
        assert_eq!(n.installed().as_deref(), Some("0:1.0-1"), "{what}: nothing changed");
        assert_eq!(n.config().as_deref(), Some("setting = 10\n"), "{what}: nothing changed");
    }
    // The owner fixed: the change goes through, the file owned by the root's account.
    let (code, out) = n.apply(&{
        let spec = n.path("owned.toml");
        std::fs::write(&spec, owned("nkdemo", "nkdemo")).unwrap();
        spec
    });
    assert_eq!(code, 0, "{out}");
    let meta = std::fs::metadata(n.root().join("etc/nk-demo/demo.conf")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.uid(), meta.gid()), (4242, 4243));
    assert_eq!(n.installed().as_deref(), Some("0:1.1-1"));
}

#[test]
fn rejections_and_state_belong_to_one_root_and_one_spec() {
    // Two roots, each with the default state folder (inside the root).
    let (a, b) = (Node::new(), Node::new());
    let apply = |n: &Node, version: &str, setting: &str| {
        let spec = n.spec(version, setting, "");
        let mut c = std::process::Command::new(bin("nodekeeper-agent"));
        c.args(["components", "apply", "--spec"]).arg(&spec).arg("--installroot").arg(n.root());
        c.args(["--config-root", "/etc/nk-demo", "--systemctl"]).arg(n.path("systemctl")).env("RUST_LOG", "warn");
        let out = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap().wait_with_output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), text)
    };
    for n in [&a, &b] {
        assert_eq!(apply(n, "1.1-1", "11").0, 0);
    }
    let (code, out) = apply(&a, "1.2-1", "12");
    assert_eq!(code, 3, "{out}");
    assert!(a.root().join("var/lib/nodekeeper/components/rejected.json").exists(), "state inside root A");
    // Root B has not seen 1.2-1 fail: it tries it.
    let (code, out) = apply(&b, "1.2-1", "12");
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("upgrade nk-demo from 0:1.1-1 to 0:1.2-1"), "{out}");
    // In root A the same spec is not tried again; a changed spec (its config) is.
    let (code, out) = apply(&a, "1.2-1", "12");
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("was rolled back") && !out.contains("upgrade nk-demo"), "{out}");
    let (code, out) = apply(&a, "1.2-1", "13");
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("upgrade nk-demo from 0:1.1-1 to 0:1.2-1"), "{out}");
}

#[test]
fn an_http_health_check_that_gets_no_answer_rolls_the_change_back() {
    let n = Node::new();
    assert_eq!(n.apply(&n.spec("1.0-1", "10", "")).0, 0);
    let closed = nodekeeper_tests::free_port();
    let health = format!("http_url = \"http://127.0.0.1:{closed}/healthz\"\n");
    let (code, out) = n.apply(&n.spec_with("1.1-1", "11", &health, ""));
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("not healthy within 2s") && out.contains("ROLLED BACK"), "{out}");
    assert_eq!(n.installed().as_deref(), Some("0:1.0-1"));
}

/// A spec for the package with holdable scriptlets, nk-slow, at `version`.
fn slow_spec(n: &Node, version: &str) -> PathBuf {
    let path = n.path("slow.toml");
    let text = format!(
        "[[component]]\nname = \"slow\"\npackage = \"nk-slow\"\nversion = \"{version}\"\n[[component.repositories]]\nid = \"nk-test\"\nbase_url = \"{}\"\n",
        rpm_repo().url()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A command's success and output (stdout and stderr).
fn run(mut c: std::process::Command) -> (bool, String) {
    let out = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap().wait_with_output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// What rpm and dnf say of the root: every recorded version of nk-slow, whether `rpm -V` passes
/// for it, whether `dnf check` passes.
fn rpm_truth(root: &Path) -> (Vec<String>, (bool, String), (bool, String)) {
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
fn held_upgrade(n: &Node, phase: &str) -> std::process::Child {
    assert_eq!(n.apply(&slow_spec(n, "1.0-1")).0, 0);
    nix::unistd::mkfifo(&n.root().join(format!("nk-block-{phase}")), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let mut cmd = n.command(&slow_spec(n, "2.0-1"));
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = cmd.spawn().unwrap();
    wait_for_file(&n.root().join(format!("nk-reached-{phase}")));
    child
}

#[test]
fn a_power_cut_in_any_scriptlet_leaves_one_verified_version_after_the_next_pass() {
    for phase in nodekeeper_tests::SCRIPTLETS {
        let n = Node::new();
        let mut agent = held_upgrade(&n, phase);
        // The power cut: the agent, its dnf and the scriptlet at once.
        nix::sys::signal::killpg(nix::unistd::Pid::from_raw(agent.id() as i32), nix::sys::signal::SIGKILL).unwrap();
        agent.wait().unwrap();
        std::fs::remove_file(n.root().join(format!("nk-block-{phase}"))).unwrap();
        let (code, out) = n.apply(&slow_spec(&n, "2.0-1"));
        assert_eq!(code, 0, "{phase}: {out}");
        assert!(out.contains("slow: converged"), "{phase}: {out}");
        let (versions, verify, check) = rpm_truth(&n.root());
        assert_eq!(versions, ["0:2.0-1"], "{phase}: exactly one version recorded: {out}");
        assert!(verify.0, "{phase}: rpm -V nk-slow: {}", verify.1);
        assert!(check.0, "{phase}: dnf check: {}", check.1);
        if matches!(phase, "post" | "preun") {
            // Cut between recording the new version and forgetting the old: both were recorded.
            assert!(out.contains("repaired: removed the record of nk-slow 0:1.0-1"), "{phase}: {out}");
        }
    }
}

#[test]
fn a_transaction_that_outlives_its_agent_is_waited_for_not_doubled() {
    let n = Node::new();
    let mut agent = held_upgrade(&n, "post");
    // Only the agent dies; its dnf goes on, held in %post.
    agent.kill().unwrap();
    agent.wait().unwrap();
    let mut second = n.command(&slow_spec(&n, "2.0-1")).spawn().unwrap();
    let stderr = second.stderr.take().unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !lines.lock().unwrap().iter().any(|l| l.contains("still running on this root; waiting")) {
        assert!(std::time::Instant::now() < deadline, "the second run did not wait: {:?}", lines.lock().unwrap());
        std::thread::park_timeout(Duration::from_millis(20));
    }
    // While it waits, one dnf works on this root.
    let root = n.root().display().to_string();
    let dnfs = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("dnf") && c.contains(&format!("--installroot={root}")))
        .count();
    assert_eq!(dnfs, 1, "one transaction on the root");
    // The first transaction goes on and ends; then the second run takes over.
    std::fs::write(n.root().join("nk-block-post"), "go\n").unwrap();
    let status = second.wait().unwrap();
    reader.join().unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut second.stdout.take().unwrap(), &mut out).unwrap();
    let all = format!("{out}{}", lines.lock().unwrap().join("\n"));
    assert_eq!(status.code(), Some(0), "{all}");
    assert!(out.contains("slow: converged") && !all.contains("FAILED"), "{all}");
    let (versions, verify, check) = rpm_truth(&n.root());
    assert_eq!(versions, ["0:2.0-1"], "{all}");
    assert!(verify.0 && check.0, "{verify:?} {check:?}");
}

#[test]
fn the_roots_own_repositories_stay_enabled_and_repository_options_reach_dnf() {
    let n = Node::new();
    let spec = |extra: &str| {
        let path = n.path("needs.toml");
        let text = format!(
            "[[component]]\nname = \"needs\"\npackage = \"nk-needs-dep\"\nversion = \"1.0-1\"\n[[component.repositories]]\nid = \"nk-test\"\nbase_url = \"{}\"\n{extra}",
            rpm_repo().url()
        );
        std::fs::write(&path, text).unwrap();
        path
    };
    // An exclude on the component's repository: dnf is told, and finds nothing to install.
    let (code, out) = n.apply(&spec("exclude = [\"nk-needs*\"]\npriority = 10\n"));
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("package or version not found"), "{out}");
    // The dependency is only in a repository the root has configured itself: without it the
    // transaction cannot be resolved; with it, listing the component's repository did not turn
    // it off.
    let (code, out) = n.apply(&spec(""));
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("nk-dep"), "{out}");
    std::fs::create_dir_all(n.root().join("etc/yum.repos.d")).unwrap();
    std::fs::write(
        n.root().join("etc/yum.repos.d/deps.repo"),
        format!("[deps]\nname=deps\nbaseurl={}\ngpgcheck=0\n", rpm_repo().deps_url()),
    )
    .unwrap();
    let (code, out) = n.apply(&spec(""));
    assert_eq!(code, 0, "{out}");
    assert_eq!(rpm_installed(&n.root(), "nk-dep").as_deref(), Some("0:1.0-1"), "{out}");
    // A malformed option is a defect of the spec.
    let (code, out) = n.apply(&spec("proxy = \"socks5://p:1080\"\n"));
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("invalid proxy"), "{out}");
}

#[test]
fn components_change_in_order_can_be_absent_reload_and_have_their_own_step_timeout() {
    let n = Node::new();
    let url = rpm_repo().url();
    let write = |text: String| {
        let path = n.path("two.toml");
        std::fs::write(&path, text).unwrap();
        path
    };
    // slow comes after demo, though listed first; demo's config and unit as `extra` says.
    let two = |slow: &str, demo: &str, setting: &str, extra: &str| {
        write(format!(
            "[[component]]\nname = \"slow\"\npackage = \"nk-slow\"\n{slow}\nafter = [\"demo\"]\n[[component.repositories]]\nid = \"nk-test\"\nbase_url = \"{url}\"\n\n\
             [[component]]\nname = \"demo\"\npackage = \"nk-demo\"\nversion = \"{demo}\"\nunit = \"nk-demo.service\"\n{extra}\n\
             [[component.repositories]]\nid = \"nk-test\"\nbase_url = \"{url}\"\n\
             [[component.config_files]]\npath = \"/etc/nk-demo/demo.conf\"\ncontent = \"setting = {setting}\\n\"\n\
             [component.health_check]\ncommand = [\"/bin/sh\", \"-c\", \"grep -qx ok {root}/usr/lib/nk-demo/HEALTH\"]\ndeadline = \"2s\"\n",
            root = n.root().display()
        ))
    };
    let (code, out) = n.apply(&two("version = \"1.0-1\"", "1.0-1", "10", ""));
    assert_eq!(code, 0, "{out}");
    let at = |what: &str| out.find(what).unwrap_or_else(|| panic!("{what}: {out}"));
    assert!(at("demo: install nk-demo") < at("slow: install nk-slow"), "demo first: {out}");

    // demo's upgrade is rolled back: slow, which comes after it, is not changed.
    let (code, out) = n.apply(&two("version = \"2.0-1\"", "1.2-1", "12", ""));
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("slow: not changed: it comes after demo, which has not converged"), "{out}");
    assert_eq!(rpm_installed(&n.root(), "nk-slow").as_deref(), Some("0:1.0-1"));

    // A cycle is a defect of the spec.
    let cyclic = std::fs::read_to_string(two("version = \"1.0-1\"", "1.0-1", "10", "")).unwrap();
    let cyclic = cyclic.replace("unit = \"nk-demo.service\"", "unit = \"nk-demo.service\"\nafter = [\"slow\"]");
    let (code, out) = n.apply(&write(cyclic));
    assert_eq!(code, 78, "{out}");
    assert!(out.contains("make a cycle"), "{out}");

    // Absent: removed, and reported so.
    let (code, out) = n.apply(&two("state = \"absent\"", "1.0-1", "10", ""));
    assert_eq!(code, 0, "{out}");
    assert_eq!(rpm_installed(&n.root(), "nk-slow"), None, "{out}");
    assert!(out.contains("slow: converged (changed), installed none, desired absent"), "{out}");

    // reload: a config change reloads the unit; a package change restarts it.
    let log = || std::fs::read_to_string(n.path("systemctl.log")).unwrap_or_default();
    let (code, out) = n.apply(&two("state = \"absent\"", "1.0-1", "11", "restart_policy = \"reload\""));
    assert_eq!(code, 0, "{out}");
    assert!(log().lines().last() == Some("reload nk-demo.service"), "{}", log());
    let (code, out) = n.apply(&two("state = \"absent\"", "1.1-1", "11", "restart_policy = \"reload\""));
    assert_eq!(code, 0, "{out}");
    assert!(log().lines().last() == Some("restart nk-demo.service"), "{}", log());

    // A step over the component's own timeout fails it, and nothing changes.
    let slow_hook = "step_timeout = \"1s\"\npre_hook = [\"/bin/sleep\", \"30\"]";
    let (code, out) = n.apply(&two("state = \"absent\"", "1.0-1", "11", slow_hook));
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("pre-hook: /bin/sleep did not finish within 1s"), "{out}");
    assert_eq!(rpm_installed(&n.root(), "nk-demo").as_deref(), Some("0:1.1-1"));
}

#[test]
fn verification_finds_and_repairs_files_changed_behind_rpms_back() {
    let n = Node::new();
    assert_eq!(n.apply(&n.spec("1.0-1", "10", "")).0, 0);
    std::fs::write(n.root().join("usr/lib/nk-demo/VERSION"), "tampered\n").unwrap();
    // A plain pass compares versions and config files only.
    let (code, out) = n.apply(&n.spec("1.0-1", "10", ""));
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("repaired"), "{out}");
    // A verifying pass (the agent's every `verify_interval`) finds the file and reinstalls.
    let spec = n.spec("1.0-1", "10", "");
    let mut c = n.command(&spec);
    c.arg("--verify");
    let out = c.spawn().unwrap().wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("demo: repaired: reinstalled nk-demo 0:1.0-1") && text.contains("/usr/lib/nk-demo/VERSION"),
        "{text}"
    );
    assert_eq!(std::fs::read_to_string(n.root().join("usr/lib/nk-demo/VERSION")).unwrap(), "1.0\n");
    assert_eq!(n.config().as_deref(), Some("setting = 10\n"), "the managed config stays");
}

fn kill_at(step: &str, expect_installed_at_kill: &str) -> (Node, String) {
    let n = Node::new();
    assert_eq!(n.apply(&n.spec("1.0-1", "10", "")).0, 0);
    let spec = n.spec("1.1-1", "11", "");
    std::fs::write(n.path(&format!("block-{step}")), "").unwrap();
    let mut child = n.command(&spec).spawn().unwrap();
    wait_for_file(&n.path(&format!("reached-{step}")));
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(n.installed().as_deref(), Some(expect_installed_at_kill), "at the kill ({step})");
    std::fs::remove_file(n.path(&format!("block-{step}"))).unwrap();
    let (code, out) = n.apply(&spec);
    assert_eq!(code, 0, "{out}");
    assert_eq!(n.installed().as_deref(), Some("0:1.1-1"), "{out}");
    assert_eq!(n.config().as_deref(), Some("setting = 11\n"), "{out}");
    (n, out)
}

#[test]
fn killed_before_the_transaction_it_starts_over() {
    let (_n, out) = kill_at("pre", "0:1.0-1");
    assert!(out.contains("the agent restarted during a change of demo (step Begun): resumed"), "{out}");
}

#[test]
fn killed_after_the_transaction_it_resumes() {
    let (_n, out) = kill_at("post", "0:1.1-1");
    assert!(out.contains("the agent restarted during a change of demo (step Configured): resumed"), "{out}");
    assert!(!out.contains("upgrade nk-demo"), "the package is not installed twice: {out}");
}

#[test]
fn killed_during_verification_it_verifies_again() {
    let (_n, out) = kill_at("check", "0:1.1-1");
    assert!(out.contains("the agent restarted during a change of demo (step Verifying): resumed"), "{out}");
}

#[test]
fn killed_mid_change_when_the_desired_state_moved_back_it_rolls_back() {
    let n = Node::new();
    assert_eq!(n.apply(&n.spec("1.0-1", "10", "")).0, 0);
    std::fs::write(n.path("block-post"), "").unwrap();
    let mut child = n.command(&n.spec("1.1-1", "11", "")).spawn().unwrap();
    wait_for_file(&n.path("reached-post"));
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::remove_file(n.path("block-post")).unwrap();
    // The operator went back to 1.0 meanwhile.
    let (code, out) = n.apply(&n.spec("1.0-1", "10", ""));
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("(step Configured): rolled back"), "{out}");
    assert_eq!(n.installed().as_deref(), Some("0:1.0-1"));
    assert_eq!(n.config().as_deref(), Some("setting = 10\n"));
}

#[test]
fn version_order_equals_rpms_own() {
    // A generated corpus: epochs, numeric and alphabetic segments, separators, ~ and ^.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
        fn part(&mut self) -> String {
            const ATOMS: [&str; 20] = [
                "0", "1", "2", "10", "01", "a", "b", "rc", "alpha", "9", "~", "^", ".", "_", "+", "~rc1", "^git",
                "el9", "1a", "a1",
            ];
            let mut s = String::from(["1", "2", "0", "3"][self.below(4) as usize]);
            for _ in 0..self.below(4) {
                s.push_str(ATOMS[self.below(ATOMS.len() as u64) as usize]);
            }
            s
        }
        fn evr(&mut self) -> String {
            let epoch = if self.below(3) == 0 { format!("{}:", self.below(3)) } else { String::new() };
            format!("{epoch}{}-{}", self.part(), self.part())
        }
    }
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut pairs: Vec<(String, String)> = Vec::new();
    for _ in 0..3000 {
        let a = rng.evr();
        let b = if rng.below(4) == 0 { a.clone() } else { rng.evr() };
        pairs.push((a, b));
    }
    // rpm's own answers, a few hundred pairs per `rpm --eval` (an argument has a size limit).
    let mut theirs: Vec<i32> = Vec::new();
    for chunk in pairs.chunks(500) {
        let lua: String =
            chunk.iter().map(|(a, b)| format!("print(rpm.vercmp(\"{a}\", \"{b}\") .. \" \")\n")).collect();
        let out = std::process::Command::new("rpm")
            .arg("--eval")
            .arg(format!("%{{lua:\n{lua}}}"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
            .wait_with_output()
            .unwrap();
        theirs.extend(String::from_utf8_lossy(&out.stdout).split_whitespace().map(|v| v.parse::<i32>().unwrap()));
    }
    assert_eq!(theirs.len(), pairs.len());
    let mut checked = 0;
    for ((a, b), rpm) in pairs.iter().zip(theirs) {
        let (Ok(x), Ok(y)) = (
            nodekeeper_agent::components::version::Evr::parse(a),
            nodekeeper_agent::components::version::Evr::parse(b),
        ) else {
            continue;
        };
        let ours = x.cmp(&y) as i32;
        assert_eq!(ours, rpm.signum(), "{a} vs {b}: ours {ours}, rpm {rpm}");
        checked += 1;
    }
    assert!(checked > 2500, "only {checked} pairs were valid versions");
}

/// The CommandResult event of the command whose `SendCommandResponse` (JSON) is `sent`.
async fn command_result(center: &nodekeeper_tests::EventCenter, sent: &str) -> nodekeeper_proto::v1::Event {
    let command_id = nodekeeper_tests::json_lines(sent)[0]["commandId"].as_str().unwrap().to_owned();
    nodekeeper_tests::wait_for("the command result", Duration::from_secs(60), || async {
        nodekeeper_tests::stored_events(center.channel().await, "node-c", "CommandResult")
            .await
            .into_iter()
            .find(|e| e.attributes.get("command_id") == Some(&command_id))
    })
    .await
}

/// End to end with real processes: the desired version set in the event center reaches the agent,
/// which converges; the center lists it; a restart command round-trips; a rollback opens a fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_state_from_the_center_converges_and_commands_round_trip() {
    use nodekeeper_tests::{Agent, AgentSpec, EventCenter, cli, json_lines, wait_for};
    let center = EventCenter::start("[nodes]\ncheck_interval = \"50ms\"\n").await;
    let url = center.url();
    let n = Node::new();
    let extra = format!(
        "[component_manager]\ninstallroot = \"{}\"\nreleasever = \"1\"\nconfig_roots = [\"/etc/nk-demo\"]\nsystemctl = \"{}\"\nreconcile_interval = \"1h\"\n",
        n.root().display(),
        n.path("systemctl").display()
    );
    let agent = Agent::start(AgentSpec { extra: &extra, ..AgentSpec::new("node-c", &url) }).await;
    agent.wait_connected().await;

    let converged_at = |version: &'static str| {
        let url = url.clone();
        async move {
            let (code, out, _) = cli(&url, &["components", "list", "--node", "node-c", "-o", "json"]).await;
            if code != 0 {
                return None;
            }
            let nodes = json_lines(&out);
            let n = nodes.first()?;
            let c = &n["components"][0];
            (n["converged"] == true && c["installedVersion"] == version && c["phase"] == "COMPONENT_PHASE_CONVERGED")
                .then(|| n.clone())
        }
    };
    for (version, installed) in [("1.0-1", "0:1.0-1"), ("1.1-1", "0:1.1-1")] {
        let spec = n.spec(version, "x", "");
        let (code, out, err) =
            cli(&url, &["components", "set", "--cluster", "c1", "--node", "node-c", spec.to_str().unwrap()]).await;
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("1 nodes matched"), "{out}");
        let listed =
            wait_for(&format!("node-c converged at {installed}"), Duration::from_secs(60), || converged_at(installed))
                .await;
        assert_eq!(listed["components"][0]["desiredVersion"], version);
        assert_eq!(n.installed().as_deref(), Some(installed), "the RPM database agrees");
    }

    // A restart command round-trips: issued, carried out (the unit restarted), result recorded.
    let restarts = n.restarts();
    let (code, out, err) =
        cli(&url, &["components", "restart", "--cluster", "c1", "--node", "node-c", "demo", "-o", "json"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let result = command_result(&center, &out).await;
    assert_eq!(result.attributes["success"], "true", "{}", result.message);
    assert!(result.message.contains("nk-demo.service restarted and healthy"), "{}", result.message);
    assert_eq!(n.restarts(), restarts + 1);

    // A reinstall command too: the same version installed again, verified.
    std::fs::write(n.root().join("usr/lib/nk-demo/VERSION"), "damaged\n").unwrap();
    let (code, out, err) =
        cli(&url, &["components", "reinstall", "--cluster", "c1", "--node", "node-c", "demo", "-o", "json"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let result = command_result(&center, &out).await;
    assert_eq!(result.attributes["success"], "true", "{}", result.message);
    assert!(result.message.contains("demo reinstalled at 1.1-1"), "{}", result.message);
    assert_eq!(
        std::fs::read_to_string(n.root().join("usr/lib/nk-demo/VERSION")).unwrap(),
        "1.1\n",
        "the package's files are back"
    );

    // An unhealthy version is rolled back; the fault reaches the center.
    let spec = n.spec("1.2-1", "x", "");
    let (code, _, err) =
        cli(&url, &["components", "set", "--cluster", "c1", "--node", "node-c", spec.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    let fault = wait_for("the DemoUpgradeFailed fault", Duration::from_secs(60), || async {
        let (_, out, _) = cli(&url, &["faults", "list", "-o", "json"]).await;
        json_lines(&out).into_iter().find(|f| f["type"] == "DemoUpgradeFailed")
    })
    .await;
    assert!(fault["message"].as_str().unwrap().contains("rolled back to 0:1.1-1"), "{fault}");
    assert_eq!(n.installed().as_deref(), Some("0:1.1-1"));
    let (_, out, _) = cli(&url, &["components", "list", "-o", "json"]).await;
    let node = &json_lines(&out)[0];
    assert!(!node["converged"].as_bool().unwrap_or(false), "canonical JSON omits false: {node}");
    assert_eq!(node["components"][0]["phase"], "COMPONENT_PHASE_FAILED", "{node}");
}
